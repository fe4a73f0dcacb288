//! A leader whose Raft thread stalls longer than the lease (a test-only failpoint blocks it for
//! 800 ms, as building a 24 MB snapshot on it did) must let the VIP go by the lease deadline —
//! from the VIP's own thread — so that when the others elect a new holder there is no instant
//! with two. Before the lease became a deadline on its own thread, the stalled leader kept the
//! VIP for the whole stall while another node took it.
//!
//! Gated like the other lab tests: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::Duration;

use keel_chaos::http::now_ms;
use keel_chaos::lab::{Bins, Lab};
use keel_chaos::report::overlap;

/// How long the failpoint blocks the leader's Raft thread.
const STALL_MS: u64 = 800;
/// The default profile's lease (election max).
const LEASE_MS: u64 = 150;

#[test]
fn a_stalled_raft_thread_releases_the_vip_by_the_lease_deadline() {
    if !keel_chaos::netns_tests_enabled("raft_stall") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (lab, leader) = Lab::three_nodes(bins, 1).unwrap();
    let url = format!("{}/debug/stall-raft?ms={STALL_MS}", lab.nodes[leader].admin());
    let t0 = now_ms();
    let (status, body) = lab.request("POST", &url, Some("{}")).unwrap();
    assert_eq!(status, 200, "failpoint: {body}");
    std::thread::sleep(Duration::from_millis(STALL_MS + 300));
    let after = lab.wait_stable(Duration::from_secs(20)).unwrap_or_else(|e| {
        lab.dump_logs(30);
        panic!("after the stall: {e}")
    });
    let t1 = now_ms();
    let samples = lab.samples();
    let o = overlap(&samples, t0, t1);
    let released = samples[leader].iter().find(|(t, held)| *t >= t0 && !held).map(|(t, _)| t - t0);
    println!(
        "stall {STALL_MS} ms on node {}: VIP released after {released:?} ms; holder afterwards node {}; \
         {} monitor samples, {} certain / {} possible overlap",
        leader + 1,
        after + 1,
        o.samples,
        o.certain,
        o.possible
    );
    if o.certain != 0 {
        lab.dump_logs(30);
    }
    assert_eq!(o.certain, 0, "two nodes held the VIP while the leader's raft thread was stalled");
    let released = released.expect("the stalled leader never released the VIP");
    assert!(released < LEASE_MS + 250, "released {released} ms into a {STALL_MS} ms stall (lease {LEASE_MS} ms)");
}
