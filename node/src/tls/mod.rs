//! TLS for keel: terminating client connections on `https` listeners ([`server`]) and speaking
//! TLS to a pool's servers ([`client`]).
//!
//! Everything here is built on rustls with the aws-lc-rs provider passed explicitly
//! ([`provider`]), never on the process-wide default: nothing in keel depends on which crate
//! happened to install a default provider first, and tests need no global set-up.
//!
//! What the proxy does with this module:
//!
//! - per `https` listener, [`server_config`] once; accept with [`acceptor`], choose HTTP/2 or
//!   HTTP/1.1 with [`negotiated_h2`]; on SIGHUP or an admin request, [`CertStore::reload`].
//! - per pool with TLS settings, [`UpstreamTls::new`] once; keel's HTTP/1.1 client wraps each
//!   new server connection with [`UpstreamTls::connect`].
//!
//! Errors are [`TlsError`]s that name the file and what is wrong with it; key material is never
//! logged or put in an error.

pub mod client;
pub mod server;

#[cfg(test)]
mod testutil;

use std::path::PathBuf;
use std::sync::Arc;

pub use client::UpstreamTls;
pub use server::{
    acceptor, check_certificates, negotiated_h2, server_config, CertStore, LoadedCertificate, ReloadSummary,
};

/// The crypto provider every TLS config in keel is built with: rustls' aws-lc-rs provider.
///
/// Chosen over *ring* (keel's provider until then) by measurement, bench/run in one run: a
/// full handshake (case 5) 164.9 → 156.6 CPU µs, TLS keep-alive (case 4) 20.1 → 18.6. In the
/// handshake profile *ring*'s X25519 (portable field arithmetic) was ≈ 29 % of keel's samples;
/// AWS-LC has assembly for it and for AES-GCM. It builds with the C compiler *ring* already
/// needed (no CMake on Linux x86-64/aarch64). *ring* stays compiled in for the sticky cookie's
/// HMAC, whose output must not change.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a listener's certificates or a pool's TLS settings could not be loaded.
///
/// Every variant that concerns a file names it, so the operator can fix the right one; none
/// carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read (missing, permissions, …).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid PEM (bad base64, unterminated section).
    #[error("{}: invalid PEM: {reason}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("{}: no certificate in file", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file's certificate is not a valid X.509 certificate.
    #[error("{}: invalid certificate: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What the parser or the trust store said.
        reason: String,
    },
    /// The file holds no private key (PKCS#8, PKCS#1 or SEC1).
    #[error("{}: no private key in file", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not one rustls/ring can sign with (RSA ≥ 2048 bits, ECDSA P-256/P-384,
    /// Ed25519).
    #[error("{}: unsupported private key: {reason}", path.display())]
    UnsupportedKey {
        /// The file.
        path: PathBuf,
        /// What the key loader said.
        reason: String,
    },
    /// The private key is not the one the certificate was issued for.
    #[error("{}: private key does not match certificate {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A certificate other than the first has no DNS name (no DNS SAN, no subject CN): it could
    /// never be chosen, since only the first certificate serves clients whose SNI matches nothing.
    ///
    /// The *first* certificate without names is accepted with a warning: it can still serve as
    /// the default (clients connecting by IP address send no SNI).
    #[error("{}: certificate has no DNS name (SAN or CN), so only the first certificate may lack one", path.display())]
    NoNames {
        /// The certificate file.
        path: PathBuf,
    },
    /// A listener with TLS lists no certificate.
    #[error("no certificate configured")]
    NoCertificates,
    /// `server_name` of a pool's TLS settings is not a valid DNS name or IP address.
    #[error("invalid server_name {name:?}: {reason}")]
    BadServerName {
        /// The configured name.
        name: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No CA was configured and the system trust store yielded no certificate.
    #[error("no system root certificates found ({reason}); configure `ca` for this pool")]
    NoSystemRoots {
        /// What loading the system store reported.
        reason: String,
    },
    /// rustls refused the configuration (should not happen with the versions keel asks for).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}
