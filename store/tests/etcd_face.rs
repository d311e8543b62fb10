//! The etcd v3 face over real gRPC: headers, error codes and messages etcd clients match on,
//! watch streams (create, cancel, progress request), and hostile peer messages.

mod common;

use std::time::Duration;

use common::Cluster;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::lease_client::LeaseClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, Compare, LeaseKeepAliveRequest, LeaseRevokeRequest, LeaseTimeToLiveRequest,
    PutRequest, RangeRequest, RequestOp, StatusRequest, TxnRequest, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, compare, request_op, watch_request,
};
use flotilla_proto::raft::PeerMessage;
use flotilla_proto::raft::raft_peer_client::RaftPeerClient;
use flotilla_store::node::StoreNode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// Serves the etcd face of `node` on an ephemeral port and connects to it.
async fn serve(node: &StoreNode) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = flotilla_store::etcd::add_routes(tonic::service::Routes::default(), node);
    let mut stop = node.shutdown_signal();
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming_shutdown(
            routes,
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ),
    );
    connect(&addr.to_string()).await
}

/// A channel to a member's client or peer address.
async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn put(key: &str, value: &str) -> PutRequest {
    PutRequest {
        key: key.into(),
        value: value.into(),
        ..Default::default()
    }
}

async fn range_at(
    kv: &mut KvClient<Channel>,
    key: &str,
    revision: i64,
) -> Result<tonic::Response<flotilla_proto::etcdserverpb::RangeResponse>, tonic::Status> {
    kv.range(RangeRequest {
        key: key.into(),
        revision,
        ..Default::default()
    })
    .await
}

