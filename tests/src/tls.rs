//! TLS for the tests: a certificate authority generated at test time, rustls clients that show
//! which certificate and protocol a server chose, and HTTP/1.1 or HTTP/2 over any stream.
//!
//! Certificates are ECDSA P-256, made with rcgen per test (they never expire and no key is
//! checked in). [`TestCa::leaf`] issues a leaf for DNS names; [`Leaf::write`] puts its chain and
//! key into a test directory as PEM files for keel's config.
//!
//! [`TlsClient`] connects with a chosen SNI (or none: [`TlsClient::no_sni`]), ALPN list and
//! protocol versions. It verifies the server against the CA ([`TlsClient::verified`]) or, to
//! see *which* certificate a server picks whatever its name, accepts any certificate while still
//! checking the handshake signature ([`TlsClient::any_cert`]). Every handshake is bounded by
//! [`HANDSHAKE`].
//!
//! Everything uses rustls' *ring* provider explicitly, never a process-wide default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::client::{collect_reply, Reply};
use crate::tempdir::TempDir;
use crate::wait::REQUEST;

/// Time a TLS handshake (TCP connect included) may take.
pub const HANDSHAKE: Duration = Duration::from_secs(5);

/// The crypto provider every config here is built with: rustls' *ring*.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test certificate authority (self-signed, P-256), distinct per instance.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate issued by a [`TestCa`], with its private key.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER: compare with what a client saw.
    pub der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

impl Leaf {
    /// Writes `STEM.pem` (certificate) and `STEM.key` (key) into `dir`; returns both paths.
    pub fn write(&self, dir: &TempDir, stem: &str) -> Result<(PathBuf, PathBuf)> {
        Ok((dir.write(&format!("{stem}.pem"), &self.cert_pem)?, dir.write(&format!("{stem}.key"), &self.key_pem)?))
    }

    /// The key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl TestCa {
    /// A new CA; each has its own subject, so another CA's certificates are unknown issuers.
    pub fn new() -> Result<TestCa> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("keel-tests CA {}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        Ok(TestCa { issuer: CertifiedIssuer::self_signed(params, key)? })
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate as the only root of a store.
    pub fn roots(&self) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).context("adding the test CA to a root store")?;
        Ok(roots)
    }

    /// Writes the CA certificate as `NAME` into `dir`.
    pub fn write(&self, dir: &TempDir, name: &str) -> Result<PathBuf> {
        dir.write(name, &self.pem())
    }

    /// A P-256 leaf for `names` (DNS names, `*.x.test` wildcards, or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> Result<Leaf> {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }
}

/// Accepts any server certificate but checks the handshake signature against it, so the test
/// sees which certificate a server chose regardless of the name asked for.
#[derive(Debug)]
struct AcceptAny;

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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client connects: trust, SNI, ALPN, versions.
#[derive(Clone, Debug)]
pub struct TlsClient {
    roots: Option<RootCertStore>,
    sni: bool,
    alpn: Vec<Vec<u8>>,
    versions: Vec<&'static SupportedProtocolVersion>,
}

/// What a finished handshake negotiated.
#[derive(Debug)]
pub struct Handshake {
    /// The stream, ready for application data.
    pub stream: TlsStream<TcpStream>,
    /// The server's leaf certificate.
    pub cert: CertificateDer<'static>,
    /// The ALPN protocol chosen, if any.
    pub alpn: Option<Vec<u8>>,
    /// The protocol version.
    pub version: Option<rustls::ProtocolVersion>,
}

impl TlsClient {
    /// Verifies the server's chain against `ca` and its name against the SNI name.
    pub fn verified(ca: &TestCa) -> Result<TlsClient> {
        Ok(TlsClient { roots: Some(ca.roots()?), sni: true, alpn: Vec::new(), versions: all_versions() })
    }

    /// Accepts any certificate (signature still checked): for looking at which one was served.
    pub fn any_cert() -> TlsClient {
        TlsClient { roots: None, sni: true, alpn: Vec::new(), versions: all_versions() }
    }

    /// Sends no SNI extension (`ClientConfig::enable_sni = false`).
    pub fn no_sni(mut self) -> TlsClient {
        self.sni = false;
        self
    }

    /// Offers these ALPN protocols, e.g. `[b"h2", b"http/1.1"]`.
    pub fn alpn(mut self, protocols: &[&[u8]]) -> TlsClient {
        self.alpn = protocols.iter().map(|p| p.to_vec()).collect();
        self
    }

    /// Only TLS 1.2.
    pub fn tls12_only(mut self) -> TlsClient {
        self.versions = vec![&rustls::version::TLS12];
        self
    }

    /// Only TLS 1.3.
    pub fn tls13_only(mut self) -> TlsClient {
        self.versions = vec![&rustls::version::TLS13];
        self
    }

