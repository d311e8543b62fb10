//! Work that runs on the Raft leader only: the scheduler (and the controllers).
//!
//! Each member follows its Raft metrics; when it becomes leader it starts the work as a
//! client of its own API, and stops it the moment it sees leadership move elsewhere. Every
//! write that work makes is fenced to the term it started in (`flotilla-fence-term`): the
//! store applies it only if that term's leader appended it, so a deposed leader's late
//! writes (a bind, a pod created by a ReplicaSet) fail instead of landing under the next.

use std::sync::Arc;

use flotilla_client::Client;
use flotilla_store::node::StoreNode;
use flotilla_store::types::RaftServerMetrics;
use tokio::sync::watch;

/// What the leader-only work reports (kept across leadership changes).
#[derive(Default)]
pub struct LeaderStats {
    pub scheduler: Arc<flotilla_scheduler::Stats>,
    pub controllers: Arc<flotilla_controllers::Stats>,
}

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub run_scheduler: bool,
    /// The controllers' client's QPS and burst (kube-controller-manager's `--kube-api-qps`,
    /// `--kube-api-burst`).
    pub controllers_qps: f64,
    pub controllers_burst: u32,
    pub scheduler: flotilla_scheduler::Config,
    pub controllers: flotilla_controllers::Config,
    /// How the member's own client dials its client port (TLS with its certificate).
    pub dialer: flotilla_transport::Dialer,
}

/// The address this member's own clients reach: a wildcard listen address becomes
/// loopback.
pub fn local_address(client_addr: &str) -> String {
    match client_addr.rsplit_once(':') {
        Some(("0.0.0.0", port)) | Some(("[::]", port)) | Some(("", port)) => {
            format!("127.0.0.1:{port}")
        }
        _ => client_addr.to_string(),
    }
}

/// Runs until the member shuts down.
pub async fn run(
    node: StoreNode,
    client_addr: String,
    config: LeaderConfig,
    stats: Arc<LeaderStats>,
) {
    // Server metrics change with the leader, the term and the membership only; the full
    // metrics change with every entry, and would wake this task for each.
    let mut metrics = node.raft().server_metrics();
    let mut shutdown = node.shutdown_signal();
    let id = node.id();
    let leads = |m: &watch::Receiver<RaftServerMetrics>| {
        let m = m.borrow();
        m.current_leader == Some(id) && m.state.is_leader()
    };
    let term_of = |m: &watch::Receiver<RaftServerMetrics>| m.borrow().vote.leader_id().get_term();
    loop {
        while !leads(&metrics) {
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let term = term_of(&metrics);
        tracing::info!(
            term,
            "this member leads: starting the scheduler and controllers"
        );
        // Every write of this leadership is fenced to its term: once another leader is
        // elected, nothing still in flight from here can land.
        let client = match Client::with_dialer(&[local_address(&client_addr)], &config.dialer) {
            Ok(c) => c.fenced(term),
            Err(e) => {
                tracing::error!("cannot reach this member's own API at {client_addr}: {e}");
                return;
            }
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let scheduler = config.run_scheduler.then(|| {
            tokio::spawn(flotilla_scheduler::run(
                client.clone(),
                config.scheduler.clone(),
                stats.scheduler.clone(),
                stop_rx.clone(),
            ))
        });
        let controllers = tokio::spawn(flotilla_controllers::run(
            client.with_rate_limit(config.controllers_qps, config.controllers_burst),
            config.controllers.clone(),
            stats.controllers.clone(),
            stop_rx,
        ));
        let shutting_down = loop {
            // Re-elected in a later term counts as a new leadership (a new fence).
            if !leads(&metrics) || term_of(&metrics) != term {
                break false;
            }
            tokio::select! {
                r = metrics.changed() => if r.is_err() { break true },
                _ = shutdown.wait_for(|s| *s) => break true,
            }
        };
        let _ = stop_tx.send(true);
        if let Some(s) = scheduler {
            s.abort();
        }
        controllers.abort();
        tracing::info!(term, "leadership lost: scheduler and controllers stopped");
        if shutting_down {
            return;
        }
    }
}
