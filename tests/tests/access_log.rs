//! Access logs and request ids: one line per HTTP request (HTTP/1, h2c, TLS) and per TCP
//! session, checked field by field through the `json` format; the termination cause of a server
//! slower than `response_timeout`; a file reopened on SIGUSR1 after logrotate renamed it; and
//! request ids generated, passed through, returned, or turned off.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use keel_tests::client::{empty, get};
use keel_tests::raw::{TcpMode, TcpServer};
use keel_tests::tempdir::TempDir;
use keel_tests::tls::{https_get, TestCa, TlsClient};
use keel_tests::{wait_for, Backend, Client, Keel, KeelBuilder, PoolSpec};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time for a line to reach its file: the writer flushes whenever its queue is empty.
const LINE: Duration = Duration::from_secs(5);

/// Time for a SIGUSR1 to reach the writer and a new line to land in the new file.
const REOPEN: Duration = Duration::from_secs(10);

/// A listener line turning on the access log to `path` in `format`.
fn log_line(path: &Path, format: &str) -> String {
    format!("access_log = {{ destination = \"{}\", format = \"{format}\" }}", path.display())
}

fn http_keel(backend: &Backend, log: &Path) -> KeelBuilder {
    Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([backend]))
        .listener_line(&log_line(log, "json"))
}

/// The file's lines, once it has at least `n`.
async fn lines(path: &Path, n: usize) -> Result<Vec<String>> {
    wait_for(LINE, &format!("{n} access log line(s) in {}", path.display()), || async {
        let text = std::fs::read_to_string(path).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}

/// The file's lines as JSON objects, once it has at least `n`.
async fn entries(path: &Path, n: usize) -> Result<Vec<Value>> {
    lines(path, n).await?.iter().map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))).collect()
}

