//! The Raft state machine: committed entries applied to the key space, snapshots as files.
//!
//! Each entry's writes, together with the id of the entry, go to sled in one atomic batch, so
//! after a crash the key space and "applied up to" always agree; openraft re-applies the rest
//! from the log. Applying is deterministic: every member computes the same revisions.
//!
//! A snapshot is built from the key space as it was at one applied entry: the revision and
//! metadata are captured while applying is paused (openraft asks for a builder between
//! applies), and the history lock keeps compaction from deleting records until the builder has
//! read them. Installing a received snapshot replaces the key space; an install interrupted by
//! a crash is redone at start-up from the snapshot file, which is kept before anything is
//! cleared.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};

use crate::backend::SledBackend;
use crate::codec;
use crate::errors::BackendError;
use crate::kv::KvState;
use crate::mvcc::{Backend, Batch, Command, CommandResponse, Mvcc};
use crate::snapshot::{SnapshotHeader, SnapshotItem, SnapshotReader, SnapshotWriter};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::watch::EventBatch;

const APPLIED: &[u8] = b"raft/applied";
const MEMBERSHIP: &[u8] = b"raft/membership";
/// Set (in its own tree) while a snapshot install replaces the key space.
const INSTALLING: &[u8] = b"installing";
const CURRENT: &str = "current.snap";

/// Where snapshot files live: the current one, and temporary files being built or received.
#[derive(Clone, Debug)]
pub struct SnapshotDir(PathBuf);

impl SnapshotDir {
    /// Opens the member's snapshot directory at start-up, deleting what builds and
    /// transfers interrupted by a crash left behind. Only the member's own start may do
    /// this: later, a `.tmp` file is a build or a transfer in progress (readers use
    /// [`SnapshotDir::current_in`]).
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        // Leftovers of builds or transfers interrupted by a crash.
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                let _ = std::fs::remove_file(path);
            }
        }
        Ok(Self(dir))
    }

    pub fn current(&self) -> PathBuf {
        self.0.join(CURRENT)
    }

    /// The current snapshot's path in `dir`, for readers (touches nothing).
    pub fn current_in(dir: &Path) -> PathBuf {
        dir.join(CURRENT)
    }

    fn temp(&self, what: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.0.join(format!("{what}-{nanos}.tmp"))
    }

    /// Atomically makes `path` the current snapshot.
    fn promote(&self, path: &Path) -> io::Result<()> {
        std::fs::rename(path, self.current())?;
        std::fs::File::open(&self.0)?.sync_all()
    }
}

/// The state machine handed to openraft.
pub struct StateMachine {
    kv: Arc<KvState>,
    db: sled::Db,
    cluster_id: u64,
    dir: SnapshotDir,
    applied: Option<LogId>,
    membership: StoredMembership,
    receiving: Option<PathBuf>,
}

