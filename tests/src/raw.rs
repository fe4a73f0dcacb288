//! Raw TCP servers and clients, for what an HTTP library would hide: byte streams for keel's TCP
//! listeners, the exact bytes keel forwards to a backend, and client connections that send
//! request heads byte by byte.
//!
//! - [`TcpServer`]: a plain TCP server, either an echo ([`TcpMode::Echo`]) or a recorder that
//!   reads until the client half-closes, stores every byte, then answers `ACK <n>\n` and closes
//!   ([`TcpMode::RecordThenAck`]) — which shows both the PROXY protocol header keel prepends and
//!   that a half-close travels through.
//! - [`RawHttpBackend`]: an HTTP/1.1 backend written by hand that records every byte it receives
//!   and every request it parses (head bytes, body framing, de-chunked body, trailers), and
//!   answers each request `200 ok` or, [scripted](RawHttpBackend::scripted), with whatever
//!   bytes a test's [`Script`] returns for it (interim responses, trailers, a WebSocket
//!   upgrade). It frames requests as a strict server would (Content-Length or chunked), so a
//!   request smuggled past keel would show up here as a second request head.
//! - [`RawConn`]: a client connection that writes bytes when told to and reads responses with
//!   deadlines, for keep-alive, slow-sending and pipelining tests; [`RawConn::read_message`]
//!   reads one response with its interim (1xx) heads, framing and trailers.
//!
//! One streaming message parser serves both ends: bodies are never buffered whole, only their
//! first [`BODY_KEPT`] bytes are kept, and a [`Digest`] (length + FNV-1a) stands for the rest,
//! so 10 MiB bodies are compared without being held twice.
//!
//! Like [`Backend`](crate::Backend), each server runs on its own thread and runtime and stops
//! (closing every connection) on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::backend::{bind, Running};
use crate::client::{parse_responses, RawResponse};

/// How long a server connection waits for the next bytes before giving up on its client.
const SERVER_IDLE: Duration = Duration::from_secs(30);

/// The longest head or chunk-size line the message parser buffers before it gives up (bodies
/// stream through without being buffered whole).
const MAX_BUFFER: usize = 1 << 20;

/// What a [`TcpServer`] does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpMode {
    /// Writes back every byte as it arrives; half-closes its side when the client does.
    Echo,
    /// Reads until the client half-closes, records the bytes, answers `ACK <n>\n`, closes.
    RecordThenAck,
}

/// A plain TCP server on loopback; see the [module docs](self).
pub struct TcpServer {
    name: String,
    addr: SocketAddr,
    mode: TcpMode,
    accepted: Arc<AtomicU64>,
    served: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    running: Option<Running>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("mode", &self.mode)
            .finish()
    }
}

impl TcpServer {
    /// Starts one called `name` on a free 127.0.0.1 port.
    pub fn start(name: &str, mode: TcpMode) -> Result<TcpServer> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let mut s = TcpServer {
            name: name.to_owned(),
            addr,
            mode,
            accepted: Arc::new(AtomicU64::new(0)),
            served: Arc::new(AtomicU64::new(0)),
            received: Arc::new(Mutex::new(Vec::new())),
            running: None,
        };
        s.serve(listener)?;
        Ok(s)
    }

    fn serve(&mut self, listener: std::net::TcpListener) -> Result<()> {
        let accepted = self.accepted.clone();
        let served = self.served.clone();
        let received = self.received.clone();
        let mode = self.mode;
        let running = Running::spawn(listener, format!("tcp-{}", self.name), move |stream, _| {
            accepted.fetch_add(1, Ordering::SeqCst);
            let received = received.clone();
            let served = served.clone();
            async move {
                let _ = match mode {
                    TcpMode::Echo => echo(stream, &served).await,
                    TcpMode::RecordThenAck => record_then_ack(stream, &received).await,
                };
            }
        })?;
        self.running = Some(running);
        Ok(())
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that carried at least one byte (unlike health checks, which only connect).
    /// Counted when the first byte arrives, before it is echoed.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// For [`TcpMode::RecordThenAck`]: the bytes of each finished connection, in order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Closes the listener and every connection; connects are then refused.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }

    /// Serves again on the same address after [`stop`](TcpServer::stop).
    pub fn restart(&mut self) -> Result<()> {
        if self.running.is_some() {
            bail!("{} is already running", self.name);
        }
        let listener = bind(self.addr)?;
        self.serve(listener)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn echo(stream: TcpStream, served: &AtomicU64) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        let n = match tokio::time::timeout(SERVER_IDLE, rd.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            wr.shutdown().await?;
            return Ok(());
        }
        if std::mem::take(&mut first) {
            served.fetch_add(1, Ordering::SeqCst);
        }
        wr.write_all(&buf[..n]).await?;
    }
}

