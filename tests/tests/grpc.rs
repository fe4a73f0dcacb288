//! gRPC end to end through keel (issue #18): real gRPC servers and a real gRPC client (tonic
//! 0.14, raw-bytes messages) with a real `keel` between them, over h2c and over TLS on both
//! sides (front end ALPN h2, pool `protocol = "h2"`).
//!
//! Covered: the four call kinds (unary, server-, client- and bidirectional streaming, the last
//! as a ping-pong that would deadlock if keel held the request stream back), statuses and
//! messages in trailers, `te: trailers` reaching the server, each call balanced on its own
//! over one client connection, `source_ip` stickiness, a client's cancel reaching the server,
//! a server's RST_STREAM reaching the client with the server's reason, a server killed
//! mid-stream failing only its own calls and leaving rotation (gRPC health check),
//! `grpc-timeout` beating a longer `response_timeout`, a gRPC call over HTTP/1.1 refused with
//! 415, the access log's `grpc_status`, plain HTTP over an h2c pool, a server's burst of small
//! DATA frames passed on whole, and `keel config check` naming a bad `protocol`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use keel_tests::grpc::{next_text, GrpcClient, GrpcServer};
use keel_tests::keel::run_keel;
use keel_tests::tempdir::TempDir;
use keel_tests::tls::TestCa;
use keel_tests::wait::{HEALTH_CHANGE, REQUEST};
use keel_tests::{tally, wait_for, wait_until, Keel, KeelBuilder, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time for a cancel or a reset to cross keel and show at the other end.
const PROPAGATE: Duration = Duration::from_secs(5);

/// A gRPC pool of `servers`, with gRPC health checks every 100 ms (fall 1, rise 2).
fn grpc_pool(protocol: &str, servers: &[&GrpcServer]) -> PoolSpec {
    let mut pool = PoolSpec::new("grpc", "round_robin").set(&format!("protocol = \"{protocol}\"")).health(&[
        "type = \"grpc\"",
        "interval = \"100ms\"",
        "timeout = \"100ms\"",
        "rise = 2",
        "fall = 1",
    ]);
    for s in servers {
        pool = pool.server(s.name(), s.addr(), None);
    }
    pool
}

fn h2c_keel(servers: &[&GrpcServer]) -> KeelBuilder {
    Keel::builder().default_pool("grpc").pool(grpc_pool("h2c", servers))
}

/// Sends the four kinds of call and checks each answer; returns the servers that answered the
/// unary calls.
async fn four_kinds(client: &mut GrpcClient) -> Result<Vec<String>> {
    let mut answered = Vec::new();
    for i in 0..6 {
        let r = client.unary(&format!("hello{i}")).await?.map_err(|s| anyhow::anyhow!("unary failed: {s:?}"))?;
        let (server, said) = r.split_once(':').context("NAME:TEXT")?;
        ensure!(said == format!("hello{i}"), "unary answer {r:?}");
        answered.push(server.to_owned());
    }

    let mut stream = client.count("5").await?.map_err(|s| anyhow::anyhow!("Count failed: {s:?}"))?;
    let mut got = Vec::new();
    while let Some(m) = next_text(&mut stream).await.map_err(|s| anyhow::anyhow!("Count stream: {s:?}"))? {
        got.push(m.split_once(':').map(|(_, i)| i.to_owned()).unwrap_or(m));
    }
    ensure!(got == ["0", "1", "2", "3", "4"], "server streaming gave {got:?}");

    let joined = client.join(&["a", "b", "c"]).await?.map_err(|s| anyhow::anyhow!("Join failed: {s:?}"))?;
    ensure!(joined.ends_with(":a,b,c"), "client streaming gave {joined:?}");

    // Bidirectional ping-pong: each message is sent only after the previous answer came back,
    // so a proxy that waited for the request stream to end would hang here.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let outgoing = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    tx.send(Bytes::from_static(b"ping0")).await?;
    let mut replies = client.chat(outgoing).await?.map_err(|s| anyhow::anyhow!("Chat failed: {s:?}"))?;
    for i in 0..3 {
        let reply = tokio::time::timeout(REQUEST, next_text(&mut replies))
            .await
            .context("no Chat reply: the request stream is held back")?
            .map_err(|s| anyhow::anyhow!("Chat stream: {s:?}"))?
            .context("Chat ended early")?;
        ensure!(reply.ends_with(&format!(":ping{i}")), "bidirectional reply {reply:?}");
        if i < 2 {
            tx.send(Bytes::from(format!("ping{}", i + 1))).await?;
        }
    }
    drop(tx);
    let end = tokio::time::timeout(REQUEST, next_text(&mut replies)).await.context("Chat did not end")?;
    ensure!(matches!(end, Ok(None)), "Chat after the client's end: {end:?}");

    let status = client.unary("not-found").await?.err().context("not-found succeeded")?;
    ensure!(status.code() == tonic::Code::NotFound, "status {status:?}");
    ensure!(status.message() == "no such thing", "message {:?}", status.message());
    Ok(answered)
}

#[tokio::test]
async fn all_four_call_kinds_statuses_and_balancing_over_h2c() -> Result<()> {
    let servers = [GrpcServer::start("a")?, GrpcServer::start("b")?, GrpcServer::start("c")?];
    let refs: Vec<&GrpcServer> = servers.iter().collect();
    let keel = h2c_keel(&refs).start().await?;
    for s in &servers {
        wait_until(HEALTH_CHANGE, &format!("{} health-checked over gRPC", s.name()), || async {
            s.health_checks() >= 2
        })
        .await?;
    }
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    four_kinds(&mut client).await?;

    // Each call is balanced on its own, though they share one client connection.
    let mut answered = Vec::new();
    for i in 0..30 {
        let r = client.unary(&format!("n{i}")).await?.map_err(|s| anyhow::anyhow!("unary: {s:?}"))?;
        answered.push(r.split_once(':').map(|(s, _)| s.to_owned()).unwrap_or(r));
    }
    let spread = tally(answered.iter().map(String::as_str));
    ensure!(spread.len() == 3 && spread.values().all(|&n| n == 10), "round robin over 30 calls: {spread:?}");
    for s in &servers {
        ensure!(
            s.te_trailers() == s.calls(),
            "{}: te: trailers on {} of {} calls",
            s.name(),
            s.te_trailers(),
            s.calls()
        );
        let status = keel.server_status("grpc", s.name()).await?;
        ensure!(status["requests"].as_u64().unwrap_or(0) >= 10, "per-server counters: {status}");
    }
    Ok(())
}

#[tokio::test]
async fn source_ip_stickiness_holds_every_call_to_one_server() -> Result<()> {
    let servers = [GrpcServer::start("a")?, GrpcServer::start("b")?, GrpcServer::start("c")?];
    let refs: Vec<&GrpcServer> = servers.iter().collect();
    let keel = h2c_keel(&refs).raw("[pools.grpc.sticky]\nmode = \"source_ip\"\n").start().await?;
    let mut answered = Vec::new();
    // Two client connections from one address: the stickiness is per client, not per connection.
    for _ in 0..2 {
        let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
        for i in 0..6 {
            let r = client.unary(&format!("s{i}")).await?.map_err(|s| anyhow::anyhow!("unary: {s:?}"))?;
            answered.push(r.split_once(':').map(|(s, _)| s.to_owned()).unwrap_or(r));
        }
    }
    let spread = tally(answered.iter().map(String::as_str));
    ensure!(spread.len() == 1, "source_ip stickiness spread the calls: {spread:?}");
    Ok(())
}

#[tokio::test]
async fn grpc_over_tls_on_both_sides() -> Result<()> {
    let dir = TempDir::new("keel-grpc-tls")?;
    let ca = TestCa::new()?;
    let front = ca.leaf(&["front.test"])?;
    let (cert, key) = front.write(&dir, "front")?;
    let back = ca.leaf(&["grpc.test"])?;
    let ca_file = ca.write(&dir, "ca.pem")?;
    let servers = [GrpcServer::start_tls("a", &back)?, GrpcServer::start_tls("b", &back)?];
    let refs: Vec<&GrpcServer> = servers.iter().collect();
    let pool = grpc_pool("h2", &refs);
    let keel = Keel::builder()
        .protocol("https")
        .default_pool("grpc")
        .pool(pool)
        .raw(&format!(
            "[listeners.web.tls]\nhttp2 = true\n[[listeners.web.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\n\
             [pools.grpc.tls]\nca = \"{}\"\nserver_name = \"grpc.test\"\n",
            cert.display(),
            key.display(),
            ca_file.display()
        ))
        .start()
        .await?;
    for s in &servers {
        wait_until(HEALTH_CHANGE, &format!("{} health-checked over TLS", s.name()), || async {
            s.health_checks() >= 2
        })
        .await?;
    }
    let mut client = GrpcClient::tls(keel.proxy_addr(), &ca, "front.test").await?;
    let answered = four_kinds(&mut client).await?;
    let seen: BTreeSet<&str> = answered.iter().map(String::as_str).collect();
    ensure!(seen == BTreeSet::from(["a", "b"]), "unary calls reached {seen:?}");
    Ok(())
}

#[tokio::test]
async fn a_cancelled_call_is_cancelled_at_the_server() -> Result<()> {
    let server = GrpcServer::start("a")?;
    let keel = h2c_keel(&[&server]).start().await?;
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    let mut stream = client.hang().await?.map_err(|s| anyhow::anyhow!("Hang failed: {s:?}"))?;
    let first = next_text(&mut stream).await.map_err(|s| anyhow::anyhow!("Hang stream: {s:?}"))?;
    ensure!(first.as_deref() == Some("a:open"), "first message {first:?}");
    ensure!(server.cancelled() == 0, "cancelled before the client cancelled");
    // Dropping the stream resets it (RST_STREAM CANCEL): keel must reset the server's stream.
    drop(stream);
    wait_until(PROPAGATE, "the server to see the call cancelled", || async { server.cancelled() == 1 }).await?;
    // The connection carries on.
    let r = client.unary("after").await?.map_err(|s| anyhow::anyhow!("unary after the cancel: {s:?}"))?;
    ensure!(r == "a:after", "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_servers_reset_reaches_the_client_with_its_reason() -> Result<()> {
    let server = GrpcServer::start("a")?;
    let keel = h2c_keel(&[&server]).start().await?;
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    let mut stream = client.reset().await?.map_err(|s| anyhow::anyhow!("Reset failed: {s:?}"))?;
    let first = next_text(&mut stream).await.map_err(|s| anyhow::anyhow!("first message: {s:?}"))?;
    ensure!(first.as_deref() == Some("a:first"), "first message {first:?}");
    let end = tokio::time::timeout(REQUEST, next_text(&mut stream)).await.context("no reset")?;
    // The client's stream is reset with the server's own reason, not one of keel's.
    let status = end.err().context("the stream ended cleanly")?;
    let mut source = std::error::Error::source(&status);
    let mut reason = None;
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            reason = h2.reason();
        }
        source = e.source();
    }
    ensure!(reason == Some(h2::Reason::ENHANCE_YOUR_CALM), "the client saw {status:?}");
    Ok(())
}

