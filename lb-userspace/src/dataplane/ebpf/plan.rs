//! Pure planning for the eBPF maps: from what is programmed and what is desired, the ordered
//! map operations that get from one to the other.
//!
//! The order is what keeps a live service answering throughout an update (cilium's slot
//! model): backends are written before the memberships and slots that name them, slots before
//! the count that exposes them, frontends last; deletions run the other way round. A lookup
//! racing an update therefore sees either the old or the new backend set, never a hole.
//!
//! Both address families are planned together: a service port is programmed as one unit
//! (one service id) per family and scope, and the maps of ids only (`BACKEND_SLOTS`,
//! `MEMBERS`, `MAGLEV`) are shared, so ids are allocated from one sequence for both and the
//! ordering holds across families. Ops carry the map types with an `IpAddr` where the maps
//! hold an address (`AnyFrontendKey` and so on): the address says which family's map the
//! entry goes to, and the dataplane narrows it to that map's bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use lb_common::{
    maglev, Backend, FrontendKey, Member, MemberKey, Service, Slot, SlotKey, Vip, VipKey,
    ALG_MAGLEV, ALG_RANDOM, BACKEND_ACTIVE, BACKEND_HOST, SCOPE_ALL, SCOPE_HOST,
    SVC_F_DROP_WHEN_EMPTY, SVC_F_EXTERNAL, SVC_F_SNAT, SVC_F_SOURCE_RANGES,
};
use log::warn;

use crate::model::{
    Algorithm, DesiredState, Endpoint, External, Frontend, IpFamily, Protocol, ServicePort,
    ServicePortName,
};

/// A `SERVICES` or `SERVICES6` key: the family is its address's.
pub type AnyFrontendKey = FrontendKey<IpAddr>;
/// A `SERVICES` or `SERVICES6` value; `snat_addr` is of its key's family.
pub type AnyService = Service<IpAddr>;
/// A `BACKENDS` or `BACKENDS6` value.
pub type AnyBackend = Backend<IpAddr>;
/// A `VIPS`/`VIPS6` or `NODE_ADDRS`/`NODE_ADDRS6` key.
pub type AnyVipKey = VipKey<IpAddr>;

/// One map operation, in the order they must be executed. Where a map exists per family, the
/// address in the op (or the `IpFamily`, for a backend deleted by id) names the map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, AnyBackend),
    PutMember(MemberKey, Member),
    /// A new Maglev table for the service: every entry, in index order.
    PutMaglev(u32, Vec<u32>),
    /// Changed entries (index, backend id) of the service's existing Maglev table.
    PatchMaglev(u32, Vec<(u32, u32)>),
    /// A loadBalancerSourceRanges entry (service id, range start, prefix length).
    PutSourceRange(u32, IpAddr, u8),
    PutSlot(SlotKey, Slot),
    PutService(AnyFrontendKey, AnyService),
    PutVip(AnyVipKey, Vip),
    DeleteVip(AnyVipKey),
    /// A node address, for egress to know (see `BACKEND_HOST`).
    PutNodeAddr(AnyVipKey, Vip),
    DeleteNodeAddr(AnyVipKey),
    DeleteService(AnyFrontendKey),
    DeleteSlot(SlotKey),
    DeleteMaglev(u32),
    DeleteSourceRange(u32, IpAddr, u8),
    DeleteMember(MemberKey),
    DeleteBackend(IpFamily, u32),
}

impl Op {
    /// The family whose map the op is on, or `None` for the maps both share (slots,
    /// memberships, Maglev tables).
    pub fn family(&self) -> Option<IpFamily> {
        match self {
            Op::PutBackend(_, b) => Some(IpFamily::of(b.addr)),
            Op::DeleteBackend(family, _) => Some(*family),
            Op::PutSourceRange(_, addr, _) | Op::DeleteSourceRange(_, addr, _) => {
                Some(IpFamily::of(*addr))
            }
            Op::PutService(k, _) | Op::DeleteService(k) => Some(IpFamily::of(k.addr)),
            Op::PutVip(k, _) | Op::DeleteVip(k) | Op::PutNodeAddr(k, _) | Op::DeleteNodeAddr(k) => {
                Some(IpFamily::of(k.addr))
            }
            Op::PutMember(..)
            | Op::DeleteMember(_)
            | Op::PutSlot(..)
            | Op::DeleteSlot(_)
            | Op::PutMaglev(..)
            | Op::PatchMaglev(..)
            | Op::DeleteMaglev(_) => None,
        }
    }

    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::DeleteVip(_)
                | Op::DeleteNodeAddr(_)
                | Op::DeleteService(_)
                | Op::DeleteSlot(_)
                | Op::DeleteMaglev(_)
                | Op::DeleteSourceRange(..)
                | Op::DeleteMember(_)
                | Op::DeleteBackend(..)
        )
    }
}

/// Which endpoints serve a set of a service port's frontends: one backend set (one service
/// id) each. A port has a cluster set, and a local one when a traffic policy is Local.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `ServicePort::endpoints`: frontends under policy Cluster, and the node's own
    /// connections to external frontends under externalTrafficPolicy Local.
    Cluster,
    /// `ServicePort::local_endpoints`: ClusterIPs under internalTrafficPolicy Local, external
    /// frontends under externalTrafficPolicy Local.
    Local,
}

/// What one service id is programmed from: one scope of one service port in one family.
struct Unit<'a> {
    name: &'a ServicePortName,
    scope: Scope,
    family: IpFamily,
    port: &'a ServicePort,
    /// Frontends with the `SVC_F_*` flags and SNAT address of their service entries.
    frontends: Vec<(AnyFrontendKey, u8, IpAddr)>,
    /// The endpoints of the unit's family (never the other's: a packet cannot change family).
    endpoints: BTreeSet<Endpoint>,
    /// With no endpoints, drop rather than reject (`SVC_F_DROP_WHEN_EMPTY`).
    drop_when_empty: bool,
    /// The clients frontends with `SVC_F_SOURCE_RANGES` accept.
    source_ranges: BTreeSet<(IpAddr, u8)>,
}

/// The units a desired state is programmed as.
fn units(desired: &DesiredState) -> Vec<Unit<'_>> {
    let mut units = Vec::new();
    for (name, port) in &desired.services {
        for family in [IpFamily::V4, IpFamily::V6] {
            units.extend(family_units(name, port, family));
        }
    }
    units
}

/// The units of `port` in `family`: its frontends, endpoints and source ranges of that family.
/// Each frontend goes to the unit its traffic policy names; a Local unit may hold ClusterIPs
/// and external frontends both, when both policies are Local.
fn family_units<'a>(
    name: &'a ServicePortName,
    port: &'a ServicePort,
    family: IpFamily,
) -> Vec<Unit<'a>> {
    let of_family = |addr: &IpAddr| IpFamily::of(*addr) == family;
    let endpoints_of = |set: &BTreeSet<Endpoint>| -> BTreeSet<Endpoint> {
        set.iter().filter(|e| of_family(&e.addr)).copied().collect()
    };
    // kube-proxy's proxier of each family sees only the ranges of its family: with none, the
    // family's LoadBalancer frontends accept every client.
    let family_ranges: BTreeSet<(IpAddr, u8)> = (port.source_ranges.iter())
        .filter(|r| of_family(&r.0))
        .copied()
        .collect();
    let unspecified = unspecified(family);
    let restricted = |e: &External| e.load_balancer && !family_ranges.is_empty();
    let ranges_of = |frontends: &[(AnyFrontendKey, u8, IpAddr)]| {
        let any = frontends.iter().any(|f| f.1 & SVC_F_SOURCE_RANGES != 0);
        if any {
            family_ranges.clone()
        } else {
            BTreeSet::new()
        }
    };
    let flags = |e: &External, base: u8| {
        base | if restricted(e) {
            SVC_F_SOURCE_RANGES
        } else {
            0
        }
    };

    let mut cluster = Vec::new();
    let mut local = Vec::new();
    let cluster_ips = (port.frontends.iter())
        .filter(|fe| of_family(&fe.addr))
        .map(|fe| (frontend_key(fe), 0, unspecified));
    if port.internal_local {
        local.extend(cluster_ips);
    } else {
        cluster.extend(cluster_ips);
    }
    let external = (port.external_frontends.iter()).filter(|(fe, _)| of_family(&fe.addr));
    if port.external_local {
        for (fe, e) in external {
            let key = frontend_key(fe);
            local.push((key, flags(e, SVC_F_EXTERNAL), unspecified));
            // The node's own connections to these frontends use every endpoint, as
            // kube-proxy sends them (the socket programs look `SCOPE_HOST` up first).
            let host = FrontendKey {
                scope: SCOPE_HOST,
                ..key
            };
            cluster.push((host, SVC_F_EXTERNAL, unspecified));
        }
    } else {
        cluster.extend(external.map(|(fe, e)| {
            let f = flags(e, SVC_F_EXTERNAL | SVC_F_SNAT);
            // The model gives a SNAT address of the frontend's family; anything else would
            // be a bug there, and the unspecified address makes the datapath's FIB lookup fail
            // rather than send a packet of one family with the other's address.
            let snat = Some(e.snat_addr).filter(of_family).unwrap_or(unspecified);
            (frontend_key(fe), f, snat)
        }));
    }

    // The model's cluster set is empty exactly when the service has no usable endpoint of
    // this family anywhere (kube-proxy's `hasAnyEndpoints`), which is when kube-proxy rejects.
    let endpoints = endpoints_of(&port.endpoints);
    let mut units = Vec::new();
    if !local.is_empty() {
        units.push(Unit {
            name,
            scope: Scope::Local,
            family,
            port,
            endpoints: endpoints_of(&port.local_endpoints),
            // Endpoints elsewhere but none here: kube-proxy drops rather than rejects, for
            // ClusterIPs and external frontends alike (pkg/proxy/iptables/proxier.go, "has no
            // local endpoints").
            drop_when_empty: !endpoints.is_empty(),
            source_ranges: ranges_of(&local),
            frontends: local,
        });
    }
    if !cluster.is_empty() {
        units.push(Unit {
            name,
            scope: Scope::Cluster,
            family,
            port,
            source_ranges: ranges_of(&cluster),
            frontends: cluster,
            endpoints,
            drop_when_empty: false,
        });
    }
    units
}

