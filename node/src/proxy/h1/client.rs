//! keel's HTTP/1.1 client: every request keel forwards to a server goes through [`send`], over
//! one pool of keep-alive connections per server ([`IdleConns`]), plain or TLS.
//!
//! The request's own task does the whole exchange: it takes an idle connection from the
//! server's list (or connects, with TLS when the pool has it), writes the head, streams the
//! request body with the shared codec ([`codec::write_body`]), reads and parses the response
//! head and streams the response body with the shared [`codec::Decoder`]; the connection goes
//! back to the list the moment that body has ended. There is no connection task and no channel
//! between the request and its connection (hyper's pooled client had both, and they were a
//! fifth of keel's user time in the keep-alive benchmark).
//!
//! The rules:
//! - Request framing is the caller's [`Framing`]: this module writes `Content-Length` or
//!   `Transfer-Encoding: chunked` itself and never copies either from the caller's headers, so
//!   what the server reads is exactly what is sent.
//! - Response framing follows RFC 9112 §6.3: no body after `HEAD`, 1xx, 204 and 304;
//!   `Transfer-Encoding` ending in `chunked` is decoded (trailers become a trailers frame); one
//!   valid `Content-Length` (repeated identical values allowed, passed on once) is counted;
//!   otherwise the body runs to the close and the connection is not reused. Conflicting
//!   lengths, a 101 nobody asked for, a malformed or oversized head and bad chunk framing are
//!   [`SendError::Server`]; a connection closed or reset before any response byte is
//!   [`SendError::Empty`] (the caller's retry policy tells them apart). Interim responses (100,
//!   103) are skipped.
//! - The response's hop-by-hop fields (`Connection`, `Keep-Alive`, `Transfer-Encoding`, ...)
//!   are left out of its header map at the parse when nothing unusual is among them
//!   ([`ResponseBody::hop_by_hop_removed`]); a `Connection` naming other fields, or an upgrade,
//!   leaves the head whole for the proxy's general strip.
//! - A caller that passes the response on untouched to an HTTP/1 client asks for its fields as
//!   head lines ([`ResponseFields::Raw`]): no `HeaderMap` is built for a usual head, and keel's
//!   HTTP/1 server writes the lines after its own fields.
//! - Timeouts each mean one thing: `connect_timeout` bounds TCP connect plus TLS handshake;
//!   `response_timeout` starts once the whole request is written (a slow but legitimate upload
//!   is bounded by the caller's body limits, not by it), and also bounds how long a write may
//!   make no progress (a server that stops reading).
//! - A server that answers before the upload ends (a 413, say) and closes: the write fails, and
//!   the response it sent is read and returned; that connection is never reused.
//! - A connection is reused only after a complete HTTP/1.1 response without
//!   `Connection: close` to a completely sent request, with no stray bytes after it, and only
//!   while younger than the pool's idle timeout. An idle connection the reactor has seen become
//!   readable (the server closed it, or sent something unasked) is dropped at checkout without
//!   a syscall. A reused connection that fails before any response byte is replaced by a fresh
//!   one and the request sent again, but only while nothing of the request body has been taken
//!   from its source (the body cannot be replayed).
//! - A 101 answering a request that asked to upgrade hands the connection over as
//!   [`Upgraded`] ([`ResponseBody::into_upgraded`]), with whatever the server sent past the
//!   101 head.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::codec::{self, parse_content_length, poll_fill, Decoded, Decoder, Framing, Prefixed, WriteBodyError};
use crate::proxy::headers::{self, Forwarded, X_FORWARDED_FOR};
use crate::tls::UpstreamTls;

/// Most headers accepted in a response head.
const MAX_HEADERS: usize = 128;
/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Idle connections kept per server; more are closed when they come back.
const MAX_IDLE: usize = 512;
/// Read size while a response head is awaited.
const HEAD_CHUNK: usize = 8 * 1024;
/// Read size while a body streams: large enough that a 1 MiB response takes few reads.
const READ_CHUNK: usize = 64 * 1024;

/// Where a request goes: one server's pool of connections.
pub struct Upstream<'a> {
    /// The server.
    pub addr: SocketAddr,
    /// The server's idle connections (`ServerState::idle`): the one pool per server.
    pub idle: &'a Arc<IdleConns>,
    /// The pool's idle timeout: older idle connections are closed, not used.
    pub max_idle: Duration,
    /// Bound on TCP connect plus TLS handshake.
    pub connect_timeout: Duration,
    /// Bound on the wait for the response head once the request is written, and on a write
    /// that makes no progress.
    pub response_timeout: Duration,
    /// The pool's TLS settings; `None` for a plain-HTTP pool.
    pub tls: Option<&'a Arc<UpstreamTls>>,
    /// Where to note how long the connection used took to make, in µs (0: a kept-alive one
    /// was reused), for the access log's `connect_ms`; `None` when nobody asks.
    pub connect_us: Option<&'a AtomicU64>,
}

/// How [`send`] hands the response's fields back.
#[derive(Clone, Copy, Debug, Default)]
pub enum ResponseFields<'a> {
    /// In the response's `HeaderMap`.
    #[default]
    Map,
    /// As the head lines an HTTP/1 client will get ([`ResponseBody::raw_fields`]), with the
    /// response's `HeaderMap` left empty, when the head is a usual one (no repeated or
    /// overridden length, no unusual hop-by-hop field, not a 101); any other head comes as a
    /// map. For a caller that passes the fields on untouched to a client of keel's own HTTP/1
    /// server: building and hashing a map only to encode it again was a sixth of a keep-alive
    /// request's instructions. `replaced` names a field the caller sets itself (the request
    /// id): the server's is left out, as an insert into the map would replace it.
    Raw {
        /// The field the caller sets in the (otherwise empty) map.
        replaced: Option<&'a HeaderName>,
    },
}

