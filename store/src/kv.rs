//! The key space as one member holds it: the MVCC index behind a lock, the records in sled, the
//! watch hub, and the background task that deletes what compaction made obsolete.
//!
//! The Raft state machine is the only writer. Readers (ranges, watchers catching up, snapshot
//! builders) take the lock only to resolve revisions and read records outside it; see
//! [`crate::mvcc`] for why that is safe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use flotilla_proto::etcdserverpb::RangeRequest;
use flotilla_proto::mvccpb::{Event, event::EventType};
use tokio::sync::mpsc;

use crate::backend::SledBackend;
use crate::errors::{BackendError, MvccError, StoreError};
use crate::mvcc::{Backend, Batch, Compaction, LeaseInfo, Mvcc, RangeResult, Revision};
use crate::watch::{History, WatchConfig, WatchHub, WatchOutput, WatchSpec, WatcherHandle};

/// Records deleted per step of a physical compaction; the history lock is released between
/// steps so snapshots and watchers are never held up for long.
const COMPACTION_STEP: usize = 1000;

/// One member's key space.
pub struct KvState {
    mvcc: RwLock<Mvcc>,
    backend: SledBackend,
    hub: WatchHub,
    compactor: mpsc::UnboundedSender<(u64, Compaction)>,
    /// Held shared while a snapshot is built, exclusively while records are deleted or
    /// replaced, so a snapshot never misses a record it needs.
    history: Arc<tokio::sync::RwLock<()>>,
    /// Bumped when a snapshot replaces the state; older compaction jobs are then skipped.
    epoch: AtomicU64,
}

