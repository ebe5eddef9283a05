//! The eBPF dataplane: loads the embedded datapath, pins its maps, attaches it at tc ingress,
//! and keeps the maps equal to the desired state by executing `plan::Plan`s.

pub mod conntrack_gc;
pub mod family;
pub mod inspect;
pub mod plan;
pub mod socket_lb;

use anyhow::Context as _;
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, HashOfMaps, LpmTrie, MapData, MapError},
    programs::{tc, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    maglev, names, Backend, CtEntry, CtKey, FrontendKey, Member, MemberKey, Service, Slot, SlotKey,
    SourceRange, Vip, VipKey, V4, V6,
};
use log::{info, warn};

use super::{ApplyReport, Dataplane};
use crate::model::{Algorithm, DesiredState, IpFamily};
use family::Family;
use plan::{Op, Pinned, Programmed};

/// The datapath object, built by build.rs from `lb-ebpf`.
pub static DATAPATH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The classifier's name in the object.
pub const INGRESS_PROGRAM: &str = "lb_ingress";
/// The egress classifier (ICMP errors the node itself sends about translated flows).
pub const EGRESS_PROGRAM: &str = "lb_egress";
/// The XDP fast path for node-facing frontends.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// Where maps are pinned unless `--bpffs` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Errors an operator can cause or fix, each saying what to do.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{dir} is not on a bpffs mount, so maps cannot be pinned there; mount one with `mount -t bpf bpf /sys/fs/bpf` or pass --bpffs DIR under an existing bpffs")]
    NotBpffs { dir: PathBuf },
    #[error("cannot create the pin directory {dir}: {source}")]
    PinDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF datapath failed: {source}; it needs root (or CAP_BPF and CAP_NET_ADMIN) and a kernel with BPF and BTF (5.10 or newer)")]
    Load { source: aya::EbpfError },
    #[error("the kernel rejected the datapath program: {source}")]
    Program { source: aya::programs::ProgramError },
    #[error("the embedded datapath object does not parse: {reason}")]
    Object { reason: String },
    #[error("map {name} is missing from the datapath object")]
    MissingMap { name: &'static str },
    #[error("program {name} is missing from the datapath object")]
    MissingProgram { name: &'static str },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("cannot attach to interface {iface}: {source}; check that it exists (`ip link show {iface}`) in this network namespace")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
}

/// The typed maps the agent writes.
struct Maps {
    v4: FamilyMaps<V4>,
    v6: FamilyMaps<V6>,
    slots: HashMap<MapData, SlotKey, Slot>,
    members: HashMap<MapData, MemberKey, Member>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    xdp_targets: HashMap<MapData, u32, u32>,
}

/// The maps one address family has of its own.
struct FamilyMaps<A> {
    services: HashMap<MapData, FrontendKey<A>, Service<A>>,
    backends: HashMap<MapData, u32, Backend<A>>,
    vips: HashMap<MapData, VipKey<A>, Vip>,
    node_addr_entries: HashMap<MapData, VipKey<A>, Vip>,
    source_ranges: LpmTrie<MapData, SourceRange<A>, u32>,
}

/// The names of one family's maps.
struct FamilyNames {
    services: &'static str,
    backends: &'static str,
    vips: &'static str,
    node_addrs: &'static str,
    source_ranges: &'static str,
}

const V4_NAMES: FamilyNames = FamilyNames {
    services: names::SERVICES,
    backends: names::BACKENDS,
    vips: names::VIPS,
    node_addrs: names::NODE_ADDRS,
    source_ranges: names::SOURCE_RANGES,
};

const V6_NAMES: FamilyNames = FamilyNames {
    services: names::SERVICES6,
    backends: names::BACKENDS6,
    vips: names::VIPS6,
    node_addrs: names::NODE_ADDRS6,
    source_ranges: names::SOURCE_RANGES6,
};

impl<A: Family> FamilyMaps<A>
where
    FrontendKey<A>: Pod,
    Service<A>: Pod,
    Backend<A>: Pod,
    VipKey<A>: Pod,
    SourceRange<A>: Pod,
{
    fn take(ebpf: &mut Ebpf, n: &FamilyNames) -> Result<Self, LoadError> {
        let source_ranges = ebpf
            .take_map(n.source_ranges)
            .ok_or(LoadError::MissingMap {
                name: n.source_ranges,
            })?;
        Ok(FamilyMaps {
            services: take_map(ebpf, n.services)?,
            backends: take_map(ebpf, n.backends)?,
            vips: take_map(ebpf, n.vips)?,
            node_addr_entries: take_map(ebpf, n.node_addrs)?,
            source_ranges: LpmTrie::try_from(source_ranges)
                .map_err(|source| map_err(n.source_ranges, source))?,
        })
    }

    /// Adds what this family's maps hold to `pinned`.
    fn read_into(&self, n: &FamilyNames, pinned: &mut Pinned) -> Result<(), LoadError> {
        for item in self.services.iter() {
            let (k, v) = item.map_err(|source| map_err(n.services, source))?;
            let entry = (family::any_frontend_key(&k), family::any_service(&v));
            pinned.services.push(entry);
        }
        for item in self.backends.iter() {
            let (id, b) = item.map_err(|source| map_err(n.backends, source))?;
            pinned.backends.push((id, family::any_backend(&b)));
        }
        for item in self.vips.iter() {
            let (k, v) = item.map_err(|source| map_err(n.vips, source))?;
            pinned.vips.push((family::any_vip_key(&k), v));
        }
        for item in self.node_addr_entries.iter() {
            let (k, v) = item.map_err(|source| map_err(n.node_addrs, source))?;
            pinned.node_addr_entries.push((family::any_vip_key(&k), v));
        }
        for k in self.source_ranges.keys() {
            let k = k.map_err(|source| map_err(n.source_ranges, source))?;
            pinned.source_ranges.push(family::source_range(&k));
        }
        Ok(())
    }

    /// Executes `op`, one of those on a per-family map (`Op::family`), on this family's.
    fn execute(&mut self, op: &Op) -> Result<(), MapError> {
        match op {
            Op::PutBackend(id, b) => self.backends.insert(id, family::backend(b), 0),
            Op::DeleteBackend(_, id) => self.backends.remove(id),
            Op::PutSourceRange(svc_id, addr, len) => {
                let key = family::source_range_key(*svc_id, *addr, *len);
                self.source_ranges.insert(&key, 1, 0)
            }
            Op::DeleteSourceRange(svc_id, addr, len) => {
                let key = family::source_range_key(*svc_id, *addr, *len);
                self.source_ranges.remove(&key)
            }
            Op::PutService(k, v) => {
                let (k, v) = (family::frontend_key(k), family::service(v));
                self.services.insert(k, v, 0)
            }
            Op::DeleteService(k) => self.services.remove(&family::frontend_key(k)),
            Op::PutVip(k, v) => self.vips.insert(family::vip_key(k), v, 0),
            Op::DeleteVip(k) => self.vips.remove(&family::vip_key(k)),
            Op::PutNodeAddr(k, v) => self.node_addr_entries.insert(family::vip_key(k), v, 0),
            Op::DeleteNodeAddr(k) => self.node_addr_entries.remove(&family::vip_key(k)),
            Op::PutMember(..)
            | Op::DeleteMember(_)
            | Op::PutSlot(..)
            | Op::DeleteSlot(_)
            | Op::PutMaglev(..)
            | Op::PatchMaglev(..)
            | Op::DeleteMaglev(_) => unreachable!("{op:?} is on a map shared by both families"),
        }
    }
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Map capacities overridden (`(map name, max entries)`); tests use small tables.
    pub capacities: Vec<(&'static str, u32)>,
    /// The address IPv4 hairpin flows are source-NATed to (`--hairpin-ip`).
    pub hairpin_addr: Ipv4Addr,
    /// The address IPv6 hairpin flows are source-NATed to (`--hairpin-ip`).
    pub hairpin_addr6: Ipv6Addr,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            capacities: Vec::new(),
            hairpin_addr: Ipv4Addr::from(lb_common::snat::HAIRPIN_ADDR),
            hairpin_addr6: Ipv6Addr::from(lb_common::snat::HAIRPIN_ADDR6),
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`, which stamps the
/// datapath's entries.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The datapath's global holding the hairpin SNAT address (network byte order).
const HAIRPIN_ADDR_GLOBAL: &str = "HAIRPIN_ADDR_BE";
/// The IPv6 one (network byte order).
const HAIRPIN_ADDR6_GLOBAL: &str = "HAIRPIN_ADDR6";

pub struct EbpfDataplane {
    ebpf: Ebpf,
    maps: Maps,
    pin_dir: PathBuf,
    programmed: Programmed,
    /// Set when an apply failed half way: the next apply re-reads the maps first.
    resync: bool,
    /// For service ports that do not choose their algorithm (`--lb-algorithm`).
    default_algorithm: Algorithm,
    /// The network namespace the socket programs serve (this process's), 0 if unknown.
    netns_cookie: u64,
}

impl EbpfDataplane {
    /// Loads the datapath with its maps pinned under `pin_dir`, reusing maps already pinned
    /// there by an earlier run (their connection-tracking entries keep live flows going).
    pub fn load(pin_dir: &Path) -> Result<Self, LoadError> {
        Self::load_with(pin_dir, &LoadOptions::default())
    }

    /// As `load`, with the options the agent's flags set.
    pub fn load_with(pin_dir: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        prepare_pin_dir(pin_dir)?;
        let pins: Vec<(&'static str, PathBuf)> =
            names::ALL.iter().map(|n| (*n, pin_dir.join(n))).collect();
        retire_incompatible_pins(&pins, &options.capacities)?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (name, entries) in &options.capacities {
            loader.map_max_entries(name, *entries);
        }
        let hairpin_be = u32::from_ne_bytes(options.hairpin_addr.octets());
        loader.override_global(HAIRPIN_ADDR_GLOBAL, &hairpin_be, true);
        let hairpin6 = options.hairpin_addr6.octets();
        loader.override_global(HAIRPIN_ADDR6_GLOBAL, &hairpin6, true);
        // The socket programs act only in the namespace the agent runs in; 0 (unknown, a
        // kernel before 5.14) makes them act nowhere, and `attach_socket_lb` says why.
        let netns_cookie = socket_lb::netns_cookie().unwrap_or(0);
        loader.override_global(lb_common::sock::NETNS_COOKIE_GLOBAL, &netns_cookie, true);
        let mut ebpf = loader
            .load(DATAPATH)
            .map_err(|source| LoadError::Load { source })?;
        // Pinned objects are for root only: they describe every service and connection.
        for (_, path) in &pins {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            program_mut::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { source })?;
        }
        xdp_mut(&mut ebpf)?
            .load()
            .map_err(|source| LoadError::Program { source })?;

        let mut maps = Maps {
            v4: FamilyMaps::take(&mut ebpf, &V4_NAMES)?,
            v6: FamilyMaps::take(&mut ebpf, &V6_NAMES)?,
            slots: take_map(&mut ebpf, names::BACKEND_SLOTS)?,
            members: take_map(&mut ebpf, names::MEMBERS)?,
            maglev: {
                let map = ebpf.take_map(names::MAGLEV).ok_or(LoadError::MissingMap {
                    name: names::MAGLEV,
                })?;
                HashOfMaps::try_from(map).map_err(|source| map_err(names::MAGLEV, source))?
            },
            xdp_targets: take_map(&mut ebpf, names::XDP_TARGETS)?,
        };
        // The interfaces an earlier run attached XDP to lost it when that run ended.
        let stale: Vec<u32> = maps.xdp_targets.keys().filter_map(Result::ok).collect();
        for ifindex in stale {
            let _ = maps.xdp_targets.remove(&ifindex);
        }
        let mut dp = EbpfDataplane {
            ebpf,
            maps,
            pin_dir: pin_dir.to_owned(),
            programmed: Programmed::default(),
            resync: false,
            default_algorithm: Algorithm::default(),
            netns_cookie,
        };
        dp.programmed = dp.adopt()?;
        Ok(dp)
    }

    /// Sets the algorithm of service ports that do not choose one, from the next apply on.
    pub fn set_default_algorithm(&mut self, algorithm: Algorithm) {
        self.default_algorithm = algorithm;
    }

    /// Attaches the classifiers at tc ingress and egress of `iface`.
    pub fn attach(&mut self, iface: &str) -> Result<(), LoadError> {
        // Fails harmlessly when the qdisc exists; on kernels with tcx it is not even needed.
        let _ = tc::qdisc_add_clsact(iface);
        for (name, at) in [
            (INGRESS_PROGRAM, TcAttachType::Ingress),
            (EGRESS_PROGRAM, TcAttachType::Egress),
        ] {
            program_mut::<SchedClassifier>(&mut self.ebpf, name)?
                .attach(iface, at)
                .map_err(|source| LoadError::Attach {
                    iface: iface.to_owned(),
                    source,
                })?;
            info!("attached {name} at tc {at:?} of {iface}");
        }
        Ok(())
    }

    /// Loads the socket programs and attaches them to the cgroup v2 directory `cgroup`, for
    /// connections made by processes on this node (see `socket_lb`). They stay attached for
    /// as long as the dataplane lives.
    pub fn attach_socket_lb(
        &mut self,
        cgroup: &Path,
    ) -> Result<socket_lb::Attached, socket_lb::SocketLbError> {
        socket_lb::attach(&mut self.ebpf, cgroup, self.netns_cookie)
    }

    /// The ingress program, for tests that run it with BPF_PROG_TEST_RUN.
    pub fn program(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        program_mut(&mut self.ebpf, INGRESS_PROGRAM)
    }

    /// Attaches the XDP fast path to `iface` in native (driver) mode. Generic mode is not
    /// tried: it would only add work in front of the tc program, which handles the same
    /// traffic on its own.
    pub fn attach_xdp(&mut self, iface: &str) -> Result<(), LoadError> {
        xdp_mut(&mut self.ebpf)?
            .attach(iface, XdpMode::Driver)
            .map_err(|source| LoadError::Attach {
                iface: iface.to_owned(),
                source,
            })?;
        let name = std::ffi::CString::new(iface).unwrap_or_default();
        // SAFETY: a NUL-terminated name; 0 means no such interface.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => warn!("{iface} has no interface index: the XDP fast path will not redirect to it"),
            ifindex => self.add_xdp_target(ifindex)?,
        }
        info!("attached {XDP_PROGRAM} (native XDP) to {iface}");
        Ok(())
    }

    /// Lets the XDP fast path redirect to interface `ifindex` (one that runs it).
    pub fn add_xdp_target(&mut self, ifindex: u32) -> Result<(), LoadError> {
        self.maps
            .xdp_targets
            .insert(ifindex, 1, 0)
            .map_err(|source| map_err(names::XDP_TARGETS, source))
    }

    /// Stops the XDP fast path redirecting to interface `ifindex` (it no longer runs XDP).
    pub fn remove_xdp_target(&mut self, ifindex: u32) -> Result<(), LoadError> {
        match self.maps.xdp_targets.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_err(names::XDP_TARGETS, source)),
        }
    }

    /// The XDP program, for tests that run it with BPF_PROG_TEST_RUN.
    pub fn xdp_program(&mut self) -> Result<&mut Xdp, LoadError> {
        xdp_mut(&mut self.ebpf)
    }

    /// The egress program, for tests that run it with BPF_PROG_TEST_RUN.
    pub fn egress_program(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        program_mut(&mut self.ebpf, EGRESS_PROGRAM)
    }

    /// Every program in the datapath object with what the kernel says about it (verified
    /// instruction count, size); `Err(ProgramError::NotLoaded)` for one not loaded.
    pub fn program_infos(
        &self,
    ) -> impl Iterator<Item = (&str, Result<ProgramInfo, aya::programs::ProgramError>)> {
        self.ebpf.programs().map(|(name, p)| (name, p.info()))
    }

    /// The datapath's counters, summed over CPUs, indexed by `lb_common::stats` reason.
    pub fn counters(&self) -> Result<Vec<lb_common::Counter>, LoadError> {
        let map = self
            .ebpf
            .map(names::STATS)
            .ok_or(LoadError::MissingMap { name: names::STATS })?;
        let counters = aya::maps::PerCpuArray::try_from(map)
            .map_err(|source| map_err(names::STATS, source))?;
        inspect::sum_counters(&counters).map_err(|source| map_err(names::STATS, source))
    }

    /// The IPv4 connection-tracking map, for inspection and for tests that age entries.
    pub fn conntrack(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtEntry>, LoadError> {
        self.conntrack_of(names::CONNTRACK)
    }

    /// The IPv6 connection-tracking map.
    pub fn conntrack6(
        &mut self,
    ) -> Result<HashMap<&mut MapData, CtKey<V6>, CtEntry<V6>>, LoadError> {
        self.conntrack_of(names::CONNTRACK6)
    }

    fn conntrack_of<A: Family>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, CtKey<A>, CtEntry<A>>, LoadError>
    where
        CtKey<A>: Pod,
        CtEntry<A>: Pod,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(LoadError::MissingMap { name })?;
        HashMap::try_from(map).map_err(|source| map_err(name, source))
    }

    /// Deletes the connection-tracking entries of flows that are over, in both families, and
    /// returns how many (see `conntrack_gc`; the agent runs that on a thread of its own).
    pub fn collect_garbage(&mut self) -> Result<usize, LoadError> {
        let v4 = conntrack_gc::collect(&mut self.conntrack()?)
            .map_err(|source| map_err(names::CONNTRACK, source))?;
        let v6 = conntrack_gc::collect(&mut self.conntrack6()?)
            .map_err(|source| map_err(names::CONNTRACK6, source))?;
        Ok(v4.deleted + v6.deleted)
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Removes the pins (the maps go away with the last user). For `--cleanup`.
    pub fn remove_pins(pin_dir: &Path) -> std::io::Result<()> {
        for name in names::ALL {
            match std::fs::remove_file(pin_dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        match std::fs::remove_dir(pin_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Reads what the pinned maps of both families hold, for the first plan to start from.
    fn adopt(&self) -> Result<Programmed, LoadError> {
        let m = &self.maps;
        let mut pinned = Pinned {
            slots: m
                .slots
                .iter()
                .collect::<Result<_, _>>()
                .map_err(|source| map_err(names::BACKEND_SLOTS, source))?,
            members: m
                .members
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| map_err(names::MEMBERS, source))?,
            maglev: m
                .maglev
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| map_err(names::MAGLEV, source))?,
            ..Pinned::default()
        };
        m.v4.read_into(&V4_NAMES, &mut pinned)?;
        m.v6.read_into(&V6_NAMES, &mut pinned)?;
        if !pinned.services.is_empty() {
            info!(
                "adopting pinned maps in {}: {} frontends, {} backends from an earlier run",
                self.pin_dir.display(),
                pinned.services.len(),
                pinned.backends.len()
            );
        }
        Ok(Programmed::adopt(pinned))
    }

    fn execute(&mut self, op: &Op) -> Result<(), MapError> {
        let m = &mut self.maps;
        let result = match (op.family(), op) {
            (Some(IpFamily::V4), _) => m.v4.execute(op),
            (Some(IpFamily::V6), _) => m.v6.execute(op),
            (None, Op::PutMember(k, v)) => m.members.insert(k, v, 0),
            (None, Op::PutMaglev(svc_id, table)) => {
                // A fresh table, filled before the service can see it.
                let mut inner = Array::<MapData, u32>::create(maglev::TABLE_SIZE, 0)?;
                for (i, id) in (0u32..).zip(table) {
                    inner.set(i, id, 0)?;
                }
                m.maglev.insert(svc_id, &inner, 0)
            }
            (None, Op::PatchMaglev(svc_id, entries)) => {
                // In place: each write swaps one valid backend id for another.
                let mut inner = m.maglev.get(svc_id, 0)?;
                entries.iter().try_for_each(|(i, id)| inner.set(*i, id, 0))
            }
            (None, Op::DeleteMaglev(svc_id)) => m.maglev.remove(svc_id),
            (None, Op::PutSlot(k, v)) => m.slots.insert(k, v, 0),
            (None, Op::DeleteSlot(k)) => m.slots.remove(k),
            (None, Op::DeleteMember(k)) => m.members.remove(k),
            (None, _) => unreachable!("{op:?} is on a per-family map"),
        };
        match result {
            // Deleting what is already gone is the desired outcome.
            Err(MapError::KeyNotFound) if op.is_delete() => Ok(()),
            r => r,
        }
    }
}

impl Dataplane for EbpfDataplane {
    fn needs_retry(&self) -> bool {
        self.resync
    }

    /// Removes the pins: the maps go when the agent, their last user, exits.
    fn cleanup(&mut self) -> anyhow::Result<()> {
        EbpfDataplane::remove_pins(&self.pin_dir)
            .with_context(|| format!("removing the pins under {}", self.pin_dir.display()))
    }

    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
        if self.resync {
            self.programmed = self.adopt()?;
            self.resync = false;
        }
        let plan = self.programmed.plan(desired, self.default_algorithm);
        let mut report = ApplyReport::default();
        for op in &plan.ops {
            if let Err(e) = self.execute(op) {
                self.resync = true;
                anyhow::bail!("map update {op:?} failed: {e}; will re-read the maps and retry on the next sync");
            }
            if op.is_delete() {
                report.deletes += 1;
            } else {
                report.writes += 1;
            }
        }
        self.programmed = plan.next;
        report.service_ports = self.programmed.service_ports();
        report.backends = self.programmed.backend_count();
        Ok(report)
    }
}

/// Removes pinned maps whose layout (key size, value size, capacity) differs from what this
/// datapath declares, so the loader creates them afresh: aya would otherwise reuse a pinned
/// map of an older layout as it is, and the program would misread it. Only that map's entries
/// are lost; every other map is still adopted.
fn retire_incompatible_pins(
    pins: &[(&'static str, PathBuf)],
    capacities: &[(&'static str, u32)],
) -> Result<(), LoadError> {
    let object = aya_obj::Object::parse(DATAPATH).map_err(|e| LoadError::Object {
        reason: e.to_string(),
    })?;
    for (name, path) in pins {
        if !path.exists() {
            continue;
        }
        let want = object
            .maps
            .get(*name)
            .ok_or(LoadError::MissingMap { name })?;
        let entries = capacities
            .iter()
            .find(|(n, _)| n == name)
            .map_or(want.max_entries(), |(_, e)| *e);
        let want = (want.key_size(), want.value_size(), entries);
        let info = aya::maps::MapInfo::from_pin(path).map_err(|source| map_err(name, source))?;
        let have = (info.key_size(), info.value_size(), info.max_entries());
        if have != want {
            warn!(
                "pinned map {} has key/value/capacity {have:?}, this datapath needs {want:?}: replacing it, its entries are lost",
                path.display()
            );
            std::fs::remove_file(path).map_err(|source| LoadError::PinDir {
                dir: path.clone(),
                source,
            })?;
        }
    }
    Ok(())
}

fn prepare_pin_dir(dir: &Path) -> Result<(), LoadError> {
    std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
        dir: dir.to_owned(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(LoadError::NotBpffs {
            dir: dir.to_owned(),
        });
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    Ok(())
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

fn xdp_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    program_mut(ebpf, XDP_PROGRAM)
}

/// The datapath's program `name`, as the program type `P` it is.
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| LoadError::Program { source })
}

fn take_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, LoadError> {
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap { name })?;
    HashMap::try_from(map).map_err(|source| map_err(name, source))
}

fn map_err(name: &'static str, source: MapError) -> LoadError {
    LoadError::Map { name, source }
}

#[cfg(test)]
mod tests {
    //! The dataplane against the kernel: a dual-stack desired state written to freshly loaded
    //! maps and read back. Root only (`cargo test -p lb-userspace --lib -- --ignored`); the
    //! programs themselves are the datapath fixtures' business.

    use std::collections::BTreeSet;
    use std::net::IpAddr;

    use super::*;
    use crate::model::{Endpoint, External, Frontend, Protocol, ServicePort, ServicePortName};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn endpoints(addrs: &[&str]) -> BTreeSet<Endpoint> {
        addrs
            .iter()
            .map(|a| Endpoint {
                addr: ip(a),
                port: 8080,
            })
            .collect()
    }

    /// One dual-stack TCP port: ClusterIPs 10.96.0.10 and fd00:96::10, a NodePort on the
    /// node's IPv6 address, a LoadBalancer IP of each family and IPv6 source ranges; endpoints
    /// of both families, one of them the node's own IPv6 address.
    fn dual_stack() -> DesiredState {
        let fe = |addr: &str, port| Frontend {
            addr: ip(addr),
            port,
            protocol: Protocol::Tcp,
        };
        let ext = |snat: &str, load_balancer| External {
            snat_addr: ip(snat),
            load_balancer,
        };
        let port = ServicePort {
            frontends: [fe("10.96.0.10", 80), fe("fd00:96::10", 80)].into(),
            external_frontends: [
                (fe("2001:db8::10", 30080), ext("2001:db8::10", false)),
                (fe("2001:db8:ee::9", 80), ext("2001:db8::10", true)),
                (fe("198.51.100.9", 80), ext("192.168.0.10", true)),
            ]
            .into(),
            source_ranges: [(ip("2001:db8:aaaa::"), 48)].into(),
            endpoints: endpoints(&["10.0.0.1", "10.0.0.2", "fd00:1::1", "2001:db8::10"]),
            ..ServicePort::default()
        };
        let name = ServicePortName {
            namespace: "default".into(),
            name: "web".into(),
            port: String::new(),
            protocol: Protocol::Tcp,
        };
        DesiredState {
            services: [(name, port)].into(),
            node_addrs: [ip("192.168.0.10"), ip("2001:db8::10")].into(),
            ..DesiredState::default()
        }
    }

    #[test]
    #[ignore = "needs root: loads the datapath and pins its maps"]
    fn a_dual_stack_state_lands_in_each_familys_maps_and_is_adopted_after_a_restart() {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "loading BPF programs needs root"
        );
        let dir = PathBuf::from(format!("/sys/fs/bpf/lbt-{}-dual-stack", std::process::id()));
        let _ = EbpfDataplane::remove_pins(&dir);
        let options = LoadOptions {
            capacities: vec![(names::CONNTRACK, 1024), (names::CONNTRACK6, 1024)],
            hairpin_addr6: "fd00:ffff::1".parse().unwrap(),
            ..LoadOptions::default()
        };
        let mut dp = EbpfDataplane::load_with(&dir, &options).expect("load");
        let desired = dual_stack();
        dp.apply(&desired).expect("apply");

        let snap = inspect::read(&dir).expect("reading the maps back");
        let backends = |addr: &str, port| {
            let mut got: Vec<String> = (snap.backends_of(ip(addr), port, lb_common::proto::TCP))
                .unwrap_or_else(|| panic!("no frontend {addr}:{port}"))
                .iter()
                .map(|(a, _)| a.to_string())
                .collect();
            got.sort();
            got
        };
        assert_eq!(backends("10.96.0.10", 80), ["10.0.0.1", "10.0.0.2"]);
        let six = ["2001:db8::10", "fd00:1::1"];
        assert_eq!(backends("fd00:96::10", 80), six, "IPv6 endpoints only");
        assert_eq!(backends("2001:db8::10", 30080), six);
        assert_eq!(backends("198.51.100.9", 80), ["10.0.0.1", "10.0.0.2"]);
        let entry = |addr: &str, port: u16| {
            let key = FrontendKey {
                addr: ip(addr),
                port_be: port.to_be(),
                proto: lb_common::proto::TCP,
                scope: lb_common::SCOPE_ALL,
            };
            snap.frontends[&key].0
        };
        let (c4, c6) = (entry("10.96.0.10", 80), entry("fd00:96::10", 80));
        assert_ne!(c4.svc_id, c6.svc_id);
        let lb6 = entry("2001:db8:ee::9", 80);
        assert_eq!(lb6.svc_id, c6.svc_id);
        assert_eq!(lb6.snat_addr, ip("2001:db8::10"));
        assert_ne!(lb6.flags & lb_common::SVC_F_SOURCE_RANGES, 0);
        let lb4 = entry("198.51.100.9", 80);
        assert_eq!(
            lb4.flags & lb_common::SVC_F_SOURCE_RANGES,
            0,
            "IPv6 ranges leave IPv4 open"
        );
        assert_eq!(
            snap.source_ranges[&c6.svc_id],
            [(ip("2001:db8:aaaa::"), 48)]
        );
        let node_addrs: BTreeSet<IpAddr> = snap.node_addrs.iter().copied().collect();
        assert_eq!(node_addrs, desired.node_addrs);
        let host = (snap.frontends.values())
            .flat_map(|(_, bs)| bs.iter().flatten())
            .find(|b| b.addr == ip("2001:db8::10"))
            .expect("the node's own address as a backend");
        assert_eq!(host.state, lb_common::BACKEND_HOST);
        // Straight from the IPv6 map, as the datapath will see it.
        let services6: HashMap<_, FrontendKey<V6>, Service<V6>> =
            aya::maps::Map::from_map_data(MapData::from_pin(dir.join(names::SERVICES6)).unwrap())
                .unwrap()
                .try_into()
                .unwrap();
        assert_eq!(services6.keys().count(), 3);
        let rendered = snap.render();
        assert!(rendered.contains("[fd00:96::10]:80/TCP"), "{rendered}");

        // A restart adopts both families: nothing to write.
        drop(dp);
        let mut dp = EbpfDataplane::load_with(&dir, &options).expect("load again");
        let report = dp.apply(&desired).expect("apply again");
        assert_eq!((report.writes, report.deletes), (0, 0), "{report:?}");

        // Finished IPv6 flows are collected too.
        let flow = CtKey::<V6> {
            saddr: ip_v6("2001:db8:1::2"),
            daddr: ip_v6("fd00:96::10"),
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: lb_common::proto::UDP,
            _pad: [0; 3],
        };
        dp.conntrack6()
            .unwrap()
            .insert(flow, CtEntry::default(), 0)
            .unwrap();
        assert_eq!(dp.collect_garbage().unwrap(), 1);

        // And an empty state empties both.
        dp.apply(&DesiredState::default()).expect("apply empty");
        let snap = inspect::read(&dir).expect("reading the maps back");
        assert!(snap.frontends.is_empty() && snap.node_addrs.is_empty());
        drop(dp);
        EbpfDataplane::remove_pins(&dir).expect("cleanup");
    }

    fn ip_v6(s: &str) -> V6 {
        s.parse::<std::net::Ipv6Addr>().unwrap().octets()
    }
}
