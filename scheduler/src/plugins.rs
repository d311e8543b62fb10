//! Filters (can this pod go on this node?) and scores (how good a home is it?).
//!
//! Filters run in a fixed order and stop at the first that says no; the reason it gives is
//! what the "0/N nodes available" explanation counts. Scores are 0..=100 each and summed.

use std::collections::BTreeMap;

use flotilla_proto::api::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use crate::info::{NodeInfo, PodInfo};

/// Why a node was filtered out. The text is what a person reads in the explanation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Unschedulable,
    NodeAffinity,
    Taint,
    HostPorts,
    InsufficientCpu,
    InsufficientMemory,
    TooManyPods,
}

impl Reason {
    pub fn text(self) -> &'static str {
        match self {
            Reason::NotReady => "node(s) were not ready",
            Reason::Unschedulable => "node(s) were unschedulable",
            Reason::NodeAffinity => "node(s) didn't match Pod's node affinity/selector",
            Reason::Taint => "node(s) had untolerated taint",
            Reason::HostPorts => "node(s) didn't have free ports for the requested pod ports",
            Reason::InsufficientCpu => "Insufficient cpu",
            Reason::InsufficientMemory => "Insufficient memory",
            Reason::TooManyPods => "Too many pods",
        }
    }
}

/// Runs every filter; on failure, the reasons (several only for resources, as in
/// Kubernetes: a node can be short of cpu and memory at once).
pub fn filter(pod: &PodInfo, node: &NodeInfo, reasons: &mut Vec<Reason>) -> bool {
    reasons.clear();
    if !node.ready {
        reasons.push(Reason::NotReady);
    } else if node.unschedulable && !tolerates_unschedulable(&pod.tolerations) {
        reasons.push(Reason::Unschedulable);
    } else if !matches_node_selector(pod, &node.labels) {
        reasons.push(Reason::NodeAffinity);
    } else if !tolerates_taints(&pod.tolerations, &node.taints) {
        reasons.push(Reason::Taint);
    } else if !ports_free(pod, node) {
        reasons.push(Reason::HostPorts);
    } else {
        fits_resources(pod, node, reasons);
    }
    reasons.is_empty()
}

/// Where a DaemonSet's pod belongs (Kubernetes' `NodeShouldRunDaemonPod`): whether a new
/// one should start on `node` (its nodeSelector and required node affinity match, and it
/// tolerates the node's NoSchedule and NoExecute taints), and whether one already there
/// may stay (the same, but NoSchedule taints do not count). Readiness, cordoning and free
/// resources do not count.
pub fn daemon_placement(
    pod: &flotilla_proto::api::Pod,
    node: &flotilla_proto::api::Node,
) -> (bool, bool) {
    let info = PodInfo::new(pod);
    let labels = node
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    let taints = node
        .spec
        .as_ref()
        .map(|s| s.taints.as_slice())
        .unwrap_or_default();
    if !matches_node_selector(&info, &labels) {
        return (false, false);
    }
    let no_execute: Vec<Taint> = taints
        .iter()
        .filter(|t| t.effect == "NoExecute")
        .cloned()
        .collect();
    (
        tolerates_taints(&info.tolerations, taints),
        tolerates_taints(&info.tolerations, &no_execute),
    )
}

/// Kubernetes lets a pod that tolerates the `unschedulable` taint onto a cordoned node.
fn tolerates_unschedulable(tolerations: &[Toleration]) -> bool {
    let taint = Taint {
        key: "node.kubernetes.io/unschedulable".into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    };
    tolerations.iter().any(|t| tolerates(t, &taint))
}

/// nodeSelector (every label equal) and required node affinity (any term, every
/// expression in it).
pub fn matches_node_selector(pod: &PodInfo, labels: &BTreeMap<String, String>) -> bool {
    if !pod
        .node_selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    match &pod.affinity {
        None => true,
        Some(terms) => terms.iter().any(|t| term_matches(t, labels)),
    }
}

/// A term with no expressions matches nothing, as in Kubernetes.
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>) -> bool {
    !term.match_expressions.is_empty()
        && term
            .match_expressions
            .iter()
            .all(|r| requirement_matches(r, labels))
}

fn requirement_matches(r: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&r.key);
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| r.values.contains(v)),
        "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                r.values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// Every NoSchedule and NoExecute taint is tolerated (PreferNoSchedule only scores).
