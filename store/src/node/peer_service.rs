//! The peer gRPC service: Raft traffic in, leader calls from other members, identity.
//!
//! Everything here comes from the network: a message for another cluster, or one that does
//! not decode, is answered with an error and never acted upon.

use std::sync::Arc;

use flotilla_proto::raft::PeerMessage;
use flotilla_proto::raft::raft_peer_server::RaftPeer;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use super::write::Attempt;
use super::{Inner, StoreNode};
use crate::codec;
use crate::errors::StoreError;
use crate::mvcc::{Command, CommandResponse, validate_command};
use crate::raft::network::{WIRE_VERSION, wire_version_of};
use crate::raft::peer::{Hello, HelloReply, LeaderCallError, LeaderRequest, LeaderResponse};
use crate::types::{NodeId, TypeConfig};

pub(crate) struct PeerService {
    node: StoreNode,
}

impl PeerService {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Self {
            node: StoreNode { inner },
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
            return Err(error_reply(format!(
                "cluster id mismatch: this member belongs to cluster {mine:x}, the sender to {:x}",
                msg.cluster_id
            )));
        }
        codec::decode(&msg.payload).map_err(|e| error_reply(format!("undecodable request: {e}")))
    }
}

fn error_reply(error: String) -> PeerMessage {
    PeerMessage {
        cluster_id: 0,
        payload: Vec::new(),
        error,
        wire_version: WIRE_VERSION,
    }
}

fn reply<T: Serialize>(cluster_id: u64, value: &T) -> Result<Response<PeerMessage>, Status> {
    let payload = codec::encode(value).map_err(Status::internal)?;
    Ok(Response::new(PeerMessage {
        cluster_id,
        payload,
        error: String::new(),
        wire_version: WIRE_VERSION,
    }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = match self.open(request.get_ref(), false) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(e)),
        };
        let r = self.node.raft().append_entries(req).await;
        reply(self.node.cluster_id(), &r)
    }

    async fn vote(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: VoteRequest<NodeId> = match self.open(request.get_ref(), false) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(e)),
        };
        let r = self.node.raft().vote(req).await;
        reply(self.node.cluster_id(), &r)
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerMessage>,
    ) -> Result<Response<PeerMessage>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = match self.open(request.get_ref(), false) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(e)),
        };
        let r = self.node.raft().install_snapshot(req).await;
        reply(self.node.cluster_id(), &r)
    }

    async fn leader(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let req: LeaderRequest = match self.open(request.get_ref(), false) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(e)),
        };
        let r = self.node.serve_leader(req).await;
        reply(self.node.cluster_id(), &r)
    }

    async fn hello(&self, request: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
        let hello: Hello = match self.open(request.get_ref(), true) {
            Ok(r) => r,
            Err(e) => return Ok(Response::new(e)),
        };
        tracing::debug!(from = %hello.peer_addr, "hello");
        let members = self
            .node
            .members()
            .into_iter()
            .map(|m| (m.id, m.member, !m.is_learner))
            .collect();
        let r = HelloReply {
            cluster_id: self.node.cluster_id(),
            member_id: self.node.id(),
            name: self.node.name().to_string(),
            members,
        };
        reply(self.node.cluster_id(), &r)
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
