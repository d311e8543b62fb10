//! The Raft type configuration and the aliases every module uses.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::mvcc::{Command, CommandResponse};

/// A member's id: stable for its lifetime, never reused for another member.
pub type NodeId = u64;

/// What the cluster knows of one member: carried in the Raft membership config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Human-readable name (`--name`); empty until a member added by address has started.
    pub name: String,
    /// Where peers reach it (`--peer-addr`, host:port).
    pub peer_addr: String,
    /// Where clients reach it (`--client-addr`, host:port); empty until it has started.
    pub client_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// Flotilla's Raft: etcd-style commands in the log, the key space as the state machine,
    /// snapshots as files.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Member>;
/// The part of the metrics that changes only with the leader, the term or the membership.
pub type RaftServerMetrics = openraft::metrics::RaftServerMetrics<NodeId, Member>;
