//! Several VIPs spread over the data nodes (`[vip] addresses`): who holds which, and the lease
//! under which a node may have one on its interface.
//!
//! The single `[vip] address` is the leader's ([`crate::lease`]); this module is for the list.
//! Every VIP has one slot in the replicated state ([`VipSlot`]): the node named to hold it, or
//! nobody while it moves. The leader names holders ([`plan`], run by [`run_planner`]); each
//! data node renews its right to hold what it was named for ([`run_holder`]); every voter
//! answers those renewals ([`Ledger`]).
//!
//! # The lease: renewed by a majority of voters, not by the leader
//!
//! Every heartbeat a data node X sends each voter a [`Renewal`] naming the VIPs the state gives
//! it, and notes the send time `t`. A voter acknowledges a VIP only while *its own* applied
//! state names X for it, and notes when it did. Once a majority of voters acknowledged a VIP,
//! X may hold it until `t + lease − one heartbeat` (the lease is election max, 150 ms by
//! default). Why a majority and not the leader: a leader that dies takes a lease with it, and
//! every other node would drop its VIPs while the cluster elects a new one (150–175 ms). With
//! a majority, the surviving nodes keep renewing each other through an election, and a kill of
//! the leader moves only the leader's VIPs.
//!
//! # Moving a VIP: suspend, wait out the lease, name the next holder
//!
//! A VIP never goes from one holder to another in one step ([`crate::Command::SetVipHolder`]
//! rejects it): the leader first *suspends* it (no holder). A voter that applied the
//! suspension acknowledges X for it no more. The leader then asks the voters when they last
//! acknowledged X for that VIP (each answers only once it applied the suspension); with a
//! majority of answers it knows X's last majority-acknowledged renewal was sent no later than
//! the latest of those acknowledgements (every majority that could have acknowledged X shares
//! a voter with the one that answered), so X lets go by that time + the lease. Only then does
//! it name the next holder, which claims as soon as a majority acknowledged it in turn. So no
//! instant has two live holders, whatever fails: a cut-off holder cannot gather a majority and
//! lets go by itself; a dead one's acknowledgements have simply stopped. `vrrp/LIFECYCLE.md`
//! has the argument with the timings.
//!
//! A failover therefore takes the lease after the dead holder's last acknowledgement (the
//! leader notices a node is gone after [`DEAD_AFTER_TICKS`] heartbeats without a renewal,
//! well inside that wait), plus two commits and one renewal round: ≈ 150–170 ms by default.
//! A holder that is still alive and sees its VIP suspended steps aside at once (the address
//! moves to `lo`, where it still serves packets sent to it but answers no ARP), so a planned
//! move fails no request.
//!
//! # Spreading
//!
//! The leader names, for an unheld VIP, the live data voter that lists it in its own
//! `[vip] addresses` and holds the fewest VIPs (ties: the lowest id). A node lists them in its
//! renewals only while it offers to carry them ([`Offer`]): once its data plane serves the
//! replicated config, and until a planned stop begins. A node that comes back
//! takes nothing from others unless `preempt` is set on the leader; then the leader moves one
//! VIP at a time from the busiest node to the idlest until they differ by at most one.
//! Witnesses and learners never hold one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{Command, NodeId, Proposal};
use crate::network::{NetworkFactory, PeerClient};
use crate::state::ClusterState;
use crate::types::{NodeInfo, Raft};

/// A leader counts a data node as gone after this many heartbeats without a renewal from it.
pub const DEAD_AFTER_TICKS: u32 = 3;

/// For at most this long after a data node joins, the leader moves VIPs to it until it holds
/// its share (an even spread's), `preempt` or not.
pub const JOINED_SHARE_WITHIN: Duration = Duration::from_secs(60);

/// One spread VIP in the replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipSlot {
    /// The node named to hold it; `None` while it moves (suspended) or before it was first named.
    pub holder: Option<NodeId>,
    /// The holder before the last suspension: its lease must have ended before another node is
    /// named.
    pub released_by: Option<NodeId>,
    /// Log index of that suspension.
    pub suspended_at: u64,
    /// With a suspension by `keel cluster vip move`: the node to name next.
    pub move_to: Option<NodeId>,
}

/// A data node's renewal, sent to every voter each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    /// The sender.
    pub from: NodeId,
    /// The VIPs the sender's state names it for: the ones to acknowledge.
    pub holds: Vec<IpAddr>,
    /// Every VIP of the sender's `[vip] addresses`: what the leader may name it for.
    pub carries: Vec<IpAddr>,
}

