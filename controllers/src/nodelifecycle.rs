//! Node lifecycle: a node whose agent stops renewing its Lease for longer than the grace
//! period (`--node-monitor-grace`, 8 s) becomes `Ready=Unknown` and gets the
//! `node.flotilla.io/unreachable` NoExecute taint. Its pods are evicted once their
//! toleration of that taint runs out: `tolerationSeconds` when they tolerate it, the
//! default (5 s) when they don't, never when they tolerate it without a limit. When the
//! Lease is renewed again the taint goes and the node is Ready again.
//!
//! The taint manager acts on every NoExecute taint, as Kubernetes': a pod that does not
//! tolerate one is evicted at once, one that tolerates it for `tolerationSeconds` that long
//! after the taint's `timeAdded` (the API server stamps it), one that tolerates it without
//! a limit never. (Only this controller's own unreachable taint has the 5 s default.)
//!
//! Renewals are timed by when this controller *sees* them change (its own clock, not the
//! agent's), and a new leader gives every node a full grace period from its start, as
//! Kubernetes does. Nodes that never had a Lease (registered by hand, without an agent)
//! are not monitored. Pods bound to a node whose Node object is gone are deleted at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use flotilla_client::ClientError;
use flotilla_client::informer::Change;
use flotilla_proto::api::{
    DeleteRequest, Lease, Node, NodeCondition, Pod, Resource, Taint, Toleration, time,
};
use tokio::sync::watch;

use crate::Ctx;
use crate::queue::{Requeue, WorkQueue};
use crate::util::{is_active, key_of, record_event};

const COMPONENT: &str = "node-controller";
pub const UNREACHABLE_TAINT: &str = "node.flotilla.io/unreachable";
const STATUS_UNKNOWN_REASON: &str = "NodeStatusUnknown";

pub struct Controller {
    pub queue: Arc<WorkQueue>,
    /// Per node: the Lease version last seen and when it was seen to change.
    renewals: Mutex<HashMap<String, (String, Instant)>>,
}

impl Controller {
    pub fn new() -> Self {
        Self {
            queue: WorkQueue::new("node-lifecycle"),
            renewals: Mutex::default(),
        }
    }

    fn observe(&self, node: &str, version: &str) {
        let mut r = self.renewals.lock().unwrap_or_else(|p| p.into_inner());
        match r.get_mut(node) {
            Some((v, _)) if v == version => {}
            Some(entry) => *entry = (version.to_string(), Instant::now()),
            None => {
                r.insert(node.to_string(), (version.to_string(), Instant::now()));
            }
        }
    }

