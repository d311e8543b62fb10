//! The key space's [`Backend`] in sled: one tree holding records in chunks, the revisions that
//! compaction made obsolete, and metadata. Kept apart from the MVCC rules so that no other
//! module sees sled.
//!
//! Layout of the `kv` tree:
//! - `c` + first revision -> a chunk: the records of one write, in revision order, behind a table of their revisions and offsets. A
//!   chunk covers the revisions from its key up to the next chunk's key.
//! - `g` + list id (u64 big-endian) -> a list of revisions that compaction removed but that are
//!   still stored in some chunk (16 bytes each).
//! - `m` + name -> metadata.
//! - `r` + revision -> one record, as versions before chunks stored them; converted to chunks
//!   when the tree is opened.
//!
//! Why chunks: sled's cost is per key, and a put used to cost two key writes on every member,
//! the record's insert and, once compacted, its remove. Now a write of many records is one
//! insert, and compaction first only lists what it removed (one insert per step of a thousand
//! revisions); a chunk is rewritten without its dead records, or removed, only once a third of
//! it is dead. Stored records are thus at most about 1.5 times the live ones.
//!
//! Crash safety rests on sled recovering a prefix of its writes: a list is written before any
//! chunk loses the records it names, so a record still stored is either live or listed, and
//! listed records are skipped by every read, at start-up too (a compacted tombstone that
//! vanished while an older version of its key stayed would bring the key back).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::errors::BackendError;
use crate::mvcc::{Backend, Batch, MetaEntry, Record, Revision};

const CHUNK: u8 = b'c';
const GRAVES: u8 = b'g';
const META: u8 = b'm';
const LEGACY_RECORD: u8 = b'r';

/// Records one chunk holds at most; a larger write is split.
const CHUNK_MAX_RECORDS: usize = 256;
/// Bytes of encoded records one chunk holds at most (one record may exceed it alone). sled
/// splits a leaf at 17 entries and writes a page over 128 KiB as a blob file of its own; with
/// 64 KiB chunks, the data dir of a million puts over 10,000 keys grew to 13 times its live
/// data, most of it blobs waiting to be deleted.
const CHUNK_MAX_BYTES: usize = 6 * 1024;
/// Table entry of a chunk: main and sub revision, end offset of the record.
const ENTRY_LEN: usize = Revision::LEN + 4;

/// The key space's records and metadata in one sled tree.
#[derive(Clone)]
pub struct SledBackend {
    tree: sled::Tree,
    state: Arc<RwLock<State>>,
    /// Serializes writers (the state machine and the compactor), who read and update `state`
    /// around their sled writes.
    writer: Arc<Mutex<()>>,
}

/// What the backend knows about its chunks and lists, rebuilt from the tree when it opens.
#[derive(Debug, Default)]
struct State {
    /// Every chunk by its first revision.
    chunks: BTreeMap<Revision, ChunkInfo>,
    /// Revisions compaction removed that are still stored, with the list naming them.
    dead: HashMap<Revision, u64>,
    lists: BTreeMap<u64, List>,
    next_list: u64,
}

#[derive(Debug, Default)]
struct ChunkInfo {
    /// Records stored in the chunk.
    len: usize,
    /// Bytes of those records.
    bytes: usize,
    /// The newest of them.
    last: Revision,
    /// Its records that compaction removed.
    dead: Vec<Revision>,
}

#[derive(Debug, Default)]
struct List {
    /// Revisions the stored list holds.
    written: usize,
    /// Those of them still stored in a chunk.
    pending: HashSet<Revision>,
}

fn chunk_key(first: Revision) -> [u8; 1 + Revision::LEN] {
    let mut key = [0u8; 1 + Revision::LEN];
    key[0] = CHUNK;
    key[1..].copy_from_slice(&first.to_bytes());
    key
}

fn list_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = GRAVES;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

fn meta_key(name: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(META);
    key.extend_from_slice(name);
    key
}

