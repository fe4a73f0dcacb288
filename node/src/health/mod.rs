//! Backend health: active checks that probe each server on a timer, and passive outlier
//! detection that judges servers by the live traffic they serve.
//!
//! Active checking owns the `checked_up` verdict of [`crate::pool::ServerState`]. [`spawn`]
//! starts one task per server of a pool; each task runs a [`HealthCheck`] every interval, feeds
//! the results through rise/fall [`hysteresis`], and calls [`Pool::set_checked_up`] only when
//! the verdict flips, so the selector is rebuilt on transitions and never on routine checks.
//!
//! Tasks hold a [`Weak`] reference to their pool and end at the first tick after it is
//! dropped. A config reload builds new pools and drops the old ones, so reload needs no
//! shutdown plumbing: calling [`spawn`] on each new pool is the whole protocol.
//!
//! Check types: [`http`] (an HTTP/1.1 request judged by status), [`tcp`] (a connect) and
//! [`grpc`] (`grpc.health.v1.Health/Check` over HTTP/2).
//!
//! Passive detection ([`outlier`]) is driven by the request path through [`Pool::observe`].

pub mod grpc;
pub mod http;
pub mod hysteresis;
pub mod outlier;
pub mod tcp;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use keel_cluster::model::{self, CheckKind, StatusRange};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::pool::Pool;

pub use self::grpc::GrpcHealthCheck;
pub use self::http::HttpHealthCheck;
pub use self::hysteresis::Hysteresis;
pub use self::tcp::TcpHealthCheck;

/// How long past its own timeout a check may run before the scheduler gives up on it. The
/// checks enforce their timeouts themselves and report the precise cause; this only keeps a
/// misbehaving implementation from stalling a server's checks.
const GUARD_SLACK: Duration = Duration::from_millis(100);

/// Why a health check failed; logged as the reason when a server is marked down.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The TCP connection failed: refused, unreachable, reset.
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The TCP connection was not established in time.
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// Connected, but no complete response arrived in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The server answered with a status outside the accepted range.
    #[error("bad status {status} (expected {expected})")]
    BadStatus {
        /// The status received.
        status: u16,
        /// The accepted range.
        expected: StatusRange,
    },
    /// The server's answer was not valid HTTP/1.1, or it closed the connection mid-answer.
    #[error("protocol error: {0}")]
    Protocol(#[source] hyper::Error),
    /// A gRPC health check's call failed or did not answer `SERVING`.
    #[error("gRPC health check: {0}")]
    Grpc(String),
    /// The configured method, path or host cannot be put in a request.
    #[error("cannot build the check request: {0}")]
    InvalidRequest(String),
}

/// A way of probing one server once. Implementations bound themselves by their own timeout.
pub trait HealthCheck: Send + Sync + 'static {
    /// Probes the server listening at `address`; `Ok` means healthy.
    fn check(&self, address: SocketAddr) -> impl Future<Output = Result<(), CheckError>> + Send;

    /// Probes a server that `host` (`NAME:PORT`, the configured DNS name it was resolved from)
    /// names: an HTTP check sends it as the default `Host`. Others ignore the name.
    fn check_named(
        &self,
        address: SocketAddr,
        host: Option<&str>,
    ) -> impl Future<Output = Result<(), CheckError>> + Send {
        let _ = host;
        self.check(address)
    }
}

/// Starts active health checking of `pool`'s servers when its config has a `health` section:
/// one task per server, living as long as the pool. Call once per pool, after it is built,
/// inside a Tokio runtime.
///
/// Without a `health` section no task starts, and servers a previous pool's checks had marked
/// down are marked up again: without checks, `checked_up` is always true.
pub fn spawn(pool: &Arc<Pool>) {
    let _ = spawn_tasks(pool);
}

