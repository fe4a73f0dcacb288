//! [`RedisSessionStore`]: bindings in a Redis server shared by the nodes (`store = "redis"`),
//! for active-active clusters with many sessions.
//!
//! Redis is optional infrastructure, so it must never take the proxy down with it:
//! - the connection is a `redis::aio::ConnectionManager`, created lazily (building the store
//!   never waits for Redis) and reconnecting by itself;
//! - a `GET` has [`RedisStoreSettings::get_timeout`] (50 ms); on any failure the lookup answers
//!   `Err` and the request falls back to the balancing algorithm;
//! - after a failure the store fails fast for [`RedisStoreSettings::retry_after`] (1 s) instead of
//!   paying the timeout on every request, then lets requests probe again: stickiness resumes
//!   within about a second of Redis coming back;
//! - errors are counted (`errors` in [`StoreStats`]) and logged at most once per
//!   [`RedisStoreSettings::log_every`] (10 s), never per request;
//! - writes (`SET keel:sticky:{pool}:{key} server PX ttl_ms`) are fire-and-forget through a
//!   bounded queue, pipelined by a background writer; a full queue drops and counts.
//!
//! A local map remembers recent writes for the refresh rule (see [`super`]), so a busy client
//! costs a `SET` about twice per TTL, not once per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use super::memory::TtlMap;
use super::{millis, needs_write, Clock, SessionStore, StickyError, StoreError, StoreGet, StoreStats};
use keel_cluster::throttle::LogThrottle;

/// Prefix of every key keel writes: `keel:sticky:{pool}:{key}`.
pub const KEY_PREFIX: &str = "keel:sticky:";

/// Tuning of the Redis store.
#[derive(Clone, Debug)]
pub struct RedisStoreSettings {
    /// Longest wait for a `GET` (50 ms).
    pub get_timeout: Duration,
    /// Longest wait for one pipelined batch of `SET`s (500 ms).
    pub write_timeout: Duration,
    /// Longest wait for a TCP connection to Redis (200 ms).
    pub connect_timeout: Duration,
    /// How long lookups fail fast after an error before probing Redis again (1 s).
    pub retry_after: Duration,
    /// Writes that may wait; beyond it they are dropped and counted (10,000).
    pub queue: usize,
    /// Most `SET`s in one pipeline (512).
    pub max_pipeline: usize,
    /// At most one error line per this interval (10 s).
    pub log_every: Duration,
    /// Bound of the recent-writes map used for the refresh rule (200,000).
    pub written_capacity: usize,
}

impl Default for RedisStoreSettings {
    fn default() -> Self {
        RedisStoreSettings {
            get_timeout: Duration::from_millis(50),
            write_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(200),
            retry_after: Duration::from_secs(1),
            queue: 10_000,
            max_pipeline: 512,
            log_every: Duration::from_secs(10),
            written_capacity: 200_000,
        }
    }
}

struct Shared {
    url: String,
    conn: ConnectionManager,
    clock: Clock,
    settings: RedisStoreSettings,
    /// Unix ms before which lookups fail without asking Redis.
    down_until: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    throttle: LogThrottle,
    recent: TtlMap<Arc<str>>,
}

impl Shared {
    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let now = (self.clock)();
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.down_until.fetch_max(now.saturating_add(millis(self.settings.retry_after)), Ordering::Relaxed);
        if let Some(held) = self.throttle.allow_at(now) {
            tracing::warn!(target: "keel::sticky", redis = %self.url, %error, errors_not_logged = held.count,
                "redis session store {what} failed; requests fall back to the balancing algorithm");
        }
    }

    fn is_down(&self) -> bool {
        (self.clock)() < self.down_until.load(Ordering::Relaxed)
    }
}

struct Write {
    key: String,
    pool: String,
    session: String,
    server: String,
    ttl_ms: u64,
}

/// Session store in a shared Redis server.
pub struct RedisSessionStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Write>,
}

