//! Applying a config to a running node: the one code path behind a standalone reload (SIGHUP,
//! `keel config apply`) and a cluster node serving a newly committed config.
//!
//! A reload reads the file with `config::load_checked` — exactly what `keel config check` and
//! `keel run` use, so a file that checks ok reloads and one that does not is refused with the
//! same messages. [`Applier::apply`] then builds the new routing snapshot next to the live one (servers that keep
//! their pool, name and address carry their state over), prepares the listener changes (loads
//! certificates, opens access logs, binds new addresses; see [`super::listeners`]), and only
//! then publishes: stores the snapshot, starts the new pools' health checks and swaps the
//! listeners. In-flight requests keep the pool they took and established connections their
//! listener's settings, so a reload drops nothing.
//!
//! The two modes differ only in what a failure to prepare means. Standalone
//! ([`Mode::AllOrNothing`]) the operator is asking, so the reload is refused and nothing
//! changes. In a cluster ([`Mode::BestEffort`]) the config is already committed by a
//! majority, so whatever can start starts and the rest is logged; the rest of the cluster
//! serves it.
//!
//! Every outcome is recorded in [`ReloadStatus`], which `/status` and `/metrics` show.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use keel_cluster::Config;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::listeners::{ListenerChanges, ListenerSet};
use super::CertReloader;
use crate::config::{self, NodeFile, NodeSettings};
use crate::pool::VerdictReporter;
use crate::snapshot::{SharedSnapshot, Snapshot};
use crate::sticky::StickyRuntime;

/// What to do when part of a config cannot be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Refuse the whole change (a standalone reload).
    AllOrNothing,
    /// Start what can be started and log the rest (a config a cluster already committed).
    BestEffort,
}

/// What a change did to the pools, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolChanges {
    /// Pools that are new.
    pub added: Vec<String>,
    /// Pools that are gone.
    pub removed: Vec<String>,
    /// Pools whose settings or servers changed.
    pub changed: Vec<String>,
}

impl PoolChanges {
    fn between(old: &Config, new: &Config) -> PoolChanges {
        PoolChanges {
            added: new.pools.keys().filter(|n| !old.pools.contains_key(*n)).cloned().collect(),
            removed: old.pools.keys().filter(|n| !new.pools.contains_key(*n)).cloned().collect(),
            changed: new
                .pools
                .iter()
                .filter(|(n, p)| old.pools.get(*n).is_some_and(|o| o != *p))
                .map(|(n, _)| n.clone())
                .collect(),
        }
    }
}

/// What an applied change did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Listener changes.
    pub listeners: ListenerChanges,
    /// Pool changes.
    pub pools: PoolChanges,
    /// Whether anything changed at all.
    pub changed: bool,
}

/// Owns what a config change touches: the published snapshot and the running listeners.
pub struct Applier {
    snapshot: SharedSnapshot,
    sticky: Arc<StickyRuntime>,
    listeners: ListenerSet,
    node: NodeSettings,
    reporter: Option<Arc<dyn VerdictReporter>>,
}

impl Applier {
    /// An applier for a node whose first snapshot is already published.
    pub fn new(
        snapshot: SharedSnapshot,
        sticky: Arc<StickyRuntime>,
        listeners: ListenerSet,
        node: NodeSettings,
    ) -> Self {
        Applier { snapshot, sticky, listeners, node, reporter: None }
    }

    /// Sends every pool's health-check flips to `reporter` (cluster mode: one vote each).
    pub fn with_reporter(mut self, reporter: Arc<dyn VerdictReporter>) -> Self {
        self.reporter = Some(reporter);
        self
    }

    /// The published snapshot.
    pub fn snapshot(&self) -> &SharedSnapshot {
        &self.snapshot
    }

    /// The running listeners, handed back for the final drain.
    pub fn into_listeners(self) -> ListenerSet {
        self.listeners
    }

