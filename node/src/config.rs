//! A node's TOML file → the node's own settings plus a validated [`Config`].
//!
//! The file holds two kinds of settings: `[node]` belongs to this process alone (admin address,
//! drain deadline, worker threads), everything else (`[listeners.*]`, `[pools.*]`) is the
//! [`Config`] that the cluster will replicate. Both are read in one pass.
//!
//! Errors name the file, the line, the key and, when it is about a value, the value. Every
//! problem of a file is reported at once: serde stops at a section's first type error, so each
//! section (`[node]`, `[cluster]`, `[vip]`, each listener, each pool) is deserialized on its own
//! and a serde error is placed at the deepest key whose span holds it; the invariants that span
//! fields ([`Config::validate`]) are all reported together, without echoing a section that did
//! not read. Line numbers for the latter come from re-walking the spanned document
//! (`toml::de::DeTable`) along each problem's [`KeyPath`], so the model stays free of spans.
//!
//! [`load`] stops there. [`load_checked`] — what `keel config check`, `keel run` and a reload
//! use — also opens every file the node would open (certificates, CA bundles, the admin token,
//! access log files) with the loaders the node uses, so a file that checks ok runs.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_cluster::model::{Listener, Pool, Protocol};
use keel_cluster::{Config, HumanDuration, KeyPath, PathSegment, Profile};
use serde::{Deserialize, Serialize};
use toml::de::{DeTable, DeValue};

/// Upper bound on `node.workers`: more threads than this is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

/// Settings that belong to this node alone and are never replicated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Address of the admin API. Keep it on loopback or a management network.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// How long a graceful shutdown waits for in-flight requests.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// Tokio worker threads for the data plane; 0 = one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// File holding the bearer token the admin API requires (whitespace trimmed).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Environment variable holding the bearer token the admin API requires.
    #[serde(default)]
    pub admin_token_env: Option<String>,
    /// Per-node bind addresses, by listener name, replacing the replicated `bind`: for nodes
    /// that share a host (a lab, a test) or bind per-node addresses.
    #[serde(default)]
    pub listen: std::collections::BTreeMap<String, SocketAddr>,
    /// DNS servers asked for the addresses of servers given by name (UDP, TCP when an answer
    /// is truncated), e.g. `["10.0.0.2:53"]`. Empty: the system's (`/etc/resolv.conf`).
    #[serde(default)]
    pub resolvers: Vec<SocketAddr>,
    /// Time one DNS query may take before it counts as a timeout (each query is tried twice).
    #[serde(default = "default_resolve_timeout")]
    pub resolve_timeout: HumanDuration,
}

fn default_resolve_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

fn default_admin() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            admin: default_admin(),
            drain_timeout: default_drain_timeout(),
            workers: 0,
            admin_token_file: None,
            admin_token_env: None,
            listen: Default::default(),
            resolvers: Vec::new(),
            resolve_timeout: default_resolve_timeout(),
        }
    }
}

impl NodeSettings {
    /// The drain deadline as a [`Duration`].
    pub fn drain_timeout(&self) -> Duration {
        self.drain_timeout.get()
    }

    /// `config` with this node's `listen` overrides applied to its listeners' addresses.
    pub fn local_view(&self, config: &Config) -> Config {
        let mut local = config.clone();
        for (name, listener) in &mut local.listeners {
            if let Some(addr) = self.listen.get(name) {
                listener.bind = *addr;
            }
        }
        local
    }

    /// The admin API's bearer token, read from its file or variable; `None` when none is set.
    /// The token itself never appears in an error or a log line.
    pub fn admin_token(&self) -> Result<Option<String>, String> {
        self.read_admin_token().map_err(|e| e.to_string())
    }

    /// [`admin_token`](Self::admin_token) with a typed error, so a config check can name the
    /// key at fault.
    pub fn read_admin_token(&self) -> Result<Option<String>, AdminTokenError> {
        let token = match (&self.admin_token_file, &self.admin_token_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|source| AdminTokenError::Read { path: path.clone(), source })?
                .trim()
                .to_owned(),
            (None, Some(var)) => std::env::var(var).map_err(|_| AdminTokenError::Unset { var: var.clone() })?,
            (None, None) => return Ok(None),
        };
        if token.len() < MIN_ADMIN_TOKEN {
            return Err(AdminTokenError::TooShort);
        }
        Ok(Some(token))
    }
}

/// Shortest admin token accepted: anything shorter is guessable.
pub const MIN_ADMIN_TOKEN: usize = 16;

/// Why the admin token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    /// `admin_token_file` could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `admin_token_env` names a variable that is not set.
    #[error("environment variable {var} is not set")]
    Unset {
        /// The variable.
        var: String,
    },
    /// The token is shorter than [`MIN_ADMIN_TOKEN`].
    #[error("the admin token must be at least 16 characters")]
    TooShort,
}

