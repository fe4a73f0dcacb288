//! Weighted random: each request goes to an accepted member with probability proportional to
//! its weight.
//!
//! Randomness comes from fastrand's thread-local generator, so concurrent requests share no
//! state at all: `select` touches only the immutable cumulative-weight table built in `new`.
//! Tests seed the thread-local generator (`fastrand::seed`) for reproducible runs; production
//! keeps the per-thread random seed.
//!
//! A draw is a random point in `0..total weight` located by binary search over cumulative
//! weights (or a plain index when all weights are equal). A rejected draw is simply redrawn —
//! cheap and still exactly weighted among the accepted members, because conditioning a weighted
//! draw on acceptance leaves the accepted members' relative odds unchanged. Only after a few
//! rejected draws (most of the pool rejected) do we switch to one weighted-reservoir pass over
//! all members, which is exact too and bounds the work at `DRAWS + members` filter calls.
//!
//! [`CumulativeWeights`] is shared with the power-of-two-choices selector, which draws its two
//! candidates the same way.

use super::{weight_of, Member, Pick, Selector};

/// Random draws tried before the reservoir pass over every member.
const DRAWS: usize = 4;

/// Weighted random among accepted members.
pub struct RandomSelector {
    weights: CumulativeWeights,
}

impl RandomSelector {
    /// A weighted random selector over `members`.
    pub fn new(members: &[Member]) -> Self {
        Self { weights: CumulativeWeights::new(members) }
    }
}

impl Selector for RandomSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let w = &self.weights;
        if w.is_empty() {
            return None;
        }
        for _ in 0..DRAWS {
            let index = w.index(w.draw());
            if (pick.accept)(index) {
                return Some(index);
            }
        }
        // Weighted reservoir sampling (one item): the k-th accepted member replaces the choice
        // with probability weight / (accepted weight so far), which leaves each accepted member
        // chosen with probability weight / total accepted weight.
        let mut seen = 0u64;
        let mut chosen = None;
        for position in 0..w.len() {
            let index = w.index(position);
            if (pick.accept)(index) {
                let weight = w.weight(position);
                seen += weight;
                if fastrand::u64(..seen) < weight {
                    chosen = Some(index);
                }
            }
        }
        chosen
    }
}

/// Members' pool indices and cumulative weights, for weighted random draws without allocation.
pub(super) struct CumulativeWeights {
    indices: Box<[usize]>,
    /// `ends[i]` = sum of the weights of members `0..=i`.
    ends: Box<[u64]>,
    /// All weights equal: draws need no search.
    uniform: bool,
}

impl CumulativeWeights {
    pub(super) fn new(members: &[Member]) -> Self {
        let ends = members
            .iter()
            .scan(0u64, |sum, m| {
                *sum += u64::from(weight_of(m));
                Some(*sum)
            })
            .collect();
        let uniform = members.windows(2).all(|pair| weight_of(&pair[0]) == weight_of(&pair[1]));
        Self { indices: members.iter().map(|m| m.index).collect(), ends, uniform }
    }

    pub(super) fn len(&self) -> usize {
        self.indices.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Pool index of the member at `position`.
    pub(super) fn index(&self, position: usize) -> usize {
        self.indices[position]
    }

    /// Weight of the member at `position`.
    pub(super) fn weight(&self, position: usize) -> u64 {
        let start = if position == 0 { 0 } else { self.ends[position - 1] };
        self.ends[position] - start
    }

    fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// A random position, weighted. The caller ensures the list is not empty.
    pub(super) fn draw(&self) -> usize {
        if self.uniform {
            return fastrand::usize(..self.len());
        }
        self.locate(fastrand::u64(..self.total()))
    }

    /// A random position other than `excluded`, weighted. The caller ensures there are at least
    /// two members. Drawing from the total minus the excluded weight and stepping over its
    /// range keeps the others' relative odds without retrying.
    pub(super) fn draw_excluding(&self, excluded: usize) -> usize {
        if self.uniform {
            let position = fastrand::usize(..self.len() - 1);
            return if position >= excluded { position + 1 } else { position };
        }
        let weight = self.weight(excluded);
        let point = fastrand::u64(..self.total() - weight);
        let excluded_start = self.ends[excluded] - weight;
        self.locate(if point >= excluded_start { point + weight } else { point })
    }

    /// The position whose weight range contains `point`.
    fn locate(&self, point: u64) -> usize {
        self.ends.partition_point(|&end| end <= point).min(self.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{index_of, members, select_with, tally};
    use super::*;

    fn assert_share(counts: &std::collections::HashMap<usize, usize>, index: usize, expected: f64, total: usize) {
        let got = counts.get(&index).copied().unwrap_or(0) as f64 / total as f64;
        assert!((got - expected).abs() < 0.02, "index {index}: share {got:.4}, expected {expected:.4}");
    }

    #[test]
    fn random_weighted_shares_are_honoured() {
        fastrand::seed(7);
        let selector = RandomSelector::new(&members(&[3, 2, 1]));
        let counts = tally(&selector, 60_000, |_| true);
        assert_share(&counts, index_of(0), 0.5, 60_000);
        assert_share(&counts, index_of(1), 1.0 / 3.0, 60_000);
        assert_share(&counts, index_of(2), 1.0 / 6.0, 60_000);
    }

    #[test]
    fn random_equal_weights_are_uniform() {
        fastrand::seed(8);
        let selector = RandomSelector::new(&members(&[4, 4, 4, 4]));
        let counts = tally(&selector, 60_000, |_| true);
        for p in 0..4 {
            assert_share(&counts, index_of(p), 0.25, 60_000);
        }
    }

    #[test]
    fn random_rejected_member_is_never_chosen_and_others_keep_their_ratio() {
        fastrand::seed(9);
        let selector = RandomSelector::new(&members(&[3, 2, 1]));
        let counts = tally(&selector, 60_000, |i| i != index_of(1));
        assert_eq!(counts.get(&index_of(1)), None);
        assert_share(&counts, index_of(0), 0.75, 60_000);
        assert_share(&counts, index_of(2), 0.25, 60_000);
    }

    #[test]
    fn random_reservoir_fallback_is_weighted() {
        // One heavy rejected member makes nearly every draw miss, so the reservoir pass decides.
        fastrand::seed(10);
        let selector = RandomSelector::new(&members(&[256, 2, 1]));
        let counts = tally(&selector, 60_000, |i| i != index_of(0));
        assert_eq!(counts.get(&index_of(0)), None);
        assert_share(&counts, index_of(1), 2.0 / 3.0, 60_000);
        assert_share(&counts, index_of(2), 1.0 / 3.0, 60_000);
    }

    #[test]
    fn random_single_accepted_member_is_returned() {
        let selector = RandomSelector::new(&members(&[5, 5, 5, 5, 5]));
        for _ in 0..100 {
            assert_eq!(select_with(&selector, 0, |_| 0, |i| i == index_of(3)), Some(index_of(3)));
        }
    }

    #[test]
    fn cumulative_draw_excluding_never_returns_the_excluded() {
        fastrand::seed(11);
        for weights in [&[1u32, 1, 1][..], &[5, 1, 7, 2], &[1, 256]] {
            let w = CumulativeWeights::new(&members(weights));
            for excluded in 0..weights.len() {
                for _ in 0..2000 {
                    let p = w.draw_excluding(excluded);
                    assert!(p != excluded && p < weights.len(), "{weights:?} excluded {excluded} drew {p}");
                }
            }
        }
    }
}
