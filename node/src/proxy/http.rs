//! One HTTP request's trip through keel: route → pick a server → forward → stream back.
//!
//! The phases are kept apart so the features that hook into them have a place: request
//! filters (rate limits, protections) run after routing and before a server is chosen; sticky
//! lookup replaces the plain `select` when a pool has a sticky mode. Bodies are streamed both
//! ways, never buffered, all through keel's own HTTP/1.1 client ([`super::h1::client`]). A
//! request can be retried on another server after a connect failure, because nothing of it
//! (body included) has been consumed then; any later failure ends the request (a body cannot
//! be replayed, and a server may have acted on it).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keel_cluster::model::{Algorithm, Limits, MAX_RETRIES};

use super::body::{BodyFault, BodyLimits, BodyVerdict, ClientBody};
use super::error::{ErrorKind, ProxyError};
use super::h1::client::{self as h1client, RequestHead, ResponseBody, SendError, Upgraded, Upstream};
use super::h1::codec::Framing;
use super::headers;
use crate::metrics::Rejections;
use crate::pool::{Pool, ServerState};
use crate::ratelimit::{retry_after_secs, ClientKey, Decision as RateDecision};
use crate::routing::{request_host, RequestView};
use crate::snapshot::SharedSnapshot;
use crate::sticky::{SourceKey, StickyPolicy};

/// Fixed seed for hashing client addresses, so every keel node maps a client to the same
/// position on the consistent-hash ring.
pub const CLIENT_HASH_SEED: u64 = 0x6b65_656c_5f69_7068; // "keel_iph"

/// A server's streamed response body, from keel's HTTP/1.1 client.
pub type UpstreamResponseBody = ResponseBody;

/// The body keel answers with: a server's streamed body, or a short one keel wrote.
pub type ProxyBody = Either<Tracked<UpstreamResponseBody, InFlight>, Full<Bytes>>;

/// The client end of a connection, as its requests need it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The address's IP as a header value, for `X-Forwarded-For`.
    forwarded_for: HeaderValue,
    /// The address as `source_ip` stickiness keys it.
    source: SourceKey,
}

impl Peer {
    /// The client at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Peer { addr, forwarded_for: headers::client_value(addr.ip()), source: SourceKey::from(addr.ip()) }
    }

    fn ip(&self) -> std::net::IpAddr {
        self.addr.ip()
    }
}

/// Serves the requests of one listener.
pub struct HttpProxy {
    snapshot: SharedSnapshot,
    listener: Arc<str>,
    proto: &'static str,
    rejections: Arc<Rejections>,
    rate_limited: Arc<AtomicU64>,
    body_limits: BodyLimits,
}

impl HttpProxy {
    /// A proxy for the listener named `listener`, speaking `proto` ("http") to clients.
    pub fn new(
        snapshot: SharedSnapshot,
        listener: &str,
        proto: &'static str,
        limits: &Limits,
        rejections: Arc<Rejections>,
        rate_limited: Arc<AtomicU64>,
    ) -> Self {
        let body_limits = BodyLimits {
            max_bytes: limits.max_body_bytes,
            timeout: limits.body_timeout.get(),
            min_rate: limits.min_body_rate,
        };
        HttpProxy { snapshot, listener: listener.into(), proto, rejections, rate_limited, body_limits }
    }