/// [`spawn`], returning the tasks so tests can see them end.
fn spawn_tasks(pool: &Arc<Pool>) -> Vec<JoinHandle<()>> {
    let Some(config) = &pool.config.health else {
        for (index, server) in pool.servers.iter().enumerate() {
            if pool.set_checked_up(index, true) {
                tracing::info!(target: "keel::health", pool = %pool.name, server = %server.name,
                    "server marked UP (health checks removed from the pool's config)");
            }
        }
        return Vec::new();
    };
    match config.kind {
        CheckKind::Tcp => spawn_with(pool, config, TcpHealthCheck::new(config.timeout.get())),
        CheckKind::Grpc => spawn_with(pool, config, GrpcHealthCheck::new(config, pool.tls.clone())),
        CheckKind::Http => match HttpHealthCheck::new(config) {
            Ok(check) => spawn_with(pool, config, check),
            Err(err) => {
                // Validation should have caught this; keeping servers in rotation unchecked
                // (outlier detection still applies) beats taking the whole pool down.
                tracing::error!(target: "keel::health", pool = %pool.name, reason = %err,
                    "health checks disabled for the pool (invalid check configuration)");
                Vec::new()
            }
        },
    }
}

fn spawn_with<C: HealthCheck>(pool: &Arc<Pool>, config: &model::HealthCheck, check: C) -> Vec<JoinHandle<()>> {
    let check = Arc::new(check);
    // A zero interval would panic the timer; validation rejects it, this only avoids a crash.
    let interval = config.interval.get().max(Duration::from_millis(1));
    pool.servers
        .iter()
        .enumerate()
        .map(|(index, server)| {
            // A server's state outlives a reload; one already down must earn its way back up.
            let hysteresis = if server.is_checked_up() {
                Hysteresis::new(config.rise, config.fall)
            } else {
                Hysteresis::down(config.rise, config.fall)
            };
            let task = Checker {
                pool: Arc::downgrade(pool),
                pool_name: pool.name.clone(),
                index,
                server: server.name.clone(),
                address: server.address,
                host: server.host.clone(),
                check: Arc::clone(&check),
                interval,
                timeout: config.timeout.get(),
                hysteresis,
            };
            tokio::spawn(task.run())
        })
        .collect()
}

/// The checking loop of one server.
struct Checker<C> {
    pool: Weak<Pool>,
    pool_name: String,
    index: usize,
    server: String,
    address: SocketAddr,
    /// The DNS name and port the server was resolved from, if it was.
    host: Option<String>,
    check: Arc<C>,
    interval: Duration,
    timeout: Duration,
    hysteresis: Hysteresis,
}

