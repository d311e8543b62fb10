//! A running member: Raft, the key space, the peer server, and the paths every client call
//! takes (writes, linearizable reads, leases, membership).
//!
//! Writes go to the leader: a member that does not lead forwards the command over the peer
//! connection and relays the answer. Linearizable reads are served locally once this member
//! has applied the leader's read index. Leases are timed by the leader alone; their expiry is
//! a replicated revoke, so it survives failover.

mod alarm;
mod backup;
mod config;
mod election;
mod identity;
mod lessor;
mod membership;
mod peer_service;
mod read;
mod runtime;
mod storage;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_proto::etcdserverpb::ResponseHeader;
use flotilla_proto::raft::raft_peer_server::RaftPeerServer;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

pub use backup::{restore_snapshot, verify_snapshot};
pub use config::{
    ClusterState, DEFAULT_CLIENT_PORT, DEFAULT_PEER_PORT, PeerTls, StoreConfig,
    parse_initial_cluster,
};
pub use identity::Identity;
pub use membership::MemberInfo;

use crate::backend::SledBackend;
use crate::kv::KvState;
use crate::raft::log_store::LogStore;
use crate::raft::network::{PEER_CONNECTION_WINDOW, PEER_MAX_MESSAGE, PEER_STREAM_WINDOW, Peers};
use crate::raft::peer::Hello;
use crate::raft::state_machine::{SnapshotDir, SnapshotFiles, StateMachine, recover_install};
use crate::types::{LogId, Member, NodeId, Raft, RaftMetrics};

/// Why a member could not start. The message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data dir or the flags disagree about who this member is.
    #[error("refusing to start: {0}")]
    Identity(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    /// The data dir holds a log and a key space that contradict each other.
    #[error("refusing to start: {0}")]
    Damaged(String),
}

/// A running member. Cheap to clone; every clone is the same member.
#[derive(Clone)]
pub struct StoreNode {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    id: NodeId,
    cluster_id: u64,
    config: StoreConfig,
    raft: Raft,
    kv: Arc<KvState>,
    peers: Peers,
    /// The key space (`db/`).
    db: sled::Db,
    /// The Raft log (`log/`).
    log_db: sled::Db,
    committed: Arc<AtomicU64>,
    appended: Arc<AtomicU64>,
    /// Where snapshot files are written (for lagging members, backups) and received.
    snapshots: SnapshotDir,
    snapshot_files: Arc<SnapshotFiles>,
    pending: Arc<Semaphore>,
    /// Large reads allowed at once (see [`StoreNode::range`]).
    large_reads: Arc<Semaphore>,
    proposals: tokio::sync::mpsc::UnboundedSender<write::Pending>,
    /// Writes on their way to the leader (see [`write::Forwarders`]).
    forwards: write::Forwarders,
    reads: read::ReadBatcher,
    lessor: lessor::Lessor,
    shutdown: watch::Sender<bool>,
    /// Why this member can no longer serve, once it cannot (see [`StoreNode::fatal_signal`]).
    fatal: watch::Sender<Option<String>>,
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    peer_server: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// Proposals made through this member: (applied, failed).
    proposed: (AtomicU64, AtomicU64),
    /// Reads the Raft log's ids, for the checks on peer requests.
    log_ids: crate::raft::log_store::LogIds,
    /// Raft requests from peers refused by [`crate::raft::guard`].
    refused_peer_requests: AtomicU64,
    /// When this member last heard from a leader (see [`election`]).
    leader_contact: election::LeaderContact,
    /// The leadership this member held when it stopped, if it restarted as leader in that
    /// term (see [`read::ResumedLeadership`]).
    resumed: Option<read::ResumedLeadership>,
    /// Serializes the membership changes this member serves as leader.
    membership_serial: tokio::sync::Mutex<()>,
    /// Where Raft runs (see [`runtime`]). Last, so it is dropped after everything above.
    raft_runtime: runtime::RaftRuntime,
}

/// A member's view of the cluster, for `cluster status` and etcd's `Status`.
#[derive(Clone, Debug)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Highest log index known committed.
    pub commit_index: u64,
    pub applied_index: u64,
    /// Highest index in this member's log.
    pub last_log_index: u64,
    pub revision: i64,
    pub compact_revision: i64,
    pub db_size: u64,
    pub is_learner: bool,
    pub watchers: i64,
}

