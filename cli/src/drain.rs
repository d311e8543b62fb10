//! `flotilla cordon|uncordon|drain NODE`: node maintenance, as kubectl does it.
//!
//! Drain cordons the node, then evicts its pods through the API's eviction call, which a
//! PodDisruptionBudget may refuse for now: such a pod is tried again every 5 s until the
//! budget allows it or `--timeout` passes. DaemonSet pods are left (they would come back:
//! `--ignore-daemonsets` says that is fine), pods without a controller are deleted only with
//! `--force` (nothing would make them again). Once every evicted pod is gone the node is
//! drained.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;
use flotilla_client::{Client, ClientError};
use flotilla_proto::api::{ListRequest, Node, Pod, Resource};
use serde_json::json;
use tonic::Code;

use crate::verbs::{ServerArg, server_error};

/// How long a drain waits before trying an eviction a budget refused again (kubectl's 5 s).
const RETRY: Duration = Duration::from_secs(5);
/// How often a drain looks whether an evicted pod is gone.
const POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
pub struct NodeArgs {
    /// The node.
    pub node: String,
}

#[derive(Args)]
pub struct DrainArgs {
    /// The node.
    pub node: String,
    /// Leave DaemonSet-managed pods where they are (they would be made again on the node).
    #[arg(long)]
    pub ignore_daemonsets: bool,
    /// Also delete pods that no controller manages (nothing will make them again).
    #[arg(long)]
    pub force: bool,
    /// Seconds each pod gets to stop [default: its own terminationGracePeriodSeconds].
    #[arg(long)]
    pub grace_period: Option<i64>,
    /// Give up after this long (`90s`, `5m`) [default: wait as long as it takes].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

async fn set_unschedulable(client: &Client, node: &str, on: bool) -> anyhow::Result<()> {
    let current = client.get::<Node>("", node).await.map_err(server_error)?;
    let already = current.spec.as_ref().is_some_and(|s| s.unschedulable) == on;
    let word = if on { "cordoned" } else { "uncordoned" };
    if already {
        println!("node/{node} already {word}");
        return Ok(());
    }
    client
        .patch::<Node>("", node, &json!({"spec": {"unschedulable": on}}))
        .await
        .map_err(server_error)?;
    println!("node/{node} {word}");
    Ok(())
}

pub async fn cordon(server: &ServerArg, args: NodeArgs) -> anyhow::Result<()> {
    set_unschedulable(&server.client()?, &args.node, true).await
}

pub async fn uncordon(server: &ServerArg, args: NodeArgs) -> anyhow::Result<()> {
    set_unschedulable(&server.client()?, &args.node, false).await
}

fn controller_kind(p: &Pod) -> Option<&str> {
    p.metadata
        .as_ref()?
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.kind.as_str())
}

fn qualified(p: &Pod) -> String {
    format!("{}/{}", p.namespace(), p.name())
}

pub async fn drain(server: &ServerArg, args: DrainArgs) -> anyhow::Result<()> {
    let client = server.client()?;
    let node = args.node.clone();
    set_unschedulable(&client, &node, true).await?;
    let (pods, _) = client
        .list::<Pod>(&ListRequest {
            field_selector: format!("spec.nodeName={node}"),
            ..Default::default()
        })
        .await
        .map_err(server_error)?;
    let pods: Vec<Pod> = pods
        .into_iter()
        .filter(|p| {
            p.metadata
                .as_ref()
                .is_some_and(|m| m.deletion_timestamp.is_empty())
        })
        .collect();
    let daemons: Vec<String> = pods
        .iter()
        .filter(|p| controller_kind(p) == Some("DaemonSet"))
        .map(qualified)
        .collect();
    let unmanaged: Vec<String> = pods
        .iter()
        .filter(|p| controller_kind(p).is_none())
        .map(qualified)
        .collect();
    let mut refusals = Vec::new();
    if !daemons.is_empty() && !args.ignore_daemonsets {
        refusals.push(format!(
            "cannot delete DaemonSet-managed Pods (use --ignore-daemonsets to ignore): {}",
            daemons.join(", ")
        ));
    }
    if !unmanaged.is_empty() && !args.force {
        refusals.push(format!(
            "cannot delete Pods that declare no controller (use --force to override): {}",
            unmanaged.join(", ")
        ));
    }
    if !refusals.is_empty() {
        bail!(
            "unable to drain node {node:?} (it stays cordoned): {}",
            refusals.join("; ")
        );
    }
    if !daemons.is_empty() {
        eprintln!(
            "Warning: ignoring DaemonSet-managed Pods: {}",
            daemons.join(", ")
        );
    }
    if !unmanaged.is_empty() {
        eprintln!(
            "Warning: deleting Pods that declare no controller: {}",
            unmanaged.join(", ")
        );
    }
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut evictions = tokio::task::JoinSet::new();
    for p in pods
        .into_iter()
        .filter(|p| controller_kind(p) != Some("DaemonSet"))
    {
        let client = client.clone();
        let grace = args.grace_period;
        evictions.spawn(async move { evict(&client, &p, grace, deadline).await });
    }
    let mut failed = Vec::new();
    while let Some(done) = evictions.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    if !failed.is_empty() {
        bail!(
            "unable to drain node {node:?} (it stays cordoned): {}",
            failed.join("; ")
        );
    }
    println!("node/{node} drained");
    Ok(())
}

/// Evicts one pod, trying again while a budget refuses, then waits until it is gone.
async fn evict(
    client: &Client,
    p: &Pod,
    grace: Option<i64>,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let (ns, name) = (p.namespace(), p.name());
    let uid = p
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    let past = |deadline: Option<Instant>| deadline.is_some_and(|d| Instant::now() >= d);
    println!("evicting pod {ns}/{name}");
    loop {
        match client.evict(ns, name, grace).await {
            Ok(_) => break,
            Err(e) if e.is_not_found() => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                if past(deadline) {
                    return Err(anyhow!(
                        "error when evicting pods/{name:?} -n {ns:?}: global timeout reached"
                    ));
                }
                eprintln!(
                    "error when evicting pods/{name:?} -n {ns:?} (will retry after 5s): {}",
                    e.status.message()
                );
                tokio::time::sleep(RETRY).await;
            }
            Err(e) => return Err(anyhow!("error when evicting pods/{name:?} -n {ns:?}: {e}")),
        }
    }
    loop {
        match client.get::<Pod>(ns, name).await {
            Err(e) if e.is_not_found() => break,
            Ok(now) if now.metadata.as_ref().is_some_and(|m| m.uid != uid) => break,
            Ok(_) => {}
            Err(e) => return Err(gone_error(name, ns, e)),
        }
        if past(deadline) {
            return Err(anyhow!(
                "error when waiting for pod {name:?} in namespace {ns:?} to terminate: global timeout reached"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    println!("pod/{name} evicted");
    Ok(())
}

fn gone_error(name: &str, ns: &str, e: ClientError) -> anyhow::Error {
    anyhow!("error when waiting for pod {name:?} in namespace {ns:?} to terminate: {e}")
}
