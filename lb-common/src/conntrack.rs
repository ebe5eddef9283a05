//! Connection-tracking state machine for TCP, shared so the datapath and its tests agree.
//!
//! Deliberately coarse (as cilium's): the datapath only needs to know whether a flow is being
//! opened, is open, or is closing, to decide when a reused 5-tuple starts a new connection.

/// A SYN was seen, no further packet yet.
pub const TCP_SYN_SENT: u8 = 1;
/// Packets past the SYN have been seen.
pub const TCP_ESTABLISHED: u8 = 2;
/// A FIN or RST was seen: the 5-tuple may be reused by a new connection.
pub const TCP_CLOSING: u8 = 3;

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
    if tcp_flags & (flags::FIN | flags::RST) != 0 {
        TCP_CLOSING
    } else if tcp_flags & flags::SYN != 0 && tcp_flags & flags::ACK == 0 {
        TCP_SYN_SENT
    } else if state == TCP_CLOSING {
        // Trailing ACKs of a closed connection do not reopen it.
        TCP_CLOSING
    } else {
        TCP_ESTABLISHED
    }
}

/// True when a packet with `tcp_flags` opens a new connection on a 5-tuple whose tracked
/// connection is in `state`: a bare SYN after the old one closed. The datapath then chooses a
/// backend afresh instead of reusing the closed connection's.
#[inline(always)]
pub const fn starts_new_connection(state: u8, tcp_flags: u8) -> bool {
    state == TCP_CLOSING && tcp_flags & (flags::SYN | flags::ACK) == flags::SYN
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
            (TCP_ESTABLISHED, RST, TCP_CLOSING),
            (TCP_CLOSING, ACK, TCP_CLOSING),
            (TCP_CLOSING, SYN, TCP_SYN_SENT),
            (0, ACK, TCP_ESTABLISHED),
        ];
        for (state, f, want) in cases {
            assert_eq!(next_tcp_state(state, f), want, "state {state} flags {f:#x}");
        }
    }

    #[test]
    fn only_a_bare_syn_on_a_closed_tuple_reopens() {
        assert!(starts_new_connection(TCP_CLOSING, SYN));
        assert!(!starts_new_connection(TCP_CLOSING, SYN | ACK));
        assert!(!starts_new_connection(TCP_ESTABLISHED, SYN));
        assert!(!starts_new_connection(TCP_CLOSING, ACK));
    }
}
