//! The CronJob controller's behaviour, on the in-memory API and its clock (which starts at
//! 2026-01-01T00:00:00Z, when each test's CronJob is created).

use std::time::Duration;

use flotilla_proto::api::{CronJob, Job, JobCondition, JobStatus, time};
use serde_json::json;

use super::*;
use crate::fake::FakeApi;

const KEY: &str = "shop/report";
const MINUTE: Duration = Duration::from_secs(60);

fn setup(spec: serde_json::Value) -> (CronJobController, FakeApi) {
    let mut spec = spec;
    spec["jobTemplate"] = json!({
        "metadata": {"labels": {"app": "report"}},
        "spec": {"template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "r", "image": "busybox"}]
        }}}
    });
    let cj: CronJob = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "report", "namespace": "shop"},
        "spec": spec,
    }))
    .expect("a CronJob");
    let api = FakeApi::new();
    api.put(cj);
    (CronJobController, api)
}

async fn sync(c: &CronJobController, api: &FakeApi) -> Requeue {
    c.reconcile(api, KEY).await.expect("reconcile")
}

fn at(s: &str) -> SystemTime {
    time::parse(s).expect("a time")
}

fn jobs(api: &FakeApi) -> Vec<String> {
    api.all::<Job>()
        .iter()
        .map(|j| j.name().to_string())
        .collect()
}

fn status(api: &FakeApi) -> CronJobStatus {
    api.get::<CronJob>("shop", "report")
        .and_then(|c| c.status)
        .unwrap_or_default()
}

/// The Job ends now, succeeded or failed.
fn end(api: &FakeApi, name: &str, ok: bool) {
    let now = time::format(api.now());
    api.modify::<Job>("shop", name, |j| {
        j.status = Some(JobStatus {
            conditions: vec![JobCondition {
                r#type: if ok { "Complete" } else { "Failed" }.into(),
                status: "True".into(),
                last_transition_time: now.clone(),
                ..Default::default()
            }],
            completion_time: if ok { now.clone() } else { String::new() },
            ..Default::default()
        });
    });
}

#[tokio::test]
async fn starts_a_job_at_each_scheduled_time_and_comes_back_at_the_next() {
    let (c, api) = setup(json!({"schedule": "*/5 * * * *"}));
    assert_eq!(sync(&c, &api).await, Some(5 * MINUTE + SLACK));
    assert!(jobs(&api).is_empty(), "nothing is due at creation");

    api.advance(5 * MINUTE);
    assert_eq!(sync(&c, &api).await, Some(5 * MINUTE + SLACK));
    let due = at("2026-01-01T00:05:00Z");
    let name = job_name("report", due);
    assert_eq!(jobs(&api), std::slice::from_ref(&name));
    let job = api.get::<Job>("shop", &name).expect("the Job");
    let meta = job.metadata.as_ref().expect("metadata");
    assert_eq!(
        meta.annotations
            .get(SCHEDULED_TIMESTAMP)
            .map(String::as_str),
        Some("2026-01-01T00:05:00Z")
    );
    assert_eq!(meta.labels.get("app").map(String::as_str), Some("report"));
    let owner = controller_of(Some(meta)).expect("controller");
    assert_eq!(owner.kind, "CronJob");
    assert!(job.spec.and_then(|s| s.template).is_some());
    let st = status(&api);
    assert_eq!(st.last_schedule_time, "2026-01-01T00:05:00Z");
    assert_eq!(
        st.active
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        [name.as_str()]
    );
    assert!(
        api.take_events()
            .contains(&format!("Normal SuccessfulCreate: Created job {name}"))
    );

    // Looked at again before the next time: nothing new.
    api.advance(MINUTE);
    sync(&c, &api).await;
    assert_eq!(jobs(&api).len(), 1);
}

#[tokio::test]
async fn after_missed_times_only_the_latest_runs() {
    let (c, api) = setup(json!({"schedule": "*/5 * * * *"}));
    api.advance(17 * MINUTE);
    sync(&c, &api).await;
    assert_eq!(jobs(&api), [job_name("report", at("2026-01-01T00:15:00Z"))]);
}

#[tokio::test]
async fn a_job_is_made_once_even_if_the_status_was_not_written() {
    let (c, api) = setup(json!({"schedule": "* * * * *"}));
    api.advance(MINUTE);
    sync(&c, &api).await;
    // A new leader whose controller never saw the status write looks at the same time.
    api.modify::<CronJob>("shop", "report", |cj| cj.status = None);
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(jobs(&api).len(), 1);
    assert!(
        !api.take_actions().iter().any(|a| a.starts_with("create")),
        "no second create"
    );
    assert_eq!(status(&api).last_schedule_time, "2026-01-01T00:01:00Z");
}

