//! Keys and values of the pinned BPF maps, and the names they are pinned under.
//!
//! The datapath looks a packet up in this order: `CONNTRACK` (is this a known flow, either
//! direction?), then `SERVICES` (is the destination a frontend?), then `BACKEND_SLOTS` and
//! `BACKENDS` to pick and resolve a backend for a new flow.
//!
//! IPv4 and IPv6 share one datapath and one layout: every type holding an address is generic
//! over it (`A = V4` or `V6`), and each family has its own instance of the maps keyed or valued
//! by one (`SERVICES` and `SERVICES6`, ...). Maps of ids only (`BACKEND_SLOTS`, `MEMBERS`,
//! `MAGLEV`) are shared: service and backend ids are unique across families.

/// An IPv4 address, network byte order.
pub type V4 = [u8; 4];
/// An IPv6 address, network byte order.
pub type V6 = [u8; 16];

/// What the datapath needs of an address type, whichever the family.
pub trait Addr:
    Copy + Default + PartialEq + Eq + core::hash::Hash + PartialOrd + Ord + core::fmt::Debug + 'static
{
    /// The address as bytes, network order.
    fn bytes(&self) -> &[u8];
    /// Mixes the address into a running hash word by word (`maglev::flow_index`).
    fn mix_into(&self, h: u32, mix: fn(u32, u32) -> u32) -> u32;
    /// An address whose last four bytes are `w` (native order) and the rest zero: stands in
    /// for a socket's unknown source address in a hashed tuple.
    fn from_low_word(w: u32) -> Self;
}

impl Addr for V4 {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        self
    }
    #[inline(always)]
    fn mix_into(&self, h: u32, mix: fn(u32, u32) -> u32) -> u32 {
        mix(h, u32::from_ne_bytes(*self))
    }
    #[inline(always)]
    fn from_low_word(w: u32) -> V4 {
        w.to_ne_bytes()
    }
}

impl Addr for V6 {
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        self
    }
    #[inline(always)]
    fn mix_into(&self, mut h: u32, mix: fn(u32, u32) -> u32) -> u32 {
        let mut i = 0;
        while i < 16 {
            h = mix(
                h,
                u32::from_ne_bytes([self[i], self[i + 1], self[i + 2], self[i + 3]]),
            );
            i += 4;
        }
        h
    }
    #[inline(always)]
    fn from_low_word(w: u32) -> V6 {
        let mut a = [0; 16];
        a[12..].copy_from_slice(&w.to_ne_bytes());
        a
    }
}

/// Names the maps are declared and pinned under (`<bpffs dir>/<NAME>`).
pub mod names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MEMBERS: &str = "MEMBERS";
    pub const VIPS: &str = "VIPS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const AFFINITY: &str = "AFFINITY";
    pub const MAGLEV: &str = "MAGLEV";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const XDP_TARGETS: &str = "XDP_TARGETS";
    pub const NODE_ADDRS: &str = "NODE_ADDRS";
    pub const STATS: &str = "STATS";
    // The IPv6 twins of the maps keyed or valued by an address.
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKENDS6: &str = "BACKENDS6";
    pub const SOURCE_RANGES6: &str = "SOURCE_RANGES6";
    pub const VIPS6: &str = "VIPS6";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const FRAGMENTS6: &str = "FRAGMENTS6";
    pub const NODE_ADDRS6: &str = "NODE_ADDRS6";
    pub const AFFINITY6: &str = "AFFINITY6";
    /// Every map the agent pins, in the order it creates and adopts them.
    pub const ALL: [&str; 25] = [
        SERVICES,
        BACKEND_SLOTS,
        BACKENDS,
        MEMBERS,
        MAGLEV,
        SOURCE_RANGES,
        VIPS,
        CONNTRACK,
        FRAGMENTS,
        XDP_TARGETS,
        NODE_ADDRS,
        AFFINITY,
        STATS,
        SERVICES6,
        BACKENDS6,
        SOURCE_RANGES6,
        VIPS6,
        CONNTRACK6,
        FRAGMENTS6,
        NODE_ADDRS6,
        AFFINITY6,
        // Socket-level load balancing (`crate::sock`).
        crate::sock::names::SOCK_REVNAT,
        crate::sock::names::SOCK_REVNAT6,
        crate::sock::names::SOCK_AFFINITY,
        crate::sock::names::SOCK_STATS,
    ];
}

