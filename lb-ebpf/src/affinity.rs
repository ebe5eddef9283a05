//! ClientIP session affinity, as kube-proxy's `recent` rules give it: a client's new
//! connections go to the backend its previous one used, as long as the previous new connection
//! was less than the service's timeout ago and that backend still serves the service.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::{
    sock::NetnsAffinityKey, Affinity, AffinityKey, Backend, CtKey, MemberKey, Service,
};

use crate::{
    family::Family,
    maps::{MEMBERS, SOCK_AFFINITY},
    service::select_backend,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The backend for a new flow `tuple` to `svc` (which has affinity on), and whether it is the
/// one remembered for the client. Either way the choice is remembered from now on.
#[inline(always)]
pub fn select<F: Family>(
    tuple: &CtKey<F::Addr>,
    svc: &Service<F::Addr>,
) -> Result<(u32, Backend<F::Addr>, bool), u32> {
    let key = AffinityKey {
        client: tuple.saddr,
        svc_id: svc.svc_id,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some((id, backend)) = remembered::<F>(&key, svc, now) {
        remember::<F>(&key, id, now);
        return Ok((id, backend, true));
    }
    let (id, backend) = select_backend::<F>(svc, tuple)?;
    remember::<F>(&key, id, now);
    Ok((id, backend, false))
}

/// As `select`, for a socket of the network namespace `netns_cookie`: node-originated
/// connections are remembered per namespace (`lb_common::sock::NetnsAffinityKey` says why),
/// with the same timeout and membership rules. `choose` picks a backend when none is reused.
#[inline(always)]
pub fn select_for_netns<F: Family>(
    netns_cookie: u64,
    svc: &Service<F::Addr>,
    choose: impl FnOnce() -> Result<(u32, Backend<F::Addr>), u32>,
) -> Result<(u32, Backend<F::Addr>, bool), u32> {
    let key = NetnsAffinityKey {
        netns_cookie,
        svc_id: svc.svc_id,
        _pad: 0,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let previous = SOCK_AFFINITY.get_ptr(key).map(|a| unsafe { *a });
    let (id, backend, reused) = match previous.and_then(|a| still_valid::<F>(a, svc, now)) {
        Some((id, backend)) => (id, backend, true),
        None => {
            let (id, backend) = choose()?;
            (id, backend, false)
        }
    };
    // An LRU map makes room rather than fail; if it ever did, the namespace merely loses its
    // affinity for this connection.
    let _ = SOCK_AFFINITY.insert(key, remembering(id, now), BPF_ANY as u64);
    Ok((id, backend, reused))
}

#[inline(always)]
fn remembered<F: Family>(
    key: &AffinityKey<F::Addr>,
    svc: &Service<F::Addr>,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    // SAFETY: pointer from a successful lookup, copied out at once.
    still_valid::<F>(unsafe { *F::affinity().get_ptr(key)? }, svc, now)
}

/// The remembered backend of `a`, if the memory is within the service's timeout and the
/// backend still serves the service.
#[inline(always)]
fn still_valid<F: Family>(
    a: Affinity,
    svc: &Service<F::Addr>,
    now: u64,
) -> Option<(u32, Backend<F::Addr>)> {
    // Wrapping: an entry written by a clock ahead of ours reads as expired, never as fresh.
    if now.wrapping_sub(a.last_used_ns) > svc.affinity_timeout_s as u64 * NS_PER_SEC {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: a.backend_id,
    };
    MEMBERS.get_ptr(member)?;
    // SAFETY: pointer from a successful lookup, copied out at once.
    let backend = unsafe { *F::backends().get_ptr(a.backend_id)? };
    Some((a.backend_id, backend))
}

#[inline(always)]
fn remember<F: Family>(key: &AffinityKey<F::Addr>, backend_id: u32, now: u64) {
    // An LRU map makes room rather than fail; if it ever did, the client merely loses its
    // affinity for this connection, which is no reason to drop the packet.
    let _ = F::affinity().insert(key, remembering(backend_id, now), BPF_ANY as u64);
}

#[inline(always)]
fn remembering(backend_id: u32, now: u64) -> Affinity {
    Affinity {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    }
}
