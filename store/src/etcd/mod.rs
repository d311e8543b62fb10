//! The etcd v3 gRPC face: KV, Watch, Lease, Cluster and Maintenance, wire-compatible with etcd
//! 3.4 so that `etcdctl` and etcd client libraries work unchanged.
//!
//! Errors carry etcd's gRPC codes and exact messages (`etcdserver: ...`), which etcd clients
//! match on. Response headers carry the cluster id, this member's id, the revision and the
//! Raft term.

mod cluster;
mod kv;
mod lease;
mod maintenance;
mod watch;

use flotilla_proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use tonic::Status;

use crate::errors::{InvalidRequest, MvccError, StoreError};
use crate::node::StoreNode;

/// Room for gRPC framing above the largest request, as etcd allows.
const GRPC_OVERHEAD: usize = 512 * 1024;

/// Serves every etcd service for one member.
#[derive(Clone)]
pub struct EtcdFace {
    node: StoreNode,
}

impl EtcdFace {
    pub fn new(node: StoreNode) -> Self {
        Self { node }
    }

    /// Refuses a request larger than the member accepts, before anything else is done.
    fn check_size(&self, msg: &impl prost::Message) -> Result<(), Status> {
        let size = msg.encoded_len();
        let limit = self.node.config().max_request_bytes;
        if size > limit {
            return Err(to_status(StoreError::RequestTooLarge { size, limit }));
        }
        Ok(())
    }
}

/// Adds the etcd services to a set of gRPC routes.
pub fn add_routes(routes: tonic::service::Routes, node: &StoreNode) -> tonic::service::Routes {
    let face = EtcdFace::new(node.clone());
    let max = node.config().max_request_bytes + GRPC_OVERHEAD;
    routes
        .add_service(KvServer::new(face.clone()).max_decoding_message_size(max))
        .add_service(WatchServer::new(face.clone()).max_decoding_message_size(max))
        .add_service(LeaseServer::new(face.clone()).max_decoding_message_size(max))
        .add_service(ClusterServer::new(face.clone()).max_decoding_message_size(max))
        .add_service(MaintenanceServer::new(face).max_decoding_message_size(max))
}

/// Maps a store error to the status an etcd client expects.
pub fn to_status(e: StoreError) -> Status {
    use tonic::Code;
    let (code, msg): (Code, String) = match &e {
        StoreError::Mvcc(m) => match m {
            MvccError::Compacted { .. } => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted".into(),
            ),
            MvccError::FutureRevision { .. } => (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision is a future revision".into(),
            ),
            MvccError::LeaseNotFound(_) => (
                Code::NotFound,
                "etcdserver: requested lease not found".into(),
            ),
            MvccError::LeaseExists(_) => (
                Code::FailedPrecondition,
                "etcdserver: lease already exists".into(),
            ),
            MvccError::Fenced { .. } => (Code::FailedPrecondition, format!("etcdserver: {m}")),
            MvccError::KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found".into()),
            MvccError::InvalidCommand(m) => (Code::InvalidArgument, format!("etcdserver: {m}")),
            // etcd's codes and words, which its clients match on.
            MvccError::NoSpace => (
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded".into(),
            ),
            MvccError::Corrupt => (Code::DataLoss, "etcdserver: corrupt cluster".into()),
        },
        StoreError::Invalid(i) => (
            Code::InvalidArgument,
            match i {
                InvalidRequest::Field { .. } => format!("etcdserver: invalid request: {i}"),
                other => format!("etcdserver: {other}"),
            },
        ),
        StoreError::RequestTooLarge { .. } => (
            Code::InvalidArgument,
            "etcdserver: request is too large".into(),
        ),
        StoreError::TooManyRequests => (
            Code::ResourceExhausted,
            "etcdserver: too many requests".into(),
        ),
        StoreError::NoLeader(_) => (Code::Unavailable, "etcdserver: no leader".into()),
        StoreError::Timeout(_) => (Code::Unavailable, "etcdserver: request timed out".into()),
        StoreError::Membership(m) => (Code::FailedPrecondition, format!("etcdserver: {m}")),
        StoreError::MemberNotFound(_) => (Code::NotFound, "etcdserver: member not found".into()),
        StoreError::Stopped(_) => (Code::Unavailable, "etcdserver: server stopped".into()),
        StoreError::Backend(_) | StoreError::Internal(_) => {
            (Code::Internal, format!("etcdserver: {e}"))
        }
    };
    // etcd clients match the message exactly; the detail goes to the log instead.
    tracing::debug!(error = %e, code = ?code, "request failed");
    Status::new(code, msg)
}

fn strip_scheme(url: &str) -> &str {
    url.trim_start_matches("http://")
        .trim_start_matches("https://")
}

/// A member's URL as etcd lists it: `https://` when that port serves TLS.
fn with_scheme(addr: &str, tls: bool) -> Vec<String> {
    match (addr.is_empty(), tls) {
        (true, _) => Vec::new(),
        (false, true) => vec![format!("https://{addr}")],
        (false, false) => vec![format!("http://{addr}")],
    }
}
