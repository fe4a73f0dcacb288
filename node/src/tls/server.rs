//! TLS termination on `https` listeners: the certificate store, its SNI resolver, and the rustls
//! [`ServerConfig`] built around it.
//!
//! The store owns the certificate/key files of one listener. It loads them all up front,
//! checks each key against its certificate, and indexes the certificates by the DNS names they
//! are valid for, so a handshake costs one hash lookup (exact name, then wildcard parent, then the
//! default). The index lives behind an [`ArcSwap`]: [`CertStore::reload`] builds a complete new
//! index off to the side and swaps it in one store, so handshakes never see half a reload, a bad
//! file never replaces a good certificate, and connections already established keep the
//! certificate they were made with (rustls only asks the resolver during a handshake).
//!
//! Protocol versions and ALPN are properties of the [`ServerConfig`], which rustls makes
//! immutable; changing them means building a new config (and acceptor), not a reload.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use keel_cluster::edge::{CertificateFiles, ListenerTls, TlsVersion};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CipherSuite, InconsistentKeys, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{provider, TlsError};

/// ALPN identifier of HTTP/2.
const H2: &[u8] = b"h2";
/// ALPN identifier of HTTP/1.1.
const HTTP11: &[u8] = b"http/1.1";

/// Builds the rustls config of an `https` listener and the certificate store behind it.
///
/// - Certificates: every pair in `tls.certificates`, chosen per handshake by SNI (see
///   [`CertStore`]); the first is the default.
/// - Versions: `min_version` 1.2 → TLS 1.2 and 1.3; 1.3 → TLS 1.3 only.
/// - ALPN: `h2` (when `tls.http2`) then `http/1.1`. A client that offers ALPN but none of these
///   is refused with a `no_application_protocol` alert (RFC 7301); a client that offers no ALPN
///   gets HTTP/1.1.
/// - Cipher suites: the server's order decides, AES-128-GCM first (see [`server_provider`]).
/// - Session resumption: stateless tickets under a key of this process, rotated every 6 hours
///   (aws-lc-rs' [`Ticketer`](rustls::crypto::aws_lc_rs::Ticketer)), one ticket per handshake. rustls'
///   default, a stateful cache of 256 sessions and two tickets per handshake, stops resuming
///   beyond 256 clients, and the second ticket is work on both sides that a client resuming one
///   connection at a time never uses (OpenSSL servers also send one after a resumption). Tickets
///   are not shared between nodes: after a failover a client does one full handshake.
///
/// Keep the returned [`CertStore`] to [`reload`](CertStore::reload) the certificates later; the
/// config holds another reference to the same store, so a reload affects it.
pub fn server_config(tls: &ListenerTls) -> Result<(Arc<ServerConfig>, Arc<CertStore>), TlsError> {
    let provider = server_provider();
    let store = Arc::new(CertStore::load_with(&tls.certificates, provider.clone())?);
    let versions: &[&'static SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(store.clone());
    // Server preference order decides in rustls, so h2 first means h2 whenever the client offers it.
    config.alpn_protocols = if tls.http2 { vec![H2.to_vec(), HTTP11.to_vec()] } else { vec![HTTP11.to_vec()] };
    config.ignore_client_order = true;
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.send_tls13_tickets = 1;
    Ok((Arc::new(config), store))
}

/// keel's crypto provider with the cipher suites in the order a listener prefers them: the
/// AES-128-GCM suites first (TLS 1.3's mandatory suite, SHA-256 key schedule), then AES-256-GCM,
/// then ChaCha20-Poly1305.
///
/// SHA-384 costs more than SHA-256 (under *ring*, keel's provider when this was measured, it
/// ran in portable code and was a tenth of keel's CPU time in the handshake benchmark with the
/// client's usual preference, AES-256-GCM-SHA384 first). This is the order Go's and BoringSSL's servers use. A client
/// that offers only ChaCha20 (no AES hardware) still gets it.
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = (*provider()).clone();
    provider.cipher_suites.sort_by_key(|suite| match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(provider)
}

/// Wraps a listener's config in a tokio acceptor.
///
/// The caller should bound `acceptor.accept(tcp)` with a handshake timeout: a client that opens
/// a connection and sends nothing would otherwise hold it forever. Once accepted, choose the HTTP
/// version with [`negotiated_h2`].
pub fn acceptor(config: Arc<ServerConfig>) -> TlsAcceptor {
    TlsAcceptor::from(config)
}

/// Whether the client and keel agreed on HTTP/2 through ALPN; serve HTTP/1.1 otherwise.
///
/// Same as `stream.get_ref().1.alpn_protocol() == Some(b"h2")`; a client that sent no ALPN
/// gets HTTP/1.1, as RFC 9113 requires for `h2` over TLS.
pub fn negotiated_h2<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(H2)
}

