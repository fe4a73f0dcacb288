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

pub mod error;
pub mod headers;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use self::http::HttpProxy;

/// Time a client has to send a complete request head (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted, in bytes (request line + headers); larger gets 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 100;

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

/// The hyper connection builder every listener uses: HTTP/1.1 with keep-alive and bounded
/// heads, HTTP/2 by prior knowledge.
pub fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder.http2().timer(TokioTimer::new()).max_header_list_size(MAX_HEAD_BYTES as u32);
    builder
}

/// Accepts connections on `listener` until `stop` turns true, serving each with `proxy`.
/// Returning drops the socket, so new connections are refused from then on.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<HttpProxy>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = connection_builder();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
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
        let proxy = proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer).await) }
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(target: "keel::proxy", client = %peer, error = %e, "client connection ended with an error");
            }
        });
    }
}
