//! Spread VIPs (`[vip] addresses`) on the netns lab: three VIPs on three nodes, a prober per
//! VIP. Killing a holder moves its VIP within the single VIP's failover time while the other
//! VIPs fail no request; no two nodes ever carry one VIP.
//!
//! Gated like the other lab tests: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_chaos::http::now_ms;
use keel_chaos::lab::{Bins, Lab};
use keel_chaos::report::overlap;

/// The single VIP's failover bound (default profile p99), which a spread VIP must keep.
const FAILOVER_BOUND_MS: u64 = 200;

#[test]
fn three_vips_spread_over_three_nodes_and_a_killed_holders_vip_moves_alone() {
    if !keel_chaos::netns_tests_enabled("spread") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (mut lab, holders) = Lab::three_spread(bins, "").unwrap();
    let mut nodes: Vec<usize> = holders.values().copied().collect();
    nodes.sort_unstable();
    assert_eq!(nodes, vec![0, 1, 2], "not one VIP per node: {holders:?}");

    // Kill a follower's VIP holder (the leader's case is the other test).
    let leader = lab.leaders().values().next().copied().flatten().unwrap();
    let (&vip, &victim) = holders.iter().find(|(_, h)| lab.nodes[**h].id != leader).unwrap();
    let t0 = lab.kill(victim).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let moved = loop {
        if let [h] = lab.spread_holders_now(vip).as_slice() {
            if *h != victim {
                break *h;
            }
        }
        assert!(Instant::now() < deadline, "{vip} did not move within 5 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    let first_ok = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let ok = lab.spread_probes(vip).iter().filter(|p| p.ok && p.start >= t0).map(|p| p.end).min();
            if let Some(t) = ok {
                break t;
            }
            assert!(Instant::now() < deadline, "no successful probe of {vip} after the kill");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Let the probes of the other VIPs run on for a while after the move.
    std::thread::sleep(Duration::from_millis(500));
    let t1 = now_ms();
    let on = lab.spread_samples(vip)[moved].iter().find(|(t, h)| *h && *t >= t0).map(|(t, _)| *t).unwrap();
    println!(
        "{vip}: node {} killed at {t0}; on node {} after {} ms; first ok probe {} ms",
        victim + 1,
        moved + 1,
        on - t0,
        first_ok - t0
    );
    for other in lab.spread_vips().into_iter().filter(|v| *v != vip) {
        let failed: Vec<_> =
            lab.spread_probes(other).into_iter().filter(|p| !p.ok && p.start >= t0 && p.start <= t1).collect();
        assert!(failed.is_empty(), "{other} failed {} probe(s) while {vip} moved: {:?}", failed.len(), failed.first());
        let o = overlap(&lab.spread_samples(other), t0, t1);
        assert_eq!(o.certain, 0, "two holders of {other}");
    }
    let o = overlap(&lab.spread_samples(vip), t0.saturating_sub(1000), t1);
    assert_eq!(o.certain, 0, "two holders of {vip}");
    assert!(on - t0 <= FAILOVER_BOUND_MS * 2, "{vip} took {} ms to move", on - t0);
}
