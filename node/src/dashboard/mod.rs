//! The live dashboard on the admin address: one sampler per node, one page per browser.
//!
//! A single task ([`spawn`]) takes one sample of the node's counters every [`TICK`] — the same
//! atomics `/metrics` renders — turns them into rates, latency quantiles and short histories,
//! and publishes the result as one JSON document ([`Dashboard::frame`]). Every viewer's poll of
//! `GET /dashboard.json` returns that shared document: a hundred open tabs cost the node one
//! sample a second, not a hundred.
//!
//! A pool with a replicated (`store = "raft"`) sticky table also shows its entries, its
//! `max_entries` and its evictions, read from the cluster state as `/metrics` reads them.
//!
//! Rates are taken over the last [`RATE_WINDOW`] ticks; latency quantiles from the per-server
//! histogram's bucket counts over the last [`LATENCY_WINDOW`] ticks (linear inside a bucket, as
//! Prometheus' `histogram_quantile` does); sparklines keep [`HISTORY`] points. In a cluster the
//! sampler also asks every other member's admin API for its `/status` (with this node's
//! token, in tasks of their own so a dead member never delays a tick): that gives each member's
//! reachability, last contact and whether it holds the VIP — only while someone fetched the
//! document within [`WATCHED_FOR`]: an idle node does not call its peers every other second.
//!
//! The page itself ([`PAGE`]) is one HTML file with its script and styles inline, embedded in
//! the binary: no CDN, no build step, no framework — a few hundred lines of plain DOM code are
//! less to audit and to ship than any framework, and the page has one job.

pub mod session;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use keel_cluster::api::client::ClusterClient;
use keel_cluster::ClusterHandle;
use keel_vrrp::VipStatus;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::daemon::apply::ReloadStatus;
use crate::metrics::{ListenerMetrics, BUCKETS};
use crate::snapshot::SharedSnapshot;

/// The page, served at `GET /`.
pub const PAGE: &str = include_str!("page.html");
/// The sign-in form, served at `GET /` to a browser without a session on a node with a token.
pub const LOGIN: &str = include_str!("login.html");

/// How often the sampler samples.
pub const TICK: Duration = Duration::from_secs(1);
/// How long after the last fetch the dashboard counts as watched (members are asked for their
/// status only then).
pub const WATCHED_FOR: Duration = Duration::from_secs(60);
/// Ticks a rate is averaged over.
pub const RATE_WINDOW: usize = 5;
/// Ticks the latency quantiles cover (one minute).
pub const LATENCY_WINDOW: usize = 60;
/// Points in a sparkline (three minutes).
pub const HISTORY: usize = 180;
/// Events shown.
pub const EVENTS: usize = 50;

/// What the sampler reads.
pub struct Inputs {
    /// The routing snapshot (pools, servers and their counters).
    pub snapshot: SharedSnapshot,
    /// The running listeners' counters.
    pub listeners: Arc<ArcSwap<Vec<ListenerMetrics>>>,
    /// The Raft member, in cluster mode.
    pub cluster: Option<ClusterHandle>,
    /// This node's VIP controller.
    pub vip: Option<watch::Receiver<VipStatus>>,
    /// The spread VIPs this node carries, each with its controller's status.
    pub vips: Vec<(std::net::IpAddr, watch::Receiver<VipStatus>)>,
    /// Reload outcomes.
    pub reloads: Arc<ReloadStatus>,
    /// This node's admin token, to ask the other members.
    pub token: Option<Arc<str>>,
}

/// The published document.
pub struct Dashboard {
    frame: ArcSwap<Bytes>,
    /// When a viewer last fetched the document (Unix ms; 0: never).
    last_read_ms: AtomicU64,
}

impl Dashboard {
    /// The latest document, as JSON.
    pub fn frame(&self) -> Bytes {
        self.last_read_ms.store(unix_ms(), Ordering::Relaxed);
        (**self.frame.load()).clone()
    }

    /// Whether anyone fetched the document within [`WATCHED_FOR`].
    fn watched(&self) -> bool {
        let last = self.last_read_ms.load(Ordering::Relaxed);
        last != 0 && unix_ms().saturating_sub(last) < WATCHED_FOR.as_millis() as u64
    }
}

