//! `/metrics` (Prometheus text format), `/healthz` and `/readyz`, served over HTTP/1.1 on the
//! member's client port next to gRPC (`curl http://127.0.0.1:7379/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::routing::get;
use flotilla_store::node::StoreNode;

use crate::leader::LeaderStats;

/// Latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Distinct methods recorded; anything beyond is counted as `other`.
const MAX_METHODS: usize = 200;

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request latency per gRPC method (to the response's headers: for a stream, its start).
#[derive(Default)]
pub struct RequestStats {
    methods: Mutex<BTreeMap<String, Histogram>>,
}

impl RequestStats {
    fn observe(&self, path: &str, elapsed: Duration) {
        let mut m = self.methods.lock().unwrap_or_else(|p| p.into_inner());
        let known = m.contains_key(path);
        let key = if known || (m.len() < MAX_METHODS && path.matches('/').count() == 2) {
            path
        } else {
            "other"
        };
        let h = m.entry(key.to_string()).or_default();
        let secs = elapsed.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.buckets[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }
}

/// A tower layer that times every request into [`RequestStats`].
#[derive(Clone)]
pub struct Timed<S> {
    inner: S,
    stats: Arc<RequestStats>,
}

pub fn layer(
    stats: Arc<RequestStats>,
) -> impl tower::Layer<tonic::service::Routes, Service = Timed<tonic::service::Routes>> + Clone {
    tower::layer::layer_fn(move |inner| Timed {
        inner,
        stats: stats.clone(),
    })
}

impl<S, B> tower::Service<axum::http::Request<B>> for Timed<S>
where
    S: tower::Service<axum::http::Request<B>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let stats = self.stats.clone();
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            stats.observe(&path, start.elapsed());
            r
        })
    }
}

/// What `/metrics` reports.
pub struct Sources {
    pub node: StoreNode,
    pub leader: Arc<LeaderStats>,
    pub requests: Arc<RequestStats>,
    pub leader_changes: Arc<AtomicU64>,
}

/// Counts the changes of leader this member sees.
pub fn count_leader_changes(node: &StoreNode) -> Arc<AtomicU64> {
    let changes = Arc::new(AtomicU64::new(0));
    let mut metrics = node.raft().server_metrics();
    let counter = changes.clone();
    tokio::spawn(async move {
        let mut last = metrics.borrow().current_leader;
        while metrics.changed().await.is_ok() {
            let now = metrics.borrow().current_leader;
            if now != last {
                counter.fetch_add(1, Ordering::Relaxed);
                last = now;
            }
        }
    });
    changes
}

