//! Outbound Raft RPC: [`NetworkFactory`] makes one [`PeerClient`] per target node; the client
//! keeps one TCP connection, reuses it for every request, and drops it on any error so the next
//! request reconnects (and re-handshakes).
//!
//! Timeouts: connecting is bounded by [`CONNECT_TIMEOUT`] (and by openraft's per-RPC hard TTL);
//! a whole request — connect, write, wait for the answer — by openraft's `hard_ttl`; a snapshot
//! by the configured `send_snapshot_timeout`. A connect failure is reported as `Unreachable`,
//! which makes openraft back off for [`UNREACHABLE_BACKOFF`] before trying that peer again;
//! anything after connecting is a `Network` error, retried at the next heartbeat.
//!
//! Logs: a peer that stops answering is retried every [`UNREACHABLE_BACKOFF`], so logging each
//! failure would write 20 lines a second for as long as it is down. Every client to one peer
//! shares that peer's [`PeerLink`], which turns the stream of outcomes into three lines: the
//! peer going (once), a reminder at most every [`PEER_REMINDER`] while it stays away, and its
//! return (once, with how long it was gone). openraft's own per-RPC lines about the same
//! failures are filtered out by the binary's subscriber set-up (`openraft::replication`).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, Snapshot};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{read_frame, write_frame, FrameError, Hello, HelloReply, RpcRequest, RpcResponse, FRAME_TIMEOUT};
use crate::types::{NodeInfo, TypeConfig, Vote};

/// Upper bound on establishing a TCP connection to a peer (a LAN peer answers in < 1 ms).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long openraft waits before retrying an unreachable peer. Short: a peer that restarts
/// gets no heartbeat until the retry, and while it is the leader's only other live voter (a
/// pair whose witness is down) the leader's lease cannot outlast a long wait.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(50);

/// While a peer stays unreachable, at most one reminder per this long.
pub const PEER_REMINDER: Duration = Duration::from_secs(30);

/// Makes [`PeerClient`]s for openraft.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    cluster_id: String,
    self_id: u64,
    snapshot_timeout: Duration,
    /// One link record per peer, shared by every client openraft makes to it (replication
    /// streams are remade on each leadership change; the peer's state must outlive them).
    links: Arc<Mutex<HashMap<u64, Arc<PeerLink>>>>,
}

impl NetworkFactory {
    /// A factory for node `self_id` of cluster `cluster_id`.
    pub fn new(cluster_id: String, self_id: u64, snapshot_timeout: Duration) -> Self {
        NetworkFactory { cluster_id, self_id, snapshot_timeout, links: Arc::default() }
    }

    fn link(&self, target: u64) -> Arc<PeerLink> {
        // A poisoned map only means a panic elsewhere mid-insert; the map itself is intact.
        let mut links = self.links.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        links.entry(target).or_insert_with(|| Arc::new(PeerLink::new(target))).clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> Self::Network {
        PeerClient {
            hello: Hello {
                version: super::PROTOCOL_VERSION,
                cluster_id: self.cluster_id.clone(),
                from: self.self_id,
                to: target,
            },
            addr: node.raft_addr,
            conn: None,
            snapshot_timeout: self.snapshot_timeout,
            link: self.link(target),
        }
    }
}

/// A connection (made lazily, reused, remade after errors) to one peer.
#[derive(Debug)]
pub struct PeerClient {
    hello: Hello,
    addr: SocketAddr,
    conn: Option<TcpStream>,
    snapshot_timeout: Duration,
    link: Arc<PeerLink>,
}

/// Whether one peer answers, as every client to it saw: the source of the "peer unreachable" /
/// "reachable again" lines.
#[derive(Debug)]
pub struct PeerLink {
    id: u64,
    /// Read alone on the hot path: a heartbeat to a healthy peer costs one atomic load.
    down: AtomicBool,
    outage: Mutex<Outage>,
}

#[derive(Debug, Default)]
struct Outage {
    since: Option<Instant>,
    failed_calls: u64,
    reminded: Option<Instant>,
}

/// What a call's outcome changes in what is known of a peer, i.e. which line to write.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkChange {
    /// Nothing worth a line.
    Quiet,
    /// The peer stopped answering.
    Down,
    /// Still down since `for_`, after `failed_calls` failed calls; a reminder is due.
    StillDown {
        /// How long it has been down.
        for_: Duration,
        /// Calls failed since it went down.
        failed_calls: u64,
    },
    /// It answers again after `for_` and `failed_calls` failed calls.
    Back {
        /// How long it was down.
        for_: Duration,
        /// Calls that failed meanwhile.
        failed_calls: u64,
    },
}

