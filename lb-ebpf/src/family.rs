//! IPv4 and IPv6 behind one datapath.
//!
//! Everything that decides (conntrack, service lookup, backend choice, affinity, SNAT,
//! fragments, ICMP errors) is written once, generic over a `Family`; the family supplies only
//! what differs: its header layout and parser, its maps (`SERVICES` or `SERVICES6`, ...), how an
//! address change reaches the checksums (IPv4 has a header checksum; IPv6 has none, but its
//! addresses are 16 bytes, past what the checksum helpers take as one field), and its FIB
//! lookup. Each entry point picks the family from the EtherType and calls the generic code, so
//! the verifier walks each family's monomorphised copy on its own branch.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibLookup, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::{SockAddrContext, TcContext},
};
use lb_common::{
    capacity, snat,
    sock::{RevNatEntry, RevNatKey},
    stats::DROP_REWRITE_FAILED,
    Addr, Affinity, AffinityKey, Backend, CtEntry, CtKey, FragKey, FragPorts, FrontendKey, Service,
    SourceRange, Vip, VipKey, V4, V6,
};

use crate::{
    conntrack::NewFlow,
    maps::*,
    parse::{self, Frame, Head, Parsed},
};

pub type Services<A> = HashMap<FrontendKey<A>, Service<A>, { capacity::SERVICES as usize }>;
pub type Backends<A> = HashMap<u32, Backend<A>, { capacity::BACKENDS as usize }>;
pub type SourceRanges<A> = LpmTrie<SourceRange<A>, u32, { capacity::SOURCE_RANGES as usize }>;
pub type Vips<A> = HashMap<VipKey<A>, Vip, { capacity::VIPS as usize }>;
pub type NodeAddrs<A> = HashMap<VipKey<A>, Vip, { capacity::NODE_ADDRS as usize }>;
pub type Conntrack<A> = LruHashMap<CtKey<A>, CtEntry<A>, { capacity::CONNTRACK as usize }>;
pub type Fragments<A> = LruHashMap<FragKey<A>, FragPorts, { capacity::FRAGMENTS as usize }>;
pub type Scratches<A> = PerCpuArray<Scratch<A>, 1>;
pub type SockRevNats<A> =
    LruHashMap<RevNatKey<A>, RevNatEntry<A>, { lb_common::sock::capacity::SOCK_REVNAT as usize }>;
pub type Affinities<A> = LruHashMap<AffinityKey<A>, Affinity, { capacity::AFFINITY as usize }>;

