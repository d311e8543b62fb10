//! Helpers the controllers share: owner references, pod readiness, selectors, events.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use flotilla_client::Client;
use flotilla_proto::api::selector::LabelSelector as Selector;
use flotilla_proto::api::{
    Event, EventSource, LabelSelector, ObjectMeta, ObjectReference, OwnerReference, Pod, Resource,
    time,
};

/// The owner reference that marks `owner` as the controller of an object.
pub fn controller_ref<K: Resource>(owner: &K) -> OwnerReference {
    let meta = owner.metadata().cloned().unwrap_or_default();
    OwnerReference {
        api_version: K::API_VERSION.into(),
        kind: K::KIND.into(),
        name: meta.name,
        uid: meta.uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The controller's owner reference of an object, if any.
pub fn controller_of(meta: Option<&ObjectMeta>) -> Option<&OwnerReference> {
    meta?
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
}

/// A delete of exactly `o` (its uid as the precondition: never a namesake made since),
/// with `propagation` (`""`: the kind's default).
pub fn delete_exactly<K: Resource>(o: &K, propagation: &str) -> flotilla_proto::api::DeleteRequest {
    flotilla_proto::api::DeleteRequest {
        namespace: o.namespace().into(),
        name: o.name().into(),
        propagation_policy: propagation.into(),
        preconditions: Some(flotilla_proto::api::Preconditions {
            uid: uid_of(o).into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn uid_of<K: Resource>(o: &K) -> &str {
    o.metadata().map(|m| m.uid.as_str()).unwrap_or("")
}

pub fn labels_of<K: Resource>(o: &K) -> BTreeMap<String, String> {
    o.metadata().map(|m| m.labels.clone()).unwrap_or_default()
}

pub fn is_deleting<K: Resource>(o: &K) -> bool {
    o.metadata()
        .is_some_and(|m| !m.deletion_timestamp.is_empty())
}

/// `namespace/name`, or `name` for cluster-scoped objects (the informers' cache key).
pub fn key_of<K: Resource>(o: &K) -> String {
    flotilla_client::informer::cache_key(o)
}

/// Splits a `namespace/name` key.
pub fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

/// A selector from an object's `spec.selector`; `None` if it is missing, empty (a
/// controller with an empty selector would claim every pod) or invalid.
pub fn selector(s: Option<&LabelSelector>) -> Option<Selector> {
    let s = s?;
    let expressions: Vec<(String, String, Vec<String>)> = s
        .match_expressions
        .iter()
        .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone()))
        .collect();
    let sel = Selector::from_parts(&s.match_labels, &expressions).ok()?;
    (!sel.is_empty()).then_some(sel)
}

/// The pod's phase (`""` before its node reported one).
pub fn phase(p: &Pod) -> &str {
    p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("")
}

/// Finished: Succeeded or Failed.
pub fn is_terminal(p: &Pod) -> bool {
    matches!(phase(p), "Succeeded" | "Failed")
}

/// Running or pending, not being deleted.
pub fn is_active(p: &Pod) -> bool {
    !is_terminal(p) && !is_deleting(p)
}

/// Condition Ready=True, and since when.
pub fn ready_since(p: &Pod) -> Option<SystemTime> {
    let c = p
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready" && c.status == "True")?;
    Some(time::parse(&c.last_transition_time).unwrap_or(SystemTime::UNIX_EPOCH))
}

pub fn is_ready(p: &Pod) -> bool {
    ready_since(p).is_some()
}

/// Ready for at least `min_ready` (Kubernetes' "available"); otherwise, if ready, how long
/// until it will be.
pub fn availability(p: &Pod, min_ready: Duration, now: SystemTime) -> (bool, Option<Duration>) {
    match ready_since(p) {
        None => (false, None),
        Some(_) if min_ready.is_zero() => (true, None),
        Some(since) => {
            let age = now.duration_since(since).unwrap_or_default();
            if age >= min_ready {
                (true, None)
            } else {
                (false, Some(min_ready - age))
            }
        }
    }
}

pub fn is_bound(p: &Pod) -> bool {
    p.spec.as_ref().is_some_and(|s| !s.node_name.is_empty())
}

/// Records an Event about `object` (best effort: a lost event is logged, not retried; one past
/// the object's share of Events, [`flotilla_client::events`], is dropped).
pub fn record_event<K: Resource>(
    client: &Client,
    component: &'static str,
    object: &K,
    kind: &'static str,
    reason: &'static str,
    message: String,
) {
    let meta = object.metadata().cloned().unwrap_or_default();
    let object_key = format!("{}/{}/{}/{}", K::KIND, meta.namespace, meta.name, meta.uid);
    if !flotilla_client::events::SpamFilter::global().allow(component, &object_key) {
        tracing::debug!(object = %object_key, reason, "event dropped by the spam filter");
        return;
    }
    let namespace = if meta.namespace.is_empty() {
        "default".to_string()
    } else {
        meta.namespace.clone()
    };
    let now = time::now();
    let event = Event {
        metadata: Some(ObjectMeta {
            generate_name: format!("{}.", meta.name),
            namespace,
            ..Default::default()
        }),
        involved_object: Some(ObjectReference {
            kind: K::KIND.into(),
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            api_version: K::API_VERSION.into(),
            ..Default::default()
        }),
        reason: reason.into(),
        message,
        source: Some(EventSource {
            component: component.into(),
            ..Default::default()
        }),
        first_timestamp: now.clone(),
        last_timestamp: now,
        count: 1,
        r#type: kind.into(),
        reporting_component: component.into(),
        ..Default::default()
    };
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = flotilla_client::events::write(&client, event.clone()).await {
            tracing::debug!("recording event {}: {e}", event.reason);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::api::{PodCondition, PodStatus};

    fn ready_pod(since: SystemTime) -> Pod {
        Pod {
            status: Some(PodStatus {
                conditions: vec![PodCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: time::format(since),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn available_after_min_ready_seconds() {
        let now = SystemTime::now();
        let min = Duration::from_secs(10);
        // Ready 4 s ago: available in 6 s.
        let (ok, wait) = availability(&ready_pod(now - Duration::from_secs(4)), min, now);
        assert!(!ok);
        let wait = wait.unwrap();
        assert!(
            wait <= Duration::from_secs(6) && wait > Duration::from_secs(5),
            "{wait:?}"
        );
        assert_eq!(
            availability(&ready_pod(now - Duration::from_secs(11)), min, now),
            (true, None)
        );
        // Without minReadySeconds, ready is available.
        assert_eq!(
            availability(&ready_pod(now), Duration::ZERO, now),
            (true, None)
        );
        // Not ready: neither.
        assert_eq!(availability(&Pod::default(), min, now), (false, None));
    }
}