impl PeerLink {
    /// A peer believed up until a call fails.
    pub fn new(id: u64) -> Self {
        PeerLink { id, down: AtomicBool::new(false), outage: Mutex::new(Outage::default()) }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, Outage> {
        self.outage.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A call to the peer failed (it could not be reached, or did not answer).
    pub fn failed(&self) -> LinkChange {
        let now = Instant::now();
        let mut outage = self.outage();
        let Some(since) = outage.since else {
            *outage = Outage { since: Some(now), failed_calls: 1, reminded: Some(now) };
            self.down.store(true, Ordering::Release);
            return LinkChange::Down;
        };
        outage.failed_calls += 1;
        let last = outage.reminded.unwrap_or(since);
        if now.saturating_duration_since(last) < PEER_REMINDER {
            return LinkChange::Quiet;
        }
        outage.reminded = Some(now);
        LinkChange::StillDown { for_: now.saturating_duration_since(since), failed_calls: outage.failed_calls }
    }

    /// The peer answered a call.
    pub fn answered(&self) -> LinkChange {
        if !self.down.load(Ordering::Acquire) {
            return LinkChange::Quiet;
        }
        let mut outage = self.outage();
        self.down.store(false, Ordering::Release);
        match std::mem::take(&mut *outage) {
            Outage { since: Some(since), failed_calls, .. } => {
                LinkChange::Back { for_: Instant::now().saturating_duration_since(since), failed_calls }
            }
            // Another client saw the return first.
            Outage { since: None, .. } => LinkChange::Quiet,
        }
    }

    /// Writes the line `change` calls for.
    fn log(&self, change: LinkChange, addr: SocketAddr, error: Option<&CallError>) {
        let peer = self.id;
        match change {
            LinkChange::Quiet => {}
            LinkChange::Down => {
                tracing::warn!(target: "keel::raft", peer, %addr, error = error.map(tracing::field::display),
                    "raft peer unreachable; retrying quietly")
            }
            LinkChange::StillDown { for_, failed_calls } => {
                tracing::warn!(target: "keel::raft", peer, %addr, down_for = ?Secs(for_), failed_calls,
                    error = error.map(tracing::field::display), "raft peer still unreachable")
            }
            LinkChange::Back { for_, failed_calls } => {
                tracing::info!(target: "keel::raft", peer, %addr, down_for = ?Secs(for_), failed_calls,
                    "raft peer reachable again")
            }
        }
    }
}

/// A duration as whole seconds for a log line ("12s").
struct Secs(Duration);

impl std::fmt::Debug for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

/// A peer's answer to a pre-vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreVoteAnswer {
    /// It would vote for the candidate.
    Granted,
    /// It would not (or could not be asked).
    Refused,
    /// Its membership, newer than the candidate's log, does not list the candidate.
    NotAMember {
        /// The peer's term.
        term: u64,
    },
}

/// Why a call failed: before a connection existed, or after.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Could not connect or handshake: the peer is down, or refuses us.
    #[error("peer {addr} unreachable: {source}")]
    Unreachable {
        /// The peer's raft address.
        addr: SocketAddr,
        /// What failed.
        source: FrameError,
    },
    /// Connected, but the exchange failed or timed out.
    #[error("rpc to {addr} failed: {source}")]
    Network {
        /// The peer's raft address.
        addr: SocketAddr,
        /// What failed.
        source: FrameError,
    },
    /// The remote Raft answered with an error.
    #[error("remote error from {addr}: {message}")]
    Remote {
        /// The peer's raft address.
        addr: SocketAddr,
        /// Its message.
        message: String,
    },
}

impl PeerClient {
    /// Asks the peer whether it would grant `candidate` its vote now (keel's pre-vote); a
    /// refusal for any failure: a peer that cannot be asked is not a vote.
    pub async fn pre_vote(&mut self, candidate: u64, last_log_index: Option<u64>, ttl: Duration) -> PreVoteAnswer {
        let req = RpcRequest::PreVote { candidate, last_log_index };
        match self.call(super::KIND_RPC, &req, ttl).await {
            Ok(RpcResponse::PreVote(true)) => PreVoteAnswer::Granted,
            Ok(RpcResponse::NotAMember { term }) => PreVoteAnswer::NotAMember { term },
            _ => PreVoteAnswer::Refused,
        }
    }

    /// Tells the peer it was removed from the cluster (best effort).
    pub async fn removed(&mut self, term: u64, ttl: Duration) -> bool {
        matches!(self.call(super::KIND_RPC, &RpcRequest::Removed { term }, ttl).await, Ok(RpcResponse::Noted))
    }

