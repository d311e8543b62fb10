//! The Raft log, the vote and the commit index, in a sled database of their own (`log/`;
//! the key space is in another, see `node::storage`).
//!
//! Entries are bincode-encoded under big-endian index keys, so the tree's order is the log's.
//! An append is acknowledged to openraft only once it is on disk: appends go into the tree at
//! once (cheap, in memory) and a single flusher thread fsyncs for everything appended since its
//! last flush. Many concurrent writers therefore share one flush (group commit). The flusher is
//! a thread of its own, not a task, because a flush blocks: sled's `flush_async` would hand each
//! one to sled's thread pool, whose every job wakes all its idle threads, and the pool thread
//! would hand the write itself to another job; the vendored sled (vendor/sled/FLOTILLA.md)
//! writes a flushed buffer on the flushing thread.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader, StorageIOError};
use tokio::sync::mpsc;

use crate::codec;
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// The tree of log entries.
pub const LOG_TREE: &str = "raft/log";
/// The tree of the vote, the commit index and the last purged log id.
pub const META_TREE: &str = "raft/meta";

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The log store handed to openraft; clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    logs: sled::Tree,
    meta: sled::Tree,
    /// The key space's database, flushed before entries are purged.
    state: sled::Db,
    flusher: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
    /// The last commit index openraft reported, for `cluster status`.
    committed: Arc<AtomicU64>,
    /// Bytes appended since the member started (to snapshot by log size).
    appended: Arc<AtomicU64>,
}

