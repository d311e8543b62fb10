//! The peer gRPC service: Raft traffic in, leader calls from other members, identity.
//!
//! Everything here comes from the network: a message for another cluster, or one that does
//! not decode, is answered with an error and never acted upon.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_proto::raft::PeerMessage;
use flotilla_proto::raft::raft_peer_server::RaftPeer;
use futures::Stream;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::write::Attempt;
use super::{Inner, StoreNode};
use crate::codec;
use crate::errors::StoreError;
use crate::mvcc::{Command, CommandResponse, validate_command};
use crate::raft::guard;
use crate::raft::network::{
    LAST_READ_CALL, Method, PEER_MAX_MESSAGE, UNKNOWN_METHOD, WIRE_VERSION, wire_version_of,
};
use crate::raft::peer::{
    Hello, HelloReply, LeaderCallError, LeaderRequest, LeaderResponse, PreVoteRequest,
};
use crate::types::{NodeId, TypeConfig};

pub(crate) struct PeerService {
    node: StoreNode,
    vouches: Arc<Vouches>,
}

impl PeerService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self {
            node: StoreNode { inner },
            vouches: Arc::default(),
        }
    }

    /// Checks the envelope and decodes the payload.
    fn open<T: DeserializeOwned>(
        &self,
        msg: &PeerMessage,
        any_cluster: bool,
    ) -> Result<T, PeerMessage> {
        let theirs = wire_version_of(msg);
        if theirs != WIRE_VERSION {
            tracing::warn!(
                sender_version = theirs,
                "refused a peer message of another peer protocol version"
            );
            return Err(error_reply(format!(
                "peer protocol version mismatch: this member speaks version {WIRE_VERSION}, the sender version {theirs} (are the members running different Flotilla releases?)"
            )));
        }
        let mine = self.node.cluster_id();
        if msg.cluster_id != mine && !(any_cluster && msg.cluster_id == 0) {
            tracing::warn!(
                sender_cluster = %format!("{:x}", msg.cluster_id),
                "refused a peer message from another cluster"
            );
            // This member's cluster id is not named: it is what a stranger would need.
            return Err(error_reply(format!(
                "{CLUSTER_MISMATCH}: the sender belongs to cluster {:x}, this member to another",
                msg.cluster_id
            )));
        }
        codec::decode(&msg.payload).map_err(|e| error_reply(format!("undecodable request: {e}")))
    }
}

/// How a member answers a message of another cluster (a prober looks for it).
pub(crate) const CLUSTER_MISMATCH: &str = "cluster id mismatch";

fn error_reply(error: String) -> PeerMessage {
    PeerMessage {
        cluster_id: 0,
        payload: Vec::new(),
        error,
        wire_version: WIRE_VERSION,
        call_id: 0,
        method: 0,
    }
}

fn reply<T: Serialize>(cluster_id: u64, value: &T) -> PeerMessage {
    match codec::encode(value) {
        Ok(payload) => PeerMessage {
            cluster_id,
            payload,
            error: String::new(),
            wire_version: WIRE_VERSION,
            call_id: 0,
            method: 0,
        },
        Err(e) => error_reply(format!("the reply could not be encoded: {e}")),
    }
}

