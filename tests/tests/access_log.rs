//! Access logs and request ids: one line per HTTP request (HTTP/1, h2c, TLS) and per TCP
//! session, checked field by field through the `json` format; the termination cause, side and
//! timings of a server slower than `response_timeout`, of a refused connect and of a connect
//! that times out; a `template` line; syslog messages over UDP and a unix datagram socket,
//! their RFC 5424 header parsed field by field, and a receiver that is gone costing dropped
//! lines (counted, warned about once) rather than requests; a file reopened on SIGUSR1 after logrotate
//! renamed it; and request ids generated, passed through, returned, or turned off.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
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
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

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

/// Every timing is a number of ms (or null) and the parts fit in the total.
fn check_timings(e: &Value) -> Result<()> {
    let ms = |k: &str| e[k].as_f64();
    for key in ["wait_ms", "connect_ms", "server_ms"] {
        ensure!(e[key].is_null() || ms(key).is_some_and(|v| v >= 0.0), "{key}: {e}");
    }
    let total = ms("total_ms").with_context(|| format!("total_ms: {e}"))?;
    let parts: f64 = ["wait_ms", "connect_ms", "server_ms"].iter().filter_map(|k| ms(k)).sum();
    // Each part is rounded to the µs on its own.
    ensure!(parts <= total + 0.01, "wait + connect + server > total: {e}");
    Ok(())
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
    ensure!(e["termination"].is_null() && e["closed_by"].is_null(), "termination: {e}");
    ensure!(e["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "client: {e}");
    check_timings(e)?;
    ensure!(e["server_ms"].is_number(), "a server answered: {e}");
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
    ensure!(e["termination"].is_null() && e["retries"] == 0, "termination, retries: {e}");
    ensure!(e["total_ms"].as_f64().is_some(), "total_ms: {e}");
    ensure!(e["wait_ms"].is_number() && e["connect_ms"].is_number() && e["server_ms"].is_null(), "timings: {e}");
    check_timings(&e)?;
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
    ensure!(e["status"] == 504, "status: {e}");
    ensure!(e["termination"] == "server_timeout", "termination: {e}");
    ensure!(e["closed_by"] == "server", "closed_by: {e}");
    ensure!(e["server"] == "app" && e["pool"] == "app", "the server that timed out: {e}");
    ensure!(e["retries"] == 0, "retries: {e}");
    ensure!(e["method"] == "GET" && e["path"] == "/slow?ms=3000", "request: {e}");
    ensure!(e["bytes_in"] == 0 && e["bytes_out"] == r.body.len() as u64, "bytes: {e}");
    check_timings(e)?;
    ensure!(e["wait_ms"].is_number() && e["connect_ms"].is_number(), "a connection was made: {e}");
    ensure!(e["server_ms"].is_null(), "no server answered: {e}");
    let total = e["total_ms"].as_f64().unwrap_or_default();
    ensure!((200.0..3000.0).contains(&total), "total_ms {total}: the 200 ms timeout, not the server's 3 s");
    Ok(())
}

#[tokio::test]
async fn a_refused_connect_is_server_refused() -> Result<()> {
    let dir = TempDir::new("keel-access-log-refused")?;
    let log = dir.path().join("access.log");
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("gone", closed, None))
        .listener_line(&log_line(&log, "json"))
        .start()
        .await?;
    let r = Client::new().get(keel.proxy_addr(), "/").await?;
    ensure!(r.status == 503, "refused server: {}", r.status);
    let e = &entries(&log, 1).await?[0];
    ensure!(e["termination"] == "server_refused" && e["closed_by"] == "server", "termination: {e}");
    ensure!(e["server"] == "gone" && e["status"] == 503, "server/status: {e}");
    ensure!(e["wait_ms"].is_number() && e["connect_ms"].is_null() && e["server_ms"].is_null(), "timings: {e}");
    Ok(())
}

/// Connections that fill a backlog-0 accept queue, at most (the kernel holds backlog + 1).
const FILL: usize = 16;

/// A listener whose accept queue is full: the kernel drops further SYNs, so a connect to it
/// hangs until the connecting side gives up. Returns the listener (never accepting) and the
/// connections that filled it; both must stay open.
async fn full_listener() -> Result<(tokio::net::TcpListener, SocketAddr, Vec<TcpStream>)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let addr = socket.local_addr()?;
    let listener = socket.listen(0)?;
    let mut held = Vec::new();
    for _ in 0..FILL {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            // A connect that hangs: the queue is full.
            _ => return Ok((listener, addr, held)),
        }
    }
    anyhow::bail!("{FILL} connections did not fill a backlog-0 accept queue")
}