/// `[cluster]`: this node's place in a Raft cluster. Without it the node runs standalone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Unique, stable id of this node (not 0).
    pub node_id: u64,
    /// Address for Raft RPC between nodes.
    pub raft: SocketAddr,
    /// Where the Raft log, vote and snapshots are kept.
    pub data_dir: PathBuf,
    /// Nodes with another cluster id are refused.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Named Raft timings; the three keys below override single values of it.
    #[serde(default)]
    pub profile: Profile,
    /// Leader heartbeat interval (default: the profile's).
    #[serde(default)]
    pub heartbeat: Option<HumanDuration>,
    /// Election timeout, lower bound (default: the profile's).
    #[serde(default)]
    pub election_min: Option<HumanDuration>,
    /// Election timeout, upper bound, also the leader lease that guards the VIP (default: the
    /// profile's).
    #[serde(default)]
    pub election_max: Option<HumanDuration>,
    /// A witness votes and stores the log but serves no traffic and never holds the VIP.
    #[serde(default)]
    pub witness: bool,
    /// Run the Raft thread under real-time scheduling (`SCHED_RR`, low priority), so
    /// heartbeats and elections keep their timing when the data plane saturates the CPUs.
    /// Needs CAP_SYS_NICE; without it keel warns and carries on at normal priority.
    #[serde(default = "default_realtime")]
    pub realtime: bool,
}

fn default_realtime() -> bool {
    true
}

fn default_cluster_id() -> String {
    "keel".to_owned()
}
impl ClusterSection {
    /// `(heartbeat, election_min, election_max)`: the profile's, with explicit keys on top.
    pub fn timings(&self) -> (Duration, Duration, Duration) {
        let (hb, min, max) = self.profile.timings();
        (
            self.heartbeat.map_or(hb, HumanDuration::get),
            self.election_min.map_or(min, HumanDuration::get),
            self.election_max.map_or(max, HumanDuration::get),
        )
    }
}

/// `[vip]`: the virtual IP this node claims while it is the cluster's leader (`address`), or
/// the VIPs the cluster spreads over its data nodes (`addresses`, see `keel_cluster::vips`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The leader's one VIP, claimed as a /32.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// VIPs spread over the data nodes, each held by one node at a time. List the same set on
    /// every data node; a node is named only for addresses its own list has.
    #[serde(default)]
    pub addresses: Vec<std::net::IpAddr>,
    /// With `addresses`, on the leader: move VIPs back to an even spread when a node comes
    /// back (off: a returning node takes only VIPs that have no holder).
    #[serde(default)]
    pub preempt: bool,
    /// Interface to add it on and announce it from.
    pub interface: String,
    /// Gratuitous ARPs of each form sent per announcement.
    #[serde(default = "default_arp_count")]
    pub arp_count: u32,
    /// Time between them.
    #[serde(default = "default_arp_interval")]
    pub arp_interval: HumanDuration,
    /// Re-announce (and re-check the address) this often while holding it.
    #[serde(default = "default_reannounce")]
    pub reannounce: HumanDuration,
    /// The address's kernel lifetime, renewed every quarter of it while the node holds the
    /// lease: a holder that dies or freezes loses the VIP by itself this long after its last
    /// renewal. Whole seconds; `"0s"` makes the address permanent.
    #[serde(default = "default_lifetime")]
    pub lifetime: HumanDuration,
}

fn default_arp_count() -> u32 {
    5
}
fn default_arp_interval() -> HumanDuration {
    HumanDuration::from_millis(100)
}
fn default_reannounce() -> HumanDuration {
    HumanDuration::from_secs(2)
}
fn default_lifetime() -> HumanDuration {
    HumanDuration::from_secs(2)
}

/// Everything a node's file says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFile {
    /// This node's own settings.
    pub node: NodeSettings,
    /// Cluster membership, when the node is part of one.
    pub cluster: Option<ClusterSection>,
    /// The virtual IP, claimed while this node leads the cluster.
    pub vip: Option<VipSection>,
    /// The served configuration, validated. In cluster mode this is only the seed that
    /// `keel cluster init` proposes; afterwards the replicated config is the truth.
    pub config: Config,
}

/// One problem found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, when the problem can be placed.
    pub line: Option<usize>,
    /// Dotted key path, when the problem is about one key.
    pub key: Option<String>,
    /// What is wrong.
    pub reason: String,
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{}", render(origin, problems))]
    Invalid {
        /// The file (or a label such as "<demo>").
        origin: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn render(origin: &str, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&p.display_with(origin).to_string());
    }
    out
}

impl Problem {
    /// `FILE:LINE: KEY: REASON`, leaving out what is unknown.
    pub fn display_with<'a>(&'a self, origin: &'a str) -> impl fmt::Display + 'a {
        struct Shown<'a>(&'a Problem, &'a str);
        impl fmt::Display for Shown<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.1)?;
                if let Some(line) = self.0.line {
                    write!(f, ":{line}")?;
                }
                if let Some(key) = &self.0.key {
                    write!(f, ": {key}")?;
                }
                write!(f, ": {}", self.0.reason)
            }
        }
        Shown(self, origin)
    }
}

