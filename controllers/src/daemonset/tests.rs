//! The DaemonSet controller's behaviour, on the in-memory API.

use std::time::Duration;

use flotilla_proto::api::{NodeSpec, PodCondition, PodStatus, Taint, time};
use serde_json::json;

use super::*;
use crate::fake::FakeApi;

const KEY: &str = "kube/agent";

fn daemon_set(extra: serde_json::Value) -> DaemonSet {
    let mut ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "kube"},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {"containers": [{"name": "a", "image": "agent:1"}]}
            }
        }
    });
    merge(&mut ds["spec"], extra);
    serde_json::from_value(ds).expect("a DaemonSet")
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn node(name: &str, labels: serde_json::Value) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("node")
}

fn setup(nodes: &[&str], extra: serde_json::Value) -> (DaemonSetController, FakeApi) {
    let api = FakeApi::new();
    for n in nodes {
        api.put(node(n, json!({})));
    }
    api.put(daemon_set(extra));
    (DaemonSetController::default(), api)
}

async fn sync(c: &DaemonSetController, api: &FakeApi) -> Requeue {
    c.reconcile(api, KEY).await.expect("reconcile")
}

/// Node → the hash label of its live pods.
fn placement(api: &FakeApi) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in api.all::<Pod>() {
        out.entry(node_of(&p).to_string())
            .or_default()
            .push(hash_of(&p).unwrap_or("").to_string());
    }
    out
}

fn nodes_with_pods(api: &FakeApi) -> Vec<String> {
    placement(api).into_keys().collect()
}

fn status(api: &FakeApi) -> DaemonSetStatus {
    api.get::<DaemonSet>("kube", "agent")
        .and_then(|d| d.status)
        .unwrap_or_default()
}

/// Every pod turns Running and Ready now.
fn all_ready(api: &FakeApi) {
    let now = time::format(api.now());
    for p in api.all::<Pod>() {
        api.modify::<Pod>("kube", p.name(), |p| {
            p.status = Some(PodStatus {
                phase: "Running".into(),
                conditions: vec![PodCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: now.clone(),
                    ..Default::default()
                }],
                ..Default::default()
            });
        });
    }
}

fn deletes(actions: &[String]) -> usize {
    actions
        .iter()
        .filter(|a| a.starts_with("delete Pod"))
        .count()
}

#[tokio::test]
async fn every_node_gets_one_pod_pinned_to_it() {
    let (c, api) = setup(&["n1", "n2", "n3"], json!({}));
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["n1", "n2", "n3"]);
    for p in api.all::<Pod>() {
        let meta = p.metadata.as_ref().expect("metadata");
        assert_eq!(meta.labels.get("app").map(String::as_str), Some("agent"));
        assert_eq!(
            controller_of(Some(meta)).map(|r| r.kind.as_str()),
            Some("DaemonSet")
        );
        let tolerated: Vec<&str> = p
            .spec
            .as_ref()
            .expect("spec")
            .tolerations
            .iter()
            .map(|t| t.key.as_str())
            .collect();
        assert!(tolerated.contains(&UNREACHABLE_TAINT), "{tolerated:?}");
        assert!(tolerated.contains(&"node.kubernetes.io/unschedulable"));
    }
    let st = status(&api);
    assert_eq!(
        (
            st.desired_number_scheduled,
            st.current_number_scheduled,
            st.number_ready
        ),
        (3, 3, 0)
    );
    assert_eq!(st.number_unavailable, 3);

    // Nothing more on a second look.
    api.take_actions();
    sync(&c, &api).await;
    assert!(
        !api.take_actions().iter().any(|a| a.starts_with("create")),
        "one pod per node"
    );
}

#[tokio::test]
async fn a_node_that_joins_gets_a_pod_and_one_that_leaves_loses_it() {
    let (c, api) = setup(&["n1"], json!({}));
    sync(&c, &api).await;
    api.put(node("n2", json!({})));
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["n1", "n2"]);
    api.hide::<Node>("", "n1");
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["n2"]);
}