/// One IP family: its layout, its maps, and the few operations that differ by family.
pub trait Family: 'static {
    type Addr: Addr;
    /// The EtherType, as it lies in the frame (network order, read natively).
    const ETH_P_BE: u16;
    /// `AF_INET` or `AF_INET6`, for the FIB.
    const AF: u8;
    /// Offsets of the source and destination addresses and of the TTL / hop limit, from
    /// the start of the frame.
    const SADDR_OFF: usize;
    const DADDR_OFF: usize;
    const TTL_OFF: usize;
    /// Bits of the SOURCE_RANGES key a client lookup matches: the service id and the address.
    const RANGE_KEY_BITS: u32;
    /// The IP header has a checksum (IPv4).
    const HAS_L3_CSUM: bool;
    /// The ICMP checksum covers the IP addresses through a pseudo-header (ICMPv6).
    const ICMP_PSEUDO_HDR: bool;
    /// Flags for storing header bytes no checksum in the packet compensates (IPv6's hop
    /// limit, a later fragment's addresses): IPv6 asks for `BPF_F_RECOMPUTE_CSUM`, so a
    /// CHECKSUM_COMPLETE skb's `skb->csum` follows the change; IPv4's header checksum
    /// compensates its own fields, so 0.
    const UNCOMPENSATED_STORE: u64;

    /// Parses a packet of this family (the EtherType was checked) into `out`, which starts
    /// zeroed (`Parsed::default()`).
    fn parse<F: Frame>(ctx: &F, out: &mut Parsed<Self::Addr>);
    /// Reads what the egress program decides on, from the linear head only.
    fn peek<F: Frame>(ctx: &F) -> Option<Head<Self::Addr>>;

    fn services() -> &'static Services<Self::Addr>;
    fn backends() -> &'static Backends<Self::Addr>;
    fn source_ranges() -> &'static SourceRanges<Self::Addr>;
    fn vips() -> &'static Vips<Self::Addr>;
    fn node_addrs() -> &'static NodeAddrs<Self::Addr>;
    fn conntrack() -> &'static Conntrack<Self::Addr>;
    fn fragments() -> &'static Fragments<Self::Addr>;
    fn affinity() -> &'static Affinities<Self::Addr>;
    fn scratches() -> &'static Scratches<Self::Addr>;
    fn sock_revnat() -> &'static SockRevNats<Self::Addr>;

    /// A socket call's address, port (the wire bytes, read natively) and protocol.
    fn user_addr(ctx: &SockAddrContext) -> (Self::Addr, u16, u32);
    /// Rewrites a socket call's address and port.
    fn set_user_addr(ctx: &SockAddrContext, addr: Self::Addr, port_be: u16);

    /// This CPU's scratch memory (`Scratch`).
    #[inline(always)]
    fn scratch() -> Option<*mut Scratch<Self::Addr>> {
        Self::scratches().get_ptr_mut(0)
    }

    /// This CPU's `Scratch::entry`.
    #[inline(always)]
    fn entry_in_scratch() -> Option<&'static mut CtEntry<Self::Addr>> {
        // SAFETY: this CPU's slot; `entry` has one user at a time (see `Scratch`).
        Some(unsafe { &mut (*Self::scratch()?).entry })
    }

    /// Parses the packet into this CPU's `Scratch::parsed` and returns it; `None` only if
    /// the scratch map has no slot, which cannot happen.
    #[inline(always)]
    fn parse_in_scratch<F: Frame>(ctx: &F) -> Option<&'static Parsed<Self::Addr>> {
        // SAFETY: this CPU's slot; `parsed` has one user at a time (see `Scratch`).
        let parsed = unsafe { &mut (*Self::scratch()?).parsed };
        *parsed = Parsed::default();
        Self::parse(ctx, parsed);
        Some(parsed)
    }

    /// The address hairpin flows are source-NATed to.
    fn hairpin_addr() -> Self::Addr;

    /// Folds an address change into the IP header checksum, where there is one.
    fn l3_csum_replace(
        ctx: &TcContext,
        check_off: usize,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), u32>;

    /// Folds an address change into the L4 checksum at `check_off`: `flags` as for
    /// `bpf_l4_csum_replace` (`BPF_F_PSEUDO_HDR` when the address is in the pseudo-header,
    /// `BPF_F_MARK_MANGLED_0` for UDP), without the size bits.
    fn l4_csum_replace(
        ctx: &TcContext,
        check_off: usize,
        old: Self::Addr,
        new: Self::Addr,
        flags: u64,
    ) -> Result<(), u32>;

    /// Fills the FIB request's addresses.
    fn fib_addrs(fib: &mut FibLookup, saddr: Self::Addr, daddr: Self::Addr);
    /// The next hop the FIB wrote, for `bpf_redirect_neigh`.
    fn fib_next_hop(fib: &FibLookup) -> aya_ebpf::bindings::bpf_redir_neigh;

    /// Writes the decremented TTL / hop limit, fixing the header checksum where there is one.
    fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), u32>;
}

/// Per-CPU working memory for what would not fit BPF's 512 bytes of stack along one call
/// chain (IPv6 keys and entries are two to three times IPv4's). One slot per CPU is enough:
/// the programs using it (tc ingress and egress, XDP) never interleave on a CPU (ingress and
/// XDP run in softirq, egress with softirqs off, and redirects happen after the program
/// returns), and within a program each field has one user at a time: `parsed` the entry
/// point, `entry` the entry point (through `conntrack::lookup` or `create`), `flow`
/// `service::start_flow`, `reverse` and `key` `conntrack::create`, `frame`
/// `reject`, `fib` `route::forward`.
pub struct Scratch<A> {
    pub parsed: Parsed<A>,
    /// The packet's flow entry, as conntrack found or created it.
    pub entry: CtEntry<A>,
    pub flow: NewFlow<A>,
    pub reverse: CtEntry<A>,
    pub key: CtKey<A>,
    /// `reject`'s answer frame.
    pub frame: [u8; crate::reject::MAX_LEN],
    /// `route::forward`'s FIB request.
    pub fib: FibLookup,
}

pub struct V4Family;
pub struct V6Family;

