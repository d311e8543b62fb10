//! An in-process cluster of store members on loopback, for fast Raft tests.
//!
//! Each member has its own data dir and peer port; members can be stopped, restarted from
//! their data dir, added and partitioned (through the peer filter hook).

#![allow(dead_code)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
use flotilla_store::errors::StoreError;
use flotilla_store::mvcc::{Command, CommandResponse};
use flotilla_store::node::{ClusterState, StoreConfig, StoreNode};
use flotilla_store::raft::network::PeerFilter;
use flotilla_store::types::NodeId;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How long a test waits for the cluster to reach a state before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Cuts links between members: `(from, to)` pairs that are dropped.
#[derive(Default)]
pub struct Partition {
    cut: Mutex<HashSet<(NodeId, NodeId)>>,
    /// Links whose calls hang until their deadline instead of failing.
    blackholed: Mutex<HashSet<(NodeId, NodeId)>>,
    /// Links whose answers come back this much later (a starved peer).
    slow: Mutex<std::collections::HashMap<(NodeId, NodeId), Duration>>,
}

impl PeerFilter for Partition {
    fn allow(&self, from: NodeId, to: NodeId) -> bool {
        !self.cut.lock().unwrap().contains(&(from, to))
    }

    fn stall(&self, from: NodeId, to: NodeId) -> bool {
        self.blackholed.lock().unwrap().contains(&(from, to))
    }

    fn answer_delay(&self, from: NodeId, to: NodeId) -> Duration {
        self.slow
            .lock()
            .unwrap()
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }
}

impl Partition {
    /// Isolates `id` from every other member, both ways.
    pub fn isolate(&self, id: NodeId, others: &[NodeId]) {
        let mut cut = self.cut.lock().unwrap();
        for o in others.iter().filter(|o| **o != id) {
            cut.insert((id, *o));
            cut.insert((*o, id));
        }
    }

    /// Isolates `id` from every other member, both ways, as a blackhole route does: calls
    /// get no answer until their deadline.
    pub fn blackhole(&self, id: NodeId, others: &[NodeId]) {
        let mut cut = self.blackholed.lock().unwrap();
        for o in others.iter().filter(|o| **o != id) {
            cut.insert((id, *o));
            cut.insert((*o, id));
        }
    }

    /// Makes the answers to `from`'s calls to every other member come back `delay` later:
    /// the calls are delivered and served at once, their answers are late.
    pub fn slow_answers(&self, from: NodeId, others: &[NodeId], delay: Duration) {
        let mut slow = self.slow.lock().unwrap();
        for o in others.iter().filter(|o| **o != from) {
            slow.insert((from, *o), delay);
        }
    }

    pub fn heal(&self) {
        self.cut.lock().unwrap().clear();
        self.blackholed.lock().unwrap().clear();
        self.slow.lock().unwrap().clear();
    }
}

pub struct Slot {
    pub name: String,
    pub peer_addr: String,
    pub node: Option<StoreNode>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub slots: Vec<Slot>,
    pub partition: Arc<Partition>,
    tune: Arc<dyn Fn(&mut StoreConfig) + Send + Sync>,
}

async fn free_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind an ephemeral port")
}

/// Binds `addr` again after its member stopped; the port may take a moment to be released.
pub async fn rebind(addr: &str) -> TcpListener {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr} again: {e}"),
        }
    }
}

impl Cluster {
    /// Starts `n` founding members with default timings, tuned by `tune`.
    pub async fn start(n: usize, tune: impl Fn(&mut StoreConfig) + Send + Sync + 'static) -> Self {
        trace();
        let dir = tempfile::tempdir().unwrap();
        let mut listeners = Vec::new();
        let mut slots = Vec::new();
        for i in 0..n {
            let l = free_listener().await;
            slots.push(Slot {
                name: format!("n{}", i + 1),
                peer_addr: l.local_addr().unwrap().to_string(),
                node: None,
            });
            listeners.push(l);
        }
        let mut c = Cluster {
            dir,
            slots,
            partition: Arc::new(Partition::default()),
            tune: Arc::new(tune),
        };
        let initial: Vec<(String, String)> = c
            .slots
            .iter()
            .map(|s| (s.name.clone(), s.peer_addr.clone()))
            .collect();
        let starts = listeners.into_iter().enumerate().map(|(i, l)| {
            let config = c.config(i, initial.clone(), ClusterState::New);
            async move { StoreNode::start(config, l).await.expect("member starts") }
        });
        let nodes = futures::future::join_all(starts).await;
        for (slot, node) in c.slots.iter_mut().zip(nodes) {
            slot.node = Some(node);
        }
        c
    }

    pub fn config(
        &self,
        i: usize,
        initial: Vec<(String, String)>,
        state: ClusterState,
    ) -> StoreConfig {
        let slot = &self.slots[i];
        let mut config = StoreConfig::new(&slot.name, self.dir.path().join(&slot.name));
        config.peer_addr = slot.peer_addr.clone();
        config.client_addr = format!("client-of-{}", slot.name);
        config.initial_cluster = initial;
        config.initial_cluster_state = state;
        config.peer_filter = Some(self.partition.clone());
        (self.tune)(&mut config);
        config
    }

