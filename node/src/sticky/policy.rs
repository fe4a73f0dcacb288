//! [`StickyPolicy`]: one pool's sticky mode applied to one request — which server the client is
//! bound to ([`StickyPolicy::lookup`], before the balancer picks) and what to remember or tell
//! the client once a server answered ([`StickyPolicy::on_response`]).
//!
//! A binding is only honoured while its server exists in the pool and `is_eligible()` (up, not
//! drained, not ejected); otherwise the request falls back to the pool's algorithm and the
//! binding is rewritten (cookie re-issued, store entry replaced) to the server that answered.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, SET_COOKIE};
use http::{HeaderMap, HeaderValue};
use keel_cluster::model::{self, StickyMode};

use super::cookie::{self, ServerIds};
use super::{SessionStore, StickyError, MAX_KEY_BYTES};
use crate::pool::ServerState;

/// A client's address as `source_ip` stickiness keys it (an IPv4-mapped address as IPv4).
/// Formatted once per client connection: per request it cost as much as the lookup itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceKey(String);

impl From<IpAddr> for SourceKey {
    fn from(ip: IpAddr) -> Self {
        SourceKey(crate::proxy::headers::ip_text(ip.to_canonical()))
    }
}

/// Counters of one pool's stickiness. Kept by [`super::StickyRuntime`] across config reloads.
#[derive(Debug, Default)]
pub struct StickyCounters {
    /// Requests sent to the server their binding named.
    pub hits: AtomicU64,
    /// Requests with no usable binding (none, unknown server, server not eligible, store error).
    pub misses: AtomicU64,
    /// Lookups the store could not answer (the request fell back to the algorithm).
    pub store_errors: AtomicU64,
    /// Cookies keel set (first visits and re-issues).
    pub cookies_issued: AtomicU64,
    /// Bindings learned from responses (learn mode) or stored for a client address.
    pub learned: AtomicU64,
}

enum Mode {
    Cookie { name: String, ids: ServerIds, attributes: String },
    SourceIp,
    LearnCookie(String),
    LearnHeader(HeaderName),
}

/// One pool's sticky policy. Cheap to call; build it with [`StickyPolicy::new`] or, with stores
/// and counters that survive reloads, [`super::StickyRuntime::policy`].
pub struct StickyPolicy {
    pool: String,
    mode: Mode,
    store: Option<Arc<dyn SessionStore>>,
    ttl: Duration,
    counters: Arc<StickyCounters>,
}

