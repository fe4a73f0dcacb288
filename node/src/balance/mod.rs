//! Balancing algorithms: which server of a pool gets the next request.
//!
//! A [`Selector`] is built from the pool's *eligible* members (healthy, not drained, not
//! ejected) and rebuilt whenever that set changes, then swapped in atomically by the pool
//! (pingora's shape): selection itself never takes a lock that a request could wait on. The
//! caller still passes an `accept` filter, because between a health flip and the rebuild, and on
//! retries ("not the server that just refused me"), some members must be skipped.
//!
//! One file per algorithm; [`build`] maps the config's [`Algorithm`] to one of them.
//!
//! # Contract every selector keeps
//!
//! - `select` never allocates and never blocks: its shared state is atomics (a cursor), and
//!   randomness comes from fastrand's thread-local generator. Whatever is expensive (schedules,
//!   hash tables) is computed once in `new`, which only runs when the eligible set changes.
//! - A member `accept` rejects is never returned; if every member is rejected the answer is
//!   `None`, reached after a bounded number of `accept` calls (at most a small constant plus
//!   the member count), never by looping until the filter changes its mind.
//! - The returned value is a [`Member::index`] (a pool index), not a position in `members`.
//! - Weights are clamped to 1–[`MAX_WEIGHT`] on construction: config validation already
//!   guarantees that range, and clamping keeps a bad value from turning into a division by
//!   zero or a multi-gigabyte schedule.

use keel_cluster::model::{Algorithm, MAX_WEIGHT};

mod ip_hash;
mod least_connections;
mod p2c;
mod random;
mod round_robin;
mod weighted_round_robin;

pub use ip_hash::IpHashSelector;
pub use least_connections::LeastConnectionsSelector;
pub use p2c::P2cSelector;
pub use random::RandomSelector;
pub use round_robin::RoundRobinSelector;
pub use weighted_round_robin::WeightedRoundRobinSelector;

/// A pool member a selector may choose: its index in the pool's server list, and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Index into the pool's server list; what [`Selector::select`] returns.
    pub index: usize,
    /// Relative share of traffic, 1–256.
    pub weight: u32,
    /// Stable identity of the server (a fixed-seed hash of its name). Consistent hashing keys
    /// on it rather than on `index`, so adding, removing or reordering servers in the config
    /// moves only the clients of the servers concerned.
    pub id: u64,
}

/// What a selection may look at besides the selector's own state.
pub struct Pick<'a> {
    /// Hash of the client key (its IP address) for `ip_hash`; other algorithms ignore it.
    pub hash: u64,
    /// In-flight requests on the member with this pool index.
    pub load: &'a dyn Fn(usize) -> usize,
    /// Whether the member with this pool index may be chosen now.
    pub accept: &'a dyn Fn(usize) -> bool,
}

/// Chooses a server for a request.
pub trait Selector: Send + Sync {
    /// The pool index of the chosen member, or `None` when no member is acceptable.
    fn select(&self, pick: &Pick<'_>) -> Option<usize>;
}

/// Whether `algorithm` takes server weights into account. Plain round robin does not (every
/// server in turn), so the CLI warns when a weight is set on such a pool.
pub fn uses_weights(algorithm: Algorithm) -> bool {
    !matches!(algorithm, Algorithm::RoundRobin)
}

/// Builds the selector for `algorithm` over `members` (which may be empty: it then selects none).
pub fn build(algorithm: Algorithm, members: &[Member]) -> Box<dyn Selector> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobinSelector::new(members)),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobinSelector::new(members)),
        Algorithm::LeastConnections => Box::new(LeastConnectionsSelector::new(members)),
        Algorithm::LeastRequestP2c => Box::new(P2cSelector::new(members)),
        Algorithm::IpHash => Box::new(IpHashSelector::new(members)),
        Algorithm::Random => Box::new(RandomSelector::new(members)),
    }
}

