//! The node cache: every node with what is placed on it, bound pods and pods *assumed* onto
//! a node while their bind is in flight, so the scheduler counts them at once and never
//! places two pods into the same room.

use std::collections::{BTreeMap, HashMap};

use flotilla_proto::api::Node;

use crate::info::{NodeInfo, PodInfo, PodUsage};
use crate::plugins::{self, Reason};

/// Where a pod is counted.
#[derive(Clone, Debug)]
struct Placement {
    node: String,
    usage: PodUsage,
    /// Assumed by this scheduler, not yet seen bound in the API.
    assumed: bool,
}

/// What scheduling one pod decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Assumed onto this node; bind it.
    Bind(String),
    /// Fits nowhere; the message explains why, node by node.
    Unschedulable(String),
}

#[derive(Debug, Default)]
pub struct Cache {
    nodes: Vec<NodeInfo>,
    index: HashMap<String, usize>,
    /// Nodes with a Node object (the rest are placeholders for pods bound to unknown nodes).
    present: usize,
    placements: HashMap<String, Placement>,
    /// Where the next search for feasible nodes starts, so that sampling visits every node
    /// in turn.
    next_start: usize,
    /// kube-scheduler's percentageOfNodesToScore (0: adaptive).
    pub percentage_of_nodes_to_score: u32,
}

impl Cache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn node_count(&self) -> usize {
        self.present
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.index
            .get(name)
            .map(|&i| &self.nodes[i])
            .filter(|n| n.present)
    }

    fn slot(&mut self, name: &str) -> usize {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        self.nodes.push(NodeInfo::placeholder(name));
        let i = self.nodes.len() - 1;
        self.index.insert(name.to_string(), i);
        i
    }

    /// Adds or updates a node; returns true when it may now take pods it could not take
    /// before (new, became ready or schedulable, more room, fewer taints, new labels).
    pub fn upsert_node(&mut self, node: &Node) -> bool {
        let name = node
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("");
        let i = self.slot(name);
        let n = &mut self.nodes[i];
        let before = n.clone();
        n.set_node(node);
        if !before.present {
            self.present += 1;
            return true;
        }
        let a = &n.allocatable;
        let b = &before.allocatable;
        (n.ready && !before.ready)
            || (before.unschedulable && !n.unschedulable)
            || a.milli_cpu > b.milli_cpu
            || a.memory > b.memory
            || a.pods > b.pods
            || n.taints.len() < before.taints.len()
            || n.labels != before.labels
    }

    pub fn remove_node(&mut self, name: &str) {
        let Some(&i) = self.index.get(name) else {
            return;
        };
        let n = &mut self.nodes[i];
        if n.present {
            n.present = false;
            self.present -= 1;
        }
        if n.is_unused() {
            self.drop_slot(i);
        }
    }

    fn drop_slot(&mut self, i: usize) {
        let gone = self.nodes.swap_remove(i);
        self.index.remove(&gone.name);
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.name.clone(), i);
        }
    }

    /// Counts a pod on `node`, moving it from wherever it was counted before. `assumed`
    /// marks a placement this scheduler made and is still binding.
    fn place(&mut self, key: &str, node: &str, usage: PodUsage, assumed: bool) {
        self.unplace(key);
        let i = self.slot(node);
        self.nodes[i].add_pod(&usage);
        self.placements.insert(
            key.to_string(),
            Placement {
                node: node.to_string(),
                usage,
                assumed,
            },
        );
    }

    /// Stops counting a pod anywhere.
    fn unplace(&mut self, key: &str) -> Option<Placement> {
        let p = self.placements.remove(key)?;
        if let Some(&i) = self.index.get(&p.node) {
            self.nodes[i].remove_pod(&p.usage);
            if self.nodes[i].is_unused() {
                self.drop_slot(i);
            }
        }
        Some(p)
    }

    /// The API shows the pod bound to `node` (and not finished): count it there. This
    /// confirms an assumption, or corrects it when someone else bound the pod elsewhere.
    /// True when that correction gave room back somewhere (the pod had been counted on
    /// another node, or as asking for more), so pods waiting for room may fit now.
    pub fn pod_bound(&mut self, pod: &PodInfo, node: &str) -> bool {
        let usage = PodUsage::from(pod);
        if let Some(p) = self.placements.get_mut(&pod.key)
            && p.node == node
            && p.usage == usage
        {
            p.assumed = false;
            return false;
        }
        let freed = self.placements.contains_key(&pod.key);
        self.place(&pod.key, node, usage, false);
        freed
    }

    /// The pod is gone or finished: its room is free again.
    pub fn pod_gone(&mut self, key: &str) -> bool {
        self.unplace(key).is_some()
    }

    pub fn is_assumed(&self, key: &str) -> bool {
        self.placements.get(key).is_some_and(|p| p.assumed)
    }

    pub fn is_placed(&self, key: &str) -> bool {
        self.placements.contains_key(key)
    }

    /// The bind of an assumed pod did not happen: forget the assumption (only if it is still
    /// one: the API may already have shown where the pod really went).
    pub fn forget_assumed(&mut self, key: &str) -> bool {
        if self.is_assumed(key) {
            self.unplace(key);
            true
        } else {
            false
        }
    }

    /// Finds the best node for `pod` and assumes it there, or explains why none fits.
    pub fn schedule(&mut self, pod: &PodInfo) -> Decision {
        let total = self.nodes.len();
        if self.present == 0 {
            return Decision::Unschedulable("0/0 nodes available: no nodes registered".into());
        }
        let want = plugins::feasible_nodes_to_find(self.present, self.percentage_of_nodes_to_score);
        let mut feasible: Vec<usize> = Vec::with_capacity(want.min(total));
        let mut reasons = Vec::new();
        let mut failed: BTreeMap<Reason, usize> = BTreeMap::new();
        let start = self.next_start % total;
        let mut visited = 0;
        for step in 0..total {
            let i = (start + step) % total;
            visited = step + 1;
            let node = &self.nodes[i];
            if !node.present {
                continue;
            }
            if plugins::filter(pod, node, &mut reasons) {
                feasible.push(i);
                if feasible.len() >= want {
                    break;
                }
            } else {
                for r in &reasons {
                    *failed.entry(*r).or_default() += 1;
                }
            }
        }
        self.next_start = (start + visited) % total.max(1);
        if feasible.is_empty() {
            return Decision::Unschedulable(explain(self.present, &failed));
        }
        let max_siblings = pod
            .owner
            .as_ref()
            .map(|o| {
                feasible
                    .iter()
                    .map(|&i| self.nodes[i].owners.get(o).copied().unwrap_or(0))
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let mut best = (i64::MIN, usize::MAX);
        let mut ties = 0u32;
        for &i in &feasible {
            let n = &self.nodes[i];
            let score = plugins::least_allocated(pod, n)
                + plugins::balanced_allocation(pod, n)
                + plugins::spread(pod, n, max_siblings);
            if score > best.0 {
                best = (score, i);
                ties = 1;
            } else if score == best.0 {
                // Reservoir sampling: each of the tied nodes is equally likely.
                ties += 1;
                if rand::random_range(0..ties) == 0 {
                    best.1 = i;
                }
            }
        }
        let name = self.nodes[best.1].name.clone();
        self.place(&pod.key, &name, PodUsage::from(pod), true);
        Decision::Bind(name)
    }

    /// Every node's requested resources, for checks.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(|n| n.present)
    }
}