/// The exact code and message etcd clients match on.
fn assert_status(e: &tonic::Status, code: Code, message: &str) {
    assert_eq!((e.code(), e.message()), (code, message));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_headers_and_etcd_errors() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let follower = c.node((l + 1) % 3).clone();
    let ch = serve(&follower).await;
    let mut kv = KvClient::new(ch.clone());

    let r = kv.put(put("a", "1")).await.unwrap().into_inner();
    let h = r.header.unwrap();
    assert_eq!(h.cluster_id, follower.cluster_id());
    assert_eq!(h.member_id, follower.id());
    assert_eq!(h.raft_term, follower.term());
    // The write's revision; this member has it once it has caught up.
    assert_eq!(h.revision, 1);
    follower.read_barrier().await.unwrap();
    assert!(follower.kv().revision() >= h.revision);
    let mut p = put("a", "2");
    p.prev_kv = true;
    let r = kv.put(p).await.unwrap().into_inner();
    assert_eq!(r.prev_kv.unwrap().value, b"1");

    // A future revision, a compacted one, an empty key, a request too large.
    let rev = r.header.unwrap().revision;
    let e = range_at(&mut kv, "a", rev + 10).await.unwrap_err();
    assert_status(
        &e,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
    );
    kv.compact(CompactionRequest {
        revision: rev,
        physical: false,
    })
    .await
    .unwrap();
    let e = range_at(&mut kv, "a", rev - 1).await.unwrap_err();
    assert_status(
        &e,
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    let e = kv.put(put("", "x")).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    let big = "x".repeat(1536 * 1024 + 1);
    let e = kv.put(put("big", &big)).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "etcdserver: request is too large")
    );
    let r = kv
        .range(RangeRequest {
            key: "big".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().count, 0, "a refused request changes nothing");

    // A txn: compare on the value, nested range in the success branch.
    let t = TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Equal as i32,
            target: compare::CompareTarget::Value as i32,
            key: "a".into(),
            target_union: Some(compare::TargetUnion::Value("2".into())),
            ..Default::default()
        }],
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(put("b", "3"))),
            },
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: "a".into(),
                    range_end: "c".into(),
                    ..Default::default()
                })),
            },
        ],
        failure: vec![],
    };
    let r = kv.txn(t).await.unwrap().into_inner();
    assert!(r.succeeded);
    let Some(flotilla_proto::etcdserverpb::response_op::Response::ResponseRange(range)) =
        &r.responses[1].response
    else {
        panic!("nested range answered {:?}", r.responses[1])
    };
    assert_eq!(range.count, 2, "the nested range sees the txn's own put");

    let s = MaintenanceClient::new(ch)
        .status(StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.leader, c.node(l).id());
    assert!(s.raft_index > 0 && s.raft_applied_index > 0 && s.raft_term > 0);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_over_grpc() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let ch = serve(c.node((l + 1) % 3)).await;
    let mut lease = LeaseClient::new(ch.clone());
    let g = lease
        .lease_grant(flotilla_proto::etcdserverpb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .unwrap()
        .into_inner();
    assert!(g.id > 0 && g.ttl == 60);
    let (tx, rx) = mpsc::channel(4);
    let mut replies = lease
        .lease_keep_alive(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(LeaseKeepAliveRequest { id: g.id }).await.unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert_eq!((r.id, r.ttl), (g.id, 60));
    tx.send(LeaseKeepAliveRequest { id: 12345 }).await.unwrap();
    let r = replies.message().await.unwrap().unwrap();
    assert_eq!(r.ttl, 0, "an unknown lease answers TTL 0 on the stream");
    lease
        .lease_revoke(LeaseRevokeRequest { id: g.id })
        .await
        .unwrap();
    let e = lease
        .lease_revoke(LeaseRevokeRequest { id: g.id })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::NotFound, "etcdserver: requested lease not found")
    );
    let t = lease
        .lease_time_to_live(LeaseTimeToLiveRequest {
            id: g.id,
            keys: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.ttl, -1);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stream_create_events_cancel_and_progress() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let node = c.node((l + 1) % 3).clone();
    let ch = serve(&node).await;
    let mut kv = KvClient::new(ch.clone());
    let first = kv
        .put(put("w/1", "a"))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    kv.put(put("w/2", "b")).await.unwrap();

    let (tx, rx) = mpsc::channel(8);
    let mut stream = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let create = |id, start| WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: "w/".into(),
                range_end: "w0".into(),
                start_revision: start,
                prev_kv: true,
                watch_id: id,
                ..Default::default()
            },
        )),
    };
    tx.send(create(7, first)).await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(r.created && r.watch_id == 7);
    let mut revs = Vec::new();
    while revs.len() < 2 {
        let r = stream.message().await.unwrap().unwrap();
        assert_eq!(r.watch_id, 7);
        revs.extend(r.events.iter().map(|e| e.kv.as_ref().unwrap().mod_revision));
    }
    assert_eq!(revs, vec![first, first + 1]);
    // A second watch with the same id is refused; a progress request answers with a revision
    // up to which everything was delivered.
    tx.send(create(7, 0)).await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(r.canceled && r.watch_id == 7 && !r.cancel_reason.is_empty());
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::ProgressRequest(
            WatchProgressRequest {},
        )),
    })
    .await
    .unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert_eq!(r.watch_id, -1);
    assert!(r.header.unwrap().revision > first);
    // New writes arrive; after a cancel nothing more does.
    kv.put(put("w/3", "c")).await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert_eq!(r.events[0].kv.as_ref().unwrap().key, b"w/3");
    assert_eq!(r.events[0].prev_kv, None);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: 7 },
        )),
    })
    .await
    .unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(r.canceled && r.watch_id == 7);
    kv.put(put("w/4", "d")).await.unwrap();
    let next = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(next.is_err(), "no events after cancel: {next:?}");
    c.shutdown().await;
}

