//! The routing table the data plane reads: built from a [`Config`], published with `ArcSwap`.
//!
//! A request does one atomic load of the current [`Snapshot`], finds its listener's router and
//! takes an `Arc` of the chosen pool; a reload (SIGHUP or `keel config apply` standalone, a
//! committed `ApplyConfig` in a cluster; see `daemon::apply`) builds a new snapshot next to the
//! old one and swaps the pointer. Requests already in flight keep the pool they took; nothing is locked or dropped.
//!
//! Servers that keep their pool, name and address carry their live state (verdicts, in-flight
//! count, counters) into the new snapshot, so an unrelated config change does not readmit an
//! ejected server or zero the metrics. Servers given by DNS name are expanded here, from the
//! [`Resolver`]'s last good answers, into one server per address (`ENTRY@IP:PORT`), so a new
//! answer is applied by the same rebuild as a config change (see [`crate::resolve`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arc_swap::ArcSwap;
use keel_cluster::Config;

use crate::pool::Pool;
use crate::resolve::Resolver;
use crate::routing::Router;
use crate::sticky::{StickyError, StickyPolicy, StickyRuntime};

/// A pool whose TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("pool {pool:?}: {source}")]
pub struct BuildError {
    /// The pool.
    pub pool: String,
    /// What failed.
    pub source: crate::tls::TlsError,
}

/// One immutable view of the served configuration and its run-time objects.
pub struct Snapshot {
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Pools by name.
    pub pools: BTreeMap<String, Arc<Pool>>,
    /// Each listener's router, by listener name.
    pub routers: HashMap<String, Router>,
    /// Sticky-session policies, by pool name (pools without a `sticky` table have none).
    pub sticky: HashMap<String, Arc<StickyPolicy>>,
    /// The resolved DNS names its pools were expanded from (shared by every snapshot).
    pub names: Arc<Resolver>,
}

/// The published snapshot: one atomic load per request.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Builds the run-time objects for `config`, its DNS-named servers expanded from `names`,
    /// carrying over server state and rate-limit tables from `previous`. Fails only when a
    /// pool's TLS settings cannot be loaded.
    pub fn build(config: Config, previous: Option<&Snapshot>, names: &Arc<Resolver>) -> Result<Snapshot, BuildError> {
        let mut pools = BTreeMap::new();
        for (name, cfg) in &config.pools {
            let old = previous.and_then(|p| p.pools.get(name));
            let pool = Pool::with_servers(name, cfg, names.servers(name, cfg), |server| {
                old?.servers.iter().find(|s| s.name == server.name && s.address == server.address).cloned()
            })
            .map_err(|source| BuildError { pool: name.clone(), source })?;
            // HTTP/2 connections made under another protocol or TLS setting must not carry
            // the new config's streams (an h2c connection for an h2 pool, an old CA's).
            if old.is_some_and(|o| o.config.protocol != cfg.protocol || o.config.tls != cfg.tls) {
                pool.servers.iter().for_each(|s| s.h2.clear());
            }
            // A server added to a running pool ramps up under slow_start like one coming back.
            if let (Some(old), Some(_)) = (old, cfg.slow_start) {
                let added: Vec<_> =
                    pool.servers.iter().filter(|s| !old.servers.iter().any(|o| Arc::ptr_eq(o, s))).collect();
                added.iter().for_each(|s| s.mark_added());
                if !added.is_empty() {
                    pool.refresh();
                }
            }
            pools.insert(name.clone(), pool);
        }
        let routers = config
            .listeners
            .iter()
            .map(|(name, l)| {
                let old = previous.and_then(|p| p.routers.get(name));
                (name.clone(), Router::new(name, l, |pool| pools.get(pool).cloned(), old))
            })
            .collect();
        Ok(Snapshot { config: Arc::new(config), pools, routers, sticky: HashMap::new(), names: names.clone() })
    }

    /// Attaches the sticky-session policy of every pool that has one; stores and counters are
    /// the runtime's, so they outlive this snapshot. Drops nothing: once this snapshot is
    /// published, `StickyRuntime::retain` lets go of what the previous one needed alone.
    pub fn attach_sticky(&mut self, runtime: &StickyRuntime) -> Result<(), StickyError> {
        for (name, pool) in &self.config.pools {
            // Cookie ids name the servers as built: a DNS entry's resolved servers included.
            let servers: Vec<&str> =
                self.pools.get(name).map(|p| p.servers.iter().map(|s| s.name.as_str()).collect()).unwrap_or_default();
            if let Some(policy) = runtime.policy(name, pool, &servers)? {
                self.sticky.insert(name.clone(), policy);
            }
        }
        Ok(())
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }
}
