//! The configuration a keel node serves: listeners, their routes, pools and their servers.
//!
//! This is data, not behaviour: the same structs are read from a TOML file today and will be
//! replicated through Raft, so every field is plain serde and every invariant that spans fields
//! lives in [`Config::validate`], which reports *all* problems at once, each with the
//! [`KeyPath`] of the offending key so a caller holding the source text can name the line.
//!
//! Field names are what a HAProxy or nginx operator would guess; every struct denies unknown
//! fields so a typo is an error, never a silently ignored setting.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use crate::access_log_config::{AccessLog, AccessLogField, AccessLogFormat, Destination, Facility, SyslogTarget};
use crate::duration::HumanDuration;
pub use crate::edge::{
    BackendTls, CertificateFiles, Limits, ListenerTls, ProxyProtocol, RateLimit, TlsVersion, MAX_REQUEST_BUFFER,
    MIN_HEADER_BYTES,
};
pub use crate::header_rules::HeaderRules;
pub use crate::retry_config::{Percent, RetryOn};
pub use crate::server_address::{entry_of, resolved_name, ServerAddress};
pub use crate::sticky_config::{SameSite, Sticky, StickyMode, StickyStore};

/// Highest server weight accepted, as in HAProxy (1–256).
pub const MAX_WEIGHT: u32 = 256;

/// Highest retry count accepted: more only multiplies load on a failing pool.
pub const MAX_RETRIES: u32 = 10;

/// The replicated part of a node's configuration: what it listens on and where traffic goes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners by name.
    #[serde(default)]
    pub listeners: BTreeMap<String, Listener>,
    /// Server pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, Pool>,
}

/// Protocol spoken by a listener's clients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, and HTTP/2 with prior knowledge (h2c), on plain TCP.
    #[default]
    Http,
    /// HTTP/1.1 and HTTP/2 (chosen by ALPN) over TLS terminated by keel.
    Https,
    /// Layer 4: bytes spliced between the client and one server of the default pool.
    Tcp,
}

impl Protocol {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
        }
    }
}

/// One listening socket and how its requests are routed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Address to bind, e.g. "0.0.0.0:80".
    pub bind: SocketAddr,
    /// Client-side protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Pool for requests no route matches; without it they get 404.
    #[serde(default)]
    pub default_pool: Option<String>,
    /// Routing rules, tried in order: the first match wins.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// TLS termination; required for `https`, refused otherwise.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Answer every request with a 308 redirect to the same URL over https (http listeners).
    #[serde(default)]
    pub redirect_to_https: bool,
    /// Port named in those redirects.
    #[serde(default = "defaults::https_port")]
    pub https_port: u16,
    /// Per-client rate limit for every request on this listener; routes may override it.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Protection limits (connections, timeouts, sizes).
    #[serde(default)]
    pub limits: Limits,
    /// One line per request (HTTP) or session (tcp); off without the table.
    #[serde(default)]
    pub access_log: Option<AccessLog>,
    /// Header carrying each request's id: kept when the client sent one, generated otherwise,
    /// passed to the server and returned on the response. `""` turns request ids off.
    #[serde(default = "defaults::request_id_header")]
    pub request_id_header: String,
    /// Headers set, added or removed on every request and response of this listener.
    #[serde(default)]
    pub headers: Option<HeaderRules>,
}

/// A routing rule: every condition given must hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Host the request names (port ignored, case-insensitive). A leading "*." matches
    /// any subdomain.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix, e.g. "/api/".
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// A header that must be present, with an exact value when one is given.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    /// Pool that serves matching requests.
    pub pool: String,
    /// Rate limit for requests of this route, replacing the listener's.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Header rules for requests of this route, applied after the listener's.
    #[serde(default)]
    pub headers: Option<HeaderRules>,
}

/// A header condition of a [`Route`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value; without it the header's presence is enough.
    #[serde(default)]
    pub value: Option<String>,
}

/// How a pool picks a server for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Each server in turn.
    #[default]
    RoundRobin,
    /// nginx's smooth weighted round robin: weights 5,1,1 give a,a,b,a,c,a,a.
    WeightedRoundRobin,
    /// Fewest in-flight requests (relative to weight).
    LeastConnections,
    /// Power of two random choices, the less loaded wins (Envoy's default).
    LeastRequestP2c,
    /// Client address on a consistent-hash ring: removing one of N servers remaps ~1/N clients.
    IpHash,
    /// Uniformly random, weighted.
    Random,
}

