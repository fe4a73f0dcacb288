//! The cluster part of the admin HTTP API: [`handle`] answers `/cluster/…` and returns `None`
//! for any other path, so the node's admin server can mount it in front of its own routes.
//! [`client`] is the matching async client for the CLI.
//!
//! | method & path | body | answer |
//! |---|---|---|
//! | `GET /cluster/status` | — | [`ClusterStatus`](crate::node::ClusterStatus) |
//! | `GET /cluster/state` | — | [`StateView`]: config, overrides, verdicts, sticky count |
//! | `POST /cluster/init` | seed [`Config`] | [`Outcome`](crate::command::Outcome); 409 if already initialized |
//! | `POST /cluster/add-node` | [`AddNode`] | `{"added": id}` once caught up and voting |
//! | `POST /cluster/remove` | [`RemoveNode`] | `{"removed": id}` |
//! | `POST /cluster/transfer` | [`Transfer`] | `{"leader": id}` once the successor leads and holds the VIP; 409 if it could not |
//! | `POST /cluster/vip/move` | [`VipMove`] | `{"vip": addr, "holder": id}` once `to` is named; 409 if it could not |
//! | `POST /cluster/propose` | [`Command`] | [`Outcome`](crate::command::Outcome); 422 rejected, 503 no quorum |
//!
//! # Writes on a follower: 421 + leader address, not proxying
//!
//! A write that reaches a follower answers **421 Misdirected Request** with
//! `{"error":"forward_to_leader","leader_id":…,"leader_admin_addr":…}`; the client retries
//! there (bounded hops). Why not forward server-side: the admin server stays free of outbound
//! calls and proxy loops during elections, the client sees which node answered, and one extra
//! round trip on a LAN is nothing for operator commands.
//!
//! Errors are JSON `{"error": kind, "message": …}` with a 4xx/5xx status; bodies are capped at
//! [`MAX_BODY`]; garbage JSON is a 400 naming the parse error, never a panic.

pub mod client;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::command::{Command, NodeId};
use crate::model::Config;
use crate::node::{ClusterError, ClusterHandle, ProposeError};
use crate::state::{HealthVerdict, ServerOverride};
use crate::types::NodeInfo;

/// Largest request body accepted (a sticky batch of 10,000 entries fits).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// Body of `POST /cluster/add-node`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNode {
    /// The new node's id.
    pub id: NodeId,
    /// Its raft address.
    pub raft_addr: SocketAddr,
    /// Its admin address.
    pub admin_addr: SocketAddr,
    /// Whether it is a witness (witnesses vote too).
    #[serde(default)]
    pub witness: bool,
}

/// Body of `POST /cluster/remove`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveNode {
    /// The node to remove.
    pub id: NodeId,
}

/// Body of `POST /cluster/transfer`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// The successor; the most caught-up data voter when absent.
    #[serde(default)]
    pub to: Option<NodeId>,
}

/// Body of `POST /cluster/vip/move`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipMove {
    /// The spread VIP.
    pub vip: std::net::IpAddr,
    /// Its next holder.
    pub to: NodeId,
}

/// Answer of `GET /cluster/state`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateView {
    /// The served config.
    pub config: Config,
    /// Drain / weight overrides.
    pub overrides: BTreeMap<String, BTreeMap<String, ServerOverride>>,
    /// Health verdicts.
    pub health: BTreeMap<String, BTreeMap<String, HealthVerdict>>,
    /// Sticky entries stored.
    pub sticky_entries: usize,
    /// Per pool: sticky entries held and evicted for the pool's `max_entries`.
    pub sticky_pools: BTreeMap<String, crate::sticky_table::PoolSummary>,
    /// Voters (the health electorate).
    pub voters: BTreeSet<NodeId>,
}

/// The JSON error body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// Machine-readable kind: bad_request, not_found, forward_to_leader, rejected, no_quorum, …
    pub error: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// With forward_to_leader: the leader's id, if known.
    #[serde(default)]
    pub leader_id: Option<NodeId>,
    /// With forward_to_leader: the leader's admin address, if known.
    #[serde(default)]
    pub leader_admin_addr: Option<SocketAddr>,
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body =
        serde_json::to_vec(value).unwrap_or_else(|e| format!(r#"{{"error":"internal","message":"{e}"}}"#).into_bytes());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, kind: &str, message: impl Display) -> Response<Full<Bytes>> {
    json(
        status,
        &ApiErrorBody { error: kind.into(), message: message.to_string(), leader_id: None, leader_admin_addr: None },
    )
}

fn forward(leader_id: Option<NodeId>, leader_admin_addr: Option<SocketAddr>) -> Response<Full<Bytes>> {
    json(
        StatusCode::MISDIRECTED_REQUEST,
        &ApiErrorBody {
            error: "forward_to_leader".into(),
            message: "this node is not the leader; retry on leader_admin_addr".into(),
            leader_id,
            leader_admin_addr,
        },
    )
}

async fn read_json<B, T>(body: B) -> Result<T, Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
    T: DeserializeOwned,
{
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                format!("body unreadable or over {MAX_BODY} bytes: {e}"),
            ))
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, "bad_request", format!("invalid JSON body: {e}")))
}

