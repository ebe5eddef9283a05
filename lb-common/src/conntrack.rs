//! Connection-tracking state machine for TCP, shared so the datapath and its tests agree.
//!
//! Deliberately coarse (as cilium's): the datapath only needs to know whether a flow is being
//! opened, is open, or is closing, to decide when a reused 5-tuple starts a new connection.

// The states are ordered: a flow's state is the highest its two directions have reached.

/// A SYN was seen, no further packet yet.
pub const TCP_SYN_SENT: u8 = 1;
/// Packets past the SYN have been seen.
pub const TCP_ESTABLISHED: u8 = 2;
/// This direction sent a FIN: the 5-tuple may be reused by a new connection once the flow is
/// over, but the other direction may still be sending (a half-close).
pub const TCP_CLOSING: u8 = 3;
/// This direction sent an RST: the connection is over both ways.
pub const TCP_RESET: u8 = 4;

const SEC: u64 = 1_000_000_000;
/// How long an entry lives without traffic, by state (cilium's defaults): a connection being
/// opened or closed goes quickly, an established one lasts, and UDP lasts a minute.
pub const SYN_LIFETIME_NS: u64 = 60 * SEC;
pub const ESTABLISHED_LIFETIME_NS: u64 = 6 * 3600 * SEC;
pub const CLOSING_LIFETIME_NS: u64 = 10 * SEC;
/// A flow one side closed while the other may still send (Linux conntrack's FIN_WAIT).
pub const HALF_CLOSED_LIFETIME_NS: u64 = 120 * SEC;
pub const NON_TCP_LIFETIME_NS: u64 = 60 * SEC;

/// How far ahead of a reader's clock an entry's stamp may be and still count as fresh.
pub const AHEAD_NS: u64 = 60 * SEC;

/// How long an entry of `proto` in `tcp_state` lives after its last packet.
#[inline(always)]
pub const fn lifetime_ns(proto: u8, tcp_state: u8) -> u64 {
    if proto != crate::proto::TCP {
        return NON_TCP_LIFETIME_NS;
    }
    match tcp_state {
        TCP_ESTABLISHED => ESTABLISHED_LIFETIME_NS,
        TCP_CLOSING | TCP_RESET => CLOSING_LIFETIME_NS,
        _ => SYN_LIFETIME_NS,
    }
}

/// How long a flow lives after its last packet, from the states its two directions' entries
/// reached (each sees only its own direction's flags): over at once on an RST or a FIN both
/// ways, kept for a while when only one side closed (the other may still be sending), else as
/// its most advanced direction.
#[inline(always)]
pub const fn flow_lifetime_ns(proto: u8, a: u8, b: u8) -> u64 {
    if proto != crate::proto::TCP {
        return NON_TCP_LIFETIME_NS;
    }
    if flow_closed(a, b) {
        return CLOSING_LIFETIME_NS;
    }
    if a == TCP_CLOSING || b == TCP_CLOSING {
        return HALF_CLOSED_LIFETIME_NS;
    }
    lifetime_ns(proto, if a > b { a } else { b })
}

/// True when a TCP flow whose directions reached states `a` and `b` is over: reset, or closed
/// both ways. A half-closed flow is not: the other side may still be sending.
#[inline(always)]
pub const fn flow_closed(a: u8, b: u8) -> bool {
    a == TCP_RESET || b == TCP_RESET || (a >= TCP_CLOSING && b >= TCP_CLOSING)
}

/// True when an entry last used at `last_seen_ns` has outlived its lifetime at `now_ns`.
/// Ages are taken modulo 2^64, so a stamp from before a wrapped subtraction still ages right;
/// but a stamp up to `AHEAD_NS` ahead of `now` is fresh: another CPU (or the agent's garbage
/// collection, which reads `now` once for a whole pass) may have read the clock before the
/// packet that stamped the entry. Reading it as expired would end a flow that just started.
#[inline(always)]
pub const fn expired(proto: u8, tcp_state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
    older_than(last_seen_ns, now_ns, lifetime_ns(proto, tcp_state))
}

/// True when a stamp `last_seen_ns` is more than `lifetime_ns` before `now_ns` (see `expired`
/// for how ages are taken).
#[inline(always)]
pub const fn older_than(last_seen_ns: u64, now_ns: u64, lifetime_ns: u64) -> bool {
    let age = now_ns.wrapping_sub(last_seen_ns);
    age <= u64::MAX - AHEAD_NS && age > lifetime_ns
}

/// True when a tracked flow is over and both its entries may be deleted (the agent's garbage
/// collection): its entry last used at `last_seen_ns`, and its other direction's, if any,
/// `(tcp_state, last_seen_ns)`, have both outlived the flow's lifetime (`flow_lifetime_ns`).
pub fn flow_over(
    proto: u8,
    tcp_state: u8,
    last_seen_ns: u64,
    other: Option<(u8, u64)>,
    now_ns: u64,
) -> bool {
    match other {
        None => expired(proto, tcp_state, last_seen_ns, now_ns),
        Some((other_state, other_seen_ns)) => {
            let lifetime = flow_lifetime_ns(proto, tcp_state, other_state);
            older_than(last_seen_ns, now_ns, lifetime)
                && older_than(other_seen_ns, now_ns, lifetime)
        }
    }
}

