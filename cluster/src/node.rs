//! One running cluster member: [`ClusterNode::start`] opens the store, binds the Raft port,
//! starts openraft and returns the [`ClusterHandle`] the rest of keel talks to.
//!
//! # Timing profiles (LAN)
//!
//! | setting | `default` | `fast` | why |
//! |---|---|---|---|
//! | heartbeat | 20 ms | 10 ms | openraft ticks every 1.5 heartbeats and sends a heartbeat on each tick (every 30 / 15 ms) |
//! | election timeout | 100–150 ms | 30–40 ms | min ≥ 3 heartbeats (enforced); with keel's elections only the max matters, as the lease |
//! | leader lease | = election max (150 / 40 ms) | | openraft: followers refuse votes for that long after a heartbeat |
//!
//! # Elections
//!
//! Data nodes run with openraft's `enable_elect = false`; [`election_watchdog`] decides when to
//! stand, and stands only after a **pre-vote** (which openraft 0.9 lacks): it asks every other
//! voter over the Raft connection whether it would grant its vote now — yes only if that voter
//! has not heard from a leader for the lease less one heartbeat and the candidate's log is as
//! long as its own — and stands only with a majority of yeses. Asking changes no term and no
//! vote, so a node cut off from the others never raises the term while it is away and deposes
//! no healthy leader when its link returns (chaos `heal`: a 5 s cut left the term at 1; without
//! the pre-vote it came back at 16). A peer that cannot be asked (a cut link, a node of an older
//! version that does not know the request) counts as a no. openraft's own timer let a follower stand after lease + a random election timeout,
//! checked on its 1.5-heartbeat tick; the two followers of a three-node cluster often stood on
//! the same tick and split the vote (`fast` used to lose 100–250 ms that way in 1 run of 4). The
//! watchdog notes every AppendEntries and every granted vote (`noting_leader_contact`), polls
//! every fifth of a heartbeat, and lets the surviving voters stand one after the other in
//! node-id order: the first once it has heard nothing for lease + a quarter heartbeat (the
//! moment the other voters' leases, started by the same heartbeat, have run out), the next one
//! heartbeat later, and so on. A loser retries `heartbeat × candidates` later (so the slots
//! never meet), doubling up to 4 leases. A node that refused a candidate for a shorter log
//! stands at once (it can win, the candidate cannot); a node that saw a candidate with a longer
//! log stays out for two leases. A node that has not heard from any leader since it started
//! waits 4 leases + two reconnect backoffs (a leader retries an unreachable peer only every
//! `UNREACHABLE_BACKOFF`): standing before its first heartbeat would depose a healthy leader.
//! If the watchdog ever stops (a panic), openraft's timer is switched back on.
//!
//! So a kill costs ≈ lease + a quarter heartbeat − (time since the last heartbeat) + a vote
//! round + the first quorum round + the claim. Measured in the netns lab (release build, 20
//! SIGKILLs of the leader on a shared 2-core box): `fast` p50/p99 52/71 ms, `default` 160/174
//! ms, no split vote in either; before (openraft's timer, `fast` at 10 ms / 40–80 ms) `fast`
//! was 172/413 ms and `default` 305/326 ms. A 5 ms / 15–30 ms set was no faster here (p50 45
//! ms) and lost its lease under the chaos `load` scenario, so `fast` stops at 10 ms / 40 ms.
//!
//! The Raft runtime's threads run under `SCHED_RR` when the node's `[cluster] realtime` is on
//! (keel-node): with the data plane saturating both cores, `fast` kept its leader under load
//! only with it (without: the lease lapsed and the VIP was released and re-claimed in 2 of 2
//! runs).
//!
//! # Leadership and the VIP
//!
//! openraft 0.9 never demotes a partitioned leader by itself. [`ClusterHandle::leadership`] is
//! therefore *not* "state == Leader": it is true only while this node is leader **and** a quorum
//! acknowledged it within the lease less one heartbeat (`millis_since_quorum_ack` + heartbeat <
//! election max). The value from the metrics is aged locally by the time since it was reported
//! and re-evaluated every heartbeat, so a leader whose core stalls or whose quorum vanishes turns
//! `false` by the end of the lease even when the check comes a tick late — before any other node
//! can have been elected (vrrp/LIFECYCLE.md has the whole argument). The VIP logic follows this
//! channel. keel's elections leave that argument as it was: whoever stands and whenever, a
//! voter grants nothing until a lease after its last heartbeat (openraft's check, untouched),
//! and a candidate votes for itself no earlier than a lease + a quarter heartbeat after its own
//! last heartbeat.
//!
//! # Witnesses
//!
//! A witness votes but must not lead while a data node could (it never holds the VIP). It runs
//! the **same** heartbeat, election timeout and lease as the data nodes and has no
//! [`election_watchdog`]: it never stands on a short silence. Why the same lease matters: a
//! follower refuses votes until a lease has passed since it last heard from the leader, so in a
//! pair the surviving data node's candidacy (lease + a quarter heartbeat after the last
//! heartbeat) finds the witness's vote already free, and a pair fails over as fast as a
//! three-node cluster. (An
//! earlier version gave the witness 4× longer timeouts instead; its 4× lease then held the
//! survivor's vote back for ≈ 0.8 s.)
//!
//! Only the witness can lead when it holds entries the surviving data node lacks: it refuses
//! that node its vote (log check), and nobody else votes. `witness_watchdog` covers this: when
//! no AppendEntries from a leader arrived for [`WITNESS_STAND_AFTER`] × election max (600 ms
//! by default — a live data node stands within lease + a heartbeat or so and wins a round trip
//! later, so the witness never races one), the witness triggers an election, wins with the data
//! node's vote, replicates what it lacks, and `reclaim_from_witness` on the data node then
//! takes leadership back.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::{ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::command::{Command, Outcome, Proposal};
use crate::handover::HandOver;
use crate::model::Config;
use crate::network::client::{PreVoteAnswer, UNREACHABLE_BACKOFF};
use crate::network::{dispatch_to, Dispatch, NetworkFactory, RaftServer, RpcRequest, RpcResponse};
use crate::removal;
use crate::state::ClusterState;
use crate::store;
use crate::types::{NodeInfo, Raft};
use crate::vips;

/// A witness stands for election only after this many election-max periods without hearing
/// from any leader (see [`witness_watchdog`]).
pub const WITNESS_STAND_AFTER: u32 = 4;
/// Once standing, a witness retries at most this many election-max periods apart.
const WITNESS_RETRY_MAX: u32 = 8;

/// How often a data node checks whether a witness leads (and then stands for election).
const WITNESS_RECLAIM_EVERY: Duration = Duration::from_secs(1);

/// What a node saw of the others, for [`witness_watchdog`] and [`election_watchdog`]: when it
/// last accepted an AppendEntries (heartbeat or entries) from a leader, granted a vote, refused
/// a candidate its vote because its own log is longer, or saw a candidate with a longer log
/// than its own. openraft 0.9's metrics keep naming a dead leader until a new vote, so they
/// cannot tell "no leader for a while".
struct LeaderContact {
    /// Its start: a node that just started has heard nothing yet, which counts as silence.
    epoch: tokio::time::Instant,
    last_append_us: AtomicU64,
    /// The first AppendEntries since this process started (`NEVER` until then).
    first_append_us: AtomicU64,
    last_granted_us: AtomicU64,
    last_refused_by_log_us: AtomicU64,
    last_better_candidate_us: AtomicU64,
}

impl LeaderContact {
    fn new() -> Self {
        LeaderContact {
            epoch: tokio::time::Instant::now(),
            last_append_us: AtomicU64::new(0),
            first_append_us: AtomicU64::new(NEVER),
            last_granted_us: AtomicU64::new(NEVER),
            last_refused_by_log_us: AtomicU64::new(NEVER),
            last_better_candidate_us: AtomicU64::new(NEVER),
        }
    }
    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }
    fn note(&self, at: &AtomicU64) {
        at.store(self.now_us(), Ordering::Relaxed);
    }
    /// An AppendEntries from a leader arrived (or this node is the leader itself).
    fn note_append(&self) {
        self.note(&self.last_append_us);
        if self.first_append_us.load(Ordering::Relaxed) == NEVER {
            self.note(&self.first_append_us);
        }
    }
    /// Time since the event recorded in `at` (`Duration::MAX` if it never happened).
    fn since(&self, at: &AtomicU64) -> Duration {
        match at.load(Ordering::Relaxed) {
            NEVER => Duration::MAX,
            t => Duration::from_micros(self.now_us().saturating_sub(t)),
        }
    }
    /// Time since this node last heard from a leader or granted a candidate its vote: either
    /// restarts every voter's lease (openraft touches the vote's time on both).
    fn silence(&self) -> Duration {
        self.since(&self.last_append_us).min(self.since(&self.last_granted_us))
    }
}

