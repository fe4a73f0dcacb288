//! The set of running listeners, reconciled against a config.
//!
//! Standalone, the set is reconciled once at start. In cluster mode the config arrives through
//! Raft and changes at run time (`keel config apply`), so the set is reconciled on every change:
//! a listener that appeared is bound and started, one that disappeared is stopped (its socket
//! closes; its open connections finish under the shared drainer), and one whose socket-level
//! settings changed (address, protocol, TLS, limits, redirect, access log, request ids) is stopped and started again.
//! Routes and pools are not socket-level: they live in the snapshot, which every request reads,
//! so changing them never touches a socket.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::HeaderName;
use keel_cluster::model::{self, Config, Protocol};
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
    task: JoinHandle<()>,
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

    /// Brings the running set in line with `config`. Listeners that cannot start are reported
    /// and left out; the others run.
    pub async fn reconcile(&mut self, config: &Config) -> Vec<DaemonError> {
        let mut errors = Vec::new();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| config.listeners.get(*name).is_none_or(|l| !same_socket(l, &r.config)))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(target: "keel::proxy", listener = %name, addr = %r.config.bind, "stopping listener");
                let _ = r.stop.send(true);
                let _ = r.task.await;
                self.certs.remove(&name);
            }
        }
        for (name, listener) in &config.listeners {
            if self.running.contains_key(name) {
                continue;
            }
            match self.start(name, listener).await {
                Ok(r) => {
                    self.running.insert(name.clone(), r);
                }
                Err(e) => errors.push(e),
            }
        }
        let live: Vec<ListenerMetrics> = {
            let all = self.all_metrics.lock().unwrap_or_else(|p| p.into_inner());
            self.running.keys().filter_map(|n| all.get(n).cloned()).collect()
        };
        self.metrics.store(Arc::new(live));
        errors
    }

    async fn start(&self, name: &str, l: &model::Listener) -> Result<Running, DaemonError> {
        let tls = match (l.protocol, &l.tls) {
            (Protocol::Https, Some(settings)) => {
                let (config, store) = tls::server_config(settings)
                    .map_err(|source| DaemonError::Certificates { name: name.to_owned(), source })?;
                self.certs.insert(name, store);
                Some(tls::acceptor(config))
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
        let socket = proxy::bind(name, l.bind).await?;
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
                TcpFront { name: name.to_owned(), access_log },
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
                .with_logging(access_log, HeaderName::from_bytes(l.request_id_header.as_bytes()).ok()),
            );
            let listener = proxy::HttpListener {
                name: name.to_owned(),
                socket,
                proxy,
                limits: l.limits.clone(),
                connections: metrics.connections.clone(),
                tls,
                parked: metrics.parked.clone(),
            };
            tokio::spawn(proxy::serve(listener, self.drainer.clone(), stop_rx))
        };
        Ok(Running { config: l.clone(), stop, task })
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
