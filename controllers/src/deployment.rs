//! The Deployment controller: one ReplicaSet per pod template (told apart by the
//! `pod-template-hash` label), moved from old to new by the strategy.
//!
//! RollingUpdate follows Kubernetes' algorithm: the new set grows while the sum of all
//! sets' replicas stays within `replicas + maxSurge`; old sets shrink while the available
//! pods stay at or above `replicas - maxUnavailable` (unavailable old pods go first).
//! Recreate scales the old sets to zero, waits until their pods are gone, then scales the
//! new one up. Every write is a compare-and-set against the version the decision was made
//! from, so a decision taken on a stale cache fails and is taken again.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::json::to_value;
use flotilla_proto::api::{
    Deployment, DeploymentCondition, DeploymentStatus, LabelSelector, ObjectMeta, Pod,
    PodTemplateSpec, ReplicaSet, ReplicaSetSpec, Resource, time,
};

use crate::Ctx;
use crate::queue::Requeue;
use crate::util::{
    controller_of, controller_ref, is_deleting, key_of, labels_of, record_event, selector,
    split_key, uid_of,
};

const COMPONENT: &str = "deployment-controller";
pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
const DEFAULT_HISTORY_LIMIT: i32 = 10;
const DEFAULT_PROGRESS_DEADLINE: i32 = 600;

pub fn on_deployment(ctx: &Ctx, change: &Change<Deployment>) {
    match change {
        Change::Added(d) | Change::Updated { new: d, .. } | Change::Deleted(d) => {
            ctx.deployment.add(key_of(d))
        }
    }
}

pub fn on_replica_set(ctx: &Ctx, change: &Change<ReplicaSet>) {
    let rs = match change {
        Change::Added(rs) | Change::Updated { new: rs, .. } | Change::Deleted(rs) => rs,
    };
    if let Some(o) = controller_of(rs.metadata.as_ref()) {
        if o.kind == Deployment::KIND {
            ctx.deployment.add(format!("{}/{}", rs.namespace(), o.name));
        }
    } else if let Some(i) = ctx.try_informers() {
        // An orphan: the deployments that may adopt it.
        let labels = labels_of(rs);
        for d in i.deployments.list_namespace(rs.namespace(), |d| {
            selector(d.spec.as_ref().and_then(|s| s.selector.as_ref()))
                .is_some_and(|s| s.matches(&labels))
        }) {
            ctx.deployment.add(key_of(&d));
        }
    }
}

/// A value of maxSurge / maxUnavailable: a count, or a percentage of `total` rounded up or
/// down.
pub fn scaled_value(v: &str, total: i32, round_up: bool) -> Result<i32, String> {
    let v = v.trim();
    if let Some(p) = v.strip_suffix('%') {
        let p: i64 = p
            .parse()
            .map_err(|_| format!("{v:?} is not a count or a percentage"))?;
        let scaled = p * i64::from(total);
        let value = if round_up {
            (scaled + 99).div_euclid(100)
        } else {
            scaled.div_euclid(100)
        };
        Ok(value as i32)
    } else {
        v.parse()
            .map_err(|_| format!("{v:?} is not a count or a percentage"))
    }
}

/// (maxSurge, maxUnavailable) as counts, as Kubernetes resolves them: surge rounds up,
/// unavailable rounds down, both zero becomes one unavailable, unavailable at most
/// `replicas`.
pub fn fenceposts(d: &Deployment) -> (i32, i32) {
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.clone())
        .unwrap_or_default();
    let or_default = |s: &str| {
        if s.is_empty() {
            "25%".to_string()
        } else {
            s.to_string()
        }
    };
    let surge = scaled_value(&or_default(&ru.max_surge), desired, true).unwrap_or(0);
    let mut unavailable =
        scaled_value(&or_default(&ru.max_unavailable), desired, false).unwrap_or(0);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    (surge.max(0), unavailable.clamp(0, desired.max(0)))
}

