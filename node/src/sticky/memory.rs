//! A bounded map (pool, key) → value with a TTL per entry, and [`MemorySessionStore`], the
//! session store built on it (`store = "local"`).
//!
//! Why it looks like this: it sits on the request path, so a lookup must not contend with
//! writers of unrelated keys (16 shards, each a `Mutex` held for one hash-map operation), and a
//! flood of new clients must not exhaust memory (a hard bound; when a shard is full the entry
//! that expires soonest — with a uniform TTL, the oldest — is evicted, in O(log n) through a
//! per-shard expiry index). Expired entries are never served, and every insert prunes a few of
//! them, so memory follows live sessions rather than all sessions ever seen.
//!
//! Default bound: [`DEFAULT_CAPACITY`] = 1,000,000 entries, split evenly over the shards (so a
//! skewed key distribution may evict slightly before the total is reached). An entry costs
//! roughly 150–250 bytes with short keys (two maps, the key shared between them by `Arc`), so
//! the default bound is ≈ 200 MB worst case — the same bound as the replicated table.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{millis, needs_write, Clock, SessionStore, StoreGet, StoreStats};

/// Default bound on entries of a [`MemorySessionStore`].
pub const DEFAULT_CAPACITY: usize = 1_000_000;

const SHARDS: usize = 16;

/// Expired entries removed per insert, at most: amortised cleanup without a sweeper task.
const PRUNE_PER_INSERT: usize = 8;

struct Slot<V> {
    value: V,
    expires_at: u64,
    seq: u64,
}

struct Shard<V> {
    pools: HashMap<Arc<str>, HashMap<Arc<str>, Slot<V>>>,
    /// (expires_at, seq) → (pool, key): eviction and pruning order.
    by_expiry: BTreeMap<(u64, u64), (Arc<str>, Arc<str>)>,
    capacity: usize,
    seq: u64,
}

impl<V> Shard<V> {
    fn remove_indexed(&mut self, pool: &str, key: &str) -> Option<Slot<V>> {
        let keys = self.pools.get_mut(pool)?;
        let slot = keys.remove(key)?;
        if keys.is_empty() {
            self.pools.remove(pool);
        }
        self.by_expiry.remove(&(slot.expires_at, slot.seq));
        Some(slot)
    }

    /// Removes the entry that expires first; false when empty.
    fn pop_first(&mut self) -> bool {
        let Some((_, (pool, key))) = self.by_expiry.pop_first() else { return false };
        if let Some(keys) = self.pools.get_mut(&pool) {
            keys.remove(&key);
            if keys.is_empty() {
                self.pools.remove(&pool);
            }
        }
        true
    }

    fn prune(&mut self, now: u64, max: usize) {
        for _ in 0..max {
            match self.by_expiry.first_key_value() {
                Some(((exp, _), _)) if *exp <= now => {
                    self.pop_first();
                }
                _ => break,
            }
        }
    }
}

/// A sharded, bounded (pool, key) → `V` map with per-entry expiry (unix ms).
pub(crate) struct TtlMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    evicted: AtomicU64,
}