#[tokio::test]
async fn a_server_killed_mid_stream_fails_only_its_calls_and_leaves_rotation() -> Result<()> {
    let mut servers = [GrpcServer::start("a")?, GrpcServer::start("b")?, GrpcServer::start("c")?];
    let keel = {
        let refs: Vec<&GrpcServer> = servers.iter().collect();
        h2c_keel(&refs).start().await?
    };
    for s in &servers {
        wait_until(HEALTH_CHANGE, &format!("{} health-checked", s.name()), || async { s.health_checks() >= 2 }).await?;
    }
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    // Three slow streams, one per server (round robin): 40 messages 50 ms apart.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = client.count("40/50").await?.map_err(|s| anyhow::anyhow!("Count: {s:?}"))?;
        let first = next_text(&mut s).await.map_err(|e| anyhow::anyhow!("first message: {e:?}"))?;
        let first = first.context("a stream ended at once")?;
        let (server, _) = first.split_once(':').context("NAME:I")?;
        streams.push((server.to_owned(), s));
    }
    let on: BTreeSet<&str> = streams.iter().map(|(s, _)| s.as_str()).collect();
    ensure!(on.len() == 3, "the three streams went to {on:?}");

    servers[1].stop();
    for (server, mut stream) in streams {
        let mut n = 1;
        let end = loop {
            match tokio::time::timeout(REQUEST, next_text(&mut stream)).await.context("stream stalled")? {
                Ok(Some(_)) => n += 1,
                other => break other,
            }
        };
        if server == "b" {
            ensure!(end.is_err(), "the killed server's stream ended with {end:?} after {n} messages");
            ensure!(n < 40, "the killed server's stream got all {n} messages");
        } else {
            ensure!(matches!(end, Ok(None)) && n == 40, "{server}'s stream: {n} messages, then {end:?}");
        }
    }
    keel.wait_state("grpc", "b", "down", HEALTH_CHANGE).await?;
    for i in 0..12 {
        let r =
            client.unary(&format!("after{i}")).await?.map_err(|s| anyhow::anyhow!("unary after the kill: {s:?}"))?;
        ensure!(!r.starts_with("b:"), "a call went to the dead server: {r:?}");
    }
    Ok(())
}

