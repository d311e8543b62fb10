//! The node agent with the process runtime, against a real three-member control plane:
//! pods run and report Running, crash into CrashLoopBackOff, restart on liveness failures,
//! turn Ready with their readiness probe, stop within their grace period when deleted, and
//! survive the agent's own restart and the control-plane leader's death without being lost
//! or run twice.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE, http_get, processes_with};
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

/// An agent process; killed with -9 when dropped.
struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    node: String,
    servers: String,
}

impl Agent {
    fn start(cluster: &Cluster, dir: &Path, node: &str) -> Self {
        let mut a = Agent {
            child: None,
            dir: dir.to_path_buf(),
            node: node.to_string(),
            servers: cluster.endpoints(),
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
        // The containers outlive the agent by design; the test's must not outlive the test.
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
    let mut container = json!({"name": "main", "image": "sh", "command": ["sh", "-c", script]});
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

async fn gone(c: &Client, name: &str) -> Duration {
    let start = Instant::now();
    until(&format!("{name} gone"), || async {
        matches!(c.get::<Pod>("default", name).await, Err(e) if e.is_not_found()).then_some(())
    })
    .await;
    start.elapsed()
}

#[test]
fn pods_run_and_stop_within_their_grace_period() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), "a1");
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
        assert_eq!(st.pod_ip, "127.0.0.1");
        assert_eq!(st.host_ip, "127.0.0.1");
        assert!(!st.start_time.is_empty());
        assert_eq!(p.spec.as_ref().unwrap().node_name, "a1");
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
fn crashes_back_off_and_finished_pods_stay_finished() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), "a1");
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
fn liveness_failures_restart_and_readiness_gates_ready() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), "a1");
    let work = tempfile::tempdir().unwrap();
    let ready_file = work.path().join("ready");
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
        std::fs::write(&ready_file, "").unwrap();
        until("gated ready", || async {
            let p = c.get::<Pod>("default", "gated").await.ok()?;
            (condition(&p, "Ready") && status(&p).ready).then_some(())
        })
        .await;
        std::fs::remove_file(&ready_file).unwrap();
        until("gated not ready again", || async {
            let p = c.get::<Pod>("default", "gated").await.ok()?;
            (!condition(&p, "Ready")).then_some(())
        })
        .await;
    });
}

#[test]
fn agent_restarts_and_leader_deaths_neither_lose_nor_duplicate_pods() {
    let mut cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&cluster, &dir.path().join("a1"), "a1");
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
fn logs_are_served_through_the_api() {
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&cluster, &dir.path().join("a1"), "a1");
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
        assert!(text.starts_with("hello\n") || text.starts_with("oops\n"), "{text}");
        assert!(text.contains("oops\n") && text.contains("tick 1\ntick 2\n"), "{text}");
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
        let node = c.get::<Node>("", "a1").await.unwrap();
        let endpoint = node.metadata.unwrap().annotations[AGENT_ENDPOINT].clone();
        assert_eq!(http_get(&endpoint, "/healthz"), (200, "ok\n".to_string()));
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
                {"name": "a", "image": "sh", "command": ["sleep", "1000"]},
                {"name": "b", "image": "sh", "command": ["sleep", "1000"]},
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
