//! The live dashboard, checked in a real headless Chromium: sign-in with the admin token, the
//! rendered rows, rates and latency, a drain from the page, a dead backend going down, the
//! cluster panel following a leader kill, a pool's replicated sticky table (entries, bound,
//! evictions), and the cross-site protections of the session.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::browser::{artifact, Browser};
use keel_tests::cluster::{Cluster, FAILOVER, LEADER};
use keel_tests::keel::find_server;
use keel_tests::tempdir::TempDir;
use keel_tests::wait::{wait_until, HEALTH_CHANGE};
use keel_tests::{Backend, Keel, PoolSpec};
use serde_json::json;

const TOKEN: &str = "dashboard-test-token-0123456789";
/// The cluster test's sticky table bound.
const STICKY_MAX: u64 = 3;
/// Time for the page to show what the node knows (it polls every second).
const PAGE: Duration = Duration::from_secs(10);

/// A server's object in `/status`, asked with the token.
async fn server_json(keel: &Keel, name: &str) -> Result<serde_json::Value> {
    let status = keel.admin_request("GET", "/status", Some(TOKEN), None).await?.json()?;
    find_server(&status, "app", name).cloned()
}

/// Sends GETs through `proxy` until `stop` (at most 5,000, one every 5 ms).
fn traffic(proxy: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = keel_tests::Client::new();
        for _ in 0..5_000 {
            let _ = client.get(proxy, "/").await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

#[tokio::test]
async fn the_dashboard_signs_in_shows_live_figures_and_drains_from_the_page() -> Result<()> {
    let Some(mut browser) = Browser::launch().await? else { return Ok(()) };
    let mut backends = Backend::start_many("web-", 3)?;
    let dir = TempDir::new("dashboard")?;
    let token_file = dir.write("token", TOKEN)?;
    let keel = Keel::builder()
        .node_line(&format!("admin_token_file = {:?}", token_file.display().to_string()))
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends(&backends).health_http("200ms", 1, 1))
        .start()
        .await?;
    let load = traffic(keel.proxy_addr());
    let admin = format!("http://{}", keel.admin_addr());

    // Without a session the browser gets the sign-in form, and the API refuses it.
    browser.goto(&format!("{admin}/")).await?;
    ensure!(browser.eval("!!document.querySelector('form#login')").await? == true, "no sign-in form");
    let status = browser.eval("fetch('/dashboard.json').then(r => r.status)").await?;
    ensure!(status == 401, "dashboard.json without a session answered {status}");
    // A wrong token is refused: the form again. (The mark tells the new page from the old.)
    let submit = |token: &str| {
        format!(
            "window.__before = true; document.querySelector('#token').value = {}; document.querySelector('#login').submit(); 1",
            json!(token)
        )
    };
    browser.eval(&submit("wrong-token-000000000")).await?;
    browser
        .wait_for(
            "!window.__before && document.readyState === 'complete' && !!document.querySelector('form#login')",
            PAGE,
            "the form again",
        )
        .await?;
    // The right one opens the dashboard.
    browser.eval(&submit(TOKEN)).await?;
    browser
        .wait_for("!window.__before && document.body.dataset.ready === '1'", PAGE, "the dashboard to render")
        .await?;
    let cookie = browser.eval("document.cookie").await?;
    ensure!(cookie == "", "the session cookie is readable by scripts: {cookie}");

    // Every server has a row, up, and traffic shows as a rate and a latency.
    for b in &backends {
        let row = format!("tr[data-server=\"app/{}\"]", b.name());
        browser
            .wait_for(
                &format!("document.querySelector('{row} .state')?.textContent === 'up'"),
                PAGE,
                &format!("{} up", b.name()),
            )
            .await?;
    }
    browser
        .wait_for(
            "[...document.querySelectorAll('tr[data-server] .rps')].some(e => parseFloat(e.textContent) > 0)",
            PAGE,
            "a non-zero request rate",
        )
        .await?;
    browser
        .wait_for(
            "[...document.querySelectorAll('tr[data-server] .p99')].some(e => / ms$/.test(e.textContent))",
            PAGE,
            "a latency figure",
        )
        .await?;
    browser
        .wait_for(
            "parseFloat(document.querySelector('tr[data-listener=\"web\"] .rps').textContent) > 0",
            PAGE,
            "the listener's rate",
        )
        .await?;

    // An action without the dashboard's header is refused, even with the session cookie.
    let forged = browser
        .eval(
            "fetch('/pools/app/servers/web-b/drain', {method: 'POST', credentials: 'same-origin'}).then(r => r.status)",
        )
        .await?;
    ensure!(forged == 403, "a cookie-only POST answered {forged}");

    // Drain web-a from the page: the page and /status both say so.
    browser.eval("document.querySelector('tr[data-server=\"app/web-a\"] button.drain').click(); 1").await?;
    browser
        .wait_for(
            "document.querySelector('tr[data-server=\"app/web-a\"] .state')?.textContent === 'drain'",
            PAGE,
            "web-a drained on the page",
        )
        .await?;
    ensure!(server_json(&keel, "web-a").await?["state"] == "drain", "/status does not show the drain");

    // A weight from the page.
    browser
        .eval("const r = document.querySelector('tr[data-server=\"app/web-c\"]'); r.querySelector('input.w').value = 7; r.querySelector('button.setweight').click(); 1")
        .await?;
    wait_until(PAGE, "web-c's weight to become 7", || async {
        server_json(&keel, "web-c").await.is_ok_and(|s| s["weight"] == 7)
    })
    .await?;

    // A backend dies: the page shows it down, with the failed check.
    backends[1].stop();
    browser
        .wait_for(
            "document.querySelector('tr[data-server=\"app/web-b\"] .state')?.textContent === 'down'",
            HEALTH_CHANGE + PAGE,
            "web-b down on the page",
        )
        .await?;
    browser
        .wait_for(
            "[...document.querySelectorAll('#events li')].some(e => e.textContent.includes('app/web-b DOWN'))",
            PAGE,
            "the DOWN event",
        )
        .await?;
    for alive in ["web-a", "web-c"] {
        let state = browser.text(&format!("tr[data-server=\"app/{alive}\"] .state")).await?;
        ensure!(state.as_deref() != Some("down"), "{alive} shows {state:?}");
    }
    browser.screenshot(&artifact("dashboard.png")).await?;

    // The same counters are in /metrics.
    let metrics = keel.admin_request("GET", "/metrics", Some(TOKEN), None).await?.text();
    for family in [
        "keel_build_info{",
        "keel_listener_requests_total{",
        "keel_server_request_duration_seconds_bucket{",
        "keel_listener_sent_bytes_total{",
    ] {
        ensure!(metrics.contains(family), "/metrics lacks {family}");
    }
    // Bearer keeps working.
    ensure!(keel.admin_request("GET", "/dashboard.json", Some(TOKEN), None).await?.status == 200, "Bearer refused");
    load.abort();
    Ok(())
}

#[tokio::test]
async fn the_cluster_panel_names_the_leader_and_follows_a_leader_kill() -> Result<()> {
    let Some(mut browser) = Browser::launch().await? else { return Ok(()) };
    let backends = Backend::start_many("c", 2)?;
    let seed = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends(&backends))
        .raw(&format!("[pools.app.sticky]\nmode = \"source_ip\"\nstore = \"raft\"\nmax_entries = {STICKY_MAX}"));
    let mut cluster = Cluster::builder(seed, 3).start().await?;
    cluster.form().await?;
    let leader = cluster.leader(LEADER).await?;
    let watcher = cluster.ids().into_iter().find(|&id| id != leader).context("a follower")?;

    browser.goto(&format!("http://{}/", cluster.admin(watcher))).await?;
    browser
        .wait_for(
            "document.body.dataset.ready === '1' && !document.querySelector('#cluster').hidden",
            PAGE,
            "the cluster panel",
        )
        .await?;
    browser
        .wait_for(
            &format!("document.querySelector('#leader').textContent === 'node {leader}'"),
            PAGE,
            "the leader named",
        )
        .await?;
    for id in cluster.ids() {
        browser
            .wait_for(
                &format!("document.querySelector('tr[data-member=\"{id}\"] td:nth-child(6)')?.textContent === 'yes'"),
                PAGE,
                &format!("node {id} reachable"),
            )
            .await?;
    }

    // Five bindings into a table bounded at three: the follower's page shows the replicated
    // table full, and the two least recently used evicted.
    let expires_at_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64 + 3_600_000;
    let entries: Vec<serde_json::Value> = (1..=5)
        .map(
            |i| json!({ "pool": "app", "key": format!("192.0.2.{i}"), "server": "ca", "expires_at_ms": expires_at_ms }),
        )
        .collect();
    let body = json!({ "put_sticky_batch": entries }).to_string();
    let r = cluster.client().post(cluster.admin(leader), "/cluster/propose", &body).await?;
    ensure!(r.status == 200, "proposing sticky entries answered {} {}", r.status, r.text());
    browser
        .wait_for(
            &format!(
                "(t => t && t.querySelector('.entries').textContent === '{STICKY_MAX}' && t.querySelector('.max').textContent === '{STICKY_MAX}' \
                 && t.querySelector('.evictions').textContent === '2')(document.querySelector('section[data-pool=\"app\"] .sticky-table'))"
            ),
            PAGE,
            "the sticky table's entries, bound and evictions",
        )
        .await?;
    let metrics = cluster.metrics(watcher).await?;
    for line in [
        format!("keel_sticky_entries{{pool=\"app\"}} {STICKY_MAX}\n"),
        format!("keel_sticky_max_entries{{pool=\"app\"}} {STICKY_MAX}\n"),
        "keel_sticky_evictions_total{pool=\"app\"} 2\n".to_owned(),
    ] {
        ensure!(metrics.contains(&line), "/metrics on node {watcher} lacks {line:?}");
    }
    let table = cluster.status(watcher).await?["sticky_tables"]["app"].clone();
    ensure!(table == json!({ "entries": STICKY_MAX, "max_entries": STICKY_MAX, "evictions": 2 }), "/status: {table}");

    cluster.kill(leader)?;
    let survivors: Vec<u64> = cluster.ids().into_iter().filter(|&id| id != leader).collect();
    let next = cluster.leader_among(&survivors, LEADER + FAILOVER).await?;
    browser
        .wait_for(
            &format!("document.querySelector('#leader').textContent === 'node {next}'"),
            PAGE,
            "the new leader named",
        )
        .await?;
    browser
        .wait_for(
            &format!("document.querySelector('tr[data-member=\"{leader}\"] td:nth-child(6)')?.textContent === 'no'"),
            PAGE,
            "the killed node unreachable",
        )
        .await?;
    browser
        .wait_for(
            "[...document.querySelectorAll('#events li')].some(e => e.dataset.kind === 'election')",
            PAGE,
            "an election event",
        )
        .await?;
    browser.screenshot(&artifact("dashboard-cluster.png")).await?;
    Ok(())
}
