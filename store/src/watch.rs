//! The watch hub: every member serves watches from its own applied state.
//!
//! The apply path publishes each batch of events into a bounded broadcast ring and never waits
//! for anyone. Each watcher is a task that follows the ring while it keeps up; when it falls
//! behind (its client reads slowly, so the ring overwrote what it had not read) it catches up
//! from history in the backend, then rejoins the ring. So a slow watcher costs only itself.
//!
//! A watcher is canceled, with a reason, when the history it still needs has been compacted
//! (the reason names the compact revision; the client must relist), or when its client stops
//! reading altogether for [`WatchConfig::send_timeout`] (the reason names the revision to
//! resume from).
//!
//! Ordering: a watcher subscribes to the ring *before* it reads history, and the apply path
//! writes records before it publishes them, so between history and ring there is no gap; it
//! skips what it has already delivered, so there are no duplicates.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::mvccpb::{Event, KeyValue, event::EventType};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

use crate::errors::{MvccError, StoreError};
use crate::mvcc::KeyRange;

/// Events of consecutive revisions `from..=to`, in order, as applied.
#[derive(Debug)]
pub struct EventBatch {
    pub from: i64,
    pub to: i64,
    pub events: Vec<Event>,
}

#[derive(Clone, Debug)]
enum Notice {
    Events(Arc<EventBatch>),
    /// The state was replaced (a snapshot was installed): re-read history.
    Reset,
}

/// Where watchers read what the ring no longer holds.
pub trait History: Send + Sync + 'static {
    /// The newest applied revision.
    fn revision(&self) -> i64;
    /// History strictly before this revision is gone.
    fn compact_revision(&self) -> i64;
    /// Events of whole revisions from `from` on, about `limit` of them, each with its previous
    /// value; and the revision up to which the answer is complete.
    fn events_since(&self, from: i64, limit: usize) -> Result<(Vec<Event>, i64), StoreError>;
    /// The value `key` held just before `revision`, if it had one and it is not compacted.
    fn value_before(&self, key: &[u8], revision: i64) -> Result<Option<KeyValue>, StoreError>;
}

/// Knobs of the watch hub.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Batches the ring holds before a slow watcher must catch up from history.
    pub ring_capacity: usize,
    /// How often a watcher created with `progress_notify` hears of progress when idle.
    pub progress_interval: Duration,
    /// How long a watcher waits for its client to take a response before it is canceled.
    pub send_timeout: Duration,
    /// Events read from history per step of a catch-up.
    pub history_batch: usize,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 1024,
            progress_interval: Duration::from_secs(60),
            send_timeout: Duration::from_secs(30),
            history_batch: 1000,
        }
    }
}

/// Publishes applied events to every watcher of this member.
pub struct WatchHub {
    tx: broadcast::Sender<Notice>,
    config: WatchConfig,
    watchers: Arc<AtomicI64>,
    /// The ranges of the running watchers that want previous values.
    prev: Arc<Mutex<PrevRanges>>,
}

/// The key ranges of the watchers that want previous values, by watcher.
#[derive(Default)]
struct PrevRanges {
    last_id: u64,
    by_watcher: HashMap<u64, KeyRange>,
    /// `by_watcher`'s ranges, as the apply path takes them (once per apply call).
    all: Arc<Vec<KeyRange>>,
}

impl PrevRanges {
    fn rebuild(&mut self) {
        self.all = Arc::new(self.by_watcher.values().cloned().collect());
    }
}

/// Keeps a watcher's range among those that want previous values while it lives.
struct PrevWatch {
    ranges: Arc<Mutex<PrevRanges>>,
    id: u64,
}

impl PrevWatch {
    fn new(ranges: Arc<Mutex<PrevRanges>>, range: KeyRange) -> Self {
        let id = {
            let mut r = ranges.lock().unwrap_or_else(|p| p.into_inner());
            r.last_id += 1;
            let id = r.last_id;
            r.by_watcher.insert(id, range);
            r.rebuild();
            id
        };
        Self { ranges, id }
    }
}

