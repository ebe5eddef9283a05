//! Reading the pinned maps back, for `lb-agent dump` and for tests: what the datapath sees,
//! straight from the kernel.

use std::{
    borrow::Borrow,
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray};
use aya::Pod;
use lb_common::{
    names, sock, stats, Affinity, AffinityKey, Backend, Counter, CtEntry, CtKey, FrontendKey,
    Service, Slot, SlotKey, SourceRange, VipKey, V4, V6,
};

use super::family::{self, Family};
use super::plan::{AnyBackend, AnyFrontendKey, AnyService};

/// A snapshot of the pinned maps of both families.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Frontend -> (service entry, backends in slot order; `None` for a dangling slot), from
    /// `SERVICES` and `SERVICES6`.
    pub frontends: BTreeMap<AnyFrontendKey, (AnyService, Vec<Option<AnyBackend>>)>,
    /// IPv4 connection-tracking entries.
    pub conntrack: Vec<(CtKey, CtEntry)>,
    /// IPv6 connection-tracking entries.
    pub conntrack6: Vec<(CtKey<V6>, CtEntry<V6>)>,
    /// IPv4 session-affinity entries (client, service) -> backend.
    pub affinity: Vec<(AffinityKey, Affinity)>,
    /// IPv6 session-affinity entries.
    pub affinity6: Vec<(AffinityKey<V6>, Affinity)>,
    /// Counters summed over CPUs, indexed by `lb_common::stats` reason.
    pub counters: Vec<Counter>,
    /// Socket-program runs summed over CPUs, indexed by `lb_common::sock::stats` reason.
    pub sock_counters: Vec<u64>,
    /// Reverse entries of sockets balanced by the socket programs.
    pub sock_revnat: usize,
    /// loadBalancerSourceRanges by service id: (range start, prefix length).
    pub source_ranges: BTreeMap<u32, Vec<(IpAddr, u8)>>,
    /// The node's addresses, as egress knows them.
    pub node_addrs: Vec<IpAddr>,
    /// Interface indexes the XDP fast path redirects to.
    pub xdp_targets: Vec<u32>,
}

impl Snapshot {
    /// Backends (address, port) of the frontend `addr:port` for `proto`.
    pub fn backends_of(
        &self,
        addr: impl Into<IpAddr>,
        port: u16,
        proto: u8,
    ) -> Option<Vec<(IpAddr, u16)>> {
        let key = FrontendKey {
            addr: addr.into(),
            port_be: port.to_be(),
            proto,
            scope: lb_common::SCOPE_ALL,
        };
        self.frontends.get(&key).map(|(_, bs)| {
            bs.iter()
                .flatten()
                .map(|b| (b.addr, u16::from_be(b.port_be)))
                .collect()
        })
    }

    /// Human-readable rendering for the CLI.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "frontends ({}):", self.frontends.len());
        for (k, (svc, backends)) in &self.frontends {
            let _ = writeln!(
                out,
                "  {}/{} svc_id={} backends={} affinity_timeout_s={}{}",
                SocketAddr::new(k.addr, u16::from_be(k.port_be)),
                proto_name(k.proto),
                svc.svc_id,
                svc.backend_count,
                svc.affinity_timeout_s,
                flags(svc)
                    + if k.scope == lb_common::SCOPE_HOST {
                        " (the node's own connections)"
                    } else {
                        ""
                    }
            );
            for (i, b) in backends.iter().enumerate() {
                match b {
                    Some(b) => {
                        let _ = writeln!(
                            out,
                            "    slot {}: {}{}",
                            i + 1,
                            SocketAddr::new(b.addr, u16::from_be(b.port_be)),
                            if b.state == lb_common::BACKEND_HOST {
                                " (this node)"
                            } else {
                                ""
                            }
                        );
                    }
                    None => {
                        let _ = writeln!(out, "    slot {}: <missing>", i + 1);
                    }
                }
            }
        }
        for (svc_id, ranges) in &self.source_ranges {
            let shown: Vec<String> = ranges.iter().map(|(a, l)| format!("{a}/{l}")).collect();
            let _ = writeln!(
                out,
                "source ranges of svc_id={svc_id}: {}",
                shown.join(", ")
            );
        }
        let _ = writeln!(out, "node addresses: {:?}", self.node_addrs);
        let _ = writeln!(
            out,
            "XDP redirect targets (ifindex): {:?}",
            self.xdp_targets
        );
        let _ = writeln!(
            out,
            "conntrack entries: {} IPv4, {} IPv6",
            self.conntrack.len(),
            self.conntrack6.len()
        );
        let _ = writeln!(
            out,
            "affinity entries: {} IPv4, {} IPv6",
            self.affinity.len(),
            self.affinity6.len()
        );
        let _ = writeln!(out, "socket reverse entries: {}", self.sock_revnat);
        let _ = writeln!(out, "counters (packets / bytes, all CPUs):");
        for (i, c) in self.counters.iter().enumerate() {
            if c.packets > 0 {
                let _ = writeln!(
                    out,
                    "  {:<24} {:>10} {:>12}",
                    stats::NAMES[i],
                    c.packets,
                    c.bytes
                );
            }
        }
        let _ = writeln!(out, "socket program counters (calls, all CPUs):");
        for (i, n) in self.sock_counters.iter().enumerate() {
            if *n > 0 {
                let _ = writeln!(out, "  {:<24} {:>10}", sock::stats::NAMES[i], n);
            }
        }
        out
    }
}

