//! The request path: one HTTP request's trip through keel, in named phases, read top to bottom
//! in [`HttpProxy::handle`].
//!
//! 1. **read head** — done by the client's session before this module sees the request:
//!    keel's HTTP/1 server ([`super::h1::server`]) or the HTTP/2 front end ([`super::h2`]).
//!    Both hand over the same thing: `http::request::Parts` and an optional streaming body.
//! 2. **authority** ([`authority`]): the request's one authority — the target's own (HTTP/2
//!    `:authority`, HTTP/1 absolute form) or else `Host`. Routing, sticky keys and logs use it
//!    and the server gets it as `Host`, so a route fenced to one host cannot be walked around
//!    with another. An HTTP/1 absolute-form target's host replaces the client's `Host`
//!    (RFC 9112 §3.2.2); an HTTP/2 `host` header that names another authority than `:authority`
//!    (RFC 9113 §8.3.1), more than one `Host`, or userinfo in the target's authority is a 400.
//! 3. **route** ([`HttpProxy::route`]): redirect listeners, host/path/header rules, the pool.
//! 4. **admit** ([`HttpProxy::admit`]): the route's rate limit and the body size limit, decided
//!    before a server is chosen so a refused request costs the servers nothing. Then a body
//!    that fits the listener's `request_buffer` is read whole ([`super::body::buffer`]) under
//!    the client body limits, still before any server is involved: a slow client's upload
//!    holds no server connection, and the buffered body can be sent again.
//! 5. **choose** ([`choose`]): sticky lookup, else the pool's algorithm; a retry skips the
//!    servers already tried.
//! 6. **send** ([`send`]): header rewrite (hop-by-hop out, `X-Forwarded-*` in, then the
//!    operator's [`super::header_rules`]), the exchange
//!    through the server's connection pool — keel's HTTP/1.1 client, or for a pool with
//!    `protocol = "h2c"`/`"h2"` its HTTP/2 client ([`super::h2_client`], [`send_h2`]) — bounded
//!    by the pool's timeouts (and a gRPC call's `grpc-timeout`). A failure the
//!    pool's `retry_on` names is retried on another server when the request can be sent again
//!    and the pool's retry budget allows ([`super::retry`]); [`blame`] decides whose failure
//!    it was first.
//! 7. **respond** ([`respond`]): hop-by-hop headers out of the response, sticky learning, the
//!    operator's response header rules, upgrades handed to the session as a tunnel.
//!
//!    When nothing in phases 6–7 reads or edits the headers (no header rules, no sticky
//!    policy, an HTTP/1 pool and an HTTP/1 client), no map is made for them that would only be
//!    encoded again: `X-Forwarded-*` are written by keel's client with the request head
//!    ([`client::RequestHead::forwarded`]), and the server's response fields come back as the
//!    lines keel's HTTP/1 server writes ([`client::ResponseFields::Raw`]).
//! 8. **log** ([`HttpProxy::log`]): counters and latency; errors leave with the side they
//!    belong to. With an access log, [`HttpProxy::handle`] wraps the response body so the
//!    request's line ([`super::access_log`]) is written when the body ends or the client leaves;
//!    the request id (`request_id_header`) is kept or made before phase 2 and returned here.
//!
//! Bodies larger than `request_buffer` stream to the server, responses always stream back.
//! Failures keep their side ([`super::error::Side`]): a client's broken, slow or abandoned
//! upload is the client's (400/408/413), never counted against the server.
//!
//! Timeouts, each meaning one thing: the client's `header_timeout` (in the session), its
//! `body_timeout`/`min_body_rate` ([`ClientBody`]), the server's `connect_timeout` and
//! `response_timeout` (from the whole request written to the response head, in keel's client),
//! and the pool's optional `total_timeout` around all of it ([`HttpProxy::handle`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use keel_cluster::model::{Algorithm, Limits, MAX_RETRIES};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::access_log::{AccessLog, Counted, Entry, Logged, Pending};
use super::body::{
    self, BodyError, BodyFault, BodyLimits, BodyVerdict, Buffered, ClientBody, Payload, Replay, Streamed,
};
use super::error::{ErrorKind, ProxyError};
use super::h1::client::{self, RawFields, RequestHead, ResponseBody, ResponseFields, SendError, Upstream};
use super::h1::codec::Framing;
use super::h2_client::{self, H2Body, OwnedBody};
use super::header_rules::{RuleChain, Vars};
use super::headers::{self, Forwarded};
use super::retry::{self, Failure};
use crate::metrics::{ListenerTraffic, Rejections};
use crate::pool::{Pool, ServerState};
use crate::ratelimit::{retry_after_secs, ClientKey, Decision as RateDecision, RateLimiter};
use crate::routing::RequestView;
use crate::snapshot::SharedSnapshot;
use crate::sticky::{SourceKey, StickyPolicy};

/// Fixed seed for hashing client addresses, so every keel node maps a client to the same
/// position on the consistent-hash ring.
pub const CLIENT_HASH_SEED: u64 = 0x6b65_656c_5f69_7068; // "keel_iph"

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What keel answers with.
pub enum ProxyBody {
    /// A server's body, streamed; the server counts the request in flight until it ends.
    Upstream(Tracked<ResponseBody, InFlight>),
    /// An HTTP/2 server's body (an h2 pool's): its error is the `h2` crate's, so a server's
    /// reset reaches an HTTP/2 client's stream with its reason.
    Upstream2(Tracked<H2Body, InFlight>),
    /// A short body keel wrote itself (errors, redirects, 429).
    Local(Full<Bytes>),
    /// A `101`: no body; the session turns the connection into a tunnel to this server side.
    Upgrade(Upgrade),
    /// Either of the first two, counted, with the access log line written when it ends.
    Logged(Box<Logged>),
}

