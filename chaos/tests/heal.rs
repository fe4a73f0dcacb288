//! Pre-vote: a follower cut off from the others for 5 s, then healed, comes back with the term
//! it left with. It asked for pre-votes while cut off, got none, and never stood, so the healthy
//! leader keeps its leadership, its term and the VIP (before pre-vote its term climbed by one
//! per attempt and the heal deposed the leader).
//!
//! Gated like the other lab tests: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_chaos::http::now_ms;
use keel_chaos::lab::{Bins, Lab};
use keel_chaos::report::overlap;

/// How long the follower is cut off.
const CUT: Duration = Duration::from_secs(5);

/// Each running node's (leader, term) from `/cluster/status`.
fn views(lab: &Lab) -> Vec<(usize, Option<u64>, Option<u64>)> {
    (0..lab.nodes.len())
        .map(|i| {
            let s = lab.admin_json(i, "/cluster/status").ok();
            let leader = s.as_ref().and_then(|s| s["leader_id"].as_u64());
            let term = s.as_ref().and_then(|s| s["term"].as_u64());
            (i, leader, term)
        })
        .collect()
}

#[test]
fn a_healed_follower_deposes_no_one() {
    if !keel_chaos::netns_tests_enabled("heal") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (lab, leader) = Lab::three_nodes(bins, 1).unwrap();
    let leader_id = lab.nodes[leader].id;
    let before = views(&lab);
    let term = before[leader].2.unwrap();
    let follower = (0..3).find(|&i| i != leader).unwrap();

    let t0 = now_ms();
    lab.link(follower, false).unwrap();
    std::thread::sleep(CUT); // the scenario: a cut of this length
    lab.link(follower, true).unwrap();
    // Wait for the healed follower to follow the same leader again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = views(&lab);
        if v[follower].1 == Some(leader_id) {
            break;
        }
        if Instant::now() > deadline {
            lab.dump_logs(30);
            panic!("the healed follower does not follow node {leader_id}: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let stable = lab.wait_stable(Duration::from_secs(10)).unwrap();
    let after = views(&lab);
    println!("cut node {} for {CUT:?}: before {before:?}, after {after:?}", follower + 1);
    let o = overlap(&lab.samples(), t0, now_ms());
    if stable != leader || after.iter().any(|(_, l, t)| *l != Some(leader_id) || *t != Some(term)) {
        lab.dump_logs(30);
    }
    assert_eq!(stable, leader, "the VIP moved: node {} holds it now", stable + 1);
    for (i, l, t) in &after {
        assert_eq!(*l, Some(leader_id), "node {} follows {l:?}, not node {leader_id}", i + 1);
        assert_eq!(*t, Some(term), "node {}'s term moved from {term} to {t:?}", i + 1);
    }
    assert_eq!(o.certain, 0, "two VIP holders during the cut and heal");
}