/// A member's weight as the algorithms use it: never 0, never above [`MAX_WEIGHT`].
fn weight_of(member: &Member) -> u32 {
    member.weight.clamp(1, MAX_WEIGHT)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the algorithms' unit tests.

    use std::collections::HashMap;

    use super::{Member, Pick, Selector};

    /// Members with the given weights. Pool indices deliberately differ from positions
    /// (10, 13, 16, ...) so a selector returning a position instead of an index is caught.
    pub(crate) fn members(weights: &[u32]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| Member { index: index_of(i), weight, id: index_of(i) as u64 })
            .collect()
    }

    /// The pool index [`members`] gives the member at `position`.
    pub(crate) fn index_of(position: usize) -> usize {
        10 + 3 * position
    }

    /// One selection with the given hash, load and filter.
    pub(crate) fn select_with(
        selector: &dyn Selector,
        hash: u64,
        load: impl Fn(usize) -> usize,
        accept: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        selector.select(&Pick { hash, load: &load, accept: &accept })
    }

    /// One selection: hash 0, no load, everything accepted.
    pub(crate) fn select(selector: &dyn Selector) -> Option<usize> {
        select_with(selector, 0, |_| 0, |_| true)
    }

    /// `n` selections with no load through `accept`; how often each index was chosen.
    /// Panics if a selection returns `None`.
    pub(crate) fn tally(selector: &dyn Selector, n: usize, accept: impl Fn(usize) -> bool) -> HashMap<usize, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let chosen = select_with(selector, 0, |_| 0, &accept).expect("a member is accepted");
            *counts.entry(chosen).or_insert(0) += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use keel_cluster::model::Algorithm;
    use proptest::prelude::*;

    use super::testing::{members, select_with};
    use super::{build, Member};

    #[test]
    fn every_algorithm_selects_none_from_an_empty_pool() {
        for algorithm in Algorithm::ALL {
            let selector = build(algorithm, &[]);
            assert_eq!(select_with(selector.as_ref(), 7, |_| 0, |_| true), None, "{algorithm}");
        }
    }

    #[test]
    fn every_algorithm_selects_none_when_every_member_is_rejected() {
        for algorithm in Algorithm::ALL {
            let selector = build(algorithm, &members(&[5, 1, 256, 3]));
            for hash in 0..50 {
                assert_eq!(select_with(selector.as_ref(), hash, |_| 0, |_| false), None, "{algorithm}");
            }
        }
    }

    #[test]
    fn every_algorithm_tolerates_out_of_range_weights() {
        let odd = [Member { index: 0, weight: 0, id: 0 }, Member { index: 1, weight: u32::MAX, id: 1 }];
        for algorithm in Algorithm::ALL {
            let selector = build(algorithm, &odd);
            for hash in 0..20 {
                assert!(select_with(selector.as_ref(), hash, |_| 0, |_| true).is_some(), "{algorithm}");
            }
        }
    }

    /// A generated member: (pool index, weight, load, accepted).
    type Generated = (usize, u32, usize, bool);

    /// Members with distinct pool indices, and the hashes to select with.
    fn pool() -> impl Strategy<Value = (Vec<Generated>, Vec<u64>)> {
        let member = (1u32..=256, prop_oneof![Just(0usize), 0usize..5, 0usize..1000], any::<bool>());
        (proptest::collection::btree_set(0usize..64, 0..12), proptest::collection::vec(member, 12))
            .prop_map(|(indices, attrs)| {
                indices.into_iter().zip(attrs).map(|(index, (w, l, a))| (index, w, l, a)).collect::<Vec<_>>()
            })
            .prop_flat_map(|ms| (Just(ms), proptest::collection::vec(any::<u64>(), 1..20)))
    }

    proptest! {
        // Each case builds every selector, including a 65 537-slot Maglev table: fewer cases
        // than the default keep this under a few seconds in a debug build.
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn every_algorithm_returns_an_accepted_member_whenever_there_is_one((pool, hashes) in pool()) {
            let ms: Vec<Member> = pool.iter().map(|&(index, weight, _, _)| Member { index, weight, id: index as u64 }).collect();
            let load = |i: usize| pool.iter().find(|m| m.0 == i).map_or(usize::MAX, |m| m.2);
            let accept = |i: usize| pool.iter().any(|m| m.0 == i && m.3);
            let any_accepted = pool.iter().any(|m| m.3);
            for algorithm in Algorithm::ALL {
                let selector = build(algorithm, &ms);
                for &hash in &hashes {
                    match select_with(selector.as_ref(), hash, load, accept) {
                        Some(i) => prop_assert!(accept(i), "{algorithm} returned {i}, not an accepted member"),
                        None => prop_assert!(!any_accepted, "{algorithm} returned None with a member accepted"),
                    }
                }
            }
        }
    }
}
