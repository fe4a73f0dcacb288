//! The black-box test harness for keel: everything a test needs to run a real `keel` process
//! against real backends over real loopback sockets, and nothing that peeks inside keel.
//!
//! It owns:
//! - [`backend`]: [`Backend`], an in-process hyper HTTP/1.1 + h2c server with a name, health
//!   switch, slow/status/echo/WebSocket/streaming endpoints and a request log; stopping it closes
//!   the listener and every open connection, so it is as dead as a crashed server.
//!   [`backend::Blackhole`] accepts connections and drops them without answering.
//! - [`dns`]: [`dns::DnsServer`], a tiny authoritative DNS server on loopback UDP whose answers
//!   (A records, SERVFAIL, NXDOMAIN, silence) a test changes at run time.
//! - [`ports`]: free loopback ports for keel's listeners.
//! - [`keel`]: [`Keel`], a running `keel run` process with a generated config ([`KeelBuilder`],
//!   [`PoolSpec`]), its captured log, its admin API and signal/exit handling; it is killed on
//!   drop, so a panicking test leaves no process behind. Also [`keel::keel_command`] for the
//!   one-shot subcommands (`config check`) and [`keel::Demo`] for `keel demo`.
//! - [`client`]: an HTTP client returning status, headers and body ([`Reply`]), over keep-alive,
//!   fresh per-request connections, or h2c; and raw TCP exchanges for hostile input.
//! - [`tls`]: a test CA made at test time ([`tls::TestCa`]), leaf certificates written as PEM
//!   files, rustls clients that show which certificate/ALPN/version a server chose, and
//!   HTTP/1.1 or HTTP/2 over any stream ([`tls::HttpConn`]). [`Backend::start_tls`] is a TLS
//!   backend.
//! - [`raw`]: TCP echo/recording servers for TCP listeners ([`raw::TcpServer`]), a hand-written
//!   HTTP/1.1 backend recording every byte it receives and answering as a test scripts it
//!   ([`raw::RawHttpBackend`]), and a raw client connection with deadlines ([`raw::RawConn`]).
//! - [`exchange`]: one request described once ([`exchange::Req`]) and sent as hand-written
//!   HTTP/1.1 or through hyper's h2c client, with the response in one shape for both
//!   ([`exchange::Resp`]), for the differential test of keel's two front ends.
//! - [`grpc`]: a real gRPC server ([`grpc::GrpcServer`], h2c or TLS, unary and streaming
//!   methods, the standard health service, cancellation counted) and client
//!   ([`grpc::GrpcClient`], tonic), with raw-bytes messages: no protoc, no prost.
//! - [`wait`]: [`wait_until`]/[`wait_for`] polling with a deadline, and the named deadlines
//!   every test uses instead of bare sleeps.
//! - [`tempdir`]: a scratch directory removed on drop (kept when a test fails).
//! - [`cluster`]: [`Cluster`], N `keel` processes forming one Raft cluster (node files, data
//!   dirs, SIGKILL and restart, the `keel cluster`/`keel config` CLI, `/cluster/*`).
//! - [`redis`]: [`redis::Redis`], a real `redis-server` on a free port for the sticky store.
//! - [`browser`]: [`browser::Browser`], a real headless Chromium driven over the DevTools
//!   protocol, for the dashboard.
//!
//! Tests run in parallel (nextest runs each test as its own process): nothing here uses a fixed
//! port. Loops are bounded by count and time.
//!
//! The keel binary is not built by this crate: run `cargo build -p keel-node` first, or point
//! `KEEL_BIN` at a binary.

pub mod backend;
pub mod browser;
pub mod client;
pub mod cluster;
pub mod dns;
pub mod exchange;
pub mod grpc;
pub mod keel;
pub mod ports;
pub mod raw;
pub mod redis;
pub mod tempdir;
pub mod tls;
pub mod wait;

pub use backend::Backend;
pub use client::{Client, Reply};
pub use cluster::{Cluster, ClusterBuilder};
pub use keel::{Keel, KeelBuilder, PoolSpec};
pub use wait::{wait_for, wait_until};

/// Counts how many replies came from each backend name, in first-seen order.
pub fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.to_owned()).or_insert(0) += 1;
    }
    m
}
