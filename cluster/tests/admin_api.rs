//! The `/cluster/…` admin API over real HTTP: init, join, a propose sent to a follower that the
//! client follows to the leader, clear errors for garbage and invalid input.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed assertion

use std::time::{Duration, Instant};

use keel_cluster::api::client::{ClientError, ClusterClient};
use keel_cluster::api::{self, AddNode};
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, Command, Config, Outcome};

const CONVERGE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

fn config(servers: &[&str]) -> Config {
    let list: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| format!(r#"{{"name":"{s}","address":"127.0.0.1:{}"}}"#, 9200 + i))
        .collect();
    serde_json::from_str(&format!(
        r#"{{"listeners":{{"web":{{"bind":"127.0.0.1:8081","default_pool":"app"}}}},
            "pools":{{"app":{{"servers":[{}]}}}}}}"#,
        list.join(",")
    ))
    .unwrap()
}

async fn node(id: u64, dir: &std::path::Path) -> (ClusterHandle, std::net::SocketAddr) {
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let settings =
        ClusterSettings::new(id, "127.0.0.1:0".parse().unwrap(), admin_addr, dir.join(format!("n{id}")), "api-test");
    let h = ClusterNode::start(settings).await.unwrap();
    api::serve(admin, h.clone());
    (h, admin_addr)
}

async fn raw(addr: std::net::SocketAddr, path: &str, body: &'static str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(CONVERGE, s.read_to_string(&mut out)).await.unwrap().unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_inits_joins_and_follows_the_leader() {
    let tmp = tempfile::tempdir().unwrap();
    let (h1, a1) = node(1, tmp.path()).await;
    let (h2, a2) = node(2, tmp.path()).await;
    let c1 = ClusterClient::new(a1);
    let c2 = ClusterClient::new(a2);

    c1.init(&config(&["a"])).await.unwrap();
    let again = c1.init(&config(&["a"])).await.unwrap_err();
    assert!(matches!(&again, ClientError::Api { status, .. } if status.as_u16() == 409), "{again}");

    let n2 = h2.node_info();
    // Sent to the follower-to-be (node 2 is not a member yet, knows no leader): use node 1.
    c1.add_node(&AddNode { id: 2, raft_addr: n2.raft_addr, admin_addr: n2.admin_addr, witness: true }).await.unwrap();
    let status = c1.status().await.unwrap();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 2, "{status:?}");

    // Propose through the follower: 421 + leader address, followed by the client.
    let cfg = config(&["a", "b"]);
    let out = c2.propose(&Command::ApplyConfig(cfg.clone())).await.unwrap();
    assert_eq!(out, Outcome::Applied { changed: true });
    let start = Instant::now();
    while c2.state().await.unwrap().config != cfg {
        assert!(start.elapsed() < CONVERGE, "follower never saw the config");
        tokio::time::sleep(POLL).await;
    }

    // Application errors stay apart from transport errors.
    let bad = c2.propose(&Command::ApplyConfig(Config::default())).await.unwrap_err();
    assert!(bad.is_application(), "{bad}");
    let down = ClusterClient::new("127.0.0.1:1".parse().unwrap()).status().await.unwrap_err();
    assert!(!down.is_application(), "{down}");

    // Garbage and unknown fields: 400 with a message; the server keeps serving.
    let (code, text) = raw(a1, "/cluster/propose", "{not json").await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("invalid JSON"), "{text}");
    let (code, _) =
        raw(a1, "/cluster/propose", r#"{"drain_server":{"pool":"app","server":"a","drain":true,"x":1}}"#).await;
    assert_eq!(code, 400);
    let (code, _) = raw(a1, "/cluster/nope", "{}").await;
    assert_eq!(code, 404);
    assert_eq!(c1.status().await.unwrap().id, 1);

    h1.shutdown().await;
    h2.shutdown().await;
}
