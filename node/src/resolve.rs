//! Servers given by DNS name: resolving them, keeping the answers, and telling the daemon when
//! an answer changed so it rebuilds the routing snapshot.
//!
//! A configured server whose `address` is `HOST:PORT` with a DNS name (an *entry*) becomes one
//! server per resolved address, named `ENTRY@IP:PORT` ([`keel_cluster::model::resolved_name`]),
//! with the entry's weight — HAProxy's `resolvers` with `server-template`, nginx's `resolve`.
//! Because the name holds the address, a server whose address is still in the next answer keeps
//! its name, so [`crate::snapshot::Snapshot::build`] carries its state object (health, counters,
//! slow start, sticky identity) over like any unchanged server; an address that left the answer
//! leaves the pool (in-flight requests finish), a new one joins it (ramped under `slow_start`).
//! IP literals never come here: they are served as configured.
//!
//! The [`Resolver`] owns, per (pool, entry): the last good address set, when it was last
//! resolved, the last error, and per-outcome counters; plus one task per entry that asks again
//! every `resolve_interval`. A failed resolution (timeout, SERVFAIL, NXDOMAIN, an empty answer)
//! keeps the last good set: a DNS outage must not empty a pool of servers that still answer. A
//! name that never resolved contributes no server until it does; the node still starts (as
//! HAProxy with `init-addr last,libc,none`, not its default, which refuses to start).
//!
//! How the daemon drives it — the whole protocol, the same in standalone and cluster mode:
//! 1. [`Resolver::update`]`(&config).await` before building a snapshot for a (new) config: it
//!    starts resolving the entries that appeared (their first answer is awaited, bounded by the
//!    query timeout, so the snapshot has their servers) and stops those that went away;
//! 2. [`Snapshot::build`](crate::snapshot::Snapshot::build)`(config, previous, &resolver)`
//!    expands the entries with [`Resolver::expand`];
//! 3. on every change of [`Resolver::changed`] (a generation number), rebuild from the current
//!    config exactly as for a config change: `Snapshot::build(current.config, Some(&current),
//!    ..)`, sticky policies attached, the verdict reporter set in cluster mode, health checkers
//!    spawned for the new pools, the snapshot stored.
//!
//! Where it asks: the servers of `[node] resolvers`, else the system's (`/etc/resolv.conf`,
//! `/etc/hosts` first), read on first use so a node without names never reads them. hickory's
//! own cache is capped at TTL 0: keel asks every `resolve_interval` whatever the record's TTL,
//! so the interval is the one knob an operator has to reason about.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::TokioResolver;
use keel_cluster::model::{self, resolved_name, ServerAddress};
use keel_cluster::throttle::{LogThrottle, EVERY};
use keel_cluster::Config;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::config::NodeSettings;
use crate::pool::ServerSpec;

/// How a resolution ended; the `outcome` label of [`crate::metrics::DNS_RESOLUTIONS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// At least one address.
    Ok,
    /// The name does not exist.
    NxDomain,
    /// The name exists but has no A/AAAA record (or the answer was empty).
    NoRecords,
    /// No answer in time.
    Timeout,
    /// Any other failure: SERVFAIL, REFUSED, an I/O error, no resolver configured.
    Error,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 5] =
        [Outcome::Ok, Outcome::NxDomain, Outcome::NoRecords, Outcome::Timeout, Outcome::Error];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NxDomain => "nxdomain",
            Outcome::NoRecords => "no_records",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A failed lookup: its class and the resolver's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LookupError {
    /// Which failure.
    pub outcome: Outcome,
    /// What the resolver said.
    pub message: String,
}

/// The future of one lookup.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, LookupError>> + Send + 'a>>;

/// Asks DNS for a name's addresses. A trait so unit tests can answer without a network.
pub trait Lookup: Send + Sync + 'static {
    /// The A and AAAA addresses of `host`.
    fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a>;
}

/// [`Lookup`] through hickory's stub resolver.
struct HickoryLookup {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    /// Built on first use: reading `/etc/resolv.conf` may fail, and a node without names must
    /// not care.
    resolver: OnceLock<Result<TokioResolver, String>>,
}

