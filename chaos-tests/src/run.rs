//! One chaos run: cluster up, workloads and nemesis, heal, check, report.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_proto::etcdserverpb::RangeRequest;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::check::{self, FinalKv, Finding};
use crate::cluster::{
    Cluster, ClusterSpec, EVICTION_TOLERATION, NODE_MONITOR_GRACE, WORKER_CPU_MILLIS,
    WORKER_MAX_PODS,
};
use crate::controlplane::{self, Outage};
use crate::nemesis::{self, FaultKind, Step};
use crate::scenario::Scenario;
use crate::workload::{self, ClientCtx, Clock, PREFIX, WatchLog};
use flotilla_client::Client;

/// How a run is set up.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub scenario: &'static Scenario,
    pub seed: u64,
    pub duration: Duration,
    pub nodes: usize,
    pub binary: PathBuf,
    /// Reports go in a new folder under this one.
    pub report_root: PathBuf,
    /// Register clients per member.
    pub clients_per_node: usize,
    pub keys: usize,
    /// Pause between one client's operations.
    pub pace: Duration,
    /// Keep the members' data dirs in the report.
    pub keep_data: bool,
    /// Worker nodes (agents with the fake runtime) for the control-plane workload; 0 leaves
    /// it out.
    pub workers: usize,
    /// Containers on Docker networks instead of processes on loopback.
    pub docker: bool,
    /// TLS on every port, identities checked (see [`ClusterSpec::tls`]).
    pub tls: bool,
}

/// Counts by outcome.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counts {
    pub total: usize,
    pub ok: usize,
    pub indeterminate: usize,
    pub failed: usize,
}

impl Counts {
    fn of<'a>(outcomes: impl Iterator<Item = &'a str>) -> Self {
        let mut c = Counts::default();
        for o in outcomes {
            c.total += 1;
            match o {
                "ok" => c.ok += 1,
                "failed" => c.failed += 1,
                _ => c.indeterminate += 1,
            }
        }
        c
    }
}

/// What a run did and found (the report's `run.json`).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub harness: String,
    pub seed: u64,
    pub duration_s: f64,
    pub nodes: usize,
    pub test_fault: Option<String>,
    pub faults_injected: usize,
    pub register: Counts,
    pub appends: Counts,
    /// Events each watcher saw, and streams it opened.
    pub watchers: Vec<(String, usize, usize)>,
    pub history_events: usize,
    pub workers: usize,
    /// Deployment creates, scales and rolls: all, and those acknowledged.
    pub deploy_actions: (usize, usize),
    pub pod_events: usize,
    pub worker_outages: Vec<Outage>,
    /// From the end of the last fault to every member serving linearizable reads.
    pub recovery_ms: u64,
    pub checker_ms: u64,
    pub findings: Vec<Finding>,
    /// Whether the run passed: no findings, or, for a broken build, some.
    pub passed: bool,
    pub report_dir: PathBuf,
    pub replay: String,
}

