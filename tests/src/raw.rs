//! Raw TCP servers and clients, for what an HTTP library would hide: byte streams for keel's TCP
//! listeners, the exact bytes keel forwards to a backend, and client connections that send
//! request heads byte by byte.
//!
//! - [`TcpServer`]: a plain TCP server, either an echo ([`TcpMode::Echo`]) or a recorder that
//!   reads until the client half-closes, stores every byte, then answers `ACK <n>\n` and closes
//!   ([`TcpMode::RecordThenAck`]) — which shows both the PROXY protocol header keel prepends and
//!   that a half-close travels through.
//! - [`RawHttpBackend`]: an HTTP/1.1 backend written by hand that records every byte it receives
//!   and every request head it parses, and answers each request `200 ok`. It frames requests as
//!   a strict server would (Content-Length or chunked), so a request smuggled past keel would
//!   show up here as a second request head.
//! - [`RawConn`]: a client connection that writes bytes when told to and reads responses with
//!   deadlines, for keep-alive, slow-sending and pipelining tests.
//!
//! Like [`Backend`](crate::Backend), each server runs on its own thread and runtime and stops
//! (closing every connection) on drop.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::backend::{bind, Running};
use crate::client::{parse_responses, RawResponse};

/// How long a server connection waits for the next bytes before giving up on its client.
const SERVER_IDLE: Duration = Duration::from_secs(30);

/// The most a [`RawHttpBackend`] connection buffers before it gives up on a request.
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

/// One request head as a [`RawHttpBackend`] parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// The request line, e.g. `GET /x HTTP/1.1`.
    pub line: String,
    /// Header lines as received, in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The request target (second word of the request line).
    pub fn target(&self) -> &str {
        self.line.split(' ').nth(1).unwrap_or_default()
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

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
    /// Starts one on a free 127.0.0.1 port.
    pub fn start() -> Result<RawHttpBackend> {
        let listener = bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(RawLog::default()));
        let l = log.clone();
        let running = Running::spawn(listener, "raw-http".into(), move |stream, _| {
            let log = l.clone();
            async move {
                if let Ok(mut g) = log.lock() {
                    g.accepted += 1;
                }
                if let Err(e) = serve_raw_http(stream, &log).await {
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

    /// Every byte received so far, all connections concatenated in arrival order.
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

/// Reads more bytes into `buf`; false at EOF or after [`SERVER_IDLE`].
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, log: &Mutex<RawLog>) -> Result<bool> {
    if buf.len() > MAX_BUFFER {
        bail!("request larger than {MAX_BUFFER} bytes");
    }
    let mut chunk = [0u8; 16 * 1024];
    let n = match tokio::time::timeout(SERVER_IDLE, stream.read(&mut chunk)).await {
        Ok(r) => r?,
        Err(_) => return Ok(false),
    };
    if n == 0 {
        return Ok(false);
    }
    if let Ok(mut g) = log.lock() {
        g.bytes.extend_from_slice(&chunk[..n]);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(true)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn serve_raw_http(mut stream: TcpStream, log: &Mutex<RawLog>) -> Result<()> {
    let mut buf = Vec::new();
    loop {
        // The head.
        let end = loop {
            if let Some(p) = find(&buf, b"\r\n\r\n") {
                break p;
            }
            if !fill(&mut stream, &mut buf, log).await? {
                if buf.is_empty() {
                    return Ok(());
                }
                bail!("connection ended inside a request head: {:?}", String::from_utf8_lossy(&buf));
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let line = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|l| match l.split_once(':') {
                Some((k, v)) => (k.to_owned(), v.trim().to_owned()),
                None => (l.to_owned(), String::new()),
            })
            .collect();
        let mut req = RecordedRequest { line, headers, body: Vec::new() };
        let chunked = req
            .headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked"));
        let length = req.header("content-length").map(|v| v.parse::<usize>().map_err(|_| anyhow!("bad length {v:?}")));
        // The body.
        if chunked {
            loop {
                let eol = loop {
                    if let Some(p) = find(&buf, b"\r\n") {
                        break p;
                    }
                    if !fill(&mut stream, &mut buf, log).await? {
                        bail!("connection ended inside a chunk size line");
                    }
                };
                let size_text = String::from_utf8_lossy(&buf[..eol]).into_owned();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| anyhow!("bad chunk size {size_text:?}"))?;
                buf.drain(..eol + 2);
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        let eol = loop {
                            if let Some(p) = find(&buf, b"\r\n") {
                                break p;
                            }
                            if !fill(&mut stream, &mut buf, log).await? {
                                bail!("connection ended inside trailers");
                            }
                        };
                        buf.drain(..eol + 2);
                        if eol == 0 {
                            break;
                        }
                    }
                    break;
                }
                while buf.len() < size + 2 {
                    if !fill(&mut stream, &mut buf, log).await? {
                        bail!("connection ended inside a chunk");
                    }
                }
                if &buf[size..size + 2] != b"\r\n" {
                    bail!("chunk data not followed by CRLF");
                }
                req.body.extend_from_slice(&buf[..size]);
                buf.drain(..size + 2);
            }
        } else if let Some(len) = length {
            let len = len?;
            while buf.len() < len {
                if !fill(&mut stream, &mut buf, log).await? {
                    bail!("connection ended inside a body");
                }
            }
            req.body = buf.drain(..len).collect();
        }
        let close = req.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if let Ok(mut g) = log.lock() {
            g.requests.push(req);
        }
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: raw\r\n\r\nok").await?;
        if close {
            return Ok(());
        }
    }
}

/// A raw client connection: write bytes, read responses, each read bounded by a deadline.
#[derive(Debug)]
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
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
}