impl ProxyBody {
    /// An HTTP/1 server's fields as head lines ([`ResponseBody::raw_fields`]), for keel's HTTP/1
    /// server to write after the response's own (then nearly empty) map.
    pub fn raw_fields(&self) -> Option<&RawFields> {
        match self {
            ProxyBody::Upstream(b) => b.inner().raw_fields(),
            ProxyBody::Logged(b) => b.inner.raw_fields(),
            _ => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Upstream2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ProxyBody::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ProxyBody::Upgrade(_) => Poll::Ready(None),
            ProxyBody::Logged(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Upstream2(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
            ProxyBody::Upgrade(_) => true,
            ProxyBody::Logged(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Upstream2(b) => b.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
            ProxyBody::Upgrade(_) => SizeHint::with_exact(0),
            ProxyBody::Logged(b) => b.size_hint(),
        }
    }
}

/// The server side of an upgrade (a WebSocket after its `101`): the server's connection, with
/// the request still counted in flight on its server while the tunnel lives.
pub struct Upgrade {
    server: client::Upgraded,
    _in_flight: InFlight,
}

impl AsyncRead for Upgrade {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().server).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgrade {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().server).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().server).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().server).poll_shutdown(cx)
    }
}

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

/// A client session's request body type, as the request path needs it: a body, and whether a
/// streaming one can be handed to a task of its own. An HTTP/2 stream's body owns itself and
/// can (an h2 pool then keeps it flowing after the response head: gRPC's streaming calls); an
/// HTTP/1 body borrows its connection and cannot.
pub trait ClientSource: Body<Data = Bytes> + Send + Unpin + Sized
where
    Self::Error: Into<BoxError>,
{
    /// Takes the streaming body out of `slot` as an owned one; leaves it there (`None`) when
    /// it borrows anything.
    fn detach(slot: &mut Option<Streamed<Counted<Self>>>) -> Option<OwnedBody>;
}

impl ClientSource for hyper::body::Incoming {
    fn detach(slot: &mut Option<Streamed<Counted<Self>>>) -> Option<OwnedBody> {
        slot.take().map(|body| Box::pin(body) as OwnedBody)
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
    /// Bodies up to this size are read whole before a server is chosen (0 = never).
    request_buffer: u64,
    /// The listener's access log, if it has one.
    access_log: Option<Arc<AccessLog>>,
    /// The header carrying request ids, unless they are off.
    request_id: Option<HeaderName>,
    /// The listener's request and error counters.
    traffic: Arc<ListenerTraffic>,
}

/// What keel answers itself when a phase ends the request early (boxed: the rare path).
type Answer = Box<Response<Full<Bytes>>>;

/// A routed request: the pool, its sticky policy and rate limit, and the request's authority.
struct Routed {
    pool: Arc<Pool>,
    sticky: Option<Arc<StickyPolicy>>,
    rate_limit: Option<Arc<RateLimiter>>,
    authority: Option<HeaderValue>,
    /// The listener's and the route's header rules (usually none).
    rules: RuleChain,
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
        HttpProxy {
            snapshot,
            listener: listener.into(),
            proto,
            rejections,
            rate_limited,
            body_limits,
            request_buffer: limits.request_buffer,
            access_log: None,
            request_id: None,
            traffic: Arc::default(),
        }
    }

    /// The header that carries request ids, when they are kept.
    pub fn request_id_header(&self) -> Option<&HeaderName> {
        self.request_id.as_ref()
    }

    /// The same proxy writing `access_log` and keeping request ids in `request_id`.
    pub fn with_logging(mut self, access_log: Option<Arc<AccessLog>>, request_id: Option<HeaderName>) -> Self {
        self.access_log = access_log;
        self.request_id = request_id;
        self
    }

    /// Counts this listener's requests and errors in `traffic` (shared with its metrics).
    pub fn with_traffic(mut self, traffic: Arc<ListenerTraffic>) -> Self {
        self.traffic = traffic;
        self
    }

