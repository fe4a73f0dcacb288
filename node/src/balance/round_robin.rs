//! Plain round robin: every eligible member in turn, weights ignored.
//!
//! The only shared state is one atomic cursor, so concurrent `select`s from many worker threads
//! each take a distinct ticket with a single `fetch_add` and never wait on each other.
//!
//! Skipping a member the caller's `accept` filter rejects must not hand its turn to its
//! neighbour (with a,b,c and b rejected, a naive "next accepted after the ticket" gives c two
//! turns out of three). So when the ticket's member is rejected we take the next accepted one and
//! then advance the cursor past the positions we stepped over, as if those tickets had been
//! drawn and discarded: the rejected member's slot disappears from the rotation instead of being
//! inherited. Under concurrency the extra advance is best-effort (another thread may have moved
//! the cursor meanwhile), which costs a little fairness, never correctness.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Member, Pick, Selector};

/// Each member in turn.
pub struct RoundRobinSelector {
    /// Pool indices in rotation order.
    indices: Box<[usize]>,
    /// Next ticket; position = ticket % len.
    cursor: AtomicUsize,
}

impl RoundRobinSelector {
    /// A rotation over `members` in the order given, starting with the first.
    pub fn new(members: &[Member]) -> Self {
        Self { indices: members.iter().map(|m| m.index).collect(), cursor: AtomicUsize::new(0) }
    }
}

impl Selector for RoundRobinSelector {
    fn select(&self, pick: &Pick<'_>) -> Option<usize> {
        let n = self.indices.len();
        if n == 0 {
            return None;
        }
        let ticket = self.cursor.fetch_add(1, Ordering::Relaxed);
        let start = ticket % n;
        for step in 0..n {
            let index = self.indices[(start + step) % n];
            if (pick.accept)(index) {
                if step > 0 {
                    self.cursor.fetch_add(step, Ordering::Relaxed);
                }
                return Some(index);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{index_of, members, select, select_with, tally};
    use super::*;

    #[test]
    fn round_robin_cycles_in_order() {
        let selector = RoundRobinSelector::new(&members(&[1, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        let seq: Vec<_> = (0..9).map(|_| select(&selector).expect("a member is accepted")).collect();
        assert_eq!(seq, [a, b, c, a, b, c, a, b, c]);
    }

    #[test]
    fn round_robin_ignores_weights() {
        let selector = RoundRobinSelector::new(&members(&[5, 1, 1]));
        let counts = tally(&selector, 300, |_| true);
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[test]
    fn round_robin_skips_rejected_member_and_stays_fair() {
        let selector = RoundRobinSelector::new(&members(&[1, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        let seq: Vec<_> =
            (0..6).map(|_| select_with(&selector, 0, |_| 0, |i| i != b).expect("a member is accepted")).collect();
        assert_eq!(seq, [a, c, a, c, a, c]);

        let selector = RoundRobinSelector::new(&members(&[1, 1, 1, 1]));
        let counts = tally(&selector, 3000, |i| i != index_of(1));
        assert_eq!(counts.get(&index_of(1)), None);
        assert!(counts.values().all(|&c| c == 1000), "{counts:?}");
    }

    #[test]
    fn round_robin_resumes_rotation_when_member_is_accepted_again() {
        let selector = RoundRobinSelector::new(&members(&[1, 1, 1]));
        let (a, b, c) = (index_of(0), index_of(1), index_of(2));
        assert_eq!(select_with(&selector, 0, |_| 0, |i| i != a), Some(b));
        assert_eq!(select(&selector), Some(c));
        assert_eq!(select(&selector), Some(a));
    }

    #[test]
    fn round_robin_with_single_accepted_member_returns_it() {
        let selector = RoundRobinSelector::new(&members(&[1, 1, 1, 1]));
        for _ in 0..10 {
            assert_eq!(select_with(&selector, 0, |_| 0, |i| i == index_of(2)), Some(index_of(2)));
        }
    }

    #[test]
    fn round_robin_is_fair_across_threads() {
        let selector = RoundRobinSelector::new(&members(&[1, 1, 1, 1]));
        let counts = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| tally(&selector, 10_000, |_| true))).collect();
            let mut total = std::collections::HashMap::new();
            for h in handles {
                for (k, v) in h.join().expect("tally thread") {
                    *total.entry(k).or_insert(0) += v;
                }
            }
            total
        });
        assert!(counts.values().all(|&c| c == 10_000), "{counts:?}");
    }
}
