//! Listeners and the client-facing side of the data plane.
//!
//! A listener is a bound `TcpListener` plus an accept loop; each accepted connection is served
//! by hyper-util's auto builder, which speaks HTTP/1.1 and, on seeing the HTTP/2 preface,
//! HTTP/2 with prior knowledge (h2c) on the same port. Connections are registered with a
//! [`GracefulShutdown`] so a stop lets in-flight requests finish while new ones are refused.
//! The accept loop takes a plain byte stream, which is where the TLS acceptor will wrap it.
//! Plain-HTTP connections are served by [`park`]: between requests they hold no hyper
//! connection and no task, only an entry in the listener's [`lot`], which is what keeps idle
//! keep-alive cheap.
//!
//! - [`http`]: the per-request path (route, select, forward, stream back).
//! - [`headers`]: hop-by-hop stripping and `X-Forwarded-*`.
//! - [`error`]: what failed, which side, whether a retry is allowed, and the status it maps to.
//! - [`h1`]: keel's own HTTP/1.x codec; its client ([`h1::client`]) carries every request to
//!   the servers, on the request's task.
//! - [`h1server`]: keel's own HTTP/1.1 server path for those same requests on plain-HTTP
//!   connections; a parked connection's next request goes there first, and anything it does
//!   not take goes to hyper at the message boundary.
//! - [`tcp`]: `tcp` listeners (layer 4): one server of the default pool per client connection,
//!   bytes spliced both ways with half-close, idle timeout and graceful drain.
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header sent first to servers of a TCP pool.
//! - [`park`]: letting hyper go while a plain-HTTP connection is idle, and taking it back.
//! - [`lot`]: the listener's parking lot, where idle connections wait with no task of their own.

pub mod body;
pub mod error;
pub mod guard;
pub mod h1;
pub mod h1server;
pub mod headers;
pub mod http;
pub mod lot;
pub mod park;
pub mod proxy_protocol;
pub mod tcp;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;

use bytes::BytesMut;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{self, HeaderValue};
use ::http::{Request, Version};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use keel_cluster::model::Limits;
use tokio_rustls::TlsAcceptor;

use crate::connlimit::{ConnectionLimiter, ConnectionPermit};
use crate::daemon::drain::Drainer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use self::guard::{ConnActivity, Deadlines, GuardedIo};
use self::http::Tracked;
pub use self::http::{HttpProxy, Peer};
use self::lot::{Lot, Woken};
use self::park::{Parkable, Prefixed, Slot};

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind listener {name:?} on {addr}: {source}")]
pub struct BindError {
    /// Listener name.
    pub name: String,
    /// Address it wanted.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds a listener's socket.
pub async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { name: name.to_owned(), addr, source })
}

/// The hyper connection builder of a listener: HTTP/1.1 with keep-alive and bounded heads,
/// HTTP/2 by prior knowledge. Time limits are enforced by [`guard::GuardedIo`], not by hyper.
pub fn connection_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes as usize)
        .max_headers(limits.max_headers as usize);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes);
    builder
}

/// Everything an accept loop needs to serve one HTTP or HTTPS listener.
pub struct HttpListener {
    /// Listener name, for logs.
    pub name: String,
    /// The bound socket.
    pub socket: TcpListener,
    /// The request handler.
    pub proxy: Arc<HttpProxy>,
    /// The listener's protection limits.
    pub limits: Limits,
    /// Connection caps, shared with the metrics.
    pub connections: ConnectionLimiter,
    /// TLS termination, for https listeners.
    pub tls: Option<TlsAcceptor>,
    /// Idle connections in the listener's parking lot now, for the metrics.
    pub parked: Arc<AtomicU64>,
}

/// The HTTP/1.1 half of [`connection_builder`], for a parked connection that wakes up: it
/// already spoke HTTP/1.1 (an h2c connection never parks), so it skips the auto builder's
/// version sniffing, which costs a 24-byte read of its own on every request.
pub fn http1_builder(limits: &Limits) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(limits.max_header_bytes as usize)
        .max_headers(limits.max_headers as usize);
    builder
}

/// How long a plain-HTTP connection must stay quiet after a response before it parks. A busy
/// keep-alive client sends its next request well within this, and keeps its hyper connection
/// instead of paying for a new one per request; an idle one parks almost at once, so a crowd
/// of idle connections never holds hyper's buffers together (the allocator would keep that
/// peak: a 200 ms delay was measured at 9.3 KiB per idle connection).
pub const PARK_AFTER: Duration = Duration::from_millis(5);

/// What every connection of a listener shares.
struct ConnContext {
    builder: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
    proxy: Arc<HttpProxy>,
    deadlines: Deadlines,
    own: h1server::Settings,
    graceful: Arc<Drainer>,
    /// Where idle plain-HTTP connections wait; `None` for TLS listeners (which never park) or
    /// when the lot could not be set up (connections then wait in their own tasks).
    lot: Option<Arc<Lot>>,
}

