//! Servers given by DNS name: keel asks the test's own DNS server (never the host's), every
//! resolved address becomes a server of the pool, a new answer adds and removes servers, and a
//! failed resolution keeps the last good addresses while `/status` and `/metrics` show it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use keel_tests::dns::{Answer, DnsServer};
use keel_tests::keel::metric_value;
use keel_tests::wait::{wait_until, HEALTH_CHANGE, REQUEST};
use keel_tests::{tally, Backend, Cluster, Keel, KeelBuilder, PoolSpec};
use serde_json::Value;

/// The pool's `resolve_interval`: short, so each answer change shows within a second.
const INTERVAL: &str = "200ms";
/// Time for a changed answer to reach the data plane: a few intervals plus a busy machine.
const ANSWER_CHANGE: Duration = Duration::from_secs(5);
/// Time for a failing DNS server to show as failing: keel's query timeout (300ms) twice, plus
/// intervals and margin.
const FAILURE_SHOWN: Duration = Duration::from_secs(8);

const A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Backends `a` on 127.0.0.2 and `b` on 127.0.0.3, on the same port (a DNS entry has one port).
fn two_backends() -> Result<(Backend, Backend, u16)> {
    let mut last = None;
    for _ in 0..10 {
        let a = Backend::start_on(SocketAddr::from((A, 0)), "a")?;
        let port = a.addr().port();
        match Backend::start_on(SocketAddr::from((B, port)), "b") {
            Ok(b) => return Ok((a, b, port)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("no common port")))
}

/// A node asking `dns`, with pool `app` = one entry `app` → `app.test:PORT`, weight 2.
fn config(dns: &DnsServer, port: u16) -> KeelBuilder {
    let pool = PoolSpec::new("app", "round_robin").set(&format!("resolve_interval = \"{INTERVAL}\"")).server_named(
        "app",
        &format!("app.test:{port}"),
        Some(2),
    );
    Keel::builder()
        .node_line(&format!("resolvers = [\"{}\"]", dns.addr()))
        .node_line("resolve_timeout = \"300ms\"")
        .default_pool("app")
        .pool(pool)
}

async fn start_keel(dns: &DnsServer, port: u16) -> Result<Keel> {
    config(dns, port).start().await
}

/// The names of pool `app`'s servers in `/status`.
async fn servers(keel: &Keel) -> Result<Vec<String>> {
    let status = keel.status_json().await?;
    let pool = app_pool(&status)?;
    let list = pool["servers"].as_array().ok_or_else(|| anyhow!("no servers in {pool}"))?;
    Ok(list.iter().filter_map(|s| s["name"].as_str().map(str::to_owned)).collect())
}

fn app_pool(status: &Value) -> Result<&Value> {
    status["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "app"))
        .ok_or_else(|| anyhow!("no pool app in {status}"))
}

/// `/status`'s entry for the name `app` of pool `app`.
async fn name_status(keel: &Keel) -> Result<Value> {
    let status = keel.status_json().await?;
    let names = app_pool(&status)?["names"].as_array().cloned().unwrap_or_default();
    names.into_iter().find(|n| n["server"] == "app").ok_or_else(|| anyhow!("no name `app` in {status}"))
}

async fn resolutions(keel: &Keel, outcome: &str) -> Result<f64> {
    let text = keel.metrics().await?;
    Ok(metric_value(
        &text,
        "keel_dns_resolutions_total",
        &["pool=\"app\"", "server=\"app\"", "name=\"app.test\"", &format!("outcome=\"{outcome}\"")],
    )
    .unwrap_or(0.0))
}

#[tokio::test]
async fn answers_add_and_remove_servers_and_a_failure_keeps_the_last_good_set() -> Result<()> {
    let (a, b, port) = two_backends()?;
    let dns = DnsServer::start()?;
    dns.set_a("app.test", &[A]);
    let keel = start_keel(&dns, port).await?;
    let (name_a, name_b) = (format!("app@{A}:{port}"), format!("app@{B}:{port}"));

    // One address: every request reaches a, on a server named after the entry and address,
    // with the entry's weight.
    ensure!(servers(&keel).await? == [name_a.clone()], "servers: {:?}", servers(&keel).await?);
    ensure!(keel.server_status("app", &name_a).await?["weight"] == 2);
    let who = keel.client().backends(keel.proxy_addr(), "/", 10).await?;
    ensure!(who.iter().all(|w| w == "a"), "{who:?}");
    let first = name_status(&keel).await?;
    ensure!(first["last_error"].is_null() && first["last_resolved_unix_ms"].is_u64(), "{first}");

    // Two addresses: both get traffic.
    dns.set_a("app.test", &[A, B]);
    wait_until(ANSWER_CHANGE, "both addresses to take traffic", || async {
        let Ok(who) = keel.client().backends(keel.proxy_addr(), "/", 10).await else { return false };
        let t = tally(who.iter().map(String::as_str));
        t.contains_key("a") && t.contains_key("b")
    })
    .await?;
    ensure!(servers(&keel).await? == [name_a.clone(), name_b.clone()]);

    // Only b: a receives nothing more.
    dns.set_a("app.test", &[B]);
    wait_until(ANSWER_CHANGE, "a to leave the pool", || async {
        servers(&keel).await.ok() == Some(vec![name_b.clone()])
    })
    .await?;
    let a_before = a.requests();
    let who = keel.client().backends(keel.proxy_addr(), "/", 20).await?;
    ensure!(who.iter().all(|w| w == "b"), "{who:?}");
    ensure!(a.requests() == a_before, "a got {} more requests", a.requests() - a_before);

    // SERVFAIL: the last good set stays, and the failure shows in /status and /metrics.
    let ok_before = resolutions(&keel, "ok").await?;
    ensure!(ok_before >= 3.0, "ok resolutions: {ok_before}");
    dns.set("app.test", Answer::ServFail);
    wait_until(FAILURE_SHOWN, "the failure in /status and /metrics", || async {
        let shown = name_status(&keel).await.is_ok_and(|n| n["last_error"].is_string());
        shown && resolutions(&keel, "error").await.is_ok_and(|n| n >= 1.0)
    })
    .await?;
    let failing = name_status(&keel).await?;
    eprintln!("while failing: {failing}");
    ensure!(failing["addresses"] == serde_json::json!([format!("{B}:{port}")]), "{failing}");
    wait_until(FAILURE_SHOWN, "the failure on the dashboard", || async {
        let frame = keel.admin_get("/dashboard.json").await.map(|r| r.text()).unwrap_or_default();
        frame.contains("\"host\":\"app.test\"") && frame.contains("\"last_error\":\"")
    })
    .await?;
    ensure!(servers(&keel).await? == std::slice::from_ref(&name_b));
    let who = keel.client().backends(keel.proxy_addr(), "/", 10).await?;
    ensure!(who.iter().all(|w| w == "b"), "{who:?}");

    // Silence (a timeout) is a failure of its own kind, and the last good set still stands.
    dns.set("app.test", Answer::Silent);
    wait_until(FAILURE_SHOWN, "a timeout in /metrics", || async {
        resolutions(&keel, "timeout").await.is_ok_and(|n| n >= 1.0)
    })
    .await?;
    ensure!(servers(&keel).await? == std::slice::from_ref(&name_b));

    // The log names the transition once, not once per failed attempt.
    let log = keel.log();
    let lost = log.matches("server name no longer resolves").count();
    ensure!(lost == 1, "{lost} 'no longer resolves' lines:\n{log}");
    ensure!(b.requests() >= 10);
    Ok(())
}

#[tokio::test]
async fn a_name_that_does_not_resolve_at_start_does_not_stop_the_node() -> Result<()> {
    let (_a, _b, port) = two_backends()?;
    let dns = DnsServer::start()?;
    dns.set("app.test", Answer::NxDomain);
    let keel = start_keel(&dns, port).await?;

    // Started, with no server in the pool yet: 503, and the reason in the log and /status.
    ensure!(servers(&keel).await?.is_empty());
    let r = keel.get("/").await?;
    ensure!(r.status == 503, "status {}", r.status);
    ensure!(keel.log().contains("server name does not resolve"), "{}", keel.log());
    let n = name_status(&keel).await?;
    ensure!(n["last_error"].is_string() && n["last_resolved_unix_ms"].is_null(), "{n}");

    // Once it resolves, it serves.
    dns.set_a("app.test", &[B]);
    wait_until(ANSWER_CHANGE, "the name to resolve and serve", || async {
        matches!(keel.get("/").await, Ok(r) if r.status == 200 && r.backend() == Some("b"))
    })
    .await?;
    let n = name_status(&keel).await?;
    ensure!(n["last_error"].is_null(), "{n}");
    tokio::time::timeout(REQUEST, keel.get("/")).await.context("request")??;
    Ok(())
}

/// Cluster mode: each node resolves for itself and follows the answers, and a resolved server's
/// health verdict and drain go through Raft like any server's (the replicated state knows its
/// name).
#[tokio::test]
async fn in_a_cluster_every_node_follows_the_answers_and_resolved_servers_take_verdicts() -> Result<()> {
    let (a, b, port) = two_backends()?;
    let dns = DnsServer::start()?;
    dns.set_a("app.test", &[A]);
    let mut pool = PoolSpec::new("app", "round_robin")
        .set(&format!("resolve_interval = \"{INTERVAL}\""))
        .server_named("app", &format!("app.test:{port}"), None)
        .health_http("100ms", 1, 1);
    pool = pool.no_outlier();
    let seed = Keel::builder()
        .node_line(&format!("resolvers = [\"{}\"]", dns.addr()))
        .node_line("resolve_timeout = \"300ms\"")
        .default_pool("app")
        .pool(pool);
    let mut c = Cluster::builder(seed, 2).start().await?;
    c.form().await?;
    let ids = c.data_ids();
    let who = |id: u64| {
        let c = &c;
        async move { c.client().backends(c.proxy(id), "/", 10).await.map(|w| tally(w.iter().map(String::as_str))) }
    };
    for &id in &ids {
        wait_until(ANSWER_CHANGE, &format!("node {id} to serve a"), || async {
            who(id).await.is_ok_and(|t| t.keys().eq(["a"]))
        })
        .await?;
    }
    dns.set_a("app.test", &[A, B]);
    for &id in &ids {
        wait_until(ANSWER_CHANGE, &format!("node {id} to serve a and b"), || async {
            who(id).await.is_ok_and(|t| t.keys().eq(["a", "b"]))
        })
        .await?;
    }
    let (name_a, name_b) = (format!("app@{A}:{port}"), format!("app@{B}:{port}"));
    // a fails its checks: the verdict is voted through Raft and every node takes a out.
    a.set_healthy(false);
    for &id in &ids {
        c.wait_state(id, "app", &name_a, "down", HEALTH_CHANGE).await?;
    }
    // A drain of a resolved server, by name through the CLI, reaches every node.
    let out = c.cli(1, &["backend", "drain", "app", &name_b])?;
    ensure!(out.status.success(), "drain: {}", keel_tests::cluster::describe(&out));
    for &id in &ids {
        c.wait_state(id, "app", &name_b, "drain", HEALTH_CHANGE).await?;
    }
    ensure!(a.requests() > 0 && b.requests() > 0);
    Ok(())
}

/// Sticky cookies name resolved servers like any other: a client stays on its server, and
/// still does after a new answer rebuilt the pool around it.
#[tokio::test]
async fn a_sticky_cookie_keeps_a_client_on_a_resolved_server_across_answers() -> Result<()> {
    let (_a, _b, port) = two_backends()?;
    let dns = DnsServer::start()?;
    dns.set_a("app.test", &[A, B]);
    let keel = config(&dns, port).raw("[pools.app.sticky]\nmode = \"cookie\"").start().await?;
    let first = keel.get("/").await?;
    ensure!(first.status == 200, "status {}", first.status);
    let server = first.backend().ok_or_else(|| anyhow!("no x-backend"))?.to_owned();
    let cookie = first
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .ok_or_else(|| anyhow!("no sticky cookie set"))?
        .to_owned();
    let with_cookie = || async {
        let mut who = Vec::new();
        for _ in 0..10 {
            let req =
                keel_tests::client::empty(keel_tests::client::get(keel.proxy_addr(), "/").header("cookie", &cookie))?;
            let r = keel.client().send(req).await?;
            who.push(r.backend().unwrap_or_default().to_owned());
        }
        anyhow::Ok(who)
    };
    let who = with_cookie().await?;
    ensure!(who.iter().all(|w| *w == server), "with {cookie}: {who:?}");

    // A third address joins (nothing listens there): the pool is rebuilt, the cookie holds.
    dns.set_a("app.test", &[A, B, Ipv4Addr::new(127, 0, 0, 4)]);
    wait_until(ANSWER_CHANGE, "a third server", || async { servers(&keel).await.is_ok_and(|s| s.len() == 3) }).await?;
    let who = with_cookie().await?;
    ensure!(who.iter().all(|w| *w == server), "after the new answer, with {cookie}: {who:?}");
    Ok(())
}
