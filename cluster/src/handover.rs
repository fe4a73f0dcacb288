//! Planned leadership hand-over: the leader passes leadership *and the VIP* to a chosen data
//! node without a failover's gap (SIGTERM on the leader, `keel cluster transfer`).
//!
//! openraft 0.9 has no leadership transfer, and its voters refuse any vote until a lease after
//! the last heartbeat they heard. So a hand-over is built on keel's own election driver and
//! lets the lease run out on purpose, while the old leader keeps serving:
//!
//! 1. The leader `L` picks a caught-up data voter `N` and tells every voter: "I hand over to
//!    `N`; I may hold the VIP for `H` from now" ([`RpcRequest::HandOver`]). It goes on only if a
//!    majority of voters (itself included) acknowledged. Each of them, for `H` after it heard
//!    it, grants pre-votes to `N` alone and does not stand itself unless it is `N`.
//! 2. `L` stops its heartbeats. Its Raft lease ends by itself; its *VIP* is kept by the
//!    hand-over hold instead ([`HandOver::vip`]), so it goes on answering on the VIP.
//! 3. Once the voters' leases have run out, `N` stands at once (its election watchdog treats it
//!    as the first in line) and wins.
//! 4. `N`, leading with a quorum, asks `L` for the VIP ([`RpcRequest::Release`]). `L` *steps
//!    aside*: the address goes onto `lo` (for a while; the kernel removes it by itself) and
//!    off the interface, and `L` answers once it is off; `N` claims and announces on the
//!    answer. From then on `L` answers no ARP for the VIP (it sets `arp_ignore = 1` on the
//!    interface, as LVS direct routing does), but it still accepts what reaches it: a SYN that
//!    clients send to its MAC before `N`'s announcement arrives, and the connections it has
//!    open, which it finishes while it drains. So no request is lost in the switch, and at no
//!    instant do two nodes have the VIP on their interfaces.
//!
//! Measured in the netns lab (a probe every 10 ms): deleting the address outright lost a
//! probe in each of the first two trials — a SYN sent in the sub-millisecond gap was dropped
//! and retried only after the client's 1 s SYN timeout, and a connection `L` had just accepted
//! could no longer be answered. Keeping it on the interface 5 ms longer (make-before-break)
//! lost none in 20, but then both nodes had it on their interfaces for those milliseconds.
//!
//! # Why no two nodes hold the VIP at once
//!
//! `L` holds under the hand-over until `N` asked, or until `t0 + H` on its own monotonic
//! clock, `t0` taken *before* the notices were sent, whichever comes first; it never holds
//! past that. Every other node that learns of the hand-over blocks its own claim until `L`
//! confirmed to it that the address is off its interface, or until `H` after it heard of it
//! (later than `t0 + H`). A node that never heard of it cannot lead before `t0 + H`: it needs
//! a pre-vote majority, every majority shares a voter with the majority that acknowledged the
//! notice, and that voter grants pre-votes to `N` alone until `H` after it acknowledged. (Data
//! nodes stand only through the pre-vote; a witness stands after 4 leases of silence and also
//! waits out the hand-over; witnesses never hold the VIP.) So the VIP moves either on `L`'s
//! confirmed release, or after `L`'s hold has certainly ended — the two rules of any VIP move.
//!
//! If `N` does not win within `H` (it died, the network split), the hold ends anyway: `L`
//! switches its heartbeats back on, and the usual lease decides again.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a hand-over may hold, in leases: one lease for the voters' leases to run out, and
/// room for a vote, the new leader's first quorum round and one retry.
pub const HOLD_LEASES: u32 = 3;

/// This node's part in a hand-over, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    /// This node leads and hands over to `to`: it keeps the VIP past its lease until `until`,
    /// or until the successor asked for it (`released`).
    outgoing: Option<Side>,
    /// Node `from` hands over to `to`: until `until`, only `to` may stand, and this node claims
    /// the VIP only once `from` confirmed its release (`released`).
    incoming: Option<(u64, Side)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Side {
    to: u64,
    until: Instant,
    /// Outgoing: when the successor asked. Incoming: when the node handing over confirmed
    /// that it let go.
    released: Option<Instant>,
}

impl Side {
    /// When the hold (or the block) ends.
    fn end(&self) -> Instant {
        self.released.map_or(self.until, |at| at.min(self.until))
    }
    fn active(&self, now: Instant) -> bool {
        now < self.end()
    }
}

