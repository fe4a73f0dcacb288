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
//!   [`SendError::Server`]. Interim responses (100, 103) are skipped.
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

use super::codec::{self, parse_content_length, Decoded, Decoder, Framing, WriteBodyError};
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
enum Stream {
    Plain(TcpStream),
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
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
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

/// Reads once into `buf`, first reserving `want` bytes when less than a quarter of that is free.
/// keel's server path reads client connections the same way.
pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
    stream: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < want / 4 {
        buf.reserve(want);
    }
    // Through `AsyncRead` (not `try_read_buf`): a short read clears the cached readiness, which
    // is what lets `Conn::is_quiet` trust it once the connection is idle.
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf)
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
            Some(conn) => (conn, true),
            None => (connect(up).await?, false),
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
        let read = tokio::time::timeout(up.response_timeout, read_head(&mut conn, head_request, head.upgrade)).await;
        let outcome = match read {
            Err(_elapsed) if complete => return Err(SendError::Timeout { addr, waiting: "response head" }),
            Err(_elapsed) => Err(HeadError::Closed),
            Ok(outcome) => outcome,
        };
        match outcome {
            Ok(response) => {
                let keep = response.keep && complete;
                let home = Home { idle: up.idle.clone(), max_idle: up.max_idle };
                let body = ResponseBody::new(conn, response.framing, keep, response.upgraded, home);
                return Ok(Response::from_parts(response.parts, body));
            }
            Err(HeadError::Closed) if retry(polled) => continue,
            Err(HeadError::Closed) if !complete => {
                return Err(SendError::server(
                    addr,
                    io::ErrorKind::BrokenPipe,
                    "closed the connection while the request was sent",
                ))
            }
            Err(HeadError::Closed) => {
                return Err(SendError::server(
                    addr,
                    io::ErrorKind::UnexpectedEof,
                    "closed the connection before answering",
                ))
            }
            Err(HeadError::Io(e)) if retry(polled) && conn.buf.is_empty() => {
                tracing::trace!(target: "keel::proxy", %addr, error = %e, "reused connection failed; retrying");
                continue;
            }
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
    let size = head.method.as_str().len() + head.target.len() + 13 + codec::encoded_len(head.headers) + 40;
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
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
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
}

/// Reads and parses the response head, skipping interim (1xx) responses.
async fn read_head(conn: &mut Conn, head_request: bool, upgrade: bool) -> Result<Head, HeadError> {
    loop {
        match parse_head(&conn.buf, head_request, upgrade)? {
            Some(Parsed::Interim(len)) => {
                conn.buf.advance(len);
                continue;
            }
            Some(Parsed::Final(len, head)) => {
                conn.buf.advance(len);
                return Ok(head);
            }
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
    /// A 1xx other than an accepted 101, `len` bytes long: skipped.
    Interim(usize),
    /// A final head `len` bytes long.
    Final(usize, Head),
}

fn parse_head(buf: &[u8], head_request: bool, upgrade: bool) -> Result<Option<Parsed>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
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
    let mut headers = HeaderMap::with_capacity(resp.headers.len());
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    let mut close = version == Version::HTTP_10;
    // One length given more than once ("2, 2", or two lines): accepted, and passed on once.
    let mut repeated_length = false;
    for h in resp.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Invalid("invalid header name"))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Invalid("invalid header value"))?;
        if name == header::CONTENT_LENGTH {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_content_length(part.trim_ascii()).ok_or(HeadError::Invalid("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Invalid("conflicting Content-Length"));
                }
                repeated_length |= length.is_some();
                length = Some(n);
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the final coding decides the framing; it is re-checked on every header line.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION
            && h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
        headers.append(name, value);
    }
    if let (true, false, Some(n)) = (repeated_length, transfer_encoding, length) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let framing = if upgraded || head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_encoding {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a message that had
        // both must not be followed by another on the same connection.
        if length.is_some() {
            close = true;
            headers.remove(header::CONTENT_LENGTH);
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
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed::Final(len, Head { parts, framing, keep: !close && !upgraded, upgraded })))
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
}

impl ResponseBody {
    fn new(conn: Conn, framing: Framing, keep: bool, upgraded: bool, home: Home) -> Self {
        let (conn, upgraded) = if upgraded { (None, Some(conn)) } else { (Some(conn), None) };
        let mut body = ResponseBody { conn, decoder: Decoder::new(framing), keep, home, upgraded };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// Whether this is the (empty) body of a 101 answering an upgrade request.
    pub fn is_upgraded(&self) -> bool {
        self.upgraded.is_some()
    }

    /// For a 101 answering an upgrade request: the server connection, now carrying the new
    /// protocol. `None` for any other response.
    pub fn into_upgraded(mut self) -> Option<Upgraded> {
        let conn = self.upgraded.take()?;
        Some(Upgraded { stream: conn.stream, read_ahead: conn.buf })
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
pub struct Upgraded {
    stream: Stream,
    read_ahead: BytesMut,
}

impl std::fmt::Debug for Upgraded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded").field("read_ahead", &self.read_ahead.len()).finish_non_exhaustive()
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
