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
//! 4. `N`, leading with a quorum, tells `L` it takes the VIP over ([`RpcRequest::Release`]).
//!    `L` answers at once and deletes its address [`LET_GO_AFTER`] (5 ms) later; `N` claims
//!    and announces on the answer. So the switch is *make-before-break*: every SYN a client
//!    sends reaches a node that has the address, and answers `L` is writing when the
//!    clients' ARP entries flip still leave from the address they belong to. Deleting first
//!    (break-before-make) lost one probe in each of the first two trials: a SYN sent into the
//!    sub-millisecond gap is dropped and retried only after the client's 1 s SYN timeout, and
//!    a connection `L` had just accepted could no longer be answered.
//!
//! # Why no two nodes hold the VIP at once
//!
//! `L` holds under the hand-over until [`LET_GO_AFTER`] after `N` asked, or until `t0 + H` on
//! its own monotonic clock, `t0` taken *before* the notices were sent, whichever comes first;
//! it never holds past that. The one overlap is deliberate and bounded: for those 5 ms both
//! `L` (no longer leading, with in-flight answers to finish) and `N` have the address, and `N`
//! has just announced itself, so the LAN's ARP entries point at `N`; `N` re-announces four
//! more times over the next 400 ms, which corrects any host that asked in those 5 ms and got
//! `L`'s answer. Every other node that learns of the hand-over blocks its own claim until `L`
//! said "go ahead" to it or until `H` after it heard of it (later than `t0 + H`). A node that never
//! heard of it cannot lead before `t0 + H`: it needs a pre-vote majority, every majority shares
//! a voter with the majority that acknowledged the notice, and that voter grants pre-votes to
//! `N` alone until `H` after it acknowledged. (Data nodes stand only through the pre-vote; a
//! witness stands after 4 leases of silence and also waits out the hand-over; witnesses never
//! hold the VIP.) So the VIP moves either on `L`'s confirmed release, or after `L`'s hold has
//! certainly ended — the two rules of any VIP move.
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
    /// Outgoing: the successor asked, and this node lets go at this instant. Incoming: the
    /// node handing over said "go ahead" (the instant it was heard).
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

/// How long the node handing over keeps the address after its successor announced itself:
/// answers it is writing on connections it accepted before the switch still reach their
/// clients (a request already read is answered; the client's next packets go to the
/// successor). Well below the VIP monitor's 10 ms sampling and a LAN host's ARP timers.
pub const LET_GO_AFTER: Duration = Duration::from_millis(5);

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
            holding: Mutex::new(None),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
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
        self.bump();
    }

    /// Node `from` announced a hand-over to `to` lasting `hold` (from now, on this node's
    /// clock — no earlier than on `from`'s).
    pub fn noticed(&self, from: u64, to: u64, hold: Duration) {
        let until = Instant::now() + hold;
        self.state().incoming = Some((from, Side { to, until, released: None }));
        self.bump();
    }

    /// The successor takes the VIP over: this node's hold ends [`LET_GO_AFTER`] from now (or
    /// now, if it is not handing over). Answered at once, so the successor claims while this
    /// node still has the address: the switch is make-before-break, by [`LET_GO_AFTER`].
    pub fn release(&self) {
        let at = Instant::now() + LET_GO_AFTER;
        if let Some(out) = self.state().outgoing.as_mut() {
            out.released = Some(out.released.map_or(at, |t| t.min(at)));
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
        h.release();
        let let_go = h.vip(Instant::now()).hold_until.expect("still held a moment");
        assert!(let_go <= Instant::now() + LET_GO_AFTER);
        assert_eq!(h.vip(let_go).hold_until, None, "asked: let go right after");
        assert!(h.successor_asked());
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
