//! Membership while serving: list, add (as a learner or a voter), promote, remove, and each
//! member publishing its own name and client address once it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::ChangeMembers;
use tokio::time::Instant;

use super::StoreNode;
use super::write::Attempt;
use crate::errors::StoreError;
use crate::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};
use crate::types::{Member, NodeId};

/// One member as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: NodeId,
    pub member: Member,
    pub is_learner: bool,
}

/// A learner may be promoted once its log holds this share of the leader's.
const PROMOTE_CAUGHT_UP: f64 = 0.9;

impl StoreNode {
    /// Every member, voters and learners, by id.
    pub fn members(&self) -> Vec<MemberInfo> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, member)| MemberInfo {
                id: *id,
                member: member.clone(),
                is_learner: !voters.contains(id),
            })
            .collect()
    }

    /// Adds a member that will listen at `peer_addr`; returns its id.
    pub async fn add_member(&self, peer_addr: String, learner: bool) -> Result<NodeId, StoreError> {
        if peer_addr.is_empty() || !peer_addr.contains(':') {
            return Err(StoreError::Invalid(crate::errors::InvalidRequest::field(
                "peer_urls",
                format!("`{peer_addr}` is not HOST:PORT"),
            )));
        }
        let member = Member {
            name: String::new(),
            peer_addr,
            client_addr: String::new(),
        };
        match self
            .membership_call(LeaderRequest::AddMember { member, learner })
            .await?
        {
            LeaderResponse::Member { id } => Ok(id),
            other => Err(StoreError::Internal(format!(
                "member add answered {other:?}"
            ))),
        }
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<(), StoreError> {
        self.membership_call(LeaderRequest::RemoveMember { id })
            .await
            .map(|_| ())
    }

    pub async fn promote_member(&self, id: NodeId) -> Result<(), StoreError> {
        self.membership_call(LeaderRequest::PromoteMember { id })
            .await
            .map(|_| ())
    }

    pub async fn update_member(&self, id: NodeId, member: Member) -> Result<(), StoreError> {
        self.membership_call(LeaderRequest::UpdateMember { id, member })
            .await
            .map(|_| ())
    }

    async fn membership_call(&self, req: LeaderRequest) -> Result<LeaderResponse, StoreError> {
        // Membership changes wait for a joint configuration to commit: allow them longer.
        let deadline = Instant::now() + self.inner.config.request_timeout * 2;
        loop {
            let leader = self.inner.wait_for_leader(deadline).await?;
            let attempt = if leader == self.id() {
                match self.serve_membership(req.clone()).await {
                    Ok(r) => return Ok(r),
                    Err(LeaderCallError::NotLeader { .. }) => {
                        Attempt::Retry("leadership moved".into())
                    }
                    Err(LeaderCallError::Refused(m)) => return Err(StoreError::Membership(m)),
                    Err(LeaderCallError::TooManyRequests) => {
                        return Err(StoreError::TooManyRequests);
                    }
                    Err(LeaderCallError::Failed(m)) => return Err(StoreError::Timeout(m)),
                }
            } else {
                match self.inner.call_leader(leader, &req, deadline).await {
                    Ok(r) => return Ok(r),
                    Err(a) => a,
                }
            };
            match attempt {
                Attempt::Done(r) => {
                    return Err(r.err().unwrap_or_else(|| {
                        StoreError::Internal("unexpected membership answer".into())
                    }));
                }
                Attempt::Retry(why) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::NoLeader(why));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// On the leader: carries out a membership change.
    pub(crate) async fn serve_membership(
        &self,
        req: LeaderRequest,
    ) -> Result<LeaderResponse, LeaderCallError> {
        if !self.is_leader() {
            return Err(LeaderCallError::NotLeader {
                leader: self.leader(),
            });
        }
        // One change at a time on this leader, each checked against the membership the last
        // one left: a member's publication of its attributes (SetNodes) waiting behind the
        // member's removal once put it back as a learner (the removal's check passed, then
        // the publication re-added what the removal had taken out).
        let _serial = tokio::time::timeout(
            self.inner.config.request_timeout,
            self.inner.membership_serial.lock(),
        )
        .await
        .map_err(|_| {
            LeaderCallError::Failed(
                "another membership change is still in progress on the leader; try again".into(),
            )
        })?;
        let members = self.members();
        let find = |id: NodeId| members.iter().find(|m| m.id == id);
        let raft = &self.inner.raft;
        let result = match req {
            LeaderRequest::AddMember { member, learner } => {
                if let Some(m) = members
                    .iter()
                    .find(|m| m.member.peer_addr == member.peer_addr)
                {
                    return Err(LeaderCallError::Refused(format!(
                        "Peer URLs already exists (member {:x} uses {})",
                        m.id, member.peer_addr
                    )));
                }
                let id = loop {
                    let id = rand::random::<u64>() >> 1;
                    if id != 0 && find(id).is_none() {
                        break id;
                    }
                };
                let r = self
                    .retrying(|| raft.add_learner(id, member.clone(), false))
                    .await;
                let r = match r {
                    Ok(_) if !learner => {
                        self.retrying(|| {
                            raft.change_membership(
                                ChangeMembers::AddVoterIds(BTreeSet::from([id])),
                                false,
                            )
                        })
                        .await
                    }
                    other => other,
                };
                let r = r.map_err(membership_error)?;
                self.until_shown(&r).await;
                return Ok(LeaderResponse::Member { id });
            }
            LeaderRequest::RemoveMember { id } => {
                let Some(m) = find(id) else {
                    return Err(LeaderCallError::Refused(format!(
                        "member not found: {id:x}"
                    )));
                };
                let change = if m.is_learner {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                } else {
                    if members.iter().filter(|m| !m.is_learner).count() == 1 {
                        return Err(LeaderCallError::Refused(
                            "cannot remove the only voting member".into(),
                        ));
                    }
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                };
                self.retrying(|| raft.change_membership(change.clone(), false))
                    .await
            }
            LeaderRequest::PromoteMember { id } => {
                let Some(m) = find(id) else {
                    return Err(LeaderCallError::Refused(format!(
                        "member not found: {id:x}"
                    )));
                };
                if !m.is_learner {
                    return Err(LeaderCallError::Refused(
                        "can only promote a learner member".into(),
                    ));
                }
                let metrics = self.metrics();
                let last = metrics.last_log_index.unwrap_or(0) as f64;
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten())
                    .map_or(0, |l| l.index) as f64;
                if matched < last * PROMOTE_CAUGHT_UP {
                    return Err(LeaderCallError::Refused(format!(
                        "can only promote a learner member which is in sync with leader (it has {matched} of {last} entries)"
                    )));
                }
                self.retrying(|| {
                    raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                })
                .await
            }
            LeaderRequest::UpdateMember { id, member } => {
                if find(id).is_none() {
                    return Err(LeaderCallError::Refused(format!(
                        "member not found: {id:x}"
                    )));
                }
                self.retrying(|| {
                    raft.change_membership(
                        ChangeMembers::SetNodes(BTreeMap::from([(id, member.clone())])),
                        true,
                    )
                })
                .await
            }
            _ => return Err(LeaderCallError::Refused("not a membership request".into())),
        };
        let r = result.map_err(membership_error)?;
        self.until_shown(&r).await;
        Ok(LeaderResponse::Done)
    }

    /// Waits (a request timeout at most) until this member's view of the membership, which
    /// the next change's checks and peers' Hello are answered from, shows change `r`.
    async fn until_shown(&self, r: &openraft::raft::ClientWriteResponse<crate::types::TypeConfig>) {
        let log_id = r.log_id;
        let _ = self
            .inner
            .raft
            .wait(Some(self.inner.config.request_timeout))
            .metrics(
                |m| m.membership_config.log_id().is_some_and(|l| l >= log_id),
                "the membership change shows",
            )
            .await;
    }
}

type ChangeResult = Result<
    openraft::raft::ClientWriteResponse<crate::types::TypeConfig>,
    openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
>;

impl StoreNode {
    /// Runs a membership change, waiting while another one is still in progress (members
    /// publishing their attributes at start, or a concurrent request), as etcd serializes them.
    async fn retrying<F, Fut>(&self, change: F) -> ChangeResult
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ChangeResult>,
    {
        use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            match change().await {
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }
}

fn membership_error(
    e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, Member>>,
) -> LeaderCallError {
    use openraft::error::{ClientWriteError, RaftError};
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => LeaderCallError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            LeaderCallError::Refused(c.to_string())
        }
        RaftError::Fatal(f) => LeaderCallError::Failed(f.to_string()),
    }
}

