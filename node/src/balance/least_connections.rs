//! Least connections: the accepted member with the fewest in-flight requests per unit of weight.
//!
//! Loads are compared as `load_a × weight_b < load_b × weight_a` (nginx's `least_conn`), in
//! 128-bit arithmetic so an unknown server reported as `usize::MAX` cannot overflow. No
//! allocation; the only shared state is an atomic cursor.
//!
//! Ties decide more than they seem to: in an idle pool every load is zero, so the tie-break
//! *is* the balancing algorithm for light traffic. The obvious "scan from a rotating start and
//! keep the first minimum" is unfair whenever only some members tie: with a busy (or rejected)
//! and b, c idle, every start that lands on a falls through to b, which then gets two thirds of
//! the ties. So the scan is done in two passes: the first finds the minimum and the total
//! weight of the members at it, the second takes the tied member the cursor's ticket points at,
//! counting each tied member `weight / gcd` times. Equal weights and equal loads therefore give
//! exact rotation a,b,c,a,…; an idle pool with weights 3,1 gives 3:1 (in blocks: a,a,a,b —
//! nginx interleaves with smooth WRR here, which needs per-peer state we do not keep); and a
//! rejected member's share is split among the others by weight rather than inherited by its
//! neighbour. The second pass costs one more `accept` and `load` per member and is skipped when
//! a single member holds the minimum. If loads move between the passes so that the ticket
//! points past the tied set, the first minimum found is used.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{weight_of, Member, Pick, Selector};

/// Fewest in-flight requests relative to weight.
pub struct LeastConnectionsSelector {
    /// Members with clamped weights, in the order given.
    members: Box<[Member]>,
    /// Ticket counter that rotates the choice among tied members.
    cursor: AtomicUsize,
}

impl LeastConnectionsSelector {
    /// A least-connections selector over `members`.
    pub fn new(members: &[Member]) -> Self {
        let members = members.iter().map(|m| Member { weight: weight_of(m), ..*m }).collect();
        Self { members, cursor: AtomicUsize::new(0) }
    }

    /// The accepted members with their loads and weights, widened for cross-multiplication.
    fn candidates<'a>(&'a self, pick: &'a Pick<'_>) -> impl Iterator<Item = (usize, u128, u128)> + 'a {
        self.members
            .iter()
            .filter(|m| (pick.accept)(m.index))
            .map(|m| (m.index, (pick.load)(m.index) as u128, u128::from(m.weight)))
    }
}