    /// Answers one request from `peer`: the whole request path, phase by phase.
    pub async fn handle<B>(&self, mut parts: http::request::Parts, body: Option<B>, peer: &Peer) -> Response<ProxyBody>
    where
        B: ClientSource,
        B::Error: Into<BoxError>,
    {
        let started = Instant::now();
        // The request id first, so every answer (even keel's own refusals) carries it.
        let request_id = self.request_id.as_ref().map(|name| match parts.headers.get(name) {
            Some(id) => id.clone(),
            None => {
                let id = new_request_id();
                parts.headers.insert(name.clone(), id.clone());
                id
            }
        });
        // Dropped with this future if the client cancels (an HTTP/2 reset): still one line.
        let mut pending = self.access_log.as_ref().map(|log| {
            let mut entry = Entry::new(self.listener.clone(), peer.addr, version_name(parts.version));
            entry.method = parts.method.to_string();
            entry.path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.to_string());
            entry.authority = parts
                .uri
                .authority()
                .map(|a| a.to_string())
                .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
            entry.request_id = request_id.as_ref().and_then(|id| id.to_str().ok()).map(str::to_owned);
            entry.termination = Some("client_gone");
            Pending::new(log.clone(), started, entry)
        });
        let body = body.map(|b| Counted::new(b, pending.as_ref().map(|p| p.bytes_in.clone())));
        let trace = Trace::default();
        let grpc = h2_client::is_grpc(&parts.headers);
        let (mut resp, routed, pool) = self.phases(parts, body, peer, started, &trace).await;
        if grpc && matches!(resp.body(), ProxyBody::Local(_)) {
            with_grpc_status(&mut resp);
        }
        self.traffic.count(resp.status().as_u16());
        if let (Some(name), Some(id)) = (&self.request_id, request_id) {
            resp.headers_mut().insert(name.clone(), id);
        }
        let Some(mut pending) = pending.take() else { return resp };
        let entry = &mut pending.entry;
        entry.status = Some(resp.status().as_u16());
        // A trailers-only gRPC answer (an error before any message) has it in the head.
        entry.grpc_status = super::access_log::grpc_status(resp.headers());
        entry.termination = match &routed {
            Ok(_) => None,
            Err(Some(cause)) => Some(*cause),
            Err(None) => match resp.status().as_u16() {
                404 => Some("no_route"),
                429 => Some("rate_limited"),
                400..=599 => Some("refused"),
                _ => None,
            },
        };
        if let Some(pool) = &pool {
            entry.pool = Some(pool.name.clone());
            entry.server = pool.servers.get(trace.server.load(Ordering::Relaxed)).map(|s| s.name.clone());
        }
        entry.retries = trace.attempts.load(Ordering::Relaxed).saturating_sub(1);
        entry.wait = trace.wait_us.get();
        entry.connect = trace.connect_us.get();
        entry.server_time = trace.server_us.get();
        match resp.body() {
            // The session runs the tunnel on this body as it is: the line is written now.
            ProxyBody::Upgrade(_) => resp,
            _ => resp.map(|body| ProxyBody::Logged(Box::new(Logged::new(body, pending)))),
        }
    }

    /// Phases 2–8 of [`HttpProxy::handle`]: the response, and how the request ended for its log
    /// line (`Err(None)`: answered before a pool was chosen; `Err(Some(cause))`: failed, the
    /// access log's word for why).
    async fn phases<B>(
        &self,
        parts: http::request::Parts,
        body: Option<Counted<B>>,
        peer: &Peer,
        started: Instant,
        trace: &Trace,
    ) -> (Response<ProxyBody>, Result<(), Option<&'static str>>, Option<Arc<Pool>>)
    where
        B: ClientSource,
        B::Error: Into<BoxError>,
    {
        let authority = match authority(&parts) {
            Ok(authority) => authority,
            Err(answer) => return ((*answer).map(ProxyBody::Local), Err(None), None),
        };
        let routed = match self.route(&parts, authority) {
            Ok(routed) => routed,
            Err(answer) => return ((*answer).map(ProxyBody::Local), Err(None), None),
        };
        if let Err(answer) = self.admit(&routed, &parts, body.as_ref(), peer, started) {
            return ((*answer).map(ProxyBody::Local), Err(None), Some(routed.pool.clone()));
        }
        if routed.pool.config.protocol.is_h2() && parts.version < Version::HTTP_2 && h2_client::is_grpc(&parts.headers)
        {
            return (grpc_over_http1().map(ProxyBody::Local), Err(None), Some(routed.pool.clone()));
        }
        let forwarded = self.forward(&routed, parts, body, peer, started, trace);
        // The total timeout counts from the head received: the upload, every attempt, every
        // retry. It is the operator's overall bound, so it counts against no server.
        let result = match routed.pool.config.total_timeout {
            Some(total) => tokio::time::timeout_at((started + total.get()).into(), forwarded)
                .await
                .unwrap_or_else(|_| Err(ProxyError::new(ErrorKind::TotalTimeout, Some(&routed.pool.name), None))),
            None => forwarded.await,
        };
        let outcome = result.as_ref().map(|_| ()).map_err(|e| Some(termination(e)));
        (self.log(&routed.pool, result), outcome, Some(routed.pool.clone()))
    }

    /// Phase 3: where a request goes, or what it is answered with.
    fn route(&self, parts: &http::request::Parts, authority: Option<HeaderValue>) -> Result<Routed, Answer> {
        let snapshot = self.snapshot.load();
        let Some(router) = snapshot.routers.get(&*self.listener) else {
            return Err(Box::new(ProxyError::new(ErrorKind::NoRoute, None, None).to_response()));
        };
        if let Some(port) = router.redirect_https_port {
            return Err(Box::new(redirect_to_https(parts, authority.as_ref(), port)));
        }
        let host = authority.as_ref().and_then(|a| a.to_str().ok()).map(crate::routing::strip_port);
        let view = RequestView { host, path: parts.uri.path(), headers: &parts.headers };
        let Some(decision) = router.decide(&view) else {
            self.rejections.no_route.fetch_add(1, Ordering::Relaxed);
            return Err(Box::new(ProxyError::new(ErrorKind::NoRoute, None, None).to_response()));
        };
        Ok(Routed {
            pool: decision.pool.clone(),
            sticky: snapshot.sticky.get(&decision.pool.name).cloned(),
            rate_limit: decision.rate_limit.cloned(),
            rules: router.rules(&decision),
            authority,
        })
    }

    /// Phase 4: the rate limit and the declared body size.
    fn admit<B: Body>(
        &self,
        routed: &Routed,
        parts: &http::request::Parts,
        body: Option<&B>,
        peer: &Peer,
        started: Instant,
    ) -> Result<(), Answer> {
        if let Some(limiter) = &routed.rate_limit {
            let key = ClientKey::from_request(limiter.config(), &parts.headers, peer.ip());
            if let RateDecision::Limit { retry_after } = limiter.check(&key, started) {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                return Err(Box::new(too_many_requests(retry_after)));
            }
        }
        if body.is_some_and(|b| b.size_hint().lower() > self.body_limits.max_bytes) {
            return Err(Box::new(
                ProxyError::new(ErrorKind::PayloadTooLarge, Some(&routed.pool.name), None).to_response(),
            ));
        }
        Ok(())
    }
}