impl<V: Clone> TtlMap<V> {
    /// A map holding at most `capacity` live entries.
    pub(crate) fn new(capacity: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|i| {
                let capacity = capacity / SHARDS + usize::from(i < capacity % SHARDS);
                Mutex::new(Shard { pools: HashMap::new(), by_expiry: BTreeMap::new(), capacity, seq: 0 })
            })
            .collect();
        TtlMap { shards, evicted: AtomicU64::new(0) }
    }

    fn shard(&self, pool: &str, key: &str) -> MutexGuard<'_, Shard<V>> {
        let h = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), xxhash_rust::xxh3::xxh3_64(pool.as_bytes()));
        let i = usize::try_from(h % SHARDS as u64).unwrap_or(0);
        // A panic while holding a shard lock cannot leave a shard inconsistent in a way that
        // matters more than losing stickiness, so a poisoned lock is simply used.
        self.shards[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live value and its expiry.
    pub(crate) fn get(&self, pool: &str, key: &str, now: u64) -> Option<(V, u64)> {
        let shard = self.shard(pool, key);
        let slot = shard.pools.get(pool)?.get(key)?;
        (slot.expires_at > now).then(|| (slot.value.clone(), slot.expires_at))
    }

    /// Inserts or replaces; evicts the soonest-expiring entries of the shard when it is full.
    pub(crate) fn insert(&self, pool: &str, key: &str, value: V, expires_at: u64, now: u64) {
        let mut shard = self.shard(pool, key);
        if shard.capacity == 0 {
            return;
        }
        shard.prune(now, PRUNE_PER_INSERT);
        if shard.remove_indexed(pool, key).is_none() {
            let mut evicted = 0;
            while shard.by_expiry.len() >= shard.capacity && shard.pop_first() {
                evicted += 1;
            }
            if evicted > 0 {
                self.evicted.fetch_add(evicted, Ordering::Relaxed);
            }
        }
        // Reuse the interned pool name.
        let pool_arc: Arc<str> = shard.pools.get_key_value(pool).map_or_else(|| Arc::from(pool), |(p, _)| p.clone());
        let key_arc: Arc<str> = Arc::from(key);
        shard.seq += 1;
        let seq = shard.seq;
        shard.by_expiry.insert((expires_at, seq), (pool_arc.clone(), key_arc.clone()));
        shard.pools.entry(pool_arc).or_default().insert(key_arc, Slot { value, expires_at, seq });
    }

    /// Changes a live entry's value in place (expiry unchanged); false when absent.
    pub(crate) fn update(&self, pool: &str, key: &str, f: impl FnOnce(&mut V)) -> bool {
        let mut shard = self.shard(pool, key);
        match shard.pools.get_mut(pool).and_then(|keys| keys.get_mut(key)) {
            Some(slot) => {
                f(&mut slot.value);
                true
            }
            None => false,
        }
    }

    /// Removes an entry.
    pub(crate) fn remove(&self, pool: &str, key: &str) {
        self.shard(pool, key).remove_indexed(pool, key);
    }

    /// Entries held, expired ones not yet pruned included.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).by_expiry.len()).sum()
    }

    /// Entries evicted to stay within the bound, since creation.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

/// Session store in this node's memory (`store = "local"`): bounded, with TTL, not replicated.
pub struct MemorySessionStore {
    map: TtlMap<Arc<str>>,
    clock: Clock,
    misses: AtomicU64,
    written: AtomicU64,
}

impl MemorySessionStore {
    /// A store bounded to [`DEFAULT_CAPACITY`] entries.
    pub fn new(clock: Clock) -> Self {
        Self::with_capacity(DEFAULT_CAPACITY, clock)
    }

    /// A store bounded to `capacity` entries.
    pub fn with_capacity(capacity: usize, clock: Clock) -> Self {
        MemorySessionStore { map: TtlMap::new(capacity), clock, misses: AtomicU64::new(0), written: AtomicU64::new(0) }
    }

    /// Entries held (expired ones not yet pruned included).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries evicted to stay within the bound.
    pub fn evicted(&self) -> u64 {
        self.map.evicted()
    }

    /// The bound server and its expiry (unix ms), answered synchronously.
    pub fn get_now(&self, pool: &str, key: &str) -> Option<(String, u64)> {
        self.map.get(pool, key, (self.clock)()).map(|(s, exp)| (s.to_string(), exp))
    }
}

