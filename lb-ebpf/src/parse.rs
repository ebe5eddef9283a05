//! Ethernet, IPv4, IPv6, TCP and UDP parsing into a plain `Packet` of the fields the datapath
//! uses, one family at a time (the entry points dispatch on the EtherType).
//!
//! Parsing never writes. Every header read goes through `ptr_at`, the one bounds check.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{conntrack::flags as tcpf, proto, Addr, CtKey, FragKey, V4, V6};

pub const ETH_HLEN: usize = 14;
/// IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6's fixed header.
pub const IPV6_HLEN: usize = 40;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// ICMP header: type, code, checksum, 4 bytes of type-specific data.
pub const ICMP_HLEN: usize = 8;
/// Enough linear data for Ethernet, the longest IPv4 header and a TCP header, or for an ICMP
/// error quoting the longest IPv4 header and 8 bytes of its payload; for IPv6, the fixed
/// header, extension headers up to `MAX_EXT_OFF` and a TCP header.
const MAX_HEADERS: u32 = (ETH_HLEN + IPV6_HLEN + MAX_EXT_OFF + 60) as u32;

/// IPv6 extension headers the parser walks before the upper-layer header, at most this many
/// and within this many bytes after the fixed header; a longer chain is left to the kernel
/// (`PASS_MALFORMED_IP`), or dropped when addressed to a frontend.
pub const MAX_EXT_HEADERS: usize = 4;
const MAX_EXT_OFF: usize = 128;

/// IPv4 flag and fragment-offset bits of `frag_off` (host order).
const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// Offset of the IPv4 header checksum, from the start of the frame (the other fields the
/// datapath rewrites are the family's: `Family::SADDR_OFF`, ...).
pub const IP_CHECK_OFF: usize = ETH_HLEN + 10;

/// What parsing needs of a program's context: tc's socket buffer and XDP's frame both have
/// linear data; only an skb can have more in pages.
pub trait Frame {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length.
    fn len(&self) -> u32;
    /// Makes the first `len` bytes linear, where that means anything.
    fn pull(&self, len: u32);
}

impl Frame for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        TcContext::len(self)
    }
    #[inline(always)]
    fn pull(&self, len: u32) {
        // Failure is harmless: the bounds checks then treat the packet as short.
        let _ = self.pull_data(len);
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> u32 {
        // Programs not marked for multi-buffer frames only ever see one linear buffer.
        (XdpContext::data_end(self) - XdpContext::data(self)) as u32
    }
    #[inline(always)]
    fn pull(&self, _len: u32) {}
}

/// Deepest offset a header is read at.
const MAX_HEADER_OFF: usize = 1024;

/// Returns a pointer to a `T` at `offset` in the linear packet data, or `None` if it would
/// reach past the end. The only way headers are read.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    // Offsets kept in scratch memory come back without the bounds the verifier knew; headers
    // never lie this deep, and the check gives it one back.
    if offset > MAX_HEADER_OFF {
        return None;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The frame's EtherType as it lies in the frame (network order, read natively: compare with
/// `Family::ETH_P_BE`), if the frame has one. Every entry point picks the family by it.
#[inline(always)]
pub fn ether_type(ctx: &impl Frame) -> Option<u16> {
    // SAFETY: `ptr_at` checks bounds; a plain load.
    ptr_at::<u16>(ctx, 12).map(|p| unsafe { *p })
}

/// What parsing found (`Parsed::kind`); the datapath decides from this.
#[repr(u8)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    /// An IP header the kernel will reject itself, or an IPv6 header chain not walked
    /// (`tuple.daddr` is set when the fixed header was there).
    #[default]
    Malformed,
    /// Neither TCP nor UDP (`fragment` says whether it is a fragment).
    NoPorts,
    /// TCP or UDP with an L4 header that is truncated or invalid.
    MalformedL4,
    /// A complete TCP or UDP header (possibly of a first fragment): `pkt` is all there.
    L4,
    /// A later fragment of a TCP or UDP datagram, without ports (`Parsed::fragment`).
    LaterFragment,
    /// An ICMP or ICMPv6 error (destination unreachable, packet too big, time exceeded,
    /// parameter problem) quoting a TCP or UDP packet (`Parsed::icmp_error`).
    IcmpError,
}

