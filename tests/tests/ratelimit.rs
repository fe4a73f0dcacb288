//! Per-client rate limiting (`[listeners.web.rate_limit]`, and per route): over the limit a
//! client gets `429` with an integer `Retry-After` ≥ 1 and the backend never sees the request;
//! other clients are unaffected; the client is served again after the window; the client table
//! is bounded (`max_clients`), evicting under a flood of keys without growing memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use keel_tests::client::get;
use keel_tests::raw::{RawConn, ReadOutcome};
use keel_tests::wait::REQUEST;
use keel_tests::{Backend, Client, Keel, PoolSpec, Reply};

/// The longest `Retry-After` a test is willing to wait out.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(3);

/// Time the 20,000-key flood may take (a debug build on a shared 2-core machine).
const FLOOD: Duration = Duration::from_secs(60);

/// Distinct keys in the flood.
const FLOOD_KEYS: usize = 20_000;

/// Concurrent connections sending the flood.
const FLOOD_CONNECTIONS: usize = 32;

/// Requests written at once on each flood connection.
const PIPELINE: usize = 50;

/// How much keel's resident memory may grow over the flood: the client table is allocated up
/// front (about 17 bytes per client), so 20,000 keys through a 1,000-entry table should cost
/// nothing; 20 MB leaves room for allocator noise and connection buffers.
const RSS_GROWTH_BOUND: u64 = 20 * 1024 * 1024;

async fn get_with_key(client: &Client, keel: &Keel, path: &str, key: &str) -> Result<Reply> {
    let req = get(keel.proxy_addr(), path).header("x-api-key", key).body(Full::new(Bytes::new()))?;
    client.send(req).await
}

/// Checks a 429: integer `Retry-After` ≥ 1; returns it.
fn retry_after(r: &Reply, what: &str) -> Result<u64> {
    let v = r.header("retry-after").with_context(|| format!("{what}: 429 without Retry-After: {:?}", r.headers))?;
    let secs: u64 = v.trim().parse().with_context(|| format!("{what}: Retry-After {v:?} is not an integer"))?;
    ensure!(secs >= 1, "{what}: Retry-After {secs} < 1");
    Ok(secs)
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_while_another_is_served() -> Result<()> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw("[listeners.web.rate_limit]\nrate = 5\nper = \"1s\"\nburst = 5\nheader = \"x-api-key\"")
        .start()
        .await?;
    let keel = Arc::new(keel);

    // Client B: 4 requests a second, under the rate, for the whole time A is being limited.
    let b = {
        let keel = keel.clone();
        tokio::spawn(async move {
            let client = Client::new();
            let mut statuses = Vec::new();
            for i in 0..10 {
                let r = get_with_key(&client, &keel, &format!("/b{i}"), "client-B").await?;
                statuses.push(r.status.as_u16());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Ok::<_, anyhow::Error>(statuses)
        })
    };

    // Client A: 20 requests at once-after-another speed.
    let client = Client::new();
    let start = Instant::now();
    let (mut ok, mut limited, mut max_retry) = (0u64, 0u64, 0u64);
    for i in 0..20 {
        let r = get_with_key(&client, &keel, &format!("/a{i}"), "client-A").await?;
        match r.status.as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                max_retry = max_retry.max(retry_after(&r, &format!("A request {i}"))?);
            }
            s => bail!("A request {i}: unexpected status {s}"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Burst 5, plus whatever refilled at 5/s while the 20 requests ran.
    let allowed = 5 + (elapsed * 5.0).ceil() as u64 + 1;
    ensure!(ok <= allowed, "A got {ok} of 20 served in {elapsed:.2}s; burst 5 + 5/s allows at most {allowed}");
    ensure!(limited >= 20 - allowed, "A was limited only {limited} times");
    let a_seen = app.paths().iter().filter(|p| p.starts_with("/a")).count() as u64;
    ensure!(a_seen == ok, "the backend saw {a_seen} of A's requests but only {ok} were answered 200");

    let b_statuses = b.await??;
    ensure!(b_statuses.iter().all(|s| *s == 200), "client B at 4/s was not always served: {b_statuses:?}");

    // After the window, A is served again.
    ensure!(
        Duration::from_secs(max_retry) <= MAX_RETRY_WAIT,
        "Retry-After {max_retry}s is longer than a 1s window needs"
    );
    tokio::time::sleep(Duration::from_secs(max_retry)).await;
    let r = get_with_key(&client, &keel, "/a-again", "client-A").await?;
    ensure!(r.status == 200, "A after waiting Retry-After ({max_retry}s): {}", r.status);

    let m = keel.metric("keel_ratelimit_limited_total", &["listener=\"web\""], None).await?;
    ensure!(m.is_some_and(|v| v >= limited as f64), "keel_ratelimit_limited_total = {m:?}, expected ≥ {limited}");
    Ok(())
}

#[tokio::test]
async fn a_route_rate_limit_replaces_the_listeners() -> Result<()> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .route("path_prefix = \"/strict\"\npool = \"app\"\n\n[listeners.web.routes.rate_limit]\nrate = 1\nper = \"10s\"\nburst = 2")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw("[listeners.web.rate_limit]\nrate = 1000\nper = \"1s\"\nburst = 1000")
        .start()
        .await?;
    let client = Client::new();
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(client.get(keel.proxy_addr(), &format!("/strict/{i}")).await?.status.as_u16());
    }
    ensure!(statuses == [200, 200, 429, 429], "/strict with burst 2 per 10s: {statuses:?}");
    let strict_seen = app.paths().iter().filter(|p| p.starts_with("/strict")).count();
    ensure!(strict_seen == 2, "the backend saw {strict_seen} /strict requests, expected 2");
    for i in 0..30 {
        let r = client.get(keel.proxy_addr(), &format!("/free/{i}")).await?;
        ensure!(r.status == 200, "/free request {i} under the listener's 1000/s: {}", r.status);
    }
    let r = client.get(keel.proxy_addr(), "/strict/again").await?;
    ensure!(r.status == 429, "/strict is still limited: {}", r.status);
    retry_after(&r, "/strict")?;
    Ok(())
}

