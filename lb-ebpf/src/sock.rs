//! Socket-level load balancing for processes on the node: cgroup v2 `sock_addr` programs.
//!
//! `connect()` (TCP, connected UDP) and `sendmsg()` of unconnected UDP sockets to a frontend
//! have their destination rewritten to a backend before the kernel routes anything, so no
//! packet of the flow is ever translated; `recvmsg()` and `getpeername()` show the frontend
//! again, from `SOCK_REVNAT`. Backends are chosen as on the tc path (`service::select_backend`,
//! ClientIP affinity from `affinity`), from the same `SERVICES`/`BACKEND_SLOTS`/`BACKENDS`/
//! `MAGLEV` maps. The `*4` programs serve IPv4 sockets, the `*6` ones IPv6 sockets, through
//! the same code generic over the family (IPv4-mapped addresses on IPv6 sockets are left
//! alone).
//!
//! cgroups are not per network namespace: a program on the cgroup root runs for every socket
//! on the machine. Only sockets of the namespace the agent serves (`LB_NETNS_COOKIE`) are
//! touched; every other one is counted and left alone.

use aya_ebpf::{
    bindings::BPF_ANY,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use lb_common::{
    proto,
    sock::{mix64, stats::*, RevNatEntry, RevNatKey},
    stats::DROP_NO_BACKEND_ENTRY,
    Addr, Backend, CtKey, FrontendKey, Service, SlotKey, ALG_MAGLEV, SCOPE_ALL, SCOPE_HOST,
};

use crate::{affinity, family::Family, maps::BACKEND_SLOTS, service::select_backend};

/// The network namespace served: its cookie (`SO_NETNS_COOKIE`), written by the agent at load
/// time (`lb_common::sock::NETNS_COOKIE_GLOBAL`). 0 (never a real cookie) serves none.
#[unsafe(no_mangle)]
static LB_NETNS_COOKIE: u64 = 0;

/// errno values the calls fail with (asm-generic/errno.h).
const ENOMEM: i32 = 12;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

/// A call to fail: the syscall returns `-errno`, and `reason` is counted.
pub struct Reject {
    pub reason: u32,
    pub errno: i32,
}

/// Which call a forward translation serves (for its counter).
#[derive(Clone, Copy)]
pub enum Call {
    Connect,
    Sendmsg,
}

/// The served namespace's cookie, if the socket belongs to it.
#[inline(always)]
fn served_netns(ctx: &SockAddrContext) -> Option<u64> {
    // SAFETY: a read of our own global; volatile so the compiler does not fold the 0 the
    // object file holds (the agent replaces it at load time).
    let served = unsafe { core::ptr::read_volatile(&raw const LB_NETNS_COOKIE) };
    // SAFETY: plain helper call on the program's context.
    (served != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == served).then_some(served)
}

/// connect / sendmsg: a frontend address becomes one of its backends.
#[inline(always)]
pub fn try_forward<F: Family>(ctx: &SockAddrContext, call: Call) -> Result<u32, Reject> {
    let Some(netns) = served_netns(ctx) else {
        return Ok(OTHER_NETNS);
    };
    let (vip, vport_be, protocol) = F::user_addr(ctx);
    let proto = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        // Ping, raw and SCTP sockets: not balanced here.
        _ => return Ok(NOT_SERVICE),
    };
    let Some(svc) = frontend::<F>(vip, vport_be, proto) else {
        return Ok(NOT_SERVICE);
    };
    // kube-proxy REJECTs these with ICMP port unreachable, which a TCP client sees as
    // ECONNREFUSED; failing the call with it directly is the same answer, only faster.
    if svc.backend_count == 0 {
        return Err(Reject {
            reason: REJECT_NO_BACKEND,
            errno: ECONNREFUSED,
        });
    }
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let tuple = socket_tuple(cookie, vip, vport_be, proto);
    let choose = || choose_backend::<F>(&svc, &tuple, cookie);
    let chosen = if svc.affinity_timeout_s == 0 {
        choose().map(|(id, backend)| (id, backend, false))
    } else {
        affinity::select_for_netns::<F>(netns, &svc, choose)
    };
    // A service with backends whose entries are missing (the agent writes them before the
    // count, so this should not happen): sending to the frontend address untranslated would
    // leave the node by its default route, so the call fails instead.
    let Ok((_, backend, reused)) = chosen else {
        return Err(Reject {
            reason: REJECT_ERROR,
            errno: EHOSTUNREACH,
        });
    };
    // Without its reverse entry an unconnected UDP socket would see replies from an address
    // it never sent to; as cilium, fail rather than half-translate.
    if remember_frontend::<F>(cookie, &backend, vip, vport_be, svc.svc_id).is_err() {
        return Err(Reject {
            reason: REJECT_ERROR,
            errno: ENOMEM,
        });
    }
    F::set_user_addr(ctx, backend.addr, backend.port_be);
    Ok(match (reused, call) {
        (true, _) => AFFINITY_REUSED,
        (false, Call::Connect) => CONNECT_XLATE,
        (false, Call::Sendmsg) => SENDMSG_XLATE,
    })
}

