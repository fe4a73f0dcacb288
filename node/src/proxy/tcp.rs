//! `tcp` listeners: layer-4 proxying, HAProxy's `mode tcp`. Each client connection is paired
//! with one connection to a server of the listener's default pool and bytes are spliced both
//! ways until both sides are done; keel never looks inside them.
//!
//! Per connection, in order:
//!
//! 1. **Admission**: a [`ConnectionPermit`](crate::connlimit::ConnectionPermit) from the
//!    listener's [`ConnectionLimiter`]; a refused client is closed at once (the limiter counts
//!    the refusal) and never reaches a server.
//! 2. **Server choice**: the default pool is looked up in the snapshot current at accept time
//!    (a reload applies to new connections, open ones keep their server), a server is selected
//!    exactly as for HTTP (`ip_hash` hashes the client address with [`client_hash`]), and
//!    connected to within the pool's `connect_timeout`. A refused or timed-out connect counts
//!    `connect_errors`, feeds outlier detection and moves on to another server, up to `retries`
//!    more times — nothing of the client's has been read yet, so a retry is invisible to it.
//!    With no server left the client is closed.
//! 3. **PROXY header**: when the pool has `proxy_protocol`, the header
//!    ([`proxy_protocol::encode`]) is written before any client byte, as part of the connect
//!    attempt (a server that resets at once is retried like a refused connect).
//! 4. **Splice**: `copy_bidirectional_with_sizes` with [`SPLICE_BUFFER`]-byte buffers, which
//!    half-closes correctly: when one side shuts its write half, the other side's write half is
//!    shut and the opposite direction keeps flowing until it ends too. The connection counts
//!    once in the server's `requests` and stays in its `active` count for its whole life, so
//!    `least_connections` and `least_request_p2c` balance TCP connections as they do requests.
//! 5. **Idle timeout**: the listener's `limits.idle_timeout` (HAProxy's `timeout client` /
//!    `timeout server` for a tunnel): a connection on which no byte moved either way for that
//!    long is closed, both sides at once. A half-closed connection still waiting for the other
//!    direction is subject to it too.
//!
//! Shutdown: when `stop` turns true the accept loop returns and drops the socket, so new clients
//! are refused by the kernel; open connections keep running. Every connection is registered
//! with a [`ConnTracker`], which the daemon uses to wait for them ([`ConnTracker::drain`]) and
//! to close the ones still open at its deadline.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use keel_cluster::model::{Algorithm, MAX_RETRIES};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use super::access_log::{AccessLog, Entry, Pending};
use super::phases::{client_hash, InFlight};
use super::proxy_protocol;
use crate::connlimit::ConnectionLimiter;
use crate::metrics::{ListenerTraffic, Rejections};
use crate::pool::{now_millis, Pool};
use crate::snapshot::SharedSnapshot;

/// Size of each of a spliced connection's two copy buffers. 64 KiB moves bulk transfers in few
/// system calls; the cost is 128 KiB per open connection (about 1.3 GB at the default cap of
/// 10 000 connections), which `limits.max_connections` bounds.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// How long [`ConnTracker::drain`] waits for aborted connections to let go after the deadline.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// Accepts clients on `listener` until `stop` turns true (or its sender is dropped), proxying
/// each to a server of the default pool of the listener named `name` in `snapshot`.
///
/// `limiter` enforces the listener's connection caps (the daemon keeps a clone to apply new
/// limits on reload); `rejections.no_server` counts clients closed because no server could be
/// connected, `rejections.no_route` those whose listener or default pool is missing from the
/// snapshot. Every accepted connection is registered with `conns`. Returns the listening socket
/// when stopped, so a restarted listener on the same address keeps it.
pub async fn serve_tcp(
    listener: TcpListener,
    front: TcpFront,
    snapshot: SharedSnapshot,
    limiter: ConnectionLimiter,
    rejections: Arc<Rejections>,
    mut stop: watch::Receiver<bool>,
    conns: ConnTracker,
) -> TcpListener {
    let TcpFront { name, access_log, traffic } = front;
    let name: Arc<str> = name.into();
    while let Some((client, peer, permit)) = super::accept(&listener, &name, &limiter, &mut stop).await {
        let guard = conns.track();
        let conn = Connection {
            listener: name.clone(),
            snapshot: snapshot.clone(),
            rejections: rejections.clone(),
            access_log: access_log.clone(),
            traffic: traffic.clone(),
        };
        tokio::spawn(async move {
            let _permit = permit;
            guard.run(conn.serve(client, peer)).await;
        });
    }
    tracing::debug!(target: "keel::proxy", listener = %name, "tcp listener stopped accepting");
    listener
}

