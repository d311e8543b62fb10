//! What the scheduler knows of a pod and of a node, computed once from the API objects.

use std::collections::{BTreeMap, HashMap};

use flotilla_proto::api::quantity::{parse_bytes, parse_cpu_millis};
use flotilla_proto::api::{Node, NodeSelectorTerm, Pod, Resource, Taint, Toleration};

/// Pods a node takes when its Node object does not say (Kubernetes' kubelet default).
pub const DEFAULT_MAX_PODS: i64 = 110;
/// What scoring assumes a container without requests uses (Kubernetes' defaults), so that
/// pods without requests still spread instead of piling onto one "empty" node.
pub const DEFAULT_MILLI_CPU: i64 = 100;
pub const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;

/// Cpu, memory and a pod slot: what a pod asks for or a node offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub pods: i64,
}

impl Resources {
    /// Saturating: a quantity as large as Kubernetes allows (2^63 − 1) must not overflow.
    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
        self.pods = self.pods.saturating_add(other.pods);
    }

    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_sub(other.milli_cpu);
        self.memory = self.memory.saturating_sub(other.memory);
        self.pods = self.pods.saturating_sub(other.pods);
    }
}

/// A host port a pod's container asks for: conflicts with the same protocol and port on
/// the same address, or on any address if either side binds all of them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: String,
    pub ip: String,
    pub port: i32,
}

impl HostPort {
    fn wildcard(&self) -> bool {
        self.ip.is_empty() || self.ip == "0.0.0.0" || self.ip == "::"
    }

    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.wildcard() || other.wildcard())
    }
}

/// The parts of a pod that scheduling looks at.
#[derive(Clone, Debug, Default)]
pub struct PodInfo {
    /// `namespace/name`.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    pub priority: i32,
    /// What the pod asks for (a pod slot included).
    pub requests: Resources,
    /// The same with the scoring defaults for containers that ask for nothing.
    pub scoring_requests: Resources,
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: `None` matches every node.
    pub affinity: Option<Vec<NodeSelectorTerm>>,
    pub tolerations: Vec<Toleration>,
    pub host_ports: Vec<HostPort>,
    /// The uid of the controller that owns the pod, for spreading.
    pub owner: Option<String>,
    /// The condition `PodScheduled` the pod carries, as (status, message).
    pub scheduled_condition: Option<(String, String)>,
}

impl PodInfo {
    pub fn new(pod: &Pod) -> Self {
        let meta = pod.metadata.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut requests = Resources {
            pods: 1,
            ..Default::default()
        };
        let mut scoring = requests;
        let mut host_ports = Vec::new();
        for c in &spec.containers {
            let (cpu, mem) = container_requests(c);
            requests.add(&Resources {
                milli_cpu: cpu.unwrap_or(0),
                memory: mem.unwrap_or(0),
                pods: 0,
            });
            scoring.add(&Resources {
                milli_cpu: cpu.unwrap_or(DEFAULT_MILLI_CPU),
                memory: mem.unwrap_or(DEFAULT_MEMORY),
                pods: 0,
            });
            for p in &c.ports {
                if p.host_port > 0 {
                    host_ports.push(HostPort {
                        protocol: if p.protocol.is_empty() {
                            "TCP".into()
                        } else {
                            p.protocol.clone()
                        },
                        ip: p.host_ip.clone(),
                        port: p.host_port,
                    });
                }
            }
        }
        // Init containers run one at a time before the others: the pod needs the largest of
        // them or the sum of the rest, whichever is more.
        for c in &spec.init_containers {
            let (cpu, mem) = container_requests(c);
            requests.milli_cpu = requests.milli_cpu.max(cpu.unwrap_or(0));
            requests.memory = requests.memory.max(mem.unwrap_or(0));
            scoring.milli_cpu = scoring.milli_cpu.max(cpu.unwrap_or(0));
            scoring.memory = scoring.memory.max(mem.unwrap_or(0));
        }
        let affinity = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|s| s.node_selector_terms.clone());
        let owner = meta
            .owner_references
            .iter()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone());
        let scheduled_condition = pod.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.r#type == "PodScheduled")
                .map(|c| (c.status.clone(), c.message.clone()))
        });
        Self {
            key: format!("{}/{}", meta.namespace, meta.name),
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
            resource_version: meta.resource_version,
            priority: spec.priority.unwrap_or(0),
            requests,
            scoring_requests: scoring,
            node_selector: spec.node_selector,
            affinity,
            tolerations: spec.tolerations,
            host_ports,
            owner,
            scheduled_condition,
        }
    }
}

