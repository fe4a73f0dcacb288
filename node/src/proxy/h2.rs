//! The HTTP/2 front end: hyper's HTTP/2 server (the `h2` crate underneath) for h2c by prior
//! knowledge on plain listeners and h2 by ALPN on TLS listeners.
//!
//! HTTP/2's framing, flow control and stream multiplexing are the `h2` crate's, which is what
//! Pingora, Envoy's Rust peers and hyper's own users rely on; keel's part is the same as for
//! HTTP/1: each stream's head and body go to the request path ([`super::phases`]) as
//! `http::request::Parts` plus a streaming body, so nothing after the head knows which
//! protocol the client spoke. A connection is registered with the listener's drain, which
//! sends GOAWAY and lets open streams finish. Each stream's request path is boxed (hyper spawns
//! a task per stream), and response fields whose value changes every time stay out of HPACK's
//! dynamic table (`unindexed`).
//!
//! A connection that ends in a protocol error (garbage frames, a flood of stream resets that
//! the `h2` crate answers with GOAWAY) is logged through one throttle: a hostile client can end
//! connections that way as fast as it can open them. A client that merely went away (an I/O
//! error) is only a debug line.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use keel_cluster::model::Limits;
use keel_cluster::throttle::{LogThrottle, EVERY};
use tokio::io::{AsyncRead, AsyncWrite};

use super::guard::{ConnActivity, RequestGuard};
use super::phases::{HttpProxy, Peer, ProxyBody, Tracked};
use crate::daemon::drain::Drainer;

/// A listener's HTTP/2 settings, made once and shared by its connections.
#[derive(Clone)]
pub struct H2 {
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl H2 {
    /// HTTP/2 with the listener's header limits.
    pub fn new(limits: &Limits) -> Self {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes);
        H2 { builder }
    }

    /// Serves one HTTP/2 connection until it closes or the drain has let its streams finish.
    pub async fn serve<T>(
        &self,
        io: T,
        proxy: Arc<HttpProxy>,
        peer: Arc<Peer>,
        activity: Arc<ConnActivity>,
        drain: &Drainer,
    ) where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let client = peer.addr;
        let service = service_fn(move |req: http::Request<Incoming>| {
            let proxy = proxy.clone();
            let peer = peer.clone();
            let (guard, _) = activity.start_request();
            async move {
                let (parts, body) = req.into_parts();
                // Only a body that may carry bytes is forwarded as one (a `GET` has none).
                let body = (!http_body::Body::is_end_stream(&body)).then_some(body);
                // Boxed: hyper spawns each stream's future as a task, and tokio copies a task's
                // future into its cell and moves it as it ends; unboxed, the request path's
                // state was copied ten times a stream (a fifth of an h2c request's
                // instructions in `bench/instructions --mode h2c`).
                let mut resp = Box::pin(proxy.handle(parts, body, &peer)).await;
                unindexed(resp.headers_mut(), proxy.request_id_header());
                Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, guard)))
            }
        });
        let conn = drain.watch(self.builder.serve_connection(TokioIo::new(io), service));
        if let Err(e) = conn.await {
            if went_away(&e) {
                tracing::debug!(target: "keel::proxy", client = %client, error = %e, "HTTP/2 client went away");
            } else {
                static PROTOCOL_ERROR: LogThrottle = LogThrottle::new(EVERY);
                keel_cluster::throttled!(PROTOCOL_ERROR, info, target: "keel::proxy", client = %client,
                    error = %Chain(&e), "HTTP/2 connection ended with a protocol error");
            }
        }
    }
}

/// Keeps the fields whose value changes with every response (`Date` each second, the request
/// id each time) out of the connection's HPACK dynamic table: marked sensitive, they are sent
/// as literals "never indexed" (RFC 7541 §6.2.3). Indexed, each new value was inserted and
/// evicted others, and the `h2` crate's encoder compared every response's value with each
/// older one of that name still in the table: up to a table's worth (≈ 60 `Date` values) on a
/// connection that lives a minute.
fn unindexed(headers: &mut http::HeaderMap, request_id: Option<&http::HeaderName>) {
    if let Some(date) = headers.get_mut(http::header::DATE) {
        date.set_sensitive(true);
    }
    if let Some(id) = request_id.and_then(|name| headers.get_mut(name)) {
        id.set_sensitive(true);
    }
}

/// Whether a session ended because the client's connection failed (reset, closed mid-frame), not
/// because of something the client sent.
fn went_away(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// An error with its sources, "http2 error: connection error detected: …": hyper's own message
/// names only the protocol.
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// The response body type of an HTTP/2 stream: keel's, holding the connection's in-flight count.
pub type StreamBody = Tracked<ProxyBody, RequestGuard>;

#[cfg(test)]
mod tests {
    use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, DATE};

    #[test]
    fn values_that_change_every_response_stay_out_of_the_dynamic_table() {
        let id = HeaderName::from_static("x-request-id");
        let mut headers = HeaderMap::new();
        headers.insert(DATE, HeaderValue::from_static("Thu, 03 Dec 2026 14:00:00 GMT"));
        headers.insert(id.clone(), HeaderValue::from_static("0123456789abcdef0123456789abcdef"));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        super::unindexed(&mut headers, Some(&id));
        assert!(headers[DATE].is_sensitive());
        assert!(headers[&id].is_sensitive());
        assert!(!headers[CONTENT_TYPE].is_sensitive(), "a steady value is worth indexing");
        let mut bare = HeaderMap::new();
        super::unindexed(&mut bare, None);
        assert!(bare.is_empty());
    }
}
