//! The DaemonSet controller: one pod of the DaemonSet on every node that should run it,
//! as Kubernetes' DaemonSet controller does.
//!
//! - A node should run the pod when the template's nodeSelector and required node
//!   affinity match it and the pod tolerates its NoSchedule and NoExecute taints
//!   (`flotilla_scheduler::plugins::daemon_placement`); a pod already there may stay under
//!   a NoSchedule taint added since. Cordoning does not count, and the pods tolerate the
//!   not-ready, unreachable and unschedulable taints, so daemons stay on sick and cordoned
//!   nodes, as Kubernetes' do.
//! - The pod is made with `spec.nodeName` set to its node, as Kubernetes did before 1.12:
//!   the scheduler does not place it (nor check the node's free resources).
//! - Nodes that join get a pod; a node that stops matching loses its pod; a node with
//!   two loses the newer; a failed pod is deleted and made again after a back-off (1 s,
//!   doubling per failure on that node, at most 15 min); a node gets a new pod only once
//!   its old one is gone.
//! - Each pod carries `controller-revision-hash`, a hash of the template. `RollingUpdate`
//!   deletes old pods while at most `maxUnavailable` of the nodes that should run the pod
//!   lack an available one (old pods that are not available go first); each node gets
//!   its new pod once the old one is gone. `OnDelete` replaces a pod only when someone
//!   deletes it.
//! - Status: desired, current, misscheduled, ready, available (ready for
//!   `minReadySeconds`), updated and unavailable counts, observedGeneration.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    DaemonSet, DaemonSetStatus, Node, ObjectMeta, Pod, Resource, Toleration,
};

use crate::deployment::{scaled_value, template_hash};
use crate::nodelifecycle::UNREACHABLE_TAINT;
use crate::queue::Requeue;
use crate::runtime::{Api, Controller};
use crate::util::{
    availability, controller_of, controller_ref, delete_exactly, is_deleting, is_ready, phase,
    split_key, uid_of,
};

const COMPONENT: &str = "daemonset-controller";
/// The label holding the hash of the template a pod was made from.
pub const HASH_LABEL: &str = "controller-revision-hash";
/// Pods asked for and not seen within this long are no longer waited for.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether a node's change can change where daemons run: it joined, left, or its labels
/// or taints changed.
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

/// What the controller remembers of one DaemonSet between passes.
struct Memory {
    /// The DaemonSet it is about (a namesake made since starts afresh).
    uid: String,
    /// Node → name of each pod asked for and not yet seen, and since when.
    pending: HashMap<String, String>,
    since: SystemTime,
    /// Node → failed pods in a row there, and when the next may be made.
    backoff: HashMap<String, (u32, SystemTime)>,
}

/// A failed daemon pod's replacement waits 1 s, doubled per failure on that node, up to
/// 15 min (Kubernetes' failed-pods back-off).
const FAILED_BACKOFF_BASE: Duration = Duration::from_secs(1);
const FAILED_BACKOFF_MAX: Duration = Duration::from_secs(900);

/// Remembers, per DaemonSet, the pods it asked for and has not yet seen, and the back-off
/// of nodes whose pods failed.
#[derive(Default)]
pub struct DaemonSetController {
    memory: Mutex<HashMap<String, Memory>>,
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

impl DaemonSetController {
    fn with<R>(
        &self,
        key: &str,
        uid: &str,
        now: SystemTime,
        f: impl FnOnce(&mut Memory) -> R,
    ) -> R {
        let mut all = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let m = all.entry(key.to_string()).or_insert_with(|| Memory {
            uid: uid.to_string(),
            pending: HashMap::new(),
            since: now,
            backoff: HashMap::new(),
        });
        if m.uid != uid {
            *m = Memory {
                uid: uid.to_string(),
                pending: HashMap::new(),
                since: now,
                backoff: HashMap::new(),
            };
        }
        f(m)
    }

    /// Forgets the pods the cache now shows; returns node → pod name of those still unseen.
    fn observe(
        &self,
        key: &str,
        uid: &str,
        pods: &[Pod],
        now: SystemTime,
    ) -> HashMap<String, String> {
        self.with(key, uid, now, |m| {
            m.pending
                .retain(|_, name| !pods.iter().any(|p| p.name() == name));
            if now.duration_since(m.since).unwrap_or_default() > EXPECTATION_TIMEOUT {
                m.pending.clear();
            }
            m.pending.clone()
        })
    }
}

impl Controller for DaemonSetController {
    type Kind = DaemonSet;
    const NAME: &'static str = "daemonset";

