//! `protocol = "tcp"` listeners: bytes spliced to one server per connection, balanced per
//! connection, connect failures retried elsewhere, TCP health checks taking dead servers out,
//! half-close carried through, and the PROXY protocol (v1 text, v2 binary) sent first.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use keel_tests::raw::{TcpMode, TcpServer};
use keel_tests::wait::HEALTH_CHANGE;
use keel_tests::{wait_until, Keel, KeelBuilder, PoolSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Time one small echo exchange may take.
const ECHO: Duration = Duration::from_secs(5);

/// Time the 20 MiB round trip may take through a debug build on a loaded machine.
const BIG_TRANSFER: Duration = Duration::from_secs(90);

/// Size of the big transfer.
const BIG: usize = 20 * 1024 * 1024 + 12345;

fn tcp_keel(pool: PoolSpec) -> KeelBuilder {
    Keel::builder().protocol("tcp").default_pool(pool.name()).pool(pool)
}

fn pool(servers: &[&TcpServer]) -> PoolSpec {
    let mut p = PoolSpec::new("echo", "round_robin");
    for s in servers {
        p = p.server(s.name(), s.addr(), None);
    }
    p
}

/// Connects, writes `msg`, half-closes, and reads everything back until the close.
async fn exchange(addr: SocketAddr, msg: &[u8]) -> Result<Vec<u8>> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(msg).await?;
        s.shutdown().await?;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await?;
        Ok::<_, anyhow::Error>(back)
    };
    tokio::time::timeout(ECHO, fut).await.map_err(|_| anyhow::anyhow!("no echo and close within {ECHO:?}"))?
}

#[tokio::test]
async fn echo_round_robin_per_connection() -> Result<()> {
    let a = TcpServer::start("a", TcpMode::Echo)?;
    let b = TcpServer::start("b", TcpMode::Echo)?;
    let keel = tcp_keel(pool(&[&a, &b])).start().await?;
    // Counting connections that carried bytes ignores the readiness probe's empty one. Two
    // warm-up connections first: right after start-up keel may still rebuild its pools, which
    // restarts the rotation.
    for _ in 0..2 {
        exchange(keel.proxy_addr(), b"warm-up").await?;
    }
    let (a0, b0) = (a.served(), b.served());
    let mut order = String::new();
    for i in 0..10 {
        let (pa, pb) = (a.served(), b.served());
        let msg = format!("hello {i}\n");
        let back = exchange(keel.proxy_addr(), msg.as_bytes()).await.with_context(|| format!("connection {i}"))?;
        ensure!(back == msg.as_bytes(), "connection {i}: echoed {:?}", String::from_utf8_lossy(&back));
        order.push(match (a.served() - pa, b.served() - pb) {
            (1, 0) => 'a',
            (0, 1) => 'b',
            _ => '?',
        });
    }
    let (da, db) = (a.served() - a0, b.served() - b0);
    ensure!(order == "ababababab" || order == "bababababa", "10 connections went {order}, expected alternation");
    ensure!(da == 5 && db == 5, "10 connections split a={da} b={db}, expected 5/5");
    Ok(())
}

