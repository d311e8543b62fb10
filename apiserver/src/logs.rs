//! Container logs: the API server finds the pod's node and asks its agent, whose address the
//! agent publishes on its Node object (annotation `flotilla.io/agent-endpoint`), then
//! passes the agent's stream (and its errors) through.

use std::pin::Pin;
use std::time::Duration;

use flotilla_proto::api::{LogChunk, Node, Pod, PodLogsRequest};
use flotilla_proto::flotilla_agent_v1::agent_client::AgentClient;
use tokio_stream::Stream;
use tonic::Status;

use crate::errors::{ApiError, ApiResult};
use crate::registry::{Api, effective_namespace};

/// The annotation on a Node with its agent's address (`HOST:PORT`).
pub const AGENT_ENDPOINT: &str = "flotilla.io/agent-endpoint";

pub type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

impl Api {
    pub async fn logs(&self, mut req: PodLogsRequest) -> ApiResult<LogStream> {
        req.namespace = effective_namespace::<Pod>(&req.namespace);
        if req.name.is_empty() {
            return Err(ApiError::invalid("name", "required: the pod"));
        }
        if req.tail_lines < 0 {
            return Err(ApiError::invalid(
                "tailLines",
                format!("must be >= 0, got {}", req.tail_lines),
            ));
        }
        let pod: Pod = self.get(&req.namespace, &req.name).await?;
        let spec = pod.spec.clone().unwrap_or_default();
        let names: Vec<&str> = spec
            .init_containers
            .iter()
            .chain(spec.containers.iter())
            .map(|c| c.name.as_str())
            .collect();
        if req.container.is_empty() {
            if spec.containers.len() != 1 || !spec.init_containers.is_empty() {
                return Err(ApiError::invalid(
                    "container",
                    format!(
                        "pod {:?} has several containers: name one of {}",
                        req.name,
                        names.join(", ")
                    ),
                ));
            }
            req.container = spec.containers[0].name.clone();
        } else if !names.contains(&req.container.as_str()) {
            return Err(ApiError::invalid(
                "container",
                format!(
                    "pod {:?} has no container {:?} (it has {})",
                    req.name,
                    req.container,
                    names.join(", ")
                ),
            ));
        }
        if spec.node_name.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "pod {:?} is not on a node yet: no logs",
                req.name
            )));
        }
        let node: Node = self.get("", &spec.node_name).await?;
        let Some(endpoint) = node
            .metadata
            .as_ref()
            .and_then(|m| m.annotations.get(AGENT_ENDPOINT))
            .cloned()
        else {
            return Err(ApiError::Unavailable(format!(
                "node {:?} publishes no agent address (annotation {AGENT_ENDPOINT}): is its agent running?",
                spec.node_name
            )));
        };
        req.uid = pod.metadata.map(|m| m.uid).unwrap_or_default();
        let unreachable = |e: String| {
            ApiError::Unavailable(format!(
                "cannot reach the agent of node {:?} at {endpoint}: {e}",
                spec.node_name
            ))
        };
        // An agent serving TLS publishes an https:// endpoint; a member that dials TLS
        // never talks to a plaintext one.
        if self.agent_dialer().is_tls() && !endpoint.starts_with("https://") {
            return Err(unreachable(
                "it serves plaintext and this cluster uses TLS: start the agent with its \
                 node's kubeconfig (docs/security.md)"
                    .into(),
            ));
        }
        let channel = self
            .agent_dialer()
            .endpoint(&endpoint)
            .map_err(|e| unreachable(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| unreachable(flotilla_transport::source_chain(&e)))?;
        let stream = AgentClient::new(channel)
            .logs(req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unavailable => unreachable(s.message().to_string()),
                tonic::Code::NotFound => ApiError::FailedPrecondition(s.message().to_string()),
                tonic::Code::InvalidArgument => ApiError::invalid("container", s.message()),
                _ => ApiError::Internal(format!("the agent answered: {}", s.message())),
            })?;
        Ok(Box::pin(stream.into_inner()))
    }
}
