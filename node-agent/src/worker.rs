//! One worker per pod: drives the pod's containers to its spec through the runtime, probes
//! them, and writes the pod's status back.
//!
//! - init containers run one at a time, each to success, before the others start;
//! - a container that ends is restarted as `restartPolicy` says (Always, OnFailure,
//!   Never): the first restart at once, then after 10 s doubling to 5 min, waiting with
//!   reason CrashLoopBackOff; a container that ran 10 minutes starts its back-off over;
//! - startup, liveness (a failure restarts the container) and readiness (gates Ready)
//!   probes: exec, TCP and HTTP;
//! - deletion: every container gets SIGTERM, then SIGKILL after the grace period, then the
//!   pod object is removed.
//!
//! What the worker knows survives an agent restart: the runtime still has the containers
//! (adopted, not started again), and the pod's status has the restart counts and which
//! containers finished, so a pod that completed is never run again.

use crate::metrics::STATS;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_client::Client;
use flotilla_proto::api::quantity::{parse_bytes, parse_cpu_millis};
use flotilla_proto::api::{
    Container, ContainerState as ApiState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, DeleteRequest, Pod, PodCondition, PodStatus,
    Preconditions, Probe, Resource, time,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::probe;
use crate::runtime::{ContainerRecord, ContainerSpec, ContainerState, Runtime};

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A container that ran this long starts its back-off over.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
const TICK: Duration = Duration::from_millis(100);

/// What the dispatcher tells a worker.
#[derive(Debug)]
pub enum Msg {
    /// The pod as the API has it now.
    Update(Box<Pod>),
    /// The pod object is gone (deleted without the agent's help): stop everything.
    Gone,
}

/// Where the pods run.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    pub name: String,
    pub ip: String,
    /// Where pods' volumes live: `<dir>/<uid>/volumes/<name>`.
    pub pods_dir: std::path::PathBuf,
}

#[derive(Clone, Debug, PartialEq)]
struct Term {
    code: i32,
    signal: i32,
    reason: String,
    message: String,
    started_at: SystemTime,
    finished_at: SystemTime,
    id: String,
}

#[derive(Debug)]
struct Slot {
    c: Container,
    init: bool,
    id: Option<String>,
    restarts: i32,
    running_since: Option<SystemTime>,
    /// How the current run ended (until the container starts again).
    terminated: Option<Term>,
    /// How the run before ended.
    last: Option<Term>,
    waiting: Option<(String, String)>,
    backoff: Duration,
    next_start: Option<Instant>,
    /// Will not run again (policy, or an init container that succeeded).
    done: bool,
    started: bool,
    ready: bool,
    live_fail: i32,
    ready_ok: i32,
    ready_fail: i32,
    start_fail: i32,
    next_live: Instant,
    next_ready: Instant,
    next_startup: Instant,
}

impl Slot {
    fn new(c: Container, init: bool) -> Self {
        let now = Instant::now();
        Self {
            c,
            init,
            id: None,
            restarts: 0,
            running_since: None,
            terminated: None,
            last: None,
            waiting: Some(("ContainerCreating".into(), String::new())),
            backoff: Duration::ZERO,
            next_start: Some(now),
            done: false,
            started: false,
            ready: false,
            live_fail: 0,
            ready_ok: 0,
            ready_fail: 0,
            start_fail: 0,
            next_live: now,
            next_ready: now,
            next_startup: now,
        }
    }

    fn running(&self) -> bool {
        self.id.is_some() && self.terminated.is_none()
    }
}

pub struct Worker<R: Runtime> {
    rt: Arc<R>,
    client: Client,
    node: NodeInfo,
    pod: Pod,
    slots: Vec<Slot>,
    start_time: String,
    written: Option<PodStatus>,
    /// The pod's own address from the runtime (`None`: the node's).
    pod_ip: Option<String>,
    volumes: crate::volumes::PodVolumes,
    /// Whether every volume has been made; projected ones are refreshed from then on.
    volumes_ready: bool,
    next_volume_refresh: Instant,
}

/// How often the files of configMap, secret and downwardAPI volumes are brought up to date.
const VOLUME_REFRESH: Duration = Duration::from_secs(2);

