//! keel's own HTTP/1.1 client for the exchange that dominates a load balancer's traffic: a
//! `GET` or `HEAD` without a body to a plain-HTTP server.
//!
//! hyper's pooled client runs every server connection on a task of its own: a request crosses
//! a channel to that task, which writes it, reads the response and sends the head back over
//! another channel to the request's task. That is two task wake-ups, two channel operations and
//! the pool's checkout machinery per request, which profiles of the keep-alive benchmark showed
//! as a fifth of keel's user time. Here the request's own task takes an idle connection from the
//! server's list, writes the head, reads and parses the response head and streams the body
//! itself; the connection goes back to the list the moment its body has ended.
//!
//! What keeps this narrow and safe:
//! - Only `GET`/`HEAD` without a body: both are idempotent, so a request that met a connection
//!   the server had just closed (no response byte received) is sent again on a new connection,
//!   as hyper and nginx do. Everything else (bodies, upgrades, TLS to the server, other
//!   methods) goes through hyper's client.
//! - Response framing follows RFC 9112 §6.3: no body after `HEAD`, 1xx, 204 and 304;
//!   `Transfer-Encoding` ending in `chunked` is decoded; one valid `Content-Length` (repeated
//!   identical values allowed) is counted; otherwise the body runs to the close and the
//!   connection is not reused. Conflicting lengths, a 101 nobody asked for, a malformed or
//!   oversized head, and bad chunk framing are errors (the caller answers 502).
//! - A connection is reused only after a complete HTTP/1.1 response without
//!   `Connection: close`, with no stray bytes after it, and only while younger than the pool's
//!   idle timeout. An idle connection the reactor has seen become readable (the server closed
//!   it, or sent something unasked) is dropped at checkout without a syscall.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;

use super::h1::scan::{parse_chunk_size, parse_content_length};

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
/// Longest chunk-size line (size, extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Longest trailer section accepted (trailers are read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Whether a request can take this path.
pub fn eligible(method: &Method, has_body: bool, upgrade: bool, tls: bool) -> bool {
    (*method == Method::GET || *method == Method::HEAD) && !has_body && !upgrade && !tls
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

/// One connection to a server, with the buffer its responses are read into.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// True unless the reactor saw the socket become readable while it was idle: an idle
    /// keep-alive connection has nothing to say, so readable means closed or misbehaving.
    fn is_quiet(&self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.stream.poll_read_ready(&mut cx).is_pending()
    }

    /// Reads more into the buffer; `Ok(0)` is the end of the stream.
    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| poll_fill(&mut self.stream, &mut self.buf, cx, HEAD_CHUNK)).await
    }
}

/// Reads once into `buf`, first reserving `want` bytes when less than a quarter of that is free.
/// keel's server path reads client connections the same way.
pub(super) fn poll_fill<R: AsyncRead + Unpin>(
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

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: another server may be tried.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// The OS error, or a timeout.
        source: io::Error,
    },
    /// The exchange broke after the request was sent, or the response was not valid HTTP/1.1.
    #[error("{0}")]
    Exchange(String),
}

fn broken(what: impl std::fmt::Display) -> SendError {
    SendError::Exchange(what.to_string())
}

/// Where a response's connection goes back to, and when it is too old to keep.
#[derive(Clone)]
pub struct Home {
    /// The server's idle list.
    pub idle: Arc<IdleConns>,
    /// The pool's idle timeout.
    pub max_idle: Duration,
}

