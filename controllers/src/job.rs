//! The Job controller: runs a Job's pods until `completions` of them have succeeded, at
//! most `parallelism` at once, as Kubernetes' Job controller does.
//!
//! - **NonIndexed** (the default): any `completions` successes finish the Job. With no
//!   `completions`, the pods are a work queue: the first success means no new pod starts,
//!   and the Job is complete once none runs.
//! - **Indexed**: each pod carries an index `0..completions` (annotation and label
//!   `batch.kubernetes.io/job-completion-index`, env `JOB_COMPLETION_INDEX`); the Job is
//!   complete when every index has a succeeded pod. `status.completedIndexes` lists them.
//! - **Failures**: more failed pods than `backoffLimit`, or with `restartPolicy: OnFailure`
//!   as many container restarts in running pods as the limit, fail the Job
//!   (`BackoffLimitExceeded`); so does running
//!   longer than `activeDeadlineSeconds` (`DeadlineExceeded`). A failed Job's running pods
//!   are deleted. A replacement for a failed pod waits 10 s, doubling per failure up to
//!   6 min (Kubernetes' pod failure back-off).
//! - **suspend**: running pods are deleted and the `Suspended` condition set; on resume
//!   `startTime` restarts (so does the deadline).
//! - **ttlSecondsAfterFinished**: a finished Job is deleted that long after it finished;
//!   the garbage collector then removes its pods.
//!
//! Counts come from the Job's pods as they are: a finished pod deleted by hand is no longer
//! counted (Kubernetes keeps such counts with a tracking finalizer; Flotilla does not yet).
//! Like the ReplicaSet controller it remembers the pods it asked for and has not yet seen,
//! so a lagging cache never makes it start more pods than it wants.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_proto::api::batch::{
    COMPLETION_INDEX, COMPLETION_INDEX_ENV, format_indexes, parse_indexes,
};
use flotilla_proto::api::{
    EnvVar, Job, JobCondition, JobSpec, JobStatus, ObjectMeta, Pod, Resource, time,
};

use crate::queue::Requeue;
use crate::runtime::{Api, Controller};
use crate::util::{
    controller_of, controller_ref, delete_exactly, is_deleting, is_ready, phase, split_key, uid_of,
};

const COMPONENT: &str = "job-controller";
/// Most pods created in one pass (Kubernetes' burst of 500).
pub const BURST: usize = 500;
/// A replacement for a failed pod waits this long, doubled per failure...
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// ...up to this.
pub const BACKOFF_MAX: Duration = Duration::from_secs(360);
/// Pods asked for and not seen within this long are no longer waited for.
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Pods a Job's reconcile asked for (by name, with their index) or asked to delete, and
/// that the cache does not show yet.
#[derive(Debug)]
struct Pending {
    /// The Job it is about: a namesake made since starts afresh.
    uid: String,
    created: HashMap<String, Option<i32>>,
    deleted: BTreeSet<String>,
    since: SystemTime,
}

#[derive(Default)]
pub struct JobController {
    pending: Mutex<HashMap<String, Pending>>,
}

impl Controller for JobController {
    type Kind = Job;
    const NAME: &'static str = "job";

    async fn reconcile<A: Api>(&self, api: &A, key: &str) -> Result<Requeue, ClientError> {
        let (ns, name) = split_key(key);
        let Some(job) = api.get::<Job>(ns, name) else {
            self.with_pending(|p| p.remove(key));
            return Ok(None);
        };
        if is_deleting(&job) {
            return Ok(None);
        }
        let uid = uid_of(&job).to_string();
        let pods: Vec<Pod> = api.list(ns, |p: &Pod| {
            controller_of(p.metadata.as_ref()).is_some_and(|r| r.uid == uid)
        });
        let now = api.now();
        let pending = self.observe(key, &uid, &pods, now);
        let mut state = State::new(&job, pods, &pending);
        let outcome = self.sync(api, key, &job, &mut state, now).await;
        // The status is written whatever the pass did, so counts stay true even when a
        // create failed.
        let written = write_status(api, &job, &state).await;
        let requeue = outcome?;
        written?;
        Ok(requeue)
    }
}

