//! The ingress decision: tracked flow, new flow to a frontend, or not ours.

use aya_ebpf::{helpers::bpf_get_prandom_u32, maps::lpm_trie::Key, programs::TcContext};
use lb_common::{
    maglev, snat, stats::*, Backend, CtEntry, CtKey, FrontendKey, Service, SlotKey, SourceRange,
    VipKey, ALG_MAGLEV, BACKEND_HOST, CT_FORWARD, CT_F_ROUTE, CT_F_SNAT, SCOPE_ALL,
    SVC_F_DROP_WHEN_EMPTY, SVC_F_EXTERNAL, SVC_F_SNAT, SVC_F_SOURCE_RANGES,
};

use crate::{
    action, affinity,
    conntrack::{self, Lookup, Source},
    fragment, icmp,
    maps::{BACKENDS, BACKEND_SLOTS, MAGLEV, SERVICES, SOURCE_RANGES, VIPS},
    nat::{self, End},
    parse::{self, Packet, Parsed},
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
pub fn is_vip(addr: [u8; 4]) -> bool {
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
        Parsed::LaterFragment(frag) => return fragment::translate(ctx, &frag),
        Parsed::NoPorts(_) => return pass(PASS_OTHER),
        Parsed::MalformedL4 { daddr } if is_vip(daddr) => return Err(DROP_MALFORMED_L4),
        Parsed::MalformedL4 { .. } => return pass(PASS_NOT_SERVICE),
        Parsed::L4(pkt) => pkt,
        Parsed::IcmpError(err) => return icmp::translate_error(ctx, &err),
    };

    // One call site for the translation, so the verifier walks it once.
    let (entry, reason) = match conntrack::lookup(&pkt) {
        Lookup::Hit(e) if e.direction == CT_FORWARD => (e, XLATE_FORWARD),
        Lookup::Hit(e) => (e, XLATE_REPLY),
        // A stale entry is overwritten if this packet starts a new flow to a frontend.
        other => match new_flow(ctx, &pkt, matches!(other, Lookup::Stale))? {
            Flow::New(e, reason) => (e, reason),
            Flow::Done(v) => return Ok(v),
        },
    };
    if pkt.first_fragment != 0 {
        fragment::remember(&pkt);
    }
    translate(ctx, &pkt, &entry, reason)
}

/// What a packet that is not part of a tracked flow turned out to be.
enum Flow {
    /// The first packet of a new flow to a frontend, now tracked.
    New(CtEntry, u32),
    /// Anything else, already decided.
    Done(Verdict),
}

/// Starts tracking `pkt` if it is addressed to a frontend, or answers for a frontend without
/// backends. With `replace`, its tuple's existing entry is stale and is overwritten.
#[inline(always)]
fn new_flow(ctx: &TcContext, pkt: &Packet, replace: bool) -> Result<Flow, u32> {
    match start_flow(pkt, replace)? {
        Start::NotService => Ok(Flow::Done(Verdict {
            action: action::OK,
            reason: PASS_NOT_SERVICE,
        })),
        Start::Reject => reject::no_backend(ctx, pkt).map(Flow::Done),
        Start::Tracked(entry, reason) => Ok(Flow::New(entry, reason)),
    }
}

/// How a packet without a live tracking entry starts, decided without touching the packet
/// (shared by the tc and XDP programs).
pub enum Start {
    /// Not addressed to a frontend.
    NotService,
    /// To a frontend without backends: to be answered as kube-proxy's REJECT would.
    Reject,
    /// A new flow, tracked: its forward entry and the reason to count.
    Tracked(CtEntry, u32),
}

