//! Balancing algorithms: which server of a pool gets the next request.
//!
//! A [`Selector`] is built from the pool's *eligible* members (healthy, not drained, not
//! ejected) and rebuilt whenever that set changes, then swapped in atomically by the pool
//! (pingora's shape): selection itself never takes a lock that a request could wait on. The
//! caller still passes an `accept` filter, because between a health flip and the rebuild, and on
//! retries ("not the server that just refused me"), some members must be skipped.
//!
//! One file per algorithm; [`build`] maps the config's [`Algorithm`] to one of them.

use keel_cluster::model::Algorithm;

mod ip_hash;
mod least_connections;
mod p2c;
mod random;
mod round_robin;
mod weighted_round_robin;

pub use ip_hash::IpHashSelector;
pub use least_connections::LeastConnectionsSelector;
pub use p2c::P2cSelector;
pub use random::RandomSelector;
pub use round_robin::RoundRobinSelector;
pub use weighted_round_robin::WeightedRoundRobinSelector;

/// A pool member a selector may choose: its index in the pool's server list, and its weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// Index into the pool's server list; what [`Selector::select`] returns.
    pub index: usize,
    /// Relative share of traffic, 1–256.
    pub weight: u32,
}

/// What a selection may look at besides the selector's own state.
pub struct Pick<'a> {
    /// Hash of the client key (its IP address) for `ip_hash`; other algorithms ignore it.
    pub hash: u64,
    /// In-flight requests on the member with this pool index.
    pub load: &'a dyn Fn(usize) -> usize,
    /// Whether the member with this pool index may be chosen now.
    pub accept: &'a dyn Fn(usize) -> bool,
}

/// Chooses a server for a request.
pub trait Selector: Send + Sync {
    /// The pool index of the chosen member, or `None` when no member is acceptable.
    fn select(&self, pick: &Pick<'_>) -> Option<usize>;
}

/// Builds the selector for `algorithm` over `members` (which may be empty: it then selects none).
pub fn build(algorithm: Algorithm, members: &[Member]) -> Box<dyn Selector> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobinSelector::new(members)),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobinSelector::new(members)),
        Algorithm::LeastConnections => Box::new(LeastConnectionsSelector::new(members)),
        Algorithm::LeastRequestP2c => Box::new(P2cSelector::new(members)),
        Algorithm::IpHash => Box::new(IpHashSelector::new(members)),
        Algorithm::Random => Box::new(RandomSelector::new(members)),
    }
}