/// One sample of one server's counters.
#[derive(Clone, Copy)]
struct ServerSample {
    responses: u64,
    errors: u64,
    buckets: [u64; BUCKETS.len() + 1],
}

/// One sample of one listener's counters.
#[derive(Clone, Copy, Default)]
struct ListenerSample {
    requests: u64,
    errors: u64,
    bytes_in: u64,
    bytes_out: u64,
    handshakes: u64,
}

/// A member as seen from this node.
#[derive(Clone, Default, Serialize)]
struct Contact {
    reachable: bool,
    last_contact_unix_ms: Option<u64>,
    holds_vip: Option<bool>,
    vip_since_unix_ms: Option<u64>,
    /// Spread VIPs on its interface.
    vips: Vec<String>,
}

/// A server, by pool and name.
type ServerKey = (String, String);
/// One sparkline point: requests/s and p99 (ms).
type SparkPoint = (f64, Option<f64>);

#[derive(Default)]
struct Sampler {
    servers: HashMap<ServerKey, VecDeque<ServerSample>>,
    sparks: HashMap<ServerKey, VecDeque<SparkPoint>>,
    listeners: HashMap<String, VecDeque<ListenerSample>>,
    leader: Option<(Option<u64>, u64)>,
    holding: Option<bool>,
}

/// Starts the sampler; it runs until `stop`.
pub fn spawn(inputs: Inputs, mut stop: watch::Receiver<bool>) -> Arc<Dashboard> {
    let dashboard = Arc::new(Dashboard {
        frame: ArcSwap::from_pointee(Bytes::from_static(b"{}")),
        last_read_ms: AtomicU64::new(0),
    });
    let published = dashboard.clone();
    let contacts: Arc<Mutex<BTreeMap<u64, Contact>>> = Arc::default();
    tokio::spawn(async move {
        let started = Instant::now();
        let started_unix_ms = unix_ms();
        let mut sampler = Sampler::default();
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        let mut was_watched = false;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => return,
            }
            // Asking every member for its status costs a request per member every other tick:
            // only while someone looks. The local counters are sampled always (a pass over the
            // pools), so the histories are there when a viewer arrives.
            let watched = published.watched();
            if let Some(cluster) = &inputs.cluster {
                if watched && (!was_watched || n.is_multiple_of(2)) {
                    probe_members(cluster, inputs.token.clone(), contacts.clone());
                } else if !watched && was_watched {
                    // What members said a minute ago is not shown as current when one returns.
                    contacts.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            }
            was_watched = watched;
            n += 1;
            let frame = sampler.sample(&inputs, started, started_unix_ms, &contacts);
            match serde_json::to_vec(&frame) {
                Ok(bytes) => published.frame.store(Arc::new(Bytes::from(bytes))),
                Err(e) => tracing::debug!(target: "keel::admin", error = %e, "cannot encode the dashboard frame"),
            }
        }
    });
    dashboard
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Asks every other member for its `/status`, each in a task of its own.
fn probe_members(cluster: &ClusterHandle, token: Option<Arc<str>>, contacts: Arc<Mutex<BTreeMap<u64, Contact>>>) {
    let status = cluster.status();
    let me = status.id;
    let members: Vec<(u64, SocketAddr)> =
        status.members.iter().filter(|m| m.id != me).map(|m| (m.id, m.node.admin_addr)).collect();
    contacts.lock().unwrap_or_else(|p| p.into_inner()).retain(|id, _| members.iter().any(|(m, _)| m == id));
    for (id, addr) in members {
        let contacts = contacts.clone();
        let client = ClusterClient::new(addr).with_token(token.as_deref().map(str::to_owned));
        tokio::spawn(async move {
            let answer = tokio::time::timeout(TICK * 2, client.get_json("/status")).await;
            let mut all = contacts.lock().unwrap_or_else(|p| p.into_inner());
            let entry = all.entry(id).or_default();
            match answer {
                Ok(Ok(doc)) => {
                    entry.reachable = true;
                    entry.last_contact_unix_ms = Some(unix_ms());
                    entry.holds_vip = doc["vip"]["holding"].as_bool();
                    entry.vip_since_unix_ms = doc["vip"]["last_change_unix_ms"].as_u64();
                    entry.vips = held_spread(&doc);
                }
                // A witness has no /status (404): it answered, so it is reachable.
                Ok(Err(e)) if e.is_application() => {
                    entry.reachable = true;
                    entry.last_contact_unix_ms = Some(unix_ms());
                }
                // What an unreachable member held is not known any more: a dead holder must
                // not be shown as holding (its kernel lease and the new holder say otherwise).
                _ => {
                    entry.reachable = false;
                    entry.holds_vip = None;
                    entry.vips.clear();
                }
            }
        });
    }
}