impl Drop for PrevWatch {
    fn drop(&mut self) {
        let mut r = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        r.by_watcher.remove(&self.id);
        r.rebuild();
    }
}

impl WatchHub {
    pub fn new(config: WatchConfig) -> Self {
        let (tx, _) = broadcast::channel(config.ring_capacity.max(1));
        Self {
            tx,
            config,
            watchers: Arc::new(AtomicI64::new(0)),
            prev: Arc::default(),
        }
    }

    /// Whether any watcher on this member wants previous values.
    pub fn wants_prev(&self) -> bool {
        !self.prev_ranges().is_empty()
    }

    /// The key ranges of the watchers on this member that want previous values. Events of
    /// keys outside them may leave previous values out: a watcher started since reads them
    /// from history.
    pub fn prev_ranges(&self) -> Arc<Vec<KeyRange>> {
        self.prev
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .all
            .clone()
    }

    /// Called by the apply path; never waits.
    pub fn publish(&self, batch: EventBatch) {
        if batch.events.is_empty() {
            return;
        }
        // An error only means nobody is subscribed.
        let _ = self.tx.send(Notice::Events(Arc::new(batch)));
    }

    /// Called after the state was replaced by a snapshot.
    pub fn reset(&self) {
        let _ = self.tx.send(Notice::Reset);
    }

    /// Number of running watchers on this member.
    pub fn watcher_count(&self) -> i64 {
        self.watchers.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    /// Starts a watcher. Its output goes to `out`; cancellation notices that must get through
    /// even when `out` is full go to `control`. Dropping the returned handle stops it.
    pub fn watch(
        &self,
        spec: WatchSpec,
        history: Arc<dyn History>,
        out: mpsc::Sender<WatchOutput>,
        control: mpsc::UnboundedSender<WatchOutput>,
    ) -> WatcherHandle {
        let prev_range = spec.prev_kv.then(|| spec.range.clone());
        let rx = self.tx.subscribe();
        let progress = Arc::new(AtomicI64::new(spec.start.saturating_sub(1)));
        let watcher = Watcher {
            spec,
            history,
            rx,
            out,
            control,
            config: self.config.clone(),
            progress: progress.clone(),
            _count: WatcherCount::new(self.watchers.clone()),
            _prev: prev_range.map(|r| PrevWatch::new(self.prev.clone(), r)),
        };
        let task = tokio::spawn(watcher.run());
        WatcherHandle { task, progress }
    }
}

/// What to watch.
#[derive(Clone, Debug)]
pub struct WatchSpec {
    pub id: i64,
    pub range: KeyRange,
    /// First revision to deliver (inclusive).
    pub start: i64,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    pub progress_notify: bool,
}

/// What a watcher sends to its stream.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchOutput {
    /// Events of whole revisions; `revision` is the newest revision they reflect.
    Events {
        watch_id: i64,
        revision: i64,
        events: Vec<Event>,
    },
    /// Nothing to deliver up to `revision`.
    Progress { watch_id: i64, revision: i64 },
    /// The watcher stopped; `compact_revision` is set when history it needed is compacted.
    Canceled {
        watch_id: i64,
        compact_revision: i64,
        reason: String,
    },
}

/// A running watcher; aborted when dropped.
pub struct WatcherHandle {
    task: tokio::task::JoinHandle<()>,
    progress: Arc<AtomicI64>,
}

