//! First-match routing: which pool serves a request, by host, path prefix and header.
//!
//! Routes are compiled once per config (lower-cased hosts, parsed header names) so matching a
//! request is a handful of byte comparisons with no allocation.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use std::time::Instant;

use keel_cluster::model::{self, RateLimit};

use crate::ratelimit::RateLimiter;

use crate::pool::Pool;
use crate::proxy::header_rules::{CompiledRules, RuleChain};

/// A host condition: exact name, or any subdomain of a suffix ("*.example.com").
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostMatch {
    Exact(String),
    /// Holds ".example.com".
    Suffix(String),
}

impl HostMatch {
    fn new(host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        match host.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostMatch::Suffix(suffix.to_owned()),
            _ => HostMatch::Exact(host),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h.eq_ignore_ascii_case(host),
            HostMatch::Suffix(s) => {
                host.len() > s.len() && host.is_char_boundary(host.len() - s.len()) && {
                    let tail = &host[host.len() - s.len()..];
                    tail.eq_ignore_ascii_case(s)
                }
            }
        }
    }
}

/// One compiled route.
pub struct Route {
    host: Option<HostMatch>,
    path_prefix: Option<String>,
    header: Option<(HeaderName, Option<HeaderValue>)>,
    /// The pool that serves matching requests.
    pub pool: Arc<Pool>,
    /// The route's own rate limit, replacing the listener's.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// The route's header rules, applied after the listener's.
    headers: Option<Arc<CompiledRules>>,
}

/// A listener's routing table.
pub struct Router {
    routes: Vec<Route>,
    default_pool: Option<Arc<Pool>>,
    /// The listener's rate limit.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Answer everything with a redirect to https on this port.
    pub redirect_https_port: Option<u16>,
    /// The listener's header rules.
    pub headers: Option<Arc<CompiledRules>>,
}

/// Where a request goes.
pub struct Decision<'a> {
    /// The pool.
    pub pool: &'a Arc<Pool>,
    /// The rate limit that applies, if any.
    pub rate_limit: Option<&'a Arc<RateLimiter>>,
    /// The route's header rules, if any (the listener's are [`Router::headers`]).
    pub route_headers: Option<&'a Arc<CompiledRules>>,
}

/// The limiter for `config`: the previous one when its settings did not change (so clients keep
/// their buckets across a reload), else a new one.
fn limiter(config: Option<&RateLimit>, previous: Option<&Arc<RateLimiter>>) -> Option<Arc<RateLimiter>> {
    let config = config?;
    match previous {
        Some(old) if old.config() == config => Some(old.clone()),
        _ => Some(Arc::new(RateLimiter::new(config, Instant::now()))),
    }
}

/// What a request is matched on.
pub struct RequestView<'a> {
    /// Host without port, if the request named one.
    pub host: Option<&'a str>,
    /// The request path.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a HeaderMap,
}

impl Router {
    /// Compiles a listener's routes; `pool` resolves a pool name (validation guarantees it
    /// exists); rate-limit tables are taken over from `previous` where their settings held.
    pub fn new(
        name: &str,
        listener: &model::Listener,
        pool: impl Fn(&str) -> Option<Arc<Pool>>,
        previous: Option<&Router>,
    ) -> Self {
        let routes = listener
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let header = match &r.header {
                    Some(h) => {
                        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
                        let value = match &h.value {
                            Some(v) => Some(HeaderValue::from_str(v).ok()?),
                            None => None,
                        };
                        Some((name, value))
                    }
                    None => None,
                };
                Some(Route {
                    host: r.host.as_deref().map(HostMatch::new),
                    path_prefix: r.path_prefix.clone(),
                    header,
                    pool: pool(&r.pool)?,
                    rate_limit: limiter(
                        r.rate_limit.as_ref(),
                        previous.and_then(|p| p.routes.get(i)).and_then(|old| old.rate_limit.as_ref()),
                    ),
                    headers: CompiledRules::compile(r.headers.as_ref(), name),
                })
            })
            .collect();
        Router {
            routes,
            default_pool: listener.default_pool.as_deref().and_then(pool),
            rate_limit: limiter(listener.rate_limit.as_ref(), previous.and_then(|p| p.rate_limit.as_ref())),
            redirect_https_port: listener.redirect_to_https.then_some(listener.https_port),
            headers: CompiledRules::compile(listener.headers.as_ref(), name),
        }
    }

    /// The pool for a request: the first route whose every condition holds, else the default.
    pub fn route(&self, req: &RequestView<'_>) -> Option<&Arc<Pool>> {
        self.decide(req).map(|d| d.pool)
    }

    /// The pool for a request and the rate limit that applies to it.
    pub fn decide(&self, req: &RequestView<'_>) -> Option<Decision<'_>> {
        match self.routes.iter().find(|r| r.matches(req)) {
            Some(r) => Some(Decision {
                pool: &r.pool,
                rate_limit: r.rate_limit.as_ref().or(self.rate_limit.as_ref()),
                route_headers: r.headers.as_ref(),
            }),
            None => self.default_pool.as_ref().map(|pool| Decision {
                pool,
                rate_limit: self.rate_limit.as_ref(),
                route_headers: None,
            }),
        }
    }

    /// The header rules a decided request is under.
    pub fn rules(&self, decision: &Decision<'_>) -> RuleChain {
        RuleChain { listener: self.headers.clone(), route: decision.route_headers.cloned() }
    }

    /// Every rate limiter of this listener (listener-wide and per route), for metrics.
    pub fn limiters(&self) -> impl Iterator<Item = &Arc<RateLimiter>> {
        self.rate_limit.iter().chain(self.routes.iter().filter_map(|r| r.rate_limit.as_ref()))
    }
}

