//! `protocol = "https"` listeners: SNI certificate selection, ALPN h2, `X-Forwarded-Proto`,
//! minimum TLS version, and certificate reload (admin `POST /reload-certs` and SIGHUP), including
//! a broken file that must be refused while the old certificate stays in use.
//!
//! Certificates come from a CA generated per test ([`TestCa`]); the listener's first certificate
//! (`a.test`) is the default for clients sending no or an unknown SNI.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use keel_tests::tempdir::TempDir;
use keel_tests::tls::{expect_cert, https_get, HttpConn, Leaf, TestCa, TlsClient};
use keel_tests::{wait_until, Backend, Keel, KeelBuilder, PoolSpec};

/// Time for a reload (admin or SIGHUP) to show in new handshakes.
const RELOAD: Duration = Duration::from_secs(5);

/// Time for keel to log that a SIGHUP reload was refused.
const RELOAD_LOG: Duration = Duration::from_secs(5);

/// A CA, the three listener certificates and their files.
struct Certs {
    dir: TempDir,
    ca: TestCa,
    a: Leaf,
    b: Leaf,
    wild: Leaf,
    files: Vec<(PathBuf, PathBuf)>,
}

impl Certs {
    fn new() -> Result<Certs> {
        let dir = TempDir::new("keel-tls-certs")?;
        let ca = TestCa::new()?;
        let a = ca.leaf(&["a.test"])?;
        let b = ca.leaf(&["b.test"])?;
        let wild = ca.leaf(&["*.wild.test"])?;
        let files = vec![a.write(&dir, "a")?, b.write(&dir, "b")?, wild.write(&dir, "wild")?];
        Ok(Certs { dir, ca, a, b, wild, files })
    }

    fn known(&self) -> [(&str, &Leaf); 3] {
        [("a.test", &self.a), ("b.test", &self.b), ("*.wild.test", &self.wild)]
    }

    /// The `[listeners.web.tls]` table with every certificate, `a` first.
    fn tls_table(&self, min_version: &str, http2: bool) -> String {
        let mut s = format!("[listeners.web.tls]\nmin_version = \"{min_version}\"\nhttp2 = {http2}\n");
        for (cert, key) in &self.files {
            s.push_str(&format!(
                "\n[[listeners.web.tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n",
                cert.display(),
                key.display()
            ));
        }
        s
    }
}

fn https_keel(certs: &Certs, backend: &Backend, min_version: &str) -> KeelBuilder {
    Keel::builder()
        .protocol("https")
        .default_pool("app")
        .pool(PoolSpec::new("app", "round_robin").backends([backend]))
        .raw(&certs.tls_table(min_version, true))
}

