//! Inbound Raft RPC: [`RaftServer`] accepts on the node's raft address, checks each
//! connection's handshake, then answers requests one after another by handing them to a
//! [`Dispatch`] (in production [`dispatch_to`] the local `Raft`; in tests a fake).
//!
//! A connection that sends garbage, an oversized frame, the wrong cluster id or nothing at all
//! (beyond [`IDLE_TIMEOUT`]) is closed with a log line on target `keel::raft`; the accept loop
//! and every other connection carry on.

use std::future::Future;
use std::io::Cursor;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::Snapshot;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{
    read_body, read_frame, read_header, write_frame, FrameError, Hello, HelloReply, RpcRequest, RpcResponse,
    FRAME_TIMEOUT, KIND_HELLO, KIND_RPC, KIND_SNAPSHOT, PROTOCOL_VERSION,
};
use crate::throttle::{LogThrottle, EVERY};
use crate::types::Raft;

/// A connection silent for this long is closed (a leader sends heartbeats every few tens of ms).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers one request.
pub type Dispatch = Arc<dyn Fn(RpcRequest) -> Pin<Box<dyn Future<Output = RpcResponse> + Send>> + Send + Sync>;

/// A [`Dispatch`] that hands requests to the local `Raft`.
pub fn dispatch_to(raft: Raft) -> Dispatch {
    Arc::new(move |req| {
        let raft = raft.clone();
        Box::pin(async move {
            match req {
                RpcRequest::AppendEntries(r) => match raft.append_entries(r).await {
                    Ok(resp) => RpcResponse::AppendEntries(resp),
                    Err(e) => RpcResponse::Error(e.to_string()),
                },
                RpcRequest::Vote(r) => match raft.vote(r).await {
                    Ok(resp) => RpcResponse::Vote(resp),
                    Err(e) => RpcResponse::Error(e.to_string()),
                },
                // Answered by the wrapper that knows when a leader was last heard from
                // (`node::noting_leader_contact`); without it, never grant.
                RpcRequest::PreVote { .. } => RpcResponse::PreVote(false),
                // Likewise answered by the node's wrapper, which holds the hand-over state.
                RpcRequest::HandOver { .. } => RpcResponse::HandOver(false),
                RpcRequest::Release { .. } => RpcResponse::Released(false),
                RpcRequest::Removed { .. } => RpcResponse::Error("not handled here".into()),
                // The VIP ledger lives in the node's wrapper too; without it, acknowledge nothing.
                RpcRequest::VipRenew(_) => RpcResponse::VipRenewed(Vec::new()),
                RpcRequest::VipLastAck { .. } => RpcResponse::VipLastAck(None),
                RpcRequest::FullSnapshot { vote, meta, data } => {
                    let snapshot = Snapshot { meta, snapshot: Box::new(Cursor::new(data)) };
                    match raft.install_full_snapshot(vote, snapshot).await {
                        Ok(resp) => RpcResponse::Snapshot(resp),
                        Err(e) => RpcResponse::Error(e.to_string()),
                    }
                }
            }
        })
    })
}

