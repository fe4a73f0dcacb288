//! The replicated sticky-session table ([`StickyTable`]): per pool, key → server, with a last
//! use, an expiry and a bound on entries; and its compact in-memory and snapshot forms.
//!
//! # Bound and eviction: least recently used, per pool
//!
//! Each pool holds at most its `[pools.NAME.sticky] max_entries` ([`DEFAULT_MAX_ENTRIES`] when
//! not set). Every [`put`](StickyTable::put) records the proposer's time as the entry's last use;
//! when a pool is over its bound, the entries used least recently go first (counted in
//! [`PoolSummary::evictions`]). Why last use and not soonest expiry: with one TTL per pool the two
//! agree, but a TTL raised by a config change would otherwise protect new idle entries over old
//! busy ones. The data plane re-proposes a binding when it is used with less than half its TTL
//! left, so "last use" is known to within half a TTL. Expired entries are dropped in last-use
//! order before each batch (an entry stored under a longer TTL can keep a shorter-lived one
//! behind it until it is evicted or used; reads never serve an expired entry either way).
//!
//! # Memory per entry
//!
//! What one entry costs matters more than anything else here: a million of them live on every
//! node. So a key that is an IP address (`source_ip`) is kept in 4 or 16 bytes, not as a string
//! ([`StickyKey`]); the server is an index into the pool's interned names; times are `u32`
//! seconds. Each entry sits in two persistent maps (by key, and by last use for eviction), and
//! IPv4 keys have a pair of their own keyed by a bare `u32` (`PoolTable` says why): ≈ 65 B an IPv4
//! entry when the maps are filled in key or time order (a snapshot's decode, and the by-use set
//! always), ≈ 43 B when clients arrive scattered (measured by the `figures` example; README, "A
//! million sticky sessions"). Persistent maps (`imbl`): the state machine publishes a copy of the
//! state after every applied batch, and a copy of these shares structure (O(1)); an insert
//! copies only the O(log n) nodes on its path.
//!
//! # Snapshot form
//!
//! Per pool: the interned server names, the evictions count, and the entries as (key, server
//! index, last use, expiry) — about 15 bytes an IPv4 entry in bincode. In JSON (the admin API) a
//! key is written as its text. [`legacy`] decodes the previous version's snapshots.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use imbl::{OrdMap, OrdSet};
use serde::ser::{SerializeMap, SerializeSeq, SerializeStruct};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Entries a pool keeps when its sticky table does not set `max_entries`.
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;

/// The largest `max_entries` accepted: ≈ 650 MB of memory on every node at the measured cost of
/// an IPv4 key, ≈ 2.5 GB for 32-character session ids.
pub const MAX_ENTRIES_LIMIT: u64 = 10_000_000;

/// A sticky key, stored compactly: a client address in 4 or 16 bytes, anything else (a learned
/// session id) as text. Only a string that prints back exactly as given becomes an address, so
/// the key a lookup builds from the same string always matches.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StickyKey {
    /// An IPv4 address.
    V4([u8; 4]),
    /// An IPv6 address in its canonical text form.
    V6([u8; 16]),
    /// Any other key.
    Text(Box<str>),
}

impl StickyKey {
    /// The compact form of `key`.
    pub fn new(key: &str) -> Self {
        // Ipv4Addr's parser takes only the canonical dotted quad (no leading zeros, no shorthand),
        // so a parsed address prints back as `key`.
        if let Ok(ip) = key.parse::<Ipv4Addr>() {
            return StickyKey::V4(ip.octets());
        }
        if key.contains(':') {
            if let Ok(ip) = key.parse::<Ipv6Addr>() {
                if ip.to_string() == key {
                    return StickyKey::V6(ip.octets());
                }
            }
        }
        StickyKey::Text(key.into())
    }
}

impl fmt::Display for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StickyKey::V4(b) => Ipv4Addr::from(*b).fmt(f),
            StickyKey::V6(b) => Ipv6Addr::from(*b).fmt(f),
            StickyKey::Text(t) => f.write_str(t),
        }
    }
}

