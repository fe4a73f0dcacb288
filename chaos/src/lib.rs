//! keel-chaos injects faults into a network-namespace lab of real keel nodes — SIGKILL of the
//! leader, cut links, rolling restarts — while a client probes the VIP every 10 ms and a
//! monitor samples every node's addresses every 10 ms, and asserts on failover time, split
//! brain and lost state.
//!
//! - [`lab`]: builds the lab (namespaces with a per-run unique prefix, bridge, backends, keel
//!   nodes, prober, monitor) and tears it down on drop.
//! - [`scenario`]: the faults — [`scenario::kill_leader`], [`scenario::partition`],
//!   [`scenario::rolling_restart`], [`scenario::lose_witness`], and for spread VIPs
//!   [`scenario::spread_round`].
//! - [`report`]: outage percentiles and the split-brain analysis.
//! - [`keepalived`]: the same faults against a keepalived pair, for figures side by side.
//! - [`http`]: the tiny HTTP client/server the helper binary uses.
//!
//! Binaries: `chaos-probe` (runs inside namespaces: backend, prober, VIP watcher, admin calls)
//! and `chaos` (the full run with figures; see the README). The CI pass is the integration
//! test `tests/ci.rs`, run only with `KEEL_NETNS_TESTS=1` as root.

pub mod http;
pub mod keepalived;
pub mod lab;
pub mod report;
pub mod scenario;

/// The gate of the netns tests: true with `KEEL_NETNS_TESTS=1` as root; prints "skipped" and
/// returns false without the variable.
///
/// # Panics
///
/// With `KEEL_NETNS_TESTS=1` but not root: CI asked for these tests, so not being able to run
/// them is a failure, not a skip.
pub fn netns_tests_enabled(test: &str) -> bool {
    let wanted = std::env::var("KEEL_NETNS_TESTS").is_ok_and(|v| v == "1");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")).map(|u| u.split_whitespace().next() == Some("0")))
        .unwrap_or(false);
    if wanted && !root {
        panic!("{test}: KEEL_NETNS_TESTS=1 but not running as root");
    }
    if !wanted {
        println!("{test}: skipped: set KEEL_NETNS_TESTS=1 as root");
    }
    wanted
}
