//! Where the key space keeps its records: a revision-ordered log of versions plus a few named
//! metadata values, behind a small trait so the MVCC rules never see sled.

use std::collections::BTreeMap;
use std::sync::Mutex;

use flotilla_proto::mvccpb::KeyValue;
use prost::Message;

use super::Revision;
use crate::errors::BackendError;

/// One stored version: a put's full record, or a delete's tombstone (key and revision only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    pub kv: KeyValue,
    pub tombstone: bool,
}

impl Record {
    const PUT: u8 = 0;
    const TOMBSTONE: u8 = 1;

    /// A flag byte, then the protobuf-encoded `KeyValue`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.kv.encoded_len());
        out.push(if self.tombstone {
            Self::TOMBSTONE
        } else {
            Self::PUT
        });
        // Encoding into a Vec cannot fail: it grows as needed.
        let _ = self.kv.encode(&mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, BackendError> {
        let (flag, body) = bytes
            .split_first()
            .ok_or_else(|| BackendError::Corrupt("empty record".into()))?;
        let tombstone = match *flag {
            Self::PUT => false,
            Self::TOMBSTONE => true,
            other => return Err(BackendError::Corrupt(format!("record flag {other}"))),
        };
        let kv = KeyValue::decode(body)
            .map_err(|e| BackendError::Corrupt(format!("record body: {e}")))?;
        Ok(Self { kv, tombstone })
    }
}

/// Writes that become visible together (readers reach records only through the index, which
/// the writer updates under its lock), and reach disk in the order [`Backend::write`] gives.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<(Revision, Record)>,
    pub deletes: Vec<Revision>,
    /// Metadata puts (`Some`) and deletes (`None`), at most one per key.
    pub meta: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.deletes.is_empty() && self.meta.is_empty()
    }

    pub fn put_meta(&mut self, key: impl Into<Vec<u8>>, value: Vec<u8>) {
        self.set_meta(key.into(), Some(value));
    }

    pub fn delete_meta(&mut self, key: impl Into<Vec<u8>>) {
        self.set_meta(key.into(), None);
    }

    fn set_meta(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.meta.retain(|(k, _)| *k != key);
        self.meta.push((key, value));
    }

    /// Records that this batch leaves the key space at `revision`, reached by applying up to
    /// `position` (opaque here: the state machine's applied log id). Both go in one metadata
    /// entry, so that they reach disk in one atomic step (see [`super::meta::REVISION`]).
    pub fn mark_position(&mut self, revision: i64, position: &[u8]) {
        let mut value = revision.to_be_bytes().to_vec();
        value.extend_from_slice(position);
        self.put_meta(super::meta::REVISION, value);
    }

    /// Appends `later`'s writes; where both touch the same key, `later` wins.
    pub fn extend(&mut self, later: Batch) {
        self.records.extend(later.records);
        self.deletes.extend(later.deletes);
        for (key, value) in later.meta {
            self.set_meta(key, value);
        }
    }
}

/// A backend seen through writes not yet written to it: what a batch of commands applied
/// earlier in the same atomic write reads.
pub struct Overlay<'a> {
    pub inner: &'a dyn Backend,
    pub pending: Batch,
}