/// The binary form of a key, borrowed for writing.
#[derive(Serialize)]
enum KeyRef<'a> {
    V4(&'a [u8; 4]),
    V6(&'a [u8; 16]),
    Text(&'a str),
}

/// The binary form of a key, owned for reading (same variants, same order as [`KeyRef`]).
#[derive(Deserialize)]
enum KeyOwned {
    V4([u8; 4]),
    V6([u8; 16]),
    Text(String),
}

impl Serialize for StickyKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return s.collect_str(self);
        }
        match self {
            StickyKey::V4(b) => KeyRef::V4(b),
            StickyKey::V6(b) => KeyRef::V6(b),
            StickyKey::Text(t) => KeyRef::Text(t),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for StickyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            return Ok(StickyKey::new(&String::deserialize(d)?));
        }
        Ok(match KeyOwned::deserialize(d)? {
            KeyOwned::V4(b) => StickyKey::V4(b),
            KeyOwned::V6(b) => StickyKey::V6(b),
            KeyOwned::Text(t) => StickyKey::Text(t.into()),
        })
    }
}

/// One entry's value: 12 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    /// Index into the pool's interned server names.
    server: u32,
    /// Last use (the proposer's time of the latest put), unix seconds.
    used_s: u32,
    /// Expiry, unix seconds (rounded up from the proposer's milliseconds).
    expires_s: u32,
}

impl Slot {
    fn expired(&self, now_ms: u64) -> bool {
        u64::from(self.expires_s) * 1000 <= now_ms
    }
}

/// Milliseconds → seconds, rounded down (a last use) or up (an expiry), saturating at `u32`.
fn secs(ms: u64, round_up: bool) -> u32 {
    let s = if round_up { ms.div_ceil(1000) } else { ms / 1000 };
    u32::try_from(s).unwrap_or(u32::MAX)
}

/// A key type with a pair of maps of its own (see [`Lru`]).
trait TableKey: Clone + Ord {
    /// The key's element in the by-last-use set, ordered as (last use, key).
    type Used: Clone + Ord;
    fn used(&self, used_s: u32) -> Self::Used;
    fn unpack(used: &Self::Used) -> (u32, Self);
}

/// IPv4 keys: the address as a big-endian `u32`, so its order is the octets' order.
impl TableKey for u32 {
    /// (last use, address) in one word: 8 bytes in a set node, not a 32-byte tuple.
    type Used = u64;
    fn used(&self, used_s: u32) -> u64 {
        (u64::from(used_s) << 32) | u64::from(*self)
    }
    fn unpack(used: &u64) -> (u32, u32) {
        ((used >> 32) as u32, *used as u32)
    }
}

impl TableKey for StickyKey {
    type Used = (u32, StickyKey);
    fn used(&self, used_s: u32) -> (u32, StickyKey) {
        (used_s, self.clone())
    }
    fn unpack(used: &(u32, StickyKey)) -> (u32, StickyKey) {
        used.clone()
    }
}

/// Entries of one key type: by key, and by (last use, key) for eviction.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lru<K: TableKey> {
    entries: OrdMap<K, Slot>,
    by_use: OrdSet<K::Used>,
}

impl<K: TableKey> Default for Lru<K> {
    fn default() -> Self {
        Lru { entries: OrdMap::new(), by_use: OrdSet::new() }
    }
}

impl<K: TableKey> Lru<K> {
    fn remove(&mut self, key: &K) -> Option<Slot> {
        let old = self.entries.remove(key)?;
        self.by_use.remove(&key.used(old.used_s));
        Some(old)
    }

    fn insert(&mut self, key: K, slot: Slot) {
        self.by_use.insert(key.used(slot.used_s));
        if let Some(old) = self.entries.insert(key.clone(), slot) {
            if old.used_s != slot.used_s {
                self.by_use.remove(&key.used(old.used_s));
            }
        }
    }

