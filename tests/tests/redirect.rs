//! `redirect_to_https = true` on an http listener: every request is answered `308` with
//! `Location: https://HOST:HTTPS_PORT/PATH?QUERY` (no port when it is 443), and no pool is needed.

use anyhow::{ensure, Context, Result};
use keel_tests::raw::{header, RawConn, ReadOutcome};
use keel_tests::wait::REQUEST;
use keel_tests::Keel;

async fn ask(addr: std::net::SocketAddr, request: &str) -> Result<(u16, Option<String>)> {
    let mut c = RawConn::connect(addr).await?;
    c.write(request.as_bytes()).await?;
    // The head is all that matters, and a HEAD response has no body whatever its length says.
    match c.read_head(REQUEST).await? {
        ReadOutcome::Response(r) => Ok((r.status, header(&r, "location").map(str::to_owned))),
        ReadOutcome::Closed(got) => {
            anyhow::bail!("{request:?}: closed without a response ({:?})", String::from_utf8_lossy(&got))
        }
    }
}

#[tokio::test]
async fn plain_http_is_redirected_to_https_with_308() -> Result<()> {
    let keel = Keel::builder()
        .listener_line("redirect_to_https = true")
        .listener_line("https_port = 8443")
        .listener("plain443", &["protocol = \"http\"", "redirect_to_https = true", "https_port = 443"])
        .start()
        .await?;
    let web = keel.proxy_addr();
    let p443 = keel.listener_addr("plain443")?;
    for (addr, req, want) in [
        (web, "GET /path?q=1&r=2 HTTP/1.1\r\nHost: example.test\r\n\r\n", "https://example.test:8443/path?q=1&r=2"),
        (web, "GET / HTTP/1.1\r\nHost: example.test:8080\r\n\r\n", "https://example.test:8443/"),
        (web, "HEAD /h HTTP/1.1\r\nHost: example.test\r\n\r\n", "https://example.test:8443/h"),
        (
            web,
            "POST /form?x=1 HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc",
            "https://example.test:8443/form?x=1",
        ),
        (p443, "GET /path?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n", "https://example.test/path?q=1"),
        (p443, "GET /a/b HTTP/1.1\r\nHost: example.test:80\r\n\r\n", "https://example.test/a/b"),
    ] {
        let (status, location) = ask(addr, req).await.with_context(|| format!("{req:?}"))?;
        ensure!(status == 308, "{req:?}: status {status}, expected 308");
        ensure!(location.as_deref() == Some(want), "{req:?}: Location {location:?}, expected {want:?}");
    }
    Ok(())
}

/// A Host that is not a valid `host[:port]` must not be turned into a Location: RFC 9112 §3.2
/// requires 400 for an invalid Host, and reflecting it lets a request steer the redirect to
/// another site (`a.test@evil.test` is userinfo + evil.test; `evil.test/x` puts `:8443` into the
/// path).
#[tokio::test]
async fn an_invalid_host_is_refused_not_reflected_into_location() -> Result<()> {
    let keel =
        Keel::builder().listener_line("redirect_to_https = true").listener_line("https_port = 8443").start().await?;
    let mut failures = Vec::new();
    for host in ["evil.test/x", "a.test@evil.test", "a test", "evil.test#frag", "a.test?x", "a.test:99999x"] {
        let req = format!("GET /p?q HTTP/1.1\r\nHost: {host}\r\n\r\n");
        match ask(keel.proxy_addr(), &req).await {
            Ok((400, _)) => {}
            Ok((status, location)) => failures.push(format!("Host {host:?}: {status}, Location {location:?}")),
            Err(e) => {
                // A close without an answer is also a refusal.
                if !format!("{e:#}").contains("closed without a response") {
                    failures.push(format!("Host {host:?}: {e:#}"));
                }
            }
        }
    }
    ensure!(failures.is_empty(), "invalid Host headers were redirected:\n  {}", failures.join("\n  "));
    Ok(())
}
