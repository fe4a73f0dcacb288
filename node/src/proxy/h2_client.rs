//! keel's HTTP/2 client to servers, for pools with `protocol = "h2c"` or `"h2"`: every request
//! such a pool forwards becomes one stream on a connection shared with other requests to the
//! same server ([`H2Conns`], kept in [`crate::pool::ServerState`] beside the HTTP/1 idle list).
//!
//! Framing, flow control and stream multiplexing are the `h2` crate's (the same crate hyper's
//! HTTP/2 front end runs on); keel's part is which connection a stream goes on, when to open
//! another, and how a request body and its response are carried:
//!
//! - **Connections per server.** A stream goes on the connection with the fewest streams that
//!   still has room under the server's `SETTINGS_MAX_CONCURRENT_STREAMS` ([`choose`]); when all
//!   are full, another is opened, up to [`MAX_CONNS_PER_SERVER`]; past that the stream waits
//!   on the least busy connection for the server to grant room (the `h2` crate queues it). One
//!   task drives each connection and notes when it ends (closed, reset, GOAWAY): a dead
//!   connection is never chosen and is dropped from the list; one left without streams longer
//!   than the pool's `idle_timeout` is dropped too (dropping the last handle closes it).
//! - **Request bodies.** An owned body (buffered, or an HTTP/2 client's stream) is pumped by its
//!   own task, so it keeps flowing after the response head has come back: that is what gRPC's
//!   client- and bidirectional streaming need. A body borrowed from an HTTP/1 client's
//!   connection is pumped by the request's task, to its end, before the response is returned.
//!   Data is sent as the server's flow-control window allows, never buffered without bound.
//! - **Cancellation.** A client body that fails (the client reset its stream or went away)
//!   resets the server's stream with `CANCEL`; a request dropped before its response (the
//!   client reset it first) drops the stream's handles, which makes the `h2` crate reset it with
//!   `CANCEL`. A server's reset reaches the client through the response body's error, which
//!   carries the `h2` reason (hyper's server resets the client's stream with it).
//! - **Timeouts.** `connect_timeout` bounds TCP connect plus TLS, and the wait for room on a
//!   connection at its server's stream limit; `response_timeout` starts once
//!   the whole request is sent (an upload in progress is the client's to pace, bounded by the
//!   listener's body limits); a deadline from the caller (gRPC's `grpc-timeout`) bounds the wait
//!   for the response head as well, whichever comes first.
//! - **Failures.** No connection → [`SendError::Connect`]; a stream the connection could not
//!   open (GOAWAY, closed) is tried once on a new connection, then counts as a connect failure
//!   (nothing was sent); a stream reset or a connection lost before the response head →
//!   [`SendError::Empty`]; no head in time → [`SendError::Timeout`]; the client's body failing →
//!   [`SendError::RequestBody`].
//! - **Small frames.** The `h2` crate closes a connection on which small DATA frames pile up
//!   unread (a flood defence); keel allows a busy gRPC server's bursts
//!   ([`SMALL_FRAME_BUDGET`]), not only the crate's default.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::body::BodyError;
use super::h1::client::SendError;
use crate::tls::UpstreamTls;

/// Most connections kept to one server. HTTP/2 multiplexes, so a handful carries any load a
/// server's stream limit allows; more would only spread one server's work thinner.
pub const MAX_CONNS_PER_SERVER: usize = 4;

/// Streams assumed per connection before the server's SETTINGS arrive (RFC 9113 leaves it
/// unlimited; 100 is what it recommends as a minimum for servers to allow).
const INITIAL_MAX_STREAMS: usize = 100;

/// How many small DATA frames (counted as 256 bytes less their payload each) may wait in a
/// connection's receive queues before the `h2` crate takes the server for a flood and closes
/// the connection with ENHANCE_YOUR_CALM. Its default, half the 64 KiB connection window, is
/// ≈ 130 frames of a gRPC-sized message: a busy server answering a few hundred unary calls at
/// once (each answer a small non-final DATA frame before its trailers) or streaming small
/// messages in one burst crossed it whenever the streams' tasks were behind the connection's
/// reader, and every stream on the connection failed with the server blamed. 1 MiB admits
/// ≈ 4,000 waiting frames; the payload they carry stays bounded by the window, and a server
/// that floods past it still loses the connection.
const SMALL_FRAME_BUDGET: usize = 1 << 20;