    /// Tells the peer that `from` hands over to `to`, holding the VIP for at most `hold`;
    /// `true` once it noted it.
    pub async fn hand_over(&mut self, from: u64, to: u64, hold: Duration, ttl: Duration) -> bool {
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        let req = RpcRequest::HandOver { from, to, hold_ms };
        matches!(self.call(super::KIND_RPC, &req, ttl).await, Ok(RpcResponse::HandOver(true)))
    }

    /// Asks the peer that handed over to let go of the VIP; `true` once it confirmed it did.
    pub async fn release(&mut self, from: u64, ttl: Duration) -> bool {
        matches!(self.call(super::KIND_RPC, &RpcRequest::Release { from }, ttl).await, Ok(RpcResponse::Released(true)))
    }

    /// Sends a VIP renewal; the VIPs the peer acknowledged (none if it did not answer).
    pub async fn renew_vips(&mut self, renewal: crate::vips::Renewal, ttl: Duration) -> Vec<std::net::IpAddr> {
        match self.call(super::KIND_RPC, &RpcRequest::VipRenew(renewal), ttl).await {
            Ok(RpcResponse::VipRenewed(acked)) => acked,
            _ => Vec::new(),
        }
    }

    /// Asks when the peer last acknowledged `node` for `vip`: `Some(elapsed)` once its answer
    /// is final (`Duration::MAX`: never), `None` if it is not yet or did not answer.
    pub async fn vip_last_ack(&mut self, node: u64, vip: std::net::IpAddr, ttl: Duration) -> Option<Duration> {
        match self.call(super::KIND_RPC, &RpcRequest::VipLastAck { node, vip }, ttl).await {
            Ok(RpcResponse::VipLastAck(Some(us))) if us == u64::MAX => Some(Duration::MAX),
            Ok(RpcResponse::VipLastAck(Some(us))) => Some(Duration::from_micros(us)),
            _ => None,
        }
    }

    async fn connect(&mut self, limit: Duration) -> Result<TcpStream, FrameError> {
        let limit = limit.min(CONNECT_TIMEOUT);
        let mut stream = tokio::time::timeout(limit, TcpStream::connect(self.addr))
            .await
            .map_err(|_| FrameError::Timeout(limit))??;
        stream.set_nodelay(true)?;
        write_frame(&mut stream, super::KIND_HELLO, &self.hello).await?;
        match read_frame::<_, HelloReply>(&mut stream, super::KIND_HELLO, FRAME_TIMEOUT).await? {
            HelloReply::Welcome => Ok(stream),
            HelloReply::Rejected(reason) => Err(FrameError::Rejected(reason)),
        }
    }

    /// Sends one request and waits for its answer within `ttl`; what came of it updates (and
    /// may log) what is known of the peer.
    pub async fn call(&mut self, kind: u8, req: &RpcRequest, ttl: Duration) -> Result<RpcResponse, CallError> {
        let result = self.exchange(kind, req, ttl).await;
        match &result {
            Ok(_) | Err(CallError::Remote { .. }) => self.link.log(self.link.answered(), self.addr, None),
            Err(e) => self.link.log(self.link.failed(), self.addr, Some(e)),
        }
        result
    }

    async fn exchange(&mut self, kind: u8, req: &RpcRequest, ttl: Duration) -> Result<RpcResponse, CallError> {
        let addr = self.addr;
        let mut stream = match self.conn.take() {
            Some(s) => s,
            None => self.connect(ttl).await.map_err(|source| {
                tracing::debug!(target: "keel::raft", peer = %addr, error = %source, "cannot reach peer");
                CallError::Unreachable { addr, source }
            })?,
        };
        let exchange = async {
            write_frame(&mut stream, kind, req).await?;
            read_frame::<_, RpcResponse>(&mut stream, super::KIND_RPC, ttl).await
        };
        let resp = tokio::time::timeout(ttl, exchange)
            .await
            .map_err(|_| FrameError::Timeout(ttl))
            .and_then(|r| r)
            .map_err(|source| CallError::Network { addr, source })?;
        // Only a connection that completed an exchange is kept for reuse.
        self.conn = Some(stream);
        match resp {
            RpcResponse::Error(message) => Err(CallError::Remote { addr, message }),
            other => Ok(other),
        }
    }
}

/// What an AppendEntries frame may use, leaving room for the enum tag around the request.
const APPEND_BUDGET: usize = super::MAX_RPC as usize - 4096;

