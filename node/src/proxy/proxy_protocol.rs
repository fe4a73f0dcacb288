//! The PROXY protocol header a `tcp` listener sends first to a pool's servers, so they learn the
//! client's real address and port instead of keel's (HAProxy's `send-proxy` / `send-proxy-v2`).
//!
//! Only encoding lives here: keel sends the header, it never accepts one. The layout follows
//! HAProxy's proxy-protocol.txt:
//!
//! - v1, one text line: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (`TCP6` for IPv6), or
//!   `PROXY UNKNOWN\r\n` when the two addresses are of different families;
//! - v2, binary: the 12-byte signature, `0x21` (version 2, command PROXY), the family/transport
//!   byte (`0x11` TCP over IPv4, `0x21` TCP over IPv6, `0x00` unspecified), the length of the
//!   address block (big-endian u16), then source address, destination address, source port and
//!   destination port, all in network byte order. No TLVs are sent.
//!
//! IPv4-mapped IPv6 addresses (what a dual-stack `[::]` socket reports for IPv4 clients) are
//! sent as the IPv4 addresses they are, as HAProxy does, so servers see `TCP4` for IPv4 clients.
//!
//! Hand-written rather than taken from the `ppp` crate: encoding is a few dozen lines with no
//! parsing risk, and it keeps a dependency out of the data plane.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

pub use keel_cluster::edge::ProxyProtocol;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Version 2, command PROXY (the connection was relayed on behalf of the client).
const V2_VERSION_PROXY: u8 = 0x21;
/// Family/transport byte: TCP over IPv4.
const V2_TCP4: u8 = 0x11;
/// Family/transport byte: TCP over IPv6.
const V2_TCP6: u8 = 0x21;
/// Family/transport byte: unspecified (no address block).
const V2_UNSPEC: u8 = 0x00;

/// Longest header [`encode`] produces: a v1 TCP6 line with two full-length addresses (the
/// spec's 107-byte bound) is longer than any v2 header keel sends (16 + 36 bytes).
pub const MAX_HEADER_LEN: usize = 107;

/// The header announcing a connection from `client` to `local` (the address the client
/// connected to, i.e. keel's listening address).
pub fn encode(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER_LEN);
    encode_into(version, client, local, &mut out);
    out
}

/// Like [`encode`], appending to `out` (to reuse a buffer).
pub fn encode_into(version: ProxyProtocol, client: SocketAddr, local: SocketAddr, out: &mut Vec<u8>) {
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    match version {
        ProxyProtocol::V1 => encode_v1(src, dst, client.port(), local.port(), out),
        ProxyProtocol::V2 => encode_v2(src, dst, client.port(), local.port(), out),
    }
}

fn encode_v1(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, out: &mut Vec<u8>) {
    let family = match (src, dst) {
        (IpAddr::V4(_), IpAddr::V4(_)) => "TCP4",
        (IpAddr::V6(_), IpAddr::V6(_)) => "TCP6",
        _ => {
            out.extend_from_slice(b"PROXY UNKNOWN\r\n");
            return;
        }
    };
    // Writing into a Vec cannot fail.
    let _ = write!(out, "PROXY {family} {src} {dst} {sport} {dport}\r\n");
}

