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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keel_cluster::api::client::ClusterClient;
use keel_cluster::{ClusterHandle, ClusterNode, ClusterSettings, ClusterState, Command, NodeId};
use tokio::sync::watch;

use super::listeners::ListenerSet;
use super::DaemonError;
use crate::config::{ClusterSection, NodeSettings};
use crate::pool::VerdictReporter;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::sticky::StickyRuntime;

/// How often a failed verdict report is retried, and how long between tries.
const REPORT_ATTEMPTS: u32 = 5;
const REPORT_BACKOFF: Duration = Duration::from_millis(200);

/// The runtime Raft runs on: one thread of its own, so heartbeats, votes and the leadership
/// lease are never queued behind thousands of proxy tasks on the data-plane workers. Under full
/// HTTP load on a shared 2-core box, Raft on the data-plane runtime missed its lease often
/// enough to change leader (chaos `load` scenario). Built on first use, lives for the process.
///
/// With `realtime`, its threads (the worker and the blocking-pool threads that write the log)
/// run under `SCHED_RR` at [`RAFT_RT_PRIORITY`]: the scheduler then runs Raft before any normal
/// task, so a core saturated by the data plane (or by anything else on the host) no longer
/// delays a heartbeat past the lease. Raft uses little CPU, and the kernel's real-time
/// throttling (`sched_rt_runtime_us`) bounds it even if it spun.
fn raft_runtime(realtime: bool) -> Result<&'static tokio::runtime::Runtime, DaemonError> {
    // Built inside `get_or_init`: a runtime dropped in async context panics, so none may be
    // built and then thrown away.
    static RT: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RT.get_or_init(|| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).thread_name("keel-raft").enable_all();
        if realtime {
            b.on_thread_start(set_realtime);
        }
        b.build().map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| DaemonError::Cluster(format!("cannot start the raft runtime: {e}")))
}

/// The `SCHED_RR` priority of the Raft threads: the lowest band (1–99) with room below for
/// anything an operator ranks lower, and under the kernel's threaded interrupt handlers (50),
/// which must run for Raft's packets to arrive at all.
pub const RAFT_RT_PRIORITY: i32 = 10;

/// Puts the calling thread under `SCHED_RR` at [`RAFT_RT_PRIORITY`]; warns once and leaves it
/// as it is when the kernel refuses (no CAP_SYS_NICE, a container without real-time budget).
#[allow(unsafe_code)] // one libc call on the current thread; no safe wrapper in our dependencies
fn set_realtime() {
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let param = libc::sched_param { sched_priority: RAFT_RT_PRIORITY };
    // SAFETY: `pthread_self` is always valid for the calling thread and `param` outlives the call.
    let rc = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_RR, &param) };
    if rc != 0 && !REPORTED.swap(true, Ordering::Relaxed) {
        tracing::warn!(target: "keel::raft", error = %std::io::Error::from_raw_os_error(rc),
            "cannot run the raft thread under real-time scheduling (needs CAP_SYS_NICE); it runs at normal priority, \
             and heartbeats may be late when the data plane saturates the CPUs ([cluster] realtime = false silences this)");
    } else if rc == 0 && !REPORTED.swap(true, Ordering::Relaxed) {
        tracing::info!(target: "keel::raft", priority = RAFT_RT_PRIORITY, "raft thread runs under SCHED_RR");
    }
}

/// Opens the store and starts this node's Raft member (on [`raft_runtime`]).
pub async fn start(section: &ClusterSection, node: &NodeSettings) -> Result<ClusterHandle, DaemonError> {
    let mut settings =
        ClusterSettings::new(section.node_id, section.raft, node.admin, section.data_dir.clone(), &section.cluster_id);
    (settings.heartbeat, settings.election_min, settings.election_max) = section.timings();
    settings.witness = section.witness;
    // Everything `ClusterNode::start` spawns (the Raft core, replication, the RPC server, the
    // leadership watch) lands on the runtime it runs on.
    let handle = raft_runtime(section.realtime)?
        .spawn(ClusterNode::start(settings))
        .await
        .map_err(|e| DaemonError::Cluster(format!("raft start task: {e}")))?
        .map_err(|e| DaemonError::Cluster(e.to_string()))?;
    tracing::info!(target: "keel::raft", node = section.node_id, raft = %section.raft, witness = section.witness,
        "cluster member started");
    Ok(handle)
}

