//! The `[pools.NAME.sticky]` table: how a pool keeps a client on the server that served it
//! before, and where the bindings live. Plain serde data plus [`check`], which
//! [`crate::model::Config::validate`] calls for every pool that has one.
//!
//! Three modes, after HAProxy:
//! - `cookie`: keel inserts a cookie naming the server by an opaque id (`cookie insert`);
//!   nothing is stored anywhere, so `ttl`, `store` and `redis` do not apply.
//! - `source_ip`: the client address is the key of a stick table entry (`stick on src`).
//! - `learn`: the key is an application session id the server hands out, learned from the
//!   response's `Set-Cookie` (`learn_cookie`) or a response header (`learn_header`), and matched
//!   against the request's cookie / header (`stick on` + `stick store-response`).
//!
//! Every setting that belongs to another mode is an error rather than silently ignored, which is
//! why the mode-specific fields are `Option`s whose defaults are applied by accessor methods.
//!
//! `cookie_secret` keys the opaque server ids. It is replicated with the rest of the config (every
//! node must issue the same ids) and is redacted from `Debug` output so it does not end up in logs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::duration::HumanDuration;
use crate::model::{KeyPath, PathSegment};

/// Cookie name used when `cookie` is not given.
pub const DEFAULT_COOKIE_NAME: &str = "KEELID";

/// Shortest `cookie_secret` accepted, in bytes.
pub const MIN_COOKIE_SECRET_BYTES: usize = 16;

/// Sticky-session settings of one pool.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    /// How clients are recognised.
    pub mode: StickyMode,
    /// Cookie mode: name of the inserted cookie; [`DEFAULT_COOKIE_NAME`] when absent.
    #[serde(default)]
    pub cookie: Option<String>,
    /// Cookie mode: `Max-Age` of the cookie; a session cookie (gone when the browser closes)
    /// when absent.
    #[serde(default)]
    pub cookie_max_age: Option<HumanDuration>,
    /// Cookie mode: add `Secure` (default false).
    #[serde(default)]
    pub cookie_secure: Option<bool>,
    /// Cookie mode: add `HttpOnly` (default true).
    #[serde(default)]
    pub cookie_http_only: Option<bool>,
    /// Cookie mode: `SameSite` attribute (default lax).
    #[serde(default)]
    pub cookie_same_site: Option<SameSite>,
    /// Cookie mode: key of the opaque server ids, the same on every node. When absent the key is
    /// derived from the pool name and a constant: stable, but anyone who knows keel can compute
    /// which id names which server. Set it to a random string of at least
    /// [`MIN_COOKIE_SECRET_BYTES`] characters.
    #[serde(default)]
    pub cookie_secret: Option<String>,
    /// source_ip / learn: how long a binding lives after it was last refreshed (default 30m).
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// source_ip / learn: where bindings are kept (default raft).
    #[serde(default)]
    pub store: Option<StickyStore>,
    /// source_ip / learn with `store = "raft"` or `"local"`: the most entries the pool's table
    /// keeps; past it the least recently used go (default
    /// [`DEFAULT_MAX_ENTRIES`](crate::sticky_table::DEFAULT_MAX_ENTRIES), at most
    /// [`MAX_ENTRIES_LIMIT`](crate::sticky_table::MAX_ENTRIES_LIMIT)).
    #[serde(default)]
    pub max_entries: Option<u64>,
    /// source_ip / learn with `store = "redis"`: the server, e.g. "redis://127.0.0.1:6379".
    #[serde(default)]
    pub redis: Option<String>,
    /// learn: the application cookie whose value is the session key, e.g. "JSESSIONID".
    #[serde(default)]
    pub learn_cookie: Option<String>,
    /// learn: the header whose value is the session key, e.g. "x-session-id".
    #[serde(default)]
    pub learn_header: Option<String>,
}

