//! One controller shape: a [`Controller`] reconciles one kind by key, reading through an
//! [`Api`] and writing through it; [`For`] registers it with the kinds whose changes queue
//! its keys (its own kind, and the kinds it owns through controller references), in the
//! spirit of kube-runtime's `Controller::new(..).owns(..).run(..)`.
//!
//! The runner gives every registered controller its work queue, workers, resync and queue
//! depth; the controller itself is only its reconcile function. In a cluster, [`Api`] reads
//! from the shared informers' caches and writes through the client ([`Live`]); in unit
//! tests it is the in-memory `crate::fake::FakeApi`, so a reconciler's tests read like
//! its spec.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{DeleteRequest, Resource};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::queue::{self, Requeue, WorkQueue};
use crate::util::{controller_of, key_of, record_event};
use crate::{Ctx, Informers, Stats};

/// What a reconciler reads (from a cache that may lag the store a little) and writes.
pub trait Api: Send + Sync + 'static {
    /// The cached object, if any.
    fn get<K: Resource>(&self, namespace: &str, name: &str) -> Option<K>;
    /// The cached objects of one namespace that `keep` selects, ordered by name.
    fn list<K: Resource>(&self, namespace: &str, keep: impl Fn(&K) -> bool) -> Vec<K>;
    fn create<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send;
    fn update<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send;
    fn update_status<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send;
    fn delete<K: Resource>(
        &self,
        req: &DeleteRequest,
    ) -> impl Future<Output = Result<K, ClientError>> + Send;
    /// Records an Event about `object` (best effort, never fails the reconcile).
    fn record<K: Resource>(
        &self,
        component: &'static str,
        object: &K,
        kind: &'static str,
        reason: &'static str,
        message: String,
    );
    fn now(&self) -> SystemTime;
}

/// A reconciler of one kind.
pub trait Controller: Send + Sync + 'static {
    /// The kind it reconciles; its queue holds `namespace/name` keys of these.
    type Kind: Resource;
    /// Its work queue's name (and the component named in its events).
    const NAME: &'static str;

    /// Brings the object at `key` (and what it owns) to what its spec asks; `Ok(Some(d))`
    /// looks again after `d`, an error after the key's back-off.
    fn reconcile<A: Api>(
        &self,
        api: &A,
        key: &str,
    ) -> impl Future<Output = Result<Requeue, ClientError>> + Send;
}

/// A subscriber of one kind's changes; it also sees the informers, once they run.
type Handler<K> = Arc<dyn Fn(&Change<K>, Option<&Informers>) + Send + Sync>;

/// Who hears each kind's changes, besides the fixed handlers in `lib.rs`: filled while
/// controllers register, read by the informers.
#[derive(Default)]
pub struct Subscribers {
    by_kind: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
}

impl Subscribers {
    fn add<K: Resource>(&mut self, handler: Handler<K>) {
        // Keyed by the kind's TypeId: the entry always holds that kind's handlers.
        if let Some(handlers) = self
            .by_kind
            .entry(TypeId::of::<K>())
            .or_insert_with(|| Box::new(Vec::<Handler<K>>::new()))
            .downcast_mut::<Vec<Handler<K>>>()
        {
            handlers.push(handler);
        }
    }

    pub fn notify<K: Resource>(&self, change: &Change<K>, informers: Option<&Informers>) {
        let Some(handlers) = self
            .by_kind
            .get(&TypeId::of::<K>())
            .and_then(|h| h.downcast_ref::<Vec<Handler<K>>>())
        else {
            return;
        };
        for h in handlers {
            h(change, informers);
        }
    }
}

/// Subscribes a controller's queue to one kind's changes.
type Watch = Box<dyn FnOnce(&mut Subscribers, &Arc<WorkQueue>)>;

/// A controller and the kinds that queue its keys, before it is registered.
pub struct For<C: Controller> {
    controller: C,
    queue: Arc<WorkQueue>,
    watches: Vec<Watch>,
    kinds: Vec<&'static str>,
}

impl<C: Controller> For<C> {
    /// `controller`, queued by every change of its own kind.
    pub fn new(controller: C) -> Self {
        let watch = |subs: &mut Subscribers, queue: &Arc<WorkQueue>| {
            let queue = queue.clone();
            subs.add::<C::Kind>(Arc::new(
                move |change: &Change<C::Kind>, _: Option<&Informers>| {
                    let (Change::Added(o) | Change::Updated { new: o, .. } | Change::Deleted(o)) =
                        change;
                    queue.add(key_of(o));
                },
            ));
        };
        Self {
            controller,
            queue: WorkQueue::new(C::NAME),
            watches: vec![Box::new(watch)],
            kinds: vec![C::Kind::KIND],
        }
    }

