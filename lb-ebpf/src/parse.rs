//! Ethernet, IPv4, TCP and UDP parsing into a plain `Packet` of the fields the datapath uses.
//!
//! Parsing never writes. Every header read goes through `ptr_at`, the one bounds check.

use aya_ebpf::programs::{TcContext, XdpContext};
use lb_common::{conntrack::flags as tcpf, proto, CtKey, FragKey};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// ICMP header: type, code, checksum, 4 bytes of type-specific data.
pub const ICMP_HLEN: usize = 8;
/// Enough linear data for Ethernet, the longest IPv4 header and a TCP header, or for an ICMP
/// error quoting the longest IPv4 header and 8 bytes of its payload.
const MAX_HEADERS: u32 = (ETH_HLEN + 60 + ICMP_HLEN + 60 + 8) as u32;

/// IPv4 flag and fragment-offset bits of `frag_off` (host order).
const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

/// Offsets of the IPv4 fields the datapath rewrites, from the start of the frame.
pub const IP_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP_CHECK_OFF: usize = ETH_HLEN + 10;
pub const IP_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP_DADDR_OFF: usize = ETH_HLEN + 16;

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
pub enum Parsed {
    /// Not IPv4.
    NotIpv4,
    /// An IPv4 header the kernel will reject itself.
    MalformedIpv4,
    /// IPv4, but not TCP or UDP (fragmented or not).
    NoPorts(NoPorts),
    /// IPv4 TCP or UDP with an L4 header that is truncated or invalid.
    MalformedL4 { daddr: [u8; 4] },
    /// A complete IPv4 TCP or UDP header (possibly of a first fragment).
    L4(Packet),
    /// A later fragment of a TCP or UDP datagram: no ports.
    LaterFragment(Fragment),
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting a TCP
    /// or UDP packet.
    IcmpError(IcmpError),
}

/// Where an ICMP error's fields are, and the 5-tuple of the packet it quotes.
pub struct IcmpError {
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// Offset of the quoted IPv4 header, and of its L4 header.
    pub inner_ip_off: usize,
    pub inner_l4_off: usize,
    /// The quoted packet's tuple, as it was sent.
    pub inner: CtKey,
    /// The outer destination (who gets the error).
    pub daddr: [u8; 4],
}

/// ICMP types that quote the packet they are about (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

pub struct NoPorts {
    pub daddr: [u8; 4],
    pub fragment: bool,
}

/// A later fragment of a TCP or UDP datagram.
pub struct Fragment {
    pub key: FragKey,
    pub ttl: u8,
}

/// The fields of an IPv4 TCP/UDP packet the datapath needs.
pub struct Packet {
    /// The 5-tuple as it arrived.
    pub tuple: CtKey,
    /// Offset of the L4 header from the start of the frame (after any IP options).
    pub l4_off: usize,
    /// True when the IPv4 header carries options (IHL > 5).
    pub has_ip_options: bool,
    /// IPv4 time to live.
    pub ttl: u8,
    /// 1 for the first fragment of a fragmented datagram (MF set, offset 0), else 0. A
    /// number, not a `bool`, and computed without a branch: the verifier would otherwise
    /// walk every later path twice, once per value.
    pub first_fragment: u8,
    /// IPv4 identification, network byte order (names the datagram of a fragment).
    pub ip_id_be: u32,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// TCP sequence and acknowledgement numbers, host order (0 for UDP).
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// L4 payload length from the IP total length (for the RST's acknowledgement number).
    pub l4_payload_len: u32,
    /// L4 header and payload length from the IP total length (the pseudo-header's length).
    pub l4_len: u16,
}

