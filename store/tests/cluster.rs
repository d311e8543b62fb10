//! Three-member clusters in one process: failover, catch-up by log and by snapshot,
//! membership changes under load, linearizable reads across leader changes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Cluster, eventually, get, local_get, put};
use flotilla_store::errors::StoreError;
use flotilla_store::mvcc::CommandResponse;
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_new_leader_and_writes_continue() {
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let other = (l + 1) % 3;
    put(c.node(other), "before", "1").await;
    let old_term = c.node(other).term();
    c.stop(l).await;
    let started = Instant::now();
    put(c.node(other), "after", "2").await;
    eprintln!(
        "writes resumed {:?} after the leader stopped",
        started.elapsed()
    );
    let new_leader = c.leader().await;
    assert_ne!(new_leader, l);
    assert!(c.node(other).term() > old_term);
    for i in c.running() {
        assert_eq!(
            get(c.node(i), "before").await.unwrap().as_deref(),
            Some("1")
        );
        assert_eq!(get(c.node(i), "after").await.unwrap().as_deref(), Some("2"));
    }
    // The old leader comes back as a follower with everything.
    c.restart(l).await;
    let node = c.node(l).clone();
    eventually("the old leader catches up", || {
        local_get(&node, "after").ok().flatten().as_deref() == Some("2")
    })
    .await;
    c.shutdown().await;
}

/// Issue 43: on a starved machine no answer to an AppendEntries came back within openraft's
/// deadline for it (the heartbeat interval, 100 ms); openraft sent the same entries again and
/// gave up on them again, forever, so the leader never learnt that a quorum held them and
/// nothing was committed. Here every answer from the followers comes back 300 ms late: the
/// retries join the call in flight, its answer reaches the one waiting, and writes commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_commit_while_every_answer_comes_later_than_a_heartbeat() {
    let c = Cluster::start(3, |cfg| cfg.request_timeout = Duration::from_secs(5)).await;
    let l = c.leader().await;
    put(c.node(l), "before", "0").await;
    let (leader, term) = (c.node(l).clone(), c.node(l).term());
    c.partition
        .slow_answers(leader.id(), &c.ids(), Duration::from_millis(300));
    let started = Instant::now();
    for i in 0..5 {
        if let Err(e) = leader.propose(common::put_cmd(&format!("k{i}"), "v")).await {
            panic!("write {i} was not committed while answers came 300 ms late: {e}");
        }
    }
    eprintln!(
        "5 writes committed in {:?} with every answer 300 ms late",
        started.elapsed()
    );
    assert_eq!(leader.term(), term, "the leader kept its term");
    for i in c.running() {
        let node = c.node(i).clone();
        eventually("every member applies the writes", || {
            local_get(&node, "k4").ok().flatten().as_deref() == Some("v")
        })
        .await;
    }
    c.partition.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_restarted_catches_up_by_log() {
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let f = (l + 1) % 3;
    c.stop(f).await;
    for i in 0..50 {
        put(c.node(l), &format!("k{i}"), &i.to_string()).await;
    }
    c.restart(f).await;
    let node = c.node(f).clone();
    eventually("the follower replays the log", || {
        local_get(&node, "k49").ok().flatten().as_deref() == Some("49")
    })
    .await;
    assert!(node.metrics().snapshot.is_none(), "no snapshot was needed");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_far_behind_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, |cfg| {
        cfg.snapshot_entries = 100;
        cfg.keep_logs = 10;
    })
    .await;
    let l = c.leader().await;
    let f = (l + 1) % 3;
    c.stop(f).await;
    for i in 0..400 {
        put(c.node(l), &format!("k{}", i % 50), &i.to_string()).await;
    }
    let leader = c.node(l).clone();
    eventually("the leader snapshots and purges its log", || {
        let m = leader.metrics();
        m.snapshot.is_some() && m.purged.is_some_and(|p| p.index > 100)
    })
    .await;
    c.restart(f).await;
    let node = c.node(f).clone();
    eventually("the follower installs a snapshot and catches up", || {
        local_get(&node, "k49").ok().flatten().as_deref() == Some("399")
    })
    .await;
    // openraft reports the snapshot once the install is done; the key space shows it first.
    eventually(
        "the follower reports the snapshot it caught up through",
        || node.metrics().snapshot.is_some(),
    )
    .await;
    assert_eq!(node.kv().revision(), leader.kv().revision());
    assert_eq!(
        node.kv().hash(0).unwrap(),
        leader.kv().hash(0).unwrap(),
        "the follower's key space is the leader's"
    );
    // It keeps following after the install.
    put(c.node(l), "later", "x").await;
    eventually("the follower applies entries after the snapshot", || {
        local_get(&node, "later").ok().flatten().as_deref() == Some("x")
    })
    .await;
    c.shutdown().await;
}

