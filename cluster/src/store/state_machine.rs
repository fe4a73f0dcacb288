//! The Raft state machine ([`StateMachineStore`]): [`ClusterState`], the last applied log id and
//! membership, and the latest snapshot (persisted in redb).
//!
//! The state lives in memory behind an `Arc` and is published on a `watch` channel after each
//! applied batch that changed it (a rejected command or a no-op publishes nothing). Publishing is
//! copy-on-write: the first change in a batch clones the state once (`Arc::make_mut`), so readers
//! keep a consistent old snapshot while the new one is built. With a sticky table near its bound
//! that clone is the dominant cost of a batch; sticky batches are coalesced by the proposer, so it
//! is paid per batch, not per session.
//!
//! Snapshots are bincode of [`ClusterState`] (which includes the voter set), with the openraft
//! [`SnapshotMeta`] stored beside it; both are written in one durable redb transaction. On start
//! the latest snapshot is loaded and openraft replays the log after it.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta as Meta};
use redb::{Database, ReadableDatabase};
use tokio::sync::watch;

use super::{read_err, write_err, SNAPSHOT};
use crate::codec;
use crate::command::Outcome;
use crate::state::ClusterState;
use crate::types::{Entry, LogId, NodeInfo, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// The state machine half of the storage.
pub struct StateMachineStore {
    db: Arc<Database>,
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    publish: watch::Sender<Arc<ClusterState>>,
    snapshots_built: u64,
}

impl StateMachineStore {
    pub(crate) fn open(db: Arc<Database>) -> Result<Self, StorageError> {
        let mut sm = StateMachineStore {
            db,
            state: Arc::new(ClusterState::default()),
            last_applied: None,
            membership: StoredMembership::default(),
            publish: watch::Sender::new(Arc::new(ClusterState::default())),
            snapshots_built: 0,
        };
        if let Some((meta, data)) = sm.read_snapshot()? {
            let state: ClusterState = codec::decode(&data).map_err(read_err)?;
            tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, "state restored from snapshot");
            sm.last_applied = meta.last_log_id;
            sm.membership = meta.last_membership;
            sm.state = Arc::new(state);
            sm.publish.send_replace(sm.state.clone());
        }
        Ok(sm)
    }

    /// A receiver of the applied state; it sees a new `Arc` only when the state changed.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.publish.subscribe()
    }

    fn read_snapshot(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(SNAPSHOT).map_err(read_err)?;
        let (Some(meta), Some(data)) = (table.get("meta").map_err(read_err)?, table.get("data").map_err(read_err)?)
        else {
            return Ok(None);
        };
        let meta: SnapshotMeta = codec::decode(meta.value()).map_err(read_err)?;
        Ok(Some((meta, data.value().to_vec())))
    }
}

fn write_snapshot(db: &Database, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
    let meta_bytes = codec::encode(meta).map_err(write_err)?;
    let tx = db.begin_write().map_err(write_err)?;
    {
        let mut table = tx.open_table(SNAPSHOT).map_err(write_err)?;
        table.insert("meta", meta_bytes.as_slice()).map_err(write_err)?;
        table.insert("data", data).map_err(write_err)?;
    }
    tx.commit().map_err(write_err)
}

/// Builds a snapshot from a frozen copy of the state (an `Arc` clone: no copying).
pub struct SnapshotBuilder {
    db: Arc<Database>,
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = codec::encode(&*self.state).map_err(write_err)?;
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = Meta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        write_snapshot(&self.db, &meta, &data)?;
        tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, bytes = data.len(), "snapshot built");
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        let mut changed = false;
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            let outcome = match entry.payload {
                EntryPayload::Blank => Outcome::Internal,
                EntryPayload::Normal(proposal) => {
                    let state = Arc::make_mut(&mut self.state);
                    let out = state.apply(&proposal.command, index, proposal.proposed_at_ms);
                    match &out {
                        Outcome::Applied { changed: false } => {}
                        Outcome::Rejected { reason } => {
                            tracing::warn!(target: "keel::raft", index, command = proposal.command.name(), %reason, "command rejected at apply");
                        }
                        _ => changed = true,
                    }
                    out
                }
                EntryPayload::Membership(m) => {
                    let voters = m.voter_ids().collect();
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    changed |= Arc::make_mut(&mut self.state).set_voters(voters, index);
                    Outcome::Internal
                }
            };
            outcomes.push(outcome);
        }
        if changed {
            self.publish.send_replace(self.state.clone());
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            db: self.db.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            seq: self.snapshots_built,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta<u64, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let state: ClusterState =
            codec::decode(&data).map_err(|e| openraft::StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        write_snapshot(&self.db, meta, &data)?;
        tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, "snapshot installed");
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.state = Arc::new(state);
        self.publish.send_replace(self.state.clone());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.read_snapshot()?.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;
    use crate::store::LogStore;

    struct RedbBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
        async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
            let (log, sm) = crate::store::open(dir.path())?;
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn redb_store_passes_openraft_conformance_suite() -> Result<(), StorageError> {
        Suite::test_all(RedbBuilder)
    }
}