    pub fn node(&self, i: usize) -> &StoreNode {
        self.slots[i].node.as_ref().expect("member is running")
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|i| self.slots[*i].node.is_some())
            .collect()
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.running().iter().map(|i| self.node(*i).id()).collect()
    }

    /// Stops member `i` (its data dir stays).
    pub async fn stop(&mut self, i: usize) {
        if let Some(node) = self.slots[i].node.take() {
            node.shutdown().await;
        }
    }

    /// Restarts member `i` from its data dir alone.
    pub async fn restart(&mut self, i: usize) {
        assert!(self.slots[i].node.is_none(), "stop the member first");
        let deadline = Instant::now() + DEADLINE;
        // The previous incarnation's storage is released asynchronously after shutdown.
        let node = loop {
            let config = self.config(i, Vec::new(), ClusterState::New);
            let l = rebind(&self.slots[i].peer_addr).await;
            match StoreNode::start(config, l).await {
                Ok(n) => break n,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("member {} does not restart: {e}", self.slots[i].name),
            }
        };
        self.slots[i].node = Some(node);
    }

    /// Adds a slot for a new member (not started) and returns its index.
    pub async fn add_slot(&mut self, name: &str) -> (usize, TcpListener) {
        let l = free_listener().await;
        self.slots.push(Slot {
            name: name.into(),
            peer_addr: l.local_addr().unwrap().to_string(),
            node: None,
        });
        (self.slots.len() - 1, l)
    }

    /// Starts a member added with `member add`, joining through the running members.
    pub async fn join(&mut self, i: usize, listener: TcpListener) {
        let initial: Vec<(String, String)> = self
            .running()
            .iter()
            .map(|j| {
                (
                    self.slots[*j].name.clone(),
                    self.slots[*j].peer_addr.clone(),
                )
            })
            .collect();
        let config = self.config(i, initial, ClusterState::Existing);
        let node = StoreNode::start(config, listener)
            .await
            .expect("new member starts");
        self.slots[i].node = Some(node);
    }

    /// The index of the member every running member agrees leads.
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let running = self.running();
            let views: Vec<Option<NodeId>> =
                running.iter().map(|i| self.node(*i).leader()).collect();
            if let Some(Some(l)) = views.first()
                && views.iter().all(|v| *v == Some(*l))
                && let Some(i) = running.iter().find(|i| self.node(**i).id() == *l)
            {
                return *i;
            }
            assert!(Instant::now() < deadline, "no agreed leader: {views:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What each running member knows: its state, term, leader, log and membership (for a
    /// failure's message).
    pub fn describe(&self) -> String {
        self.running()
            .iter()
            .map(|i| {
                let m = self.node(*i).metrics();
                format!(
                    "{} {:x}: {:?} term {} leader {:?} last log {:?} applied {:?} membership {} replication {:?}",
                    self.slots[*i].name,
                    m.id,
                    m.state,
                    m.current_term,
                    m.current_leader.map(|l| format!("{l:x}")),
                    m.last_log_index,
                    m.last_applied.map(|l| l.index),
                    m.membership_config,
                    m.replication,
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Polls `f` until it holds; past the deadline, fails with what each member knows.
    pub async fn eventually(&self, what: &str, mut f: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}\n{}",
                self.describe()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.slots.len() {
            self.stop(i).await;
        }
    }
}

pub fn put_cmd(key: &str, value: &str) -> Command {
    Command::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// Puts through `node`, retrying while the cluster has no leader; returns the revision.
/// Panics if the outcome is unknown (a timeout), since callers rely on what was acknowledged.
pub async fn put(node: &StoreNode, key: &str, value: &str) -> i64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match node.propose(put_cmd(key, value)).await {
            Ok(CommandResponse::Put(r)) => return r.header.unwrap().revision,
            Ok(other) => panic!("unexpected response {other:?}"),
            Err(StoreError::NoLeader(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("put {key} failed: {e}"),
        }
    }
}

/// A linearizable read of one key through `node`.
pub async fn get(node: &StoreNode, key: &str) -> Result<Option<String>, StoreError> {
    node.read_barrier().await?;
    local_get(node, key)
}

/// A serializable read of one key from `node`'s own copy.
pub fn local_get(node: &StoreNode, key: &str) -> Result<Option<String>, StoreError> {
    let r = node.kv().range(&RangeRequest {
        key: key.as_bytes().to_vec(),
        ..Default::default()
    })?;
    Ok(r.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Logs the members' elections, membership changes and warnings into the test's output
/// (shown when it fails): `RUST_LOG` overrides what is logged.
pub fn trace() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "flotilla_store=info,openraft=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it holds or the deadline passes.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
