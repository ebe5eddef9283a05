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

/// Returns a pointer to a `T` at `offset` in the linear packet data, or `None` if it would
/// reach past the end. The only way headers are read.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Frame, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// What parsing found; the datapath decides from this.
pub enum Parsed<A> {
    /// An IP header the kernel will reject itself, or an IPv6 header chain not walked.
    Malformed(NoPorts<A>),
    /// Neither TCP nor UDP (fragmented or not).
    NoPorts(NoPorts<A>),
    /// TCP or UDP with an L4 header that is truncated or invalid.
    MalformedL4 { daddr: A },
    /// A complete TCP or UDP header (possibly of a first fragment).
    L4(Packet<A>),
    /// A later fragment of a TCP or UDP datagram: no ports.
    LaterFragment(Fragment<A>),
    /// An ICMP or ICMPv6 error (destination unreachable, packet too big, time exceeded,
    /// parameter problem) quoting a TCP or UDP packet.
    IcmpError(IcmpError<A>),
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

pub struct NoPorts<A> {
    pub daddr: A,
    pub fragment: bool,
}

/// A later fragment of a TCP or UDP datagram.
pub struct Fragment<A> {
    pub key: FragKey<A>,
    pub ttl: u8,
}

/// The fields of a TCP/UDP packet the datapath needs.
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

/// Parses an IPv4 packet (the caller checked the EtherType).
#[inline(always)]
pub fn parse_ipv4<F: Frame>(ctx: &F) -> Parsed<V4> {
    pull_headers(ctx);
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Malformed(NoPorts {
            daddr: [0; 4],
            fragment: false,
        });
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once so later reads
    // are plain loads.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(ip.tot_len_be) as usize;
    let frame_l3_len = ctx.len() as usize - ETH_HLEN;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl || tot_len > frame_l3_len {
        return Parsed::Malformed(NoPorts {
            daddr: ip.daddr,
            fragment: false,
        });
    }

    let frag_off = u16::from_be(ip.frag_off_be);
    let fragment = frag_off & (IP_MF | IP_OFFSET) != 0;
    if !fragment && ip.proto == proto::ICMP {
        if let Some(err) = icmp_error(ctx, ETH_HLEN + ihl, ip.daddr) {
            return Parsed::IcmpError(err);
        }
    }
    let tuple = CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport_be: 0,
        dport_be: 0,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let ip_id_be = ip.id_be as u32;
    // Later fragments are told apart before the ports are read, so MF alone marks a first
    // fragment there. `black_box` keeps the compiler from turning the arithmetic back into a
    // branch.
    let first_fragment = core::hint::black_box(((frag_off & IP_MF) >> 13) as usize);
    let fields = IpFields {
        tuple,
        l4_off: ETH_HLEN + ihl,
        l4_len: tot_len - ihl,
        has_ip_options: ihl > IPV4_HLEN,
        ttl: ip.ttl,
        ip_id_be,
        fragment,
        later_fragment: frag_off & IP_OFFSET != 0,
        first_fragment,
    };
    // `ihl` is at most 60, which bounds the L4 offset for the verifier.
    transport(ctx, fields)
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

/// Parses an IPv6 packet (the caller checked the EtherType), walking up to `MAX_EXT_HEADERS`
/// extension headers to the upper-layer one.
#[inline(always)]
pub fn parse_ipv6<F: Frame>(ctx: &F) -> Parsed<V6> {
    pull_headers(ctx);
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return Parsed::Malformed(NoPorts {
            daddr: [0; 16],
            fragment: false,
        });
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    let payload_len = u16::from_be(ip.payload_len_be) as usize;
    let frame_l3_len = ctx.len() as usize - ETH_HLEN;
    let malformed = NoPorts {
        daddr: ip.daddr,
        fragment: false,
    };
    // A payload length of 0 is a jumbogram (RFC 2675): left to the kernel.
    if ip.version_tc_flow[0] >> 4 != 6 || payload_len == 0 || IPV6_HLEN + payload_len > frame_l3_len
    {
        return Parsed::Malformed(malformed);
    }

    let mut next = ip.next_header;
    let mut ext_len = 0usize;
    let mut frag_word = 0u16;
    let mut ip_id_be = 0u32;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        let off = ETH_HLEN + IPV6_HLEN + ext_len;
        let len = match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH => {
                // SAFETY: `ptr_at` checks bounds; plain byte loads.
                let Some(h) = ptr_at::<[u8; 2]>(ctx, off) else {
                    return Parsed::Malformed(malformed);
                };
                let h = unsafe { *h };
                next = h[0];
                if next == NEXTHDR_AUTH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                }
            }
            NEXTHDR_FRAGMENT => {
                // SAFETY: as above; the fragment header is 8 bytes.
                let Some(h) = ptr_at::<[u8; 8]>(ctx, off) else {
                    return Parsed::Malformed(malformed);
                };
                let h = unsafe { *h };
                next = h[0];
                frag_word = u16::from_be_bytes([h[2], h[3]]);
                ip_id_be = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                fragment = true;
                8
            }
            _ => break,
        };
        ext_len += len;
        if ext_len > MAX_EXT_OFF {
            return Parsed::Malformed(malformed);
        }
    }
    // Still an extension header after the walk: a chain longer than the parser follows.
    if matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_DEST | NEXTHDR_AUTH
    ) {
        return Parsed::Malformed(malformed);
    }
    if ext_len > payload_len {
        return Parsed::Malformed(malformed);
    }
    let l4_off = ETH_HLEN + IPV6_HLEN + ext_len;
    if !fragment && next == NEXTHDR_ICMPV6 {
        if let Some(err) = icmpv6_error(ctx, l4_off, ip.daddr) {
            return Parsed::IcmpError(err);
        }
    }
    let first_fragment = core::hint::black_box((frag_word & IP6_MF) as usize);
    let fields = IpFields {
        tuple: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport_be: 0,
            dport_be: 0,
            proto: next,
            _pad: [0; 3],
        },
        l4_off,
        l4_len: payload_len - ext_len,
        has_ip_options: ext_len != 0,
        ttl: ip.hop_limit,
        ip_id_be,
        fragment,
        later_fragment: frag_word & IP6_OFFSET != 0,
        first_fragment,
    };
    transport(ctx, fields)
}

