//! keel's own HTTP/1.1 client (bodyless `GET`/`HEAD` to plain-HTTP servers) against a server
//! that writes its responses byte for byte: every framing RFC 9112 allows, the hostile ones it
//! forbids, interim responses, and connections the server closes while keel keeps them idle.
//! The server counts its connections, so reuse is shown, not assumed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::raw::{RawConn, ReadOutcome};
use keel_tests::{Keel, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted server writes for a path, and whether it then closes the connection.
fn script(path: &str) -> (&'static [u8], bool) {
    match path {
        "/ok" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        ),
        "/eof" => (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", true),
        "/early" => (b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal", false),
        "/conflict" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk", true),
        "/garbage" => (b"SSH-2.0-OpenSSH\r\n\r\n", true),
        "/bye" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbye", true),
        // Answers as if keeping the connection, then closes it: keel's idle copy goes stale.
        "/then-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngone", true),
        "/te-cl" => (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", false),
        "/truncated" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true),
        "/no-content" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/twice" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", false),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn scripted() -> Result<Scripted> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(stream));
        }
    });
    Ok(Scripted { addr, accepted, task })
}

async fn serve(mut stream: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head: Vec<u8> = buf.drain(..end + 4).collect();
        let line = String::from_utf8_lossy(&head);
        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
        let (bytes, close) = script(&path);
        if stream.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

async fn keel_for(server: &Scripted) -> Result<Keel> {
    Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("s", server.addr, None).set("retries = 0").no_outlier())
        .start()
        .await
}

#[tokio::test]
async fn every_framing_is_relayed_and_connections_are_reused() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    for i in 0..20 {
        let r = keel.get("/ok").await?;
        ensure!(r.status == 200 && r.text() == "ok", "request {i}: {} {:?}", r.status, r.text());
    }
    let accepted = server.accepted.load(Ordering::SeqCst);
    ensure!(accepted <= 2, "20 sequential requests opened {accepted} server connections: no reuse");

    let r = keel.get("/chunked").await?;
    ensure!(r.status == 200 && r.text() == "hello world", "chunked: {} {:?}", r.status, r.text());
    let r = keel.get("/te-cl").await?;
    ensure!(
        r.status == 200 && r.text() == "abc",
        "Transfer-Encoding beside Content-Length: {} {:?}",
        r.status,
        r.text()
    );
    let r = keel.get("/eof").await?;
    ensure!(r.status == 200 && r.text() == "until close", "close-delimited: {} {:?}", r.status, r.text());
    let r = keel.get("/early").await?;
    ensure!(r.status == 200 && r.text() == "final", "after 103: {} {:?}", r.status, r.text());
    // One length repeated is one length; the client is told it once.
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(b"GET /twice HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match conn.read_response(Duration::from_secs(5)).await? {
        ReadOutcome::Response(r) => {
            let lengths: Vec<&(String, String)> = r.headers.iter().filter(|(n, _)| n == "content-length").collect();
            ensure!(r.status == 200 && r.body == b"ok", "repeated length: {} {:?}", r.status, r.body);
            ensure!(lengths.len() == 1 && lengths[0].1 == "2", "repeated length sent as {lengths:?}");
        }
        ReadOutcome::Closed(b) => anyhow::bail!("repeated length: closed: {:?}", String::from_utf8_lossy(&b)),
    }
    let r = keel.get("/no-content").await?;
    ensure!(r.status == 204 && r.text().is_empty(), "204: {} {:?}", r.status, r.text());
    let r = keel.get("/bye").await?;
    ensure!(r.status == 200 && r.text() == "bye", "Connection: close: {} {:?}", r.status, r.text());
    let r = keel.get("/ok").await?;
    ensure!(r.status == 200 && r.text() == "ok", "after the server closed: {} {:?}", r.status, r.text());

    // HEAD: no body whatever Content-Length says, and the client connection stays usable.
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(b"HEAD /ok HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match conn.read_head(Duration::from_secs(5)).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200, "HEAD: {}", r.status),
        ReadOutcome::Closed(b) => anyhow::bail!("HEAD: closed: {:?}", String::from_utf8_lossy(&b)),
    }
    conn.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    match conn.read_response(Duration::from_secs(5)).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200 && r.body == b"ok", "GET after HEAD: {}", r.status),
        ReadOutcome::Closed(b) => anyhow::bail!("GET after HEAD: closed: {:?}", String::from_utf8_lossy(&b)),
    }
    Ok(())
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_not_a_failed_request() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    for i in 0..30 {
        let r = keel.get("/then-close").await?;
        ensure!(r.status == 200 && r.text() == "gone", "request {i}: {} {:?}", r.status, r.text());
        // A request right after, on whatever keel kept idle.
        let r = keel.get("/ok").await?;
        ensure!(
            r.status == 200 && r.text() == "ok",
            "request {i} after a server-side close: {} {:?}",
            r.status,
            r.text()
        );
    }
    Ok(())
}

#[tokio::test]
async fn hostile_responses_get_502_and_keel_keeps_serving() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    for path in ["/conflict", "/garbage"] {
        let r = keel.get(path).await?;
        ensure!(r.status == 502, "{path}: expected 502, got {} {:?}", r.status, r.text());
        let r = keel.get("/ok").await?;
        ensure!(r.status == 200 && r.text() == "ok", "after {path}: {} {:?}", r.status, r.text());
    }
    // A body cut short: the client must see the response end early, not hang.
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(b"GET /truncated HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    let outcome = conn.read_response(Duration::from_secs(5)).await?;
    ensure!(
        !matches!(&outcome, ReadOutcome::Response(r) if r.status == 200 && r.body.len() == 10),
        "a truncated body was passed off as complete: {outcome:?}"
    );
    let r = keel.get("/ok").await?;
    ensure!(r.status == 200, "after a truncated body: {}", r.status);
    Ok(())
}
