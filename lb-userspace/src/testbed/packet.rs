//! A small builder for the Ethernet/IPv4 and Ethernet/IPv6 frames (TCP, UDP, ICMP, ICMPv6)
//! the datapath fixtures feed through BPF_PROG_TEST_RUN, including the malformed shapes the
//! datapath must survive.
//!
//! Checksums are computed with `lb_common::checksum` (itself tested against RFC vectors);
//! tests verify outputs with an independent implementation: etherparse, or for IPv6 the
//! readers at the end of this file ([`parse6`], [`verify6`]), which share no arithmetic with
//! the builder and are themselves checked against etherparse.

use std::net::{Ipv4Addr, Ipv6Addr};

use lb_common::{checksum, proto};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// TCP flag bits, re-exported for tables.
pub use lb_common::conntrack::flags as tcp;

/// The L4 part of a frame.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
        zero_checksum: bool,
    },
    /// Raw bytes after the IP header with the given protocol number (ICMP, GRE, ...), sent
    /// as they are: no checksum is computed.
    Raw { proto: u8, bytes: Vec<u8> },
    /// An ICMP message of the frame's family, the payload being its body: ICMP (protocol 1,
    /// checksum over the message) in a [`Frame`], ICMPv6 (next header 58, checksum over the
    /// IPv6 pseudo-header and the message) in a [`Frame6`].
    Icmp {
        icmp_type: u8,
        code: u8,
        /// The 4 type-specific bytes after the checksum (the MTU of a packet too big, ...).
        rest: [u8; 4],
    },
}

impl L4 {
    /// The L4 header as it goes on the wire (checksum zero), and its protocol number in a
    /// frame of the given family.
    fn header(&self, payload_len: usize, v6: bool) -> (u8, Vec<u8>) {
        match self {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
            } => {
                let mut h = Vec::with_capacity(20);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(5 << 4);
                h.push(*flags);
                h.extend_from_slice(&64240u16.to_be_bytes());
                h.extend_from_slice(&[0, 0, 0, 0]);
                (proto::TCP, h)
            }
            L4::Udp { sport, dport, .. } => {
                let mut h = Vec::with_capacity(8);
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                (proto::UDP, h)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
            L4::Icmp {
                icmp_type,
                code,
                rest,
            } => {
                let mut h = vec![*icmp_type, *code, 0, 0];
                h.extend_from_slice(rest);
                (if v6 { proto6::ICMPV6 } else { proto::ICMP }, h)
            }
        }
    }

    /// Fills in the checksum of `l4` (header and payload), given the pseudo-header sum.
    fn fill_checksum(&self, l4: &mut [u8], pseudo: u32) {
        match self {
            L4::Tcp { .. } => {
                let c = checksum::fold(checksum::sum_bytes(pseudo, l4));
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                zero_checksum: false,
                ..
            } => {
                let mut c = checksum::fold(checksum::sum_bytes(pseudo, l4));
                if c == 0 {
                    c = 0xffff; // RFC 768: a computed zero is sent as all ones
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
            L4::Icmp { .. } => {
                let c = checksum::fold(checksum::sum_bytes(pseudo, l4));
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                zero_checksum: true,
                ..
            }
            | L4::Raw { .. } => {}
        }
    }
}

/// A frame description; `build` renders it.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub ttl: u8,
    pub ip_id: u16,
    /// IPv4 options (padded to a multiple of 4 by `build`).
    pub ip_options: Vec<u8>,
    /// Raw flags + fragment offset field (host order): 0x4000 is DF, 0x2000 MF.
    pub frag_off: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn tcp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, flags: u8) -> Frame {
        Frame::new(
            saddr,
            daddr,
            L4::Tcp {
                sport,
                dport,
                seq: 1000,
                ack: 0,
                flags,
            },
        )
    }

    pub fn udp(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16) -> Frame {
        Frame::new(
            saddr,
            daddr,
            L4::Udp {
                sport,
                dport,
                zero_checksum: false,
            },
        )
    }

    /// An ICMP error (`icmp_type`, `code`, 4 type-specific bytes such as the next-hop MTU)
    /// from `saddr` to `daddr`, quoting `quoted`: the start of an IPv4 packet as sent (its
    /// header and at least 8 bytes of payload, RFC 792).
    pub fn icmp_error(
        saddr: Ipv4Addr,
        daddr: Ipv4Addr,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quoted: &[u8],
    ) -> Frame {
        let mut bytes = vec![icmp_type, code, 0, 0];
        bytes.extend_from_slice(&rest);
        bytes.extend_from_slice(quoted);
        let c = checksum::fold(checksum::sum_bytes(0, &bytes));
        bytes[2..4].copy_from_slice(&c.to_be_bytes());
        Frame::new(
            saddr,
            daddr,
            L4::Raw {
                proto: lb_common::proto::ICMP,
                bytes,
            },
        )
    }