/// What parsing found. A struct with a kind, not an enum with data: it is filled in place by
/// a BPF function of its own (`parse_ipv4`, `parse_ipv6`), and an enum's unused bytes would
/// be copied from whatever a register held, which the verifier refuses for pointers. Every
/// byte starts zeroed (`Default`) and parsing only stores fields.
#[derive(Clone, Copy, Default)]
pub struct Parsed<A> {
    pub kind: Kind,
    /// Any fragment of a fragmented datagram (for `NoPorts`).
    pub fragment: bool,
    /// The packet: its addresses and protocol whatever the kind; everything for `L4`; for
    /// `LaterFragment` also `ip_id_be` and `ttl`; for `IcmpError`, `l4_off` is the ICMP
    /// header's offset.
    pub pkt: Packet<A>,
    /// `IcmpError`: the quoted packet's tuple, as it was sent, and its L4 header's offset.
    pub inner: CtKey<A>,
    pub inner_l4_off: usize,
}

impl<A: Addr> Parsed<A> {
    /// The later fragment, for `Kind::LaterFragment`.
    #[inline(always)]
    pub fn fragment(&self) -> Fragment<A> {
        let t = &self.pkt.tuple;
        Fragment {
            key: FragKey {
                saddr: t.saddr,
                daddr: t.daddr,
                id_be: self.pkt.ip_id_be,
                proto: t.proto,
                _pad: [0; 3],
            },
            ttl: self.pkt.ttl,
        }
    }

    /// The error and what it quotes, for `Kind::IcmpError`.
    #[inline(always)]
    pub fn icmp_error(&self) -> IcmpError<A> {
        IcmpError {
            icmp_off: self.pkt.l4_off,
            inner_ip_off: self.pkt.l4_off + ICMP_HLEN,
            inner_l4_off: self.inner_l4_off,
            inner: self.inner,
            daddr: self.pkt.tuple.daddr,
        }
    }
}

/// Where an ICMP error's fields are, and the 5-tuple of the packet it quotes.
pub struct IcmpError<A> {
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IP header, and of its L4 header.
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted packet's tuple, as it was sent.
    pub inner: CtKey<A>,
    /// The outer destination (who gets the error).
    pub daddr: A,
}

/// ICMP types that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// ICMPv6 error types (RFC 4443): destination unreachable, packet too big, time exceeded,
/// parameter problem. Every error type is below 128.
const ICMPV6_ERROR_MAX: u8 = 4;

/// A later fragment of a TCP or UDP datagram.
pub struct Fragment<A> {
    pub key: FragKey<A>,
    pub ttl: u8,
}

/// The fields of a TCP/UDP packet the datapath needs.
#[derive(Clone, Copy, Default)]
pub struct Packet<A> {
    /// The 5-tuple as it arrived.
    pub tuple: CtKey<A>,
    /// Offset of the L4 header from the start of the frame (after any IPv4 options or IPv6
    /// extension headers).
    pub l4_off: usize,
    /// True when the IPv4 header carries options (IHL > 5) or IPv6 extension headers precede
    /// the L4 header: an answer quoting the packet would have to carry them.
    pub has_ip_options: bool,
    /// IPv4 time to live, IPv6 hop limit.
    pub ttl: u8,
    /// 1 for the first fragment of a fragmented datagram (MF set, offset 0), else 0. A
    /// number, not a `bool`, and computed without a branch: the verifier would otherwise
    /// walk every later path twice, once per value.
    pub first_fragment: u8,
    /// The datagram's identification, network byte order (`FragKey::id_be`).
    pub ip_id_be: u32,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers, host order (0 for UDP).
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// L4 payload length from the IP length (for the RST's acknowledgement number).
    pub l4_payload_len: u32,
    /// L4 header and payload length from the IP length (the pseudo-header's length).
    pub l4_len: u16,
}

