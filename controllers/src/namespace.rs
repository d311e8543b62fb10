//! The namespace controller: a namespace being deleted (Terminating) has everything in it
//! deleted; once it is empty, deleting it again removes it.

use std::time::Duration;

use flotilla_client::informer::Change;
use flotilla_client::{Client, ClientError};
use flotilla_proto::api::{
    DeleteRequest, Deployment, Endpoints, Event, Lease, ListRequest, Namespace, Pod, ReplicaSet,
    Resource, ResourceQuota, Role, RoleBinding, Service,
};

use crate::Ctx;
use crate::queue::Requeue;
use crate::util::{is_deleting, key_of};

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
    // Owners first, so the garbage collector has less to chase.
    let left = empty::<Deployment>(c, key).await?
        + empty::<ReplicaSet>(c, key).await?
        + empty::<Service>(c, key).await?
        + empty::<Pod>(c, key).await?
        + empty::<Endpoints>(c, key).await?
        + empty::<Lease>(c, key).await?
        + empty::<ResourceQuota>(c, key).await?
        + empty::<RoleBinding>(c, key).await?
        + empty::<Role>(c, key).await?
        + empty::<Event>(c, key).await?;
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
