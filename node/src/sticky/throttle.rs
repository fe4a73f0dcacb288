//! At most one log line per interval for an error that would otherwise repeat on every request
//! (Redis down, proposals failing): the log stays readable and logging never becomes the load.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lets one event through per `every_ms` and counts the ones it held back.
#[derive(Debug)]
pub struct LogThrottle {
    every_ms: u64,
    /// When the last event was let through, plus one (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// A throttle letting one event through per `every_ms` milliseconds.
    pub fn new(every_ms: u64) -> Self {
        LogThrottle { every_ms, last: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when the caller should log now, `n` being how many events were held back since
    /// the last line; `None` when it should stay quiet.
    pub fn allow(&self, now_ms: u64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_add(1).saturating_sub(last) >= self.every_ms;
        if due
            && self.last.compare_exchange(last, now_ms.saturating_add(1), Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_held_back_count() {
        let t = LogThrottle::new(1000);
        assert_eq!(t.allow(5), Some(0));
        assert_eq!(t.allow(6), None);
        assert_eq!(t.allow(900), None);
        assert_eq!(t.allow(1005), Some(2));
        assert_eq!(t.allow(1006), None);
    }
}