/// Reads and validates a node file, without opening the files it names (certificates, token,
/// logs): for files whose [node] section is not this host's, such as `keel config apply`'s.
pub fn load(path: &Path) -> Result<NodeFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates node-file text; `origin` names it in errors. Opens no other file.
pub fn parse(text: &str, origin: &str) -> Result<NodeFile, ConfigError> {
    analyse(text, false).map_err(|problems| ConfigError::Invalid { origin: origin.to_owned(), problems })
}

/// Reads a node file and checks everything `keel run` would refuse, reporting every problem
/// at once: TOML syntax, types and unknown keys (per section, so one bad pool does not hide
/// another), [`Config::validate`]'s invariants, the `[node]`, `[cluster]` and `[vip]` rules,
/// and every file the node would load — each listener's certificate/key pairs (loaded with
/// the listener's own loader, so a key that does not match its certificate is caught), each
/// pool's CA bundle and `server_name`, the admin token (file or variable, at least
/// [`MIN_ADMIN_TOKEN`] characters) and each access log file (its directory must exist and the
/// file must open for appending; nothing is truncated, and a file the check had to create is
/// removed again). Relative paths are taken from the working directory, as `keel run` does.
///
/// This is the one gate before a file is served: `keel config check` and `keel run` call it,
/// and so does a reload of a standalone node. `Ok` holds the file exactly as [`load`] would
/// return it; `Err` is [`ConfigError::Read`] (the file itself is unreadable) or
/// [`ConfigError::Invalid`] with one [`Problem`] per finding (`FILE:LINE: KEY: REASON`).
pub fn load_checked(path: &Path) -> Result<NodeFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse_checked(&text, &path.display().to_string())
}

/// [`load_checked`] on text already read; `origin` names it in errors.
pub fn parse_checked(text: &str, origin: &str) -> Result<NodeFile, ConfigError> {
    analyse(text, true).map_err(|problems| ConfigError::Invalid { origin: origin.to_owned(), problems })
}

/// The top-level tables a node file may have.
const SECTIONS: &[&str] = &["node", "cluster", "vip", "listeners", "pools"];