    /// Since when the node's Lease has not changed; `None` for a node never seen with one.
    fn silent_for(&self, node: &str) -> Option<Duration> {
        let r = self.renewals.lock().unwrap_or_else(|p| p.into_inner());
        r.get(node).map(|(_, at)| at.elapsed())
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

pub fn on_lease(ctx: &Ctx, change: &Change<Lease>) {
    let c = &ctx.nodelifecycle;
    match change {
        Change::Added(l) | Change::Updated { new: l, .. } => {
            let was_silent = c
                .silent_for(l.name())
                .is_some_and(|d| d > ctx.config.node_monitor_grace);
            c.observe(l.name(), l.resource_version());
            if was_silent {
                c.queue.add(l.name());
            }
        }
        // A deleted lease is a lease no longer renewed: the clock keeps running.
        Change::Deleted(_) => {}
    }
}

pub fn on_node(ctx: &Ctx, change: &Change<Node>) {
    if let Change::Added(n) | Change::Deleted(n) = change {
        ctx.nodelifecycle.queue.add(key_of(n));
    }
}

pub fn on_pod(ctx: &Ctx, change: &Change<Pod>) {
    // A pod that lands on a tainted node has its eviction scheduled.
    let (Change::Added(p) | Change::Updated { new: p, .. }) = change else {
        return;
    };
    let node = p.spec.as_ref().map(|s| s.node_name.as_str()).unwrap_or("");
    if node.is_empty() || !is_active(p) {
        return;
    }
    if let Some(i) = ctx.try_informers()
        && i.nodes
            .get("", node)
            .is_some_and(|n| no_execute_taints(&n).next().is_some())
    {
        ctx.nodelifecycle.queue.add(node);
    }
}

fn no_execute_taints(n: &Node) -> impl Iterator<Item = &Taint> {
    n.spec
        .iter()
        .flat_map(|s| &s.taints)
        .filter(|t| t.effect == "NoExecute")
}

fn unreachable_taint(n: &Node) -> Option<&Taint> {
    n.spec
        .as_ref()?
        .taints
        .iter()
        .find(|t| t.key == UNREACHABLE_TAINT && t.effect == "NoExecute")
}

/// Every second: queues the nodes whose state should change, and tainted nodes (whose pods
/// may be due for eviction).
pub async fn monitor(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let grace = ctx.config.node_monitor_grace;
        let c = &ctx.nodelifecycle;
        ctx.informers().nodes.with_cache(|nodes| {
            for (name, n) in nodes {
                let silent = c.silent_for(name).is_some_and(|d| d > grace);
                if silent != unreachable_taint(n).is_some()
                    || silent
                    || no_execute_taints(n).next().is_some()
                {
                    c.queue.add(name.clone());
                }
            }
        });
    }
}

pub async fn reconcile(ctx: &Ctx, name: &str) -> Result<Requeue, ClientError> {
    let i = ctx.informers();
    let Some(node) = i.nodes.get("", name) else {
        return remove_pods_of_missing_node(ctx, name).await;
    };
    let silent = ctx.nodelifecycle.silent_for(name);
    let unreachable = silent.is_some_and(|d| d > ctx.config.node_monitor_grace);
    if unreachable {
        let node = mark_unreachable(ctx, node).await?;
        return evict(ctx, &node).await;
    }
    let node =
        if unreachable_taint(&node).is_some() || ready_status(&node).1 == STATUS_UNKNOWN_REASON {
            mark_reachable(ctx, node).await?
        } else {
            node
        };
    // Other NoExecute taints (someone else's) evict too.
    evict(ctx, &node).await
}

/// (status, reason) of the Ready condition.
fn ready_status(n: &Node) -> (String, String) {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .map(|c| (c.status.clone(), c.reason.clone()))
        .unwrap_or_default()
}

fn set_ready(n: &mut Node, status: &str, reason: &str, message: &str) {
    let now = time::now();
    let conditions = &mut n.status.get_or_insert_default().conditions;
    match conditions.iter_mut().find(|c| c.r#type == "Ready") {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status.into();
            c.reason = reason.into();
            c.message = message.into();
        }
        None => conditions.push(NodeCondition {
            r#type: "Ready".into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            ..Default::default()
        }),
    }
}

async fn mark_unreachable(ctx: &Ctx, mut node: Node) -> Result<Node, ClientError> {
    if ready_status(&node).0 != "Unknown" {
        set_ready(
            &mut node,
            "Unknown",
            STATUS_UNKNOWN_REASON,
            "The node agent stopped renewing its lease.",
        );
        node = ctx.client.update_status(&node).await?;
        record_event(
            &ctx.client,
            COMPONENT,
            &node,
            "Normal",
            "NodeNotReady",
            format!("Node {} status is now: NodeNotReady", node.name()),
        );
    }
    if unreachable_taint(&node).is_none() {
        node.spec.get_or_insert_default().taints.push(Taint {
            key: UNREACHABLE_TAINT.into(),
            effect: "NoExecute".into(),
            time_added: time::now(),
            ..Default::default()
        });
        node = ctx.client.update(&node).await?;
    }
    Ok(node)
}

async fn mark_reachable(ctx: &Ctx, mut node: Node) -> Result<Node, ClientError> {
    if unreachable_taint(&node).is_some() {
        if let Some(spec) = node.spec.as_mut() {
            spec.taints.retain(|t| t.key != UNREACHABLE_TAINT);
        }
        node = ctx.client.update(&node).await?;
    }
    if ready_status(&node).1 == STATUS_UNKNOWN_REASON {
        set_ready(
            &mut node,
            "True",
            "AgentLeaseRenewed",
            "The node agent renews its lease again.",
        );
        node = ctx.client.update_status(&node).await?;
        record_event(
            &ctx.client,
            COMPONENT,
            &node,
            "Normal",
            "NodeReady",
            format!("Node {} status is now: NodeReady", node.name()),
        );
    }
    Ok(node)
}

/// How long a pod may stay on a node with this taint: `None` for ever.
fn toleration_time(
    tolerations: &[Toleration],
    taint: &Taint,
    default: Duration,
) -> Option<Duration> {
    let matching: Vec<&Toleration> = tolerations
        .iter()
        .filter(|t| {
            (t.effect.is_empty() || t.effect == taint.effect)
                && (t.key.is_empty() && t.operator == "Exists" || t.key == taint.key)
                && (t.operator == "Exists" || t.value == taint.value)
        })
        .collect();
    if matching.is_empty() {
        return Some(default);
    }
    // The shortest limit of the matching tolerations, as Kubernetes takes it; for ever
    // only if none has a limit.
    matching
        .iter()
        .filter_map(|t| t.toleration_seconds)
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .min()
}

