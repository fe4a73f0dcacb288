//! The gRPC health check: one call of gRPC's standard health service,
//! `grpc.health.v1.Health/Check` with an empty service name (the server as a whole), on a fresh
//! HTTP/2 connection — h2c, or TLS with ALPN h2 for a pool with `protocol = "h2"` — judged by
//! the answer: healthy only for `SERVING` with `grpc-status: 0`.
//!
//! Like the HTTP check, every check opens its own connection and closes it, so it says whether
//! the server still accepts new connections, and it runs under one deadline within its own
//! future. The request and the one-field answer are encoded by hand (five bytes of gRPC framing
//! and a protobuf varint): a protobuf library for one enum would be all cost.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Uri};
use keel_cluster::model;
use tokio::time::{timeout_at, Instant};

use super::{CheckError, HealthCheck};
use crate::proxy::h2_client;
use crate::tls::UpstreamTls;

/// The health service's method.
const PATH: &str = "/grpc.health.v1.Health/Check";
/// An empty `HealthCheckRequest` (service ""), framed: not compressed, length 0.
const REQUEST: &[u8] = &[0, 0, 0, 0, 0];
/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// Largest answer read: the real one is 7 bytes.
const MAX_ANSWER: usize = 1024;

/// Checks a server with `grpc.health.v1.Health/Check`.
#[derive(Clone, Debug)]
pub struct GrpcHealthCheck {
    /// The configured `host` as `:authority`; the server's address when absent.
    host: Option<String>,
    tls: Option<Arc<UpstreamTls>>,
    timeout: Duration,
}

impl GrpcHealthCheck {
    /// A check as configured, over the pool's TLS when it has one.
    pub fn new(config: &model::HealthCheck, tls: Option<Arc<UpstreamTls>>) -> Self {
        Self { host: config.host.clone(), tls, timeout: config.timeout.get() }
    }

    async fn exchange(&self, address: SocketAddr, named: Option<&str>, deadline: Instant) -> Result<(), CheckError> {
        let mut send = timeout_at(deadline, h2_client::connect_once(address, self.tls.as_ref()))
            .await
            .map_err(|_| CheckError::ConnectTimeout(self.timeout))?
            .map_err(CheckError::Connect)?;
        let authority = match (&self.host, named) {
            (Some(h), _) => h.clone(),
            (None, Some(name)) => name.to_owned(),
            (None, None) => address.to_string(),
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = Uri::try_from(format!("{scheme}://{authority}{PATH}"))
            .map_err(|e| CheckError::InvalidRequest(format!("host {authority:?}: {e}")))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, super::http::USER_AGENT_VALUE)
            .body(())
            .map_err(|e| CheckError::InvalidRequest(e.to_string()))?;
        let work = async {
            poll_fn(|cx| send.poll_ready(cx)).await.map_err(grpc_error)?;
            let (response, mut stream) = send.send_request(request, false).map_err(grpc_error)?;
            stream.send_data(Bytes::from_static(REQUEST), true).map_err(grpc_error)?;
            let response = response.await.map_err(grpc_error)?;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(CheckError::BadStatus { status, expected: model::StatusRange { min: 200, max: 200 } });
            }
            // A trailers-only answer carries its grpc-status in the head.
            let (head, mut body) = response.into_parts();
            let mut answer = BytesMut::new();
            while let Some(data) = body.data().await {
                let data = data.map_err(grpc_error)?;
                let _ = body.flow_control().release_capacity(data.len());
                answer.extend_from_slice(&data);
                if answer.len() > MAX_ANSWER {
                    return Err(CheckError::Grpc("answer too large".into()));
                }
            }
            let trailers = body.trailers().await.map_err(grpc_error)?;
            let grpc_status =
                trailers.as_ref().and_then(|t| t.get("grpc-status")).or_else(|| head.headers.get("grpc-status"));
            if grpc_status.map(HeaderValue::as_bytes) != Some(b"0") {
                let shown = grpc_status.and_then(|v| v.to_str().ok()).unwrap_or("missing");
                return Err(CheckError::Grpc(format!("grpc-status {shown}")));
            }
            match serving_status(answer.freeze()) {
                Some(SERVING) => Ok(()),
                Some(other) => Err(CheckError::Grpc(format!("not SERVING (status {other})"))),
                None => Err(CheckError::Grpc("invalid HealthCheckResponse".into())),
            }
        };
        match timeout_at(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(CheckError::Timeout(self.timeout)),
        }
    }
}

fn grpc_error(e: h2::Error) -> CheckError {
    CheckError::Grpc(e.to_string())
}

/// The `status` field (1, varint) of one framed, uncompressed `HealthCheckResponse`; 0
/// (`UNKNOWN`) when the message leaves it out; `None` for anything malformed.
fn serving_status(mut framed: Bytes) -> Option<u64> {
    if framed.len() < 5 || framed[0] != 0 {
        return None;
    }
    framed.advance(1);
    let len = framed.get_u32() as usize;
    if framed.len() != len {
        return None;
    }
    let mut status = 0;
    while framed.has_remaining() {
        let key = varint(&mut framed)?;
        match key & 7 {
            0 => {
                let v = varint(&mut framed)?;
                if key >> 3 == 1 {
                    status = v;
                }
            }
            2 => {
                let n = usize::try_from(varint(&mut framed)?).ok()?;
                if framed.len() < n {
                    return None;
                }
                framed.advance(n);
            }
            1 if framed.len() >= 8 => framed.advance(8),
            5 if framed.len() >= 4 => framed.advance(4),
            _ => return None,
        }
    }
    Some(status)
}

fn varint(b: &mut Bytes) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return None;
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

impl HealthCheck for GrpcHealthCheck {
    async fn check(&self, address: SocketAddr) -> Result<(), CheckError> {
        self.exchange(address, None, Instant::now() + self.timeout).await
    }

    async fn check_named(&self, address: SocketAddr, host: Option<&str>) -> Result<(), CheckError> {
        self.exchange(address, host, Instant::now() + self.timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_answers_decode_to_their_status() {
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x01])), Some(SERVING));
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 2, 0x08, 0x02])), Some(2));
        // An empty message is UNKNOWN; unknown fields are skipped.
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 0])), Some(0));
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 5, 0x12, 0x01, b'x', 0x08, 0x01])), Some(1));
        // Compressed, truncated or garbage: not an answer.
        assert_eq!(serving_status(Bytes::from_static(&[1, 0, 0, 0, 2, 0x08, 0x01])), None);
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 3, 0x08, 0x01])), None);
        assert_eq!(serving_status(Bytes::from_static(&[0, 0, 0, 0, 1, 0x08])), None);
        assert_eq!(serving_status(Bytes::new()), None);
    }
}