#[tokio::test]
async fn grpc_timeout_cuts_the_wait_shorter_than_the_response_timeout() -> Result<()> {
    let server = GrpcServer::start("a")?;
    let keel = Keel::builder()
        .default_pool("grpc")
        .pool(PoolSpec::new("grpc", "round_robin").set("protocol = \"h2c\"").set("response_timeout = \"30s\"").server(
            server.name(),
            server.addr(),
            None,
        ))
        .start()
        .await?;
    // A bare HTTP/2 client: tonic's channel would enforce the grpc-timeout itself.
    let tcp = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
    let (mut h2, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/test.Echo/Slow", keel.proxy_addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())?;
    let started = std::time::Instant::now();
    let (response, mut body) = h2.send_request(request, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 4, b'5', b'0', b'0', b'0']), true)?;
    let response = tokio::time::timeout(REQUEST, response).await.context("no answer at all")??;
    let took = started.elapsed();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    ensure!(response.status() == 504, "status {}", response.status());
    // DEADLINE_EXCEEDED in keel's own words.
    ensure!(header("grpc-status") == "4" && header("grpc-message").starts_with("keel: 504"), "{response:?}");
    ensure!(took < Duration::from_secs(3), "took {took:?}: the pool's 30 s response timeout was used");
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    // Within the pool's response timeout, a call without a grpc-timeout still waits.
    let r = client.slow_with_timeout(200, Duration::from_secs(20)).await?;
    ensure!(r.as_deref().ok() == Some("a:200"), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn a_grpc_call_over_http1_is_refused_with_415() -> Result<()> {
    let server = GrpcServer::start("a")?;
    let keel = h2c_keel(&[&server]).start().await?;
    let mut tcp = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
    let body = [0u8, 0, 0, 0, 2, b'h', b'i'];
    let head = format!(
        "POST /test.Echo/Unary HTTP/1.1\r\nHost: x\r\ncontent-type: application/grpc\r\nte: trailers\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(&body).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(REQUEST, tcp.read_to_end(&mut answer)).await.context("no answer")??;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    ensure!(answer.starts_with("http/1.1 415"), "answer:\n{answer}");
    ensure!(answer.contains("grpc-status: 13") && answer.contains("grpc needs http/2"), "answer:\n{answer}");
    ensure!(server.calls() == 0, "the call reached the server");
    Ok(())
}

#[tokio::test]
async fn the_access_log_shows_each_calls_grpc_status() -> Result<()> {
    let dir = TempDir::new("keel-grpc-log")?;
    let log = dir.path().join("access.log");
    let server = GrpcServer::start("a")?;
    let keel = h2c_keel(&[&server])
        .listener_line(&format!("access_log = {{ destination = \"{}\", format = \"json\" }}", log.display()))
        .start()
        .await?;
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    client.unary("fine").await?.map_err(|s| anyhow::anyhow!("unary: {s:?}"))?;
    ensure!(client.unary("not-found").await?.is_err(), "not-found succeeded");
    let entries = wait_for(PROPAGATE, "two access log lines", || async {
        let text = std::fs::read_to_string(&log).ok()?;
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await?;
    ensure!(entries[0]["grpc_status"] == 0 && entries[0]["status"] == 200, "first call: {}", entries[0]);
    ensure!(entries[1]["grpc_status"] == 5, "NOT_FOUND call: {}", entries[1]);
    Ok(())
}

#[tokio::test]
async fn plain_http_rides_an_h2c_pool_from_http1_and_http2_clients() -> Result<()> {
    let backend = keel_tests::Backend::start("web")?;
    let keel = Keel::builder()
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").set("protocol = \"h2c\"").backends([&backend]))
        .start()
        .await?;
    for (client, how) in [(keel_tests::Client::new(), "HTTP/1.1"), (keel_tests::Client::h2c(), "h2c")] {
        let r = client.get(keel.proxy_addr(), "/headers").await?;
        let doc = r.json()?;
        ensure!(doc["version"] == "HTTP/2.0", "{how} client: the server saw {doc}");
        ensure!(doc["headers"]["x-forwarded-for"].is_array(), "{how} client: {doc}");
        // A body larger than request_buffer streams from an HTTP/1 client's connection.
        let big = "x".repeat(300 * 1024);
        let r = client.post(keel.proxy_addr(), "/", &big).await?;
        ensure!(r.status == 200 && r.text() == "web", "{how} POST: {} {}", r.status, r.text());
    }
    Ok(())
}

#[test]
fn config_check_names_a_bad_protocol_and_h2_without_tls() -> Result<()> {
    let dir = TempDir::new("keel-grpc-config")?;
    let base = "[listeners.web]\nbind = \"127.0.0.1:1\"\ndefault_pool = \"g\"\n[pools.g]\n";
    let server = "\n[[pools.g.servers]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n";
    for (line, words) in [
        ("protocol = \"http3\"", &["protocol", "http3", "h2c"][..]),
        ("protocol = \"h2\"", &["pools.g.protocol", "tls"][..]),
    ] {
        let file = dir.write("keel.toml", &format!("{base}{line}\n{server}"))?;
        let out = run_keel(&["config", "check", file.to_str().context("utf-8 path")?], REQUEST)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(1), "{line}: exit {:?}; stderr:\n{stderr}", out.status.code());
        ensure!(words.iter().all(|w| stderr.contains(w)), "{line}: stderr lacks {words:?}:\n{stderr}");
    }
    Ok(())
}

/// An h2c server that answers every stream with `frames` gRPC messages of two bytes, each in
/// its own DATA frame and all in one burst, then `grpc-status: 0`; returns its address.
async fn small_frame_server(frames: usize) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else { return };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap_or_default();
                    let Ok(mut send) = respond.send_response(head, false) else { continue };
                    for _ in 0..frames {
                        let _ = send.send_data(Bytes::from_static(b"\0\0\0\0\x02ok"), false);
                    }
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let _ = send.send_trailers(trailers);
                }
            });
        }
    });
    Ok(addr)
}

