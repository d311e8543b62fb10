//! The ReplicaSet controller: keeps `replicas` active pods that match the selector and are
//! owned by the set; adopts matching orphans, releases pods that stop matching.
//!
//! *Expectations* keep it from acting twice on the same need: after asking for N creates
//! (or deletes) it waits until its informer has seen all N before it counts pods again, so a
//! slow watch can never make it create more pods than asked. An expectation that is not met
//! within five minutes is dropped (a lost event must not stall the set forever).

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{DeleteRequest, ObjectMeta, Pod, ReplicaSet, ReplicaSetStatus, Resource};

use crate::Ctx;
use crate::queue::{Requeue, WorkQueue};
use crate::util::{
    availability, controller_of, controller_ref, is_active, is_bound, is_deleting, is_ready,
    key_of, labels_of, record_event, selector, split_key, uid_of,
};

const COMPONENT: &str = "replicaset-controller";
/// Most pods created or deleted in one pass (Kubernetes' burstReplicas).
pub const BURST: usize = 500;
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Expectation {
    adds: i64,
    deletes: HashSet<String>,
    since: Instant,
}

/// Per ReplicaSet key: the creates and deletes it has asked for and not yet seen.
#[derive(Default)]
pub struct Expectations {
    map: Mutex<HashMap<String, Expectation>>,
}

impl Expectations {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Expectation>) -> R) -> R {
        f(&mut self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn satisfied(&self, key: &str) -> bool {
        self.with(|m| match m.get(key) {
            None => true,
            Some(e) => {
                (e.adds <= 0 && e.deletes.is_empty()) || e.since.elapsed() > EXPECTATION_TIMEOUT
            }
        })
    }

    pub fn expect_creations(&self, key: &str, n: usize) {
        self.with(|m| {
            m.insert(
                key.to_string(),
                Expectation {
                    adds: n as i64,
                    deletes: HashSet::new(),
                    since: Instant::now(),
                },
            );
        });
    }

    pub fn expect_deletions(&self, key: &str, pods: impl IntoIterator<Item = String>) {
        self.with(|m| {
            m.insert(
                key.to_string(),
                Expectation {
                    adds: 0,
                    deletes: pods.into_iter().collect(),
                    since: Instant::now(),
                },
            );
        });
    }

    pub fn creation_observed(&self, key: &str) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                e.adds -= 1;
            }
        });
    }

    pub fn deletion_observed(&self, key: &str, pod: &str) {
        self.with(|m| {
            if let Some(e) = m.get_mut(key) {
                e.deletes.remove(pod);
            }
        });
    }

    pub fn forget(&self, key: &str) {
        self.with(|m| {
            m.remove(key);
        });
    }
}

pub struct Controller {
    pub queue: Arc<WorkQueue>,
    pub expectations: Expectations,
}

