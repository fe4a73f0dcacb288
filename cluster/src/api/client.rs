//! Async client of the cluster admin API, for the CLI (`keel cluster …`, `keel config apply`,
//! `keel backend drain …`) and for nodes that must reach the leader.
//!
//! Every call has a deadline ([`REQUEST_TIMEOUT`], [`MEMBERSHIP_REQUEST_TIMEOUT`] for joins).
//! A 421 answer (see [`super`]) is followed to the named leader, at most [`MAX_HOPS`] times.
//! Errors keep the transport (could not talk to a node) apart from the application (the node
//! answered: rejected, no quorum, bad request).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{AddNode, ApiErrorBody, RemoveNode, StateView, Transfer};
use crate::command::{Command, NodeId, Outcome};
use crate::model::Config;
use crate::node::ClusterStatus;

/// Deadline of an ordinary call (including waiting for a commit).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of add-node (the learner must catch up first).
pub const MEMBERSHIP_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How many leader redirects a call follows.
pub const MAX_HOPS: usize = 3;
/// Largest answer read.
pub const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not reach the node or read its answer.
    #[error("cannot talk to {addr}: {message}")]
    Transport {
        /// The node's admin address.
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// Nothing accepted a connection at the address: refused (no process listens there),
    /// unreachable, or the connect itself timed out.
    #[error("nothing answers at {addr}: {reason}")]
    Unreachable {
        /// The node's admin address.
        addr: SocketAddr,
        /// What the connect attempt met, e.g. "connection refused".
        reason: String,
    },
    /// No answer within the deadline.
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout {
        /// The node's admin address.
        addr: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
    /// The node answered with an error.
    #[error("{addr} answered {status}: {}{}", body.error,
        if body.message.is_empty() { String::new() } else { format!(" ({})", body.message) })]
    Api {
        /// The node that answered.
        addr: SocketAddr,
        /// HTTP status.
        status: StatusCode,
        /// The error body.
        body: ApiErrorBody,
    },
    /// Redirected too often, or to no known leader (an election is running: retry later).
    #[error("no leader reachable: {0}")]
    NoLeader(String),
    /// The answer was not the expected JSON.
    #[error("unexpected answer from {addr}: {message}")]
    Decode {
        /// The node.
        addr: SocketAddr,
        /// Parse error.
        message: String,
    },
}

impl ClientError {
    /// Whether the node answered (as opposed to a transport failure).
    pub fn is_application(&self) -> bool {
        matches!(self, ClientError::Api { .. })
    }
}

/// Client of one cluster, starting at one node's admin address.
#[derive(Clone, Debug)]
pub struct ClusterClient {
    addr: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    token: Option<String>,
}

