//! The VIP as a kernel lease: a holder SIGKILLed with no stop hook to clean up after it loses
//! the address by itself, within the address's lifetime (`[vip] lifetime`, 2 s by default)
//! after its last renewal, while the cluster has already moved the VIP elsewhere.
//!
//! Gated like the other lab tests: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_chaos::lab::{Bins, Lab};

/// `[vip] lifetime`'s default.
const LIFETIME: Duration = Duration::from_secs(2);

#[test]
fn a_killed_holder_loses_the_vip_within_its_lifetime_without_a_stop_hook() {
    if !keel_chaos::netns_tests_enabled("kernel_lease") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (mut lab, leader) = Lab::three_nodes(bins, 1).unwrap();
    assert!(lab.vip_on(leader));
    lab.kill_without_hook(leader).unwrap();
    let killed = Instant::now();
    // Nothing deletes it: no keel runs in that namespace any more.
    let deadline = LIFETIME + Duration::from_millis(800);
    while lab.vip_on(leader) {
        assert!(killed.elapsed() < deadline, "the dead holder still has the VIP {:?} after the kill", killed.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone = killed.elapsed();
    println!(
        "the SIGKILLed holder's VIP expired {gone:?} after the kill (lifetime {LIFETIME:?}, renewed every 500 ms)"
    );
    // The cluster moved on meanwhile.
    let next = lab.wait_stable(Duration::from_secs(20)).unwrap();
    assert_ne!(next, leader);
}
