//! The latest snapshot as one file beside the database (`<data_dir>/snapshot.bin`), and the
//! figures of building and installing snapshots ([`SnapshotStats`]).
//!
//! # Why a file and not a redb row
//!
//! redb serializes write transactions. A 25 MB snapshot written into `raft.redb` held its write
//! lock for the whole copy and fsync, and every log append — made on the Raft runtime, which also
//! sends heartbeats — waited behind it: moving the write to another thread alone would not have
//! freed the Raft thread. A separate file has no lock shared with the log.
//!
//! # Format and crash safety
//!
//! ```text
//! "KEELSNP1" | meta length (u32 BE) | bincode(SnapshotMeta) | bincode(ClusterState)
//! ```
//!
//! Written to `snapshot.bin.tmp`, fsynced, renamed over `snapshot.bin`, then the directory is
//! fsynced: a crash leaves the old snapshot or the new one, never a torn one. openraft purges the
//! log only after a build or install returned, so the log never loses entries the file lacks.
//!
//! Nodes of the previous version kept the snapshot in `raft.redb` (table `snapshot`);
//! [`migrate_legacy`] moves it to the file on open.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableDatabase};

use super::{read_err, write_err, SNAPSHOT};
use crate::codec;
use crate::types::{SnapshotMeta, StorageError};

/// Name of the snapshot file inside the data dir.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

const MAGIC: &[u8; 8] = b"KEELSNP1";

/// How much of a snapshot is written before it is flushed (see [`SnapshotFile::write`]).
const WRITE_SLICE: usize = 1 << 20;

/// Where the snapshot file lives.
#[derive(Clone, Debug)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    /// The snapshot file of `data_dir`.
    pub fn in_dir(data_dir: &Path) -> Self {
        SnapshotFile { path: data_dir.join(SNAPSHOT_FILE) }
    }

    /// Reads the snapshot, if one was written. Blocking: call it off the Raft runtime.
    pub fn read(&self) -> Result<Option<(SnapshotMeta, Vec<u8>)>, StorageError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(read_err)?;
        let bad = |what: &str| read_err(std::io::Error::other(format!("{}: {what}", self.path.display())));
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(|| bad("not a keel snapshot file"))?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(|| bad("truncated header"))?;
        let meta_len = u32::from_be_bytes(*len) as usize;
        if rest.len() < meta_len {
            return Err(bad("truncated metadata"));
        }
        let meta: SnapshotMeta = codec::decode(&rest[..meta_len]).map_err(read_err)?;
        let data_at = MAGIC.len() + 4 + meta_len;
        bytes.drain(..data_at);
        Ok(Some((meta, bytes)))
    }

    /// Replaces the snapshot durably (see the module doc). Blocking: call it off the Raft
    /// runtime.
    pub fn write(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let meta_bytes = codec::encode(meta).map_err(write_err)?;
        let meta_len = u32::try_from(meta_bytes.len()).map_err(write_err)?;
        let tmp = self.path.with_extension("bin.tmp");
        {
            let mut file = File::create(&tmp).map_err(write_err)?;
            file.write_all(MAGIC).map_err(write_err)?;
            file.write_all(&meta_len.to_be_bytes()).map_err(write_err)?;
            file.write_all(&meta_bytes).map_err(write_err)?;
            // In slices, each flushed before the next: one fsync of 16–25 MB of dirty pages makes
            // every other fsync on the filesystem wait behind it (ext4 commits the journal with
            // the data it orders), and the Raft log's appends are fsynced on the Raft thread.
            for chunk in data.chunks(WRITE_SLICE) {
                file.write_all(chunk).map_err(write_err)?;
                file.sync_data().map_err(write_err)?;
            }
            file.sync_all().map_err(write_err)?;
        }
        fs::rename(&tmp, &self.path).map_err(write_err)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(write_err)?;
        }
        Ok(())
    }
}

/// Moves a snapshot kept in `raft.redb` by the previous version into `file`, unless the file
/// already holds a snapshot at least as new, and deletes the rows. Runs once, on open.
pub(crate) fn migrate_legacy(db: &Database, file: &SnapshotFile) -> Result<(), StorageError> {
    let legacy = {
        let tx = db.begin_read().map_err(read_err)?;
        let table = tx.open_table(SNAPSHOT).map_err(read_err)?;
        match (table.get("meta").map_err(read_err)?, table.get("data").map_err(read_err)?) {
            (Some(meta), Some(data)) => {
                let meta: SnapshotMeta = codec::decode(meta.value()).map_err(read_err)?;
                Some((meta, data.value().to_vec()))
            }
            _ => None,
        }
    };
    let Some((meta, data)) = legacy else { return Ok(()) };
    let current = file.read()?.map(|(m, _)| m.last_log_id);
    if current.is_none_or(|c| c < meta.last_log_id) {
        file.write(&meta, &data)?;
        tracing::info!(target: "keel::raft", last_log_id = ?meta.last_log_id, "snapshot moved from raft.redb to its own file");
    }
    let tx = db.begin_write().map_err(write_err)?;
    {
        let mut table = tx.open_table(SNAPSHOT).map_err(write_err)?;
        table.remove("meta").map_err(write_err)?;
        table.remove("data").map_err(write_err)?;
    }
    tx.commit().map_err(write_err)
}