impl Route {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(host) = &self.host {
            match req.host {
                Some(h) if host.matches(h) => {}
                _ => return false,
            }
        }
        if let Some(prefix) = &self.path_prefix {
            if !req.path.starts_with(prefix.as_str()) {
                return false;
            }
        }
        if let Some((name, value)) = &self.header {
            match (req.headers.get(name), value) {
                (None, _) => return false,
                (Some(got), Some(want)) if got != want => return false,
                _ => {}
            }
        }
        true
    }
}

/// The host a request names, without port: the URI authority (HTTP/2, absolute-form) or the
/// Host header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(a) = uri.authority() {
        return Some(a.host());
    }
    let raw = headers.get(http::header::HOST)?.to_str().ok()?;
    Some(strip_port(raw))
}

/// A host without its port (`[::1]:8080` → `[::1]`, `a.example:80` → `a.example`).
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: "[::1]:8080" → "[::1]"
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').map_or(host, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { host })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_matching() {
        assert!(HostMatch::new("API.example.com").matches("api.EXAMPLE.com"));
        assert!(!HostMatch::new("api.example.com").matches("example.com"));
        let wild = HostMatch::new("*.example.com");
        assert!(wild.matches("a.example.com"));
        assert!(wild.matches("a.b.Example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
    }

    #[test]
    fn ports_are_stripped_from_host_headers() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }

    fn pool(name: &str) -> Arc<Pool> {
        let cfg: model::Pool = toml::from_str(&format!("[[servers]]\nname = \"{name}\"\naddress = \"127.0.0.1:1\"\n"))
            .expect("pool config");
        Pool::new(name, &cfg, |_| None).expect("plain pool")
    }

    #[tokio::test]
    async fn first_match_wins_then_default() {
        let listener: model::Listener = toml::from_str(
            r#"
            bind = "127.0.0.1:1"
            default_pool = "fallback"
            [[routes]]
            host = "api.example.com"
            path_prefix = "/v1"
            pool = "api"
            [[routes]]
            path_prefix = "/v1"
            pool = "v1"
            [[routes]]
            header = { name = "x-canary", value = "1" }
            pool = "canary"
            [[routes]]
            header = { name = "x-beta" }
            pool = "beta"
            "#,
        )
        .expect("listener config");
        let pools: Vec<_> = ["api", "v1", "canary", "beta", "fallback"].into_iter().map(pool).collect();
        let router = Router::new("web", &listener, |n| pools.iter().find(|p| p.name == n).cloned(), None);
        let mut headers = HeaderMap::new();
        let pick = |host: Option<&str>, path: &str, headers: &HeaderMap| {
            router.route(&RequestView { host, path, headers }).map(|p| p.name.clone())
        };
        assert_eq!(pick(Some("api.example.com"), "/v1/x", &headers).as_deref(), Some("api"));
        assert_eq!(pick(Some("www.example.com"), "/v1/x", &headers).as_deref(), Some("v1"));
        assert_eq!(pick(None, "/other", &headers).as_deref(), Some("fallback"));
        headers.insert("x-canary", HeaderValue::from_static("2"));
        assert_eq!(pick(None, "/", &headers).as_deref(), Some("fallback"));
        headers.insert("x-canary", HeaderValue::from_static("1"));
        assert_eq!(pick(None, "/", &headers).as_deref(), Some("canary"));
        headers.clear();
        headers.insert("x-beta", HeaderValue::from_static("anything"));
        assert_eq!(pick(None, "/", &headers).as_deref(), Some("beta"));
    }
}