/// The service entry's flags, as ` external snat=ADDR drop-when-empty` (empty when none).
fn flags(svc: &AnyService) -> String {
    let mut out = String::new();
    if svc.flags & lb_common::SVC_F_EXTERNAL != 0 {
        out.push_str(" external");
    }
    if svc.flags & lb_common::SVC_F_SNAT != 0 {
        let _ = write!(out, " snat={}", svc.snat_addr);
    }
    if svc.flags & lb_common::SVC_F_DROP_WHEN_EMPTY != 0 {
        out.push_str(" drop-when-empty");
    }
    out
}

fn proto_name(p: u8) -> &'static str {
    match p {
        lb_common::proto::TCP => "TCP",
        lb_common::proto::UDP => "UDP",
        lb_common::proto::SCTP => "SCTP",
        _ => "?",
    }
}

fn open(dir: &Path, name: &str) -> anyhow::Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open pinned map {}: {e}; is the agent running with --bpffs {}?",
            path.display(),
            dir.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

/// The names of one family's maps that `read` shows.
struct FamilyNames {
    services: &'static str,
    backends: &'static str,
    conntrack: &'static str,
    affinity: &'static str,
    source_ranges: &'static str,
    node_addrs: &'static str,
}

/// The datapath's per-CPU counters (`STATS`) pinned under `dir`, for [`sum_counters`].
pub type Counters = PerCpuArray<MapData, Counter>;
/// The socket programs' per-CPU counters (`SOCK_STATS`), for [`sum_sock_counters`].
pub type SockCounters = PerCpuArray<MapData, u64>;

/// Opens the pinned `STATS` map under `dir`.
pub fn open_counters(dir: &Path) -> anyhow::Result<Counters> {
    Ok(open(dir, names::STATS)?.try_into()?)
}

/// Opens the pinned `SOCK_STATS` map under `dir`.
pub fn open_sock_counters(dir: &Path) -> anyhow::Result<SockCounters> {
    Ok(open(dir, sock::names::SOCK_STATS)?.try_into()?)
}

/// Reads every pinned map under `dir`.
pub fn read(dir: &Path) -> anyhow::Result<Snapshot> {
    let counters = open_counters(dir)?;
    let sock_counters = open_sock_counters(dir)?;
    let sock_revnat: HashMap<_, sock::RevNatKey, sock::RevNatEntry> =
        open(dir, sock::names::SOCK_REVNAT)?.try_into()?;
    let sock_revnat6: HashMap<_, sock::RevNatKey<lb_common::V6>, sock::RevNatEntry<lb_common::V6>> =
        open(dir, sock::names::SOCK_REVNAT6)?.try_into()?;

    let mut snap = Snapshot::default();
    let v4 = FamilyNames {
        services: names::SERVICES,
        backends: names::BACKENDS,
        conntrack: names::CONNTRACK,
        affinity: names::AFFINITY,
        source_ranges: names::SOURCE_RANGES,
        node_addrs: names::NODE_ADDRS,
    };
    let (conntrack, affinity) = read_family::<V4>(dir, &v4, &mut snap)?;
    (snap.conntrack, snap.affinity) = (conntrack, affinity);
    let v6 = FamilyNames {
        services: names::SERVICES6,
        backends: names::BACKENDS6,
        conntrack: names::CONNTRACK6,
        affinity: names::AFFINITY6,
        source_ranges: names::SOURCE_RANGES6,
        node_addrs: names::NODE_ADDRS6,
    };
    let (conntrack, affinity) = read_family::<V6>(dir, &v6, &mut snap)?;
    (snap.conntrack6, snap.affinity6) = (conntrack, affinity);
    snap.counters = sum_counters(&counters)?;
    snap.sock_counters = sum_sock_counters(&sock_counters)?;
    snap.sock_revnat = sock_revnat.keys().count() + sock_revnat6.keys().count();
    let xdp_targets: HashMap<_, u32, u32> = open(dir, names::XDP_TARGETS)?.try_into()?;
    for key in xdp_targets.keys() {
        snap.xdp_targets.push(key?);
    }
    Ok(snap)
}

