//! The XDP fast path for node-facing frontends (NodePort, externalIPs, LoadBalancer IPs) on
//! the interfaces external clients arrive on (`lb-agent --xdp-iface`).
//!
//! It does the common case at the earliest point: a packet of a flow the datapath routes
//! itself (`CT_F_ROUTE`), new or tracked, whose next hop is resolved and whose egress
//! interface also runs this program (`XDP_TARGETS`; or is the ingress one: `XDP_TX`), is
//! translated and sent on before the kernel allocates a socket buffer.
//! Everything else passes, untouched and uncounted, to the tc program on the same interface,
//! which does the full job: frontends without backends (it answers them), ClusterIP flows,
//! fragments, ICMP errors, unresolved neighbours (`bpf_redirect_neigh`), and any routing
//! failure. A flow the XDP program started is already tracked by then, so tc translates it the
//! same way.
//!
//! XDP has no checksum helpers: addresses, ports and the TTL are rewritten with incremental
//! updates (RFC 1624) of checksums that are complete, as they are on frames from a wire.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    checksum, proto,
    stats::{XLATE_XDP_NEW_FLOW, XLATE_XDP_TRACKED},
    Addr, CtKey, CT_F_ROUTE,
};

use crate::{
    conntrack::{self, Lookup},
    family::{Family, V4Family, V6Family},
    maps::XDP_TARGETS,
    parse::{self, ptr_at, Kind, Packet, IP_CHECK_OFF},
    service::{self, Start},
    Verdict, UNCOUNTED,
};

/// Not for the fast path: passed, uncounted, to tc.
const TO_TC: Verdict = Verdict {
    action: XDP_PASS as i32,
    reason: UNCOUNTED,
};

/// The XDP action (in `Verdict::action`) and the reason to count.
#[inline(always)]
pub fn try_xdp(ctx: &XdpContext) -> Verdict {
    let Some(ether_type) = parse::ether_type(ctx) else {
        return TO_TC;
    };
    if ether_type == V4Family::ETH_P_BE {
        xdp::<V4Family>(ctx)
    } else if ether_type == V6Family::ETH_P_BE {
        xdp::<V6Family>(ctx)
    } else {
        TO_TC
    }
}

// A BPF function per family (see `family`: the stack).
#[inline(never)]
fn xdp<F: Family>(ctx: &XdpContext) -> Verdict {
    match try_family::<F>(ctx) {
        None => TO_TC,
        Some(Ok(v)) => v,
        Some(Err(reason)) => Verdict {
            action: XDP_DROP as i32,
            reason,
        },
    }
}

/// `None`: not for the fast path. `Err`: drop, counted.
#[inline(always)]
fn try_family<F: Family>(ctx: &XdpContext) -> Option<Result<Verdict, u32>> {
    let parsed = F::parse_in_scratch(ctx)?;
    if parsed.kind != Kind::L4 {
        return None;
    }
    let pkt = &parsed.pkt;
    if pkt.first_fragment != 0 {
        return None;
    }
    let entry = F::entry_in_scratch()?;
    let reason = match conntrack::lookup::<F>(pkt, entry) {
        Lookup::Hit => XLATE_XDP_TRACKED,
        other => match service::start_flow::<F>(pkt, matches!(other, Lookup::Stale), entry) {
            Ok(Start::Tracked(_)) => XLATE_XDP_NEW_FLOW,
            Ok(_) => return None,
            Err(reason) => return Some(Err(reason)),
        },
    };
    if entry.flags & CT_F_ROUTE == 0 {
        return None;
    }
    let to = entry.translated(&pkt.tuple);
    // Routed first, rewritten after: a packet the fast path cannot send on reaches tc as it
    // arrived.
    let mut hop = NextHop::default();
    if !route::<F>(ctx, pkt, &to, &mut hop) {
        return None;
    }
    let NextHop {
        ifindex,
        dmac,
        smac,
    } = hop;
    let ingress = ctx.ingress_ifindex() as u32;
    if ifindex != ingress && XDP_TARGETS.get_ptr(ifindex).is_none() {
        return None;
    }
    rewrite::<F>(ctx, pkt, &to, dmac, smac)?;
    let action = if ifindex == ingress {
        XDP_TX
    } else {
        // SAFETY: plain helper call; the target runs XDP, so its driver takes the frame.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    };
    Some(Ok(Verdict {
        action: action as i32,
        reason,
    }))
}

/// Where the FIB sends a packet: the egress interface and the Ethernet addresses.
#[derive(Default)]
struct NextHop {
    ifindex: u32,
    dmac: [u8; 6],
    smac: [u8; 6],
}

/// Fills `hop` for `to` and returns true when the FIB has it all. A BPF function of its own
/// (see `family`: the stack), so it writes to the caller's `hop` (see `Verdict`).
#[inline(never)]
fn route<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    to: &CtKey<F::Addr>,
    hop: &mut NextHop,
) -> bool {
    if pkt.ttl <= 1 {
        return false;
    }
    // SAFETY: an all-zero bpf_fib_lookup is a valid (empty) request.
    let mut fib: FibLookup = unsafe { core::mem::zeroed() };
    fib.family = F::AF;
    fib.l4_protocol = pkt.tuple.proto;
    // The MTU is checked against this length: the whole IP packet, either family.
    fib.__bindgen_anon_1.tot_len = (pkt.l4_off - parse::ETH_HLEN) as u16 + pkt.l4_len;
    F::fib_addrs(&mut fib, to.saddr, to.daddr);
    fib.ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: the params live on our stack and are as long as declared.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    } as u32;
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return false;
    }
    hop.ifindex = fib.ifindex;
    hop.dmac = fib.dmac;
    hop.smac = fib.smac;
    true
}

