//! Listeners and the client-facing side of the data plane.
//!
//! A listener is a bound `TcpListener` plus an accept loop ([`serve`]); each accepted
//! connection (after the TLS handshake on https listeners) is handed to its state machine in
//! [`conn`]. The request path is the same whatever the client speaks:
//!
//! - [`conn`]: one client connection's life: waiting, reading, idle, parked, draining.
//! - [`h1`]: keel's own HTTP/1.x, both halves: the framing scanner ([`h1::scan`]), the body
//!   codec ([`h1::codec`]), the server half for clients ([`h1::server`]) and the client half
//!   for servers, with one connection pool per server ([`h1::client`]).
//! - [`h2`]: the HTTP/2 front end (h2c by prior knowledge, h2 by ALPN), on hyper's h2 server.
//! - [`h2_client`]: the HTTP/2 client half for pools with `protocol = "h2c"`/`"h2"`: streams
//!   multiplexed on a few shared connections per server, gRPC's streaming, trailers, resets
//!   and `grpc-timeout`.
//! - [`phases`]: the request path in named phases: authority → route → admit → choose → send
//!   → respond → log.
//! - [`guard`]: the client stream's framing gate and deadlines between requests.
//! - [`lot`]: the listener's parking lot, where idle plain connections wait with no task.
//! - [`body`]: a client's request body with the edge's size, pause and rate limits, and request
//!   buffering (small bodies read whole before a server is chosen, replayable on a retry).
//! - [`retry`]: which failures may be retried (`retry_on`, RFC 9110's idempotency rule) and
//!   the pool's retry budget.
//! - [`headers`]: hop-by-hop stripping and `X-Forwarded-*`.
//! - [`sock`]: plain TCP writes with `send(2)`/`sendmsg(2)`, not the file layer's `writev(2)`.
//! - [`access_log`]: one line per request or TCP session, written off the request path.
//! - [`header_rules`]: the operator's header rules (set/add/remove, requests and responses),
//!   compiled once per config.
//! - [`error`]: what failed, which side, whether a retry is allowed, and the status it maps to.
//! - [`tcp`]: `tcp` listeners (layer 4): one server of the default pool per client connection,
//!   bytes spliced both ways with half-close, idle timeout and graceful drain.
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header sent first to servers of a TCP pool.

pub mod access_log;
pub mod body;
pub mod conn;
pub mod error;
pub mod guard;
pub mod h1;
pub mod h2;
pub mod h2_client;
pub mod header_rules;
pub mod headers;
pub mod lot;
pub mod phases;
pub mod proxy_protocol;
pub mod retry;
pub mod sock;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use keel_cluster::model::Limits;
use keel_cluster::throttle::{LogThrottle, EVERY};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use self::conn::ConnContext;
use self::guard::{ConnActivity, Deadlines, GuardedIo};
use self::h2::H2;
use self::lot::Lot;
pub use self::phases::{HttpProxy, Peer};
use crate::connlimit::{ConnectionLimiter, ConnectionPermit};
use crate::daemon::drain::Drainer;

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
    /// Bytes and handshakes, for the metrics.
    pub traffic: Arc<crate::metrics::ListenerTraffic>,
}

/// The next client of a listener that its connection caps admit; `None` once `stop` turns true
/// (or its sender is gone). A failed accept (EMFILE and friends) backs off instead of spinning
/// on the error; a refused client is closed here.
pub(crate) async fn accept(
    socket: &TcpListener,
    name: &str,
    connections: &ConnectionLimiter,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, ConnectionPermit)> {
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            // The borrow `wait_for` returns is dropped here: it must not live across an await.
            _ = async { let _ = stop.wait_for(|set| *set).await; } => return None,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    static ACCEPT_FAILED: LogThrottle = LogThrottle::new(EVERY);
                    keel_cluster::throttled!(ACCEPT_FAILED, warn, target: "keel::proxy", listener = %name, error = %e,
                        "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match connections.try_acquire(peer.ip()) {
            Ok(permit) => return Some((stream, peer, permit)),
            Err(refused) => {
                tracing::debug!(target: "keel::proxy", listener = %name, client = %peer, reason = %refused, "connection refused");
                // Dropping the stream closes it.
            }
        }
    }
}

/// Accepts connections until `stop` turns true, serving each with the listener's proxy, then
/// hands the listening socket back: a reload that restarts the listener with new settings on
/// the same address serves from the same socket, so no connection attempt is refused in
/// between. Dropping it closes the address.
pub async fn serve(listener: HttpListener, graceful: Arc<Drainer>, mut stop: watch::Receiver<bool>) -> TcpListener {
    let HttpListener { name, socket, proxy, limits, connections, tls, parked, traffic } = listener;
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
        h2: H2::new(&limits),
        proxy,
        deadlines: Deadlines { header_timeout: limits.header_timeout.get(), idle_timeout: limits.idle_timeout.get() },
        h1: conn::h1::Settings {
            max_requests: limits.max_requests_per_connection,
            max_head: limits.max_header_bytes as usize,
            max_headers: limits.max_headers as usize,
        },
        graceful,
        lot: lot.as_ref().map(|(lot, _)| lot.clone()),
        traffic,
    });
    if let Some((lot, poll)) = lot {
        let for_wake = ctx.clone();
        let run =
            lot.run(poll, ctx.graceful.hold(), ctx.graceful.draining(), move |woken| conn::resume(&for_wake, woken));
        tokio::spawn(run);
    }
    while let Some((stream, peer, permit)) = accept(&socket, &name, &connections, &mut stop).await {
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        match &tls {
            None => {
                let io = GuardedIo::new(stream, ConnActivity::new(), ctx.deadlines, true, ctx.h1.max_head)
                    .counting(ctx.traffic.clone());
                // Boxed: tokio moves a task's future when spawning it and again when it ends
                // (≈ 6 KB, several copies a connection); a box moves once.
                tokio::spawn(Box::pin(conn::serve_plain(ctx, io, peer, permit, true)));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(Box::pin(async move {
                    // The handshake is bounded like a request head: a client that connects and
                    // never finishes it must not hold the connection.
                    let tls = match tokio::time::timeout(
                        ctx.deadlines.header_timeout,
                        acceptor.accept(sock::SendStream(stream)),
                    )
                    .await
                    {
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
                    ctx.traffic.handshakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let h2 = crate::tls::negotiated_h2(&tls);
                    let io = GuardedIo::new(tls, ConnActivity::new(), ctx.deadlines, !h2, ctx.h1.max_head)
                        .counting(ctx.traffic.clone());
                    conn::serve_tls(ctx, io, h2, peer, permit).await;
                }));
            }
        }
    }
    if let Some(lot) = &ctx.lot {
        lot.listener_stopped();
    }
    socket
}