fn encode_v2(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(V2_TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.push(V2_TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => {
            // The receiver is told nothing about the addresses and uses the connection's own.
            out.push(V2_UNSPEC);
            out.extend_from_slice(&0u16.to_be_bytes());
            return;
        }
    }
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    /// What a receiver learns from a header.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Header {
        /// A relayed TCP connection from `source` to `destination`.
        Tcp { source: SocketAddr, destination: SocketAddr },
        /// v1 `UNKNOWN` or v2 `UNSPEC`: use the connection's own addresses.
        Unknown,
    }

    /// A receiver's parser, for tests: `Ok(None)` while `buf` is a valid but incomplete header,
    /// else the header and how many bytes it took.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, String> {
        const V1_PREFIX: &[u8] = b"PROXY ";
        let is_prefix = |whole: &[u8]| buf.len() < whole.len() && whole.starts_with(buf);
        if is_prefix(V1_PREFIX) || is_prefix(&V2_SIGNATURE) {
            return Ok(None);
        }
        if buf.starts_with(V1_PREFIX) {
            parse_v1(buf)
        } else if buf.starts_with(&V2_SIGNATURE) {
            parse_v2(buf)
        } else {
            Err(format!("not a PROXY header: {:?}", &buf[..buf.len().min(16)]))
        }
    }

    fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, String> {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() < MAX_HEADER_LEN { Ok(None) } else { Err("v1 line too long".into()) };
        };
        let line = std::str::from_utf8(&buf[..end]).map_err(|e| e.to_string())?;
        let fields: Vec<&str> = line.split(' ').collect();
        let header = match fields.as_slice() {
            ["PROXY", "UNKNOWN", ..] => Header::Unknown,
            ["PROXY", family @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
                let ip = |s: &str| s.parse::<IpAddr>().map_err(|e| format!("{s:?}: {e}"));
                let port = |s: &str| s.parse::<u16>().map_err(|e| format!("{s:?}: {e}"));
                let (src, dst) = (ip(src)?, ip(dst)?);
                if src.is_ipv4() != (*family == "TCP4") || dst.is_ipv4() != (*family == "TCP4") {
                    return Err(format!("{family} with addresses {src} {dst}"));
                }
                Header::Tcp {
                    source: SocketAddr::new(src, port(sport)?),
                    destination: SocketAddr::new(dst, port(dport)?),
                }
            }
            _ => return Err(format!("bad v1 line {line:?}")),
        };
        Ok(Some((header, end + 2)))
    }

    fn parse_v2(buf: &[u8]) -> Result<Option<(Header, usize)>, String> {
        if buf.len() < 16 {
            return Ok(None);
        }
        if buf[12] != V2_VERSION_PROXY {
            return Err(format!("version/command {:#04x}", buf[12]));
        }
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        let Some(block) = buf.get(16..16 + len) else { return Ok(None) };
        let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
        let header = match buf[13] {
            V2_TCP4 if len >= 12 => {
                let ip = |at: usize| IpAddr::V4(Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]));
                Header::Tcp { source: SocketAddr::new(ip(0), port(8)), destination: SocketAddr::new(ip(4), port(10)) }
            }
            V2_TCP6 if len >= 36 => {
                let ip = |at: usize| {
                    let mut octets = [0u8; 16];
                    octets.copy_from_slice(&block[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(octets))
                };
                Header::Tcp { source: SocketAddr::new(ip(0), port(32)), destination: SocketAddr::new(ip(16), port(34)) }
            }
            V2_UNSPEC => Header::Unknown,
            other => return Err(format!("family/transport {other:#04x} with length {len}")),
        };
        Ok(Some((header, 16 + len)))
    }

    fn v4(a: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)
    }

    fn v6(s: &str, port: u16) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), port)
    }

    #[test]
    fn v1_tcp4_is_the_spec_text_line() {
        let header = encode(ProxyProtocol::V1, v4([192, 0, 2, 10], 56324), v4([198, 51, 100, 1], 443));
        assert_eq!(header, b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n");
    }

    #[test]
    fn v1_tcp6_is_the_spec_text_line() {
        let header = encode(ProxyProtocol::V1, v6("2001:db8::1", 56324), v6("2001:db8::2", 443));
        assert_eq!(header, b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n");
    }

    #[test]
    fn v1_mixed_families_are_unknown() {
        assert_eq!(encode(ProxyProtocol::V1, v4([192, 0, 2, 10], 1), v6("2001:db8::2", 2)), b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_tcp4_has_the_spec_layout() {
        let header = encode(ProxyProtocol::V2, v4([192, 0, 2, 10], 56324), v4([198, 51, 100, 1], 443));
        #[rustfmt::skip]
        let expected: &[u8] = &[
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
            0x21,                   // version 2, PROXY
            0x11,                   // AF_INET, STREAM
            0x00, 0x0C,             // 12 address bytes follow
            192, 0, 2, 10,          // source address
            198, 51, 100, 1,        // destination address
            0xDC, 0x04,             // source port 56324
            0x01, 0xBB,             // destination port 443
        ];
        assert_eq!(header, expected);
    }

    #[test]
    fn v2_tcp6_has_the_spec_layout() {
        let header = encode(ProxyProtocol::V2, v6("2001:db8::1", 56324), v6("2001:db8::2", 443));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]); // PROXY, AF_INET6 STREAM, 36 bytes
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01]);
        expected.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02]);
        expected.extend_from_slice(&[0xDC, 0x04, 0x01, 0xBB]);
        assert_eq!(header, expected);
        assert_eq!(header.len(), 16 + 36);
    }

    #[test]
    fn v2_mixed_families_are_unspec_with_no_address_block() {
        let header = encode(ProxyProtocol::V2, v6("2001:db8::1", 1), v4([192, 0, 2, 1], 2));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(header, expected);
    }

    #[test]
    fn ipv4_mapped_addresses_are_sent_as_ipv4() {
        let mapped = |a: [u8; 4], port| SocketAddr::new(IpAddr::V6(Ipv4Addr::from(a).to_ipv6_mapped()), port);
        let (client, local) = (mapped([192, 0, 2, 10], 56324), mapped([198, 51, 100, 1], 443));
        assert_eq!(encode(ProxyProtocol::V1, client, local), b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n");
        assert_eq!(encode(ProxyProtocol::V2, client, local)[13], V2_TCP4);
    }

    #[test]
    fn encode_into_appends() {
        let mut buf = b"x".to_vec();
        encode_into(ProxyProtocol::V1, v4([10, 0, 0, 1], 1), v4([10, 0, 0, 2], 2), &mut buf);
        assert_eq!(buf, b"xPROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n");
    }

    #[test]
    fn the_longest_v1_line_fits_the_spec_bound() {
        let long = v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
        let header = encode(ProxyProtocol::V1, long, long);
        assert!(header.len() <= MAX_HEADER_LEN, "{} bytes", header.len());
    }

    #[test]
    fn the_parser_waits_for_incomplete_headers_and_takes_only_the_header() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let mut bytes = encode(version, v4([192, 0, 2, 10], 56324), v4([198, 51, 100, 1], 443));
            let len = bytes.len();
            for cut in 0..len {
                assert_eq!(parse(&bytes[..cut]), Ok(None), "{version:?} cut at {cut}");
            }
            bytes.extend_from_slice(b"payload");
            let (_, used) = parse(&bytes).unwrap().unwrap();
            assert_eq!(used, len);
        }
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
    }

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| v4(a, p)),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
        ]
    }

    proptest! {
        #[test]
        fn what_is_encoded_parses_back(client in any_addr(), local in any_addr(), v2 in any::<bool>()) {
            let version = if v2 { ProxyProtocol::V2 } else { ProxyProtocol::V1 };
            let bytes = encode(version, client, local);
            let (header, used) = parse(&bytes).map_err(TestCaseError::fail)?.ok_or_else(|| TestCaseError::fail("incomplete"))?;
            prop_assert_eq!(used, bytes.len());
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let (client, local) = (canonical(client), canonical(local));
            if client.is_ipv4() == local.is_ipv4() {
                prop_assert_eq!(header, Header::Tcp { source: client, destination: local });
            } else {
                prop_assert_eq!(header, Header::Unknown);
            }
        }
    }
}