/// The running Raft RPC listener. Dropping it stops accepting and closes every connection.
pub struct RaftServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl RaftServer {
    /// Starts serving `listener` for node `node_id` of `cluster_id`.
    pub fn start(listener: TcpListener, node_id: u64, cluster_id: String, dispatch: Dispatch) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, node_id, Arc::from(cluster_id), dispatch));
        Ok(RaftServer { local_addr, task })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops the listener and all its connections.
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for RaftServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, node_id: u64, cluster_id: Arc<str>, dispatch: Dispatch) {
    // Connections live in this set: aborting the accept loop drops it, which aborts them all.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (cluster_id, dispatch) = (cluster_id.clone(), dispatch.clone());
                    conns.spawn(async move {
                        if let Err(e) = serve_conn(stream, node_id, &cluster_id, dispatch).await {
                            // Anyone who can reach the Raft port can end connections this way.
                            static CLOSING: LogThrottle = LogThrottle::new(EVERY);
                            crate::throttled!(CLOSING, warn, target: "keel::raft", %peer, error = %e,
                                "closing raft connection");
                        }
                    });
                }
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    static ACCEPT_FAILED: LogThrottle = LogThrottle::new(EVERY);
                    crate::throttled!(ACCEPT_FAILED, warn, target: "keel::raft", error = %e, "raft accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(
    mut stream: TcpStream,
    node_id: u64,
    cluster_id: &str,
    dispatch: Dispatch,
) -> Result<(), FrameError> {
    stream.set_nodelay(true)?;
    let hello: Hello = read_frame(&mut stream, KIND_HELLO, FRAME_TIMEOUT).await?;
    let refusal = if hello.version != PROTOCOL_VERSION {
        Some(format!("protocol version {} is not {PROTOCOL_VERSION}", hello.version))
    } else if hello.cluster_id != cluster_id {
        Some(format!("cluster id {:?} does not match this node's {cluster_id:?}", hello.cluster_id))
    } else if hello.to != node_id {
        Some(format!("this address is node {node_id}, not node {}", hello.to))
    } else {
        None
    };
    if let Some(reason) = refusal {
        // Best effort: the peer may already be gone.
        let _ = write_frame(&mut stream, KIND_HELLO, &HelloReply::Rejected(reason.clone())).await;
        return Err(FrameError::Rejected(format!("from node {}: {reason}", hello.from)));
    }
    write_frame(&mut stream, KIND_HELLO, &HelloReply::Welcome).await?;
    loop {
        let (kind, len) = match tokio::time::timeout(IDLE_TIMEOUT, read_header(&mut stream)).await {
            Err(_) => return Ok(()),
            Ok(Err(FrameError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(other) => other?,
        };
        if kind != KIND_RPC && kind != KIND_SNAPSHOT {
            return Err(FrameError::UnexpectedKind { expected: KIND_RPC, got: kind });
        }
        let req: RpcRequest = read_body(&mut stream, len).await?;
        let resp = dispatch(req).await;
        write_frame(&mut stream, KIND_RPC, &resp).await?;
    }
}

#[cfg(test)]
mod tests {
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{VoteRequest, VoteResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::network::NetworkFactory;
    use crate::types::{NodeInfo, Vote};

    const CLOSE_DEADLINE: Duration = Duration::from_secs(10);

    fn fake() -> Dispatch {
        Arc::new(|req| {
            Box::pin(async move {
                match req {
                    RpcRequest::Vote(v) => {
                        RpcResponse::Vote(VoteResponse { vote: v.vote, vote_granted: true, last_log_id: None })
                    }
                    _ => RpcResponse::Error("unsupported in this test".into()),
                }
            })
        })
    }

    async fn vote_via(addr: SocketAddr, cluster: &str, to: u64) -> Result<VoteResponse<u64>, String> {
        let mut factory = NetworkFactory::new(cluster.into(), 7, Duration::from_secs(5));
        let node = NodeInfo { raft_addr: addr, admin_addr: addr, witness: false };
        let mut client = factory.new_client(to, &node).await;
        let req = VoteRequest { vote: Vote::new(3, 7), last_log_id: None };
        let opt = RPCOption::new(Duration::from_secs(2));
        client.vote(req, opt).await.map_err(|e| e.to_string())
    }

    /// Reads until the server closes the connection; fails if it stays open past the deadline.
    async fn assert_closed(mut s: TcpStream) {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(CLOSE_DEADLINE, async {
            for _ in 0..1000 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
            false
        })
        .await;
        assert_eq!(closed, Ok(true), "server did not close the connection");
    }

    #[tokio::test]
    async fn garbage_and_wrong_cluster_are_rejected_and_the_server_keeps_serving() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = RaftServer::start(listener, 1, "prod".into(), fake()).unwrap();
        let addr = server.local_addr();

        assert!(vote_via(addr, "prod", 1).await.unwrap().vote_granted);

        // An HTTP client on the raft port: "GET " reads as an unknown kind / oversized frame.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert_closed(s).await;

        // A valid header announcing a huge frame.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[KIND_HELLO, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
        assert_closed(s).await;

        // Random bytes inside a well-sized hello frame.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[KIND_HELLO, 0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef]).await.unwrap();
        assert_closed(s).await;

        // Wrong cluster id and wrong target node: clear errors on the client side.
        let err = vote_via(addr, "staging", 1).await.unwrap_err();
        assert!(err.contains("cluster id"), "{err}");
        let err = vote_via(addr, "prod", 2).await.unwrap_err();
        assert!(err.contains("not node 2"), "{err}");

        // Still serving.
        assert!(vote_via(addr, "prod", 1).await.unwrap().vote_granted);
    }

    #[tokio::test]
    async fn a_peer_that_connects_and_says_nothing_is_dropped() {
        tokio::time::pause();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = RaftServer::start(listener, 1, "prod".into(), fake()).unwrap();
        let s = TcpStream::connect(server.local_addr()).await.unwrap();
        // With paused time the handshake deadline fires as soon as everything is idle.
        assert_closed(s).await;
    }

    #[tokio::test]
    async fn client_reconnects_after_the_server_restarts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = RaftServer::start(listener, 1, "prod".into(), fake()).unwrap();
        let mut factory = NetworkFactory::new("prod".into(), 7, Duration::from_secs(5));
        let node = NodeInfo { raft_addr: addr, admin_addr: addr, witness: false };
        let mut client = factory.new_client(1, &node).await;
        let req = || VoteRequest { vote: Vote::new(3, 7), last_log_id: None };
        let opt = || RPCOption::new(Duration::from_secs(2));
        assert!(client.vote(req(), opt()).await.is_ok());
        drop(server);
        // The old connection is dead: one failure, then the restarted server is reached again.
        // Aborting the accept task releases the port asynchronously: retry the bind until a deadline.
        let deadline = tokio::time::Instant::now() + CLOSE_DEADLINE;
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        let server = RaftServer::start(listener, 1, "prod".into(), fake()).unwrap();
        let mut ok = false;
        for _ in 0..3 {
            if client.vote(req(), opt()).await.is_ok() {
                ok = true;
                break;
            }
        }
        assert!(ok, "client did not reconnect");
        drop(server);
    }
}
