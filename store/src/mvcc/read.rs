//! Range: reading keys at the newest or a past revision.
//!
//! A read happens in two steps so that a large range never holds the caller's lock while it
//! touches the disk: [`plan`] resolves keys to revisions from the in-memory index (under the
//! lock), and [`RangePlan::execute`] fetches the records (without it). Records are immutable
//! once written, so the only thing that can happen in between is a compaction deleting a
//! record the plan needed, which `execute` reports so the caller can answer "compacted".

use flotilla_proto::etcdserverpb::RangeRequest;
use flotilla_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use flotilla_proto::mvccpb::KeyValue;

use super::{KeyRange, Mvcc, Record, Revision};
use crate::errors::{BackendError, MvccError};

/// The revisions a range reads, resolved at one revision of the store.
#[derive(Clone, Debug)]
pub struct RangePlan {
    revs: Vec<Revision>,
    /// The revision the range reads at.
    pub revision: i64,
    /// Live keys in the range at that revision, regardless of limit and filters.
    pub count: i64,
    more: bool,
    req: RangeOptions,
}

#[derive(Clone, Debug)]
struct RangeOptions {
    limit: usize,
    keys_only: bool,
    count_only: bool,
    sort: Option<(SortTarget, bool)>,
    min_mod: i64,
    max_mod: i64,
    min_create: i64,
    max_create: i64,
}

impl RangeOptions {
    fn from_request(req: &RangeRequest) -> Self {
        let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
        let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
        // As etcd: a sort target without an order means ascending; ascending by key is the
        // natural order and needs no sort.
        let sort = match (order, target) {
            (SortOrder::None, SortTarget::Key) | (SortOrder::Ascend, SortTarget::Key) => None,
            (SortOrder::Descend, t) => Some((t, true)),
            (_, t) => Some((t, false)),
        };
        Self {
            limit: usize::try_from(req.limit.max(0)).unwrap_or(usize::MAX),
            keys_only: req.keys_only,
            count_only: req.count_only,
            sort,
            min_mod: req.min_mod_revision,
            max_mod: req.max_mod_revision,
            min_create: req.min_create_revision,
            max_create: req.max_create_revision,
        }
    }

    fn filters(&self) -> bool {
        self.min_mod > 0 || self.max_mod > 0 || self.min_create > 0 || self.max_create > 0
    }

    fn keep(&self, kv: &KeyValue) -> bool {
        (self.min_mod <= 0 || kv.mod_revision >= self.min_mod)
            && (self.max_mod <= 0 || kv.mod_revision <= self.max_mod)
            && (self.min_create <= 0 || kv.create_revision >= self.min_create)
            && (self.max_create <= 0 || kv.create_revision <= self.max_create)
    }
}

pub(super) fn plan(mvcc: &Mvcc, req: &RangeRequest) -> Result<RangePlan, MvccError> {
    let at = if req.revision <= 0 {
        mvcc.current
    } else {
        req.revision
    };
    if at > mvcc.current {
        return Err(MvccError::FutureRevision {
            current: mvcc.current,
        });
    }
    if at < mvcc.compacted {
        return Err(MvccError::Compacted {
            compact_revision: mvcc.compacted,
        });
    }
    Ok(plan_at(mvcc, req, at))
}

/// Resolves a range at revision `at`, which the caller has checked is readable.
pub(super) fn plan_at(mvcc: &Mvcc, req: &RangeRequest, at: i64) -> RangePlan {
    let opts = RangeOptions::from_request(req);
    let range = KeyRange::new(&req.key, &req.range_end);
    let mut revs: Vec<Revision> = match range.bounds() {
        None => Vec::new(),
        Some(bounds) => mvcc
            .index
            .range::<[u8], _>(bounds)
            .filter_map(|(_, ki)| ki.get(at))
            .collect(),
    };
    let count = revs.len() as i64;
    let mut more = false;
    if opts.count_only {
        revs.clear();
    } else if opts.sort.is_none() && !opts.filters() && opts.limit > 0 && revs.len() > opts.limit {
        // Key order is the answer's order: only the first `limit` records are needed.
        revs.truncate(opts.limit);
        more = true;
    }
    RangePlan {
        revs,
        revision: at,
        count,
        more,
        req: opts,
    }
}

impl RangePlan {
    /// How many records the plan reads.
    pub fn len(&self) -> usize {
        self.revs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.revs.is_empty()
    }

    /// Fetches, filters, sorts and limits; an answer of more than `max_bytes` (keys and
    /// values) is cut after the key that crosses it, with `more` set, as if the caller had
    /// asked for that limit (at least one key is always answered). `Ok(None)` means a record
    /// the plan needed was compacted away meanwhile.
    pub fn execute(
        self,
        fetch: &dyn Fn(Revision) -> Result<Option<Record>, BackendError>,
        max_bytes: usize,
    ) -> Result<Option<RangeResult>, BackendError> {
        let opts = self.req;
        let size = |kv: &KeyValue| kv.key.len() + if opts.keys_only { 0 } else { kv.value.len() };
        // In key order without filters, the fetch itself can stop once the answer is full.
        let streaming = opts.sort.is_none() && !opts.filters();
        let mut more = self.more;
        let mut bytes = 0;
        let mut kvs = Vec::with_capacity(self.revs.len());
        let total = self.revs.len();
        for (i, rev) in self.revs.into_iter().enumerate() {
            match fetch(rev)? {
                Some(record) if !record.tombstone => {
                    bytes += size(&record.kv);
                    kvs.push(record.kv);
                }
                _ => return Ok(None),
            }
            if streaming && bytes > max_bytes && i + 1 < total {
                more = true;
                break;
            }
        }
        if opts.filters() {
            kvs.retain(|kv| opts.keep(kv));
        }
        if let Some((target, descending)) = opts.sort {
            // Stable: ties keep key order, as etcd's does.
            kvs.sort_by(|a, b| {
                let ord = match target {
                    SortTarget::Key => a.key.cmp(&b.key),
                    SortTarget::Version => a.version.cmp(&b.version),
                    SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                    SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                    SortTarget::Value => a.value.cmp(&b.value),
                };
                if descending { ord.reverse() } else { ord }
            });
        }
        if opts.limit > 0 && kvs.len() > opts.limit {
            kvs.truncate(opts.limit);
            more = true;
        }
        if !streaming {
            let mut bytes = 0;
            if let Some(cut) = kvs.iter().position(|kv| {
                bytes += size(kv);
                bytes > max_bytes
            }) && cut + 1 < kvs.len()
            {
                kvs.truncate(cut + 1);
                more = true;
            }
        }
        if opts.keys_only {
            for kv in &mut kvs {
                kv.value.clear();
            }
        }
        Ok(Some(RangeResult {
            kvs,
            more,
            count: self.count,
            revision: self.revision,
        }))
    }
}

/// A resolved range: what etcd's `RangeResponse` carries besides the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
    pub revision: i64,
}
