//! etcd's Maintenance service: status, hashes, alarms, snapshots (Flotilla's format);
//! defragmentation is a no-op here.

use std::pin::Pin;

use flotilla_proto::etcdserverpb::maintenance_server::Maintenance;
use flotilla_proto::etcdserverpb::{
    AlarmMember, AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, HashKvRequest,
    HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{EtcdFace, to_status};
use crate::mvcc::alarm::{Alarm, AlarmKind};

/// The etcd API version this face implements (clients use it to pick features).
pub const ETCD_API_VERSION: &str = "3.4.0";

/// Bytes per message of a snapshot stream.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for EtcdFace {
    /// etcd's alarms (`etcdctl alarm list|disarm`): GET lists them; ACTIVATE and DEACTIVATE
    /// raise or disarm one through the log and answer it if it changed (etcd's way:
    /// `alarm disarm` lists, then deactivates each). The `NONE` type changes nothing.
    async fn alarm(
        &self,
        request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        use flotilla_proto::etcdserverpb::alarm_request::AlarmAction;
        let req = request.into_inner();
        let action = AlarmAction::try_from(req.action).map_err(|_| {
            Status::invalid_argument(format!(
                "etcdserver: invalid request: action: unknown alarm action {}",
                req.action
            ))
        })?;
        let alarms = match (action, AlarmKind::from_code(req.alarm)) {
            (AlarmAction::Get, _) => self.node.alarms(),
            (_, None) => Vec::new(),
            (action, Some(kind)) => self
                .node
                .set_alarm(
                    action == AlarmAction::Activate,
                    Alarm {
                        member: req.member_id,
                        kind,
                    },
                )
                .await
                .map_err(to_status)?,
        };
        Ok(Response::new(AlarmResponse {
            header: Some(self.node.header(0)),
            alarms: alarms
                .into_iter()
                .map(|a| AlarmMember {
                    member_id: a.member,
                    alarm: a.kind.code(),
                })
                .collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = self.node.status();
        Ok(Response::new(StatusResponse {
            header: Some(self.node.header(s.revision)),
            version: ETCD_API_VERSION.into(),
            db_size: s.db_size as i64,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit_index,
            raft_term: s.term,
            raft_applied_index: s.applied_index,
            // etcd lists the active alarms here, as `etcdctl endpoint status` shows them.
            errors: self
                .node
                .alarms()
                .iter()
                .map(|a| format!("memberID:{} alarm:{} ", a.member, a.kind.name()))
                .collect(),
            db_size_in_use: s.db_size as i64,
            is_learner: s.is_learner,
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        // sled reclaims space on its own; there is nothing to do on request.
        Ok(Response::new(DefragmentResponse {
            header: Some(self.node.header(0)),
        }))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (hash, _, rev) = self.node.kv().hash(0).map_err(to_status)?;
        Ok(Response::new(HashResponse {
            header: Some(self.node.header(rev)),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let (hash, compact_revision, hash_revision) = self
            .node
            .kv()
            .hash(request.into_inner().revision)
            .map_err(to_status)?;
        Ok(Response::new(HashKvResponse {
            header: Some(self.node.header(0)),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    /// Streams a consistent snapshot of the key space in Flotilla's snapshot format (not
    /// etcd's bbolt file: `flotilla snapshot save` writes and checks it, `flotilla snapshot
    /// restore` founds a cluster from it).
    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let (header, file) = self.node.export_snapshot().await.map_err(to_status)?;
        let size = file
            .metadata()
            .map_err(|e| Status::internal(format!("reading the snapshot: {e}")))?
            .len();
        let response_header = self.node.header(header.revision);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SnapshotResponse, Status>>(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut file = file;
            let mut remaining = size;
            let mut first = true;
            loop {
                let mut chunk = vec![0u8; SNAPSHOT_CHUNK.min(remaining as usize).max(1)];
                let n = match file.read(&mut chunk) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!(
                            "reading the snapshot: {e}"
                        ))));
                        return;
                    }
                };
                if n == 0 && !first {
                    return;
                }
                chunk.truncate(n);
                remaining = remaining.saturating_sub(n as u64);
                let response = SnapshotResponse {
                    header: first.then_some(response_header),
                    remaining_bytes: remaining,
                    blob: chunk,
                    version: ETCD_API_VERSION.into(),
                };
                first = false;
                if tx.blocking_send(Ok(response)).is_err() || n == 0 || remaining == 0 {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        _request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "etcdserver: leadership transfer is not supported by this version",
        ))
    }
}