fn is_request_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The fields every served HTTP line has, whatever the protocol.
fn check_served(e: &Value, version: &str, path: &str, backend: &Backend) -> Result<()> {
    ensure!(e["version"] == version, "version: {e}");
    ensure!(e["method"] == "GET" || e["method"] == "POST", "method: {e}");
    ensure!(e["path"] == path, "path: {e}");
    ensure!(e["status"] == 200, "status: {e}");
    ensure!(e["listener"] == "web", "listener: {e}");
    ensure!(e["pool"] == "app", "pool: {e}");
    ensure!(e["server"] == backend.name(), "server: {e}");
    ensure!(e["retries"] == 0, "retries: {e}");
    ensure!(e["termination"].is_null(), "termination: {e}");
    ensure!(e["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "client: {e}");
    let (server, total) = (e["server_ms"].as_f64(), e["total_ms"].as_f64());
    ensure!(server.zip(total).is_some_and(|(s, t)| s >= 0.0 && t >= s), "timings: {e}");
    ensure!(e["time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "time: {e}");
    ensure!(is_request_id(&e["request_id"]), "request_id: {e}");
    Ok(())
}

#[tokio::test]
async fn http1_and_h2c_requests_each_leave_one_line() -> Result<()> {
    let dir = TempDir::new("keel-access-log")?;
    let log = dir.path().join("access.log");
    let backend = Backend::start("app")?;
    let keel = http_keel(&backend, &log).start().await?;
    let addr = keel.proxy_addr();

    let r = Client::new().get(addr, "/headers?x=1").await?;
    ensure!(r.status == 200, "GET: {}", r.status);
    let e = &entries(&log, 1).await?[0];
    check_served(e, "HTTP/1.1", "/headers?x=1", &backend)?;
    ensure!(e["authority"] == addr.to_string(), "authority: {e}");
    ensure!(
        e["bytes_out"] == r.body.len() as u64,
        "bytes_out {} for a {}-byte body: {e}",
        e["bytes_out"],
        r.body.len()
    );
    ensure!(e["bytes_in"] == 0, "bytes_in: {e}");
    // The id in the line is the one the server got and the client was given.
    let id = e["request_id"].as_str().unwrap_or_default();
    ensure!(r.header("x-request-id") == Some(id), "response id {:?}, logged {id}", r.header("x-request-id"));
    ensure!(r.json()?["headers"]["x-request-id"] == serde_json::json!([id]), "server's headers: {}", r.text());

    let r = Client::new().post(addr, "/upload", "hello").await?;
    ensure!(r.status == 200, "POST: {}", r.status);
    let e = &entries(&log, 2).await?[1];
    check_served(e, "HTTP/1.1", "/upload", &backend)?;
    ensure!(e["method"] == "POST" && e["bytes_in"] == 5, "POST of 5 bytes: {e}");
    ensure!(e["bytes_out"] == 3, "the body 'app': {e}");

    let r = Client::h2c().get(addr, "/").await?;
    ensure!(r.status == 200 && r.version == http::Version::HTTP_2, "h2c: {} {:?}", r.status, r.version);
    let e = &entries(&log, 3).await?[2];
    check_served(e, "HTTP/2", "/", &backend)?;
    ensure!(e["bytes_out"] == 3, "h2c bytes_out: {e}");
    Ok(())
}

#[tokio::test]
async fn a_tls_request_leaves_a_line() -> Result<()> {
    let dir = TempDir::new("keel-access-log-tls")?;
    let log = dir.path().join("access.log");
    let ca = TestCa::new()?;
    let (cert, key) = ca.leaf(&["a.test"])?.write(&dir, "a")?;
    let backend = Backend::start("app")?;
    let keel = http_keel(&backend, &log)
        .protocol("https")
        .raw(&format!(
            "[listeners.web.tls]\n[[listeners.web.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display()
        ))
        .start()
        .await?;
    let client = TlsClient::verified(&ca)?.alpn(&[b"http/1.1"]);
    let r = https_get(&client, keel.proxy_addr(), "a.test", "/tls").await?;
    ensure!(r.status == 200, "GET over TLS: {}", r.status);
    let e = &entries(&log, 1).await?[0];
    check_served(e, "HTTP/1.1", "/tls", &backend)?;
    ensure!(e["bytes_out"] == 3, "bytes_out: {e}");
    Ok(())
}

#[tokio::test]
async fn a_tcp_session_leaves_a_line_with_its_bytes() -> Result<()> {
    let dir = TempDir::new("keel-access-log-tcp")?;
    let log = dir.path().join("access.log");
    let echo = TcpServer::start("echo1", TcpMode::Echo)?;
    let keel = Keel::builder()
        .protocol("tcp")
        .default_pool("echo")
        .pool(PoolSpec::new("echo", "round_robin").server(echo.name(), echo.addr(), None))
        .listener_line(&log_line(&log, "json"))
        .start()
        .await?;
    let back = tokio::time::timeout(LINE, async {
        let mut s = TcpStream::connect(keel.proxy_addr()).await?;
        s.write_all(b"hello, keel").await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok::<_, anyhow::Error>(back)
    })
    .await
    .context("echo timed out")??;
    ensure!(back == b"hello, keel", "echo: {back:?}");
    // The harness's readiness probe connects and closes first: a session of its own.
    let e = wait_for(LINE, "the echo session's line", || async {
        let all = entries(&log, 1).await.ok()?;
        all.into_iter().find(|e| e["bytes_in"] != 0)
    })
    .await?;
    ensure!(e["version"] == "TCP" && e["method"] == "" && e["status"].is_null(), "a TCP line: {e}");
    ensure!(e["pool"] == "echo" && e["server"] == "echo1", "pool/server: {e}");
    ensure!(e["bytes_in"] == 11 && e["bytes_out"] == 11, "bytes: {e}");
    ensure!(e["termination"].is_null(), "termination: {e}");
    ensure!(e["total_ms"].as_f64().is_some(), "total_ms: {e}");
    Ok(())
}

#[tokio::test]
async fn a_server_slower_than_response_timeout_is_a_server_timeout() -> Result<()> {
    let dir = TempDir::new("keel-access-log-timeout")?;
    let log = dir.path().join("access.log");
    let backend = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&backend]).set("response_timeout = \"200ms\""))
        .listener_line(&log_line(&log, "json"))
        .start()
        .await?;
    let r = Client::new().get(keel.proxy_addr(), "/slow?ms=3000").await?;
    ensure!(r.status == 504, "slow server: {}", r.status);
    let e = &entries(&log, 1).await?[0];
    ensure!(e["status"] == 504 && e["termination"] == "server_timeout", "termination: {e}");
    ensure!(e["server"] == "app" && e["pool"] == "app", "the server that timed out: {e}");
    ensure!(e["server_ms"].is_null(), "no server answered: {e}");
    Ok(())
}

#[tokio::test]
async fn request_ids_pass_through_and_can_be_turned_off() -> Result<()> {
    let dir = TempDir::new("keel-access-log-ids")?;
    let log = dir.path().join("access.log");
    let backend = Backend::start("app")?;
    let keel = http_keel(&backend, &log).start().await?;
    let req = empty(get(keel.proxy_addr(), "/headers").header("x-request-id", "client-chose-this"))?;
    let r = Client::new().send(req).await?;
    ensure!(r.header("x-request-id") == Some("client-chose-this"), "returned: {:?}", r.header("x-request-id"));
    ensure!(
        r.json()?["headers"]["x-request-id"] == serde_json::json!(["client-chose-this"]),
        "at the server: {}",
        r.text()
    );
    let e = &entries(&log, 1).await?[0];
    ensure!(e["request_id"] == "client-chose-this", "logged: {e}");

    let off = dir.path().join("off.log");
    let keel = http_keel(&backend, &off).listener_line("request_id_header = \"\"").start().await?;
    let r = Client::new().get(keel.proxy_addr(), "/headers").await?;
    ensure!(r.header("x-request-id").is_none(), "ids off, yet returned {:?}", r.header("x-request-id"));
    ensure!(r.json()?["headers"].get("x-request-id").is_none(), "ids off, yet the server got one: {}", r.text());
    let e = &entries(&off, 1).await?[0];
    ensure!(e["request_id"].is_null(), "ids off, yet logged: {e}");
    Ok(())
}

#[tokio::test]
async fn the_file_is_reopened_on_sigusr1_after_a_rename() -> Result<()> {
    let dir = TempDir::new("keel-access-log-rotate")?;
    let log = dir.path().join("access.log");
    let rotated: PathBuf = dir.path().join("access.log.1");
    let backend = Backend::start("app")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&backend]))
        .listener_line(&log_line(&log, "human"))
        .start()
        .await?;
    let addr = keel.proxy_addr();
    Client::new().get(addr, "/before").await?;
    let before = lines(&log, 1).await?;
    // client [time] listener pool/server server_ms/total_ms status in/out termination retries
    // authority id "request"
    let line = &before[0];
    ensure!(line.starts_with("127.0.0.1:") && line.ends_with("\"GET /before HTTP/1.1\""), "human line: {line}");
    ensure!(line.contains(" web app/app ") && line.contains(" 200 0/3 - 0 "), "human line fields: {line}");

    std::fs::rename(&log, &rotated)?;
    keel.sigusr1()?;
    // Until the writer has seen the signal, lines still go to the renamed file; keep asking.
    let after = wait_for(REOPEN, "a line in the reopened file", || async {
        Client::new().get(addr, "/after").await.ok()?;
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("/after").then_some(text)
    })
    .await?;
    ensure!(after.lines().all(|l| l.contains("\"GET /after HTTP/1.1\"")), "new file: {after}");
    let old = std::fs::read_to_string(&rotated)?;
    ensure!(old.contains("/before"), "the rotated file keeps its lines: {old}");
    let dropped = keel.metric("keel_access_log_dropped_total", &[], None).await?;
    ensure!(dropped == Some(0.0), "dropped lines: {dropped:?}");
    Ok(())
}

#[tokio::test]
async fn a_client_leaving_mid_response_is_client_gone() -> Result<()> {
    let dir = TempDir::new("keel-access-log-gone")?;
    let log = dir.path().join("access.log");
    let backend = Backend::start("app")?;
    let keel = http_keel(&backend, &log).start().await?;
    tokio::time::timeout(LINE, async {
        let mut s = TcpStream::connect(keel.proxy_addr()).await?;
        s.write_all(b"GET /drip?chunks=200&ms=10 HTTP/1.1\r\nHost: drip.test\r\n\r\n").await?;
        // The head and the first chunk, then away before the other 199.
        let mut first = [0u8; 64];
        let n = s.read(&mut first).await?;
        ensure!(n > 0, "no response head");
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("first bytes timed out")??;
    let e = &entries(&log, 1).await?[0];
    ensure!(e["status"] == 200 && e["termination"] == "client_gone", "termination: {e}");
    ensure!(e["authority"] == "drip.test" && e["path"] == "/drip?chunks=200&ms=10", "request: {e}");
    ensure!(e["bytes_out"].as_u64().is_some_and(|b| b < 200 * 8), "bytes_out: {e}");
    Ok(())
}
