//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), the parts both sides need.
//!
//! The agent fills a service's lookup table from its backends; the datapath hashes a flow's
//! 5-tuple to an index of that table. Every node builds the same table from the same backend
//! set, so a flow maps to the same backend wherever it lands and whatever connection-tracking
//! state was lost, and removing one of N backends remaps only about 1/N of the flows.

use crate::{Addr, CtKey};

/// Entries in every service's table: prime, and about 100x the backends a service is expected
/// to have, which the paper finds keeps each backend's share within about 1% of even. 16 KiB
/// of kernel memory per service that uses Maglev.
pub const TABLE_SIZE: u32 = 4093;

/// A backend's place in the permutation: where its preference list starts and how it steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permutation {
    pub offset: u32,
    pub skip: u32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

impl Permutation {
    /// The permutation of the backend identified by `name` (its address, port and protocol
    /// bytes: what is the same on every node, unlike the node-local backend id).
    pub fn of(name: &[u8]) -> Permutation {
        // Two independent hashes, as the paper asks: FNV-1a from two different bases.
        let h1 = fnv1a(FNV_OFFSET, name);
        let h2 = fnv1a(FNV_OFFSET ^ 0x9e37_79b9_7f4a_7c15, name);
        Permutation {
            offset: (h1 % TABLE_SIZE as u64) as u32,
            skip: (h2 % (TABLE_SIZE as u64 - 1)) as u32 + 1,
        }
    }
}

/// Fills `table` (length `TABLE_SIZE`) with `ids[i]` according to `perms[i]`, taking turns as
/// the paper's Algorithm 1 does. `next` is scratch space of the same length as `perms`. The
/// order of `perms` matters: give it in an order every node agrees on.
pub fn populate(perms: &[Permutation], ids: &[u32], table: &mut [u32], next: &mut [u32]) {
    assert_eq!(perms.len(), ids.len());
    assert_eq!(perms.len(), next.len());
    assert_eq!(table.len(), TABLE_SIZE as usize);
    const EMPTY: u32 = u32::MAX;
    table.fill(EMPTY);
    next.fill(0);
    if perms.is_empty() {
        return;
    }
    let mut filled = 0;
    loop {
        for (i, p) in perms.iter().enumerate() {
            // The backend's next preferred entry that is still free.
            let mut c = candidate(p, next[i]);
            while table[c as usize] != EMPTY {
                next[i] += 1;
                c = candidate(p, next[i]);
            }
            table[c as usize] = ids[i];
            next[i] += 1;
            filled += 1;
            if filled == table.len() {
                return;
            }
        }
    }
}

fn candidate(p: &Permutation, j: u32) -> u32 {
    ((p.offset as u64 + j as u64 * p.skip as u64) % TABLE_SIZE as u64) as u32
}

/// The table index of a flow: a hash of its 5-tuple (murmur3's mixing), stateless so it is the
/// same on every node and after any restart.
#[inline(always)]
pub fn flow_index<A: Addr>(t: &CtKey<A>) -> u32 {
    let ports = ((t.sport_be as u32) << 16) | t.dport_be as u32;
    let mut h = 0x5bd1_e995u32;
    h = t.saddr.mix_into(h, mix);
    h = t.daddr.mix_into(h, mix);
    h = mix(h, ports);
    h = mix(h, t.proto as u32);
    fmix(h) % TABLE_SIZE
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    fn table_of(names: &[u32]) -> Vec<u32> {
        let perms: Vec<Permutation> = names
            .iter()
            .map(|n| Permutation::of(&n.to_be_bytes()))
            .collect();
        let mut table = vec![0; TABLE_SIZE as usize];
        let mut next = vec![0; names.len()];
        populate(&perms, names, &mut table, &mut next);
        table
    }

    #[test]
    fn table_size_is_prime() {
        assert!((2..TABLE_SIZE)
            .take_while(|d| d * d <= TABLE_SIZE)
            .all(|d| !TABLE_SIZE.is_multiple_of(d)));
    }

    #[test]
    fn every_entry_is_filled_and_shares_are_even() {
        for n in [1u32, 2, 3, 7, 10, 40] {
            let names: Vec<u32> = (1..=n).collect();
            let table = table_of(&names);
            for name in &names {
                let share = table.iter().filter(|e| *e == name).count() as u32;
                // Taking turns gives every backend M/N entries, give or take one.
                assert!(
                    share.abs_diff(TABLE_SIZE / n) <= 1,
                    "n={n}: backend {name} has {share}"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_backends_remaps_about_one_nth() {
        for n in [3u32, 5, 10, 20] {
            let all: Vec<u32> = (1..=n).collect();
            let before = table_of(&all);
            let after = table_of(&all[1..]);
            let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count() as f64;
            let fraction = moved / TABLE_SIZE as f64;
            let ideal = 1.0 / n as f64;
            std::println!(
                "n={n}: removing one backend moved {:.2}% of entries (ideal {:.2}%)",
                fraction * 100.0,
                ideal * 100.0
            );
            // The removed backend's own entries must move; the paper reports little more.
            assert!(
                fraction >= ideal * 0.99 && fraction <= ideal * 1.35,
                "n={n}: moved {fraction}"
            );
        }
    }

    #[test]
    fn flow_index_is_in_range_and_spreads() {
        let mut counts = vec![0u32; 16];
        for sport in 0..16_000u16 {
            let t = CtKey {
                saddr: [10, 0, 1, 2],
                daddr: [10, 96, 0, 10],
                sport_be: sport.to_be(),
                dport_be: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            };
            let i = flow_index(&t);
            assert!(i < TABLE_SIZE);
            counts[(i * 16 / TABLE_SIZE) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