/// A request body keel owns outright: pumped by its own task, so it can outlive the request
/// path's future (a gRPC stream keeps sending after the response head).
pub type OwnedBody = Pin<Box<dyn Body<Data = Bytes, Error = BodyError> + Send + 'static>>;

/// A request's body as the HTTP/2 client gets it.
pub enum RequestBody<'a, B> {
    /// No body: the stream's request half ends with its head.
    Empty,
    /// Owned: pumped by its own task.
    Owned(OwnedBody),
    /// Borrowed from the client's connection: pumped by the request's task, to its end,
    /// before the response is returned.
    Borrowed(&'a mut B),
}

/// Where a request goes: one server's shared HTTP/2 connections.
pub struct Upstream<'a> {
    /// The server.
    pub addr: SocketAddr,
    /// The server's connections (`ServerState::h2`).
    pub conns: &'a Arc<H2Conns>,
    /// Connections without streams for longer are dropped.
    pub max_idle: Duration,
    /// Bound on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Bound on the wait for the response head once the whole request is sent.
    pub response_timeout: Duration,
    /// Also bounds the wait for the response head (gRPC's `grpc-timeout`), from the caller.
    pub deadline: Option<tokio::time::Instant>,
    /// TLS (ALPN h2) for `protocol = "h2"`; `None` speaks h2c.
    pub tls: Option<&'a Arc<UpstreamTls>>,
    /// Where to note the connect time in µs (0: an open connection was used).
    pub connect_us: Option<&'a AtomicU64>,
}

/// One HTTP/2 connection to a server.
struct H2Conn {
    send: SendRequest<Bytes>,
    /// Streams open on it now (requests whose response body has not ended).
    streams: Arc<AtomicUsize>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, as last seen by the driving task.
    max_streams: Arc<AtomicUsize>,
    /// Set by the driving task when the connection has ended.
    closed: Arc<AtomicBool>,
    /// When its last stream ended ([`crate::pool::now_millis`]).
    idle_since_ms: Arc<AtomicU64>,
}

impl H2Conn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }
}

/// A server's HTTP/2 connections: the one connection pool per server, for HTTP/2 pools.
#[derive(Default)]
pub struct H2Conns {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Held while a connection is being opened, so a burst of requests to a server with no
    /// connection opens one and shares it, instead of one each.
    opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for H2Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Conns").field("len", &self.len()).finish()
    }
}

/// Where the next stream goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// On the connection at this index.
    Use(usize),
    /// On a new connection.
    Open,
}

/// The choice of connection for one more stream, given each live connection's open streams and
/// stream limit: the least busy one with room; else a new one while fewer than `max_conns`
/// exist; else the least busy one anyway (the stream waits there for room).
pub fn choose(conns: &[(usize, usize)], max_conns: usize) -> Choice {
    let with_room = conns.iter().enumerate().filter(|(_, (open, max))| open < max).min_by_key(|(_, (open, _))| *open);
    if let Some((i, _)) = with_room {
        return Choice::Use(i);
    }
    if conns.len() < max_conns {
        return Choice::Open;
    }
    match conns.iter().enumerate().min_by_key(|(_, (open, _))| *open) {
        Some((i, _)) => Choice::Use(i),
        None => Choice::Open,
    }
}

impl H2Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Live connections now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it has no connection.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops dead and long-idle connections, then picks one for a new stream (or says to open
    /// one).
    fn pick(&self, max_idle: Duration) -> Option<Arc<H2Conn>> {
        let now = crate::pool::now_millis();
        let idle_ms = u64::try_from(max_idle.as_millis()).unwrap_or(u64::MAX);
        let mut conns = self.lock();
        conns.retain(|c| {
            c.usable()
                && !(c.streams.load(Ordering::Acquire) == 0
                    && now.saturating_sub(c.idle_since_ms.load(Ordering::Relaxed)) > idle_ms)
        });
        let load: Vec<(usize, usize)> = conns
            .iter()
            .map(|c| (c.streams.load(Ordering::Acquire), c.max_streams.load(Ordering::Relaxed).max(1)))
            .collect();
        match choose(&load, MAX_CONNS_PER_SERVER) {
            Choice::Use(i) => conns.get(i).cloned(),
            Choice::Open => None,
        }
    }

    /// Drops every connection (a reload changed how they must be made); streams on them
    /// finish.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn forget(&self, conn: &Arc<H2Conn>) {
        self.lock().retain(|c| !Arc::ptr_eq(c, conn));
    }
}