async fn record_then_ack(mut stream: TcpStream, received: &Mutex<Vec<Vec<u8>>>) -> std::io::Result<()> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match tokio::time::timeout(SERVER_IDLE, stream.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let len = got.len();
    if let Ok(mut r) = received.lock() {
        r.push(got);
    }
    stream.write_all(format!("ACK {len}\n").as_bytes()).await?;
    stream.shutdown().await
}

/// A running FNV-1a (64-bit) digest and length of a byte stream: how a large body is compared
/// without keeping it. Stable across runs and processes, unlike `std`'s hashers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// Bytes seen.
    pub len: u64,
    /// FNV-1a of those bytes.
    pub hash: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest { len: 0, hash: 0xcbf2_9ce4_8422_2325 }
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, fnv1a {:016x}", self.len, self.hash)
    }
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut d = Digest::default();
        d.update(bytes);
        d
    }

    /// Adds `bytes` to the stream.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }
}

/// Body bytes a [`RawBody`] keeps; beyond that only its length and [`Digest`] are recorded.
pub const BODY_KEPT: usize = 1 << 20;

/// Bytes [`RawHttpBackend::bytes`] keeps (all connections together); later bytes are only
/// parsed, so a 10 MiB upload is not held twice.
const BYTES_KEPT: usize = 4 << 20;

