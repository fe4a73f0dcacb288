//! Least request by the power of two random choices (Envoy's `LEAST_REQUEST` default): draw two
//! distinct accepted members at random, send the request to the less loaded one.
//!
//! Two random candidates get most of the benefit of a full least-loaded scan (the maximum load
//! drops exponentially compared with one random choice) while reading only two load counters,
//! and because the choice is random, many balancers — or many threads of this one — acting on
//! the same stale counters do not all stampede onto the same "least loaded" server. No shared
//! mutable state at all: randomness is fastrand's thread-local generator.
//!
//! Weights (our choice, documented for the integrator): both candidates are drawn with
//! probability proportional to weight (the second from the members other than the first), and
//! they are compared by load per unit of weight, `load_a × weight_b` vs `load_b × weight_a`.
//! Ties go to the first candidate. So an idle pool, where every comparison ties, receives
//! traffic in exact weight proportion, and a busy pool is steered towards equal load per unit
//! of weight. Envoy instead switches to a load-adjusted weighted round robin when weights
//! differ; this keeps one code path and no per-request shared state.
//!
//! A rejected draw is redrawn a few times; if that still does not produce two accepted members,
//! one scan from a random start finds them, so work is bounded by `DRAWS + members` filter calls
//! and a lone accepted member is always found.

use super::random::CumulativeWeights;
use super::{Member, Pick, Selector};

/// Random draws tried before scanning for the candidates.
const DRAWS: usize = 8;

/// Power of two random choices, weighted.
pub struct P2cSelector {
    weights: CumulativeWeights,
}

impl P2cSelector {
    /// A power-of-two-choices selector over `members`.
    pub fn new(members: &[Member]) -> Self {
        Self { weights: CumulativeWeights::new(members) }
    }

    /// Positions of up to two distinct accepted members, drawn by weight.
    fn candidates(&self, pick: &Pick<'_>) -> (Option<usize>, Option<usize>) {
        let w = &self.weights;
        let n = w.len();
        if n == 1 {
            return ((pick.accept)(w.index(0)).then_some(0), None);
        }
        let mut first = None;
        for _ in 0..DRAWS {
            let position = match first {
                None => w.draw(),
                Some(f) => w.draw_excluding(f),
            };
            if (pick.accept)(w.index(position)) {
                if first.is_some() {
                    return (first, Some(position));
                }
                first = Some(position);
            }
        }
        // Most of the pool is rejected: scan once from a random start.
        let start = fastrand::usize(..n);
        for step in 0..n {
            let position = (start + step) % n;
            if Some(position) == first || !(pick.accept)(w.index(position)) {
                continue;
            }
            if first.is_some() {
                return (first, Some(position));
            }
            first = Some(position);
        }
        (first, None)
    }
}

impl Selector for P2cSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let w = &self.weights;
        if w.is_empty() {
            return None;
        }
        let (a, b) = match self.candidates(pick) {
            (Some(a), Some(b)) => (a, b),
            (lone, _) => return lone.map(|a| w.index(a)),
        };
        let (index_a, index_b) = (w.index(a), w.index(b));
        let load_a = (pick.load)(index_a) as u128;
        let load_b = (pick.load)(index_b) as u128;
        let (weight_a, weight_b) = (u128::from(w.weight(a)), u128::from(w.weight(b)));
        Some(if load_b * weight_a < load_a * weight_b { index_b } else { index_a })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testing::{index_of, members, select_with, tally};
    use super::*;

    fn position(index: usize) -> usize {
        (index - index_of(0)) / 3
    }

    #[test]
    fn p2c_never_returns_the_more_loaded_of_two() {
        fastrand::seed(1);
        let selector = P2cSelector::new(&members(&[1, 1]));
        for _ in 0..1000 {
            assert_eq!(select_with(&selector, 0, |i| [3, 5][position(i)], |_| true), Some(index_of(0)));
            assert_eq!(select_with(&selector, 0, |i| [9, 2][position(i)], |_| true), Some(index_of(1)));
        }
    }

    #[test]
    fn p2c_picks_by_rank_as_two_choices_predict() {
        // Distinct loads 0..5: the member of rank k (0 = least loaded) wins exactly when it is
        // drawn with someone more loaded: probability 2(n-1-k) / (n(n-1)); the most loaded never.
        fastrand::seed(2);
        let selector = P2cSelector::new(&members(&[1, 1, 1, 1, 1]));
        let picks = 50_000;
        let mut counts = HashMap::new();
        for _ in 0..picks {
            let chosen = select_with(&selector, 0, position, |_| true).expect("a member is accepted");
            *counts.entry(position(chosen)).or_insert(0usize) += 1;
        }
        assert_eq!(counts.get(&4), None, "the most loaded member was chosen");
        for rank in 0..4 {
            let expected = 2.0 * (4 - rank) as f64 / 20.0;
            let got = counts[&rank] as f64 / picks as f64;
            assert!((got - expected).abs() < 0.01, "rank {rank}: {got:.4} vs {expected:.4}");
        }
    }

    #[test]
    fn p2c_spreads_under_equal_load() {
        fastrand::seed(3);
        let selector = P2cSelector::new(&members(&[1, 1, 1, 1]));
        let counts = tally(&selector, 40_000, |_| true);
        for p in 0..4 {
            let c = counts[&index_of(p)];
            assert!((9_000..=11_000).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn p2c_idle_pool_follows_weights() {
        fastrand::seed(4);
        let selector = P2cSelector::new(&members(&[3, 1]));
        let counts = tally(&selector, 40_000, |_| true);
        let share = counts[&index_of(0)] as f64 / 40_000.0;
        assert!((share - 0.75).abs() < 0.015, "{counts:?}");
    }

    #[test]
    fn p2c_compares_load_per_weight() {
        fastrand::seed(5);
        let selector = P2cSelector::new(&members(&[4, 1]));
        for _ in 0..200 {
            // 7/4 < 2/1: the heavy member wins although it has more requests in flight.
            assert_eq!(select_with(&selector, 0, |i| [7, 2][position(i)], |_| true), Some(index_of(0)));
            assert_eq!(select_with(&selector, 0, |i| [9, 2][position(i)], |_| true), Some(index_of(1)));
        }
    }

    #[test]
    fn p2c_rejected_member_is_never_chosen() {
        fastrand::seed(6);
        let selector = P2cSelector::new(&members(&[1, 1, 1, 1]));
        // The rejected member is the least loaded: it must still never be chosen.
        let load = |i| if i == index_of(2) { 0 } else { 5 };
        let mut counts = HashMap::new();
        for _ in 0..30_000 {
            let chosen = select_with(&selector, 0, load, |i| i != index_of(2)).expect("a member is accepted");
            *counts.entry(chosen).or_insert(0usize) += 1;
        }
        assert_eq!(counts.get(&index_of(2)), None);
        for p in [0, 1, 3] {
            assert!((9_000..=11_000).contains(&counts[&index_of(p)]), "{counts:?}");
        }
    }

    #[test]
    fn p2c_single_accepted_member_is_returned() {
        fastrand::seed(7);
        let selector = P2cSelector::new(&members(&[1, 1, 1, 1, 1, 1, 1, 1]));
        for _ in 0..200 {
            assert_eq!(select_with(&selector, 0, |_| 0, |i| i == index_of(5)), Some(index_of(5)));
        }
        let selector = P2cSelector::new(&members(&[3]));
        assert_eq!(select_with(&selector, 0, |_| 0, |_| true), Some(index_of(0)));
        assert_eq!(select_with(&selector, 0, |_| 0, |_| false), None);
    }
}