/// Connection-tracking and affinity entries of one family.
type FamilyFlows<A> = (Vec<(CtKey<A>, CtEntry<A>)>, Vec<(AffinityKey<A>, Affinity)>);

/// Adds one family's frontends (with their backends from the shared slots), source ranges
/// and node addresses to `snap`, and returns its flows.
fn read_family<A: Family>(
    dir: &Path,
    n: &FamilyNames,
    snap: &mut Snapshot,
) -> anyhow::Result<FamilyFlows<A>>
where
    FrontendKey<A>: Pod,
    Service<A>: Pod,
    Backend<A>: Pod,
    VipKey<A>: Pod,
    SourceRange<A>: Pod,
    CtKey<A>: Pod,
    CtEntry<A>: Pod,
    AffinityKey<A>: Pod,
{
    let services: HashMap<_, FrontendKey<A>, Service<A>> = open(dir, n.services)?.try_into()?;
    let slots: HashMap<_, SlotKey, Slot> = open(dir, names::BACKEND_SLOTS)?.try_into()?;
    let backends: HashMap<_, u32, Backend<A>> = open(dir, n.backends)?.try_into()?;
    for item in services.iter() {
        let (k, svc) = item?;
        let list = (1..=svc.backend_count as u32)
            .map(|slot| {
                let key = SlotKey {
                    svc_id: svc.svc_id,
                    slot,
                };
                let s = slots.get(&key, 0).ok()?;
                let b = backends.get(&s.backend_id, 0).ok()?;
                Some(family::any_backend(&b))
            })
            .collect();
        let entry = (family::any_service(&svc), list);
        snap.frontends.insert(family::any_frontend_key(&k), entry);
    }
    let ranges: aya::maps::LpmTrie<_, SourceRange<A>, u32> =
        open(dir, n.source_ranges)?.try_into()?;
    for key in ranges.keys() {
        let (svc_id, addr, len) = family::source_range(&key?);
        snap.source_ranges
            .entry(svc_id)
            .or_default()
            .push((addr, len));
    }
    let node_addrs: HashMap<_, VipKey<A>, lb_common::Vip> = open(dir, n.node_addrs)?.try_into()?;
    for key in node_addrs.keys() {
        snap.node_addrs.push(key?.addr.widen());
    }
    let conntrack: HashMap<_, CtKey<A>, CtEntry<A>> = open(dir, n.conntrack)?.try_into()?;
    let affinity: HashMap<_, AffinityKey<A>, Affinity> = open(dir, n.affinity)?.try_into()?;
    Ok((
        conntrack.iter().collect::<Result<_, _>>()?,
        affinity.iter().collect::<Result<_, _>>()?,
    ))
}

fn counters_sum(per_cpu: &aya::maps::PerCpuValues<u64>) -> u64 {
    per_cpu.iter().sum()
}

/// Every socket-program reason's count summed over CPUs, indexed by
/// `lb_common::sock::stats` reason.
pub fn sum_sock_counters<T: Borrow<MapData>>(
    counters: &PerCpuArray<T, u64>,
) -> Result<Vec<u64>, MapError> {
    (0..sock::stats::REASONS)
        .map(|reason| Ok(counters_sum(&counters.get(&reason, 0)?)))
        .collect()
}

/// Every reason's counter summed over CPUs, indexed by `lb_common::stats` reason.
pub fn sum_counters<T: Borrow<MapData>>(
    counters: &PerCpuArray<T, Counter>,
) -> Result<Vec<Counter>, MapError> {
    (0..stats::REASONS)
        .map(|reason| {
            let per_cpu = counters.get(&reason, 0)?;
            Ok(per_cpu.iter().fold(Counter::default(), |a, c| Counter {
                packets: a.packets + c.packets,
                bytes: a.bytes + c.bytes,
            }))
        })
        .collect()
}
