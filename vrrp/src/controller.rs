//! `VipController`: turns "should this node hold the VIP?" (the cluster's leadership watch) into
//! [`VipAnnouncer`] calls, and keeps counters the admin API and `/metrics` can show.
//!
//! The rules, in order of priority (see `vrrp/LIFECYCLE.md` for why they make two holders
//! impossible while the process is alive):
//!
//! 1. **Start by releasing.** A VIP left on the interface by a crashed run (SIGKILL leaves the
//!    address behind) must go, and a restarted node claims nothing until the cluster says it
//!    leads again.
//! 2. **Follow leadership at once.** `true` → claim (add the /32, gratuitous-ARP burst);
//!    `false` → release. A change that arrives while a call is in flight cancels that call (the
//!    announcer's calls are safe to drop), so losing the lease in the middle of a claim's ARP
//!    burst releases immediately instead of after the burst.
//! 3. **Insist while holding.** Every `reannounce_every` (2 s by default) check the address is
//!    still there (re-add it if someone removed it) and re-send the burst: cheap insurance for a
//!    switch or client that missed the first one. When the address has a kernel lifetime,
//!    renew it every quarter lifetime: a holder that dies or freezes stops renewing, and the
//!    kernel removes the VIP by itself.
//! 4. **Retry failures with a bounded, doubling backoff** (100 ms → 2 s by default), logged with
//!    the transition and its cause; a new leadership value retries at once. Never panic.
//! 5. **Release on stop**, with a few attempts, each time-bounded, so shutdown cannot hang.
//!
//! If the leadership sender is dropped (the cluster stopped), the node no longer leads: the VIP
//! is released and the controller waits for `stop`. If the stop sender is dropped, that is a
//! stop.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::host_prefix_len;
use crate::{VipAnnouncer, VipError};

const TARGET: &str = "keel::vip";

/// How the controller paces itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerSettings {
    /// While holding, re-check the address and re-send the ARP burst this often; `None` turns
    /// the periodic re-announcement off.
    pub reannounce_every: Option<Duration>,
    /// First retry delay after a failed claim or release.
    pub retry_initial: Duration,
    /// Upper bound of the doubling retry delay.
    pub retry_max: Duration,
    /// Release attempts on stop before giving up (and logging how to remove the VIP by hand).
    pub shutdown_attempts: u32,
    /// Time limit of each release attempt on stop.
    pub shutdown_attempt_timeout: Duration,
}

impl Default for ControllerSettings {
    fn default() -> Self {
        ControllerSettings {
            reannounce_every: Some(Duration::from_secs(2)),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            shutdown_attempts: 3,
            shutdown_attempt_timeout: Duration::from_secs(1),
        }
    }
}

/// What the controller has done so far; published on [`VipController::status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VipStatus {
    /// The last successful call left the VIP on this node's interface.
    pub holding: bool,
    /// Successful claims (including re-adding an address removed from outside).
    pub claims: u64,
    /// Successful releases (including the one at start and the one at stop).
    pub releases: u64,
    /// Failed calls of any kind (claim, release, re-announce, check).
    pub failures: u64,
    /// When `holding` last flipped, in ms since the Unix epoch: the last failover seen here.
    pub last_change_unix_ms: Option<u64>,
}

/// Why a transition happens; printed in its log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    Startup,
    BecameLeader,
    LostLease,
    ClusterGone,
    Restore,
    Shutdown,
    HandedOver,
}

impl Cause {
    fn text(self) -> &'static str {
        match self {
            Cause::Startup => "startup: clearing any VIP a previous run left; claim only once leader",
            Cause::BecameLeader => "became leader",
            Cause::LostLease => "lost leadership or its quorum lease",
            Cause::ClusterGone => "cluster stopped publishing leadership",
            Cause::Restore => "address was removed from the interface by someone else",
            Cause::Shutdown => "shutting down",
            Cause::HandedOver => "handed over: off the interface, kept on lo while the LAN follows the successor",
        }
    }
}

/// Drives one [`VipAnnouncer`] from the leadership watch. Build it, keep [`Self::status`], then
/// spawn [`Self::run`].
pub struct VipController {
    announcer: Arc<dyn VipAnnouncer>,
    settings: ControllerSettings,
    status: watch::Sender<VipStatus>,
    /// True once this node has handed the VIP over: letting go then steps aside (off the
    /// interface, kept on `lo` for a while) instead of deleting it.
    aside: Option<watch::Receiver<bool>>,
}