#[tokio::test]
async fn a_flood_of_keys_evicts_and_memory_stays_bounded() -> Result<()> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw(
            "[listeners.web.rate_limit]\nrate = 1\nper = \"1h\"\nburst = 1\nheader = \"x-api-key\"\nmax_clients = 1000",
        )
        .start()
        .await?;
    let keel = Arc::new(keel);

    // Warm up connections and allocator before the first measurement.
    let warm = run_keys(&keel, "warm", 2_000).await?;
    ensure!(warm.errors == 0, "{} errors in the warm-up", warm.errors);
    let rss_before = keel.rss_bytes()?;

    let start = Instant::now();
    let flood = tokio::time::timeout(FLOOD, run_keys(&keel, "flood", FLOOD_KEYS))
        .await
        .map_err(|_| anyhow::anyhow!("{FLOOD_KEYS} requests did not finish within {FLOOD:?}"))??;
    let took = start.elapsed();
    let rss_after = keel.rss_bytes()?;
    eprintln!(
        "{FLOOD_KEYS} keys in {took:?}: {} ok, {} limited, {} errors; RSS {} KiB -> {} KiB",
        flood.ok,
        flood.limited,
        flood.errors,
        rss_before / 1024,
        rss_after / 1024
    );
    ensure!(flood.errors == 0, "{} transport errors or unexpected statuses in the flood", flood.errors);
    ensure!(
        flood.ok as usize == FLOOD_KEYS,
        "only {} of {FLOOD_KEYS} distinct keys were served (each has a full bucket)",
        flood.ok
    );

    let evictions = keel.metric("keel_ratelimit_evictions_total", &["listener=\"web\""], None).await?;
    ensure!(
        evictions.is_some_and(|v| v > 0.0),
        "keel_ratelimit_evictions_total = {evictions:?} after {FLOOD_KEYS} keys into 1000 slots"
    );
    let tracked = keel.metric("keel_ratelimit_tracked_clients", &["listener=\"web\""], None).await?;
    ensure!(tracked.is_some_and(|v| v <= 1000.0), "keel_ratelimit_tracked_clients = {tracked:?}, max_clients is 1000");
    let growth = rss_after.saturating_sub(rss_before);
    ensure!(
        growth < RSS_GROWTH_BOUND,
        "keel's RSS grew by {} KiB over {FLOOD_KEYS} keys (bound {} KiB)",
        growth / 1024,
        RSS_GROWTH_BOUND / 1024
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    ok: u64,
    limited: u64,
    errors: u64,
}

/// Sends one request per key `PREFIX-i`, `i < n`, over [`FLOOD_CONNECTIONS`] keep-alive
/// connections, pipelining [`PIPELINE`] requests at a time (the test client stays cheap, so
/// the time goes to keel).
async fn run_keys(keel: &Arc<Keel>, prefix: &str, n: usize) -> Result<Counts> {
    let mut tasks = Vec::new();
    for t in 0..FLOOD_CONNECTIONS {
        let addr = keel.proxy_addr();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = Counts::default();
            let keys: Vec<usize> = (t..n).step_by(FLOOD_CONNECTIONS).collect();
            let mut conn = RawConn::connect(addr).await?;
            for batch in keys.chunks(PIPELINE) {
                let mut bytes = Vec::new();
                for i in batch {
                    bytes.extend_from_slice(
                        format!("GET / HTTP/1.1\r\nHost: x\r\nx-api-key: {prefix}-{i}\r\n\r\n").as_bytes(),
                    );
                }
                conn.write(&bytes).await?;
                for _ in batch {
                    match conn.read_response(REQUEST).await? {
                        ReadOutcome::Response(r) if r.status == 200 => c.ok += 1,
                        ReadOutcome::Response(r) if r.status == 429 => c.limited += 1,
                        ReadOutcome::Response(_) => c.errors += 1,
                        ReadOutcome::Closed(_) => bail!("connection {t} closed mid-flood"),
                    }
                }
            }
            Ok::<_, anyhow::Error>(c)
        }));
    }
    let mut total = Counts::default();
    for t in tasks {
        let c = t.await??;
        total.ok += c.ok;
        total.limited += c.limited;
        total.errors += c.errors;
    }
    Ok(total)
}

#[tokio::test]
async fn without_a_header_clients_are_keyed_by_address_and_h2_streams_count() -> Result<()> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw("[listeners.web.rate_limit]\nrate = 1\nper = \"10s\"\nburst = 3")
        .start()
        .await?;
    // Six h2c streams on one connection from 127.0.0.1: three served, three limited.
    let h2 = Client::h2c();
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(h2.get(keel.proxy_addr(), &format!("/h2/{i}")).await?.status.as_u16());
    }
    ensure!(statuses == [200, 200, 200, 429, 429, 429], "h2c streams from one client, burst 3: {statuses:?}");
    let seen = app.paths().iter().filter(|p| p.starts_with("/h2/")).count();
    ensure!(seen == 3, "the backend saw {seen} of the h2 requests, expected 3");
    // Another address has its own bucket.
    let mut c = RawConn::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), keel.proxy_addr()).await?;
    c.write(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match c.read_response(REQUEST).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200, "127.0.0.2 while 127.0.0.1 is limited: {}", r.status),
        ReadOutcome::Closed(_) => bail!("127.0.0.2's request: closed"),
    }
    Ok(())
}