fn render(s: &Sources) -> String {
    let st = s.node.status();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "flotilla_raft_term",
        "gauge",
        "The Raft term this member is in.",
        st.term.to_string(),
    );
    let leads = st.leader == Some(st.id);
    metric(
        "flotilla_raft_is_leader",
        "gauge",
        "1 if this member leads.",
        u8::from(leads).to_string(),
    );
    metric(
        "flotilla_raft_has_leader",
        "gauge",
        "1 if this member knows a leader.",
        u8::from(st.leader.is_some()).to_string(),
    );
    metric(
        "flotilla_raft_leader_changes_total",
        "counter",
        "Changes of leader seen by this member.",
        s.leader_changes.load(Ordering::Relaxed).to_string(),
    );
    let (bytes, index) = s.node.snapshot_info();
    metric(
        "flotilla_snapshot_bytes",
        "gauge",
        "Size of the newest snapshot file this member wrote (for a lagging member or a backup) or received.",
        bytes.to_string(),
    );
    if let Some(index) = index {
        metric(
            "flotilla_snapshot_index",
            "gauge",
            "Log index the newest snapshot covers (the log is purged behind it).",
            index.to_string(),
        );
    }
    metric(
        "flotilla_raft_commit_index",
        "gauge",
        "Highest log index known committed.",
        st.commit_index.to_string(),
    );
    metric(
        "flotilla_raft_applied_index",
        "gauge",
        "Highest log index applied to the state machine.",
        st.applied_index.to_string(),
    );
    metric(
        "flotilla_raft_apply_lag",
        "gauge",
        "Log entries appended here but not yet applied.",
        st.last_log_index
            .saturating_sub(st.applied_index)
            .to_string(),
    );
    let (ok, failed) = s.node.proposal_counts();
    metric(
        "flotilla_proposals_committed_total",
        "counter",
        "Proposals made through this member and applied.",
        ok.to_string(),
    );
    metric(
        "flotilla_proposals_failed_total",
        "counter",
        "Proposals made through this member that failed or timed out.",
        failed.to_string(),
    );
    metric(
        "flotilla_peer_requests_refused_total",
        "counter",
        "Raft requests from peers refused because a correct member could not have sent them (docs/store.md, \"What a member refuses\").",
        s.node.refused_peer_requests().to_string(),
    );
    metric(
        "flotilla_store_revision",
        "gauge",
        "The key space's revision.",
        st.revision.to_string(),
    );
    metric(
        "flotilla_store_compact_revision",
        "gauge",
        "History before this revision is compacted.",
        st.compact_revision.to_string(),
    );
    metric(
        "flotilla_store_db_size_bytes",
        "gauge",
        "The member's data on disk.",
        st.db_size.to_string(),
    );
    metric(
        "flotilla_watches_open",
        "gauge",
        "Watches served by this member.",
        st.watchers.to_string(),
    );
    let sch = &s.leader.scheduler;
    metric(
        "flotilla_scheduler_pods_scheduled_total",
        "counter",
        "Pods bound by this member's scheduler.",
        sch.scheduled.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "flotilla_scheduler_unschedulable_attempts_total",
        "counter",
        "Scheduling attempts that found no node.",
        sch.unschedulable.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "flotilla_scheduler_bind_errors_total",
        "counter",
        "Binds refused or lost.",
        sch.bind_errors.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "flotilla_scheduler_pending_pods",
        "gauge",
        "Unbound pods waiting for the scheduler.",
        sch.pending.load(Ordering::Relaxed).to_string(),
    );
    let ctl = &s.leader.controllers;
    metric(
        "flotilla_controller_reconciles_total",
        "counter",
        "Reconciles run by this member's controllers.",
        ctl.reconciles.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "flotilla_controller_errors_total",
        "counter",
        "Reconciles that failed (and were retried).",
        ctl.errors.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "flotilla_controller_queue_depth",
        "gauge",
        "Keys waiting in the controllers' queues.",
        ctl.queue_depth.load(Ordering::Relaxed).to_string(),
    );
    let name = "flotilla_grpc_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to answer a gRPC request (to the first response for streams).\n# TYPE {name} histogram"
    );
    let methods = s
        .requests
        .methods
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (method, h) in methods {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{method=\"{method}\",le=\"{b}\"}} {}",
                h.buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{method=\"{method}\",le=\"+Inf\"}} {}",
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{method=\"{method}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{method=\"{method}\"}} {}", h.count);
    }
    out
}

/// The paths served as plain HTTP on the client port; every other path is gRPC's (see
/// [`flotilla_proto::guard`]).
pub const PLAIN_HTTP: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// Adds `/metrics`, `/healthz` and `/readyz` to the routes of the client port.
pub fn add_routes(
    mut routes: tonic::service::Routes,
    sources: Arc<Sources>,
) -> tonic::service::Routes {
    let ready = sources.node.clone();
    let router = std::mem::take(routes.axum_router_mut())
        .route(
            "/metrics",
            get(move || {
                let s = sources.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], render(&s)) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let node = ready.clone();
                async move {
                    let st = node.status();
                    match st.leader {
                        Some(l) => (
                            StatusCode::OK,
                            format!("ok: leader {l:x}, term {}\n", st.term),
                        ),
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: no leader known\n".to_string(),
                        ),
                    }
                }
            }),
        );
    *routes.axum_router_mut() = router;
    routes
}
