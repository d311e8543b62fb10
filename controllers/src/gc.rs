//! The garbage collector: owner references drive cascading deletion.
//!
//! - *background* (the default): the owner goes at once; its dependents, whose owners are
//!   all gone, are then deleted here;
//! - *foreground*: the owner stays (deletionTimestamp and the `foregroundDeletion`
//!   finalizer) until every dependent is gone; dependents are deleted in the foreground
//!   too, so a Deployment waits for its ReplicaSets, which wait for their pods;
//! - *orphan*: the owner's reference is removed from every dependent, then the owner goes
//!   (the `orphan` finalizer).
//!
//! Owners followed: Deployments, ReplicaSets, DaemonSets, Jobs, CronJobs, Pods (`with_collected!`);
//! dependents: Pods, ReplicaSets, Jobs (`for_each_dependent_kind!`).
//!
//! An owner is judged gone only after the API (not the cache, which may lag) says so.

use std::time::Duration;

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    CronJob, DaemonSet, DeleteRequest, Deployment, Job, Pod, ReplicaSet, Resource,
};

use crate::queue::Requeue;
use crate::util::{is_deleting, key_of, split_key, uid_of};
use crate::{Ctx, Informers};

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// The queue key of an object: `Kind|namespace/name`.
pub fn key(kind: &str, object_key: &str) -> String {
    format!("{kind}|{object_key}")
}

/// Runs `$body` with `$k` the type of the collected kind named `$kind`, or `$other` for a
/// kind the collector does not follow: the one list of those kinds, with [`Collected`].
macro_rules! with_collected {
    ($kind:expr, $k:ident => $body:expr, _ => $other:expr) => {
        match $kind {
            "Pod" => {
                type $k = Pod;
                $body
            }
            "ReplicaSet" => {
                type $k = ReplicaSet;
                $body
            }
            "Deployment" => {
                type $k = Deployment;
                $body
            }
            "Job" => {
                type $k = Job;
                $body
            }
            "CronJob" => {
                type $k = CronJob;
                $body
            }
            "DaemonSet" => {
                type $k = DaemonSet;
                $body
            }
            _ => $other,
        }
    };
}

/// Kinds the collector follows, as owners and as dependents.
trait Collected: Resource {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self>;
}

impl Collected for Pod {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.pods
    }
}
impl Collected for ReplicaSet {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.replica_sets
    }
}
impl Collected for Deployment {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.deployments
    }
}
impl Collected for Job {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.jobs
    }
}
impl Collected for DaemonSet {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.daemon_sets
    }
}
impl Collected for CronJob {
    fn informer(i: &Informers) -> &flotilla_client::informer::Informer<Self> {
        &i.cron_jobs
    }
}

fn owner_refs<K: Resource>(o: &K) -> &[flotilla_proto::api::OwnerReference] {
    o.metadata()
        .map(|m| m.owner_references.as_slice())
        .unwrap_or(&[])
}

fn has_finalizer<K: Resource>(o: &K, f: &str) -> bool {
    o.metadata()
        .is_some_and(|m| m.finalizers.iter().any(|x| x == f))
}

pub fn on_dependent<K: Resource>(ctx: &Ctx, change: &Change<K>) {
    match change {
        Change::Added(o) | Change::Updated { new: o, .. } => {
            let finalizing =
                is_deleting(o) && (has_finalizer(o, FOREGROUND) || has_finalizer(o, ORPHAN));
            if !owner_refs(o).is_empty() || finalizing {
                ctx.gc.add(key(K::KIND, &key_of(o)));
            }
        }
        Change::Deleted(o) => {
            // An owner in foreground deletion may be waiting for this one.
            for r in owner_refs(o) {
                ctx.gc
                    .add(key(&r.kind, &format!("{}/{}", o.namespace(), r.name)));
            }
        }
    }
}

pub fn on_owner<K: Resource>(ctx: &Ctx, change: &Change<K>) {
    match change {
        Change::Added(o) | Change::Updated { new: o, .. } => {
            if is_deleting(o) && (has_finalizer(o, FOREGROUND) || has_finalizer(o, ORPHAN)) {
                ctx.gc.add(key(K::KIND, &key_of(o)));
            }
        }
        Change::Deleted(o) => {
            let Some(i) = ctx.try_informers() else {
                return;
            };
            let uid = uid_of(o).to_string();
            for k in dependents_keys(i, o.namespace(), &uid) {
                ctx.gc.add(k);
            }
        }
    }
}

fn refers_to<K: Resource>(o: &K, uid: &str) -> bool {
    owner_refs(o).iter().any(|r| r.uid == uid)
}

/// Runs `$body` once per kind that is a dependent of others (owned through owner
/// references), with `$k` that kind's type: the one list of them.
macro_rules! for_each_dependent_kind {
    ($k:ident => $body:expr) => {{
        {
            type $k = Pod;
            $body;
        }
        {
            type $k = ReplicaSet;
            $body;
        }
        {
            type $k = Job;
            $body;
        }
    }};
}

/// Queue keys of every object that names `uid` as an owner.
fn dependents_keys(i: &Informers, namespace: &str, uid: &str) -> Vec<String> {
    fn of<K: Collected>(i: &Informers, namespace: &str, uid: &str) -> Vec<String> {
        K::informer(i)
            .list_namespace(namespace, |o| refers_to(o, uid))
            .iter()
            .map(|o| key(K::KIND, &key_of(o)))
            .collect()
    }
    let mut keys = Vec::new();
    for_each_dependent_kind!(D => keys.extend(of::<D>(i, namespace, uid)));
    keys
}