impl Controller {
    pub fn new() -> Self {
        Self {
            queue: WorkQueue::new("replicaset"),
            expectations: Expectations::default(),
        }
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

/// The key of the ReplicaSet that controls `pod`, if one does.
fn owner_key(pod: &Pod) -> Option<String> {
    let o = controller_of(pod.metadata.as_ref())?;
    (o.kind == ReplicaSet::KIND).then(|| format!("{}/{}", pod.namespace(), o.name))
}

/// ReplicaSets of the pod's namespace whose selector matches it (for orphans).
fn matching_sets(ctx: &Ctx, pod: &Pod) -> Vec<String> {
    let Some(i) = ctx.try_informers() else {
        return Vec::new();
    };
    let labels = labels_of(pod);
    i.replica_sets
        .list_namespace(pod.namespace(), |rs| {
            selector(rs.spec.as_ref().and_then(|s| s.selector.as_ref()))
                .is_some_and(|s| s.matches(&labels))
        })
        .iter()
        .map(key_of)
        .collect()
}

pub fn on_pod(ctx: &Ctx, change: &Change<Pod>) {
    let c = &ctx.replicaset;
    match change {
        Change::Added(p) => {
            if let Some(k) = owner_key(p) {
                c.expectations.creation_observed(&k);
                if is_deleting(p) {
                    c.expectations.deletion_observed(&k, &key_of(p));
                }
                c.queue.add(k);
            } else if is_active(p) {
                for k in matching_sets(ctx, p) {
                    c.queue.add(k);
                }
            }
        }
        Change::Updated { old, new } => {
            let (ko, kn) = (owner_key(old), owner_key(new));
            if let Some(k) = &kn
                && is_deleting(new)
                && !is_deleting(old)
            {
                c.expectations.deletion_observed(k, &key_of(new));
            }
            if ko != kn
                && let Some(k) = ko
            {
                c.queue.add(k);
            }
            match kn {
                Some(k) => c.queue.add(k),
                None => {
                    if labels_of(old) != labels_of(new) || is_active(new) {
                        for k in matching_sets(ctx, new) {
                            c.queue.add(k);
                        }
                    }
                }
            }
        }
        Change::Deleted(p) => {
            if let Some(k) = owner_key(p) {
                c.expectations.deletion_observed(&k, &key_of(p));
                c.queue.add(k);
            }
        }
    }
}

pub fn on_replica_set(ctx: &Ctx, change: &Change<ReplicaSet>) {
    let c = &ctx.replicaset;
    match change {
        Change::Added(rs) | Change::Updated { new: rs, .. } => c.queue.add(key_of(rs)),
        Change::Deleted(rs) => c.expectations.forget(&key_of(rs)),
    }
}

/// The order in which pods are given up when scaling down: unscheduled before scheduled,
/// not ready before ready, newest first.
fn deletion_rank(p: &Pod) -> (bool, bool, Reverse<String>) {
    let created = p
        .metadata
        .as_ref()
        .map(|m| m.creation_timestamp.clone())
        .unwrap_or_default();
    (is_bound(p), is_ready(p), Reverse(created))
}

/// A pod made from the set's template, owned by it.
pub fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    Pod {
        metadata: Some(ObjectMeta {
            generate_name: format!("{}-", rs.name()),
            namespace: rs.namespace().to_string(),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            owner_references: vec![controller_ref(rs)],
            ..Default::default()
        }),
        spec: template.spec,
        ..Default::default()
    }
}

pub async fn reconcile(ctx: &Ctx, key: &str) -> Result<Requeue, ClientError> {
    let c = &ctx.replicaset;
    let (ns, name) = split_key(key);
    let informers = ctx.informers();
    let Some(rs) = informers.replica_sets.get(ns, name) else {
        c.expectations.forget(key);
        return Ok(None);
    };
    if is_deleting(&rs) {
        return Ok(None);
    }
    let spec = rs.spec.clone().unwrap_or_default();
    let Some(sel) = selector(spec.selector.as_ref()) else {
        tracing::warn!(replicaset = key, "no usable selector: nothing to do");
        return Ok(None);
    };
    let uid = uid_of(&rs).to_string();
    // Claim: ours that still match, orphans that match (adopted); release ours that don't.
    let mut owned = Vec::new();
    let mut adopt = Vec::new();
    let mut release = Vec::new();
    for p in informers.pods.list_namespace(ns, |p| {
        let ours = controller_of(p.metadata.as_ref()).is_some_and(|o| o.uid == uid);
        let orphan = controller_of(p.metadata.as_ref()).is_none();
        ours || (orphan && is_active(p) && sel.matches(&labels_of(p)))
    }) {
        let ours = controller_of(p.metadata.as_ref()).is_some_and(|o| o.uid == uid);
        let matches = sel.matches(&labels_of(&p));
        match (ours, matches) {
            (true, true) => owned.push(p),
            (true, false) => release.push(p),
            (false, _) => adopt.push(p),
        }
    }
    for mut p in release {
        let meta = p.metadata.get_or_insert_default();
        meta.owner_references.retain(|o| o.uid != uid);
        ctx.client.update(&p).await?;
    }
    for mut p in adopt {
        p.metadata
            .get_or_insert_default()
            .owner_references
            .push(controller_ref(&rs));
        match ctx.client.update(&p).await {
            Ok(p) => owned.push(p),
            // Someone else changed it first: look again next time.
            Err(e) if e.is_conflict() || e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let active: Vec<&Pod> = owned.iter().filter(|p| is_active(p)).collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut result = Ok(());
    if c.expectations.satisfied(key) {
        if active.len() < want {
            result = create_pods(ctx, &rs, key, (want - active.len()).min(BURST)).await;
        } else if active.len() > want {
            let mut victims = active.clone();
            victims.sort_by_key(|p| deletion_rank(p));
            victims.truncate((active.len() - want).min(BURST));
            result = delete_pods(ctx, &rs, key, &victims).await;
        }
    }
    let requeue = update_status(ctx, &rs, &owned, &sel).await?;
    result.map(|_| requeue)
}

async fn create_pods(ctx: &Ctx, rs: &ReplicaSet, key: &str, n: usize) -> Result<(), ClientError> {
    let c = &ctx.replicaset;
    c.expectations.expect_creations(key, n);
    let template = pod_from_template(rs);
    let mut created = Vec::new();
    let mut failure = None;
    // Slow start: 1, 2, 4, … at once, so a template the API refuses fails once, not n times.
    let mut remaining = n;
    let mut batch = 1;
    while remaining > 0 && failure.is_none() {
        let size = batch.min(remaining);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..size {
            let (client, pod) = (ctx.client.clone(), template.clone());
            set.spawn(async move { client.create(&pod).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(p)) => created.push(p.name().to_string()),
                Ok(Err(e)) => {
                    c.expectations.creation_observed(key);
                    failure.get_or_insert(e);
                }
                Err(_) => c.expectations.creation_observed(key),
            }
        }
        remaining -= size;
        batch *= 2;
    }
    // Creates never attempted will never be observed.
    for _ in 0..remaining {
        c.expectations.creation_observed(key);
    }
    if !created.is_empty() {
        record_event(
            &ctx.client,
            COMPONENT,
            rs,
            "Normal",
            "SuccessfulCreate",
            format!("Created {} pod(s): {}", created.len(), summary(&created)),
        );
    }
    match failure {
        Some(e) => {
            record_event(
                &ctx.client,
                COMPONENT,
                rs,
                "Warning",
                "FailedCreate",
                format!("Error creating: {e}"),
            );
            Err(e)
        }
        None => Ok(()),
    }
}

async fn delete_pods(
    ctx: &Ctx,
    rs: &ReplicaSet,
    key: &str,
    victims: &[&Pod],
) -> Result<(), ClientError> {
    let c = &ctx.replicaset;
    c.expectations
        .expect_deletions(key, victims.iter().map(|p| key_of(*p)));
    let mut set = tokio::task::JoinSet::new();
    for p in victims {
        let (client, ns, name, pk) = (
            ctx.client.clone(),
            p.namespace().to_string(),
            p.name().to_string(),
            key_of(*p),
        );
        set.spawn(async move {
            let req = DeleteRequest {
                namespace: ns,
                name: name.clone(),
                ..Default::default()
            };
            (pk, name, client.delete::<Pod>(&req).await)
        });
    }
    let mut deleted = Vec::new();
    let mut failure = None;
    while let Some(r) = set.join_next().await {
        let Ok((pk, name, r)) = r else { continue };
        match r {
            Ok(_) => deleted.push(name),
            Err(e) if e.is_not_found() => c.expectations.deletion_observed(key, &pk),
            Err(e) => {
                c.expectations.deletion_observed(key, &pk);
                failure.get_or_insert(e);
            }
        }
    }
    if !deleted.is_empty() {
        record_event(
            &ctx.client,
            COMPONENT,
            rs,
            "Normal",
            "SuccessfulDelete",
            format!("Deleted {} pod(s): {}", deleted.len(), summary(&deleted)),
        );
    }
    failure.map_or(Ok(()), Err)
}

/// `a, b, c and 7 more`.
fn summary(names: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = names[..names.len().min(SHOWN)].join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Writes the status when it changed; asks to be called again when a ready pod will
/// become available (minReadySeconds).
async fn update_status(
    ctx: &Ctx,
    rs: &ReplicaSet,
    owned: &[Pod],
    sel: &flotilla_proto::api::selector::LabelSelector,
) -> Result<Requeue, ClientError> {
    let spec = rs.spec.clone().unwrap_or_default();
    let min_ready = Duration::from_secs(spec.min_ready_seconds.max(0) as u64);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    let now = SystemTime::now();
    let mut status = ReplicaSetStatus {
        observed_generation: rs.metadata.as_ref().map(|m| m.generation).unwrap_or(0),
        conditions: rs
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        ..Default::default()
    };
    let mut requeue: Option<Duration> = None;
    for p in owned.iter().filter(|p| is_active(p)) {
        status.replicas += 1;
        let labels = labels_of(p);
        if sel.matches(&labels)
            && template_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        {
            status.fully_labeled_replicas += 1;
        }
        if is_ready(p) {
            status.ready_replicas += 1;
        }
        match availability(p, min_ready, now) {
            (true, _) => status.available_replicas += 1,
            (false, Some(wait)) => {
                requeue = Some(requeue.map_or(wait, |r| r.min(wait)) + Duration::from_millis(10))
            }
            (false, None) => {}
        }
    }
    if rs.status.as_ref() != Some(&status) {
        let mut updated = rs.clone();
        updated.status = Some(status);
        ctx.client.update_status(&updated).await?;
    }
    Ok(requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_hold_until_seen() {
        let e = Expectations::default();
        assert!(e.satisfied("a"));
        e.expect_creations("a", 2);
        assert!(!e.satisfied("a"));
        e.creation_observed("a");
        assert!(!e.satisfied("a"));
        e.creation_observed("a");
        assert!(e.satisfied("a"));
        e.expect_deletions("a", ["ns/p1".to_string(), "ns/p2".to_string()]);
        e.deletion_observed("a", "ns/p1");
        assert!(!e.satisfied("a"));
        // Seeing the same deletion twice counts once.
        e.deletion_observed("a", "ns/p1");
        assert!(!e.satisfied("a"));
        e.deletion_observed("a", "ns/p2");
        assert!(e.satisfied("a"));
    }

    fn pod(name: &str, created: &str, bound: bool, ready: bool) -> Pod {
        use flotilla_proto::api::{PodCondition, PodSpec, PodStatus};
        Pod {
            metadata: Some(ObjectMeta {
                name: name.into(),
                creation_timestamp: created.into(),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                node_name: if bound { "n1".into() } else { String::new() },
                ..Default::default()
            }),
            status: Some(PodStatus {
                conditions: vec![PodCondition {
                    r#type: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn least_valuable_pods_go_first() {
        let pods = [
            pod("old-ready", "2026-01-01T00:00:00Z", true, true),
            pod("new-ready", "2026-01-02T00:00:00Z", true, true),
            pod("not-ready", "2026-01-01T00:00:00Z", true, false),
            pod("unscheduled", "2026-01-01T00:00:00Z", false, false),
        ];
        let mut v: Vec<&Pod> = pods.iter().collect();
        v.sort_by_key(|p| deletion_rank(p));
        let names: Vec<&str> = v.iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            ["unscheduled", "not-ready", "new-ready", "old-ready"]
        );
    }

    #[test]
    fn summaries_are_short() {
        let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
        assert_eq!(summary(&names[..2]), "p0, p1");
        assert_eq!(summary(&names), "p0, p1, p2, p3, p4 and 3 more");
    }
}
