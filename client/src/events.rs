//! How many Events one object may get: client-go's spam filter (`EventSourceObjectSpamFilter`),
//! so that an object that fails over and over (a pod that cannot be scheduled, a node that
//! flaps, a ReplicaSet whose creates are refused) cannot fill the store with Events.
//!
//! Each (component, object) pair has a token bucket of [`BURST`] Events that refills one
//! every [`REFILL`], as client-go's defaults (25, one per five minutes). An Event the filter
//! drops is logged at debug level and not written.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Events one object may get from one component at once.
pub const BURST: f64 = 25.0;
/// How long one more Event takes to be allowed again.
pub const REFILL: Duration = Duration::from_secs(300);
/// Pairs remembered at most; the oldest go first (an object idle that long has a full bucket).
const REMEMBERED: usize = 10_000;

/// A spam filter; [`SpamFilter::global`] is the one every component of a process shares.
#[derive(Default)]
pub struct SpamFilter {
    buckets: Mutex<HashMap<(String, String), (f64, Instant)>>,
}

impl SpamFilter {
    /// The process's filter.
    pub fn global() -> &'static SpamFilter {
        static FILTER: std::sync::OnceLock<SpamFilter> = std::sync::OnceLock::new();
        FILTER.get_or_init(SpamFilter::default)
    }

    /// Whether `component` may record one more Event about the object `object` (its uid, or
    /// kind/namespace/name) now; takes a token if so.
    pub fn allow(&self, component: &str, object: &str) -> bool {
        self.allow_at(component, object, Instant::now())
    }

    fn allow_at(&self, component: &str, object: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= REMEMBERED {
            // Forget the pairs that refilled: they are as good as new.
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() / REFILL.as_secs_f64() < BURST
            });
            if buckets.len() >= REMEMBERED {
                buckets.clear();
            }
        }
        let (tokens, at) = buckets
            .entry((component.to_string(), object.to_string()))
            .or_insert((BURST, now));
        let refilled = now.duration_since(*at).as_secs_f64() / REFILL.as_secs_f64();
        *tokens = (*tokens + refilled).min(BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_gets_its_burst_then_one_event_per_refill() {
        let f = SpamFilter::default();
        let t0 = Instant::now();
        let allowed = (0..40).filter(|_| f.allow_at("c", "pod-a", t0)).count();
        assert_eq!(allowed, BURST as usize);
        // Other objects and components have their own buckets.
        assert!(f.allow_at("c", "pod-b", t0));
        assert!(f.allow_at("d", "pod-a", t0));
        assert!(!f.allow_at("c", "pod-a", t0 + REFILL / 2));
        assert!(f.allow_at("c", "pod-a", t0 + REFILL));
        assert!(!f.allow_at("c", "pod-a", t0 + REFILL));
    }
}