/// One stream's hold on its connection: counted in its open streams until dropped.
struct Lease(Arc<H2Conn>);

impl Lease {
    fn new(conn: Arc<H2Conn>) -> Self {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Lease(conn)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(crate::pool::now_millis(), Ordering::Relaxed);
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection for one more stream: a shared one, or a new one.
async fn checkout(up: &Upstream<'_>) -> Result<(Arc<H2Conn>, bool), SendError> {
    if let Some(conn) = up.conns.pick(up.max_idle) {
        return Ok((conn, false));
    }
    let _opening = up.conns.opening.lock().await;
    // Another request may have opened one while this one waited.
    if let Some(conn) = up.conns.pick(up.max_idle) {
        return Ok((conn, false));
    }
    let started = Instant::now();
    let conn = tokio::time::timeout(up.connect_timeout, connect(up.addr, up.tls, up.max_idle))
        .await
        .map_err(|_| SendError::Connect { addr: up.addr, source: io::Error::from(io::ErrorKind::TimedOut) })?
        .map_err(|source| SendError::Connect { addr: up.addr, source })?;
    if let Some(us) = up.connect_us {
        us.store(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    let conn = Arc::new(conn);
    up.conns.lock().push(conn.clone());
    Ok((conn, true))
}

/// One connection of its own, for a health check: dropping the sender closes it.
pub async fn connect_once(addr: SocketAddr, tls: Option<&Arc<UpstreamTls>>) -> io::Result<SendRequest<Bytes>> {
    // Its one stream ends with the check, and dropping the sender then closes it: the idle
    // limit never comes into play.
    Ok(connect(addr, tls, Duration::from_secs(60)).await?.send)
}

/// Opens a connection: TCP, TLS with ALPN h2 when the pool has it, the HTTP/2 handshake, and
/// the task that drives it.
async fn connect(addr: SocketAddr, tls: Option<&Arc<UpstreamTls>>, max_idle: Duration) -> io::Result<H2Conn> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => handshake(tcp, max_idle).await,
        Some(tls) => {
            let stream = tls.connect(tcp).await?;
            if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the server did not agree to HTTP/2 (ALPN h2) in the TLS handshake",
                ));
            }
            handshake(stream, max_idle).await
        }
    }
}

/// The HTTP/2 handshake, and the task that drives the connection until it ends, or until it
/// has carried no stream for `max_idle` (then the task closes it: a pool that has gone quiet
/// keeps no connection open, as HTTP/1 idle connections are not kept past it either).
async fn handshake<T>(io: T, max_idle: Duration) -> io::Result<H2Conn>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        // Keel never accepts pushed streams: a server push has no client to go to.
        .enable_push(false)
        .data_frame_budget(SMALL_FRAME_BUDGET)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(io::Error::other)?;
    let max_streams = Arc::new(AtomicUsize::new(INITIAL_MAX_STREAMS));
    let closed = Arc::new(AtomicBool::new(false));
    let streams = Arc::new(AtomicUsize::new(0));
    let idle_since_ms = Arc::new(AtomicU64::new(crate::pool::now_millis()));
    let (max, gone, open, idle) = (max_streams.clone(), closed.clone(), streams.clone(), idle_since_ms.clone());
    let idle_ms = u64::try_from(max_idle.as_millis()).unwrap_or(u64::MAX);
    tokio::spawn(async move {
        let mut driven = std::pin::pin!(poll_fn(|cx| {
            let polled = Pin::new(&mut connection).poll(cx);
            max.store(connection.max_concurrent_send_streams(), Ordering::Relaxed);
            polled
        }));
        loop {
            tokio::select! {
                result = &mut driven => {
                    if let Err(e) = result {
                        tracing::debug!(target: "keel::proxy", error = %e, "HTTP/2 server connection ended");
                    }
                    break;
                }
                () = tokio::time::sleep(max_idle) => {
                    let quiet = crate::pool::now_millis().saturating_sub(idle.load(Ordering::Relaxed));
                    if open.load(Ordering::Acquire) == 0 && quiet >= idle_ms {
                        break;
                    }
                }
            }
        }
        // Marked before the connection is dropped (closed), so no new stream picks it.
        gone.store(true, Ordering::Release);
    });
    Ok(H2Conn { send, streams, max_streams, closed, idle_since_ms })
}

