//! Per-client request rate limiting: one [`RateLimiter`] per `rate_limit` setting (a listener's,
//! or a route's), holding a token bucket per client in a table whose size is fixed up front.
//!
//! # The bucket: GCRA
//!
//! Each client's bucket is stored as one number, its *theoretical arrival time* (TAT), in the
//! generic cell rate algorithm (the token bucket written as a schedule): with `T = per / rate`
//! (the time one token takes to refill) and tolerance `τ = (burst − 1) · T`, a request at `now`
//! is allowed when `max(TAT, now) − now ≤ τ`, and then `TAT = max(TAT, now) + T`. That is exactly a
//! bucket of `burst` tokens refilled at `rate` per `per` — `tokens = burst − (TAT − now) / T` —
//! but it needs no float, no separate "last refill" time, and no refill step: integer
//! nanoseconds, exact, and 8 bytes. A limited request does not consume anything, and its
//! `retry_after` is exactly the time until one token is back (`TAT − τ − now`), so a client that
//! waits that long is served.
//!
//! # The table: fixed, set-associative, locked per set
//!
//! The table is `⌈max_clients / 8⌉` sets of 8 entries (the last set gets only the remainder, so
//! at most `max_clients` clients are ever tracked), allocated once at construction and never
//! grown. An entry is the client's 64-bit key hash plus its TAT: 16 bytes. A key lives in one
//! set, chosen by hashing it again under a per-limiter random seed (so a client cannot aim its
//! keys at someone else's set); a lookup scans those 8 entries. Each set has its own
//! `std::sync::Mutex`, held for that scan and a few arithmetic instructions, never across an
//! await: two requests contend only if they land in the same one of the 12,500 sets of the
//! default table. There is no global lock; the only shared writes are two relaxed counters.
//!
//! **Memory:** a set is 8 × 16 bytes of entries + 8 bytes of mutex = 136 bytes, i.e. **17 bytes
//! per client: the default 100,000 clients ≈ 1.7 MB** per limiter ([`RateLimiter::table_bytes`]
//! gives the exact figure), whatever the traffic. Header keys are hashed (xxh3, fixed seed), never
//! stored, so a hostile 8 KiB header costs the same 8 bytes as an IP address.
//!
//! # When a set is full
//!
//! A new client takes a free entry of its set; failing that, the entry with the earliest TAT —
//! the bucket closest to full, whose loss changes least. A bucket already back to full
//! (`TAT ≤ now`) is indistinguishable from an absent one, so reusing it forgets nothing and is
//! not counted; replacing one that was still partly drained is an *eviction*, counted in
//! [`RateLimiter::evictions`]. This beats plain LRU under a flood of distinct keys: each flood key
//! has spent one token, while a client being held at its limit has spent them all, so the flood
//! evicts itself and the abuser stays tracked.
//!
//! An evicted client starts again with a full bucket. That is the choice that favours
//! availability: forgetting can only let a client through, never limit one that should not be.
//! The cost is that a client evicted while limited gets a fresh burst, so `max_clients` should
//! exceed the number of clients active at once (within `burst / rate` of their last request);
//! a rising eviction counter says it does not.
//!
//! Keys: the client IP (IPv4-mapped IPv6 addresses count as their IPv4 address), or the value of
//! the configured header when the request has a non-empty one. Note that keying by IP cannot hold
//! back a client that controls many addresses (an IPv6 /64 is 2⁶⁴ of them): each address is a
//! new client with a full bucket, and such a flood is bounded only by the table size and the
//! connection limits.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::HeaderMap;
use keel_cluster::edge::RateLimit;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Entries per set: enough choice that a set rarely evicts a client that still matters, few
/// enough that a lookup reads only 128 bytes.
const WAYS: usize = 8;

/// xxh3 seed for keys made from an IP address ("keel-ip_"). Distinct from [`HEADER_SEED`] so an
/// API key that spells an address is not the same client as that address.
const IP_SEED: u64 = 0x6b65_656c_2d69_705f;

/// xxh3 seed for keys made from a header value ("keel-hdr").
const HEADER_SEED: u64 = 0x6b65_656c_2d68_6472;

/// The key of an unused entry; [`ClientKey`] never takes this value.
const EMPTY: u64 = 0;

