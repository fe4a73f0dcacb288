//! The exchange itself: headers keel adds and removes, bodies in both directions, WebSocket
//! upgrades and h2c.

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Version};
use http_body_util::Full;
use keel_tests::client::{empty, get};
use keel_tests::wait::REQUEST;
use keel_tests::{Backend, Client, Keel, PoolSpec};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

async fn one_backend_keel() -> Result<(Backend, Keel)> {
    let a = Backend::start("a")?;
    let keel =
        Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends([&a])).start().await?;
    Ok((a, keel))
}

/// All values of header `name` the backend received, in order.
fn values(doc: &Value, name: &str) -> Vec<String> {
    doc["headers"][name]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The header as one comma-separated list, however many lines it came in.
fn joined(doc: &Value, name: &str) -> String {
    values(doc, name).join(", ")
}

#[tokio::test]
async fn forwarding_headers_reach_the_backend() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;

    let r = keel.client().send(empty(get(keel.proxy_addr(), "/headers").header("host", "shop.example.com"))?).await?;
    ensure!(r.status == 200, "{}", r.status);
    let doc = r.json()?;
    ensure!(joined(&doc, "x-forwarded-for") == "127.0.0.1", "x-forwarded-for: {:?}", values(&doc, "x-forwarded-for"));
    ensure!(
        values(&doc, "x-forwarded-proto") == ["http"],
        "x-forwarded-proto: {:?}",
        values(&doc, "x-forwarded-proto")
    );
    ensure!(
        values(&doc, "x-forwarded-host") == ["shop.example.com"],
        "x-forwarded-host: {:?}",
        values(&doc, "x-forwarded-host")
    );
    Ok(())
}

#[tokio::test]
async fn x_forwarded_for_appends_the_client_to_an_existing_chain() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;

    let req = get(keel.proxy_addr(), "/headers").header("x-forwarded-for", "203.0.113.9");
    let doc = keel.client().send(empty(req)?).await?.json()?;
    // One header "203.0.113.9, 127.0.0.1" (nginx) or two lines (HAProxy): the same list.
    ensure!(
        joined(&doc, "x-forwarded-for") == "203.0.113.9, 127.0.0.1",
        "x-forwarded-for: {:?}",
        values(&doc, "x-forwarded-for")
    );
    Ok(())
}

#[tokio::test]
async fn host_header_reaches_the_backend_unchanged() -> Result<()> {
    // Not spelled out by the contract; HAProxy passes Host through, and virtual-hosted
    // backends depend on it.
    let (_a, keel) = one_backend_keel().await?;
    let req = get(keel.proxy_addr(), "/headers").header("host", "shop.example.com");
    let doc = keel.client().send(empty(req)?).await?.json()?;
    ensure!(values(&doc, "host") == ["shop.example.com"], "host: {:?}", values(&doc, "host"));
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;

    let req = get(keel.proxy_addr(), "/headers")
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("x-end-to-end", "kept");
    let r = keel.client().send(empty(req)?).await?;
    ensure!(r.status == 200, "{}", r.status);
    let doc = r.json()?;
    ensure!(values(&doc, "x-secret").is_empty(), "a header named in Connection was forwarded: {doc}");
    ensure!(values(&doc, "keep-alive").is_empty(), "keep-alive was forwarded: {doc}");
    ensure!(values(&doc, "proxy-connection").is_empty(), "proxy-connection was forwarded: {doc}");
    ensure!(!joined(&doc, "connection").contains("x-secret"), "the client's Connection was forwarded: {doc}");
    ensure!(values(&doc, "x-end-to-end") == ["kept"], "an end-to-end header was lost: {doc}");
    Ok(())
}

#[tokio::test]
async fn response_headers_and_body_come_back_as_sent() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    let r = keel.get("/hello").await?;
    ensure!(
        r.status == 200 && r.text() == "a" && r.backend() == Some("a"),
        "{} {:?} {:?}",
        r.status,
        r.text(),
        r.headers
    );
    Ok(())
}

