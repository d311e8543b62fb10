//! ResourceQuota's accounting, shared by the API server (which checks a create against the
//! quotas of its namespace and counts it in, in the same transaction) and the quota
//! controller (which recounts a namespace's usage from its objects, so deletions give their
//! share back).
//!
//! The resource names are Kubernetes': `pods`, `services`, `resourcequotas`,
//! `count/<plural>` for core kinds and `count/<plural>.<group>` for the others
//! (`count/deployments.apps`), and the pods' compute: `requests.cpu`, `requests.memory`,
//! `limits.cpu`, `limits.memory`, with `cpu` and `memory` meaning the requests. A pod that has
//! finished (Succeeded or Failed) uses nothing.

use std::collections::BTreeMap;

use prost::Message;

use super::quantity::Quantity;
use super::{Pod, Resource};

/// The compute resources a quota can cap, and what each one sums.
const COMPUTE: &[(&str, Side, &str)] = &[
    ("requests.cpu", Side::Requests, "cpu"),
    ("requests.memory", Side::Requests, "memory"),
    ("limits.cpu", Side::Limits, "cpu"),
    ("limits.memory", Side::Limits, "memory"),
    ("cpu", Side::Requests, "cpu"),
    ("memory", Side::Requests, "memory"),
];

#[derive(Clone, Copy)]
enum Side {
    Requests,
    Limits,
}

/// Object counts a quota can cap besides `count/*`: the kinds Kubernetes names directly.
const COUNTED: &[(&str, &str)] = &[
    ("pods", "Pod"),
    ("services", "Service"),
    ("resourcequotas", "ResourceQuota"),
    ("configmaps", "ConfigMap"),
    ("secrets", "Secret"),
];

/// `count/<plural>` or `count/<plural>.<group>`: the name Kubernetes gives the count of a kind.
pub fn count_name(plural: &str, api_version: &str) -> String {
    match api_version.split_once('/') {
        Some((group, _)) => format!("count/{plural}.{group}"),
        None => format!("count/{plural}"),
    }
}

/// Whether `name` is a resource a quota can cap; `count/*` names any kind (served or not, as
/// Kubernetes allows a quota on a kind it does not serve yet).
pub fn is_known(name: &str) -> bool {
    COMPUTE.iter().any(|(n, _, _)| *n == name)
        || COUNTED.iter().any(|(n, _)| *n == name)
        || name.strip_prefix("count/").is_some_and(|k| !k.is_empty())
}

/// What an object uses of each resource a quota could cap.
pub fn usage<K: Resource>(object: &K) -> BTreeMap<String, Quantity> {
    let mut used = BTreeMap::new();
    let one = Quantity::from_millis(1000);
    if K::KIND == Pod::KIND
        && let Ok(pod) = Pod::decode(object.encode_to_vec().as_slice())
    {
        if pod_finished(&pod) {
            return used;
        }
        for (name, side, resource) in COMPUTE {
            used.insert(name.to_string(), pod_total(&pod, *side, resource));
        }
    }
    used.insert(count_name(K::PLURAL, K::API_VERSION), one);
    if let Some((name, _)) = COUNTED.iter().find(|(_, kind)| *kind == K::KIND) {
        used.insert(name.to_string(), one);
    }
    used
}

fn pod_finished(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .is_some_and(|s| s.phase == "Succeeded" || s.phase == "Failed")
}

/// A pod's total of one resource, as Kubernetes counts it: the sum over its containers, or
/// the largest init container's, whichever is more.
fn pod_total(pod: &Pod, side: Side, resource: &str) -> Quantity {
    let Some(spec) = &pod.spec else {
        return Quantity::default();
    };
    let of = |c: &super::Container| {
        c.resources
            .as_ref()
            .and_then(|r| match side {
                Side::Requests => r.requests.get(resource),
                Side::Limits => r.limits.get(resource),
            })
            .and_then(|q| Quantity::parse(q).ok())
            .unwrap_or_default()
    };
    let sum = spec
        .containers
        .iter()
        .fold(Quantity::default(), |acc, c| acc + of(c));
    let init = spec
        .init_containers
        .iter()
        .map(of)
        .max()
        .unwrap_or_default();
    sum.max(init)
}

/// Containers of a pod that leave a compute resource the quota caps unset: Kubernetes refuses
/// such a pod, since its usage could not be counted.
pub fn unset_compute(pod: &Pod, name: &str) -> Vec<String> {
    let Some((_, side, resource)) = COMPUTE.iter().find(|(n, _, _)| *n == name) else {
        return Vec::new();
    };
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .chain(&spec.init_containers)
        .filter(|c| {
            !c.resources.as_ref().is_some_and(|r| match side {
                Side::Requests => r.requests.contains_key(*resource),
                Side::Limits => r.limits.contains_key(*resource),
            })
        })
        .map(|c| c.name.clone())
        .collect()
}

/// A quantity as a quota's status shows it: counts as plain numbers, the rest as Kubernetes
/// writes quantities.
pub fn format(name: &str, q: Quantity) -> String {
    if COMPUTE.iter().any(|(n, _, _)| *n == name) {
        q.to_string()
    } else {
        q.value_ceil().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::json::from_value;
    use serde_json::json;

    #[test]
    fn a_pod_uses_its_count_and_its_containers_compute() {
        let pod: Pod = from_value(json!({
            "metadata": {"name": "p", "namespace": "shop"},
            "spec": {
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1"}}},
                    {"name": "b", "resources": {"requests": {"cpu": "250m"}}}
                ],
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}]
            }
        }))
        .unwrap();
        let u = usage(&pod);
        assert_eq!(format("pods", u["pods"]), "1");
        assert_eq!(format("count/pods", u["count/pods"]), "1");
        // The init container's 2 cpu outweigh the containers' 500m.
        assert_eq!(format("requests.cpu", u["requests.cpu"]), "2");
        assert_eq!(format("requests.memory", u["requests.memory"]), "64Mi");
        assert_eq!(format("limits.cpu", u["limits.cpu"]), "1");
        assert_eq!(unset_compute(&pod, "limits.cpu"), vec!["b", "i"]);
        assert!(unset_compute(&pod, "pods").is_empty());
        let done: Pod =
            from_value(json!({"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}}))
                .unwrap();
        assert!(usage(&done).is_empty());
    }

    #[test]
    fn kinds_are_counted_by_their_kubernetes_names() {
        assert_eq!(
            count_name("deployments", "apps/v1"),
            "count/deployments.apps"
        );
        assert_eq!(count_name("services", "v1"), "count/services");
        assert!(is_known("count/deployments.apps") && is_known("requests.cpu") && is_known("pods"));
        assert!(!is_known("count/") && !is_known("gpus"));
        let svc = crate::api::Service::default();
        let u = usage(&svc);
        assert_eq!(u.keys().collect::<Vec<_>>(), ["count/services", "services"]);
    }
}
