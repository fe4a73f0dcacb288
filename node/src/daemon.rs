//! Wiring for a running node: publish the snapshot, bind every socket, start the health
//! checkers, the listeners and the admin API, then stop gracefully when told to.
//!
//! Every socket is bound before anything is served, so a node that cannot take one of its
//! addresses fails at start with the listener's name instead of running half-configured.
//!
//! Shutdown order: stop accepting (listening sockets close, new connections are refused),
//! ask open connections to finish (HTTP/1.1 closes after the in-flight response, HTTP/2 sends
//! GOAWAY), wait for them up to the drain deadline, then return.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::config::NodeFile;
use crate::metrics::Rejections;
use crate::proxy::{self, BindError, HttpProxy};
use crate::snapshot::{SharedSnapshot, Snapshot};

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A data-plane listener could not bind.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// The admin API could not bind.
    #[error("cannot bind the admin API on {addr}: {source}")]
    AdminBind {
        /// Address it wanted.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A node whose sockets are bound, ready to serve.
pub struct Daemon {
    file: NodeFile,
    snapshot: SharedSnapshot,
    rejections: Arc<Rejections>,
    admin: TcpListener,
    listeners: Vec<(String, TcpListener)>,
}

impl Daemon {
    /// Builds the routing snapshot and binds the admin API and every listener.
    pub async fn bind(file: NodeFile) -> Result<Daemon, DaemonError> {
        let admin = TcpListener::bind(file.node.admin)
            .await
            .map_err(|source| DaemonError::AdminBind { addr: file.node.admin, source })?;
        let mut listeners = Vec::new();
        for (name, l) in &file.config.listeners {
            listeners.push((name.clone(), proxy::bind(name, l.bind).await?));
        }
        let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::build(file.config.clone(), None)));
        Ok(Daemon { file, snapshot, rejections: Arc::default(), admin, listeners })
    }

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Each listener's name and bound address.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners.iter().filter_map(|(n, l)| Some((n.clone(), l.local_addr().ok()?))).collect()
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Daemon { file, snapshot, rejections, admin, listeners } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let graceful = Arc::new(GracefulShutdown::new());

        for pool in snapshot.load().pools.values() {
            crate::health::spawn(pool);
        }

        let mut accept_loops = Vec::new();
        for (name, listener) in listeners {
            let addr = listener.local_addr().ok();
            let proxy = Arc::new(HttpProxy::new(snapshot.clone(), &name, "http", rejections.clone()));
            tracing::info!(target: "keel::proxy", listener = %name, addr = ?addr, "listening");
            accept_loops.push(tokio::spawn(proxy::serve(listener, proxy, graceful.clone(), stop_rx.clone())));
        }
        tracing::info!(target: "keel::admin", addr = %file.node.admin, "admin API listening");
        let admin_loop =
            tokio::spawn(admin::serve(admin, AdminState { snapshot: snapshot.clone(), rejections }, stop_rx));

        shutdown.await;
        tracing::info!(target: "keel::proxy", "shutting down: no longer accepting connections");
        let _ = stop_tx.send(true);
        for task in accept_loops {
            let _ = task.await;
        }
        let _ = admin_loop.await;

        let Ok(graceful) = Arc::try_unwrap(graceful) else {
            tracing::error!(target: "keel::proxy", "connection tracker still shared at shutdown; exiting without drain");
            return;
        };
        let open = graceful.count();
        let deadline = file.node.drain_timeout();
        tracing::info!(target: "keel::proxy", connections = open, deadline = ?deadline, "draining in-flight requests");
        if tokio::time::timeout(deadline, graceful.shutdown()).await.is_err() {
            tracing::warn!(target: "keel::proxy", deadline = ?deadline, "drain deadline passed; closing remaining connections");
        } else {
            tracing::info!(target: "keel::proxy", "drained; exiting");
        }
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
