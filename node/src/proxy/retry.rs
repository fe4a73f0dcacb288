//! When a failed request is sent to another server, and how many may be at once.
//!
//! Two questions, answered in this order by [`Retries::next`]:
//!
//! 1. **May this request be sent again?** ([`policy`]) The pool's `retry_on` must name the
//!    failure ([`Failure`]). A connect failure reached no server, so any request may go
//!    elsewhere (its body, if streaming, is still untouched: keel's client reads no body byte
//!    before it has a connection). Any other failure happened after the server may have seen
//!    the request, so the request must be *replayable* — no body, or a body buffered whole
//!    before the first attempt — and its method idempotent per RFC 9110 §9.2.2 (GET, HEAD,
//!    OPTIONS, TRACE, PUT, DELETE: "a proxy MUST NOT automatically retry non-idempotent
//!    requests"), unless `retry_on` also lists `non-idempotent`: the operator vouching that the
//!    application makes its POSTs safe to repeat (nginx's `proxy_next_upstream non_idempotent`).
//! 2. **Is there budget for it?** ([`RetryBudget`], Envoy's retry budget) Retries in flight on
//!    the pool stay below `retry_budget` of its requests in flight, but at least
//!    `retry_budget_min`. When every server fails, a request retried `retries` times would
//!    multiply the load on a failing pool by `retries + 1`; the budget caps the extra load at a
//!    fixed share instead, and the requests it refuses fail at once with the error they had.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use http::Method;
use keel_cluster::model::{self, RetryOn};

/// Why an attempt failed, as far as retrying cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection was made: nothing reached the server.
    Connect,
    /// The server closed or reset the connection before any byte of a response.
    EmptyResponse,
    /// The server answered with this status (502 and 503 are the ones `retry_on` can name).
    Status(u16),
}

/// Whether `config` lets a request with `method` be sent again after `failure`; `replayable`
/// says whether its body (if any) can be sent again.
pub fn policy(config: &model::Pool, method: &Method, replayable: bool, failure: Failure) -> bool {
    let named = |on: RetryOn| config.retry_on.contains(&on);
    let after_send = match failure {
        Failure::Connect => return named(RetryOn::ConnectFailure),
        Failure::EmptyResponse => named(RetryOn::EmptyResponse),
        Failure::Status(502) => named(RetryOn::Status502),
        Failure::Status(503) => named(RetryOn::Status503),
        Failure::Status(_) => false,
    };
    after_send && replayable && (is_idempotent(method) || named(RetryOn::NonIdempotent))
}

/// RFC 9110 §9.2.2: the methods whose intended effect is the same however often a request
/// is applied.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// A pool's retry budget and retry counters (reset when a reload rebuilds the pool, like its
/// latency histogram).
#[derive(Debug, Default)]
pub struct RetryBudget {
    in_flight: AtomicUsize,
    total: AtomicU64,
    exhausted: AtomicU64,
}

impl RetryBudget {
    /// A permit for one more retry while `active` requests are in flight on the pool, or `None`
    /// (counted) when the budget is spent.
    pub fn try_start(&self, config: &model::Pool, active: usize) -> Option<RetryPermit<'_>> {
        let allowed = config.retry_budget.of(active).max(config.retry_budget_min as usize);
        let admitted = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < allowed).then_some(n + 1))
            .is_ok();
        if admitted {
            self.total.fetch_add(1, Ordering::Relaxed);
            Some(RetryPermit(self))
        } else {
            self.exhausted.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Retries sent since the pool was built.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Retries refused by the budget since the pool was built.
    pub fn exhausted(&self) -> u64 {
        self.exhausted.load(Ordering::Relaxed)
    }

    /// Retries in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One retry in flight, until dropped (when its attempt has a response head or has failed).
#[derive(Debug)]
pub struct RetryPermit<'a>(&'a RetryBudget);

impl Drop for RetryPermit<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(extra: &str) -> model::Pool {
        toml::from_str(&format!("servers = []\n{extra}")).expect("pool config")
    }

    #[test]
    fn connect_failures_retry_anything_later_failures_only_what_is_safe_to_replay() {
        let default = pool("");
        assert!(policy(&default, &Method::POST, false, Failure::Connect));
        assert!(!policy(&default, &Method::GET, true, Failure::EmptyResponse), "not in the default retry_on");

        let wide = pool(r#"retry_on = ["connect-failure", "empty-response", "503"]"#);
        assert!(policy(&wide, &Method::GET, true, Failure::EmptyResponse));
        assert!(policy(&wide, &Method::PUT, true, Failure::Status(503)));
        assert!(!policy(&wide, &Method::PUT, true, Failure::Status(502)), "502 is not listed");
        assert!(!policy(&wide, &Method::GET, false, Failure::EmptyResponse), "a streamed body is gone");
        assert!(!policy(&wide, &Method::POST, true, Failure::EmptyResponse), "RFC 9110 §9.2.2");

        let vouched = pool(r#"retry_on = ["empty-response", "non-idempotent"]"#);
        assert!(policy(&vouched, &Method::POST, true, Failure::EmptyResponse));
        assert!(!policy(&vouched, &Method::POST, false, Failure::EmptyResponse));
        assert!(!policy(&vouched, &Method::POST, true, Failure::Connect), "connect-failure was left out");
    }

    #[test]
    fn the_budget_is_a_share_of_active_requests_with_a_floor() {
        let config = pool(r#"retry_budget = "20%""#);
        let budget = RetryBudget::default();
        // 10 active: 20% is 2, the floor of 3 wins.
        let permits: Vec<_> = (0..3).filter_map(|_| budget.try_start(&config, 10)).collect();
        assert_eq!(permits.len(), 3);
        assert!(budget.try_start(&config, 10).is_none());
        // 50 active: 10 may retry at once.
        let more: Vec<_> = (0..20).filter_map(|_| budget.try_start(&config, 50)).collect();
        assert_eq!(more.len(), 7);
        drop(permits);
        drop(more);
        assert_eq!((budget.in_flight(), budget.total(), budget.exhausted()), (0, 10, 14));
    }
}
