//! The ingress decision: tracked flow, new flow to a frontend, or not ours.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key, programs::TcContext};
use lb_common::{
    maglev, stats::*, Backend, CtEntry, CtKey, FrontendKey, Service, SlotKey, SourceRange, VipKey,
    ALG_MAGLEV, BACKEND_HOST, CT_FORWARD, CT_F_ROUTE, CT_F_SNAT, SCOPE_ALL, SVC_F_DROP_WHEN_EMPTY,
    SVC_F_EXTERNAL, SVC_F_SNAT, SVC_F_SOURCE_RANGES,
};

use crate::{
    action, affinity,
    conntrack::{self, Lookup, Source},
    family::{Family, V4Family, V6Family},
    fragment, icmp,
    maps::{BACKEND_SLOTS, MAGLEV},
    nat::{self, End},
    parse::{self, Kind, Packet},
    reject, route, Verdict,
};

#[inline(always)]
fn pass(reason: u32) -> Result<Verdict, u32> {
    Ok(Verdict {
        action: action::OK,
        reason,
    })
}

#[inline(always)]
pub fn is_vip<F: Family>(addr: F::Addr) -> bool {
    F::vips().get_ptr(VipKey { addr }).is_some()
}

/// The tc ingress program: dispatches on the EtherType.
#[inline(always)]
pub fn try_ingress(ctx: &TcContext) -> Verdict {
    let not_ip = Verdict {
        action: action::OK,
        reason: PASS_NOT_IP,
    };
    let Some(ether_type) = parse::ether_type(ctx) else {
        return not_ip;
    };
    if ether_type == V4Family::ETH_P_BE {
        ingress::<V4Family>(ctx)
    } else if ether_type == V6Family::ETH_P_BE {
        ingress::<V6Family>(ctx)
    } else {
        not_ip
    }
}

// A BPF function of its own (see `family`: the stack).
#[inline(never)]
fn ingress<F: Family>(ctx: &TcContext) -> Verdict {
    Verdict::of(try_family::<F>(ctx))
}

#[inline(always)]
fn try_family<F: Family>(ctx: &TcContext) -> Result<Verdict, u32> {
    let Some(parsed) = F::parse_in_scratch(ctx) else {
        return pass(PASS_MALFORMED_IP);
    };
    let daddr = parsed.pkt.tuple.daddr;
    match parsed.kind {
        Kind::L4 => {}
        Kind::Malformed => return pass(PASS_MALFORMED_IP),
        // Without ports a packet for a service cannot be translated; letting it through
        // untranslated would send it somewhere it was not meant to go.
        Kind::NoPorts if parsed.fragment && is_vip::<F>(daddr) => return Err(DROP_FRAGMENT),
        Kind::NoPorts => return pass(PASS_OTHER),
        Kind::MalformedL4 if is_vip::<F>(daddr) => return Err(DROP_MALFORMED_L4),
        Kind::MalformedL4 => return pass(PASS_NOT_SERVICE),
        Kind::LaterFragment => return Ok(fragment::translate::<F>(ctx, &parsed.fragment())),
        Kind::IcmpError => return Ok(icmp::translate_error::<F>(ctx, &parsed.icmp_error())),
    }
    let pkt = &parsed.pkt;

    // One call site for the translation, so the verifier walks it once.
    let entry = F::entry_in_scratch().ok_or(DROP_CT_FULL)?;
    let reason = match conntrack::lookup::<F>(pkt, entry) {
        Lookup::Hit if entry.direction == CT_FORWARD => XLATE_FORWARD,
        Lookup::Hit => XLATE_REPLY,
        // A stale entry is overwritten if this packet starts a new flow to a frontend.
        other => match start_flow::<F>(pkt, matches!(other, Lookup::Stale), entry)? {
            Start::NotService => return pass(PASS_NOT_SERVICE),
            Start::Reject => return Ok(reject::no_backend::<F>(ctx, pkt)),
            Start::Tracked(reason) => reason,
        },
    };
    if pkt.first_fragment != 0 {
        fragment::remember::<F>(pkt);
    }
    Ok(translate::<F>(ctx, pkt, entry, reason))
}

/// How a packet without a live tracking entry starts, decided without touching the packet
/// (shared by the tc and XDP programs).
pub enum Start {
    /// Not addressed to a frontend.
    NotService,
    /// To a frontend without backends: to be answered as kube-proxy's REJECT would.
    Reject,
    /// A new flow, tracked (its forward entry written to the caller's): the reason to count.
    Tracked(u32),
}

// Comes back in a register (see `Verdict`).
const _: () = assert!(core::mem::size_of::<Result<Start, u32>>() <= 8);

/// Decides how `pkt` starts, choosing and recording a backend for a new flow, whose forward
/// entry is written to `entry`. With `replace`, its tuple's existing entry is stale and is
/// overwritten.
///
/// Two BPF functions called one after the other, not one calling the other, so their stack
/// frames are never on the chain together (see `family`).
#[inline(always)]
pub fn start_flow<F: Family>(
    pkt: &Packet<F::Addr>,
    replace: bool,
    entry: &mut CtEntry<F::Addr>,
) -> Result<Start, u32> {
    let start = decide_flow::<F>(pkt, replace)?;
    if let Start::Tracked(_) = start {
        let work = F::scratch().ok_or(DROP_CT_FULL)?;
        // SAFETY: this CPU's slot, which `decide_flow` filled (see `Scratch`).
        conntrack::create::<F>(pkt, unsafe { &(*work).flow }, entry)?;
    }
    Ok(start)
}

