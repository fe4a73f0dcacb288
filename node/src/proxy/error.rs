//! What can go wrong between receiving a request and sending its response head, and what the
//! client is told.
//!
//! Each error records which side failed and whether trying another server is allowed (pingora's
//! shape); the retry loop reads those fields, never message strings.
//!
//! The three sides, and what each costs:
//! - **client** — a body too large, too slow (pause or rate), malformed, or a client gone mid-body:
//!   4xx (or nothing, when nobody is left to read it). Never counted against a server: no
//!   outlier verdict, no health effect, no retry, no sticky re-pinning.
//! - **backend** — a server refused, reset, broke or was slow to answer: 502/503/504, counted
//!   against that server by passive outlier detection, and the only side a retry answers.
//! - **internal** — keel's own policy or lack of choice (no route, no server, the pool's
//!   `total_timeout`): counted against nobody.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

/// Which side of the proxy an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The client sent something unusable.
    Client,
    /// A backend server failed.
    Backend,
    /// keel itself has nothing to offer (no route, no server).
    Internal,
}

/// Kinds of failure, each with its own status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No route matched and the listener has no default pool.
    NoRoute,
    /// The pool has no eligible server.
    NoServer,
    /// No server of the pool accepted a connection (after retries).
    Connect,
    /// The response head did not arrive in time.
    Timeout,
    /// The server closed or broke the exchange.
    Broken,
    /// The request body is larger than the listener allows.
    PayloadTooLarge,
    /// The client paused too long, or uploaded too slowly.
    RequestTimeout,
    /// The client's request was malformed (e.g. invalid chunked framing).
    BadRequest,
    /// The client closed or reset its connection before its request body ended.
    ClientGone,
    /// The pool's `total_timeout` ran out before a response head.
    TotalTimeout,
}

/// A failed request, ready to be turned into a response.
#[derive(Clone, Debug)]
pub struct ProxyError {
    /// What failed.
    pub kind: ErrorKind,
    /// Who failed.
    pub side: Side,
    /// Whether another server may be tried.
    pub retryable: bool,
    /// The pool concerned, if routing got that far.
    pub pool: Option<String>,
    /// The server concerned, if one was chosen.
    pub server: Option<String>,
    /// What went wrong underneath (an I/O error, an invalid response), for logs.
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl ProxyError {
    /// An error of `kind` about `pool`, with side and retryability implied by the kind.
    pub fn new(kind: ErrorKind, pool: Option<&str>, server: Option<&str>) -> Self {
        let (side, retryable) = match kind {
            ErrorKind::NoRoute | ErrorKind::NoServer | ErrorKind::TotalTimeout => (Side::Internal, false),
            // A refused connect never reached the application: safe to try elsewhere.
            ErrorKind::Connect => (Side::Backend, true),
            // The server may have acted on the request: only the client can decide to resend.
            ErrorKind::Timeout | ErrorKind::Broken => (Side::Backend, false),
            ErrorKind::PayloadTooLarge | ErrorKind::RequestTimeout | ErrorKind::BadRequest | ErrorKind::ClientGone => {
                (Side::Client, false)
            }
        };
        ProxyError {
            kind,
            side,
            retryable,
            pool: pool.map(str::to_owned),
            server: server.map(str::to_owned),
            source: None,
        }
    }

    /// Whether the failure counts against the server that was tried (outlier detection): only
    /// the backend's own failures do.
    pub fn counts_against_server(&self) -> bool {
        self.side == Side::Backend
    }

    /// The same error, caused by `source`.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The status code the client gets.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoServer | ErrorKind::Connect => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Timeout | ErrorKind::TotalTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Broken => StatusCode::BAD_GATEWAY,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            // Seldom read by anyone (the client left), but a client that only half-closed gets
            // a 400 naming the incomplete body.
            ErrorKind::BadRequest | ErrorKind::ClientGone => StatusCode::BAD_REQUEST,
        }
    }

    /// A plain-text response saying what happened.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let mut resp = plain_response(self.status(), self.to_string());
        if self.side == Side::Client {
            // The rest of the connection's input cannot be trusted to be framed right.
            resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        resp
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pool = self.pool.as_deref().unwrap_or("?");
        let server = self.server.as_deref().unwrap_or("?");
        match self.kind {
            ErrorKind::NoRoute => write!(f, "no route matches this request and the listener has no default pool"),
            ErrorKind::NoServer => write!(f, "no server available in pool {pool:?}"),
            ErrorKind::Connect => write!(f, "no server of pool {pool:?} accepted a connection (last tried: {server})"),
            ErrorKind::Timeout => write!(f, "server {server} of pool {pool:?} did not answer in time"),
            ErrorKind::Broken => write!(f, "server {server} of pool {pool:?} broke the connection"),
            ErrorKind::PayloadTooLarge => write!(f, "request body too large"),
            ErrorKind::RequestTimeout => write!(f, "request body not received in time"),
            ErrorKind::BadRequest => write!(f, "malformed request body"),
            ErrorKind::ClientGone => write!(f, "the client closed its connection before the request body ended"),
            ErrorKind::TotalTimeout => write!(f, "pool {pool:?} did not answer within its total_timeout"),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A response with a one-line text body.
pub fn plain_response(status: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut body = text;
    body.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_rules() {
        let e = ProxyError::new(ErrorKind::Connect, Some("app"), Some("a"));
        assert!(e.retryable);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ProxyError::new(ErrorKind::Timeout, Some("app"), Some("a"));
        assert!(!e.retryable);
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(ProxyError::new(ErrorKind::Broken, None, None).status(), StatusCode::BAD_GATEWAY);
        let e = ProxyError::new(ErrorKind::NoServer, Some("app"), None);
        assert!(e.to_string().contains("\"app\""));
        for kind in
            [ErrorKind::RequestTimeout, ErrorKind::ClientGone, ErrorKind::BadRequest, ErrorKind::PayloadTooLarge]
        {
            let e = ProxyError::new(kind, Some("app"), Some("a"));
            assert!(e.status().is_client_error() && !e.counts_against_server() && !e.retryable, "{kind:?}");
        }
        let e = ProxyError::new(ErrorKind::TotalTimeout, Some("app"), Some("a"));
        assert_eq!((e.status(), e.counts_against_server()), (StatusCode::GATEWAY_TIMEOUT, false));
    }
}
