//! The client connection's byte stream, guarded: strict HTTP/1 framing and connection deadlines.
//!
//! Every client connection's I/O passes through [`GuardedIo`] before anything parses it. It
//! does two things a parser cannot do from inside itself:
//!
//! - feeds each byte of an HTTP/1 connection to the [`H1Scanner`]; a message the scanner
//!   refuses is answered with the refusal's status (400, or 414 / 501 / 505) and a body naming
//!   its reason, and the connection is closed, so keel's HTTP/1 server — and the server behind
//!   it — never see an ambiguous request. Refusals are logged through one throttle (a client can
//!   send them as fast as it likes): the first, then at most one line per 10 s with a count;
//! - enforces the deadlines of a connection between requests: a started request head must be
//!   complete within `header_timeout` (slowloris; answered with `408`), a connection that never
//!   sends a request is closed after `header_timeout`, and a keep-alive connection with nothing
//!   in flight is closed after `idle_timeout`. Tracking "is a request in flight" here keeps the
//!   two timeouts apart, as HAProxy's `timeout http-request` and `timeout http-keep-alive` are.
//!
//! What is in flight is known from [`ConnActivity`], which the request path updates per request
//! (a [`RequestGuard`] lives until the response has been sent).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use keel_cluster::throttle::{LogThrottle, EVERY};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::h1::scan::{H1Scanner, Refusal};
use crate::metrics::ListenerTraffic;
use crate::pool::{epoch, now_millis};

const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 37\r\nconnection: close\r\n\r\nrequest head not received in time\r\n\r\n";

/// The answer to a refused message: its status, and a body that names the scanner's reason (a
/// fixed string: nothing the client sent is echoed).
fn refusal_response(refusal: Refusal) -> Bytes {
    let status = refusal.status;
    let body = if status == http::StatusCode::BAD_REQUEST {
        format!("bad request: {}\n", refusal.reason)
    } else {
        format!("{}\n", refusal.reason)
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Refused"),
        body.len()
    );
    Bytes::from(head + &body)
}

/// What the request path tells the I/O layer about one connection's requests. Shared because
/// an HTTP/2 connection's streams run in tasks of their own.
#[derive(Debug, Default)]
pub struct ConnActivity {
    in_flight: AtomicUsize,
    requests: AtomicU32,
    idle_since_ms: AtomicU64,
    reader: AtomicWaker,
}

impl ConnActivity {
    /// A fresh connection.
    pub fn new() -> Arc<Self> {
        Arc::new(ConnActivity { idle_since_ms: AtomicU64::new(now_millis()), ..Default::default() })
    }

    /// A connection coming back from the parking lot ([`super::lot`]) after `requests`
    /// requests, idle since `idle_since_ms` (see [`crate::pool::now_millis`]): it was parked at a
    /// message boundary with every head served, which a fresh scanner also is.
    pub fn resumed(requests: u32, idle_since_ms: u64) -> Arc<Self> {
        Arc::new(ConnActivity {
            idle_since_ms: AtomicU64::new(idle_since_ms),
            requests: AtomicU32::new(requests),
            ..Default::default()
        })
    }

    /// When the last request finished (or the connection opened), as [`crate::pool::now_millis`].
    pub fn idle_since_ms(&self) -> u64 {
        self.idle_since_ms.load(Ordering::Acquire)
    }

    /// Marks a request as started; returns how many this connection has started, this one included.
    pub fn start_request(self: &Arc<Self>) -> (RequestGuard, u32) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        let n = self.requests.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        (RequestGuard(self.clone()), n)
    }

    /// How many requests this connection has started.
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Acquire)
    }
}

/// Keeps a request counted as in flight on its connection until dropped.
#[derive(Debug)]
pub struct RequestGuard(Arc<ConnActivity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.idle_since_ms.store(now_millis(), Ordering::Release);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The reader may be parked with no deadline (one is only armed while idle): wake it
            // so the idle timeout starts now.
            self.0.reader.wake();
        }
    }
}

/// Deadlines of a connection.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// Time to send a complete request head once it started, and to send a first request.
    pub header_timeout: Duration,
    /// Time an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
}

/// A client stream with strict HTTP/1 framing checks and connection deadlines.
pub struct GuardedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    scanner: Option<H1Scanner>,
    deadlines: Deadlines,
    opened: Instant,
    head_started: Option<Instant>,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The instant `timer` is set to. It may be earlier than the current deadline (see
    /// [`GuardedIo::poll_deadline`]), never later.
    armed: Instant,
    /// A response to write before closing, and how much of it is written.
    closing: Option<(Bytes, usize)>,
    closed: bool,
    bytes: ByteCount,
}

/// Bytes a connection moved, added to its listener's totals in batches of [`ByteCount::BATCH`]
/// and when the connection (or this wrapper, when it parks) goes: two atomic adds per batch
/// instead of two per read and write.
#[derive(Default)]
struct ByteCount {
    traffic: Option<Arc<ListenerTraffic>>,
    read: u64,
    written: u64,
}

impl ByteCount {
    const BATCH: u64 = 64 * 1024;