/// Figures of the snapshots this node built and installed, for `/metrics` (read with relaxed
/// loads: each figure is independent).
#[derive(Debug, Default)]
pub struct SnapshotStats {
    builds: AtomicU64,
    installs: AtomicU64,
    last_bytes: AtomicU64,
    last_build_micros: AtomicU64,
    last_install_micros: AtomicU64,
    build_micros_total: AtomicU64,
    install_micros_total: AtomicU64,
}

/// One reading of [`SnapshotStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotFigures {
    /// Snapshots built since start.
    pub builds: u64,
    /// Snapshots received and installed since start.
    pub installs: u64,
    /// Size of the latest snapshot built or installed, in bytes.
    pub last_bytes: u64,
    /// Time the latest build took (encode + durable write), in µs.
    pub last_build_micros: u64,
    /// Time the latest install took (decode + durable write), in µs.
    pub last_install_micros: u64,
    /// Sum of all build times, in µs.
    pub build_micros_total: u64,
    /// Sum of all install times, in µs.
    pub install_micros_total: u64,
}

impl SnapshotStats {
    pub(crate) fn built(&self, bytes: usize, micros: u64) {
        self.last_bytes.store(bytes as u64, Ordering::Relaxed);
        self.last_build_micros.store(micros, Ordering::Relaxed);
        self.build_micros_total.fetch_add(micros, Ordering::Relaxed);
        self.builds.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn installed(&self, bytes: usize, micros: u64) {
        self.last_bytes.store(bytes as u64, Ordering::Relaxed);
        self.last_install_micros.store(micros, Ordering::Relaxed);
        self.install_micros_total.fetch_add(micros, Ordering::Relaxed);
        self.installs.fetch_add(1, Ordering::Relaxed);
    }

    /// The current figures.
    pub fn figures(&self) -> SnapshotFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SnapshotFigures {
            builds: get(&self.builds),
            installs: get(&self.installs),
            last_bytes: get(&self.last_bytes),
            last_build_micros: get(&self.last_build_micros),
            last_install_micros: get(&self.last_install_micros),
            build_micros_total: get(&self.build_micros_total),
            install_micros_total: get(&self.install_micros_total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_snapshot_reads_back_and_garbage_is_an_error() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let file = SnapshotFile::in_dir(dir.path());
        assert!(file.read()?.is_none());
        let meta = SnapshotMeta { snapshot_id: "x-1".into(), ..Default::default() };
        file.write(&meta, b"state bytes")?;
        let (m, data) = file.read()?.ok_or("no snapshot")?;
        assert_eq!((m, data.as_slice()), (meta, b"state bytes".as_slice()));
        fs::write(dir.path().join(SNAPSHOT_FILE), b"KEELSNP1\0\0\0\x09ab")?;
        assert!(file.read().is_err(), "a truncated file is an error, not an empty snapshot");
        Ok(())
    }

    /// A data dir of the previous version (snapshot rows in raft.redb) opens with its state, and
    /// the rows move to the file.
    #[test]
    fn a_snapshot_kept_in_redb_by_the_previous_version_is_moved_to_the_file() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        drop(crate::store::open(dir.path())?);
        let state = crate::ClusterState { voters: [7].into(), ..Default::default() };
        let meta = SnapshotMeta { snapshot_id: "old".into(), ..Default::default() };
        {
            let db = Database::create(dir.path().join(crate::store::DB_FILE))?;
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(SNAPSHOT)?;
                table.insert("meta", codec::encode(&meta)?.as_slice())?;
                table.insert("data", crate::store::state_machine::encode_state(&state)?.as_slice())?;
            }
            tx.commit()?;
        }
        let (_, sm) = crate::store::open(dir.path())?;
        assert_eq!(**sm.subscribe().borrow(), state);
        let (m, _) = SnapshotFile::in_dir(dir.path()).read()?.ok_or("no snapshot file")?;
        assert_eq!(m.snapshot_id, "old");
        Ok(())
    }
}
