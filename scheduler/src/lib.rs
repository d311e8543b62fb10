//! Flotilla's scheduler: places unbound pods on nodes, as a client of the API.
//!
//! - [`queue`]: pods waiting, by priority then arrival, with back-off and an
//!   "unschedulable" set that waits for the cluster to change;
//! - [`cache`]: nodes and what is placed on them, including pods *assumed* onto a node
//!   while their bind is in flight, so the scheduler never waits for a round trip per pod
//!   and never counts the same room twice;
//! - [`plugins`]: the filters (ready, schedulable, resources, nodeSelector, node affinity,
//!   taints, host ports) and scores (least allocated, balanced allocation, spread);
//! - [`info`]: what a pod asks for and what a node offers.
//!
//! [`run`] ties them together: two informers (nodes, pods) feed the cache and the queue; one
//! loop pops pods and decides; binds go out concurrently, each a compare-and-set in the API
//! (a bound pod is never bound again). A failed or uncertain bind is resolved by reading the
//! pod back before its room is given up, so a lost reply cannot lead to overcommitment.

pub mod cache;
pub mod info;
pub mod plugins;
pub mod queue;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_client::informer::{Change, Filter, Informer};
use flotilla_client::{Client, ClientError};
use flotilla_proto::api::{
    Event, EventSource, Node, ObjectMeta, ObjectReference, Pod, PodCondition, time,
};
use tokio::sync::{Notify, Semaphore, watch};

use crate::cache::{Cache, Decision};
use crate::info::{PodInfo, pod_key};
use crate::queue::Queue;

/// The name pods ask for (or leave empty) to be placed by this scheduler.
pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

#[derive(Clone, Debug)]
pub struct Config {
    /// Pods whose `spec.schedulerName` is this (or empty) are ours.
    pub scheduler_name: String,
    /// Share of feasible nodes to look for before scoring (0: kube-scheduler's adaptive
    /// default; 100: every node).
    pub percentage_of_nodes_to_score: u32,
    /// Binds in flight at once.
    pub bind_parallelism: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler_name: DEFAULT_SCHEDULER_NAME.into(),
            percentage_of_nodes_to_score: 0,
            bind_parallelism: 256,
        }
    }
}

/// Counters an operator reads (exported on /metrics by the server).
#[derive(Debug, Default)]
pub struct Stats {
    /// Pods bound.
    pub scheduled: AtomicU64,
    /// Attempts that found no node.
    pub unschedulable: AtomicU64,
    /// Binds the API refused or that failed in transit.
    pub bind_errors: AtomicU64,
    /// Pods waiting in the queue (active + backing off + unschedulable).
    pub pending: AtomicU64,
}

struct State {
    cache: Cache,
    queue: Queue,
    /// Unbound pods that are ours, by key.
    pending: HashMap<String, PodInfo>,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    stats: Arc<Stats>,
    config: Config,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How many pods one pass of the loop decides before it lets binds and informers run.
const BATCH: usize = 256;
/// Unschedulable pods are tried again at least this often even if no change was seen.
const FLUSH_UNSCHEDULABLE: Duration = Duration::from_secs(30);

/// Runs the scheduler until `stop` turns true.
pub async fn run(client: Client, config: Config, stats: Arc<Stats>, stop: watch::Receiver<bool>) {
    let mut cache = Cache::new();
    cache.percentage_of_nodes_to_score = config.percentage_of_nodes_to_score;
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            cache,
            queue: Queue::new(),
            pending: HashMap::new(),
        }),
        wake: Notify::new(),
        stats,
        config,
    });
    let nodes = {
        let shared = shared.clone();
        Informer::<Node>::start(client.clone(), Filter::default(), move |c| {
            on_node(&shared, c)
        })
    };
    let pods = {
        let shared = shared.clone();
        Informer::<Pod>::start(client.clone(), Filter::default(), move |c| {
            on_pod(&shared, c)
        })
    };
    let mut stopped = stop.clone();
    tokio::select! {
        _ = async { nodes.wait_synced().await; pods.wait_synced().await } => {}
        _ = async { stopped.wait_for(|s| *s).await.map(|_| ()) } => return,
    }
    tracing::info!(nodes = nodes.len(), pods = pods.len(), "scheduler started");
    schedule_loop(client, shared, stop).await;
    drop((nodes, pods));
}

fn on_node(shared: &Shared, change: Change<Node>) {
    let mut st = shared.lock();
    match change {
        Change::Added(n) | Change::Updated { new: n, .. } => {
            if st.cache.upsert_node(&n) && st.queue.move_unschedulable(true, Instant::now()) > 0 {
                shared.wake.notify_one();
            }
        }
        Change::Deleted(n) => st.cache.remove_node(n.name_or_empty()),
    }
}

