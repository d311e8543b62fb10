//! How many Events one object may get: client-go's spam filter (`EventSourceObjectSpamFilter`),
//! so that an object that fails over and over (a pod that cannot be scheduled, a node that
//! flaps, a ReplicaSet whose creates are refused) cannot fill the store with Events.
//!
//! Each (component, object) pair has a token bucket of [`BURST`] Events that refills one
//! every [`REFILL`], as client-go's defaults (25, one per five minutes). An Event the filter
//! drops is logged at debug level and not written.
//!
//! [`write`] counts repeats, as client-go's event correlator does: an Event the same
//! component recorded about the same object, with the same type, reason and message, within
//! [`REPEAT_WINDOW`], raises the first one's `count` and `lastTimestamp` instead of adding
//! another object.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_proto::api::{Event, Resource, time};

use crate::client::{Client, Result};

/// How long an Event may be counted again instead of written anew (client-go's 10 min).
pub const REPEAT_WINDOW: Duration = Duration::from_secs(600);

/// The Events written lately: (component, object, type, reason, message) → (namespace,
/// name, count, when last counted).
type Seen = HashMap<(String, String, String, String, String), (String, String, i32, Instant)>;

fn seen() -> &'static Mutex<Seen> {
    static SEEN: std::sync::OnceLock<Mutex<Seen>> = std::sync::OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

/// Writes `event`, or counts it on an identical one written within [`REPEAT_WINDOW`].
pub async fn write(client: &Client, mut event: Event) -> Result<()> {
    let object = event
        .involved_object
        .as_ref()
        .map(|o| format!("{}/{}/{}/{}", o.kind, o.namespace, o.name, o.uid))
        .unwrap_or_default();
    let component = event
        .source
        .as_ref()
        .map(|s| s.component.clone())
        .unwrap_or_default();
    let key = (
        component,
        object,
        event.r#type.clone(),
        event.reason.clone(),
        event.message.clone(),
    );
    // One Event written at a time in this process: two repeats at once would otherwise
    // both create, or both count from the same number.
    static WRITING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one = WRITING.lock().await;
    let now = Instant::now();
    let earlier = {
        let mut seen = seen().lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, (_, _, _, at)| now.duration_since(*at) < REPEAT_WINDOW);
        if seen.len() > REMEMBERED {
            seen.clear();
        }
        seen.get(&key).cloned()
    };
    if let Some((ns, name, count, _)) = earlier {
        let patch = serde_json::json!({"count": count + 1, "lastTimestamp": time::now()});
        match client.patch::<Event>(&ns, &name, &patch).await {
            Ok(_) => {
                let mut seen = seen().lock().unwrap_or_else(|p| p.into_inner());
                seen.insert(key, (ns, name, count + 1, now));
                return Ok(());
            }
            // Expired or deleted since: write it anew.
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    event.count = event.count.max(1);
    let made = client.create(&event).await?;
    let mut seen = seen().lock().unwrap_or_else(|p| p.into_inner());
    seen.insert(
        key,
        (
            made.namespace().to_string(),
            made.name().to_string(),
            made.count,
            now,
        ),
    );
    Ok(())
}

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
