//! Watches through the API: initial state, filters, resuming, expiry, failover.

mod common;

use std::time::Duration;

use common::{ControlPlane, DEADLINE};
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_client::watch::{WatchItem, watch};
use flotilla_store::mvcc::Command;
use serde_json::json;
use tokio::sync::mpsc::Receiver;
use tonic::Code;

fn pod(name: &str, app: &str) -> Pod {
    from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "3600"]}]},
    }))
    .unwrap()
}

/// The next item that is not a bookmark, as (type, name).
async fn next(
    rx: &mut Receiver<Result<WatchItem<Pod>, flotilla_client::ClientError>>,
) -> (String, String) {
    loop {
        let item = tokio::time::timeout(DEADLINE, rx.recv())
            .await
            .expect("a watch event before the deadline")
            .expect("the watch is still open")
            .expect("no watch error");
        return match item {
            WatchItem::Added(p) => ("ADDED".into(), p.name().into()),
            WatchItem::Modified(p) => ("MODIFIED".into(), p.name().into()),
            WatchItem::Deleted(p) => ("DELETED".into(), p.name().into()),
            WatchItem::Expired => ("EXPIRED".into(), String::new()),
            WatchItem::Bookmark(_) => continue,
        };
    }
}

fn ev(t: &str, n: &str) -> (String, String) {
    (t.into(), n.into())
}

#[tokio::test]
async fn initial_state_then_changes_with_filter_transitions() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    c.create(&pod("before", "web")).await.unwrap();
    c.create(&pod("other", "db")).await.unwrap();
    let req = WatchRequest {
        namespace: "default".into(),
        label_selector: "app=web".into(),
        ..Default::default()
    };
    let mut rx = watch::<Pod>(c.clone(), req);
    assert_eq!(next(&mut rx).await, ev("ADDED", "before"));

    c.create(&pod("p", "web")).await.unwrap();
    assert_eq!(next(&mut rx).await, ev("ADDED", "p"));
    // Leaves the selection: DELETED; comes back: ADDED; changes while in it: MODIFIED.
    let _: Pod = c
        .patch(
            "default",
            "p",
            &json!({"metadata": {"labels": {"app": "db"}}}),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("DELETED", "p"));
    let _: Pod = c
        .patch(
            "default",
            "p",
            &json!({"metadata": {"labels": {"app": "web"}}}),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("ADDED", "p"));
    let _: Pod = c
        .patch(
            "default",
            "p",
            &json!({"metadata": {"annotations": {"a": "b"}}}),
        )
        .await
        .unwrap();
    assert_eq!(next(&mut rx).await, ev("MODIFIED", "p"));
    // Changes outside the selection are not seen.
    let _: Pod = c
        .patch(
            "default",
            "other",
            &json!({"metadata": {"annotations": {"a": "b"}}}),
        )
        .await
        .unwrap();
    let _: Pod = c.delete_named("default", "p").await.unwrap();
    assert_eq!(next(&mut rx).await, ev("DELETED", "p"));
}

#[tokio::test]
async fn watch_from_a_revision_and_expiry() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let a = c.create(&pod("a", "x")).await.unwrap();
    c.create(&pod("b", "x")).await.unwrap();
    let req = WatchRequest {
        namespace: "default".into(),
        resource_version: a.resource_version().into(),
        ..Default::default()
    };
    let mut rx = watch::<Pod>(c.clone(), req.clone());
    assert_eq!(next(&mut rx).await, ev("ADDED", "b"));

    // Compact past `a`'s revision: a watch from there has expired.
    let head: i64 = c
        .create(&pod("c", "x"))
        .await
        .unwrap()
        .resource_version()
        .parse()
        .unwrap();
    cp.node(0)
        .propose(Command::Compact { revision: head })
        .await
        .unwrap();
    let e = c.watch_once::<Pod>(&req).await.map(|_| ()).unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange);
    assert!(e.status.message().starts_with("expired"), "{e}");
    let mut rx = watch::<Pod>(c.clone(), req);
    assert_eq!(next(&mut rx).await, ev("EXPIRED", ""));
    // A list at an expired revision says so too.
    let list = ListRequest {
        resource_version: a.resource_version().into(),
        ..Default::default()
    };
    assert_eq!(
        c.list::<Pod>(&list).await.unwrap_err().code(),
        Code::OutOfRange
    );
}

#[tokio::test]
async fn a_watch_resumes_when_its_control_plane_node_dies() {
    let mut cp = ControlPlane::start(3).await;
    let c = cp.client();
    let req = WatchRequest {
        namespace: "default".into(),
        resource_version: "0".into(),
        ..Default::default()
    };
    // Served by member 0 (the client's first address).
    let mut rx = watch::<Pod>(c.clone(), req);
    for i in 0..5 {
        c.create(&pod(&format!("p{i}"), "x")).await.unwrap();
        assert_eq!(next(&mut rx).await, ev("ADDED", &format!("p{i}")));
    }
    cp.stop(0).await;
    let writer = cp.client_of(1);
    for i in 5..10 {
        // The new leader may take a moment.
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match writer.create(&pod(&format!("p{i}"), "x")).await {
                Ok(_) => break,
                Err(e) if e.is_already_exists() => break,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("no write after failover: {e}"),
            }
        }
    }
    // Every event once, in order, with no gap across the failover.
    for i in 5..10 {
        assert_eq!(next(&mut rx).await, ev("ADDED", &format!("p{i}")));
    }
}
