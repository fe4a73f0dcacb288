//! [`RaftSessionStore`]: bindings in the replicated sticky table, so a standby that takes over
//! the VIP keeps every client on its server.
//!
//! Reads go to the replicated state through a [`StickyReader`] (the integrator builds it from the
//! cluster's state watch: [`reader_from_watch`]). Writes must not wait for a commit — that would
//! bound the new-session rate by commit latency — so `put` only enqueues: a background flusher
//! collects entries for [`RaftStoreSettings::flush_interval`] (5 ms) or until
//! [`RaftStoreSettings::max_batch`] (5,000) and proposes them as one `Command::PutStickyBatch`
//! through a [`StickyProposer`], with a few proposals in flight at once.
//!
//! Until its batch commits, a binding is served from a local overlay (a bounded
//! [`super::memory`] map), so the very next request of a new client sticks even before the
//! commit. After the commit the replicated table is authoritative again (so a binding rewritten
//! by another node is seen). The overlay also remembers what this node wrote, which implements
//! the refresh rule: an unchanged binding with more than half its TTL left is not re-proposed.
//!
//! Backpressure: the queue is bounded; when it is full the entry is dropped and counted (the
//! overlay still serves it locally, and the next request for that key tries again) — the request
//! path never waits. A failed proposal is counted, logged at most once per 10 s, and its entries
//! are marked for retry on their next use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use keel_cluster::api::client::ClusterClient;
use keel_cluster::command::MAX_STICKY_BATCH;
use keel_cluster::{ClusterHandle, ClusterState, Command, ProposeError, StickyEntry};
use tokio::sync::{mpsc, watch, Semaphore};

use super::memory::TtlMap;
use super::{millis, needs_write, Clock, SessionStore, StickyError, StoreGet, StoreStats};
use keel_cluster::throttle::{LogThrottle, EVERY};

/// Reads the replicated table: (pool, key, now unix ms) → bound server name.
pub type StickyReader = Arc<dyn Fn(&str, &str, u64) -> Option<String> + Send + Sync>;