#[tokio::test]
async fn large_bodies_stream_both_ways() -> Result<()> {
    let (a, keel) = one_backend_keel().await?;

    let r = keel.get("/big?bytes=5242880").await?;
    ensure!(r.status == 200, "{}", r.status);
    ensure!(r.body.len() == 5 * 1024 * 1024, "got {} bytes of 5 MiB", r.body.len());
    ensure!(r.body.iter().all(|&b| b == b'x'), "the body was altered");

    let upload = Bytes::from(vec![b'u'; 2 * 1024 * 1024]);
    let req = Request::builder()
        .method(Method::POST)
        .uri(keel.url("/upload"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(upload))?;
    let r = keel.client().send(req).await?;
    ensure!(r.status == 200 && r.text() == "a", "upload: {} {:?}", r.status, r.text());
    ensure!(a.paths().last().map(String::as_str) == Some("/upload"), "{:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn query_strings_and_paths_are_forwarded_verbatim() -> Result<()> {
    let (a, keel) = one_backend_keel().await?;
    let path = "/a/b%20c/./d?x=1&y=%2F&x=2";
    let r = keel.get(path).await?;
    ensure!(r.status == 200, "{}", r.status);
    ensure!(a.paths() == [path], "backend saw {:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn websocket_echo_through_keel() -> Result<()> {
    let (a, keel) = one_backend_keel().await?;

    let (mut ws, resp) =
        tokio::time::timeout(REQUEST, tokio_tungstenite::connect_async(keel.url("/ws").replace("http", "ws")))
            .await
            .context("websocket handshake timed out")??;
    ensure!(resp.status() == 101, "{}", resp.status());
    for i in 0..5 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await?;
        let m = tokio::time::timeout(REQUEST, ws.next()).await?.context("stream ended")??;
        ensure!(m == Message::text(text.clone()), "sent {text:?}, got {m:?}");
    }
    let blob: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    ws.send(Message::binary(blob.clone())).await?;
    let m = tokio::time::timeout(REQUEST, ws.next()).await?.context("stream ended")??;
    ensure!(m == Message::binary(blob), "binary message altered");
    ws.close(None).await?;
    ensure!(a.paths() == ["/ws"], "{:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn h2c_prior_knowledge_is_proxied() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    let client = Client::h2c();

    let r = client.get(keel.proxy_addr(), "/").await?;
    ensure!(r.status == 200, "{}", r.status);
    ensure!(r.version == Version::HTTP_2, "answered with {:?}", r.version);
    ensure!(r.text() == "a" && r.backend() == Some("a"), "{:?}", r.text());

    // Many concurrent streams on the one connection.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let client = client.clone();
        let proxy = keel.proxy_addr();
        tasks.push(tokio::spawn(async move { client.get(proxy, &format!("/slow?ms=100&i={i}")).await }));
    }
    for t in tasks {
        let r = t.await??;
        ensure!(r.status == 200 && r.text() == "a", "{} {:?}", r.status, r.text());
    }
    Ok(())
}

#[tokio::test]
async fn h2c_requests_get_forwarding_headers_too() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    let req = Request::builder()
        .uri(format!("http://shop.example.com:{}/headers", keel.proxy_addr().port()))
        .body(Full::new(Bytes::new()))?;
    // h2c to keel's address, with :authority naming another host.
    let stream = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    let conn = tokio::spawn(conn);
    let resp = tokio::time::timeout(REQUEST, send.send_request(req)).await??;
    ensure!(resp.status() == 200, "{}", resp.status());
    let body = tokio::time::timeout(REQUEST, http_body_util::BodyExt::collect(resp.into_body())).await??.to_bytes();
    conn.abort();
    let doc: Value = serde_json::from_slice(&body)?;
    ensure!(
        values(&doc, "x-forwarded-host") == [format!("shop.example.com:{}", keel.proxy_addr().port())]
            || values(&doc, "x-forwarded-host") == ["shop.example.com"],
        "x-forwarded-host from :authority: {doc}"
    );
    ensure!(values(&doc, "x-forwarded-proto") == ["http"], "{doc}");
    ensure!(joined(&doc, "x-forwarded-for") == "127.0.0.1", "{doc}");
    Ok(())
}

#[tokio::test]
async fn responses_are_streamed_not_buffered() -> Result<()> {
    use http_body_util::BodyExt;
    let (_a, keel) = one_backend_keel().await?;
    let start = std::time::Instant::now();
    let resp = keel.client().send_streaming(empty(get(keel.proxy_addr(), "/drip?chunks=4&ms=500"))?).await?;
    ensure!(resp.status() == 200, "{}", resp.status());
    let mut body = resp.into_body();
    let first = tokio::time::timeout(REQUEST, body.frame()).await?.context("no body")??;
    let first_at = start.elapsed();
    ensure!(first.data_ref().is_some_and(|d| d.starts_with(b"chunk 0")), "first frame: {first:?}");
    // The backend sends the first chunk at once and the last after 1.5 s: a buffering proxy
    // would deliver the first one at 1.5 s.
    ensure!(first_at < std::time::Duration::from_millis(1000), "first chunk after {first_at:?}: buffered");
    let rest = tokio::time::timeout(REQUEST, body.collect()).await??.to_bytes();
    ensure!(rest == "chunk 1\nchunk 2\nchunk 3\n", "{rest:?}");
    Ok(())
}

#[tokio::test]
async fn backend_connections_are_reused() -> Result<()> {
    // idle_timeout keeps pooled connections to servers: sequential requests must not each pay
    // for a new connection (HAProxy's http-reuse, nginx's upstream keepalive).
    let (a, keel) = one_backend_keel().await?;
    for i in 0..50 {
        let r = keel.get("/").await?;
        ensure!(r.status == 200, "request {i}: {}", r.status);
    }
    ensure!(
        a.connections_accepted() <= 5,
        "50 sequential requests opened {} backend connections",
        a.connections_accepted()
    );
    Ok(())
}

#[tokio::test]
async fn a_client_supplied_x_forwarded_proto_is_replaced() -> Result<()> {
    // The contract says keel adds "X-Forwarded-Proto: http". A client must not be able to make a
    // plain-HTTP request look like HTTPS to the backend, so keel sets it rather than appending
    // (HAProxy: http-request set-header; nginx: proxy_set_header).
    let (_a, keel) = one_backend_keel().await?;
    let req = get(keel.proxy_addr(), "/headers").header("x-forwarded-proto", "https");
    let doc = keel.client().send(empty(req)?).await?.json()?;
    ensure!(
        values(&doc, "x-forwarded-proto") == ["http"],
        "x-forwarded-proto: {:?}",
        values(&doc, "x-forwarded-proto")
    );
    Ok(())
}

#[tokio::test]
async fn http_1_0_clients_are_served() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    // No Host header, no keep-alive: the default pool answers and the connection closes.
    let t = keel_tests::client::raw_transcript(
        keel.proxy_addr(),
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        keel_tests::wait::HOSTILE,
    )
    .await?;
    let text = String::from_utf8_lossy(&t);
    ensure!(keel_tests::client::status_codes(&t) == [200], "{text}");
    ensure!(text.ends_with("\r\n\r\na"), "body is not the backend's name: {text:?}");
    Ok(())
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() -> Result<()> {
    let (a, keel) = one_backend_keel().await?;
    let reqs = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n\
                 GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let t = keel_tests::client::raw_transcript(keel.proxy_addr(), reqs.to_vec(), keel_tests::wait::HOSTILE).await?;
    ensure!(keel_tests::client::status_codes(&t) == [200, 200, 200], "{}", String::from_utf8_lossy(&t));
    ensure!(a.paths() == ["/one", "/two", "/three"], "{:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn keels_own_server_path_and_hyper_take_turns_on_one_connection() -> Result<()> {
    // Bodyless GETs are served by keel's own HTTP/1.1 path; a request with a body in the middle
    // of a pipelined batch goes to hyper with everything after it, and the connection comes
    // back to keel's path once hyper is done. Every request is answered once, in order.
    let (a, keel) = one_backend_keel().await?;
    let reqs = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
                 GET /3 HTTP/1.1\r\nHost: x\r\n\r\nGET /4 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n\
                 GET /5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let t = keel_tests::client::raw_transcript(keel.proxy_addr(), reqs.to_vec(), keel_tests::wait::HOSTILE).await?;
    let responses = keel_tests::client::parse_responses(&t);
    let codes: Vec<u16> = responses.iter().map(|r| r.status).collect();
    ensure!(codes == [200, 200, 200, 200, 200], "{}", String::from_utf8_lossy(&t));
    ensure!(a.paths() == ["/1", "/2", "/3", "/4", "/5"], "{:?}", a.paths());
    let last = responses.last().context("no response")?;
    ensure!(
        last.headers.iter().any(|(n, v)| n == "connection" && v.eq_ignore_ascii_case("close")),
        "the last response must announce the close: {last:?}"
    );
    Ok(())
}

#[tokio::test]
async fn expect_100_continue_uploads_work() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_a, keel) = one_backend_keel().await?;
    let mut s = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await?;
    // curl waits up to 1 s for the 100 before sending anyway; wait for it here.
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(REQUEST, s.read(&mut buf)).await.context("no 100 Continue")??;
    let interim = String::from_utf8_lossy(&buf[..n]).into_owned();
    ensure!(interim.starts_with("HTTP/1.1 100"), "expected 100 Continue, got {interim:?}");
    s.write_all(b"hello").await?;
    let mut rest = Vec::new();
    tokio::time::timeout(REQUEST, s.read_to_end(&mut rest)).await??;
    let all = format!("{interim}{}", String::from_utf8_lossy(&rest));
    ensure!(all.contains("HTTP/1.1 200"), "{all}");
    Ok(())
}