impl Selector for LeastConnectionsSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        // First pass: the first member at the minimum, and the tied members' weights.
        let mut first: Option<(usize, u128, u128)> = None;
        let (mut tied_weight, mut tied_gcd, mut tied_count) = (0u128, 0u128, 0usize);
        for (index, load, weight) in self.candidates(pick) {
            match first {
                Some((_, best_load, best_weight)) if load * best_weight > best_load * weight => continue,
                Some((_, best_load, best_weight)) if load * best_weight == best_load * weight => {
                    tied_weight += weight;
                    tied_gcd = gcd(tied_gcd, weight);
                    tied_count += 1;
                }
                _ => {
                    first = Some((index, load, weight));
                    (tied_weight, tied_gcd, tied_count) = (weight, weight, 1);
                }
            }
        }
        let (first_index, best_load, best_weight) = first?;
        if tied_count == 1 {
            return Some(first_index);
        }
        // Second pass: the tied member the ticket points at, each counted weight/gcd times.
        // Only ties take a ticket, which keeps the shared cache line quiet under real load.
        let ticket = self.cursor.fetch_add(1, Ordering::Relaxed);
        let slots = tied_weight / tied_gcd.max(1);
        let mut target = (ticket as u128) % slots.max(1);
        for (index, load, weight) in self.candidates(pick) {
            if load * best_weight == best_load * weight {
                let share = weight / tied_gcd.max(1);
                if target < share {
                    return Some(index);
                }
                target -= share;
            }
        }
        Some(first_index)
    }
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::testing::{index_of, members, select_with, tally};
    use super::*;

    fn loads(values: &[usize]) -> impl Fn(usize) -> usize + '_ {
        move |i| values[(i - index_of(0)) / 3]
    }

    #[test]
    fn least_connections_picks_the_least_loaded() {
        let selector = LeastConnectionsSelector::new(&members(&[1, 1, 1]));
        for _ in 0..10 {
            assert_eq!(select_with(&selector, 0, loads(&[5, 2, 7]), |_| true), Some(index_of(1)));
            assert_eq!(select_with(&selector, 0, loads(&[0, 9, 1]), |_| true), Some(index_of(0)));
        }
    }

    #[test]
    fn least_connections_rotates_on_ties() {
        let selector = LeastConnectionsSelector::new(&members(&[1, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        for load in [0, 4] {
            let seq: Vec<_> =
                (0..6).map(|_| select_with(&selector, 0, |_| load, |_| true).expect("a member is accepted")).collect();
            assert_eq!(seq, [a, b, c, a, b, c], "all loads {load}");
        }
    }

    #[test]
    fn least_connections_spreads_ties_among_the_tied_only() {
        let selector = LeastConnectionsSelector::new(&members(&[1, 1, 1, 1]));
        let mut counts = HashMap::new();
        for _ in 0..400 {
            let chosen = select_with(&selector, 0, loads(&[3, 1, 3, 1]), |_| true).expect("a member is accepted");
            *counts.entry(chosen).or_insert(0) += 1;
        }
        assert_eq!(counts, HashMap::from([(index_of(1), 200), (index_of(3), 200)]));
    }

    #[test]
    fn least_connections_respects_weights_under_load() {
        let selector = LeastConnectionsSelector::new(&members(&[4, 1]));
        let (a, b) = (index_of(0), index_of(1));
        // a: 7/4 per unit of weight beats b: 2/1.
        assert_eq!(select_with(&selector, 0, loads(&[7, 2]), |_| true), Some(a));
        // a: 9/4 loses to b: 2/1.
        assert_eq!(select_with(&selector, 0, loads(&[9, 2]), |_| true), Some(b));
    }

    #[test]
    fn least_connections_converges_to_weighted_in_flight_shares() {
        // Requests that never finish: each pick adds one to the chosen member's load.
        let selector = LeastConnectionsSelector::new(&members(&[3, 2, 1]));
        let mut in_flight = [0usize; 3];
        for _ in 0..600 {
            let values = in_flight;
            let chosen = select_with(&selector, 0, loads(&values), |_| true).expect("a member is accepted");
            in_flight[(chosen - index_of(0)) / 3] += 1;
        }
        assert_eq!(in_flight, [300, 200, 100]);
    }

    #[test]
    fn least_connections_idle_pool_follows_weights() {
        let selector = LeastConnectionsSelector::new(&members(&[3, 1]));
        let counts = tally(&selector, 4000, |_| true);
        assert_eq!(counts[&index_of(0)], 3000);
        assert_eq!(counts[&index_of(1)], 1000);

        let selector = LeastConnectionsSelector::new(&members(&[6, 4, 2]));
        let counts = tally(&selector, 6000, |_| true);
        assert_eq!((counts[&index_of(0)], counts[&index_of(1)], counts[&index_of(2)]), (3000, 2000, 1000));
    }

    #[test]
    fn least_connections_splits_partial_ties_evenly() {
        // a is busy, b and c tie: they alternate (a scan from a rotating start would give b
        // every start that lands on a).
        let selector = LeastConnectionsSelector::new(&members(&[1, 1, 1]));
        let mut counts = HashMap::new();
        for _ in 0..300 {
            let chosen = select_with(&selector, 0, loads(&[2, 0, 0]), |_| true).expect("a member is accepted");
            *counts.entry(chosen).or_insert(0) += 1;
        }
        assert_eq!(counts, HashMap::from([(index_of(1), 150), (index_of(2), 150)]));
    }

    #[test]
    fn least_connections_skips_rejected_even_if_least_loaded() {
        let selector = LeastConnectionsSelector::new(&members(&[1, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        for _ in 0..10 {
            assert_eq!(select_with(&selector, 0, loads(&[5, 0, 7]), |i| i != b), Some(a));
        }
        let counts = tally(&selector, 3000, |i| i != b);
        assert_eq!(counts.get(&b), None);
        assert_eq!((counts[&a], counts[&c]), (1500, 1500));
    }

    #[test]
    fn least_connections_does_not_overflow_on_huge_loads() {
        let selector = LeastConnectionsSelector::new(&members(&[256, 1]));
        assert_eq!(select_with(&selector, 0, loads(&[usize::MAX, usize::MAX - 1]), |_| true), Some(index_of(0)));
        assert_eq!(select_with(&selector, 0, loads(&[usize::MAX, 0]), |_| true), Some(index_of(1)));
    }
}
