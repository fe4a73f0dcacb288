//! Wiring for a running node: publish the snapshot, bind every socket, load certificates, start
//! the health checkers, the listeners and the admin API, then stop gracefully when told to.
//!
//! Everything that can fail is done in [`Daemon::bind`], before anything is served: every
//! socket bound, every certificate and CA bundle loaded, the admin token read. A node that
//! cannot take one of its addresses or read one of its files fails at start naming it, instead
//! of running half-configured.
//!
//! A running node changes its config through one path, [`apply`]: standalone on SIGHUP (its
//! own file read again) or `keel config apply` (a file's text through the admin API), refused
//! as a whole when anything in it cannot be served; in cluster mode ([`cluster`]) whenever the
//! replicated config changes, where a listener that cannot start is logged rather than fatal
//! (the rest of the cluster serves it). Listeners are reconciled by [`listeners`].
//!
//! Shutdown order: a leader first hands leadership and the VIP over to a caught-up data node
//! (`keel_cluster::handover`) while it still serves; then stop accepting (listening sockets close, new connections are refused), ask
//! open connections to finish (HTTP/1.1 closes after the in-flight response, HTTP/2 sends
//! GOAWAY; [`drain`]), wait for them up to the drain deadline, leave the cluster's Raft
//! cleanly, then return.

pub mod apply;
pub mod cluster;
pub mod drain;
pub mod listeners;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use keel_cluster::{ClusterHandle, Config};
use tokio::net::TcpListener;
use tokio::sync::watch;

use keel_vrrp::{ControllerSettings, NetlinkAnnouncer, VipAnnouncer, VipConfig, VipController};

