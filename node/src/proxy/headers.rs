//! Header rewriting between the two hops: hop-by-hop headers out, `X-Forwarded-*` in.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must not be forwarded:
//! the fixed list plus every header the `Connection` header names. An upgrade keeps its
//! `Connection: upgrade` and `Upgrade` pair, which is the one hop-by-hop exchange a proxy
//! must pass on for WebSocket to work.

use std::net::IpAddr;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that are always hop-by-hop.
const HOP_BY_HOP: [HeaderName; 8] = [
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

/// Removes hop-by-hop headers; with `keep_upgrade`, leaves `Connection: upgrade` + `Upgrade`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over their few names is cheaper than hashing every
    // hop-by-hop name for a removal that finds nothing. (An upgrade carries `Upgrade`.)
    if !headers.keys().any(|name| name == header::UPGRADE || HOP_BY_HOP.contains(name)) {
        return;
    }
    // Headers named by Connection are hop-by-hop too; collect before removing Connection.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
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
    // The string's buffer becomes the header value's: validated, not copied again.
    HeaderValue::from_maybe_shared(Bytes::from(client.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Adds the client (a [`client_value`]) to `X-Forwarded-For` and sets `X-Forwarded-Proto` /
/// `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &HeaderValue, proto: &'static str, host: Option<&HeaderValue>) {
    let prior = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()).filter(|p| !p.trim().is_empty());
    let xff = match (prior, client.to_str()) {
        (Some(prior), Ok(client)) => HeaderValue::from_maybe_shared(Bytes::from(format!("{prior}, {client}"))).ok(),
        _ => Some(client.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
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
        add_forwarded(&mut h, &client, "http", Some(&host));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com");

        let mut first = HeaderMap::new();
        add_forwarded(&mut first, &client_value("2001:db8::1".parse().expect("ip")), "https", None);
        assert_eq!(first["x-forwarded-for"], "2001:db8::1");
        assert_eq!(first["x-forwarded-proto"], "https");
        assert!(!first.contains_key("x-forwarded-host"));
    }
}