/// The address hairpin flows are source-NATed to (`lb-agent --hairpin-ip`), network order.
/// Set by the agent at load time; read volatile so the compiler does not fold the default.
#[unsafe(no_mangle)]
static HAIRPIN_ADDR_BE: u32 = u32::from_ne_bytes(snat::HAIRPIN_ADDR);

/// The IPv6 one, set the same way.
#[unsafe(no_mangle)]
static HAIRPIN_ADDR6: [u8; 16] = snat::HAIRPIN_ADDR6;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

impl Family for V4Family {
    type Addr = V4;
    const ETH_P_BE: u16 = 0x0800u16.to_be();
    const AF: u8 = AF_INET;
    const SADDR_OFF: usize = parse::ETH_HLEN + 12;
    const DADDR_OFF: usize = parse::ETH_HLEN + 16;
    const TTL_OFF: usize = parse::ETH_HLEN + 8;
    const RANGE_KEY_BITS: u32 = 32 + 32;
    const HAS_L3_CSUM: bool = true;
    const ICMP_PSEUDO_HDR: bool = false;
    const UNCOMPENSATED_STORE: u64 = 0;

    #[inline(always)]
    fn parse<F: Frame>(ctx: &F, out: &mut Parsed<V4>) {
        parse::parse_ipv4(ctx, out)
    }
    #[inline(always)]
    fn peek<F: Frame>(ctx: &F) -> Option<Head<V4>> {
        parse::peek_ipv4(ctx)
    }

    #[inline(always)]
    fn services() -> &'static Services<V4> {
        &SERVICES
    }
    #[inline(always)]
    fn backends() -> &'static Backends<V4> {
        &BACKENDS
    }
    #[inline(always)]
    fn source_ranges() -> &'static SourceRanges<V4> {
        &SOURCE_RANGES
    }
    #[inline(always)]
    fn vips() -> &'static Vips<V4> {
        &VIPS
    }
    #[inline(always)]
    fn node_addrs() -> &'static NodeAddrs<V4> {
        &NODE_ADDRS
    }
    #[inline(always)]
    fn conntrack() -> &'static Conntrack<V4> {
        &CONNTRACK
    }
    #[inline(always)]
    fn fragments() -> &'static Fragments<V4> {
        &FRAGMENTS
    }
    #[inline(always)]
    fn affinity() -> &'static Affinities<V4> {
        &AFFINITY
    }
    #[inline(always)]
    fn scratches() -> &'static Scratches<V4> {
        &SCRATCH
    }
    #[inline(always)]
    fn sock_revnat() -> &'static SockRevNats<V4> {
        &SOCK_REVNAT
    }

    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> (V4, u16, u32) {
        let sa = ctx.sock_addr;
        // SAFETY: the kernel passes a valid context. Whole 32-bit reads: narrower loads of
        // these fields are refused by older verifiers (cilium reads them the same way).
        unsafe {
            let ip = core::ptr::read_volatile(&raw const (*sa).user_ip4);
            let port = core::ptr::read_volatile(&raw const (*sa).user_port);
            let protocol = core::ptr::read_volatile(&raw const (*sa).protocol);
            (ip.to_ne_bytes(), port as u16, protocol)
        }
    }

    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: V4, port_be: u16) {
        let sa = ctx.sock_addr;
        // SAFETY: the kernel passes a valid context whose user_ip4/user_port are writable in
        // the connect4, sendmsg4, recvmsg4 and getpeername4 hooks; only whole 32-bit writes.
        unsafe {
            core::ptr::write_volatile(&raw mut (*sa).user_ip4, u32::from_ne_bytes(addr));
            core::ptr::write_volatile(&raw mut (*sa).user_port, port_be as u32);
        }
    }

    #[inline(always)]
    fn hairpin_addr() -> V4 {
        // SAFETY: a plain read of a global the program never writes.
        unsafe { core::ptr::read_volatile(&HAIRPIN_ADDR_BE) }.to_ne_bytes()
    }

    #[inline(always)]
    fn l3_csum_replace(ctx: &TcContext, check_off: usize, old: V4, new: V4) -> Result<(), u32> {
        ctx.l3_csum_replace(
            check_off,
            u32::from_ne_bytes(old) as u64,
            u32::from_ne_bytes(new) as u64,
            4,
        )
        .map_err(|_| DROP_REWRITE_FAILED)
    }

    #[inline(always)]
    fn l4_csum_replace(
        ctx: &TcContext,
        check_off: usize,
        old: V4,
        new: V4,
        flags: u64,
    ) -> Result<(), u32> {
        ctx.l4_csum_replace(
            check_off,
            u32::from_ne_bytes(old) as u64,
            u32::from_ne_bytes(new) as u64,
            flags | 4,
        )
        .map_err(|_| DROP_REWRITE_FAILED)
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut FibLookup, saddr: V4, daddr: V4) {
        fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    }

    #[inline(always)]
    fn fib_next_hop(fib: &FibLookup) -> aya_ebpf::bindings::bpf_redir_neigh {
        // SAFETY: all-zero is a valid value of the union; then the member the FIB wrote is read.
        let mut nh: aya_ebpf::bindings::bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        nh
    }

    /// Decrements the TTL, fixing the header checksum over the 16-bit word it shares with the
    /// protocol field.
    #[inline(always)]
    fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), u32> {
        let word: u16 = ctx.load(Self::TTL_OFF).map_err(|_| DROP_REWRITE_FAILED)?;
        let mut bytes = word.to_ne_bytes();
        bytes[0] = ttl - 1;
        let new = u16::from_ne_bytes(bytes);
        ctx.l3_csum_replace(parse::IP_CHECK_OFF, word as u64, new as u64, 2)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        ctx.store(Self::TTL_OFF, &new, 0)
            .map_err(|_| DROP_REWRITE_FAILED)
    }
}