/// TCP header flag bits (byte 13 of the header).
pub mod flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// The state after a packet with TCP `flags` passes an entry in state `state`
/// (0 for an entry being created).
#[inline(always)]
pub const fn next_tcp_state(state: u8, tcp_flags: u8) -> u8 {
    if tcp_flags & flags::RST != 0 {
        TCP_RESET
    } else if tcp_flags & flags::FIN != 0 {
        if state == TCP_RESET {
            TCP_RESET
        } else {
            TCP_CLOSING
        }
    } else if state >= TCP_CLOSING {
        // Trailing ACKs of a closing connection do not reopen it, nor does a SYN: whether a
        // SYN starts a new connection on the tuple is decided before (`flow_closed`), and a
        // new connection gets an entry of its own.
        state
    } else if tcp_flags & flags::SYN != 0 && tcp_flags & flags::ACK == 0 {
        TCP_SYN_SENT
    } else {
        TCP_ESTABLISHED
    }
}

/// True when a packet with `tcp_flags` opens a new connection on a 5-tuple whose tracked
/// connection is in `state`: a bare SYN after the old one closed. The datapath then chooses a
/// backend afresh instead of reusing the closed connection's.
#[inline(always)]
pub const fn starts_new_connection(state: u8, tcp_flags: u8) -> bool {
    state >= TCP_CLOSING && tcp_flags & (flags::SYN | flags::ACK) == flags::SYN
}

#[cfg(test)]
mod tests {
    use super::flags::*;
    use super::*;

    #[test]
    fn transitions() {
        let cases = [
            (0, SYN, TCP_SYN_SENT),
            (TCP_SYN_SENT, ACK, TCP_ESTABLISHED),
            (TCP_ESTABLISHED, ACK | PSH, TCP_ESTABLISHED),
            (TCP_ESTABLISHED, FIN | ACK, TCP_CLOSING),
            (TCP_ESTABLISHED, RST, TCP_RESET),
            (TCP_CLOSING, RST, TCP_RESET),
            (TCP_RESET, FIN | ACK, TCP_RESET),
            (TCP_CLOSING, ACK, TCP_CLOSING),
            (TCP_RESET, ACK, TCP_RESET),
            (TCP_RESET, SYN, TCP_RESET),
            (TCP_CLOSING, SYN, TCP_CLOSING),
            (0, ACK, TCP_ESTABLISHED),
        ];
        for (state, f, want) in cases {
            assert_eq!(next_tcp_state(state, f), want, "state {state} flags {f:#x}");
        }
    }

    #[test]
    fn lifetimes_by_state() {
        use crate::proto::{TCP, UDP};
        let cases = [
            (TCP, TCP_SYN_SENT, 59, false),
            (TCP, TCP_SYN_SENT, 61, true),
            (TCP, TCP_ESTABLISHED, 3600, false),
            (TCP, TCP_ESTABLISHED, 6 * 3600 + 1, true),
            (TCP, TCP_CLOSING, 9, false),
            (TCP, TCP_CLOSING, 11, true),
            (UDP, 0, 59, false),
            (UDP, 0, 61, true),
        ];
        let now = 1_000_000 * SEC;
        for (proto, state, age_s, want) in cases {
            let seen = now - age_s * SEC;
            assert_eq!(
                expired(proto, state, seen, now),
                want,
                "{proto}/{state} after {age_s}s"
            );
        }
        assert!(
            !expired(UDP, 0, now + SEC, now),
            "a timestamp just ahead of now (stamped after now was read) is fresh"
        );
    }

    #[test]
    fn a_flow_is_over_when_both_directions_outlived_its_most_advanced_state() {
        use crate::proto::{TCP, UDP};
        let now = 1_000_000 * SEC;
        let ago = |s: u64| now - s * SEC;
        // Reset by the other side 11 s ago: over, although this side was established.
        assert!(flow_over(
            TCP,
            TCP_ESTABLISHED,
            ago(11),
            Some((TCP_RESET, ago(11))),
            now
        ));
        // FIN both ways 11 s ago: over.
        assert!(flow_over(
            TCP,
            TCP_CLOSING,
            ago(11),
            Some((TCP_CLOSING, ago(11))),
            now
        ));
        // Half-closed: the other side may still send, for two minutes.
        assert!(!flow_over(
            TCP,
            TCP_ESTABLISHED,
            ago(60),
            Some((TCP_CLOSING, ago(60))),
            now
        ));
        assert!(flow_over(
            TCP,
            TCP_ESTABLISHED,
            ago(121),
            Some((TCP_CLOSING, ago(121))),
            now
        ));
        // One direction still recent: not over.
        assert!(!flow_over(
            TCP,
            TCP_CLOSING,
            ago(11),
            Some((TCP_CLOSING, ago(5))),
            now
        ));
        // A one-way UDP stream: the silent direction alone does not end it.
        assert!(!flow_over(UDP, 0, ago(3600), Some((0, ago(1))), now));
        // Orphaned entries go by their own lifetime.
        assert!(flow_over(UDP, 0, ago(61), None, now));
        assert!(!flow_over(TCP, TCP_ESTABLISHED, ago(61), None, now));
    }

    #[test]
    fn only_a_bare_syn_on_a_closed_tuple_reopens() {
        assert!(starts_new_connection(TCP_CLOSING, SYN));
        assert!(starts_new_connection(TCP_RESET, SYN));
        assert!(!starts_new_connection(TCP_CLOSING, SYN | ACK));
        assert!(!starts_new_connection(TCP_ESTABLISHED, SYN));
        assert!(!starts_new_connection(TCP_CLOSING, ACK));
    }
}
