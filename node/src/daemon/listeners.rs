//! The set of running listeners, reconciled against a config.
//!
//! Every change goes in two steps, so a reload can be all-or-nothing:
//!
//! - [`ListenerSet::prepare`] does everything that can fail without touching what runs: loads
//!   the certificates of every listener to (re)start, opens its access log and binds its socket
//!   — unless a running listener that this change stops already holds the address, in which
//!   case that socket is handed over instead of bound again.
//! - [`ListenerSet::commit`] stops what disappeared or changed and starts what was prepared. It
//!   cannot fail: a restarted listener serves from its predecessor's socket, so not one
//!   connection attempt is refused in between.
//!
//! A listener that appeared is started, one that disappeared is stopped (its socket closes; its
//! open connections finish under the shared drainer), and one whose socket-level settings
//! changed (address, protocol, TLS, limits, redirect, access log, request ids) is stopped and
//! started again; its established connections keep the settings they were accepted with until
//! they close, as nginx's old workers do. Routes and pools are not socket-level: they live in
//! the snapshot, which every request reads, so changing them never touches a socket.
//!
//! Standalone, a refused `prepare` refuses the reload; in cluster mode the config is already
//! committed, so whatever could be prepared is started and the rest is logged (see `apply`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderName;
use keel_cluster::model::{self, Config, Protocol};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::drain::Drainer;
use super::{CertReloader, DaemonError};
use crate::connlimit::ConnectionLimiter;
use crate::metrics::{ListenerMetrics, Rejections};
use crate::proxy::access_log::AccessLog;
use crate::proxy::tcp::{serve_tcp, ConnTracker, TcpFront};
use crate::proxy::{self, HttpProxy};
use crate::snapshot::SharedSnapshot;
use crate::tls;

struct Running {
    config: model::Listener,
    stop: watch::Sender<bool>,
    task: JoinHandle<TcpListener>,
}

/// Where a prepared listener's socket comes from.
enum Socket {
    /// Bound by `prepare`.
    Fresh(TcpListener),
    /// Handed over by the running listener of this name, which the change stops.
    From(String),
}

/// A listener ready to start: everything that could fail has succeeded.
struct Ready {
    name: String,
    config: model::Listener,
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<tls::CertStore>)>,
    access_log: Option<Arc<AccessLog>>,
    socket: Socket,
}

/// A change to the running set, prepared by [`ListenerSet::prepare`].
pub struct Plan {
    stop: Vec<String>,
    start: Vec<Ready>,
}

impl Plan {
    /// Listeners the change stops for good, restarts, and starts anew, by name.
    pub fn summary(&self) -> ListenerChanges {
        let restarted: Vec<String> =
            self.start.iter().filter(|r| self.stop.contains(&r.name)).map(|r| r.name.clone()).collect();
        ListenerChanges {
            started: self.start.iter().filter(|r| !restarted.contains(&r.name)).map(|r| r.name.clone()).collect(),
            stopped: self.stop.iter().filter(|n| !restarted.contains(n)).cloned().collect(),
            restarted,
        }
    }

    /// Whether the change touches no listener.
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty() && self.start.is_empty()
    }
}

/// What a change did to the listeners, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ListenerChanges {
    /// Listeners that are new.
    pub started: Vec<String>,
    /// Listeners that are gone.
    pub stopped: Vec<String>,
    /// Listeners started again with new socket-level settings.
    pub restarted: Vec<String>,
}

/// The running listeners of a node.
pub struct ListenerSet {
    running: BTreeMap<String, Running>,
    snapshot: SharedSnapshot,
    rejections: Arc<Rejections>,
    drainer: Arc<Drainer>,
    tcp_conns: ConnTracker,
    certs: Arc<CertReloader>,
    metrics: Arc<ArcSwap<Vec<ListenerMetrics>>>,
    all_metrics: Mutex<BTreeMap<String, ListenerMetrics>>,
}

/// Whether two versions of a listener can share a socket and accept loop.
fn same_socket(a: &model::Listener, b: &model::Listener) -> bool {
    a.bind == b.bind
        && a.protocol == b.protocol
        && a.tls == b.tls
        && a.limits == b.limits
        && a.redirect_to_https == b.redirect_to_https
        && a.https_port == b.https_port
        && a.access_log == b.access_log
        && a.request_id_header == b.request_id_header
}

