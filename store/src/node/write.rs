//! The write path: validate, then propose on the leader (here, or forwarded to it).

use std::time::Duration;

use openraft::error::ClientWriteError;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::{Inner, StoreNode};
use crate::errors::StoreError;
use crate::mvcc::{Command, CommandResponse, validate_command};
use crate::raft::network::PeerCallError;
use crate::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};
use crate::types::NodeId;

/// Pause before retrying when the leader is changing.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl StoreNode {
    /// Replicates `cmd` through the leader and returns how it was applied. An `Err` of
    /// [`StoreError::Timeout`] means the outcome is unknown; every other error means nothing
    /// was applied.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, StoreError> {
        validate_command(&cmd)?;
        // Every path in (the etcd face, the API server, a forwarded write) is held to the same
        // limit; the estimate exceeds the encoded size by at most a few bytes per field.
        let (size, limit) = (cmd.approx_size(), self.inner.config.max_request_bytes);
        if size > limit + 64 {
            return Err(StoreError::RequestTooLarge { size, limit });
        }
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let r = self.inner.propose_until(cmd, deadline).await;
        let counter = match &r {
            Ok(_) | Err(StoreError::Mvcc(_)) => &self.inner.proposed.0,
            Err(_) => &self.inner.proposed.1,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl Inner {
    pub(crate) async fn propose_until(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResponse, StoreError> {
        let _permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| StoreError::TooManyRequests)?;
        loop {
            let leader = self.wait_for_leader(deadline).await?;
            let outcome = if leader == self.id {
                self.propose_local(cmd.clone(), deadline).await
            } else {
                self.propose_remote(leader, cmd.clone(), deadline).await
            };
            match outcome {
                Attempt::Done(r) => return r,
                Attempt::Retry(why) => {
                    if Instant::now() + RETRY_PAUSE >= deadline {
                        return Err(StoreError::NoLeader(why));
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    /// Proposes on this member, which believes it leads, through the proposal batcher.
    pub(crate) async fn propose_local(&self, cmd: Command, deadline: Instant) -> Attempt {
        if *self.shutdown.borrow() {
            return Attempt::Retry("this member is shutting down".into());
        }
        let (reply, rx) = oneshot::channel();
        if self.proposals.send(Pending { cmd, reply }).is_err() {
            return Attempt::Retry("the proposal batcher has stopped".into());
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Attempt::Done(Err(StoreError::Timeout(
                "the write was proposed but not committed before the deadline; it may still be applied".into(),
            ))),
            Ok(Err(_)) => Attempt::Done(Err(StoreError::Timeout(
                "this member stopped before the write was committed; it may still be applied".into(),
            ))),
            Ok(Ok(attempt)) => attempt,
        }
    }

    /// Forwards `cmd` to the leader through the forwarding batcher, which sends the writes
    /// waiting at the same moment in one call.
    async fn propose_remote(&self, leader: NodeId, cmd: Command, deadline: Instant) -> Attempt {
        let Some(addr) = self.peer_addr_of(leader) else {
            return Attempt::Retry(format!("leader {leader:x} is not in the membership"));
        };
        let (reply, rx) = oneshot::channel();
        let forward = Forward {
            leader,
            addr,
            cmd,
            deadline,
            reply,
        };
        self.forwards.send(forward);
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Attempt::Done(Err(StoreError::Timeout(
                "the write was forwarded to the leader but not answered before the deadline; it may still be applied".into(),
            ))),
            Ok(Err(_)) => Attempt::Done(Err(StoreError::Timeout(
                "this member stopped while the write was forwarded; it may still be applied".into(),
            ))),
            Ok(Ok(attempt)) => attempt,
        }
    }

    /// One call to the leader. `Err` carries the attempt's outcome when it failed: a retry
    /// when nothing can have happened, or the error when it may have.
    pub(crate) async fn call_leader(
        &self,
        leader: NodeId,
        req: &LeaderRequest,
        deadline: Instant,
    ) -> Result<LeaderResponse, Attempt> {
        let Some(addr) = self.peer_addr_of(leader) else {
            return Err(Attempt::Retry(format!(
                "leader {leader:x} is not in the membership"
            )));
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        leader_outcome(
            &addr,
            self.peers.leader_call(leader, &addr, req, remaining).await,
        )
    }

    pub(crate) fn peer_addr_of(&self, id: NodeId) -> Option<String> {
        let m = self.raft.server_metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.peer_addr.clone())
    }

    /// The leader as this member knows it, waiting for an election until the deadline.
    pub(crate) async fn wait_for_leader(&self, deadline: Instant) -> Result<NodeId, StoreError> {
        let mut rx = self.raft.server_metrics();
        loop {
            if let Some(l) = rx.borrow_and_update().current_leader {
                return Ok(l);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => {
                    return Err(StoreError::NoLeader(
                        "no leader was elected before the deadline".into(),
                    ));
                }
                Ok(Err(_)) => return Err(StoreError::Stopped("raft has stopped".into())),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// What a call to the leader came to: its answer, or the outcome for the request (a retry
/// when nothing can have happened, or the error when it may have).
fn leader_outcome(
    addr: &str,
    r: Result<Result<LeaderResponse, LeaderCallError>, PeerCallError>,
) -> Result<LeaderResponse, Attempt> {
    match r {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(refusal(addr, e)),
        Err(e @ PeerCallError::Unreachable { .. }) => Err(Attempt::Retry(e.to_string())),
        Err(e @ (PeerCallError::Timeout { .. } | PeerCallError::Broken { .. })) => {
            Err(Attempt::Done(Err(StoreError::Timeout(format!(
                "{e}; the request may still take effect"
            )))))
        }
        Err(e @ PeerCallError::Remote { .. }) => {
            Err(Attempt::Done(Err(StoreError::Internal(e.to_string()))))
        }
    }
}

/// The outcome of a request the leader (or the member believed to lead) turned down.
fn refusal(addr: &str, e: LeaderCallError) -> Attempt {
    match e {
        LeaderCallError::NotLeader { .. } => Attempt::Retry(format!("{addr} no longer leads")),
        LeaderCallError::TooManyRequests => Attempt::Done(Err(StoreError::TooManyRequests)),
        LeaderCallError::Refused(m) => Attempt::Done(Err(StoreError::Membership(m))),
        LeaderCallError::Failed(m) => Attempt::Done(Err(StoreError::Timeout(m))),
    }
}

/// A write on its way to the leader, waiting for the forwarding batcher.
pub(crate) struct Forward {
    leader: NodeId,
    addr: String,
    cmd: Command,
    deadline: Instant,
    reply: oneshot::Sender<Attempt>,
}

/// Forwarding calls in flight at once to one leader. While this many are out, new writes for
/// it wait and go together in the next call: one call for many writes, instead of a call (and
/// its HTTP/2 stream, headers and wake-ups on both members) for each. Two, not four: fewer
/// calls make bigger batches, and at 64 clients a write's share of the per-batch work (the
/// call, the log entry, its flushes, replication and apply on three members) is what decides
/// throughput on two cores (BENCHMARKS.md, "Morning of 2026-12-02").
const MAX_INFLIGHT_FORWARDS: usize = 2;

/// Turns concurrent writes forwarded to the leader into batched calls, in the order they came.
///
/// Each leader has its own batcher and its own calls in flight, so calls hanging on a leader
/// that has just died do not hold up the writes for its successor; and a batcher answers the
/// writes still queued for a member that no longer leads with a retry (they were never sent).
pub(crate) struct Forwarders {
    peers: crate::raft::network::Peers,
    metrics: tokio::sync::watch::Receiver<crate::types::RaftServerMetrics>,
    batchers: std::sync::Mutex<std::collections::HashMap<NodeId, mpsc::UnboundedSender<Forward>>>,
}

impl Forwarders {
    pub(crate) fn new(
        peers: crate::raft::network::Peers,
        metrics: tokio::sync::watch::Receiver<crate::types::RaftServerMetrics>,
    ) -> Self {
        Self {
            peers,
            metrics,
            batchers: Default::default(),
        }
    }

    /// Queues `f` for its leader's batcher (started on the first write for that leader).
    fn send(&self, f: Forward) {
        let mut batchers = self.batchers.lock().unwrap_or_else(|p| p.into_inner());
        let tx = match batchers.get(&f.leader) {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                let tx = self.start(f.leader);
                batchers.entry(f.leader).insert_entry(tx).into_mut()
            }
        };
        if let Err(mpsc::error::SendError(f)) = tx.send(f) {
            let _ = f
                .reply
                .send(Attempt::Retry("the forwarding batcher has stopped".into()));
        }
    }

    fn start(&self, leader: NodeId) -> mpsc::UnboundedSender<Forward> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(batch_forwards_to(
            self.peers.clone(),
            self.metrics.clone(),
            leader,
            rx,
        ));
        tx
    }
}

/// The batcher of the writes forwarded to `leader`.
async fn batch_forwards_to(
    peers: crate::raft::network::Peers,
    mut metrics: tokio::sync::watch::Receiver<crate::types::RaftServerMetrics>,
    leader: NodeId,
    mut rx: mpsc::UnboundedReceiver<Forward>,
) {
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_FORWARDS));
    while let Some(first) = rx.recv().await {
        // Wait for a free call, unless the leader changes first: the writes queued here were
        // never sent, and go again to whoever leads now.
        let permit = loop {
            let current = metrics.borrow_and_update().current_leader;
            if current != Some(leader) {
                break Err(current);
            }
            tokio::select! {
                p = inflight.clone().acquire_owned() => match p {
                    Ok(p) => break Ok(p),
                    Err(_) => return,
                },
                changed = metrics.changed() => if changed.is_err() {
                    break Err(None);
                },
            }
        };
        let permit = match permit {
            Ok(p) => p,
            Err(current) => {
                let why = format!(
                    "{} no longer leads (the leader is now {})",
                    first.addr,
                    current.map_or("unknown".to_string(), |l| format!("{l:x}"))
                );
                let _ = first.reply.send(Attempt::Retry(why.clone()));
                while let Ok(f) = rx.try_recv() {
                    let _ = f.reply.send(Attempt::Retry(why.clone()));
                }
                continue;
            }
        };
        let batch = gather(first, &mut rx, |f| f.cmd.approx_size());
        let addr = batch[0].addr.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            let _permit = permit;
            forward_batch(&peers, leader, &addr, batch).await;
        });
    }
}

/// Sends one batch of forwarded writes and hands each its outcome.
async fn forward_batch(
    peers: &crate::raft::network::Peers,
    leader: NodeId,
    addr: &str,
    batch: Vec<Forward>,
) {
    let now = Instant::now();
    // Writes whose deadline passed while they waited have been answered already.
    let batch: Vec<Forward> = batch
        .into_iter()
        .filter(|f| f.deadline > now && !f.reply.is_closed())
        .collect();
    let Some(last) = batch.iter().map(|f| f.deadline).max() else {
        return;
    };
    let (cmds, waiting): (Vec<Command>, Vec<oneshot::Sender<Attempt>>) =
        batch.into_iter().map(|f| (f.cmd, f.reply)).unzip();
    let n = cmds.len();
    let req = LeaderRequest::ProposeBatch(cmds);
    let r = peers.leader_call(leader, addr, &req, last - now).await;
    // Once the call went out, an answer that cannot be read leaves the writes' outcome unknown:
    // the leader may have applied every one of them.
    let unknown = |why: String| {
        Attempt::Done(Err(StoreError::Timeout(format!(
            "{why}; the {n} forwarded writes may have been applied"
        ))))
    };
    let r = match r {
        Err(e @ (PeerCallError::Remote { .. } | PeerCallError::Broken { .. })) => {
            Err(unknown(e.to_string()))
        }
        r => leader_outcome(addr, r),
    };
    match r {
        Ok(LeaderResponse::ProposedBatch(results)) if results.len() == n => {
            for (reply, result) in waiting.into_iter().zip(results) {
                let attempt = match result {
                    Ok(r) => Attempt::Done(into_result(r)),
                    Err(e) => refusal(addr, e),
                };
                let _ = reply.send(attempt);
            }
        }
        Ok(other) => {
            let outcome = unknown(format!(
                "the leader answered a batch of {n} proposals with {}",
                match other {
                    LeaderResponse::ProposedBatch(r) => format!("{} outcomes", r.len()),
                    _ => "an answer to another request".into(),
                }
            ));
            for reply in waiting {
                let _ = reply.send(outcome.clone());
            }
        }
        Err(outcome) => {
            for reply in waiting {
                let _ = reply.send(outcome.clone());
            }
        }
    }
}

/// A command waiting for the batcher.
pub(crate) struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Attempt>,
}

/// Commands proposed together at most, and their approximate size.
const MAX_BATCH: usize = 256;
const MAX_BATCH_BYTES: usize = 2 * 1024 * 1024;
/// Batches handed to Raft and not yet applied. While this many are in flight, new commands
/// wait and are proposed together: one log entry, one append, one replication record for
/// many client writes. An idle member proposes a lone command at once.
const MAX_INFLIGHT_BATCHES: usize = 2;

/// `first` and what is already waiting behind it in `rx`, up to [`MAX_BATCH`] items or
/// about [`MAX_BATCH_BYTES`].
fn gather<T>(
    first: T,
    rx: &mut mpsc::UnboundedReceiver<T>,
    size_of: impl Fn(&T) -> usize,
) -> Vec<T> {
    let mut size = size_of(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH && size < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(item) => {
                size += size_of(&item);
                batch.push(item);
            }
            Err(_) => break,
        }
    }
    batch
}

/// Turns concurrent proposals into batched log entries.
pub(crate) async fn batch_proposals(
    raft: crate::types::Raft,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_BATCHES));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let batch = gather(first, &mut rx, |p| p.cmd.approx_size());
        let (mut cmds, replies): (Vec<Command>, Vec<oneshot::Sender<Attempt>>) =
            batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        let single = cmds.len() == 1;
        let cmd = match (single, cmds.pop()) {
            (true, Some(c)) => c,
            (_, Some(c)) => {
                cmds.push(c);
                Command::Batch(cmds)
            }
            (_, None) => continue,
        };
        // Handing the entry to Raft fails only if Raft has stopped: nothing was appended.
        let responder = match raft.client_write_ff(cmd).await {
            Ok(rx) => rx,
            Err(f) => {
                for r in replies {
                    let _ = r.send(Attempt::Retry(format!("raft on this member stopped: {f}")));
                }
                continue;
            }
        };
        tokio::spawn(async move {
            let _permit = permit;
            let outcome = responder.await;
            distribute(outcome, single, replies);
        });
    }
}

