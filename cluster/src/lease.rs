//! The VIP's right to hold, as a deadline no stall of the Raft thread can stretch.
//!
//! A leader may hold the VIP until its last quorum acknowledgement plus the lease (less one
//! re-evaluation tick): past that, a majority may have elected someone else. openraft publishes
//! the acknowledgement's *age* in its metrics; [`Gate`] turns each published age into an
//! absolute deadline on the monotonic clock the moment it sees it, and answers "hold?" by
//! comparing that deadline with the clock — not by waiting for the next publication. So:
//!
//! - **A stalled Raft thread cannot extend a hold.** If the Raft runtime blocks (a snapshot built
//!   on it, a starved CPU), no new metrics arrive and the deadline simply passes. [`follow`]
//!   runs wherever its caller spawns it — keel runs it on the VIP's own thread, next to the
//!   controller — and sleeps until the deadline, so the release happens on time even though
//!   the Raft thread is asleep. (A status value the Raft thread has not refreshed can therefore
//!   never keep a VIP.)
//! - **It never runs backwards.** Deadlines only move forward; and once the gate has closed for
//!   want of acks, it opens again only for an acknowledgement that is *newer than the
//!   closing*: a stale metrics value published late (its age computed before the stall) cannot
//!   reopen it.
//!
//! A planned hand-over ([`crate::handover`]) adds two deadlines of its own, evaluated the same
//! way: the leader handing over keeps the VIP past its lease until its successor asks for it
//! (or the hand-over's hold runs out), and every other node withholds its claim until that
//! release is confirmed (or the hold has certainly run out).
//!
//! The deadline is computed when the value is *observed*, which is no earlier than when it was
//! published: observed on a thread of its own, the two are microseconds apart. The age itself is
//! openraft's: the time since the leader *sent* the request a quorum acknowledged.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::watch;

use crate::handover::HandOver;

/// openraft's metrics for keel's type configuration.
type RaftMetrics = openraft::RaftMetrics<u64, crate::types::NodeInfo>;

/// Decides "hold?" from acknowledgement ages.
#[derive(Clone, Debug)]
pub struct Gate {
    lease: Duration,
    margin: Duration,
    /// Hold until then (exclusive); `None`: not a leader, or no acknowledgement yet.
    until: Option<Instant>,
    /// When the gate last closed for want of acks: only a newer ack opens it again.
    closed_at: Option<Instant>,
}

impl Gate {
    /// A closed gate for a lease of `lease`, closing `margin` early (one re-evaluation tick).
    pub fn new(lease: Duration, margin: Duration) -> Self {
        Gate { lease, margin, until: None, closed_at: None }
    }

    /// Takes in one observation made at `now`: whether this node leads, and how old its last
    /// quorum acknowledgement was then.
    pub fn observe(&mut self, leader: bool, ack_age: Option<Duration>, now: Instant) {
        let was_open = self.holds(now);
        let acked_at = ack_age.and_then(|age| now.checked_sub(age));
        match (leader, acked_at) {
            (true, Some(acked)) => {
                if self.closed_at.is_some_and(|closed| acked <= closed) {
                    return; // an ack from before the gate closed: it cannot reopen it
                }
                let until = acked + self.lease.saturating_sub(self.margin);
                // Deadlines move forward only.
                if self.until.is_none_or(|current| until > current) {
                    self.until = Some(until);
                }
            }
            _ => {
                self.until = None;
                if was_open {
                    self.closed_at = Some(now);
                }
            }
        }
    }

    /// Whether this node may hold the VIP at `now`. Closing on the deadline is recorded, so a
    /// stale acknowledgement cannot reopen the gate afterwards.
    pub fn check(&mut self, now: Instant) -> bool {
        match self.until {
            Some(until) if now < until => true,
            Some(_) => {
                self.until = None;
                self.closed_at = Some(now);
                false
            }
            None => false,
        }
    }

