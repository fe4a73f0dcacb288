//! The replicated state machine's data: [`ClusterState`] and its pure, deterministic
//! [`ClusterState::apply`].
//!
//! What it holds:
//! - the served [`Config`];
//! - per-server operator overrides (drain, weight) — dropped when a server leaves the config;
//! - health verdicts per (pool, server);
//! - the sticky table ([`StickyTable`]);
//! - who holds each spread VIP ([`VipSlot`], [`crate::vips`]).
//!
//! # Determinism
//!
//! `apply` reads no clock, no randomness and no environment: the time is the proposer's
//! `proposed_at_ms` carried in the log entry, and the log index is openraft's. Two replicas that
//! apply the same entries hold equal states (a proptest checks snapshot round trips and that a
//! rejected command changes nothing).
//!
//! # Health verdict authority: majority of voting observers
//!
//! Every node runs its own checker and reports *its* observation with
//! [`Command::SetServerHealth`] (`reporter` = its node id), typically only on transitions. The
//! state keeps the latest report of each voter per server, and the verdict is **down only while
//! a majority of the current voters report it down**. Why not "the leader's checker decides":
//! one node with a broken NIC or a bad route would eject every healthy backend for the whole
//! cluster, and after a failover the verdicts would flip to the new leader's view. With a
//! majority, one sick observer is outvoted, and a backend that really is down is seen down by
//! everyone within a check interval. Reports from non-voters (learners) are recorded but do not
//! count. When the voter set changes (membership entries), verdicts are recomputed from the
//! remaining voters' reports. With no known voters (unit tests, a state before the first
//! membership entry) the latest single report decides.
//!
//! # Sticky table
//!
//! [`StickyTable`] (its own module, [`crate::sticky_table`]): per pool at most
//! `[pools.NAME.sticky] max_entries` entries, least recently used evicted first; each
//! [`Command::PutStickyBatch`] first drops expired entries, then inserts, then evicts. Reads
//! ignore expired entries even before they are dropped. A config change that lowers a pool's
//! `max_entries` evicts down to it at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::command::{Command, NodeId, Outcome, StickyEntry};
use crate::model::{Config, MAX_WEIGHT};
pub use crate::sticky_table::{PoolSummary, StickyHit, StickyKey, StickyTable, DEFAULT_MAX_ENTRIES};
pub use crate::vips::VipSlot;

/// Operator overrides for one server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerOverride {
    /// Draining: no new requests or sessions.
    pub drain: bool,
    /// Weight replacing the configured one.
    pub weight: Option<u32>,
}

impl ServerOverride {
    fn is_default(&self) -> bool {
        !self.drain && self.weight.is_none()
    }
}

/// The health verdict for one server and the reports it was derived from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthVerdict {
    /// Whether the server is in rotation.
    pub up: bool,
    /// Log index at which the verdict last flipped (or was first recorded).
    pub since: u64,
    /// The reporter whose report (or whose departure) produced the current verdict.
    pub reporter: NodeId,
    /// Latest observation per reporting node: `true` = up.
    pub reports: BTreeMap<NodeId, bool>,
}

/// Everything Raft replicates, as the data plane reads it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The served configuration (empty until the cluster is initialized).
    #[serde(with = "crate::codec::config_field")]
    pub config: Config,
    /// Operator overrides: pool → server → override. Only non-default overrides are stored.
    pub overrides: BTreeMap<String, BTreeMap<String, ServerOverride>>,
    /// Health verdicts: pool → server → verdict. A server without one is up.
    pub health: BTreeMap<String, BTreeMap<String, HealthVerdict>>,
    /// The sticky-session table.
    pub sticky: StickyTable,
    /// Current voters, from the last applied membership: the electorate for health verdicts.
    pub voters: BTreeSet<NodeId>,
    /// The spread VIPs (`[vip] addresses`) and who holds each.
    #[serde(default)]
    pub vips: BTreeMap<IpAddr, VipSlot>,
}

/// One pool's replicated sticky table, for metrics and the dashboard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StickyTableFigures {
    /// Entries held (expired ones not yet dropped included).
    pub entries: u64,
    /// The pool's bound (`max_entries`).
    pub max_entries: u64,
    /// Entries evicted for the bound since the table began.
    pub evictions: u64,
}

