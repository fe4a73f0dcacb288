//! The admin API: JSON status, Prometheus metrics, a human stats page, and server operations.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | 200 while the process serves (never needs the token) |
//! | POST | `/reload-certs` | re-read every https listener's certificate files |
//! | GET | `/status` | listeners, pools, servers with state, weight, effective weight (slow start), in-flight and counters, DNS names with their last resolution and error (JSON) |
//! | GET | `/metrics` | Prometheus text format |
//! | GET | `/` | the same status as an HTML table, for a person |
//! | POST | `/pools/{pool}/servers/{server}/drain` | no new requests; in-flight ones finish |
//! | POST | `/pools/{pool}/servers/{server}/enable` | undo a drain |
//! | POST | `/pools/{pool}/servers/{server}/weight` | body `{"weight": N}` |
//!
//! It listens on its own address (loopback by default) and is never served on a data-plane
//! listener. With `node.admin_token_file`/`admin_token_env` set, every endpoint but `/healthz`
//! needs `Authorization: Bearer <token>`. Request bodies are capped at [`MAX_BODY`] bytes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use arc_swap::ArcSwap;
use keel_cluster::throttle::{LogThrottle, EVERY};
use keel_cluster::{ClusterHandle, Command, Outcome, ProposeError};
use keel_vrrp::VipStatus;

use crate::daemon::CertReloader;
use crate::metrics::{self, ListenerMetrics, Rejections};
use crate::pool::{Pool, PoolError, ServerState, STATUS_CLASSES};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;

/// What the admin API serves from.
#[derive(Clone)]
pub struct AdminState {
    /// The live routing snapshot.
    pub snapshot: SharedSnapshot,
    /// Requests keel answered itself.
    pub rejections: Arc<Rejections>,
    /// Per-listener counters of the running listeners.
    pub listeners: Arc<ArcSwap<Vec<ListenerMetrics>>>,
    /// The https listeners' certificates.
    pub certs: Arc<CertReloader>,
    /// Bearer token every endpoint but `/healthz` requires, when set.
    pub token: Option<Arc<str>>,
    /// The Raft member, in cluster mode.
    pub cluster: Option<ClusterHandle>,
    /// The VIP controller's status, when this node manages a VIP.
    pub vip: Option<watch::Receiver<VipStatus>>,
    /// A witness serves only `/healthz` and `/cluster/*`: it has no data plane to report on.
    pub witness: bool,
}

/// `/status` document.
#[derive(Serialize)]
pub struct Status {
    /// Listeners.
    pub listeners: Vec<ListenerStatus>,
    /// Pools.
    pub pools: Vec<PoolStatus>,
}

/// One listener in `/status`.
#[derive(Serialize)]
pub struct ListenerStatus {
    /// Name.
    pub name: String,
    /// Bound address.
    pub bind: SocketAddr,
    /// Client protocol.
    pub protocol: keel_cluster::model::Protocol,
}

/// One pool in `/status`.
#[derive(Serialize)]
pub struct PoolStatus {
    /// Name.
    pub name: String,
    /// Balancing algorithm.
    pub algorithm: String,
    /// Servers able to take requests now.
    pub available: usize,
    /// Requests sent again to another server (`retry_on`) since the pool was built.
    pub retries: u64,
    /// Retries the retry budget refused since the pool was built.
    pub retry_budget_exhausted: u64,
    /// Servers (a server given by DNS name appears once per resolved address, as
    /// `ENTRY@IP:PORT`).
    pub servers: Vec<ServerStatus>,
    /// The pool's servers given by DNS name: addresses in use, last resolution, last error.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<crate::resolve::NameStatus>,
}

/// One server in `/status`.
#[derive(Serialize)]
pub struct ServerStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// The weight it gets now: below `weight` while a slow start ramps it.
    pub effective_weight: f64,
    /// "up", "down", "drain" or "ejected".
    pub state: &'static str,
    /// Requests in flight.
    pub active: usize,
    /// Requests sent.
    pub requests: u64,
    /// Responses by status class.
    pub responses: std::collections::BTreeMap<&'static str, u64>,
    /// Connect failures.
    pub connect_errors: u64,
    /// Response-head timeouts.
    pub timeouts: u64,
    /// Exchanges the server broke.
    pub broken: u64,
}

