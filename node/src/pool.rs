//! A pool at run time: its servers' live state (each with its idle keep-alive connections), its
//! selector, its TLS settings towards the servers.
//!
//! Server state is atomics only, so the request path, the health checkers and the admin API
//! read and write it without locks. Whether a server may receive new requests ("eligible") is
//! the conjunction of three independent verdicts — active checks say up, the operator has not
//! drained it, passive outlier detection has not ejected it — and every change of any of them
//! calls [`Pool::refresh`], which rebuilds the selector over the eligible set and swaps it in.
//! Ejections end by time, so ejecting also schedules the refresh that readmits the server.
//! A pool with `slow_start` notices, in the same refresh, a server that became eligible again
//! and ramps its weight with a few scheduled refreshes ([`crate::slow_start`]).
//!
//! `ServerState` survives config reloads when a server keeps its pool, name and address (see
//! [`crate::snapshot`]): counters and verdicts are not reset by an unrelated change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use keel_cluster::model;

use crate::balance::{self, Member, Pick, Selector};
use crate::health::outlier::OutlierState;
use crate::proxy::h1::client::IdleConns;
use crate::proxy::h2_client::H2Conns;
use crate::proxy::retry::RetryBudget;
use crate::slow_start;
use crate::tls::{TlsError, UpstreamTls};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// The process's time base, the zero of [`now_millis`].
pub fn epoch() -> Instant {
    *EPOCH
}

/// Milliseconds since the process's time base: how ejection deadlines are stored in an atomic.
pub fn now_millis() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Fixed seed of server identities, the same on every node so all map a client alike.
pub const SERVER_ID_SEED: u64 = 0x6b65_656c_5f73_7276; // "keel_srv"

/// Response counters by status class, 1xx … 5xx.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Request and error counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests sent to the server (retries count once per attempt).
    pub requests: AtomicU64,
    /// Responses received, by status class (index 0 = 1xx).
    pub responses: [AtomicU64; 5],
    /// Connections the server refused or that timed out while connecting.
    pub connect_errors: AtomicU64,
    /// Requests whose response head did not arrive within the request timeout.
    pub timeouts: AtomicU64,
    /// Other failures: the server closed or broke the connection mid-exchange.
    pub broken: AtomicU64,
    /// Time from request to response head for the requests it answered.
    pub latency: crate::metrics::Histogram,
}

impl ServerStats {
    /// Counts a response with `status`.
    pub fn count_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// One server of a pool as built: a configured server with an IP literal, or one address that
/// a configured DNS name resolved to (named `ENTRY@IP:PORT`, see [`crate::resolve`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    /// Name unique within the pool.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// Configured weight (a resolved server has its entry's).
    pub weight: u32,
    /// `NAME:PORT` of the DNS name a resolved server comes from; `None` for an IP literal.
    pub host: Option<String>,
}

impl ServerSpec {
    /// The spec of a configured server with an IP literal; `None` for a DNS name, which only
    /// the resolver can turn into servers.
    pub fn literal(server: &model::Server) -> Option<ServerSpec> {
        let address = server.address.ip()?;
        Some(ServerSpec { name: server.name.clone(), address, weight: server.weight, host: None })
    }
}

/// The live state of one backend server.
#[derive(Debug)]
pub struct ServerState {
    /// Name unique within the pool.
    pub name: String,
    /// Where it listens.
    pub address: SocketAddr,
    /// `NAME:PORT` of the DNS name it was resolved from (the default `Host` of HTTP checks).
    pub host: Option<String>,
    /// Stable identity for consistent hashing: a fixed-seed hash of the name.
    pub id: u64,
    weight: AtomicU32,
    /// The weight the config gave when the state was last built: a rebuild that does not
    /// change it (a new DNS answer, another pool's change) keeps an operator's weight.
    configured_weight: AtomicU32,
    checked_up: AtomicBool,
    draining: AtomicBool,
    /// Passive outlier detection's bookkeeping, including the ejection deadline.
    pub outlier: OutlierState,
    /// Requests in flight (sent, response body not yet finished).
    pub active: AtomicUsize,
    /// Counters.
    pub stats: ServerStats,
    /// Idle keep-alive connections to this server: the one connection pool of keel's HTTP/1.1
    /// client ([`crate::proxy::h1::client`]) for it.
    pub idle: Arc<IdleConns>,
    /// Shared HTTP/2 connections to this server, for pools with `protocol = "h2c"`/`"h2"`
    /// ([`crate::proxy::h2_client`]); empty otherwise.
    pub h2: Arc<H2Conns>,
    /// Whether the last [`Pool::refresh`] found it eligible: a change to eligible starts a
    /// slow-start ramp.
    was_eligible: AtomicBool,
    /// When its slow-start ramp began (tokio's clock, so tests can pause it); read and written
    /// only by refreshes and `/status`, never per request.
    ramp_start: Mutex<Option<tokio::time::Instant>>,
    /// When its state (up, down, drain, ejected) last changed, Unix ms; 0 = not since start.
    changed_at_ms: AtomicU64,
    /// The last active health check's result: `None` before the first, else the error, if any.
    last_check: Mutex<Option<Result<(), String>>>,
}

