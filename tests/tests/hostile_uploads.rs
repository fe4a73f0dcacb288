//! Hostile and slow uploads must never hurt other clients, and retries must never amplify an
//! outage: failures blamed on the right side, request buffering for small bodies, timeouts
//! that each mean one thing, `retry_on` with RFC 9110's idempotency rule, and the retry budget.
//!
//! Every test would fail on f88c390 (the main before this work) for the reason its comment
//! gives; on that commit the new keys (`request_buffer`, `response_timeout`, `retry_on`,
//! `retry_budget`) are also refused as unknown, so the config alone would stop them.
//!
//! Client-side rates and limits are scaled down (a 1 s body timeout, a few KiB/s) so that each
//! test runs in seconds, not in the 30 s of the defaults.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::client::get_fresh;
use keel_tests::raw::{RawConn, RawHttpBackend, ReadOutcome};
use keel_tests::wait::{HOSTILE, REQUEST};
use keel_tests::{wait_until, Keel, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Time for every upload of a test to have made progress or ended.
const UPLOADS: Duration = Duration::from_secs(8);

/// A keel whose pool `app` has one [`RawHttpBackend`] (which reads whole bodies and counts
/// accepted connections), with these listener limits and the pool as `pool` makes it.
async fn keel_with(limits: &str, pool: impl FnOnce(PoolSpec) -> PoolSpec) -> Result<(RawHttpBackend, Keel)> {
    let backend = RawHttpBackend::start()?;
    let pool = pool(PoolSpec::new("app", "round_robin").server("raw", backend.addr(), None));
    let keel = Keel::builder()
        .default_pool("app")
        .pool(pool)
        .raw(&format!("[listeners.web.limits]\n{limits}"))
        .start()
        .await?;
    Ok((backend, keel))
}

/// Sends a `POST` declaring `len` body bytes, then `chunk` bytes every `every` until `send`
/// bytes are sent (`send < len`: the client stalls), then reads the answer: its status, 0 if
/// keel closed without one. `sent` counts bytes written.
async fn trickle(
    addr: SocketAddr,
    len: usize,
    send: usize,
    chunk: usize,
    every: Duration,
    sent: Arc<AtomicUsize>,
) -> Result<u16> {
    let mut c = RawConn::connect(addr).await?;
    c.write(format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").as_bytes()).await?;
    let mut done = 0;
    while done < send {
        let n = chunk.min(send - done);
        if c.write(&vec![b'u'; n]).await.is_err() {
            break;
        }
        done += n;
        sent.fetch_add(n, Ordering::SeqCst);
        if done < send {
            tokio::time::sleep(every).await;
        }
    }
    answer(&mut c, UPLOADS).await
}

/// The status of the response `c` gets within `deadline`; 0 when keel closed without one.
async fn answer(c: &mut RawConn, deadline: Duration) -> Result<u16> {
    match c.read_response(deadline).await? {
        ReadOutcome::Response(r) => Ok(r.status),
        ReadOutcome::Closed(bytes) if bytes.is_empty() => Ok(0),
        ReadOutcome::Closed(bytes) => bail!("a partial answer: {:?}", String::from_utf8_lossy(&bytes)),
    }
}

/// The pool's one server in `/status`, as (state, broken, timeouts).
async fn server_health(keel: &Keel) -> Result<(String, u64, u64)> {
    let s = keel.server_status("app", "raw").await?;
    let n = |k: &str| s[k].as_u64().with_context(|| format!("{k} in {s}"));
    Ok((s["state"].as_str().unwrap_or_default().to_owned(), n("broken")?, n("timeouts")?))
}

// On f88c390 the pool's request timeout ran from the start of the exchange, upload included:
// each of these stalled uploads became a server timeout (504) counted by outlier detection, the
// server was ejected after 3 and the normal client got 503. Small bodies also streamed, so every
// stalled upload held a server connection.
#[tokio::test]
async fn stalled_uploads_are_408_and_never_count_against_the_server() -> Result<()> {
    let (backend, keel) = keel_with("body_timeout = \"1s\"\nmin_body_rate = 1024\nrequest_buffer = 4096", |p| {
        p.set("response_timeout = \"500ms\"").outlier(3, "30s")
    })
    .await?;
    let addr = keel.proxy_addr();
    let sent = Arc::new(AtomicUsize::new(0));
    // Three below request_buffer (buffered: never reach the server), three above (streamed to
    // the server, then stalled): all stop after 100 bytes.
    let mut uploads = Vec::new();
    for len in [2000, 2000, 2000, 20_000, 20_000, 20_000] {
        let sent = sent.clone();
        uploads.push(tokio::spawn(trickle(addr, len, 100, 100, Duration::ZERO, sent)));
    }
    let started = Instant::now();
    for (i, u) in uploads.into_iter().enumerate() {
        let status = u.await??;
        ensure!(status == 408, "stalled upload {i} got {status}");
    }
    eprintln!("6 stalled uploads answered 408 within {:?}", started.elapsed());
    // Clients that give up mid-body (half-close: they can still read the answer), buffered
    // and streamed: their own fault, 400.
    for len in [2000, 20_000, 20_000, 20_000] {
        let status = abandon(addr, len, 500).await?;
        ensure!(status == 400, "an upload abandoned after 500 of {len} bytes got {status}");
    }

    let r = get_fresh(addr, "/").await?;
    ensure!(
        r.status == 200 && r.text() == "ok",
        "a normal client after the stalled uploads: {} {:?}",
        r.status,
        r.text()
    );
    let (state, broken, timeouts) = server_health(&keel).await?;
    ensure!(state == "up", "the server is {state:?} after client-side failures");
    ensure!(
        broken == 0 && timeouts == 0,
        "client faults were counted against the server: broken {broken}, timeouts {timeouts}"
    );
    ensure!(
        backend.accepted() <= 7,
        "only the 6 streamed uploads and the GET may reach the server: {}",
        backend.accepted()
    );
    Ok(())
}

/// Sends a `POST` declaring `len` bytes, `send` of them, then half-closes; the answer's status.
async fn abandon(addr: SocketAddr, len: usize, send: usize) -> Result<u16> {
    let mut c = RawConn::connect(addr).await?;
    let mut bytes = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    bytes.resize(bytes.len() + send, b'a');
    c.write(&bytes).await?;
    c.shutdown_write().await?;
    answer(&mut c, HOSTILE).await
}

// On f88c390 the pool's request timeout (here 1 s) bounded the whole exchange, upload
// included: a legal 3 s upload got 504 and counted against the server.
#[tokio::test]
async fn a_slow_legal_upload_completes_past_the_response_timeout() -> Result<()> {
    // Streaming (request_buffer = 0), so the server is engaged for the whole upload: only the
    // client-side limits govern it; the response timeout starts once the request is sent.
    // The old key name `request_timeout` still works.
    let (backend, keel) = keel_with("body_timeout = \"2s\"\nmin_body_rate = 1024\nrequest_buffer = 0", |p| {
        p.set("request_timeout = \"1s\"")
    })
    .await?;
    let len = 24 * 1024;
    let started = Instant::now();
    // 1 KiB every 125 ms: 8 KiB/s, 3 s in all.
    let status = trickle(keel.proxy_addr(), len, len, 1024, Duration::from_millis(125), Arc::default()).await?;
    let took = started.elapsed();
    ensure!(status == 200, "the slow upload got {status}");
    ensure!(took > Duration::from_secs(2), "the upload was meant to outlast the response timeout: {took:?}");
    let bodies: Vec<usize> = backend.requests().iter().map(|r| r.body.len()).collect();
    ensure!(bodies == [len], "the server got bodies {bodies:?}");
    let (state, broken, timeouts) = server_health(&keel).await?;
    ensure!(state == "up" && broken == 0 && timeouts == 0, "server {state} broken {broken} timeouts {timeouts}");
    eprintln!("a {len}-byte upload at 8 KiB/s took {took:?} with a 1 s response timeout: 200");
    Ok(())
}

// On f88c390 every request body streamed to the server as it arrived: each slow upload had a
// server connection (and a server worker) from its first byte.
#[tokio::test]
async fn slow_uploads_below_request_buffer_hold_no_server_connection() -> Result<()> {
    let (backend, keel) = keel_with("body_timeout = \"2s\"\nmin_body_rate = 512\nrequest_buffer = 8192", |p| p).await?;
    let addr = keel.proxy_addr();
    let sent = Arc::new(AtomicUsize::new(0));
    let n = 5;
    let len = 4000;
    // 500 bytes every 200 ms: 2.5 KiB/s, 1.6 s per upload; plus one chunked upload.
    let mut uploads = Vec::new();
    for _ in 0..n {
        uploads.push(tokio::spawn(trickle(addr, len, len, 500, Duration::from_millis(200), sent.clone())));
    }
    let chunked = tokio::spawn(chunked_trickle(addr, 8, 500, Duration::from_millis(200)));
    wait_until(UPLOADS, "every upload to be half sent", || {
        let sent = sent.clone();
        async move { sent.load(Ordering::SeqCst) >= n * len / 2 }
    })
    .await?;
    ensure!(
        backend.accepted() == 0,
        "{} server connection(s) opened while {n} uploads were still arriving",
        backend.accepted()
    );
    for u in uploads {
        let status = u.await??;
        ensure!(status == 200, "an upload got {status}");
    }
    let status = chunked.await??;
    ensure!(status == 200, "the chunked upload got {status}");
    let mut bodies: Vec<usize> = backend.requests().iter().map(|r| r.body.len()).collect();
    bodies.sort_unstable();
    ensure!(bodies == [len, len, len, len, len, len], "the server got bodies {bodies:?}");
    eprintln!("{} uploads buffered; the server accepted {} connection(s) after they ended", n + 1, backend.accepted());
    Ok(())
}

/// A chunked `POST` of `chunks` chunks of `size` bytes, one every `every`; the transcript.
async fn chunked_trickle(addr: SocketAddr, chunks: usize, size: usize, every: Duration) -> Result<u16> {
    let mut c = RawConn::connect(addr).await?;
    c.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").await?;
    for _ in 0..chunks {
        c.write(format!("{size:x}\r\n{}\r\n", "c".repeat(size)).as_bytes()).await?;
        tokio::time::sleep(every).await;
    }
    c.write(b"0\r\n\r\n").await?;
    answer(&mut c, UPLOADS).await
}

/// What a [`Flaky`] server does with the requests it reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flakiness {
    /// Every other request (counted across all servers sharing the counter) is reset.
    ResetEvenAttempts,
    /// Every request is reset after `hold`.
    ResetAll { hold: Duration },
}

/// A server that reads one whole request per connection, then answers `200 ok` (with
/// `Connection: close`) or resets the connection, as its [`Flakiness`] says. `attempts`
/// (shared between servers) counts the requests read.
struct Flaky {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Flaky {
    async fn start(how: Flakiness, attempts: Arc<AtomicU64>) -> Result<Flaky> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let attempts = attempts.clone();
                tokio::spawn(async move {
                    let _ = serve_flaky(stream, how, &attempts).await;
                });
            }
        });
        Ok(Flaky { addr, task })
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_flaky(mut stream: TcpStream, how: Flakiness, attempts: &AtomicU64) -> Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::time::timeout(REQUEST, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse())
        .transpose()?
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(REQUEST, stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let n = attempts.fetch_add(1, Ordering::SeqCst);
    let reset = match how {
        Flakiness::ResetEvenAttempts => n.is_multiple_of(2),
        Flakiness::ResetAll { hold } => {
            tokio::time::sleep(hold).await;
            true
        }
    };
    if reset {
        // RST, not FIN: the connection dies before any response byte.
        stream.set_zero_linger()?;
        drop(stream);
        return Ok(());
    }
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await?;
    stream.shutdown().await?;
    Ok(())
}

