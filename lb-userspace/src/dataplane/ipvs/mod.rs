//! The IPVS dataplane: the desired state programmed into the kernel's IP Virtual Server the
//! way kube-proxy's IPVS mode programs it (`pkg/proxy/ipvs/proxier.go`):
//!
//! - `table`: virtual services and real servers, and the addresses of the dummy interface
//!   [`dummy::NAME`], computed from the desired state (pure);
//! - `diff`: the netlink operations from what the kernel holds to that (pure);
//! - `messages` and `genl`: those operations over generic netlink (family `IPVS`);
//! - `dummy`: the interface holding ClusterIPs, externalIPs and LoadBalancer IPs;
//! - `rules`: the iptables rules for masquerade, hairpin and loadBalancerSourceRanges,
//!   applied with the iptables dataplane's restore machinery;
//! - `kernel`: the sysctls IPVS needs, and the network namespace it all happens in.
//!
//! Every apply computes the whole plan and changes only what differs from what the last
//! successful apply programmed. A full sync (the first, the one after a failure, and the one
//! after [`IpvsDataplane::full_resync`]) reads the kernel's virtual services back instead,
//! so whatever someone else deleted or changed is repaired; it also reapplies the sysctls,
//! the interface and every iptables chain.
//!
//! Which virtual services are ours (the rule cleanup and full syncs use; other users' IPVS
//! services are never touched): those at an address on [`dummy::NAME`] (only this mode puts
//! addresses there), those this process programmed, and those at a node address with a port
//! in [`Config::node_port_range`] (Kubernetes reserves that range for NodePorts on every
//! node address, so nothing else may serve there; this catches NodePorts a previous run
//! left behind).

pub mod diff;
pub mod dummy;
pub mod genl;
pub mod kernel;
pub mod messages;
pub mod rules;
pub mod table;

#[cfg(test)]
mod golden;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use super::iptables::{self, restore, rules::FamilyRules, CommandFactory};
use super::{ApplyReport, Dataplane};
use crate::model::{DesiredState, IpFamily};
use messages::{Ipvs, Op};
use table::{Planned, ServiceKey, Table};

/// How IPVS picks a real server for a new connection (`ipvsadm -s`), the agent's
/// `--ipvs-scheduler`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin (every real server has weight 1, so as `rr`).
    Wrr,
    /// Least connections.
    Lc,
    /// Source hashing: a client address always maps to the same real server.
    Sh,
    /// Maglev hashing: consistent hashing, few flows move when real servers change.
    Mh,
}

impl Scheduler {
    /// The name IPVS knows it by (and its module's suffix: `ip_vs_<name>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Sh => "sh",
            Scheduler::Mh => "mh",
        }
    }
}

impl std::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scheduler {
    type Err = String;

    fn from_str(s: &str) -> Result<Scheduler, String> {
        [
            Scheduler::Rr,
            Scheduler::Wrr,
            Scheduler::Lc,
            Scheduler::Sh,
            Scheduler::Mh,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not an IPVS scheduler: rr, wrr, lc, sh or mh"))
    }
}

/// How the dataplane runs.
#[derive(Clone)]
pub struct Config {
    pub scheduler: Scheduler,
    /// The families to program (both by default; a node without IPv6 leaves out `V6`).
    pub families: Vec<IpFamily>,
    /// The iptables programs for the masquerade rules.
    pub iptables: iptables::Backend,
    /// Makes the `Command` that runs a program (`ip`, `iptables-restore`, `modprobe`): by
    /// default the program itself; tests run it in a network namespace.
    pub command: CommandFactory,
    /// The network namespace whose IPVS table and sysctls to program (a `/run/netns/NAME`
    /// file); `None`: the agent's own. Must be the one `command` runs programs in.
    pub netns: Option<PathBuf>,
    /// The cluster's NodePort range (the API server's `--service-node-port-range`): virtual
    /// services at node addresses in it count as ours (see the module's documentation).
    pub node_port_range: RangeInclusive<u16>,
}

impl Config {
    pub fn new(scheduler: Scheduler) -> Config {
        Config {
            scheduler,
            families: vec![IpFamily::V4, IpFamily::V6],
            iptables: iptables::Backend::system(),
            command: Arc::new(|program| Command::new(program)),
            netns: None,
            node_port_range: 30000..=32767,
        }
    }

