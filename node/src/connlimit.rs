//! Connection caps of one listener: at most `max_connections` open at once, and at most
//! `max_connections_per_client` from any one client IP, so that one client (or a flood) cannot
//! take every slot the listener has.
//!
//! A connection is admitted by taking a [`ConnectionPermit`] and released when the permit is
//! dropped (RAII): however the connection's task ends — normally, by error, by panic, by being
//! cancelled — the counts go back down, so they cannot leak.
//!
//! The total is one atomic. Per-IP counts live in a map split into shards by a hash of the
//! address, each shard behind its own short-held mutex (never across an await), so accepts from
//! different clients rarely meet on a lock. An IP's entry is removed when its count returns to 0,
//! and a shard's map gives memory back once mostly empty: the map holds only clients with open
//! connections, of which there are at most `max_connections` — a flood of distinct addresses
//! costs nothing once its connections are closed. Maps use std's randomly keyed SipHash, so
//! addresses cannot be chosen to collide.
//!
//! The caps can be changed in place ([`ConnectionLimiter::set_limits`]) so a config reload keeps
//! counting the connections already open instead of starting again from zero, which would let
//! twice the cap in until the old ones close.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_cluster::edge::Limits;

/// Shards of the per-IP map: several per core on the machines keel runs on, cheap when empty.
const SHARDS: usize = 32;

/// A shard map with at least this capacity is shrunk when it falls below a quarter full.
const SHRINK_FROM: usize = 64;

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The listener has `max_connections` open.
    #[error("listener at its connection limit")]
    Total,
    /// This client IP has `max_connections_per_client` open.
    #[error("client at its per-client connection limit")]
    PerClient,
}

type Shard = Mutex<HashMap<IpAddr, u32>>;

struct Inner {
    max_total: AtomicU32,
    max_per_client: AtomicU32,
    open: AtomicU32,
    clients: AtomicUsize,
    refused_total: AtomicU64,
    refused_per_client: AtomicU64,
    shard_hasher: RandomState,
    shards: Box<[Shard]>,
}

/// Connection caps of one listener. Cloning is cheap and shares the counts.
#[derive(Clone)]
pub struct ConnectionLimiter {
    inner: Arc<Inner>,
}

/// One admitted connection. Dropping it releases the connection's place in both counts.
#[must_use = "the connection is released as soon as the permit is dropped"]
pub struct ConnectionPermit {
    inner: Arc<Inner>,
    ip: IpAddr,
}

impl ConnectionLimiter {
    /// A limiter enforcing `limits.max_connections` and `limits.max_connections_per_client`.
    pub fn new(limits: &Limits) -> ConnectionLimiter {
        ConnectionLimiter::with_caps(limits.max_connections, limits.max_connections_per_client)
    }

    /// A limiter with explicit caps: `max_total` connections, `max_per_client` per client IP.
    pub fn with_caps(max_total: u32, max_per_client: u32) -> ConnectionLimiter {
        ConnectionLimiter {
            inner: Arc::new(Inner {
                max_total: AtomicU32::new(max_total),
                max_per_client: AtomicU32::new(max_per_client),
                open: AtomicU32::new(0),
                clients: AtomicUsize::new(0),
                refused_total: AtomicU64::new(0),
                refused_per_client: AtomicU64::new(0),
                shard_hasher: RandomState::new(),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            }),
        }
    }

    /// Changes the caps, keeping the connections already open counted. Lowering a cap closes
    /// nothing; it refuses new connections until the count is under it again.
    pub fn set_limits(&self, limits: &Limits) {
        self.inner.max_total.store(limits.max_connections, Ordering::Relaxed);
        self.inner.max_per_client.store(limits.max_connections_per_client, Ordering::Relaxed);
    }