/// Once this member appears in the membership, makes sure the cluster knows its name and
/// client address (a member added by address, or whose client address changed, has stale
/// ones until it runs).
pub(crate) async fn publish_attributes(node: StoreNode) {
    let mut metrics = node.inner.raft.server_metrics();
    let wanted = Member {
        name: node.inner.config.name.clone(),
        peer_addr: node.inner.config.peer_addr.clone(),
        client_addr: node.inner.config.client_addr.clone(),
    };
    loop {
        let known = {
            let m = metrics.borrow_and_update();
            (
                m.current_leader.is_some(),
                m.membership_config
                    .membership()
                    .get_node(&node.id())
                    .cloned(),
            )
        };
        match known {
            (_, Some(current)) if current == wanted => return,
            (true, Some(_)) => match node.update_member(node.id(), wanted.clone()).await {
                Ok(()) => {
                    tracing::info!(client_addr = %wanted.client_addr, "published this member's attributes")
                }
                Err(e) => {
                    tracing::debug!(error = %e, "publishing this member's attributes failed; will retry");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ => {
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Whenever the membership changes, closes the pipes and connections to addresses no member
/// has any more (see [`crate::raft::network::Peers::retain_peers`]).
pub(crate) async fn forget_departed_peers(node: StoreNode) {
    let mut metrics = node.inner.raft.server_metrics();
    let mut last = std::collections::HashSet::new();
    loop {
        let addrs: std::collections::HashSet<String> = metrics
            .borrow_and_update()
            .membership_config
            .membership()
            .nodes()
            .map(|(_, m)| m.peer_addr.clone())
            .collect();
        // A member that has not received any membership yet (a learner being added) knows
        // no one: nothing to close.
        if !addrs.is_empty() && addrs != last {
            node.inner.peers.retain_peers(&addrs);
            last = addrs;
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}