    /// Answers one request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: &Peer) -> Response<ProxyBody> {
        let started = Instant::now();
        let (parts, body) = req.into_parts();
        let routed = self.route(&parts, peer, started, false);
        // Only a body that may carry bytes is forwarded as one (a `GET` has none).
        let body = (!body.is_end_stream()).then_some(body);
        self.answer(routed, parts, body, peer, started).await
    }

    /// Routes a bodyless request that keel's own HTTP/1.1 server path read
    /// ([`super::h1server`]); `None` when the route ends at a pool that path does not serve
    /// (servers over TLS). Decided before the request counts against any limit, so the path
    /// can hand it to hyper untouched.
    pub fn route_own(&self, parts: &http::request::Parts, peer: &Peer) -> Option<OwnRoute> {
        let started = Instant::now();
        match self.route(parts, peer, started, true) {
            Routed::NotOwn => None,
            routed => Some(OwnRoute { routed, started }),
        }
    }

    /// Answers a request routed by [`HttpProxy::route_own`].
    pub async fn answer_own(&self, route: OwnRoute, parts: http::request::Parts, peer: &Peer) -> Response<ProxyBody> {
        self.answer(route.routed, parts, None, peer, route.started).await
    }

    async fn answer(
        &self,
        routed: Routed,
        parts: http::request::Parts,
        body: Option<Incoming>,
        peer: &Peer,
        started: Instant,
    ) -> Response<ProxyBody> {
        match routed {
            Routed::Answer(resp) => resp.map(Either::Right),
            Routed::Forward(pool, sticky) => {
                match self.forward(&pool, sticky.as_deref(), parts, body, peer, started).await {
                    Ok(resp) => resp,
                    Err(e) => {
                        if e.kind == ErrorKind::NoServer {
                            self.rejections.no_server.fetch_add(1, Ordering::Relaxed);
                        }
                        tracing::debug!(target: "keel::proxy", pool = %pool.name, error = %e, "request failed");
                        e.to_response().map(Either::Right)
                    }
                }
            }
            // Only `route_own` routes this way, and it returns no route for it.
            Routed::NotOwn => ProxyError::new(ErrorKind::NoRoute, None, None).to_response().map(Either::Right),
        }
    }

    /// Route, redirect and request filters: where a request goes, or what it is answered with.
    fn route(&self, req: &http::request::Parts, peer: &Peer, started: Instant, own_client: bool) -> Routed {
        let snapshot = self.snapshot.load();
        let Some(router) = snapshot.routers.get(&*self.listener) else {
            return Routed::Answer(ProxyError::new(ErrorKind::NoRoute, None, None).to_response());
        };
        if let Some(port) = router.redirect_https_port {
            return Routed::Answer(redirect_to_https(req, port));
        }
        let host = request_host(&req.uri, &req.headers);
        let view = RequestView { host, path: req.uri.path(), headers: &req.headers };
        let Some(decision) = router.decide(&view) else {
            self.rejections.no_route.fetch_add(1, Ordering::Relaxed);
            return Routed::Answer(ProxyError::new(ErrorKind::NoRoute, None, None).to_response());
        };
        if own_client && decision.pool.config.tls.is_some() {
            return Routed::NotOwn;
        }
        // Request filters: the rate limit is decided before a server is chosen, so a
        // limited request costs the servers nothing.
        if let Some(limiter) = decision.rate_limit {
            let key = ClientKey::from_request(limiter.config(), &req.headers, peer.ip());
            if let RateDecision::Limit { retry_after } = limiter.check(&key, started) {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                return Routed::Answer(too_many_requests(retry_after));
            }
        }
        Routed::Forward(decision.pool.clone(), snapshot.sticky.get(&decision.pool.name).cloned())
    }

    async fn forward(
        &self,
        pool: &Arc<Pool>,
        sticky: Option<&StickyPolicy>,
        mut parts: http::request::Parts,
        body: Option<Incoming>,
        peer: &Peer,
        started: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let upgrade = parts.version == Version::HTTP_11 && headers::is_upgrade(&parts.headers);
        let client_upgrade = if upgrade { parts.extensions.remove::<hyper::upgrade::OnUpgrade>() } else { None };

        // HTTP/2 clients name the host in the URI, not in a Host header; servers behind us
        // speak HTTP/1.1 and need the header.
        let host = match parts.headers.get(header::HOST) {
            Some(h) => Some(h.clone()),
            None => parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        headers::strip_hop_by_hop(&mut parts.headers, upgrade);
        // The client states the body's framing to the server itself, from `framing` below; and
        // hyper's server answers `Expect: 100-continue` once the body is first read.
        let had_length = parts.headers.remove(header::CONTENT_LENGTH).is_some();
        parts.headers.remove(header::EXPECT);
        headers::add_forwarded(&mut parts.headers, &peer.forwarded_for, self.proto, host.as_ref());
        if let Some(h) = &host {
            parts.headers.insert(header::HOST, h.clone());
        }
        // The request target is the client's path and query, shared, not copied.
        let path_and_query = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));

        if body.as_ref().is_some_and(|b| b.size_hint().lower() > self.body_limits.max_bytes) {
            return Err(ProxyError::new(ErrorKind::PayloadTooLarge, Some(&pool.name), None));
        }
        // The verdict exists only where a body does: most requests have none and need not pay an
        // allocation for it.
        let (mut body, verdict) = match body {
            None => (None, None),
            Some(body) => {
                let verdict = Arc::new(BodyVerdict::default());
                (Some(ClientBody::new(body, self.body_limits, verdict.clone())), Some(verdict))
            }
        };
        let body_fault = || verdict.as_deref().and_then(BodyVerdict::fault);
        // A length the client stated is kept (hyper gives it as the exact size); anything else
        // is sent chunked. A stated `Content-Length: 0` stays one: some servers refuse a `POST`
        // without a length (411).
        let framing = match &body {
            None if had_length => Framing::Length(0),
            None => Framing::Empty,
            Some(b) => b.size_hint().exact().map_or(Framing::Chunked, Framing::Length),
        };
        let request_head = RequestHead {
            method: &parts.method,
            target: path_and_query.as_str(),
            headers: &parts.headers,
            framing,
            upgrade,
        };
        let hash = if pool.config.algorithm == Algorithm::IpHash { client_hash(peer.addr) } else { 0 };

        // Sticky lookup replaces the algorithm for the first attempt; the request headers are
        // kept for learning from the response, in the modes that read them there.
        let (bound, sticky_headers) = match sticky {
            Some(policy) => (
                policy.lookup(&parts.headers, &peer.source, &pool.servers).await,
                policy.reads_request_headers_on_response().then(|| parts.headers.clone()),
            ),
            None => (None, None),
        };
        let attempts = pool.config.retries.min(MAX_RETRIES) as usize + 1;
        let mut tried = [usize::MAX; MAX_RETRIES as usize + 1];
        let mut last_error = ProxyError::new(ErrorKind::NoServer, Some(&pool.name), None);
        for attempt in 0..attempts {
            let chosen = match bound {
                Some(i) if attempt == 0 => Some(i),
                _ => pool.select(hash, &tried[..attempt]),
            };
            let Some(index) = chosen else { break };
            tried[attempt] = index;
            let server = &pool.servers[index];

            let in_flight = InFlight::start(server);
            server.stats.requests.fetch_add(1, Ordering::Relaxed);
            let up = Upstream {
                addr: server.address,
                idle: &server.idle,
                max_idle: pool.config.idle_timeout.get(),
                connect_timeout: pool.config.connect_timeout.get(),
                response_timeout: pool.config.request_timeout.get(),
                tls: pool.tls.as_ref(),
            };
            let sent = match body.as_mut() {
                Some(body) => h1client::send(&up, &request_head, body).await,
                None => h1client::send(&up, &request_head, &mut Empty::<Bytes>::new()).await,
            };
            let resp = match sent {
                Err(e @ SendError::Timeout { .. }) => {
                    server.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    pool.observe(index, false);
                    tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, error = %e,
                        "server timed out");
                    return Err(ProxyError::new(ErrorKind::Timeout, Some(&pool.name), Some(&server.name)));
                }
                Err(e) if e.is_connect() => {
                    server.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    pool.observe(index, false);
                    tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, error = %e,
                        "connect failed");
                    last_error = ProxyError::new(ErrorKind::Connect, Some(&pool.name), Some(&server.name));
                    if last_error.retryable && e.may_retry() {
                        continue;
                    }
                    return Err(last_error);
                }
                Err(SendError::RequestBody(e)) => {
                    // The client's body broke the exchange, not the server.
                    tracing::debug!(target: "keel::proxy", pool = %pool.name, error = %e, "request body failed");
                    let kind = match body_fault() {
                        Some(BodyFault::TooLarge) => ErrorKind::PayloadTooLarge,
                        Some(BodyFault::TooSlow) => ErrorKind::RequestTimeout,
                        _ => ErrorKind::BadRequest,
                    };
                    return Err(ProxyError::new(kind, Some(&pool.name), Some(&server.name)));
                }
                Err(e) => {
                    server.stats.broken.fetch_add(1, Ordering::Relaxed);
                    pool.observe(index, false);
                    tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, error = %e,
                        "exchange failed");
                    return Err(ProxyError::new(ErrorKind::Broken, Some(&pool.name), Some(&server.name)));
                }
                Ok(resp) => resp,
            };

            let status = resp.status();
            server.stats.count_status(status.as_u16());
            pool.observe(index, !status.is_server_error());
            pool.latency.observe(started.elapsed());

            let (mut head, body) = resp.into_parts();
            // keel's client accepts a 101 only for a request that asked to upgrade; then the
            // client's connection and the server's become one tunnel.
            if let (Some(client_side), true) = (client_upgrade, body.is_upgraded()) {
                if let Some(server_side) = body.into_upgraded() {
                    tokio::spawn(tunnel(client_side, server_side, in_flight));
                }
                headers::strip_hop_by_hop(&mut head.headers, true);
                return Ok(Response::from_parts(head, Either::Right(Full::new(Bytes::new()))));
            }
            headers::strip_hop_by_hop(&mut head.headers, false);
            if let Some(policy) = sticky {
                let no_headers = http::HeaderMap::new();
                let req_headers = sticky_headers.as_ref().unwrap_or(&no_headers);
                policy.on_response(
                    index,
                    bound == Some(index),
                    req_headers,
                    &peer.source,
                    &mut head.headers,
                    &pool.servers,
                );
            }
            return Ok(Response::from_parts(head, Either::Left(Tracked::new(body, in_flight))));
        }
        Err(last_error)
    }
}