/// A certificate as loaded into a [`CertStore`], for logs and the admin API (no key material).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedCertificate {
    /// The certificate chain file.
    pub cert: PathBuf,
    /// The private key file.
    pub key: PathBuf,
    /// DNS names the certificate is chosen for, lower case; `*.example.com` for wildcards.
    /// Empty for a default-only certificate.
    pub names: Vec<String>,
    /// End of the leaf's validity, in seconds since the Unix epoch (for expiry alerts).
    pub not_after: i64,
}

/// What a successful [`CertStore::reload`] loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Every certificate now served, in configuration order (the first is the default).
    pub certificates: Vec<LoadedCertificate>,
}

/// The certificates of one listener, and rustls' per-handshake choice among them.
///
/// Choice, for the SNI name a client sends (compared case-insensitively):
/// 1. a certificate with exactly that DNS name;
/// 2. a certificate with the wildcard `*.<parent>`, where `<parent>` is the name minus its first
///    label (a wildcard covers one label: `*.example.com` matches `a.example.com`, not
///    `example.com` nor `a.b.example.com`);
/// 3. otherwise, and for clients that send no SNI, the first certificate listed.
///
/// When several certificates carry the same name (say an ECDSA and an RSA one), the first listed
/// that can sign with a scheme the client offers wins, so old RSA-only clients still get the
/// RSA certificate.
///
/// Names come from the leaf's DNS subject alternative names; a certificate without any uses its
/// subject common name if that is a valid DNS name. A certificate with no name at all is accepted
/// only in first place, where it still serves as the default (clients connecting by IP address
/// send no SNI); anywhere else it could never be chosen, which is reported as
/// [`TlsError::NoNames`].
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    table: ArcSwap<Table>,
}

/// One complete, consistent index of certificates; replaced whole on reload.
struct Table {
    /// The files this table was loaded from, so [`CertStore::reload`] re-reads the same ones.
    files: Vec<CertificateFiles>,
    loaded: Vec<LoadedCertificate>,
    /// Exact DNS name → candidates, in configuration order.
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Parent of a wildcard (`example.com` for `*.example.com`) → candidates.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Arc<CertifiedKey>,
}

impl CertStore {
    /// Loads every certificate/key pair; fails on the first bad file, naming it.
    pub fn load(files: &[CertificateFiles]) -> Result<Self, TlsError> {
        Self::load_with(files, provider())
    }

    fn load_with(files: &[CertificateFiles], provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let table = Table::load(files, &provider)?;
        Ok(CertStore { provider, table: ArcSwap::from_pointee(table) })
    }

    /// Re-reads the same files and, only if every one of them is good, swaps the new
    /// certificates in for new handshakes; on error the old certificates all stay in use and the
    /// error names the bad file (the caller logs it).
    ///
    /// Connections already established are not affected either way.
    pub fn reload(&self) -> Result<ReloadSummary, TlsError> {
        let files = self.table.load().files.clone();
        self.reload_from(&files)
    }

    /// Like [`reload`](Self::reload), but with a new list of files (a configuration reload that
    /// changed only the listener's certificates). Later reloads re-read this list.
    pub fn reload_from(&self, files: &[CertificateFiles]) -> Result<ReloadSummary, TlsError> {
        let table = Table::load(files, &self.provider)?;
        let summary = ReloadSummary { certificates: table.loaded.clone() };
        self.table.store(Arc::new(table));
        // The caller logs the outcome with the listener's name.
        Ok(summary)
    }

    /// The certificates currently served, in configuration order.
    pub fn certificates(&self) -> Vec<LoadedCertificate> {
        self.table.load().loaded.clone()
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names and paths only: a CertifiedKey's Debug would print the chain, and nothing here
        // should come near printing key material.
        f.debug_struct("CertStore").field("certificates", &self.table.load().loaded).finish()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let schemes = hello.signature_schemes();
        if let Some(sni) = hello.server_name() {
            let name = normalize(sni);
            if let Some(found) = table.exact.get(&name).and_then(|c| pick(c, schemes)) {
                return Some(found);
            }
            let wildcard = name.split_once('.').and_then(|(_, parent)| table.wildcard.get(parent));
            if let Some(found) = wildcard.and_then(|c| pick(c, schemes)) {
                return Some(found);
            }
        }
        Some(table.default.clone())
    }
}

