//! keel's HTTP/1.1 client (every request to a server) against a server that writes its
//! responses byte for byte and records the requests it reads: every framing RFC 9112 allows,
//! the hostile ones it forbids, interim responses, request bodies framed by length and chunked
//! (with trailers), response trailers, an early answer to an upload, and connections the server
//! closes while keel keeps them idle. The servers count their connections, so reuse (plain and
//! TLS) is shown, not assumed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use keel_tests::raw::{RawConn, ReadOutcome};
use keel_tests::tempdir::TempDir;
use keel_tests::tls::TestCa;
use keel_tests::{Backend, Keel, PoolSpec};
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
        let line = String::from_utf8_lossy(&head).into_owned();
        let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
        match path.as_str() {
            // Answers with the request exactly as it arrived, head and body.
            "/echo-request" => {
                let Some(body) = read_body(&mut stream, &mut buf, &line).await else { return };
                let mut request = head.clone();
                request.extend_from_slice(&body);
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", request.len());
                if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&request).await.is_err() {
                    return;
                }
            }
            // Refuses an upload at its head and closes with the body unread.
            "/too-large" => {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n",
                    )
                    .await;
                return;
            }
            _ => {
                let (bytes, close) = script(&path);
                if stream.write_all(bytes).await.is_err() || close {
                    return;
                }
            }
        }
    }
}

/// Reads a request body as its head frames it (`Content-Length`, or chunked up to the end of
/// its trailer section), leaving what follows in `buf`.
async fn read_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &str) -> Option<Vec<u8>> {
    let lower = head.to_ascii_lowercase();
    let length =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    let chunked = lower.contains("transfer-encoding: chunked");
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let end = match (length, chunked) {
            (Some(n), false) => (buf.len() >= n).then_some(n),
            (_, true) => buf
                .windows(5)
                .position(|w| w == b"\r\n0\r\n")
                .and_then(|last| buf[last + 2..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| last + 2 + p + 4)),
            (None, false) => Some(0),
        };
        if let Some(end) = end {
            return Some(buf.drain(..end).collect());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
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

/// The response body of a request written raw to keel, as the client read it.
async fn raw_exchange(keel: &Keel, request: &[u8]) -> Result<keel_tests::client::RawResponse> {
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(request).await?;
    match conn.read_response(Duration::from_secs(5)).await? {
        ReadOutcome::Response(r) => Ok(r),
        ReadOutcome::Closed(b) => anyhow::bail!("closed without a response: {:?}", String::from_utf8_lossy(&b)),
    }
}

#[tokio::test]
async fn a_body_with_a_length_reaches_the_server_framed_by_that_length() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    for i in 0..3 {
        let r = raw_exchange(
            &keel,
            b"POST /echo-request HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nContent-Type: text/plain\r\n\r\nhello world",
        )
        .await?;
        let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
        ensure!(r.status == 200, "request {i}: {} {seen:?}", r.status);
        ensure!(seen.starts_with("post /echo-request http/1.1\r\n"), "request {i} arrived as {seen:?}");
        ensure!(
            seen.contains("\r\ncontent-length: 11\r\n") && !seen.contains("transfer-encoding"),
            "request {i} not framed by its length: {seen:?}"
        );
        ensure!(seen.ends_with("\r\n\r\nhello world"), "request {i} body: {seen:?}");
    }
    let accepted = server.accepted.load(Ordering::SeqCst);
    ensure!(accepted == 1, "3 uploads in a row opened {accepted} server connections: no reuse after a body");
    Ok(())
}

#[tokio::test]
async fn a_chunked_upload_reaches_the_server_chunked_with_its_trailers() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    let r = raw_exchange(
        &keel,
        b"POST /echo-request HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n",
    )
    .await?;
    let seen = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
    ensure!(r.status == 200, "{} {seen:?}", r.status);
    ensure!(
        seen.contains("\r\ntransfer-encoding: chunked\r\n") && !seen.contains("content-length"),
        "not sent chunked: {seen:?}"
    );
    let body = seen.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let data: String = body.split("\r\n").collect::<Vec<_>>().join("|");
    ensure!(data.contains("hello") && data.contains(" world"), "chunk data lost: {seen:?}");
    ensure!(body.ends_with("0\r\nx-checksum: 42\r\n\r\n"), "the trailers did not arrive: {seen:?}");
    Ok(())
}

#[tokio::test]
async fn response_trailers_reach_an_http_1_1_client() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(b"GET /chunked HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n").await?;
    let raw = conn.expect_close(Duration::from_secs(5)).await?;
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    ensure!(text.starts_with("http/1.1 200"), "{text:?}");
    ensure!(text.contains("\r\ntransfer-encoding: chunked\r\n"), "not chunked: {text:?}");
    ensure!(text.ends_with("\r\n0\r\nx-trailer: t\r\n\r\n"), "the trailer did not reach the client: {text:?}");
    Ok(())
}

#[tokio::test]
async fn an_early_413_during_an_upload_reaches_the_client() -> Result<()> {
    let server = scripted().await?;
    let keel = keel_for(&server).await?;
    let size = 8 * 1024 * 1024;
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(format!("POST /too-large HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n").as_bytes()).await?;
    // The upload goes on while the answer is awaited; keel may stop reading it at any point.
    let (mut read, mut write) = conn.stream().split();
    let upload = async {
        let block = vec![b'u'; 64 * 1024];
        for _ in 0..size / block.len() {
            if write.write_all(&block).await.is_err() {
                break;
            }
        }
    };
    let answer = async {
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(7).any(|w| w == b"too big") {
            match tokio::time::timeout(Duration::from_secs(5), read.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            }
        }
        got
    };
    let ((), got) = tokio::join!(upload, answer);
    let text = String::from_utf8_lossy(&got);
    ensure!(text.starts_with("HTTP/1.1 413"), "the server's early 413 did not reach the client: {text:?}");
    ensure!(text.contains("too big"), "the 413's body was lost: {text:?}");
    let r = keel.get("/ok").await?;
    ensure!(r.status == 200, "after the early answer: {}", r.status);
    Ok(())
}

#[tokio::test]
async fn a_tls_pool_reuses_its_server_connections() -> Result<()> {
    let dir = TempDir::new("keel-upstream-tls")?;
    let ca = TestCa::new()?;
    let ca_file = ca.write(&dir, "ca.pem")?;
    let backend = Backend::start_tls("secure", &ca.leaf(&["backend.test"])?)?;
    let pool = PoolSpec::new("app", "round_robin")
        .backends([&backend])
        .set(&format!("tls = {{ ca = \"{}\", server_name = \"backend.test\" }}", ca_file.display()))
        .set("retries = 0")
        .no_outlier();
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    for i in 0..20 {
        let r = keel.get("/headers").await?;
        ensure!(r.status == 200 && r.backend() == Some("secure"), "request {i}: {} {}", r.status, r.text());
    }
    let mut conn = RawConn::connect(keel.proxy_addr()).await?;
    conn.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody").await?;
    match conn.read_response(Duration::from_secs(5)).await? {
        ReadOutcome::Response(r) => ensure!(r.status == 200, "an upload over TLS: {}", r.status),
        ReadOutcome::Closed(b) => anyhow::bail!("upload over TLS: closed: {:?}", String::from_utf8_lossy(&b)),
    }
    let (accepted, handshakes) = (backend.connections_accepted(), backend.tls_handshakes());
    ensure!(
        accepted == 1 && handshakes == 1,
        "21 sequential requests over TLS took {accepted} connections and {handshakes} handshakes: no reuse"
    );
    Ok(())
}
