//! The resource quota controller: recounts what each ResourceQuota's namespace uses, so that
//! deleted objects and finished pods give their share back (the API server counts creates in
//! as it admits them, see `apiserver/src/quota.rs`), and fills in a new quota's usage, without
//! which the API server refuses creates it caps ("status unknown").
//!
//! A recount reads the quota, then lists what it caps, then writes `status.used` only if the
//! quota is still as read: a create counted into the quota after the read changed it (so the
//! write fails and the recount starts over), and one counted before it is in the lists, which
//! are read after. Recounts are queued when a quota is created or its caps change, when a
//! counted object is deleted or a pod finishes, and every 30 s with everything else.

use std::collections::BTreeMap;

use flotilla_client::informer::Change;
use flotilla_client::{Client, ClientError, with_kind};
use flotilla_proto::api::quantity::Quantity;
use flotilla_proto::api::quota::{count_name, format, usage};
use flotilla_proto::api::{KINDS, ListRequest, Pod, Resource, ResourceQuota, ResourceQuotaStatus};

use crate::Ctx;
use crate::queue::Requeue;
use crate::util::{key_of, split_key};

/// A quota whose caps changed, or that was never counted, is recounted.
pub fn on_quota(ctx: &Ctx, change: &Change<ResourceQuota>) {
    if let Change::Added(q) | Change::Updated { new: q, .. } = change {
        let hard = q.spec.as_ref().map(|s| &s.hard);
        let counted = q.status.as_ref().map(|s| &s.hard);
        if hard != counted {
            ctx.quota.add(key_of(q));
        }
    }
}

/// A counted object that went away (or a pod that finished) queues its namespace's quotas.
pub fn on_counted<K: Resource>(ctx: &Ctx, change: &Change<K>) {
    let gone = match change {
        Change::Deleted(o) => Some(o.namespace().to_string()),
        Change::Updated { old, new } if K::KIND == Pod::KIND => {
            (usage(old).len() != usage(new).len()).then(|| new.namespace().to_string())
        }
        _ => None,
    };
    let (Some(ns), Some(i)) = (gone, ctx.try_informers()) else {
        return;
    };
    for q in i
        .quotas
        .list()
        .iter()
        .filter(|q| q.namespace() == ns.as_str())
    {
        ctx.quota.add(key_of(q));
    }
}

pub async fn reconcile(ctx: &Ctx, key: &str) -> Result<Requeue, ClientError> {
    let (ns, name) = split_key(key);
    let c = &ctx.client;
    let quota = match c.get::<ResourceQuota>(ns, name).await {
        Ok(q) => q,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e),
    };
    let hard = quota.spec.clone().unwrap_or_default().hard;
    let used = count(c, ns, &hard).await?;
    let status = ResourceQuotaStatus {
        hard: hard.clone(),
        used: hard
            .keys()
            .map(|r| {
                let q = used.get(r).copied().unwrap_or_default();
                (r.clone(), format(r, q))
            })
            .collect(),
    };
    if quota.status.as_ref() == Some(&status) {
        return Ok(None);
    }
    let mut updated = quota;
    updated.status = Some(status);
    // Carries the resourceVersion read above: refused if a create was counted in since.
    c.update_status(&updated).await?;
    Ok(None)
}

/// What namespace `ns` uses of each resource in `hard`, from fresh lists.
async fn count(
    c: &Client,
    ns: &str,
    hard: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Quantity>, ClientError> {
    let mut used: BTreeMap<String, Quantity> = BTreeMap::new();
    let req = ListRequest {
        namespace: ns.to_string(),
        ..Default::default()
    };
    // The kinds whose objects count towards something capped: a served kind counts if the
    // quota caps its count/ name or a name its objects use (pods, services, compute).
    for kind in KINDS.iter().filter(|k| k.namespaced) {
        let count = count_name(kind.plural, kind.api_version);
        let direct = kind.kind == Pod::KIND && hard.keys().any(|r| !r.starts_with("count/"))
            || hard.contains_key(kind.plural)
            || hard.contains_key(&count);
        if !direct {
            continue;
        }
        let totals: Vec<BTreeMap<String, Quantity>> = with_kind!(kind.kind, K => {
            let (items, _) = c.list::<K>(&req).await?;
            items.iter().map(usage).collect::<Vec<_>>()
        });
        for u in totals {
            for (r, q) in u {
                let total = used.entry(r).or_default();
                *total = *total + q;
            }
        }
    }
    Ok(used)
}