impl Algorithm {
    /// Every algorithm, in documentation order.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::LeastConnections,
        Algorithm::LeastRequestP2c,
        Algorithm::IpHash,
        Algorithm::Random,
    ];

    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::LeastRequestP2c => "least_request_p2c",
            Algorithm::IpHash => "ip_hash",
            Algorithm::Random => "random",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of interchangeable servers and how to use them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Balancing algorithm.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// The servers.
    pub servers: Vec<Server>,
    /// Active health check; without it only passive outlier detection judges servers.
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: Outlier,
    /// Time allowed to open a TCP connection to a server.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Time allowed from the whole request sent (body included) to the response head; the
    /// upload itself is the client's, bounded by the listener's body limits. Read under its old
    /// name `request_timeout` too.
    #[serde(default = "defaults::response_timeout", alias = "request_timeout")]
    pub response_timeout: HumanDuration,
    /// Bound on everything between the request head received and the response head sent: the
    /// upload, every attempt and retry. Off when absent.
    #[serde(default)]
    pub total_timeout: Option<HumanDuration>,
    /// A server that comes back (check rise, end of an ejection, enable) or is added ramps its
    /// weight from a tenth to full over this time (HAProxy's `slowstart`). Off when absent.
    #[serde(default)]
    pub slow_start: Option<HumanDuration>,
    /// How long an unused pooled connection to a server is kept.
    #[serde(default = "defaults::idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// How many other servers to try after a failure `retry_on` names.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Failures after which another server is tried.
    #[serde(default = "defaults::retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Retries in flight at most this share of the pool's requests in flight…
    #[serde(default = "defaults::retry_budget")]
    pub retry_budget: Percent,
    /// …but always at least this many, so a quiet pool can still retry.
    #[serde(default = "defaults::retry_budget_min")]
    pub retry_budget_min: u32,
    /// The HTTP version spoken to the servers: `http1` (keel's HTTP/1.1 client), `h2c`
    /// (HTTP/2 by prior knowledge, clear text) or `h2` (HTTP/2 over TLS with ALPN `h2`, using
    /// the pool's `tls` table). gRPC needs `h2c` or `h2`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Speak TLS to the servers.
    #[serde(default)]
    pub tls: Option<BackendTls>,
    /// Send a PROXY protocol header to the servers (TCP listeners only).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Sticky sessions: keep a client on the server that served it before.
    #[serde(default)]
    pub sticky: Option<Sticky>,
    /// How often servers given by DNS name are resolved again (nginx's `resolve` with
    /// `valid=`, HAProxy's `hold valid`). Unused by IP literals.
    #[serde(default = "defaults::resolve_interval")]
    pub resolve_interval: HumanDuration,
}

impl Pool {
    /// The configured server that the run-time server `server` comes from: the server of
    /// that name with an IP literal, or the entry with a DNS name that `ENTRY@IP:PORT` was
    /// resolved from. An entry with a DNS name is no server itself.
    pub fn entry(&self, server: &str) -> Option<&Server> {
        let entry = entry_of(server);
        self.servers.iter().find(|s| match s.address {
            ServerAddress::Name { .. } => entry != server && s.name == entry,
            _ => s.name == server,
        })
    }
}

/// One backend server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Name unique within the pool; it appears in logs, metrics and the admin API.
    pub name: String,
    /// Address: an IP literal ("10.0.1.1:8080") or a DNS name ("app.internal:8080") that the
    /// node resolves every `resolve_interval`, each resolved address becoming a server.
    pub address: ServerAddress,
    /// Relative share of traffic, 1–256.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
}

/// The HTTP version a pool speaks to its servers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, plain or TLS (with a `tls` table), one request per connection at a time.
    #[default]
    Http1,
    /// HTTP/2 by prior knowledge over clear text: streams multiplexed on shared connections.
    H2c,
    /// HTTP/2 over TLS, ALPN `h2`: needs the pool's `tls` table.
    H2,
}

impl UpstreamProtocol {
    /// The name used in config files.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::H2 => "h2",
        }
    }

    /// Whether it is HTTP/2 (either form).
    pub fn is_h2(self) -> bool {
        !matches!(self, UpstreamProtocol::Http1)
    }
}

/// Kind of active health check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// An HTTP request whose status must fall in `expect_status`.
    #[default]
    Http,
    /// A TCP connect.
    Tcp,
    /// gRPC's standard health service, `grpc.health.v1.Health/Check` (service ""), over the
    /// pool's HTTP/2 (`h2c`, or `h2` with its TLS): healthy when it answers `SERVING`.
    Grpc,
}