/// Per-second rate between the oldest and newest of the last `window + 1` samples.
fn rate<T>(samples: &VecDeque<T>, window: usize, get: impl Fn(&T) -> u64) -> f64 {
    let (Some(last), Some(first)) = (samples.back(), samples.iter().rev().nth(window.min(samples.len() - 1))) else {
        return 0.0;
    };
    let ticks = window.min(samples.len() - 1);
    if ticks == 0 {
        return 0.0;
    }
    get(last).saturating_sub(get(first)) as f64 / (ticks as f64 * TICK.as_secs_f64())
}

/// The `q` quantile, in ms, of the observations between two samples of per-bucket counts.
fn quantile(newer: &[u64], older: &[u64], q: f64) -> Option<f64> {
    let delta: Vec<u64> = newer.iter().zip(older).map(|(n, o)| n.saturating_sub(*o)).collect();
    let total: u64 = delta.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0.0;
    for (i, &count) in delta.iter().enumerate() {
        let next = seen + count as f64;
        if next >= rank && count > 0 {
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            // The +Inf bucket has no upper bound: report its lower one.
            let Some(&upper) = BUCKETS.get(i) else { return Some(lower * 1000.0) };
            let within = (rank - seen) / count as f64;
            return Some((lower + (upper - lower) * within) * 1000.0);
        }
        seen = next;
    }
    None
}

fn push<T>(ring: &mut VecDeque<T>, value: T, cap: usize) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(value);
}

