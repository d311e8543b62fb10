//! etcd's Lease service.

use std::pin::Pin;

use flotilla_proto::etcdserverpb::lease_server::Lease;
use flotilla_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{EtcdFace, to_status};
use crate::errors::{MvccError, StoreError};
use crate::mvcc::{Command, CommandResponse};

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for EtcdFace {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = request.into_inner();
        if req.id < 0 {
            return Err(to_status(
                crate::errors::InvalidRequest::field("ID", "must not be negative").into(),
            ));
        }
        let (id, ttl) = self
            .node
            .lease_grant(req.id, req.ttl)
            .await
            .map_err(to_status)?;
        Ok(Response::new(LeaseGrantResponse {
            header: Some(self.node.header(0)),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        match self.node.propose(Command::LeaseRevoke { id }).await {
            Ok(CommandResponse::LeaseRevoke(r)) => Ok(Response::new(LeaseRevokeResponse {
                header: Some(self.node.header(r.header.map_or(0, |h| h.revision))),
            })),
            Ok(other) => Err(to_status(StoreError::Internal(format!(
                "unexpected response {other:?}"
            )))),
            Err(e) => Err(to_status(e)),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let node = self.node.clone();
        tokio::spawn(async move {
            loop {
                let req = match inbound.message().await {
                    Ok(Some(r)) => r,
                    _ => return,
                };
                // etcd answers an unknown lease with TTL 0 on the stream, not an error.
                let reply = match node.lease_keep_alive(req.id).await {
                    Ok(ttl) => Ok((req.id, ttl)),
                    Err(StoreError::Mvcc(MvccError::LeaseNotFound(_))) => Ok((req.id, 0)),
                    Err(e) => Err(to_status(e)),
                };
                let msg = reply.map(|(id, ttl)| LeaseKeepAliveResponse {
                    header: Some(node.header(0)),
                    id,
                    ttl,
                });
                let fatal = msg.is_err();
                if tx.send(msg).await.is_err() || fatal {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = request.into_inner();
        let (ttl, granted) = match self.node.lease_time_to_live(req.id).await {
            Ok(r) => r,
            // etcd reports a missing lease as TTL -1.
            Err(StoreError::Mvcc(MvccError::LeaseNotFound(_))) => (-1, 0),
            Err(e) => return Err(to_status(e)),
        };
        let keys = if req.keys {
            self.node
                .kv()
                .lease(req.id)
                .map(|l| l.keys.into_iter().collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: Some(self.node.header(0)),
            id: req.id,
            ttl,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.node.read_barrier().await.map_err(to_status)?;
        let leases = self
            .node
            .kv()
            .lease_ttls()
            .into_iter()
            .map(|(id, _)| LeaseStatus { id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(self.node.header(0)),
            leases,
        }))
    }
}