/// What a voter saw of one data node.
#[derive(Clone, Debug)]
pub struct Seen {
    /// When its last renewal arrived.
    pub at: Instant,
    /// The VIPs it can carry, as it said then.
    pub carries: Vec<IpAddr>,
}

/// A voter's side of the lease: which renewals it acknowledged and when. Every node keeps one
/// (a leader plans from it; every voter answers from it).
pub struct Ledger {
    inner: Mutex<LedgerInner>,
    /// When this process started listening: before a few heartbeats passed, silence proves
    /// nothing.
    started: Instant,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger { inner: Mutex::default(), started: Instant::now() }
    }
}

#[derive(Default)]
struct LedgerInner {
    seen: HashMap<NodeId, Seen>,
    acked: HashMap<(NodeId, IpAddr), Instant>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Arc<Self> {
        Arc::new(Ledger::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LedgerInner> {
        // A poisoned lock only means a panic elsewhere mid-update; the maps stay usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers a renewal at `now` against this voter's applied `state`: the VIPs it
    /// acknowledges (those its state names the sender for).
    pub fn renew(&self, renewal: &Renewal, state: &ClusterState, now: Instant) -> Vec<IpAddr> {
        let acked: Vec<IpAddr> = renewal
            .holds
            .iter()
            .copied()
            .filter(|vip| state.vips.get(vip).is_some_and(|s| s.holder == Some(renewal.from)))
            .take(MAX_VIPS)
            .collect();
        let mut inner = self.lock();
        let carries = renewal.carries.iter().copied().take(MAX_VIPS).collect();
        // A bound on what peers can make a voter remember (a cluster has a handful of nodes).
        if inner.seen.len() < MAX_NODES || inner.seen.contains_key(&renewal.from) {
            inner.seen.insert(renewal.from, Seen { at: now, carries });
        }
        for vip in &acked {
            inner.acked.insert((renewal.from, *vip), now);
        }
        acked
    }

    /// How long ago this voter last acknowledged `node` for `vip` — `Some(Duration::MAX)` if
    /// never — once its applied `state` no longer names `node` for it (so that answer is
    /// final); `None` while it still does.
    pub fn last_ack(&self, node: NodeId, vip: IpAddr, state: &ClusterState, now: Instant) -> Option<Duration> {
        if state.vips.get(&vip).is_some_and(|s| s.holder == Some(node)) {
            return None;
        }
        Some(self.lock().acked.get(&(node, vip)).map_or(Duration::MAX, |at| now.saturating_duration_since(*at)))
    }

    /// How long this ledger has been listening.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// The last renewal seen from every data node.
    pub fn seen(&self) -> HashMap<NodeId, Seen> {
        self.lock().seen.clone()
    }
}

/// The most VIPs a renewal may name (anything beyond is ignored): a bound on what a peer's
/// message can make a voter store.
pub const MAX_VIPS: usize = 256;

/// The most data nodes a voter keeps renewals of.
const MAX_NODES: usize = 1024;

/// One step [`plan`] decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Take `vip` from its holder (`move_to`: whom to name next).
    Suspend {
        /// The VIP.
        vip: IpAddr,
        /// Its holder now.
        from: NodeId,
        /// The node to name next, if an operator or `preempt` chose one.
        move_to: Option<NodeId>,
        /// Why, for the log.
        why: &'static str,
    },
    /// Name `to` for `vip`, once the previous holder's lease has certainly ended.
    Name {
        /// The VIP.
        vip: IpAddr,
        /// Its next holder.
        to: NodeId,
        /// The previous holder whose lease must have ended first.
        after: Option<NodeId>,
    },
}

/// The inputs of [`plan`]: what the leader knows.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The spread VIPs in the applied state.
    pub slots: BTreeMap<IpAddr, VipSlot>,
    /// Live data voters (renewed within [`DEAD_AFTER_TICKS`] heartbeats, or the leader itself)
    /// and the VIPs each can carry.
    pub live: BTreeMap<NodeId, BTreeSet<IpAddr>>,
    /// Data voters (live or not): the only nodes that may hold a VIP.
    pub data_voters: BTreeSet<NodeId>,
    /// Move VIPs back to an even spread.
    pub preempt: bool,
    /// Data voters that joined while this leader led: they take their share even without
    /// `preempt` (a node added to scale out is not a node coming back).
    pub joined: BTreeSet<NodeId>,
}

/// The leader's next steps for the spread VIPs: empty when every VIP that some live node can
/// carry is held by a live node that carries it (and, with `preempt`, evenly). Suspensions
/// come first, then namings (each counted as held when choosing the next), then at most one
/// preemptive move. Pure: the leader's loop ([`run_planner`]) turns actions into commands and
/// waits out leases.
pub fn plan(view: &View) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut counts: BTreeMap<NodeId, usize> = view.live.keys().map(|n| (*n, 0)).collect();
    for slot in view.slots.values() {
        if let Some(h) = slot.holder {
            *counts.entry(h).or_default() += 1;
        }
    }
    // 1. A holder that is gone, no longer a data voter, or no longer carries the VIP.
    let mut unheld: Vec<(IpAddr, Option<NodeId>, Option<NodeId>)> = Vec::new();
    for (vip, slot) in &view.slots {
        let Some(holder) = slot.holder else {
            unheld.push((*vip, slot.released_by, slot.move_to));
            continue;
        };
        let why = if !view.data_voters.contains(&holder) {
            Some("its holder is no longer a data voter")
        } else {
            match view.live.get(&holder) {
                None => Some("its holder stopped renewing"),
                Some(carries) if !carries.contains(vip) => Some("its holder no longer lists it"),
                Some(_) => None,
            }
        };
        if let Some(why) = why {
            actions.push(Action::Suspend { vip: *vip, from: holder, move_to: None, why });
        }
    }
    // 2. An unheld VIP (suspended, or listed by a node and not yet in the state).
    let listed: BTreeSet<IpAddr> = view.live.values().flatten().copied().collect();
    unheld.extend(listed.iter().filter(|v| !view.slots.contains_key(v)).map(|v| (*v, None, None)));
    for (vip, after, move_to) in unheld {
        let able = |n: &NodeId| view.live.get(n).is_some_and(|c| c.contains(&vip));
        let idlest = || counts.iter().filter(|(n, _)| able(n)).min_by_key(|(n, c)| (**c, **n)).map(|(n, _)| *n);
        if let Some(to) = move_to.filter(able).or_else(idlest) {
            *counts.entry(to).or_default() += 1;
            actions.push(Action::Name { vip, to, after });
        }
    }
    // 3. Once nothing else is to do: one VIP from the busiest node to the idlest one that
    //    carries it — any node with preempt, else only a node that joined.
    if actions.is_empty() {
        for (vip, slot) in &view.slots {
            let Some(from) = slot.holder else { continue };
            let count = |n: NodeId| counts.get(&n).copied().unwrap_or(0);
            let idlest = view
                .live
                .iter()
                .filter(|(n, c)| **n != from && c.contains(vip) && (view.preempt || view.joined.contains(n)))
                .map(|(n, _)| *n)
                .min_by_key(|n| (count(*n), *n));
            if let Some(to) = idlest.filter(|to| count(from) > count(*to) + 1) {
                let why = if view.preempt { "preempt: spreading evenly" } else { "a node joined: giving it its share" };
                actions.push(Action::Suspend { vip: *vip, from, move_to: Some(to), why });
                break;
            }
        }
    }
    actions
}

