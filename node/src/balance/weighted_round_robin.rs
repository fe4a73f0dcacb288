//! nginx's smooth weighted round robin, precomputed.
//!
//! nginx keeps a mutable `current_weight` per peer and updates all of them under the upstream
//! lock on every pick (add each weight, take the maximum, subtract the total from it). keel
//! rebuilds its selector whenever the member set or a weight changes, so the schedule is a pure
//! function of the weights: we run nginx's loop once in `new` for one full cycle and store the
//! result. `select` is then one `fetch_add` on a cursor plus a table read — no lock, no
//! allocation — and produces exactly nginx's sequence (5,1,1 → a,a,b,a,c,a,a).
//!
//! The cycle has `sum(weights) / gcd(weights)` entries: dividing by the gcd yields the same
//! sequence (every current weight scales by the same factor, so the same peer wins each step)
//! and keeps equal weights at one entry per member. Building costs O(members × cycle), which
//! for 100 members of distinct weights is a few million additions; rebuilds are rare.
//!
//! A rejected member's scheduled entries are skipped, and the cursor is advanced past them as
//! if they had been drawn, so in a single stream the remaining members keep exactly their
//! weighted shares (the cycle with the rejected entries deleted). The walk forward is capped;
//! past the cap (a heavily rejected pool with a long cycle) we fall back to scanning the member
//! list once, so work stays bounded by `WALK_LIMIT + members`.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{weight_of, Member, Pick, Selector};

/// Scheduled entries examined before falling back to a scan of the member list.
const WALK_LIMIT: usize = 64;

/// Smooth weighted round robin over a precomputed cycle.
pub struct WeightedRoundRobinSelector {
    /// Pool indices of the members, in the order given.
    indices: Box<[usize]>,
    /// One full cycle of the schedule, as positions into `indices`.
    cycle: Box<[u32]>,
    /// Next ticket; entry = ticket % cycle length.
    cursor: AtomicUsize,
}

