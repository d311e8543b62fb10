//! The DaemonSet controller: one pod of the DaemonSet on every node that should run it,
//! as Kubernetes' DaemonSet controller does.
//!
//! - A node should run the pod when the template's nodeSelector and required node
//!   affinity match it and the pod tolerates its NoSchedule and NoExecute taints
//!   (`flotilla_scheduler::plugins::node_should_run`). Cordoning does not count, and the
//!   pods tolerate the not-ready, unreachable and unschedulable taints, so daemons stay on
//!   sick and cordoned nodes, as Kubernetes' do.
//! - The pod is made with `spec.nodeName` set to its node, as Kubernetes did before 1.12:
//!   the scheduler does not place it (nor check the node's free resources).
//! - Nodes that join get a pod; a node that stops matching loses its pod; a node with
//!   two loses the newer; failed pods are deleted and made again.
//! - Each pod carries `controller-revision-hash`, a hash of the template. `RollingUpdate`
//!   deletes old pods while at most `maxUnavailable` of the nodes that should run the pod
//!   lack an available one (old pods that are not available go first); the next pass puts
//!   new pods on their nodes. `OnDelete` replaces a pod only when someone deletes it.
//! - Status: desired, current, misscheduled, ready, available (ready for
//!   `minReadySeconds`), updated and unavailable counts, observedGeneration.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    DaemonSet, DaemonSetStatus, DeleteRequest, Node, ObjectMeta, Pod, Preconditions, Resource,
    Toleration,
};

use crate::deployment::{scaled_value, template_hash};
use crate::nodelifecycle::UNREACHABLE_TAINT;
use crate::queue::Requeue;
use crate::runtime::{Api, Controller};
use crate::util::{
    availability, controller_of, controller_ref, is_deleting, is_ready, split_key, uid_of,
};

const COMPONENT: &str = "daemonset-controller";
/// The label holding the hash of the template a pod was made from.
pub const HASH_LABEL: &str = "controller-revision-hash";
/// Pods asked for and not seen within this long are no longer waited for.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether a node's change can change where daemons run: it joined, left, or its labels,
/// taints or readiness changed.
pub fn node_changed(change: &Change<Node>) -> bool {
    match change {
        Change::Added(_) | Change::Deleted(_) => true,
        Change::Updated { old, new } => {
            let labels = |n: &Node| n.metadata.as_ref().map(|m| m.labels.clone());
            let taints = |n: &Node| n.spec.as_ref().map(|s| s.taints.clone());
            labels(old) != labels(new) || taints(old) != taints(new)
        }
    }
}