impl Backend for Overlay<'_> {
    fn get(&self, rev: Revision) -> Result<Option<Record>, BackendError> {
        if let Some((_, r)) = self.pending.records.iter().rev().find(|(r, _)| *r == rev) {
            return Ok(Some(r.clone()));
        }
        if self.pending.deletes.contains(&rev) {
            return Ok(None);
        }
        self.inner.get(rev)
    }

    fn scan(
        &self,
        from: Revision,
        to_main: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, BackendError> {
        // Applying never scans; readers use the real backend.
        self.inner.scan(from, to_main, limit)
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(Revision, Record) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        self.inner.for_each(visit)
    }

    fn write(&self, batch: Batch) -> Result<(), BackendError> {
        self.inner.write(batch)
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        if let Some((_, v)) = self.pending.meta.iter().rev().find(|(k, _)| k == key) {
            return Ok(v.clone());
        }
        self.inner.get_meta(key)
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, BackendError> {
        self.inner.scan_meta(prefix)
    }
}

/// One meta entry: its key (without the backend's prefix) and value.
pub type MetaEntry = (Vec<u8>, Vec<u8>);

/// Storage for records addressed by revision, and for metadata.
///
/// `write` stores a batch's deletes and records one by one, then its metadata in one atomic
/// step; after a crash the backend holds a prefix of everything written, so a batch may be
/// there in part, but never its metadata without its records. The key space relies on that:
/// records above the revision its metadata last recorded belong to a write cut short, and
/// [`super::Mvcc::restore`] removes them (the Raft log applies that write again). Readers on
/// other threads may run concurrently with writers.
pub trait Backend: Send + Sync {
    fn get(&self, rev: Revision) -> Result<Option<Record>, BackendError>;

    /// Records with revision `>= from` and main revision `<= to_main`, in order, at most `limit`.
    fn scan(
        &self,
        from: Revision,
        to_main: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, BackendError>;

    /// Visits every record in revision order; stops at the first error `visit` returns.
    fn for_each(
        &self,
        visit: &mut dyn FnMut(Revision, Record) -> Result<(), BackendError>,
    ) -> Result<(), BackendError>;

    fn write(&self, batch: Batch) -> Result<(), BackendError>;

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError>;

    /// Metadata entries whose key starts with `prefix`, in key order.
    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, BackendError>;
}

/// A backend in memory: for unit tests, and for anything that needs MVCC rules without disk.
#[derive(Debug, Default)]
pub struct MemBackend {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    records: BTreeMap<Revision, Record>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemBackend {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A panic while holding the lock cannot leave the maps half-written (every mutation is
        // a single insert or remove), so a poisoned lock is still safe to use.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Number of stored records, including superseded versions not yet compacted away.
    pub fn record_count(&self) -> usize {
        self.lock().records.len()
    }
}

impl Backend for MemBackend {
    fn get(&self, rev: Revision) -> Result<Option<Record>, BackendError> {
        Ok(self.lock().records.get(&rev).cloned())
    }

    fn scan(
        &self,
        from: Revision,
        to_main: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, BackendError> {
        Ok(self
            .lock()
            .records
            .range(from..)
            .take_while(|(rev, _)| rev.main <= to_main)
            .take(limit)
            .map(|(rev, rec)| (*rev, rec.clone()))
            .collect())
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(Revision, Record) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        let records: Vec<_> = self
            .lock()
            .records
            .iter()
            .map(|(r, v)| (*r, v.clone()))
            .collect();
        for (rev, rec) in records {
            visit(rev, rec)?;
        }
        Ok(())
    }

    fn write(&self, batch: Batch) -> Result<(), BackendError> {
        let mut inner = self.lock();
        for rev in batch.deletes {
            inner.records.remove(&rev);
        }
        for (rev, rec) in batch.records {
            inner.records.insert(rev, rec);
        }
        for (key, value) in batch.meta {
            match value {
                Some(value) => inner.meta.insert(key, value),
                None => inner.meta.remove(&key),
            };
        }
        Ok(())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.lock().meta.get(key).cloned())
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, BackendError> {
        Ok(self
            .lock()
            .meta
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let rec = Record {
            kv: KeyValue {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                mod_revision: 3,
                ..Default::default()
            },
            tombstone: false,
        };
        assert_eq!(Record::decode(&rec.encode()).unwrap(), rec);
        let tomb = Record {
            tombstone: true,
            ..rec
        };
        assert_eq!(Record::decode(&tomb.encode()).unwrap(), tomb);
        assert!(Record::decode(&[]).is_err());
        assert!(Record::decode(&[7, 1, 2]).is_err());
        assert!(Record::decode(&[0, 0xff, 0xff, 0xff]).is_err());
    }
}