impl Packet {
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
struct EthHdr {
    dst: [u8; 6],
    src: [u8; 6],
    ether_type_be: u16,
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

#[inline(always)]
pub fn parse<F: Frame>(ctx: &F) -> Parsed {
    // Headers may sit partly in paged data (GRO, large sends); make them linear first.
    // Failure is harmless: the bounds checks below then treat the packet as short.
    let want = if ctx.len() < MAX_HEADERS {
        ctx.len()
    } else {
        MAX_HEADERS
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        ctx.pull(want);
    }

    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::NotIpv4;
    };
    // SAFETY: `ptr_at` checked the header lies inside the packet.
    if u16::from_be(unsafe { (*eth).ether_type_be }) != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return Parsed::MalformedIpv4;
    };
    // SAFETY: as above; copy the header once so later reads are plain loads.
    let ip = unsafe { core::ptr::read_unaligned(ip) };
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(ip.tot_len_be) as usize;
    let frame_l3_len = ctx.len() as usize - ETH_HLEN;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_HLEN || tot_len < ihl || tot_len > frame_l3_len {
        return Parsed::MalformedIpv4;
    }

    let frag_off = u16::from_be(ip.frag_off_be);
    let fragment = frag_off & (IP_MF | IP_OFFSET) != 0;
    if !fragment && ip.proto == proto::ICMP {
        if let Some(err) = icmp_error(ctx, ETH_HLEN + ihl, ip.daddr) {
            return Parsed::IcmpError(err);
        }
    }
    let ports = ip.proto == proto::TCP || ip.proto == proto::UDP;
    if ports && frag_off & IP_OFFSET != 0 {
        return Parsed::LaterFragment(Fragment {
            key: FragKey {
                saddr: ip.saddr,
                daddr: ip.daddr,
                id_be: ip.id_be as u32,
                proto: ip.proto,
                _pad: [0; 3],
            },
            ttl: ip.ttl,
        });
    }
    if !ports {
        return Parsed::NoPorts(NoPorts {
            daddr: ip.daddr,
            fragment,
        });
    }

    // `ihl` is at most 60, which bounds the offset for the verifier.
    let l4_off = ETH_HLEN + ihl;
    let l4_len = tot_len - ihl;
    // Later fragments returned above, so MF alone marks a first fragment. `black_box` keeps
    // the compiler from turning the arithmetic below back into a branch.
    let first_fragment = core::hint::black_box(((frag_off & IP_MF) >> 13) as usize);
    let mut pkt = Packet {
        tuple: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport_be: 0,
            dport_be: 0,
            proto: ip.proto,
            _pad: [0; 3],
        },
        l4_off,
        has_ip_options: ihl > IPV4_HLEN,
        ttl: ip.ttl,
        first_fragment: first_fragment as u8,
        ip_id_be: ip.id_be as u32,
        tcp_flags: 0,
        tcp_seq: 0,
        tcp_ack: 0,
        l4_payload_len: 0,
        l4_len: l4_len as u16,
    };
    let malformed = Parsed::MalformedL4 { daddr: ip.daddr };

    if ip.proto == proto::TCP {
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
        let udp_len_max = l4_len | (first_fragment * 0xffff);
        if udp_len < UDP_HLEN || udp_len > udp_len_max {
            return malformed;
        }
        pkt.tuple.sport_be = udp.sport_be;
        pkt.tuple.dport_be = udp.dport_be;
        pkt.l4_payload_len = (udp_len - UDP_HLEN) as u32;
    }
    Parsed::L4(pkt)
}

/// Parses the ICMP message at `icmp_off`, if it is an error quoting a TCP or UDP packet with
/// its ports.
#[inline(always)]
fn icmp_error<F: Frame>(ctx: &F, icmp_off: usize, daddr: [u8; 4]) -> Option<IcmpError> {
    // SAFETY: `ptr_at` checks bounds; a byte needs no alignment.
    let icmp_type = unsafe { *ptr_at::<u8>(ctx, icmp_off)? };
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
    // Both TCP and UDP start with the two ports.
    // SAFETY: `ptr_at` checked the 4 bytes lie inside the packet.
    let ports = unsafe { core::ptr::read_unaligned(ptr_at::<[u16; 2]>(ctx, inner_l4_off)?) };
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
