//! A removal that sticks: a node removed from the cluster learns it, says so, stops taking
//! part, and does not come back with its old state.
//!
//! openraft stops replicating to a removed node once the new membership commits, so the node
//! may never see the entry that removed it: without help it keeps its old membership, believes
//! it is still a voter, serves its old config and (before keel's pre-vote) campaigned with an
//! ever higher term. It learns it here in one of three ways:
//!
//! - **the leader tells it**: after a removal commits, the leader sends the removed node
//!   [`RpcRequest::Removed`](crate::network::RpcRequest::Removed) (best effort);
//! - **its own log says so**: the membership it applied no longer lists it;
//! - **its next contact says so**: when it looks for a leader it asks the others for a
//!   pre-vote, and a voter whose membership is *newer than the asker's whole log* and does not
//!   list it answers "removed" (a membership newer than the asker's log cannot be one the
//!   asker is about to receive, as it would be for a node being added).
//!
//! It then writes [`MARKER`] into its data dir — so it refuses to start as a member again
//! ([`check_not_removed`]) until `keel cluster leave --reset` clears the dir — stops standing
//! for election, and publishes [`Removed`] on [`crate::ClusterHandle::removed`]: the node
//! stops serving the cluster's listeners (its VIP lease was already gone: it does not lead)
//! and reports it in `/cluster/status` and once in the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The file that records a removal, in the data dir.
pub const MARKER: &str = "removed.json";

/// What a node knows about its own removal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    /// The cluster it was removed from.
    pub cluster_id: String,
    /// This node's id.
    pub node_id: u64,
    /// The term it learned it in (the remover's term when the leader said so).
    pub term: u64,
    /// How it learned it: `leader`, `log` or `peer N`.
    pub learned_from: String,
    /// When (Unix ms).
    pub at_unix_ms: u64,
}

impl Removed {
    /// The line the log, the status and a refused start show.
    pub fn describe(&self) -> String {
        format!(
            "node {} was removed from cluster {:?} at term {} (learned from {})",
            self.node_id, self.cluster_id, self.term, self.learned_from
        )
    }
}

/// One node's knowledge of its removal, shared by everything that can learn it.
pub struct Tracker {
    data_dir: PathBuf,
    cluster_id: String,
    node_id: u64,
    tx: watch::Sender<Option<Removed>>,
}

impl Tracker {
    /// Not removed (a node that was refuses to start: [`check_not_removed`]).
    pub fn new(data_dir: PathBuf, cluster_id: String, node_id: u64) -> Arc<Self> {
        Arc::new(Tracker { data_dir, cluster_id, node_id, tx: watch::channel(None).0 })
    }

    /// Whether this node knows it was removed.
    pub fn is_removed(&self) -> bool {
        self.tx.borrow().is_some()
    }

    /// The removal, if known.
    pub fn current(&self) -> Option<Removed> {
        self.tx.borrow().clone()
    }

    /// The removal, once known.
    pub fn subscribe(&self) -> watch::Receiver<Option<Removed>> {
        self.tx.subscribe()
    }

    /// This node learned (from `learned_from`, at `term`) that it is no longer a member:
    /// recorded in the data dir, logged once, published.
    pub fn learned(&self, term: u64, learned_from: String) {
        if self.is_removed() {
            return;
        }
        let removed = Removed {
            cluster_id: self.cluster_id.clone(),
            node_id: self.node_id,
            term,
            learned_from,
            at_unix_ms: crate::node::now_ms(),
        };
        if let Err(e) = record(&self.data_dir, &removed) {
            tracing::error!(target: "keel::raft", error = %e, dir = %self.data_dir.display(),
                "cannot record the removal in the data dir: a restart would not know of it");
        }
        tracing::warn!(target: "keel::raft", term, "{}: no longer standing for election or serving the cluster's listeners; \
            `keel cluster leave --reset` clears its state for a new join", removed.describe());
        self.tx.send_replace(Some(removed));
    }
}

/// The marker's path in `data_dir`.
pub fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join(MARKER)
}

/// Records the removal in `data_dir` (written to a temporary file, then renamed, so a crash
/// leaves either no marker or a whole one).
pub fn record(data_dir: &Path, removed: &Removed) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(removed).map_err(std::io::Error::other)?;
    let tmp = data_dir.join(format!("{MARKER}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, marker_path(data_dir))
}

/// Fails when `data_dir` records a removal: a removed node must not rejoin with its old log
/// and term. A marker that cannot be read counts as a removal too (named in the message).
pub fn check_not_removed(data_dir: &Path) -> Result<(), String> {
    let path = marker_path(data_dir);
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let what = match serde_json::from_slice::<Removed>(&text) {
        Ok(r) => r.describe(),
        Err(e) => format!("{} records a removal but cannot be parsed ({e})", path.display()),
    };
    Err(format!(
        "{what}; it will not start as a member with its old state. \
         Run `keel cluster leave --reset --config FILE` to clear {}, then join again",
        data_dir.display()
    ))
}

/// Clears a removed (or any stopped) node's Raft state: the files keel keeps in `data_dir` (the
/// log and vote in `raft.redb`, the state machine's `snapshot.bin`, the removal marker, and any
/// half-written temporary of them). Returns what was deleted. Other files are left alone.
pub fn reset(data_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut deleted = Vec::new();
    let snapshot = crate::store::snapshot_file::SNAPSHOT_FILE;
    let names = [crate::store::DB_FILE, snapshot, &format!("{snapshot}.tmp"), MARKER, &format!("{MARKER}.tmp")];
    for name in names {
        let path = data_dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => deleted.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed() -> Removed {
        Removed { cluster_id: "c".into(), node_id: 3, term: 4, learned_from: "leader".into(), at_unix_ms: 1 }
    }

    #[test]
    fn a_recorded_removal_refuses_a_start_until_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(check_not_removed(dir.path()).is_ok());
        record(dir.path(), &removed()).expect("record");
        let e = check_not_removed(dir.path()).expect_err("refused");
        assert!(e.contains("node 3 was removed from cluster \"c\" at term 4"), "{e}");
        assert!(e.contains("keel cluster leave --reset"), "{e}");
        std::fs::write(dir.path().join(crate::store::DB_FILE), b"x").expect("db");
        std::fs::write(dir.path().join(crate::store::snapshot_file::SNAPSHOT_FILE), b"x").expect("snapshot");
        std::fs::write(dir.path().join("keep.txt"), b"x").expect("other");
        let gone = reset(dir.path()).expect("reset");
        assert_eq!(gone.len(), 3, "the log, the snapshot and the marker: {gone:?}");
        assert!(check_not_removed(dir.path()).is_ok());
        assert!(dir.path().join("keep.txt").exists(), "only keel's files are deleted");
    }

    #[test]
    fn a_garbled_marker_still_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(marker_path(dir.path()), b"{not json").expect("write");
        let e = check_not_removed(dir.path()).expect_err("refused");
        assert!(e.contains("cannot be parsed"), "{e}");
    }
}
