//! Metric names and the Prometheus text rendering of the node's counters.
//!
//! The counters themselves live beside what they count (`pool::ServerStats`, one
//! [`Histogram`] per server) as plain atomics, so the request path never takes a lock or looks up
//! a label set; this module turns them into the Prometheus text format at scrape time.
//! prometheus-client's registry was considered: its label families hash a label set on every
//! increment, and its histogram takes a lock per observation, both on the hot path, while the
//! labels here are fixed by the config and known in advance. The exposition format is small and
//! stable, so rendering it here costs less than adapting the registry.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connlimit::ConnectionLimiter;
use crate::pool::STATUS_CLASSES;
use crate::snapshot::Snapshot;

/// Requests answered, by pool, server and status class.
pub const REQUESTS_TOTAL: &str = "keel_requests_total";
/// Time from receiving a request to sending the response head, by pool.
pub const REQUEST_DURATION: &str = "keel_request_duration_seconds";
/// The same, by pool and server.
pub const SERVER_REQUEST_DURATION: &str = "keel_server_request_duration_seconds";
/// Requests answered (HTTP) or sessions ended (TCP), by listener.
pub const LISTENER_REQUESTS_TOTAL: &str = "keel_listener_requests_total";
/// Of those, answered with a 5xx, by listener.
pub const LISTENER_ERRORS_TOTAL: &str = "keel_listener_errors_total";
/// Bytes read from clients, by listener.
pub const LISTENER_BYTES_IN_TOTAL: &str = "keel_listener_received_bytes_total";
/// Bytes written to clients, by listener.
pub const LISTENER_BYTES_OUT_TOTAL: &str = "keel_listener_sent_bytes_total";
/// TLS handshakes completed, by listener.
pub const TLS_HANDSHAKES_TOTAL: &str = "keel_tls_handshakes_total";
/// Always 1, labelled with the version and commit of the binary.
pub const BUILD_INFO: &str = "keel_build_info";
/// Connect failures towards a server.
pub const CONNECT_ERRORS_TOTAL: &str = "keel_server_connect_errors_total";
/// Response heads that did not arrive within the pool's request timeout.
pub const TIMEOUTS_TOTAL: &str = "keel_server_timeouts_total";
/// Exchanges the server broke (closed or reset mid-exchange).
pub const BROKEN_TOTAL: &str = "keel_server_broken_total";
/// Requests in flight per server.
pub const ACTIVE: &str = "keel_server_active_requests";
/// 1 when the server may receive requests, else 0.
pub const SERVER_UP: &str = "keel_server_up";
/// Requests sent again to another server (`retry_on`), by pool.
pub const RETRIES_TOTAL: &str = "keel_retries_total";
/// Retries the pool's retry budget refused, by pool.
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "keel_retry_budget_exhausted_total";
/// Requests refused before reaching a pool, by reason (no route, no server).
pub const REJECTED_TOTAL: &str = "keel_requests_rejected_total";

/// Client connections open, by listener.
pub const CONNECTIONS_OPEN: &str = "keel_connections_open";
/// Idle keep-alive connections in the parking lot (no task, no buffers), by listener.
pub const CONNECTIONS_PARKED: &str = "keel_connections_parked";
/// Client connections refused by a cap, by listener and reason.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "keel_connections_refused_total";
/// Requests answered 429, by listener.
pub const RATELIMIT_LIMITED_TOTAL: &str = "keel_ratelimit_limited_total";
/// Rate-limit entries evicted while still holding state, by listener.
pub const RATELIMIT_EVICTIONS_TOTAL: &str = "keel_ratelimit_evictions_total";
/// Clients tracked by rate limits, by listener.
pub const RATELIMIT_TRACKED: &str = "keel_ratelimit_tracked_clients";

/// Access log lines dropped: the log's writer fell behind (its queue was full), or a syslog
/// receiver did not take them.
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "keel_access_log_dropped_total";

