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