impl StickyPolicy {
    /// The policy for pool `pool` (its config `pool_config`, whose `sticky` must be set, and
    /// the names of its servers as built — servers resolved from a DNS name included) using
    /// `store` for source_ip / learn modes (ignored in cookie mode, required otherwise).
    pub fn new(
        pool: &str,
        pool_config: &model::Pool,
        servers: &[&str],
        store: Option<Arc<dyn SessionStore>>,
        counters: Arc<StickyCounters>,
    ) -> Result<Self, StickyError> {
        let sticky =
            pool_config.sticky.as_ref().ok_or_else(|| StickyError::Config(format!("pool {pool:?} is not sticky")))?;
        let mode = match sticky.mode {
            StickyMode::Cookie => Mode::Cookie {
                name: sticky.cookie_name().to_owned(),
                ids: ServerIds::new(sticky.cookie_secret.as_deref(), pool, servers.iter().copied())?,
                attributes: cookie::attributes(sticky),
            },
            StickyMode::SourceIp => Mode::SourceIp,
            StickyMode::Learn => match (&sticky.learn_cookie, &sticky.learn_header) {
                (Some(c), None) => Mode::LearnCookie(c.clone()),
                (None, Some(h)) => Mode::LearnHeader(
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| StickyError::Config(format!("{h:?} is not a header name")))?,
                ),
                _ => return Err(StickyError::Config("learn needs exactly one of learn_cookie, learn_header".into())),
            },
        };
        let store = match mode {
            Mode::Cookie { .. } => None,
            _ => Some(store.ok_or_else(|| StickyError::Config(format!("pool {pool:?} needs a session store")))?),
        };
        Ok(StickyPolicy { pool: pool.to_owned(), mode, store, ttl: sticky.ttl().get(), counters })
    }

    /// The pool index of the server this request is bound to, if that server exists and is
    /// eligible. Call before `pool.select`; on `Some(i)` send the request to server `i` (if it
    /// fails to connect, retry with `select` as usual and pass the final choice to
    /// [`Self::on_response`]).
    pub async fn lookup(
        &self,
        req_headers: &HeaderMap,
        source: &SourceKey,
        servers: &[Arc<ServerState>],
    ) -> Option<usize> {
        let found = match &self.mode {
            Mode::Cookie { name, ids, .. } => cookie::request_cookie(req_headers, name)
                .and_then(|v| ids.name_of(v))
                .and_then(|n| index_of(servers, n)),
            _ => match self.request_key(req_headers, source) {
                Some(key) => match self.store_get(key).await {
                    Some(server) => index_of(servers, &server),
                    None => None,
                },
                None => None,
            },
        };
        let hit = found.filter(|i| servers.get(*i).is_some_and(|s| s.is_eligible()));
        let counter = if hit.is_some() { &self.counters.hits } else { &self.counters.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        hit
    }

    async fn store_get(&self, key: &str) -> Option<String> {
        let store = self.store.as_ref()?;
        match store.get(&self.pool, key).await {
            Ok(found) => found,
            Err(_) => {
                // The store counts and logs its own errors (throttled); here it is one more
                // request that fell back to the algorithm.
                self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// After the response head from server `chosen` arrived: in cookie mode, sets the cookie
    /// unless the client already holds the right one or the response sets that cookie itself;
    /// in source_ip mode, binds the client address to `chosen` (refreshing it on a hit); in learn
    /// mode, binds the session value the response hands out, and on a hit refreshes the binding
    /// of the value the request carried. A value only a client sent never creates a binding: the
    /// server must have handed it out, so random ids cannot flood the store (or the Raft log).
    /// `was_sticky_hit` must be `lookup(..) == Some(chosen)` (false after a retry moved the
    /// request elsewhere). Never blocks.
    pub fn on_response(
        &self,
        chosen: usize,
        was_sticky_hit: bool,
        req_headers: &HeaderMap,
        source: &SourceKey,
        resp_headers: &mut HeaderMap,
        servers: &[Arc<ServerState>],
    ) {
        let Some(server) = servers.get(chosen) else { return };
        match &self.mode {
            Mode::Cookie { name, ids, attributes } => {
                let Some(id) = ids.id_of(&server.name) else { return };
                // The client already holds the right cookie (a hit, or a retry that landed
                // where the cookie points), or the application sets that cookie itself.
                if cookie::request_cookie(req_headers, name) == Some(id.as_str())
                    || cookie::response_sets(resp_headers, name)
                {
                    return;
                }
                if let Ok(v) = HeaderValue::from_str(&format!("{name}={id}{attributes}")) {
                    resp_headers.append(SET_COOKIE, v);
                    self.counters.cookies_issued.fetch_add(1, Ordering::Relaxed);
                }
            }
            Mode::SourceIp => {
                if let Some(key) = self.request_key(req_headers, source) {
                    self.put(key, &server.name, !was_sticky_hit);
                }
            }
            Mode::LearnCookie(name) => {
                if let Some(v) = cookie::response_cookie(resp_headers, name).filter(|v| valid_key(v)) {
                    self.put(v, &server.name, true);
                }
                if was_sticky_hit {
                    if let Some(v) = cookie::request_cookie(req_headers, name).filter(|v| valid_key(v)) {
                        self.put(v, &server.name, false);
                    }
                }
            }
            Mode::LearnHeader(name) => {
                if let Some(v) = resp_headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| valid_key(v)) {
                    self.put(v, &server.name, true);
                }
                if was_sticky_hit {
                    if let Some(v) = req_headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| valid_key(v)) {
                        self.put(v, &server.name, false);
                    }
                }
            }
        }
    }

    fn put(&self, key: &str, server: &str, learned: bool) {
        if let Some(store) = &self.store {
            store.put(&self.pool, key, server, self.ttl);
            if learned {
                self.counters.learned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether [`StickyPolicy::on_response`] reads the request's headers (cookie and learn
    /// modes); in `source_ip` mode the proxy need not keep a copy of them.
    pub fn reads_request_headers_on_response(&self) -> bool {
        !matches!(self.mode, Mode::SourceIp)
    }

    /// The store key of a request: the client address (IPv4-mapped addresses as IPv4), or the
    /// learned cookie / header value the request carries.
    fn request_key<'a>(&self, req_headers: &'a HeaderMap, source: &'a SourceKey) -> Option<&'a str> {
        match &self.mode {
            Mode::Cookie { .. } => None,
            Mode::SourceIp => Some(&source.0),
            Mode::LearnCookie(name) => cookie::request_cookie(req_headers, name).filter(|v| valid_key(v)),
            Mode::LearnHeader(name) => req_headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| valid_key(v)),
        }
    }

    /// The pool this policy serves.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// "cookie", "source_ip" or "learn".
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Cookie { .. } => "cookie",
            Mode::SourceIp => "source_ip",
            Mode::LearnCookie(_) | Mode::LearnHeader(_) => "learn",
        }
    }

    /// The store in use ("local", "raft", "redis"), `None` in cookie mode.
    pub fn store_kind(&self) -> Option<&'static str> {
        self.store.as_ref().map(|s| s.kind())
    }

    /// Requests sent to their bound server.
    pub fn hits(&self) -> u64 {
        self.counters.hits.load(Ordering::Relaxed)
    }

    /// Requests without a usable binding.
    pub fn misses(&self) -> u64 {
        self.counters.misses.load(Ordering::Relaxed)
    }

    /// Lookups the store could not answer.
    pub fn store_errors(&self) -> u64 {
        self.counters.store_errors.load(Ordering::Relaxed)
    }

    /// Writes the store dropped because its queue was full (a shared store's total).
    pub fn dropped_writes(&self) -> u64 {
        self.store.as_ref().map_or(0, |s| s.stats().dropped)
    }

    /// Cookies set (cookie mode).
    pub fn cookies_issued(&self) -> u64 {
        self.counters.cookies_issued.load(Ordering::Relaxed)
    }

    /// Bindings learned from responses or stored for new client addresses.
    pub fn learned(&self) -> u64 {
        self.counters.learned.load(Ordering::Relaxed)
    }

    /// The store's own counters (`None` in cookie mode).
    pub fn store_stats(&self) -> Option<super::StoreStats> {
        self.store.as_ref().map(|s| s.stats())
    }
}

