//! The Raft log, vote and committed/purged markers on redb ([`LogStore`]).
//!
//! Every mutation is one redb write transaction with immediate durability; `append` reports
//! completion through [`LogFlushed::log_io_completed`] only after the commit returned, so a
//! kill -9 can lose no entry openraft counted as persisted.
//!
//! # Off the Raft runtime
//!
//! A commit is an fsync: ≈ 0.2 ms on an idle disk, but 100–200 ms on a busy one (measured here
//! with other builds writing), and the Raft runtime's one worker also sends heartbeats — an
//! fsync that long on it lost the leader its lease. So every write transaction runs on the log
//! thread ([`super::worker`]), in call order. `append` returns once the entries are queued and
//! readable from memory (`pending`), as openraft's storage-v2 contract allows, and the callback
//! fires after the commit. Vote, committed marker, truncate and purge wait for their commit
//! (an `await`: the Raft thread runs meanwhile). Readers take `pending` first and the database
//! second: an entry leaves `pending` only after its commit, so a reader sees it in one or the
//! other. The store is `Clone` and is its own [`RaftLogReader`].

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader};
use redb::{Database, ReadableDatabase, ReadableTable};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::worker::{Scheduling, StoreWorker};
use super::{read_err, write_err, LOG, META};
use crate::codec;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The redb-backed Raft log (and vote).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// Appended, not yet committed: index → entry.
    pending: Arc<Mutex<BTreeMap<u64, Entry>>>,
    /// Runs every write transaction, in call order.
    writer: StoreWorker,
}

impl LogStore {
    pub(crate) fn new(db: Arc<Database>) -> Result<Self, StorageError> {
        let writer = StoreWorker::start("keel-log", Scheduling::BelowInherited)?;
        Ok(LogStore { db, pending: Arc::default(), writer })
    }

    fn pending(&self) -> MutexGuard<'_, BTreeMap<u64, Entry>> {
        // A panic while holding the lock leaves a map that is still whole: entries are inserted
        // and removed one at a time.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs a write transaction on the log thread and waits for its commit.
    async fn write(
        &self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<(), StorageError> {
        let db = self.db.clone();
        self.writer
            .run(move || {
                let tx = db.begin_write().map_err(write_err)?;
                work(&tx)?;
                tx.commit().map_err(write_err)
            })
            .await
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(codec::decode(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StorageError> {
        let bytes = codec::encode(value).map_err(write_err)?;
        self.write(move |tx| {
            let mut table = tx.open_table(META).map_err(write_err)?;
            table.insert(key, bytes.as_slice()).map_err(write_err)?;
            Ok(())
        })
        .await
    }

    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        let last = table.last().map_err(read_err)?;
        match last {
            Some((_, v)) => {
                let entry: Entry = codec::decode(v.value()).map_err(read_err)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        // Pending first, then the database (see the module doc).
        let pending: Vec<Entry> = self.pending().range(bounds).map(|(_, e)| e.clone()).collect();
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        let mut out = BTreeMap::new();
        for item in table.range(bounds).map_err(read_err)? {
            let (k, v) = item.map_err(read_err)?;
            out.insert(k.value(), codec::decode::<Entry>(v.value()).map_err(read_err)?);
        }
        for e in pending {
            out.insert(e.log_id.index, e);
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(PURGED)?;
        let last_pending = self.pending().last_key_value().map(|(_, e)| e.log_id);
        let last_log_id = last_pending.max(self.last_entry_id()?).or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote).await.map_err(|e| openraft::StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(COMMITTED, &committed).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        {
            let mut pending = self.pending();
            for entry in entries {
                let bytes =
                    codec::encode(&entry).map_err(|e| openraft::StorageIOError::write_log_entry(entry.log_id, &e))?;
                encoded.push((entry.log_id, bytes));
                pending.insert(entry.log_id.index, entry);
            }
        }
        // Readable now (pending); durable when the log thread's commit returns.
        let (db, pending) = (self.db.clone(), self.pending.clone());
        self.writer.discard_with(move || {
            let result = (|| {
                let tx = db.begin_write().map_err(write_err)?;
                {
                    let mut table = tx.open_table(LOG).map_err(write_err)?;
                    for (log_id, bytes) in &encoded {
                        table.insert(log_id.index, bytes.as_slice()).map_err(write_err)?;
                    }
                }
                tx.commit().map_err(write_err)
            })();
            if result.is_ok() {
                let mut pending = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (log_id, _) in &encoded {
                    // A truncate may have replaced it meanwhile: remove only this very entry.
                    if pending.get(&log_id.index).is_some_and(|e| e.log_id == *log_id) {
                        pending.remove(&log_id.index);
                    }
                }
            }
            // Durable (or failed) now: only now may openraft count these entries as persisted.
            callback.log_io_completed(result.map_err(|e| std::io::Error::other(e.to_string())));
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(target: "keel::raft", %log_id, "truncating log");
        self.pending().retain(|index, _| *index < log_id.index);
        self.write(move |tx| {
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            table.retain_in(log_id.index.., |_, _| false).map_err(write_err)?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(target: "keel::raft", %log_id, "purging log");
        let bytes = codec::encode(&log_id).map_err(write_err)?;
        // Entries up to a purge were applied, so committed: none is still pending.
        self.write(move |tx| {
            let mut meta = tx.open_table(META).map_err(write_err)?;
            meta.insert(PURGED, bytes.as_slice()).map_err(write_err)?;
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            table.retain_in(..=log_id.index, |_, _| false).map_err(write_err)?;
            Ok(())
        })
        .await
    }
}
