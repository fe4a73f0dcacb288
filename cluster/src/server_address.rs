//! A server's configured `address`: an IP literal with a port (used as is, the fast path) or a
//! DNS name with a port (resolved at run time by the node, see `keel-node`'s `resolve` module).
//!
//! Wire and storage compatibility: the address is written as one string in every format — the
//! same text a `SocketAddr` wrote before names were accepted ("10.0.1.1:8080", "[::1]:80") — so
//! configs stored in Raft logs and snapshots by older versions decode unchanged, and an IP
//! literal round-trips to the identical bytes.
//!
//! Reading never fails on a string: text that is neither `IP:PORT` nor `HOST:PORT` becomes
//! [`ServerAddress::Invalid`], which [`crate::model::Config::validate`] reports with its key path
//! alongside every other problem (a serde error would stop at the first one, without the key).
//!
//! Names of the servers a DNS entry expands into ([`resolved_name`]): `ENTRY@IP:PORT`, e.g.
//! `app@10.0.0.5:8080`. `@` rather than `#`: the name goes into admin API paths
//! (`/pools/web/servers/app@10.0.0.5:8080/drain`), where `#` would start a URL fragment.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Longest DNS name accepted (RFC 1035: 255 octets on the wire, 253 as text).
pub const MAX_HOST_LEN: usize = 253;

/// Where a configured server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ServerAddress {
    /// An IP literal and port, e.g. `10.0.1.1:8080` or `[::1]:8080`.
    Ip(SocketAddr),
    /// A DNS name and port, e.g. `app.internal:8080`; each address it resolves to becomes a
    /// server of the pool.
    Name {
        /// The name, lower-cased, without a trailing dot.
        host: String,
        /// The port every resolved address is used with.
        port: u16,
    },
    /// Text that is neither; refused by validation, never served.
    Invalid(String),
}

impl ServerAddress {
    /// Parses `IP:PORT` or `HOST:PORT`; anything else is [`ServerAddress::Invalid`].
    pub fn parse(text: &str) -> ServerAddress {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return ServerAddress::Ip(addr);
        }
        let invalid = || ServerAddress::Invalid(text.to_owned());
        let Some((host, port)) = text.rsplit_once(':') else { return invalid() };
        // Digits only: `u16::from_str` would also take "+80".
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return invalid();
        }
        let Ok(port) = port.parse::<u16>() else { return invalid() };
        if port == 0 || !is_host_name(host) {
            return invalid();
        }
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        ServerAddress::Name { host, port }
    }

    /// The socket address of an IP literal.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            ServerAddress::Ip(addr) => Some(*addr),
            _ => None,
        }
    }
}

/// Whether `host` is a syntactically valid DNS name (RFC 1123 labels: letters, digits, `-`,
/// and `_` as service names use; 1–63 octets each; no label starting or ending with `-`). A name
/// whose last label is all digits is refused: it is a mistyped IPv4 address, not a name.
pub fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST_LEN {
        return false;
    }
    let labels_ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let last_numeric = host.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// The name of the server that `entry` (a configured server with a DNS name) becomes for one
/// resolved `address`: `ENTRY@IP:PORT`.
pub fn resolved_name(entry: &str, address: SocketAddr) -> String {
    format!("{entry}@{address}")
}

/// The configured entry a server name belongs to: itself, or `ENTRY` of `ENTRY@IP:PORT`.
pub fn entry_of(server: &str) -> &str {
    match server.rsplit_once('@') {
        Some((entry, addr)) if addr.parse::<SocketAddr>().is_ok() => entry,
        _ => server,
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddress::Ip(addr) => write!(f, "{addr}"),
            ServerAddress::Name { host, port } => write!(f, "{host}:{port}"),
            ServerAddress::Invalid(text) => f.write_str(text),
        }
    }
}

impl From<SocketAddr> for ServerAddress {
    fn from(addr: SocketAddr) -> Self {
        ServerAddress::Ip(addr)
    }
}

impl std::str::FromStr for ServerAddress {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ServerAddress::parse(s))
    }
}

impl Serialize for ServerAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServerAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Ok(ServerAddress::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_literals_names_and_garbage() {
        let ip: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        assert_eq!(ServerAddress::parse("10.0.0.1:80"), ServerAddress::Ip(ip));
        assert!(matches!(ServerAddress::parse("[::1]:8080"), ServerAddress::Ip(_)));
        assert_eq!(
            ServerAddress::parse("App.Internal.:8080"),
            ServerAddress::Name { host: "app.internal".into(), port: 8080 }
        );
        assert_eq!(ServerAddress::parse("localhost:1"), ServerAddress::Name { host: "localhost".into(), port: 1 });
        for bad in [
            "10.0.0.1:80x",
            "10.0.0.1",
            "300.1.1.1:80",
            "app:0",
            "app:+80",
            "app:65536",
            ":80",
            "a..b:80",
            "-a.b:80",
            "a b:80",
            "http://a:80",
            "::1:80",
        ] {
            assert_eq!(ServerAddress::parse(bad), ServerAddress::Invalid(bad.into()), "{bad}");
        }
    }

    #[test]
    fn serializes_as_the_socket_addr_string_it_replaced() {
        let ip: SocketAddr = "[::1]:8080".parse().expect("addr");
        assert_eq!(
            serde_json::to_string(&ServerAddress::Ip(ip)).expect("json"),
            serde_json::to_string(&ip).expect("json")
        );
        let old = serde_json::to_string(&ip).expect("json");
        assert_eq!(serde_json::from_str::<ServerAddress>(&old).expect("decodes"), ServerAddress::Ip(ip));
        let name = ServerAddress::parse("app.test:80");
        assert_eq!(serde_json::to_string(&name).expect("json"), "\"app.test:80\"");
    }

    #[test]
    fn resolved_names_lead_back_to_their_entry() {
        let addr: SocketAddr = "10.0.0.5:8080".parse().expect("addr");
        assert_eq!(resolved_name("app", addr), "app@10.0.0.5:8080");
        assert_eq!(entry_of("app@10.0.0.5:8080"), "app");
        assert_eq!(entry_of("app@[::1]:80"), "app");
        assert_eq!(entry_of("plain"), "plain");
        assert_eq!(entry_of("odd@name"), "odd@name");
    }
}
