//! Answers for frontends without backends, as kube-proxy's REJECT rules give: a TCP RST for
//! TCP, ICMP port unreachable otherwise. The packet is rewritten in place into the answer and
//! sent back out of the interface it came in on, so the client fails fast instead of timing
//! out.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::{
    checksum::{fold, pseudo_header, sum_bytes},
    conntrack::flags as tcpf,
    proto,
    stats::{DROP_NO_BACKEND, DROP_REWRITE_FAILED, REJECT_ICMP_UNREACH, REJECT_TCP_RST},
    Addr,
};

use crate::{
    family::Family,
    parse::{Packet, ETH_HLEN, IPV4_HLEN, IPV6_HLEN, TCP_HLEN, UDP_HLEN},
    Verdict,
};

const ICMP_HLEN: usize = 8;
/// The longest answer: ICMPv6 quoting an IPv6 header and 8 bytes of its payload.
pub const MAX_LEN: usize = ETH_HLEN + IPV6_HLEN + ICMP_HLEN + IPV6_HLEN + UDP_HLEN;
/// ICMP destination unreachable, port unreachable (RFC 792); ICMPv6's (RFC 4443).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
const NEXTHDR_ICMPV6: u8 = 58;

// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn no_backend<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Verdict {
    // An answer to a multicast or unspecified source would go nowhere it should
    // (RFC 1812 4.3.2.7, RFC 4443 2.4 (e)).
    if !unicast(pkt.tuple.saddr) {
        return Verdict::of(Err(DROP_NO_BACKEND));
    }
    Verdict::of(match pkt.tuple.proto {
        // Never answer an RST with an RST.
        proto::TCP if pkt.tcp_flags & tcpf::RST == 0 => tcp_rst::<F>(ctx, pkt),
        // The quote would have to carry the options or extension headers; rare enough to drop
        // and count instead.
        proto::UDP if !pkt.has_ip_options => port_unreachable::<F>(ctx, pkt),
        _ => Err(DROP_NO_BACKEND),
    })
}

/// True unless `addr` is unspecified, multicast (IPv4 224/4 and above, broadcast included;
/// IPv6 ff00::/8).
#[inline(always)]
fn unicast<A: Addr>(addr: A) -> bool {
    let bytes = addr.bytes();
    let multicast = if bytes.len() == 4 {
        bytes[0] >= 224
    } else {
        bytes[0] == 0xff
    };
    !multicast && bytes.iter().any(|b| *b != 0)
}

/// The IP header length of family `F` (without options).
#[inline(always)]
fn ip_hlen<F: Family>() -> usize {
    if F::HAS_L3_CSUM {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    }
}

/// Writes an IP header for an answer of `l4_len` bytes of `l4_proto` from `saddr` to `daddr`
/// into `ip`. `tos`: the IPv4 TOS or IPv6 traffic class.
#[inline(always)]
fn ip_header<F: Family>(
    ip: &mut [u8],
    tos: u8,
    l4_len: u16,
    l4_proto: u8,
    saddr: F::Addr,
    daddr: F::Addr,
) {
    if F::HAS_L3_CSUM {
        ip[0] = 0x45;
        ip[1] = tos;
        ip[2..4].copy_from_slice(&(IPV4_HLEN as u16 + l4_len).to_be_bytes());
        ip[4..6].copy_from_slice(&[0, 0]); // id: unused with DF set
        ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip[8] = 64;
        ip[9] = l4_proto;
        ip[10..12].copy_from_slice(&[0, 0]);
        ip[12..16].copy_from_slice(saddr.bytes());
        ip[16..20].copy_from_slice(daddr.bytes());
        let check = fold(sum_bytes(0, &ip[..IPV4_HLEN]));
        ip[10..12].copy_from_slice(&check.to_be_bytes());
    } else {
        ip[0] = 0x60 | (tos >> 4);
        ip[1] = tos << 4;
        ip[2..4].copy_from_slice(&[0, 0]); // flow label
        ip[4..6].copy_from_slice(&l4_len.to_be_bytes());
        ip[6] = l4_proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(saddr.bytes());
        ip[24..40].copy_from_slice(daddr.bytes());
    }
}

/// This CPU's answer buffer (`family::Scratch::frame`), zeroed.
#[inline(always)]
fn answer_buffer<F: Family>() -> Result<&'static mut [u8; MAX_LEN], u32> {
    let work = F::scratch().ok_or(DROP_REWRITE_FAILED)?;
    // SAFETY: this CPU's slot; `frame` has one user at a time (see `Scratch`).
    let frame = unsafe { &mut (*work).frame };
    *frame = [0; MAX_LEN];
    Ok(frame)
}

/// Swaps the MAC addresses so the answer goes back to the sender's interface.
#[inline(always)]
fn reply_ethernet<F: Family>(ctx: &TcContext, frame: &mut [u8]) -> Result<(), u32> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DROP_REWRITE_FAILED)?;
    frame[0..6].copy_from_slice(&macs[6..12]);
    frame[6..12].copy_from_slice(&macs[0..6]);
    frame[12..14].copy_from_slice(&F::ETH_P_BE.to_ne_bytes());
    Ok(())
}

/// Resizes the packet to `len`, writes the first `len` bytes of `frame` over it and sends it
/// back where it came from.
#[inline(always)]
fn send_back(
    ctx: &TcContext,
    frame: &mut [u8; MAX_LEN],
    len: usize,
    reason: u32,
) -> Result<Verdict, u32> {
    // SAFETY: the helper only reads the skb pointer the program was given.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
        return Err(DROP_REWRITE_FAILED);
    }
    // SAFETY: `frame` is on our stack and at least `len` bytes long (`len` is a constant of
    // the caller's family, at most `MAX_LEN`).
    if unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb,
            0,
            frame.as_mut_ptr() as *const _,
            len as u32,
            0,
        )
    } != 0
    {
        return Err(DROP_REWRITE_FAILED);
    }
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; egress of the ingress device sends the answer back.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if action != crate::action::REDIRECT {
        return Err(DROP_REWRITE_FAILED);
    }
    Ok(Verdict { action, reason })
}