impl StoreNode {
    /// Starts a member; it serves peers on `peer_listener` (bound by the caller, so tests can
    /// use ephemeral ports). Client faces are added by the caller (see [`crate::etcd`]).
    pub async fn start(
        config: StoreConfig,
        peer_listener: tokio::net::TcpListener,
    ) -> Result<Self, StartError> {
        config.check().map_err(StartError::Config)?;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| StartError::Io(format!("creating {}: {e}", config.data_dir.display())))?;
        let (identity, fresh) = resolve_identity(&config).await?;
        probe_peers(&config, &identity).await?;

        let storage::Databases {
            state: db,
            log: log_db,
        } = storage::open(&config.data_dir, config.cache_bytes).map_err(StartError::Storage)?;
        let storage = |e: crate::errors::BackendError| StartError::Storage(e.to_string());
        let backend = SledBackend::open(&db).map_err(storage)?;
        let dir = SnapshotDir::new(config.data_dir.join("snapshots"))
            .map_err(|e| StartError::Io(format!("snapshot dir: {e}")))?;
        recover_install(&db, &backend, &dir).map_err(storage)?;
        let kv = KvState::open(backend, config.watch.clone()).map_err(storage)?;
        let snapshot_files = Arc::new(SnapshotFiles::default());
        let sm = StateMachine::open(
            db.clone(),
            kv.clone(),
            dir.clone(),
            identity.cluster_id,
            snapshot_files.clone(),
        )
        .map_err(storage)?;
        let log = LogStore::open(&log_db, &db).map_err(|e| StartError::Storage(e.to_string()))?;
        let committed = log.committed_index();
        let appended = log.appended_bytes();
        let log_ids = log.log_ids();
        check_data(&log_ids, sm.applied())?;
        let resumed = read::ResumedLeadership::of(&log_ids, identity.member_id)
            .map_err(StartError::Storage)?;
        let raft_runtime = runtime::RaftRuntime::new()
            .map_err(|e| StartError::Io(format!("starting the Raft runtime: {e}")))?;
        let peers = Peers::new(
            identity.member_id,
            identity.cluster_id,
            config.peer_filter.clone(),
        )
        .with_source_ip(config.peer_source_ip)
        .with_dialer(config.peer_dialer())
        .with_snapshot_files(snapshot_files.clone())
        .with_runtime(raft_runtime.handle().clone());
        let raft_config = raft_config(&config)?;
        // openraft spawns its core (and the core its replication streams and apply loop) on
        // the runtime it is created in.
        let raft = raft_runtime
            .handle()
            .spawn(Raft::new(
                identity.member_id,
                raft_config,
                peers.clone(),
                log,
                sm,
            ))
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let (shutdown, _) = watch::channel(false);
        let (proposals, proposal_rx) = tokio::sync::mpsc::unbounded_channel();
        let batcher = tokio::spawn(write::batch_proposals(raft.clone(), proposal_rx));
        let forwards = write::Forwarders::new(peers.clone(), raft.server_metrics());
        let inner = Arc::new(Inner {
            id: identity.member_id,
            cluster_id: identity.cluster_id,
            pending: Arc::new(Semaphore::new(config.max_pending_proposals)),
            large_reads: Arc::new(Semaphore::new(LARGE_READS_AT_ONCE)),
            proposals,
            forwards,
            config,
            raft,
            kv,
            peers,
            db,
            log_db,
            committed,
            appended,
            snapshots: dir,
            snapshot_files,
            reads: read::ReadBatcher::default(),
            lessor: lessor::Lessor::default(),
            shutdown,
            fatal: watch::channel(None).0,
            tasks: std::sync::Mutex::new(Vec::new()),
            peer_server: std::sync::Mutex::new(None),
            proposed: (AtomicU64::new(0), AtomicU64::new(0)),
            log_ids,
            refused_peer_requests: AtomicU64::new(0),
            leader_contact: Default::default(),
            resumed,
            membership_serial: Default::default(),
            raft_runtime,
        });
        let node = StoreNode { inner };
        node.push_task(batcher);
        node.serve_peers(peer_listener)?;

