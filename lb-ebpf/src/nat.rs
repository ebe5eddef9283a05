//! Address and port rewriting with incremental checksum updates.
//!
//! Only kernel helpers touch checksums here (`bpf_l3_csum_replace`, `bpf_l4_csum_replace` with
//! the pseudo-header flag for addresses), so partial, complete and software checksums all stay
//! right; a UDP checksum of zero ("none") stays zero.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{proto, stats::DROP_REWRITE_FAILED};

use crate::parse::{Packet, IP_CHECK_OFF, IP_DADDR_OFF, IP_SADDR_OFF};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination: client -> VIP becomes client -> backend (DNAT).
    Destination,
    /// Source: backend -> client becomes VIP -> client (reverse NAT).
    Source,
}

/// Rewrites one address of a later fragment (no L4 header: the datagram's L4 checksum, in the
/// first fragment, already accounts for the change), fixing the IPv4 header checksum.
#[inline(always)]
pub fn rewrite_addr(ctx: &TcContext, end: End, old: [u8; 4], new: [u8; 4]) -> Result<(), u32> {
    let off = match end {
        End::Destination => IP_DADDR_OFF,
        End::Source => IP_SADDR_OFF,
    };
    let (old_a, new_a) = (
        u32::from_ne_bytes(old) as u64,
        u32::from_ne_bytes(new) as u64,
    );
    ctx.l3_csum_replace(IP_CHECK_OFF, old_a, new_a, 4)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(off, &new, 0).map_err(|_| DROP_REWRITE_FAILED)
}

/// Rewrites one end of `pkt` to `addr`:`port_be`, fixing the IPv4 and L4 checksums.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    end: End,
    addr: [u8; 4],
    port_be: u16,
) -> Result<(), u32> {
    let (addr_off, port_off, old_addr, old_port) = match end {
        End::Destination => (
            IP_DADDR_OFF,
            pkt.l4_off + 2,
            pkt.tuple.daddr,
            pkt.tuple.dport_be,
        ),
        End::Source => (
            IP_SADDR_OFF,
            pkt.l4_off,
            pkt.tuple.saddr,
            pkt.tuple.sport_be,
        ),
    };
    // A UDP checksum of 0 means "not computed" and must stay 0; MANGLED_0 also turns a
    // computed result of 0 into 0xffff so it is not mistaken for "none".
    let mangled = if pkt.tuple.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    let check_off = pkt.l4_check_off();
    let old_a = u32::from_ne_bytes(old_addr) as u64;
    let new_a = u32::from_ne_bytes(addr) as u64;

    ctx.l4_csum_replace(
        check_off,
        old_a,
        new_a,
        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
    )
    .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.l4_csum_replace(check_off, old_port as u64, port_be as u64, mangled | 2)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.l3_csum_replace(IP_CHECK_OFF, old_a, new_a, 4)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(addr_off, &addr, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(port_off, &port_be, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    Ok(())
}
