//! The agent's own metrics, served with `/healthz` and `/readyz` over HTTP/1.1 on its
//! service port (the one it publishes on the Node for logs).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::routing::get;

use crate::runtime::{ContainerState, Runtime};

/// Counters of one agent process (every node it keeps, with --simulate-nodes).
#[derive(Default)]
pub struct AgentStats {
    pub lease_renewals: AtomicU64,
    pub lease_renewal_failures: AtomicU64,
    /// Unix milliseconds of the last successful renewal.
    pub last_renewal_ms: AtomicU64,
    pub container_starts: AtomicU64,
    pub container_start_failures: AtomicU64,
    pub container_exits: AtomicU64,
    /// Pods the agent is running workers for.
    pub pods: AtomicU64,
    pub status_updates: AtomicU64,
    pub status_update_failures: AtomicU64,
}

/// The agent's counters (one agent per process).
pub static STATS: AgentStats = AgentStats {
    lease_renewals: AtomicU64::new(0),
    lease_renewal_failures: AtomicU64::new(0),
    last_renewal_ms: AtomicU64::new(0),
    container_starts: AtomicU64::new(0),
    container_start_failures: AtomicU64::new(0),
    container_exits: AtomicU64::new(0),
    pods: AtomicU64::new(0),
    status_updates: AtomicU64::new(0),
    status_update_failures: AtomicU64::new(0),
};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Notes a lease renewal and how it went.
pub fn renewed(ok: bool) {
    if ok {
        STATS.lease_renewals.fetch_add(1, Ordering::Relaxed);
        STATS.last_renewal_ms.store(now_ms(), Ordering::Relaxed);
    } else {
        STATS.lease_renewal_failures.fetch_add(1, Ordering::Relaxed);
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name} {value}");
}

/// The metrics in Prometheus' text format.
pub async fn render<R: Runtime>(rt: &R) -> String {
    let s = &STATS;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let containers = rt.list().await;
    let running = containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Running { .. }))
        .count();
    let exited = containers
        .iter()
        .filter(|c| matches!(c.state, ContainerState::Exited { .. }))
        .count();
    let mut out = String::new();
    gauge(
        &mut out,
        "flotilla_agent_pods",
        "Pods bound to this agent's nodes that it runs.",
        load(&s.pods) as f64,
    );
    let _ = writeln!(
        out,
        "# HELP flotilla_agent_containers Containers the runtime holds, by state."
    );
    let _ = writeln!(out, "# TYPE flotilla_agent_containers gauge");
    let _ = writeln!(
        out,
        "flotilla_agent_containers{{state=\"running\"}} {running}"
    );
    let _ = writeln!(
        out,
        "flotilla_agent_containers{{state=\"exited\"}} {exited}"
    );
    counter(
        &mut out,
        "flotilla_agent_container_starts_total",
        "Containers started (restarts included).",
        load(&s.container_starts),
    );
    counter(
        &mut out,
        "flotilla_agent_container_start_failures_total",
        "Container starts the runtime refused.",
        load(&s.container_start_failures),
    );
    counter(
        &mut out,
        "flotilla_agent_container_exits_total",
        "Container runs that ended.",
        load(&s.container_exits),
    );
    counter(
        &mut out,
        "flotilla_agent_status_updates_total",
        "Pod status updates written.",
        load(&s.status_updates),
    );
    counter(
        &mut out,
        "flotilla_agent_status_update_failures_total",
        "Pod status updates that failed.",
        load(&s.status_update_failures),
    );
    counter(
        &mut out,
        "flotilla_agent_lease_renewals_total",
        "Node lease renewals that succeeded.",
        load(&s.lease_renewals),
    );
    counter(
        &mut out,
        "flotilla_agent_lease_renewal_failures_total",
        "Node lease renewals that failed.",
        load(&s.lease_renewal_failures),
    );
    let last = load(&s.last_renewal_ms);
    if last > 0 {
        gauge(
            &mut out,
            "flotilla_agent_lease_age_seconds",
            "Time since the last successful lease renewal.",
            now_ms().saturating_sub(last) as f64 / 1000.0,
        );
    }
    out
}

/// The paths served as plain HTTP on the agent's port; every other path is gRPC's (see
/// [`flotilla_proto::guard`]).
pub const PLAIN_HTTP: &[&str] = &["/metrics", "/healthz", "/readyz"];

/// Adds `/metrics`, `/healthz` and `/readyz` (ready while the lease was renewed within
/// three intervals) to the agent's service routes.
pub fn add_routes<R: Runtime>(
    mut routes: tonic::service::Routes,
    rt: Arc<R>,
    lease_interval: Duration,
) -> tonic::service::Routes {
    let router = std::mem::take(routes.axum_router_mut())
        .route(
            "/metrics",
            get(move || {
                let rt = rt.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        render(rt.as_ref()).await,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || async move {
                let last = STATS.last_renewal_ms.load(Ordering::Relaxed);
                let age = Duration::from_millis(now_ms().saturating_sub(last));
                if last > 0 && age <= lease_interval * 3 {
                    (
                        StatusCode::OK,
                        format!("ok: lease renewed {} ms ago\n", age.as_millis()),
                    )
                } else if last == 0 {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: no lease renewed yet\n".to_string(),
                    )
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: lease last renewed {} ms ago\n", age.as_millis()),
                    )
                }
            }),
        );
    *routes.axum_router_mut() = router;
    routes
}
