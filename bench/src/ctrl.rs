//! The controllers' benchmarks, against simulated nodes: Node objects with Leases renewed and
//! a stand-in kubelet that marks the pods bound to them Running and Ready (what the agent's
//! fake runtime does), so that no agent process is needed.
//!
//! - `ctrl-scale`: a Deployment scaled from 0 to R replicas until R are available, then a
//!   rolling update of all of them (maxSurge 25%) until the rollout completes;
//! - `ctrl-failover`: the control-plane leader is killed (-9) and a replica deleted at
//!   once; time until the new leader's controllers have created its replacement;
//! - `ctrl-node-loss`: one node's agent stops (its Lease is no longer renewed, its pods no
//!   longer reported); time until every replica runs on the other nodes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_client::informer::{Change, Filter, Informer};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::api::ensure_namespace;
use crate::report::{Progress, Report};
use crate::sched::LEASE_NAMESPACE;

fn client(endpoints: &[String], i: usize) -> anyhow::Result<Client> {
    let mut rotated = endpoints.to_vec();
    rotated.rotate_left(i % endpoints.len());
    Client::with_dialer(&rotated, &crate::net::dialer()).map_err(anyhow::Error::msg)
}

/// Simulated nodes: Node objects, Leases renewed every `interval` while alive, and a
/// stand-in kubelet for their pods.
pub struct Nodes {
    names: Vec<String>,
    dead: Arc<Mutex<HashSet<String>>>,
    _renewer: tokio::task::JoinHandle<()>,
    _kubelet: Informer<Pod>,
    _worker: tokio::task::JoinHandle<()>,
}

