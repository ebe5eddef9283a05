//! Connection tracking: the forward and reverse entries of translated flows.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use lb_common::{
    conntrack::{self, next_tcp_state, starts_new_connection, TCP_CLOSING},
    proto, snat,
    stats::{DROP_CT_CLASH, DROP_CT_FULL, DROP_SNAT_EXHAUSTED},
    Addr, Backend, CtEntry, CtKey, MemberKey, CT_FORWARD, CT_F_ROUTE, CT_F_SNAT, CT_REVERSE,
};

use crate::{family::Family, maps::MEMBERS, parse::Packet};

/// What connection tracking knows about a packet's tuple.
pub enum Lookup {
    /// Nothing.
    Miss,
    /// An entry that must not be used, and is to be replaced if the packet starts a new flow:
    /// it outlived its lifetime (and so did its other direction), or it is a bare SYN on a
    /// closed connection's tuple, or a UDP flow whose backend has left the service (the
    /// classic kube-proxy bug: a client with a fixed source port stuck on a dead backend).
    Stale,
    /// A live entry, already updated with this packet (TCP state, last seen), and copied to
    /// the caller's.
    Hit,
}

/// Looks `pkt`'s own tuple up and, on a live hit, records the packet and copies the entry to
/// `out`.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn lookup<F: Family>(pkt: &Packet<F::Addr>, out: &mut CtEntry<F::Addr>) -> Lookup {
    let Some(e) = F::conntrack().get_ptr_mut(pkt.tuple) else {
        return Lookup::Miss;
    };
    // SAFETY: pointer from a successful lookup; copied before any other map operation.
    let entry = unsafe { *e };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let proto = pkt.tuple.proto;
    if proto == proto::TCP && opens_on_closed_flow::<F>(&pkt.tuple, &entry, pkt.tcp_flags) {
        return Lookup::Stale;
    }
    if conntrack::expired(proto, entry.tcp_state, entry.last_seen_ns, now)
        && !other_direction_live::<F>(&pkt.tuple, &entry, now)
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
        *out = *e;
        Lookup::Hit
    }
}

/// True when the other direction's entry of the flow is still within its lifetime: a flow
/// whose packets all go one way (a UDP stream from the backend, say) stays tracked. The
/// lifetime is that of the flow's most advanced TCP state, because each entry only sees its
/// own direction's flags: once either side sent FIN or RST the whole flow ages as closing.
#[inline(always)]
fn other_direction_live<F: Family>(
    key: &CtKey<F::Addr>,
    entry: &CtEntry<F::Addr>,
    now: u64,
) -> bool {
    match F::conntrack().get_ptr(entry.other_key(key.proto)) {
        // SAFETY: pointer from a successful lookup, read at once.
        Some(o) => unsafe {
            let lifetime = conntrack::flow_lifetime_ns(key.proto, entry.tcp_state, (*o).tcp_state);
            !conntrack::older_than((*o).last_seen_ns, now, lifetime)
        },
        None => false,
    }
}

/// True for a bare SYN on a flow that is over (`conntrack::flow_closed`; each entry only sees
/// its own direction's FIN or RST): a new connection reusing the tuple, to be balanced afresh.
/// A SYN on a half-closed flow is not one: the flow stays on its backend.
#[inline(always)]
fn opens_on_closed_flow<F: Family>(
    key: &CtKey<F::Addr>,
    entry: &CtEntry<F::Addr>,
    tcp_flags: u8,
) -> bool {
    // Only a bare SYN pays for the second lookup.
    if !starts_new_connection(TCP_CLOSING, tcp_flags) {
        return false;
    }
    match F::conntrack().get_ptr(entry.other_key(key.proto)) {
        // SAFETY: pointer from a successful lookup, read at once.
        Some(o) => conntrack::flow_closed(entry.tcp_state, unsafe { (*o).tcp_state }),
        // The other entry is gone: judged by this one alone.
        None => starts_new_connection(entry.tcp_state, tcp_flags),
    }
}

/// True while the entry's backend still serves the entry's service.
#[inline(always)]
fn is_member<A>(entry: &CtEntry<A>) -> bool {
    let key = MemberKey {
        svc_id: entry.svc_id,
        backend_id: entry.backend_id,
    };
    MEMBERS.get_ptr(key).is_some()
}

/// How a new flow's source is written: kept (the backend sees the client), or with `snat`
/// rewritten to `addr` and a port allocated for the flow. A struct rather than an enum: it is
/// copied into another BPF function's frame, and an enum's unused payload bytes would be
/// copied uninitialised, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Source<A> {
    pub snat: bool,
    pub addr: A,
}

impl<A: Addr> Source<A> {
    #[inline(always)]
    pub fn client() -> Source<A> {
        Source {
            snat: false,
            addr: A::default(),
        }
    }
    #[inline(always)]
    pub fn snat(addr: A) -> Source<A> {
        Source { snat: true, addr }
    }
}

/// A new flow's choices, for `create`.
#[derive(Clone, Copy)]
pub struct NewFlow<A> {
    pub svc_id: u32,
    pub backend_id: u32,
    pub backend: Backend<A>,
    pub source: Source<A>,
    /// Route translated packets in the datapath (`CT_F_ROUTE`).
    pub route: bool,
    /// The tuple's entry is stale: overwrite it.
    pub replace: bool,
}