/// Default capacities. The agent may override them at load time (`EbpfLoader::set_max_entries`).
pub mod capacity {
    /// Frontends (VIP, port, protocol) across all services.
    pub const SERVICES: u32 = 131_072;
    /// Backend slots summed over all services.
    pub const BACKEND_SLOTS: u32 = 524_288;
    /// Distinct backends (address, port, protocol).
    pub const BACKENDS: u32 = 131_072;
    /// (service, backend) memberships; one per backend slot.
    pub const MEMBERS: u32 = BACKEND_SLOTS;
    /// Distinct frontend addresses.
    pub const VIPS: u32 = 65_536;
    /// Tracked connections; two entries (forward and reverse) per connection.
    pub const CONNTRACK: u32 = 262_144;
    /// Remembered (client, service) -> backend choices for ClientIP session affinity.
    pub const AFFINITY: u32 = 65_536;
    /// Services using Maglev (each has a `maglev::TABLE_SIZE` table of its own).
    pub const MAGLEV: u32 = 16_384;
    /// loadBalancerSourceRanges entries summed over all services.
    pub const SOURCE_RANGES: u32 = 16_384;
    /// Fragmented datagrams in flight whose first fragment was translated.
    pub const FRAGMENTS: u32 = 8_192;
    /// Interfaces the XDP fast path may redirect to.
    pub const XDP_TARGETS: u32 = 256;
    /// This node's addresses.
    pub const NODE_ADDRS: u32 = 1_024;
}

/// Key of `SERVICES`: a frontend the datapath answers for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey<A = V4> {
    /// Frontend address (a ClusterIP), network byte order.
    pub addr: A,
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// IP protocol number (`proto::TCP`, `proto::UDP`).
    pub proto: u8,
    /// Which clients the entry is for: `SCOPE_ALL`, or `SCOPE_HOST` for the node's own.
    pub scope: u8,
}

/// `FrontendKey::scope`: the frontend serves every client.
pub const SCOPE_ALL: u8 = 0;
/// `FrontendKey::scope`: the entry processes on the node itself (the socket programs) use,
/// where it differs from `SCOPE_ALL`'s: an externalTrafficPolicy Local frontend, which the
/// node's own connections reach through every endpoint, as kube-proxy sends them.
pub const SCOPE_HOST: u8 = 1;

/// Value of `SERVICES`: the service port behind a frontend and how to choose its backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service<A = V4> {
    /// Stable id of the service port; keys its `BACKEND_SLOTS`.
    pub svc_id: u32,
    /// Backends in slots `1..=backend_count`; 0 means reject (no endpoints).
    pub backend_count: u16,
    /// `SVC_F_*` bits.
    pub flags: u8,
    /// `ALG_*`: how a new flow picks its slot.
    pub algorithm: u8,
    /// ClientIP session-affinity timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_s: u32,
    /// With `SVC_F_SNAT`: the node address new flows' source is rewritten to.
    pub snat_addr: A,
}

/// `Service::flags`: the frontend is a node or external address (NodePort, externalIP,
/// LoadBalancer ingress). Translated packets of its flows are routed by the datapath itself
/// (FIB lookup and redirect), because after translation one end may be a local address, which
/// the kernel's input path would drop as a martian.
pub const SVC_F_EXTERNAL: u8 = 1;
/// `Service::flags`: source-NAT new flows to `Service::snat_addr`, so replies return through
/// this node (externalTrafficPolicy: Cluster).
pub const SVC_F_SNAT: u8 = 2;
/// `Service::flags`: with no backends, drop instead of reject: the service has endpoints, just
/// none on this node (externalTrafficPolicy or internalTrafficPolicy Local), as kube-proxy does.
pub const SVC_F_DROP_WHEN_EMPTY: u8 = 4;
/// `Service::flags`: new flows are accepted only from clients in the service's
/// `SOURCE_RANGES` (a LoadBalancer frontend with `loadBalancerSourceRanges`).
pub const SVC_F_SOURCE_RANGES: u8 = 8;

/// Data of a `SOURCE_RANGES` key. The map is an LPM trie keyed by a prefix length and this;
/// the service id always matches in full, so a range `addr/len` is stored with prefix length
/// `32 + len`, and a client is allowed when `(svc_id, client)` at length 64 finds an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange<A = V4> {
    /// `Service::svc_id`, network byte order (the trie matches bits from the first byte).
    pub svc_id_be: u32,
    /// Client address or range start, network byte order.
    pub addr: A,
}

/// `Service::algorithm`: uniform random slot per new flow.
pub const ALG_RANDOM: u8 = 0;
/// `Service::algorithm`: the service's `MAGLEV` table, indexed by a hash of the 5-tuple.
pub const ALG_MAGLEV: u8 = 1;