/// Parses, validates and (with `files`) opens what the node would open; every problem found.
fn analyse(text: &str, files: bool) -> Result<NodeFile, Vec<Problem>> {
    // Every syntax error at once; nothing else is trusted from a document that has one.
    let (document, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        let mut found: Vec<Problem> = syntax.iter().map(|e| toml_problem(text, e)).collect();
        found.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        return Err(found);
    }
    let root = document.get_ref();
    let mut problems = Vec::new();

    // serde stops at a section's first error, so each section (and each listener and pool) is
    // read on its own: one bad pool does not hide a bad listener. A section that does not read
    // is left out below, and checks that would only repeat its failure are skipped.
    let mut node: Option<NodeSettings> = None;
    let mut cluster: Option<ClusterSection> = None;
    let mut vip = None;
    let mut node_failed = false;
    let mut cluster_failed = false;
    let mut failed_listeners = false;
    let mut failed_pools = Vec::new();
    let mut listeners = std::collections::BTreeMap::new();
    let mut pools = std::collections::BTreeMap::new();
    for (key, value) in root.iter() {
        let name: &str = key.get_ref().as_ref();
        let at = KeyPath::of(&[name]);
        match name {
            "node" => {
                node = section(text, value, &at, &mut problems);
                node_failed = node.is_none();
            }
            "cluster" => {
                cluster = section(text, value, &at, &mut problems);
                cluster_failed = cluster.is_none();
            }
            "vip" => vip = section::<VipSection>(text, value, &at, &mut problems),
            "listeners" | "pools" => {
                let DeValue::Table(table) = value.get_ref() else {
                    problems.push(Problem {
                        line: Some(line_of(text, value.span().start)),
                        key: Some(name.to_owned()),
                        reason: format!("must be a table of named {name}, e.g. [{name}.web]"),
                    });
                    continue;
                };
                for (entry, value) in table.iter() {
                    let entry: &str = entry.get_ref().as_ref();
                    let at = KeyPath::of(&[name, entry]);
                    if name == "listeners" {
                        match section::<Listener>(text, value, &at, &mut problems) {
                            Some(l) => drop(listeners.insert(entry.to_owned(), l)),
                            None => failed_listeners = true,
                        }
                    } else {
                        match section::<Pool>(text, value, &at, &mut problems) {
                            Some(p) => drop(pools.insert(entry.to_owned(), p)),
                            None => failed_pools.push(entry.to_owned()),
                        }
                    }
                }
            }
            other => problems.push(Problem {
                line: Some(line_of(text, key.span().start)),
                key: Some(other.to_owned()),
                reason: format!("unknown section {other:?} (expected one of: {})", SECTIONS.join(", ")),
            }),
        }
    }
    let node: NodeSettings = node.unwrap_or_default();
    let at = |path: &[&str]| locate(text, root, &KeyPath::of(path));

    if !node_failed {
        node_problems(&node, &at, &mut problems);
    }
    if let Some(c) = &cluster {
        let mut cluster_problem = |key: &str, reason: String| {
            problems.push(Problem { line: at(&["cluster", key]), key: Some(format!("cluster.{key}")), reason })
        };
        if c.node_id == 0 {
            cluster_problem("node_id", "must be at least 1".into());
        }
        let (hb, min, max) = c.timings();
        if let Some((key, why)) = keel_cluster::node::timing_problem(hb, min, max) {
            cluster_problem(key, why);
        }
        if c.cluster_id.is_empty() {
            cluster_problem("cluster_id", "must not be empty".into());
        }
    }
    if let Some(v) = &vip {
        if !cluster_failed && cluster.as_ref().is_none_or(|c| c.witness) {
            problems.push(Problem {
                line: at(&["vip", "address"]),
                key: Some("vip".into()),
                reason: "a VIP follows cluster leadership: it needs a [cluster] section on a data node (not a witness)"
                    .into(),
            });
        }
        let mut vip_problem = |key: &str, reason: String| {
            problems.push(Problem { line: at(&["vip", key]), key: Some(format!("vip.{key}")), reason })
        };
        match (&v.address, v.addresses.as_slice()) {
            (Some(_), [_, ..]) => vip_problem(
                "addresses",
                "set either address (the leader's one VIP) or addresses (VIPs spread over the nodes), not both".into(),
            ),
            (None, []) => vip_problem("address", "missing: set address or addresses".into()),
            (None, list) => {
                let mut seen = std::collections::BTreeSet::new();
                if let Some(dup) = list.iter().find(|a| !seen.insert(**a)) {
                    vip_problem("addresses", format!("{dup} is listed twice"));
                }
                if list.len() > keel_cluster::vips::MAX_VIPS {
                    vip_problem(
                        "addresses",
                        format!("{} addresses; at most {}", list.len(), keel_cluster::vips::MAX_VIPS),
                    );
                }
            }
            (Some(_), []) => {}
        }
        if v.preempt && v.addresses.is_empty() {
            vip_problem("preempt", "only means something with addresses".into());
        }
        if v.interface.is_empty() {
            problems.push(Problem {
                line: at(&["vip", "interface"]),
                key: Some("vip.interface".into()),
                reason: "empty".into(),
            });
        }
        if v.arp_count == 0 {
            problems.push(Problem {
                line: at(&["vip", "arp_count"]),
                key: Some("vip.arp_count".into()),
                reason: "must be at least 1".into(),
            });
        }
    }

    let config = Config { listeners, pools };
    // In cluster mode the file's listeners and pools are an optional seed: an empty one is fine.
    let clustered = cluster.is_some() || cluster_failed;
    let seedless = clustered && config.listeners.is_empty() && config.pools.is_empty();
    if let Err(found) = config.validate() {
        let echoes = |p: &keel_cluster::ConfigProblem| {
            seedless
                || (failed_listeners && p.path == KeyPath::of(&["listeners"]))
                || names_failed_pool(&config, &p.path, &failed_pools)
        };
        problems.extend(found.into_iter().filter(|p| !echoes(p)).map(|p| Problem {
            line: locate(text, root, &p.path),
            key: Some(p.path.to_string()),
            reason: p.reason,
        }));
    }
    if files {
        file_problems(text, root, &node, node_failed, &config, &mut problems);
    }
    if problems.is_empty() {
        Ok(NodeFile { node, cluster, vip, config })
    } else {
        problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        Err(problems)
    }
}

/// The rules of `[node]` that span its keys.
fn node_problems(node: &NodeSettings, at: &dyn Fn(&[&str]) -> Option<usize>, problems: &mut Vec<Problem>) {
    if node.workers > MAX_WORKERS {
        problems.push(Problem {
            line: at(&["node", "workers"]),
            key: Some("node.workers".into()),
            reason: format!("{} worker threads is above the maximum of {MAX_WORKERS}", node.workers),
        });
    }
    if !node.admin.ip().is_loopback() && node.admin_token_file.is_none() && node.admin_token_env.is_none() {
        problems.push(Problem {
            line: at(&["node", "admin"]),
            key: Some("node.admin".into()),
            reason: format!(
                "the admin API on {} is reachable from other hosts; set node.admin_token_file or node.admin_token_env, \
                 or keep it on loopback",
                node.admin
            ),
        });
    }
    if node.resolve_timeout.get().is_zero() {
        problems.push(Problem {
            line: at(&["node", "resolve_timeout"]),
            key: Some("node.resolve_timeout".into()),
            reason: "must be greater than zero".into(),
        });
    }
    if node.admin_token_file.is_some() && node.admin_token_env.is_some() {
        problems.push(Problem {
            line: at(&["node", "admin_token_env"]),
            key: Some("node.admin_token_env".into()),
            reason: "set admin_token_file or admin_token_env, not both".into(),
        });
    }
}