        if fresh && node.inner.config.initial_cluster_state == ClusterState::New {
            let members: BTreeMap<NodeId, Member> = identity
                .initial_cluster
                .iter()
                .map(|(name, addr)| {
                    let id =
                        identity::founding_member_id(&node.inner.config.cluster_token, name, addr);
                    let member = Member {
                        name: name.clone(),
                        peer_addr: addr.clone(),
                        client_addr: String::new(),
                    };
                    (id, member)
                })
                .collect();
            if let Err(e) = node.inner.raft.initialize(members).await {
                // Already initialized (a restart that crashed before writing the identity).
                tracing::info!(error = %e, "raft group not initialized by this member");
            }
        }
        // The identity is written once the member's storage exists, so a crash before this
        // point leaves a data dir that starts over cleanly.
        if fresh {
            identity::store(&node.inner.config.data_dir, &identity)?;
        }
        node.spawn_background();
        tracing::info!(
            member = %format!("{:x}", node.id()),
            cluster = %format!("{:x}", node.cluster_id()),
            name = %node.inner.config.name,
            "member started"
        );
        Ok(node)
    }

    fn serve_peers(&self, listener: tokio::net::TcpListener) -> Result<(), StartError> {
        // The listener moves to the Raft runtime's reactor (it was registered with the
        // caller's, whose workers may be busy with client work).
        let listener = {
            let _raft = self.inner.raft_runtime.handle().enter();
            listener
                .into_std()
                .and_then(tokio::net::TcpListener::from_std)
                .map_err(|e| StartError::Io(format!("moving the peer listener: {e}")))?
        };
        let service = RaftPeerServer::new(peer_service::PeerService::new(self.inner.clone()))
            .max_decoding_message_size(PEER_MAX_MESSAGE)
            .max_encoding_message_size(PEER_MAX_MESSAGE);
        let mut stop = self.inner.shutdown.subscribe();
        let tls = self
            .inner
            .config
            .peer_tls
            .as_ref()
            .map(|t| t.server.clone());
        let task = self.inner.raft_runtime.handle().spawn(async move {
            let incoming = flotilla_transport::incoming(listener, tls, "peer");
            let result = tonic::transport::Server::builder()
                .initial_stream_window_size(PEER_STREAM_WINDOW)
                .initial_connection_window_size(PEER_CONNECTION_WINDOW)
                .serve_with_incoming_shutdown(
                    tonic::service::Routes::new(service),
                    incoming,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "the peer server stopped");
            }
        });
        *self
            .inner
            .peer_server
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    fn spawn_background(&self) {
        let tasks = [
            tokio::spawn(lessor::run(self.clone())),
            tokio::spawn(membership::publish_attributes(self.clone())),
            tokio::spawn(membership::forget_departed_peers(self.clone())),
            tokio::spawn(write::auto_compaction(self.clone())),
            tokio::spawn(snapshot_by_size(self.clone())),
            tokio::spawn(watch_core(self.clone())),
            self.inner
                .raft_runtime
                .handle()
                .spawn(election::run(self.clone())),
            tokio::spawn(alarm::watch_quota(self.clone())),
            tokio::spawn(alarm::periodic_check(self.clone())),
        ];
        if self.inner.config.initial_corrupt_check {
            self.push_task(tokio::spawn(alarm::initial_check(self.clone())));
        }
        for t in tasks {
            self.push_task(t);
        }
    }

    fn push_task(&self, task: JoinHandle<()>) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(task);
    }

    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    pub fn cluster_id(&self) -> u64 {
        self.inner.cluster_id
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub fn kv(&self) -> &Arc<KvState> {
        &self.inner.kv
    }

    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.inner.raft.metrics().borrow().clone()
    }

    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow().current_term
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.inner.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.inner.id)
    }

    /// etcd's response header at `revision` (0: this member's current revision).
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.inner.cluster_id,
            member_id: self.inner.id,
            revision: if revision > 0 {
                revision
            } else {
                self.inner.kv.revision()
            },
            raft_term: self.term(),
        }
    }

    pub fn status(&self) -> NodeStatus {
        let m = self.metrics();
        let is_learner = !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == self.inner.id);
        NodeStatus {
            id: self.inner.id,
            name: self.inner.config.name.clone(),
            leader: m.current_leader,
            term: m.current_term,
            commit_index: self.inner.committed.load(Ordering::Relaxed),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            revision: self.inner.kv.revision(),
            compact_revision: self.inner.kv.compact_revision(),
            db_size: self.inner.db.size_on_disk().unwrap_or(0)
                + self.inner.log_db.size_on_disk().unwrap_or(0),
            is_learner,
            watchers: self.inner.kv.hub().watcher_count(),
        }
    }

    /// Proposals made through this member so far: (committed and applied, failed or of
    /// unknown outcome).
    pub fn proposal_counts(&self) -> (u64, u64) {
        (
            self.inner.proposed.0.load(Ordering::Relaxed),
            self.inner.proposed.1.load(Ordering::Relaxed),
        )
    }

    /// Raft requests from peers this member refused because a correct member could not have
    /// sent them (see [`crate::raft::guard`]).
    pub fn refused_peer_requests(&self) -> u64 {
        self.inner.refused_peer_requests.load(Ordering::Relaxed)
    }

    /// A receiver that holds, once the member can no longer serve, why: its Raft core stopped
    /// on a fatal error (a storage failure, a panic). The member must not go on answering
    /// clients with a broken core: its process should exit, non-zero, so that a supervisor
    /// restarts it (`flotilla server` does).
    pub fn fatal_signal(&self) -> watch::Receiver<Option<String>> {
        self.inner.fatal.subscribe()
    }

    /// A receiver that turns true when the member begins shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// Stops serving, stops Raft and flushes storage. Idempotent.
    pub async fn shutdown(&self) {
        if self.inner.shutdown.send_replace(true) {
            return;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
        // Let the peer server finish its graceful shutdown, so peers see their connections
        // close (and go elsewhere) instead of waiting on a member that no longer answers.
        let server = self
            .inner
            .peer_server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut server) = server
            && tokio::time::timeout(Duration::from_secs(2), &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
        let tasks: Vec<_> =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
        for db in [&self.inner.db, &self.inner.log_db] {
            if let Err(e) = db.flush_async().await {
                tracing::error!(error = %e, "flushing storage at shutdown failed");
            }
        }
        tracing::info!("member stopped");
    }
}

