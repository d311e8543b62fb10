//! Unit tests of the MVCC rules and the Txn evaluator, against the in-memory backend.

use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    range_request, request_op, response_op,
};
use flotilla_proto::mvccpb::{KeyValue, event::EventType};

use super::*;
use crate::errors::InvalidRequest;

/// A key space over a memory backend, applying commands as the state machine does.
#[derive(Default)]
struct Fixture {
    mvcc: Mvcc,
    backend: MemBackend,
}

impl Fixture {
    fn apply(&mut self, cmd: Command) -> Applied {
        validate_command(&cmd).expect("test commands are valid");
        let mut applied = self.mvcc.apply(&self.backend, &cmd).unwrap();
        self.backend
            .write(std::mem::take(&mut applied.batch))
            .unwrap();
        if let Some(job) = &applied.compaction {
            self.physically_compact(job);
        }
        applied
    }

    fn physically_compact(&self, job: &Compaction) {
        self.backend
            .write(Batch {
                deletes: job.removed.clone(),
                ..Default::default()
            })
            .unwrap();
        self.assert_backend_holds_the_index();
    }

    /// The backend holds a record for every revision the index lists, and no other: a
    /// compaction forgets nothing a read still needs and leaves nothing behind.
    fn assert_backend_holds_the_index(&self) {
        let mut stored: Vec<Revision> = self
            .backend
            .scan(Revision::default(), i64::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|(rev, _)| rev)
            .collect();
        let mut indexed: Vec<Revision> = self
            .mvcc
            .index
            .values()
            .flat_map(|ki| ki.revisions())
            .collect();
        stored.sort();
        indexed.sort();
        assert_eq!(stored, indexed, "backend records against the index");
    }

    fn put(&mut self, key: &str, value: &str) -> Applied {
        self.apply(Command::Put(put_req(key, value)))
    }

    fn range(&self, req: RangeRequest) -> Result<RangeResult, MvccError> {
        let plan = self.mvcc.plan_range(&req)?;
        Ok(plan
            .execute(&|rev| self.backend.get(rev), usize::MAX)
            .unwrap()
            .expect("no concurrent compaction"))
    }

    fn get(&self, key: &str) -> Option<KeyValue> {
        self.range(RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .unwrap()
        .kvs
        .pop()
    }

    fn get_at(&self, key: &str, revision: i64) -> Result<Option<KeyValue>, MvccError> {
        Ok(self
            .range(RangeRequest {
                key: key.into(),
                revision,
                ..Default::default()
            })?
            .kvs
            .pop())
    }

    fn value(&self, key: &str) -> Option<String> {
        self.get(key).map(|kv| String::from_utf8(kv.value).unwrap())
    }
}

fn put_req(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

fn prefix(p: &str) -> RangeRequest {
    let mut end = p.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    RangeRequest {
        key: p.into(),
        range_end: end,
        ..Default::default()
    }
}

fn op_put(key: &str, value: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(put_req(key, value))),
    }
}

fn op_get(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key: key.into(),
            ..Default::default()
        })),
    }
}

fn op_delete(key: &str, range_end: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.into(),
                range_end: range_end.into(),
                ..Default::default()
            },
        )),
    }
}

fn cmp(
    key: &str,
    target: compare::CompareTarget,
    result: compare::CompareResult,
    union: compare::TargetUnion,
) -> Compare {
    Compare {
        key: key.into(),
        target: target as i32,
        result: result as i32,
        target_union: Some(union),
        ..Default::default()
    }
}

fn txn_response(applied: &Applied) -> &flotilla_proto::etcdserverpb::TxnResponse {
    match &applied.response {
        CommandResponse::Txn(t) => t,
        other => panic!("expected a txn response, got {other:?}"),
    }
}

#[test]
fn each_write_takes_the_next_revision_and_versions_count_changes() {
    let mut f = Fixture::default();
    f.put("a", "1");
    f.put("b", "1");
    f.put("a", "2");
    let a = f.get("a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (1, 3, 2));
    assert_eq!(f.mvcc.revision(), 3);

    f.apply(Command::DeleteRange(DeleteRangeRequest {
        key: "a".into(),
        ..Default::default()
    }));
    assert_eq!(f.mvcc.revision(), 4);
    assert_eq!(f.get("a"), None);
    f.put("a", "3");
    let a = f.get("a").unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version),
        (5, 5, 1),
        "a new generation"
    );
}