pub fn tolerates_taints(tolerations: &[Toleration], taints: &[Taint]) -> bool {
    taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| tolerations.iter().any(|t| tolerates(t, taint)))
}

/// Kubernetes' ToleratesTaint: effect empty or equal; key empty (with Exists) or equal;
/// Exists matches any value, Equal (the default) needs the same value.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if !t.effect.is_empty() && t.effect != taint.effect {
        return false;
    }
    if !t.key.is_empty() && t.key != taint.key {
        return false;
    }
    match t.operator.as_str() {
        "Exists" => true,
        "" | "Equal" => !t.key.is_empty() && t.value == taint.value,
        _ => false,
    }
}

fn ports_free(pod: &PodInfo, node: &NodeInfo) -> bool {
    pod.host_ports
        .iter()
        .all(|p| !node.host_ports.iter().any(|q| p.conflicts(q)))
}

/// Compared as `want > has - used`: `used + want` overflows for the largest quantities.
fn fits_resources(pod: &PodInfo, node: &NodeInfo, reasons: &mut Vec<Reason>) {
    let (want, used, has) = (&pod.requests, &node.requested, &node.allocatable);
    if want.pods > has.pods.saturating_sub(used.pods) {
        reasons.push(Reason::TooManyPods);
    }
    if want.milli_cpu > 0 && want.milli_cpu > has.milli_cpu.saturating_sub(used.milli_cpu) {
        reasons.push(Reason::InsufficientCpu);
    }
    if want.memory > 0 && want.memory > has.memory.saturating_sub(used.memory) {
        reasons.push(Reason::InsufficientMemory);
    }
}

/// Free share of cpu and memory after placing the pod, averaged: emptier nodes score
/// higher, so load spreads.
pub fn least_allocated(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let free = |requested: i64, want: i64, capacity: i64| {
        if capacity <= 0 {
            return 0;
        }
        let used = requested.saturating_add(want);
        if used > capacity {
            0
        } else {
            // In 128 bits: a capacity near 2^63 - 1 (a quantity as large as Kubernetes
            // allows) times 100 does not fit 64.
            ((i128::from(capacity - used) * 100) / i128::from(capacity)) as i64
        }
    };
    let cpu = free(
        node.scoring_requested.milli_cpu,
        pod.scoring_requests.milli_cpu,
        node.allocatable.milli_cpu,
    );
    let mem = free(
        node.scoring_requested.memory,
        pod.scoring_requests.memory,
        node.allocatable.memory,
    );
    (cpu + mem) / 2
}

/// Cpu and memory used in the same proportion score higher (Kubernetes'
/// BalancedAllocation: 100 × (1 − the standard deviation of the two fractions)).
pub fn balanced_allocation(pod: &PodInfo, node: &NodeInfo) -> i64 {
    let fraction = |requested: i64, want: i64, capacity: i64| {
        if capacity <= 0 {
            1.0
        } else {
            (requested.saturating_add(want) as f64 / capacity as f64).min(1.0)
        }
    };
    let cpu = fraction(
        node.scoring_requested.milli_cpu,
        pod.scoring_requests.milli_cpu,
        node.allocatable.milli_cpu,
    );
    let mem = fraction(
        node.scoring_requested.memory,
        pod.scoring_requests.memory,
        node.allocatable.memory,
    );
    let std = (cpu - mem).abs() / 2.0;
    ((1.0 - std) * 100.0) as i64
}

/// Spreading the pods of one owner: a node with fewer of them scores higher, relative to
/// the node with the most among the candidates (`max_on_any`).
pub fn spread(pod: &PodInfo, node: &NodeInfo, max_on_any: u32) -> i64 {
    let Some(owner) = &pod.owner else {
        return 100;
    };
    if max_on_any == 0 {
        return 100;
    }
    let here = node.owners.get(owner).copied().unwrap_or(0);
    i64::from(max_on_any - here.min(max_on_any)) * 100 / i64::from(max_on_any)
}

