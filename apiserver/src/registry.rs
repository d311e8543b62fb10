//! The rules every kind follows, on top of the store: create, get, list, update, status,
//! delete, patch, bind. Every write is one store transaction that compares what it read
//! (the object's mod revision, the namespace's), so a concurrent change makes it fail and
//! change nothing, never half-apply.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_proto::api::json::{self, ShapeError};
use flotilla_proto::api::selector::{FieldSelector, LabelSelector};
use flotilla_proto::api::*;
use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::request_op::Request;
use flotilla_proto::etcdserverpb::response_op::Response;
use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, TxnResponse,
};
use flotilla_proto::mvccpb::KeyValue;
use flotilla_store::mvcc::{Command, CommandResponse};
use flotilla_store::node::StoreNode;
use prost::Message;
use rand::Rng;

use crate::encryption::Encryption;
use crate::errors::{ApiError, ApiResult};
use crate::validate::{FieldErrors, Kind, validate_metadata};

/// How often a write that lost a race with another writer is retried (when the caller did
/// not pin a resourceVersion, so the retry is what it asked for).
const MAX_ATTEMPTS: usize = 16;
/// Keys read per store range while filtering a list.
const LIST_CHUNK: i64 = 512;

pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
pub const ORPHAN_FINALIZER: &str = "orphan";

/// The API's view of the store.
#[derive(Clone)]
pub struct Api {
    node: StoreNode,
    /// How the API server dials agents (their log service): the member's own certificate.
    agents: flotilla_transport::Dialer,
    /// Where each request's audit event goes (`--audit-log-path`).
    audit: Option<crate::auth::audit::AuditLog>,
    /// How objects are encrypted at rest (`--encryption-provider-config`).
    encryption: Arc<Encryption>,
    /// The store lease Events are written with (`--event-ttl`).
    events: Arc<EventLeases>,
}

/// Events expire as kube-apiserver's do: each is written with a store lease of the TTL, one
/// lease shared by the Events written within 5% of the TTL (granted for the TTL plus that
/// window, so that none expires early), so there are few leases however many Events.
pub struct EventLeases {
    ttl: Duration,
    current: tokio::sync::Mutex<Option<(i64, std::time::Instant)>>,
}

/// The longest `--event-ttl`: ten years (the store's leases allow far more).
pub const MAX_EVENT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// kube-apiserver's `--event-ttl` default.
pub const DEFAULT_EVENT_TTL: Duration = Duration::from_secs(3600);

impl EventLeases {
    fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            current: tokio::sync::Mutex::new(None),
        }
    }

    fn window(&self) -> Duration {
        self.ttl / 20
    }
}

/// An object as read from the store, with the revision that wrote it.
#[derive(Clone, Debug)]
pub struct Stored<K> {
    pub object: K,
    pub mod_revision: i64,
    /// Stored otherwise than it would be written now (encrypted with a key that is no
    /// longer the first, or not at all): an update writes it even if nothing changed, so
    /// that rewriting every object completes a key rotation.
    pub stale: bool,
}

/// Every key of a kind lives under `/registry/<plural>/`.
pub fn key_of<K: Resource>(namespace: &str, name: &str) -> Vec<u8> {
    if K::NAMESPACED {
        format!("/registry/{}/{namespace}/{name}", K::PLURAL).into_bytes()
    } else {
        format!("/registry/{}/{name}", K::PLURAL).into_bytes()
    }
}

/// The prefix of a kind's keys, in one namespace or all.
pub fn prefix_of<K: Resource>(namespace: Option<&str>) -> Vec<u8> {
    match namespace {
        Some(ns) if K::NAMESPACED => format!("/registry/{}/{ns}/", K::PLURAL).into_bytes(),
        _ => format!("/registry/{}/", K::PLURAL).into_bytes(),
    }
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The namespace a request means: `default` when a namespaced kind's is empty, none for a
/// cluster-scoped kind.
pub fn effective_namespace<K: Resource>(namespace: &str) -> String {
    match (K::NAMESPACED, namespace) {
        (false, _) => String::new(),
        (true, "") => "default".into(),
        (true, ns) => ns.into(),
    }
}

pub(crate) fn new_uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    // Shaped like a version 4 UUID.
    format!(
        "{}-{}-4{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn shape_error(e: ShapeError) -> ApiError {
    ApiError::invalid(e.path, e.message)
}

fn cmp(key: &[u8], target: CompareTarget, value: TargetUnion) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.to_vec(),
        target_union: Some(value),
        range_end: vec![],
    }
}

fn absent(key: &[u8]) -> Compare {
    cmp(key, CompareTarget::Create, TargetUnion::CreateRevision(0))
}

fn unchanged(key: &[u8], mod_revision: i64) -> Compare {
    cmp(
        key,
        CompareTarget::Mod,
        TargetUnion::ModRevision(mod_revision),
    )
}

/// A put attached to a store lease (0: none).
fn put_leased(key: Vec<u8>, value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// Whether a write failed because its lease is gone (expired or revoked).
fn is_lease_gone(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::Store(flotilla_store::errors::StoreError::Mvcc(
            flotilla_store::errors::MvccError::LeaseNotFound(_)
        ))
    )
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn get(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key,
            count_only: true,
            ..Default::default()
        })),
    }
}