impl Sampler {
    fn sample(
        &mut self,
        inputs: &Inputs,
        started: Instant,
        started_unix_ms: u64,
        contacts: &Mutex<BTreeMap<u64, Contact>>,
    ) -> Value {
        let snapshot = inputs.snapshot.load_full();
        let listener_metrics = inputs.listeners.load_full();

        let mut listeners = Vec::new();
        for l in listener_metrics.iter() {
            let t = &l.traffic;
            let now = ListenerSample {
                requests: t.requests.load(Ordering::Relaxed),
                errors: t.errors.load(Ordering::Relaxed),
                bytes_in: t.bytes_in.load(Ordering::Relaxed),
                bytes_out: t.bytes_out.load(Ordering::Relaxed),
                handshakes: t.handshakes.load(Ordering::Relaxed),
            };
            let ring = self.listeners.entry(l.name.clone()).or_default();
            push(ring, now, RATE_WINDOW + 1);
            let config = snapshot.config.listeners.get(&l.name);
            listeners.push(json!({
                "name": l.name,
                "bind": config.map(|c| c.bind.to_string()),
                "protocol": config.map(|c| c.protocol.as_str()),
                "connections": l.connections.open(),
                "parked": l.parked.load(Ordering::Relaxed),
                "requests": now.requests,
                "rps": rate(ring, RATE_WINDOW, |s| s.requests),
                "errors_ps": rate(ring, RATE_WINDOW, |s| s.errors),
                "bytes_in_ps": rate(ring, RATE_WINDOW, |s| s.bytes_in),
                "bytes_out_ps": rate(ring, RATE_WINDOW, |s| s.bytes_out),
                "handshakes_ps": rate(ring, RATE_WINDOW, |s| s.handshakes),
            }));
        }
        self.listeners.retain(|name, _| listener_metrics.iter().any(|l| &l.name == name));

        // The replicated tables' figures (cluster mode): the same on every node, as /metrics has them.
        let sticky_tables = inputs.cluster.as_ref().map(|c| c.state().borrow().sticky_tables()).unwrap_or_default();
        let mut pools = Vec::new();
        let mut live = Vec::new();
        for pool in snapshot.pools.values() {
            let mut servers = Vec::new();
            for s in &pool.servers {
                let key = (pool.name.clone(), s.name.clone());
                let mut buckets = [0u64; BUCKETS.len() + 1];
                for (i, b) in buckets.iter_mut().enumerate() {
                    *b = s.stats.latency.bucket(i);
                }
                let now = ServerSample {
                    responses: s.stats.responses.iter().map(|r| r.load(Ordering::Relaxed)).sum(),
                    errors: s.stats.responses[4].load(Ordering::Relaxed),
                    buckets,
                };
                let ring = self.servers.entry(key.clone()).or_default();
                push(ring, now, LATENCY_WINDOW + 1);
                let oldest = ring.front().map_or(now.buckets, |o| o.buckets);
                let (p50, p99) = (quantile(&now.buckets, &oldest, 0.5), quantile(&now.buckets, &oldest, 0.99));
                let rps = rate(ring, RATE_WINDOW, |x| x.responses);
                // The sparkline's latency is that of the last few seconds, not the minute.
                let recent = ring.iter().rev().nth(RATE_WINDOW.min(ring.len() - 1)).map_or(now.buckets, |o| o.buckets);
                let spark = self.sparks.entry(key.clone()).or_default();
                push(spark, (rps, quantile(&now.buckets, &recent, 0.99)), HISTORY);
                let last_check = s.last_check().map(|r| match r {
                    Ok(()) => json!({ "ok": true }),
                    Err(e) => json!({ "ok": false, "error": e }),
                });
                servers.push(json!({
                    "name": s.name,
                    "address": s.address.to_string(),
                    "state": s.state_name(),
                    "since_unix_ms": s.changed_at_ms(),
                    "last_check": last_check,
                    "weight": s.weight(),
                    "effective_weight": s.effective_weight(pool.config.slow_start.map(|d| d.get())),
                    "active": s.active.load(Ordering::Relaxed),
                    "requests": now.responses,
                    "rps": rps,
                    "errors_ps": rate(ring, RATE_WINDOW, |x| x.errors),
                    "p50_ms": p50,
                    "p99_ms": p99,
                    "connect_errors": s.stats.connect_errors.load(Ordering::Relaxed),
                    "timeouts": s.stats.timeouts.load(Ordering::Relaxed),
                    "spark_rps": spark.iter().map(|p| p.0).collect::<Vec<_>>(),
                    "spark_p99_ms": spark.iter().map(|p| p.1).collect::<Vec<_>>(),
                }));
                live.push(key);
            }
            let sticky = snapshot.sticky.get(&pool.name).map(|p| json!({ "hits": p.hits(), "misses": p.misses() }));
            pools.push(json!({
                "name": pool.name,
                "algorithm": pool.config.algorithm.to_string(),
                "available": pool.servers.iter().filter(|s| s.is_eligible()).count(),
                "sticky": sticky,
                "sticky_table": sticky_tables.get(&pool.name),
                "names": snapshot.names.status(&pool.name),
                "servers": servers,
            }));
        }
        self.servers.retain(|k, _| live.contains(k));
        self.sparks.retain(|k, _| live.contains(k));

        let vip = inputs.vip.as_ref().map(|rx| rx.borrow().clone());
        if let Some(v) = &vip {
            if self.holding.is_some_and(|h| h != v.holding) {
                let what = if v.holding { "this node claimed the VIP" } else { "this node released the VIP" };
                crate::events::record("vip", what);
            }
            self.holding = Some(v.holding);
        }
        let spread: Vec<(std::net::IpAddr, bool)> =
            inputs.vips.iter().map(|(a, rx)| (*a, rx.borrow().holding)).collect();
        let cluster = inputs.cluster.as_ref().map(|c| self.cluster(c, vip.as_ref(), &spread, contacts));
        let reload = inputs.reloads.get();
        json!({
            "node": {
                "version": crate::VERSION,
                "commit": crate::COMMIT,
                "uptime_s": started.elapsed().as_secs(),
                "started_unix_ms": started_unix_ms,
                "now_unix_ms": unix_ms(),
                "mode": if inputs.cluster.is_some() { "cluster" } else { "standalone" },
            },
            "listeners": listeners,
            "pools": pools,
            "vip": vip.map(|v| json!({ "holding": v.holding, "since_unix_ms": v.last_change_unix_ms })),
            "cluster": cluster,
            "reload": reload,
            "events": crate::events::recent(EVENTS),
        })
    }