/// Sends `method /path` with a body of `len` bytes on a fresh connection; the status (0 when
/// keel closed without answering).
async fn request(addr: SocketAddr, method: &str, path: &str, len: usize) -> Result<u16> {
    let mut c = RawConn::connect(addr).await?;
    let mut bytes = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    bytes.resize(bytes.len() + len, b'p');
    c.write(&bytes).await?;
    answer(&mut c, HOSTILE).await
}

// On f88c390 only a connect failure was ever retried, and only without a body: every reset
// reached the client as a 502.
#[tokio::test]
async fn buffered_posts_survive_servers_that_reset_half_their_connections() -> Result<()> {
    let attempts = Arc::new(AtomicU64::new(0));
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Flaky::start(Flakiness::ResetEvenAttempts, attempts.clone()).await?);
    }
    // Two pools over the same servers: `vouched` lets POSTs be replayed, `strict` keeps RFC
    // 9110's rule (only idempotent methods after the server may have seen the request).
    let pool = |name: &str, retry_on: &str| {
        let mut p = PoolSpec::new(name, "round_robin").set("retries = 2").set(retry_on).no_outlier();
        for (i, s) in servers.iter().enumerate() {
            p = p.server(&format!("s{i}"), s.addr, None);
        }
        p
    };
    let keel = Keel::builder()
        .default_pool("vouched")
        .route("path_prefix = \"/strict\"\npool = \"strict\"")
        .pool(pool("vouched", "retry_on = [\"connect-failure\", \"empty-response\", \"non-idempotent\"]"))
        .pool(pool("strict", "retry_on = [\"connect-failure\", \"empty-response\"]"))
        .raw("[listeners.web.limits]\nrequest_buffer = 4096")
        .start()
        .await?;
    let addr = keel.proxy_addr();

    // Sequential, so the shared counter makes every first attempt a reset and every retry a
    // success.
    let n = 20;
    for i in 0..n {
        let status = request(addr, "POST", "/orders", 1000).await?;
        ensure!(status == 200, "POST {i} under the buffer size got {status}");
    }
    ensure!(attempts.load(Ordering::SeqCst) == 2 * n, "attempts at the servers: {attempts:?}, expected {}", 2 * n);
    let retries = keel.metric("keel_retries_total", &["pool=\"vouched\""], None).await?;
    ensure!(retries == Some(n as f64), "keel_retries_total for {n} retried POSTs: {retries:?}");

    // The strict pool: a PUT is retried, a POST is not (the server may have applied it).
    ensure!(request(addr, "PUT", "/strict/x", 100).await? == 200, "an idempotent PUT is retried");
    ensure!(attempts.load(Ordering::SeqCst) == 2 * n + 2);
    ensure!(request(addr, "POST", "/strict/x", 100).await? == 502, "a POST without non-idempotent is not replayed");
    ensure!(attempts.load(Ordering::SeqCst) == 2 * n + 3, "the POST was sent once: {attempts:?}");

    // A body above request_buffer streams: it cannot be replayed, whatever retry_on says.
    ensure!(request(addr, "GET", "/", 0).await? == 200, "the next attempt succeeds");
    ensure!(request(addr, "POST", "/big", 10_000).await? == 502, "a streamed body is never replayed");
    ensure!(attempts.load(Ordering::SeqCst) == 2 * n + 5, "the streamed POST was sent once: {attempts:?}");
    let status = keel.status_json().await?;
    let vouched = status["pools"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "vouched")).cloned();
    ensure!(vouched.is_some_and(|p| p["retries"] == serde_json::json!(n)), "/status retries: {status}");
    Ok(())
}

