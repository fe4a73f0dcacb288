//! Cookies, on hostile input: finding one cookie in request `Cookie` headers, reading a
//! `Set-Cookie`'s name and value, writing keel's own `Set-Cookie`, and the opaque server ids of
//! cookie mode.
//!
//! Parsing never panics, never allocates per cookie and does work linear in the header bytes,
//! which the listener already bounds (`max_header_bytes`); at most [`MAX_COOKIE_HEADERS`] header
//! lines and [`MAX_COOKIES_SCANNED`] pairs are looked at. A proptest feeds it arbitrary bytes.
//!
//! # Opaque server ids
//!
//! The cookie names a server by `hex(HMAC-SHA256(K, "keel-sticky-v1" ‖ pool ‖ 0 ‖ name))[..32]`,
//! computed with HKDF-Expand (RFC 5869, which is HMAC-SHA256 under a pseudo-random key) from
//! rustls's ring provider, where K = HKDF-Extract(salt, secret). Every node with the same secret
//! issues the same id for a server, ids of different servers (and pools) are unrelated, and a
//! client can neither learn server names nor forge an id for a server it was never sent to.
//! Without `cookie_secret` the secret is derived from the pool name and a fixed constant: ids are
//! then stable but computable by anyone who knows keel and the server names.

use std::collections::HashMap;

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderMap, HeaderValue};
use rustls::crypto::tls13::HkdfExpander;

use super::StickyError;

/// Most `Cookie` header lines looked at (HTTP/2 clients may send one per cookie).
pub const MAX_COOKIE_HEADERS: usize = 64;

/// Most `name=value` pairs looked at across all `Cookie` lines.
pub const MAX_COOKIES_SCANNED: usize = 256;

/// Length of an opaque server id, in hex characters (128 bits).
pub const ID_HEX_LEN: usize = 32;

const SALT: &[u8] = b"keel sticky cookie ids";
const LABEL: &[u8] = b"keel-sticky-v1";
const DEFAULT_SECRET_PREFIX: &str = "keel-default-sticky-secret/";

