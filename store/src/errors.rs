//! The store's errors.
//!
//! - [`MvccError`]: a request the key space refuses by its rules (compacted revision, missing
//!   lease, ...). Deterministic: every member computes the same one while applying the same
//!   log entry, so it travels inside Raft responses.
//! - [`BackendError`]: the disk failed or holds something unreadable. Fatal for the member.
//! - [`StoreError`]: what a client call can fail with; the gRPC faces map it to a status.

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// A request refused by the key space's rules; the same on every member.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MvccError {
    #[error("required revision has been compacted (history starts at revision {compact_revision})")]
    Compacted { compact_revision: i64 },
    #[error("required revision is a future revision (current revision is {current})")]
    FutureRevision { current: i64 },
    #[error("requested lease not found: {0:x}")]
    LeaseNotFound(i64),
    #[error("lease already exists: {0:x}")]
    LeaseExists(i64),
    #[error("key not found (ignore_value / ignore_lease need an existing key)")]
    KeyNotFound,
    /// A command that cannot be applied as it stands (a batch inside a batch).
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// A fenced write reached the log under another leader than the one it was made for.
    #[error(
        "write fenced: made for leadership term {required}, appended in term {actual} (the writer no longer leads)"
    )]
    Fenced { required: u64, actual: u64 },
    /// A `NOSPACE` alarm is active (see [`crate::mvcc::alarm`]).
    #[error("mvcc: database space exceeded")]
    NoSpace,
    /// A `CORRUPT` alarm is active.
    #[error("corrupt cluster")]
    Corrupt,
}

/// A request that is malformed, found before anything is proposed.
///
/// The messages are etcd's (without its `etcdserver: ` prefix, which the etcd face adds), so
/// that etcd clients recognise them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("key is not provided")]
    EmptyKey,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    /// Any other bad field; the message names it.
    #[error("{field}: {reason}")]
    Field { field: String, reason: String },
}

impl InvalidRequest {
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The storage under the key space failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BackendError {
    #[error("storage I/O failed: {0}")]
    Io(String),
    #[error("storage holds corrupt data: {0}")]
    Corrupt(String),
}

impl From<sled::Error> for BackendError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => BackendError::Corrupt(e.to_string()),
            other => BackendError::Io(other.to_string()),
        }
    }
}

/// Why a client request was not served. Each variant maps to one gRPC code.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// Refused by the key-space rules.
    #[error(transparent)]
    Mvcc(#[from] MvccError),
    /// The request is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// The request exceeds the size a member accepts.
    #[error("request is too large ({size} bytes; the limit is {limit} bytes)")]
    RequestTooLarge { size: usize, limit: usize },
    /// Too many proposals are waiting; the client should back off and retry.
    #[error("too many requests")]
    TooManyRequests,
    /// No leader is known, or it could not be reached before the deadline.
    #[error("no leader: {0}")]
    NoLeader(String),
    /// The request did not complete before its deadline; it may or may not have been applied.
    #[error("request timed out: {0}")]
    Timeout(String),
    /// A membership change was refused.
    #[error("{0}")]
    Membership(String),
    /// No member with that id.
    #[error("member not found: {0:x}")]
    MemberNotFound(NodeId),
    /// The member is shutting down or has stopped after a fatal error.
    #[error("member is stopping: {0}")]
    Stopped(String),
    /// The member's storage failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// Something that should not happen; the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}
