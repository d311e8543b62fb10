//! Applying committed commands: Put, DeleteRange, Txn, Compact and leases.
//!
//! Every command is checked completely before it changes anything, so a refused command
//! leaves the key space as it was. A transaction that writes takes the next main revision and
//! numbers its writes with sub revisions; one that only reads takes none.

use std::collections::HashMap;

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::{
    CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantResponse,
    LeaseRevokeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp,
    ResponseHeader, ResponseOp, TxnRequest, TxnResponse, request_op, response_op,
};
use flotilla_proto::mvccpb::{Event, KeyValue, event::EventType};

use super::read;
use super::{
    Applied, Backend, Batch, Command, CommandResponse, Compaction, KeyRange, Mvcc, Record,
    Revision, meta,
};
use crate::errors::{BackendError, MvccError};

/// The writes of one command, visible to its own later reads before they reach the backend.
struct WriteTxn<'a> {
    backend: &'a dyn Backend,
    /// The main revision this command writes at, if it writes at all.
    main: i64,
    next_sub: i64,
    written: HashMap<Revision, usize>,
    batch: Batch,
    events: Vec<Event>,
}

impl<'a> WriteTxn<'a> {
    fn new(backend: &'a dyn Backend, main: i64) -> Self {
        Self {
            backend,
            main,
            next_sub: 0,
            written: HashMap::new(),
            batch: Batch::default(),
            events: Vec::new(),
        }
    }

    fn wrote(&self) -> bool {
        self.next_sub > 0
    }

    fn record(&self, rev: Revision) -> Result<Option<Record>, BackendError> {
        match self.written.get(&rev) {
            Some(&i) => Ok(Some(self.batch.records[i].1.clone())),
            None => self.backend.get(rev),
        }
    }

    /// The record at `rev`, which the index says exists.
    fn must_record(&self, rev: Revision, key: &[u8]) -> Result<Record, BackendError> {
        self.record(rev)?.ok_or_else(|| {
            BackendError::Corrupt(format!(
                "index points key {:?} at revision {}.{} but no record is stored there",
                String::from_utf8_lossy(key),
                rev.main,
                rev.sub
            ))
        })
    }

    fn push(&mut self, record: Record, prev: Option<KeyValue>) -> Revision {
        let rev = Revision::new(self.main, self.next_sub);
        self.next_sub += 1;
        let event_kv = if record.tombstone {
            KeyValue {
                key: record.kv.key.clone(),
                mod_revision: rev.main,
                ..Default::default()
            }
        } else {
            record.kv.clone()
        };
        let kind = if record.tombstone {
            EventType::Delete
        } else {
            EventType::Put
        };
        self.events.push(Event {
            r#type: kind as i32,
            kv: Some(event_kv),
            prev_kv: prev,
        });
        self.written.insert(rev, self.batch.records.len());
        self.batch.records.push((rev, record));
        rev
    }
}

