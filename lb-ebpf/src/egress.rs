//! tc egress: what the node itself sends about translated flows.
//!
//! - ICMP errors the node generates (a "fragmentation needed" from forwarding into a narrower
//!   link) quote the translated packet; they are translated back like those arriving from
//!   elsewhere (`icmp.rs`).
//! - Replies of hostNetwork backends (`BACKEND_HOST`): flows to them are delivered locally,
//!   so their answers are sent by local sockets and never cross an ingress hook; their source
//!   is rewritten back to the frontend here.
//!
//! Everything else passes, uncounted. Most egress packets are a local socket's segments, often
//! clones with little linear data: only the always-linear IPv4 header is read before deciding,
//! so they are never pulled (which would copy their head).

use aya_ebpf::programs::TcContext;
use lb_common::{proto, stats::PASS_OTHER, stats::XLATE_REPLY, VipKey, CT_REVERSE};

use crate::{
    conntrack::{self, Lookup},
    icmp,
    maps::HOST_BACKENDS,
    parse::{self, ptr_at, Parsed, ETH_HLEN, IP_SADDR_OFF},
    service, Verdict,
};

/// IPv4's EtherType as it lies in the frame (network byte order, read natively).
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// `None`: not ours; passes uncounted.
#[inline(always)]
pub fn try_egress(ctx: &TcContext) -> Option<Result<Verdict, u32>> {
    // SAFETY: `ptr_at` checks bounds; plain loads.
    let ether_type = unsafe { *ptr_at::<u16>(ctx, 12)? };
    if ether_type != ETH_P_IP_BE {
        return None;
    }
    // SAFETY: as above.
    let ip_proto = unsafe { *ptr_at::<u8>(ctx, ETH_HLEN + 9)? };
    if ip_proto == proto::ICMP {
        return match parse::parse(ctx) {
            Parsed::IcmpError(err) => match icmp::translate_error(ctx, &err) {
                Ok(v) if v.reason == PASS_OTHER => None,
                other => Some(other),
            },
            _ => None,
        };
    }
    // SAFETY: as above.
    let saddr = unsafe { *ptr_at::<[u8; 4]>(ctx, IP_SADDR_OFF)? };
    HOST_BACKENDS.get_ptr(VipKey { addr: saddr })?;
    let Parsed::L4(pkt) = parse::parse(ctx) else {
        return None;
    };
    match conntrack::lookup(&pkt) {
        Lookup::Hit(e) if e.direction == CT_REVERSE => {
            Some(service::translate(ctx, &pkt, &e, XLATE_REPLY))
        }
        _ => None,
    }
}