impl HttpProxy {
    /// Phases 4½–7: buffer a small body, choose a server, send, respond; retry what the pool's
    /// `retry_on` and retry budget allow.
    async fn forward<B>(
        &self,
        routed: &Routed,
        mut parts: http::request::Parts,
        body: Option<Counted<B>>,
        peer: &Peer,
        started: Instant,
        trace: &Trace,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: ClientSource,
        B::Error: Into<BoxError>,
    {
        let pool = &routed.pool;
        let h2 = pool.config.protocol.is_h2();
        // gRPC streams in both directions and may pause for as long as the call lives: its
        // body is never buffered (a bidirectional call would wait for its own reply) and has
        // no pause or rate limit, only the size limit. Its `grpc-timeout` bounds the wait for
        // the response head together with the pool's response timeout.
        let grpc = h2 && h2_client::is_grpc(&parts.headers);
        let deadline = grpc
            .then(|| h2_client::grpc_timeout(&parts.headers))
            .flatten()
            .map(|t| tokio::time::Instant::from(started) + t);
        // `te: trailers` is the one `te` HTTP/2 allows, and gRPC servers insist on it.
        let te_trailers = h2
            && parts
                .headers
                .get_all(header::TE)
                .iter()
                .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
        let upgrade = parts.version == Version::HTTP_11 && headers::is_upgrade(&parts.headers);
        // A stated `Content-Length: 0` stays one (some servers refuse a `POST` without a length:
        // 411); a body of known size keeps its length; any other body goes chunked.
        let framing = match &body {
            None if parts.headers.contains_key(header::CONTENT_LENGTH) => Framing::Length(0),
            None => Framing::Empty,
            Some(b) => b.size_hint().exact().map_or(Framing::Chunked, Framing::Length),
        };
        let request_id = self.request_id.as_ref().and_then(|name| parts.headers.get(name)).cloned();
        // Nothing after the rewrite reads or edits the headers (a sticky policy may read any
        // request header, header rules any field) and the pool speaks HTTP/1: then no map is
        // built only to be encoded again, on either side (module doc, phase 7).
        let untouched = !h2 && routed.sticky.is_none() && routed.rules.is_empty();
        let forwarded = rewrite_request(&mut parts, routed, peer, self.proto, upgrade, request_id.as_ref(), untouched);
        if te_trailers {
            parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let mut outgoing = match body {
            None => Outgoing::Buffered(Buffered::default()),
            Some(body) => {
                // The verdict exists only where a body does: most requests have none and need
                // not pay an allocation for it.
                let verdict = Arc::new(BodyVerdict::default());
                let limits = match grpc {
                    true => BodyLimits { timeout: GRPC_BODY_PAUSE, min_rate: 0, ..self.body_limits },
                    false => self.body_limits,
                };
                let body = ClientBody::new(body, limits, verdict.clone());
                // An upgrade's body is the start of a tunnel, never something to wait for.
                let limit = if upgrade || grpc { 0 } else { self.request_buffer };
                match body::buffer(body, limit).await {
                    Ok(Payload::Buffered(buffered)) => Outgoing::Buffered(buffered),
                    Ok(Payload::Streamed(streamed)) => Outgoing::Streamed(streamed, verdict),
                    // No server was involved: the client's fault alone.
                    Err(fault) => return Err(client_error(pool, fault, None)),
                }
            }
        };
        let hash = if pool.config.algorithm == Algorithm::IpHash { client_hash(peer.addr) } else { 0 };
        let (bound, sticky_headers) = match &routed.sticky {
            Some(policy) => (
                policy.lookup(&parts.headers, &peer.source, &pool.servers).await,
                policy.reads_request_headers_on_response().then(|| parts.headers.clone()),
            ),
            None => (None, None),
        };
        // The target is the client's path and query, shared, not copied.
        let target = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The response goes to keel's own HTTP/1 server as the lines it writes (an HTTP/2
        // client's goes through hyper, which needs a map; a 101 is a tunnel's).
        let passed_on = untouched && !upgrade && parts.version != Version::HTTP_2;
        let fields = match passed_on {
            true => ResponseFields::Raw { replaced: self.request_id.as_ref() },
            false => ResponseFields::Map,
        };
        let head = RequestHead {
            method: &parts.method,
            target: target.as_str(),
            headers: &parts.headers,
            framing,
            upgrade,
            forwarded,
            fields,
        };
        let attempts = pool.config.retries.min(MAX_RETRIES) as usize + 1;
        let mut tried = [usize::MAX; MAX_RETRIES as usize + 1];
        // What the client gets if no later attempt does better: the last failure, or a 502/503
        // kept while another server is tried.
        let mut last: Option<Attempt> = None;
        // Phase 7 for the response the client gets.
        let finish = |resp: Response<ServerBody>, index: usize, in_flight: InFlight| {
            // Observed once, by the server; the pool's histogram is their sum (metrics).
            if let Some(server) = pool.servers.get(index) {
                server.stats.latency.observe(started.elapsed());
            }
            // A kept 502/503 may come from an earlier server than the last one tried.
            trace.server.store(index, Ordering::Relaxed);
            let learn = routed.sticky.as_deref().map(|policy| Learn {
                policy,
                chosen: index,
                hit: bound == Some(index),
                request_headers: sticky_headers.as_ref(),
                source: &peer.source,
            });
            let rules = (!routed.rules.is_empty()).then(|| (&routed.rules, peer, &**pool, request_id.as_ref()));
            respond(resp, in_flight, learn, &pool.servers[index], rules, &pool.servers)
        };
        for attempt in 0..attempts {
            let Some(index) = choose(pool, bound, hash, attempt, &tried) else { break };
            // A retry needs room in the pool's budget; without it the request ends with what it
            // has, so a failing pool sees at most its budget's share of extra load.
            let _permit = match attempt {
                0 => None,
                _ => match pool.retries.try_start(&pool.config, pool.active()) {
                    Some(permit) => Some(permit),
                    None => {
                        tracing::debug!(target: "keel::proxy", pool = %pool.name, "retry budget exhausted");
                        break;
                    }
                },
            };
            tried[attempt] = index;
            trace.attempts.fetch_add(1, Ordering::Relaxed);
            trace.server.store(index, Ordering::Relaxed);
            let sent_at = Instant::now();
            // The line's timings are the last attempt's: this one's, from here on.
            trace.wait_us.set(sent_at.duration_since(started));
            trace.connect_us.clear();
            let server = &pool.servers[index];
            let in_flight = InFlight::start(server);
            server.stats.requests.fetch_add(1, Ordering::Relaxed);
            let sent = match h2 {
                false => {
                    let mut body = outgoing.attempt();
                    send(pool, server, &head, &mut body, &trace.connect_us.0).await.map(|r| r.map(ServerBody::H1))
                }
                // Boxed: its future is ≈ 6 KB against the HTTP/1 path's 2 KB, and every request's
                // future (and every connection's task, which is moved when spawned) would carry
                // that size; the h2 pools pay one allocation per request instead.
                true => Box::pin(send_h2(pool, server, &head, &mut outgoing, deadline, &trace.connect_us.0))
                    .await
                    .map(|r| r.map(ServerBody::H2)),
            };
            let more = attempt + 1 < attempts;
            match sent {
                Ok(resp) => {
                    // The server's time starts once it has a connection.
                    let connect = trace.connect_us.get().unwrap_or_default();
                    trace.server_us.set(sent_at.elapsed().saturating_sub(connect));
                    let status = resp.status();
                    server.stats.count_status(status.as_u16());
                    pool.observe(index, !status.is_server_error());
                    let failure = Failure::Status(status.as_u16());
                    if more
                        && status.is_server_error()
                        && retry::policy(&pool.config, &parts.method, outgoing.replayable(), failure)
                    {
                        last = Some(Attempt::Answered(Box::new(resp), index, in_flight));
                        continue;
                    }
                    return Ok(finish(resp, index, in_flight));
                }
                Err(e) => {
                    let failure = match &e {
                        SendError::Connect { .. } => Some(Failure::Connect),
                        SendError::Empty { .. } => Some(Failure::EmptyResponse),
                        _ => None,
                    };
                    let error = blame(pool, index, e, &outgoing);
                    let retry = error.counts_against_server()
                        && failure
                            .is_some_and(|f| retry::policy(&pool.config, &parts.method, outgoing.replayable(), f));
                    last = Some(Attempt::Failed(error));
                    if !(more && retry) {
                        break;
                    }
                }
            }
        }
        match last {
            Some(Attempt::Answered(resp, index, in_flight)) => Ok(finish(*resp, index, in_flight)),
            Some(Attempt::Failed(error)) => Err(error),
            None => Err(ProxyError::new(ErrorKind::NoServer, Some(&pool.name), None)),
        }
    }

    /// Phase 8: what the request cost and how it ended.
    fn log(&self, pool: &Pool, result: Result<Response<ProxyBody>, ProxyError>) -> Response<ProxyBody> {
        match result {
            Ok(resp) => resp,
            Err(e) => {
                if e.kind == ErrorKind::NoServer {
                    self.rejections.no_server.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(target: "keel::proxy", pool = %pool.name, error = %e, "request failed");
                e.to_response().map(ProxyBody::Local)
            }
        }
    }
}

/// What the attempts of one request did, for its access log line.
struct Trace {
    /// Servers tried.
    attempts: std::sync::atomic::AtomicU32,
    /// The index of the last server tried (`usize::MAX`: none).
    server: std::sync::atomic::AtomicUsize,
    /// From the head received to the last attempt's start.
    wait_us: Micros,
    /// The last attempt's connect (0: a reused connection).
    connect_us: Micros,
    /// From the last attempt's connection ready to its response head.
    server_us: Micros,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            attempts: Default::default(),
            server: std::sync::atomic::AtomicUsize::new(usize::MAX),
            wait_us: Micros::default(),
            connect_us: Micros::default(),
            server_us: Micros::default(),
        }
    }
}

/// A duration in microseconds that may not be known yet (`u64::MAX`). Atomic because the
/// request future that fills it in must be `Send`.
struct Micros(AtomicU64);

impl Default for Micros {
    fn default() -> Self {
        Micros(AtomicU64::new(u64::MAX))
    }
}

impl Micros {
    fn set(&self, d: std::time::Duration) {
        self.0.store(u64::try_from(d.as_micros()).unwrap_or(u64::MAX - 1), Ordering::Relaxed);
    }

