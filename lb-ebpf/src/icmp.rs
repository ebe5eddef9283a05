//! ICMP errors about translated flows, translated back (RFC 5508 behaviour, as conntrack NAT
//! does for kube-proxy): the quoted packet and the error's destination are rewritten to what
//! the receiver sent, so its socket finds the error. Path MTU discovery through a ClusterIP
//! depends on this: a "fragmentation needed" quoting client -> backend must reach the client as
//! one quoting client -> VIP.
//!
//! The quoted packet is one the datapath translated, seen on the far side of the node, so its
//! tuple reversed is the key of the flow entry for the opposite direction, and that entry's
//! counterpart (`CtEntry::other_key`) is exactly the quoted packet before translation.

use aya_ebpf::programs::TcContext;
use lb_common::{stats::DROP_REWRITE_FAILED, stats::PASS_OTHER, stats::XLATE_ICMP_ERROR, CtKey};

use crate::{
    action,
    maps::CONNTRACK,
    parse::{IcmpError, IP_CHECK_OFF, IP_DADDR_OFF},
    Verdict,
};

/// Translates `err` if it is about a tracked flow; passes it untouched otherwise.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, err: &IcmpError) -> Result<Verdict, u32> {
    let q = &err.inner;
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport_be: q.dport_be,
        dport_be: q.sport_be,
        proto: q.proto,
        _pad: [0; 3],
    };
    let Some(e) = CONNTRACK.get_ptr(key) else {
        return Ok(Verdict {
            action: action::OK,
            reason: PASS_OTHER,
        });
    };
    // SAFETY: pointer from a successful lookup, copied out at once. The entry is not
    // refreshed: an error is no sign of a live flow.
    let orig = unsafe { (*e).other_key(q.proto) };

    let icmp_check = err.icmp_off + 2;
    let inner_check = err.inner_ip_off + 10;
    let old_inner_check: u16 = ctx.load(inner_check).map_err(|_| DROP_REWRITE_FAILED)?;
    // The quoted IPv4 header: its addresses and checksum. The ICMP checksum covers all of
    // it, and has no pseudo-header.
    for (off, old, new) in [
        (err.inner_ip_off + 12, q.saddr, orig.saddr),
        (err.inner_ip_off + 16, q.daddr, orig.daddr),
    ] {
        let (old, new) = (
            u32::from_ne_bytes(old) as u64,
            u32::from_ne_bytes(new) as u64,
        );
        ctx.l3_csum_replace(inner_check, old, new, 4)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        ctx.l4_csum_replace(icmp_check, old, new, 4)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        ctx.store(off, &(new as u32), 0)
            .map_err(|_| DROP_REWRITE_FAILED)?;
    }
    let new_inner_check: u16 = ctx.load(inner_check).map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.l4_csum_replace(
        icmp_check,
        old_inner_check as u64,
        new_inner_check as u64,
        2,
    )
    .map_err(|_| DROP_REWRITE_FAILED)?;
    // The quoted ports. The quoted TCP/UDP checksum is left alone: the quote is usually cut
    // short of the payload it covers, and receivers do not check it.
    for (off, old, new) in [
        (err.inner_l4_off, q.sport_be, orig.sport_be),
        (err.inner_l4_off + 2, q.dport_be, orig.dport_be),
    ] {
        ctx.l4_csum_replace(icmp_check, old as u64, new as u64, 2)
            .map_err(|_| DROP_REWRITE_FAILED)?;
        ctx.store(off, &new, 0).map_err(|_| DROP_REWRITE_FAILED)?;
    }
    // The error goes to whoever sent the quoted packet, as that sender knows itself.
    let (old, new) = (
        u32::from_ne_bytes(err.daddr) as u64,
        u32::from_ne_bytes(orig.saddr) as u64,
    );
    ctx.l3_csum_replace(IP_CHECK_OFF, old, new, 4)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(IP_DADDR_OFF, &(new as u32), 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    Ok(Verdict {
        action: action::OK,
        reason: XLATE_ICMP_ERROR,
    })
}