    /// The least recently used entry's (last use, key).
    fn oldest(&self) -> Option<(u32, K)> {
        self.by_use.get_min().map(K::unpack)
    }
}

/// One pool's bindings.
///
/// IPv4 keys (what `source_ip` mostly stores) live apart from the rest, keyed by a `u32`: an
/// entry then takes 16 bytes in its map's leaf and 8 in the by-use set's, where the general
/// [`StickyKey`] (24 bytes, sized for its text variant) took 40 and 32. Together the two halves
/// keep the order one map by [`StickyKey`] had: by last use, then key, `V4` before the other
/// variants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct PoolTable {
    /// Server names, interned: a [`Slot`] names its server by index. Append-only (a removed
    /// server's name stays; names are few).
    servers: Vec<Arc<str>>,
    v4: Lru<u32>,
    /// IPv6 and text keys (never `V4`).
    other: Lru<StickyKey>,
    /// Entries evicted for the bound since the table began (replicated, so every node agrees).
    evictions: u64,
}

impl PoolTable {
    fn intern(&mut self, server: &str) -> u32 {
        match self.servers.iter().position(|s| &**s == server) {
            Some(i) => i as u32,
            None => {
                self.servers.push(server.into());
                (self.servers.len() - 1) as u32
            }
        }
    }

    fn len(&self) -> usize {
        self.v4.entries.len() + self.other.entries.len()
    }

    fn get(&self, key: &StickyKey) -> Option<&Slot> {
        match key {
            StickyKey::V4(b) => self.v4.entries.get(&u32::from_be_bytes(*b)),
            k => self.other.entries.get(k),
        }
    }

    fn remove(&mut self, key: &StickyKey) -> Option<Slot> {
        match key {
            StickyKey::V4(b) => self.v4.remove(&u32::from_be_bytes(*b)),
            k => self.other.remove(k),
        }
    }

    fn insert(&mut self, key: StickyKey, slot: Slot) {
        match key {
            StickyKey::V4(b) => self.v4.insert(u32::from_be_bytes(b), slot),
            k => self.other.insert(k, slot),
        }
    }

    /// The least recently used entry's key: the smaller (last use, key) of the two halves.
    fn oldest(&self) -> Option<StickyKey> {
        match (self.v4.oldest(), self.other.oldest()) {
            (Some((used, ip)), other) if other.as_ref().is_none_or(|(o, _)| used <= *o) => {
                Some(StickyKey::V4(ip.to_be_bytes()))
            }
            (_, other) => other.map(|(_, k)| k),
        }
    }

    /// Every entry in key order (`V4` keys first, as [`StickyKey`]'s order has them).
    fn iter(&self) -> impl Iterator<Item = (Cow<'_, StickyKey>, &Slot)> {
        let v4 = self.v4.entries.iter().map(|(ip, s)| (Cow::Owned(StickyKey::V4(ip.to_be_bytes())), s));
        v4.chain(self.other.entries.iter().map(|(k, s)| (Cow::Borrowed(k), s)))
    }

    /// Drops expired entries in last-use order; returns how many.
    fn prune(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(key) = self.oldest() {
            if !self.get(&key).is_some_and(|s| s.expired(now_ms)) {
                break;
            }
            self.remove(&key);
            n += 1;
        }
        n
    }

    /// Evicts the least recently used entries until at most `max`; returns how many.
    fn shrink_to(&mut self, max: u64) -> usize {
        let mut n = 0;
        while self.len() as u64 > max {
            match self.oldest() {
                Some(key) => {
                    self.remove(&key);
                    n += 1;
                }
                None => break,
            }
        }
        self.evictions += n as u64;
        n
    }
}

/// What [`StickyTable::get`] finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StickyHit<'a> {
    /// Server name.
    pub server: &'a str,
    /// Expiry, unix ms (whole seconds).
    pub expires_at_ms: u64,
    /// Last use, unix ms (whole seconds).
    pub used_at_ms: u64,
}