#[tokio::test]
async fn twenty_mebibytes_round_trip_byte_identical() -> Result<()> {
    let a = TcpServer::start("a", TcpMode::Echo)?;
    let keel = tcp_keel(pool(&[&a])).start().await?;
    let data: Vec<u8> = {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..BIG)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    let start = Instant::now();
    let stream = TcpStream::connect(keel.proxy_addr()).await?;
    let (mut rd, mut wr) = stream.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in to_send.chunks(256 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::with_capacity(BIG);
    let read = tokio::time::timeout(BIG_TRANSFER, rd.read_to_end(&mut back)).await;
    writer.abort();
    match read {
        Err(_) => bail!("only {} of {BIG} bytes came back within {BIG_TRANSFER:?}", back.len()),
        Ok(r) => {
            r?;
        }
    }
    ensure!(back.len() == BIG, "{} bytes came back, sent {BIG}", back.len());
    if let Some(i) = back.iter().zip(&data).position(|(x, y)| x != y) {
        bail!("the echo differs from what was sent at byte {i}");
    }
    eprintln!("20 MiB echoed in {:?}", start.elapsed());
    Ok(())
}

#[tokio::test]
async fn half_close_reaches_the_server_and_its_answer_comes_back() -> Result<()> {
    let r = TcpServer::start("rec", TcpMode::RecordThenAck)?;
    let keel = tcp_keel(pool(&[&r])).start().await?;
    let msg: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    // The server answers only once it has seen our FIN: both directions must be handled apart.
    let back = exchange(keel.proxy_addr(), &msg).await?;
    ensure!(
        back == format!("ACK {}\n", msg.len()).as_bytes(),
        "answer after half-close: {:?}",
        String::from_utf8_lossy(&back)
    );
    ensure!(r.received().iter().any(|got| got == &msg), "the server did not record exactly the bytes sent");
    Ok(())
}

#[tokio::test]
async fn a_killed_server_is_retried_around_and_leaves_rotation() -> Result<()> {
    let a = TcpServer::start("a", TcpMode::Echo)?;
    let mut b = TcpServer::start("b", TcpMode::Echo)?;
    // Passive ejection off: the active TCP check alone decides, so b comes back when it is up.
    let p = pool(&[&a, &b]).no_outlier().health(&[
        "type = \"tcp\"",
        "interval = \"100ms\"",
        "timeout = \"100ms\"",
        "rise = 1",
        "fall = 1",
    ]);
    let keel = tcp_keel(p).start().await?;
    b.stop();
    // Connect failures to b are retried on a: every connection works, even before the check.
    for i in 0..6 {
        let back = exchange(keel.proxy_addr(), b"ping").await.with_context(|| format!("connection {i} with b dead"))?;
        ensure!(back == b"ping", "connection {i} with b dead: {:?}", String::from_utf8_lossy(&back));
    }
    keel.wait_state("echo", "b", "down", HEALTH_CHANGE).await?;
    let a0 = a.served();
    for i in 0..6 {
        let back = exchange(keel.proxy_addr(), b"pong").await.with_context(|| format!("connection {i} with b down"))?;
        ensure!(back == b"pong", "connection {i}: {:?}", String::from_utf8_lossy(&back));
    }
    ensure!(a.served() - a0 == 6, "a served {} of 6 connections while b was down", a.served() - a0);
    b.restart()?;
    keel.wait_state("echo", "b", "up", HEALTH_CHANGE).await?;
    let b0 = b.served();
    wait_until(HEALTH_CHANGE, "b to receive connections again", || async {
        let _ = exchange(keel.proxy_addr(), b"x").await;
        b.served() > b0
    })
    .await?;
    Ok(())
}

/// Sends `payload` through a PROXY-protocol pool and returns what the server got and the
/// client's local and keel's listener addresses.
async fn through_proxy_protocol(version: &str, payload: &[u8]) -> Result<(Vec<u8>, SocketAddr, SocketAddr)> {
    let r = TcpServer::start("rec", TcpMode::RecordThenAck)?;
    let keel = tcp_keel(pool(&[&r]).set(&format!("proxy_protocol = \"{version}\""))).start().await?;
    let mut s = TcpStream::connect(keel.proxy_addr()).await?;
    let local = s.local_addr()?;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(ECHO, s.read_to_end(&mut back)).await.context("no ACK")??;
    let got = r
        .received()
        .into_iter()
        .find(|g| g.ends_with(payload))
        .ok_or_else(|| anyhow::anyhow!("the server never received the payload; it got {:?}", r.received()))?;
    ensure!(back == format!("ACK {}\n", got.len()).as_bytes(), "answer: {:?}", String::from_utf8_lossy(&back));
    Ok((got, local, keel.proxy_addr()))
}

#[tokio::test]
async fn proxy_protocol_v1_header_comes_first() -> Result<()> {
    let payload = b"payload after the v1 header";
    let (got, client, listener) = through_proxy_protocol("v1", payload).await?;
    let want = format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n", client.port(), listener.port());
    ensure!(
        got.starts_with(want.as_bytes()),
        "expected {want:?} first, got {:?}",
        String::from_utf8_lossy(&got[..got.len().min(120)])
    );
    ensure!(&got[want.len()..] == payload, "bytes after the header: {:?}", String::from_utf8_lossy(&got[want.len()..]));
    Ok(())
}

#[tokio::test]
async fn proxy_protocol_v2_header_comes_first() -> Result<()> {
    let payload = b"payload after the v2 header";
    let (got, client, listener) = through_proxy_protocol("v2", payload).await?;
    let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    want.push(0x21); // version 2, PROXY command
    want.push(0x11); // AF_INET, STREAM
    want.extend_from_slice(&12u16.to_be_bytes());
    want.extend_from_slice(&[127, 0, 0, 1, 127, 0, 0, 1]);
    want.extend_from_slice(&client.port().to_be_bytes());
    want.extend_from_slice(&listener.port().to_be_bytes());
    ensure!(got.len() >= 16, "only {} bytes arrived", got.len());
    ensure!(got[..12] == want[..12], "no v2 signature: {:02x?}", &got[..16.min(got.len())]);
    let len = u16::from_be_bytes([got[14], got[15]]) as usize;
    ensure!(got.len() >= 16 + len, "header claims {len} bytes of addresses, only {} bytes arrived", got.len());
    // Addresses must be exactly as expected; TLVs after the 12 address bytes are allowed.
    ensure!(got[12..14] == want[12..14], "version/command and family bytes {:02x?}", &got[12..14]);
    ensure!(
        len >= 12 && got[16..28] == want[16..28],
        "addresses {:02x?}, expected {:02x?}",
        &got[16..16 + len.min(12)],
        &want[16..]
    );
    ensure!(&got[16 + len..] == payload, "bytes after the header: {:?}", String::from_utf8_lossy(&got[16 + len..]));
    Ok(())
}

#[tokio::test]
async fn tcp_listener_caps_connections_per_client() -> Result<()> {
    let a = TcpServer::start("a", TcpMode::Echo)?;
    let keel = tcp_keel(pool(&[&a])).raw("[listeners.web.limits]\nmax_connections_per_client = 2").start().await?;
    let addr = keel.proxy_addr();
    let mut held = Vec::new();
    for i in 0..2 {
        let mut c = keel_tests::raw::RawConn::connect(addr).await?;
        c.write(b"held").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(ECHO, c.stream().read_exact(&mut buf)).await.with_context(|| format!("held {i}"))??;
        held.push(c);
    }
    let mut third = keel_tests::raw::RawConn::connect(addr).await?;
    let _ = third.write(b"third").await;
    let got = third.expect_close(ECHO).await.context("the 3rd connection from 127.0.0.1")?;
    ensure!(got.is_empty(), "the 3rd connection got {:?}", String::from_utf8_lossy(&got));
    let mut other = keel_tests::raw::RawConn::connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), addr).await?;
    other.write(b"other").await?;
    let mut buf = [0u8; 5];
    tokio::time::timeout(ECHO, other.stream().read_exact(&mut buf)).await.context("127.0.0.2")??;
    ensure!(&buf == b"other", "127.0.0.2 echoed {buf:?}");
    Ok(())
}
