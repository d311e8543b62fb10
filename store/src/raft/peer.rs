//! Messages of Flotilla's own peer calls: what a member asks of the leader, and identity.

use serde::{Deserialize, Serialize};

use crate::mvcc::{Command, CommandResponse};
use crate::types::{Member, NodeId};

/// A call only the leader can serve.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderRequest {
    /// Propose writes (a member forwarding its clients' requests, those waiting at the same
    /// moment together); each is answered on its own, in order.
    ProposeBatch(Vec<Command>),
    /// Confirm leadership with a quorum and return the index a linearizable read must wait for.
    ReadIndex,
    /// Renew a lease; answers its TTL, or 0 when it does not exist.
    LeaseKeepAlive {
        id: i64,
    },
    /// Remaining and granted TTL of a lease.
    LeaseTimeToLive {
        id: i64,
    },
    /// Add a member (as a learner, or as a voter at once).
    AddMember {
        member: Member,
        learner: bool,
    },
    RemoveMember {
        id: NodeId,
    },
    PromoteMember {
        id: NodeId,
    },
    /// Replace what the cluster knows of a member (its name, addresses).
    UpdateMember {
        id: NodeId,
        member: Member,
    },
    /// The CRC of the records from `from` to `revision` (see
    /// [`crate::kv::KvState::hash_from`]), for the corruption checks. The one call every
    /// member serves, leader or not; it waits a little for `revision` to be applied.
    HashKv {
        from: i64,
        revision: i64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeaderResponse {
    /// The outcome of each write of a [`LeaderRequest::ProposeBatch`], in its order.
    ProposedBatch(Vec<Result<CommandResponse, LeaderCallError>>),
    ReadIndex(u64),
    /// TTL in seconds; 0 (keep-alive) or -1 (time-to-live) when the lease does not exist.
    LeaseTtl {
        ttl: i64,
        granted: i64,
    },
    Member {
        id: NodeId,
    },
    Done,
    /// The answer to [`LeaderRequest::HashKv`]: the CRC and the first revision hashed.
    Hash {
        hash: u32,
        from: i64,
    },
}

/// Why a leader call failed.
#[derive(Clone, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum LeaderCallError {
    /// The callee is not the leader; nothing was done. `leader` is whom it believes leads.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// Too many proposals are waiting on the leader; nothing was done.
    #[error("too many requests")]
    TooManyRequests,
    /// The request was refused before anything was done; the message says why.
    #[error("{0}")]
    Refused(String),
    /// It failed after it may have taken effect.
    #[error("{0}")]
    Failed(String),
}

/// Sent to any member to learn who it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's peer address (so a new member can be recognised).
    pub peer_addr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloReply {
    pub cluster_id: u64,
    pub member_id: NodeId,
    pub name: String,
    /// Every member the responder knows: id, what it knows of it, whether it votes.
    pub members: Vec<(NodeId, Member, bool)>,
}

/// Raft's PreVote: would the receiver vote for `candidate` at `term`? Asked before a member
/// campaigns, so that one that cannot win (cut off, starved, behind) never raises its term
/// and, coming back, deposes a leader that was doing fine (see `node::election`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The term the candidate would campaign in.
    pub term: u64,
    /// The candidate's last log entry.
    pub last_log_id: Option<crate::types::LogId>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// The receiver's term.
    pub term: u64,
}