/// The latest observation per (pool, server), with a sequence number.
type Latest = Arc<Mutex<HashMap<(String, String), (bool, u64)>>>;

/// Proposes this node's health-check flips to the cluster through its own admin API, which
/// forwards to the leader.
///
/// Reports are coalesced per server: a retry always proposes the *latest* observation and
/// gives up once a newer one exists. Without that, a "down" queued during a network cut could
/// commit after the "up" that followed it, and leave this node's vote wrong until the next flip.
struct RaftReporter {
    client: ClusterClient,
    node_id: NodeId,
    latest: Latest,
    seq: AtomicU64,
}

impl VerdictReporter for RaftReporter {
    fn report(&self, pool: &str, server: &str, up: bool) {
        let key = (pool.to_owned(), server.to_owned());
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), (up, seq));
        let (client, latest, node_id) = (self.client.clone(), self.latest.clone(), self.node_id);
        tokio::spawn(async move {
            for attempt in 1..=REPORT_ATTEMPTS {
                let current = latest.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied();
                let Some((up, newest)) = current else { return };
                if newest != seq {
                    return; // a newer observation has its own task
                }
                let command =
                    Command::SetServerHealth { pool: key.0.clone(), server: key.1.clone(), up, reporter: node_id };
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
    Arc::new(RaftReporter {
        client: ClusterClient::new(admin).with_token(token),
        node_id: handle.id(),
        latest: Arc::default(),
        seq: AtomicU64::new(0),
    })
}

/// What following the replicated state updates.
pub struct Follower {
    /// The published routing snapshot.
    pub snapshot: SharedSnapshot,
    /// Where this node's health observations go.
    pub reporter: Arc<dyn VerdictReporter>,
    /// This node's own settings (listener address overrides).
    pub node: NodeSettings,
    /// Sticky-session stores, shared across snapshots.
    pub sticky: Arc<StickyRuntime>,
}

/// Follows the replicated state until `stop`, then hands the listener set back for draining.
pub async fn follow(
    handle: ClusterHandle,
    follower: Follower,
    mut listeners: ListenerSet,
    mut stop: watch::Receiver<bool>,
) -> ListenerSet {
    let mut state_rx = handle.state();
    // A new DNS answer rebuilds the snapshot like a config change (crate::resolve). `names`
    // holds the resolver, so its channel cannot close under this loop.
    let names = follower.snapshot.load().names.clone();
    let mut answers = names.changed();
    let mut rebuild = false;
    loop {
        let state = state_rx.borrow_and_update().clone();
        apply(&state, &follower, &mut listeners, rebuild).await;
        tokio::select! {
            changed = state_rx.changed() => { rebuild = false; if changed.is_err() { break } },
            _ = answers.changed() => rebuild = true,
            _ = stop.changed() => break,
        }
    }
    listeners
}

async fn apply(state: &ClusterState, follower: &Follower, listeners: &mut ListenerSet, rebuild: bool) {
    let Follower { snapshot, reporter, node, sticky } = follower;
    let current = snapshot.load_full();
    let new_config = *current.config != state.config;
    if new_config || rebuild {
        if new_config {
            current.names.update(&state.config).await;
        }
        let built = Snapshot::build(state.config.clone(), Some(&current), &current.names)
            .map_err(|e| e.to_string())
            .and_then(|mut s| {
                s.attach_sticky(sticky).map_err(|e| e.to_string())?;
                Ok(s)
            });
        match built {
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
                if new_config {
                    tracing::info!(target: "keel::raft", pools = state.config.pools.len(),
                        listeners = state.config.listeners.len(), "serving the replicated config");
                }
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
