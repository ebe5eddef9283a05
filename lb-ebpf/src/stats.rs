//! Per-CPU counters: one bump per packet, under the reason the verdict carries.

use crate::maps::STATS;

#[inline(always)]
pub fn count(reason: u32, bytes: u32) {
    // Per-CPU slot: no other CPU writes it, so plain adds are race-free.
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: the pointer comes from a successful lookup of a preallocated array slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// One run of a socket program, under its `lb_common::sock::stats` reason.
#[inline(always)]
pub fn count_sock(reason: u32) {
    if let Some(c) = crate::maps::SOCK_STATS.get_ptr_mut(reason) {
        // SAFETY: as above: a per-CPU slot from a successful lookup.
        unsafe { *c += 1 };
    }
}