    pub fn new(saddr: Ipv4Addr, daddr: Ipv4Addr, l4: L4) -> Frame {
        Frame {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            saddr,
            daddr,
            ttl: 64,
            ip_id: 0x1234,
            ip_options: Vec::new(),
            frag_off: 0x4000,
            l4,
            payload: Vec::new(),
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Frame {
        self.payload = p.to_vec();
        self
    }

    /// Renders the frame with correct lengths and checksums.
    pub fn build(&self) -> Vec<u8> {
        let mut opts = self.ip_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0); // end-of-options padding
        }
        let (l4_proto, mut l4) = self.l4.header(self.payload.len(), false);
        l4.extend_from_slice(&self.payload);
        // ICMP's checksum has no pseudo-header; TCP's and UDP's have one.
        let pseudo = if matches!(self.l4, L4::Icmp { .. }) {
            0
        } else {
            checksum::pseudo_header(
                self.saddr.octets(),
                self.daddr.octets(),
                l4_proto,
                l4.len() as u16,
            )
        };
        self.l4.fill_checksum(&mut l4, pseudo);

        let ihl = 20 + opts.len();
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag_off.to_be_bytes());
        ip.push(self.ttl);
        ip.push(l4_proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.saddr.octets());
        ip.extend_from_slice(&self.daddr.octets());
        ip.extend_from_slice(&opts);
        let c = checksum::fold(checksum::sum_bytes(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut f = Vec::with_capacity(14 + ip.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&l4);
        f
    }
}

/// Rewrites an IPv4 header field of a built frame and fixes the header checksum, for
/// malformed-input cases that need a valid checksum on an invalid header.
pub fn patch_ipv4(frame: &mut [u8], offset_in_ip: usize, bytes: &[u8]) {
    frame[14 + offset_in_ip..14 + offset_in_ip + bytes.len()].copy_from_slice(bytes);
    let ihl = ((frame[14] & 0x0f) as usize * 4).clamp(20, frame.len() - 14);
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = checksum::fold(checksum::sum_bytes(0, &frame[14..14 + ihl]));
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// IPv6 next-header values the builder and readers know (`lb_common::proto` has the
/// protocols both families share).
pub mod proto6 {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    pub const NO_NEXT_HEADER: u8 = 59;
    pub const DEST_OPTS: u8 = 60;
}

/// ICMPv6 types and codes (RFC 4443) the fixtures use.
pub mod icmp6 {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
    /// Destination unreachable codes.
    pub const NO_ROUTE: u8 = 0;
    pub const ADMIN_PROHIBITED: u8 = 1;
    pub const ADDR_UNREACHABLE: u8 = 3;
    pub const PORT_UNREACHABLE: u8 = 4;
    /// Time exceeded codes.
    pub const HOP_LIMIT_EXCEEDED: u8 = 0;
    pub const REASSEMBLY_TIME_EXCEEDED: u8 = 1;
}

/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// The IPv6 minimum link MTU: an ICMPv6 error quotes as much of the offending packet as fits
/// in it (RFC 4443 2.4 (c)).
pub const IPV6_MIN_MTU: usize = 1280;

/// An IPv6 extension header between the fixed header and the L4 header.
#[derive(Clone, Debug)]
pub enum Ext6 {
    /// Hop-by-hop options: the option TLVs, padded by `build` (Pad1/PadN) to a multiple of 8.
    HopByHop(Vec<u8>),
    /// Destination options, padded the same way.
    DestOpts(Vec<u8>),
    /// A fragment header. `offset` is in bytes (a multiple of 8). `build` puts the L4 header
    /// behind it whatever the offset; [`fragments6`] makes real fragments.
    Fragment { offset: u16, more: bool, id: u32 },
}

impl Ext6 {
    fn next_header_value(&self) -> u8 {
        match self {
            Ext6::HopByHop(_) => proto6::HOP_BY_HOP,
            Ext6::DestOpts(_) => proto6::DEST_OPTS,
            Ext6::Fragment { .. } => proto6::FRAGMENT,
        }
    }

    /// The header on the wire, followed by a header of type `next`.
    fn render(&self, next: u8) -> Vec<u8> {
        match self {
            Ext6::HopByHop(options) | Ext6::DestOpts(options) => {
                let mut h = vec![next, 0];
                h.extend_from_slice(options);
                match (8 - h.len() % 8) % 8 {
                    0 => {}
                    1 => h.push(0), // Pad1
                    n => {
                        h.extend_from_slice(&[1, (n - 2) as u8]); // PadN
                        h.resize(h.len() + n - 2, 0);
                    }
                }
                h[1] = (h.len() / 8 - 1) as u8;
                h
            }
            Ext6::Fragment { offset, more, id } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset & !7) | u16::from(*more)).to_be_bytes());
                h.extend_from_slice(&id.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 frame description; `build` renders it. The L4 part is shared with [`Frame`].
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub saddr: Ipv6Addr,
    pub daddr: Ipv6Addr,
    pub hop_limit: u8,
    pub traffic_class: u8,
    /// The flow label (20 bits).
    pub flow_label: u32,
    /// Extension headers, in order, between the fixed header and the L4 header.
    pub ext: Vec<Ext6>,
    pub l4: L4,
    pub payload: Vec<u8>,
}

impl Frame6 {
    pub fn tcp(saddr: Ipv6Addr, sport: u16, daddr: Ipv6Addr, dport: u16, flags: u8) -> Frame6 {
        Frame6::new(
            saddr,
            daddr,
            L4::Tcp {
                sport,
                dport,
                seq: 1000,
                ack: 0,
                flags,
            },
        )
    }

    pub fn udp(saddr: Ipv6Addr, sport: u16, daddr: Ipv6Addr, dport: u16) -> Frame6 {
        Frame6::new(
            saddr,
            daddr,
            L4::Udp {
                sport,
                dport,
                zero_checksum: false,
            },
        )
    }

    /// An ICMPv6 error (`icmp_type`, `code`, 4 type-specific bytes) from `saddr` to `daddr`
    /// quoting the IPv6 packet of `quoted_frame` (an Ethernet frame, as built), cut so that the
    /// error fits in [`IPV6_MIN_MTU`].
    pub fn icmp6_error(
        saddr: Ipv6Addr,
        daddr: Ipv6Addr,
        icmp_type: u8,
        code: u8,
        rest: [u8; 4],
        quoted_frame: &[u8],
    ) -> Frame6 {
        let packet = &quoted_frame[14.min(quoted_frame.len())..];
        let room = IPV6_MIN_MTU - 40 - 8;
        Frame6::new(
            saddr,
            daddr,
            L4::Icmp {
                icmp_type,
                code,
                rest,
            },
        )
        .payload(&packet[..packet.len().min(room)])
    }

    /// Destination unreachable (type 1) with `code` ([`icmp6::PORT_UNREACHABLE`], ...).
    pub fn dest_unreachable(
        saddr: Ipv6Addr,
        daddr: Ipv6Addr,
        code: u8,
        quoted_frame: &[u8],
    ) -> Frame6 {
        let t = icmp6::DEST_UNREACHABLE;
        Frame6::icmp6_error(saddr, daddr, t, code, [0; 4], quoted_frame)
    }

    /// Packet too big (type 2) announcing `mtu`.
    pub fn packet_too_big(
        saddr: Ipv6Addr,
        daddr: Ipv6Addr,
        mtu: u32,
        quoted_frame: &[u8],
    ) -> Frame6 {
        let t = icmp6::PACKET_TOO_BIG;
        Frame6::icmp6_error(saddr, daddr, t, 0, mtu.to_be_bytes(), quoted_frame)
    }

    /// Time exceeded (type 3) with `code` ([`icmp6::HOP_LIMIT_EXCEEDED`], ...).
    pub fn time_exceeded(
        saddr: Ipv6Addr,
        daddr: Ipv6Addr,
        code: u8,
        quoted_frame: &[u8],
    ) -> Frame6 {
        let t = icmp6::TIME_EXCEEDED;
        Frame6::icmp6_error(saddr, daddr, t, code, [0; 4], quoted_frame)
    }

    pub fn new(saddr: Ipv6Addr, daddr: Ipv6Addr, l4: L4) -> Frame6 {
        Frame6 {
            src_mac: CLIENT_MAC,
            dst_mac: NODE_MAC,
            saddr,
            daddr,
            hop_limit: 64,
            traffic_class: 0,
            flow_label: 0,
            ext: Vec::new(),
            l4,
            payload: Vec::new(),
        }
    }

    pub fn payload(mut self, p: &[u8]) -> Frame6 {
        self.payload = p.to_vec();
        self
    }

    /// Appends an extension header (after those already there).
    pub fn ext(mut self, e: Ext6) -> Frame6 {
        self.ext.push(e);
        self
    }

    /// Renders the frame with correct lengths and checksums. The L4 checksum covers the L4
    /// header and payload of this frame (the upper-layer length excludes extension headers,
    /// RFC 8200 8.1).
    pub fn build(&self) -> Vec<u8> {
        let (l4_proto, mut l4) = self.l4.header(self.payload.len(), true);
        l4.extend_from_slice(&self.payload);
        let pseudo = checksum::pseudo_header(
            self.saddr.octets(),
            self.daddr.octets(),
            l4_proto,
            l4.len() as u16,
        );
        self.l4.fill_checksum(&mut l4, pseudo);

        let mut exts = Vec::new();
        for (i, e) in self.ext.iter().enumerate() {
            let next = self
                .ext
                .get(i + 1)
                .map_or(l4_proto, Ext6::next_header_value);
            exts.extend_from_slice(&e.render(next));
        }
        let first = self.ext.first().map_or(l4_proto, Ext6::next_header_value);

        let mut f = Vec::with_capacity(14 + 40 + exts.len() + l4.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        let vtf = 6u32 << 28 | u32::from(self.traffic_class) << 20 | (self.flow_label & 0xf_ffff);
        f.extend_from_slice(&vtf.to_be_bytes());
        f.extend_from_slice(&((exts.len() + l4.len()) as u16).to_be_bytes());
        f.push(first);
        f.push(self.hop_limit);
        f.extend_from_slice(&self.saddr.octets());
        f.extend_from_slice(&self.daddr.octets());
        f.extend_from_slice(&exts);
        f.extend_from_slice(&l4);
        f
    }
}

/// Splits a built IPv6 frame in two fragments with identification `id`, the first carrying
/// `first_len` bytes of the fragmentable part (a multiple of 8, less than all of it), as a
/// host would (RFC 8200 4.5): the fragment header goes after the unfragmentable part (the
/// fixed header, and hop-by-hop and routing headers with any destination options before a
/// routing header); destination options for the final destination, the L4 header and the
/// payload are fragmented. Panics on a frame that is not IPv6 or is already a fragment.
pub fn fragments6(frame: &[u8], first_len: usize, id: u32) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(first_len % 8, 0, "fragment offsets are multiples of 8");
    assert_eq!(frame[12..14], ETH_P_IPV6.to_be_bytes(), "not an IPv6 frame");
    // The next-header byte that names the first fragmentable header, and where that starts.
    let (mut nh_at, mut unfrag_end) = (14 + 6, 14 + 40);
    let mut pos = 14 + 40;
    let mut nh = frame[nh_at];
    while matches!(nh, proto6::HOP_BY_HOP | proto6::ROUTING | proto6::DEST_OPTS) {
        let len = (frame[pos + 1] as usize + 1) * 8;
        if nh != proto6::DEST_OPTS {
            (nh_at, unfrag_end) = (pos, pos + len);
        }
        nh = frame[pos];
        pos += len;
    }
    assert_ne!(nh, proto6::FRAGMENT, "the frame is a fragment already");
    let first_nh = frame[nh_at];
    let mut head = frame[..unfrag_end].to_vec();
    head[nh_at] = proto6::FRAGMENT;
    let rest = &frame[unfrag_end..];
    assert!(
        first_len > 0 && first_len < rest.len(),
        "first_len {first_len} must split the {} fragmentable bytes",
        rest.len()
    );
    let piece = |data: &[u8], offset: usize, more: bool| {
        let mut f = head.clone();
        let field = offset as u16 | u16::from(more);
        f.extend_from_slice(&[first_nh, 0]);
        f.extend_from_slice(&field.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(data);
        let payload_len = (f.len() - 14 - 40) as u16;
        f[18..20].copy_from_slice(&payload_len.to_be_bytes());
        f
    };
    (
        piece(&rest[..first_len], 0, true),
        piece(&rest[first_len..], first_len, false),
    )
}

/// What is wrong with a frame a reader was given.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadFrame {
    #[error("not an IPv6 frame (EtherType {0:#06x})")]
    NotIpv6(u16),
    #[error("frame truncated: {0}")]
    Truncated(String),
    #[error("IPv6 payload length {declared} but {present} bytes follow the header")]
    Length { declared: usize, present: usize },
    #[error("{proto} checksum {found:#06x}, expected {expected:#06x}")]
    Checksum {
        proto: &'static str,
        found: u16,
        expected: u16,
    },
    #[error("UDP over IPv6 with a zero checksum (RFC 8200 8.1 forbids it)")]
    ZeroUdpChecksum,
    #[error("a fragment (offset {offset}, more {more}): reassemble it before verifying")]
    Fragment { offset: u16, more: bool },
    #[error("cannot reassemble: {0}")]
    Reassembly(String),
    #[error("no L4 checksum to verify in next header {0}")]
    NoChecksum(u8),
}

/// A fragment header as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment6 {
    /// Offset in bytes.
    pub offset: u16,
    pub more: bool,
    pub id: u32,
}

/// An IPv6 packet as read by [`parse6`] or [`Ipv6View::packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv6View<'a> {
    pub saddr: Ipv6Addr,
    pub daddr: Ipv6Addr,
    pub hop_limit: u8,
    /// The next header after the extension headers: TCP, UDP, ICMPv6, ...
    pub proto: u8,
    /// The extension headers' types, in order.
    pub ext: Vec<u8>,
    pub fragment: Option<Fragment6>,
    /// Everything after the extension headers, up to the payload length (or the end of a
    /// truncated packet, such as one quoted in an ICMPv6 error).
    pub l4: &'a [u8],
    /// The packet was shorter than its payload length says.
    pub truncated: bool,
}