impl RedisSessionStore {
    /// A store for the Redis at `url` ("redis://host:port", "unix:///path"). Does not connect
    /// yet; spawns the writer, which ends when the store is dropped. Must be called inside a
    /// Tokio runtime.
    pub fn connect(url: &str, clock: Clock, settings: RedisStoreSettings) -> Result<Self, StickyError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StickyError::NoRuntime("redis"))?;
        let bad = |e: redis::RedisError| StickyError::Redis { url: url.to_owned(), reason: e.to_string() };
        let client = redis::Client::open(url).map_err(bad)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.write_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conn = runtime.block_on_safe(|| ConnectionManager::new_lazy_with_config(client, config)).map_err(bad)?;
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            conn,
            clock,
            down_until: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            written: AtomicU64::new(0),
            throttle: LogThrottle::new(settings.log_every),
            recent: TtlMap::new(settings.written_capacity),
            settings,
        });
        runtime.spawn(write_loop(shared.clone(), rx));
        Ok(RedisSessionStore { shared, tx })
    }

    /// The configured address.
    pub fn url(&self) -> &str {
        &self.shared.url
    }
}

/// `ConnectionManager::new_lazy_with_config` locates the runtime of the calling thread; this
/// makes sure it is entered even when the caller merely holds a handle.
trait EnterRuntime {
    fn block_on_safe<T>(&self, f: impl FnOnce() -> T) -> T;
}

impl EnterRuntime for tokio::runtime::Handle {
    fn block_on_safe<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = self.enter();
        f()
    }
}

fn redis_key(pool: &str, key: &str) -> String {
    format!("{KEY_PREFIX}{pool}:{key}")
}

