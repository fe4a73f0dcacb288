//! `[listeners.web.limits]`: slowloris, silent and idle connections, connection caps (total
//! and per client address), body pauses and trickles, body and head size limits, and the
//! number of requests per connection. Each hostile client runs next to a normal one that must
//! keep being served.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::client::{get_fresh, status_codes};
use keel_tests::raw::{header, RawConn, ReadOutcome};
use keel_tests::wait::{HOSTILE, REQUEST};
use keel_tests::{wait_until, Backend, Keel, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How late past a configured timeout keel may act (a debug build on a loaded machine).
const MARGIN: Duration = Duration::from_millis(1500);

/// How long a capped connection may stay open before keel closes it ("at once").
const CAP_CLOSE: Duration = Duration::from_secs(2);

/// Time keel may take to cut a body trickling under `min_body_rate`, grace period included.
const TRICKLE_CUT: Duration = Duration::from_secs(15);

/// Time for a freed connection slot to be usable again.
const SLOT_FREED: Duration = Duration::from_secs(3);

async fn keel_with_limits(limits: &str) -> Result<(Backend, Keel)> {
    let app = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&app]))
        .raw(&format!("[listeners.web.limits]\n{limits}"))
        .start()
        .await?;
    Ok((app, keel))
}

/// A request that completes normally: 200 from the backend.
async fn served(keel: &Keel, what: &str) -> Result<()> {
    let r = get_fresh(keel.proxy_addr(), "/").await.with_context(|| what.to_owned())?;
    ensure!(r.status == 200 && r.text() == "app", "{what}: {} {:?}", r.status, r.text());
    Ok(())
}

