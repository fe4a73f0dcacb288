//! Config reload on a standalone node: SIGHUP reads the node's file again, `keel config apply`
//! sends one through the admin API. Pools and listeners change without a restart, in-flight
//! downloads and open WebSockets are untouched, and a bad file — or one whose listener cannot
//! bind — is refused as a whole with nothing changed. The outcome is in `/status` and
//! `/metrics`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use keel_tests::client::{get, get_fresh};
use keel_tests::keel::run_keel;
use keel_tests::ports::free_addr;
use keel_tests::tempdir::TempDir;
use keel_tests::wait::{wait_for, wait_until, ADMIN_CHANGE, REQUEST};
use keel_tests::{Backend, Client, Keel, KeelBuilder, PoolSpec};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Size of the download that runs across the reload.
const DOWNLOAD: u64 = 150 * 1024 * 1024;
/// How long a reload may take to show in `/status`.
const RELOAD: Duration = Duration::from_secs(10);

fn builder(backend: &Backend) -> KeelBuilder {
    Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends([backend]))
}

/// The `reload` section of `/status`.
async fn reload_status(keel: &Keel) -> Result<Value> {
    Ok(keel.status_json().await?["reload"].clone())
}

/// Waits until `/status` shows `applied + refused == n` reloads, and returns the last one.
async fn wait_reloads(keel: &Keel, n: u64) -> Result<Value> {
    wait_for(RELOAD, &format!("reload #{n} to show in /status"), || async {
        let r = reload_status(keel).await.ok()?;
        let done = r["applied"].as_u64()? + r["refused"].as_u64()?;
        (done >= n).then(|| r["last"].clone())
    })
    .await
}

/// Who answers `n` fresh requests to `addr`.
async fn answered_by(addr: SocketAddr, n: usize) -> Result<Vec<String>> {
    let mut who = Vec::new();
    for _ in 0..n {
        let r = get_fresh(addr, "/").await?;
        ensure!(r.status == 200, "status {} from {addr}: {}", r.status, r.text());
        who.push(r.backend().ok_or_else(|| anyhow!("no x-backend header"))?.to_owned());
    }
    Ok(who)
}

