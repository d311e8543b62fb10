//! The scheduler's benchmark: N registered nodes (Node objects, Ready, with Leases renewed;
//! no agents), then M pods created by concurrent clients; measures, through the replicated
//! API, the time from the first create to the last pod seen bound, and per pod the time
//! from its create to its bind being seen in a watch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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

pub struct SchedOpts {
    pub nodes: usize,
    pub pods: u64,
    pub clients: usize,
    /// Seconds between renewals of each node's Lease (0: never).
    pub lease_interval: u64,
    /// Control-plane processes whose CPU time is counted.
    pub member_pids: Vec<u32>,
}

pub const LEASE_NAMESPACE: &str = flotilla_proto::api::NODE_LEASE_NAMESPACE;

fn node(name: &str) -> anyhow::Result<Node> {
    Ok(from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "BenchReady"}],
        },
    }))?)
}

fn lease(name: &str) -> anyhow::Result<Lease> {
    Ok(from_value(json!({
        "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": time::now()},
    }))?)
}

fn pod(name: &str) -> anyhow::Result<Pod> {
    Ok(from_value(json!({
        "metadata": {"name": name, "namespace": "bench-sched"},
        "spec": {"containers": [{
            "name": "c", "image": "bench",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        }]},
    }))?)
}

/// User plus system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn total_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_seconds(p)).sum()
}