    fn clear(&self) {
        self.0.store(u64::MAX, Ordering::Relaxed);
    }

    fn get(&self) -> Option<std::time::Duration> {
        let us = self.0.load(Ordering::Relaxed);
        (us != u64::MAX).then(|| std::time::Duration::from_micros(us))
    }
}

/// The access log's word for how a failed request ended: who ended it (`client_`, `server_`,
/// else keel) and, for a timeout, which one.
fn termination(error: &ProxyError) -> &'static str {
    match error.kind {
        ErrorKind::NoRoute => "no_route",
        ErrorKind::NoServer => "no_server",
        ErrorKind::Connect => match error.source.as_deref().and_then(|e| e.downcast_ref::<SendError>()) {
            Some(SendError::Connect { source, .. }) if source.kind() == io::ErrorKind::TimedOut => {
                "server_connect_timeout"
            }
            _ => "server_refused",
        },
        ErrorKind::Timeout => "server_timeout",
        ErrorKind::Broken => "server_broken",
        ErrorKind::PayloadTooLarge => "client_too_large",
        ErrorKind::RequestTimeout => "client_timeout",
        ErrorKind::BadRequest => "client_invalid",
        ErrorKind::ClientGone => "client_gone",
        ErrorKind::TotalTimeout => "total_timeout",
    }
}

/// `HTTP/1.1` and friends, as request lines write them.
fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// A new request id: 128 random bits as 32 hex digits.
///
/// Digits written by hand: `format!("{:032x}")` went through the formatting machinery and was
/// ≈ 2.5 % of keel's user-space instructions per keep-alive request (callgrind).
fn new_request_id() -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    let mut hex = [0u8; 32];
    for digit in hex.iter_mut().rev() {
        *digit = DIGITS[(bits & 0xf) as usize];
        bits >>= 4;
    }
    HeaderValue::from_bytes(&hex).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

/// Phase 2: the request's one authority: the target's own (HTTP/2 `:authority`, an HTTP/1
/// absolute-form URL) — RFC 9112 §3.2.2 and RFC 9113 §8.3.1 both put it before `Host` — or else
/// `Host`. A request that names two authorities, or one with userinfo, is answered 400: which
/// one a server behind keel would believe is anybody's guess.
fn authority(parts: &http::request::Parts) -> Result<Option<HeaderValue>, Answer> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        // HTTP/1's scanner already refuses this; HTTP/2 clients reach here.
        return Err(bad_authority("more than one Host header"));
    }
    let Some(target) = parts.uri.authority() else { return Ok(host.cloned()) };
    // RFC 9110 §4.2.4: userinfo in an http(s) URI is to be treated as an error; forwarded as
    // `Host` it would not even be a valid one.
    if target.as_str().contains('@') {
        return Err(bad_authority("userinfo in the request target"));
    }
    if parts.version == Version::HTTP_2 {
        if let Some(host) = host {
            if !host.as_bytes().eq_ignore_ascii_case(target.as_str().as_bytes()) {
                return Err(bad_authority("Host header does not match :authority"));
            }
        }
    }
    match HeaderValue::from_str(target.as_str()) {
        Ok(value) => Ok(Some(value)),
        Err(_) => Err(bad_authority("invalid authority in the request target")),
    }
}

/// 400 for a request whose authority keel cannot settle on; `why` is fixed text, never the
/// client's.
fn bad_authority(why: &str) -> Answer {
    Box::new(super::error::plain_response(StatusCode::BAD_REQUEST, format!("bad request: {why}")))
}

/// Phase 5: the sticky server on the first attempt, else the pool's algorithm, skipping the
/// servers already tried.
fn choose(pool: &Pool, bound: Option<usize>, hash: u64, attempt: usize, tried: &[usize]) -> Option<usize> {
    match bound {
        Some(i) if attempt == 0 => Some(i),
        _ => pool.select(hash, &tried[..attempt]),
    }
}

