//! Address and port rewriting with incremental checksum updates.
//!
//! Only kernel helpers touch checksums here (`bpf_l3_csum_replace`, `bpf_l4_csum_replace` with
//! the pseudo-header flag for addresses; for IPv6 addresses a `bpf_csum_diff` difference, see
//! `Family::l4_csum_replace`), so partial, complete and software checksums all stay right; a
//! UDP checksum of zero ("none") stays zero.

use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, programs::TcContext};
use lb_common::{proto, stats::DROP_REWRITE_FAILED, CtKey};

use crate::{
    family::{Family, PSEUDO_HDR},
    parse::{Packet, IP_CHECK_OFF},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    /// Destination: client -> VIP becomes client -> backend (DNAT).
    Destination,
    /// Source: backend -> client becomes VIP -> client (reverse NAT).
    Source,
}

impl End {
    /// Offset of this end's address in a frame of family `F`.
    #[inline(always)]
    pub fn addr_off<F: Family>(self) -> usize {
        match self {
            End::Destination => F::DADDR_OFF,
            End::Source => F::SADDR_OFF,
        }
    }
}

/// Rewrites one address of a later fragment (no L4 header: the datagram's L4 checksum, in the
/// first fragment, already accounts for the change), fixing the IPv4 header checksum (for
/// IPv6, a CHECKSUM_COMPLETE skb's sum: `Family::UNCOMPENSATED_STORE`).
#[inline(always)]
pub fn rewrite_addr<F: Family>(
    ctx: &TcContext,
    end: End,
    old: F::Addr,
    new: F::Addr,
) -> Result<(), u32> {
    F::l3_csum_replace(ctx, IP_CHECK_OFF, old, new)?;
    ctx.store(end.addr_off::<F>(), &new, F::UNCOMPENSATED_STORE)
        .map_err(|_| DROP_REWRITE_FAILED)
}

/// Rewrites one end of `pkt` to that end of `to`, fixing the IPv4 and L4 checksums.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn rewrite<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    end: End,
    to: &CtKey<F::Addr>,
) -> Result<(), u32> {
    let (port_off, old_addr, old_port, addr, port_be) = match end {
        End::Destination => (
            pkt.l4_off + 2,
            pkt.tuple.daddr,
            pkt.tuple.dport_be,
            to.daddr,
            to.dport_be,
        ),
        End::Source => (
            pkt.l4_off,
            pkt.tuple.saddr,
            pkt.tuple.sport_be,
            to.saddr,
            to.sport_be,
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
    F::l4_csum_replace(ctx, check_off, old_addr, addr, PSEUDO_HDR | mangled)?;
    ctx.l4_csum_replace(check_off, old_port as u64, port_be as u64, mangled | 2)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    F::l3_csum_replace(ctx, IP_CHECK_OFF, old_addr, addr)?;
    ctx.store(end.addr_off::<F>(), &addr, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(port_off, &port_be, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    Ok(())
}