fn policy(pod: &Pod) -> &str {
    match pod.spec.as_ref().map(|s| s.restart_policy.as_str()) {
        Some("OnFailure") => "OnFailure",
        Some("Never") => "Never",
        _ => "Always",
    }
}

fn grace_of(pod: &Pod) -> Duration {
    let meta = pod.metadata.as_ref();
    let secs = meta
        .and_then(|m| m.deletion_grace_period_seconds)
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0);
    Duration::from_secs(secs as u64)
}

fn is_deleting(pod: &Pod) -> bool {
    pod.metadata
        .as_ref()
        .is_some_and(|m| !m.deletion_timestamp.is_empty())
}

fn uid(pod: &Pod) -> String {
    pod.metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default()
}

impl<R: Runtime> Worker<R> {
    /// A worker for `pod`, adopting the runtime's `records` of it.
    pub fn new(
        rt: Arc<R>,
        client: Client,
        node: NodeInfo,
        pod: Pod,
        records: Vec<ContainerRecord>,
    ) -> Self {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut slots: Vec<Slot> = spec
            .init_containers
            .iter()
            .map(|c| Slot::new(c.clone(), true))
            .chain(spec.containers.iter().map(|c| Slot::new(c.clone(), false)))
            .collect();
        let status = pod.status.clone().unwrap_or_default();
        let finished = status.phase == "Succeeded" || status.phase == "Failed";
        let start_time = if status.start_time.is_empty() {
            time::now()
        } else {
            status.start_time.clone()
        };
        for slot in &mut slots {
            let known = status
                .container_statuses
                .iter()
                .chain(status.init_container_statuses.iter())
                .find(|s| s.name == slot.c.name);
            if let Some(s) = known {
                slot.restarts = s.restart_count;
                slot.ready = s.ready;
                let ended = s.state.as_ref().and_then(|st| st.terminated.as_ref());
                if let Some(t) = ended {
                    // Finished before: ends as it ended unless the policy restarts it.
                    let restart = match policy(&pod) {
                        "Always" => !slot.init,
                        "OnFailure" => t.exit_code != 0,
                        _ => false,
                    };
                    if !restart || (slot.init && t.exit_code == 0) {
                        slot.done = true;
                        slot.next_start = None;
                        slot.waiting = None;
                        slot.terminated = Some(Term {
                            code: t.exit_code,
                            signal: t.signal,
                            reason: t.reason.clone(),
                            message: t.message.clone(),
                            started_at: time::parse(&t.started_at)
                                .unwrap_or(SystemTime::UNIX_EPOCH),
                            finished_at: time::parse(&t.finished_at)
                                .unwrap_or(SystemTime::UNIX_EPOCH),
                            // `RUNTIME://ID` in the status; the runtime's own id here.
                            id: t
                                .container_id
                                .split_once("://")
                                .map_or(t.container_id.as_str(), |(_, id)| id)
                                .to_string(),
                        });
                    }
                }
            }
            if finished {
                slot.done = true;
                slot.next_start = None;
            }
            // The runtime's latest run of this container, if it still has one.
            if let Some(r) = records
                .iter()
                .filter(|r| r.container == slot.c.name)
                .max_by_key(|r| r.restart_count)
                && r.restart_count >= slot.restarts
            {
                slot.restarts = r.restart_count;
                slot.id = Some(r.id.clone());
                slot.waiting = None;
                slot.next_start = None;
                if let ContainerState::Running { started_at } = r.state {
                    slot.running_since = Some(started_at);
                    slot.started = slot.c.startup_probe.is_none();
                    slot.terminated = None;
                    slot.done = false;
                }
            }
        }
        let volumes =
            crate::volumes::PodVolumes::new(node.pods_dir.join(uid(&pod)).join("volumes"));
        Self {
            rt,
            client,
            node,
            pod,
            slots,
            start_time,
            written: None,
            pod_ip: None,
            volumes,
            volumes_ready: false,
            next_volume_refresh: Instant::now(),
        }
    }

    /// The pod's address: its own if the runtime gave it one, else the node's.
    fn ip(&self) -> &str {
        self.pod_ip.as_deref().unwrap_or(&self.node.ip)
    }