/// Cuts `rpc` to the longest prefix (halving) whose frame fits [`super::MAX_RPC`]. A follower
/// that fell behind is sent up to openraft's `max_payload_entries` (300) log entries at once,
/// and one sticky batch is up to ≈ 0.5 MB: together more than a frame may carry, and the
/// receiver would drop every such frame, so the follower would never catch up. The rest goes in
/// the next request (openraft takes `PartialSuccess` for the prefix). The commit index sent is
/// capped at the last entry sent: the follower must not commit entries of its own beyond them
/// that the leader has not confirmed. Returns `Some(last log id sent)` when it cut.
fn fit_in_a_frame(rpc: &mut AppendEntriesRequest<TypeConfig>) -> Option<Option<crate::types::LogId>> {
    let mut trimmed = false;
    while rpc.entries.len() > 1 && crate::codec::encoded_len(rpc).is_ok_and(|n| n > APPEND_BUDGET) {
        rpc.entries.truncate(rpc.entries.len() / 2);
        trimmed = true;
    }
    if !trimmed {
        return None;
    }
    let last = rpc.entries.last().map(|e| e.log_id);
    if rpc.leader_commit > last {
        rpc.leader_commit = last;
    }
    tracing::debug!(target: "keel::raft", entries = rpc.entries.len(), ?last, "append entries cut to fit a frame");
    Some(last)
}

fn unexpected(what: &str) -> CallError {
    CallError::Network {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source: FrameError::Io(io::Error::other(format!("peer answered with the wrong response type to {what}"))),
    }
}

fn to_rpc_error<E: std::error::Error>(e: CallError) -> RPCError<u64, NodeInfo, E> {
    match &e {
        CallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        let trimmed = fit_in_a_frame(&mut rpc);
        match self.call(super::KIND_RPC, &RpcRequest::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(RpcResponse::AppendEntries(AppendEntriesResponse::Success)) if trimmed.is_some() => {
                Ok(AppendEntriesResponse::PartialSuccess(trimmed.flatten()))
            }
            Ok(RpcResponse::AppendEntries(r)) => Ok(r),
            Ok(_) => Err(to_rpc_error(unexpected("append_entries"))),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64, InstallSnapshotError>>> {
        // keel overrides `full_snapshot` and never sends chunks.
        let e = io::Error::other("keel sends whole snapshots; chunked install_snapshot is not used");
        Err(RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        match self.call(super::KIND_RPC, &RpcRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcResponse::Vote(r)) => Ok(r),
            Ok(_) => Err(to_rpc_error(unexpected("vote"))),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<u64>, StreamingError<TypeConfig, Fatal<u64>>> {
        let data = snapshot.snapshot.into_inner();
        let req = RpcRequest::FullSnapshot { vote, meta: snapshot.meta, data };
        let ttl = self.snapshot_timeout;
        let res = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            res = self.call(super::KIND_SNAPSHOT, &req, ttl) => res,
        };
        match res {
            Ok(RpcResponse::Snapshot(r)) => Ok(r),
            Ok(_) => Err(StreamingError::Network(NetworkError::new(&unexpected("full_snapshot")))),
            Err(e @ CallError::Unreachable { .. }) => Err(StreamingError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_dead_peer_is_logged_going_reminded_and_coming_back() {
        let link = PeerLink::new(2);
        assert_eq!(link.answered(), LinkChange::Quiet);
        let mut changes = Vec::new();
        // 70 s of failures every 50 ms, as openraft retries an unreachable peer.
        for _ in 0..1_400 {
            match link.failed() {
                LinkChange::Quiet => {}
                change => changes.push(change),
            }
            tokio::time::advance(UNREACHABLE_BACKOFF).await;
        }
        assert_eq!(changes.len(), 3, "{changes:?}");
        assert_eq!(changes[0], LinkChange::Down);
        assert!(
            matches!(changes[1], LinkChange::StillDown { for_, failed_calls: 601 } if for_ == PEER_REMINDER),
            "{changes:?}"
        );
        assert!(matches!(changes[2], LinkChange::StillDown { failed_calls: 1_201, .. }), "{changes:?}");
        let back = link.answered();
        assert_eq!(back, LinkChange::Back { for_: Duration::from_secs(70), failed_calls: 1_400 });
        assert_eq!(link.answered(), LinkChange::Quiet, "back is said once");
        // A new outage starts over.
        assert_eq!(link.failed(), LinkChange::Down);
    }

    #[tokio::test]
    async fn every_client_to_a_peer_shares_its_link() {
        let factory = NetworkFactory::new("c".into(), 1, Duration::from_secs(1));
        let (a, b, other) = (factory.link(2), factory.link(2), factory.link(3));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(a.failed(), LinkChange::Down);
        assert_eq!(b.failed(), LinkChange::Quiet, "the second client knows the peer is down");
    }
}
