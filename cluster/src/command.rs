//! The Raft request and response: what a node may propose ([`Command`]) and what applying it
//! answered ([`Outcome`]).
//!
//! A command is a verb-noun change to [`crate::state::ClusterState`]. It is wrapped in a
//! [`Proposal`] that carries the proposer's wall clock (`proposed_at_ms`): applying an entry uses
//! that time, never the applying node's clock, so every replica reaches the same state (sticky
//! TTL pruning depends on it). Commands are checked before proposing ([`Command::precheck`],
//! cheap, no state) and again at apply against the replicated state: a rejected command changes
//! nothing and answers [`Outcome::Rejected`] with the reason.

use serde::{Deserialize, Serialize};

use crate::model::Config;

/// Identifier of a cluster member (a Raft node id).
pub type NodeId = u64;

/// One sticky-session binding: requests of `pool` carrying `key` go to `server` until
/// `expires_at_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyEntry {
    /// Pool the binding belongs to.
    pub pool: String,
    /// Client IP, or the learned cookie/header value.
    pub key: String,
    /// Name of the server the key is bound to.
    pub server: String,
    /// Expiry, in unix milliseconds, set by the proposer.
    pub expires_at_ms: u64,
}

/// A change to the replicated state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Replace the served configuration. Rejected (nothing changes) when it does not validate.
    ApplyConfig(#[serde(with = "crate::codec::config_field")] Config),
    /// One node's health observation of a server: `up` or down. The verdict that the data plane
    /// uses is derived from the reports of the voters (see [`crate::state`]).
    SetServerHealth {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
        /// Whether the reporter sees the server healthy.
        up: bool,
        /// Node whose checker made the observation.
        reporter: NodeId,
    },
    /// Take a server out of rotation for new requests (`drain: true`) or put it back.
    DrainServer {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
        /// Drain or undrain.
        drain: bool,
    },
    /// Override a server's configured weight (1–[`crate::model::MAX_WEIGHT`]).
    SetServerWeight {
        /// Pool name.
        pool: String,
        /// Server name.
        server: String,
        /// New weight.
        weight: u32,
    },
    /// Store many sticky bindings in one log entry.
    PutStickyBatch(Vec<StickyEntry>),
    /// Changes nothing; commits an entry (useful to confirm a fresh leader can commit).
    Noop,
    /// Names the node that holds one of the spread VIPs (`holder`), or takes it from its
    /// holder (`None`: suspended until the old holder's lease has certainly ended, see
    /// [`crate::vips`]). A VIP goes from one holder to another only through a suspension:
    /// naming a holder while another is named is rejected.
    SetVipHolder {
        /// The VIP.
        vip: std::net::IpAddr,
        /// Its new holder, or `None` to suspend it.
        holder: Option<NodeId>,
        /// With a suspension: the node to name next (an operator's `vip move`).
        move_to: Option<NodeId>,
    },
}

/// Largest sticky batch accepted in one command: bounds the size of one log entry.
pub const MAX_STICKY_BATCH: usize = 10_000;

impl Command {
    /// Checks what can be checked without the replicated state, before proposing: an invalid
    /// config, an out-of-range weight or an oversized batch never reaches the log.
    pub fn precheck(&self) -> Result<(), String> {
        match self {
            Command::ApplyConfig(config) => config.validate().map_err(|problems| {
                let parts: Vec<String> = problems.iter().map(ToString::to_string).collect();
                format!("invalid config: {}", parts.join("; "))
            }),
            Command::SetServerWeight { weight, .. } if *weight == 0 || *weight > crate::model::MAX_WEIGHT => {
                Err(format!("weight {weight} is out of range 1-{}", crate::model::MAX_WEIGHT))
            }
            Command::PutStickyBatch(entries) if entries.len() > MAX_STICKY_BATCH => {
                Err(format!("sticky batch of {} entries exceeds the maximum of {MAX_STICKY_BATCH}", entries.len()))
            }
            _ => Ok(()),
        }
    }

    /// Short verb-noun name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ApplyConfig(_) => "apply_config",
            Command::SetServerHealth { .. } => "set_server_health",
            Command::DrainServer { .. } => "drain_server",
            Command::SetServerWeight { .. } => "set_server_weight",
            Command::PutStickyBatch(_) => "put_sticky_batch",
            Command::Noop => "noop",
            Command::SetVipHolder { .. } => "set_vip_holder",
        }
    }
}

/// What the log carries: a command and the proposer's clock.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// The change.
    pub command: Command,
    /// Proposer's wall clock at proposing, unix ms: the "now" every replica applies with.
    pub proposed_at_ms: u64,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.command.name(), self.proposed_at_ms)
    }
}

/// What applying a command answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied. `changed` is false when the state already was what the command asked for.
    Applied {
        /// Whether the state changed.
        changed: bool,
    },
    /// A sticky batch was applied.
    StickyStored {
        /// Entries inserted or refreshed.
        stored: usize,
        /// Entries skipped: already expired, or naming an unknown pool or server.
        skipped: usize,
        /// Entries dropped because they had expired (pruning) or to keep the table in its bound.
        evicted: usize,
    },
    /// Not applied; the state is unchanged.
    Rejected {
        /// Why, in words an operator can act on.
        reason: String,
    },
    /// A membership or blank entry (no command); also the default.
    #[default]
    Internal,
}

impl Outcome {
    /// Whether the command was rejected.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Outcome::Rejected { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_through_json_and_bincode() {
        let mut config = Config::default();
        config.pools.insert(
            "app".into(),
            serde_json::from_str(
                r#"{"servers":[{"name":"a","address":"127.0.0.1:1"}],"health":{"expect_status":"200-299"}}"#,
            )
            .unwrap(),
        );
        let cmds = vec![
            Command::ApplyConfig(config),
            Command::SetServerHealth { pool: "app".into(), server: "a".into(), up: false, reporter: 2 },
            Command::PutStickyBatch(vec![StickyEntry {
                pool: "app".into(),
                key: "10.0.0.1".into(),
                server: "a".into(),
                expires_at_ms: 5,
            }]),
            Command::Noop,
            Command::SetVipHolder { vip: "10.0.0.100".parse().unwrap(), holder: Some(2), move_to: None },
        ];
        for cmd in cmds {
            let json = serde_json::to_string(&cmd).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), cmd, "{json}");
            let bin = crate::codec::encode(&cmd).unwrap();
            assert_eq!(crate::codec::decode::<Command>(&bin).unwrap(), cmd);
        }
    }

    #[test]
    fn precheck_rejects_invalid_config_and_weights() {
        assert!(Command::ApplyConfig(Config::default()).precheck().unwrap_err().contains("no listener"));
        let w = Command::SetServerWeight { pool: "p".into(), server: "s".into(), weight: 0 };
        assert!(w.precheck().is_err());
    }
}