/// How `pkt` starts; for a new flow, the choices are left in this CPU's `Scratch::flow`.
#[inline(never)]
fn decide_flow<F: Family>(pkt: &Packet<F::Addr>, replace: bool) -> Result<Start, u32> {
    let key = FrontendKey {
        addr: pkt.tuple.daddr,
        port_be: pkt.tuple.dport_be,
        proto: pkt.tuple.proto,
        scope: SCOPE_ALL,
    };
    let Some(svc) = F::services().get_ptr(key) else {
        return Ok(Start::NotService);
    };
    // SAFETY: pointer from a successful lookup, copied out before any other map operation.
    let svc = unsafe { *svc };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed::<F>(&svc, pkt.tuple.saddr) {
        return Err(DROP_SOURCE_RANGE);
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
            return Err(DROP_NO_LOCAL_BACKEND);
        }
        return Ok(Start::Reject);
    }
    let (backend_id, backend, reason) = if svc.affinity_timeout_s == 0 {
        let (id, backend) = select_backend::<F>(&svc, &pkt.tuple)?;
        (id, backend, XLATE_NEW_FLOW)
    } else {
        match affinity::select::<F>(&pkt.tuple, &svc)? {
            (id, backend, true) => (id, backend, XLATE_NEW_FLOW_AFFINITY),
            (id, backend, false) => (id, backend, XLATE_NEW_FLOW),
        }
    };
    // A backend reaching its own service through the frontend (hairpin) would receive a
    // packet from itself; source-NAT it so the answer comes back here to be reverse-translated.
    let host = backend.state == BACKEND_HOST;
    let source = if host {
        // A process on this node: delivered locally, it answers through this node anyway.
        Source::client()
    } else if backend.addr == pkt.tuple.saddr {
        Source::snat(F::hairpin_addr())
    } else if svc.flags & SVC_F_SNAT != 0 {
        Source::snat(svc.snat_addr)
    } else {
        Source::client()
    };
    // Local delivery goes through the stack: a FIB lookup would only say "not forwarded".
    let route = !host && (svc.flags & SVC_F_EXTERNAL != 0 || source.snat);
    let Some(work) = F::scratch() else {
        return Err(DROP_CT_FULL);
    };
    // SAFETY: this CPU's slot; `flow` has one user at a time (see `Scratch`).
    unsafe {
        (*work).flow = conntrack::NewFlow {
            svc_id: svc.svc_id,
            backend_id,
            backend,
            source,
            route,
            replace,
        }
    };
    Ok(Start::Tracked(reason))
}

/// True when `client` is within one of the service's loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed<F: Family>(svc: &Service<F::Addr>, client: F::Addr) -> bool {
    let data = SourceRange {
        svc_id_be: svc.svc_id.to_be(),
        addr: client,
    };
    F::source_ranges()
        .get(&Key::new(F::RANGE_KEY_BITS, data))
        .is_some()
}

/// Rewrites `pkt` as its tracking entry `e` says and sends it on: into the stack, or, for
/// flows the datapath routes itself, straight out of the egress interface.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn translate<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    e: &CtEntry<F::Addr>,
    reason: u32,
) -> Verdict {
    Verdict::of(try_translate::<F>(ctx, pkt, e, reason))
}

#[inline(always)]
fn try_translate<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F::Addr>,
    e: &CtEntry<F::Addr>,
    reason: u32,
) -> Result<Verdict, u32> {
    // What the packet becomes is the entry's to say (`CtEntry::translated`); here only the
    // ends that change are rewritten: the destination of a forward packet, the source of a
    // reply, and the other end too when the flow is source-NATed.
    let to = e.translated(&pkt.tuple);
    let snat = e.flags & CT_F_SNAT != 0;
    let forward = e.direction == CT_FORWARD;
    if forward || snat {
        nat::rewrite::<F>(ctx, pkt, End::Destination, &to)?;
    }
    if !forward || snat {
        nat::rewrite::<F>(ctx, pkt, End::Source, &to)?;
    }
    let action = if e.flags & CT_F_ROUTE != 0 {
        route::forward::<F>(ctx, &to, pkt.ttl)?
    } else {
        action::OK
    };
    Ok(Verdict { action, reason })
}

/// Picks a backend for a new flow `tuple` of `svc`, by the service's algorithm.
#[inline(always)]
pub fn select_backend<F: Family>(
    svc: &Service<F::Addr>,
    tuple: &CtKey<F::Addr>,
) -> Result<(u32, Backend<F::Addr>), u32> {
    let backend_id = match svc.algorithm {
        // The agent writes the table before it switches a service to Maglev; should it be
        // missing anyway, a random backend is still a backend of the service.
        ALG_MAGLEV => match maglev_backend(svc, tuple) {
            Some(id) => id,
            None => random_backend(svc)?,
        },
        _ => random_backend(svc)?,
    };
    let Some(b) = F::backends().get_ptr(backend_id) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    Ok((backend_id, unsafe { *b }))
}

/// A uniformly random slot's backend id.
#[inline(always)]
fn random_backend<A>(svc: &Service<A>) -> Result<u32, u32> {
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
fn maglev_backend<A: lb_common::Addr>(svc: &Service<A>, tuple: &CtKey<A>) -> Option<u32> {
    let index = maglev::flow_index(tuple);
    // SAFETY: the value is copied out at once; the agent replaces a table's entries one by
    // one, each write leaving a valid backend id.
    unsafe { MAGLEV.get_value(&svc.svc_id, &index).copied() }
}