fn valid_key(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_KEY_BYTES
}

fn index_of(servers: &[Arc<ServerState>], name: &str) -> Option<usize> {
    servers.iter().position(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering as O;

    use http::header::COOKIE;
    use keel_cluster::model::Server;

    use super::super::test_clock::manual;
    use super::super::MemorySessionStore;
    use super::*;
    use crate::pool::Pool;

    fn pool_config(sticky: &str) -> model::Pool {
        let text = format!(
            "[[servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [[servers]]\nname = \"b\"\naddress = \"127.0.0.1:9002\"\n\
             [[servers]]\nname = \"c\"\naddress = \"127.0.0.1:9003\"\n[sticky]\n{sticky}\n"
        );
        toml::from_str(&text).unwrap()
    }

    fn servers(cfg: &model::Pool) -> Vec<Arc<ServerState>> {
        cfg.servers
            .iter()
            .map(|s: &Server| Arc::new(ServerState::new(&crate::pool::ServerSpec::literal(s).expect("an IP literal"))))
            .collect()
    }

    fn req(name: http::header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(name, HeaderValue::from_str(value).unwrap());
        h
    }

    fn set_cookies(h: &HeaderMap) -> Vec<String> {
        h.get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));

    #[tokio::test]
    async fn cookie_round_trip_and_reissue_on_unknown_or_down_server() {
        let cfg = pool_config("mode = \"cookie\"\ncookie_secret = \"test-secret-0123456789\"\ncookie_max_age = \"1h\"");
        let srv = servers(&cfg);
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], None, Arc::default()).unwrap();

        // First visit: no cookie → miss; the response to server b carries keel's cookie.
        let none = HeaderMap::new();
        assert_eq!(p.lookup(&none, &IP.into(), &srv).await, None);
        let mut resp = HeaderMap::new();
        p.on_response(1, false, &none, &IP.into(), &mut resp, &srv);
        let issued = set_cookies(&resp);
        assert_eq!(issued.len(), 1);
        assert!(issued[0].ends_with("; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"), "{}", issued[0]);
        assert!(!issued[0].contains("=b;"), "the cookie does not name the server: {}", issued[0]);
        let value = issued[0].split(';').next().unwrap().to_owned();

        // Next visit with that cookie → b, and no new cookie.
        let back = req(COOKIE, &format!("theme=dark; {value}"));
        assert_eq!(p.lookup(&back, &IP.into(), &srv).await, Some(1));
        let mut resp = HeaderMap::new();
        p.on_response(1, true, &back, &IP.into(), &mut resp, &srv);
        assert!(set_cookies(&resp).is_empty());
        assert_eq!((p.hits(), p.misses()), (1, 1));

        // b goes down → fall back, and the answering server's cookie is issued.
        srv[1].outlier.observe(false, crate::pool::now_millis(), 1, Duration::from_secs(60));
        assert!(!srv[1].is_eligible());
        assert_eq!(p.lookup(&back, &IP.into(), &srv).await, None);
        let mut resp = HeaderMap::new();
        p.on_response(2, false, &back, &IP.into(), &mut resp, &srv);
        let reissued = set_cookies(&resp);
        assert_eq!(reissued.len(), 1);
        assert_ne!(reissued[0].split(';').next().unwrap(), value);

        // An unknown or forged id is a miss and gets re-issued too.
        let forged = req(COOKIE, "KEELID=b");
        assert_eq!(p.lookup(&forged, &IP.into(), &srv).await, None);
        let mut resp = HeaderMap::new();
        p.on_response(0, false, &forged, &IP.into(), &mut resp, &srv);
        assert_eq!(set_cookies(&resp).len(), 1);
        assert_eq!(p.cookies_issued(), 3);
    }

    #[tokio::test]
    async fn cookie_is_not_duplicated_when_the_response_sets_it() {
        let cfg = pool_config("mode = \"cookie\"\ncookie = \"SRV\"\ncookie_http_only = false\ncookie_secure = true");
        let srv = servers(&cfg);
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], None, Arc::default()).unwrap();
        let mut resp = req(SET_COOKIE, "SRV=fromapp; Path=/");
        p.on_response(0, false, &HeaderMap::new(), &IP.into(), &mut resp, &srv);
        assert_eq!(set_cookies(&resp), ["SRV=fromapp; Path=/"]);
        let mut resp = HeaderMap::new();
        p.on_response(0, false, &HeaderMap::new(), &IP.into(), &mut resp, &srv);
        assert!(set_cookies(&resp)[0].ends_with("; Path=/; Secure; SameSite=Lax"), "{:?}", set_cookies(&resp));
    }

    #[tokio::test]
    async fn source_ip_sticks_and_expires() {
        let cfg = pool_config("mode = \"source_ip\"\nttl = \"10s\"\nstore = \"local\"");
        let srv = servers(&cfg);
        let (clock, now) = manual(1_000_000);
        let store: Arc<dyn SessionStore> = Arc::new(MemorySessionStore::new(clock));
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], Some(store), Arc::default()).unwrap();
        let h = HeaderMap::new();
        assert_eq!(p.lookup(&h, &IP.into(), &srv).await, None);
        p.on_response(2, false, &h, &IP.into(), &mut HeaderMap::new(), &srv);
        assert_eq!(p.lookup(&h, &IP.into(), &srv).await, Some(2));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(p.lookup(&h, &mapped.into(), &srv).await, Some(2), "IPv4-mapped is the same client");
        assert_eq!(p.lookup(&h, &"10.0.0.8".parse::<IpAddr>().unwrap().into(), &srv).await, None);
        now.fetch_add(10_001, O::SeqCst);
        assert_eq!(p.lookup(&h, &IP.into(), &srv).await, None, "expired");
        // A pool built on the same pool with a drained server falls back.
        p.on_response(0, false, &h, &IP.into(), &mut HeaderMap::new(), &srv);
        let pool = Pool::new("app", &cfg, |s| srv.iter().find(|x| x.name == s.name).cloned()).unwrap();
        pool.set_draining("a", true).unwrap();
        assert_eq!(p.lookup(&h, &IP.into(), &pool.servers).await, None, "a drained server is not sticky");
    }

    #[tokio::test]
    async fn learn_from_set_cookie_then_follow_the_clients_cookie() {
        let cfg = pool_config("mode = \"learn\"\nlearn_cookie = \"JSESSIONID\"\nstore = \"local\"");
        let srv = servers(&cfg);
        let (clock, _) = manual(1_000);
        let store: Arc<dyn SessionStore> = Arc::new(MemorySessionStore::new(clock));
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], Some(store), Arc::default()).unwrap();
        let none = HeaderMap::new();
        assert_eq!(p.lookup(&none, &IP.into(), &srv).await, None);
        let mut resp = req(SET_COOKIE, "JSESSIONID=s3ss10n; Path=/; HttpOnly");
        p.on_response(1, false, &none, &IP.into(), &mut resp, &srv);
        assert_eq!(set_cookies(&resp).len(), 1, "learn mode adds no cookie");
        let other_ip: IpAddr = "192.0.2.1".parse().unwrap();
        let back = req(COOKIE, "a=1; JSESSIONID=s3ss10n");
        assert_eq!(
            p.lookup(&back, &other_ip.into(), &srv).await,
            Some(1),
            "the session follows the cookie, not the address"
        );
        let forged = req(COOKIE, "JSESSIONID=made-up");
        assert_eq!(p.lookup(&forged, &IP.into(), &srv).await, None);
        p.on_response(0, false, &forged, &IP.into(), &mut HeaderMap::new(), &srv);
        assert_eq!(p.lookup(&forged, &IP.into(), &srv).await, None, "a value only the client sent is not stored");
        assert_eq!(p.learned(), 1);
    }

    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn lookup_is_send_for_hyper_services() {
        let cfg = pool_config("mode = \"source_ip\"");
        let (clock, _) = manual(0);
        let p = StickyPolicy::new(
            "app",
            &cfg,
            &["a", "b", "c"],
            Some(Arc::new(MemorySessionStore::new(clock))),
            Arc::default(),
        )
        .unwrap();
        let srv = servers(&cfg);
        let h = HeaderMap::new();
        assert_send(&p.lookup(&h, &IP.into(), &srv));
    }

    #[tokio::test]
    async fn learn_from_a_header() {
        let cfg = pool_config("mode = \"learn\"\nlearn_header = \"x-session-id\"\nstore = \"local\"");
        let srv = servers(&cfg);
        let (clock, _) = manual(1_000);
        let store: Arc<dyn SessionStore> = Arc::new(MemorySessionStore::new(clock));
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], Some(store), Arc::default()).unwrap();
        let name = HeaderName::from_static("x-session-id");
        let mut resp = req(name.clone(), "abc123");
        p.on_response(2, false, &HeaderMap::new(), &IP.into(), &mut resp, &srv);
        assert_eq!(p.lookup(&req(name.clone(), "abc123"), &IP.into(), &srv).await, Some(2));
        let huge = "x".repeat(MAX_KEY_BYTES + 1);
        assert_eq!(p.lookup(&req(name, &huge), &IP.into(), &srv).await, None, "oversized keys are never looked up");
    }

    struct Failing;
    impl SessionStore for Failing {
        fn get<'a>(&'a self, _: &'a str, _: &'a str) -> super::super::StoreGet<'a> {
            super::super::StoreGet::ready(Err(super::super::StoreError::Unavailable("down".into())))
        }
        fn put(&self, _: &str, _: &str, _: &str, _: Duration) {}
        fn stats(&self) -> super::super::StoreStats {
            super::super::StoreStats::default()
        }
        fn kind(&self) -> &'static str {
            "failing"
        }
    }

    #[tokio::test]
    async fn a_failing_store_falls_back_and_counts() {
        let cfg = pool_config("mode = \"source_ip\"");
        let srv = servers(&cfg);
        let p = StickyPolicy::new("app", &cfg, &["a", "b", "c"], Some(Arc::new(Failing)), Arc::default()).unwrap();
        assert_eq!(p.lookup(&HeaderMap::new(), &IP.into(), &srv).await, None);
        assert_eq!((p.store_errors(), p.misses()), (1, 1));
    }
}