/// Proposes one batch of bindings (one `Command::PutStickyBatch`) and resolves once it is
/// committed and applied, or failed.
pub type StickyProposer = Arc<dyn Fn(Vec<StickyEntry>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A reader over the cluster's applied state (one read lock of the watch per lookup).
pub fn reader_from_watch(state: watch::Receiver<Arc<ClusterState>>) -> StickyReader {
    Arc::new(move |pool, key, now| state.borrow().sticky.get(pool, key, now).map(|b| b.server.to_owned()))
}

/// A proposer that proposes on this node through `handle`. It succeeds only on the leader: in an
/// active-passive cluster the node holding the VIP is the leader, so that is where traffic and
/// writes are. A follower serving traffic gets `Err` (counted, throttled log) and keeps its
/// bindings in its overlay; active-active clusters should use `store = "redis"`, or supply a
/// proposer that forwards to the leader.
///
/// On a follower the batch is forwarded to the leader's admin API (with `token` when the API
/// needs one), so sessions learned on any node reach the replicated table: in active-active
/// setups, or when a client reaches a follower directly.
pub fn proposer_from_handle(handle: ClusterHandle, token: Option<String>) -> StickyProposer {
    Arc::new(move |batch| {
        let handle = handle.clone();
        let token = token.clone();
        Box::pin(async move {
            let command = Command::PutStickyBatch(batch);
            match handle.propose(command.clone()).await {
                Ok(_) => Ok(()),
                Err(ProposeError::ForwardToLeader { leader_admin_addr: Some(addr), .. }) => ClusterClient::new(addr)
                    .with_token(token)
                    .propose(&command)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
    })
}

/// Tuning of the batcher. The defaults suit the request path; tests shrink them.
#[derive(Clone, Debug)]
pub struct RaftStoreSettings {
    /// Longest time an entry waits in the queue before its batch is proposed (5 ms).
    pub flush_interval: Duration,
    /// Largest batch (5,000; the command's hard limit is 10,000).
    pub max_batch: usize,
    /// Entries that may wait in the queue; beyond it puts are dropped and counted (65,536).
    pub queue: usize,
    /// Bound of the local overlay (200,000 entries).
    pub overlay_capacity: usize,
    /// Proposals in flight at once (4).
    pub max_in_flight: usize,
}

impl Default for RaftStoreSettings {
    fn default() -> Self {
        RaftStoreSettings {
            flush_interval: Duration::from_millis(5),
            max_batch: 5_000,
            queue: 65_536,
            overlay_capacity: 200_000,
            max_in_flight: 4,
        }
    }
}

/// What this node wrote for a key.
#[derive(Clone)]
struct Local {
    server: Arc<str>,
    /// Not yet committed: served from the overlay.
    pending: bool,
    /// Its proposal failed or was dropped: the next put proposes again.
    retry: bool,
}

#[derive(Default)]
struct Stats {
    misses: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    proposed: AtomicU64,
    proposals: AtomicU64,
}

/// Session store backed by the replicated sticky table (`store = "raft"`).
pub struct RaftSessionStore {
    reader: StickyReader,
    overlay: Arc<TtlMap<Local>>,
    tx: mpsc::Sender<StickyEntry>,
    clock: Clock,
    stats: Arc<Stats>,
}

impl RaftSessionStore {
    /// A store reading through `reader` and writing through `proposer`. Spawns the flusher, which
    /// ends (after a last flush) when the store is dropped; must be called inside a Tokio runtime.
    pub fn new(
        reader: StickyReader,
        proposer: StickyProposer,
        clock: Clock,
        settings: RaftStoreSettings,
    ) -> Result<Self, StickyError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StickyError::NoRuntime("raft"))?;
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let overlay = Arc::new(TtlMap::new(settings.overlay_capacity));
        let stats = Arc::new(Stats::default());
        let flusher =
            Flusher { rx, proposer, overlay: overlay.clone(), stats: stats.clone(), clock: clock.clone(), settings };
        runtime.spawn(flusher.run());
        Ok(RaftSessionStore { reader, overlay, tx, clock, stats })
    }

    /// Batches proposed so far.
    pub fn proposals(&self) -> u64 {
        self.stats.proposals.load(Ordering::Relaxed)
    }

    /// Entries handed to the proposer so far.
    pub fn entries_proposed(&self) -> u64 {
        self.stats.proposed.load(Ordering::Relaxed)
    }

    fn mark_retry(&self, pool: &str, key: &str) {
        self.overlay.update(pool, key, |l| l.retry = true);
    }
}

impl SessionStore for RaftSessionStore {
    fn get<'a>(&'a self, pool: &'a str, key: &'a str) -> StoreGet<'a> {
        let now = (self.clock)();
        let found = match self.overlay.get(pool, key, now) {
            Some((local, _)) if local.pending => Some(local.server.to_string()),
            _ => (self.reader)(pool, key, now),
        };
        if found.is_none() {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        StoreGet::ready(Ok(found))
    }

    fn put(&self, pool: &str, key: &str, server: &str, ttl: Duration) {
        let now = (self.clock)();
        let ttl_ms = millis(ttl);
        let existing = self.overlay.get(pool, key, now).filter(|(l, _)| !l.retry);
        if !needs_write(existing.as_ref().map(|(l, e)| (&*l.server, *e)), server, ttl_ms, now) {
            return;
        }
        let expires_at_ms = now.saturating_add(ttl_ms);
        let local = Local { server: Arc::from(server), pending: true, retry: false };
        self.overlay.insert(pool, key, local, expires_at_ms, now);
        let entry =
            StickyEntry { pool: pool.to_owned(), key: key.to_owned(), server: server.to_owned(), expires_at_ms };
        if self.tx.try_send(entry).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.mark_retry(pool, key);
        }
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            misses: self.stats.misses.load(Ordering::Relaxed),
            errors: self.stats.errors.load(Ordering::Relaxed),
            dropped: self.stats.dropped.load(Ordering::Relaxed),
            written: self.stats.proposed.load(Ordering::Relaxed),
        }
    }

    fn kind(&self) -> &'static str {
        "raft"
    }
}