/// How many feasible nodes to look for before scoring, as kube-scheduler's
/// percentageOfNodesToScore: all of a small cluster; on a large one an adaptive share
/// (50% minus 1% per 125 nodes, at least 5%), never fewer than 100. `percentage` > 0
/// fixes the share instead.
pub fn feasible_nodes_to_find(nodes: usize, percentage: u32) -> usize {
    const MIN_FEASIBLE: usize = 100;
    if nodes < MIN_FEASIBLE || percentage >= 100 {
        return nodes;
    }
    let pct = if percentage == 0 {
        (50 - (nodes / 125) as i64).max(5) as usize
    } else {
        percentage as usize
    };
    (nodes * pct / 100).max(MIN_FEASIBLE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::info::{HostPort, PodUsage, Resources};

    fn node() -> NodeInfo {
        NodeInfo {
            name: "n1".into(),
            present: true,
            ready: true,
            allocatable: Resources {
                milli_cpu: 4000,
                memory: 8 << 30,
                pods: 110,
            },
            ..Default::default()
        }
    }

    fn pod(cpu: i64, mem: i64) -> PodInfo {
        let requests = Resources {
            milli_cpu: cpu,
            memory: mem,
            pods: 1,
        };
        PodInfo {
            key: "default/p".into(),
            requests,
            scoring_requests: requests,
            ..Default::default()
        }
    }

    fn reasons(p: &PodInfo, n: &NodeInfo) -> Vec<Reason> {
        let mut r = Vec::new();
        filter(p, n, &mut r);
        r
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: value.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        Toleration {
            key: key.into(),
            operator: op.into(),
            value: value.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn ready_and_schedulable_nodes_only() {
        let p = pod(100, 0);
        let mut n = node();
        assert!(reasons(&p, &n).is_empty());
        n.ready = false;
        assert_eq!(reasons(&p, &n), [Reason::NotReady]);
        n.ready = true;
        n.unschedulable = true;
        assert_eq!(reasons(&p, &n), [Reason::Unschedulable]);
        let mut tolerant = p.clone();
        tolerant.tolerations = vec![toleration(
            "node.kubernetes.io/unschedulable",
            "Exists",
            "",
            "NoSchedule",
        )];
        assert!(reasons(&tolerant, &n).is_empty());
    }

    #[test]
    fn resources_fit_counts_what_is_placed() {
        let mut n = node();
        assert!(reasons(&pod(4000, 8 << 30), &n).is_empty());
        assert_eq!(reasons(&pod(4001, 8 << 30), &n), [Reason::InsufficientCpu]);
        n.add_pod(&PodUsage::from(&pod(3000, 7 << 30)));
        assert_eq!(
            reasons(&pod(1001, (1 << 30) + 1), &n),
            [Reason::InsufficientCpu, Reason::InsufficientMemory]
        );
        assert!(reasons(&pod(1000, 1 << 30), &n).is_empty());
        // Removing the pod gives the room back.
        n.remove_pod(&PodUsage::from(&pod(3000, 7 << 30)));
        assert!(reasons(&pod(4000, 8 << 30), &n).is_empty());
    }

    #[test]
    fn the_largest_quantities_neither_overflow_nor_fit_twice() {
        // `memory: 9Ei` and `cpu: 9E` count as 2^63 - 1, as Kubernetes caps them.
        let huge = |n: &mut NodeInfo| {
            n.allocatable.milli_cpu = i64::MAX;
            n.allocatable.memory = i64::MAX;
        };
        let mut n = node();
        huge(&mut n);
        let p = pod(i64::MAX, i64::MAX);
        assert!(reasons(&p, &n).is_empty());
        assert_eq!(least_allocated(&p, &n), 0);
        assert_eq!(least_allocated(&pod(0, 0), &n), 100);
        assert_eq!(balanced_allocation(&p, &n), 100);
        // Bound twice (a nodeName set by hand bypasses the filter): no overflow.
        n.add_pod(&PodUsage::from(&p));
        n.add_pod(&PodUsage::from(&p));
        assert_eq!(n.requested.memory, i64::MAX);
        assert_eq!(
            reasons(&p, &n),
            [Reason::InsufficientCpu, Reason::InsufficientMemory]
        );
        assert_eq!(least_allocated(&p, &n), 0);
    }

    #[test]
    fn pod_count_is_a_resource() {
        let mut n = node();
        n.allocatable.pods = 2;
        n.add_pod(&PodUsage::from(&pod(0, 0)));
        assert!(reasons(&pod(0, 0), &n).is_empty());
        n.add_pod(&PodUsage::from(&pod(0, 0)));
        assert_eq!(reasons(&pod(0, 0), &n), [Reason::TooManyPods]);
    }

    #[test]
    fn zero_request_pods_fit_a_full_node() {
        let mut n = node();
        n.add_pod(&PodUsage::from(&pod(4000, 8 << 30)));
        assert!(reasons(&pod(0, 0), &n).is_empty());
        assert_eq!(reasons(&pod(1, 0), &n), [Reason::InsufficientCpu]);
    }

    #[test]
    fn node_selector_needs_every_label() {
        let mut p = pod(0, 0);
        p.node_selector = [("disk".to_string(), "ssd".to_string())].into();
        let mut n = node();
        assert_eq!(reasons(&p, &n), [Reason::NodeAffinity]);
        n.labels.insert("disk".into(), "hdd".into());
        assert_eq!(reasons(&p, &n), [Reason::NodeAffinity]);
        n.labels.insert("disk".into(), "ssd".into());
        assert!(reasons(&p, &n).is_empty());
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn with_affinity(terms: Vec<Vec<NodeSelectorRequirement>>) -> PodInfo {
        let mut p = pod(0, 0);
        p.affinity = Some(
            terms
                .into_iter()
                .map(|e| NodeSelectorTerm {
                    match_expressions: e,
                })
                .collect(),
        );
        p
    }

    #[test]
    fn required_affinity_operators() {
        let labels: BTreeMap<String, String> = [
            ("zone".to_string(), "a".to_string()),
            ("cores".to_string(), "8".to_string()),
        ]
        .into();
        let m = |r: NodeSelectorRequirement| {
            matches_node_selector(&with_affinity(vec![vec![r]]), &labels)
        };
        assert!(m(req("zone", "In", &["a", "b"])));
        assert!(!m(req("zone", "In", &["b"])));
        assert!(!m(req("missing", "In", &["a"])));
        assert!(m(req("zone", "NotIn", &["b"])));
        assert!(!m(req("zone", "NotIn", &["a"])));
        assert!(m(req("missing", "NotIn", &["a"])));
        assert!(m(req("zone", "Exists", &[])));
        assert!(!m(req("missing", "Exists", &[])));
        assert!(m(req("missing", "DoesNotExist", &[])));
        assert!(!m(req("zone", "DoesNotExist", &[])));
        assert!(m(req("cores", "Gt", &["4"])));
        assert!(!m(req("cores", "Lt", &["4"])));
        assert!(!m(req("zone", "Bogus", &["a"])));
    }

    #[test]
    fn affinity_terms_are_ored_expressions_anded() {
        let labels: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        let both = with_affinity(vec![vec![
            req("zone", "In", &["a"]),
            req("disk", "Exists", &[]),
        ]]);
        assert!(!matches_node_selector(&both, &labels));
        let either = with_affinity(vec![
            vec![req("disk", "Exists", &[])],
            vec![req("zone", "In", &["a"])],
        ]);
        assert!(matches_node_selector(&either, &labels));
        // An empty term list, or an empty term, matches nothing.
        assert!(!matches_node_selector(&with_affinity(vec![]), &labels));
        assert!(!matches_node_selector(
            &with_affinity(vec![vec![]]),
            &labels
        ));
    }

    #[test]
    fn taints_need_tolerations() {
        let taints = [taint("dedicated", "gpu", "NoSchedule")];
        assert!(!tolerates_taints(&[], &taints));
        let eq = toleration("dedicated", "Equal", "gpu", "NoSchedule");
        assert!(tolerates_taints(&[eq], &taints));
        let wrong_value = toleration("dedicated", "Equal", "cpu", "NoSchedule");
        assert!(!tolerates_taints(&[wrong_value], &taints));
        let exists = toleration("dedicated", "Exists", "", "");
        assert!(tolerates_taints(&[exists], &taints));
        let wrong_effect = toleration("dedicated", "Exists", "", "NoExecute");
        assert!(!tolerates_taints(&[wrong_effect], &taints));
        let everything = toleration("", "Exists", "", "");
        assert!(tolerates_taints(&[everything], &taints));
        // An empty key with Equal tolerates nothing.
        let empty_eq = toleration("", "Equal", "", "");
        assert!(!tolerates_taints(
            &[empty_eq],
            &[taint("k", "", "NoSchedule")]
        ));
        // NoExecute filters too; PreferNoSchedule does not.
        assert!(!tolerates_taints(&[], &[taint("k", "v", "NoExecute")]));
        assert!(tolerates_taints(
            &[],
            &[taint("k", "v", "PreferNoSchedule")]
        ));
        let mut n = node();
        n.taints = taints.to_vec();
        assert_eq!(reasons(&pod(0, 0), &n), [Reason::Taint]);
    }

    #[test]
    fn host_ports_conflict() {
        let port = |ip: &str, port: i32, proto: &str| HostPort {
            protocol: proto.into(),
            ip: ip.into(),
            port,
        };
        let mut n = node();
        let mut placed = pod(0, 0);
        placed.host_ports = vec![port("10.0.0.1", 80, "TCP")];
        n.add_pod(&PodUsage::from(&placed));
        let mut p = pod(0, 0);
        p.host_ports = vec![port("10.0.0.1", 80, "TCP")];
        assert_eq!(reasons(&p, &n), [Reason::HostPorts]);
        p.host_ports = vec![port("", 80, "TCP")];
        assert_eq!(reasons(&p, &n), [Reason::HostPorts]);
        p.host_ports = vec![port("10.0.0.2", 80, "TCP")];
        assert!(reasons(&p, &n).is_empty());
        p.host_ports = vec![port("10.0.0.1", 80, "UDP")];
        assert!(reasons(&p, &n).is_empty());
        p.host_ports = vec![port("10.0.0.1", 81, "TCP")];
        assert!(reasons(&p, &n).is_empty());
        n.remove_pod(&PodUsage::from(&placed));
        p.host_ports = vec![port("", 80, "TCP")];
        assert!(reasons(&p, &n).is_empty());
    }

    #[test]
    fn least_allocated_prefers_emptier_nodes() {
        let p = pod(1000, 1 << 30);
        let empty = node();
        let mut busy = node();
        busy.add_pod(&PodUsage::from(&pod(2000, 4 << 30)));
        assert!(least_allocated(&p, &empty) > least_allocated(&p, &busy));
        // 3000m of 4000m free → 75; 7 GiB of 8 → 87; average 81.
        assert_eq!(least_allocated(&p, &empty), 81);
    }

    #[test]
    fn balanced_allocation_prefers_even_use() {
        let mut cpu_heavy = node();
        cpu_heavy.add_pod(&PodUsage::from(&pod(3000, 0)));
        let even = node();
        let p = pod(1000, 2 << 30);
        assert!(balanced_allocation(&p, &even) > balanced_allocation(&p, &cpu_heavy));
        // Same fraction of both → 100.
        assert_eq!(balanced_allocation(&pod(2000, 4 << 30), &node()), 100);
    }

    #[test]
    fn spread_prefers_nodes_with_fewer_siblings() {
        let mut p = pod(0, 0);
        p.owner = Some("rs-1".into());
        let mut crowded = node();
        crowded.add_pod(&PodUsage::from(&p));
        crowded.add_pod(&PodUsage::from(&p));
        let mut one = node();
        one.add_pod(&PodUsage::from(&p));
        let none = node();
        assert_eq!(spread(&p, &crowded, 2), 0);
        assert_eq!(spread(&p, &one, 2), 50);
        assert_eq!(spread(&p, &none, 2), 100);
        // Pods without an owner don't care.
        assert_eq!(spread(&pod(0, 0), &crowded, 2), 100);
    }

    #[test]
    fn sampling_matches_kube_scheduler() {
        assert_eq!(feasible_nodes_to_find(50, 0), 50);
        assert_eq!(feasible_nodes_to_find(100, 0), 100);
        // 1,000 nodes: 50 - 8 = 42%.
        assert_eq!(feasible_nodes_to_find(1000, 0), 420);
        // 5,000 nodes: 50 - 40 = 10%.
        assert_eq!(feasible_nodes_to_find(5000, 0), 500);
        // 10,000 nodes: floor at 5%.
        assert_eq!(feasible_nodes_to_find(10_000, 0), 500);
        assert_eq!(feasible_nodes_to_find(5000, 100), 5000);
        assert_eq!(feasible_nodes_to_find(300, 10), 100);
    }
}