/// Runs `f` over `items` with `width` tasks at once.
async fn in_parallel<T, F, Fut>(items: Vec<T>, width: usize, f: F) -> anyhow::Result<()>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let f = Arc::new(f);
    let queue = Arc::new(Mutex::new(items));
    let tasks: Vec<_> = (0..width.max(1))
        .map(|_| {
            let (f, queue) = (f.clone(), queue.clone());
            tokio::spawn(async move {
                loop {
                    let item = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(item) = item else {
                        return Ok::<(), anyhow::Error>(());
                    };
                    f(item).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

pub async fn run(endpoints: &[String], opts: SchedOpts) -> anyhow::Result<Report> {
    let clients: Vec<Client> = (0..8)
        .map(|i| {
            let mut rotated = endpoints.to_vec();
            rotated.rotate_left(i % endpoints.len());
            Client::new(&rotated).map_err(anyhow::Error::msg)
        })
        .collect::<anyhow::Result<_>>()?;
    let c = clients[0].clone();
    ensure_namespace(&c, LEASE_NAMESPACE).await?;
    ensure_namespace(&c, "bench-sched").await?;

    // Register the nodes and their leases.
    let names: Vec<String> = (0..opts.nodes).map(|i| format!("node-{i:05}")).collect();
    let registered = Arc::new(AtomicU64::new(0));
    {
        let done = registered.clone();
        let total = opts.nodes;
        let _progress = Progress::start("sched: registering nodes", move |_| {
            format!("{}/{total}", done.load(Ordering::Relaxed))
        });
        let cs = clients.clone();
        let counter = registered.clone();
        in_parallel(names.clone(), 32, move |name| {
            let c = cs[name.len() % cs.len()].clone();
            let counter = counter.clone();
            async move {
                for result in [
                    c.create(&node(&name)?).await.map(|_| ()),
                    c.create(&lease(&name)?).await.map(|_| ()),
                ] {
                    match result {
                        Ok(()) => {}
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => bail!("registering {name}: {e}"),
                    }
                }
                counter.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
    }
    eprintln!("sched: {} nodes registered", opts.nodes);

    // Keep the leases renewed, spread evenly over the interval, as agents would.
    let renewals = Arc::new(AtomicU64::new(0));
    let renewer = (opts.lease_interval > 0).then(|| {
        let (c, names, renewals) = (clients[1].clone(), names.clone(), renewals.clone());
        let interval = Duration::from_secs(opts.lease_interval);
        tokio::spawn(async move {
            let gap = interval / names.len().max(1) as u32;
            let mut tick = tokio::time::interval(gap.max(Duration::from_micros(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for name in names.iter().cycle() {
                tick.tick().await;
                let (c, name, renewals) = (c.clone(), name.clone(), renewals.clone());
                tokio::spawn(async move {
                    let patch = json!({"spec": {"renewTime": time::now()}});
                    if c.patch::<Lease>(LEASE_NAMESPACE, &name, &patch)
                        .await
                        .is_ok()
                    {
                        renewals.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    });

    // Watch the pods, then create them.
    let start_rv = c
        .list_page::<Pod>(&ListRequest {
            namespace: "bench-sched".into(),
            limit: 1,
            ..Default::default()
        })
        .await?
        .metadata
        .unwrap_or_default()
        .resource_version;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut events = watch::<Pod>(
        c.clone(),
        WatchRequest {
            namespace: "bench-sched".into(),
            resource_version: start_rv,
            ..Default::default()
        },
    );
    let total = opts.pods;
    let bound = Arc::new(AtomicU64::new(0));
    let cpu_before = total_cpu(&opts.member_pids);
    let start = Instant::now();
    let collector = {
        let (created, bound) = (created.clone(), bound.clone());
        tokio::spawn(async move {
            let mut h = histogram();
            let mut per_node: HashMap<String, u64> = HashMap::new();
            let mut seen: HashMap<String, String> = HashMap::new();
            let mut last = Instant::now();
            while (seen.len() as u64) < total {
                let Some(item) = events.recv().await else {
                    bail!("the pod watch ended");
                };
                let p = match item? {
                    WatchItem::Added(p) | WatchItem::Modified(p) => p,
                    _ => continue,
                };
                let node = p
                    .spec
                    .as_ref()
                    .map(|s| s.node_name.clone())
                    .unwrap_or_default();
                if node.is_empty() {
                    continue;
                }
                let name = p.name().to_string();
                if let Some(before) = seen.get(&name) {
                    if *before != node {
                        bail!("pod {name} was bound twice: {before} then {node}");
                    }
                    continue;
                }
                last = Instant::now();
                if let Some(t) = created.lock().unwrap_or_else(|p| p.into_inner()).get(&name) {
                    record(&mut h, last.duration_since(*t));
                }
                *per_node.entry(node.clone()).or_default() += 1;
                seen.insert(name, node);
                bound.fetch_add(1, Ordering::Relaxed);
            }
            Ok((h, last, per_node))
        })
    };
    let _progress = {
        let bound = bound.clone();
        Progress::start("sched", move |e| {
            let n = bound.load(Ordering::Relaxed);
            format!("{n}/{total} bound ({:.0}/s)", n as f64 / e.as_secs_f64())
        })
    };
    let pods: Vec<String> = (0..total).map(|i| format!("p-{i:06}")).rev().collect();
    let cs = clients.clone();
    let stamps = created.clone();
    in_parallel(pods, opts.clients, move |name| {
        let c = cs[name.len() % cs.len()].clone();
        let stamps = stamps.clone();
        async move {
            let p = pod(&name)?;
            stamps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), Instant::now());
            c.create(&p)
                .await
                .with_context(|| format!("creating {name}"))?;
            Ok(())
        }
    })
    .await?;
    let created_secs = start.elapsed().as_secs_f64();
    let (h, last, per_node) = tokio::time::timeout(Duration::from_secs(600), collector)
        .await
        .context("pods were not all bound within 10 minutes")???;
    let secs = last.duration_since(start).as_secs_f64();
    let cpu = total_cpu(&opts.member_pids) - cpu_before;
    if let Some(r) = renewer {
        r.abort();
    }
    let max_per_node = per_node.values().copied().max().unwrap_or(0);
    let mut report = Report::new("sched")
        .with("nodes", opts.nodes as u64)
        .with("pods", total)
        .with("clients", opts.clients as u64)
        .with("create_secs", (created_secs * 1000.0).round() / 1000.0)
        .throughput(&h, secs)
        .with("nodes_used", per_node.len() as u64)
        .with("max_pods_per_node", max_per_node)
        .with("lease_renewals", renewals.load(Ordering::Relaxed));
    if !opts.member_pids.is_empty() {
        report = report.with("cpu_secs", (cpu * 100.0).round() / 100.0).with(
            "cpu_secs_per_1000_pods",
            (cpu / total.max(1) as f64 * 1000.0 * 1000.0).round() / 1000.0,
        );
    }
    Ok(report)
}
