//! The pinned maps. Types and capacities come from `lb_common`, the contract with the agent.

use aya_ebpf::{
    btf_maps::{Array, HashMap, HashOfMaps, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    capacity, maglev, stats::REASONS, Affinity, AffinityKey, Backend, Counter, CtEntry, CtKey,
    FragKey, FragPorts, FrontendKey, Member, MemberKey, Service, Slot, SlotKey, SourceRange, Vip,
    VipKey, V6,
};

/// Frontend (VIP, port, protocol) -> service port: the first lookup for a new flow.
#[btf_map]
pub static SERVICES: HashMap<FrontendKey, Service, { capacity::SERVICES as usize }> =
    HashMap::new();

/// (service id, slot) -> backend id; slots `1..=backend_count` of each service.
#[btf_map]
pub static BACKEND_SLOTS: HashMap<SlotKey, Slot, { capacity::BACKEND_SLOTS as usize }> =
    HashMap::new();

/// Backend id -> endpoint address and port.
#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { capacity::BACKENDS as usize }> = HashMap::new();

/// Service id -> its Maglev lookup table (backend ids), for services using Maglev.
#[btf_map]
pub static MAGLEV: HashOfMaps<
    u32,
    Array<u32, { maglev::TABLE_SIZE as usize }>,
    { capacity::MAGLEV as usize },
> = HashOfMaps::new();

/// loadBalancerSourceRanges: (service id, client range) for frontends with
/// `SVC_F_SOURCE_RANGES`.
#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

/// (service id, backend id) pairs: which backends currently serve which service.
#[btf_map]
pub static MEMBERS: HashMap<MemberKey, Member, { capacity::MEMBERS as usize }> = HashMap::new();

/// Addresses that are frontends, to recognise packets for a service that carry no ports.
#[btf_map]
pub static VIPS: HashMap<VipKey, Vip, { capacity::VIPS as usize }> = HashMap::new();

/// Connection tracking, both directions of every translated flow; LRU so a full table
/// evicts the coldest flows instead of refusing new ones.
#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

/// Fragmented datagrams: the first fragment's ports, for the later ones. LRU: a datagram
/// whose fragments never all arrive is forgotten in time.
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// Interface index -> 1 for the interfaces the agent attached the XDP program to: the only
/// ones the XDP fast path redirects to (a driver takes redirected frames only when it runs XDP
/// itself). Others are left to tc.
#[btf_map]
pub static XDP_TARGETS: HashMap<u32, u32, { capacity::XDP_TARGETS as usize }> = HashMap::new();

/// This node's addresses (value unused, 1), keyed like `VIPS`: the egress program looks up
/// conntrack only for packets from them, the replies of hostNetwork endpoints
/// (`BACKEND_HOST`).
#[btf_map]
pub static NODE_ADDRS: HashMap<VipKey, Vip, { capacity::NODE_ADDRS as usize }> = HashMap::new();

/// ClientIP session affinity: (client, service) -> the backend its connections go to.
#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

// The IPv6 twins of the maps above that hold addresses: the same contract, `V6` addresses.

#[btf_map]
pub static SERVICES6: HashMap<FrontendKey<V6>, Service<V6>, { capacity::SERVICES as usize }> =
    HashMap::new();

#[btf_map]
pub static BACKENDS6: HashMap<u32, Backend<V6>, { capacity::BACKENDS as usize }> = HashMap::new();

#[btf_map]
pub static SOURCE_RANGES6: LpmTrie<SourceRange<V6>, u32, { capacity::SOURCE_RANGES as usize }> =
    LpmTrie::new();

#[btf_map]
pub static VIPS6: HashMap<VipKey<V6>, Vip, { capacity::VIPS as usize }> = HashMap::new();

#[btf_map]
pub static CONNTRACK6: LruHashMap<CtKey<V6>, CtEntry<V6>, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

#[btf_map]
pub static FRAGMENTS6: LruHashMap<FragKey<V6>, FragPorts, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

#[btf_map]
pub static NODE_ADDRS6: HashMap<VipKey<V6>, Vip, { capacity::NODE_ADDRS as usize }> =
    HashMap::new();

#[btf_map]
pub static AFFINITY6: LruHashMap<AffinityKey<V6>, Affinity, { capacity::AFFINITY as usize }> =
    LruHashMap::new();

/// Per-CPU working memory (`family::Scratch`); internal, not pinned.
#[btf_map]
pub static SCRATCH: PerCpuArray<crate::family::Scratch<lb_common::V4>, 1> = PerCpuArray::new();
#[btf_map]
pub static SCRATCH6: PerCpuArray<crate::family::Scratch<V6>, 1> = PerCpuArray::new();

/// Per-CPU packet and byte counters by `lb_common::stats` reason.
#[btf_map]
pub static STATS: PerCpuArray<Counter, { REASONS as usize }> = PerCpuArray::new();

// Socket-level load balancing (the cgroup programs in `sock`).
use lb_common::sock::{self, NetnsAffinityKey, RevNatEntry, RevNatKey};

/// `SOCK_REVNAT` for IPv6 sockets.
#[btf_map]
pub static SOCK_REVNAT6: LruHashMap<
    RevNatKey<V6>,
    RevNatEntry<V6>,
    { sock::capacity::SOCK_REVNAT as usize },
> = LruHashMap::new();

/// (socket cookie, backend) -> the frontend the socket addressed, to rewrite what recvmsg and
/// getpeername report back to it; LRU, so closed sockets' entries age out.
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<
    RevNatKey,
    RevNatEntry,
    { sock::capacity::SOCK_REVNAT as usize },
> = LruHashMap::new();

/// ClientIP session affinity of node-originated connections: (netns, service) -> backend.
#[btf_map]
pub static SOCK_AFFINITY: LruHashMap<
    NetnsAffinityKey,
    Affinity,
    { sock::capacity::SOCK_AFFINITY as usize },
> = LruHashMap::new();

/// Per-CPU counts of socket-program runs by `lb_common::sock::stats` reason.
#[btf_map]
pub static SOCK_STATS: PerCpuArray<u64, { sock::stats::REASONS as usize }> = PerCpuArray::new();