impl fmt::Debug for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sticky")
            .field("mode", &self.mode)
            .field("cookie", &self.cookie)
            .field("cookie_max_age", &self.cookie_max_age)
            .field("cookie_secure", &self.cookie_secure)
            .field("cookie_http_only", &self.cookie_http_only)
            .field("cookie_same_site", &self.cookie_same_site)
            .field("cookie_secret", &self.cookie_secret.as_ref().map(|_| "<redacted>"))
            .field("ttl", &self.ttl)
            .field("store", &self.store)
            .field("max_entries", &self.max_entries)
            .field("redis", &self.redis)
            .field("learn_cookie", &self.learn_cookie)
            .field("learn_header", &self.learn_header)
            .finish()
    }
}

/// How a sticky pool recognises a returning client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyMode {
    /// keel inserts a cookie naming the server.
    Cookie,
    /// The client's IP address.
    SourceIp,
    /// A session id the application hands out (cookie or header).
    Learn,
}

impl StickyMode {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            StickyMode::Cookie => "cookie",
            StickyMode::SourceIp => "source_ip",
            StickyMode::Learn => "learn",
        }
    }
}

/// Where source_ip / learn bindings are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StickyStore {
    /// The replicated Raft table: survives failover, shared by every node.
    #[default]
    Raft,
    /// A Redis server shared by the nodes (active-active clusters with many sessions).
    Redis,
    /// This node's memory only: lost on restart and not seen by other nodes.
    Local,
}

impl StickyStore {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            StickyStore::Raft => "raft",
            StickyStore::Redis => "redis",
            StickyStore::Local => "local",
        }
    }
}

/// The cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SameSite {
    /// Sent on top-level navigations from other sites (browsers' default).
    #[default]
    Lax,
    /// Never sent on cross-site requests.
    Strict,
    /// Always sent; browsers require `Secure` with it.
    None,
}

impl SameSite {
    /// The attribute value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

impl Sticky {
    /// The cookie name in effect (cookie mode).
    pub fn cookie_name(&self) -> &str {
        self.cookie.as_deref().unwrap_or(DEFAULT_COOKIE_NAME)
    }

    /// Whether `Secure` is added (default false).
    pub fn secure(&self) -> bool {
        self.cookie_secure.unwrap_or(false)
    }

    /// Whether `HttpOnly` is added (default true).
    pub fn http_only(&self) -> bool {
        self.cookie_http_only.unwrap_or(true)
    }

    /// The `SameSite` attribute in effect (default lax).
    pub fn same_site(&self) -> SameSite {
        self.cookie_same_site.unwrap_or_default()
    }

    /// The binding lifetime in effect (default 30 minutes).
    pub fn ttl(&self) -> HumanDuration {
        self.ttl.unwrap_or(HumanDuration::from_secs(30 * 60))
    }

    /// The store in effect (default raft).
    pub fn store(&self) -> StickyStore {
        self.store.unwrap_or_default()
    }