/// Watches the Raft core: once it stops on its own (a fatal storage error, or a panic that
/// ended its task and with it the metrics it publishes), the member is failed (see
/// [`StoreNode::fatal_signal`]).
async fn watch_core(node: StoreNode) {
    let mut metrics = node.inner.raft.metrics();
    let reason = loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            break format!("the Raft core stopped: {fatal}");
        }
        if metrics.changed().await.is_err() {
            break "the Raft core ended unexpectedly (it panicked)".to_string();
        }
    };
    node.fail(reason);
}

impl StoreNode {
    /// Fails the member: it can no longer serve correctly (see [`StoreNode::fatal_signal`]).
    pub(crate) fn fail(&self, reason: String) {
        if *self.inner.shutdown.borrow() {
            return;
        }
        tracing::error!(%reason, "this member can no longer serve");
        self.inner.fatal.send_replace(Some(reason));
        // And stop serving (from a task of its own: the caller may be one of the tasks a
        // shutdown ends).
        let node = self.clone();
        tokio::spawn(async move { node.shutdown().await });
    }
}

/// Large reads (see [`StoreNode::range`]) served at once: one per core of the machines this
/// is built for, so that reads cannot take every core from Raft.
const LARGE_READS_AT_ONCE: usize = 2;

/// Triggers a snapshot whenever the log grew by `snapshot_bytes` since the last trigger, so
/// that the log, which is purged behind snapshots, stays about that size. A snapshot costs a
/// flush of the key space, not a copy of it (see [`crate::raft::state_machine`]).
async fn snapshot_by_size(node: StoreNode) {
    let limit = node.inner.config.snapshot_bytes;
    if limit == 0 {
        return;
    }
    let mut since = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let now = node.inner.appended.load(Ordering::Relaxed);
        if now.saturating_sub(since) >= limit {
            since = now;
            if let Err(e) = node.inner.raft.trigger().snapshot().await {
                tracing::warn!(error = %e, "triggering a snapshot failed");
                return;
            }
            tracing::debug!("snapshot triggered by log size");
        }
    }
}

