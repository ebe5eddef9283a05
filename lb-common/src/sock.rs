//! Socket-level load balancing: the contract between the cgroup `sock_addr` programs and the
//! agent.
//!
//! Processes on the node itself reach services through programs on the cgroup v2 root: the
//! backend is chosen once, at `connect()` (TCP, connected UDP) or at each `sendmsg()` of an
//! unconnected UDP socket, by rewriting the address the process passed, before the kernel
//! routes anything. No packet is translated afterwards. What the process later reads back
//! (`recvmsg()` source, `getpeername()`) is rewritten to the frontend again from `SOCK_REVNAT`.

use crate::{V4, V6};

/// Key of `SOCK_REVNAT`: a socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevNatKey<A = V4> {
    /// `bpf_get_socket_cookie()` (unique per socket for the whole boot), as its native bytes:
    /// a `u64` would align the key to 8 and leave the IPv6 key 4 bytes of implicit padding.
    pub cookie: [u8; 8],
    /// Backend address, network byte order.
    pub backend_addr: A,
    /// Backend port, network byte order.
    pub backend_port_be: u16,
    pub _pad: [u8; 2],
}

/// Value of `SOCK_REVNAT`: the frontend the socket addressed, to show its replies as coming
/// from there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatEntry<A = V4> {
    /// Frontend address (the ClusterIP), network byte order.
    pub vip: A,
    /// Frontend port, network byte order.
    pub vport_be: u16,
    pub _pad: [u8; 2],
    /// `Service::svc_id` the frontend had: a reply is rewritten only while the frontend still
    /// belongs to the same service port (cilium's `rev_nat_index` check).
    pub svc_id: u32,
}

/// Key of `SOCK_AFFINITY`: ClientIP session affinity for the sockets of one network namespace.
///
/// A socket has no source address when `connect()` runs (the route chooses it afterwards), so
/// the "client" of a node-originated connection is its network namespace, as cilium keys
/// socket-LB affinity: every process of the node counts as one client, which is what
/// kube-proxy sees too when they all leave with the node's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsAffinityKey {
    /// `bpf_get_netns_cookie()` of the connecting socket.
    pub netns_cookie: u64,
    /// `Service::svc_id`.
    pub svc_id: u32,
    pub _pad: u32,
}

/// Map names (pinned under the agent's bpffs directory, listed in `names::ALL`).
pub mod names {
    pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
    /// `SOCK_REVNAT` for IPv6 sockets.
    pub const SOCK_REVNAT6: &str = "SOCK_REVNAT6";
    pub const SOCK_AFFINITY: &str = "SOCK_AFFINITY";
    pub const SOCK_STATS: &str = "SOCK_STATS";
}

/// Capacities.
pub mod capacity {
    /// (socket, backend) pairs remembered for reverse translation; LRU, so the coldest
    /// sockets' entries make room (their replies then show the backend's address).
    pub const SOCK_REVNAT: u32 = 262_144;
    /// (network namespace, service) affinity entries; one namespace is served.
    pub const SOCK_AFFINITY: u32 = 65_536;
}

/// Name of the global the agent sets at load time to its own network namespace's cookie
/// (`SO_NETNS_COOKIE`). The programs act only on sockets of that namespace; while it is 0 they
/// act on none.
pub const NETNS_COOKIE_GLOBAL: &str = "LB_NETNS_COOKIE";

/// Why a socket program did what it did: the index into the per-CPU `SOCK_STATS` array (one
/// `u64` per reason). Every program run is counted under exactly one.
pub mod stats {
    /// A socket of another network namespace: left alone.
    pub const OTHER_NETNS: u32 = 0;
    /// Our namespace, but the address is not a frontend (or, for recvmsg/getpeername, not one
    /// the socket was sent to): left alone.
    pub const NOT_SERVICE: u32 = 1;
    /// `connect()` to a frontend: the address was rewritten to a backend.
    pub const CONNECT_XLATE: u32 = 2;
    /// `sendmsg()` of an unconnected UDP socket to a frontend: rewritten to a backend.
    pub const SENDMSG_XLATE: u32 = 3;
    /// As the two above, to the backend remembered by ClientIP session affinity.
    pub const AFFINITY_REUSED: u32 = 4;
    /// To a frontend without endpoints: the call failed with ECONNREFUSED.
    pub const REJECT_NO_BACKEND: u32 = 5;
    /// A slot or backend entry was missing, or the reverse entry could not be stored: the call
    /// failed (EHOSTUNREACH, ENOMEM) rather than reach the frontend address untranslated.
    pub const REJECT_ERROR: u32 = 6;
    /// `recvmsg()`/`getpeername()`: the backend's address was rewritten back to the frontend.
    pub const REVNAT: u32 = 7;
    /// A reverse entry whose frontend no longer belongs to its service: deleted, address left
    /// as it is.
    pub const REVNAT_STALE: u32 = 8;

    /// Number of reasons; the length of `SOCK_STATS`.
    pub const REASONS: u32 = 9;

    /// Stable names, indexed by reason.
    pub const NAMES: [&str; REASONS as usize] = [
        "sock_other_netns",
        "sock_not_service",
        "sock_connect_xlate",
        "sock_sendmsg_xlate",
        "sock_affinity_reused",
        "sock_reject_no_backend",
        "sock_reject_error",
        "sock_revnat",
        "sock_revnat_stale",
    ];
}

/// A 64-bit finaliser (splitmix64's), to spread socket cookies, which are handed out nearly
/// sequentially, over a service's slots.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const _: () = {
    assert!(core::mem::size_of::<RevNatKey>() == 16);
    assert!(core::mem::size_of::<RevNatEntry>() == 12);
    assert!(core::mem::size_of::<RevNatKey<V6>>() == 28);
    assert!(core::mem::size_of::<RevNatEntry<V6>>() == 24);
    assert!(core::mem::size_of::<NetnsAffinityKey>() == 16);
};

#[cfg(feature = "user")]
mod user {
    //! Userspace trait impls; safe for the same reasons as in `maps`: `repr(C)`, integers and
    //! byte arrays only, no implicit padding (the size assertions prove it).
    use super::*;

    plain_old_data!(
        RevNatKey<V4>,
        RevNatEntry<V4>,
        RevNatKey<V6>,
        RevNatEntry<V6>,
        NetnsAffinityKey
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn names_match_indices() {
        assert_eq!(stats::NAMES.len(), stats::REASONS as usize);
        assert_eq!(
            stats::NAMES[stats::OTHER_NETNS as usize],
            "sock_other_netns"
        );
        assert_eq!(
            stats::NAMES[stats::REVNAT_STALE as usize],
            "sock_revnat_stale"
        );
    }

    #[test]
    fn sequential_cookies_spread_evenly_over_slots() {
        for slots in [2u64, 3, 7, 10] {
            let mut counts = std::vec![0u32; slots as usize];
            for cookie in 4096..4096 + 30_000u64 {
                counts[(mix64(cookie) % slots) as usize] += 1;
            }
            let even = 30_000 / slots as u32;
            assert!(
                counts.iter().all(|c| c.abs_diff(even) < even / 20),
                "{slots} slots: {counts:?}"
            );
        }
    }
}