pub async fn reconcile(ctx: &Ctx, queue_key: &str) -> Result<Requeue, ClientError> {
    let Some((kind, object_key)) = queue_key.split_once('|') else {
        return Ok(None);
    };
    let (ns, name) = split_key(object_key);
    with_collected!(kind, K => collect::<K>(ctx, ns, name).await, _ => Ok(None))
}

async fn collect<K: Collected>(ctx: &Ctx, ns: &str, name: &str) -> Result<Requeue, ClientError> {
    let Some(o) = K::informer(ctx.informers()).get(ns, name) else {
        return Ok(None);
    };
    if is_deleting(&o) && has_finalizer(&o, ORPHAN) {
        return orphan_dependents(ctx, &o).await;
    }
    if is_deleting(&o) && has_finalizer(&o, FOREGROUND) {
        return delete_dependents_first(ctx, &o).await;
    }
    if !is_deleting(&o) && !owner_refs(&o).is_empty() {
        let mut all_gone = true;
        for r in owner_refs(&o) {
            if !owner_gone(ctx, ns, r).await? {
                all_gone = false;
                break;
            }
        }
        if all_gone {
            let req = DeleteRequest {
                namespace: ns.to_string(),
                name: name.to_string(),
                preconditions: Some(flotilla_proto::api::Preconditions {
                    uid: uid_of(&o).to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match ctx.client.delete::<K>(&req).await {
                Ok(_) => tracing::debug!("collected {} {ns}/{name}: its owners are gone", K::KIND),
                Err(e) if e.is_not_found() || e.is_conflict() => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

/// Whether the owner a reference names no longer exists (checked through the API).
async fn owner_gone(
    ctx: &Ctx,
    ns: &str,
    r: &flotilla_proto::api::OwnerReference,
) -> Result<bool, ClientError> {
    async fn check<K: Collected>(
        ctx: &Ctx,
        ns: &str,
        r: &flotilla_proto::api::OwnerReference,
    ) -> Result<bool, ClientError> {
        // A kind of the same name in another group is not one we follow.
        if !r.api_version.is_empty() && r.api_version != K::API_VERSION {
            return Ok(false);
        }
        if let Some(o) = K::informer(ctx.informers()).get(ns, &r.name)
            && uid_of(&o) == r.uid
        {
            return Ok(false);
        }
        match ctx.client.get::<K>(ns, &r.name).await {
            Ok(o) => Ok(uid_of(&o) != r.uid),
            Err(e) if e.is_not_found() => Ok(true),
            Err(e) => Err(e),
        }
    }
    // A kind we don't follow: never collect on its account.
    with_collected!(r.kind.as_str(), K => check::<K>(ctx, ns, r).await, _ => Ok(false))
}

/// Dependents of kind `K` of `uid` in `ns`, as the API has them now.
async fn live_dependents<K: Collected>(
    ctx: &Ctx,
    ns: &str,
    uid: &str,
) -> Result<Vec<K>, ClientError> {
    let req = flotilla_proto::api::ListRequest {
        namespace: ns.to_string(),
        ..Default::default()
    };
    let (items, _) = ctx.client.list::<K>(&req).await?;
    Ok(items.into_iter().filter(|o| refers_to(o, uid)).collect())
}

async fn remove_finalizer<K: Collected>(ctx: &Ctx, o: &K, f: &str) -> Result<(), ClientError> {
    let mut updated = o.clone();
    updated.metadata_mut().finalizers.retain(|x| x != f);
    match ctx.client.update(&updated).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

async fn orphan_dependents<K: Collected>(ctx: &Ctx, owner: &K) -> Result<Requeue, ClientError> {
    async fn release<D: Collected>(ctx: &Ctx, ns: &str, uid: &str) -> Result<(), ClientError> {
        let dependents = live_dependents::<D>(ctx, ns, uid).await?;
        for mut d in dependents {
            d.metadata_mut().owner_references.retain(|r| r.uid != uid);
            ctx.client.update(&d).await?;
        }
        Ok(())
    }
    let uid = uid_of(owner).to_string();
    let ns = owner.namespace();
    for_each_dependent_kind!(D => release::<D>(ctx, ns, &uid).await?);
    remove_finalizer(ctx, owner, ORPHAN).await?;
    Ok(None)
}

async fn delete_dependents_first<K: Collected>(
    ctx: &Ctx,
    owner: &K,
) -> Result<Requeue, ClientError> {
    /// Deletes the dependents of kind `D` (pods plainly: they own nothing; others in the
    /// foreground too); returns how many are left.
    async fn delete<D: Collected>(ctx: &Ctx, ns: &str, uid: &str) -> Result<usize, ClientError> {
        let dependents = live_dependents::<D>(ctx, ns, uid).await?;
        for d in dependents.iter().filter(|d| !is_deleting(*d)) {
            let req = DeleteRequest {
                namespace: ns.to_string(),
                name: d.name().to_string(),
                propagation_policy: if D::KIND == Pod::KIND {
                    String::new()
                } else {
                    "Foreground".into()
                },
                ..Default::default()
            };
            match ctx.client.delete::<D>(&req).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(dependents.len())
    }
    let uid = uid_of(owner).to_string();
    let ns = owner.namespace().to_string();
    let mut left = 0;
    for_each_dependent_kind!(D => left += delete::<D>(ctx, &ns, &uid).await?);
    if left == 0 {
        remove_finalizer(ctx, owner, FOREGROUND).await?;
        return Ok(None);
    }
    // Each dependent's deletion queues the owner again; look again anyway in a while.
    Ok(Some(Duration::from_secs(2)))
}
