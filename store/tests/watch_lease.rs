//! Watches and leases on a live cluster: ordering and exactly-once delivery through catch-up,
//! compaction, slow watchers, progress; lease expiry decided by the leader, across failover.

mod common;

use std::time::Duration;

use common::{Cluster, eventually, local_get, put};
use flotilla_proto::etcdserverpb::PutRequest;
use flotilla_store::errors::{MvccError, StoreError};
use flotilla_store::mvcc::{Command, KeyRange};
use flotilla_store::watch::{WatchOutput, WatchSpec};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

fn spec(id: i64, prefix: &str, start: i64) -> WatchSpec {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().unwrap() += 1;
    WatchSpec {
        id,
        range: KeyRange::new(prefix.as_bytes(), &end),
        start,
        prev_kv: true,
        no_put: false,
        no_delete: false,
        progress_notify: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_get_every_revision_once_in_order_through_catch_up() {
    // A tiny ring forces watchers to fall back to history while writes keep coming.
    let c = Cluster::start(3, |cfg| {
        cfg.watch.ring_capacity = 4;
        cfg.watch.history_batch = 7;
    })
    .await;
    let l = c.leader().await;
    let follower = c.node((l + 1) % 3).clone();
    for i in 0..100 {
        put(c.node(l), &format!("w/{}", i % 10), &i.to_string()).await;
    }
    // One watcher starts in the past (on a follower), one from now on (on the leader).
    let (tx1, mut rx1) = mpsc::channel(1);
    let (ctl1, _c1) = mpsc::unbounded_channel();
    let _w1 = follower.kv().watch(spec(1, "w/", 1), tx1, ctl1);
    let (tx2, mut rx2) = mpsc::channel(1);
    let (ctl2, _c2) = mpsc::unbounded_channel();
    let start2 = c.node(l).kv().revision() + 1;
    let _w2 = c.node(l).kv().watch(spec(2, "w/", start2), tx2, ctl2);
    let writer = {
        let node = c.node(l).clone();
        tokio::spawn(async move {
            for i in 100..400 {
                put(&node, &format!("w/{}", i % 10), &i.to_string()).await;
            }
        })
    };
    let last = async {
        writer.await.unwrap();
        c.node(l).kv().revision()
    }
    .await;
    for (rx, from) in [(&mut rx1, 1), (&mut rx2, start2)] {
        let mut expect = from;
        while expect <= last {
            let out = timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("events keep coming")
                .unwrap();
            let WatchOutput::Events { events, .. } = out else {
                panic!("unexpected {out:?}")
            };
            for e in events {
                let kv = e.kv.unwrap();
                assert_eq!(kv.mod_revision, expect, "gap or duplicate");
                if kv.version > 1 {
                    assert!(e.prev_kv.is_some(), "prev kv requested");
                }
                expect += 1;
            }
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_is_canceled_with_the_compact_revision() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    for i in 0..10 {
        put(c.node(l), "c/k", &i.to_string()).await;
    }
    let node = c.node(l).clone();
    node.propose(Command::Compact { revision: 6 })
        .await
        .unwrap();
    let (tx, _rx) = mpsc::channel(8);
    let (ctl, mut ctl_rx) = mpsc::unbounded_channel();
    let _w = node.kv().watch(spec(9, "c/", 2), tx, ctl);
    let out = timeout(Duration::from_secs(5), ctl_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            out,
            WatchOutput::Canceled {
                watch_id: 9,
                compact_revision: 6,
                ..
            }
        ),
        "{out:?}"
    );
    // And a range at the compacted revision fails the same way.
    let err = node
        .kv()
        .range(&flotilla_proto::etcdserverpb::RangeRequest {
            key: b"c/k".to_vec(),
            revision: 3,
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(
        err,
        StoreError::Mvcc(MvccError::Compacted {
            compact_revision: 6
        })
    ));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_canceled_and_blocks_no_one() {
    let c = Cluster::start(3, |cfg| {
        cfg.watch.send_timeout = Duration::from_millis(300);
        cfg.watch.ring_capacity = 8;
    })
    .await;
    let l = c.leader().await;
    let node = c.node(l).clone();
    // The slow watcher's stream holds one response and is never read.
    let (slow_tx, _slow_rx) = mpsc::channel(1);
    let (slow_ctl, mut slow_ctl_rx) = mpsc::unbounded_channel();
    let _slow = node.kv().watch(spec(1, "s/", 1), slow_tx, slow_ctl);
    let (fast_tx, mut fast_rx) = mpsc::channel(1024);
    let (fast_ctl, _f) = mpsc::unbounded_channel();
    let _fast = node.kv().watch(spec(2, "s/", 1), fast_tx, fast_ctl);
    let started = Instant::now();
    for i in 0..50 {
        put(&node, &format!("s/{i}"), "v").await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "writes were not held up"
    );
    let mut seen = 0;
    while seen < 50 {
        match timeout(Duration::from_secs(5), fast_rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            WatchOutput::Events { events, .. } => seen += events.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    let out = timeout(Duration::from_secs(5), slow_ctl_rx.recv())
        .await
        .unwrap()
        .unwrap();
    let WatchOutput::Canceled {
        watch_id: 1,
        compact_revision: 0,
        reason,
    } = out
    else {
        panic!("unexpected {out:?}")
    };
    assert!(
        reason.contains("revision"),
        "the reason says where to resume: {reason}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watchers_hear_progress() {
    let c = Cluster::start(3, |cfg| {
        cfg.watch.progress_interval = Duration::from_millis(200)
    })
    .await;
    let l = c.leader().await;
    let node = c.node(l).clone();
    put(&node, "other", "x").await;
    let rev = node.kv().revision();
    let (tx, mut rx) = mpsc::channel(8);
    let (ctl, _c) = mpsc::unbounded_channel();
    let mut s = spec(3, "p/", rev + 1);
    s.progress_notify = true;
    let _w = node.kv().watch(s, tx, ctl);
    let out = timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        out,
        WatchOutput::Progress {
            watch_id: 3,
            revision: rev
        }
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_unless_kept_alive_and_expiry_survives_failover() {
    let mut c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let f = (l + 1) % 3;
    let node = c.node(f).clone();
    let ttl = node.min_lease_ttl();
    // Granted through a follower: forwarded to the leader.
    let (kept, _) = node.lease_grant(0, ttl).await.unwrap();
    let (lapsing, _) = node.lease_grant(0, ttl).await.unwrap();
    for (key, lease) in [("l/kept", kept), ("l/lapsing", lapsing)] {
        node.propose(Command::Put(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        }))
        .await
        .unwrap();
    }
    let (left, granted) = node.lease_time_to_live(kept).await.unwrap();
    assert_eq!(granted, ttl);
    assert!(left > 0 && left <= ttl);
    // Keep one alive (through the follower) across a leader failover; the other lapses.
    c.stop(l).await;
    let deadline = Instant::now() + Duration::from_secs(ttl as u64 * 3);
    let survivor = c.running()[0];
    let node = c.node(survivor).clone();
    while Instant::now() < deadline {
        match node.lease_keep_alive(kept).await {
            Ok(t) => assert_eq!(t, ttl),
            Err(StoreError::NoLeader(_) | StoreError::Timeout(_)) => {}
            Err(e) => panic!("keep-alive failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually(
        "the lapsed lease's key is deleted by the new leader",
        || local_get(&node, "l/lapsing").unwrap().is_none(),
    )
    .await;
    assert_eq!(local_get(&node, "l/kept").unwrap().as_deref(), Some("v"));
    assert!(matches!(
        node.lease_keep_alive(lapsing).await,
        Err(StoreError::Mvcc(MvccError::LeaseNotFound(_)))
    ));
    // Revoking deletes the keys at once.
    node.propose(Command::LeaseRevoke { id: kept })
        .await
        .unwrap();
    assert!(common::get(&node, "l/kept").await.unwrap().is_none());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_filters_drop_puts_or_deletes() {
    let c = Cluster::start(3, |_| {}).await;
    let l = c.leader().await;
    let node = c.node(l).clone();
    let start = node.kv().revision() + 1;
    let mut outs = Vec::new();
    let mut handles = Vec::new();
    for (id, no_put, no_delete) in [(1, true, false), (2, false, true)] {
        let (tx, rx) = mpsc::channel(16);
        let (ctl, _c) = mpsc::unbounded_channel();
        let mut s = spec(id, "f/", start);
        s.no_put = no_put;
        s.no_delete = no_delete;
        handles.push((node.kv().watch(s, tx, ctl), _c));
        outs.push(rx);
    }
    put(&node, "f/a", "1").await;
    node.propose(Command::DeleteRange(
        flotilla_proto::etcdserverpb::DeleteRangeRequest {
            key: b"f/a".to_vec(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    put(&node, "f/b", "2").await;
    let kinds = |out: WatchOutput| match out {
        WatchOutput::Events { events, .. } => events.iter().map(|e| e.r#type).collect::<Vec<_>>(),
        other => panic!("unexpected {other:?}"),
    };
    let deletes = kinds(
        timeout(Duration::from_secs(5), outs[0].recv())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(deletes, vec![1], "the no-put watcher sees only the delete");
    let mut puts = Vec::new();
    while puts.len() < 2 {
        puts.extend(kinds(
            timeout(Duration::from_secs(5), outs[1].recv())
                .await
                .unwrap()
                .unwrap(),
        ));
    }
    assert_eq!(puts, vec![0, 0], "the no-delete watcher sees only the puts");
    c.shutdown().await;
}