    /// The variables every container gets before its own.
    fn base_env(&self) -> Vec<(String, String)> {
        let meta = self.pod.metadata.clone().unwrap_or_default();
        vec![
            ("POD_NAME".into(), meta.name),
            ("POD_NAMESPACE".into(), meta.namespace),
            ("POD_IP".into(), self.ip().to_string()),
            ("NODE_NAME".into(), self.node.name.clone()),
        ]
    }

    fn container_spec(&self, slot: &Slot) -> ContainerSpec {
        let meta = self.pod.metadata.clone().unwrap_or_default();
        let limits = slot
            .c
            .resources
            .as_ref()
            .map(|r| r.limits.clone())
            .unwrap_or_default();
        let mut env = self.base_env();
        // The containers' own variables, `valueFrom` and `envFrom` among them, are resolved
        // when it starts (see [`crate::env`]); probes run with the plain values.
        env.extend(
            slot.c
                .env
                .iter()
                .filter(|e| e.value_from.is_none())
                .map(|e| (e.name.clone(), e.value.clone())),
        );
        ContainerSpec {
            pod_uid: meta.uid,
            pod_namespace: meta.namespace,
            pod_name: meta.name,
            name: slot.c.name.clone(),
            image: slot.c.image.clone(),
            command: slot.c.command.clone(),
            args: slot.c.args.clone(),
            env,
            working_dir: slot.c.working_dir.clone(),
            restart_count: slot.restarts,
            cpu_limit_milli: limits
                .get("cpu")
                .and_then(|q| parse_cpu_millis(q).ok())
                .unwrap_or(0),
            memory_limit: limits
                .get("memory")
                .and_then(|q| parse_bytes(q).ok())
                .unwrap_or(0),
            mounts: Vec::new(),
        }
    }