pub(super) fn apply(
    mvcc: &mut Mvcc,
    backend: &dyn Backend,
    cmd: &Command,
) -> Result<Applied, BackendError> {
    let mut w = WriteTxn::new(backend, mvcc.current + 1);
    let mut compaction = None;
    if let Some(e) = super::alarm::refusal(mvcc.alarms.iter(), cmd) {
        return Ok(Applied {
            response: CommandResponse::Rejected(e),
            events: Vec::new(),
            batch: w.batch,
            compaction: None,
        });
    }
    let response = match cmd {
        Command::Alarm { activate, alarm } => {
            let changed = if *activate {
                mvcc.alarms.insert(*alarm)
            } else {
                mvcc.alarms.remove(alarm)
            };
            if changed {
                let key = super::alarm::meta_key(alarm);
                if *activate {
                    w.batch.put_meta(key, Vec::new());
                } else {
                    w.batch.delete_meta(key);
                }
            }
            CommandResponse::Alarms(if changed { vec![*alarm] } else { Vec::new() })
        }
        // Batches are unrolled by the state machine; one that reaches here was nested.
        Command::Batch(_) => {
            CommandResponse::Rejected(MvccError::InvalidCommand("a batch inside a batch".into()))
        }
        // Fences are checked (and removed) by the state machine, which knows the entry's term.
        Command::Fenced { .. } => CommandResponse::Rejected(MvccError::InvalidCommand(
            "a fenced command outside the state machine".into(),
        )),
        Command::Put(req) => match check_put(mvcc, req)? {
            Err(e) => CommandResponse::Rejected(e),
            Ok(()) => CommandResponse::Put(put(mvcc, &mut w, req)?),
        },
        Command::DeleteRange(req) => CommandResponse::DeleteRange(delete_range(mvcc, &mut w, req)?),
        Command::Txn(req) => {
            let mut path = Vec::new();
            txn_path(mvcc, &w, req, &mut path)?;
            match check_txn(mvcc, req, &path, &mut 0)? {
                Err(e) => CommandResponse::Rejected(e),
                Ok(()) => CommandResponse::Txn(txn(mvcc, &mut w, req, &path, &mut 0)?),
            }
        }
        Command::Compact { revision } => match compact(mvcc, &mut w.batch, *revision) {
            Err(e) => CommandResponse::Rejected(e),
            Ok(job) => {
                compaction = Some(job);
                CommandResponse::Compact(CompactionResponse::default())
            }
        },
        Command::LeaseGrant { id, ttl } => {
            if mvcc.leases.contains_key(id) {
                CommandResponse::Rejected(MvccError::LeaseExists(*id))
            } else {
                mvcc.leases.insert(
                    *id,
                    super::LeaseInfo {
                        ttl: *ttl,
                        keys: Default::default(),
                    },
                );
                w.batch
                    .put_meta(meta::lease_key(*id), ttl.to_be_bytes().to_vec());
                CommandResponse::LeaseGrant(LeaseGrantResponse {
                    id: *id,
                    ttl: *ttl,
                    ..Default::default()
                })
            }
        }
        Command::LeaseRevoke { id } => match mvcc.leases.get(id) {
            None => CommandResponse::Rejected(MvccError::LeaseNotFound(*id)),
            Some(info) => {
                let keys: Vec<Vec<u8>> = info.keys.iter().cloned().collect();
                for key in keys {
                    if let Some(rev) = mvcc.index.get(&key).and_then(|ki| ki.latest()) {
                        let prev = w.must_record(rev, &key)?;
                        delete_key(mvcc, &mut w, prev.kv);
                    }
                }
                mvcc.leases.remove(id);
                w.batch.delete_meta(meta::lease_key(*id));
                CommandResponse::LeaseRevoke(LeaseRevokeResponse::default())
            }
        },
    };
    if w.wrote() {
        mvcc.current = w.main;
        w.batch
            .put_meta(meta::REVISION, mvcc.current.to_be_bytes().to_vec());
    }
    let response = with_revision(response, mvcc.current);
    Ok(Applied {
        response,
        events: w.events,
        batch: w.batch,
        compaction,
    })
}

/// Sets the header revision of a top-level response.
fn with_revision(mut response: CommandResponse, revision: i64) -> CommandResponse {
    let header = Some(ResponseHeader {
        revision,
        ..Default::default()
    });
    match &mut response {
        CommandResponse::Put(r) => r.header = header,
        CommandResponse::DeleteRange(r) => r.header = header,
        CommandResponse::Txn(r) => r.header = header,
        CommandResponse::Compact(r) => r.header = header,
        CommandResponse::LeaseGrant(r) => r.header = header,
        CommandResponse::LeaseRevoke(r) => r.header = header,
        CommandResponse::Rejected(_)
        | CommandResponse::Empty
        | CommandResponse::Batch(_)
        | CommandResponse::Alarms(_) => {}
    }
    response
}

fn latest_record(
    mvcc: &Mvcc,
    w: &WriteTxn<'_>,
    key: &[u8],
) -> Result<Option<Record>, BackendError> {
    match mvcc.index.get(key).and_then(|ki| ki.latest()) {
        Some(rev) => w.must_record(rev, key).map(Some),
        None => Ok(None),
    }
}

fn check_put(mvcc: &Mvcc, req: &PutRequest) -> Result<Result<(), MvccError>, BackendError> {
    let existing = mvcc.live(&req.key);
    if (req.ignore_value || req.ignore_lease) && existing.is_none() {
        return Ok(Err(MvccError::KeyNotFound));
    }
    let lease = match (&existing, req.ignore_lease) {
        (Some(prev), true) => prev.lease,
        _ => req.lease,
    };
    if lease != 0 && !mvcc.leases.contains_key(&lease) {
        return Ok(Err(MvccError::LeaseNotFound(lease)));
    }
    Ok(Ok(()))
}