/// A response's fields as HTTP/1 head lines ([`ResponseFields::Raw`]): hop-by-hop fields left
/// out, names in lower case (as a `HeaderName` writes them), values as the server sent them.
#[derive(Debug)]
pub struct RawFields {
    /// `name: value\r\n` lines.
    pub lines: Bytes,
    /// A `Date` is among them.
    pub date: bool,
    /// The `Content-Length` among them.
    pub length: Option<u64>,
}

/// The request as it goes on the wire, minus its body.
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// Origin form: `/path?query`.
    pub target: &'a str,
    /// Headers as rewritten by the caller: hop-by-hop and framing headers already removed
    /// (`Content-Length` and `Transfer-Encoding` are skipped here anyway). Without a `Host`,
    /// the server's address is sent as one, as HTTP/1.1 requires.
    pub headers: &'a HeaderMap,
    /// How the body is framed; the client writes the matching header line itself.
    /// `Framing::Close` cannot delimit a request and is sent chunked.
    pub framing: Framing,
    /// The request asks to switch protocols (`Connection: upgrade` + `Upgrade` are in
    /// `headers`): a 101 is accepted and hands the connection over.
    pub upgrade: bool,
    /// `X-Forwarded-*` still to add: written as the head is, after `headers` (whose own
    /// `X-Forwarded-For` it extends and whose fields it replaces), exactly as
    /// [`Forwarded::add_to`] would have left them. Each name is custom, so adding them to
    /// the map hashed them byte by byte: 3 % of a keep-alive request's instructions.
    pub forwarded: Option<Forwarded<'a>>,
    /// How the response's fields come back.
    pub fields: ResponseFields<'a>,
}

/// Why an exchange failed, with the side that failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (TCP or TLS): nothing was sent, another server may be tried.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// The OS or TLS error, or a timeout.
        source: io::Error,
    },
    /// The server did not answer within the response timeout once the request was written, or
    /// stopped reading the request.
    #[error("{addr}: {waiting} timed out")]
    Timeout {
        /// The server.
        addr: SocketAddr,
        /// What was awaited: "response head" or "request write".
        waiting: &'static str,
    },
    /// The server closed or reset the connection before any byte of a response (HAProxy's
    /// "empty response"). It may have acted on the request, or never seen it: only a request
    /// that is safe to apply twice may be sent elsewhere.
    #[error("{addr} sent no response: {source}")]
    Empty {
        /// The server.
        addr: SocketAddr,
        /// The close or the reset.
        source: io::Error,
    },
    /// The server broke the exchange or answered with something that is not valid HTTP/1.1.
    #[error("exchange with {addr} failed: {source}")]
    Server {
        /// The server.
        addr: SocketAddr,
        /// What went wrong (`InvalidData` for an invalid response).
        source: io::Error,
    },
    /// The request body's source (the client's upload) failed: the client's fault, not the
    /// server's.
    #[error("request body: {0}")]
    RequestBody(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SendError {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect { .. })
    }

    /// Whether the request may be sent to another server: only when nothing of it reached
    /// this one.
    pub fn may_retry(&self) -> bool {
        self.is_connect()
    }

    /// Whether the server failed (rather than the client's body).
    pub fn is_server_side(&self) -> bool {
        !matches!(self, SendError::RequestBody(_))
    }

    fn server(
        addr: SocketAddr,
        kind: io::ErrorKind,
        what: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        SendError::Server { addr, source: io::Error::new(kind, what) }
    }
}