impl ClusterState {
    /// The most sticky entries `pool` keeps: its `max_entries`, else [`DEFAULT_MAX_ENTRIES`].
    pub fn sticky_limit(&self, pool: &str) -> u64 {
        self.config.pools.get(pool).and_then(|p| p.sticky.as_ref()).map_or(DEFAULT_MAX_ENTRIES, |s| s.max_entries())
    }

    /// Per pool, its replicated sticky table's size, bound and evictions: every pool that holds
    /// an entry or is configured with `store = "raft"` (at 0 before its first binding), as
    /// `/metrics` and the dashboard show them.
    pub fn sticky_tables(&self) -> BTreeMap<String, StickyTableFigures> {
        let mut pools = self.sticky.summary();
        for (name, pool) in &self.config.pools {
            if pool.sticky.as_ref().is_some_and(|st| st.store() == crate::sticky_config::StickyStore::Raft) {
                pools.entry(name.clone()).or_default();
            }
        }
        pools
            .into_iter()
            .map(|(name, p)| {
                let max_entries = self.sticky_limit(&name);
                (name, StickyTableFigures { entries: p.entries, max_entries, evictions: p.evictions })
            })
            .collect()
    }

    /// Whether `pool` has a server named `server` in the config: a configured one, or one a
    /// DNS entry of the pool resolved to (`ENTRY@IP:PORT`, named the same on every node).
    pub fn has_server(&self, pool: &str, server: &str) -> bool {
        self.config.pools.get(pool).is_some_and(|p| p.entry(server).is_some())
    }

    /// Whether the server is in rotation by health (no verdict = up).
    pub fn is_up(&self, pool: &str, server: &str) -> bool {
        self.health.get(pool).and_then(|m| m.get(server)).is_none_or(|v| v.up)
    }

    /// Whether an operator drains the server.
    pub fn is_draining(&self, pool: &str, server: &str) -> bool {
        self.overrides.get(pool).and_then(|m| m.get(server)).is_some_and(|o| o.drain)
    }

    /// The weight to balance with: the override if any, else the configured weight.
    pub fn effective_weight(&self, pool: &str, server: &str) -> Option<u32> {
        let configured = self.config.pools.get(pool)?.entry(server)?.weight;
        Some(self.overrides.get(pool).and_then(|m| m.get(server)).and_then(|o| o.weight).unwrap_or(configured))
    }

    /// Applies one command proposed at `now_ms`, committed at log `index`. Pure and
    /// deterministic; a rejected command leaves `self` unchanged.
    pub fn apply(&mut self, cmd: &Command, index: u64, now_ms: u64) -> Outcome {
        match cmd {
            Command::ApplyConfig(config) => self.apply_config(config),
            Command::SetServerHealth { pool, server, up, reporter } => {
                self.set_health(pool, server, *up, *reporter, index)
            }
            Command::DrainServer { pool, server, drain } => {
                self.set_override(pool, server, |o| std::mem::replace(&mut o.drain, *drain) != *drain)
            }
            Command::SetServerWeight { pool, server, weight } => {
                if *weight == 0 || *weight > MAX_WEIGHT {
                    return rejected(format!("weight {weight} is out of range 1-{MAX_WEIGHT}"));
                }
                let w = Some(*weight);
                self.set_override(pool, server, |o| std::mem::replace(&mut o.weight, w) != w)
            }
            Command::PutStickyBatch(entries) => self.put_sticky(entries, now_ms),
            Command::Noop => Outcome::Applied { changed: false },
            Command::SetVipHolder { vip, holder, move_to } => self.set_vip_holder(*vip, *holder, *move_to, index),
        }
    }

    fn set_vip_holder(&mut self, vip: IpAddr, holder: Option<NodeId>, move_to: Option<NodeId>, index: u64) -> Outcome {
        let current = self.vips.get(&vip).cloned().unwrap_or_default();
        let mut next = current.clone();
        match holder {
            None => {
                if let Some(old) = next.holder.take() {
                    next.released_by = Some(old);
                    next.suspended_at = index;
                }
                next.move_to = move_to;
            }
            Some(node) => {
                if let Some(old) = current.holder.filter(|&old| old != node) {
                    return rejected(format!(
                        "VIP {vip} is held by node {old}: it must be suspended (and its lease run out) before node {node} takes it"
                    ));
                }
                if !self.voters.is_empty() && !self.voters.contains(&node) {
                    return rejected(format!("node {node} is not a voter of this cluster: it cannot hold VIP {vip}"));
                }
                next.holder = Some(node);
                next.move_to = None;
            }
        }
        let changed = self.vips.get(&vip) != Some(&next);
        self.vips.insert(vip, next);
        Outcome::Applied { changed }
    }

