//! keepalived side by side, bounded for CI: a keepalived pair (advert 1 s, then 100 ms) in the
//! same lab, with the same probe and monitor, gets two SIGKILLs of its master and one link cut
//! each; the figures are printed next to nothing but themselves (the keel figures come from
//! `tests/ci.rs` and the `chaos` binary). Only the lab working is asserted — never keepalived's
//! outage or overlap: it is the reference, not the subject.
//!
//! Gated like the other netns tests (`KEEL_NETNS_TESTS=1` as root); `.ci/run` installs
//! keepalived, so with the gate on a missing keepalived is a failure, not a skip.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_chaos::keepalived::{self, Pair};
use keel_chaos::lab::{Bins, Lab, LabSpec};
use keel_chaos::report::{side_by_side, summary};

const SEED: u64 = 0x6b61_6c76;
const KILLS: usize = 2;
const WALL_BOUND: Duration = Duration::from_secs(240);

#[test]
fn keepalived_pair_side_by_side() {
    if !keel_chaos::netns_tests_enabled("keepalived_pair_side_by_side") {
        return;
    }
    let bin = keepalived::find().expect("keepalived not on PATH (apt-get install keepalived; .ci/run does)");
    println!("{}", keepalived::describe(&bin));
    let started = Instant::now();
    let mut runs = Vec::new();
    for advert_ms in [1000, 100] {
        let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
        let spec = LabSpec {
            nodes: 2,
            witness_last: false,
            backends: 1,
            cluster_extra: String::new(),
            witness_extra: String::new(),
            spread: Vec::new(),
            sticky: None,
        };
        let mut lab = Lab::build(&spec, bins).unwrap();
        let pair = Pair { bin: bin.clone(), advert_ms };
        let dump = |lab: &Lab, e: String| -> ! {
            for i in 0..lab.nodes.len() {
                eprintln!("--- node {} log tail ---\n{}", i + 1, lab.log_tail(i, 30));
            }
            panic!("{}: {e}", pair.name())
        };
        if let Err(e) = pair.start(&mut lab) {
            dump(&lab, e);
        }
        let mut rng = fastrand::Rng::with_seed(SEED);
        for k in 1..=KILLS {
            match keepalived::kill_master(&mut lab, &pair, k, &mut rng) {
                Ok(r) => runs.push(r),
                Err(e) => dump(&lab, e),
            }
        }
        match keepalived::cut_master(&mut lab, &pair, 1, &mut rng) {
            Ok(r) => runs.push(r),
            Err(e) => dump(&lab, e),
        }
        assert!(started.elapsed() < WALL_BOUND, "over the wall-time bound");
    }
    print!("{}", summary(&runs));
    print!("{}", side_by_side(&[("keepalived (reference)", &runs)]));
}