/// A VIP's hold verdict on this node, published by [`run_holder`] for the VIP's controller.
#[derive(Clone, Debug)]
pub struct VipLease {
    /// The VIP.
    pub vip: IpAddr,
    /// True while this node may have it on its interface.
    pub hold: watch::Receiver<bool>,
    /// True while letting go should step aside (the cluster moved it away) rather than delete.
    pub aside: watch::Receiver<bool>,
}

/// The per-VIP deadlines of [`run_holder`]: pure bookkeeping, tested without a network.
#[derive(Clone, Debug, Default)]
pub struct Deadlines {
    until: BTreeMap<IpAddr, Instant>,
}

impl Deadlines {
    /// A majority acknowledged `vip` for a renewal sent at `sent`: hold until then + `lease` −
    /// `margin`. Deadlines move forward only.
    pub fn acked(&mut self, vip: IpAddr, sent: Instant, lease: Duration, margin: Duration) {
        let until = sent + lease.saturating_sub(margin);
        let entry = self.until.entry(vip).or_insert(until);
        if until > *entry {
            *entry = until;
        }
    }

    /// Forgets `vip`'s deadline (the state no longer names this node for it): a later naming
    /// starts from a new majority, never from an old deadline.
    pub fn forget(&mut self, vip: IpAddr) {
        self.until.remove(&vip);
    }

    /// Whether `vip` may be held at `now`.
    pub fn holds(&self, vip: IpAddr, now: Instant) -> bool {
        self.until.get(&vip).is_some_and(|u| now < *u)
    }