trait NameOrEmpty {
    fn name_or_empty(&self) -> &str;
}

impl NameOrEmpty for Node {
    fn name_or_empty(&self) -> &str {
        self.metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or("")
    }
}

fn on_pod(shared: &Shared, change: Change<Pod>) {
    let mut st = shared.lock();
    match change {
        Change::Added(p) | Change::Updated { new: p, .. } => {
            if observe_pod(shared, &mut st, &p) {
                shared.wake.notify_one();
            }
        }
        Change::Deleted(p) => {
            let key = pod_key(&p);
            st.pending.remove(&key);
            st.queue.remove(&key);
            if st.cache.pod_gone(&key) && st.queue.move_unschedulable(false, Instant::now()) > 0 {
                shared.wake.notify_one();
            }
        }
    }
    shared
        .stats
        .pending
        .store(st.pending.len() as u64, Ordering::Relaxed);
}

/// Takes in a pod's new state; true when the queue has new work.
fn observe_pod(shared: &Shared, st: &mut State, pod: &Pod) -> bool {
    let key = pod_key(pod);
    let spec = pod.spec.as_ref();
    let node = spec.map(|s| s.node_name.as_str()).unwrap_or("");
    let phase = pod.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
    let finished = phase == "Succeeded" || phase == "Failed";
    if !node.is_empty() {
        st.pending.remove(&key);
        st.queue.remove(&key);
        if finished {
            return st.cache.pod_gone(&key)
                && st.queue.move_unschedulable(false, Instant::now()) > 0;
        }
        // Bound by someone else while this scheduler had it assumed elsewhere: that room
        // is free again.
        return st.cache.pod_bound(&PodInfo::new(pod), node)
            && st.queue.move_unschedulable(false, Instant::now()) > 0;
    }
    let scheduler = spec.map(|s| s.scheduler_name.as_str()).unwrap_or("");
    let ours = scheduler.is_empty() || scheduler == shared.config.scheduler_name;
    let deleting = pod
        .metadata
        .as_ref()
        .is_some_and(|m| !m.deletion_timestamp.is_empty());
    if !ours || deleting || finished {
        st.pending.remove(&key);
        st.queue.remove(&key);
        return false;
    }
    let info = PodInfo::new(pod);
    let priority = info.priority;
    st.pending.insert(key.clone(), info);
    if st.cache.is_placed(&key) {
        // Assumed, bind in flight: its outcome decides what happens next.
        return false;
    }
    if st.queue.contains(&key) {
        return false;
    }
    st.queue.add(&key, priority);
    true
}

