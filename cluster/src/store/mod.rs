//! Durable Raft storage on one redb database file (`<data_dir>/raft.redb`).
//!
//! - [`log`]: the Raft log, the vote and the committed/purged markers ([`LogStore`]).
//! - [`state_machine`]: [`crate::ClusterState`], the applied index and membership, and the
//!   latest snapshot ([`StateMachineStore`]).
//! - [`snapshot_file`]: the latest snapshot in its own file (`snapshot.bin`), so writing it never
//!   holds the database's write lock that log appends need, and the build/install figures.
//! - [`worker`]: the store's threads — one at normal priority that encodes, decodes, reads and
//!   writes snapshots, one that applies committed entries — so the Raft runtime does neither.
//!
//! Why redb: pure Rust, one file, ACID transactions whose commit is durable when it returns
//! (≈ 0.2 ms here, the cost of one fdatasync); no C++ build. The log is one
//! [`redb::Database`]: redb serializes write transactions, which is what openraft asks of log IO.
//!
//! Crash safety: every log append, truncate, purge and vote is a durable transaction; openraft
//! is told a write is done only after the commit returned. The state machine itself is kept in
//! memory and rebuilt on start from the latest persisted snapshot plus the log after it (the
//! committed marker lets openraft re-apply up to the last known commit immediately). Snapshots
//! are taken by openraft's policy (every [`SNAPSHOT_EVERY`] entries) and the log before them is
//! purged, so neither the file nor the restart replay grows without bound.
//!
//! Only the log and its markers live in redb; the snapshot is a separate file written off the
//! Raft runtime (see [`snapshot_file`] for why).

pub mod log;
pub mod snapshot_file;
pub mod state_machine;
pub mod worker;

use std::path::Path;
use std::sync::Arc;

use redb::{Database, TableDefinition};

pub use self::log::LogStore;
pub use self::snapshot_file::{SnapshotFigures, SnapshotFile, SnapshotStats};
pub use self::state_machine::StateMachineStore;
use crate::types::StorageError;

/// Log entries: index → bincode(Entry).
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Small records: "vote", "committed", "purged" → bincode.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Where the previous version kept the latest snapshot ("meta", "data"); now only read once, to
/// move it into [`snapshot_file`].
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// Build a snapshot every this many applied entries (openraft `SnapshotPolicy::LogsSinceLast`).
pub const SNAPSHOT_EVERY: u64 = 5_000;

/// Name of the database file inside the data dir.
pub const DB_FILE: &str = "raft.redb";

/// Opens (or creates) the database in `data_dir` and returns the two storage halves.
pub fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), StorageError> {
    std::fs::create_dir_all(data_dir).map_err(|e| StorageError::from(openraft::StorageIOError::write(&e)))?;
    let db = Database::create(data_dir.join(DB_FILE)).map_err(write_err)?;
    let tx = db.begin_write().map_err(write_err)?;
    {
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?;
        tx.open_table(SNAPSHOT).map_err(write_err)?;
    }
    tx.commit().map_err(write_err)?;
    let file = SnapshotFile::in_dir(data_dir);
    snapshot_file::migrate_legacy(&db, &file)?;
    let db = Arc::new(db);
    let sm = StateMachineStore::open(file)?;
    Ok((LogStore::new(db)?, sm))
}

pub(crate) fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    openraft::StorageIOError::write(&e).into()
}

pub(crate) fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> StorageError {
    openraft::StorageIOError::read(&e).into()
}