    /// The earliest deadline still ahead of `now`.
    pub fn next(&self, now: Instant) -> Option<Instant> {
        self.until.values().copied().filter(|u| *u > now).min()
    }
}

/// The voters in this node's applied membership, with their records.
fn voters(raft: &Raft) -> Vec<(NodeId, NodeInfo)> {
    let m = raft.metrics();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone()))).collect()
}

/// Timings of the VIP loops, from the cluster's.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// Renewal and planning period: the heartbeat.
    pub tick: Duration,
    /// The lease: election max.
    pub lease: Duration,
}

/// What [`holder`] reads: the node's Raft, its applied state, its ledger (for its own
/// acknowledgement), its peers, the timings, and the planned-stop flag.
pub struct HolderInputs {
    /// The node's Raft (membership).
    pub raft: Raft,
    /// The applied state.
    pub state: watch::Receiver<Arc<ClusterState>>,
    /// This node's ledger.
    pub ledger: Arc<Ledger>,
    /// Clients to the other voters.
    pub peers: NetworkFactory,
    /// Tick and lease.
    pub timings: Timings,
    /// Whether this node offers to carry its VIPs now; while it does not, its renewals list
    /// none, so the leader names it for nothing and moves away what it holds.
    pub offer: watch::Receiver<Offer>,
}

/// Whether a data node offers to carry its spread VIPs: only once its data plane serves the
/// replicated config, and no longer once a planned stop began. A node that lists its VIPs
/// while its listeners are still being bound would be named, claim the address, and refuse
/// the connections the LAN sends it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// The data plane serves the replicated config (its listeners are bound).
    pub serving: bool,
    /// A planned stop began: every VIP goes to the other nodes.
    pub leaving: bool,
}

impl Offer {
    /// Whether the renewals list this node's VIPs.
    pub fn open(self) -> bool {
        self.serving && !self.leaving
    }
}

