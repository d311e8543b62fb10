//! The work queue every controller shares the shape of: keys, not objects; a key queued
//! twice is worked once; a key being worked on is never worked by two workers at once (a
//! change meanwhile queues it again for after); failures come back with a per-key
//! exponential back-off.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

pub const BASE_DELAY: Duration = Duration::from_millis(5);
pub const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Inner {
    queue: VecDeque<String>,
    /// Keys in `queue` or waiting to be (re-)queued once their worker is done.
    dirty: HashSet<String>,
    processing: HashSet<String>,
    failures: HashMap<String, u32>,
    shutting_down: bool,
}

/// A de-duplicating, rate-limited queue of keys.
pub struct WorkQueue {
    name: &'static str,
    inner: Mutex<Inner>,
    ready: Notify,
}

impl WorkQueue {
    pub fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            inner: Mutex::default(),
            ready: Notify::new(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut q = self.lock();
        if q.shutting_down || !q.dirty.insert(key.clone()) {
            return;
        }
        if !q.processing.contains(&key) {
            q.queue.push_back(key);
            drop(q);
            self.ready.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        if delay.is_zero() {
            return self.add(key);
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Queues `key` again after its back-off (5 ms doubling per failure up to 30 s).
    pub fn add_rate_limited(self: &Arc<Self>, key: &str) {
        let delay = {
            let mut q = self.lock();
            let n = q.failures.entry(key.to_string()).or_default();
            *n += 1;
            (BASE_DELAY * 2u32.saturating_pow((*n - 1).min(20))).min(MAX_DELAY)
        };
        self.add_after(key, delay);
    }

    /// The key succeeded: its back-off starts over.
    pub fn forget(&self, key: &str) {
        self.lock().failures.remove(key);
    }

    /// Waits for the next key; `None` once the queue is shut down.
    pub async fn get(&self) -> Option<String> {
        loop {
            let notified = self.ready.notified();
            {
                let mut q = self.lock();
                if q.shutting_down {
                    return None;
                }
                if let Some(key) = q.queue.pop_front() {
                    q.dirty.remove(&key);
                    q.processing.insert(key.clone());
                    if !q.queue.is_empty() {
                        self.ready.notify_one();
                    }
                    return Some(key);
                }
            }
            notified.await;
        }
    }

    /// The worker is finished with `key`; if it changed meanwhile it is queued again.
    pub fn done(&self, key: &str) {
        let mut q = self.lock();
        q.processing.remove(key);
        if q.dirty.contains(key) {
            q.queue.push_back(key.to_string());
            drop(q);
            self.ready.notify_one();
        }
    }

    pub fn shut_down(&self) {
        self.lock().shutting_down = true;
        self.ready.notify_waiters();
    }

    /// Keys waiting (not counting those being worked on).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a reconcile asks for next.
pub type Requeue = Option<Duration>;

/// Runs `workers` workers over `queue` until `stop`: each takes a key, reconciles it, and
/// on error queues it again with back-off; `Ok(Some(d))` queues it again after `d`.
pub async fn run_workers<F, Fut, E>(
    queue: Arc<WorkQueue>,
    workers: usize,
    reconcile: F,
    stats: Arc<crate::Stats>,
    mut stop: watch::Receiver<bool>,
) where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Requeue, E>> + Send,
    E: std::fmt::Display,
{
    let reconcile = Arc::new(reconcile);
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let (queue, reconcile, stats) = (queue.clone(), reconcile.clone(), stats.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(key) = queue.get().await {
                let started = Instant::now();
                stats.reconciles.fetch_add(1, Ordering::Relaxed);
                match reconcile(key.clone()).await {
                    Ok(requeue) => {
                        queue.forget(&key);
                        if let Some(d) = requeue {
                            queue.add_after(key.clone(), d);
                        }
                    }
                    Err(e) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(
                            controller = queue.name(),
                            key,
                            "reconcile failed (retrying): {e}"
                        );
                        queue.add_rate_limited(&key);
                    }
                }
                tracing::trace!(controller = queue.name(), key, elapsed = ?started.elapsed());
                queue.done(&key);
            }
        }));
    }
    let _ = stop.wait_for(|s| *s).await;
    queue.shut_down();
    for t in tasks {
        t.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_queued_twice_is_worked_once() {
        let q = WorkQueue::new("t");
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.get().await.as_deref(), Some("a"));
        assert_eq!(q.get().await.as_deref(), Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn a_key_changed_while_worked_comes_back_after() {
        let q = WorkQueue::new("t");
        q.add("a");
        let k = q.get().await.unwrap();
        // Changed while being worked on: not handed to a second worker now...
        q.add("a");
        assert!(q.is_empty());
        // ...but right after.
        q.done(&k);
        assert_eq!(q.get().await.as_deref(), Some("a"));
        q.done("a");
        assert!(q.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_exponentially() {
        let q = WorkQueue::new("t");
        for expected in [5u64, 10, 20, 40] {
            let start = Instant::now();
            q.add_rate_limited("a");
            assert_eq!(q.get().await.as_deref(), Some("a"));
            assert_eq!(start.elapsed(), Duration::from_millis(expected));
            q.done("a");
        }
        q.forget("a");
        let start = Instant::now();
        q.add_rate_limited("a");
        q.get().await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(5));
    }

    #[tokio::test]
    async fn shut_down_wakes_workers() {
        let q = WorkQueue::new("t");
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.get().await })
        };
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