async fn evict(ctx: &Ctx, node: &Node) -> Result<Requeue, ClientError> {
    let taints: Vec<Taint> = no_execute_taints(node).cloned().collect();
    if taints.is_empty() {
        return Ok(None);
    }
    let now = SystemTime::now();
    // How long a pod has been under a taint: since the taint's `timeAdded` (stamped by the
    // API server), or since the pod was made if that is later (a pod placed on a node that
    // was already tainted gets its whole toleration, as in Kubernetes).
    let since = |t: &Taint, p: &Pod| {
        let added = time::parse(&t.time_added).unwrap_or(now);
        let made = p
            .metadata
            .as_ref()
            .and_then(|m| time::parse(&m.creation_timestamp))
            .unwrap_or(added);
        now.duration_since(added.max(made)).unwrap_or_default()
    };
    let pods: Vec<Pod> = ctx.informers().pods.with_cache(|pods| {
        pods.values()
            .filter(|p| is_active(p) && p.spec.as_ref().is_some_and(|s| s.node_name == node.name()))
            .cloned()
            .collect()
    });
    let mut failure = None;
    for p in pods {
        let tolerations = p
            .spec
            .as_ref()
            .map(|s| s.tolerations.as_slice())
            .unwrap_or(&[]);
        // The soonest any taint's toleration runs out; none: the pod stays.
        let mut due = false;
        for taint in &taints {
            let default = if taint.key == UNREACHABLE_TAINT {
                ctx.config.default_toleration
            } else {
                Duration::ZERO
            };
            let Some(allowed) = toleration_time(tolerations, taint, default) else {
                continue;
            };
            let on = since(taint, &p);
            if on >= allowed {
                due = true;
            }
        }
        if !due {
            continue;
        }
        let req = DeleteRequest {
            namespace: p.namespace().to_string(),
            name: p.name().to_string(),
            ..Default::default()
        };
        match ctx.client.delete::<Pod>(&req).await {
            Ok(_) => record_event(
                &ctx.client,
                COMPONENT,
                &p,
                "Normal",
                "TaintManagerEviction",
                format!("Marking for deletion Pod {}/{}", p.namespace(), p.name()),
            ),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    // The monitor looks at every tainted node each second: no timer per pass (a long
    // toleration would pile them up).
    match failure {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Pods bound to a node that no longer exists: nothing will ever stop them, so they go now.
async fn remove_pods_of_missing_node(ctx: &Ctx, name: &str) -> Result<Requeue, ClientError> {
    let pods: Vec<Pod> = ctx.informers().pods.with_cache(|pods| {
        pods.values()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name == name))
            .cloned()
            .collect()
    });
    if pods.is_empty() {
        return Ok(None);
    }
    // The cache may lag: only a node the API doesn't know is missing.
    match ctx.client.get::<Node>("", name).await {
        Ok(_) => return Ok(None),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    for p in pods {
        let req = DeleteRequest {
            namespace: p.namespace().to_string(),
            name: p.name().to_string(),
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        match ctx.client.delete::<Pod>(&req).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint() -> Taint {
        Taint {
            key: UNREACHABLE_TAINT.into(),
            effect: "NoExecute".into(),
            ..Default::default()
        }
    }

    fn toleration(key: &str, op: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: key.into(),
            operator: op.into(),
            effect: "NoExecute".into(),
            toleration_seconds: seconds,
            ..Default::default()
        }
    }

    #[test]
    fn toleration_times() {
        let d = Duration::from_secs(5);
        assert_eq!(toleration_time(&[], &taint(), d), Some(d));
        assert_eq!(
            toleration_time(
                &[toleration(UNREACHABLE_TAINT, "Exists", Some(30))],
                &taint(),
                d
            ),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            toleration_time(
                &[toleration(UNREACHABLE_TAINT, "Exists", None)],
                &taint(),
                d
            ),
            None
        );
        // Tolerating everything, for ever.
        assert_eq!(
            toleration_time(&[toleration("", "Exists", None)], &taint(), d),
            None
        );
        // Another taint's toleration doesn't count.
        assert_eq!(
            toleration_time(&[toleration("other", "Exists", None)], &taint(), d),
            Some(d)
        );
        // Of several that match, the shortest limit wins; one without a limit counts only
        // when none has one.
        assert_eq!(
            toleration_time(
                &[
                    toleration(UNREACHABLE_TAINT, "Exists", Some(60)),
                    toleration("", "Exists", None),
                    toleration(UNREACHABLE_TAINT, "Exists", Some(10)),
                ],
                &taint(),
                d
            ),
            Some(Duration::from_secs(10))
        );
    }
}