/// One pool's figures, for metrics and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSummary {
    /// Entries held (expired ones not yet dropped included).
    pub entries: u64,
    /// Entries evicted for the bound since the table began.
    pub evictions: u64,
}

/// The sticky-session table: pool → key → binding (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StickyTable {
    pools: BTreeMap<String, PoolTable>,
}

/// What one [`StickyTable::put`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PutOutcome {
    /// Entries dropped because they had expired.
    pub expired: usize,
    /// Entries evicted for the bound.
    pub evicted: usize,
}

impl StickyTable {
    /// Number of entries in every pool (expired ones not yet dropped included).
    pub fn len(&self) -> usize {
        self.pools.values().map(PoolTable::len).sum()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.pools.values().all(|p| p.len() == 0)
    }

    /// Per pool: entries and evictions (pools that ever held an entry).
    pub fn summary(&self) -> BTreeMap<String, PoolSummary> {
        self.pools
            .iter()
            .map(|(name, p)| (name.clone(), PoolSummary { entries: p.len() as u64, evictions: p.evictions }))
            .collect()
    }

    /// The server `key` is bound to in `pool`, unless the binding expired at `now_ms`.
    pub fn get(&self, pool: &str, key: &str, now_ms: u64) -> Option<StickyHit<'_>> {
        let table = self.pools.get(pool)?;
        let slot = table.get(&StickyKey::new(key)).filter(|s| !s.expired(now_ms))?;
        Some(StickyHit {
            server: table.servers.get(slot.server as usize)?,
            expires_at_ms: u64::from(slot.expires_s) * 1000,
            used_at_ms: u64::from(slot.used_s) * 1000,
        })
    }

    /// Every entry: (pool, key as text, binding).
    pub fn iter(&self) -> impl Iterator<Item = (&str, String, StickyHit<'_>)> {
        self.pools.iter().flat_map(|(pool, t)| {
            t.iter().filter_map(move |(k, s)| {
                let hit = StickyHit {
                    server: t.servers.get(s.server as usize)?,
                    expires_at_ms: u64::from(s.expires_s) * 1000,
                    used_at_ms: u64::from(s.used_s) * 1000,
                };
                Some((pool.as_str(), k.to_string(), hit))
            })
        })
    }

    /// Drops every pool's expired entries at `now_ms`; returns how many.
    pub(crate) fn prune(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        for t in self.pools.values_mut() {
            n += t.prune(now_ms);
        }
        self.pools.retain(|_, t| t.len() > 0 || t.evictions > 0);
        n
    }

    /// Binds `key` in `pool` to `server` until `expires_at_ms`, used at `now_ms`.
    pub(crate) fn put(&mut self, pool: &str, key: &str, server: &str, expires_at_ms: u64, now_ms: u64) {
        if !self.pools.contains_key(pool) {
            self.pools.insert(pool.to_owned(), PoolTable::default());
        }
        let Some(t) = self.pools.get_mut(pool) else { return };
        let slot = Slot { server: t.intern(server), used_s: secs(now_ms, false), expires_s: secs(expires_at_ms, true) };
        t.insert(StickyKey::new(key), slot);
    }

    /// Evicts least recently used entries of `pool` until it holds at most `max`.
    pub(crate) fn shrink_pool(&mut self, pool: &str, max: u64) -> usize {
        self.pools.get_mut(pool).map_or(0, |t| t.shrink_to(max))
    }

    /// Names of the pools holding entries.
    pub(crate) fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// Drops the entries of `pool` bound to a server for which `gone(server)` is true. Only that
    /// pool's entries are scanned.
    pub(crate) fn forget_servers(&mut self, pool: &str, gone: impl Fn(&str) -> bool) {
        let Some(t) = self.pools.get_mut(pool) else { return };
        let doomed_servers: Vec<u32> =
            t.servers.iter().enumerate().filter(|(_, s)| gone(s)).map(|(i, _)| i as u32).collect();
        if doomed_servers.is_empty() {
            return;
        }
        let doomed: Vec<StickyKey> =
            t.iter().filter(|(_, s)| doomed_servers.contains(&s.server)).map(|(k, _)| k.into_owned()).collect();
        for k in doomed {
            t.remove(&k);
        }
    }
}