impl ListenerSet {
    /// An empty set serving through `snapshot`.
    pub fn new(snapshot: SharedSnapshot, rejections: Arc<Rejections>, certs: Arc<CertReloader>) -> Self {
        ListenerSet {
            running: BTreeMap::new(),
            snapshot,
            rejections,
            drainer: Arc::new(Drainer::new()),
            tcp_conns: ConnTracker::new(),
            certs,
            metrics: Arc::default(),
            all_metrics: Mutex::default(),
        }
    }

    /// Per-listener counters, for the admin API; follows the set as it changes.
    pub fn metrics(&self) -> Arc<ArcSwap<Vec<ListenerMetrics>>> {
        self.metrics.clone()
    }

    /// Brings the running set in line with `config`, starting whatever can be started.
    /// Listeners that cannot start are reported and left out; the others run.
    pub async fn reconcile(&mut self, config: &Config) -> Vec<DaemonError> {
        let (plan, errors) = self.prepare(config).await;
        self.commit(plan).await;
        errors
    }

    /// Prepares the change that brings the running set in line with `config` (see the module
    /// doc). Listeners that cannot be prepared are left out of the plan and reported; a running
    /// listener whose new version fails keeps running as it is.
    pub async fn prepare(&self, config: &Config) -> (Plan, Vec<DaemonError>) {
        let mut errors = Vec::new();
        let changed: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| config.listeners.get(*name).is_none_or(|l| !same_socket(l, &r.config)))
            .map(|(name, _)| name.clone())
            .collect();
        let mut plan = Plan { stop: Vec::new(), start: Vec::new() };
        for (name, listener) in &config.listeners {
            if self.running.contains_key(name) && !changed.contains(name) {
                continue;
            }
            match self.ready(name, listener, &changed).await {
                Ok(ready) => plan.start.push(ready),
                Err(e) => errors.push(e),
            }
        }
        // A listener is stopped when it is gone, or when its new version is ready (its socket
        // may be handed over); a changed listener whose new version failed keeps running.
        plan.stop = changed
            .into_iter()
            .filter(|name| !config.listeners.contains_key(name) || plan.start.iter().any(|r| &r.name == name))
            .collect();
        // A socket may only be handed over by a listener that stops.
        let orphans: Vec<usize> = plan
            .start
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(&r.socket, Socket::From(from) if !plan.stop.contains(from)))
            .map(|(i, _)| i)
            .collect();
        for i in orphans.into_iter().rev() {
            let r = plan.start.remove(i);
            errors.push(DaemonError::Bind(proxy::BindError {
                name: r.name,
                addr: r.config.bind,
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "the address stays taken by a running listener",
                ),
            }));
        }
        (plan, errors)
    }

    /// Loads, opens and binds what listener `name` needs; `stopping` are the running listeners
    /// this change may stop, whose sockets can be handed over.
    async fn ready(&self, name: &str, l: &model::Listener, stopping: &[String]) -> Result<Ready, DaemonError> {
        let tls = match (l.protocol, &l.tls) {
            (Protocol::Https, Some(settings)) => {
                let (config, store) = tls::server_config(settings)
                    .map_err(|source| DaemonError::Certificates { name: name.to_owned(), source })?;
                Some((tls::acceptor(config), store))
            }
            (Protocol::Http | Protocol::Tcp, _) => None,
            (protocol, _) => {
                return Err(DaemonError::Unsupported { name: name.to_owned(), protocol: protocol.as_str() })
            }
        };
        let access_log = match &l.access_log {
            Some(config) => Some(
                AccessLog::start(config).map_err(|source| DaemonError::AccessLog { name: name.to_owned(), source })?,
            ),
            None => None,
        };
        let holder = self.running.iter().find(|(n, r)| r.config.bind == l.bind && stopping.contains(n));
        let socket = match holder {
            Some((holder, _)) => Socket::From(holder.clone()),
            None => Socket::Fresh(proxy::bind(name, l.bind).await?),
        };
        Ok(Ready { name: name.to_owned(), config: l.clone(), tls, access_log, socket })
    }

    /// Carries out a prepared change. Cannot fail.
    pub async fn commit(&mut self, plan: Plan) {
        let mut handed: BTreeMap<String, TcpListener> = BTreeMap::new();
        for name in plan.stop {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(target: "keel::proxy", listener = %name, addr = %r.config.bind, "stopping listener");
                let _ = r.stop.send(true);
                if let Ok(socket) = r.task.await {
                    handed.insert(name.clone(), socket);
                }
                self.certs.remove(&name);
            }
        }
        for mut ready in plan.start {
            let socket = match std::mem::replace(&mut ready.socket, Socket::From(String::new())) {
                Socket::Fresh(socket) => socket,
                Socket::From(from) => match handed.remove(&from) {
                    Some(socket) => socket,
                    // The old accept loop panicked and took its socket with it: bind again.
                    None => match proxy::bind(&ready.name, ready.config.bind).await {
                        Ok(socket) => socket,
                        Err(e) => {
                            tracing::error!(target: "keel::proxy", error = %e, "listener not started");
                            continue;
                        }
                    },
                },
            };
            let name = ready.name.clone();
            let running = self.start(ready, socket);
            self.running.insert(name, running);
        }
        let live: Vec<ListenerMetrics> = {
            let all = self.all_metrics.lock().unwrap_or_else(|p| p.into_inner());
            self.running.keys().filter_map(|n| all.get(n).cloned()).collect()
        };
        self.metrics.store(Arc::new(live));
    }

    fn start(&self, ready: Ready, socket: TcpListener) -> Running {
        let Ready { name, config: l, tls, access_log, .. } = ready;
        let name = name.as_str();
        let tls = tls.map(|(acceptor, store)| {
            self.certs.insert(name, store);
            acceptor
        });
        let (stop, stop_rx) = watch::channel(false);
        // Counters outlive a restart of the listener (same name), like the server counters.
        let metrics = {
            let mut all = self.all_metrics.lock().unwrap_or_else(|p| p.into_inner());
            let m = all
                .entry(name.to_owned())
                .or_insert_with(|| ListenerMetrics::new(name, ConnectionLimiter::new(&l.limits)))
                .clone();
            m.connections.set_limits(&l.limits);
            m
        };
        let proto = match l.protocol {
            Protocol::Tcp => "tcp",
            _ if tls.is_some() => "https",
            _ => "http",
        };
        tracing::info!(target: "keel::proxy", listener = %name, addr = %l.bind, protocol = proto, "listening");
        let task = if l.protocol == Protocol::Tcp {
            tokio::spawn(serve_tcp(
                socket,
                TcpFront { name: name.to_owned(), access_log, traffic: metrics.traffic.clone() },
                self.snapshot.clone(),
                metrics.connections.clone(),
                self.rejections.clone(),
                stop_rx,
                self.tcp_conns.clone(),
            ))
        } else {
            let proxy = Arc::new(
                HttpProxy::new(
                    self.snapshot.clone(),
                    name,
                    proto,
                    &l.limits,
                    self.rejections.clone(),
                    metrics.rate_limited.clone(),
                )
                .with_logging(access_log, HeaderName::from_bytes(l.request_id_header.as_bytes()).ok())
                .with_traffic(metrics.traffic.clone()),
            );
            let listener = proxy::HttpListener {
                name: name.to_owned(),
                socket,
                proxy,
                limits: l.limits.clone(),
                connections: metrics.connections.clone(),
                tls,
                parked: metrics.parked.clone(),
                traffic: metrics.traffic.clone(),
            };
            tokio::spawn(proxy::serve(listener, self.drainer.clone(), stop_rx))
        };
        Running { config: l, stop, task }
    }

    /// Stops every listener, then lets open connections finish up to `deadline`. Returns
    /// whether everything drained in time.
    pub async fn shutdown(&mut self, deadline: std::time::Duration) -> bool {
        for (_, r) in std::mem::take(&mut self.running) {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
        let open = self.drainer.count() + self.tcp_conns.open();
        tracing::info!(target: "keel::proxy", connections = open, deadline = ?deadline, "draining in-flight requests");
        let tcp = self.tcp_conns.clone();
        let tcp_drain = tokio::spawn(async move { tcp.drain(deadline).await });
        let http_drained = self.drainer.drain(deadline).await;
        let tcp_forced = tcp_drain.await.unwrap_or(0);
        http_drained && tcp_forced == 0
    }

    /// Bound addresses of the running listeners.
    pub fn names(&self) -> Vec<String> {
        self.running.keys().cloned().collect()
    }
}