fn sm_err(verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageIOError::new(
        ErrorSubject::StateMachine,
        verb,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

fn snap_err(verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageIOError::new(
        ErrorSubject::Snapshot(None),
        verb,
        openraft::AnyError::error(e.to_string()),
    )
    .into()
}

fn read_meta<T: serde::de::DeserializeOwned>(
    backend: &SledBackend,
    key: &[u8],
) -> Result<Option<T>, BackendError> {
    backend
        .get_meta(key)?
        .map(|v| codec::decode(&v).map_err(BackendError::Corrupt))
        .transpose()
}

/// Finishes a snapshot install that a crash interrupted, before anything reads the key space.
pub fn recover_install(
    db: &sled::Db,
    backend: &SledBackend,
    dir: &SnapshotDir,
) -> Result<(), BackendError> {
    let flags = db.open_tree("raft/install")?;
    if flags.get(INSTALLING)?.is_some() {
        tracing::warn!("a snapshot install was interrupted; loading the snapshot again");
        load_snapshot_file(db, backend, &dir.current())?;
    }
    Ok(())
}

/// Replaces the key space with a snapshot file's content.
fn load_snapshot_file(
    db: &sled::Db,
    backend: &SledBackend,
    path: &Path,
) -> Result<SnapshotHeader, BackendError> {
    let flags = db.open_tree("raft/install")?;
    flags.insert(INSTALLING, &[1u8])?;
    db.flush()?;
    backend.clear()?;
    let (header, mut batch) = load_key_space(backend, path)?;
    batch.put_meta(
        APPLIED,
        codec::encode(&header.meta.last_log_id).map_err(BackendError::Corrupt)?,
    );
    batch.put_meta(
        MEMBERSHIP,
        codec::encode(&header.meta.last_membership).map_err(BackendError::Corrupt)?,
    );
    backend.write(batch)?;
    db.flush()?;
    flags.remove(INSTALLING)?;
    db.flush()?;
    Ok(header)
}

/// Writes a snapshot file's records and metadata into `backend`, all but the last batch,
/// which it returns for the caller to complete.
fn load_key_space(
    backend: &SledBackend,
    path: &Path,
) -> Result<(SnapshotHeader, Batch), BackendError> {
    let io = |e: io::Error| BackendError::Io(format!("snapshot {}: {e}", path.display()));
    let mut reader = SnapshotReader::open(path).map_err(io)?;
    let header = reader.header().clone();
    let mut batch = Batch::default();
    while let Some(item) = reader.next_item().map_err(io)? {
        match item {
            SnapshotItem::Record(rev, bytes) => {
                batch
                    .records
                    .push((rev, crate::mvcc::Record::decode(&bytes)?));
            }
            SnapshotItem::Meta(k, v) => batch.put_meta(k, v),
        }
        if batch.records.len() + batch.meta.len() >= 1000 {
            backend.write(std::mem::take(&mut batch))?;
        }
    }
    Ok((header, batch))
}

/// Restores a saved snapshot's key space into an empty database: its records and metadata
/// (leases, revision counters), not the Raft state of the cluster it came from, so the
/// members restored from it found a new cluster holding exactly that state.
pub fn restore_key_space(
    db: &sled::Db,
    backend: &SledBackend,
    path: &Path,
) -> Result<SnapshotHeader, BackendError> {
    let (header, batch) = load_key_space(backend, path)?;
    backend.write(batch)?;
    db.flush()?;
    Ok(header)
}

impl StateMachine {
    pub fn open(
        db: sled::Db,
        kv: Arc<KvState>,
        dir: SnapshotDir,
        cluster_id: u64,
    ) -> Result<Self, BackendError> {
        let applied = read_meta::<Option<LogId>>(kv.backend(), APPLIED)?.flatten();
        let membership =
            read_meta::<StoredMembership>(kv.backend(), MEMBERSHIP)?.unwrap_or_default();
        Ok(Self {
            kv,
            db,
            cluster_id,
            dir,
            applied,
            membership,
            receiving: None,
        })
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<CommandResponse>, StorageError> {
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let mut compactions = Vec::new();
        let (from, to) = {
            let mut mvcc = self.kv.write();
            let from = mvcc.revision() + 1;
            // One atomic write for all the entries of this call, the applied log id with them;
            // each command reads what the ones before it wrote through the overlay. (Every sled
            // batch costs sled two io-buffer writes of its own, so one per call, not per entry.)
            // Readers cannot see the new revisions before the write: the index stays
            // write-locked until it is done.
            let mut overlay = crate::mvcc::Overlay {
                inner: self.kv.backend(),
                pending: Batch::default(),
            };
            let mut last = None;
            for entry in entries {
                let log_id = entry.log_id;
                let response = match entry.payload {
                    EntryPayload::Blank => CommandResponse::Empty,
                    EntryPayload::Normal(Command::Batch(cmds)) => {
                        let mut replies = Vec::with_capacity(cmds.len());
                        for cmd in &cmds {
                            let cmd = match unfence(cmd, log_id.leader_id.term) {
                                Ok(cmd) => cmd,
                                Err(e) => {
                                    replies.push(CommandResponse::Rejected(e));
                                    continue;
                                }
                            };
                            let applied = mvcc
                                .apply(&overlay, cmd)
                                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
                            events.extend(applied.events);
                            compactions.extend(applied.compaction);
                            replies.push(applied.response);
                            overlay.pending.extend(applied.batch);
                        }
                        CommandResponse::Batch(replies)
                    }
                    EntryPayload::Normal(cmd) => match unfence(&cmd, log_id.leader_id.term) {
                        Err(e) => CommandResponse::Rejected(e),
                        Ok(cmd) => {
                            let applied = mvcc
                                .apply(&overlay, cmd)
                                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
                            events.extend(applied.events);
                            compactions.extend(applied.compaction);
                            overlay.pending.extend(applied.batch);
                            applied.response
                        }
                    },
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(log_id), m);
                        overlay.pending.put_meta(
                            MEMBERSHIP,
                            codec::encode(&self.membership)
                                .map_err(|e| sm_err(ErrorVerb::Write, e))?,
                        );
                        CommandResponse::Empty
                    }
                };
                last = Some(log_id);
                responses.push(response);
            }
            if let Some(log_id) = last {
                let mut batch = overlay.pending;
                batch.put_meta(
                    APPLIED,
                    codec::encode(&Some(log_id)).map_err(|e| sm_err(ErrorVerb::Write, e))?,
                );
                self.kv
                    .backend()
                    .write(batch)
                    .map_err(|e| sm_err(ErrorVerb::Write, e))?;
                self.applied = Some(log_id);
            }
            (from, mvcc.revision())
        };
        if to >= from {
            self.kv.hub().publish(EventBatch { from, to, events });
        }
        for job in compactions {
            self.kv.schedule_compaction(job);
        }
        Ok(responses)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.apply_entries(entries.into_iter().collect())
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        // Applying is paused while openraft asks for a builder: capture the state now.
        let history = self.kv.history_lock().read_owned().await;
        let (revision, compact_revision, meta_entries) = {
            let m = self.kv.read();
            let meta = self.kv.backend().all_meta().unwrap_or_default();
            (m.revision(), m.compact_revision(), meta)
        };
        let snapshot_id = format!(
            "{}-{}-{}",
            self.applied.map_or(0, |l| l.leader_id.term),
            self.applied.map_or(0, |l| l.index),
            revision
        );
        SnapshotBuilder {
            backend: self.kv.backend().clone(),
            dir: self.dir.clone(),
            header: SnapshotHeader {
                meta: SnapshotMeta {
                    last_log_id: self.applied,
                    last_membership: self.membership.clone(),
                    snapshot_id,
                },
                cluster_id: self.cluster_id,
                revision,
                compact_revision,
            },
            meta_entries,
            history: Some(history),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let path = self.dir.temp("receive");
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        if let Some(old) = self.receiving.replace(path) {
            let _ = tokio::fs::remove_file(old).await;
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        let file = *snapshot;
        file.sync_all()
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        drop(file);
        let path = self
            .receiving
            .take()
            .ok_or_else(|| snap_err(ErrorVerb::Read, "no snapshot is being received"))?;
        let header = SnapshotReader::open(&path)
            .and_then(|r| r.verify())
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        if header.cluster_id != self.cluster_id {
            let _ = std::fs::remove_file(&path);
            return Err(snap_err(
                ErrorVerb::Read,
                format!(
                    "snapshot belongs to cluster {:x}, not {:x}",
                    header.cluster_id, self.cluster_id
                ),
            ));
        }
        self.dir
            .promote(&path)
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;

        let kv = self.kv.clone();
        let db = self.db.clone();
        let current = self.dir.current();
        let history = kv.history_lock();
        let leftover = tokio::task::spawn_blocking(move || {
            let _exclusive = history.blocking_write();
            let mut mvcc = kv.write();
            load_snapshot_file(&db, kv.backend(), &current)?;
            let (restored, leftover) = Mvcc::restore(kv.backend())?;
            *mvcc = restored;
            Ok::<_, BackendError>(leftover)
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))?
        .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.kv.replaced(leftover);
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        tracing::info!(snapshot = %meta.snapshot_id, revision = header.revision, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        open_current(&self.dir).await
    }
}

async fn open_current(dir: &SnapshotDir) -> Result<Option<Snapshot>, StorageError> {
    let path = dir.current();
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(None);
    }
    let header = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || SnapshotReader::open(&path).map(|r| r.header().clone()))
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
            .map_err(|e| snap_err(ErrorVerb::Read, e))?
    };
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| snap_err(ErrorVerb::Read, e))?;
    Ok(Some(Snapshot {
        meta: header.meta,
        snapshot: Box::new(file),
    }))
}

