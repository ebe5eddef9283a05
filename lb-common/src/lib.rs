//! The contract between the eBPF datapath (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every type that crosses the kernel boundary lives here: map keys and values, counter
//! indices, and the small pieces of pure logic both sides need (checksum arithmetic, TCP state
//! transitions). Rules, so the two sides can never disagree on a byte:
//! - `#[repr(C)]`, fixed-width integers, explicit `_pad` fields: no implicit padding, because
//!   uninitialised padding bytes would change a hash-map key's hash.
//! - Byte order is in the field name: `_be` fields hold network byte order exactly as on the
//!   wire, so the datapath compares them without swapping. Addresses are `[u8; 4]`, which is
//!   network order by construction and reads well in `bpftool map dump`.
//! - No `bool`, `Option` or Rust enums in map types: a `u8` plus named constants.
#![no_std]

/// Implements the userspace traits that let a map type cross the kernel boundary as bytes
/// (`aya::Pod`, `bytemuck::Pod`). Only for types that are `repr(C)`, made only of integers and
/// byte arrays, with no implicit padding: each module's size assertions prove the last; the
/// module calling it says so in its comment, which the `SAFETY` lines refer to.
#[cfg(feature = "user")]
macro_rules! plain_old_data {
    ($($t:ty),* $(,)?) => {$(
        // SAFETY: see the calling module's comment.
        unsafe impl aya::Pod for $t {}
        // SAFETY: see the calling module's comment.
        unsafe impl bytemuck::Zeroable for $t {}
        // SAFETY: see the calling module's comment.
        unsafe impl bytemuck::Pod for $t {}
    )*};
}

pub mod checksum;
pub mod conntrack;
pub mod maglev;
pub mod maps;
pub mod sock;
pub mod stats;

pub use maps::*;

/// IP protocol numbers used by the datapath.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}