/// The Job's pods, sorted out.
struct State {
    spec: JobSpec,
    status: JobStatus,
    /// Running or pending pods, including those asked for and not yet seen.
    active: Vec<Pod>,
    /// Names (and indexes) of pods asked for and not yet in the cache.
    phantom: Vec<Option<i32>>,
    succeeded: i32,
    failed: i32,
    /// Container restarts of running and pending pods under `restartPolicy: OnFailure`.
    restarts: i32,
    /// When the last pod failed.
    last_failure: Option<SystemTime>,
    completed: BTreeSet<i32>,
}

/// An Indexed Job's pod's index.
fn index_of(p: &Pod) -> Option<i32> {
    p.metadata
        .as_ref()?
        .annotations
        .get(COMPLETION_INDEX)?
        .parse()
        .ok()
}

fn finished_at(p: &Pod) -> Option<SystemTime> {
    p.status
        .as_ref()?
        .container_statuses
        .iter()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref())
        .filter_map(|t| time::parse(&t.finished_at))
        .max()
}

fn holds(status: &JobStatus, kind: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.r#type == kind && c.status == "True")
}

impl State {
    fn new(job: &Job, pods: Vec<Pod>, pending: &Pending) -> Self {
        let spec = job.spec.clone().unwrap_or_default();
        let status = job.status.clone().unwrap_or_default();
        let indexed = spec.completion_mode == "Indexed";
        let limit = spec.completions.unwrap_or(0);
        let on_failure = spec
            .template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .is_some_and(|s| s.restart_policy == "OnFailure");
        let mut s = State {
            spec,
            status,
            active: Vec::new(),
            phantom: pending.created.values().copied().collect(),
            succeeded: 0,
            failed: 0,
            restarts: 0,
            last_failure: None,
            completed: BTreeSet::new(),
        };
        for p in pods {
            // Under OnFailure a failing container restarts in place: its restarts count, on
            // pods still running or pending, init containers included (Kubernetes'
            // pastBackoffLimitOnFailure).
            if on_failure && matches!(phase(&p), "Running" | "Pending") {
                let restarts = p
                    .status
                    .as_ref()
                    .map(|st| {
                        st.container_statuses
                            .iter()
                            .chain(&st.init_container_statuses)
                            .fold(0i32, |n, c| n.saturating_add(c.restart_count.max(0)))
                    })
                    .unwrap_or(0);
                s.restarts = s.restarts.saturating_add(restarts);
            }
            match phase(&p) {
                "Succeeded" => {
                    s.succeeded += 1;
                    if indexed && let Some(i) = index_of(&p).filter(|i| (0..limit).contains(i)) {
                        s.completed.insert(i);
                    }
                }
                "Failed" => {
                    s.failed += 1;
                    s.last_failure = s.last_failure.max(finished_at(&p));
                }
                _ if is_deleting(&p) || pending.deleted.contains(p.name()) => {}
                _ => s.active.push(p),
            }
        }
        // An Indexed Job's succeeded count is its completed indexes.
        if indexed {
            s.completed
                .extend(parse_indexes(&s.status.completed_indexes, limit));
            s.succeeded = s.completed.len() as i32;
        }
        s
    }

    fn active_count(&self) -> i32 {
        (self.active.len() + self.phantom.len()) as i32
    }

    fn finished(&self) -> bool {
        holds(&self.status, "Complete") || holds(&self.status, "Failed")
    }

    fn set_condition(&mut self, kind: &str, status: &str, reason: &str, message: &str, now: &str) {
        let c = JobCondition {
            r#type: kind.into(),
            status: status.into(),
            last_probe_time: now.into(),
            last_transition_time: now.into(),
            reason: reason.into(),
            message: message.into(),
        };
        match self.status.conditions.iter_mut().find(|c| c.r#type == kind) {
            Some(old) if old.status == status => {}
            Some(old) => *old = c,
            None => self.status.conditions.push(c),
        }
    }
}

