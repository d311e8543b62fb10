//! Work that runs on the Raft leader only: the scheduler (and the controllers).
//!
//! Each member follows its Raft metrics; when it becomes leader it starts the work as a
//! client of its own API, and stops it the moment it sees leadership move elsewhere. Binds
//! are compare-and-set writes, so a deposed leader's late bind cannot bind a pod twice.

use std::sync::Arc;

use flotilla_client::Client;
use flotilla_store::node::StoreNode;
use flotilla_store::types::RaftMetrics;
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
    pub scheduler: flotilla_scheduler::Config,
    pub controllers: flotilla_controllers::Config,
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
    let mut metrics = node.raft().metrics();
    let mut shutdown = node.shutdown_signal();
    let id = node.id();
    let leads = |m: &watch::Receiver<RaftMetrics>| {
        let m = m.borrow();
        m.current_leader == Some(id) && m.state.is_leader()
    };
    loop {
        while !leads(&metrics) {
            tokio::select! {
                r = metrics.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        let term = node.term();
        tracing::info!(
            term,
            "this member leads: starting the scheduler and controllers"
        );
        let client = match Client::new(&[local_address(&client_addr)]) {
            Ok(c) => c,
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
            client,
            config.controllers.clone(),
            stats.controllers.clone(),
            stop_rx,
        ));
        let shutting_down = loop {
            if !leads(&metrics) {
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
