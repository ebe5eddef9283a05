//! The lb datapath: a tc ingress classifier that load-balances Kubernetes services, a tc
//! egress one for the ICMP errors the node itself sends about translated flows, and the
//! cgroup socket programs that load-balance processes on the node itself.
//!
//! Only entry points live here. Each parses and decides in a `try_*` function returning
//! `Result<Verdict, Reason>`; this file turns that into a tc action (or a socket program's
//! verdict) and counts it, in one place, so no verdict is ever computed and then ignored.
// Host builds (`cargo clippy --workspace --all-targets`) only type-check the datapath; the
// real object is built for bpfel-unknown-none by lb-userspace/build.rs.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod affinity;
mod conntrack;
mod egress;
mod family;
mod fragment;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod route;
mod service;
mod sock;
mod stats;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
// The cgroup socket programs'.
use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};
use family::{V4Family, V6Family};

/// tc actions as a classifier returns them.
#[allow(
    clippy::unnecessary_cast,
    reason = "the bindings type them u32 for bpf and i32 on the host, where this only type-checks"
)]
pub mod action {
    use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT};
    pub const OK: i32 = TC_ACT_OK as i32;
    pub const SHOT: i32 = TC_ACT_SHOT as i32;
    pub const REDIRECT: i32 = TC_ACT_REDIRECT as i32;
}

/// What to do with a packet, and why (a `lb_common::stats` reason).
///
/// Functions that are BPF functions of their own (`#[inline(never)]`, see `family`) return a
/// `Verdict`, not a `Result`: eight bytes come back in a register, while anything larger comes
/// back through a pointer to the caller's stack, which the verifier refuses to return.
#[derive(Clone, Copy)]
pub struct Verdict {
    /// tc action: `TC_ACT_OK`, `TC_ACT_SHOT`, or `TC_ACT_REDIRECT` for answers sent back out
    /// (or an XDP action, in `xdp`).
    pub action: i32,
    pub reason: u32,
}

/// `Verdict::reason` of a packet that is not counted (egress and XDP leave most packets
/// alone without a word).
pub const UNCOUNTED: u32 = u32::MAX;

impl Verdict {
    /// The verdict a `try_*` result stands for: an error drops the packet.
    #[inline(always)]
    pub fn of(result: Result<Verdict, u32>) -> Verdict {
        match result {
            Ok(v) => v,
            Err(reason) => Verdict {
                action: action::SHOT,
                reason,
            },
        }
    }
}

/// tc ingress on every interface that carries pod or client traffic.
#[classifier]
pub fn lb_ingress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let v = service::try_ingress(&ctx);
    stats::count(v.reason, len);
    v.action
}

/// tc egress on the same interfaces: what the node itself sends about translated flows (its
/// ICMP errors, its hostNetwork backends' replies) is translated (`egress.rs`). Everything
/// else passes, uncounted.
#[classifier]
pub fn lb_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let v = egress::try_egress(&ctx);
    if v.reason != UNCOUNTED {
        stats::count(v.reason, len);
    }
    v.action
}

/// What a cgroup sock_addr program returns: let the call proceed (with the address as the
/// program left it), or fail it (with the errno set through `bpf_set_retval`, else EPERM).
const SYS_PROCEED: i32 = 1;
const SYS_REJECT: i32 = 0;

/// `connect()` of TCP and UDP sockets on the node: the backend is chosen once, here.
#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::try_forward::<V4Family>(&ctx, sock::Call::Connect))
}

/// `sendmsg()` with an address (unconnected UDP): the backend is chosen per datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::try_forward::<V4Family>(&ctx, sock::Call::Sendmsg))
}

/// `recvmsg()` of UDP sockets: a reply's source shows the frontend the socket sent to.
#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    stats::count_sock(sock::reverse::<V4Family>(&ctx));
    SYS_PROCEED
}

/// `getpeername()`: a connected socket's peer shows as the frontend it connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    stats::count_sock(sock::reverse::<V4Family>(&ctx));
    SYS_PROCEED
}

/// The four above, for IPv6 sockets.
#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::try_forward::<V6Family>(&ctx, sock::Call::Connect))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_verdict(sock::try_forward::<V6Family>(&ctx, sock::Call::Sendmsg))
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    stats::count_sock(sock::reverse::<V6Family>(&ctx));
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    stats::count_sock(sock::reverse::<V6Family>(&ctx));
    SYS_PROCEED
}

#[inline(always)]
fn sock_verdict(result: Result<u32, sock::Reject>) -> i32 {
    match result {
        Ok(reason) => {
            stats::count_sock(reason);
            SYS_PROCEED
        }
        Err(reject) => {
            // SAFETY: plain helper call; the value becomes the syscall's return value.
            unsafe { bpf_set_retval(-reject.errno) };
            stats::count_sock(reject.reason);
            SYS_REJECT
        }
    }
}

/// XDP on the interfaces external clients arrive on: the fast path for node-facing frontends
/// (`xdp.rs`); whatever it leaves passes to `lb_ingress` on the same interface.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let v = xdp::try_xdp(&ctx);
    if v.reason != UNCOUNTED {
        stats::count(v.reason, len as u32);
    }
    v.action as u32
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
