//! The scheduling queue: pods waiting for a node.
//!
//! Three places, as in kube-scheduler: *active* (a heap by priority, then first come),
//! *backoff* (failed attempts wait 1 s doubling to 10 s before going active again) and
//! *unschedulable* (fitted nowhere; waits for the cluster to change). A key is in at most
//! one of them; adding a key the queue already holds does nothing.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Active,
    Backoff,
    Unschedulable,
    /// Popped, being tried.
    InFlight,
}

#[derive(Debug)]
struct Entry {
    priority: i32,
    seq: u64,
    attempts: u32,
    place: Place,
    /// When the last failed attempt's back-off ends.
    backoff_until: Instant,
}

#[derive(Debug, Default)]
pub struct Queue {
    entries: HashMap<String, Entry>,
    /// (priority, earlier first, key); entries whose seq no longer matches are stale.
    active: BinaryHeap<(i32, Reverse<u64>, String)>,
    backoff: BTreeSet<(Instant, u64, String)>,
    seq: u64,
}

impl Queue {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a pod to the active queue, unless the queue already holds it.
    pub fn add(&mut self, key: &str, priority: i32) {
        if self.entries.contains_key(key) {
            return;
        }
        self.seq += 1;
        self.entries.insert(
            key.to_string(),
            Entry {
                priority,
                seq: self.seq,
                attempts: 0,
                place: Place::Active,
                backoff_until: Instant::now(),
            },
        );
        self.active
            .push((priority, Reverse(self.seq), key.to_string()));
    }

    /// Forgets a pod (bound, deleted, or no longer ours).
    pub fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key)
            && e.place == Place::Backoff
        {
            self.backoff
                .remove(&(e.backoff_until, e.seq, key.to_string()));
        }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The next pod to try: highest priority, then the one waiting longest. The pod stays
    /// known to the queue (as "in flight") until [`Queue::done`], [`Queue::unschedulable`]
    /// or [`Queue::backoff`] says what became of it.
    pub fn pop(&mut self, now: Instant) -> Option<String> {
        self.flush_backoff(now);
        while let Some((_, Reverse(seq), key)) = self.active.pop() {
            if let Some(e) = self.entries.get_mut(&key)
                && e.place == Place::Active
                && e.seq == seq
            {
                // In no queue, but still known (so `add` leaves it alone).
                e.place = Place::InFlight;
                return Some(key);
            }
        }
        None
    }

    /// The popped pod was assumed onto a node: the queue forgets it.
    pub fn done(&mut self, key: &str) {
        self.entries.remove(key);
    }

    /// The popped pod fits nowhere: it waits for the cluster to change.
    pub fn unschedulable(&mut self, key: &str, now: Instant) {
        if let Some(e) = self.entries.get_mut(key) {
            e.attempts += 1;
            e.place = Place::Unschedulable;
            e.backoff_until = now + backoff_for(e.attempts);
        }
    }

    /// The attempt failed for a reason that may pass (a bind error): try again after a
    /// back-off. Also puts back a pod the queue had forgotten.
    pub fn backoff(&mut self, key: &str, priority: i32, now: Instant) {
        self.seq += 1;
        let seq = self.seq;
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            priority,
            seq,
            attempts: 0,
            place: Place::InFlight,
            backoff_until: now,
        });
        if matches!(e.place, Place::Backoff | Place::Active) {
            // Already waiting its turn.
            return;
        }
        e.attempts += 1;
        e.seq = seq;
        e.place = Place::Backoff;
        e.backoff_until = now + backoff_for(e.attempts);
        self.backoff.insert((e.backoff_until, seq, key.to_string()));
    }

    /// Something changed that may let unschedulable pods fit. With `immediately` (a node
    /// joined or grew) they go straight to the active queue; otherwise each waits out its
    /// back-off first, so that a busy cluster doesn't re-try every waiting pod on every
    /// change.
    pub fn move_unschedulable(&mut self, immediately: bool, now: Instant) -> usize {
        let mut moved = 0;
        for (key, e) in self.entries.iter_mut() {
            if e.place != Place::Unschedulable {
                continue;
            }
            self.seq += 1;
            e.seq = self.seq;
            moved += 1;
            if immediately || e.backoff_until <= now {
                e.place = Place::Active;
                self.active.push((e.priority, Reverse(e.seq), key.clone()));
            } else {
                e.place = Place::Backoff;
                self.backoff.insert((e.backoff_until, e.seq, key.clone()));
            }
        }
        moved
    }

    fn flush_backoff(&mut self, now: Instant) {
        while let Some(first) = self.backoff.first() {
            if first.0 > now {
                break;
            }
            let (_, seq, key) = self.backoff.pop_first().expect("checked");
            if let Some(e) = self.entries.get_mut(&key)
                && e.place == Place::Backoff
                && e.seq == seq
            {
                e.place = Place::Active;
                self.active.push((e.priority, Reverse(seq), key));
            }
        }
    }

    /// When the earliest back-off ends, if any pod is backing off.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.backoff.first().map(|b| b.0)
    }

    /// Pods waiting: (active, backing off, unschedulable).
    pub fn lengths(&self) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for e in self.entries.values() {
            match e.place {
                Place::Active => counts.0 += 1,
                Place::Backoff => counts.1 += 1,
                Place::Unschedulable => counts.2 += 1,
                Place::InFlight => {}
            }
        }
        counts
    }
}