/// Keys a kind reserves along with an object (a Service's cluster IP), created with it and
/// deleted with it; a create fails if one is taken.
pub fn reserved_keys<K: Resource>(object: &K) -> Vec<Vec<u8>> {
    if K::KIND != Service::KIND {
        return vec![];
    }
    let Ok(service) = Service::decode(object.encode_to_vec().as_slice()) else {
        return vec![];
    };
    match service.spec.map(|s| s.cluster_ip) {
        Some(ip) if !ip.is_empty() && ip != "None" => {
            vec![format!("/registry/serviceips/{ip}").into_bytes()]
        }
        _ => vec![],
    }
}

/// Picks a cluster IP in 10.96.0.0/12 for a Service that has none.
fn allocate_cluster_ip<K: Resource>(object: &mut K) -> bool {
    if K::KIND != Service::KIND {
        return false;
    }
    let Ok(mut service) = Service::decode(object.encode_to_vec().as_slice()) else {
        return false;
    };
    let spec = service.spec.get_or_insert_default();
    if !spec.cluster_ip.is_empty() || spec.r#type == "ExternalName" {
        return false;
    }
    let n: u32 = rand::rng().random_range(1..(1 << 20) - 1);
    spec.cluster_ip = std::net::Ipv4Addr::from(0x0a60_0000 | n).to_string();
    if let Ok(o) = K::decode(service.encode_to_vec().as_slice()) {
        *object = o;
    }
    true
}

impl Api {
    pub fn new(node: StoreNode) -> Self {
        Self {
            node,
            agents: flotilla_transport::Dialer::plain(),
            audit: None,
            encryption: Default::default(),
            events: Arc::new(EventLeases::new(DEFAULT_EVENT_TTL)),
        }
    }

    /// Events expire `ttl` after they are written (0: never; at most [`MAX_EVENT_TTL`]).
    pub fn with_event_ttl(mut self, ttl: Duration) -> Self {
        let ttl = ttl.min(MAX_EVENT_TTL);
        self.events = Arc::new(EventLeases::new(ttl));
        self
    }

    /// The lease an object of kind `K` is written with: Events get the shared one of the
    /// moment (0: no lease).
    async fn lease_for<K: Resource>(&self) -> ApiResult<i64> {
        let leases = &self.events;
        if K::KIND != Event::KIND || leases.ttl.is_zero() {
            return Ok(0);
        }
        let mut current = leases.current.lock().await;
        if let Some((id, granted)) = *current
            && granted.elapsed() < leases.window()
        {
            return Ok(id);
        }
        let ttl = leases
            .ttl
            .checked_add(leases.window())
            .map_or(i64::MAX, |t| t.as_secs_f64().ceil() as i64);
        let (id, _) = self.node.lease_grant(0, ttl).await?;
        *current = Some((id, std::time::Instant::now()));
        Ok(id)
    }

    /// Forgets the shared Event lease (it expired or was revoked: a new one is granted).
    async fn forget_lease(&self) {
        *self.events.current.lock().await = None;
    }

    /// Encrypts objects at rest as `encryption` says.
    pub fn with_encryption(mut self, encryption: Encryption) -> Self {
        self.encryption = Arc::new(encryption);
        self
    }

    pub(crate) fn encryption(&self) -> &Arc<Encryption> {
        &self.encryption
    }

    /// Writes one audit event per request to `log`.
    pub fn with_audit(mut self, log: crate::auth::audit::AuditLog) -> Self {
        self.audit = Some(log);
        self
    }

    pub(crate) fn audit_log(&self) -> Option<&crate::auth::audit::AuditLog> {
        self.audit.as_ref()
    }

    /// Dials agents with `dialer` (TLS with the member's certificate).
    pub fn with_agent_dialer(mut self, dialer: flotilla_transport::Dialer) -> Self {
        self.agents = dialer;
        self
    }

    pub(crate) fn agent_dialer(&self) -> &flotilla_transport::Dialer {
        &self.agents
    }

    pub fn node(&self) -> &StoreNode {
        &self.node
    }

    /// The object a stored key-value holds (decrypted where configured).
    pub(crate) fn decode<K: Resource>(&self, kv: &KeyValue) -> ApiResult<K> {
        self.encryption.decode(kv, kv.mod_revision)
    }

    /// What the store holds for `object` under `key` (encrypted where configured).
    pub(crate) fn encode<K: Resource>(&self, key: &[u8], object: &K) -> ApiResult<Vec<u8>> {
        self.encryption.encode(key, object)
    }

    async fn txn(&self, txn: TxnRequest) -> ApiResult<TxnResponse> {
        let cmd = match crate::fence::current() {
            Some(term) => Command::Fenced {
                term,
                cmd: Box::new(Command::Txn(txn)),
            },
            None => Command::Txn(txn),
        };
        match self.node.propose(cmd).await? {
            CommandResponse::Txn(r) => Ok(r),
            CommandResponse::Rejected(e) => Err(ApiError::Store(e.into())),
            other => Err(ApiError::Internal(format!(
                "unexpected store response {other:?}"
            ))),
        }
    }