/// Tolerations every daemon pod gets, so it stays where it serves: Kubernetes' set, and
/// Flotilla's own unreachable taint.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: key.into(),
        operator: "Exists".into(),
        effect: effect.into(),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t(UNREACHABLE_TAINT, "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// Node → name of each pod asked for and not yet seen, and since when.
type Pending = (HashMap<String, String>, SystemTime);

/// Remembers, per DaemonSet, the pods it asked for and has not yet seen.
#[derive(Default)]
pub struct DaemonSetController {
    pending: Mutex<HashMap<String, Pending>>,
}

fn node_of(p: &Pod) -> &str {
    p.spec.as_ref().map(|s| s.node_name.as_str()).unwrap_or("")
}

fn hash_of(p: &Pod) -> Option<&str> {
    p.metadata
        .as_ref()?
        .labels
        .get(HASH_LABEL)
        .map(String::as_str)
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("")
}

impl DaemonSetController {
    /// Forgets the pods the cache now shows; returns node → pod name of those still unseen.
    fn observe(&self, key: &str, pods: &[Pod], now: SystemTime) -> HashMap<String, String> {
        let mut all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some((pending, since)) = all.get_mut(key) else {
            return HashMap::new();
        };
        pending.retain(|_, name| !pods.iter().any(|p| p.name() == name));
        if pending.is_empty()
            || now.duration_since(*since).unwrap_or_default() > EXPECTATION_TIMEOUT
        {
            all.remove(key);
            return HashMap::new();
        }
        pending.clone()
    }

    fn expect(&self, key: &str, node: &str, pod: &str, now: SystemTime) {
        let mut all = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let (pending, since) = all
            .entry(key.to_string())
            .or_insert_with(|| (HashMap::new(), now));
        pending.insert(node.to_string(), pod.to_string());
        *since = now;
    }
}

impl Controller for DaemonSetController {
    type Kind = DaemonSet;
    const NAME: &'static str = "daemonset";

    async fn reconcile<A: Api>(&self, api: &A, key: &str) -> Result<Requeue, ClientError> {
        let (ns, name) = split_key(key);
        let Some(ds) = api.get::<DaemonSet>(ns, name) else {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            return Ok(None);
        };
        if is_deleting(&ds) {
            return Ok(None);
        }
        let now = api.now();
        let spec = ds.spec.clone().unwrap_or_default();
        let template = spec.template.clone().unwrap_or_default();
        let hash = template_hash(&template, 0);
        let uid = uid_of(&ds).to_string();
        let pods: Vec<Pod> = api.list(ns, |p: &Pod| {
            controller_of(p.metadata.as_ref()).is_some_and(|r| r.uid == uid)
        });
        let pending = self.observe(key, &pods, now);
        let nodes: Vec<Node> = api.list("", |n: &Node| !is_deleting(n));
        let probe = pod_for(&ds, &template, &hash, "");

        // The live pods on each node; failed ones are deleted to be made again.
        let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut doomed: Vec<&Pod> = Vec::new();
        for p in &pods {
            if is_deleting(p) {
                continue;
            }
            if phase(p) == "Failed" {
                doomed.push(p);
            } else {
                by_node.entry(node_of(p)).or_default().push(p);
            }
        }

        let min_ready = Duration::from_secs(spec.min_ready_seconds.max(0) as u64);
        let mut status = DaemonSetStatus {
            observed_generation: ds.metadata.as_ref().map(|m| m.generation).unwrap_or(0),
            conditions: ds
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut to_create: Vec<&str> = Vec::new();
        let mut old: Vec<&Pod> = Vec::new();
        let mut unavailable = 0;
        let mut requeue: Option<Duration> = None;
        for node in &nodes {
            let node_name = node.name();
            let here = by_node.remove(node_name).unwrap_or_default();
            if !flotilla_scheduler::plugins::node_should_run(&probe, node) {
                if !here.is_empty() {
                    status.number_misscheduled += 1;
                    doomed.extend(here);
                }
                continue;
            }
            status.desired_number_scheduled += 1;
            let here = oldest_first(here);
            let Some((&first, extra)) = here.split_first() else {
                if pending.contains_key(node_name) {
                    // Asked for with this template, not yet in the cache.
                    status.current_number_scheduled += 1;
                    status.updated_number_scheduled += 1;
                } else {
                    to_create.push(node_name);
                }
                unavailable += 1;
                continue;
            };
            doomed.extend(extra.iter().copied());
            status.current_number_scheduled += 1;
            if is_ready(first) {
                status.number_ready += 1;
            }
            let (available, wait) = availability(first, min_ready, now);
            if available {
                status.number_available += 1;
            } else {
                unavailable += 1;
                if let Some(w) = wait {
                    requeue = Some(requeue.map_or(w, |r| r.min(w)));
                }
            }
            if hash_of(first) == Some(hash.as_str()) {
                status.updated_number_scheduled += 1;
            } else {
                old.push(first);
            }
        }
        // Pods on nodes that are gone.
        for (_, here) in by_node {
            doomed.extend(here);
        }
        status.number_unavailable = status.desired_number_scheduled - status.number_available;

        // A rolling update deletes old pods within the unavailability budget; the next pass
        // puts new ones on their nodes.
        let strategy = spec.update_strategy.clone().unwrap_or_default();
        if strategy.r#type != "OnDelete" && !old.is_empty() {
            let max = strategy
                .rolling_update
                .as_ref()
                .map(|r| r.max_unavailable.as_str())
                .filter(|v| !v.is_empty())
                .unwrap_or("1");
            let budget = scaled_value(max, status.desired_number_scheduled, true)
                .unwrap_or(1)
                .max(1);
            let mut room = budget - unavailable;
            // Old pods that are not available already count as unavailable: they go first.
            old.sort_by_key(|p| availability(p, min_ready, now).0);
            for p in old {
                let counted = !availability(p, min_ready, now).0;
                if counted {
                    doomed.push(p);
                } else if room > 0 {
                    room -= 1;
                    doomed.push(p);
                }
            }
        }

        for p in doomed {
            delete_pod(api, &ds, p).await?;
        }
        for node in to_create {
            let pod = pod_for(&ds, &template, &hash, node);
            let made = match api.create(&pod).await {
                Ok(p) => p,
                Err(e) => {
                    api.record(
                        COMPONENT,
                        &ds,
                        "Warning",
                        "FailedCreate",
                        format!("Error creating: {e}"),
                    );
                    return Err(e);
                }
            };
            self.expect(key, node, made.name(), now);
            status.current_number_scheduled += 1;
            status.updated_number_scheduled += 1;
            api.record(
                COMPONENT,
                &ds,
                "Normal",
                "SuccessfulCreate",
                format!("Created pod: {}", made.name()),
            );
        }
        if ds.status.as_ref() != Some(&status) {
            let mut updated = ds.clone();
            updated.status = Some(status);
            api.update_status(&updated).await?;
        }
        Ok(requeue)
    }
}

/// A node's pods, oldest first (the one kept when there are two).
fn oldest_first(mut pods: Vec<&Pod>) -> Vec<&Pod> {
    pods.sort_by_key(|p| {
        p.metadata
            .as_ref()
            .map(|m| (m.creation_timestamp.clone(), m.name.clone()))
    });
    pods
}

async fn delete_pod<A: Api>(api: &A, ds: &DaemonSet, p: &Pod) -> Result<(), ClientError> {
    let req = DeleteRequest {
        namespace: p.namespace().into(),
        name: p.name().into(),
        preconditions: Some(Preconditions {
            uid: uid_of(p).into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    match api.delete::<Pod>(&req).await {
        Ok(_) => {
            api.record(
                COMPONENT,
                ds,
                "Normal",
                "SuccessfulDelete",
                format!("Deleted pod: {}", p.name()),
            );
            Ok(())
        }
        Err(e) if e.is_not_found() || e.is_conflict() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The DaemonSet's pod for `node` (empty: the pod as any node would get it).
fn pod_for(
    ds: &DaemonSet,
    template: &flotilla_proto::api::PodTemplateSpec,
    hash: &str,
    node: &str,
) -> Pod {
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut spec = template.spec.clone().unwrap_or_default();
    for t in daemon_tolerations() {
        if !spec.tolerations.contains(&t) {
            spec.tolerations.push(t);
        }
    }
    spec.node_name = node.into();
    let mut labels = tmeta.labels;
    labels.insert(HASH_LABEL.into(), hash.into());
    Pod {
        metadata: Some(ObjectMeta {
            namespace: ds.namespace().into(),
            generate_name: format!("{}-", ds.name()),
            labels,
            annotations: tmeta.annotations,
            owner_references: vec![controller_ref(ds)],
            ..Default::default()
        }),
        spec: Some(spec),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
