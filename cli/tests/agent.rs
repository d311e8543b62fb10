//! The node agent against a real three-member control plane, each test once per runtime
//! (process, and docker with a local busybox image): pods run and report Running, crash
//! into CrashLoopBackOff, restart on liveness failures, turn Ready with their readiness
//! probe, stop within their grace period when deleted, serve their logs, and survive the
//! agent's own restart and the control-plane leader's death without being lost or run
//! twice. The docker runtime's own promises (a pod's containers share one network
//! namespace and address, limits are enforced, a missing image is said plainly) follow.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE, http_get, http_request, processes_with};
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_node_agent::AGENT_ENDPOINT;
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rt {
    Process,
    Docker,
}

impl Rt {
    /// The node name for a test: with docker, unique on the engine, which every test
    /// process shares (the agent owns the containers labelled with its node's name).
    fn node(self) -> String {
        match self {
            Rt::Process => "a1".into(),
            Rt::Docker => format!("a1-{}", std::process::id()),
        }
    }
}

/// An agent process; killed with -9 when dropped.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    node: String,
    servers: String,
    rt: Rt,
}

impl Agent {
    fn start(cluster: &Cluster, dir: &Path, rt: Rt) -> Self {
        if rt == Rt::Docker {
            docker_test_image();
        }
        let mut a = Agent {
            child: None,
            dir: dir.to_path_buf(),
            node: rt.node(),
            servers: cluster.endpoints(),
            rt,
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "agent",
                "--servers",
                &self.servers,
                "--node-name",
                &self.node,
                "--runtime",
                match self.rt {
                    Rt::Process => "process",
                    Rt::Docker => "docker",
                },
            ])
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--lease-interval", "1s", "--cpu", "4", "--memory", "8Gi"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("flotilla agent starts");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            common::print_log_tail(&self.dir.with_extension("log"));
        }
        // The containers outlive the agent by design; the test's must not outlive the test.
        if self.rt == Rt::Docker {
            let ids = docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("label=io.flotilla.node={}", self.node),
            ]);
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = Command::new("docker")
                    .args(["rm", "-f"])
                    .args(&ids)
                    .output();
            }
        }
        // Each shim leads its container's process group.
        for pid in shims_of(&self.dir.to_string_lossy()) {
            // SAFETY: signalling a process group of this test; no memory is shared.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Pids of the shims of containers under `dir`.
fn shims_of(dir: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("agent-shim") && cmd.contains(dir) {
            out.push(pid);
        }
    }
    out
}

/// The image the docker tests run: busybox (Debian's static build) on an empty base,
/// built from local files. scripts/test.sh installs busybox-static.
const TEST_IMAGE: &str = "flotilla-test-busybox:1";

/// `docker ARGS`' standard output; panics with its error when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI (the docker runtime's tests need a Docker engine)");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn docker_test_image() {
    if Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: install Debian's busybox-static (scripts/test.sh does)"
    );
    let ctx = tempfile::tempdir().unwrap();
    std::fs::copy(busybox, ctx.path().join("busybox")).unwrap();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .unwrap();
    docker(&[
        "build",
        "-q",
        "-t",
        TEST_IMAGE,
        &ctx.path().to_string_lossy(),
    ]);
}

async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client(c: &Cluster) -> Client {
    let addrs: Vec<String> = c.members.iter().map(|m| m.client.clone()).collect();
    Client::new(&addrs).unwrap()
}

/// A pod running `script` with sh; `extra` is merged into the container.
fn pod(name: &str, script: &str, extra: Value, spec_extra: Value) -> Pod {
    let mut container =
        json!({"name": "main", "image": TEST_IMAGE, "command": ["sh", "-c", script]});
    if let (Some(c), Some(e)) = (container.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    let mut spec = json!({"containers": [container]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), spec_extra.as_object()) {
        s.extend(e.clone());
    }
    from_value(json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec})).unwrap()
}

fn status(p: &Pod) -> ContainerStatus {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.first().cloned())
        .unwrap_or_default()
}

fn condition(p: &Pod, kind: &str) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == kind && c.status == "True")
    })
}

async fn running(c: &Client, name: &str) -> Pod {
    until(&format!("{name} running"), || async {
        let p = c.get::<Pod>("default", name).await.ok()?;
        let phase = p
            .status
            .as_ref()
            .map(|s| s.phase.clone())
            .unwrap_or_default();
        (phase == "Running" && status(&p).state.and_then(|s| s.running).is_some()).then_some(p)
    })
    .await
}