/// `0/5000 nodes available: 4990 Insufficient cpu, 10 node(s) had untolerated taint`: the
/// reasons, most common first.
fn explain(total: usize, failed: &BTreeMap<Reason, usize>) -> String {
    let mut parts: Vec<(&Reason, &usize)> = failed.iter().collect();
    parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let reasons: Vec<String> = parts
        .iter()
        .map(|(r, n)| format!("{n} {}", r.text()))
        .collect();
    format!("0/{total} nodes available: {}", reasons.join(", "))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flotilla_proto::api::{NodeCondition, NodeSpec, NodeStatus, ObjectMeta, Taint};

    /// A ready node offering `cpu` and `mem` (and 110 pods).
    pub(crate) fn node(name: &str, cpu: &str, mem: &str) -> Node {
        Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: [
                    ("cpu".to_string(), cpu.to_string()),
                    ("memory".to_string(), mem.to_string()),
                    ("pods".to_string(), "110".to_string()),
                ]
                .into(),
                conditions: vec![NodeCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod(name: &str, cpu: i64, owner: Option<&str>) -> PodInfo {
        let requests = crate::info::Resources {
            milli_cpu: cpu,
            memory: 0,
            pods: 1,
        };
        PodInfo {
            key: format!("default/{name}"),
            name: name.into(),
            requests,
            scoring_requests: requests,
            owner: owner.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn assumed_pods_take_room_at_once() {
        let mut c = Cache::new();
        c.upsert_node(&node("n1", "1", "1Gi"));
        assert_eq!(
            c.schedule(&pod("a", 600, None)),
            Decision::Bind("n1".into())
        );
        assert!(c.is_assumed("default/a"));
        // The bind is still in flight, yet the room is taken.
        assert!(matches!(
            c.schedule(&pod("b", 600, None)),
            Decision::Unschedulable(_)
        ));
        // The bind failed: the room comes back.
        assert!(c.forget_assumed("default/a"));
        assert_eq!(
            c.schedule(&pod("b", 600, None)),
            Decision::Bind("n1".into())
        );
    }

    #[test]
    fn confirmation_does_not_count_twice() {
        let mut c = Cache::new();
        c.upsert_node(&node("n1", "1", "1Gi"));
        let a = pod("a", 600, None);
        assert_eq!(c.schedule(&a), Decision::Bind("n1".into()));
        // Confirming an assumption gives no room back.
        assert!(!c.pod_bound(&a, "n1"));
        assert!(!c.is_assumed("default/a"));
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 600);
        // A late failure report for a confirmed pod changes nothing.
        assert!(!c.forget_assumed("default/a"));
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 600);
        c.pod_gone("default/a");
        assert_eq!(c.node("n1").unwrap().requested.milli_cpu, 0);
    }

    #[test]
    fn bound_elsewhere_moves_the_count() {
        let mut c = Cache::new();
        c.upsert_node(&node("n1", "1", "1Gi"));
        c.upsert_node(&node("n2", "1", "1Gi"));
        let a = pod("a", 600, None);
        let Decision::Bind(chosen) = c.schedule(&a) else {
            panic!("fits")
        };
        let other = if chosen == "n1" { "n2" } else { "n1" };
        // The room it was assumed to take is free again, and the caller is told so.
        assert!(c.pod_bound(&a, other));
        assert_eq!(c.node(&chosen).unwrap().requested.milli_cpu, 0);
        assert_eq!(c.node(other).unwrap().requested.milli_cpu, 600);
    }

    #[test]
    fn pods_on_unknown_nodes_are_counted_when_the_node_arrives() {
        let mut c = Cache::new();
        assert!(!c.pod_bound(&pod("a", 800, None), "late"));
        assert_eq!(c.node_count(), 0);
        c.upsert_node(&node("late", "1", "1Gi"));
        assert_eq!(c.node("late").unwrap().requested.milli_cpu, 800);
        assert!(matches!(
            c.schedule(&pod("b", 300, None)),
            Decision::Unschedulable(_)
        ));
        // The node goes, the pods stay counted; the node comes back with them.
        c.remove_node("late");
        assert_eq!(c.node_count(), 0);
        c.upsert_node(&node("late", "1", "1Gi"));
        assert_eq!(c.node("late").unwrap().requested.milli_cpu, 800);
    }

    #[test]
    fn explanation_counts_reasons() {
        let mut c = Cache::new();
        for i in 0..4 {
            c.upsert_node(&node(&format!("small-{i}"), "100m", "1Gi"));
        }
        let mut tainted = node("tainted", "8", "8Gi");
        tainted.spec.as_mut().unwrap().taints = vec![Taint {
            key: "dedicated".into(),
            value: "db".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }];
        c.upsert_node(&tainted);
        let Decision::Unschedulable(why) = c.schedule(&pod("big", 1000, None)) else {
            panic!("must not fit")
        };
        assert_eq!(
            why,
            "0/5 nodes available: 4 Insufficient cpu, 1 node(s) had untolerated taint"
        );
    }

    #[test]
    fn owners_spread_across_nodes() {
        let mut c = Cache::new();
        for i in 0..4 {
            c.upsert_node(&node(&format!("n{i}"), "64", "64Gi"));
        }
        let mut per_node: HashMap<String, u32> = HashMap::new();
        for i in 0..8 {
            let Decision::Bind(n) = c.schedule(&pod(&format!("p{i}"), 10, Some("rs"))) else {
                panic!("fits")
            };
            *per_node.entry(n).or_default() += 1;
        }
        assert_eq!(per_node.len(), 4, "{per_node:?}");
        assert!(per_node.values().all(|&n| n == 2), "{per_node:?}");
    }

    #[test]
    fn sampling_visits_every_node_in_turn() {
        let mut c = Cache::new();
        for i in 0..1000 {
            c.upsert_node(&node(&format!("n{i:04}"), "1", "1Gi"));
        }
        // Each pod fills a node; with sampling (420 of 1,000 looked at per pod) every node
        // must still be reachable.
        for i in 0..1000 {
            assert!(
                matches!(
                    c.schedule(&pod(&format!("p{i}"), 1000, None)),
                    Decision::Bind(_)
                ),
                "pod {i} found no node"
            );
        }
        assert!(c.nodes().all(|n| n.requested.milli_cpu == 1000));
        assert!(matches!(
            c.schedule(&pod("extra", 1000, None)),
            Decision::Unschedulable(_)
        ));
    }

    #[test]
    fn node_changes_that_may_help() {
        let mut c = Cache::new();
        assert!(c.upsert_node(&node("n1", "1", "1Gi")));
        assert!(!c.upsert_node(&node("n1", "1", "1Gi")));
        assert!(c.upsert_node(&node("n1", "2", "1Gi")));
        let mut not_ready = node("n1", "2", "1Gi");
        not_ready.status.as_mut().unwrap().conditions[0].status = "False".into();
        assert!(!c.upsert_node(&not_ready));
        assert!(c.upsert_node(&node("n1", "2", "1Gi")));
    }
}
