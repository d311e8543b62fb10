//! The client library's informer against a real control plane: it lists, follows changes,
//! and after its history is compacted away it relists and reports only what differs.

mod common;

use std::sync::{Arc, Mutex};

use common::{ControlPlane, eventually};
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_client::informer::{Change, Filter, Informer};
use serde_json::json;

fn pod(name: &str) -> Pod {
    from_value(json!({
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "3600"]}]},
    }))
    .unwrap()
}

fn describe(c: &Change<Pod>) -> String {
    match c {
        Change::Added(p) => format!("+{}", p.name()),
        Change::Updated { new, .. } => format!("~{}", new.name()),
        Change::Deleted(p) => format!("-{}", p.name()),
    }
}

#[tokio::test]
async fn an_informer_caches_and_reports_each_change_once() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    c.create(&pod("a")).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let informer: Informer<Pod> = Informer::start(
        c.clone(),
        Filter {
            namespace: "default".into(),
            ..Default::default()
        },
        move |change| log.lock().unwrap().push(describe(&change)),
    );
    informer.wait_synced().await;
    assert_eq!(informer.list().len(), 1);

    c.create(&pod("b")).await.unwrap();
    let _: Pod = c
        .patch("default", "a", &json!({"metadata": {"labels": {"v": "2"}}}))
        .await
        .unwrap();
    let _: Pod = c.delete_named("default", "b").await.unwrap();
    eventually("the informer to see three changes", || async {
        (seen.lock().unwrap().len() >= 4).then_some(())
    })
    .await;
    assert_eq!(*seen.lock().unwrap(), vec!["+a", "+b", "~a", "-b"]);
    let a = informer.get("default", "a").unwrap();
    assert_eq!(a.metadata.unwrap().labels["v"], "2");
    assert!(informer.get("default", "b").is_none());
}