/// A pod using more memory than its 32Mi limit ends OOMKilled (exit 137) and Failed.
///
/// The hog is one 300 MB read buffer. It used to be `head -c 300000000 /dev/zero | tail`,
/// but a container doing that through a pipe at its memory limit sometimes went unkilled for
/// over 30 s here (4 of 6 run side by side with plain `docker run`), while `dd` with one big
/// buffer was OOM-killed within 2 s in 16 of 16.
async fn oom_killed_over_its_memory_limit(c: &Client) {
    let hog = pod(
        "hog",
        "dd if=/dev/zero of=/dev/null bs=300M count=1",
        json!({"resources": {"limits": {"memory": "32Mi"}}}),
        json!({"restartPolicy": "Never"}),
    );
    c.create(&hog).await.unwrap();
    // Not `until`: a timeout says what the pod's status was.
    let end = Instant::now() + DEADLINE;
    let p = loop {
        let p = c.get::<Pod>("default", "hog").await.ok();
        if let Some(p) = p
            .as_ref()
            .filter(|p| p.status.as_ref().is_some_and(|s| s.phase == "Failed"))
        {
            break p.clone();
        }
        if Instant::now() >= end {
            let status = p.and_then(|p| p.status);
            // What the engine says of the container, where there is one (docker runtime).
            let engine = status
                .as_ref()
                .and_then(|s| s.container_statuses.first())
                .and_then(|c| c.container_id.strip_prefix("docker://"))
                .map(|id| {
                    Command::new("docker")
                        .args(["inspect", "--format", "{{json .State}}", id])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                });
            panic!(
                "timed out waiting for hog Failed; its last status: {status:?}; the engine's state: {engine:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let t = status(&p).state.unwrap().terminated.unwrap();
    assert_eq!(
        (t.reason.as_str(), t.exit_code),
        ("OOMKilled", 137),
        "{t:?}"
    );
}

async fn gone(c: &Client, name: &str) -> Duration {
    let start = Instant::now();
    until(&format!("{name} gone"), || async {
        matches!(c.get::<Pod>("default", name).await, Err(e) if e.is_not_found()).then_some(())
    })
    .await;
    start.elapsed()
}

/// A container stopped the moment it was started (a liveness probe can fail that early) gets
/// its SIGTERM, not the end of its grace period: the signal must not reach only the shim,
/// which ignores it, before the shim has started the container.
#[test]
fn a_process_container_stopped_as_it_starts_gets_its_sigterm() {
    use flotilla_node_agent::process::ProcessRuntime;
    use flotilla_node_agent::runtime::{ContainerSpec, ContainerState, Runtime};
    let dir = tempfile::tempdir().unwrap();
    let node = format!("stop-early-{}", std::process::id());
    let rt = ProcessRuntime::new(dir.path(), env!("CARGO_BIN_EXE_flotilla").into(), &node).unwrap();
    runtime().block_on(async {
        for n in 0..5 {
            let spec = ContainerSpec {
                pod_uid: format!("uid-{n}"),
                pod_namespace: "default".into(),
                pod_name: format!("early-{n}"),
                name: "main".into(),
                command: vec!["sh".into(), "-c".into(), "sleep 1000".into()],
                ..Default::default()
            };
            let id = rt.start(&spec).await.unwrap();
            let t = Instant::now();
            rt.stop(&id, Duration::from_secs(60)).await;
            let took = t.elapsed();
            let state = rt.state(&id).await;
            rt.remove(&id).await;
            assert!(took < Duration::from_secs(20), "stop took {took:?}");
            match state {
                ContainerState::Exited { signal, .. } => {
                    assert_eq!(signal, 15, "run {n}: not ended by SIGTERM: {state:?}")
                }
                other => panic!("run {n}: not stopped: {other:?}"),
            }
        }
    });
}

#[test]
fn pods_run_and_stop_within_their_grace_period_process() {
    pods_run_and_stop_within_their_grace_period(Rt::Process);
}

#[test]
fn pods_run_and_stop_within_their_grace_period_docker() {
    pods_run_and_stop_within_their_grace_period(Rt::Docker);
}

fn pods_run_and_stop_within_their_grace_period(rt: Rt) {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    runtime().block_on(async {
        let c = client(&cluster);
        let marker = format!("mark-{}", std::process::id());
        // Stops at once on SIGTERM.
        let polite =
            format!("trap 'exit 0' TERM; while true; do sleep 0.1; done # {marker}-polite");
        c.create(&pod(
            "polite",
            &polite,
            json!({}),
            json!({"terminationGracePeriodSeconds": 10}),
        ))
        .await
        .unwrap();
        // Ignores SIGTERM: killed when its 1 s grace period is over.
        let stubborn = format!("trap '' TERM; while true; do sleep 0.1; done # {marker}-stubborn");
        c.create(&pod(
            "stubborn",
            &stubborn,
            json!({}),
            json!({"terminationGracePeriodSeconds": 1}),
        ))
        .await
        .unwrap();
        let p = running(&c, "polite").await;
        running(&c, "stubborn").await;
        let st = p.status.clone().unwrap();
        match rt {
            // The process runtime shares the node's network.
            Rt::Process => assert_eq!(st.pod_ip, "127.0.0.1"),
            // Docker gives the pod its own address.
            Rt::Docker => assert!(
                st.pod_ip.parse::<std::net::Ipv4Addr>().is_ok() && st.pod_ip != "127.0.0.1",
                "{st:?}"
            ),
        }
        assert_eq!(st.host_ip, "127.0.0.1");
        assert!(!st.start_time.is_empty());
        assert_eq!(p.spec.as_ref().unwrap().node_name, rt.node());
        let p = until("polite ready", || async {
            let p = c.get::<Pod>("default", "polite").await.ok()?;
            (condition(&p, "Ready")
                && condition(&p, "ContainersReady")
                && condition(&p, "Initialized"))
            .then_some(p)
        })
        .await;
        assert!(status(&p).ready);
        until("both containers' processes", || async {
            (processes_with(&format!("{marker}-polite")).len() == 1
                && processes_with(&format!("{marker}-stubborn")).len() == 1)
                .then_some(())
        })
        .await;

        c.delete_named::<Pod>("default", "polite").await.unwrap();
        let took = gone(&c, "polite").await;
        assert!(took < Duration::from_secs(5), "polite took {took:?}");
        assert!(processes_with(&format!("{marker}-polite")).is_empty());

        c.delete_named::<Pod>("default", "stubborn").await.unwrap();
        let took = gone(&c, "stubborn").await;
        assert!(
            took >= Duration::from_millis(900),
            "stubborn went in {took:?}, before its grace period"
        );
        assert!(took < Duration::from_secs(6), "stubborn took {took:?}");
        assert!(processes_with(&format!("{marker}-stubborn")).is_empty());
    });
}

#[test]
fn crashes_back_off_and_finished_pods_stay_finished_process() {
    crashes_back_off_and_finished_pods_stay_finished(Rt::Process);
}

#[test]
fn crashes_back_off_and_finished_pods_stay_finished_docker() {
    crashes_back_off_and_finished_pods_stay_finished(Rt::Docker);
}

fn crashes_back_off_and_finished_pods_stay_finished(rt: Rt) {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    runtime().block_on(async {
        let c = client(&cluster);
        c.create(&pod("crash", "echo boom; exit 3", json!({}), json!({})))
            .await
            .unwrap();
        let p = until("CrashLoopBackOff", || async {
            let p = c.get::<Pod>("default", "crash").await.ok()?;
            let s = status(&p);
            let waiting = s.state.as_ref()?.waiting.clone()?;
            (waiting.reason == "CrashLoopBackOff").then_some(p)
        })
        .await;
        let s = status(&p);
        assert!(s.restart_count >= 1, "{s:?}");
        let last = s.last_state.unwrap().terminated.unwrap();
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason, "Error");
        assert!(
            s.state
                .unwrap()
                .waiting
                .unwrap()
                .message
                .contains("back-off 10s")
        );
        assert_eq!(p.status.unwrap().phase, "Running");

        // restartPolicy Never: ends Succeeded (exit 0) or Failed, and is not run again.
        c.create(&pod(
            "once",
            "exit 0",
            json!({}),
            json!({"restartPolicy": "Never"}),
        ))
        .await
        .unwrap();
        c.create(&pod(
            "fails",
            "exit 7",
            json!({}),
            json!({"restartPolicy": "OnFailure"}),
        ))
        .await
        .unwrap();
        let once = until("once Succeeded", || async {
            let p = c.get::<Pod>("default", "once").await.ok()?;
            (p.status.as_ref()?.phase == "Succeeded").then_some(p)
        })
        .await;
        let t = status(&once).state.unwrap().terminated.unwrap();
        assert_eq!((t.exit_code, t.reason.as_str()), (0, "Completed"));
        assert_eq!(status(&once).restart_count, 0);
        until("OnFailure restarts a failure", || async {
            let p = c.get::<Pod>("default", "fails").await.ok()?;
            (status(&p).restart_count >= 1).then_some(())
        })
        .await;
    });
}

#[test]
fn liveness_failures_restart_and_readiness_gates_ready_process() {
    liveness_failures_restart_and_readiness_gates_ready(Rt::Process);
}

#[test]
fn liveness_failures_restart_and_readiness_gates_ready_docker() {
    liveness_failures_restart_and_readiness_gates_ready(Rt::Docker);
}

fn liveness_failures_restart_and_readiness_gates_ready(rt: Rt) {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    let work = tempfile::tempdir().unwrap();
    // The readiness probe runs where the container does: on the host with the process
    // runtime, inside the container with docker.
    let ready_file = match rt {
        Rt::Process => work.path().join("ready"),
        Rt::Docker => PathBuf::from("/ready"),
    };
    let set_ready = |p: &Pod, on: bool| match rt {
        Rt::Process if on => std::fs::write(&ready_file, "").unwrap(),
        Rt::Process => std::fs::remove_file(&ready_file).unwrap(),
        Rt::Docker => {
            let id = status(p).container_id.replace("docker://", "");
            let cmd = if on { "touch" } else { "rm" };
            docker(&["exec", &id, cmd, "/ready"]);
        }
    };
    runtime().block_on(async {
        let c = client(&cluster);
        let probe = |cmd: Vec<String>| {
            json!({"exec": {"command": cmd}, "periodSeconds": 1, "failureThreshold": 1})
        };
        c.create(&pod(
            "unhealthy",
            "sleep 1000",
            json!({"livenessProbe": probe(vec!["false".into()])}),
            json!({}),
        ))
        .await
        .unwrap();
        c.create(&pod(
            "gated",
            "sleep 1000",
            json!({"readinessProbe": probe(vec!["test".into(), "-f".into(), ready_file.to_string_lossy().to_string()])}),
            json!({}),
        ))
        .await
        .unwrap();
        // Restarted, and running again with the ended run as its last state.
        let p = until("the liveness restarts", || async {
            let p = c.get::<Pod>("default", "unhealthy").await.ok()?;
            let s = status(&p);
            (s.restart_count >= 1 && s.last_state.is_some()).then_some(p)
        })
        .await;
        let last = status(&p).last_state.unwrap().terminated.unwrap();
        assert!(last.message.contains("liveness"), "{last:?}");

        let p = running(&c, "gated").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let p2 = c.get::<Pod>("default", "gated").await.unwrap();
        assert!(!condition(&p2, "Ready"), "ready without passing its probe");
        assert!(!status(&p).ready);
        set_ready(&p, true);
        until("gated ready", || async {
            let p = c.get::<Pod>("default", "gated").await.ok()?;
            (condition(&p, "Ready") && status(&p).ready).then_some(())
        })
        .await;
        set_ready(&p, false);
        until("gated not ready again", || async {
            let p = c.get::<Pod>("default", "gated").await.ok()?;
            (!condition(&p, "Ready")).then_some(())
        })
        .await;
    });
}

#[test]
fn agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods_process() {
    agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods(Rt::Process);
}

#[test]
fn agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods_docker() {
    agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods(Rt::Docker);
}

fn agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods(rt: Rt) {
    let mut cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    runtime().block_on(async {
        let c = client(&cluster);
        let marker = format!("adopt-{}", std::process::id());
        // (`; true` keeps sh from exec'ing sleep, so the marker stays on its command line.)
        c.create(&pod(
            "long",
            &format!("sleep 1000; true # {marker}"),
            json!({}),
            json!({}),
        ))
        .await
        .unwrap();
        let before = running(&c, "long").await;
        let started = status(&before).state.unwrap().running.unwrap().started_at;
        // Running is reported once the shim runs; its container follows within moments.
        until("the container's process", || async {
            (processes_with(&marker).len() == 1).then_some(())
        })
        .await;

        // The agent dies and comes back: it adopts the container.
        agent.kill9();
        assert_eq!(
            processes_with(&marker).len(),
            1,
            "the container outlives its agent"
        );
        agent.spawn();
        // A new pod proves the restarted agent is at work.
        c.create(&pod("after-restart", "sleep 1000", json!({}), json!({})))
            .await
            .unwrap();
        running(&c, "after-restart").await;
        let now = c.get::<Pod>("default", "long").await.unwrap();
        let s = status(&now);
        assert_eq!(s.restart_count, 0);
        assert_eq!(s.state.unwrap().running.unwrap().started_at, started);
        assert_eq!(
            processes_with(&marker).len(),
            1,
            "adopted, not started again"
        );

        // The leader dies: the agent carries on through the others.
        let leader = cluster.leader();
        cluster.members[leader].kill9();
        let c = client(&cluster);
        until("a pod created after the leader died to run", || async {
            match c.get::<Pod>("default", "after-failover").await {
                Ok(p) => (p.status.as_ref()?.phase == "Running").then_some(()),
                Err(e) if e.is_not_found() => {
                    let _ = c
                        .create(&pod("after-failover", "sleep 1000", json!({}), json!({})))
                        .await;
                    None
                }
                Err(_) => None,
            }
        })
        .await;
        let now = c.get::<Pod>("default", "long").await.unwrap();
        assert_eq!(status(&now).restart_count, 0);
        assert_eq!(processes_with(&marker).len(), 1);

        // A pod deleted while its agent is down is stopped when it comes back.
        agent.kill9();
        c.delete_named::<Pod>("default", "long").await.unwrap();
        agent.spawn();
        gone(&c, "long").await;
        until("the container of the deleted pod stopped", || async {
            processes_with(&marker).is_empty().then_some(())
        })
        .await;
    });
}

fn flotilla(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .args(["--server", &cluster.endpoints()])
        .output()
        .unwrap()
}

#[test]
fn logs_are_served_through_the_api_process() {
    logs_are_served_through_the_api(Rt::Process);
}

#[test]
fn logs_are_served_through_the_api_docker() {
    logs_are_served_through_the_api(Rt::Docker);
}

fn logs_are_served_through_the_api(rt: Rt) {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    runtime().block_on(async {
        let c = client(&cluster);
        let talker = "echo hello; echo oops >&2; i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.1; done";
        c.create(&pod("talker", talker, json!({}), json!({})))
            .await
            .unwrap();
        c.create(&pod("crasher", "echo run-$$; exit 1", json!({}), json!({})))
            .await
            .unwrap();
        running(&c, "talker").await;
        until("a few ticks", || async {
            let out = flotilla(&cluster, &["logs", "talker"]);
            String::from_utf8_lossy(&out.stdout).contains("tick 3").then_some(())
        })
        .await;
        let out = flotilla(&cluster, &["logs", "talker"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Both streams, each in order; how stdout and stderr lines interleave is up to the
        // runtime (Docker keeps the two streams apart).
        assert!(text.contains("oops\n"), "{text}");
        let stdout: Vec<&str> = text.lines().filter(|l| *l != "oops").collect();
        assert_eq!(stdout[..3], ["hello", "tick 1", "tick 2"], "{text}");
        let out = flotilla(&cluster, &["logs", "pod/talker", "--tail", "1"]);
        let last = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(last.starts_with("tick ") && last.lines().count() == 1, "{last:?}");

        // Following: new lines keep coming.
        let mut follow = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["logs", "talker", "-f", "--tail", "1", "--server", &cluster.endpoints()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = follow.stdout.take().unwrap();
        let lines = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            std::io::BufReader::new(stdout)
                .lines()
                .take(4)
                .map(|l| l.unwrap())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap();
        let _ = follow.kill();
        let _ = follow.wait();
        let n: Vec<u64> = lines
            .iter()
            .map(|l| l.trim_start_matches("tick ").parse().unwrap())
            .collect();
        assert!(n.windows(2).all(|w| w[1] == w[0] + 1), "{lines:?}");

        // The previous run of a crashing container.
        until("the crasher restarted", || async {
            let p = c.get::<Pod>("default", "crasher").await.ok()?;
            (status(&p).restart_count >= 1).then_some(())
        })
        .await;
        let out = flotilla(&cluster, &["logs", "crasher", "--previous"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("run-"));

        // The agent's own metrics and health, on the endpoint it publishes on its Node.
        let node = c.get::<Node>("", &rt.node()).await.unwrap();
        let endpoint = node.metadata.unwrap().annotations[AGENT_ENDPOINT].clone();
        assert_eq!(http_get(&endpoint, "/healthz"), (200, "ok\n".to_string()));
        // Its log service answers gRPC only, and never a web page.
        let logs = "POST /flotilla.agent.v1.Agent/Logs HTTP/1.1";
        let (code, head, _) = http_request(&endpoint, &format!("{logs}\r\nContent-Type: text/plain"), b"");
        assert_eq!(code, 415, "{head}");
        let (code, head, _) = http_request(
            &endpoint,
            &format!("{logs}\r\nContent-Type: application/grpc\r\nOrigin: http://evil.example"),
            b"",
        );
        assert_eq!(code, 403, "{head}");
        assert!(!head.contains("access-control-"), "{head}");
        let (code, ready) = http_get(&endpoint, "/readyz");
        assert_eq!(code, 200, "{ready}");
        let (code, metrics) = http_get(&endpoint, "/metrics");
        assert_eq!(code, 200);
        let value = |name: &str| -> f64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing from\n{metrics}"))
        };
        assert_eq!(value("flotilla_agent_pods"), 2.0, "{metrics}");
        // talker once, crasher at least twice (it restarted).
        assert!(value("flotilla_agent_container_starts_total") >= 3.0, "{metrics}");
        assert!(value("flotilla_agent_container_exits_total") >= 1.0, "{metrics}");
        assert!(value("flotilla_agent_lease_renewals_total") >= 1.0, "{metrics}");
        assert!(value("flotilla_agent_status_updates_total") >= 1.0, "{metrics}");
        assert!(value("flotilla_agent_containers{state=\"running\"}") >= 1.0, "{metrics}");

        // Errors a person can act on.
        c.create(&from_value::<Pod>(json!({
            "metadata": {"name": "two"},
            "spec": {"containers": [
                {"name": "a", "image": TEST_IMAGE, "command": ["sleep", "1000"]},
                {"name": "b", "image": TEST_IMAGE, "command": ["sleep", "1000"]},
            ]},
        })).unwrap())
        .await
        .unwrap();
        let out = flotilla(&cluster, &["logs", "two"]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("name one of a, b"), "{err}");
        c.create(&pod("nowhere", "true", json!({}), json!({"nodeSelector": {"disk": "none"}})))
            .await
            .unwrap();
        let out = flotilla(&cluster, &["logs", "nowhere"]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("not on a node yet"), "{err}");
    });
}

/// The docker runtime's own promises: a pod's containers share one network namespace and
/// the pod's address (which its probes reach and `POD_IP` names), its limits are the
/// containers' limits and are enforced, a missing image is said plainly, and a deleted
/// pod leaves no container behind, its sandbox included.
#[test]
fn docker_pods_share_a_network_namespace_and_get_their_limits() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), Rt::Docker);
    runtime().block_on(async {
        let c = client(&cluster);
        let web: Pod = from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [
                {"name": "server", "image": TEST_IMAGE,
                 "command": ["sh", "-c", "mkdir -p /www && echo hello from $POD_IP > /www/index.html && exec httpd -f -p 8080 -h /www"],
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "resources": {"limits": {"cpu": "500m", "memory": "64Mi"}},
                 "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1}},
                {"name": "client", "image": TEST_IMAGE,
                 "command": ["sh", "-c", "while true; do wget -qO- http://localhost:8080/ || echo unreachable; sleep 0.2; done"]},
            ]},
        }))
        .unwrap();
        c.create(&web).await.unwrap();
        // Ready: the agent's HTTP probe reached the server on the pod's address.
        let p = until("web ready", || async {
            let p = c.get::<Pod>("default", "web").await.ok()?;
            condition(&p, "Ready").then_some(p)
        })
        .await;
        let ip = p.status.clone().unwrap().pod_ip;
        // The client container reaches the server on localhost, and POD_IP is the pod's.
        until("the client's requests answered", || async {
            let out = flotilla(&cluster, &["logs", "web", "-c", "client"]);
            String::from_utf8_lossy(&out.stdout)
                .contains(&format!("hello from {ip}\n"))
                .then_some(())
        })
        .await;
        let ids: Vec<String> = p
            .status
            .clone()
            .unwrap()
            .container_statuses
            .iter()
            .map(|s| s.container_id.trim_start_matches("docker://").to_string())
            .collect();
        let server = docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.NetworkMode}}",
            &ids[0],
        ]);
        let client_net = docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &ids[1]]);
        let fields: Vec<&str> = server.split_whitespace().collect();
        assert_eq!(fields[..2], ["500000000", "67108864"], "{server}");
        assert!(fields[2].starts_with("container:"), "{server}");
        assert_eq!(client_net.trim(), fields[2], "one network namespace for the pod");

        // Over its memory limit: OOM-killed, and said so.
        oom_killed_over_its_memory_limit(&c).await;

        // An image the node does not have: not pulled, and the reason is plain.
        let mut missing = pod("missing", "true", json!({}), json!({}));
        missing.spec.as_mut().unwrap().containers[0].image = "flotilla-no-such-image:0".into();
        c.create(&missing).await.unwrap();
        let w = until("the missing image reported", || async {
            let p = c.get::<Pod>("default", "missing").await.ok()?;
            status(&p).state?.waiting
        })
        .await;
        assert!(
            w.message.contains("flotilla-no-such-image:0") && w.message.contains("not on this node"),
            "{w:?}"
        );

        // Deleted: its containers and its sandbox go.
        let uid = c.get::<Pod>("default", "web").await.unwrap().metadata.unwrap().uid;
        let of_pod = format!("label=io.flotilla.pod-uid={uid}");
        assert_eq!(docker(&["ps", "-q", "--filter", &of_pod]).lines().count(), 3);
        c.delete_named::<Pod>("default", "web").await.unwrap();
        gone(&c, "web").await;
        assert_eq!(docker(&["ps", "-aq", "--filter", &of_pod]), "");
    });
}