#[tokio::test]
async fn sni_picks_the_matching_certificate_else_the_first() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let addr = keel.proxy_addr();
    let any = TlsClient::any_cert();
    let known = certs.known();
    for (sni, want, why) in [
        ("a.test", &certs.a, "exact a.test"),
        ("b.test", &certs.b, "exact b.test"),
        ("x.wild.test", &certs.wild, "one label under *.wild.test"),
        ("wild.test", &certs.a, "the wildcard's parent is not covered: default"),
        ("y.x.wild.test", &certs.a, "two labels under *.wild.test are not covered: default"),
        ("unknown.test", &certs.a, "unknown SNI: default"),
    ] {
        let hs = any.connect(addr, sni).await.with_context(|| format!("SNI {sni}"))?;
        expect_cert(&format!("SNI {sni} ({why})"), &hs.cert, want, &known)?;
    }
    // No SNI at all (rustls sends none when told not to): the first certificate.
    let hs = TlsClient::any_cert().no_sni().connect(addr, "a.test").await.context("no SNI")?;
    expect_cert("no SNI", &hs.cert, &certs.a, &known)?;
    // And the choice verifies against the CA with the real name.
    for name in ["a.test", "b.test", "x.wild.test"] {
        TlsClient::verified(&certs.ca)?.connect(addr, name).await.with_context(|| format!("verified as {name}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn https_requests_reach_the_backend_with_x_forwarded_proto() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let client = TlsClient::verified(&certs.ca)?.alpn(&[b"http/1.1"]);
    let r = https_get(&client, keel.proxy_addr(), "a.test", "/headers").await?;
    ensure!(r.status == 200, "GET /headers over https: {} {}", r.status, r.text());
    let doc = r.json()?;
    let proto = &doc["headers"]["x-forwarded-proto"];
    ensure!(proto == &serde_json::json!(["https"]), "X-Forwarded-Proto at the backend: {proto} (headers: {doc})");
    ensure!(backend.requests() == 1, "backend saw {} requests", backend.requests());
    Ok(())
}

#[tokio::test]
async fn alpn_negotiates_h2_and_http2_requests_work() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let addr = keel.proxy_addr();

    let hs = TlsClient::verified(&certs.ca)?.alpn(&[b"h2", b"http/1.1"]).connect(addr, "b.test").await?;
    ensure!(hs.alpn.as_deref() == Some(&b"h2"[..]), "ALPN offered h2+http/1.1, negotiated {:?}", hs.alpn);
    let mut conn = HttpConn::http2(hs.stream).await?;
    for i in 0..3 {
        let r = conn.get("b.test", "/headers").await.with_context(|| format!("h2 request {i}"))?;
        ensure!(r.status == 200, "h2 request {i}: {} {}", r.status, r.text());
        ensure!(r.version == http::Version::HTTP_2, "h2 request {i} answered as {:?}", r.version);
        let doc = r.json()?;
        ensure!(
            doc["headers"]["x-forwarded-proto"] == serde_json::json!(["https"]),
            "h2 request {i}: X-Forwarded-Proto at the backend: {doc}"
        );
    }

    // A client offering only http/1.1 gets http/1.1.
    let hs = TlsClient::verified(&certs.ca)?.alpn(&[b"http/1.1"]).connect(addr, "a.test").await?;
    ensure!(hs.alpn.as_deref() == Some(&b"http/1.1"[..]), "ALPN offered http/1.1 only, negotiated {:?}", hs.alpn);
    let mut conn = HttpConn::http1(hs.stream).await?;
    let r = conn.get("a.test", "/").await?;
    ensure!(r.status == 200 && r.text() == "app", "HTTP/1.1 over TLS: {} {}", r.status, r.text());
    ensure!(backend.requests() == 4, "backend saw {} requests, expected 4", backend.requests());
    Ok(())
}

#[tokio::test]
async fn one_https_keepalive_connection_serves_gets_then_a_post_then_gets() -> Result<()> {
    // Bodyless GETs take keel's own HTTP/1.1 path; the POST hands the connection to hyper,
    // which keeps it from then on. Every request is answered on the same connection.
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let hs = TlsClient::verified(&certs.ca)?.alpn(&[b"http/1.1"]).connect(keel.proxy_addr(), "a.test").await?;
    let mut conn = HttpConn::http1(hs.stream).await?;
    for (i, method) in ["GET", "GET", "POST", "GET", "HEAD"].into_iter().enumerate() {
        let req =
            http::Request::builder().method(method).uri("/").header("host", "a.test").body(
                http_body_util::Full::new(bytes::Bytes::from_static(if method == "POST" { b"data" } else { b"" })),
            )?;
        let r = conn.send(req).await.with_context(|| format!("request {i} ({method})"))?;
        let want = if method == "HEAD" { "" } else { "app" };
        ensure!(r.status == 200 && r.text() == want, "request {i} ({method}): {} {:?}", r.status, r.text());
    }
    ensure!(backend.requests() == 5, "backend saw {} requests, expected 5", backend.requests());
    Ok(())
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls_1_2_client() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.3").start().await?;
    let addr = keel.proxy_addr();
    let old = TlsClient::verified(&certs.ca)?.tls12_only().connect(addr, "a.test").await;
    if let Ok(hs) = old {
        bail!("a TLS 1.2-only client completed a handshake ({:?}) with min_version = 1.3", hs.version);
    }
    let hs = TlsClient::verified(&certs.ca)?.tls13_only().connect(addr, "a.test").await?;
    ensure!(hs.version == Some(rustls::ProtocolVersion::TLSv1_3), "version {:?}", hs.version);
    // And with min_version 1.2, a 1.2-only client is fine.
    let keel12 = https_keel(&certs, &backend, "1.2").start().await?;
    let hs = TlsClient::verified(&certs.ca)?.tls12_only().connect(keel12.proxy_addr(), "a.test").await?;
    ensure!(hs.version == Some(rustls::ProtocolVersion::TLSv1_2), "version {:?}", hs.version);
    Ok(())
}

/// How a reload is asked for.
#[derive(Clone, Copy, Debug)]
enum Reload {
    Admin,
    Sighup,
}

async fn reload(keel: &Keel, how: Reload) -> Result<()> {
    match how {
        Reload::Admin => {
            let r = keel.admin_post("/reload-certs", "").await?;
            ensure!(r.status.is_success(), "POST /reload-certs: {} {}", r.status, r.text());
        }
        Reload::Sighup => keel.sighup()?,
    }
    Ok(())
}

/// Replaces the `a.test` files with a new certificate, reloads, and checks that new handshakes
/// get it while a keep-alive connection opened before keeps serving.
async fn reload_swaps_the_certificate(how: Reload) -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let addr = keel.proxy_addr();
    let any = TlsClient::any_cert().alpn(&[b"http/1.1"]);

    let before = any.connect(addr, "a.test").await?;
    expect_cert("before the reload", &before.cert, &certs.a, &certs.known())?;
    let mut kept = HttpConn::http1(before.stream).await?;
    let r = kept.get("a.test", "/").await?;
    ensure!(r.status == 200, "request before the reload: {}", r.status);

    let a2 = certs.ca.leaf(&["a.test"])?;
    a2.write(&certs.dir, "a")?;
    reload(&keel, how).await?;
    let known = [("old a.test", &certs.a), ("new a.test", &a2)];
    wait_until(RELOAD, "new handshakes to get the new a.test certificate", || async {
        matches!(any.connect(addr, "a.test").await, Ok(hs) if hs.cert.as_ref() == a2.der.as_ref())
    })
    .await?;
    // The new one verifies against the CA too, and b.test is still served.
    TlsClient::verified(&certs.ca)?.connect(addr, "a.test").await.context("verified handshake after reload")?;
    let hs = any.connect(addr, "b.test").await?;
    expect_cert("b.test after the reload", &hs.cert, &certs.b, &certs.known())?;
    let hs = any.connect(addr, "a.test").await?;
    expect_cert("a.test after the reload", &hs.cert, &a2, &known)?;

    for i in 0..3 {
        let r = kept.get("a.test", "/").await.with_context(|| format!("keep-alive request {i} after the reload"))?;
        ensure!(r.status == 200 && r.text() == "app", "keep-alive request {i} after reload: {}", r.status);
    }
    Ok(())
}