/// A member shutting down answers the calls it read on a pipe, then ends the pipe saying the
/// last call it read, so its callers know the later ones were never acted upon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_shutting_down_ends_its_pipes_naming_the_last_call_read() {
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let f = (l + 1) % 3;
    let addr = c.slots[f].peer_addr.clone();
    let (tx, rx) = mpsc::channel(8);
    let mut replies = RaftPeerClient::new(connect(&addr).await)
        .pipe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    use flotilla_store::codec;
    use flotilla_store::raft::network::{LAST_READ_CALL, WIRE_VERSION};
    use flotilla_store::raft::peer::Hello;
    // A member of the cluster's hello (a stranger's, without the cluster id, is refused).
    let hello = PeerMessage {
        cluster_id: c.node(f).cluster_id(),
        payload: codec::encode(&Hello {
            peer_addr: "127.0.0.1:1".into(),
        })
        .unwrap(),
        wire_version: WIRE_VERSION,
        call_id: 7,
        method: 5,
        ..Default::default()
    };
    tx.send(hello).await.unwrap();
    let r = replies.message().await.unwrap().expect("a reply");
    assert_eq!((r.call_id, r.error.as_str()), (7, ""));
    c.stop(f).await;
    let end = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("the pipe ends");
    let status = end.expect_err("ended with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get(LAST_READ_CALL)
            .map(|v| v.to_str().unwrap()),
        Some("7"),
        "{status:?}"
    );
    drop(tx);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peer_messages_are_refused_and_harmless() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let target = c.node(l).clone();
    let addr = &c.slots[l].peer_addr;
    let mut peer = RaftPeerClient::new(connect(addr).await);
    // A sender from before peer messages carried a version sends 0, which means version 1.
    let garbage = |cluster_id| PeerMessage {
        cluster_id,
        payload: vec![0xff; 64],
        error: String::new(),
        wire_version: 0,
        ..Default::default()
    };
    // Wrong cluster, then right cluster with undecodable payloads, on every method.
    let r = peer.append_entries(garbage(1)).await.unwrap().into_inner();
    assert!(r.error.contains("cluster id mismatch"), "{}", r.error);
    let ours = target.cluster_id();
    // Another version of the encoding is refused before anything is decoded, on every method,
    // with both versions named.
    use flotilla_store::raft::network::WIRE_VERSION;
    let future = || PeerMessage {
        wire_version: WIRE_VERSION + 1,
        ..garbage(ours)
    };
    for r in [
        peer.append_entries(future()).await,
        peer.vote(future()).await,
        peer.install_snapshot(future()).await,
        peer.leader(future()).await,
        peer.hello(future()).await,
    ] {
        let r = r.unwrap().into_inner();
        assert!(
            r.error.contains("peer protocol version mismatch")
                && r.error.contains(&format!("version {WIRE_VERSION},"))
                && r.error.contains(&format!("version {}", WIRE_VERSION + 1)),
            "{}",
            r.error
        );
        assert!(r.payload.is_empty());
    }
    for r in [
        peer.append_entries(garbage(ours)).await,
        peer.vote(garbage(ours)).await,
        peer.install_snapshot(garbage(ours)).await,
        peer.leader(garbage(ours)).await,
        peer.hello(garbage(0)).await,
    ] {
        let r = r.unwrap().into_inner();
        assert!(r.error.contains("undecodable"), "{}", r.error);
    }
    // Forwarded writes that decode but break the rules are refused; a valid one is applied.
    use flotilla_store::codec;
    use flotilla_store::mvcc::{Command, CommandResponse};
    use flotilla_store::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};
    let propose = |cmds: Vec<Command>| PeerMessage {
        cluster_id: ours,
        payload: codec::encode(&LeaderRequest::ProposeBatch(cmds)).unwrap(),
        error: String::new(),
        wire_version: WIRE_VERSION,
        ..Default::default()
    };
    let r = peer
        .leader(propose(vec![
            Command::Put(put("", "no key")),
            Command::Put(put("forwarded", "ok")),
            Command::Put(put("big", &"x".repeat(2 * 1024 * 1024))),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert!(r.error.is_empty(), "{}", r.error);
    assert_eq!(r.wire_version, WIRE_VERSION);
    let answer: Result<LeaderResponse, LeaderCallError> = codec::decode(&r.payload).unwrap();
    let Ok(LeaderResponse::ProposedBatch(answers)) = answer else {
        panic!("{answer:?}");
    };
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        matches!(&answers[0], Err(LeaderCallError::Refused(m)) if m.contains("key")),
        "{:?}",
        answers[0]
    );
    assert!(
        matches!(answers[1], Ok(CommandResponse::Put(_))),
        "{:?}",
        answers[1]
    );
    assert!(
        matches!(&answers[2], Err(LeaderCallError::Refused(m)) if m.contains("too large")),
        "{:?}",
        answers[2]
    );
    // A batch longer than any member sends is refused whole, and nothing of it applied.
    let many = (0..2000)
        .map(|i| Command::Put(put(&format!("many/{i}"), "v")))
        .collect();
    let r = peer.leader(propose(many)).await.unwrap().into_inner();
    let answer: Result<LeaderResponse, LeaderCallError> = codec::decode(&r.payload).unwrap();
    assert!(
        matches!(&answer, Err(LeaderCallError::Refused(m)) if m.contains("2000")),
        "{answer:?}"
    );
    assert_eq!(common::get(&target, "many/0").await.unwrap(), None);
    assert_eq!(
        common::get(&target, "forwarded").await.unwrap().as_deref(),
        Some("ok")
    );
    assert_eq!(common::get(&target, "big").await.unwrap(), None);
    // The pipe checks every message as the unary calls do, answers each with its call id,
    // and one bad message does not end it.
    let (tx, rx) = mpsc::channel(8);
    let mut replies = peer
        .pipe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let on_pipe = |msg: PeerMessage, call_id: u64, method: u32| PeerMessage {
        call_id,
        method,
        ..msg
    };
    tx.send(on_pipe(garbage(1), 11, 1)).await.unwrap();
    tx.send(on_pipe(future(), 12, 4)).await.unwrap();
    tx.send(on_pipe(garbage(ours), 13, 99)).await.unwrap();
    tx.send(on_pipe(garbage(ours), 14, 1)).await.unwrap();
    tx.send(on_pipe(
        propose(vec![Command::Put(put("piped", "ok"))]),
        15,
        4,
    ))
    .await
    .unwrap();
    let mut answers = std::collections::HashMap::new();
    while answers.len() < 5 {
        let r = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("a reply on the pipe")
            .unwrap()
            .expect("the pipe stays open");
        answers.insert(r.call_id, r);
    }
    assert!(
        answers[&11].error.contains("cluster id mismatch"),
        "{:?}",
        answers[&11]
    );
    assert!(
        answers[&12]
            .error
            .contains("peer protocol version mismatch"),
        "{:?}",
        answers[&12]
    );
    assert!(
        answers[&13].error.contains("unknown peer method 99"),
        "{:?}",
        answers[&13]
    );
    assert!(
        answers[&14].error.contains("undecodable"),
        "{:?}",
        answers[&14]
    );
    assert!(answers[&15].error.is_empty(), "{:?}", answers[&15]);
    let answer: Result<LeaderResponse, LeaderCallError> =
        codec::decode(&answers[&15].payload).unwrap();
    assert!(
        matches!(&answer, Ok(LeaderResponse::ProposedBatch(r)) if matches!(r[..], [Ok(CommandResponse::Put(_))])),
        "{answer:?}"
    );
    assert_eq!(
        common::get(&target, "piped").await.unwrap().as_deref(),
        Some("ok")
    );
    drop(tx);
    // The member still leads and serves.
    common::put(&target, "still", "alive").await;
    assert_eq!(c.leader().await, l);
    c.shutdown().await;
}

/// etcd's alarms through the Maintenance service, as `etcdctl alarm list|disarm` use them:
/// NOSPACE refuses puts, writing txns and lease grants with etcd's code and words, and lets
/// reads, deletes and compaction through; CORRUPT refuses every write; disarming lifts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_refuse_writes_as_etcd_does_until_disarmed() {
    use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
    use flotilla_proto::etcdserverpb::{
        AlarmMember, AlarmRequest, DeleteRangeRequest, LeaseGrantRequest,
    };
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let follower = c.node((l + 1) % 3).clone();
    let ch = serve(&follower).await;
    let (mut kv, mut m) = (
        KvClient::new(ch.clone()),
        MaintenanceClient::new(ch.clone()),
    );
    let mut lease = LeaseClient::new(ch);
    kv.put(put("a", "1")).await.unwrap();
    let alarm = |action: AlarmAction, member, alarm| AlarmRequest {
        action: action as i32,
        member_id: member,
        alarm,
    };
    let id = follower.id();
    let raised = m
        .alarm(alarm(AlarmAction::Activate, id, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        raised.alarms,
        vec![AlarmMember {
            member_id: id,
            alarm: 1
        }]
    );
    // Raising it again changes nothing; every member knows it.
    let again = m.alarm(alarm(AlarmAction::Activate, id, 1)).await.unwrap();
    assert!(again.into_inner().alarms.is_empty());
    common::eventually("every member has the alarm", || {
        c.running().iter().all(|i| c.node(*i).alarms().len() == 1)
    })
    .await;
    let listed = m.alarm(alarm(AlarmAction::Get, 0, 0)).await.unwrap();
    assert_eq!(listed.into_inner().alarms.len(), 1);
    let status = m.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        status.errors.iter().any(|e| e.contains("NOSPACE")),
        "{:?}",
        status.errors
    );

    let refused = kv.put(put("b", "2")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.message(),
        "etcdserver: mvcc: database space exceeded"
    );
    let writing_txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestPut(put("c", "3"))),
        }],
        ..Default::default()
    };
    let refused = kv.txn(writing_txn.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let refused = lease
        .lease_grant(LeaseGrantRequest { ttl: 10, id: 0 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // Reads, read-only txns and deletes still go, so space can be freed.
    let got = kv
        .range(RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    let reading_txn = TxnRequest {
        success: vec![RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: b"a".to_vec(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    kv.txn(reading_txn).await.unwrap();
    kv.delete_range(DeleteRangeRequest {
        key: b"a".to_vec(),
        ..Default::default()
    })
    .await
    .unwrap();

    // CORRUPT refuses every write, deletes too.
    m.alarm(alarm(AlarmAction::Activate, id, 2)).await.unwrap();
    let refused = kv
        .delete_range(DeleteRangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::DataLoss, "etcdserver: corrupt cluster")
    );

    // `alarm disarm`: list, then deactivate each.
    for a in m
        .alarm(alarm(AlarmAction::Get, 0, 0))
        .await
        .unwrap()
        .into_inner()
        .alarms
    {
        let r = m
            .alarm(alarm(AlarmAction::Deactivate, a.member_id, a.alarm))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.alarms, vec![a]);
    }
    kv.txn(writing_txn).await.unwrap();
    kv.put(put("b", "2")).await.unwrap();
    assert!(c.node(l).alarms().is_empty());
    c.shutdown().await;
}

/// Concurrent full-key-space ranges, each over the byte bound: every answer is cut with
/// `more` set and the full count (or, past the wait for admission, refused as "too many
/// requests"), and paging with the last key reads every key once. (That such a storm moves
/// no leader is `cli/tests/etcdctl.rs`'s, with members in processes of their own.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_full_ranges_are_cut_at_the_byte_bound_and_page_through() {
    const KEYS: usize = 8_000;
    let c = Cluster::start(3, |c| c.max_range_response_bytes = 1024 * 1024).await;
    let l = c.leader().await;
    let leader = c.node(l).clone();
    let value = "v".repeat(1000);
    let writers = (0..16).map(|w| {
        let (node, value) = (leader.clone(), value.clone());
        tokio::spawn(async move {
            for i in (w..KEYS).step_by(16) {
                node.propose(common::put_cmd(&format!("storm/{i:05}"), &value))
                    .await
                    .unwrap();
            }
        })
    });
    for w in futures::future::join_all(writers).await {
        w.unwrap();
    }
    let (term, leader_id) = (leader.term(), leader.id());
    let storm_until = tokio::time::Instant::now() + Duration::from_secs(3);
    let readers = c.running().into_iter().flat_map(|i| {
        let node = c.node(i).clone();
        (0..3).map(move |_| {
            let node = node.clone();
            tokio::spawn(async move {
                let ch = serve(&node).await;
                let mut kv = KvClient::new(ch).max_decoding_message_size(64 * 1024 * 1024);
                let mut reads = 0;
                while tokio::time::Instant::now() < storm_until {
                    let r = kv
                        .range(RangeRequest {
                            key: b"storm/".to_vec(),
                            range_end: b"storm0".to_vec(),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            let r = r.into_inner();
                            assert!(r.more && r.count == KEYS as i64, "{} {}", r.more, r.count);
                            assert!(r.kvs.len() < KEYS / 4, "{}", r.kvs.len());
                            reads += 1;
                        }
                        // Admission: a large read that waited too long is refused.
                        Err(s) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
                    }
                }
                reads
            })
        })
    });
    let reads: Vec<usize> = futures::future::join_all(readers.collect::<Vec<_>>())
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(reads.iter().sum::<usize>() > 0, "{reads:?}");
    for i in c.running() {
        assert_eq!(
            (c.node(i).leader(), c.node(i).term()),
            (Some(leader_id), term),
            "the read storm changed the leader"
        );
    }
    // Paging with the last key reads every key once.
    let mut kv = KvClient::new(serve(&leader).await).max_decoding_message_size(64 * 1024 * 1024);
    let (mut start, mut seen) = (b"storm/".to_vec(), 0);
    loop {
        let r = kv
            .range(RangeRequest {
                key: start.clone(),
                range_end: b"storm0".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen += r.kvs.len();
        if !r.more {
            break;
        }
        start = r.kvs.last().unwrap().key.clone();
        start.push(0);
    }
    assert_eq!(seen, KEYS);
    c.shutdown().await;
}