impl ServerState {
    /// A server as configured: up, not drained, not ejected.
    pub fn new(server: &ServerSpec) -> Self {
        Self {
            name: server.name.clone(),
            address: server.address,
            host: server.host.clone(),
            id: xxhash_rust::xxh3::xxh3_64_with_seed(server.name.as_bytes(), SERVER_ID_SEED),
            weight: AtomicU32::new(server.weight),
            configured_weight: AtomicU32::new(server.weight),
            checked_up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            outlier: OutlierState::default(),
            active: AtomicUsize::new(0),
            stats: ServerStats::default(),
            idle: Arc::default(),
            h2: Arc::default(),
            // Servers present at start-up are assumed up and take their full share at once
            // (as HAProxy's slowstart does not apply at start).
            was_eligible: AtomicBool::new(true),
            ramp_start: Mutex::new(None),
            changed_at_ms: AtomicU64::new(0),
            last_check: Mutex::new(None),
        }
    }

    /// Notes that its state changed now (for "down for 3 min" on the dashboard).
    pub fn mark_changed(&self) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        self.changed_at_ms.store(now as u64, Ordering::Relaxed);
    }

    /// When its state last changed, Unix ms; `None` when it has not since start.
    pub fn changed_at_ms(&self) -> Option<u64> {
        Some(self.changed_at_ms.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Records the result of an active health check.
    pub fn set_last_check(&self, result: Result<(), String>) {
        *self.last_check.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
    }

    /// The last active health check's result, if any check ran.
    pub fn last_check(&self) -> Option<Result<(), String>> {
        self.last_check.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Marks a server added to a running pool, so the next refresh ramps it.
    pub fn mark_added(&self) {
        self.was_eligible.store(false, Ordering::Release);
    }

    fn ramp(&self) -> std::sync::MutexGuard<'_, Option<tokio::time::Instant>> {
        self.ramp_start.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its slow-start step now under a ramp `window` (`None`: not ramping).
    fn ramp_step(&self, window: Option<Duration>, now: tokio::time::Instant) -> Option<u32> {
        let window = window?;
        let mut ramp = self.ramp();
        let step = slow_start::step(now.saturating_duration_since((*ramp)?), window);
        if step.is_none() {
            *ramp = None;
        }
        step
    }

    /// The weight it gets now, slow start included (fractional while ramping), for `/status`.
    pub fn effective_weight(&self, slow_start: Option<Duration>) -> f64 {
        let step = if self.is_eligible() { self.ramp_step(slow_start, tokio::time::Instant::now()) } else { None };
        slow_start::effective_weight(self.weight(), step)
    }

    /// Current weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Whether active health checks consider it up (always true without checks).
    pub fn is_checked_up(&self) -> bool {
        self.checked_up.load(Ordering::Acquire)
    }

    /// Whether the operator drained it.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether outlier detection has it ejected right now.
    pub fn is_ejected(&self) -> bool {
        self.outlier.is_ejected(now_millis())
    }

    /// Whether it may receive new requests.
    pub fn is_eligible(&self) -> bool {
        self.is_checked_up() && !self.is_draining() && !self.is_ejected()
    }

    /// A one-word state for humans and the admin API.
    pub fn state_name(&self) -> &'static str {
        if self.is_draining() {
            "drain"
        } else if !self.is_checked_up() {
            "down"
        } else if self.is_ejected() {
            "ejected"
        } else {
            "up"
        }
    }
}

/// Where a pool's active-check flips go instead of straight into its servers' state: in
/// cluster mode they are one node's vote, proposed to the cluster.
pub trait VerdictReporter: Send + Sync {
    /// This node's checks now consider `server` of `pool` up (or down).
    fn report(&self, pool: &str, server: &str, up: bool);
}

/// Why a drain/enable/weight request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No server by that name.
    #[error("pool {pool:?} has no server named {server:?}")]
    UnknownServer {
        /// The pool.
        pool: String,
        /// The name asked for.
        server: String,
    },
    /// Weight outside 1–256.
    #[error("weight {0} is out of range 1-{max}", max = model::MAX_WEIGHT)]
    BadWeight(u32),
}