#[tokio::test]
async fn sighup_changes_pools_and_listeners_under_a_running_download_and_websocket() -> Result<()> {
    let (a, b) = (Backend::start("a")?, Backend::start("b")?);
    let keel = builder(&a).start().await?;
    let (proxy, admin) = (keel.proxy_addr(), keel.admin_addr());

    // A 150 MB download: its head and first megabyte arrive, then it waits on the client.
    let client = Client::no_keepalive();
    let request = keel_tests::client::empty(get(proxy, &format!("/big?bytes={DOWNLOAD}")))?;
    let mut download = client.send_streaming(request).await?;
    ensure!(download.status() == 200, "download answered {}", download.status());
    let mut received = 0u64;
    while received < 1 << 20 {
        let frame = tokio::time::timeout(REQUEST, download.body_mut().frame())
            .await
            .context("download stalled before the reload")?
            .ok_or_else(|| anyhow!("download ended early at {received} bytes"))??;
        received += frame.data_ref().map_or(0, |d| d.len() as u64);
    }
    // A keep-alive connection that has served one request.
    let kept = Client::new();
    let r = kept.get(proxy, "/").await?;
    ensure!(r.backend() == Some("a"), "before the reload: {:?}", r.backend());
    // An open WebSocket.
    let (mut ws, _) =
        tokio::time::timeout(REQUEST, tokio_tungstenite::connect_async(format!("ws://{proxy}/ws"))).await??;
    ws.send(Message::text("before")).await?;
    let echo = tokio::time::timeout(REQUEST, ws.next()).await?.ok_or_else(|| anyhow!("websocket closed"))??;
    ensure!(echo.to_text()? == "before", "echo {echo:?}");

    // The new file: the pool now holds b only, `web` gets a new request-id header (a
    // socket-level change: its accept loop restarts on the same socket), and a second
    // listener appears.
    let extra = free_addr();
    let next = builder(&b)
        .listener_line("request_id_header = \"X-Trace-Id\"")
        .listener("extra", &["default_pool = \"app\""])
        .render(proxy, admin, &[extra]);
    std::fs::write(keel.config_path(), &next)?;
    keel.sighup()?;
    let last = wait_reloads(&keel, 1).await?;
    ensure!(last["result"] == "applied", "reload outcome: {last}");
    ensure!(last["source"] == "sighup", "reload source: {last}");
    ensure!(last["change"]["pools"]["changed"] == serde_json::json!(["app"]), "pool changes: {last}");
    ensure!(last["change"]["listeners"]["started"] == serde_json::json!(["extra"]), "listener changes: {last}");
    ensure!(last["change"]["listeners"]["restarted"] == serde_json::json!(["web"]), "listener changes: {last}");
    ensure!(reload_status(&keel).await?["generation"] == 1, "generation after one reload");

    // New requests see the new pool, on the old listener and the new one.
    let who = answered_by(proxy, 4).await?;
    ensure!(who.iter().all(|w| w == "b"), "after the reload `web` was answered by {who:?}");
    let r = kept.get(proxy, "/").await?;
    ensure!(r.backend() == Some("b"), "a keep-alive connection from before the reload: {:?}", r.backend());
    let who = answered_by(extra, 2).await?;
    ensure!(who.iter().all(|w| w == "b"), "the new listener was answered by {who:?}");
    let r = get_fresh(proxy, "/headers").await?;
    ensure!(r.text().to_ascii_lowercase().contains("x-trace-id"), "new request-id header not sent: {}", r.text());

    // The WebSocket opened before the reload still echoes.
    ws.send(Message::text("after")).await?;
    let echo = tokio::time::timeout(REQUEST, ws.next()).await?.ok_or_else(|| anyhow!("websocket closed"))??;
    ensure!(echo.to_text()? == "after", "echo after the reload {echo:?}");
    ws.close(None).await?;

    // The download started before the reload completes, every byte of it.
    let rest = async {
        while let Some(frame) = download.body_mut().frame().await {
            received += frame?.data_ref().map_or(0, |d| d.len() as u64);
        }
        Ok::<_, anyhow::Error>(received)
    };
    let total = tokio::time::timeout(Duration::from_secs(60), rest).await.context("download stalled")??;
    ensure!(total == DOWNLOAD, "the download across the reload ended at {total} of {DOWNLOAD} bytes");
    ensure!(a.connections_accepted() >= 1 && b.requests() >= 7, "a {} b {}", a.requests(), b.requests());

    let metrics = keel.metrics().await?;
    ensure!(metrics.contains("keel_config_reloads_total{outcome=\"applied\"} 1"), "metrics:\n{metrics}");
    ensure!(keel.log().contains("config reloaded"), "no log line for the reload:\n{}", keel.log());
    Ok(())
}

