//! The apiserver's errors and the gRPC status each one becomes.

use flotilla_store::errors::{MvccError, StoreError};
use tonic::{Code, Status};

use crate::validate::FieldErrors;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request breaks a rule; every broken rule is named with its field.
    #[error("{0}")]
    Invalid(FieldErrors),
    #[error("{plural} \"{name}\" not found")]
    NotFound { plural: &'static str, name: String },
    #[error("{plural} \"{name}\" already exists")]
    AlreadyExists { plural: &'static str, name: String },
    /// A stale resourceVersion or a failed precondition on the object's own state.
    #[error("Operation cannot be fulfilled on {plural} \"{name}\": {reason}")]
    Conflict {
        plural: &'static str,
        name: String,
        reason: String,
    },
    /// A write lost a race: the object changed between the read and the write.
    #[error(
        "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; \
         please apply your changes to the latest version and try again"
    )]
    Race { plural: &'static str, name: String },
    /// The request contradicts itself (Kubernetes' BadRequest): a patch that renames the
    /// object it patches.
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but the cluster's state refuses it (a terminating
    /// namespace, a pod being deleted).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The revision asked for has been compacted: relist.
    #[error("expired: {0}")]
    Expired(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored data that does not decode, or another broken invariant.
    #[error("internal error: {0}")]
    Internal(String),
    /// Allowed to nobody as things stand (Kubernetes' 403): a create past a quota.
    #[error("{0}")]
    Forbidden(String),
    /// Something the request needs (a node's agent) cannot be reached now.
    #[error("{0}")]
    Unavailable(String),
    /// Refused for now by the cluster's own rules (Kubernetes' 429 without Retry-After): an
    /// eviction a PodDisruptionBudget forbids.
    #[error("{0}")]
    TooManyRequests(String),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errs = FieldErrors::default();
        errs.add(path, message);
        ApiError::Invalid(errs)
    }

    pub fn conflict(plural: &'static str, name: &str) -> Self {
        ApiError::Conflict {
            plural,
            name: name.to_string(),
            reason: "the object has been modified; please apply your changes to the latest \
                     version and try again"
                .into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) | ApiError::BadRequest(_) => Code::InvalidArgument,
            ApiError::Forbidden(_) => Code::PermissionDenied,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::Conflict { .. } | ApiError::Race { .. } => Code::Aborted,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Expired(_) => Code::OutOfRange,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::TooManyRequests(_) => Code::ResourceExhausted,
            ApiError::Store(e) => match e {
                StoreError::Mvcc(MvccError::Compacted { .. }) => Code::OutOfRange,
                StoreError::Mvcc(MvccError::FutureRevision { .. }) => Code::OutOfRange,
                StoreError::Mvcc(MvccError::Fenced { .. }) => Code::FailedPrecondition,
                // The store's alarms (etcd's NOSPACE and CORRUPT) refuse writes.
                StoreError::Mvcc(MvccError::NoSpace) => Code::ResourceExhausted,
                StoreError::Mvcc(MvccError::Corrupt) => Code::DataLoss,
                StoreError::Mvcc(_) | StoreError::Invalid(_) => Code::InvalidArgument,
                StoreError::RequestTooLarge { .. } => Code::ResourceExhausted,
                // Kubernetes' 429: overloaded, retry after the hint.
                StoreError::TooManyRequests => Code::ResourceExhausted,
                StoreError::NoLeader(_) | StoreError::Stopped(_) => Code::Unavailable,
                StoreError::Timeout(_) => Code::DeadlineExceeded,
                StoreError::Membership(_) | StoreError::MemberNotFound(_) => {
                    Code::FailedPrecondition
                }
                StoreError::Backend(_) | StoreError::Internal(_) => Code::Internal,
            },
        }
    }
}

/// gRPC's server pushback (the `Retry-After` of an overloaded server): how many milliseconds
/// the client should wait before it tries again.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";
/// The pushback of an overloaded member (Kubernetes' Retry-After: 1).
const OVERLOAD_RETRY_MS: u32 = 1000;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let code = e.code();
        let message = match &e {
            ApiError::Store(StoreError::Mvcc(MvccError::Compacted { compact_revision })) => {
                format!(
                    "expired: the requested revision has been compacted (history starts at \
                     {compact_revision}); list again and watch from the list's resourceVersion"
                )
            }
            ApiError::Store(StoreError::TooManyRequests) => {
                // Kubernetes' words for its 429, with gRPC's retry hint for Retry-After.
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert(RETRY_PUSHBACK, OVERLOAD_RETRY_MS.into());
                return Status::with_metadata(
                    Code::ResourceExhausted,
                    "Too many requests, please try again later.",
                    metadata,
                );
            }
            ApiError::Store(StoreError::Timeout(why)) => {
                format!("the request timed out and may or may not have taken effect: {why}")
            }
            _ => e.to_string(),
        };
        Status::new(code, message)
    }
}
