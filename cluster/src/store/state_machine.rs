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
//! [`SnapshotMeta`] in front, in one file ([`super::snapshot_file`]). On start the latest
//! snapshot is loaded and openraft replays the log after it.
//!
//! # Off the Raft runtime
//!
//! openraft builds snapshots in a task and installs them from its state-machine task, both on
//! the Raft runtime — one worker that also sends heartbeats and answers votes. At 1M sticky
//! entries a build (encode 25 MB + write + fsync) stalled that worker for 0.4–0.6 s, past the
//! lease, and leadership moved. So the builder takes the state as an `Arc` (the sticky table is a
//! persistent map: the copy the builder holds shares structure with the live one and costs
//! nothing), and the encoding, decoding, file IO and freeing of replaced states all run on the
//! snapshot thread ([`super::worker`]); the Raft task only awaits them. Committed entries are
//! applied on a thread of their own for the same reason (four 10,000-entry sticky batches are
//! 40–80 ms of work).

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta as Meta};
use tokio::sync::watch;

use super::snapshot_file::{SnapshotFile, SnapshotStats};
use super::worker::{Scheduling, StoreWorker};
use super::write_err;
use crate::codec;
use crate::command::Outcome;
use crate::state::ClusterState;
use crate::types::{Entry, LogId, NodeInfo, SnapshotMeta, StorageError, StoredMembership, TypeConfig};

/// The state machine half of the storage.
pub struct StateMachineStore {
    file: SnapshotFile,
    /// Snapshot work, at normal priority.
    worker: StoreWorker,
    /// Applying committed entries, at normal priority: nothing the lease depends on waits for it.
    applier: StoreWorker,
    stats: Arc<SnapshotStats>,
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    publish: watch::Sender<Arc<ClusterState>>,
    snapshots_built: u64,
}