    fn cluster(
        &mut self,
        handle: &ClusterHandle,
        vip: Option<&VipStatus>,
        spread: &[(std::net::IpAddr, bool)],
        contacts: &Mutex<BTreeMap<u64, Contact>>,
    ) -> Value {
        let status = handle.status();
        let seen = (status.leader_id, status.term);
        if self.leader.is_some_and(|l| l != seen) {
            let text = match status.leader_id {
                Some(id) => format!("node {id} leads (term {})", status.term),
                None => format!("no leader (term {}): an election is running", status.term),
            };
            crate::events::record("election", text);
        }
        self.leader = Some(seen);
        let contacts = contacts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let members: Vec<Value> = status
            .members
            .iter()
            .map(|m| {
                let role = if Some(m.id) == status.leader_id {
                    "leader"
                } else if m.voter {
                    "follower"
                } else {
                    "learner"
                };
                let contact = if m.id == status.id {
                    Contact {
                        reachable: true,
                        last_contact_unix_ms: Some(unix_ms()),
                        holds_vip: vip.map(|v| v.holding),
                        vip_since_unix_ms: vip.and_then(|v| v.last_change_unix_ms),
                        vips: spread.iter().filter(|(_, h)| *h).map(|(a, _)| a.to_string()).collect(),
                    }
                } else {
                    contacts.get(&m.id).cloned().unwrap_or_default()
                };
                json!({
                    "id": m.id,
                    "me": m.id == status.id,
                    "role": role,
                    "witness": m.node.witness,
                    "voter": m.voter,
                    "admin": m.node.admin_addr.to_string(),
                    "raft": m.node.raft_addr.to_string(),
                    "lag": m.lag,
                    "reachable": contact.reachable,
                    "last_contact_unix_ms": contact.last_contact_unix_ms,
                    "holds_vip": contact.holds_vip,
                    "vip_since_unix_ms": contact.vip_since_unix_ms,
                    "vips": contact.vips,
                })
            })
            .collect();
        let holder = members.iter().find(|m| m["holds_vip"] == true).map(|m| m["id"].clone());
        let since = members.iter().find(|m| m["holds_vip"] == true).map(|m| m["vip_since_unix_ms"].clone());
        json!({
            "id": status.id,
            "role": format!("{:?}", status.role).to_lowercase(),
            "leader_id": status.leader_id,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "members": members,
            "vip_holder": holder,
            "vip_since_unix_ms": since,
            // The spread VIPs as the replicated state names them.
            "vips": status.vips.iter().map(|(address, slot)| json!({
                "address": address,
                "holder": slot.holder,
                "moving_to": slot.move_to,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The spread VIPs a member's `/status` says are on its interface.
fn held_spread(doc: &Value) -> Vec<String> {
    doc["vips"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|v| v["holding"] == true)
                .filter_map(|v| v["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_deltas() {
        let mut older = [0u64; BUCKETS.len() + 1];
        let mut newer = [0u64; BUCKETS.len() + 1];
        // 100 observations, all in the (1 ms, 2.5 ms] bucket (index 2).
        newer[2] = 100;
        let p50 = quantile(&newer, &older, 0.5).unwrap();
        assert!((p50 - 1.75).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(&older, &older, 0.5), None);
        // Older observations do not count.
        older = newer;
        assert_eq!(quantile(&newer, &older, 0.99), None);
    }

    #[test]
    fn rates_span_the_window() {
        let ring: VecDeque<u64> = (0..10).map(|i| i * 10).collect();
        assert_eq!(rate(&ring, 5, |x| *x), 10.0);
        let one: VecDeque<u64> = [5].into_iter().collect();
        assert_eq!(rate(&one, 5, |x| *x), 0.0);
    }
}