/// A TCP listener as its accept loop knows it: its name and its access log.
pub struct TcpFront {
    /// Listener name.
    pub name: String,
    /// One line per session, when the listener has an access log.
    pub access_log: Option<Arc<AccessLog>>,
    /// Sessions and bytes, for the metrics.
    pub traffic: Arc<ListenerTraffic>,
}

/// What one connection's task needs from its listener.
struct Connection {
    listener: Arc<str>,
    snapshot: SharedSnapshot,
    rejections: Arc<Rejections>,
    access_log: Option<Arc<AccessLog>>,
    traffic: Arc<ListenerTraffic>,
}

impl Connection {
    async fn serve(self, client: TcpStream, peer: SocketAddr) {
        // Written when the session ends, whichever way; a drain that aborts this task drops it
        // with the cause it starts with.
        let accepted = Instant::now();
        let mut pending = self.access_log.as_ref().map(|log| {
            let mut entry = Entry::new(self.listener.clone(), peer, "TCP");
            entry.termination = Some("aborted");
            Pending::new(log.clone(), accepted, entry)
        });
        // One session in the listener's counters, whichever way it ends (a drain's abort too).
        let mut tally = Tally { traffic: self.traffic.clone(), bytes: (0, 0) };
        let (pool, idle_timeout) = {
            let snapshot = self.snapshot.load();
            let Some(listener) = snapshot.config.listeners.get(&*self.listener) else {
                end(&mut pending, Some("no_route"), None, None, (0, 0));
                self.rejections.no_route.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(target: "keel::proxy", listener = %self.listener, client = %peer,
                    "listener no longer configured; closing client");
                return;
            };
            let pool = listener.default_pool.as_deref().and_then(|p| snapshot.pools.get(p)).cloned();
            (pool, listener.limits.idle_timeout.get())
        };
        let Some(pool) = pool else {
            end(&mut pending, Some("no_route"), None, None, (0, 0));
            self.rejections.no_route.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "keel::proxy", listener = %self.listener, client = %peer,
                "listener has no default pool; closing client");
            return;
        };
        let local = match client.local_addr() {
            Ok(local) => local,
            Err(e) => {
                end(&mut pending, Some("client_gone"), Some(&pool), None, (0, 0));
                tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection unusable");
                return;
            }
        };
        let mut tried = Tried::default();
        let connected = connect(&pool, peer, local, &mut tried).await;
        if let Some(p) = pending.as_mut() {
            p.entry.retries = tried.attempts.saturating_sub(1);
            p.entry.wait = tried.last_start.map(|t| t.duration_since(accepted));
            p.entry.connect = tried.connect;
        }
        let Some((index, upstream)) = connected else {
            let (cause, server) = match tried.last_failure {
                Some((index, timed_out)) => (
                    if timed_out { "server_connect_timeout" } else { "server_refused" },
                    pool.servers.get(index).map(|s| s.name.as_str()),
                ),
                None => ("no_server", None),
            };
            end(&mut pending, Some(cause), Some(&pool), server, (0, 0));
            self.rejections.no_server.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "keel::proxy", listener = %self.listener, pool = %pool.name, client = %peer,
                "no server could be connected; closing client");
            return;
        };
        let Some(server) = pool.servers.get(index) else { return };
        // Until the splice reports, a drain's abort is what ends it.
        end(&mut pending, Some("aborted"), Some(&pool), Some(&server.name), (0, 0));
        let _ = client.set_nodelay(true);
        server.stats.requests.fetch_add(1, Ordering::Relaxed);
        let _active = InFlight::start(server);

        let activity = AtomicU64::new(now_millis());
        let mut client = Metered::new(client, &activity);
        let mut upstream = Metered::new(upstream, &activity);
        let spliced = tokio::select! {
            r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER) => r,
            () = idle_expired(&activity, idle_timeout) => {
                tally.bytes = (client.read, client.written);
                end(&mut pending, Some("idle_timeout"), Some(&pool), Some(&server.name), (client.read, client.written));
                tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, client = %peer,
                    idle_timeout = ?idle_timeout, "connection idle; closing");
                return;
            }
        };
        let moved = (client.read, client.written);
        tally.bytes = moved;
        match &spliced {
            Ok(_) => end(&mut pending, None, Some(&pool), Some(&server.name), moved),
            Err(_) if upstream.failed => {
                end(&mut pending, Some("server_broken"), Some(&pool), Some(&server.name), moved)
            }
            Err(_) => end(&mut pending, Some("client_gone"), Some(&pool), Some(&server.name), moved),
        }
        match spliced {
            Ok((sent, received)) => tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name,
                client = %peer, sent, received, "connection closed"),
            Err(e) if upstream.failed => {
                server.stats.broken.fetch_add(1, Ordering::Relaxed);
                pool.observe(index, false);
                tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, client = %peer,
                    error = %e, "server connection broke");
            }
            Err(e) => tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, client = %peer,
                error = %e, "client connection broke"),
        }
    }
}