async fn schedule_loop(client: Client, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let binds = Arc::new(Semaphore::new(shared.config.bind_parallelism.max(1)));
    let mut last_flush = Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut to_bind = Vec::new();
        let mut to_report = Vec::new();
        let next_backoff = {
            let mut st = shared.lock();
            let now = Instant::now();
            if now.duration_since(last_flush) >= FLUSH_UNSCHEDULABLE {
                st.queue.move_unschedulable(false, now);
                last_flush = now;
            }
            decide(&shared, &mut st, now, &mut to_bind, &mut to_report);
            st.queue.next_backoff()
        };
        let worked = !to_bind.is_empty() || !to_report.is_empty();
        for (pod, why) in to_report {
            let reported = pod
                .scheduled_condition
                .as_ref()
                .is_some_and(|(status, message)| status == "False" && *message == why);
            if !reported {
                tracing::debug!(pod = %pod.key, "unschedulable: {why}");
                tokio::spawn(report_unschedulable(client.clone(), pod, why));
            }
        }
        for (pod, node) in to_bind {
            let Ok(permit) = binds.clone().acquire_owned().await else {
                return;
            };
            let (client, shared) = (client.clone(), shared.clone());
            tokio::spawn(async move {
                bind(&client, &shared, pod, node).await;
                drop(permit);
            });
        }
        if worked {
            tokio::task::yield_now().await;
            continue;
        }
        let wait = next_backoff
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(FLUSH_UNSCHEDULABLE)
            .min(FLUSH_UNSCHEDULABLE);
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Decides up to [`BATCH`] pods from the active queue: each is assumed onto a node (to
/// bind) or marked unschedulable (to report why).
fn decide(
    shared: &Shared,
    st: &mut State,
    now: Instant,
    to_bind: &mut Vec<(PodInfo, String)>,
    to_report: &mut Vec<(PodInfo, String)>,
) {
    while to_bind.len() + to_report.len() < BATCH {
        let Some(key) = st.queue.pop(now) else {
            break;
        };
        let Some(pod) = st.pending.get(&key) else {
            st.queue.done(&key);
            continue;
        };
        if st.cache.is_placed(&key) {
            st.queue.done(&key);
            continue;
        }
        match st.cache.schedule(pod) {
            Decision::Bind(node) => {
                st.queue.done(&key);
                to_bind.push((pod.clone(), node));
            }
            Decision::Unschedulable(why) => {
                st.queue.unschedulable(&key, now);
                shared.stats.unschedulable.fetch_add(1, Ordering::Relaxed);
                to_report.push((pod.clone(), why));
            }
        }
    }
}

/// What the API says became of a pod whose bind failed.
enum Outcome {
    BoundTo(String),
    Unbound,
    Gone,
}

async fn bind(client: &Client, shared: &Shared, pod: PodInfo, node: String) {
    let err = match client
        .bind_uid(&pod.namespace, &pod.name, &pod.uid, &node)
        .await
    {
        Ok(_) => {
            shared.stats.scheduled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(e) => e,
    };
    shared.stats.bind_errors.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(pod = %pod.key, node, "bind failed: {err}");
    // The room stays taken until the API says where the pod really is: a bind whose reply
    // was lost may have happened.
    let outcome = resolve(client, &pod, &err).await;
    settle(shared, &pod, &node, outcome, Instant::now());
    shared.wake.notify_one();
}

/// Applies what became of a pod whose bind to `node` failed.
fn settle(shared: &Shared, pod: &PodInfo, node: &str, outcome: Outcome, now: Instant) {
    let mut st = shared.lock();
    // Whether the room the pod was assumed to take is free again. Pods marked
    // unschedulable while it was held must then be tried again, or they would wait for
    // the next unrelated change (or the periodic flush) with room standing empty.
    let freed = match outcome {
        Outcome::BoundTo(n) => {
            if n == node {
                shared.stats.scheduled.fetch_add(1, Ordering::Relaxed);
            }
            st.pending.remove(&pod.key);
            st.cache.pod_bound(pod, &n)
        }
        Outcome::Unbound => {
            let freed = st.cache.forget_assumed(&pod.key);
            if freed && st.pending.contains_key(&pod.key) {
                st.queue.backoff(&pod.key, pod.priority, now);
            }
            freed
        }
        Outcome::Gone => {
            st.pending.remove(&pod.key);
            st.cache.forget_assumed(&pod.key)
        }
    };
    if freed {
        st.queue.move_unschedulable(false, now);
    }
}

async fn resolve(client: &Client, pod: &PodInfo, err: &ClientError) -> Outcome {
    if err.is_not_found() {
        return Outcome::Gone;
    }
    let mut pause = Duration::from_millis(50);
    loop {
        match client.get::<Pod>(&pod.namespace, &pod.name).await {
            Ok(p) => {
                let uid = p.metadata.as_ref().map(|m| m.uid.as_str()).unwrap_or("");
                if uid != pod.uid {
                    return Outcome::Gone;
                }
                let node = p.spec.map(|s| s.node_name).unwrap_or_default();
                return if node.is_empty() {
                    Outcome::Unbound
                } else {
                    Outcome::BoundTo(node)
                };
            }
            Err(e) if e.is_not_found() => return Outcome::Gone,
            Err(e) => {
                tracing::debug!(pod = %pod.key, "reading back a pod whose bind failed: {e}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Marks the pod `PodScheduled=False` (reason Unschedulable) and records a FailedScheduling
/// event, both naming why. Best effort: a lost race is redone on the next attempt.
async fn report_unschedulable(client: Client, pod: PodInfo, why: String) {
    let result: Result<(), ClientError> = async {
        let mut current = client.get::<Pod>(&pod.namespace, &pod.name).await?;
        let meta = current.metadata.clone().unwrap_or_default();
        if meta.uid != pod.uid
            || current
                .spec
                .as_ref()
                .is_some_and(|s| !s.node_name.is_empty())
        {
            return Ok(());
        }
        let status = current.status.get_or_insert_default();
        let now = time::now();
        match status
            .conditions
            .iter_mut()
            .find(|c| c.r#type == "PodScheduled")
        {
            Some(c) => {
                if c.status != "False" {
                    c.last_transition_time = now.clone();
                }
                c.status = "False".into();
                c.reason = "Unschedulable".into();
                c.message = why.clone();
                c.last_probe_time = now.clone();
            }
            None => status.conditions.push(PodCondition {
                r#type: "PodScheduled".into(),
                status: "False".into(),
                reason: "Unschedulable".into(),
                message: why.clone(),
                last_transition_time: now.clone(),
                last_probe_time: now.clone(),
            }),
        }
        if status.phase.is_empty() {
            status.phase = "Pending".into();
        }
        client.update_status(&current).await?;
        let object = format!("Pod/{}/{}/{}", pod.namespace, pod.name, pod.uid);
        if !flotilla_client::events::SpamFilter::global().allow(DEFAULT_SCHEDULER_NAME, &object) {
            return Ok(());
        }
        let event = Event {
            metadata: Some(ObjectMeta {
                generate_name: format!("{}.", pod.name),
                namespace: pod.namespace.clone(),
                ..Default::default()
            }),
            involved_object: Some(ObjectReference {
                kind: "Pod".into(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                ..Default::default()
            }),
            reason: "FailedScheduling".into(),
            message: why.clone(),
            source: Some(EventSource {
                component: DEFAULT_SCHEDULER_NAME.into(),
                ..Default::default()
            }),
            first_timestamp: now.clone(),
            last_timestamp: now,
            count: 1,
            r#type: "Warning".into(),
            reporting_component: DEFAULT_SCHEDULER_NAME.into(),
            ..Default::default()
        };
        flotilla_client::events::write(&client, event).await?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        tracing::debug!(pod = %pod.key, "reporting an unschedulable pod: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::node;
    use flotilla_proto::api::{Container, PodSpec, ResourceRequirements};

    fn shared() -> Shared {
        Shared {
            state: Mutex::new(State {
                cache: Cache::new(),
                queue: Queue::new(),
                pending: HashMap::new(),
            }),
            wake: Notify::new(),
            stats: Arc::default(),
            config: Config::default(),
        }
    }

    fn pod(name: &str, node: &str) -> Pod {
        Pod {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                uid: format!("uid-{name}"),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                node_name: node.into(),
                containers: vec![Container {
                    name: "main".into(),
                    resources: Some(ResourceRequirements {
                        requests: [("cpu".to_string(), "600m".to_string())].into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One node with room for one of two 600m pods: `a` is assumed onto it (bind in
    /// flight), `b` found no room and waits as unschedulable.
    fn one_assumed_one_waiting() -> (Shared, PodInfo, Instant) {
        let shared = shared();
        on_node(&shared, Change::Added(node("n1", "1", "1Gi")));
        on_pod(&shared, Change::Added(pod("a", "")));
        on_pod(&shared, Change::Added(pod("b", "")));
        let now = Instant::now();
        let (mut to_bind, mut to_report) = (Vec::new(), Vec::new());
        decide(
            &shared,
            &mut shared.lock(),
            now,
            &mut to_bind,
            &mut to_report,
        );
        assert_eq!(to_bind.len(), 1, "{to_bind:?}");
        assert_eq!(to_report.len(), 1, "{to_report:?}");
        assert_eq!(shared.lock().queue.lengths(), (0, 0, 1));
        let assumed = to_bind.remove(0).0;
        (shared, assumed, now)
    }

    /// The waiting pod is queued again (now or after its back-off) and gets the room.
    fn waiting_pod_takes_the_room(shared: &Shared, start: Instant) {
        let (active, backoff, unschedulable) = shared.lock().queue.lengths();
        assert_eq!(
            (active + backoff, unschedulable),
            (1, 0),
            "the waiting pod is not queued again"
        );
        let later = start + Duration::from_secs(60);
        let (mut to_bind, mut to_report) = (Vec::new(), Vec::new());
        decide(
            shared,
            &mut shared.lock(),
            later,
            &mut to_bind,
            &mut to_report,
        );
        assert_eq!(to_bind.len(), 1, "{to_report:?}");
        assert_eq!(to_bind[0].1, "n1");
    }

    #[test]
    fn room_freed_by_a_bind_elsewhere_is_offered_to_waiting_pods() {
        let (shared, a, now) = one_assumed_one_waiting();
        // Someone else binds `a` to another node while our bind is in flight; the watch
        // shows it before our bind fails.
        on_pod(&shared, Change::Added(pod(&a.name, "elsewhere")));
        waiting_pod_takes_the_room(&shared, now);
    }

    #[test]
    fn room_freed_by_a_lost_bind_is_offered_to_waiting_pods() {
        for outcome in [
            || Outcome::BoundTo("elsewhere".into()),
            || Outcome::Gone,
            || Outcome::Unbound,
        ] {
            let (shared, a, now) = one_assumed_one_waiting();
            settle(&shared, &a, "n1", outcome(), now);
            if shared.lock().pending.contains_key(&a.key) {
                // Unbound: `a` itself backs off and competes for the room again; either
                // of the two may get it, but neither may be left waiting for a change.
                let (active, backoff, unschedulable) = shared.lock().queue.lengths();
                assert_eq!((active + backoff, unschedulable), (2, 0));
            } else {
                waiting_pod_takes_the_room(&shared, now);
            }
        }
    }

    #[test]
    fn a_confirmed_bind_gives_no_room_back() {
        let (shared, a, now) = one_assumed_one_waiting();
        on_pod(&shared, Change::Added(pod(&a.name, "n1")));
        settle(&shared, &a, "n1", Outcome::BoundTo("n1".into()), now);
        assert_eq!(shared.lock().queue.lengths(), (0, 0, 1));
    }
}
