//! A node's TOML file → the node's own settings plus a validated [`Config`].
//!
//! The file holds two kinds of settings: `[node]` belongs to this process alone (admin address,
//! drain deadline, worker threads), everything else (`[listeners.*]`, `[pools.*]`) is the
//! [`Config`] that the cluster will replicate. Both are read in one pass.
//!
//! Errors name the file, the line and the key. serde stops at the first syntax or type error,
//! so those come one at a time; the invariants that span fields ([`Config::validate`]) are all
//! reported together. Line numbers for the latter come from re-walking the spanned document
//! (`toml::de::DeTable`) along each problem's [`KeyPath`], so the model stays free of spans.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_cluster::model::{Listener, Pool};
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
        let token = match (&self.admin_token_file, &self.admin_token_env) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            (None, Some(var)) => std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?,
            (None, None) => return Ok(None),
        };
        if token.len() < 16 {
            return Err("the admin token must be at least 16 characters".into());
        }
        Ok(Some(token))
    }
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

/// `[vip]`: the virtual IP this node claims while it is the cluster's leader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSection {
    /// The address, IPv4, claimed as a /32.
    pub address: std::net::Ipv4Addr,
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

/// The on-disk shape: `[node]` beside the replicated tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    node: NodeSettings,
    #[serde(default)]
    cluster: Option<ClusterSection>,
    #[serde(default)]
    vip: Option<VipSection>,
    #[serde(default)]
    listeners: std::collections::BTreeMap<String, Listener>,
    #[serde(default)]
    pools: std::collections::BTreeMap<String, Pool>,
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

/// Reads and validates a node file.
pub fn load(path: &Path) -> Result<NodeFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates node-file text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<NodeFile, ConfigError> {
    let invalid = |problems| ConfigError::Invalid { origin: origin.to_owned(), problems };
    let document = DeTable::parse(text).map_err(|e| invalid(vec![toml_problem(text, &e)]))?;
    let raw = RawFile::deserialize(toml::de::Deserializer::from(document.clone()))
        .map_err(|e| invalid(vec![toml_problem(text, &e)]))?;

    let mut problems = Vec::new();
    if raw.node.workers > MAX_WORKERS {
        problems.push(Problem {
            line: locate(text, document.get_ref(), &KeyPath::of(&["node", "workers"])),
            key: Some("node.workers".into()),
            reason: format!("{} worker threads is above the maximum of {MAX_WORKERS}", raw.node.workers),
        });
    }
    if !raw.node.admin.ip().is_loopback() && raw.node.admin_token_file.is_none() && raw.node.admin_token_env.is_none() {
        problems.push(Problem {
            line: locate(text, document.get_ref(), &KeyPath::of(&["node", "admin"])),
            key: Some("node.admin".into()),
            reason: format!(
                "the admin API on {} is reachable from other hosts; set node.admin_token_file or node.admin_token_env, \
                 or keep it on loopback",
                raw.node.admin
            ),
        });
    }
    if raw.node.resolve_timeout.get().is_zero() {
        problems.push(Problem {
            line: locate(text, document.get_ref(), &KeyPath::of(&["node", "resolve_timeout"])),
            key: Some("node.resolve_timeout".into()),
            reason: "must be greater than zero".into(),
        });
    }
    if raw.node.admin_token_file.is_some() && raw.node.admin_token_env.is_some() {
        problems.push(Problem {
            line: locate(text, document.get_ref(), &KeyPath::of(&["node", "admin_token_env"])),
            key: Some("node.admin_token_env".into()),
            reason: "set admin_token_file or admin_token_env, not both".into(),
        });
    }
    if let Some(c) = &raw.cluster {
        let mut cluster_problem = |key: &str, reason: String| {
            problems.push(Problem {
                line: locate(text, document.get_ref(), &KeyPath::of(&["cluster", key])),
                key: Some(format!("cluster.{key}")),
                reason,
            })
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
    if let Some(vip) = &raw.vip {
        let at = |key: &str| locate(text, document.get_ref(), &KeyPath::of(&["vip", key]));
        if raw.cluster.as_ref().is_none_or(|c| c.witness) {
            problems.push(Problem {
                line: at("address"),
                key: Some("vip".into()),
                reason: "a VIP follows cluster leadership: it needs a [cluster] section on a data node (not a witness)"
                    .into(),
            });
        }
        if vip.interface.is_empty() {
            problems.push(Problem { line: at("interface"), key: Some("vip.interface".into()), reason: "empty".into() });
        }
        if vip.arp_count == 0 {
            problems.push(Problem {
                line: at("arp_count"),
                key: Some("vip.arp_count".into()),
                reason: "must be at least 1".into(),
            });
        }
    }
    let config = Config { listeners: raw.listeners, pools: raw.pools };
    // In cluster mode the file's listeners and pools are an optional seed: an empty one is fine.
    let seedless = raw.cluster.is_some() && config.listeners.is_empty() && config.pools.is_empty();
    if let Err(found) = config.validate().map_err(|p| if seedless { Vec::new() } else { p }) {
        problems.extend(found.into_iter().map(|p| Problem {
            line: locate(text, document.get_ref(), &p.path),
            key: Some(p.path.to_string()),
            reason: p.reason,
        }));
    }
    if problems.is_empty() {
        Ok(NodeFile { node: raw.node, cluster: raw.cluster, vip: raw.vip, config })
    } else {
        Err(invalid(problems))
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
                let (key, value) = table?.iter().find(|(key, _)| named(key.get_ref().as_ref()))?;
                (key.span(), value)
            }
            PathSegment::Index(i) => {
                let value = array?.get(*i)?;
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
        assert!(problems(&text)[0].starts_with("k.toml:5: unknown variant `quick`"), "{:?}", problems(&text));
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
        assert!(found[0].starts_with("k.toml:6: unknown field `algoritm`"), "{found:?}");
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
        assert!(found[0].starts_with("k.toml:11: invalid duration \"5\""), "{found:?}");
    }

    #[test]
    fn syntax_errors_name_their_line() {
        let found = problems("[node]\nadmin = \n");
        assert!(found[0].starts_with("k.toml:2: "), "{found:?}");
    }

    #[test]
    fn missing_key_is_shown_at_its_table() {
        let found = problems("[listeners.web]\nbind = \"127.0.0.1:1\"\n[pools.app]\n");
        assert!(found[0].starts_with("k.toml:3: missing field `servers`"), "{found:?}");
    }
}