/// The all-zero address of `family`: the SNAT address of entries that do not source-NAT.
fn unspecified(family: IpFamily) -> IpAddr {
    match family {
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// A unit as programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedPort {
    svc_id: u32,
    /// Each frontend with its service entry as written.
    frontends: BTreeMap<AnyFrontendKey, AnyService>,
    /// Backend ids in slot order: `slots[i]` is slot `i + 1`.
    slots: Vec<u32>,
    affinity_timeout_s: u32,
    /// `ALG_*` as written to the service entry.
    algorithm: u8,
    /// The Maglev table written for it, if it uses Maglev (empty when adopted: the contents
    /// are not read back, so the first plan replaces the table whole).
    maglev: Option<Vec<u32>>,
    /// Its loadBalancerSourceRanges entries.
    source_ranges: BTreeSet<(IpAddr, u8)>,
}

/// What the pinned maps of both families hold, read back when the agent starts or resyncs.
#[derive(Clone, Debug, Default)]
pub struct Pinned {
    pub services: Vec<(AnyFrontendKey, AnyService)>,
    pub slots: Vec<(SlotKey, Slot)>,
    pub members: Vec<MemberKey>,
    pub maglev: Vec<u32>,
    pub backends: Vec<(u32, AnyBackend)>,
    pub vips: Vec<(AnyVipKey, Vip)>,
    pub node_addr_entries: Vec<(AnyVipKey, Vip)>,
    /// loadBalancerSourceRanges entries: (service id, range start, prefix length).
    pub source_ranges: Vec<(u32, IpAddr, u8)>,
}

/// Pinned keys no adopted service port accounts for (what an apply that failed half way
/// leaves behind). The first plan deletes them after writing the new state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Leftovers {
    slots: BTreeSet<SlotKey>,
    members: BTreeSet<MemberKey>,
    maglev: BTreeSet<u32>,
    backends: BTreeSet<(IpFamily, u32)>,
    source_ranges: BTreeSet<(u32, IpAddr, u8)>,
}

/// What the maps hold, as far as the agent knows.
#[derive(Clone, Debug, Default)]
pub struct Programmed {
    ports: BTreeMap<(ServicePortName, Scope, IpFamily), ProgrammedPort>,
    /// Backend -> (id, number of service ports using it).
    backends: BTreeMap<AnyBackend, (u32, u32)>,
    vips: BTreeMap<AnyVipKey, u32>,
    node_addr_entries: BTreeMap<AnyVipKey, u32>,
    next_svc_id: u32,
    next_backend_id: u32,
    /// Service ports found pinned, by service id. A desired port that one of them serves a
    /// frontend of takes it over (its id, slots and memberships, and so the clients' affinity
    /// entries), so a restart writes only what changed.
    adopted: BTreeMap<u32, ProgrammedPort>,
    adopted_frontends: BTreeMap<AnyFrontendKey, u32>,
    leftovers: Leftovers,
}

/// A plan: the operations plus the state they lead to.
pub struct Plan {
    pub ops: Vec<Op>,
    pub next: Programmed,
}

impl Programmed {
    /// Starts from what the maps already hold (a restart, or a resync after a failed apply).
    /// New ids are allocated above every id found, so nothing new collides with an entry that
    /// is still serving traffic.
    pub fn adopt(pinned: Pinned) -> Self {
        let mut p = Programmed::default();
        let mut counts: BTreeMap<u32, u16> = BTreeMap::new();
        for (key, svc) in &pinned.services {
            let port = p
                .adopted
                .entry(svc.svc_id)
                .or_insert_with(|| ProgrammedPort {
                    svc_id: svc.svc_id,
                    frontends: BTreeMap::new(),
                    slots: Vec::new(),
                    affinity_timeout_s: svc.affinity_timeout_s,
                    algorithm: svc.algorithm,
                    maglev: None,
                    source_ranges: BTreeSet::new(),
                });
            port.frontends.insert(*key, *svc);
            p.adopted_frontends.insert(*key, svc.svc_id);
            let count = counts.entry(svc.svc_id).or_default();
            *count = (*count).max(svc.backend_count);
        }
        let slots: BTreeMap<SlotKey, u32> = pinned
            .slots
            .iter()
            .map(|(k, s)| (*k, s.backend_id))
            .collect();
        let tables: BTreeSet<u32> = pinned.maglev.iter().copied().collect();
        for (id, port) in &mut p.adopted {
            // A missing slot reads as backend 0, which no backend has: the plan rewrites it.
            port.slots = (1..=counts[id] as u32)
                .map(|slot| {
                    slots
                        .get(&SlotKey { svc_id: *id, slot })
                        .copied()
                        .unwrap_or(0)
                })
                .collect();
            if port.algorithm == ALG_MAGLEV && tables.contains(id) {
                port.maglev = Some(Vec::new());
            }
        }
        let accounted = |k: &SlotKey| {
            p.adopted
                .get(&k.svc_id)
                .is_some_and(|a| k.slot as usize <= a.slots.len())
        };
        p.leftovers.slots = slots.keys().filter(|k| !accounted(k)).copied().collect();
        p.leftovers.members = pinned
            .members
            .iter()
            .filter(|m| {
                !p.adopted
                    .get(&m.svc_id)
                    .is_some_and(|a| a.slots.contains(&m.backend_id))
            })
            .copied()
            .collect();
        for &(svc_id, addr, len) in &pinned.source_ranges {
            match p.adopted.get_mut(&svc_id) {
                Some(port) => drop(port.source_ranges.insert((addr, len))),
                None => drop(p.leftovers.source_ranges.insert((svc_id, addr, len))),
            }
        }
        p.leftovers.maglev = tables
            .iter()
            .filter(|id| p.adopted.get(id).is_none_or(|a| a.maglev.is_none()))
            .copied()
            .collect();
        let mut backend_ids = BTreeSet::new();
        for (id, backend) in &pinned.backends {
            // The same endpoint twice (a failed apply can leave that): keep one id. One id in
            // both families' maps (never written by this agent) would make slots ambiguous:
            // keep the first.
            if p.backends.contains_key(backend) || !backend_ids.insert(*id) {
                let family = IpFamily::of(backend.addr);
                p.leftovers.backends.insert((family, *id));
            } else {
                p.backends.insert(*backend, (*id, 0));
            }
        }
        p.vips = pinned.vips.iter().map(|(k, v)| (*k, v.frontends)).collect();
        p.node_addr_entries = (pinned.node_addr_entries.iter())
            .map(|(k, v)| (*k, v.frontends))
            .collect();
        let svc_ids = pinned
            .services
            .iter()
            .map(|(_, s)| s.svc_id)
            .chain(slots.keys().map(|k| k.svc_id))
            .chain(pinned.members.iter().map(|m| m.svc_id))
            .chain(pinned.source_ranges.iter().map(|r| r.0))
            .chain(tables.iter().copied());
        p.next_svc_id = svc_ids.max().unwrap_or(0);
        let backend_ids = pinned
            .backends
            .iter()
            .map(|(id, _)| *id)
            .chain(slots.values().copied())
            .chain(pinned.members.iter().map(|m| m.backend_id));
        p.next_backend_id = backend_ids.max().unwrap_or(0);
        p
    }