    /// Also queued by changes of `O`s whose controller reference names a `C::Kind`.
    pub fn owns<O: Resource>(mut self) -> Self {
        let watch = |subs: &mut Subscribers, queue: &Arc<WorkQueue>| {
            let queue = queue.clone();
            subs.add::<O>(Arc::new(
                move |change: &Change<O>, _: Option<&Informers>| {
                    let owner = |o: &O| {
                        controller_of(o.metadata())
                            .filter(|r| r.kind == C::Kind::KIND)
                            .map(|r| format!("{}/{}", o.namespace(), r.name))
                    };
                    match change {
                        Change::Updated { old, new } => {
                            // A changed controller reference queues the old owner too.
                            for k in [owner(old), owner(new)].into_iter().flatten() {
                                queue.add(k);
                            }
                        }
                        Change::Added(o) | Change::Deleted(o) => {
                            if let Some(k) = owner(o) {
                                queue.add(k);
                            }
                        }
                    }
                },
            ));
        };
        self.watches.push(Box::new(watch));
        self.kinds.push(O::KIND);
        self
    }

    /// Also queued, every object of its kind, by the changes of `O`s that `relevant` picks
    /// (a DaemonSet looks at every node that joins, leaves or changes its labels).
    pub fn watches_all<O: Resource>(mut self, relevant: fn(&Change<O>) -> bool) -> Self {
        let watch = move |subs: &mut Subscribers, queue: &Arc<WorkQueue>| {
            let queue = queue.clone();
            subs.add::<O>(Arc::new(
                move |change: &Change<O>, informers: Option<&Informers>| {
                    if !relevant(change) {
                        return;
                    }
                    if let Some(i) = informers.and_then(|i| i.of::<C::Kind>()) {
                        i.with_cache(|c| c.values().for_each(|o| queue.add(key_of(o))));
                    }
                },
            ));
        };
        self.watches.push(Box::new(watch));
        self.kinds.push(O::KIND);
        self
    }

    /// Subscribes its queue to its kinds' changes; the runner starts it after the informers
    /// have synced.
    pub fn register(self, subs: &mut Subscribers) -> Box<dyn Running> {
        for watch in self.watches {
            watch(subs, &self.queue);
        }
        Box::new(Registered {
            controller: Arc::new(self.controller),
            queue: self.queue,
            kinds: self.kinds,
        })
    }
}

struct Registered<C> {
    controller: Arc<C>,
    queue: Arc<WorkQueue>,
    kinds: Vec<&'static str>,
}

/// A registered controller, as the runner drives it.
pub trait Running: Send + Sync {
    fn queue(&self) -> &Arc<WorkQueue>;
    /// The kinds it reads, each of which needs an informer.
    fn kinds(&self) -> &[&'static str];
    /// Queues every object of its kind (at start, and every so often in case a change was
    /// missed).
    fn resync(&self, api: &Live);
    fn spawn(
        &self,
        api: Arc<Live>,
        workers: usize,
        stats: Arc<Stats>,
        stop: watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
    );
}

impl<C: Controller> Running for Registered<C> {
    fn queue(&self) -> &Arc<WorkQueue> {
        &self.queue
    }

    fn kinds(&self) -> &[&'static str] {
        &self.kinds
    }

    fn resync(&self, api: &Live) {
        if let Some(i) = api.ctx.try_informers().and_then(|i| i.of::<C::Kind>()) {
            i.with_cache(|c| c.values().for_each(|o| self.queue.add(key_of(o))));
        }
    }

    fn spawn(
        &self,
        api: Arc<Live>,
        workers: usize,
        stats: Arc<Stats>,
        stop: watch::Receiver<bool>,
        tasks: &mut JoinSet<()>,
    ) {
        let controller = self.controller.clone();
        tasks.spawn(queue::run_workers(
            self.queue.clone(),
            workers,
            move |key| {
                let (controller, api) = (controller.clone(), api.clone());
                async move { controller.reconcile(&*api, &key).await }
            },
            stats,
            stop,
        ));
    }
}

/// The [`Api`] of a running cluster: the informers' caches and the client.
pub struct Live {
    pub(crate) ctx: Arc<Ctx>,
}

impl Live {
    fn informer<K: Resource>(&self) -> Option<&flotilla_client::informer::Informer<K>> {
        self.ctx.try_informers().and_then(|i| i.of::<K>())
    }
}

impl Api for Live {
    fn get<K: Resource>(&self, namespace: &str, name: &str) -> Option<K> {
        self.informer::<K>()?.get(namespace, name)
    }

    fn list<K: Resource>(&self, namespace: &str, keep: impl Fn(&K) -> bool) -> Vec<K> {
        match self.informer::<K>() {
            Some(i) if namespace.is_empty() => {
                i.with_cache(|c| c.values().filter(|o| keep(o)).cloned().collect())
            }
            Some(i) => i.list_namespace(namespace, keep),
            None => Vec::new(),
        }
    }

    fn create<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        self.ctx.client.create(object)
    }

    fn update<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        self.ctx.client.update(object)
    }

    fn update_status<K: Resource>(
        &self,
        object: &K,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        self.ctx.client.update_status(object)
    }

    fn delete<K: Resource>(
        &self,
        req: &DeleteRequest,
    ) -> impl Future<Output = Result<K, ClientError>> + Send {
        self.ctx.client.delete(req)
    }

    fn record<K: Resource>(
        &self,
        component: &'static str,
        object: &K,
        kind: &'static str,
        reason: &'static str,
        message: String,
    ) {
        record_event(&self.ctx.client, component, object, kind, reason, message);
    }

    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