/// On a data node with `[vip] addresses`: renews this node's leases every heartbeat and
/// publishes, per VIP it carries, whether it may hold it now. Spawn the future on the VIP's own
/// thread (as [`crate::lease::follow`]): a stalled Raft thread must not keep a VIP. It ends when
/// the state sender is gone (every VIP then reads "let go").
pub fn holder(
    me: NodeId,
    carries: Vec<IpAddr>,
    inputs: HolderInputs,
) -> (Vec<VipLease>, impl std::future::Future<Output = ()> + Send) {
    let HolderInputs { raft, mut state, ledger, peers, timings, mut offer } = inputs;
    let mut channels = BTreeMap::new();
    let mut leases = Vec::new();
    for vip in &carries {
        let (hold_tx, hold) = watch::channel(false);
        let (aside_tx, aside) = watch::channel(false);
        channels.insert(*vip, (hold_tx, aside_tx));
        leases.push(VipLease { vip: *vip, hold, aside });
    }
    let run = async move {
        let mut deadlines = Deadlines::default();
        let mut clients: HashMap<NodeId, PeerClient> = HashMap::new();
        let mut round: Option<Round> = None;
        let mut next_round = tokio::time::Instant::now();
        let mut offer_gone = false;
        loop {
            let st = state.borrow_and_update().clone();
            let mine: Vec<IpAddr> =
                carries.iter().copied().filter(|v| st.vips.get(v).is_some_and(|s| s.holder == Some(me))).collect();
            let now = Instant::now();
            for vip in &carries {
                let named = mine.contains(vip);
                if !named {
                    deadlines.forget(*vip);
                }
                let hold = named && deadlines.holds(*vip, now);
                if let Some((hold_tx, aside_tx)) = channels.get(vip) {
                    // Moved away by the cluster while this node is alive: step aside.
                    let aside = !named;
                    aside_tx.send_if_modified(|a| std::mem::replace(a, aside) != aside);
                    hold_tx.send_if_modified(|h| {
                        if *h == hold {
                            return false;
                        }
                        let why = match (hold, named) {
                            (true, _) => "granted: a majority of voters acknowledged it",
                            (false, false) => "ended: the cluster moved it away",
                            (false, true) => "ended: no majority acknowledged it within the lease",
                        };
                        tracing::info!(target: "keel::vip", %vip, hold, "VIP lease {why}");
                        *h = hold;
                        true
                    });
                }
            }
            if round.is_none() && tokio::time::Instant::now() >= next_round {
                let voters = voters(&raft);
                let sent = Instant::now();
                // Not offering (not serving yet, or a planned stop): list nothing, so the leader
                // names this node for nothing and moves away what it holds, while the renewals
                // keep the lease until each move is applied here.
                let listed = if offer.borrow().open() { carries.clone() } else { Vec::new() };
                let renewal = Renewal { from: me, holds: mine.clone(), carries: listed };
                let mut r =
                    Round { sent, acks: HashMap::new(), voters: voters.len(), calls: tokio::task::JoinSet::new() };
                if voters.iter().any(|(id, _)| *id == me) {
                    for vip in ledger.renew(&renewal, &st, sent) {
                        r.ack(vip, &mut deadlines, timings);
                    }
                }
                for (id, node) in voters.into_iter().filter(|(id, _)| *id != me) {
                    let mut client = match clients.remove(&id) {
                        Some(c) => c,
                        None => {
                            use openraft::network::RaftNetworkFactory;
                            peers.clone().new_client(id, &node).await
                        }
                    };
                    let renewal = renewal.clone();
                    let ttl = timings.tick;
                    r.calls.spawn(async move {
                        let acked = client.renew_vips(renewal, ttl).await;
                        (id, client, acked)
                    });
                }
                next_round = tokio::time::Instant::from_std(sent) + timings.tick;
                round = Some(r);
                continue; // publish what the local acknowledgement granted
            }
            let wake = deadlines.next(Instant::now()).map(tokio::time::Instant::from_std);
            let round_end = next_round;
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        for (hold_tx, _) in channels.values() {
                            hold_tx.send_replace(false);
                        }
                        return;
                    }
                    // Named for a VIP it does not hold yet: renew at once, not a tick later.
                    let st = state.borrow().clone();
                    let newly = carries.iter().any(|v| {
                        st.vips.get(v).is_some_and(|s| s.holder == Some(me)) && !mine.contains(v)
                    });
                    // A round in flight asked for the old set (and may be waiting for a cut-off
                    // voter until its end): start over with one that names the new VIP too.
                    if newly {
                        round = None;
                        next_round = tokio::time::Instant::now();
                    }
                }
                done = async { match round.as_mut() {
                    Some(r) => r.calls.join_next().await,
                    None => std::future::pending().await,
                } } => match done {
                    Some(Ok((id, client, acked))) => {
                        clients.insert(id, client);
                        if let Some(r) = round.as_mut() {
                            for vip in acked.into_iter().filter(|v| mine.contains(v)) {
                                r.ack(vip, &mut deadlines, timings);
                            }
                        }
                    }
                    Some(Err(_)) => {}
                    None => round = None,
                },
                r = offer.changed(), if round.is_none() && !offer_gone => {
                    match r {
                        Ok(()) => next_round = tokio::time::Instant::now(), // tell the leader at once
                        Err(_) => offer_gone = true,
                    }
                }
                () = tokio::time::sleep_until(round_end) => {
                    // Unanswered calls of this round count for nothing; their clients reconnect.
                    round = None;
                }
                () = async { match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                } } => {}
            }
        }
    };
    (leases, run)
}

/// One renewal round of [`holder`].
struct Round {
    sent: Instant,
    acks: HashMap<IpAddr, usize>,
    voters: usize,
    calls: tokio::task::JoinSet<(NodeId, PeerClient, Vec<IpAddr>)>,
}

impl Round {
    fn ack(&mut self, vip: IpAddr, deadlines: &mut Deadlines, timings: Timings) {
        let n = self.acks.entry(vip).or_default();
        *n += 1;
        if *n * 2 > self.voters {
            // One heartbeat early, as the leader's lease: checked a tick late, still in time.
            deadlines.acked(vip, self.sent, timings.lease, timings.tick);
        }
    }
}