/// A pool of servers at run time.
pub struct Pool {
    /// Pool name.
    pub name: String,
    /// Its configuration.
    pub config: model::Pool,
    /// Its servers, in config order; selectors return indices into this list.
    pub servers: Vec<Arc<ServerState>>,
    selector: ArcSwap<Box<dyn Selector>>,
    /// TLS towards the servers, for a pool with `[pools.x.tls]`; `None` speaks plain HTTP.
    pub tls: Option<Arc<UpstreamTls>>,
    /// Retries in flight (the pool's retry budget) and retry counters.
    pub retries: RetryBudget,
    /// Self-reference handed to timers, so a pool dropped by a reload is not kept alive by them.
    this: Weak<Pool>,
    /// Set in cluster mode.
    reporter: OnceLock<Arc<dyn VerdictReporter>>,
}

impl Pool {
    /// Builds a pool of the configured servers with IP literals (DNS names contribute nothing;
    /// see [`Pool::with_servers`]), reusing `existing` server states.
    pub fn new(
        name: &str,
        config: &model::Pool,
        existing: impl Fn(&ServerSpec) -> Option<Arc<ServerState>>,
    ) -> Result<Arc<Self>, TlsError> {
        let servers = config.servers.iter().filter_map(ServerSpec::literal).collect();
        Self::with_servers(name, config, servers, existing)
    }

    /// Builds a pool of `servers` (the config's, with DNS names expanded), reusing `existing`
    /// server states where the same name and address remain. Fails when the pool's TLS
    /// settings (CA bundle) cannot be loaded.
    pub fn with_servers(
        name: &str,
        config: &model::Pool,
        servers: Vec<ServerSpec>,
        existing: impl Fn(&ServerSpec) -> Option<Arc<ServerState>>,
    ) -> Result<Arc<Self>, TlsError> {
        let servers: Vec<Arc<ServerState>> = servers
            .iter()
            .map(|s| {
                let state = existing(s).unwrap_or_else(|| Arc::new(ServerState::new(s)));
                if state.configured_weight.swap(s.weight, Ordering::Relaxed) != s.weight {
                    state.weight.store(s.weight, Ordering::Relaxed);
                }
                state
            })
            .collect();

        let h2 = config.protocol == model::UpstreamProtocol::H2;
        let tls = config.tls.as_ref().map(|tls| UpstreamTls::with_alpn(tls, h2)).transpose()?.map(Arc::new);

        let pool = Arc::new_cyclic(|this| Pool {
            name: name.to_owned(),
            config: config.clone(),
            servers,
            selector: ArcSwap::from_pointee(balance::build(config.algorithm, &[])),
            tls,
            retries: RetryBudget::default(),
            this: this.clone(),
            reporter: OnceLock::new(),
        });
        pool.refresh();
        // A ramp under way when the pool was rebuilt (a reload) keeps its scheduled steps.
        let ramps: Vec<_> = pool.servers.iter().filter_map(|s| *s.ramp()).collect();
        for start in ramps {
            pool.schedule_ramp(start);
        }
        Ok(pool)
    }

    /// Routes this pool's active-check flips to `reporter` instead of its servers' state.
    pub fn set_reporter(&self, reporter: Arc<dyn VerdictReporter>) {
        let _ = self.reporter.set(reporter);
    }

    /// Where active-check flips go, in cluster mode.
    pub fn reporter(&self) -> Option<&Arc<dyn VerdictReporter>> {
        self.reporter.get()
    }