/// Active health check, with HAProxy's hysteresis: `fall` consecutive failures mark a server
/// down, `rise` consecutive successes mark it up again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// "http", "tcp" or "grpc".
    #[serde(rename = "type", default)]
    pub kind: CheckKind,
    /// HTTP method (http checks).
    #[serde(default = "defaults::check_method")]
    pub method: String,
    /// HTTP path (http checks).
    #[serde(default = "defaults::check_path")]
    pub path: String,
    /// Host header to send (http checks); when absent, the DNS name and port of a server
    /// given by name, else the server's address.
    #[serde(default)]
    pub host: Option<String>,
    /// Accepted statuses: "200", or an inclusive range such as "200-399".
    #[serde(default = "defaults::expect_status")]
    pub expect_status: StatusRange,
    /// Time between two checks of one server.
    #[serde(default = "defaults::check_interval")]
    pub interval: HumanDuration,
    /// Time one check may take.
    #[serde(default = "defaults::check_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive successes that bring a down server up.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
}

/// Passive outlier detection: errors seen on real traffic eject a server for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    /// Consecutive connect errors or 5xx responses that eject a server; 0 turns detection off.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// Base ejection time; it doubles for each consecutive ejection, up to 8 times the base.
    #[serde(default = "defaults::ejection")]
    pub ejection: HumanDuration,
}

impl Default for Outlier {
    fn default() -> Self {
        Self { consecutive_failures: defaults::consecutive_failures(), ejection: defaults::ejection() }
    }
}

/// An inclusive range of HTTP status codes, written "200" or "200-399".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    /// Lowest accepted status.
    pub min: u16,
    /// Highest accepted status.
    pub max: u16,
}

impl StatusRange {
    /// Whether `status` falls in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.min..=self.max).contains(&status)
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl std::str::FromStr for StatusRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid status range {s:?}; write \"200\" or \"200-399\"");
        let parse = |p: &str| -> Result<u16, String> {
            let v: u16 = p.trim().parse().map_err(|_| bad())?;
            if (100..=599).contains(&v) {
                Ok(v)
            } else {
                Err(bad())
            }
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let v = parse(s)?;
                (v, v)
            }
        };
        if min > max {
            return Err(bad());
        }
        Ok(StatusRange { min, max })
    }
}