impl KvState {
    /// Loads the key space from `backend` and starts its compactor.
    pub fn open(backend: SledBackend, watch: WatchConfig) -> Result<Arc<Self>, BackendError> {
        let (mvcc, leftover) = Mvcc::restore(&backend)?;
        let (compactor, jobs) = mpsc::unbounded_channel();
        let kv = Arc::new(Self {
            mvcc: RwLock::new(mvcc),
            backend,
            hub: WatchHub::new(watch),
            compactor,
            history: Arc::new(tokio::sync::RwLock::new(())),
            epoch: AtomicU64::new(0),
        });
        tokio::spawn(compaction_loop(Arc::downgrade(&kv), jobs));
        kv.schedule_compaction(leftover);
        Ok(kv)
    }

    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Mvcc> {
        // The index is only mutated by whole operations under the lock; a panic elsewhere
        // while reading cannot leave it half-changed, so poisoning is ignored.
        self.mvcc.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Mvcc> {
        self.mvcc.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn backend(&self) -> &SledBackend {
        &self.backend
    }

    pub fn hub(&self) -> &WatchHub {
        &self.hub
    }

    pub(crate) fn history_lock(&self) -> Arc<tokio::sync::RwLock<()>> {
        self.history.clone()
    }

    pub fn revision(&self) -> i64 {
        self.read().revision()
    }

    pub fn compact_revision(&self) -> i64 {
        self.read().compact_revision()
    }

    /// Serves a range from this member's copy.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResult, StoreError> {
        let plan = self.read().plan_range(req)?;
        self.execute(plan, usize::MAX)
    }

    /// Resolves a range to the records to read (under the index's lock, briefly).
    pub fn plan(&self, req: &RangeRequest) -> Result<crate::mvcc::RangePlan, StoreError> {
        Ok(self.read().plan_range(req)?)
    }

    /// Reads what `plan` resolved, cutting the answer after `max_bytes` (see
    /// [`crate::mvcc::RangePlan::execute`]).
    pub fn execute(
        &self,
        plan: crate::mvcc::RangePlan,
        max_bytes: usize,
    ) -> Result<RangeResult, StoreError> {
        match plan.execute(&|rev| self.backend.get(rev), max_bytes)? {
            Some(result) => Ok(result),
            None => Err(MvccError::Compacted {
                compact_revision: self.compact_revision(),
            }
            .into()),
        }
    }

    /// A copy of one lease.
    pub fn lease(&self, id: i64) -> Option<LeaseInfo> {
        self.read().lease(id).cloned()
    }

    /// Every lease id with its granted TTL.
    pub fn lease_ttls(&self) -> Vec<(i64, i64)> {
        self.read()
            .leases()
            .map(|(id, info)| (id, info.ttl))
            .collect()
    }

    /// Starts a watcher on this member.
    pub fn watch(
        self: &Arc<Self>,
        spec: WatchSpec,
        out: mpsc::Sender<WatchOutput>,
        control: mpsc::UnboundedSender<WatchOutput>,
    ) -> WatcherHandle {
        self.hub.watch(spec, self.clone(), out, control)
    }

    /// A CRC-32 of every record up to `revision` (0: the newest), for comparing members:
    /// `(crc, compact revision, revision hashed)`.
    pub fn hash(&self, revision: i64) -> Result<(u32, i64, i64), StoreError> {
        self.hash_from(0, revision)
    }

    /// A CRC-32 of the key space from revision `from` (or the compact revision, if later)
    /// up to `revision` (0: the newest): `(crc, first revision hashed, revision hashed)`.
    ///
    /// It covers each key's value as of the first revision (the record a read at it would
    /// return, as etcd's hash covers what compaction keeps) and every record after it. Two
    /// members that hashed the same span hold the same records in it if their key spaces
    /// agree, whatever each has compacted below it. A compaction past the first revision while
    /// hashing makes it fail with `Compacted` (what it removes was being hashed).
    pub fn hash_from(&self, from: i64, revision: i64) -> Result<(u32, i64, i64), StoreError> {
        let (current, compacted, visible) = {
            let m = self.read();
            let compacted = m.compact_revision();
            let first = from.max(compacted);
            (m.revision(), compacted, m.visible_at(first))
        };
        let at = if revision <= 0 { current } else { revision };
        if at > current {
            return Err(MvccError::FutureRevision { current }.into());
        }
        if at < compacted {
            return Err(MvccError::Compacted {
                compact_revision: compacted,
            }
            .into());
        }
        let first = from.max(compacted);
        let mut crc = crc32fast::Hasher::new();
        let mut from = Revision::new(0, 0);
        loop {
            let records = self.backend.scan(from, at, COMPACTION_STEP)?;
            let Some((last, _)) = records.last() else {
                break;
            };
            from = Revision::new(last.main, last.sub + 1);
            for (rev, record) in &records {
                if rev.main > first || visible.contains(rev) {
                    crc.update(&rev.to_bytes());
                    crc.update(&record.encode());
                }
            }
        }
        let now = self.read().compact_revision();
        if now > first {
            return Err(MvccError::Compacted {
                compact_revision: now,
            }
            .into());
        }
        Ok((crc.finalize(), first, at))
    }

    pub(crate) fn schedule_compaction(&self, job: Compaction) {
        let epoch = self.epoch.load(Ordering::Acquire);
        let _ = self.compactor.send((epoch, job));
    }

    /// Marks the state as replaced: pending compaction jobs are obsolete, watchers re-read.
    pub(crate) fn replaced(&self, leftover: Compaction) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.schedule_compaction(leftover);
        self.hub.reset();
    }

    /// The record a key held just before `rev`, if it still exists.
    fn prev_record(
        &self,
        prev_rev: Option<Revision>,
    ) -> Result<Option<flotilla_proto::mvccpb::KeyValue>, StoreError> {
        let Some(rev) = prev_rev else { return Ok(None) };
        Ok(self
            .backend
            .get(rev)?
            .filter(|r| !r.tombstone)
            .map(|r| r.kv))
    }
}

impl History for KvState {
    fn revision(&self) -> i64 {
        KvState::revision(self)
    }

