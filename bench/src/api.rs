//! Benchmarks of the Flotilla API (not etcd's): creates of small pods, lists of many pods,
//! and one change fanned out to many watchers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;

use crate::report::{Progress, Report, histogram, record};

/// One client per connection, each starting at a different endpoint.
fn clients(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<Client>> {
    (0..conns.max(1))
        .map(|i| {
            let mut rotated = endpoints.to_vec();
            rotated.rotate_left(i % endpoints.len());
            Client::with_dialer(&rotated, &crate::net::dialer()).map_err(anyhow::Error::msg)
        })
        .collect()
}

fn small_pod(namespace: &str, name: &str) -> Pod {
    from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "bench"}},
        "spec": {"containers": [{
            "name": "c", "image": "bench", "command": ["sleep", "3600"],
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
        }]},
    }))
    .expect("a valid pod")
}

/// Creates the namespace unless it exists.
pub async fn ensure_namespace(client: &Client, name: &str) -> anyhow::Result<()> {
    let ns: Namespace = from_value(json!({"metadata": {"name": name}}))?;
    match client.create(&ns).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating namespace {name}")),
    }
}

/// Creates pods `prefix-000000`.. up to `total` with `concurrency` creators; returns the
/// latency histogram and the seconds it took.
async fn create_pods(
    clients: &[Client],
    namespace: &str,
    prefix: &str,
    total: u64,
    concurrency: usize,
) -> anyhow::Result<(Histogram<u64>, f64)> {
    let next = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(histogram()));
    let done = next.clone();
    let _progress = Progress::start("api-create", move |e| {
        let n = done.load(Ordering::Relaxed).min(total);
        format!("{n}/{total} ({:.0}/s)", n as f64 / e.as_secs_f64())
    });
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let (next, hist) = (next.clone(), hist.clone());
            let (namespace, prefix) = (namespace.to_string(), prefix.to_string());
            tokio::spawn(async move {
                let mut local = histogram();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        break;
                    }
                    let pod = small_pod(&namespace, &format!("{prefix}-{n:06}"));
                    let t = Instant::now();
                    match client.create(&pod).await {
                        Ok(_) => {}
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => return Err(anyhow::anyhow!("create failed: {e}")),
                    }
                    record(&mut local, t.elapsed());
                }
                hist.lock().await.add(&local).ok();
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let h = hist.lock().await.clone();
    Ok((h, secs))
}

pub async fn create(
    endpoints: &[String],
    clients_n: usize,
    conns: usize,
    total: u64,
) -> anyhow::Result<Report> {
    let clients = clients(endpoints, conns)?;
    ensure_namespace(&clients[0], "bench-create").await?;
    let run = format!(
        "r{:x}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() % 0xffffff
    );
    let (h, secs) = create_pods(&clients, "bench-create", &run, total, clients_n).await?;
    Ok(Report::new("api-create")
        .with("clients", clients_n as u64)
        .throughput(&h, secs))
}

pub async fn list(endpoints: &[String], pods: u64, runs: usize) -> anyhow::Result<Report> {
    let clients = clients(endpoints, 8)?;
    let c = &clients[0];
    ensure_namespace(c, "bench-list").await?;
    let req = ListRequest {
        namespace: "bench-list".into(),
        ..Default::default()
    };
    let have = c.list::<Pod>(&req).await?.0.len() as u64;
    if have < pods {
        eprintln!("api-list: creating {} pods", pods - have);
        create_pods(&clients, "bench-list", "p", pods, 64).await?;
    }
    let mut h = histogram();
    let mut items = 0;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let (list, _) = c.list::<Pod>(&req).await?;
        record(&mut h, t.elapsed());
        items = list.len();
    }
    Ok(Report::new("api-list")
        .with("items", items as u64)
        .with("runs", runs as u64)
        .latencies(&h))
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

pub async fn watch(
    endpoints: &[String],
    watchers: usize,
    changes: u64,
    rate: u64,
) -> anyhow::Result<Report> {
    let clients = clients(endpoints, (watchers / 100).clamp(1, 16))?;
    let c = clients[0].clone();
    ensure_namespace(&c, "bench-watch").await?;
    let target = small_pod("bench-watch", "target");
    let rv = match c.create(&target).await {
        Ok(p) => p.resource_version().to_string(),
        Err(e) if e.is_already_exists() => c
            .get::<Pod>("bench-watch", "target")
            .await?
            .resource_version()
            .to_string(),
        Err(e) => return Err(e.into()),
    };
    let req = WatchRequest {
        namespace: "bench-watch".into(),
        field_selector: "metadata.name=target".into(),
        resource_version: rv,
        ..Default::default()
    };
    let hist = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..watchers {
        let client = clients[i % clients.len()].clone();
        let mut stream = client.watch_once::<Pod>(&req).await?;
        let (hist, received) = (hist.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = histogram();
            let mut seen = 0;
            while seen < changes {
                let Ok(Ok(Some(event))) =
                    tokio::time::timeout(Duration::from_secs(30), stream.message()).await
                else {
                    break;
                };
                let object = event.object.unwrap_or_default();
                let sent = object
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.get("sent"))
                    .and_then(|s| s.parse::<u64>().ok());
                if let Some(sent) = sent {
                    record(
                        &mut local,
                        Duration::from_micros(micros_now().saturating_sub(sent)),
                    );
                    seen += 1;
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            hist.lock().await.add(&local).ok();
        }));
    }
    let pause = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    for i in 0..changes {
        let patch = json!({"metadata": {"annotations": {"seq": i.to_string(), "sent": micros_now().to_string()}}});
        c.patch::<Pod>("bench-watch", "target", &patch).await?;
        tokio::time::sleep(pause).await;
    }
    for t in tasks {
        t.await?;
    }
    let h = hist.lock().await.clone();
    let expected = changes * watchers as u64;
    Ok(Report::new("api-watch")
        .with("watchers", watchers as u64)
        .with("changes", changes)
        .with("lost", expected - received.load(Ordering::Relaxed))
        .latencies(&h))
}
