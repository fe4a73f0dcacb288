//! Cluster mode: the replicated state drives the data plane, and the data plane's
//! observations are proposed to the cluster.
//!
//! - [`start`] opens this node's Raft store and starts its Raft member.
//! - [`follow`] watches the applied [`ClusterState`]: when its *config* changes, it applies it
//!   through the same code as a standalone reload (`super::apply`: new snapshot carrying
//!   server state over, health checkers for the new pools, listeners reconciled), and once the
//!   first one is served it lets this node offer its spread VIPs; on every
//!   change it pushes the replicated per-server facts —
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

use super::apply::{Applier, Mode, ReloadStatus};
use super::DaemonError;
use crate::config::{ClusterSection, NodeSettings};
use crate::pool::VerdictReporter;
use crate::snapshot::Snapshot;

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
    dedicated_runtime(&RAFT_RT, "keel-raft", realtime)
        .map_err(|e| DaemonError::Cluster(format!("cannot start the raft runtime: {e}")))
}

type RuntimeCell = OnceLock<Result<tokio::runtime::Runtime, String>>;
static RAFT_RT: RuntimeCell = OnceLock::new();

/// A one-worker runtime of its own named `name`, built on first use and kept for the process;
/// its threads under `SCHED_RR` when `realtime`.
fn dedicated_runtime(
    cell: &'static RuntimeCell,
    name: &'static str,
    realtime: bool,
) -> Result<&'static tokio::runtime::Runtime, &'static String> {
    // Built inside `get_or_init`: a runtime dropped in async context panics, so none may be
    // built and then thrown away.
    cell.get_or_init(|| {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(1).thread_name(name).enable_all();
        if realtime {
            b.on_thread_start(set_realtime);
        }
        b.build().map_err(|e| e.to_string())
    })
    .as_ref()
}

/// Environment variable that turns on the test-only failpoints (`POST /debug/stall-raft`).
pub const FAILPOINTS_ENV: &str = "KEEL_TEST_FAILPOINTS";

/// Whether the test-only failpoints are on: `KEEL_TEST_FAILPOINTS=1` in the node's environment
/// at start. Never set in production; the chaos lab sets it.
pub fn failpoints_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(FAILPOINTS_ENV).is_ok_and(|v| v == "1"))
}

/// Failpoint: blocks the Raft runtime's one worker thread for `d`, as a snapshot built on it
/// did (a synchronous 0.4–0.63 s at a million sticky entries). Returns false when there is no
/// Raft runtime (standalone).
pub fn stall_raft(d: Duration) -> bool {
    let Some(Ok(rt)) = RAFT_RT.get() else { return false };
    tracing::warn!(target: "keel::raft", stall = ?d, "failpoint: stalling the raft thread");
    // Blocking on purpose: that is the fault being simulated.
    rt.spawn(async move { std::thread::sleep(d) });
    true
}

/// Environment variable of a failpoint: the first apply of the replicated config waits this
/// many milliseconds, as on a loaded host where binding the listeners lags Raft's start.
/// Honoured only with [`failpoints_enabled`].
pub const FIRST_APPLY_DELAY_ENV: &str = "KEEL_TEST_FIRST_APPLY_DELAY_MS";

/// Failpoint: how long the first apply waits ([`FIRST_APPLY_DELAY_ENV`]); zero unless set.
fn first_apply_delay() -> Duration {
    if !failpoints_enabled() {
        return Duration::ZERO;
    }
    let ms = std::env::var(FIRST_APPLY_DELAY_ENV).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ms)
}

/// The runtime the VIP lives on: one thread of its own for the lease deadline, the VIP controller
/// and the netlink connection. Neither a stalled Raft thread (a snapshot, a starved core) nor
/// data-plane workers busy with thousands of connections can then delay a release past the
/// lease (see `keel_cluster::lease`). Under `SCHED_RR` like Raft's when `realtime`.
pub fn vip_runtime(realtime: bool) -> Result<&'static tokio::runtime::Runtime, DaemonError> {
    static RT: RuntimeCell = OnceLock::new();
    dedicated_runtime(&RT, "keel-vip", realtime)
        .map_err(|e| DaemonError::Vip(format!("cannot start the VIP runtime: {e}")))
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
pub async fn start(section: &ClusterSection, node: &NodeSettings, preempt: bool) -> Result<ClusterHandle, DaemonError> {
    let mut settings =
        ClusterSettings::new(section.node_id, section.raft, node.admin, section.data_dir.clone(), &section.cluster_id);
    (settings.heartbeat, settings.election_min, settings.election_max) = section.timings();
    settings.witness = section.witness;
    settings.vip_preempt = preempt;
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

/// Follows the replicated state until `stop`, then hands the applier (and its listeners)
/// back for draining. Every new config goes through [`Applier::apply`], as a standalone
/// reload does, in best-effort mode: a majority has already committed it.
pub async fn follow(
    handle: ClusterHandle,
    mut applier: Applier,
    status: Arc<ReloadStatus>,
    mut stop: watch::Receiver<bool>,
) -> Applier {
    let mut state_rx = handle.state();
    let mut removed = handle.removed();
    // A new DNS answer rebuilds the snapshot like a config change (crate::resolve). The
    // snapshot holds the resolver, so its channel cannot close under this loop.
    let mut answers = applier.answers();
    let mut rebuild = false;
    let delay = first_apply_delay();
    if !delay.is_zero() {
        tracing::warn!(target: "keel::raft", ?delay, "failpoint: delaying the first apply");
        tokio::time::sleep(delay).await;
    }
    loop {
        if removed.borrow_and_update().is_some() {
            // Removed from the cluster: its listeners are the cluster's, not this node's.
            let empty = keel_cluster::model::Config::default();
            let result = applier.apply(empty, None, Mode::BestEffort, |_| {}).await;
            if result.is_ok() {
                tracing::warn!(target: "keel::raft", "removed from the cluster: no longer serving its listeners");
            }
            status.record_cluster(result);
            let _ = stop.wait_for(|stopped| *stopped).await;
            break;
        }
        let state = state_rx.borrow_and_update().clone();
        apply(&state, &mut applier, &status, rebuild).await;
        // The listeners of the replicated config are bound now: only from here on may the
        // leader name this node for a spread VIP (`keel_cluster::vips::Offer`).
        handle.serving();
        tokio::select! {
            changed = state_rx.changed() => { rebuild = false; if changed.is_err() { break } },
            _ = answers.changed() => rebuild = true,
            _ = removed.changed() => {}
            _ = stop.changed() => break,
        }
    }
    applier
}

async fn apply(state: &ClusterState, applier: &mut Applier, status: &ReloadStatus, rebuild: bool) {
    let current = applier.snapshot().load_full();
    if *current.config == state.config {
        if rebuild {
            if let Err(e) = applier.rebuild(|next| push_facts(state, next)) {
                tracing::error!(target: "keel::dns", error = %e, "cannot apply a new DNS answer; keeping the previous servers");
            }
        } else {
            push_facts(state, &current);
        }
        return;
    }
    let result = applier.apply(state.config.clone(), None, Mode::BestEffort, |next| push_facts(state, next)).await;
    match &result {
        Ok(_) => tracing::info!(target: "keel::raft", pools = state.config.pools.len(),
            listeners = state.config.listeners.len(), "serving the replicated config"),
        Err(e) => tracing::error!(target: "keel::raft", error = %e.join("; "),
            "cannot serve the replicated config; keeping the previous one"),
    }
    status.record_cluster(result);
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