    fn value_before(
        &self,
        key: &[u8],
        revision: i64,
    ) -> Result<Option<flotilla_proto::mvccpb::KeyValue>, StoreError> {
        let prev_rev = {
            let m = self.read();
            if revision - 1 < m.compact_revision() {
                return Ok(None);
            }
            m.revision_of(key, revision - 1)
        };
        self.prev_record(prev_rev)
    }

    fn compact_revision(&self) -> i64 {
        KvState::compact_revision(self)
    }

    fn events_since(&self, from: i64, limit: usize) -> Result<(Vec<Event>, i64), StoreError> {
        let (current, compacted) = {
            let m = self.read();
            (m.revision(), m.compact_revision())
        };
        if from < compacted {
            return Err(MvccError::Compacted {
                compact_revision: compacted,
            }
            .into());
        }
        let from = from.max(1);
        if from > current {
            return Ok((Vec::new(), current));
        }
        let mut records = self
            .backend
            .scan(Revision::new(from, 0), current, limit.max(1))?;
        let upto = match records.last() {
            Some((last, _)) if records.len() >= limit.max(1) => {
                // Finish the last revision: its events are delivered together.
                let (main, sub) = (last.main, last.sub);
                records.extend(self.backend.scan(
                    Revision::new(main, sub + 1),
                    main,
                    usize::MAX,
                )?);
                main
            }
            _ => current,
        };
        // Previous values: resolve revisions under the lock, read records after.
        let prev_revs: Vec<Option<Revision>> = {
            let m = self.read();
            records
                .iter()
                .map(|(rev, r)| m.revision_of(&r.kv.key, rev.main - 1))
                .collect()
        };
        let mut events = Vec::with_capacity(records.len());
        for ((rev, record), prev_rev) in records.into_iter().zip(prev_revs) {
            let prev_kv = self.prev_record(prev_rev)?;
            let (kind, kv) = if record.tombstone {
                let mut kv = record.kv;
                kv.mod_revision = rev.main;
                (EventType::Delete, kv)
            } else {
                (EventType::Put, record.kv)
            };
            events.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv,
            });
        }
        // A compaction that began meanwhile may have deleted some of what was read.
        let compacted = self.compact_revision();
        if from < compacted {
            return Err(MvccError::Compacted {
                compact_revision: compacted,
            }
            .into());
        }
        Ok((events, upto))
    }
}

/// Deletes records that compactions made obsolete, a step at a time.
async fn compaction_loop(
    kv: std::sync::Weak<KvState>,
    mut jobs: mpsc::UnboundedReceiver<(u64, Compaction)>,
) {
    while let Some((epoch, job)) = jobs.recv().await {
        let Some(state) = kv.upgrade() else { return };
        let revision = job.revision;
        if let Err(e) = compact_physically(&state, epoch, job).await {
            tracing::error!(error = %e, revision, "deleting compacted records failed");
        }
    }
}

async fn compact_physically(kv: &KvState, epoch: u64, job: Compaction) -> Result<(), BackendError> {
    let mut removed = job.removed;
    removed.sort_unstable();
    for step in removed.chunks(COMPACTION_STEP) {
        let exclusive = kv.history.clone().write_owned().await;
        if kv.epoch.load(Ordering::Acquire) != epoch {
            return Ok(()); // the state was replaced by a snapshot meanwhile
        }
        // Off the runtime's threads: a step rewrites chunks, which would hold up requests.
        let backend = kv.backend.clone();
        let deletes = step.to_vec();
        tokio::task::spawn_blocking(move || {
            let _exclusive = exclusive;
            backend.write(Batch {
                deletes,
                ..Default::default()
            })
        })
        .await
        .map_err(|e| BackendError::Io(format!("compaction step: {e}")))??;
    }
    tracing::debug!(
        revision = job.revision,
        deleted = removed.len(),
        "compacted history"
    );
    Ok(())
}