/// What the hand-over means for the VIP at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipView {
    /// Hold the VIP whatever the lease says, until then (this node hands over).
    pub hold_until: Option<Instant>,
    /// Do not claim, whatever the lease says, until then (another node hands over and has not
    /// confirmed its release).
    pub block_until: Option<Instant>,
}

/// One node's hand-over state, shared by the RPC handlers, the election watchdog and the VIP
/// gate.
pub struct HandOver {
    me: u64,
    state: Mutex<State>,
    /// Bumped on every change, so the VIP gate re-evaluates at once.
    changed: watch::Sender<u64>,
    /// True from the successor's request until the hand-over ends: the VIP controller lets go
    /// by stepping aside (off the interface, kept on `lo`), not by deleting it.
    aside: watch::Sender<bool>,
    /// Whether the VIP controller holds the address now (`None`: this node has no VIP), so a
    /// release is confirmed only once the address is gone.
    holding: Mutex<Option<watch::Receiver<bool>>>,
}

impl HandOver {
    /// No hand-over under way on node `me`.
    pub fn new(me: u64) -> Arc<Self> {
        Arc::new(HandOver {
            me,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            aside: watch::channel(false).0,
            holding: Mutex::new(None),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// True while the VIP controller should let go by stepping aside (see
    /// `VipController::with_step_aside`).
    pub fn stepping_aside(&self) -> watch::Receiver<bool> {
        self.aside.subscribe()
    }

    /// A receiver that changes whenever the hand-over state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells the hand-over whether the VIP controller holds the address (the daemon passes the
    /// controller's status), so [`Self::release`] answers only once it is gone.
    pub fn watch_vip(&self, holding: watch::Receiver<bool>) {
        *self.holding.lock().unwrap_or_else(PoisonError::into_inner) = Some(holding);
    }

    /// This leader starts handing over to `to`, holding for at most `hold` from now. Take this
    /// *before* sending the notices: the hold must end no later than anyone else's block.
    pub fn begin(&self, to: u64, hold: Duration) -> Instant {
        let until = Instant::now() + hold;
        self.state().outgoing = Some(Side { to, until, released: None });
        self.bump();
        until
    }

    /// The hand-over this node started is over (done or given up): the hold ends now.
    pub fn end(&self) {
        self.state().outgoing = None;
        self.aside.send_replace(false);
        self.bump();
    }

    /// Node `from` announced a hand-over to `to` lasting `hold` (from now, on this node's
    /// clock — no earlier than on `from`'s).
    pub fn noticed(&self, from: u64, to: u64, hold: Duration) {
        let until = Instant::now() + hold;
        self.state().incoming = Some((from, Side { to, until, released: None }));
        self.bump();
    }

    /// The successor takes the VIP over: this node's hold ends now, and the controller lets
    /// go by stepping aside when this node was handing over. Follow with [`Self::let_go`].
    pub fn release(&self) {
        let now = Instant::now();
        let handing_over = {
            let mut state = self.state();
            match state.outgoing.as_mut() {
                Some(out) => {
                    out.released = Some(out.released.unwrap_or(now));
                    true
                }
                None => false,
            }
        };
        if handing_over {
            self.aside.send_replace(true);
        }
        self.bump();
    }

    /// Waits (at most `within`) until the VIP controller no longer holds the address. `true`
    /// once it does not (or this node has no VIP).
    pub async fn let_go(&self, within: Duration) -> bool {
        let holding = self.holding.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let Some(mut holding) = holding else { return true };
        tokio::time::timeout(within, holding.wait_for(|held| !*held)).await.is_ok_and(|r| r.is_ok())
    }

    /// The node that handed over confirmed that it let go of the VIP.
    pub fn released_by(&self, from: u64) {
        let mut state = self.state();
        if let Some((f, side)) = state.incoming.as_mut() {
            if *f == from {
                side.released = Some(Instant::now());
            }
        }
        drop(state);
        self.bump();
    }

    /// Whether the successor of this node's hand-over asked for the VIP (the hand-over is done).
    pub fn successor_asked(&self) -> bool {
        self.state().outgoing.is_some_and(|s| s.released.is_some())
    }

    /// A hand-over to another node is under way: this node must not stand, nor grant a
    /// pre-vote to anyone but the successor. `Some(successor)` while it lasts.
    pub fn successor(&self, now: Instant) -> Option<u64> {
        let state = self.state();
        let incoming = state.incoming.filter(|(_, s)| now < s.until).map(|(_, s)| s.to);
        let outgoing = state.outgoing.filter(|s| now < s.until).map(|s| s.to);
        incoming.or(outgoing)
    }

    /// Whether `candidate` may be granted a pre-vote as far as the hand-over is concerned.
    pub fn may_pre_vote(&self, candidate: u64, now: Instant) -> bool {
        self.successor(now).is_none_or(|to| to == candidate)
    }

    /// Whether this node is the successor of a hand-over under way (it stands at once).
    pub fn is_successor(&self, now: Instant) -> bool {
        self.successor(now) == Some(self.me)
    }

    /// The node to ask for the VIP: a hand-over from it is under way and it has not confirmed
    /// its release yet.
    pub fn pending_release(&self, now: Instant) -> Option<u64> {
        self.state().incoming.filter(|(_, s)| s.active(now)).map(|(from, _)| from)
    }

    /// What the hand-over means for the VIP at `now`.
    pub fn vip(&self, now: Instant) -> VipView {
        let state = self.state();
        VipView {
            hold_until: state.outgoing.filter(|s| s.active(now)).map(|s| s.end()),
            block_until: state.incoming.filter(|(_, s)| s.active(now)).map(|(_, s)| s.end()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_millis(450);

    #[test]
    fn the_leader_holds_until_asked_or_until_the_deadline() {
        let h = HandOver::new(1);
        let now = Instant::now();
        assert_eq!(h.vip(now), VipView::default());
        let until = h.begin(2, H);
        assert_eq!(h.vip(now).hold_until, Some(until));
        assert_eq!(h.vip(until).hold_until, None, "never past the deadline");
        let aside = h.stepping_aside();
        h.release();
        assert_eq!(h.vip(Instant::now() + Duration::from_millis(1)).hold_until, None, "asked: let go");
        assert!(h.successor_asked());
        assert!(*aside.borrow(), "handing over: step aside, not delete");
        h.end();
        assert!(!*aside.borrow(), "a later loss of the lease deletes as usual");
    }

    #[test]
    fn others_block_their_claim_until_the_release_is_confirmed_or_the_hold_ran_out() {
        let h = HandOver::new(2);
        h.noticed(1, 2, H);
        let now = Instant::now();
        let block = h.vip(now).block_until.expect("blocked");
        assert!(block >= now + H - Duration::from_millis(50));
        assert_eq!(h.pending_release(now), Some(1));
        h.released_by(3); // not the one handing over: nothing changes
        assert!(h.vip(now).block_until.is_some());
        h.released_by(1);
        let after = Instant::now() + Duration::from_millis(1);
        assert_eq!(h.vip(after).block_until, None);
        assert_eq!(h.pending_release(after), None);
        assert_eq!(h.vip(block).block_until, None);
    }

    #[test]
    fn only_the_successor_stands_or_gets_pre_votes_while_it_lasts() {
        let h = HandOver::new(3);
        let now = Instant::now();
        assert!(h.may_pre_vote(3, now));
        h.noticed(1, 2, H);
        assert!(h.may_pre_vote(2, now));
        assert!(!h.may_pre_vote(3, now));
        assert!(!h.is_successor(now));
        let later = now + H + Duration::from_millis(100);
        assert!(h.may_pre_vote(3, later), "a hand-over that ran out binds no one");
        let n = HandOver::new(2);
        n.noticed(1, 2, H);
        assert!(n.is_successor(Instant::now()));
    }

    #[tokio::test]
    async fn letting_go_waits_until_the_address_is_gone() {
        let h = HandOver::new(1);
        h.begin(2, H);
        let (tx, rx) = watch::channel(true);
        h.watch_vip(rx);
        let h2 = h.clone();
        let answer = tokio::spawn(async move { h2.let_go(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        assert!(!answer.is_finished());
        tx.send_replace(false);
        assert!(answer.await.expect("task"));
        let stuck = HandOver::new(1);
        stuck.watch_vip(watch::channel(true).1);
        assert!(!stuck.let_go(Duration::from_millis(10)).await, "still holding: not confirmed");
    }
}