fn cluster_error(e: ClusterError) -> Response<Full<Bytes>> {
    match e {
        ClusterError::NotLeader { leader_id, leader_admin_addr } => forward(leader_id, leader_admin_addr),
        ClusterError::AlreadyInitialized => error(StatusCode::CONFLICT, "already_initialized", e),
        ClusterError::InvalidSettings(_) => error(StatusCode::BAD_REQUEST, "bad_request", e),
        ClusterError::Propose(p) => propose_error(p),
        ClusterError::Timeout(_) => error(StatusCode::GATEWAY_TIMEOUT, "timeout", e),
        ClusterError::Transfer(_) => error(StatusCode::CONFLICT, "transfer_failed", e),
        ClusterError::VipMove(_) => error(StatusCode::CONFLICT, "vip_move_failed", e),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", other),
    }
}

fn propose_error(e: ProposeError) -> Response<Full<Bytes>> {
    match e {
        ProposeError::ForwardToLeader { leader_id, leader_admin_addr } => forward(leader_id, leader_admin_addr),
        ProposeError::Rejected { reason } => error(StatusCode::UNPROCESSABLE_ENTITY, "rejected", reason),
        e @ ProposeError::NoQuorum { .. } => error(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", e),
        e @ ProposeError::Fatal(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "fatal", e),
    }
}

/// Answers a `/cluster/…` request; `None` for any other path.
pub async fn handle<B>(cluster: &ClusterHandle, req: Request<B>) -> Option<Response<Full<Bytes>>>
where
    B: Body<Data = Bytes>,
    B::Error: Display + Send + Sync + 'static + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix("/cluster/")?;
    let method = req.method().clone();
    let resp = match (method, rest) {
        (Method::GET, "status") => json(StatusCode::OK, &cluster.status()),
        (Method::GET, "state") => {
            let s = cluster.state().borrow().clone();
            json(
                StatusCode::OK,
                &StateView {
                    config: s.config.clone(),
                    overrides: s.overrides.clone(),
                    health: s.health.clone(),
                    sticky_entries: s.sticky.len(),
                    sticky_pools: s.sticky.summary(),
                    voters: s.voters.clone(),
                },
            )
        }
        (Method::POST, "init") => match read_json::<_, Config>(req.into_body()).await {
            Err(r) => r,
            Ok(seed) => match cluster.initialize(seed).await {
                Ok(outcome) => json(StatusCode::OK, &outcome),
                Err(e) => cluster_error(e),
            },
        },
        (Method::POST, "add-node") => match read_json::<_, AddNode>(req.into_body()).await {
            Err(r) => r,
            Ok(a) => {
                let node = NodeInfo { raft_addr: a.raft_addr, admin_addr: a.admin_addr, witness: a.witness };
                match cluster.add_voter(a.id, node).await {
                    Ok(()) => json(StatusCode::OK, &serde_json::json!({ "added": a.id })),
                    Err(e) => cluster_error(e),
                }
            }
        },
        (Method::POST, "remove") => match read_json::<_, RemoveNode>(req.into_body()).await {
            Err(r) => r,
            Ok(r) => match cluster.remove(r.id).await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "removed": r.id })),
                Err(e) => cluster_error(e),
            },
        },
        (Method::POST, "transfer") => match read_json::<_, Transfer>(req.into_body()).await {
            Err(r) => r,
            Ok(t) => match cluster.transfer(t.to).await {
                Ok(leader) => json(StatusCode::OK, &serde_json::json!({ "leader": leader })),
                Err(e) => cluster_error(e),
            },
        },
        (Method::POST, "vip/move") => match read_json::<_, VipMove>(req.into_body()).await {
            Err(r) => r,
            Ok(m) => match cluster.move_vip(m.vip, m.to).await {
                Ok(()) => json(StatusCode::OK, &serde_json::json!({ "vip": m.vip, "holder": m.to })),
                Err(e) => cluster_error(e),
            },
        },
        (Method::POST, "propose") => match read_json::<_, Command>(req.into_body()).await {
            Err(r) => r,
            Ok(cmd) => match cluster.propose(cmd).await {
                Ok(outcome) => json(StatusCode::OK, &outcome),
                Err(e) => propose_error(e),
            },
        },
        (_, "status" | "state" | "init" | "add-node" | "remove" | "transfer" | "vip/move" | "propose") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {path}", req.method()),
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", format!("no cluster endpoint {path}")),
    };
    Some(resp)
}

/// Serves only the cluster API on `listener` (for witnesses and tests; a full node mounts
/// [`handle`] in its own admin server). Dropping or aborting the handle stops it.
pub fn serve(listener: TcpListener, cluster: ClusterHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    };
                    let cluster = cluster.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| {
                            let cluster = cluster.clone();
                            async move {
                                let resp = handle(&cluster, req).await.unwrap_or_else(|| {
                                    error(StatusCode::NOT_FOUND, "not_found", "only /cluster/ endpoints are served here")
                                });
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(stream);
                        if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                            tracing::debug!(target: "keel::raft", error = %e, "admin connection ended");
                        }
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}