    /// The bound on the pool's table in effect.
    pub fn max_entries(&self) -> u64 {
        self.max_entries.unwrap_or(crate::sticky_table::DEFAULT_MAX_ENTRIES)
    }
}

fn child(at: &KeyPath, key: &str) -> KeyPath {
    let mut p = at.0.clone();
    p.push(PathSegment::Key(key.to_owned()));
    KeyPath(p)
}

/// Checks one pool's sticky table (at `at`, e.g. `pools.web.sticky`). `tcp_users` names the tcp
/// listeners that use the pool: they see bytes, not requests, so no mode can apply to them.
pub fn check(s: &Sticky, at: &KeyPath, tcp_users: &[&str], report: &mut impl FnMut(KeyPath, String)) {
    let mode = s.mode.as_str();
    if !tcp_users.is_empty() {
        report(
            child(at, "mode"),
            format!("sticky sessions apply to HTTP requests; tcp listener(s) {} use this pool", tcp_users.join(", ")),
        );
    }
    let not_for = |key: &str, modes: &str| format!("{key} applies only to mode = {modes} (this pool is {mode})");
    let cookie_keys: [(&str, bool); 6] = [
        ("cookie", s.cookie.is_some()),
        ("cookie_max_age", s.cookie_max_age.is_some()),
        ("cookie_secure", s.cookie_secure.is_some()),
        ("cookie_http_only", s.cookie_http_only.is_some()),
        ("cookie_same_site", s.cookie_same_site.is_some()),
        ("cookie_secret", s.cookie_secret.is_some()),
    ];
    let store_keys: [(&str, bool); 4] = [
        ("ttl", s.ttl.is_some()),
        ("store", s.store.is_some()),
        ("redis", s.redis.is_some()),
        ("max_entries", s.max_entries.is_some()),
    ];
    let learn_keys: [(&str, bool); 2] =
        [("learn_cookie", s.learn_cookie.is_some()), ("learn_header", s.learn_header.is_some())];

    match s.mode {
        StickyMode::Cookie => {
            for (key, set) in store_keys.iter().chain(&learn_keys) {
                if *set {
                    report(child(at, key), not_for(key, "\"source_ip\" or \"learn\""));
                }
            }
            if cookie_token(s.cookie_name()).is_err() {
                report(
                    child(at, "cookie"),
                    format!("{:?} is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~)", s.cookie_name()),
                );
            }
            if s.cookie_max_age.is_some_and(|d| d.get().as_secs() == 0) {
                report(child(at, "cookie_max_age"), "must be at least 1s (omit it for a session cookie)".into());
            }
            if s.same_site() == SameSite::None && !s.secure() {
                report(
                    child(at, "cookie_same_site"),
                    "SameSite=None needs cookie_secure = true (browsers drop the cookie otherwise)".into(),
                );
            }
            if let Some(secret) = &s.cookie_secret {
                if secret.len() < MIN_COOKIE_SECRET_BYTES {
                    report(
                        child(at, "cookie_secret"),
                        format!(
                            "too short ({} bytes); use a random string of at least {MIN_COOKIE_SECRET_BYTES}",
                            secret.len()
                        ),
                    );
                }
            }
        }
        StickyMode::SourceIp | StickyMode::Learn => {
            for (key, set) in &cookie_keys {
                if *set {
                    report(child(at, key), not_for(key, "\"cookie\""));
                }
            }
            if s.ttl().get().is_zero() {
                report(child(at, "ttl"), "must be greater than zero".into());
            }
            match (s.store(), &s.redis) {
                (StickyStore::Redis, None) => report(
                    child(at, "redis"),
                    "store = \"redis\" needs the server's address, e.g. redis = \"redis://127.0.0.1:6379\"".into(),
                ),
                (StickyStore::Redis, Some(url)) => {
                    if let Err(reason) = check_redis_url(url) {
                        report(child(at, "redis"), reason);
                    }
                }
                (other, Some(_)) => report(
                    child(at, "redis"),
                    format!("redis applies only to store = \"redis\" (this pool's store is {})", other.as_str()),
                ),
                (_, None) => {}
            }
            check_max_entries(s, at, report);
            if s.mode == StickyMode::SourceIp {
                for (key, set) in &learn_keys {
                    if *set {
                        report(child(at, key), not_for(key, "\"learn\""));
                    }
                }
            } else {
                match (&s.learn_cookie, &s.learn_header) {
                    (None, None) => report(
                        child(at, "learn_cookie"),
                        "mode = \"learn\" needs learn_cookie (e.g. \"JSESSIONID\") or learn_header \
                         (e.g. \"x-session-id\")"
                            .into(),
                    ),
                    (Some(_), Some(_)) => {
                        report(child(at, "learn_header"), "give learn_cookie or learn_header, not both".into())
                    }
                    (Some(c), None) if cookie_token(c).is_err() => {
                        report(child(at, "learn_cookie"), format!("{c:?} is not a valid cookie name"))
                    }
                    (None, Some(h)) if cookie_token(h).is_err() => {
                        report(child(at, "learn_header"), format!("{h:?} is not a valid header name"))
                    }
                    _ => {}
                }
            }
        }
    }
}

fn check_max_entries(s: &Sticky, at: &KeyPath, report: &mut impl FnMut(KeyPath, String)) {
    use crate::sticky_table::MAX_ENTRIES_LIMIT;
    let Some(n) = s.max_entries else { return };
    if s.store() == StickyStore::Redis {
        report(
            child(at, "max_entries"),
            "max_entries bounds keel's own table (store = \"raft\" or \"local\"); Redis drops bindings by their ttl"
                .into(),
        );
    } else if n == 0 {
        report(child(at, "max_entries"), "must be at least 1".into());
    } else if n > MAX_ENTRIES_LIMIT {
        report(
            child(at, "max_entries"),
            format!(
                "{n} is above the limit of {MAX_ENTRIES_LIMIT}: every node keeps every entry in memory \
                 (65 bytes an IPv4 key to 250 a session id, so {MAX_ENTRIES_LIMIT} ≈ 0.65–2.5 GB); use store = \"redis\" for more sessions"
            ),
        );
    }
}

fn check_redis_url(url: &str) -> Result<(), String> {
    let rest = if let Some(r) = url.strip_prefix("redis://") {
        r
    } else if let Some(r) = url.strip_prefix("redis+unix://").or_else(|| url.strip_prefix("unix://")) {
        return if r.is_empty() { Err(format!("{url:?} names no socket path")) } else { Ok(()) };
    } else if url.starts_with("rediss://") {
        return Err("TLS to Redis (rediss://) is not supported; use redis:// on a trusted network".into());
    } else {
        return Err(format!("{url:?} is not a Redis URL; write it like \"redis://127.0.0.1:6379\""));
    };
    let host = rest.rsplit('@').next().unwrap_or(rest);
    if host.is_empty() || host.starts_with('/') || host.starts_with(':') {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

/// An RFC 6265 cookie-name is an RFC 9110 token.
use crate::model::http_token as cookie_token;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    fn problems(sticky: &str) -> Vec<String> {
        let text = format!(
            "[listeners.web]\nbind = \"127.0.0.1:8080\"\ndefault_pool = \"app\"\n\
             [pools.app]\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [pools.app.sticky]\n{sticky}\n"
        );
        let c: Config = toml::from_str(&text).expect("parses");
        match c.validate() {
            Ok(()) => vec![],
            Err(ps) => ps.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn valid_tables_pass() {
        assert_eq!(problems("mode = \"cookie\""), Vec::<String>::new());
        assert_eq!(
            problems(
                "mode = \"cookie\"\ncookie = \"SRV\"\ncookie_max_age = \"1h\"\ncookie_secret = \"0123456789abcdef\""
            ),
            Vec::<String>::new()
        );
        assert_eq!(problems("mode = \"source_ip\"\nttl = \"10m\"\nstore = \"local\""), Vec::<String>::new());
        assert_eq!(
            problems("mode = \"learn\"\nlearn_cookie = \"JSESSIONID\"\nstore = \"redis\"\nredis = \"redis://r:6379\""),
            Vec::<String>::new()
        );
    }

    #[test]
    fn reports_mode_mistakes_with_paths() {
        let p = problems("mode = \"source_ip\"\nstore = \"redis\"");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("pools.app.sticky.redis:") && p[0].contains("needs the server"), "{p:?}");
        let p = problems("mode = \"learn\"");
        assert!(p[0].starts_with("pools.app.sticky.learn_cookie:"), "{p:?}");
        let p = problems("mode = \"learn\"\nlearn_cookie = \"A\"\nlearn_header = \"x-b\"");
        assert!(p[0].contains("not both"), "{p:?}");
        let p = problems("mode = \"cookie\"\ncookie = \"bad name;\"");
        assert!(p[0].starts_with("pools.app.sticky.cookie:") && p[0].contains("not a valid cookie name"), "{p:?}");
        let p = problems("mode = \"cookie\"\nttl = \"1m\"");
        assert!(p[0].starts_with("pools.app.sticky.ttl:") && p[0].contains("only to mode"), "{p:?}");
        let p = problems("mode = \"cookie\"\ncookie_same_site = \"none\"");
        assert!(p[0].contains("cookie_secure"), "{p:?}");
        let p = problems("mode = \"cookie\"\ncookie_secret = \"short\"");
        assert!(p[0].contains("too short"), "{p:?}");
        let p = problems("mode = \"source_ip\"\nstore = \"redis\"\nredis = \"http://x\"");
        assert!(p[0].contains("not a Redis URL"), "{p:?}");
        let p = problems("mode = \"source_ip\"\ncookie = \"X\"\nlearn_header = \"x-a\"");
        assert_eq!(p.len(), 2, "{p:?}");
    }

    #[test]
    fn max_entries_is_bounded_and_only_for_keels_own_tables() {
        assert_eq!(problems("mode = \"source_ip\"\nmax_entries = 300000"), Vec::<String>::new());
        assert_eq!(
            problems("mode = \"learn\"\nlearn_header = \"x-s\"\nstore = \"local\"\nmax_entries = 1"),
            Vec::<String>::new()
        );
        let p = problems("mode = \"source_ip\"\nmax_entries = 0");
        assert!(p[0].starts_with("pools.app.sticky.max_entries:") && p[0].contains("at least 1"), "{p:?}");
        let p = problems("mode = \"source_ip\"\nmax_entries = 10000001");
        assert!(p[0].contains("above the limit of 10000000") && p[0].contains("memory"), "{p:?}");
        let p = problems("mode = \"source_ip\"\nstore = \"redis\"\nredis = \"redis://r:6379\"\nmax_entries = 5");
        assert!(p[0].contains("Redis drops bindings"), "{p:?}");
        let p = problems("mode = \"cookie\"\nmax_entries = 5");
        assert!(p[0].starts_with("pools.app.sticky.max_entries:") && p[0].contains("only to mode"), "{p:?}");
    }

    #[test]
    fn unknown_keys_and_modes_are_errors() {
        let text = "mode = \"cookies\"";
        let r: Result<Sticky, _> = toml::from_str(text);
        assert!(r.is_err());
        let r: Result<Sticky, _> = toml::from_str("mode = \"cookie\"\ncokie = \"A\"");
        assert!(r.unwrap_err().to_string().contains("cokie"));
    }

    #[test]
    fn sticky_tables_round_trip_through_toml_json_and_the_log_codec() {
        let text = "[listeners.web]\nbind = \"127.0.0.1:8080\"\ndefault_pool = \"app\"\n\
                    [pools.app]\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
                    [pools.app.sticky]\nmode = \"cookie\"\ncookie_secret = \"0123456789abcdef\"\n\
                    cookie_max_age = \"2h\"\ncookie_same_site = \"strict\"\n";
        let c: Config = toml::from_str(text).expect("parses");
        let back: Config = toml::from_str(&toml::to_string(&c).expect("toml")).expect("reparses");
        assert_eq!(back, c);
        let json: Config = serde_json::from_str(&serde_json::to_string(&c).expect("json")).expect("json back");
        assert_eq!(json, c);
        let cmd = crate::Command::ApplyConfig(c.clone());
        let decoded: crate::Command = crate::codec::decode(&crate::codec::encode(&cmd).expect("enc")).expect("dec");
        assert_eq!(decoded, cmd, "the secret is replicated with the config");
        let s = c.pools["app"].sticky.as_ref().expect("sticky");
        assert_eq!((s.same_site(), s.http_only(), s.cookie_name()), (SameSite::Strict, true, "KEELID"));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let s: Sticky = toml::from_str("mode = \"cookie\"\ncookie_secret = \"supersecretvalue123\"").expect("parses");
        let d = format!("{s:?}");
        assert!(!d.contains("supersecret") && d.contains("redacted"), "{d}");
    }
}