    fn add(&mut self, read: usize, written: usize) {
        if self.traffic.is_some() {
            self.read += read as u64;
            self.written += written as u64;
            if self.read + self.written >= Self::BATCH {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        if let Some(t) = &self.traffic {
            if self.read > 0 {
                t.bytes_in.fetch_add(std::mem::take(&mut self.read), Ordering::Relaxed);
            }
            if self.written > 0 {
                t.bytes_out.fetch_add(std::mem::take(&mut self.written), Ordering::Relaxed);
            }
        }
    }
}

impl Drop for ByteCount {
    fn drop(&mut self) {
        self.flush();
    }
}

impl<T> GuardedIo<T> {
    /// Wraps `inner`. `scan_h1` is false when the connection is known not to be HTTP/1
    /// (TLS with ALPN `h2`); `max_head` is the head size beyond which the scanner stops
    /// looking (keel's HTTP/1 server answers 431).
    pub fn new(inner: T, activity: Arc<ConnActivity>, deadlines: Deadlines, scan_h1: bool, max_head: usize) -> Self {
        let now = Instant::now();
        let first = now + deadlines.header_timeout;
        GuardedIo {
            inner,
            activity,
            scanner: scan_h1.then(|| H1Scanner::new(max_head)),
            deadlines,
            opened: now,
            head_started: None,
            timer: Box::pin(tokio::time::sleep_until(first.into())),
            armed: first,
            closing: None,
            closed: false,
            bytes: ByteCount::default(),
        }
    }

    /// Adds the bytes read and written to `traffic`'s totals.
    pub fn counting(mut self, traffic: Arc<ListenerTraffic>) -> Self {
        self.bytes.traffic = Some(traffic);
        self
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The connection's activity record, which the service updates per request.
    pub fn activity(&self) -> Arc<ConnActivity> {
        self.activity.clone()
    }

    /// When the connection must have made progress by, or `None` while a request is in flight.
    fn deadline(&self) -> Option<(Instant, &'static [u8])> {
        if let Some(t) = self.head_started {
            return Some((t + self.deadlines.header_timeout, REQUEST_TIMEOUT));
        }
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        if self.activity.requests.load(Ordering::Acquire) == 0 {
            return Some((self.opened + self.deadlines.header_timeout, b""));
        }
        // Derived from the stored stamp alone, so the same idle period always yields the same
        // instant: that is what lets `poll_deadline` tell a stale timer from a due one.
        let idle_since = Duration::from_millis(self.activity.idle_since_ms.load(Ordering::Acquire));
        Some((epoch() + idle_since + self.deadlines.idle_timeout, b""))
    }

    /// Enforces `deadline` with as few timer updates as possible. Each finished request moves
    /// the idle deadline later; moving a tokio timer on every read would cost a timer update
    /// per request, so the timer is only ever moved *earlier* (a partial head's deadline).
    /// When it fires for an instant that has since moved on, it is re-armed once for the
    /// current deadline: on a busy keep-alive connection that is one update per
    /// `header_timeout`, not one per request.
    fn poll_deadline(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        if self.armed > deadline {
            self.timer.as_mut().reset(deadline.into());
            self.armed = deadline;
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.armed == deadline {
            return Poll::Ready(());
        }
        self.timer.as_mut().reset(deadline.into());
        self.armed = deadline;
        self.timer.as_mut().poll(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> GuardedIo<T> {
    /// Writes the pending closing response, if any; returns Ready once done (or abandoned).
    fn poll_closing(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while let Some((bytes, written)) = &mut self.closing {
            if *written >= bytes.len() {
                let _ = Pin::new(&mut self.inner).poll_flush(cx);
                self.closing = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(n)) if n > 0 => *written += n,
                Poll::Ready(_) => self.closing = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        self.closed = true;
        Poll::Ready(())
    }

    fn close_with(&mut self, cx: &mut Context<'_>, response: Bytes) -> Poll<io::Result<()>> {
        self.scanner = None;
        self.closing = (!response.is_empty()).then_some((response, 0));
        match self.poll_closing(cx) {
            // End of stream: the reader closes the connection without answering again.
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl GuardedIo<TcpStream> {
    /// Waits, without reading, for the client to send something: `true` when the socket is
    /// readable, `false` when the connection should close (its deadline passed, or it is
    /// already closing). This is how a parked connection waits with no buffer at all.
    pub fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if self.closed || self.closing.is_some() {
            return Poll::Ready(false);
        }
        match self.inner.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(true),
            Poll::Ready(Err(_)) => Poll::Ready(false),
            Poll::Pending => {
                let Some((deadline, _)) = self.deadline() else { return Poll::Pending };
                match self.poll_deadline(cx, deadline) {
                    Poll::Ready(()) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    /// The stream itself, for the parking lot: everything else here is rebuilt from
    /// [`ConnActivity`] when the connection wakes.
    pub fn into_inner(self) -> TcpStream {
        self.inner
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closing.is_some() {
            return match this.poll_closing(cx) {
                Poll::Ready(()) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            };
        }
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        this.activity.reader.register(cx.waker());
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if fresh.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.bytes.add(fresh.len(), 0);
                if let Some(scanner) = &mut this.scanner {
                    let was_partial = scanner.in_partial_head();
                    match scanner.feed(fresh) {
                        Ok(_) => {
                            this.head_started = match (scanner.in_partial_head(), was_partial) {
                                (false, _) => None,
                                (true, true) => this.head_started.or(Some(Instant::now())),
                                (true, false) => Some(Instant::now()),
                            };
                        }
                        Err(refusal) => {
                            static REFUSED: LogThrottle = LogThrottle::new(EVERY);
                            keel_cluster::throttled!(REFUSED, info, target: "keel::proxy",
                                status = refusal.status.as_u16(), reason = refusal.reason, "refused a malformed request");
                            buf.set_filled(before);
                            this.head_started = None;
                            return this.close_with(cx, refusal_response(refusal));
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let Some((deadline, response)) = this.deadline() else { return Poll::Pending };
                match this.poll_deadline(cx, deadline) {
                    Poll::Ready(()) => this.close_with(cx, Bytes::from_static(response)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + 'static> AsyncWrite for GuardedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = super::sock::poll_write_any(&mut this.inner, cx, &[io::IoSlice::new(buf)]);
        if let Poll::Ready(Ok(n)) = written {
            this.bytes.add(0, n);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = super::sock::poll_write_any(&mut this.inner, cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.bytes.add(0, n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Paused time advances in whole timer ticks (1 ms).
    fn assert_near(got: Duration, want: Duration) {
        assert!(got >= want && got <= want + Duration::from_millis(5), "{got:?} vs {want:?}");
    }

    const DL: Deadlines = Deadlines { header_timeout: Duration::from_secs(10), idle_timeout: Duration::from_secs(60) };

    #[tokio::test]
    async fn valid_bytes_pass_through() {
        let (client, server) = tokio::io::duplex(1024);
        let mut io = GuardedIo::new(server, ConnActivity::new(), DL, true, 4096);
        let mut client = client;
        client.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[tokio::test]
    async fn an_ambiguous_request_gets_400_and_end_of_stream() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = GuardedIo::new(server, ConnActivity::new(), DL, true, 4096);
        client
            .write_all(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            )
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        assert_eq!(io.read(&mut buf).await.expect("read"), 0, "the reader must see nothing");
        drop(io);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read answer");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.ends_with("\r\n\r\nbad request: both Content-Length and Transfer-Encoding\n"), "{text}");
    }

    #[tokio::test]
    async fn a_refusal_answers_its_own_status_and_reason() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = GuardedIo::new(server, ConnActivity::new(), DL, true, 4096);
        client.write_all(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 1024];
        assert_eq!(io.read(&mut buf).await.expect("read"), 0);
        drop(io);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read answer");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 505 HTTP Version Not Supported\r\n"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{text}");
        assert!(body.contains("HTTP version not supported"), "{text}");
    }

    #[tokio::test(start_paused = true)]
    async fn slowloris_heads_get_408_after_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut io = GuardedIo::new(server, ConnActivity::new(), DL, true, 4096);
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        let started = tokio::time::Instant::now();
        assert_eq!(io.read(&mut buf).await.expect("read"), 0);
        assert_near(started.elapsed(), DL.header_timeout);
        drop(io);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read answer");
        assert!(answer.starts_with(b"HTTP/1.1 408 "), "{}", String::from_utf8_lossy(&answer));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keep_alive_uses_the_idle_timeout_not_the_header_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = ConnActivity::new();
        let mut io = GuardedIo::new(server, activity.clone(), DL, true, 4096);
        client.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0);
        let (guard, n) = activity.start_request();
        assert_eq!(n, 1);
        drop(guard);
        let started = tokio::time::Instant::now();
        assert_eq!(io.read(&mut buf).await.expect("read"), 0);
        assert_near(started.elapsed(), DL.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn no_deadline_while_a_request_is_in_flight() {
        let (_client, server) = tokio::io::duplex(1024);
        let activity = ConnActivity::new();
        let mut io = GuardedIo::new(server, activity.clone(), DL, true, 4096);
        let (_guard, _) = activity.start_request();
        let mut buf = [0u8; 8];
        let waited = tokio::time::timeout(Duration::from_secs(600), io.read(&mut buf)).await;
        assert!(waited.is_err(), "the connection must stay open while its request is in flight");
    }

    /// A connected loopback pair: (client, server side wrapped like the accept loop does).
    async fn tcp_pair(activity: Arc<ConnActivity>) -> (tokio::net::TcpStream, GuardedIo<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, GuardedIo::new(server, activity, DL, true, 4096))
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_wakes_when_the_client_sends() {
        let (mut client, mut io) = tcp_pair(ConnActivity::new()).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        assert!(std::future::poll_fn(|cx| io.poll_idle(cx)).await, "readable");
        let mut buf = [0u8; 64];
        assert!(io.read(&mut buf).await.expect("read") > 0, "nothing was consumed by the wait");
    }
}