impl PeerService {
    /// Serves one request, from a unary call or the pipe: the reply, or an error reply for a
    /// message that fails the envelope's checks or does not decode.
    async fn serve(&self, method: Method, msg: &PeerMessage) -> PeerMessage {
        let cluster = self.node.cluster_id();
        match method {
            Method::AppendEntries => {
                match self.open::<AppendEntriesRequest<TypeConfig>>(msg, false) {
                    Ok(req) => match self.guard(|v| guard::check_append_entries(v, &req)) {
                        Ok(()) => {
                            self.heard_from(&req.vote);
                            reply(cluster, &self.node.raft().append_entries(req).await)
                        }
                        Err(e) => e,
                    },
                    Err(e) => e,
                }
            }
            Method::Vote => match self.open::<VoteRequest<NodeId>>(msg, false) {
                Ok(req) => match self.guard(|v| guard::check_vote(v, &req)) {
                    Ok(()) => {
                        let answer = self.node.raft().vote(req).await;
                        // Granting a vote restarts the election timeout, as in Raft.
                        if answer.as_ref().is_ok_and(|a| a.vote_granted) {
                            self.node.inner.leader_contact.heard();
                        }
                        reply(cluster, &answer)
                    }
                    Err(e) => e,
                },
                Err(e) => e,
            },
            Method::InstallSnapshot => {
                match self.open::<InstallSnapshotRequest<TypeConfig>>(msg, false) {
                    Ok(req) => match self.guard(|v| guard::check_install_snapshot(v, &req)) {
                        Ok(()) => {
                            self.heard_from(&req.vote);
                            reply(cluster, &self.node.raft().install_snapshot(req).await)
                        }
                        Err(e) => e,
                    },
                    Err(e) => e,
                }
            }
            Method::PreVote => match self.open::<PreVoteRequest>(msg, false) {
                Ok(req) => {
                    let vote = openraft::Vote::new(req.term, req.candidate);
                    match self.guard(|v| guard::check_pre_vote(v, &vote)) {
                        Ok(()) => reply(cluster, &self.node.serve_pre_vote(&req)),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            },
            Method::Leader => match self.open::<LeaderRequest>(msg, false) {
                Ok(req) => reply(cluster, &self.node.serve_leader(req).await),
                Err(e) => e,
            },
            Method::Hello => match self.open::<Hello>(msg, true) {
                Ok(hello) => {
                    tracing::debug!(from = %hello.peer_addr, "hello");
                    // A caller that does not know the cluster id is told it only when it is a
                    // member added and not yet started (learning its id and cluster, as
                    // `--initial-cluster-state existing` does).
                    if msg.cluster_id == 0 && !self.awaits(&hello.peer_addr) {
                        return error_reply(format!(
                            "no member of this cluster that has not started yet has peer address {}; add it first (`flotilla cluster add NAME {}`)",
                            hello.peer_addr, hello.peer_addr
                        ));
                    }
                    let members = self
                        .node
                        .members()
                        .into_iter()
                        .map(|m| (m.id, m.member, !m.is_learner))
                        .collect();
                    let r = HelloReply {
                        cluster_id: cluster,
                        member_id: self.node.id(),
                        name: self.node.name().to_string(),
                        members,
                    };
                    reply(cluster, &r)
                }
                Err(e) => e,
            },
        }
    }

    /// A leader's request of the current term (or a newer one) got past the guard: this
    /// member has heard from a leader (see `node::election`).
    fn heard_from(&self, vote: &crate::types::Vote) {
        if vote.leader_id().term >= self.node.term() {
            self.node.inner.leader_contact.heard();
        }
    }

    /// Whether `peer_addr` is the peer address of a member added and not started yet (one
    /// that has never published its client address).
    fn awaits(&self, peer_addr: &str) -> bool {
        self.node
            .members()
            .iter()
            .any(|m| m.member.peer_addr == peer_addr && m.member.client_addr.is_empty())
    }

    /// Runs one of [`guard`]'s checks against what this member knows; a refusal is logged
    /// with the sender and answered as an error, and a sender this member does not know is
    /// asked about (see [`Vouches`]).
    fn guard(
        &self,
        check: impl FnOnce(&guard::LocalView<'_>) -> Result<(), guard::Refusal>,
    ) -> Result<(), PeerMessage> {
        let inner = &self.node.inner;
        let (term, voters, applied) = {
            let m = inner.raft.metrics();
            let m = m.borrow();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (
                m.current_term,
                voters,
                m.last_applied.map_or(0, |l| l.index),
            )
        };
        let committed = inner.committed.load(Ordering::Relaxed).max(applied);
        let vouched = |id| self.vouches.vouched(id);
        let log_id_at = |index| inner.log_ids.at(index);
        let view = guard::LocalView {
            me: inner.id,
            term,
            voters: &voters,
            vouched: &vouched,
            committed,
            log_id_at: &log_id_at,
        };
        let Err(refusal) = check(&view) else {
            return Ok(());
        };
        inner.refused_peer_requests.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            sender = %format!("{:x}", refusal.sender()),
            reason = %refusal,
            "refused a Raft request"
        );
        if let guard::Refusal::Stranger { from } = refusal {
            self.vouches.ask(&self.node, from);
        }
        Err(error_reply(format!("refused: {refusal}")))
    }

    /// A pipe: see [`serve_pipe`].
    fn run_pipe(&self, requests: Streaming<PeerMessage>) -> PipeStream {
        let service = Arc::new(Self {
            node: self.node.clone(),
            vouches: self.vouches.clone(),
        });
        serve_pipe(
            requests,
            self.node.shutdown_signal(),
            MAX_PIPE_CALLS,
            move |msg: PeerMessage| {
                let service = service.clone();
                async move {
                    match Method::from_code(msg.method) {
                        Some(m) => service.serve(m, &msg).await,
                        None => error_reply(format!(
                            "{UNKNOWN_METHOD} {} (are the members running different Flotilla releases?)",
                            msg.method
                        )),
                    }
                }
            },
        )
    }
}

/// Senders this member does not know that the voters it knows vouch for.
///
/// A member that was down while another was added, and that other then became leader, gets
/// requests from a leader its own membership does not list (its log will, once it has caught
/// up from that leader). Turned away for good, it would never catch up. So a sender it does not
/// know is asked about: the voters it knows are sent a hello, and a sender one of them lists
/// as a voter is taken for [`VOUCH_FOR`]. A stranger's requests are refused meanwhile; the
/// sender retries.
#[derive(Default)]
pub(crate) struct Vouches {
    /// Vouched-for senders, until when.
    vouched: Mutex<HashMap<NodeId, Instant>>,
    /// Senders asked about, when.
    asked: Mutex<HashMap<NodeId, Instant>>,
}

/// How long a voter's word for a sender holds.
const VOUCH_FOR: Duration = Duration::from_secs(60);
/// How often the voters are asked about one sender at most.
const ASK_EVERY: Duration = Duration::from_secs(2);

impl Vouches {
    fn vouched(&self, id: NodeId) -> bool {
        let vouched = self.vouched.lock().unwrap_or_else(|p| p.into_inner());
        vouched
            .get(&id)
            .is_some_and(|until| Instant::now() < *until)
    }

    fn ask(self: &Arc<Self>, node: &StoreNode, id: NodeId) {
        let now = Instant::now();
        {
            let mut asked = self.asked.lock().unwrap_or_else(|p| p.into_inner());
            asked.retain(|_, at| now.duration_since(*at) < ASK_EVERY);
            if asked.len() >= 64 || asked.insert(id, now).is_some() {
                return;
            }
        }
        let voters: Vec<String> = node
            .members()
            .into_iter()
            .filter(|m| !m.is_learner && m.id != node.id())
            .map(|m| m.member.peer_addr)
            .collect();
        let (vouches, node) = (self.clone(), node.clone());
        tokio::spawn(async move {
            let hello = Hello {
                peer_addr: node.config().peer_addr.clone(),
            };
            for addr in voters {
                let Ok(reply) = node
                    .inner
                    .peers
                    .hello(&addr, &hello, Duration::from_secs(1))
                    .await
                else {
                    continue;
                };
                if reply.cluster_id == node.cluster_id()
                    && reply.members.iter().any(|(m, _, voter)| *m == id && *voter)
                {
                    tracing::info!(
                        sender = %format!("{id:x}"),
                        voter = %addr,
                        "a voter lists a member this member's log does not know yet; its requests are taken"
                    );
                    let mut vouched = vouches.vouched.lock().unwrap_or_else(|p| p.into_inner());
                    vouched.retain(|_, until| Instant::now() < *until);
                    vouched.insert(id, Instant::now() + VOUCH_FOR);
                    return;
                }
            }
        });
    }
}

/// Serves a pipe: each request on it as a task of its own (a forwarded write waiting to commit
/// must not hold up the AppendEntries behind it), each reply sent back with the request's call
/// id. It stops taking requests when `stop` turns true; the stream then ends once the requests
/// taken are answered.
///
/// At most `max_calls` requests are taken and not yet answered, or answered and not yet taken
/// by the reply stream: a peer that sends and never reads is held back by HTTP/2 flow control
/// instead of piling tasks and replies up in this member's memory.
fn serve_pipe<S, F, Fut>(
    mut requests: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
    max_calls: usize,
    serve: F,
) -> PipeStream
where
    S: Stream<Item = Result<PeerMessage, Status>> + Send + Unpin + 'static,
    F: Fn(PeerMessage) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = PeerMessage> + Send + 'static,
{
    type Reply = (Result<PeerMessage, Status>, Option<OwnedSemaphorePermit>);
    let (out, rx) = mpsc::unbounded_channel::<Reply>();
    let calls = Arc::new(Semaphore::new(max_calls));
    tokio::spawn(async move {
        // Each request's task holds a clone: once all are dropped, every request read has
        // been answered.
        let (serving, mut all_answered) = mpsc::channel::<()>(1);
        let mut last_read = 0;
        let stopped = loop {
            let (permit, next) = tokio::select! {
                m = async {
                    let permit = calls.clone().acquire_owned().await.ok();
                    (permit, requests.next().await)
                } => m,
                _ = stop.wait_for(|s| *s) => break true,
            };
            let Some(Ok(msg)) = next else { break false };
            // The caller numbers its calls in the order it sends them.
            last_read = msg.call_id;
            let call_id = msg.call_id;
            let (reply, out, serving) = (serve(msg), out.clone(), serving.clone());
            tokio::spawn(async move {
                let _serving = serving;
                let mut reply = reply.await;
                // One reply over the limit would end the stream for every call on it.
                if reply.payload.len() > PEER_MAX_MESSAGE - 1024 {
                    reply = error_reply(format!(
                        "the reply of {} bytes is over the {PEER_MAX_MESSAGE}-byte limit",
                        reply.payload.len()
                    ));
                }
                reply.call_id = call_id;
                let _ = out.send((Ok(reply), permit));
            });
        };
        if stopped {
            // Shutting down: answer what was read, then end the stream telling the caller
            // the last call read; the later ones were never acted upon.
            drop(serving);
            let _ = all_answered.recv().await;
            let _ = out.send((Err(shutting_down(last_read)), None));
        }
    });
    // A reply's permit is released once the stream hands the reply to HTTP/2.
    Box::pin(UnboundedReceiverStream::new(rx).map(|(reply, _permit)| reply))
}

type PipeStream = Pin<Box<dyn Stream<Item = Result<PeerMessage, Status>> + Send>>;

/// Requests one pipe may have taken and not yet answered (and sent back). Far more than a
/// member sends at once: a leader sends one AppendEntries at a time, a follower a few batches
/// of forwarded writes and read-index calls.
const MAX_PIPE_CALLS: usize = 1024;

/// How a pipe ends when its member shuts down: `Unavailable`, with the last call id it read.
fn shutting_down(last_read: u64) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(LAST_READ_CALL, last_read.into());
    Status::with_metadata(
        tonic::Code::Unavailable,
        format!(
            "the member is shutting down; it read the calls up to {last_read} and no later one"
        ),
        metadata,
    )
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(
            self.serve(Method::AppendEntries, request.get_ref()).await,
        ))
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(
            self.serve(Method::Vote, request.get_ref()).await,
        ))
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(
            self.serve(Method::InstallSnapshot, request.get_ref()).await,
        ))
    }

    async fn leader(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(
            self.serve(Method::Leader, request.get_ref()).await,
        ))
    }

    async fn hello(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(
            self.serve(Method::Hello, request.get_ref()).await,
        ))
    }

    type PipeStream = PipeStream;

    async fn pipe(
        &self,
        request: Request<Streaming<PeerMessage>>,
    ) -> Result<Response<Self::PipeStream>, Status> {
        Ok(Response::new(self.run_pipe(request.into_inner())))
    }
}

