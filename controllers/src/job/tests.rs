//! The Job controller's behaviour, on the in-memory API.

use std::time::Duration;

use flotilla_proto::api::batch::{COMPLETION_INDEX, COMPLETION_INDEX_ENV};
use flotilla_proto::api::{
    ContainerState, ContainerStateTerminated, ContainerStatus, Job, JobStatus, Pod, PodStatus, time,
};
use serde_json::json;

use super::*;
use crate::fake::FakeApi;

const KEY: &str = "shop/pi";

fn job(spec: serde_json::Value) -> Job {
    let mut spec = spec;
    spec["template"] = json!({
        "metadata": {"labels": {"app": "pi"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "pi", "image": "busybox"}]}
    });
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "pi", "namespace": "shop"},
        "spec": spec,
    }))
    .expect("a Job")
}

/// A controller and a store holding the Job.
fn setup(spec: serde_json::Value) -> (JobController, FakeApi) {
    let api = FakeApi::new();
    api.put(job(spec));
    (JobController::default(), api)
}

async fn sync(c: &JobController, api: &FakeApi) -> Requeue {
    c.reconcile(api, KEY).await.expect("reconcile")
}

fn status(api: &FakeApi) -> JobStatus {
    api.get::<Job>("shop", "pi")
        .and_then(|j| j.status)
        .unwrap_or_default()
}