/// "Never happened" in [`LeaderContact`]'s microsecond fields.
const NEVER: u64 = u64::MAX;

/// Wraps `inner` so that `contact` learns of every AppendEntries a current leader sent (any
/// answer but "your vote is stale"), of every vote granted, of every vote refused because this
/// node's log is longer than the candidate's, and of every candidate whose log is longer.
///
/// It also answers keel's pre-vote (the node's own election rule, which openraft 0.9 lacks): a
/// candidate's pre-vote is granted only when this node has not heard from a leader for
/// `quiet` (the lease less one heartbeat) and the candidate's log is at least as long as its
/// own. Granting changes nothing here; a candidate that cannot gather a majority of grants does
/// not stand, so a node cut off for a while comes back with the term it left with and deposes
/// no healthy leader.
fn noting_leader_contact(
    inner: Dispatch,
    contact: Arc<LeaderContact>,
    raft: Raft,
    quiet: Duration,
    handover: Arc<HandOver>,
    removal: Arc<removal::Tracker>,
    vips: (Arc<vips::Ledger>, watch::Receiver<Arc<ClusterState>>),
) -> Dispatch {
    Arc::new(move |req: RpcRequest| -> Pin<Box<dyn Future<Output = RpcResponse> + Send>> {
        match req {
            RpcRequest::VipRenew(renewal) => {
                let state = vips.1.borrow().clone();
                let acked = vips.0.renew(&renewal, &state, std::time::Instant::now());
                return Box::pin(async move { RpcResponse::VipRenewed(acked) });
            }
            RpcRequest::VipLastAck { node, vip } => {
                let state = vips.1.borrow().clone();
                let ago = vips.0.last_ack(node, vip, &state, std::time::Instant::now());
                let us = ago.map(|d| {
                    if d == Duration::MAX {
                        u64::MAX
                    } else {
                        u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1)
                    }
                });
                return Box::pin(async move { RpcResponse::VipLastAck(us) });
            }
            RpcRequest::Removed { term } => {
                removal.learned(term, "the leader".into());
                return Box::pin(async move { RpcResponse::Noted });
            }
            RpcRequest::HandOver { from, to, hold_ms } => {
                // Only from the leader this node follows: a stale or stray notice binds no one.
                let noted = raft.metrics().borrow().current_leader == Some(from);
                if noted {
                    let hold = Duration::from_millis(hold_ms).min(HANDOVER_HOLD_MAX);
                    handover.noticed(from, to, hold);
                    tracing::info!(target: "keel::raft", from, to, hold_ms, "leader hands over: only its successor stands");
                }
                return Box::pin(async move { RpcResponse::HandOver(noted) });
            }
            RpcRequest::Release { from } => {
                // Letting go is always safe (it costs only availability), so the request is
                // honoured whoever asks; the answer waits until the address is off.
                handover.release();
                let handover = handover.clone();
                return Box::pin(async move {
                    let done = handover.let_go(RELEASE_WITHIN).await;
                    tracing::info!(target: "keel::raft", successor = from, released = done, "hand-over: VIP let go for the successor");
                    RpcResponse::Released(done)
                });
            }
            _ => {}
        }
        if let RpcRequest::PreVote { candidate, last_log_index } = &req {
            let (mine, not_a_member) = {
                let m = raft.metrics();
                let m = m.borrow();
                let membership = &m.membership_config;
                let listed = membership.membership().nodes().any(|(id, _)| id == candidate);
                // Only a membership newer than the asker's whole log is proof: a node being
                // added asks with the entry that adds it, which a lagging peer lacks.
                let newer = membership.log_id().is_some_and(|l| Some(l.index) > *last_log_index);
                (m.last_log_index, (!listed && newer).then_some(m.current_term))
            };
            if let Some(term) = not_a_member {
                return Box::pin(async move { RpcResponse::NotAMember { term } });
            }
            let silent = contact.silence() >= quiet && handover.may_pre_vote(*candidate, std::time::Instant::now());
            if silent && *last_log_index < mine {
                // As for a real vote refused for a shorter log: this node is the one that can
                // win, and its watchdog stands at once (a witness holding the only copy of an
                // entry stands to hand it on).
                contact.note(&contact.last_refused_by_log_us);
            }
            let grant = silent && *last_log_index >= mine;
            return Box::pin(async move { RpcResponse::PreVote(grant) });
        }
        let candidate_log = match &req {
            RpcRequest::Vote(v) => Some(v.last_log_id),
            _ => None,
        };
        let append = matches!(req, RpcRequest::AppendEntries(_));
        let snapshot = matches!(req, RpcRequest::FullSnapshot { .. });
        if snapshot {
            // Only a leader sends snapshots, and installing a large one takes a while: that
            // time is contact, not silence, or the follower would stand in the middle of it.
            contact.note_append();
        }
        let fut = inner(req);
        let contact = contact.clone();
        Box::pin(async move {
            let resp = fut.await;
            match (&resp, candidate_log) {
                (RpcResponse::AppendEntries(r), _) if append && !matches!(r, AppendEntriesResponse::HigherVote(_)) => {
                    contact.note_append();
                }
                (RpcResponse::Snapshot(_), _) if snapshot => contact.note_append(),
                (RpcResponse::Vote(v), Some(_)) if v.vote_granted => contact.note(&contact.last_granted_us),
                (RpcResponse::Vote(v), Some(theirs)) => {
                    if v.last_log_id > theirs {
                        contact.note(&contact.last_refused_by_log_us);
                    } else if theirs > v.last_log_id {
                        contact.note(&contact.last_better_candidate_us);
                    }
                }
                _ => {}
            }
            resp
        })
    })
}

/// On a witness (which runs with `enable_elect = false`): stand for election only when no
/// leader has been heard from for [`WITNESS_STAND_AFTER`] × election max **and** the witness
/// refused a candidate its vote for a shorter log within that time. That is the one case no
/// data node can win — the surviving data node lacks entries the witness holds — so the
/// witness must lead to bring it up to date (`reclaim_from_witness` then hands leadership
/// back). Both conditions matter: a witness that just restarted hears nothing until the
/// leader's replication reconnects, and standing then would depose a healthy leader (a leader
/// grants a higher term its vote once its own election is a lease old). Retries back off from one to
/// [`WITNESS_RETRY_MAX`] election-max periods: a retry soon after a lost attempt carries the
/// higher term learned from it, so it beats a data node that keeps re-electing.
async fn witness_watchdog(raft: Raft, contact: Arc<LeaderContact>, election_max: Duration, handover: Arc<HandOver>) {
    let stand_after = election_max * WITNESS_STAND_AFTER;
    let mut retry = election_max;
    let mut tick = tokio::time::interval(election_max);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_attempt = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let (running, leader, voter) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.running_state.is_ok(),
                m.state == ServerState::Leader,
                m.membership_config.voter_ids().any(|v| v == m.id),
            )
        };
        if !running {
            return;
        }
        let silent = contact.since(&contact.last_append_us);
        let refused = contact.since(&contact.last_refused_by_log_us);
        let handing_over = handover.successor(std::time::Instant::now()).is_some();
        if leader || !voter || handing_over || silent < stand_after || refused > stand_after {
            retry = election_max;
            continue;
        }
        let now = tokio::time::Instant::now();
        if now < next_attempt {
            continue;
        }
        tracing::info!(target: "keel::raft", silent_ms = silent.as_millis(), "a witness stands for election: no leader heard from");
        let _ = raft.trigger().elect().await;
        next_attempt = now + retry;
        retry = (retry * 2).min(election_max * WITNESS_RETRY_MAX);
    }
}

/// On a data node: while a witness is the leader, stand for election so a node that can hold
/// the VIP leads again. Bounded to one attempt per [`WITNESS_RECLAIM_EVERY`].
async fn reclaim_from_witness(raft: Raft, id: u64) {
    let mut tick = tokio::time::interval(WITNESS_RECLAIM_EVERY);
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() {
            return;
        }
        let Some(leader) = m.current_leader else { continue };
        let membership = m.membership_config.membership();
        let leader_is_witness = membership.get_node(&leader).is_some_and(|n| n.witness);
        let i_am_voter = membership.voter_ids().any(|v| v == id);
        if leader_is_witness && leader != id && i_am_voter {
            tracing::info!(target: "keel::raft", witness = leader, "a witness leads; standing for election to take over");
            let _ = raft.trigger().elect().await;
        }
    }
}

