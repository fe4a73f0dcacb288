//! Repeated warnings, rate-limited per kind, so that a log survives an attack or an outage.
//!
//! A line that a client, a dead peer or a full file table can make keel repeat (a refused
//! request, an HTTP/2 protocol error, a failed `accept`, a Raft peer that does not answer) goes
//! through one [`LogThrottle`] per kind: the first line is written, the ones that follow within
//! the interval are only counted, and the first one after the interval is written with the count
//! of those held back ("1,234 more like this in the last 10 s"). So one kind of line costs at
//! most one line per interval, however fast it repeats, and nothing is lost but the repeats.
//! [`throttled!`](crate::throttled) is the usual way to use it; [`LogThrottle::allow_at`] serves
//! callers that keep a clock of their own (the sticky stores).
//!
//! Why not a crate: `tracing-throttle` does this as a subscriber layer, deduplicating by each
//! event's *field values* — a client address differs on every hostile connection, so each call
//! site would need its own exclusion list to be throttled at all, and its summaries are written
//! by a timer task of its own. Deciding at the call site is a few lines, costs two atomics, needs
//! no set-up in the binary, and lets library crates (this one included) throttle their own
//! lines. A count still held back when the repeats stop is reported with the next line of the
//! same kind, however late; the count is never lost, only delayed.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

#[doc(hidden)]
pub use tracing as __tracing;

/// The interval keel's throttled lines use: at most one line of a kind per 10 s.
pub const EVERY: Duration = Duration::from_secs(10);

/// Lets one line of a kind through per interval and counts the ones it held back.
#[derive(Debug)]
pub struct LogThrottle {
    every_ms: u64,
    /// When the last line was let through, in ms on the caller's clock, plus one (0 = never).
    last: AtomicU64,
    held_back: AtomicU64,
}

/// What was held back since the last line of a kind; written as "1,234 more like this in the
/// last 10 s".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suppressed {
    /// Lines held back.
    pub count: u64,
    /// Time since the last line let through.
    pub over: Duration,
}

impl LogThrottle {
    /// A throttle letting one line through per `every`. `const`, so a call site can keep its
    /// kind's throttle in a `static`.
    pub const fn new(every: Duration) -> Self {
        // Saturating: a `u128` of milliseconds only exceeds u64 for absurd intervals.
        let ms = every.as_millis();
        let every_ms = if ms > u64::MAX as u128 { u64::MAX } else { ms as u64 };
        LogThrottle { every_ms, last: AtomicU64::new(0), held_back: AtomicU64::new(0) }
    }

    /// `Some` when the caller should log now, with what was held back since its last line
    /// (`count` 0 for the first line of a run); `None` when it should stay quiet. Uses tokio's
    /// clock, so tests may pause it.
    pub fn allow(&self) -> Option<Suppressed> {
        static ORIGIN: OnceLock<tokio::time::Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
        let now = tokio::time::Instant::now().saturating_duration_since(origin);
        self.allow_at(u64::try_from(now.as_millis()).unwrap_or(u64::MAX))
    }

    /// As [`allow`](Self::allow), at `now_ms` on the caller's own clock (any monotonic ms).
    pub fn allow_at(&self, now_ms: u64) -> Option<Suppressed> {
        let stamp = now_ms.saturating_add(1);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || stamp.saturating_sub(last) >= self.every_ms;
        // One caller wins a due slot; the others racing for it count as held back.
        if due && self.last.compare_exchange(last, stamp, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let count = self.held_back.swap(0, Ordering::AcqRel);
            let over = if last == 0 { Duration::ZERO } else { Duration::from_millis(stamp.saturating_sub(last)) };
            return Some(Suppressed { count, over });
        }
        self.held_back.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_grouped(f, self.count)?;
        write!(f, " more like this in the last {} s", self.over.as_secs().max(1))
    }
}

/// `1234567` as `1,234,567`.
fn write_grouped(f: &mut fmt::Formatter<'_>, n: u64) -> fmt::Result {
    let digits = n.to_string();
    // The first group takes the digits beyond a multiple of three (or three); the rest are whole.
    let first = match digits.len() % 3 {
        0 => digits.len().min(3),
        short => short,
    };
    let (head, rest) = digits.split_at(first);
    f.write_str(head)?;
    for start in (0..rest.len()).step_by(3) {
        write!(f, ",{}", &rest[start..start + 3])?;
    }
    Ok(())
}

/// Logs a `tracing` event through a [`LogThrottle`]: the first of a run as written, the next
/// one after the interval with a `suppressed` field saying how many were held back.
///
/// ```
/// use keel_cluster::throttle::{LogThrottle, EVERY};
/// static ACCEPT_FAILED: LogThrottle = LogThrottle::new(EVERY);
/// let e = std::io::Error::other("too many open files");
/// keel_cluster::throttled!(ACCEPT_FAILED, warn, target: "keel::proxy", error = %e, "accept failed");
/// ```
#[macro_export]
macro_rules! throttled {
    ($throttle:expr, $level:ident, target: $target:expr, $($rest:tt)+) => {
        if let Some(held) = $throttle.allow() {
            if held.count == 0 {
                $crate::throttle::__tracing::$level!(target: $target, $($rest)+);
            } else {
                $crate::throttle::__tracing::$level!(target: $target, suppressed = %held, $($rest)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_held_back_count() {
        let t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.allow_at(5), Some(Suppressed { count: 0, over: Duration::ZERO }));
        assert_eq!(t.allow_at(6), None);
        assert_eq!(t.allow_at(900), None);
        assert_eq!(t.allow_at(1005), Some(Suppressed { count: 2, over: Duration::from_millis(1000) }));
        assert_eq!(t.allow_at(1006), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_costs_one_line_per_interval_on_tokio_time() {
        static KIND: LogThrottle = LogThrottle::new(EVERY);
        // On this test's own origin: `allow`'s origin is process-wide, and under `cargo test`
        // another test's runtime may have set it, which shifts where the intervals fall.
        let origin = tokio::time::Instant::now();
        let at = || u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut lines = Vec::new();
        // 1,000 events a second for 35 s: a line at 0 s, then one each 10 s with the count.
        for _ in 0..35_000 {
            if let Some(held) = KIND.allow_at(at()) {
                lines.push(held);
            }
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0].count, 0);
        for held in &lines[1..] {
            assert_eq!(held.count, 9_999);
            assert_eq!(held.over, EVERY);
        }
        assert_eq!(lines[1].to_string(), "9,999 more like this in the last 10 s");
        // Quiet for a while: the next one is let through at once, with what the flood left.
        tokio::time::advance(Duration::from_secs(60)).await;
        let late = KIND.allow_at(at()).expect("a line after a quiet minute");
        assert_eq!(late.count, 4_999);
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        let s = |count| Suppressed { count, over: Duration::from_secs(10) }.to_string();
        assert_eq!(s(0), "0 more like this in the last 10 s");
        assert_eq!(s(999), "999 more like this in the last 10 s");
        assert_eq!(s(1_234), "1,234 more like this in the last 10 s");
        assert_eq!(s(1_234_567), "1,234,567 more like this in the last 10 s");
    }
}