impl SessionStore for MemorySessionStore {
    fn get<'a>(&'a self, pool: &'a str, key: &'a str) -> StoreGet<'a> {
        let found = self.get_now(pool, key).map(|(s, _)| s);
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        StoreGet::ready(Ok(found))
    }

    fn put(&self, pool: &str, key: &str, server: &str, ttl: Duration) {
        let now = (self.clock)();
        let ttl_ms = millis(ttl);
        let existing = self.map.get(pool, key, now);
        if !needs_write(existing.as_ref().map(|(s, e)| (&**s, *e)), server, ttl_ms, now) {
            return;
        }
        self.map.insert(pool, key, Arc::from(server), now.saturating_add(ttl_ms), now);
        self.written.fetch_add(1, Ordering::Relaxed);
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            misses: self.misses.load(Ordering::Relaxed),
            errors: 0,
            dropped: 0,
            written: self.written.load(Ordering::Relaxed),
        }
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::test_clock::manual;
    use super::*;

    #[tokio::test]
    async fn entries_expire_after_their_ttl() {
        let (clock, now) = manual(1_000);
        let store = MemorySessionStore::new(clock);
        store.put("app", "10.0.0.1", "a", Duration::from_secs(10));
        assert_eq!(store.get("app", "10.0.0.1").await, Ok(Some("a".into())));
        assert_eq!(store.get("other", "10.0.0.1").await, Ok(None), "pools are separate");
        now.store(10_999, Ordering::SeqCst);
        assert_eq!(store.get("app", "10.0.0.1").await, Ok(Some("a".into())));
        now.store(11_000, Ordering::SeqCst);
        assert_eq!(store.get("app", "10.0.0.1").await, Ok(None));
        assert_eq!(store.stats().misses, 2);
    }

    #[tokio::test]
    async fn refresh_extends_only_past_half_ttl_and_rebinding_is_immediate() {
        let (clock, now) = manual(0);
        let store = MemorySessionStore::new(clock);
        store.put("p", "k", "a", Duration::from_secs(10));
        now.store(4_000, Ordering::SeqCst);
        store.put("p", "k", "a", Duration::from_secs(10));
        assert_eq!(store.get_now("p", "k").map(|(_, e)| e), Some(10_000), "fresh binding untouched");
        now.store(6_000, Ordering::SeqCst);
        store.put("p", "k", "a", Duration::from_secs(10));
        assert_eq!(store.get_now("p", "k").map(|(_, e)| e), Some(16_000), "refreshed past half its ttl");
        store.put("p", "k", "b", Duration::from_secs(10));
        assert_eq!(store.get("p", "k").await, Ok(Some("b".into())));
        assert_eq!(store.stats().written, 3);
    }

    #[tokio::test]
    async fn the_bound_holds_and_evicts_the_soonest_expiring() {
        let (clock, now) = manual(0);
        let cap = 1_000;
        let store = MemorySessionStore::with_capacity(cap, clock);
        // One long-lived binding, then a flood of short ones.
        store.put("p", "keeper", "a", Duration::from_secs(3600));
        for i in 0..50_000u64 {
            now.store(i, Ordering::SeqCst);
            store.put("p", &format!("c{i}"), "b", Duration::from_secs(60));
            assert!(store.len() <= cap, "len {} over the bound at {i}", store.len());
        }
        assert!(store.evicted() >= 49_000 - cap as u64, "{}", store.evicted());
        assert_eq!(store.get("p", "keeper").await, Ok(Some("a".into())), "the latest-expiring entry survives");
        assert_eq!(store.get("p", "c49999").await, Ok(Some("b".into())));
        assert_eq!(store.get("p", "c0").await, Ok(None));
    }

    #[test]
    fn expired_entries_are_pruned_by_later_inserts() {
        let (clock, now) = manual(0);
        let store = MemorySessionStore::with_capacity(100_000, clock);
        for i in 0..1_000 {
            store.put("p", &format!("old{i}"), "a", Duration::from_millis(10));
        }
        now.store(1_000, Ordering::SeqCst);
        for i in 0..1_000 {
            store.put("p", &format!("new{i}"), "a", Duration::from_secs(10));
        }
        assert_eq!(store.len(), 1_000, "every expired entry was pruned along the way");
    }

    #[test]
    fn zero_capacity_stores_nothing() {
        let (clock, _) = manual(0);
        let store = MemorySessionStore::with_capacity(0, clock);
        store.put("p", "k", "a", Duration::from_secs(1));
        assert!(store.is_empty());
    }
}