/// Reads until close; returns the bytes and when the close came.
async fn read_until_close(mut rd: tokio::net::tcp::OwnedReadHalf, deadline: Duration) -> Result<(Vec<u8>, Instant)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, rd.read(&mut buf)).await {
            Err(_) => bail!("still open after {deadline:?}; received {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((got, Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn slowloris_is_cut_at_header_timeout_while_others_are_served() -> Result<()> {
    let (_app, keel) = keel_with_limits("header_timeout = \"1s\"").await?;
    let keel = Arc::new(keel);
    let normal = {
        let keel = keel.clone();
        tokio::spawn(async move {
            for i in 0..15 {
                served(&keel, &format!("normal request {i} during the slowloris")).await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>(())
        })
    };

    let stream = TcpStream::connect(keel.proxy_addr()).await?;
    let (rd, mut wr) = stream.into_split();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        // One byte every 200 ms: 9.6 s for the whole thing, far past the 1 s header timeout.
        for b in head {
            if wr.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (got, closed_at) = read_until_close(rd, Duration::from_secs(1) + MARGIN + MARGIN).await?;
    writer.abort();
    let took = closed_at - start;
    let codes = status_codes(&got);
    ensure!(codes.is_empty() || codes == [408], "the slowloris got {:?}", String::from_utf8_lossy(&got));
    ensure!(took <= Duration::from_secs(1) + MARGIN, "the slowloris was cut after {took:?}, header_timeout is 1s");
    ensure!(took >= Duration::from_millis(800), "the slowloris was cut after only {took:?}, before header_timeout");
    normal.await??;
    Ok(())
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_header_timeout() -> Result<()> {
    let (_app, keel) = keel_with_limits("header_timeout = \"1s\"\nidle_timeout = \"30s\"").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    let start = Instant::now();
    ensure!(!c.closed_within(Duration::from_millis(500)).await, "a silent connection was closed within 0.5s");
    let got = c.expect_close(Duration::from_secs(1) + MARGIN).await?;
    let codes = status_codes(&got);
    ensure!(codes.is_empty() || codes == [408], "a silent connection got {:?}", String::from_utf8_lossy(&got));
    eprintln!("silent connection closed after {:?}", start.elapsed());
    Ok(())
}

#[tokio::test]
async fn an_idle_keepalive_connection_is_closed_after_idle_timeout() -> Result<()> {
    let (_app, keel) = keel_with_limits("header_timeout = \"30s\"\nidle_timeout = \"1s\"").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match c.read_response(REQUEST).await? {
        ReadOutcome::Response(r) if r.status == 200 => {}
        other => bail!("first request: {other:?}"),
    }
    let start = Instant::now();
    ensure!(!c.closed_within(Duration::from_millis(500)).await, "the keep-alive connection was closed within 0.5s");
    let got = c.expect_close(Duration::from_secs(1) + MARGIN).await?;
    ensure!(got.is_empty(), "an idle connection was sent {:?}", String::from_utf8_lossy(&got));
    eprintln!("idle connection closed after {:?}", start.elapsed());
    // And a keep-alive connection in use (a request every 300 ms) is not cut.
    let mut busy = RawConn::connect(keel.proxy_addr()).await?;
    for i in 0..6 {
        busy.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.with_context(|| format!("busy request {i}"))?;
        match busy.read_response(REQUEST).await? {
            ReadOutcome::Response(r) if r.status == 200 => {}
            other => bail!("busy request {i}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Opens a keep-alive connection from `from` and gets one 200 on it.
async fn open_served(from: Ipv4Addr, addr: SocketAddr, what: &str) -> Result<RawConn> {
    let mut c = RawConn::connect_from(from, addr).await.with_context(|| what.to_owned())?;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.with_context(|| what.to_owned())?;
    match c.read_response(REQUEST).await.with_context(|| what.to_owned())? {
        ReadOutcome::Response(r) if r.status == 200 => Ok(c),
        other => bail!("{what}: {other:?}"),
    }
}

/// Checks that a connection from `from` is closed at once without a response.
async fn refused(from: Ipv4Addr, addr: SocketAddr, what: &str) -> Result<()> {
    let mut c = RawConn::connect_from(from, addr).await.with_context(|| what.to_owned())?;
    // The write may already fail: the connection is gone, which is the point.
    let _ = c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let got = c.expect_close(CAP_CLOSE).await.with_context(|| what.to_owned())?;
    ensure!(got.is_empty(), "{what}: expected a close without a response, got {:?}", String::from_utf8_lossy(&got));
    Ok(())
}

#[tokio::test]
async fn per_client_connection_cap_closes_the_sixth_but_serves_another_address() -> Result<()> {
    let (_app, keel) =
        keel_with_limits("max_connections_per_client = 5\nheader_timeout = \"30s\"\nidle_timeout = \"30s\"").await?;
    let addr = keel.proxy_addr();
    let local = Ipv4Addr::new(127, 0, 0, 1);
    let mut held = Vec::new();
    for i in 0..5 {
        held.push(open_served(local, addr, &format!("connection {i} from 127.0.0.1")).await?);
    }
    refused(local, addr, "the 6th connection from 127.0.0.1").await?;
    let mut other = open_served(Ipv4Addr::new(127, 0, 0, 2), addr, "a connection from 127.0.0.2").await?;
    other.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    ensure!(
        matches!(other.read_response(REQUEST).await?, ReadOutcome::Response(r) if r.status == 200),
        "127.0.0.2's second request"
    );
    // The held connections still work.
    for (i, c) in held.iter_mut().enumerate() {
        c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        ensure!(
            matches!(c.read_response(REQUEST).await?, ReadOutcome::Response(r) if r.status == 200),
            "held connection {i} after the refusal"
        );
    }
    let m = keel.metric("keel_connections_refused_total", &["listener=\"web\"", "reason=\"per_client\""], None).await?;
    ensure!(m.is_some_and(|v| v >= 1.0), "keel_connections_refused_total{{reason=\"per_client\"}} = {m:?}");
    // Closing one frees a slot for 127.0.0.1.
    drop(held.pop());
    wait_until(SLOT_FREED, "a slot for 127.0.0.1 after closing one connection", || async {
        open_served(local, addr, "after freeing a slot").await.is_ok()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn total_connection_cap_closes_the_extra_connection() -> Result<()> {
    let (_app, keel) =
        keel_with_limits("max_connections = 3\nheader_timeout = \"30s\"\nidle_timeout = \"30s\"").await?;
    let addr = keel.proxy_addr();
    let mut held = Vec::new();
    for (i, last) in [1u8, 2, 3].into_iter().enumerate() {
        held.push(open_served(Ipv4Addr::new(127, 0, 0, last), addr, &format!("connection {i}")).await?);
    }
    refused(Ipv4Addr::new(127, 0, 0, 4), addr, "a 4th connection over max_connections = 3").await?;
    let m = keel.metric("keel_connections_refused_total", &["listener=\"web\"", "reason=\"total\""], None).await?;
    ensure!(m.is_some_and(|v| v >= 1.0), "keel_connections_refused_total{{reason=\"total\"}} = {m:?}");
    drop(held.pop());
    wait_until(SLOT_FREED, "a slot after closing one connection", || async {
        open_served(Ipv4Addr::new(127, 0, 0, 5), addr, "after freeing a slot").await.is_ok()
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_paused_body_gets_408() -> Result<()> {
    let (_app, keel) = keel_with_limits("body_timeout = \"1s\"\nheader_timeout = \"10s\"").await?;
    let stream = TcpStream::connect(keel.proxy_addr()).await?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n").await?;
    wr.write_all(&[b'x'; 100]).await?;
    let paused_at = Instant::now();
    let (got, closed_at) = read_until_close(rd, Duration::from_secs(1) + MARGIN + MARGIN).await?;
    let codes = status_codes(&got);
    ensure!(codes == [408], "a body paused past body_timeout got {:?}", String::from_utf8_lossy(&got));
    let took = closed_at - paused_at;
    ensure!(took <= Duration::from_secs(1) + MARGIN, "the paused body was cut after {took:?}");
    drop(wr);
    served(&keel, "a normal request after the paused body").await
}

#[tokio::test]
async fn a_trickling_body_gets_408() -> Result<()> {
    let (_app, keel) =
        keel_with_limits("body_timeout = \"5s\"\nmin_body_rate = 1000\nheader_timeout = \"10s\"").await?;
    let keel = Arc::new(keel);
    let stream = TcpStream::connect(keel.proxy_addr()).await?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n").await?;
    // 10 bytes every 200 ms = 50 B/s, well under 1000 B/s, and never a pause near body_timeout.
    let writer = tokio::spawn(async move {
        for _ in 0..200 {
            if wr.write_all(&[b'x'; 10]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let normal = {
        let keel = keel.clone();
        tokio::spawn(async move { served(&keel, "a normal request during the trickle").await })
    };
    let start = Instant::now();
    let (got, _) = read_until_close(rd, TRICKLE_CUT).await?;
    writer.abort();
    let codes = status_codes(&got);
    ensure!(codes == [408], "a body trickling at 50 B/s (min 1000 B/s) got {:?}", String::from_utf8_lossy(&got));
    eprintln!("trickle cut after {:?}", start.elapsed());
    normal.await??;
    Ok(())
}

#[tokio::test]
async fn a_body_over_max_body_bytes_gets_413() -> Result<()> {
    let (app, keel) = keel_with_limits("max_body_bytes = 1024").await?;
    let addr = keel.proxy_addr();
    // Content-Length says too much: refused before the body is even sent, backend untouched.
    let mut c = RawConn::connect(addr).await?;
    c.write(b"POST /too-big HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n").await?;
    match c.read_response(HOSTILE).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 413, "Content-Length 2048 over 1024: {}", r.status),
        ReadOutcome::Closed(got) => {
            bail!("Content-Length 2048: closed without 413 ({:?})", String::from_utf8_lossy(&got))
        }
    }
    let mut req = b"POST /too-big HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 2048]);
    let mut c = RawConn::connect(addr).await?;
    c.write(&req).await?;
    match c.read_response(HOSTILE).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 413, "a 2048-byte body: {}", r.status),
        ReadOutcome::Closed(got) => bail!("a 2048-byte body: closed without 413 ({:?})", String::from_utf8_lossy(&got)),
    }
    ensure!(!app.paths().iter().any(|p| p == "/too-big"), "a body declared over the limit reached the backend");

    // Chunked, no length up front: 413 once the limit is passed.
    let mut req = b"POST /chunked-big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'y'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let mut c = RawConn::connect(addr).await?;
    c.write(&req).await?;
    match c.read_response(HOSTILE).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 413, "a 2048-byte chunked body: {}", r.status),
        ReadOutcome::Closed(got) => {
            bail!("a 2048-byte chunked body: closed without 413 ({:?})", String::from_utf8_lossy(&got))
        }
    }

    // At the limit is fine.
    let mut req = b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 1024\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 1024]);
    let mut c = RawConn::connect(addr).await?;
    c.write(&req).await?;
    match c.read_response(REQUEST).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200, "a 1024-byte body at the limit: {}", r.status),
        other => bail!("a 1024-byte body: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431() -> Result<()> {
    let (app, keel) = keel_with_limits("max_header_bytes = 8192\nmax_headers = 20").await?;
    let addr = keel.proxy_addr();
    let ask = |req: Vec<u8>| async move {
        let mut c = RawConn::connect(addr).await?;
        let _ = c.write(&req).await;
        c.read_response(HOSTILE).await
    };
    let big = format!("GET /big-head HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    match ask(big.into_bytes()).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 431, "a 9 KB head over 8192: {}", r.status),
        ReadOutcome::Closed(got) => bail!("a 9 KB head: closed without 431 ({:?})", String::from_utf8_lossy(&got)),
    }
    let fine = format!("GET /fine-head HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(4000));
    match ask(fine.into_bytes()).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200, "a 4 KB head: {}", r.status),
        other => bail!("a 4 KB head: {other:?}"),
    }
    let mut many = b"GET /many-headers HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    match ask(many).await? {
        ReadOutcome::Response(r) => {
            ensure!(r.status == 431 || r.status == 400, "40 headers over max_headers = 20: {}", r.status)
        }
        ReadOutcome::Closed(_) => {}
    }
    let paths = app.paths();
    ensure!(
        !paths.iter().any(|p| p == "/big-head" || p == "/many-headers"),
        "an oversized head reached the backend: {paths:?}"
    );
    Ok(())
}

#[tokio::test]
async fn max_requests_per_connection_closes_after_the_last() -> Result<()> {
    let (app, keel) = keel_with_limits("max_requests_per_connection = 3").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    for i in 1..=3 {
        c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.with_context(|| format!("request {i}"))?;
        let r = match c.read_response(REQUEST).await? {
            ReadOutcome::Response(r) => r,
            ReadOutcome::Closed(got) => bail!("request {i}: closed ({:?})", String::from_utf8_lossy(&got)),
        };
        ensure!(r.status == 200, "request {i}: {}", r.status);
        let close = header(&r, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        ensure!(close == (i == 3), "request {i} of 3: Connection header {:?}", header(&r, "connection"));
    }
    let got = c.expect_close(HOSTILE).await?;
    ensure!(got.is_empty(), "after the 3rd response: {:?}", String::from_utf8_lossy(&got));
    ensure!(app.requests() == 3, "backend saw {} requests", app.requests());
    Ok(())
}

#[tokio::test]
async fn a_slow_second_request_on_a_keepalive_connection_gets_408() -> Result<()> {
    let (_app, keel) = keel_with_limits("header_timeout = \"1s\"\nidle_timeout = \"30s\"").await?;
    let mut c = RawConn::connect(keel.proxy_addr()).await?;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    ensure!(matches!(c.read_response(REQUEST).await?, ReadOutcome::Response(r) if r.status == 200), "first request");
    // The second head starts and then trickles: header_timeout, not idle_timeout, applies.
    c.write(b"GET /second HTTP/1.1\r\nHost: x\r\n").await?;
    let start = Instant::now();
    let got = c.expect_close(Duration::from_secs(1) + MARGIN + MARGIN).await?;
    let took = start.elapsed();
    let codes = status_codes(&got);
    ensure!(codes.is_empty() || codes == [408], "the slow second request got {:?}", String::from_utf8_lossy(&got));
    ensure!(took <= Duration::from_secs(1) + MARGIN, "the slow second request was cut after {took:?}");
    Ok(())
}

#[tokio::test]
async fn a_paused_chunked_body_gets_408() -> Result<()> {
    let (_app, keel) = keel_with_limits("body_timeout = \"1s\"\nheader_timeout = \"10s\"").await?;
    let stream = TcpStream::connect(keel.proxy_addr()).await?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n")
        .await?;
    let paused_at = Instant::now();
    let (got, closed_at) = read_until_close(rd, Duration::from_secs(1) + MARGIN + MARGIN).await?;
    ensure!(
        status_codes(&got) == [408],
        "a chunked body paused past body_timeout got {:?}",
        String::from_utf8_lossy(&got)
    );
    let took = closed_at - paused_at;
    ensure!(took <= Duration::from_secs(1) + MARGIN, "the paused chunked body was cut after {took:?}");
    drop(wr);
    Ok(())
}