    async fn reconcile<A: Api>(&self, api: &A, key: &str) -> Result<Requeue, ClientError> {
        let (ns, name) = split_key(key);
        let Some(ds) = api.get::<DaemonSet>(ns, name) else {
            self.memory
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
        let pending = self.observe(key, &uid, &pods, now);
        let nodes: Vec<Node> = api.list("", |n: &Node| !is_deleting(n));
        let probe = pod_for(&ds, &template, &hash, "");

        // The live pods on each node; failed ones are deleted, to be made again after a
        // back-off; a node whose pod is still stopping gets no new one until it is gone.
        let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut stopping: BTreeSet<&str> = BTreeSet::new();
        let mut doomed: Vec<&Pod> = Vec::new();
        let mut failed_on: Vec<&str> = Vec::new();
        for p in &pods {
            if is_deleting(p) {
                stopping.insert(node_of(p));
            } else if phase(p) == "Failed" {
                doomed.push(p);
                failed_on.push(node_of(p));
                stopping.insert(node_of(p));
            } else {
                by_node.entry(node_of(p)).or_default().push(p);
            }
        }
        let backoff = self.with(key, &uid, now, |m| {
            for node in &failed_on {
                let (n, _) = m.backoff.get(*node).copied().unwrap_or((0, now));
                let delay = FAILED_BACKOFF_BASE
                    .saturating_mul(1 << n.min(20))
                    .min(FAILED_BACKOFF_MAX);
                m.backoff.insert(node.to_string(), (n + 1, now + delay));
            }
            m.backoff.clone()
        });

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
        let mut healthy_nodes: Vec<&str> = Vec::new();
        let mut unavailable = 0;
        let mut requeue: Option<Duration> = None;
        let mut later = |d: Duration| requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
        for node in &nodes {
            let node_name = node.name();
            let here = oldest_first(by_node.remove(node_name).unwrap_or_default());
            let (run, stay) = flotilla_scheduler::plugins::daemon_placement(&probe, node);
            if !run {
                // A pod already there may stay (a NoSchedule taint added since), else goes.
                if !here.is_empty() {
                    status.number_misscheduled += 1;
                    if !stay {
                        doomed.extend(here);
                    }
                }
                continue;
            }
            status.desired_number_scheduled += 1;
            let Some((&first, extra)) = here.split_first() else {
                if pending.contains_key(node_name) {
                    // Asked for with this template, not yet in the cache.
                    status.current_number_scheduled += 1;
                    status.updated_number_scheduled += 1;
                } else if stopping.contains(node_name) {
                    // Made again once the old pod is gone (its deletion queues this set).
                } else if let Some(wait) = backoff
                    .get(node_name)
                    .and_then(|(_, until)| until.duration_since(now).ok())
                    .filter(|w| !w.is_zero())
                {
                    later(wait);
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
                healthy_nodes.push(node_name);
            } else {
                unavailable += 1;
                if let Some(w) = wait {
                    later(w);
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
        self.with(key, &uid, now, |m| {
            for node in &healthy_nodes {
                m.backoff.remove(*node);
            }
        });

        // A rolling update deletes old pods within the unavailability budget; once one is
        // gone, the next pass puts the new one on its node.
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

        // The status is written whatever the writes did, so it stays true when one fails.
        let outcome = self
            .apply(
                api,
                &ds,
                key,
                &template,
                &hash,
                doomed,
                to_create,
                &mut status,
                now,
            )
            .await;
        if ds.status.as_ref() != Some(&status) {
            let mut updated = ds.clone();
            updated.status = Some(status);
            match api.update_status(&updated).await {
                Err(e) if !e.is_not_found() => return Err(e),
                _ => {}
            }
        }
        outcome.map(|_| requeue)
    }
}

impl DaemonSetController {
    /// Deletes the doomed pods and makes the missing ones, counting the made ones in.
    #[allow(clippy::too_many_arguments)]
    async fn apply<A: Api>(
        &self,
        api: &A,
        ds: &DaemonSet,
        key: &str,
        template: &flotilla_proto::api::PodTemplateSpec,
        hash: &str,
        doomed: Vec<&Pod>,
        to_create: Vec<&str>,
        status: &mut DaemonSetStatus,
        now: SystemTime,
    ) -> Result<(), ClientError> {
        for p in doomed {
            delete_pod(api, ds, p).await?;
        }
        let uid = uid_of(ds).to_string();
        for node in to_create {
            let pod = pod_for(ds, template, hash, node);
            let made = match api.create(&pod).await {
                Ok(p) => p,
                Err(e) => {
                    api.record(
                        COMPONENT,
                        ds,
                        "Warning",
                        "FailedCreate",
                        format!("Error creating: {e}"),
                    );
                    return Err(e);
                }
            };
            self.with(key, &uid, now, |m| {
                m.pending.insert(node.to_string(), made.name().to_string());
                m.since = now;
            });
            status.current_number_scheduled += 1;
            status.updated_number_scheduled += 1;
            api.record(
                COMPONENT,
                ds,
                "Normal",
                "SuccessfulCreate",
                format!("Created pod: {}", made.name()),
            );
        }
        Ok(())
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
    match api.delete::<Pod>(&delete_exactly(p, "")).await {
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