/// What the IP layer of either family found, for the transport parser.
struct IpFields<A> {
    tuple: CtKey<A>,
    l4_off: usize,
    l4_len: usize,
    has_ip_options: bool,
    ttl: u8,
    ip_id_be: u32,
    /// Any fragment of a fragmented datagram; a later one (offset > 0); 1 for a first one.
    fragment: bool,
    later_fragment: bool,
    first_fragment: usize,
}

/// The TCP or UDP header behind the IP layer, for both families.
#[inline(always)]
fn transport<F: Frame, A: Addr>(ctx: &F, ip: IpFields<A>) -> Parsed<A> {
    let t = ip.tuple;
    let ports = t.proto == proto::TCP || t.proto == proto::UDP;
    if ports && ip.later_fragment {
        return Parsed::LaterFragment(Fragment {
            key: FragKey {
                saddr: t.saddr,
                daddr: t.daddr,
                id_be: ip.ip_id_be,
                proto: t.proto,
                _pad: [0; 3],
            },
            ttl: ip.ttl,
        });
    }
    if !ports {
        return Parsed::NoPorts(NoPorts {
            daddr: t.daddr,
            fragment: ip.fragment,
        });
    }

    let (l4_off, l4_len) = (ip.l4_off, ip.l4_len);
    let mut pkt = Packet {
        tuple: t,
        l4_off,
        has_ip_options: ip.has_ip_options,
        ttl: ip.ttl,
        first_fragment: ip.first_fragment as u8,
        ip_id_be: ip.ip_id_be,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_ack: 0,
        l4_payload_len: 0,
        l4_len: l4_len as u16,
    };
    let malformed = Parsed::MalformedL4 { daddr: t.daddr };

    if t.proto == proto::TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_off) else {
            return malformed;
        };
        // SAFETY: `ptr_at` checked the header lies inside the packet.
        let tcp = unsafe { core::ptr::read_unaligned(tcp) };
        let doff = ((tcp.doff_res >> 4) as usize) * 4;
        if doff < TCP_HLEN || doff > l4_len {
            return malformed;
        }
        pkt.tuple.sport_be = tcp.sport_be;
        pkt.tuple.dport_be = tcp.dport_be;
        pkt.tcp_flags = tcp.flags & (tcpf::FIN | tcpf::SYN | tcpf::RST | tcpf::PSH | tcpf::ACK);
        pkt.tcp_seq = u32::from_be(tcp.seq_be);
        pkt.tcp_ack = u32::from_be(tcp.ack_be);
        pkt.l4_payload_len = (l4_len - doff) as u32;
    } else {
        let Some(udp) = ptr_at::<UdpHdr>(ctx, l4_off) else {
            return malformed;
        };
        // SAFETY: `ptr_at` checked the header lies inside the packet.
        let udp = unsafe { core::ptr::read_unaligned(udp) };
        let udp_len = u16::from_be(udp.len_be) as usize;
        // A first fragment holds only part of the datagram its length describes: no upper
        // bound for it.
        let udp_len_max = l4_len | (ip.first_fragment * 0xffff);
        if udp_len < UDP_HLEN || udp_len > udp_len_max {
            return malformed;
        }
        pkt.tuple.sport_be = udp.sport_be;
        pkt.tuple.dport_be = udp.dport_be;
        pkt.l4_payload_len = (udp_len - UDP_HLEN) as u32;
    }
    Parsed::L4(pkt)
}

