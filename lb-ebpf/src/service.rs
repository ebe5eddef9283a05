//! The ingress decision: tracked flow, new flow to a frontend, or not ours.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use lb_common::{
    maglev, stats::*, Backend, CtKey, FrontendKey, Service, SlotKey, VipKey, ALG_MAGLEV,
    CT_FORWARD, SCOPE_ALL,
};

use crate::{
    action, affinity,
    conntrack::{self, Lookup},
    maps::{BACKENDS, BACKEND_SLOTS, MAGLEV, SERVICES, VIPS},
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

    let replace = match conntrack::lookup(&pkt) {
        Lookup::Hit(e) if e.direction == CT_FORWARD => {
            nat::rewrite(ctx, &pkt, End::Destination, e.nat_addr, e.nat_port_be)?;
            return pass(XLATE_FORWARD);
        }
        Lookup::Hit(e) => {
            nat::rewrite(ctx, &pkt, End::Source, e.nat_addr, e.nat_port_be)?;
            return pass(XLATE_REPLY);
        }
        // A stale entry is overwritten if this packet starts a new flow to a frontend.
        Lookup::Stale => true,
        Lookup::Miss => false,
    };

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
        let (id, backend) = select_backend(&svc, &pkt.tuple)?;
        (id, backend, XLATE_NEW_FLOW)
    } else {
        match affinity::select(&pkt.tuple, &svc)? {
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

/// Picks a backend for a new flow `tuple` of `svc`, by the service's algorithm.
#[inline(always)]
pub fn select_backend(svc: &Service, tuple: &CtKey) -> Result<(u32, Backend), u32> {
    let backend_id = match svc.algorithm {
        // The agent writes the table before it switches a service to Maglev; should it be
        // missing anyway, a random backend is still a backend of the service.
        ALG_MAGLEV => match maglev_backend(svc, tuple) {
            Some(id) => id,
            None => random_backend(svc)?,
        },
        _ => random_backend(svc)?,
    };
    let Some(b) = BACKENDS.get_ptr(backend_id) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    Ok((backend_id, unsafe { *b }))
}

/// A uniformly random slot's backend id.
#[inline(always)]
fn random_backend(svc: &Service) -> Result<u32, u32> {
    // Callers only get here with backends; checking again keeps a division by zero (and the
    // panic path the verifier would reject) out of the program.
    let count = svc.backend_count as u32;
    if count == 0 {
        return Err(DROP_NO_BACKEND_ENTRY);
    }
    // SAFETY: plain helper call. Slots are 1-based.
    let slot = unsafe { bpf_get_prandom_u32() } % count + 1;
    let slot_key = SlotKey {
        svc_id: svc.svc_id,
        slot,
    };
    let Some(s) = BACKEND_SLOTS.get_ptr(slot_key) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    Ok(unsafe { (*s).backend_id })
}

/// The backend id the service's Maglev table gives the flow.
#[inline(always)]
fn maglev_backend(svc: &Service, tuple: &CtKey) -> Option<u32> {
    let index = maglev::flow_index(tuple);
    // SAFETY: the value is copied out at once; the agent replaces a table's entries one by
    // one, each write leaving a valid backend id.
    unsafe { MAGLEV.get_value(&svc.svc_id, &index).copied() }
}