/// How a message body was framed on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body at all: no `Content-Length`, no `Transfer-Encoding` (or a status/method that
    /// has none).
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`, with the size of every data chunk in order (the last,
    /// zero-sized chunk not listed).
    Chunked(Vec<u64>),
    /// Delimited by the connection's close (responses only).
    UntilClose,
}

/// A message body as it came off the wire: framing, the de-chunked bytes (the first
/// [`BODY_KEPT`] of them), a digest of all of them, and the trailer fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawBody {
    /// How it was framed.
    pub framing: Framing,
    /// Length and digest of the whole de-chunked body.
    pub digest: Digest,
    /// The first [`BODY_KEPT`] bytes of it.
    pub kept: Vec<u8>,
    /// Trailer fields (chunked only), names as received, in order.
    pub trailers: Vec<(String, String)>,
}

impl RawBody {
    fn new(framing: Framing) -> RawBody {
        RawBody { framing, digest: Digest::default(), kept: Vec::new(), trailers: Vec::new() }
    }

    fn take(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
        let room = BODY_KEPT.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..room.min(bytes.len())]);
    }
}

/// Which body a message has, decided from its head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// None.
    None,
    /// This many bytes.
    Length(u64),
    /// Chunked, with optional trailers.
    Chunked,
    /// Everything until the close.
    UntilClose,
}

/// `(request or status line, header lines)` of a head (without its final blank line); names
/// and values as received, values trimmed.
pub fn parse_head_lines(head: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.trim_end_matches("\r\n").split("\r\n");
    let line = lines.next().unwrap_or_default().to_owned();
    (line, lines.map(parse_field).collect())
}

/// `name: value` as `(name, trimmed value)`; a line without a colon is all name.
fn parse_field(line: &str) -> (String, String) {
    match line.split_once(':') {
        Some((k, v)) => (k.to_owned(), v.trim().to_owned()),
        None => (line.to_owned(), String::new()),
    }
}

fn has_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"))
}

fn content_length(headers: &[(String, String)]) -> Result<Option<u64>> {
    match headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        Some((_, v)) => Ok(Some(v.parse().map_err(|_| anyhow!("bad Content-Length {v:?}"))?)),
        None => Ok(None),
    }
}

/// The body a request with these headers carries (RFC 9112 §6.3, as a strict server frames it).
pub fn request_body_kind(headers: &[(String, String)]) -> Result<BodyKind> {
    if has_chunked(headers) {
        return Ok(BodyKind::Chunked);
    }
    Ok(content_length(headers)?.map_or(BodyKind::None, BodyKind::Length))
}

/// The body a response with this status and headers carries; `to_head` for a response to
/// `HEAD`.
pub fn response_body_kind(status: u16, to_head: bool, headers: &[(String, String)]) -> Result<BodyKind> {
    if to_head || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(BodyKind::None);
    }
    if has_chunked(headers) {
        return Ok(BodyKind::Chunked);
    }
    Ok(content_length(headers)?.map_or(BodyKind::UntilClose, BodyKind::Length))
}

/// Sees every byte a [`Wire`] reads (the server's byte log).
type Tap<'a> = &'a (dyn Fn(&[u8]) + Sync);

/// A byte source for the message parser: a stream, the bytes read ahead of the parser, how
/// long one read may wait, and an optional tap that sees every byte read.
struct Wire<'a> {
    stream: &'a mut TcpStream,
    buf: &'a mut Vec<u8>,
    wait: Duration,
    tap: Option<Tap<'a>>,
}

impl Wire<'_> {
    /// Reads more bytes; false at EOF or after `wait` without any.
    async fn fill(&mut self) -> Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = match tokio::time::timeout(self.wait, self.stream.read(&mut chunk)).await {
            Ok(r) => r?,
            Err(_) => return Ok(false),
        };
        if n == 0 {
            return Ok(false);
        }
        if let Some(tap) = self.tap {
            tap(&chunk[..n]);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(true)
    }

    /// The bytes up to and including the next `\r\n`; `what` names it in errors.
    async fn line(&mut self, what: &str) -> Result<Vec<u8>> {
        loop {
            if let Some(p) = find(self.buf, b"\r\n") {
                return Ok(self.buf.drain(..p + 2).collect());
            }
            if self.buf.len() > MAX_BUFFER {
                bail!("{what} longer than {MAX_BUFFER} bytes");
            }
            if !self.fill().await? {
                bail!("connection ended inside {what}: {:?}", String::from_utf8_lossy(self.buf));
            }
        }
    }

    /// The next head, up to and including its blank line; `None` if the peer closed (or went
    /// quiet for `wait`) before sending a byte of it.
    async fn head(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(p) = find(self.buf, b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..p + 4).collect()));
            }
            if self.buf.len() > MAX_BUFFER {
                bail!("head longer than {MAX_BUFFER} bytes");
            }
            if !self.fill().await? {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                bail!("connection ended inside a head: {:?}", String::from_utf8_lossy(self.buf));
            }
        }
    }

    /// Reads a body of `kind`, streaming: only [`BODY_KEPT`] bytes of it are kept.
    async fn body(&mut self, kind: BodyKind) -> Result<RawBody> {
        match kind {
            BodyKind::None => Ok(RawBody::new(Framing::None)),
            BodyKind::Length(len) => {
                let mut body = RawBody::new(Framing::Length(len));
                let mut left = len;
                while left > 0 {
                    if self.buf.is_empty() && !self.fill().await? {
                        bail!("connection ended {left} bytes short of a {len}-byte body");
                    }
                    let n = (left as usize).min(self.buf.len());
                    body.take(&self.buf[..n]);
                    self.buf.drain(..n);
                    left -= n as u64;
                }
                Ok(body)
            }
            BodyKind::UntilClose => {
                let mut body = RawBody::new(Framing::UntilClose);
                loop {
                    body.take(self.buf);
                    self.buf.clear();
                    if !self.fill().await? {
                        return Ok(body);
                    }
                }
            }
            BodyKind::Chunked => {
                let mut sizes = Vec::new();
                let mut body = RawBody::new(Framing::Chunked(Vec::new()));
                loop {
                    let line = self.line("a chunk-size line").await?;
                    let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
                    let size = u64::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| anyhow!("bad chunk size {text:?}"))?;
                    if size == 0 {
                        loop {
                            let line = self.line("the trailer section").await?;
                            if line.len() == 2 {
                                break;
                            }
                            body.trailers.push(parse_field(&String::from_utf8_lossy(&line[..line.len() - 2])));
                        }
                        body.framing = Framing::Chunked(sizes);
                        return Ok(body);
                    }
                    sizes.push(size);
                    let mut left = size;
                    while left > 0 {
                        if self.buf.is_empty() && !self.fill().await? {
                            bail!("connection ended inside a chunk");
                        }
                        let n = (left as usize).min(self.buf.len());
                        body.take(&self.buf[..n]);
                        self.buf.drain(..n);
                        left -= n as u64;
                    }
                    if self.line("the CRLF after chunk data").await?.len() != 2 {
                        bail!("chunk data not followed by CRLF");
                    }
                }
            }
        }
    }
}

/// One request as a [`RawHttpBackend`] received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The request line, e.g. `GET /x HTTP/1.1`.
    pub line: String,
    /// The head exactly as received, request line to blank line.
    pub head: Vec<u8>,
    /// Header lines as received, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked (its first [`BODY_KEPT`] bytes).
    pub body: Vec<u8>,
    /// The body's framing, digest and trailers.
    pub raw_body: RawBody,
}

impl RecordedRequest {
    /// The method (first word of the request line).
    pub fn method(&self) -> &str {
        self.line.split(' ').next().unwrap_or_default()
    }

    /// The request target (second word of the request line).
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or_default()
    }

    /// The path of the target, without its query.
    pub fn path(&self) -> &str {
        let t = self.target();
        t.split('?').next().unwrap_or(t)
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// What a [`RawHttpBackend`] does after writing an [`Answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Then {
    /// Reads the next request on the connection (unless the request said `Connection: close`).
    KeepAlive,
    /// Closes the connection.
    Close,
    /// The answer was a `101`: the connection is a WebSocket now, and every text or binary
    /// message is echoed until the client closes.
    WebSocketEcho,
}