    fn apply_config(&mut self, config: &Config) -> Outcome {
        if let Err(reason) = Command::ApplyConfig(config.clone()).precheck() {
            return rejected(reason);
        }
        if *config == self.config {
            return Outcome::Applied { changed: false };
        }
        let old = std::mem::replace(&mut self.config, config.clone());
        let cfg = &self.config;
        let exists = |pool: &str, server: &str| cfg.pools.get(pool).is_some_and(|p| p.entry(server).is_some());
        for (pool, servers) in self.overrides.iter_mut() {
            servers.retain(|s, _| exists(pool, s));
        }
        self.overrides.retain(|_, m| !m.is_empty());
        for (pool, servers) in self.health.iter_mut() {
            servers.retain(|s, _| exists(pool, s));
        }
        self.health.retain(|_, m| !m.is_empty());
        // Every binding names a server of the config it was stored under (`put_sticky` checks),
        // so only pools that lost a server need a scan — not the whole table per config change.
        for (name, pool) in &old.pools {
            if pool.servers.iter().any(|s| !exists(name, &s.name)) {
                self.sticky.forget_servers(name, |server| !exists(name, server));
            }
        }
        // A lowered bound holds from this entry on.
        for pool in self.sticky.pool_names() {
            let limit = self.sticky_limit(&pool);
            self.sticky.shrink_pool(&pool, limit);
        }
        Outcome::Applied { changed: true }
    }

    fn unknown(&self, pool: &str, server: &str) -> Option<Outcome> {
        if self.has_server(pool, server) {
            None
        } else if !self.config.pools.contains_key(pool) {
            Some(rejected(format!("pool {pool:?} is not in the config")))
        } else {
            Some(rejected(format!("server {server:?} is not in pool {pool:?}")))
        }
    }

    fn set_override(&mut self, pool: &str, server: &str, change: impl FnOnce(&mut ServerOverride) -> bool) -> Outcome {
        if let Some(r) = self.unknown(pool, server) {
            return r;
        }
        let servers = self.overrides.entry(pool.to_owned()).or_default();
        let o = servers.entry(server.to_owned()).or_default();
        let changed = change(o);
        if o.is_default() {
            servers.remove(server);
        }
        if servers.is_empty() {
            self.overrides.remove(pool);
        }
        Outcome::Applied { changed }
    }

    fn set_health(&mut self, pool: &str, server: &str, up: bool, reporter: NodeId, index: u64) -> Outcome {
        if let Some(r) = self.unknown(pool, server) {
            return r;
        }
        let voters = &self.voters;
        let servers = self.health.entry(pool.to_owned()).or_default();
        let v = servers.entry(server.to_owned()).or_insert_with(|| HealthVerdict {
            up: true,
            since: index,
            reporter,
            reports: BTreeMap::new(),
        });
        let before = v.clone();
        v.reports.insert(reporter, up);
        let verdict = verdict_of(&v.reports, voters, up);
        if verdict != v.up {
            v.up = verdict;
            v.since = index;
            v.reporter = reporter;
        }
        Outcome::Applied { changed: *v != before }
    }

    /// Records the voter set of a newly applied membership and recomputes verdicts with it.
    /// Returns whether anything changed.
    pub fn set_voters(&mut self, voters: BTreeSet<NodeId>, index: u64) -> bool {
        if voters == self.voters {
            return false;
        }
        self.voters = voters;
        for servers in self.health.values_mut() {
            for v in servers.values_mut() {
                let verdict = verdict_of(&v.reports, &self.voters, v.up);
                if verdict != v.up {
                    v.up = verdict;
                    v.since = index;
                }
            }
        }
        true
    }

    fn put_sticky(&mut self, entries: &[StickyEntry], now_ms: u64) -> Outcome {
        if entries.len() > crate::command::MAX_STICKY_BATCH {
            return rejected(format!("sticky batch of {} entries is too large", entries.len()));
        }
        let mut evicted = self.sticky.prune(now_ms);
        let (mut stored, mut skipped) = (0, 0);
        let mut touched: Vec<&str> = Vec::new();
        for e in entries {
            if e.expires_at_ms <= now_ms || !self.has_server(&e.pool, &e.server) {
                skipped += 1;
                continue;
            }
            self.sticky.put(&e.pool, &e.key, &e.server, e.expires_at_ms, now_ms);
            if !touched.contains(&e.pool.as_str()) {
                touched.push(&e.pool);
            }
            stored += 1;
        }
        for pool in touched {
            evicted += self.sticky.shrink_pool(pool, self.sticky_limit(pool));
        }
        Outcome::StickyStored { stored, skipped, evicted }
    }
}