/// Key of `BACKEND_SLOTS`: one slot of a service's backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// `Service::svc_id` the slot belongs to.
    pub svc_id: u32,
    /// 1-based slot number, `1..=Service::backend_count`.
    pub slot: u32,
}

/// Value of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// Key into `BACKENDS`.
    pub backend_id: u32,
}

/// Value of `BACKENDS` (keyed by a `u32` backend id, stable for as long as the backend exists,
/// so a connection-tracking entry's `backend_id` keeps meaning the same endpoint).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend<A = V4> {
    /// Endpoint address, network byte order.
    pub addr: A,
    /// Endpoint (target) port, network byte order.
    pub port_be: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `BACKEND_*` state.
    pub state: u8,
}

/// `Backend::state`: ready, eligible for new flows.
pub const BACKEND_ACTIVE: u8 = 0;
/// `Backend::state`: ready, and an address of this node (a hostNetwork endpoint). Flows to
/// it are delivered locally, neither routed nor source-NATed, and its replies, which leave
/// through egress, are reverse-translated there (`NODE_ADDRS`).
pub const BACKEND_HOST: u8 = 1;

/// Key of `MEMBERS`: a backend of a service. The datapath checks it before reusing a backend
/// remembered for session affinity, because slot positions move when the set changes while
/// membership does not.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// `Service::svc_id`.
    pub svc_id: u32,
    /// `BACKENDS` key.
    pub backend_id: u32,
}

/// Value of `MEMBERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Member {
    /// `BACKEND_*` state of the backend within this service.
    pub state: u8,
    pub _pad: [u8; 3],
}

/// Key of `AFFINITY`: a client of a service with ClientIP session affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey<A = V4> {
    /// Client address, network byte order.
    pub client: A,
    /// `Service::svc_id`.
    pub svc_id: u32,
}

/// Value of `AFFINITY`: the backend the client's connections go to, as kube-proxy's `recent`
/// rules remember it: refreshed by every new connection, forgotten after the service's
/// `affinity_timeout_s` without one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    /// `BACKENDS` key.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the client's last new connection.
    pub last_used_ns: u64,
}

/// Key of `VIPS`: a cluster address (ClusterIP) that is the frontend of at least one service.
/// The datapath uses it for packets it cannot key by port (non-first fragments, truncated L4
/// headers) so that it drops those when they are meant for a service instead of letting them
/// through untranslated. Node-facing frontends are left out: their addresses are often the
/// host's own, whose other traffic must pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey<A = V4> {
    /// Frontend address, network byte order.
    pub addr: A,
}

/// Value of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip {
    /// How many frontends (port, protocol) use this address.
    pub frontends: u32,
}

