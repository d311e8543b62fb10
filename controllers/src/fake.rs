//! An in-memory [`Api`] for unit tests of reconcilers.
//!
//! It keeps objects per kind, assigns what the API server assigns on create (uid,
//! resourceVersion, creationTimestamp, generation, a name from `generateName`), refuses
//! what it refuses (a taken name: `AlreadyExists`; a stale resourceVersion: `Aborted`; a
//! missing object: `NotFound`), keeps status out of update and spec out of update_status,
//! and logs every write as a line (`create Pod shop/pi-00001`) so a test can assert what a
//! reconcile did. Its cache is the store itself (never stale), its clock moves only when
//! the test says. Deletion is immediate: no grace period, finalizers or cascading (the
//! garbage collector has its own tests against a cluster).

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_proto::api::{DeleteRequest, Resource, time};
use tonic::Status;

use crate::runtime::Api;

/// Objects of one kind, by `namespace/name`.
type Objects<K> = BTreeMap<String, K>;

struct State {
    kinds: HashMap<&'static str, Box<dyn Any + Send>>,
    revision: u64,
    uids: u64,
    now: SystemTime,
    actions: Vec<String>,
    events: Vec<String>,
}

pub struct FakeApi {
    state: Mutex<State>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl State {
    fn objects<K: Resource>(&mut self) -> &mut Objects<K> {
        self.kinds
            .entry(K::KIND)
            .or_insert_with(|| Box::new(Objects::<K>::new()))
            .downcast_mut::<Objects<K>>()
            .expect("one map per kind")
    }

    fn stamp<K: Resource>(&mut self, object: &mut K) {
        self.revision += 1;
        object.metadata_mut().resource_version = self.revision.to_string();
    }

    fn create<K: Resource>(&mut self, object: &K) -> Result<K, ClientError> {
        let mut o = object.clone();
        let now = time::format(self.now);
        self.uids += 1;
        let uid = format!("uid-{:05}", self.uids);
        let m = o.metadata_mut();
        if m.name.is_empty() {
            if m.generate_name.is_empty() {
                return Err(Status::invalid_argument("metadata.name: required").into());
            }
            // Deterministic, unlike the server's random suffix.
            m.name = format!("{}{:05}", m.generate_name, self.uids);
        }
        m.uid = uid;
        m.creation_timestamp = now;
        m.generation = 1;
        let k = key(&m.namespace, &m.name);
        let line = format!("create {} {k}", K::KIND);
        if self.objects::<K>().contains_key(&k) {
            return Err(Status::already_exists(format!("{} {k} already exists", K::KIND)).into());
        }
        o.set_type_meta();
        self.stamp(&mut o);
        self.objects::<K>().insert(k, o.clone());
        self.actions.push(line);
        Ok(o)
    }

    fn current<K: Resource>(&mut self, object: &K) -> Result<(String, K), ClientError> {
        let k = key(object.namespace(), object.name());
        let Some(old) = self.objects::<K>().get(&k).cloned() else {
            return Err(Status::not_found(format!("{} {k} not found", K::KIND)).into());
        };
        let rv = object
            .metadata()
            .map(|m| m.resource_version.as_str())
            .unwrap_or("");
        let old_rv = old.metadata().map(|m| m.resource_version.as_str());
        if !rv.is_empty() && Some(rv) != old_rv {
            return Err(Status::aborted(format!(
                "Operation cannot be fulfilled on {} {k}: the object has been modified",
                K::PLURAL
            ))
            .into());
        }
        Ok((k, old))
    }

    fn update<K: Resource>(&mut self, object: &K, status: bool) -> Result<K, ClientError> {
        let (k, old) = self.current(object)?;
        let mut new = if status {
            let mut kept = old.clone();
            kept.set_status_from(object);
            kept
        } else {
            let mut new = object.clone();
            if K::HAS_STATUS {
                new.set_status_from(&old);
            }
            if new.spec_part() != old.spec_part() {
                new.metadata_mut().generation += 1;
            }
            new
        };
        if let Some(m) = old.metadata() {
            let n = new.metadata_mut();
            n.uid = m.uid.clone();
            n.creation_timestamp = m.creation_timestamp.clone();
        }
        self.stamp(&mut new);
        self.objects::<K>().insert(k.clone(), new.clone());
        let verb = if status { "update-status" } else { "update" };
        self.actions.push(format!("{verb} {} {k}", K::KIND));
        Ok(new)
    }

    fn delete<K: Resource>(&mut self, req: &DeleteRequest) -> Result<K, ClientError> {
        let k = key(&req.namespace, &req.name);
        let Some(old) = self.objects::<K>().get(&k).cloned() else {
            return Err(Status::not_found(format!("{} {k} not found", K::KIND)).into());
        };
        if let Some(p) = &req.preconditions
            && !p.uid.is_empty()
            && old.metadata().map(|m| m.uid.as_str()) != Some(p.uid.as_str())
        {
            return Err(Status::aborted(format!(
                "Precondition failed: UID in precondition: {}, UID in object meta: {}",
                p.uid,
                old.metadata().map(|m| m.uid.as_str()).unwrap_or("")
            ))
            .into());
        }
        self.objects::<K>().remove(&k);
        self.actions.push(format!("delete {} {k}", K::KIND));
        Ok(old)
    }
}

impl FakeApi {
    /// An empty store whose clock reads 2026-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                kinds: HashMap::new(),
                revision: 0,
                uids: 0,
                now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
                actions: Vec::new(),
                events: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `object` as a create would, without logging an action (a test's setup).
    pub fn put<K: Resource>(&self, object: K) -> K {
        let mut s = self.lock();
        let o = s.create(&object).expect("the fixture's name is free");
        s.actions.pop();
        o
    }

    /// Changes a stored object in place (what another component would write), without
    /// logging an action.
    pub fn modify<K: Resource>(&self, namespace: &str, name: &str, change: impl FnOnce(&mut K)) {
        let mut s = self.lock();
        let k = key(namespace, name);
        let mut o = s
            .objects::<K>()
            .get(&k)
            .cloned()
            .unwrap_or_else(|| panic!("{} {k} is stored", K::KIND));
        change(&mut o);
        s.stamp(&mut o);
        s.objects::<K>().insert(k, o);
    }

    /// Removes a stored object without logging an action: what a cache that has not yet
    /// seen a write looks like to a reconciler.
    pub fn hide<K: Resource>(&self, namespace: &str, name: &str) -> Option<K> {
        self.lock().objects::<K>().remove(&key(namespace, name))
    }

    /// Every stored object of kind `K`, ordered by namespace and name.
    pub fn all<K: Resource>(&self) -> Vec<K> {
        self.lock().objects::<K>().values().cloned().collect()
    }

    /// The writes since the last call, one line each, in order.
    pub fn take_actions(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().actions)
    }