    /// The objects of a kind in this member's own copy (no read barrier), in `namespace` or
    /// all; what does not decode is left out and logged.
    pub(crate) fn local_list<K: Resource>(&self, namespace: Option<&str>) -> Vec<K> {
        let prefix = prefix_of::<K>(namespace);
        let result = self.node.kv().range(&RangeRequest {
            range_end: prefix_end(&prefix),
            key: prefix,
            ..Default::default()
        });
        match result {
            Ok(r) => r
                .kvs
                .iter()
                .filter_map(|kv| match self.decode(kv) {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::warn!("{e}");
                        None
                    }
                })
                .collect(),
            Err(e) => {
                tracing::warn!("reading {}: {e}", K::PLURAL);
                Vec::new()
            }
        }
    }

    /// One object from this member's own copy (no read barrier).
    pub(crate) fn local_get<K: Resource>(&self, namespace: &str, name: &str) -> Option<K> {
        let result = self.node.kv().range(&RangeRequest {
            key: key_of::<K>(namespace, name),
            ..Default::default()
        });
        self.decode(result.ok()?.kvs.first()?).ok()
    }

    /// Reads one object; `fresh` makes it a linearizable read.
    pub async fn read<K: Resource>(
        &self,
        namespace: &str,
        name: &str,
        fresh: bool,
    ) -> ApiResult<Option<Stored<K>>> {
        if fresh {
            self.node.read_barrier().await?;
        }
        let result = self.node.kv().range(&RangeRequest {
            key: key_of::<K>(namespace, name),
            ..Default::default()
        })?;
        match result.kvs.first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Stored {
                object: self.decode(kv)?,
                mod_revision: kv.mod_revision,
                stale: self.encryption.is_stale::<K>(&kv.value),
            })),
        }
    }

    async fn must_read<K: Resource>(&self, namespace: &str, name: &str) -> ApiResult<Stored<K>> {
        self.read(namespace, name, true)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                plural: K::PLURAL,
                name: name.to_string(),
            })
    }

    pub async fn get<K: Kind>(&self, namespace: &str, name: &str) -> ApiResult<K> {
        let ns = effective_namespace::<K>(namespace);
        Ok(self.must_read::<K>(&ns, name).await?.object)
    }

    // ------------------------------------------------------------------ create

    pub async fn create<K: Kind>(&self, mut object: K) -> ApiResult<K> {
        check_type_meta(&object)?;
        object.set_type_meta();
        let meta = object.metadata_mut();
        meta.namespace = effective_namespace::<K>(&meta.namespace);
        if meta.name.is_empty() && !meta.generate_name.is_empty() {
            meta.name = format!("{}{}", meta.generate_name, random_suffix());
        }
        meta.uid = new_uid();
        meta.creation_timestamp = time::now();
        meta.generation = 1;
        meta.resource_version.clear();
        meta.deletion_timestamp.clear();
        meta.deletion_grace_period_seconds = None;
        if !K::keeps_status_on_create() {
            object.set_status_from(&K::default());
        }
        object.initial_status();
        object.apply_defaults();
        let auto_ip = allocate_cluster_ip(&mut object);
        check(&object, None)?;
        crate::auth::escalation::check(&object)?;

        let ns = object.namespace().to_string();
        let name = object.name().to_string();
        let key = key_of::<K>(&ns, &name);
        for attempt in 0..MAX_ATTEMPTS {
            let mut compare = vec![absent(&key)];
            if K::NAMESPACED {
                // This member's copy of the namespace is enough: the transaction compares
                // its revision, so a stale copy fails the write (and the retry reads
                // through the leader). Only an absence must be confirmed first.
                let mut namespace = self.read::<Namespace>("", &ns, attempt > 0).await?;
                if namespace.is_none() && attempt == 0 {
                    namespace = self.read::<Namespace>("", &ns, true).await?;
                }
                match namespace {
                    Some(n)
                        if !n
                            .object
                            .metadata
                            .as_ref()
                            .is_none_or(|m| m.deletion_timestamp.is_empty()) =>
                    {
                        return Err(ApiError::FailedPrecondition(format!(
                            "namespace {ns:?} is being terminated: nothing new can be created in it"
                        )));
                    }
                    Some(n) => {
                        compare.push(unchanged(&key_of::<Namespace>("", &ns), n.mod_revision))
                    }
                    // `default` always exists, even before its object is written.
                    None if ns == "default" => {}
                    None => {
                        return Err(ApiError::NotFound {
                            plural: "namespaces",
                            name: ns,
                        });
                    }
                }
            }
            let charges = if K::NAMESPACED {
                self.admit_quota(&object, &ns, attempt > 0).await?
            } else {
                Vec::new()
            };
            compare.extend(charges.iter().map(|c| unchanged(&c.key, c.mod_revision)));
            let reserved = reserved_keys(&object);
            compare.extend(reserved.iter().map(|k| absent(k)));
            let lease = self.lease_for::<K>().await?;
            let mut success = vec![put_leased(key.clone(), self.encode(&key, &object)?, lease)];
            success.extend(charges.into_iter().map(|c| put(c.key, c.value)));
            success.extend(reserved.iter().map(|k| put(k.clone(), key.clone())));
            let mut failure = vec![get(key.clone())];
            failure.extend(reserved.iter().map(|k| get(k.clone())));
            let resp = match self
                .txn(TxnRequest {
                    compare,
                    success,
                    failure,
                })
                .await
            {
                Err(e) if lease != 0 && is_lease_gone(&e) => {
                    self.forget_lease().await;
                    continue;
                }
                other => other?,
            };
            if resp.succeeded {
                let rev = resp.header.map(|h| h.revision).unwrap_or_default();
                object.metadata_mut().resource_version = rev.to_string();
                return Ok(object);
            }
            let counts: Vec<i64> = resp
                .responses
                .iter()
                .map(|r| match &r.response {
                    Some(Response::ResponseRange(r)) => r.count,
                    _ => 0,
                })
                .collect();
            if counts.first().copied().unwrap_or(0) > 0 {
                return Err(ApiError::AlreadyExists {
                    plural: K::PLURAL,
                    name,
                });
            }
            if counts.iter().skip(1).any(|c| *c > 0) {
                if auto_ip {
                    object.spec_clear_cluster_ip();
                    allocate_cluster_ip(&mut object);
                    continue;
                }
                return Err(ApiError::invalid(
                    "spec.clusterIP",
                    "the IP is already allocated to another service",
                ));
            }
            // The namespace changed under us: look again.
        }
        Err(ApiError::Store(
            flotilla_store::errors::StoreError::TooManyRequests,
        ))
    }

    // ------------------------------------------------------------------ update

    /// Writes `new` in place of `current` if nobody changed it since; a no-op when they are
    /// equal (no new resourceVersion), unless `current` is stored stale.
    async fn replace<K: Resource>(&self, current: &Stored<K>, mut new: K) -> ApiResult<K> {
        crate::auth::check_write(&current.object)?;
        crate::auth::escalation::check(&new)?;
        let mut old = current.object.clone();
        old.metadata_mut().resource_version.clear();
        new.metadata_mut().resource_version.clear();
        if new == old && !current.stale {
            return Ok(current.object.clone());
        }
        let key = key_of::<K>(current.object.namespace(), current.object.name());
        // An Event's TTL starts again with each write, as in kube-apiserver.
        let lease = self.lease_for::<K>().await?;
        let resp = match self
            .txn(TxnRequest {
                compare: vec![unchanged(&key, current.mod_revision)],
                success: vec![put_leased(key.clone(), self.encode(&key, &new)?, lease)],
                failure: vec![],
            })
            .await
        {
            Err(e) if lease != 0 && is_lease_gone(&e) => {
                // Judged again with a fresh lease.
                self.forget_lease().await;
                return Err(ApiError::Race {
                    plural: K::PLURAL,
                    name: new.name().to_string(),
                });
            }
            other => other?,
        };
        if !resp.succeeded {
            return Err(ApiError::Race {
                plural: K::PLURAL,
                name: new.name().to_string(),
            });
        }
        let rev = resp.header.map(|h| h.revision).unwrap_or_default();
        new.metadata_mut().resource_version = rev.to_string();
        Ok(new)
    }

    /// Removes `current` from the store if nobody changed it since.
    async fn remove<K: Resource>(&self, current: &Stored<K>) -> ApiResult<K> {
        crate::auth::check_write(&current.object)?;
        let key = key_of::<K>(current.object.namespace(), current.object.name());
        let mut success = vec![delete(key.clone())];
        success.extend(reserved_keys(&current.object).into_iter().map(delete));
        let resp = self
            .txn(TxnRequest {
                compare: vec![unchanged(&key, current.mod_revision)],
                success,
                failure: vec![],
            })
            .await?;
        if !resp.succeeded {
            return Err(ApiError::Race {
                plural: K::PLURAL,
                name: current.object.name().to_string(),
            });
        }
        Ok(current.object.clone())
    }

    /// Runs `attempt` again when it loses a race, unless `pinned` says the caller named the
    /// version it meant (then a lost race is the caller's conflict).
    async fn retrying<K, F, Fut>(&self, pinned: bool, mut attempt: F) -> ApiResult<K>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ApiResult<K>>,
    {
        let mut last = None;
        for i in 0..MAX_ATTEMPTS {
            match attempt().await {
                Err(e @ ApiError::Race { .. }) if !pinned => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(1 << i.min(6))).await;
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ApiError::Internal("retry loop ended without a result".into())))
    }

    pub async fn update<K: Kind>(&self, object: K) -> ApiResult<K> {
        check_type_meta(&object)?;
        let ns = effective_namespace::<K>(object.namespace());
        let name = object.name().to_string();
        if name.is_empty() {
            return Err(ApiError::invalid("metadata.name", "required"));
        }
        let given = object.resource_version().to_string();
        self.retrying(!given.is_empty(), || async {
            let current = self.must_read::<K>(&ns, &name).await?;
            check_version(&current, &given)?;
            let new = prepare_update(&current.object, object.clone())?;
            self.finish_update(&current, new).await
        })
        .await
    }

    /// Writes an update; an object being deleted whose last finalizer went is removed.
    async fn finish_update<K: Kind>(&self, current: &Stored<K>, new: K) -> ApiResult<K> {
        let meta = new.metadata().cloned().unwrap_or_default();
        if !meta.deletion_timestamp.is_empty()
            && meta.finalizers.is_empty()
            && meta.deletion_grace_period_seconds.unwrap_or(0) == 0
        {
            return self.remove(current).await;
        }
        self.replace(current, new).await
    }

    pub async fn update_status<K: Kind>(&self, object: K) -> ApiResult<K> {
        check_type_meta(&object)?;
        if !K::HAS_STATUS {
            return Err(ApiError::invalid(
                "status",
                format!("{} has no status", K::KIND),
            ));
        }
        let ns = effective_namespace::<K>(object.namespace());
        let name = object.name().to_string();
        let given = object.resource_version().to_string();
        self.retrying(!given.is_empty(), || async {
            let current = self.must_read::<K>(&ns, &name).await?;
            check_version(&current, &given)?;
            let mut new = current.object.clone();
            new.set_status_from(&object);
            check(&new, None)?;
            self.replace(&current, new).await
        })
        .await
    }

    pub async fn patch<K: Kind>(&self, req: PatchRequest) -> ApiResult<K> {
        let ns = effective_namespace::<K>(&req.namespace);
        let patch: serde_json::Value = serde_json::from_str(&req.patch)
            .map_err(|e| ApiError::invalid("patch", format!("not valid JSON: {e}")))?;
        if !patch.is_object() {
            return Err(ApiError::invalid(
                "patch",
                "a merge patch must be a JSON object",
            ));
        }
        let status_only = match req.subresource.as_str() {
            "" => false,
            "status" => true,
            other => {
                return Err(ApiError::invalid(
                    "subresource",
                    format!("unsupported value {other:?}: must be empty or \"status\""),
                ));
            }
        };
        let given = patch
            .pointer("/metadata/resourceVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        self.retrying(!given.is_empty(), || async {
            let current = self.must_read::<K>(&ns, &req.name).await?;
            check_version(&current, &given)?;
            let mut value = serde_json::to_value(&current.object)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            json::merge_patch(&mut value, &patch);
            let patched: K = json::from_value(value).map_err(shape_error)?;
            check_identity(&patched, &req.name, &ns)?;
            if status_only {
                let mut new = current.object.clone();
                new.set_status_from(&patched);
                check(&new, None)?;
                self.replace(&current, new).await
            } else {
                let new = prepare_update(&current.object, patched)?;
                self.finish_update(&current, new).await
            }
        })
        .await
    }

    // ------------------------------------------------------------------ delete

    pub async fn delete<K: Kind>(&self, req: DeleteRequest) -> ApiResult<K> {
        let ns = effective_namespace::<K>(&req.namespace);
        let finalizer = match req.propagation_policy.as_str() {
            "" | "Background" => None,
            "Foreground" => Some(FOREGROUND_FINALIZER),
            "Orphan" => Some(ORPHAN_FINALIZER),
            other => {
                return Err(ApiError::invalid(
                    "propagationPolicy",
                    format!(
                        "unsupported value {other:?}: must be Background, Foreground or Orphan"
                    ),
                ));
            }
        };
        if let Some(g) = req.grace_period_seconds
            && g < 0
        {
            return Err(ApiError::invalid(
                "gracePeriodSeconds",
                format!("must be >= 0, got {g}"),
            ));
        }
        let pre = req.preconditions.clone().unwrap_or_default();
        self.retrying(!pre.resource_version.is_empty(), || async {
            let current = self.must_read::<K>(&ns, &req.name).await?;
            let meta = current.object.metadata().cloned().unwrap_or_default();
            if !pre.uid.is_empty() && pre.uid != meta.uid {
                return Err(ApiError::Conflict {
                    plural: K::PLURAL,
                    name: req.name.clone(),
                    reason: format!(
                        "precondition failed: uid in precondition: {}, uid in object meta: {}",
                        pre.uid, meta.uid
                    ),
                });
            }
            check_version(&current, &pre.resource_version)?;
            let mut new = current.object.clone();
            let m = new.metadata_mut();
            if let Some(f) = finalizer
                && !m.finalizers.iter().any(|x| x == f)
            {
                m.finalizers.push(f.to_string());
            }
            let now = SystemTime::now();
            // A namespace with objects in it is emptied first (by the namespace controller).
            if K::KIND == Namespace::KIND && !self.namespace_is_empty(current.object.name()).await?
            {
                if m.deletion_timestamp.is_empty() {
                    m.deletion_timestamp = time::format(now);
                }
                mark_terminating(&mut new);
                return self.replace(&current, new).await;
            }
            let grace = current.object.grace_period(req.grace_period_seconds);
            if grace > 0 {
                // Graceful: record the deadline; whoever runs the object finishes it.
                let deadline = now + Duration::from_secs(grace as u64);
                let sooner = time::parse(&m.deletion_timestamp).is_none_or(|t| deadline < t);
                if sooner {
                    m.deletion_timestamp = time::format(deadline);
                    m.deletion_grace_period_seconds = Some(grace);
                }
                return self.replace(&current, new).await;
            }
            if !m.finalizers.is_empty() {
                if m.deletion_timestamp.is_empty() {
                    m.deletion_timestamp = time::format(now);
                }
                m.deletion_grace_period_seconds = Some(0);
                return self.replace(&current, new).await;
            }
            self.remove(&current).await
        })
        .await
    }

    async fn namespace_is_empty(&self, namespace: &str) -> ApiResult<bool> {
        self.node.read_barrier().await?;
        for kind in KINDS.iter().filter(|k| k.namespaced) {
            let prefix = format!("/registry/{}/{namespace}/", kind.plural).into_bytes();
            let r = self.node.kv().range(&RangeRequest {
                range_end: prefix_end(&prefix),
                key: prefix,
                count_only: true,
                ..Default::default()
            })?;
            if r.count > 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    // -------------------------------------------------------------------- bind

    pub async fn bind(&self, binding: Binding) -> ApiResult<Pod> {
        let meta = binding.metadata.clone().unwrap_or_default();
        let ns = effective_namespace::<Pod>(&meta.namespace);
        if meta.name.is_empty() {
            return Err(ApiError::invalid(
                "metadata.name",
                "required: the pod to bind",
            ));
        }
        let node = binding
            .target
            .as_ref()
            .map(|t| t.name.clone())
            .unwrap_or_default();
        if node.is_empty() {
            return Err(ApiError::invalid(
                "target.name",
                "required: the node to bind to",
            ));
        }
        self.retrying(false, || async {
            let current = self.must_read::<Pod>(&ns, &meta.name).await?;
            let pod_meta = current.object.metadata.clone().unwrap_or_default();
            if !meta.uid.is_empty() && meta.uid != pod_meta.uid {
                return Err(ApiError::NotFound {
                    plural: "pods",
                    name: format!("{} (uid {})", meta.name, meta.uid),
                });
            }
            if !pod_meta.deletion_timestamp.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "pod {:?} is being deleted and cannot be bound",
                    meta.name
                )));
            }
            let bound = current
                .object
                .spec
                .as_ref()
                .map(|s| s.node_name.as_str())
                .unwrap_or("");
            if !bound.is_empty() {
                return Err(ApiError::Conflict {
                    plural: "pods",
                    name: meta.name.clone(),
                    reason: format!("pod {} is already assigned to node {bound:?}", meta.name),
                });
            }
            let mut new = current.object.clone();
            new.spec.get_or_insert_default().node_name = node.clone();
            set_pod_condition(
                new.status.get_or_insert_default(),
                "PodScheduled",
                "True",
                "",
                "",
            );
            // A lost race is retried: the next read shows whether someone else bound it.
            self.replace(&current, new).await
        })
        .await
    }

    /// Evicts a pod (Kubernetes' eviction subresource): deletes it unless the one
    /// PodDisruptionBudget that selects it allows no disruption now. A pod that is not
    /// running (pending, finished, already going) needs no budget; nor does a pod that is
    /// not ready under a budget whose `unhealthyPodEvictionPolicy` is `AlwaysAllow`. An
    /// allowed eviction first takes one disruption from the budget's status (written only
    /// if the budget is as read), then deletes the pod.
    pub async fn evict(&self, eviction: Eviction) -> ApiResult<Pod> {
        let meta = eviction.metadata.clone().unwrap_or_default();
        let ns = effective_namespace::<Pod>(&meta.namespace);
        if meta.name.is_empty() {
            return Err(ApiError::invalid(
                "metadata.name",
                "required: the pod to evict",
            ));
        }
        let options = eviction.delete_options.clone().unwrap_or_default();
        let delete = DeleteRequest {
            namespace: ns.clone(),
            name: meta.name.clone(),
            grace_period_seconds: options.grace_period_seconds,
            preconditions: options.preconditions.clone(),
            ..Default::default()
        };
        for attempt in 0..MAX_ATTEMPTS {
            let pod = self.must_read::<Pod>(&ns, &meta.name).await?.object;
            let phase = pod.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
            let going = pod
                .metadata
                .as_ref()
                .is_some_and(|m| !m.deletion_timestamp.is_empty());
            if going || matches!(phase, "" | "Pending" | "Succeeded" | "Failed") {
                return self.delete::<Pod>(delete).await;
            }
            let labels = pod
                .metadata
                .as_ref()
                .map(|m| m.labels.clone())
                .unwrap_or_default();
            let (budgets, _) = self
                .list::<PodDisruptionBudget>(&ListRequest {
                    namespace: ns.clone(),
                    ..Default::default()
                })
                .await?;
            let mut matching: Vec<PodDisruptionBudget> = budgets
                .into_iter()
                .filter(|b| budget_selects(b, &labels))
                .collect();
            let budget = match matching.len() {
                0 => return self.delete::<Pod>(delete).await,
                1 => matching.remove(0),
                _ => {
                    return Err(ApiError::Internal(
                        "This pod has more than one PodDisruptionBudget, which the eviction \
                         subresource does not support."
                            .into(),
                    ));
                }
            };
            let ready = pod.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "Ready" && c.status == "True")
            });
            let spec = budget.spec.clone().unwrap_or_default();
            if !ready && spec.unhealthy_pod_eviction_policy == "AlwaysAllow" {
                return self.delete::<Pod>(delete).await;
            }
            let mut status = budget.status.clone().unwrap_or_default();
            let generation = budget.metadata.as_ref().map(|m| m.generation).unwrap_or(0);
            if status.observed_generation < generation || status.disruptions_allowed <= 0 {
                return Err(ApiError::TooManyRequests(format!(
                    "Cannot evict pod as it would violate the pod's disruption budget. The \
                     disruption budget {} needs {} healthy pods and has {} currently",
                    budget.name(),
                    status.desired_healthy,
                    status.current_healthy
                )));
            }
            status.disruptions_allowed -= 1;
            status.disrupted_pods.insert(meta.name.clone(), time::now());
            let mut taken = budget.clone();
            taken.status = Some(status);
            match self.update_status(taken).await {
                Ok(_) => return self.delete::<Pod>(delete).await,
                // The budget changed since it was read: judge again on the new one.
                Err(ApiError::Conflict { .. } | ApiError::Race { .. })
                    if attempt + 1 < MAX_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
        Err(ApiError::TooManyRequests(
            "the disruption budget kept changing; try the eviction again".into(),
        ))
    }

    // -------------------------------------------------------------------- list

    pub async fn list<K: Kind>(&self, req: &ListRequest) -> ApiResult<(Vec<K>, ListMeta)> {
        let query = Query::<K>::parse(&req.namespace, &req.label_selector, &req.field_selector)?;
        if req.limit < 0 {
            return Err(ApiError::invalid(
                "limit",
                format!("must be >= 0, got {}", req.limit),
            ));
        }
        let prefix = query.prefix();
        let end = prefix_end(&prefix);
        let (revision, mut start) = if req.r#continue.is_empty() {
            (
                self.list_revision(&req.resource_version).await?,
                prefix.clone(),
            )
        } else {
            let (rev, key) = decode_continue(&req.r#continue)
                .filter(|(_, k)| k.starts_with(&prefix))
                .ok_or_else(|| ApiError::invalid("continue", "malformed continue token: pass back the token of the previous page with the same namespace"))?;
            (rev, key)
        };
        let limit = req.limit as usize;
        let mut items = Vec::new();
        let mut next = String::new();
        'scan: loop {
            let chunk = self.node.kv().range(&RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                revision,
                limit: LIST_CHUNK,
                ..Default::default()
            })?;
            for (i, kv) in chunk.kvs.iter().enumerate() {
                let object: K = self.decode(kv)?;
                if query.matches(&object) {
                    items.push(object);
                    if limit > 0 && items.len() == limit {
                        if chunk.more || i + 1 < chunk.kvs.len() {
                            let mut after = kv.key.clone();
                            after.push(0);
                            next = encode_continue(revision, &after);
                        }
                        break 'scan;
                    }
                }
            }
            match chunk.kvs.last() {
                Some(last) if chunk.more => {
                    start = last.key.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        Ok((
            items,
            ListMeta {
                resource_version: revision.to_string(),
                r#continue: next,
                remaining_item_count: None,
            },
        ))
    }

    /// The revision a list without a continue token reads at.
    pub async fn list_revision(&self, resource_version: &str) -> ApiResult<i64> {
        match resource_version {
            "" => {
                self.node.read_barrier().await?;
                Ok(self.node.kv().revision())
            }
            "0" => Ok(self.node.kv().revision()),
            rv => {
                let rev: i64 = rv.parse().map_err(|_| {
                    ApiError::invalid(
                        "resourceVersion",
                        format!("invalid value {rv:?}: must be a revision number"),
                    )
                })?;
                if rev < self.node.kv().compact_revision() {
                    return Err(ApiError::Expired(format!(
                        "revision {rev} has been compacted (history starts at {}); list again without a resourceVersion",
                        self.node.kv().compact_revision()
                    )));
                }
                Ok(rev)
            }
        }
    }
}