impl<C: HealthCheck> Checker<C> {
    async fn run(mut self) {
        // Spread the first checks over one interval so a pool's servers (and all pools after a
        // reload) are not probed in lockstep.
        let interval_ms = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let jitter = Duration::from_millis(fastrand::u64(..interval_ms.max(1)));
        let mut ticks = tokio::time::interval_at(Instant::now() + jitter, self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.pool.strong_count() == 0 {
                return;
            }
            // The pool is not held across the check, so a reload can free it meanwhile.
            let result = match tokio::time::timeout(
                self.timeout.saturating_add(GUARD_SLACK),
                self.check.check_named(self.address, self.host.as_deref()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(CheckError::Timeout(self.timeout)),
            };
            let Some(pool) = self.pool.upgrade() else { return };
            if let Some(server) = pool.servers.get(self.index) {
                server.set_last_check(result.as_ref().map(|_| ()).map_err(ToString::to_string));
            }
            if let Some(up) = self.hysteresis.observe(result.is_ok()) {
                self.flip(&pool, up, result.err());
            }
        }
    }

    fn flip(&self, pool: &Pool, up: bool, err: Option<CheckError>) {
        if let Some(reporter) = pool.reporter() {
            // Cluster mode: this node's observation is one vote; the verdict comes back through
            // the replicated state once a majority agrees.
            let what = if up { "UP" } else { "DOWN" };
            let reason = err.map_or_else(String::new, |e| e.to_string());
            tracing::info!(target: "keel::health", pool = %self.pool_name, server = %self.server,
                address = %self.address, reason = %reason, "server looks {what} from this node; reporting to the cluster");
            reporter.report(&self.pool_name, &self.server, up);
            return;
        }
        if !pool.set_checked_up(self.index, up) {
            // The shared server state already says so: the previous pool's checker, still
            // running just after a reload, flipped it first and refreshed only its own pool.
            pool.refresh();
            return;
        }
        if up {
            let cause = times("passed", self.hysteresis.consecutive_successes());
            tracing::info!(target: "keel::health", pool = %self.pool_name, server = %self.server,
                address = %self.address, "server marked UP ({cause})");
        } else {
            let cause = times("failed", self.hysteresis.consecutive_failures());
            let reason = err.map_or_else(String::new, |e| e.to_string());
            tracing::warn!(target: "keel::health", pool = %self.pool_name, server = %self.server,
                address = %self.address, reason = %reason, "server marked DOWN ({cause})");
        }
    }
}

/// "health check failed 3 consecutive times", or without the count for a single check (the
/// start-up rule, or rise/fall of 1).
fn times(outcome: &str, n: u32) -> String {
    if n == 1 {
        format!("health check {outcome}")
    } else {
        format!("health check {outcome} {n} consecutive times")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use keel_cluster::HumanDuration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};
    use tokio::task::JoinSet;

    use super::*;
    use crate::pool::ServerState;

    const DEADLINE: Duration = Duration::from_secs(3);

    fn pool_config(address: SocketAddr, rise: u32, fall: u32) -> model::Pool {
        model::Pool {
            algorithm: model::Algorithm::RoundRobin,
            servers: vec![model::Server { name: "s1".into(), address: address.into(), weight: 1 }],
            health: Some(model::HealthCheck {
                kind: CheckKind::Http,
                method: "GET".into(),
                path: "/health".into(),
                host: None,
                expect_status: model::defaults::expect_status(),
                interval: HumanDuration::from_millis(50),
                timeout: HumanDuration::from_millis(40),
                rise,
                fall,
            }),
            outlier: model::Outlier::default(),
            connect_timeout: HumanDuration::from_secs(1),
            response_timeout: HumanDuration::from_secs(1),
            total_timeout: None,
            slow_start: None,
            resolve_interval: model::defaults::resolve_interval(),
            retry_on: model::defaults::retry_on(),
            retry_budget: model::defaults::retry_budget(),
            retry_budget_min: model::defaults::retry_budget_min(),
            idle_timeout: HumanDuration::from_secs(1),
            retries: 0,
            protocol: model::UpstreamProtocol::Http1,
            tls: None,
            proxy_protocol: None,
            sticky: None,
        }
    }

    /// A port nothing listens on (until a test starts a backend there).
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("addr")
    }