impl LogStore {
    /// Opens the log trees in `db` and starts the flusher thread (which ends once every clone
    /// of the store is dropped). `state` is the key space's database.
    pub fn open(db: &sled::Db, state: &sled::Db) -> Result<Self, sled::Error> {
        let logs = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let (flusher, rx) = mpsc::unbounded_channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("flotilla-log-flush".into())
            .spawn(move || flush_loop(flush_db, rx))?;
        let committed = meta
            .get(COMMITTED)?
            .and_then(|v| codec::decode::<Option<LogId>>(&v).ok().flatten())
            .map_or(0, |id| id.index);
        Ok(Self {
            logs,
            meta,
            state: state.clone(),
            flusher,
            committed: Arc::new(AtomicU64::new(committed)),
            appended: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes appended to the log since the member started.
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended.clone()
    }

    /// The commit index as last reported by openraft.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    /// Reads the log ids of this log's entries, for the checks on peer requests.
    pub fn log_ids(&self) -> LogIds {
        LogIds {
            logs: self.logs.clone(),
            meta: self.meta.clone(),
        }
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let bytes = self
            .meta
            .get(key)
            .map_err(|e| read_err(ErrorSubject::Store, &e))?;
        match bytes {
            None => Ok(None),
            Some(b) => codec::decode(&b)
                .map(Some)
                .map_err(|e| corrupt(ErrorSubject::Store, e)),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let bytes = codec::encode(value).map_err(|e| corrupt(ErrorSubject::Store, e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| write_err(ErrorSubject::Store, &e))?;
        Ok(())
    }
}

/// The log ids of a log's entries, read without decoding their payloads.
#[derive(Clone)]
pub struct LogIds {
    logs: sled::Tree,
    meta: sled::Tree,
}

impl LogIds {
    /// The log id of the entry at `index`, or the last purged log id when that is at
    /// `index`; `None` when the log holds neither.
    pub fn at(&self, index: u64) -> Result<Option<LogId>, String> {
        if let Some(bytes) = self.logs.get(index_key(index)).map_err(|e| e.to_string())? {
            // An entry is encoded as its log id, then its payload.
            let (id, _) = codec::decode_prefix::<LogId>(&bytes)?;
            return Ok(Some(id));
        }
        let purged = self.meta_value::<Option<LogId>>(LAST_PURGED)?.flatten();
        Ok(purged.filter(|p| p.index == index))
    }

    /// The stored vote.
    pub fn vote(&self) -> Result<Option<Vote>, String> {
        self.meta_value(VOTE)
    }

    /// The stored commit index.
    pub fn committed(&self) -> Result<Option<LogId>, String> {
        Ok(self.meta_value::<Option<LogId>>(COMMITTED)?.flatten())
    }

    fn meta_value<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, String> {
        match self.meta.get(key).map_err(|e| e.to_string())? {
            Some(b) => codec::decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// The last log id the log holds (or last purged), and the last purged one.
    pub fn bounds(&self) -> Result<(Option<LogId>, Option<LogId>), String> {
        let purged = self.meta_value::<Option<LogId>>(LAST_PURGED)?.flatten();
        let last = match self.logs.last().map_err(|e| e.to_string())? {
            Some((_, bytes)) => Some(codec::decode_prefix::<LogId>(&bytes)?.0),
            None => purged,
        };
        Ok((last, purged))
    }
}

/// Flushes the log's database for every batch of appends that arrived while the previous flush
/// ran.
fn flush_loop(db: sled::Db, mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>) {
    let mut waiting = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        waiting.push(first);
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let result = db.flush().map(|_| ()).map_err(std::io::Error::other);
        if let Err(e) = &result {
            tracing::error!(error = %e, "flushing the Raft log failed; this member stops");
        }
        for callback in waiting.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            };
            callback.log_io_completed(r);
        }
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_err(subject: ErrorSubject<u64>, e: &dyn std::error::Error) -> StorageError {
    StorageIOError::new(
        subject,
        ErrorVerb::Read,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

fn write_err(subject: ErrorSubject<u64>, e: &dyn std::error::Error) -> StorageError {
    StorageIOError::new(
        subject,
        ErrorVerb::Write,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

fn corrupt(subject: ErrorSubject<u64>, msg: String) -> StorageError {
    StorageIOError::new(subject, ErrorVerb::Read, openraft::AnyError::error(msg)).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let iter = match range.end_bound() {
            Bound::Included(i) => self.logs.range(index_key(start)..=index_key(*i)),
            Bound::Excluded(i) => self.logs.range(index_key(start)..index_key(*i)),
            Bound::Unbounded => self.logs.range(index_key(start)..),
        };
        let mut entries = Vec::new();
        for item in iter {
            let (_, bytes) = item.map_err(|e| read_err(ErrorSubject::Logs, &e))?;
            let entry: Entry = codec::decode(&bytes).map_err(|e| corrupt(ErrorSubject::Logs, e))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED)?.flatten();
        let last = self
            .logs
            .last()
            .map_err(|e| read_err(ErrorSubject::Logs, &e))?;
        let last_log_id = match last {
            Some((_, bytes)) => {
                let entry: Entry =
                    codec::decode(&bytes).map_err(|e| corrupt(ErrorSubject::Logs, e))?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)?;
        // A vote must be durable before it is acted upon.
        self.meta
            .flush_async()
            .await
            .map_err(|e| write_err(ErrorSubject::Vote, &e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed
            .store(committed.map_or(0, |id| id.index), Ordering::Relaxed);
        // Not flushed: losing it only means re-applying from the last applied entry.
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // One insert per entry, not a sled batch: each batch costs sled two io-buffer writes of
        // its own. Atomicity across the entries is not needed: sled recovers a prefix of its
        // writes, a prefix of an append is a valid log, and none of it is acknowledged before
        // the flush below.
        let mut size = 0;
        for entry in entries {
            let bytes = codec::encode(&entry).map_err(|e| corrupt(ErrorSubject::Logs, e))?;
            size += bytes.len() as u64;
            self.logs
                .insert(index_key(entry.log_id.index), bytes)
                .map_err(|e| write_err(ErrorSubject::Logs, &e))?;
        }
        self.appended.fetch_add(size, Ordering::Relaxed);
        if self.flusher.send(callback).is_err() {
            return Err(write_err(
                ErrorSubject::Logs,
                &std::io::Error::other("the log flusher has stopped"),
            ));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.logs.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| read_err(ErrorSubject::Logs, &e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| write_err(ErrorSubject::Logs, &e))?;
        // Truncation must reach disk before newer entries are appended in place of the old.
        self.logs
            .flush_async()
            .await
            .map_err(|e| write_err(ErrorSubject::Logs, &e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Entries are purged behind a snapshot built from the state machine; make sure what the
        // state machine applied is on disk before the entries that could replay it are gone
        // (the key space's database is otherwise flushed on sled's own schedule).
        self.state
            .flush_async()
            .await
            .map_err(|e| write_err(ErrorSubject::StateMachine, &e))?;
        self.write_meta(LAST_PURGED, &Some(log_id))?;
        let mut batch = sled::Batch::default();
        for item in self.logs.range(..=index_key(log_id.index)) {
            let (key, _) = item.map_err(|e| read_err(ErrorSubject::Logs, &e))?;
            batch.remove(key);
        }
        self.logs
            .apply_batch(batch)
            .map_err(|e| write_err(ErrorSubject::Logs, &e))?;
        Ok(())
    }
}
