//! The VIP as a kernel lease: a holder SIGKILLed with no stop hook to clean up after it loses
//! the address by itself, within the address's lifetime (`[vip] lifetime`, 2 s by default)
//! after its last renewal, while the cluster has already moved the VIP elsewhere; a holder
//! frozen whole (SIGSTOP) loses it the same way, and once thawed it follows without claiming.
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

#[test]
fn a_frozen_holder_loses_the_vip_within_its_lifetime_and_thaws_as_a_follower() {
    if !keel_chaos::netns_tests_enabled("kernel_lease (SIGSTOP)") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (lab, leader) = Lab::three_nodes(bins, 1).unwrap();
    assert!(lab.vip_on(leader));
    lab.signal(leader, "STOP").unwrap();
    let frozen = Instant::now();
    // The process cannot release anything: only the kernel's lifetime can.
    let deadline = LIFETIME + Duration::from_millis(800);
    while lab.vip_on(leader) {
        if frozen.elapsed() >= deadline {
            let _ = lab.signal(leader, "CONT");
            panic!("the frozen holder still has the VIP {:?} after SIGSTOP", frozen.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone = frozen.elapsed();
    println!("the SIGSTOPped holder's VIP expired {gone:?} after the freeze (lifetime {LIFETIME:?})");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !others.iter().any(|&i| lab.vip_on(i)) {
        assert!(Instant::now() < deadline, "no other node took the VIP while the holder was frozen");
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.signal(leader, "CONT").unwrap();
    // Thawed, it finds a newer term and follows; it must not claim again.
    let next = lab.wait_stable(Duration::from_secs(20)).unwrap();
    assert_ne!(next, leader, "the thawed node took leadership back");
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        assert!(!lab.vip_on(leader), "the thawed node claimed the VIP again");
        std::thread::sleep(Duration::from_millis(20));
    }
}
