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