/// The request as it goes on an HTTP/2 stream, minus its body.
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// `/path?query`.
    pub target: &'a str,
    /// Headers as rewritten by the caller; `Host` becomes `:authority` (the server's address
    /// when absent), connection-specific headers are not sent (HTTP/2 forbids them), `te` is
    /// sent only as `trailers`.
    pub headers: &'a HeaderMap,
}

/// A request's stream, opened on a connection to the server: its head is sent, its body not
/// yet. Until [`finish`] takes a body, a failure has sent nothing and another server may be
/// tried with the body intact.
pub struct Opened {
    lease: Lease,
    response: ResponseFuture,
    stream: SendStream<Bytes>,
}

/// Opens a stream to the server for `head`; `end_of_stream` when the request has no body.
/// A stream the connection cannot open (GOAWAY, closed) is tried once more on a new
/// connection; failing that it counts as a connect failure: nothing was sent.
pub async fn open(up: &Upstream<'_>, head: &RequestHead<'_>, end_of_stream: bool) -> Result<Opened, SendError> {
    let request = build_request(up, head)
        .map_err(|e| SendError::Server { addr: up.addr, source: io::Error::new(io::ErrorKind::InvalidInput, e) })?;
    let mut tries = 0;
    loop {
        tries += 1;
        let (conn, _fresh) = checkout(up).await?;
        let mut sender = conn.send.clone();
        // Room for one more stream on a connection at its server's limit: waiting for it is
        // waiting for a connection, bounded alike; nothing is sent meanwhile.
        let ready = tokio::time::timeout(up.connect_timeout, poll_fn(|cx| sender.poll_ready(cx)))
            .await
            .map_err(|_| SendError::Connect { addr: up.addr, source: io::Error::from(io::ErrorKind::TimedOut) })?;
        let opened = match ready {
            Ok(()) => sender.send_request(request.clone(), end_of_stream),
            Err(e) => Err(e),
        };
        match opened {
            Ok((response, stream)) => return Ok(Opened { lease: Lease::new(conn), response, stream }),
            Err(e) => {
                up.conns.forget(&conn);
                if tries >= 2 {
                    return Err(SendError::Connect { addr: up.addr, source: io::Error::other(e) });
                }
            }
        }
    }
}

/// Sends the body of an [`Opened`] stream and returns its response, whose body streams from
/// the server (and keeps the stream's place on its connection until it ends).
pub async fn finish<B>(
    up: &Upstream<'_>,
    opened: Opened,
    body: RequestBody<'_, B>,
) -> Result<Response<H2Body>, SendError>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin,
{
    let Opened { lease, response, stream } = opened;
    let addr = up.addr;
    let head_wait = async {
        match response.await {
            Ok(resp) => Ok(resp),
            Err(e) => Err(SendError::Empty { addr, source: io::Error::other(e) }),
        }
    };
    let resp = match body {
        RequestBody::Empty => {
            drop(stream);
            exchange(up, head_wait, std::future::ready(Ok(())), false).await?
        }
        RequestBody::Owned(body) => {
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut body = body;
                let _ = done_tx.send(pump(&mut body, stream).await);
            });
            let pumping = async { done_rx.await.unwrap_or(Err(Pumped::Server)) };
            exchange(up, head_wait, pumping, false).await?
        }
        // The body must be all sent before the response goes back: it borrows the client's
        // connection, which the response will need.
        RequestBody::Borrowed(body) => exchange(up, head_wait, pump(body, stream), true).await?,
    };
    let (parts, recv) = resp.into_parts();
    Ok(Response::from_parts(parts, H2Body { recv, trailers: false, done: false, _lease: lease }))
}