/// Turns openraft's own election timer back on when [`election_watchdog`] ends for any reason
/// (Raft stopping, or a panic): a bug in the watchdog must not leave a node that never stands.
struct TimerFallback(Raft, Arc<removal::Tracker>);

impl Drop for TimerFallback {
    fn drop(&mut self) {
        if self.1.is_removed() {
            // A removed node stands for nothing.
            return;
        }
        if self.0.metrics().borrow().running_state.is_ok() {
            tracing::warn!(target: "keel::raft", "the election watchdog stopped: openraft's election timer takes over");
        }
        self.0.runtime_config().elect(true);
    }
}

/// When a data node's [`election_watchdog`] stands, derived from the heartbeat and the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StandTimes {
    /// Election max: a voter refuses votes until this long after it last heard from a leader.
    lease: Duration,
    /// Added to the lease before the first candidate stands: covers the other voters having
    /// received the last heartbeat a little later than this node.
    margin: Duration,
    /// Between one candidate's slot and the next one's (by rank).
    stagger: Duration,
    /// How often the silence is checked.
    poll: Duration,
    /// The longest wait between two attempts of one node.
    retry_max: Duration,
    /// How long a node that has not heard from any leader since it started stays quiet: a
    /// leader retries a peer it could not reach only every [`UNREACHABLE_BACKOFF`], so a
    /// restarted node can wait that long for its first heartbeat, and standing before it would
    /// depose a healthy leader.
    startup_quiet: Duration,
}

impl StandTimes {
    fn new(heartbeat: Duration, lease: Duration) -> Self {
        StandTimes {
            lease,
            margin: (heartbeat / 4).max(Duration::from_millis(2)),
            stagger: heartbeat,
            poll: (heartbeat / 5).clamp(Duration::from_millis(1), Duration::from_millis(5)),
            retry_max: lease * 4,
            startup_quiet: lease * 4 + UNREACHABLE_BACKOFF * 2,
        }
    }

    /// The silence after which the candidate of `rank` (0 first) stands for the first time.
    fn first_stand(&self, rank: u32) -> Duration {
        self.lease + self.margin + self.stagger * rank
    }

    /// [`Self::first_stand`], or [`Self::startup_quiet`] for a node that has not heard from a
    /// leader since it started, whichever is longer.
    fn stand_after(&self, rank: u32, heard_since_start: bool) -> Duration {
        let first = self.first_stand(rank);
        if heard_since_start {
            first
        } else {
            first.max(self.startup_quiet)
        }
    }
}

/// This node's place in the standing order: its rank among the voters that may stand (data
/// nodes, not the leader that went silent), and how many there are. `None` when it is not one
/// of them.
fn stand_rank(me: u64, voters: impl Iterator<Item = (u64, bool)>, silent_leader: Option<u64>) -> Option<(u32, u32)> {
    let silent_leader = silent_leader.filter(|&l| l != me);
    let mut candidates: Vec<u64> =
        voters.filter(|&(id, witness)| !witness && Some(id) != silent_leader).map(|(id, _)| id).collect();
    candidates.sort_unstable();
    let rank = candidates.iter().position(|&id| id == me)?;
    Some((u32::try_from(rank).ok()?, u32::try_from(candidates.len()).ok()?))
}

/// On a data node: stands for election once no leader has been heard from (and no vote granted)
/// for a lease plus [`StandTimes::margin`] plus one [`StandTimes::stagger`] per rank, checking
/// every [`StandTimes::poll`]. openraft's own election timer ticks every 1.5 heartbeats and
/// fires at lease + a random timeout; two followers often fired on the same tick and split the
/// vote. Here the surviving followers stand one after the other, in node-id order, the first
/// as soon as votes can be granted (a voter refuses until a lease after its last heartbeat).
///
/// A node that loses retries every `stagger × candidates` (so the slots never meet), doubling up
/// to [`StandTimes::retry_max`]; while its campaign is undecided (still a candidate) it waits at
/// least a lease, as its vote answers may still be coming in. A node that refused a candidate
/// for a shorter log stands at once (it is the one that can win); a node that saw a candidate
/// with a longer log stays out for two leases (it cannot win, and its higher terms would only
/// get in the way). openraft's own timer is off on data nodes; [`TimerFallback`] switches it
/// back on should this task end.
async fn election_watchdog(
    raft: Raft,
    contact: Arc<LeaderContact>,
    times: StandTimes,
    mut asker: PreVoter,
    handover: Arc<HandOver>,
    removal: Arc<removal::Tracker>,
) {
    let _fallback = TimerFallback(raft.clone(), removal.clone());
    let mut tick = tokio::time::interval(times.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut next_attempt: Option<tokio::time::Instant> = None;
    let mut retry = times.stagger;
    // The refusal (by its time) this node last stood for, so that one refusal is one attempt.
    let mut acted_on_refusal = NEVER;
    // When this node last stood: while its votes are still coming in it does not stand again.
    let mut stood: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let (running, leader, candidate, place) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters = membership.voter_ids().map(|id| (id, membership.get_node(&id).is_some_and(|n| n.witness)));
            let rank = stand_rank(m.id, voters, m.current_leader);
            (m.running_state.is_ok(), m.state == ServerState::Leader, m.state == ServerState::Candidate, rank)
        };
        if !running || removal.is_removed() {
            return;
        }
        if leader {
            // Leading counts as hearing from a leader: a leader that steps down (a higher term
            // seen) must not stand at once on the silence it had while it led.
            contact.note_append();
            next_attempt = None;
            continue;
        }
        let Some((rank, candidates)) = place else {
            next_attempt = None;
            continue;
        };
        let silent = contact.silence();
        let refused_at = contact.last_refused_by_log_us.load(Ordering::Relaxed);
        let fresh_refusal =
            refused_at != acted_on_refusal && contact.since(&contact.last_refused_by_log_us) < times.lease;
        // A hand-over names the one node that stands: it goes first, the others stay out.
        let successor = handover.successor(std::time::Instant::now());
        if successor.is_some_and(|to| to != asker.me) {
            next_attempt = None;
            continue;
        }
        let chosen = successor.is_some();
        let rank = if fresh_refusal || chosen { 0 } else { rank };
        let outranked = !chosen && contact.since(&contact.last_better_candidate_us) < times.lease * 2;
        let heard = chosen || contact.first_append_us.load(Ordering::Relaxed) != NEVER;
        if outranked || silent < times.stand_after(rank, heard) {
            next_attempt = None;
            continue;
        }
        let now = tokio::time::Instant::now();
        // A campaign in flight: its vote answers can take longer than a retry slot on a loaded
        // host, and standing again raises the term under it (a hand-over then took two
        // elections instead of one). Retry once a lease passed without a decision.
        if candidate && stood.is_some_and(|at| now < at + times.lease) {
            continue;
        }
        match next_attempt {
            Some(at) if now < at && !fresh_refusal => continue,
            Some(_) => retry = (retry * 2).min(times.retry_max),
            None => retry = times.stagger * candidates,
        }
        acted_on_refusal = refused_at;
        let (granted, voters, not_a_member) = asker.ask(&raft).await;
        if let Some((peer, term)) = not_a_member {
            removal.learned(term, format!("node {peer}, asked for a pre-vote"));
            return;
        }
        // The pre-vote waits for every answer, a cut-off peer's up to the RPC timeout: another
        // candidate may have won meanwhile (this node granted it its vote, or heard its first
        // AppendEntries). Standing on those stale grants would depose it (seen in the chaos
        // lab: a leader's link cut, the first survivor elected, the second standing 20 ms
        // later and deposing it — 0.3–1.2 s of failover instead of 0.2).
        if contact.silence() < silent {
            next_attempt = None;
            continue;
        }
        if granted * 2 <= voters {
            // Not a majority would vote: standing would only raise the term (and depose a leader
            // the others still hear from, once this node's link is back).
            static LOST: crate::throttle::LogThrottle = crate::throttle::LogThrottle::new(crate::throttle::EVERY);
            crate::throttled!(LOST, info, target: "keel::raft", silent_ms = silent.as_millis(), granted, voters,
                "no leader heard from, but the pre-vote found no majority: not standing (the others still hear a leader, or are unreachable)");
            next_attempt = Some(now + retry);
            continue;
        }
        tracing::info!(target: "keel::raft", silent_ms = silent.as_millis(), rank, granted, voters, "no leader heard from: standing for election");
        if raft.trigger().elect().await.is_err() {
            return;
        }
        stood = Some(now);
        next_attempt = Some(now + retry);
    }
}

