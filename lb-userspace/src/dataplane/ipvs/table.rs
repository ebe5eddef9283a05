//! The kernel state IPVS mode wants, computed from a desired state (pure): the virtual
//! services with their real servers, and the addresses the dummy interface holds. Laid out
//! as kube-proxy's IPVS mode (`pkg/proxy/ipvs/proxier.go`, `syncService`/`syncEndpoint`):
//!
//! - one virtual service per frontend: every ClusterIP, the NodePort at every node address,
//!   every externalIP and LoadBalancer IP, per protocol; all with the configured scheduler,
//!   and with ClientIP affinity persistent for its timeout;
//! - real servers, weight 1, forwarded by masquerade (NAT): the service's `endpoints` under
//!   policy Cluster, its `local_endpoints` under Local (internalTrafficPolicy for ClusterIPs,
//!   externalTrafficPolicy for the others). A virtual service without real servers stays:
//!   IPVS answers its connections with ICMP port unreachable, which is how kube-proxy's IPVS
//!   mode rejects services without endpoints;
//! - the ClusterIPs, externalIPs and LoadBalancer IPs bound to the dummy interface, so the
//!   node accepts packets to them and IPVS (on LOCAL_IN) sees them. Node addresses are local
//!   already.
//!
//! Two frontends of different service ports cannot share a virtual service; the first in
//! the desired state's order keeps it, as kube-proxy's map would keep one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::dataplane::iptables::rules::service_port_string;
use crate::model::{DesiredState, Endpoint, IpFamily, Protocol};

/// What identifies a virtual service: address, protocol, port (the family is the address's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl ServiceKey {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}",
            self.protocol.as_str(),
            SocketAddr::new(self.addr, self.port)
        )
    }
}

/// A virtual service's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAttrs {
    /// The scheduler's name as IPVS knows it (`rr`, `wrr`, `lc`, `sh`, `mh`, ...).
    pub scheduler: String,
    /// ClientIP affinity: the persistence timeout in seconds.
    pub persistence_s: Option<u32>,
}

/// A virtual service and its real servers, each with its weight. Weight 0 marks a real
/// server being drained: it keeps its established connections and gets no new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualService {
    pub attrs: ServiceAttrs,
    pub dests: BTreeMap<Endpoint, u32>,
}

/// Virtual services by key.
pub type Table = BTreeMap<ServiceKey, VirtualService>;

/// The weight of every real server that is in use (kube-proxy's).
pub const WEIGHT: u32 = 1;

/// Everything IPVS mode programs besides the iptables rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub services: Table,
    /// Addresses for the dummy interface.
    pub bound: BTreeSet<IpAddr>,
    /// What each virtual service is for, e.g. `ns1/svc1:p80 cluster IP` (for the rendering).
    pub comments: BTreeMap<ServiceKey, String>,
}

/// What kind of frontend a virtual service is, in kube-proxy's words.
fn frontend_kind(load_balancer: bool, node_port: bool) -> &'static str {
    match (load_balancer, node_port) {
        (true, _) => "loadbalancer IP",
        (false, true) => "node port",
        (false, false) => "external IP",
    }
}

/// The planned state for `desired`, for the `families` this node programs, with `scheduler`.
pub fn plan(desired: &DesiredState, families: &[IpFamily], scheduler: &str) -> Planned {
    let mut planned = Planned::default();
    for (name, sp) in &desired.services {
        let spn = service_port_string(name);
        let attrs = ServiceAttrs {
            scheduler: scheduler.to_string(),
            persistence_s: sp.affinity_timeout_s,
        };
        let wanted = |addr: IpAddr| families.contains(&IpFamily::of(addr));
        let real_servers = |local: bool, family: IpFamily| -> BTreeMap<Endpoint, u32> {
            let eps = if local {
                &sp.local_endpoints
            } else {
                &sp.endpoints
            };
            eps.iter()
                .filter(|e| e.family() == family)
                .map(|e| (*e, WEIGHT))
                .collect()
        };
        let mut add = |addr: IpAddr, port: u16, local: bool, comment: String, bind: bool| {
            let key = ServiceKey {
                addr,
                protocol: name.protocol,
                port,
            };
            if planned.services.contains_key(&key) {
                return;
            }
            planned.services.insert(
                key,
                VirtualService {
                    attrs: attrs.clone(),
                    dests: real_servers(local, IpFamily::of(addr)),
                },
            );
            planned.comments.insert(key, comment);
            if bind {
                planned.bound.insert(addr);
            }
        };
        for fe in sp.frontends.iter().filter(|f| wanted(f.addr)) {
            add(
                fe.addr,
                fe.port,
                sp.internal_local,
                format!("{spn} cluster IP"),
                true,
            );
        }
        for (fe, x) in sp.external_frontends.iter().filter(|(f, _)| wanted(f.addr)) {
            let node_port = !x.load_balancer && desired.node_addrs.contains(&fe.addr);
            let kind = frontend_kind(x.load_balancer, node_port);
            add(
                fe.addr,
                fe.port,
                sp.external_local,
                format!("{spn} {kind}"),
                !desired.node_addrs.contains(&fe.addr),
            );
        }
    }
    planned
}

/// The host part of an address as ipvsadm prints it: IPv6 in brackets.
fn at(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Virtual services in the layout of `ipvsadm -Ln` (with `comments` beside them, and
/// without the connection counters), for golden files, logs and tests.
pub fn render(services: &Table, comments: &BTreeMap<ServiceKey, String>) -> String {
    let mut out = String::new();
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str("  -> RemoteAddress:Port           Forward Weight\n");
    for (key, vs) in services {
        let mut line = format!(
            "{:<4} {} {}",
            key.protocol.as_str(),
            at(key.addr, key.port),
            vs.attrs.scheduler
        );
        if let Some(timeout) = vs.attrs.persistence_s {
            write!(line, " persistent {timeout}").unwrap();
        }
        match comments.get(key) {
            Some(c) => writeln!(out, "{line:<48} # {c}").unwrap(),
            None => writeln!(out, "{line}").unwrap(),
        }
        for (ep, weight) in &vs.dests {
            writeln!(out, "  -> {:<28} Masq    {weight}", at(ep.addr, ep.port)).unwrap();
        }
    }
    out
}

/// The dummy interface's addresses, one a line, with their prefix (a host route each).
pub fn render_bound(bound: &BTreeSet<IpAddr>) -> String {
    bound
        .iter()
        .map(|a| match a {
            IpAddr::V4(_) => format!("{a}/32\n"),
            IpAddr::V6(_) => format!("{a}/128\n"),
        })
        .collect()
}
