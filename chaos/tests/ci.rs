//! The bounded chaos pass CI runs: on a 3-node lab, 5 SIGKILLs of the leader, 1 partition of
//! the leader (cut + heal), 1 rolling restart (the leader's stop is a hand-over: no new
//! connection may fail; one already in flight across the ARP switch is tolerated, below) and 1
//! removal + reset + re-join of a follower, with a fixed seed. Fails on any split-brain
//! sample, any failover over 3 s, any committed state (weight, drain, health verdict, commit
//! index) missing after a fault, or any request served by a drained/dead backend.
//!
//! Gated: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it); needs `target/debug/keel`
//! (or `KEEL_BIN`), which `.ci/run` builds first.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_chaos::lab::{Bins, Lab, LabSpec};
use keel_chaos::report::{overlap, summary};
use keel_chaos::scenario;

const SEED: u64 = 0x6b65_656c;
const KILLS: usize = 5;
const MAX_FAILOVER_MS: u64 = 3000;
const WALL_BOUND: Duration = Duration::from_secs(360);

fn dump_logs(lab: &Lab) {
    for i in 0..lab.nodes.len() {
        eprintln!("--- node {} log tail ---\n{}", i + 1, lab.log_tail(i, 30));
    }
}

#[test]
fn chaos_ci_pass() {
    if !keel_chaos::netns_tests_enabled("chaos_ci_pass") {
        return;
    }
    let started = Instant::now();
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let mut lab = Lab::build(
        &LabSpec {
            nodes: 3,
            witness_last: false,
            backends: 3,
            cluster_extra: String::new(),
            witness_extra: String::new(),
            spread: Vec::new(),
            sticky: None,
        },
        bins,
    )
    .unwrap();
    let t_start = keel_chaos::http::now_ms();
    if let Err(e) = lab.form_cluster() {
        dump_logs(&lab);
        panic!("forming the cluster: {e}");
    }
    let committed = scenario::commit_state(&mut lab).unwrap_or_else(|e| {
        dump_logs(&lab);
        panic!("committing state: {e}")
    });
    println!("cluster formed and state committed in {:.1}s", started.elapsed().as_secs_f64());
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut runs = Vec::new();
    let mut step = |name: &str, r: Result<Vec<keel_chaos::report::Run>, String>, lab: &Lab| match r {
        Ok(v) => {
            for run in &v {
                println!("{run}");
            }
            runs.extend(v);
        }
        Err(e) => {
            dump_logs(lab);
            panic!("{name}: {e}");
        }
    };
    for k in 1..=KILLS {
        let r = scenario::kill_leader(&mut lab, k, &mut rng, &committed).map(|r| vec![r]);
        step("kill", r, &lab);
        assert!(started.elapsed() < WALL_BOUND, "over the wall-time bound");
    }
    let r = scenario::partition(&mut lab, 1, &mut rng, &committed).map(|r| vec![r]);
    step("partition", r, &lab);
    let r = scenario::rolling_restart(&mut lab, 1, &committed);
    step("rolling", r, &lab);
    let r = scenario::remove_rejoin(&mut lab, 1, &committed).map(|r| vec![r]);
    step("remove", r, &lab);

    let total = overlap(&lab.samples(), t_start, keel_chaos::http::now_ms());
    let excluded = scenario::served_by_excluded(&lab, &committed);
    println!("{}", summary(&runs));
    println!(
        "whole pass: {} monitor samples, {} certain / {} possible overlap samples, {} probes, {} served by drained/dead backends, {:.1}s",
        total.samples,
        total.certain,
        total.possible,
        lab.probes().len(),
        excluded,
        started.elapsed().as_secs_f64()
    );
    let mut problems: Vec<String> =
        runs.iter().flat_map(|r| r.problems.iter().map(move |p| format!("{} {}: {p}", r.scenario, r.run))).collect();
    // One request that was already connected when the clients' ARP entries moved to the new
    // holder may be reset (its next packet reaches a node that never saw the connection):
    // moving a VIP at L2 cannot carry a connection across. A debug build on a loaded CI box
    // keeps each probe in flight for milliseconds, so it happens here now and then (release
    // runs of `chaos --scenario rolling`: 0 in 30 hand-overs). Only that signature, a reset, is
    // let through, once: a lost SYN or a read timeout (a gap, or an address deleted under a
    // connection), a second failure, or any other problem still fails the pass.
    let caught_mid_flight = |p: &String| {
        p.starts_with("rolling ") && p.contains("during the hand-over") && p.contains("read: Connection reset by peer")
    };
    if problems.iter().filter(|p| caught_mid_flight(p)).count() == 1 {
        println!("tolerated: one connection caught mid-flight by the hand-over's ARP switch");
        problems.retain(|p| !caught_mid_flight(p));
    }
    if total.certain > 0 {
        println!("{}", keel_chaos::report::overlap_detail(&lab.samples(), t_start, keel_chaos::http::now_ms()));
        lab.dump_logs(60);
    }
    assert_eq!(total.certain, 0, "split brain: two nodes held the VIP");
    for r in &runs {
        let o = r.outage_ms.unwrap_or(u64::MAX);
        assert!(o < MAX_FAILOVER_MS, "{} {}: failover {o} ms >= {MAX_FAILOVER_MS} ms", r.scenario, r.run);
    }
    assert_eq!(excluded, 0, "requests served by a drained or dead backend");
    assert!(problems.is_empty(), "problems:\n{}", problems.join("\n"));
    assert!(started.elapsed() < WALL_BOUND, "over the wall-time bound");
}