/// A parsed list or watch filter.
pub struct Query<K> {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    _kind: std::marker::PhantomData<K>,
}

impl<K: Resource> Query<K> {
    pub fn parse(namespace: &str, labels: &str, fields: &str) -> ApiResult<Self> {
        let labels = LabelSelector::parse(labels)
            .map_err(|e| ApiError::invalid("labelSelector", e.to_string()))?;
        let fields = FieldSelector::parse(fields, &K::selectable_fields())
            .map_err(|e| ApiError::invalid("fieldSelector", e.to_string()))?;
        let namespace = if !K::NAMESPACED {
            None
        } else if !namespace.is_empty() {
            Some(namespace.to_string())
        } else {
            fields
                .required_value("metadata.namespace")
                .map(str::to_string)
        };
        Ok(Self {
            namespace,
            labels,
            fields,
            _kind: std::marker::PhantomData,
        })
    }

    pub fn prefix(&self) -> Vec<u8> {
        prefix_of::<K>(self.namespace.as_deref())
    }

    pub fn matches(&self, object: &K) -> bool {
        let empty = Default::default();
        let labels = object.metadata().map(|m| &m.labels).unwrap_or(&empty);
        self.namespace
            .as_deref()
            .is_none_or(|ns| object.namespace() == ns)
            && self.labels.matches(labels)
            && self.fields.matches(|f| object.field_value(f))
    }
}