/// Snapshots after start-up (positions, backups) never touch a snapshot file being written or
/// received: a `.tmp` file in the snapshot directory is work in progress, and deleting it
/// under a build stopped the member's Raft core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_leave_files_in_progress_alone() {
    let c = Cluster::start(3, |cfg| cfg.snapshot_entries = 50).await;
    let l = c.leader().await;
    let node = c.node(l).clone();
    let in_progress = node.config().data_dir.join("snapshots").join("build-1.tmp");
    std::fs::write(&in_progress, b"half a snapshot").unwrap();
    for i in 0..120 {
        put(c.node(l), &format!("k{i}"), "v").await;
    }
    eventually("a snapshot", || node.snapshot_info().1.is_some()).await;
    assert_eq!(node.snapshot_info().0, 0, "no file was needed yet");
    let (header, _file) = node.export_snapshot().await.unwrap();
    assert!(header.revision >= 120);
    assert!(node.snapshot_info().0 > 0, "the backup's file is counted");
    assert!(
        in_progress.exists(),
        "a snapshot deleted a file in progress"
    );
    c.shutdown().await;
}

/// The key space is the snapshot: a member keeps no snapshot file at rest, writes one only
/// for a member the log cannot catch up (or a backup), and drops it once a newer snapshot
/// position passes it. A backup's file has no name once it is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_files_exist_only_while_needed() {
    let mut c = Cluster::start(3, |cfg| {
        cfg.snapshot_entries = 50;
        cfg.keep_logs = 10;
    })
    .await;
    let l = c.leader().await;
    let leader = c.node(l).clone();
    let snapshots = leader.config().data_dir.join("snapshots");
    let listing = |dir: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let files = || listing(&snapshots).len();
    // openraft purges once no replication is using the entries, at its next event: write
    // until it has.
    for i in 0.. {
        put(&leader, &format!("k{}", i % 120), "v").await;
        if i >= 120 && leader.metrics().purged.is_some_and(|p| p.index > 50) {
            break;
        }
        assert!(i < 10_000, "the leader never purged its log");
    }
    assert_eq!(files(), 0, "a snapshot position wrote a file");
    let (header, _file) = leader.export_snapshot().await.unwrap();
    assert!(header.revision >= 120);
    assert_eq!(files(), 0, "the backup's file kept its name");

    // A follower far behind is sent a file, written for it.
    let f = (l + 1) % 3;
    c.stop(f).await;
    let stopped_at = leader.metrics().last_applied.map_or(0, |l| l.index);
    for i in 0.. {
        put(&leader, &format!("k{}", i % 20), "w").await;
        if leader
            .metrics()
            .purged
            .is_some_and(|p| p.index > stopped_at + 20)
        {
            break;
        }
        assert!(
            i < 10_000,
            "the leader never purged past the stopped follower"
        );
    }
    c.restart(f).await;
    let follower = c.node(f).clone();
    eventually("the follower catches up", || {
        follower.kv().revision() == leader.kv().revision()
    })
    .await;
    eventually(
        "the follower reports the snapshot it caught up through",
        || follower.metrics().snapshot.is_some(),
    )
    .await;
    assert!(
        leader.snapshot_info().0 > 0,
        "the leader wrote a file for it"
    );
    let follower_dir = follower.config().data_dir.join("snapshots");
    eventually("the follower drops the file it installed", || {
        listing(&follower_dir).is_empty()
    })
    .await;
    // The next snapshot position passes the file the leader wrote: it goes.
    for i in 0..100 {
        put(&leader, &format!("k{}", i % 20), "x").await;
    }
    eventually("the leader drops the file it wrote", || files() == 0).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_read_after_leader_change_sees_every_acknowledged_write() {
    let c = Cluster::start(3, |cfg| cfg.request_timeout = Duration::from_secs(2)).await;
    for round in 0..3 {
        let l = c.leader().await;
        let value = format!("v{round}");
        put(c.node(l), "register", &value).await;
        // Isolate the leader; a new one is elected among the others. A read through any
        // member of the majority must see the acknowledged value, never an older one.
        let ids = c.ids();
        c.partition.isolate(c.node(l).id(), &ids);
        let others: Vec<usize> = c.running().into_iter().filter(|i| *i != l).collect();
        let deadline = Instant::now() + common::DEADLINE;
        for i in &others {
            loop {
                match get(c.node(*i), "register").await {
                    Ok(v) => {
                        assert_eq!(
                            v.as_deref(),
                            Some(value.as_str()),
                            "stale read via member {i}"
                        );
                        break;
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "no read served: {e}");
                    }
                }
            }
        }
        // The isolated old leader must not serve a linearizable read either.
        match get(c.node(l), "register").await {
            Err(StoreError::Timeout(_) | StoreError::NoLeader(_)) => {}
            Ok(v) => assert_eq!(v.as_deref(), Some(value.as_str())),
            Err(e) => panic!("unexpected error {e}"),
        }
        c.partition.heal();
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_load_lose_no_write() {
    let mut c = Cluster::start(3, |_| {}).await;
    let writer_node = c.node(c.leader().await).clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let node = writer_node.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load-{i}");
                match node.propose(common::put_cmd(&key, "x")).await {
                    Ok(CommandResponse::Put(_)) => acked.push(key),
                    Ok(other) => panic!("unexpected {other:?}"),
                    Err(StoreError::NoLeader(_) | StoreError::Timeout(_)) => {}
                    Err(e) => panic!("write failed: {e}"),
                }
                i += 1;
            }
            acked
        })
    };
    // Add a learner, start it, promote it once caught up.
    let (n4, listener) = c.add_slot("n4").await;
    let peer = c.slots[n4].peer_addr.clone();
    let id = c
        .node(0)
        .add_member(peer, true)
        .await
        .expect("learner added");
    c.join(n4, listener).await;
    let node0 = c.node(0).clone();
    eventually("the learner publishes its name", || {
        node0
            .members()
            .iter()
            .any(|m| m.id == id && m.member.name == "n4" && m.is_learner)
    })
    .await;
    let deadline = Instant::now() + common::DEADLINE;
    loop {
        match c.node(0).promote_member(id).await {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "promotion never succeeded: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(
        c.node(0)
            .members()
            .iter()
            .any(|m| m.id == id && !m.is_learner)
    );
    // Remove a follower that is not the writer's member, and stop it.
    let victim = (0..3)
        .find(|i| c.node(*i).id() != writer_node.id())
        .unwrap();
    let victim_id = c.node(victim).id();
    c.node(n4)
        .remove_member(victim_id)
        .await
        .expect("member removed");
    c.stop(victim).await;
    // The change is committed once a quorum has it; n4 may append it a moment later.
    c.eventually("n4 sees three members", |c| c.node(n4).members().len() == 3)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(
        acked.len() > 10,
        "the writer made progress ({})",
        acked.len()
    );
    let new_member = c.node(n4).clone();
    for key in &acked {
        assert_eq!(
            get(&new_member, key).await.unwrap().as_deref(),
            Some("x"),
            "{key} lost"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restarts_from_its_data_dirs() {
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    for i in 0..20 {
        put(c.node(l), &format!("k{i}"), "v").await;
    }
    let rev = c.node(l).kv().revision();
    for i in 0..3 {
        c.stop(i).await;
    }
    for i in 0..3 {
        c.restart(i).await;
    }
    let l = c.leader().await;
    assert_eq!(get(c.node(l), "k19").await.unwrap().as_deref(), Some("v"));
    assert!(c.node(l).kv().revision() >= rev);
    c.shutdown().await;
}

/// Concurrent compare-and-swap increments: the proposal batcher puts many of them in one log
/// entry, and each must see the writes of those before it, so the counter ends equal to the
/// number of increments that succeeded, and no two succeeded from the same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_compare_and_swap_increments_are_never_lost() {
    use flotilla_proto::etcdserverpb::{
        Compare, RangeRequest, RequestOp, TxnRequest, compare, request_op,
    };
    use flotilla_store::mvcc::Command;

    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    put(c.node(l), "counter", "0").await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let node = c.node(t % 3).clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for _ in 0..20 {
                loop {
                    node.read_barrier().await.unwrap();
                    let r = node
                        .kv()
                        .range(&RangeRequest {
                            key: b"counter".to_vec(),
                            ..Default::default()
                        })
                        .unwrap();
                    let kv = &r.kvs[0];
                    let n: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap();
                    let txn = TxnRequest {
                        compare: vec![Compare {
                            result: compare::CompareResult::Equal as i32,
                            target: compare::CompareTarget::Mod as i32,
                            key: b"counter".to_vec(),
                            target_union: Some(compare::TargetUnion::ModRevision(kv.mod_revision)),
                            ..Default::default()
                        }],
                        success: vec![RequestOp {
                            request: Some(request_op::Request::RequestPut(
                                flotilla_proto::etcdserverpb::PutRequest {
                                    key: b"counter".to_vec(),
                                    value: (n + 1).to_string().into_bytes(),
                                    ..Default::default()
                                },
                            )),
                        }],
                        failure: vec![],
                    };
                    match node.propose(Command::Txn(txn)).await.unwrap() {
                        CommandResponse::Txn(r) if r.succeeded => {
                            won.push(n);
                            break;
                        }
                        CommandResponse::Txn(_) => continue,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            won
        }));
    }
    let mut from: Vec<u64> = Vec::new();
    for t in tasks {
        from.extend(t.await.unwrap());
    }
    from.sort_unstable();
    let expected: Vec<u64> = (0..320).collect();
    assert_eq!(
        from, expected,
        "every increment started from a distinct value"
    );
    assert_eq!(
        get(c.node(l), "counter").await.unwrap().as_deref(),
        Some("320")
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_a_follower_each_get_their_own_answer() {
    use flotilla_proto::etcdserverpb::PutRequest;
    use flotilla_store::errors::MvccError;
    use flotilla_store::mvcc::Command;

    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let f = c.node((l + 1) % 3).clone();
    // Concurrent writes through a follower: every other one names a lease that does not
    // exist, so the leader rejects it while applying the others (often in the same batch).
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let f = f.clone();
            tokio::spawn(async move {
                let cmd = Command::Put(PutRequest {
                    key: format!("fwd/{i:02}").into_bytes(),
                    value: format!("v{i}").into_bytes(),
                    lease: if i % 2 == 1 { 0x5eed } else { 0 },
                    ..Default::default()
                });
                (i, f.propose(cmd).await)
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match (i % 2, r) {
            (0, Ok(CommandResponse::Put(p))) => {
                revisions.push(p.header.expect("a put answer has a header").revision)
            }
            (1, Err(StoreError::Mvcc(MvccError::LeaseNotFound(0x5eed)))) => {}
            (_, other) => panic!("write {i} was answered {other:?}"),
        }
    }
    revisions.sort_unstable();
    revisions.dedup();
    assert_eq!(
        revisions.len(),
        32,
        "each applied write got its own revision"
    );
    for i in (0..64).step_by(2) {
        assert_eq!(
            get(c.node(l), &format!("fwd/{i:02}")).await.unwrap(),
            Some(format!("v{i}"))
        );
    }
    for i in (1..64).step_by(2) {
        assert_eq!(get(c.node(l), &format!("fwd/{i:02}")).await.unwrap(), None);
    }
    c.shutdown().await;
}

/// A leader cut off by a blackhole route (calls to it hang instead of failing) holds on to the
/// writes already sent to it, but not to the others: once a follower knows the new leader, the
/// writes it forwards go there at once, instead of waiting for the calls stuck on the old
/// leader to reach their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_writes_move_to_the_new_leader_without_waiting_for_the_old() {
    const TIMEOUT: Duration = Duration::from_secs(20);
    let c = Cluster::start(3, |cfg| cfg.request_timeout = TIMEOUT).await;
    let ids = c.ids();
    let l = c.leader().await;
    let fi = (l + 1) % 3;
    let f = c.node(fi).clone();
    // Enough writers through the follower to keep every forwarding call it may have in
    // flight busy when the leader drops off.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let (f, stop, acked) = (f.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let cmd = common::put_cmd(&format!("bh/{w}"), &i.to_string());
                    if f.propose(cmd).await.is_ok() {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    eventually("writes through the follower are acknowledged", || {
        acked.load(Ordering::Relaxed) >= 200
    })
    .await;

    let cut = Instant::now();
    c.partition.blackhole(ids[l], &ids);
    // Writes arriving one by one until the election: each one a call of its own into the
    // blackhole while the follower still believes in the old leader.
    let mut trickle = Vec::new();
    while f.leader() == Some(ids[l]) {
        assert!(
            cut.elapsed() < common::DEADLINE,
            "no new leader was elected"
        );
        let f = f.clone();
        let n = trickle.len();
        trickle.push(tokio::spawn(async move {
            let _ = f
                .propose(common::put_cmd("bh/trickle", &n.to_string()))
                .await;
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the follower knows a new leader", || {
        f.leader().is_some_and(|n| n != ids[l])
    })
    .await;
    let elected = cut.elapsed();
    let started = Instant::now();
    let r = f.propose(common::put_cmd("bh/after", "1")).await;
    let took = started.elapsed();
    assert!(
        r.is_ok(),
        "a write through the follower after the failover failed: {r:?}"
    );
    assert!(
        took < TIMEOUT / 2,
        "a write through the follower took {took:?} after the new leader was known \
         ({elected:?} after the cut): it waited for the calls stuck on the old leader"
    );
    let before = acked.load(Ordering::Relaxed);
    eventually("the writers go on through the new leader", || {
        acked.load(Ordering::Relaxed) >= before + 100
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    // The writers whose calls went into the blackhole would wait out their deadline.
    for w in writers.iter().chain(&trickle) {
        w.abort();
    }
    c.partition.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_keeps_the_configured_window() {
    let c = Cluster::start(3, |cfg| {
        cfg.compaction_retention = 20;
        cfg.compaction_interval = Duration::from_millis(100);
    })
    .await;
    let l = c.leader().await;
    for i in 0..60 {
        put(c.node(l), "k", &i.to_string()).await;
    }
    // The leader has applied every write it acknowledged; a follower may still be behind.
    let rev = c.node(l).kv().revision();
    let node = c.node((l + 1) % 3).clone();
    eventually(
        "history older than the window is compacted on every member",
        || node.kv().compact_revision() >= rev - 20,
    )
    .await;
    assert!(
        node.kv().compact_revision() <= rev - 20 + 1,
        "the window is kept"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_apply_only_under_their_leaders_term() {
    use flotilla_store::errors::MvccError;
    use flotilla_store::mvcc::Command;
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let term = c.node(l).term();
    let fenced = |term: u64, key: &str| Command::Fenced {
        term,
        cmd: Box::new(common::put_cmd(key, "v")),
    };
    // Under the leader of its term (proposed here or forwarded from a follower): applied.
    for i in 0..3 {
        let r = c
            .node(i)
            .propose(fenced(term, &format!("ok-{i}")))
            .await
            .unwrap();
        assert!(matches!(r, CommandResponse::Put(_)), "{r:?}");
    }
    // Made for an earlier term: refused, nothing written.
    let r = c.node(l).propose(fenced(term - 1, "stale")).await;
    assert!(
        matches!(r, Err(StoreError::Mvcc(MvccError::Fenced { required, actual })) if required == term - 1 && actual == term),
        "{r:?}"
    );
    assert_eq!(get(c.node(l), "stale").await.unwrap(), None);
    // After the leader dies, a write fenced to its term is refused by the next leader.
    c.stop(l).await;
    let other = c.leader().await;
    assert_ne!(other, l);
    let r = c.node(other).propose(fenced(term, "late")).await;
    assert!(
        matches!(r, Err(StoreError::Mvcc(MvccError::Fenced { .. }))),
        "{r:?}"
    );
    assert_eq!(get(c.node(other), "late").await.unwrap(), None);
    c.shutdown().await;
}

/// PreVote: a member cut off for longer than several election timeouts does not raise its
/// term (its pre-votes are not granted), so, heard again, it follows the leader instead of
/// deposing it; the cluster's leader and term never change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cut_off_for_a_while_rejoins_without_deposing_the_leader() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let leader = c.node(l).clone();
    let (leader_id, term) = (leader.id(), leader.term());
    let cut = (l + 1) % 3;
    let cut_id = c.node(cut).id();
    put(&leader, "before", "1").await;
    c.partition.isolate(cut_id, &c.ids());
    // Five seconds: about eight election timeouts.
    let until = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while Instant::now() < until {
        put(&leader, &format!("during/{i}"), "v").await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.node(cut).term(),
        term,
        "the cut-off member raised its term"
    );
    c.partition.heal();
    put(&leader, "after", "1").await;
    let node = c.node(cut).clone();
    eventually("the member catches up", || {
        local_get(&node, "after").ok().flatten().is_some()
    })
    .await;
    for i in c.running() {
        assert_eq!(
            (c.node(i).leader(), c.node(i).term()),
            (Some(leader_id), term),
            "{}",
            c.node(i).name()
        );
    }
    c.shutdown().await;
}

/// A member's publication of its attributes that races its removal never brings it back:
/// changes are served one at a time, each checked against what the last one left. (A
/// publication waiting behind the removal once re-added the removed member as a learner.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_is_not_brought_back_by_its_own_publication() {
    use flotilla_store::types::Member;
    let c = Cluster::start(3, |_| {}).await;
    let leader = c.node(c.leader().await).clone();
    for round in 0..20 {
        let addr = format!("127.0.0.1:{}", 1 + round);
        let id = leader.add_member(addr.clone(), true).await.unwrap();
        let member = Member {
            name: format!("gone{round}"),
            peer_addr: addr,
            client_addr: "127.0.0.1:9".into(),
        };
        let (removed, published) =
            tokio::join!(leader.remove_member(id), leader.update_member(id, member));
        removed.unwrap();
        // Published before the removal, or refused after it: either way, it is gone.
        if let Err(e) = published {
            assert!(e.to_string().contains("member not found"), "{e}");
        }
        assert!(
            leader.members().iter().all(|m| m.id != id),
            "round {round}: the removed member is back: {:?}",
            leader
                .members()
                .iter()
                .map(|m| &m.member.name)
                .collect::<Vec<_>>()
        );
    }
    c.shutdown().await;
}
