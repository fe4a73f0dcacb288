//! A pair of data nodes plus a witness, in process over loopback TCP: the surviving data node
//! takes over as fast as in a three-node cluster (the witness's vote is free after the same
//! lease) and the witness never leads while it could; and when the witness holds entries the
//! surviving data node lacks, the witness leads just long enough to bring it up to date.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::path::Path;
use std::time::{Duration, Instant};

use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, Command, Config, Role};

/// Deadline for cluster-wide conditions (catch-up, the witness hand-back).
const CONVERGE: Duration = Duration::from_secs(10);
/// The failover budget enforced here (generous: debug build on a shared 2-core box); the
/// figure is printed.
const FAILOVER_BUDGET: Duration = Duration::from_secs(2);
/// Poll interval while waiting on a condition.
const POLL: Duration = Duration::from_millis(5);

fn config() -> Config {
    serde_json::from_str(
        r#"{"listeners":{"web":{"bind":"127.0.0.1:8080","default_pool":"app"}},
            "pools":{"app":{"servers":[{"name":"a","address":"127.0.0.1:9100"}]}}}"#,
    )
    .unwrap()
}

fn settings(dir: &Path, id: u64, witness: bool) -> ClusterSettings {
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut s = ClusterSettings::new(id, "127.0.0.1:0".parse().unwrap(), admin, dir.join(format!("n{id}")), "pair");
    s.witness = witness;
    s
}

/// Starts a node, retrying while a previous incarnation still holds the port.
async fn start(s: &ClusterSettings) -> ClusterHandle {
    let begin = Instant::now();
    loop {
        match ClusterNode::start(s.clone()).await {
            Ok(h) => return h,
            Err(e) if begin.elapsed() < CONVERGE => {
                eprintln!("node {} not started yet: {e}", s.node_id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node {} did not start: {e}", s.node_id),
        }
    }
}

/// Waits for `cond`, also checking `invariant` on every poll; returns the time taken.
async fn wait_for(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
    mut invariant: impl FnMut() -> Result<(), String>,
) -> Duration {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Err(e) = invariant() {
            panic!("while waiting for {what}: {e}");
        }
        if cond() {
            return start.elapsed();
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {deadline:?} waiting for: {what}");
}

fn leads(n: &ClusterHandle) -> bool {
    let s = n.status();
    s.role == Role::Leader && s.quorum_acked_within_lease
}

/// Forms 1 + 2 (data) + 3 (witness) with node 1 leading; returns the handles and settings.
async fn pair(dir: &Path) -> (Vec<ClusterHandle>, Vec<ClusterSettings>) {
    let mut settings_v = vec![settings(dir, 1, false), settings(dir, 2, false), settings(dir, 3, true)];
    let mut nodes = Vec::new();
    for s in settings_v.iter_mut() {
        let h = start(s).await;
        s.raft_addr = h.node_info().raft_addr; // restarts reuse the bound port
        nodes.push(h);
    }
    nodes[0].initialize(config()).await.unwrap();
    nodes[0].add_voter(2, nodes[1].node_info()).await.unwrap();
    nodes[0].add_voter(3, nodes[2].node_info()).await.unwrap();
    (nodes, settings_v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_fails_over_to_the_data_node_within_a_lease() {
    let tmp = tempfile::tempdir().unwrap();
    let (nodes, _) = pair(tmp.path()).await;
    let (n1, n2, w) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());
    let witness_never_leads = || match w.status().role {
        Role::Leader => Err("the witness leads".to_owned()),
        _ => Ok(()),
    };
    // A few rounds: each time the leading data node stops, the other takes over.
    let (mut active, mut passive) = (n1, n2);
    let mut took = Vec::new();
    for round in 0..3 {
        let stopped = Instant::now();
        active.shutdown().await;
        let t = wait_for("the passive data node leads", FAILOVER_BUDGET, || leads(&passive), witness_never_leads).await;
        println!("round {round}: data node {} leads {} ms after the active one stopped", passive.id(), t.as_millis());
        took.push(stopped.elapsed());
        // Bring the stopped node back as the new passive one.
        let mut s = settings(tmp.path(), active.id(), false);
        s.raft_addr = active.node_info().raft_addr;
        s.admin_addr = active.node_info().admin_addr;
        drop(active);
        let back = start(&s).await;
        let target = passive.status().last_log_index;
        wait_for(
            "the restarted node catches up",
            CONVERGE,
            || back.status().applied_index >= target,
            witness_never_leads,
        )
        .await;
        (active, passive) = (passive, back);
    }
    println!("pair failovers: {:?}", took.iter().map(Duration::as_millis).collect::<Vec<_>>());
    for n in [&active, &passive, &w] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_with_the_longer_log_brings_the_survivor_up_to_date() {
    let tmp = tempfile::tempdir().unwrap();
    let (nodes, settings_v) = pair(tmp.path()).await;
    let (n1, n2, w) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());
    // Node 2 misses a write that nodes 1 and 3 commit; then node 1 dies.
    n2.shutdown().await;
    drop(n2);
    n1.propose(Command::DrainServer { pool: "app".into(), server: "a".into(), drain: true }).await.unwrap();
    let committed = n1.status().last_log_index;
    n1.shutdown().await;
    drop((n1, nodes));
    // Node 2 cannot win alone (the witness refuses it: its log is shorter); the witness must
    // stand, replicate, and hand leadership back.
    let n2 = start(&settings_v[1]).await;
    let started = Instant::now();
    let rx = n2.state();
    wait_for("node 2 has the write it missed", CONVERGE, || rx.borrow().is_draining("app", "a"), || Ok(())).await;
    wait_for("node 2 leads", CONVERGE, || leads(&n2), || Ok(())).await;
    assert!(n2.status().applied_index >= committed, "{:?}", n2.status());
    println!("node 2 caught up and leads {} ms after it started", started.elapsed().as_millis());
    // The witness stays a follower from now on (watched for a second): node 2 keeps the role in
    // the same term. (Not `leads`: a heartbeat acknowledged a few ms past the 150 ms lease on a
    // loaded CI box is a lease lapse, not a lost leadership.)
    let term = n2.status().term;
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(1) {
        assert!(w.status().role != Role::Leader, "the witness took leadership back: {:?}", w.status());
        let s = n2.status();
        assert!(s.role == Role::Leader && s.term == term, "node 2 lost leadership: {s:?}");
        tokio::time::sleep(POLL).await;
    }
    n2.shutdown().await;
    w.shutdown().await;
}