fn condition(api: &FakeApi, kind: &str) -> Option<JobCondition> {
    status(api)
        .conditions
        .into_iter()
        .find(|c| c.r#type == kind)
}

fn pods(api: &FakeApi) -> Vec<Pod> {
    api.all::<Pod>()
}

/// The pod finishes in `phase` (Succeeded or Failed) now.
fn finish(api: &FakeApi, name: &str, phase: &str) {
    let at = time::format(api.now());
    api.modify::<Pod>("shop", name, |p| {
        p.status = Some(PodStatus {
            phase: phase.into(),
            container_statuses: vec![ContainerStatus {
                name: "pi".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: if phase == "Succeeded" { 0 } else { 1 },
                        finished_at: at,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
    });
}

fn creates(actions: &[String]) -> usize {
    actions
        .iter()
        .filter(|a| a.starts_with("create Pod"))
        .count()
}

#[tokio::test]
async fn runs_parallelism_pods_at_a_time_until_completions_succeeded() {
    let (c, api) = setup(json!({"completions": 3, "parallelism": 2}));
    assert_eq!(sync(&c, &api).await, None);
    assert_eq!(creates(&api.take_actions()), 2);
    assert_eq!(status(&api).active, 2);
    assert!(!status(&api).start_time.is_empty());

    for p in pods(&api) {
        finish(&api, p.name(), "Succeeded");
    }
    sync(&c, &api).await;
    assert_eq!(
        creates(&api.take_actions()),
        1,
        "only one completion is left"
    );
    let st = status(&api);
    assert_eq!((st.active, st.succeeded), (1, 2));
    assert!(condition(&api, "Complete").is_none());

    let last = pods(&api)
        .into_iter()
        .find(|p| phase(p).is_empty())
        .expect("the third pod");
    finish(&api, last.name(), "Succeeded");
    api.advance(Duration::from_secs(7));
    sync(&c, &api).await;
    let st = status(&api);
    assert_eq!((st.active, st.succeeded, st.failed), (0, 3, 0));
    assert_eq!(
        condition(&api, "Complete").map(|c| c.status),
        Some("True".into())
    );
    assert_eq!(st.completion_time, time::format(api.now()));
    assert!(
        api.take_events()
            .iter()
            .any(|e| e == "Normal Completed: Job completed")
    );

    sync(&c, &api).await;
    assert_eq!(
        creates(&api.take_actions()),
        0,
        "a complete Job starts nothing"
    );
}

#[tokio::test]
async fn its_pods_come_from_the_template_and_name_the_job_as_controller() {
    let (c, api) = setup(json!({"completions": 1}));
    sync(&c, &api).await;
    let [pod] = &pods(&api)[..] else {
        panic!("one pod")
    };
    let meta = pod.metadata.as_ref().expect("metadata");
    assert!(meta.name.starts_with("pi-"), "{}", meta.name);
    assert_eq!(meta.labels.get("app").map(String::as_str), Some("pi"));
    let owner = controller_of(Some(meta)).expect("a controller reference");
    let job = api.get::<Job>("shop", "pi").expect("job");
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("Job", uid_of(&job))
    );
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.restart_policy, "Never");
    assert!(
        spec.containers[0].env.is_empty(),
        "only Indexed pods get an index"
    );
}

#[tokio::test]
async fn a_failed_pod_is_replaced_after_a_back_off_and_too_many_failures_fail_the_job() {
    let (c, api) = setup(json!({"completions": 1, "backoffLimit": 1}));
    sync(&c, &api).await;
    let first = pods(&api)[0].name().to_string();
    finish(&api, &first, "Failed");
    api.take_actions();

    // 10 s back-off after the first failure.
    let requeue = sync(&c, &api).await;
    assert_eq!(requeue, Some(BACKOFF_BASE));
    assert_eq!(creates(&api.take_actions()), 0);
    assert_eq!(status(&api).failed, 1);
    api.advance(BACKOFF_BASE);
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 1, "the replacement");

    let second = pods(&api)
        .into_iter()
        .find(|p| p.name() != first)
        .expect("replacement");
    finish(&api, second.name(), "Failed");
    sync(&c, &api).await;
    let failed = condition(&api, "Failed").expect("Failed condition");
    assert_eq!(
        (failed.status.as_str(), failed.reason.as_str()),
        ("True", "BackoffLimitExceeded")
    );
    assert_eq!(status(&api).failed, 2);
    assert_eq!(creates(&api.take_actions()), 0);
    assert!(
        api.take_events()
            .iter()
            .any(|e| e.starts_with("Warning BackoffLimitExceeded"))
    );
}

#[tokio::test]
async fn the_back_off_doubles_per_failure_up_to_six_minutes() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    assert_eq!(backoff(0, Some(now), now), Duration::ZERO);
    assert_eq!(backoff(1, Some(now), now), Duration::from_secs(10));
    assert_eq!(backoff(3, Some(now), now), Duration::from_secs(40));
    assert_eq!(backoff(30, Some(now), now), BACKOFF_MAX);
    assert_eq!(
        backoff(1, Some(now), now + Duration::from_secs(4)),
        Duration::from_secs(6)
    );
}

#[tokio::test]
async fn container_restarts_count_against_the_limit_under_on_failure() {
    let (c, api) = setup(json!({"completions": 2, "parallelism": 2, "backoffLimit": 3}));
    api.modify::<Job>("shop", "pi", |j| {
        if let Some(t) = j.spec.as_mut().and_then(|s| s.template.as_mut()) {
            t.spec.get_or_insert_default().restart_policy = "OnFailure".into();
        }
    });
    sync(&c, &api).await;
    let [done, name] = [0, 1].map(|i| pods(&api)[i].name().to_string());
    let restarted = |phase: &str, restarts: i32| {
        let phase = phase.to_string();
        move |p: &mut Pod| {
            p.status = Some(PodStatus {
                phase,
                container_statuses: vec![ContainerStatus {
                    name: "pi".into(),
                    restart_count: restarts,
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    };
    // A pod that restarted a lot and then succeeded does not count; a running pod's two
    // restarts are below the limit of three.
    api.modify::<Pod>("shop", &done, restarted("Succeeded", 9));
    api.modify::<Pod>("shop", &name, restarted("Running", 2));
    sync(&c, &api).await;
    assert!(condition(&api, "Failed").is_none());
    // The third restart reaches it.
    api.modify::<Pod>("shop", &name, restarted("Running", 3));
    sync(&c, &api).await;
    assert_eq!(
        condition(&api, "Failed").map(|c| c.reason),
        Some("BackoffLimitExceeded".into())
    );
    assert!(
        api.take_actions()
            .contains(&format!("delete Pod shop/{name}")),
        "the running pod of a failed Job is deleted"
    );
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_and_its_pods_are_deleted() {
    let (c, api) = setup(json!({"completions": 1, "activeDeadlineSeconds": 30}));
    let requeue = sync(&c, &api).await;
    assert_eq!(
        requeue,
        Some(Duration::from_secs(30)),
        "looks again at the deadline"
    );
    let name = pods(&api)[0].name().to_string();
    api.take_actions();

    api.advance(Duration::from_secs(30));
    sync(&c, &api).await;
    assert_eq!(
        condition(&api, "Failed").map(|c| c.reason),
        Some("DeadlineExceeded".into())
    );
    assert_eq!(api.take_actions()[0], format!("delete Pod shop/{name}"));
    assert_eq!(status(&api).active, 0);
}

#[tokio::test]
async fn an_indexed_job_gives_each_pod_an_index_and_completes_when_every_index_succeeded() {
    let (c, api) = setup(json!({"completions": 3, "parallelism": 3, "completionMode": "Indexed"}));
    sync(&c, &api).await;
    let mut by_index: Vec<(i32, String)> = pods(&api)
        .iter()
        .map(|p| (index_of(p).expect("an index"), p.name().to_string()))
        .collect();
    by_index.sort();
    assert_eq!(
        by_index.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    for p in pods(&api) {
        let i = index_of(&p).expect("index").to_string();
        let meta = p.metadata.as_ref().expect("metadata");
        assert_eq!(meta.labels.get(COMPLETION_INDEX), Some(&i));
        assert!(meta.name.starts_with(&format!("pi-{i}-")), "{}", meta.name);
        let env = &p.spec.as_ref().expect("spec").containers[0].env;
        assert!(
            env.iter()
                .any(|e| e.name == COMPLETION_INDEX_ENV && e.value == i)
        );
    }

    // Index 1 succeeds, index 0 fails: only index 0 runs again.
    finish(&api, &by_index[1].1, "Succeeded");
    finish(&api, &by_index[0].1, "Failed");
    api.take_actions();
    api.advance(BACKOFF_BASE);
    sync(&c, &api).await;
    let made: Vec<Pod> = pods(&api)
        .into_iter()
        .filter(|p| phase(p).is_empty() && index_of(p) == Some(0))
        .collect();
    assert_eq!(made.len(), 1, "a new pod for index 0 only");
    assert_eq!(status(&api).completed_indexes, "1");

    finish(&api, made[0].name(), "Succeeded");
    finish(&api, &by_index[2].1, "Succeeded");
    sync(&c, &api).await;
    let st = status(&api);
    assert_eq!(st.completed_indexes, "0-2");
    assert_eq!(st.succeeded, 3);
    assert!(condition(&api, "Complete").is_some());
}

#[tokio::test]
async fn a_work_queue_job_stops_starting_pods_after_a_success_and_completes_when_none_runs() {
    let (c, api) = setup(json!({"parallelism": 2}));
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 2);
    let [a, b] = &pods(&api)[..] else {
        panic!("two pods")
    };
    finish(&api, a.name(), "Succeeded");
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 0);
    assert!(condition(&api, "Complete").is_none(), "one pod still works");
    finish(&api, b.name(), "Succeeded");
    sync(&c, &api).await;
    assert!(condition(&api, "Complete").is_some());
}

#[tokio::test]
async fn suspending_deletes_running_pods_and_resuming_restarts_the_clock() {
    let (c, api) = setup(json!({"completions": 2, "parallelism": 2, "activeDeadlineSeconds": 60}));
    sync(&c, &api).await;
    api.take_actions();
    api.modify::<Job>("shop", "pi", |j| {
        j.spec.get_or_insert_default().suspend = Some(true);
    });
    sync(&c, &api).await;
    let actions = api.take_actions();
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.starts_with("delete Pod"))
            .count(),
        2,
        "{actions:?}"
    );
    assert_eq!(
        condition(&api, "Suspended").map(|c| c.status),
        Some("True".into())
    );
    assert_eq!(status(&api).active, 0);

    // Suspended longer than the deadline: the deadline counts from the resume.
    api.advance(Duration::from_secs(120));
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 0);
    api.modify::<Job>("shop", "pi", |j| {
        j.spec.get_or_insert_default().suspend = Some(false);
    });
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 2);
    assert_eq!(
        condition(&api, "Suspended").map(|c| c.status),
        Some("False".into())
    );
    assert_eq!(status(&api).start_time, time::format(api.now()));
    assert!(condition(&api, "Failed").is_none());
}

#[tokio::test]
async fn a_finished_job_is_deleted_after_its_ttl() {
    let (c, api) = setup(json!({"completions": 1, "ttlSecondsAfterFinished": 100}));
    sync(&c, &api).await;
    finish(&api, pods(&api)[0].name(), "Succeeded");
    let requeue = sync(&c, &api).await;
    assert_eq!(requeue, Some(Duration::from_secs(100)));
    assert!(api.get::<Job>("shop", "pi").is_some());
    api.advance(Duration::from_secs(100));
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(api.take_actions(), ["delete Job shop/pi"]);
}

#[tokio::test]
async fn a_lagging_cache_never_makes_it_start_more_pods_than_wanted() {
    let (c, api) = setup(json!({"completions": 5, "parallelism": 2}));
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 2);
    // The cache has not seen the two creates yet.
    let hidden: Vec<Pod> = pods(&api)
        .iter()
        .filter_map(|p| api.hide::<Pod>("shop", p.name()))
        .collect();
    sync(&c, &api).await;
    assert_eq!(
        creates(&api.take_actions()),
        0,
        "the two asked for count as running"
    );
    assert_eq!(status(&api).active, 2);
    for p in hidden {
        api.put(p);
    }
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 0);
}