/// The process runtime's limits: through cgroups (v2, or v1 on hosts like this one) a
/// container over its memory limit is OOM-killed and said so, and one with a cpu limit
/// gets no more cpu than that. Without cgroups it must say so at start-up instead.
#[test]
fn process_limits_are_enforced_through_cgroups() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let agent_dir = dir.path().join("a1");
    let _agent = Agent::start(&cluster, &agent_dir, Rt::Process);
    runtime().block_on(async {
        let c = client(&cluster);
        c.create(&pod("up", "sleep 1000", json!({}), json!({})))
            .await
            .unwrap();
        running(&c, "up").await;
        let log = std::fs::read_to_string(agent_dir.with_extension("log")).unwrap();
        if log.contains("limits are NOT enforced") {
            // Only where the agent may not create cgroups; the tests run as root here.
            // SAFETY: geteuid has no preconditions.
            assert_ne!(unsafe { libc::geteuid() }, 0, "root, and no cgroups: {log}");
            return;
        }
        oom_killed_over_its_memory_limit(&c).await;

        // A busy loop limited to 100m: ~0.1 s of cpu per second of wall time.
        let marker = format!("spin-{}", std::process::id());
        c.create(&pod(
            "spin",
            &format!("while :; do :; done # {marker}"),
            json!({"resources": {"limits": {"cpu": "100m"}}}),
            json!({}),
        ))
        .await
        .unwrap();
        running(&c, "spin").await;
        let pid = until("the spinning process", || async {
            processes_with(&marker).first().copied()
        })
        .await;
        let cpu = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let f: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
                .split_whitespace()
                .skip(11)
                .take(2)
                .map(|x| x.parse().unwrap())
                .collect();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            (f[0] + f[1]) as f64 / hz
        };
        let (before, start) = (cpu(), Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu() - before;
        let wall = start.elapsed().as_secs_f64();
        // Throttled to 10%; unlimited it would take a whole core.
        assert!(used < 0.35 * wall, "{used:.2} s of cpu in {wall:.2} s");
    });
}