use self::apply::{Applier, ReloadStatus, Standalone};
use self::listeners::ListenerSet;
use crate::admin::{self, AdminState};
use crate::config::NodeFile;
use crate::metrics::Rejections;
use crate::proxy::BindError;
use crate::resolve::Resolver;
use crate::snapshot::{BuildError, SharedSnapshot, Snapshot};
use crate::sticky::{StickyDeps, StickyRuntime};
use crate::tls::{CertStore, ReloadSummary, TlsError};

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
    /// A listener's access log could not be opened.
    #[error("listener {name:?}: {source}")]
    AccessLog {
        /// Listener name.
        name: String,
        /// What failed.
        source: crate::proxy::access_log::AccessLogError,
    },
    /// A pool's TLS settings could not be loaded.
    #[error(transparent)]
    Pool(#[from] BuildError),
    /// The admin token could not be read.
    #[error("admin token: {0}")]
    AdminToken(String),
    /// A pool's sticky-session store cannot be set up.
    #[error("sticky sessions: {0}")]
    Sticky(String),
    /// The VIP cannot be managed on this host (interface, capabilities).
    #[error("vip: {0}")]
    Vip(String),
    /// The Raft node could not start.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The admin API could not bind.
    #[error("cannot bind the admin API on {addr}: {source}")]
    AdminBind {
        /// Address it wanted.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The certificate stores of every running https listener, reloadable as one.
#[derive(Default)]
pub struct CertReloader {
    stores: Mutex<BTreeMap<String, Arc<CertStore>>>,
}

/// Outcome of reloading one listener's certificates.
pub type ListenerReload = (String, Result<ReloadSummary, TlsError>);

impl CertReloader {
    fn insert(&self, listener: &str, store: Arc<CertStore>) {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).insert(listener.to_owned(), store);
    }

    fn remove(&self, listener: &str) {
        self.stores.lock().unwrap_or_else(|p| p.into_inner()).remove(listener);
    }

    /// Re-reads every https listener's files. Each listener's reload is all-or-nothing: a
    /// listener with a bad file keeps all of its old certificates.
    pub fn reload_all(&self) -> Vec<ListenerReload> {
        let stores: Vec<(String, Arc<CertStore>)> =
            self.stores.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(n, s)| (n.clone(), s.clone())).collect();
        stores.into_iter().map(|(name, store)| (name, store.reload())).collect()
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

/// A node that has bound its sockets and loaded its files, ready to serve.
pub struct Daemon {
    file: NodeFile,
    snapshot: SharedSnapshot,
    rejections: Arc<Rejections>,
    admin: TcpListener,
    admin_token: Option<String>,
    listeners: ListenerSet,
    certs: Arc<CertReloader>,
    cluster: Option<ClusterHandle>,
    /// The leader's one VIP (`[vip] address`), or one announcer per spread VIP (`addresses`).
    vip: Vec<Arc<dyn VipAnnouncer>>,
    sticky: Arc<StickyRuntime>,
    source: Option<PathBuf>,
}

impl Daemon {
    /// Standalone: builds the routing snapshot, loads certificates and binds every socket.
    /// Cluster mode: opens the Raft store and joins the cluster; listeners follow the
    /// replicated config once there is one.
    pub async fn bind(file: NodeFile) -> Result<Daemon, DaemonError> {
        // `${node}` in header rules: the cluster's name for this node, else the host name.
        if let Some(section) = &file.cluster {
            crate::proxy::header_rules::set_node_name(section.node_id.to_string());
        }
        let admin_token = file.node.admin_token().map_err(DaemonError::AdminToken)?;
        let admin = TcpListener::bind(file.node.admin)
            .await
            .map_err(|source| DaemonError::AdminBind { addr: file.node.admin, source })?;
        let cluster = match &file.cluster {
            Some(section) => {
                Some(cluster::start(section, &file.node, file.vip.as_ref().is_some_and(|v| v.preempt)).await?)
            }
            None => None,
        };
        let sticky = Arc::new(StickyRuntime::new(match &cluster {
            Some(handle) => StickyDeps::from_cluster(handle, admin_token.clone()),
            None => StickyDeps::standalone(),
        }));
        let seed = if file.cluster.is_some() { Config::default() } else { file.config.clone() };
        let names = Resolver::new(&file.node);
        names.update(&seed).await;
        let mut first = Snapshot::build(seed, None, &names)?;
        first.attach_sticky(&sticky).map_err(|e| DaemonError::Sticky(e.to_string()))?;
        let snapshot = Arc::new(ArcSwap::from_pointee(first));
        let rejections = Arc::new(Rejections::default());
        let certs = Arc::new(CertReloader::default());
        let mut listeners = ListenerSet::new(snapshot.clone(), rejections.clone(), certs.clone());
        if cluster.is_none() {
            if let Some(e) = listeners.reconcile(&file.node.local_view(&file.config)).await.into_iter().next() {
                return Err(e);
            }
        }
        // The VIP's interface and capabilities are checked now, once, not at every election.
        let vip = match (&file.vip, file.cluster.as_ref().is_some_and(|c| c.witness)) {
            (Some(_), true) => {
                tracing::warn!(target: "keel::vip", "witness mode: the [vip] section is ignored");
                Vec::new()
            }
            (Some(v), false) => {
                let realtime = file.cluster.as_ref().is_none_or(|c| c.realtime);
                let mut announcers = Vec::new();
                for address in v.address.iter().chain(&v.addresses) {
                    let config = VipConfig {
                        address: *address,
                        interface: v.interface.clone(),
                        arp_count: v.arp_count,
                        arp_interval: v.arp_interval.get(),
                        lifetime: Some(v.lifetime.get()).filter(|l| !l.is_zero()),
                    };
                    // Built on the VIP's own runtime, so its netlink connection task lives there.
                    let announcer = cluster::vip_runtime(realtime)?
                        .spawn(NetlinkAnnouncer::new(config))
                        .await
                        .map_err(|e| DaemonError::Vip(format!("VIP start task: {e}")))?
                        .map_err(|e| DaemonError::Vip(e.to_string()))?;
                    announcers.push(Arc::new(announcer) as Arc<dyn VipAnnouncer>);
                }
                announcers
            }
            (None, _) => Vec::new(),
        };
        Ok(Daemon {
            file,
            snapshot,
            rejections,
            admin,
            admin_token,
            listeners,
            certs,
            cluster,
            vip,
            sticky,
            source: None,
        })
    }

    /// The file the node was started from: a standalone node reads it again on SIGHUP.
    pub fn with_source(mut self, path: PathBuf) -> Self {
        self.source = Some(path);
        self
    }

    /// The admin API's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Serves until `shutdown` completes, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Daemon { file, snapshot, rejections, admin, admin_token, listeners, certs, cluster, vip, sticky, source } =
            self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let witness = file.cluster.as_ref().is_some_and(|c| c.witness);
        let reloads = Arc::new(ReloadStatus::default());

        let listener_metrics = listeners.metrics();
        let applier = Applier::new(snapshot.clone(), sticky.clone(), listeners, file.node.clone());
        let mut reload_requests = None;
        let (applier_task, sighup) = match &cluster {
            None => {
                for pool in snapshot.load().pools.values() {
                    crate::health::spawn(pool);
                }
                let (tx, rx) = tokio::sync::mpsc::channel(8);
                reload_requests = Some(tx);
                let standalone = Standalone {
                    applier,
                    path: source,
                    file: file.clone(),
                    certs: certs.clone(),
                    status: reloads.clone(),
                };
                (Some(tokio::spawn(standalone.run(rx, stop_rx.clone()))), None)
            }
            Some(handle) if !witness => {
                let reporter = cluster::reporter(handle, file.node.admin, admin_token.clone());
                let applier = applier.with_reporter(reporter);
                let task = tokio::spawn(cluster::follow(handle.clone(), applier, reloads.clone(), stop_rx.clone()));
                let reloader = certs.clone();
                (Some(task), Some(tokio::spawn(async move { reload_on_sighup(reloader).await })))
            }
            Some(_) => {
                tracing::info!(target: "keel::raft", "witness: voting and storing the log; no data plane");
                let reloader = certs.clone();
                (None, Some(tokio::spawn(async move { reload_on_sighup(reloader).await })))
            }
        };

        // The VIP follows leadership-with-a-live-lease, never plain "state == Leader"; spread
        // VIPs follow their own leases (`keel_cluster::vips`).
        let (vip_stop_tx, vip_stop_rx) = watch::channel(false);
        let realtime = file.cluster.as_ref().is_none_or(|c| c.realtime);
        let settings = ControllerSettings {
            reannounce_every: file.vip.as_ref().map(|v| v.reannounce.get()),
            ..ControllerSettings::default()
        };
        let spread = file.vip.as_ref().is_some_and(|v| !v.addresses.is_empty());
        let mut vip_tasks = Vec::new();
        let mut vip_status = None;
        let mut spread_status = Vec::new();
        match (cluster.as_ref().filter(|_| !vip.is_empty()), cluster::vip_runtime(realtime)) {
            (Some(handle), Ok(rt)) if spread => {
                let carries: Vec<std::net::IpAddr> = vip.iter().map(|a| a.address()).collect();
                let (leases, renew) = handle.vip_leases(carries);
                rt.spawn(renew);
                for (announcer, lease) in vip.into_iter().zip(leases) {
                    let controller = VipController::new(announcer, settings.clone()).with_step_aside(lease.aside);
                    spread_status.push((lease.vip, controller.status()));
                    vip_tasks.push(rt.spawn(controller.run(lease.hold, vip_stop_rx.clone())));
                }
            }
            (Some(handle), Ok(rt)) => {
                for announcer in vip {
                    let controller =
                        VipController::new(announcer, settings.clone()).with_step_aside(handle.vip_stepping_aside());
                    let status = controller.status();
                    // The lease deadline and the controller run on the VIP's own thread.
                    let (lease, follow) = handle.vip_lease();
                    rt.spawn(follow);
                    // A hand-over confirms its release only once the address is gone.
                    let (held_tx, held_rx) = watch::channel(false);
                    let mut held = status.clone();
                    rt.spawn(async move {
                        loop {
                            let holding = held.borrow_and_update().holding;
                            held_tx.send_replace(holding);
                            if held.changed().await.is_err() {
                                return;
                            }
                        }
                    });
                    handle.watch_vip(held_rx);
                    vip_tasks.push(rt.spawn(controller.run(lease, vip_stop_rx.clone())));
                    vip_status = Some(status);
                }
            }
            (Some(_), Err(e)) => {
                // Cannot happen: bind built the announcers on this runtime.
                tracing::error!(target: "keel::vip", error = %e, "no VIP runtime; the VIP is not managed");
            }
            (None, _) => {}
        }

        let sigusr1 = tokio::spawn(reopen_logs_on_sigusr1());

        tracing::info!(target: "keel::admin", addr = %file.node.admin, auth = admin_token.is_some(), "admin API listening");
        let token: Option<Arc<str>> = admin_token.map(Arc::from);
        let dashboard = crate::dashboard::spawn(
            crate::dashboard::Inputs {
                snapshot: snapshot.clone(),
                listeners: listener_metrics.clone(),
                cluster: if witness { None } else { cluster.clone() },
                vip: vip_status.clone(),
                vips: spread_status.clone(),
                reloads: reloads.clone(),
                token: token.clone(),
            },
            stop_rx.clone(),
        );
        let admin_state = AdminState {
            snapshot: snapshot.clone(),
            rejections,
            listeners: listener_metrics,
            certs,
            token,
            cluster: cluster.clone(),
            vip: vip_status,
            vips: spread_status,
            witness,
            reload: reload_requests,
            reloads,
            dashboard,
            sessions: Arc::default(),
        };
        let admin_loop = tokio::spawn(admin::serve(admin, admin_state, stop_rx));

        shutdown.await;
        // Spread VIPs go to the other nodes first, while this one still serves (it steps aside
        // and serves what still reaches it until the next holder announces).
        if let Some(handle) = cluster.as_ref().filter(|_| spread) {
            if handle.hand_off_vips(SPREAD_HANDOFF_WITHIN).await {
                tokio::time::sleep(HANDOVER_LINGER).await;
            }
        }
        // A leader hands leadership and the VIP over first, still serving, so a planned stop
        // costs no failover; the drain below then only finishes what this node has open.
        if let Some(handle) = cluster.as_ref().filter(|_| !witness) {
            if handle.status().role == keel_cluster::Role::Leader {
                tracing::info!(target: "keel::raft", "stopping the leader: handing over first");
                match handle.transfer(None).await {
                    Ok(to) => {
                        tracing::info!(target: "keel::raft", to, "handed over before stopping");
                        // The VIP is still a local address here (on `lo`): go on accepting
                        // while the LAN follows the successor's first announcement, so a
                        // client that sent its SYN to this host a moment ago is served, not
                        // reset when the listener closes.
                        tokio::time::sleep(HANDOVER_LINGER).await;
                    }
                    Err(e) => {
                        tracing::warn!(target: "keel::raft", error = %e, "no hand-over; the others take over when the lease ends")
                    }
                }
            }
        }
        tracing::info!(target: "keel::proxy", "shutting down: no longer accepting connections");
        if let Some(task) = sighup {
            task.abort();
        }
        sigusr1.abort();
        let _ = stop_tx.send(true);
        let applier = match applier_task {
            Some(task) => task.await.ok(),
            None => None,
        };
        let _ = admin_loop.await;
        if let Some(mut applier) = applier {
            if applier.shutdown(file.node.drain_timeout()).await {
                tracing::info!(target: "keel::proxy", "drained");
            } else {
                tracing::warn!(target: "keel::proxy", "drain deadline passed; closed the remaining connections");
            }
        }
        // The VIP goes after the drain (releasing it would cut the connections being drained)
        // and before Raft stops (so it is gone before another node can be elected).
        let _ = vip_stop_tx.send(true);
        for task in vip_tasks {
            let _ = task.await;
        }
        if let Some(handle) = cluster {
            handle.shutdown().await;
        }
        tracing::info!("exiting");
    }
}

/// How long a stopping node waits for its spread VIPs to be named to other nodes: a lease and
/// two commits normally, far less than this.
const SPREAD_HANDOFF_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a leader that handed over keeps accepting before it drains: its successor's first
/// gratuitous ARP goes out as it claims, and hosts follow it within a millisecond or two.
const HANDOVER_LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// Cluster mode: reloads certificates on every SIGHUP (the config is the cluster's, changed
/// with `keel config apply`).
async fn reload_on_sighup(certs: Arc<CertReloader>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload certificates through the admin API");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(target: "keel::tls",
                "received SIGHUP: reloading certificates (in a cluster the config changes with `keel config apply`)");
            certs.reload_and_log();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = certs;
        std::future::pending::<()>().await;
    }
}

/// Reopens access log files on every SIGUSR1, what logrotate's `postrotate` sends (as to nginx).
async fn reopen_logs_on_sigusr1() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            tracing::warn!(target: "keel::proxy", "cannot listen for SIGUSR1; access log files will not be reopened");
            return;
        };
        while usr1.recv().await.is_some() {
            tracing::info!(target: "keel::proxy", "received SIGUSR1: reopening access log files");
            crate::proxy::access_log::reopen_all();
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
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