impl Nodes {
    pub async fn register(
        endpoints: &[String],
        n: usize,
        interval: Duration,
    ) -> anyhow::Result<Self> {
        let c = client(endpoints, 0)?;
        ensure_namespace(&c, LEASE_NAMESPACE).await?;
        let names: Vec<String> = (0..n).map(|i| format!("sim-{i:04}")).collect();
        let sem = Arc::new(Semaphore::new(32));
        let mut tasks = tokio::task::JoinSet::new();
        for name in &names {
            let (c, name, sem) = (c.clone(), name.clone(), sem.clone());
            tasks.spawn(async move {
                let _permit = sem.acquire().await;
                let node: Node = from_value(json!({
                    "metadata": {"name": name},
                    "status": {
                        "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }))?;
                let lease: Lease = from_value(json!({
                    "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
                    "spec": {"holderIdentity": name, "renewTime": time::now()},
                }))?;
                for r in [
                    c.create(&node).await.map(|_| ()),
                    c.create(&lease).await.map(|_| ()),
                ] {
                    match r {
                        Ok(()) => {}
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => bail!("registering {name}: {e}"),
                    }
                }
                Ok::<(), anyhow::Error>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let dead: Arc<Mutex<HashSet<String>>> = Arc::default();
        let renewer = {
            let (c, names, dead) = (client(endpoints, 1)?, names.clone(), dead.clone());
            tokio::spawn(async move {
                let gap = interval / names.len().max(1) as u32;
                let mut tick = tokio::time::interval(gap.max(Duration::from_micros(200)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for name in names.iter().cycle() {
                    tick.tick().await;
                    if dead
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(name)
                    {
                        continue;
                    }
                    let (c, name) = (c.clone(), name.clone());
                    tokio::spawn(async move {
                        let patch = json!({"spec": {"renewTime": time::now()}});
                        let _ = c.patch::<Lease>(LEASE_NAMESPACE, &name, &patch).await;
                    });
                }
            })
        };
        // The stand-in kubelet: bound, unready pods of live nodes become Running and Ready.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
        let mine: HashSet<String> = names.iter().cloned().collect();
        let kubelet = {
            let dead = dead.clone();
            Informer::<Pod>::start(c.clone(), Filter::default(), move |change| {
                if let Change::Added(p) | Change::Updated { new: p, .. } = change {
                    let node = p
                        .spec
                        .as_ref()
                        .map(|s| s.node_name.clone())
                        .unwrap_or_default();
                    let deleting = p
                        .metadata
                        .as_ref()
                        .is_some_and(|m| !m.deletion_timestamp.is_empty());
                    let alive = mine.contains(&node)
                        && !dead
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .contains(&node);
                    if alive && !deleting && !ready(&p) {
                        let _ = tx.send((p.namespace().to_string(), p.name().to_string()));
                    }
                }
            })
        };
        let worker = {
            let c = client(endpoints, 2)?;
            let sem = Arc::new(Semaphore::new(64));
            let next_ip = Arc::new(AtomicU64::new(0));
            tokio::spawn(async move {
                while let Some((ns, name)) = rx.recv().await {
                    let Ok(permit) = sem.clone().acquire_owned().await else {
                        return;
                    };
                    let (c, next_ip) = (c.clone(), next_ip.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        for _ in 0..5 {
                            let Ok(mut p) = c.get::<Pod>(&ns, &name).await else {
                                return;
                            };
                            if ready(&p) {
                                return;
                            }
                            let n = next_ip.fetch_add(1, Ordering::Relaxed);
                            let now = time::now();
                            let status = p.status.get_or_insert_default();
                            status.phase = "Running".into();
                            status.pod_ip =
                                format!("10.{}.{}.{}", 64 + n / 65536, n / 256 % 256, n % 256);
                            status.start_time = now.clone();
                            status.conditions.retain(|c| c.r#type != "Ready");
                            status.conditions.push(PodCondition {
                                r#type: "Ready".into(),
                                status: "True".into(),
                                last_transition_time: now,
                                ..Default::default()
                            });
                            match c.update_status(&p).await {
                                Ok(_) => return,
                                Err(e) if e.is_not_found() => return,
                                Err(_) => continue,
                            }
                        }
                    });
                }
            })
        };
        Ok(Self {
            names,
            dead,
            _renewer: renewer,
            _kubelet: kubelet,
            _worker: worker,
        })
    }

    /// The node's agent dies: no more lease renewals or pod reports.
    pub fn kill(&self, name: &str) {
        self.dead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
    }
}

fn ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == "True")
    })
}

fn deployment(name: &str, replicas: i32, version: &str) -> anyhow::Result<Deployment> {
    Ok(from_value(json!({
        "metadata": {"name": name, "namespace": "bench-ctrl"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": format!("bench:{version}"),
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
            },
        },
    }))?)
}

/// Waits until the deployment reports `replicas` updated, ready and available, with no old
/// replicas; prints progress.
async fn until_rolled_out(
    c: &Client,
    name: &str,
    replicas: i32,
    what: &'static str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let seen = Arc::new(AtomicU64::new(0));
    let shown = seen.clone();
    let _progress = Progress::start(what, move |_| {
        format!("{}/{replicas} available", shown.load(Ordering::Relaxed))
    });
    loop {
        let d = c.get::<Deployment>("bench-ctrl", name).await?;
        let s = d.status.unwrap_or_default();
        seen.store(s.available_replicas.max(0) as u64, Ordering::Relaxed);
        let generation = d.metadata.map(|m| m.generation).unwrap_or(0);
        if s.observed_generation >= generation
            && s.updated_replicas == replicas
            && s.available_replicas == replicas
            && s.replicas == replicas
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(600) {
            bail!("{what}: not done after 10 minutes ({s:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn scale(
    endpoints: &[String],
    nodes: usize,
    replicas: i32,
    lease_interval: Duration,
) -> anyhow::Result<Report> {
    let c = client(endpoints, 0)?;
    ensure_namespace(&c, "bench-ctrl").await?;
    let _nodes = Nodes::register(endpoints, nodes, lease_interval).await?;
    eprintln!("ctrl-scale: {nodes} nodes registered");
    c.create(&deployment("scale", 0, "v1")?).await?;
    until_rolled_out(&c, "scale", 0, "ctrl-scale: create").await?;
    c.patch::<Deployment>(
        "bench-ctrl",
        "scale",
        &json!({"spec": {"replicas": replicas}}),
    )
    .await?;
    let up = until_rolled_out(&c, "scale", replicas, "ctrl-scale: 0 → replicas").await?;
    eprintln!("ctrl-scale: {replicas} available after {up:?}");
    let template = deployment("scale", replicas, "v2")?
        .spec
        .and_then(|s| s.template)
        .unwrap_or_default();
    c.patch::<Deployment>(
        "bench-ctrl",
        "scale",
        &json!({"spec": {"template": flotilla_client::api::json::to_value(&template)}}),
    )
    .await?;
    let rolled = until_rolled_out(&c, "scale", replicas, "ctrl-scale: rolling update").await?;
    Ok(Report::new("ctrl-scale")
        .with("nodes", nodes as u64)
        .with("replicas", replicas as u64)
        .with(
            "scale_up_secs",
            (up.as_secs_f64() * 1000.0).round() / 1000.0,
        )
        .with(
            "rolling_update_secs",
            (rolled.as_secs_f64() * 1000.0).round() / 1000.0,
        ))
}

/// Pods of the deployment that are not being deleted.
async fn active(c: &Client, app: &str) -> anyhow::Result<Vec<Pod>> {
    let (pods, _) = c
        .list::<Pod>(&ListRequest {
            namespace: "bench-ctrl".into(),
            label_selector: format!("app={app}"),
            ..Default::default()
        })
        .await?;
    Ok(pods
        .into_iter()
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.deletion_timestamp.is_empty())
        })
        .collect())
}

pub async fn failover(endpoints: &[String], member_pids: &[u32]) -> anyhow::Result<Report> {
    if member_pids.len() != endpoints.len() {
        bail!("--member-pids must give one pid per endpoint, in the same order");
    }
    let c = client(endpoints, 0)?;
    ensure_namespace(&c, "bench-ctrl").await?;
    let _nodes = Nodes::register(endpoints, 3, Duration::from_secs(2)).await?;
    c.create(&deployment("failover", 10, "v1")?).await?;
    until_rolled_out(&c, "failover", 10, "ctrl-failover: setup").await?;
    let before: HashSet<String> = active(&c, "failover")
        .await?
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    let leader = crate::failover::leader(endpoints).await?;
    let index = endpoints
        .iter()
        .position(|e| *e == leader)
        .context("the leader is not among the endpoints")?;
    let pid = member_pids[index];
    let killed = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    if !status.success() {
        bail!("kill -9 {pid} failed");
    }
    // Delete one replica as soon as the cluster takes writes again.
    let victim = before.iter().next().cloned().context("no pods")?;
    let survivors: Vec<String> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, e)| e.clone())
        .collect();
    let c = Client::with_dialer(&survivors, &crate::net::dialer()).map_err(anyhow::Error::msg)?;
    loop {
        match c
            .delete::<Pod>(&DeleteRequest {
                namespace: "bench-ctrl".into(),
                name: victim.clone(),
                grace_period_seconds: Some(0),
                ..Default::default()
            })
            .await
        {
            Ok(_) => break,
            Err(e) if e.is_not_found() => break,
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("no write accepted within 60 s of the leader's death");
        }
    }
    let deleted = killed.elapsed();
    let replaced = loop {
        let now = active(&c, "failover").await.unwrap_or_default();
        if now.iter().any(|p| !before.contains(p.name())) && now.len() == 10 {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(60) {
            bail!("the deleted replica was not replaced within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Report::new("ctrl-failover")
        .with(
            "delete_accepted_secs",
            (deleted.as_secs_f64() * 1000.0).round() / 1000.0,
        )
        .with(
            "replaced_secs",
            (replaced.as_secs_f64() * 1000.0).round() / 1000.0,
        ))
}

pub async fn node_loss(
    endpoints: &[String],
    nodes: usize,
    replicas: i32,
) -> anyhow::Result<Report> {
    let c = client(endpoints, 0)?;
    ensure_namespace(&c, "bench-ctrl").await?;
    let sim = Nodes::register(endpoints, nodes, Duration::from_secs(2)).await?;
    c.create(&deployment("loss", replicas, "v1")?).await?;
    until_rolled_out(&c, "loss", replicas, "ctrl-node-loss: setup").await?;
    let on = |pods: &[Pod], n: &str| {
        pods.iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name == n))
            .count()
    };
    let pods = active(&c, "loss").await?;
    let victim = sim
        .names
        .iter()
        .max_by_key(|n| on(&pods, n))
        .cloned()
        .context("no nodes")?;
    let lost = on(&pods, &victim);
    let done = Arc::new(AtomicBool::new(false));
    let died = Instant::now();
    sim.kill(&victim);
    let _progress = {
        let done = done.clone();
        Progress::start("ctrl-node-loss", move |e| {
            format!(
                "{:.0} s since the node died{}",
                e.as_secs_f64(),
                if done.load(Ordering::Relaxed) {
                    ", done"
                } else {
                    ""
                }
            )
        })
    };
    let recovered = loop {
        let pods = active(&c, "loss").await?;
        if pods.len() == replicas as usize && on(&pods, &victim) == 0 && pods.iter().all(ready) {
            break died.elapsed();
        }
        if died.elapsed() > Duration::from_secs(300) {
            bail!("pods of the dead node not replaced within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    done.store(true, Ordering::Relaxed);
    Ok(Report::new("ctrl-node-loss")
        .with("nodes", nodes as u64)
        .with("replicas", replicas as u64)
        .with("pods_on_dead_node", lost as u64)
        .with(
            "recovered_secs",
            (recovered.as_secs_f64() * 1000.0).round() / 1000.0,
        ))
}
