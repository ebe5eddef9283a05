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
use lb_common::{
    proto, stats::DROP_REWRITE_FAILED, stats::PASS_OTHER, stats::XLATE_ICMP_ERROR, CtKey,
};

/// IPv4's EtherType as it lies in the frame (network byte order, read natively).
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

use crate::{
    action,
    maps::CONNTRACK,
    parse::{self, ptr_at, IcmpError, Parsed, ETH_HLEN, IP_CHECK_OFF, IP_DADDR_OFF},
    Verdict,
};

/// At egress: translates the packet if it is an ICMP error about a tracked flow; `None` for
/// everything else, which passes uncounted.
#[inline(always)]
pub fn try_egress(ctx: &TcContext) -> Option<Result<Verdict, u32>> {
    // Most egress packets are a local socket's segments, often clones with little linear
    // data: parsing (which may pull, and so copy, the head) only once the always-linear IPv4
    // header says ICMP.
    // SAFETY: `ptr_at` checks bounds; plain loads.
    let ether_type = unsafe { *ptr_at::<u16>(ctx, 12)? };
    let ip_proto = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN + 9)? };
    if ether_type != ETH_P_IP_BE || ip_proto != proto::ICMP {
        return None;
    }
    match parse::parse(ctx) {
        Parsed::IcmpError(err) => match translate_error(ctx, &err) {
            Ok(v) if v.reason == PASS_OTHER => None,
            other => Some(other),
        },
        _ => None,
    }
}

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