/// A Job through the command line, on the process runtime: an Indexed Job runs three pods,
/// two at a time, each seeing its own index; `get jobs` shows it complete; a Job with a
/// TTL is deleted with its pods once finished.
#[test]
fn a_job_runs_its_pods_to_completion_process() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), Rt::Process);
    let applied = apply(
        &cluster,
        dir.path(),
        "jobs.yaml",
        format!(
            "apiVersion: batch/v1
kind: Job
metadata:
  name: pi
spec:
  completions: 3
  parallelism: 2
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers:
      - name: main
        image: {TEST_IMAGE}
        command: [sh, -c, 'echo index=$JOB_COMPLETION_INDEX']
---
apiVersion: batch/v1
kind: Job
metadata:
  name: short
spec:
  ttlSecondsAfterFinished: 1
  template:
    spec:
      restartPolicy: OnFailure
      containers:
      - name: main
        image: {TEST_IMAGE}
        command: [sh, -c, 'exit 0']
"
        ),
    );
    assert_eq!(applied, "job.batch/pi created\njob.batch/short created\n");
    runtime().block_on(async {
        let c = client(&cluster);
        let job = until("the Job complete", || async {
            let j = c.get::<Job>("default", "pi").await.ok()?;
            let done = j
                .status
                .as_ref()?
                .conditions
                .iter()
                .any(|c| c.r#type == "Complete" && c.status == "True");
            done.then_some(j)
        })
        .await;
        let st = job.status.unwrap();
        assert_eq!((st.succeeded, st.active, st.failed), (3, 0, 0));
        assert_eq!(st.completed_indexes, "0-2");
        assert!(!st.completion_time.is_empty());

        // Each pod ran once with its own index, and said so in its log.
        let pods = labelled::<Pod>(&c, "batch.kubernetes.io/job-name=pi")
            .await
            .unwrap();
        assert_eq!(pods.len(), 3, "one pod per index, none extra");
        let mut seen = Vec::new();
        for p in &pods {
            let out = flotilla(&cluster, &["logs", p.name()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            seen.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        seen.sort();
        assert_eq!(seen, ["index=0", "index=1", "index=2"]);

        // The table, as kubectl prints it.
        let out = flotilla(&cluster, &["get", "jobs"]);
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let row = table
            .lines()
            .find(|l| l.starts_with("pi "))
            .unwrap_or_default();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.get(1..3), Some(&["Complete", "3/3"][..]), "{table}");

        // The TTL: the finished Job goes, and the garbage collector takes its pod.
        until("the short Job deleted", || async {
            c.get::<Job>("default", "short")
                .await
                .err()?
                .is_not_found()
                .then_some(())
        })
        .await;
        until("its pod collected", || async {
            let left = labelled::<Pod>(&c, "job-name=short").await?;
            left.is_empty().then_some(())
        })
        .await;
    });
}

/// A CronJob through the command line, on the process runtime: at the next minute it
/// starts a Job, whose pod runs and completes; `get cronjobs` shows the last schedule;
/// deleting the CronJob takes its Jobs and their pods with it.
#[test]
fn a_cronjob_starts_a_job_on_its_schedule_process() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), Rt::Process);
    let applied = apply(
        &cluster,
        dir.path(),
        "cron.yaml",
        format!(
            "apiVersion: batch/v1
kind: CronJob
metadata:
  name: tick
spec:
  schedule: '* * * * *'
  concurrencyPolicy: Forbid
  jobTemplate:
    metadata:
      labels: {{app: tick}}
    spec:
      template:
        metadata:
          labels: {{app: tick}}
        spec:
          restartPolicy: Never
          containers:
          - name: main
            image: {TEST_IMAGE}
            command: [sh, -c, 'echo ran']
"
        ),
    );
    assert_eq!(applied, "cronjob.batch/tick created\n");
    runtime().block_on(async {
        let c = client(&cluster);
        let start = std::time::SystemTime::now();
        // Within a minute and a bit: the next whole minute, then the Job's one pod.
        let end = Instant::now() + Duration::from_secs(90);
        let cj = loop {
            let cj = c.get::<CronJob>("default", "tick").await.unwrap();
            if cj
                .status
                .as_ref()
                .is_some_and(|s| !s.last_successful_time.is_empty())
            {
                break cj;
            }
            assert!(
                Instant::now() < end,
                "no successful run within 90 s: {cj:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let st = cj.status.unwrap();
        let scheduled = time::parse(&st.last_schedule_time).unwrap();
        let secs = scheduled
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(
            secs % 60,
            0,
            "runs start on the minute: {}",
            st.last_schedule_time
        );
        assert!(scheduled + Duration::from_secs(60) > start);
        let jobs = labelled::<Job>(&c, "app=tick").await.unwrap();
        let job = jobs
            .iter()
            .find(|j| j.name() == format!("tick-{}", secs / 60))
            .unwrap_or_else(|| panic!("the run's Job among {jobs:?}"));
        assert_eq!(job.status.as_ref().unwrap().succeeded, 1);

        let out = flotilla(&cluster, &["get", "cronjobs"]);
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let header: Vec<&str> = table
            .lines()
            .next()
            .unwrap_or_default()
            .split("  ")
            .filter(|s| !s.is_empty())
            .map(str::trim)
            .collect();
        assert_eq!(
            header,
            [
                "NAME",
                "SCHEDULE",
                "TIMEZONE",
                "SUSPEND",
                "ACTIVE",
                "LAST SCHEDULE",
                "AGE"
            ],
            "{table}"
        );
        assert!(table.contains("* * * * *"), "{table}");

        // Deleting the CronJob takes its Jobs and their pods.
        let out = flotilla(&cluster, &["delete", "cronjob", "tick"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        until("its Jobs and pods collected", || async {
            let jobs = labelled::<Job>(&c, "app=tick").await?;
            let pods = labelled::<Pod>(&c, "app=tick").await?;
            (jobs.is_empty() && pods.is_empty()).then_some(())
        })
        .await;
    });
}

/// Writes `text` to `dir/name` and applies it with the command line; what it printed.
fn apply(cluster: &Cluster, dir: &Path, name: &str, text: impl AsRef<[u8]>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = flotilla(cluster, &["apply", "-f", &path.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The objects of kind `K` in `default` with the labels `selector` picks.
async fn labelled<K: Resource>(c: &Client, selector: &str) -> Option<Vec<K>> {
    let req = ListRequest {
        namespace: "default".into(),
        label_selector: selector.into(),
        ..Default::default()
    };
    c.list::<K>(&req).await.ok().map(|(items, _)| items)
}

/// A fake-runtime agent keeping `nodes` nodes (`NAME-0000`, …; 0: one node, `NAME`);
/// killed when dropped.
struct FakeAgent(Child);

impl FakeAgent {
    fn start(cluster: &Cluster, dir: &Path, name: &str, nodes: usize) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "agent",
                "--servers",
                &cluster.endpoints(),
                "--node-name",
                name,
            ])
            .args(["--runtime", "fake", "--lease-interval", "1s"])
            .args(["--simulate-nodes", &nodes.to_string()])
            .arg("--data-dir")
            .arg(dir.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("flotilla agent starts");
        Self(child)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A DaemonSet through the command line: a pod on every node, on a node that joins later
/// too, and a rolling update that replaces every pod.
#[test]
fn a_daemonset_runs_on_every_node_including_one_that_joins_later() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _two = FakeAgent::start(&cluster, dir.path(), "sim", 2);
    let manifest = |image: &str| {
        apply(
            &cluster,
            dir.path(),
            "ds.yaml",
            format!(
                "apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: logger
spec:
  selector:
    matchLabels: {{app: logger}}
  template:
    metadata:
      labels: {{app: logger}}
    spec:
      containers:
      - name: main
        image: {image}
"
            ),
        )
    };
    assert_eq!(manifest("logger:1"), "daemonset.apps/logger created\n");
    runtime().block_on(async {
        let c = client(&cluster);
        // Node → image of its running pods.
        let placement = || async {
            let pods = labelled::<Pod>(&c, "app=logger").await?;
            let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
            for p in pods {
                let spec = p.spec.clone().unwrap_or_default();
                let running = p.status.as_ref().is_some_and(|s| s.phase == "Running");
                if running
                    && p.metadata
                        .as_ref()
                        .is_some_and(|m| m.deletion_timestamp.is_empty())
                {
                    out.entry(spec.node_name.clone())
                        .or_default()
                        .push(spec.containers[0].image.clone());
                }
            }
            Some(out)
        };
        let want = |nodes: &[&str], image: &str| {
            nodes
                .iter()
                .map(|n| (n.to_string(), vec![image.to_string()]))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        until("a pod on each node", || async {
            (placement().await? == want(&["sim-0000", "sim-0001"], "logger:1")).then_some(())
        })
        .await;

        let _late = FakeAgent::start(&cluster, dir.path(), "late", 0);
        until("a pod on the node that joined", || async {
            (placement().await? == want(&["late", "sim-0000", "sim-0001"], "logger:1"))
                .then_some(())
        })
        .await;
        until("the status counting three", || async {
            let ds = c.get::<DaemonSet>("default", "logger").await.ok()?;
            let s = ds.status?;
            (s.desired_number_scheduled == 3 && s.number_available == 3).then_some(())
        })
        .await;
        let out = flotilla(&cluster, &["get", "daemonsets"]);
        let table = String::from_utf8_lossy(&out.stdout).to_string();
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.starts_with("logger"))
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            row.get(..6),
            Some(&["logger", "3", "3", "3", "3", "3"][..]),
            "{table}"
        );

        // A new template replaces every pod, one node at a time.
        assert_eq!(manifest("logger:2"), "daemonset.apps/logger configured\n");
        until("every pod replaced", || async {
            (placement().await? == want(&["late", "sim-0000", "sim-0001"], "logger:2"))
                .then_some(())
        })
        .await;
    });
}

/// Node maintenance through the command line: a drain evicts a Deployment's two pods
/// from a node, the second only once the PodDisruptionBudget allows it again, that is once
/// the first one's replacement is ready on another node.
#[test]
fn a_drain_waits_for_the_disruption_budget() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _a = FakeAgent::start(&cluster, dir.path(), "a", 0);
    apply(
        &cluster,
        dir.path(),
        "web.yaml",
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: main
        image: web:1
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: web
spec:
  minAvailable: 1
  selector:
    matchLabels: {app: web}
",
    );
    runtime().block_on(async {
        let c = client(&cluster);
        until("one disruption allowed", || async {
            let b = c.get::<PodDisruptionBudget>("default", "web").await.ok()?;
            let s = b.status?;
            (s.current_healthy == 2 && s.disruptions_allowed == 1).then_some(())
        })
        .await;
    });
    let out = flotilla(&cluster, &["get", "pdb"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("web"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row.get(..4), Some(&["web", "1", "N/A", "1"][..]), "{table}");

    let _b = FakeAgent::start(&cluster, dir.path(), "b", 0);
    runtime().block_on(async {
        let c = client(&cluster);
        until("node b registered", || async {
            c.get::<Node>("", "b").await.ok().map(|_| ())
        })
        .await;
    });
    let out = flotilla(&cluster, &["drain", "a", "--timeout", "60s"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("node/a cordoned\n"), "{stdout}");
    assert!(stdout.ends_with("node/a drained\n"), "{stdout}");
    assert_eq!(
        stdout.matches("evicting pod default/web-").count(),
        2,
        "{stdout}"
    );
    assert_eq!(stdout.matches(" evicted\n").count(), 2, "{stdout}");
    assert!(
        stderr.contains("(will retry after 5s): Cannot evict pod as it would violate the pod's disruption budget."),
        "the second eviction waited for the budget: {stderr}"
    );
    runtime().block_on(async {
        let c = client(&cluster);
        let pods = labelled::<Pod>(&c, "app=web").await.unwrap();
        let nodes: Vec<String> = pods
            .iter()
            .map(|p| p.spec.clone().unwrap_or_default().node_name)
            .collect();
        assert_eq!(nodes, ["b", "b"], "{pods:?}");
        let a = c.get::<Node>("", "a").await.unwrap();
        assert!(a.spec.unwrap().unschedulable);
    });
    let out = flotilla(&cluster, &["uncordon", "a"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node/a uncordoned\n");
    let out = flotilla(&cluster, &["cordon", "b"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "node/b cordoned\n");
    let out = flotilla(&cluster, &["cordon", "b"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node/b already cordoned\n"
    );
}

#[test]
fn volumes_project_configmaps_secrets_and_the_downward_api_process() {
    volumes_project_configmaps_secrets_and_the_downward_api(Rt::Process);
}

#[test]
fn volumes_project_configmaps_secrets_and_the_downward_api_docker() {
    volumes_project_configmaps_secrets_and_the_downward_api(Rt::Docker);
}

/// A ConfigMap seen as files and as a variable, its update reaching the files; a Secret's
/// files with their mode; the pod's labels through the downward API; a scratch emptyDir;
/// projected volumes read-only.
fn volumes_project_configmaps_secrets_and_the_downward_api(rt: Rt) {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), rt);
    // The process runtime mounts in a mount namespace of the container's own, on the node's
    // paths: keep them inside the test's directory.
    let at = match rt {
        Rt::Process => dir.path().join("mnt").to_string_lossy().to_string(),
        Rt::Docker => "/etc/flotilla-test".to_string(),
    };
    runtime().block_on(async {
        let c = client(&cluster);
        let cm: ConfigMap = from_value(json!({
            "metadata": {"name": "app", "namespace": "default"},
            "data": {"greeting": "hello", "color": "blue"},
        }))
        .unwrap();
        c.create(&cm).await.unwrap();
        let secret: Secret = from_value(json!({
            "metadata": {"name": "creds", "namespace": "default"},
            "stringData": {"token": "s3cr3t"},
        }))
        .unwrap();
        c.create(&secret).await.unwrap();
        let script = format!(
            "echo env=$GREETING; cat {at}/creds/token; echo; stat -c mode=%a {at}/creds/..data/token; \
             cat {at}/info/labels; echo; echo x > {at}/scratch/f && echo scratch=$(cat {at}/scratch/f); \
             (echo y > {at}/app/new) 2>/dev/null && echo app=rw || echo app=ro; \
             echo all=$(cat {at}/all/color)-$(cat {at}/all/tok)-$(cat {at}/all/name); \
             while true; do echo file=$(cat {at}/app/greeting); sleep 0.2; done"
        );
        let p = pod(
            "vols",
            &script,
            json!({
                "env": [{"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting"}}}],
                "volumeMounts": [
                    {"name": "app", "mountPath": format!("{at}/app")},
                    {"name": "creds", "mountPath": format!("{at}/creds")},
                    {"name": "info", "mountPath": format!("{at}/info")},
                    {"name": "scratch", "mountPath": format!("{at}/scratch")},
                    {"name": "all", "mountPath": format!("{at}/all")},
                ],
            }),
            json!({
                "volumes": [
                    {"name": "app", "configMap": {"name": "app"}},
                    {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 256}},
                    {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
                    {"name": "scratch", "emptyDir": {}},
                    {"name": "all", "projected": {"sources": [
                        {"configMap": {"name": "app", "items": [{"key": "color", "path": "color"}]}},
                        {"secret": {"name": "creds", "items": [{"key": "token", "path": "tok"}]}},
                        {"downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    ]}},
                ],
            }),
        );
        let mut p = p;
        p.metadata_mut().labels.insert("tier".into(), "web".into());
        c.create(&p).await.unwrap();
        running(&c, "vols").await;
        let logs = || {
            let out = flotilla(&cluster, &["logs", "vols"]);
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        until("the first file reads", || async {
            logs().contains("file=hello").then_some(())
        })
        .await;
        let text = logs();
        for want in [
            "env=hello\n",
            "s3cr3t\n",
            "mode=400\n",
            "tier=\"web\"\n",
            "scratch=x\n",
            "app=ro\n",
            "all=blue-s3cr3t-vols\n",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }
        if rt == Rt::Process {
            // The mounts are the container's own: the node sees an empty mount point.
            let host = std::path::Path::new(&at).join("app");
            assert!(host.is_dir() && std::fs::read_dir(&host).unwrap().next().is_none());
        }

        // An update of the ConfigMap reaches the file (the variable keeps its start value).
        c.patch::<ConfigMap>("default", "app", &json!({"data": {"greeting": "bonjour"}}))
            .await
            .unwrap();
        until("the update in the file", || async {
            logs().contains("file=bonjour").then_some(())
        })
        .await;
        c.delete_named::<Pod>("default", "vols").await.unwrap();
        gone(&c, "vols").await;
    });
}
