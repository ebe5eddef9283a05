//! IPv4 and IPv6 fragments of translated datagrams. Only the first fragment carries the ports that
//! name a flow, so when it is translated its ports are remembered under the datagram's
//! identity (addresses, IP id, protocol), and the later fragments, found by the same identity,
//! get the same address translation. Their L4 bytes are payload: nothing else changes (the
//! datagram's L4 checksum, in the first fragment, already accounts for the new addresses).
//!
//! A later fragment that arrives before its first one cannot be matched: it is dropped if it
//! is addressed to a frontend (as before fragment tracking), passed otherwise.

use aya_ebpf::{bindings::BPF_ANY, programs::TcContext};
use lb_common::{
    stats::{DROP_FRAGMENT, PASS_OTHER, XLATE_FRAGMENT},
    CtKey, FragKey, FragPorts, CT_F_ROUTE,
};

use crate::{
    action,
    family::Family,
    nat::{self, End},
    parse::{Fragment, Packet},
    route,
    service::is_vip,
    Verdict,
};

/// Records the ports of `pkt`, a translated first fragment, for its datagram's later ones.
#[inline(always)]
pub fn remember<F: Family>(pkt: &Packet<F::Addr>) {
    let key = FragKey {
        saddr: pkt.tuple.saddr,
        daddr: pkt.tuple.daddr,
        id_be: pkt.ip_id_be,
        proto: pkt.tuple.proto,
        _pad: [0; 3],
    };
    let ports = FragPorts {
        sport_be: pkt.tuple.sport_be,
        dport_be: pkt.tuple.dport_be,
    };
    // LRU: makes room rather than fail; a lost entry only costs the later fragments.
    let _ = F::fragments().insert(key, ports, BPF_ANY as u64);
}

/// Translates a later fragment like its datagram's first one.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn translate<F: Family>(ctx: &TcContext, frag: &Fragment<F::Addr>) -> Verdict {
    Verdict::of(try_translate::<F>(ctx, frag))
}

#[inline(always)]
fn try_translate<F: Family>(ctx: &TcContext, frag: &Fragment<F::Addr>) -> Result<Verdict, u32> {
    let k = &frag.key;
    let not_ours = || {
        if is_vip::<F>(k.daddr) {
            Err(DROP_FRAGMENT)
        } else {
            Ok(Verdict {
                action: action::OK,
                reason: PASS_OTHER,
            })
        }
    };
    let Some(ports) = F::fragments().get_ptr(k) else {
        return not_ours();
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let ports = unsafe { *ports };
    let tuple = CtKey {
        saddr: k.saddr,
        daddr: k.daddr,
        sport_be: ports.sport_be,
        dport_be: ports.dport_be,
        proto: k.proto,
        _pad: [0; 3],
    };
    let Some(e) = F::conntrack().get_ptr(tuple) else {
        return not_ours();
    };
    // SAFETY: as above.
    let e = unsafe { *e };
    // The entry decides, as for the first fragment (`CtEntry::translated`); an address that
    // does not change is rewritten to itself, which changes nothing.
    let to = e.translated(&tuple);
    nat::rewrite_addr::<F>(ctx, End::Destination, k.daddr, to.daddr)?;
    nat::rewrite_addr::<F>(ctx, End::Source, k.saddr, to.saddr)?;
    let action = if e.flags & CT_F_ROUTE != 0 {
        route::forward::<F>(ctx, &to, frag.ttl)?
    } else {
        action::OK
    };
    Ok(Verdict {
        action,
        reason: XLATE_FRAGMENT,
    })
}