    pub fn service_ports(&self) -> usize {
        self.ports.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The operations that turn `self` into `desired`; service ports that name no algorithm
    /// get `default_algorithm`.
    pub fn plan(&self, desired: &DesiredState, default_algorithm: Algorithm) -> Plan {
        let mut next = Programmed {
            next_svc_id: self.next_svc_id,
            next_backend_id: self.next_backend_id,
            ..Default::default()
        };
        let mut puts_backend = Vec::new();
        let mut puts_member = Vec::new();
        let mut puts_maglev = Vec::new();
        let mut puts_slot = Vec::new();
        let mut puts_service = Vec::new();
        let mut deletes_slot = Vec::new();
        let mut deletes_member = Vec::new();
        let mut deletes_maglev = Vec::new();
        let mut puts_range = Vec::new();
        let mut deletes_range = Vec::new();
        let mut claimed: BTreeMap<AnyFrontendKey, &ServicePortName> = BTreeMap::new();
        let mut taken_over: BTreeSet<u32> = BTreeSet::new();
        let mut warned_sctp = BTreeSet::new();

        for unit in units(desired) {
            let (name, port) = (unit.name, unit.port);
            if name.protocol == Protocol::Sctp {
                // Once per port, whichever of its units comes first.
                if warned_sctp.insert(name) {
                    warn!(
                        "{name}: SCTP services are not handled by the eBPF datapath yet; skipped"
                    );
                }
                continue;
            }
            let unit_key = (name.clone(), unit.scope, unit.family);
            // The unit as programmed: by name, or else the pinned unit serving its frontend.
            let old = match self.ports.get(&unit_key) {
                Some(o) => Some(o),
                None => unit
                    .frontends
                    .iter()
                    .find_map(|(key, _, _)| self.adopted_frontends.get(key))
                    .filter(|id| !taken_over.contains(*id))
                    .map(|id| {
                        taken_over.insert(*id);
                        &self.adopted[id]
                    }),
            };
            let svc_id = match old {
                Some(o) => o.svc_id,
                None => {
                    next.next_svc_id += 1;
                    next.next_svc_id
                }
            };

            let mut slots = Vec::with_capacity(unit.endpoints.len());
            let mut slot_backends = Vec::with_capacity(unit.endpoints.len());
            for ep in &unit.endpoints {
                let backend = Backend {
                    addr: ep.addr,
                    port_be: ep.port.to_be(),
                    proto: name.protocol.number(),
                    state: if desired.node_addrs.contains(&ep.addr) {
                        BACKEND_HOST
                    } else {
                        BACKEND_ACTIVE
                    },
                };
                let id = match next.backends.get_mut(&backend) {
                    Some((id, refs)) => {
                        *refs += 1;
                        *id
                    }
                    None => {
                        let id = match self.backends.get(&backend) {
                            Some((id, _)) => *id,
                            None => {
                                next.next_backend_id += 1;
                                puts_backend.push(Op::PutBackend(next.next_backend_id, backend));
                                next.next_backend_id
                            }
                        };
                        next.backends.insert(backend, (id, 1));
                        id
                    }
                };
                slots.push(id);
                slot_backends.push(backend);
            }
            if slots.len() > u16::MAX as usize {
                warn!(
                    "{name}: {} endpoints, only the first 65535 are used",
                    slots.len()
                );
                slots.truncate(u16::MAX as usize);
                slot_backends.truncate(u16::MAX as usize);
            }

            // A Maglev table is written (or patched) before the service entry that uses it,
            // and deleted after the entry stopped using it.
            let old_table = old.and_then(|o| o.maglev.as_ref());
            let table = match port.algorithm.unwrap_or(default_algorithm) {
                Algorithm::Maglev if !slots.is_empty() => {
                    Some(maglev_table(&slot_backends, &slots))
                }
                _ => None,
            };
            match (old_table, &table) {
                // New, or adopted with contents unknown: a whole table, swapped in atomically.
                (None, Some(t)) => puts_maglev.push(Op::PutMaglev(svc_id, t.clone())),
                (Some(o), Some(t)) if o.len() != t.len() => {
                    puts_maglev.push(Op::PutMaglev(svc_id, t.clone()))
                }
                (Some(o), Some(t)) if o != t => {
                    let changed = (0u32..).zip(t).zip(o).filter(|((_, n), o)| n != o);
                    let entries = changed.map(|((i, n), _)| (i, *n)).collect();
                    puts_maglev.push(Op::PatchMaglev(svc_id, entries));
                }
                (Some(_), None) => deletes_maglev.push(Op::DeleteMaglev(svc_id)),
                _ => {}
            }
            let algorithm = if table.is_some() {
                ALG_MAGLEV
            } else {
                ALG_RANDOM
            };

            // Only slots whose backend changed are written; slots past the new count go.
            let old_slots = old.map(|o| o.slots.as_slice()).unwrap_or(&[]);
            for (i, id) in slots.iter().enumerate() {
                if old_slots.get(i) != Some(id) {
                    puts_slot.push(Op::PutSlot(slot_key(svc_id, i), Slot { backend_id: *id }));
                }
            }
            for i in slots.len()..old_slots.len() {
                deletes_slot.push(Op::DeleteSlot(slot_key(svc_id, i)));
            }
            let (new_ids, old_ids): (BTreeSet<u32>, BTreeSet<u32>) = (
                slots.iter().copied().collect(),
                old_slots.iter().copied().collect(),
            );
            for id in new_ids.difference(&old_ids) {
                puts_member.push(Op::PutMember(member_key(svc_id, *id), active_member()));
            }
            for id in old_ids.difference(&new_ids) {
                deletes_member.push(Op::DeleteMember(member_key(svc_id, *id)));
            }

            // Ranges are in place before a frontend that checks them, and go after.
            let old_ranges = old.map(|o| &o.source_ranges);
            for &(addr, len) in &unit.source_ranges {
                if !old_ranges.is_some_and(|r| r.contains(&(addr, len))) {
                    puts_range.push(Op::PutSourceRange(svc_id, addr, len));
                }
            }
            for &(addr, len) in old_ranges.into_iter().flatten() {
                if !unit.source_ranges.contains(&(addr, len)) {
                    deletes_range.push(Op::DeleteSourceRange(svc_id, addr, len));
                }
            }

            let affinity_timeout_s = port.affinity_timeout_s.unwrap_or(0);
            let mut frontends = BTreeMap::new();
            for (key, mut flags, snat_addr) in unit.frontends {
                if let Some(owner) = claimed.get(&key) {
                    warn!(
                        "{name}: frontend {} is already served by {owner}; ignored here",
                        SocketAddr::new(key.addr, u16::from_be(key.port_be))
                    );
                    continue;
                }
                claimed.insert(key, name);
                if unit.drop_when_empty {
                    flags |= SVC_F_DROP_WHEN_EMPTY;
                }
                let value = Service {
                    svc_id,
                    backend_count: slots.len() as u16,
                    flags,
                    algorithm,
                    affinity_timeout_s,
                    snat_addr,
                };
                if old.and_then(|o| o.frontends.get(&key)) != Some(&value) {
                    puts_service.push(Op::PutService(key, value));
                }
                // Not the node's own addresses: packets to a VIP that cannot be translated are
                // dropped, which for a node address would drop the host's own fragments and
                // other protocols too.
                if key.scope == SCOPE_ALL && !desired.node_addrs.contains(&key.addr) {
                    *next.vips.entry(VipKey { addr: key.addr }).or_default() += 1;
                }
                frontends.insert(key, value);
            }
            next.ports.insert(
                unit_key,
                ProgrammedPort {
                    svc_id,
                    frontends,
                    slots,
                    affinity_timeout_s,
                    algorithm,
                    maglev: table,
                    source_ranges: unit.source_ranges,
                },
            );
        }

        // Every node address, whether or not it is a backend now: a hostNetwork endpoint that
        // left its services still has open connections whose replies egress must translate.
        // Written before any backend, deleted after.
        for &addr in &desired.node_addrs {
            next.node_addr_entries.insert(VipKey { addr }, 1);
        }
        let mut ops = Vec::new();
        for (key, &frontends) in &next.node_addr_entries {
            if self.node_addr_entries.get(key) != Some(&frontends) {
                ops.push(Op::PutNodeAddr(*key, Vip { frontends }));
            }
        }
        ops.extend(puts_backend);
        ops.extend(puts_member);
        ops.extend(puts_maglev);
        ops.extend(puts_range);
        ops.extend(puts_slot);
        ops.extend(puts_service);
        for (vip, &frontends) in &next.vips {
            if self.vips.get(vip) != Some(&frontends) {
                ops.push(Op::PutVip(*vip, Vip { frontends }));
            }
        }

        // Deletions, the reverse way round.
        for vip in self.vips.keys() {
            if !next.vips.contains_key(vip) {
                ops.push(Op::DeleteVip(*vip));
            }
        }
        let live_frontends: BTreeSet<&AnyFrontendKey> = claimed.keys().collect();
        let programmed = self.ports.values().chain(self.adopted.values());
        for key in programmed.flat_map(|p| p.frontends.keys()) {
            if !live_frontends.contains(key) {
                ops.push(Op::DeleteService(*key));
            }
        }
        // Ports no desired port kept: removed by name, or adopted and not taken over.
        let removed: Vec<&ProgrammedPort> = self
            .ports
            .iter()
            .filter(|(key, _)| !next.ports.contains_key(*key))
            .map(|(_, p)| p)
            .chain(
                self.adopted
                    .iter()
                    .filter(|(id, _)| !taken_over.contains(*id))
                    .map(|(_, p)| p),
            )
            .collect();
        ops.extend(deletes_slot);
        for old in &removed {
            for i in 0..old.slots.len() {
                ops.push(Op::DeleteSlot(slot_key(old.svc_id, i)));
            }
        }
        ops.extend(self.leftovers.slots.iter().map(|k| Op::DeleteSlot(*k)));
        ops.extend(deletes_maglev);
        for old in removed.iter().filter(|p| p.maglev.is_some()) {
            ops.push(Op::DeleteMaglev(old.svc_id));
        }
        ops.extend(self.leftovers.maglev.iter().map(|id| Op::DeleteMaglev(*id)));
        ops.extend(deletes_range);
        for old in &removed {
            for &(addr, len) in &old.source_ranges {
                ops.push(Op::DeleteSourceRange(old.svc_id, addr, len));
            }
        }
        ops.extend(
            self.leftovers
                .source_ranges
                .iter()
                .map(|&(id, addr, len)| Op::DeleteSourceRange(id, addr, len)),
        );
        ops.extend(deletes_member);
        for old in &removed {
            let ids: BTreeSet<u32> = old.slots.iter().copied().collect();
            for id in ids {
                ops.push(Op::DeleteMember(member_key(old.svc_id, id)));
            }
        }
        ops.extend(self.leftovers.members.iter().map(|k| Op::DeleteMember(*k)));
        for (backend, (id, _)) in &self.backends {
            if !next.backends.contains_key(backend) {
                ops.push(Op::DeleteBackend(IpFamily::of(backend.addr), *id));
            }
        }
        ops.extend(
            self.leftovers
                .backends
                .iter()
                .map(|&(family, id)| Op::DeleteBackend(family, id)),
        );
        for key in self.node_addr_entries.keys() {
            if !next.node_addr_entries.contains_key(key) {
                ops.push(Op::DeleteNodeAddr(*key));
            }
        }
        Plan { ops, next }
    }
}

/// The Maglev table over `backends` (whose ids are `ids`), as every node computes it: the
/// permutations come from what identifies a backend cluster-wide (address, port, protocol),
/// taken in address order.
fn maglev_table(backends: &[AnyBackend], ids: &[u32]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| {
        let b = &backends[i];
        (b.addr, u16::from_be(b.port_be), b.proto)
    });
    let perms: Vec<maglev::Permutation> = order
        .iter()
        .map(|&i| {
            let b = &backends[i];
            // Address bytes (4 or 16), port, protocol: for IPv4 the 7 bytes it always was.
            let mut name = match b.addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            name.extend_from_slice(&u16::from_be(b.port_be).to_be_bytes());
            name.push(b.proto);
            maglev::Permutation::of(&name)
        })
        .collect();
    let ordered_ids: Vec<u32> = order.iter().map(|&i| ids[i]).collect();
    let mut table = vec![0; maglev::TABLE_SIZE as usize];
    let mut next = vec![0; perms.len()];
    maglev::populate(&perms, &ordered_ids, &mut table, &mut next);
    table
}