/// Resolutions of servers given by DNS name, by pool, server (the configured entry), name and
/// outcome (`ok`, `nxdomain`, `no_records`, `timeout`, `error`).
pub const DNS_RESOLUTIONS_TOTAL: &str = "keel_dns_resolutions_total";
/// Addresses in use for a server given by DNS name (its last good answer).
pub const DNS_ADDRESSES: &str = "keel_dns_addresses";
/// When a server's DNS name last resolved, in seconds since the Unix epoch (0: never).
pub const DNS_LAST_SUCCESS: &str = "keel_dns_last_success_timestamp_seconds";

/// Sticky hits, by pool.
pub const STICKY_HITS_TOTAL: &str = "keel_sticky_hits_total";
/// Sticky misses, by pool.
pub const STICKY_MISSES_TOTAL: &str = "keel_sticky_misses_total";
/// Session-store errors, by pool.
pub const STICKY_STORE_ERRORS_TOTAL: &str = "keel_sticky_store_errors_total";
/// Dropped session writes, by pool.
pub const STICKY_DROPPED_WRITES_TOTAL: &str = "keel_sticky_dropped_writes_total";
/// Entries in the replicated sticky table, by pool (cluster mode).
pub const STICKY_ENTRIES: &str = "keel_sticky_entries";
/// The pool's bound on entries (`max_entries`), by pool (cluster mode).
pub const STICKY_MAX_ENTRIES: &str = "keel_sticky_max_entries";
/// Entries evicted (least recently used) because the pool was at its bound, by pool.
pub const STICKY_EVICTIONS_TOTAL: &str = "keel_sticky_evictions_total";
/// Size of the latest Raft snapshot this node built or installed, in bytes.
pub const RAFT_SNAPSHOT_BYTES: &str = "keel_raft_snapshot_bytes";
/// Time to build a Raft snapshot (encode + durable write, off the Raft thread).
pub const RAFT_SNAPSHOT_BUILD_SECONDS: &str = "keel_raft_snapshot_build_seconds";
/// Time to install a received Raft snapshot (decode + durable write, off the Raft thread).
pub const RAFT_SNAPSHOT_INSTALL_SECONDS: &str = "keel_raft_snapshot_install_seconds";
/// Time the latest snapshot build took.
pub const RAFT_SNAPSHOT_LAST_BUILD_SECONDS: &str = "keel_raft_snapshot_last_build_seconds";

/// 1 while this node holds the VIP.
pub const VIP_HOLDING: &str = "keel_vip_holding";
/// VIP claims.
pub const VIP_CLAIMS_TOTAL: &str = "keel_vip_claims_total";
/// VIP releases.
pub const VIP_RELEASES_TOTAL: &str = "keel_vip_releases_total";
/// Failed VIP operations.
pub const VIP_FAILURES_TOTAL: &str = "keel_vip_failures_total";
/// Unix time of the last VIP change on this node.
pub const VIP_LAST_CHANGE: &str = "keel_vip_last_change_timestamp_seconds";
/// Config reloads by outcome.
pub const CONFIG_RELOADS_TOTAL: &str = "keel_config_reloads_total";
/// Config changes applied since start.
pub const CONFIG_GENERATION: &str = "keel_config_generation";
/// Whether the last reload was served.
pub const CONFIG_LAST_RELOAD: &str = "keel_config_last_reload_successful";

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram of atomics: one increment per observation, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations in bucket `i` alone (not cumulative); the last bucket is +Inf.
    pub fn bucket(&self, i: usize) -> u64 {
        self.buckets.get(i).map_or(0, |b| b.load(Ordering::Relaxed))
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        render_sum(std::iter::once(self), out, name, labels);
    }
}

/// Renders the sum of `histograms` as one: a pool's latency is the sum of its servers', added
/// at scrape time rather than observed twice on every request.
fn render_sum<'a>(histograms: impl Iterator<Item = &'a Histogram> + Clone, out: &mut String, name: &str, labels: &str) {
    let total = |get: &dyn Fn(&Histogram) -> &AtomicU64| -> u64 {
        histograms.clone().map(|h| get(h).load(Ordering::Relaxed)).fold(0, u64::wrapping_add)
    };
    let mut cumulative = 0;
    for (i, bound) in BUCKETS.iter().map(|b| b.to_string()).chain(["+Inf".to_owned()]).enumerate() {
        cumulative += total(&|h| &h.buckets[i]);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
    }
    let sum = total(&|h| &h.sum_micros) as f64 / 1e6;
    let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", total(&|h| &h.count));
}

