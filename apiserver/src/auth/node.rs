//! The Node authorizer and NodeRestriction, as Kubernetes defines them, for what an agent
//! does: `system:node:N` reads what its pods need, and writes only Node N (and its
//! status), its own Lease, the status of pods bound to N (and their deletion, which ends
//! a pod's graceful termination), and events. Nothing else: no other node, no other
//! node's pods, no Deployments, no etcd face.

use super::Attributes;

pub use flotilla_proto::api::NODE_LEASE_NAMESPACE as LEASE_NAMESPACE;

/// What the Node authorizer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed for pods whose stored `spec.nodeName` is the node (checked at the write).
    AllowOwnPods,
    Deny,
}

/// The decision for node `node` asking `attrs`.
pub fn authorize(node: &str, attrs: &Attributes) -> Verdict {
    let verb = attrs.verb.as_str();
    let read = matches!(verb, "get" | "list" | "watch");
    let own = attrs.name == node;
    let allowed = match (
        attrs.api_group.as_str(),
        attrs.resource.as_str(),
        attrs.subresource.as_str(),
    ) {
        // What the agent reads: the pods (its informer lists the pods bound to it), nodes,
        // the Services and Endpoints its pods' environment names, namespaces.
        ("", "pods" | "nodes" | "services" | "endpoints" | "namespaces", "") if read => true,
        // Its own Node: registered, updated, its status written; never another's.
        ("", "nodes", "" | "status") => {
            own && matches!(verb, "get" | "create" | "update" | "patch" | "delete")
        }
        // The status of its pods, and their deletion once they stopped.
        ("", "pods", "status") if matches!(verb, "update" | "patch") => {
            return Verdict::AllowOwnPods;
        }
        ("", "pods", "") if verb == "delete" => return Verdict::AllowOwnPods,
        // Its own Lease: the heartbeat.
        ("coordination.k8s.io", "leases", "") => {
            own && attrs.namespace == LEASE_NAMESPACE
                && matches!(verb, "get" | "create" | "update" | "patch" | "delete")
        }
        // Events about what it runs.
        ("" | "events.k8s.io", "events", "") => {
            matches!(verb, "create" | "update" | "patch")
        }
        _ => false,
    };
    if allowed {
        Verdict::Allow
    } else {
        Verdict::Deny
    }
}