/// RFC 793 reset for a segment to a port nobody listens on: from the frontend to the client.
#[inline(always)]
fn tcp_rst<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Result<Verdict, u32> {
    let (seq, ack, flags) = if pkt.tcp_flags & tcpf::ACK != 0 {
        (pkt.tcp_ack, 0u32, tcpf::RST)
    } else {
        // SYN and FIN each occupy one sequence number.
        let mut ack = pkt.tcp_seq.wrapping_add(pkt.l4_payload_len);
        if pkt.tcp_flags & tcpf::SYN != 0 {
            ack = ack.wrapping_add(1);
        }
        if pkt.tcp_flags & tcpf::FIN != 0 {
            ack = ack.wrapping_add(1);
        }
        (0u32, ack, tcpf::RST | tcpf::ACK)
    };
    let t = &pkt.tuple;
    let ip_len = ip_hlen::<F>();
    let frame = answer_buffer::<F>()?;
    reply_ethernet::<F>(ctx, frame)?;
    ip_header::<F>(
        &mut frame[ETH_HLEN..],
        0,
        TCP_HLEN as u16,
        proto::TCP,
        t.daddr,
        t.saddr,
    );

    let tcp = &mut frame[ETH_HLEN + ip_len..];
    tcp[0..2].copy_from_slice(&t.dport_be.to_ne_bytes());
    tcp[2..4].copy_from_slice(&t.sport_be.to_ne_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = ((TCP_HLEN / 4) as u8) << 4;
    tcp[13] = flags;
    // window, checksum and urgent pointer stay zero until the checksum is known.
    let sum = pseudo_header(t.daddr, t.saddr, proto::TCP, TCP_HLEN as u16);
    let check = if arrived_needing_checksum(ctx, pkt)? {
        // The skb still says CHECKSUM_PARTIAL (its header offsets are unchanged), so whatever
        // completes the checksum on the way out adds the segment's sum to this field: give it
        // the pseudo-header seed, as the kernel's own TCP does, not a finished checksum.
        !fold(sum)
    } else {
        fold(sum_bytes(sum, &tcp[..TCP_HLEN]))
    };
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    send_back(ctx, frame, ETH_HLEN + ip_len + TCP_HLEN, REJECT_TCP_RST)
}

/// True when `pkt` is a segment from a local socket whose checksum is still to be computed
/// (CHECKSUM_PARTIAL: the field holds only the folded pseudo-header sum). BPF cannot read
/// `ip_summed`; a finished checksum equals the seed by chance once in 65536 segments, and
/// then only that RST is lost and the client's retry gets another.
#[inline(always)]
fn arrived_needing_checksum<A: Addr>(ctx: &TcContext, pkt: &Packet<A>) -> Result<bool, u32> {
    let field: [u8; 2] = ctx.load(pkt.l4_off + 16).map_err(|_| DROP_REWRITE_FAILED)?;
    let t = &pkt.tuple;
    let seed = !fold(pseudo_header(t.saddr, t.daddr, proto::TCP, pkt.l4_len));
    Ok(u16::from_be_bytes(field) == seed)
}

/// Destination (port) unreachable from the frontend to the client, quoting the datagram's IP
/// header and UDP header so the client's socket can match it: ICMP, or ICMPv6, whose checksum
/// also covers a pseudo-header.
#[inline(always)]
fn port_unreachable<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Result<Verdict, u32> {
    let t = &pkt.tuple;
    let ip_len = ip_hlen::<F>();
    let quote_len = ip_len + UDP_HLEN;
    let icmp_len = ICMP_HLEN + quote_len;
    let frame = answer_buffer::<F>()?;
    reply_ethernet::<F>(ctx, frame)?;
    // TOS 0xc0 (internetwork control), as the kernel's own ICMP errors carry.
    let (l4_proto, icmp_type, code) = if F::HAS_L3_CSUM {
        (proto::ICMP, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH)
    } else {
        (NEXTHDR_ICMPV6, ICMPV6_DEST_UNREACH, ICMPV6_PORT_UNREACH)
    };
    ip_header::<F>(
        &mut frame[ETH_HLEN..],
        0xc0,
        icmp_len as u16,
        l4_proto,
        t.daddr,
        t.saddr,
    );
    let quote_off = ETH_HLEN + ip_len + ICMP_HLEN;
    // The raw helper: its length is the family's constant, which the verifier needs to see.
    // SAFETY: `frame` has `quote_len` bytes from `quote_off` (`MAX_LEN` is sized for IPv6's).
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            ETH_HLEN as u32,
            frame.as_mut_ptr().add(quote_off) as *mut _,
            quote_len as u32,
        )
    };
    if rc != 0 {
        return Err(DROP_REWRITE_FAILED);
    }

    let icmp = &mut frame[ETH_HLEN + ip_len..];
    icmp[0] = icmp_type;
    icmp[1] = code;
    let seed = if F::ICMP_PSEUDO_HDR {
        pseudo_header(t.daddr, t.saddr, l4_proto, icmp_len as u16)
    } else {
        0
    };
    let check = fold(sum_bytes(seed, &icmp[..icmp_len]));
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    send_back(
        ctx,
        frame,
        ETH_HLEN + icmp_len + ip_len,
        REJECT_ICMP_UNREACH,
    )
}