impl<'a> Ipv6View<'a> {
    /// Reads an IPv6 packet (no Ethernet header), walking its extension headers. A packet cut
    /// short after its L4 header started is accepted and marked `truncated`.
    pub fn packet(ip: &'a [u8]) -> Result<Ipv6View<'a>, BadFrame> {
        if ip.len() < 40 || ip[0] >> 4 != 6 {
            return Err(BadFrame::Truncated(format!(
                "{} bytes, version {}",
                ip.len(),
                ip.first().map_or(0, |b| b >> 4)
            )));
        }
        let declared = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let truncated = ip.len() < 40 + declared;
        let end = ip.len().min(40 + declared);
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
        let (mut nh, mut pos) = (ip[6], 40);
        let (mut ext, mut fragment) = (Vec::new(), None);
        while matches!(
            nh,
            proto6::HOP_BY_HOP | proto6::ROUTING | proto6::DEST_OPTS | proto6::FRAGMENT
        ) {
            if pos + 8 > end {
                return Err(BadFrame::Truncated(format!(
                    "extension header {nh} at {pos}"
                )));
            }
            ext.push(nh);
            let this = nh;
            nh = ip[pos];
            if this == proto6::FRAGMENT {
                let field = u16::from_be_bytes([ip[pos + 2], ip[pos + 3]]);
                let f = Fragment6 {
                    offset: field & !7,
                    more: field & 1 != 0,
                    id: u32::from_be_bytes([ip[pos + 4], ip[pos + 5], ip[pos + 6], ip[pos + 7]]),
                };
                fragment = Some(f);
                pos += 8;
                if f.offset != 0 {
                    break; // the rest is data from the middle of the datagram, not headers
                }
            } else {
                pos += (usize::from(ip[pos + 1]) + 1) * 8;
            }
        }
        if pos > end {
            return Err(BadFrame::Truncated("extension headers".into()));
        }
        Ok(Ipv6View {
            saddr: addr(8),
            daddr: addr(24),
            hop_limit: ip[7],
            proto: nh,
            ext,
            fragment,
            l4: &ip[pos..end],
            truncated,
        })
    }

    /// Whether this is a fragment other than the first, whose L4 bytes are not a header
    /// (`proto` is then the fragment header's next header, `l4` the fragment's data).
    pub fn is_later_fragment(&self) -> bool {
        self.fragment.is_some_and(|f| f.offset != 0)
    }

    /// TCP or UDP source and destination ports (`None` for other protocols, later
    /// fragments and too short L4 parts).
    pub fn ports(&self) -> Option<(u16, u16)> {
        if !matches!(self.proto, proto::TCP | proto::UDP)
            || self.is_later_fragment()
            || self.l4.len() < 4
        {
            return None;
        }
        let p = self.l4;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        ))
    }

    /// The payload after the TCP, UDP or ICMPv6 header (for ICMPv6 errors: the quoted packet).
    pub fn l4_payload(&self) -> &'a [u8] {
        let header_len = match self.proto {
            proto::TCP if self.l4.len() >= 20 => usize::from(self.l4[12] >> 4) * 4,
            proto::UDP | proto6::ICMPV6 => 8,
            _ => 0,
        };
        &self.l4[header_len.min(self.l4.len())..]
    }
}