/// Key of `CONNTRACK`: a packet's 5-tuple as it arrives, in either direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A = V4> {
    /// Source address, network byte order.
    pub saddr: A,
    /// Destination address, network byte order.
    pub daddr: A,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IP protocol number.
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl<A: Copy> CtKey<A> {
    /// The key the other direction of the same packet's flow would carry.
    pub const fn reversed(&self) -> CtKey<A> {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport_be: self.dport_be,
            dport_be: self.sport_be,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Value of `CONNTRACK`. A translated connection has two entries: the forward one, keyed by
/// client -> VIP, holds the backend to rewrite the destination to; the reverse one, keyed by
/// backend -> client, holds the VIP to rewrite the source back to. Replies are translated from
/// their own entry, without a second service lookup, and an established flow stays on the
/// backend it was given even after the service's backend set changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry<A = V4> {
    /// Backend chosen for the connection (`BACKENDS` key).
    pub backend_id: u32,
    /// Service port the connection was made to (`Service::svc_id`).
    pub svc_id: u32,
    /// Address to write: destination (backend) for forward, source (VIP) for reverse entries.
    pub nat_addr: A,
    /// Port to write, network byte order; paired with `nat_addr`.
    pub nat_port_be: u16,
    /// `conntrack::TCP_*` state (0 for UDP).
    pub tcp_state: u8,
    /// `CT_FORWARD` or `CT_REVERSE`.
    pub direction: u8,
    /// The other end after translation: the source for forward entries (the SNAT address, or
    /// the client itself), the destination (the client) for reverse entries. Written into the
    /// packet only with `CT_F_SNAT`; always filled, so either entry names its counterpart.
    pub peer_addr: A,
    /// Port of `peer_addr`, network byte order.
    pub peer_port_be: u16,
    /// `CT_F_*` bits.
    pub flags: u8,
    pub _pad: u8,
    /// `bpf_ktime_get_ns()` of the last packet that used this entry.
    pub last_seen_ns: u64,
}

impl<A: Copy> CtEntry<A> {
    /// The key of the flow's other direction: what the translated packet looks like.
    pub const fn other_key(&self, proto: u8) -> CtKey<A> {
        let (saddr, sport_be, daddr, dport_be) = if self.direction == CT_FORWARD {
            (
                self.nat_addr,
                self.nat_port_be,
                self.peer_addr,
                self.peer_port_be,
            )
        } else {
            (
                self.peer_addr,
                self.peer_port_be,
                self.nat_addr,
                self.nat_port_be,
            )
        };
        CtKey {
            saddr,
            daddr,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
}

impl<A: Copy> CtEntry<A> {
    /// What a packet with tuple `key` (this entry's key) becomes once translated.
    pub const fn translated(&self, key: &CtKey<A>) -> CtKey<A> {
        let snat = self.flags & CT_F_SNAT != 0;
        let mut out = *key;
        if self.direction == CT_FORWARD {
            out.daddr = self.nat_addr;
            out.dport_be = self.nat_port_be;
            if snat {
                out.saddr = self.peer_addr;
                out.sport_be = self.peer_port_be;
            }
        } else {
            out.saddr = self.nat_addr;
            out.sport_be = self.nat_port_be;
            if snat {
                out.daddr = self.peer_addr;
                out.dport_be = self.peer_port_be;
            }
        }
        out
    }
}

/// `CtEntry::flags`: the flow is source-NATed (NodePort with externalTrafficPolicy Cluster,
/// or hairpin): rewrite `peer_*` too.
pub const CT_F_SNAT: u8 = 1;
/// `CtEntry::flags`: route translated packets in the datapath (FIB lookup and redirect).
pub const CT_F_ROUTE: u8 = 2;

/// Source ports the datapath allocates for source-NATed flows: above Linux's default
/// ephemeral range (32768-60999), so they do not collide with the node's own sockets.
pub mod snat {
    pub const PORT_MIN: u16 = 61_000;
    pub const PORT_COUNT: u32 = 65_536 - PORT_MIN as u32;
    /// Ports probed for a free one before a new flow is refused.
    pub const TRIES: u32 = 8;
    /// How long a source-NATed flow's port stays taken after its last packet, however it
    /// ended: the backend may hold the tuple in TIME_WAIT for 60 s.
    pub const HOLD_NS: u64 = 60 * 1_000_000_000;
    /// Default address hairpin flows (a backend reaching its own service) are source-NATed to:
    /// link-local, never a real peer, as cilium's.
    pub const HAIRPIN_ADDR: [u8; 4] = [169, 254, 42, 1];
    /// The IPv6 one: `fd00:a9fe:2a01::1`, in a unique-local prefix no cluster is likely to
    /// use (it spells the IPv4 default's octets).
    pub const HAIRPIN_ADDR6: [u8; 16] = [
        0xfd, 0x00, 0xa9, 0xfe, 0x2a, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];
}

/// `CtEntry::direction`: client -> VIP, rewrite the destination.
pub const CT_FORWARD: u8 = 0;
/// `CtEntry::direction`: backend -> client, rewrite the source.
pub const CT_REVERSE: u8 = 1;

/// Key of `FRAGMENTS`: one fragmented datagram, as RFC 791 identifies it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey<A = V4> {
    pub saddr: A,
    pub daddr: A,
    /// The datagram's identification, network byte order: IPv4's 16 bits (in the first
    /// two bytes), or the IPv6 fragment header's 32.
    pub id_be: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Value of `FRAGMENTS`: the ports the datagram's first fragment carried, so its later
/// fragments (which carry none) find the same flow and get the same address translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Value of the per-CPU `STATS` array, indexed by `stats::Reason`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

// Sizes are part of the contract: a change here is a change to the pinned maps' layout.
const _: () = {
    assert!(core::mem::size_of::<FrontendKey>() == 8);
    assert!(core::mem::size_of::<FrontendKey<V6>>() == 20);
    assert!(core::mem::size_of::<Service<V6>>() == 28);
    assert!(core::mem::size_of::<Backend<V6>>() == 20);
    assert!(core::mem::size_of::<AffinityKey<V6>>() == 20);
    assert!(core::mem::size_of::<VipKey<V6>>() == 16);
    assert!(core::mem::size_of::<CtKey<V6>>() == 40);
    assert!(core::mem::size_of::<CtEntry<V6>>() == 56);
    assert!(core::mem::size_of::<SourceRange<V6>>() == 20);
    assert!(core::mem::size_of::<FragKey<V6>>() == 40);
    assert!(core::mem::size_of::<Service>() == 16);
    assert!(core::mem::size_of::<SlotKey>() == 8);
    assert!(core::mem::size_of::<Slot>() == 4);
    assert!(core::mem::size_of::<Backend>() == 8);
    assert!(core::mem::size_of::<MemberKey>() == 8);
    assert!(core::mem::size_of::<Member>() == 4);
    assert!(core::mem::size_of::<AffinityKey>() == 8);
    assert!(core::mem::size_of::<Affinity>() == 16);
    assert!(core::mem::size_of::<VipKey>() == 4);
    assert!(core::mem::size_of::<Vip>() == 4);
    assert!(core::mem::size_of::<CtKey>() == 16);
    assert!(core::mem::size_of::<CtEntry>() == 32);
    assert!(core::mem::size_of::<Counter>() == 16);
    assert!(core::mem::size_of::<SourceRange>() == 8);
    assert!(core::mem::size_of::<FragKey>() == 16);
    assert!(core::mem::size_of::<FragPorts>() == 4);
};

#[cfg(feature = "user")]
mod user {
    //! Userspace trait impls. Safe because every type above is `repr(C)`, made only of integers
    //! and byte arrays, and has no implicit padding (the size assertions prove it).
    use super::*;

    plain_old_data!(SlotKey, Slot, MemberKey, Member, Affinity, Vip, Counter, FragPorts);
    plain_old_data!(
        FrontendKey<V4>,
        Service<V4>,
        Backend<V4>,
        AffinityKey<V4>,
        VipKey<V4>,
        CtKey<V4>,
        CtEntry<V4>,
        SourceRange<V4>,
        FragKey<V4>,
        FrontendKey<V6>,
        Service<V6>,
        Backend<V6>,
        AffinityKey<V6>,
        VipKey<V6>,
        CtKey<V6>,
        CtEntry<V6>,
        SourceRange<V6>,
        FragKey<V6>
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reversed_key_swaps_both_ends_and_round_trips() {
        let k = CtKey {
            saddr: [10, 0, 0, 1],
            daddr: [10, 96, 0, 10],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::proto::TCP,
            _pad: [0; 3],
        };
        let r = k.reversed();
        assert_eq!(r.saddr, [10, 96, 0, 10]);
        assert_eq!(r.daddr, [10, 0, 0, 1]);
        assert_eq!(u16::from_be(r.sport_be), 80);
        assert_eq!(u16::from_be(r.dport_be), 40000);
        assert_eq!(r.reversed(), k);
    }

    #[test]
    fn other_key_of_either_direction_is_the_other_entrys_key() {
        // client 10.0.1.2:40000 -> node 10.0.1.1:30080, SNAT 10.0.1.1:61000, backend 10.0.11.2:8080
        let forward_key = CtKey {
            saddr: [10, 0, 1, 2],
            daddr: [10, 0, 1, 1],
            sport_be: 40000u16.to_be(),
            dport_be: 30080u16.to_be(),
            proto: crate::proto::TCP,
            _pad: [0; 3],
        };
        let forward = CtEntry {
            nat_addr: [10, 0, 11, 2],
            nat_port_be: 8080u16.to_be(),
            peer_addr: [10, 0, 1, 1],
            peer_port_be: 61000u16.to_be(),
            direction: CT_FORWARD,
            flags: CT_F_SNAT,
            ..Default::default()
        };
        let reverse_key = forward.other_key(crate::proto::TCP);
        assert_eq!(reverse_key.saddr, [10, 0, 11, 2]);
        assert_eq!(reverse_key.daddr, [10, 0, 1, 1]);
        assert_eq!(u16::from_be(reverse_key.dport_be), 61000);
        let reverse = CtEntry {
            nat_addr: forward_key.daddr,
            nat_port_be: forward_key.dport_be,
            peer_addr: forward_key.saddr,
            peer_port_be: forward_key.sport_be,
            direction: CT_REVERSE,
            ..forward
        };
        assert_eq!(reverse.other_key(crate::proto::TCP), forward_key);
        // Translating a packet of either direction gives what the other side sees.
        assert_eq!(forward.translated(&forward_key), reverse_key.reversed());
        assert_eq!(reverse.translated(&reverse_key), forward_key.reversed());
    }

    #[test]
    fn every_map_is_named_once() {
        for (i, a) in names::ALL.iter().enumerate() {
            for b in &names::ALL[i + 1..] {
                assert_ne!(a, b);
            }
            // bpffs and BTF both limit object names; BPF_OBJ_NAME_LEN is 16 including the NUL.
            assert!(a.len() < 16, "{a} is too long for a BPF map name");
        }
    }
}