#[test]
fn a_delete_that_deletes_nothing_does_not_take_a_revision() {
    let mut f = Fixture::default();
    f.put("a", "1");
    let applied = f.apply(Command::DeleteRange(DeleteRangeRequest {
        key: "zz".into(),
        ..Default::default()
    }));
    assert_eq!(f.mvcc.revision(), 1);
    assert!(applied.events.is_empty());
    match applied.response {
        CommandResponse::DeleteRange(r) => assert_eq!(r.deleted, 0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn range_reads_the_past_until_it_is_compacted() {
    let mut f = Fixture::default();
    f.put("k", "v1"); // 1
    f.put("k", "v2"); // 2
    f.put("other", "x"); // 3
    f.put("k", "v3"); // 4
    assert_eq!(f.get_at("k", 1).unwrap().unwrap().value, b"v1");
    assert_eq!(f.get_at("k", 3).unwrap().unwrap().value, b"v2");
    assert_eq!(f.get_at("k", 4).unwrap().unwrap().value, b"v3");
    assert_eq!(
        f.get_at("k", 5),
        Err(MvccError::FutureRevision { current: 4 })
    );

    f.apply(Command::Compact { revision: 3 });
    assert_eq!(
        f.get_at("k", 2),
        Err(MvccError::Compacted {
            compact_revision: 3
        })
    );
    assert_eq!(
        f.get_at("k", 3).unwrap().unwrap().value,
        b"v2",
        "the compact revision stays readable"
    );
    assert_eq!(f.value("k").as_deref(), Some("v3"));
    // v1 at revision 1 is gone from the backend; v2 is kept because revision 3 still sees it.
    assert_eq!(f.backend.record_count(), 3);
}

#[test]
fn compacting_twice_or_into_the_future_is_refused() {
    let mut f = Fixture::default();
    f.put("k", "v");
    f.put("k", "v");
    let r = f.apply(Command::Compact { revision: 9 }).response;
    assert_eq!(
        r,
        CommandResponse::Rejected(MvccError::FutureRevision { current: 2 })
    );
    f.apply(Command::Compact { revision: 2 });
    let r = f.apply(Command::Compact { revision: 2 }).response;
    assert_eq!(
        r,
        CommandResponse::Rejected(MvccError::Compacted {
            compact_revision: 2
        })
    );
}

#[test]
fn prefix_limit_count_keys_only_and_sorting() {
    let mut f = Fixture::default();
    for (k, v) in [("p/c", "1"), ("p/a", "3"), ("p/b", "2"), ("q", "0")] {
        f.put(k, v);
    }
    let all = f.range(prefix("p/")).unwrap();
    let keys: Vec<_> = all.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        keys,
        vec![b"p/a".to_vec(), b"p/b".to_vec(), b"p/c".to_vec()]
    );
    assert_eq!((all.count, all.more), (3, false));

    let limited = f
        .range(RangeRequest {
            limit: 2,
            ..prefix("p/")
        })
        .unwrap();
    assert_eq!(
        (limited.kvs.len(), limited.count, limited.more),
        (2, 3, true)
    );

    let counted = f
        .range(RangeRequest {
            count_only: true,
            ..prefix("p/")
        })
        .unwrap();
    assert_eq!((counted.kvs.len(), counted.count), (0, 3));

    let keys_only = f
        .range(RangeRequest {
            keys_only: true,
            ..prefix("p/")
        })
        .unwrap();
    assert!(
        keys_only
            .kvs
            .iter()
            .all(|kv| kv.value.is_empty() && kv.mod_revision > 0)
    );

    let by_value_desc = f
        .range(RangeRequest {
            sort_target: range_request::SortTarget::Value as i32,
            sort_order: range_request::SortOrder::Descend as i32,
            limit: 2,
            ..prefix("p/")
        })
        .unwrap();
    let values: Vec<_> = by_value_desc
        .kvs
        .iter()
        .map(|kv| kv.value.clone())
        .collect();
    assert_eq!(values, vec![b"3".to_vec(), b"2".to_vec()]);
    assert!(by_value_desc.more);

    let from_b = f
        .range(RangeRequest {
            key: "p/b".into(),
            range_end: vec![0],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(from_b.count, 3, "p/b, p/c and q are >= p/b");

    let backwards = f
        .range(RangeRequest {
            key: "z".into(),
            range_end: "a".into(),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        backwards.count, 0,
        "an empty interval is an empty answer, not a panic"
    );
}

#[test]
fn mod_and_create_revision_filters() {
    let mut f = Fixture::default();
    f.put("a", "1"); // 1
    f.put("b", "1"); // 2
    f.put("a", "2"); // 3
    let r = f
        .range(RangeRequest {
            min_mod_revision: 3,
            ..prefix("a")
        })
        .unwrap();
    assert_eq!(r.kvs.len(), 1);
    let all = RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    let r = f
        .range(RangeRequest {
            max_create_revision: 1,
            ..all.clone()
        })
        .unwrap();
    assert_eq!(
        r.kvs.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec![b"a".to_vec()]
    );
    assert_eq!(r.count, 2, "count ignores filters");
}

#[test]
fn put_returns_the_previous_value_and_events_carry_it() {
    let mut f = Fixture::default();
    f.put("k", "old");
    let applied = f.apply(Command::Put(PutRequest {
        prev_kv: true,
        ..put_req("k", "new")
    }));
    match &applied.response {
        CommandResponse::Put(r) => {
            assert_eq!(r.prev_kv.as_ref().unwrap().value, b"old");
            assert_eq!(r.header.as_ref().unwrap().revision, 2);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(applied.events.len(), 1);
    let ev = &applied.events[0];
    assert_eq!(ev.r#type, EventType::Put as i32);
    assert_eq!(ev.kv.as_ref().unwrap().value, b"new");
    assert_eq!(ev.prev_kv.as_ref().unwrap().value, b"old");
}

#[test]
fn ignore_value_and_ignore_lease_need_an_existing_key() {
    let mut f = Fixture::default();
    let r = f.apply(Command::Put(PutRequest {
        key: "k".into(),
        ignore_value: true,
        ..Default::default()
    }));
    assert_eq!(
        r.response,
        CommandResponse::Rejected(MvccError::KeyNotFound)
    );
    assert_eq!(f.mvcc.revision(), 0, "a refused command changes nothing");
    f.put("k", "keep");
    f.apply(Command::Put(PutRequest {
        key: "k".into(),
        ignore_value: true,
        ..Default::default()
    }));
    assert_eq!(f.value("k").as_deref(), Some("keep"));
    assert_eq!(f.get("k").unwrap().version, 2);
}

#[test]
fn txn_compares_choose_the_branch() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut f = Fixture::default();
    f.put("k", "v"); // rev 1, version 1

    let cas = |expect: &str, new: &str| {
        Command::Txn(TxnRequest {
            compare: vec![cmp("k", T::Value, R::Equal, U::Value(expect.into()))],
            success: vec![op_put("k", new)],
            failure: vec![op_get("k")],
        })
    };
    let ok = f.apply(cas("v", "w"));
    assert!(txn_response(&ok).succeeded);
    assert_eq!(f.value("k").as_deref(), Some("w"));

    let failed = f.apply(cas("v", "x"));
    let t = txn_response(&failed);
    assert!(!t.succeeded);
    match &t.responses[0].response {
        Some(response_op::Response::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b"w"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.mvcc.revision(),
        2,
        "a txn that only read takes no revision"
    );

    let checks = [
        (cmp("k", T::Version, R::Equal, U::Version(2)), true),
        (cmp("k", T::Version, R::Greater, U::Version(1)), true),
        (cmp("k", T::Create, R::Equal, U::CreateRevision(1)), true),
        (cmp("k", T::Mod, R::Less, U::ModRevision(2)), false),
        (cmp("k", T::Mod, R::NotEqual, U::ModRevision(1)), true),
        (cmp("k", T::Lease, R::Equal, U::Lease(0)), true),
        // A missing key has version, create and mod revision 0 ...
        (cmp("missing", T::Version, R::Equal, U::Version(0)), true),
        (
            cmp("missing", T::Create, R::Equal, U::CreateRevision(0)),
            true,
        ),
        // ... but never compares by value.
        (cmp("missing", T::Value, R::Equal, U::Value(vec![])), false),
        (
            cmp("missing", T::Value, R::NotEqual, U::Value(b"x".to_vec())),
            false,
        ),
    ];
    for (c, want) in checks {
        let applied = f.apply(Command::Txn(TxnRequest {
            compare: vec![c.clone()],
            ..Default::default()
        }));
        assert_eq!(txn_response(&applied).succeeded, want, "{c:?}");
    }
}

#[test]
fn txn_compare_over_a_range_needs_every_key_to_match() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut f = Fixture::default();
    f.put("r/a", "1");
    f.put("r/b", "1");
    let mut c = cmp("r/", T::Value, R::Equal, U::Value(b"1".to_vec()));
    c.range_end = b"r0".to_vec();
    let t = f.apply(Command::Txn(TxnRequest {
        compare: vec![c.clone()],
        ..Default::default()
    }));
    assert!(txn_response(&t).succeeded);
    f.put("r/b", "2");
    let t = f.apply(Command::Txn(TxnRequest {
        compare: vec![c],
        ..Default::default()
    }));
    assert!(!txn_response(&t).succeeded);
}

#[test]
fn txn_writes_share_one_revision_and_later_ops_see_earlier_ones() {
    let mut f = Fixture::default();
    f.put("gone", "x"); // 1
    let applied = f.apply(Command::Txn(TxnRequest {
        success: vec![
            op_put("a", "1"),
            op_get("a"),
            op_delete("gone", ""),
            op_put("b", "2"),
        ],
        ..Default::default()
    }));
    let t = txn_response(&applied);
    assert!(t.succeeded);
    assert_eq!(t.header.as_ref().unwrap().revision, 2);
    match &t.responses[1].response {
        Some(response_op::Response::ResponseRange(r)) => assert_eq!(r.kvs[0].value, b"1"),
        other => panic!("{other:?}"),
    }
    assert_eq!(f.get("a").unwrap().mod_revision, 2);
    assert_eq!(f.get("b").unwrap().mod_revision, 2);
    let kinds: Vec<_> = applied.events.iter().map(|e| e.r#type).collect();
    assert_eq!(
        kinds,
        vec![
            EventType::Put as i32,
            EventType::Delete as i32,
            EventType::Put as i32
        ]
    );
    let tomb = applied.events[1].kv.as_ref().unwrap();
    assert_eq!((tomb.key.as_slice(), tomb.mod_revision), (&b"gone"[..], 2));
}

#[test]
fn nested_txns_evaluate_compares_before_any_write() {
    use compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    let mut f = Fixture::default();
    // Outer succeeds (k absent), puts k, then a nested txn checks k is still absent: it
    // evaluates against the state before the outer txn, as etcd does, so it succeeds too.
    let nested = TxnRequest {
        compare: vec![cmp("k", T::Version, R::Equal, U::Version(0))],
        success: vec![op_put("nested", "yes")],
        failure: vec![op_put("nested", "no")],
    };
    let applied = f.apply(Command::Txn(TxnRequest {
        compare: vec![cmp("k", T::Version, R::Equal, U::Version(0))],
        success: vec![
            op_put("k", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestTxn(nested)),
            },
        ],
        failure: vec![],
    }));
    assert!(txn_response(&applied).succeeded);
    assert_eq!(f.value("nested").as_deref(), Some("yes"));
}

#[test]
fn a_txn_refused_on_its_chosen_path_changes_nothing() {
    let mut f = Fixture::default();
    let applied = f.apply(Command::Txn(TxnRequest {
        success: vec![
            op_put("a", "1"),
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: "b".into(),
                    lease: 77,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    }));
    assert_eq!(
        applied.response,
        CommandResponse::Rejected(MvccError::LeaseNotFound(77))
    );
    assert_eq!(f.get("a"), None);
    assert_eq!(f.mvcc.revision(), 0);
}

#[test]
fn validation_refuses_malformed_txns() {
    let dup = TxnRequest {
        success: vec![op_put("a", "1"), op_put("a", "2")],
        ..Default::default()
    };
    assert_eq!(
        validate_command(&Command::Txn(dup)),
        Err(InvalidRequest::DuplicateKey)
    );
    let put_in_delete = TxnRequest {
        success: vec![op_delete("a", "b"), op_put("a1", "2")],
        ..Default::default()
    };
    assert_eq!(
        validate_command(&Command::Txn(put_in_delete)),
        Err(InvalidRequest::DuplicateKey)
    );
    let other_branch = TxnRequest {
        success: vec![op_put("a", "1")],
        failure: vec![op_put("a", "2")],
        ..Default::default()
    };
    assert_eq!(validate_command(&Command::Txn(other_branch)), Ok(()));
    let too_many = TxnRequest {
        success: (0..129).map(|i| op_put(&format!("k{i}"), "v")).collect(),
        ..Default::default()
    };
    assert_eq!(
        validate_command(&Command::Txn(too_many)),
        Err(InvalidRequest::TooManyOps)
    );
    assert_eq!(
        validate_command(&Command::Put(put_req("", "v"))),
        Err(InvalidRequest::EmptyKey)
    );
    let bad_enum = TxnRequest {
        compare: vec![Compare {
            key: "k".into(),
            result: 42,
            ..Default::default()
        }],
        ..Default::default()
    };
    assert!(matches!(
        validate_command(&Command::Txn(bad_enum)),
        Err(InvalidRequest::Field { .. })
    ));
    let value_with_ignore = PutRequest {
        key: "k".into(),
        value: "v".into(),
        ignore_value: true,
        ..Default::default()
    };
    assert_eq!(
        validate_command(&Command::Put(value_with_ignore)),
        Err(InvalidRequest::ValueProvided)
    );
}

#[test]
fn revoking_a_lease_deletes_its_keys_in_one_revision() {
    let mut f = Fixture::default();
    f.apply(Command::LeaseGrant { id: 7, ttl: 10 });
    assert_eq!(
        f.apply(Command::LeaseGrant { id: 7, ttl: 10 }).response,
        CommandResponse::Rejected(MvccError::LeaseExists(7))
    );
    for k in ["l/a", "l/b"] {
        f.apply(Command::Put(PutRequest {
            key: k.into(),
            value: "v".into(),
            lease: 7,
            ..Default::default()
        }));
    }
    f.put("l/c", "no lease");
    // Moving l/b off the lease detaches it.
    f.put("l/b", "detached");
    assert_eq!(f.mvcc.lease(7).unwrap().keys.len(), 1);

    let applied = f.apply(Command::LeaseRevoke { id: 7 });
    assert_eq!(applied.events.len(), 1);
    assert_eq!(f.get("l/a"), None);
    assert!(f.get("l/b").is_some());
    assert!(f.mvcc.lease(7).is_none());
    assert_eq!(
        f.apply(Command::LeaseRevoke { id: 7 }).response,
        CommandResponse::Rejected(MvccError::LeaseNotFound(7))
    );
}

#[test]
fn restore_rebuilds_the_same_state_and_finishes_compactions() {
    let mut f = Fixture::default();
    f.apply(Command::LeaseGrant { id: 1, ttl: 30 });
    for i in 0..20 {
        f.put(&format!("k{}", i % 5), &format!("v{i}"));
    }
    f.apply(Command::Put(PutRequest {
        key: "leased".into(),
        value: "x".into(),
        lease: 1,
        ..Default::default()
    }));
    f.apply(Command::DeleteRange(DeleteRangeRequest {
        key: "k3".into(),
        ..Default::default()
    }));
    // Compact logically but "crash" before the physical deletion.
    let applied = f
        .mvcc
        .apply(&f.backend, &Command::Compact { revision: 12 })
        .unwrap();
    f.backend.write(applied.batch).unwrap();

    let (restored, job) = Mvcc::restore(&f.backend).unwrap();
    assert_eq!(restored.revision(), f.mvcc.revision());
    assert_eq!(restored.compact_revision(), 12);
    assert_eq!(restored.index, f.mvcc.index);
    assert_eq!(restored.lease(1).unwrap().keys.len(), 1);
    assert!(!job.removed.is_empty());
    f.mvcc = restored;
    f.physically_compact(&job);
    for i in 0..5 {
        let key = format!("k{i}");
        assert!(f.get_at(&key, 12).is_ok());
    }
    assert_eq!(f.value("k3"), None);
    assert_eq!(f.value("k4").as_deref(), Some("v19"));
}

/// The backend writes a batch's records before its metadata, so a crash can leave records of a
/// write whose revision never reached disk. Restoring drops them, and applying the same write
/// again (as the Raft log does) gives the state the uninterrupted write would have.
#[test]
fn a_write_cut_short_leaves_nothing_behind_and_applies_again() {
    let mut f = Fixture::default();
    f.put("a", "1");
    f.put("b", "1");
    let txn = Command::Txn(TxnRequest {
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put_req("a", "2"))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: "b".into(),
                        ..Default::default()
                    },
                )),
            },
            RequestOp {
                request: Some(request_op::Request::RequestPut(put_req("c", "1"))),
            },
        ],
        ..Default::default()
    });
    let mut whole = Fixture::default();
    whole.put("a", "1");
    whole.put("b", "1");
    whole.apply(txn.clone());

    // "Crash" after two of the txn's three records reached the backend, before its metadata.
    let mut applied = f.mvcc.apply(&f.backend, &txn).unwrap();
    let mut cut = std::mem::take(&mut applied.batch);
    assert_eq!(cut.records.len(), 3);
    cut.records.truncate(2);
    cut.meta.clear();
    f.backend.write(cut).unwrap();

    let (restored, _) = Mvcc::restore(&f.backend).unwrap();
    assert_eq!(
        restored.revision(),
        2,
        "the cut write's revision is not there"
    );
    assert_eq!(
        f.backend.record_count(),
        2,
        "the cut write's records are gone"
    );
    f.mvcc = restored;
    f.apply(txn);
    assert_eq!(f.mvcc.revision(), whole.mvcc.revision());
    assert_eq!(f.mvcc.index, whole.mvcc.index);
    for key in ["a", "b", "c"] {
        assert_eq!(f.get(key), whole.get(key), "{key}");
    }
}

/// Puts take the previous value's create revision, version and lease from the index, also
/// after compaction forgot the writes they were counted from, and with no read of the value.
#[test]
fn puts_keep_counting_versions_across_compaction_without_reading_values() {
    let mut f = Fixture::default();
    f.mvcc.keep_prev(PrevValues::Within(Arc::default()));
    f.apply(Command::LeaseGrant { id: 3, ttl: 30 });
    f.put("k", "1");
    f.apply(Command::Put(PutRequest {
        key: "k".into(),
        value: "2".into(),
        lease: 3,
        ..Default::default()
    }));
    f.put("other", "x");
    let at = f.mvcc.revision();
    f.apply(Command::Compact { revision: at });
    let applied = f.apply(Command::Put(PutRequest {
        key: "k".into(),
        value: "3".into(),
        ignore_lease: true,
        ..Default::default()
    }));
    assert_eq!(applied.events.len(), 1);
    assert_eq!(applied.events[0].prev_kv, None, "no watcher wanted it");
    let kv = f.get("k").unwrap();
    // A lease grant takes no revision: the first put is revision 1.
    assert_eq!((kv.create_revision, kv.version, kv.lease), (1, 3, 3));
    // Asked for, the previous value is read.
    let applied = f.apply(Command::Put(PutRequest {
        key: "k".into(),
        value: "4".into(),
        prev_kv: true,
        ..Default::default()
    }));
    let CommandResponse::Put(resp) = &applied.response else {
        panic!("{:?}", applied.response);
    };
    assert_eq!(
        resp.prev_kv.as_ref().map(|p| p.value.clone()),
        Some(b"3".to_vec())
    );
    assert_eq!(f.mvcc.lease(3).map(|l| l.keys.len()), Some(0), "detached");
    f.mvcc.keep_prev(PrevValues::All);
    let applied = f.put("k", "5");
    assert_eq!(
        applied.events[0].prev_kv.as_ref().map(|p| p.value.clone()),
        Some(b"4".to_vec())
    );
    // Kept for the keys some watcher's range holds, and only for those.
    f.mvcc
        .keep_prev(PrevValues::Within(Arc::new(vec![KeyRange::new(
            b"j", b"l",
        )])));
    let applied = f.put("k", "6");
    assert_eq!(
        applied.events[0].prev_kv.as_ref().map(|p| p.value.clone()),
        Some(b"5".to_vec())
    );
    let applied = f.put("other", "y");
    assert_eq!(applied.events[0].prev_kv, None, "outside every range");
}

/// One step of [`compaction_visits_only_what_it_must`].
#[derive(Clone, Debug)]
enum Step {
    Put(u8, u8),
    Delete(u8),
    DeleteFrom(u8),
    TxnPutTwo(u8, u8, u8),
    /// Compact at this fraction (in 1/8ths) of the way from the compact revision to the
    /// current one.
    Compact(u8),
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u8..6, any::<u8>()).prop_map(|(k, v)| Step::Put(k, v)),
        1 => (0u8..6).prop_map(Step::Delete),
        1 => (0u8..6).prop_map(Step::DeleteFrom),
        // Two distinct keys: a txn may not put one key twice.
        1 => (0u8..6, 1u8..6, any::<u8>()).prop_map(|(a, d, v)| Step::TxnPutTwo(a, (a + d) % 6, v)),
        2 => (1u8..=8).prop_map(Step::Compact),
    ]
}