/// Runs one scenario and writes its report.
pub async fn run(opts: RunOptions) -> anyhow::Result<Summary> {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let report_dir = opts.report_root.join(format!(
        "{}{}-seed{}-{started}",
        opts.scenario.name,
        if opts.docker { "-docker" } else { "" },
        opts.seed
    ));
    std::fs::create_dir_all(&report_dir)
        .with_context(|| format!("creating {}", report_dir.display()))?;
    let kinds: Vec<FaultKind> = opts
        .scenario
        .faults
        .iter()
        .copied()
        .filter(|k| !opts.docker || k.in_docker())
        .collect();
    if kinds.len() < opts.scenario.faults.len() {
        eprintln!(
            "chaos: the Docker harness leaves out {:?}",
            opts.scenario
                .faults
                .iter()
                .filter(|k| !k.in_docker())
                .collect::<Vec<_>>()
        );
    }
    let plan = nemesis::plan(&kinds, opts.seed, opts.duration);
    write_json(&report_dir.join("plan.json"), &plan)?;

    let spec = ClusterSpec {
        nodes: opts.nodes,
        binary: opts.binary.clone(),
        dir: report_dir.clone(),
        test_fault: opts.scenario.test_fault.map(str::to_string),
        seed: opts.seed,
        workers: opts.workers,
        docker: opts.docker,
        tls: opts.tls,
    };
    let mut cluster = Cluster::start(spec).await?;
    let result = drive(&opts, &plan, &mut cluster, &report_dir).await;
    let names: Vec<PathBuf> = cluster.members.iter().map(|m| m.data_dir.clone()).collect();
    cluster.stop().await;
    if !opts.keep_data {
        for d in names {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let summary = result?;
    write_json(&report_dir.join("run.json"), &summary)?;
    Ok(summary)
}

async fn drive(
    opts: &RunOptions,
    plan: &[Step],
    cluster: &mut Cluster,
    report_dir: &Path,
) -> anyhow::Result<Summary> {
    let clock = Clock::start();
    cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let start_revision = cluster.revision_within(Duration::from_secs(30)).await? + 1;

    // Watchers, one per member.
    let (watch_stop_tx, watch_stop) = watch::channel(false);
    let mut watch_logs = Vec::new();
    let mut watch_tasks = Vec::new();
    for m in &cluster.members {
        let log = Arc::new(Mutex::new(WatchLog::default()));
        watch_logs.push(log.clone());
        watch_tasks.push(tokio::spawn(workload::watcher(
            m.name.clone(),
            m.channel(),
            start_revision,
            log,
            watch_stop.clone(),
        )));
    }

    // Register and append clients, spread over the members.
    let (stop_tx, stop) = watch::channel(false);
    let ctx = ClientCtx {
        clock,
        stop,
        ids: Arc::new(AtomicUsize::new(0)),
        pace: opts.pace,
    };
    let mut register_tasks = Vec::new();
    for c in 0..opts.nodes * opts.clients_per_node {
        let m = &cluster.members[c % opts.nodes];
        register_tasks.push(tokio::spawn(workload::register_client(
            c,
            m.name.clone(),
            m.channel(),
            opts.keys,
            opts.seed.wrapping_mul(31).wrapping_add(c as u64),
            ctx.clone(),
        )));
    }
    let mut append_tasks = Vec::new();
    for (c, m) in cluster.members.iter().enumerate() {
        append_tasks.push(tokio::spawn(workload::append_client(
            c,
            m.name.clone(),
            m.channel(),
            ctx.clone(),
        )));
    }

    // Deployments, when there are workers to run them.
    let workers_down = Arc::new(AtomicBool::new(false));
    let api = Client::with_dialer(&cluster.client_addrs(), cluster.dialer())
        .map_err(anyhow::Error::msg)?;
    let deployment_names: Vec<String> = if opts.workers > 0 {
        vec!["web".into(), "api".into()]
    } else {
        Vec::new()
    };
    let deployments_task = (!deployment_names.is_empty()).then(|| {
        tokio::spawn(controlplane::deployments_client(
            api.clone(),
            deployment_names.clone(),
            opts.seed.wrapping_mul(7919),
            ctx.clone(),
            workers_down.clone(),
        ))
    });

    // The faults.
    let run_start = Instant::now();
    let (timeline, outages, fault_failures) =
        nemesis::run(cluster, plan, clock, &workers_down).await;
    tokio::time::sleep_until(run_start + opts.duration).await;

    // Heal, and see the cluster come back.
    let healed = Instant::now();
    cluster.heal_all().await?;
    let mut findings = Vec::new();
    let recovered = async {
        cluster.wait_for_leader(Duration::from_secs(30)).await?;
        cluster.wait_all_serving(Duration::from_secs(30)).await
    }
    .await;
    let recovery_ms = healed.elapsed().as_millis() as u64;
    for failure in fault_failures {
        findings.push(Finding {
            check: "fault response".into(),
            summary: failure,
            detail: String::new(),
        });
    }
    if let Err(e) = &recovered {
        findings.push(Finding {
            check: "recovery".into(),
            summary: format!("the cluster did not recover after healing: {e:#}"),
            detail: String::new(),
        });
    }
    // Some operations on the healed cluster, then stop the clients.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_tx.send_replace(true);
    let mut register = Vec::new();
    for t in register_tasks {
        register.extend(t.await.unwrap_or_default());
    }
    register.sort_by_key(|r| r.id);
    let mut appends = Vec::new();
    for t in append_tasks {
        appends.extend(t.await.unwrap_or_default());
    }
    let deploy_actions = match deployments_task {
        Some(t) => t.await.unwrap_or_default(),
        None => Vec::new(),
    };
    findings.extend(controlplane::converge(&api, &deployment_names, Duration::from_secs(60)).await);
    for crash in cluster.crashed().await {
        findings.push(Finding {
            check: "processes".into(),
            summary: crash,
            detail: "see the member's log in logs/".into(),
        });
    }

    // The end state and the committed history.
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await?;
    let leader_channel = cluster.members[leader].channel();
    let final_kvs = final_state(&leader_channel).await?;
    let last_revision = final_kvs
        .values()
        .map(|kv| kv.mod_revision)
        .max()
        .unwrap_or(0);
    // Everything committed by now: the clients have stopped.
    let until = cluster.revision_within(Duration::from_secs(30)).await?;
    let history = Duration::from_secs(60);
    let reference: Vec<workload::WatchEvent> = workload::read_history(
        leader_channel.clone(),
        PREFIX,
        start_revision,
        until,
        history,
    )
    .await?
    .iter()
    .filter_map(workload::WatchEvent::from_proto)
    .collect();
    let pod_history = if opts.workers > 0 {
        controlplane::pod_history(leader_channel.clone(), start_revision, until, history).await?
    } else {
        Vec::new()
    };

    // Every watcher catches up with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && watch_logs
            .iter()
            .any(|l| l.lock().unwrap_or_else(|p| p.into_inner()).last_revision() < last_revision)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watch_stop_tx.send_replace(true);
    for t in watch_tasks {
        let _ = t.await;
    }
    let watch_logs: Vec<WatchLog> = watch_logs
        .iter()
        .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect();

    // Check.
    let checking = std::time::Instant::now();
    findings.extend(check::reference(&reference, &final_kvs, start_revision));
    findings.extend(check::register(&register, Duration::from_secs(60)));
    findings.extend(check::append(
        &appends,
        &final_kvs,
        &reference,
        workload::APPEND_PREFIX,
    ));
    for log in &watch_logs {
        findings.extend(check::watch(log, &reference));
    }
    findings.extend(controlplane::check_pods(
        &pod_history,
        &outages,
        WORKER_CPU_MILLIS,
        WORKER_MAX_PODS,
        NODE_MONITOR_GRACE + EVICTION_TOLERATION + Duration::from_secs(3),
    ));
    let checker_ms = checking.elapsed().as_millis() as u64;

    // Report.
    write_lines(&report_dir.join("register.jsonl"), &register)?;
    write_lines(&report_dir.join("append.jsonl"), &appends)?;
    write_lines(&report_dir.join("history.jsonl"), &reference)?;
    write_lines(&report_dir.join("deployments.jsonl"), &deploy_actions)?;
    write_lines(
        &report_dir.join("pods-history.jsonl"),
        &controlplane::describe(&pod_history),
    )?;
    for log in &watch_logs {
        write_lines(
            &report_dir.join(format!("watch-{}.jsonl", log.node)),
            &log.events,
        )?;
    }
    let mut tl = String::new();
    for e in &timeline {
        tl.push_str(&format!("{:>8.3}s  {}\n", e.at_ms as f64 / 1000.0, e.what));
    }
    tl.push_str(&format!(
        "{:>8.3}s  heal everything; recovered in {recovery_ms} ms\n",
        clock.ns() as f64 / 1e9 - recovery_ms as f64 / 1000.0
    ));
    std::fs::write(report_dir.join("timeline.txt"), tl)?;
    let mut f = String::new();
    for finding in &findings {
        f.push_str(&format!(
            "[{}] {}\n{}\n\n",
            finding.check, finding.summary, finding.detail
        ));
    }
    std::fs::write(report_dir.join("findings.txt"), f)?;

    let expect_anomaly = opts.scenario.test_fault.is_some();
    let caught = findings
        .iter()
        .any(|f| f.check == "register linearizability");
    let passed = if expect_anomaly {
        caught
    } else {
        findings.is_empty()
    };
    Ok(Summary {
        scenario: opts.scenario.name.into(),
        harness: if opts.docker { "docker" } else { "process" }.into(),
        seed: opts.seed,
        duration_s: opts.duration.as_secs_f64(),
        nodes: opts.nodes,
        test_fault: opts.scenario.test_fault.map(str::to_string),
        faults_injected: plan.len(),
        register: Counts::of(register.iter().map(|r| r.outcome.as_str())),
        appends: Counts::of(appends.iter().map(|r| r.outcome.as_str())),
        watchers: watch_logs
            .iter()
            .map(|l| (l.node.clone(), l.events.len(), l.streams))
            .collect(),
        history_events: reference.len(),
        workers: opts.workers,
        deploy_actions: (
            deploy_actions.len(),
            deploy_actions.iter().filter(|a| a.outcome == "ok").count(),
        ),
        pod_events: pod_history.len(),
        worker_outages: outages,
        recovery_ms,
        checker_ms,
        findings,
        passed,
        report_dir: report_dir.to_path_buf(),
        replay: format!(
            "cargo run -p flotilla-chaos -- --scenario {} --seed {} --duration {}s --nodes {} --workers {}{}{}",
            opts.scenario.name,
            opts.seed,
            opts.duration.as_secs(),
            opts.nodes,
            opts.workers,
            if opts.docker { " --harness docker" } else { "" },
            if opts.tls { " --tls" } else { "" }
        ),
    })
}

/// Every key under the prefix, by a linearizable read.
async fn final_state(channel: &Channel) -> anyhow::Result<BTreeMap<String, FinalKv>> {
    let mut kv = KvClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = RangeRequest {
            key: PREFIX.as_bytes().to_vec(),
            range_end: workload::prefix_end(PREFIX),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), kv.range(req)).await {
            Ok(Ok(r)) => {
                return Ok(r
                    .into_inner()
                    .kvs
                    .into_iter()
                    .map(|kv| {
                        (
                            String::from_utf8_lossy(&kv.key).into_owned(),
                            FinalKv {
                                value: String::from_utf8_lossy(&kv.value).into_owned(),
                                version: kv.version,
                                create_revision: kv.create_revision,
                                mod_revision: kv.mod_revision,
                            },
                        )
                    })
                    .collect());
            }
            Ok(Err(e)) if Instant::now() >= deadline => bail!("reading the final state: {e}"),
            Err(_) if Instant::now() >= deadline => bail!("reading the final state timed out"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn write_lines<T: Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?,
    );
    for item in items {
        serde_json::to_writer(&mut f, item)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    Ok(())
}
