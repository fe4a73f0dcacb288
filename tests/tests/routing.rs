//! Routes: host, path prefix and header conditions pick the pool; the first match wins.
//!
//! Every pool has one backend named after it, so the `x-backend` of a reply names the pool.

use anyhow::{ensure, Result};
use keel_tests::client::{empty, get};
use keel_tests::{Backend, Keel, PoolSpec};

struct Routed {
    keel: Keel,
    _backends: Vec<Backend>,
}

impl Routed {
    /// Which pool answered a GET of `path` with these headers.
    async fn pool_for(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<String> {
        let mut b = get(self.keel.proxy_addr(), path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let r = self.keel.client().send(empty(b)?).await?;
        ensure!(r.status == 200, "{host}{path} {headers:?}: status {} {:?}", r.status, r.text());
        Ok(r.backend().unwrap_or("?").to_owned())
    }
}

async fn routed() -> Result<Routed> {
    let names = ["canary", "api", "legacy", "static", "debug", "app"];
    let backends: Vec<Backend> = names.iter().map(|n| Backend::start(n)).collect::<Result<_>>()?;
    let mut builder = Keel::builder()
        .default_pool("app")
        .route("header = { name = \"x-canary\", value = \"1\" }\npool = \"canary\"")
        .route("host = \"api.example.com\"\npool = \"api\"")
        .route("path_prefix = \"/api\"\npool = \"legacy\"")
        .route("host = \"*.example.com\"\npath_prefix = \"/static\"\npool = \"static\"")
        .route("header = { name = \"x-debug\" }\npool = \"debug\"");
    for b in &backends {
        builder = builder.pool(PoolSpec::new(b.name(), "round_robin").backends([b]));
    }
    Ok(Routed { keel: builder.start().await?, _backends: backends })
}

#[tokio::test]
async fn host_rules_pick_the_pool() -> Result<()> {
    let r = routed().await?;
    ensure!(r.pool_for("api.example.com", "/", &[]).await? == "api");
    // Case-insensitive, port ignored.
    ensure!(r.pool_for("API.Example.COM", "/", &[]).await? == "api", "host match must ignore case");
    ensure!(r.pool_for("api.example.com:8443", "/", &[]).await? == "api", "host match must ignore the port");
    ensure!(r.pool_for("www.example.org", "/", &[]).await? == "app");
    Ok(())
}

#[tokio::test]
async fn path_prefix_rules_pick_the_pool() -> Result<()> {
    let r = routed().await?;
    ensure!(r.pool_for("www.example.org", "/api/users", &[]).await? == "legacy");
    ensure!(r.pool_for("www.example.org", "/api", &[]).await? == "legacy");
    ensure!(r.pool_for("www.example.org", "/ap", &[]).await? == "app");
    ensure!(r.pool_for("www.example.org", "/other/api", &[]).await? == "app");
    Ok(())
}

#[tokio::test]
async fn wildcard_host_and_path_must_both_hold() -> Result<()> {
    let r = routed().await?;
    ensure!(r.pool_for("img.example.com", "/static/logo.png", &[]).await? == "static");
    ensure!(r.pool_for("a.b.example.com", "/static/x", &[]).await? == "static");
    // Host matches but not the path, and the other way round.
    ensure!(r.pool_for("img.example.com", "/index.html", &[]).await? == "app");
    ensure!(r.pool_for("img.example.org", "/static/logo.png", &[]).await? == "app");
    // "*.example.com" names subdomains, not example.com itself (as in nginx and HAProxy's -m end
    // with a leading dot).
    ensure!(r.pool_for("example.com", "/static/logo.png", &[]).await? == "app");
    Ok(())
}

#[tokio::test]
async fn header_rules_match_value_or_presence() -> Result<()> {
    let r = routed().await?;
    ensure!(r.pool_for("www.example.org", "/", &[("x-canary", "1")]).await? == "canary");
    ensure!(
        r.pool_for("www.example.org", "/", &[("x-canary", "0")]).await? == "app",
        "x-canary: 0 must not match value 1"
    );
    ensure!(r.pool_for("www.example.org", "/", &[("X-Canary", "1")]).await? == "canary", "header names ignore case");
    ensure!(r.pool_for("www.example.org", "/", &[("x-debug", "")]).await? == "debug", "presence alone must match");
    ensure!(r.pool_for("www.example.org", "/", &[("x-debug", "anything")]).await? == "debug");
    Ok(())
}

#[tokio::test]
async fn the_first_matching_route_wins() -> Result<()> {
    let r = routed().await?;
    // Matches the canary, api and legacy routes: canary is first.
    ensure!(r.pool_for("api.example.com", "/api/x", &[("x-canary", "1")]).await? == "canary");
    // Matches api (host) and legacy (path): api is first.
    ensure!(r.pool_for("api.example.com", "/api/x", &[]).await? == "api");
    // Matches legacy (path /api...) and static? No: /api is not /static. Matches legacy and debug:
    // legacy is first.
    ensure!(r.pool_for("img.example.com", "/api/x", &[("x-debug", "1")]).await? == "legacy");
    // static before debug.
    ensure!(r.pool_for("img.example.com", "/static/x", &[("x-debug", "1")]).await? == "static");
    Ok(())
}

#[tokio::test]
async fn h2c_requests_are_routed_by_authority() -> Result<()> {
    // HTTP/2 carries the host in :authority, not in a Host header; host rules must still apply.
    let r = routed().await?;
    let port = r.keel.proxy_addr().port();
    // img.example.com + /static matches the wildcard route.
    for (authority, want) in [("api.example.com", "api"), ("img.example.com", "static")] {
        let req = http::Request::builder()
            .uri(format!("http://{authority}:{port}/static/x"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))?;
        // Connect to keel whatever the URI names.
        let stream = tokio::net::TcpStream::connect(r.keel.proxy_addr()).await?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        let conn = tokio::spawn(conn);
        let resp = tokio::time::timeout(keel_tests::wait::REQUEST, send.send_request(req)).await??;
        conn.abort();
        let got = resp.headers().get("x-backend").and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned();
        ensure!(got == want, ":authority {authority}: routed to {got}, want {want}");
    }
    Ok(())
}
