//! Why the datapath did what it did to a packet: the index into the per-CPU `STATS` array.
//!
//! Every packet the classifier sees is counted under exactly one reason. `PASS_*` packets leave
//! untouched, `XLATE_*` are translated and continue, `REJECT_*` are answered on the service's
//! behalf, `DROP_*` are dropped.

/// Neither IPv4 nor IPv6 (ARP, LLDP, ...): not ours to look at.
pub const PASS_NOT_IP: u32 = 0;
/// An IP header the kernel itself will refuse (bad version, IHL, length), or an IPv6 header
/// chain the datapath does not walk (jumbograms, more than `parse::MAX_EXT_HEADERS`
/// extension headers): left to the kernel.
pub const PASS_MALFORMED_IP: u32 = 1;
/// TCP/UDP that is neither a tracked flow nor addressed to a frontend.
pub const PASS_NOT_SERVICE: u32 = 2;
/// Another L4 protocol, or a fragment, not addressed to a frontend address.
pub const PASS_OTHER: u32 = 3;
/// First packet of a flow to a frontend: backend chosen, destination rewritten.
pub const XLATE_NEW_FLOW: u32 = 4;
/// A tracked flow's client -> VIP packet: destination rewritten to its backend.
pub const XLATE_FORWARD: u32 = 5;
/// A tracked flow's backend -> client packet: source rewritten back to the VIP.
pub const XLATE_REPLY: u32 = 6;
/// TCP to a frontend without backends: answered with RST.
pub const REJECT_TCP_RST: u32 = 7;
/// UDP to a frontend without backends: answered with ICMP port unreachable.
pub const REJECT_ICMP_UNREACH: u32 = 8;
/// A fragment addressed to a frontend address (ports unknown, so it cannot be translated).
pub const DROP_FRAGMENT: u32 = 9;
/// A packet to a frontend address whose L4 header is truncated or invalid.
pub const DROP_MALFORMED_L4: u32 = 10;
/// The service's slot or backend entry was missing (should not happen: the agent writes
/// backends before slots before counts).
pub const DROP_NO_BACKEND_ENTRY: u32 = 11;
/// The connection-tracking map refused a new entry.
pub const DROP_CT_FULL: u32 = 12;
/// A kernel helper failed while rewriting or building a packet.
pub const DROP_REWRITE_FAILED: u32 = 13;
/// To a frontend without backends, but not answerable (carries IP options, or is an RST
/// itself, or another protocol): dropped instead of answered.
pub const DROP_NO_BACKEND: u32 = 14;

/// First packet of a flow to a frontend with ClientIP affinity, sent to the backend the client
/// used before (its affinity had not expired and the backend still serves the service).
pub const XLATE_NEW_FLOW_AFFINITY: u32 = 15;

/// A new flow whose translated 5-tuple (backend side) is already a live flow's, as when one
/// client port reaches two frontends of one backend port: dropped so the live flow's replies
/// keep their translation. The client's retry chooses again.
pub const DROP_CT_CLASH: u32 = 16;

/// A translated packet the datapath must route itself (`CT_F_ROUTE`) has no route, or its
/// next hop is not usable (forwarding disabled, blackhole, unreachable): dropped.
pub const DROP_NO_ROUTE: u32 = 17;
/// A routed packet larger than the egress interface's MTU: dropped (the kernel would need the
/// untranslated packet to answer "fragmentation needed").
pub const DROP_FRAG_NEEDED: u32 = 18;
/// A routed packet whose TTL ran out: dropped, as a router would.
pub const DROP_TTL_EXCEEDED: u32 = 19;
/// No free source port for a source-NATed flow after `snat::TRIES` probes.
pub const DROP_SNAT_EXHAUSTED: u32 = 20;
/// To a Local-policy frontend (externalTrafficPolicy Local, or a ClusterIP under
/// internalTrafficPolicy Local) whose service has endpoints, none on this node.
pub const DROP_NO_LOCAL_BACKEND: u32 = 21;

/// An ICMP error about a tracked flow: the quoted packet and the error's destination
/// translated back, so the sender's socket sees it (path MTU discovery).
pub const XLATE_ICMP_ERROR: u32 = 22;

/// A new flow to a LoadBalancer frontend from a client outside its `loadBalancerSourceRanges`.
pub const DROP_SOURCE_RANGE: u32 = 23;

/// A later fragment (no ports) of a datagram whose first fragment was translated: its
/// addresses translated the same way.
pub const XLATE_FRAGMENT: u32 = 24;

/// XDP fast path: the first packet of a new flow to a node-facing frontend, translated and
/// redirected before the stack saw it.
pub const XLATE_XDP_NEW_FLOW: u32 = 25;
/// XDP fast path: a packet of a tracked routed flow, translated and redirected.
pub const XLATE_XDP_TRACKED: u32 = 26;

/// Number of reasons; the length of the `STATS` array.
pub const REASONS: u32 = 27;

/// Stable names for metrics and the CLI, indexed by reason.
pub const NAMES: [&str; REASONS as usize] = [
    "pass_not_ip",
    "pass_malformed_ip",
    "pass_not_service",
    "pass_other",
    "xlate_new_flow",
    "xlate_forward",
    "xlate_reply",
    "reject_tcp_rst",
    "reject_icmp_unreach",
    "drop_fragment",
    "drop_malformed_l4",
    "drop_no_backend_entry",
    "drop_ct_full",
    "drop_rewrite_failed",
    "drop_no_backend",
    "xlate_new_flow_affinity",
    "drop_ct_clash",
    "drop_no_route",
    "drop_frag_needed",
    "drop_ttl_exceeded",
    "drop_snat_exhausted",
    "drop_no_local_backend",
    "xlate_icmp_error",
    "drop_source_range",
    "xlate_fragment",
    "xlate_xdp_new_flow",
    "xlate_xdp_tracked",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_indices() {
        assert_eq!(NAMES[PASS_NOT_IP as usize], "pass_not_ip");
        assert_eq!(NAMES[XLATE_REPLY as usize], "xlate_reply");
        assert_eq!(NAMES[DROP_NO_BACKEND as usize], "drop_no_backend");
        assert_eq!(
            NAMES[DROP_NO_LOCAL_BACKEND as usize],
            "drop_no_local_backend"
        );
        assert_eq!(NAMES.len(), REASONS as usize);
    }
}
