//! [`StickyRuntime`]: builds each pool's [`StickyPolicy`] from config, and keeps what must
//! outlive a config reload — the stores (local bindings, the Raft batcher, Redis connections)
//! and the per-pool counters — so that reloading an unrelated setting neither forgets sessions
//! nor resets metrics.
//!
//! The daemon holds one runtime and calls [`StickyRuntime::policy`] for every pool each time it
//! builds a routing snapshot. Store sharing: one [`RaftSessionStore`] for all pools (a single
//! batcher, so bindings of every pool share log entries), one [`RedisSessionStore`] per Redis
//! address (keys are namespaced by pool), one [`MemorySessionStore`] per pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_cluster::model::{self, StickyStore};
use keel_cluster::ClusterHandle;

use super::raft::{proposer_from_handle, reader_from_watch};
use super::{
    system_clock, Clock, MemorySessionStore, RaftSessionStore, RaftStoreSettings, RedisSessionStore,
    RedisStoreSettings, SessionStore, StickyCounters, StickyError, StickyPolicy, StickyProposer, StickyReader,
};

/// What the sticky stores need from the rest of the node.
#[derive(Clone)]
pub struct StickyDeps {
    /// Reads the replicated sticky table; `None` on a node without a cluster.
    pub reader: Option<StickyReader>,
    /// Proposes sticky batches; `None` on a node without a cluster.
    pub proposer: Option<StickyProposer>,
    /// Wall clock, unix ms.
    pub clock: Clock,
    /// Raft batcher tuning.
    pub raft: RaftStoreSettings,
    /// Redis store tuning.
    pub redis: RedisStoreSettings,
}

impl StickyDeps {
    /// No cluster: `store = "raft"` pools keep their bindings in local memory (logged once per
    /// pool at build).
    pub fn standalone() -> Self {
        StickyDeps {
            reader: None,
            proposer: None,
            clock: system_clock(),
            raft: RaftStoreSettings::default(),
            redis: RedisStoreSettings::default(),
        }
    }

    /// Reads the cluster's applied state and proposes through `handle` (leader-only; see
    /// [`proposer_from_handle`]).
    pub fn from_cluster(handle: &ClusterHandle, token: Option<String>) -> Self {
        StickyDeps {
            reader: Some(reader_from_watch(handle.state())),
            proposer: Some(proposer_from_handle(handle.clone(), token)),
            ..Self::standalone()
        }
    }
}

