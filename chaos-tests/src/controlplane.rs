//! The control-plane workload: Deployments applied, scaled and rolled through the API while
//! faults run, on workers whose agents run the fake runtime; and its checks, over the pods'
//! committed history read back from the store: replicas converge, no pod was ever bound
//! twice, no node was overcommitted, and the pods of killed workers were replaced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::quantity::parse_cpu_millis;
use flotilla_client::api::{Deployment, ListRequest, Pod};
use flotilla_proto::mvccpb::event::EventType;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::check::Finding;
use crate::workload::ClientCtx;

pub const NAMESPACE: &str = "default";
/// Replicas a Deployment is scaled between.
pub const MAX_REPLICAS: i32 = 4;
/// cpu each pod requests, in millicores.
pub const POD_CPU_MILLIS: i64 = 200;
const PODS_PREFIX: &str = "/registry/pods/";

/// One thing the Deployments client did.
#[derive(Clone, Debug, Serialize)]
pub struct DeployAction {
    pub at_ms: u64,
    pub deployment: String,
    pub action: String,
    /// ok, or the error.
    pub outcome: String,
}

fn deployment(name: &str, replicas: i32, version: u32) -> Deployment {
    from_value(json!({
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "app",
                        "image": format!("chaos/{name}:v{version}"),
                        "resources": {"requests": {
                            "cpu": format!("{POD_CPU_MILLIS}m"), "memory": "16Mi"}},
                    }],
                },
            },
        },
    }))
    .expect("the Deployment template is well formed")
}

/// Creates `names` and then, until stopped, scales or rolls one of them every 1-3 s. While
/// `workers_down` is set it only scales up or rolls, so the pods of a dead worker must be
/// replaced, never made unnecessary by a scale-down.
pub async fn deployments_client(
    client: Client,
    names: Vec<String>,
    seed: u64,
    ctx: ClientCtx,
    workers_down: Arc<AtomicBool>,
) -> Vec<DeployAction> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut note = |name: &str, action: String, outcome: String| {
        out.push(DeployAction {
            at_ms: ctx.clock.ns() / 1_000_000,
            deployment: name.into(),
            action,
            outcome,
        });
    };
    let mut version = 1u32;
    for name in &names {
        loop {
            if *ctx.stop.borrow() {
                return out;
            }
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                client.create(&deployment(name, 2, version)),
            )
            .await;
            match r {
                Ok(Ok(_)) => {
                    note(name, "create with 2 replicas".into(), "ok".into());
                    break;
                }
                Ok(Err(e)) if e.is_already_exists() => break,
                Ok(Err(e)) => note(name, "create".into(), e.to_string()),
                Err(_) => note(name, "create".into(), "timed out".into()),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    while !*ctx.stop.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..3_000))).await;
        if *ctx.stop.borrow() {
            break;
        }
        let name = &names[rng.random_range(0..names.len())];
        let roll = rng.random_bool(0.4);
        let target = rng.random_range(1..=MAX_REPLICAS);
        let update = async {
            let mut d: Deployment = client.get(NAMESPACE, name).await?;
            let spec = d.spec.get_or_insert_with(Default::default);
            let action = if roll {
                version += 1;
                let image = format!("chaos/{name}:v{version}");
                if let Some(c) = spec
                    .template
                    .as_mut()
                    .and_then(|t| t.spec.as_mut())
                    .and_then(|s| s.containers.first_mut())
                {
                    c.image = image.clone();
                }
                format!("roll to {image}")
            } else {
                let current = spec.replicas.unwrap_or(1);
                let to = if workers_down.load(Ordering::Relaxed) {
                    target.max(current)
                } else {
                    target
                };
                spec.replicas = Some(to);
                format!("scale {current} -> {to}")
            };
            client.update(&d).await.map(|_| action)
        };
        match tokio::time::timeout(Duration::from_secs(5), update).await {
            Ok(Ok(action)) => note(name, action, "ok".into()),
            Ok(Err(e)) => note(
                name,
                if roll { "roll" } else { "scale" }.into(),
                e.to_string(),
            ),
            Err(_) => note(
                name,
                if roll { "roll" } else { "scale" }.into(),
                "timed out".into(),
            ),
        }
    }
    out
}

/// One event of a raw key's history.
#[derive(Clone, Debug)]
pub struct RawEvent {
    pub revision: i64,
    pub key: String,
    /// None for a delete.
    pub value: Option<Vec<u8>>,
}

