//! Polling with a deadline, and the named deadlines tests use.
//!
//! A test never sleeps to "give something time": it states the condition it needs and how long
//! that may take, and [`wait_until`] polls it. The deadlines are generous because the suite runs
//! on a loaded 2-core machine next to other builds; they bound a failure, they are not a
//! performance target.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(15);

/// Time for a freshly spawned debug keel to answer on its admin API.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Time for a health-state change driven by checks every 100 ms with rise/fall 2 to show in
/// `/status` (0.2 s of checks plus a wide margin for a loaded machine).
pub const HEALTH_CHANGE: Duration = Duration::from_secs(3);

/// Time for an admin API change (drain, enable, weight) to show.
pub const ADMIN_CHANGE: Duration = Duration::from_secs(2);

/// Time one HTTP exchange may take before the client gives up (nothing in the suite is meant
/// to take this long unless keel hangs).
pub const REQUEST: Duration = Duration::from_secs(10);

/// Time for keel to exit after SIGTERM once in-flight requests are done.
pub const EXIT: Duration = Duration::from_secs(10);

/// Time for hostile input to be answered with a 4xx or a close.
pub const HOSTILE: Duration = Duration::from_secs(5);

/// Polls `condition` every [`POLL`] until it returns true, failing after `deadline` with a
/// message naming `what` was awaited. Each evaluation is itself bounded by the time left.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, what, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every [`POLL`] until it returns `Some(value)`, and returns that value; fails
/// after `deadline` with a message naming `what` was awaited.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let end = start + deadline;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let left = end.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(left, probe()).await {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {:?} ({tries} tries) waiting for {what}", start.elapsed());
        }
        tokio::time::sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn wait_until_returns_once_the_condition_holds() {
        let n = AtomicU32::new(0);
        wait_until(Duration::from_secs(2), "three polls", || {
            let v = n.fetch_add(1, Ordering::SeqCst);
            async move { v >= 2 }
        })
        .await
        .expect("condition holds on the third poll");
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn wait_until_names_what_it_waited_for() {
        let err = wait_until(Duration::from_millis(50), "the impossible", || async { false })
            .await
            .expect_err("must time out");
        assert!(err.to_string().contains("the impossible"), "{err}");
    }

    #[tokio::test]
    async fn a_hanging_probe_is_bounded_by_the_deadline() {
        let start = Instant::now();
        let r: Result<()> = wait_for(Duration::from_millis(100), "a hang", std::future::pending).await;
        assert!(r.is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