/// Asks the other voters for their pre-votes.
struct PreVoter {
    me: u64,
    network: NetworkFactory,
    ttl: Duration,
}

impl PreVoter {
    /// Pre-votes granted (this node's own included), the number of voters, and a peer that
    /// says this node is no longer a member (with its term).
    async fn ask(&mut self, raft: &Raft) -> (usize, usize, Option<(u64, u64)>) {
        use openraft::network::RaftNetworkFactory;
        let (me, last_log_index, voters) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<(u64, NodeInfo)> =
                membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone()))).collect();
            (m.id, m.last_log_index, voters)
        };
        let total = voters.len();
        let mut asks = tokio::task::JoinSet::new();
        for (id, node) in voters.into_iter().filter(|(id, _)| *id != me) {
            let mut client = self.network.new_client(id, &node).await;
            let ttl = self.ttl;
            asks.spawn(async move {
                let answer = tokio::time::timeout(ttl, client.pre_vote(me, last_log_index, ttl)).await;
                (id, answer.unwrap_or(PreVoteAnswer::Refused))
            });
        }
        let mut granted = 1; // this node's own
        let mut not_a_member = None;
        while let Some(answer) = asks.join_next().await {
            match answer {
                Ok((_, PreVoteAnswer::Granted)) => granted += 1,
                Ok((peer, PreVoteAnswer::NotAMember { term })) => not_a_member = Some((peer, term)),
                _ => {}
            }
            // A majority granted: stand now rather than wait out a cut-off voter's timeout
            // (it delayed every election after a link cut by the whole TTL).
            if granted * 2 > total {
                break;
            }
        }
        (granted, total, not_a_member)
    }
}

/// The longest hold a hand-over may announce or accept, whatever the timings: a notice can
/// never bind a voter for long.
const HANDOVER_HOLD_MAX: Duration = Duration::from_secs(5);

/// How long a node that handed over waits for its VIP controller to let go before it answers
/// the successor (two netlink calls take well under a millisecond).
const RELEASE_WITHIN: Duration = Duration::from_secs(1);

/// On a data node: once it leads with a quorum after another node handed over to it, asks that
/// node to let go of the VIP (the claim is withheld until it confirms, or until the hand-over's
/// hold has run out). Retries every few milliseconds while the hold lasts.
async fn ask_for_release(
    raft: Raft,
    handover: Arc<HandOver>,
    mut leadership: watch::Receiver<bool>,
    mut peers: NetworkFactory,
) {
    use openraft::network::RaftNetworkFactory;
    let me = raft.metrics().borrow().id;
    let mut changes = handover.subscribe();
    loop {
        let pending = handover.pending_release(std::time::Instant::now());
        let leading = *leadership.borrow();
        if let (Some(from), true) = (pending, leading) {
            let node = raft.metrics().borrow().membership_config.membership().get_node(&from).cloned();
            let released = match node {
                Some(node) => peers.new_client(from, &node).await.release(me, Duration::from_millis(500)).await,
                None => false,
            };
            if released {
                handover.released_by(from);
                tracing::info!(target: "keel::raft", from, "hand-over: the previous holder let go of the VIP; claiming it");
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            continue;
        }
        // Nothing to do until leadership or the hand-over changes (a hand-over that runs out
        // needs nothing: there is no one left to ask).
        tokio::select! {
            r = leadership.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
        }
    }
}

/// Learns a removal from this node's own log: the membership it applied no longer lists it.
async fn removed_by_the_log(raft: Raft, removal: Arc<removal::Tracker>) {
    let mut metrics = raft.metrics();
    loop {
        let (gone, term) = {
            let m = metrics.borrow_and_update();
            let membership = &m.membership_config;
            // A node that never joined has no membership yet: that is not a removal.
            let gone = membership.log_id().is_some() && !membership.membership().nodes().any(|(id, _)| *id == m.id);
            (gone && m.running_state.is_ok(), m.current_term)
        };
        if gone {
            removal.learned(term, "its own log".into());
            return;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(20);
/// Default lower bound of the randomized election timeout.
pub const DEFAULT_ELECTION_MIN: Duration = Duration::from_millis(100);
/// Default upper bound of the randomized election timeout (and the leader lease).
pub const DEFAULT_ELECTION_MAX: Duration = Duration::from_millis(150);

/// Heartbeat of the [`Profile::Fast`] timings.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(10);
/// Lower bound of the [`Profile::Fast`] election timeout.
pub const FAST_ELECTION_MIN: Duration = Duration::from_millis(30);
/// Upper bound of the [`Profile::Fast`] election timeout (and its lease).
pub const FAST_ELECTION_MAX: Duration = Duration::from_millis(40);

/// A named set of Raft timings (`[cluster] profile`); explicit `heartbeat` / `election_*`
/// keys override single values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Profile {
    /// [`DEFAULT_HEARTBEAT`], [`DEFAULT_ELECTION_MIN`]–[`DEFAULT_ELECTION_MAX`]: tolerant of
    /// a busy host.
    #[default]
    Default,
    /// [`FAST_HEARTBEAT`], [`FAST_ELECTION_MIN`]–[`FAST_ELECTION_MAX`]: for dedicated hosts on
    /// a quiet LAN (see the module doc for what was measured).
    Fast,
}

impl Profile {
    /// `(heartbeat, election_min, election_max)`.
    pub fn timings(self) -> (Duration, Duration, Duration) {
        match self {
            Profile::Default => (DEFAULT_HEARTBEAT, DEFAULT_ELECTION_MIN, DEFAULT_ELECTION_MAX),
            Profile::Fast => (FAST_HEARTBEAT, FAST_ELECTION_MIN, FAST_ELECTION_MAX),
        }
    }
}
/// How long [`ClusterHandle::propose`] waits for a commit before answering
/// [`ProposeError::NoQuorum`].
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long [`ClusterHandle::move_vip`] waits for the target to be named.
pub const VIP_MOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a membership change (including a learner's catch-up) may take.
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`ClusterHandle::initialize`] waits to become leader of the fresh cluster.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything a node needs to join the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// This node's id: stable for the life of its data dir, unique in the cluster, not 0.
    pub node_id: u64,
    /// Address to bind for Raft RPC (port 0 picks one; the bound address is what peers learn).
    pub raft_addr: SocketAddr,
    /// Address of this node's admin HTTP API (served by the caller), recorded in membership so
    /// followers can point clients at the leader.
    pub admin_addr: SocketAddr,
    /// Where the Raft database lives.
    pub data_dir: PathBuf,
    /// Cluster id: peers with another id are refused.
    pub cluster_id: String,
    /// Leader heartbeat interval.
    pub heartbeat: Duration,
    /// Election timeout, lower bound.
    pub election_min: Duration,
    /// Election timeout, upper bound; also the leader lease.
    pub election_max: Duration,
    /// A witness votes and stores the log but runs no data plane and never holds the VIP.
    pub witness: bool,
    /// While leading: move spread VIPs back to an even spread when a node comes back
    /// (`[vip] preempt`; see [`crate::vips`]).
    #[serde(default)]
    pub vip_preempt: bool,
}

impl ClusterSettings {
    /// Settings with the default timings (see the module doc).
    pub fn new(
        node_id: u64,
        raft_addr: SocketAddr,
        admin_addr: SocketAddr,
        data_dir: PathBuf,
        cluster_id: &str,
    ) -> Self {
        ClusterSettings {
            node_id,
            raft_addr,
            admin_addr,
            data_dir,
            cluster_id: cluster_id.to_owned(),
            heartbeat: DEFAULT_HEARTBEAT,
            election_min: DEFAULT_ELECTION_MIN,
            election_max: DEFAULT_ELECTION_MAX,
            witness: false,
            vip_preempt: false,
        }
    }

    /// Checks invariants that span fields.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |m: String| Err(ClusterError::InvalidSettings(m));
        if self.node_id == 0 {
            return bad("node_id must be at least 1".into());
        }
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty".into());
        }
        if let Some((key, why)) = timing_problem(self.heartbeat, self.election_min, self.election_max) {
            return bad(format!("{key} {why}"));
        }
        Ok(())
    }
}

