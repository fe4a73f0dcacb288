//! Backends keel proxies to: real hyper servers on loopback, each on its own thread and runtime.
//!
//! A [`Backend`] speaks HTTP/1.1 and h2c (hyper-util's auto builder) and answers every request
//! with its name as the body and an `x-backend: NAME` header, except for these paths:
//!
//! | path | answer |
//! | --- | --- |
//! | `/healthz` | 200 `ok`, or 503 after [`Backend::set_healthy`]`(false)`; not counted as a request |
//! | `/slow?ms=N` | the name, after sleeping N ms |
//! | `/status/NNN` | status NNN, the name as body |
//! | `/headers` | JSON `{"method", "uri", "version", "headers": {name: [values]}}` of the request as received |
//! | `/big?bytes=N` | N bytes of `x`, streamed in 16 KiB chunks |
//! | `/hop` | the name, with response headers `Connection: x-internal`, `X-Internal: 1`, `Keep-Alive: timeout=5` |
//! | `/drip?chunks=N&ms=M` | N chunks `chunk I\n`, the first at once, then one every M ms |
//! | `/ws` | a WebSocket upgrade that echoes text and binary messages |
//! | `/login` | the name, with `Set-Cookie: JSESSIONID=NAME-N; Path=/` (N counts logins from 1): an application session a sticky `learn` pool can learn |
//!
//! [`Backend::start_tls`] starts one that speaks TLS (rustls, ALPN `h2` and `http/1.1`) with a
//! [`Leaf`](crate::tls::Leaf) certificate and otherwise answers the same;
//! [`Backend::tls_handshakes`] counts the handshakes that completed.
//!
//! [`Backend::set_delay`] delays every counted request, whatever its path, which makes one
//! backend of a pool slow while the others stay fast.
//!
//! Each backend runs on a dedicated thread with its own current-thread tokio runtime, so it
//! keeps serving whatever the test's runtime is doing. [`Backend::stop`] (and drop) ends that
//! runtime, which drops the listener and every open connection: the backend is then as dead as
//! a crashed server, and connects to it are refused. [`Backend::restart`] binds the same address
//! again. Counters survive restarts.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Response body type of the backends.
type Body = BoxBody<Bytes, Infallible>;

/// How long [`Backend::restart`] retries binding an address still held by the kernel.
const REBIND: Duration = Duration::from_secs(2);

/// Time a TLS backend gives a client to complete its handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(5);

/// Size of one chunk of a `/big` response.
const CHUNK: usize = 16 * 1024;

/// What a backend has seen, shared by all its connections and kept across restarts.
#[derive(Debug)]
struct State {
    name: String,
    healthy: AtomicBool,
    delay_ms: AtomicU64,
    requests: AtomicU64,
    health_checks: AtomicU64,
    unhealthy_answers: AtomicU64,
    in_flight: AtomicU64,
    accepted: AtomicU64,
    tls_handshakes: AtomicU64,
    open: AtomicU64,
    logins: AtomicU64,
    paths: Mutex<Vec<String>>,
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(g: &'a AtomicU64) -> Gauge<'a> {
        g.fetch_add(1, Ordering::SeqCst);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A server thread and the signal that ends it.
pub(crate) struct Running {
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Running {
    /// Serves `listener` on a new thread, handing each accepted connection to `on_conn`.
    pub(crate) fn spawn<F, Fut>(listener: StdListener, thread_name: String, on_conn: F) -> Result<Running>
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        listener.set_nonblocking(true)?;
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let thread = std::thread::Builder::new().name(thread_name).spawn(move || {
            rt.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        eprintln!("backend listener: {e}");
                        return;
                    }
                };
                loop {
                    tokio::select! {
                        _ = &mut stop => break,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => {
                                let _ = stream.set_nodelay(true);
                                tokio::spawn(on_conn(stream, peer));
                            }
                            // EMFILE and friends: back off instead of spinning.
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        },
                    }
                }
            });
            // Dropping the runtime drops every connection task, closing their sockets.
            drop(rt);
        })?;
        Ok(Running { shutdown, thread })
    }

    /// Ends the thread; when this returns the listener and all connections are closed.
    pub(crate) fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.thread.join();
    }
}

/// Binds `addr`, retrying for a moment when a just-closed socket still holds it.
pub(crate) fn bind(addr: SocketAddr) -> Result<StdListener> {
    let start = Instant::now();
    loop {
        match StdListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && start.elapsed() < REBIND => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
        }
    }
}

/// A named HTTP backend; see the [module docs](self) for what it answers.
pub struct Backend {
    state: Arc<State>,
    addr: SocketAddr,
    running: Option<Running>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.state.name)
            .field("addr", &self.addr)
            .field("running", &self.running.is_some())
            .finish()
    }
}

