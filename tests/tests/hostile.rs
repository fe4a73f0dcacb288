//! Input no browser sends. Each must get a 4xx status line or a closed connection within
//! [`HOSTILE`], never a hang, never a 2xx/5xx, and keel must keep serving normal requests.

use anyhow::{bail, ensure, Result};
use keel_tests::client::{raw_exchange, raw_transcript, status_codes, RawOutcome};
use keel_tests::wait::HOSTILE;
use keel_tests::{Backend, Keel, PoolSpec};

async fn keel() -> Result<(Backend, Keel)> {
    let a = Backend::start("a")?;
    let keel =
        Keel::builder().default_pool("app").pool(PoolSpec::new("app", "round_robin").backends([&a])).start().await?;
    Ok((a, keel))
}

/// Sends `bytes`, checks the answer is a 4xx or a close, then that a normal request works.
async fn rejects(keel: &Keel, what: &str, bytes: Vec<u8>) -> Result<()> {
    let out = raw_exchange(keel.proxy_addr(), bytes, HOSTILE).await.map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    match out {
        RawOutcome::Closed => {}
        RawOutcome::Status(code) if (400..500).contains(&code) => {}
        other => bail!("{what}: expected a 4xx or a close, got {other:?}"),
    }
    let r = keel.get("/").await.map_err(|e| anyhow::anyhow!("normal request after {what}: {e}"))?;
    ensure!(r.status == 200 && r.text() == "a", "normal request after {what}: {} {:?}", r.status, r.text());
    Ok(())
}

#[tokio::test]
async fn garbage_bytes() -> Result<()> {
    let (a, keel) = keel().await?;
    rejects(&keel, "binary garbage", (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect()).await?;
    rejects(
        &keel,
        "a TLS ClientHello on the plain port",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n".to_vec(),
    )
    .await?;
    rejects(&keel, "a bad method token", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()).await?;
    rejects(&keel, "a header without a colon", b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n".to_vec()).await?;
    // One normal request after each of the four.
    ensure!(a.requests() == 4, "malformed requests reached the backend: {:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn one_mebibyte_header() -> Result<()> {
    let (a, keel) = keel().await?;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    req.extend_from_slice(b"\r\n\r\n");
    rejects(&keel, "a 1 MiB header", req).await?;
    ensure!(a.requests() == 1, "the huge header reached the backend");
    Ok(())
}

#[tokio::test]
async fn many_headers() -> Result<()> {
    let (_a, keel) = keel().await?;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..10_000 {
        req.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    rejects(&keel, "10,000 headers", req).await
}

#[tokio::test]
async fn hundred_kib_request_line() -> Result<()> {
    let (a, keel) = keel().await?;
    let mut req = b"GET /".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 * 1024));
    req.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\n\r\n");
    rejects(&keel, "a 100 KiB request line", req).await?;
    ensure!(a.requests() == 1, "the 100 KiB URI reached the backend");
    Ok(())
}

#[tokio::test]
async fn conflicting_lengths_are_not_smuggled() -> Result<()> {
    let (a, keel) = keel().await?;
    // Content-Length and Transfer-Encoding together is the classic smuggling vector. RFC 9112
    // 6.1: reject it, or go by Transfer-Encoding alone and close the connection after the
    // response. Either way the GET hidden after the chunked body is never served.
    let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
                0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        .to_vec();
    let transcript = raw_transcript(keel.proxy_addr(), req, HOSTILE).await?;
    let codes = status_codes(&transcript);
    ensure!(
        codes.is_empty() || codes == [200] || (codes.len() == 1 && (400..500).contains(&codes[0])),
        "CL+TE must get one 4xx, or one answer and a close; got {codes:?}:\n{}",
        String::from_utf8_lossy(&transcript)
    );
    ensure!(!a.paths().iter().any(|p| p == "/smuggled"), "a smuggled request reached the backend: {:?}", a.paths());
    Ok(())
}

#[tokio::test]
async fn backends_never_see_both_lengths() -> Result<()> {
    let (_a, keel) = keel().await?;
    // Whatever keel accepts, what it sends on must be unambiguous.
    let req = b"POST /headers HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                5\r\nhello\r\n0\r\n\r\n"
        .to_vec();
    let transcript = raw_transcript(keel.proxy_addr(), req, HOSTILE).await?;
    let text = String::from_utf8_lossy(&transcript);
    if status_codes(&transcript) == [200] {
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
        ensure!(
            !(body.contains("\"content-length\"") && body.contains("\"transfer-encoding\"")),
            "the backend got both Content-Length and Transfer-Encoding: {body}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn half_sent_requests_and_abrupt_closes() -> Result<()> {
    let (_a, keel) = keel().await?;
    for i in 0..50 {
        let mut s = tokio::net::TcpStream::connect(keel.proxy_addr()).await?;
        let partial: &[u8] = match i % 3 {
            0 => b"GET / HT",
            1 => b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nonly a little",
            _ => b"",
        };
        tokio::io::AsyncWriteExt::write_all(&mut s, partial).await?;
        drop(s);
    }
    let r = keel.get("/").await?;
    if r.status != 200 {
        let a = keel.server_status("app", "a").await?;
        bail!("after 50 abandoned connections: {} {:?}; server a in /status: {a}", r.status, r.text());
    }
    Ok(())
}