/// Accepts connections until `stop` turns true, serving each with the listener's proxy.
/// Returning drops the socket, so new connections are refused from then on.
pub async fn serve(listener: HttpListener, graceful: Arc<Drainer>, mut stop: watch::Receiver<bool>) {
    let HttpListener { name, socket, proxy, limits, connections, tls, parked } = listener;
    let lot = match tls {
        Some(_) => None,
        None => match Lot::new(limits.idle_timeout.get(), parked) {
            Ok(lot) => Some(lot),
            Err(e) => {
                tracing::warn!(target: "keel::proxy", listener = %name, error = %e, "no parking lot; idle connections wait in their own tasks");
                None
            }
        },
    };
    let ctx = Arc::new(ConnContext {
        builder: connection_builder(&limits),
        http1: http1_builder(&limits),
        proxy,
        deadlines: Deadlines { header_timeout: limits.header_timeout.get(), idle_timeout: limits.idle_timeout.get() },
        own: h1server::Settings {
            max_requests: limits.max_requests_per_connection,
            max_head: limits.max_header_bytes as usize,
            max_headers: limits.max_headers as usize,
        },
        graceful,
        lot: lot.as_ref().map(|(lot, _)| lot.clone()),
    });
    if let Some((lot, poll)) = lot {
        let for_wake = ctx.clone();
        let run = lot.run(poll, ctx.graceful.hold(), ctx.graceful.draining(), move |woken| resume(&for_wake, woken));
        tokio::spawn(run);
    }
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(target: "keel::proxy", listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = match connections.try_acquire(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                tracing::debug!(target: "keel::proxy", listener = %name, client = %peer, reason = %refused, "connection refused");
                continue; // dropping the stream closes it
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        match &tls {
            None => {
                let io = GuardedIo::new(stream, ConnActivity::new(), ctx.deadlines, true, ctx.own.max_head);
                tokio::spawn(serve_parking(ctx, io, peer, permit, true));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The handshake is bounded like a request head: a client that connects and
                    // never finishes it must not hold the connection.
                    let tls = match tokio::time::timeout(ctx.deadlines.header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(target: "keel::tls", client = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(target: "keel::tls", client = %peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let h2 = crate::tls::negotiated_h2(&tls);
                    let io = GuardedIo::new(tls, ConnActivity::new(), ctx.deadlines, !h2, ctx.own.max_head);
                    serve_tls(ctx, io, h2, peer, permit).await;
                });
            }
        }
    }
    if let Some(lot) = &ctx.lot {
        lot.listener_stopped();
    }
}

/// Serves a connection the client sent something on while it was in the parking lot.
fn resume(ctx: &Arc<ConnContext>, woken: Woken) {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let Woken { stream, requests, idle_since_ms, permit } = woken;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(target: "keel::proxy", error = %e, "could not take a parked connection back; closed it");
                return;
            }
        };
        // The peer is asked again rather than kept in the lot (32 bytes a connection); a
        // client that reset meanwhile has none, and is closed.
        let Ok(peer) = stream.peer_addr() else { return };
        let activity = ConnActivity::resumed(requests, idle_since_ms);
        let io = GuardedIo::new(stream, activity, ctx.deadlines, true, ctx.own.max_head);
        serve_parking(ctx, io, peer, permit, false).await;
    });
}

/// What a listener's service answers with.
type ServiceResponse = ::http::Response<Tracked<http::ProxyBody, guard::RequestGuard>>;

/// The service of one hyper connection: counts requests on the client connection, marks the
/// last one `Connection: close`, and records whether the connection lives on after each.
fn make_service(
    ctx: &Arc<ConnContext>,
    activity: Arc<ConnActivity>,
    peer: Arc<Peer>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = ServiceResponse,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<ServiceResponse, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    let proxy = ctx.proxy.clone();
    let max_requests = ctx.own.max_requests;
    service_fn(move |req: Request<Incoming>| {
        let proxy = proxy.clone();
        let activity = activity.clone();
        let peer = peer.clone();
        let (guard, count) = activity.start_request();
        let last = max_requests != 0 && count >= max_requests && req.version() < Version::HTTP_2;
        let keep = req.version() == Version::HTTP_11 && !last && !h1server::wants_close(req.headers());
        async move {
            let mut resp = proxy.handle(req, &peer).await;
            if last {
                resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            let keep = keep
                && resp.status() != ::http::StatusCode::SWITCHING_PROTOCOLS
                && !resp.headers().contains_key(header::CONNECTION);
            activity.set_keep(keep);
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, guard)))
        }
    })
}

