//! Active health checks: servers leave rotation when their checks fail `fall` times and come
//! back after `rise` successes, as seen in `/status` and in where requests go.
//!
//! Checks run every 100 ms with rise = fall = 2, so a change takes ~0.2 s; the deadline for it
//! to show is [`HEALTH_CHANGE`].

use std::time::Instant;

use anyhow::{ensure, Result};
use keel_tests::wait::{wait_until, HEALTH_CHANGE, POLL};
use keel_tests::{tally, Backend, Keel, PoolSpec};

/// Round robin over `bs` with HTTP checks of /healthz every 100 ms, rise 2, fall 2. Passive
/// outlier detection is off so that only the checks decide.
async fn checked(bs: &[Backend]) -> Result<Keel> {
    let pool = PoolSpec::new("app", "round_robin").backends(bs).health_http("100ms", 2, 2).no_outlier();
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    for b in bs {
        keel.wait_state("app", b.name(), "up", HEALTH_CHANGE).await?;
    }
    // keel (like HAProxy) starts a server "up but unconfirmed": a failure before its first
    // success takes it down at once. Wait for two passed checks, so that keel has processed at
    // least one and rise/fall apply from here on.
    wait_until(HEALTH_CHANGE, "two passed health checks on every backend", || async {
        bs.iter().all(|b| b.health_checks() - b.unhealthy_answers() >= 2)
    })
    .await?;
    Ok(keel)
}

#[tokio::test]
async fn checks_hit_the_configured_path_at_the_interval() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let _keel = checked(&bs).await?;
    let start = Instant::now();
    let before: Vec<u64> = bs.iter().map(Backend::health_checks).collect();
    // 5 more checks each at 100 ms: ~0.5 s; allow a loaded machine 3 s.
    wait_until(HEALTH_CHANGE, "5 more /healthz checks on every backend", || async {
        bs.iter().zip(&before).all(|(b, n)| b.health_checks() >= n + 5)
    })
    .await?;
    ensure!(bs.iter().all(|b| b.requests() == 0), "checks must use /healthz only: {:?}", bs[0].paths());
    eprintln!("5 checks took {:?}", start.elapsed());
    Ok(())
}

#[tokio::test]
async fn a_stopped_server_leaves_rotation_and_returns_after_rise() -> Result<()> {
    let mut bs = Backend::start_many("", 3)?;
    let keel = checked(&bs).await?;
    let proxy = keel.proxy_addr();

    let t = tally(keel.client().backends(proxy, "/", 30).await?.iter().map(String::as_str));
    ensure!(t.len() == 3, "all three serve before the failure: {t:?}");

    bs[1].stop();
    let stopped = Instant::now();
    keel.wait_state("app", "b", "down", HEALTH_CHANGE).await?;
    eprintln!("b marked down {:?} after it stopped", stopped.elapsed());

    // b is out of rotation: every request succeeds (none is sent to the dead server).
    let who = keel.client().backends(proxy, "/", 60).await?;
    let t = tally(who.iter().map(String::as_str));
    ensure!(!t.contains_key("b") && t.values().sum::<usize>() == 60, "{t:?}");

    bs[1].restart()?;
    keel.wait_state("app", "b", "up", HEALTH_CHANGE).await?;
    let before = bs[1].requests();
    let who = keel.client().backends(proxy, "/", 30).await?;
    ensure!(who.iter().any(|w| w == "b"), "b is up again but gets no requests: {who:?}");
    ensure!(bs[1].requests() > before, "b's own count did not move");
    Ok(())
}

#[tokio::test]
async fn a_failing_health_endpoint_takes_a_live_server_out() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = checked(&bs).await?;
    let proxy = keel.proxy_addr();

    bs[2].set_healthy(false);
    keel.wait_state("app", "c", "down", HEALTH_CHANGE).await?;

    // c still answers requests if asked, so this proves keel does not ask it.
    let before = bs[2].requests();
    let who = keel.client().backends(proxy, "/", 60).await?;
    ensure!(!who.iter().any(|w| w == "c"), "requests reached c while it is down: {who:?}");
    ensure!(bs[2].requests() == before, "c received {} requests while down", bs[2].requests() - before);

    bs[2].set_healthy(true);
    keel.wait_state("app", "c", "up", HEALTH_CHANGE).await?;
    let who = keel.client().backends(proxy, "/", 30).await?;
    ensure!(who.iter().any(|w| w == "c"), "c is up again but gets no requests: {who:?}");
    Ok(())
}