/// FNV-1a over the template's JSON, written with the alphabet Kubernetes uses for hashes
/// (no vowels, so no words).
pub fn template_hash(template: &PodTemplateSpec, collisions: i32) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    feed(to_value(template).to_string().as_bytes());
    if collisions > 0 {
        feed(&collisions.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut out = String::new();
    let mut v = h;
    for _ in 0..10 {
        out.push(ALPHABET[(v % ALPHABET.len() as u64) as usize] as char);
        v /= ALPHABET.len() as u64;
    }
    out
}

/// The template without the hash label (how a set's template is compared with the
/// deployment's).
fn without_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(m) = t.metadata.as_mut() {
        m.labels.remove(HASH_LABEL);
    }
    t
}

pub fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .as_ref()
        .and_then(|m| m.annotations.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn available_of(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .map(|s| s.available_replicas)
        .unwrap_or(0)
}

pub async fn reconcile(ctx: &Ctx, key: &str) -> Result<Requeue, ClientError> {
    let (ns, name) = split_key(key);
    let informers = ctx.informers();
    let Some(d) = informers.deployments.get(ns, name) else {
        return Ok(None);
    };
    if is_deleting(&d) {
        return Ok(None);
    }
    let spec = d.spec.clone().unwrap_or_default();
    let Some(sel) = selector(spec.selector.as_ref()) else {
        tracing::warn!(deployment = key, "no usable selector: nothing to do");
        return Ok(None);
    };
    let uid = uid_of(&d).to_string();
    // Claim the sets: ours, and orphans that match (adopted).
    let mut sets = Vec::new();
    for rs in
        informers
            .replica_sets
            .list_namespace(ns, |rs| match controller_of(rs.metadata.as_ref()) {
                Some(o) => o.uid == uid,
                None => !is_deleting(rs) && sel.matches(&labels_of(rs)),
            })
    {
        if controller_of(rs.metadata.as_ref()).is_some() {
            sets.push(rs);
            continue;
        }
        let mut adopted = rs.clone();
        adopted
            .metadata
            .get_or_insert_default()
            .owner_references
            .push(controller_ref(&d));
        match ctx.client.update(&adopted).await {
            Ok(rs) => sets.push(rs),
            Err(e) if e.is_conflict() || e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let template = spec.template.clone().unwrap_or_default();
    let new_index = sets.iter().position(|rs| {
        rs.spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .is_some_and(|t| without_hash(t) == template)
    });
    let max_revision = sets.iter().map(revision_of).max().unwrap_or(0);

    if spec.paused {
        return sync_status(ctx, &d, &sets, new_index, false).await;
    }

    let desired = spec.replicas.unwrap_or(1).max(0);
    let recreate = spec
        .strategy
        .as_ref()
        .is_some_and(|s| s.r#type == "Recreate");
    let new_index = match new_index {
        Some(i) => {
            // A rollback to an old template makes its set the newest revision again.
            if revision_of(&sets[i]) < max_revision
                || (revision_of(&sets[i]) == 0 && max_revision == 0)
            {
                let mut rs = sets[i].clone();
                let meta = rs.metadata.get_or_insert_default();
                meta.annotations
                    .insert(REVISION.into(), (max_revision + 1).to_string());
                copy_change_cause(&d, meta);
                sets[i] = ctx.client.update(&rs).await?;
            }
            i
        }
        None => {
            let old_total: i32 = sets.iter().map(replicas_of).sum();
            let start = if recreate {
                0
            } else {
                let (surge, _) = fenceposts(&d);
                if old_total == 0 {
                    desired
                } else {
                    (desired + surge - old_total).clamp(0, desired)
                }
            };
            match create_new_set(ctx, &d, &template, start, max_revision + 1).await? {
                Some((rs, created)) => {
                    if created && start > 0 {
                        scaled_event(ctx, &d, &rs, 0, start);
                    }
                    sets.push(rs);
                    sets.len() - 1
                }
                // A name collision: the status now counts it; try again with a new hash.
                None => return Ok(Some(Duration::ZERO)),
            }
        }
    };

    if recreate {
        rollout_recreate(ctx, &d, &mut sets, new_index, desired).await?;
    } else {
        rollout_rolling(ctx, &d, &mut sets, new_index, desired).await?;
    }
    cleanup(ctx, &d, &sets, new_index).await?;
    sync_status(ctx, &d, &sets, Some(new_index), true).await
}

fn copy_change_cause(d: &Deployment, meta: &mut ObjectMeta) {
    if let Some(cause) = d
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.get(CHANGE_CAUSE))
    {
        meta.annotations.insert(CHANGE_CAUSE.into(), cause.clone());
    }
}

/// Creates the set for the current template (with whether this call created it); `None`
/// when its name is taken by a set with another template (the collision count is bumped so
/// the next hash differs).
async fn create_new_set(
    ctx: &Ctx,
    d: &Deployment,
    template: &PodTemplateSpec,
    replicas: i32,
    revision: i64,
) -> Result<Option<(ReplicaSet, bool)>, ClientError> {
    let spec = d.spec.clone().unwrap_or_default();
    let collisions = d
        .status
        .as_ref()
        .and_then(|s| s.collision_count)
        .unwrap_or(0);
    let hash = template_hash(template, collisions);
    let mut t = template.clone();
    t.metadata
        .get_or_insert_default()
        .labels
        .insert(HASH_LABEL.into(), hash.clone());
    let mut selector = spec.selector.clone().unwrap_or_default();
    selector
        .match_labels
        .insert(HASH_LABEL.into(), hash.clone());
    let mut labels: BTreeMap<String, String> = t
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.clone());
    let mut meta = ObjectMeta {
        name: format!("{}-{hash}", d.name()),
        namespace: d.namespace().to_string(),
        labels,
        owner_references: vec![controller_ref(d)],
        ..Default::default()
    };
    meta.annotations
        .insert(REVISION.into(), revision.to_string());
    copy_change_cause(d, &mut meta);
    let rs = ReplicaSet {
        metadata: Some(meta),
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            selector: Some(LabelSelector {
                match_labels: selector.match_labels,
                match_expressions: selector.match_expressions,
            }),
            template: Some(t),
            min_ready_seconds: spec.min_ready_seconds,
        }),
        ..Default::default()
    };
    match ctx.client.create(&rs).await {
        Ok(rs) => Ok(Some((rs, true))),
        Err(e) if e.is_already_exists() => {
            let existing = ctx
                .client
                .get::<ReplicaSet>(d.namespace(), &format!("{}-{hash}", d.name()))
                .await?;
            let same = existing
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|et| without_hash(et) == *template);
            let ours =
                controller_of(existing.metadata.as_ref()).is_some_and(|o| o.uid == uid_of(d));
            if same && ours {
                // Our own, not yet in the cache.
                return Ok(Some((existing, false)));
            }
            let mut bumped = d.clone();
            bumped.status.get_or_insert_default().collision_count = Some(collisions + 1);
            ctx.client.update_status(&bumped).await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn scale(ctx: &Ctx, d: &Deployment, rs: &mut ReplicaSet, to: i32) -> Result<(), ClientError> {
    let from = replicas_of(rs);
    if from == to {
        return Ok(());
    }
    let mut updated = rs.clone();
    let spec = updated.spec.get_or_insert_default();
    spec.replicas = Some(to);
    let meta = updated.metadata.get_or_insert_default();
    let (surge, _) = fenceposts(d);
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    meta.annotations.insert(
        "deployment.kubernetes.io/desired-replicas".into(),
        desired.to_string(),
    );
    meta.annotations.insert(
        "deployment.kubernetes.io/max-replicas".into(),
        (desired + surge).to_string(),
    );
    *rs = ctx.client.update(&updated).await?;
    scaled_event(ctx, d, rs, from, to);
    Ok(())
}

fn scaled_event(ctx: &Ctx, d: &Deployment, rs: &ReplicaSet, from: i32, to: i32) {
    let dir = if to > from {
        "Scaled up"
    } else {
        "Scaled down"
    };
    record_event(
        &ctx.client,
        COMPONENT,
        d,
        "Normal",
        "ScalingReplicaSet",
        format!("{dir} replica set {} from {from} to {to}", rs.name()),
    );
}

async fn rollout_rolling(
    ctx: &Ctx,
    d: &Deployment,
    sets: &mut [ReplicaSet],
    new: usize,
    desired: i32,
) -> Result<(), ClientError> {
    let (surge, max_unavailable) = fenceposts(d);
    // Grow the new set within the surge.
    let new_replicas = replicas_of(&sets[new]);
    if new_replicas > desired {
        scale(ctx, d, &mut sets[new], desired).await?;
    } else if new_replicas < desired {
        let total: i32 = sets.iter().map(replicas_of).sum();
        let max_total = desired + surge;
        if total < max_total {
            let up = (max_total - total).min(desired - new_replicas);
            scale(ctx, d, &mut sets[new], new_replicas + up).await?;
        }
    }
    // Shrink the old sets while enough stays available.
    let old: Vec<usize> = oldest_first(sets, new);
    let old_total: i32 = old.iter().map(|&i| replicas_of(&sets[i])).sum();
    if old_total == 0 {
        return Ok(());
    }
    let all_total: i32 = sets.iter().map(replicas_of).sum();
    let min_available = desired - max_unavailable;
    let new_unavailable = replicas_of(&sets[new]) - available_of(&sets[new]);
    let max_scaled_down = all_total - min_available - new_unavailable;
    if max_scaled_down <= 0 {
        return Ok(());
    }
    // First the old sets' unavailable pods: removing them costs no availability.
    let mut cleaned = 0;
    for &i in &old {
        if cleaned >= max_scaled_down {
            break;
        }
        let r = replicas_of(&sets[i]);
        let unhealthy = r - available_of(&sets[i]).min(r);
        if unhealthy <= 0 {
            continue;
        }
        let down = unhealthy.min(max_scaled_down - cleaned);
        scale(ctx, d, &mut sets[i], r - down).await?;
        cleaned += down;
    }
    // Then available old pods, as far as the available minimum allows.
    let available: i32 = sets
        .iter()
        .map(|rs| available_of(rs).min(replicas_of(rs)))
        .sum();
    if available <= min_available {
        return Ok(());
    }
    let mut budget = available - min_available;
    for &i in &old {
        if budget <= 0 {
            break;
        }
        let r = replicas_of(&sets[i]);
        if r == 0 {
            continue;
        }
        let down = r.min(budget);
        scale(ctx, d, &mut sets[i], r - down).await?;
        budget -= down;
    }
    Ok(())
}

async fn rollout_recreate(
    ctx: &Ctx,
    d: &Deployment,
    sets: &mut [ReplicaSet],
    new: usize,
    desired: i32,
) -> Result<(), ClientError> {
    for i in oldest_first(sets, new) {
        scale(ctx, d, &mut sets[i], 0).await?;
    }
    // Wait for every old pod to be gone (terminating ones included).
    let old_uids: Vec<String> = oldest_first(sets, new)
        .into_iter()
        .map(|i| uid_of(&sets[i]).to_string())
        .collect();
    let old_pods = ctx
        .informers()
        .pods
        .list_namespace(d.namespace(), |p: &Pod| {
            let phase = p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
            phase != "Succeeded"
                && phase != "Failed"
                && controller_of(p.metadata.as_ref()).is_some_and(|o| old_uids.contains(&o.uid))
        });
    if !old_pods.is_empty() {
        return Ok(());
    }
    scale(ctx, d, &mut sets[new], desired).await
}

/// Indexes of the old sets, lowest revision first.
fn oldest_first(sets: &[ReplicaSet], new: usize) -> Vec<usize> {
    let mut old: Vec<usize> = (0..sets.len()).filter(|&i| i != new).collect();
    old.sort_by_key(|&i| (revision_of(&sets[i]), sets[i].name().to_string()));
    old
}

/// Deletes old, empty sets beyond `revisionHistoryLimit`, oldest first.
async fn cleanup(
    ctx: &Ctx,
    d: &Deployment,
    sets: &[ReplicaSet],
    new: usize,
) -> Result<(), ClientError> {
    let limit = d
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .max(0) as usize;
    let empty: Vec<usize> = oldest_first(sets, new)
        .into_iter()
        .filter(|&i| {
            replicas_of(&sets[i]) == 0
                && sets[i].status.as_ref().is_none_or(|s| s.replicas == 0)
                && !is_deleting(&sets[i])
        })
        .collect();
    let old_count = oldest_first(sets, new).len();
    if old_count <= limit {
        return Ok(());
    }
    for &i in empty.iter().take(old_count - limit) {
        match ctx
            .client
            .delete_named::<ReplicaSet>(d.namespace(), sets[i].name())
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Computes the status from the sets and writes it when it changed.
async fn sync_status(
    ctx: &Ctx,
    d: &Deployment,
    sets: &[ReplicaSet],
    new: Option<usize>,
    progressing: bool,
) -> Result<Requeue, ClientError> {
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0);
    let (_, max_unavailable) = fenceposts(d);
    let old = d.status.clone().unwrap_or_default();
    let sum = |f: fn(&ReplicaSet) -> i32| sets.iter().map(f).sum::<i32>();
    let mut status = DeploymentStatus {
        observed_generation: d.metadata.as_ref().map(|m| m.generation).unwrap_or(0),
        replicas: sum(|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)),
        updated_replicas: new
            .map(|i| sets[i].status.as_ref().map(|s| s.replicas).unwrap_or(0))
            .unwrap_or(0),
        ready_replicas: sum(|rs| rs.status.as_ref().map(|s| s.ready_replicas).unwrap_or(0)),
        available_replicas: sum(available_of),
        unavailable_replicas: 0,
        conditions: old.conditions.clone(),
        collision_count: old.collision_count,
    };
    status.unavailable_replicas = (desired - status.available_replicas).max(0);
    let now = time::now();
    let (avail_status, avail_reason, avail_msg) =
        if status.available_replicas >= desired - max_unavailable {
            (
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        } else {
            (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        };
    set_condition(
        &mut status.conditions,
        "Available",
        avail_status,
        avail_reason,
        avail_msg,
        &now,
    );

    let old_replicas: i32 = sets
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != new)
        .map(|(_, rs)| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) + replicas_of(rs))
        .sum();
    let complete = new.is_some()
        && status.updated_replicas == desired
        && status.replicas == desired
        && status.available_replicas == desired
        && old_replicas == 0;
    let new_name = new.map(|i| sets[i].name().to_string()).unwrap_or_default();
    let deadline = Duration::from_secs(
        spec.progress_deadline_seconds
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE)
            .max(1) as u64,
    );
    let mut requeue = None;
    if spec.paused {
        set_condition(
            &mut status.conditions,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused",
            &now,
        );
    } else if complete {
        set_condition(
            &mut status.conditions,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            &now,
        );
    } else if progressing {
        let moved = status.replicas != old.replicas
            || status.updated_replicas != old.updated_replicas
            || status.ready_replicas != old.ready_replicas
            || status.available_replicas != old.available_replicas
            || status.observed_generation != old.observed_generation;
        let current = status
            .conditions
            .iter()
            .find(|c| c.r#type == "Progressing")
            .cloned();
        let last_update = current
            .as_ref()
            .and_then(|c| time::parse(&c.last_update_time));
        let exceeded = current
            .as_ref()
            .is_some_and(|c| c.reason == "ProgressDeadlineExceeded");
        if moved
            || current
                .as_ref()
                .is_none_or(|c| c.reason == "NewReplicaSetAvailable")
        {
            set_condition(
                &mut status.conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                &format!("ReplicaSet \"{new_name}\" is progressing."),
                &now,
            );
            // Progress restarts the deadline.
            if let Some(c) = status
                .conditions
                .iter_mut()
                .find(|c| c.r#type == "Progressing")
            {
                c.last_update_time = now.clone();
            }
            requeue = Some(deadline);
        } else if !exceeded {
            let since = last_update.unwrap_or(SystemTime::now());
            let waited = SystemTime::now().duration_since(since).unwrap_or_default();
            if waited >= deadline {
                set_condition(
                    &mut status.conditions,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{new_name}\" has timed out progressing."),
                    &now,
                );
                record_event(
                    &ctx.client,
                    COMPONENT,
                    d,
                    "Warning",
                    "ProgressDeadlineExceeded",
                    format!("Deployment {:?} has timed out progressing", d.name()),
                );
            } else {
                requeue = Some(deadline - waited + Duration::from_millis(50));
            }
        }
    }
    if !same_status(&old, &status) {
        let mut updated = d.clone();
        updated.status = Some(status);
        ctx.client.update_status(&updated).await?;
    }
    Ok(requeue)
}

/// Equal but for the times in conditions that did not change.
fn same_status(a: &DeploymentStatus, b: &DeploymentStatus) -> bool {
    let strip = |s: &DeploymentStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_update_time.clear();
            c.last_transition_time.clear();
        }
        s
    };
    strip(a) == strip(b)
}