/// Counters of requests that never reached a server.
#[derive(Debug, Default)]
pub struct Rejections {
    /// No route matched and the listener has no default pool (404).
    pub no_route: AtomicU64,
    /// The pool had no server to offer (503).
    pub no_server: AtomicU64,
}

/// A per-server metric: name, type, help, and how to read it.
type PerServer = (&'static str, &'static str, &'static str, fn(&crate::pool::ServerState) -> u64);

/// Traffic counters of one listener, bumped on the request path (relaxed atomics) and by its
/// connections (bytes, added in batches: see `proxy::guard`).
#[derive(Debug, Default)]
pub struct ListenerTraffic {
    /// Requests answered (HTTP) or sessions ended (TCP).
    pub requests: AtomicU64,
    /// Of those, answered with a 5xx.
    pub errors: AtomicU64,
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// TLS handshakes completed.
    pub handshakes: AtomicU64,
}

impl ListenerTraffic {
    /// Counts one answer with `status`.
    pub fn count(&self, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Counters of one listener that live as long as the listener's socket (not a snapshot).
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Listener name.
    pub name: String,
    /// Its connection caps, whose counters are read here.
    pub connections: ConnectionLimiter,
    /// Requests answered 429.
    pub rate_limited: Arc<AtomicU64>,
    /// Idle connections in the listener's parking lot now (see `proxy::lot`).
    pub parked: Arc<AtomicU64>,
    /// Requests, errors, bytes and handshakes.
    pub traffic: Arc<ListenerTraffic>,
}

impl ListenerMetrics {
    /// Metrics for the listener `name` using `connections`.
    pub fn new(name: &str, connections: ConnectionLimiter) -> Self {
        ListenerMetrics {
            name: name.to_owned(),
            connections,
            rate_limited: Arc::default(),
            parked: Arc::default(),
            traffic: Arc::default(),
        }
    }
}

/// Renders the VIP controller's counters.
pub fn render_vip(out: &mut String, vip: &keel_vrrp::VipStatus) {
    let rows: [(&str, &str, &str, u64); 4] = [
        (VIP_HOLDING, "gauge", "1 while this node holds the VIP.", u64::from(vip.holding)),
        (VIP_CLAIMS_TOTAL, "counter", "Times this node claimed the VIP.", vip.claims),
        (VIP_RELEASES_TOTAL, "counter", "Times this node released the VIP.", vip.releases),
        (VIP_FAILURES_TOTAL, "counter", "Failed VIP operations (retried).", vip.failures),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    if let Some(ms) = vip.last_change_unix_ms {
        let name = VIP_LAST_CHANGE;
        let _ = writeln!(
            out,
            "# HELP {name} When the VIP last moved to or from this node.\n# TYPE {name} gauge\n{name} {}",
            ms as f64 / 1000.0
        );
    }
}

/// Renders the spread VIPs' controller counters, one series per VIP (`vip` label), under the
/// same names as the leader's single VIP.
pub fn render_spread_vips(out: &mut String, vips: &[(std::net::IpAddr, keel_vrrp::VipStatus)]) {
    type Row = (&'static str, &'static str, &'static str, fn(&keel_vrrp::VipStatus) -> u64);
    let rows: [Row; 4] = [
        (VIP_HOLDING, "gauge", "1 while this node holds the VIP.", |v| u64::from(v.holding)),
        (VIP_CLAIMS_TOTAL, "counter", "Times this node claimed the VIP.", |v| v.claims),
        (VIP_RELEASES_TOTAL, "counter", "Times this node released the VIP.", |v| v.releases),
        (VIP_FAILURES_TOTAL, "counter", "Failed VIP operations (retried).", |v| v.failures),
    ];
    for (name, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (address, status) in vips {
            let _ = writeln!(out, "{name}{{vip=\"{address}\"}} {}", value(status));
        }
    }
}

/// Renders the replicated sticky table's size per pool and the Raft snapshot figures (cluster
/// mode). The entries and evictions are the replicated state's: every node reports the same.
pub fn render_cluster(out: &mut String, cluster: &keel_cluster::ClusterHandle) {
    let (summary, limits): (Vec<_>, Vec<u64>) = {
        let state = cluster.state();
        let s = state.borrow();
        let mut pools: std::collections::BTreeMap<String, keel_cluster::state::PoolSummary> = s.sticky.summary();
        // Pools with a Raft sticky table and no entry yet are reported too (at 0).
        for (name, pool) in &s.config.pools {
            if pool.sticky.as_ref().is_some_and(|st| st.store() == keel_cluster::sticky_config::StickyStore::Raft) {
                pools.entry(name.clone()).or_default();
            }
        }
        let limits = pools.keys().map(|p| s.sticky_limit(p)).collect();
        (pools.into_iter().collect(), limits)
    };
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(out, STICKY_ENTRIES, "gauge", "Entries in the replicated sticky table.");
    for (pool, p) in &summary {
        let _ = writeln!(out, "{STICKY_ENTRIES}{{pool=\"{}\"}} {}", label(pool), p.entries);
    }
    header(out, STICKY_MAX_ENTRIES, "gauge", "The pool's bound on sticky entries (max_entries).");
    for ((pool, _), max) in summary.iter().zip(&limits) {
        let _ = writeln!(out, "{STICKY_MAX_ENTRIES}{{pool=\"{}\"}} {max}", label(pool));
    }
    header(out, STICKY_EVICTIONS_TOTAL, "counter", "Sticky entries evicted, least recently used first, at the bound.");
    for (pool, p) in &summary {
        let _ = writeln!(out, "{STICKY_EVICTIONS_TOTAL}{{pool=\"{}\"}} {}", label(pool), p.evictions);
    }
    let f = cluster.snapshot_figures();
    let secs = |micros: u64| micros as f64 / 1e6;
    header(out, RAFT_SNAPSHOT_BYTES, "gauge", "Size of the latest Raft snapshot built or installed.");
    let _ = writeln!(out, "{RAFT_SNAPSHOT_BYTES} {}", f.last_bytes);
    header(out, RAFT_SNAPSHOT_LAST_BUILD_SECONDS, "gauge", "Time the latest snapshot build took.");
    let _ = writeln!(out, "{RAFT_SNAPSHOT_LAST_BUILD_SECONDS} {}", secs(f.last_build_micros));
    for (name, help, sum, count) in [
        (
            RAFT_SNAPSHOT_BUILD_SECONDS,
            "Raft snapshot builds (encode + durable write, off the Raft thread).",
            f.build_micros_total,
            f.builds,
        ),
        (
            RAFT_SNAPSHOT_INSTALL_SECONDS,
            "Raft snapshots installed (decode + durable write, off the Raft thread).",
            f.install_micros_total,
            f.installs,
        ),
    ] {
        header(out, name, "summary", help);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {count}", secs(sum));
    }
}

/// Renders the config reload counters.
pub fn render_reloads(out: &mut String, reloads: &crate::daemon::apply::ReloadState) {
    let name = CONFIG_RELOADS_TOTAL;
    let _ = writeln!(
        out,
        "# HELP {name} Config reloads (SIGHUP, keel config apply, a committed cluster config) by outcome.\n\
         # TYPE {name} counter\n{name}{{outcome=\"applied\"}} {}\n{name}{{outcome=\"refused\"}} {}",
        reloads.applied, reloads.refused
    );
    let name = CONFIG_GENERATION;
    let _ = writeln!(
        out,
        "# HELP {name} Config changes applied since start (0 = the config the node started with).\n\
         # TYPE {name} gauge\n{name} {}",
        reloads.generation
    );
    if let Some(last) = &reloads.last {
        let name = CONFIG_LAST_RELOAD;
        let ok = u8::from(last.result != crate::daemon::apply::Result_::Refused);
        let _ = writeln!(
            out,
            "# HELP {name} Whether the last reload was served (1) or refused (0).\n# TYPE {name} gauge\n{name} {ok}"
        );
    }
}

/// Escapes a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Renders every metric in the Prometheus text format (version 0.0.4).
pub fn render(snapshot: &Snapshot, rejections: &Rejections, listeners: &[ListenerMetrics]) -> String {
    let mut out = String::with_capacity(4096);
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };

    header(&mut out, REQUESTS_TOTAL, "counter", "Responses received from servers, by status class.");
    for pool in snapshot.pools.values() {
        for s in &pool.servers {
            for (i, class) in STATUS_CLASSES.iter().enumerate() {
                let n = s.stats.responses[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "{REQUESTS_TOTAL}{{pool=\"{}\",server=\"{}\",code=\"{class}\"}} {n}",
                    label(&pool.name),
                    label(&s.name)
                );
            }
        }
    }
    let per_server: [PerServer; 5] = [
        (CONNECT_ERRORS_TOTAL, "counter", "Connect failures towards the server.", |s| {
            s.stats.connect_errors.load(Ordering::Relaxed)
        }),
        (TIMEOUTS_TOTAL, "counter", "Response heads not received within the request timeout.", |s| {
            s.stats.timeouts.load(Ordering::Relaxed)
        }),
        (BROKEN_TOTAL, "counter", "Exchanges the server closed or reset before completing.", |s| {
            s.stats.broken.load(Ordering::Relaxed)
        }),
        (ACTIVE, "gauge", "Requests in flight.", |s| s.active.load(Ordering::Relaxed) as u64),
        (SERVER_UP, "gauge", "1 when the server may receive new requests.", |s| u64::from(s.is_eligible())),
    ];
    for (name, kind, help, get) in per_server {
        header(&mut out, name, kind, help);
        for pool in snapshot.pools.values() {
            for s in &pool.servers {
                let _ =
                    writeln!(out, "{name}{{pool=\"{}\",server=\"{}\"}} {}", label(&pool.name), label(&s.name), get(s));
            }
        }
    }
    header(&mut out, REQUEST_DURATION, "histogram", "Time from request to response head, by pool.");
    for pool in snapshot.pools.values() {
        // The pool's servers' histograms summed (each request is observed once, by its server);
        // a server a reload removed takes its counts along, which Prometheus reads as a reset.
        let servers = pool.servers.iter().map(|s| &s.stats.latency);
        render_sum(servers, &mut out, REQUEST_DURATION, &format!("pool=\"{}\"", label(&pool.name)));
    }
    header(&mut out, SERVER_REQUEST_DURATION, "histogram", "Time from request to response head, by server.");
    for pool in snapshot.pools.values() {
        for s in &pool.servers {
            let labels = format!("pool=\"{}\",server=\"{}\"", label(&pool.name), label(&s.name));
            s.stats.latency.render(&mut out, SERVER_REQUEST_DURATION, &labels);
        }
    }
    type PerPool = (&'static str, &'static str, fn(&crate::pool::Pool) -> u64);
    let per_pool: [PerPool; 2] = [
        (RETRIES_TOTAL, "Requests sent again to another server after a failure retry_on names.", |p| p.retries.total()),
        (RETRY_BUDGET_EXHAUSTED_TOTAL, "Retries refused because the pool's retry budget was spent.", |p| {
            p.retries.exhausted()
        }),
    ];
    for (name, help, get) in per_pool {
        header(&mut out, name, "counter", help);
        for pool in snapshot.pools.values() {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", label(&pool.name), get(pool));
        }
    }
    header(&mut out, REJECTED_TOTAL, "counter", "Requests answered by keel itself without reaching a server.");
    let _ = writeln!(out, "{REJECTED_TOTAL}{{reason=\"no_route\"}} {}", rejections.no_route.load(Ordering::Relaxed));
    let _ = writeln!(out, "{REJECTED_TOTAL}{{reason=\"no_server\"}} {}", rejections.no_server.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "{REJECTED_TOTAL}{{reason=\"rate_limited\"}} {}",
        // Counted once per request, per listener; the total is their sum.
        listeners.iter().map(|l| l.rate_limited.load(Ordering::Relaxed)).sum::<u64>()
    );
    render_listeners(&mut out, snapshot, listeners);
    render_sticky(&mut out, snapshot);
    render_dns(&mut out, snapshot);
    header(&mut out, ACCESS_LOG_DROPPED_TOTAL, "counter", "Access log lines dropped because the writer fell behind.");
    let _ = writeln!(out, "{ACCESS_LOG_DROPPED_TOTAL} {}", crate::proxy::access_log::dropped());
    header(&mut out, BUILD_INFO, "gauge", "Always 1: the version and commit of this binary.");
    let _ = writeln!(out, "{BUILD_INFO}{{version=\"{}\",commit=\"{}\"}} 1", crate::VERSION, label(crate::COMMIT));
    out
}

fn render_dns(out: &mut String, snapshot: &Snapshot) {
    let names: Vec<(&str, Vec<crate::resolve::NameStatus>)> =
        snapshot.pools.keys().map(|p| (p.as_str(), snapshot.names.status(p))).filter(|(_, n)| !n.is_empty()).collect();
    if names.is_empty() {
        return;
    }
    let labels = |pool: &str, n: &crate::resolve::NameStatus| {
        format!("pool=\"{}\",server=\"{}\",name=\"{}\"", label(pool), label(&n.server), label(&n.host))
    };
    let _ = writeln!(
        out,
        "# HELP {DNS_RESOLUTIONS_TOTAL} Resolutions of servers given by DNS name, by outcome.\n# TYPE {DNS_RESOLUTIONS_TOTAL} counter"
    );
    for (pool, list) in &names {
        for n in list {
            for (outcome, count) in &n.resolutions {
                let _ = writeln!(out, "{DNS_RESOLUTIONS_TOTAL}{{{},outcome=\"{outcome}\"}} {count}", labels(pool, n));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP {DNS_ADDRESSES} Addresses in use for a server given by DNS name.\n# TYPE {DNS_ADDRESSES} gauge"
    );
    for (pool, list) in &names {
        for n in list {
            let _ = writeln!(out, "{DNS_ADDRESSES}{{{}}} {}", labels(pool, n), n.addresses.len());
        }
    }
    let _ = writeln!(
        out,
        "# HELP {DNS_LAST_SUCCESS} When the name last resolved (Unix seconds, 0: never).\n# TYPE {DNS_LAST_SUCCESS} gauge"
    );
    for (pool, list) in &names {
        for n in list {
            let secs = n.last_resolved_unix_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
            let _ = writeln!(out, "{DNS_LAST_SUCCESS}{{{}}} {secs}", labels(pool, n));
        }
    }
}

fn render_sticky(out: &mut String, snapshot: &Snapshot) {
    if snapshot.sticky.is_empty() {
        return;
    }
    let mut policies: Vec<_> = snapshot.sticky.iter().collect();
    policies.sort_by(|a, b| a.0.cmp(b.0));
    type Read = fn(&crate::sticky::StickyPolicy) -> u64;
    let rows: [(&str, &str, Read); 4] = [
        (STICKY_HITS_TOTAL, "Requests sent to the server their session is bound to.", |p| p.hits()),
        (STICKY_MISSES_TOTAL, "Requests with no usable binding (balanced by the algorithm).", |p| p.misses()),
        (STICKY_STORE_ERRORS_TOTAL, "Lookups that failed because the session store was unreachable.", |p| {
            p.store_errors()
        }),
        (STICKY_DROPPED_WRITES_TOTAL, "Session bindings dropped because the store's queue was full.", |p| {
            p.dropped_writes()
        }),
    ];
    for (name, help, read) in rows {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (pool, policy) in &policies {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", label(pool), read(policy));
        }
    }
}

fn render_listeners(out: &mut String, snapshot: &Snapshot, listeners: &[ListenerMetrics]) {
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(out, CONNECTIONS_OPEN, "gauge", "Client connections open.");
    for l in listeners {
        let _ = writeln!(out, "{CONNECTIONS_OPEN}{{listener=\"{}\"}} {}", label(&l.name), l.connections.open());
    }
    type PerListener = (&'static str, &'static str, fn(&ListenerTraffic) -> &AtomicU64);
    let traffic: [PerListener; 5] = [
        (LISTENER_REQUESTS_TOTAL, "Requests answered (HTTP) or sessions ended (TCP).", |t| &t.requests),
        (LISTENER_ERRORS_TOTAL, "Requests answered with a 5xx.", |t| &t.errors),
        (LISTENER_BYTES_IN_TOTAL, "Bytes read from clients.", |t| &t.bytes_in),
        (LISTENER_BYTES_OUT_TOTAL, "Bytes written to clients.", |t| &t.bytes_out),
        (TLS_HANDSHAKES_TOTAL, "TLS handshakes completed.", |t| &t.handshakes),
    ];
    for (name, help, get) in traffic {
        header(out, name, "counter", help);
        for l in listeners {
            let _ =
                writeln!(out, "{name}{{listener=\"{}\"}} {}", label(&l.name), get(&l.traffic).load(Ordering::Relaxed));
        }
    }
    header(out, CONNECTIONS_PARKED, "gauge", "Idle keep-alive client connections parked (no task, no buffers).");
    for l in listeners {
        let parked = l.parked.load(Ordering::Relaxed);
        let _ = writeln!(out, "{CONNECTIONS_PARKED}{{listener=\"{}\"}} {parked}", label(&l.name));
    }
    header(out, CONNECTIONS_REFUSED_TOTAL, "counter", "Client connections closed at once by a connection cap.");
    for l in listeners {
        let name = label(&l.name);
        let _ = writeln!(
            out,
            "{CONNECTIONS_REFUSED_TOTAL}{{listener=\"{name}\",reason=\"total\"}} {}",
            l.connections.refused_total()
        );
        let _ = writeln!(
            out,
            "{CONNECTIONS_REFUSED_TOTAL}{{listener=\"{name}\",reason=\"per_client\"}} {}",
            l.connections.refused_per_client()
        );
    }
    header(out, RATELIMIT_LIMITED_TOTAL, "counter", "Requests answered 429 by a rate limit.");
    for l in listeners {
        let _ = writeln!(
            out,
            "{RATELIMIT_LIMITED_TOTAL}{{listener=\"{}\"}} {}",
            label(&l.name),
            l.rate_limited.load(Ordering::Relaxed)
        );
    }
    header(
        out,
        RATELIMIT_EVICTIONS_TOTAL,
        "counter",
        "Rate-limit table entries forgotten while their bucket was not full.",
    );
    header(out, RATELIMIT_TRACKED, "gauge", "Clients tracked by rate limits.");
    for (name, router) in &snapshot.routers {
        let (evictions, tracked) =
            router.limiters().fold((0, 0), |(e, t), l| (e + l.evictions(), t + l.tracked() as u64));
        let name = label(name);
        let _ = writeln!(out, "{RATELIMIT_EVICTIONS_TOTAL}{{listener=\"{name}\"}} {evictions}");
        let _ = writeln!(out, "{RATELIMIT_TRACKED}{{listener=\"{name}\"}} {tracked}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "pool=\"p\"");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{pool=\"p\"} 3\n"), "{out}");
    }

    #[test]
    fn a_pool_histogram_is_the_sum_of_its_servers() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.observe(Duration::from_micros(300));
        b.observe(Duration::from_micros(400));
        b.observe(Duration::from_millis(30));
        let mut out = String::new();
        render_sum([&a, &b].into_iter(), &mut out, "x", "pool=\"p\"");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"0.0005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{pool=\"p\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{pool=\"p\"} 0.0307\n"), "{out}");
        assert!(out.contains("x_count{pool=\"p\"} 3\n"), "{out}");
        let mut empty = String::new();
        render_sum(std::iter::empty(), &mut empty, "x", "pool=\"q\"");
        assert!(empty.contains("x_count{pool=\"q\"} 0\n"), "a pool without servers renders zeros: {empty}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\n"), "a\\\"b\\\\c\\n");
    }
}