/// Whether `path` is a listener's or route's reference to a pool that failed to read: the
/// pool's own problem is reported, "not defined" would only echo it.
fn names_failed_pool(config: &Config, path: &KeyPath, failed: &[String]) -> bool {
    use PathSegment::{Index, Key};
    let named = match path.0.as_slice() {
        [Key(l), Key(name), Key(k)] if l == "listeners" && k == "default_pool" => {
            config.listeners.get(name).and_then(|l| l.default_pool.as_ref())
        }
        [Key(l), Key(name), Key(r), Index(i), Key(k)] if l == "listeners" && r == "routes" && k == "pool" => {
            config.listeners.get(name).and_then(|l| l.routes.get(*i)).map(|r| &r.pool)
        }
        _ => None,
    };
    named.is_some_and(|pool| failed.contains(pool))
}

/// Deserializes one section; on failure records a problem naming the key and value at fault.
fn section<T: serde::de::DeserializeOwned>(
    text: &str,
    value: &toml::Spanned<DeValue<'_>>,
    at: &KeyPath,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match T::deserialize(toml::de::ValueDeserializer::from(value.clone())) {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(serde_problem(text, value, at, &e));
            None
        }
    }
}

/// A serde/toml error inside the section at `at`, placed at the deepest key whose key or value
/// holds the error's span, with the offending value quoted when the error is about a value.
fn serde_problem(text: &str, value: &toml::Spanned<DeValue<'_>>, at: &KeyPath, e: &toml::de::Error) -> Problem {
    let message = e.message().trim_end().replace('\n', "; ").replace('`', "\"");
    let Some(span) = e.span() else {
        return Problem { line: None, key: Some(at.to_string()), reason: message };
    };
    let mut best = (at.clone(), None);
    if value.span() == span && !matches!(value.get_ref(), DeValue::Table(_) | DeValue::Array(_)) {
        best.1 = Some(value.span());
    }
    deepest(value, at, &span, &mut best);
    let (path, scalar) = best;
    let shown = scalar.and_then(|s| text.get(s));
    Problem { line: Some(line_of(text, span.start)), key: Some(path.to_string()), reason: explain(&message, shown) }
}

/// Walks `value` for the deepest key (or array element) whose key or value span holds `span`;
/// records its path, and the value's span when it is a scalar (to quote it).
fn deepest(
    value: &toml::Spanned<DeValue<'_>>,
    path: &KeyPath,
    span: &std::ops::Range<usize>,
    best: &mut (KeyPath, Option<std::ops::Range<usize>>),
) {
    let holds = |s: std::ops::Range<usize>| s.start <= span.start && span.end <= s.end;
    let mut visit = |child: KeyPath, key_span: Option<std::ops::Range<usize>>, v: &toml::Spanned<DeValue<'_>>| {
        let scalar = !matches!(v.get_ref(), DeValue::Table(_) | DeValue::Array(_));
        let on_value = holds(v.span());
        if (on_value || key_span.is_some_and(holds)) && child.0.len() > best.0 .0.len() {
            *best = (child.clone(), (on_value && scalar).then(|| v.span()));
        }
        deepest(v, &child, span, best);
    };
    match value.get_ref() {
        DeValue::Table(t) => {
            for (k, v) in t.iter() {
                let mut child = path.clone();
                child.0.push(PathSegment::Key(k.get_ref().to_string()));
                visit(child, Some(k.span()), v);
            }
        }
        DeValue::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let mut child = path.clone();
                child.0.push(PathSegment::Index(i));
                visit(child, None, v);
            }
        }
        _ => {}
    }
}

/// serde's message, with the value it is about when the message does not already show it.
fn explain(message: &str, value: Option<&str>) -> String {
    let Some(value) = value else { return message.to_owned() };
    // A socket address field: say what shape is wanted (the parser only says "syntax").
    if message == "invalid socket address syntax" {
        return format!("{value} is not IP:PORT (invalid socket address syntax)");
    }
    if message.contains(value.trim_matches('"')) {
        message.to_owned()
    } else {
        format!("{value}: {message}")
    }
}