/// On every node: while it leads, names and moves the spread VIPs ([`plan`]), suspending
/// before naming and naming only once the previous holder's lease has certainly ended.
pub async fn run_planner(
    raft: Raft,
    state: watch::Receiver<Arc<ClusterState>>,
    ledger: Arc<Ledger>,
    peers: NetworkFactory,
    timings: Timings,
    preempt: bool,
) {
    let mut tick = tokio::time::interval(timings.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // (VIP, previous holder) → when its lease has certainly ended; found by asking the voters.
    let mut cleared: HashMap<(IpAddr, NodeId), Instant> = HashMap::new();
    let mut was_leader = false;
    // Data voters as of the last tick, and the ones that joined since this node leads (with
    // when): they take their share of VIPs, for a while.
    let mut known: BTreeSet<NodeId> = BTreeSet::new();
    let mut joined: HashMap<NodeId, Instant> = HashMap::new();
    // After a committed change the next step is planned at once (a suspension is followed by
    // a naming), not a heartbeat later; bounded so a flapping plan still waits for the tick.
    let mut again = 0u32;
    let mut wake_at: Option<Instant> = None;
    let mut metrics = raft.metrics();
    loop {
        if again == 0 || again > 8 {
            again = 0;
            // A naming that waits out a lease is tried again the moment the lease ends, and a
            // node that becomes leader plans at once (a dead leader's VIPs wait on it).
            let at = wake_at.take();
            tokio::select! {
                _ = tick.tick() => {}
                () = async { match at {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => std::future::pending().await,
                } } => {}
                r = metrics.changed(), if !was_leader => if r.is_err() { return },
            }
        }
        // Every path that does not commit waits for the next tick.
        let streak = std::mem::take(&mut again);
        let (running, leader, data_voters) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let data: BTreeSet<NodeId> =
                membership.voter_ids().filter(|id| membership.get_node(id).is_some_and(|n| !n.witness)).collect();
            (m.running_state.is_ok(), m.state == openraft::ServerState::Leader, data)
        };
        if !running {
            return;
        }
        if !leader {
            if was_leader {
                cleared.clear(); // a later term asks again
                joined.clear();
            }
            was_leader = false;
            known = data_voters;
            continue;
        }
        if was_leader {
            for n in data_voters.difference(&known) {
                joined.insert(*n, Instant::now());
            }
        }
        joined.retain(|n, at| data_voters.contains(n) && at.elapsed() < JOINED_SHARE_WITHIN);
        known = data_voters.clone();
        was_leader = true;
        let st = state.borrow().clone();
        if st.vips.is_empty() && ledger.seen().values().all(|s| s.carries.is_empty()) {
            continue;
        }
        let now = Instant::now();
        let dead_after = timings.tick * DEAD_AFTER_TICKS;
        if ledger.age() < dead_after {
            continue; // a leader that just started has not heard the renewals yet
        }
        let live = ledger
            .seen()
            .into_iter()
            .filter(|(n, s)| data_voters.contains(n) && now.saturating_duration_since(s.at) < dead_after)
            .map(|(n, s)| (n, s.carries.into_iter().collect()))
            .collect();
        // A node that joined is owed its share once, not for a minute: when it holds as many as
        // an even spread gives it, it is a node like any other (one that restarts later takes
        // nothing back).
        let live: BTreeMap<NodeId, BTreeSet<IpAddr>> = live;
        let share = st.vips.len().checked_div(live.len()).unwrap_or(0);
        joined.retain(|n, _| st.vips.values().filter(|s| s.holder == Some(*n)).count() < share.max(1));
        let view =
            View { slots: st.vips.clone(), live, data_voters, preempt, joined: joined.keys().copied().collect() };
        let actions = plan(&view);
        if actions.is_empty() {
            // Nothing to move: every live node that joined holds its share now. From here on it
            // is a node like the others — one that dies and comes back takes nothing back
            // without preempt, even within JOINED_SHARE_WITHIN of its join.
            joined.retain(|n, _| !view.live.contains_key(n));
        }
        let mut committed = false;
        for action in actions {
            let command = match action {
                Action::Suspend { vip, from, move_to, why } => {
                    tracing::info!(target: "keel::vip", %vip, from, ?move_to, "suspending VIP: {why}");
                    Command::SetVipHolder { vip, holder: None, move_to }
                }
                Action::Name { vip, to, after: None } => {
                    tracing::info!(target: "keel::vip", %vip, to, "naming a holder for VIP");
                    Command::SetVipHolder { vip, holder: Some(to), move_to: None }
                }
                Action::Name { vip, to, after: Some(from) } => {
                    let ended = match cleared.get(&(vip, from)) {
                        Some(at) => *at,
                        None => match lease_end(&raft, &ledger, &st, &peers, from, vip, timings).await {
                            Some(at) => *cleared.entry((vip, from)).or_insert(at),
                            None => continue, // not every answer final yet: ask again next tick
                        },
                    };
                    if Instant::now() < ended {
                        wake_at = Some(wake_at.map_or(ended, |w| w.min(ended)));
                        continue;
                    }
                    tracing::info!(target: "keel::vip", %vip, from, to, "the previous holder's lease has ended: naming the next");
                    Command::SetVipHolder { vip, holder: Some(to), move_to: None }
                }
            };
            let proposal = Proposal { command, proposed_at_ms: crate::node::now_ms() };
            match tokio::time::timeout(crate::node::PROPOSE_TIMEOUT, raft.client_write(proposal)).await {
                Ok(Ok(resp)) if !resp.data.is_rejected() => committed = true,
                Ok(Ok(resp)) => {
                    tracing::warn!(target: "keel::vip", outcome = ?resp.data, "VIP change rejected");
                    break;
                }
                _ => break, // not leading any more, or no quorum: the next tick sees
            }
        }
        // Entries for VIPs that moved on are not needed any more.
        cleared.retain(|(vip, _), _| st.vips.get(vip).is_some_and(|s| s.holder.is_none()));
        again = if committed { streak + 1 } else { 0 };
    }
}