/// The bytes a [`RawHttpBackend`] writes for one request, and what it does next.
#[derive(Clone, Debug)]
pub struct Answer {
    /// Written as they are: interim responses, the head, the body.
    pub bytes: Vec<u8>,
    /// What happens after.
    pub then: Then,
}

impl Answer {
    /// `bytes`, then the next request.
    pub fn keep(bytes: impl Into<Vec<u8>>) -> Answer {
        Answer { bytes: bytes.into(), then: Then::KeepAlive }
    }

    /// `bytes`, then a close.
    pub fn close(bytes: impl Into<Vec<u8>>) -> Answer {
        Answer { bytes: bytes.into(), then: Then::Close }
    }
}

/// How a scripted [`RawHttpBackend`] answers a request.
pub type Script = Arc<dyn Fn(&RecordedRequest) -> Answer + Send + Sync>;

#[derive(Debug, Default)]
struct RawLog {
    requests: Vec<RecordedRequest>,
    bytes: Vec<u8>,
    accepted: u64,
    errors: Vec<String>,
}

/// A hand-written HTTP/1.1 backend that records everything; see the [module docs](self).
pub struct RawHttpBackend {
    addr: SocketAddr,
    log: Arc<Mutex<RawLog>>,
    running: Option<Running>,
}

impl std::fmt::Debug for RawHttpBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawHttpBackend").field("addr", &self.addr).finish()
    }
}

impl RawHttpBackend {
    /// Starts one on a free 127.0.0.1 port that answers every request `200 ok`.
    pub fn start() -> Result<RawHttpBackend> {
        RawHttpBackend::scripted(Arc::new(|_: &RecordedRequest| {
            Answer::keep(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: raw\r\n\r\nok"[..])
        }))
    }

    /// Starts one on a free 127.0.0.1 port that answers each request with what `script`
    /// returns for it (after recording it). A request with `Expect: 100-continue` and a body
    /// is first answered `100 Continue`, as a server that wants the body does.
    pub fn scripted(script: Script) -> Result<RawHttpBackend> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(RawLog::default()));
        let l = log.clone();
        let running = Running::spawn(listener, "raw-http".into(), move |stream, _| {
            let log = l.clone();
            let script = script.clone();
            async move {
                if let Ok(mut g) = log.lock() {
                    g.accepted += 1;
                }
                if let Err(e) = serve_raw_http(stream, &log, &script).await {
                    if let Ok(mut g) = log.lock() {
                        g.errors.push(format!("{e:#}"));
                    }
                }
            }
        })?;
        Ok(RawHttpBackend { addr, log, running: Some(running) })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request parsed so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.log.lock().map(|g| g.requests.clone()).unwrap_or_default()
    }

    /// Every byte received so far, all connections concatenated in arrival order (the first
    /// 4 MiB of them).
    pub fn bytes(&self) -> Vec<u8> {
        self.log.lock().map(|g| g.bytes.clone()).unwrap_or_default()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.log.lock().map(|g| g.accepted).unwrap_or_default()
    }

    /// Framing errors the backend hit (a request it could not parse).
    pub fn errors(&self) -> Vec<String> {
        self.log.lock().map(|g| g.errors.clone()).unwrap_or_default()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        if let Ok(mut g) = self.log.lock() {
            g.requests.clear();
            g.bytes.clear();
            g.errors.clear();
        }
    }
}