    /// Rebuilds the selector over the servers eligible now. Call after any verdict change.
    /// With `slow_start`, a server eligible again since the last refresh starts its ramp here.
    pub fn refresh(&self) {
        let window = self.config.slow_start.map(|d| d.get());
        let now = tokio::time::Instant::now();
        let mut started = false;
        let mut eligible: Vec<(usize, u32, u64, Option<u32>)> = Vec::with_capacity(self.servers.len());
        for (index, s) in self.servers.iter().enumerate() {
            let up = s.is_eligible();
            let was = s.was_eligible.swap(up, Ordering::AcqRel);
            if !up {
                continue;
            }
            if window.is_some() && !was {
                *s.ramp() = Some(now);
                started = true;
                tracing::info!(target: "keel::health", pool = %self.name, server = %s.name,
                    slow_start = ?window, "server back in rotation, ramping its weight");
            }
            eligible.push((index, s.weight(), s.id, s.ramp_step(window, now)));
        }
        let scale = match eligible.iter().any(|m| m.3.is_some()) {
            true => slow_start::scale(eligible.iter().map(|m| m.1).max().unwrap_or(1)),
            false => 1,
        };
        let members: Vec<Member> = eligible
            .iter()
            .map(|&(index, weight, id, step)| Member {
                index,
                weight: slow_start::scaled_weight(weight, scale, step),
                id,
            })
            .collect();
        self.selector.store(Arc::new(balance::build(self.config.algorithm, &members)));
        if started {
            self.schedule_ramp(now);
        }
    }

    /// The refreshes that move a ramp begun at `start` through its steps and end it.
    fn schedule_ramp(&self, start: tokio::time::Instant) {
        let Some(window) = self.config.slow_start.map(|d| d.get()) else { return };
        // Outside a runtime (a unit test building a pool) there is nothing to schedule on.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let this = self.this.clone();
        runtime.spawn(async move {
            let margin = Duration::from_millis(1);
            for k in 2..=slow_start::STEPS {
                tokio::time::sleep_until(start + slow_start::step_start(k, window) + margin).await;
                match this.upgrade() {
                    Some(pool) => pool.refresh(),
                    None => return,
                }
            }
            tokio::time::sleep_until(start + window + margin).await;
            if let Some(pool) = this.upgrade() {
                pool.refresh();
            }
        });
    }

    /// Picks a server for a request from a client whose key hashes to `hash`, skipping the
    /// servers `skip` names (already tried). `None` means no server can take it: 503.
    pub fn select(&self, hash: u64, skip: &[usize]) -> Option<usize> {
        let selector = self.selector.load();
        let load = |i: usize| self.servers.get(i).map_or(usize::MAX, |s| s.active.load(Ordering::Relaxed));
        let accept = |i: usize| !skip.contains(&i) && self.servers.get(i).is_some_and(|s| s.is_eligible());
        selector.select(&Pick { hash, load: &load, accept: &accept })
    }