#[tokio::test]
async fn one_failed_check_is_not_enough_with_fall_2() -> Result<()> {
    // With fall = 2 a server must fail two checks in a row. Fail exactly one check, then pass
    // again: the server must never be reported down.
    let bs = Backend::start_many("", 1)?;
    let keel = checked(&bs).await?;
    bs[0].set_healthy(false);
    wait_until(HEALTH_CHANGE, "one check to fail", || async { bs[0].unhealthy_answers() >= 1 }).await?;
    bs[0].set_healthy(true);
    // Checks come every 100 ms and we flip back within one poll (15 ms).
    ensure!(bs[0].unhealthy_answers() == 1, "two checks within 15 ms: the interval is not respected");
    let n = bs[0].health_checks();
    let start = Instant::now();
    while bs[0].health_checks() < n + 3 {
        ensure!(start.elapsed() < HEALTH_CHANGE, "checks stopped coming");
        let state = keel.server_state("app", "a").await?;
        ensure!(state == "up", "a single failed check (fall = 2) made the server {state:?}");
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

#[tokio::test]
async fn tcp_checks_follow_the_listener() -> Result<()> {
    let mut bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("app", "round_robin")
        .backends(&bs)
        .health(&["type = \"tcp\"", "interval = \"100ms\"", "timeout = \"100ms\"", "rise = 2", "fall = 2"])
        .no_outlier();
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    keel.wait_state("app", "a", "up", HEALTH_CHANGE).await?;

    // An unhealthy /healthz does not matter to a TCP check.
    bs[0].set_healthy(false);
    bs[0].stop();
    keel.wait_state("app", "a", "down", HEALTH_CHANGE).await?;
    let who = keel.client().backends(keel.proxy_addr(), "/", 20).await?;
    ensure!(who.iter().all(|w| w == "b"), "{who:?}");

    bs[0].restart()?;
    keel.wait_state("app", "a", "up", HEALTH_CHANGE).await?;
    Ok(())
}

#[tokio::test]
async fn expect_status_and_path_are_honoured() -> Result<()> {
    // The check path answers 302: "200-399" accepts it, "200-299" does not.
    let bs = Backend::start_many("", 2)?;
    let check = |expect: &str| {
        [
            "type = \"http\"".to_owned(),
            "path = \"/status/302\"".to_owned(),
            format!("expect_status = \"{expect}\""),
            "interval = \"100ms\"".to_owned(),
            "timeout = \"100ms\"".to_owned(),
            "rise = 2".to_owned(),
            "fall = 2".to_owned(),
        ]
    };
    let lenient = check("200-399");
    let strict = check("200-299");
    let keel = Keel::builder()
        .default_pool("lenient")
        .pool(
            PoolSpec::new("lenient", "round_robin")
                .backends([&bs[0]])
                .health(&lenient.iter().map(String::as_str).collect::<Vec<_>>())
                .no_outlier(),
        )
        .pool(
            PoolSpec::new("strict", "round_robin")
                .backends([&bs[1]])
                .health(&strict.iter().map(String::as_str).collect::<Vec<_>>())
                .no_outlier(),
        )
        .start()
        .await?;
    keel.wait_state("strict", "b", "down", HEALTH_CHANGE).await?;
    wait_until(HEALTH_CHANGE, "several checks of the lenient pool", || async { bs[0].requests() >= 4 }).await?;
    ensure!(keel.server_state("lenient", "a").await? == "up", "302 is within 200-399");
    ensure!(bs[0].paths().iter().all(|p| p == "/status/302"), "checks used {:?}", bs[0].paths());
    Ok(())
}
