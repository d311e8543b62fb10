//! etcd's Cluster service: membership while serving.

use flotilla_proto::etcdserverpb::cluster_server::Cluster;
use flotilla_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use tonic::{Request, Response, Status};

use super::{EtcdFace, strip_scheme, to_status, with_scheme};
use crate::errors::{InvalidRequest, StoreError};
use crate::node::{MemberInfo, StoreConfig};

/// Members of one cluster share its TLS settings (one CA, set up together), so this
/// member's own tell the scheme of every member's URLs.
fn to_member(m: &MemberInfo, config: &StoreConfig) -> Member {
    Member {
        id: m.id,
        name: m.member.name.clone(),
        peer_ur_ls: with_scheme(&m.member.peer_addr, config.peer_tls.is_some()),
        client_ur_ls: with_scheme(&m.member.client_addr, config.client_tls),
        is_learner: m.is_learner,
    }
}

impl EtcdFace {
    fn member_list(&self) -> Vec<Member> {
        self.node
            .members()
            .iter()
            .map(|m| to_member(m, self.node.config()))
            .collect()
    }

    fn known(&self, id: u64) -> Result<MemberInfo, Status> {
        self.node
            .members()
            .into_iter()
            .find(|m| m.id == id)
            .ok_or_else(|| to_status(StoreError::MemberNotFound(id)))
    }
}

fn one_peer_url(urls: &[String]) -> Result<String, Status> {
    match urls {
        [one] => Ok(strip_scheme(one).to_string()),
        _ => Err(to_status(
            InvalidRequest::field("peerURLs", "exactly one peer URL is supported").into(),
        )),
    }
}

#[tonic::async_trait]
impl Cluster for EtcdFace {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = request.into_inner();
        let addr = one_peer_url(&req.peer_ur_ls)?;
        let id = self
            .node
            .add_member(addr.clone(), req.is_learner)
            .await
            .map_err(to_status)?;
        Ok(Response::new(MemberAddResponse {
            header: Some(self.node.header(0)),
            member: Some(Member {
                id,
                name: String::new(),
                peer_ur_ls: with_scheme(&addr, self.node.config().peer_tls.is_some()),
                client_ur_ls: Vec::new(),
                is_learner: req.is_learner,
            }),
            members: self.member_list(),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        self.known(id)?;
        self.node.remove_member(id).await.map_err(to_status)?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(self.node.header(0)),
            members: self.member_list(),
        }))
    }

    async fn member_update(
        &self,
        request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = request.into_inner();
        let mut member = self.known(req.id)?.member;
        member.peer_addr = one_peer_url(&req.peer_ur_ls)?;
        self.node
            .update_member(req.id, member)
            .await
            .map_err(to_status)?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(self.node.header(0)),
            members: self.member_list(),
        }))
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(MemberListResponse {
            header: Some(self.node.header(0)),
            members: self.member_list(),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        self.known(id)?;
        self.node.promote_member(id).await.map_err(to_status)?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(self.node.header(0)),
            members: self.member_list(),
        }))
    }
}