impl StateMachineStore {
    pub(crate) fn open(file: SnapshotFile) -> Result<Self, StorageError> {
        let mut sm = StateMachineStore {
            file,
            worker: StoreWorker::start("keel-snapshot", Scheduling::Normal)?,
            applier: StoreWorker::start("keel-apply", Scheduling::Normal)?,
            stats: Arc::default(),
            state: Arc::new(ClusterState::default()),
            last_applied: None,
            membership: StoredMembership::default(),
            publish: watch::Sender::new(Arc::new(ClusterState::default())),
            snapshots_built: 0,
        };
        if let Some((meta, data)) = sm.file.read()? {
            let state = decode_state(&data, &meta)?;
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

    /// The figures of this node's snapshot builds and installs (shared, live).
    pub fn stats(&self) -> Arc<SnapshotStats> {
        self.stats.clone()
    }
}

/// Opens a snapshot in this version's form. `0xFF` never starts the first version's bytes
/// (their first byte is a bincode varint length, 0–253), so the forms cannot be confused.
const FORMAT_V3: [u8; 4] = [0xFF, b'K', b'S', 3];
/// The previous form: the same state without the spread VIPs.
const FORMAT_V2: [u8; 4] = [0xFF, b'K', b'S', 2];

/// Encodes the state as a snapshot: [`FORMAT_V3`], then bincode.
pub(crate) fn encode_state(state: &ClusterState) -> Result<Vec<u8>, StorageError> {
    let body = codec::encode(state).map_err(write_err)?;
    let mut data = Vec::with_capacity(FORMAT_V3.len() + body.len());
    data.extend_from_slice(&FORMAT_V3);
    data.extend_from_slice(&body);
    Ok(data)
}

/// [`ClusterState`] as [`FORMAT_V2`] wrote it (bincode has no optional trailing fields).
#[derive(serde::Deserialize)]
struct StateV2 {
    #[serde(with = "crate::codec::config_field")]
    config: crate::model::Config,
    overrides: std::collections::BTreeMap<String, std::collections::BTreeMap<String, crate::state::ServerOverride>>,
    health: std::collections::BTreeMap<String, std::collections::BTreeMap<String, crate::state::HealthVerdict>>,
    sticky: crate::state::StickyTable,
    voters: std::collections::BTreeSet<u64>,
}

/// Decodes a snapshot's state: this version's form, or an earlier one (converted, nothing
/// lost). Anything else is an error naming the snapshot, never an empty state.
fn decode_state(data: &[u8], meta: &SnapshotMeta) -> Result<ClusterState, StorageError> {
    let decoded = if let Some(body) = data.strip_prefix(&FORMAT_V3) {
        codec::decode(body)
    } else if let Some(body) = data.strip_prefix(&FORMAT_V2) {
        codec::decode::<StateV2>(body).map(|v2| ClusterState {
            config: v2.config,
            overrides: v2.overrides,
            health: v2.health,
            sticky: v2.sticky,
            voters: v2.voters,
            vips: Default::default(),
        })
    } else {
        crate::sticky_table::legacy::decode(data)
    };
    decoded.map_err(|e| {
        let e =
            std::io::Error::other(format!("snapshot {} is not a state this version can read: {e}", meta.snapshot_id));
        openraft::StorageIOError::read_snapshot(Some(meta.signature()), &e).into()
    })
}

/// The state machine's part that [`apply_entries`] works on, on the apply thread.
struct Applied {
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    outcomes: Vec<Outcome>,
    /// Whether the state changed (and must be published).
    changed: bool,
}

/// Applies committed entries in log order (on the apply thread).
fn apply_entries(mut a: Applied, entries: Vec<Entry>) -> Applied {
    for entry in entries {
        a.last_applied = Some(entry.log_id);
        let index = entry.log_id.index;
        let outcome = match entry.payload {
            EntryPayload::Blank => Outcome::Internal,
            EntryPayload::Normal(proposal) => {
                let state = Arc::make_mut(&mut a.state);
                let out = state.apply(&proposal.command, index, proposal.proposed_at_ms);
                match &out {
                    Outcome::Applied { changed: false } => {}
                    Outcome::Rejected { reason } => {
                        tracing::warn!(target: "keel::raft", index, command = proposal.command.name(), %reason, "command rejected at apply");
                    }
                    _ => a.changed = true,
                }
                out
            }
            EntryPayload::Membership(m) => {
                let voters = m.voter_ids().collect();
                a.membership = StoredMembership::new(Some(entry.log_id), m);
                a.changed |= Arc::make_mut(&mut a.state).set_voters(voters, index);
                Outcome::Internal
            }
        };
        a.outcomes.push(outcome);
    }
    a
}

/// Builds a snapshot from a frozen copy of the state (an `Arc` clone: no copying).
pub struct SnapshotBuilder {
    file: SnapshotFile,
    worker: StoreWorker,
    stats: Arc<SnapshotStats>,
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.seq),
            None => format!("none-{}", self.seq),
        };
        let meta = Meta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        let (state, file, stats) = (self.state.clone(), self.file.clone(), self.stats.clone());
        let (meta, data) = self.worker.run(move || {
            let started = Instant::now();
            let data = encode_state(&state)?;
            file.write(&meta, &data)?;
            let took = started.elapsed();
            stats.built(data.len(), u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
            tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, bytes = data.len(), ms = took.as_millis() as u64, "snapshot built");
            // The last reference to an old version of the state may be this one: freeing a large
            // table is work too, done here rather than on the Raft runtime.
            drop(state);
            Ok((meta, data))
        })
        .await?;
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
        let entries: Vec<Entry> = entries.into_iter().collect();
        // The state moves to the apply thread and back: the Raft runtime keeps heartbeating while
        // a batch of sticky entries is applied. Moved, not shared, so `make_mut` there copies
        // only what the published copy still shares.
        let batch = Applied {
            state: std::mem::take(&mut self.state),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            outcomes: Vec::with_capacity(entries.len()),
            changed: false,
        };
        let done = self.applier.run(move || Ok(apply_entries(batch, entries))).await?;
        self.state = done.state;
        self.last_applied = done.last_applied;
        self.membership = done.membership;
        if done.changed {
            let replaced = self.publish.send_replace(self.state.clone());
            // Freeing what only the replaced copy held is the snapshot thread's work too.
            self.worker.discard(replaced);
        }
        Ok(done.outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshots_built += 1;
        SnapshotBuilder {
            file: self.file.clone(),
            worker: self.worker.clone(),
            stats: self.stats.clone(),
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
        let (file, stats, for_io) = (self.file.clone(), self.stats.clone(), meta.clone());
        // Decode and persist off the Raft runtime, then swap in one step: until the swap the
        // old state stays served and applied.
        let state = self
            .worker
            .run(move || {
                let started = Instant::now();
                let state = decode_state(&data, &for_io)?;
                file.write(&for_io, &data)?;
                stats.installed(data.len(), u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                Ok(state)
            })
            .await?;
        tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, "snapshot installed");
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let old = std::mem::replace(&mut self.state, Arc::new(state));
        let published = self.publish.send_replace(self.state.clone());
        // Freeing the replaced table is as large a job as decoding it: not on the Raft runtime.
        self.worker.discard((old, published));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let file = self.file.clone();
        let found = self.worker.run(move || file.read()).await?;
        Ok(found.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
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

    /// A snapshot written before the spread VIPs (format 2) reads back whole, with no VIPs;
    /// one of this version keeps them.
    #[test]
    fn a_format_2_snapshot_still_decodes_and_format_3_keeps_the_vips() -> Result<(), Box<dyn std::error::Error>> {
        #[derive(serde::Serialize)]
        struct V2<'a> {
            #[serde(with = "crate::codec::config_field")]
            config: &'a crate::model::Config,
            overrides: &'a std::collections::BTreeMap<
                String,
                std::collections::BTreeMap<String, crate::state::ServerOverride>,
            >,
            health:
                &'a std::collections::BTreeMap<String, std::collections::BTreeMap<String, crate::state::HealthVerdict>>,
            sticky: &'a crate::state::StickyTable,
            voters: &'a std::collections::BTreeSet<u64>,
        }
        let mut state = ClusterState { voters: [1, 2, 3].into(), ..Default::default() };
        state.sticky.put("app", "10.0.0.1", "a", 5_000_000, 1);
        let old = V2 {
            config: &state.config,
            overrides: &state.overrides,
            health: &state.health,
            sticky: &state.sticky,
            voters: &state.voters,
        };
        let mut data = FORMAT_V2.to_vec();
        data.extend(codec::encode(&old)?);
        let meta = SnapshotMeta::default();
        assert_eq!(decode_state(&data, &meta)?, state);

        state.vips.insert("10.0.0.100".parse()?, crate::vips::VipSlot { holder: Some(2), ..Default::default() });
        assert_eq!(decode_state(&encode_state(&state)?, &meta)?, state);
        Ok(())
    }
}
