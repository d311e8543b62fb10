//! The namespace controller: a namespace being deleted (Terminating) has the objects of
//! every namespaced kind in the registry deleted; once it is empty, deleting it again
//! removes it.

use std::time::Duration;

use flotilla_client::informer::Change;
use flotilla_client::{Client, ClientError, with_kind};
use flotilla_proto::api::{DeleteRequest, KINDS, KindInfo, ListRequest, Namespace, Resource};

use crate::Ctx;
use crate::queue::Requeue;
use crate::util::{is_deleting, key_of};

/// Kinds whose objects own others: deleted first.
const OWNERS_FIRST: &[&str] = &["Deployment", "CronJob", "DaemonSet", "Job", "ReplicaSet"];

pub fn on_namespace(ctx: &Ctx, change: &Change<Namespace>) {
    if let Change::Added(n) | Change::Updated { new: n, .. } = change
        && is_deleting(n)
    {
        ctx.namespace.add(key_of(n));
    }
}

/// Deletes every object of kind `K` in `ns`; returns how many still exist.
async fn empty<K: Resource>(client: &Client, ns: &str) -> Result<usize, ClientError> {
    let req = ListRequest {
        namespace: ns.to_string(),
        ..Default::default()
    };
    let (items, _) = client.list::<K>(&req).await?;
    for o in items.iter().filter(|o| !is_deleting(*o)) {
        let req = DeleteRequest {
            namespace: ns.to_string(),
            name: o.name().to_string(),
            ..Default::default()
        };
        match client.delete::<K>(&req).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(items.len())
}

pub async fn reconcile(ctx: &Ctx, key: &str) -> Result<Requeue, ClientError> {
    let Some(ns) = ctx.informers().namespaces.get("", key) else {
        return Ok(None);
    };
    if !is_deleting(&ns) {
        return Ok(None);
    }
    let c = &ctx.client;
    // Every namespaced kind of the registry, owners first, so the garbage collector has
    // less to chase.
    let mut kinds: Vec<&KindInfo> = KINDS.iter().filter(|k| k.namespaced).collect();
    kinds.sort_by_key(|k| !OWNERS_FIRST.contains(&k.kind));
    let mut left = 0;
    for kind in kinds {
        left += with_kind!(kind.kind, K => empty::<K>(c, key).await?);
    }
    if left > 0 {
        tracing::debug!(namespace = key, left, "namespace still has objects");
        return Ok(Some(Duration::from_secs(1)));
    }
    match c.delete_named::<Namespace>("", key).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    }
    // The API removes the namespace only if nothing was created in the meantime.
    Ok(Some(Duration::from_secs(1)))
}
