//! The CronJob controller: starts a CronJob's Jobs on its schedule, as Kubernetes'
//! CronJob controller (v2) does.
//!
//! - Each pass finds the latest scheduled time not yet run: after `status.lastScheduleTime`
//!   (or the CronJob's creation), no earlier than `startingDeadlineSeconds` ago. Only that
//!   one runs, however many were missed (more than 100 missed also records
//!   `TooManyMissedTimes`), and the key comes back at the next scheduled time.
//! - The Job is named `NAME-<scheduled time in minutes since 1970>` and annotated with the
//!   time (`batch.kubernetes.io/cronjob-scheduled-timestamp`), so a run is made once even
//!   when a new leader's controller looks at the same time again: the name is taken.
//! - `concurrencyPolicy`: `Allow` runs alongside active Jobs; `Forbid` skips while one is
//!   active (the time is not marked run, so it starts when the active Job ends, if still
//!   within `startingDeadlineSeconds`); `Replace` deletes the active Jobs first.
//! - `suspend` starts nothing new. Finished Jobs beyond `successfulJobsHistoryLimit` (3)
//!   and `failedJobsHistoryLimit` (1) are deleted, oldest first, with their pods.
//! - Status: `active` (references to running Jobs), `lastScheduleTime`,
//!   `lastSuccessfulTime`.

use std::time::{Duration, SystemTime};

use flotilla_client::ClientError;
use flotilla_proto::api::batch::{SCHEDULED_TIMESTAMP, Schedule};
use flotilla_proto::api::{
    CronJob, CronJobStatus, Job, ObjectMeta, ObjectReference, Resource, time,
};

use crate::queue::Requeue;
use crate::runtime::{Api, Controller};
use crate::util::{controller_of, controller_ref, delete_exactly, is_deleting, split_key, uid_of};

const COMPONENT: &str = "cronjob-controller";
/// Missed times counted before giving up counting (Kubernetes' 100).
pub const MAX_MISSED: usize = 100;
/// Looks again a little after the next scheduled time, so the time has surely come.
const SLACK: Duration = Duration::from_millis(100);

pub struct CronJobController;