// ---- snapshot form --------------------------------------------------------------------------

/// Writes a pool's entries as a sequence of (key, server, last use, expiry) without building
/// a copy of them first (a million entries are written on the snapshot thread).
struct EntriesSer<'a>(&'a PoolTable);

impl Serialize for EntriesSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (k, slot) in self.0.iter() {
            seq.serialize_element(&(&*k, slot.server, slot.used_s, slot.expires_s))?;
        }
        seq.end()
    }
}

struct PoolSer<'a>(&'a PoolTable);

impl Serialize for PoolSer<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let servers: Vec<&str> = self.0.servers.iter().map(|s| &**s).collect();
        let mut st = s.serialize_struct("PoolRepr", 3)?;
        st.serialize_field("servers", &servers)?;
        st.serialize_field("evictions", &self.0.evictions)?;
        st.serialize_field("entries", &EntriesSer(self.0))?;
        st.end()
    }
}

impl Serialize for StickyTable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.pools.len()))?;
        for (name, t) in &self.pools {
            map.serialize_entry(name, &PoolSer(t))?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
struct PoolRepr {
    servers: Vec<String>,
    evictions: u64,
    entries: Vec<(StickyKey, u32, u32, u32)>,
}

impl<'de> Deserialize<'de> for StickyTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let repr = BTreeMap::<String, PoolRepr>::deserialize(d)?;
        let mut pools = BTreeMap::new();
        for (name, p) in repr {
            let mut t = PoolTable {
                servers: p.servers.iter().map(|s| Arc::from(s.as_str())).collect(),
                evictions: p.evictions,
                ..Default::default()
            };
            for (key, server, used_s, expires_s) in p.entries {
                if server as usize >= t.servers.len() {
                    return Err(serde::de::Error::custom(format!(
                        "sticky entry in pool {name:?} names server #{server} of {}",
                        t.servers.len()
                    )));
                }
                t.insert(key, Slot { server, used_s, expires_s });
            }
            pools.insert(name, t);
        }
        Ok(StickyTable { pools })
    }
}

/// The previous version's snapshot form of [`crate::ClusterState`] (string keys, one global
/// bound, no last use), read so a node restarting on an upgraded binary, or receiving a snapshot
/// from a leader not yet upgraded, keeps every binding. The last use of a converted entry is
/// unknown: its expiry stands in (the order the old table evicted in).
pub mod legacy {
    use std::collections::{BTreeMap, BTreeSet};

    use serde::Deserialize;

    use crate::command::NodeId;
    use crate::model::Config;
    use crate::state::{ClusterState, HealthVerdict, ServerOverride};

    #[derive(Deserialize)]
    struct Binding {
        server: String,
        expires_at_ms: u64,
    }

    #[derive(Deserialize)]
    struct Sticky {
        #[allow(dead_code)] // read to stay in step with the bytes; the bound is per pool now
        capacity: usize,
        // Written as an imbl `OrdMap`: a serde map, which reads as a `BTreeMap` alike.
        entries: BTreeMap<String, BTreeMap<String, Binding>>,
    }

    #[derive(Deserialize)]
    struct State {
        #[serde(with = "crate::codec::config_field")]
        config: Config,
        overrides: BTreeMap<String, BTreeMap<String, ServerOverride>>,
        health: BTreeMap<String, BTreeMap<String, HealthVerdict>>,
        sticky: Sticky,
        voters: BTreeSet<NodeId>,
    }