    /// The index of the server named `name`.
    pub fn server_index(&self, name: &str) -> Result<usize, PoolError> {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| PoolError::UnknownServer { pool: self.name.clone(), server: name.to_owned() })
    }

    /// Records an active-check verdict; refreshes the selector when it changed.
    pub fn set_checked_up(&self, index: usize, up: bool) -> bool {
        let Some(server) = self.servers.get(index) else { return false };
        let changed = server.checked_up.swap(up, Ordering::AcqRel) != up;
        if changed {
            server.mark_changed();
            crate::events::record(
                "health",
                format!("{}/{} {}", self.name, server.name, if up { "UP" } else { "DOWN" }),
            );
            self.refresh();
        }
        changed
    }

    /// Drains (no new requests, in-flight ones finish) or re-enables a server.
    pub fn set_draining(&self, name: &str, draining: bool) -> Result<(), PoolError> {
        let i = self.server_index(name)?;
        if self.servers[i].draining.swap(draining, Ordering::AcqRel) != draining {
            tracing::info!(target: "keel::admin", pool = %self.name, server = %name,
                "server {}", if draining { "drained" } else { "enabled" });
            self.servers[i].mark_changed();
            crate::events::record(
                "drain",
                format!("{}/{name} {}", self.name, if draining { "drained" } else { "enabled" }),
            );
            self.refresh();
        }
        Ok(())
    }

    /// Changes a server's weight.
    pub fn set_weight(&self, name: &str, weight: u32) -> Result<(), PoolError> {
        if weight == 0 || weight > model::MAX_WEIGHT {
            return Err(PoolError::BadWeight(weight));
        }
        let i = self.server_index(name)?;
        let old = self.servers[i].weight.swap(weight, Ordering::Relaxed);
        if old != weight {
            crate::events::record("weight", format!("{}/{name} weight {old} → {weight}", self.name));
            self.refresh();
        }
        Ok(())
    }

    /// Requests in flight on the pool's servers now (what the retry budget is a share of).
    pub fn active(&self) -> usize {
        self.servers.iter().map(|s| s.active.load(Ordering::Relaxed)).sum()
    }

    /// Feeds a request outcome to passive outlier detection. `ok` is false for a connect
    /// error, a broken exchange or a 5xx response.
    pub fn observe(&self, index: usize, ok: bool) {
        let Some(server) = self.servers.get(index) else { return };
        let outlier = &self.config.outlier;
        if outlier.consecutive_failures == 0 {
            return;
        }
        let Some(ejected_for) =
            server.outlier.observe(ok, now_millis(), outlier.consecutive_failures, outlier.ejection.get())
        else {
            return;
        };
        tracing::warn!(target: "keel::health", pool = %self.name, server = %server.name,
            failures = outlier.consecutive_failures, ejected_for = ?ejected_for,
            "server ejected (consecutive failures on live traffic)");
        server.mark_changed();
        crate::events::record(
            "ejection",
            format!(
                "{}/{} ejected for {:?} ({} consecutive failures)",
                self.name, server.name, ejected_for, outlier.consecutive_failures
            ),
        );
        self.refresh();
        let this = self.this.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ejected_for + Duration::from_millis(1)).await;
            if let Some(pool) = this.upgrade() {
                pool.refresh();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(extra: &str) -> Arc<Pool> {
        let cfg: model::Pool = toml::from_str(&format!(
            "algorithm = \"weighted_round_robin\"\n{extra}\n\
             [[servers]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
             [[servers]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n"
        ))
        .expect("pool config");
        Pool::new("p", &cfg, |_| None).expect("plain pool")
    }

    /// How many of `n` picks go to server `b`.
    fn share_of_b(pool: &Pool, n: usize) -> usize {
        (0..n).filter(|_| pool.select(0, &[]) == Some(1)).count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_back_up_ramps_from_a_tenth_to_full() {
        let pool = pool("slow_start = \"10s\"");
        // At start-up nothing ramps.
        assert_eq!(share_of_b(&pool, 100), 50);
        pool.set_checked_up(1, false);
        assert_eq!(share_of_b(&pool, 100), 0);
        pool.set_checked_up(1, true);
        let b = &pool.servers[1];
        assert!((b.effective_weight(Some(Duration::from_secs(10))) - 0.1).abs() < 1e-9);
        // Weights 10 and 1: b gets 1 pick in 11.
        assert_eq!(share_of_b(&pool, 110), 10);
        // Halfway the scheduled refreshes have it at step 6: 6 in 16.
        tokio::time::sleep(Duration::from_millis(5_010)).await;
        assert!((b.effective_weight(Some(Duration::from_secs(10))) - 0.6).abs() < 1e-9);
        assert_eq!(share_of_b(&pool, 160), 60);
        // After the window: full weight, even shares again.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!((b.effective_weight(Some(Duration::from_secs(10))) - 1.0).abs() < 1e-9);
        assert_eq!(share_of_b(&pool, 100), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn enable_after_drain_ramps_and_no_slow_start_does_not() {
        let ramped = pool("slow_start = \"10s\"");
        ramped.set_draining("b", true).expect("drain");
        ramped.set_draining("b", false).expect("enable");
        assert_eq!(share_of_b(&ramped, 110), 10);
        let plain = pool("");
        plain.set_draining("b", true).expect("drain");
        plain.set_draining("b", false).expect("enable");
        assert_eq!(share_of_b(&plain, 100), 50);
        assert!((plain.servers[1].effective_weight(None) - 1.0).abs() < 1e-9);
    }
}