/// Counts a session and its bytes in the listener's counters when dropped.
struct Tally {
    traffic: Arc<ListenerTraffic>,
    bytes: (u64, u64),
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic.bytes_in.fetch_add(self.bytes.0, Ordering::Relaxed);
        self.traffic.bytes_out.fetch_add(self.bytes.1, Ordering::Relaxed);
    }
}

/// Notes how a session ended (so far) in its line, if it has one.
fn end(
    pending: &mut Option<Pending>,
    cause: Option<&'static str>,
    pool: Option<&Pool>,
    server: Option<&str>,
    bytes: (u64, u64),
) {
    if let Some(p) = pending.as_mut() {
        p.entry.termination = cause;
        p.entry.pool = pool.map(|p| p.name.clone());
        p.entry.server = server.map(str::to_owned);
        (p.entry.bytes_in, p.entry.bytes_out) = bytes;
    }
}

/// What [`connect`]'s attempts did, for the session's access log line.
#[derive(Default)]
struct Tried {
    attempts: u32,
    /// When the last attempt started.
    last_start: Option<Instant>,
    /// How long the successful connect took.
    connect: Option<Duration>,
    /// The last failed server, and whether it timed out (rather than refused).
    last_failure: Option<(usize, bool)>,
}

/// Selects and connects a server for `peer`, retrying other servers after connect failures.
/// Returns the server's index and the connection, with the PROXY header already sent.
async fn connect(
    pool: &Pool,
    peer: SocketAddr,
    local: SocketAddr,
    tried_log: &mut Tried,
) -> Option<(usize, TcpStream)> {
    let hash = if pool.config.algorithm == Algorithm::IpHash { client_hash(peer) } else { 0 };
    let header = pool.config.proxy_protocol.map(|version| proxy_protocol::encode(version, peer, local));
    let attempts = pool.config.retries.min(MAX_RETRIES) as usize + 1;
    let mut tried = [usize::MAX; MAX_RETRIES as usize + 1];
    for attempt in 0..attempts {
        let index = pool.select(hash, &tried[..attempt])?;
        tried[attempt] = index;
        let server = pool.servers.get(index)?;
        let timeout = pool.config.connect_timeout.get();
        let start = Instant::now();
        tried_log.attempts += 1;
        tried_log.last_start = Some(start);
        let error = match tokio::time::timeout(timeout, open(server.address, header.as_deref())).await {
            Ok(Ok(stream)) => {
                tried_log.connect = Some(start.elapsed());
                pool.observe(index, true);
                return Some((index, stream));
            }
            Ok(Err(e)) => {
                tried_log.last_failure = Some((index, false));
                e
            }
            Err(_elapsed) => {
                tried_log.last_failure = Some((index, true));
                io::Error::new(io::ErrorKind::TimedOut, format!("no connection within {timeout:?}"))
            }
        };
        server.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
        pool.observe(index, false);
        tracing::debug!(target: "keel::proxy", pool = %pool.name, server = %server.name, client = %peer,
            error = %error, "connect failed");
    }
    None
}

