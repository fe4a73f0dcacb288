//! Tests of the harness itself, without keel: if these fail, no other failure means anything.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use futures_util::{SinkExt, StreamExt};
use keel_tests::backend::Blackhole;
use keel_tests::client::{get_fresh, raw_exchange, RawOutcome};
use keel_tests::wait::{wait_until, HOSTILE, REQUEST};
use keel_tests::{Backend, Client};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn backends_answer_with_their_names() -> Result<()> {
    let a = Backend::start("a")?;
    let b = Backend::start("b")?;
    let client = Client::new();
    for (backend, name) in [(&a, "a"), (&b, "b")] {
        let r = client.get(backend.addr(), "/anything?x=1").await?;
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), name);
        assert_eq!(r.backend(), Some(name));
    }
    assert_eq!(a.requests(), 1);
    assert_eq!(a.paths(), ["/anything?x=1"]);
    assert_eq!(b.requests(), 1);
    Ok(())
}

#[tokio::test]
async fn healthz_follows_the_switch_and_is_not_counted() -> Result<()> {
    let a = Backend::start("a")?;
    let c = Client::new();
    assert_eq!(c.get(a.addr(), "/healthz").await?.status, 200);
    a.set_healthy(false);
    assert_eq!(c.get(a.addr(), "/healthz").await?.status, 503);
    a.set_healthy(true);
    assert_eq!(c.get(a.addr(), "/healthz").await?.status, 200);
    assert_eq!(a.requests(), 0);
    assert_eq!(a.health_checks(), 3);
    Ok(())
}

#[tokio::test]
async fn special_paths_work() -> Result<()> {
    let a = Backend::start("a")?;
    let c = Client::new();

    let r = c.get(a.addr(), "/status/418").await?;
    assert_eq!(r.status, 418);
    assert_eq!(r.backend(), Some("a"));

    let start = Instant::now();
    let r = c.get(a.addr(), "/slow?ms=200").await?;
    assert_eq!(r.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(200));

    let r = c.get(a.addr(), "/big?bytes=100000").await?;
    assert_eq!(r.body.len(), 100_000);

    let req = keel_tests::client::empty(keel_tests::client::get(a.addr(), "/headers").header("x-test", "yes"))?;
    let doc = c.send(req).await?.json()?;
    assert_eq!(doc["headers"]["x-test"][0], "yes");
    assert_eq!(doc["method"], "GET");
    Ok(())
}

#[tokio::test]
async fn in_flight_and_delay_are_visible() -> Result<()> {
    let a = Backend::start("a")?;
    a.set_delay(Duration::from_millis(500));
    let addr = a.addr();
    let pending = tokio::spawn(async move { get_fresh(addr, "/").await });
    wait_until(Duration::from_secs(2), "the request to be in flight", || async { a.in_flight() == 1 }).await?;
    let r = pending.await??;
    assert_eq!(r.status, 200);
    assert_eq!(a.in_flight(), 0);
    Ok(())
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() -> Result<()> {
    let a = Backend::start("a")?;
    let r = Client::h2c().get(a.addr(), "/").await?;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.text(), "a");
    Ok(())
}

#[tokio::test]
async fn websocket_echo_directly() -> Result<()> {
    let a = Backend::start("a")?;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", a.addr())).await?;
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await?;
    let m = tokio::time::timeout(REQUEST, ws.next()).await?.expect("a message")?;
    assert_eq!(m, Message::text("hello"));
    ws.send(Message::binary(vec![1u8, 2, 3])).await?;
    let m = tokio::time::timeout(REQUEST, ws.next()).await?.expect("a message")?;
    assert_eq!(m, Message::binary(vec![1u8, 2, 3]));
    ws.close(None).await?;
    Ok(())
}

#[tokio::test]
async fn stop_refuses_connects_and_closes_open_ones_and_restart_serves_again() -> Result<()> {
    let mut a = Backend::start("a")?;
    let addr = a.addr();
    let client = Client::new();
    // An idle keep-alive connection stays open in the client's pool.
    assert_eq!(client.get(addr, "/").await?.status, 200);
    assert_eq!(a.open_connections(), 1);
    // And a raw connection that has sent nothing.
    let mut idle = tokio::net::TcpStream::connect(addr).await?;
    wait_until(Duration::from_secs(2), "2 open connections", || async { a.open_connections() == 2 }).await?;

    a.stop();
    let err = tokio::net::TcpStream::connect(addr).await.expect_err("connect to a stopped backend");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    // The idle connection was closed by the backend: a read sees EOF (or a reset).
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(REQUEST, tokio::io::AsyncReadExt::read(&mut idle, &mut buf)).await?;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    a.restart()?;
    assert_eq!(a.addr(), addr);
    let r = get_fresh(addr, "/").await?;
    assert_eq!(r.text(), "a");
    // The pooled connection died with the old server; the client notices and reconnects.
    assert_eq!(client.get(addr, "/").await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn start_many_names_backends_by_letter() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let names: Vec<&str> = bs.iter().map(Backend::name).collect();
    assert_eq!(names, ["a", "b", "c"]);
    Ok(())
}

#[tokio::test]
async fn blackhole_closes_without_answering() -> Result<()> {
    let h = Blackhole::start()?;
    let out = raw_exchange(h.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), HOSTILE).await?;
    assert_eq!(out, RawOutcome::Closed);
    assert_eq!(h.accepted(), 1);
    Ok(())
}

#[tokio::test]
async fn raw_exchange_reads_a_status_line() -> Result<()> {
    let a = Backend::start("a")?;
    let out = raw_exchange(a.addr(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), HOSTILE).await?;
    ensure!(out == RawOutcome::Status(200), "{out:?}");
    let out = raw_exchange(a.addr(), b"\x16\x03\x01garbage\r\n\r\n".to_vec(), HOSTILE).await?;
    ensure!(matches!(out, RawOutcome::Status(400) | RawOutcome::Closed), "{out:?}");
    Ok(())
}

#[tokio::test]
async fn drip_streams_chunks_over_time() -> Result<()> {
    use http_body_util::BodyExt;
    let a = Backend::start("a")?;
    let start = Instant::now();
    let resp = Client::new()
        .send_streaming(keel_tests::client::empty(keel_tests::client::get(a.addr(), "/drip?chunks=3&ms=300"))?)
        .await?;
    let mut body = resp.into_body();
    let first = body.frame().await.expect("a frame")?.into_data().expect("data");
    assert_eq!(first, "chunk 0\n");
    assert!(start.elapsed() < Duration::from_millis(300), "first chunk after {:?}", start.elapsed());
    let rest = body.collect().await?.to_bytes();
    assert_eq!(rest, "chunk 1\nchunk 2\n");
    assert!(start.elapsed() >= Duration::from_millis(600));
    Ok(())
}

#[tokio::test]
async fn hop_sends_hop_by_hop_response_headers() -> Result<()> {
    let a = Backend::start("a")?;
    let r = Client::new().get(a.addr(), "/hop").await?;
    assert_eq!(r.header("x-internal"), Some("1"));
    assert_eq!(r.header("connection"), Some("x-internal"));
    Ok(())
}