fn put(
    mvcc: &mut Mvcc,
    w: &mut WriteTxn<'_>,
    req: &PutRequest,
) -> Result<PutResponse, BackendError> {
    let live = mvcc.live(&req.key);
    // The previous value itself only when something will use it: the index knows the rest.
    let prev = if req.prev_kv || req.ignore_value || mvcc.wants_prev(&req.key) {
        latest_record(mvcc, w, &req.key)?.map(|r| r.kv)
    } else {
        None
    };
    let value = match (&prev, req.ignore_value) {
        (Some(p), true) => p.value.clone(),
        _ => req.value.clone(),
    };
    let lease = match (&live, req.ignore_lease) {
        (Some(l), true) => l.lease,
        _ => req.lease,
    };
    let kv = KeyValue {
        key: req.key.clone(),
        create_revision: live.map_or(w.main, |l| l.create_revision),
        mod_revision: w.main,
        version: live.map_or(1, |l| l.version + 1),
        value,
        lease,
    };
    if let Some(l) = &live
        && l.lease != 0
        && l.lease != lease
    {
        detach(mvcc, l.lease, &req.key);
    }
    if lease != 0
        && let Some(info) = mvcc.leases.get_mut(&lease)
    {
        info.keys.insert(req.key.clone());
    }
    let live = super::live_of(&kv);
    let rev = w.push(
        Record {
            kv,
            tombstone: false,
        },
        prev.clone(),
    );
    mvcc.index_write(&req.key, rev, Some(live));
    Ok(PutResponse {
        header: None,
        prev_kv: if req.prev_kv { prev } else { None },
    })
}

fn delete_range(
    mvcc: &mut Mvcc,
    w: &mut WriteTxn<'_>,
    req: &DeleteRangeRequest,
) -> Result<DeleteRangeResponse, BackendError> {
    let range = KeyRange::new(&req.key, &req.range_end);
    let live = mvcc.live_in(&range);
    let mut prev_kvs = Vec::new();
    for (key, rev) in &live {
        let prev = w.must_record(*rev, key)?.kv;
        if req.prev_kv {
            prev_kvs.push(prev.clone());
        }
        delete_key(mvcc, w, prev);
    }
    Ok(DeleteRangeResponse {
        header: None,
        deleted: live.len() as i64,
        prev_kvs,
    })
}

/// Writes a tombstone for a live key whose current record is `prev`.
fn delete_key(mvcc: &mut Mvcc, w: &mut WriteTxn<'_>, prev: KeyValue) {
    if prev.lease != 0 {
        detach(mvcc, prev.lease, &prev.key);
    }
    let key = prev.key.clone();
    let tombstone = Record {
        kv: KeyValue {
            key: key.clone(),
            ..Default::default()
        },
        tombstone: true,
    };
    let rev = w.push(tombstone, Some(prev));
    mvcc.index_write(&key, rev, None);
}

fn detach(mvcc: &mut Mvcc, lease: i64, key: &[u8]) {
    if let Some(info) = mvcc.leases.get_mut(&lease) {
        info.keys.remove(key);
    }
}

fn compact(mvcc: &mut Mvcc, batch: &mut Batch, revision: i64) -> Result<Compaction, MvccError> {
    if revision > mvcc.current {
        return Err(MvccError::FutureRevision {
            current: mvcc.current,
        });
    }
    if revision <= mvcc.compacted {
        return Err(MvccError::Compacted {
            compact_revision: mvcc.compacted,
        });
    }
    let job = mvcc.compact_index(revision);
    mvcc.compacted = revision;
    batch.put_meta(meta::COMPACT, revision.to_be_bytes().to_vec());
    Ok(job)
}

// ---- Txn ---------------------------------------------------------------------------------

/// Evaluates the compares of a txn and of the nested txns on the branches it will take, all
/// against the state before the txn (as etcd does), in pre-order.
fn txn_path(
    mvcc: &Mvcc,
    w: &WriteTxn<'_>,
    req: &TxnRequest,
    path: &mut Vec<bool>,
) -> Result<(), BackendError> {
    let mut ok = true;
    for cmp in &req.compare {
        if !compare(mvcc, w, cmp)? {
            ok = false;
            break;
        }
    }
    path.push(ok);
    for op in branch(req, ok) {
        if let Some(request_op::Request::RequestTxn(nested)) = &op.request {
            txn_path(mvcc, w, nested, path)?;
        }
    }
    Ok(())
}

fn branch(req: &TxnRequest, ok: bool) -> &[RequestOp] {
    if ok { &req.success } else { &req.failure }
}

