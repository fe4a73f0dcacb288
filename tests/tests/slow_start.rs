//! Slow start: a server back in rotation gets a small share of requests early in the pool's
//! `slow_start` window and its full share after it, and `/status` shows its effective weight.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::wait::wait_until;
use keel_tests::{tally, Backend, Keel, PoolSpec};

/// The pool's window: long enough that the first burst of requests lands in its first step,
/// short enough to keep the test within seconds.
const WINDOW: &str = "4s";
/// Bound on waiting for the ramp to finish (the window plus room for a busy machine).
const RAMP_DONE: Duration = Duration::from_secs(10);

async fn effective_weight(keel: &Keel, server: &str) -> Result<f64> {
    let s = keel.server_status("app", server).await?;
    s["effective_weight"].as_f64().with_context(|| format!("no effective_weight in {s}"))
}

#[tokio::test]
async fn an_enabled_server_ramps_from_a_small_share_to_its_full_share() -> Result<()> {
    let bs = Backend::start_many("", 2)?;
    let pool = PoolSpec::new("app", "weighted_round_robin").backends(&bs).set(&format!("slow_start = \"{WINDOW}\""));
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;

    // At start-up nothing ramps: even shares.
    let who = keel.client().backends(keel.proxy_addr(), "/", 20).await?;
    ensure!(tally(who.iter().map(String::as_str)).get("b") == Some(&10), "before: {who:?}");

    for action in ["drain", "enable"] {
        let r = keel.admin_post(&format!("/pools/app/servers/b/{action}"), "").await?;
        ensure!(r.status == 200, "{action}: {} {:?}", r.status, r.text());
    }
    let enabled = std::time::Instant::now();
    let early_weight = effective_weight(&keel, "b").await?;
    let who = keel.client().backends(keel.proxy_addr(), "/", 44).await?;
    let early = tally(who.iter().map(String::as_str)).get("b").copied().unwrap_or(0);
    ensure!(early_weight < 0.5, "effective weight right after enable: {early_weight}");
    // Step 1 gives b one request in eleven (4 of 44); a step or two later is still well under
    // half.
    ensure!((1..=12).contains(&early), "early in the window b got {early} of 44: {who:?}");

    wait_until(RAMP_DONE, "the ramp to end", || async {
        effective_weight(&keel, "b").await.is_ok_and(|w| (w - 1.0).abs() < 1e-9)
    })
    .await?;
    eprintln!("early weight {early_weight}, early share {early}/44, ramp over after {:?}", enabled.elapsed());
    let who = keel.client().backends(keel.proxy_addr(), "/", 40).await?;
    let late = tally(who.iter().map(String::as_str)).get("b").copied().unwrap_or(0);
    // Even shares, give or take the one pick smooth weighted round robin carries over from the
    // ramp ("a, a, b, a, b, …" gives b 19 of 40).
    ensure!((19..=21).contains(&late), "after the window b got {late} of 40: {who:?}");
    Ok(())
}