#[tokio::test]
async fn forbid_skips_while_a_job_runs_and_starts_the_skipped_run_when_it_ends() {
    let (c, api) = setup(json!({"schedule": "* * * * *", "concurrencyPolicy": "Forbid"}));
    api.advance(MINUTE);
    sync(&c, &api).await;
    let first = jobs(&api)[0].clone();
    api.advance(MINUTE);
    sync(&c, &api).await;
    assert_eq!(
        jobs(&api),
        std::slice::from_ref(&first),
        "the second run waits"
    );
    assert!(
        api.take_events()
            .iter()
            .any(|e| e.starts_with("Normal JobAlreadyActive"))
    );

    api.advance(Duration::from_secs(20));
    end(&api, &first, true);
    sync(&c, &api).await;
    assert_eq!(
        jobs(&api),
        [first, job_name("report", at("2026-01-01T00:02:00Z"))]
    );
}

#[tokio::test]
async fn a_run_past_its_starting_deadline_is_missed() {
    let (c, api) = setup(json!({
        "schedule": "* * * * *", "concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 10
    }));
    api.advance(MINUTE);
    sync(&c, &api).await;
    let first = jobs(&api)[0].clone();
    api.advance(MINUTE);
    sync(&c, &api).await;
    api.advance(Duration::from_secs(30));
    end(&api, &first, true);
    sync(&c, &api).await;
    assert_eq!(jobs(&api), [first], "00:02 is more than 10 s ago");
}

#[tokio::test]
async fn replace_deletes_the_running_job_before_starting_the_next() {
    let (c, api) = setup(json!({"schedule": "* * * * *", "concurrencyPolicy": "Replace"}));
    api.advance(MINUTE);
    sync(&c, &api).await;
    let first = jobs(&api)[0].clone();
    api.take_actions();
    api.advance(MINUTE);
    sync(&c, &api).await;
    let second = job_name("report", at("2026-01-01T00:02:00Z"));
    assert_eq!(
        api.take_actions()[..2],
        [
            format!("delete Job shop/{first}"),
            format!("create Job shop/{second}")
        ]
    );
    assert_eq!(
        status(&api)
            .active
            .iter()
            .map(|r| r.name.clone())
            .collect::<Vec<_>>(),
        [second]
    );
}

#[tokio::test]
async fn allow_runs_alongside_active_jobs() {
    let (c, api) = setup(json!({"schedule": "* * * * *"}));
    for _ in 0..3 {
        api.advance(MINUTE);
        sync(&c, &api).await;
    }
    assert_eq!(jobs(&api).len(), 3);
    assert_eq!(status(&api).active.len(), 3);
}

#[tokio::test]
async fn finished_jobs_past_the_history_limits_are_deleted_oldest_first() {
    let (c, api) = setup(json!({
        "schedule": "* * * * *", "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 0
    }));
    let mut made = Vec::new();
    for ok in [true, false, true] {
        api.advance(MINUTE);
        sync(&c, &api).await;
        let name = jobs(&api)
            .into_iter()
            .find(|n| !made.contains(n))
            .expect("a new Job");
        api.advance(Duration::from_secs(10));
        end(&api, &name, ok);
        made.push(name);
    }
    api.advance(Duration::from_secs(5));
    sync(&c, &api).await;
    assert_eq!(jobs(&api), [made[2].clone()], "the newest success only");
    let st = status(&api);
    assert!(st.active.is_empty());
    assert_eq!(st.last_successful_time, "2026-01-01T00:03:30Z");
}

#[tokio::test]
async fn a_suspended_cronjob_starts_nothing() {
    let (c, api) = setup(json!({"schedule": "* * * * *", "suspend": true}));
    api.advance(10 * MINUTE);
    assert_eq!(sync(&c, &api).await, None);
    assert!(jobs(&api).is_empty());
}

#[tokio::test]
async fn the_schedule_is_read_in_its_time_zone() {
    // 09:30 in Tokyo (UTC+9) is 00:30 UTC.
    let (c, api) = setup(json!({"schedule": "30 9 * * *", "timeZone": "Asia/Tokyo"}));
    assert_eq!(sync(&c, &api).await, Some(30 * MINUTE + SLACK));
    api.advance(30 * MINUTE);
    sync(&c, &api).await;
    assert_eq!(jobs(&api), [job_name("report", at("2026-01-01T00:30:00Z"))]);
}
