//! What clients get when backends fail: retries that hide a dead server, passive ejection, and
//! the 404/502/503/504 answers of the contract.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keel_tests::backend::Blackhole;
use keel_tests::wait::{ADMIN_CHANGE, HEALTH_CHANGE};
use keel_tests::{tally, Backend, Keel, PoolSpec};

#[tokio::test]
async fn connect_failures_are_retried_and_the_dead_server_is_ejected() -> Result<()> {
    let mut bs = Backend::start_many("", 3)?;
    // No active checks: only retries and passive detection can hide the dead server.
    let pool = PoolSpec::new("app", "round_robin").backends(&bs).set("retries = 2").outlier(3, "60s");
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    let proxy = keel.proxy_addr();
    let t = tally(keel.client().backends(proxy, "/", 9).await?.iter().map(String::as_str));
    ensure!(t.len() == 3, "{t:?}");

    bs[1].stop();

    // 100 sequential GETs: every one succeeds, because a refused connect is retried on another
    // server. `backends` fails on the first error or non-2xx.
    let who = keel.client().backends(proxy, "/", 100).await?;
    ensure!(!who.iter().any(|w| w == "b"), "{who:?}");

    // b failed to connect at least 3 times in a row: passive detection ejected it.
    keel.wait_state("app", "b", "ejected", ADMIN_CHANGE).await?;
    let b = keel.server_status("app", "b").await?;
    ensure!(b["connect_errors"].as_u64().unwrap_or(0) >= 3, "b's connect_errors: {b}");
    Ok(())
}

#[tokio::test]
async fn all_servers_down_gives_503_naming_the_pool() -> Result<()> {
    let mut bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("checkout", "round_robin").backends(&bs).health_http("100ms", 2, 2);
    let keel = Keel::builder().default_pool("checkout").pool(pool).start().await?;
    for b in &mut bs {
        keel.wait_state("checkout", b.name(), "up", HEALTH_CHANGE).await?;
        b.stop();
    }
    for b in &bs {
        keel.wait_state("checkout", b.name(), "down", HEALTH_CHANGE).await?;
    }

    let r = keel.get("/").await?;
    ensure!(r.status == 503, "expected 503, got {} {:?}", r.status, r.text());
    ensure!(r.text().contains("checkout"), "the 503 body does not name the pool: {:?}", r.text());
    Ok(())
}

#[tokio::test]
async fn all_servers_refusing_without_checks_gives_503() -> Result<()> {
    // No health checks: keel only learns that the servers are dead by trying them. An HAProxy
    // operator expects 503 (no server could take the request), not 502 (nothing was exchanged).
    let mut bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("checkout", "round_robin").backends(&bs).set("retries = 2");
    let keel = Keel::builder().default_pool("checkout").pool(pool).start().await?;
    for b in &mut bs {
        b.stop();
    }

    let r = keel.get("/").await?;
    ensure!(r.status == 503, "expected 503, got {} {:?}", r.status, r.text());
    ensure!(r.text().contains("checkout"), "the 503 body does not name the pool: {:?}", r.text());
    // And it stays up and keeps answering so.
    let r = keel.get("/").await?;
    ensure!(r.status == 503, "second request: {}", r.status);
    Ok(())
}

#[tokio::test]
async fn a_slow_response_head_gives_504_at_request_timeout() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let pool = PoolSpec::new("app", "round_robin").backends(&bs).set("request_timeout = \"300ms\"");
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;

    let start = Instant::now();
    let r = keel.get("/slow?ms=2000").await?;
    let took = start.elapsed();
    ensure!(r.status == 504, "expected 504, got {} {:?}", r.status, r.text());
    ensure!(took >= Duration::from_millis(250), "504 after only {took:?}: before the timeout");
    ensure!(took < Duration::from_millis(1500), "504 after {took:?}: not at the 300ms timeout");

    let a = keel.server_status("app", "a").await?;
    ensure!(a["timeouts"].as_u64().unwrap_or(0) >= 1, "the timeout is not counted in /status: {a}");

    // A request that fits the timeout still works on the same pool.
    let r = keel.get("/slow?ms=10").await?;
    ensure!(r.status == 200, "{}", r.status);
    Ok(())
}