impl RawEvent {
    fn from_proto(e: flotilla_proto::mvccpb::Event) -> Option<Self> {
        let kv = e.kv?;
        Some(RawEvent {
            revision: kv.mod_revision,
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: (e.r#type != EventType::Delete as i32).then_some(kv.value),
        })
    }
}

/// The pods' committed history from `start` through `until`.
pub async fn pod_history(
    channel: Channel,
    start: i64,
    until: i64,
    within: Duration,
) -> anyhow::Result<Vec<RawEvent>> {
    let events = crate::workload::read_history(channel, PODS_PREFIX, start, until, within).await?;
    Ok(events
        .into_iter()
        .filter_map(RawEvent::from_proto)
        .collect())
}

/// A window in which a worker's agent was down.
#[derive(Clone, Debug, Serialize)]
pub struct Outage {
    pub worker: String,
    pub killed_at_revision: i64,
    pub restarted_at_revision: i64,
    pub duration_ms: u64,
}

struct PodState {
    uid: String,
    node: String,
    app: String,
    deleting: bool,
    terminal: bool,
    cpu: i64,
}

fn pod_state(pod: &Pod) -> PodState {
    let meta = pod.metadata.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let phase = pod.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
    PodState {
        uid: meta.uid,
        node: spec.node_name,
        app: meta.labels.get("app").cloned().unwrap_or_default(),
        deleting: !meta.deletion_timestamp.is_empty(),
        terminal: phase == "Succeeded" || phase == "Failed",
        cpu: spec
            .containers
            .iter()
            .filter_map(|c| c.resources.as_ref()?.requests.get("cpu"))
            .filter_map(|q| parse_cpu_millis(q).ok())
            .sum(),
    }
}

/// Checks the pods' history: never bound twice, no node over its cpu or pod count, and the
/// pods of every worker outage evicted and replaced on other workers before it came back.
pub fn check_pods(
    history: &[RawEvent],
    outages: &[Outage],
    cpu_millis: i64,
    max_pods: i64,
    min_outage: Duration,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut pods: HashMap<String, PodState> = HashMap::new();
    let mut bound_to: HashMap<String, (String, i64)> = HashMap::new();
    // Per outage: the pods on the worker when it died, when each was marked for deletion, and
    // the replacements (uid, deployment) created after.
    let mut on_dead: Vec<HashMap<String, (String, Option<i64>)>> =
        vec![HashMap::new(); outages.len()];
    let mut created_since: Vec<Vec<(String, String, i64)>> = vec![Vec::new(); outages.len()];
    let mut seen_uids: HashSet<String> = HashSet::new();
    let mut overcommitted: HashSet<String> = HashSet::new();
    let mut decode_errors = 0usize;
    let mut i = 0;
    while i <= history.len() {
        let rev = history.get(i).map_or(i64::MAX, |e| e.revision);
        // Outages that start before this revision: note the pods on the worker.
        for (o, outage) in outages.iter().enumerate() {
            let started = outage.killed_at_revision < rev
                && (i == 0 || history[i - 1].revision <= outage.killed_at_revision);
            if started {
                for p in pods.values() {
                    if p.node == outage.worker && !p.deleting && !p.terminal {
                        on_dead[o].insert(p.uid.clone(), (p.app.clone(), None));
                    }
                }
            }
        }
        let Some(e) = history.get(i) else { break };
        i += 1;
        let Some(value) = &e.value else {
            if let Some(p) = pods.remove(&e.key) {
                mark_deleted(&mut on_dead, outages, &p.uid, e.revision);
            }
            continue;
        };
        let Ok(pod) = Pod::decode(value.as_slice()) else {
            decode_errors += 1;
            continue;
        };
        let p = pod_state(&pod);
        if seen_uids.insert(p.uid.clone()) {
            for (o, outage) in outages.iter().enumerate() {
                if e.revision > outage.killed_at_revision
                    && e.revision <= outage.restarted_at_revision
                {
                    created_since[o].push((p.uid.clone(), p.app.clone(), e.revision));
                }
            }
        }
        if !p.node.is_empty() {
            match bound_to.get(&p.uid) {
                Some((node, at)) if *node != p.node => findings.push(Finding {
                    check: "control plane: bound twice".into(),
                    summary: format!(
                        "pod {} (uid {}) bound to {node} at revision {at} and to {} at revision {}",
                        e.key, p.uid, p.node, e.revision
                    ),
                    detail: String::new(),
                }),
                Some(_) => {}
                None => {
                    bound_to.insert(p.uid.clone(), (p.node.clone(), e.revision));
                }
            }
        }
        if p.deleting {
            mark_deleted(&mut on_dead, outages, &p.uid, e.revision);
        }
        let node = p.node.clone();
        pods.insert(e.key.clone(), p);
        if !node.is_empty() && !overcommitted.contains(&node) {
            let on_node: Vec<&PodState> = pods
                .values()
                .filter(|q| q.node == node && !q.terminal)
                .collect();
            let cpu: i64 = on_node.iter().map(|q| q.cpu).sum();
            if cpu > cpu_millis || on_node.len() as i64 > max_pods {
                overcommitted.insert(node.clone());
                findings.push(Finding {
                    check: "control plane: overcommitted".into(),
                    summary: format!(
                        "node {node} at revision {}: {} pods requesting {cpu}m cpu, it offers {cpu_millis}m and {max_pods} pods",
                        e.revision,
                        on_node.len()
                    ),
                    detail: String::new(),
                });
            }
        }
    }
    if decode_errors > 0 {
        findings.push(Finding {
            check: "control plane: history".into(),
            summary: format!("{decode_errors} stored pods do not decode"),
            detail: String::new(),
        });
    }
    for (o, outage) in outages.iter().enumerate() {
        if Duration::from_millis(outage.duration_ms) < min_outage {
            continue;
        }
        let mut evicted_by_app: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (uid, (app, deleted)) in &on_dead[o] {
            match deleted {
                Some(at) if *at <= outage.restarted_at_revision => {
                    evicted_by_app.entry(app.clone()).or_default().push(*at)
                }
                _ => findings.push(Finding {
                    check: "control plane: eviction".into(),
                    summary: format!(
                        "pod {uid} of {app} on {} was not evicted during its {} ms outage (revisions {}..{})",
                        outage.worker, outage.duration_ms, outage.killed_at_revision, outage.restarted_at_revision
                    ),
                    detail: String::new(),
                }),
            }
        }
        // A replacement is a pod of the same Deployment created after the worker died and
        // bound elsewhere before it came back: the ReplicaSet's answer to the eviction, or,
        // when a rollout was under way, the new ReplicaSet's pods that made the evicted one
        // unnecessary (a rollout creates before it deletes).
        for (app, evictions) in evicted_by_app {
            let replacements: Vec<&(String, String, i64)> = created_since[o]
                .iter()
                .filter(|(uid, a, _)| {
                    *a == app
                        && bound_to.get(uid).is_some_and(|(n, rev)| {
                            *n != outage.worker && *rev <= outage.restarted_at_revision
                        })
                })
                .collect();
            if replacements.len() < evictions.len() {
                findings.push(Finding {
                    check: "control plane: replacement".into(),
                    summary: format!(
                        "{app}: {} pods evicted from {}, only {} replaced on other workers before it came back",
                        evictions.len(),
                        outage.worker,
                        replacements.len()
                    ),
                    detail: format!("{outage:?}"),
                });
            }
        }
    }
    findings
}

fn mark_deleted(
    on_dead: &mut [HashMap<String, (String, Option<i64>)>],
    outages: &[Outage],
    uid: &str,
    revision: i64,
) {
    for (o, outage) in outages.iter().enumerate() {
        if revision > outage.killed_at_revision
            && let Some((_, at)) = on_dead[o].get_mut(uid)
            && at.is_none()
        {
            *at = Some(revision);
        }
    }
}

/// Waits until every Deployment's status matches its spec and its pods are running the
/// current template; a finding for each that does not within `within`.
pub async fn converge(client: &Client, names: &[String], within: Duration) -> Vec<Finding> {
    let deadline = Instant::now() + within;
    let mut last = BTreeMap::new();
    loop {
        last.clear();
        for name in names {
            if let Some(problem) = unconverged(client, name).await {
                last.insert(name.clone(), problem);
            }
        }
        if last.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last.into_iter()
        .map(|(name, problem)| Finding {
            check: "control plane: convergence".into(),
            summary: format!("deployment {name} did not converge in {within:?}: {problem}"),
            detail: String::new(),
        })
        .collect()
}

async fn unconverged(client: &Client, name: &str) -> Option<String> {
    let d: Deployment = match client.get(NAMESPACE, name).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return None,
        Err(e) => return Some(e.to_string()),
    };
    let want = d.spec.as_ref()?.replicas.unwrap_or(1);
    let generation = d.metadata.as_ref().map_or(0, |m| m.generation);
    let image = d
        .spec
        .as_ref()
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.containers.first())
        .map(|c| c.image.clone())
        .unwrap_or_default();
    let s = d.status.clone().unwrap_or_default();
    if s.observed_generation < generation
        || s.replicas != want
        || s.updated_replicas != want
        || s.available_replicas != want
    {
        return Some(format!(
            "spec {want} replicas (generation {generation}); status: observed generation {}, {} replicas, {} updated, {} available",
            s.observed_generation, s.replicas, s.updated_replicas, s.available_replicas
        ));
    }
    let pods: Vec<Pod> = match client
        .list::<Pod>(&ListRequest {
            namespace: NAMESPACE.into(),
            label_selector: format!("app={name}"),
            ..Default::default()
        })
        .await
    {
        Ok((pods, _)) => pods,
        Err(e) => return Some(e.to_string()),
    };
    let running: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.deletion_timestamp.is_empty())
        })
        .filter(|p| p.status.as_ref().is_some_and(|s| s.phase == "Running"))
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .is_some_and(|c| c.image == image)
        })
        .collect();
    (running.len() as i32 != want).then(|| {
        format!(
            "{want} replicas wanted, {} pods running {image}",
            running.len()
        )
    })
}