impl ClusterClient {
    /// A client that first talks to `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        ClusterClient { addr, http: Client::builder(TokioExecutor::new()).build(connector), token: None }
    }

    /// Sends `Authorization: Bearer <token>` with every call (admin APIs that require one).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token;
        self
    }

    /// The address calls start at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET path` on the node this client points at, as JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        self.call(Method::GET, path, None::<&()>, REQUEST_TIMEOUT, false).await
    }

    /// `POST path` with a JSON body on the node this client points at.
    pub async fn post_json<B: Serialize>(&self, path: &str, body: &B) -> Result<serde_json::Value, ClientError> {
        self.call(Method::POST, path, Some(body), REQUEST_TIMEOUT, true).await
    }

    /// `GET /cluster/status` of the node this client points at.
    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(Method::GET, "/cluster/status", None::<&()>, REQUEST_TIMEOUT, false).await
    }

    /// `GET /cluster/state` of the node this client points at.
    pub async fn state(&self) -> Result<StateView, ClientError> {
        self.call(Method::GET, "/cluster/state", None::<&()>, REQUEST_TIMEOUT, false).await
    }

    /// `POST /cluster/init` with the seed config.
    pub async fn init(&self, seed: &Config) -> Result<Outcome, ClientError> {
        self.call(Method::POST, "/cluster/init", Some(seed), REQUEST_TIMEOUT, false).await
    }

    /// `POST /cluster/add-node`, following the leader.
    pub async fn add_node(&self, node: &AddNode) -> Result<serde_json::Value, ClientError> {
        self.call(Method::POST, "/cluster/add-node", Some(node), MEMBERSHIP_REQUEST_TIMEOUT, true).await
    }

    /// `POST /cluster/remove`, following the leader.
    pub async fn remove(&self, id: NodeId) -> Result<serde_json::Value, ClientError> {
        self.call(Method::POST, "/cluster/remove", Some(&RemoveNode { id }), MEMBERSHIP_REQUEST_TIMEOUT, true).await
    }

    /// `POST /cluster/transfer`, following the leader.
    pub async fn transfer(&self, to: Option<NodeId>) -> Result<serde_json::Value, ClientError> {
        self.call(Method::POST, "/cluster/transfer", Some(&Transfer { to }), MEMBERSHIP_REQUEST_TIMEOUT, true).await
    }

    /// `POST /cluster/vip/move`, following the leader.
    pub async fn move_vip(&self, vip: std::net::IpAddr, to: NodeId) -> Result<serde_json::Value, ClientError> {
        self.call(
            Method::POST,
            "/cluster/vip/move",
            Some(&super::VipMove { vip, to }),
            MEMBERSHIP_REQUEST_TIMEOUT,
            true,
        )
        .await
    }

    /// `POST /cluster/propose`, following the leader.
    pub async fn propose(&self, command: &Command) -> Result<Outcome, ClientError> {
        self.call(Method::POST, "/cluster/propose", Some(command), REQUEST_TIMEOUT, true).await
    }

    /// `GET path` on the node this client points at, as text (e.g. `/config`, TOML).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let (addr, bytes) = self.call_raw(Method::GET, path, None::<&()>, REQUEST_TIMEOUT, false).await?;
        String::from_utf8(bytes.to_vec()).map_err(|e| ClientError::Decode { addr, message: e.to_string() })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        follow: bool,
    ) -> Result<T, ClientError> {
        let (addr, bytes) = self.call_raw(method, path, body, timeout, follow).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { addr, message: e.to_string() })
    }

    /// One call, following leader redirects; the successful answer's body and who gave it.
    async fn call_raw<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        follow: bool,
    ) -> Result<(SocketAddr, Bytes), ClientError> {
        let payload = match body {
            Some(b) => Bytes::from(
                serde_json::to_vec(b).map_err(|e| ClientError::Decode { addr: self.addr, message: e.to_string() })?,
            ),
            None => Bytes::new(),
        };
        let mut addr = self.addr;
        for _ in 0..=MAX_HOPS {
            let mut builder = Request::builder()
                .method(method.clone())
                .uri(format!("http://{addr}{path}"))
                .header(http::header::CONTENT_TYPE, "application/json");
            if let Some(token) = &self.token {
                builder = builder.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let req = builder
                .body(Full::new(payload.clone()))
                .map_err(|e| ClientError::Transport { addr, message: e.to_string() })?;
            let exchange = async {
                let resp = self.http.request(req).await.map_err(|e| match e.is_connect() {
                    true => ClientError::Unreachable { addr, reason: connect_failure(&e) },
                    false => ClientError::Transport { addr, message: e.to_string() },
                })?;
                let status = resp.status();
                let limited = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE);
                let bytes = limited
                    .collect()
                    .await
                    .map_err(|e| ClientError::Transport { addr, message: e.to_string() })?
                    .to_bytes();
                Ok::<_, ClientError>((status, bytes))
            };
            let (status, bytes) =
                tokio::time::timeout(timeout, exchange).await.map_err(|_| ClientError::Timeout { addr, timeout })??;
            if status.is_success() {
                return Ok((addr, bytes));
            }
            let err: ApiErrorBody = serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
                addr,
                message: format!("status {status} with a non-JSON body ({e})"),
            })?;
            if follow && status == StatusCode::MISDIRECTED_REQUEST {
                match err.leader_admin_addr {
                    Some(next) if next != addr => {
                        tracing::debug!(target: "keel::raft", from = %addr, to = %next, "following leader redirect");
                        addr = next;
                        continue;
                    }
                    _ => return Err(ClientError::NoLeader(format!("{addr} knows no other leader: {}", err.message))),
                }
            }
            return Err(ClientError::Api { addr, status, body: err });
        }
        Err(ClientError::NoLeader(format!("more than {MAX_HOPS} leader redirects")))
    }
}

/// What a failed connect met, from the I/O error under hyper's "client error (Connect)".
fn connect_failure(e: &(dyn std::error::Error + 'static)) -> String {
    let mut source = e.source();
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => "connect timed out".to_owned(),
                _ => io.to_string(),
            };
        }
        source = err.source();
    }
    // hyper's connect timeout carries no io::Error.
    if e.to_string().contains("timed out") || e.source().is_some_and(|s| s.to_string().contains("timeout")) {
        return "connect timed out".to_owned();
    }
    e.to_string()
}
