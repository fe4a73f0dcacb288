//! Outbound Raft RPC: [`NetworkFactory`] makes one [`PeerClient`] per target node; the client
//! keeps one TCP connection, reuses it for every request, and drops it on any error so the next
//! request reconnects (and re-handshakes).
//!
//! Timeouts: connecting is bounded by [`CONNECT_TIMEOUT`] (and by openraft's per-RPC hard TTL);
//! a whole request — connect, write, wait for the answer — by openraft's `hard_ttl`; a snapshot
//! by the configured `send_snapshot_timeout`. A connect failure is reported as `Unreachable`,
//! which makes openraft back off for [`UNREACHABLE_BACKOFF`] before trying that peer again;
//! anything after connecting is a `Network` error, retried at the next heartbeat.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
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

use super::{read_frame, write_frame, FrameError, Hello, HelloReply, RpcRequest, RpcResponse, FRAME_TIMEOUT};
use crate::types::{NodeInfo, TypeConfig, Vote};

/// Upper bound on establishing a TCP connection to a peer (a LAN peer answers in < 1 ms).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long openraft waits before retrying an unreachable peer. Short: a peer that restarts
/// gets no heartbeat until the retry, and while it is the leader's only other live voter (a
/// pair whose witness is down) the leader's lease cannot outlast a long wait.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(50);

/// Makes [`PeerClient`]s for openraft.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    cluster_id: String,
    self_id: u64,
    snapshot_timeout: Duration,
}

impl NetworkFactory {
    /// A factory for node `self_id` of cluster `cluster_id`.
    pub fn new(cluster_id: String, self_id: u64, snapshot_timeout: Duration) -> Self {
        NetworkFactory { cluster_id, self_id, snapshot_timeout }
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

    /// Sends one request and waits for its answer within `ttl`.
    pub async fn call(&mut self, kind: u8, req: &RpcRequest, ttl: Duration) -> Result<RpcResponse, CallError> {
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
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, NodeInfo, RaftError<u64>>> {
        match self.call(super::KIND_RPC, &RpcRequest::AppendEntries(rpc), option.hard_ttl()).await {
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