/// Serves a plain-TCP client connection until it goes idle, then parks it in the listener's
/// [`lot`], which ends this task; see [`park`]. `first`: a new connection, whose first request
/// is read here (a connection back from the lot is served with the HTTP/1.1 builder).
async fn serve_parking(
    ctx: Arc<ConnContext>,
    mut io: GuardedIo<TcpStream>,
    peer: SocketAddr,
    mut permit: ConnectionPermit,
    mut first: bool,
) {
    // Counted by the drain, which waits for this task; None: draining already started.
    let Some(_held) = ctx.graceful.hold() else { return };
    let mut draining = ctx.graceful.draining();
    let activity = io.activity();
    let client = Arc::new(Peer::new(peer));
    let slot = Arc::new(Slot::default());
    let mut park_timer = None;
    loop {
        let readable = tokio::select! {
            biased;
            _ = draining.wait_for(|d| *d) => false,
            r = std::future::poll_fn(|cx| io.poll_idle(cx)) => r,
        };
        if !readable {
            return; // dropping the stream closes it
        }
        // What the client sent is read here, one read for the whole head as a rule. A new
        // connection's first bytes show whether it opens with the HTTP/2 preface (the auto
        // builder would sniff with a 24-byte read of its own, then hyper would read the rest);
        // an HTTP/1.1 request goes to keel's own server path, and to hyper only what that
        // path does not take.
        let Some(mut buf) = next_read(&mut io, &mut draining, peer).await else { return };
        let maybe_h2 = std::mem::take(&mut first) && maybe_h2(&buf);
        if !maybe_h2 {
            match h1server::serve(&ctx.proxy, &mut io, &mut buf, &client, &activity, ctx.own, &draining).await {
                h1server::Outcome::Idle => match after_response(&mut io, &mut draining, &mut park_timer).await {
                    Next::Request => continue,
                    Next::Close => return,
                    Next::Quiet => match park(&ctx, io, permit) {
                        Some((back, kept)) => {
                            (io, permit) = (back, kept);
                            continue;
                        }
                        None => return,
                    },
                },
                h1server::Outcome::Close => return,
                h1server::Outcome::Hyper => {}
            }
        }
        let prefix = buf.freeze();
        activity.reset_finished();
        slot.set_parking(false);
        let service = make_service(&ctx, activity.clone(), client.clone());
        let io_for_hyper = TokioIo::new(Parkable::with_prefix(io, slot.clone(), prefix));
        let served = if maybe_h2 {
            let conn = Box::pin(ctx.builder.serve_connection_with_upgrades(io_for_hyper, service).into_owned());
            drive_until_parked(conn, &activity, &slot, &mut draining, |c| c.graceful_shutdown()).await
        } else {
            let conn = Box::pin(ctx.http1.serve_connection(io_for_hyper, service).with_upgrades());
            drive_until_parked(conn, &activity, &slot, &mut draining, |c| c.graceful_shutdown())
                .await
                .map_err(Into::into)
        };
        if let Err(e) = served {
            tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            return;
        }
        if *draining.borrow() {
            return;
        }
        let Some(back) = slot.reclaim(&activity) else { return };
        match park(&ctx, back, permit) {
            Some((back, kept)) => (io, permit) = (back, kept),
            None => return,
        }
    }
}

/// Puts an idle connection into the lot, which ends its task (`None`); if the lot has closed
/// (its listener stopped and it emptied), the connection comes back to wait in its task.
fn park(
    ctx: &ConnContext,
    io: GuardedIo<TcpStream>,
    permit: ConnectionPermit,
) -> Option<(GuardedIo<TcpStream>, ConnectionPermit)> {
    match &ctx.lot {
        Some(lot) => lot.park(io, permit),
        None => Some((io, permit)),
    }
}

/// What a connection does after keel's own server path answered everything it had.
enum Next {
    /// The client sent its next request.
    Request,
    /// The client stayed quiet for [`PARK_AFTER`]: the connection parks.
    Quiet,
    /// The connection closes (its idle deadline passed, or draining started).
    Close,
}