/// The value of cookie `name` in a request's `Cookie` headers: the first occurrence, with
/// optional surrounding double quotes removed. `None` when absent or when a line is not UTF-8.
pub fn request_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut scanned = 0;
    for line in headers.get_all(COOKIE).iter().take(MAX_COOKIE_HEADERS) {
        let Ok(line) = line.to_str() else { continue };
        for pair in line.split(';') {
            scanned += 1;
            if scanned > MAX_COOKIES_SCANNED {
                return None;
            }
            if let Some((n, v)) = split_pair(pair) {
                if n == name {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// `name=value` → (name, value), trimmed, value unquoted. `None` without '='.
fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let (n, v) = pair.split_once('=')?;
    let n = n.trim_matches([' ', '\t']);
    let v = v.trim_matches([' ', '\t']);
    let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner,
        None => v,
    };
    Some((n, v))
}

/// Name and value of one `Set-Cookie` header value (attributes ignored).
pub fn set_cookie_pair(value: &HeaderValue) -> Option<(&str, &str)> {
    let text = value.to_str().ok()?;
    let first = text.split(';').next()?;
    split_pair(first)
}

/// The value the response sets for cookie `name` (the last `Set-Cookie` for it wins, as in
/// browsers); `None` when it sets none or deletes it (empty value).
pub fn response_cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .take(MAX_COOKIE_HEADERS)
        .filter_map(set_cookie_pair)
        .filter(|(n, _)| *n == name)
        .last()
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Whether the response already sets cookie `name`.
pub fn response_sets(headers: &HeaderMap, name: &str) -> bool {
    headers.get_all(SET_COOKIE).iter().filter_map(set_cookie_pair).any(|(n, _)| n == name)
}

/// Attributes appended to keel's cookie: `; Path=/; Max-Age=…; Secure; HttpOnly; SameSite=…`.
pub fn attributes(sticky: &keel_cluster::model::Sticky) -> String {
    let mut a = String::from("; Path=/");
    if let Some(age) = sticky.cookie_max_age {
        a.push_str(&format!("; Max-Age={}", age.get().as_secs()));
    }
    if sticky.secure() {
        a.push_str("; Secure");
    }
    if sticky.http_only() {
        a.push_str("; HttpOnly");
    }
    a.push_str("; SameSite=");
    a.push_str(sticky.same_site().as_str());
    a
}

/// The opaque ids of one pool's servers, both ways.
pub struct ServerIds {
    prk: Box<dyn HkdfExpander>,
    pool: String,
    by_id: HashMap<String, String>,
    by_name: HashMap<String, String>,
}

impl ServerIds {
    /// Ids under `secret` (or the pool-derived default) for `names`, computed once.
    pub fn new<'n>(
        secret: Option<&str>,
        pool: &str,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<Self, StickyError> {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().ok_or(StickyError::NoHmac)?;
        let default_secret;
        let secret = match secret {
            Some(s) => s.as_bytes(),
            None => {
                default_secret = format!("{DEFAULT_SECRET_PREFIX}{pool}");
                default_secret.as_bytes()
            }
        };
        let prk = suite.hkdf_provider.extract_from_secret(Some(SALT), secret);
        let mut ids = ServerIds { prk, pool: pool.to_owned(), by_id: HashMap::new(), by_name: HashMap::new() };
        for name in names {
            let id = ids.compute(name)?;
            ids.by_id.insert(id.clone(), name.to_owned());
            ids.by_name.insert(name.to_owned(), id);
        }
        Ok(ids)
    }

    fn compute(&self, name: &str) -> Result<String, StickyError> {
        let mut out = [0u8; ID_HEX_LEN / 2];
        self.prk
            .expand_slice(&[LABEL, self.pool.as_bytes(), &[0], name.as_bytes()], &mut out)
            .map_err(|_| StickyError::NoHmac)?;
        let mut hex = String::with_capacity(ID_HEX_LEN);
        for b in out {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        Ok(hex)
    }

    /// The id of server `name` (computed on the spot for a server unknown at build time).
    pub fn id_of(&self, name: &str) -> Option<String> {
        match self.by_name.get(name) {
            Some(id) => Some(id.clone()),
            None => self.compute(name).ok(),
        }
    }

    /// The server an id names, among the servers known at build time.
    pub fn name_of(&self, id: &str) -> Option<&str> {
        if id.len() != ID_HEX_LEN {
            return None;
        }
        self.by_id.get(id).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn headers(name: http::header::HeaderName, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(name.clone(), HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn finds_cookies_across_lines_spaces_and_quotes() {
        let h = headers(COOKIE, &["a=1; KEELID=\"abc\" ;x=y", "KEELID=second"]);
        assert_eq!(request_cookie(&h, "KEELID"), Some("abc"));
        assert_eq!(request_cookie(&h, "x"), Some("y"));
        assert_eq!(request_cookie(&h, "keelid"), None, "names are case-sensitive");
        assert_eq!(request_cookie(&h, "nope"), None);
        let h = headers(COOKIE, &["flag; =v; KEELID="]);
        assert_eq!(request_cookie(&h, "KEELID"), Some(""));
    }

    #[test]
    fn reads_set_cookie_names_and_values() {
        let h = headers(SET_COOKIE, &["JSESSIONID=old; Path=/", "other=1", "JSESSIONID=new; HttpOnly"]);
        assert_eq!(response_cookie(&h, "JSESSIONID"), Some("new"));
        assert!(response_sets(&h, "other"));
        let deleted = headers(SET_COOKIE, &["JSESSIONID=; Max-Age=0"]);
        assert_eq!(response_cookie(&deleted, "JSESSIONID"), None);
    }

    #[test]
    fn ids_are_opaque_distinct_and_stable() {
        let ids = ServerIds::new(Some("0123456789abcdef-secret"), "app", ["a", "b"]).unwrap();
        let (a, b) = (ids.id_of("a").unwrap(), ids.id_of("b").unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), ID_HEX_LEN);
        assert!(a != "a" && b != "b", "not the name");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(ids.name_of(&a), Some("a"));
        assert_eq!(ids.name_of("a"), None, "the name itself is not an id");
        // Another node with the same secret agrees; another secret or pool does not.
        let again = ServerIds::new(Some("0123456789abcdef-secret"), "app", ["b", "a"]).unwrap();
        assert_eq!(again.id_of("a").unwrap(), a);
        let other = ServerIds::new(Some("another-secret-0123456789"), "app", ["a"]).unwrap();
        assert_ne!(other.id_of("a").unwrap(), a);
        let other_pool = ServerIds::new(Some("0123456789abcdef-secret"), "api", ["a"]).unwrap();
        assert_ne!(other_pool.id_of("a").unwrap(), a);
        let default = ServerIds::new(None, "app", ["a"]).unwrap();
        assert_eq!(default.id_of("a"), ServerIds::new(None, "app", ["a"]).unwrap().id_of("a"), "stable default");
        assert_ne!(default.id_of("a").unwrap(), a);
    }

    proptest! {
        #[test]
        fn arbitrary_cookie_bytes_never_panic(lines in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..600), 0..8)) {
            let mut h = HeaderMap::new();
            for l in &lines {
                if let Ok(v) = HeaderValue::from_bytes(l) {
                    h.append(COOKIE, v.clone());
                    h.append(SET_COOKIE, v);
                }
            }
            let _ = request_cookie(&h, "KEELID");
            let _ = response_cookie(&h, "KEELID");
            let _ = response_sets(&h, "KEELID");
        }

        #[test]
        fn issued_cookies_parse_back_to_their_server(
            names in prop::collection::btree_set("[a-z0-9._-]{1,20}", 1..8),
            noise in prop::collection::vec("[!-:<-~]{0,30}", 0..20),
            pos in any::<prop::sample::Index>(),
        ) {
            let ids = ServerIds::new(Some("proptest-secret-0123456789"), "app", names.iter().map(String::as_str)).unwrap();
            for name in &names {
                let id = ids.id_of(name).unwrap();
                let issued = format!("KEELID={id}{}", "; Path=/; HttpOnly; SameSite=Lax");
                let set = headers(SET_COOKIE, &[&issued]);
                prop_assert_eq!(response_cookie(&set, "KEELID"), Some(id.as_str()));
                // The browser sends it back among other cookies (which never contain ';' or '=').
                let mut pairs: Vec<String> = noise.iter().enumerate().map(|(i, v)| format!("c{i}={v}")).collect();
                let at = if pairs.is_empty() { 0 } else { pos.index(pairs.len() + 1) };
                pairs.insert(at, format!("KEELID={id}"));
                let req = headers(COOKIE, &[&pairs.join("; ")]);
                let found = request_cookie(&req, "KEELID");
                prop_assert_eq!(found.and_then(|v| ids.name_of(v)), Some(name.as_str()));
            }
        }
    }
}