fn backoff_for(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(8);
    (INITIAL_BACKOFF * (1 << shift)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_then_fifo() {
        let mut q = Queue::new();
        let now = Instant::now();
        q.add("a", 0);
        q.add("b", 10);
        q.add("c", 0);
        q.add("d", 10);
        let order: Vec<_> = std::iter::from_fn(|| q.pop(now)).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
    }

    #[test]
    fn adding_twice_queues_once() {
        let mut q = Queue::new();
        let now = Instant::now();
        q.add("a", 0);
        q.add("a", 0);
        assert_eq!(q.pop(now).as_deref(), Some("a"));
        // In flight: a new add (an update event) doesn't queue it again.
        q.add("a", 0);
        assert_eq!(q.pop(now), None);
        q.done("a");
        q.add("a", 0);
        assert_eq!(q.pop(now).as_deref(), Some("a"));
    }

    #[test]
    fn removed_pods_are_not_popped() {
        let mut q = Queue::new();
        let now = Instant::now();
        q.add("a", 0);
        q.add("b", 0);
        q.remove("a");
        assert_eq!(q.pop(now).as_deref(), Some("b"));
        assert_eq!(q.pop(now), None);
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.add("a", 0);
        assert!(q.pop(t0).is_some());
        q.backoff("a", 0, t0);
        assert_eq!(q.pop(t0), None);
        assert_eq!(q.next_backoff(), Some(t0 + Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(q.pop(t1).as_deref(), Some("a"));
        q.backoff("a", 0, t1);
        assert_eq!(q.next_backoff(), Some(t1 + Duration::from_secs(2)));
        assert_eq!(backoff_for(4), Duration::from_secs(8));
        assert_eq!(backoff_for(5), MAX_BACKOFF);
        assert_eq!(backoff_for(100), MAX_BACKOFF);
    }

    #[test]
    fn unschedulable_pods_wait_for_a_change() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.add("a", 0);
        q.add("b", 0);
        assert!(q.pop(t0).is_some());
        assert!(q.pop(t0).is_some());
        q.unschedulable("a", t0);
        q.unschedulable("b", t0);
        assert_eq!(q.lengths(), (0, 0, 2));
        // Nothing happens by itself, even after the back-off.
        assert_eq!(q.pop(t0 + Duration::from_secs(60)), None);
        // A pod went away: they go back, but only after their back-off.
        assert_eq!(q.move_unschedulable(false, t0), 2);
        assert_eq!(q.pop(t0), None);
        assert_eq!(q.lengths(), (0, 2, 0));
        assert!(q.pop(t0 + Duration::from_secs(1)).is_some());
        assert!(q.pop(t0 + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn a_new_node_retries_unschedulable_pods_at_once() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.add("a", 0);
        assert!(q.pop(t0).is_some());
        q.unschedulable("a", t0);
        q.move_unschedulable(true, t0);
        assert_eq!(q.pop(t0).as_deref(), Some("a"));
    }

    #[test]
    fn in_flight_pods_are_not_moved() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.add("a", 0);
        assert!(q.pop(t0).is_some());
        assert_eq!(q.move_unschedulable(true, t0), 0);
        assert_eq!(q.pop(t0), None);
    }

    #[test]
    fn backoff_of_a_forgotten_pod_requeues_it() {
        let mut q = Queue::new();
        let t0 = Instant::now();
        q.backoff("a", 5, t0);
        assert!(q.contains("a"));
        assert_eq!(q.pop(t0 + INITIAL_BACKOFF).as_deref(), Some("a"));
    }
}
