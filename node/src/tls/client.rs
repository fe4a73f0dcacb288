//! TLS from keel to a pool's servers: the connector every pool's HTTP client is built on.
//!
//! One connector type ([`UpstreamConnector`]) serves plain and TLS pools alike, so the pool's
//! client has one type whatever its configuration. The proxy addresses servers by IP
//! (`https://10.0.0.5:8443/...`), so the name the certificate must carry cannot come from the URI:
//! with `server_name` configured, a fixed resolver makes hyper-rustls send that name as SNI *and*
//! verify the certificate against it, whatever the URI says; without it, the URI's IP address is
//! used (rustls verifies IP SANs, and sends no SNI for an IP).
//!
//! Only HTTP/1.1 is offered through ALPN: keel's upstream client speaks HTTP/1.1 to servers.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper_rustls::{DefaultServerNameResolver, FixedServerNameResolver, HttpsConnector, ResolveServerName};
use hyper_util::client::legacy::connect::HttpConnector;
use keel_cluster::edge::BackendTls;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tracing::debug;

use super::server::read_certificates;
use super::{provider, TlsError};

/// The connector of every pool's client: plain TCP for `http://` URIs, TLS for `https://`.
///
/// The pool's client becomes
/// `hyper_util::client::legacy::Client<UpstreamConnector, UpstreamBody>`.
pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// Builds the connector of a pool.
///
/// - `tls: None` (a plain pool): `http://` URIs connect in clear text. An `https://` URI would
///   fail certificate verification, since this connector trusts no root: a plain pool never
///   speaks TLS by accident.
/// - `tls: Some(..)`: only `https://` URIs are accepted (an `http://` URI is an error, not a
///   silent clear-text connection); server certificates must chain to the `ca` bundle, or to the
///   system roots when `ca` is absent; they must be valid for `server_name`, or for the URI's IP
///   address when it is absent. ALPN offers `http/1.1` only. TLS 1.2 and 1.3.
///
/// The TCP side keeps keel's settings: `connect_timeout`, `TCP_NODELAY`. Errors name the CA file
/// or the invalid `server_name`; the system roots are read once per process.
pub fn backend_connector(tls: Option<&BackendTls>, connect_timeout: Duration) -> Result<UpstreamConnector, TlsError> {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // hyper-rustls hands `https://` URIs to this connector for the TCP part; it must not refuse them.
    http.enforce_http(false);

    let Some(tls) = tls else {
        let config = client_config(RootCertStore::empty())?;
        return Ok(HttpsConnector::new(http, config, false, Arc::new(DefaultServerNameResolver::default())));
    };

    let roots = match &tls.ca {
        Some(path) => ca_roots(path)?,
        None => system_roots()?,
    };
    let mut config = client_config(roots)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let resolver: Arc<dyn ResolveServerName + Send + Sync> = match &tls.server_name {
        Some(name) => Arc::new(FixedServerNameResolver::new(server_name(name)?)),
        None => Arc::new(DefaultServerNameResolver::default()),
    };
    // `HttpsConnector::new` rather than the builder: the builder insists on setting ALPN itself
    // and, for HTTP/1.1 only, leaves it empty.
    Ok(HttpsConnector::new(http, config, true, resolver))
}

