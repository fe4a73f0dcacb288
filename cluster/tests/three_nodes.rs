//! An in-process 3-node cluster over real loopback TCP, each node with its own data dir:
//! init, join, propose through a follower, leader failover (timed), catch-up after restart,
//! and a full-cluster restart that must lose nothing committed.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_cluster::command::StickyEntry;
use keel_cluster::node::now_ms;
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, Command, Config, ProposeError, Role};

/// Deadline for any cluster-wide condition (commit visible everywhere, catch-up).
const CONVERGE: Duration = Duration::from_secs(10);
/// The failover budget this test enforces.
const FAILOVER_BUDGET: Duration = Duration::from_secs(2);
/// Poll interval while waiting on a condition.
const POLL: Duration = Duration::from_millis(5);

fn config(servers: &[&str]) -> Config {
    let list: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!(r#"{{"name":"{s}","address":"127.0.0.1:{}"}}"#, 9100 + i))
        .collect();
    serde_json::from_str(&format!(
        r#"{{"listeners":{{"web":{{"bind":"127.0.0.1:8080","default_pool":"app"}}}},
            "pools":{{"app":{{"servers":[{}]}}}}}}"#,
        list.join(",")
    ))
    .unwrap()
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if cond() {
            return start.elapsed();
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {deadline:?} waiting for: {what}");
}

struct Slot {
    id: u64,
    dir: PathBuf,
    raft_addr: SocketAddr,
    admin_addr: SocketAddr,
}

fn settings(s: &Slot) -> ClusterSettings {
    ClusterSettings::new(s.id, s.raft_addr, s.admin_addr, s.dir.clone(), "test-cluster")
}

/// Starts a node, retrying while its previous incarnation still holds the port.
async fn start(s: &Slot) -> ClusterHandle {
    let begin = Instant::now();
    loop {
        match ClusterNode::start(settings(s)).await {
            Ok(h) => return h,
            Err(e) if begin.elapsed() < CONVERGE => {
                eprintln!("node {} not started yet: {e}", s.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("node {} did not start: {e}", s.id),
        }
    }
}

fn leader_of(nodes: &[&ClusterHandle]) -> Option<ClusterHandle> {
    nodes.iter().find(|n| n.status().role == Role::Leader && n.status().quorum_acked_within_lease).map(|n| (*n).clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_fails_over_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut slots = Vec::new();
    for id in 1..=3u64 {
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        slots.push(Slot {
            id,
            dir: tmp.path().join(format!("n{id}")),
            raft_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: admin,
        });
    }
    let mut nodes = Vec::new();
    for s in slots.iter_mut() {
        let h = start(s).await;
        s.raft_addr = h.node_info().raft_addr; // restarts reuse the bound port
        nodes.push(h);
    }
    let (n1, n2, n3) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());

    n1.initialize(config(&["a", "b"])).await.unwrap();
    n1.add_voter(2, n2.node_info()).await.unwrap();
    n1.add_voter(3, n3.node_info()).await.unwrap();
    let st = n1.status();
    assert_eq!(st.members.iter().filter(|m| m.voter).count(), 3, "{st:?}");

    // A follower refuses and names the leader; the leader commits; every node sees it.
    let cfg2 = config(&["a", "b", "c"]);
    match n2.propose(Command::ApplyConfig(cfg2.clone())).await {
        Err(ProposeError::ForwardToLeader { leader_id, leader_admin_addr }) => {
            assert_eq!(leader_id, Some(1));
            assert_eq!(leader_admin_addr, Some(slots[0].admin_addr));
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    n1.propose(Command::ApplyConfig(cfg2.clone())).await.unwrap();
    for n in &nodes {
        let rx = n.state();
        wait_for("config visible on every node", CONVERGE, || rx.borrow().config == cfg2).await;
    }

    // Invalid config is rejected and changes nothing.
    let err = n1.propose(Command::ApplyConfig(Config::default())).await.unwrap_err();
    assert!(matches!(err, ProposeError::Rejected { .. }), "{err:?}");

    // Sticky entries and a majority health verdict, before any restart.
    let exp = now_ms() + 3_600_000;
    let batch = (0..50)
        .map(|i| StickyEntry { pool: "app".into(), key: format!("10.0.0.{i}"), server: "c".into(), expires_at_ms: exp })
        .collect();
    n1.propose(Command::PutStickyBatch(batch)).await.unwrap();
    for reporter in [1, 2] {
        let cmd = Command::SetServerHealth { pool: "app".into(), server: "b".into(), up: false, reporter };
        n1.propose(cmd).await.unwrap();
    }
    assert!(!n1.state().borrow().is_up("app", "b"));

    // Kill the leader: a new one with a quorum ack within the failover budget.
    let killed_at = Instant::now();
    n1.shutdown().await;
    drop(n1);
    wait_for("a new leader", FAILOVER_BUDGET, || leader_of(&[&n2, &n3]).is_some()).await;
    let took = killed_at.elapsed();
    println!("leader failover: new leader with quorum ack {} ms after the old leader stopped", took.as_millis());
    let leader = leader_of(&[&n2, &n3]).unwrap();
    leader.propose(Command::DrainServer { pool: "app".into(), server: "a".into(), drain: true }).await.unwrap();

    // The old leader restarts from its data dir and catches up.
    let n1 = start(&slots[0]).await;
    let rx = n1.state();
    wait_for("restarted node catches up", CONVERGE, || rx.borrow().is_draining("app", "a")).await;

    // Stop everything, restart everything: nothing committed is lost.
    let expected = leader.state().borrow().clone();
    for n in [&n1, &n2, &n3] {
        n.shutdown().await;
    }
    drop((n1, n2, n3, leader, nodes));
    let mut again = Vec::new();
    for s in &slots {
        again.push(start(s).await);
    }
    let refs: Vec<&ClusterHandle> = again.iter().collect();
    wait_for("a leader after full restart", CONVERGE, || leader_of(&refs).is_some()).await;
    for n in &again {
        let rx = n.state();
        wait_for("state restored on every node", CONVERGE, || **rx.borrow() == *expected).await;
        let s = rx.borrow().clone();
        assert_eq!(s.config, cfg2);
        assert_eq!(s.sticky.len(), 50);
        assert_eq!(s.sticky.get("app", "10.0.0.7", now_ms()).map(|b| b.server), Some("c"));
        assert!(!s.is_up("app", "b"));
        assert!(s.is_draining("app", "a"));
    }
    // And it still takes writes.
    let leader = leader_of(&refs).unwrap();
    leader.propose(Command::Noop).await.unwrap();
    for n in &again {
        n.shutdown().await;
    }
}