fn encode_continue(revision: i64, key: &[u8]) -> String {
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("{revision}.{hex}")
}

fn decode_continue(token: &str) -> Option<(i64, Vec<u8>)> {
    let (rev, hex) = token.split_once('.')?;
    let rev = rev.parse().ok()?;
    if hex.len() % 2 != 0 || !hex.is_ascii() {
        return None;
    }
    let key = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((rev, key))
}

/// The object names a kind or apiVersion other than the service's.
fn check_type_meta<K: Resource>(object: &K) -> ApiResult<()> {
    let v = serde_json::to_value(object).unwrap_or_default();
    let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = v.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
    if !kind.is_empty() && kind != K::KIND {
        return Err(ApiError::invalid(
            "kind",
            format!("must be {} for this service, got {kind:?}", K::KIND),
        ));
    }
    if !api_version.is_empty() && api_version != K::API_VERSION {
        return Err(ApiError::invalid(
            "apiVersion",
            format!(
                "must be {} for {}, got {api_version:?}",
                K::API_VERSION,
                K::KIND
            ),
        ));
    }
    Ok(())
}

/// A patch may not rename or move the object it patches: refused as Kubernetes refuses it,
/// rather than silently ignored. (A cluster-scoped object's namespace is cleared, as
/// Kubernetes does.)
fn check_identity<K: Resource>(patched: &K, name: &str, namespace: &str) -> ApiResult<()> {
    if patched.name() != name {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            patched.name()
        )));
    }
    if K::NAMESPACED && !patched.namespace().is_empty() && patched.namespace() != namespace {
        return Err(ApiError::BadRequest(format!(
            "the namespace of the object ({}) does not match the namespace on the URL \
             ({namespace})",
            patched.namespace()
        )));
    }
    Ok(())
}