#[tokio::test]
async fn node_selectors_and_taints_choose_the_nodes() {
    let api = FakeApi::new();
    api.put(node("disk", json!({"disk": "ssd"})));
    api.put(node("plain", json!({})));
    let mut tainted = node("gpu", json!({"disk": "ssd"}));
    tainted.spec = Some(NodeSpec {
        taints: vec![Taint {
            key: "dedicated".into(),
            value: "gpu".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    api.put(tainted);
    api.put(daemon_set(
        json!({"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}}),
    ));
    let c = DaemonSetController::default();
    sync(&c, &api).await;
    assert_eq!(
        nodes_with_pods(&api),
        ["disk"],
        "not plain (selector), not gpu (taint)"
    );
    assert_eq!(status(&api).desired_number_scheduled, 1);

    // The node stops matching: its pod goes.
    api.modify::<Node>("", "disk", |n| {
        n.metadata_mut().labels.clear();
    });
    sync(&c, &api).await;
    assert!(nodes_with_pods(&api).is_empty());
    assert_eq!(status(&api).desired_number_scheduled, 0);
}

#[tokio::test]
async fn cordoned_and_unreachable_nodes_keep_their_daemons() {
    let api = FakeApi::new();
    let mut sick = node("sick", json!({}));
    sick.spec = Some(NodeSpec {
        unschedulable: true,
        taints: vec![
            Taint {
                key: UNREACHABLE_TAINT.into(),
                effect: "NoExecute".into(),
                ..Default::default()
            },
            Taint {
                key: "node.kubernetes.io/unschedulable".into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            },
        ],
        ..Default::default()
    });
    api.put(sick);
    api.put(daemon_set(json!({})));
    let c = DaemonSetController::default();
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["sick"]);
}

#[tokio::test]
async fn a_rolling_update_replaces_at_most_max_unavailable_pods_at_a_time() {
    let (c, api) = setup(&["n1", "n2", "n3"], json!({}));
    sync(&c, &api).await;
    all_ready(&api);
    sync(&c, &api).await;
    assert_eq!(status(&api).number_available, 3);
    let old_hash = placement(&api)["n1"][0].clone();

    api.modify::<DaemonSet>("kube", "agent", |d| {
        let t = d
            .spec
            .as_mut()
            .and_then(|s| s.template.as_mut())
            .expect("template");
        t.spec.as_mut().expect("spec").containers[0].image = "agent:2".into();
    });
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(
        deletes(&api.take_actions()),
        1,
        "maxUnavailable defaults to 1"
    );
    // The node without a pod gets the new one; while it is not ready nothing else goes.
    sync(&c, &api).await;
    sync(&c, &api).await;
    let actions = api.take_actions();
    assert_eq!(deletes(&actions), 0, "{actions:?}");
    let hashes: Vec<String> = placement(&api).into_values().flatten().collect();
    assert_eq!(hashes.iter().filter(|h| **h != old_hash).count(), 1);
    assert_eq!(status(&api).updated_number_scheduled, 1);

    for _ in 0..4 {
        all_ready(&api);
        sync(&c, &api).await;
    }
    all_ready(&api);
    sync(&c, &api).await;
    let st = status(&api);
    assert_eq!((st.updated_number_scheduled, st.number_available), (3, 3));
    assert!(placement(&api).values().flatten().all(|h| *h != old_hash));
}

#[tokio::test]
async fn max_unavailable_may_be_a_percentage() {
    let (c, api) = setup(
        &["a", "b", "c", "d"],
        json!({
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "50%"}}
        }),
    );
    sync(&c, &api).await;
    all_ready(&api);
    sync(&c, &api).await;
    api.modify::<DaemonSet>("kube", "agent", |d| {
        let t = d
            .spec
            .as_mut()
            .and_then(|s| s.template.as_mut())
            .expect("template");
        t.metadata
            .get_or_insert_default()
            .labels
            .insert("v".into(), "2".into());
    });
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(deletes(&api.take_actions()), 2);
}

#[tokio::test]
async fn on_delete_replaces_a_pod_only_when_someone_deletes_it() {
    let (c, api) = setup(
        &["n1", "n2"],
        json!({"updateStrategy": {"type": "OnDelete"}}),
    );
    sync(&c, &api).await;
    all_ready(&api);
    api.modify::<DaemonSet>("kube", "agent", |d| {
        let t = d
            .spec
            .as_mut()
            .and_then(|s| s.template.as_mut())
            .expect("template");
        t.spec.as_mut().expect("spec").containers[0].image = "agent:2".into();
    });
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(deletes(&api.take_actions()), 0);
    let on_n1 = api
        .all::<Pod>()
        .into_iter()
        .find(|p| node_of(p) == "n1")
        .expect("n1's pod");
    api.hide::<Pod>("kube", on_n1.name());
    sync(&c, &api).await;
    let p = placement(&api);
    assert_ne!(p["n1"], p["n2"], "n1's new pod has the new template");
}

#[tokio::test]
async fn failed_pods_and_second_pods_are_deleted() {
    let (c, api) = setup(&["n1"], json!({}));
    sync(&c, &api).await;
    let first = api.all::<Pod>()[0].clone();
    // A second pod on the node (another leader's, say).
    let mut twin = first.clone();
    twin.metadata_mut().name = "agent-twin".into();
    api.put(twin);
    api.advance(Duration::from_secs(1));
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(api.take_actions(), ["delete Pod kube/agent-twin"]);

    api.modify::<Pod>("kube", first.name(), |p| {
        p.status.get_or_insert_default().phase = "Failed".into();
    });
    sync(&c, &api).await;
    // Made again after a back-off of 1 s (doubling with each failure there).
    assert_eq!(sync(&c, &api).await, Some(Duration::from_secs(1)));
    assert!(api.all::<Pod>().is_empty());
    api.advance(Duration::from_secs(1));
    sync(&c, &api).await;
    let pods = api.all::<Pod>();
    assert_eq!(pods.len(), 1);
    assert_ne!(pods[0].name(), first.name(), "made again");
    let second = pods[0].name().to_string();
    api.modify::<Pod>("kube", &second, |p| {
        p.status.get_or_insert_default().phase = "Failed".into();
    });
    sync(&c, &api).await;
    assert_eq!(sync(&c, &api).await, Some(Duration::from_secs(2)));
}

#[tokio::test]
async fn a_lagging_cache_never_gives_a_node_two_pods() {
    let (c, api) = setup(&["n1", "n2"], json!({}));
    sync(&c, &api).await;
    let hidden: Vec<Pod> = api
        .all::<Pod>()
        .iter()
        .filter_map(|p| api.hide::<Pod>("kube", p.name()))
        .collect();
    api.take_actions();
    sync(&c, &api).await;
    assert!(
        !api.take_actions().iter().any(|a| a.starts_with("create")),
        "the pods asked for count"
    );
    assert_eq!(status(&api).current_number_scheduled, 2);
    // Seen at last: still one each.
    for p in hidden {
        api.put(p);
    }
    sync(&c, &api).await;
    assert_eq!(
        placement(&api).values().map(Vec::len).collect::<Vec<_>>(),
        [1, 1]
    );
}

#[tokio::test]
async fn a_no_schedule_taint_added_later_leaves_the_pod_but_a_no_execute_one_does_not() {
    let (c, api) = setup(&["n1"], json!({}));
    sync(&c, &api).await;
    let taint = |effect: &str| {
        let effect = effect.to_string();
        move |n: &mut Node| {
            n.spec.get_or_insert_default().taints = vec![Taint {
                key: "dedicated".into(),
                value: "x".into(),
                effect,
                ..Default::default()
            }];
        }
    };
    api.modify::<Node>("", "n1", taint("NoSchedule"));
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["n1"], "it may stay");
    assert_eq!(status(&api).number_misscheduled, 1);
    assert_eq!(deletes(&api.take_actions()), 0);
    api.modify::<Node>("", "n1", taint("NoExecute"));
    sync(&c, &api).await;
    assert!(nodes_with_pods(&api).is_empty(), "it may not");
}

#[tokio::test]
async fn a_node_gets_its_new_pod_only_once_the_old_one_is_gone() {
    let (c, api) = setup(&["n1"], json!({}));
    sync(&c, &api).await;
    let old = api.all::<Pod>()[0].name().to_string();
    // Someone deletes it; it takes its grace period to stop.
    api.modify::<Pod>("kube", &old, |p| {
        p.metadata_mut().deletion_timestamp = "2026-01-01T00:00:00Z".into();
    });
    api.take_actions();
    sync(&c, &api).await;
    assert!(api.take_actions().iter().all(|a| !a.starts_with("create")));
    api.hide::<Pod>("kube", &old);
    sync(&c, &api).await;
    assert_eq!(nodes_with_pods(&api), ["n1"]);
}