/// Opens a connection to a server and sends the PROXY header, if any.
async fn open(address: SocketAddr, header: Option<&[u8]>) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    if let Some(header) = header {
        stream.write_all(header).await?;
    }
    Ok(stream)
}

/// Completes once nothing has been read or written for `idle` since the time in `activity`.
async fn idle_expired(activity: &AtomicU64, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX).max(1);
    loop {
        let quiet = now_millis().saturating_sub(activity.load(Ordering::Relaxed));
        if quiet >= idle_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
    }
}

/// Completes when `flag` is true, or when its sender is gone (nothing can then clear it).
async fn turned_true(flag: &mut watch::Receiver<bool>) {
    // The borrow `wait_for` returns is dropped here: it must not live across an await.
    let _ = flag.wait_for(|set| *set).await;
}

/// One side of a spliced connection: stamps `activity` whenever bytes move, and remembers
/// whether this side failed (to tell a broken server from a broken client).
struct Metered<'a, S> {
    io: S,
    activity: &'a AtomicU64,
    failed: bool,
    /// Bytes read from and written to this side, for the access log.
    read: u64,
    written: u64,
}

impl<'a, S> Metered<'a, S> {
    fn new(io: S, activity: &'a AtomicU64) -> Self {
        Metered { io, activity, failed: false, read: 0, written: 0 }
    }

    fn note<T>(&mut self, poll: &Poll<io::Result<T>>, moved: impl FnOnce(&T) -> bool) {
        match poll {
            Poll::Ready(Ok(v)) if moved(v) => self.activity.store(now_millis(), Ordering::Relaxed),
            Poll::Ready(Err(_)) => self.failed = true,
            _ => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        let moved = buf.filled().len() - before;
        self.read += moved as u64;
        self.note(&poll, |_| moved > 0);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written += *n as u64;
        }
        self.note(&poll, |n| *n > 0);
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            self.written += *n as u64;
        }
        self.note(&poll, |n| *n > 0);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.note(&poll, |_| false);
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(&poll, |_| false);
        poll
    }
}

struct TrackerInner {
    open: AtomicUsize,
    idle: Notify,
    abort: watch::Sender<bool>,
}

/// The open connections of one or more `tcp` listeners, for a graceful shutdown: how many
/// there are, a way to wait until there are none, and a way to close the rest.
///
/// Cloning is cheap and shares the count; give every listener a clone of one tracker, or one
/// each. Aborting is final: connections registered afterwards are closed at once.
#[derive(Clone)]
pub struct ConnTracker {
    inner: Arc<TrackerInner>,
}

impl Default for ConnTracker {
    fn default() -> Self {
        ConnTracker::new()
    }
}

impl std::fmt::Debug for ConnTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTracker").field("open", &self.open()).field("aborted", &*self.inner.abort.borrow()).finish()
    }
}

impl ConnTracker {
    /// A tracker with no connections.
    pub fn new() -> Self {
        ConnTracker {
            inner: Arc::new(TrackerInner {
                open: AtomicUsize::new(0),
                idle: Notify::new(),
                abort: watch::Sender::new(false),
            }),
        }
    }