    /// The events recorded since the last call: `Normal Completed: message`.
    pub fn take_events(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().events)
    }

    /// Moves the clock on.
    pub fn advance(&self, by: Duration) {
        self.lock().now += by;
    }
}

impl Api for FakeApi {
    fn get<K: Resource>(&self, namespace: &str, name: &str) -> Option<K> {
        self.lock()
            .objects::<K>()
            .get(&key(namespace, name))
            .cloned()
    }

    fn list<K: Resource>(&self, namespace: &str, keep: impl Fn(&K) -> bool) -> Vec<K> {
        self.lock()
            .objects::<K>()
            .values()
            .filter(|o| (namespace.is_empty() || o.namespace() == namespace) && keep(o))
            .cloned()
            .collect()
    }

    fn create<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        let r = self.lock().create(object);
        async move { r }
    }

    fn update<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        let r = self.lock().update(object, false);
        async move { r }
    }

    fn update_status<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        let r = self.lock().update(object, true);
        async move { r }
    }

    fn delete<K: Resource>(
        &self,
        req: &DeleteRequest,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        let r = self.lock().delete(req);
        async move { r }
    }

    fn record<K: Resource>(
        &self,
        _component: &'static str,
        _object: &K,
        kind: &'static str,
        reason: &'static str,
        message: String,
    ) {
        self.lock()
            .events
            .push(format!("{kind} {reason}: {message}"));
    }

    fn now(&self) -> SystemTime {
        self.lock().now
    }
}
