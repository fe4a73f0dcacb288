//! Sticky sessions: keep a client on the server that served it before.
//!
//! This module owns the [`SessionStore`] trait — where source_ip / learned bindings live — and
//! wires the files that implement the rest:
//!
//! - [`memory`]: [`MemorySessionStore`], a bounded, sharded TTL map (`store = "local"`), and the
//!   building block of the other stores (overlay, write dedupe).
//! - [`raft`]: [`RaftSessionStore`], reads the replicated sticky table, writes by batching many
//!   bindings into one `Command::PutStickyBatch`.
//! - [`redis_store`]: [`RedisSessionStore`], a shared Redis with short timeouts, a circuit that
//!   fails fast while Redis is down, and fire-and-forget pipelined writes.
//! - [`cookie`]: hostile-input-safe `Cookie` / `Set-Cookie` parsing and the opaque server ids of
//!   cookie mode (HMAC-SHA256 of the server name under the cluster's secret).
//! - [`policy`]: [`StickyPolicy`], one per pool: `lookup` before selecting a server,
//!   `on_response` after the response head arrives.
//! - [`runtime`]: [`StickyRuntime`], which builds policies from config and keeps stores and
//!   counters across config reloads.
//!
//! # Refresh rule (all stores)
//!
//! A `put` for a binding that already names the same server and has more than half its TTL left
//! is skipped. The policy can therefore `put` on every request (sliding expiry, as HAProxy's stick
//! tables refresh on access) while a store writes each binding at most about twice per TTL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;

pub mod cookie;
pub mod memory;
pub mod policy;
pub mod raft;
pub mod redis_store;
pub mod runtime;

pub use memory::MemorySessionStore;
pub use policy::{SourceKey, StickyCounters, StickyPolicy};
pub use raft::{
    proposer_from_handle, reader_from_watch, RaftSessionStore, RaftStoreSettings, StickyProposer, StickyReader,
};
pub use redis_store::{RedisSessionStore, RedisStoreSettings};
pub use runtime::{StickyDeps, StickyRuntime};

/// Longest session key (client IP or learned value) a store accepts, in bytes: longer values
/// are not sticky, so a client cannot make keel store or send arbitrarily large keys.
pub const MAX_KEY_BYTES: usize = 512;

/// The wall clock the stores use, in unix milliseconds. Injectable so tests control expiry.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system wall clock (unix ms), the time base of the replicated table's `expires_at_ms`.
pub fn system_clock() -> Clock {
    Arc::new(unix_now_ms)
}

/// Milliseconds since the unix epoch (0 if the clock is before it).
pub fn unix_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a store could not answer. The caller falls back to the balancing algorithm.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within its deadline.
    #[error("session store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store is unreachable or answered with an error.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

/// Counters of a store, for metrics. A store shared by several pools reports shared figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Lookups that found no binding.
    pub misses: u64,
    /// Lookups or writes that failed (timeouts, connection errors, failed proposals).
    pub errors: u64,
    /// Writes dropped because the write queue was full.
    pub dropped: u64,
    /// Writes handed to the backing store (entries proposed to Raft, SETs sent to Redis).
    pub written: u64,
}

/// Where source_ip / learned bindings (pool, key) → server name live.
///
/// `get` is asynchronous (Redis answers over the network) but the in-process stores answer at
/// once: [`StoreGet`] carries either a ready value or a boxed future, so the common path
/// allocates nothing. `put` never blocks: it updates local state and enqueues the write.
pub trait SessionStore: Send + Sync + 'static {
    /// The server bound to `key` in `pool`, if any. Errors mean "unknown, fall back".
    fn get<'a>(&'a self, pool: &'a str, key: &'a str) -> StoreGet<'a>;

    /// Binds `key` in `pool` to `server` for `ttl`. Non-blocking; may be skipped by the refresh
    /// rule (see the module doc) or dropped (counted) when the write queue is full.
    fn put(&self, pool: &str, key: &str, server: &str, ttl: Duration);

    /// The store's counters.
    fn stats(&self) -> StoreStats;

    /// Short name for logs and the admin API: "local", "raft" or "redis".
    fn kind(&self) -> &'static str;
}

/// What [`SessionStore::get`] returns: a future resolving to the bound server's name.
pub struct StoreGet<'a>(GetState<'a>);

type GetResult = Result<Option<String>, StoreError>;

enum GetState<'a> {
    Ready(Option<GetResult>),
    Pending(BoxFuture<'a, GetResult>),
}

impl<'a> StoreGet<'a> {
    /// An answer known at once.
    pub fn ready(result: GetResult) -> Self {
        StoreGet(GetState::Ready(Some(result)))
    }

    /// An answer that needs I/O.
    pub fn pending(fut: BoxFuture<'a, GetResult>) -> Self {
        StoreGet(GetState::Pending(fut))
    }
}

impl Future for StoreGet<'_> {
    type Output = GetResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GetResult> {
        match &mut self.get_mut().0 {
            GetState::Ready(r) => {
                Poll::Ready(r.take().unwrap_or_else(|| Err(StoreError::Unavailable("polled after completion".into()))))
            }
            GetState::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// Why a sticky policy or store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StickyError {
    /// Stores spawn background tasks; there was no Tokio runtime to spawn them on.
    #[error("sticky store {0} must be created inside a Tokio runtime")]
    NoRuntime(&'static str),
    /// The Redis URL could not be used.
    #[error("invalid redis address {url:?}: {reason}")]
    Redis {
        /// The configured address.
        url: String,
        /// What the client library said.
        reason: String,
    },
    /// A config value the validator should have rejected (a policy built from unvalidated config).
    #[error("invalid sticky config: {0}")]
    Config(String),
    /// The crypto provider offered no HMAC (cannot happen with the ring provider compiled in).
    #[error("no HMAC-SHA256 available from the TLS crypto provider")]
    NoHmac,
}

/// Whether a binding that names `existing` and expires at `existing_exp` should be rewritten to
/// name `server` for `ttl_ms` more at `now`: the refresh rule of the module doc.
pub(crate) fn needs_write(existing: Option<(&str, u64)>, server: &str, ttl_ms: u64, now: u64) -> bool {
    match existing {
        Some((s, exp)) if s == server => exp.saturating_sub(now) <= ttl_ms / 2,
        _ => true,
    }
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub(crate) mod test_clock {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::Clock;

    /// A clock tests move by hand.
    pub fn manual(start: u64) -> (Clock, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(start));
        let n = now.clone();
        (Arc::new(move || n.load(Ordering::SeqCst)), now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_rule_skips_fresh_same_server_bindings() {
        assert!(needs_write(None, "a", 1000, 0));
        assert!(!needs_write(Some(("a", 900)), "a", 1000, 0));
        assert!(needs_write(Some(("a", 500)), "a", 1000, 0));
        assert!(needs_write(Some(("b", 900)), "a", 1000, 0));
    }

    #[tokio::test]
    async fn store_get_ready_resolves_once() {
        let mut g = StoreGet::ready(Ok(Some("a".into())));
        assert_eq!((&mut g).await, Ok(Some("a".into())));
        assert!((&mut g).await.is_err(), "a second poll answers an error, never panics");
    }
}
