//! How a client backs off when the control plane is down or overloaded.
//!
//! A call tries the servers in turn (a *round*). Once a whole round failed (every server
//! unreachable or unavailable), the client's breaker opens: for a back-off of 200 ms doubling
//! to 5 s, each drawn between half and one and a half of that (jitter, so that the callers of
//! a process, and the processes of a cluster, do not come back in step), no call tries any
//! server. When it ends, one call (the probe) tries a round; the others wait for its outcome.
//! A success closes the breaker for everyone; a failure opens it again, longer, and counts as
//! a failed round for every call that waited. A call gives up after three failed rounds, as
//! before, but a thousand calls in flight against a control plane that is down cost about
//! one round per back-off between them, not a thousand.
//!
//! An overloaded server answers `ResourceExhausted` with gRPC's pushback
//! (`grpc-retry-pushback-ms`, Kubernetes' Retry-After); the call waits that long, jittered
//! upwards, and tries again.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::{Code, Status};

pub(crate) const FIRST: Duration = Duration::from_millis(200);
pub(crate) const MAX: Duration = Duration::from_secs(5);
/// How long a probe may run before another call probes instead.
const PROBE_STALE: Duration = Duration::from_secs(40);

/// `d` times a factor drawn from [0.5, 1.5).
pub(crate) fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}

/// The wait an overloaded server asked for.
pub(crate) fn pushback(s: &Status) -> Option<Duration> {
    if s.code() != Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = s
        .metadata()
        .get("grpc-retry-pushback-ms")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

#[derive(Default)]
pub(crate) struct Breaker {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    failed_rounds: u32,
    /// Open until then (`None`: closed).
    until: Option<Instant>,
    probing: bool,
    /// When the probe began (a probe whose call was dropped is taken over after
    /// [`PROBE_STALE`]).
    probe_since: Option<Instant>,
    /// Bumped at each outcome of a probe or round.
    outcomes: u64,
}

/// What a call may do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Try a round.
    Go,
    /// Try a round as the probe: report its outcome.
    Probe,
    /// The control plane was found down again while this call waited: a failed round.
    Down,
}

impl Breaker {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until this call may try a round, or the control plane was found down again.
    pub(crate) async fn enter(&self) -> Gate {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (wake_at, seen) = {
                let mut st = self.state();
                let Some(until) = st.until else {
                    return Gate::Go;
                };
                let now = Instant::now();
                if now < until {
                    (until, st.outcomes)
                } else if st.probing
                    && let Some(since) = st.probe_since
                    && now < since + PROBE_STALE
                {
                    // Another call is probing: wait for its outcome.
                    (since + PROBE_STALE, st.outcomes)
                } else {
                    st.probing = true;
                    st.probe_since = Some(now);
                    return Gate::Probe;
                }
            };
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            let st = self.state();
            if st.until.is_none() {
                return Gate::Go;
            }
            if st.outcomes != seen {
                return Gate::Down;
            }
        }
    }

    /// A server answered: the breaker closes.
    pub(crate) fn reached(&self) {
        let mut st = self.state();
        if st.until.is_some() || st.failed_rounds > 0 || st.probing {
            *st = State {
                outcomes: st.outcomes + 1,
                ..State::default()
            };
            drop(st);
            self.changed.notify_waiters();
        }
    }

    /// A whole round failed (`probe`: the probe's).
    pub(crate) fn round_failed(&self, probe: bool) {
        let mut st = self.state();
        let now = Instant::now();
        if !probe && st.until.is_some_and(|u| u > now) {
            // Another call already opened it for this outage.
            return;
        }
        let wait = FIRST.saturating_mul(1 << st.failed_rounds.min(8)).min(MAX);
        st.failed_rounds += 1;
        st.until = Some(now + jittered(wait));
        st.probing = false;
        st.probe_since = None;
        st.outcomes += 1;
        drop(st);
        self.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_while_down_and_a_success_lets_everyone_go() {
        let b = std::sync::Arc::new(Breaker::default());
        assert_eq!(b.enter().await, Gate::Go);
        b.round_failed(false);
        // Many calls wait; when the back-off ends exactly one probes.
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.enter().await })
            })
            .collect();
        tokio::time::sleep(MAX * 2).await;
        let mut probes = 0;
        let mut pending = Vec::new();
        for w in waiters {
            if w.is_finished() {
                assert_eq!(w.await.unwrap(), Gate::Probe);
                probes += 1;
            } else {
                pending.push(w);
            }
        }
        assert_eq!(probes, 1);
        // The probe fails: the others count a failed round.
        b.round_failed(true);
        for w in pending.drain(..) {
            assert_eq!(w.await.unwrap(), Gate::Down);
        }
        // Backed off longer; a success closes it for the next call.
        let next = {
            let b = b.clone();
            tokio::spawn(async move { b.enter().await })
        };
        tokio::task::yield_now().await;
        b.reached();
        assert_eq!(next.await.unwrap(), Gate::Go);
        assert_eq!(b.enter().await, Gate::Go);
    }

    #[test]
    fn pushback_is_read_from_resource_exhausted_only() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-retry-pushback-ms", "1000".parse().unwrap());
        let s = Status::with_metadata(Code::ResourceExhausted, "busy", md.clone());
        assert_eq!(pushback(&s), Some(Duration::from_secs(1)));
        let s = Status::with_metadata(Code::Unavailable, "down", md);
        assert_eq!(pushback(&s), None);
        assert_eq!(pushback(&Status::resource_exhausted("too large")), None);
    }
}

/// client-go's rate limiter (`--kube-api-qps`, `--kube-api-burst`): a token bucket of `burst`
/// calls that refills `qps` a second; a call waits for a token.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub(crate) fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            qps: qps.max(0.001),
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    pub(crate) async fn acquire(&self) {
        loop {
            let wait = {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let (tokens, at) = &mut *st;
                *tokens =
                    (*tokens + now.duration_since(*at).as_secs_f64() * self.qps).min(self.burst);
                *at = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - *tokens) / self.qps)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_qps() {
        let r = RateLimiter::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            r.acquire().await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            r.acquire().await;
        }
        // Ten more at ten a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took <= Duration::from_millis(1010),
            "{took:?}"
        );
    }
}