/// Opens every file the node would open at start, and records what fails, at its key.
fn file_problems(
    text: &str,
    root: &DeTable<'_>,
    node: &NodeSettings,
    node_failed: bool,
    config: &Config,
    problems: &mut Vec<Problem>,
) {
    let mut report = |path: KeyPath, reason: String| {
        problems.push(Problem { line: locate(text, root, &path), key: Some(path.to_string()), reason })
    };
    if !node_failed {
        if let Err(e) = node.read_admin_token() {
            let (key, reason) = match (&e, &node.admin_token_file, &node.admin_token_env) {
                (AdminTokenError::Read { path, source }, _, _) => {
                    ("admin_token_file", format!("{path:?}: {}", io_reason(source)))
                }
                (AdminTokenError::Unset { var }, _, _) => ("admin_token_env", format!("{var:?} is not set")),
                (AdminTokenError::TooShort, Some(path), _) => {
                    ("admin_token_file", format!("{path:?}: the token is shorter than {MIN_ADMIN_TOKEN} characters"))
                }
                (AdminTokenError::TooShort, None, Some(var)) => {
                    ("admin_token_env", format!("{var:?}: the token is shorter than {MIN_ADMIN_TOKEN} characters"))
                }
                (AdminTokenError::TooShort, None, None) => ("admin_token_file", e.to_string()),
            };
            report(KeyPath::of(&["node", key]), reason);
        }
    }
    for (name, listener) in &config.listeners {
        let at = |keys: &[&str]| {
            let mut p = KeyPath::of(&["listeners", name]);
            p.0.extend(keys.iter().map(|k| PathSegment::Key((*k).to_owned())));
            p
        };
        if let (Protocol::Https, Some(tls)) = (listener.protocol, &listener.tls) {
            for (i, e) in crate::tls::check_certificates(&tls.certificates) {
                let mut path = at(&["tls", "certificates"]);
                path.0.push(PathSegment::Index(i));
                let (file, reason) = tls_reason(&e);
                let pair = &tls.certificates[i];
                match file {
                    Some(f) if f == pair.key => path.0.push(PathSegment::Key("key".into())),
                    Some(f) if f == pair.cert => path.0.push(PathSegment::Key("cert".into())),
                    _ => {}
                }
                report(path, reason);
            }
        }
        if let Some(log) = &listener.access_log {
            if let Err(reason) = check_log_destination(&log.destination) {
                report(at(&["access_log", "destination"]), reason);
            }
        }
    }
    for (name, pool) in &config.pools {
        if let Some(tls) = &pool.tls {
            if let Err(e) = crate::tls::UpstreamTls::new(tls) {
                let (file, reason) = tls_reason(&e);
                let key = match (&e, file) {
                    (crate::tls::TlsError::BadServerName { .. }, _) => Some("server_name"),
                    (_, Some(f)) if tls.ca.as_deref() == Some(f) => Some("ca"),
                    _ => None,
                };
                let mut path = KeyPath::of(&["pools", name, "tls"]);
                path.0.extend(key.map(|k| PathSegment::Key(k.to_owned())));
                report(path, reason);
            }
        }
    }
}

/// A TLS loading error as "PATH: what is wrong", and the file it is about.
fn tls_reason(e: &crate::tls::TlsError) -> (Option<&Path>, String) {
    use crate::tls::TlsError as E;
    match e {
        E::Read { path, source } => (Some(path), format!("{path:?}: {}", io_reason(source))),
        E::Pem { path, reason } => (Some(path), format!("{path:?}: invalid PEM: {reason}")),
        E::NoCertificate { path } => (Some(path), format!("{path:?}: no certificate in the file")),
        E::BadCertificate { path, reason } => (Some(path), format!("{path:?}: invalid certificate: {reason}")),
        E::NoPrivateKey { path } => (Some(path), format!("{path:?}: no private key in the file")),
        E::UnsupportedKey { path, reason } => (Some(path), format!("{path:?}: unsupported private key: {reason}")),
        E::KeyMismatch { cert, key } => {
            (Some(key), format!("{key:?}: private key does not match the certificate in {cert:?}"))
        }
        E::NoNames { path } => (
            Some(path),
            format!("{path:?}: certificate has no DNS name (SAN or CN); only the first certificate may lack one"),
        ),
        other => (None, other.to_string()),
    }
}

/// An I/O error in the words an operator expects next to a path.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::IsADirectory => "is a directory, not a file".into(),
        _ => format!("cannot read: {e}"),
    }
}

/// Whether an access log destination would open at start: "stdout", or a file in an existing
/// directory that opens for appending. The file is opened the way the log opens it (append,
/// never truncated); if the check had to create it, it removes it again.
fn check_log_destination(destination: &str) -> Result<(), String> {
    // Only files are opened here: stdout always is, a syslog receiver may come and go (lines
    // are dropped and counted meanwhile), and a malformed value is validate's to report.
    match keel_cluster::model::Destination::parse(destination) {
        Ok(keel_cluster::model::Destination::File(_)) => {}
        _ => return Ok(()),
    }
    let path = Path::new(destination);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("{destination:?}: {dir:?} is not a directory")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{destination:?}: directory {dir:?} does not exist"))
            }
            Err(e) => return Err(format!("{destination:?}: directory {dir:?}: {}", io_reason(&e))),
        }
    }
    let existed = path.exists();
    match std::fs::OpenOptions::new().create(true).append(true).open(path) {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(e) => Err(format!("{destination:?}: cannot open for appending: {}", io_reason(&e))),
    }
}

fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    Problem {
        line: e.span().map(|s| line_of(text, s.start)),
        key: None,
        reason: e.message().trim_end().replace('\n', "; "),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Keys renamed whose old name still reads: (new, old).
const KEY_ALIASES: &[(&str, &str)] = &[("response_timeout", "request_timeout")];

/// The line where `path` is written, or the nearest enclosing key that is written (a missing
/// key is best shown at the table that lacks it).
fn locate(text: &str, root: &DeTable<'_>, path: &KeyPath) -> Option<usize> {
    let mut table = Some(root);
    let mut array: Option<&[toml::Spanned<DeValue<'_>>]> = None;
    let mut found = None;
    for seg in &path.0 {
        let (span, value) = match seg {
            PathSegment::Key(k) => {
                // A key may be written under its old name (serde's alias).
                let old = KEY_ALIASES.iter().find(|(new, _)| new == k).map(|(_, old)| *old);
                let named = |key: &str| key == k || Some(key) == old;
                let Some((key, value)) = table.and_then(|t| t.iter().find(|(key, _)| named(key.get_ref().as_ref())))
                else {
                    return found;
                };
                (key.span(), value)
            }
            PathSegment::Index(i) => {
                let Some(value) = array.and_then(|a| a.get(*i)) else { return found };
                (value.span(), value)
            }
        };
        found = Some(line_of(text, span.start));
        table = None;
        array = None;
        match value.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(a) => array = Some(&a[..]),
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        match parse(text, "k.toml") {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems, origin }) => {
                problems.iter().map(|p| p.display_with(&origin).to_string()).collect()
            }
            Err(e) => vec![e.to_string()],
        }
    }

    const BASE: &str = "[listeners.web]\nbind = \"127.0.0.1:8080\"\ndefault_pool = \"app\"\n\n[pools.app]\n\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n";

    #[test]
    fn a_valid_file_parses_with_node_defaults() {
        let file = parse(BASE, "k.toml").expect("valid");
        assert_eq!(file.node, NodeSettings::default());
        assert_eq!(file.config.pools["app"].servers.len(), 1);
    }

    #[test]
    fn cluster_profiles_set_timings_and_explicit_keys_override_them() {
        let cluster = |extra: &str| {
            let text = format!("[cluster]\nnode_id = 1\nraft = \"127.0.0.1:7000\"\ndata_dir = \"d\"\n{extra}\n{BASE}");
            parse(&text, "k.toml").expect("valid").cluster.expect("a cluster section")
        };
        let ms = Duration::from_millis;
        assert_eq!(cluster("").timings(), Profile::Default.timings());
        assert_eq!(cluster("profile = \"fast\"").timings(), (ms(10), ms(30), ms(40)));
        assert_eq!(cluster("profile = \"fast\"\nelection_max = \"120ms\"").timings(), (ms(10), ms(30), ms(120)));
        // The Raft thread runs under real-time scheduling unless switched off.
        assert!(cluster("").realtime);
        assert!(!cluster("realtime = false").realtime);
        let text =
            format!("[cluster]\nnode_id = 1\nraft = \"127.0.0.1:7000\"\ndata_dir = \"d\"\nprofile = \"quick\"\n{BASE}");
        assert!(
            problems(&text)[0].starts_with("k.toml:5: cluster.profile: unknown variant \"quick\""),
            "{:?}",
            problems(&text)
        );
        // A heartbeat too long for the profile's election timeout is refused at its line.
        let text = format!("[cluster]\nnode_id = 1\nraft = \"127.0.0.1:7000\"\ndata_dir = \"d\"\nprofile = \"fast\"\nheartbeat = \"20ms\"\n{BASE}");
        let found = problems(&text);
        assert!(
            found[0].starts_with("k.toml:6: cluster.heartbeat: must be above zero and at most a third"),
            "{found:?}"
        );
    }

    #[test]
    fn validation_problems_carry_line_and_key() {
        let text = BASE.replace("default_pool = \"app\"", "default_pool = \"nope\"");
        assert_eq!(
            problems(&text),
            ["k.toml:3: listeners.web.default_pool: pool \"nope\" is not defined (defined: app)"]
        );
    }

    #[test]
    fn array_elements_are_located() {
        let text = format!("{BASE}weight = 0\n\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9002\"\n");
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("k.toml:10: pools.app.servers[0].weight: weight 0"), "{found:?}");
        assert!(found[1].starts_with("k.toml:13: pools.app.servers[1].name: duplicate"), "{found:?}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_line() {
        let found = problems(&BASE.replace("[pools.app]\n", "[pools.app]\nalgoritm = \"random\"\n"));
        assert!(found[0].starts_with("k.toml:6: pools.app.algoritm: unknown field \"algoritm\""), "{found:?}");
        let found = problems(&BASE.replace("127.0.0.1:9001", "127.0.0.1:90x"));
        assert_eq!(
            found,
            ["k.toml:9: pools.app.servers[0].address: \"127.0.0.1:90x\" is not HOST:PORT (an IP address or a DNS \
                 name, and a port 1-65535)"]
        );
        let found = problems(&BASE.replace("127.0.0.1:9001", "app.internal:9001"));
        assert!(found.is_empty(), "a DNS name is an address: {found:?}");
        let found = problems(&format!("[node]\nresolvers = [\"127.0.0.1:5353\"]\nresolve_timeout = \"0s\"\n{BASE}"));
        assert!(found[0].starts_with("k.toml:3: node.resolve_timeout: must be greater than zero"), "{found:?}");
        let found = problems(&format!("{BASE}[pools.app.health]\ninterval = \"5\"\n"));
        assert!(found[0].starts_with("k.toml:11: pools.app.health.interval: invalid duration \"5\""), "{found:?}");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let found = problems("[node]\nadmin = \n");
        assert!(found[0].starts_with("k.toml:2: "), "{found:?}");
        // Every one of them.
        let found = problems("[node]\nadmin = \n[pools.app\nworkers = 1\n");
        assert!(found.len() >= 2 && found[1].starts_with("k.toml:3: "), "{found:?}");
    }

    #[test]
    fn missing_key_is_shown_at_its_table() {
        let found = problems("[listeners.web]\nbind = \"127.0.0.1:1\"\n[pools.app]\n");
        assert!(found.iter().any(|p| p == "k.toml:3: pools.app: missing field \"servers\""), "{found:?}");
    }

    #[test]
    fn each_section_reports_its_own_type_error_and_references_to_it_are_not_echoed() {
        let text = format!(
            "{BASE}\n[pools.other]\nretries = \"two\"\n[[pools.other.servers]]\nname = \"o\"\naddress = \"127.0.0.1:1\"\n\
             [listeners.admin2]\nbind = \"127.0.0.1:8081\"\ndefault_pool = \"other\"\nprotocol = \"htp\"\n"
        );
        let found = problems(&text);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].starts_with("k.toml:12: pools.other.retries: invalid type: string \"two\""), "{found:?}");
        assert!(found[1].starts_with("k.toml:19: listeners.admin2.protocol: unknown variant \"htp\""), "{found:?}");
        // A listener naming a pool that did not read is not also told the pool is undefined.
        let text = BASE.replace("127.0.0.1:9001", "nope");
        assert_eq!(problems(&text).len(), 1, "{:?}", problems(&text));
    }

    #[test]
    fn vip_sections_take_one_address_or_a_spread_list_of_v4_and_v6() {
        let cluster = "[cluster]\nnode_id = 1\nraft = \"127.0.0.1:7000\"\ndata_dir = \"d\"\n";
        let with = |vip: &str| format!("{cluster}[vip]\ninterface = \"eth0\"\n{vip}\n{BASE}");
        let file =
            parse(&with("addresses = [\"10.0.0.101\", \"fd00::101\"]\npreempt = true"), "k.toml").expect("valid");
        let vip = file.vip.expect("a [vip] section");
        assert_eq!(vip.addresses.len(), 2);
        assert!(vip.preempt && vip.address.is_none());
        assert!(parse(&with("address = \"fd00::100\""), "k.toml").is_ok(), "an IPv6 leader VIP");
        let both = problems(&with("address = \"10.0.0.100\"\naddresses = [\"10.0.0.101\"]"));
        assert!(both.iter().any(|p| p.contains("vip.addresses: set either address")), "{both:?}");
        let none = problems(&with(""));
        assert!(none.iter().any(|p| p.contains("vip.address: missing")), "{none:?}");
        let twice = problems(&with("addresses = [\"10.0.0.101\", \"10.0.0.101\"]"));
        assert!(twice.iter().any(|p| p.contains("10.0.0.101 is listed twice")), "{twice:?}");
        let lone = problems(&with("address = \"10.0.0.100\"\npreempt = true"));
        assert!(lone.iter().any(|p| p.contains("vip.preempt")), "{lone:?}");
    }

    #[test]
    fn unknown_sections_are_named() {
        let found = problems(&format!("{BASE}[pool.x]\n"));
        assert_eq!(
            found,
            ["k.toml:10: pool: unknown section \"pool\" (expected one of: node, cluster, vip, listeners, pools)"]
        );
    }

    fn checked(text: &str) -> Vec<String> {
        match parse_checked(text, "k.toml") {
            Ok(_) => vec![],
            Err(ConfigError::Invalid { problems, origin }) => {
                problems.iter().map(|p| p.display_with(&origin).to_string()).collect()
            }
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn checked_parsing_opens_the_token_and_log_files() {
        let dir = std::env::temp_dir().join(format!("keel-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let token = dir.join("token");
        std::fs::write(&token, "short\n").expect("write");
        let log = dir.join("access.log");
        let text = format!(
            "[node]\nadmin_token_file = {token:?}\n{}",
            BASE.replace(
                "default_pool = \"app\"",
                &format!("default_pool = \"app\"\naccess_log = {{ destination = {log:?} }}")
            )
        );
        assert!(parse(&text, "k.toml").is_ok(), "parse opens no file");
        let found = checked(&text);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].starts_with("k.toml:2: node.admin_token_file: "), "{found:?}");
        assert!(found[0].contains("shorter than 16"), "{found:?}");
        std::fs::write(&token, "0123456789abcdef\n").expect("write");
        assert_eq!(checked(&text), Vec::<String>::new());
        assert!(!log.exists(), "the check must not leave a log file behind");
        std::fs::write(&log, "kept\n").expect("write");
        assert_eq!(checked(&text), Vec::<String>::new());
        assert_eq!(std::fs::read_to_string(&log).expect("read"), "kept\n", "never truncated");
        let gone = text.replace("access.log", "missing/access.log");
        let found = checked(&gone);
        assert!(found[0].contains("listeners.web.access_log.destination: ") && found[0].contains("does not exist"));
        std::fs::remove_file(&token).expect("rm");
        let found = checked(&text);
        assert!(found[0].ends_with("\": no such file"), "{found:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