/// The first candidate able to sign with a scheme the client offers, else the first candidate
/// (the handshake will then fail, as it would with the only certificate).
fn pick(candidates: &[Arc<CertifiedKey>], schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
    candidates.iter().find(|c| c.key.choose_scheme(schemes).is_some()).or_else(|| candidates.first()).cloned()
}

/// DNS names compare case-insensitively and a trailing dot is the same name.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Table {
    fn load(files: &[CertificateFiles], provider: &CryptoProvider) -> Result<Table, TlsError> {
        let mut loaded = Vec::with_capacity(files.len());
        let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut default = None;
        for (i, pair) in files.iter().enumerate() {
            let (key, info) = load_listed_pair(i, pair, provider)?;
            for name in &info.names {
                let bucket = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name.clone()),
                };
                bucket.or_default().push(key.clone());
            }
            default.get_or_insert_with(|| key.clone());
            loaded.push(info);
        }
        let default = default.ok_or(TlsError::NoCertificates)?;
        Ok(Table { files: files.to_vec(), loaded, exact, wildcard, default })
    }
}

/// Loads every pair of a listener's `certificates` the way [`CertStore::load`] does, but does
/// not stop at the first bad one: each failure comes back with the pair's index. What
/// `keel config check` and the start of `keel run` use to report every bad file at once.
pub fn check_certificates(files: &[CertificateFiles]) -> Vec<(usize, TlsError)> {
    let provider = server_provider();
    files
        .iter()
        .enumerate()
        .filter_map(|(i, pair)| load_listed_pair(i, pair, &provider).err().map(|e| (i, e)))
        .collect()
}

/// [`load_pair`] for the `i`-th pair of a list: only the first certificate may lack a DNS name.
fn load_listed_pair(
    i: usize,
    pair: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, LoadedCertificate), TlsError> {
    let (key, info) = load_pair(pair, provider)?;
    if info.names.is_empty() {
        if i > 0 {
            return Err(TlsError::NoNames { path: pair.cert.clone() });
        }
        warn!(target: "keel::tls", cert = %pair.cert.display(),
            "certificate has no DNS name; it is only served to clients whose SNI matches no other certificate");
    }
    Ok((key, info))
}

/// Reads one certificate chain and its key, and checks that they belong together.
fn load_pair(
    pair: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, LoadedCertificate), TlsError> {
    let chain = read_certificates(&pair.cert)?;
    let leaf = chain.first().ok_or_else(|| TlsError::NoCertificate { path: pair.cert.clone() })?;
    // Parse the leaf before checking the key, so a malformed certificate is reported as such
    // rather than as a key mismatch.
    let (names, not_after) = leaf_names(leaf, &pair.cert)?;

    let key_der = read_private_key(&pair.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| TlsError::UnsupportedKey { path: pair.key.clone(), reason: e.to_string() })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        // Every ring key exposes its public key, so this is not expected; a key that cannot say
        // is given the benefit of the doubt, as rustls' own `CertifiedKey::from_der` does.
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            debug!(target: "keel::tls", key = %pair.key.display(), "cannot compare key with certificate")
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(TlsError::KeyMismatch { cert: pair.cert.clone(), key: pair.key.clone() })
        }
        Err(e) => return Err(TlsError::BadCertificate { path: pair.cert.clone(), reason: e.to_string() }),
    }

    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if not_after < i64::try_from(now).unwrap_or(i64::MAX) {
        warn!(target: "keel::tls", cert = %pair.cert.display(), "certificate has expired; clients will refuse it");
    }
    let info = LoadedCertificate { cert: pair.cert.clone(), key: pair.key.clone(), names, not_after };
    Ok((Arc::new(certified), info))
}

/// Reads a file whole, naming it on failure.
fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

/// Every `CERTIFICATE` section of a PEM file, in order (leaf first); other sections are skipped,
/// so a combined cert+key file works. Shared with the backend CA bundle.
pub(super) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(chain)
}