/// Rewrites `pkt` to the tuple `to`, one hop further (TTL / hop limit), with the given
/// Ethernet addresses.
// A BPF function of its own (see `family`: the stack).
#[inline(never)]
fn rewrite<F: Family>(
    ctx: &XdpContext,
    pkt: &Packet<F::Addr>,
    to: &CtKey<F::Addr>,
    dmac: [u8; 6],
    smac: [u8; 6],
) -> Option<()> {
    let from = &pkt.tuple;
    let eth = ptr_at::<[u8; 12]>(ctx, 0)? as *mut [u8; 12];
    let ttl = ptr_at::<[u8; 2]>(ctx, F::TTL_OFF)? as *mut [u8; 2];
    let saddr = ptr_at::<F::Addr>(ctx, F::SADDR_OFF)? as *mut F::Addr;
    let daddr = ptr_at::<F::Addr>(ctx, F::DADDR_OFF)? as *mut F::Addr;
    let ports = ptr_at::<[u8; 4]>(ctx, pkt.l4_off)? as *mut [u8; 4];
    let l4_check = ptr_at::<[u8; 2]>(ctx, pkt.l4_check_off())? as *mut [u8; 2];
    // SAFETY: every pointer above was bounds-checked by `ptr_at`, and XDP frames are
    // writable; the writes stay within the headers parsing found.
    unsafe {
        let (old_ttl, new_ttl) = (*ttl, [(*ttl)[0].wrapping_sub(1), (*ttl)[1]]);
        if F::HAS_L3_CSUM {
            let ip_check = ptr_at::<[u8; 2]>(ctx, IP_CHECK_OFF)? as *mut [u8; 2];
            let mut check = u16::from_be_bytes(*ip_check);
            check = checksum::replace(check, from.saddr.bytes(), to.saddr.bytes());
            check = checksum::replace(check, from.daddr.bytes(), to.daddr.bytes());
            check = checksum::replace(check, &old_ttl, &new_ttl);
            *ip_check = check.to_be_bytes();
        }
        *ttl = new_ttl;

        let old_ports = *ports;
        let mut new_ports = [0u8; 4];
        new_ports[..2].copy_from_slice(&to.sport_be.to_ne_bytes());
        new_ports[2..].copy_from_slice(&to.dport_be.to_ne_bytes());
        let old_l4 = u16::from_be_bytes(*l4_check);
        // A UDP checksum of 0 means "none" and stays 0; a computed 0 is sent as 0xffff.
        if from.proto == proto::TCP || old_l4 != 0 {
            let mut l4 = checksum::replace(old_l4, from.saddr.bytes(), to.saddr.bytes());
            l4 = checksum::replace(l4, from.daddr.bytes(), to.daddr.bytes());
            l4 = checksum::replace(l4, &old_ports, &new_ports);
            if l4 == 0 && from.proto == proto::UDP {
                l4 = 0xffff;
            }
            *l4_check = l4.to_be_bytes();
        }
        *ports = new_ports;
        *saddr = to.saddr;
        *daddr = to.daddr;
        let mut macs = [0u8; 12];
        macs[..6].copy_from_slice(&dmac);
        macs[6..].copy_from_slice(&smac);
        *eth = macs;
    }
    Some(())
}