    /// Applies `config` (see the module doc). `before_publish` sees the new snapshot just
    /// before it goes live (cluster mode pushes the replicated verdicts into it there). Returns
    /// what changed, or, when the change is refused, every reason; nothing changed then.
    ///
    /// `node` replaces this node's own settings when the change is applied (a standalone reload
    /// reads its `listen` overrides again); `None` keeps them.
    pub async fn apply(
        &mut self,
        config: Config,
        node: Option<&NodeSettings>,
        mode: Mode,
        before_publish: impl FnOnce(&Snapshot),
    ) -> Result<Change, Vec<String>> {
        let node = node.unwrap_or(&self.node).clone();
        let current = self.snapshot.load_full();
        let config_changed = *current.config != config;
        let pools = PoolChanges::between(&current.config, &config);
        let next = if config_changed {
            // Names the new config adds start resolving (their first answer awaited, bounded);
            // names it drops stop. Undone below if the change is refused.
            current.names.update(&config).await;
            let built = Snapshot::build(config.clone(), Some(&current), &current.names)
                .map_err(|e| e.to_string())
                .and_then(|mut next| next.attach_sticky(&self.sticky).map(|()| next).map_err(|e| e.to_string()));
            match built {
                Ok(next) => Some(next),
                Err(e) => {
                    if mode == Mode::AllOrNothing {
                        current.names.update(&current.config).await;
                    }
                    return Err(vec![e]);
                }
            }
        } else {
            None
        };
        let (plan, errors) = self.listeners.prepare(&node.local_view(&config)).await;
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        if mode == Mode::AllOrNothing && !errors.is_empty() {
            // Dropping the plan closes what it bound; nothing was published.
            if config_changed {
                current.names.update(&current.config).await;
            }
            return Err(errors);
        }
        for e in &errors {
            tracing::error!(target: "keel::proxy", error = %e, "listener not started");
        }
        let listeners = plan.summary();
        if let Some(next) = next {
            self.publish(next, before_publish);
        }
        let listeners_changed = !plan.is_empty();
        if listeners_changed {
            self.listeners.commit(plan).await;
        }
        self.node = node;
        Ok(Change { listeners, pools, changed: config_changed || listeners_changed })
    }

    /// Rebuilds the snapshot from the config it serves, for a new DNS answer (`crate::resolve`):
    /// servers whose address is still in the answer keep their state; listeners are untouched.
    pub fn rebuild(&mut self, before_publish: impl FnOnce(&Snapshot)) -> Result<(), String> {
        let current = self.snapshot.load_full();
        let mut next =
            Snapshot::build((*current.config).clone(), Some(&current), &current.names).map_err(|e| e.to_string())?;
        next.attach_sticky(&self.sticky).map_err(|e| e.to_string())?;
        self.publish(next, before_publish);
        Ok(())
    }

    /// Ticks on every new DNS answer of the served config's names.
    pub fn answers(&self) -> watch::Receiver<u64> {
        self.snapshot.load().names.changed()
    }

    /// Makes `next` the served snapshot: the reporter set on its pools, `before_publish`
    /// run, stored, what only the old one needed let go, health checks started.
    fn publish(&mut self, next: Snapshot, before_publish: impl FnOnce(&Snapshot)) {
        if let Some(reporter) = &self.reporter {
            for pool in next.pools.values() {
                pool.set_reporter(reporter.clone());
            }
        }
        before_publish(&next);
        let config = next.config.clone();
        self.snapshot.store(Arc::new(next));
        self.sticky.retain(&config);
        for pool in self.snapshot.load().pools.values() {
            crate::health::spawn(pool);
        }
    }

    /// Stops every listener and drains; see [`ListenerSet::shutdown`].
    pub async fn shutdown(&mut self, deadline: std::time::Duration) -> bool {
        self.listeners.shutdown(deadline).await
    }
}

/// Who asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// SIGHUP: the node's own file, read again.
    Sighup,
    /// `keel config apply` through the admin API.
    AdminApi,
    /// A config the cluster committed (cluster mode).
    Cluster,
}

/// How a reload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Result_ {
    /// The new config is served.
    Applied,
    /// The config was the one already served (certificates were read again).
    Unchanged,
    /// The config was refused; the previous one is still served.
    Refused,
}