/// The request as a server gets it: hop-by-hop headers out, `X-Forwarded-*` in, `Host` set to
/// the request's one authority, an HTTP/2 client's cookie crumbs joined into one `Cookie`; no
/// `Expect` (the client's `100 Continue` is keel's to send) and
/// no framing headers (keel's client states the framing it sends). Then the operator's header
/// rules, listener before route; validation keeps them off framing headers and `Host`.
///
/// With `defer`, `X-Forwarded-*` are not added to the map but returned, for keel's HTTP/1
/// client to write with the head ([`RequestHead::forwarded`]): the caller passes it only when
/// nothing reads the headers after this (no header rules, no sticky policy) and the pool
/// speaks HTTP/1, so no rule here runs either.
fn rewrite_request<'a>(
    parts: &mut http::request::Parts,
    routed: &'a Routed,
    peer: &'a Peer,
    proto: &'static str,
    upgrade: bool,
    request_id: Option<&HeaderValue>,
    defer: bool,
) -> Option<Forwarded<'a>> {
    let authority = routed.authority.as_ref();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::EXPECT);
    parts.headers.remove(header::CONTENT_LENGTH);
    if parts.version == Version::HTTP_2 {
        headers::join_cookie_crumbs(&mut parts.headers);
    }
    let forwarded = Forwarded { client: &peer.forwarded_for, proto, host: authority };
    debug_assert!(!defer || routed.rules.is_empty(), "rules would not see X-Forwarded-*");
    let deferred = defer.then_some(forwarded);
    if deferred.is_none() {
        forwarded.add_to(&mut parts.headers);
    }
    if let Some(a) = authority {
        parts.headers.insert(header::HOST, a.clone());
    }
    if !routed.rules.is_empty() {
        let vars = Vars { client_ip: &peer.forwarded_for, pool: &routed.pool.name, server: None, request_id };
        routed.rules.on_request(&mut parts.headers, &vars);
    }
    deferred
}

/// How an attempt ended.
enum Attempt {
    /// A 502/503 from server `index`, kept while another server is tried (boxed: the rare
    /// path).
    Answered(Box<Response<ServerBody>>, usize, InFlight),
    /// A failure, already blamed.
    Failed(ProxyError),
}

/// The request body as the attempts see it.
enum Outgoing<B> {
    /// No body, or one read whole: every attempt sends it from the start.
    Buffered(Buffered),
    /// Streaming from the client: one attempt can send it, and its verdict says whether the
    /// client broke a limit or went away.
    Streamed(Streamed<B>, Arc<BodyVerdict>),
    /// Streamed, and handed to an HTTP/2 stream's own task: no attempt can send it again.
    Detached(Arc<BodyVerdict>),
}

impl<B> Outgoing<B> {
    /// The body for one attempt.
    fn attempt(&mut self) -> AttemptBody<'_, B> {
        match self {
            Outgoing::Buffered(buffered) => AttemptBody::Replay(buffered.replay()),
            Outgoing::Streamed(streamed, _) => AttemptBody::Stream(streamed),
            // Never reached: a failure after the body left is not retried (not replayable).
            Outgoing::Detached(_) => AttemptBody::Replay(Buffered::default().replay()),
        }
    }

    /// Whether a server that may have read part of it can be sent it again from the start.
    fn replayable(&self) -> bool {
        matches!(self, Outgoing::Buffered(_))
    }

    /// The client's fault, if its streaming body was cut off.
    fn client_fault(&self) -> Option<BodyFault> {
        match self {
            Outgoing::Buffered(_) => None,
            Outgoing::Streamed(_, verdict) | Outgoing::Detached(verdict) => verdict.fault(),
        }
    }
}

impl<B> Outgoing<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Whether the client was still uploading: a streaming body that has not ended.
    fn mid_upload(&self) -> bool {
        matches!(self, Outgoing::Streamed(streamed, _) if !streamed.is_end_stream())
    }
}

/// One attempt's request body.
enum AttemptBody<'a, B> {
    Replay(Replay),
    Stream(&'a mut Streamed<B>),
}

impl<B> Body for AttemptBody<'_, B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            AttemptBody::Replay(b) => Pin::new(b).poll_frame(cx),
            AttemptBody::Stream(b) => Pin::new(&mut **b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AttemptBody::Replay(b) => b.is_end_stream(),
            AttemptBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            AttemptBody::Replay(b) => b.size_hint(),
            AttemptBody::Stream(b) => b.size_hint(),
        }
    }
}

/// The answer to a client whose body broke a limit, was malformed, or was abandoned.
fn client_error(pool: &Pool, fault: BodyFault, server: Option<&ServerState>) -> ProxyError {
    let kind = match fault {
        BodyFault::TooLarge => ErrorKind::PayloadTooLarge,
        BodyFault::TooSlow => ErrorKind::RequestTimeout,
        BodyFault::Malformed => ErrorKind::BadRequest,
        BodyFault::Gone => ErrorKind::ClientGone,
    };
    ProxyError::new(kind, Some(&pool.name), server.map(|s| s.name.as_str()))
}

/// Whose failure a failed exchange was, with the counters and the outlier verdict that go
/// with it. Only a server's own failure feeds outlier detection (and so ejection, and the
/// sticky re-pinning a retry elsewhere brings):
/// - the client's body broke a limit, was malformed, or the client went away → the client's
///   (408/413/400), whatever the server did meanwhile (it saw an abandoned request);
/// - a body that ended short of or past its own declared length → the client's (400);
/// - connect failure, response timeout, reset/close before a response, invalid response →
///   the server's (503/504/502), counted against it — except a server that dropped the
///   connection while the client was still uploading to it: a server giving up on a slow
///   upload protects itself from that client, so it is counted in `broken` but not judged.
fn blame<B>(pool: &Pool, index: usize, error: SendError, outgoing: &Outgoing<B>) -> ProxyError
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let server = &pool.servers[index];
    if let Some(fault) = outgoing.client_fault().filter(|_| !error.is_connect()) {
        tracing::debug!(target: "keel::proxy", pool = %pool.name, error = %error, "request body failed");
        return client_error(pool, fault, Some(server)).with_source(error);
    }
    let kind = match &error {
        SendError::RequestBody(_) => {
            tracing::debug!(target: "keel::proxy", pool = %pool.name, error = %error, "request body failed");
            return ProxyError::new(ErrorKind::BadRequest, Some(&pool.name), Some(&server.name)).with_source(error);
        }
        SendError::Timeout { .. } => {
            server.stats.timeouts.fetch_add(1, Ordering::Relaxed);
            ErrorKind::Timeout
        }
        SendError::Connect { .. } => {
            server.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
            ErrorKind::Connect
        }
        SendError::Empty { .. } | SendError::Server { .. } => {
            server.stats.broken.fetch_add(1, Ordering::Relaxed);
            ErrorKind::Broken
        }
    };
    let judged = !(outgoing.mid_upload() && matches!(error, SendError::Empty { .. } | SendError::Server { .. }));
    if judged {
        pool.observe(index, false);
    }
    tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, error = %error, judged,
        "exchange failed");
    let error = ProxyError::new(kind, Some(&pool.name), Some(&server.name)).with_source(error);
    if judged {
        error
    } else {
        // Not the server's fault as far as keel can tell, and not retried: the body is half sent.
        ProxyError { side: super::error::Side::Internal, retryable: false, ..error }
    }
}