/// The rule a set of Raft timings breaks, as `(key, why)`: the heartbeat must be above zero and
/// at most a third of the election minimum (one lost packet must not start an election), and
/// the election minimum below the maximum. One rule for the settings and for the config file,
/// which reports it at the key's line.
pub fn timing_problem(
    heartbeat: Duration,
    election_min: Duration,
    election_max: Duration,
) -> Option<(&'static str, String)> {
    let show = |d: Duration| crate::HumanDuration(d).to_string();
    if heartbeat.is_zero() || election_min < heartbeat * 3 {
        return Some((
            "heartbeat",
            format!(
                "must be above zero and at most a third of election_min ({}): {}",
                show(election_min),
                show(heartbeat)
            ),
        ));
    }
    if election_min >= election_max {
        return Some((
            "election_min",
            format!("must be below election_max ({}): {}", show(election_max), show(election_min)),
        ));
    }
    None
}

/// Why a node could not start or a management call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The settings are inconsistent.
    #[error("invalid cluster settings: {0}")]
    InvalidSettings(String),
    /// Opening or reading the data dir failed.
    #[error("raft storage: {0}")]
    Storage(String),
    /// Binding the raft address failed.
    #[error("cannot bind raft address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The cluster was already initialized (this node has a log or a membership).
    #[error("cluster already initialized")]
    AlreadyInitialized,
    /// This node is not the leader; ask that one.
    #[error("not the leader; leader is {leader_id:?} (admin {leader_admin_addr:?})")]
    NotLeader {
        /// Current leader, if known.
        leader_id: Option<u64>,
        /// Its admin address, if known.
        leader_admin_addr: Option<SocketAddr>,
    },
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Proposing the seed config failed.
    #[error("seed config: {0}")]
    Propose(#[from] ProposeError),
    /// This node was removed from the cluster; it does not start as a member with that state.
    #[error("{0}")]
    Removed(String),
    /// A spread VIP could not be moved.
    #[error("vip move: {0}")]
    VipMove(String),
    /// A leadership hand-over could not be started or did not complete.
    #[error("transfer: {0}")]
    Transfer(String),
    /// Any other Raft failure.
    #[error("raft: {0}")]
    Raft(String),
}

/// Why a proposal did not produce an [`Outcome`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case", tag = "error")]
pub enum ProposeError {
    /// This node is not the leader. Retry on the leader (its admin address, when known).
    #[error("not the leader; forward to node {leader_id:?} at {leader_admin_addr:?}")]
    ForwardToLeader {
        /// Current leader, if known.
        leader_id: Option<u64>,
        /// Its admin address, if known.
        leader_admin_addr: Option<SocketAddr>,
    },
    /// No commit within the bounded wait: no quorum reachable (or an election is running). The
    /// command may still commit later.
    #[error("no quorum within {waited_ms} ms; the command may still commit")]
    NoQuorum {
        /// How long we waited.
        waited_ms: u64,
    },
    /// The command is invalid (before proposing) or was rejected at apply; nothing changed.
    #[error("rejected: {reason}")]
    Rejected {
        /// Why.
        reason: String,
    },
    /// Raft stopped on this node.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// Role of a node as its Raft state says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Leader (see `quorum_acked_within_lease` before acting on it).
    Leader,
    /// Voter following a leader.
    Follower,
    /// Voter running an election.
    Candidate,
    /// Non-voting member catching up.
    Learner,
    /// Raft stopped.
    Shutdown,
}

/// One member as seen from this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: u64,
    /// Its membership record.
    pub node: NodeInfo,
    /// Whether it votes.
    pub voter: bool,
    /// Leader only: highest log index known replicated to it.
    pub matched_index: Option<u64>,
    /// Leader only: entries it is behind the leader's last log index.
    pub lag: Option<u64>,
}

/// A node's view of the cluster ([`ClusterHandle::status`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub id: u64,
    /// This node's role.
    pub role: Role,
    /// Current leader, if known.
    pub leader_id: Option<u64>,
    /// The leader's admin address, if known.
    pub leader_admin_addr: Option<SocketAddr>,
    /// Current term.
    pub term: u64,
    /// Last log index on this node.
    pub last_log_index: Option<u64>,
    /// Commit index: computed from replication progress on the leader; elsewhere the applied
    /// index (a lower bound — openraft 0.9 does not publish a follower's commit index).
    pub commit_index: Option<u64>,
    /// Last applied log index.
    pub applied_index: Option<u64>,
    /// Last snapshot's log index.
    pub snapshot_index: Option<u64>,
    /// Members with voter/learner flags (and replication progress on the leader).
    pub members: Vec<MemberStatus>,
    /// Leader only: milliseconds since a quorum last acknowledged this leader.
    pub millis_since_quorum_ack: Option<u64>,
    /// The lease: election max, in ms.
    pub lease_ms: u64,
    /// Leader and acknowledged by a quorum within the lease less one heartbeat: safe to hold
    /// the VIP.
    pub quorum_acked_within_lease: bool,
    /// Set once this node learned it was removed from the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed: Option<removal::Removed>,
    /// The spread VIPs (`[vip] addresses`) and who holds each, as this node applied it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vips: BTreeMap<std::net::IpAddr, vips::VipSlot>,
}

struct Inner {
    id: u64,
    info: NodeInfo,
    raft: Raft,
    server: RaftServer,
    state: watch::Receiver<Arc<ClusterState>>,
    snapshot_stats: Arc<store::SnapshotStats>,
    leadership: watch::Receiver<bool>,
    leadership_task: JoinHandle<()>,
    lease: Duration,
    tick: Duration,
    handover: Arc<HandOver>,
    peers: NetworkFactory,
    removal: Arc<removal::Tracker>,
    ledger: Arc<vips::Ledger>,
    vip_timings: vips::Timings,
    /// Whether this node offers to carry its spread VIPs (serving, and not stopping).
    vips_offer: watch::Sender<vips::Offer>,
}

/// The handle to a running node; cheap to clone.
#[derive(Clone)]
pub struct ClusterHandle {
    inner: Arc<Inner>,
}

/// Namespace for starting a node.
pub struct ClusterNode;

