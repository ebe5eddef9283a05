//! Forwarding a translated packet ourselves: FIB lookup, TTL, Ethernet addresses, redirect.
//!
//! Flows to node and external addresses need this (`CT_F_ROUTE`): once source-NATed to a node
//! address, or reverse-translated back to one, a packet carries a local source, and the
//! kernel's input path drops such packets as martians. Routing them here, as cilium does for
//! NodePort, also skips a second trip through the stack.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::stats::{DROP_FRAG_NEEDED, DROP_NO_ROUTE, DROP_REWRITE_FAILED, DROP_TTL_EXCEEDED};

use lb_common::CtKey;

use crate::family::Family;

/// Routes a packet with time to live `ttl`, already translated to the tuple `to`, out of the
/// interface the FIB chooses. Returns the tc action (`TC_ACT_REDIRECT`)
/// or the reason to drop it.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
pub fn forward<F: Family>(ctx: &TcContext, to: &CtKey<F::Addr>, ttl: u8) -> Result<i32, u32> {
    // A router never forwards a packet whose TTL runs out; the kernel would answer with "time
    // exceeded", which needs the untranslated packet, so it is dropped and counted instead.
    if ttl <= 1 {
        return Err(DROP_TTL_EXCEEDED);
    }
    // The request lives in scratch memory: on the stack it would push the longest call
    // chains past 512 bytes on kernels that round each frame up (6.1; see `family`).
    let work = F::scratch().ok_or(DROP_NO_ROUTE)?;
    // SAFETY: this CPU's slot; `fib` has one user at a time (see `Scratch`). An all-zero
    // bpf_fib_lookup is a valid (empty) request.
    let fib = unsafe { &mut (*work).fib };
    *fib = unsafe { core::mem::zeroed() };
    fib.family = F::AF;
    fib.l4_protocol = to.proto;
    // tot_len 0: the helper checks the skb against the egress MTU itself, GSO-aware.
    F::fib_addrs(fib, to.saddr, to.daddr);
    // SAFETY: the skb pointer is the program's own context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the params are as long as declared.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    } as u32;
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return Err(DROP_FRAG_NEEDED);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Err(DROP_NO_ROUTE);
    }

    F::decrement_ttl(ctx, ttl)?;
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The next hop's address is not resolved yet: let the kernel's neighbour code resolve
        // it (and queue the packet meanwhile). The FIB wrote the next hop as the destination.
        let mut nh = F::fib_next_hop(fib);
        // SAFETY: params on our stack, as long as declared.
        let action = unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        };
        return Ok(action as i32);
    }
    ctx.store(0, &fib.dmac, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(6, &fib.smac, 0)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(fib.ifindex, 0) } as i32)
}
