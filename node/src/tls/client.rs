//! TLS from keel to a pool's servers: [`UpstreamTls`], built once per pool that has a
//! `[pools.x.tls]` section, wraps each new TCP connection of keel's HTTP/1.1 client
//! ([`crate::proxy::h1::client`]) in a rustls session.
//!
//! A pool without TLS settings has no `UpstreamTls` at all, so a plain pool never speaks TLS by
//! accident, and a TLS pool never falls back to clear text: every connection it makes goes
//! through [`UpstreamTls::connect`].
//!
//! The proxy addresses servers by IP, so the name a certificate must carry cannot come from the
//! address: with `server_name` configured, that name is sent as SNI *and* the certificate is
//! verified against it; without it, the server's IP address is verified (rustls checks IP SANs,
//! and sends no SNI for an IP). Server certificates must chain to the `ca` bundle, or to the
//! system roots when `ca` is absent. ALPN offers `http/1.1` only, or `h2` only for a pool with
//! `protocol = "h2"` (keel's HTTP/2 client, [`crate::proxy::h2_client`]); TLS 1.2 and 1.3.

use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use keel_cluster::edge::BackendTls;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::server::read_certificates;
use super::{provider, TlsError};

/// A pool's TLS client side: the rustls configuration (trust roots, ALPN, versions) and the name
/// server certificates are verified against.
#[derive(Clone)]
pub struct UpstreamTls {
    connector: TlsConnector,
    /// The configured `server_name`; `None` verifies (and does not send as SNI) the server's IP.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Builds a pool's TLS settings. Errors name the CA file or the invalid `server_name`; the
    /// system roots are read once per process.
    pub fn new(tls: &BackendTls) -> Result<Self, TlsError> {
        Self::with_alpn(tls, false)
    }

    /// [`UpstreamTls::new`] offering ALPN `h2` instead of `http/1.1`, for pools with
    /// `protocol = "h2"` (keel's HTTP/2 client checks that the server agreed).
    pub fn with_alpn(tls: &BackendTls, h2: bool) -> Result<Self, TlsError> {
        let roots = match &tls.ca {
            Some(path) => ca_roots(path)?,
            None => system_roots()?,
        };
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![if h2 { b"h2".to_vec() } else { b"http/1.1".to_vec() }];
        let server_name = tls.server_name.as_deref().map(server_name).transpose()?;
        Ok(UpstreamTls { connector: TlsConnector::from(Arc::new(config)), server_name })
    }

    /// Runs the TLS handshake over a connected `tcp` stream: verifies the server's certificate
    /// against the configured name, or the peer's IP address when none is configured.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::IpAddress(tcp.peer_addr()?.ip().into()),
        };
        self.connector.connect(name, tcp).await
    }
}

/// Parses a configured `server_name`: a DNS name, an IPv4 address, or an IPv6 address with or
/// without brackets.
fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bare = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
    ServerName::try_from(bare.to_owned())
        .map_err(|e| TlsError::BadServerName { name: name.to_owned(), reason: e.to_string() })
}

/// The trust store of a pool with its own CA bundle: every certificate in the PEM file.
fn ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCertificate { path: path.to_owned(), reason: e.to_string() })?;
    }
    Ok(roots)
}