impl HickoryLookup {
    fn resolver(&self) -> Result<&TokioResolver, LookupError> {
        self.resolver
            .get_or_init(|| self.build())
            .as_ref()
            .map_err(|e| LookupError { outcome: Outcome::Error, message: e.clone() })
    }

    fn build(&self) -> Result<TokioResolver, String> {
        let mut builder = if self.servers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("cannot read the system resolver config (/etc/resolv.conf): {e}"))?
        } else {
            let servers = self
                .servers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut ns.connections {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        if !self.servers.is_empty() {
            // Servers named in the config are the only source: /etc/hosts is part of the
            // system's resolver config, which `resolvers` replaces.
            opts.use_hosts_file = ResolveHosts::Never;
        }
        opts.timeout = self.timeout;
        opts.attempts = 2;
        // Ask every resolve_interval, whatever the TTL (see the module doc).
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        builder.build().map_err(|e| format!("cannot set up the DNS resolver: {e}"))
    }
}

fn classify(e: &NetError) -> Outcome {
    if e.is_nx_domain() {
        Outcome::NxDomain
    } else if e.is_no_records_found() {
        Outcome::NoRecords
    } else if matches!(e, NetError::Timeout) {
        Outcome::Timeout
    } else {
        Outcome::Error
    }
}

impl Lookup for HickoryLookup {
    fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            let resolver = self.resolver()?;
            // A trailing dot: the configured name is absolute, never tried under search domains.
            let answer = resolver
                .lookup_ip(format!("{host}."))
                .await
                .map_err(|e| LookupError { outcome: classify(&e), message: e.to_string() })?;
            Ok(answer.iter().collect())
        })
    }
}

/// What is known about one entry's name.
#[derive(Debug, Default)]
struct Known {
    /// The last good answer, sorted; `None` until the name first resolves.
    addresses: Option<Vec<SocketAddr>>,
    last_ok: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    /// The error of the last attempt, `None` after a success.
    last_error: Option<String>,
}

/// One configured server with a DNS name, and what its resolutions found.
struct Entry {
    pool: String,
    server: String,
    host: String,
    port: u16,
    interval: Duration,
    known: Mutex<Known>,
    outcomes: [AtomicU64; 5],
    /// Repeated failures of this name: one line per [`EVERY`].
    failures: LogThrottle,
    task: Mutex<Option<AbortHandle>>,
}

impl Entry {
    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stop(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            task.abort();
        }
    }
}

/// One entry's state for `/status` and `/metrics`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NameStatus {
    /// The configured server (the entry) the name belongs to.
    pub server: String,
    /// The name asked for.
    pub host: String,
    /// The port its addresses are used with.
    pub port: u16,
    /// The addresses in use: the last good answer (empty until the first one).
    pub addresses: Vec<SocketAddr>,
    /// When it last resolved, in ms since the Unix epoch.
    pub last_resolved_unix_ms: Option<u64>,
    /// When it was last asked for.
    pub last_attempt_unix_ms: Option<u64>,
    /// Why the last attempt failed; absent when it succeeded.
    pub last_error: Option<String>,
    /// Resolutions by outcome (`ok`, `nxdomain`, `no_records`, `timeout`, `error`).
    pub resolutions: BTreeMap<&'static str, u64>,
}

type Key = (String, String);

/// The node's resolved names; one per process, shared by every snapshot.
pub struct Resolver {
    lookup: Arc<dyn Lookup>,
    entries: Mutex<BTreeMap<Key, Arc<Entry>>>,
    generation: watch::Sender<u64>,
}

