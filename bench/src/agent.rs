//! The node agent's benchmarks.
//!
//! - `pod-startup`: pods created for one node (`--node`), each timed from its create being
//!   sent to the watch showing it Running (Kubernetes' pod startup latency SLI, without
//!   image pulls);
//! - `agent-sim`: an agent process with `--runtime fake --simulate-nodes N` is measured
//!   (CPU share and RSS over `--duration`) once its N nodes are registered, and every node
//!   must stay Ready throughout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_client::watch::{WatchItem, watch};
use serde_json::json;

use crate::api::ensure_namespace;
use crate::report::{Progress, Report, histogram, record};

pub async fn pod_startup(
    endpoints: &[String],
    node: &str,
    pods: usize,
    clients: usize,
) -> anyhow::Result<Report> {
    let c = Client::with_dialer(endpoints, &crate::net::dialer()).map_err(anyhow::Error::msg)?;
    ensure_namespace(&c, "bench-agent").await?;
    let start_rv = c
        .list_page::<Pod>(&ListRequest {
            namespace: "bench-agent".into(),
            limit: 1,
            ..Default::default()
        })
        .await?
        .metadata
        .unwrap_or_default()
        .resource_version;
    let mut events = watch::<Pod>(
        c.clone(),
        WatchRequest {
            namespace: "bench-agent".into(),
            resource_version: start_rv,
            ..Default::default()
        },
    );
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let collector = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut h = histogram();
            let mut running = std::collections::HashSet::new();
            while running.len() < pods {
                let Some(item) = events.recv().await else {
                    bail!("the watch ended");
                };
                let (WatchItem::Added(p) | WatchItem::Modified(p)) = item? else {
                    continue;
                };
                let phase = p.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
                if phase == "Running"
                    && running.insert(p.name().to_string())
                    && let Some(t) = sent.lock().unwrap_or_else(|p| p.into_inner()).get(p.name())
                {
                    record(&mut h, t.elapsed());
                }
            }
            Ok(h)
        })
    };
    let start = Instant::now();
    let next = Arc::new(Mutex::new(0usize));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (c, sent, next, node) = (c.clone(), sent.clone(), next.clone(), node.to_string());
        tasks.spawn(async move {
            loop {
                let i = {
                    let mut n = next.lock().unwrap_or_else(|p| p.into_inner());
                    if *n >= pods {
                        return Ok::<(), anyhow::Error>(());
                    }
                    *n += 1;
                    *n - 1
                };
                let name = format!("p-{i:04}");
                let pod: Pod = from_value(json!({
                    "metadata": {"name": name, "namespace": "bench-agent"},
                    "spec": {
                        "nodeSelector": {"kubernetes.io/hostname": node},
                        "terminationGracePeriodSeconds": 2,
                        "containers": [{"name": "c", "image": "sleep",
                            "command": ["sleep", "3600"],
                            "resources": {"requests": {"cpu": "10m", "memory": "8Mi"}}}],
                    },
                }))?;
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), Instant::now());
                c.create(&pod)
                    .await
                    .with_context(|| format!("creating {name}"))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let h = tokio::time::timeout(Duration::from_secs(120), collector)
        .await
        .context("pods not all Running within 2 minutes")???;
    let secs = start.elapsed().as_secs_f64();
    // Clean up: the pods' processes stop with them.
    let (items, _) = c
        .list::<Pod>(&ListRequest {
            namespace: "bench-agent".into(),
            ..Default::default()
        })
        .await?;
    for p in items {
        let _ = c.delete_named::<Pod>("bench-agent", p.name()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (left, _) = c
            .list::<Pod>(&ListRequest {
                namespace: "bench-agent".into(),
                ..Default::default()
            })
            .await?;
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{} pods still there a minute after their deletion",
                left.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Report::new("pod-startup")
        .with("pods", pods as u64)
        .with("clients", clients as u64)
        .throughput(&h, secs))
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb / 1024)
}

async fn nodes_ready(c: &Client, prefix: &str) -> anyhow::Result<(usize, usize)> {
    let (nodes, _) = c.list::<Node>(&ListRequest::default()).await?;
    let ours: Vec<&Node> = nodes
        .iter()
        .filter(|n| n.name().starts_with(prefix))
        .collect();
    let ready = ours
        .iter()
        .filter(|n| {
            let ok = n.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "Ready" && c.status == "True")
            });
            let tainted = n.spec.as_ref().is_some_and(|s| !s.taints.is_empty());
            ok && !tainted
        })
        .count();
    Ok((ours.len(), ready))
}

pub async fn agent_sim(
    endpoints: &[String],
    pid: u32,
    nodes: usize,
    prefix: &str,
    duration: Duration,
) -> anyhow::Result<Report> {
    let c = Client::with_dialer(endpoints, &crate::net::dialer()).map_err(anyhow::Error::msg)?;
    let wait = Instant::now();
    loop {
        let (n, ready) = nodes_ready(&c, prefix).await?;
        if n >= nodes && ready >= nodes {
            break;
        }
        if wait.elapsed() > Duration::from_secs(120) {
            bail!("only {ready} of {nodes} nodes Ready after 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let registered = wait.elapsed();
    // Past start-up: measure the steady state.
    let ticks0 = cpu_ticks(pid).context("the agent process is gone")?;
    let t0 = Instant::now();
    let mut max_rss = 0;
    let mut min_ready = nodes;
    let _progress = Progress::start("agent-sim", move |e| {
        format!("{:.0}/{} s", e.as_secs_f64(), duration.as_secs())
    });
    while t0.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(2)).await;
        max_rss = max_rss.max(rss_mib(pid).unwrap_or(0));
        let (_, ready) = nodes_ready(&c, prefix).await?;
        min_ready = min_ready.min(ready);
    }
    let ticks = cpu_ticks(pid).context("the agent process is gone")? - ticks0;
    let cpu_share = ticks as f64 / 100.0 / t0.elapsed().as_secs_f64();
    Ok(Report::new("agent-sim")
        .with("nodes", nodes as u64)
        .with(
            "registered_secs",
            (registered.as_secs_f64() * 10.0).round() / 10.0,
        )
        .with(
            "cpu_percent_of_one_core",
            (cpu_share * 1000.0).round() / 10.0,
        )
        .with("max_rss_mib", max_rss)
        .with("min_ready_nodes", min_ready as u64))
}