#[tokio::test]
async fn head_requests_get_no_body() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    let req = Request::builder().method(Method::HEAD).uri(keel.url("/")).body(Full::new(Bytes::new()))?;
    let r = keel.client().send(req).await?;
    ensure!(r.status == 200 && r.body.is_empty() && r.backend() == Some("a"), "{} {:?}", r.status, r.text());
    // And the keep-alive connection is still in a sane state for the next request.
    let r = keel.get("/").await?;
    ensure!(r.status == 200 && r.text() == "a", "{} {:?}", r.status, r.text());
    Ok(())
}

#[tokio::test]
async fn many_concurrent_clients_all_succeed() -> Result<()> {
    let bs = Backend::start_many("", 3)?;
    let keel =
        Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends(&bs)).start().await?;
    let proxy = keel.proxy_addr();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let mut statuses = Vec::new();
            for _ in 0..10 {
                statuses.push(client.get(proxy, "/slow?ms=5").await.map(|r| r.status.as_u16()).unwrap_or(0));
            }
            statuses
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await?.into_iter().filter(|&s| s != 200));
    }
    ensure!(bad.is_empty(), "{} of 500 concurrent requests failed: {bad:?}", bad.len());
    let total: u64 = bs.iter().map(Backend::requests).sum();
    ensure!(total == 500, "backends saw {total} requests");
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_response_headers_are_removed() -> Result<()> {
    let (_a, keel) = one_backend_keel().await?;
    let r = keel.get("/hop").await?;
    ensure!(r.status == 200 && r.text() == "a", "{} {:?}", r.status, r.text());
    ensure!(
        r.header("x-internal").is_none(),
        "a header the backend named in Connection reached the client: {:?}",
        r.headers
    );
    ensure!(r.header("keep-alive").is_none(), "the backend's keep-alive reached the client: {:?}", r.headers);
    ensure!(!r.header("connection").unwrap_or("").contains("x-internal"), "{:?}", r.headers);
    ensure!(r.backend() == Some("a"), "end-to-end response headers must pass: {:?}", r.headers);
    Ok(())
}