/// A container's cpu (millicores) and memory (bytes) requests; a limit without a request
/// counts as the request, as in Kubernetes.
fn container_requests(c: &flotilla_proto::api::Container) -> (Option<i64>, Option<i64>) {
    let Some(r) = &c.resources else {
        return (None, None);
    };
    let get = |name: &str| r.requests.get(name).or_else(|| r.limits.get(name));
    let cpu = get("cpu").and_then(|q| parse_cpu_millis(q).ok());
    let mem = get("memory").and_then(|q| parse_bytes(q).ok());
    (cpu, mem)
}

/// The namespace/name key of a pod object.
pub fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace(), pod.name())
}

/// A node as the scheduler sees it: what it offers and what is already placed on it,
/// assumed pods included.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub name: String,
    /// False for a node the cache knows only because pods are bound to it.
    pub present: bool,
    pub labels: BTreeMap<String, String>,
    pub allocatable: Resources,
    pub ready: bool,
    pub unschedulable: bool,
    pub taints: Vec<Taint>,
    /// Sum of the requests of the pods placed here.
    pub requested: Resources,
    /// The same with scoring defaults.
    pub scoring_requested: Resources,
    pub host_ports: Vec<HostPort>,
    /// Pods placed here per owning controller uid.
    pub owners: HashMap<String, u32>,
}

impl NodeInfo {
    pub fn placeholder(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Takes the node's description from its API object, keeping what is placed on it.
    pub fn set_node(&mut self, node: &Node) {
        let meta = node.metadata.clone().unwrap_or_default();
        let spec = node.spec.clone().unwrap_or_default();
        let status = node.status.clone().unwrap_or_default();
        let get = |name: &str| {
            status
                .allocatable
                .get(name)
                .or_else(|| status.capacity.get(name))
        };
        self.name = meta.name;
        self.present = true;
        self.labels = meta.labels;
        self.allocatable = Resources {
            milli_cpu: get("cpu")
                .and_then(|q| parse_cpu_millis(q).ok())
                .unwrap_or(0),
            memory: get("memory").and_then(|q| parse_bytes(q).ok()).unwrap_or(0),
            pods: get("pods")
                .and_then(|q| q.parse().ok())
                .unwrap_or(DEFAULT_MAX_PODS),
        };
        self.ready = status
            .conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == "True");
        self.unschedulable = spec.unschedulable;
        self.taints = spec.taints;
    }

    pub fn add_pod(&mut self, pod: &PodUsage) {
        self.requested.add(&pod.requests);
        self.scoring_requested.add(&pod.scoring_requests);
        self.host_ports.extend(pod.host_ports.iter().cloned());
        if let Some(o) = &pod.owner {
            *self.owners.entry(o.clone()).or_default() += 1;
        }
    }

    pub fn remove_pod(&mut self, pod: &PodUsage) {
        self.requested.sub(&pod.requests);
        self.scoring_requested.sub(&pod.scoring_requests);
        for p in &pod.host_ports {
            if let Some(i) = self.host_ports.iter().position(|q| q == p) {
                self.host_ports.swap_remove(i);
            }
        }
        if let Some(o) = &pod.owner
            && let Some(n) = self.owners.get_mut(o)
        {
            *n -= 1;
            if *n == 0 {
                self.owners.remove(o);
            }
        }
    }

    /// Nothing refers to this entry any more.
    pub fn is_unused(&self) -> bool {
        !self.present && self.requested.pods == 0
    }
}

/// What one placed pod takes from its node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodUsage {
    pub requests: Resources,
    pub scoring_requests: Resources,
    pub host_ports: Vec<HostPort>,
    pub owner: Option<String>,
}

impl From<&PodInfo> for PodUsage {
    fn from(p: &PodInfo) -> Self {
        Self {
            requests: p.requests,
            scoring_requests: p.scoring_requests,
            host_ports: p.host_ports.clone(),
            owner: p.owner.clone(),
        }
    }
}
