//! The key space's [`Backend`] in sled: one tree, records under `r` + revision, metadata under
//! `m` + name. Kept apart from the MVCC rules so that no other module sees sled.

use crate::errors::BackendError;
use crate::mvcc::{Backend, Batch, MetaEntry, Record, Revision};

const RECORD: u8 = b'r';
const META: u8 = b'm';

/// The key space's records and metadata in one sled tree.
#[derive(Clone)]
pub struct SledBackend {
    tree: sled::Tree,
}

fn record_key(rev: Revision) -> [u8; 1 + Revision::LEN] {
    let mut key = [0u8; 1 + Revision::LEN];
    key[0] = RECORD;
    key[1..].copy_from_slice(&rev.to_bytes());
    key
}

fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(META);
    key.extend_from_slice(name);
    key
}

fn decode_record_entry(key: &[u8], value: &[u8]) -> Result<(Revision, Record), BackendError> {
    let rev = Revision::from_bytes(&key[1..])
        .ok_or_else(|| BackendError::Corrupt(format!("record key of {} bytes", key.len())))?;
    Ok((rev, Record::decode(value)?))
}

impl SledBackend {
    pub fn open(db: &sled::Db) -> Result<Self, BackendError> {
        Ok(Self {
            tree: db.open_tree("kv")?,
        })
    }

    /// Writes everything written so far to disk (the key space's whole database).
    pub fn flush(&self) -> Result<(), BackendError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Deletes everything (before a snapshot is loaded in its place).
    pub fn clear(&self) -> Result<(), BackendError> {
        self.tree.clear()?;
        Ok(())
    }

    /// Every metadata entry, for snapshots.
    pub fn all_meta(&self) -> Result<Vec<MetaEntry>, BackendError> {
        self.scan_meta(b"")
    }
}

impl Backend for SledBackend {
    fn get(&self, rev: Revision) -> Result<Option<Record>, BackendError> {
        self.tree
            .get(record_key(rev))?
            .map(|v| Record::decode(&v))
            .transpose()
    }

    fn scan(
        &self,
        from: Revision,
        to_main: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, BackendError> {
        let start = record_key(from);
        let iter = match to_main.checked_add(1) {
            Some(end) => self.tree.range(start..record_key(Revision::new(end, 0))),
            None => self.tree.range(start.to_vec()..vec![RECORD + 1]),
        };
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item?;
            out.push(decode_record_entry(&k, &v)?);
        }
        Ok(out)
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(Revision, Record) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        for item in self.tree.range(vec![RECORD]..vec![RECORD + 1]) {
            let (k, v) = item?;
            let (rev, record) = decode_record_entry(&k, &v)?;
            visit(rev, record)?;
        }
        Ok(())
    }

    /// Deletes and records one by one, then the metadata: a single insert or remove when
    /// there is one entry (the usual case: the revision and position), a sled batch when there
    /// are more. Not one sled batch for everything: sled writes out its io buffer, with a
    /// `sync_file_range`, before and after every batch, which made each apply two synchronous
    /// disk writes although the key space is flushed lazily (the Raft log is what must be
    /// durable). sled recovers a prefix of its writes, which is all [`Backend::write`] promises.
    fn write(&self, batch: Batch) -> Result<(), BackendError> {
        for rev in batch.deletes {
            self.tree.remove(record_key(rev))?;
        }
        for (rev, record) in batch.records {
            self.tree.insert(record_key(rev), record.encode())?;
        }
        let mut meta = batch.meta;
        match meta.len() {
            0 => {}
            1 => {
                let (key, value) = meta.remove(0);
                match value {
                    Some(v) => self.tree.insert(meta_key(&key), v).map(|_| ())?,
                    None => self.tree.remove(meta_key(&key)).map(|_| ())?,
                }
            }
            _ => {
                let mut b = sled::Batch::default();
                for (key, value) in meta {
                    match value {
                        Some(v) => b.insert(meta_key(&key), v),
                        None => b.remove(meta_key(&key)),
                    }
                }
                self.tree.apply_batch(b)?;
            }
        }
        Ok(())
    }

    fn get_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BackendError> {
        Ok(self.tree.get(meta_key(key))?.map(|v| v.to_vec()))
    }

    fn scan_meta(&self, prefix: &[u8]) -> Result<Vec<MetaEntry>, BackendError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(meta_key(prefix)) {
            let (k, v) = item?;
            out.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}