    /// Decodes the previous version's bincode of the state.
    pub fn decode(bytes: &[u8]) -> Result<ClusterState, crate::codec::CodecError> {
        let old: State = crate::codec::decode(bytes)?;
        let mut state = ClusterState {
            config: old.config,
            overrides: old.overrides,
            health: old.health,
            voters: old.voters,
            ..Default::default()
        };
        for (pool, keys) in old.sticky.entries.iter() {
            for (key, b) in keys.iter() {
                state.sticky.put(pool, key, &b.server, b.expires_at_ms, b.expires_at_ms);
            }
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_compact_only_when_they_print_back_the_same() {
        assert_eq!(StickyKey::new("10.0.0.1"), StickyKey::V4([10, 0, 0, 1]));
        assert!(matches!(StickyKey::new("2001:db8::1"), StickyKey::V6(_)));
        for text in ["010.0.0.1", "2001:DB8::1", "2001:db8:0::1", "JSESSIONID-abc", "1.2.3", ""] {
            assert_eq!(StickyKey::new(text), StickyKey::Text(text.into()), "{text}");
            assert_eq!(StickyKey::new(text).to_string(), text);
        }
        for ip in ["10.0.0.1", "2001:db8::1", "::ffff:1.2.3.4", "::1"] {
            assert_eq!(StickyKey::new(ip).to_string(), ip);
        }
    }

    #[test]
    fn an_ipv4_entry_is_about_fifteen_bytes_in_a_snapshot() -> Result<(), crate::codec::CodecError> {
        let mut t = StickyTable::default();
        let now = 1_800_000_000_000;
        for i in 0..10_000u32 {
            let [a, b, c, d] = (0x0a00_0000 + i).to_be_bytes();
            t.put("app", &format!("{a}.{b}.{c}.{d}"), "s1", now + 3_600_000, now);
        }
        let bytes = crate::codec::encode(&t)?;
        assert!(bytes.len() < 10_000 * 17, "{} bytes", bytes.len());
        assert_eq!(crate::codec::decode::<StickyTable>(&bytes)?, t);
        let json = serde_json::to_string(&t).map_err(|e| crate::codec::CodecError::Trailing(e.line()))?;
        assert!(json.contains("\"10.0.0.1\""), "keys read as text in JSON");
        Ok(())
    }

    #[test]
    fn least_recently_used_entries_go_first_and_are_counted() {
        let mut t = StickyTable::default();
        t.put("app", "old-but-long", "a", 100_000_000, 1_000);
        t.put("app", "newer", "a", 50_000_000, 2_000);
        t.put("app", "newest", "b", 50_000_000, 3_000);
        assert_eq!(t.shrink_pool("app", 2), 1);
        assert!(t.get("app", "old-but-long", 3_000).is_none(), "the least recently used went, though it expires last");
        assert_eq!(t.get("app", "newest", 3_000).map(|h| h.server), Some("b"));
        assert_eq!(t.summary()["app"], PoolSummary { entries: 2, evictions: 1 });
    }

    /// The previous design, one map by [`StickyKey`] and one set by (last use, key), as the
    /// reference: the split into IPv4 and other keys must evict and prune in the same order.
    #[derive(Default)]
    struct Reference {
        entries: BTreeMap<StickyKey, (String, u32, u32)>,
        by_use: std::collections::BTreeSet<(u32, StickyKey)>,
    }

    impl Reference {
        fn put(&mut self, key: &str, server: &str, expires_at_ms: u64, now_ms: u64) {
            let k = StickyKey::new(key);
            if let Some((_, used, _)) = self.entries.remove(&k) {
                self.by_use.remove(&(used, k.clone()));
            }
            let used = secs(now_ms, false);
            self.by_use.insert((used, k.clone()));
            self.entries.insert(k, (server.to_owned(), used, secs(expires_at_ms, true)));
        }

        fn pop_while(&mut self, mut go: impl FnMut(&Self, &(String, u32, u32)) -> bool) -> usize {
            let mut n = 0;
            while let Some((_, k)) = self.by_use.first().cloned() {
                if !self.entries.get(&k).is_some_and(|e| go(self, e)) {
                    break;
                }
                self.entries.remove(&k);
                self.by_use.pop_first();
                n += 1;
            }
            n
        }
    }

    fn arb_key() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            (0u8..4).prop_map(|d| format!("10.0.0.{d}")),
            (0u8..4).prop_map(|d| format!("2001:db8::{d}")),
            (0u8..4).prop_map(|d| format!("sess-{d}")),
        ]
    }