/// Builds one snapshot from the state captured by [`StateMachine::get_snapshot_builder`].
pub struct SnapshotBuilder {
    backend: SledBackend,
    dir: SnapshotDir,
    header: SnapshotHeader,
    meta_entries: Vec<crate::mvcc::MetaEntry>,
    history: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let backend = self.backend.clone();
        let dir = self.dir.clone();
        let header = self.header.clone();
        let meta_entries = std::mem::take(&mut self.meta_entries);
        let history = self.history.take();
        let started = std::time::Instant::now();
        let size = tokio::task::spawn_blocking(move || {
            let _shared = history;
            let tmp = dir.temp("build");
            let revision = header.revision;
            let mut w = SnapshotWriter::create(&tmp, header)?;
            let mut from = crate::mvcc::Revision::default();
            loop {
                let records = backend
                    .scan(from, revision, 1000)
                    .map_err(io::Error::other)?;
                let Some((last, _)) = records.last() else {
                    break;
                };
                from = crate::mvcc::Revision::new(last.main, last.sub + 1);
                for (rev, record) in records {
                    w.record(rev, record.encode())?;
                }
            }
            for (key, value) in meta_entries {
                if key.starts_with(b"raft/") {
                    continue; // carried by the snapshot's Raft meta instead
                }
                w.meta(key, value)?;
            }
            let size = w.finish()?;
            dir.promote(&tmp)?;
            // The log is purged behind this snapshot next, and the purge first makes sure the
            // key space is on disk: flush it here, off Raft's path, so that the purge's flush
            // finds little left to write.
            backend.flush().map_err(io::Error::other)?;
            Ok::<_, io::Error>(size)
        })
        .await
        .map_err(|e| snap_err(ErrorVerb::Write, e))?
        .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        tracing::info!(
            snapshot = %self.header.meta.snapshot_id,
            bytes = size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built snapshot"
        );
        let snapshot = open_current(&self.dir).await?;
        snapshot.ok_or_else(|| snap_err(ErrorVerb::Read, "the snapshot just built is missing"))
    }
}

/// The command a log entry of leadership `term` applies: a fenced command's own, if it was
/// made for that term.
fn unfence(cmd: &Command, term: u64) -> Result<&Command, crate::errors::MvccError> {
    match cmd {
        Command::Fenced {
            term: required,
            cmd,
        } if *required == term => Ok(cmd),
        Command::Fenced { term: required, .. } => Err(crate::errors::MvccError::Fenced {
            required: *required,
            actual: term,
        }),
        other => Ok(other),
    }
}
