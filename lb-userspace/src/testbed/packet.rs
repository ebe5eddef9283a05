//! A small builder for the Ethernet/IPv4/TCP/UDP frames the datapath fixtures feed through
//! BPF_PROG_TEST_RUN, including the malformed shapes the datapath must survive.
//!
//! Checksums are computed with `lb_common::checksum` (itself tested against RFC vectors);
//! tests verify outputs with an independent implementation.

use std::net::Ipv4Addr;

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
    /// Raw bytes after the IP header with the given protocol number (ICMP, GRE, ...).
    Raw { proto: u8, bytes: Vec<u8> },
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
        let (l4_proto, mut l4) = match &self.l4 {
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
                h.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                (proto::UDP, h)
            }
            L4::Raw { proto, bytes } => (*proto, bytes.clone()),
        };
        l4.extend_from_slice(&self.payload);
        let sum = checksum::pseudo_header(
            self.saddr.octets(),
            self.daddr.octets(),
            l4_proto,
            l4.len() as u16,
        );
        match &self.l4 {
            L4::Tcp { .. } => {
                let c = checksum::fold(checksum::sum_bytes(sum, &l4));
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp {
                zero_checksum: false,
                ..
            } => {
                let mut c = checksum::fold(checksum::sum_bytes(sum, &l4));
                if c == 0 {
                    c = 0xffff; // RFC 768: a computed zero is sent as all ones
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
            _ => {}
        }

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
}
