//! Alarms raised by the members themselves: NOSPACE once the key space outgrows the quota,
//! and the corruption checks (a member whose key space differs from the others' stops at
//! start; the leader's periodic check names it with CORRUPT).

mod common;

use std::time::Duration;

use common::Cluster;
use flotilla_store::errors::{MvccError, StoreError};
use flotilla_store::mvcc::alarm::{Alarm, AlarmKind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_space_over_its_quota_raises_nospace() {
    // The quota: a little over what an empty member's database takes.
    let c = Cluster::start(3, |c| c.quota_backend_bytes = 4 * 1024 * 1024).await;
    let l = c.leader().await;
    let leader = c.node(l).clone();
    let value = "x".repeat(512 * 1024);
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let mut written = 0;
    let refused = loop {
        match leader
            .propose(common::put_cmd(&format!("big/{written}"), &value))
            .await
        {
            Ok(flotilla_store::mvcc::CommandResponse::Rejected(e)) => break e,
            Ok(_) => written += 1,
            Err(StoreError::Mvcc(e)) => break e,
            Err(e) => panic!("{e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no NOSPACE after {written} puts of 512 KiB"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused, MvccError::NoSpace);
    assert!(
        leader.alarms().iter().any(|a| a.kind == AlarmKind::NoSpace),
        "{:?}",
        leader.alarms()
    );
    // Deleting is still allowed.
    leader
        .propose(flotilla_store::mvcc::Command::DeleteRange(
            flotilla_proto::etcdserverpb::DeleteRangeRequest {
                key: b"big/".to_vec(),
                range_end: b"big0".to_vec(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    c.shutdown().await;
}

/// Replaces `from` by `to` (same length) wherever it is stored in a stopped member's key
/// space: a disk that changed a value under the member.
async fn tamper(dir: &std::path::Path, from: &[u8], to: &[u8]) {
    let deadline = tokio::time::Instant::now() + common::DEADLINE;
    let db = loop {
        match sled::open(dir.join("db")) {
            Ok(db) => break db,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let tree = db.open_tree("kv").unwrap();
    let mut changed = 0;
    for item in tree.iter() {
        let (k, v) = item.unwrap();
        if let Some(at) = v.windows(from.len()).position(|w| w == from) {
            let mut v = v.to_vec();
            v[at..at + from.len()].copy_from_slice(to);
            tree.insert(k, v).unwrap();
            changed += 1;
        }
    }
    assert!(changed > 0, "the value is stored");
    db.flush().unwrap();
}

/// Writes a marker value, stops a follower once it holds it, changes the value in its key
/// space on disk, and starts it again; the follower's index.
async fn damage_a_follower(c: &mut Cluster) -> usize {
    let l = c.leader().await;
    common::put(c.node(l), "victim", "ORIGINAL-VALUE-0123456789").await;
    let bad = (l + 1) % 3;
    common::eventually("the write reached every member", || {
        c.running()
            .iter()
            .all(|i| common::local_get(c.node(*i), "victim").unwrap().is_some())
    })
    .await;
    let dir = c.node(bad).config().data_dir.clone();
    c.stop(bad).await;
    tamper(
        &dir,
        b"ORIGINAL-VALUE-0123456789",
        b"TAMPERED-VALUE-0123456789",
    )
    .await;
    c.restart(bad).await;
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_key_space_was_changed_on_disk_stops_at_start() {
    // The leader's periodic check stays out of the way (the default 5 minutes): had it
    // compared the damaged member before that member's own check stopped it, it would have
    // raised CORRUPT and stopped writes cluster-wide, as the next test shows, and "the
    // others carry on" below would depend on which check ran first.
    let mut c = Cluster::start(3, |_| {}).await;
    // Restarted, it compares its key space with the others', finds it differs from both,
    // and stops.
    let bad = damage_a_follower(&mut c).await;
    let node = c.node(bad).clone();
    let mut fatal = node.fatal_signal();
    let reason = tokio::time::timeout(common::DEADLINE, fatal.wait_for(|f| f.is_some()))
        .await
        .expect("the damaged member stops")
        .unwrap()
        .clone()
        .unwrap();
    assert!(
        reason.contains("initial corruption check failed"),
        "{reason}"
    );
    // The others carry on.
    c.slots[bad].node = None;
    let l = c.leader().await;
    common::put(c.node(l), "after", "v").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_periodic_check_raises_corrupt_for_the_member_that_differs() {
    let mut c = Cluster::start(3, |c| {
        c.corrupt_check_interval = Duration::from_millis(500);
        c.initial_corrupt_check = false;
    })
    .await;
    let bad = damage_a_follower(&mut c).await;
    let bad_id = c.node(bad).id();
    let l = c.leader().await;
    let leader = c.node(l).clone();
    let expected = Alarm {
        member: bad_id,
        kind: AlarmKind::Corrupt,
    };
    common::eventually("CORRUPT is raised for the damaged member", || {
        leader.alarms().contains(&expected)
    })
    .await;
    assert_eq!(leader.alarms(), vec![expected]);
    // Writes stop cluster-wide.
    let r = leader.propose(common::put_cmd("more", "v")).await;
    assert!(
        matches!(
            r,
            Ok(flotilla_store::mvcc::CommandResponse::Rejected(
                MvccError::Corrupt
            )) | Err(StoreError::Mvcc(MvccError::Corrupt))
        ),
        "{r:?}"
    );
    c.shutdown().await;
}