/// Decides how `pkt` starts, choosing and recording a backend for a new flow. With `replace`,
/// its tuple's existing entry is stale and is overwritten.
#[inline(always)]
pub fn start_flow(pkt: &Packet, replace: bool) -> Result<Start, u32> {
    let key = FrontendKey {
        addr: pkt.tuple.daddr,
        port_be: pkt.tuple.dport_be,
        proto: pkt.tuple.proto,
        scope: SCOPE_ALL,
    };
    let Some(svc) = SERVICES.get_ptr(key) else {
        return Ok(Start::NotService);
    };
    // SAFETY: pointer from a successful lookup, copied out before any other map operation.
    let svc = unsafe { *svc };
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !source_allowed(&svc, pkt.tuple.saddr) {
        return Err(DROP_SOURCE_RANGE);
    }
    if svc.backend_count == 0 {
        if svc.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
            return Err(DROP_NO_LOCAL_BACKEND);
        }
        return Ok(Start::Reject);
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
    // A backend reaching its own service through the frontend (hairpin) would receive a
    // packet from itself; source-NAT it so the answer comes back here to be reverse-translated.
    let host = backend.state == BACKEND_HOST;
    let source = if host {
        // A process on this node: delivered locally, it answers through this node anyway.
        Source::Client
    } else if backend.addr == pkt.tuple.saddr {
        Source::Snat(hairpin_addr())
    } else if svc.flags & SVC_F_SNAT != 0 {
        Source::Snat(svc.snat_addr)
    } else {
        Source::Client
    };
    // Local delivery goes through the stack: a FIB lookup would only say "not forwarded".
    let route = !host && (svc.flags & SVC_F_EXTERNAL != 0 || matches!(source, Source::Snat(_)));
    let entry = conntrack::create(
        pkt, svc.svc_id, backend_id, &backend, source, route, replace,
    )?;
    Ok(Start::Tracked(entry, reason))
}

/// True when `client` is within one of the service's loadBalancerSourceRanges.
#[inline(always)]
fn source_allowed(svc: &Service, client: [u8; 4]) -> bool {
    let data = SourceRange {
        svc_id_be: svc.svc_id.to_be(),
        addr: client,
    };
    SOURCE_RANGES.get(&Key::new(64, data)).is_some()
}

/// The address hairpin flows are source-NATed to (`lb-agent --hairpin-ip`), network order.
/// Set by the agent at load time; read volatile so the compiler does not fold the default.
#[unsafe(no_mangle)]
static HAIRPIN_ADDR_BE: u32 = u32::from_ne_bytes(snat::HAIRPIN_ADDR);

/// The IPv6 one (`lb-agent --hairpin-ip` given an IPv6 address), set the same way.
#[unsafe(no_mangle)]
static HAIRPIN_ADDR6: [u8; 16] = snat::HAIRPIN_ADDR6;

#[inline(always)]
fn hairpin_addr() -> [u8; 4] {
    // SAFETY: a plain read of a global the program never writes.
    unsafe { core::ptr::read_volatile(&HAIRPIN_ADDR_BE) }.to_ne_bytes()
}

/// Rewrites `pkt` as its tracking entry `e` says and sends it on: into the stack, or, for
/// flows the datapath routes itself, straight out of the egress interface.
#[inline(always)]
pub fn translate(ctx: &TcContext, pkt: &Packet, e: &CtEntry, reason: u32) -> Result<Verdict, u32> {
    // What the packet becomes is the entry's to say (`CtEntry::translated`); here only the
    // ends that change are rewritten: the destination of a forward packet, the source of a
    // reply, and the other end too when the flow is source-NATed.
    let to = e.translated(&pkt.tuple);
    let snat = e.flags & CT_F_SNAT != 0;
    let forward = e.direction == CT_FORWARD;
    if forward || snat {
        nat::rewrite(ctx, pkt, End::Destination, to.daddr, to.dport_be)?;
    }
    if !forward || snat {
        nat::rewrite(ctx, pkt, End::Source, to.saddr, to.sport_be)?;
    }
    let action = if e.flags & CT_F_ROUTE != 0 {
        route::forward(ctx, pkt.tuple.proto, pkt.ttl, to.saddr, to.daddr)?
    } else {
        action::OK
    };
    Ok(Verdict { action, reason })
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