/// When `from`'s lease on `vip` has certainly ended: the latest last acknowledgement a
/// majority of voters report (each only once it applied the suspension), plus the lease.
/// `None` until a majority gave a final answer.
async fn lease_end(
    raft: &Raft,
    ledger: &Ledger,
    state: &ClusterState,
    peers: &NetworkFactory,
    from: NodeId,
    vip: IpAddr,
    timings: Timings,
) -> Option<Instant> {
    use openraft::network::RaftNetworkFactory;
    let me = raft.metrics().borrow().id;
    let voters = voters(raft);
    let mut answers: Vec<Instant> = Vec::new();
    let latest = |answers: &mut Vec<Instant>, received: Instant, ago: Duration| {
        // "Never acknowledged" (or longer ago than the clock goes back) is as old as it gets.
        answers.push(received.checked_sub(ago).unwrap_or(received.checked_sub(timings.lease).unwrap_or(received)));
    };
    if voters.iter().any(|(id, _)| *id == me) {
        if let Some(ago) = ledger.last_ack(from, vip, state, Instant::now()) {
            latest(&mut answers, Instant::now(), ago);
        }
    }
    let mut asks = tokio::task::JoinSet::new();
    for (id, node) in voters.iter().filter(|(id, _)| *id != me) {
        let mut client = peers.clone().new_client(*id, node).await;
        let ttl = timings.tick * 2;
        asks.spawn(async move { client.vip_last_ack(from, vip, ttl).await.map(|ago| (Instant::now(), ago)) });
    }
    while let Some(answer) = asks.join_next().await {
        if let Ok(Some((received, ago))) = answer {
            latest(&mut answers, received, ago);
        }
        // Any majority's answers will do (it shares a voter with every majority that could
        // have acknowledged `from`): a cut-off voter's timeout is not waited out.
        if answers.len() * 2 > voters.len() {
            break;
        }
    }
    if answers.len() * 2 <= voters.len() {
        return None;
    }
    answers.into_iter().max().map(|last| last + timings.lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn view(slots: &[(&str, Option<u64>)], live: &[(u64, &[&str])]) -> View {
        View {
            slots: slots.iter().map(|(v, h)| (ip(v), VipSlot { holder: *h, ..Default::default() })).collect(),
            live: live.iter().map(|(n, c)| (*n, c.iter().map(|v| ip(v)).collect())).collect(),
            data_voters: live.iter().map(|(n, _)| *n).collect(),
            preempt: false,
            joined: BTreeSet::new(),
        }
    }

    const ALL: &[&str] = &["10.0.0.1", "10.0.0.2", "10.0.0.3"];

    #[test]
    fn new_vips_spread_one_per_node_in_id_order() {
        let mut v = view(&[], &[(1, ALL), (2, ALL), (3, ALL)]);
        let named: Vec<(IpAddr, u64)> = plan(&v)
            .into_iter()
            .map(|a| match a {
                Action::Name { vip, to, after: None } => (vip, to),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(named, vec![(ip("10.0.0.1"), 1), (ip("10.0.0.2"), 2), (ip("10.0.0.3"), 3)]);
        for (vip, to) in named {
            v.slots.insert(vip, VipSlot { holder: Some(to), ..Default::default() });
        }
        assert_eq!(plan(&v), vec![]);
    }

    #[test]
    fn a_gone_holder_is_suspended_and_its_vip_goes_to_the_idlest_survivor() {
        let mut v = view(&[("10.0.0.1", Some(1)), ("10.0.0.2", Some(2)), ("10.0.0.3", Some(3))], &[(2, ALL), (3, ALL)]);
        v.data_voters.insert(1);
        assert_eq!(
            plan(&v),
            vec![Action::Suspend { vip: ip("10.0.0.1"), from: 1, move_to: None, why: "its holder stopped renewing" }]
        );
        v.slots.insert(ip("10.0.0.1"), VipSlot { holder: None, released_by: Some(1), suspended_at: 7, move_to: None });
        assert_eq!(plan(&v), vec![Action::Name { vip: ip("10.0.0.1"), to: 2, after: Some(1) }]);
    }

    #[test]
    fn a_node_that_comes_back_takes_nothing_without_preempt() {
        let mut v = view(
            &[("10.0.0.1", Some(2)), ("10.0.0.2", Some(2)), ("10.0.0.3", Some(3))],
            &[(1, ALL), (2, ALL), (3, ALL)],
        );
        assert_eq!(plan(&v), vec![]);
        v.preempt = true;
        assert_eq!(
            plan(&v),
            vec![Action::Suspend { vip: ip("10.0.0.1"), from: 2, move_to: Some(1), why: "preempt: spreading evenly" }]
        );
        // A node that joined (scaling out) takes its share without preempt.
        v.preempt = false;
        v.joined.insert(1);
        assert_eq!(
            plan(&v),
            vec![Action::Suspend {
                vip: ip("10.0.0.1"),
                from: 2,
                move_to: Some(1),
                why: "a node joined: giving it its share"
            }]
        );
    }

    #[test]
    fn only_nodes_that_list_a_vip_are_named_for_it_and_witnesses_never() {
        // Node 1 lists only .1; node 3 is a witness (not a data voter, never live here).
        let v = view(&[("10.0.0.2", None)], &[(1, &["10.0.0.1"]), (2, &["10.0.0.2"])]);
        assert_eq!(
            plan(&v),
            vec![
                Action::Name { vip: ip("10.0.0.2"), to: 2, after: None },
                Action::Name { vip: ip("10.0.0.1"), to: 1, after: None }
            ]
        );
        let none = view(&[("10.0.0.3", None)], &[(1, &["10.0.0.1"])]);
        // .1 is listed and new: named; .3 is listed by nobody: stays unheld.
        assert_eq!(plan(&none), vec![Action::Name { vip: ip("10.0.0.1"), to: 1, after: None }]);
    }

    #[test]
    fn an_operator_move_names_its_target() {
        let mut v = view(&[("10.0.0.1", None)], &[(1, &["10.0.0.1"]), (2, &["10.0.0.1"]), (3, &["10.0.0.1"])]);
        v.slots.get_mut(&ip("10.0.0.1")).unwrap().move_to = Some(3);
        v.slots.get_mut(&ip("10.0.0.1")).unwrap().released_by = Some(1);
        assert_eq!(plan(&v), vec![Action::Name { vip: ip("10.0.0.1"), to: 3, after: Some(1) }]);
    }

    #[test]
    fn a_voter_acknowledges_only_what_its_state_names_and_answers_last_acks_once_suspended() {
        let ledger = Ledger::new();
        let mut state = ClusterState::default();
        state.vips.insert(ip("10.0.0.1"), VipSlot { holder: Some(1), ..Default::default() });
        let t0 = Instant::now();
        let r = Renewal {
            from: 1,
            holds: vec![ip("10.0.0.1"), ip("10.0.0.2")],
            carries: ALL.iter().map(|v| ip(v)).collect(),
        };
        assert_eq!(ledger.renew(&r, &state, t0), vec![ip("10.0.0.1")]);
        assert_eq!(ledger.last_ack(1, ip("10.0.0.1"), &state, t0), None, "still named: no final answer");
        state.vips.get_mut(&ip("10.0.0.1")).unwrap().holder = None;
        assert_eq!(
            ledger.last_ack(1, ip("10.0.0.1"), &state, t0 + Duration::from_millis(40)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(ledger.renew(&r, &state, t0 + Duration::from_millis(50)), Vec::<IpAddr>::new());
        assert_eq!(ledger.last_ack(1, ip("10.0.0.2"), &state, t0), Some(Duration::MAX));
        assert_eq!(ledger.seen()[&1].carries.len(), 3);
    }

    #[test]
    fn deadlines_move_forward_only_and_end_on_time() {
        let t0 = Instant::now();
        let mut d = Deadlines::default();
        let vip = ip("10.0.0.1");
        d.acked(vip, t0 + Duration::from_millis(20), Duration::from_millis(150), Duration::from_millis(20));
        d.acked(vip, t0, Duration::from_millis(150), Duration::from_millis(20)); // a late answer to an older round
        assert!(d.holds(vip, t0 + Duration::from_millis(149)));
        assert!(!d.holds(vip, t0 + Duration::from_millis(150)));
        assert_eq!(d.next(t0), Some(t0 + Duration::from_millis(150)));
        d.forget(vip);
        assert!(!d.holds(vip, t0));
    }
}