    /// Runs until the pod is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        // Adopted containers: their pod already has its address, and its volumes (made
        // again where missing, refreshed from then on, found for their cleanup).
        if self.slots.iter().any(|s| s.id.is_some()) {
            self.pod_ip = self.rt.pod_ip(&uid(&self.pod)).await;
            if let Err(e) = self.prepare_volumes().await {
                tracing::warn!(pod = self.pod.name(), "{e}");
            }
        }
        // Act at once on a new pod, then on every change or tick.
        if !is_deleting(&self.pod) {
            self.step().await;
            self.report().await;
        }
        loop {
            let mut gone = false;
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Msg::Update(p)) => self.pod = *p,
                    Some(Msg::Gone) | None => gone = true,
                },
                _ = tokio::time::sleep(TICK) => {}
            }
            while let Ok(m) = rx.try_recv() {
                match m {
                    Msg::Update(p) => self.pod = *p,
                    Msg::Gone => gone = true,
                }
            }
            if gone || is_deleting(&self.pod) {
                self.terminate(gone).await;
                return;
            }
            self.refresh_volumes().await;
            self.step().await;
            self.report().await;
        }
    }

    /// Makes the pod's volumes; `Err` is the kubelet's `MountVolume.SetUp failed` message.
    async fn prepare_volumes(&mut self) -> Result<(), String> {
        let cx = crate::env::Context {
            client: &self.client,
            pod: &self.pod,
            pod_ip: self.pod_ip.as_deref().unwrap_or(&self.node.ip),
            node_name: &self.node.name,
            host_ip: &self.node.ip,
        };
        self.volumes.prepare(&cx).await?;
        self.volumes_ready = true;
        self.next_volume_refresh = Instant::now() + VOLUME_REFRESH;
        Ok(())
    }

    /// Brings projected volumes up to date with their sources, every [`VOLUME_REFRESH`].
    async fn refresh_volumes(&mut self) {
        if !self.volumes_ready
            || Instant::now() < self.next_volume_refresh
            || !crate::volumes::PodVolumes::has_projected(&self.pod)
        {
            return;
        }
        if let Err(e) = self.prepare_volumes().await {
            tracing::warn!(pod = self.pod.name(), "{e}");
            self.next_volume_refresh = Instant::now() + VOLUME_REFRESH;
        }
    }

    async fn start(&mut self, i: usize) {
        let mut spec = self.container_spec(&self.slots[i]);
        // A run after one that ended is a restart: it counts once it has started.
        if self.slots[i].terminated.is_some() {
            spec.restart_count += 1;
        }
        let now = Instant::now();
        if !self.volumes_ready
            && let Err(message) = self.prepare_volumes().await
        {
            tracing::warn!(pod = self.pod.name(), container = spec.name, "{message}");
            let s = &mut self.slots[i];
            s.waiting = Some(("ContainerCreating".into(), message));
            let wait = next_backoff(&mut s.backoff);
            s.next_start = Some(now + wait);
            return;
        }
        match self.volumes.mounts(&self.pod, &self.slots[i].c) {
            Ok(mounts) => spec.mounts = mounts,
            Err(message) => {
                tracing::warn!(pod = self.pod.name(), container = spec.name, "{message}");
                let s = &mut self.slots[i];
                s.waiting = Some(("CreateContainerConfigError".into(), message));
                let wait = next_backoff(&mut s.backoff);
                s.next_start = Some(now + wait);
                return;
            }
        }
        let cx = crate::env::Context {
            client: &self.client,
            pod: &self.pod,
            pod_ip: self.ip(),
            node_name: &self.node.name,
            host_ip: &self.node.ip,
        };
        match crate::env::resolve(&cx, &self.slots[i].c, self.base_env()).await {
            Ok(env) => {
                // `$(VAR)` in the command and its arguments, as the kubelet expands them.
                spec.command = crate::env::expand_all(&spec.command, &env);
                spec.args = crate::env::expand_all(&spec.args, &env);
                spec.env = env;
            }
            Err(message) => {
                tracing::warn!(pod = self.pod.name(), container = spec.name, "{message}");
                let s = &mut self.slots[i];
                s.waiting = Some(("CreateContainerConfigError".into(), message));
                let wait = next_backoff(&mut s.backoff);
                s.next_start = Some(now + wait);
                return;
            }
        }
        match self.rt.start(&spec).await {
            Ok(id) => {
                count(&STATS.container_starts);
                if self.pod_ip.is_none() {
                    self.pod_ip = self.rt.pod_ip(&spec.pod_uid).await;
                }
                // The runtime's own start time, the one an agent that adopts this container
                // after a restart will read: the pod's startedAt must not move then.
                let running_since = match self.rt.state(&id).await {
                    ContainerState::Running { started_at } => started_at,
                    _ => SystemTime::now(),
                };
                let probe_delay = |p: &Option<Probe>| {
                    now + Duration::from_secs(
                        p.as_ref()
                            .map(|p| p.initial_delay_seconds.max(0) as u64)
                            .unwrap_or(0),
                    )
                };
                let s = &mut self.slots[i];
                s.restarts = spec.restart_count;
                s.next_live = probe_delay(&s.c.liveness_probe);
                s.next_ready = probe_delay(&s.c.readiness_probe);
                s.next_startup = probe_delay(&s.c.startup_probe);
                s.id = Some(id);
                s.running_since = Some(running_since);
                // Keep the run that just ended (for `logs --previous`), not the one before.
                let mut older = None;
                if let Some(t) = s.terminated.take() {
                    older = s.last.replace(t);
                }
                s.waiting = None;
                s.next_start = None;
                s.started = s.c.startup_probe.is_none();
                s.ready = false;
                s.live_fail = 0;
                s.ready_ok = 0;
                s.ready_fail = 0;
                s.start_fail = 0;
                if let Some(t) = older
                    && !t.id.is_empty()
                {
                    self.rt.remove(&t.id).await;
                }
            }
            Err(e) => {
                count(&STATS.container_start_failures);
                tracing::warn!(
                    pod = self.pod.name(),
                    container = spec.name,
                    "start failed: {e}"
                );
                let s = &mut self.slots[i];
                s.waiting = Some(("RunContainerError".into(), e.to_string()));
                let wait = next_backoff(&mut s.backoff);
                s.next_start = Some(now + wait);
            }
        }
    }

    /// The container's run ended: note how, and when (or whether) it starts again.
    fn ended(&mut self, i: usize, state: ContainerState) {
        count(&STATS.container_exits);
        let policy = policy(&self.pod).to_string();
        let pod_name = self.pod.name().to_string();
        let s = &mut self.slots[i];
        let id = s.id.clone().unwrap_or_default();
        let term = match state {
            ContainerState::Exited {
                exit_code,
                signal,
                reason,
                started_at,
                finished_at,
            } => Term {
                code: exit_code,
                signal,
                reason,
                message: String::new(),
                started_at,
                finished_at,
                id,
            },
            _ => Term {
                code: 137,
                signal: 0,
                reason: "ContainerStatusUnknown".into(),
                message: "the container could not be found".into(),
                started_at: s.running_since.unwrap_or(SystemTime::UNIX_EPOCH),
                finished_at: SystemTime::now(),
                id,
            },
        };
        let ran = term
            .finished_at
            .duration_since(term.started_at)
            .unwrap_or_default();
        s.ready = false;
        s.started = false;
        let restart = if s.init {
            term.code != 0 && policy != "Never"
        } else {
            match policy.as_str() {
                "Always" => true,
                "OnFailure" => term.code != 0,
                _ => false,
            }
        };
        s.terminated = Some(term);
        s.id = None;
        if restart {
            if ran >= BACKOFF_RESET {
                s.backoff = Duration::ZERO;
            }
            let wait = next_backoff(&mut s.backoff);
            s.next_start = Some(Instant::now() + wait);
            if !wait.is_zero() {
                s.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={} pod={pod_name}",
                        wait.as_secs(),
                        s.c.name
                    ),
                ));
            }
        } else {
            s.done = true;
            s.next_start = None;
        }
    }

    async fn step(&mut self) {
        let now = Instant::now();
        // Init containers, one at a time.
        for i in 0..self.slots.len() {
            if !self.slots[i].init {
                continue;
            }
            let s = &self.slots[i];
            if s.done && s.terminated.as_ref().is_some_and(|t| t.code == 0) {
                continue;
            }
            if s.done {
                return; // failed for good: the pod has failed
            }
            self.drive(i, now).await;
            return;
        }
        for i in 0..self.slots.len() {
            if !self.slots[i].init {
                self.drive(i, now).await;
            }
        }
    }

    /// Starts, watches and probes one container.
    async fn drive(&mut self, i: usize, now: Instant) {
        let s = &self.slots[i];
        match s.id.clone() {
            None => {
                if !s.done && s.next_start.is_some_and(|t| now >= t) {
                    self.start(i).await;
                }
            }
            Some(id) => match self.rt.state(&id).await {
                ContainerState::Running { .. } => self.probe(i, &id, now).await,
                other => self.ended(i, other),
            },
        }
    }

    async fn probe(&mut self, i: usize, id: &str, now: Instant) {
        let spec = self.container_spec(&self.slots[i]);
        let ip = self.ip().to_string();
        let period = |p: &Probe| {
            Duration::from_secs(if p.period_seconds > 0 {
                p.period_seconds as u64
            } else {
                10
            })
        };
        let threshold = |n: i32, default: i32| if n > 0 { n } else { default };
        // Startup first; liveness and readiness only once it passed.
        if let Some(p) = self.slots[i].c.startup_probe.clone()
            && !self.slots[i].started
        {
            if now >= self.slots[i].next_startup {
                let ok = probe::run(&*self.rt, id, &spec, &self.slots[i].c, &p, &ip).await;
                let s = &mut self.slots[i];
                s.next_startup = now + period(&p);
                if ok {
                    s.started = true;
                } else {
                    s.start_fail += 1;
                    if s.start_fail >= threshold(p.failure_threshold, 3) {
                        self.kill_for_probe(i, id, "startup").await;
                    }
                }
            }
            return;
        }
        self.slots[i].started = true;
        if let Some(p) = self.slots[i].c.liveness_probe.clone()
            && now >= self.slots[i].next_live
        {
            let ok = probe::run(&*self.rt, id, &spec, &self.slots[i].c, &p, &ip).await;
            let s = &mut self.slots[i];
            s.next_live = now + period(&p);
            if ok {
                s.live_fail = 0;
            } else {
                s.live_fail += 1;
                if s.live_fail >= threshold(p.failure_threshold, 3) {
                    self.kill_for_probe(i, id, "liveness").await;
                    return;
                }
            }
        }
        match self.slots[i].c.readiness_probe.clone() {
            None => self.slots[i].ready = true,
            Some(p) => {
                if now >= self.slots[i].next_ready {
                    let ok = probe::run(&*self.rt, id, &spec, &self.slots[i].c, &p, &ip).await;
                    let s = &mut self.slots[i];
                    s.next_ready = now + period(&p);
                    if ok {
                        s.ready_fail = 0;
                        s.ready_ok += 1;
                        if s.ready_ok >= threshold(p.success_threshold, 1) {
                            s.ready = true;
                        }
                    } else {
                        s.ready_ok = 0;
                        s.ready_fail += 1;
                        if s.ready_fail >= threshold(p.failure_threshold, 3) {
                            s.ready = false;
                        }
                    }
                }
            }
        }
    }

    async fn kill_for_probe(&mut self, i: usize, id: &str, which: &str) {
        tracing::info!(
            pod = self.pod.name(),
            container = self.slots[i].c.name,
            "{which} probe failed: restarting"
        );
        self.rt.stop(id, grace_of(&self.pod)).await;
        let state = self.rt.state(id).await;
        self.ended(i, state);
        // The run that just ended (it moves to `last` when the container starts again).
        if let Some(t) = self.slots[i].terminated.as_mut() {
            t.message = format!("container failed its {which} probe");
        }
    }

    /// Stops every container (the pod is being deleted, or gone), then removes the pod.
    async fn terminate(&mut self, gone: bool) {
        let grace = grace_of(&self.pod);
        let ids: Vec<String> = self.slots.iter().filter_map(|s| s.id.clone()).collect();
        let stops = ids.iter().map(|id| self.rt.stop(id, grace));
        futures_join(stops).await;
        for s in &self.slots {
            for id in [
                s.id.as_ref(),
                s.terminated.as_ref().map(|t| &t.id),
                s.last.as_ref().map(|t| &t.id),
            ]
            .into_iter()
            .flatten()
            {
                self.rt.remove(id).await;
            }
        }
        self.volumes.remove();
        if gone {
            return;
        }
        // The containers are stopped: the pod object can go.
        let req = DeleteRequest {
            namespace: self.pod.namespace().to_string(),
            name: self.pod.name().to_string(),
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: uid(&self.pod),
                ..Default::default()
            }),
            ..Default::default()
        };
        for attempt in 0..10 {
            match self.client.delete::<Pod>(&req).await {
                Ok(_) => return,
                Err(e) if e.is_not_found() || e.is_conflict() => return,
                Err(e) => {
                    tracing::debug!(pod = self.pod.name(), "removing the pod: {e}");
                    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
                }
            }
        }
    }

    fn status(&self) -> PodStatus {
        let old = self.pod.status.clone().unwrap_or_default();
        let inits: Vec<&Slot> = self.slots.iter().filter(|s| s.init).collect();
        let apps: Vec<&Slot> = self.slots.iter().filter(|s| !s.init).collect();
        let init_failed = inits
            .iter()
            .any(|s| s.done && s.terminated.as_ref().is_some_and(|t| t.code != 0));
        let initialized = inits
            .iter()
            .all(|s| s.done && s.terminated.as_ref().is_some_and(|t| t.code == 0));
        let phase = if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if !apps.is_empty() && apps.iter().all(|s| s.done) {
            if apps
                .iter()
                .all(|s| s.terminated.as_ref().is_some_and(|t| t.code == 0))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if apps
            .iter()
            .any(|s| s.running() || s.restarts > 0 || s.terminated.is_some())
        {
            "Running"
        } else {
            "Pending"
        };
        let all_ready =
            initialized && !apps.is_empty() && apps.iter().all(|s| s.running() && s.ready);
        let flag = |b: bool| if b { "True" } else { "False" }.to_string();
        let mut conditions: Vec<PodCondition> = Vec::new();
        let keep = |kind: &str, status: String, reason: &str| {
            let prev = old.conditions.iter().find(|c| c.r#type == kind);
            PodCondition {
                r#type: kind.into(),
                last_transition_time: match prev {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => time::now(),
                },
                status,
                reason: reason.into(),
                ..Default::default()
            }
        };
        if let Some(c) = old.conditions.iter().find(|c| c.r#type == "PodScheduled") {
            conditions.push(c.clone());
        }
        conditions.push(keep("Initialized", flag(initialized), ""));
        let reason = if all_ready { "" } else { "ContainersNotReady" };
        conditions.push(keep("ContainersReady", flag(all_ready), reason));
        conditions.push(keep("Ready", flag(all_ready), reason));
        let statuses = |init: bool| -> Vec<ContainerStatus> {
            self.slots
                .iter()
                .filter(|s| s.init == init)
                .map(|s| container_status(s, self.rt.name()))
                .collect()
        };
        PodStatus {
            phase: phase.into(),
            conditions,
            message: String::new(),
            reason: String::new(),
            host_ip: self.node.ip.clone(),
            pod_ip: self.ip().to_string(),
            start_time: self.start_time.clone(),
            container_statuses: statuses(false),
            init_container_statuses: statuses(true),
        }
    }

    /// Writes the status when it changed.
    async fn report(&mut self) {
        let status = self.status();
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let mut pod = self.pod.clone();
        for _ in 0..3 {
            pod.status = Some(status.clone());
            match self.client.update_status(&pod).await {
                Ok(p) => {
                    count(&STATS.status_updates);
                    self.pod = p;
                    self.written = Some(status);
                    return;
                }
                Err(e) if e.is_conflict() => {
                    match self
                        .client
                        .get::<Pod>(self.pod.namespace(), self.pod.name())
                        .await
                    {
                        Ok(fresh) if uid(&fresh) == uid(&self.pod) => {
                            // Keep the scheduler's condition as the server has it.
                            pod = fresh;
                        }
                        _ => return,
                    }
                }
                Err(e) => {
                    count(&STATS.status_update_failures);
                    tracing::debug!(pod = self.pod.name(), "writing the status: {e}");
                    return;
                }
            }
        }
    }
}

fn count(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn next_backoff(current: &mut Duration) -> Duration {
    let wait = *current;
    *current = if current.is_zero() {
        INITIAL_BACKOFF
    } else {
        (*current * 2).min(MAX_BACKOFF)
    };
    wait
}

fn term_state(t: &Term, runtime: &str) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: t.code,
        signal: t.signal,
        reason: t.reason.clone(),
        message: t.message.clone(),
        started_at: time::format(t.started_at),
        finished_at: time::format(t.finished_at),
        container_id: format!("{runtime}://{}", t.id),
    }
}