impl Serialize for StatusRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u16),
            Str(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Int(v) => v.to_string().parse().map_err(serde::de::Error::custom),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Defaults, in one place so the docs and the code agree.
pub mod defaults {
    use super::*;

    /// 2s: a LAN connect that takes longer is a dead or overloaded server.
    pub fn connect_timeout() -> HumanDuration {
        HumanDuration::from_secs(2)
    }
    /// 30s, HAProxy's customary `timeout server`.
    pub fn response_timeout() -> HumanDuration {
        HumanDuration::from_secs(30)
    }
    /// 60s.
    pub fn idle_timeout() -> HumanDuration {
        HumanDuration::from_secs(60)
    }
    /// `X-Request-Id`, the name most servers and tracing tools look for.
    pub fn request_id_header() -> String {
        "X-Request-Id".to_owned()
    }
    /// 2 other servers.
    pub fn retries() -> u32 {
        2
    }
    /// Connect failures only: the one failure where the request certainly reached no server.
    pub fn retry_on() -> Vec<RetryOn> {
        vec![RetryOn::ConnectFailure]
    }
    /// 20%, Envoy's default retry budget.
    pub fn retry_budget() -> Percent {
        Percent::saturating(20)
    }
    /// 3, Envoy's `min_retry_concurrency`.
    pub fn retry_budget_min() -> u32 {
        3
    }
    /// Weight 1.
    pub fn weight() -> u32 {
        1
    }
    /// GET.
    pub fn check_method() -> String {
        "GET".to_owned()
    }
    /// "/".
    pub fn check_path() -> String {
        "/".to_owned()
    }
    /// 200-399, as HAProxy's `http-check expect` default.
    pub fn expect_status() -> StatusRange {
        StatusRange { min: 200, max: 399 }
    }
    /// 2s, HAProxy's `inter`.
    pub fn check_interval() -> HumanDuration {
        HumanDuration::from_secs(2)
    }
    /// 1s.
    pub fn check_timeout() -> HumanDuration {
        HumanDuration::from_secs(1)
    }
    /// 2, HAProxy's `rise`.
    pub fn rise() -> u32 {
        2
    }
    /// 3, HAProxy's `fall`.
    pub fn fall() -> u32 {
        3
    }
    /// 5, Envoy's `consecutive_5xx`.
    pub fn consecutive_failures() -> u32 {
        5
    }
    /// 10s.
    pub fn ejection() -> HumanDuration {
        HumanDuration::from_secs(10)
    }
    /// 30s: nginx re-resolves by the answer's TTL, HAProxy every `hold valid` (10s); a fixed,
    /// documented interval is predictable and cheap.
    pub fn resolve_interval() -> HumanDuration {
        HumanDuration::from_secs(30)
    }
    /// 443.
    pub fn https_port() -> u16 {
        443
    }
}

/// One step of a [`KeyPath`]: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSegment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// Where a value sits in the config document, e.g. `pools.web.servers[2].weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<PathSegment>);

impl KeyPath {
    pub(crate) fn key(&self, k: &str) -> KeyPath {
        let mut p = self.0.clone();
        p.push(PathSegment::Key(k.to_owned()));
        KeyPath(p)
    }

    pub(crate) fn index(&self, i: usize) -> KeyPath {
        let mut p = self.0.clone();
        p.push(PathSegment::Index(i));
        KeyPath(p)
    }

    /// A path from table keys alone.
    pub fn of(keys: &[&str]) -> KeyPath {
        KeyPath(keys.iter().map(|k| PathSegment::Key((*k).to_owned())).collect())
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                PathSegment::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSegment::Key(k) => write!(f, ".{k}")?,
                PathSegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A violated invariant: which key, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ConfigProblem {
    /// The offending key.
    pub path: KeyPath,
    /// What is wrong with it, in words an operator can act on.
    pub reason: String,
}

impl Config {
    /// Checks every invariant that spans fields. Returns all problems found, in document order.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut report = |path: KeyPath, reason: String| problems.push(ConfigProblem { path, reason });
        let root = KeyPath::default();

        if self.listeners.is_empty() {
            report(KeyPath::of(&["listeners"]), "no listener is defined; add a [listeners.NAME] table".into());
        }
        let mut binds = HashSet::new();
        for (name, listener) in &self.listeners {
            let at = root.key("listeners").key(name);
            if !binds.insert(listener.bind) {
                report(at.key("bind"), format!("address {} is already bound by another listener", listener.bind));
            }
            if let Some(pool) = &listener.default_pool {
                if !self.pools.contains_key(pool) {
                    report(at.key("default_pool"), self.unknown_pool(pool));
                }
            }
            match (listener.protocol, &listener.tls) {
                (Protocol::Https, None) => {
                    report(at.key("protocol"), "an https listener needs a [listeners.NAME.tls] table".into())
                }
                (Protocol::Https, Some(tls)) if tls.certificates.is_empty() => {
                    report(at.key("tls").key("certificates"), "at least one certificate is needed".into())
                }
                (Protocol::Http | Protocol::Tcp, Some(_)) => report(
                    at.key("tls"),
                    format!("tls settings need protocol = \"https\" (this listener is {})", listener.protocol.as_str()),
                ),
                _ => {}
            }
            if let Some(log) = &listener.access_log {
                crate::access_log_config::check(log, &at.key("access_log"), &mut report);
            }
            if !listener.request_id_header.is_empty()
                && http::header::HeaderName::from_bytes(listener.request_id_header.as_bytes()).is_err()
            {
                report(at.key("request_id_header"), "not a valid header name".into());
            }
            if listener.redirect_to_https && listener.protocol != Protocol::Http {
                report(at.key("redirect_to_https"), "only an http listener can redirect to https".into());
            }
            if listener.protocol == Protocol::Tcp {
                if !listener.routes.is_empty() {
                    report(at.key("routes"), "a tcp listener cannot route (it sees bytes, not requests)".into());
                }
                if listener.default_pool.is_none() {
                    report(at.key("default_pool"), "a tcp listener needs a default_pool".into());
                }
                if listener.rate_limit.is_some() {
                    report(at.key("rate_limit"), "rate limits apply to HTTP requests; a tcp listener has none".into());
                }
            } else if listener.default_pool.is_none() && listener.routes.is_empty() && !listener.redirect_to_https {
                report(at.key("default_pool"), "the listener serves nothing: give it a default_pool or routes".into());
            }
            if let Some(rl) = &listener.rate_limit {
                check_rate_limit(rl, &at.key("rate_limit"), &mut report);
            }
            check_limits(&listener.limits, &at.key("limits"), &mut report);
            if let Some(rules) = &listener.headers {
                if listener.protocol == Protocol::Tcp {
                    report(at.key("headers"), "header rules apply to HTTP; a tcp listener has none".into());
                }
                crate::header_rules::check(rules, &at.key("headers"), &mut report);
            }
            for (i, route) in listener.routes.iter().enumerate() {
                let at = at.key("routes").index(i);
                if let Some(rl) = &route.rate_limit {
                    check_rate_limit(rl, &at.key("rate_limit"), &mut report);
                }
                if !self.pools.contains_key(&route.pool) {
                    report(at.key("pool"), self.unknown_pool(&route.pool));
                }
                if let Some(rules) = &route.headers {
                    crate::header_rules::check(rules, &at.key("headers"), &mut report);
                }
                if let Some(prefix) = &route.path_prefix {
                    if !prefix.starts_with('/') {
                        report(at.key("path_prefix"), format!("path prefix {prefix:?} must start with '/'"));
                    }
                }
                if let Some(h) = &route.header {
                    if http_token(&h.name).is_err() {
                        report(at.key("header").key("name"), format!("{:?} is not a valid header name", h.name));
                    }
                }
                if let Some(host) = &route.host {
                    if host.is_empty() || host.contains(['/', ' ']) {
                        report(at.key("host"), format!("{host:?} is not a host name"));
                    }
                }
            }
        }

        for (name, pool) in &self.pools {
            let at = root.key("pools").key(name);
            if pool.servers.is_empty() {
                report(at.key("servers"), "a pool needs at least one server".into());
            }
            let mut names = HashSet::new();
            let mut addrs = HashSet::new();
            for (i, server) in pool.servers.iter().enumerate() {
                let at = at.key("servers").index(i);
                if server.name.is_empty() {
                    report(at.key("name"), "server name is empty".into());
                } else if !names.insert(server.name.as_str()) {
                    report(at.key("name"), format!("duplicate server name {:?} in pool {name:?}", server.name));
                }
                match &server.address {
                    ServerAddress::Invalid(text) => report(
                        at.key("address"),
                        format!("{text:?} is not HOST:PORT (an IP address or a DNS name, and a port 1-65535)"),
                    ),
                    address if !addrs.insert(address) => {
                        report(at.key("address"), format!("duplicate server address {address} in pool {name:?}"));
                    }
                    _ => {}
                }
                if server.name.contains('@') {
                    report(
                        at.key("name"),
                        format!("{:?}: '@' is reserved for the servers a DNS name resolves to", server.name),
                    );
                }
                if server.weight == 0 || server.weight > MAX_WEIGHT {
                    report(
                        at.key("weight"),
                        format!(
                            "weight {} is out of range 1-{MAX_WEIGHT} (drain a server instead of weighting it 0)",
                            server.weight
                        ),
                    );
                }
            }
            match (pool.protocol, &pool.tls) {
                (UpstreamProtocol::H2, None) => report(
                    at.key("protocol"),
                    "protocol = \"h2\" is HTTP/2 over TLS: add a [pools.NAME.tls] table, or use \"h2c\" for clear text"
                        .into(),
                ),
                (UpstreamProtocol::H2c, Some(_)) => report(
                    at.key("protocol"),
                    "protocol = \"h2c\" is clear text, but the pool has a tls table: use \"h2\" for HTTP/2 over TLS"
                        .into(),
                ),
                _ => {}
            }
            if pool.protocol.is_h2() {
                let tcp_users = self.pool_users(name, true);
                if !tcp_users.is_empty() {
                    report(
                        at.key("protocol"),
                        format!("tcp listener(s) {} splice bytes and speak no HTTP/2 to servers", tcp_users.join(", ")),
                    );
                }
            }
            if pool.health.as_ref().is_some_and(|hc| hc.kind == CheckKind::Grpc) && !pool.protocol.is_h2() {
                report(
                    at.key("health").key("type"),
                    "a grpc check speaks HTTP/2: set the pool's protocol = \"h2c\" or \"h2\"".into(),
                );
            }
            if pool.proxy_protocol.is_some() {
                let http_users = self.pool_users(name, false);
                if !http_users.is_empty() {
                    report(
                        at.key("proxy_protocol"),
                        format!(
                            "PROXY protocol is for tcp listeners; HTTP listener(s) {} use this pool",
                            http_users.join(", ")
                        ),
                    );
                }
            }
            if let Some(sticky) = &pool.sticky {
                let tcp_users = self.pool_users(name, true);
                crate::sticky_config::check(sticky, &at.key("sticky"), &tcp_users, &mut report);
            }
            if let Some(tls) = &pool.tls {
                if tls.server_name.as_deref().is_some_and(|n| n.is_empty() || n.contains(['/', ' ', ':'])) {
                    report(at.key("tls").key("server_name"), "not a DNS name".into());
                }
            }
            if pool.retries > MAX_RETRIES {
                report(at.key("retries"), format!("retries {} is above the maximum of {MAX_RETRIES}", pool.retries));
            }
            for (key, d) in [
                ("connect_timeout", pool.connect_timeout),
                ("response_timeout", pool.response_timeout),
                ("idle_timeout", pool.idle_timeout),
            ] {
                if d.get().is_zero() {
                    report(at.key(key), "must be greater than zero".into());
                }
            }
            if pool.resolve_interval.get().is_zero() {
                report(at.key("resolve_interval"), "must be greater than zero".into());
            }
            if pool.slow_start.is_some_and(|d| d.get().is_zero()) {
                report(at.key("slow_start"), "must be greater than zero (remove the key to turn it off)".into());
            }
            if pool.total_timeout.is_some_and(|d| d.get().is_zero()) {
                report(at.key("total_timeout"), "must be greater than zero (remove the key to turn it off)".into());
            }
            let mut seen = HashSet::new();
            for (i, on) in pool.retry_on.iter().enumerate() {
                if !seen.insert(*on) {
                    report(at.key("retry_on").index(i), format!("{on:?} is listed twice", on = on.as_str()));
                }
            }
            if seen.contains(&RetryOn::NonIdempotent)
                && !seen.iter().any(|on| matches!(on, RetryOn::EmptyResponse | RetryOn::Status502 | RetryOn::Status503))
            {
                report(
                    at.key("retry_on"),
                    "\"non-idempotent\" only widens \"empty-response\", \"502\" and \"503\"; list one of them".into(),
                );
            }
            if pool.retries > 0 && pool.retry_budget.get() == 0 && pool.retry_budget_min == 0 {
                report(
                    at.key("retry_budget"),
                    "a budget of 0% with retry_budget_min = 0 allows no retry; set retries = 0 instead".into(),
                );
            }
            if pool.outlier.consecutive_failures > 0 && pool.outlier.ejection.get().is_zero() {
                report(at.key("outlier").key("ejection"), "must be greater than zero".into());
            }
            if let Some(hc) = &pool.health {
                let at = at.key("health");
                if hc.interval.get().is_zero() {
                    report(at.key("interval"), "must be greater than zero".into());
                }
                if hc.timeout.get().is_zero() {
                    report(at.key("timeout"), "must be greater than zero".into());
                } else if hc.timeout > hc.interval {
                    report(at.key("timeout"), format!("timeout {} exceeds interval {}", hc.timeout, hc.interval));
                }
                if hc.rise == 0 {
                    report(at.key("rise"), "must be at least 1".into());
                }
                if hc.fall == 0 {
                    report(at.key("fall"), "must be at least 1".into());
                }
                if hc.kind == CheckKind::Http {
                    if !hc.path.starts_with('/') {
                        report(at.key("path"), format!("check path {:?} must start with '/'", hc.path));
                    }
                    if http_token(&hc.method).is_err() {
                        report(at.key("method"), format!("{:?} is not an HTTP method", hc.method));
                    }
                }
            }
        }

        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The listeners that send traffic to `pool`: the `tcp` ones, or the HTTP ones.
    fn pool_users(&self, pool: &str, tcp: bool) -> Vec<&str> {
        self.listeners
            .iter()
            .filter(|(_, l)| (l.protocol == Protocol::Tcp) == tcp && l.uses_pool(pool))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Whether any listener or route refers to `pool`.
    pub fn pool_is_used(&self, pool: &str) -> bool {
        self.listeners.values().any(|l| l.uses_pool(pool))
    }

    fn unknown_pool(&self, pool: &str) -> String {
        let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
        if known.is_empty() {
            format!("pool {pool:?} is not defined (no pools are defined)")
        } else {
            format!("pool {pool:?} is not defined (defined: {})", known.join(", "))
        }
    }
}

impl Listener {
    /// Whether this listener sends traffic to `pool`.
    pub fn uses_pool(&self, pool: &str) -> bool {
        self.default_pool.as_deref() == Some(pool) || self.routes.iter().any(|r| r.pool == pool)
    }
}

fn check_rate_limit(rl: &RateLimit, at: &KeyPath, report: &mut impl FnMut(KeyPath, String)) {
    if rl.rate == 0 {
        report(at.key("rate"), "must be at least 1 (remove the rate_limit table to turn it off)".into());
    }
    if rl.per.get().is_zero() {
        report(at.key("per"), "must be greater than zero".into());
    }
    if rl.burst == Some(0) {
        report(at.key("burst"), "must be at least 1".into());
    }
    if rl.max_clients == 0 {
        report(at.key("max_clients"), "must be at least 1".into());
    }
    if let Some(h) = &rl.header {
        if http_token(h).is_err() {
            report(at.key("header"), format!("{h:?} is not a valid header name"));
        }
    }
}

fn check_limits(l: &Limits, at: &KeyPath, report: &mut impl FnMut(KeyPath, String)) {
    for (key, v) in [
        ("max_connections", l.max_connections),
        ("max_connections_per_client", l.max_connections_per_client),
        ("max_headers", l.max_headers),
    ] {
        if v == 0 {
            report(at.key(key), "must be at least 1".into());
        }
    }
    if l.request_buffer > MAX_REQUEST_BUFFER {
        report(
            at.key("request_buffer"),
            format!("must be at most {MAX_REQUEST_BUFFER} (16 MiB): a buffered body is held in memory"),
        );
    }
    if l.max_header_bytes < MIN_HEADER_BYTES {
        report(at.key("max_header_bytes"), format!("must be at least {MIN_HEADER_BYTES}"));
    }
    for (key, d) in
        [("header_timeout", l.header_timeout), ("body_timeout", l.body_timeout), ("idle_timeout", l.idle_timeout)]
    {
        if d.get().is_zero() {
            report(at.key(key), "must be greater than zero".into());
        }
    }
}

/// RFC 9110 token: what header names, methods and cookie names are made of.
pub(crate) fn http_token(s: &str) -> Result<(), ()> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Config {
        toml::from_str(s).expect("test config parses")
    }

    const GOOD: &str = r#"
        [listeners.web]
        bind = "127.0.0.1:8080"
        default_pool = "app"
        [[listeners.web.routes]]
        path_prefix = "/api"
        pool = "app"
        [pools.app]
        algorithm = "weighted_round_robin"
        [[pools.app.servers]]
        name = "a"
        address = "127.0.0.1:9001"
        weight = 5
        [pools.app.health]
        type = "http"
        path = "/healthz"
        expect_status = "200-299"
        interval = "1s"
        timeout = "500ms"
    "#;

    #[test]
    fn a_complete_config_validates() {
        let c = parse(GOOD);
        assert_eq!(c.validate(), Ok(()));
        let app = &c.pools["app"];
        assert_eq!(app.algorithm, Algorithm::WeightedRoundRobin);
        assert_eq!(app.retries, 2);
        let hc = app.health.as_ref().expect("health");
        assert_eq!(hc.expect_status, StatusRange { min: 200, max: 299 });
        assert_eq!(hc.rise, 2);
    }

    #[test]
    fn upstream_protocol_defaults_to_http1_and_h2_needs_tls() {
        let c = parse(GOOD);
        assert_eq!(c.pools["app"].protocol, UpstreamProtocol::Http1);
        let h2c = GOOD.replace(
            "algorithm = \"weighted_round_robin\"",
            "algorithm = \"weighted_round_robin\"\nprotocol = \"h2c\"",
        );
        assert_eq!(parse(&h2c).validate(), Ok(()));
        let h2 = h2c.replace("protocol = \"h2c\"", "protocol = \"h2\"");
        let problems = parse(&h2).validate().unwrap_err();
        assert_eq!(problems[0].path.to_string(), "pools.app.protocol");
        assert!(problems[0].reason.contains("tls"), "{}", problems[0]);
        let grpc_on_http1 = GOOD.replace("type = \"http\"", "type = \"grpc\"");
        let problems = parse(&grpc_on_http1).validate().unwrap_err();
        assert_eq!(problems[0].path.to_string(), "pools.app.health.type");
        let bad = toml::from_str::<Config>(&h2c.replace("\"h2c\"", "\"http3\"")).unwrap_err().to_string();
        assert!(bad.contains("unknown variant `http3`") && bad.contains("`h2c`"), "{bad}");
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let c = parse(
            r#"
            [listeners.web]
            bind = "127.0.0.1:8080"
            default_pool = "nope"
            [pools.app]
            [[pools.app.servers]]
            name = "a"
            address = "127.0.0.1:9001"
            weight = 0
            [[pools.app.servers]]
            name = "a"
            address = "127.0.0.1:9002"
        "#,
        );
        let problems = c.validate().unwrap_err();
        let paths: Vec<String> = problems.iter().map(|p| p.path.to_string()).collect();
        assert_eq!(paths, ["listeners.web.default_pool", "pools.app.servers[0].weight", "pools.app.servers[1].name"]);
        assert!(problems[0].reason.contains("defined: app"), "{}", problems[0]);
    }

    #[test]
    fn server_addresses_are_ip_literals_or_dns_names() {
        let servers = |list: &[(&str, &str)]| {
            let mut text = GOOD.split("[[pools.app.servers]]").next().expect("head").to_owned();
            for (name, address) in list {
                text.push_str(&format!("[[pools.app.servers]]\nname = \"{name}\"\naddress = \"{address}\"\n"));
            }
            parse(&text)
        };
        let c = servers(&[("a", "10.0.0.1:80"), ("b", "app.internal:8080")]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.pools["app"].resolve_interval, HumanDuration::from_secs(30));
        assert_eq!(c.pools["app"].servers[1].address, ServerAddress::Name { host: "app.internal".into(), port: 8080 });
        let problems = servers(&[("a", "10.0.0.1:80"), ("b", "10.0.0.1:80x"), ("c", "10.0.0.1:80"), ("d@x", "d:1")])
            .validate()
            .unwrap_err();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:?}");
        assert!(shown[0].starts_with("pools.app.servers[1].address: \"10.0.0.1:80x\" is not HOST:PORT"), "{shown:?}");
        assert!(
            shown[1].starts_with("pools.app.servers[2].address: duplicate server address 10.0.0.1:80"),
            "{shown:?}"
        );
        assert!(shown[2].starts_with("pools.app.servers[3].name: \"d@x\": '@' is reserved"), "{shown:?}");
        let dup = servers(&[("a", "App.Internal:80"), ("b", "app.internal.:80")]).validate().unwrap_err();
        assert_eq!(dup[0].path.to_string(), "pools.app.servers[1].address");
    }

    #[test]
    fn access_logs_are_off_and_request_ids_on_by_default() {
        let c = parse(GOOD);
        let web = &c.listeners["web"];
        assert_eq!(web.access_log, None);
        assert_eq!(web.request_id_header, "X-Request-Id");
        let c = parse(&GOOD.replace(
            "default_pool = \"app\"\n",
            "default_pool = \"app\"\naccess_log = { destination = \"stdout\", format = \"json\" }\nrequest_id_header = \"\"\n",
        ));
        assert_eq!(c.validate(), Ok(()));
        let web = &c.listeners["web"];
        assert_eq!(
            web.access_log,
            Some(AccessLog {
                destination: "stdout".into(),
                format: AccessLogFormat::Json,
                template: None,
                facility: None
            })
        );
        assert_eq!(web.request_id_header, "");
        let c = parse(&GOOD.replace(
            "default_pool = \"app\"\n",
            "default_pool = \"app\"\naccess_log = { destination = \" \" }\nrequest_id_header = \"x id\"\n",
        ));
        let paths: Vec<String> = c.validate().unwrap_err().iter().map(|p| p.path.to_string()).collect();
        assert_eq!(paths, ["listeners.web.access_log.destination", "listeners.web.request_id_header"]);
    }

    #[test]
    fn access_log_templates_and_syslog_are_checked_at_their_keys() {
        let with =
            |log: &str| parse(&GOOD.replace("default_pool = \"app\"\n", &format!("default_pool = \"app\"\n{log}\n")));
        let c = with(
            "access_log = { destination = \"udp://127.0.0.1:514\", format = \"template\", \
             template = \"$client ${status}\", facility = \"local3\" }",
        );
        assert_eq!(c.validate(), Ok(()));
        let log = c.listeners["web"].access_log.clone().unwrap();
        assert_eq!(log.facility(), Facility::Local3);
        assert_eq!(log.target(), Ok(Destination::Syslog(SyslogTarget::Udp("127.0.0.1:514".parse().unwrap()))));
        assert_eq!(parse(&toml::to_string(&c).unwrap()), c);

        let c = with("access_log = { destination = \"stdout\", format = \"template\", template = \"$client $foo\" }");
        let problems = c.validate().unwrap_err();
        assert_eq!(problems.len(), 1);
        let shown = problems[0].to_string();
        assert!(
            shown.starts_with("listeners.web.access_log.template: unknown field \"$foo\"; known: time, listener,"),
            "{shown}"
        );

        let c = with("access_log = { destination = \"/tmp/a.log\", format = \"json\", template = \"$client\", facility = \"local1\" }");
        let paths: Vec<String> = c.validate().unwrap_err().iter().map(|p| p.path.to_string()).collect();
        assert_eq!(paths, ["listeners.web.access_log.facility", "listeners.web.access_log.template"]);

        let c = with("access_log = { destination = \"tcp://127.0.0.1:514\", format = \"template\" }");
        let paths: Vec<String> = c.validate().unwrap_err().iter().map(|p| p.path.to_string()).collect();
        assert_eq!(paths, ["listeners.web.access_log.destination", "listeners.web.access_log.template"]);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let r: Result<Config, _> = toml::from_str("[pools.app]\nservers = []\nalgoritm = \"random\"\n");
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains("algoritm"), "{msg}");
    }

    #[test]
    fn status_ranges_parse_and_reject() {
        assert_eq!("204".parse::<StatusRange>(), Ok(StatusRange { min: 204, max: 204 }));
        assert!("399-200".parse::<StatusRange>().is_err());
        assert!("2xx".parse::<StatusRange>().is_err());
        assert!("700".parse::<StatusRange>().is_err());
    }

    #[test]
    fn config_round_trips_through_toml() {
        let c = parse(GOOD);
        let text = toml::to_string(&c).expect("serializes");
        assert_eq!(parse(&text), c);
    }
}
