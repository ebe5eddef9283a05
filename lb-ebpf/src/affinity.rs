//! ClientIP session affinity, as kube-proxy's `recent` rules give it: a client's new
//! connections go to the backend its previous one used, as long as the previous new connection
//! was less than the service's timeout ago and that backend still serves the service.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::{Affinity, AffinityKey, Backend, CtKey, MemberKey, Service};

use crate::{
    maps::{AFFINITY, BACKENDS, MEMBERS},
    service::select_backend,
};

const NS_PER_SEC: u64 = 1_000_000_000;

/// The backend for a new flow `tuple` to `svc` (which has affinity on), and whether it is the
/// one remembered for the client. Either way the choice is remembered from now on.
#[inline(always)]
pub fn select(tuple: &CtKey, svc: &Service) -> Result<(u32, Backend, bool), u32> {
    let key = AffinityKey {
        client: tuple.saddr,
        svc_id: svc.svc_id,
    };
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some((id, backend)) = remembered(&key, svc, now) {
        remember(&key, id, now);
        return Ok((id, backend, true));
    }
    let (id, backend) = select_backend(svc, tuple)?;
    remember(&key, id, now);
    Ok((id, backend, false))
}

#[inline(always)]
fn remembered(key: &AffinityKey, svc: &Service, now: u64) -> Option<(u32, Backend)> {
    // SAFETY: pointer from a successful lookup, copied out at once.
    let a = unsafe { *AFFINITY.get_ptr(key)? };
    // Wrapping: an entry written by a clock ahead of ours reads as expired, never as fresh.
    if now.wrapping_sub(a.last_used_ns) > svc.affinity_timeout_s as u64 * NS_PER_SEC {
        return None;
    }
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: a.backend_id,
    };
    MEMBERS.get_ptr(member)?;
    // SAFETY: as above.
    let backend = unsafe { *BACKENDS.get_ptr(a.backend_id)? };
    Some((a.backend_id, backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, now: u64) {
    let a = Affinity {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    // An LRU map makes room rather than fail; if it ever did, the client merely loses its
    // affinity for this connection, which is no reason to drop the packet.
    let _ = AFFINITY.insert(key, a, BPF_ANY as u64);
}