/// The pods' history, for the report.
pub fn describe(history: &[RawEvent]) -> Vec<serde_json::Value> {
    history
        .iter()
        .map(|e| match &e.value {
            None => json!({"revision": e.revision, "key": e.key, "type": "DELETE"}),
            Some(v) => match Pod::decode(v.as_slice()) {
                Ok(pod) => {
                    let p = pod_state(&pod);
                    json!({"revision": e.revision, "key": e.key, "type": "PUT", "uid": p.uid,
                        "node": p.node, "deleting": p.deleting, "terminal": p.terminal,
                        "phase": pod.status.map(|s| s.phase).unwrap_or_default()})
                }
                Err(_) => json!({"revision": e.revision, "key": e.key, "type": "PUT", "undecodable": true}),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str, node: &str, cpu: &str) -> Vec<u8> {
        let p: Pod = from_value(json!({
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid, "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i",
                "resources": {"requests": {"cpu": cpu}}}]},
            "status": {"phase": "Running"},
        }))
        .unwrap();
        p.encode_to_vec()
    }

    fn put(revision: i64, name: &str, uid: &str, node: &str) -> RawEvent {
        RawEvent {
            revision,
            key: format!("{PODS_PREFIX}{NAMESPACE}/{name}"),
            value: Some(pod(name, uid, node, "400m")),
        }
    }

    fn delete(revision: i64, name: &str) -> RawEvent {
        RawEvent {
            revision,
            key: format!("{PODS_PREFIX}{NAMESPACE}/{name}"),
            value: None,
        }
    }

    fn outage(killed: i64, restarted: i64) -> Outage {
        Outage {
            worker: "w1".into(),
            killed_at_revision: killed,
            restarted_at_revision: restarted,
            duration_ms: 10_000,
        }
    }

    const MIN: Duration = Duration::from_secs(5);

    #[test]
    fn a_clean_history_with_an_evicted_and_replaced_pod_passes() {
        let h = vec![
            put(2, "a", "u1", ""),
            put(3, "a", "u1", "w1"),
            put(4, "b", "u2", "w2"),
            // w1 dies after revision 5; a is evicted at 7 and replaced by c on w2.
            delete(7, "a"),
            put(8, "c", "u3", ""),
            put(9, "c", "u3", "w2"),
        ];
        let f = check_pods(&h, &[outage(5, 10)], 1000, 8, MIN);
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn a_pod_bound_to_two_nodes_is_caught() {
        let h = vec![put(2, "a", "u1", "w1"), put(3, "a", "u1", "w2")];
        let f = check_pods(&h, &[], 1000, 8, MIN);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].summary.contains("bound to w1 at revision 2 and to w2"),
            "{f:?}"
        );
    }

    #[test]
    fn an_overcommitted_node_is_caught() {
        // Three pods of 400m on a node of 1000m.
        let h = vec![
            put(2, "a", "u1", "w1"),
            put(3, "b", "u2", "w1"),
            put(4, "c", "u3", "w1"),
        ];
        let f = check_pods(&h, &[], 1000, 8, MIN);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].summary
                .contains("node w1 at revision 4: 3 pods requesting 1200m"),
            "{f:?}"
        );
        // The pod count limit too.
        let f = check_pods(&h[..2], &[], 10_000, 1, MIN);
        assert!(f[0].summary.contains("2 pods"), "{f:?}");
    }

    #[test]
    fn pods_of_a_dead_worker_left_in_place_or_not_replaced_are_caught() {
        // Never evicted.
        let h = vec![put(2, "a", "u1", "w1"), put(8, "b", "u2", "w2")];
        let f = check_pods(&h, &[outage(5, 10)], 1000, 8, MIN);
        assert!(
            f.iter().any(|f| f.summary.contains("was not evicted")),
            "{f:?}"
        );
        // Evicted, never replaced.
        let h = vec![put(2, "a", "u1", "w1"), delete(7, "a")];
        let f = check_pods(&h, &[outage(5, 10)], 1000, 8, MIN);
        assert!(
            f.iter().any(|f| f.summary.contains("only 0 replaced")),
            "{f:?}"
        );
        // Too short an outage to expect either.
        let mut short = outage(5, 10);
        short.duration_ms = 1_000;
        assert!(check_pods(&h, &[short], 1000, 8, MIN).is_empty());
    }
}