    proptest::proptest! {
        #[test]
        fn ipv4_and_other_keys_evict_in_one_lru_order(
            ops in proptest::collection::vec((arb_key(), 0u64..6, 1u64..8, 0u8..3, 0u64..8), 1..80),
        ) {
            let (mut t, mut r) = (StickyTable::default(), Reference::default());
            for (key, used, ttl, server, shrink) in ops {
                let now = used * 1000;
                let server = ["a", "b", "c"][usize::from(server)];
                t.put("app", &key, server, now + ttl * 1000, now);
                r.put(&key, server, now + ttl * 1000, now);
                if shrink < 4 {
                    let evicted = t.shrink_pool("app", shrink);
                    let len = r.entries.len() as u64;
                    proptest::prop_assert_eq!(evicted, r.pop_while(|r, _| r.entries.len() as u64 > shrink.min(len)));
                } else {
                    let expired = t.prune(now + 2000);
                    proptest::prop_assert_eq!(expired, r.pop_while(|_, e| u64::from(e.2) * 1000 <= now + 2000));
                }
                let got: Vec<(String, String, u64)> =
                    t.iter().map(|(_, k, h)| (k, h.server.to_owned(), h.used_at_ms)).collect();
                let want: Vec<(String, String, u64)> =
                    r.entries.iter().map(|(k, e)| (k.to_string(), e.0.clone(), u64::from(e.1) * 1000)).collect();
                proptest::prop_assert_eq!(got, want);
            }
        }
    }

    /// The previous version's snapshot bytes (as its `ClusterState` wrote them) decode with
    /// every binding kept.
    #[test]
    fn the_previous_versions_snapshot_decodes_with_every_binding() -> Result<(), crate::codec::CodecError> {
        use std::collections::BTreeSet;

        #[derive(Serialize)]
        struct OldSticky {
            capacity: usize,
            entries: imbl::OrdMap<String, imbl::OrdMap<String, OldBinding>>,
        }
        #[derive(Clone, Serialize)]
        struct OldBinding {
            server: String,
            expires_at_ms: u64,
        }
        #[derive(Serialize)]
        struct OldState {
            #[serde(with = "crate::codec::config_field")]
            config: crate::Config,
            overrides: BTreeMap<String, BTreeMap<String, crate::state::ServerOverride>>,
            health: BTreeMap<String, BTreeMap<String, crate::state::HealthVerdict>>,
            sticky: OldSticky,
            voters: BTreeSet<u64>,
        }
        let binding = |server: &str| OldBinding { server: server.into(), expires_at_ms: 5_000_000 };
        let keys =
            imbl::OrdMap::from(vec![("10.0.0.1".to_string(), binding("a")), ("sess-9".to_string(), binding("b"))]);
        let old = OldState {
            config: crate::Config::default(),
            overrides: BTreeMap::new(),
            health: BTreeMap::new(),
            sticky: OldSticky { capacity: 1_000_000, entries: imbl::OrdMap::from(vec![("app".to_string(), keys)]) },
            voters: [1, 2, 3].into(),
        };
        let state = legacy::decode(&crate::codec::encode(&old)?)?;
        assert_eq!(state.voters, [1, 2, 3].into());
        assert_eq!(state.sticky.len(), 2);
        assert_eq!(state.sticky.get("app", "10.0.0.1", 0).map(|h| h.server), Some("a"));
        assert_eq!(state.sticky.get("app", "sess-9", 0).map(|h| (h.server, h.expires_at_ms)), Some(("b", 5_000_000)));
        Ok(())
    }
}