/// A server's idle keep-alive connections, newest last.
#[derive(Default)]
pub struct IdleConns {
    conns: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns").field("len", &self.len()).finish()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl IdleConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.conns.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The newest idle connection younger than `max_idle` that has not turned readable.
    fn take(&self, max_idle: Duration) -> Option<Conn> {
        let mut conns = self.lock();
        let now = Instant::now();
        while let Some(idle) = conns.pop_back() {
            if now.duration_since(idle.since) >= max_idle {
                // Everything older is older still.
                conns.clear();
                return None;
            }
            if idle.conn.is_quiet() {
                return Some(idle.conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn, max_idle: Duration) {
        let now = Instant::now();
        let mut conns = self.lock();
        while conns.front().is_some_and(|idle| now.duration_since(idle.since) >= max_idle) {
            conns.pop_front();
        }
        if conns.len() >= MAX_IDLE {
            conns.pop_front();
        }
        conns.push_back(Idle { conn, since: now });
    }

    /// How many connections are idle now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is idle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection to a server, plain or TLS.
pub enum Stream {
    /// Clear text.
    Plain(TcpStream),
    /// TLS, for pools with `[pools.<name>.tls]`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => crate::proxy::sock::poll_send(s, cx, &[io::IoSlice::new(buf)]),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => crate::proxy::sock::poll_send(s, cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to a server, with the buffer its responses are read into.
struct Conn {
    stream: Stream,
    buf: BytesMut,
}

impl Conn {
    /// True unless the reactor saw the socket become readable while it was idle: an idle
    /// keep-alive connection has nothing to say, so readable means closed or misbehaving. For
    /// TLS the TCP socket under the session is asked: a close_notify or an alert makes it
    /// readable just the same.
    fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.stream.tcp().poll_read_ready(&mut cx).is_pending()
    }

    /// Reads more into the buffer; `Ok(0)` is the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| poll_fill(&mut self.stream, &mut self.buf, cx, HEAD_CHUNK)).await
    }
}

/// Sends one request to `up` and returns the response with its body still streaming from the
/// connection. `body` is framed as `head.framing` says (an empty body for `Framing::Empty`).
pub async fn send<B>(
    up: &Upstream<'_>,
    head: &RequestHead<'_>,
    body: &mut B,
) -> Result<Response<ResponseBody>, SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = up.addr;
    let head_request = *head.method == Method::HEAD;
    let mut polled = false;
    // A reused connection may have been closed by the server a moment ago; such a failure,
    // before any response byte and before the body was touched, sends the request again on a
    // new connection. A fresh connection gets one try.
    loop {
        let (mut conn, reused) = match up.idle.take(up.max_idle) {
            Some(conn) => {
                if let Some(us) = up.connect_us {
                    us.store(0, Ordering::Relaxed);
                }
                (conn, true)
            }
            None => {
                let connecting = Instant::now();
                // Boxed: connecting (a TLS handshake's future is ≈ 1.4 KB) happens once per
                // server connection, and unboxed it would size every request's future.
                let conn = Box::pin(connect(up)).await?;
                if let Some(us) = up.connect_us {
                    us.store(connecting.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                (conn, false)
            }
        };
        let retry = |polled: bool| reused && !polled;
        conn.buf.clear();
        let mut out = BytesMut::new();
        encode_head(&mut out, head, addr);
        let mut sink = Stalled::new(&mut conn.stream, up.response_timeout);
        let mut source = Watched { body: &mut *body, polled: &mut polled };
        let framing = if head.framing == Framing::Close { Framing::Chunked } else { head.framing };
        let written = codec::write_body(&mut sink, &mut out, &mut source, framing).await;
        // Whether the whole request reached the server: only then may the connection carry
        // another one after this response.
        let mut complete = true;
        match written {
            Ok(_) => {}
            Err(WriteBodyError::Source(e)) => return Err(SendError::RequestBody(e)),
            // The client's body did not match its own Content-Length: its fault too.
            Err(e @ WriteBodyError::Length { .. }) => return Err(SendError::RequestBody(Box::new(e))),
            Err(WriteBodyError::Sink(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(SendError::Timeout { addr, waiting: "request write" })
            }
            Err(WriteBodyError::Sink(_)) if retry(polled) => continue,
            Err(WriteBodyError::Sink(e)) => {
                // The server may have answered and closed before taking the whole request (a
                // 413 to a large upload): what it sent is its answer, if it is a whole head.
                tracing::trace!(target: "keel::proxy", %addr, error = %e, "write failed; reading an early response");
                complete = false;
            }
        }
        let read =
            tokio::time::timeout(up.response_timeout, read_head(&mut conn, head_request, head.upgrade, head.fields))
                .await;
        let outcome = match read {
            Err(_elapsed) if complete => return Err(SendError::Timeout { addr, waiting: "response head" }),
            Err(_elapsed) => Err(HeadError::Closed),
            Ok(outcome) => outcome,
        };
        match outcome {
            Ok(mut response) => {
                let keep = response.keep && complete;
                let home = Home { idle: up.idle.clone(), max_idle: up.max_idle };
                let body = ResponseBody::new(conn, &mut response, keep, home);
                return Ok(Response::from_parts(response.parts, body));
            }
            Err(HeadError::Closed) if retry(polled) => continue,
            Err(HeadError::Closed) if !complete => {
                let source =
                    io::Error::new(io::ErrorKind::BrokenPipe, "closed the connection while the request was sent");
                return Err(SendError::Empty { addr, source });
            }
            Err(HeadError::Closed) => {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, "closed the connection before answering");
                return Err(SendError::Empty { addr, source });
            }
            Err(HeadError::Io(e)) if retry(polled) && conn.buf.is_empty() => {
                tracing::trace!(target: "keel::proxy", %addr, error = %e, "reused connection failed; retrying");
                continue;
            }
            Err(HeadError::Io(source)) if conn.buf.is_empty() => return Err(SendError::Empty { addr, source }),
            Err(HeadError::Io(source)) => return Err(SendError::Server { addr, source }),
            Err(HeadError::Invalid(why)) => {
                return Err(SendError::server(addr, io::ErrorKind::InvalidData, format!("invalid response: {why}")))
            }
        }
    }
}

async fn connect(up: &Upstream<'_>) -> Result<Conn, SendError> {
    let addr = up.addr;
    let connecting = async {
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        match up.tls {
            Some(tls) => Ok(Stream::Tls(Box::new(tls.connect(tcp).await?))),
            None => Ok::<_, io::Error>(Stream::Plain(tcp)),
        }
    };
    let stream = match tokio::time::timeout(up.connect_timeout, connecting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
        Err(_) => {
            return Err(SendError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            })
        }
    };
    Ok(Conn { stream, buf: BytesMut::with_capacity(HEAD_CHUNK) })
}

/// `METHOD target HTTP/1.1`, the headers, the framing line, the blank line. A request that
/// named no host (an HTTP/1.0 client may not) names the server, as HTTP/1.1 requires.
fn encode_head(buf: &mut BytesMut, head: &RequestHead<'_>, addr: SocketAddr) {
    let prior_for = head.forwarded.and_then(|_| head.headers.get(X_FORWARDED_FOR));
    let forwarded_len = head.forwarded.map_or(0, |f| f.lines_len(prior_for));
    let size =
        head.method.as_str().len() + head.target.len() + 13 + codec::encoded_len(head.headers) + forwarded_len + 40;
    buf.reserve(size);
    buf.extend_from_slice(head.method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(head.target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if !head.headers.contains_key(header::HOST) {
        buf.extend_from_slice(format!("host: {addr}\r\n").as_bytes());
    }
    for (name, value) in head.headers {
        // The framing is ours to state: a stray length or coding from the caller would make
        // the server read a different body than the one sent.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        if head.forwarded.is_some_and(|f| name == X_FORWARDED_FOR || f.replaces(name)) {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    if let Some(forwarded) = head.forwarded {
        forwarded.write_lines(prior_for, buf);
    }
    match head.framing {
        Framing::Empty => {}
        Framing::Length(n) => buf.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        Framing::Chunked | Framing::Close => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// The request body as `write_body` polls it, noting when it yields a frame: from then on the
/// request cannot be sent again.
struct Watched<'a, B> {
    body: &'a mut B,
    polled: &'a mut bool,
}

impl<B: Body + Unpin> Body for Watched<'_, B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.body).poll_frame(cx);
        // A pending or ended body gave nothing away; a frame (or a failure) did.
        if matches!(poll, Poll::Ready(Some(_))) {
            *this.polled = true;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The server connection as the request is written to it: a write that makes no progress for
/// `limit` fails with `TimedOut`. The timer exists only once a write has had to wait, and only
/// runs while one waits: time spent waiting for the request body's source is not counted.
struct Stalled<'a> {
    io: &'a mut Stream,
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    armed: bool,
}

impl<'a> Stalled<'a> {
    fn new(io: &'a mut Stream, limit: Duration) -> Self {
        Stalled { io, limit, timer: None, armed: false }
    }

    /// After a write returned `Pending`: fails once no write has progressed for `limit`.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let deadline = tokio::time::Instant::now() + self.limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, "server stopped reading the request"))
    }

    fn progressed<T>(&mut self, poll: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.armed = false;
                Poll::Ready(result)
            }
            Poll::Pending => self.poll_stall(cx).map(Err),
        }
    }
}

impl AsyncWrite for Stalled<'_> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.io).poll_write(cx, buf);
        this.progressed(poll, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.io).poll_write_vectored(cx, bufs);
        this.progressed(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.io).poll_flush(cx);
        this.progressed(poll, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut *this.io).poll_shutdown(cx);
        this.progressed(poll, cx)
    }
}

#[derive(Debug)]
enum HeadError {
    /// The stream ended before any byte of a response.
    Closed,
    Io(io::Error),
    Invalid(&'static str),
}

/// A final response head, parsed.
struct Head {
    parts: http::response::Parts,
    framing: Framing,
    /// The server lets the connection carry another exchange.
    keep: bool,
    /// A 101 to an upgrade request: the connection now carries the new protocol.
    upgraded: bool,
    /// Its hop-by-hop fields were left out of `parts.headers`.
    hop_free: bool,
    /// Its fields as lines, `parts.headers` left empty ([`ResponseFields::Raw`]).
    raw: Option<Box<RawFields>>,
}

/// Reads and parses the response head, skipping interim (1xx) responses.
async fn read_head(
    conn: &mut Conn,
    head_request: bool,
    upgrade: bool,
    fields: ResponseFields<'_>,
) -> Result<Head, HeadError> {
    loop {
        // An empty buffer (the usual case: a reused connection) has nothing to parse yet.
        if conn.buf.is_empty() {
            match conn.fill().await {
                Ok(0) => return Err(HeadError::Closed),
                Ok(_) => {}
                Err(e) => return Err(HeadError::Io(e)),
            }
        }
        match parse_head(&mut conn.buf, head_request, upgrade, fields)? {
            Some(Parsed::Interim(len)) => {
                conn.buf.advance(len);
                continue;
            }
            Some(Parsed::Final(head)) => return Ok(head),
            None => {}
        }
        if conn.buf.len() >= MAX_HEAD {
            return Err(HeadError::Invalid("response head too large"));
        }
        match conn.fill().await {
            Ok(0) if conn.buf.is_empty() => return Err(HeadError::Closed),
            Ok(0) => return Err(HeadError::Invalid("connection closed inside the response head")),
            Ok(_) => {}
            Err(e) => return Err(HeadError::Io(e)),
        }
    }
}

enum Parsed {
    /// A 1xx other than an accepted 101, `len` bytes long: skipped (left in the buffer).
    Interim(usize),
    /// A final head, split off the buffer.
    Final(Head),
}

/// Parses the response head at the front of `buf`. A final head is split off `buf`, and its
/// header values are slices of it, as the request side's are (`server::Head::into_request`).
/// Measured alone, sharing saved no instructions over a copy per value (reference counting
/// costs about what the small allocations did); what made this parse cheaper was parsing once
/// and into uninitialised slots.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
    fields_as: ResponseFields<'_>,
) -> Result<Option<Parsed>, HeadError> {
    // Uninitialised slots, as for requests: zeroing 128 of them cost more than the parse.
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Invalid("too many headers")),
        Err(_) => return Err(HeadError::Invalid("malformed response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| HeadError::Invalid("invalid status code"))?;
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded && !upgrade {
        return Err(HeadError::Invalid("101 without an upgrade request"));
    }
    if status.is_informational() && !upgraded {
        return Ok(Some(Parsed::Interim(len)));
    }
    let version = if resp.version == Some(1) { Version::HTTP_11 } else { Version::HTTP_10 };
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = version == Version::HTTP_10;
    // One length given more than once ("2, 2", or two lines): accepted, and passed on once.
    let mut repeated_length = false;
    // httparse's fields are slices of `buf`: their offsets survive the split below.
    let base = buf.as_ptr() as usize;
    let offset = |s: &[u8]| u32::try_from((s.as_ptr() as usize).wrapping_sub(base)).unwrap_or(u32::MAX);
    // Per field: name start and end, value start and end.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let fields = resp.headers.len();
    // Hop-by-hop fields (bit i: field i) are left out of the map here, when the usual ones are
    // all there is, so `phases::respond` need not look for them again (`hop_by_hop_removed`).
    // A `Connection` naming other fields, a field called `close` or an upgrade keep them all
    // for the general strip.
    const _: () = assert!(MAX_HEADERS <= 128);
    let mut hop = 0u128;
    let mut strip_here = !upgraded;
    for (i, (h, span)) in resp.headers.iter().zip(spans.iter_mut()).enumerate() {
        let (name, value) = (h.name.as_bytes(), h.value);
        // An empty value need not point into the buffer at all.
        let (n, v) = (offset(name), if value.is_empty() { 0 } else { offset(value) });
        *span = [n, n.saturating_add(name.len() as u32), v, v.saturating_add(value.len() as u32)];
        if headers::is_fixed_hop_by_hop(name) {
            hop |= 1 << i;
            if name.eq_ignore_ascii_case(b"connection") && headers::connection_names_fields(value, false) {
                strip_here = false;
            }
        } else if name.eq_ignore_ascii_case(b"close") {
            strip_here = false;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            for part in value.split(|&b| b == b',') {
                let n = parse_content_length(part.trim_ascii()).ok_or(HeadError::Invalid("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Invalid("conflicting Content-Length"));
                }
                repeated_length |= length.is_some();
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // Only the final coding decides the framing; it is re-checked on every header line.
            chunked = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection")
            && value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
    }
    let framing = if upgraded || head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_encoding {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length (dropped below), and a
        // message that had both must not be followed by another on the same connection.
        if length.is_some() {
            close = true;
        }
        if chunked {
            Framing::Chunked
        } else {
            close = true;
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::Close
            }
        }
    };
    let overridden_length = transfer_encoding && length.is_some();
    let head = buf.split_to(len).freeze();
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    let keep = !close && !upgraded;
    if let ResponseFields::Raw { replaced } = fields_as {
        // Only a usual head: the others need the map's edits below.
        if strip_here && !repeated_length && !overridden_length {
            let raw = Some(Box::new(raw_fields(&head, &spans[..fields], hop, replaced, length)));
            return Ok(Some(Parsed::Final(Head { parts, framing, keep, upgraded, hop_free: true, raw })));
        }
    }
    let skip = if strip_here { hop } else { 0 };
    let mut headers = HeaderMap::with_capacity(fields - skip.count_ones() as usize);
    for (i, &[ns, ne, vs, ve]) in spans[..fields].iter().enumerate() {
        if skip & (1 << i) != 0 {
            continue;
        }
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = head
            .get(ns..ne)
            .and_then(|n| HeaderName::from_bytes(n).ok())
            .ok_or(HeadError::Invalid("invalid header name"))?;
        if vs > ve || ve > head.len() {
            return Err(HeadError::Invalid("invalid header value"));
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| HeadError::Invalid("invalid header value"))?;
        headers.append(name, value);
    }
    if overridden_length {
        headers.remove(header::CONTENT_LENGTH);
    } else if let (true, Some(n)) = (repeated_length, length) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    parts.headers = headers;
    Ok(Some(Parsed::Final(Head { parts, framing, keep, upgraded, hop_free: strip_here, raw: None })))
}

/// The lines of [`RawFields`]: each field of `spans` (name start and end, value start and end
/// in `head`) but the hop-by-hop ones (bit i of `hop`: field i) and `replaced`.
fn raw_fields(
    head: &[u8],
    spans: &[[u32; 4]],
    hop: u128,
    replaced: Option<&HeaderName>,
    length: Option<u64>,
) -> RawFields {
    let mut lines = BytesMut::with_capacity(head.len());
    let mut date = false;
    for (i, &[ns, ne, vs, ve]) in spans.iter().enumerate() {
        let (Some(name), Some(value)) = (head.get(ns as usize..ne as usize), head.get(vs as usize..ve as usize)) else {
            continue;
        };
        if hop & (1 << i) != 0 || replaced.is_some_and(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes())) {
            continue;
        }
        date |= name.eq_ignore_ascii_case(b"date");
        let start = lines.len();
        lines.extend_from_slice(name);
        lines[start..].make_ascii_lowercase();
        lines.extend_from_slice(b": ");
        lines.extend_from_slice(value);
        lines.extend_from_slice(b"\r\n");
    }
    RawFields { lines: lines.freeze(), date, length }
}

/// Where a response's connection goes back to, and when it is too old to keep.
struct Home {
    idle: Arc<IdleConns>,
    max_idle: Duration,
}

/// A response body read straight from the server connection; the connection goes back to
/// its server's idle list as soon as the body has ended cleanly.
pub struct ResponseBody {
    conn: Option<Conn>,
    decoder: Decoder,
    keep: bool,
    home: Home,
    /// The connection of a 101 answer, for [`ResponseBody::into_upgraded`].
    upgraded: Option<Conn>,
    /// See [`ResponseBody::hop_by_hop_removed`].
    hop_free: bool,
    /// See [`ResponseBody::raw_fields`]. Boxed: the body is moved through the request path
    /// several times, and most of its size is needed only for this.
    raw: Option<Box<RawFields>>,
}

impl ResponseBody {
    fn new(conn: Conn, head: &mut Head, keep: bool, home: Home) -> Self {
        let (conn, upgraded) = if head.upgraded { (None, Some(conn)) } else { (Some(conn), None) };
        let decoder = Decoder::new(head.framing);
        let (hop_free, raw) = (head.hop_free, head.raw.take());
        let mut body = ResponseBody { conn, decoder, keep, home, upgraded, hop_free, raw };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// Whether this is the (empty) body of a 101 answering an upgrade request.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.is_some()
    }

    /// Whether the response's head came without its hop-by-hop fields: the parse left out the
    /// usual ones (`Connection: keep-alive` on every nginx response), and there were no others.
    /// Then the proxy has nothing to strip.
    pub fn hop_by_hop_removed(&self) -> bool {
        self.hop_free
    }

    /// The response's fields as head lines, when they were asked for so
    /// ([`ResponseFields::Raw`]) and the head was a usual one; its `HeaderMap` is then empty.
    pub fn raw_fields(&self) -> Option<&RawFields> {
        self.raw.as_deref()
    }

    /// For a 101 answering an upgrade request: the server connection, now carrying the new
    /// protocol. `None` for any other response.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        let conn = self.upgraded.take()?;
        Some(Prefixed::new(conn.stream, conn.buf.freeze()))
    }

    /// The body has ended: keep the connection if it may carry another exchange.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep && conn.buf.is_empty() {
                self.home.idle.put(conn, self.home.max_idle);
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.conn = None;
        // Nothing more will come: the body reports its end after this error.
        self.decoder = Decoder::new(Framing::Empty);
        Poll::Ready(Some(Err(e)))
    }
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("decoder", &self.decoder).field("keep", &self.keep).finish_non_exhaustive()
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return this.fail(e.into()),
            }
            match ready!(poll_fill(&mut conn.stream, &mut conn.buf, cx, READ_CHUNK)) {
                Ok(0) => match this.decoder.eof() {
                    Ok(()) => {
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e.into()),
                },
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        if self.conn.is_none() {
            return SizeHint::with_exact(0);
        }
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// A server connection after a 101: the bytes the server sent past the 101 head come first,
/// then the connection itself, plain or TLS.
pub type Upgraded = Prefixed<Stream>;

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn parse_head(raw: &[u8], head_request: bool, upgrade: bool) -> Result<Option<Parsed>, HeadError> {
        super::parse_head(&mut BytesMut::from(raw), head_request, upgrade, ResponseFields::Map)
    }

    fn parsed(raw: &[u8], head: bool) -> (http::response::Parts, Framing, bool) {
        match parse_head(raw, head, false) {
            Ok(Some(Parsed::Final(h))) => (h.parts, h.framing, h.keep),
            Ok(Some(Parsed::Interim(_))) => panic!("interim"),
            Ok(None) => panic!("partial"),
            Err(e) => panic!("not a final head: {e:?}"),
        }
    }

    fn head_of(raw: &[u8], upgrade: bool) -> Head {
        match parse_head(raw, false, upgrade) {
            Ok(Some(Parsed::Final(h))) => h,
            _ => panic!("not a final head"),
        }
    }

    #[test]
    fn the_usual_hop_by_hop_fields_are_left_out_at_the_parse() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                    Transfer-Encoding: chunked\r\nProxy-Connection: x\r\nX-Kept: 1\r\n\r\n";
        let head = head_of(raw, false);
        let names: Vec<&str> = head.parts.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["server", "x-kept"]);
        assert!(head.hop_free);
        assert_eq!(head.framing, Framing::Chunked, "framing is read before the fields go");
        // Anything unusual is left whole for the general strip (`headers::strip_hop_by_hop`).
        for raw in [
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: 1\r\nContent-Length: 0\r\n\r\n",
        ] {
            let head = head_of(raw, false);
            assert!(!head.hop_free);
            assert!(head.parts.headers.contains_key(header::CONNECTION));
        }
        let head =
            head_of(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", true);
        assert!(!head.hop_free && head.upgraded);
        assert!(head.parts.headers.contains_key(header::UPGRADE), "an upgrade keeps its pair");
    }