/// Refuses to start on a data dir whose Raft log and key space cannot both be right: a
/// correct member never leaves one, but a disk that lost writes, a copy of another member's
/// files or (before the checks of [`crate::raft::guard`]) a forged peer message can.
///
/// - the log's entry at the applied index is not the one applied (the log was rewritten
///   under entries the key space holds);
/// - entries committed and not yet applied are missing from the log (they cannot be
///   applied again);
/// - the stored vote's term is beyond what a cluster reaches ([`crate::raft::guard::MAX_TERM`]),
///   or the log holds an entry of a term after it.
///
/// A log that ends before the applied index is not refused: a crash after the key space
/// reached disk and before the log's last entries did leaves one, and those entries were
/// committed; openraft purges the log up to the applied index.
fn check_data(
    log: &crate::raft::log_store::LogIds,
    applied: Option<LogId>,
) -> Result<(), StartError> {
    let damaged = |what: String| {
        StartError::Damaged(format!(
            "{what}. The data dir is damaged: remove this member from the cluster, wipe its data dir and add it back as a new member (README, \"Replace a dead member\")"
        ))
    };
    let read = |e: String| StartError::Storage(format!("reading the Raft log: {e}"));
    let (last, _purged) = log.bounds().map_err(read)?;
    let vote = log.vote().map_err(read)?.unwrap_or_default();
    let term = vote.leader_id().term;
    if term >= crate::raft::guard::MAX_TERM {
        return Err(damaged(format!(
            "the stored vote is for term {term}, which no cluster reaches"
        )));
    }
    if let Some(last) = last
        && last.leader_id.term > term
    {
        return Err(damaged(format!(
            "the log's last entry {last} is of a term after the stored vote's ({term})"
        )));
    }
    if let Some(applied) = applied
        && let Some(ours) = log.at(applied.index).map_err(read)?
        && ours != applied
    {
        return Err(damaged(format!(
            "the key space applied entry {applied}, but the log holds {ours} at that index"
        )));
    }
    let committed = log.committed().map_err(read)?;
    if committed > applied && committed > last {
        return Err(damaged(format!(
            "entries up to {} are committed and applied only up to {}, but the log ends at {}",
            committed.map_or(0, |c| c.index),
            applied.map_or(0, |a| a.index),
            last.map_or(0, |l| l.index)
        )));
    }
    if applied > last {
        tracing::warn!(
            applied = %applied.map_or(0, |a| a.index),
            last_log = %last.map_or(0, |l| l.index),
            "the log ends before the applied index (a crash before the log's flush); openraft purges up to it"
        );
    }
    Ok(())
}

fn raft_config(config: &StoreConfig) -> Result<Arc<openraft::Config>, StartError> {
    let ms = |d: Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "flotilla".into(),
        heartbeat_interval: ms(config.heartbeat),
        election_timeout_min: ms(config.election_timeout_min),
        election_timeout_max: ms(config.election_timeout_max),
        install_snapshot_timeout: 10_000,
        max_payload_entries: 1_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_entries),
        max_in_snapshot_log_to_keep: config.keep_logs,
        purge_batch_size: 256,
        snapshot_max_chunk_size: 4 * 1024 * 1024,
        replication_lag_threshold: 5_000,
        // Elections go through PreVote first (see `election`), which decides when to campaign.
        enable_elect: false,
        ..Default::default()
    };
    c.validate()
        .map(Arc::new)
        .map_err(|e| StartError::Config(e.to_string()))
}

