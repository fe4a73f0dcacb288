//! Raft RPC between nodes over TCP: the frame format and handshake shared by both sides.
//!
//! - [`client`]: [`RaftNetworkFactory`](openraft::network::RaftNetworkFactory) /
//!   [`RaftNetwork`](openraft::network::RaftNetwork) — outbound, one reused connection per peer.
//! - [`server`]: the listener that checks the handshake and dispatches to the local `Raft`.
//!
//! # Frame format
//!
//! ```text
//! +------+-----------------+---------------------------+
//! | kind | length (u32 BE) | payload: bincode (serde)  |
//! +------+-----------------+---------------------------+
//!   1 B        4 B               length bytes
//! ```
//!
//! `kind` says which size cap applies *before* the payload is read: [`KIND_HELLO`] (4 KiB),
//! [`KIND_RPC`] (8 MiB: AppendEntries batches, votes, responses) or [`KIND_SNAPSHOT`] (64 MiB,
//! a whole snapshot). A length above the cap, an unknown kind, or a payload that does not decode
//! ends the connection with a log line — never a panic, and every read has a deadline.
//!
//! Why length-prefixed bincode and not HTTP/gRPC: the peers are always keel of the same version,
//! the messages are openraft's own serde types, and a 5-byte header plus bincode is the least
//! code and CPU between a heartbeat and the socket (heartbeats every 20 ms to every follower).
//! It also keeps the Raft port distinct from the admin HTTP port: a stray HTTP client on the Raft
//! port reads as an oversized frame and is dropped at once.
//!
//! # Handshake
//!
//! The first frame of a connection is a [`Hello`] with the cluster id, the sender's node id and
//! the node id it expects to reach. The server answers [`HelloReply::Welcome`] or
//! [`HelloReply::Rejected`] (wrong cluster id — e.g. a staging node pointed at production — or
//! the address now belongs to another node id) and then closes. After that the client sends one
//! [`RpcRequest`] and waits for its [`RpcResponse`], in turn, on the same connection.

pub mod client;
pub mod server;

use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use client::{NetworkFactory, PeerClient};
pub use server::{dispatch_to, Dispatch, RaftServer};

use crate::codec;
use crate::types::{SnapshotMeta, TypeConfig, Vote};

/// Frame kind of the handshake.
pub const KIND_HELLO: u8 = 1;
/// Frame kind of ordinary requests and responses.
pub const KIND_RPC: u8 = 2;
/// Frame kind of a whole snapshot.
pub const KIND_SNAPSHOT: u8 = 3;

/// Cap on a handshake frame.
pub const MAX_HELLO: u32 = 4 * 1024;
/// Cap on an ordinary frame.
pub const MAX_RPC: u32 = 8 * 1024 * 1024;
/// Cap on a snapshot frame.
pub const MAX_SNAPSHOT: u32 = 64 * 1024 * 1024;

/// Protocol version in the handshake; bumped on incompatible frame changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Time allowed for the handshake and for the body of any frame once its header arrived.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// First frame of a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sender's cluster id.
    pub cluster_id: String,
    /// The sender's node id.
    pub from: u64,
    /// The node id the sender believes it is talking to.
    pub to: u64,
}

/// The server's answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; requests may follow.
    Welcome,
    /// Refused, with the reason; the server closes the connection.
    Rejected(String),
}

/// One Raft RPC.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcRequest {
    /// Log replication and heartbeats.
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// Election.
    Vote(VoteRequest<u64>),
    /// keel's pre-vote: would the receiver grant `candidate` its vote now? Changes nothing on
    /// the receiver (no term, no vote): a node that cannot win never raises the term.
    PreVote {
        /// Who asks.
        candidate: u64,
        /// The candidate's last log index (a receiver with a longer log says no).
        last_log_index: Option<u64>,
    },
    /// A planned hand-over (`crate::handover`): `from`, the leader, hands leadership and the
    /// VIP over to `to` and may keep the VIP for `hold_ms` from now.
    HandOver {
        /// The leader handing over.
        from: u64,
        /// Its chosen successor.
        to: u64,
        /// How long `from` may keep the VIP (ms).
        hold_ms: u64,
    },
    /// From the successor of a hand-over, now leading: let go of the VIP. Answered once the
    /// address is off the receiver's interface.
    Release {
        /// Who asks.
        from: u64,
    },
    /// From the leader, after a removal of the receiver committed: it is no longer a member.
    Removed {
        /// The leader's term.
        term: u64,
    },
    /// A data node renews its lease on the spread VIPs its state names it for
    /// (`crate::vips`); every voter answers.
    VipRenew(crate::vips::Renewal),
    /// From the leader moving a VIP: when did you last acknowledge `node` for `vip`?
    VipLastAck {
        /// The previous holder.
        node: u64,
        /// The VIP.
        vip: std::net::IpAddr,
    },
    /// A whole snapshot, sent in one [`KIND_SNAPSHOT`] frame.
    FullSnapshot {
        /// The leader's vote.
        vote: Vote,
        /// Snapshot metadata.
        meta: SnapshotMeta,
        /// Snapshot bytes (bincode of [`crate::ClusterState`]), written as one byte string.
        #[serde(with = "crate::codec::bytes_field")]
        data: Vec<u8>,
    },
}

