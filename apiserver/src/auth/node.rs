//! The Node authorizer and NodeRestriction, as Kubernetes defines them, for what an agent
//! does: `system:node:N` reads what its pods need (a ConfigMap or Secret only by name, and
//! only while a pod bound to N refers to it), and writes only Node N (and its
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
    /// Allowed if a pod bound to the node refers to the object (a ConfigMap or Secret its
    /// environment names), as Kubernetes' graph-based Node authorizer decides.
    AllowReferenced,
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
        // The ConfigMaps and Secrets its pods use, one by name: never a list.
        ("", "configmaps" | "secrets", "") if verb == "get" => {
            return Verdict::AllowReferenced;
        }
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

/// Whether `pod` refers to `resource` (`configmaps`, `secrets`) `name`: in a container's
/// `env` (`configMapKeyRef`, `secretKeyRef`), `envFrom`, or a volume.
pub fn pod_refers(pod: &flotilla_proto::api::Pod, resource: &str, name: &str) -> bool {
    let Some(spec) = &pod.spec else {
        return false;
    };
    let volume = spec.volumes.iter().any(|v| {
        let sources = v.projected.iter().flat_map(|p| &p.sources);
        match resource {
            "configmaps" => {
                v.config_map.as_ref().is_some_and(|c| c.name == name)
                    || sources
                        .filter_map(|s| s.config_map.as_ref())
                        .any(|c| c.name == name)
            }
            "secrets" => {
                v.secret.as_ref().is_some_and(|c| c.secret_name == name)
                    || sources
                        .filter_map(|s| s.secret.as_ref())
                        .any(|c| c.name == name)
            }
            _ => false,
        }
    });
    volume
        || spec
            .containers
            .iter()
            .chain(&spec.init_containers)
            .any(|c| {
                let env =
                    c.env
                        .iter()
                        .filter_map(|e| e.value_from.as_ref())
                        .any(|f| match resource {
                            "configmaps" => f
                                .config_map_key_ref
                                .as_ref()
                                .is_some_and(|r| r.name == name),
                            "secrets" => f.secret_key_ref.as_ref().is_some_and(|r| r.name == name),
                            _ => false,
                        });
                let from = c.env_from.iter().any(|f| match resource {
                    "configmaps" => f.config_map_ref.as_ref().is_some_and(|r| r.name == name),
                    "secrets" => f.secret_ref.as_ref().is_some_and(|r| r.name == name),
                    _ => false,
                });
                env || from
            })
}