#[tokio::test]
async fn admin_reload_swaps_the_certificate_and_keeps_old_connections() -> Result<()> {
    reload_swaps_the_certificate(Reload::Admin).await
}

#[tokio::test]
async fn sighup_swaps_the_certificate_and_keeps_old_connections() -> Result<()> {
    reload_swaps_the_certificate(Reload::Sighup).await
}

#[tokio::test]
async fn a_broken_certificate_is_refused_and_the_old_one_stays() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let addr = keel.proxy_addr();
    let any = TlsClient::any_cert();
    let (a_cert, a_key) = &certs.files[0];

    // Garbage PEM in place of the certificate.
    std::fs::write(a_cert, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")?;
    let r = keel.admin_post("/reload-certs", "").await?;
    ensure!(r.status.is_client_error() || r.status.is_server_error(), "reload with a garbage cert: {}", r.status);
    ensure!(r.json().is_ok(), "the refusal is not JSON: {}", r.text());
    let name = a_cert.display().to_string();
    ensure!(r.text().contains(&name), "the refusal does not name {name}: {}", r.text());
    let hs = any.connect(addr, "a.test").await?;
    expect_cert("after a refused reload (garbage cert)", &hs.cert, &certs.a, &certs.known())?;

    // A valid certificate whose key does not match.
    let other = certs.ca.leaf(&["a.test"])?;
    std::fs::write(a_cert, &other.cert_pem)?;
    std::fs::write(a_key, &certs.b.key_pem)?;
    let r = keel.admin_post("/reload-certs", "").await?;
    ensure!(r.status.is_client_error() || r.status.is_server_error(), "reload with a mismatched key: {}", r.status);
    ensure!(r.json().is_ok(), "the refusal is not JSON: {}", r.text());
    ensure!(
        r.text().contains(&name) || r.text().contains(&a_key.display().to_string()),
        "the refusal names neither file: {}",
        r.text()
    );
    let hs = any.connect(addr, "a.test").await?;
    expect_cert("after a refused reload (mismatched key)", &hs.cert, &certs.a, &certs.known())?;

    // SIGHUP with the same broken files: logged, refused, old certificate still served.
    keel.sighup()?;
    wait_until(RELOAD_LOG, "a log line about the refused SIGHUP reload naming the file", || async {
        let log = keel.log();
        log.contains(&name) || log.contains(&a_key.display().to_string())
    })
    .await
    .with_context(|| format!("log:\n{}", keel.log()))?;
    let hs = any.connect(addr, "a.test").await?;
    expect_cert("after a refused SIGHUP reload", &hs.cert, &certs.a, &certs.known())?;
    let r = https_get(&TlsClient::verified(&certs.ca)?, addr, "a.test", "/").await?;
    ensure!(r.status == 200, "a request after refused reloads: {}", r.status);

    // Fixing the files makes the next reload work.
    let fixed = certs.ca.leaf(&["a.test"])?;
    fixed.write(&certs.dir, "a")?;
    let r = keel.admin_post("/reload-certs", "").await?;
    ensure!(r.status.is_success(), "reload with fixed files: {} {}", r.status, r.text());
    let hs = any.connect(addr, "a.test").await?;
    ensure!(hs.cert.as_ref() == fixed.der.as_ref(), "after the fixed reload a.test is not the new certificate");
    Ok(())
}

