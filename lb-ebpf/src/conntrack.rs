//! Connection tracking: the forward and reverse entries of translated flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use lb_common::{
    conntrack::{self, next_tcp_state, starts_new_connection, TCP_CLOSING},
    proto,
    stats::{DROP_CT_CLASH, DROP_CT_FULL},
    Backend, CtEntry, CtKey, MemberKey, CT_FORWARD, CT_REVERSE,
};

use crate::{
    maps::{CONNTRACK, MEMBERS},
    parse::Packet,
};

/// What connection tracking knows about a packet's tuple.
pub enum Lookup {
    /// Nothing.
    Miss,
    /// An entry that must not be used, and is to be replaced if the packet starts a new flow:
    /// it outlived its lifetime (and so did its other direction), or it is a bare SYN on a
    /// closed connection's tuple, or a UDP flow whose backend has left the service (the
    /// classic kube-proxy bug: a client with a fixed source port stuck on a dead backend).
    Stale,
    /// A live entry, already updated with this packet (TCP state, last seen).
    Hit(CtEntry),
}

/// Looks `pkt`'s own tuple up and, on a live hit, records the packet.
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Lookup {
    let Some(e) = CONNTRACK.get_ptr_mut(pkt.tuple) else {
        return Lookup::Miss;
    };
    // SAFETY: pointer from a successful lookup; copied before any other map operation.
    let entry = unsafe { *e };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let proto = pkt.tuple.proto;
    if proto == proto::TCP && opens_on_closed_flow(&pkt.tuple, &entry, pkt.tcp_flags) {
        return Lookup::Stale;
    }
    if conntrack::expired(proto, entry.tcp_state, entry.last_seen_ns, now)
        && !other_direction_live(&pkt.tuple, &entry, now)
    {
        return Lookup::Stale;
    }
    if proto != proto::TCP && entry.direction == CT_FORWARD && !is_member(&entry) {
        return Lookup::Stale;
    }
    // SAFETY: the element stays allocated; concurrent writers on other CPUs can only race on
    // these informational fields, never on the NAT target.
    unsafe {
        if proto == proto::TCP {
            (*e).tcp_state = next_tcp_state(entry.tcp_state, pkt.tcp_flags);
        }
        (*e).last_seen_ns = now;
        Lookup::Hit(*e)
    }
}

/// True when the other direction's entry of the flow is still within its lifetime: a flow
/// whose packets all go one way (a UDP stream from the backend, say) stays tracked. The
/// lifetime is that of the flow's most advanced TCP state, because each entry only sees its
/// own direction's flags: once either side sent FIN or RST the whole flow ages as closing.
#[inline(always)]
fn other_direction_live(key: &CtKey, entry: &CtEntry, now: u64) -> bool {
    match CONNTRACK.get_ptr(other_key(key, entry)) {
        // SAFETY: pointer from a successful lookup, read at once.
        Some(o) => unsafe {
            let state = entry.tcp_state.max((*o).tcp_state);
            !conntrack::expired(key.proto, state, (*o).last_seen_ns, now)
        },
        None => false,
    }
}

/// True for a bare SYN on a flow that either side has closed (each entry only sees its own
/// direction's FIN or RST): a new connection reusing the tuple, to be balanced afresh.
#[inline(always)]
fn opens_on_closed_flow(key: &CtKey, entry: &CtEntry, tcp_flags: u8) -> bool {
    if starts_new_connection(entry.tcp_state, tcp_flags) {
        return true;
    }
    // Only a bare SYN pays for the second lookup.
    if !starts_new_connection(TCP_CLOSING, tcp_flags) {
        return false;
    }
    match CONNTRACK.get_ptr(other_key(key, entry)) {
        // SAFETY: pointer from a successful lookup, read at once.
        Some(o) => unsafe { (*o).tcp_state == TCP_CLOSING },
        None => false,
    }
}

/// The key of the other direction's entry of the flow `entry` (found at `key`) belongs to.
#[inline(always)]
fn other_key(key: &CtKey, entry: &CtEntry) -> CtKey {
    if entry.direction == CT_FORWARD {
        CtKey {
            saddr: entry.nat_addr,
            daddr: key.saddr,
            sport_be: entry.nat_port_be,
            dport_be: key.sport_be,
            proto: key.proto,
            _pad: [0; 3],
        }
    } else {
        CtKey {
            saddr: key.daddr,
            daddr: entry.nat_addr,
            sport_be: key.dport_be,
            dport_be: entry.nat_port_be,
            proto: key.proto,
            _pad: [0; 3],
        }
    }
}

/// True while the entry's backend still serves the entry's service.
#[inline(always)]
fn is_member(entry: &CtEntry) -> bool {
    let key = MemberKey {
        svc_id: entry.svc_id,
        backend_id: entry.backend_id,
    };
    MEMBERS.get_ptr(key).is_some()
}

/// Records a new flow of `pkt` (client -> VIP) to `backend`, both directions.
///
/// Returns the entry actually in force: when another CPU created the same flow a moment
/// earlier, its choice wins so every packet of the flow goes to one backend. With `replace`
/// (the tuple's entry is stale) the old entry is overwritten.
#[inline(always)]
pub fn create(
    pkt: &Packet,
    svc_id: u32,
    backend_id: u32,
    backend: &Backend,
    replace: bool,
) -> Result<CtEntry, u32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let tcp_state = if pkt.tuple.proto == proto::TCP {
        next_tcp_state(0, pkt.tcp_flags)
    } else {
        0
    };
    let forward = CtEntry {
        backend_id,
        svc_id,
        nat_addr: backend.addr,
        nat_port_be: backend.port_be,
        tcp_state,
        direction: CT_FORWARD,
        last_seen_ns: now,
    };
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST } as u64;
    if CONNTRACK.insert(pkt.tuple, forward, flags).is_err() {
        // Lost a race with another CPU (EEXIST): use its entry. Anything else: the map failed.
        return match CONNTRACK.get_ptr(pkt.tuple) {
            // SAFETY: pointer from a successful lookup, copied out at once.
            Some(e) => Ok(unsafe { *e }),
            None => Err(DROP_CT_FULL),
        };
    }
    let reply_key = CtKey {
        saddr: backend.addr,
        daddr: pkt.tuple.saddr,
        sport_be: backend.port_be,
        dport_be: pkt.tuple.sport_be,
        proto: pkt.tuple.proto,
        _pad: [0; 3],
    };
    let reverse = CtEntry {
        nat_addr: pkt.tuple.daddr,
        nat_port_be: pkt.tuple.dport_be,
        direction: CT_REVERSE,
        ..forward
    };
    // One client port reaching two frontends that lead to the same backend port gives two
    // flows the same backend-side tuple. Overwriting the live one's reverse entry would send
    // its replies back from the wrong frontend; refuse the new flow instead (counted), and
    // forget it so the client's retry chooses again.
    if let Some(existing) = CONNTRACK.get_ptr(reply_key) {
        // SAFETY: pointer from a successful lookup, copied out at once.
        let existing = unsafe { *existing };
        let other_flow =
            existing.nat_addr != reverse.nat_addr || existing.nat_port_be != reverse.nat_port_be;
        if other_flow
            && !conntrack::expired(
                pkt.tuple.proto,
                existing.tcp_state,
                existing.last_seen_ns,
                now,
            )
        {
            let _ = CONNTRACK.remove(pkt.tuple);
            return Err(DROP_CT_CLASH);
        }
    }
    CONNTRACK
        .insert(reply_key, reverse, BPF_ANY as u64)
        .map_err(|_| DROP_CT_FULL)?;
    Ok(forward)
}