    fn config(&self) -> Result<ClientConfig> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&self.versions)
            .context("protocol versions")?;
        let mut config = match &self.roots {
            Some(roots) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
            None => builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAny)).with_no_client_auth(),
        };
        config.enable_sni = self.sni;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }

    /// Connects to `addr` and completes a handshake naming `server_name` (sent as SNI unless
    /// [`no_sni`](TlsClient::no_sni); always used to verify a [`verified`](TlsClient::verified)
    /// client's server), within [`HANDSHAKE`].
    pub async fn connect(&self, addr: SocketAddr, server_name: &str) -> Result<Handshake> {
        let connector = TlsConnector::from(Arc::new(self.config()?));
        let name =
            ServerName::try_from(server_name.to_owned()).with_context(|| format!("server name {server_name:?}"))?;
        let fut = async {
            let tcp = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .with_context(|| format!("TLS handshake with {addr} as {server_name:?}"))?;
            let (_, conn) = stream.get_ref();
            let cert = conn
                .peer_certificates()
                .and_then(|c| c.first())
                .cloned()
                .ok_or_else(|| anyhow!("the server sent no certificate"))?;
            let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
            let version = conn.protocol_version();
            Ok(Handshake { stream, cert, alpn, version })
        };
        tokio::time::timeout(HANDSHAKE, fut)
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr}: no answer in {HANDSHAKE:?}"))?
    }
}

fn all_versions() -> Vec<&'static SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

/// An HTTP/1.1 or HTTP/2 connection over any stream (TLS or not), keep-alive, for several
/// requests in a row.
pub enum HttpConn {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    /// HTTP/2.
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HttpConn::H1(_) => "HttpConn::H1",
            HttpConn::H2(_) => "HttpConn::H2",
        })
    }
}

impl HttpConn {
    /// HTTP/1.1 over `io`; the connection task runs on the current runtime.
    pub async fn http1<IO>(io: IO) -> Result<HttpConn>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.context("HTTP/1 handshake")?;
        tokio::spawn(conn);
        Ok(HttpConn::H1(send))
    }

    /// HTTP/2 over `io` (prior knowledge, or after ALPN chose `h2`).
    pub async fn http2<IO>(io: IO) -> Result<HttpConn>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(conn);
        Ok(HttpConn::H2(send))
    }

    /// Sends a GET for `path` with `Host`/authority `host`, reads the whole reply within
    /// [`REQUEST`].
    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply> {
        let req = match self {
            HttpConn::H1(_) => Request::get(path).header(http::header::HOST, host),
            HttpConn::H2(_) => Request::get(format!("https://{host}{path}")),
        }
        .body(Full::new(Bytes::new()))?;
        self.send(req).await
    }

    /// Sends `req` and reads the whole reply within [`REQUEST`].
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            let resp = match self {
                HttpConn::H1(s) => {
                    s.ready().await.context("connection not ready")?;
                    s.send_request(req).await
                }
                HttpConn::H2(s) => {
                    s.ready().await.context("connection not ready")?;
                    s.send_request(req).await
                }
            }
            .with_context(|| format!("{what} failed"))?;
            collect_reply(resp).await
        };
        tokio::time::timeout(REQUEST, fut).await.map_err(|_| anyhow!("{what}: no complete response in {REQUEST:?}"))?
    }
}

/// Opens a TLS connection with `client` (naming `server_name`) and GETs `path` over HTTP/1.1,
/// or HTTP/2 when ALPN chose `h2`; returns the handshake facts and the reply.
pub async fn https_get(client: &TlsClient, addr: SocketAddr, server_name: &str, path: &str) -> Result<Reply> {
    let hs = client.connect(addr, server_name).await?;
    let mut conn = if hs.alpn.as_deref() == Some(b"h2") {
        HttpConn::http2(hs.stream).await?
    } else {
        HttpConn::http1(hs.stream).await?
    };
    conn.get(server_name, path).await
}

/// The DNS names (subject alternative names) of a DER certificate, for error messages.
pub fn describe(cert: &CertificateDer<'_>, known: &[(&str, &Leaf)]) -> String {
    known
        .iter()
        .find(|(_, l)| l.der.as_ref() == cert.as_ref())
        .map(|(n, _)| format!("the {n} certificate"))
        .unwrap_or_else(|| format!("an unknown certificate ({} bytes)", cert.len()))
}

/// Fails unless `got` is `want`, naming both among `known`.
pub fn expect_cert(what: &str, got: &CertificateDer<'_>, want: &Leaf, known: &[(&str, &Leaf)]) -> Result<()> {
    if got.as_ref() != want.der.as_ref() {
        bail!("{what}: expected {}, got {}", describe(&want.der, known), describe(got, known));
    }
    Ok(())
}