impl VipController {
    /// A controller for `announcer`; nothing happens until [`Self::run`].
    pub fn new(announcer: Arc<dyn VipAnnouncer>, settings: ControllerSettings) -> Self {
        VipController { announcer, settings, status: watch::Sender::new(VipStatus::default()), aside: None }
    }

    /// Lets go by [`VipAnnouncer::step_aside`] whenever `aside` is true (a planned hand-over:
    /// the successor claims next).
    pub fn with_step_aside(mut self, aside: watch::Receiver<bool>) -> Self {
        self.aside = Some(aside);
        self
    }

    /// Counters and the holding flag, updated after every call.
    pub fn status(&self) -> watch::Receiver<VipStatus> {
        self.status.subscribe()
    }

    /// Runs until `stop` turns true (or its sender is dropped), then releases the VIP and
    /// returns. `leadership` is `ClusterHandle::leadership()`: true only while this node leads
    /// with a quorum ack inside the lease.
    pub async fn run(self, leadership: watch::Receiver<bool>, stop: watch::Receiver<bool>) {
        let mut inputs = Inputs { leadership, leader_open: true, stop, stop_closed: false };
        let mut held: Option<bool> = None; // None: unknown (start, failure, cancelled call)
        let mut startup = true;
        let mut last_want: Option<bool> = None;
        let mut cause = Cause::Startup;
        let mut backoff = self.settings.retry_initial;
        let mut retry_at: Option<Instant> = None;
        let mut next_refresh: Option<Instant> = None;
        let mut next_renew: Option<Instant> = None;
        let renew_every = self.announcer.renew_every();

        while !inputs.stopping() {
            let want = inputs.leader();
            if last_want != Some(want) {
                // A new decision: act now, with a fresh backoff.
                cause = match (want, last_want) {
                    (true, _) => Cause::BecameLeader,
                    (false, None) => Cause::Startup,
                    (false, Some(_)) if !inputs.leader_open => Cause::ClusterGone,
                    (false, Some(_)) => Cause::LostLease,
                };
                last_want = Some(want);
                retry_at = None;
                backoff = self.settings.retry_initial;
            }
            // The first call is always a release, whatever leadership says (rule 1).
            let target = want && !startup;
            let due = retry_at.is_none_or(|at| Instant::now() >= at);
            if (startup || held != Some(target)) && due {
                let handing_over = !startup && !target && self.aside.as_ref().is_some_and(|a| *a.borrow());
                let call_cause = match (startup, handing_over) {
                    (true, _) => Cause::Startup,
                    (false, true) => Cause::HandedOver,
                    (false, false) => cause,
                };
                startup = false;
                let call = match (target, handing_over) {
                    (true, _) => self.announcer.claim(),
                    (false, true) => self.announcer.step_aside(),
                    (false, false) => self.announcer.release(),
                };
                let outcome = tokio::select! {
                    result = call => Some(result),
                    () = inputs.until_changed(want) => None,
                };
                match outcome {
                    None => held = None,
                    Some(Ok(())) => {
                        held = Some(target);
                        retry_at = None;
                        backoff = self.settings.retry_initial;
                        self.record_change(target, call_cause);
                        if target {
                            next_refresh = self.settings.reannounce_every.map(|every| Instant::now() + every);
                            next_renew = renew_every.map(|every| Instant::now() + every);
                        }
                    }
                    Some(Err(error)) => {
                        held = None;
                        self.record_failure(
                            if target { "claim" } else { "release" },
                            call_cause,
                            &error,
                            Some(backoff),
                        );
                        retry_at = Some(Instant::now() + backoff);
                        backoff = (backoff * 2).min(self.settings.retry_max);
                    }
                }
                continue;
            }

            let holding = held == Some(true) && want;
            let wake = if held != Some(want) {
                retry_at
            } else if holding {
                [next_refresh, next_renew].into_iter().flatten().min()
            } else {
                None
            };
            let timer = async move {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = inputs.until_changed(want) => {}
                () = timer => if holding && next_renew.is_some_and(|at| Instant::now() >= at) {
                    // The kernel lifetime first: it is what removes the VIP from a holder that
                    // dies or freezes, so it must never lapse on a live one.
                    next_renew = renew_every.map(|every| Instant::now() + every);
                    let renewed = tokio::select! {
                        r = self.announcer.renew() => Some(r),
                        () = inputs.until_changed(want) => None,
                    };
                    if let Some(Err(error)) = renewed {
                        self.record_failure("lifetime renewal", Cause::BecameLeader, &error, None);
                    }
                } else if holding {
                    next_refresh = self.settings.reannounce_every.map(|every| Instant::now() + every);
                    let refreshed = tokio::select! {
                        still_held = self.refresh() => Some(still_held),
                        () = inputs.until_changed(want) => None,
                    };
                    if refreshed == Some(false) {
                        held = None;
                        cause = Cause::Restore;
                    }
                },
            }
        }
        self.shutdown().await;
    }

