//! The disruption controller's arithmetic, on the in-memory API.

use flotilla_proto::api::{ObjectMeta, OwnerReference, PodCondition, PodStatus, ReplicaSetSpec};
use serde_json::json;

use super::*;
use crate::fake::FakeApi;

const KEY: &str = "shop/web";

fn budget(spec: serde_json::Value) -> PodDisruptionBudget {
    let mut spec = spec;
    spec["selector"] = json!({"matchLabels": {"app": "web"}});
    serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": spec,
    }))
    .expect("a budget")
}

/// A pod of ReplicaSet `rs` (none: no controller), ready or not.
fn pod(api: &FakeApi, name: &str, rs: Option<&str>, ready: bool) {
    let owner = rs.map(|rs| OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.into(),
        uid: format!("uid-{rs}"),
        controller: Some(true),
        ..Default::default()
    });
    api.put(Pod {
        metadata: Some(ObjectMeta {
            name: name.into(),
            namespace: "shop".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            owner_references: owner.into_iter().collect(),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: "Running".into(),
            conditions: vec![PodCondition {
                r#type: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    });
}

fn replica_set(api: &FakeApi, name: &str, replicas: i32) {
    api.put(ReplicaSet {
        metadata: Some(ObjectMeta {
            name: name.into(),
            namespace: "shop".into(),
            ..Default::default()
        }),
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        ..Default::default()
    });
}

async fn status(api: &FakeApi) -> PodDisruptionBudgetStatus {
    DisruptionController
        .reconcile(api, KEY)
        .await
        .expect("reconcile");
    api.get::<PodDisruptionBudget>("shop", "web")
        .and_then(|b| b.status)
        .unwrap_or_default()
}

/// (expected, desired, healthy, allowed)
fn counts(s: &PodDisruptionBudgetStatus) -> (i32, i32, i32, i32) {
    (
        s.expected_pods,
        s.desired_healthy,
        s.current_healthy,
        s.disruptions_allowed,
    )
}

#[tokio::test]
async fn min_available_as_a_count_leaves_the_rest_to_disrupt() {
    let api = FakeApi::new();
    api.put(budget(json!({"minAvailable": 2})));
    for (n, ready) in [("a", true), ("b", true), ("c", true), ("d", false)] {
        pod(&api, n, None, ready);
    }
    let s = status(&api).await;
    assert_eq!(counts(&s), (4, 2, 3, 1));
    let c = &s.conditions[0];
    assert_eq!(
        (c.r#type.as_str(), c.status.as_str(), c.reason.as_str()),
        ("DisruptionAllowed", "True", "SufficientPods")
    );
    assert_eq!(s.observed_generation, 1);
}

#[tokio::test]
async fn max_unavailable_and_percentages_count_the_controllers_scale() {
    let api = FakeApi::new();
    api.put(budget(json!({"maxUnavailable": "25%"})));
    replica_set(&api, "web-1", 4);
    // Only three of the four replicas exist yet: the scale still says four.
    for n in ["a", "b", "c"] {
        pod(&api, n, Some("web-1"), true);
    }
    let s = status(&api).await;
    assert_eq!(
        counts(&s),
        (4, 3, 3, 0),
        "25% of 4 rounds up to 1 unavailable"
    );
    assert_eq!(s.conditions[0].status, "False");
    assert_eq!(s.conditions[0].reason, "InsufficientPods");

    api.modify::<PodDisruptionBudget>("shop", "web", |b| {
        let spec = b.spec.as_mut().expect("spec");
        spec.max_unavailable.clear();
        spec.min_available = "50%".into();
    });
    let s = status(&api).await;
    assert_eq!(counts(&s), (4, 2, 3, 1));
}

#[tokio::test]
async fn an_eviction_not_yet_seen_is_not_counted_healthy_for_two_minutes() {
    let api = FakeApi::new();
    api.put(budget(json!({"minAvailable": 1})));
    pod(&api, "a", None, true);
    pod(&api, "b", None, true);
    assert_eq!(status(&api).await.disruptions_allowed, 1);
    // What an eviction writes before it deletes the pod.
    let now = time::format(api.now());
    api.modify::<PodDisruptionBudget>("shop", "web", |b| {
        let s = b.status.get_or_insert_default();
        s.disruptions_allowed = 0;
        s.disrupted_pods.insert("a".into(), now.clone());
    });
    let requeue = DisruptionController
        .reconcile(&api, KEY)
        .await
        .expect("reconcile");
    assert_eq!(requeue, Some(DISRUPTED_TTL));
    let s = api
        .get::<PodDisruptionBudget>("shop", "web")
        .and_then(|b| b.status)
        .expect("status");
    assert_eq!((s.current_healthy, s.disruptions_allowed), (1, 0));
    assert!(s.disrupted_pods.contains_key("a"));

    // The pod never went: after two minutes it counts again.
    api.advance(DISRUPTED_TTL);
    let s = status(&api).await;
    assert_eq!((s.current_healthy, s.disruptions_allowed), (2, 1));
    assert!(s.disrupted_pods.is_empty());
}

#[tokio::test]
async fn with_no_expected_pods_nothing_may_be_disrupted() {
    let api = FakeApi::new();
    api.put(budget(json!({"maxUnavailable": 1})));
    assert_eq!(counts(&status(&api).await), (0, 0, 0, 0));
}

#[tokio::test]
async fn only_pod_changes_that_move_a_budget_wake_it() {
    let mut p = Pod::default();
    p.metadata_mut().name = "a".into();
    let mut ready = p.clone();
    ready.status = Some(PodStatus {
        conditions: vec![PodCondition {
            r#type: "Ready".into(),
            status: "True".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    assert!(pod_changed(&Change::Updated {
        old: p.clone(),
        new: ready.clone()
    }));
    let mut restarted = ready.clone();
    restarted.status.as_mut().expect("status").phase = "Running".into();
    assert!(!pod_changed(&Change::Updated {
        old: ready,
        new: restarted
    }));
    assert!(pod_changed(&Change::Added(p)));
}
