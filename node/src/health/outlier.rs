//! Passive outlier detection, Envoy-style: consecutive failures on live traffic eject a server
//! for a while, longer each time it is ejected again without recovering in between.
//!
//! [`OutlierState::observe`] runs on every proxied request from every worker thread, so the state
//! is three atomics and no lock. The ejection deadline is the arbiter: an ejection is a
//! compare-exchange of the deadline, so of several callers that see the threshold crossed at
//! once exactly one ejects, and the caller that ejects is the one told to log and refresh.
//!
//! The three atomics are not updated as one transaction. The interleavings that makes possible
//! (a failure counted just after a reset, a multiplier reset racing a fresh ejection) can only
//! shift one count by one or shorten one ejection step; none ejects twice or extends an ejection,
//! which is what the callers rely on.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Ejections double up to this many times the base (`base × 2^3`), as the config documents.
const MAX_DOUBLINGS: u32 = 3;

/// Outlier bookkeeping for one server.
#[derive(Debug, Default)]
pub struct OutlierState {
    /// Failures since the last success or ejection.
    failures: AtomicU32,
    /// Ejections since the last success after a readmission (Envoy's ejection multiplier).
    ejections: AtomicU32,
    /// When the current ejection ends, in [`crate::pool::now_millis`] time; 0 = never ejected
    /// or cleared by a success after readmission.
    ejected_until: AtomicU64,
}

impl OutlierState {
    /// Whether the server is ejected at `now_ms` ([`crate::pool::now_millis`] time).
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        let until = self.ejected_until.load(Ordering::Acquire);
        until != 0 && now_ms < until
    }

    /// Records one request outcome at `now_ms`. `threshold` consecutive failures eject the
    /// server for `base × 2^(k-1)` (k = consecutive ejections, capped at 8 × base).
    ///
    /// Returns the ejection time exactly when this call ejected the server; the caller then
    /// logs, refreshes the selector and schedules readmission. Failures reported while the
    /// server is ejected (requests that started before) neither count nor extend the ejection.
    /// A `threshold` of 0 or a zero `base` disables detection.
    pub fn observe(&self, ok: bool, now_ms: u64, threshold: u32, base: Duration) -> Option<Duration> {
        if threshold == 0 || base.is_zero() {
            return None;
        }
        let until = self.ejected_until.load(Ordering::Acquire);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            // A success after readmission means the server recovered: forget its history. A
            // success during the ejection only says an older request finished well.
            if until != 0
                && now_ms >= until
                && self.ejected_until.compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                self.ejections.store(0, Ordering::Relaxed);
            }
            return None;
        }
        if until != 0 && now_ms < until {
            return None;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if failures < threshold {
            return None;
        }
        let k = self.ejections.load(Ordering::Relaxed).saturating_add(1);
        let ejected_for = base.saturating_mul(1 << (k - 1).min(MAX_DOUBLINGS));
        let ms = u64::try_from(ejected_for.as_millis()).unwrap_or(u64::MAX).max(1);
        let deadline = now_ms.saturating_add(ms).max(1);
        // Everyone who crossed the threshold against the same `until` races here; one wins.
        self.ejected_until.compare_exchange(until, deadline, Ordering::AcqRel, Ordering::Relaxed).ok()?;
        self.failures.store(0, Ordering::Relaxed);
        self.ejections.store(k.min(MAX_DOUBLINGS + 1), Ordering::Relaxed);
        Some(ejected_for)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use super::*;

    const BASE: Duration = Duration::from_secs(10);
    const MS: u64 = 10_000;

    /// Fails `n` times at `now` and returns the ejections those failures caused.
    fn fail(o: &OutlierState, n: u32, now: u64) -> Vec<Duration> {
        (0..n).filter_map(|_| o.observe(false, now, 3, BASE)).collect()
    }

    #[test]
    fn threshold_consecutive_failures_eject_once() {
        let o = OutlierState::default();
        assert!(fail(&o, 2, 1).is_empty());
        assert!(!o.is_ejected(1));
        assert_eq!(o.observe(false, 1, 3, BASE), Some(BASE));
        assert!(o.is_ejected(1));
        assert!(o.is_ejected(MS));
        assert!(!o.is_ejected(MS + 1));
    }

    #[test]
    fn failures_while_ejected_neither_extend_nor_re_eject() {
        let o = OutlierState::default();
        assert_eq!(fail(&o, 3, 1), [BASE]);
        assert!(fail(&o, 10, 5).is_empty());
        assert!(!o.is_ejected(MS + 1), "the ejection was extended");
    }

    #[test]
    fn no_ejection_when_requests_succeed() {
        let o = OutlierState::default();
        for now in 0..1000 {
            assert_eq!(o.observe(true, now, 3, BASE), None);
        }
        assert!(!o.is_ejected(1000));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let o = OutlierState::default();
        for now in 0..100 {
            assert!(fail(&o, 2, now).is_empty());
            assert_eq!(o.observe(true, now, 3, BASE), None);
        }
        assert!(!o.is_ejected(100));
    }

    #[test]
    fn repeated_ejections_double_up_to_eight_times_the_base() {
        let o = OutlierState::default();
        let mut now = 1;
        let mut got = Vec::new();
        for _ in 0..6 {
            let e = fail(&o, 3, now);
            assert_eq!(e.len(), 1);
            got.push(e[0]);
            now += u64::try_from(e[0].as_millis()).unwrap_or(u64::MAX);
            assert!(!o.is_ejected(now), "readmitted when the ejection ends");
        }
        assert_eq!(got, [BASE, BASE * 2, BASE * 4, BASE * 8, BASE * 8, BASE * 8]);
    }

    #[test]
    fn a_success_after_readmission_resets_the_multiplier() {
        let o = OutlierState::default();
        assert_eq!(fail(&o, 3, 1), [BASE]);
        assert_eq!(fail(&o, 3, 1 + MS), [BASE * 2]);
        let now = 1 + 3 * MS;
        assert_eq!(o.observe(true, now, 3, BASE), None);
        assert_eq!(fail(&o, 3, now), [BASE]);
    }

    #[test]
    fn a_success_during_the_ejection_keeps_the_multiplier() {
        let o = OutlierState::default();
        assert_eq!(fail(&o, 3, 1), [BASE]);
        assert_eq!(o.observe(true, 2, 3, BASE), None);
        assert!(o.is_ejected(2), "a late success must not readmit early");
        assert_eq!(fail(&o, 3, 1 + MS), [BASE * 2]);
    }

    #[test]
    fn disabled_by_a_zero_threshold_or_base() {
        let o = OutlierState::default();
        for _ in 0..10 {
            assert_eq!(o.observe(false, 1, 0, BASE), None);
            assert_eq!(o.observe(false, 1, 3, Duration::ZERO), None);
        }
        assert!(!o.is_ejected(1));
    }

    #[test]
    fn concurrent_failures_eject_exactly_once() {
        for _ in 0..50 {
            let o = Arc::new(OutlierState::default());
            let threads = 8;
            let barrier = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let (o, barrier) = (Arc::clone(&o), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        (0..100).filter(|_| o.observe(false, 1, 3, BASE).is_some()).count()
                    })
                })
                .collect();
            let ejections: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
            assert_eq!(ejections, 1);
            assert!(o.is_ejected(1));
        }
    }
}