impl WeightedRoundRobinSelector {
    /// The smooth weighted schedule over `members`; ties go to the earlier member, as in nginx.
    pub fn new(members: &[Member]) -> Self {
        let weights: Vec<u32> = members.iter().map(weight_of).collect();
        Self {
            indices: members.iter().map(|m| m.index).collect(),
            cycle: smooth_cycle(&weights).into_boxed_slice(),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl Selector for WeightedRoundRobinSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % len;
        let mut last = 0;
        for step in 0..len.min(WALK_LIMIT) {
            let position = self.cycle[(start + step) % len] as usize;
            let index = self.indices[position];
            if (pick.accept)(index) {
                if step > 0 {
                    self.cursor.fetch_add(step, Ordering::Relaxed);
                }
                return Some(index);
            }
            last = position;
        }
        // Only reached when the cycle is longer than the walk limit and everything in the
        // window was rejected: try each member once, starting after the last one tried.
        let n = self.indices.len();
        (1..=n).map(|k| self.indices[(last + k) % n]).find(|&index| (pick.accept)(index))
    }
}

/// One cycle of nginx's smooth weighted round robin over `weights` (each ≥ 1), as positions.
///
/// Per step every member's current weight grows by its weight, the largest (first on ties)
/// is chosen and loses the total. After `total` steps every current weight is back to zero, so
/// the sequence repeats; it is computed over the gcd-reduced weights (same sequence, shorter).
fn smooth_cycle(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let reduced: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; reduced.len()];
    let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let (mut best, mut best_weight) = (0, i64::MIN);
        for (i, (cw, w)) in current.iter_mut().zip(&reduced).enumerate() {
            *cw += w;
            if *cw > best_weight {
                best = i;
                best_weight = *cw;
            }
        }
        current[best] -= total;
        // Positions fit in u32: a pool has nowhere near 4 billion servers.
        cycle.push(u32::try_from(best).unwrap_or(0));
    }
    cycle
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{index_of, members, select, select_with, tally};
    use super::*;

    /// nginx's algorithm as published (ngx_http_upstream_get_peer), stepped live, for comparison.
    fn nginx_reference(weights: &[u32], picks: usize) -> Vec<usize> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        (0..picks)
            .map(|_| {
                let mut best: Option<usize> = None;
                for (i, &w) in weights.iter().enumerate() {
                    current[i] += i64::from(w);
                    if best.is_none_or(|b| current[i] > current[b]) {
                        best = Some(i);
                    }
                }
                let best = best.expect("weights are not empty");
                current[best] -= total;
                index_of(best)
            })
            .collect()
    }

    #[test]
    fn wrr_5_1_1_gives_nginx_sequence() {
        let selector = WeightedRoundRobinSelector::new(&members(&[5, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        let cycle = [a, a, b, a, c, a, a];
        for round in 0..5 {
            let seq: Vec<_> = (0..7).map(|_| select(&selector).expect("a member is accepted")).collect();
            assert_eq!(seq, cycle, "cycle {round}");
        }
    }

    #[test]
    fn wrr_matches_nginx_reference_for_assorted_weights() {
        for weights in [&[1u32, 1, 1][..], &[3, 2, 1], &[4, 2, 6], &[256, 1], &[7, 13, 2, 9, 1], &[2, 2, 4, 8]] {
            let selector = WeightedRoundRobinSelector::new(&members(weights));
            let total: u32 = weights.iter().sum();
            let picks = 3 * total as usize;
            let seq: Vec<_> = (0..picks).map(|_| select(&selector).expect("a member is accepted")).collect();
            assert_eq!(seq, nginx_reference(weights, picks), "weights {weights:?}");
        }
    }

    #[test]
    fn wrr_honours_weights_exactly_over_full_cycles() {
        let selector = WeightedRoundRobinSelector::new(&members(&[3, 2, 1]));
        let counts = tally(&selector, 6000, |_| true);
        assert_eq!(counts[&index_of(0)], 3000);
        assert_eq!(counts[&index_of(1)], 2000);
        assert_eq!(counts[&index_of(2)], 1000);
    }

    #[test]
    fn wrr_equal_weights_is_plain_rotation() {
        let selector = WeightedRoundRobinSelector::new(&members(&[7, 7, 7]));
        assert_eq!(selector.cycle.len(), 3);
        let seq: Vec<_> = (0..6).map(|_| select(&selector).expect("a member is accepted")).collect();
        assert_eq!(seq, [index_of(0), index_of(1), index_of(2), index_of(0), index_of(1), index_of(2)]);
    }

    #[test]
    fn wrr_rejected_member_is_skipped_and_others_keep_their_ratio() {
        let selector = WeightedRoundRobinSelector::new(&members(&[3, 2, 1]));
        let rejected = index_of(1);
        let counts = tally(&selector, 4000, |i| i != rejected);
        assert_eq!(counts.get(&rejected), None);
        assert_eq!(counts[&index_of(0)], 3000);
        assert_eq!(counts[&index_of(2)], 1000);
    }

    #[test]
    fn wrr_finds_the_light_member_when_the_heavy_one_is_rejected() {
        // The cycle is 257 entries long, 256 of them the rejected member: past the walk limit.
        let selector = WeightedRoundRobinSelector::new(&members(&[256, 1]));
        for _ in 0..600 {
            assert_eq!(select_with(&selector, 0, |_| 0, |i| i != index_of(0)), Some(index_of(1)));
        }
        assert_eq!(select_with(&selector, 0, |_| 0, |_| false), None);
    }

    #[test]
    fn wrr_cycle_is_gcd_reduced() {
        assert_eq!(smooth_cycle(&[10, 2, 2]), smooth_cycle(&[5, 1, 1]));
        assert_eq!(smooth_cycle(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert!(smooth_cycle(&[]).is_empty());
    }
}