/// How a Job of the CronJob ended, and when; `None` while it runs.
fn finished(job: &Job) -> Option<(bool, SystemTime)> {
    let status = job.status.as_ref()?;
    let c = status
        .conditions
        .iter()
        .find(|c| (c.r#type == "Complete" || c.r#type == "Failed") && c.status == "True")?;
    let at = time::parse(&c.last_transition_time)
        .or_else(|| time::parse(&status.completion_time))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Some((c.r#type == "Complete", at))
}

fn reference(job: &Job) -> ObjectReference {
    let meta = job.metadata.clone().unwrap_or_default();
    ObjectReference {
        kind: Job::KIND.into(),
        namespace: meta.namespace,
        name: meta.name,
        uid: meta.uid,
        api_version: Job::API_VERSION.into(),
        // Not the Job's resourceVersion: it changes with every status write of the Job.
        ..Default::default()
    }
}

/// The name of the Job for the run scheduled at `t`.
pub fn job_name(cron_job: &str, t: SystemTime) -> String {
    let minutes = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 60;
    format!("{cron_job}-{minutes}")
}

impl Controller for CronJobController {
    type Kind = CronJob;
    const NAME: &'static str = "cronjob";

    async fn reconcile<A: Api>(&self, api: &A, key: &str) -> Result<Requeue, ClientError> {
        let (ns, name) = split_key(key);
        let Some(cj) = api.get::<CronJob>(ns, name) else {
            return Ok(None);
        };
        if is_deleting(&cj) {
            return Ok(None);
        }
        let uid = uid_of(&cj).to_string();
        let spec = cj.spec.clone().unwrap_or_default();
        let now = api.now();
        let mut jobs: Vec<Job> = api.list(ns, |j: &Job| {
            controller_of(j.metadata.as_ref()).is_some_and(|r| r.uid == uid)
        });
        jobs.sort_by(|a, b| a.name().cmp(b.name()));
        let mut status = cj.status.clone().unwrap_or_default();

        // What ran: the active list, the last success, and the history kept.
        let mut running: Vec<Job> = Vec::new();
        let mut succeeded: Vec<(SystemTime, Job)> = Vec::new();
        let mut failed: Vec<(SystemTime, Job)> = Vec::new();
        for j in &jobs {
            match finished(j) {
                None if !is_deleting(j) => running.push(j.clone()),
                None => {}
                Some((true, at)) => succeeded.push((at, j.clone())),
                Some((false, at)) => failed.push((at, j.clone())),
            }
        }
        if let Some(last) = succeeded.iter().map(|(at, _)| *at).max() {
            let known = time::parse(&status.last_successful_time);
            if known.is_none_or(|k| last > k) {
                status.last_successful_time = time::format(last);
            }
        }
        for (mut done, limit) in [
            (succeeded, spec.successful_jobs_history_limit.unwrap_or(3)),
            (failed, spec.failed_jobs_history_limit.unwrap_or(1)),
        ] {
            done.sort_by_key(|(at, _)| *at);
            let surplus = done.len().saturating_sub(limit.max(0) as usize);
            for (_, j) in done.into_iter().take(surplus) {
                delete_job(api, &cj, &j).await?;
            }
        }
        status.active = running.iter().map(reference).collect();

        let outcome = self.schedule(api, &cj, &mut status, &running, now).await;
        if cj.status.as_ref() != Some(&status) {
            let mut updated = cj.clone();
            updated.status = Some(status);
            api.update_status(&updated).await?;
        }
        outcome
    }
}

impl CronJobController {
    /// Starts the run that is due, if one is; returns when to look again.
    async fn schedule<A: Api>(
        &self,
        api: &A,
        cj: &CronJob,
        status: &mut CronJobStatus,
        running: &[Job],
        now: SystemTime,
    ) -> Result<Requeue, ClientError> {
        let spec = cj.spec.clone().unwrap_or_default();
        let schedule = match Schedule::parse(&spec.schedule, spec.time_zone.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                // The API server checks schedules; one stored before a rule changed lands here.
                api.record(
                    COMPONENT,
                    cj,
                    "Warning",
                    "InvalidSchedule",
                    format!("invalid schedule {:?}: {e}", spec.schedule),
                );
                return Ok(None);
            }
        };
        if spec.suspend == Some(true) {
            return Ok(None);
        }
        let next = schedule
            .next_after(now)
            .map(|t| t.duration_since(now).unwrap_or_default() + SLACK);
        let created = cj
            .metadata
            .as_ref()
            .and_then(|m| time::parse(&m.creation_timestamp))
            .unwrap_or(now);
        let mut earliest = time::parse(&status.last_schedule_time).unwrap_or(created);
        if let Some(d) = spec.starting_deadline_seconds
            && let Some(window) = now.checked_sub(Duration::from_secs(d.max(0) as u64))
        {
            earliest = earliest.max(window);
        }
        let (due, missed) = schedule.latest_between(earliest, now, MAX_MISSED);
        if missed >= MAX_MISSED {
            api.record(
                COMPONENT,
                cj,
                "Warning",
                "TooManyMissedTimes",
                format!(
                    "too many missed start times: {missed} or more. Set or decrease .spec.startingDeadlineSeconds or check clock skew"
                ),
            );
        }
        let Some(due) = due else {
            return Ok(next);
        };
        let name = job_name(cj.name(), due);
        if running.iter().any(|j| j.name() == name) {
            status.last_schedule_time = time::format(due);
            return Ok(next);
        }
        match spec.concurrency_policy.as_str() {
            "Forbid" if !running.is_empty() => {
                api.record(
                    COMPONENT,
                    cj,
                    "Normal",
                    "JobAlreadyActive",
                    "Not starting job because prior execution is running and concurrency policy is Forbid".into(),
                );
                return Ok(next);
            }
            "Replace" => {
                for j in running {
                    delete_job(api, cj, j).await?;
                }
                status.active.clear();
            }
            _ => {}
        }
        let template = spec.job_template.clone().unwrap_or_default();
        let tmeta = template.metadata.unwrap_or_default();
        let mut job = Job {
            metadata: Some(ObjectMeta {
                name: name.clone(),
                namespace: cj.namespace().into(),
                labels: tmeta.labels,
                annotations: tmeta.annotations,
                owner_references: vec![controller_ref(cj)],
                ..Default::default()
            }),
            spec: template.spec,
            ..Default::default()
        };
        job.metadata_mut()
            .annotations
            .insert(SCHEDULED_TIMESTAMP.into(), time::format(due));
        match api.create(&job).await {
            Ok(made) => {
                status.active.push(reference(&made));
                api.record(
                    COMPONENT,
                    cj,
                    "Normal",
                    "SuccessfulCreate",
                    format!("Created job {name}"),
                );
            }
            // Made already (by this controller under an earlier leader): the run happened.
            Err(e) if e.is_already_exists() => {}
            Err(e) => {
                api.record(
                    COMPONENT,
                    cj,
                    "Warning",
                    "FailedCreate",
                    format!("Error creating job: {e}"),
                );
                return Err(e);
            }
        }
        status.last_schedule_time = time::format(due);
        Ok(next)
    }
}

/// Deletes a Job of the CronJob; the garbage collector takes its pods.
async fn delete_job<A: Api>(api: &A, cj: &CronJob, job: &Job) -> Result<(), ClientError> {
    match api.delete::<Job>(&delete_exactly(job, "Background")).await {
        Ok(_) => {
            api.record(
                COMPONENT,
                cj,
                "Normal",
                "SuccessfulDelete",
                format!("Deleted job {}", job.name()),
            );
            Ok(())
        }
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