    fn raw_head(raw: &[u8], head_request: bool, replaced: Option<&HeaderName>) -> Head {
        match super::parse_head(&mut BytesMut::from(raw), head_request, false, ResponseFields::Raw { replaced }) {
            Ok(Some(Parsed::Final(h))) => h,
            _ => panic!("not a final head"),
        }
    }

    #[test]
    fn raw_fields_are_the_lines_a_client_gets() {
        let id = HeaderName::from_static("x-request-id");
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 14:00:00 GMT\r\n\
                    Content-Length: 2\r\nConnection: keep-alive\r\nX-Request-Id: theirs\r\nX-Empty:\r\n\r\nok";
        let head = raw_head(raw, false, Some(&id));
        assert!(head.parts.headers.is_empty());
        let fields = head.raw.expect("a usual head comes as lines");
        assert_eq!(
            String::from_utf8_lossy(&fields.lines),
            "server: nginx\r\ndate: Thu, 03 Dec 2026 14:00:00 GMT\r\ncontent-length: 2\r\nx-empty: \r\n",
            "names in lower case, hop-by-hop fields and the caller's own field left out"
        );
        assert!(fields.date);
        assert_eq!((fields.length, head.framing, head.keep), (Some(2), Framing::Length(2), true));
        let head = raw_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, None);
        let fields = head.raw.expect("lines");
        assert_eq!((&fields.lines[..], fields.date, fields.length), (&b""[..], false, None));
        assert_eq!(head.framing, Framing::Chunked);
        let head = raw_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true, None);
        assert_eq!(head.framing, Framing::Empty, "a HEAD answer keeps its length line and has no body");
        assert_eq!(&head.raw.expect("lines").lines[..], b"content-length: 7\r\n");
        // Heads the map path edits come as a map.
        for unusual in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(raw_head(unusual, false, None).raw.is_none(), "{}", String::from_utf8_lossy(unusual));
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (parts, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false);
        assert_eq!((parts.status, framing, keep), (StatusCode::OK, Framing::Length(2), true));
        let (_, framing, _) = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true);
        assert_eq!(framing, Framing::Empty, "HEAD has no body whatever the length says");
        let (_, framing, keep) = parsed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Empty, true));
        let (_, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Chunked, true));
        let (parts, framing, keep) =
            parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Chunked, false), "TE wins, and the connection is not reused");
        assert!(!parts.headers.contains_key(header::CONTENT_LENGTH));
        let (_, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Close, false));
        let (_, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Close, false));
        let (_, _, keep) =
            parsed(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!keep);
        let (_, _, keep) = parsed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!keep, "HTTP/1.0 responses end their connection");
        let (parts, _, _) = parsed(b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-B: b\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(parts.headers["x-empty"], "", "an empty value is a value");
        assert_eq!(parts.headers["x-b"], "b");
        let (parts, framing, _) =
            parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n", false);
        assert_eq!(framing, Framing::Length(3), "repeated identical lengths are one length");
        let lengths: Vec<_> = parts.headers.get_all(header::CONTENT_LENGTH).iter().collect();
        assert_eq!(lengths, ["3"], "and are passed on as one");
    }

    #[test]
    fn hostile_heads_are_refused() {
        for raw in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(raw, false, false), Err(HeadError::Invalid(_))),
                "accepted {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false, false), Ok(None)));
    }

    #[test]
    fn a_101_is_final_only_for_an_upgrade_request() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nframes";
        let mut buf = BytesMut::from(&raw[..]);
        match super::parse_head(&mut buf, false, true, ResponseFields::Map) {
            Ok(Some(Parsed::Final(h))) => {
                assert_eq!(&buf[..], b"frames", "the head is split off the buffer");
                assert!(h.upgraded && !h.keep && h.framing == Framing::Empty);
            }
            _ => panic!("a 101 to an upgrade request is its answer"),
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        let interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        let raw = [&interim[..], b"HTTP/1.1 200 OK\r\n"].concat();
        assert!(matches!(parse_head(&raw, false, false), Ok(Some(Parsed::Interim(n))) if n == interim.len()));
        let continue_ = b"HTTP/1.1 100 Continue\r\n\r\n";
        assert!(matches!(parse_head(continue_, false, true), Ok(Some(Parsed::Interim(25)))));
    }

    fn head<'a>(method: &'a Method, target: &'a str, headers: &'a HeaderMap, framing: Framing) -> RequestHead<'a> {
        RequestHead { method, target, headers, framing, upgrade: false, forwarded: None, fields: ResponseFields::Map }
    }

    #[test]
    fn request_heads_name_a_host_and_state_their_framing() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut buf = BytesMut::new();
        encode_head(&mut buf, &head(&Method::GET, "/a?b=c", &headers, Framing::Empty), addr);
        assert_eq!(&buf[..], b"GET /a?b=c HTTP/1.1\r\nhost: 127.0.0.1:8080\r\naccept: */*\r\n\r\n");

        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        buf.clear();
        encode_head(&mut buf, &head(&Method::HEAD, "/", &headers, Framing::Empty), addr);
        assert_eq!(&buf[..], b"HEAD / HTTP/1.1\r\naccept: */*\r\nhost: example.com\r\n\r\n");

        // The caller's framing headers never reach the server: the framing argument does.
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("999"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        buf.clear();
        encode_head(&mut buf, &head(&Method::POST, "/up", &headers, Framing::Length(5)), addr);
        assert_eq!(&buf[..], b"POST /up HTTP/1.1\r\naccept: */*\r\nhost: example.com\r\ncontent-length: 5\r\n\r\n");
        buf.clear();
        encode_head(&mut buf, &head(&Method::PUT, "/up", &headers, Framing::Chunked), addr);
        assert_eq!(
            &buf[..],
            b"PUT /up HTTP/1.1\r\naccept: */*\r\nhost: example.com\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn forwarded_fields_are_written_with_the_head() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.append(headers::X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        headers.append(headers::X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.2"));
        headers.insert(headers::X_FORWARDED_PROTO, HeaderValue::from_static("spoofed"));
        headers.insert(headers::X_FORWARDED_HOST, HeaderValue::from_static("spoofed"));
        let client = HeaderValue::from_static("192.0.2.7");
        let host = HeaderValue::from_static("example.com");
        let forwarded = Some(Forwarded { client: &client, proto: "https", host: Some(&host) });
        let mut buf = BytesMut::new();
        encode_head(&mut buf, &RequestHead { forwarded, ..head(&Method::GET, "/", &headers, Framing::Empty) }, addr);
        assert_eq!(
            String::from_utf8_lossy(&buf),
            "GET / HTTP/1.1\r\nhost: example.com\r\nx-forwarded-for: 10.0.0.1, 192.0.2.7\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: example.com\r\n\r\n",
            "as `Forwarded::add_to` leaves the map: the first list extended, the others replaced"
        );
    }

    /// A server that serves each accepted connection with `serve`, counting connections.
    async fn server<F, Fut>(serve: F) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (addr, accepted)
    }

    /// Reads until `end` has been seen; returns everything read.
    async fn read_until(stream: &mut TcpStream, end: &[u8]) -> Vec<u8> {
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !seen.windows(end.len()).any(|w| w == end) {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
            }
        }
        seen
    }

    fn upstream(addr: SocketAddr, idle: &Arc<IdleConns>) -> Upstream<'_> {
        let second = Duration::from_secs(1);
        Upstream {
            addr,
            idle,
            max_idle: second * 5,
            connect_timeout: second,
            response_timeout: second,
            tls: None,
            connect_us: None,
        }
    }

    async fn collect(resp: Response<ResponseBody>) -> (Vec<u8>, Option<HeaderMap>) {
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn bodies_go_out_framed_and_response_trailers_come_back() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (addr, _) = server(move |mut s| {
            let tx = tx.clone();
            async move {
                let request = read_until(&mut s, b"0\r\nx-sum: 5\r\n\r\n").await;
                let _ = tx.send(request);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-check: fine\r\n\r\n",
                    )
                    .await;
                let _ = read_until(&mut s, b"never").await;
            }
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let frames = futures_util::stream::iter(vec![
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::data(Bytes::from_static(b"de"))),
            Ok(Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("x-sum", HeaderValue::from_static("5"));
                t
            })),
        ]);
        let headers = HeaderMap::new();
        let resp = send(
            &upstream(addr, &idle),
            &head(&Method::POST, "/", &headers, Framing::Chunked),
            &mut StreamBody::new(frames),
        )
        .await
        .unwrap();
        let (body, trailers) = collect(resp).await;
        assert_eq!(body, b"ok");
        assert_eq!(trailers.expect("trailers")["x-check"], "fine");
        let request = rx.recv().await.unwrap();
        let text = String::from_utf8_lossy(&request);
        assert!(
            text.contains("transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n"),
            "{text}"
        );
        assert_eq!(idle.len(), 1, "a complete exchange leaves its connection idle");
    }

    #[tokio::test]
    async fn an_upgrade_hands_over_the_connection_with_the_bytes_read_past_the_101() {
        let (addr, _) = server(|mut s| async move {
            read_until(&mut s, b"\r\n\r\n").await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nhello")
                .await;
            let echo = read_until(&mut s, b"ping").await;
            let _ = s.write_all(&echo).await;
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("x"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let request = RequestHead { upgrade: true, ..head(&Method::GET, "/", &headers, Framing::Empty) };
        let resp = send(&upstream(addr, &idle), &request, &mut Empty::new()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut upgraded = resp.into_body().into_upgraded().expect("upgraded");
        let mut first = [0u8; 5];
        upgraded.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello", "what the server sent after the 101 comes first");
        upgraded.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        upgraded.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
        assert!(idle.is_empty(), "an upgraded connection is never pooled");

        // Without an upgrade request, the same 101 is the server's fault.
        let plain = head(&Method::GET, "/", &headers, Framing::Empty);
        let error = send(&upstream(addr, &idle), &plain, &mut Empty::new()).await.unwrap_err();
        assert!(matches!(error, SendError::Server { .. }), "{error}");
    }

    #[tokio::test]
    async fn an_early_answer_to_an_upload_is_returned_and_its_connection_dropped() {
        let (addr, _) = server(|mut s| async move {
            read_until(&mut s, b"\r\n\r\n").await;
            let _ = s.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig").await;
            // Closing with the upload unread resets the connection under the writer.
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let headers = HeaderMap::new();
        let big = Bytes::from(vec![b'x'; 16 * 1024 * 1024]);
        let framing = Framing::Length(big.len() as u64);
        let resp = send(&upstream(addr, &idle), &head(&Method::POST, "/", &headers, framing), &mut Full::new(big))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(collect(resp).await.0, b"big");
        assert!(idle.is_empty(), "a connection whose request was cut short is not reused");
    }

    #[tokio::test]
    async fn a_server_that_stops_reading_is_a_timeout() {
        let (addr, _) = server(|mut s| async move {
            read_until(&mut s, b"\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let headers = HeaderMap::new();
        let big = Bytes::from(vec![b'x'; 64 * 1024 * 1024]);
        let framing = Framing::Length(big.len() as u64);
        let up = Upstream { response_timeout: Duration::from_millis(300), ..upstream(addr, &idle) };
        let error = send(&up, &head(&Method::PUT, "/", &headers, framing), &mut Full::new(big)).await.unwrap_err();
        assert!(matches!(error, SendError::Timeout { waiting: "request write", .. }), "{error}");
    }

    /// A body whose data arrives after `delay`.
    fn slow_body(
        delay: Duration,
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, io::Error>> + Unpin> {
        StreamBody::new(Box::pin(futures_util::stream::once(async move {
            tokio::time::sleep(delay).await;
            Ok(Frame::data(Bytes::from_static(b"late")))
        })))
    }

    #[tokio::test]
    async fn the_response_timeout_starts_when_the_request_is_written() {
        let (addr, _) = server(|mut s| async move {
            read_until(&mut s, b"late").await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            let _ = read_until(&mut s, b"never").await;
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let headers = HeaderMap::new();
        let up = Upstream { response_timeout: Duration::from_millis(200), ..upstream(addr, &idle) };
        // The upload takes longer than the response timeout; the answer comes at once after it.
        let resp = send(
            &up,
            &head(&Method::POST, "/", &headers, Framing::Length(4)),
            &mut slow_body(Duration::from_millis(500)),
        )
        .await
        .unwrap();
        assert_eq!(collect(resp).await.0, b"ok");
    }

    #[tokio::test]
    async fn a_failing_request_body_is_the_clients_fault() {
        let (addr, _) = server(|mut s| async move {
            let _ = read_until(&mut s, b"never").await;
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let headers = HeaderMap::new();
        let mut broken = StreamBody::new(futures_util::stream::iter(vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Err(io::Error::other("client went away")),
        ]));
        let error = send(&upstream(addr, &idle), &head(&Method::POST, "/", &headers, Framing::Chunked), &mut broken)
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::RequestBody(_)) && !error.is_server_side() && !error.may_retry(), "{error}");
        let mut short = Full::new(Bytes::from_static(b"abc"));
        let error = send(&upstream(addr, &idle), &head(&Method::POST, "/", &headers, Framing::Length(9)), &mut short)
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::RequestBody(_)), "a body short of its length: {error}");
    }

    #[tokio::test]
    async fn a_stale_idle_connection_is_replaced_only_while_the_body_is_untouched() {
        // Every connection answers one request as if keeping the connection, then closes it at
        // the next request without answering: what a server's idle timeout racing keel's next
        // request looks like.
        let (addr, accepted) = server(|mut s| async move {
            read_until(&mut s, b"\r\n\r\n").await;
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            read_until(&mut s, b"\r\n\r\n").await;
        })
        .await;
        let idle = Arc::new(IdleConns::default());
        let headers = HeaderMap::new();
        let up = upstream(addr, &idle);
        let get = head(&Method::GET, "/", &headers, Framing::Empty);
        for i in 1..=3 {
            let resp = send(&up, &get, &mut Empty::new()).await.unwrap();
            assert_eq!(collect(resp).await.0, b"ok", "request {i}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3, "each stale connection was replaced");
        assert_eq!(idle.len(), 1);

        // With a body taken from its source, the request cannot be sent again.
        let post = head(&Method::POST, "/", &headers, Framing::Length(3));
        let error = send(&up, &post, &mut Full::new(Bytes::from_static(b"abc"))).await.unwrap_err();
        assert!(matches!(error, SendError::Empty { .. }) && !error.may_retry(), "{error}");
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }
}
