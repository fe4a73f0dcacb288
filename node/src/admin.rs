//! The admin API: JSON status, Prometheus metrics, the live dashboard and its sign-in, and
//! server operations.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | 200 while the process serves (never needs the token) |
//! | POST | `/reload-certs` | re-read every https listener's certificate files |
//! | POST | `/config` | standalone: apply a node file's text, body `{"file": TEXT, "origin": NAME}` — what SIGHUP does with the node's own file (`daemon::apply`) |
//! | GET | `/config` | the served config as TOML |
//! | GET | `/status` | listeners, pools, servers with state, weight, effective weight (slow start), in-flight and counters, DNS names with their last resolution and error, the last reload's outcome (JSON) |
//! | GET | `/metrics` | Prometheus text format |
//! | GET | `/` | the live dashboard (`dashboard`); the sign-in form to a browser without a session |
//! | GET | `/dashboard.json` | the dashboard's document: rates, latency, cluster, events (one sample a second, shared) |
//! | POST | `/login` · `/logout` | form `token=…` → an `HttpOnly`, `SameSite=Strict` session cookie (`dashboard::session`) |
//! | POST | `/pools/{pool}/servers/{server}/drain` | no new requests; in-flight ones finish |
//! | POST | `/pools/{pool}/servers/{server}/enable` | undo a drain |
//! | POST | `/pools/{pool}/servers/{server}/weight` | body `{"weight": N}` |
//!
//! It listens on its own address (loopback by default) and is never served on a data-plane
//! listener. With `node.admin_token_file`/`admin_token_env` set, every endpoint but `/healthz`
//! needs `Authorization: Bearer <token>` or a dashboard session (whose actions must also come
//! from the dashboard itself). Request bodies are capped at [`MAX_BODY`] bytes.

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

use crate::daemon::apply::{ReloadStatus, Request as ReloadRequest, Requests, Result_ as ReloadResult};
use crate::daemon::CertReloader;
use crate::dashboard::session::{self, Sessions};
use crate::dashboard::{self, Dashboard};
use crate::metrics::{self, ListenerMetrics, Rejections};
use crate::pool::{Pool, PoolError, ServerState, STATUS_CLASSES};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// Largest request body the admin API reads.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest config file `POST /config` takes.
pub const MAX_CONFIG: usize = 8 * 1024 * 1024;
/// How long `POST /config` waits for the reload to end (certificates load, sockets bind).
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
    /// The spread VIPs this node carries (`[vip] addresses`), each with its controller's status.
    pub vips: Vec<(std::net::IpAddr, watch::Receiver<VipStatus>)>,
    /// A witness serves only `/healthz` and `/cluster/*`: it has no data plane to report on.
    pub witness: bool,
    /// Where `POST /config` sends a standalone node's reloads; `None` in cluster mode.
    pub reload: Option<Requests>,
    /// Reload outcomes, for `/status` and `/metrics`.
    pub reloads: Arc<ReloadStatus>,
    /// The dashboard's shared document.
    pub dashboard: Arc<Dashboard>,
    /// Signed-in browsers.
    pub sessions: Arc<Sessions>,
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

/// How a request proved it may use the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    /// No token is configured (loopback admin address).
    Open,
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A dashboard session cookie (see `dashboard::session`).
    Session,
    /// Neither.
    Denied,
}