/// Reads an Ethernet frame carrying IPv6. Lengths are checked, checksums are not (see
/// [`verify6`]).
pub fn parse6(frame: &[u8]) -> Result<Ipv6View<'_>, BadFrame> {
    if frame.len() < 14 {
        return Err(BadFrame::Truncated(format!("{} bytes", frame.len())));
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETH_P_IPV6 {
        return Err(BadFrame::NotIpv6(ethertype));
    }
    let view = Ipv6View::packet(&frame[14..])?;
    if view.truncated {
        let declared = usize::from(u16::from_be_bytes([frame[18], frame[19]]));
        return Err(BadFrame::Length {
            declared,
            present: frame.len() - 14 - 40,
        });
    }
    Ok(view)
}

/// Reads an IPv6 frame and verifies its TCP, UDP or ICMPv6 checksum over the IPv6
/// pseudo-header, with arithmetic of its own (not `lb_common::checksum`, which the builder
/// and the datapath use). Fragments are refused: [`reassemble6`] them first.
pub fn verify6(frame: &[u8]) -> Result<Ipv6View<'_>, BadFrame> {
    let view = parse6(frame)?;
    if let Some(f) = view.fragment {
        if f.offset != 0 || f.more {
            return Err(BadFrame::Fragment {
                offset: f.offset,
                more: f.more,
            });
        }
    }
    let (name, at, min) = match view.proto {
        proto::TCP => ("TCP", 16, 20),
        proto::UDP => ("UDP", 6, 8),
        proto6::ICMPV6 => ("ICMPv6", 2, 4),
        other => return Err(BadFrame::NoChecksum(other)),
    };
    let l4 = view.l4;
    if l4.len() < min {
        return Err(BadFrame::Truncated(format!("{name} header")));
    }
    let found = u16::from_be_bytes([l4[at], l4[at + 1]]);
    if view.proto == proto::UDP && found == 0 {
        return Err(BadFrame::ZeroUdpChecksum);
    }
    // RFC 8200 8.1: source, destination, 32-bit upper-layer length, 3 zero bytes, next header.
    let mut data = Vec::with_capacity(40 + l4.len() + 1);
    data.extend_from_slice(&view.saddr.octets());
    data.extend_from_slice(&view.daddr.octets());
    data.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, view.proto]);
    let field = data.len() + at;
    data.extend_from_slice(l4);
    data[field..field + 2].copy_from_slice(&[0, 0]);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let total: u64 = data
        .chunks(2)
        .map(|w| u64::from(w[0]) << 8 | u64::from(w[1]))
        .sum();
    let mut folded = total;
    while folded > 0xffff {
        folded = (folded & 0xffff) + (folded >> 16);
    }
    let mut expected = !(folded as u16);
    if view.proto == proto::UDP && expected == 0 {
        expected = 0xffff;
    }
    if found != expected {
        return Err(BadFrame::Checksum {
            proto: name,
            found,
            expected,
        });
    }
    Ok(view)
}

