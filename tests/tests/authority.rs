//! One authority per request: the host keel routes by is the `Host` the server receives.
//!
//! - HTTP/1 absolute form: the URL's authority wins over the client's `Host` (RFC 9112 §3.2.2),
//!   for routing and for the `Host` forwarded.
//! - HTTP/2: `:authority` alone is forwarded as `Host`; a `host` header naming another authority
//!   is refused with 400 (RFC 9113 §8.3.1) and reaches no server.
//! - HTTP/1.1 without `Host`: 400 with a body that says so, and no server sees it.
//!
//! Servers are [`RawHttpBackend`]s, which record every byte keel forwards: each test asserts
//! what a server actually received, not only what the client was answered.

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use keel_tests::client::{parse_responses, raw_transcript};
use keel_tests::raw::RawHttpBackend;
use keel_tests::tls::HttpConn;
use keel_tests::wait::HOSTILE;
use keel_tests::{Keel, PoolSpec};

/// keel with two pools: `shop` for host `shop.example`, `app` for everything else.
async fn two_pools() -> Result<(RawHttpBackend, RawHttpBackend, Keel)> {
    let shop = RawHttpBackend::start()?;
    let app = RawHttpBackend::start()?;
    let keel = Keel::builder()
        .default_pool("app")
        .route("host = \"shop.example\"\npool = \"shop\"")
        .pool(PoolSpec::new("shop", "round_robin").server("shop", shop.addr(), None))
        .pool(PoolSpec::new("app", "round_robin").server("app", app.addr(), None))
        .start()
        .await?;
    Ok((shop, app, keel))
}

/// The `Host` values a recorded request carried.
fn hosts(req: &keel_tests::raw::RecordedRequest) -> Vec<&str> {
    req.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("host")).map(|(_, v)| v.as_str()).collect()
}

async fn h2c(keel: &Keel) -> Result<HttpConn> {
    let stream = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
    HttpConn::http2(stream).await
}

#[tokio::test]
async fn http1_absolute_form_routes_by_the_url_and_forwards_its_host() -> Result<()> {
    let (shop, app, keel) = two_pools().await?;
    let req = b"GET http://shop.example/cart?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n";
    let transcript = raw_transcript(keel.proxy_addr(), req.to_vec(), HOSTILE).await?;
    let answers = parse_responses(&transcript);
    ensure!(
        answers.iter().map(|r| r.status).collect::<Vec<_>>() == [200],
        "{:?}",
        String::from_utf8_lossy(&transcript)
    );
    ensure!(app.requests().is_empty(), "routed by the Host header, not the URL: app saw {:?}", app.requests());
    let seen = shop.requests();
    ensure!(seen.len() == 1, "shop saw {seen:?}");
    ensure!(hosts(&seen[0]) == ["shop.example"], "the server got Host {:?}", hosts(&seen[0]));
    ensure!(seen[0].target() == "/cart?x=1", "the server got target {:?}", seen[0].line);
    Ok(())
}

#[tokio::test]
async fn http2_authority_alone_is_forwarded_as_host() -> Result<()> {
    let (shop, app, keel) = two_pools().await?;
    let mut conn = h2c(&keel).await?;
    let req = Request::get("http://shop.example/h2").body(Full::new(Bytes::new()))?;
    let r = conn.send(req).await?;
    ensure!(r.status == 200, "{} {:?}", r.status, r.text());
    ensure!(app.requests().is_empty(), "app saw {:?}", app.requests());
    let seen = shop.requests();
    ensure!(seen.len() == 1, "shop saw {seen:?}");
    ensure!(hosts(&seen[0]) == ["shop.example"], "the server got Host {:?}", hosts(&seen[0]));
    // The same name in another case is the same authority.
    let req = Request::get("http://shop.example/again").header("host", "SHOP.example").body(Full::new(Bytes::new()))?;
    let r = conn.send(req).await?;
    ensure!(r.status == 200, "a Host equal to :authority but for case: {} {:?}", r.status, r.text());
    Ok(())
}

#[tokio::test]
async fn http2_host_that_differs_from_authority_is_refused() -> Result<()> {
    let (shop, app, keel) = two_pools().await?;
    let mut conn = h2c(&keel).await?;
    for (authority, host) in [("shop.example", "other.example"), ("other.example", "shop.example")] {
        let req =
            Request::get(format!("http://{authority}/mismatch")).header("host", host).body(Full::new(Bytes::new()))?;
        let r = conn.send(req).await.with_context(|| format!(":authority {authority}, host {host}"))?;
        ensure!(r.status == 400, ":authority {authority}, host {host}: {} {:?}", r.status, r.text());
        ensure!(r.text().contains("does not match :authority"), "unclear message: {:?}", r.text());
    }
    ensure!(shop.bytes().is_empty() && app.bytes().is_empty(), "a server received a refused request");
    // The connection and keel stay usable.
    let r = conn.send(Request::get("http://shop.example/ok").body(Full::new(Bytes::new()))?).await?;
    ensure!(r.status == 200, "after the refusals: {}", r.status);
    Ok(())
}

#[tokio::test]
async fn http1_request_without_host_is_refused_and_says_so() -> Result<()> {
    let (shop, app, keel) = two_pools().await?;
    let transcript =
        raw_transcript(keel.proxy_addr(), b"GET /nohost HTTP/1.1\r\nX-A: 1\r\n\r\n".to_vec(), HOSTILE).await?;
    let answers = parse_responses(&transcript);
    let Some(answer) = answers.first() else { bail!("no answer: {:?}", String::from_utf8_lossy(&transcript)) };
    ensure!(answer.status == 400, "status {}", answer.status);
    let body = String::from_utf8_lossy(&answer.body);
    ensure!(body.contains("without a Host header"), "the body does not say why: {body:?}");
    ensure!(!body.contains("nohost"), "the body echoes the request: {body:?}");
    ensure!(shop.bytes().is_empty() && app.bytes().is_empty(), "a server received the request");
    // HTTP/1.0 needs no Host: routed to the default pool, which gets none made up.
    let transcript = raw_transcript(keel.proxy_addr(), b"GET /old HTTP/1.0\r\n\r\n".to_vec(), HOSTILE).await?;
    ensure!(parse_responses(&transcript).first().map(|r| r.status) == Some(200), "HTTP/1.0 without Host");
    ensure!(app.requests().len() == 1, "app saw {:?}", app.requests());
    Ok(())
}