#[tokio::test]
async fn a_connect_timeout_is_server_connect_timeout() -> Result<()> {
    let dir = TempDir::new("keel-access-log-connect")?;
    let log = dir.path().join("access.log");
    let (_listener, addr, _held) = full_listener().await?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").server("stuck", addr, None).set("connect_timeout = \"300ms\""))
        .listener_line(&log_line(&log, "json"))
        .start()
        .await?;
    let r = Client::new().get(keel.proxy_addr(), "/").await?;
    ensure!(r.status == 503, "unreachable server: {}", r.status);
    let e = &entries(&log, 1).await?[0];
    ensure!(e["termination"] == "server_connect_timeout", "termination: {e}");
    ensure!(e["closed_by"] == "server" && e["server"] == "stuck" && e["retries"] == 0, "side/server: {e}");
    ensure!(e["connect_ms"].is_null() && e["server_ms"].is_null(), "no connection: {e}");
    let total = e["total_ms"].as_f64().unwrap_or_default();
    ensure!((300.0..3000.0).contains(&total), "total_ms {total}: the 300 ms connect timeout");
    Ok(())
}

#[tokio::test]
async fn a_template_line_has_the_named_fields() -> Result<()> {
    let dir = TempDir::new("keel-access-log-template")?;
    let log = dir.path().join("access.log");
    let backend = Backend::start("app")?;
    let template = "$client \\\"$method $path\\\" $status $bytes_out ${total_ms}ms $server $closed_by $request_id $$";
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([&backend]))
        .listener_line(&format!(
            "access_log = {{ destination = \"{}\", format = \"template\", template = \"{template}\" }}",
            log.display()
        ))
        .start()
        .await?;
    let r = Client::new().get(keel.proxy_addr(), "/t?q=1").await?;
    ensure!(r.status == 200, "GET: {}", r.status);
    let line = lines(&log, 1).await?.remove(0);
    let (client, rest) = line.split_once(' ').context("client")?;
    ensure!(client.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_loopback()), "client: {line}");
    let rest = rest.strip_prefix("\"GET /t?q=1\" ").with_context(|| format!("request: {line}"))?;
    let fields: Vec<&str> = rest.split(' ').collect();
    ensure!(fields.len() == 7, "fields: {line}");
    ensure!(fields[0] == "200" && fields[1] == "3", "status, bytes_out: {line}");
    let total = fields[2].strip_suffix("ms").and_then(|t| t.parse::<f64>().ok());
    ensure!(total.is_some_and(|t| t >= 0.0), "total_ms: {line}");
    ensure!(fields[3] == "app" && fields[4] == "-", "server, closed_by: {line}");
    ensure!(Some(fields[5]) == r.header("x-request-id") && fields[6] == "$", "request id, $$: {line}");
    Ok(())
}

/// An RFC 5424 message's header fields and its MSG.
struct Syslog5424 {
    pri: u32,
    version: String,
    timestamp: String,
    hostname: String,
    app_name: String,
    procid: String,
    msgid: String,
    structured_data: String,
    msg: String,
}

/// Parses `<PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD SP MSG`.
fn parse_5424(datagram: &[u8]) -> Result<Syslog5424> {
    let text = std::str::from_utf8(datagram)?;
    let rest = text.strip_prefix('<').context("no <PRI>")?;
    let (pri, rest) = rest.split_once('>').context("no <PRI>")?;
    let mut parts = rest.splitn(8, ' ');
    let mut next = |what: &str| parts.next().map(str::to_owned).with_context(|| format!("no {what}: {text}"));
    Ok(Syslog5424 {
        pri: pri.parse()?,
        version: next("VERSION")?,
        timestamp: next("TIMESTAMP")?,
        hostname: next("HOSTNAME")?,
        app_name: next("APP-NAME")?,
        procid: next("PROCID")?,
        msgid: next("MSGID")?,
        structured_data: next("STRUCTURED-DATA")?,
        msg: next("MSG")?,
    })
}