    /// A backend answering every request with 200 on `address` and counting them, until the
    /// returned task is aborted (which drops the listener and every open connection).
    fn start_backend(address: SocketAddr, answered: Arc<AtomicUsize>) -> JoinHandle<()> {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(address).expect("bind the backend's port");
        let listener = socket.listen(64).expect("listen");
        tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let answered = Arc::clone(&answered);
                connections.spawn(async move {
                    let mut buf = [0u8; 1024];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
                    answered.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
    }

    async fn stop(backend: JoinHandle<()>) {
        backend.abort();
        let _ = backend.await;
    }

    /// Polls `condition` every 10 ms; fails the test if it does not hold within [`DEADLINE`].
    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !condition() {
            assert!(Instant::now() < deadline, "not {what} within {DEADLINE:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_stopped_server_goes_down_and_comes_back_up_when_restarted() {
        let address = closed_port().await;
        let answered = Arc::new(AtomicUsize::new(0));
        let backend = start_backend(address, Arc::clone(&answered));
        let pool = Pool::new("app", &pool_config(address, 2, 2), |_| None).expect("plain pool");
        let _tasks = spawn_tasks(&pool);
        let server = Arc::clone(&pool.servers[0]);

        // Healthy: several checks answered, and the verdict never wavered meanwhile.
        wait_until("checked 5 times", || {
            assert!(server.is_checked_up(), "a healthy server was marked down");
            answered.load(Ordering::SeqCst) >= 5
        })
        .await;

        stop(backend).await;
        wait_until("marked down", || !server.is_checked_up()).await;
        assert_eq!(pool.select(0, &[]), None, "a down server is out of the selector");

        let backend = start_backend(address, Arc::clone(&answered));
        wait_until("marked up again", || server.is_checked_up()).await;
        assert_eq!(pool.select(0, &[]), Some(0), "an up server is back in the selector");
        stop(backend).await;
    }

    #[tokio::test]
    async fn a_server_dead_at_boot_goes_down_on_the_first_failed_check() {
        // With fall = 1000 only the start-up rule can take it down within the deadline.
        let pool = Pool::new("app", &pool_config(closed_port().await, 2, 1000), |_| None).expect("plain pool");
        let _tasks = spawn_tasks(&pool);
        wait_until("marked down", || !pool.servers[0].is_checked_up()).await;
    }

    #[tokio::test]
    async fn a_server_down_before_a_reload_comes_up_under_the_new_pool() {
        let address = closed_port().await;
        let config = pool_config(address, 2, 2);
        let old = Pool::new("app", &config, |_| None).expect("plain pool");
        let old_tasks = spawn_tasks(&old);
        wait_until("marked down", || !old.servers[0].is_checked_up()).await;

        let state: Arc<ServerState> = Arc::clone(&old.servers[0]);
        drop(old);
        for task in old_tasks {
            tokio::time::timeout(DEADLINE, task).await.expect("old checker ends").expect("no panic");
        }
        let new = Pool::new("app", &config, |_| Some(Arc::clone(&state))).expect("plain pool");
        assert!(!new.servers[0].is_checked_up(), "the verdict survives the reload");
        let _tasks = spawn_tasks(&new);
        let backend = start_backend(address, Arc::new(AtomicUsize::new(0)));
        wait_until("marked up", || new.servers[0].is_checked_up()).await;
        assert_eq!(new.select(0, &[]), Some(0));
        stop(backend).await;
    }

    #[tokio::test]
    async fn checkers_end_when_their_pool_is_dropped() {
        let pool = Pool::new("app", &pool_config(closed_port().await, 2, 2), |_| None).expect("plain pool");
        let tasks = spawn_tasks(&pool);
        assert_eq!(tasks.len(), 1);
        let weak = Arc::downgrade(&pool);
        drop(pool);
        assert!(weak.upgrade().is_none(), "checkers must not keep the pool alive");
        for task in tasks {
            tokio::time::timeout(DEADLINE, task).await.expect("checker ends").expect("no panic");
        }
    }

    #[tokio::test]
    async fn without_health_config_nothing_runs_and_servers_are_up() {
        let mut config = pool_config(closed_port().await, 2, 2);
        config.health = None;
        let pool = Pool::new("app", &config, |_| None).expect("plain pool");
        pool.set_checked_up(0, false);
        assert!(spawn_tasks(&pool).is_empty());
        assert!(pool.servers[0].is_checked_up());
    }

    #[tokio::test]
    async fn an_invalid_check_config_starts_no_checker() {
        let mut config = pool_config(closed_port().await, 2, 2);
        if let Some(health) = config.health.as_mut() {
            health.method = "NOT A METHOD".into();
        }
        let pool = Pool::new("app", &config, |_| None).expect("plain pool");
        assert!(spawn_tasks(&pool).is_empty());
        assert!(pool.servers[0].is_checked_up());
    }

    #[test]
    fn flip_causes_read_as_sentences() {
        assert_eq!(times("failed", 3), "health check failed 3 consecutive times");
        assert_eq!(times("passed", 1), "health check passed");
    }
}