impl Drop for RawHttpBackend {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn serve_raw_http(mut stream: TcpStream, log: &Mutex<RawLog>, script: &Script) -> Result<()> {
    let tap = |bytes: &[u8]| {
        if let Ok(mut g) = log.lock() {
            let room = BYTES_KEPT.saturating_sub(g.bytes.len());
            g.bytes.extend_from_slice(&bytes[..room.min(bytes.len())]);
        }
    };
    let mut buf = Vec::new();
    loop {
        let mut wire = Wire { stream: &mut stream, buf: &mut buf, wait: SERVER_IDLE, tap: Some(&tap) };
        let Some(head) = wire.head().await? else { return Ok(()) };
        let (line, headers) = parse_head_lines(&head);
        let kind = request_body_kind(&headers)?;
        let expects =
            headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue"));
        if expects && kind != BodyKind::None && kind != BodyKind::Length(0) {
            wire.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let raw_body = wire.body(kind).await?;
        let req = RecordedRequest { line, head, headers, body: raw_body.kept.clone(), raw_body };
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let answer = script(&req);
        if let Ok(mut g) = log.lock() {
            g.requests.push(req);
        }
        stream.write_all(&answer.bytes).await?;
        match answer.then {
            Then::Close => return Ok(()),
            Then::KeepAlive if close => return Ok(()),
            Then::KeepAlive => {}
            Then::WebSocketEcho => {
                if !buf.is_empty() {
                    bail!("{} bytes arrived after an upgrade request before its 101", buf.len());
                }
                let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
                return Ok(());
            }
        }
    }
}

/// A raw client connection: write bytes, read responses, each read bounded by a deadline.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// A response as [`RawConn::read_message`] read it off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// The interim (1xx, not 101) responses before the final one: status and header lines.
    pub interim: Vec<(u16, Vec<(String, String)>)>,
    /// The final status (101 included: the connection has switched protocols after it).
    pub status: u16,
    /// The final head exactly as received, status line to blank line.
    pub head: Vec<u8>,
    /// The final head's header lines as received, in order.
    pub headers: Vec<(String, String)>,
    /// The body: framing, digest, kept bytes, trailers.
    pub body: RawBody,
}

/// What a read on a [`RawConn`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A complete response.
    Response(RawResponse),
    /// The peer closed (or reset) the connection; any partial bytes are given.
    Closed(Vec<u8>),
}

