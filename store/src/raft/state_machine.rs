//! The Raft state machine: committed entries applied to the key space; the key space itself is
//! the snapshot.
//!
//! The writes of an apply call go to sled record by record, then one entry holding the new
//! revision and the id of the last entry applied. sled recovers a prefix of its writes, and
//! opening the key space deletes records above the stored revision, so after a crash the key
//! space and "applied up to" always agree; openraft re-applies the rest from the log.
//! Applying is deterministic: every member computes the same revisions.
//!
//! A snapshot is a position, not a file: when openraft asks for one (to purge the log behind
//! it), the key space is flushed to disk, and since it never goes back, it holds everything up
//! to that position from then on. A snapshot *file* is written only when something must be sent
//! elsewhere: a member too far behind for the log ([`RaftStateMachine::get_current_snapshot`]),
//! or a backup ([`Capture`]). It is written from the live key space as it was at one applied
//! batch: the revision and metadata are captured under the index's lock, records newer than
//! that revision are skipped, and the history lock keeps compaction from deleting a record
//! before the writer has read it, so applying goes on meanwhile (the file for a lagging member
//! is written in the background, and its transfer waits for it). The file built for followers
//! is kept only while it still covers the newest snapshot position. Installing a received
//! snapshot replaces the key space; an install interrupted by a crash is redone at start-up
//! from the snapshot file, which is kept until the install is complete.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StorageIOError};

use crate::backend::SledBackend;
use crate::codec;
use crate::errors::BackendError;
use crate::kv::KvState;
use crate::mvcc::{Backend, Batch, Command, CommandResponse, Mvcc, PrevValues};
use crate::snapshot::{SnapshotHeader, SnapshotItem, SnapshotReader, SnapshotWriter};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::watch::EventBatch;

/// Where the applied log id was kept before it moved into the key space's revision entry (see
/// [`read_applied`]); read from older data dirs only.
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

    /// Deletes the current snapshot file, if there is one. A transfer reading it keeps its
    /// open handle.
    fn remove_current(&self) {
        match std::fs::remove_file(self.current()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "removing the old snapshot file failed"),
        }
    }
}

/// How writing a snapshot file ended: its size, or why it failed.
type WriteOutcome = Option<Result<u64, String>>;

/// The snapshot files a member wrote or received, for its metrics, and the ones being
/// written for lagging members, which a transfer waits for before it sends (see
/// [`SnapshotFiles::written`]).
#[derive(Debug, Default)]
pub struct SnapshotFiles {
    last_bytes: AtomicU64,
    writing: std::sync::Mutex<
        std::collections::HashMap<String, tokio::sync::watch::Receiver<WriteOutcome>>,
    >,
}