/// Down only while a majority of voters report down; with no voters known, the latest report
/// (`latest`) decides.
fn verdict_of(reports: &BTreeMap<NodeId, bool>, voters: &BTreeSet<NodeId>, latest: bool) -> bool {
    if voters.is_empty() {
        return latest;
    }
    let down = voters.iter().filter(|id| reports.get(id) == Some(&false)).count();
    down <= voters.len() / 2
}

fn rejected(reason: String) -> Outcome {
    Outcome::Rejected { reason }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn config(servers: &[&str]) -> Config {
        let list: Vec<String> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| format!(r#"{{"name":"{s}","address":"127.0.0.1:{}"}}"#, 9000 + i))
            .collect();
        serde_json::from_str(&format!(
            r#"{{"listeners":{{"web":{{"bind":"127.0.0.1:8080","default_pool":"app"}}}},
                "pools":{{"app":{{"servers":[{}]}}}}}}"#,
            list.join(",")
        ))
        .unwrap()
    }

    /// `config(servers)` with a source_ip sticky table of at most `max` entries.
    fn limited(servers: &[&str], max: u64) -> Config {
        let mut c = config(servers);
        let sticky = serde_json::json!({"mode": "source_ip", "max_entries": max});
        c.pools.get_mut("app").unwrap().sticky = Some(serde_json::from_value(sticky).unwrap());
        c
    }

    fn with(servers: &[&str]) -> ClusterState {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&Command::ApplyConfig(config(servers)), 1, 0), Outcome::Applied { changed: true });
        s
    }

    fn health(server: &str, up: bool, reporter: NodeId) -> Command {
        Command::SetServerHealth { pool: "app".into(), server: server.into(), up, reporter }
    }

    fn sticky(key: &str, server: &str, exp: u64) -> StickyEntry {
        StickyEntry { pool: "app".into(), key: key.into(), server: server.into(), expires_at_ms: exp }
    }

    #[test]
    fn a_vip_moves_only_through_a_suspension_and_only_to_a_voter() {
        let vip: IpAddr = "10.0.0.100".parse().unwrap();
        let hold = |h: Option<NodeId>, to: Option<NodeId>| Command::SetVipHolder { vip, holder: h, move_to: to };
        let mut s = ClusterState { voters: [1, 2, 3].into(), ..Default::default() };
        assert_eq!(s.apply(&hold(Some(1), None), 5, 0), Outcome::Applied { changed: true });
        assert_eq!(s.apply(&hold(Some(1), None), 6, 0), Outcome::Applied { changed: false });
        let before = s.clone();
        assert!(s.apply(&hold(Some(2), None), 7, 0).is_rejected(), "a holder replaced without a suspension");
        assert!(s.apply(&hold(Some(9), None), 7, 0).is_rejected(), "a non-voter named");
        assert_eq!(s, before, "a rejected command changed the state");
        assert_eq!(s.apply(&hold(None, Some(3)), 8, 0), Outcome::Applied { changed: true });
        assert_eq!(
            s.vips[&vip],
            VipSlot { holder: None, released_by: Some(1), suspended_at: 8, move_to: Some(3) },
            "the suspension records who let go, when, and where it goes next"
        );
        assert_eq!(s.apply(&hold(Some(3), None), 9, 0), Outcome::Applied { changed: true });
        assert_eq!(s.vips[&vip].holder, Some(3));
        assert_eq!(s.vips[&vip].move_to, None);
    }

    #[test]
    fn servers_resolved_from_a_dns_entry_take_verdicts_drains_and_weights() {
        let mut cfg = config(&["a"]);
        let named: crate::model::Server =
            serde_json::from_str(r#"{"name":"web","address":"web.internal:80","weight":4}"#).unwrap();
        cfg.pools.get_mut("app").unwrap().servers.push(named);
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&Command::ApplyConfig(cfg.clone()), 1, 0), Outcome::Applied { changed: true });
        let resolved = "web@10.0.0.5:80";
        assert!(s.has_server("app", resolved));
        assert!(!s.has_server("app", "a@10.0.0.5:80"), "an IP-literal entry resolves to nothing");
        assert!(!s.has_server("app", "web"), "the entry itself is no server");
        assert_eq!(s.effective_weight("app", resolved), Some(4));
        assert!(!s.apply(&health(resolved, false, 1), 2, 0).is_rejected());
        assert!(!s.is_up("app", resolved));
        // The entry leaves the config: its resolved servers' verdicts go with it.
        s.apply(&Command::ApplyConfig(config(&["a"])), 3, 0);
        assert!(s.health.is_empty());
    }

    #[test]
    fn invalid_config_is_rejected_and_changes_nothing() {
        let mut s = with(&["a"]);
        let before = s.clone();
        let out = s.apply(&Command::ApplyConfig(Config::default()), 2, 0);
        assert!(out.is_rejected(), "{out:?}");
        assert_eq!(s, before);
    }

    #[test]
    fn removed_servers_lose_verdicts_overrides_and_sessions() {
        let mut s = with(&["a", "b"]);
        s.apply(&health("b", false, 1), 2, 0);
        s.apply(&Command::DrainServer { pool: "app".into(), server: "b".into(), drain: true }, 3, 0);
        s.apply(&Command::PutStickyBatch(vec![sticky("k1", "a", 100), sticky("k2", "b", 100)]), 4, 0);
        assert!(!s.is_up("app", "b"));
        s.apply(&Command::ApplyConfig(config(&["a"])), 5, 0);
        assert!(s.health.is_empty() && s.overrides.is_empty());
        assert_eq!(s.sticky.len(), 1);
        assert!(s.sticky.get("app", "k1", 0).is_some());
    }

    #[test]
    fn majority_of_voters_decides_health() {
        let mut s = with(&["a"]);
        s.set_voters([1, 2, 3].into(), 1);
        s.apply(&health("a", false, 1), 2, 0);
        assert!(s.is_up("app", "a"), "one broken observer out of three must not eject");
        s.apply(&health("a", false, 9), 3, 0);
        assert!(s.is_up("app", "a"), "a learner does not count");
        s.apply(&health("a", false, 2), 4, 0);
        assert!(!s.is_up("app", "a"));
        let v = &s.health["app"]["a"];
        assert_eq!((v.since, v.reporter), (4, 2));
        s.apply(&health("a", true, 2), 5, 0);
        assert!(s.is_up("app", "a"));
        // Node 3 leaves the cluster: 1 of 2 down is not a majority.
        s.apply(&health("a", false, 2), 6, 0);
        assert!(!s.is_up("app", "a"));
        s.set_voters([1, 3, 4].into(), 7);
        assert!(s.is_up("app", "a"));
    }

    #[test]
    fn unknown_servers_are_rejected() {
        let mut s = with(&["a"]);
        assert!(s.apply(&health("zz", false, 1), 2, 0).is_rejected());
        let w = Command::SetServerWeight { pool: "nope".into(), server: "a".into(), weight: 3 };
        assert!(s.apply(&w, 3, 0).is_rejected());
    }

    #[test]
    fn weight_and_drain_overrides() {
        let mut s = with(&["a"]);
        let w = Command::SetServerWeight { pool: "app".into(), server: "a".into(), weight: 7 };
        assert_eq!(s.apply(&w, 2, 0), Outcome::Applied { changed: true });
        assert_eq!(s.apply(&w, 3, 0), Outcome::Applied { changed: false });
        assert_eq!(s.effective_weight("app", "a"), Some(7));
        let bad = Command::SetServerWeight { pool: "app".into(), server: "a".into(), weight: 1000 };
        assert!(s.apply(&bad, 4, 0).is_rejected());
        let d = |drain| Command::DrainServer { pool: "app".into(), server: "a".into(), drain };
        s.apply(&d(true), 5, 0);
        assert!(s.is_draining("app", "a"));
        s.apply(&d(false), 6, 0);
        assert!(!s.is_draining("app", "a"));
    }

    #[test]
    fn sticky_ttl_prunes_and_evicts_least_recently_used() {
        let mut s = ClusterState::default();
        s.apply(&Command::ApplyConfig(limited(&["a"], 2)), 1, 0);
        s.apply(&Command::PutStickyBatch(vec![sticky("x", "a", 50_000), sticky("y", "a", 300_000)]), 2, 10_000);
        assert_eq!(s.sticky.len(), 2);
        assert!(s.sticky.get("app", "x", 60_000).is_none(), "expired entries are not served");
        let out =
            s.apply(&Command::PutStickyBatch(vec![sticky("z", "a", 200_000), sticky("w", "a", 250_000)]), 3, 100_000);
        // x dropped (expired at 100 s), then y evicted: used at 10 s, the least recently, though
        // it expires last.
        assert_eq!(out, Outcome::StickyStored { stored: 2, skipped: 0, evicted: 2 });
        let keys: Vec<String> = s.sticky.iter().map(|(_, k, _)| k).collect();
        assert_eq!(keys, ["w", "z"]);
        assert_eq!(s.sticky.summary()["app"], PoolSummary { entries: 2, evictions: 1 });
        // A lower bound applies with the config change that sets it.
        s.apply(&Command::ApplyConfig(limited(&["a"], 1)), 4, 100_000);
        assert_eq!(s.sticky.summary()["app"], PoolSummary { entries: 1, evictions: 2 });
    }

    #[test]
    fn state_round_trips_through_bincode_and_json() {
        let mut s = with(&["a", "b"]);
        s.set_voters([1, 2].into(), 1);
        s.apply(&health("a", false, 1), 2, 0);
        s.apply(&Command::PutStickyBatch(vec![sticky("k", "b", 99)]), 3, 0);
        let bin = crate::codec::encode(&s).unwrap();
        assert_eq!(crate::codec::decode::<ClusterState>(&bin).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
    }

    /// The bound the property tests' configs set.
    const CAP: u64 = 5;

    fn arb_command() -> impl Strategy<Value = Command> {
        let server = prop::sample::select(vec!["a", "b", "c", "zz"]).prop_map(String::from);
        prop_oneof![
            (server.clone(), any::<bool>(), 0u64..4).prop_map(|(server, up, reporter)| Command::SetServerHealth {
                pool: "app".into(),
                server,
                up,
                reporter
            }),
            (server.clone(), any::<bool>()).prop_map(|(server, drain)| Command::DrainServer {
                pool: "app".into(),
                server,
                drain
            }),
            (server.clone(), 0u32..300).prop_map(|(server, weight)| Command::SetServerWeight {
                pool: "app".into(),
                server,
                weight
            }),
            prop::collection::vec((0u32..40, server, 0u64..400_000), 0..30).prop_map(|v| Command::PutStickyBatch(
                v.into_iter().map(|(k, s, e)| sticky(&format!("k{k}"), &s, e)).collect()
            )),
            prop::sample::select(vec![vec!["a"], vec!["a", "b"], vec!["a", "b", "c"], vec![]])
                .prop_map(|s| Command::ApplyConfig(if s.is_empty() { Config::default() } else { limited(&s, CAP) })),
        ]
    }

    proptest! {
        #[test]
        fn sticky_table_never_exceeds_its_bound(cmds in prop::collection::vec(arb_command(), 1..40)) {
            let mut s = ClusterState::default();
            s.apply(&Command::ApplyConfig(limited(&["a", "b", "c"], CAP)), 1, 0);
            for (i, c) in cmds.iter().enumerate() {
                s.apply(c, i as u64 + 2, i as u64 * 10_000);
                prop_assert!(s.sticky.len() as u64 <= CAP);
                prop_assert_eq!(s.sticky.len(), s.sticky.iter().count());
            }
        }

        #[test]
        fn rejected_commands_change_nothing_and_replicas_agree(cmds in prop::collection::vec(arb_command(), 1..40)) {
            let mut s = with(&["a", "b"]);
            s.set_voters([1, 2, 3].into(), 1);
            let mut replica = s.clone();
            for (i, c) in cmds.iter().enumerate() {
                let before = s.clone();
                let out = s.apply(c, i as u64 + 2, i as u64 * 10_000);
                if out.is_rejected() {
                    prop_assert_eq!(&s, &before);
                }
                replica.apply(c, i as u64 + 2, i as u64 * 10_000);
                // Every server with a verdict or override exists in the config.
                for (pool, m) in s.health.iter() {
                    for server in m.keys() { prop_assert!(s.has_server(pool, server)); }
                }
            }
            prop_assert_eq!(&s, &replica);
            let decoded: ClusterState = crate::codec::decode(&crate::codec::encode(&s).unwrap()).unwrap();
            prop_assert_eq!(decoded, s);
        }
    }
}