#[tokio::test]
async fn lowering_parallelism_deletes_the_surplus() {
    let (c, api) = setup(json!({"completions": 10, "parallelism": 3}));
    sync(&c, &api).await;
    api.take_actions();
    api.modify::<Job>("shop", "pi", |j| {
        j.spec.get_or_insert_default().parallelism = Some(1);
    });
    sync(&c, &api).await;
    let actions = api.take_actions();
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.starts_with("delete Pod"))
            .count(),
        2,
        "{actions:?}"
    );
    assert_eq!(status(&api).active, 1);
}

#[tokio::test]
async fn a_deleted_job_is_forgotten_and_a_namesake_starts_afresh() {
    let (c, api) = setup(json!({"completions": 2, "parallelism": 2}));
    sync(&c, &api).await;
    // Its two pods are not in the cache yet when the Job is deleted...
    for p in pods(&api) {
        api.hide::<Pod>("shop", p.name());
    }
    api.hide::<Job>("shop", "pi");
    assert_eq!(sync(&c, &api).await, None);
    assert!(
        c.with_pending(|p| p.is_empty()),
        "nothing is remembered of it"
    );
    // ...and a new Job of the same name gets its own pods, not the old one's memory.
    api.put(job(json!({"completions": 2, "parallelism": 2})));
    api.take_actions();
    sync(&c, &api).await;
    assert_eq!(creates(&api.take_actions()), 2);
}
