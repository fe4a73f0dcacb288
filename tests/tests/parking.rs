//! The parking lot (`node/src/proxy/lot.rs`): an idle keep-alive connection leaves its task for
//! the listener's lot, and must come back from it whole — served again with its request count
//! carried — closed at the idle timeout, and closed at once when the node drains. Whether a
//! connection is in the lot is read from `keel_connections_parked`, so the tests wait on the
//! state they need instead of sleeping past `PARK_AFTER`.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::raw::{header, RawConn, ReadOutcome};
use keel_tests::wait::{ADMIN_CHANGE, EXIT, REQUEST};
use keel_tests::{wait_until, Backend, Keel, PoolSpec};

/// How late past a configured timeout keel may act (a debug build on a loaded machine).
const MARGIN: Duration = Duration::from_millis(1500);

/// Time for keel to close parked connections once draining starts ("at once").
const DRAIN_CLOSE: Duration = Duration::from_secs(3);

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

async fn keel_with_limits(limits: &str, drain_timeout: &str) -> Result<(Backend, Keel)> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .drain_timeout(drain_timeout)
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw(&format!("[listeners.web.limits]\n{limits}"))
        .start()
        .await?;
    Ok((app, keel))
}

/// `n` connections, each having had one request answered and kept open.
async fn open_kept(keel: &Keel, n: u32) -> Result<Vec<RawConn>> {
    let mut conns = Vec::new();
    for i in 0..n {
        let mut c = RawConn::connect(keel.proxy_addr()).await?;
        ensure!(!get(&mut c, &format!("connection {i}")).await?, "connection {i} was closed");
        conns.push(c);
    }
    Ok(conns)
}

async fn gauge(keel: &Keel, metric: &str) -> Result<f64> {
    keel.metric(metric, &["listener=\"web\""], None).await?.with_context(|| format!("no {metric} for web"))
}

/// How long `n` kept-alive connections may take to reach the lot. Each parks 5 ms after its
/// response, so this is slack for a loaded box: in one fresh-clone CI run (2 cores, the rest of
/// the workspace's tests beside it, debug build) 20 connections had not all parked within
/// `ADMIN_CHANGE`'s 2 s; locally they park in tens of milliseconds.
const PARK_ALL: Duration = Duration::from_secs(6);

/// Waits until `n` connections are in the lot.
async fn wait_parked(keel: &Keel, n: u32, what: &str) -> Result<()> {
    wait_until(PARK_ALL, what, || async {
        gauge(keel, "keel_connections_parked").await.is_ok_and(|v| v == f64::from(n))
    })
    .await
}

/// Sends a GET on `c`; returns whether the 200 answering it says `Connection: close`.
async fn get(c: &mut RawConn, what: &str) -> Result<bool> {
    c.write(GET).await.with_context(|| what.to_owned())?;
    let r = match c.read_response(REQUEST).await.with_context(|| what.to_owned())? {
        ReadOutcome::Response(r) => r,
        ReadOutcome::Closed(got) => bail!("{what}: closed ({:?})", String::from_utf8_lossy(&got)),
    };
    ensure!(r.status == 200, "{what}: {}", r.status);
    Ok(header(&r, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")))
}

#[tokio::test]
async fn a_parked_connection_is_served_again_with_its_request_count() -> Result<()> {
    let (app, keel) = keel_with_limits("max_requests_per_connection = 3\nidle_timeout = \"60s\"", "5s").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    for i in 1..=2 {
        ensure!(!get(&mut c, &format!("request {i}")).await?, "request {i} of 3 closed the connection");
        wait_parked(&keel, 1, &format!("the connection to park after request {i}")).await?;
    }
    // The third request comes out of the lot: it is the last one allowed, so the count of the
    // two before it must have survived the parking.
    ensure!(get(&mut c, "request 3").await?, "request 3 of 3 did not close: the request count was lost");
    let got = c.expect_close(REQUEST).await?;
    ensure!(got.is_empty(), "after the last response: {:?}", String::from_utf8_lossy(&got));
    ensure!(app.requests() == 3, "backend saw {} requests", app.requests());
    wait_parked(&keel, 0, "the lot to be empty").await?;
    Ok(())
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_the_idle_timeout() -> Result<()> {
    let (_app, keel) = keel_with_limits("idle_timeout = \"1s\"\nheader_timeout = \"30s\"", "5s").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    ensure!(!get(&mut c, "first request").await?, "the first request closed the connection");
    let idle_from = Instant::now();
    wait_parked(&keel, 1, "the connection to park").await?;
    let got = c.expect_close(Duration::from_secs(1) + MARGIN).await?;
    let after = idle_from.elapsed();
    ensure!(got.is_empty(), "an idle connection was sent {:?}", String::from_utf8_lossy(&got));
    ensure!(after >= Duration::from_millis(900), "closed after {after:?}, before the 1s idle timeout");
    wait_parked(&keel, 0, "the lot to let the connection go").await?;
    wait_until(ADMIN_CHANGE, "the connection's permit to be released", || async {
        gauge(&keel, "keel_connections_open").await.is_ok_and(|v| v == 0.0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn draining_closes_parked_connections_at_once() -> Result<()> {
    const CONNS: u32 = 3;
    let (_app, mut keel) = keel_with_limits("idle_timeout = \"60s\"", "30s").await?;
    let mut conns = open_kept(&keel, CONNS).await?;
    wait_parked(&keel, CONNS, "every connection to park").await?;
    let start = Instant::now();
    keel.sigterm()?;
    for (i, c) in conns.iter_mut().enumerate() {
        let got = c.expect_close(DRAIN_CLOSE).await.with_context(|| format!("connection {i}"))?;
        ensure!(got.is_empty(), "connection {i} was sent {:?}", String::from_utf8_lossy(&got));
    }
    let status = keel.wait_exit(EXIT).await?;
    ensure!(status.success(), "exit status {status}; log:\n{}", keel.log());
    ensure!(start.elapsed() < DRAIN_CLOSE + EXIT, "parked connections held the drain for {:?}", start.elapsed());
    Ok(())
}

#[tokio::test]
async fn parked_connections_come_back_on_a_multi_thread_runtime() -> Result<()> {
    // workers = 2: connections park from either worker thread into one lot per listener.
    const CONNS: u32 = 20;
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .workers(2)
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .start()
        .await?;
    let mut conns = open_kept(&keel, CONNS).await?;
    wait_parked(&keel, CONNS, "every connection to park").await?;
    for round in 1..=2 {
        for (i, c) in conns.iter_mut().enumerate() {
            c.write(GET).await.with_context(|| format!("round {round}, connection {i}"))?;
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let what = format!("round {round}, connection {i}, out of the lot");
            match c.read_response(REQUEST).await.with_context(|| what.clone())? {
                ReadOutcome::Response(r) if r.status == 200 => {}
                other => bail!("{what}: {other:?}"),
            }
        }
        wait_parked(&keel, CONNS, &format!("every connection to park again after round {round}")).await?;
    }
    ensure!(app.requests() == 3 * u64::from(CONNS), "backend saw {} requests", app.requests());
    Ok(())
}