/// recvmsg / getpeername: a backend's address the socket was sent to becomes the frontend it
/// addressed. Never fails the call (the kernel does not let these hooks).
#[inline(always)]
pub fn reverse<F: Family>(ctx: &SockAddrContext) -> u32 {
    if served_netns(ctx).is_none() {
        return OTHER_NETNS;
    }
    let (addr, port_be, protocol) = F::user_addr(ctx);
    let key = RevNatKey {
        // SAFETY: plain helper call on the program's context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }.to_ne_bytes(),
        backend_addr: addr,
        backend_port_be: port_be,
        _pad: [0; 2],
    };
    let Some(entry) = F::sock_revnat().get_ptr(key) else {
        return NOT_SERVICE;
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let entry = unsafe { *entry };
    // Only while the frontend still belongs to the same service port: otherwise the socket
    // may now be talking to that address for its own sake, and must see it as it is.
    match frontend::<F>(entry.vip, entry.vport_be, protocol as u8) {
        Some(svc) if svc.svc_id == entry.svc_id => {}
        _ => {
            let _ = F::sock_revnat().remove(key);
            return REVNAT_STALE;
        }
    }
    F::set_user_addr(ctx, entry.vip, entry.vport_be);
    REVNAT
}

/// The 5-tuple Maglev hashes for a socket. Before `connect()` a socket usually has neither a
/// source address nor a port, so its cookie (unique per socket for the boot) stands in for
/// both: different sockets hash apart, and one unconnected UDP socket hashes the same for
/// every datagram, so it keeps its backend as a tracked flow would.
#[inline(always)]
fn socket_tuple<A: Addr>(cookie: u64, vip: A, vport_be: u16, proto: u8) -> CtKey<A> {
    CtKey {
        saddr: A::from_low_word(cookie as u32),
        daddr: vip,
        sport_be: (cookie >> 32) as u16,
        dport_be: vport_be,
        proto,
        _pad: [0; 3],
    }
}

/// The backend for a socket. TCP and connected UDP choose once per socket anyway, so they use
/// the service's algorithm as the tc path does. An unconnected UDP socket chooses on every
/// datagram: under the random algorithm its slot comes from its cookie, so its datagrams stay
/// on one backend (while the backend count stays), as a tracked UDP flow does on the tc path
/// and as kube-proxy's conntrack keeps it; Maglev is stable per socket by construction.
#[inline(always)]
fn choose_backend<F: Family>(
    svc: &Service<F::Addr>,
    tuple: &CtKey<F::Addr>,
    cookie: u64,
) -> Result<(u32, Backend<F::Addr>), u32> {
    if tuple.proto != proto::UDP || svc.algorithm == ALG_MAGLEV {
        return select_backend::<F>(svc, tuple);
    }
    let count = svc.backend_count as u64;
    // Checked again so the verifier sees no division by zero.
    if count == 0 {
        return Err(DROP_NO_BACKEND_ENTRY);
    }
    let slot = SlotKey {
        svc_id: svc.svc_id,
        slot: (mix64(cookie) % count) as u32 + 1,
    };
    let Some(s) = BACKEND_SLOTS.get_ptr(slot) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: pointer from a successful lookup, copied out at once.
    let backend_id = unsafe { (*s).backend_id };
    let Some(b) = F::backends().get_ptr(backend_id) else {
        return Err(DROP_NO_BACKEND_ENTRY);
    };
    // SAFETY: as above.
    Ok((backend_id, unsafe { *b }))
}

/// Records that socket `cookie` sent to `backend` for the frontend `vip:vport_be`; written
/// only when it changes, so a busy UDP socket does not rewrite it on every datagram.
#[inline(always)]
fn remember_frontend<F: Family>(
    cookie: u64,
    backend: &Backend<F::Addr>,
    vip: F::Addr,
    vport_be: u16,
    svc_id: u32,
) -> Result<(), i32> {
    let key = RevNatKey {
        cookie: cookie.to_ne_bytes(),
        backend_addr: backend.addr,
        backend_port_be: backend.port_be,
        _pad: [0; 2],
    };
    let entry = RevNatEntry {
        vip,
        vport_be,
        _pad: [0; 2],
        svc_id,
    };
    if let Some(e) = F::sock_revnat().get_ptr(key) {
        // SAFETY: pointer from a successful lookup, read at once.
        if unsafe { *e } == entry {
            return Ok(());
        }
    }
    F::sock_revnat().insert(key, entry, BPF_ANY as u64)
}

/// The service entry a node process's connection to `addr:port_be` uses: its own
/// (`SCOPE_HOST`) where there is one, else everyone's.
#[inline(always)]
fn frontend<F: Family>(addr: F::Addr, port_be: u16, proto: u8) -> Option<Service<F::Addr>> {
    let key = |scope| FrontendKey {
        addr,
        port_be,
        proto,
        scope,
    };
    let services = F::services();
    let svc = services
        .get_ptr(key(SCOPE_HOST))
        .or_else(|| services.get_ptr(key(SCOPE_ALL)))?;
    // SAFETY: pointer from a successful lookup, copied out at once.
    Some(unsafe { *svc })
}