/// Waits for the response head while the body is being sent. The response timeout runs from
/// the moment the body is all sent; the caller's deadline from the start. A head that comes
/// first (a gRPC server answering before the client's stream ends) ends the wait, and with
/// `finish_pump` the body is still sent to its end before returning.
async fn exchange<F, P>(
    up: &Upstream<'_>,
    head: F,
    pumping: P,
    finish_pump: bool,
) -> Result<Response<RecvStream>, SendError>
where
    F: Future<Output = Result<Response<RecvStream>, SendError>>,
    P: Future<Output = Result<(), Pumped>>,
{
    let timeout = || SendError::Timeout { addr: up.addr, waiting: "response head" };
    let mut head = std::pin::pin!(head);
    let mut pumping = std::pin::pin!(pumping);
    let mut sent_at: Option<tokio::time::Instant> = None;
    let deadline = up.deadline;
    let resp = loop {
        let after_sent = async {
            match sent_at {
                Some(at) => tokio::time::sleep_until(at + up.response_timeout).await,
                None => std::future::pending().await,
            }
        };
        let caller = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            resp = &mut head => break resp?,
            pumped = &mut pumping, if sent_at.is_none() => {
                if let Err(Pumped::Client(e)) = pumped {
                    return Err(SendError::RequestBody(Box::new(e)));
                }
                // All sent, or the server reset the stream (the head's wait will say so).
                sent_at = Some(tokio::time::Instant::now());
            }
            () = after_sent => return Err(timeout()),
            () = caller => return Err(timeout()),
        }
    };
    if finish_pump && sent_at.is_none() {
        // A server that answered early but neither reads the rest nor resets the stream would
        // hold this request (and its client's connection) forever: bounded like a stalled write.
        match tokio::time::timeout(up.response_timeout, pumping).await {
            Ok(Err(Pumped::Client(e))) => return Err(SendError::RequestBody(Box::new(e))),
            Ok(_) => {}
            Err(_) => return Err(SendError::Timeout { addr: up.addr, waiting: "request write" }),
        }
    }
    Ok(resp)
}

/// How pumping a request body ended early.
enum Pumped {
    /// The client's body failed: the server's stream was reset with `CANCEL`.
    Client(BodyError),
    /// The server reset the stream or the connection ended.
    Server,
}

/// Sends `body` on `stream` as the server's flow-control window allows, trailers included.
/// Stops when the server resets the stream, even while waiting on the client.
async fn pump<B>(body: &mut B, mut stream: SendStream<Bytes>) -> Result<(), Pumped>
where
    B: Body<Data = Bytes, Error = BodyError> + Unpin + ?Sized,
{
    loop {
        let frame = tokio::select! {
            frame = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)) => frame,
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return Err(Pumped::Server),
        };
        let frame = match frame {
            None => return stream.send_data(Bytes::new(), true).map_err(|_| Pumped::Server),
            Some(Err(e)) => {
                stream.send_reset(Reason::CANCEL);
                return Err(Pumped::Client(e));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(mut data) => {
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let room = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        Some(Err(_)) | None => return Err(Pumped::Server),
                    };
                    if room == 0 {
                        continue;
                    }
                    let chunk = data.split_to(room.min(data.len()));
                    stream.send_data(chunk, false).map_err(|_| Pumped::Server)?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return stream.send_trailers(trailers).map_err(|_| Pumped::Server);
                }
            }
        }
    }
}

/// The request head as the `h2` crate takes it: absolute URI (scheme, the request's authority
/// or the server's address, path), connection-specific headers left out.
fn build_request(up: &Upstream<'_>, head: &RequestHead<'_>) -> Result<Request<()>, http::Error> {
    let scheme = if up.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP };
    let authority = match head.headers.get(header::HOST).and_then(|h| Authority::try_from(h.as_bytes()).ok()) {
        Some(a) => a,
        None => Authority::try_from(up.addr.to_string())?,
    };
    let uri = Uri::builder().scheme(scheme).authority(authority).path_and_query(head.target).build()?;
    let mut request = Request::builder().method(head.method.clone()).uri(uri).version(Version::HTTP_2).body(())?;
    let headers = request.headers_mut();
    for (name, value) in head.headers {
        if name == header::HOST || is_connection_specific(name) {
            continue;
        }
        headers.append(name, value.clone());
    }
    Ok(request)
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2): the `h2` crate refuses a request carrying one.
/// `te` is allowed as `trailers` only; the caller puts that back where the client sent it.
fn is_connection_specific(name: &http::HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == "keep-alive"
        || name == "proxy-connection"
}

/// A response body streaming from an HTTP/2 server: data (with the flow-control window given
/// back as it is read), then trailers. Its error is the `h2` crate's own, so a server's reset
/// reaches the client's stream with its reason.
pub struct H2Body {
    recv: RecvStream,
    trailers: bool,
    done: bool,
    _lease: Lease,
}

