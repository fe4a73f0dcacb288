//! Scenario 4: an active/passive pair plus a witness. SIGKILL the active node (the passive one
//! must take the VIP), then SIGKILL the witness (the active node must keep the VIP: 2 of 3
//! voters remain). Three rounds, fixed seed.
//!
//! This caught a witness winning the election after the active node died (a witness never holds
//! the VIP, so nobody did). A witness now never stands by timer and runs the data nodes' lease,
//! so the surviving data node gets its vote as soon as its own election timer fires: a pair
//! fails over as fast as three data nodes (it used to take ≈ 0.8–1.0 s while the witness ran 4×
//! longer timers, lease included). Run it alone with `KEEL_NETNS_TESTS=1 cargo test -p keel-chaos --test pair -- --nocapture`.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;

use keel_chaos::lab::{Bins, Lab, LabSpec};
use keel_chaos::report::summary;
use keel_chaos::scenario;

const SEED: u64 = 0x7061_6972;
const ROUNDS: usize = 3;

#[test]
fn chaos_pair_with_witness() {
    if !keel_chaos::netns_tests_enabled("chaos_pair_with_witness") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let mut lab = Lab::build(
        &LabSpec {
            nodes: 3,
            witness_last: true,
            backends: 3,
            cluster_extra: String::new(),
            witness_extra: String::new(),
            spread: Vec::new(),
            sticky: None,
        },
        bins,
    )
    .unwrap();
    lab.form_cluster().unwrap();
    let committed = scenario::commit_state(&mut lab).unwrap();
    let mut rng = fastrand::Rng::with_seed(SEED);
    let mut runs = Vec::new();
    for k in 1..=ROUNDS {
        let mut r = scenario::kill_leader(&mut lab, k, &mut rng, &committed).unwrap_or_else(|e| {
            for i in 0..lab.nodes.len() {
                eprintln!("--- node {} ---\n{}", i + 1, lab.log_tail(i, 20));
            }
            panic!("round {k}: losing the active node: {e}")
        });
        r.scenario = "pair-kill".into();
        println!("{r}");
        runs.push(r);
        let w = scenario::lose_witness(&mut lab, k, &committed).unwrap();
        println!("{w}");
        runs.push(w);
    }
    println!("{}", summary(&runs));
    for r in &runs {
        assert_eq!(r.overlap, 0, "{r}");
        assert!(r.outage_ms.is_some_and(|o| o < 3000), "{r}");
        assert!(r.problems.is_empty(), "{r}");
    }
}