impl<A> Packet<A> {
    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.tuple.proto == proto::TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
}

#[repr(C)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_off_be: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
struct Ipv6Hdr {
    version_tc_flow: [u8; 4],
    payload_len_be: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[repr(C)]
struct TcpHdr {
    sport_be: u16,
    dport_be: u16,
    seq_be: u32,
    ack_be: u32,
    doff_res: u8,
    flags: u8,
    window_be: u16,
    check: u16,
    urg_ptr_be: u16,
}

#[repr(C)]
struct UdpHdr {
    sport_be: u16,
    dport_be: u16,
    len_be: u16,
    check: u16,
}

/// Makes the headers linear: they may sit partly in paged data (GRO, large sends). Failure is
/// harmless: the bounds checks then treat the packet as short.
#[inline(always)]
fn pull_headers<F: Frame>(ctx: &F) {
    let want = if ctx.len() < MAX_HEADERS {
        ctx.len()
    } else {
        MAX_HEADERS
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        ctx.pull(want);
    }
}

/// Parses an IPv4 packet (the caller checked the EtherType) into `out`, which starts zeroed.
/// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn parse_ipv4<F: Frame>(ctx: &F, out: &mut Parsed<V4>) {
    pull_headers(ctx);
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once so later reads
    // are plain loads.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    out.pkt.tuple.saddr = ip.saddr;
    out.pkt.tuple.daddr = ip.daddr;
    out.pkt.tuple.proto = ip.proto;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let frame_l3_len = ctx.len() as usize - ETH_HLEN;
    let tot_len = big_packet_len(u16::from_be(ip.tot_len_be) as usize, frame_l3_len);
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl || tot_len > frame_l3_len {
        return;
    }

    let frag_off = u16::from_be(ip.frag_off_be);
    let fragment = frag_off & (IP_MF | IP_OFFSET) != 0;
    // `ihl` is at most 60, which bounds the L4 offset for the verifier.
    let l4_off = ETH_HLEN + ihl;
    if !fragment && ip.proto == proto::ICMP && icmp_error(ctx, l4_off, out) {
        out.kind = Kind::IcmpError;
        out.pkt.l4_off = l4_off;
        return;
    }
    out.fragment = fragment;
    out.pkt.l4_off = l4_off;
    out.pkt.l4_len = min_u16(tot_len - ihl);
    out.pkt.has_ip_options = ihl > IPV4_HLEN;
    out.pkt.ttl = ip.ttl;
    out.pkt.ip_id_be = ip.id_be as u32;
    // Later fragments are told apart before the ports are read, so MF alone marks a first
    // fragment there. `black_box` keeps the compiler from turning the arithmetic back into a
    // branch.
    let first_fragment = core::hint::black_box(((frag_off & IP_MF) >> 13) as usize);
    transport(ctx, out, frag_off & IP_OFFSET != 0, first_fragment);
}

/// IPv6 extension headers (RFC 8200 4.1) the parser steps over.
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
const NEXTHDR_ICMPV6: u8 = 58;
/// Fragment header: "more fragments" and the offset bits of its second word (host order).
const IP6_MF: u16 = 0x0001;
const IP6_OFFSET: u16 = 0xfff8;