/// Builds sticky policies and keeps stores and counters across reloads.
pub struct StickyRuntime {
    deps: StickyDeps,
    raft: Mutex<Option<Arc<RaftSessionStore>>>,
    redis: Mutex<HashMap<String, Arc<RedisSessionStore>>>,
    /// Per pool: the store and the `max_entries` it was built with.
    local: Mutex<HashMap<String, (usize, Arc<MemorySessionStore>)>>,
    counters: Mutex<HashMap<String, Arc<StickyCounters>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl StickyRuntime {
    /// A runtime with nothing built yet.
    pub fn new(deps: StickyDeps) -> Self {
        StickyRuntime {
            deps,
            raft: Mutex::new(None),
            redis: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of pool `name`, or `None` when its config has no `sticky` table. Must be
    /// called inside a Tokio runtime (stores spawn their background tasks on first use).
    pub fn policy(
        &self,
        name: &str,
        pool: &model::Pool,
        servers: &[&str],
    ) -> Result<Option<Arc<StickyPolicy>>, StickyError> {
        let Some(sticky) = &pool.sticky else { return Ok(None) };
        let counters = lock(&self.counters).entry(name.to_owned()).or_default().clone();
        let store: Option<Arc<dyn SessionStore>> = match sticky.mode {
            model::StickyMode::Cookie => None,
            model::StickyMode::SourceIp | model::StickyMode::Learn => Some(match sticky.store() {
                StickyStore::Local => self.local_store(name, sticky.max_entries()),
                StickyStore::Raft => match (&self.deps.reader, &self.deps.proposer) {
                    (Some(reader), Some(proposer)) => self.raft_store(reader, proposer)?,
                    _ => {
                        tracing::warn!(target: "keel::sticky", pool = %name,
                            "sticky store \"raft\" without a cluster: bindings are kept in this node's memory");
                        self.local_store(name, sticky.max_entries())
                    }
                },
                StickyStore::Redis => {
                    let url = sticky
                        .redis
                        .as_deref()
                        .ok_or_else(|| StickyError::Config(format!("pool {name:?}: store = \"redis\" needs redis")))?;
                    self.redis_store(url)?
                }
            }),
        };
        Ok(Some(Arc::new(StickyPolicy::new(name, pool, servers, store, counters)?)))
    }

    /// The pool's in-memory store, bounded to `max_entries`. A changed bound starts a new store
    /// (the bindings of this node's memory are lost, as on a restart): the sharded map's bound is
    /// fixed when it is built.
    fn local_store(&self, pool: &str, max_entries: u64) -> Arc<dyn SessionStore> {
        let capacity = usize::try_from(max_entries).unwrap_or(usize::MAX);
        let mut local = lock(&self.local);
        match local.get(pool) {
            Some((cap, store)) if *cap == capacity => store.clone(),
            _ => {
                let store = Arc::new(MemorySessionStore::with_capacity(capacity, self.deps.clock.clone()));
                local.insert(pool.to_owned(), (capacity, store.clone()));
                store
            }
        }
    }

    fn raft_store(
        &self,
        reader: &StickyReader,
        proposer: &StickyProposer,
    ) -> Result<Arc<dyn SessionStore>, StickyError> {
        let mut slot = lock(&self.raft);
        if let Some(store) = slot.as_ref() {
            return Ok(store.clone());
        }
        let store = Arc::new(RaftSessionStore::new(
            reader.clone(),
            proposer.clone(),
            self.deps.clock.clone(),
            self.deps.raft.clone(),
        )?);
        *slot = Some(store.clone());
        Ok(store)
    }

    fn redis_store(&self, url: &str) -> Result<Arc<dyn SessionStore>, StickyError> {
        let mut stores = lock(&self.redis);
        if let Some(store) = stores.get(url) {
            return Ok(store.clone());
        }
        let store = Arc::new(RedisSessionStore::connect(url, self.deps.clock.clone(), self.deps.redis.clone())?);
        stores.insert(url.to_owned(), store.clone());
        Ok(store)
    }

    /// Drops what `config` no longer needs (call after a reload): local stores and counters of
    /// pools that are gone or no longer use them, and Redis connections no pool names.
    pub fn retain(&self, config: &model::Config) {
        let sticky = |name: &str| config.pools.get(name).and_then(|p| p.sticky.as_ref());
        lock(&self.local).retain(|name, _| sticky(name).is_some_and(|s| s.store() == StickyStore::Local));
        lock(&self.counters).retain(|name, _| sticky(name).is_some());
        lock(&self.redis).retain(|url, _| {
            config.pools.values().filter_map(|p| p.sticky.as_ref()).any(|s| s.redis.as_deref() == Some(url.as_str()))
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use http::HeaderMap;

    use super::*;
    use crate::pool::ServerState;

    fn config(sticky: &str) -> model::Config {
        toml::from_str(&format!(
            "[listeners.web]\nbind = \"127.0.0.1:8080\"\ndefault_pool = \"app\"\n\
             [pools.app]\n[[pools.app.servers]]\nname = \"a\"\naddress = \"127.0.0.1:9001\"\n\
             [pools.app.sticky]\n{sticky}\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn bindings_and_counters_survive_a_rebuild() {
        let rt = StickyRuntime::new(StickyDeps::standalone());
        let cfg = config("mode = \"source_ip\"");
        let pool = &cfg.pools["app"];
        let servers = vec![Arc::new(ServerState::new(
            &crate::pool::ServerSpec::literal(&pool.servers[0]).expect("an IP literal"),
        ))];
        let ip: IpAddr = "10.1.1.1".parse().unwrap();
        let p = rt.policy("app", pool, &["a"]).unwrap().unwrap();
        assert_eq!(p.store_kind(), Some("local"), "raft without a cluster falls back to memory");
        p.on_response(0, false, &HeaderMap::new(), &ip.into(), &mut HeaderMap::new(), &servers);
        let rebuilt = rt.policy("app", pool, &["a"]).unwrap().unwrap();
        assert_eq!(rebuilt.lookup(&HeaderMap::new(), &ip.into(), &servers).await, Some(0));
        assert_eq!(p.hits(), 1, "counters are shared across rebuilds");
        rt.retain(&config("mode = \"cookie\""));
        let p = rt.policy("app", &config("mode = \"source_ip\"").pools["app"], &["a"]).unwrap().unwrap();
        assert_eq!(p.lookup(&HeaderMap::new(), &ip.into(), &servers).await, None, "a dropped store starts empty");
    }

    #[test]
    fn pools_without_sticky_have_no_policy() {
        let rt = StickyRuntime::new(StickyDeps::standalone());
        let mut cfg = config("mode = \"cookie\"");
        cfg.pools.get_mut("app").unwrap().sticky = None;
        assert!(rt.policy("app", &cfg.pools["app"], &["a"]).unwrap().is_none());
    }
}