fn revision_after_prefix(key: &[u8]) -> Result<Revision, BackendError> {
    key.get(1..)
        .and_then(Revision::from_bytes)
        .ok_or_else(|| BackendError::Corrupt(format!("record key of {} bytes", key.len())))
}

/// Encodes records (in revision order) as one chunk: their count, a table of revisions and end
/// offsets, then the records back to back.
fn encode_chunk<'a>(
    records: impl ExactSizeIterator<Item = (Revision, &'a [u8])> + Clone,
) -> Vec<u8> {
    let n = records.len();
    let body: usize = records.clone().map(|(_, r)| r.len()).sum();
    let mut out = Vec::with_capacity(4 + n * ENTRY_LEN + body);
    out.extend_from_slice(&(n as u32).to_be_bytes());
    let mut end = 0u32;
    for (rev, record) in records.clone() {
        end += record.len() as u32;
        out.extend_from_slice(&rev.to_bytes());
        out.extend_from_slice(&end.to_be_bytes());
    }
    for (_, record) in records {
        out.extend_from_slice(record);
    }
    out
}

/// A stored chunk, parsed lazily: the table is read in place, records decoded on demand.
struct ChunkView<'a> {
    table: &'a [u8],
    body: &'a [u8],
}

impl<'a> ChunkView<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, BackendError> {
        let corrupt = |what: &str| BackendError::Corrupt(format!("record chunk: {what}"));
        let n = bytes
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| corrupt("shorter than its header"))?;
        let table_end = n
            .checked_mul(ENTRY_LEN)
            .and_then(|t| t.checked_add(4))
            .filter(|&t| t <= bytes.len())
            .ok_or_else(|| corrupt("table longer than the chunk"))?;
        let view = Self {
            table: &bytes[4..table_end],
            body: &bytes[table_end..],
        };
        if n > 0 && view.end(n - 1) != view.body.len() {
            return Err(corrupt("records do not fill the chunk"));
        }
        Ok(view)
    }

    fn len(&self) -> usize {
        self.table.len() / ENTRY_LEN
    }

    fn rev(&self, i: usize) -> Revision {
        let e = &self.table[i * ENTRY_LEN..];
        // Sixteen bytes are there: `parse` checked the table's length.
        Revision::from_bytes(&e[..Revision::LEN]).unwrap_or_default()
    }

    fn end(&self, i: usize) -> usize {
        let e = &self.table[i * ENTRY_LEN + Revision::LEN..];
        u32::from_be_bytes([e[0], e[1], e[2], e[3]]) as usize
    }

    /// The encoded record at position `i`.
    fn bytes(&self, i: usize) -> Result<&'a [u8], BackendError> {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        self.body
            .get(start..self.end(i))
            .ok_or_else(|| BackendError::Corrupt("record chunk: offsets out of order".into()))
    }

    /// Position of the first record at or after `rev`.
    fn position(&self, rev: Revision) -> usize {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.rev(mid) < rev {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    fn find(&self, rev: Revision) -> Result<Option<&'a [u8]>, BackendError> {
        let i = self.position(rev);
        if i < self.len() && self.rev(i) == rev {
            return self.bytes(i).map(Some);
        }
        Ok(None)
    }

    fn entries(&self) -> Result<Vec<(Revision, &'a [u8])>, BackendError> {
        (0..self.len())
            .map(|i| Ok((self.rev(i), self.bytes(i)?)))
            .collect()
    }
}

fn encode_list(revs: &[Revision]) -> Vec<u8> {
    let mut out = Vec::with_capacity(revs.len() * Revision::LEN);
    for rev in revs {
        out.extend_from_slice(&rev.to_bytes());
    }
    out
}