/// Parses an IPv6 packet (the caller checked the EtherType) into `out`, which starts zeroed,
/// walking up to `MAX_EXT_HEADERS` extension headers to the upper-layer one. A BPF function
/// of its own (see `family`: the stack).
#[inline(never)]
pub fn parse_ipv6<F: Frame>(ctx: &F, out: &mut Parsed<V6>) {
    pull_headers(ctx);
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    out.pkt.tuple.saddr = ip.saddr;
    out.pkt.tuple.daddr = ip.daddr;
    let frame_l3_len = ctx.len() as usize - ETH_HLEN;
    let payload_len = big_packet_len(
        u16::from_be(ip.payload_len_be) as usize,
        frame_l3_len.saturating_sub(IPV6_HLEN),
    );
    // (A jumbogram, RFC 2675, has a payload length of 0 behind a hop-by-hop header: its
    // chain then ends past the payload, below, and it is not translated. None cross
    // Ethernet.)
    if ip.version_tc_flow[0] >> 4 != 6 || IPV6_HLEN + payload_len > frame_l3_len {
        return;
    }
    // From here on, a packet whose upper-layer header cannot be found is one whose ports
    // are unknown: dropped if it is for a frontend, like a truncated L4 header.
    out.kind = Kind::MalformedL4;

    let mut next = ip.next_header;
    let mut ext_len = 0usize;
    let mut frag_word = 0u16;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        let off = ETH_HLEN + IPV6_HLEN + ext_len;
        let this = next;
        let len = match this {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                // Next header, length, and for a routing header its type and segments left.
                // SAFETY: `ptr_at` checks bounds; plain byte loads (every one of these headers
                // is at least 8 bytes).
                let Some(h) = ptr_at::<[u8; 4]>(ctx, off) else {
                    return;
                };
                let h = unsafe { *h };
                // Segments left: the destination is an intermediate one, and the L4 checksum
                // covers the final one (RFC 8200 8.1). Not a packet to translate.
                if this == NEXTHDR_ROUTING && h[3] != 0 {
                    return;
                }
                next = h[0];
                // The authentication header counts 4-byte words, the others 8-byte ones.
                if this == NEXTHDR_AUTH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                }
            }
            NEXTHDR_FRAGMENT => {
                // SAFETY: as above; the fragment header is 8 bytes.
                let Some(h) = ptr_at::<[u8; 8]>(ctx, off) else {
                    return;
                };
                let h = unsafe { *h };
                next = h[0];
                frag_word = u16::from_be_bytes([h[2], h[3]]);
                out.pkt.ip_id_be = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                fragment = true;
                8
            }
            _ => break,
        };
        ext_len += len;
        if ext_len > MAX_EXT_OFF {
            return;
        }
        // Behind a later fragment's header is data from the middle of the datagram, not
        // headers.
        if frag_word & IP6_OFFSET != 0 {
            break;
        }
    }
    // Still an extension header after the walk (and not a later fragment's data): a chain
    // longer than the parser follows.
    let later_fragment = frag_word & IP6_OFFSET != 0;
    if (!later_fragment
        && matches!(
            next,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST | NEXTHDR_AUTH
        ))
        || ext_len > payload_len
    {
        return;
    }
    out.pkt.tuple.proto = next;
    let l4_off = ETH_HLEN + IPV6_HLEN + ext_len;
    if !fragment && next == NEXTHDR_ICMPV6 && icmpv6_error(ctx, l4_off, out) {
        out.kind = Kind::IcmpError;
        out.pkt.l4_off = l4_off;
        return;
    }
    out.fragment = fragment;
    out.pkt.l4_off = l4_off;
    out.pkt.l4_len = min_u16(payload_len - ext_len);
    out.pkt.has_ip_options = ext_len != 0;
    out.pkt.ttl = ip.hop_limit;
    let first_fragment = core::hint::black_box((frag_word & IP6_MF) as usize);
    transport(ctx, out, later_fragment, first_fragment);
}

/// A length field's value (IPv4's total length, IPv6's payload length), or, for a packet
/// longer than the field can say (BIG TCP: GRO and GSO packets past 64 KiB carry 0 there),
/// the `available` bytes the field would count, from the skb.
#[inline(always)]
fn big_packet_len(field: usize, available: usize) -> usize {
    if field == 0 && available > 0xffff {
        available
    } else {
        field
    }
}