// On f88c390 there was no retry budget (and no empty-response retry): the budget's bound on
// attempts could not be asserted, and its metrics did not exist.
#[tokio::test]
async fn retries_stay_within_the_budget_when_every_server_fails() -> Result<()> {
    let attempts = Arc::new(AtomicU64::new(0));
    let hold = Duration::from_millis(300);
    let mut servers = Vec::new();
    for _ in 0..4 {
        servers.push(Flaky::start(Flakiness::ResetAll { hold }, attempts.clone()).await?);
    }
    let mut pool = PoolSpec::new("app", "round_robin")
        .set("retries = 3")
        .set("retry_on = [\"connect-failure\", \"empty-response\"]")
        .set("retry_budget = \"20%\"")
        .no_outlier();
    for (i, s) in servers.iter().enumerate() {
        pool = pool.server(&format!("s{i}"), s.addr, None);
    }
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    let addr = keel.proxy_addr();

    let clients = 20u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        tasks.push(tokio::spawn(request(addr, "GET", "/", 0)));
    }
    for t in tasks {
        let status = t.await??;
        ensure!(status == 502, "every server fails, so every client gets 502: got {status}");
    }
    let took = started.elapsed();
    let seen = attempts.load(Ordering::SeqCst);
    let retries = keel.metric("keel_retries_total", &["pool=\"app\""], None).await?.unwrap_or(-1.0);
    let refused = keel.metric("keel_retry_budget_exhausted_total", &["pool=\"app\""], None).await?.unwrap_or(-1.0);
    eprintln!(
        "{clients} clients, 4 failing servers, retries = 3: {seen} attempts (without a budget: {}), \
         {retries} retries, {refused} refused by the budget, {took:?}",
        clients * 4
    );
    // At most max(3, 20% of 20) = 4 retries in flight, each held 300 ms by the server, over
    // the ~1.2 s a client can spend retrying: far below the 60 extra attempts of no budget.
    ensure!(seen > clients, "no retry was made at all: {seen} attempts");
    ensure!(seen <= clients + clients, "the budget let {seen} attempts through for {clients} clients");
    ensure!(retries == (seen - clients) as f64, "keel_retries_total {retries} for {seen} attempts");
    ensure!(refused >= 1.0, "the budget refused nothing: {refused}");
    Ok(())
}

// On f88c390 there was no total timeout: a request waited the whole response timeout (here
// 10 s) for a server that takes 3 s.
#[tokio::test]
async fn total_timeout_bounds_the_exchange_and_blames_no_server() -> Result<()> {
    let app = keel_tests::Backend::start("app")?;
    let pool = PoolSpec::new("app", "round_robin")
        .backends([&app])
        .set("response_timeout = \"10s\"")
        .set("total_timeout = \"700ms\"")
        .outlier(1, "30s");
    let keel = Keel::builder().default_pool("app").pool(pool).start().await?;
    let started = Instant::now();
    let r = get_fresh(keel.proxy_addr(), "/slow?ms=3000").await?;
    let took = started.elapsed();
    ensure!(r.status == 504, "a 3 s server under a 700 ms total_timeout: {} {:?}", r.status, r.text());
    ensure!(took < Duration::from_millis(2500), "answered after {took:?}");
    let s = keel.server_status("app", "app").await?;
    ensure!(s["state"] == "up" && s["timeouts"] == 0, "the total timeout was blamed on the server: {s}");
    Ok(())
}
