//! Test helpers for the TLS module: a throwaway directory, a test CA issuing certificates with
//! rcgen at test time, in-memory handshakes against a listener config, and small HTTP servers
//! for the backend connector.
//!
//! Certificates are generated per test rather than checked in, so they never expire and every
//! test gets its own keys. The exception is `testdata/`: ring cannot generate RSA keys, and
//! rcgen writes only PKCS#8, so the RSA key and the PKCS#1/SEC1 encodings come from fixed files
//! made once with openssl.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use keel_cluster::edge::CertificateFiles;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SignatureAlgorithm};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme, SupportedProtocolVersion};
use tokio::io::DuplexStream;
use tokio::net::TcpListener;

/// RSA-2048 key, PKCS#8 (`PRIVATE KEY`).
pub const RSA_PKCS8: &str = include_str!("testdata/rsa2048.pkcs8.pem");
/// The same RSA key, PKCS#1 (`RSA PRIVATE KEY`).
pub const RSA_PKCS1: &str = include_str!("testdata/rsa2048.pkcs1.pem");
/// ECDSA P-256 key, PKCS#8.
pub const P256_PKCS8: &str = include_str!("testdata/p256.pkcs8.pem");
/// The same P-256 key, SEC1 (`EC PRIVATE KEY`, with curve parameters, as openssl writes it).
pub const P256_SEC1: &str = include_str!("testdata/p256.sec1.pem");

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let unique = format!("keel-tls-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// Writes a leaf's chain and key as `<stem>.crt` / `<stem>.key`.
    pub fn pair(&self, stem: &str, leaf: &Leaf) -> CertificateFiles {
        CertificateFiles {
            cert: self.write(&format!("{stem}.crt"), &leaf.cert_pem),
            key: self.write(&format!("{stem}.key"), &leaf.key_pem),
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A certificate issued by a [`Ca`], with its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

/// A test certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Ca {
        // A distinct subject per CA, so a certificate from another test CA is an unknown issuer
        // rather than a bad signature from a same-named one.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("keel test CA {}", NEXT.fetch_add(1, Ordering::Relaxed)));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Ca { issuer: CertifiedIssuer::self_signed(params, key).unwrap() }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A P-256 leaf for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.leaf_with_key(names, key(&rcgen::PKCS_ECDSA_P256_SHA256))
    }

    pub fn leaf_with_key(&self, names: &[&str], key: KeyPair) -> Leaf {
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        self.issue(params, key)
    }

    pub fn issue(&self, params: CertificateParams, key: KeyPair) -> Leaf {
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }
}

pub fn key(alg: &'static SignatureAlgorithm) -> KeyPair {
    KeyPair::generate_for(alg).unwrap()
}

/// A client verifier that accepts any certificate but still checks the handshake signature
/// against it (so a server signing with the wrong key fails), offering `schemes` when given:
/// the tests look at *which* certificate the server chose, not at its name.
#[derive(Debug)]
struct AcceptAny {
    schemes: Option<Vec<SignatureScheme>>,
}

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = super::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = super::provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match &self.schemes {
            Some(schemes) => schemes.clone(),
            None => super::provider().signature_verification_algorithms.supported_schemes(),
        }
    }
}

/// How the test client connects.
pub struct Client {
    pub versions: Vec<&'static SupportedProtocolVersion>,
    pub alpn: Vec<&'static [u8]>,
    pub schemes: Option<Vec<SignatureScheme>>,
}

impl Default for Client {
    fn default() -> Client {
        Client { versions: vec![&rustls::version::TLS13, &rustls::version::TLS12], alpn: vec![], schemes: None }
    }
}

impl Client {
    pub fn tls12_only() -> Client {
        Client { versions: vec![&rustls::version::TLS12], ..Client::default() }
    }

    pub fn alpn(alpn: &[&'static [u8]]) -> Client {
        Client { alpn: alpn.to_vec(), ..Client::default() }
    }

    /// The rustls config this client connects with; reuse it to resume sessions.
    pub fn config(&self, sni: bool) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(&self.versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny { schemes: self.schemes.clone() }))
            .with_no_client_auth();
        config.alpn_protocols = self.alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = sni;
        config
    }
}

pub type ServerSide = tokio_rustls::server::TlsStream<DuplexStream>;
pub type ClientSide = tokio_rustls::client::TlsStream<DuplexStream>;

/// One handshake over an in-memory pipe; `sni: None` sends no SNI. The error is the client's
/// view, as a string.
pub async fn handshake(
    config: &Arc<ServerConfig>,
    client: &Client,
    sni: Option<&str>,
) -> Result<(ServerSide, ClientSide), String> {
    handshake_with(config, Arc::new(client.config(sni.is_some())), sni).await
}

/// [`handshake`] with a client config of the caller's, whose session store carries over.
pub async fn handshake_with(
    config: &Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sni: Option<&str>,
) -> Result<(ServerSide, ClientSide), String> {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let acceptor = super::acceptor(config.clone());
    let connector = tokio_rustls::TlsConnector::from(client);
    let name = ServerName::try_from(sni.unwrap_or("localhost").to_owned()).unwrap();
    let (server, client) = tokio::join!(acceptor.accept(server_io), connector.connect(name, client_io));
    match (server, client) {
        (Ok(server), Ok(client)) => Ok((server, client)),
        (_, Err(e)) => Err(e.to_string()),
        (Err(e), Ok(_)) => Err(format!("server: {e}")),
    }
}

/// The leaf certificate the client received.
pub fn served(client: &ClientSide) -> CertificateDer<'static> {
    client.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

/// An HTTPS (or, without a config, plain HTTP) server answering `200 ok` to everything; records
/// the ALPN protocol of each TLS connection.
pub async fn http_server(config: Option<Arc<ServerConfig>>) -> (SocketAddr, Arc<Mutex<Vec<Option<Vec<u8>>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let alpn = Arc::new(Mutex::new(Vec::new()));
    let seen = alpn.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let config = config.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from("ok"))))
                });
                let http = hyper::server::conn::http1::Builder::new();
                match config {
                    Some(config) => {
                        let Ok(tls) = super::acceptor(config).accept(tcp).await else { return };
                        seen.lock().unwrap().push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                        let _ = http.serve_connection(TokioIo::new(tls), service).await;
                    }
                    None => {
                        let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                    }
                }
            });
        }
    });
    (addr, alpn)
}

/// An error and all its sources, for asserting on the underlying cause.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
