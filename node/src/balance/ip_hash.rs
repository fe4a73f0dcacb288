//! Client-affinity by consistent hashing: Maglev (Eisenbud et al., NSDI 2016).
//!
//! Why Maglev rather than a hash ring: lookup is one array index (`hash % M`), independent of
//! the member count; the table gives every member almost exactly its share of keys (a ring needs
//! hundreds of virtual nodes per server to get close); and removing a member moves little more
//! than that member's own keys. The price is building a 65 537-entry table, which only happens
//! when the eligible set changes — about 3 ms for 100 (or 1000) members in a release build.
//!
//! Construction, as in the paper: each member gets a permutation of the table's slots from two
//! hashes of its identity, `offset = h1 % M` and `skip = h2 % (M − 1) + 1` (M is prime, so every
//! skip visits every slot); members take turns claiming the next still-empty slot of their own
//! permutation until the table is full. Members are taken in identity order so the table is a
//! function of the member *set*, not of the order the caller listed them in.
//!
//! Identity: a member is its [`Member::id`] (a fixed-seed hash of the server's name, computed by
//! the pool), hashed again with xxh3-64 under the fixed seeds [`OFFSET_SEED`] and [`SKIP_SEED`]
//! (the id as 8 little-endian bytes). Nothing depends on the process or on the server's position
//! in the config, so every keel instance with the same servers builds the same table and sends a
//! given client to the same server; a server that leaves and comes back gets its old slots back,
//! and reordering or removing other servers in the config moves only their clients. Changing the
//! seeds or the table size remaps every client; they are part of
//! the behaviour, pinned by a test.
//!
//! Weights: each round the heaviest members claim one slot and a member of weight `w` claims
//! `w / max weight` of a slot on average (credit accumulates across rounds), so table shares —
//! and hence traffic shares — follow the weights. With equal weights this is plain Maglev.
//!
//! Rejected members (not yet rebuilt away, or skipped on a retry): the lookup walks forward
//! from the key's slot to the next slot whose member is accepted. Walking is deterministic, only
//! the rejected member's keys move, and because neighbouring slots belong to pseudo-random
//! members its keys spread over the others in proportion to their shares. The walk is capped at
//! [`WALK_LIMIT`] slots; past it (nearly every member rejected) the member list is scanned once
//! from a hash-derived start, still deterministic, so work stays bounded.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{weight_of, Member, Pick, Selector};

/// Lookup table size: prime (Maglev needs it), and large enough that each of up to a few hundred
/// members gets a fine-grained share. Part of the client→server mapping.
pub const TABLE_SIZE: usize = 65_537;

/// xxh3 seed for a member's permutation offset ("keel-off"). Part of the client→server mapping.
pub const OFFSET_SEED: u64 = 0x6b65_656c_2d6f_6666;

/// xxh3 seed for a member's permutation skip ("keelskip"). Part of the client→server mapping.
pub const SKIP_SEED: u64 = 0x6b65_656c_736b_6970;

/// Table slots examined after the key's own before falling back to a member scan.
const WALK_LIMIT: usize = 128;

/// Maglev consistent hashing on the client's hash.
pub struct IpHashSelector {
    /// Pool indices of the members, ascending.
    indices: Box<[usize]>,
    /// `TABLE_SIZE` entries, each a position in `indices`; empty when there are no members.
    table: Box<[u32]>,
}

impl IpHashSelector {
    /// Builds the Maglev table over `members`. At most 65 537 members (one per table slot)
    /// take part, those with the lowest pool indices.
    pub fn new(members: &[Member]) -> Self {
        let mut members: Vec<Member> = members.to_vec();
        members.sort_by_key(|m| (m.id, m.index));
        members.dedup_by_key(|m| m.index);
        members.truncate(TABLE_SIZE);
        let table = build_table(&members);
        Self { indices: members.iter().map(|m| m.index).collect(), table }
    }
}

impl Selector for IpHashSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        if self.indices.is_empty() || self.table.is_empty() {
            return None;
        }
        let m = self.table.len();
        let home = (pick.hash % m as u64) as usize;
        for step in 0..=WALK_LIMIT {
            let index = self.indices[self.table[(home + step) % m] as usize];
            if (pick.accept)(index) {
                return Some(index);
            }
        }
        let n = self.indices.len();
        let start = (pick.hash % n as u64) as usize;
        (0..n).map(|k| self.indices[(start + k) % n]).find(|&index| (pick.accept)(index))
    }
}