struct Flusher {
    rx: mpsc::Receiver<StickyEntry>,
    proposer: StickyProposer,
    overlay: Arc<TtlMap<Local>>,
    stats: Arc<Stats>,
    clock: Clock,
    settings: RaftStoreSettings,
}

impl Flusher {
    async fn run(mut self) {
        let max_batch = self.settings.max_batch.clamp(1, MAX_STICKY_BATCH);
        let in_flight = Arc::new(Semaphore::new(self.settings.max_in_flight.max(1)));
        let throttle = Arc::new(LogThrottle::new(EVERY));
        loop {
            let mut batch = Vec::with_capacity(max_batch.min(1024));
            if self.rx.recv_many(&mut batch, max_batch).await == 0 {
                break; // every sender is gone: the store was dropped
            }
            let deadline = tokio::time::Instant::now() + self.settings.flush_interval;
            while batch.len() < max_batch {
                let room = max_batch - batch.len();
                match tokio::time::timeout_at(deadline, self.rx.recv_many(&mut batch, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
            self.stats.proposals.fetch_add(1, Ordering::Relaxed);
            self.stats.proposed.fetch_add(batch.len() as u64, Ordering::Relaxed);
            let fut = (self.proposer)(batch.clone());
            let (overlay, stats, clock, throttle) =
                (self.overlay.clone(), self.stats.clone(), self.clock.clone(), throttle.clone());
            tokio::spawn(async move {
                let result = fut.await;
                settle(&overlay, &batch, result.is_ok());
                if let Err(e) = result {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(held) = throttle.allow_at(clock()) {
                        tracing::warn!(target: "keel::sticky", error = %e, entries = batch.len(),
                            failures_not_logged = held.count, "sticky batch not committed; serving bindings locally");
                    }
                }
                drop(permit);
            });
        }
        // Wait for the proposals still in flight.
        let _ = in_flight.acquire_many(u32::try_from(self.settings.max_in_flight.max(1)).unwrap_or(1)).await;
    }
}

/// After a proposal: committed entries leave the overlay's pending set (the replicated table
/// serves them now); failed ones stay pending and are marked for retry.
fn settle(overlay: &TtlMap<Local>, batch: &[StickyEntry], committed: bool) {
    for e in batch {
        overlay.update(&e.pool, &e.key, |l| {
            if *l.server == *e.server {
                if committed {
                    l.pending = false;
                } else {
                    l.retry = true;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::super::test_clock::manual;
    use super::*;

    /// A proposer that records batch sizes and applies them to a shared "replicated" table when
    /// `commit` is open; otherwise it waits.
    struct Fake {
        table: Arc<Mutex<std::collections::HashMap<(String, String), String>>>,
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Arc<tokio::sync::Notify>,
        hold: bool,
    }

    impl Fake {
        fn new(hold: bool) -> Fake {
            Fake { table: Arc::default(), sizes: Arc::default(), gate: Arc::default(), hold }
        }

        fn parts(&self) -> (StickyReader, StickyProposer) {
            let table = self.table.clone();
            let reader: StickyReader =
                Arc::new(move |p, k, _| table.lock().unwrap().get(&(p.to_owned(), k.to_owned())).cloned());
            let (table, sizes, gate, hold) = (self.table.clone(), self.sizes.clone(), self.gate.clone(), self.hold);
            let proposer: StickyProposer = Arc::new(move |batch: Vec<StickyEntry>| {
                let (table, sizes, gate) = (table.clone(), sizes.clone(), gate.clone());
                Box::pin(async move {
                    sizes.lock().unwrap().push(batch.len());
                    if hold {
                        gate.notified().await;
                    }
                    let mut t = table.lock().unwrap();
                    for e in batch {
                        t.insert((e.pool, e.key), e.server);
                    }
                    Ok(())
                })
            });
            (reader, proposer)
        }
    }

    async fn settle_down(store: &RaftSessionStore, entries: u64) {
        for _ in 0..2_000 {
            if store.entries_proposed() >= entries {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn serves_from_the_overlay_before_commit_then_from_the_table() {
        let fake = Fake::new(true);
        let (reader, proposer) = fake.parts();
        let (clock, _) = manual(1_000);
        let store = RaftSessionStore::new(reader, proposer, clock, RaftStoreSettings::default()).unwrap();
        store.put("app", "10.0.0.1", "a", Duration::from_secs(60));
        // Not committed (the proposer is held), yet the next request sticks.
        assert_eq!(store.get("app", "10.0.0.1").await, Ok(Some("a".into())));
        settle_down(&store, 1).await;
        assert!(fake.table.lock().unwrap().is_empty(), "not committed yet");
        fake.gate.notify_one();
        for _ in 0..1000 {
            if !fake.table.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // After the commit the replicated table answers: another node's rebinding is seen.
        fake.table.lock().unwrap().insert(("app".into(), "10.0.0.1".into()), "b".into());
        assert_eq!(store.get("app", "10.0.0.1").await, Ok(Some("b".into())));
        // An unchanged binding with most of its TTL left is not proposed again.
        store.put("app", "10.0.0.1", "a", Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.proposals(), 1);
    }

    #[tokio::test]
    async fn many_puts_become_few_bounded_batches() {
        let fake = Fake::new(false);
        let (reader, proposer) = fake.parts();
        let (clock, _) = manual(1_000);
        let store = RaftSessionStore::new(reader, proposer, clock, RaftStoreSettings::default()).unwrap();
        let n = 60_000u64;
        let keys: Vec<String> = (0..n).map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)).collect();
        let started = Instant::now();
        for (i, k) in keys.iter().enumerate() {
            store.put("app", k, "a", Duration::from_secs(60));
            if i % 4096 == 0 {
                tokio::task::yield_now().await; // let the flusher drain, as a busy server would
            }
        }
        let put_time = started.elapsed();
        settle_down(&store, n).await;
        let total = started.elapsed();
        let sizes = fake.sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>() as u64 + store.stats().dropped, n);
        assert!(sizes.iter().all(|s| *s <= 5_000), "{sizes:?}");
        assert!(sizes.len() < 200, "{} proposals for {n} puts", sizes.len());
        println!(
            "raft batcher: {n} puts in {put_time:?} ({:.0} puts/s on the request path), all proposed in {total:?} \
             ({:.0} entries/s) as {} proposals (max {}), {} dropped",
            n as f64 / put_time.as_secs_f64(),
            n as f64 / total.as_secs_f64(),
            sizes.len(),
            sizes.iter().max().unwrap_or(&0),
            store.stats().dropped,
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_blocking() {
        let fake = Fake::new(true);
        let (reader, proposer) = fake.parts();
        let (clock, _) = manual(1_000);
        let settings = RaftStoreSettings { queue: 10, max_batch: 5, max_in_flight: 1, ..RaftStoreSettings::default() };
        let store = RaftSessionStore::new(reader, proposer, clock, settings).unwrap();
        for i in 0..1_000 {
            store.put("app", &format!("k{i}"), "a", Duration::from_secs(60));
        }
        assert!(store.stats().dropped > 900, "{:?}", store.stats());
        assert_eq!(store.get("app", "k999").await, Ok(Some("a".into())), "dropped entries still stick locally");
    }

    #[tokio::test]
    async fn failed_proposals_are_counted_and_retried_on_next_use() {
        let reader: StickyReader = Arc::new(|_, _, _| None);
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let proposer: StickyProposer = Arc::new(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err("not the leader".to_owned()) })
        });
        let (clock, _) = manual(1_000);
        let store = RaftSessionStore::new(reader, proposer, clock, RaftStoreSettings::default()).unwrap();
        store.put("app", "k", "a", Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(store.stats().errors, 1);
        assert_eq!(store.get("app", "k").await, Ok(Some("a".into())), "still served locally");
        store.put("app", "k", "a", Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "retried on next use");
    }
}