/// Phase 6: one exchange with `server` through its connection pool. The pool's timeouts bound
/// the connect, a server that stops reading, and the wait for the response head once the
/// whole request is written.
async fn send<B>(
    pool: &Pool,
    server: &ServerState,
    head: &RequestHead<'_>,
    body: &mut AttemptBody<'_, B>,
    connect_us: &AtomicU64,
) -> Result<Response<ResponseBody>, SendError>
where
    B: Body<Data = Bytes> + Send + Unpin,
    B::Error: Into<BoxError>,
{
    let up = Upstream {
        addr: server.address,
        idle: &server.idle,
        max_idle: pool.config.idle_timeout.get(),
        connect_timeout: pool.config.connect_timeout.get(),
        response_timeout: pool.config.response_timeout.get(),
        tls: pool.tls.as_ref(),
        connect_us: Some(connect_us),
    };
    client::send(&up, head, body).await
}

/// Phase 6 for an HTTP/2 pool: one stream to `server` on its shared connections. The stream is
/// opened before the body is handed over, so a connect failure leaves a streaming body intact
/// for another server; then an owned body (buffered, or an HTTP/2 client's stream) goes to the
/// stream's own task, a borrowed one is sent by this task.
async fn send_h2<B>(
    pool: &Pool,
    server: &ServerState,
    head: &RequestHead<'_>,
    outgoing: &mut Outgoing<Counted<B>>,
    deadline: Option<tokio::time::Instant>,
    connect_us: &AtomicU64,
) -> Result<Response<H2Body>, SendError>
where
    B: ClientSource,
    B::Error: Into<BoxError>,
{
    let up = h2_client::Upstream {
        addr: server.address,
        conns: &server.h2,
        max_idle: pool.config.idle_timeout.get(),
        connect_timeout: pool.config.connect_timeout.get(),
        response_timeout: pool.config.response_timeout.get(),
        deadline,
        tls: pool.tls.as_ref(),
        connect_us: Some(connect_us),
    };
    // `rewrite_request` adds `X-Forwarded-*` to the map itself for an HTTP/2 pool.
    debug_assert!(head.forwarded.is_none());
    let h2_head = h2_client::RequestHead { method: head.method, target: head.target, headers: head.headers };
    let empty = match &*outgoing {
        Outgoing::Buffered(b) => b.is_empty() && !b.has_trailers(),
        Outgoing::Streamed(..) | Outgoing::Detached(_) => false,
    };
    let opened = h2_client::open(&up, &h2_head, empty).await?;
    if empty {
        return h2_client::finish::<Replay>(&up, opened, h2_client::RequestBody::Empty).await;
    }
    let verdict = match &*outgoing {
        Outgoing::Buffered(b) => {
            let body: OwnedBody = Box::pin(b.replay());
            return h2_client::finish::<Replay>(&up, opened, h2_client::RequestBody::Owned(body)).await;
        }
        Outgoing::Streamed(_, verdict) | Outgoing::Detached(verdict) => verdict.clone(),
    };
    match std::mem::replace(outgoing, Outgoing::Detached(verdict.clone())) {
        Outgoing::Streamed(streamed, _) => {
            let mut slot = Some(streamed);
            if let Some(owned) = B::detach(&mut slot) {
                return h2_client::finish::<Replay>(&up, opened, h2_client::RequestBody::Owned(owned)).await;
            }
            if let Some(streamed) = slot {
                *outgoing = Outgoing::Streamed(streamed, verdict);
            }
            match outgoing {
                Outgoing::Streamed(streamed, _) => {
                    h2_client::finish(&up, opened, h2_client::RequestBody::Borrowed(streamed)).await
                }
                _ => Err(SendError::Empty { addr: server.address, source: io::Error::other("request body lost") }),
            }
        }
        // Already sent once: nothing to send again (the retry policy never gets here).
        other => {
            *outgoing = other;
            Err(SendError::Empty { addr: server.address, source: io::Error::other("request body already sent") })
        }
    }
}

/// A server's response body: from keel's HTTP/1.1 client or its HTTP/2 client.
pub enum ServerBody {
    /// From an HTTP/1.1 server (or a 101's tunnel).
    H1(ResponseBody),
    /// From an HTTP/2 server.
    H2(H2Body),
}

/// How long a gRPC call's request stream may pause: as long as the call lives (its deadline
/// and the pool's timeouts bound it), which a body pause limit would cut short.
const GRPC_BODY_PAUSE: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// 415 for a gRPC call that came over HTTP/1.x to a pool whose servers speak HTTP/2: gRPC is
/// defined on HTTP/2 only, and keel does not translate. Not 426: that status must name a
/// protocol to switch to on this connection (`Upgrade`), and keel offers HTTP/2 only by prior
/// knowledge or ALPN, never by upgrade. The `grpc-status` (13, INTERNAL) and `grpc-message`
/// headers are there for gRPC-aware tools; the body says it in words.
fn grpc_over_http1() -> Response<Full<Bytes>> {
    let why = "gRPC needs HTTP/2: connect with HTTP/2 (h2c by prior knowledge, or TLS with ALPN h2)";
    let mut resp = super::error::plain_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("{why}\n"));
    resp.headers_mut().insert("grpc-status", HeaderValue::from_static("13"));
    resp.headers_mut()
        .insert("grpc-message", HeaderValue::from_static("gRPC needs HTTP/2; this request came over HTTP/1.1"));
    resp
}