    /// Admits a connection from `ip` if neither cap is reached. The per-client cap is checked
    /// first, so a client over its own cap is counted as [`Refused::PerClient`] even when the
    /// listener is full too: the refusal counters then say who is flooding.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnectionPermit, Refused> {
        let inner = &self.inner;
        let ip = ip.to_canonical();
        {
            let mut map = inner.shard(ip);
            let current = map.get(&ip).copied().unwrap_or(0);
            if current >= inner.max_per_client.load(Ordering::Relaxed) {
                drop(map);
                inner.refused_per_client.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::PerClient);
            }
            // Taken while the shard is held so the per-IP count never needs undoing.
            let max_total = inner.max_total.load(Ordering::Relaxed);
            if inner.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_total).then(|| n + 1)).is_err()
            {
                drop(map);
                inner.refused_total.fetch_add(1, Ordering::Relaxed);
                return Err(Refused::Total);
            }
            match map.entry(ip) {
                Entry::Occupied(mut e) => *e.get_mut() += 1,
                Entry::Vacant(e) => {
                    e.insert(1);
                    inner.clients.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(ConnectionPermit { inner: Arc::clone(inner), ip })
    }

    /// Connections open now.
    pub fn open(&self) -> u32 {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Distinct client IPs with a connection open now (the entries of the per-IP map).
    pub fn clients(&self) -> usize {
        self.inner.clients.load(Ordering::Relaxed)
    }

    /// Connections from `ip` open now.
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        self.inner.shard(ip).get(&ip).copied().unwrap_or(0)
    }

    /// Connections refused because the listener was full.
    pub fn refused_total(&self) -> u64 {
        self.inner.refused_total.load(Ordering::Relaxed)
    }

    /// Connections refused because their client IP was at its cap.
    pub fn refused_per_client(&self) -> u64 {
        self.inner.refused_per_client.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// Locks `ip`'s shard. The map is only changed by whole-entry operations, so a poisoned lock
    /// is still consistent and is simply taken.
    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, u32>> {
        let index = (self.shard_hasher.hash_one(ip) % SHARDS as u64) as usize;
        self.shards[index].lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, ip: IpAddr) {
        {
            let mut map = self.shard(ip);
            if let Entry::Occupied(mut e) = map.entry(ip) {
                if *e.get() <= 1 {
                    e.remove();
                    self.clients.fetch_sub(1, Ordering::Relaxed);
                    // Give back what a past flood made the map grow to; the doubling headroom
                    // keeps this from reallocating on every connection.
                    if map.capacity() >= SHRINK_FROM && map.len() * 4 < map.capacity() {
                        let len = map.len();
                        map.shrink_to(len * 2);
                    }
                } else {
                    *e.get_mut() -= 1;
                }
            }
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.inner.release(self.ip);
    }
}

impl ConnectionPermit {
    /// The client address this permit counts against (IPv4-mapped addresses as IPv4).
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPermit").field("ip", &self.ip).finish_non_exhaustive()
    }
}

impl fmt::Debug for ConnectionLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLimiter")
            .field("max_total", &self.inner.max_total.load(Ordering::Relaxed))
            .field("max_per_client", &self.inner.max_per_client.load(Ordering::Relaxed))
            .field("open", &self.open())
            .field("clients", &self.clients())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn caps_are_enforced_exactly() {
        let limiter = ConnectionLimiter::with_caps(5, 2);
        let mut permits = Vec::new();
        for last in 1..=2 {
            permits.push(limiter.try_acquire(ip(last)).unwrap());
            permits.push(limiter.try_acquire(ip(last)).unwrap());
            assert_eq!(limiter.try_acquire(ip(last)).unwrap_err(), Refused::PerClient);
        }
        permits.push(limiter.try_acquire(ip(3)).unwrap());
        assert_eq!(limiter.open(), 5);
        assert_eq!(limiter.try_acquire(ip(4)).unwrap_err(), Refused::Total);
        // Over both caps: the client's own cap is the reason given.
        assert_eq!(limiter.try_acquire(ip(1)).unwrap_err(), Refused::PerClient);
        assert_eq!((limiter.refused_total(), limiter.refused_per_client()), (1, 3));
        assert_eq!(limiter.open(), 5, "refusals take nothing");
        assert_eq!(limiter.clients(), 3);
        assert_eq!(limiter.open_from(ip(4)), 0);
    }

    #[test]
    fn dropping_a_permit_releases_both_counts_and_removes_the_entry_at_zero() {
        let limiter = ConnectionLimiter::with_caps(2, 1);
        let first = limiter.try_acquire(ip(1)).unwrap();
        let other = limiter.try_acquire(ip(2)).unwrap();
        assert_eq!(limiter.try_acquire(ip(3)).unwrap_err(), Refused::Total);
        drop(first);
        assert_eq!((limiter.open(), limiter.clients(), limiter.open_from(ip(1))), (1, 1, 0));
        let again = limiter.try_acquire(ip(1)).unwrap();
        assert_eq!(again.ip(), ip(1));
        drop((again, other));
        assert_eq!((limiter.open(), limiter.clients()), (0, 0));
        for shard in limiter.inner.shards.iter() {
            assert!(shard.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn a_flood_from_one_ip_is_capped_while_another_ip_connects() {
        let limiter = ConnectionLimiter::new(&Limits::default());
        let flood: Vec<_> = (0..10_000).filter_map(|_| limiter.try_acquire(ip(66)).ok()).collect();
        assert_eq!(flood.len(), Limits::default().max_connections_per_client as usize);
        assert_eq!(limiter.refused_per_client(), 10_000 - flood.len() as u64);
        let other = limiter.try_acquire(ip(7)).unwrap();
        assert_eq!(limiter.open(), flood.len() as u32 + 1);
        drop(other);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_their_ipv4_client() {
        let limiter = ConnectionLimiter::with_caps(10, 1);
        let v4 = Ipv4Addr::new(198, 51, 100, 1);
        let _permit = limiter.try_acquire(IpAddr::V4(v4)).unwrap();
        assert_eq!(limiter.try_acquire(IpAddr::V6(v4.to_ipv6_mapped())).unwrap_err(), Refused::PerClient);
        let _v6 = limiter.try_acquire(IpAddr::V6(Ipv6Addr::LOCALHOST)).unwrap();
    }

    #[test]
    fn set_limits_keeps_open_connections_counted() {
        let limiter = ConnectionLimiter::with_caps(3, 3);
        let held: Vec<_> = (1..=3).map(|i| limiter.try_acquire(ip(i)).unwrap()).collect();
        limiter.set_limits(&Limits { max_connections: 2, max_connections_per_client: 3, ..Limits::default() });
        assert_eq!(limiter.try_acquire(ip(9)).unwrap_err(), Refused::Total);
        drop(held);
        let _a = limiter.try_acquire(ip(9)).unwrap();
        let _b = limiter.try_acquire(ip(9)).unwrap();
        assert_eq!(limiter.try_acquire(ip(9)).unwrap_err(), Refused::Total);
    }

    #[test]
    fn concurrent_acquire_and_release_leave_every_count_at_zero() {
        let limiter = ConnectionLimiter::with_caps(64, 4);
        std::thread::scope(|scope| {
            for thread in 0..8u8 {
                let limiter = limiter.clone();
                scope.spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..20_000u32 {
                        // Eight threads over sixteen addresses: threads share clients.
                        let client = ip((thread + (round % 7) as u8) % 16);
                        if let Ok(permit) = limiter.try_acquire(client) {
                            held.push(permit);
                        }
                        assert!(limiter.open() <= 64);
                        if !held.is_empty() && (held.len() > 6 || round % 3 == 0) {
                            drop(held.swap_remove(fastrand::usize(..held.len())));
                        }
                    }
                });
            }
        });
        assert_eq!((limiter.open(), limiter.clients()), (0, 0));
        for shard in limiter.inner.shards.iter() {
            assert!(shard.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn the_map_gives_memory_back_after_a_flood_of_addresses() {
        let limiter = ConnectionLimiter::with_caps(100_000, 1);
        let flood: Vec<_> =
            (0..50_000u32).map(|i| limiter.try_acquire(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))).unwrap()).collect();
        assert_eq!(limiter.clients(), 50_000);
        drop(flood);
        assert_eq!((limiter.open(), limiter.clients()), (0, 0));
        let capacity: usize = limiter.inner.shards.iter().map(|s| s.lock().unwrap().capacity()).sum();
        assert!(capacity <= SHARDS * SHRINK_FROM * 2, "{capacity} slots kept");
    }
}