impl RawConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<RawConn> {
        let stream = tokio::time::timeout(crate::wait::REQUEST, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr}: timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        let _ = stream.set_nodelay(true);
        Ok(RawConn { stream, buf: Vec::new() })
    }

    /// Connects to `addr` from the local address `from` (any 127/8 address works on loopback).
    pub async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> Result<RawConn> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((from, 0))).with_context(|| format!("binding {from}:0"))?;
        let stream = tokio::time::timeout(crate::wait::REQUEST, socket.connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} from {from}: timed out"))?
            .with_context(|| format!("connecting to {addr} from {from}"))?;
        let _ = stream.set_nodelay(true);
        Ok(RawConn { stream, buf: Vec::new() })
    }

    /// Writes `bytes`; an error means the peer has closed.
    pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Half-closes the write side.
    pub async fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }

    /// Reads one whole response, its interim (1xx) responses first, streaming its body (see
    /// [`RawBody`]); `to_head` when it answers a `HEAD` (no body, whatever the head says).
    /// Fails on a close before the response is complete, on bad framing, or after `deadline`.
    pub async fn read_message(&mut self, to_head: bool, deadline: Duration) -> Result<RawMessage> {
        let read = async {
            let mut wire = Wire { stream: &mut self.stream, buf: &mut self.buf, wait: deadline, tap: None };
            let mut interim = Vec::new();
            loop {
                let head = wire.head().await?.ok_or_else(|| anyhow!("closed before a response head"))?;
                let (line, headers) = parse_head_lines(&head);
                let status: u16 = line
                    .strip_prefix("HTTP/1.")
                    .and_then(|l| l.split(' ').nth(1))
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
                if (100..200).contains(&status) && status != 101 {
                    interim.push((status, headers));
                    continue;
                }
                let body = wire.body(response_body_kind(status, to_head, &headers)?).await?;
                return Ok(RawMessage { interim, status, head, headers, body });
            }
        };
        let outcome = tokio::time::timeout(deadline, read).await;
        match outcome {
            Ok(r) => r,
            Err(_) => {
                bail!("no complete response within {deadline:?}; buffered: {:?}", String::from_utf8_lossy(&self.buf))
            }
        }
    }

    /// The stream and the bytes read from it but not yet consumed (after a `101`, the start of
    /// the new protocol).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Reads until one complete response is buffered (framed by Content-Length, chunked, or
    /// the close) or the peer closes; fails if neither happens within `deadline`.
    pub async fn read_response(&mut self, deadline: Duration) -> Result<ReadOutcome> {
        let start = Instant::now();
        loop {
            if let Some((resp, used)) = complete_response(&self.buf) {
                self.buf.drain(..used);
                return Ok(ReadOutcome::Response(resp));
            }
            let left = deadline.saturating_sub(start.elapsed());
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => bail!(
                    "no complete response and no close within {deadline:?}; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    // A response framed by the close is complete now.
                    let rs = parse_responses(&self.buf);
                    if let Some(r) = rs.into_iter().next() {
                        self.buf.clear();
                        return Ok(ReadOutcome::Response(r));
                    }
                    return Ok(ReadOutcome::Closed(std::mem::take(&mut self.buf)));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until one response *head* is buffered (for a HEAD request, whose response has no
    /// body whatever its Content-Length says) or the peer closes; fails after `deadline`. The
    /// returned response has an empty body.
    pub async fn read_head(&mut self, deadline: Duration) -> Result<ReadOutcome> {
        let start = Instant::now();
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                let r = parse_head(&head)
                    .ok_or_else(|| anyhow!("unparsable response head {:?}", String::from_utf8_lossy(&head)))?;
                return Ok(ReadOutcome::Response(r));
            }
            let left = deadline.saturating_sub(start.elapsed());
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => bail!(
                    "no response head and no close within {deadline:?}; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(ReadOutcome::Closed(std::mem::take(&mut self.buf))),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Waits up to `deadline` for the peer to close; returns whatever arrived meanwhile, or
    /// fails if the connection is still open at the deadline.
    pub async fn expect_close(&mut self, deadline: Duration) -> Result<Vec<u8>> {
        let start = Instant::now();
        loop {
            let left = deadline.saturating_sub(start.elapsed());
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => bail!(
                    "the connection was still open after {deadline:?}; received: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(std::mem::take(&mut self.buf)),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whether the peer has closed: true if a read returns EOF/reset within `within`, false if
    /// nothing arrived; bytes that do arrive are kept for the next read.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(within, self.stream.read(&mut chunk)).await {
            Err(_) => false,
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                false
            }
        }
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

/// A response at the start of `buf` whose framing says it is complete, and the bytes it used.
fn complete_response(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1)?.trim().parse().ok()?;
    let body_start = end + 4;
    let header = |name: &str| {
        head.split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_owned())
    };
    let used = if (100..200).contains(&status) || status == 204 || status == 304 {
        body_start
    } else if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        // The terminating chunk must be there; then reuse the transcript parser.
        let mut pos = body_start;
        loop {
            let eol = pos + find(&buf[pos..], b"\r\n")?;
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&buf[pos..eol]).split(';').next()?.trim(), 16).ok()?;
            pos = eol + 2;
            if size == 0 {
                let t = pos + find(&buf[pos..], b"\r\n")?;
                if t == pos {
                    break pos + 2;
                }
                break pos + find(&buf[pos..], b"\r\n\r\n")? + 4;
            }
            if buf.len() < pos + size + 2 {
                return None;
            }
            pos += size + 2;
        }
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if buf.len() < body_start + len {
            return None;
        }
        body_start + len
    } else {
        // Framed by the close: not complete until then.
        return None;
    };
    let resp = parse_responses(&buf[..used]).into_iter().next()?;
    Some((resp, used))
}

/// A response head alone (status line and headers, up to the blank line), with an empty body.
fn parse_head(head: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.")?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(RawResponse { status, headers, body: Vec::new() })
}

/// The first value of header `name` in a raw response.
pub fn header<'a>(resp: &'a RawResponse, name: &str) -> Option<&'a str> {
    resp.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_responses_are_framed() {
        let t = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 408 x\r\ncontent-length: 0\r\n\r\n";
        let (r, used) = complete_response(t).expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
        let (r2, _) = complete_response(&t[used..]).expect("second");
        assert_eq!(r2.status, 408);
        assert!(complete_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok").is_none());
        let h = parse_head(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://x/\r\nContent-Length: 9\r\n\r\n")
            .expect("head");
        assert_eq!((h.status, header(&h, "location")), (308, Some("https://x/")));
        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let (r, used) = complete_response(c).expect("chunked");
        assert_eq!((r.body.as_slice(), used), (&b"ok"[..], c.len()));
    }

    #[test]
    fn digests_are_fnv1a_and_streaming() {
        // FNV-1a 64 test vectors.
        assert_eq!(Digest::default().hash, 0xcbf2_9ce4_8422_2325);
        assert_eq!(Digest::of(b"a").hash, 0xaf63_dc4c_8601_ec8c);
        let mut d = Digest::default();
        d.update(b"foo");
        d.update(b"bar");
        assert_eq!(d, Digest::of(b"foobar"));
        assert_eq!(d.len, 6);
    }

    #[test]
    fn body_kinds_follow_rfc_9112() {
        let h =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();
        let cl = h(&[("Content-Length", "5")]);
        let te = h(&[("Transfer-Encoding", "chunked"), ("Content-Length", "5")]);
        assert_eq!(request_body_kind(&cl).expect("cl"), BodyKind::Length(5));
        assert_eq!(request_body_kind(&te).expect("te"), BodyKind::Chunked);
        assert_eq!(request_body_kind(&[]).expect("none"), BodyKind::None);
        assert!(request_body_kind(&h(&[("content-length", "x")])).is_err());
        assert_eq!(response_body_kind(200, true, &cl).expect("head"), BodyKind::None);
        assert_eq!(response_body_kind(304, false, &cl).expect("304"), BodyKind::None);
        assert_eq!(response_body_kind(200, false, &[]).expect("close"), BodyKind::UntilClose);
        let (line, fields) = parse_head_lines(b"HTTP/1.1 200 OK\r\nA: 1\r\nb:2 \r\n\r\n");
        assert_eq!(line, "HTTP/1.1 200 OK");
        assert_eq!(fields, h(&[("A", "1"), ("b", "2")]));
    }

    #[tokio::test]
    async fn messages_are_read_with_interim_heads_chunks_and_trailers() -> Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            s.write_all(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
                  HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
            )
            .await?;
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close").await?;
            std::io::Result::Ok(())
        });
        let mut c = RawConn::connect(addr).await?;
        let m = c.read_message(false, Duration::from_secs(5)).await?;
        assert_eq!((m.interim.len(), m.interim[0].0, m.status), (1, 103, 200));
        assert_eq!(m.body.framing, Framing::Chunked(vec![3, 2]));
        assert_eq!((m.body.kept.as_slice(), m.body.digest), (&b"abcde"[..], Digest::of(b"abcde")));
        assert_eq!(m.body.trailers, vec![("X-T".to_owned(), "1".to_owned())]);
        // A HEAD answer has no body whatever its length says.
        let m = c.read_message(true, Duration::from_secs(5)).await?;
        assert_eq!((m.status, m.body.framing), (200, Framing::None));
        let m = c.read_message(false, Duration::from_secs(5)).await?;
        assert_eq!((m.body.framing, m.body.kept), (Framing::UntilClose, b"until close".to_vec()));
        server.await??;
        Ok(())
    }
}
