//! The MVCC key space: etcd's data model as plain functions over a [`Backend`].
//!
//! Layout:
//! - [`revision`]: the (main, sub) revision that orders every write;
//! - [`key_index`]: per key, which revisions wrote it (etcd's `keyIndex`);
//! - [`backend`]: the [`Backend`] trait over revision-addressed records, and an in-memory one;
//! - `read`: Range at the newest or a past revision;
//! - `write`: Put, DeleteRange, Txn, Compact and leases, producing watch events;
//! - `validate`: the checks a request passes before it is proposed.
//!
//! [`Mvcc`] holds the in-memory index and counters; the records live in the backend. Nothing
//! here does I/O except through the backend, and nothing here knows about Raft: the state
//! machine feeds it committed [`Command`]s in log order, so every member computes the same
//! revisions, responses and events.

pub mod alarm;
pub mod backend;
pub mod key_index;
mod read;
pub mod revision;
mod validate;
mod write;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;

use flotilla_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantResponse,
    LeaseRevokeResponse, PutRequest, PutResponse, TxnRequest, TxnResponse,
};
use flotilla_proto::mvccpb::{Event, KeyValue};
use serde::{Deserialize, Serialize};

pub use backend::{Backend, Batch, MemBackend, MetaEntry, Overlay, Record};
pub use key_index::{KeyIndex, Live};
pub use read::{RangePlan, RangeResult};
pub use revision::Revision;
pub use validate::{MAX_TXN_OPS, validate_command, validate_range};

use crate::codec::prost_message;
use crate::errors::{BackendError, MvccError};

/// Metadata keys the key space owns in its backend.
pub(crate) mod meta {
    /// The current revision (i64, big-endian), followed by the position of the write that
    /// made it current, as its writer encodes it (the state machine: its applied log id; see
    /// [`super::Batch::mark_position`]). One key, so that the two reach disk in one atomic
    /// step after the write's records.
    pub const REVISION: &[u8] = b"mvcc/revision";
    /// The compact revision (i64, big-endian).
    pub const COMPACT: &[u8] = b"mvcc/compact";
    /// Prefix of one entry per lease: `mvcc/lease/<id be>` -> granted TTL (i64, big-endian).
    pub const LEASE_PREFIX: &[u8] = b"mvcc/lease/";

    pub fn lease_key(id: i64) -> Vec<u8> {
        let mut key = LEASE_PREFIX.to_vec();
        key.extend_from_slice(&id.to_be_bytes());
        key
    }
}