#[tokio::test]
async fn a_refused_reload_changes_nothing() -> Result<()> {
    let (a, b) = (Backend::start("a")?, Backend::start("b")?);
    let keel = builder(&a).start().await?;
    let (proxy, admin) = (keel.proxy_addr(), keel.admin_addr());
    let good = std::fs::read_to_string(keel.config_path())?;

    // 1. A file that does not parse: an invalid server address.
    let broken = good.replace(&a.addr().to_string(), "127.0.0.1:80x");
    ensure!(broken != good, "the test did not change the file");
    std::fs::write(keel.config_path(), &broken)?;
    keel.sighup()?;
    let last = wait_reloads(&keel, 1).await?;
    ensure!(last["result"] == "refused", "outcome: {last}");
    let problems = last["problems"].to_string();
    ensure!(
        problems.contains("pools.app.servers[0].address") && problems.contains("\\\"127.0.0.1:80x\\\""),
        "problems do not name the key and value: {problems}"
    );

    // 2. A valid file whose new listener cannot bind (the address is taken): refused as a
    //    whole, so the pool change in the same file is not applied either.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let next = builder(&b).listener("extra", &["default_pool = \"app\""]).render(proxy, admin, &[taken.local_addr()?]);
    std::fs::write(keel.config_path(), &next)?;
    keel.sighup()?;
    let last = wait_reloads(&keel, 2).await?;
    ensure!(last["result"] == "refused", "outcome: {last}");
    ensure!(last["problems"].to_string().contains(&taken.local_addr()?.to_string()), "problems: {last}");

    // Nothing changed: still pool a, still one listener, generation 0.
    let who = answered_by(proxy, 3).await?;
    ensure!(who.iter().all(|w| w == "a"), "after two refused reloads `web` was answered by {who:?}");
    let status = keel.status_json().await?;
    ensure!(status["reload"]["generation"] == 0 && status["reload"]["refused"] == 2, "status: {}", status["reload"]);
    ensure!(status["listeners"].as_array().map(Vec::len) == Some(1), "listeners: {}", status["listeners"]);
    ensure!(b.requests() == 0, "b served {} requests", b.requests());
    let metrics = keel.metrics().await?;
    ensure!(metrics.contains("keel_config_reloads_total{outcome=\"refused\"} 2"), "metrics:\n{metrics}");
    ensure!(metrics.contains("keel_config_last_reload_successful 0"), "metrics:\n{metrics}");
    ensure!(keel.log().contains("config reload refused"), "no log line for the refusal:\n{}", keel.log());

    // 3. The same refusal through the CLI: a clear error, a failing exit, nothing changed.
    let dir = TempDir::new("reload-cli")?;
    let path = dir.write("next.toml", &next)?;
    let out = run_keel(
        &["config", "apply", path.to_str().context("utf-8")?, "--admin", &admin.to_string()],
        Duration::from_secs(30),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "config apply of a refused file succeeded: {stderr}");
    ensure!(stderr.contains("refused") && stderr.contains(&taken.local_addr()?.to_string()), "stderr: {stderr}");
    let who = answered_by(proxy, 2).await?;
    ensure!(who.iter().all(|w| w == "a"), "after a refused apply `web` was answered by {who:?}");
    Ok(())
}

#[tokio::test]
async fn config_apply_on_a_standalone_node_rebinds_a_listener() -> Result<()> {
    let (a, b) = (Backend::start("a")?, Backend::start("b")?);
    let keel = builder(&a).start().await?;
    let (proxy, admin) = (keel.proxy_addr(), keel.admin_addr());

    // The listener moves to a new address and the pool to b.
    let moved = free_addr();
    let dir = TempDir::new("reload-apply")?;
    let path = dir.write("next.toml", &builder(&b).render(moved, admin, &[]))?;
    let out = run_keel(
        &["config", "apply", path.to_str().context("utf-8")?, "--admin", &admin.to_string()],
        Duration::from_secs(30),
    )?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "config apply failed: {stderr}");
    ensure!(stdout.contains("config applied") && stdout.contains("web"), "stdout: {stdout}");

    let who = answered_by(moved, 3).await?;
    ensure!(who.iter().all(|w| w == "b"), "the moved listener was answered by {who:?}");
    wait_until(ADMIN_CHANGE, "the old address to be closed", || async {
        tokio::net::TcpStream::connect(proxy).await.is_err()
    })
    .await?;
    let last = reload_status(&keel).await?["last"].clone();
    ensure!(last["source"] == "admin_api" && last["result"] == "applied", "last reload: {last}");
    ensure!(a.requests() == 0 || b.requests() >= 3, "a {} b {}", a.requests(), b.requests());

    // The same file again: nothing to change.
    let out = run_keel(
        &["config", "apply", path.to_str().context("utf-8")?, "--admin", &admin.to_string()],
        Duration::from_secs(30),
    )?;
    ensure!(out.status.success(), "second apply failed: {}", String::from_utf8_lossy(&out.stderr));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("unchanged"),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