fn set_condition(
    conditions: &mut Vec<DeploymentCondition>,
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    match conditions.iter_mut().find(|c| c.r#type == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.to_string();
            }
            if c.status != status || c.reason != reason || c.message != message {
                c.last_update_time = now.to_string();
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conditions.push(DeploymentCondition {
            r#type: kind.into(),
            status: status.into(),
            last_update_time: now.into(),
            last_transition_time: now.into(),
            reason: reason.into(),
            message: message.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::api::{DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};

    fn deployment(replicas: i32, surge: &str, unavailable: &str) -> Deployment {
        Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(replicas),
                strategy: Some(DeploymentStrategy {
                    r#type: "RollingUpdate".into(),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: surge.into(),
                        max_unavailable: unavailable.into(),
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fenceposts_round_as_kubernetes() {
        // 25% of 10: surge rounds up to 3, unavailable down to 2.
        assert_eq!(fenceposts(&deployment(10, "25%", "25%")), (3, 2));
        assert_eq!(fenceposts(&deployment(10, "", "")), (3, 2));
        assert_eq!(fenceposts(&deployment(3, "1", "0")), (1, 0));
        // Both zero: one may be unavailable.
        assert_eq!(fenceposts(&deployment(3, "0", "0")), (0, 1));
        assert_eq!(fenceposts(&deployment(1, "0%", "10%")), (0, 1));
        // Unavailable never more than the replicas.
        assert_eq!(fenceposts(&deployment(2, "0", "5")), (0, 2));
        assert_eq!(fenceposts(&deployment(5000, "25%", "0")), (1250, 0));
    }

    #[test]
    fn scaled_values() {
        assert_eq!(scaled_value("30%", 7, true), Ok(3));
        assert_eq!(scaled_value("30%", 7, false), Ok(2));
        assert_eq!(scaled_value("4", 7, false), Ok(4));
        assert!(scaled_value("x%", 7, false).is_err());
        assert!(scaled_value("", 7, false).is_err());
    }

    #[test]
    fn hashes_are_stable_and_differ_by_template_and_collisions() {
        let mut t = PodTemplateSpec::default();
        let a = template_hash(&t, 0);
        assert_eq!(a, template_hash(&t, 0));
        assert_eq!(a.len(), 10);
        assert_ne!(a, template_hash(&t, 1));
        t.metadata
            .get_or_insert_default()
            .labels
            .insert("app".into(), "web".into());
        assert_ne!(a, template_hash(&t, 0));
        assert!(a.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
    }
}