    /// Connections open now (from accept until both sides are closed).
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Waits until no connection is open, for at most `timeout`. Returns whether none is.
    pub async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.idle.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a close in between is not missed.
            notified.as_mut().enable();
            if self.open() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.open() == 0;
            }
        }
    }

    /// Closes every open connection (both sides), now and from now on.
    pub fn abort_all(&self) {
        self.inner.abort.send_replace(true);
    }

    /// The daemon's shutdown step, after the accept loops have returned: waits up to `timeout`
    /// for open connections to finish, then closes the ones left. Returns how many were closed
    /// that way (0 when everything finished in time).
    pub async fn drain(&self, timeout: Duration) -> usize {
        if self.wait_idle(timeout).await {
            return 0;
        }
        let left = self.open();
        self.abort_all();
        if !self.wait_idle(ABORT_GRACE).await {
            tracing::warn!(target: "keel::proxy", open = self.open(), "tcp connections still open after abort");
        }
        left
    }

    fn track(&self) -> ConnGuard {
        self.inner.open.fetch_add(1, Ordering::AcqRel);
        ConnGuard { inner: self.inner.clone(), abort: self.inner.abort.subscribe() }
    }
}

/// One connection registered with a [`ConnTracker`]; dropping it unregisters it.
struct ConnGuard {
    inner: Arc<TrackerInner>,
    abort: watch::Receiver<bool>,
}

