//! ResourceQuota admission: a create is checked against every quota of its namespace that
//! caps something the object uses ([`flotilla_proto::api::quota::usage`]), and counted into
//! each of them in the create's own transaction (compared on the quota's revision), so two
//! creates racing for the last unit cannot both get it, and a create that fails counts
//! nothing. Deletions, and pods that finish, give their share back when the quota controller
//! recounts the namespace (`controllers/src/quota.rs`), as in Kubernetes.
//!
//! The refusals are Kubernetes': `pods "x" is forbidden: exceeded quota: q, requested:
//! pods=1, used: pods=10, limited: pods=10`; `failed quota: q: must specify limits.cpu for:
//! app` for a pod that leaves a capped compute resource unset; `status unknown for quota: q,
//! resource: pods` until the controller has counted a new quota.

use flotilla_proto::api::quantity::Quantity;
use flotilla_proto::api::quota::{format, unset_compute, usage};
use flotilla_proto::api::{Pod, Resource, ResourceQuota};
use flotilla_proto::etcdserverpb::RangeRequest;
use prost::Message;

use crate::errors::{ApiError, ApiResult};
use crate::registry::{Api, prefix_end, prefix_of};

/// A quota a create counts into: written in the create's transaction if still at
/// `mod_revision`.
pub(crate) struct Charge {
    pub key: Vec<u8>,
    pub mod_revision: i64,
    pub value: Vec<u8>,
}

impl Api {
    /// Checks a create of `object` against the quotas of its namespace `ns` (read
    /// linearizably when `fresh`); the quotas to charge.
    pub(crate) async fn admit_quota<K: Resource>(
        &self,
        object: &K,
        ns: &str,
        fresh: bool,
    ) -> ApiResult<Vec<Charge>> {
        if fresh {
            self.node().read_barrier().await?;
        }
        let prefix = prefix_of::<ResourceQuota>(Some(ns));
        let quotas = self.node().kv().range(&RangeRequest {
            range_end: prefix_end(&prefix),
            key: prefix,
            ..Default::default()
        })?;
        if quotas.kvs.is_empty() {
            return Ok(Vec::new());
        }
        let uses = usage(object);
        let forbidden = |why: String| {
            ApiError::Forbidden(format!(
                "{} \"{}\" is forbidden: {why}",
                K::PLURAL,
                object.name()
            ))
        };
        let mut charges = Vec::new();
        for kv in &quotas.kvs {
            let mut quota: ResourceQuota = self.decode(kv)?;
            let qname = quota.name().to_string();
            let hard = quota.spec.clone().unwrap_or_default().hard;
            let capped: Vec<&String> = hard.keys().filter(|r| uses.contains_key(*r)).collect();
            if capped.is_empty() {
                continue;
            }
            if K::KIND == Pod::KIND
                && let Ok(pod) = Pod::decode(object.encode_to_vec().as_slice())
            {
                for r in &capped {
                    let unset = unset_compute(&pod, r);
                    if !unset.is_empty() {
                        return Err(forbidden(format!(
                            "failed quota: {qname}: must specify {r} for: {}",
                            unset.join(",")
                        )));
                    }
                }
            }
            let status = quota.status.get_or_insert_default();
            let (mut requested, mut used_now, mut limited) = (vec![], vec![], vec![]);
            let mut exceeded = false;
            for r in &capped {
                let Some(used) = status.used.get(*r) else {
                    return Err(forbidden(format!(
                        "status unknown for quota: {qname}, resource: {r}"
                    )));
                };
                let parse = |q: &str| Quantity::parse(q).unwrap_or(Quantity::MAX);
                let (used, limit, asks) = (parse(used), parse(&hard[*r]), uses[*r]);
                requested.push(format!("{r}={}", format(r, asks)));
                used_now.push(format!("{r}={}", format(r, used)));
                limited.push(format!("{r}={}", format(r, limit)));
                if used + asks > limit {
                    exceeded = true;
                }
                status.used.insert((*r).clone(), format(r, used + asks));
            }
            if exceeded {
                return Err(forbidden(format!(
                    "exceeded quota: {qname}, requested: {}, used: {}, limited: {}",
                    requested.join(","),
                    used_now.join(","),
                    limited.join(",")
                )));
            }
            charges.push(Charge {
                key: kv.key.clone(),
                mod_revision: kv.mod_revision,
                value: self.encode(&kv.key, &quota)?,
            });
        }
        Ok(charges)
    }
}
