//! The openraft type configuration: which types keel plugs into openraft, in one place.
//!
//! - log payload [`Proposal`] (a [`crate::Command`] plus the proposer's clock), response
//!   [`Outcome`];
//! - node ids are `u64`; the node record in the membership is [`NodeInfo`] (raft and admin
//!   addresses, witness flag) instead of openraft's `BasicNode`, so that any member can tell a
//!   client where the leader's admin API is;
//! - snapshots are in-memory byte buffers (`Cursor<Vec<u8>>`): the state is small enough
//!   (bounded sticky table) to send whole.

use std::fmt;
use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::command::{Outcome, Proposal};

openraft::declare_raft_types!(
    /// keel's openraft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = Outcome,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The running openraft instance.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id (term, leader, index).
pub type LogId = openraft::LogId<u64>;
/// A vote.
pub type Vote = openraft::Vote<u64>;
/// Storage error as openraft wants it.
pub type StorageError = openraft::StorageError<u64>;
/// A snapshot's metadata.
pub type SnapshotMeta = openraft::SnapshotMeta<u64, NodeInfo>;
/// Membership as stored with its log id.
pub type StoredMembership = openraft::StoredMembership<u64, NodeInfo>;

/// What the membership records about a member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInfo {
    /// Where its Raft RPC server listens.
    pub raft_addr: SocketAddr,
    /// Where its admin HTTP API listens.
    pub admin_addr: SocketAddr,
    /// A witness votes and stores the log but runs no data plane and never holds the VIP.
    #[serde(default)]
    pub witness: bool,
}

impl Default for NodeInfo {
    /// An unspecified node (0.0.0.0:0); openraft needs a default, keel never stores one.
    fn default() -> Self {
        let any = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
        NodeInfo { raft_addr: any, admin_addr: any, witness: false }
    }
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}{}", self.raft_addr, self.admin_addr, if self.witness { " witness" } else { "" })
    }
}