/// Backend TLS: `[pools.app.tls]` with the CA and name of the servers.
fn tls_pool(backend: &Backend, ca: &std::path::Path, server_name: &str) -> PoolSpec {
    PoolSpec::new("app", "round_robin")
        .backends([backend])
        .set(&format!("tls = {{ ca = \"{}\", server_name = \"{server_name}\" }}", ca.display()))
        .set("retries = 0")
}

#[tokio::test]
async fn backend_tls_verifies_the_server_against_the_pool_ca() -> Result<()> {
    let dir = TempDir::new("keel-backend-tls")?;
    let ca = TestCa::new()?;
    let ca_file = ca.write(&dir, "ca.pem")?;
    let backend = Backend::start_tls("secure", &ca.leaf(&["backend.test"])?)?;
    let keel = Keel::builder().default_pool("app").pool(tls_pool(&backend, &ca_file, "backend.test")).start().await?;
    for i in 0..3 {
        let r = keel.get("/headers").await?;
        ensure!(
            r.status == 200 && r.backend() == Some("secure"),
            "request {i} over backend TLS: {} {}",
            r.status,
            r.text()
        );
    }
    ensure!(backend.tls_handshakes() >= 1, "the backend completed no TLS handshake");
    Ok(())
}

#[tokio::test]
async fn backend_tls_with_another_ca_fails() -> Result<()> {
    let dir = TempDir::new("keel-backend-tls")?;
    let trusted = TestCa::new()?;
    let ca_file = trusted.write(&dir, "ca.pem")?;
    let stranger = TestCa::new()?;
    let backend = Backend::start_tls("impostor", &stranger.leaf(&["backend.test"])?)?;
    let keel = Keel::builder().default_pool("app").pool(tls_pool(&backend, &ca_file, "backend.test")).start().await?;
    let r = keel.get("/").await?;
    ensure!(
        r.status == 502 || r.status == 503,
        "a backend with a certificate from another CA answered through keel: {} {}",
        r.status,
        r.text()
    );
    ensure!(backend.requests() == 0, "the untrusted backend received {} requests", backend.requests());
    Ok(())
}