/// Who a request is counted against: a 64-bit hash of the client's IP address or of its key
/// header's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(u64);

impl ClientKey {
    /// The key of a request under `config`: the value of `config.header` when that is set and
    /// the request carries a non-empty value (the first one, if repeated), else the client's IP.
    pub fn from_request(config: &RateLimit, headers: &HeaderMap, ip: IpAddr) -> ClientKey {
        let value = config.header.as_deref().and_then(|name| headers.get(name)).map(|v| v.as_bytes());
        match value {
            Some(value) if !value.is_empty() => ClientKey::from_header_value(value),
            _ => ClientKey::from_ip(ip),
        }
    }

    /// The key of a client IP address.
    pub fn from_ip(ip: IpAddr) -> ClientKey {
        // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; they are the same client.
        let bytes = match ip.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        ClientKey::nonzero(xxh3_64_with_seed(&bytes, IP_SEED))
    }

    /// The key of a header value (an API key, a token).
    pub fn from_header_value(value: &[u8]) -> ClientKey {
        ClientKey::nonzero(xxh3_64_with_seed(value, HEADER_SEED))
    }

    fn nonzero(hash: u64) -> ClientKey {
        // Zero marks a free entry; the one hash that lands there shares a bucket with key 1.
        ClientKey(hash.max(1))
    }
}

/// What to do with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it; one token was taken.
    Allow,
    /// Refuse it (429); nothing was taken.
    Limit {
        /// Time until the client has a token again: a request sent that much later is allowed.
        retry_after: Duration,
    },
}

/// The `Retry-After` value for a limited request: whole seconds, rounded up, at least 1 (the
/// header cannot say "less than a second", and 0 would invite an immediate retry).
pub fn retry_after_secs(retry_after: Duration) -> u64 {
    let secs = retry_after.as_secs();
    let secs = if retry_after.subsec_nanos() > 0 { secs.saturating_add(1) } else { secs };
    secs.max(1)
}

/// One table entry: a client and its bucket.
#[derive(Clone, Copy)]
struct Entry {
    /// [`ClientKey`] hash, or [`EMPTY`].
    key: u64,
    /// Theoretical arrival time, in nanoseconds since the limiter's epoch.
    tat: u64,
}

const FREE: Entry = Entry { key: EMPTY, tat: 0 };

type Set = Mutex<[Entry; WAYS]>;

/// What taking a slot for a new client cost, reported outside the lock.
enum Claimed {
    /// A never-used entry.
    Free,
    /// An entry whose bucket had refilled: nothing forgotten.
    Idle,
    /// An entry whose bucket was still partly drained.
    Evicted,
}

/// Token buckets for the clients of one `rate_limit` setting. Shared by reference between all
/// connections of its listener or route; every method takes `&self`.
pub struct RateLimiter {
    config: RateLimit,
    /// Nanoseconds to refill one token (`T`), at least 1.
    interval: u64,
    /// How far ahead of now a client's TAT may be and still be served (`τ`).
    tolerance: u64,
    /// Instant that TATs count from.
    epoch: Instant,
    /// Seed of the key → set hash, random so clients cannot pick their set.
    seed: u64,
    sets: Box<[Set]>,
    /// Usable entries of the last set (the others have [`WAYS`]).
    last_ways: usize,
    tracked: AtomicUsize,
    evictions: AtomicU64,
}

