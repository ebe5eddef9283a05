//! The eBPF dataplane: loads the embedded datapath, pins its maps, attaches it at tc ingress,
//! and keeps the maps equal to the desired state by executing `plan::Plan`s.

pub mod conntrack_gc;
pub mod inspect;
pub mod plan;
pub mod socket_lb;

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie, Array, HashMap, HashOfMaps, LpmTrie, MapData, MapError},
    programs::{tc, ProgramInfo, SchedClassifier, TcAttachType, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    maglev, names, Backend, FrontendKey, Member, MemberKey, Service, Slot, SlotKey, SourceRange,
    Vip, VipKey,
};
use log::{info, warn};

use super::{ApplyReport, Dataplane};
use crate::model::{Algorithm, DesiredState};
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
    services: HashMap<MapData, FrontendKey, Service>,
    slots: HashMap<MapData, SlotKey, Slot>,
    members: HashMap<MapData, MemberKey, Member>,
    maglev: HashOfMaps<MapData, u32, Array<MapData, u32>>,
    backends: HashMap<MapData, u32, Backend>,
    vips: HashMap<MapData, VipKey, Vip>,
    node_addr_entries: HashMap<MapData, VipKey, Vip>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    xdp_targets: HashMap<MapData, u32, u32>,
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Map capacities overridden (`(map name, max entries)`); tests use small tables.
    pub capacities: Vec<(&'static str, u32)>,
    /// The address hairpin flows are source-NATed to (`--hairpin-ip`).
    pub hairpin_addr: Ipv4Addr,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            capacities: Vec::new(),
            hairpin_addr: Ipv4Addr::from(lb_common::snat::HAIRPIN_ADDR),
        }
    }
}

/// The `SOURCE_RANGES` key of range `addr/len` of service `svc_id` (see `SourceRange`).
fn source_range_key(svc_id: u32, addr: Ipv4Addr, len: u8) -> lpm_trie::Key<SourceRange> {
    let data = SourceRange {
        svc_id_be: svc_id.to_be(),
        addr: addr.octets(),
    };
    lpm_trie::Key::new(32 + u32::from(len), data)
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
            services: take_map(&mut ebpf, names::SERVICES)?,
            slots: take_map(&mut ebpf, names::BACKEND_SLOTS)?,
            members: take_map(&mut ebpf, names::MEMBERS)?,
            maglev: {
                let map = ebpf.take_map(names::MAGLEV).ok_or(LoadError::MissingMap {
                    name: names::MAGLEV,
                })?;
                HashOfMaps::try_from(map).map_err(|source| map_err(names::MAGLEV, source))?
            },
            backends: take_map(&mut ebpf, names::BACKENDS)?,
            vips: take_map(&mut ebpf, names::VIPS)?,
            node_addr_entries: take_map(&mut ebpf, names::NODE_ADDRS)?,
            source_ranges: {
                let map = ebpf
                    .take_map(names::SOURCE_RANGES)
                    .ok_or(LoadError::MissingMap {
                        name: names::SOURCE_RANGES,
                    })?;
                LpmTrie::try_from(map).map_err(|source| map_err(names::SOURCE_RANGES, source))?
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

    /// The connection-tracking map, for inspection and for tests that age entries.
    pub fn conntrack(
        &mut self,
    ) -> Result<HashMap<&mut MapData, lb_common::CtKey, lb_common::CtEntry>, LoadError> {
        let map = self
            .ebpf
            .map_mut(names::CONNTRACK)
            .ok_or(LoadError::MissingMap {
                name: names::CONNTRACK,
            })?;
        HashMap::try_from(map).map_err(|source| map_err(names::CONNTRACK, source))
    }

    /// Deletes the connection-tracking entries of flows that are over, and returns how many
    /// (see `conntrack_gc`; the agent runs that on a thread of its own).
    pub fn collect_garbage(&mut self) -> Result<usize, LoadError> {
        let mut ct = self.conntrack()?;
        conntrack_gc::collect(&mut ct).map_err(|source| map_err(names::CONNTRACK, source))
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

    /// Reads what the pinned maps hold, for the first plan to start from.
    fn adopt(&self) -> Result<Programmed, LoadError> {
        fn all<K, V>(
            name: &'static str,
            items: impl Iterator<Item = Result<(K, V), MapError>>,
        ) -> Result<Vec<(K, V)>, LoadError> {
            items
                .collect::<Result<_, _>>()
                .map_err(|source| map_err(name, source))
        }
        let m = &self.maps;
        let keys = |name, keys: aya::maps::MapKeys<'_, _>| {
            keys.collect::<Result<Vec<_>, _>>()
                .map_err(|source| map_err(name, source))
        };
        let pinned = Pinned {
            services: all(names::SERVICES, m.services.iter())?,
            slots: all(names::BACKEND_SLOTS, m.slots.iter())?,
            members: keys(names::MEMBERS, m.members.keys())?,
            maglev: m
                .maglev
                .keys()
                .collect::<Result<_, _>>()
                .map_err(|source| map_err(names::MAGLEV, source))?,
            backends: all(names::BACKENDS, m.backends.iter())?,
            vips: all(names::VIPS, m.vips.iter())?,
            node_addr_entries: all(names::NODE_ADDRS, m.node_addr_entries.iter())?,
            source_ranges: m
                .source_ranges
                .keys()
                .map(|k| {
                    let k = k?;
                    let (d, len) = (k.data(), k.prefix_len().saturating_sub(32) as u8);
                    Ok((u32::from_be(d.svc_id_be), Ipv4Addr::from(d.addr), len))
                })
                .collect::<Result<_, MapError>>()
                .map_err(|source| map_err(names::SOURCE_RANGES, source))?,
        };
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
        let result = match op.clone() {
            Op::PutBackend(id, b) => m.backends.insert(id, b, 0),
            Op::PutMember(k, v) => m.members.insert(k, v, 0),
            Op::PutMaglev(svc_id, table) => {
                // A fresh table, filled before the service can see it.
                let mut inner = Array::<MapData, u32>::create(maglev::TABLE_SIZE, 0)?;
                for (i, id) in (0u32..).zip(&table) {
                    inner.set(i, id, 0)?;
                }
                m.maglev.insert(svc_id, &inner, 0)
            }
            Op::PatchMaglev(svc_id, entries) => {
                // In place: each write swaps one valid backend id for another.
                let mut inner = m.maglev.get(&svc_id, 0)?;
                entries.iter().try_for_each(|(i, id)| inner.set(*i, id, 0))
            }
            Op::DeleteMaglev(svc_id) => m.maglev.remove(&svc_id),
            Op::PutSourceRange(svc_id, addr, len) => {
                m.source_ranges
                    .insert(&source_range_key(svc_id, addr, len), 1, 0)
            }
            Op::DeleteSourceRange(svc_id, addr, len) => {
                m.source_ranges.remove(&source_range_key(svc_id, addr, len))
            }
            Op::PutSlot(k, v) => m.slots.insert(k, v, 0),
            Op::PutService(k, v) => m.services.insert(k, v, 0),
            Op::PutVip(k, v) => m.vips.insert(k, v, 0),
            Op::DeleteVip(k) => m.vips.remove(&k),
            Op::PutNodeAddr(k, v) => m.node_addr_entries.insert(k, v, 0),
            Op::DeleteNodeAddr(k) => m.node_addr_entries.remove(&k),
            Op::DeleteService(k) => m.services.remove(&k),
            Op::DeleteSlot(k) => m.slots.remove(&k),
            Op::DeleteMember(k) => m.members.remove(&k),
            Op::DeleteBackend(id) => m.backends.remove(&id),
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