fn unix_ms(t: Option<SystemTime>) -> Option<u64> {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Resolver {
    /// A resolver asking `node.resolvers` (the system's when empty).
    pub fn new(node: &NodeSettings) -> Arc<Resolver> {
        Self::with_lookup(Arc::new(HickoryLookup {
            servers: node.resolvers.clone(),
            timeout: node.resolve_timeout.get(),
            resolver: OnceLock::new(),
        }))
    }

    /// A resolver asking `lookup`.
    pub fn with_lookup(lookup: Arc<dyn Lookup>) -> Arc<Resolver> {
        Arc::new(Resolver { lookup, entries: Mutex::default(), generation: watch::Sender::new(0) })
    }

    /// A resolver for configs without names (tests, tools): every name fails to resolve.
    pub fn none() -> Arc<Resolver> {
        struct Nothing;
        impl Lookup for Nothing {
            fn lookup<'a>(&'a self, _: &'a str) -> LookupFuture<'a> {
                Box::pin(async { Err(LookupError { outcome: Outcome::Error, message: "no resolver".into() }) })
            }
        }
        Self::with_lookup(Arc::new(Nothing))
    }

    fn entries(&self) -> MutexGuard<'_, BTreeMap<Key, Arc<Entry>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A number that grows whenever an answer changed a pool's address set: rebuild the
    /// snapshot on each change (see the module doc).
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Follows `config`: starts resolving the entries with DNS names that appeared (awaiting
    /// their first answer, bounded by the query timeout) and re-resolving them every
    /// `resolve_interval`; stops those that went away or changed. Call before building a
    /// snapshot for a new config, inside the runtime.
    pub async fn update(self: &Arc<Self>, config: &Config) {
        let mut wanted = BTreeMap::new();
        for (pool_name, pool) in &config.pools {
            for server in &pool.servers {
                if let ServerAddress::Name { host, port } = &server.address {
                    let spec = (host.clone(), *port, pool.resolve_interval.get());
                    wanted.insert((pool_name.clone(), server.name.clone()), spec);
                }
            }
        }
        let fresh: Vec<Arc<Entry>> = {
            let mut entries = self.entries();
            entries.retain(|key, e| {
                let keep = wanted.get(key).is_some_and(|w| *w == (e.host.clone(), e.port, e.interval));
                if !keep {
                    e.stop();
                }
                keep
            });
            wanted.retain(|key, _| !entries.contains_key(key));
            wanted
                .into_iter()
                .map(|(key, (host, port, interval))| {
                    let entry = Arc::new(Entry {
                        pool: key.0.clone(),
                        server: key.1.clone(),
                        host,
                        port,
                        interval,
                        known: Mutex::default(),
                        outcomes: Default::default(),
                        failures: LogThrottle::new(EVERY),
                        task: Mutex::new(None),
                    });
                    entries.insert(key, entry.clone());
                    entry
                })
                .collect()
        };
        futures_util::future::join_all(fresh.iter().map(|e| self.resolve(e))).await;
        for entry in &fresh {
            if entry.known().addresses.is_none() {
                tracing::error!(target: "keel::dns", pool = %entry.pool, server = %entry.server, host = %entry.host,
                    retry_every = ?entry.interval,
                    "server name does not resolve; the pool has no servers from it until it does");
            }
            self.spawn(entry);
        }
    }

    /// The re-resolving task of `entry`: ends when the entry is stopped or the resolver dropped.
    fn spawn(self: &Arc<Self>, entry: &Arc<Entry>) {
        let (resolver, weak) = (Arc::downgrade(self), Arc::downgrade(entry));
        let interval = entry.interval;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let (Some(resolver), Some(entry)) = (resolver.upgrade(), weak.upgrade()) else { return };
                if resolver.resolve(&entry).await {
                    resolver.generation.send_modify(|g| *g += 1);
                }
            }
        });
        *entry.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    }

    /// Asks once for `entry`'s addresses and records the outcome. Returns whether the address
    /// set changed. Logs transitions (first answer, new addresses, failing, recovered) once and
    /// repeated failures at most once per [`EVERY`].
    async fn resolve(&self, entry: &Entry) -> bool {
        let answer = match self.lookup.lookup(&entry.host).await {
            Ok(ips) if ips.is_empty() => {
                Err(LookupError { outcome: Outcome::NoRecords, message: "the answer holds no address".into() })
            }
            other => other,
        };
        let now = SystemTime::now();
        let outcome = answer.as_ref().err().map_or(Outcome::Ok, |e| e.outcome);
        entry.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        let mut known = entry.known();
        known.last_attempt = Some(now);
        let (pool, server, host) = (&entry.pool, &entry.server, &entry.host);
        match answer {
            Ok(ips) => {
                let mut addresses: Vec<SocketAddr> =
                    ips.into_iter().map(|ip| SocketAddr::new(ip, entry.port)).collect();
                addresses.sort_unstable();
                addresses.dedup();
                known.last_ok = Some(now);
                if let Some(error) = known.last_error.take() {
                    if known.addresses.is_some() {
                        tracing::info!(target: "keel::dns", pool = %pool, server = %server, host = %host,
                            previous_error = %error, "server name resolves again");
                    }
                }
                if known.addresses.as_ref() == Some(&addresses) {
                    return false;
                }
                tracing::info!(target: "keel::dns", pool = %pool, server = %server, host = %host,
                    addresses = ?addresses, before = ?known.addresses.as_deref().unwrap_or_default(),
                    "server name resolved to a new address set");
                known.addresses = Some(addresses);
                true
            }
            Err(e) => {
                let kept = known.addresses.as_ref().map_or(0, Vec::len);
                if known.last_error.is_none() && known.addresses.is_some() {
                    let _ = entry.failures.allow();
                    tracing::warn!(target: "keel::dns", pool = %pool, server = %server, host = %host,
                        outcome = outcome.as_str(), error = %e, kept,
                        "server name no longer resolves; keeping its last addresses");
                } else {
                    keel_cluster::throttled!(entry.failures, warn, target: "keel::dns", pool = %pool, server = %server,
                        host = %host, outcome = outcome.as_str(), error = %e, kept,
                        "server name still does not resolve");
                }
                known.last_error = Some(e.message);
                false
            }
        }
    }

    /// The servers `server` (an entry of `pool` with a DNS name) stands for now: one per
    /// address of its last good answer, named `ENTRY@IP:PORT`, with the entry's weight.
    pub fn expand(&self, pool: &str, server: &model::Server) -> Vec<ServerSpec> {
        let entry = self.entries().get(&(pool.to_owned(), server.name.clone())).cloned();
        let Some(entry) = entry else { return Vec::new() };
        let addresses = entry.known().addresses.clone().unwrap_or_default();
        addresses
            .into_iter()
            .map(|address| ServerSpec {
                name: resolved_name(&server.name, address),
                address,
                weight: server.weight,
                host: Some(format!("{}:{}", entry.host, entry.port)),
            })
            .collect()
    }

    /// The servers of `pool` as built: IP literals as configured, DNS entries expanded, in
    /// config order.
    pub fn servers(&self, pool_name: &str, pool: &model::Pool) -> Vec<ServerSpec> {
        pool.servers
            .iter()
            .flat_map(|s| match ServerSpec::literal(s) {
                Some(spec) => vec![spec],
                None => self.expand(pool_name, s),
            })
            .collect()
    }

    /// The state of `pool`'s entries with DNS names, for `/status` and `/metrics`.
    pub fn status(&self, pool: &str) -> Vec<NameStatus> {
        let entries: Vec<Arc<Entry>> =
            self.entries().iter().filter(|((p, _), _)| p == pool).map(|(_, e)| e.clone()).collect();
        entries
            .iter()
            .map(|e| {
                let known = e.known();
                NameStatus {
                    server: e.server.clone(),
                    host: e.host.clone(),
                    port: e.port,
                    addresses: known.addresses.clone().unwrap_or_default(),
                    last_resolved_unix_ms: unix_ms(known.last_ok),
                    last_attempt_unix_ms: unix_ms(known.last_attempt),
                    last_error: known.last_error.clone(),
                    resolutions: Outcome::ALL
                        .iter()
                        .map(|o| (o.as_str(), e.outcomes[o.index()].load(Ordering::Relaxed)))
                        .collect(),
                }
            })
            .collect()
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        for entry in self.entries().values() {
            entry.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    /// Answers from a table the test changes; `None` answers SERVFAIL.
    #[derive(Default)]
    struct FakeDns(Mutex<BTreeMap<String, Option<Vec<IpAddr>>>>);

    impl FakeDns {
        fn set(&self, host: &str, answer: Option<&[&str]>) {
            let ips = answer.map(|a| a.iter().map(|ip| ip.parse().expect("ip")).collect());
            self.0.lock().expect("lock").insert(host.to_owned(), ips);
        }
    }

    impl Lookup for FakeDns {
        fn lookup<'a>(&'a self, host: &'a str) -> LookupFuture<'a> {
            let answer = self.0.lock().expect("lock").get(host).cloned();
            Box::pin(async move {
                match answer {
                    Some(Some(ips)) => Ok(ips),
                    Some(None) => Err(LookupError { outcome: Outcome::Error, message: "SERVFAIL".into() }),
                    None => Err(LookupError { outcome: Outcome::NxDomain, message: "no such name".into() }),
                }
            })
        }
    }

    fn config() -> Config {
        toml::from_str(
            "[pools.p]\nresolve_interval = \"1s\"\n\
             [[pools.p.servers]]\nname = \"fixed\"\naddress = \"127.0.0.1:1\"\n\
             [[pools.p.servers]]\nname = \"app\"\naddress = \"app.test:80\"\nweight = 3\n",
        )
        .expect("config")
    }

    fn names(s: &Snapshot) -> Vec<String> {
        s.pools["p"].servers.iter().map(|s| s.name.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expand_and_surviving_addresses_keep_their_state_object() {
        let dns = Arc::new(FakeDns::default());
        dns.set("app.test", Some(&["10.0.0.2", "10.0.0.1"]));
        let resolver = Resolver::with_lookup(dns.clone());
        let mut changed = resolver.changed();
        resolver.update(&config()).await;
        let first = Snapshot::build(config(), None, &resolver).expect("build");
        assert_eq!(names(&first), ["fixed", "app@10.0.0.1:80", "app@10.0.0.2:80"]);
        assert!(first.pools["p"].servers.iter().skip(1).all(|s| s.weight() == 3));

        // An operator's drain and weight on a surviving server outlive the rebuild.
        first.pools["p"].set_draining("app@10.0.0.1:80", true).expect("drain");
        first.pools["p"].set_weight("fixed", 7).expect("weight");

        // 10.0.0.1 stays, 10.0.0.2 goes, 10.0.0.3 comes.
        dns.set("app.test", Some(&["10.0.0.3", "10.0.0.1"]));
        tokio::time::timeout(Duration::from_secs(5), changed.changed()).await.expect("re-resolved").expect("open");
        let second = Snapshot::build((*first.config).clone(), Some(&first), &resolver).expect("build");
        assert_eq!(names(&second), ["fixed", "app@10.0.0.1:80", "app@10.0.0.3:80"]);
        let same = |i: usize, j: usize| Arc::ptr_eq(&first.pools["p"].servers[i], &second.pools["p"].servers[j]);
        assert!(same(0, 0), "the IP literal keeps its state");
        assert!(same(1, 1), "a surviving address keeps its state object");
        assert!(!Arc::ptr_eq(&first.pools["p"].servers[2], &second.pools["p"].servers[2]));
        assert!(second.pools["p"].servers[1].is_draining());
        assert_eq!(second.pools["p"].servers[0].weight(), 7);

        // A failure keeps the last good set, and is counted and shown.
        dns.set("app.test", None);
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let status = resolver.status("p");
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].addresses.len(), 2);
        assert_eq!(status[0].last_error.as_deref(), Some("SERVFAIL"));
        assert_eq!(status[0].resolutions["error"], 1);
        assert_eq!(status[0].resolutions["ok"], 2);
        let third = Snapshot::build((*first.config).clone(), Some(&second), &resolver).expect("build");
        assert_eq!(names(&third), names(&second));
    }

    #[tokio::test(start_paused = true)]
    async fn a_name_that_never_resolved_gives_no_server_until_it_does() {
        let dns = Arc::new(FakeDns::default());
        let resolver = Resolver::with_lookup(dns.clone());
        resolver.update(&config()).await;
        let s = Snapshot::build(config(), None, &resolver).expect("build");
        assert_eq!(names(&s), ["fixed"]);
        assert_eq!(resolver.status("p")[0].resolutions["nxdomain"], 1);
        dns.set("app.test", Some(&["10.0.0.9"]));
        let mut changed = resolver.changed();
        tokio::time::timeout(Duration::from_secs(5), changed.changed()).await.expect("resolved").expect("open");
        let s = Snapshot::build(config(), Some(&s), &resolver).expect("build");
        assert_eq!(names(&s), ["fixed", "app@10.0.0.9:80"]);
        // An entry removed from the config stops being resolved and shown.
        let mut without = config();
        without.pools.get_mut("p").expect("pool").servers.truncate(1);
        resolver.update(&without).await;
        assert!(resolver.status("p").is_empty());
    }
}
