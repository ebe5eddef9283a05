//! Internet checksum arithmetic (RFC 1071, RFC 1624) on plain integers.
//!
//! The datapath updates checksums incrementally through kernel helpers when it rewrites a
//! packet; it computes whole checksums only for the small headers it builds itself (TCP RST,
//! ICMP unreachable), with these functions. Tests use them to verify every output packet
//! independently of how the datapath produced it.

/// Adds `data` as big-endian 16-bit words to the running one's-complement sum `sum`
/// (a trailing odd byte is padded with zero, as RFC 1071 says).
pub fn sum_bytes(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum = add(sum, u16::from_be_bytes([w[0], w[1]]) as u32);
    }
    if let [last] = chunks.remainder() {
        sum = add(sum, (*last as u32) << 8);
    }
    sum
}

/// One's-complement addition with end-around carry kept in the upper half.
#[inline(always)]
pub const fn add(sum: u32, v: u32) -> u32 {
    let (s, carry) = sum.overflowing_add(v);
    s + carry as u32
}

/// Folds a 32-bit running sum to 16 bits and complements it: the value to put on the wire.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The pseudo-header sum TCP, UDP (and for IPv6, ICMPv6) checksums start from. IPv4's
/// (RFC 793) and IPv6's (RFC 8200 8.1) hold the same words for lengths below 64 KiB: both
/// addresses, the protocol and the upper-layer length.
pub fn pseudo_header<A: crate::Addr>(saddr: A, daddr: A, proto: u8, l4_len: u16) -> u32 {
    let mut sum = sum_bytes(0, saddr.bytes());
    sum = sum_bytes(sum, daddr.bytes());
    sum = add(sum, proto as u32);
    add(sum, l4_len as u32)
}

/// A checksum (as on the wire, big-endian value) updated for a field that changed from `old`
/// to `new` (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')). Fields are big-endian byte strings of
/// even length. For XDP, where no kernel helper does it; valid for complete checksums only.
#[inline(always)]
pub fn replace(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = !check as u32;
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        sum = add(sum, !u16::from_be_bytes([old[i], old[i + 1]]) as u32);
        sum = add(sum, u16::from_be_bytes([new[i], new[i + 1]]) as u32);
        i += 2;
    }
    fold(sum)
}

/// True when `data` (a header including its checksum field) sums to zero, i.e. is valid.
pub fn verifies(initial: u32, data: &[u8]) -> bool {
    fold(sum_bytes(initial, data)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the bytes 00 01 f2 03 f4 f5 f6 f7 sum to 0xddf2.
        let sum = sum_bytes(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(fold(sum), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A captured header (Wikipedia's IPv4 checksum example), checksum 0xb861.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(fold(sum_bytes(0, &hdr)), 0xb861);
        hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert!(verifies(0, &hdr));
        hdr[15] ^= 1;
        assert!(!verifies(0, &hdr));
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(sum_bytes(0, &[0x12]), 0x1200);
        assert_eq!(sum_bytes(0, &[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        // An IPv4 header whose destination changes, and a ports-and-payload block whose port
        // and a pseudo-header address change: updating the checksum incrementally must give
        // what computing it afresh gives.
        let mut hdr = [
            0x45, 0x00, 0x00, 0x73, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 1, 2,
            10, 96, 0, 10,
        ];
        let check = fold(sum_bytes(0, &hdr));
        for new_daddr in [[10, 0, 11, 2], [255, 255, 255, 255], [0, 0, 0, 0]] {
            let updated = replace(check, &hdr[16..20], &new_daddr);
            let mut h = hdr;
            h[16..20].copy_from_slice(&new_daddr);
            assert_eq!(updated, fold(sum_bytes(0, &h)), "to {new_daddr:?}");
        }
        hdr[10..12].copy_from_slice(&check.to_be_bytes());
        assert!(verifies(0, &hdr));
    }

    #[test]
    fn carries_wrap_around() {
        assert_eq!(add(0xffff_ffff, 1), 1);
        assert_eq!(fold(0x0001_fffe), !0xffffu16);
    }
}