impl Backend {
    /// Starts a backend called `name` on a free 127.0.0.1 port.
    pub fn start(name: &str) -> Result<Backend> {
        Backend::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), name)
    }

    /// Starts a backend called `name` on `addr` (port 0 picks a free one).
    pub fn start_on(addr: SocketAddr, name: &str) -> Result<Backend> {
        Backend::start_with(addr, name, None)
    }

    /// Starts a backend called `name` on a free 127.0.0.1 port that speaks TLS with `leaf` as
    /// its certificate (ALPN `h2` and `http/1.1`), answering exactly like a plain one.
    pub fn start_tls(name: &str, leaf: &crate::tls::Leaf) -> Result<Backend> {
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der.clone()], leaf.private_key())
            .context("backend TLS config")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        Backend::start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), name, Some(acceptor))
    }

    fn start_with(addr: SocketAddr, name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Backend> {
        let state = Arc::new(State {
            name: name.to_owned(),
            healthy: AtomicBool::new(true),
            delay_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            unhealthy_answers: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            open: AtomicU64::new(0),
            logins: AtomicU64::new(0),
            paths: Mutex::new(Vec::new()),
        });
        let listener = bind(addr)?;
        let addr = listener.local_addr()?;
        let mut b = Backend { state, addr, running: None, tls };
        b.serve(listener)?;
        Ok(b)
    }

    /// Starts `n` backends named `prefix` + letter: `a`, `b`, `c`... for `prefix = ""`.
    pub fn start_many(prefix: &str, n: usize) -> Result<Vec<Backend>> {
        (0..n).map(|i| Backend::start(&format!("{prefix}{}", (b'a' + i as u8) as char))).collect()
    }

    fn serve(&mut self, listener: StdListener) -> Result<()> {
        let state = self.state.clone();
        let tls = self.tls.clone();
        let running = Running::spawn(listener, format!("backend-{}", self.state.name), move |stream, peer| {
            let state = state.clone();
            let tls = tls.clone();
            async move {
                state.accepted.fetch_add(1, Ordering::SeqCst);
                match tls {
                    None => serve_connection(stream, peer, state).await,
                    Some(acceptor) => {
                        // A failed handshake (say, a client that does not trust us) just ends.
                        if let Ok(Ok(tls)) = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                            state.tls_handshakes.fetch_add(1, Ordering::SeqCst);
                            serve_connection(tls, peer, state).await;
                        }
                    }
                }
            }
        })?;
        self.running = Some(running);
        Ok(())
    }

    /// The backend's name: its response body and `x-backend` header.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The address it listens on (kept across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` + `path`, to talk to the backend directly.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Makes `/healthz` answer 200 (`true`) or 503 (`false`).
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Delays every counted request (any path but `/healthz`) by `delay` before answering.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Requests received, `/healthz` excluded.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// `/login` requests answered (sessions handed out).
    pub fn logins(&self) -> u64 {
        self.state.logins.load(Ordering::SeqCst)
    }

    /// `/healthz` requests received.
    pub fn health_checks(&self) -> u64 {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    /// `/healthz` requests answered 503.
    pub fn unhealthy_answers(&self) -> u64 {
        self.state.unhealthy_answers.load(Ordering::SeqCst)
    }

    /// Requests currently being answered (received, response head not yet returned).
    pub fn in_flight(&self) -> u64 {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// TCP connections accepted since start.
    pub fn connections_accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// TLS handshakes completed (a TLS backend only).
    pub fn tls_handshakes(&self) -> u64 {
        self.state.tls_handshakes.load(Ordering::SeqCst)
    }

    /// TCP connections currently open.
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::SeqCst)
    }

    /// Path and query of every counted request, in arrival order.
    pub fn paths(&self) -> Vec<String> {
        self.state.paths.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Zeroes the request counters and the path log.
    pub fn reset_counts(&self) {
        self.state.requests.store(0, Ordering::SeqCst);
        self.state.health_checks.store(0, Ordering::SeqCst);
        if let Ok(mut p) = self.state.paths.lock() {
            p.clear();
        }
    }

    /// Whether it is serving.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Closes the listener and every open connection; returns once they are closed.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }

    /// Serves again on the same address after [`stop`](Backend::stop).
    pub fn restart(&mut self) -> Result<()> {
        if self.running.is_some() {
            bail!("backend {} is already running", self.state.name);
        }
        let listener = bind(self.addr)?;
        self.serve(listener)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_connection<IO>(stream: IO, peer: SocketAddr, state: Arc<State>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _open = Gauge::up(&state.open);
    let svc = {
        let state = state.clone();
        service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(req, peer, &state).await) }
        })
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn query_u64(query: Option<&str>, key: &str) -> Option<u64> {
    query?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok())
}