fn frontend_key(fe: &Frontend) -> AnyFrontendKey {
    FrontendKey {
        addr: fe.addr,
        port_be: fe.port.to_be(),
        proto: fe.protocol.number(),
        scope: SCOPE_ALL,
    }
}

fn member_key(svc_id: u32, backend_id: u32) -> MemberKey {
    MemberKey { svc_id, backend_id }
}

fn active_member() -> Member {
    Member {
        state: BACKEND_ACTIVE,
        _pad: [0; 3],
    }
}

fn slot_key(svc_id: u32, index: usize) -> SlotKey {
    SlotKey {
        svc_id,
        slot: index as u32 + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Frontend, ServicePort};

    /// The service maps of both families, simulated: a per-family map is one map here, keyed
    /// by addresses of both families (backends by id: ids must not collide across families).
    #[derive(Default, Debug)]
    struct Maps {
        services: BTreeMap<AnyFrontendKey, AnyService>,
        slots: BTreeMap<SlotKey, Slot>,
        members: BTreeMap<MemberKey, Member>,
        maglev: BTreeMap<u32, Vec<u32>>,
        backends: BTreeMap<u32, AnyBackend>,
        vips: BTreeMap<AnyVipKey, Vip>,
        node_addr_entries: BTreeMap<AnyVipKey, Vip>,
        source_ranges: BTreeSet<(u32, IpAddr, u8)>,
    }

    impl Maps {
        fn apply(&mut self, op: &Op) {
            match op.clone() {
                Op::PutBackend(id, b) => {
                    if let Some(old) = self.backends.insert(id, b) {
                        let (was, is) = (IpFamily::of(old.addr), IpFamily::of(b.addr));
                        assert_eq!(was, is, "backend id {id} used in both families");
                    }
                }
                Op::PutMember(k, v) => drop(self.members.insert(k, v)),
                Op::PutMaglev(id, table) => drop(self.maglev.insert(id, table)),
                Op::PatchMaglev(id, entries) => {
                    let table = self.maglev.get_mut(&id).expect("patching a missing table");
                    for (i, backend) in entries {
                        table[i as usize] = backend;
                    }
                }
                Op::DeleteMaglev(id) => drop(self.maglev.remove(&id)),
                Op::PutSourceRange(id, a, l) => drop(self.source_ranges.insert((id, a, l))),
                Op::DeleteSourceRange(id, a, l) => drop(self.source_ranges.remove(&(id, a, l))),
                Op::PutSlot(k, v) => drop(self.slots.insert(k, v)),
                Op::PutService(k, v) => {
                    let (key, snat) = (IpFamily::of(k.addr), IpFamily::of(v.snat_addr));
                    assert_eq!(key, snat, "{op:?}: SNAT address of the other family");
                    self.services.insert(k, v);
                }
                Op::PutVip(k, v) => drop(self.vips.insert(k, v)),
                Op::DeleteVip(k) => drop(self.vips.remove(&k)),
                Op::PutNodeAddr(k, v) => drop(self.node_addr_entries.insert(k, v)),
                Op::DeleteNodeAddr(k) => drop(self.node_addr_entries.remove(&k)),
                Op::DeleteService(k) => drop(self.services.remove(&k)),
                Op::DeleteSlot(k) => drop(self.slots.remove(&k)),
                Op::DeleteMember(k) => drop(self.members.remove(&k)),
                Op::DeleteBackend(family, id) => {
                    if let Some(b) = self.backends.remove(&id) {
                        assert_eq!(IpFamily::of(b.addr), family, "{op:?} names the wrong map");
                    }
                }
            }
        }

        /// What the datapath would see: every frontend resolves every slot, and every entry of
        /// its Maglev table if it uses one, to a backend of the service.
        fn assert_no_holes(&self, after: &Op) {
            for (fe, svc) in &self.services {
                if svc.algorithm == ALG_MAGLEV {
                    let table = self.maglev.get(&svc.svc_id);
                    let table =
                        table.unwrap_or_else(|| panic!("after {after:?}: {fe:?} has no table"));
                    for id in table {
                        let member = MemberKey {
                            svc_id: svc.svc_id,
                            backend_id: *id,
                        };
                        assert!(
                            self.members.contains_key(&member),
                            "after {after:?}: table names non-member {id}"
                        );
                        assert!(
                            self.backends.contains_key(id),
                            "after {after:?}: table names missing backend {id}"
                        );
                    }
                }
                for slot in 1..=svc.backend_count as u32 {
                    let s = self.slots.get(&SlotKey {
                        svc_id: svc.svc_id,
                        slot,
                    });
                    let s =
                        s.unwrap_or_else(|| panic!("after {after:?}: {fe:?} slot {slot} missing"));
                    assert!(
                        self.members.contains_key(&MemberKey {
                            svc_id: svc.svc_id,
                            backend_id: s.backend_id
                        }),
                        "after {after:?}: {fe:?} slot {slot} names non-member {}",
                        s.backend_id
                    );
                    assert!(
                        self.backends.contains_key(&s.backend_id),
                        "after {after:?}: {fe:?} slot {slot} names missing backend {}",
                        s.backend_id
                    );
                }
            }
        }

        /// The end state equals `desired` exactly, with nothing left over.
        fn assert_serves(&self, desired: &DesiredState) {
            let mut want_frontends = 0;
            for (name, port) in &desired.services {
                // Each kind of frontend uses the set its traffic policy names.
                let policy = |local: bool| {
                    if local {
                        (&port.local_endpoints, true)
                    } else {
                        (&port.endpoints, false)
                    }
                };
                let cluster =
                    (port.frontends.iter()).map(|fe| (fe, SCOPE_ALL, policy(port.internal_local)));
                let external = (port.external_frontends.keys())
                    .map(|fe| (fe, SCOPE_ALL, policy(port.external_local)));
                // Under policy Local, the node's own connections use every endpoint.
                let host = (port.external_frontends.keys())
                    .filter(|_| port.external_local)
                    .map(|fe| (fe, SCOPE_HOST, policy(false)));
                for (fe, scope, (endpoints, local)) in cluster.chain(external).chain(host) {
                    want_frontends += 1;
                    // Only the endpoints of the frontend's family.
                    let of_family = |set: &BTreeSet<Endpoint>| -> BTreeSet<Endpoint> {
                        (set.iter())
                            .filter(|e| e.family() == fe.family())
                            .copied()
                            .collect()
                    };
                    let endpoints = of_family(endpoints);
                    let key = FrontendKey {
                        addr: fe.addr,
                        port_be: fe.port.to_be(),
                        proto: fe.protocol.number(),
                        scope,
                    };
                    let svc = self
                        .services
                        .get(&key)
                        .unwrap_or_else(|| panic!("{name}: no frontend"));
                    let got: BTreeSet<Endpoint> = (1..=svc.backend_count as u32)
                        .map(|slot| {
                            let s = self.slots[&SlotKey {
                                svc_id: svc.svc_id,
                                slot,
                            }];
                            let b = self.backends[&s.backend_id];
                            Endpoint {
                                addr: b.addr,
                                port: u16::from_be(b.port_be),
                            }
                        })
                        .collect();
                    assert_eq!(got, endpoints, "{name} {fe}");
                    // Empty under policy Local: drop while the family has endpoints
                    // elsewhere, reject when it has none at all.
                    let drop = local && !of_family(&port.endpoints).is_empty();
                    let flagged = svc.flags & SVC_F_DROP_WHEN_EMPTY != 0;
                    assert_eq!(flagged, drop, "{name} {fe} scope {scope}: drop when empty");
                }
            }
            assert_eq!(self.services.len(), want_frontends, "stale frontends left");
            let node_addrs = &desired.node_addrs;
            assert_eq!(
                self.node_addr_entries
                    .keys()
                    .map(|k| k.addr)
                    .collect::<BTreeSet<_>>(),
                *node_addrs,
                "node addresses"
            );
            for b in self.backends.values() {
                let host = node_addrs.contains(&b.addr);
                assert_eq!(b.state == BACKEND_HOST, host, "backend {:?} state", b.addr);
            }
            // Exactly the ranges (of their family) of the services whose LoadBalancer
            // frontends check them.
            let mut want_ranges = BTreeSet::new();
            for (key, svc) in &self.services {
                if svc.flags & SVC_F_SOURCE_RANGES != 0 {
                    let port = desired.services.values().find(|p| {
                        let frontends = p.frontends.iter().chain(p.external_frontends.keys());
                        frontends
                            .map(frontend_key)
                            .any(|k| self.services[&k].svc_id == svc.svc_id)
                    });
                    let port = port.expect("a desired port for a ranged service");
                    let family = IpFamily::of(key.addr);
                    let ranges = port.source_ranges.iter();
                    let ranges = ranges.filter(|r| IpFamily::of(r.0) == family);
                    want_ranges.extend(ranges.map(|&(a, l)| (svc.svc_id, a, l)));
                }
            }
            assert_eq!(self.source_ranges, want_ranges, "source ranges");
            let counts: BTreeMap<u32, u16> = self
                .services
                .values()
                .map(|s| (s.svc_id, s.backend_count))
                .collect();
            let used_slots: usize = counts.values().map(|&c| c as usize).sum();
            assert_eq!(self.slots.len(), used_slots, "stale slots left");
            let members: BTreeSet<MemberKey> = self
                .slots
                .iter()
                .map(|(k, s)| MemberKey {
                    svc_id: k.svc_id,
                    backend_id: s.backend_id,
                })
                .collect();
            assert_eq!(
                self.members.keys().copied().collect::<BTreeSet<_>>(),
                members,
                "memberships match the slots"
            );
            let used: BTreeSet<u32> = self.slots.values().map(|s| s.backend_id).collect();
            assert_eq!(
                self.backends.keys().copied().collect::<BTreeSet<_>>(),
                used,
                "stale backends left"
            );
            let maglev_users: BTreeSet<u32> = self
                .services
                .values()
                .filter(|s| s.algorithm == ALG_MAGLEV)
                .map(|s| s.svc_id)
                .collect();
            assert_eq!(
                self.maglev.keys().copied().collect::<BTreeSet<_>>(),
                maglev_users,
                "a table exactly for each service using Maglev"
            );
            let vips: BTreeSet<IpAddr> = self
                .services
                .keys()
                .filter(|k| k.scope == SCOPE_ALL)
                .map(|k| k.addr)
                .filter(|a| !desired.node_addrs.contains(a))
                .collect();
            assert_eq!(
                self.vips.keys().map(|k| k.addr).collect::<BTreeSet<_>>(),
                vips
            );
        }
    }

    fn name(n: &str, protocol: Protocol) -> ServicePortName {
        ServicePortName {
            namespace: "ns".into(),
            name: n.into(),
            port: String::new(),
            protocol,
        }
    }

    fn port(vip: [u8; 4], vport: u16, eps: &[u8]) -> ServicePort {
        ServicePort {
            frontends: [Frontend {
                addr: IpAddr::from(vip),
                port: vport,
                protocol: Protocol::Tcp,
            }]
            .into(),
            endpoints: eps.iter().map(|i| endpoint4(*i)).collect(),
            ..ServicePort::default()
        }
    }

    /// Endpoint 10.1.0.`i`:8080.
    fn endpoint4(i: u8) -> Endpoint {
        Endpoint {
            addr: IpAddr::from([10, 1, 0, i]),
            port: 8080,
        }
    }

    /// Endpoint [fd00:1::`i`]:8080.
    fn endpoint6(i: u8) -> Endpoint {
        Endpoint {
            addr: IpAddr::from(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i.into())),
            port: 8080,
        }
    }

    /// Frontend [fd00:96::`i`]:`port`.
    fn vip6(i: u8, port: u16) -> Frontend {
        Frontend {
            addr: IpAddr::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, i.into())),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn state(services: &[(&str, ServicePort)]) -> DesiredState {
        DesiredState {
            services: services
                .iter()
                .map(|(n, p)| (name(n, Protocol::Tcp), p.clone()))
                .collect(),
            ..DesiredState::default()
        }
    }

    /// Applies `desired` to `maps` op by op, checking for holes after each.
    fn step(p: Programmed, maps: &mut Maps, desired: &DesiredState) -> (Programmed, Vec<Op>) {
        let plan = p.plan(desired, Algorithm::Random);
        for op in &plan.ops {
            maps.apply(op);
            maps.assert_no_holes(op);
        }
        maps.assert_serves(desired);
        (plan.next, plan.ops)
    }

    fn kinds(ops: &[Op]) -> Vec<&'static str> {
        ops.iter()
            .map(|op| match op {
                Op::PutBackend(..) => "put-backend",
                Op::PutMember(..) => "put-member",
                Op::PutMaglev(..) => "put-maglev",
                Op::PatchMaglev(..) => "patch-maglev",
                Op::DeleteMaglev(..) => "del-maglev",
                Op::PutSourceRange(..) => "put-source-range",
                Op::DeleteSourceRange(..) => "del-source-range",
                Op::PutSlot(..) => "put-slot",
                Op::PutService(..) => "put-service",
                Op::PutVip(..) => "put-vip",
                Op::DeleteVip(..) => "del-vip",
                Op::PutNodeAddr(..) => "put-node-addr",
                Op::DeleteNodeAddr(..) => "del-node-addr",
                Op::DeleteService(..) => "del-service",
                Op::DeleteSlot(..) => "del-slot",
                Op::DeleteMember(..) => "del-member",
                Op::DeleteBackend(..) => "del-backend",
            })
            .collect()
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_frontends() {
        let mut maps = Maps::default();
        let (_, ops) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("a", port([10, 96, 0, 1], 80, &[1, 2]))]),
        );
        assert_eq!(
            kinds(&ops),
            [
                "put-backend",
                "put-backend",
                "put-member",
                "put-member",
                "put-slot",
                "put-slot",
                "put-service",
                "put-vip"
            ]
        );
    }

    #[test]
    fn external_frontends_get_their_flags_and_a_local_policy_its_own_backend_set() {
        let mut maps = Maps::default();
        let node = IpAddr::from([192, 168, 0, 10]);
        let node_port = |port: u16| Frontend {
            addr: node,
            port,
            protocol: Protocol::Tcp,
        };
        let at_node = External {
            snat_addr: node,
            load_balancer: false,
        };
        let mut cluster = port([10, 96, 0, 1], 80, &[1, 2]);
        cluster.external_frontends = [(node_port(30080), at_node)].into();
        let mut local = port([10, 96, 0, 2], 80, &[1, 2]);
        local.external_frontends = [(node_port(30081), at_node)].into();
        local.external_local = true;
        local.local_endpoints = local.endpoints.iter().take(1).copied().collect();
        let mut none_here = port([10, 96, 0, 3], 80, &[1, 2]);
        none_here.external_frontends = [(node_port(30082), at_node)].into();
        none_here.external_local = true;
        let (p, _) = step(
            Programmed::default(),
            &mut maps,
            &state(&[
                ("cluster", cluster.clone()),
                ("local", local.clone()),
                ("none", none_here),
            ]),
        );
        let svc = |maps: &Maps, fe: Frontend| maps.services[&frontend_key(&fe)];
        let vip = |addr: [u8; 4]| Frontend {
            addr: IpAddr::from(addr),
            port: 80,
            protocol: Protocol::Tcp,
        };

        let (clusterip, external) = (
            svc(&maps, vip([10, 96, 0, 1])),
            svc(&maps, node_port(30080)),
        );
        assert_eq!(clusterip.flags, 0);
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_SNAT);
        assert_eq!(external.snat_addr, node);
        assert_eq!(
            external.svc_id, clusterip.svc_id,
            "policy Cluster: one backend set"
        );

        let (clusterip, external) = (
            svc(&maps, vip([10, 96, 0, 2])),
            svc(&maps, node_port(30081)),
        );
        // No SNAT; and should the local endpoints go while others remain, drop, not reject.
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_DROP_WHEN_EMPTY);
        assert_ne!(
            external.svc_id, clusterip.svc_id,
            "policy Local: a backend set of its own"
        );
        assert_eq!((clusterip.backend_count, external.backend_count), (2, 1));

        let external = svc(&maps, node_port(30082));
        assert_eq!(external.backend_count, 0);
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_DROP_WHEN_EMPTY);

        // Switching the policy back moves the NodePort onto the cluster set, and the local
        // set goes.
        local.external_local = false;
        let (_, ops) = step(
            p,
            &mut maps,
            &state(&[("cluster", cluster), ("local", local)]),
        );
        assert!(ops.contains(&Op::DeleteService(frontend_key(&node_port(30082)))));
        let (clusterip, external) = (
            svc(&maps, vip([10, 96, 0, 2])),
            svc(&maps, node_port(30081)),
        );
        assert_eq!(external.svc_id, clusterip.svc_id);
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_SNAT);
    }

    /// The service entry of `fe` (scope `SCOPE_ALL`), and of the node's own connections to it
    /// if it has one of its own (`SCOPE_HOST`).
    fn entries(maps: &Maps, fe: &Frontend) -> (AnyService, Option<AnyService>) {
        let key = frontend_key(fe);
        let host = FrontendKey {
            scope: SCOPE_HOST,
            ..key
        };
        (maps.services[&key], maps.services.get(&host).copied())
    }

    /// The backends of the service id `svc`, by address.
    fn backends_of(maps: &Maps, svc: &AnyService) -> BTreeSet<IpAddr> {
        (1..=svc.backend_count as u32)
            .map(|slot| {
                let s = maps.slots[&SlotKey {
                    svc_id: svc.svc_id,
                    slot,
                }];
                maps.backends[&s.backend_id].addr
            })
            .collect()
    }

    fn addrs4(last: &[u8]) -> BTreeSet<IpAddr> {
        last.iter().map(|i| endpoint4(*i).addr).collect()
    }

    /// Port `vip`:80 with endpoints 10.1.0.1 (this node's) and 10.1.0.2, and NodePort 30080 on
    /// 192.168.0.10.
    fn node_port_with_one_local(vip: [u8; 4]) -> (ServicePort, Frontend, Frontend) {
        let node = IpAddr::from([192, 168, 0, 10]);
        let node_port = Frontend {
            addr: node,
            port: 30080,
            protocol: Protocol::Tcp,
        };
        let mut sp = port(vip, 80, &[1, 2]);
        sp.local_endpoints = [endpoint4(1)].into();
        sp.external_frontends = [(
            node_port,
            External {
                snat_addr: node,
                load_balancer: false,
            },
        )]
        .into();
        let cluster_ip = *sp.frontends.first().unwrap();
        (sp, cluster_ip, node_port)
    }

    #[test]
    fn internal_traffic_policy_local_sends_cluster_ips_to_the_local_set() {
        let mut maps = Maps::default();
        let mut sp = port([10, 96, 0, 1], 80, &[1, 2]);
        sp.internal_local = true;
        sp.local_endpoints = [endpoint4(1)].into();
        let cluster_ip = *sp.frontends.first().unwrap();
        let (p, _) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("a", sp.clone())]),
        );
        let (svc, host) = entries(&maps, &cluster_ip);
        assert_eq!(backends_of(&maps, &svc), addrs4(&[1]));
        assert_eq!(svc.flags, SVC_F_DROP_WHEN_EMPTY);
        assert_eq!(
            host, None,
            "the node's own connections use the local set too"
        );
        assert_eq!(maps.services.len(), 1, "no cluster unit: nothing uses it");

        // The local endpoint goes while another remains: drop.
        sp.local_endpoints.clear();
        let (p, _) = step(p, &mut maps, &state(&[("a", sp.clone())]));
        let (svc, _) = entries(&maps, &cluster_ip);
        assert_eq!((svc.backend_count, svc.flags), (0, SVC_F_DROP_WHEN_EMPTY));

        // None anywhere: reject.
        sp.endpoints.clear();
        let (_, ops) = step(p, &mut maps, &state(&[("a", sp)]));
        let (svc, _) = entries(&maps, &cluster_ip);
        assert_eq!((svc.backend_count, svc.flags), (0, 0));
        assert_eq!(kinds(&ops), ["put-service"], "the flag, nothing else");
    }

    #[test]
    fn internal_local_and_external_cluster_use_two_sets() {
        let mut maps = Maps::default();
        let (mut sp, cluster_ip, node_port) = node_port_with_one_local([10, 96, 0, 1]);
        sp.internal_local = true;
        step(Programmed::default(), &mut maps, &state(&[("a", sp)]));
        let ((internal, _), (external, host)) =
            (entries(&maps, &cluster_ip), entries(&maps, &node_port));
        assert_ne!(internal.svc_id, external.svc_id);
        assert_eq!(backends_of(&maps, &internal), addrs4(&[1]));
        assert_eq!(internal.flags, SVC_F_DROP_WHEN_EMPTY);
        assert_eq!(backends_of(&maps, &external), addrs4(&[1, 2]));
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_SNAT);
        assert_eq!(
            host, None,
            "under policy Cluster the node's own entry is everyone's"
        );
    }

    #[test]
    fn both_policies_local_share_one_local_set() {
        let mut maps = Maps::default();
        let (mut sp, cluster_ip, node_port) = node_port_with_one_local([10, 96, 0, 1]);
        sp.internal_local = true;
        sp.external_local = true;
        let (p, _) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("a", sp.clone())]),
        );
        let ((internal, _), (external, host)) =
            (entries(&maps, &cluster_ip), entries(&maps, &node_port));
        assert_eq!(internal.svc_id, external.svc_id, "one Local unit");
        assert_eq!(backends_of(&maps, &internal), addrs4(&[1]));
        assert_eq!(internal.flags, SVC_F_DROP_WHEN_EMPTY);
        assert_eq!(external.flags, SVC_F_EXTERNAL | SVC_F_DROP_WHEN_EMPTY);
        let host = host.expect("the node's own entry for the NodePort");
        assert_eq!(backends_of(&maps, &host), addrs4(&[1, 2]), "every endpoint");
        assert_eq!(host.flags, SVC_F_EXTERNAL);

        // Back to policy Cluster for ClusterIPs: the ClusterIP moves to the cluster set, the
        // NodePort keeps its service id.
        sp.internal_local = false;
        step(p, &mut maps, &state(&[("a", sp)]));
        let ((moved, _), (kept, host)) = (entries(&maps, &cluster_ip), entries(&maps, &node_port));
        assert_eq!(kept.svc_id, external.svc_id);
        assert_eq!(moved.svc_id, host.unwrap().svc_id, "the cluster unit");
        assert_eq!(
            (moved.flags, backends_of(&maps, &moved)),
            (0, addrs4(&[1, 2]))
        );
    }

    #[test]
    fn the_terminating_fallback_reaches_the_datapath_sets() {
        // From Kubernetes objects: this node's only endpoint is terminating but serving,
        // another node's is ready.
        let service: k8s_openapi::api::core::v1::Service = serde_yaml::from_str(
            "{metadata: {name: web}, spec: {type: NodePort, clusterIP: 10.96.0.10, \
             externalTrafficPolicy: Local, internalTrafficPolicy: Local, \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
        )
        .unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_yaml::from_str(
            "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
             addressType: IPv4, ports: [{port: 8080}], \
             endpoints: [{addresses: [10.1.0.1], nodeName: node-a, \
             conditions: {ready: false, serving: true, terminating: true}}, \
             {addresses: [10.1.0.2], nodeName: node-b, conditions: {ready: true}}, \
             {addresses: [10.1.0.3], nodeName: node-b, \
             conditions: {ready: false, serving: true, terminating: true}}]}",
        )
        .unwrap();
        let node = crate::model::Node {
            name: Some("node-a".into()),
            addrs: vec![IpAddr::from([192, 168, 0, 10])],
            ..crate::model::Node::default()
        };
        let (desired, warnings) = crate::model::build(&[service], &[slice], &node);
        assert_eq!(warnings, []);
        let mut maps = Maps::default();
        step(Programmed::default(), &mut maps, &desired);
        let at = |addr: [u8; 4], port| Frontend {
            addr: IpAddr::from(addr),
            port,
            protocol: Protocol::Tcp,
        };
        let ((internal, _), (external, host)) = (
            entries(&maps, &at([10, 96, 0, 10], 80)),
            entries(&maps, &at([192, 168, 0, 10], 30080)),
        );
        assert_eq!(
            backends_of(&maps, &internal),
            addrs4(&[1]),
            "the terminating one here"
        );
        assert_eq!(backends_of(&maps, &external), addrs4(&[1]));
        let host = host.expect("the node's own entry");
        assert_eq!(
            backends_of(&maps, &host),
            addrs4(&[2]),
            "ready ones elsewhere first"
        );
    }

    #[test]
    fn source_ranges_guard_only_load_balancer_frontends_and_follow_changes() {
        let mut maps = Maps::default();
        let lb_ip = Frontend {
            addr: IpAddr::from([198, 51, 100, 9]),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let external_ip = Frontend {
            addr: IpAddr::from([203, 0, 113, 7]),
            ..lb_ip
        };
        let e = |load_balancer| External {
            snat_addr: IpAddr::from([192, 168, 0, 10]),
            load_balancer,
        };
        let mut lb = port([10, 96, 0, 1], 80, &[1, 2]);
        lb.external_frontends = [(lb_ip, e(true)), (external_ip, e(false))].into();
        lb.source_ranges = [
            (IpAddr::from([10, 0, 0, 0]), 8),
            (IpAddr::from([192, 0, 2, 0]), 24),
        ]
        .into();
        let (p, ops) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("lb", lb.clone())]),
        );
        let first_range = ops.iter().position(|o| matches!(o, Op::PutSourceRange(..)));
        let first_service = ops.iter().position(|o| matches!(o, Op::PutService(..)));
        assert!(
            first_range < first_service,
            "ranges before the frontends that check them"
        );
        let flags = |maps: &Maps, fe: &Frontend| maps.services[&frontend_key(fe)].flags;
        assert_ne!(flags(&maps, &lb_ip) & SVC_F_SOURCE_RANGES, 0);
        assert_eq!(
            flags(&maps, &external_ip) & SVC_F_SOURCE_RANGES,
            0,
            "externalIPs are open"
        );

        // One range less: one delete, nothing else.
        lb.source_ranges.remove(&(IpAddr::from([192, 0, 2, 0]), 24));
        let (p, ops) = step(p, &mut maps, &state(&[("lb", lb.clone())]));
        assert_eq!(kinds(&ops), ["del-source-range"]);

        // No ranges: the frontend opens and the last range goes after it.
        lb.source_ranges.clear();
        let (_, ops) = step(p, &mut maps, &state(&[("lb", lb)]));
        assert_eq!(kinds(&ops), ["put-service", "del-source-range"]);
        assert_eq!(flags(&maps, &lb_ip) & SVC_F_SOURCE_RANGES, 0);
    }

    #[test]
    fn host_network_endpoints_are_marked_and_node_addresses_known_to_egress_first() {
        let mut maps = Maps::default();
        // Endpoints 10.1.0.1 and 10.1.0.2; the first is an address of this node.
        let mut desired = state(&[("a", port([10, 96, 0, 1], 80, &[1, 2]))]);
        let node = IpAddr::from([10, 1, 0, 1]);
        desired.node_addrs.insert(node);
        let (p, ops) = step(Programmed::default(), &mut maps, &desired);
        assert_eq!(
            kinds(&ops)[0],
            "put-node-addr",
            "before any backend: {ops:?}"
        );
        let states: BTreeMap<IpAddr, u8> =
            maps.backends.values().map(|b| (b.addr, b.state)).collect();
        assert_eq!(states[&node], BACKEND_HOST);
        assert_eq!(states[&IpAddr::from([10, 1, 0, 2])], BACKEND_ACTIVE);
        assert_eq!(maps.node_addr_entries.len(), 1);

        // The endpoint leaves the service: the node address stays known to egress (its open
        // connections still need their replies translated).
        let mut desired = state(&[("a", port([10, 96, 0, 1], 80, &[2]))]);
        desired.node_addrs.insert(node);
        let (p, ops) = step(p, &mut maps, &desired);
        assert!(!kinds(&ops).contains(&"del-node-addr"), "{ops:?}");
        assert_eq!(maps.node_addr_entries.len(), 1);

        // The address is no longer the node's: its entry goes, last.
        let desired = state(&[("a", port([10, 96, 0, 1], 80, &[2]))]);
        let (_, ops) = step(p, &mut maps, &desired);
        assert_eq!(kinds(&ops).last(), Some(&"del-node-addr"), "{ops:?}");
        assert!(maps.node_addr_entries.is_empty());
    }

    #[test]
    fn unchanged_state_writes_nothing() {
        let mut maps = Maps::default();
        let s = state(&[("a", port([10, 96, 0, 1], 80, &[1, 2]))]);
        let (p, _) = step(Programmed::default(), &mut maps, &s);
        let (_, ops) = step(p, &mut maps, &s);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn removing_an_endpoint_shrinks_only_what_changed() {
        let mut maps = Maps::default();
        let (p, _) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("a", port([10, 96, 0, 1], 80, &[1, 2, 3]))]),
        );
        let (_, ops) = step(
            p,
            &mut maps,
            &state(&[("a", port([10, 96, 0, 1], 80, &[1, 3]))]),
        );
        // Slot 2 now names backend 3; the count drops; slot 3, backend 2 and its membership go.
        assert_eq!(
            kinds(&ops),
            [
                "put-slot",
                "put-service",
                "del-slot",
                "del-member",
                "del-backend"
            ]
        );
    }

    #[test]
    fn a_backend_shared_by_two_services_outlives_one_of_them() {
        let mut maps = Maps::default();
        let both = state(&[
            ("a", port([10, 96, 0, 1], 80, &[1])),
            ("b", port([10, 96, 0, 2], 80, &[1])),
        ]);
        let (p, ops) = step(Programmed::default(), &mut maps, &both);
        assert_eq!(
            kinds(&ops).iter().filter(|k| **k == "put-backend").count(),
            1
        );
        let (_, ops) = step(
            p,
            &mut maps,
            &state(&[("b", port([10, 96, 0, 2], 80, &[1]))]),
        );
        assert_eq!(
            kinds(&ops),
            ["del-vip", "del-service", "del-slot", "del-member"]
        );
    }

    #[test]
    fn two_services_claiming_one_frontend_keep_the_first() {
        let mut maps = Maps::default();
        let clash = state(&[
            ("a", port([10, 96, 0, 1], 80, &[1])),
            ("b", port([10, 96, 0, 1], 80, &[2])),
        ]);
        let plan = Programmed::default().plan(&clash, Algorithm::Random);
        for op in &plan.ops {
            maps.apply(op);
        }
        let svc = maps.services.values().next().unwrap();
        let slot = maps.slots[&SlotKey {
            svc_id: svc.svc_id,
            slot: 1,
        }];
        assert_eq!(
            maps.backends[&slot.backend_id].addr,
            IpAddr::from([10, 1, 0, 1]),
            "a (first by name) wins"
        );
        assert_eq!(maps.services.len(), 1);
    }

    impl Maps {
        /// What `EbpfDataplane::adopt` would read back.
        fn pinned(&self) -> Pinned {
            Pinned {
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                slots: self.slots.iter().map(|(k, v)| (*k, *v)).collect(),
                members: self.members.keys().copied().collect(),
                maglev: self.maglev.keys().copied().collect(),
                backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
                vips: self.vips.iter().map(|(k, v)| (*k, *v)).collect(),
                node_addr_entries: self
                    .node_addr_entries
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect(),
                source_ranges: self.source_ranges.iter().copied().collect(),
            }
        }
    }

    #[test]
    fn a_restart_adopts_everything_and_writes_nothing() {
        let mut maps = Maps::default();
        let mut sticky = port([10, 96, 0, 2], 80, &[2, 3]);
        sticky.affinity_timeout_s = Some(60);
        let desired = state(&[("a", port([10, 96, 0, 1], 80, &[1, 2])), ("b", sticky)]);
        step(Programmed::default(), &mut maps, &desired);
        let ids_before: Vec<u32> = maps.services.values().map(|s| s.svc_id).collect();

        let (p, ops) = step(Programmed::adopt(maps.pinned()), &mut maps, &desired);
        assert!(ops.is_empty(), "a restart rewrote {ops:?}");
        let ids_after: Vec<u32> = maps.services.values().map(|s| s.svc_id).collect();
        assert_eq!(
            ids_before, ids_after,
            "service ids (and so affinity entries) are kept"
        );

        // And the adopted state diffs like any other.
        let (_, ops) = step(
            p,
            &mut maps,
            &state(&[("a", port([10, 96, 0, 1], 80, &[1]))]),
        );
        assert!(
            !ops.iter().any(|op| matches!(op, Op::PutBackend(..))),
            "{ops:?}"
        );
    }

    #[test]
    fn an_adopted_maglev_table_is_replaced_whole_once() {
        let mut maps = Maps::default();
        let mut sp = port([10, 96, 0, 1], 80, &[1, 2, 3]);
        sp.algorithm = Some(Algorithm::Maglev);
        let desired = state(&[("a", sp)]);
        step(Programmed::default(), &mut maps, &desired);
        let (p, ops) = step(Programmed::adopt(maps.pinned()), &mut maps, &desired);
        assert_eq!(
            kinds(&ops),
            ["put-maglev"],
            "its contents are not read back"
        );
        let (_, ops) = step(p, &mut maps, &desired);
        assert!(ops.is_empty(), "{ops:?}");
    }

    #[test]
    fn adoption_removes_what_a_failed_apply_left_behind() {
        let mut maps = Maps::default();
        let desired = state(&[("a", port([10, 96, 0, 1], 80, &[1, 2]))]);
        step(Programmed::default(), &mut maps, &desired);
        // Half of an apply: a backend (a duplicate of one in use, under a new id), and the
        // slot, membership and table of a service whose frontend was never written.
        let dup = *maps.backends.values().next().unwrap();
        for op in [
            Op::PutBackend(40, dup),
            Op::PutBackend(
                41,
                Backend {
                    addr: IpAddr::from([10, 1, 0, 9]),
                    ..dup
                },
            ),
            Op::PutMember(member_key(30, 41), active_member()),
            Op::PutMaglev(30, vec![41; maglev::TABLE_SIZE as usize]),
            Op::PutSlot(slot_key(30, 0), Slot { backend_id: 41 }),
        ] {
            maps.apply(&op);
        }
        let p = Programmed::adopt(maps.pinned());
        assert!(
            p.next_svc_id >= 30 && p.next_backend_id >= 41,
            "ids above everything found"
        );
        let (_, ops) = step(p, &mut maps, &desired);
        assert_eq!(
            kinds(&ops),
            [
                "del-slot",
                "del-maglev",
                "del-member",
                "del-backend",
                "del-backend"
            ]
        );
    }

    #[test]
    fn maglev_tables_come_before_their_service_and_are_patched_not_rebuilt() {
        let mut maps = Maps::default();
        let mut sp = port([10, 96, 0, 1], 80, &[1, 2, 3]);
        sp.algorithm = Some(Algorithm::Maglev);
        let (p, ops) = step(
            Programmed::default(),
            &mut maps,
            &state(&[("a", sp.clone())]),
        );
        let order = kinds(&ops);
        let pos = |k| order.iter().position(|x| *x == k).unwrap();
        assert!(pos("put-maglev") < pos("put-service"), "{order:?}");
        let table = maps.maglev.values().next().unwrap().clone();

        // Removing one of three backends rewrites only the entries that named it, and a few.
        sp.endpoints = port([10, 96, 0, 1], 80, &[1, 2]).endpoints;
        let (p, ops) = step(p, &mut maps, &state(&[("a", sp.clone())]));
        let patched = ops.iter().find_map(|op| match op {
            Op::PatchMaglev(_, e) => Some(e.len()),
            _ => None,
        });
        let gone = table
            .iter()
            .filter(|id| !maps.backends.contains_key(id))
            .count();
        let patched = patched.expect("a patch, not a new table");
        println!("patched {patched} entries, {gone} of them named the removed backend");
        assert!(
            patched >= gone && patched < gone * 13 / 10,
            "patched {patched}, needed {gone}"
        );

        // Back to random: the service stops using the table before it goes.
        sp.algorithm = Some(Algorithm::Random);
        let (_, ops) = step(p, &mut maps, &state(&[("a", sp)]));
        assert_eq!(kinds(&ops), ["put-service", "del-maglev"]);
    }

    #[test]
    fn a_dual_stack_port_is_one_backend_set_per_family() {
        let mut maps = Maps::default();
        let node4 = IpAddr::from([192, 168, 0, 10]);
        let node6 = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
        let mut sp = port([10, 96, 0, 1], 80, &[1, 2]);
        sp.frontends.insert(vip6(1, 80));
        sp.endpoints
            .extend([endpoint6(1), endpoint6(2), endpoint6(3)]);
        sp.algorithm = Some(Algorithm::Maglev);
        let lb = |addr, snat_addr| {
            let fe = Frontend {
                addr,
                port: 80,
                protocol: Protocol::Tcp,
            };
            let e = External {
                snat_addr,
                load_balancer: true,
            };
            (fe, e)
        };
        let lb4 = lb(IpAddr::from([198, 51, 100, 9]), node4);
        let lb6 = lb(
            IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0xee, 0, 0, 0, 0, 9)),
            node6,
        );
        sp.external_frontends = [lb4, lb6].into();
        // Ranges of IPv4 only: the IPv6 LoadBalancer IP accepts every client.
        sp.source_ranges = [(IpAddr::from([10, 0, 0, 0]), 8)].into();
        let mut desired = state(&[("a", sp.clone())]);
        desired.node_addrs = [node4, node6].into();
        let (p, ops) = step(Programmed::default(), &mut maps, &desired);

        let svc = |fe: &Frontend| maps.services[&frontend_key(fe)];
        let (c4, c6) = (
            svc(&port([10, 96, 0, 1], 80, &[]).frontends.pop_first().unwrap()),
            svc(&vip6(1, 80)),
        );
        assert_ne!(c4.svc_id, c6.svc_id, "one service id per family");
        assert_eq!((c4.backend_count, c6.backend_count), (2, 3));
        let (e4, e6) = (svc(&lb4.0), svc(&lb6.0));
        assert_eq!((e4.svc_id, e6.svc_id), (c4.svc_id, c6.svc_id));
        assert_eq!((e4.snat_addr, e6.snat_addr), (node4, node6));
        assert_eq!(c6.snat_addr, IpAddr::from(Ipv6Addr::UNSPECIFIED));
        assert_ne!(e4.flags & SVC_F_SOURCE_RANGES, 0);
        assert_eq!(e6.flags & SVC_F_SOURCE_RANGES, 0, "no IPv6 ranges: open");
        assert_eq!(
            maps.source_ranges,
            [(c4.svc_id, IpAddr::from([10, 0, 0, 0]), 8)].into()
        );
        assert_eq!(maps.maglev.len(), 2, "a Maglev table per family");
        let ids: BTreeSet<u32> = maps.backends.keys().copied().collect();
        assert_eq!(ids.len(), 5, "backend ids unique across families");
        assert_eq!(
            maps.vips.len(),
            4,
            "ClusterIPs and LoadBalancer IPs of both"
        );
        assert_eq!(maps.node_addr_entries.len(), 2);

        // The IPv6 endpoints go: only the IPv6 backend set shrinks, and its backends are
        // deleted from the IPv6 map.
        sp.endpoints.retain(|e| e.family() == IpFamily::V4);
        let mut desired = state(&[("a", sp.clone())]);
        desired.node_addrs = [node4, node6].into();
        let (p, ops2) = step(p, &mut maps, &desired);
        assert!(
            ops2.iter().all(|op| match op {
                Op::PutService(k, _) => IpFamily::of(k.addr) == IpFamily::V6,
                Op::DeleteBackend(family, _) => *family == IpFamily::V6,
                _ => true,
            }),
            "{ops2:?}"
        );
        assert_eq!(svc_count(&ops2, "del-backend"), 3);
        assert!(ops.len() > ops2.len());

        // A restart adopts both families and writes nothing.
        let (_, ops) = step(Programmed::adopt(maps.pinned()), &mut maps, &desired);
        assert_eq!(
            kinds(&ops),
            ["put-maglev"],
            "only the v4 table, contents unknown"
        );
        drop(p);
    }

    fn svc_count(ops: &[Op], kind: &str) -> usize {
        kinds(ops).iter().filter(|k| **k == kind).count()
    }

    #[test]
    fn random_walk_of_states_never_exposes_a_hole() {
        // A deterministic walk over service sets, endpoint sets, VIP sharing and families:
        // IPv4-only, IPv6-only and dual-stack ports, with endpoints of both.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let node4 = |i: u8| IpAddr::from([192, 168, 0, 10 + i]);
        let node6 = |i: u8| {
            IpAddr::from(Ipv6Addr::new(
                0x2001,
                0xdb8,
                0,
                0,
                0,
                0,
                0,
                0x10 + u16::from(i),
            ))
        };
        let mut maps = Maps::default();
        let mut p = Programmed::default();
        let mut walked = 0;
        let mut both_families = 0;
        let (mut internal_local, mut shared_local) = (0, 0);
        for _ in 0..300 {
            let mut services = Vec::new();
            for s in 0..next(6) {
                // 0: IPv4 only, 1: IPv6 only, 2: dual-stack.
                let stack = next(3);
                let mut sp = port([10, 96, 0, 1 + next(3) as u8], 80 + next(2) as u16, &[]);
                if stack == 1 {
                    sp.frontends.clear();
                }
                if stack >= 1 {
                    sp.frontends
                        .insert(vip6(1 + next(3) as u8, 80 + next(2) as u16));
                }
                // Endpoints of either family, whatever the port's: the plan must never make
                // one of the other family a backend.
                sp.endpoints = (0..next(7))
                    .map(|_| {
                        let i = 1 + next(8) as u8;
                        if next(2) == 0 {
                            endpoint4(i)
                        } else {
                            endpoint6(i)
                        }
                    })
                    .collect();
                sp.algorithm =
                    [None, Some(Algorithm::Random), Some(Algorithm::Maglev)][next(3) as usize];
                // Sometimes node-facing too: a NodePort or LoadBalancer IP per family, under
                // either traffic policy, with or without source ranges of either family.
                if next(2) == 0 {
                    let load_balancer = next(2) == 0;
                    let families: Vec<IpFamily> = sp.frontends.iter().map(|f| f.family()).collect();
                    for family in families {
                        let (addr, snat_addr) = match family {
                            IpFamily::V4 => (node4(next(2) as u8), node4(0)),
                            IpFamily::V6 => (node6(next(2) as u8), node6(0)),
                        };
                        let frontend = Frontend {
                            addr,
                            port: 30000 + s as u16,
                            protocol: Protocol::Tcp,
                        };
                        let external = External {
                            snat_addr,
                            load_balancer,
                        };
                        sp.external_frontends.insert(frontend, external);
                    }
                    sp.external_local = next(2) == 0;
                    sp.source_ranges = (0..next(4))
                        .map(|i| match next(2) {
                            0 => (IpAddr::from([10, i as u8, 0, 0]), 16),
                            _ => (
                                IpAddr::from(Ipv6Addr::new(0xfd00, i as u16, 0, 0, 0, 0, 0, 0)),
                                32,
                            ),
                        })
                        .collect();
                }
                // Either policy Local, or both; the local set mostly a part of the cluster
                // one, sometimes with an endpoint the cluster set lacks (a terminating one
                // here while ready ones serve elsewhere).
                sp.internal_local = next(3) == 0;
                sp.local_endpoints = (sp.endpoints.iter())
                    .filter(|_| next(2) == 0)
                    .copied()
                    .collect();
                if next(4) == 0 {
                    sp.local_endpoints
                        .insert([endpoint4(9), endpoint6(9)][next(2) as usize]);
                }
                services.push((format!("svc{s}"), sp));
            }
            // Frontend clashes are resolved (first wins); keep the walk to unambiguous states.
            let mut seen = BTreeSet::new();
            services.retain(|(_, sp)| sp.frontends.iter().all(|f| seen.insert(*f)));
            let refs: Vec<(&str, ServicePort)> = services
                .iter()
                .map(|(n, sp)| (n.as_str(), sp.clone()))
                .collect();
            let mut desired = state(&refs);
            // Some endpoints are at node addresses (hostNetwork), which come and go.
            let hosts: Vec<IpAddr> = (1..=3)
                .flat_map(|i| [endpoint4(i).addr, endpoint6(i).addr])
                .collect();
            desired.node_addrs = hosts.into_iter().filter(|_| next(2) == 0).collect();
            p = step(p, &mut maps, &desired).0;
            let families: BTreeSet<IpFamily> = maps
                .backends
                .values()
                .map(|b| IpFamily::of(b.addr))
                .collect();
            both_families += usize::from(families.len() == 2);
            // The walk reaches ClusterIPs under internalTrafficPolicy Local, and Local units
            // serving ClusterIPs and external frontends together.
            let local_cluster_ips: BTreeSet<u32> = (maps.services.iter())
                .filter(|(k, v)| k.scope == SCOPE_ALL && v.flags == SVC_F_DROP_WHEN_EMPTY)
                .map(|(_, v)| v.svc_id)
                .collect();
            internal_local += usize::from(!local_cluster_ips.is_empty());
            shared_local += usize::from(maps.services.iter().any(|(k, v)| {
                k.scope == SCOPE_ALL
                    && v.flags & SVC_F_EXTERNAL != 0
                    && local_cluster_ips.contains(&v.svc_id)
            }));
            walked += 1;
            if walked % 25 == 0 {
                // A restart: start again from what the maps hold.
                p = Programmed::adopt(maps.pinned());
            }
        }
        assert!(
            both_families > walked / 4,
            "the walk often holds backends of both families: {both_families} of {walked}"
        );
        assert!(
            internal_local > walked / 4 && shared_local > walked / 10,
            "the walk often has internal Local units ({internal_local} of {walked}), some \
             shared with external frontends ({shared_local})"
        );
    }
}
