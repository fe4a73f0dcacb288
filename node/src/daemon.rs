//! Wiring for a running node: publish the snapshot, bind every socket, load certificates, start
//! the health checkers, the listeners and the admin API, then stop gracefully when told to.
//!
//! Everything that can fail is done in [`Daemon::bind`], before anything is served: every
//! socket bound, every certificate and CA bundle loaded, the admin token read. A node that
//! cannot take one of its addresses or read one of its files fails at start naming it, instead
//! of running half-configured.
//!
//! Shutdown order: stop accepting (listening sockets close, new connections are refused), ask
//! open connections to finish (HTTP/1.1 closes after the in-flight response, HTTP/2 sends
//! GOAWAY), wait for them up to the drain deadline, then return.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use keel_cluster::model::Protocol;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::NodeFile;
use crate::connlimit::ConnectionLimiter;
use crate::metrics::{ListenerMetrics, Rejections};
use crate::proxy::tcp::{serve_tcp, ConnTracker};
use crate::proxy::{self, BindError, HttpProxy};
use crate::snapshot::{BuildError, SharedSnapshot, Snapshot};
use crate::tls::{self, CertStore, ReloadSummary, TlsError};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A data-plane listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A listener asks for a protocol this build does not serve yet.
    #[error("listener {name:?}: protocol {protocol} is not served by this build yet")]
    Unsupported {
        /// Listener name.
        name: String,
        /// Its protocol.
        protocol: &'static str,
    },
    /// An https listener's certificates could not be loaded.
    #[error("listener {name:?}: {source}")]
    Certificates {
        /// Listener name.
        name: String,
        /// What failed.
        source: TlsError,
    },
    /// A pool's TLS settings could not be loaded.
    #[error(transparent)]
    Pool(#[from] BuildError),
    /// The admin token could not be read.
    #[error("admin token: {0}")]
    AdminToken(String),
    /// The admin API could not bind.
    #[error("cannot bind the admin API on {addr}: {source}")]
    AdminBind {
        /// Address it wanted.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The certificate stores of every https listener, reloadable as one.
#[derive(Default)]
pub struct CertReloader {
    stores: Vec<(String, Arc<CertStore>)>,
}

/// Outcome of reloading one listener's certificates.
pub type ListenerReload = (String, Result<ReloadSummary, TlsError>);

impl CertReloader {
    /// Re-reads every https listener's files. Each listener's reload is all-or-nothing: a
    /// listener with a bad file keeps all of its old certificates.
    pub fn reload_all(&self) -> Vec<ListenerReload> {
        self.stores.iter().map(|(name, store)| (name.clone(), store.reload())).collect()
    }

    /// Reloads and logs the outcome; what SIGHUP does.
    pub fn reload_and_log(&self) {
        for (listener, result) in self.reload_all() {
            match result {
                Ok(summary) => tracing::info!(target: "keel::tls", listener = %listener,
                    certificates = summary.certificates.len(), "certificates reloaded"),
                Err(e) => tracing::error!(target: "keel::tls", listener = %listener, error = %e,
                    "certificate reload refused; the previous certificates stay in use"),
            }
        }
    }
}

struct BoundListener {
    name: String,
    socket: TcpListener,
    protocol: Protocol,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A node whose sockets are bound and files loaded, ready to serve.
pub struct Daemon {
    file: NodeFile,
    snapshot: SharedSnapshot,
    rejections: Arc<Rejections>,
    admin: TcpListener,
    admin_token: Option<String>,
    listeners: Vec<BoundListener>,
    certs: Arc<CertReloader>,
}

impl Daemon {
    /// Builds the routing snapshot, loads certificates and binds every socket.
    pub async fn bind(file: NodeFile) -> Result<Daemon, DaemonError> {
        let admin_token = file.node.admin_token().map_err(DaemonError::AdminToken)?;
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::build(file.config.clone(), None)?));
        let admin = TcpListener::bind(file.node.admin)
            .await
            .map_err(|source| DaemonError::AdminBind { addr: file.node.admin, source })?;
        let mut listeners = Vec::new();
        let mut certs = CertReloader::default();
        for (name, l) in &file.config.listeners {
            let tls = match (l.protocol, &l.tls) {
                (Protocol::Https, Some(settings)) => {
                    let (config, store) = tls::server_config(settings)
                        .map_err(|source| DaemonError::Certificates { name: name.clone(), source })?;
                    certs.stores.push((name.clone(), store));
                    Some(tls::acceptor(config))
                }
                (Protocol::Http | Protocol::Tcp, _) => None,
                (protocol, _) => {
                    return Err(DaemonError::Unsupported { name: name.clone(), protocol: protocol.as_str() })
                }
            };
            let socket = proxy::bind(name, l.bind).await?;
            listeners.push(BoundListener { name: name.clone(), socket, protocol: l.protocol, tls });
        }
        Ok(Daemon { file, snapshot, rejections: Arc::default(), admin, admin_token, listeners, certs: Arc::new(certs) })
    }

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Each listener's name and bound address.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.iter().filter_map(|l| Some((l.name.clone(), l.socket.local_addr().ok()?))).collect()
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Daemon { file, snapshot, rejections, admin, admin_token, listeners, certs } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());

        for pool in snapshot.load().pools.values() {
            crate::health::spawn(pool);
        }

        let mut accept_loops = Vec::new();
        let mut metrics = Vec::new();
        let tcp_conns = ConnTracker::new();
        for BoundListener { name, socket, protocol, tls } in listeners {
            let Some(config) = file.config.listeners.get(&name) else { continue };
            let listener_metrics = ListenerMetrics::new(&name, ConnectionLimiter::new(&config.limits));
            if protocol == Protocol::Tcp {
                tracing::info!(target: "keel::proxy", listener = %name, addr = ?socket.local_addr().ok(), protocol = "tcp", "listening");
                accept_loops.push(tokio::spawn(serve_tcp(
                    socket,
                    name.clone(),
                    snapshot.clone(),
                    listener_metrics.connections.clone(),
                    rejections.clone(),
                    stop_rx.clone(),
                    tcp_conns.clone(),
                )));
                metrics.push(listener_metrics);
                continue;
            }
            let proto = if tls.is_some() { "https" } else { "http" };
            let proxy = Arc::new(HttpProxy::new(
                snapshot.clone(),
                &name,
                proto,
                &config.limits,
                rejections.clone(),
                listener_metrics.rate_limited.clone(),
            ));
            tracing::info!(target: "keel::proxy", listener = %name, addr = ?socket.local_addr().ok(), protocol = proto, "listening");
            let listener = proxy::HttpListener {
                name: name.clone(),
                socket,
                proxy,
                limits: config.limits.clone(),
                connections: listener_metrics.connections.clone(),
                tls,
            };
            metrics.push(listener_metrics);
            accept_loops.push(tokio::spawn(proxy::serve(listener, graceful.clone(), stop_rx.clone())));
        }

        let reloader = certs.clone();
        let sighup = tokio::spawn(async move { reload_on_sighup(reloader).await });

        tracing::info!(target: "keel::admin", addr = %file.node.admin, auth = admin_token.is_some(), "admin API listening");
        let admin_state = AdminState {
            snapshot: snapshot.clone(),
            rejections,
            listeners: Arc::new(metrics),
            certs,
            token: admin_token.map(Arc::from),
        };
        let admin_loop = tokio::spawn(admin::serve(admin, admin_state, stop_rx));

        shutdown.await;
        tracing::info!(target: "keel::proxy", "shutting down: no longer accepting connections");
        sighup.abort();
        let _ = stop_tx.send(true);
        for task in accept_loops {
            let _ = task.await;
        }
        let _ = admin_loop.await;

        let deadline = file.node.drain_timeout();
        let tcp_drain = tokio::spawn(async move { tcp_conns.drain(deadline).await });
        let Ok(graceful) = Arc::try_unwrap(graceful) else {
            tracing::error!(target: "keel::proxy", "connection tracker still shared at shutdown; exiting without drain");
            return;
        };
        let open = graceful.count();
        tracing::info!(target: "keel::proxy", connections = open, deadline = ?deadline, "draining in-flight requests");
        let http_drained = tokio::time::timeout(deadline, graceful.shutdown()).await.is_ok();
        let tcp_forced = tcp_drain.await.unwrap_or(0);
        if http_drained && tcp_forced == 0 {
            tracing::info!(target: "keel::proxy", "drained; exiting");
        } else {
            tracing::warn!(target: "keel::proxy", deadline = ?deadline, tcp_forced, "drain deadline passed; closing remaining connections");
        }
    }
}

/// Reloads certificates on every SIGHUP, as nginx and HAProxy operators expect.
async fn reload_on_sighup(certs: Arc<CertReloader>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload certificates through the admin API");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(target: "keel::tls", "received SIGHUP: reloading certificates");
            certs.reload_and_log();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = certs;
        std::future::pending::<()>().await;
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("received SIGTERM"),
                    _ = int.recv() => tracing::info!("received SIGINT"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
