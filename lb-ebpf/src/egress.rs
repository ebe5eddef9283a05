//! tc egress: what the node itself sends about translated flows.
//!
//! - ICMP errors the node generates (a "fragmentation needed" from forwarding into a narrower
//!   link) quote the translated packet; they are translated back like those arriving from
//!   elsewhere (`icmp.rs`).
//! - Replies of hostNetwork backends (`BACKEND_HOST`): flows to them are delivered locally,
//!   so their answers are sent by local sockets and never cross an ingress hook; their source
//!   is rewritten back to the frontend here.
//!
//! Everything else passes, uncounted. Most egress packets are a local socket's segments, often
//! clones with little linear data: only the linear headers are read (and conntrack looked up)
//! before deciding, so they are never pulled (which would copy their head).

use aya_ebpf::programs::TcContext;
use lb_common::{stats::PASS_OTHER, stats::XLATE_REPLY, CtKey, VipKey, CT_REVERSE};

use crate::{
    conntrack::{self, Lookup},
    family::{Family, V4Family, V6Family},
    fragment, icmp,
    parse::{self, ptr_at, Head, Kind, Packet},
    service, Verdict, UNCOUNTED,
};

/// What egress does with what is not ours: passes it, uncounted.
const NOT_OURS: Verdict = Verdict {
    action: crate::action::OK,
    reason: UNCOUNTED,
};

#[inline(always)]
pub fn try_egress(ctx: &TcContext) -> Verdict {
    let Some(ether_type) = parse::ether_type(ctx) else {
        return NOT_OURS;
    };
    if ether_type == V4Family::ETH_P_BE {
        egress::<V4Family>(ctx)
    } else if ether_type == V6Family::ETH_P_BE {
        egress::<V6Family>(ctx)
    } else {
        NOT_OURS
    }
}

// A BPF function per family (see `family`: the stack).
#[inline(never)]
fn egress<F: Family>(ctx: &TcContext) -> Verdict {
    try_family::<F>(ctx).unwrap_or(NOT_OURS)
}

/// `None`: not ours.
#[inline(always)]
fn try_family<F: Family>(ctx: &TcContext) -> Option<Verdict> {
    // What the head says is worth a parse (one call site: see `Family::parse`).
    let icmp = match F::peek(ctx)? {
        Head::Icmp => true,
        Head::Other => return None,
        // A later fragment of a local reply (translated like its first fragment was), or
        // IPv6 extension headers: only for the node's addresses is it worth a parse.
        Head::Deeper { saddr } => {
            F::node_addrs().get_ptr(VipKey { addr: saddr })?;
            false
        }
        Head::Ports {
            saddr,
            daddr,
            proto,
            l4_off,
        } => {
            F::node_addrs().get_ptr(VipKey { addr: saddr })?;
            // Only a reply of a tracked flow is parsed (and maybe pulled): the tuple is peeked
            // at in the linear head first, and most of the node's own traffic stops here.
            // SAFETY: `ptr_at` checks bounds; a plain load.
            let ports = unsafe { core::ptr::read_unaligned(ptr_at::<[u16; 2]>(ctx, l4_off)?) };
            let key = CtKey {
                saddr,
                daddr,
                sport_be: ports[0],
                dport_be: ports[1],
                proto,
                _pad: [0; 3],
            };
            // SAFETY: pointer from a successful lookup, read at once.
            if unsafe { (*F::conntrack().get_ptr(key)?).direction } != CT_REVERSE {
                return None;
            }
            false
        }
    };
    let parsed = F::parse_in_scratch(ctx)?;
    match parsed.kind {
        Kind::IcmpError if icmp => counted(icmp::translate_error::<F>(ctx, &parsed.icmp_error())),
        Kind::LaterFragment if !icmp => counted(fragment::translate::<F>(ctx, &parsed.fragment())),
        Kind::L4 if !icmp => reply::<F>(ctx, &parsed.pkt),
        _ => None,
    }
}

/// A hostNetwork backend's reply of a tracked flow: translated back to its frontend.
#[inline(always)]
fn reply<F: Family>(ctx: &TcContext, pkt: &Packet<F::Addr>) -> Option<Verdict> {
    let e = F::entry_in_scratch()?;
    match conntrack::lookup::<F>(pkt, e) {
        Lookup::Hit if e.direction == CT_REVERSE => {
            if pkt.first_fragment != 0 {
                fragment::remember::<F>(pkt);
            }
            Some(service::translate::<F>(ctx, pkt, e, XLATE_REPLY))
        }
        _ => None,
    }
}

/// A translation's verdict, or `None` (uncounted) when it found nothing to translate.
#[inline(always)]
fn counted(v: Verdict) -> Option<Verdict> {
    (v.reason != PASS_OTHER).then_some(v)
}