fn check_version<K: Resource>(current: &Stored<K>, given: &str) -> ApiResult<()> {
    if !given.is_empty() && given != current.mod_revision.to_string() {
        return Err(ApiError::conflict(K::PLURAL, current.object.name()));
    }
    Ok(())
}

/// Validates an object (and a change from `old`).
fn check<K: Kind>(object: &K, old: Option<&K>) -> ApiResult<()> {
    let mut errs = FieldErrors::default();
    validate_metadata(object, &mut errs);
    object.validate(&mut errs);
    if let Some(old) = old {
        object.validate_update(old, &mut errs);
    }
    errs.into_result().map_err(ApiError::Invalid)
}

/// The object an update writes: the caller's spec and metadata, the server's own fields and
/// status from `old`, defaults filled, generation bumped on a spec change.
fn prepare_update<K: Kind>(old: &K, mut new: K) -> ApiResult<K> {
    check_type_meta(&new)?;
    new.set_type_meta();
    let old_meta = old.metadata().cloned().unwrap_or_default();
    let meta = new.metadata_mut();
    if !meta.uid.is_empty() && meta.uid != old_meta.uid {
        return Err(ApiError::invalid("metadata.uid", "field is immutable"));
    }
    let added_finalizer = meta
        .finalizers
        .iter()
        .any(|f| !old_meta.finalizers.contains(f));
    if !old_meta.deletion_timestamp.is_empty() && added_finalizer {
        return Err(ApiError::invalid(
            "metadata.finalizers",
            "no new finalizers can be added while the object is being deleted",
        ));
    }
    meta.name = old_meta.name.clone();
    meta.namespace = old_meta.namespace.clone();
    meta.uid = old_meta.uid.clone();
    meta.creation_timestamp = old_meta.creation_timestamp.clone();
    meta.deletion_timestamp = old_meta.deletion_timestamp.clone();
    meta.deletion_grace_period_seconds = old_meta.deletion_grace_period_seconds;
    meta.generation = old_meta.generation;
    meta.generate_name = old_meta.generate_name.clone();
    meta.resource_version.clear();
    new.set_status_from(old);
    new.apply_defaults();
    check(&new, Some(old))?;
    if new.spec_part() != old.spec_part() {
        new.metadata_mut().generation = old_meta.generation + 1;
    }
    Ok(new)
}

