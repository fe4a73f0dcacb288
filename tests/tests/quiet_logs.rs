//! Logs that survive an attack: what a hostile client or a dead peer can make keel repeat is
//! written once, then at most once per interval with a count, so keel's log stays readable and
//! writing it never becomes the load.
//!
//! - 1,000 hostile connections (ambiguous HTTP/1 framing, HTTP/2 garbage, HTTP/2 rapid reset),
//!   against keel at its default log level, add a bounded number of lines to its log.
//! - In a 3-node cluster, a follower SIGKILLed for a few seconds is logged by the leader going
//!   once and coming back once (openraft alone wrote a WARN and an ERROR every 50 ms).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::cluster::{Cluster, CATCH_UP, LEADER};
use keel_tests::wait::{wait_until, HOSTILE};
use keel_tests::{Backend, Keel, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Hostile connections in the attack.
const ATTACK: usize = 1_000;
/// Connections open at once during the attack.
const AT_ONCE: usize = 50;
/// Most log lines the whole attack may add.
const MOST_LINES: usize = 20;

/// How long the follower stays dead: openraft retries it every 50 ms meanwhile (~60 times).
const DOWN_FOR: Duration = Duration::from_secs(3);

/// The HTTP/2 connection preface and an empty SETTINGS frame.
const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// One hostile connection's bytes; `i` picks the kind.
fn hostile(i: usize) -> Vec<u8> {
    match i % 3 {
        // Smuggling: both lengths.
        0 => b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        // HTTP/2 garbage: a frame header announcing 16 MiB, far above the default frame size.
        1 => [H2_START, &[0xff; 64]].concat(),
        // HTTP/2 rapid reset: streams opened and cancelled at once, over and over (CVE-2023-44487).
        _ => {
            let mut bytes = H2_START.to_vec();
            // :method GET, :scheme http, :path /, :authority x (HPACK).
            let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
            for n in 0..200u32 {
                let stream = (2 * n + 1).to_be_bytes();
                bytes.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x04]); // HEADERS, END_HEADERS
                bytes.extend_from_slice(&stream);
                bytes.extend_from_slice(&block);
                bytes.extend_from_slice(&[0, 0, 4, 0x03, 0]); // RST_STREAM
                bytes.extend_from_slice(&stream);
                bytes.extend_from_slice(&8u32.to_be_bytes()); // CANCEL
            }
            bytes
        }
    }
}

/// Sends `bytes` and reads until keel closes (or [`HOSTILE`] passes: the test only counts lines).
async fn attack_one(addr: std::net::SocketAddr, bytes: Vec<u8>) -> Result<()> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let _ = s.write_all(&bytes).await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(HOSTILE, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn a_thousand_hostile_connections_cost_a_bounded_number_of_log_lines() -> Result<()> {
    let a = Backend::start("a")?;
    // An empty RUST_LOG: keel's own default filter, as an operator runs it.
    let keel = Keel::builder()
        .env("RUST_LOG", "")
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&a]))
        .start()
        .await?;
    let before = keel.log().lines().count();
    let addr = keel.proxy_addr();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..ATTACK {
        if tasks.len() >= AT_ONCE {
            tasks.join_next().await.context("a task")???;
        }
        tasks.spawn(attack_one(addr, hostile(i)));
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    // keel still serves, and every line it wrote about the attack is in the file by now.
    let r = keel.get("/").await?;
    ensure!(r.status == 200, "after the attack: {}", r.status);
    let log = keel.log();
    let added: Vec<&str> = log.lines().skip(before).collect();
    eprintln!("{} hostile connections added {} log lines:\n{}", ATTACK, added.len(), added.join("\n"));
    ensure!(added.len() < MOST_LINES, "{ATTACK} hostile connections added {} log lines", added.len());
    // Throttled, not silenced: the first refusal of the kind is there.
    ensure!(
        added.iter().any(|l| l.contains("refused a malformed request")),
        "the refusals left no line at all:\n{}",
        added.join("\n")
    );
    Ok(())
}

#[tokio::test]
async fn a_dead_raft_peer_is_logged_going_once_and_coming_back_once() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let seed = Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends(&bs));
    let mut c = Cluster::builder(seed, 3).start().await?;
    c.form().await?;
    let leader = c.leader(LEADER).await?;
    let follower = if leader == 2 { 3 } else { 2 };
    let before = c.log(leader).lines().count();

    c.kill(follower)?;
    // Not a wait for a condition: the outage itself, which is what the log is checked over.
    tokio::time::sleep(DOWN_FOR).await;
    let during: Vec<String> = c.log(leader).lines().skip(before).map(str::to_owned).collect();
    eprintln!("{:?} of a dead follower: {} lines in the leader's log", DOWN_FOR, during.len());
    c.restart(follower).await?;
    // Only lines since the kill count: a peer that came up late while the cluster formed was
    // logged coming back then, and that line must not end this wait early.
    wait_until(CATCH_UP, "the leader to log the follower's return", || {
        let back = c.log(leader).lines().skip(before).any(|l| l.contains("raft peer reachable again"));
        async move { back }
    })
    .await?;

    let log = c.log(leader);
    let added: Vec<&str> = log.lines().skip(before).collect();
    eprintln!("the leader's log while node {follower} was down and back:\n{}", added.join("\n"));
    let count = |needle: &str| added.iter().filter(|l| l.contains(needle)).count();
    ensure!(
        count("raft peer unreachable") == 1,
        "the peer's going was logged {} times",
        count("raft peer unreachable")
    );
    ensure!(
        count("raft peer reachable again") == 1,
        "its return was logged {} times",
        count("raft peer reachable again")
    );
    ensure!(count("error replication") == 0 && count("RPCError") == 0, "openraft's per-RPC lines are back");
    ensure!(during.len() < 10, "3 s of a dead peer wrote {} lines on the leader:\n{}", during.len(), during.join("\n"));
    Ok(())
}