impl RateLimiter {
    /// A limiter for `config`, with every client's bucket full. `now` is the time base: every
    /// later `now` passed to [`check`](Self::check) must come from the same clock and not be
    /// earlier (an earlier one counts as `now`). Out-of-range settings that validation rejects
    /// (zero rate, burst or `max_clients`) are read as 1 rather than trusted to be absent.
    pub fn new(config: &RateLimit, now: Instant) -> RateLimiter {
        let rate = u128::from(config.rate.max(1));
        let burst = u64::from(config.burst().max(1));
        let interval = (config.per.get().as_nanos() / rate).clamp(1, u128::from(u64::MAX));
        let interval = u64::try_from(interval).unwrap_or(u64::MAX);
        let capacity = usize::try_from(config.max_clients.max(1)).unwrap_or(usize::MAX);
        let sets = capacity.div_ceil(WAYS);
        RateLimiter {
            config: config.clone(),
            interval,
            tolerance: interval.saturating_mul(burst - 1),
            epoch: now,
            seed: fastrand::u64(..),
            sets: (0..sets).map(|_| Mutex::new([FREE; WAYS])).collect(),
            last_ways: capacity - (sets - 1) * WAYS,
            tracked: AtomicUsize::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The setting this limiter enforces: a reload whose setting is equal can keep the limiter
    /// (and its clients' state) instead of building a new one.
    pub fn config(&self) -> &RateLimit {
        &self.config
    }

    /// Counts a request from `key` at `now`: allowed if the client has a token (and takes it).
    pub fn check(&self, key: &ClientKey, now: Instant) -> Decision {
        let now = self.ticks(now);
        let (set, ways) = self.set_of(key);
        let (decision, claimed) = {
            let mut set = lock(set);
            let entries = &mut set[..ways];
            let (slot, claimed) = find_or_claim(entries, key.0, now);
            let entry = &mut entries[slot];
            let tat = entry.tat.max(now);
            let ahead = tat - now;
            let decision = if ahead > self.tolerance {
                Decision::Limit { retry_after: Duration::from_nanos(ahead - self.tolerance) }
            } else {
                entry.tat = tat.saturating_add(self.interval);
                Decision::Allow
            };
            (decision, claimed)
        };
        match claimed {
            Some(Claimed::Free) => {
                self.tracked.fetch_add(1, Ordering::Relaxed);
            }
            Some(Claimed::Evicted) => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            Some(Claimed::Idle) | None => {}
        }
        decision
    }

    /// Tokens `key` has at `now` (fractional while refilling); `burst` for an untracked client.
    /// For inspection and tests: it takes nothing.
    pub fn tokens(&self, key: &ClientKey, now: Instant) -> f64 {
        let now = self.ticks(now);
        let (set, ways) = self.set_of(key);
        let tat = lock(set)[..ways].iter().find(|e| e.key == key.0).map_or(now, |e| e.tat);
        let ahead = tat.saturating_sub(now);
        (self.tolerance as f64 + self.interval as f64 - ahead as f64) / self.interval as f64
    }

    /// Clients currently in the table, including idle ones whose entries are free to reuse.
    /// Never more than [`capacity`](Self::capacity).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Clients forgotten while their bucket was still partly drained, to make room for another
    /// (see the module doc). Rising steadily: `max_clients` is too small for the traffic.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Most clients tracked at once: the setting's `max_clients`.
    pub fn capacity(&self) -> usize {
        (self.sets.len() - 1) * WAYS + self.last_ways
    }

    /// Bytes of the client table, fixed at construction.
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val::<[Set]>(&self.sets)
    }

    fn ticks(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn set_of(&self, key: &ClientKey) -> (&Set, usize) {
        let hash = xxh3_64_with_seed(&key.0.to_le_bytes(), self.seed);
        // Multiply-shift maps the hash onto 0..len without a division.
        let index = ((u128::from(hash) * self.sets.len() as u128) >> 64) as usize;
        let ways = if index + 1 == self.sets.len() { self.last_ways } else { WAYS };
        (&self.sets[index], ways)
    }
}

/// The entry of `key` in its set, or the one it takes as a new client — a free one, else the one
/// with the earliest TAT — initialised to a full bucket. One pass over the set.
fn find_or_claim(entries: &mut [Entry], key: u64, now: u64) -> (usize, Option<Claimed>) {
    let mut free = None;
    let mut earliest = 0;
    for (slot, entry) in entries.iter().enumerate() {
        if entry.key == key {
            return (slot, None);
        }
        if entry.key == EMPTY {
            free = free.or(Some(slot));
        } else if entry.tat < entries[earliest].tat || entries[earliest].key == EMPTY {
            earliest = slot;
        }
    }
    let (slot, how) = match free {
        Some(slot) => (slot, Claimed::Free),
        None if entries[earliest].tat <= now => (earliest, Claimed::Idle),
        None => (earliest, Claimed::Evicted),
    };
    entries[slot] = Entry { key, tat: now };
    (slot, Some(how))
}

/// Locks a set. A panic while one was held cannot leave it inconsistent (entries are written
/// whole), so a poisoned lock is simply taken.
fn lock(set: &Set) -> MutexGuard<'_, [Entry; WAYS]> {
    set.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("config", &self.config)
            .field("capacity", &self.capacity())
            .field("tracked", &self.tracked())
            .field("evictions", &self.evictions())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::HeaderValue;
    use keel_cluster::HumanDuration;
    use proptest::prelude::*;

    use super::*;

    fn setting(rate: u32, per: Duration, burst: Option<u32>) -> RateLimit {
        RateLimit { rate, per: HumanDuration(per), burst, header: None, max_clients: 100_000 }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_abuser_is_limited_while_a_normal_client_never_is() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(&setting(10, Duration::from_secs(1), None), t0);
        let (abuser, normal) = (ClientKey::from_ip(ip(1)), ClientKey::from_ip(ip(2)));
        let mut abuser_limited = 0;
        // Ten seconds: the abuser sends 100/s, the normal client 5/s.
        for step in 0..1000u64 {
            let now = t0 + ms(step * 10);
            if limiter.check(&abuser, now) != Decision::Allow {
                abuser_limited += 1;
            }
            if step % 20 == 0 {
                assert_eq!(limiter.check(&normal, now), Decision::Allow, "normal client limited at {step}");
            }
        }
        // 1000 sent, 10 of burst + 10/s over ~10 s allowed.
        assert!((885..=895).contains(&abuser_limited), "{abuser_limited}");
    }

    #[test]
    fn a_limited_client_is_served_again_after_the_window() {
        let t0 = Instant::now();
        let limiter = RateLimiter::new(&setting(3, Duration::from_secs(1), None), t0);
        let key = ClientKey::from_ip(ip(1));
        for _ in 0..3 {
            assert_eq!(limiter.check(&key, t0), Decision::Allow);
        }
        assert!(matches!(limiter.check(&key, t0 + ms(100)), Decision::Limit { .. }));
        let later = t0 + Duration::from_secs(1);
        for _ in 0..3 {
            assert_eq!(limiter.check(&key, later), Decision::Allow);
        }
        assert!(matches!(limiter.check(&key, later), Decision::Limit { .. }));
    }

    #[test]
    fn burst_is_honoured_exactly() {
        let t0 = Instant::now();
        // 10/s with a burst of 5: five at once, then one every 100 ms.
        let limiter = RateLimiter::new(&setting(10, Duration::from_secs(1), Some(5)), t0);
        let key = ClientKey::from_ip(ip(1));
        for i in 0..5 {
            assert_eq!(limiter.check(&key, t0), Decision::Allow, "request {i}");
        }
        assert_eq!(limiter.check(&key, t0), Decision::Limit { retry_after: ms(100) });
        assert_eq!(limiter.check(&key, t0 + ms(30)), Decision::Limit { retry_after: ms(70) });
        // Not a nanosecond early, and exactly on time.
        let due = t0 + ms(100);
        assert!(matches!(limiter.check(&key, due - Duration::from_nanos(1)), Decision::Limit { .. }));
        assert_eq!(limiter.check(&key, due), Decision::Allow);
        assert_eq!(limiter.check(&key, due), Decision::Limit { retry_after: ms(100) });
    }

    #[test]
    fn burst_larger_than_rate_and_slow_periods() {
        let t0 = Instant::now();
        // 2 per minute, burst 4: the fifth waits 30 s.
        let limiter = RateLimiter::new(&setting(2, Duration::from_secs(60), Some(4)), t0);
        let key = ClientKey::from_ip(ip(1));
        for _ in 0..4 {
            assert_eq!(limiter.check(&key, t0), Decision::Allow);
        }
        assert_eq!(limiter.check(&key, t0), Decision::Limit { retry_after: Duration::from_secs(30) });
        assert!((limiter.tokens(&key, t0 + Duration::from_secs(45)) - 1.5).abs() < 1e-9);
    }

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_nanos(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn header_keys_separate_clients_behind_one_ip_and_fall_back_to_the_ip() {
        let mut config = setting(1, Duration::from_secs(60), None);
        config.header = Some("X-Api-Key".into());
        let shared_ip = ip(7);
        let with_key = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("x-api-key", HeaderValue::from_static(value));
            ClientKey::from_request(&config, &headers, shared_ip)
        };
        let (alice, bob) = (with_key("alice"), with_key("bob"));
        let anonymous = ClientKey::from_request(&config, &HeaderMap::new(), shared_ip);
        let empty = with_key("");
        assert_ne!(alice, bob);
        assert_ne!(alice, anonymous);
        assert_eq!(anonymous, ClientKey::from_ip(shared_ip));
        assert_eq!(empty, anonymous, "an empty value identifies nobody");
        // A header value that spells the address is still not the address.
        assert_ne!(with_key("192.0.2.7"), anonymous);
        // Without a configured header, the header is ignored.
        let mut by_ip = config.clone();
        by_ip.header = None;
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("alice"));
        assert_eq!(ClientKey::from_request(&by_ip, &headers, shared_ip), anonymous);

        let t0 = Instant::now();
        let limiter = RateLimiter::new(&config, t0);
        for key in [alice, bob, anonymous] {
            assert_eq!(limiter.check(&key, t0), Decision::Allow);
        }
        for key in [alice, bob, anonymous] {
            assert!(matches!(limiter.check(&key, t0), Decision::Limit { .. }));
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_client() {
        let v4 = Ipv4Addr::new(198, 51, 100, 9);
        assert_eq!(ClientKey::from_ip(IpAddr::V4(v4)), ClientKey::from_ip(IpAddr::V6(v4.to_ipv6_mapped())));
        assert_ne!(ClientKey::from_ip(IpAddr::V4(v4)), ClientKey::from_ip("2001:db8::9".parse().unwrap()));
    }

    #[test]
    fn a_full_table_reuses_idle_entries_without_counting_them() {
        let t0 = Instant::now();
        let mut config = setting(1, Duration::from_secs(1), None);
        config.max_clients = 3;
        let limiter = RateLimiter::new(&config, t0);
        assert_eq!(limiter.capacity(), 3);
        for i in 0..3 {
            limiter.check(&ClientKey::from_ip(ip(i)), t0);
        }
        assert_eq!(limiter.tracked(), 3);
        // Still refilling: taking their place forgets something.
        limiter.check(&ClientKey::from_ip(ip(3)), t0);
        assert_eq!((limiter.tracked(), limiter.evictions()), (3, 1));
        // A second later every bucket is full again: reuse is free.
        for i in 10..20 {
            limiter.check(&ClientKey::from_ip(ip(i)), t0 + Duration::from_secs(2 + u64::from(i)));
        }
        assert_eq!((limiter.tracked(), limiter.evictions()), (3, 1));
    }

    #[test]
    fn a_flood_of_new_keys_does_not_evict_a_limited_client() {
        let t0 = Instant::now();
        let mut config = setting(10, Duration::from_secs(1), None);
        config.max_clients = 8; // a single set
        let limiter = RateLimiter::new(&config, t0);
        let abuser = ClientKey::from_ip(ip(200));
        while limiter.check(&abuser, t0) == Decision::Allow {}
        for i in 0..10_000u32 {
            limiter.check(&ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(i))), t0 + ms(1));
        }
        assert!(matches!(limiter.check(&abuser, t0 + ms(2)), Decision::Limit { .. }));
        assert_eq!(limiter.evictions(), 10_000 - 7);
    }