impl ConnGuard {
    /// Runs `conn` until it ends or the tracker aborts (which drops, and so closes, its sockets).
    async fn run(mut self, conn: impl Future<Output = ()>) {
        tokio::select! {
            () = conn => {}
            () = turned_true(&mut self.abort) => {
                tracing::debug!(target: "keel::proxy", "tcp connection closed at shutdown");
            }
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.inner.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Instant;

    use arc_swap::ArcSwap;
    use keel_cluster::Config;
    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::proxy::proxy_protocol::tests::{parse, Header};
    use crate::proxy::proxy_protocol::ProxyProtocol;
    use crate::snapshot::Snapshot;

    /// Longest any single step of a test may take before it fails.
    const WAIT: Duration = Duration::from_secs(20);

    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        match tokio::time::timeout(WAIT, fut).await {
            Ok(v) => v,
            Err(_) => panic!("{what}: not done within {WAIT:?}"),
        }
    }

    /// Polls `cond` until it holds, failing the test at the deadline.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not true within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A backend on a free port serving each connection with `handler`.
    async fn backend<F, Fut>(handler: F) -> SocketAddr
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handler(stream));
            }
        });
        addr
    }

    async fn echo(mut stream: TcpStream) {
        let (mut r, mut w) = stream.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    }

    async fn echo_backend() -> SocketAddr {
        backend(echo).await
    }

    /// An address nothing listens on: connecting is refused.
    async fn dead_address() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    struct Proxy {
        addr: SocketAddr,
        snapshot: SharedSnapshot,
        limiter: ConnectionLimiter,
        rejections: Arc<Rejections>,
        conns: ConnTracker,
        stop: watch::Sender<bool>,
        accept_loop: JoinHandle<TcpListener>,
    }

    impl Proxy {
        fn server(&self, name: &str) -> Arc<crate::pool::ServerState> {
            let snapshot = self.snapshot.load();
            let pool = &snapshot.pools["p"];
            pool.servers[pool.server_index(name).unwrap()].clone()
        }
    }

    /// A `tcp` listener "front" whose default pool "p" has `servers`; `pool` and `limits` are
    /// extra TOML lines for the pool and the listener's limits.
    async fn start(servers: &[(&str, SocketAddr)], pool: &str, limits: &str, limiter: ConnectionLimiter) -> Proxy {
        let mut toml = format!(
            "[listeners.front]\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ndefault_pool = \"p\"\n\
             [listeners.front.limits]\n{limits}\n[pools.p]\n{pool}\n"
        );
        for (name, address) in servers {
            toml.push_str(&format!("[[pools.p.servers]]\nname = \"{name}\"\naddress = \"{address}\"\n"));
        }
        let config: Config = toml::from_str(&toml).unwrap();
        config.validate().unwrap();
        let snapshot: SharedSnapshot =
            Arc::new(ArcSwap::from_pointee(Snapshot::build(config, None, &crate::resolve::Resolver::none()).unwrap()));
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let rejections = Arc::new(Rejections::default());
        let conns = ConnTracker::new();
        let (stop, stop_rx) = watch::channel(false);
        let accept_loop = tokio::spawn(serve_tcp(
            socket,
            TcpFront { name: "front".to_owned(), access_log: None, traffic: Arc::default() },
            snapshot.clone(),
            limiter.clone(),
            rejections.clone(),
            stop_rx,
            conns.clone(),
        ));
        Proxy { addr, snapshot, limiter, rejections, conns, stop, accept_loop }
    }

    async fn start_simple(servers: &[(&str, SocketAddr)], pool: &str) -> Proxy {
        start(servers, pool, "", ConnectionLimiter::with_caps(1000, 1000)).await
    }

    /// Sends `msg`, half-closes, and returns everything received until the proxy closes.
    async fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        within("exchange", async {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(msg).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut reply = Vec::new();
            stream.read_to_end(&mut reply).await.unwrap();
            reply
        })
        .await
    }

    /// Writes `msg` and reads back as many bytes: one echo round trip on an open connection.
    async fn ping(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        within("ping", async {
            stream.write_all(msg).await.unwrap();
            let mut reply = vec![0; msg.len()];
            stream.read_exact(&mut reply).await.unwrap();
            reply
        })
        .await
    }

    /// Whether the proxy closed `stream` (EOF or reset), waiting at most [`WAIT`].
    async fn closed_by_proxy(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(within("close", stream.read(&mut byte)).await, Ok(0) | Err(_))
    }

    #[tokio::test]
    async fn bytes_echo_back_and_the_connection_counts_as_active() {
        let proxy = start_simple(&[("a", echo_backend().await)], "").await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(ping(&mut client, b"hello").await, b"hello");
        let server = proxy.server("a");
        assert_eq!(server.stats.requests.load(Ordering::Relaxed), 1);
        assert_eq!(server.active.load(Ordering::Relaxed), 1, "counted for the connection's lifetime");
        assert_eq!(proxy.conns.open(), 1);
        drop(client);
        eventually("active back to 0", || server.active.load(Ordering::Relaxed) == 0).await;
        eventually("tracker and permit released", || proxy.conns.open() == 0 && proxy.limiter.open() == 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_32_mib_random_transfer_arrives_byte_identical_both_ways() {
        const SIZE: usize = 32 * 1024 * 1024;
        let proxy = start_simple(&[("a", echo_backend().await)], "").await;
        let mut data = vec![0u8; SIZE];
        fastrand::Rng::with_seed(0x6b65656c).fill(&mut data);
        let sent_hash = xxhash_rust::xxh3::xxh3_64(&data);

        let client = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut reader, mut writer) = client.into_split();
        let writing = tokio::spawn(async move {
            writer.write_all(&data).await.unwrap();
            writer.shutdown().await.unwrap();
        });
        let mut received = Vec::with_capacity(SIZE);
        within("32 MiB echoed", reader.read_to_end(&mut received)).await.unwrap();
        within("writer", writing).await.unwrap();
        assert_eq!(received.len(), SIZE);
        assert_eq!(xxhash_rust::xxh3::xxh3_64(&received), sent_hash);
    }

    #[tokio::test]
    async fn half_close_from_the_client_still_delivers_the_full_response() {
        // Reads the whole request (to EOF), then answers and closes.
        let addr = backend(|mut stream: TcpStream| async move {
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await.unwrap();
            let reply = format!("got {} bytes\n", request.len()).repeat(10_000);
            stream.write_all(reply.as_bytes()).await.unwrap();
        })
        .await;
        let proxy = start_simple(&[("a", addr)], "").await;
        let reply = exchange(proxy.addr, &vec![b'q'; 200_000]).await;
        assert_eq!(reply, "got 200000 bytes\n".repeat(10_000).as_bytes());
    }

    #[tokio::test]
    async fn half_close_from_the_server_still_carries_the_clients_data() {
        // Sends a banner and shuts its write side at once, then reads what the client sends.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let addr = backend(move |mut stream: TcpStream| {
            let tx = tx.clone();
            async move {
                stream.write_all(b"banner").await.unwrap();
                stream.shutdown().await.unwrap();
                let mut data = Vec::new();
                stream.read_to_end(&mut data).await.unwrap();
                let _ = tx.send(data);
            }
        })
        .await;
        let proxy = start_simple(&[("a", addr)], "").await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let mut banner = Vec::new();
        within("server's half", client.read_to_end(&mut banner)).await.unwrap();
        assert_eq!(banner, b"banner");
        client.write_all(b"sent after the server's EOF").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(within("client's half", rx.recv()).await.unwrap(), b"sent after the server's EOF");
    }

    /// An echo backend that first sends its name.
    async fn named_echo(name: &'static str) -> SocketAddr {
        backend(move |mut stream: TcpStream| async move {
            if stream.write_all(name.as_bytes()).await.is_ok() {
                echo(stream).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn round_robin_alternates_between_two_backends() {
        let proxy = start_simple(&[("a", named_echo("a").await), ("b", named_echo("b").await)], "").await;
        let mut replies = Vec::new();
        for _ in 0..4 {
            replies.push(String::from_utf8(exchange(proxy.addr, b":x").await).unwrap());
        }
        let names: BTreeSet<&str> = replies.iter().map(|r| &r[..1]).collect();
        assert_eq!(names, BTreeSet::from(["a", "b"]), "{replies:?}");
        assert_ne!(replies[0], replies[1], "{replies:?}");
        assert_eq!((&replies[2], &replies[3]), (&replies[0], &replies[1]), "{replies:?}");
        assert!(replies.iter().all(|r| r.ends_with(":x")), "{replies:?}");
    }

    #[tokio::test]
    async fn a_refused_server_is_skipped_without_the_client_noticing() {
        let proxy = start_simple(&[("down", dead_address().await), ("up", echo_backend().await)], "").await;
        for i in 0..4u8 {
            assert_eq!(exchange(proxy.addr, &[i; 3]).await, [i; 3]);
        }
        let (down, up) = (proxy.server("down"), proxy.server("up"));
        assert!(down.stats.connect_errors.load(Ordering::Relaxed) >= 1);
        assert_eq!(down.stats.requests.load(Ordering::Relaxed), 0);
        assert_eq!(up.stats.requests.load(Ordering::Relaxed), 4);
        assert_eq!(proxy.rejections.no_server.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn with_no_server_to_connect_the_client_is_closed() {
        let proxy = start_simple(&[("x", dead_address().await), ("y", dead_address().await)], "retries = 1\n").await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(closed_by_proxy(&mut client).await);
        let errors = |n: &str| proxy.server(n).stats.connect_errors.load(Ordering::Relaxed);
        assert_eq!(errors("x") + errors("y"), 2, "one attempt and one retry");
        assert_eq!(proxy.rejections.no_server.load(Ordering::Relaxed), 1);
    }

    /// A backend that reads a PROXY header, reports it, and echoes what follows.
    async fn proxy_protocol_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Header>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = backend(move |mut stream: TcpStream| {
            let tx = tx.clone();
            async move {
                let mut head = Vec::new();
                // Byte by byte, so nothing after the header is consumed; bounded by the v1 limit.
                let header = loop {
                    assert!(head.len() <= proxy_protocol::MAX_HEADER_LEN, "no header end in {head:?}");
                    head.push(stream.read_u8().await.unwrap());
                    if let Some((header, used)) = parse(&head).unwrap() {
                        assert_eq!(used, head.len());
                        break header;
                    }
                };
                let _ = tx.send(header);
                echo(stream).await;
            }
        })
        .await;
        (addr, rx)
    }

    #[tokio::test]
    async fn proxy_protocol_headers_arrive_first_with_the_clients_address() {
        for version in ["v1", "v2"] {
            let (addr, mut headers) = proxy_protocol_backend().await;
            let proxy = start_simple(&[("a", addr)], &format!("proxy_protocol = \"{version}\"\n")).await;
            let expected = if version == "v1" { ProxyProtocol::V1 } else { ProxyProtocol::V2 };
            assert_eq!(proxy.snapshot.load().pools["p"].config.proxy_protocol, Some(expected));

            let mut client = TcpStream::connect(proxy.addr).await.unwrap();
            assert_eq!(ping(&mut client, b"payload").await, b"payload", "{version}: the header is not in the stream");
            let header = within("header", headers.recv()).await.unwrap();
            let source = client.local_addr().unwrap();
            assert_eq!(header, Header::Tcp { source, destination: proxy.addr }, "{version}");
        }
    }

    #[tokio::test]
    async fn the_per_client_cap_refuses_the_next_connection_while_the_first_ones_work() {
        let proxy = start(&[("a", echo_backend().await)], "", "", ConnectionLimiter::with_caps(100, 2)).await;
        let mut first = TcpStream::connect(proxy.addr).await.unwrap();
        let mut second = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(ping(&mut first, b"1").await, b"1");
        assert_eq!(ping(&mut second, b"2").await, b"2");

        let mut third = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(closed_by_proxy(&mut third).await);
        assert_eq!(proxy.limiter.refused_per_client(), 1);
        assert_eq!(proxy.server("a").stats.requests.load(Ordering::Relaxed), 2, "the refused one reached no server");
        assert_eq!(ping(&mut first, b"still").await, b"still");
        assert_eq!(ping(&mut second, b"fine").await, b"fine");

        drop(first);
        eventually("permit released", || proxy.limiter.open() == 1).await;
        let mut fourth = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(ping(&mut fourth, b"4").await, b"4");
    }

    #[tokio::test]
    async fn a_connection_idle_for_the_idle_timeout_is_closed_and_a_busy_one_is_not() {
        let limits = "idle_timeout = \"300ms\"\n";
        let proxy = start(&[("a", echo_backend().await)], "", limits, ConnectionLimiter::with_caps(100, 100)).await;
        let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
        let mut busy = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(ping(&mut idle, b"once").await, b"once");
        let quiet_since = Instant::now();
        // Traffic every 100ms for 3 idle timeouts keeps `busy` open.
        for i in 0..9u8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(ping(&mut busy, &[i]).await, [i]);
        }
        assert!(closed_by_proxy(&mut idle).await);
        assert!(quiet_since.elapsed() >= Duration::from_millis(300));
        assert_eq!(ping(&mut busy, b"alive").await, b"alive");
        eventually("idle connection released", || proxy.conns.open() == 1).await;
    }

    #[tokio::test]
    async fn stop_refuses_new_clients_lets_open_ones_finish_and_drain_closes_the_rest() {
        let mut proxy = start_simple(&[("a", echo_backend().await)], "").await;
        let mut finishing = TcpStream::connect(proxy.addr).await.unwrap();
        let mut lingering = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(ping(&mut finishing, b"a").await, b"a");
        assert_eq!(ping(&mut lingering, b"b").await, b"b");

        proxy.stop.send(true).unwrap();
        within("accept loop returns", &mut proxy.accept_loop).await.unwrap();
        assert!(TcpStream::connect(proxy.addr).await.is_err(), "the socket is closed");
        assert_eq!(ping(&mut finishing, b"still served").await, b"still served");
        assert!(!proxy.conns.wait_idle(Duration::from_millis(50)).await);

        drop(finishing);
        eventually("one left", || proxy.conns.open() == 1).await;
        let started = Instant::now();
        assert_eq!(within("drain", proxy.conns.drain(Duration::from_millis(200))).await, 1);
        assert!(started.elapsed() >= Duration::from_millis(200), "drain waited for its deadline");
        assert_eq!(proxy.conns.open(), 0);
        assert!(closed_by_proxy(&mut lingering).await);
        eventually("active back to 0", || proxy.server("a").active.load(Ordering::Relaxed) == 0).await;
        assert_eq!(within("drain when idle", proxy.conns.drain(WAIT)).await, 0);
    }
}
