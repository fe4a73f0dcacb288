//! Cluster mode: the replicated state drives the data plane, and the data plane's
//! observations are proposed to the cluster.
//!
//! - [`start`] opens this node's Raft store and starts its Raft member.
//! - [`follow`] watches the applied [`ClusterState`]: when its *config* changes, it builds a
//!   new snapshot (carrying server state over), starts health checkers for the new pools and
//!   reconciles the listeners; on every change it pushes the replicated per-server facts —
//!   health verdicts, drains, weights — into the live pools. Sticky entries and other frequent
//!   writes never rebuild anything.
//! - [`reporter`] makes this node's active checks one vote each: a flip is proposed as
//!   `SetServerHealth`, and the verdict comes back through the state once a majority of voters
//!   agree (see `keel_cluster::state`). A node with a broken NIC therefore cannot eject a healthy
//!   server on its own, and a node that takes over after a failover starts with the verdicts
//!   already in force.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_cluster::api::client::ClusterClient;
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, ClusterState, Command, NodeId};
use tokio::sync::watch;

use super::listeners::ListenerSet;
use super::DaemonError;
use crate::config::{ClusterSection, NodeSettings};
use crate::pool::VerdictReporter;
use crate::snapshot::{SharedSnapshot, Snapshot};

/// How often a failed verdict report is retried, and how long between tries.
const REPORT_ATTEMPTS: u32 = 5;
const REPORT_BACKOFF: Duration = Duration::from_millis(200);

/// Opens the store and starts this node's Raft member.
pub async fn start(section: &ClusterSection, node: &NodeSettings) -> Result<ClusterHandle, DaemonError> {
    let mut settings =
        ClusterSettings::new(section.node_id, section.raft, node.admin, section.data_dir.clone(), &section.cluster_id);
    settings.heartbeat = section.heartbeat.get();
    settings.election_min = section.election_min.get();
    settings.election_max = section.election_max.get();
    settings.witness = section.witness;
    let handle = ClusterNode::start(settings).await.map_err(|e| DaemonError::Cluster(e.to_string()))?;
    tracing::info!(target: "keel::raft", node = section.node_id, raft = %section.raft, witness = section.witness,
        "cluster member started");
    Ok(handle)
}

/// Proposes this node's health-check flips to the cluster through its own admin API, which
/// forwards to the leader.
struct RaftReporter {
    client: ClusterClient,
    node_id: NodeId,
}

impl VerdictReporter for RaftReporter {
    fn report(&self, pool: &str, server: &str, up: bool) {
        let command =
            Command::SetServerHealth { pool: pool.to_owned(), server: server.to_owned(), up, reporter: self.node_id };
        let client = self.client.clone();
        tokio::spawn(async move {
            for attempt in 1..=REPORT_ATTEMPTS {
                match client.propose(&command).await {
                    Ok(_) => return,
                    Err(e) if attempt == REPORT_ATTEMPTS => {
                        tracing::warn!(target: "keel::health", error = %e, "could not report a health verdict to the cluster");
                    }
                    Err(_) => tokio::time::sleep(REPORT_BACKOFF * attempt).await,
                }
            }
        });
    }
}

/// The reporter of this node's health observations.
pub fn reporter(handle: &ClusterHandle, admin: SocketAddr, token: Option<String>) -> Arc<dyn VerdictReporter> {
    Arc::new(RaftReporter { client: ClusterClient::new(admin).with_token(token), node_id: handle.id() })
}

/// Follows the replicated state until `stop`, then hands the listener set back for draining.
pub async fn follow(
    handle: ClusterHandle,
    snapshot: SharedSnapshot,
    mut listeners: ListenerSet,
    reporter: Arc<dyn VerdictReporter>,
    node: NodeSettings,
    mut stop: watch::Receiver<bool>,
) -> ListenerSet {
    let mut state_rx = handle.state();
    loop {
        let state = state_rx.borrow_and_update().clone();
        apply(&state, &snapshot, &mut listeners, &reporter, &node).await;
        tokio::select! {
            changed = state_rx.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    listeners
}

async fn apply(
    state: &ClusterState,
    snapshot: &SharedSnapshot,
    listeners: &mut ListenerSet,
    reporter: &Arc<dyn VerdictReporter>,
    node: &NodeSettings,
) {
    let current = snapshot.load_full();
    if *current.config != state.config {
        match Snapshot::build(state.config.clone(), Some(&current)) {
            Ok(next) => {
                for pool in next.pools.values() {
                    pool.set_reporter(reporter.clone());
                }
                push_facts(state, &next);
                snapshot.store(Arc::new(next));
                for pool in snapshot.load().pools.values() {
                    crate::health::spawn(pool);
                }
                for e in listeners.reconcile(&node.local_view(&state.config)).await {
                    tracing::error!(target: "keel::proxy", error = %e, "listener not started");
                }
                tracing::info!(target: "keel::raft", pools = state.config.pools.len(),
                    listeners = state.config.listeners.len(), "serving the replicated config");
            }
            Err(e) => {
                tracing::error!(target: "keel::raft", error = %e, "cannot serve the replicated config; keeping the previous one");
            }
        }
        return;
    }
    push_facts(state, &current);
}

/// Pushes replicated verdicts, drains and weights into the live pools. Each setter only
/// rebuilds a selector when its value actually changed.
fn push_facts(state: &ClusterState, snapshot: &Snapshot) {
    for (pool_name, pool) in &snapshot.pools {
        for (index, server) in pool.servers.iter().enumerate() {
            let up = state.is_up(pool_name, &server.name);
            if pool.set_checked_up(index, up) {
                if up {
                    tracing::info!(target: "keel::health", pool = %pool_name, server = %server.name,
                        "server marked UP by the cluster (a majority of voters see it up)");
                } else {
                    tracing::warn!(target: "keel::health", pool = %pool_name, server = %server.name,
                        "server marked DOWN by the cluster (a majority of voters see it down)");
                }
            }
            let _ = pool.set_draining(&server.name, state.is_draining(pool_name, &server.name));
            if let Some(weight) = state.effective_weight(pool_name, &server.name) {
                let _ = pool.set_weight(&server.name, weight);
            }
        }
    }
}
