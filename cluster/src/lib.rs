//! keel's shared vocabulary and its replicated state.
//!
//! # Layout
//!
//! - [`model`]: the configuration every node serves — listeners, routes, pools, servers,
//!   health-check and outlier settings — as plain serde data, with [`model::Config::validate`]
//!   checking the invariants that span fields ("a route names a pool that exists").
//! - [`access_log_config`]: a listener's `access_log` table (destination, format, template,
//!   syslog facility), the names of a line's fields, and their validation.
//! - [`edge`]: TLS, rate-limit and protection settings of listeners and pools.
//! - [`sticky_config`]: a pool's `[pools.NAME.sticky]` table (cookie, source_ip or learned
//!   session stickiness, and where bindings are stored) and its validation.
//! - [`sticky_table`]: the replicated sticky-session table — compact keys, per-pool bound,
//!   least-recently-used eviction — and its snapshot form.
//! - [`header_rules`]: a listener's or route's `headers` table (set/add/remove on requests and
//!   responses, `${variable}` values) and its validation.
//! - [`server_address`]: a server's `address`, an IP literal or a DNS name with a port (written
//!   as the same string an IP `SocketAddr` was, so stored configs still decode), and the
//!   `ENTRY@IP:PORT` names of the servers a DNS name resolves to.
//! - [`duration`]: the human duration strings ("500ms", "2s") config files use.
//! - [`command`]: what a node may propose to Raft ([`Command`]) and what applying it answered
//!   ([`Outcome`]).
//! - [`state`]: [`ClusterState`] (config, overrides, health verdicts, sticky table) and its pure,
//!   deterministic `apply`.
//! - [`types`]: the openraft type configuration and [`types::NodeInfo`], the membership record.
//! - [`store`]: the durable Raft log and state machine on redb.
//! - [`network`]: Raft RPC over TCP (length-prefixed bincode frames, cluster-id handshake).
//! - [`node`]: [`ClusterNode::start`] and the [`ClusterHandle`] the rest of keel uses: propose,
//!   watch the state, watch leadership, status, membership.
//! - [`handover`]: a planned leadership hand-over (stop, `cluster transfer`) that moves the VIP
//!   on the old holder's confirmed release instead of a lease.
//! - [`removal`]: a removal that sticks — how a removed node learns it, the marker that keeps
//!   it from rejoining with its old state, and `keel cluster leave --reset`.
//! - [`lease`]: the VIP's right to hold as a monotonic deadline, evaluated off the Raft thread.
//! - [`api`]: the `/cluster/…` admin HTTP endpoints ([`api::handle`]) and their client
//!   ([`api::client::ClusterClient`]).
//! - [`codec`]: the bincode encoding shared by the log store, snapshots and the wire.
//! - [`throttle`]: repeated warnings rate-limited per kind ([`throttled!`]), for every crate
//!   that logs what a client, a dead peer or a full file table can make it repeat.
//!
//! The data plane in `keel-node` only ever reads a validated [`model::Config`], whether it came
//! from a file or from the replicated log.

// openraft's error types (StorageError, RPCError, RaftError) are >200 bytes and dictated by its
// traits; boxing them at every internal helper would only add noise.
#![allow(clippy::result_large_err)]

pub mod access_log_config;
pub mod api;
pub mod codec;
pub mod command;
pub mod duration;
pub mod edge;
pub mod handover;
pub mod header_rules;
pub mod lease;
pub mod model;
pub mod network;
pub mod node;
pub mod removal;
pub mod retry_config;
pub mod server_address;
pub mod state;
pub mod sticky_config;
pub mod sticky_table;
pub mod store;
pub mod throttle;
pub mod types;
pub mod vips;

pub use command::{Command, NodeId, Outcome, Proposal, StickyEntry};
pub use duration::HumanDuration;
pub use model::{Config, ConfigProblem, KeyPath, PathSegment};
pub use node::{ClusterError, ClusterHandle, ClusterNode, ClusterSettings, ClusterStatus, Profile, ProposeError, Role};
pub use state::ClusterState;
pub use types::NodeInfo;
