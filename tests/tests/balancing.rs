//! Each balancing algorithm, observed the only way an operator can: which backend answered
//! real requests sent through keel.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::client::get_fresh;
use keel_tests::wait::{wait_until, HEALTH_CHANGE, REQUEST};
use keel_tests::{tally, Backend, Client, Keel, PoolSpec};

async fn keel_for(pool: PoolSpec) -> Result<Keel> {
    Keel::builder().default_pool(pool.name()).pool(pool).start().await
}

fn counts(who: &[String]) -> std::collections::BTreeMap<String, usize> {
    tally(who.iter().map(String::as_str))
}

#[tokio::test]
async fn round_robin_rotates_exactly() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "round_robin").backends(&bs)).await?;

    let who = keel.client().backends(keel.proxy_addr(), "/", 300).await?;

    let t = counts(&who);
    ensure!(t.len() == 3 && t.values().all(|&n| n == 100), "expected 100 each, got {t:?}");
    // Not just the totals: a strict rotation, period 3, all three in every window.
    let mut first = who[..3].to_vec();
    first.sort();
    ensure!(first == ["a", "b", "c"], "first three requests went to {:?}", &who[..3]);
    for i in 3..who.len() {
        ensure!(who[i] == who[i - 3], "request {i} went to {} but request {} went to {}", who[i], i - 3, who[i - 3]);
    }
    for b in &bs {
        assert_eq!(b.requests(), 100, "backend {} saw {} requests", b.name(), b.requests());
    }
    Ok(())
}

#[tokio::test]
async fn weighted_round_robin_is_smooth() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "weighted_round_robin").backends(&bs).weights(&[5, 1, 1])).await?;

    // Sequential requests, each on a fresh connection: the rotation is per pool, not per connection.
    let mut who = Vec::new();
    for i in 0..70 {
        let r = get_fresh(keel.proxy_addr(), "/").await.with_context(|| format!("request {i}"))?;
        ensure!(r.status == 200, "request {i}: {}", r.status);
        who.push(r.backend().unwrap_or("?").to_owned());
    }

    // nginx's smooth weighted round robin for 5,1,1: a,a,b,a,c,a,a, repeated. Accept any phase
    // of it (a request before ours would shift it), but nothing else.
    let pattern = ["a", "a", "b", "a", "c", "a", "a"];
    let phase_ok = |off: usize| who.iter().enumerate().all(|(i, w)| w == pattern[(i + off) % 7]);
    ensure!((0..7).any(phase_ok), "not the a,a,b,a,c,a,a pattern: {who:?}");
    let t = counts(&who);
    ensure!(t.get("a") == Some(&50) && t.get("b") == Some(&10) && t.get("c") == Some(&10), "{t:?}");
    Ok(())
}

#[tokio::test]
async fn least_connections_avoids_the_busy_server() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "least_connections").backends(&bs)).await?;
    let proxy = keel.proxy_addr();

    // Make a slow, then send single requests until one of them is stuck on a. Requests that
    // land on b or c complete at once; the bound keeps this finite if keel never picks a.
    bs[0].set_delay(Duration::from_secs(8));
    let mut holding = Vec::new();
    for _ in 0..20 {
        let before = bs[0].in_flight();
        let task = tokio::spawn(async move { get_fresh(proxy, "/").await });
        wait_until(REQUEST, "the request to complete or to be held by a", || async {
            task.is_finished() || bs[0].in_flight() > before
        })
        .await?;
        if task.is_finished() {
            let r = task.await??;
            ensure!(r.status == 200 && r.backend() != Some("a"), "unexpected {} from {:?}", r.status, r.backend());
        } else {
            holding.push(task);
            break;
        }
    }
    ensure!(bs[0].in_flight() == 1, "could not get a request held by a (a in flight: {})", bs[0].in_flight());

    // a has one request in flight, b and c none: every new request goes to b or c.
    let who = keel.client().backends(proxy, "/", 60).await?;
    let t = counts(&who);
    ensure!(!t.contains_key("a"), "least_connections sent requests to the busy server: {t:?}");
    ensure!(t.values().sum::<usize>() == 60, "{t:?}");
    for h in holding {
        h.abort();
    }
    Ok(())
}

#[tokio::test]
async fn least_request_p2c_spreads_load() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "least_request_p2c").backends(&bs)).await?;

    let who = keel.client().backends(keel.proxy_addr(), "/", 300).await?;

    let t = counts(&who);
    ensure!(t.len() == 3, "not all three servers got traffic: {t:?}");
    ensure!(t.values().all(|&n| n >= 30), "a server got less than 10% of 300 requests: {t:?}");
    Ok(())
}

#[tokio::test]
async fn ip_hash_sticks_and_moves_to_one_other_server_when_the_owner_dies() -> Result<()> {
    let mut bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "ip_hash").backends(&bs).health_http("100ms", 2, 2)).await?;
    for b in &bs {
        keel.wait_state("app", b.name(), "up", HEALTH_CHANGE).await?;
    }

    // All requests come from 127.0.0.1: one owner.
    let who = keel.client().backends(keel.proxy_addr(), "/", 100).await?;
    let t = counts(&who);
    ensure!(t.len() == 1, "one client address spread over {t:?}");
    let owner = who[0].clone();

    let idx = bs.iter().position(|b| b.name() == owner).context("owner is one of ours")?;
    bs[idx].stop();
    keel.wait_state("app", &owner, "down", HEALTH_CHANGE).await?;

    let who = keel.client().backends(keel.proxy_addr(), "/", 100).await?;
    let t = counts(&who);
    ensure!(t.len() == 1, "after {owner} died, one client address spread over {t:?}");
    ensure!(who[0] != owner, "requests still reach the stopped {owner}");
    Ok(())
}

#[tokio::test]
async fn random_gives_everyone_a_share() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "random").backends(&bs)).await?;

    let who = keel.client().backends(keel.proxy_addr(), "/", 600).await?;

    // Expected 200 each; the standard deviation is ~11.5, so 120..=280 is about 7 sigma.
    let t = counts(&who);
    ensure!(t.len() == 3, "{t:?}");
    ensure!(t.values().all(|&n| (120..=280).contains(&n)), "random is far from uniform: {t:?}");
    Ok(())
}

#[tokio::test]
async fn h2c_requests_are_balanced_too() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel = keel_for(PoolSpec::new("app", "round_robin").backends(&bs)).await?;

    let who = Client::h2c().backends(keel.proxy_addr(), "/", 30).await?;

    let t = counts(&who);
    ensure!(t.len() == 3 && t.values().all(|&n| n == 10), "{t:?}");
    Ok(())
}
