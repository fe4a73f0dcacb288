//! Header rewriting between the two hops: hop-by-hop headers out, `X-Forwarded-*` in (into the
//! request's map, or as head lines the HTTP/1 client writes: [`Forwarded`]).
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must not be forwarded:
//! the fixed list plus every header the `Connection` header names. An upgrade keeps its
//! `Connection: upgrade` and `Upgrade` pair, which is the one hop-by-hop exchange a proxy
//! must pass on for WebSocket to work.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// How many headers are always hop-by-hop.
const HOP_COUNT: usize = 8;
/// Headers that are always hop-by-hop, in the order of [`hop_bit`]'s bits (its match must name
/// them in this order; a test checks). A `static`, not a `const`: a `const` array is
/// built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether a request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Bit of [`HOP_BY_HOP`]`[i]` is `1 << i`; these two follow.
const UPGRADE_BIT: u16 = 1 << HOP_COUNT;
/// A field named `close`: rare, but RFC 9110 §7.6.1 has it removed like any other named one.
const CLOSE_BIT: u16 = 1 << (HOP_COUNT + 1);

/// Which hop-by-hop name `name` is, in any case, as a bit: [`HOP_BY_HOP`]`[i]` is `1 << i`,
/// then `Upgrade` and `close`; 0 for every other name. The length picks the candidates, so a
/// usual name costs one comparison at most.
fn hop_bit(name: &[u8]) -> u16 {
    let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if is("te") => 1 << 5,
        5 if is("close") => CLOSE_BIT,
        7 if is("trailer") => 1 << 6,
        7 if is("upgrade") => UPGRADE_BIT,
        10 if is("connection") => 1 << 0,
        10 if is("keep-alive") => 1 << 1,
        16 if is("proxy-connection") => 1 << 2,
        17 if is("transfer-encoding") => 1 << 7,
        18 if is("proxy-authenticate") => 1 << 3,
        19 if is("proxy-authorization") => 1 << 4,
        _ => 0,
    }
}

/// Whether a field named `name` is hop-by-hop whatever `Connection` says (or is `Upgrade`).
pub fn is_fixed_hop_by_hop(name: &[u8]) -> bool {
    hop_bit(name) & !CLOSE_BIT != 0
}

/// Whether a `Connection` value names a field other than ones [`is_fixed_hop_by_hop`] already
/// covers. `close` names a field only when one of that name is there (`close_field`).
pub fn connection_names_fields(value: &[u8], close_field: bool) -> bool {
    // The one token nearly every message carries, without the split.
    if value.eq_ignore_ascii_case(b"keep-alive") || (!close_field && value.eq_ignore_ascii_case(b"close")) {
        return false;
    }
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).any(|token| {
        !(token.is_empty()
            || (token.eq_ignore_ascii_case(b"close") && !close_field)
            || token.eq_ignore_ascii_case(b"keep-alive")
            || token.eq_ignore_ascii_case(b"upgrade"))
    })
}

/// Removes hop-by-hop headers; with `keep_upgrade`, leaves `Connection: upgrade` + `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the few names marks which hop-by-hop fields are there (bit i: HOP_BY_HOP[i],
    // then Upgrade and close); only those are removed. Most messages carry none, or only
    // `Connection` (every nginx response does): hashing all eight names for removals that find
    // nothing was a twelfth of keel's user-space instructions per keep-alive request
    // (callgrind).
    let mut present = 0u16;
    for name in headers.keys() {
        present |= hop_bit(name.as_str().as_bytes());
    }
    if present & !CLOSE_BIT == 0 {
        return;
    }
    // Headers named by Connection are hop-by-hop too. Its usual tokens name a field that is not
    // there (`close`), one removed below (`keep-alive`) or one decided below (`upgrade`); only
    // other tokens are collected (before Connection goes) and removed.
    let close_field = present & CLOSE_BIT != 0;
    if present & 1 != 0
        && headers.get_all(header::CONNECTION).iter().any(|v| connection_names_fields(v.as_bytes(), close_field))
    {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| connection_names_fields(t, close_field))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & UPGRADE_BIT != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// Joins the `cookie` fields an HTTP/2 client may split a cookie list into (RFC 9113 §8.2.3)