/// A server streaming many small messages at once: their DATA frames reach keel many to a
/// read, faster than the call's task forwards them, and wait in keel's HTTP/2 client
/// meanwhile. That is a busy server, not a flood (the `h2` crate's default allowance for
/// small frames is ≈ 130 per connection, which closed the connection with
/// ENHANCE_YOUR_CALM): every message comes through and the server is not blamed.
#[tokio::test]
async fn a_burst_of_small_data_frames_from_a_server_comes_through_whole() -> Result<()> {
    const N: usize = 2000;
    let addr = small_frame_server(N).await?;
    let keel = Keel::builder()
        .default_pool("grpc")
        .pool(PoolSpec::new("grpc", "round_robin").set("protocol = \"h2c\"").server("s", addr, None))
        .start()
        .await?;
    let mut client = GrpcClient::h2c(keel.proxy_addr()).await?;
    for call in 0..3 {
        let mut stream = client.count("1").await?.map_err(|s| anyhow::anyhow!("call {call} failed: {s:?}"))?;
        let mut got = 0;
        while let Some(m) = tokio::time::timeout(REQUEST, next_text(&mut stream))
            .await
            .context("the stream stalled")?
            .map_err(|s| anyhow::anyhow!("call {call} broke after {got} messages: {s:?}"))?
        {
            ensure!(m == "ok", "message {got} was {m:?}");
            got += 1;
        }
        ensure!(got == N, "call {call}: {got} of {N} messages");
    }
    let status = keel.server_status("grpc", "s").await?;
    ensure!(status["broken"].as_u64() == Some(0), "the server was blamed: {status}");
    Ok(())
}