impl Family for V6Family {
    type Addr = V6;
    const ETH_P_BE: u16 = 0x86ddu16.to_be();
    const AF: u8 = AF_INET6;
    const SADDR_OFF: usize = parse::ETH_HLEN + 8;
    const DADDR_OFF: usize = parse::ETH_HLEN + 24;
    const TTL_OFF: usize = parse::ETH_HLEN + 7;
    const RANGE_KEY_BITS: u32 = 32 + 128;
    const HAS_L3_CSUM: bool = false;
    const ICMP_PSEUDO_HDR: bool = true;
    const UNCOMPENSATED_STORE: u64 = BPF_F_RECOMPUTE_CSUM as u64;

    #[inline(always)]
    fn parse<F: Frame>(ctx: &F, out: &mut Parsed<V6>) {
        parse::parse_ipv6(ctx, out)
    }
    #[inline(always)]
    fn peek<F: Frame>(ctx: &F) -> Option<Head<V6>> {
        parse::peek_ipv6(ctx)
    }

    #[inline(always)]
    fn services() -> &'static Services<V6> {
        &SERVICES6
    }
    #[inline(always)]
    fn backends() -> &'static Backends<V6> {
        &BACKENDS6
    }
    #[inline(always)]
    fn source_ranges() -> &'static SourceRanges<V6> {
        &SOURCE_RANGES6
    }
    #[inline(always)]
    fn vips() -> &'static Vips<V6> {
        &VIPS6
    }
    #[inline(always)]
    fn node_addrs() -> &'static NodeAddrs<V6> {
        &NODE_ADDRS6
    }
    #[inline(always)]
    fn conntrack() -> &'static Conntrack<V6> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn fragments() -> &'static Fragments<V6> {
        &FRAGMENTS6
    }
    #[inline(always)]
    fn affinity() -> &'static Affinities<V6> {
        &AFFINITY6
    }
    #[inline(always)]
    fn scratches() -> &'static Scratches<V6> {
        &SCRATCH6
    }
    #[inline(always)]
    fn sock_revnat() -> &'static SockRevNats<V6> {
        &SOCK_REVNAT6
    }

    #[inline(always)]
    fn user_addr(ctx: &SockAddrContext) -> (V6, u16, u32) {
        let sa = ctx.sock_addr;
        // SAFETY: as for IPv4; user_ip6 is read one whole 32-bit word at a time.
        unsafe {
            let mut ip = [0u8; 16];
            for i in 0..4 {
                let w = core::ptr::read_volatile(&raw const (*sa).user_ip6[i]);
                ip[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let port = core::ptr::read_volatile(&raw const (*sa).user_port);
            let protocol = core::ptr::read_volatile(&raw const (*sa).protocol);
            (ip, port as u16, protocol)
        }
    }

    #[inline(always)]
    fn set_user_addr(ctx: &SockAddrContext, addr: V6, port_be: u16) {
        let sa = ctx.sock_addr;
        let w = words(addr);
        // SAFETY: writable in the connect6, sendmsg6, recvmsg6 and getpeername6 hooks; whole
        // 32-bit writes.
        unsafe {
            for (i, word) in w.iter().enumerate() {
                core::ptr::write_volatile(&raw mut (*sa).user_ip6[i], *word);
            }
            core::ptr::write_volatile(&raw mut (*sa).user_port, port_be as u32);
        }
    }

    #[inline(always)]
    fn hairpin_addr() -> V6 {
        // SAFETY: a plain read of a global the program never writes.
        unsafe { core::ptr::read_volatile(&HAIRPIN_ADDR6) }
    }

    /// IPv6 has no header checksum.
    #[inline(always)]
    fn l3_csum_replace(_: &TcContext, _: usize, _: V6, _: V6) -> Result<(), u32> {
        Ok(())
    }

    /// A 16-byte field is past `bpf_l4_csum_replace`'s sizes: its difference is computed
    /// with `bpf_csum_diff` and folded in as one (size 0, "`to` is a difference").
    ///
    /// A pseudo-header change also says `BPF_F_IPV6`: without it the helper adjusts a
    /// CHECKSUM_COMPLETE skb's `skb->csum` as IPv4 needs (its header checksum absorbs the
    /// change) and IPv6 does not, and the receiver logs "hw csum failure". Kernels before the
    /// flag refuse it (EINVAL, before touching anything): then the call is made without, and
    /// the sum given back with `bpf_csum_update`.
    #[inline(always)]
    fn l4_csum_replace(
        ctx: &TcContext,
        check_off: usize,
        old: V6,
        new: V6,
        flags: u64,
    ) -> Result<(), u32> {
        let (mut old, mut new) = (old, new);
        // SAFETY: both buffers are 16 bytes on our stack, a multiple of 4 as required.
        let diff = unsafe {
            bpf_csum_diff(
                old.as_mut_ptr() as *mut u32,
                16,
                new.as_mut_ptr() as *mut u32,
                16,
                0,
            )
        };
        if diff < 0 {
            return Err(DROP_REWRITE_FAILED);
        }
        let pseudo = flags & PSEUDO_HDR != 0;
        let diff = diff as u32;
        if pseudo
            && ctx
                .l4_csum_replace(check_off, 0, diff as u64, flags | F_IPV6)
                .is_ok()
        {
            return Ok(());
        }
        ctx.l4_csum_replace(check_off, 0, diff as u64, flags)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        if pseudo {
            // Without the flag the helper took `diff` off a CHECKSUM_COMPLETE skb's csum, as
            // for IPv4; for IPv6 the packet's sum did not change: give it back. (A no-op,
            // failing harmlessly, for any other skb.)
            // SAFETY: plain helper call on the program's own skb.
            let _ = unsafe { bpf_csum_update(ctx.skb.skb, diff) };
        }
        Ok(())
    }

    #[inline(always)]
    fn fib_addrs(fib: &mut FibLookup, saddr: V6, daddr: V6) {
        fib.__bindgen_anon_3.ipv6_src = words(saddr);
        fib.__bindgen_anon_4.ipv6_dst = words(daddr);
    }

    #[inline(always)]
    fn fib_next_hop(fib: &FibLookup) -> aya_ebpf::bindings::bpf_redir_neigh {
        // SAFETY: all-zero is a valid value of the union; then the member the FIB wrote is read.
        let mut nh: aya_ebpf::bindings::bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET6 as u32;
        nh.__bindgen_anon_1.ipv6_nh = unsafe { fib.__bindgen_anon_4.ipv6_dst };
        nh
    }

    /// The hop limit is covered by no checksum in the packet.
    #[inline(always)]
    fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), u32> {
        ctx.store(Self::TTL_OFF, &(ttl - 1), Self::UNCOMPENSATED_STORE)
            .map_err(|_| DROP_REWRITE_FAILED)
    }
}

/// An IPv6 address as the four native-order words the FIB's union holds.
#[inline(always)]
fn words(a: V6) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// `BPF_F_PSEUDO_HDR` as the L4 helpers take it.
pub const PSEUDO_HDR: u64 = BPF_F_PSEUDO_HDR as u64;
/// `BPF_F_IPV6` (`bpf_l4_csum_replace`; newer than the bindings): the packet is IPv6.
const F_IPV6: u64 = 1 << 7;