impl WatcherHandle {
    /// Every event of this watcher up to this revision has been handed to its stream.
    pub fn progress(&self) -> i64 {
        self.progress.load(Ordering::Acquire)
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for WatcherHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct WatcherCount(Arc<AtomicI64>);

impl WatcherCount {
    fn new(count: Arc<AtomicI64>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for WatcherCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Watcher {
    spec: WatchSpec,
    history: Arc<dyn History>,
    rx: broadcast::Receiver<Notice>,
    out: mpsc::Sender<WatchOutput>,
    control: mpsc::UnboundedSender<WatchOutput>,
    config: WatchConfig,
    progress: Arc<AtomicI64>,
    _count: WatcherCount,
    _prev: Option<PrevWatch>,
}

/// Why a watcher stopped delivering.
enum Stop {
    /// The stream is gone; nothing more to say.
    Closed,
    Canceled {
        compact_revision: i64,
        reason: String,
    },
}

impl Watcher {
    async fn run(mut self) {
        let mut next = self.spec.start;
        let stop = loop {
            if let Err(stop) = self.catch_up(&mut next).await {
                break stop;
            }
            match self.follow(&mut next).await {
                Ok(()) => continue, // fell behind: catch up again
                Err(stop) => break stop,
            }
        };
        if let Stop::Canceled {
            compact_revision,
            reason,
        } = stop
        {
            let _ = self.control.send(WatchOutput::Canceled {
                watch_id: self.spec.id,
                compact_revision,
                reason,
            });
        }
    }

    /// Delivers from history until caught up with the newest applied revision.
    async fn catch_up(&mut self, next: &mut i64) -> Result<(), Stop> {
        loop {
            let newest = self.history.revision();
            let (events, upto) = match self.history.events_since(*next, self.config.history_batch) {
                Ok(found) => found,
                Err(StoreError::Mvcc(MvccError::Compacted { compact_revision })) => {
                    return Err(self.compacted(compact_revision));
                }
                Err(e) => {
                    return Err(Stop::Canceled {
                        compact_revision: 0,
                        reason: format!("watcher could not read history: {e}"),
                    });
                }
            };
            self.deliver(events, upto, next).await?;
            if upto >= newest {
                return Ok(());
            }
        }
    }

    /// Delivers from the ring until the watcher falls behind it (`Ok`) or stops (`Err`).
    async fn follow(&mut self, next: &mut i64) -> Result<(), Stop> {
        let mut ticker = tokio::time::interval_at(
            Instant::now() + self.config.progress_interval,
            self.config.progress_interval,
        );
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sent_since_tick = false;
        loop {
            tokio::select! {
                notice = self.rx.recv() => match notice {
                    Ok(Notice::Events(batch)) => {
                        if batch.to < *next {
                            continue;
                        }
                        if batch.from > *next {
                            return Ok(()); // a gap: read it from history
                        }
                        let events = batch.events.iter()
                            .filter(|e| e.kv.as_ref().is_some_and(|kv| kv.mod_revision >= *next))
                            .cloned()
                            .collect();
                        sent_since_tick |= self.deliver(events, batch.to, next).await?;
                    }
                    Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                    Err(broadcast::error::RecvError::Closed) => return Err(Stop::Closed),
                },
                _ = ticker.tick(), if self.spec.progress_notify => {
                    if !sent_since_tick {
                        let revision = self.progress.load(Ordering::Acquire);
                        self.send(WatchOutput::Progress { watch_id: self.spec.id, revision }).await?;
                    }
                    sent_since_tick = false;
                }
            }
        }
    }

    /// Filters and sends events of revisions up to `upto`; returns whether anything was sent.
    async fn deliver(
        &mut self,
        events: Vec<Event>,
        upto: i64,
        next: &mut i64,
    ) -> Result<bool, Stop> {
        let spec = &self.spec;
        let mut events: Vec<Event> = events
            .into_iter()
            .filter(|e| {
                let Some(kv) = &e.kv else { return false };
                let is_put = e.r#type == EventType::Put as i32;
                let wanted = if is_put {
                    !spec.no_put
                } else {
                    !spec.no_delete
                };
                spec.range.contains(&kv.key) && wanted
            })
            .map(|mut e| {
                if !spec.prev_kv {
                    e.prev_kv = None;
                }
                e
            })
            .collect();
        if spec.prev_kv {
            // Published while no watcher wanted previous values: a put of a key that already
            // had a value (its version is above 1) comes without it. Read it from history.
            for e in events.iter_mut() {
                let Some(kv) = &e.kv else { continue };
                if e.prev_kv.is_none() && e.r#type == EventType::Put as i32 && kv.version > 1 {
                    e.prev_kv = self
                        .history
                        .value_before(&kv.key, kv.mod_revision)
                        .map_err(|err| Stop::Canceled {
                            compact_revision: 0,
                            reason: format!("watcher could not read a previous value: {err}"),
                        })?;
                }
            }
        }
        let sent = !events.is_empty();
        if sent {
            let revision = upto.max(*next);
            self.send(WatchOutput::Events {
                watch_id: spec.id,
                revision,
                events,
            })
            .await?;
        }
        *next = (*next).max(upto + 1);
        self.progress.fetch_max(upto, Ordering::AcqRel);
        Ok(sent)
    }

    async fn send(&mut self, output: WatchOutput) -> Result<(), Stop> {
        match tokio::time::timeout(self.config.send_timeout, self.out.send(output)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Closed),
            Err(_) => {
                let resume = self.progress.load(Ordering::Acquire) + 1;
                Err(Stop::Canceled {
                    compact_revision: 0,
                    reason: format!(
                        "watcher canceled: the client did not read for {:?}; resume from revision {resume}",
                        self.config.send_timeout
                    ),
                })
            }
        }
    }

    fn compacted(&self, compact_revision: i64) -> Stop {
        Stop::Canceled {
            compact_revision,
            reason: format!(
                "mvcc: required revision has been compacted (history starts at revision {compact_revision})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// History where `k` held `old` before every revision, and nothing else happened.
    struct OneKey;

    impl History for OneKey {
        fn revision(&self) -> i64 {
            1
        }

        fn compact_revision(&self) -> i64 {
            0
        }

        fn events_since(&self, _from: i64, _limit: usize) -> Result<(Vec<Event>, i64), StoreError> {
            Ok((Vec::new(), 1))
        }

        fn value_before(&self, key: &[u8], _revision: i64) -> Result<Option<KeyValue>, StoreError> {
            Ok((key == b"k").then(|| KeyValue {
                key: key.to_vec(),
                value: b"old".to_vec(),
                version: 1,
                ..Default::default()
            }))
        }
    }

    fn put_event(version: i64) -> Event {
        Event {
            r#type: EventType::Put as i32,
            kv: Some(KeyValue {
                key: b"k".to_vec(),
                value: b"new".to_vec(),
                mod_revision: 2,
                version,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    /// Events published while no watcher wanted previous values leave them out; a watcher that
    /// wants them, started meanwhile, reads them from history.
    #[tokio::test]
    async fn a_prev_kv_watcher_reads_what_events_left_out() {
        let hub = WatchHub::new(WatchConfig::default());
        assert!(!hub.wants_prev());
        let (out_tx, mut out) = mpsc::channel(16);
        let (control, _control_rx) = mpsc::unbounded_channel();
        let spec = WatchSpec {
            id: 7,
            range: KeyRange::Single(b"k".to_vec()),
            start: 2,
            prev_kv: true,
            no_put: false,
            no_delete: false,
            progress_notify: false,
        };
        let handle = hub.watch(spec, Arc::new(OneKey), out_tx, control);
        assert!(hub.wants_prev());
        // A put of an existing key (version 2) and of a new one (version 1).
        hub.publish(EventBatch {
            from: 2,
            to: 2,
            events: vec![put_event(2), put_event(1)],
        });
        let got = tokio::time::timeout(Duration::from_secs(10), out.recv())
            .await
            .expect("the watcher delivers")
            .expect("the watcher runs");
        let WatchOutput::Events { events, .. } = got else {
            panic!("{got:?}");
        };
        assert_eq!(
            events[0].prev_kv.as_ref().map(|p| p.value.as_slice()),
            Some(b"old".as_slice())
        );
        assert_eq!(
            events[1].prev_kv, None,
            "a created key has no previous value"
        );
        drop(handle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while hub.wants_prev() {
            assert!(
                Instant::now() < deadline,
                "the stopped watcher is still counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