/// Sends a bodyless request whose head is `method path` + `headers` (which must carry `Host`)
/// to `addr`, and returns the response with its body still streaming from the connection.
pub async fn send(
    home: &Home,
    addr: SocketAddr,
    connect_timeout: Duration,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response<ResponseBody>, SendError> {
    let head_request = *method == Method::HEAD;
    // A reused connection may have been closed by the server a moment ago; such a failure,
    // before any response byte, sends the request again. A fresh connection gets one try.
    loop {
        let (mut conn, reused) = match home.idle.take(home.max_idle) {
            Some(conn) => (conn, true),
            None => (connect(addr, connect_timeout).await?, false),
        };
        conn.buf.clear();
        encode_head(&mut conn.buf, method, path, headers, addr);
        if let Err(e) = conn.stream.write_all(&conn.buf).await {
            if reused {
                continue;
            }
            return Err(broken(format_args!("write to {addr}: {e}")));
        }
        conn.buf.clear();
        match read_head(&mut conn, head_request).await {
            Ok((parts, framing, keep)) => {
                let body = ResponseBody::new(conn, framing, keep, home.clone());
                return Ok(Response::from_parts(parts, body));
            }
            Err(HeadError::Closed) if reused => continue,
            Err(HeadError::Closed) => {
                return Err(broken(format_args!("{addr} closed the connection before answering")))
            }
            Err(HeadError::Io(e)) if reused && conn.buf.is_empty() => {
                tracing::trace!(target: "keel::proxy", %addr, error = %e, "reused connection failed; retrying");
                continue;
            }
            Err(HeadError::Io(e)) => return Err(broken(format_args!("read from {addr}: {e}"))),
            Err(HeadError::Invalid(why)) => return Err(broken(format_args!("invalid response from {addr}: {why}"))),
        }
    }
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, SendError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(SendError::Connect { addr, source }),
        Err(_) => {
            return Err(SendError::Connect {
                addr,
                source: io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            })
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(Conn { stream, buf: BytesMut::with_capacity(HEAD_CHUNK) })
}

/// `METHOD path HTTP/1.1`, the headers, the blank line. A request that named no host (an
/// HTTP/1.0 client may not) names the server, as HTTP/1.1 requires.
fn encode_head(buf: &mut BytesMut, method: &Method, path: &str, headers: &HeaderMap, addr: SocketAddr) {
    let size = method.as_str().len()
        + path.len()
        + 13
        + headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>()
        + 2;
    buf.reserve(size);
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(path.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(http::header::HOST) {
        buf.extend_from_slice(format!("host: {addr}\r\n").as_bytes());
    }
    for (name, value) in headers {
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

#[derive(Debug)]
enum HeadError {
    /// The stream ended before any byte of a response.
    Closed,
    Io(io::Error),
    Invalid(&'static str),
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// Reads and parses the response head, skipping interim (1xx) responses.
async fn read_head(conn: &mut Conn, head_request: bool) -> Result<(http::response::Parts, Framing, bool), HeadError> {
    loop {
        let parsed = parse_head(&conn.buf, head_request)?;
        match parsed {
            Some(Parsed::Interim(len)) => {
                conn.buf.advance(len);
                continue;
            }
            Some(Parsed::Final { len, parts, framing, keep }) => {
                conn.buf.advance(len);
                return Ok((parts, framing, keep));
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
    /// A 1xx other than 101, `len` bytes long: skipped.
    Interim(usize),
    Final {
        len: usize,
        parts: http::response::Parts,
        framing: Framing,
        keep: bool,
    },
}

fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<Parsed>, HeadError> {
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
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(HeadError::Invalid("101 without an upgrade request"));
    }
    if status.is_informational() {
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
        if name == http::header::CONTENT_LENGTH {
            for part in h.value.split(|&b| b == b',') {
                let n = parse_content_length(part.trim_ascii()).ok_or(HeadError::Invalid("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::Invalid("conflicting Content-Length"));
                }
                repeated_length |= length.is_some();
                length = Some(n);
            }
        } else if name == http::header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Only the final coding decides the framing; it is re-checked on every header line.
            chunked = h
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == http::header::CONNECTION
            && h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
        headers.append(name, value);
    }
    if let (true, false, Some(n)) = (repeated_length, transfer_encoding, length) {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let framing = if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if transfer_encoding {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and a message that had
        // both must not be followed by another on the same connection.
        if length.is_some() {
            close = true;
            headers.remove(http::header::CONTENT_LENGTH);
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
    Ok(Some(Parsed::Final { len, parts, framing, keep: !close }))
}

#[derive(Debug)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data: bytes left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers so far.
    Trailers(usize),
}

#[derive(Debug)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// A response body read straight from the server connection; the connection goes back to
/// its server's idle list as soon as the body has ended cleanly.
pub struct ResponseBody {
    conn: Option<Conn>,
    state: State,
    keep: bool,
    home: Home,
}

impl ResponseBody {
    fn new(conn: Conn, framing: Framing, keep: bool, home: Home) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size),
            Framing::Close => State::Close,
        };
        let mut body = ResponseBody { conn: Some(conn), state, keep, home };
        if matches!(body.state, State::Done) {
            body.finish();
        }
        body
    }

    /// The body has ended: keep the connection if it may carry another exchange.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep && conn.buf.is_empty() {
                self.home.idle.put(conn, self.home.max_idle);
            }
        }
    }

    /// The next frame from what is buffered, if a whole step can be taken without reading.
    fn step(&mut self) -> Result<Option<Bytes>, io::Error> {
        let Some(conn) = self.conn.as_mut() else { return Ok(None) };
        let buf = &mut conn.buf;
        loop {
            match &mut self.state {
                State::Done => return Ok(None),
                State::Close => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Ok(Some(buf.split().freeze()));
                }
                State::Length(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *left == 0 {
                        self.finish();
                    }
                    return Ok(Some(data));
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size => {
                        let Some(end) = find_crlf(buf) else {
                            if buf.len() > MAX_CHUNK_LINE {
                                return Err(invalid("chunk-size line too long"));
                            }
                            return Ok(None);
                        };
                        let size = parse_chunk_size(&buf[..end + 2]).map_err(invalid)?;
                        buf.advance(end + 2);
                        *chunk = if size == 0 { Chunk::Trailers(0) } else { Chunk::Data(size) };
                    }
                    Chunk::Data(left) => {
                        if buf.is_empty() {
                            return Ok(None);
                        }
                        let n = (*left).min(buf.len() as u64) as usize;
                        *left -= n as u64;
                        if *left == 0 {
                            *chunk = Chunk::DataEnd;
                        }
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    Chunk::DataEnd => {
                        if buf.len() < 2 {
                            return Ok(None);
                        }
                        if &buf[..2] != b"\r\n" {
                            return Err(invalid("chunk data not followed by CRLF"));
                        }
                        buf.advance(2);
                        *chunk = Chunk::Size;
                    }
                    Chunk::Trailers(seen) => {
                        let Some(end) = find_crlf(buf) else {
                            if *seen + buf.len() > MAX_TRAILERS {
                                return Err(invalid("trailer section too large"));
                            }
                            return Ok(None);
                        };
                        *seen += end + 2;
                        if *seen > MAX_TRAILERS {
                            return Err(invalid("trailer section too large"));
                        }
                        buf.advance(end + 2);
                        if end == 0 {
                            self.finish();
                            return Ok(None);
                        }
                    }
                },
            }
        }
    }
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.step() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) if matches!(this.state, State::Done) => return Poll::Ready(None),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match poll_fill(&mut conn.stream, &mut conn.buf, cx, READ_CHUNK) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let closed_cleanly = matches!(this.state, State::Close);
                    this.conn = None;
                    this.state = State::Done;
                    if closed_cleanly {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection inside the response body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &[u8], head: bool) -> (usize, http::response::Parts, Framing, bool) {
        match parse_head(raw, head) {
            Ok(Some(Parsed::Final { len, parts, framing, keep })) => (len, parts, framing, keep),
            other => panic!("not a final head: {:?}", other.map(|p| p.is_some())),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (_, parts, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false);
        assert_eq!((parts.status, framing, keep), (StatusCode::OK, Framing::Length(2), true));
        let (_, _, framing, _) = parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", true);
        assert_eq!(framing, Framing::Empty, "HEAD has no body whatever the length says");
        let (_, _, framing, keep) = parsed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Empty, true));
        let (_, _, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Chunked, true));
        let (_, parts, framing, keep) =
            parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Chunked, false), "TE wins, and the connection is not reused");
        assert!(!parts.headers.contains_key(http::header::CONTENT_LENGTH));
        let (_, _, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Close, false));
        let (_, _, framing, keep) = parsed(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((framing, keep), (Framing::Close, false));
        let (_, _, _, keep) =
            parsed(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!keep);
        let (_, _, _, keep) = parsed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!keep, "HTTP/1.0 responses end their connection");
        let (_, parts, framing, _) =
            parsed(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n", false);
        assert_eq!(framing, Framing::Length(3), "repeated identical lengths are one length");
        let lengths: Vec<_> = parts.headers.get_all(http::header::CONTENT_LENGTH).iter().collect();
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
                matches!(parse_head(raw, false), Err(HeadError::Invalid(_))),
                "accepted {:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(matches!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le", false), Ok(None)));
    }

    #[test]
    fn interim_responses_are_skipped() {
        let interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        let raw = [&interim[..], b"HTTP/1.1 200 OK\r\n"].concat();
        assert!(matches!(parse_head(&raw, false), Ok(Some(Parsed::Interim(n))) if n == interim.len()));
    }

    #[test]
    fn chunk_sizes() {
        // The scanner's parser, as the client calls it: the line with its CRLF.
        assert_eq!(parse_chunk_size(b"1a\r\n"), Ok(26));
        assert_eq!(parse_chunk_size(b"A;name=value\r\n"), Ok(10));
        assert!(parse_chunk_size(b"\r\n").is_err());
        assert!(parse_chunk_size(b"zz\r\n").is_err());
        assert!(parse_chunk_size(b"ffffffffffffffff\r\n").is_err(), "longer than any real chunk");
    }

    #[test]
    fn request_heads_name_a_host() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        let mut buf = BytesMut::new();
        encode_head(&mut buf, &Method::GET, "/a?b=c", &headers, addr);
        assert_eq!(&buf[..], b"GET /a?b=c HTTP/1.1\r\nhost: 127.0.0.1:8080\r\naccept: */*\r\n\r\n");
        headers.insert(http::header::HOST, HeaderValue::from_static("example.com"));
        buf.clear();
        encode_head(&mut buf, &Method::HEAD, "/", &headers, addr);
        assert_eq!(&buf[..], b"HEAD / HTTP/1.1\r\naccept: */*\r\nhost: example.com\r\n\r\n");
    }
}