/// A member's permutation of the table: first slot and stride.
fn permutation(id: u64) -> (usize, usize) {
    let key = id.to_le_bytes();
    let m = TABLE_SIZE as u64;
    let offset = xxh3_64_with_seed(&key, OFFSET_SEED) % m;
    let skip = xxh3_64_with_seed(&key, SKIP_SEED) % (m - 1) + 1;
    (offset as usize, skip as usize)
}

/// Maglev population with weighted turns; `members` sorted by identity, at most `TABLE_SIZE`.
fn build_table(members: &[Member]) -> Box<[u32]> {
    const EMPTY: u32 = u32::MAX;
    if members.is_empty() {
        return Box::new([]);
    }
    let weights: Vec<u32> = members.iter().map(weight_of).collect();
    let max_weight = weights.iter().copied().max().unwrap_or(1);
    // Per member: (next slot of its permutation, skip).
    let mut cursors: Vec<(usize, usize)> = members.iter().map(|m| permutation(m.id)).collect();
    let mut credit = vec![0u32; members.len()];
    let mut table = vec![EMPTY; TABLE_SIZE];
    let mut filled = 0;
    // Every round the heaviest member claims a slot, so this ends after at most TABLE_SIZE rounds.
    while filled < TABLE_SIZE {
        for (position, ((cursor, skip), (credit, &weight))) in
            cursors.iter_mut().zip(credit.iter_mut().zip(&weights)).enumerate()
        {
            *credit += weight;
            if *credit < max_weight {
                continue;
            }
            *credit -= max_weight;
            // The permutation visits every slot within TABLE_SIZE steps and a slot is still
            // empty, so this finds one.
            while table[*cursor] != EMPTY {
                *cursor = (*cursor + *skip) % TABLE_SIZE;
            }
            table[*cursor] = u32::try_from(position).unwrap_or(0);
            filled += 1;
            if filled == TABLE_SIZE {
                break;
            }
        }
    }
    table.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Instant;

    use super::super::testing::{index_of, members, select_with};
    use super::*;

    fn lookup(selector: &IpHashSelector, hash: u64) -> usize {
        select_with(selector, hash, |_| 0, |_| true).expect("a member is accepted")
    }

    fn keys(n: usize, seed: u64) -> Vec<u64> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.u64(..)).collect()
    }

    fn shares(selector: &IpHashSelector, keys: &[u64]) -> HashMap<usize, usize> {
        let mut counts = HashMap::new();
        for &k in keys {
            *counts.entry(lookup(selector, k)).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn ip_hash_same_hash_same_member() {
        let selector = IpHashSelector::new(&members(&[1, 1, 1, 1, 1]));
        let again = IpHashSelector::new(&members(&[1, 1, 1, 1, 1]));
        for k in keys(1000, 1) {
            let first = lookup(&selector, k);
            assert_eq!(lookup(&selector, k), first);
            assert_eq!(lookup(&again, k), first, "a rebuild maps the key elsewhere");
        }
    }

    #[test]
    fn ip_hash_ignores_member_order() {
        let ms = members(&[1, 2, 3, 1]);
        let reversed: Vec<Member> = ms.iter().rev().copied().collect();
        assert_eq!(IpHashSelector::new(&ms).table, IpHashSelector::new(&reversed).table);
    }

    #[test]
    fn ip_hash_mapping_is_pinned_across_instances() {
        // Seeds, table size and identity hashing are the cross-instance contract: if this
        // test has to change, every deployed client is remapped.
        let selector = IpHashSelector::new(&[0, 1, 2, 3, 4].map(|index| Member { index, weight: 1, id: index as u64 }));
        let got: Vec<usize> = [0u64, 1, 2, 0xdead_beef, u64::MAX].iter().map(|&h| lookup(&selector, h)).collect();
        assert_eq!(got, PINNED);
    }
    const PINNED: [usize; 5] = [4, 2, 4, 1, 4];

    #[test]
    fn ip_hash_distribution_is_even() {
        let selector = IpHashSelector::new(&members(&[1, 1, 1, 1, 1]));
        let counts = shares(&selector, &keys(100_000, 2));
        let mean = 100_000.0 / 5.0;
        for p in 0..5 {
            let c = counts[&index_of(p)] as f64;
            assert!((c - mean).abs() < 0.1 * mean, "{counts:?}");
        }
    }

    #[test]
    fn ip_hash_table_shares_are_nearly_exact() {
        for n in [3usize, 7, 10, 100] {
            let selector = IpHashSelector::new(&members(&vec![1; n]));
            let mut slots = vec![0usize; n];
            for &p in selector.table.iter() {
                slots[p as usize] += 1;
            }
            let mean = TABLE_SIZE as f64 / n as f64;
            for (p, &s) in slots.iter().enumerate() {
                assert!((s as f64 - mean).abs() <= 0.02 * mean + 1.0, "n={n} member {p}: {s} slots, mean {mean}");
            }
        }
    }

    #[test]
    fn ip_hash_follows_weights() {
        let selector = IpHashSelector::new(&members(&[2, 1, 1]));
        let counts = shares(&selector, &keys(100_000, 3));
        for (p, expected) in [(0, 0.5), (1, 0.25), (2, 0.25)] {
            let got = counts[&index_of(p)] as f64 / 100_000.0;
            assert!((got - expected).abs() < 0.02, "{counts:?}");
        }
        let selector = IpHashSelector::new(&members(&[256, 1]));
        let light = selector.table.iter().filter(|&&p| p == 1).count() as f64 / TABLE_SIZE as f64;
        assert!((light - 1.0 / 257.0).abs() < 0.001, "light member share {light}");
    }

    #[test]
    fn ip_hash_removal_moves_little_more_than_the_removed_members_keys() {
        let ks = keys(100_000, 4);
        for n in [5usize, 10] {
            let all = members(&vec![1; n]);
            let full = IpHashSelector::new(&all);
            let before: Vec<usize> = ks.iter().map(|&k| lookup(&full, k)).collect();
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Member> = all.iter().copied().filter(|m| m.index != index_of(removed)).collect();
                let reduced = IpHashSelector::new(&rest);
                let moved = ks.iter().zip(&before).filter(|&(&k, &b)| lookup(&reduced, k) != b).count();
                let fraction = moved as f64 / ks.len() as f64;
                assert!(fraction < 1.0 / n as f64 + 0.03, "n={n} removed {removed}: moved {fraction:.4}");

                // Adding it back restores the old mapping for every key.
                let restored = IpHashSelector::new(&all);
                assert!(ks.iter().zip(&before).all(|(&k, &b)| lookup(&restored, k) == b));
            }
        }
    }

    #[test]
    fn ip_hash_rejected_member_moves_only_its_own_keys() {
        let selector = IpHashSelector::new(&members(&[1, 1, 1, 1, 1]));
        let rejected = index_of(2);
        let mut spread = HashMap::new();
        for k in keys(50_000, 5) {
            let home = lookup(&selector, k);
            let fallback = select_with(&selector, k, |_| 0, |i| i != rejected).expect("a member is accepted");
            if home == rejected {
                assert_ne!(fallback, rejected);
                assert_eq!(select_with(&selector, k, |_| 0, |i| i != rejected), Some(fallback), "not deterministic");
                *spread.entry(fallback).or_insert(0usize) += 1;
            } else {
                assert_eq!(fallback, home, "a key not on the rejected member moved");
            }
        }
        // The rejected member's keys spread over all the others, not onto one neighbour.
        let total: usize = spread.values().sum();
        assert_eq!(spread.len(), 4);
        assert!(spread.values().all(|&c| (c as f64) > 0.15 * total as f64), "{spread:?}");
    }

    #[test]
    fn ip_hash_falls_back_past_the_walk_limit() {
        // One accepted member out of 200: walks usually exceed the limit and the scan decides.
        let ms = members(&vec![1; 200]);
        let selector = IpHashSelector::new(&ms);
        let only = index_of(123);
        for k in keys(2000, 6) {
            assert_eq!(select_with(&selector, k, |_| 0, |i| i == only), Some(only));
        }
    }

    #[test]
    fn ip_hash_builds_quickly() {
        let ms = members(&(0..100).map(|i| 1 + (i * 37) % 256).collect::<Vec<u32>>());
        let started = Instant::now();
        let selector = IpHashSelector::new(&ms);
        let elapsed = started.elapsed();
        assert_eq!(selector.table.len(), TABLE_SIZE);
        // Generous: debug build on a shared 2-core machine (about 16 ms there; about 3 ms in release).
        assert!(elapsed.as_millis() < 500, "build took {elapsed:?}");
    }
}
