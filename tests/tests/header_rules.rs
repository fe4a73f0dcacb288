//! Header rules: `[listeners.NAME.headers]` and a route's `headers` set, add and remove
//! headers on the request a server gets and on the response the client gets, with
//! `${variables}`; a route's rules run after its listener's.
//!
//! Servers are [`RawHttpBackend`]s, which record the bytes keel forwarded: each test asserts what
//! the server saw and what the client got.

use std::sync::Arc;

use anyhow::{ensure, Result};
use keel_tests::client::{empty, get};
use keel_tests::raw::{Answer, RawHttpBackend, RecordedRequest};
use keel_tests::{Keel, PoolSpec};

/// A server that answers with a `Server` header and one `X-Extra`, as many do.
fn chatty_server() -> Result<RawHttpBackend> {
    RawHttpBackend::scripted(Arc::new(|_: &RecordedRequest| {
        Answer::keep(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: secret/1.0\r\nX-Extra: one\r\n\r\nok"[..])
    }))
}

/// Every value of header `name` a recorded request carried.
fn values<'a>(req: &'a RecordedRequest, name: &str) -> Vec<&'a str> {
    req.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
}

async fn keel_with_rules(app: &RawHttpBackend, api: &RawHttpBackend) -> Result<Keel> {
    Keel::builder()
        .default_pool("app")
        .listener_line(
            r#"headers = { request_set = { "X-Served-By" = "${node}", "X-Client" = "${client_ip}", "X-Via" = "${listener}/${pool}", "X-Trace" = "req-${request_id}" }, request_add = { "X-Tag" = "edge" }, request_remove = ["X-Secret"], response_set = { "Strict-Transport-Security" = "max-age=63072000", "X-Tier" = "listener", "X-Trace" = "resp-${request_id}" }, response_remove = ["Server"] }"#,
        )
        .route(
            "path_prefix = \"/api\"\npool = \"api\"\n\
             headers = { request_set = { \"X-Tag\" = \"api\" }, response_set = { \"X-Tier\" = \"route\", \"X-Server\" = \"${server}\" }, response_add = { \"X-Extra\" = \"two\" } }",
        )
        .pool(PoolSpec::new("app", "round_robin").server("app1", app.addr(), None))
        .pool(PoolSpec::new("api", "round_robin").server("api1", api.addr(), None))
        .start()
        .await
}

#[tokio::test]
async fn listener_rules_rewrite_both_directions_with_variables() -> Result<()> {
    let (app, api) = (chatty_server()?, chatty_server()?);
    let keel = keel_with_rules(&app, &api).await?;
    let req = get(keel.proxy_addr(), "/page").header("x-secret", "hunter2").header("x-client", "spoofed");
    let r = keel.client().send(empty(req)?).await?;
    ensure!(r.status == 200, "status {}", r.status);
    // What the client got.
    ensure!(r.header("strict-transport-security") == Some("max-age=63072000"), "{:?}", r.headers);
    ensure!(r.header("x-tier") == Some("listener"), "{:?}", r.headers);
    ensure!(r.headers.get("server").is_none(), "Server was not removed: {:?}", r.headers);
    ensure!(r.header("x-extra") == Some("one"), "the server's own header is kept: {:?}", r.headers);
    // What the server saw.
    let seen = app.requests();
    ensure!(seen.len() == 1, "app saw {seen:?}");
    let s = &seen[0];
    ensure!(values(s, "x-secret").is_empty(), "X-Secret reached the server: {:?}", s.headers);
    ensure!(values(s, "x-client") == ["127.0.0.1"], "set replaces the client's value: {:?}", s.headers);
    ensure!(values(s, "x-via") == ["web/app"], "{:?}", s.headers);
    ensure!(values(s, "x-tag") == ["edge"], "{:?}", s.headers);
    let node = values(s, "x-served-by");
    ensure!(node.len() == 1 && !node[0].is_empty() && !node[0].contains("${"), "X-Served-By {node:?}");
    ensure!(api.requests().is_empty(), "api saw {:?}", api.requests());
    // ${request_id} is the id the request carries, the same both ways.
    let id = r.header("x-request-id").unwrap_or_default().to_owned();
    ensure!(id.len() == 32, "no request id returned: {:?}", r.headers);
    ensure!(values(s, "x-trace") == [format!("req-{id}")], "request ${{request_id}}: {:?}", s.headers);
    ensure!(r.header("x-trace") == Some(format!("resp-{id}").as_str()), "response ${{request_id}}: {:?}", r.headers);
    Ok(())
}

#[tokio::test]
async fn route_rules_run_after_the_listeners() -> Result<()> {
    let (app, api) = (chatty_server()?, chatty_server()?);
    let keel = keel_with_rules(&app, &api).await?;
    let r = keel.get("/api/v1").await?;
    ensure!(r.status == 200, "status {}", r.status);
    ensure!(r.header("x-tier") == Some("route"), "the route's set wins over the listener's: {:?}", r.headers);
    ensure!(r.header("x-server") == Some("api1"), "${{server}}: {:?}", r.headers);
    ensure!(r.header("strict-transport-security").is_some(), "the listener's rules still apply: {:?}", r.headers);
    ensure!(r.headers.get("server").is_none(), "{:?}", r.headers);
    let extra: Vec<_> = r.headers.get_all("x-extra").iter().filter_map(|v| v.to_str().ok()).collect();
    ensure!(extra == ["one", "two"], "add appends: {extra:?}");
    let seen = api.requests();
    ensure!(seen.len() == 1, "api saw {seen:?}");
    // The listener adds `edge`, then the route sets `api`, replacing it.
    ensure!(values(&seen[0], "x-tag") == ["api"], "{:?}", seen[0].headers);
    ensure!(values(&seen[0], "x-via") == ["web/api"], "{:?}", seen[0].headers);
    ensure!(app.requests().is_empty(), "app saw {:?}", app.requests());
    Ok(())
}