fn mark_terminating<K: Resource>(object: &mut K) {
    if K::KIND != Namespace::KIND {
        return;
    }
    if let Ok(mut ns) = Namespace::decode(object.encode_to_vec().as_slice()) {
        ns.status.get_or_insert_default().phase = "Terminating".into();
        if let Ok(o) = K::decode(ns.encode_to_vec().as_slice()) {
            *object = o;
        }
    }
}

/// Sets a pod condition, keeping its transition time when the status does not change.
pub fn set_pod_condition(
    status: &mut PodStatus,
    kind: &str,
    value: &str,
    reason: &str,
    message: &str,
) {
    let now = time::now();
    match status.conditions.iter_mut().find(|c| c.r#type == kind) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => status.conditions.push(PodCondition {
            r#type: kind.into(),
            status: value.into(),
            last_transition_time: now,
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        }),
    }
}

trait ClearClusterIp {
    fn spec_clear_cluster_ip(&mut self);
}

impl<K: Resource> ClearClusterIp for K {
    fn spec_clear_cluster_ip(&mut self) {
        if K::KIND != Service::KIND {
            return;
        }
        if let Ok(mut s) = Service::decode(self.encode_to_vec().as_slice()) {
            s.spec.get_or_insert_default().cluster_ip.clear();
            if let Ok(o) = K::decode(s.encode_to_vec().as_slice()) {
                *self = o;
            }
        }
    }
}

/// Whether a PodDisruptionBudget selects pods with `labels` (an empty selector selects
/// every pod of its namespace; none, no pod).
fn budget_selects(
    budget: &PodDisruptionBudget,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let Some(s) = budget.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let expressions: Vec<(String, String, Vec<String>)> = s
        .match_expressions
        .iter()
        .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone()))
        .collect();
    LabelSelector::from_parts(&s.match_labels, &expressions).is_ok_and(|sel| sel.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let t = encode_continue(42, b"/registry/pods/default/a\0");
        assert_eq!(
            decode_continue(&t),
            Some((42, b"/registry/pods/default/a\0".to_vec()))
        );
        assert_eq!(decode_continue("x"), None);
        assert_eq!(decode_continue("1.zz"), None);
        assert_eq!(decode_continue("1.abc"), None);
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
    }

    #[test]
    fn uids_look_like_uuids() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_ne!(u, new_uid());
    }
}