#[tokio::test]
async fn a_backend_that_closes_without_answering_gives_502() -> Result<()> {
    let hole = Blackhole::start()?;
    let pool = PoolSpec::new("app", "round_robin").server("hole", hole.addr(), None);
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;

    let r = keel.get("/").await?;
    ensure!(r.status == 502, "expected 502, got {} {:?}", r.status, r.text());
    ensure!(hole.accepted() >= 1, "keel never connected to the backend");
    Ok(())
}

#[tokio::test]
async fn no_matching_route_and_no_default_pool_gives_404() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel = Keel::builder()
        .route("host = \"api.example.com\"\npool = \"api\"")
        .pool(PoolSpec::new("api", "round_robin").backends(&bs))
        .start()
        .await?;

    let req = keel_tests::client::get(keel.proxy_addr(), "/").header("host", "www.example.com");
    let r = keel.client().send(keel_tests::client::empty(req)?).await?;
    ensure!(r.status == 404, "expected 404, got {} {:?}", r.status, r.text());
    ensure!(bs[0].requests() == 0, "the unrouted request reached a backend");

    // The route itself works, so the 404 is about routing, not a broken node.
    let req = keel_tests::client::get(keel.proxy_addr(), "/").header("host", "api.example.com");
    let r = keel.client().send(keel_tests::client::empty(req)?).await?;
    ensure!(r.status == 200 && r.backend() == Some("a"), "{} {:?}", r.status, r.backend());
    Ok(())
}

#[tokio::test]
async fn backend_error_statuses_pass_through_untouched() -> Result<()> {
    let bs = Backend::start_many("", 1)?;
    let keel =
        Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends(&bs)).start().await?;

    for code in [404u16, 418, 500, 503] {
        let r = keel.get(&format!("/status/{code}")).await?;
        ensure!(r.status == code, "backend sent {code}, client got {}", r.status);
        ensure!(r.backend() == Some("a") && r.text() == "a", "not the backend's own response: {:?}", r.text());
    }
    Ok(())
}

#[tokio::test]
async fn client_aborts_do_not_count_against_the_server() -> Result<()> {
    // A client that hangs up mid-upload is the client's failure, not the server's (HAProxy logs
    // it as a client-side abort). If passive detection counted it, any client could eject every
    // server of a pool with a few aborted uploads.
    let bs = Backend::start_many("", 1)?;
    let pool = PoolSpec::new("app", "round_robin").backends(&bs).outlier(3, "60s");
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;

    for i in 0..6 {
        let mut s = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
        let head = "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly a little";
        tokio::io::AsyncWriteExt::write_all(&mut s, head.as_bytes()).await?;
        // Hang up only once the upload is being streamed to the backend.
        let want = i + 1;
        keel_tests::wait_until(ADMIN_CHANGE, "the upload to reach the backend", || async {
            bs[0].requests() >= want && bs[0].in_flight() == 1
        })
        .await?;
        drop(s);
        keel_tests::wait_until(ADMIN_CHANGE, "the backend to see the abort", || async { bs[0].in_flight() == 0 })
            .await?;
        let state = keel.server_state("app", "a").await?;
        ensure!(state == "up", "{want} client aborts (consecutive_failures = 3) made the server {state:?}");
    }

    let r = keel.get("/").await?;
    ensure!(r.status == 200, "after 6 client aborts: {} {:?}", r.status, r.text());
    Ok(())
}

#[tokio::test]
async fn ejected_servers_come_back_after_the_ejection_time() -> Result<()> {
    let mut bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("app", "round_robin").backends(&bs).set("retries = 1").outlier(2, "1s");
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    let proxy = keel.proxy_addr();

    bs[1].stop();
    keel.client().backends(proxy, "/", 10).await?;
    keel.wait_state("app", "b", "ejected", ADMIN_CHANGE).await?;
    bs[1].restart()?;

    // After the 1 s ejection b is tried again and, answering, stays in rotation.
    keel.wait_state("app", "b", "up", Duration::from_secs(1) + HEALTH_CHANGE).await?;
    let who = keel.client().backends(proxy, "/", 10).await?;
    // Round robin resumes; where its counter stood when b returned may cost b one turn.
    ensure!(who.iter().filter(|w| *w == "b").count() >= 4, "b is back but not in rotation: {who:?}");
    Ok(())
}