impl ServerStatus {
    fn of(s: &ServerState, pool: &Pool) -> Self {
        ServerStatus {
            name: s.name.clone(),
            address: s.address,
            weight: s.weight(),
            effective_weight: s.effective_weight(pool.config.slow_start.map(|d| d.get())),
            state: s.state_name(),
            active: s.active.load(Ordering::Relaxed),
            requests: s.stats.requests.load(Ordering::Relaxed),
            responses: STATUS_CLASSES
                .iter()
                .enumerate()
                .map(|(i, c)| (*c, s.stats.responses[i].load(Ordering::Relaxed)))
                .collect(),
            connect_errors: s.stats.connect_errors.load(Ordering::Relaxed),
            timeouts: s.stats.timeouts.load(Ordering::Relaxed),
            broken: s.stats.broken.load(Ordering::Relaxed),
        }
    }
}

/// Builds the `/status` document from a snapshot.
pub fn status(snapshot: &Snapshot) -> Status {
    Status {
        listeners: snapshot
            .config
            .listeners
            .iter()
            .map(|(name, l)| ListenerStatus { name: name.clone(), bind: l.bind, protocol: l.protocol })
            .collect(),
        pools: snapshot
            .pools
            .values()
            .map(|p| PoolStatus {
                name: p.name.clone(),
                algorithm: p.config.algorithm.to_string(),
                available: p.servers.iter().filter(|s| s.is_eligible()).count(),
                retries: p.retries.total(),
                retry_budget_exhausted: p.retries.exhausted(),
                servers: p.servers.iter().map(|s| ServerStatus::of(s, p)).collect(),
                names: snapshot.names.status(&p.name),
            })
            .collect(),
    }
}

/// Serves the admin API on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: AdminState, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    static ACCEPT_FAILED: LogThrottle = LogThrottle::new(EVERY);
                    keel_cluster::throttled!(ACCEPT_FAILED, warn, target: "keel::admin", error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// Whether the request carries the admin token. Compared in constant time so the token cannot be
/// guessed byte by byte from response timing.
fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(token) = &state.token else { return true };
    let Some(given) =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (token.as_bytes(), given.trim().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments != ["healthz"] && !authorized(state, &req) {
        let mut resp = error(StatusCode::UNAUTHORIZED, "this endpoint needs Authorization: Bearer <admin token>");
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return resp;
    }
    if state.witness && !matches!(segments.as_slice(), ["healthz"] | ["cluster", ..]) {
        return error(StatusCode::NOT_FOUND, "this node is a witness: only /healthz and /cluster/* are served");
    }
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        (&Method::POST, ["reload-certs"]) => reload_certs(&state.certs),
        (_, ["cluster", ..]) => match &state.cluster {
            Some(cluster) => keel_cluster::api::handle(cluster, req)
                .await
                .unwrap_or_else(|| error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}"))),
            None => error(StatusCode::NOT_FOUND, "this node is not in cluster mode (no [cluster] section)"),
        },
        (&Method::GET, ["config"]) => {
            let config = state.snapshot.load().config.clone();
            match toml::to_string(&*config) {
                Ok(text) => {
                    let mut resp = Response::new(Full::new(Bytes::from(text)));
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/toml"));
                    resp
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot render the config: {e}")),
            }
        }
        (&Method::GET, ["status"]) => {
            let mut doc = serde_json::to_value(status(&state.snapshot.load())).unwrap_or_default();
            if let (Some(vip), Some(obj)) = (&state.vip, doc.as_object_mut()) {
                let v = vip.borrow().clone();
                obj.insert(
                    "vip".into(),
                    serde_json::json!({
                        "holding": v.holding, "claims": v.claims, "releases": v.releases,
                        "failures": v.failures, "last_change_unix_ms": v.last_change_unix_ms,
                    }),
                );
            }
            if let (Some(cluster), Some(obj)) = (&state.cluster, doc.as_object_mut()) {
                let (leader, _) = cluster.leader();
                obj.insert("node_id".into(), serde_json::json!(cluster.id()));
                obj.insert("leader_id".into(), serde_json::json!(leader));
            }
            json(StatusCode::OK, &doc)
        }
        (&Method::GET, ["metrics"]) => {
            let mut text = metrics::render(&state.snapshot.load(), &state.rejections, &state.listeners.load());
            if let Some(vip) = &state.vip {
                metrics::render_vip(&mut text, &vip.borrow());
            }
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
        (&Method::GET, [""]) => {
            let mut resp = Response::new(Full::new(Bytes::from(stats_page(&status(&state.snapshot.load())))));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
            resp
        }
        (&Method::POST, ["pools", pool, "servers", server, action]) => {
            let (pool, server, action) = ((*pool).to_owned(), (*server).to_owned(), (*action).to_owned());
            let Some(p) = state.snapshot.load().pool(&pool).cloned() else {
                return error(StatusCode::NOT_FOUND, format!("no pool named {pool:?}"));
            };
            match &state.cluster {
                Some(cluster) => replicated_action(cluster, &p, &server, &action, req).await,
                None => server_action(&p, &server, &action, req).await,
            }
        }
        (_, ["healthz" | "status" | "metrics" | ""]) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {} {path}", req.method())),
    }
}

/// Reads a `{"weight": N}` body.
async fn weight_body(req: Request<Incoming>) -> Result<u32, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Err(error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"))),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct WeightBody {
        weight: u32,
    }
    serde_json::from_slice::<WeightBody>(&body)
        .map(|w| w.weight)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("expected {{\"weight\": N}}: {e}")))
}