    /// Re-checks and re-announces a held VIP. Returns false if the address is gone.
    async fn refresh(&self) -> bool {
        match self.announcer.holds().await {
            Ok(true) => {
                if let Err(error) = self.announcer.announce().await {
                    self.record_failure("re-announce", Cause::BecameLeader, &error, None);
                } else {
                    tracing::debug!(target: TARGET, vip = %self.announcer.address(), "VIP re-announced");
                }
                true
            }
            Ok(false) => {
                tracing::warn!(
                    target: TARGET,
                    vip = %self.announcer.address(),
                    interface = self.announcer.interface(),
                    "VIP {} is no longer on {} although this node leads; adding it again",
                    self.announcer.address(),
                    self.announcer.interface(),
                );
                false
            }
            Err(error) => {
                self.record_failure("check", Cause::BecameLeader, &error, None);
                true
            }
        }
    }

    async fn shutdown(&self) {
        let attempts = self.settings.shutdown_attempts.max(1);
        let mut backoff = self.settings.retry_initial;
        for attempt in 1..=attempts {
            let error =
                match tokio::time::timeout(self.settings.shutdown_attempt_timeout, self.announcer.release()).await {
                    Ok(Ok(())) => {
                        self.record_change(false, Cause::Shutdown);
                        return;
                    }
                    Ok(Err(error)) => error,
                    Err(_) => VipError::Netlink {
                        action: "delete",
                        address: self.announcer.address(),
                        interface: self.announcer.interface().to_string(),
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "release timed out"),
                    },
                };
            let retry = (attempt < attempts).then_some(backoff);
            self.record_failure("release", Cause::Shutdown, &error, retry);
            if let Some(delay) = retry {
                tokio::time::sleep(delay).await;
                backoff = (backoff * 2).min(self.settings.retry_max);
            }
        }
        tracing::error!(
            target: TARGET,
            vip = %self.announcer.address(),
            interface = self.announcer.interface(),
            "VIP {} may still be on {}: release failed {attempts} times at shutdown; \
             remove it with `ip addr del {}/{} dev {}`",
            self.announcer.address(),
            self.announcer.interface(),
            self.announcer.address(),
            host_prefix_len(self.announcer.address()),
            self.announcer.interface(),
        );
    }

    fn record_change(&self, holding: bool, cause: Cause) {
        let (vip, interface) = (self.announcer.address(), self.announcer.interface());
        if holding {
            tracing::info!(target: TARGET, %vip, interface, cause = cause.text(), "VIP {vip} claimed on {interface} ({})", cause.text());
        } else {
            tracing::info!(target: TARGET, %vip, interface, cause = cause.text(), "VIP {vip} released from {interface} ({})", cause.text());
        }
        self.status.send_modify(|status| {
            if holding {
                status.claims += 1;
            } else {
                status.releases += 1;
            }
            if status.holding != holding {
                status.holding = holding;
                status.last_change_unix_ms = Some(unix_ms());
            }
        });
    }

    fn record_failure(&self, what: &str, cause: Cause, error: &VipError, retry_in: Option<Duration>) {
        let (vip, interface) = (self.announcer.address(), self.announcer.interface());
        match retry_in {
            Some(delay) => tracing::warn!(
                target: TARGET, %vip, interface, cause = cause.text(), error = %error, retry_in = ?delay,
                "VIP {vip} {what} on {interface} failed ({}): {error}; retrying in {delay:?}", cause.text()
            ),
            None => tracing::warn!(
                target: TARGET, %vip, interface, cause = cause.text(), error = %error,
                "VIP {vip} {what} on {interface} failed ({}): {error}", cause.text()
            ),
        }
        self.status.send_modify(|status| status.failures += 1);
    }
}