fn container_status(s: &Slot, runtime: &str) -> ContainerStatus {
    let state = if s.running() {
        ApiState {
            running: Some(ContainerStateRunning {
                started_at: s.running_since.map(time::format).unwrap_or_default(),
            }),
            ..Default::default()
        }
    } else if let Some((reason, message)) = &s.waiting {
        ApiState {
            waiting: Some(ContainerStateWaiting {
                reason: reason.clone(),
                message: message.clone(),
            }),
            ..Default::default()
        }
    } else if let Some(t) = &s.terminated {
        ApiState {
            terminated: Some(term_state(t, runtime)),
            ..Default::default()
        }
    } else {
        ApiState {
            waiting: Some(ContainerStateWaiting {
                reason: "PodInitializing".into(),
                message: String::new(),
            }),
            ..Default::default()
        }
    };
    // While waiting to restart, the last run is the one that ended.
    let last = if s.running() || s.waiting.is_some() {
        s.terminated.as_ref().or(s.last.as_ref())
    } else {
        s.last.as_ref()
    };
    ContainerStatus {
        name: s.c.name.clone(),
        state: Some(state),
        last_state: last.map(|t| ApiState {
            terminated: Some(term_state(t, runtime)),
            ..Default::default()
        }),
        ready: s.running() && s.ready,
        restart_count: s.restarts,
        image: s.c.image.clone(),
        image_id: String::new(),
        container_id: s
            .id
            .as_ref()
            .map(|id| format!("{runtime}://{id}"))
            .unwrap_or_default(),
        started: Some(s.running() && s.started),
    }
}

/// Runs the futures together until all are done.
pub async fn futures_join<F: Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let all: Vec<F> = futures.collect();
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = all.into_iter().map(Box::pin).collect();
    // Poll them together: stops run their grace periods at the same time.
    std::future::poll_fn(|cx| {
        pinned.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_immediate_then_doubles_from_10s_to_5min() {
        let mut b = Duration::ZERO;
        let waits: Vec<u64> = (0..8).map(|_| next_backoff(&mut b).as_secs()).collect();
        assert_eq!(waits, [0, 10, 20, 40, 80, 160, 300, 300]);
    }
}
