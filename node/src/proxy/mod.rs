//! Listeners and the client-facing side of the data plane.
//!
//! A listener is a bound `TcpListener` plus an accept loop; each accepted connection is served
//! by hyper-util's auto builder, which speaks HTTP/1.1 and, on seeing the HTTP/2 preface,
//! HTTP/2 with prior knowledge (h2c) on the same port. Connections are registered with a
//! [`GracefulShutdown`] so a stop lets in-flight requests finish while new ones are refused.
//! The accept loop takes a plain byte stream, which is where the TLS acceptor will wrap it.
//!
//! - [`http`]: the per-request path (route, select, forward, stream back).
//! - [`headers`]: hop-by-hop stripping and `X-Forwarded-*`.
//! - [`error`]: what failed, which side, whether a retry is allowed, and the status it maps to.
//! - [`tcp`]: `tcp` listeners (layer 4): one server of the default pool per client connection,
//!   bytes spliced both ways with half-close, idle timeout and graceful drain.
//! - [`proxy_protocol`]: the PROXY protocol v1/v2 header sent first to servers of a TCP pool.

pub mod body;
pub mod error;
pub mod guard;
pub mod h1scan;
pub mod headers;
pub mod http;
pub mod proxy_protocol;
pub mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::http::header::{self, HeaderValue};
use ::http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use keel_cluster::model::Limits;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::guard::{ConnActivity, Deadlines, GuardedIo};
pub use self::http::HttpProxy;
use self::http::Tracked;

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

/// Everything an accept loop needs to serve one HTTP listener.
pub struct HttpListener {
    /// The bound socket.
    pub socket: TcpListener,
    /// The request handler.
    pub proxy: Arc<HttpProxy>,
    /// The listener's protection limits.
    pub limits: Limits,
}

/// Accepts connections until `stop` turns true, serving each with the listener's proxy.
/// Returning drops the socket, so new connections are refused from then on.
pub async fn serve(listener: HttpListener, graceful: Arc<GracefulShutdown>, mut stop: watch::Receiver<bool>) {
    let HttpListener { socket, proxy, limits } = listener;
    let builder = connection_builder(&limits);
    let deadlines = Deadlines { header_timeout: limits.header_timeout.get(), idle_timeout: limits.idle_timeout.get() };
    let max_requests = limits.max_requests_per_connection;
    let max_head = limits.max_header_bytes as usize;
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(target: "keel::proxy", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = ConnActivity::new();
        let io = GuardedIo::new(stream, activity.clone(), deadlines, true, max_head);
        let proxy = proxy.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let (guard, count) = activity.start_request();
            let last = max_requests != 0 && count >= max_requests && req.version() < Version::HTTP_2;
            async move {
                let mut resp = proxy.handle(req, peer).await;
                if last {
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, guard)))
            }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            }
        });
    }
}