/// into the one field HTTP/1.1 allows, separated by `"; "`.
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for crumb in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(crumb.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

/// A client address as a header value. A connection's requests all come from one address:
/// formatting it once per connection instead of per request took a twentieth of keel's user
/// time off the keep-alive benchmark.
pub fn client_value(client: IpAddr) -> HeaderValue {
    // The buffer becomes the header value's: validated, not copied again.
    HeaderValue::from_maybe_shared(Bytes::from(ip_text(client).into_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// An address as text, as `Display` writes it. IPv4 is written digit by digit: `Display` goes
/// through the formatting machinery (padding support, a stack buffer, a `write!` per octet),
/// ≈ 2,600 instructions an address, a twentieth of keel's user-space instructions for a
/// connection that carries one request (callgrind).
pub fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else { return ip.to_string() };
    let mut out = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
    out
}

/// The `X-Forwarded-*` keel adds to a request: the client (a [`client_value`]), the scheme
/// it used, and the authority it asked for when it named one.
#[derive(Clone, Copy)]
pub struct Forwarded<'a> {
    /// The client's address, added to `X-Forwarded-For`.
    pub client: &'a HeaderValue,
    /// `X-Forwarded-Proto`: `http` or `https`.
    pub proto: &'static str,
    /// `X-Forwarded-Host`, when the client named an authority.
    pub host: Option<&'a HeaderValue>,
}

impl Forwarded<'_> {
    /// Adds the client to `X-Forwarded-For` and sets `X-Forwarded-Proto` / `X-Forwarded-Host`
    /// in `headers`.
    pub fn add_to(&self, headers: &mut HeaderMap) {
        // One lookup for the read and the write (the name is not a standard one: hashing it is
        // per byte).
        match headers.entry(X_FORWARDED_FOR) {
            header::Entry::Occupied(mut entry) => {
                let mut xff = Vec::new();
                self.write_for(Some(entry.get()), &mut xff);
                if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
                    entry.insert(v);
                }
            }
            header::Entry::Vacant(entry) => {
                entry.insert(self.client.clone());
            }
        }
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        if let Some(host) = self.host {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
    }

    /// Whether `name` is a field [`Forwarded::add_to`] replaces (`X-Forwarded-For` itself is
    /// extended, and is not one).
    pub fn replaces(&self, name: &HeaderName) -> bool {
        name == X_FORWARDED_PROTO || (self.host.is_some() && name == X_FORWARDED_HOST)
    }

    /// The `X-Forwarded-For` value after a `prior` one (the first field of that name): the
    /// prior list, then the client. A blank prior or one that is not text is replaced.
    pub fn write_for(&self, prior: Option<&HeaderValue>, out: &mut impl bytes::BufMut) {
        let prior = prior.and_then(|p| p.to_str().ok()).filter(|p| !p.trim().is_empty());
        if let (Some(prior), Ok(_)) = (prior, self.client.to_str()) {
            out.put_slice(prior.as_bytes());
            out.put_slice(b", ");
        }
        out.put_slice(self.client.as_bytes());
    }

    /// The three fields as [`Forwarded::add_to`] leaves them, as head lines, with `prior` the
    /// request's first `X-Forwarded-For` (the HTTP/1 client writes them so, without a map).
    pub fn write_lines(&self, prior: Option<&HeaderValue>, out: &mut impl bytes::BufMut) {
        out.put_slice(b"x-forwarded-for: ");
        self.write_for(prior, out);
        out.put_slice(b"\r\nx-forwarded-proto: ");
        out.put_slice(self.proto.as_bytes());
        out.put_slice(b"\r\n");
        if let Some(host) = self.host {
            out.put_slice(b"x-forwarded-host: ");
            out.put_slice(host.as_bytes());
            out.put_slice(b"\r\n");
        }
    }

    /// An upper bound of [`Forwarded::write_lines`]' length.
    pub fn lines_len(&self, prior: Option<&HeaderValue>) -> usize {
        60 + prior.map_or(0, HeaderValue::len) + self.client.len() + self.host.map_or(0, |h| h.len() + 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn strips_fixed_and_named_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn hop_bits_follow_the_table_in_any_case() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_bit(name.as_str().as_bytes()), 1 << i, "{name}");
            assert_eq!(hop_bit(name.as_str().to_ascii_uppercase().as_bytes()), 1 << i, "{name}");
            assert!(is_fixed_hop_by_hop(name.as_str().as_bytes()));
        }
        assert!(is_fixed_hop_by_hop(b"Upgrade"));
        for other in ["close", "x-te", "content-length", "", "connectionx"] {
            assert!(!is_fixed_hop_by_hop(other.as_bytes()), "{other}");
        }
        assert!(!connection_names_fields(b"keep-alive, Close ,, upgrade", false));
        assert!(connection_names_fields(b"keep-alive, close", true));
        assert!(connection_names_fields(b"close, x-secret", false));
    }

    #[test]
    fn client_values_read_like_display() {
        let octets = [0u8, 1, 9, 10, 42, 99, 100, 101, 199, 200, 249, 255];
        for (a, b) in octets.iter().zip(octets.iter().rev()) {
            let ip = IpAddr::from([*a, *b, *b, *a]);
            assert_eq!(client_value(ip).to_str().ok(), Some(ip.to_string().as_str()));
        }
        let v6: IpAddr = "2001:db8::1".parse().expect("ip");
        assert_eq!(client_value(v6).to_str().ok(), Some("2001:db8::1"));
    }

    #[test]
    fn each_hop_by_hop_header_alone_is_removed() {
        for name in HOP_BY_HOP.iter() {
            let mut h = map(&[(name.as_str(), "x"), ("x-kept", "yes")]);
            strip_hop_by_hop(&mut h, false);
            let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            assert_eq!(names, ["x-kept"], "{name}");
        }
    }

    #[test]
    fn every_connection_line_names_fields_and_the_usual_tokens_name_none() {
        let mut h = map(&[
            ("connection", "keep-alive"),
            ("connection", "close, X-One"),
            ("x-one", "1"),
            ("connection", " ,x-two ,"),
            ("x-two", "2"),
            ("close", "named by the token, so it goes"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
        // Without `close` among the tokens a field of that name stays; the usual nginx response
        // loses only `Connection: keep-alive`.
        let mut h = map(&[("connection", "keep-alive"), ("close", "stays")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["close"]);
        let mut h = map(&[("server", "nginx"), ("connection", "keep-alive"), ("content-length", "2")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["server", "content-length"]);
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_left_alone() {
        let mut h = map(&[("host", "a"), ("x-kept", "yes"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["host", "x-kept", "accept"]);
        let mut h = map(&[("host", "a"), ("proxy-connection", "keep-alive")]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("proxy-connection"));
    }

    #[test]
    fn upgrades_keep_their_pair() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("connection").map(|v| v.as_bytes()), Some(&b"upgrade"[..]));
        assert_eq!(h.get("upgrade").map(|v| v.as_bytes()), Some(&b"websocket"[..]));
        assert!(h.contains_key("sec-websocket-key"));
    }

    #[test]
    fn cookie_crumbs_become_one_field() {
        let mut h = map(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookie_crumbs(&mut h);
        let cookies: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut one = map(&[("cookie", "a=1; b=2")]);
        join_cookie_crumbs(&mut one);
        assert_eq!(one["cookie"], "a=1; b=2");
    }

    #[test]
    fn forwarded_headers_append_the_client() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1")]);
        let host = HeaderValue::from_static("example.com");
        let client = client_value("192.0.2.7".parse().expect("ip"));
        Forwarded { client: &client, proto: "http", host: Some(&host) }.add_to(&mut h);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");

        let mut first = HeaderMap::new();
        let v6 = client_value("2001:db8::1".parse().expect("ip"));
        Forwarded { client: &v6, proto: "https", host: None }.add_to(&mut first);
        assert_eq!(first["x-forwarded-for"], "2001:db8::1");
        assert_eq!(first["x-forwarded-proto"], "https");
        assert!(!first.contains_key("x-forwarded-host"));
    }

    #[test]
    fn forwarded_lines_say_what_the_map_would() {
        let client = client_value("192.0.2.7".parse().expect("ip"));
        let host = HeaderValue::from_static("example.com");
        let blank = HeaderValue::from_static("  ");
        let prior = HeaderValue::from_static("10.0.0.1, 10.0.0.2");
        let opaque = HeaderValue::from_bytes(b"\xff").expect("obs-text");
        for host in [None, Some(&host)] {
            for prior in [None, Some(&blank), Some(&prior), Some(&opaque)] {
                let fwd = Forwarded { client: &client, proto: "https", host };
                let mut h = HeaderMap::new();
                if let Some(p) = prior {
                    h.insert(X_FORWARDED_FOR, p.clone());
                }
                fwd.add_to(&mut h);
                let mut lines = Vec::new();
                fwd.write_lines(prior, &mut lines);
                let expected: Vec<u8> = h
                    .iter()
                    .flat_map(|(n, v)| [n.as_str().as_bytes(), b": ", v.as_bytes(), b"\r\n"].concat())
                    .collect();
                assert_eq!(String::from_utf8_lossy(&lines), String::from_utf8_lossy(&expected), "{prior:?} {host:?}");
                assert!(lines.len() <= fwd.lines_len(prior));
            }
        }
    }
}
