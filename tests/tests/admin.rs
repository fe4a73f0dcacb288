//! The admin API: /healthz, /status, /metrics, and drain/enable/weight changes that take
//! effect on live traffic.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use keel_tests::wait::ADMIN_CHANGE;
use keel_tests::{tally, Backend, Keel, PoolSpec};
use serde_json::Value;

async fn keel_with(algorithm: &str, bs: &[Backend]) -> Result<Keel> {
    Keel::builder().default_pool("app").pool(PoolSpec::new("app", algorithm).backends(bs)).start().await
}

#[tokio::test]
async fn healthz_answers_200() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = keel_with("round_robin", &bs).await?;
    let r = keel.admin_get("/healthz").await?;
    ensure!(r.status == 200, "{}", r.status);
    Ok(())
}

#[tokio::test]
async fn status_has_the_documented_shape_and_counts_traffic() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_with("round_robin", &bs).await?;
    keel.client().backends(keel.proxy_addr(), "/", 30).await?;
    for _ in 0..3 {
        let r = keel.get("/status/404").await?;
        ensure!(r.status == 404, "{}", r.status);
    }

    let s = keel.status_json().await?;
    let listeners = s["listeners"].as_array().context("listeners is an array")?;
    ensure!(listeners.len() == 1, "{s}");
    let l = &listeners[0];
    ensure!(l["name"] == "web", "listener name: {l}");
    ensure!(l["bind"] == keel.proxy_addr().to_string().as_str(), "listener bind: {l}");
    ensure!(l["protocol"] == "http", "listener protocol: {l}");

    let pools = s["pools"].as_array().context("pools is an array")?;
    ensure!(pools.len() == 1, "{s}");
    let p = &pools[0];
    ensure!(p["name"] == "app" && p["algorithm"] == "round_robin", "pool: {p}");
    let servers = p["servers"].as_array().context("servers is an array")?;
    let names: Vec<&str> = servers.iter().filter_map(|s| s["name"].as_str()).collect();
    ensure!(names == ["a", "b", "c"], "servers in config order: {names:?}");

    let mut total_4xx = 0;
    for (srv, b) in servers.iter().zip(&bs) {
        ensure!(srv["address"] == b.addr().to_string().as_str(), "address: {srv}");
        ensure!(srv["weight"] == 1, "weight: {srv}");
        ensure!(srv["state"] == "up", "state: {srv}");
        ensure!(srv["active"] == 0, "active with no traffic: {srv}");
        ensure!(srv["requests"].as_u64() == Some(b.requests()), "requests {srv} vs backend {}", b.requests());
        for class in ["1xx", "2xx", "3xx", "4xx", "5xx"] {
            ensure!(srv["responses"][class].is_u64(), "responses.{class} missing: {srv}");
        }
        ensure!(srv["responses"]["2xx"] == 10, "2xx: {srv}");
        total_4xx += srv["responses"]["4xx"].as_u64().unwrap_or(0);
        ensure!(srv["connect_errors"] == 0 && srv["timeouts"] == 0, "errors: {srv}");
    }
    ensure!(total_4xx == 3, "4xx total {total_4xx}");
    Ok(())
}

#[tokio::test]
async fn status_shows_active_requests() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = keel_with("round_robin", &bs).await?;
    let proxy = keel.proxy_addr();
    let slow = tokio::spawn(async move { keel_tests::client::get_fresh(proxy, "/slow?ms=3000").await });
    keel_tests::wait_until(ADMIN_CHANGE, "active = 1 in /status", || async {
        matches!(keel.server_status("app", "a").await, Ok(s) if s["active"] == 1)
    })
    .await?;
    slow.abort();
    Ok(())
}

/// `keel_requests_total` samples: labels to value.
fn request_counters(metrics: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("keel_requests_total{") else { continue };
        let Some((labels, value)) = rest.split_once("} ") else { continue };
        let labels = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        if let Ok(v) = value.split_whitespace().next().unwrap_or("").parse::<f64>() {
            out.push((labels, v));
        }
    }
    out
}

#[tokio::test]
async fn metrics_count_requests_per_pool_server_and_class() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_with("round_robin", &bs).await?;
    keel.client().backends(keel.proxy_addr(), "/", 30).await?;
    for _ in 0..3 {
        keel.get("/status/404").await?;
    }

    let m = keel.metrics().await?;
    let counters = request_counters(&m);
    let find = |server: &str, code: &str| {
        counters
            .iter()
            .find(|(l, _)| {
                l.get("pool").map(String::as_str) == Some("app")
                    && l.get("server").map(String::as_str) == Some(server)
                    && l.get("code").map(String::as_str) == Some(code)
            })
            .map(|(_, v)| *v)
    };
    for b in ["a", "b", "c"] {
        ensure!(find(b, "2xx") == Some(10.0), "keel_requests_total for {b}/2xx: {:?}\n{m}", find(b, "2xx"));
    }
    let fours: f64 = ["a", "b", "c"].iter().filter_map(|b| find(b, "4xx")).sum();
    ensure!(fours == 3.0, "4xx counters sum to {fours}\n{m}");

    for needle in [
        "keel_request_duration_seconds_bucket{",
        "keel_request_duration_seconds_count{",
        "keel_request_duration_seconds_sum{",
    ] {
        let line = m.lines().find(|l| l.starts_with(needle)).with_context(|| format!("no {needle} in:\n{m}"))?;
        ensure!(line.contains("pool=\"app\""), "the histogram is not labelled by pool: {line}");
    }
    Ok(())
}