type WriteOutcome = Result<
    Result<
        openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
        ClientWriteError<NodeId, crate::types::Member>,
    >,
    oneshot::error::RecvError,
>;

fn distribute(outcome: WriteOutcome, single: bool, replies: Vec<oneshot::Sender<Attempt>>) {
    let n = replies.len();
    let each: Box<dyn Fn() -> Attempt> = match outcome {
        Ok(Ok(reply)) => {
            let responses = match reply.data {
                r if single => vec![r],
                CommandResponse::Batch(v) if v.len() == n => v,
                other => {
                    let msg = format!("a batch of {n} was answered with {other:?}");
                    for r in replies {
                        let _ = r.send(Attempt::Done(Err(StoreError::Internal(msg.clone()))));
                    }
                    return;
                }
            };
            for (r, resp) in replies.into_iter().zip(responses) {
                let _ = r.send(Attempt::Done(into_result(resp)));
            }
            return;
        }
        // Never appended (or truncated): nothing happened, the next leader can take it.
        Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
            let why = format!("leadership moved (to {:?})", f.leader_id);
            Box::new(move || Attempt::Retry(why.clone()))
        }
        Ok(Err(ClientWriteError::ChangeMembershipError(e))) => {
            let msg = e.to_string();
            Box::new(move || Attempt::Done(Err(StoreError::Internal(msg.clone()))))
        }
        Err(_) => Box::new(|| {
            Attempt::Done(Err(StoreError::Timeout(
                "raft stopped before the write was committed; it may still be applied".into(),
            )))
        }),
    };
    for r in replies {
        let _ = r.send(each());
    }
}