/// A request's route, decided by [`HttpProxy::route_own`].
pub struct OwnRoute {
    routed: Routed,
    started: Instant,
}

/// Where [`HttpProxy::route`] sends a request.
enum Routed {
    /// keel answers itself (no route, redirect, rate limit).
    Answer(Response<Full<Bytes>>),
    /// To this pool, with its sticky policy.
    Forward(Arc<Pool>, Option<Arc<StickyPolicy>>),
    /// To a pool keel's own client does not serve; only asked for by its server path.
    NotOwn,
}

/// 308 to the same URL over https, for `redirect_to_https` listeners.
fn redirect_to_https(req: &http::request::Parts, port: u16) -> Response<Full<Bytes>> {
    // The host is reflected into Location: only a plain host name or IP literal may be, or a
    // hostile Host header would redirect the client elsewhere (RFC 9112 §3.2: answer 400).
    let host = match request_host(&req.uri, &req.headers) {
        Some(h) if is_plain_host(h) => h,
        _ => return super::error::plain_response(StatusCode::BAD_REQUEST, "missing or invalid Host header".to_owned()),
    };
    let path = match req.uri.path_and_query().map(|pq| pq.as_str()) {
        Some(p) if p.starts_with('/') => p,
        _ => "/",
    };
    let location = if port == 443 { format!("https://{host}{path}") } else { format!("https://{host}:{port}{path}") };
    let mut resp = Response::new(Full::new(Bytes::from_static(b"moved to https\n")));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => *resp.status_mut() = StatusCode::BAD_REQUEST,
    }
    resp
}