fn client_config(roots: RootCertStore) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
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

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use keel_cluster::edge::{ListenerTls, TlsVersion};

    use super::*;
    use crate::tls::server_config;
    use crate::tls::testutil::{chain, http_server, Ca, Leaf, TempDir};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// An HTTPS server presenting `leaf` (and offering h2 too, so the client's ALPN decides).
    async fn backend(dir: &TempDir, leaf: &Leaf) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>) {
        let tls =
            ListenerTls { certificates: vec![dir.pair("backend", leaf)], min_version: TlsVersion::Tls12, http2: true };
        let (config, _) = server_config(&tls).unwrap();
        let (addr, alpn) = http_server(Some(config)).await;
        (format!("https://{addr}/"), alpn)
    }

    fn backend_tls(ca: Option<PathBuf>, server_name: Option<&str>) -> BackendTls {
        BackendTls { ca, server_name: server_name.map(str::to_owned) }
    }

    /// GETs `uri` through the connector, returning the body or the whole error chain.
    async fn get(connector: UpstreamConnector, uri: &str) -> Result<String, String> {
        let client = Client::builder(TokioExecutor::new()).build::<_, Empty<Bytes>>(connector);
        let response = client.get(uri.parse().unwrap()).await.map_err(|e| chain(&e))?;
        let body = response.into_body().collect().await.map_err(|e| chain(&e))?.to_bytes();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn verifies_against_the_configured_ca_and_server_name_over_an_ip_uri() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (uri, alpn) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("backend.internal"));

        assert_eq!(get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap(), "ok");
        assert_eq!(*alpn.lock().unwrap(), [Some(b"http/1.1".to_vec())], "HTTP/1.1 only towards servers");
    }

    #[tokio::test]
    async fn a_certificate_from_another_ca_is_refused() {
        let (ca, other, dir) = (Ca::new(), Ca::new(), TempDir::new());
        let (uri, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("other.pem", &other.pem())), Some("backend.internal"));

        let error = get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_refused() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (uri, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("other.internal"));

        let error = get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
    }

    #[tokio::test]
    async fn without_server_name_the_ip_address_is_verified() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let ca_pem = dir.write("ca.pem", &ca.pem());
        let tls = backend_tls(Some(ca_pem), None);

        let (uri, _) = backend(&dir, &ca.leaf(&["127.0.0.1"])).await;
        assert_eq!(get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap(), "ok");

        let (uri, _) = backend(&dir, &ca.leaf(&["backend.internal"])).await;
        let error = get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap_err();
        assert!(error.contains("not valid for name"), "{error}");
    }

    #[tokio::test]
    async fn a_plain_pool_speaks_http_and_a_tls_pool_refuses_it() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (addr, _) = http_server(None).await;
        let uri = format!("http://{addr}/");

        assert_eq!(get(backend_connector(None, TIMEOUT).unwrap(), &uri).await.unwrap(), "ok");

        let tls = backend_tls(Some(dir.write("ca.pem", &ca.pem())), Some("backend.internal"));
        let error = get(backend_connector(Some(&tls), TIMEOUT).unwrap(), &uri).await.unwrap_err();
        assert!(error.contains("unsupported scheme http"), "{error}");
    }

    #[tokio::test]
    async fn a_plain_pool_never_trusts_a_tls_server() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (uri, _) = backend(&dir, &ca.leaf(&["127.0.0.1"])).await;

        let error = get(backend_connector(None, TIMEOUT).unwrap(), &uri).await.unwrap_err();
        assert!(error.contains("UnknownIssuer"), "{error}");
    }

    #[test]
    fn bad_settings_are_reported_with_the_file_or_name() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let ca_pem = dir.write("ca.pem", &ca.pem());

        let error =
            backend_connector(Some(&backend_tls(Some(ca_pem.clone()), Some("not a name"))), TIMEOUT).unwrap_err();
        assert!(matches!(&error, TlsError::BadServerName { name, .. } if name == "not a name"), "{error:?}");

        let missing = dir.path("missing-ca.pem");
        let error = backend_connector(Some(&backend_tls(Some(missing.clone()), None)), TIMEOUT).unwrap_err();
        assert!(matches!(&error, TlsError::Read { path, .. } if *path == missing), "{error:?}");

        let empty = dir.write("empty.pem", "no certificates here\n");
        let error = backend_connector(Some(&backend_tls(Some(empty.clone()), None)), TIMEOUT).unwrap_err();
        assert!(matches!(&error, TlsError::NoCertificate { path } if *path == empty), "{error:?}");

        for name in ["backend.internal", "10.0.0.5", "[::1]", "::1"] {
            backend_connector(Some(&backend_tls(Some(ca_pem.clone()), Some(name))), TIMEOUT).unwrap();
        }
    }

    #[test]
    fn system_roots_load_or_say_why_not() {
        match backend_connector(Some(&backend_tls(None, Some("example.com"))), TIMEOUT) {
            Ok(_) | Err(TlsError::NoSystemRoots { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
}
