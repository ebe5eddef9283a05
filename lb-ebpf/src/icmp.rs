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
    family::{Family, PSEUDO_HDR},
    nat::End,
    parse::{IcmpError, IP_CHECK_OFF},
    Verdict,
};

/// Translates `err` if it is about a tracked flow; passes it untouched otherwise.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn translate_error<F: Family>(ctx: &TcContext, err: &IcmpError<F::Addr>) -> Verdict {
    Verdict::of(try_translate_error::<F>(ctx, err))
}

#[inline(always)]
fn try_translate_error<F: Family>(
    ctx: &TcContext,
    err: &IcmpError<F::Addr>,
) -> Result<Verdict, u32> {
    let q = &err.inner;
    let key = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport_be: q.dport_be,
        dport_be: q.sport_be,
        proto: q.proto,
        _pad: [0; 3],
    };
    let Some(e) = F::conntrack().get_ptr(key) else {
        return Ok(Verdict {
            action: action::OK,
            reason: PASS_OTHER,
        });
    };
    // SAFETY: pointer from a successful lookup, copied out at once. The entry is not
    // refreshed: an error is no sign of a live flow.
    let orig = unsafe { (*e).other_key(q.proto) };

    let icmp_check = err.icmp_off + 2;
    // The quoted IP header's addresses (and, for IPv4, its header checksum, which the ICMP
    // checksum covers too: its change is folded in after). They are ICMP payload: no
    // pseudo-header.
    let inner_check = err.inner_ip_off + 10;
    let old_inner_check: u16 = if F::HAS_L3_CSUM {
        ctx.load(inner_check).map_err(|_| DROP_REWRITE_FAILED)?
    } else {
        0
    };
    for (end, old, new) in [
        (End::Source, q.saddr, orig.saddr),
        (End::Destination, q.daddr, orig.daddr),
    ] {
        F::l3_csum_replace(ctx, inner_check, old, new)?;
        F::l4_csum_replace(ctx, icmp_check, old, new, 0)?;
        let off = err.inner_ip_off - crate::parse::ETH_HLEN + end.addr_off::<F>();
        ctx.store(off, &new, 0).map_err(|_| DROP_REWRITE_FAILED)?;
    }
    if F::HAS_L3_CSUM {
        let new_inner_check: u16 = ctx.load(inner_check).map_err(|_| DROP_REWRITE_FAILED)?;
        ctx.l4_csum_replace(
            icmp_check,
            old_inner_check as u64,
            new_inner_check as u64,
            2,
        )
        .map_err(|_| DROP_REWRITE_FAILED)?;
    }
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
    // The error goes to whoever sent the quoted packet, as that sender knows itself. ICMPv6
    // covers the address in its pseudo-header; ICMP does not, but IPv4's header checksum does.
    F::l3_csum_replace(ctx, IP_CHECK_OFF, err.daddr, orig.saddr)?;
    if F::ICMP_PSEUDO_HDR {
        F::l4_csum_replace(ctx, icmp_check, err.daddr, orig.saddr, PSEUDO_HDR)?;
    }
    ctx.store(End::Destination.addr_off::<F>(), &orig.saddr, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    Ok(Verdict {
        action: action::OK,
        reason: XLATE_ICMP_ERROR,
    })
}