    /// The 1M-key flood runs in a child process of the test binary, alone, so that the RSS it
    /// measures is not disturbed by tests running on other threads.
    const CHILD: &str = "KEEL_RATELIMIT_RSS_CHILD";

    #[test]
    fn a_million_clients_stay_within_the_table_bound() {
        if std::env::var_os(CHILD).is_some() {
            return million_clients_in_this_process();
        }
        let full = concat!(module_path!(), "::a_million_clients_stay_within_the_table_bound");
        let name = full.split_once("::").map_or(full, |(_, rest)| rest);
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        println!("{stdout}");
        assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains("rss growth"), "the child did not run the test: {stdout}");
    }

    /// A field of /proc/self/status, in bytes.
    fn status_bytes(field: &str) -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    fn million_clients_in_this_process() {
        // Fault in the code this test runs first, so RSS growth is the table's, not the binary's.
        let warm_up = RateLimiter::new(
            &RateLimit { max_clients: 8, ..setting(1, Duration::from_secs(60), None) },
            Instant::now(),
        );
        for i in 0..100u32 {
            warm_up.check(&ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(i))), Instant::now());
        }
        let (rss_before, anon_before) = (status_bytes("VmRSS:"), status_bytes("RssAnon:"));
        let t0 = Instant::now();
        // One request per minute per client: nobody's bucket refills during the test, so every
        // replacement is a real eviction.
        let limiter = RateLimiter::new(&setting(1, Duration::from_secs(60), None), t0);
        let documented = 17 * 100_000;
        assert!(limiter.table_bytes() <= documented, "{} bytes", limiter.table_bytes());
        let started = Instant::now();
        for i in 0..1_000_000u32 {
            let key = ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
            assert_eq!(limiter.check(&key, t0), Decision::Allow);
            if i % 4096 == 0 {
                assert!(limiter.tracked() <= 100_000);
            }
        }
        let elapsed = started.elapsed();
        let rss_growth = status_bytes("VmRSS:").saturating_sub(rss_before);
        let anon_growth = status_bytes("RssAnon:").saturating_sub(anon_before);
        println!(
            "1M keys in {elapsed:?}: tracked {}, evictions {}, table {} bytes, rss growth {rss_growth} bytes \
             (anonymous {anon_growth})",
            limiter.tracked(),
            limiter.evictions(),
            limiter.table_bytes()
        );
        assert!(limiter.tracked() <= 100_000);
        assert!(limiter.tracked() >= 99_000, "sets left mostly empty: {}", limiter.tracked());
        // Every key was new: it either filled a free entry or evicted one.
        assert_eq!(limiter.tracked() as u64 + limiter.evictions(), 1_000_000);
        assert!(rss_growth < 2 * documented + 512 * 1024, "rss grew {rss_growth} bytes");
        assert!(anon_growth < 2 * documented + 512 * 1024, "heap grew {anon_growth} bytes");
    }

    /// One step of a client's traffic: which of a few clients, and how long after the last step.
    fn steps() -> impl Strategy<Value = Vec<(u8, u64)>> {
        prop::collection::vec((0u8..3, prop_oneof![Just(0u64), 0u64..2_000_000, 0u64..2_000_000_000]), 1..300)
    }

    proptest! {
        #[test]
        fn tokens_stay_within_burst_and_limits_always_say_when(
            rate in 1u32..1000,
            per_ms in 1u64..120_000,
            burst in prop::option::of(1u32..50),
            steps in steps(),
        ) {
            let config = setting(rate, ms(per_ms), burst);
            let burst = f64::from(config.burst());
            let t0 = Instant::now();
            let limiter = RateLimiter::new(&config, t0);
            let interval = Duration::from_nanos(limiter.interval);
            let mut now = t0;
            let mut allowed: Vec<Vec<Instant>> = vec![Vec::new(); 3];
            for (client, gap) in steps {
                now += Duration::from_nanos(gap);
                let key = ClientKey::from_ip(ip(client));
                let tokens = limiter.tokens(&key, now);
                prop_assert!(tokens <= burst + 1e-9 && tokens >= -1e-9, "tokens {tokens} of {burst}");
                match limiter.check(&key, now) {
                    Decision::Allow => {
                        prop_assert!(tokens >= 1.0 - 1e-9, "allowed with {tokens} tokens");
                        allowed[usize::from(client)].push(now);
                    }
                    Decision::Limit { retry_after } => {
                        prop_assert!(retry_after > Duration::ZERO);
                        prop_assert!(tokens < 1.0, "limited with {tokens} tokens");
                        // Exact: a nanosecond early is still too early, on time is served.
                        let due = now + retry_after;
                        let early = limiter.check(&key, due - Duration::from_nanos(1));
                        prop_assert!(matches!(early, Decision::Limit { .. }), "early: {:?}", early);
                        prop_assert_eq!(limiter.check(&key, due), Decision::Allow);
                        allowed[usize::from(client)].push(due);
                        now = due;
                    }
                }
            }
            // The guarantee itself: in any window, at most burst + window / T requests.
            for times in &allowed {
                for (i, first) in times.iter().enumerate() {
                    for (j, last) in times.iter().enumerate().skip(i) {
                        let window = last.duration_since(*first).as_nanos() as f64 / interval.as_nanos() as f64;
                        prop_assert!((j - i + 1) as f64 <= burst + window + 1e-9);
                    }
                }
            }
        }
    }
}
