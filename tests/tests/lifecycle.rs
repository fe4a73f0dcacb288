//! Process lifecycle: graceful shutdown on SIGTERM/SIGINT, the drain deadline, and refusing to
//! start on a bad config or a taken port.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keel_tests::client::get_fresh;
use keel_tests::keel::run_keel;
use keel_tests::ports::free_addr;
use keel_tests::tempdir::TempDir;
use keel_tests::wait::{wait_until, EXIT, REQUEST};
use keel_tests::{Backend, Keel, PoolSpec};

async fn one_backend_keel(drain_timeout: &str) -> Result<(Backend, Keel)> {
    let a = Backend::start("a")?;
    let keel = Keel::builder()
        .drain_timeout(drain_timeout)
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&a]))
        .start()
        .await?;
    Ok((a, keel))
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_refuses_new_ones_and_exits_0() -> Result<()> {
    let (a, mut keel) = one_backend_keel("5s").await?;
    let proxy = keel.proxy_addr();

    let slow = tokio::spawn(async move { get_fresh(proxy, "/slow?ms=1500").await });
    wait_until(REQUEST, "the slow request to reach the backend", || async { a.in_flight() == 1 }).await?;
    let sent = Instant::now();
    keel.sigterm()?;

    // The listener closes: new connections are refused while the old request is still running.
    wait_until(Duration::from_secs(1), "new connections to the proxy to be refused after SIGTERM", || async {
        tokio::net::TcpStream::connect(proxy).await.is_err()
    })
    .await?;
    ensure!(!slow.is_finished(), "the slow request ended before its time");

    let r = slow.await?.context("the in-flight request failed during shutdown")?;
    ensure!(r.status == 200 && r.text() == "a", "in-flight request: {} {:?}", r.status, r.text());

    let status = keel.wait_exit(EXIT).await?;
    ensure!(status.success(), "keel exited with {status} after a graceful shutdown; log:\n{}", keel.log());
    ensure!(sent.elapsed() < Duration::from_millis(1500) + EXIT, "shutdown took {:?}", sent.elapsed());
    Ok(())
}

#[tokio::test]
async fn idle_node_exits_0_promptly_on_sigterm() -> Result<()> {
    let (_a, mut keel) = one_backend_keel("10s").await?;
    // A keep-alive connection with nothing in flight must not hold shutdown up until the drain
    // deadline.
    ensure!(keel.get("/").await?.status == 200);
    let start = Instant::now();
    keel.sigterm()?;
    let status = keel.wait_exit(EXIT).await?;
    ensure!(status.success(), "exit status {status}; log:\n{}", keel.log());
    ensure!(start.elapsed() < Duration::from_secs(5), "an idle node took {:?} to stop", start.elapsed());
    Ok(())
}

#[tokio::test]
async fn sigint_is_a_graceful_shutdown_too() -> Result<()> {
    let (_a, mut keel) = one_backend_keel("5s").await?;
    keel.sigint()?;
    let status = keel.wait_exit(EXIT).await?;
    ensure!(status.success(), "exit status {status}; log:\n{}", keel.log());
    Ok(())
}

#[tokio::test]
async fn the_drain_timeout_bounds_shutdown() -> Result<()> {
    let (a, mut keel) = one_backend_keel("1s").await?;
    let proxy = keel.proxy_addr();
    let stuck = tokio::spawn(async move { get_fresh(proxy, "/slow?ms=8000").await });
    wait_until(REQUEST, "the slow request to reach the backend", || async { a.in_flight() == 1 }).await?;

    let start = Instant::now();
    keel.sigterm()?;
    let status = keel.wait_exit(EXIT).await?;
    let took = start.elapsed();
    ensure!(status.success(), "exit status {status} after the drain deadline; log:\n{}", keel.log());
    ensure!(took >= Duration::from_millis(900), "exited after {took:?}, before the 1s drain timeout");
    ensure!(took < Duration::from_secs(5), "exited after {took:?}: the 1s drain timeout was not enforced");
    // The cut request fails one way or another; it must not hang.
    let _ = tokio::time::timeout(REQUEST, stuck).await.context("the cut request hung")?;
    Ok(())
}

#[tokio::test]
async fn run_refuses_an_invalid_config() -> Result<()> {
    let dir = TempDir::new("keel-bad")?;
    let path = dir.write(
        "bad.toml",
        &format!(
            "[node]\nadmin = \"{}\"\n\n[listeners.web]\nbind = \"{}\"\ndefault_pool = \"nope\"\n\n\
             [pools.app]\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9\"\n",
            free_addr(),
            free_addr()
        ),
    )?;
    let out = run_keel(&["run", "--config", path.to_str().context("utf-8 path")?], EXIT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "keel run accepted an invalid config; stderr:\n{stderr}");
    ensure!(stderr.contains("listeners.web.default_pool"), "the error does not name the key:\n{stderr}");
    Ok(())
}

#[tokio::test]
async fn run_fails_when_the_listen_port_is_taken() -> Result<()> {
    let a = Backend::start("a")?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let proxy = taken.local_addr()?;
    let dir = TempDir::new("keel-taken")?;
    let config = Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends([&a]));
    let path = dir.write("keel.toml", &config.render(proxy, free_addr(), &[]))?;
    let out = run_keel(&["run", "--config", path.to_str().context("utf-8 path")?], EXIT)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "keel run started without its listener; stderr:\n{stderr}");
    ensure!(stderr.contains(&proxy.to_string()), "the error does not name the address:\n{stderr}");
    Ok(())
}

#[tokio::test]
async fn open_websockets_do_not_hold_shutdown_past_the_drain_timeout() -> Result<()> {
    use futures_util::SinkExt;
    let (_a, mut keel) = one_backend_keel("1s").await?;
    let (mut ws, _) =
        tokio::time::timeout(REQUEST, tokio_tungstenite::connect_async(keel.url("/ws").replace("http", "ws")))
            .await
            .context("websocket handshake timed out")??;
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi")).await?;

    let start = Instant::now();
    keel.sigterm()?;
    let status = keel.wait_exit(EXIT).await?;
    let took = start.elapsed();
    ensure!(status.success(), "exit status {status}; log:\n{}", keel.log());
    ensure!(took < Duration::from_secs(5), "an open WebSocket held shutdown for {took:?} (drain timeout 1s)");
    Ok(())
}