/// Waits up to [`PARK_AFTER`] for the client's next request, as a hyper connection does before
/// it parks: a busy keep-alive client is served by this task without a trip through the lot.
/// `timer` is the task's one timer, made on first use and moved on each wait.
async fn after_response(
    io: &mut GuardedIo<TcpStream>,
    draining: &mut watch::Receiver<bool>,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
) -> Next {
    let deadline = tokio::time::Instant::now() + PARK_AFTER;
    let timer = match timer {
        Some(t) => {
            t.as_mut().reset(deadline);
            t
        }
        None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
    };
    tokio::select! {
        biased;
        _ = draining.wait_for(|d| *d) => Next::Close,
        readable = std::future::poll_fn(|cx| io.poll_idle(cx)) => if readable { Next::Request } else { Next::Close },
        _ = timer.as_mut() => Next::Quiet,
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), which h2c clients with prior knowledge send
/// first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether a new connection's first bytes may be the HTTP/2 preface (h2c with prior
/// knowledge): those go to hyper's auto builder.
fn maybe_h2(first: &[u8]) -> bool {
    H2_PREFACE.starts_with(&first[..first.len().min(H2_PREFACE.len())])
}

/// Reads what the client sent next, one read for a whole head as a rule; `None` when the
/// connection should close: the client closed it, it failed, or draining started.
async fn next_read<T>(io: &mut GuardedIo<T>, draining: &mut watch::Receiver<bool>, peer: SocketAddr) -> Option<BytesMut>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = BytesMut::new();
    let read = tokio::select! {
        biased;
        _ = draining.wait_for(|d| *d) => return None,
        r = h1server::read_more(io, &mut buf) => r,
    };
    match read {
        Ok(0) => None,
        Ok(_) => Some(buf),
        Err(e) => {
            tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            None
        }
    }
}

/// Runs one hyper connection until it ends: closed by either side, stopped by the drain, or
/// stopped because the client has been quiet for [`PARK_AFTER`] since an exchange finished
/// and the connection can park. hyper's buffers are dropped on return.
///
/// The connection comes boxed, and is boxed where it is made: held inline, hyper's connection
/// state would be part of this connection's task for its whole life, parked or not, which is
/// the memory parking saves.
async fn drive_until_parked<C, E>(
    mut conn: Pin<Box<C>>,
    activity: &ConnActivity,
    slot: &Slot,
    draining: &mut watch::Receiver<bool>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
) -> Result<(), E>
where
    C: std::future::Future<Output = Result<(), E>>,
{
    let mut stopping = false;
    // Armed once an exchange finishes and the connection could park: (timer, requests seen).
    // Boxed so a parked connection's task does not carry a timer.
    let mut delay: Option<(Pin<Box<tokio::time::Sleep>>, u32)> = None;
    let mut armed = false;
    loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => return r,
            _ = draining.wait_for(|d| *d), if !stopping => {
                stopping = true;
                graceful_shutdown(conn.as_mut());
            }
            _ = std::future::poll_fn(|cx| activity.poll_parkable(cx)), if !stopping && !armed => {
                let deadline = tokio::time::Instant::now() + PARK_AFTER;
                match &mut delay {
                    Some((timer, seen)) => {
                        timer.as_mut().reset(deadline);
                        *seen = activity.requests();
                    }
                    None => delay = Some((Box::pin(tokio::time::sleep_until(deadline)), activity.requests())),
                }
                armed = true;
            }
            _ = async { if let Some((timer, _)) = &mut delay { timer.as_mut().await } }, if armed && !stopping => {
                armed = false;
                // Park only if the client stayed quiet the whole time: no request since, and
                // hyper holds none of its bytes.
                let quiet = delay.as_ref().is_some_and(|(_, seen)| *seen == activity.requests());
                if quiet && activity.parkable() {
                    stopping = true;
                    slot.set_parking(true);
                    graceful_shutdown(conn.as_mut());
                }
            }
        }
    }
}

/// Serves a TLS client connection. HTTP/1.1 requests take keel's own server path as on a plain
/// connection; but a TLS connection never parks (rustls buffers plaintext on its side, so the
/// socket's readability says nothing), and once hyper has had a request of it (or it speaks
/// HTTP/2) it stays with hyper.
async fn serve_tls<T>(ctx: Arc<ConnContext>, mut io: GuardedIo<T>, h2: bool, peer: SocketAddr, permit: ConnectionPermit)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    let activity = io.activity();
    let client = Arc::new(Peer::new(peer));
    // Counted by the drain while keel's own path has the connection; hyper's part is watched.
    let Some(held) = ctx.graceful.hold() else { return };
    let mut prefix = BytesMut::new();
    if !h2 {
        let mut draining = ctx.graceful.draining();
        let mut first = true;
        prefix = loop {
            let Some(mut buf) = next_read(&mut io, &mut draining, peer).await else { return };
            if std::mem::take(&mut first) && maybe_h2(&buf) {
                break buf;
            }
            match h1server::serve(&ctx.proxy, &mut io, &mut buf, &client, &activity, ctx.own, &draining).await {
                h1server::Outcome::Idle => continue,
                h1server::Outcome::Close => return,
                h1server::Outcome::Hyper => break buf,
            }
        };
    }
    let service = make_service(&ctx, activity, client);
    let io = TokioIo::new(Prefixed::new(io, prefix.freeze()));
    let conn = ctx.graceful.watch(ctx.builder.serve_connection_with_upgrades(io, service).into_owned());
    drop(held);
    if let Err(e) = conn.await {
        tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
    }
}