/// A write to the key space, as replicated through the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Put(#[serde(with = "prost_message")] PutRequest),
    DeleteRange(#[serde(with = "prost_message")] DeleteRangeRequest),
    Txn(#[serde(with = "prost_message")] TxnRequest),
    /// Forget history before `revision`.
    Compact {
        revision: i64,
    },
    /// Create a lease; the id is chosen before proposing, so every member agrees on it.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    /// Delete a lease and every key attached to it (also how expiry is carried out).
    LeaseRevoke {
        id: i64,
    },
    /// Several commands proposed together as one log entry, applied one after another, each
    /// with its own revision(s), exactly as if they had been separate entries.
    Batch(Vec<Command>),
    /// `cmd`, applied only if the log entry carrying it was appended by the leader of `term`
    /// (otherwise rejected with [`MvccError::Fenced`], changing nothing). Work that runs on
    /// the leader (scheduler, controllers) fences its writes with the term it was started
    /// in, so that a deposed leader's late writes cannot land under its successor.
    Fenced {
        term: u64,
        cmd: Box<Command>,
    },
    /// Raise (`activate`) or disarm an alarm ([`alarm`]); changes no revision.
    Alarm {
        activate: bool,
        alarm: alarm::Alarm,
    },
}

impl Command {
    /// Roughly how many bytes the command takes in the log.
    pub fn approx_size(&self) -> usize {
        match self {
            Command::Put(p) => p.key.len() + p.value.len() + 32,
            Command::Txn(t) => prost::Message::encoded_len(t) + 32,
            Command::DeleteRange(d) => d.key.len() + d.range_end.len() + 32,
            Command::Batch(cmds) => cmds.iter().map(Command::approx_size).sum::<usize>() + 16,
            Command::Fenced { cmd, .. } => cmd.approx_size() + 8,
            _ => 32,
        }
    }
}

/// The outcome of applying one [`Command`] (or a Raft entry that carries none).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandResponse {
    Put(#[serde(with = "prost_message")] PutResponse),
    DeleteRange(#[serde(with = "prost_message")] DeleteRangeResponse),
    Txn(#[serde(with = "prost_message")] TxnResponse),
    Compact(#[serde(with = "prost_message")] CompactionResponse),
    LeaseGrant(#[serde(with = "prost_message")] LeaseGrantResponse),
    LeaseRevoke(#[serde(with = "prost_message")] LeaseRevokeResponse),
    /// The command broke a rule of the key space and changed nothing.
    Rejected(MvccError),
    /// One response per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResponse>),
    /// A Raft entry without a command (a leader's blank entry, a membership change).
    Empty,
    /// The alarms a [`Command::Alarm`] raised or disarmed (none if nothing changed).
    Alarms(Vec<alarm::Alarm>),
}

/// What applying a command produced: the response, the watch events in revision order, and
/// the batch the caller must write to the backend (atomically, with its own bookkeeping).
#[derive(Debug)]
pub struct Applied {
    pub response: CommandResponse,
    pub events: Vec<Event>,
    pub batch: Batch,
    /// A compaction whose superseded records can now be deleted from the backend.
    pub compaction: Option<Compaction>,
}

/// The records a compaction at `revision` made obsolete, for the caller to delete from the
/// backend (in any order; they are below `revision`, so no read may need them).
#[derive(Clone, Debug, Default)]
pub struct Compaction {
    pub revision: i64,
    pub removed: Vec<Revision>,
}

/// A lease as the key space knows it: its granted TTL and the keys attached to it.
///
/// When it expires is not part of the replicated state: only the leader tracks deadlines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseInfo {
    pub ttl: i64,
    pub keys: BTreeSet<Vec<u8>>,
}

/// A key range in etcd's convention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key (an empty `range_end`).
    Single(Vec<u8>),
    /// `[start, end)`; `end == None` means every key `>= start` (a `range_end` of `"\0"`).
    Span {
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

/// A key range as `BTreeMap::range` takes it.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

impl KeyRange {
    /// Interprets etcd's `(key, range_end)` pair.
    pub fn new(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Self::Single(key.to_vec()),
            [0] => Self::Span {
                start: key.to_vec(),
                end: None,
            },
            end => Self::Span {
                start: key.to_vec(),
                end: Some(end.to_vec()),
            },
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            Self::Single(k) => k.as_slice() == key,
            Self::Span { start, end } => {
                key >= start.as_slice() && end.as_deref().is_none_or(|e| key < e)
            }
        }
    }

    /// Bounds for a `BTreeMap` range; `None` when the range is empty (which a map range would
    /// reject with a panic when start > end).
    fn bounds(&self) -> Option<KeyBounds<'_>> {
        match self {
            Self::Single(k) => Some((Bound::Included(k), Bound::Included(k))),
            Self::Span { start, end: None } => Some((Bound::Included(start), Bound::Unbounded)),
            Self::Span {
                start,
                end: Some(end),
            } if start < end => Some((Bound::Included(start), Bound::Excluded(end))),
            Self::Span { .. } => None,
        }
    }
}

/// The key space's state that lives in memory: the index of every key's revisions, the
/// revision counters and the leases. Records are read from the backend on demand.
#[derive(Debug, Default)]
pub struct Mvcc {
    index: BTreeMap<Vec<u8>, KeyIndex>,
    /// Keys written since a compaction last visited them (see [`Mvcc::compact_index`]).
    dirty: HashSet<Vec<u8>>,
    /// The dirty keys by the main revision of their oldest write that no compaction has
    /// visited yet: a compaction at `at` visits the keys due before `at` and no others, since
    /// every other key is already down to what a read at `at` needs.
    due: BTreeMap<i64, Vec<Vec<u8>>>,
    current: i64,
    compacted: i64,
    leases: BTreeMap<i64, LeaseInfo>,
    /// The active alarms ([`alarm`]).
    alarms: BTreeSet<alarm::Alarm>,
    /// Which put events carry the previous value; a put whose event leaves it out reads no
    /// record unless its request needs the previous one. See [`Mvcc::keep_prev`].
    keep_prev: PrevValues,
}

/// Which put events carry the key's previous value.
#[derive(Clone, Debug, Default)]
pub enum PrevValues {
    /// Every one.
    #[default]
    All,
    /// Those of keys in these ranges (the ranges of the watchers that want previous values);
    /// none when empty.
    Within(Arc<Vec<KeyRange>>),
}

impl Mvcc {
    /// Says which put events carry the previous value from now on. A watcher that wants
    /// previous values and sees an event without one reads it from history (see
    /// [`crate::watch`]): the writer need not know about watchers that start meanwhile.
    pub fn keep_prev(&mut self, keep: PrevValues) {
        self.keep_prev = keep;
    }

    /// Whether a put of `key` carries the previous value in its event.
    fn wants_prev(&self, key: &[u8]) -> bool {
        match &self.keep_prev {
            PrevValues::All => true,
            PrevValues::Within(ranges) => ranges.iter().any(|r| r.contains(key)),
        }
    }

    /// The revision of the last write transaction applied.
    pub fn revision(&self) -> i64 {
        self.current
    }

    /// History strictly before this revision has been forgotten.
    pub fn compact_revision(&self) -> i64 {
        self.compacted
    }

    pub fn lease(&self, id: i64) -> Option<&LeaseInfo> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = (i64, &LeaseInfo)> {
        self.leases.iter().map(|(id, info)| (*id, info))
    }

    /// Number of keys that exist now.
    pub fn live_keys(&self) -> usize {
        self.index
            .values()
            .filter(|ki| ki.latest().is_some())
            .count()
    }

    /// Rebuilds the in-memory state from a backend (at start-up, after a snapshot install).
    ///
    /// Records are replayed in revision order; records that an interrupted compaction left
    /// behind are found again and returned as a [`Compaction`] for the caller to delete.
    pub fn restore(backend: &dyn Backend) -> Result<(Self, Compaction), BackendError> {
        let (current, _) = read_revision(backend)?;
        // A write cut short by a crash may have left records above the revision its metadata
        // would have recorded (the backend writes records first): the Raft log applies that
        // write again, so they go.
        let partial: Vec<Revision> = backend
            .scan(
                Revision::new(current.saturating_add(1), 0),
                i64::MAX,
                usize::MAX,
            )?
            .into_iter()
            .map(|(rev, _)| rev)
            .collect();
        if !partial.is_empty() {
            backend.write(Batch {
                deletes: partial,
                ..Default::default()
            })?;
        }
        let mut mvcc = Mvcc {
            current,
            compacted: read_i64(backend, meta::COMPACT)?.unwrap_or(0),
            ..Default::default()
        };
        for (key, value) in backend.scan_meta(meta::LEASE_PREFIX)? {
            let id = decode_i64(&key[meta::LEASE_PREFIX.len()..])?;
            mvcc.leases.insert(
                id,
                LeaseInfo {
                    ttl: decode_i64(&value)?,
                    keys: BTreeSet::new(),
                },
            );
        }
        for (key, _) in backend.scan_meta(alarm::PREFIX)? {
            if let Some(a) = alarm::from_meta_key(&key) {
                mvcc.alarms.insert(a);
            }
        }
        let mut lease_of: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut last_main = 0;
        backend.for_each(&mut |rev, record| {
            last_main = rev.main;
            let ki = mvcc.index.entry(record.kv.key.clone()).or_default();
            if record.tombstone {
                ki.tombstone(rev);
                lease_of.remove(&record.kv.key);
            } else {
                ki.put(rev, live_of(&record.kv));
                lease_of.insert(record.kv.key, record.kv.lease);
            }
            Ok(())
        })?;
        mvcc.current = mvcc.current.max(last_main);
        // Replayed keys are visited by the next compaction (the one below, if any).
        mvcc.dirty = mvcc.index.keys().cloned().collect();
        mvcc.due = BTreeMap::from([(i64::MIN, mvcc.index.keys().cloned().collect())]);
        for (key, lease) in lease_of {
            if let Some(info) = mvcc.leases.get_mut(&lease) {
                info.keys.insert(key);
            }
        }
        let compaction = mvcc.compact_index(mvcc.compacted);
        Ok((mvcc, compaction))
    }

    /// Applies one committed command. Rule violations come back as
    /// [`CommandResponse::Rejected`] with an empty batch; only storage failures are errors.
    pub fn apply(&mut self, backend: &dyn Backend, cmd: &Command) -> Result<Applied, BackendError> {
        write::apply(self, backend, cmd)
    }

    /// The revision of each key's value visible at main revision `at` (for hashing).
    pub fn visible_at(&self, at: i64) -> HashSet<Revision> {
        self.index.values().filter_map(|ki| ki.get(at)).collect()
    }

    /// The active alarms.
    pub fn alarms(&self) -> Vec<alarm::Alarm> {
        self.alarms.iter().copied().collect()
    }

    /// Resolves a range to the revisions to read, under whatever lock guards `self`. The
    /// records are fetched afterwards with [`RangePlan::execute`], without the lock.
    pub fn plan_range(
        &self,
        req: &flotilla_proto::etcdserverpb::RangeRequest,
    ) -> Result<RangePlan, MvccError> {
        read::plan(self, req)
    }

    /// The revision of the value `key` held at `at` (the newest if `at <= 0`).
    pub fn revision_of(&self, key: &[u8], at: i64) -> Option<Revision> {
        let ki = self.index.get(key)?;
        if at <= 0 { ki.latest() } else { ki.get(at) }
    }

    /// Records a write of `key` at `rev` in the index: a put of a value described by `live`,
    /// or a tombstone (`None`).
    fn index_write(&mut self, key: &[u8], rev: Revision, live: Option<Live>) {
        if !self.dirty.contains(key) {
            self.dirty.insert(key.to_vec());
            self.due.entry(rev.main).or_default().push(key.to_vec());
        }
        let record = |ki: &mut KeyIndex| match live {
            None => ki.tombstone(rev),
            Some(live) => ki.put(rev, live),
        };
        match self.index.get_mut(key) {
            Some(ki) => record(ki),
            None => record(self.index.entry(key.to_vec()).or_default()),
        }
    }

    /// Forgets history before `at` in the index. Visits only the keys with a write in
    /// `[previous compact revision, at)`, so its cost follows the writes compacted, not the
    /// size of the index.
    fn compact_index(&mut self, at: i64) -> Compaction {
        let mut removed = Vec::new();
        while let Some(entry) = self.due.first_entry()
            && *entry.key() < at
        {
            for key in entry.remove() {
                let next = match self.index.get_mut(&key) {
                    Some(ki) => {
                        ki.compact(at, &mut removed);
                        if ki.is_empty() {
                            self.index.remove(&key);
                            None
                        } else {
                            ki.first_write_since(at)
                        }
                    }
                    None => None,
                };
                match next {
                    // Still dirty: due again at its oldest write this compaction kept.
                    Some(next) => self.due.entry(next).or_default().push(key),
                    None => {
                        self.dirty.remove(&key);
                    }
                }
            }
        }
        Compaction {
            revision: at,
            removed,
        }
    }

    /// The current value's create revision, version and lease, if `key` exists.
    fn live(&self, key: &[u8]) -> Option<Live> {
        self.index.get(key).and_then(KeyIndex::live)
    }

    /// Live keys in `range` with the revision of their current value.
    fn live_in(&self, range: &KeyRange) -> Vec<(Vec<u8>, Revision)> {
        let Some(bounds) = range.bounds() else {
            return Vec::new();
        };
        self.index
            .range::<[u8], _>(bounds)
            .filter_map(|(k, ki)| ki.latest().map(|rev| (k.clone(), rev)))
            .collect()
    }
}

/// What the index keeps of a stored value.
pub(crate) fn live_of(kv: &KeyValue) -> Live {
    Live {
        create_revision: kv.create_revision,
        version: kv.version,
        lease: kv.lease,
    }
}

/// The stored revision, and the position its writer recorded with it (empty if none).
pub fn read_revision(backend: &dyn Backend) -> Result<(i64, Vec<u8>), BackendError> {
    match backend.get_meta(meta::REVISION)? {
        None => Ok((0, Vec::new())),
        Some(v) if v.len() >= 8 => Ok((decode_i64(&v[..8])?, v[8..].to_vec())),
        Some(v) => Err(BackendError::Corrupt(format!(
            "the stored revision has {} bytes",
            v.len()
        ))),
    }
}

pub(crate) fn read_i64(backend: &dyn Backend, key: &[u8]) -> Result<Option<i64>, BackendError> {
    backend.get_meta(key)?.map(|v| decode_i64(&v)).transpose()
}

pub(crate) fn decode_i64(bytes: &[u8]) -> Result<i64, BackendError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| BackendError::Corrupt(format!("expected 8 bytes, found {}", bytes.len())))?;
    Ok(i64::from_be_bytes(arr))
}

#[cfg(test)]
mod tests;