/// Reassembles two fragments (as [`fragments6`] makes them, or as the datapath passes them
/// on) into the frame they came from: the first fragment's headers without the fragment
/// header, then both fragments' data. Checks that they belong together.
pub fn reassemble6(first: &[u8], later: &[u8]) -> Result<Vec<u8>, BadFrame> {
    let (a, b) = (parse6(first)?, parse6(later)?);
    let (Some(fa), Some(fb)) = (a.fragment, b.fragment) else {
        return Err(BadFrame::Reassembly(
            "a frame without a fragment header".into(),
        ));
    };
    let ((nh_at, at_a), (_, at_b)) = (fragment_header_at(first), fragment_header_at(later));
    let data_a = &first[at_a + 8..];
    if fa.offset != 0
        || !fa.more
        || fb.more
        || fa.id != fb.id
        || (a.saddr, a.daddr) != (b.saddr, b.daddr)
        || usize::from(fb.offset) != data_a.len()
    {
        return Err(BadFrame::Reassembly(format!(
            "{fa:?} ({} bytes) and {fb:?} are not one datagram's two fragments",
            data_a.len()
        )));
    }
    let mut f = first[..at_a].to_vec();
    f[nh_at] = first[at_a];
    f.extend_from_slice(data_a);
    f.extend_from_slice(&later[at_b + 8..]);
    let payload_len = (f.len() - 14 - 40) as u16;
    f[18..20].copy_from_slice(&payload_len.to_be_bytes());
    Ok(f)
}