    /// Whether the gate is open at `now` (no bookkeeping).
    pub fn holds(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    /// The deadline, while open.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}

/// Publishes the gate's verdict on the returned channel, driven by `metrics` and by the
/// deadline itself; spawn the future on the thread the VIP lives on. It ends (publishing
/// `false`) when the metrics sender is gone.
pub fn follow(
    mut metrics: watch::Receiver<RaftMetrics>,
    lease: Duration,
    margin: Duration,
    handover: Arc<HandOver>,
) -> (watch::Receiver<bool>, impl Future<Output = ()> + Send) {
    let (tx, rx) = watch::channel(false);
    let mut handover_changed = handover.subscribe();
    let run = async move {
        let mut gate = Gate::new(lease, margin);
        // Only a *new* metrics value is an observation: the same value looked at again later
        // would be re-aged as if it had just been published, and stretch the hold.
        let mut fresh = true;
        loop {
            let now = Instant::now();
            if fresh {
                let m = metrics.borrow_and_update();
                let leader = m.state == ServerState::Leader;
                gate.observe(leader, m.millis_since_quorum_ack.map(Duration::from_millis), now);
            }
            let leased = gate.check(now);
            let view = handover.vip(now);
            let holds = view.hold_until.is_some() || (leased && view.block_until.is_none());
            tx.send_if_modified(|v| {
                if *v != holds {
                    let why = match (holds, view.hold_until.is_some(), leased) {
                        (true, true, _) => "kept for a hand-over",
                        (true, false, _) => "granted (quorum acknowledged)",
                        (false, _, true) => "withheld: the previous holder has not released it yet",
                        (false, _, false) => "ended",
                    };
                    tracing::info!(target: "keel::raft", holds, until = ?gate.until().map(|u| u.saturating_duration_since(now)),
                        "VIP lease {why}");
                    *v = holds;
                    true
                } else {
                    false
                }
            });
            // Wake on whichever comes first: the lease's deadline or the hand-over's.
            let deadline = [gate.until(), view.hold_until, view.block_until]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        tx.send_replace(false);
                        return;
                    }
                    fresh = true;
                }
                _ = handover_changed.changed() => fresh = false,
                () = async { match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                } } => fresh = false,
            }
        }
    };
    (rx, run)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(300);
    const TICK: Duration = Duration::from_millis(50);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_leader_holds_until_its_last_ack_plus_the_lease_less_a_tick() {
        let t0 = Instant::now();
        let mut g = Gate::new(LEASE, TICK);
        g.observe(true, Some(ms(10)), t0);
        assert!(g.check(t0));
        // acked at t0-10ms: holds until t0+240ms
        assert!(g.check(t0 + ms(239)));
        assert!(!g.check(t0 + ms(240)));
    }

    #[test]
    fn no_new_metrics_means_the_deadline_passes_whatever_the_last_value_said() {
        // The Raft thread stalls after publishing "leader, acked 1 ms ago": nothing more comes.
        let t0 = Instant::now();
        let mut g = Gate::new(LEASE, TICK);
        g.observe(true, Some(ms(1)), t0);
        assert!(!g.check(t0 + ms(630)), "a 630 ms stall must not extend the hold");
    }

    #[test]
    fn a_stale_ack_cannot_reopen_a_closed_gate() {
        let t0 = Instant::now();
        let mut g = Gate::new(LEASE, TICK);
        g.observe(true, Some(ms(0)), t0);
        assert!(!g.check(t0 + ms(260)), "closed on the deadline");
        // Published late: an age that puts the ack before the closing.
        g.observe(true, Some(ms(124)), t0 + ms(270));
        assert!(!g.check(t0 + ms(270)), "an ack from before the closing reopened the gate");
        // A fresh ack, sent after the closing, opens it.
        g.observe(true, Some(ms(5)), t0 + ms(300));
        assert!(g.check(t0 + ms(300)));
    }

    #[test]
    fn deadlines_never_move_backwards() {
        let t0 = Instant::now();
        let mut g = Gate::new(LEASE, TICK);
        g.observe(true, Some(ms(0)), t0 + ms(100));
        let until = g.until().unwrap();
        g.observe(true, Some(ms(90)), t0 + ms(110)); // an older ack, seen later
        assert_eq!(g.until(), Some(until));
    }

    #[test]
    fn losing_leadership_closes_at_once() {
        let t0 = Instant::now();
        let mut g = Gate::new(LEASE, TICK);
        g.observe(true, Some(ms(0)), t0);
        g.observe(false, None, t0 + ms(10));
        assert!(!g.check(t0 + ms(10)));
        // The ack of the old term, seen again, does not reopen it.
        g.observe(true, Some(ms(15)), t0 + ms(15));
        assert!(!g.check(t0 + ms(15)));
    }
}