fn step_command(step: &Step) -> Command {
    let key = |k: &u8| format!("k{k}");
    match step {
        Step::Put(k, v) => Command::Put(put_req(&key(k), &format!("v{v}"))),
        Step::Delete(k) => Command::DeleteRange(DeleteRangeRequest {
            key: key(k).into(),
            ..Default::default()
        }),
        Step::DeleteFrom(k) => Command::DeleteRange(DeleteRangeRequest {
            key: key(k).into(),
            range_end: vec![0],
            ..Default::default()
        }),
        Step::TxnPutTwo(a, b, v) => Command::Txn(TxnRequest {
            success: vec![
                op_put(&key(a), &format!("a{v}")),
                op_put(&key(b), &format!("b{v}")),
            ],
            ..Default::default()
        }),
        Step::Compact(_) => unreachable!("compactions are applied to the subject only"),
    }
}

proptest::proptest! {
    /// Compaction visits only the keys written since the last one; against a key space that
    /// never compacts, every read at or after the compact revision still gets the same answer,
    /// the backend holds exactly what the index lists, and a restart finds nothing left over.
    #[test]
    fn compaction_visits_only_what_it_must(steps in proptest::collection::vec(step(), 1..80)) {
        let mut subject = Fixture::default();
        let mut reference = Fixture::default();
        for step in &steps {
            if let Step::Compact(eighths) = step {
                let (from, to) = (subject.mvcc.compact_revision(), subject.mvcc.revision());
                let at = from + (to - from) * i64::from(*eighths) / 8;
                if at > from {
                    subject.apply(Command::Compact { revision: at });
                }
            } else {
                let cmd = step_command(step);
                subject.apply(cmd.clone());
                reference.apply(cmd);
            }
            let (from, to) = (subject.mvcc.compact_revision(), subject.mvcc.revision());
            for k in 0..6 {
                let key = format!("k{k}");
                for at in from.max(1)..=to {
                    proptest::prop_assert_eq!(
                        subject.get_at(&key, at),
                        reference.get_at(&key, at),
                        "{} at {} after {:?}", key, at, step
                    );
                }
            }
        }
        subject.assert_backend_holds_the_index();
        let (restored, leftover) = Mvcc::restore(&subject.backend).unwrap();
        proptest::prop_assert_eq!(&restored.index, &subject.mvcc.index);
        proptest::prop_assert!(leftover.removed.is_empty(), "left over: {:?}", leftover.removed);
    }
}