/// Forwarded writes one call may carry (a member sends at most a few hundred at once).
const MAX_FORWARDED_BATCH: usize = 1024;

impl StoreNode {
    /// Serves a call another member sent to this one as the leader.
    pub(crate) async fn serve_leader(
        &self,
        req: LeaderRequest,
    ) -> Result<LeaderResponse, LeaderCallError> {
        if let LeaderRequest::HashKv { from, revision } = req {
            return self.serve_hash(from, revision).await;
        }
        if !self.is_leader() {
            return Err(LeaderCallError::NotLeader {
                leader: self.leader(),
            });
        }
        match req {
            LeaderRequest::ProposeBatch(cmds) => {
                if cmds.len() > MAX_FORWARDED_BATCH {
                    return Err(LeaderCallError::Refused(format!(
                        "a batch of {} forwarded writes is more than the {MAX_FORWARDED_BATCH} one call may carry",
                        cmds.len()
                    )));
                }
                let results =
                    futures::future::join_all(cmds.into_iter().map(|c| self.serve_proposal(c)))
                        .await;
                Ok(LeaderResponse::ProposedBatch(results))
            }
            LeaderRequest::ReadIndex => self
                .inner
                .leader_read_index()
                .await
                .map(LeaderResponse::ReadIndex),
            LeaderRequest::LeaseKeepAlive { .. } | LeaderRequest::LeaseTimeToLive { .. } => self
                .serve_lease(&req)
                .map(|(ttl, granted)| LeaderResponse::LeaseTtl { ttl, granted }),
            LeaderRequest::AddMember { .. }
            | LeaderRequest::RemoveMember { .. }
            | LeaderRequest::PromoteMember { .. }
            | LeaderRequest::UpdateMember { .. } => self.serve_membership(req).await,
            // Served above, by any member.
            LeaderRequest::HashKv { from, revision } => self.serve_hash(from, revision).await,
        }
    }

