//! Which proxy sockets ("portals", kube-proxy's word) a desired state needs, and what each
//! serves. Pure.
//!
//! A portal is one socket of the agent's that the redirect rules send a service port's
//! traffic to, so everything that arrives on it must be served alike. Frontends whose
//! traffic policies choose different endpoint sets therefore get different portals: a
//! service port has one per address family and [`Scope`], usually one in all (ClusterIPs and
//! external frontends of a policy-Cluster service share it).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::model::{DesiredState, Frontend, IpFamily, Protocol, ServicePortName};

/// The endpoint set a portal balances over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Every endpoint (`ServicePort::endpoints`): traffic policy Cluster.
    Cluster,
    /// This node's endpoints (`ServicePort::local_endpoints`): traffic policy Local.
    Local,
}

impl Scope {
    fn of(local: bool) -> Scope {
        if local {
            Scope::Local
        } else {
            Scope::Cluster
        }
    }
}

/// Names one portal.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortalKey {
    pub service: ServicePortName,
    pub family: IpFamily,
    pub scope: Scope,
}

/// What a frontend redirected to a portal is, for the chain its rule goes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A ClusterIP or externalIP: the `PORTALS` chains.
    Portal,
    /// A LoadBalancer IP: the `PORTALS` chains, for the `source_ranges` only.
    LoadBalancer,
    /// A NodePort on a node address: the `NODEPORT` chains.
    NodePort,
}

/// Everything one portal serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortalSpec {
    /// The frontends redirected to it.
    pub frontends: Vec<(Frontend, Kind)>,
    /// The endpoints it balances over, in address order.
    pub endpoints: Vec<SocketAddr>,
    /// loadBalancerSourceRanges of this family: the only clients its LoadBalancer IPs
    /// accept (none: every client).
    pub source_ranges: Vec<(IpAddr, u8)>,
    /// ClientIP session affinity: how long a client sticks to its endpoint.
    pub affinity: Option<Duration>,
    /// With no endpoints: whether the service port has endpoints of this family elsewhere
    /// (a Local portal on a node without local ones). The filter rules then drop, where a
    /// service port with no endpoints at all rejects, as the iptables mode does.
    pub endpoints_elsewhere: bool,
}

impl PortalKey {
    pub fn protocol(&self) -> Protocol {
        self.service.protocol
    }
}

/// The portals of `desired` in `families`. SCTP service ports get none: the agent's sockets
/// proxy TCP and UDP only (as kube-proxy's userspace mode did), so their frontends are left
/// alone.
pub fn portals(desired: &DesiredState, families: &[IpFamily]) -> BTreeMap<PortalKey, PortalSpec> {
    let mut out: BTreeMap<PortalKey, PortalSpec> = BTreeMap::new();
    for (name, sp) in &desired.services {
        if name.protocol == Protocol::Sctp {
            continue;
        }
        let internal = sp
            .frontends
            .iter()
            .map(|f| (*f, Kind::Portal, sp.internal_local));
        let external = sp.external_frontends.iter().map(|(f, x)| {
            let node_port = !x.load_balancer && desired.node_addrs.contains(&f.addr);
            let kind = if node_port {
                Kind::NodePort
            } else if x.load_balancer {
                Kind::LoadBalancer
            } else {
                Kind::Portal
            };
            (*f, kind, sp.external_local)
        });
        for (frontend, kind, local) in internal.chain(external) {
            let family = frontend.family();
            if !families.contains(&family) {
                continue;
            }
            let scope = Scope::of(local);
            let key = PortalKey {
                service: name.clone(),
                family,
                scope,
            };
            let spec = out.entry(key).or_insert_with(|| {
                let of_family = |set: &std::collections::BTreeSet<crate::model::Endpoint>| {
                    set.iter()
                        .filter(|e| e.family() == family)
                        .map(|e| SocketAddr::new(e.addr, e.port))
                        .collect::<Vec<_>>()
                };
                let all = of_family(&sp.endpoints);
                let local = of_family(&sp.local_endpoints);
                let endpoints = match scope {
                    Scope::Cluster => all.clone(),
                    Scope::Local => local.clone(),
                };
                PortalSpec {
                    frontends: Vec::new(),
                    source_ranges: sp
                        .source_ranges
                        .iter()
                        .filter(|(a, _)| IpFamily::of(*a) == family)
                        .copied()
                        .collect(),
                    endpoints_elsewhere: !all.is_empty() || !local.is_empty(),
                    endpoints,
                    affinity: sp
                        .affinity_timeout_s
                        .map(|s| Duration::from_secs(u64::from(s))),
                }
            });
            spec.frontends.push((frontend, kind));
        }
    }
    out
}

/// The distinct endpoint addresses of `portals`, for the apply report.
pub fn backends<'a>(portals: impl IntoIterator<Item = &'a PortalSpec>) -> usize {
    let all: std::collections::BTreeSet<(IpAddr, u16)> = portals
        .into_iter()
        .flat_map(|p| p.endpoints.iter().map(|e| (e.ip(), e.port())))
        .collect();
    all.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fixtures::{ipv6, node_port_local};

    #[test]
    fn policies_split_portals_and_sctp_gets_none() {
        let both = [IpFamily::V4, IpFamily::V6];
        let p = portals(&node_port_local(), &both);
        let keys: Vec<String> = p
            .keys()
            .map(|k| format!("{} {} {:?}", k.service, k.family, k.scope))
            .collect();
        assert_eq!(
            keys,
            [
                "ns3/svc3:p80/Tcp IPv4 Cluster",
                "ns3/svc3:p80/Tcp IPv4 Local",
                "ns3/svc3b:p80/Tcp IPv4 Cluster",
                "ns3/svc3b:p80/Tcp IPv4 Local",
                "ns3/svc3c:p80/Udp IPv4 Local",
            ]
        );
        // svc3b: Local without local endpoints, but endpoints elsewhere.
        let local = p.values().nth(3).unwrap();
        assert!(local.endpoints.is_empty() && local.endpoints_elsewhere);
        assert_eq!(local.frontends[0].1, Kind::NodePort);

        let p = portals(&ipv6(), &both);
        assert_eq!(
            p.len(),
            2,
            "one UDP portal per family, none for SCTP: {p:?}"
        );
        assert!(p.keys().all(|k| k.protocol() == Protocol::Udp));
        let p = portals(&ipv6(), &[IpFamily::V4]);
        assert_eq!(p.len(), 1, "only the configured families");
        assert_eq!(p.values().next().unwrap().endpoints.len(), 1);
    }
}