/// One reload's outcome, as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Who asked.
    pub source: Source,
    /// Where the config came from (a file path, or what the CLI sent).
    pub origin: String,
    /// When it ended, in Unix milliseconds.
    pub at_unix_ms: u64,
    /// How it ended.
    pub result: Result_,
    /// Why it was refused: every problem, one per entry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// What changed, when applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    /// Node-level settings that changed in the file but take a restart (admin address, cluster
    /// membership, VIP, worker threads, …); the rest was applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub needs_restart: Vec<String>,
}

/// Reload history of a node: the last outcome and counts, shared with the admin API.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    inner: Mutex<ReloadState>,
}

/// A copy of [`ReloadStatus`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReloadState {
    /// Changes applied since start; the served config's generation (0 = the one started with).
    pub generation: u64,
    /// Reloads applied (or unchanged) since start.
    pub applied: u64,
    /// Reloads refused since start.
    pub refused: u64,
    /// The last reload, if any.
    pub last: Option<Outcome>,
}

impl ReloadStatus {
    /// A copy of the current state.
    pub fn get(&self) -> ReloadState {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the outcome of serving a config the cluster committed.
    pub fn record_cluster(&self, result: Result<Change, Vec<String>>) {
        let (result, problems, change) = match result {
            Ok(change) => (Result_::Applied, Vec::new(), Some(change)),
            Err(problems) => (Result_::Refused, problems, None),
        };
        self.record(Outcome {
            source: Source::Cluster,
            origin: "raft".to_owned(),
            at_unix_ms: now_unix_ms(),
            result,
            problems,
            change,
            needs_restart: Vec::new(),
        });
    }

    fn record(&self, outcome: Outcome) {
        let text = match outcome.result {
            Result_::Applied => format!("config applied ({})", outcome.origin),
            Result_::Unchanged => format!("config reloaded, unchanged ({})", outcome.origin),
            Result_::Refused => format!("config refused ({}): {}", outcome.origin, outcome.problems.join("; ")),
        };
        crate::events::record("config", text);
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match outcome.result {
            Result_::Applied => {
                state.generation += 1;
                state.applied += 1;
            }
            Result_::Unchanged => state.applied += 1,
            Result_::Refused => state.refused += 1,
        }
        state.last = Some(outcome);
    }
}

/// A reload asked through the admin API: the text of a node file and where it came from.
pub struct Request {
    /// The file's text.
    pub text: String,
    /// Its name, for messages.
    pub origin: String,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Outcome>,
}

/// The sending side of a standalone node's reload queue, for the admin API.
pub type Requests = mpsc::Sender<Request>;

/// A standalone node's reloads: from its own file on SIGHUP, from a file's text through the
/// admin API. One at a time, in the order asked.
pub struct Standalone {
    /// The applier (owns the listeners).
    pub applier: Applier,
    /// The file the node started from (none for the demo).
    pub path: Option<PathBuf>,
    /// What that file said when last applied.
    pub file: NodeFile,
    /// Certificates, read again on every reload.
    pub certs: Arc<CertReloader>,
    /// Where outcomes are recorded.
    pub status: Arc<ReloadStatus>,
}

impl Standalone {
    /// Serves reloads until `stop`, then hands the applier back for the final drain.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>, mut stop: watch::Receiver<bool>) -> Applier {
        let mut hup = sighup();
        // A new DNS answer rebuilds the snapshot (crate::resolve). An answer that changed
        // between the first snapshot and this subscription would otherwise wait for the next
        // change: one rebuild at start covers it.
        let mut answers = self.applier.answers();
        answers.mark_changed();
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                changed = answers.changed() => {
                    if changed.is_err() {
                        answers = self.applier.answers();
                        continue;
                    }
                    if let Err(e) = self.applier.rebuild(|_| {}) {
                        tracing::error!(target: "keel::dns", error = %e, "cannot apply a new DNS answer; keeping the previous servers");
                    }
                }
                Some(()) = next_hup(&mut hup) => {
                    tracing::info!(target: "keel::config", "received SIGHUP: reloading the config");
                    match self.path.clone() {
                        Some(path) => {
                            let origin = path.display().to_string();
                            let loaded = config::load_checked(&path).map_err(|e| problems_of(&e));
                            self.reload(Source::Sighup, origin, loaded).await;
                        }
                        None => {
                            tracing::info!(target: "keel::config", "no config file (demo): reloading certificates only");
                            self.certs.reload_and_log();
                        }
                    }
                }
                request = requests.recv() => {
                    let Some(Request { text, origin, reply }) = request else { break };
                    let loaded = config::parse_checked(&text, &origin).map_err(|e| problems_of(&e));
                    let outcome = self.reload(Source::AdminApi, origin, loaded).await;
                    let _ = reply.send(outcome);
                }
            }
        }
        self.applier
    }

    async fn reload(&mut self, source: Source, origin: String, loaded: Result<NodeFile, Vec<String>>) -> Outcome {
        let mut outcome = Outcome {
            source,
            origin,
            at_unix_ms: 0,
            result: Result_::Refused,
            problems: Vec::new(),
            change: None,
            needs_restart: Vec::new(),
        };
        match loaded {
            Err(problems) => outcome.problems = problems,
            Ok(file) => {
                outcome.needs_restart = needs_restart(&self.file, &file);
                match self.applier.apply(file.config.clone(), Some(&file.node), Mode::AllOrNothing, |_| {}).await {
                    Err(problems) => outcome.problems = problems,
                    Ok(change) => {
                        // Certificates of listeners that kept running are read again too: the
                        // files may have been renewed under the same names.
                        self.certs.reload_and_log();
                        outcome.result = if change.changed { Result_::Applied } else { Result_::Unchanged };
                        outcome.change = Some(change);
                        self.file.config = file.config;
                        self.file.node.listen = file.node.listen;
                    }
                }
            }
        }
        outcome.at_unix_ms = now_unix_ms();
        log(&outcome);
        self.status.record(outcome.clone());
        outcome
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn problems_of(e: &config::ConfigError) -> Vec<String> {
    e.to_string().lines().map(str::to_owned).collect()
}

fn log(outcome: &Outcome) {
    let source = match outcome.source {
        Source::Sighup => "SIGHUP",
        Source::AdminApi => "admin API",
        Source::Cluster => "cluster",
    };
    match (&outcome.result, &outcome.change) {
        (Result_::Refused, _) => {
            tracing::error!(target: "keel::config", source, origin = %outcome.origin, problems = %outcome.problems.join("; "),
                "config reload refused; the previous config is still served")
        }
        (_, Some(c)) => tracing::info!(target: "keel::config", source, origin = %outcome.origin,
            changed = c.changed,
            listeners_started = ?c.listeners.started, listeners_stopped = ?c.listeners.stopped,
            listeners_restarted = ?c.listeners.restarted, pools_added = ?c.pools.added,
            pools_removed = ?c.pools.removed, pools_changed = ?c.pools.changed, "config reloaded"),
        (_, None) => {}
    }
    if !outcome.needs_restart.is_empty() {
        tracing::warn!(target: "keel::config", settings = ?outcome.needs_restart,
            "these node settings changed in the file and take effect at the next restart; the rest was applied");
    }
}

/// The node-level settings that differ between `old` and `new`: a reload cannot change them.
fn needs_restart(old: &NodeFile, new: &NodeFile) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (&old.node, &new.node);
    // In key order, as the status lists them.
    let node = [
        ("node.admin", a.admin != b.admin),
        ("node.admin_token_env", a.admin_token_env != b.admin_token_env),
        ("node.admin_token_file", a.admin_token_file != b.admin_token_file),
        ("node.drain_timeout", a.drain_timeout != b.drain_timeout),
        ("node.workers", a.workers != b.workers),
    ];
    out.extend(node.into_iter().filter(|(_, changed)| *changed).map(|(k, _)| k.to_owned()));
    // `listen` (per-node bind addresses) is applied with the listeners.
    if (NodeSettings { listen: b.listen.clone(), ..a.clone() }) != *b && out.is_empty() {
        out.push("node".to_owned());
    }
    if old.cluster != new.cluster {
        out.push("cluster".to_owned());
    }
    if old.vip != new.vip {
        out.push("vip".to_owned());
    }
    out
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

fn sighup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(target: "keel::config", error = %e, "cannot listen for SIGHUP; reload with `keel config apply`");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

async fn next_hup(hup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = hup {
        return s.recv().await;
    }
    let _ = hup;
    std::future::pending().await
}