/// The answer to one [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// Answer to AppendEntries.
    AppendEntries(AppendEntriesResponse<u64>),
    /// Answer to Vote.
    Vote(VoteResponse<u64>),
    /// Answer to FullSnapshot.
    Snapshot(SnapshotResponse<u64>),
    /// Answer to PreVote: whether the receiver would grant the vote.
    PreVote(bool),
    /// Answer to PreVote from a voter whose membership, newer than the asker's whole log, no
    /// longer lists the asker: it was removed.
    NotAMember {
        /// The answering node's term.
        term: u64,
    },
    /// Answer to Removed: noted.
    Noted,
    /// Answer to HandOver: noted (only the successor and the other voters say yes).
    HandOver(bool),
    /// Answer to Release: the VIP is off the receiver's interface; claim it.
    Released(bool),
    /// Answer to VipRenew: the VIPs acknowledged.
    VipRenewed(Vec<std::net::IpAddr>),
    /// Answer to VipLastAck: microseconds since the last acknowledgement (`u64::MAX`: never),
    /// or `None` while the receiver's state still names that node for the VIP.
    VipLastAck(Option<u64>),
    /// The receiving Raft failed (e.g. it is shutting down).
    Error(String),
}

/// What went wrong on a Raft connection.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Socket error or the peer closed the connection.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced more bytes than its kind allows.
    #[error("frame of kind {kind} announces {len} bytes, above the cap of {cap}")]
    Oversized {
        /// Frame kind.
        kind: u8,
        /// Announced length.
        len: u32,
        /// Cap for that kind.
        cap: u32,
    },
    /// Unknown frame kind (garbage, or not a keel peer).
    #[error("unknown frame kind {0} (not a keel raft peer?)")]
    UnknownKind(u8),
    /// A frame of a kind not expected here.
    #[error("expected a frame of kind {expected}, got {got}")]
    UnexpectedKind {
        /// Expected kind.
        expected: u8,
        /// Kind received.
        got: u8,
    },
    /// The payload did not decode.
    #[error("undecodable frame: {0}")]
    Codec(#[from] codec::CodecError),
    /// A deadline passed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The peer refused the handshake.
    #[error("handshake rejected: {0}")]
    Rejected(String),
}

fn cap_of(kind: u8) -> Result<u32, FrameError> {
    match kind {
        KIND_HELLO => Ok(MAX_HELLO),
        KIND_RPC => Ok(MAX_RPC),
        KIND_SNAPSHOT => Ok(MAX_SNAPSHOT),
        other => Err(FrameError::UnknownKind(other)),
    }
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    kind: u8,
    value: &T,
) -> Result<(), FrameError> {
    let payload = codec::encode(value)?;
    let cap = cap_of(kind)?;
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    if len > cap {
        return Err(FrameError::Oversized { kind, len, cap });
    }
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.push(kind);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&payload);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame's header, without a deadline (the caller bounds the wait for a frame to
/// start); returns its kind and length after checking the cap.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, u32), FrameError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).await?;
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    let cap = cap_of(kind)?;
    if len > cap {
        return Err(FrameError::Oversized { kind, len, cap });
    }
    Ok((kind, len))
}

/// Reads a frame body of `len` bytes within [`FRAME_TIMEOUT`] and decodes it.
pub async fn read_body<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R, len: u32) -> Result<T, FrameError> {
    let mut body = vec![0u8; len as usize];
    tokio::time::timeout(FRAME_TIMEOUT, r.read_exact(&mut body))
        .await
        .map_err(|_| FrameError::Timeout(FRAME_TIMEOUT))??;
    Ok(codec::decode(&body)?)
}

/// Reads one whole frame of kind `expected` within `deadline`.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    expected: u8,
    deadline: Duration,
) -> Result<T, FrameError> {
    tokio::time::timeout(deadline, async {
        let (kind, len) = read_header(r).await?;
        if kind != expected {
            return Err(FrameError::UnexpectedKind { expected, got: kind });
        }
        read_body(r, len).await
    })
    .await
    .map_err(|_| FrameError::Timeout(deadline))?
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The decoder never panics on arbitrary bytes: it answers a frame or an error.
        #[test]
        fn garbage_never_panics_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let mut r = bytes.as_slice();
                let _ = read_frame::<_, RpcRequest>(&mut r, KIND_RPC, Duration::from_secs(1)).await;
                let mut r = bytes.as_slice();
                let _ = read_frame::<_, Hello>(&mut r, KIND_HELLO, Duration::from_secs(1)).await;
            });
        }
    }

    #[tokio::test]
    async fn oversized_header_is_rejected_before_reading_the_body() {
        let mut bytes = vec![KIND_RPC];
        bytes.extend_from_slice(&(MAX_RPC + 1).to_be_bytes());
        let mut r = bytes.as_slice();
        let err = read_frame::<_, RpcRequest>(&mut r, KIND_RPC, Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, FrameError::Oversized { .. }), "{err}");
    }
}