/// The two input channels, with "sender dropped" folded into their meaning.
struct Inputs {
    leadership: watch::Receiver<bool>,
    leader_open: bool,
    stop: watch::Receiver<bool>,
    stop_closed: bool,
}

impl Inputs {
    /// Whether this node should hold the VIP now (a closed channel means no).
    fn leader(&mut self) -> bool {
        self.leader_open && *self.leadership.borrow_and_update()
    }

    fn stopping(&mut self) -> bool {
        self.stop_closed = self.stop_closed || self.stop.has_changed().is_err();
        self.stop_closed || *self.stop.borrow_and_update()
    }

    /// Resolves once leadership differs from `from` or a stop is requested; repeated sends of
    /// the same value (a heartbeat re-publishing `true`) do not wake it.
    async fn until_changed(&mut self, from: bool) {
        loop {
            tokio::select! {
                changed = self.leadership.changed(), if self.leader_open => {
                    if changed.is_err() {
                        self.leader_open = false;
                    }
                    if self.leader() != from {
                        return;
                    }
                }
                changed = self.stop.changed(), if !self.stop_closed => {
                    if changed.is_err() {
                        self.stop_closed = true;
                    }
                    if self.stopping() {
                        return;
                    }
                }
                else => return,
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RecordedCall, RecordingAnnouncer};
    use RecordedCall::{Announce, Claim, Holds, Release};

    /// Far longer than any step takes with paused time; hitting it means the state never came.
    const DEADLINE: Duration = Duration::from_secs(60);

    struct Harness {
        double: RecordingAnnouncer,
        lead: watch::Sender<bool>,
        stop: watch::Sender<bool>,
        status: watch::Receiver<VipStatus>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(settings: ControllerSettings) -> Harness {
        let double = RecordingAnnouncer::default();
        let controller = VipController::new(Arc::new(double.clone()), settings);
        let status = controller.status();
        let (lead, lead_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(controller.run(lead_rx, stop_rx));
        Harness { double, lead, stop, status, task }
    }

    async fn wait_status(h: &mut Harness, what: &str, pred: impl FnMut(&VipStatus) -> bool) -> VipStatus {
        match tokio::time::timeout(DEADLINE, h.status.wait_for(pred)).await {
            Ok(Ok(status)) => status.clone(),
            _ => panic!("timed out waiting for {what}; calls so far: {:?}", h.double.calls()),
        }
    }

    /// Lets every ready task run and the paused clock move by `d`.
    async fn settle(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_renews_the_kernel_lifetime_and_stops_when_it_lets_go() {
        let double = RecordingAnnouncer::default();
        double.set_renew_every(Some(Duration::from_millis(500)));
        let controller = VipController::new(Arc::new(double.clone()), ControllerSettings::default());
        let mut status = controller.status();
        let (lead, lead_rx) = watch::channel(true);
        let (_stop, stop_rx) = watch::channel(false);
        let _task = tokio::spawn(controller.run(lead_rx, stop_rx));
        tokio::time::timeout(DEADLINE, status.wait_for(|s| s.holding)).await.unwrap().unwrap();
        settle(Duration::from_millis(2100)).await;
        let renews = double.calls().iter().filter(|c| **c == RecordedCall::Renew).count();
        assert_eq!(renews, 4, "renewals in 2.1 s at 500 ms: {:?}", double.calls());
        lead.send_replace(false);
        tokio::time::timeout(DEADLINE, status.wait_for(|s| !s.holding)).await.unwrap().unwrap();
        settle(Duration::from_secs(3)).await;
        let after = double.calls().iter().filter(|c| **c == RecordedCall::Renew).count();
        assert_eq!(after, renews, "renewed after letting go: {:?}", double.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn releases_at_start() {
        let mut h = start(ControllerSettings::default());
        let status = wait_status(&mut h, "the startup release", |s| s.releases == 1).await;
        assert_eq!(h.double.calls(), vec![Release]);
        assert!(!status.holding);
        assert_eq!(status.claims, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn releases_at_start_even_when_already_leader() {
        let double = RecordingAnnouncer::default();
        let controller = VipController::new(Arc::new(double.clone()), ControllerSettings::default());
        let mut status = controller.status();
        let (_lead, lead_rx) = watch::channel(true);
        let (_stop, stop_rx) = watch::channel(false);
        tokio::spawn(controller.run(lead_rx, stop_rx));
        tokio::time::timeout(DEADLINE, status.wait_for(|s| s.holding)).await.unwrap().unwrap();
        assert_eq!(double.calls(), vec![Release, Claim]);
    }

    #[tokio::test(start_paused = true)]
    async fn claims_on_leadership_and_releases_on_loss() {
        let mut h = start(ControllerSettings::default());
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.lead.send(true).unwrap();
        let s = wait_status(&mut h, "claim", |s| s.holding).await;
        assert_eq!((s.claims, s.releases), (1, 1));
        assert!(s.last_change_unix_ms.is_some());
        assert!(h.double.is_held());
        h.lead.send(false).unwrap();
        let s = wait_status(&mut h, "release", |s| !s.holding).await;
        assert_eq!((s.claims, s.releases, s.failures), (1, 2, 0));
        assert_eq!(h.double.calls(), vec![Release, Claim, Release]);
        assert!(!h.double.is_held());
    }

    #[tokio::test(start_paused = true)]
    async fn rapid_flapping_ends_in_the_final_state() {
        let mut h = start(ControllerSettings::default());
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.double.set_delay(Duration::from_millis(30));
        for round in 0..20 {
            let value = round % 2 == 0;
            h.lead.send(value).unwrap();
            settle(Duration::from_millis(7 * (round % 5))).await;
        }
        h.lead.send(true).unwrap();
        wait_status(&mut h, "final claim", |s| s.holding).await;
        settle(Duration::from_millis(500)).await;
        assert!(h.double.is_held() && h.status.borrow().holding);

        for round in 0..15 {
            h.lead.send(round % 2 == 0).unwrap();
            tokio::task::yield_now().await;
        }
        h.lead.send(false).unwrap();
        wait_status(&mut h, "final release", |s| !s.holding).await;
        settle(Duration::from_millis(500)).await;
        assert!(!h.double.is_held());
        assert_eq!(h.double.calls().last(), Some(&Release));
        assert_eq!(h.status.borrow().failures, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn losing_leadership_mid_claim_releases_at_once() {
        let mut h = start(ControllerSettings::default());
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.double.set_delay(Duration::from_secs(1)); // a slow ARP burst
        h.lead.send(true).unwrap();
        settle(Duration::from_millis(100)).await;
        assert!(h.double.is_held(), "the claim added the address and is now announcing");
        h.double.set_delay(Duration::ZERO);
        let lost_at = Instant::now();
        h.lead.send(false).unwrap();
        settle(Duration::from_millis(1)).await;
        assert!(!h.double.is_held(), "release must not wait for the burst to finish");
        let (last, at) = *h.double.timed_calls().last().unwrap();
        assert_eq!(last, Release);
        assert!(at - lost_at < Duration::from_millis(1));
        assert_eq!(h.status.borrow().claims, 0, "the cancelled claim never completed");
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_true_does_not_interrupt_a_claim() {
        let mut h = start(ControllerSettings::default());
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.double.set_delay(Duration::from_millis(500));
        h.lead.send(true).unwrap();
        for _ in 0..40 {
            settle(Duration::from_millis(25)).await; // a heartbeat re-publishing `true`
            h.lead.send(true).unwrap();
        }
        wait_status(&mut h, "claim", |s| s.holding).await;
        assert_eq!(h.double.calls().iter().filter(|c| **c == Claim).count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn claim_failure_is_retried_with_backoff() {
        let mut h = start(ControllerSettings::default());
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.double.fail_claims(4);
        h.lead.send(true).unwrap();
        let s = wait_status(&mut h, "claim after retries", |s| s.holding).await;
        assert_eq!((s.failures, s.claims), (4, 1));
        let claims: Vec<Instant> =
            h.double.timed_calls().into_iter().filter(|(c, _)| *c == Claim).map(|(_, at)| at).collect();
        let gaps: Vec<Duration> = claims.windows(2).map(|w| w[1] - w[0]).collect();
        let ms: Vec<u128> = gaps.iter().map(|g| g.as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800]);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_bounded() {
        let settings = ControllerSettings { retry_max: Duration::from_millis(300), ..ControllerSettings::default() };
        let mut h = start(settings);
        wait_status(&mut h, "startup release", |s| s.releases == 1).await;
        h.double.fail_claims(6);
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim after retries", |s| s.holding).await;
        let claims: Vec<Instant> =
            h.double.timed_calls().into_iter().filter(|(c, _)| *c == Claim).map(|(_, at)| at).collect();
        let ms: Vec<u128> = claims.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 300, 300, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_release_is_retried_and_new_leadership_acts_at_once() {
        let mut h = start(ControllerSettings::default());
        h.double.fail_releases(1_000);
        wait_status(&mut h, "failing startup release", |s| s.failures >= 3).await;
        h.double.fail_releases(0);
        h.lead.send(true).unwrap();
        let before = Instant::now();
        wait_status(&mut h, "claim", |s| s.holding).await;
        assert!(Instant::now() - before < Duration::from_millis(5), "a new decision does not wait out the backoff");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_releases_and_returns() {
        let mut h = start(ControllerSettings::default());
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim", |s| s.holding).await;
        h.stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, &mut h.task).await.unwrap().unwrap();
        assert!(!h.double.is_held());
        assert_eq!(h.double.calls().last(), Some(&Release));
        assert!(!h.status.borrow().holding);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_gives_up_after_bounded_attempts() {
        let mut h = start(ControllerSettings::default());
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim", |s| s.holding).await;
        h.double.fail_releases(100);
        h.stop.send(true).unwrap();
        tokio::time::timeout(DEADLINE, &mut h.task).await.unwrap().unwrap();
        let releases_after_claim =
            h.double.calls().iter().rev().take_while(|c| **c != Claim).filter(|c| **c == Release).count();
        assert_eq!(releases_after_claim, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stop_sender_stops() {
        let Harness { double, lead: _lead, stop, task, .. } = start(ControllerSettings::default());
        drop(stop);
        tokio::time::timeout(DEADLINE, task).await.unwrap().unwrap();
        assert_eq!(double.calls().last(), Some(&Release));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_leadership_sender_releases() {
        let mut h = start(ControllerSettings::default());
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim", |s| s.holding).await;
        let (closed, _) = watch::channel(false);
        drop(std::mem::replace(&mut h.lead, closed));
        wait_status(&mut h, "release", |s| !s.holding).await;
        assert!(!h.task.is_finished(), "still waiting for stop");
    }

    #[tokio::test(start_paused = true)]
    async fn reannounces_while_holding_and_restores_a_removed_address() {
        let mut h = start(ControllerSettings::default());
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim", |s| s.holding).await;
        settle(Duration::from_millis(4_100)).await;
        assert_eq!(h.double.calls(), vec![Release, Claim, Holds, Announce, Holds, Announce]);

        h.double.remove_externally();
        settle(Duration::from_millis(2_000)).await;
        assert!(h.double.is_held());
        assert_eq!(h.double.calls()[6..], [Holds, Claim]);
        assert_eq!(h.status.borrow().claims, 2);

        h.lead.send(false).unwrap();
        wait_status(&mut h, "release", |s| !s.holding).await;
        let n = h.double.calls().len();
        settle(Duration::from_secs(10)).await;
        assert_eq!(h.double.calls().len(), n, "nothing is re-announced while not holding");
    }

    #[tokio::test(start_paused = true)]
    async fn reannounce_failures_are_counted_not_fatal() {
        let mut h = start(ControllerSettings::default());
        h.lead.send(true).unwrap();
        wait_status(&mut h, "claim", |s| s.holding).await;
        h.double.fail_announces(2);
        settle(Duration::from_millis(6_100)).await;
        let s = h.status.borrow().clone();
        assert_eq!(s.failures, 2);
        assert!(s.holding);
        assert_eq!(h.double.calls().iter().filter(|c| **c == Announce).count(), 3);
    }
}
