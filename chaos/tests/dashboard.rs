//! The dashboard's cluster panel on a 3-node lab with a real VIP, in a real headless Chromium
//! running in the lab's client namespace: it names the leader and the VIP holder, and follows
//! both to another node after the leader is SIGKILLed.
//!
//! Gated like the other lab tests: runs only with `KEEL_NETNS_TESTS=1` as root (CI sets it).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::PathBuf;
use std::time::Duration;

use keel_chaos::lab::{Bins, Lab};
use keel_tests::browser::{artifact, Browser};

/// Time for the page to show what the node knows (it polls every second, and asks the other
/// members every two).
const PAGE: Duration = Duration::from_secs(15);

/// A headless Chromium in the lab's client namespace, signed in to node `watcher`'s dashboard.
fn signed_in(runtime: &tokio::runtime::Runtime, lab: &Lab, watcher: usize) -> Browser {
    let mut browser = runtime
        .block_on(Browser::launch_in(Some(&lab.client_ns())))
        .unwrap()
        .expect("KEEL_NETNS_TESTS is set, so a browser is required");
    let url = format!("{}/", lab.nodes[watcher].admin());
    let token = serde_json::to_string(&lab.token).unwrap();
    runtime.block_on(browser.goto(&url)).unwrap();
    runtime
        .block_on(browser.eval(&format!(
            "window.__before = true; document.querySelector('#token').value = {token}; document.querySelector('#login').submit(); 1"
        )))
        .unwrap();
    runtime
        .block_on(browser.wait_for(
            "!window.__before && document.body.dataset.ready === '1'",
            PAGE,
            "the dashboard after sign-in",
        ))
        .unwrap_or_else(|e| {
            lab.dump_logs(30);
            panic!("{e:#}")
        });
    browser
}

#[test]
fn the_cluster_panel_shows_the_vip_holder_and_follows_a_leader_kill() {
    if !keel_chaos::netns_tests_enabled("dashboard") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (mut lab, leader) = Lab::three_nodes(bins, 2).unwrap();
    let leader_id = lab.nodes[leader].id;
    let watcher = (0..3).find(|&i| i != leader).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut browser = signed_in(&runtime, &lab, watcher);
    let shows = |browser: &mut Browser, lab: &Lab, condition: String, what: &str| {
        runtime.block_on(browser.wait_for(&condition, PAGE, what)).unwrap_or_else(|e| {
            lab.dump_logs(30);
            panic!("{e:#}")
        })
    };
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('#leader').textContent === 'node {leader_id}'"),
        "the leader named",
    );
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('#vip-holder').textContent.startsWith('node {leader_id} ')"),
        "the VIP holder named",
    );
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('tr[data-member=\"{leader_id}\"] td.vip').textContent === 'holds'"),
        "the holder's member row",
    );

    lab.kill(leader).unwrap();
    let next = lab.wait_stable(Duration::from_secs(20)).unwrap_or_else(|e| {
        lab.dump_logs(30);
        panic!("after the kill: {e}")
    });
    let next_id = lab.nodes[next].id;
    assert_ne!(next_id, leader_id);
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('#leader').textContent === 'node {next_id}'"),
        "the new leader named",
    );
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('#vip-holder').textContent.startsWith('node {next_id} ')"),
        "the new VIP holder named",
    );
    shows(
        &mut browser,
        &lab,
        format!("document.querySelector('tr[data-member=\"{leader_id}\"] td:nth-child(6)').textContent === 'no'"),
        "the killed node unreachable",
    );
    runtime.block_on(browser.screenshot(&artifact("dashboard-vip.png"))).unwrap();
}

/// Spread VIPs: the panel lists every VIP with its holder and each member's row names the VIPs
/// on its interface; after a holder is SIGKILLed its VIP shows on another node.
#[test]
fn the_cluster_panel_lists_spread_vips_and_follows_a_kill() {
    if !keel_chaos::netns_tests_enabled("dashboard") {
        return;
    }
    let bins = Bins::new(PathBuf::from(env!("CARGO_BIN_EXE_chaos-probe")));
    let (mut lab, holders) = Lab::three_spread(bins, "").unwrap();
    let (&vip, &victim) = holders.iter().next().unwrap();
    let watcher = (0..3).find(|&i| i != victim).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut browser = signed_in(&runtime, &lab, watcher);
    let mut shows = |lab: &Lab, condition: String, what: &str| {
        runtime.block_on(browser.wait_for(&condition, PAGE, what)).unwrap_or_else(|e| {
            lab.dump_logs(30);
            panic!("{e:#}")
        })
    };
    for (v, h) in &holders {
        let id = lab.nodes[*h].id;
        shows(
            &lab,
            format!("document.querySelector('tr[data-vip=\"{v}\"] td.holder')?.textContent === 'node {id}'"),
            "each VIP's holder named",
        );
        shows(
            &lab,
            format!("document.querySelector('tr[data-member=\"{id}\"] td.vip').textContent.split(' ').includes('{v}')"),
            "each member's row naming the VIP on its interface",
        );
    }
    let victim_id = lab.nodes[victim].id;
    lab.kill(victim).unwrap();
    shows(
        &lab,
        format!(
            "(t => t && t !== 'node {victim_id}' && t.startsWith('node '))(document.querySelector('tr[data-vip=\"{vip}\"] td.holder')?.textContent)"
        ),
        "the killed holder's VIP on another node",
    );
}