/// A DNS name or an IP literal, nothing else: no userinfo, path, query, fragment or space.
fn is_plain_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['.', '-'])
}

/// 429 with `Retry-After` in whole seconds.
fn too_many_requests(retry_after: std::time::Duration) -> Response<Full<Bytes>> {
    let mut resp = super::error::plain_response(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded".to_owned());
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(retry_after)));
    resp
}

/// Hash of the client address for `ip_hash`.
pub fn client_hash(peer: SocketAddr) -> u64 {
    match peer.ip() {
        std::net::IpAddr::V4(v4) => xxhash_rust::xxh3::xxh3_64_with_seed(&v4.octets(), CLIENT_HASH_SEED),
        std::net::IpAddr::V6(v6) => xxhash_rust::xxh3::xxh3_64_with_seed(&v6.octets(), CLIENT_HASH_SEED),
    }
}

/// Splices an upgraded connection (WebSocket) between client and server until either closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, mut server: Upgraded, in_flight: InFlight) {
    let _in_flight = in_flight;
    match client.await {
        Ok(client) => {
            let mut client = TokioIo::new(client);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
                tracing::debug!(target: "keel::proxy", error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(target: "keel::proxy", error = %e, "upgrade failed"),
    }
}

/// Counts a request as in flight on a server until dropped (when its response body ends).
pub struct InFlight(Arc<ServerState>);

impl InFlight {
    fn start(server: &Arc<ServerState>) -> Self {
        server.active.fetch_add(1, Ordering::Relaxed);
        InFlight(server.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A body that holds `G` until it ends or is dropped: how in-flight counts (per server, per
    /// connection) last exactly as long as the response is being sent.
    pub struct Tracked<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B, G> Tracked<B, G> {
    /// Attaches `guard` to `inner`.
    pub fn new(inner: B, guard: G) -> Self {
        Tracked { inner, guard }
    }
}

impl<B: Body, G> Body for Tracked<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