impl SessionStore for RedisSessionStore {
    fn get<'a>(&'a self, pool: &'a str, key: &'a str) -> StoreGet<'a> {
        let shared = &self.shared;
        if shared.is_down() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
            return StoreGet::ready(Err(StoreError::Unavailable("redis is down (retrying shortly)".into())));
        }
        let mut conn = shared.conn.clone();
        let k = redis_key(pool, key);
        StoreGet::pending(Box::pin(async move {
            let timeout = shared.settings.get_timeout;
            let mut cmd = redis::cmd("GET");
            cmd.arg(&k);
            let get = cmd.query_async::<Option<String>>(&mut conn);
            match tokio::time::timeout(timeout, get).await {
                Ok(Ok(found)) => {
                    if found.is_none() {
                        shared.misses.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(found)
                }
                Ok(Err(e)) => {
                    shared.failed("lookup", &e);
                    Err(StoreError::Unavailable(e.to_string()))
                }
                Err(_) => {
                    shared.failed("lookup", &format_args!("no answer within {timeout:?}"));
                    Err(StoreError::Timeout(timeout))
                }
            }
        }))
    }

    fn put(&self, pool: &str, key: &str, server: &str, ttl: Duration) {
        let shared = &self.shared;
        let now = (shared.clock)();
        let ttl_ms = millis(ttl).max(1);
        let existing = shared.recent.get(pool, key, now);
        if !needs_write(existing.as_ref().map(|(s, e)| (&**s, *e)), server, ttl_ms, now) {
            return;
        }
        shared.recent.insert(pool, key, Arc::from(server), now.saturating_add(ttl_ms), now);
        let write = Write {
            key: redis_key(pool, key),
            pool: pool.to_owned(),
            session: key.to_owned(),
            server: server.to_owned(),
            ttl_ms,
        };
        if self.tx.try_send(write).is_err() {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            shared.recent.remove(pool, key);
        }
    }

    fn stats(&self) -> StoreStats {
        let s = &self.shared;
        StoreStats {
            misses: s.misses.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            written: s.written.load(Ordering::Relaxed),
        }
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

/// Sends queued writes as pipelines until the store is dropped.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::Receiver<Write>) {
    let max = shared.settings.max_pipeline.max(1);
    let mut batch = Vec::with_capacity(max);
    loop {
        batch.clear();
        if rx.recv_many(&mut batch, max).await == 0 {
            break;
        }
        // Writes that fail are forgotten by the refresh map, so the next request retries them.
        let forget = |batch: &[Write]| {
            for w in batch {
                shared.recent.remove(&w.pool, &w.session);
            }
        };
        if shared.is_down() {
            shared.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
            forget(&batch);
            continue;
        }
        let mut pipe = redis::pipe();
        for w in &batch {
            pipe.cmd("SET").arg(&w.key).arg(&w.server).arg("PX").arg(w.ttl_ms).ignore();
        }
        let mut conn = shared.conn.clone();
        let timeout = shared.settings.write_timeout;
        match tokio::time::timeout(timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {
                shared.written.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                shared.failed("write", &e);
                forget(&batch);
            }
            Err(_) => {
                shared.failed("write", &format_args!("no answer within {timeout:?}"));
                forget(&batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::super::system_clock;
    use super::*;

    /// A real redis-server on a loopback port, in its own temp dir, without persistence.
    struct RedisServer {
        binary: String,
        child: Option<Child>,
        port: u16,
        dir: PathBuf,
    }

    impl RedisServer {
        fn binary() -> Option<String> {
            let out = Command::new("which").arg("redis-server").output().ok()?;
            let path = String::from_utf8(out.stdout).ok()?.trim().to_owned();
            (out.status.success() && !path.is_empty()).then_some(path)
        }

        fn start(binary: &str, port: u16) -> RedisServer {
            let dir = std::env::temp_dir().join(format!("keel-sticky-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut server = RedisServer { binary: binary.to_owned(), child: None, port, dir };
            server.restart();
            server
        }

        fn restart(&mut self) {
            let child = Command::new(&self.binary)
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn stop(&mut self) {
            if let Some(mut child) = self.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    impl Drop for RedisServer {
        fn drop(&mut self) {
            self.stop();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_store_sticks_fails_fast_when_down_and_recovers() {
        let Some(binary) = RedisServer::binary() else {
            eprintln!();
            eprintln!("!!!!!!!! SKIPPED redis_store_sticks_fails_fast_when_down_and_recovers: no redis-server on PATH");
            eprintln!("!!!!!!!! install it (apt-get install -y redis-server) to run this test; CI does");
            eprintln!();
            return;
        };
        let mut server = RedisServer::start(&binary, free_port());
        let url = format!("redis://127.0.0.1:{}", server.port);
        let store = RedisSessionStore::connect(&url, system_clock(), RedisStoreSettings::default()).unwrap();

        // The first read opens the connection; on a loaded box that alone can take longer than
        // the 50 ms read timeout, which is the fail-fast this test checks later, not here.
        eventually("Redis answers", async || store.get("app", "10.0.0.1").await == Ok(None)).await;
        store.put("app", "10.0.0.1", "b", Duration::from_secs(60));
        eventually("the write lands", async || store.get("app", "10.0.0.1").await == Ok(Some("b".into()))).await;
        // The writer counts a batch after reading Redis's reply, which can come after another
        // connection already sees the key: wait for the count rather than race it.
        eventually("the write is counted", async || store.stats().written >= 1).await;
        assert_eq!(store.stats().written, 1);
        // The key is namespaced and has a TTL.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg("keel:sticky:app:10.0.0.1").query_async(&mut c).await.unwrap();
        assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");

        // Kill Redis: lookups fail fast and are counted.
        server.stop();
        let errors_before = store.stats().errors;
        for _ in 0..20 {
            let t = Instant::now();
            let r = store.get("app", "10.0.0.1").await;
            assert!(r.is_err(), "{r:?}");
            assert!(t.elapsed() < Duration::from_millis(200), "lookup took {:?}", t.elapsed());
        }
        assert!(store.stats().errors >= errors_before + 20, "{:?}", store.stats());
        // Writes while down neither block nor panic.
        store.put("app", "10.0.0.2", "c", Duration::from_secs(60));

        // Restart on the same port (empty: no persistence): stickiness works again.
        server.restart();
        store.put("app", "10.0.0.3", "a", Duration::from_secs(60));
        eventually("stickiness resumes", async || {
            store.put("app", "10.0.0.3", "a", Duration::from_secs(60));
            store.get("app", "10.0.0.3").await == Ok(Some("a".into()))
        })
        .await;
        drop(server);
    }

    #[tokio::test]
    async fn an_unreachable_redis_fails_fast_from_the_start() {
        // Nothing listens on this port: connection refused.
        let url = format!("redis://127.0.0.1:{}", free_port());
        let store = RedisSessionStore::connect(&url, system_clock(), RedisStoreSettings::default()).unwrap();
        let t = Instant::now();
        assert!(store.get("app", "k").await.is_err());
        assert!(store.get("app", "k").await.is_err());
        assert!(t.elapsed() < Duration::from_millis(200), "{:?}", t.elapsed());
        assert_eq!(store.stats().errors, 2);
    }

    #[test]
    fn bad_urls_are_errors_not_panics() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        assert!(RedisSessionStore::connect("http://nope", system_clock(), RedisStoreSettings::default()).is_err());
        drop(_g);
        assert!(matches!(
            RedisSessionStore::connect("redis://127.0.0.1:1", system_clock(), RedisStoreSettings::default()),
            Err(StickyError::NoRuntime(_))
        ));
    }
}
