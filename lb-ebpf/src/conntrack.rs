//! Connection tracking: the forward and reverse entries of translated flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use lb_common::{
    conntrack::{next_tcp_state, starts_new_connection},
    proto,
    stats::DROP_CT_FULL,
    Backend, CtEntry, CtKey, CT_FORWARD, CT_REVERSE,
};

use crate::{maps::CONNTRACK, parse::Packet};

/// A copy of the entry that matched, taken after its state was updated.
pub struct Hit {
    pub entry: CtEntry,
    /// The packet is a bare SYN on a tuple whose connection had closed: a new connection
    /// that should choose its backend afresh.
    pub reopens: bool,
}

/// Looks `pkt`'s own tuple up and, on a hit, records the packet (TCP state, last seen).
#[inline(always)]
pub fn lookup(pkt: &Packet) -> Option<Hit> {
    let e = CONNTRACK.get_ptr_mut(pkt.tuple)?;
    // SAFETY: the pointer comes from a successful lookup and is used before any other map
    // operation on CONNTRACK. Concurrent writers on other CPUs can only race on these
    // informational fields, never on the NAT target.
    unsafe {
        let mut reopens = false;
        if pkt.tuple.proto == proto::TCP {
            let state = (*e).tcp_state;
            reopens = starts_new_connection(state, pkt.tcp_flags);
            (*e).tcp_state = next_tcp_state(state, pkt.tcp_flags);
        }
        (*e).last_seen_ns = bpf_ktime_get_ns();
        Some(Hit { entry: *e, reopens })
    }
}

/// Records a new flow of `pkt` (client -> VIP) to `backend`, both directions.
///
/// Returns the entry actually in force: when another CPU created the same flow a moment
/// earlier, its choice wins so every packet of the flow goes to one backend. With `replace`
/// (a new connection reusing a closed one's tuple) the old entry is overwritten.
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
    CONNTRACK
        .insert(reply_key, reverse, BPF_ANY as u64)
        .map_err(|_| DROP_CT_FULL)?;
    Ok(forward)
}
