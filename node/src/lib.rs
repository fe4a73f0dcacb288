//! keel's data plane and daemon: everything a node runs besides the replicated state and the VIP.
//!
//! # Layout
//!
//! - [`config`]: the node's TOML file → its own settings plus a validated
//!   [`keel_cluster::Config`]; errors name the file, line and key.
//! - [`balance`]: the [`balance::Selector`] trait and one file per algorithm.
//! - [`pool`]: a pool at run time — its servers' live state (health, drain, ejection,
//!   in-flight count, counters), its selector, its connection pool to the servers.
//! - [`snapshot`]: the routing table built from a config; the proxy reads it with one atomic
//!   load per request, and a reload swaps it without touching open connections.
//! - [`resolve`]: servers given by DNS name — resolved at start and every `resolve_interval`,
//!   each address a server of the pool; a changed answer triggers a snapshot rebuild.
//! - [`routing`]: first-match routing by host, path prefix and header.
//! - [`slow_start`]: the weight ramp of a server back in rotation (HAProxy's `slowstart`).
//! - [`health`]: active checks (HTTP, TCP) with rise/fall hysteresis, and passive outlier
//!   detection.
//! - [`sticky`]: sticky sessions — inserted cookie, source IP or learned session id — and the
//!   stores their bindings live in (local memory, the Raft table through a batcher, Redis).
//! - [`ratelimit`]: per-client token buckets (GCRA) in a fixed-size table, for `rate_limit`.
//! - [`connlimit`]: a listener's connection caps, total and per client IP, as RAII permits.
//! - [`tls`]: certificate store and SNI resolver of `https` listeners; TLS connector to servers.
//! - [`proxy`]: listeners, the HTTP/1.1 + h2c front end, forwarding, retries, upgrades.
//! - [`metrics`]: metric names and the Prometheus rendering of the atomics the data plane bumps.
//! - [`admin`]: the admin HTTP API (`/status`, `/metrics`, drain/enable, sign-in).
//! - [`dashboard`]: the live page on the admin address and the one sampler behind it.
//! - [`events`]: the recent-events ring the dashboard lists (health, VIP, elections, reloads).
//! - [`demo`]: the self-contained demo: three named backends and a balancer.
//! - [`cli`]: the operations commands (`keel cluster …`, `keel config apply`, `keel backend …`).
//! - [`daemon`]: wiring for `keel run`: load config, start everything, shut down gracefully.
//!
//! The binary (`main.rs`) parses argv and installs the tracing subscriber; nothing else does.

pub mod admin;
pub mod balance;
pub mod cli;
pub mod config;
pub mod connlimit;
pub mod daemon;
pub mod dashboard;
pub mod demo;
pub mod events;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod resolve;
pub mod routing;
pub mod slow_start;
pub mod snapshot;
pub mod sticky;
pub mod tls;

/// This binary's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit it was built from (`build.rs`; "unknown" outside a git checkout).
pub const COMMIT: &str = env!("KEEL_GIT_COMMIT");
