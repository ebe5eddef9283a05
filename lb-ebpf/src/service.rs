//! The ingress decision: tracked flow, new flow to a frontend, or not ours.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use lb_common::{stats::*, Backend, FrontendKey, Service, SlotKey, VipKey, CT_FORWARD, SCOPE_ALL};

use crate::{
    action, affinity, conntrack,
    maps::{BACKENDS, BACKEND_SLOTS, SERVICES, VIPS},
    nat::{self, End},
    parse::{self, Parsed},
    reject, Verdict,
};

#[inline(always)]
fn pass(reason: u32) -> Result<Verdict, u32> {
    Ok(Verdict {
        action: action::OK,
        reason,
    })
}

#[inline(always)]
fn is_vip(addr: [u8; 4]) -> bool {
    VIPS.get_ptr(VipKey { addr }).is_some()
}

#[inline(always)]
pub fn try_ingress(ctx: &TcContext) -> Result<Verdict, u32> {
    let pkt = match parse::parse(ctx) {
        Parsed::NotIpv4 => return pass(PASS_NOT_IPV4),
        Parsed::MalformedIpv4 => return pass(PASS_MALFORMED_IPV4),
        // Without ports a packet for a service cannot be translated; letting it through
        // untranslated would send it somewhere it was not meant to go.
        Parsed::NoPorts(p) if p.fragment && is_vip(p.daddr) => return Err(DROP_FRAGMENT),
        Parsed::NoPorts(_) => return pass(PASS_OTHER),
        Parsed::MalformedL4 { daddr } if is_vip(daddr) => return Err(DROP_MALFORMED_L4),
        Parsed::MalformedL4 { .. } => return pass(PASS_NOT_SERVICE),
        Parsed::L4(pkt) => pkt,
    };

    let mut replace = false;
    if let Some(hit) = conntrack::lookup(&pkt) {
        let e = hit.entry;
        if e.direction != CT_FORWARD {
            nat::rewrite(ctx, &pkt, End::Source, e.nat_addr, e.nat_port_be)?;
            return pass(XLATE_REPLY);
        }
        if !hit.reopens {
            nat::rewrite(ctx, &pkt, End::Destination, e.nat_addr, e.nat_port_be)?;
            return pass(XLATE_FORWARD);
        }
        // A new connection on a closed connection's tuple chooses its backend afresh.
        replace = true;
    }

    let key = FrontendKey {
        addr: pkt.tuple.daddr,
        port_be: pkt.tuple.dport_be,
        proto: pkt.tuple.proto,
        scope: SCOPE_ALL,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return pass(PASS_NOT_SERVICE);
    };
    // SAFETY: pointer from a successful lookup, copied out before any other map operation.
    let svc = unsafe { *svc };
    if svc.backend_count == 0 {
        return reject::no_backend(ctx, &pkt);
    }
    let (backend_id, backend, reason) = if svc.affinity_timeout_s == 0 {
        let (id, backend) = select_backend(&svc)?;
        (id, backend, XLATE_NEW_FLOW)
    } else {
        match affinity::select(pkt.tuple.saddr, &svc)? {
            (id, backend, true) => (id, backend, XLATE_NEW_FLOW_AFFINITY),
            (id, backend, false) => (id, backend, XLATE_NEW_FLOW),
        }
    };
    let entry = conntrack::create(&pkt, svc.svc_id, backend_id, &backend, replace)?;
    nat::rewrite(
        ctx,
        &pkt,
        End::Destination,
        entry.nat_addr,
        entry.nat_port_be,
    )?;
    Ok(Verdict {
        action: action::OK,
        reason,
    })
}

/// Picks a backend for a new flow of `svc` (random for now).
#[inline(always)]
pub fn select_backend(svc: &Service) -> Result<(u32, Backend), u32> {
    // `backend_count` is non-zero here; slots are 1-based.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count as u32 + 1;
    let slot_key = SlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    let Some(s) = BACKEND_SLOTS.get_ptr(slot_key) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let backend_id = unsafe { (*s).backend_id };
    let Some(b) = BACKENDS.get_ptr(backend_id) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: as above.
    Ok((backend_id, unsafe { *b }))
}