impl ClusterNode {
    /// Opens `data_dir`, binds `raft_addr`, starts Raft (restoring the latest snapshot and log)
    /// and the Raft RPC server.
    pub async fn start(settings: ClusterSettings) -> Result<ClusterHandle, ClusterError> {
        settings.validate()?;
        removal::check_not_removed(&settings.data_dir).map_err(ClusterError::Removed)?;
        let (log, sm) = store::open(&settings.data_dir).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let state = sm.subscribe();
        let snapshot_stats = sm.stats();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // A witness must not end up leading while a data node could: it never holds the VIP, so
        // a witness leader leaves the service without an address, and openraft 0.9 cannot
        // transfer leadership. It runs the same timeouts (so the same lease: its vote is free as
        // soon as a data node's is) but never starts an election by timer; `witness_watchdog`
        // stands only when no leader has been heard from for a long time.
        let config = openraft::Config {
            cluster_name: settings.cluster_id.clone(),
            heartbeat_interval: ms(settings.heartbeat),
            election_timeout_min: ms(settings.election_min),
            election_timeout_max: ms(settings.election_max),
            // Elections are keel's (`election_watchdog`, `witness_watchdog`), not openraft's timer.
            enable_elect: false,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(store::SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: 1_000,
            install_snapshot_timeout: 30_000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::InvalidSettings(e.to_string()))?;
        let listener = TcpListener::bind(settings.raft_addr)
            .await
            .map_err(|source| ClusterError::Bind { addr: settings.raft_addr, source })?;
        let raft_addr =
            listener.local_addr().map_err(|source| ClusterError::Bind { addr: settings.raft_addr, source })?;
        let network = NetworkFactory::new(settings.cluster_id.clone(), settings.node_id, Duration::from_secs(30));
        let raft = Raft::new(settings.node_id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let contact = Arc::new(LeaderContact::new());
        let handover = HandOver::new(settings.node_id);
        let removal = removal::Tracker::new(settings.data_dir.clone(), settings.cluster_id.clone(), settings.node_id);
        let ledger = vips::Ledger::new();
        let quiet = settings.election_max.saturating_sub(settings.heartbeat);
        let dispatch = noting_leader_contact(
            dispatch_to(raft.clone()),
            contact.clone(),
            raft.clone(),
            quiet,
            handover.clone(),
            removal.clone(),
            (ledger.clone(), state.clone()),
        );
        let peers = || NetworkFactory::new(settings.cluster_id.clone(), settings.node_id, Duration::from_secs(30));
        if settings.witness {
            tokio::spawn(witness_watchdog(raft.clone(), contact, settings.election_max, handover.clone()));
        } else {
            let times = StandTimes::new(settings.heartbeat, settings.election_max);
            let asker = PreVoter {
                me: settings.node_id,
                network: peers(),
                ttl: (settings.heartbeat * 2).max(Duration::from_millis(20)),
            };
            tokio::spawn(election_watchdog(raft.clone(), contact, times, asker, handover.clone(), removal.clone()));
        }
        tokio::spawn(removed_by_the_log(raft.clone(), removal.clone()));
        let vip_timings = vips::Timings { tick: settings.heartbeat, lease: settings.election_max };
        tokio::spawn(vips::run_planner(
            raft.clone(),
            state.clone(),
            ledger.clone(),
            peers(),
            vip_timings,
            settings.vip_preempt,
        ));
        let server = RaftServer::start(listener, settings.node_id, settings.cluster_id.clone(), dispatch)
            .map_err(|source| ClusterError::Bind { addr: raft_addr, source })?;
        let (lead_tx, leadership) = watch::channel(false);
        let leadership_task =
            tokio::spawn(watch_leadership(raft.clone(), lead_tx, settings.election_max, settings.heartbeat));
        if !settings.witness {
            tokio::spawn(reclaim_from_witness(raft.clone(), settings.node_id));
            tokio::spawn(ask_for_release(raft.clone(), handover.clone(), leadership.clone(), peers()));
        }
        tracing::info!(target: "keel::raft", node = settings.node_id, %raft_addr, admin = %settings.admin_addr, "raft node started");
        let info = NodeInfo { raft_addr, admin_addr: settings.admin_addr, witness: settings.witness };
        Ok(ClusterHandle {
            inner: Arc::new(Inner {
                id: settings.node_id,
                info,
                raft,
                server,
                state,
                snapshot_stats,
                leadership,
                leadership_task,
                lease: settings.election_max,
                tick: settings.heartbeat,
                handover,
                peers: peers(),
                removal,
                ledger,
                vip_timings,
                vips_offer: watch::Sender::new(vips::Offer::default()),
            }),
        })
    }
}

/// Publishes "leader with a quorum ack within the lease", re-evaluated on every metrics change
/// and at least once per heartbeat.
async fn watch_leadership(raft: Raft, tx: watch::Sender<bool>, lease: Duration, tick: Duration) {
    let mut metrics = raft.metrics();
    let mut seen = tokio::time::Instant::now();
    loop {
        let (leader, ack) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, m.millis_since_quorum_ack)
        };
        let aged = ack.map(|ms| Duration::from_millis(ms) + seen.elapsed());
        // One re-evaluation tick short of the lease: checked at most one tick late, the VIP is
        // still gone by the time the lease ends and any voter may grant a new leader its vote.
        let holds = leader && aged.is_some_and(|a| a + tick < lease);
        tx.send_if_modified(|v| {
            if *v != holds {
                tracing::info!(target: "keel::raft", leader, quorum_ack_age = ?aged, holds, "leadership changed");
                *v = holds;
                true
            } else {
                false
            }
        });
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    tx.send_replace(false);
                    return;
                }
                seen = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Wall clock in unix ms (the proposer's time carried by proposals).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

fn leader_hint(raft: &Raft, leader_id: Option<u64>) -> Option<SocketAddr> {
    let id = leader_id?;
    raft.metrics().borrow().membership_config.membership().get_node(&id).map(|n| n.admin_addr)
}

impl ClusterHandle {
    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// This node's membership record (with the bound raft address).
    pub fn node_info(&self) -> NodeInfo {
        self.inner.info.clone()
    }

    /// The underlying openraft instance, for metrics and tests.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Makes this node the sole voter of a new cluster and proposes `seed` as its first config.
    pub async fn initialize(&self, seed: Config) -> Result<Outcome, ClusterError> {
        Command::ApplyConfig(seed.clone())
            .precheck()
            .map_err(|reason| ClusterError::Propose(ProposeError::Rejected { reason }))?;
        let members = BTreeMap::from([(self.inner.id, self.inner.info.clone())]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => return Err(ClusterError::AlreadyInitialized),
            Err(e) => return Err(ClusterError::Raft(e.to_string())),
        }
        self.inner
            .raft
            .wait(Some(INIT_TIMEOUT))
            .state(ServerState::Leader, "initialized node becomes leader")
            .await
            .map_err(|e| ClusterError::Timeout(e.to_string()))?;
        tracing::info!(target: "keel::raft", node = self.inner.id, "cluster initialized");
        Ok(self.propose(Command::ApplyConfig(seed)).await?)
    }

    fn membership_error(&self, e: RaftError<u64, ClientWriteError<u64, NodeInfo>>) -> ClusterError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
                leader_id: f.leader_id,
                leader_admin_addr: f.leader_node.map(|n| n.admin_addr),
            },
            other => ClusterError::Raft(other.to_string()),
        }
    }

    /// Adds `id` as a learner and waits until it caught up with the leader's log.
    pub async fn add_learner(&self, id: u64, node: NodeInfo) -> Result<(), ClusterError> {
        let fut = self.inner.raft.add_learner(id, node, true);
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, fut).await {
            Err(_) => {
                Err(ClusterError::Timeout(format!("learner {id} did not catch up within {MEMBERSHIP_TIMEOUT:?}")))
            }
            Ok(Err(e)) => Err(self.membership_error(e)),
            Ok(Ok(_)) => {
                tracing::info!(target: "keel::raft", node = id, "learner added");
                Ok(())
            }
        }
    }

    /// Makes exactly `voters` the voting members (learners not listed stay learners).
    pub async fn change_membership(&self, voters: BTreeSet<u64>) -> Result<(), ClusterError> {
        let fut = self.inner.raft.change_membership(voters.clone(), true);
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, fut).await {
            Err(_) => {
                Err(ClusterError::Timeout(format!("membership change did not commit within {MEMBERSHIP_TIMEOUT:?}")))
            }
            Ok(Err(e)) => Err(self.membership_error(e)),
            Ok(Ok(_)) => {
                tracing::info!(target: "keel::raft", ?voters, "membership changed");
                Ok(())
            }
        }
    }

    /// Adds a learner, waits for catch-up, then promotes it to voter (witnesses vote too).
    pub async fn add_voter(&self, id: u64, node: NodeInfo) -> Result<(), ClusterError> {
        self.add_learner(id, node).await?;
        let mut voters: BTreeSet<u64> = self.inner.raft.metrics().borrow().membership_config.voter_ids().collect();
        voters.insert(id);
        self.change_membership(voters).await
    }

    /// Removes `id` from the cluster entirely (voter or learner).
    pub async fn remove(&self, id: u64) -> Result<(), ClusterError> {
        let membership = self.inner.raft.metrics().borrow().membership_config.clone();
        let removed_node = membership.membership().get_node(&id).cloned();
        let voters: BTreeSet<u64> = membership.voter_ids().filter(|v| *v != id).collect();
        if voters.is_empty() {
            return Err(ClusterError::InvalidSettings("cannot remove the last voter".into()));
        }
        let fut = self.inner.raft.change_membership(voters, false);
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, fut).await {
            Err(_) => Err(ClusterError::Timeout(format!("removal did not commit within {MEMBERSHIP_TIMEOUT:?}"))),
            Ok(Err(e)) => Err(self.membership_error(e)),
            Ok(Ok(_)) => {
                tracing::info!(target: "keel::raft", node = id, "node removed");
                // openraft stops replicating to it once this commits, so it may never see the
                // entry: tell it (best effort; it also learns it on its next pre-vote).
                if let Some(node) = removed_node {
                    use openraft::network::RaftNetworkFactory;
                    let term = self.inner.raft.metrics().borrow().current_term;
                    let mut client = self.inner.peers.clone().new_client(id, &node).await;
                    tokio::spawn(async move {
                        if !client.removed(term, Duration::from_secs(1)).await {
                            tracing::info!(target: "keel::raft", node = id,
                                "could not tell the removed node; it learns it when it next looks for a leader");
                        }
                    });
                }
                Ok(())
            }
        }
    }

    /// Proposes `command` on this node, which must be the leader; waits at most
    /// [`PROPOSE_TIMEOUT`] for it to commit and apply.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        command.precheck().map_err(|reason| ProposeError::Rejected { reason })?;
        let name = command.name();
        let proposal = Proposal { command, proposed_at_ms: now_ms() };
        let raft = &self.inner.raft;
        match tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(proposal)).await {
            Err(_) => {
                Err(ProposeError::NoQuorum { waited_ms: u64::try_from(PROPOSE_TIMEOUT.as_millis()).unwrap_or(0) })
            }
            Ok(Ok(resp)) => match resp.data {
                Outcome::Rejected { reason } => Err(ProposeError::Rejected { reason }),
                outcome => {
                    tracing::debug!(target: "keel::raft", command = name, index = resp.log_id.index, "command applied");
                    Ok(outcome)
                }
            },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                let leader_admin_addr = f.leader_node.map(|n| n.admin_addr).or_else(|| leader_hint(raft, f.leader_id));
                Err(ProposeError::ForwardToLeader { leader_id: f.leader_id, leader_admin_addr })
            }
            Ok(Err(e)) => Err(ProposeError::Fatal(e.to_string())),
        }
    }

    /// The applied state; a new `Arc` is published only when it changed.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state.clone()
    }

    /// Figures of the snapshots this node built and installed (for `/metrics`).
    pub fn snapshot_figures(&self) -> store::SnapshotFigures {
        self.inner.snapshot_stats.figures()
    }

    /// True only while this node is leader and a quorum acknowledged it within the lease.
    /// Evaluated on the Raft runtime: for status and logs. What holds a VIP is
    /// [`vip_lease`](Self::vip_lease), which no stall of that runtime can stretch.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.inner.leadership.clone()
    }

    /// The VIP's right to hold, as a deadline (see [`crate::lease`]): the channel, and the
    /// future that drives it — spawn that on the thread the VIP controller runs on, not on the
    /// Raft runtime.
    pub fn vip_lease(&self) -> (watch::Receiver<bool>, impl std::future::Future<Output = ()> + Send) {
        crate::lease::follow(self.inner.raft.metrics(), self.inner.lease, self.inner.tick, self.inner.handover.clone())
    }

    /// Tells the hand-over whether the VIP controller holds the address now, so that a release
    /// asked by a successor is confirmed only once the address is gone.
    pub fn watch_vip(&self, holding: watch::Receiver<bool>) {
        self.inner.handover.watch_vip(holding);
    }

    /// Tells the spread-VIP holder that this node's data plane serves the replicated config:
    /// from now on its renewals offer its VIPs (see [`vips::Offer`]). Until then the leader
    /// names it for none, so a node that just started is never handed a VIP it would refuse.
    pub fn serving(&self) {
        self.inner.vips_offer.send_if_modified(|o| !std::mem::replace(&mut o.serving, true));
    }

    /// This node's leases on the spread VIPs it `carries` (its `[vip] addresses`): one verdict
    /// per VIP, and the future that renews them — spawn it on the VIP's own thread. They are
    /// offered only once [`ClusterHandle::serving`] was called.
    pub fn vip_leases(
        &self,
        carries: Vec<std::net::IpAddr>,
    ) -> (Vec<vips::VipLease>, impl std::future::Future<Output = ()> + Send) {
        let inputs = vips::HolderInputs {
            raft: self.inner.raft.clone(),
            state: self.inner.state.clone(),
            ledger: self.inner.ledger.clone(),
            peers: self.inner.peers.clone(),
            timings: self.inner.vip_timings,
            offer: self.inner.vips_offer.subscribe(),
        };
        vips::holder(self.inner.id, carries, inputs)
    }

    /// A planned stop of a node holding spread VIPs: stops listing them, so the leader moves
    /// each to another node (this node steps aside, still serving what reaches it, while the
    /// next holder waits out its lease), and waits until every VIP the state named this node
    /// for is named to another node, or `within` passed. Returns whether all moved (false
    /// too when no other node could take one: the VIP then goes when the node stops).
    pub async fn hand_off_vips(&self, within: Duration) -> bool {
        let me = self.inner.id;
        let mut state = self.inner.state.clone();
        let mine: Vec<std::net::IpAddr> =
            state.borrow().vips.iter().filter(|(_, s)| s.holder == Some(me)).map(|(v, _)| *v).collect();
        if mine.is_empty() {
            return true;
        }
        tracing::info!(target: "keel::vip", vips = ?mine, "stopping: handing the spread VIPs to the other nodes");
        self.inner.vips_offer.send_modify(|o| o.leaving = true);
        let moved =
            |st: &ClusterState| mine.iter().all(|v| st.vips.get(v).is_some_and(|s| s.holder.is_some_and(|h| h != me)));
        let done = tokio::time::timeout(within, state.wait_for(|st| moved(st))).await.is_ok_and(|r| r.is_ok());
        if done {
            tracing::info!(target: "keel::vip", "spread VIPs handed off");
        } else {
            tracing::warn!(target: "keel::vip", waited = ?within, "not every spread VIP found another holder; the rest go when this node stops");
        }
        done
    }

    /// Moves a spread VIP to node `to` (`keel cluster vip move`): suspends it with `to` as the
    /// next holder and waits until `to` is named. This node must lead; `to` must be a live data
    /// voter that lists the VIP.
    pub async fn move_vip(&self, vip: std::net::IpAddr, to: u64) -> Result<(), ClusterError> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(ClusterError::NotLeader {
                leader_id: m.current_leader,
                leader_admin_addr: leader_hint(&self.inner.raft, m.current_leader),
            });
        }
        let slot = self.inner.state.borrow().vips.get(&vip).cloned();
        let Some(slot) = slot else {
            return Err(ClusterError::VipMove(format!("{vip} is not one of the cluster's VIPs")));
        };
        if slot.holder == Some(to) {
            return Ok(());
        }
        let dead_after = self.inner.vip_timings.tick * vips::DEAD_AFTER_TICKS;
        let live =
            self.inner.ledger.seen().get(&to).is_some_and(|s| s.at.elapsed() < dead_after && s.carries.contains(&vip));
        let data_voter = m.membership_config.membership().get_node(&to).is_some_and(|n| !n.witness)
            && m.membership_config.voter_ids().any(|v| v == to);
        if !data_voter {
            return Err(ClusterError::VipMove(format!("node {to} is not a data voter of this cluster")));
        }
        if !live {
            return Err(ClusterError::VipMove(format!(
                "node {to} is not renewing a lease on {vip} (down, or {vip} is not in its [vip] addresses)"
            )));
        }
        self.propose(Command::SetVipHolder { vip, holder: None, move_to: Some(to) }).await?;
        let mut state = self.inner.state.clone();
        let deadline = tokio::time::Instant::now() + VIP_MOVE_TIMEOUT;
        loop {
            let held = state.borrow_and_update().vips.get(&vip).map(|s| s.holder);
            match held {
                Some(Some(h)) if h == to => return Ok(()),
                Some(Some(h)) => {
                    return Err(ClusterError::VipMove(format!(
                        "{vip} went to node {h} instead (node {to} stopped renewing?)"
                    )))
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, state.changed()).await.map_or(true, |r| r.is_err()) {
                return Err(ClusterError::VipMove(format!("{vip} was not named to node {to} within {VIP_MOVE_TIMEOUT:?}; it is suspended and the leader keeps trying")));
            }
        }
    }

    /// This node's removal from the cluster, once it learned it.
    pub fn removed(&self) -> watch::Receiver<Option<removal::Removed>> {
        self.inner.removal.subscribe()
    }

    /// True while the VIP controller should let go by stepping aside (a hand-over's release):
    /// pass it to `VipController::with_step_aside`.
    pub fn vip_stepping_aside(&self) -> watch::Receiver<bool> {
        self.inner.handover.stepping_aside()
    }

    /// Hands leadership and the VIP over to `to`, or to the most caught-up data voter, and
    /// waits until the successor leads and has the VIP (see [`crate::handover`]). This node
    /// must be the leader; it keeps serving throughout. Returns the successor's id.
    pub async fn transfer(&self, to: Option<u64>) -> Result<u64, ClusterError> {
        let raft = &self.inner.raft;
        let me = self.inner.id;
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(ClusterError::NotLeader {
                leader_id: m.current_leader,
                leader_admin_addr: leader_hint(raft, m.current_leader),
            });
        }
        let membership = m.membership_config.membership().clone();
        let voters: Vec<(u64, NodeInfo)> =
            membership.voter_ids().filter_map(|id| membership.get_node(&id).map(|n| (id, n.clone()))).collect();
        let last = m.last_log_index.unwrap_or(0);
        let matched = |id: u64| m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index);
        // A successor must be a data voter with every entry this leader has: a shorter log
        // would not win the votes.
        let caught_up: Vec<u64> = voters
            .iter()
            .filter(|(id, n)| *id != me && !n.witness && matched(*id) == Some(last))
            .map(|(id, _)| *id)
            .collect();
        let target = match to {
            Some(t) if t == me => return Err(ClusterError::Transfer(format!("node {t} already leads"))),
            Some(t) if !voters.iter().any(|(id, n)| *id == t && !n.witness) => {
                return Err(ClusterError::Transfer(format!("node {t} is not a data voter of this cluster")))
            }
            Some(t) if !caught_up.contains(&t) => {
                return Err(ClusterError::Transfer(format!(
                    "node {t} is not caught up (matched {:?} of {last})",
                    matched(t)
                )))
            }
            Some(t) => t,
            None => *caught_up
                .first()
                .ok_or_else(|| ClusterError::Transfer("no caught-up data voter to hand over to".into()))?,
        };
        let hold = (self.inner.lease * crate::handover::HOLD_LEASES).min(HANDOVER_HOLD_MAX);
        let until = self.inner.handover.begin(target, hold);
        let ttl = (self.inner.tick * 2).max(Duration::from_millis(20));
        let mut notices = tokio::task::JoinSet::new();
        for (id, node) in voters.iter().filter(|(id, _)| *id != me) {
            let mut client = {
                use openraft::network::RaftNetworkFactory;
                let mut peers = self.inner.peers.clone();
                peers.new_client(*id, node).await
            };
            let id = *id;
            notices.spawn(async move { (id, client.hand_over(me, target, hold, ttl).await) });
        }
        let mut acked = 1; // this node
        let mut successor_acked = false;
        while let Some(Ok((id, ok))) = notices.join_next().await {
            if ok {
                acked += 1;
                successor_acked |= id == target;
            }
        }
        if acked * 2 <= voters.len() || !successor_acked {
            self.inner.handover.end();
            return Err(ClusterError::Transfer(format!(
                "only {acked} of {} voters acknowledged the hand-over (successor {target}: {successor_acked}); nothing changed",
                voters.len()
            )));
        }
        tracing::info!(target: "keel::raft", to = target, hold_ms = hold.as_millis(), "handing leadership over: heartbeats stop, the VIP stays until the successor asks");
        raft.runtime_config().heartbeat(false);
        let mut changes = self.inner.handover.subscribe();
        let done = loop {
            if self.inner.handover.successor_asked() {
                break true;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break false;
            }
            if tokio::time::timeout(left, changes.changed()).await.is_ok_and(|r| r.is_err()) {
                break false;
            }
        };
        if done && !self.inner.handover.let_go(RELEASE_WITHIN).await {
            // Ending the hand-over before the controller acted would make it delete the
            // address instead of stepping aside.
            tracing::warn!(target: "keel::raft", "hand-over: the VIP controller has not let go yet");
        }
        raft.runtime_config().heartbeat(true);
        self.inner.handover.end();
        let leader = raft.metrics().borrow().current_leader;
        if done {
            tracing::info!(target: "keel::raft", to = target, "leadership handed over; the successor has the VIP");
            Ok(target)
        } else {
            tracing::warn!(target: "keel::raft", to = target, ?leader, "hand-over did not complete within its hold; the lease decides again");
            Err(ClusterError::Transfer(format!(
                "node {target} did not take over within {} ms (leader now {leader:?})",
                hold.as_millis()
            )))
        }
    }

    /// The current leader's id and admin address, if known.
    pub fn leader(&self) -> (Option<u64>, Option<SocketAddr>) {
        let m = self.inner.raft.metrics().borrow().clone();
        let addr = m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| n.admin_addr));
        (m.current_leader, addr)
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let last = m.last_log_index;
        let matched = |id: u64| -> Option<u64> {
            if id == m.id {
                return last;
            }
            m.replication.as_ref()?.get(&id).cloned().flatten().map(|l| l.index)
        };
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let matched_index = if m.replication.is_some() { matched(*id) } else { None };
                MemberStatus {
                    id: *id,
                    node: node.clone(),
                    voter: voters.contains(id),
                    matched_index,
                    lag: if m.replication.is_some() {
                        Some(last.unwrap_or(0).saturating_sub(matched_index.unwrap_or(0)))
                    } else {
                        None
                    },
                }
            })
            .collect();
        let applied_index = m.last_applied.map(|l| l.index);
        let commit_index = if m.replication.is_some() && !voters.is_empty() {
            // The highest index a majority of voters have: sort descending, take the quorum-th.
            let mut idx: Vec<u64> = voters.iter().map(|v| matched(*v).unwrap_or(0)).collect();
            idx.sort_unstable_by(|a, b| b.cmp(a));
            idx.get(voters.len() / 2).copied()
        } else {
            applied_index
        };
        let lease_ms = u64::try_from(self.inner.lease.as_millis()).unwrap_or(u64::MAX);
        let tick_ms = u64::try_from(self.inner.tick.as_millis()).unwrap_or(u64::MAX);
        let quorum_acked_within_lease = m.state == ServerState::Leader
            && m.millis_since_quorum_ack.is_some_and(|ms| ms.saturating_add(tick_ms) < lease_ms);
        ClusterStatus {
            id: m.id,
            role,
            leader_id: m.current_leader,
            leader_admin_addr: m.current_leader.and_then(|id| membership.get_node(&id).map(|n| n.admin_addr)),
            term: m.current_term,
            last_log_index: last,
            commit_index,
            applied_index,
            snapshot_index: m.snapshot.map(|l| l.index),
            members,
            millis_since_quorum_ack: m.millis_since_quorum_ack,
            lease_ms,
            quorum_acked_within_lease,
            removed: self.inner.removal.current(),
            vips: self.inner.state.borrow().vips.clone(),
        }
    }

    /// Stops Raft and the RPC server. Other clones of the handle see a stopped node.
    pub async fn shutdown(&self) {
        self.inner.server.shutdown();
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(target: "keel::raft", error = %e, "raft shutdown failed");
        }
        self.inner.leadership_task.abort();
        tracing::info!(target: "keel::raft", node = self.inner.id, "raft node stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survivors_stand_in_id_order_without_the_silent_leader_or_witnesses() {
        let voters = [(1, false), (2, false), (3, false)];
        assert_eq!(stand_rank(2, voters.into_iter(), Some(1)), Some((0, 2)));
        assert_eq!(stand_rank(3, voters.into_iter(), Some(1)), Some((1, 2)));
        // A node whose own metrics still name itself (a restarted ex-leader) is not excluded.
        assert_eq!(stand_rank(1, voters.into_iter(), Some(1)), Some((0, 3)));
        // No leader known: everyone has a slot.
        assert_eq!(stand_rank(3, voters.into_iter(), None), Some((2, 3)));
        // A pair and its witness: the survivor stands first, the witness never here.
        let pair = [(1, false), (2, false), (3, true)];
        assert_eq!(stand_rank(2, pair.into_iter(), Some(1)), Some((0, 1)));
        assert_eq!(stand_rank(3, pair.into_iter(), Some(1)), None);
        // A learner (not among the voters) never stands.
        assert_eq!(stand_rank(4, voters.into_iter(), Some(1)), None);
    }

    #[test]
    fn the_first_candidate_stands_once_votes_can_be_granted_and_the_next_one_a_stagger_later() {
        let fast = StandTimes::new(FAST_HEARTBEAT, FAST_ELECTION_MAX);
        assert_eq!(fast.first_stand(0), FAST_ELECTION_MAX + Duration::from_micros(2500));
        assert_eq!(fast.first_stand(1) - fast.first_stand(0), FAST_HEARTBEAT);
        assert_eq!(fast.poll, Duration::from_millis(2));
        let default = StandTimes::new(DEFAULT_HEARTBEAT, DEFAULT_ELECTION_MAX);
        assert_eq!(default.first_stand(0), DEFAULT_ELECTION_MAX + Duration::from_millis(5));
        // A tiny heartbeat still leaves a margin and a poll the timer can keep.
        let tiny = StandTimes::new(Duration::from_millis(2), Duration::from_millis(20));
        assert_eq!(tiny.margin, Duration::from_millis(2));
        assert_eq!(tiny.poll, Duration::from_millis(1));
        // A node that has heard no leader since it started waits out a leader's reconnect
        // backoff before it stands.
        assert!(fast.stand_after(0, false) > UNREACHABLE_BACKOFF + FAST_ELECTION_MAX);
        assert_eq!(fast.stand_after(1, true), fast.first_stand(1));
    }
}