async fn handle(mut req: Request<Incoming>, _peer: SocketAddr, state: &State) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let name = state.name.clone();
    let respond = |status: StatusCode, body: Body| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        if let Ok(v) = HeaderValue::from_str(&name) {
            r.headers_mut().insert("x-backend", v);
        }
        r
    };

    if path == "/healthz" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        return if state.healthy.load(Ordering::SeqCst) {
            respond(StatusCode::OK, full("ok"))
        } else {
            state.unhealthy_answers.fetch_add(1, Ordering::SeqCst);
            respond(StatusCode::SERVICE_UNAVAILABLE, full("unhealthy"))
        };
    }

    state.requests.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut p) = state.paths.lock() {
        p.push(req.uri().path_and_query().map(|pq| pq.as_str().to_owned()).unwrap_or_else(|| path.clone()));
    }
    let _in_flight = Gauge::up(&state.in_flight);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    if path == "/slow" {
        let ms = query_u64(query.as_deref(), "ms").unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return respond(StatusCode::OK, full(name.clone()));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let status = code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok());
        return match status {
            Some(s) => respond(s, full(name.clone())),
            None => respond(StatusCode::BAD_REQUEST, full(format!("bad status {code:?}"))),
        };
    }
    if path == "/headers" {
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in req.headers() {
            headers.entry(k.as_str().to_owned()).or_default().push(String::from_utf8_lossy(v.as_bytes()).into_owned());
        }
        let doc = serde_json::json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        let mut r = respond(StatusCode::OK, full(doc.to_string()));
        r.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return r;
    }
    if path == "/big" {
        let total = query_u64(query.as_deref(), "bytes").unwrap_or(1 << 20) as usize;
        let chunks = (0..total.div_ceil(CHUNK)).map(move |i| {
            let len = CHUNK.min(total - i * CHUNK);
            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; len])))
        });
        return respond(StatusCode::OK, BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks))));
    }
    if path == "/login" {
        let n = state.logins.fetch_add(1, Ordering::SeqCst) + 1;
        let mut r = respond(StatusCode::OK, full(name.clone()));
        if let Ok(v) = HeaderValue::from_str(&format!("JSESSIONID={name}-{n}; Path=/")) {
            r.headers_mut().insert(http::header::SET_COOKIE, v);
        }
        return r;
    }
    if path == "/hop" {
        let mut r = respond(StatusCode::OK, full(name.clone()));
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("x-internal"));
        r.headers_mut().insert("x-internal", HeaderValue::from_static("1"));
        r.headers_mut().insert("keep-alive", HeaderValue::from_static("timeout=5"));
        return r;
    }
    if path == "/drip" {
        let chunks = query_u64(query.as_deref(), "chunks").unwrap_or(5);
        let every = Duration::from_millis(query_u64(query.as_deref(), "ms").unwrap_or(200));
        let stream = futures_util::stream::unfold(0u64, move |i| async move {
            if i >= chunks {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(every).await;
            }
            Some((Ok::<_, Infallible>(Frame::data(Bytes::from(format!("chunk {i}\n")))), i + 1))
        });
        return respond(StatusCode::OK, BodyExt::boxed(StreamBody::new(stream)));
    }
    if path == "/ws" {
        let is_ws = req
            .headers()
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).filter(|_| is_ws) else {
            return respond(StatusCode::BAD_REQUEST, full("expected a websocket upgrade"));
        };
        let accept = derive_accept_key(key.as_bytes());
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else { return };
            let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, full(Bytes::new()));
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut().insert(UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            r.headers_mut().insert(SEC_WEBSOCKET_ACCEPT, v);
        }
        return r;
    }
    // Drain the request body so uploads complete before the answer.
    let _ = req.into_body().collect().await;
    respond(StatusCode::OK, full(name.clone()))
}

/// A server that accepts connections, reads the request head, and closes without answering:
/// the backend that "broke the exchange" (keel should answer 502).
pub struct Blackhole {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    running: Option<Running>,
}

impl Blackhole {
    /// Starts one on a free 127.0.0.1 port.
    pub fn start() -> Result<Blackhole> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let running = Running::spawn(listener, "blackhole".into(), move |mut stream, _| {
            count.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut seen = Vec::new();
                while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                // Dropping the stream closes the connection without a byte of response.
            }
        })?;
        Ok(Blackhole { addr, accepted, running: Some(running) })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}