fn compare(
    mvcc: &Mvcc,
    w: &WriteTxn<'_>,
    cmp: &flotilla_proto::etcdserverpb::Compare,
) -> Result<bool, BackendError> {
    let target = CompareTarget::try_from(cmp.target).unwrap_or(CompareTarget::Version);
    let result = CompareResult::try_from(cmp.result).unwrap_or(CompareResult::Equal);
    let live = mvcc.live_in(&KeyRange::new(&cmp.key, &cmp.range_end));
    if live.is_empty() {
        // As etcd: a value cannot be compared on a key that does not exist (proto3 cannot tell
        // a missing value from an empty one); other targets compare against zero.
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(holds(
            result,
            compare_one(target, &cmp.target_union, &KeyValue::default()),
        ));
    }
    for (key, rev) in live {
        // Only a value compare reads the value: the index knows the other targets.
        let kv = match mvcc.live(&key) {
            Some(l) if target != CompareTarget::Value => KeyValue {
                create_revision: l.create_revision,
                mod_revision: rev.main,
                version: l.version,
                lease: l.lease,
                ..Default::default()
            },
            _ => w.must_record(rev, &key)?.kv,
        };
        if !holds(result, compare_one(target, &cmp.target_union, &kv)) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn compare_one(
    target: CompareTarget,
    union: &Option<TargetUnion>,
    kv: &KeyValue,
) -> std::cmp::Ordering {
    // A union of the wrong kind compares as zero, as etcd's type assertion does.
    let int = |want: fn(&TargetUnion) -> Option<i64>| union.as_ref().and_then(want).unwrap_or(0);
    match target {
        CompareTarget::Version => kv.version.cmp(&int(|u| match u {
            TargetUnion::Version(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Create => kv.create_revision.cmp(&int(|u| match u {
            TargetUnion::CreateRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Mod => kv.mod_revision.cmp(&int(|u| match u {
            TargetUnion::ModRevision(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Lease => kv.lease.cmp(&int(|u| match u {
            TargetUnion::Lease(v) => Some(*v),
            _ => None,
        })),
        CompareTarget::Value => {
            let want: &[u8] = match union {
                Some(TargetUnion::Value(v)) => v,
                _ => &[],
            };
            kv.value.as_slice().cmp(want)
        }
    }
}

fn holds(result: CompareResult, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match result {
        CompareResult::Equal => ord == Equal,
        CompareResult::Greater => ord == Greater,
        CompareResult::Less => ord == Less,
        CompareResult::NotEqual => ord != Equal,
    }
}

/// Checks every operation on the chosen path before anything is written.
fn check_txn(
    mvcc: &Mvcc,
    req: &TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<Result<(), MvccError>, BackendError> {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    for op in branch(req, ok) {
        let verdict = match &op.request {
            Some(request_op::Request::RequestRange(r)) => check_range_revision(mvcc, r),
            Some(request_op::Request::RequestPut(p)) => check_put(mvcc, p)?,
            Some(request_op::Request::RequestTxn(nested)) => check_txn(mvcc, nested, path, at)?,
            Some(request_op::Request::RequestDeleteRange(_)) | None => Ok(()),
        };
        if verdict.is_err() {
            return Ok(verdict);
        }
    }
    Ok(Ok(()))
}

fn check_range_revision(mvcc: &Mvcc, r: &RangeRequest) -> Result<(), MvccError> {
    if r.revision > mvcc.current {
        return Err(MvccError::FutureRevision {
            current: mvcc.current,
        });
    }
    if r.revision > 0 && r.revision < mvcc.compacted {
        return Err(MvccError::Compacted {
            compact_revision: mvcc.compacted,
        });
    }
    Ok(())
}

fn txn(
    mvcc: &mut Mvcc,
    w: &mut WriteTxn<'_>,
    req: &TxnRequest,
    path: &[bool],
    at: &mut usize,
) -> Result<TxnResponse, BackendError> {
    let ok = path.get(*at).copied().unwrap_or(false);
    *at += 1;
    let mut responses = Vec::new();
    for op in branch(req, ok) {
        let response = match &op.request {
            Some(request_op::Request::RequestRange(r)) => {
                response_op::Response::ResponseRange(txn_range(mvcc, w, r)?)
            }
            Some(request_op::Request::RequestPut(p)) => {
                let mut resp = put(mvcc, w, p)?;
                resp.header = Some(ResponseHeader::default());
                response_op::Response::ResponsePut(resp)
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                let mut resp = delete_range(mvcc, w, d)?;
                resp.header = Some(ResponseHeader::default());
                response_op::Response::ResponseDeleteRange(resp)
            }
            Some(request_op::Request::RequestTxn(nested)) => {
                let mut resp = txn(mvcc, w, nested, path, at)?;
                resp.header = Some(ResponseHeader::default());
                response_op::Response::ResponseTxn(resp)
            }
            None => continue,
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok(TxnResponse {
        header: None,
        succeeded: ok,
        responses,
    })
}

/// A range inside a txn sees the txn's own earlier writes.
fn txn_range(
    mvcc: &Mvcc,
    w: &WriteTxn<'_>,
    r: &RangeRequest,
) -> Result<RangeResponse, BackendError> {
    let at = if r.revision > 0 {
        r.revision
    } else if w.wrote() {
        w.main
    } else {
        mvcc.current
    };
    let plan = read::plan_at(mvcc, r, at);
    let result = plan
        .execute(&|rev| w.record(rev), usize::MAX)?
        .ok_or_else(|| BackendError::Corrupt("a record vanished while applying a txn".into()))?;
    Ok(RangeResponse {
        header: Some(ResponseHeader::default()),
        kvs: result.kvs,
        more: result.more,
        count: result.count,
    })
}
