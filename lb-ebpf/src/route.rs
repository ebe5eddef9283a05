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

use crate::parse::{IP_CHECK_OFF, IP_TTL_OFF};

const AF_INET: u8 = 2;

/// Routes a packet of `proto` with time to live `ttl`, already translated to `saddr` ->
/// `daddr`, out of the interface the FIB chooses. Returns the tc action (`TC_ACT_REDIRECT`)
/// or the reason to drop it.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    proto: u8,
    ttl: u8,
    saddr: [u8; 4],
    daddr: [u8; 4],
) -> Result<i32, u32> {
    // A router never forwards a packet whose TTL runs out; the kernel would answer with "time
    // exceeded", which needs the untranslated packet, so it is dropped and counted instead.
    if ttl <= 1 {
        return Err(DROP_TTL_EXCEEDED);
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    // tot_len 0: the helper checks the skb against the egress MTU itself, GSO-aware.
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    // SAFETY: the skb pointer is the program's own context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the params live on our stack and are as long as declared.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut fib,
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

    decrement_ttl(ctx, ttl)?;
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // The next hop's address is not resolved yet: let the kernel's neighbour code resolve
        // it (and queue the packet meanwhile). The FIB wrote the next hop into ipv4_dst.
        let mut nh = bpf_redir_neigh {
            nh_family: AF_INET as u32,
            __bindgen_anon_1: unsafe { core::mem::zeroed() },
        };
        // SAFETY: reading the union member the FIB lookup above wrote.
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
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

/// Decrements the IPv4 TTL, fixing the header checksum over the 16-bit word it shares with
/// the protocol field.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, ttl: u8) -> Result<(), u32> {
    let word: u16 = ctx.load(IP_TTL_OFF).map_err(|_| DROP_REWRITE_FAILED)?;
    let mut bytes = word.to_ne_bytes();
    bytes[0] = ttl - 1;
    let new = u16::from_ne_bytes(bytes);
    ctx.l3_csum_replace(IP_CHECK_OFF, word as u64, new as u64, 2)
        .map_err(|_| DROP_REWRITE_FAILED)?;
    ctx.store(IP_TTL_OFF, &new, 0)
        .map_err(|_| DROP_REWRITE_FAILED)
}
