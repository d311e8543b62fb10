//! The disruption controller: keeps each PodDisruptionBudget's status, which the eviction
//! call reads to allow or refuse an eviction, as Kubernetes' disruption controller does.
//!
//! - **expected pods**: for an integer `minAvailable`, the pods the selector picks; for a
//!   percentage or `maxUnavailable`, the scale of their controllers (a ReplicaSet's
//!   `replicas`, a DaemonSet's desired count, a Job's `parallelism`; a pod without one
//!   counts for itself).
//! - **desired healthy**: `minAvailable` (a percentage of the expected pods, rounded up),
//!   or the expected pods less `maxUnavailable` (rounded up).
//! - **current healthy**: selected pods that are Ready and not being deleted, less those an
//!   eviction has just taken (`disruptedPods`, kept until the pod is seen going, or two
//!   minutes).
//! - **disruptions allowed**: current less desired healthy, never below 0, and 0 with no
//!   expected pods; condition `DisruptionAllowed`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    Condition, DaemonSet, Job, Pod, PodDisruptionBudget, PodDisruptionBudgetStatus, ReplicaSet,
    Resource, time,
};

use crate::deployment::scaled_value;
use crate::queue::Requeue;
use crate::runtime::{Api, Controller};
use crate::util::{
    controller_of, is_deleting, is_ready, is_terminal, labels_of, selector, split_key,
};

/// How long an eviction's entry in `disruptedPods` holds if the pod is not seen going.
pub const DISRUPTED_TTL: Duration = Duration::from_secs(120);

pub struct DisruptionController;

/// Whether a pod's change can change a budget: it came, went, or its readiness, labels or
/// deletion changed.
pub fn pod_changed(change: &Change<Pod>) -> bool {
    match change {
        Change::Added(_) | Change::Deleted(_) => true,
        Change::Updated { old, new } => {
            is_ready(old) != is_ready(new)
                || is_deleting(old) != is_deleting(new)
                || labels_of(old) != labels_of(new)
        }
    }
}

impl Controller for DisruptionController {
    type Kind = PodDisruptionBudget;
    const NAME: &'static str = "disruption";

    async fn reconcile<A: Api>(&self, api: &A, key: &str) -> Result<Requeue, ClientError> {
        let (ns, name) = split_key(key);
        let Some(pdb) = api.get::<PodDisruptionBudget>(ns, name) else {
            return Ok(None);
        };
        if is_deleting(&pdb) {
            return Ok(None);
        }
        let now = api.now();
        let spec = pdb.spec.clone().unwrap_or_default();
        let old = pdb.status.clone().unwrap_or_default();
        // An empty selector picks every pod of the namespace; none, no pod.
        let pods: Vec<Pod> = match &spec.selector {
            None => Vec::new(),
            Some(s) if s.match_labels.is_empty() && s.match_expressions.is_empty() => {
                api.list(ns, |_: &Pod| true)
            }
            Some(_) => match selector(spec.selector.as_ref()) {
                Some(sel) => api.list(ns, |p: &Pod| sel.matches(&labels_of(p))),
                None => Vec::new(),
            },
        };

        // Evictions not yet seen: kept while their pod is there and not going, for a while.
        let live: BTreeSet<&str> = pods
            .iter()
            .filter(|p| !is_deleting(*p))
            .map(|p| p.name())
            .collect();
        let mut disrupted: BTreeMap<String, String> = BTreeMap::new();
        let mut requeue: Option<Duration> = None;
        for (pod, at) in &old.disrupted_pods {
            let age = time::parse(at)
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or(DISRUPTED_TTL);
            if live.contains(pod.as_str()) && age < DISRUPTED_TTL {
                disrupted.insert(pod.clone(), at.clone());
                let left = DISRUPTED_TTL - age;
                requeue = Some(requeue.map_or(left, |r| r.min(left)));
            }
        }
        let healthy = pods
            .iter()
            .filter(|p| is_ready(p) && !is_deleting(*p) && !disrupted.contains_key(p.name()))
            .count() as i32;

        let counted = |p: &Pod| !is_terminal(p);
        let integer_min = !spec.min_available.is_empty() && !spec.min_available.ends_with('%');
        let expected = if integer_min {
            pods.iter().filter(|p| counted(p)).count() as i32
        } else {
            expected_by_controllers(api, ns, &pods, counted)
        };
        let desired = if !spec.min_available.is_empty() {
            scaled_value(&spec.min_available, expected, true).unwrap_or(0)
        } else if !spec.max_unavailable.is_empty() {
            expected - scaled_value(&spec.max_unavailable, expected, true).unwrap_or(0)
        } else {
            0
        }
        .max(0);
        let allowed = if expected <= 0 {
            0
        } else {
            (healthy - desired).max(0)
        };

        let stamp = time::format(now);
        let (state, reason) = if allowed > 0 {
            ("True", "SufficientPods")
        } else {
            ("False", "InsufficientPods")
        };
        let mut conditions = old.conditions.clone();
        match conditions
            .iter_mut()
            .find(|c| c.r#type == "DisruptionAllowed")
        {
            Some(c) if c.status == state => {}
            Some(c) => {
                c.status = state.into();
                c.reason = reason.into();
                c.last_transition_time = stamp;
            }
            None => conditions.push(Condition {
                r#type: "DisruptionAllowed".into(),
                status: state.into(),
                reason: reason.into(),
                last_transition_time: stamp,
                ..Default::default()
            }),
        }
        let status = PodDisruptionBudgetStatus {
            observed_generation: pdb.metadata.as_ref().map(|m| m.generation).unwrap_or(0),
            disrupted_pods: disrupted,
            disruptions_allowed: allowed,
            current_healthy: healthy,
            desired_healthy: desired,
            expected_pods: expected,
            conditions,
        };
        if pdb.status.as_ref() != Some(&status) {
            let mut updated = pdb.clone();
            updated.status = Some(status);
            api.update_status(&updated).await?;
        }
        Ok(requeue)
    }
}

/// The scale of the selected pods' controllers; a pod without one counts for itself.
fn expected_by_controllers<A: Api>(
    api: &A,
    ns: &str,
    pods: &[Pod],
    counted: impl Fn(&Pod) -> bool,
) -> i32 {
    let mut owners: BTreeSet<(String, String)> = BTreeSet::new();
    let mut alone = 0;
    for p in pods.iter().filter(|p| counted(p)) {
        match controller_of(p.metadata.as_ref()) {
            Some(r) => {
                owners.insert((r.kind.clone(), r.name.clone()));
            }
            None => alone += 1,
        }
    }
    let mut expected = alone;
    for (kind, name) in owners {
        expected += match kind.as_str() {
            "ReplicaSet" => api
                .get::<ReplicaSet>(ns, &name)
                .and_then(|r| r.spec?.replicas)
                .unwrap_or(0),
            "DaemonSet" => api
                .get::<DaemonSet>(ns, &name)
                .and_then(|d| d.status)
                .map(|s| s.desired_number_scheduled)
                .unwrap_or(0),
            "Job" => api
                .get::<Job>(ns, &name)
                .and_then(|j| j.spec?.parallelism)
                .unwrap_or(0),
            // Another controller: its pods count as they are.
            _ => pods
                .iter()
                .filter(|p| {
                    counted(p)
                        && controller_of(p.metadata.as_ref())
                            .is_some_and(|r| r.kind == kind && r.name == name)
                })
                .count() as i32,
        };
    }
    expected
}

#[cfg(test)]
mod tests;