impl std::fmt::Debug for H2Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Body").field("done", &self.done).finish_non_exhaustive()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.trailers {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.trailers = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => {
                this.done = true;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Ok(None)) => {
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// gRPC's `grpc-timeout` header (an integer of at most 8 digits and a unit: `H`, `M`, `S`, `m`,
/// `u`, `n`), as a duration; `None` when absent or malformed (a malformed one is ignored, as
/// gRPC servers do, rather than failing the call).
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether a request is a gRPC call: `content-type: application/grpc` or `application/grpc+…`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        let ct = ct.trim_start();
        ct.get(..16).is_some_and(|p| p.eq_ignore_ascii_case("application/grpc"))
            && matches!(ct.as_bytes().get(16), None | Some(b'+' | b';'))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use http_body_util::StreamBody;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::body::Replay;

    /// An h2c server allowing `max_streams` streams per connection, whose responses send their
    /// head at once and end their body when `release` is notified; counts connections.
    async fn server(max_streams: u32, release: Arc<tokio::sync::Notify>) -> (SocketAddr, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicU32::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let release = release.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let release = release.clone();
                        async move {
                            let body = futures_util::stream::once(async move {
                                release.notified().await;
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"done")))
                            });
                            Ok::<_, std::convert::Infallible>(Response::new(StreamBody::new(body)))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(max_streams)
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn upstream(addr: SocketAddr, conns: &Arc<H2Conns>) -> Upstream<'_> {
        Upstream {
            addr,
            conns,
            max_idle: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            deadline: None,
            tls: None,
            connect_us: None,
        }
    }

    async fn get(up: &Upstream<'_>) -> Response<H2Body> {
        let headers = HeaderMap::new();
        let head = RequestHead { method: &Method::GET, target: "/", headers: &headers };
        let opened = open(up, &head, true).await.expect("stream opened");
        finish::<Replay>(up, opened, RequestBody::Empty).await.expect("response head")
    }

    #[tokio::test]
    async fn streams_share_a_connection_until_the_server_limit_then_open_another() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted) = server(2, release.clone()).await;
        let conns = Arc::new(H2Conns::default());
        let up = upstream(addr, &conns);
        // Two streams fit on one connection (its limit is 2)...
        let first = get(&up).await;
        let second = get(&up).await;
        assert_eq!((accepted.load(Ordering::SeqCst), conns.len()), (1, 1));
        // ...a third needs another connection.
        let third = get(&up).await;
        assert_eq!((accepted.load(Ordering::SeqCst), conns.len()), (2, 2));
        // Bodies ended (or dropped) give their room back: the next stream opens nothing new.
        drop((first, second, third));
        let fourth = get(&up).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        release.notify_waiters();
        drop(fourth);
    }

    #[tokio::test]
    async fn a_dead_connection_is_dropped_and_replaced() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted) = server(10, release.clone()).await;
        let conns = Arc::new(H2Conns::default());
        let up = upstream(addr, &conns);
        drop(get(&up).await);
        assert_eq!(conns.len(), 1);
        // The connection dies under keel (as when a server is killed): its driving task notes
        // it, and the next request goes on a new one.
        if let Some(conn) = conns.lock().first() {
            conn.closed.store(true, Ordering::Release);
        }
        drop(get(&up).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(conns.len(), 1, "the dead connection left the list");
    }

    #[test]
    fn a_stream_goes_to_the_least_busy_connection_with_room() {
        assert_eq!(choose(&[], 4), Choice::Open);
        assert_eq!(choose(&[(3, 100), (1, 100), (2, 100)], 4), Choice::Use(1));
        // A full connection is skipped even when it is the least busy in absolute terms.
        assert_eq!(choose(&[(2, 2), (5, 100)], 4), Choice::Use(1));
    }

    #[test]
    fn full_connections_open_another_up_to_the_cap_then_queue() {
        assert_eq!(choose(&[(1, 1)], 4), Choice::Open);
        assert_eq!(choose(&[(1, 1), (1, 1), (1, 1)], 4), Choice::Open);
        // At the cap: the least busy one, where the stream waits for the server to grant room.
        assert_eq!(choose(&[(3, 2), (2, 2), (4, 2), (2, 2)], 4), Choice::Use(1));
        // A server announcing 0 streams is treated as 1 by the caller; the cap still holds.
        assert_eq!(choose(&[(1, 1); 4], 4), Choice::Use(0));
    }

    #[test]
    fn grpc_timeouts_parse_every_unit_and_ignore_garbage() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().expect("header value"));
            grpc_timeout(&h)
        };
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("3S"), Some(Duration::from_secs(3)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "10", "123456789S", "-1S", "1s", "1.5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        let h = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().expect("header value"));
            is_grpc(&h)
        };
        assert!(h("application/grpc"));
        assert!(h("application/grpc+proto"));
        assert!(h("Application/GRPC;charset=utf-8"));
        assert!(!h("application/grpc-web"));
        assert!(!h("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
