//! Answers for frontends without backends, as kube-proxy's REJECT rules give: a TCP RST for
//! TCP, ICMP port unreachable otherwise. The packet is rewritten in place into the answer and
//! sent back out of the interface it came in on, so the client fails fast instead of timing
//! out.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{
    checksum::{fold, pseudo_header, sum_bytes},
    conntrack::flags as tcpf,
    proto,
    stats::{DROP_NO_BACKEND, DROP_REWRITE_FAILED, REJECT_ICMP_UNREACH, REJECT_TCP_RST},
};

use crate::{
    parse::{Packet, ETH_HLEN, IPV4_HLEN, TCP_HLEN, UDP_HLEN},
    Verdict,
};

const RST_LEN: usize = ETH_HLEN + IPV4_HLEN + TCP_HLEN;
/// ICMP quotes the offending IPv4 header and the first 8 bytes of its payload (RFC 792).
const QUOTE_LEN: usize = IPV4_HLEN + UDP_HLEN;
const ICMP_HLEN: usize = 8;
const ICMP_LEN: usize = ETH_HLEN + IPV4_HLEN + ICMP_HLEN + QUOTE_LEN;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;

#[inline(always)]
pub fn no_backend(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, u32> {
    match pkt.tuple.proto {
        // Never answer an RST with an RST.
        proto::TCP if pkt.tcp_flags & tcpf::RST == 0 => tcp_rst(ctx, pkt),
        // The quote would have to carry the options; rare enough to drop and count instead.
        proto::UDP if !pkt.has_ip_options => icmp_port_unreachable(ctx),
        _ => Err(DROP_NO_BACKEND),
    }
}

/// Writes an IPv4 header for an answer from `saddr` to `daddr` into `ip`.
#[inline(always)]
fn ipv4_header(ip: &mut [u8], tos: u8, tot_len: u16, l4_proto: u8, saddr: [u8; 4], daddr: [u8; 4]) {
    ip[0] = 0x45;
    ip[1] = tos;
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]); // id: unused with DF set
    ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
    ip[8] = 64;
    ip[9] = l4_proto;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&saddr);
    ip[16..20].copy_from_slice(&daddr);
    let check = fold(sum_bytes(0, &ip[..IPV4_HLEN]));
    ip[10..12].copy_from_slice(&check.to_be_bytes());
}

/// Swaps the MAC addresses so the answer goes back to the sender's interface.
#[inline(always)]
fn reply_ethernet(ctx: &TcContext, frame: &mut [u8]) -> Result<(), u32> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| DROP_REWRITE_FAILED)?;
    frame[0..6].copy_from_slice(&macs[6..12]);
    frame[6..12].copy_from_slice(&macs[0..6]);
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    Ok(())
}

/// Resizes the packet to `len`, writes `frame` over it and sends it back where it came from.
#[inline(always)]
fn send_back<const N: usize>(
    ctx: &TcContext,
    frame: &[u8; N],
    reason: u32,
) -> Result<Verdict, u32> {
    // SAFETY: the helper only reads the skb pointer the program was given.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return Err(DROP_REWRITE_FAILED);
    }
    ctx.store(0, frame, 0).map_err(|_| DROP_REWRITE_FAILED)?;
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
fn tcp_rst(ctx: &TcContext, pkt: &Packet) -> Result<Verdict, u32> {
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
    let mut frame = [0u8; RST_LEN];
    reply_ethernet(ctx, &mut frame)?;
    ipv4_header(
        &mut frame[ETH_HLEN..],
        0,
        (IPV4_HLEN + TCP_HLEN) as u16,
        proto::TCP,
        t.daddr,
        t.saddr,
    );

    let tcp = &mut frame[ETH_HLEN + IPV4_HLEN..];
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
    send_back(ctx, &frame, REJECT_TCP_RST)
}

/// True when `pkt` is a segment from a local socket whose checksum is still to be computed
/// (CHECKSUM_PARTIAL: the field holds only the folded pseudo-header sum). BPF cannot read
/// `ip_summed`; a finished checksum equals the seed by chance once in 65536 segments, and
/// then only that RST is lost and the client's retry gets another.
#[inline(always)]
fn arrived_needing_checksum(ctx: &TcContext, pkt: &Packet) -> Result<bool, u32> {
    let field: [u8; 2] = ctx.load(pkt.l4_off + 16).map_err(|_| DROP_REWRITE_FAILED)?;
    let t = &pkt.tuple;
    let seed = !fold(pseudo_header(t.saddr, t.daddr, proto::TCP, pkt.l4_len));
    Ok(u16::from_be_bytes(field) == seed)
}

/// ICMP destination unreachable (port unreachable) from the frontend to the client, quoting
/// the datagram's IPv4 header and UDP header so the client's socket can match it.
#[inline(always)]
fn icmp_port_unreachable(ctx: &TcContext) -> Result<Verdict, u32> {
    let quote: [u8; QUOTE_LEN] = ctx.load(ETH_HLEN).map_err(|_| DROP_REWRITE_FAILED)?;
    let mut frame = [0u8; ICMP_LEN];
    reply_ethernet(ctx, &mut frame)?;
    let mut saddr = [0u8; 4];
    let mut daddr = [0u8; 4];
    saddr.copy_from_slice(&quote[16..20]); // the frontend the datagram was sent to
    daddr.copy_from_slice(&quote[12..16]); // the client
                                           // TOS 0xc0 (internetwork control), as the kernel's own ICMP errors carry.
    let tot_len = (IPV4_HLEN + ICMP_HLEN + QUOTE_LEN) as u16;
    ipv4_header(
        &mut frame[ETH_HLEN..],
        0xc0,
        tot_len,
        proto::ICMP,
        saddr,
        daddr,
    );

    let icmp = &mut frame[ETH_HLEN + IPV4_HLEN..];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[ICMP_HLEN..ICMP_HLEN + QUOTE_LEN].copy_from_slice(&quote);
    let check = fold(sum_bytes(0, &icmp[..ICMP_HLEN + QUOTE_LEN]));
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    send_back(ctx, &frame, REJECT_ICMP_UNREACH)
}
