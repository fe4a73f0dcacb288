//! Request smuggling: ambiguous or malformed HTTP/1 framing must be answered `400` (or the
//! connection closed) and the connection must close — or, for what is well formed but not
//! served, the status the RFCs name: `414` for a request line over 8 KiB, `501` for a transfer
//! coding keel does not implement, `505` for an HTTP version other than 1.0 and 1.1 — and the backend must never receive the
//! smuggled request (`GET /smuggled`). The backend is [`RawHttpBackend`], which records the exact
//! bytes keel sends and frames them as a strict server would, so a second request hidden in a
//! body would appear as its own request head.
//!
//! Head-level variants must not reach the backend at all. Chunked-body variants are found only
//! after the head, so the head may already have been forwarded; the smuggled request still must
//! not arrive.

use anyhow::{bail, ensure, Result};
use keel_tests::client::{raw_transcript, status_codes};
use keel_tests::raw::{RawConn, RawHttpBackend, ReadOutcome};
use keel_tests::wait::HOSTILE;
use keel_tests::{Keel, PoolSpec};

/// The request hidden behind each ambiguous one.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// Where a variant's problem lies: in the head (nothing may be forwarded) or in a chunked body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Head,
    Body,
}

/// Each shape: its name, where its problem lies, the status keel answers, and its bytes.
type Variant = (&'static str, Level, u16, Vec<u8>);

fn variants() -> Vec<Variant> {
    let s = SMUGGLED;
    let long = "a".repeat(9 * 1024);
    let v: Vec<(&str, Level, String)> = vec![
        ("CL then TE", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}")),
        ("TE then CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\n{s}")),
        ("duplicate identical CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello{s}")),
        ("conflicting CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello{s}")),
        ("CL list in one header", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 40\r\n\r\nhello{s}")),
        ("negative CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{s}")),
        ("plus-signed CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello{s}")),
        ("hex CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello{s}")),
        ("oversized CL", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\nhello{s}")),
        ("TE gzip, chunked", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{s}")),
        ("TE xchunked", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{s}")),
        ("TE chunked, identity", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{s}")),
        ("TE with a space before the colon", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n{s}")),
        ("TE with a vertical tab", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n{s}")),
        ("two TE headers", Level::Head, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}")),
        ("TE on HTTP/1.0", Level::Head, format!("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{s}")),
        ("bare LF line endings", Level::Head, format!("GET / HTTP/1.1\nHost: x\nX-A: 1\n\n{s}")),
        ("bare CR inside a header", Level::Head, format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n{s}")),
        ("obs-fold continuation line", Level::Head, format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n Transfer-Encoding: chunked\r\n\r\n{s}")),
        ("NUL in a header value", Level::Head, format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n{s}")),
        ("two Host headers", Level::Head, format!("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n{s}")),
        ("HTTP/1.1 without Host", Level::Head, format!("GET / HTTP/1.1\r\nX-A: 1\r\n\r\n{s}")),
        ("HTTP/1.2", Level::Head, format!("GET / HTTP/1.2\r\nHost: x\r\n\r\n{s}")),
        ("HTTP/3.0 on the HTTP/1 path", Level::Head, format!("GET / HTTP/3.0\r\nHost: x\r\n\r\n{s}")),
        ("malformed version HTTP/1", Level::Head, format!("GET / HTTP/1\r\nHost: x\r\n\r\n{s}")),
        ("request target over 8 KiB", Level::Head, format!("GET /{long} HTTP/1.1\r\nHost: x\r\n\r\n{s}")),
        ("chunk size zz", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n{s}")),
        ("chunk size -3", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n{s}")),
        ("chunk size 0x3", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n{s}")),
        ("chunk size of 17 hex digits", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\nabc\r\n0\r\n\r\n{s}")),
        ("chunk data not followed by CRLF", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n{s}")),
        ("chunk-size line ending in bare LF", Level::Body, format!("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n{s}")),
    ];
    v.into_iter().map(|(n, l, s)| (n, l, expected_status(n), s.into_bytes())).collect()
}

/// What keel answers a shape with: 400 unless the shape is well formed but not served.
fn expected_status(name: &str) -> u16 {
    match name {
        "TE gzip, chunked" | "TE xchunked" => 501,
        "HTTP/1.2" | "HTTP/3.0 on the HTTP/1 path" => 505,
        "request target over 8 KiB" => 414,
        _ => 400,
    }
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_is_smuggled() -> Result<()> {
    let backend = RawHttpBackend::start()?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("raw", backend.addr(), None).set("retries = 0"))
        .start()
        .await?;
    let mut failures = Vec::new();
    let all = variants();
    ensure!(all.len() >= 20, "only {} variants", all.len());
    for (name, level, status, bytes) in all {
        backend.clear();
        if let Err(e) = check_variant(&keel, &backend, name, level, status, bytes).await {
            failures.push(format!("{name}: {e:#}"));
        }
        // keel keeps serving normal requests after each.
        match keel.get("/after").await {
            Ok(r) if r.status == 200 && r.text() == "ok" => {}
            Ok(r) => failures.push(format!("{name}: a normal request afterwards got {} {:?}", r.status, r.text())),
            Err(e) => failures.push(format!("{name}: a normal request afterwards failed: {e:#}")),
        }
    }
    if !failures.is_empty() {
        bail!("{} smuggling variants misbehaved:\n  {}", failures.len(), failures.join("\n  "));
    }
    Ok(())
}

async fn check_variant(
    keel: &Keel,
    backend: &RawHttpBackend,
    name: &str,
    level: Level,
    status: u16,
    bytes: Vec<u8>,
) -> Result<()> {
    // Must answer its status (or nothing) and close: raw_transcript fails if the connection
    // stays open.
    let transcript = raw_transcript(keel.proxy_addr(), bytes, HOSTILE).await?;
    let codes = status_codes(&transcript);
    let text = String::from_utf8_lossy(&transcript);
    eprintln!("{name}: answered {codes:?}, backend saw {} requests", backend.requests().len());
    ensure!(
        (codes.is_empty() && transcript.is_empty()) || codes == [status],
        "expected {status} or a bare close, got {codes:?} ({:?})",
        text.chars().take(200).collect::<String>()
    );
    // The answer names a reason of keel's, never the client's bytes.
    ensure!(!text.contains("smuggled") && !text.contains("aaaa"), "the answer echoes the request: {text:?}");
    let reqs = backend.requests();
    let raw = String::from_utf8_lossy(&backend.bytes()).into_owned();
    ensure!(
        !reqs.iter().any(|r| r.target().contains("smuggled")),
        "the backend received the smuggled request; it saw {:?}",
        reqs.iter().map(|r| r.line.clone()).collect::<Vec<_>>()
    );
    match level {
        Level::Head => ensure!(raw.is_empty(), "{name}: the backend received {raw:?}"),
        Level::Body => ensure!(reqs.len() <= 1, "{name}: the backend received {} requests", reqs.len()),
    }
    Ok(())
}

#[tokio::test]
async fn valid_framing_is_forwarded_normalised() -> Result<()> {
    let backend = RawHttpBackend::start()?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("raw", backend.addr(), None))
        .start()
        .await?;
    // A chunked body with an extension and a trailer, and a Content-Length body, on one connection.
    let req = b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                6;ext=1\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n\
                POST /length HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        .to_vec();
    let transcript = raw_transcript(keel.proxy_addr(), req, HOSTILE).await?;
    let codes = status_codes(&transcript);
    ensure!(codes == [200, 200], "two valid requests: {codes:?} ({:?})", String::from_utf8_lossy(&transcript));
    let reqs = backend.requests();
    ensure!(reqs.len() == 2, "backend saw {:?}", reqs.iter().map(|r| r.line.clone()).collect::<Vec<_>>());
    for (r, path, body) in [(&reqs[0], "/chunked", &b"hello world"[..]), (&reqs[1], "/length", &b"hello"[..])] {
        ensure!(r.target() == path, "expected {path}, backend saw {:?}", r.line);
        ensure!(r.body == body, "{path}: body {:?}", String::from_utf8_lossy(&r.body));
        let cl = r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).count();
        let te = r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding")).count();
        ensure!(
            cl + te == 1,
            "{path}: forwarded with {cl} Content-Length and {te} Transfer-Encoding headers: {:?}",
            r.headers
        );
        let hosts = r.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("host")).count();
        ensure!(hosts == 1, "{path}: forwarded with {hosts} Host headers");
    }
    Ok(())
}

#[tokio::test]
async fn smuggling_after_a_valid_request_on_a_keepalive_connection() -> Result<()> {
    let backend = RawHttpBackend::start()?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("raw", backend.addr(), None).set("retries = 0"))
        .start()
        .await?;
    let mut failures = Vec::new();
    for (name, _, status, bad) in variants() {
        backend.clear();
        if let Err(e) = after_a_valid_request(&keel, &backend, status, &bad).await {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("{} keep-alive variants misbehaved:\n  {}", failures.len(), failures.join("\n  "));
    }
    Ok(())
}

/// One valid request answered 200, then `bad` on the same connection: `status` or a close, and
/// the connection closes; the backend saw the first request and never the smuggled one.
async fn after_a_valid_request(keel: &Keel, backend: &RawHttpBackend, status: u16, bad: &[u8]) -> Result<()> {
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    c.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match c.read_response(HOSTILE).await? {
        ReadOutcome::Response(r) if r.status == 200 => {}
        other => bail!("the valid first request: {other:?}"),
    }
    let _ = c.write(bad).await;
    let rest = c.expect_close(HOSTILE).await?;
    let codes = status_codes(&rest);
    ensure!(
        (codes.is_empty() && rest.is_empty()) || codes == [status],
        "the bad second request got {codes:?}, not {status} ({:?})",
        String::from_utf8_lossy(&rest).chars().take(200).collect::<String>()
    );
    let reqs = backend.requests();
    ensure!(!reqs.iter().any(|r| r.target().contains("smuggled")), "the smuggled request reached the backend");
    ensure!(reqs.first().is_some_and(|r| r.target() == "/first"), "the backend saw {:?}", reqs);
    Ok(())
}