/// Compares in constant time so the token cannot be guessed byte by byte from response timing.
fn token_matches(token: &str, given: &str) -> bool {
    let (a, b) = (token.as_bytes(), given.trim().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(state: &AdminState, req: &Request<Incoming>) -> Auth {
    let Some(token) = &state.token else { return Auth::Open };
    let bearer =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer.is_some_and(|given| token_matches(token, given)) {
        return Auth::Bearer;
    }
    let session = req
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(session::from_cookie_header);
    if session.is_some_and(|id| state.sessions.valid(id)) {
        return Auth::Session;
    }
    Auth::Denied
}

/// A state-changing request authenticated by the session cookie must come from the dashboard
/// itself: the `X-Keel-Request` header, and an `Origin` (when sent) naming this address.
fn same_origin_action(req: &Request<Incoming>) -> bool {
    let has_header = req.headers().contains_key(session::ACTION_HEADER);
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_ok = match req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()) {
        None => true,
        Some(origin) => {
            host.is_some_and(|h| origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(h))
        }
    };
    has_header && origin_ok
}

fn html(status: StatusCode, page: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(page.as_bytes())));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    // The page loads nothing from elsewhere and may not be framed by another site.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    resp
}

fn redirect_home(cookie: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    resp.headers_mut().insert(header::LOCATION, header::HeaderValue::from_static("/"));
    if let Ok(v) = header::HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// `POST /login` with the form's `token`: a session cookie and back to the dashboard, or the
/// form again with 401.
async fn login(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(token) = state.token.clone() else { return redirect_home(session::clear_cookie()) };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return html(StatusCode::BAD_REQUEST, dashboard::LOGIN),
    };
    let given = form_urlencoded::parse(&body).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned());
    if given.is_some_and(|g| token_matches(&token, &g)) {
        if let Some(id) = state.sessions.open() {
            tracing::info!(target: "keel::admin", "dashboard sign-in");
            return redirect_home(session::set_cookie(&id));
        }
    }
    static FAILED: LogThrottle = LogThrottle::new(EVERY);
    keel_cluster::throttled!(FAILED, warn, target: "keel::admin", "dashboard sign-in refused (wrong token)");
    // A wrong guess costs the guesser a moment.
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    html(StatusCode::UNAUTHORIZED, dashboard::LOGIN)
}

async fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let auth = authorized(state, &req);
    match (req.method(), segments.as_slice(), auth) {
        (_, ["healthz"], _) => {}
        (&Method::POST, ["login"], _) => return login(state, req).await,
        (&Method::GET, [""], Auth::Denied) => return html(StatusCode::OK, dashboard::LOGIN),
        (_, _, Auth::Denied) => {
            let mut resp = error(StatusCode::UNAUTHORIZED, "this endpoint needs Authorization: Bearer <admin token>");
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            return resp;
        }
        (&Method::GET | &Method::HEAD, _, Auth::Session) => {}
        (&Method::POST, ["logout"], Auth::Session) => {}
        (_, _, Auth::Session) if !same_origin_action(&req) => {
            return error(
                StatusCode::FORBIDDEN,
                "a signed-in browser's actions must come from the dashboard (X-Keel-Request header, same origin)",
            );
        }
        _ => {}
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
        (&Method::POST, ["config"]) => apply_config(state, req).await,
        (&Method::POST, ["debug", "stall-raft"]) if crate::daemon::cluster::failpoints_enabled() => {
            let ms = req.uri().query().and_then(|q| q.strip_prefix("ms=")).and_then(|v| v.parse::<u64>().ok());
            match ms {
                Some(ms) if ms <= 10_000 => {
                    if crate::daemon::cluster::stall_raft(std::time::Duration::from_millis(ms)) {
                        json(StatusCode::OK, &serde_json::json!({ "stalled_ms": ms }))
                    } else {
                        error(StatusCode::NOT_FOUND, "no raft runtime on this node")
                    }
                }
                _ => error(StatusCode::BAD_REQUEST, "use ?ms=N (at most 10000)"),
            }
        }
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
            if let (false, Some(obj)) = (state.vips.is_empty(), doc.as_object_mut()) {
                let vips: Vec<serde_json::Value> = state
                    .vips
                    .iter()
                    .map(|(address, rx)| {
                        let v = rx.borrow().clone();
                        serde_json::json!({
                            "address": address, "holding": v.holding, "claims": v.claims, "releases": v.releases,
                            "failures": v.failures, "last_change_unix_ms": v.last_change_unix_ms,
                        })
                    })
                    .collect();
                obj.insert("vips".into(), serde_json::Value::Array(vips));
            }
            if let (Some(cluster), Some(obj)) = (&state.cluster, doc.as_object_mut()) {
                let (leader, _) = cluster.leader();
                obj.insert("node_id".into(), serde_json::json!(cluster.id()));
                obj.insert("leader_id".into(), serde_json::json!(leader));
                // Replicated sticky table per pool (entries, max_entries, evictions), as /metrics
                // and the dashboard have it.
                let sticky = cluster.state().borrow().sticky_tables();
                obj.insert("sticky_tables".into(), serde_json::to_value(sticky).unwrap_or_default());
            }
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("reload".into(), serde_json::to_value(state.reloads.get()).unwrap_or_default());
            }
            json(StatusCode::OK, &doc)
        }
        (&Method::GET, ["metrics"]) => {
            let mut text = metrics::render(&state.snapshot.load(), &state.rejections, &state.listeners.load());
            if let Some(vip) = &state.vip {
                metrics::render_vip(&mut text, &vip.borrow());
            }
            if !state.vips.is_empty() {
                let vips: Vec<(std::net::IpAddr, VipStatus)> =
                    state.vips.iter().map(|(a, rx)| (*a, rx.borrow().clone())).collect();
                metrics::render_spread_vips(&mut text, &vips);
            }
            if let Some(cluster) = &state.cluster {
                metrics::render_cluster(&mut text, cluster);
            }
            metrics::render_reloads(&mut text, &state.reloads.get());
            let mut resp = Response::new(Full::new(Bytes::from(text)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            resp
        }
        (&Method::GET, [""]) => html(StatusCode::OK, dashboard::PAGE),
        (&Method::GET, ["dashboard.json"]) => {
            let mut resp = Response::new(Full::new(state.dashboard.frame()));
            resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
            resp
        }
        (&Method::POST, ["logout"]) => {
            let id = req
                .headers()
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(session::from_cookie_header)
                .map(str::to_owned);
            if let Some(id) = id {
                state.sessions.close(&id);
            }
            redirect_home(session::clear_cookie())
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

/// `POST /config` on a standalone node: the same reload SIGHUP does, with the file's text from
/// the body. 200 with the outcome when served (applied or unchanged), 422 with every problem
/// when refused (nothing changed).
async fn apply_config(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(reload) = &state.reload else {
        return error(
            StatusCode::CONFLICT,
            "this node is in cluster mode: `keel config apply` proposes the config through Raft (POST /cluster/propose)",
        );
    };
    let body = match Limited::new(req.into_body(), MAX_CONFIG).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("cannot read body (at most {MAX_CONFIG} bytes): {e}")),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ConfigBody {
        file: String,
        #[serde(default)]
        origin: Option<String>,
    }
    let body = match serde_json::from_slice::<ConfigBody>(&body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("expected {{\"file\": TEXT, \"origin\": NAME}}: {e}")),
    };
    let (reply, outcome) = tokio::sync::oneshot::channel();
    let origin = body.origin.unwrap_or_else(|| "<admin API>".to_owned());
    if reload.send(ReloadRequest { text: body.file, origin, reply }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down");
    }
    match tokio::time::timeout(RELOAD_WAIT, outcome).await {
        Ok(Ok(outcome)) if outcome.result == ReloadResult::Refused => json(
            StatusCode::UNPROCESSABLE_ENTITY,
            &serde_json::json!({
                "error": "rejected",
                "message": outcome.problems.join("\n"),
                "outcome": outcome,
            }),
        ),
        Ok(Ok(outcome)) => json(StatusCode::OK, &outcome),
        Ok(Err(_)) => error(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down"),
        Err(_) => error(StatusCode::GATEWAY_TIMEOUT, "the reload is still running; see /status"),
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