#[tokio::test]
async fn backend_tls_with_the_wrong_name_fails() -> Result<()> {
    let dir = TempDir::new("keel-backend-tls")?;
    let ca = TestCa::new()?;
    let ca_file = ca.write(&dir, "ca.pem")?;
    let backend = Backend::start_tls("misnamed", &ca.leaf(&["other.test"])?)?;
    let keel = Keel::builder().default_pool("app").pool(tls_pool(&backend, &ca_file, "backend.test")).start().await?;
    let r = keel.get("/").await?;
    ensure!(r.status == 502 || r.status == 503, "a backend named other.test answered for backend.test: {}", r.status);
    ensure!(backend.requests() == 0, "the misnamed backend received {} requests", backend.requests());
    Ok(())
}

#[tokio::test]
async fn a_spoofed_x_forwarded_proto_is_replaced_with_https() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let hs = TlsClient::verified(&certs.ca)?.alpn(&[b"http/1.1"]).connect(keel.proxy_addr(), "a.test").await?;
    let mut conn = HttpConn::http1(hs.stream).await?;
    let req = http::Request::get("/headers")
        .header("host", "a.test")
        .header("x-forwarded-proto", "http")
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let r = conn.send(req).await?;
    ensure!(r.status == 200, "{}", r.status);
    let doc = r.json()?;
    let proto = &doc["headers"]["x-forwarded-proto"];
    ensure!(
        proto == &serde_json::json!(["https"]),
        "a client-sent X-Forwarded-Proto: http reached the backend as {proto}"
    );
    Ok(())
}

/// How late past header_timeout keel may close a stalled TLS connection.
const TLS_STALL_MARGIN: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_after_header_timeout() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel =
        https_keel(&certs, &backend, "1.2").raw("[listeners.web.limits]\nheader_timeout = \"1s\"").start().await?;
    // Silent: connected, not a byte sent.
    let mut silent = keel_tests::raw::RawConn::connect(keel.proxy_addr()).await?;
    // Half a ClientHello: a record header announcing 512 bytes, then 5 of them.
    let mut partial = keel_tests::raw::RawConn::connect(keel.proxy_addr()).await?;
    partial.stream().write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03").await?;
    let limit = Duration::from_secs(1) + TLS_STALL_MARGIN;
    let (a, b) = tokio::join!(silent.expect_close(limit), partial.expect_close(limit));
    a.context("a silent connection to the https listener")?;
    b.context("a half-sent ClientHello")?;
    // Meanwhile the listener works.
    let r = https_get(&TlsClient::verified(&certs.ca)?, keel.proxy_addr(), "a.test", "/").await?;
    ensure!(r.status == 200, "{}", r.status);
    Ok(())
}

#[tokio::test]
async fn an_h2_connection_opened_before_a_reload_keeps_serving() -> Result<()> {
    let certs = Certs::new()?;
    let backend = Backend::start("app")?;
    let keel = https_keel(&certs, &backend, "1.2").start().await?;
    let hs = TlsClient::verified(&certs.ca)?.alpn(&[b"h2"]).connect(keel.proxy_addr(), "a.test").await?;
    ensure!(hs.alpn.as_deref() == Some(&b"h2"[..]), "ALPN {:?}", hs.alpn);
    let mut conn = HttpConn::http2(hs.stream).await?;
    ensure!(conn.get("a.test", "/").await?.status == 200, "h2 before the reload");
    certs.ca.leaf(&["a.test"])?.write(&certs.dir, "a")?;
    reload(&keel, Reload::Admin).await?;
    for i in 0..3 {
        let r = conn.get("a.test", "/").await.with_context(|| format!("h2 request {i} after the reload"))?;
        ensure!(r.status == 200, "h2 request {i} after the reload: {}", r.status);
    }
    Ok(())
}