/// The first private key of a PEM file: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or
/// SEC1 (`EC PRIVATE KEY`).
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey { path: path.to_owned() },
        // The parser's message says what is malformed, never the key bytes.
        other => TlsError::Pem { path: path.to_owned(), reason: other.to_string() },
    })
}

/// The names a leaf certificate is chosen for, and the end of its validity.
fn leaf_names(leaf: &CertificateDer<'_>, path: &Path) -> Result<(Vec<String>, i64), TlsError> {
    let bad = |reason: String| TlsError::BadCertificate { path: path.to_owned(), reason };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
    let mut names = Vec::new();
    let san = cert.subject_alternative_name().map_err(|e| bad(e.to_string()))?;
    for general in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::DNSName(name) = general {
            push_name(&mut names, name, path);
        }
    }
    if names.is_empty() {
        // Pre-SAN practice; clients that check names will mostly refuse it, but it is what the
        // operator meant.
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                push_name(&mut names, cn, path);
            }
        }
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Adds `raw` to `names` if it is a DNS name or a one-label wildcard; anything else (an email
/// address in the CN, `f*.example.com`) is skipped with a debug log.
fn push_name(names: &mut Vec<String>, raw: &str, path: &Path) {
    let name = normalize(raw);
    let base = name.strip_prefix("*.").unwrap_or(&name);
    if base.contains('*') || DnsName::try_from(base).is_err() {
        debug!(target: "keel::tls", cert = %path.display(), name = raw, "ignoring name that is not a DNS name");
        return;
    }
    if !names.contains(&name) {
        names.push(name);
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::tls::testutil::{
        handshake, handshake_with, key, served, Ca, Client, TempDir, P256_PKCS8, P256_SEC1, RSA_PKCS1, RSA_PKCS8,
    };

    fn listener(certificates: Vec<CertificateFiles>) -> ListenerTls {
        ListenerTls { certificates, min_version: TlsVersion::Tls12, http2: true }
    }

    fn config(certificates: Vec<CertificateFiles>) -> (Arc<ServerConfig>, Arc<CertStore>) {
        server_config(&listener(certificates)).unwrap()
    }

    /// The certificate a default client receives for `sni`.
    async fn chosen(config: &Arc<ServerConfig>, sni: Option<&str>) -> CertificateDer<'static> {
        let (_, client) = handshake(config, &Client::default(), sni).await.unwrap();
        served(&client)
    }

    #[tokio::test]
    async fn sni_chooses_the_certificate_with_that_name() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = ca.leaf(&["a.test"]);
        let b = ca.leaf(&["b.test", "www.b.test"]);
        let (config, store) = config(vec![dir.pair("a", &a), dir.pair("b", &b)]);

        assert_eq!(chosen(&config, Some("a.test")).await, a.der);
        assert_eq!(chosen(&config, Some("b.test")).await, b.der);
        assert_eq!(chosen(&config, Some("www.b.test")).await, b.der);
        let names: Vec<_> = store.certificates().into_iter().map(|c| c.names).collect();
        assert_eq!(names, [vec!["a.test"], vec!["b.test", "www.b.test"]]);
    }

    #[tokio::test]
    async fn wildcard_covers_exactly_one_label_and_exact_names_win() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let default = ca.leaf(&["default.test"]);
        let wild = ca.leaf(&["*.wild.test"]);
        let exact = ca.leaf(&["exact.wild.test"]);
        let (config, _) = config(vec![dir.pair("d", &default), dir.pair("w", &wild), dir.pair("e", &exact)]);

        assert_eq!(chosen(&config, Some("x.wild.test")).await, wild.der);
        assert_eq!(chosen(&config, Some("exact.wild.test")).await, exact.der);
        assert_eq!(chosen(&config, Some("wild.test")).await, default.der, "the wildcard does not cover its parent");
        assert_eq!(chosen(&config, Some("a.b.wild.test")).await, default.der, "nor two labels");
    }

    #[tokio::test]
    async fn names_compare_case_insensitively() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = ca.leaf(&["a.test"]);
        let b = ca.leaf(&["B.Test", "*.Wild.Test"]);
        let (config, _) = config(vec![dir.pair("a", &a), dir.pair("b", &b)]);

        assert_eq!(chosen(&config, Some("b.test")).await, b.der);
        assert_eq!(chosen(&config, Some("X.WILD.test")).await, b.der);
    }

    #[tokio::test]
    async fn no_sni_or_unknown_name_gets_the_first_certificate() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = ca.leaf(&["a.test"]);
        let b = ca.leaf(&["b.test"]);
        let (config, _) = config(vec![dir.pair("a", &a), dir.pair("b", &b)]);

        assert_eq!(chosen(&config, None).await, a.der);
        assert_eq!(chosen(&config, Some("unknown.test")).await, a.der);
    }

    #[tokio::test]
    async fn same_name_prefers_a_certificate_the_client_can_verify() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let ecdsa = ca.leaf(&["dual.test"]);
        let rsa = ca.leaf_with_key(&["dual.test"], KeyPair::from_pem(RSA_PKCS8).unwrap());
        let (config, _) = config(vec![dir.pair("ecdsa", &ecdsa), dir.pair("rsa", &rsa)]);

        assert_eq!(chosen(&config, Some("dual.test")).await, ecdsa.der);
        let rsa_only = Client { schemes: Some(vec![SignatureScheme::RSA_PSS_SHA256]), ..Client::default() };
        let (_, client) = handshake(&config, &rsa_only, Some("dual.test")).await.unwrap();
        assert_eq!(served(&client), rsa.der);
    }

    #[tokio::test]
    async fn aes_128_gcm_is_chosen_over_the_clients_first_choice() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (config, _) = config(vec![dir.pair("a", &ca.leaf(&["a.test"]))]);
        // rustls clients, like OpenSSL's, offer AES-256-GCM first.
        let (_, client) = handshake(&config, &Client::default(), Some("a.test")).await.unwrap();
        let suite = client.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(suite, Some(CipherSuite::TLS13_AES_128_GCM_SHA256));
        let (_, client) = handshake(&config, &Client::tls12_only(), Some("a.test")).await.unwrap();
        let suite = client.get_ref().1.negotiated_cipher_suite().map(|s| s.suite());
        assert_eq!(suite, Some(CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
    }

    #[tokio::test]
    async fn sessions_resume_from_tickets_beyond_any_cache_size() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (config, _) = config(vec![dir.pair("a", &ca.leaf(&["a.test"]))]);
        // More clients than rustls' default stateful cache holds (256): stateless tickets keep
        // no state on the server, so every one of them resumes.
        let clients: Vec<_> = (0..300).map(|_| Arc::new(Client::default().config(true))).collect();
        for client in &clients {
            let (mut server, mut conn) = handshake_with(&config, client.clone(), Some("a.test")).await.unwrap();
            assert_eq!(conn.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
            // The ticket follows the handshake; the client takes it in with the next read.
            server.write_all(b"x").await.unwrap();
            server.flush().await.unwrap();
            conn.read_exact(&mut [0u8; 1]).await.unwrap();
        }
        for client in &clients {
            let (_, conn) = handshake_with(&config, client.clone(), Some("a.test")).await.unwrap();
            assert_eq!(conn.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
        }
    }

    #[tokio::test]
    async fn alpn_negotiates_h2_when_offered_and_http11_otherwise() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let files = vec![dir.pair("a", &ca.leaf(&["a.test"]))];
        let (h2_listener, _) = config(files.clone());

        let (server, client) = handshake(&h2_listener, &Client::alpn(&[H2, HTTP11]), Some("a.test")).await.unwrap();
        assert!(negotiated_h2(&server));
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(H2));

        let (server, client) = handshake(&h2_listener, &Client::alpn(&[HTTP11]), Some("a.test")).await.unwrap();
        assert!(!negotiated_h2(&server));
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(HTTP11));

        let (server, client) = handshake(&h2_listener, &Client::default(), Some("a.test")).await.unwrap();
        assert!(!negotiated_h2(&server), "no ALPN means HTTP/1.1");
        assert_eq!(client.get_ref().1.alpn_protocol(), None);

        let (http1_listener, _) = server_config(&ListenerTls { http2: false, ..listener(files) }).unwrap();
        let (server, client) = handshake(&http1_listener, &Client::alpn(&[H2, HTTP11]), Some("a.test")).await.unwrap();
        assert!(!negotiated_h2(&server));
        assert_eq!(client.get_ref().1.alpn_protocol(), Some(HTTP11));
    }

    #[tokio::test]
    async fn min_version_13_refuses_a_tls12_client() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let files = vec![dir.pair("a", &ca.leaf(&["a.test"]))];
        let (tls13, _) =
            server_config(&ListenerTls { min_version: TlsVersion::Tls13, ..listener(files.clone()) }).unwrap();
        let (tls12, _) = config(files);

        let refused = handshake(&tls13, &Client::tls12_only(), Some("a.test")).await.err().unwrap();
        assert!(refused.contains("ProtocolVersion"), "{refused}");
        let (_, client) = handshake(&tls13, &Client::default(), Some("a.test")).await.unwrap();
        assert_eq!(client.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));

        let (_, client) = handshake(&tls12, &Client::tls12_only(), Some("a.test")).await.unwrap();
        assert_eq!(client.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    }

    #[tokio::test]
    async fn reload_serves_new_certificate_to_new_handshakes_and_keeps_open_connections() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let old = ca.leaf(&["a.test"]);
        let (config, store) = config(vec![dir.pair("a", &old)]);

        let (mut server, mut client) = handshake(&config, &Client::default(), Some("a.test")).await.unwrap();
        client.write_all(b"before").await.unwrap();
        let mut buf = [0u8; 6];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"before");

        let new = ca.leaf(&["a.test", "new.test"]);
        dir.pair("a", &new);
        let summary = store.reload().unwrap();
        assert_eq!(summary.certificates.len(), 1);
        assert_eq!(summary.certificates[0].names, ["a.test", "new.test"]);

        assert_eq!(chosen(&config, Some("a.test")).await, new.der);
        assert_eq!(chosen(&config, Some("new.test")).await, new.der);

        // The connection made before the reload still works, both ways, with its old certificate.
        client.write_all(b"after!").await.unwrap();
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"after!");
        server.write_all(b"reply!").await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"reply!");
        assert_eq!(served(&client), old.der);
    }

    #[test]
    fn check_certificates_reports_every_bad_pair_with_its_index() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test"]));
        let good = dir.pair("a", &a);
        let missing = CertificateFiles { cert: dir.path("gone.crt"), key: dir.path("gone.key") };
        let mut mismatched = dir.pair("b", &b);
        mismatched.key = good.key.clone();
        assert!(check_certificates(std::slice::from_ref(&good)).is_empty());
        let found = check_certificates(&[good.clone(), missing.clone(), mismatched.clone()]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(matches!(&found[0], (1, TlsError::Read { path, .. }) if *path == missing.cert), "{found:?}");
        assert!(matches!(&found[1], (2, TlsError::KeyMismatch { key, .. }) if *key == good.key), "{found:?}");
    }

    #[tokio::test]
    async fn reload_with_a_bad_file_keeps_every_old_certificate() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = ca.leaf(&["a.test"]);
        let b = ca.leaf(&["b.test"]);
        let (config, store) = config(vec![dir.pair("a", &a), dir.pair("b", &b)]);
        let replacement = ca.leaf(&["a.test"]);
        // A good new `a` next to a broken `b`: nothing at all may change.
        let good_a = dir.pair("a", &replacement);
        let (b_cert, b_key) = (dir.path("b.crt"), dir.path("b.key"));

        let garbage = "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n";
        type Expected<'a> = Box<dyn Fn(&TlsError) -> bool + 'a>;
        let broken: Vec<(&str, &str, Expected<'_>)> = vec![
            ("b.crt", garbage, Box::new(|e| matches!(e, TlsError::Pem { path, .. } if *path == b_cert))),
            ("b.crt", "hello\n", Box::new(|e| matches!(e, TlsError::NoCertificate { path } if *path == b_cert))),
            ("b.key", &b.cert_pem, Box::new(|e| matches!(e, TlsError::NoPrivateKey { path } if *path == b_key))),
            ("b.key", &a.key_pem, Box::new(|e| matches!(e, TlsError::KeyMismatch { key, .. } if *key == b_key))),
        ];
        for (file, contents, expected) in broken {
            dir.pair("b", &b);
            dir.write(file, contents);
            let error = store.reload().unwrap_err();
            assert!(expected(&error), "{file}: {error:?}");
            assert!(error.to_string().contains(file), "the message names the file: {error}");
            assert_eq!(chosen(&config, Some("a.test")).await, a.der, "{file}: old a still served");
            assert_eq!(chosen(&config, Some("b.test")).await, b.der, "{file}: old b still served");
        }

        dir.pair("b", &b);
        std::fs::remove_file(&b_key).unwrap();
        let error = store.reload().unwrap_err();
        assert!(matches!(&error, TlsError::Read { path, .. } if *path == b_key), "{error:?}");
        assert_eq!(chosen(&config, Some("a.test")).await, a.der);

        dir.pair("b", &b);
        store.reload().unwrap();
        assert_eq!(chosen(&config, Some("a.test")).await, replacement.der);
        assert_eq!(store.certificates()[0].cert, good_a.cert);
    }

    #[tokio::test]
    async fn every_key_type_and_encoding_loads_and_signs() {
        let ca = Ca::new();
        let cases = [
            ("ed25519", ca.leaf_with_key(&["k.test"], key(&rcgen::PKCS_ED25519)), None),
            ("p256", ca.leaf_with_key(&["k.test"], key(&rcgen::PKCS_ECDSA_P256_SHA256)), None),
            ("p384", ca.leaf_with_key(&["k.test"], key(&rcgen::PKCS_ECDSA_P384_SHA384)), None),
            ("p256-sec1", ca.leaf_with_key(&["k.test"], KeyPair::from_pem(P256_PKCS8).unwrap()), Some(P256_SEC1)),
            ("rsa-pkcs8", ca.leaf_with_key(&["k.test"], KeyPair::from_pem(RSA_PKCS8).unwrap()), None),
            ("rsa-pkcs1", ca.leaf_with_key(&["k.test"], KeyPair::from_pem(RSA_PKCS8).unwrap()), Some(RSA_PKCS1)),
        ];
        for (label, leaf, key_pem) in cases {
            let dir = TempDir::new();
            let mut files = dir.pair("k", &leaf);
            if let Some(pem) = key_pem {
                files.key = dir.write("k.other.key", pem);
            }
            let (config, _) = server_config(&listener(vec![files])).unwrap_or_else(|e| panic!("{label}: {e}"));
            for client in [Client::default(), Client::tls12_only()] {
                let (_, client) =
                    handshake(&config, &client, Some("k.test")).await.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(served(&client), leaf.der, "{label}");
            }
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = dir.pair("a", &ca.leaf(&["a.test"]));

        assert!(matches!(CertStore::load(&[]), Err(TlsError::NoCertificates)));

        let missing = CertificateFiles { cert: dir.path("nope.crt"), key: a.key.clone() };
        let error = CertStore::load(&[missing]).unwrap_err();
        assert!(matches!(&error, TlsError::Read { path, .. } if *path == dir.path("nope.crt")), "{error:?}");
        assert!(error.to_string().contains("nope.crt"), "{error}");

        // A well-formed PKCS#8 wrapper around bytes that are no key ring knows.
        let junk =
            "-----BEGIN PRIVATE KEY-----\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n-----END PRIVATE KEY-----\n";
        let unsupported = CertificateFiles { cert: a.cert.clone(), key: dir.write("junk.key", junk) };
        let error = CertStore::load(&[unsupported]).unwrap_err();
        assert!(matches!(&error, TlsError::UnsupportedKey { path, .. } if *path == dir.path("junk.key")), "{error:?}");
    }

    #[tokio::test]
    async fn a_certificate_without_names_may_only_be_the_default() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        // rcgen's default subject CN, "rcgen self signed cert", is no DNS name.
        let nameless = ca.leaf(&[]);
        let a = ca.leaf(&["a.test"]);

        let (config, store) = config(vec![dir.pair("nameless", &nameless), dir.pair("a", &a)]);
        assert!(store.certificates()[0].names.is_empty());
        assert_eq!(chosen(&config, None).await, nameless.der);
        assert_eq!(chosen(&config, Some("a.test")).await, a.der);

        let error = CertStore::load(&[dir.pair("a", &a), dir.pair("nameless", &nameless)]).unwrap_err();
        assert!(matches!(&error, TlsError::NoNames { path } if *path == dir.path("nameless.crt")), "{error:?}");
    }

    #[tokio::test]
    async fn subject_cn_names_a_certificate_without_dns_sans() {
        let (ca, dir) = (Ca::new(), TempDir::new());
        let a = ca.leaf(&["a.test"]);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "cn.test");
        let cn = ca.issue(params, key(&rcgen::PKCS_ECDSA_P256_SHA256));

        let (config, store) = config(vec![dir.pair("a", &a), dir.pair("cn", &cn)]);
        assert_eq!(store.certificates()[1].names, ["cn.test"]);
        assert_eq!(chosen(&config, Some("cn.test")).await, cn.der);
    }
}