impl SnapshotFiles {
    /// Size of the newest snapshot file this member wrote (for a lagging member or a backup)
    /// or received; 0 before the first.
    pub fn last_bytes(&self) -> u64 {
        self.last_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn wrote(&self, bytes: u64) {
        self.last_bytes.store(bytes, Ordering::Relaxed);
    }

    fn writing(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, tokio::sync::watch::Receiver<WriteOutcome>>,
    > {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the file of snapshot `id` as being written; the sender reports its end.
    fn start(&self, id: &str) -> tokio::sync::watch::Sender<WriteOutcome> {
        let (tx, rx) = tokio::sync::watch::channel(None);
        self.writing().insert(id.to_string(), rx);
        tx
    }

    /// Reports how writing the file of snapshot `id` ended. A failure stays registered, so
    /// that a transfer holding the partial file does not send it.
    fn finish(&self, id: &str, tx: &tokio::sync::watch::Sender<WriteOutcome>, r: io::Result<u64>) {
        let ok = r.as_ref().ok().copied();
        tx.send_replace(Some(r.map_err(|e| e.to_string())));
        if let Some(size) = ok {
            self.wrote(size);
            let mut writing = self.writing();
            if writing
                .get(id)
                .is_some_and(|rx| rx.same_channel(&tx.subscribe()))
            {
                writing.remove(id);
            }
        }
    }

    /// Whether writing the file of snapshot `id` failed.
    fn failed(&self, id: &str) -> bool {
        self.writing()
            .get(id)
            .is_some_and(|rx| matches!(*rx.borrow(), Some(Err(_))))
    }

    /// Waits until the file of snapshot `id` is completely written, if it is being written;
    /// returns its size then (`None` when nothing was being written), or why writing failed.
    pub async fn written(&self, id: &str) -> Result<Option<u64>, String> {
        let rx = self.writing().get(id).cloned();
        let Some(mut rx) = rx else {
            return Ok(None);
        };
        let outcome = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "the snapshot writer stopped".to_string())?
            .clone();
        match outcome {
            Some(Ok(size)) => Ok(Some(size)),
            Some(Err(e)) => Err(e),
            None => Err("the snapshot writer stopped".into()),
        }
    }
}

/// The key space as it was after one applied batch, held for writing a snapshot file of it.
/// Holding it keeps compaction from deleting records (see [`KvState::history_lock`]); applying
/// goes on, and what it adds is newer than the captured revision, so the file leaves it out.
pub struct Capture {
    backend: SledBackend,
    header: SnapshotHeader,
    meta_entries: Vec<crate::mvcc::MetaEntry>,
    _history: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl Capture {
    /// Captures `kv` as it stands. The index's read lock is held while the revision and the
    /// metadata (the applied log id and membership among them, written in the same batch as
    /// the records) are read, so all of it is from one applied batch.
    pub async fn take(kv: &KvState, cluster_id: u64) -> Result<Self, BackendError> {
        let history = kv.history_lock().read_owned().await;
        let m = kv.read();
        let meta_entries = kv.backend().all_meta()?;
        let find = |key: &[u8]| meta_entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let last_log_id = read_applied(kv.backend())?;
        let last_membership = find(MEMBERSHIP)
            .map(|v| codec::decode::<StoredMembership>(v))
            .transpose()
            .map_err(BackendError::Corrupt)?
            .unwrap_or_default();
        let header = SnapshotHeader {
            meta: SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id: snapshot_id(last_log_id, m.revision()),
            },
            cluster_id,
            revision: m.revision(),
            compact_revision: m.compact_revision(),
        };
        drop(m);
        Ok(Self {
            backend: kv.backend().clone(),
            header,
            meta_entries,
            _history: history,
        })
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    /// Writes the captured key space to a new temporary file in `dir` (named after `what`);
    /// returns the file's path and size. Blocks: call it off the async runtime.
    pub fn write(self, dir: &SnapshotDir, what: &str) -> io::Result<(PathBuf, u64)> {
        let tmp = dir.temp(what);
        let written = self.write_to(&tmp);
        match written {
            Ok(size) => Ok((tmp, size)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_to(self, path: &Path) -> io::Result<u64> {
        self.write_into(std::fs::File::create(path)?)
    }

    /// Writes the captured key space into `file` (empty); returns the file's size. Blocks.
    fn write_into(self, file: std::fs::File) -> io::Result<u64> {
        let revision = self.header.revision;
        let mut w = SnapshotWriter::new(file, self.header)?;
        let mut from = crate::mvcc::Revision::default();
        loop {
            let records = self
                .backend
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
        for (key, value) in self.meta_entries {
            if key.starts_with(b"raft/") || key == crate::mvcc::meta::REVISION {
                continue; // carried by the snapshot's Raft meta and header instead
            }
            w.meta(key, value)?;
        }
        // The revision alone: the position recorded with it is this member's Raft state.
        w.meta(
            crate::mvcc::meta::REVISION.to_vec(),
            revision.to_be_bytes().to_vec(),
        )?;
        w.finish()
    }
}

fn snapshot_id(applied: Option<LogId>, revision: i64) -> String {
    format!(
        "{}-{}-{}",
        applied.map_or(0, |l| l.leader_id.term),
        applied.map_or(0, |l| l.index),
        revision
    )
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
    /// The newest snapshot position (the log may be purged up to it): the last one openraft
    /// asked a builder for, or the last snapshot installed.
    point: Option<LogId>,
    /// What the current snapshot file holds, while there is one: the newest file written for
    /// a lagging member, kept only while it covers `point`.
    served: Option<SnapshotMeta>,
    /// Whether openraft has asked for the current snapshot yet; its first ask is at start-up.
    asked: bool,
    files: Arc<SnapshotFiles>,
}

/// The key the test faults `panic-on-apply` and `fail-on-apply` ([`crate::fault`]) act on.
#[cfg(debug_assertions)]
pub const FAULT_KEY: &[u8] = b"flotilla-test/fatal";

/// In test builds with a fault switched on, applying a put of [`FAULT_KEY`] panics, or fails
/// as a storage error would, to show that the member then stops.
#[cfg(debug_assertions)]
fn injected_fault(cmd: &Command) -> Result<(), StorageError> {
    let hits = |c: &Command| matches!(c, Command::Put(p) if p.key == FAULT_KEY);
    let hit = match cmd {
        Command::Batch(cmds) => cmds.iter().any(hits),
        c => hits(c),
    };
    if hit && crate::fault::enabled("panic-on-apply") {
        panic!("test fault panic-on-apply: a put of the fault key");
    }
    if hit && crate::fault::enabled("fail-on-apply") {
        return Err(sm_err(
            ErrorVerb::Write,
            "test fault fail-on-apply: a put of the fault key",
        ));
    }
    Ok(())
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

/// The last log id applied to the key space: recorded with its revision (one entry, written
/// after the records; see [`crate::mvcc::Batch::mark_position`]), or, in a data dir of an
/// older version, under a key of its own.
fn read_applied(backend: &SledBackend) -> Result<Option<LogId>, BackendError> {
    let (_, position) = crate::mvcc::read_revision(backend)?;
    if position.is_empty() {
        return Ok(read_meta::<Option<LogId>>(backend, APPLIED)?.flatten());
    }
    codec::decode::<Option<LogId>>(&position).map_err(BackendError::Corrupt)
}

/// Records in `batch` that it leaves the key space at `revision`, having applied up to
/// `applied`.
fn mark_applied(
    batch: &mut Batch,
    revision: i64,
    applied: Option<LogId>,
) -> Result<(), BackendError> {
    let position = codec::encode(&applied).map_err(BackendError::Corrupt)?;
    batch.mark_position(revision, &position);
    Ok(())
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
    mark_applied(&mut batch, header.revision, header.meta.last_log_id)?;
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
    /// Opens the state machine over `kv`, once [`recover_install`] has run. A snapshot file
    /// left in `dir` is deleted: the key space holds everything it held.
    pub fn open(
        db: sled::Db,
        kv: Arc<KvState>,
        dir: SnapshotDir,
        cluster_id: u64,
        files: Arc<SnapshotFiles>,
    ) -> Result<Self, BackendError> {
        let applied = read_applied(kv.backend())?;
        let membership =
            read_meta::<StoredMembership>(kv.backend(), MEMBERSHIP)?.unwrap_or_default();
        dir.remove_current();
        Ok(Self {
            kv,
            db,
            cluster_id,
            dir,
            applied,
            membership,
            receiving: None,
            point: None,
            served: None,
            asked: false,
            files,
        })
    }

    /// The last log id applied to the key space.
    pub fn applied(&self) -> Option<LogId> {
        self.applied
    }

    /// Forgets the current snapshot file once it no longer covers the newest snapshot
    /// position: a member sent it would still need entries the log no longer has.
    fn drop_stale_file(&mut self) {
        if self
            .served
            .as_ref()
            .is_some_and(|m| m.last_log_id < self.point)
        {
            self.served = None;
            self.dir.remove_current();
        }
    }

    /// The current snapshot file, unless the one written last still covers the newest snapshot
    /// position: the key space is captured now, and the file is written from the capture in
    /// the background while applying goes on. The handle returned may be read before the file
    /// is complete; the transfer waits for it ([`SnapshotFiles::written`]).
    async fn snapshot_file(&mut self) -> Result<Snapshot, StorageError> {
        self.drop_stale_file();
        if self
            .served
            .as_ref()
            .is_some_and(|m| self.files.failed(&m.snapshot_id))
        {
            self.served = None;
        }
        if let Some(meta) = self.served.clone() {
            match tokio::fs::File::open(self.dir.current()).await {
                Ok(file) => {
                    return Ok(Snapshot {
                        meta,
                        snapshot: Box::new(file),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the snapshot file is gone; writing it again");
                    self.served = None;
                }
            }
        }
        let started = std::time::Instant::now();
        let capture = Capture::take(&self.kv, self.cluster_id)
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let meta = capture.header().meta.clone();
        // A new file (a new inode): a transfer still reading the old one keeps it.
        self.dir.remove_current();
        let path = self.dir.current();
        let out = std::fs::File::create(&path).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| snap_err(ErrorVerb::Read, e))?;
        let id = meta.snapshot_id.clone();
        let done = self.files.start(&id);
        let files = self.files.clone();
        tokio::task::spawn_blocking(move || {
            let r = capture.write_into(out);
            match &r {
                Ok(bytes) => tracing::info!(
                    snapshot = %id,
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "wrote a snapshot file for a lagging member"
                ),
                // The partial file stays until the next write replaces it.
                Err(e) => {
                    tracing::warn!(snapshot = %id, error = %e, "writing a snapshot file failed")
                }
            }
            files.finish(&id, &done, r);
        });
        self.served = Some(meta.clone());
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<Vec<CommandResponse>, StorageError> {
        let mut responses = Vec::with_capacity(entries.len());
        let mut events = Vec::new();
        let mut compactions = Vec::new();
        let (from, to) = {
            let mut mvcc = self.kv.write();
            mvcc.keep_prev(PrevValues::Within(self.kv.hub().prev_ranges()));
            let from = mvcc.revision() + 1;
            // One write for all the entries of this call, the applied log id last (see the
            // module's doc); each command reads what the ones before it wrote through the
            // overlay. Readers cannot see the new revisions before the write: the index stays
            // write-locked until it is done.
            let mut overlay = crate::mvcc::Overlay {
                inner: self.kv.backend(),
                pending: Batch::default(),
            };
            let mut last = None;
            for entry in entries {
                let log_id = entry.log_id;
                #[cfg(debug_assertions)]
                if let EntryPayload::Normal(cmd) = &entry.payload {
                    injected_fault(cmd)?;
                }
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
                mark_applied(&mut batch, mvcc.revision(), Some(log_id))
                    .map_err(|e| sm_err(ErrorVerb::Write, e))?;
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
        // Applying is paused while openraft asks for a builder: this is the snapshot's position.
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.applied, self.kv.revision()),
        };
        self.point = self.applied;
        self.drop_stale_file();
        SnapshotBuilder {
            backend: self.kv.backend().clone(),
            dir: self.dir.clone(),
            meta,
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
        if let Ok(m) = std::fs::metadata(&path) {
            self.files.wrote(m.len());
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
        self.point = meta.last_log_id;
        // The key space now holds it all, on disk (the install flushed it).
        self.served = None;
        self.dir.remove_current();
        tracing::info!(snapshot = %meta.snapshot_id, revision = header.revision, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        if !std::mem::replace(&mut self.asked, true) {
            // The first ask is openraft's start-up, which wants only the position of the
            // newest snapshot. Without one it asks for a builder whenever the log was purged,
            // which makes the position the applied one, at no more cost than a flush.
            return Ok(None);
        }
        // Any later ask is to send it to a member the log cannot catch up.
        self.snapshot_file().await.map(Some)
    }
}

/// Makes a snapshot position durable: see [`StateMachine::get_snapshot_builder`].
pub struct SnapshotBuilder {
    backend: SledBackend,
    dir: SnapshotDir,
    meta: SnapshotMeta,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // The key space is the snapshot: once it is on disk up to this position, the log behind
        // the position can go. (The log store also flushes it before any purge, for
        // correctness; flushing here, off Raft's path, leaves that flush little to write.)
        let started = std::time::Instant::now();
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || backend.flush())
            .await
            .map_err(|e| snap_err(ErrorVerb::Write, e))?
            .map_err(|e| snap_err(ErrorVerb::Write, e))?;
        // openraft keeps only the meta of what a builder returns; the data is an empty file
        // with no name.
        let empty =
            tempfile::tempfile_in(&self.dir.0).map_err(|e| snap_err(ErrorVerb::Write, e))?;
        tracing::info!(
            snapshot = %self.meta.snapshot_id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot position made durable"
        );
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(tokio::fs::File::from_std(empty)),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transfer_waits_for_the_file_and_never_sends_a_failed_one() {
        let files = Arc::new(SnapshotFiles::default());
        assert_eq!(
            files.written("1-10-5").await,
            Ok(None),
            "nothing is being written"
        );

        let done = files.start("1-10-5");
        let waiter = tokio::spawn({
            let files = files.clone();
            async move { files.written("1-10-5").await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiter.is_finished(),
            "the transfer waits while the file is written"
        );
        files.finish("1-10-5", &done, Ok(4096));
        assert_eq!(waiter.await.unwrap(), Ok(Some(4096)));
        assert_eq!(files.last_bytes(), 4096);
        assert_eq!(
            files.written("1-10-5").await,
            Ok(None),
            "a finished file is forgotten"
        );

        let done = files.start("1-20-9");
        files.finish("1-20-9", &done, Err(io::Error::other("disk full")));
        assert!(files.failed("1-20-9"));
        let e = files.written("1-20-9").await.unwrap_err();
        assert!(e.contains("disk full"), "{e}");
        assert_eq!(files.last_bytes(), 4096, "a failed file is not counted");

        // A new write of the same snapshot replaces the failed one.
        let again = files.start("1-20-9");
        assert!(!files.failed("1-20-9"));
        files.finish("1-20-9", &again, Ok(100));
        assert_eq!(files.written("1-20-9").await, Ok(None));
    }
}
