//! keel's shared vocabulary and, as the cluster lands, its replicated state.
//!
//! # Layout
//!
//! - [`model`]: the configuration every node serves — listeners, routes, pools, servers,
//!   health-check and outlier settings — as plain serde data, with [`model::Config::validate`]
//!   checking the invariants that span fields ("a route names a pool that exists").
//! - [`edge`]: TLS, rate-limit and protection settings of listeners and pools.
//! - [`duration`]: the human duration strings ("500ms", "2s") config files use.
//!
//! The Raft pieces (commands, state machine, log store, network, admin client) join this crate
//! with the cluster work; the data plane in `keel-node` only ever reads a validated
//! [`model::Config`], whether it came from a file or, later, from the replicated log.

pub mod duration;
pub mod edge;
pub mod model;

pub use duration::HumanDuration;
pub use model::{Config, ConfigProblem, KeyPath, PathSegment};