/// Records a new flow of `pkt` (client -> frontend) to `backend`, both directions, and writes
/// the forward entry actually in force to `out`: when another CPU created the same flow a moment earlier, its
/// choice wins so every packet of the flow goes to one backend. With `replace` (the tuple's
/// entry is stale) the old forward entry is overwritten.
///
/// The reverse entry is claimed first, because its key (backend -> the flow's source after
/// translation) is what must be unique: with SNAT, claiming it is how a source port is
/// allocated; without, a live flow already holding it (one client port reaching two frontends
/// of one backend port) makes the new flow a clash, refused so the live flow's replies keep
/// their translation. The client's retry chooses again.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "by value, the scratch entries and keys would be copied onto the stack"
)]
pub fn create<F: Family>(
    pkt: &Packet<F::Addr>,
    flow: &NewFlow<F::Addr>,
    out: &mut CtEntry<F::Addr>,
) -> Result<(), u32> {
    let ct = F::conntrack();
    let NewFlow {
        svc_id,
        backend_id,
        backend,
        source,
        route,
        replace,
    } = *flow;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let tuple = &pkt.tuple;
    let tcp_state = if tuple.proto == proto::TCP {
        next_tcp_state(0, pkt.tcp_flags)
    } else {
        0
    };
    let mut flags = if route { CT_F_ROUTE } else { 0 };
    if source.snat {
        flags |= CT_F_SNAT;
    }
    // The entries and keys live in per-CPU scratch memory, not on the stack (`Scratch`).
    let Some(work) = F::scratch() else {
        return Err(DROP_CT_FULL);
    };
    // SAFETY: this CPU's scratch slot; `create` uses only these two fields, which no caller
    // holds (see `Scratch`).
    let (reverse, key) = unsafe { (&mut (*work).reverse, &mut (*work).key) };
    let forward = out;
    *forward = CtEntry {
        backend_id,
        svc_id,
        nat_addr: backend.addr,
        nat_port_be: backend.port_be,
        tcp_state,
        direction: CT_FORWARD,
        peer_addr: tuple.saddr,
        peer_port_be: tuple.sport_be,
        flags,
        _pad: 0,
        last_seen_ns: now,
    };
    *reverse = CtEntry {
        nat_addr: tuple.daddr,
        nat_port_be: tuple.dport_be,
        direction: CT_REVERSE,
        ..*forward
    };

    match source.snat {
        false => {
            *key = forward.other_key(tuple.proto);
            if !claim::<F>(key, reverse, now) {
                return Err(DROP_CT_CLASH);
            }
        }
        true => {
            forward.peer_addr = source.addr;
            // Linear probing from a random port: only a free port is taken (the agent's
            // garbage collection frees the ports of expired flows), which keeps each probe to
            // one map operation.
            // SAFETY: plain helper call.
            let start = unsafe { bpf_get_prandom_u32() } % snat::PORT_COUNT;
            let mut claimed = false;
            for i in 0..snat::TRIES {
                let port = snat::PORT_MIN + ((start + i) % snat::PORT_COUNT) as u16;
                forward.peer_port_be = port.to_be();
                *key = forward.other_key(tuple.proto);
                if ct.insert(&*key, &*reverse, BPF_NOEXIST as u64).is_ok() {
                    claimed = true;
                    break;
                }
            }
            if !claimed {
                return Err(DROP_SNAT_EXHAUSTED);
            }
        }
    }

    let insert = if replace { BPF_ANY } else { BPF_NOEXIST } as u64;
    if ct.insert(tuple, &*forward, insert).is_ok() {
        return Ok(());
    }
    // Lost a race with another CPU (EEXIST): use its entry, and give back the reverse entry
    // claimed above unless it is the winner's too.
    let Some(winner) = ct.get_ptr(tuple) else {
        return Err(DROP_CT_FULL);
    };
    *key = forward.other_key(tuple.proto);
    // SAFETY: pointer from a successful lookup, copied out at once.
    *forward = unsafe { *winner };
    if *key != forward.other_key(tuple.proto) {
        let _ = ct.remove(&*key);
    }
    Ok(())
}

/// Writes `reverse` at `key` unless a live entry of another flow holds it. True when the key
/// is now this flow's.
#[inline(always)]
fn claim<F: Family>(key: &CtKey<F::Addr>, reverse: &CtEntry<F::Addr>, now: u64) -> bool {
    let ct = F::conntrack();
    if let Some(existing) = ct.get_ptr(key) {
        // SAFETY: pointer from a successful lookup, read in place (no copy on the stack).
        let existing = unsafe { &*existing };
        let live = !conntrack::expired(key.proto, existing.tcp_state, existing.last_seen_ns, now)
            || other_direction_live::<F>(key, existing, now);
        if live && !same_flow(existing, reverse) {
            return false;
        }
        return ct.insert(key, reverse, BPF_ANY as u64).is_ok();
    }
    if ct.insert(key, reverse, BPF_NOEXIST as u64).is_ok() {
        return true;
    }
    // Another CPU wrote the key meanwhile: ours only if it is the same flow.
    match ct.get_ptr(key) {
        // SAFETY: pointer from a successful lookup, read at once.
        Some(e) => same_flow(unsafe { &*e }, reverse),
        None => false,
    }
}

/// True when two reverse entries translate to the same frontend and client.
#[inline(always)]
fn same_flow<A: PartialEq>(a: &CtEntry<A>, b: &CtEntry<A>) -> bool {
    a.nat_addr == b.nat_addr
        && a.nat_port_be == b.nat_port_be
        && a.peer_addr == b.peer_addr
        && a.peer_port_be == b.peer_port_be
}
