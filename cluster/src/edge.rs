//! Settings of the edge, where keel meets clients it does not trust: TLS, per-client rate
//! limits, and the protection limits every HTTP listener enforces.
//!
//! Kept apart from [`crate::model`] because these are the knobs an operator tunes against abuse,
//! each with a safe default: a listener that says nothing about limits is still protected.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;

/// Lowest TLS version a listener accepts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// TLS termination on an `https` listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificate/key pairs; the one whose names match the client's SNI is used, and the
    /// first is the default for clients that send no SNI or an unknown name.
    pub certificates: Vec<CertificateFiles>,
    /// Lowest protocol version accepted.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Offer HTTP/2 through ALPN (`h2`), besides `http/1.1`.
    #[serde(default = "yes")]
    pub http2: bool,
}

/// A PEM certificate chain and its private key (RSA, ECDSA or Ed25519; PKCS#8, PKCS#1 or SEC1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// TLS from keel to a pool's servers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// CA bundle (PEM) that server certificates must chain to; the system roots when absent.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Name sent as SNI and verified against the server certificate; the server's IP address
    /// when absent.
    #[serde(default)]
    pub server_name: Option<String>,
}

/// PROXY protocol header sent to servers of a TCP pool, so they learn the client's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    /// The human-readable v1 header.
    V1,
    /// The binary v2 header.
    V2,
}

/// A token bucket per client: `rate` requests per `per`, bursts up to `burst`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per `per`, sustained.
    pub rate: u32,
    /// The period `rate` counts over.
    #[serde(default = "one_second")]
    pub per: HumanDuration,
    /// Requests a client may send at once after being idle; `rate` when absent.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Key clients by this header's value (e.g. "x-api-key") instead of their IP address;
    /// requests without the header are keyed by IP.
    #[serde(default)]
    pub header: Option<String>,
    /// Most clients tracked at once. Beyond it the least recently seen are forgotten, so a
    /// flood of distinct addresses costs bounded memory.
    #[serde(default = "default_max_clients")]
    pub max_clients: u32,
}

impl RateLimit {
    /// The burst size in effect.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.rate)
    }
}

/// Protection limits of an HTTP listener. Every one has a safe default.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent client connections on this listener; beyond it new ones are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Concurrent connections from one client IP address.
    #[serde(default = "default_max_connections_per_client")]
    pub max_connections_per_client: u32,
    /// Time a client has to send a complete request head (slowloris guard).
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Longest pause allowed while a request body is being received; also the grace period
    /// before `min_body_rate` applies.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: HumanDuration,
    /// Slowest average body upload accepted, in bytes per second (0 = no minimum).
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: u32,
    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u32,
    /// Most headers in one request.
    #[serde(default = "default_max_headers")]
    pub max_headers: u32,
    /// Largest request body, in bytes; larger gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Request bodies up to this many bytes (declared by `Content-Length`, or chunked bodies
    /// that end within it) are read whole, under the body limits above, before a server is
    /// chosen; larger ones stream. 0 = always stream (nginx's `proxy_request_buffering off`).
    #[serde(default = "default_request_buffer")]
    pub request_buffer: u64,
    /// How long an idle keep-alive connection is kept open.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Requests served on one connection before keel closes it (0 = unlimited).
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: default_max_connections(),
            max_connections_per_client: default_max_connections_per_client(),
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            min_body_rate: default_min_body_rate(),
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_body_bytes: default_max_body_bytes(),
            request_buffer: default_request_buffer(),
            idle_timeout: default_idle_timeout(),
            max_requests_per_connection: default_max_requests_per_connection(),
        }
    }
}

/// Smallest `max_header_bytes` accepted: hyper's own floor for its read buffer.
pub const MIN_HEADER_BYTES: u32 = 8192;

/// Largest `request_buffer` accepted: a buffered body is held in memory, once per request in
/// flight, so a few thousand uploads at this size are already gigabytes.
pub const MAX_REQUEST_BUFFER: u64 = 16 * 1024 * 1024;

fn yes() -> bool {
    true
}
fn one_second() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_max_clients() -> u32 {
    100_000
}
fn default_max_connections() -> u32 {
    10_000
}
fn default_max_connections_per_client() -> u32 {
    256
}
fn default_header_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_body_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_min_body_rate() -> u32 {
    1024
}
fn default_max_header_bytes() -> u32 {
    64 * 1024
}
fn default_max_headers() -> u32 {
    100
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_request_buffer() -> u64 {
    64 * 1024
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_max_requests_per_connection() -> u32 {
    1000
}
