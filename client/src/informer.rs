//! Informers: list, then watch, into a local cache; every change goes to a handler.
//!
//! After a compacted revision or a lost connection the informer lists again and tells the
//! handler only what differs from its cache, so a handler sees each change once.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flotilla_proto::api::{ListRequest, Resource, WatchRequest};
use tokio::sync::watch as signal;

use crate::client::Client;
use crate::watch::{WatchItem, watch};

/// A change the informer saw.
#[derive(Clone, Debug, PartialEq)]
pub enum Change<K> {
    Added(K),
    Updated { old: K, new: K },
    Deleted(K),
}

/// Which objects an informer follows.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub namespace: String,
    pub label_selector: String,
    pub field_selector: String,
}

type Cache<K> = Arc<RwLock<BTreeMap<String, K>>>;

/// A running informer; stops when dropped.
pub struct Informer<K> {
    cache: Cache<K>,
    synced: signal::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Informer<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The cache key of an object: `namespace/name`, or `name` for cluster-scoped kinds.
pub fn cache_key<K: Resource>(object: &K) -> String {
    key(object.namespace(), object.name())
}

fn key(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

impl<K: Resource> Informer<K> {
    /// Starts following the objects `filter` selects; `handler` is called, in order, for
    /// every change, from the informer's own task (keep it quick: hand work to a queue).
    pub fn start(
        client: Client,
        filter: Filter,
        handler: impl Fn(Change<K>) + Send + Sync + 'static,
    ) -> Self {
        let cache: Cache<K> = Arc::default();
        let (synced_tx, synced) = signal::channel(false);
        let task = tokio::spawn(run(client, filter, cache.clone(), synced_tx, handler));
        Self {
            cache,
            synced,
            task,
        }
    }

    /// Waits until the first list is in the cache.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<K> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.get(&key(namespace, name)).cloned()
    }

    /// Every cached object, ordered by namespace and name.
    pub fn list(&self) -> Vec<K> {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        cache.values().cloned().collect()
    }

    /// Reads the cache in place (no copies), e.g. to pick a few objects out of many.
    pub fn with_cache<R>(&self, f: impl FnOnce(&BTreeMap<String, K>) -> R) -> R {
        f(&self.cache.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The cached objects of one namespace that `keep` selects.
    pub fn list_namespace(&self, namespace: &str, keep: impl Fn(&K) -> bool) -> Vec<K> {
        let prefix = format!("{namespace}/");
        self.with_cache(|c| {
            c.range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(_, o)| keep(o))
                .map(|(_, o)| o.clone())
                .collect()
        })
    }

    pub fn len(&self) -> usize {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn run<K: Resource>(
    client: Client,
    filter: Filter,
    cache: Cache<K>,
    synced: signal::Sender<bool>,
    handler: impl Fn(Change<K>),
) {
    let mut pause = Duration::from_millis(100);
    loop {
        let list = ListRequest {
            namespace: filter.namespace.clone(),
            label_selector: filter.label_selector.clone(),
            field_selector: filter.field_selector.clone(),
            limit: 1000,
            ..Default::default()
        };
        let (items, meta) = match client.list::<K>(&list).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("informer for {}: list failed: {e}", K::PLURAL);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        pause = Duration::from_millis(100);
        replace_all(&cache, items, &handler);
        let _ = synced.send(true);

        let req = WatchRequest {
            namespace: filter.namespace.clone(),
            label_selector: filter.label_selector.clone(),
            field_selector: filter.field_selector.clone(),
            resource_version: meta.resource_version,
            allow_bookmarks: true,
        };
        let mut events = watch::<K>(client.clone(), req);
        while let Some(item) = events.recv().await {
            match item {
                Ok(WatchItem::Added(o)) | Ok(WatchItem::Modified(o)) => upsert(&cache, o, &handler),
                Ok(WatchItem::Deleted(o)) => {
                    let old = cache
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&cache_key(&o));
                    if old.is_some() {
                        handler(Change::Deleted(o));
                    }
                }
                Ok(WatchItem::Bookmark(_)) => {}
                Ok(WatchItem::Expired) => break,
                Err(e) => {
                    tracing::warn!(
                        "informer for {}: watch failed: {e}; listing again",
                        K::PLURAL
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}

fn upsert<K: Resource>(cache: &Cache<K>, object: K, handler: &impl Fn(Change<K>)) {
    let old = cache
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cache_key(&object), object.clone());
    match old {
        None => handler(Change::Added(object)),
        Some(old) if old.resource_version() != object.resource_version() => {
            handler(Change::Updated { old, new: object })
        }
        Some(_) => {}
    }
}

/// Replaces the cache with a fresh list, telling the handler what differs.
fn replace_all<K: Resource>(cache: &Cache<K>, items: Vec<K>, handler: &impl Fn(Change<K>)) {
    let fresh: BTreeMap<String, K> = items.into_iter().map(|o| (cache_key(&o), o)).collect();
    let old = std::mem::replace(
        &mut *cache.write().unwrap_or_else(|p| p.into_inner()),
        fresh.clone(),
    );
    for (k, o) in &old {
        if !fresh.contains_key(k) {
            handler(Change::Deleted(o.clone()));
        }
    }
    for (k, new) in fresh {
        match old.get(&k) {
            None => handler(Change::Added(new)),
            Some(o) if o.resource_version() != new.resource_version() => handler(Change::Updated {
                old: o.clone(),
                new,
            }),
            Some(_) => {}
        }
    }
}