/// Drain/enable/weight in cluster mode: proposed through Raft so every node applies it, and
/// it survives a failover.
async fn replicated_action(
    cluster: &ClusterHandle,
    pool: &Pool,
    server: &str,
    action: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if let Err(e) = pool.server_index(server) {
        return error(StatusCode::NOT_FOUND, e.to_string());
    }
    let (pool_name, server_name) = (pool.name.clone(), server.to_owned());
    let command = match action {
        "drain" | "enable" => Command::DrainServer { pool: pool_name, server: server_name, drain: action == "drain" },
        "weight" => match weight_body(req).await {
            Ok(weight) if weight == 0 || weight > keel_cluster::model::MAX_WEIGHT => {
                return error(StatusCode::BAD_REQUEST, PoolError::BadWeight(weight).to_string())
            }
            Ok(weight) => Command::SetServerWeight { pool: pool_name, server: server_name, weight },
            Err(resp) => return resp,
        },
        other => return error(StatusCode::NOT_FOUND, format!("unknown action {other:?}; use drain, enable or weight")),
    };
    match cluster.propose(command).await {
        Ok(Outcome::Rejected { reason }) => error(StatusCode::BAD_REQUEST, reason),
        Ok(outcome) => json(StatusCode::OK, &serde_json::json!({ "outcome": outcome })),
        Err(ProposeError::ForwardToLeader { leader_id, leader_admin_addr }) => {
            let mut resp = json(
                StatusCode::MISDIRECTED_REQUEST,
                &serde_json::json!({
                    "error": "forward_to_leader", "message": "this node is not the leader",
                    "leader_id": leader_id, "leader_admin_addr": leader_admin_addr,
                }),
            );
            if let Some(addr) = leader_admin_addr {
                if let Ok(v) = header::HeaderValue::from_str(&format!("http://{addr}{}", "/")) {
                    resp.headers_mut().insert(header::LOCATION, v);
                }
            }
            resp
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn server_action(pool: &Pool, server: &str, action: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let result = match action {
        "drain" => pool.set_draining(server, true),
        "enable" => pool.set_draining(server, false),
        "weight" => match weight_body(req).await {
            Ok(weight) => pool.set_weight(server, weight),
            Err(resp) => return resp,
        },
        other => return error(StatusCode::NOT_FOUND, format!("unknown action {other:?}; use drain, enable or weight")),
    };
    match result {
        Ok(()) => {
            let s = pool.servers.iter().find(|s| s.name == server);
            match s {
                Some(s) => json(StatusCode::OK, &ServerStatus::of(s, pool)),
                None => error(StatusCode::NOT_FOUND, "server vanished"),
            }
        }
        Err(e @ PoolError::UnknownServer { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ PoolError::BadWeight(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// Reloads every https listener's certificates; 200 when all succeeded, 422 naming the files
/// otherwise (listeners that failed keep their previous certificates).
fn reload_certs(certs: &CertReloader) -> Response<Full<Bytes>> {
    let mut ok = true;
    let listeners: serde_json::Map<String, serde_json::Value> = certs
        .reload_all()
        .into_iter()
        .map(|(name, result)| {
            let value = match result {
                Ok(summary) => serde_json::json!({
                    "reloaded": true,
                    "certificates": summary.certificates.iter().map(|c| serde_json::json!({
                        "cert": c.cert, "names": c.names, "not_after": c.not_after,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => {
                    ok = false;
                    tracing::error!(target: "keel::tls", listener = %name, error = %e,
                        "certificate reload refused; the previous certificates stay in use");
                    serde_json::json!({ "reloaded": false, "error": e.to_string() })
                }
            };
            (name, value)
        })
        .collect();
    let status = if ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
    json(status, &serde_json::json!({ "listeners": listeners }))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A stats page a person can read at a glance, in the spirit of HAProxy's.
fn stats_page(status: &Status) -> String {
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5><title>keel stats</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}\
         td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}th{background:#eee}td:first-child{text-align:left}\
         .up{background:#c8f7c5}.down{background:#f7c5c5}.drain{background:#f7e9c5}.ejected{background:#f7d6c5}</style>\
         </head><body><h1>keel</h1>",
    );
    html.push_str("<h2>Listeners</h2><table><tr><th>name</th><th>bind</th><th>protocol</th></tr>");
    for l in &status.listeners {
        html.push_str(&format!("<tr><td>{}</td><td>{}</td><td>{:?}</td></tr>", escape(&l.name), l.bind, l.protocol));
    }
    html.push_str("</table>");
    for p in &status.pools {
        html.push_str(&format!(
            "<h2>Pool {} <small>({}, {}/{} available)</small></h2>",
            escape(&p.name),
            escape(&p.algorithm),
            p.available,
            p.servers.len()
        ));
        html.push_str(
            "<table><tr><th>server</th><th>address</th><th>state</th><th>weight</th><th>active</th>\
             <th>requests</th><th>2xx</th><th>4xx</th><th>5xx</th><th>connect errors</th><th>timeouts</th></tr>",
        );
        for s in &p.servers {
            let class = |c: &str| s.responses.get(c).copied().unwrap_or(0);
            html.push_str(&format!(
                "<tr class={st}><td>{}</td><td>{}</td><td>{st}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&s.name),
                s.address,
                s.weight,
                s.active,
                s.requests,
                class("2xx"),
                class("4xx"),
                class("5xx"),
                s.connect_errors,
                s.timeouts,
                st = s.state,
            ));
        }
        html.push_str("</table>");
        for n in &p.names {
            let addresses: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
            html.push_str(&format!(
                "<p>{} = {}:{} resolves to {}{}</p>",
                escape(&n.server),
                escape(&n.host),
                n.port,
                if addresses.is_empty() { "nothing yet".to_owned() } else { addresses.join(", ") },
                n.last_error.as_deref().map(|e| format!(" (last attempt failed: {})", escape(e))).unwrap_or_default(),
            ));
        }
    }
    html.push_str("</body></html>");
    html
}