/// The header keel writes: `pri`, version 1, a UTC timestamp, this host, `keel`, its pid,
/// `access`, no structured data; and a JSON MSG for `path`.
fn check_5424(m: &Syslog5424, pri: u32, pid: u32, path: &str) -> Result<()> {
    ensure!(m.pri == pri, "PRI {} (want {pri})", m.pri);
    ensure!(m.version == "1", "VERSION {}", m.version);
    ensure!(
        m.timestamp.len() == 24 && m.timestamp.ends_with('Z') && m.timestamp.as_bytes()[10] == b'T',
        "TIMESTAMP {}",
        m.timestamp
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    ensure!(m.hostname == host.trim(), "HOSTNAME {} (want {})", m.hostname, host.trim());
    ensure!(m.app_name == "keel", "APP-NAME {}", m.app_name);
    ensure!(m.procid == pid.to_string(), "PROCID {} (keel is {pid})", m.procid);
    ensure!(m.msgid == "access" && m.structured_data == "-", "MSGID {}, SD {}", m.msgid, m.structured_data);
    let e: Value = serde_json::from_str(&m.msg).with_context(|| format!("MSG is not a JSON line: {:?}", m.msg))?;
    ensure!(e["path"] == path && e["status"] == 200, "MSG: {e}");
    ensure!(!m.msg.ends_with('\n'), "MSG keeps the line's newline");
    Ok(())
}

fn syslog_keel(backend: &Backend, destination: &str, facility: Option<&str>) -> KeelBuilder {
    let facility = facility.map(|f| format!(", facility = \"{f}\"")).unwrap_or_default();
    Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([backend]))
        .listener_line(&format!("access_log = {{ destination = \"{destination}\", format = \"json\"{facility} }}"))
}

#[tokio::test]
async fn syslog_over_udp_is_rfc_5424() -> Result<()> {
    let receiver = UdpSocket::bind("127.0.0.1:0").await?;
    let backend = Backend::start("app")?;
    let keel = syslog_keel(&backend, &format!("udp://{}", receiver.local_addr()?), Some("local3")).start().await?;
    let r = Client::new().get(keel.proxy_addr(), "/udp").await?;
    ensure!(r.status == 200, "GET: {}", r.status);
    let mut buf = vec![0u8; 65_536];
    let n = tokio::time::timeout(LINE, receiver.recv(&mut buf)).await.context("no syslog datagram")??;
    // local3 = 19; informational = 6.
    check_5424(&parse_5424(&buf[..n])?, 19 * 8 + 6, keel.pid(), "/udp")
}

#[tokio::test]
async fn syslog_over_a_unix_socket_is_rfc_5424() -> Result<()> {
    let dir = TempDir::new("keel-access-log-unix")?;
    let path = dir.path().join("log.sock");
    let receiver = UnixDatagram::bind(&path)?;
    receiver.set_read_timeout(Some(LINE))?;
    let backend = Backend::start("app")?;
    let keel = syslog_keel(&backend, &format!("unix:{}", path.display()), None).start().await?;
    let r = Client::new().get(keel.proxy_addr(), "/unix").await?;
    ensure!(r.status == 200, "GET: {}", r.status);
    let datagram = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 65_536];
        receiver.recv(&mut buf).map(|n| buf[..n].to_vec())
    })
    .await?
    .context("no syslog datagram")?;
    // local0 (the default) = 16; informational = 6.
    check_5424(&parse_5424(&datagram)?, 16 * 8 + 6, keel.pid(), "/unix")?;
    ensure!(keel.metric("keel_access_log_dropped_total", &[], None).await? == Some(0.0), "dropped lines");
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

#[tokio::test]
async fn a_syslog_receiver_that_is_gone_costs_dropped_lines_not_requests() -> Result<()> {
    // A UDP port nothing listens on: the kernel answers ICMP port unreachable, and the next
    // send on keel's connected socket fails with "connection refused".
    let gone = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let backend = Backend::start("app")?;
    let keel = syslog_keel(&backend, &format!("udp://{gone}"), None).start().await?;
    let addr = keel.proxy_addr();
    wait_for(LINE, "a dropped access log line", || async {
        let r = Client::new().get(addr, "/").await.ok()?;
        (r.status == 200).then_some(())?;
        let dropped = keel.metric("keel_access_log_dropped_total", &[], None).await.ok()??;
        (dropped >= 1.0).then_some(())
    })
    .await?;
    let log = wait_for(LINE, "the throttled warning", || async {
        let log = keel.log();
        log.contains("syslog did not take an access log line").then_some(log)
    })
    .await?;
    ensure!(log.matches("syslog did not take an access log line").count() == 1, "one warning per 10 s:\n{log}");
    Ok(())
}
