//! The userspace dataplane: the agent proxies every service port itself, as kube-proxy's
//! original mode did (`pkg/proxy/userspace`, Kubernetes <= 1.25). Per service port and
//! address family the agent holds a socket, its portal (`portal.rs` says which exist), bound
//! to a port the kernel chooses on the wildcard address; iptables rules redirect the
//! service's frontends to that port (`rules.rs`); the portal's task picks an endpoint round
//! robin, with ClientIP affinity (`balancer.rs`), and relays TCP (`tcp.rs`) or UDP
//! (`udp.rs`).
//!
//! An apply opens the portals that are new (binding synchronously, so a bind error fails the
//! apply), updates the endpoints of the others in place (their sockets and connections stay),
//! programs the rules (only the chains that changed, as the iptables mode does), and only then
//! closes the portals that went away, so no redirect ever points at a closed port. Established
//! TCP connections of a closed portal go on; its UDP associations end with it.
//!
//! A frontend whose portal has no endpoints is not redirected: a filter rule rejects its
//! traffic instead, so clients are refused at once (TCP: connection refused; UDP: port
//! unreachable), as in the other modes. A socket cannot refuse a datagram, and a listener
//! can only accept a connection and then reset it, so the rule is the only way to answer
//! alike in every mode.
//!
//! Known limitations of the mode, as kube-proxy's had them:
//! - The endpoints see the node's address as the source, never the client's, also under
//!   externalTrafficPolicy Local (which here only restricts external frontends to this
//!   node's endpoints).
//! - The node's own connections to a Local-policy external frontend use its portal, so
//!   this node's endpoints only (the iptables mode sends them to every endpoint).
//! - SCTP is not proxied: its service ports get no portal and no rules.
//! - Every byte crosses the agent: expect far lower throughput than the kernel modes.
//! - A portal's port is open on every address of the node: clients that know it can reach
//!   it without going through a frontend.

mod balancer;
mod pktinfo;
mod portal;
pub mod rules;
mod tcp;
mod udp;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use log::info;
use socket2::{Domain, Socket, Type};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::iptables::{self, restore, rules::FamilyRules};
use super::{ApplyReport, Dataplane};
use crate::model::{DesiredState, IpFamily, Protocol};
use balancer::{Balancer, Shared};
use portal::PortalSpec;

pub use portal::{PortalKey, Scope};
pub use tcp::DIAL_TIMEOUTS;

/// How long a UDP association lives without a datagram either way. kube-proxy's default
/// (`--udp-timeout`) was 250 ms, which cuts off any exchange with a slower answer; 30 s is
/// the kernel's conntrack timeout for a UDP flow that has seen no reply
/// (`nf_conntrack_udp_timeout`), so an association lives about as long as the redirect's
/// conntrack entry does.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How the dataplane runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The iptables back end, the families served (a portal per family), and how the
    /// programs run.
    pub iptables: iptables::Config,
    /// See [`DEFAULT_UDP_IDLE_TIMEOUT`].
    pub udp_idle_timeout: Duration,
}

impl Config {
    pub fn new(iptables: iptables::Config) -> Config {
        Config {
            iptables,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
        }
    }
}

/// What went wrong opening a portal.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the userspace dataplane must be applied inside a tokio runtime (it spawns a task per portal)")]
    NoRuntime,
    #[error("opening the {protocol} portal of {service} ({family}): {source}; the kernel chooses the port, so this is a resource limit (open files: raise `ulimit -n`) or a family the node does not have (leave it out of the configured families)")]
    Bind {
        service: String,
        protocol: &'static str,
        family: IpFamily,
        #[source]
        source: std::io::Error,
    },
}

/// One open portal. Dropping it stops its task: the listener closes (TCP connections go
/// on), or the UDP socket and its associations close.
struct Portal {
    port: u16,
    balancer: Shared,
    task: JoinHandle<()>,
}