/// Gives keel's own answer to a gRPC call (a 504, a 503…) the `grpc-status` and `grpc-message`
/// a gRPC client reads first, so the call fails with a code that says what happened rather than
/// one inferred from the HTTP status. The mapping is gRPC's own ("HTTP to gRPC Status Code
/// Mapping"), except 504: keel knows it was a deadline (its response timeout or the call's
/// `grpc-timeout`), so DEADLINE_EXCEEDED rather than UNAVAILABLE.
fn with_grpc_status(resp: &mut Response<ProxyBody>) {
    if resp.headers().contains_key("grpc-status") {
        return;
    }
    let code: &'static str = match resp.status().as_u16() {
        400 => "13",
        401 => "16",
        403 => "7",
        404 => "12",
        429 | 502 | 503 => "14",
        504 => "4",
        _ => "2",
    };
    let message = format!("keel: {}", resp.status());
    resp.headers_mut().insert("grpc-status", HeaderValue::from_static(code));
    if let Ok(message) = HeaderValue::from_str(&message) {
        resp.headers_mut().insert("grpc-message", message);
    }
}

/// What sticky learning needs from the request once the response is in.
struct Learn<'a> {
    policy: &'a StickyPolicy,
    chosen: usize,
    hit: bool,
    request_headers: Option<&'a HeaderMap>,
    source: &'a SourceKey,
}

/// Phase 7: the response as the client gets it: hop-by-hop headers out, the sticky cookie or
/// table entry in, a `101` (which keel's client accepts only for an upgrade request) turned
/// into the server side of a tunnel for the session to run. The operator's response rules
/// (listener, then route) come after the sticky cookie, so a rule has the last word.
fn respond(
    resp: Response<ServerBody>,
    in_flight: InFlight,
    learn: Option<Learn<'_>>,
    server: &ServerState,
    rules: Option<(&RuleChain, &Peer, &Pool, Option<&HeaderValue>)>,
    servers: &[Arc<ServerState>],
) -> Response<ProxyBody> {
    let (mut head, body) = resp.into_parts();
    let upgraded = matches!(&body, ServerBody::H1(b) if b.is_upgraded());
    if !matches!(&body, ServerBody::H1(b) if b.hop_by_hop_removed()) {
        headers::strip_hop_by_hop(&mut head.headers, upgraded);
    }
    if let Some(learn) = learn {
        let no_headers = HeaderMap::new();
        learn.policy.on_response(
            learn.chosen,
            learn.hit,
            learn.request_headers.unwrap_or(&no_headers),
            learn.source,
            &mut head.headers,
            servers,
        );
    }
    if let Some((rules, peer, pool, request_id)) = rules {
        let vars = Vars { client_ip: &peer.forwarded_for, pool: &pool.name, server: Some(&server.name), request_id };
        rules.on_response(&mut head.headers, &vars);
    }
    let body = match body {
        ServerBody::H1(body) if upgraded => match body.into_upgraded() {
            Some(server) => ProxyBody::Upgrade(Upgrade { server, _in_flight: in_flight }),
            None => ProxyBody::Local(Full::new(Bytes::new())),
        },
        ServerBody::H1(body) => ProxyBody::Upstream(Tracked::new(body, in_flight)),
        ServerBody::H2(body) => ProxyBody::Upstream2(Tracked::new(body, in_flight)),
    };
    Response::from_parts(head, body)
}

/// 308 to the same URL over https, for `redirect_to_https` listeners.
fn redirect_to_https(req: &http::request::Parts, authority: Option<&HeaderValue>, port: u16) -> Response<Full<Bytes>> {
    // The host is reflected into Location: only a plain host name or IP literal may be, or a
    // hostile Host header would redirect the client elsewhere (RFC 9112 §3.2: answer 400).
    let host = match authority.and_then(|a| a.to_str().ok()).map(crate::routing::strip_port) {
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

/// Counts a request (or a spliced TCP connection) as in flight on a server until dropped: when
/// its response body ends, or its tunnel closes.
pub struct InFlight(Arc<ServerState>);

impl InFlight {
    /// Counts one more on `server`.
    pub fn start(server: &Arc<ServerState>) -> Self {
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

    /// The body itself.
    pub fn inner(&self) -> &B {
        &self.inner
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, uri: &str, hosts: &[&str]) -> http::request::Parts {
        let mut b = http::Request::get(uri).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn status(result: Result<Option<HeaderValue>, Answer>) -> Result<Option<String>, u16> {
        result.map(|a| a.map(|v| v.to_str().unwrap_or("?").to_owned())).map_err(|answer| answer.status().as_u16())
    }

    #[test]
    fn the_target_authority_wins_over_host_on_http1() {
        let p = parts(Version::HTTP_11, "http://shop.example/x", &["other.example"]);
        assert_eq!(status(authority(&p)), Ok(Some("shop.example".to_owned())));
        let p = parts(Version::HTTP_11, "/x", &["other.example"]);
        assert_eq!(status(authority(&p)), Ok(Some("other.example".to_owned())));
        let p = parts(Version::HTTP_10, "/x", &[]);
        assert_eq!(status(authority(&p)), Ok(None));
    }

    #[test]
    fn http2_authority_and_host_must_agree() {
        let p = parts(Version::HTTP_2, "https://shop.example/x", &[]);
        assert_eq!(status(authority(&p)), Ok(Some("shop.example".to_owned())));
        let p = parts(Version::HTTP_2, "https://shop.example/x", &["Shop.Example"]);
        assert_eq!(status(authority(&p)), Ok(Some("shop.example".to_owned())));
        let p = parts(Version::HTTP_2, "https://shop.example/x", &["other.example"]);
        assert_eq!(status(authority(&p)), Err(400));
        let p = parts(Version::HTTP_2, "https://shop.example:8443/x", &["shop.example"]);
        assert_eq!(status(authority(&p)), Err(400), "a port is part of the authority");
    }

    #[test]
    fn two_hosts_or_userinfo_are_refused() {
        let p = parts(Version::HTTP_2, "/x", &["a.example", "b.example"]);
        assert_eq!(status(authority(&p)), Err(400));
        let p = parts(Version::HTTP_11, "http://user@shop.example/x", &["shop.example"]);
        assert_eq!(status(authority(&p)), Err(400));
    }
}
