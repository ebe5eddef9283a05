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
//! clones with little linear data: only the linear headers are read (and conntrack looked up)
//! before deciding, so they are never pulled (which would copy their head).

use aya_ebpf::programs::TcContext;
use lb_common::{proto, stats::PASS_OTHER, stats::XLATE_REPLY, CtKey, VipKey, CT_REVERSE};

use crate::{
    conntrack::{self, Lookup},
    fragment, icmp,
    maps::{CONNTRACK, NODE_ADDRS},
    parse::{self, ptr_at, Parsed, ETH_HLEN, IP_OFFSET},
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
    if ip_proto != proto::TCP && ip_proto != proto::UDP {
        return None;
    }
    // SAFETY: as above.
    let ip = unsafe { core::ptr::read_unaligned(ptr_at::<[u8; 20]>(ctx, ETH_HLEN)?) };
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    NODE_ADDRS.get_ptr(VipKey { addr: saddr })?;
    if u16::from_be_bytes([ip[6], ip[7]]) & IP_OFFSET != 0 {
        // A later fragment of a local reply: translated like its first fragment was.
        let Parsed::LaterFragment(frag) = parse::parse(ctx) else {
            return None;
        };
        return match fragment::translate(ctx, &frag) {
            Ok(v) if v.reason == PASS_OTHER => None,
            other => Some(other),
        };
    }
    // Only a reply of a tracked flow is parsed (and maybe pulled): the tuple is peeked at in
    // the linear head first, and most of the node's own traffic stops here.
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    // SAFETY: as above.
    let ports = unsafe { core::ptr::read_unaligned(ptr_at::<[u16; 2]>(ctx, ETH_HLEN + ihl)?) };
    let key = CtKey {
        saddr,
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport_be: ports[0],
        dport_be: ports[1],
        proto: ip_proto,
        _pad: [0; 3],
    };
    // SAFETY: pointer from a successful lookup, read at once.
    if unsafe { (*CONNTRACK.get_ptr(key)?).direction } != CT_REVERSE {
        return None;
    }
    let Parsed::L4(pkt) = parse::parse(ctx) else {
        return None;
    };
    match conntrack::lookup(&pkt) {
        Lookup::Hit(e) if e.direction == CT_REVERSE => {
            if pkt.first_fragment != 0 {
                fragment::remember(&pkt);
            }
            Some(service::translate(ctx, &pkt, &e, XLATE_REPLY))
        }
        _ => None,
    }
}