    /// On the leader: proposes a command forwarded by another member and answers its
    /// result, or why it was not applied.
    async fn serve_proposal(&self, cmd: Command) -> Result<CommandResponse, LeaderCallError> {
        // The sender validated it; a hostile or buggy peer must not get past us either.
        validate_command(&cmd).map_err(|e| LeaderCallError::Refused(e.to_string()))?;
        // The client faces refuse requests over the limit; a peer's must not slip by (the
        // estimate exceeds the encoded size by at most a few bytes per field).
        let (size, limit) = (cmd.approx_size(), self.config().max_request_bytes);
        if size > limit + 64 {
            return Err(LeaderCallError::Refused(
                StoreError::RequestTooLarge { size, limit }.to_string(),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.config().request_timeout;
        let _permit = self
            .inner
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| LeaderCallError::TooManyRequests)?;
        match self.inner.propose_local(cmd, deadline).await {
            Attempt::Retry(_) => Err(LeaderCallError::NotLeader {
                leader: self.leader(),
            }),
            Attempt::Done(Ok(r)) => Ok(r),
            Attempt::Done(Err(StoreError::Mvcc(e))) => Ok(CommandResponse::Rejected(e)),
            Attempt::Done(Err(e)) => Err(LeaderCallError::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A peer that sends and never reads: the pipe takes its limit of calls and no more until
    /// replies are taken; then every call is answered, once.
    #[tokio::test]
    async fn a_pipe_takes_no_more_calls_than_its_limit_until_replies_are_taken() {
        const CALLS: u64 = 500;
        const LIMIT: usize = 64;
        let taken = Arc::new(AtomicUsize::new(0));
        let requests = {
            let taken = taken.clone();
            tokio_stream::iter(1..=CALLS).map(move |id| {
                taken.fetch_add(1, Ordering::SeqCst);
                Ok(PeerMessage {
                    call_id: id,
                    ..Default::default()
                })
            })
        };
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        // Every call is answered at once; only the replies not taken hold the pipe back.
        let mut replies = serve_pipe(requests, stop, LIMIT, |msg| async move { msg });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while taken.load(Ordering::SeqCst) < LIMIT {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pipe took its first calls"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Let its loop and the calls' tasks run: it stays at its limit.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(taken.load(Ordering::SeqCst), LIMIT);
        let mut answered = std::collections::HashSet::new();
        while answered.len() < CALLS as usize {
            let r = replies
                .next()
                .await
                .expect("a reply")
                .expect("not an error");
            assert!(
                answered.insert(r.call_id),
                "call {} answered twice",
                r.call_id
            );
        }
        assert_eq!(taken.load(Ordering::SeqCst), CALLS as usize);
    }
}