/// A length for a 16-bit field, saturated (only BIG TCP packets exceed it).
#[inline(always)]
fn min_u16(len: usize) -> u16 {
    if len > 0xffff {
        0xffff
    } else {
        len as u16
    }
}

/// The TCP or UDP header behind the IP layer, for both families: completes `out`, whose IP
/// fields are set.
#[inline(always)]
fn transport<F: Frame, A: Addr>(
    ctx: &F,
    out: &mut Parsed<A>,
    later_fragment: bool,
    first_fragment: usize,
) {
    let proto = out.pkt.tuple.proto;
    let ports = proto == proto::TCP || proto == proto::UDP;
    if ports && later_fragment {
        out.kind = Kind::LaterFragment;
        return;
    }
    if !ports {
        out.kind = Kind::NoPorts;
        return;
    }
    out.kind = Kind::MalformedL4;
    let l4_off = out.pkt.l4_off;
    let l4_len = out.pkt.l4_len as usize;
    if proto == proto::TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_off) else {
            return;
        };
        // SAFETY: `ptr_at` checked the header lies inside the packet.
        let tcp = unsafe { core::ptr::read_unaligned(tcp) };
        let doff = ((tcp.doff_res >> 4) as usize) * 4;
        if doff < TCP_HLEN || doff > l4_len {
            return;
        }
        out.pkt.tuple.sport_be = tcp.sport_be;
        out.pkt.tuple.dport_be = tcp.dport_be;
        out.pkt.tcp_flags = tcp.flags & (tcpf::FIN | tcpf::SYN | tcpf::RST | tcpf::PSH | tcpf::ACK);
        out.pkt.tcp_seq = u32::from_be(tcp.seq_be);
        out.pkt.tcp_ack = u32::from_be(tcp.ack_be);
        out.pkt.l4_payload_len = (l4_len - doff) as u32;
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, l4_off) else {
            return;
        };
        // SAFETY: `ptr_at` checked the header lies inside the packet.
        let udp = unsafe { core::ptr::read_unaligned(udp) };
        let udp_len = u16::from_be(udp.len_be) as usize;
        // A first fragment holds only part of the datagram its length describes: no upper
        // bound for it.
        let udp_len_max = l4_len | (first_fragment * 0xffff);
        if udp_len < UDP_HLEN || udp_len > udp_len_max {
            return;
        }
        out.pkt.tuple.sport_be = udp.sport_be;
        out.pkt.tuple.dport_be = udp.dport_be;
        out.pkt.l4_payload_len = (udp_len - UDP_HLEN) as u32;
    }
    out.pkt.first_fragment = first_fragment as u8;
    out.kind = Kind::L4;
}

/// The ports at the start of a quoted TCP or UDP header.
#[inline(always)]
fn quoted_ports<F: Frame>(ctx: &F, off: usize) -> Option<[u16; 2]> {
    // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
    Some(unsafe { core::ptr::read_unaligned(ptr_at::<[u16; 2]>(ctx, off)?) })
}

/// True when the ICMP message at `icmp_off` is an error quoting a TCP or UDP packet with its
/// ports, which are written to `out.inner`.
#[inline(always)]
fn icmp_error<F: Frame>(ctx: &F, icmp_off: usize, out: &mut Parsed<V4>) -> bool {
    // Type and code, read together: a one-byte bounds check compiles to `ptr >= end`, from
    // which the verifier learns no range.
    // SAFETY: `ptr_at` checks bounds; bytes need no alignment.
    let Some(head) = ptr_at::<[u8; 2]>(ctx, icmp_off) else {
        return false;
    };
    let icmp_type = unsafe { (*head)[0] };
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return false;
    }
    let inner_ip_off = icmp_off + ICMP_HLEN;
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, inner_ip_off) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4
        || ihl < IPV4_HLEN
        || (ip.proto != proto::TCP && ip.proto != proto::UDP)
    {
        return false;
    }
    // A quoted later fragment carries no ports.
    if u16::from_be(ip.frag_off_be) & IP_OFFSET != 0 {
        return false;
    }
    let inner_l4_off = inner_ip_off + ihl;
    let Some(ports) = quoted_ports(ctx, inner_l4_off) else {
        return false;
    };
    out.inner_l4_off = inner_l4_off;
    out.inner.saddr = ip.saddr;
    out.inner.daddr = ip.daddr;
    out.inner.sport_be = ports[0];
    out.inner.dport_be = ports[1];
    out.inner.proto = ip.proto;
    true
}