/// Works out who this member is: from its data dir, or, on first start, from the flags.
/// Returns whether this is the member's first start.
async fn resolve_identity(config: &StoreConfig) -> Result<(Identity, bool), StartError> {
    if let Some(stored) = identity::load(&config.data_dir)? {
        identity::check_restart(
            &stored,
            &config.name,
            &config.cluster_token,
            &config.initial_cluster,
        )?;
        return Ok((stored, false));
    }
    match config.initial_cluster_state {
        ClusterState::New => {
            let Some((_, addr)) = config
                .initial_cluster
                .iter()
                .find(|(n, _)| *n == config.name)
            else {
                return Err(StartError::Config(format!(
                    "--initial-cluster must list this member (`{}=HOST:PORT`)",
                    config.name
                )));
            };
            if *addr != config.peer_addr {
                return Err(StartError::Config(format!(
                    "--initial-cluster gives `{}` the peer address {addr}, but --peer-addr is {}",
                    config.name, config.peer_addr
                )));
            }
            Ok((
                Identity {
                    cluster_id: identity::new_cluster_id(
                        &config.cluster_token,
                        &config.initial_cluster,
                    ),
                    member_id: identity::founding_member_id(
                        &config.cluster_token,
                        &config.name,
                        addr,
                    ),
                    name: config.name.clone(),
                    initial_cluster: config.initial_cluster.clone(),
                },
                true,
            ))
        }
        ClusterState::Existing => discover_identity(config).await.map(|id| (id, true)),
    }
}

/// A member joining a running cluster learns its id (assigned by `member add`) and the
/// cluster id from any running member that already lists its peer address.
async fn discover_identity(config: &StoreConfig) -> Result<Identity, StartError> {
    let peers = Peers::new(0, 0, None)
        .with_source_ip(config.peer_source_ip)
        .with_dialer(config.peer_dialer());
    let hello = Hello {
        peer_addr: config.peer_addr.clone(),
    };
    let deadline = tokio::time::Instant::now() + config.request_timeout * 2;
    let mut last_error = String::from("no other member listed in --initial-cluster");
    loop {
        for (_, addr) in config
            .initial_cluster
            .iter()
            .filter(|(_, a)| *a != config.peer_addr)
        {
            match peers.hello(addr, &hello, Duration::from_secs(1)).await {
                Ok(reply) => {
                    if let Some((id, _, _)) = reply
                        .members
                        .iter()
                        .find(|(_, m, _)| m.peer_addr == config.peer_addr)
                    {
                        return Ok(Identity {
                            cluster_id: reply.cluster_id,
                            member_id: *id,
                            name: config.name.clone(),
                            initial_cluster: Vec::new(),
                        });
                    }
                    last_error = format!(
                        "member at {addr} does not list peer address {}; add this member first \
                         (`flotilla cluster add --peer-addr {}` or `etcdctl member add`)",
                        config.peer_addr, config.peer_addr
                    );
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::Identity(format!(
                "cannot join the existing cluster: {last_error}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Refuses to start when a reachable peer belongs to another cluster: its data dir and ours
/// disagree, and acting on either would mix two clusters' state.
async fn probe_peers(config: &StoreConfig, identity: &Identity) -> Result<(), StartError> {
    // Sent with this member's cluster id: a member of another cluster refuses it, naming
    // neither cluster's id but the sender's.
    let peers = Peers::new(0, identity.cluster_id, None)
        .with_source_ip(config.peer_source_ip)
        .with_dialer(config.peer_dialer());
    let hello = Hello {
        peer_addr: config.peer_addr.clone(),
    };
    let probes = config
        .initial_cluster
        .iter()
        .filter(|(_, a)| *a != config.peer_addr)
        .map(|(name, addr)| {
            let peers = peers.clone();
            let hello = hello.clone();
            async move {
                (
                    name,
                    addr,
                    peers.hello(addr, &hello, Duration::from_millis(500)).await,
                )
            }
        });
    for (name, addr, reply) in futures::future::join_all(probes).await {
        let other = match reply {
            Ok(reply) => reply.cluster_id != identity.cluster_id,
            Err(crate::raft::network::PeerCallError::Remote { reason, .. }) => {
                reason.contains(peer_service::CLUSTER_MISMATCH)
            }
            Err(_) => false,
        };
        if other {
            return Err(StartError::Identity(format!(
                "peer `{name}` at {addr} belongs to another cluster than this member's ({:x}); \
                 check --initial-cluster, --initial-cluster-token and --data-dir",
                identity.cluster_id
            )));
        }
    }
    Ok(())
}