/// How long a client stays quiet between requests in the parking tests: long enough for keel
/// to let go of the idle connection's hyper state (it does so as soon as a response ends).
const CLIENT_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);

/// One response off `c`, which must be a 200 that keeps the connection.
async fn kept_alive_200(c: &mut keel_tests::raw::RawConn, what: &str) -> Result<()> {
    use keel_tests::raw::{header, ReadOutcome};
    let r = match c.read_response(REQUEST).await.with_context(|| what.to_owned())? {
        ReadOutcome::Response(r) => r,
        ReadOutcome::Closed(got) => anyhow::bail!("{what}: closed ({:?})", String::from_utf8_lossy(&got)),
    };
    ensure!(r.status == 200, "{what}: {}", r.status);
    let close = header(&r, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    ensure!(!close, "{what}: answered with Connection: close");
    Ok(())
}

#[tokio::test]
async fn an_idle_keepalive_connection_serves_later_and_pipelined_requests() -> Result<()> {
    // Between requests keel drops hyper's per-connection state and waits for the socket; what
    // the client sends next — one request, several pipelined, a head split across writes —
    // must be served on the same connection as if nothing happened.
    let (a, keel) = one_backend_keel().await?;
    let mut c = keel_tests::raw::RawConn::connect(keel.proxy_addr()).await?;
    c.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    kept_alive_200(&mut c, "first request").await?;
    tokio::time::sleep(CLIENT_PAUSE).await;
    c.write(b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n").await?;
    kept_alive_200(&mut c, "request after a pause").await?;
    tokio::time::sleep(CLIENT_PAUSE).await;
    c.write(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\nGET /5 HTTP/1").await?;
    kept_alive_200(&mut c, "pipelined request 3").await?;
    kept_alive_200(&mut c, "pipelined request 4").await?;
    tokio::time::sleep(CLIENT_PAUSE).await;
    c.write(b".1\r\nHost: x\r\n\r\n").await?;
    kept_alive_200(&mut c, "request 5, its head split across a pause").await?;
    tokio::time::sleep(CLIENT_PAUSE).await;
    c.write(b"POST /6 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").await?;
    kept_alive_200(&mut c, "a request with a body").await?;
    ensure!(a.paths() == ["/1", "/2", "/3", "/4", "/5", "/6"], "{:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn idle_keepalive_connections_cost_little_memory() -> Result<()> {
    // Issue #6: an idle keep-alive connection held ~18 KiB while hyper's buffers lived on; a
    // parked one holds only its guarded socket. The bound is loose (allocator noise, a debug
    // build) but far below what keeping hyper's buffers would take.
    const CONNS: usize = 400;
    const MAX_PER_CONN: u64 = 8 * 1024;
    let a = Backend::start("a")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&a]))
        .raw(&format!("[listeners.web.limits]\nmax_connections_per_client = {}", CONNS + 10))
        .start()
        .await?;
    ensure!(keel.get("/").await?.status == 200, "warm-up request");
    let before = keel.rss_bytes()?;
    let mut conns = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        let mut c = keel_tests::raw::RawConn::connect(keel.proxy_addr()).await?;
        c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        kept_alive_200(&mut c, &format!("connection {i}")).await?;
        conns.push(c);
    }
    tokio::time::sleep(CLIENT_PAUSE).await;
    let after = keel.rss_bytes()?;
    let per_conn = after.saturating_sub(before) / CONNS as u64;
    ensure!(per_conn <= MAX_PER_CONN, "{per_conn} bytes per idle connection ({before} -> {after})");
    for (i, c) in conns.iter_mut().enumerate().step_by(50) {
        c.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        kept_alive_200(c, &format!("connection {i}, used again")).await?;
    }
    Ok(())
}