/// As `icmp_error`, for ICMPv6. A quote whose upper-layer header does not follow the fixed
/// header directly (extension headers) is not one: it passes untranslated.
#[inline(always)]
fn icmpv6_error<F: Frame>(ctx: &F, icmp_off: usize, out: &mut Parsed<V6>) -> bool {
    // SAFETY: `ptr_at` checks bounds; bytes need no alignment (two: see `icmp_error`).
    let Some(head) = ptr_at::<[u8; 2]>(ctx, icmp_off) else {
        return false;
    };
    let icmp_type = unsafe { (*head)[0] };
    if icmp_type == 0 || icmp_type > ICMPV6_ERROR_MAX {
        return false;
    }
    let inner_ip_off = icmp_off + ICMP_HLEN;
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, inner_ip_off) else {
        return false;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    if ip.version_tc_flow[0] >> 4 != 6
        || (ip.next_header != proto::TCP && ip.next_header != proto::UDP)
    {
        return false;
    }
    let inner_l4_off = inner_ip_off + IPV6_HLEN;
    let Some(ports) = quoted_ports(ctx, inner_l4_off) else {
        return false;
    };
    out.inner_l4_off = inner_l4_off;
    out.inner.saddr = ip.saddr;
    out.inner.daddr = ip.daddr;
    out.inner.sport_be = ports[0];
    out.inner.dport_be = ports[1];
    out.inner.proto = ip.next_header;
    true
}

/// What the egress program reads of a packet before deciding whether to parse it: only the
/// linear head, so the node's own traffic is never pulled.
pub enum Head<A> {
    /// ICMP (ICMPv6): maybe an error about a translated flow.
    Icmp,
    /// TCP or UDP right behind the IP header, not a later fragment.
    Ports {
        saddr: A,
        daddr: A,
        proto: u8,
        l4_off: usize,
    },
    /// A later fragment, or IPv6 extension headers: only a full parse tells.
    Deeper { saddr: A },
    /// Anything else.
    Other,
}

/// `Head` of an IPv4 packet.
#[inline(always)]
pub fn peek_ipv4<F: Frame>(ctx: &F) -> Option<Head<V4>> {
    // SAFETY: `ptr_at` checks bounds; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?) };
    if ip.proto == proto::ICMP {
        return Some(Head::Icmp);
    }
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return Some(Head::Other);
    }
    if u16::from_be(ip.frag_off_be) & IP_OFFSET != 0 {
        return Some(Head::Deeper { saddr: ip.saddr });
    }
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_HLEN {
        return None;
    }
    Some(Head::Ports {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        l4_off: ETH_HLEN + ihl,
    })
}

/// `Head` of an IPv6 packet.
#[inline(always)]
pub fn peek_ipv6<F: Frame>(ctx: &F) -> Option<Head<V6>> {
    // SAFETY: `ptr_at` checks bounds; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN)?) };
    Some(match ip.next_header {
        NEXTHDR_ICMPV6 => Head::Icmp,
        proto::TCP | proto::UDP => Head::Ports {
            saddr: ip.saddr,
            daddr: ip.daddr,
            proto: ip.next_header,
            l4_off: ETH_HLEN + IPV6_HLEN,
        },
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST | NEXTHDR_AUTH => {
            Head::Deeper { saddr: ip.saddr }
        }
        _ => Head::Other,
    })
}