    fn iptables_config(&self) -> iptables::Config {
        let mut c = iptables::Config::new(self.iptables.clone());
        c.families = self.families.clone();
        c.command = self.command.clone();
        c
    }
}

impl Default for Config {
    fn default() -> Config {
        Config::new(Scheduler::default())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("scheduler", &self.scheduler)
            .field("families", &self.families)
            .field("iptables", &self.iptables)
            .field("netns", &self.netns)
            .field("node_port_range", &self.node_port_range)
            .finish_non_exhaustive()
    }
}

/// What went wrong programming IPVS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the kernel has no IPVS (generic netlink family \"IPVS\" not found; {modprobe}): load it with `modprobe ip_vs`, or run on a kernel built with CONFIG_IP_VS (or use another --mode)")]
    NoIpvs {
        /// What `modprobe ip_vs` did.
        modprobe: String,
    },
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot talk generic netlink to the kernel ({what}): {source}; IPVS mode needs CAP_NET_ADMIN")]
    Netlink {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("IPVS refused to {op}: {source}{hint}")]
    Op {
        op: String,
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set sysctl {key}={value}: {source}; IPVS mode needs it (see dataplane::ipvs::kernel::SYSCTLS) and write access to /proc/sys")]
    Sysctl {
        key: String,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run `{command}`: {source}; IPVS mode needs iproute2's `ip` (Debian: the `iproute2` package)")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

impl Error {
    fn op(op: &Op, source: io::Error) -> Error {
        let hint = match (op, source.raw_os_error()) {
            (Op::AddService(_, a) | Op::SetService(_, a), Some(libc::ENOENT)) => format!(
                " (is the scheduler {0:?} there? load it with `modprobe ip_vs_{0}`)",
                a.scheduler
            ),
            (Op::AddService(..) | Op::AddDest(..), Some(libc::EEXIST)) => {
                " (another program changed the IPVS table; the next apply reads it back)".into()
            }
            (_, Some(libc::ESRCH)) => {
                " (it is gone from the IPVS table; the next apply reads the table back)".into()
            }
            _ => String::new(),
        };
        Error::Op {
            op: op.to_string(),
            hint,
            source,
        }
    }
}

/// Opens a netlink socket in `netns` and looks IPVS up; `None` when the kernel has none.
fn open(netns: Option<&Path>) -> Result<Option<Ipvs>, Error> {
    let socket = kernel::in_netns(netns, genl::Socket::open)
        .map_err(|source| Error::Netns {
            path: netns.unwrap_or(Path::new("")).to_path_buf(),
            source,
        })?
        .map_err(|source| Error::Netlink {
            what: "opening a socket",
            source,
        })?;
    Ipvs::new(socket).map_err(|source| Error::Netlink {
        what: "looking up the IPVS family",
        source,
    })
}

/// Runs `modprobe ip_vs` and says how it went, for messages.
fn modprobe(config: &Config) -> String {
    match (config.command)("modprobe").arg("ip_vs").output() {
        Ok(out) if out.status.success() => "`modprobe ip_vs` succeeded".into(),
        Ok(out) => format!(
            "`modprobe ip_vs` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("`modprobe ip_vs` could not run: {e}"),
    }
}

/// An IPVS client, loading the module first if the kernel has none loaded (as kube-proxy
/// does at start).
fn open_loading(config: &Config) -> Result<Ipvs, Error> {
    if let Some(ipvs) = open(config.netns.as_deref())? {
        return Ok(ipvs);
    }
    let modprobe = modprobe(config);
    open(config.netns.as_deref())?.ok_or(Error::NoIpvs { modprobe })
}

/// Whether IPVS mode can run with `config`: the kernel's generic netlink family `IPVS`
/// resolves, after `modprobe ip_vs` if needed. The error says what is missing and what to
/// do.
pub fn probe(config: &Config) -> Result<(), Error> {
    open_loading(config).map(drop)
}

/// [`probe`] for the agent's own namespace.
pub fn available() -> Result<(), Error> {
    probe(&Config::default())
}

/// Whether the kernel's virtual service `key` is ours (the rule in the module's
/// documentation): at an address on the dummy interface (`bound`), programmed by this
/// process (`programmed`), or a NodePort (`node_addrs`, `node_ports`).
pub fn owned(
    key: &ServiceKey,
    bound: &BTreeSet<IpAddr>,
    programmed: &Table,
    node_addrs: &BTreeSet<IpAddr>,
    node_ports: &RangeInclusive<u16>,
) -> bool {
    bound.contains(&key.addr)
        || programmed.contains_key(key)
        || (node_addrs.contains(&key.addr) && node_ports.contains(&key.port))
}

/// Removes what IPVS mode leaves behind (its virtual services, the dummy interface, its
/// iptables chains), for the other modes to call at start. `node_addrs`: this node's
/// addresses, where leftover NodePorts are. Nothing to do, and no error, on a kernel without
/// IPVS (the module is not loaded for this), or without the iptables programs; and nothing
/// when `lba-ipvs0` is absent: without it the IPVS mode never ran here, and NodePort-range
/// services at node addresses belong to someone else (kube-proxy's IPVS mode during a
/// migration, say).
pub fn remove_leftovers(config: &Config, node_addrs: &BTreeSet<IpAddr>) -> anyhow::Result<()> {
    match dummy::exists(&config.command) {
        Ok(false) => return Ok(()),
        Ok(true) => {}
        Err(e) => log::info!(
            "ipvs leftovers: cannot tell whether {} exists ({e}); looking anyway",
            dummy::NAME
        ),
    }
    let mut dp = IpvsDataplane::new(config.clone());
    dp.node_addrs = node_addrs.clone();
    dp.remove(false)
}

/// What the last successful apply programmed.
#[derive(Clone, Debug, Default)]
struct Programmed {
    services: Table,
    bound: BTreeSet<IpAddr>,
    rules: BTreeMap<IpFamily, FamilyRules>,
}

/// The dataplane.
pub struct IpvsDataplane {
    config: Config,
    ipvs: Option<Ipvs>,
    last: Option<Programmed>,
    /// The node addresses of the last desired state (where NodePorts are).
    node_addrs: BTreeSet<IpAddr>,
    /// The next apply is a full sync: at start, after `full_resync`, after a failure.
    full: bool,
    failed: bool,
}

impl IpvsDataplane {
    /// The dataplane; nothing touches the kernel before the first apply (check [`probe`]
    /// first to fail early with a clear message).
    pub fn new(config: Config) -> IpvsDataplane {
        IpvsDataplane {
            config,
            ipvs: None,
            last: None,
            node_addrs: BTreeSet::new(),
            full: true,
            failed: false,
        }
    }

    fn client(&mut self) -> Result<&mut Ipvs, Error> {
        if self.ipvs.is_none() {
            self.ipvs = Some(open_loading(&self.config)?);
        }
        Ok(self.ipvs.as_mut().expect("just opened"))
    }

    /// The virtual services of ours the kernel holds, with their real servers' weights (for
    /// inspection and tests; render them with [`table::render`]).
    pub fn kernel_services(&mut self) -> anyhow::Result<Table> {
        let owns = self.ownership(&dummy::addresses(&self.config.command)?, &self.programmed());
        Ok(self.client()?.table(owns)?.0)
    }

    /// What the last apply programmed.
    fn programmed(&self) -> Table {
        self.last
            .as_ref()
            .map(|l| l.services.clone())
            .unwrap_or_default()
    }

    /// The ownership rule, with `bound` the dummy interface's addresses and `programmed`
    /// what this process programmed.
    fn ownership(
        &self,
        bound: &BTreeSet<IpAddr>,
        programmed: &Table,
    ) -> impl Fn(&ServiceKey) -> bool {
        let (bound, node_addrs) = (bound.clone(), self.node_addrs.clone());
        let programmed = programmed.clone();
        let node_ports = self.config.node_port_range.clone();
        move |key| owned(key, &bound, &programmed, &node_addrs, &node_ports)
    }

    /// Cleanup; `strict`: iptables programs that cannot run are an error (for cleanup; for
    /// leftovers at start of another mode, a node without them has no chains of ours).
    fn remove(&mut self, strict: bool) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let bound = dummy::addresses(&self.config.command)?;
        let owns = self.ownership(&bound, &self.programmed());
        self.last = None;
        self.full = true;
        // Without IPVS loaded there are no virtual services; do not load it to find none.
        let ipvs = match self.ipvs.take() {
            Some(ipvs) => Some(ipvs),
            None => open(self.config.netns.as_deref())?,
        };
        if let Some(mut ipvs) = ipvs {
            for (key, _) in ipvs.services().map_err(|source| Error::Netlink {
                what: "listing virtual services",
                source,
            })? {
                if owns(&key) {
                    let op = Op::DelService(key);
                    ipvs.apply(&op).map_err(|e| Error::op(&op, e))?;
                }
            }
            self.ipvs = Some(ipvs);
        }
        dummy::delete(&self.config.command)?;
        let ipt = self.config.iptables_config();
        for family in self.config.families.clone() {
            ipt.remove_jumps(family, rules::JUMP_RULES);
            let removed = ipt
                .chains_with_prefix(family, rules::CHAIN_PREFIX)
                .and_then(|chains| {
                    ipt.restore(
                        family,
                        &restore::delete_leftovers(&BTreeMap::new(), &chains),
                    )
                });
            match removed {
                Err(e @ iptables::Error::Spawn { .. }) if !strict => {
                    log::info!(
                        "ipvs leftovers: no {family} iptables here ({e}); no chains to remove"
                    );
                }
                r => r.with_context(|| format!("removing the IPVS mode's {family} chains"))?,
            }
        }
        Ok(())
    }

    /// The sysctls, once per full sync, in the namespace programmed.
    fn ensure_sysctls(&self) -> Result<(), Error> {
        let mut wanted: Vec<(&str, &str)> = kernel::SYSCTLS.to_vec();
        if kernel::needs_conn_reuse_mode_0(&kernel::kernel_release()) {
            wanted.push(("net.ipv4.vs.conn_reuse_mode", "0"));
        }
        let netns = self.config.netns.as_deref();
        let result = kernel::in_netns(netns, || {
            for (key, value) in &wanted {
                kernel::ensure_sysctl(key, value).map_err(|source| Error::Sysctl {
                    key: key.to_string(),
                    value: value.to_string(),
                    source,
                })?;
            }
            Ok(())
        });
        result.map_err(|source| Error::Netns {
            path: netns.unwrap_or(Path::new("")).to_path_buf(),
            source,
        })?
    }

    fn sync(&mut self, desired: &DesiredState, report: &mut ApplyReport) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let planned: Planned = table::plan(
            desired,
            &self.config.families,
            self.config.scheduler.as_str(),
        );
        self.node_addrs = desired.node_addrs.clone();
        let full = self.full || self.last.is_none();
        let previous = self.last.take();
        // What the kernel holds: read back for a full sync, else what the last apply left.
        let (old_services, old_bound, idle) = if full {
            self.client()?;
            self.ensure_sysctls()?;
            dummy::ensure(&self.config.command)?;
            let bound = dummy::addresses(&self.config.command)?;
            let mut claimed = bound.clone();
            claimed.extend(planned.bound.iter().copied());
            let programmed = previous.as_ref().map(|p| p.services.clone());
            let owns = self.ownership(&claimed, &programmed.unwrap_or_default());
            let (table, idle) = self
                .client()?
                .table(owns)
                .map_err(|source| Error::Netlink {
                    what: "reading the virtual services back",
                    source,
                })?;
            (table, bound, idle)
        } else {
            let previous = previous.clone().unwrap_or_default();
            let mut idle = Vec::new();
            let draining: BTreeSet<ServiceKey> = diff::draining(&previous.services)
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            for key in draining {
                let dests = self
                    .client()?
                    .dests(&key)
                    .map_err(|source| Error::Netlink {
                        what: "reading the connections of draining real servers",
                        source,
                    })?;
                idle.extend(
                    dests
                        .iter()
                        .filter(|d| d.weight == 0 && d.active + d.inactive == 0)
                        .map(|d| (key, d.endpoint)),
                );
            }
            (previous.services, previous.bound, idle)
        };

        // Addresses first: a new service's address is local before its virtual service
        // exists, and one going away stops being accepted with it.
        let add: BTreeSet<IpAddr> = planned.bound.difference(&old_bound).copied().collect();
        let del: BTreeSet<IpAddr> = old_bound.difference(&planned.bound).copied().collect();
        dummy::change(&self.config.command, &add, &del)?;
        report.writes += add.len();
        report.deletes += del.len();

        let idle: BTreeSet<(ServiceKey, crate::model::Endpoint)> = idle.into_iter().collect();
        let d = diff::diff(&old_services, &planned.services, &idle);
        let ipvs = self.client()?;
        for op in &d.ops {
            log::debug!("ipvs: {op}");
            ipvs.apply(op).map_err(|e| Error::op(op, e))?;
            match op {
                Op::DelService(_) | Op::DelDest(..) => report.deletes += 1,
                _ => report.writes += 1,
            }
        }

        let ipt = self.config.iptables_config();
        let mut rules = BTreeMap::new();
        for family in self.config.families.clone() {
            let new = rules::generate(desired, family);
            let (old, stale) = if full {
                (None, ipt.chains_with_prefix(family, rules::CHAIN_PREFIX)?)
            } else {
                (
                    previous.as_ref().and_then(|p| p.rules.get(&family)),
                    BTreeMap::new(),
                )
            };
            let plan = restore::plan(old, &new, &stale);
            ipt.restore(family, &plan.input)
                .with_context(|| format!("programming the IPVS mode's {family} iptables rules"))?;
            if full {
                ipt.ensure_jumps(family, rules::JUMP_RULES)?;
            }
            report.writes += plan.written;
            report.deletes += plan.deleted;
            rules.insert(family, new);
        }
        self.last = Some(Programmed {
            services: d.programmed,
            bound: planned.bound,
            rules,
        });
        Ok(())
    }
}

impl Dataplane for IpvsDataplane {
    /// Removes everything this mode created: our virtual services (see the module's
    /// documentation for which are ours), the dummy interface and our iptables chains.
    fn cleanup(&mut self) -> anyhow::Result<()> {
        self.remove(true)
    }

    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        if let Err(e) = self.sync(desired, &mut report) {
            self.failed = true;
            self.full = true;
            self.last = None;
            // A socket that failed may be in any state; the next apply opens a new one.
            self.ipvs = None;
            return Err(e);
        }
        self.failed = false;
        self.full = false;
        report.count(desired);
        Ok(report)
    }

    fn needs_retry(&self) -> bool {
        self.failed
    }

    /// Makes the next apply a full sync: the kernel's virtual services read back and
    /// repaired, the interface, sysctls and every iptables chain rewritten.
    fn full_resync(&mut self) -> bool {
        self.full = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    #[test]
    fn schedulers_parse_by_their_ipvs_names() {
        for s in ["rr", "wrr", "lc", "sh", "mh"] {
            assert_eq!(s.parse::<Scheduler>().unwrap().as_str(), s);
        }
        let e = "maglev".parse::<Scheduler>().unwrap_err();
        assert!(e.contains("rr, wrr, lc, sh or mh"), "{e}");
        assert_eq!(Config::default().scheduler, Scheduler::Rr);
    }

    #[test]
    fn ours_are_bound_addresses_programmed_services_and_node_ports() {
        let key = |a: &str, port| ServiceKey {
            addr: a.parse().unwrap(),
            protocol: Protocol::Tcp,
            port,
        };
        let bound: BTreeSet<IpAddr> = ["10.96.0.1".parse().unwrap()].into();
        let node: BTreeSet<IpAddr> = ["192.168.0.2".parse().unwrap()].into();
        let mut programmed = Table::new();
        programmed.insert(
            key("192.168.0.2", 8080),
            table::VirtualService {
                attrs: table::ServiceAttrs {
                    scheduler: "rr".into(),
                    persistence_s: None,
                },
                dests: BTreeMap::new(),
            },
        );
        let range = 30000..=32767;
        let ours = |k| owned(&k, &bound, &programmed, &node, &range);
        assert!(ours(key("10.96.0.1", 443)), "any port of a bound address");
        assert!(ours(key("192.168.0.2", 30080)), "a NodePort");
        assert!(ours(key("192.168.0.2", 8080)), "programmed here");
        assert!(
            !ours(key("192.168.0.2", 80)),
            "someone else's at the node address"
        );
        assert!(!ours(key("10.1.2.3", 30080)), "someone else's elsewhere");
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = Error::NoIpvs {
            modprobe: "`modprobe ip_vs` failed: FATAL: Module ip_vs not found".into(),
        };
        let text = e.to_string();
        assert!(
            text.contains("generic netlink family \"IPVS\" not found"),
            "{text}"
        );
        assert!(text.contains("modprobe ip_vs"), "{text}");
        let k = ServiceKey {
            addr: "10.96.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 80,
        };
        let op = Op::AddService(
            k,
            table::ServiceAttrs {
                scheduler: "mh".into(),
                persistence_s: None,
            },
        );
        let text = Error::op(&op, io::Error::from_raw_os_error(libc::ENOENT)).to_string();
        assert!(text.contains("add service TCP 10.96.0.1:80 mh"), "{text}");
        assert!(text.contains("modprobe ip_vs_mh"), "{text}");
    }
}