impl JobController {
    fn with_pending<R>(&self, f: impl FnOnce(&mut HashMap<String, Pending>) -> R) -> R {
        f(&mut self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Drops from the Job's pending pods what the cache now shows; returns what is left.
    fn observe(&self, key: &str, uid: &str, pods: &[Pod], now: SystemTime) -> Pending {
        let empty = || Pending {
            uid: uid.to_string(),
            created: HashMap::new(),
            deleted: BTreeSet::new(),
            since: now,
        };
        self.with_pending(|all| {
            if all.get(key).is_some_and(|p| p.uid != uid) {
                all.remove(key);
            }
            let Some(p) = all.get_mut(key) else {
                return empty();
            };
            let names: BTreeSet<&str> = pods.iter().map(|p| p.name()).collect();
            p.created.retain(|n, _| !names.contains(n.as_str()));
            p.deleted.retain(|n| names.contains(n.as_str()));
            let expired = now.duration_since(p.since).unwrap_or_default() > EXPECTATION_TIMEOUT;
            if expired || (p.created.is_empty() && p.deleted.is_empty()) {
                all.remove(key);
                return empty();
            }
            Pending {
                uid: p.uid.clone(),
                created: p.created.clone(),
                deleted: p.deleted.clone(),
                since: p.since,
            }
        })
    }

    fn expect(&self, key: &str, uid: &str, now: SystemTime, change: impl FnOnce(&mut Pending)) {
        self.with_pending(|all| {
            let p = all.entry(key.to_string()).or_insert_with(|| Pending {
                uid: uid.to_string(),
                created: HashMap::new(),
                deleted: BTreeSet::new(),
                since: now,
            });
            p.since = now;
            change(p);
        });
    }

    async fn sync<A: Api>(
        &self,
        api: &A,
        key: &str,
        job: &Job,
        s: &mut State,
        now: SystemTime,
    ) -> Result<Requeue, ClientError> {
        let stamp = time::format(now);
        if s.finished() {
            // A failed Job's pods may still be running after a lost delete.
            self.delete_pods(api, key, job, std::mem::take(&mut s.active), now)
                .await?;
            return self.expire(api, job, s, now).await;
        }
        if s.spec.suspend == Some(true) {
            let running = std::mem::take(&mut s.active);
            self.delete_pods(api, key, job, running, now).await?;
            if !holds(&s.status, "Suspended") {
                s.set_condition("Suspended", "True", "JobSuspended", "Job suspended", &stamp);
                api.record(
                    COMPONENT,
                    job,
                    "Normal",
                    "Suspended",
                    "Job suspended".into(),
                );
            }
            return Ok(None);
        }
        if holds(&s.status, "Suspended") {
            s.set_condition("Suspended", "False", "JobResumed", "Job resumed", &stamp);
            s.status.start_time = stamp.clone();
            api.record(COMPONENT, job, "Normal", "Resumed", "Job resumed".into());
        }
        if s.status.start_time.is_empty() {
            s.status.start_time = stamp.clone();
        }

        // Failure: too many failures, or past the deadline.
        let started = time::parse(&s.status.start_time).unwrap_or(now);
        let elapsed = now.duration_since(started).unwrap_or_default();
        let deadline = s
            .spec
            .active_deadline_seconds
            .map(|d| Duration::from_secs(d.max(0) as u64));
        // More failed pods than the limit, or (OnFailure) as many restarts as the limit (any
        // with a limit of 0), as Kubernetes counts them.
        let limit = s.spec.backoff_limit.unwrap_or(6);
        let too_many_restarts = if limit == 0 {
            s.restarts > 0
        } else {
            s.restarts >= limit
        };
        let failure = if s.failed > limit || too_many_restarts {
            Some((
                "BackoffLimitExceeded",
                "Job has reached the specified backoff limit",
            ))
        } else if deadline.is_some_and(|d| elapsed >= d) {
            Some((
                "DeadlineExceeded",
                "Job was active longer than specified deadline",
            ))
        } else {
            None
        };
        if let Some((reason, message)) = failure {
            let running = std::mem::take(&mut s.active);
            s.phantom.clear();
            self.delete_pods(api, key, job, running, now).await?;
            s.set_condition("Failed", "True", reason, message, &stamp);
            api.record(COMPONENT, job, "Warning", reason, message.into());
            return self.expire(api, job, s, now).await;
        }

        // Completion.
        let indexed = s.spec.completion_mode == "Indexed";
        let parallelism = s.spec.parallelism.unwrap_or(1).max(0);
        let done = match (indexed, s.spec.completions) {
            (true, Some(c)) => s.completed.len() as i32 >= c,
            (false, Some(c)) => s.succeeded >= c,
            (_, None) => s.succeeded > 0 && s.active_count() == 0,
        };
        if done {
            let extra = std::mem::take(&mut s.active);
            s.phantom.clear();
            self.delete_pods(api, key, job, extra, now).await?;
            s.set_condition("Complete", "True", "", "", &stamp);
            s.status.completion_time = stamp;
            api.record(
                COMPONENT,
                job,
                "Normal",
                "Completed",
                "Job completed".into(),
            );
            return self.expire(api, job, s, now).await;
        }

        // How many should run.
        let wanted = match s.spec.completions {
            Some(c) => parallelism.min(c - s.succeeded).max(0),
            // A work queue: after the first success no new pod starts.
            None if s.succeeded > 0 => s.active_count(),
            None => parallelism,
        };
        let active = s.active_count();
        let requeue = deadline.map(|d| d.saturating_sub(elapsed));
        if active > wanted {
            let surplus = (active - wanted) as usize;
            // Unready and newest pods go first.
            s.active
                .sort_by(|a, b| (is_ready(a), creation(b)).cmp(&(is_ready(b), creation(a))));
            let gone: Vec<Pod> = s.active.drain(..surplus.min(s.active.len())).collect();
            self.delete_pods(api, key, job, gone, now).await?;
        } else if active < wanted {
            let wait = backoff(s.failed, s.last_failure, now);
            if !wait.is_zero() {
                return Ok(Some(requeue.map_or(wait, |r| r.min(wait))));
            }
            let count = ((wanted - active) as usize).min(BURST);
            let indexes: Vec<Option<i32>> = if indexed {
                let taken: BTreeSet<i32> = s
                    .active
                    .iter()
                    .filter_map(index_of)
                    .chain(s.phantom.iter().flatten().copied())
                    .chain(s.completed.iter().copied())
                    .collect();
                (0..s.spec.completions.unwrap_or(0))
                    .filter(|i| !taken.contains(i))
                    .take(count)
                    .map(Some)
                    .collect()
            } else {
                vec![None; count]
            };
            for index in indexes {
                let pod = pod_for(job, &s.spec, index);
                let created = api.create(&pod).await?;
                let name = created.name().to_string();
                self.expect(key, uid_of(job), now, |p| {
                    p.created.insert(name.clone(), index);
                });
                api.record(
                    COMPONENT,
                    job,
                    "Normal",
                    "SuccessfulCreate",
                    format!("Created pod: {name}"),
                );
                s.phantom.push(index);
            }
        }
        Ok(requeue)
    }

    /// A finished Job with `ttlSecondsAfterFinished` is deleted once that has passed.
    async fn expire<A: Api>(
        &self,
        api: &A,
        job: &Job,
        s: &State,
        now: SystemTime,
    ) -> Result<Requeue, ClientError> {
        let Some(ttl) = s.spec.ttl_seconds_after_finished else {
            return Ok(None);
        };
        let finished = s
            .status
            .conditions
            .iter()
            .filter(|c| (c.r#type == "Complete" || c.r#type == "Failed") && c.status == "True")
            .filter_map(|c| time::parse(&c.last_transition_time))
            .max()
            .unwrap_or(now);
        let due = finished + Duration::from_secs(ttl.max(0) as u64);
        if now < due {
            return Ok(Some(due.duration_since(now).unwrap_or_default()));
        }
        match api.delete::<Job>(&delete_exactly(job, "Background")).await {
            Ok(_) => Ok(None),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn delete_pods<A: Api>(
        &self,
        api: &A,
        key: &str,
        job: &Job,
        pods: Vec<Pod>,
        now: SystemTime,
    ) -> Result<(), ClientError> {
        for p in pods {
            match api.delete::<Pod>(&delete_exactly(&p, "")).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
            let name = p.name().to_string();
            self.expect(key, uid_of(job), now, |pending| {
                pending.deleted.insert(name.clone());
            });
            api.record(
                COMPONENT,
                job,
                "Normal",
                "SuccessfulDelete",
                format!("Deleted pod: {name}"),
            );
        }
        Ok(())
    }
}

fn creation(p: &Pod) -> String {
    p.metadata
        .as_ref()
        .map(|m| m.creation_timestamp.clone())
        .unwrap_or_default()
}

/// How long a replacement for a failed pod still waits: 10 s after the last failure,
/// doubled per further failure, at most 6 min.
fn backoff(failed: i32, last: Option<SystemTime>, now: SystemTime) -> Duration {
    let (Some(last), true) = (last, failed > 0) else {
        return Duration::ZERO;
    };
    let doublings = (failed - 1).clamp(0, 16) as u32;
    let delay = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_MAX);
    (last + delay).duration_since(now).unwrap_or(Duration::ZERO)
}

/// A pod from the Job's template, owned by it; an Indexed Job's pod carries its index.
fn pod_for(job: &Job, spec: &JobSpec, index: Option<i32>) -> Pod {
    let template = spec.template.clone().unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let mut pod_spec = template.spec.unwrap_or_default();
    let mut meta = ObjectMeta {
        namespace: job.namespace().into(),
        generate_name: format!("{}-", job.name()),
        labels: tmeta.labels,
        annotations: tmeta.annotations,
        owner_references: vec![controller_ref(job)],
        ..Default::default()
    };
    if let Some(i) = index {
        meta.generate_name = format!("{}-{i}-", job.name());
        meta.annotations
            .insert(COMPLETION_INDEX.into(), i.to_string());
        meta.labels.insert(COMPLETION_INDEX.into(), i.to_string());
        for c in pod_spec
            .containers
            .iter_mut()
            .chain(pod_spec.init_containers.iter_mut())
        {
            c.env.push(EnvVar {
                name: COMPLETION_INDEX_ENV.into(),
                value: i.to_string(),
                ..Default::default()
            });
        }
    }
    Pod {
        metadata: Some(meta),
        spec: Some(pod_spec),
        ..Default::default()
    }
}

/// Writes the counts and conditions, if they changed.
async fn write_status<A: Api>(api: &A, job: &Job, s: &State) -> Result<(), ClientError> {
    let mut status = s.status.clone();
    status.active = s.active_count();
    status.succeeded = s.succeeded;
    status.failed = s.failed;
    status.ready = Some(s.active.iter().filter(|p| is_ready(p)).count() as i32);
    if s.spec.completion_mode == "Indexed" {
        status.completed_indexes = format_indexes(&s.completed);
    }
    if job.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let mut updated = job.clone();
    updated.status = Some(status);
    match api.update_status(&updated).await {
        // Deleted in this pass (ttlSecondsAfterFinished: 0): nothing left to write.
        Err(e) if e.is_not_found() => Ok(()),
        other => other.map(|_| ()),
    }
}

#[cfg(test)]
mod tests;