#[tokio::test]
async fn drain_stops_new_requests_and_enable_brings_them_back() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_with("round_robin", &bs).await?;
    let proxy = keel.proxy_addr();

    let r = keel.admin_post("/pools/app/servers/b/drain", "").await?;
    ensure!(r.status == 200, "drain: {} {:?}", r.status, r.text());
    r.json().context("drain answers JSON")?;
    keel.wait_state("app", "b", "drain", ADMIN_CHANGE).await?;

    let before = bs[1].requests();
    let who = keel.client().backends(proxy, "/", 60).await?;
    ensure!(
        !who.iter().any(|w| w == "b"),
        "a drained server got new requests: {:?}",
        tally(who.iter().map(String::as_str))
    );
    ensure!(bs[1].requests() == before);

    let r = keel.admin_post("/pools/app/servers/b/enable", "").await?;
    ensure!(r.status == 200, "enable: {} {:?}", r.status, r.text());
    r.json().context("enable answers JSON")?;
    keel.wait_state("app", "b", "up", ADMIN_CHANGE).await?;
    let who = keel.client().backends(proxy, "/", 30).await?;
    ensure!(who.iter().filter(|w| *w == "b").count() == 10, "{:?}", tally(who.iter().map(String::as_str)));
    Ok(())
}

#[tokio::test]
async fn draining_lets_in_flight_requests_finish() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = keel_with("round_robin", &bs).await?;
    let proxy = keel.proxy_addr();
    let slow = tokio::spawn(async move { keel_tests::client::get_fresh(proxy, "/slow?ms=800").await });
    keel_tests::wait_until(ADMIN_CHANGE, "the slow request in flight", || async { bs[0].in_flight() == 1 }).await?;
    let r = keel.admin_post("/pools/app/servers/a/drain", "").await?;
    ensure!(r.status == 200, "{}", r.status);
    let r = slow.await??;
    ensure!(r.status == 200 && r.text() == "a", "in-flight request on a drained server: {} {:?}", r.status, r.text());
    Ok(())
}

#[tokio::test]
async fn unknown_pools_and_servers_are_404() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = keel_with("round_robin", &bs).await?;
    for path in [
        "/pools/nope/servers/a/drain",
        "/pools/app/servers/nope/drain",
        "/pools/nope/servers/a/enable",
        "/pools/app/servers/nope/enable",
    ] {
        let r = keel.admin_post(path, "").await?;
        ensure!(r.status == 404, "POST {path}: {}", r.status);
    }
    let r = keel.admin_post("/pools/app/servers/nope/weight", "{\"weight\":2}").await?;
    ensure!(r.status == 404, "weight of an unknown server: {}", r.status);
    Ok(())
}

#[tokio::test]
async fn weight_changes_apply_to_live_traffic() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_with("weighted_round_robin", &bs).await?;

    let r = keel.admin_post("/pools/app/servers/a/weight", "{\"weight\":5}").await?;
    ensure!(r.status == 200, "weight: {} {:?}", r.status, r.text());
    keel_tests::wait_until(ADMIN_CHANGE, "a's weight to be 5 in /status", || async {
        matches!(keel.server_status("app", "a").await, Ok(s) if s["weight"] == 5)
    })
    .await?;

    let who = keel.client().backends(keel.proxy_addr(), "/", 70).await?;
    let t = tally(who.iter().map(String::as_str));
    // Smooth weighted round robin converges on 50/10/10 within a pick or two whatever state
    // the change caught it in.
    let near = |name: &str, want: usize| t.get(name).is_some_and(|&n| n.abs_diff(want) <= 2);
    ensure!(near("a", 50) && near("b", 10) && near("c", 10), "weights 5,1,1 gave {t:?}");
    Ok(())
}

#[tokio::test]
async fn out_of_range_weights_are_rejected() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = keel_with("weighted_round_robin", &bs).await?;
    for body in ["{\"weight\":0}", "{\"weight\":257}", "{\"weight\":\"heavy\"}", "not json"] {
        let r = keel.admin_post("/pools/app/servers/a/weight", body).await?;
        ensure!(r.status.is_client_error(), "weight body {body}: {}", r.status);
    }
    let s: Value = keel.server_status("app", "a").await?;
    if s["weight"] != 1 {
        bail!("a rejected weight change still changed the weight: {s}");
    }
    Ok(())
}