/// A range's answer is cut after the byte bound, with `more` set and the full count, in
/// key order and sorted alike; a page always holds at least one key.
#[test]
fn a_range_over_the_byte_bound_is_cut_with_more_set() {
    let mut f = Fixture::default();
    for i in 0..10 {
        f.apply(Command::Put(put_req(&format!("k/{i}"), &"v".repeat(100))));
    }
    let cut = |req: RangeRequest, max: usize| {
        f.mvcc
            .plan_range(&req)
            .unwrap()
            .execute(&|rev| f.backend.get(rev), max)
            .unwrap()
            .unwrap()
    };
    // Each key and value is 103 bytes: the third crosses 250.
    let r = cut(prefix("k/"), 250);
    assert_eq!((r.kvs.len(), r.more, r.count), (3, true, 10));
    assert_eq!(r.kvs[0].key, b"k/0");
    let descending = RangeRequest {
        sort_order: range_request::SortOrder::Descend as i32,
        sort_target: range_request::SortTarget::Key as i32,
        ..prefix("k/")
    };
    let r = cut(descending, 250);
    assert_eq!((r.kvs.len(), r.more), (3, true));
    assert_eq!(r.kvs[0].key, b"k/9");
    // keys_only counts the keys alone; a bound below one key still answers one.
    let keys = RangeRequest {
        keys_only: true,
        ..prefix("k/")
    };
    let r = cut(keys, 250);
    assert_eq!((r.kvs.len(), r.more), (10, false));
    let r = cut(prefix("k/"), 1);
    assert_eq!((r.kvs.len(), r.more), (1, true));
    let r = cut(prefix("k/"), usize::MAX);
    assert_eq!((r.kvs.len(), r.more), (10, false));
}