fn decode_list(bytes: &[u8]) -> Result<Vec<Revision>, BackendError> {
    if !bytes.len().is_multiple_of(Revision::LEN) {
        return Err(BackendError::Corrupt(format!(
            "compacted-revision list of {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(Revision::LEN)
        .filter_map(Revision::from_bytes)
        .collect())
}

impl SledBackend {
    /// Opens the key space's tree, converting records of an older layout, and reads which
    /// chunks exist and which of their records are dead.
    pub fn open(db: &sled::Db) -> Result<Self, BackendError> {
        let backend = Self {
            tree: db.open_tree("kv")?,
            state: Arc::default(),
            writer: Arc::default(),
        };
        backend.convert_legacy_records()?;
        backend.load_state()?;
        Ok(backend)
    }

    fn state(&self) -> RwLockReadGuard<'_, State> {
        // Every update of the state is a few map operations that cannot panic half-way.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves records stored one per key (before chunks) into chunks, each chunk in one atomic
    /// batch with the removal of its records' keys.
    fn convert_legacy_records(&self) -> Result<(), BackendError> {
        let mut group: Vec<(sled::IVec, Revision, sled::IVec)> = Vec::new();
        let mut converted = 0usize;
        for item in self.tree.scan_prefix([LEGACY_RECORD]) {
            let (k, v) = item?;
            let rev = revision_after_prefix(&k)?;
            group.push((k, rev, v));
            if group.len() == CHUNK_MAX_RECORDS {
                converted += self.convert_group(std::mem::take(&mut group))?;
            }
        }
        converted += self.convert_group(group)?;
        if converted > 0 {
            self.tree.flush()?;
            tracing::info!(
                records = converted,
                "stored the key space's records in chunks"
            );
        }
        Ok(())
    }

    fn convert_group(
        &self,
        group: Vec<(sled::IVec, Revision, sled::IVec)>,
    ) -> Result<usize, BackendError> {
        let Some((_, first, _)) = group.first() else {
            return Ok(0);
        };
        let mut batch = sled::Batch::default();
        batch.insert(
            &chunk_key(*first)[..],
            encode_chunk(group.iter().map(|(_, rev, v)| (*rev, v.as_ref()))),
        );
        for (k, _, _) in &group {
            batch.remove(k);
        }
        self.tree.apply_batch(batch)?;
        Ok(group.len())
    }

    fn load_state(&self) -> Result<(), BackendError> {
        let mut state = State::default();
        let mut stored: HashMap<Revision, Revision> = HashMap::new();
        for item in self.tree.scan_prefix([CHUNK]) {
            let (k, v) = item?;
            let first = revision_after_prefix(&k)?;
            let view = ChunkView::parse(&v)?;
            for i in 0..view.len() {
                stored.insert(view.rev(i), first);
            }
            state.chunks.insert(
                first,
                ChunkInfo {
                    len: view.len(),
                    bytes: view.body.len(),
                    last: view.len().checked_sub(1).map_or(first, |i| view.rev(i)),
                    dead: Vec::new(),
                },
            );
        }
        let mut obsolete = Vec::new();
        for item in self.tree.scan_prefix([GRAVES]) {
            let (k, v) = item?;
            let id = k
                .get(1..9)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                .ok_or_else(|| BackendError::Corrupt("compacted-revision list key".into()))?;
            state.next_list = state.next_list.max(id + 1);
            let mut list = List::default();
            for rev in decode_list(&v)? {
                list.written += 1;
                let Some(first) = stored.get(&rev) else {
                    continue;
                };
                if state.dead.insert(rev, id).is_none()
                    && let Some(chunk) = state.chunks.get_mut(first)
                {
                    chunk.dead.push(rev);
                }
                list.pending.insert(rev);
            }
            if list.pending.is_empty() {
                obsolete.push(id);
            } else {
                state.lists.insert(id, list);
            }
        }
        for id in obsolete {
            self.tree.remove(list_key(id))?;
        }
        *self.state_mut() = state;
        Ok(())
    }

    /// Writes everything written so far to disk (the key space's whole database).
    pub fn flush(&self) -> Result<(), BackendError> {
        self.tree.flush()?;
        Ok(())
    }

    /// Deletes everything (before a snapshot is loaded in its place).
    pub fn clear(&self) -> Result<(), BackendError> {
        let _writer = self.lock_writer();
        self.tree.clear()?;
        *self.state_mut() = State::default();
        Ok(())
    }

    /// Every metadata entry, for snapshots.
    pub fn all_meta(&self) -> Result<Vec<MetaEntry>, BackendError> {
        self.scan_meta(b"")
    }

    /// Stores `records` (in revision order, all above every stored revision) as new chunks.
    ///
    /// Not appended to the newest chunk when few: rewriting a chunk for every put of a lone
    /// client made each put write kilobytes, and the watch delivery p99 at 200 puts/s longer
    /// (BENCHMARKS.md, "Afternoon of 2026-12-03").
    fn append_records(&self, records: &[(Revision, Vec<u8>)]) -> Result<(), BackendError> {
        let mut rest = records;
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len()
                && n < CHUNK_MAX_RECORDS
                && (n == 0 || bytes + rest[n].1.len() <= CHUNK_MAX_BYTES)
            {
                bytes += rest[n].1.len();
                n += 1;
            }
            let (part, tail) = rest.split_at(n);
            let first = part[0].0;
            self.tree.insert(
                chunk_key(first),
                encode_chunk(part.iter().map(|(rev, r)| (*rev, r.as_slice()))),
            )?;
            self.state_mut().chunks.insert(
                first,
                ChunkInfo {
                    len: n,
                    bytes,
                    last: part[n - 1].0,
                    dead: Vec::new(),
                },
            );
            rest = tail;
        }
        Ok(())
    }

    /// Stores one record at or below the newest stored revision, in the chunk that covers it
    /// (replacing a record of the same revision), or in a chunk of its own below the first.
    /// Only a write replayed after a crash does this.
    fn merge_record(&self, rev: Revision, record: &[u8]) -> Result<(), BackendError> {
        let covering = self
            .state()
            .chunks
            .range(..=rev)
            .next_back()
            .map(|(k, _)| *k);
        let Some(first) = covering else {
            self.tree
                .insert(chunk_key(rev), encode_chunk([(rev, record)].into_iter()))?;
            self.state_mut().chunks.insert(
                rev,
                ChunkInfo {
                    len: 1,
                    bytes: record.len(),
                    last: rev,
                    dead: Vec::new(),
                },
            );
            return Ok(());
        };
        let old = self.tree.get(chunk_key(first))?;
        let mut all: Vec<(Revision, &[u8])> = match &old {
            Some(old) => ChunkView::parse(old)?.entries()?,
            None => Vec::new(),
        };
        all.retain(|(r, _)| *r != rev);
        let at = all.partition_point(|(r, _)| *r < rev);
        all.insert(at, (rev, record));
        self.tree
            .insert(chunk_key(first), encode_chunk(all.iter().copied()))?;
        let mut state = self.state_mut();
        let chunk = state.chunks.entry(first).or_default();
        chunk.len = all.len();
        chunk.bytes = all.iter().map(|(_, r)| r.len()).sum();
        chunk.last = all.last().map_or(rev, |(r, _)| *r);
        Ok(())
    }

    /// Takes revisions about to be stored again out of the lists naming them, on disk first.
    fn revive(&self, revs: &[Revision]) -> Result<(), BackendError> {
        let mut touched = Vec::new();
        {
            let mut state = self.state_mut();
            for rev in revs {
                if let Some(id) = state.dead.remove(rev) {
                    if let Some(list) = state.lists.get_mut(&id) {
                        list.pending.remove(rev);
                    }
                    touched.push(id);
                }
                if let Some((_, chunk)) = state.chunks.range_mut(..=*rev).next_back() {
                    chunk.dead.retain(|r| r != rev);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        self.rewrite_lists(&touched, true)
    }

    /// Writes again each of the lists `ids` that shrank: removed when none of its revisions is
    /// stored any more, rewritten with those that are when it halved (or always, with `exact`).
    fn rewrite_lists(&self, ids: &[u64], exact: bool) -> Result<(), BackendError> {
        for &id in ids {
            let action = {
                let state = self.state();
                match state.lists.get(&id) {
                    None => continue,
                    Some(list) if list.pending.is_empty() => None,
                    Some(list) if exact || list.pending.len() * 2 <= list.written => {
                        let mut revs: Vec<Revision> = list.pending.iter().copied().collect();
                        revs.sort_unstable();
                        Some(revs)
                    }
                    Some(_) => continue,
                }
            };
            match action {
                None => {
                    self.tree.remove(list_key(id))?;
                    self.state_mut().lists.remove(&id);
                }
                Some(revs) => {
                    self.tree.insert(list_key(id), encode_list(&revs))?;
                    if let Some(list) = self.state_mut().lists.get_mut(&id) {
                        list.written = revs.len();
                    }
                }
            }
        }
        Ok(())
    }

    /// Marks `revs` dead: lists them on disk, then rewrites or removes each chunk of which a
    /// third or more is dead, then writes again the lists that this emptied or halved.
    fn bury(&self, revs: &[Revision]) -> Result<(), BackendError> {
        let fresh: Vec<Revision> = {
            let state = self.state();
            let mut fresh: Vec<Revision> = revs
                .iter()
                .copied()
                .filter(|r| {
                    // Already listed, or below every chunk (so not stored): nothing to list.
                    !state.dead.contains_key(r) && state.chunks.range(..=*r).next_back().is_some()
                })
                .collect();
            fresh.sort_unstable();
            fresh.dedup();
            fresh
        };
        if fresh.is_empty() {
            return Ok(());
        }
        let id = self.state().next_list;
        self.tree.insert(list_key(id), encode_list(&fresh))?;
        let mut ripe = Vec::new();
        {
            let mut state = self.state_mut();
            state.next_list = id + 1;
            let mut list = List {
                written: fresh.len(),
                pending: HashSet::with_capacity(fresh.len()),
            };
            for &rev in &fresh {
                let Some((first, chunk)) = state.chunks.range_mut(..=rev).next_back() else {
                    continue;
                };
                chunk.dead.push(rev);
                if chunk.dead.len() * 3 >= chunk.len && ripe.last() != Some(first) {
                    ripe.push(*first);
                }
                list.pending.insert(rev);
            }
            for &rev in &list.pending {
                state.dead.insert(rev, id);
            }
            state.lists.insert(id, list);
        }
        ripe.sort_unstable();
        ripe.dedup();
        let mut touched = Vec::new();
        for first in ripe {
            self.reclaim(first, &mut touched)?;
        }
        touched.push(id);
        touched.sort_unstable();
        touched.dedup();
        self.rewrite_lists(&touched, false)
    }

    /// Rewrites the chunk at `first` without its dead records (removes it when none is left)
    /// and forgets them, noting the lists that named them in `touched`.
    fn reclaim(&self, first: Revision, touched: &mut Vec<u64>) -> Result<(), BackendError> {
        let dead: HashSet<Revision> = match self.state().chunks.get(&first) {
            Some(chunk) => chunk.dead.iter().copied().collect(),
            None => return Ok(()),
        };
        let Some(old) = self.tree.get(chunk_key(first))? else {
            return Ok(());
        };
        let view = ChunkView::parse(&old)?;
        let kept: Vec<(Revision, &[u8])> = view
            .entries()?
            .into_iter()
            .filter(|(rev, _)| !dead.contains(rev))
            .collect();
        if kept.is_empty() {
            self.tree.remove(chunk_key(first))?;
        } else {
            self.tree
                .insert(chunk_key(first), encode_chunk(kept.iter().copied()))?;
        }
        let mut state = self.state_mut();
        if kept.is_empty() {
            state.chunks.remove(&first);
        } else if let Some(chunk) = state.chunks.get_mut(&first) {
            chunk.len = kept.len();
            chunk.bytes = kept.iter().map(|(_, r)| r.len()).sum();
            chunk.last = kept.last().map_or(first, |(r, _)| *r);
            chunk.dead.clear();
        }
        for rev in dead {
            if let Some(id) = state.dead.remove(&rev) {
                if let Some(list) = state.lists.get_mut(&id) {
                    list.pending.remove(&rev);
                }
                touched.push(id);
            }
        }
        Ok(())
    }

    /// Visits stored live records from `from` on, in order, while `visit` returns true.
    fn visit_from<F>(&self, from: Revision, mut visit: F) -> Result<(), BackendError>
    where
        F: FnMut(Revision, &[u8]) -> Result<bool, BackendError>,
    {
        let start = self
            .state()
            .chunks
            .range(..=from)
            .next_back()
            .map_or(from, |(k, _)| *k);
        for item in self.tree.range(chunk_key(start).to_vec()..vec![CHUNK + 1]) {
            let (_, v) = item?;
            let view = ChunkView::parse(&v)?;
            let mut entries = view.entries()?;
            entries.drain(..view.position(from));
            {
                // Not held while visiting: `visit` may read the backend.
                let state = self.state();
                entries.retain(|(rev, _)| !state.dead.contains_key(rev));
            }
            for (rev, bytes) in entries {
                if !visit(rev, bytes)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

impl Backend for SledBackend {
    fn get(&self, rev: Revision) -> Result<Option<Record>, BackendError> {
        let first = {
            let state = self.state();
            if state.dead.contains_key(&rev) {
                return Ok(None);
            }
            match state.chunks.range(..=rev).next_back() {
                Some((first, _)) => *first,
                None => return Ok(None),
            }
        };
        let Some(chunk) = self.tree.get(chunk_key(first))? else {
            return Ok(None);
        };
        ChunkView::parse(&chunk)?
            .find(rev)?
            .map(Record::decode)
            .transpose()
    }

    fn scan(
        &self,
        from: Revision,
        to_main: i64,
        limit: usize,
    ) -> Result<Vec<(Revision, Record)>, BackendError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.visit_from(from, |rev, bytes| {
            if rev.main > to_main {
                return Ok(false);
            }
            out.push((rev, Record::decode(bytes)?));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    fn for_each(
        &self,
        visit: &mut dyn FnMut(Revision, Record) -> Result<(), BackendError>,
    ) -> Result<(), BackendError> {
        self.visit_from(Revision::default(), |rev, bytes| {
            visit(rev, Record::decode(bytes)?)?;
            Ok(true)
        })
    }

    /// Deletes (listed, then reclaimed chunk by chunk), then records, then the metadata: a
    /// single insert or remove when there is one entry (the usual case: the revision and
    /// position), a sled batch when there are more. Not one sled batch for everything: sled
    /// writes out its io buffer, with a `sync_file_range`, before and after every batch, which
    /// made each apply two synchronous disk writes although the key space is flushed lazily
    /// (the Raft log is what must be durable). sled recovers a prefix of its writes, which is
    /// all [`Backend::write`] promises.
    fn write(&self, batch: Batch) -> Result<(), BackendError> {
        let _writer = self.lock_writer();
        if !batch.deletes.is_empty() {
            self.bury(&batch.deletes)?;
        }
        if !batch.records.is_empty() {
            let mut records: Vec<(Revision, Vec<u8>)> = batch
                .records
                .into_iter()
                .map(|(rev, record)| (rev, record.encode()))
                .collect();
            records.sort_by_key(|(rev, _)| *rev);
            records.dedup_by(|later, earlier| {
                // Keep the later write of a revision written twice in one batch.
                if later.0 == earlier.0 {
                    std::mem::swap(later, earlier);
                    true
                } else {
                    false
                }
            });
            let revs: Vec<Revision> = records.iter().map(|(rev, _)| *rev).collect();
            let (revived, newest) = {
                let state = self.state();
                let revived = revs.iter().any(|r| state.dead.contains_key(r));
                (revived, state.chunks.values().next_back().map(|c| c.last))
            };
            if revived {
                self.revive(&revs)?;
            }
            // Records at or below the newest stored one come only from a write replayed after
            // a crash; they go into the chunks covering them.
            let split = newest.map_or(0, |n| records.partition_point(|(rev, _)| *rev <= n));
            for (rev, record) in &records[..split] {
                self.merge_record(*rev, record)?;
            }
            self.append_records(&records[split..])?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::mvccpb::KeyValue;
    use proptest::prelude::*;

    fn record(rev: Revision, size: usize) -> Record {
        Record {
            kv: KeyValue {
                key: format!("k{}", rev.main % 7).into_bytes(),
                value: vec![rev.sub as u8; size],
                mod_revision: rev.main,
                ..Default::default()
            },
            tombstone: rev.sub % 5 == 4,
        }
    }

    fn open(dir: &std::path::Path) -> (sled::Db, SledBackend) {
        // sled's background threads let go of the previous handle's file lock a moment after
        // it is dropped: a reopen right after a drop waits for it, up to a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("open sled: {e}"),
            }
        };
        let backend = SledBackend::open(&db).expect("open backend");
        (db, backend)
    }

    fn keys_with(db: &sled::Db, prefix: u8) -> usize {
        db.open_tree("kv").unwrap().scan_prefix([prefix]).count()
    }

    fn all(backend: &SledBackend) -> Vec<(Revision, Record)> {
        backend
            .scan(Revision::default(), i64::MAX, usize::MAX)
            .unwrap()
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Records at the next `n` main revisions, each with 1 to 3 sub revisions.
        Write {
            n: usize,
            size: usize,
        },
        /// Deletes every stored record whose main revision is `k` modulo `m`.
        Delete {
            m: i64,
            k: i64,
        },
        /// A write whose records reached disk, then were deleted as a crash's leftovers, then
        /// written again by the replayed log.
        Replay {
            n: usize,
        },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..300, 0usize..600).prop_map(|(n, size)| Op::Write { n, size }),
            3 => (1i64..5, 0i64..5).prop_map(|(m, k)| Op::Delete { m, k: k % m }),
            1 => (1usize..40).prop_map(|n| Op::Replay { n }),
            1 => Just(Op::Reopen),
        ]
    }

    fn batch_of(next: &mut i64, n: usize, size: usize) -> Vec<(Revision, Record)> {
        let mut records = Vec::new();
        for _ in 0..n {
            *next += 1;
            for sub in 0..=(*next % 3) {
                let rev = Revision::new(*next, sub);
                records.push((rev, record(rev, size)));
            }
        }
        records
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever writes, deletes, replays and restarts happen, the backend holds exactly what
        /// a map given the same operations holds: no deleted record comes back, no live one is
        /// lost, and reads at any revision agree.
        #[test]
        fn chunks_hold_what_a_map_holds(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let (mut db, mut backend) = open(dir.path());
            let mut model: BTreeMap<Revision, Record> = BTreeMap::new();
            let mut next = 0i64;
            for op in ops {
                match op {
                    Op::Write { n, size } => {
                        let records = batch_of(&mut next, n, size);
                        model.extend(records.iter().cloned());
                        backend.write(Batch { records, ..Default::default() }).unwrap();
                    }
                    Op::Delete { m, k } => {
                        let deletes: Vec<Revision> =
                            model.keys().copied().filter(|r| r.main % m == k).collect();
                        for rev in &deletes {
                            model.remove(rev);
                        }
                        backend.write(Batch { deletes, ..Default::default() }).unwrap();
                    }
                    Op::Replay { n } => {
                        let before = next;
                        let records = batch_of(&mut next, n, 64);
                        let revs: Vec<Revision> = records.iter().map(|(r, _)| *r).collect();
                        backend.write(Batch { records: records.clone(), ..Default::default() }).unwrap();
                        backend.write(Batch { deletes: revs, ..Default::default() }).unwrap();
                        next = before;
                        let records = batch_of(&mut next, n, 64);
                        model.extend(records.iter().cloned());
                        backend.write(Batch { records, ..Default::default() }).unwrap();
                    }
                    Op::Reopen => {
                        drop(backend);
                        drop(db);
                        (db, backend) = open(dir.path());
                    }
                }
                let expected: Vec<(Revision, Record)> =
                    model.iter().map(|(r, v)| (*r, v.clone())).collect();
                prop_assert_eq!(&all(&backend), &expected);
                let mut visited = Vec::new();
                backend.for_each(&mut |rev, rec| { visited.push((rev, rec)); Ok(()) }).unwrap();
                prop_assert_eq!(&visited, &expected);
                for probe in [1, next / 3, next / 2, next] {
                    let from = Revision::new(probe, 1);
                    let want: Vec<_> = expected.iter()
                        .filter(|(r, _)| *r >= from && r.main <= probe + 20)
                        .take(7)
                        .cloned()
                        .collect();
                    prop_assert_eq!(backend.scan(from, probe + 20, 7).unwrap(), want);
                    for sub in 0..3 {
                        let rev = Revision::new(probe, sub);
                        prop_assert_eq!(backend.get(rev).unwrap(), model.get(&rev).cloned());
                    }
                }
            }
        }
    }

    /// Deletes the records at sub revision 0 of `mains`.
    fn delete_mains(backend: &SledBackend, mains: std::ops::RangeInclusive<i64>) {
        let deletes = mains.map(|m| Revision::new(m, 0)).collect();
        backend
            .write(Batch {
                deletes,
                ..Default::default()
            })
            .unwrap();
    }

    #[test]
    fn a_write_is_a_chunk_and_dead_chunks_go() {
        let dir = tempfile::tempdir().unwrap();
        let (db, backend) = open(dir.path());
        let records = (1..=32)
            .map(|m| (Revision::new(m, 0), record(Revision::new(m, 0), 10)))
            .collect();
        backend
            .write(Batch {
                records,
                ..Default::default()
            })
            .unwrap();
        let mut next = 32;
        assert_eq!(keys_with(&db, CHUNK), 1, "one write, one chunk");
        backend
            .write(Batch {
                records: batch_of(&mut next, 100, 10),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            keys_with(&db, CHUNK),
            2,
            "a write of many records is a chunk of its own"
        );

        // Under a third of the first chunk dead: listed, not yet rewritten.
        delete_mains(&backend, 1..=10);
        assert_eq!(keys_with(&db, GRAVES), 1);
        assert_eq!(backend.get(Revision::new(5, 0)).unwrap(), None);
        // Half dead (a third is enough): rewritten without them, and the lists naming them go.
        delete_mains(&backend, 11..=16);
        assert_eq!(keys_with(&db, GRAVES), 0);
        assert_eq!(backend.state().chunks.values().next().unwrap().len, 16);
        // Every record of the first chunk dead: the chunk is removed.
        delete_mains(&backend, 17..=32);
        assert_eq!(keys_with(&db, CHUNK), 1);
        assert_eq!(keys_with(&db, GRAVES), 0);
        assert_eq!(all(&backend).first().map(|(r, _)| r.main), Some(33));
    }

    #[test]
    fn records_of_the_old_layout_are_moved_into_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("kv").unwrap();
        let mut expected = Vec::new();
        for main in 1..=600 {
            let rev = Revision::new(main, 0);
            let mut key = vec![LEGACY_RECORD];
            key.extend_from_slice(&rev.to_bytes());
            tree.insert(key, record(rev, 20).encode()).unwrap();
            expected.push((rev, record(rev, 20)));
        }
        let backend = SledBackend::open(&db).unwrap();
        assert_eq!(keys_with(&db, LEGACY_RECORD), 0);
        assert_eq!(keys_with(&db, CHUNK), 3);
        assert_eq!(all(&backend), expected);
    }

    #[test]
    fn garbage_in_a_chunk_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            &[0, 0, 0, 9][..],
            &[
                0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 200,
            ][..],
        ] {
            assert!(ChunkView::parse(bytes).is_err(), "{bytes:?}");
        }
        let chunk = encode_chunk([(Revision::new(1, 0), &b"abc"[..])].into_iter());
        let view = ChunkView::parse(&chunk).unwrap();
        assert_eq!(view.find(Revision::new(1, 0)).unwrap(), Some(&b"abc"[..]));
        assert_eq!(view.find(Revision::new(2, 0)).unwrap(), None);
        assert!(decode_list(&[1, 2, 3]).is_err());
    }
}