impl Drop for Portal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The dataplane.
pub struct UserspaceDataplane {
    config: Config,
    portals: BTreeMap<PortalKey, Portal>,
    /// What the last successful sync wrote, per family.
    last: BTreeMap<IpFamily, FamilyRules>,
    /// The next apply rewrites every chain and checks the jump rules.
    full: bool,
    failed: bool,
    /// Ends every proxied TCP connection when dropped or replaced (cleanup, drop).
    shutdown: watch::Sender<()>,
}

impl UserspaceDataplane {
    /// A dataplane with no portal yet: the first apply opens them and writes every rule.
    /// Cheap; it touches nothing until then.
    pub fn new(config: Config) -> UserspaceDataplane {
        UserspaceDataplane {
            config,
            portals: BTreeMap::new(),
            last: BTreeMap::new(),
            full: true,
            failed: false,
            shutdown: watch::channel(()).0,
        }
    }

    /// The port of each open portal: the service port, family and scope it serves.
    pub fn portal_ports(&self) -> BTreeMap<PortalKey, u16> {
        self.portals
            .iter()
            .map(|(k, p)| (k.clone(), p.port))
            .collect()
    }

    /// Opens the portals that are new and updates the endpoints of those that stay.
    /// Returns how many it opened.
    fn open_portals(&mut self, wanted: &BTreeMap<PortalKey, PortalSpec>) -> anyhow::Result<usize> {
        let mut opened = 0;
        for (key, spec) in wanted {
            if let Some(portal) = self.portals.get(key) {
                let mut balancer = balancer::lock(&portal.balancer);
                balancer.update(spec.endpoints.clone(), spec.affinity);
                balancer.prune(tokio::time::Instant::now());
                continue;
            }
            let portal = self.open(key, spec)?;
            info!(
                "userspace portal for {} ({}) on port {}",
                key.service, key.family, portal.port
            );
            self.portals.insert(key.clone(), portal);
            opened += 1;
        }
        Ok(opened)
    }

    fn open(&self, key: &PortalKey, spec: &PortalSpec) -> Result<Portal, Error> {
        let bind_err = |source| Error::Bind {
            service: key.service.to_string(),
            protocol: key.protocol().as_str(),
            family: key.family,
            source,
        };
        let balancer: Shared = Arc::new(Mutex::new(Balancer::new(
            spec.endpoints.clone(),
            spec.affinity,
        )));
        let name = format!("{} ({})", key.service, key.family);
        let socket = bind(key.family, key.protocol()).map_err(bind_err)?;
        let port = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or(0, |a| a.port());
        let task = match key.protocol() {
            Protocol::Tcp => {
                let listener =
                    tokio::net::TcpListener::from_std(socket.into()).map_err(bind_err)?;
                let shutdown = self.shutdown.subscribe();
                tokio::spawn(tcp::serve(listener, balancer.clone(), name, shutdown))
            }
            _ => {
                pktinfo::enable(&socket, key.family == IpFamily::V6).map_err(bind_err)?;
                let socket = tokio::net::UdpSocket::from_std(socket.into()).map_err(bind_err)?;
                let idle = self.config.udp_idle_timeout;
                tokio::spawn(udp::serve(socket, balancer.clone(), name, idle))
            }
        };
        Ok(Portal {
            port,
            balancer,
            task,
        })
    }

