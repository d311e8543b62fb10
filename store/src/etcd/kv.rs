//! etcd's KV service.

use flotilla_proto::etcdserverpb::kv_server::Kv;
use flotilla_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, TxnRequest, TxnResponse,
};
use tonic::{Request, Response, Status};

use super::{EtcdFace, to_status};
use crate::errors::StoreError;
use crate::mvcc::{Command, CommandResponse, validate_range};

impl EtcdFace {
    async fn write(&self, cmd: Command) -> Result<CommandResponse, Status> {
        self.node.propose(cmd).await.map_err(to_status)
    }

    /// Completes a header the key space filled with the revision.
    fn header(
        &self,
        h: Option<flotilla_proto::etcdserverpb::ResponseHeader>,
    ) -> Option<flotilla_proto::etcdserverpb::ResponseHeader> {
        Some(self.node.header(h.map_or(0, |h| h.revision)))
    }
}

fn unexpected(r: CommandResponse) -> Status {
    to_status(StoreError::Internal(format!("unexpected response {r:?}")))
}

#[tonic::async_trait]
impl Kv for EtcdFace {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let req = request.into_inner();
        validate_range(&req).map_err(|e| to_status(e.into()))?;
        if !req.serializable {
            self.node.read_barrier().await.map_err(to_status)?;
        }
        let r = self.node.range(&req).await.map_err(to_status)?;
        Ok(Response::new(RangeResponse {
            header: Some(self.node.header(r.revision)),
            kvs: r.kvs,
            more: r.more,
            count: r.count,
        }))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        self.check_size(&req)?;
        match self.write(Command::Put(req)).await? {
            CommandResponse::Put(mut r) => {
                r.header = self.header(r.header);
                Ok(Response::new(r))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        self.check_size(&req)?;
        match self.write(Command::DeleteRange(req)).await? {
            CommandResponse::DeleteRange(mut r) => {
                r.header = self.header(r.header);
                Ok(Response::new(r))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = request.into_inner();
        self.check_size(&req)?;
        match self.write(Command::Txn(req)).await? {
            CommandResponse::Txn(mut r) => {
                r.header = self.header(r.header);
                fill_txn_headers(&mut r);
                Ok(Response::new(r))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let req = request.into_inner();
        match self
            .write(Command::Compact {
                revision: req.revision,
            })
            .await?
        {
            CommandResponse::Compact(mut r) => {
                r.header = self.header(r.header);
                Ok(Response::new(r))
            }
            other => Err(unexpected(other)),
        }
    }
}

/// Nested responses carry headers too (etcd fills them with the txn's).
fn fill_txn_headers(r: &mut TxnResponse) {
    use flotilla_proto::etcdserverpb::response_op::Response as Op;
    let header = r.header;
    for op in &mut r.responses {
        match &mut op.response {
            Some(Op::ResponseRange(x)) => x.header = header,
            Some(Op::ResponsePut(x)) => x.header = header,
            Some(Op::ResponseDeleteRange(x)) => x.header = header,
            Some(Op::ResponseTxn(x)) => {
                x.header = header;
                fill_txn_headers(x);
            }
            None => {}
        }
    }
}