/// In a frame `parse6` accepted with a fragment header: the offset of the next-header byte
/// naming the fragment header, and the fragment header's offset.
fn fragment_header_at(frame: &[u8]) -> (usize, usize) {
    let (mut nh_at, mut pos) = (14 + 6, 14 + 40);
    while frame[nh_at] != proto6::FRAGMENT {
        nh_at = pos;
        pos += (usize::from(frame[pos + 1]) + 1) * 8;
    }
    (nh_at, pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_have_valid_checksums() {
        let c = Ipv4Addr::new(10, 0, 1, 2);
        let v = Ipv4Addr::new(10, 96, 0, 10);
        for f in [
            Frame::tcp(c, 40000, v, 80, tcp::SYN).build(),
            Frame::udp(c, 40000, v, 53).payload(b"hello").build(),
        ] {
            let ihl = (f[14] & 0x0f) as usize * 4;
            assert!(checksum::verifies(0, &f[14..14 + ihl]));
            let l4 = &f[14 + ihl..];
            let sum = checksum::pseudo_header(c.octets(), v.octets(), f[23], l4.len() as u16);
            assert!(checksum::verifies(sum, l4));
        }
    }

    #[test]
    fn options_are_padded_and_counted_in_ihl() {
        let f = Frame {
            ip_options: vec![1, 1, 1],
            ..Frame::udp(Ipv4Addr::LOCALHOST, 1, Ipv4Addr::LOCALHOST, 2)
        }
        .build();
        assert_eq!(f[14] & 0x0f, 6);
    }

    const C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 2);
    const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);

    /// Checks a frame's L4 checksum with etherparse; returns its transport slice's kind.
    fn etherparse_verifies(frame: &[u8]) -> &'static str {
        use etherparse::{NetSlice, SlicedPacket, TransportSlice};
        let p = SlicedPacket::from_ethernet(frame).expect("etherparse parses the frame");
        let Some(NetSlice::Ipv6(ip)) = &p.net else {
            panic!("not IPv6: {:?}", p.net)
        };
        let (src, dst) = (ip.header().source(), ip.header().destination());
        match p.transport.expect("transport") {
            TransportSlice::Tcp(t) => {
                assert_eq!(t.checksum(), t.calc_checksum_ipv6(src, dst).unwrap());
                "tcp"
            }
            TransportSlice::Udp(u) => {
                let want = u.to_header().calc_checksum_ipv6_raw(src, dst, u.payload());
                assert_eq!(u.checksum(), want.unwrap());
                "udp"
            }
            TransportSlice::Icmpv6(i) => {
                assert!(i.is_checksum_valid(src, dst), "ICMPv6 checksum");
                "icmpv6"
            }
            other => panic!("unexpected transport {other:?}"),
        }
    }

    fn with_ext(f: Frame6) -> Frame6 {
        f.ext(Ext6::HopByHop(vec![5, 2, 0, 0])) // router alert, 6 bytes + PadN
            .ext(Ext6::DestOpts(vec![1, 3, 0, 0, 0])) // PadN of 5, then Pad1
    }

    #[test]
    fn ipv6_frames_have_checksums_etherparse_accepts() {
        let tcp6 = Frame6::tcp(C6, 40000, V6, 80, tcp::SYN).payload(b"odd");
        let udp6 = Frame6::udp(C6, 40000, V6, 53).payload(b"hello");
        let ping = Frame6::new(
            C6,
            V6,
            L4::Icmp {
                icmp_type: icmp6::ECHO_REQUEST,
                code: 0,
                rest: [0, 1, 0, 1],
            },
        )
        .payload(b"ping");
        for (frame, kind) in [(tcp6, "tcp"), (udp6, "udp"), (ping, "icmpv6")] {
            for f in [frame.clone(), with_ext(frame)] {
                let bytes = f.build();
                assert_eq!(etherparse_verifies(&bytes), kind);
                let view = verify6(&bytes).expect("verify6 agrees");
                assert_eq!((view.saddr, view.daddr), (C6, V6));
                assert_eq!(view.l4_payload(), &f.payload[..]);
                if kind != "icmpv6" {
                    assert_eq!(
                        view.ports(),
                        Some((40000, if kind == "tcp" { 80 } else { 53 }))
                    );
                }
            }
        }
        let f = with_ext(Frame6::udp(C6, 1, V6, 2)).build();
        let view = parse6(&f).unwrap();
        assert_eq!(view.ext, [proto6::HOP_BY_HOP, proto6::DEST_OPTS]);
        assert_eq!(view.proto, proto::UDP);
        assert_eq!(f.len(), 14 + 40 + 8 + 8 + 8);
    }

    #[test]
    fn verify6_catches_what_etherparse_catches() {
        let good = Frame6::tcp(C6, 40000, V6, 80, tcp::ACK)
            .payload(b"data")
            .build();
        for at in [14 + 8, 14 + 39, 14 + 40, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                matches!(verify6(&bad), Err(BadFrame::Checksum { proto: "TCP", .. })),
                "byte {at} flipped: {:?}",
                verify6(&bad)
            );
            let p = etherparse::SlicedPacket::from_ethernet(&bad).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
                panic!()
            };
            let Some(etherparse::NetSlice::Ipv6(ip)) = p.net else {
                panic!()
            };
            let want = t.calc_checksum_ipv6(ip.header().source(), ip.header().destination());
            assert_ne!(t.checksum(), want.unwrap());
        }
        let mut zero = Frame6::udp(C6, 1, V6, 2);
        zero.l4 = L4::Udp {
            sport: 1,
            dport: 2,
            zero_checksum: true,
        };
        assert_eq!(verify6(&zero.build()), Err(BadFrame::ZeroUdpChecksum));
        let v4 = Frame::udp(Ipv4Addr::LOCALHOST, 1, Ipv4Addr::LOCALHOST, 2).build();
        assert_eq!(parse6(&v4).unwrap_err(), BadFrame::NotIpv6(0x0800));
        let short = &good[..good.len() - 1];
        assert!(matches!(parse6(short), Err(BadFrame::Length { .. })));
    }

    #[test]
    fn ipv6_fragments_reassemble_to_the_datagram() {
        let payload: Vec<u8> = (0..=200u8).collect();
        let udp = Frame6::udp(C6, 40000, V6, 53).payload(&payload);
        let hop_by_hop = udp.clone().ext(Ext6::HopByHop(vec![5, 2, 0, 0]));
        // (frame, extension headers of the first fragment, whether etherparse can follow it)
        for (frame, chain, etherparse_too) in [
            (udp.clone(), &[proto6::FRAGMENT][..], true),
            (
                hop_by_hop,
                &[proto6::HOP_BY_HOP, proto6::FRAGMENT][..],
                true,
            ),
            // Destination options for the final destination are fragmented with the data.
            // etherparse 0.21 reads a later fragment's data as the header the fragment header
            // names, so only our readers check this one.
            (
                with_ext(udp),
                &[proto6::HOP_BY_HOP, proto6::FRAGMENT, proto6::DEST_OPTS][..],
                false,
            ),
        ] {
            let whole = frame.build();
            let (first, later) = fragments6(&whole, 64, 0xdead_beef);
            // The hop-by-hop header stays in front of each fragment; the rest is fragmented.
            let unfrag = 14 + 40 + if frame.ext.is_empty() { 0 } else { 8 };

            if etherparse_too {
                // etherparse sees two fragments of one datagram and reassembles them.
                let mut pool = etherparse::defrag::IpDefragPool::<(), ()>::new();
                let mut done = None;
                for f in [&first, &later] {
                    let p = etherparse::SlicedPacket::from_ethernet(f).expect("fragment parses");
                    let Some(etherparse::NetSlice::Ipv6(ip)) = &p.net else {
                        panic!("not IPv6")
                    };
                    assert!(ip.is_payload_fragmented());
                    assert!(ip.extensions().clone().into_iter().any(|e| matches!(
                        e,
                        etherparse::Ipv6ExtensionSlice::Fragment(h)
                            if h.identification() == 0xdead_beef
                    )));
                    done = pool.process_sliced_packet(&p, (), ()).expect("defrag");
                }
                let done = done.expect("reassembled after the last fragment");
                assert_eq!(done.payload, whole[unfrag..]);
            }

            // Our readers agree: ports from the first fragment only, and reassembly gives back
            // the frame, whose checksum then verifies.
            let (a, b) = (parse6(&first).unwrap(), parse6(&later).unwrap());
            assert_eq!(a.ext, chain);
            assert_eq!(a.fragment.map(|f| (f.offset, f.more)), Some((0, true)));
            assert_eq!(b.fragment.map(|f| (f.offset, f.more)), Some((64, false)));
            assert_eq!(a.fragment.map(|f| f.id), Some(0xdead_beef));
            assert!(b.is_later_fragment() && b.ports().is_none());
            assert_eq!(a.ports(), Some((40000, 53)));
            assert_eq!(first.len() - unfrag - 8, 64);
            assert!(matches!(verify6(&first), Err(BadFrame::Fragment { .. })));
            let back = reassemble6(&first, &later).expect("reassemble6");
            assert_eq!(back, whole);
            verify6(&back).expect("reassembled checksum");
            assert!(reassemble6(&later, &first).is_err());
        }
    }

    #[test]
    fn icmpv6_errors_quote_the_packet_and_verify() {
        let node = Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, 1);
        let big = Frame6::tcp(C6, 40000, V6, 80, tcp::ACK)
            .payload(&[7; 1400])
            .build();
        let small = Frame6::udp(C6, 40000, V6, 53).payload(b"q").build();
        for (f, t, rest) in [
            (
                Frame6::packet_too_big(node, C6, 1280, &big),
                icmp6::PACKET_TOO_BIG,
                1280u32.to_be_bytes(),
            ),
            (
                Frame6::dest_unreachable(node, C6, icmp6::PORT_UNREACHABLE, &small),
                icmp6::DEST_UNREACHABLE,
                [0; 4],
            ),
            (
                Frame6::time_exceeded(node, C6, icmp6::HOP_LIMIT_EXCEEDED, &small),
                icmp6::TIME_EXCEEDED,
                [0; 4],
            ),
        ] {
            let bytes = f.build();
            assert!(bytes.len() - 14 <= IPV6_MIN_MTU, "{} bytes", bytes.len());
            assert_eq!(etherparse_verifies(&bytes), "icmpv6");
            let view = verify6(&bytes).unwrap();
            assert_eq!(
                (view.proto, view.l4[0], &view.l4[4..8]),
                (proto6::ICMPV6, t, &rest[..])
            );
            let quoted = Ipv6View::packet(view.l4_payload()).expect("quoted packet");
            assert_eq!((quoted.saddr, quoted.daddr), (C6, V6));
            assert_eq!(quoted.ports().map(|p| p.0), Some(40000));
        }
        let ptb = Frame6::packet_too_big(node, C6, 1400, &big).build();
        let p = etherparse::SlicedPacket::from_ethernet(&ptb).unwrap();
        let Some(etherparse::TransportSlice::Icmpv6(i)) = p.transport else {
            panic!()
        };
        assert_eq!(
            i.icmp_type(),
            etherparse::Icmpv6Type::PacketTooBig { mtu: 1400 }
        );
        let quoted = Ipv6View::packet(&i.slice()[8..]).unwrap();
        assert!(
            quoted.truncated,
            "1400 bytes of TCP payload cannot all be quoted"
        );
    }

    #[test]
    fn ipv4_icmp_messages_get_their_checksum() {
        let f = Frame::new(
            Ipv4Addr::new(10, 0, 1, 2),
            Ipv4Addr::new(10, 0, 1, 1),
            L4::Icmp {
                icmp_type: 8,
                code: 0,
                rest: [0, 1, 0, 1],
            },
        )
        .payload(b"ping")
        .build();
        assert_eq!(f[23], proto::ICMP);
        assert!(checksum::verifies(0, &f[34..]));
    }
}