/// How one attempt at a leader-only request ended.
#[derive(Clone)]
pub(crate) enum Attempt {
    Done(Result<CommandResponse, StoreError>),
    /// Nothing happened; try again (with the leader as then known).
    Retry(String),
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Done(r) => write!(f, "Done({r:?})"),
            Attempt::Retry(why) => write!(f, "Retry({why})"),
        }
    }
}

pub(crate) fn into_result(r: CommandResponse) -> Result<CommandResponse, StoreError> {
    match r {
        CommandResponse::Rejected(e) => Err(e.into()),
        other => Ok(other),
    }
}

/// On the leader: compacts history older than the retention window, every
/// `compaction_interval`, and sooner whenever the history outgrew the window by a tenth, so
/// that it stays within 1.1 windows (plus what a check interval of 100 ms lets in) at any
/// write rate. A compaction costs each member the keys written since the previous one (see
/// [`crate::mvcc`]), not a pass over the whole index, so compacting often costs no more in
/// total than compacting rarely.
pub(crate) async fn auto_compaction(node: StoreNode) {
    let retention = node.inner.config.compaction_retention;
    if retention <= 0 {
        return;
    }
    let period = node.inner.config.compaction_interval;
    let check = (period / 10).clamp(Duration::from_millis(1), Duration::from_millis(100));
    let slack = (retention / 10).max(1);
    let mut tick = tokio::time::interval(check);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if !node.is_leader() {
            continue;
        }
        let kv = node.kv();
        let target = kv.revision() - retention;
        let excess = target - kv.compact_revision();
        if excess <= 0 || (excess < slack && last.elapsed() < period) {
            continue;
        }
        last = tokio::time::Instant::now();
        match node.propose(Command::Compact { revision: target }).await {
            Ok(_) => tracing::debug!(revision = target, "auto-compacted"),
            Err(StoreError::Mvcc(e)) => tracing::debug!(error = %e, "auto-compaction skipped"),
            Err(e) => tracing::warn!(error = %e, "auto-compaction failed"),
        }
    }
}