/// The system trust store, read on first use and kept: every pool without `ca` shares it, and
/// re-reading hundreds of files on every configuration reload would buy nothing. A failure is not
/// kept, so fixing the system store and reloading works.
fn system_roots() -> Result<RootCertStore, TlsError> {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let mut reasons: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        if reasons.is_empty() {
            reasons.push("the system store is empty".to_owned());
        }
        return Err(TlsError::NoSystemRoots { reason: reasons.join("; ") });
    }
    debug!(target: "keel::tls", added, ignored, errors = found.errors.len(), "loaded system root certificates");
    Ok(ROOTS.get_or_init(|| roots).clone())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};
    use keel_cluster::edge::{ListenerTls, TlsVersion};

    use super::*;
    use crate::proxy::h1::client::{send, IdleConns, RequestHead, Upstream};
    use crate::proxy::h1::codec::Framing;
    use crate::tls::server_config;
    use crate::tls::testutil::{chain, http_server, Ca, Leaf, TempDir};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// An HTTPS server presenting `leaf` (and offering h2 too, so the client's ALPN decides).
    async fn backend(
        dir: &TempDir,
        leaf: &Leaf,
    ) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>) {
        let tls =
            ListenerTls { certificates: vec![dir.pair("backend", leaf)], min_version: TlsVersion::Tls12, http2: true };
        let (config, _) = server_config(&tls).unwrap();
        http_server(Some(config)).await
    }

    fn backend_tls(ca: Option<PathBuf>, server_name: Option<&str>) -> BackendTls {
        BackendTls { ca, server_name: server_name.map(str::to_owned) }
    }

    /// GETs `/` from `addr` through keel's client with `tls`, returning the body or the whole
    /// error chain.
    async fn get(tls: Option<UpstreamTls>, addr: std::net::SocketAddr) -> Result<String, String> {
        let tls = tls.map(Arc::new);
        let idle = Arc::new(IdleConns::default());
        let up = Upstream {
            addr,
            idle: &idle,
            max_idle: TIMEOUT,
            connect_timeout: TIMEOUT,
            response_timeout: TIMEOUT,
            tls: tls.as_ref(),
            connect_us: None,
        };
        let headers = http::HeaderMap::new();
        let head = RequestHead {
            method: &http::Method::GET,
            target: "/",
            headers: &headers,
            framing: Framing::Empty,
            upgrade: false,
            forwarded: None,
            fields: Default::default(),
        };
        let response = send(&up, &head, &mut Empty::new()).await.map_err(|e| chain(&e))?;
        let body = response.into_body().collect().await.map_err(|e| chain(&e))?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn verifies_against_the_configured_ca_and_server_name_over_an_ip_address() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (addr, alpn) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("backend.internal"));

        assert_eq!(get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap(), "ok");
        assert_eq!(*alpn.lock().unwrap(), [Some(b"http/1.1".to_vec())], "HTTP/1.1 only towards servers");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let (ca, other, dir) = (Ca::new(), Ca::new(), TempDir::new());
        let (addr, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("other.pem", &other.pem())), Some("backend.internal"));

        let error = get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
        assert!(error.starts_with("connect to"), "a failed handshake is a connect failure: {error}");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (addr, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("other.internal"));

        let error = get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
    }

    #[tokio::test]
    async fn without_server_name_the_ip_address_is_verified() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let ca_pem = dir.write("ca.pem", &ca.pem());
        let tls = backend_tls(Some(ca_pem), None);

        let (addr, _) = backend(&dir, &ca.leaf(&["127.0.0.1"])).await;
        assert_eq!(get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap(), "ok");

        let (addr, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let error = get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
    }

    #[tokio::test]
    async fn a_plain_pool_speaks_http_and_a_tls_pool_never_falls_back_to_it() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (addr, _) = http_server(None).await;

        assert_eq!(get(None, addr).await.unwrap(), "ok");

        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("backend.internal"));
        let error = get(Some(UpstreamTls::new(&tls).unwrap()), addr).await.unwrap_err();
        assert!(error.starts_with("connect to"), "{error}");
    }

    #[tokio::test]
    async fn a_plain_pool_never_speaks_tls() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (addr, _) = backend(&dir, &ca.leaf(&["127.0.0.1"])).await;

        // Clear text to a TLS server: the server refuses it, nothing is trusted.
        assert!(get(None, addr).await.is_err());
    }

    #[test]
    fn bad_settings_are_reported_with_the_file_or_name() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let ca_pem = dir.write("ca.pem", &ca.pem());

        let error = UpstreamTls::new(&backend_tls(Some(ca_pem.clone()), Some("not a name"))).unwrap_err();
        assert!(matches!(&error, TlsError::BadServerName { name, .. } if name == "not a name"), "{error:?}");

        let missing = dir.path("missing-ca.pem");
        let error = UpstreamTls::new(&backend_tls(Some(missing.clone()), None)).unwrap_err();
        assert!(matches!(&error, TlsError::Read { path, .. } if *path == missing), "{error:?}");

        let empty = dir.write("empty.pem", "no certificates here\n");
        let error = UpstreamTls::new(&backend_tls(Some(empty.clone()), None)).unwrap_err();
        assert!(matches!(&error, TlsError::NoCertificate { path } if *path == empty), "{error:?}");

        for name in ["backend.internal", "10.0.0.5", "[::1]", "::1"] {
            UpstreamTls::new(&backend_tls(Some(ca_pem.clone()), Some(name))).unwrap();
        }
    }

    #[test]
    fn system_roots_load_or_say_why_not() {
        match UpstreamTls::new(&backend_tls(None, Some("example.com"))) {
            Ok(_) | Err(TlsError::NoSystemRoots { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
}