    /// Opens and updates the portals, programs the rules, then closes the portals no longer
    /// wanted.
    fn apply_portals(
        &mut self,
        wanted: &BTreeMap<PortalKey, PortalSpec>,
    ) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport {
            writes: self.open_portals(wanted)?,
            ..ApplyReport::default()
        };
        for family in self.config.iptables.families.clone() {
            if let Err(e) = self.sync_rules(family, wanted, &mut report) {
                // The kernel may hold part of it: rewrite everything next time.
                self.full = true;
                return Err(e);
            }
        }
        // Only now that no rule points at them.
        let before = self.portals.len();
        self.portals.retain(|key, _| wanted.contains_key(key));
        report.deletes += before - self.portals.len();
        Ok(report)
    }

    /// Programs one family's rules for the wanted portals (all open by now).
    fn sync_rules(
        &mut self,
        family: IpFamily,
        wanted: &BTreeMap<PortalKey, PortalSpec>,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        let new = rules::generate(family, wanted, |key| self.portals[key].port);
        let old = if self.full {
            None
        } else {
            self.last.get(&family)
        };
        let plan = restore::plan(old, &new, &BTreeMap::new());
        // The rules are out of step from here until the restore succeeds.
        self.last.remove(&family);
        self.config
            .iptables
            .restore(family, &plan.input)
            .with_context(|| format!("programming the userspace mode's {family} redirects"))?;
        if self.full {
            self.config
                .iptables
                .ensure_jumps(family, rules::JUMP_RULES)
                .with_context(|| format!("inserting the userspace mode's {family} jump rules"))?;
        }
        report.writes += plan.written;
        report.deletes += plan.deleted;
        self.last.insert(family, new);
        Ok(())
    }
}

/// A socket of `protocol` on the wildcard address of `family`, on a port the kernel
/// chooses: REDIRECT sends to the incoming interface's address (or loopback), so the portal
/// must listen on all of them. Non-blocking, for tokio.
fn bind(family: IpFamily, protocol: Protocol) -> std::io::Result<Socket> {
    let (domain, any): (Domain, IpAddr) = match family {
        IpFamily::V4 => (Domain::IPV4, Ipv4Addr::UNSPECIFIED.into()),
        IpFamily::V6 => (Domain::IPV6, Ipv6Addr::UNSPECIFIED.into()),
    };
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        _ => Type::DGRAM,
    };
    let socket = Socket::new(domain, ty.cloexec(), None)?;
    if family == IpFamily::V6 {
        // Each family has its own portal (and port).
        socket.set_only_v6(true)?;
    }
    socket.bind(&SocketAddr::new(any, 0).into())?;
    if protocol == Protocol::Tcp {
        socket.listen(1024)?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

impl Dataplane for UserspaceDataplane {
    /// Closes every portal and proxied connection and removes our rules and chains, in every
    /// configured family. Works without a prior apply too, so an agent can call it to remove
    /// what an earlier run in this mode left.
    fn cleanup(&mut self) -> anyhow::Result<()> {
        self.portals.clear();
        self.shutdown = watch::channel(()).0;
        self.last.clear();
        self.full = true;
        let owned: BTreeMap<_, BTreeSet<String>> =
            rules::CHAINS
                .iter()
                .fold(BTreeMap::new(), |mut by_table, (table, chain)| {
                    by_table
                        .entry(*table)
                        .or_insert_with(BTreeSet::new)
                        .insert(chain.to_string());
                    by_table
                });
        for &family in &self.config.iptables.families {
            self.config.iptables.remove_jumps(family, rules::JUMP_RULES);
            self.config
                .iptables
                .restore(family, &restore::delete_leftovers(&BTreeMap::new(), &owned))
                .with_context(|| format!("deleting the userspace mode's {family} chains"))?;
        }
        Ok(())
    }

    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
        if tokio::runtime::Handle::try_current().is_err() {
            self.failed = true;
            return Err(Error::NoRuntime.into());
        }
        let wanted = portal::portals(desired, &self.config.iptables.families);
        let result = self.apply_portals(&wanted);
        self.failed = result.is_err();
        let mut report = result?;
        self.full = false;
        report.service_ports = wanted
            .keys()
            .map(|k| &k.service)
            .collect::<BTreeSet<_>>()
            .len();
        report.backends = portal::backends(wanted.values());
        Ok(report)
    }

    fn needs_retry(&self) -> bool {
        self.failed
    }

    /// Makes the next apply rewrite every chain of ours and check the jump rules, so rules
    /// someone else changed come back (the sockets need no such care: only we hold them).
    fn full_resync(&mut self) -> bool {
        self.full = true;
        true
    }
}
