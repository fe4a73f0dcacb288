//! Cluster figures on a three-node loopback cluster (real Raft over TCP, real redb stores, one
//! process): sticky entries replicated per second, and `ApplyConfig` commit latency.
//!
//! `cargo run --release -p keel-cluster --example figures [SECONDS]` — a measurement, not a
//! test: it prints figures and asserts nothing about them (the machine is shared and noisy).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keel_cluster::command::StickyEntry;
use keel_cluster::node::now_ms;
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, Command, Config};

/// Entries per proposal, as the data plane's batcher sends them.
const BATCH: usize = 5_000;
/// Proposals in flight at once, as the data plane's batcher allows.
const IN_FLIGHT: usize = 4;
/// Config proposals measured.
const APPLIES: usize = 200;

fn config(n: usize) -> anyhow::Result<Config> {
    let servers: Vec<String> =
        (0..n).map(|i| format!(r#"{{"name":"s{i}","address":"127.0.0.1:{}"}}"#, 9100 + i)).collect();
    Ok(serde_json::from_str(&format!(
        r#"{{"listeners":{{"web":{{"bind":"127.0.0.1:8080","default_pool":"app"}}}},
            "pools":{{"app":{{"servers":[{}]}}}}}}"#,
        servers.join(",")
    ))?)
}

/// The node that leads now (leadership can move under load on a busy machine).
async fn current_leader(nodes: &[ClusterHandle]) -> anyhow::Result<ClusterHandle> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(n) = nodes.iter().find(|n| n.status().quorum_acked_within_lease) {
            return Ok(n.clone());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("no leader within 10 s")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5).clamp(1, 120);
    let tmp = tempfile::tempdir()?;
    let mut nodes: Vec<ClusterHandle> = Vec::new();
    for id in 1..=3u64 {
        let admin: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let settings =
            ClusterSettings::new(id, "127.0.0.1:0".parse()?, admin, tmp.path().join(format!("n{id}")), "figures");
        nodes.push(ClusterNode::start(settings).await?);
    }
    let leader = nodes[0].clone();
    leader.initialize(config(2)?).await?;
    for n in &nodes[1..] {
        leader.add_voter(n.id(), n.node_info()).await?;
    }
    println!("three-node loopback cluster formed (data in {})", tmp.path().display());

    // ApplyConfig on an empty sticky table, then again once the table is large: the state is
    // published per applied batch, so a config change must not get slower with the table.
    measure_config_apply(&nodes, "empty sticky table").await?;
    // Sticky entries: batches of BATCH, IN_FLIGHT at a time, for `seconds`.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut next_key = 0usize;
    let mut committed = 0usize;
    while Instant::now() < deadline {
        let mut batches = Vec::new();
        for _ in 0..IN_FLIGHT {
            let expires_at_ms = now_ms() + 3_600_000;
            let batch: Vec<StickyEntry> = (next_key..next_key + BATCH)
                .map(|k| StickyEntry { pool: "app".into(), key: format!("k{k}"), server: "s0".into(), expires_at_ms })
                .collect();
            next_key += BATCH;
            let leader = current_leader(&nodes).await?;
            batches.push(tokio::spawn(async move { leader.propose(Command::PutStickyBatch(batch)).await }));
        }
        for b in batches {
            if matches!(b.await, Ok(Ok(_))) {
                committed += BATCH;
            }
        }
    }
    let elapsed = started.elapsed();
    // Replicated means applied on the followers too.
    let follower = nodes[2].state();
    let wait = Instant::now();
    while follower.borrow().sticky.len() < committed.min(1_000_000) && wait.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let replicated = started.elapsed();
    println!(
        "sticky entries: {committed} committed in {:.2}s = {:.0} entries/s; applied on a follower after {:.2}s = {:.0} entries/s",
        elapsed.as_secs_f64(),
        committed as f64 / elapsed.as_secs_f64(),
        replicated.as_secs_f64(),
        committed as f64 / replicated.as_secs_f64()
    );

    let label = format!("{} sticky entries", follower.borrow().sticky.len());
    measure_config_apply(&nodes, &label).await?;

    for n in &nodes {
        n.shutdown().await;
    }
    Ok(())
}

/// Commit latency (durable on a majority) and time until every node applied it, over APPLIES
/// config changes.
async fn measure_config_apply(nodes: &[ClusterHandle], label: &str) -> anyhow::Result<()> {
    let mut commit = Vec::with_capacity(APPLIES);
    let mut everywhere = Vec::with_capacity(APPLIES);
    for i in 0..APPLIES {
        let cfg = config(2 + i % 3)?;
        let leader = current_leader(nodes).await?;
        let t = Instant::now();
        leader.propose(Command::ApplyConfig(cfg.clone())).await?;
        commit.push(t.elapsed());
        let rx: Vec<_> = nodes.iter().map(ClusterHandle::state).collect();
        while !rx.iter().all(|r| r.borrow().config == cfg) && t.elapsed() < Duration::from_secs(10) {
            tokio::task::yield_now().await;
        }
        everywhere.push(t.elapsed());
    }
    commit.sort();
    everywhere.sort();
    println!(
        "config apply ({APPLIES}x, {label}): commit p50 {:.1} ms, p99 {:.1} ms; applied on all three p50 {:.1} ms, p99 {:.1} ms",
        percentile(&commit, 0.5).as_secs_f64() * 1e3,
        percentile(&commit, 0.99).as_secs_f64() * 1e3,
        percentile(&everywhere, 0.5).as_secs_f64() * 1e3,
        percentile(&everywhere, 0.99).as_secs_f64() * 1e3,
    );
    Ok(())
}