/// The ports at the start of a quoted TCP or UDP header.
#[inline(always)]
fn quoted_ports<F: Frame>(ctx: &F, off: usize) -> Option<[u16; 2]> {
    // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
    Some(unsafe { core::ptr::read_unaligned(ptr_at::<[u16; 2]>(ctx, off)?) })
}

/// Parses the ICMP message at `icmp_off`, if it is an error quoting a TCP or UDP packet with
/// its ports.
#[inline(always)]
fn icmp_error<F: Frame>(ctx: &F, icmp_off: usize, daddr: V4) -> Option<IcmpError<V4>> {
    // Type and code, read together: a one-byte bounds check compiles to `ptr >= end`, from
    // which the verifier learns no range.
    // SAFETY: `ptr_at` checks bounds; bytes need no alignment.
    let [icmp_type, _code] = unsafe { *ptr_at::<[u8; 2]>(ctx, icmp_off)? };
    if icmp_type != ICMP_DEST_UNREACH
        && icmp_type != ICMP_TIME_EXCEEDED
        && icmp_type != ICMP_PARAMETER_PROBLEM
    {
        return None;
    }
    let inner_ip_off = icmp_off + ICMP_HLEN;
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ptr_at::<Ipv4Hdr>(ctx, inner_ip_off)?) };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ip.version_ihl >> 4 != 4
        || ihl < IPV4_HLEN
        || (ip.proto != proto::TCP && ip.proto != proto::UDP)
    {
        return None;
    }
    // A quoted later fragment carries no ports.
    if u16::from_be(ip.frag_off_be) & IP_OFFSET != 0 {
        return None;
    }
    let inner_l4_off = inner_ip_off + ihl;
    let ports = quoted_ports(ctx, inner_l4_off)?;
    Some(IcmpError {
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport_be: ports[0],
            dport_be: ports[1],
            proto: ip.proto,
            _pad: [0; 3],
        },
        daddr,
    })
}

/// Parses the ICMPv6 message at `icmp_off`, if it is an error quoting a TCP or UDP packet
/// whose upper-layer header follows the fixed header directly (a quote with extension headers
/// is passed untranslated).
#[inline(always)]
fn icmpv6_error<F: Frame>(ctx: &F, icmp_off: usize, daddr: V6) -> Option<IcmpError<V6>> {
    // Type and code, read together: a one-byte bounds check compiles to `ptr >= end`, from
    // which the verifier learns no range.
    // SAFETY: `ptr_at` checks bounds; bytes need no alignment.
    let [icmp_type, _code] = unsafe { *ptr_at::<[u8; 2]>(ctx, icmp_off)? };
    if icmp_type == 0 || icmp_type > ICMPV6_ERROR_MAX {
        return None;
    }
    let inner_ip_off = icmp_off + ICMP_HLEN;
    // SAFETY: `ptr_at` checked the header lies inside the packet; copied once.
    let ip = unsafe { core::ptr::read_unaligned(ptr_at::<Ipv6Hdr>(ctx, inner_ip_off)?) };
    if ip.version_tc_flow[0] >> 4 != 6
        || (ip.next_header != proto::TCP && ip.next_header != proto::UDP)
    {
        return None;
    }
    let inner_l4_off = inner_ip_off + IPV6_HLEN;
    let ports = quoted_ports(ctx, inner_l4_off)?;
    Some(IcmpError {
        icmp_off,
        inner_ip_off,
        inner_l4_off,
        inner: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport_be: ports[0],
            dport_be: ports[1],
            proto: ip.next_header,
            _pad: [0; 3],
        },
        daddr,
    })
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
