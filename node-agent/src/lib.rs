//! Flotilla's node agent (the kubelet of this project).
//!
//! - registers its Node (capacity from the machine or flags, labels, addresses) and renews
//!   its Lease in `flotilla-node-lease` every `--lease-interval`;
//! - follows the pods bound to it with an informer (list + resuming watch; a relist after an
//!   expired revision or a control-plane failover tells it only what changed);
//! - runs one [`worker`] per pod, keyed by the pod's uid, so a pod is never run twice;
//! - after its own restart, adopts the containers the runtime still has and stops those of
//!   pods that no longer exist.
//!
//! With `--simulate-nodes N` (fake runtime) one agent registers and keeps N nodes.

pub mod docker;
pub mod env;
pub mod logs;
pub mod metrics;
pub mod probe;
pub mod process;
pub mod runtime;
pub mod volumes;
pub mod worker;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_client::informer::{Change, Filter, Informer};
use flotilla_client::{Client, ClientError};
use flotilla_proto::api::{
    Lease, LeaseSpec, Namespace, Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo,
    ObjectMeta, Pod, Resource, time,
};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::runtime::{ContainerRecord, Runtime};
use crate::worker::{Msg, NodeInfo, Worker, futures_join};

pub const LEASE_NAMESPACE: &str = flotilla_proto::api::NODE_LEASE_NAMESPACE;
/// The Node annotation with the agent's log service address (as the API server reads it).
pub const AGENT_ENDPOINT: &str = "flotilla.io/agent-endpoint";

#[derive(Clone, Debug)]
pub struct Config {
    pub servers: Vec<String>,
    /// How the agent dials them: TLS with its node's certificate, or plaintext.
    pub dialer: flotilla_transport::Dialer,
    /// TLS on the agent's own port (logs, metrics), with the node's certificate: clients
    /// need a certificate from the cluster's CA, and logs are for members and
    /// `system:masters` only. Plaintext when unset.
    pub tls: Option<flotilla_transport::ServerTls>,
    pub node_name: String,
    pub node_ip: String,
    pub labels: BTreeMap<String, String>,
    pub data_dir: PathBuf,
    pub lease_interval: Duration,
    /// cpu (millicores), memory (bytes) and pods the node offers.
    pub cpu_milli: i64,
    pub memory: i64,
    pub max_pods: i64,
    /// Nodes this agent keeps (fake runtime): `NAME-0000`, `NAME-0001`, …; 0: just NAME.
    pub simulate_nodes: usize,
    /// Where the agent serves container logs to the control plane (port 0: any free port).
    pub logs_addr: String,
    /// Stop every container when the agent stops (otherwise they keep running and a
    /// restarted agent adopts them).
    pub stop_containers_on_exit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the control plane ({0}) did not answer: {1}")]
    Unreachable(String, ClientError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{0}")]
    Setup(String),
}

/// The machine's cpu count (millicores) and memory (bytes).
pub fn machine_capacity() -> (i64, i64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as i64;
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    (cpus * 1000, memory)
}

impl Config {
    fn node_names(&self) -> Vec<String> {
        if self.simulate_nodes == 0 {
            vec![self.node_name.clone()]
        } else {
            (0..self.simulate_nodes)
                .map(|i| format!("{}-{i:04}", self.node_name))
                .collect()
        }
    }

    fn node_object(&self, name: &str, runtime: &str, endpoint: &str) -> Node {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), name.into());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        let resources: BTreeMap<String, String> = [
            ("cpu".to_string(), format!("{}m", self.cpu_milli)),
            ("memory".to_string(), self.memory.to_string()),
            ("pods".to_string(), self.max_pods.to_string()),
        ]
        .into();
        let now = time::now();
        Node {
            metadata: Some(ObjectMeta {
                name: name.into(),
                labels,
                annotations: [(AGENT_ENDPOINT.to_string(), endpoint.to_string())].into(),
                ..Default::default()
            }),
            spec: Some(Default::default()),
            status: Some(NodeStatus {
                capacity: resources.clone(),
                allocatable: resources,
                conditions: vec![NodeCondition {
                    r#type: "Ready".into(),
                    status: "True".into(),
                    last_heartbeat_time: now.clone(),
                    last_transition_time: now,
                    reason: "AgentReady".into(),
                    message: "flotilla agent is posting ready status".into(),
                }],
                addresses: vec![
                    NodeAddress {
                        r#type: "InternalIP".into(),
                        address: self.node_ip.clone(),
                    },
                    NodeAddress {
                        r#type: "Hostname".into(),
                        address: name.into(),
                    },
                ],
                node_info: Some(NodeSystemInfo {
                    kubelet_version: format!("flotilla-{}", env!("CARGO_PKG_VERSION")),
                    container_runtime_version: format!("{runtime}://"),
                    operating_system: std::env::consts::OS.into(),
                    architecture: std::env::consts::ARCH.into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}

/// Creates the node, or brings an existing one's status and labels up to date.
async fn register(client: &Client, node: Node) -> Result<(), ClientError> {
    match client.create(&node).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_already_exists() => {
            for _ in 0..5 {
                let mut current = client.get::<Node>("", node.name()).await?;
                let meta = current.metadata.get_or_insert_default();
                let wanted = node.metadata.clone().unwrap_or_default();
                meta.labels.extend(wanted.labels);
                meta.annotations.extend(wanted.annotations);
                let current = client.update(&current).await?;
                let mut with_status = current.clone();
                with_status.status = node.status.clone();
                match client.update_status(&with_status).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn renew(client: &Client, name: &str, interval: Duration) -> Result<(), ClientError> {
    let patch = serde_json::json!({"spec": {"renewTime": time::now()}});
    match client.patch::<Lease>(LEASE_NAMESPACE, name, &patch).await {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let lease = Lease {
                metadata: Some(ObjectMeta {
                    name: name.into(),
                    namespace: LEASE_NAMESPACE.into(),
                    ..Default::default()
                }),
                spec: Some(LeaseSpec {
                    holder_identity: name.into(),
                    lease_duration_seconds: Some((interval.as_secs() as i32 * 4).max(1)),
                    acquire_time: time::now(),
                    renew_time: time::now(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match client.create(&lease).await {
                Ok(_) => Ok(()),
                Err(e) if e.is_already_exists() => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Runs the agent with `rt` until `stop` turns true.
pub async fn run<R: Runtime>(
    config: Config,
    rt: Arc<R>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AgentError> {
    let client = Client::with_dialer(&config.servers, &config.dialer).map_err(AgentError::Setup)?;
    // The lease namespace, which the control plane makes once it has a leader.
    let mut waited = 0;
    loop {
        match client.get::<Namespace>("", LEASE_NAMESPACE).await {
            Ok(_) => break,
            Err(e) if waited < 60 => {
                if waited % 5 == 0 {
                    eprintln!("flotilla agent: waiting for the control plane ({e})");
                }
                waited += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
            Err(e) => return Err(AgentError::Unreachable(config.servers.join(","), e)),
        }
    }
    // The log service, whose address goes on the Node.
    let listener = tokio::net::TcpListener::bind(&config.logs_addr)
        .await
        .map_err(|e| {
            AgentError::Setup(format!(
                "cannot listen on --logs-addr {}: {e}",
                config.logs_addr
            ))
        })?;
    let bound = listener
        .local_addr()
        .map_err(|e| AgentError::Setup(e.to_string()))?;
    let endpoint = if bound.ip().is_unspecified() {
        format!("{}:{}", config.node_ip, bound.port())
    } else {
        bound.to_string()
    };
    // `https://` tells the API server to dial TLS; a plaintext agent publishes HOST:PORT.
    let endpoint = if config.tls.is_some() {
        format!("https://{endpoint}")
    } else {
        endpoint
    };
    let tls = config.tls.clone();
    let logs_server = {
        let service =
            flotilla_proto::flotilla_agent_v1::agent_server::AgentServer::new(logs::LogService {
                rt: rt.clone(),
                tls: config.tls.is_some(),
            });
        let routes = metrics::add_routes(
            tonic::service::Routes::new(service),
            rt.clone(),
            config.lease_interval,
        );
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                // HTTP/1.1 too, for /metrics, /healthz and /readyz; the guard keeps the
                // log service out of reach of web pages.
                .accept_http1(true)
                .layer(flotilla_proto::guard::layer(metrics::PLAIN_HTTP))
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    flotilla_transport::incoming(listener, tls, "agent"),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                )
                .await;
        })
    };
    let names = config.node_names();
    let sem = Arc::new(Semaphore::new(32));
    let mut regs = tokio::task::JoinSet::new();
    for name in &names {
        let (client, node, sem) = (
            client.clone(),
            config.node_object(name, rt.name(), &endpoint),
            sem.clone(),
        );
        let interval = config.lease_interval;
        let name = name.clone();
        regs.spawn(async move {
            let _permit = sem.acquire().await;
            register(&client, node).await?;
            let renewal = renew(&client, &name, interval).await;
            metrics::renewed(renewal.is_ok());
            renewal
        });
    }
    while let Some(r) = regs.join_next().await {
        r.map_err(|e| AgentError::Setup(e.to_string()))??;
    }
    eprintln!(
        "flotilla agent: node{} {} registered ({} runtime)",
        if names.len() > 1 { "s" } else { "" },
        if names.len() > 3 {
            format!("{}..{} ({})", names[0], names[names.len() - 1], names.len())
        } else {
            names.join(", ")
        },
        rt.name()
    );

    // Leases, renewed evenly over the interval.
    let renewer = {
        let (client, names, interval) = (client.clone(), names.clone(), config.lease_interval);
        tokio::spawn(async move {
            // Spread over the interval in batches, one batch per 100 ms (or per interval, if
            // shorter): one timer wake-up per batch, not per lease.
            let step = Duration::from_millis(100).min(interval);
            let batches = (interval.as_millis() / step.as_millis().max(1)).max(1) as usize;
            let per_batch = names.len().div_ceil(batches);
            let mut tick = tokio::time::interval(step);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for batch in names.chunks(per_batch.max(1)).cycle() {
                tick.tick().await;
                let renewals = batch.iter().map(|name| {
                    let client = client.clone();
                    async move {
                        let renewal = renew(&client, name, interval).await;
                        metrics::renewed(renewal.is_ok());
                        if let Err(e) = renewal {
                            tracing::debug!(node = name, "renewing the lease: {e}");
                        }
                    }
                });
                futures_join(renewals).await;
            }
        })
    };

    // Pods bound to our nodes.
    let ours: Arc<HashSet<String>> = Arc::new(names.iter().cloned().collect());
    let filter = if names.len() == 1 {
        Filter {
            field_selector: format!("spec.nodeName={}", names[0]),
            ..Default::default()
        }
    } else {
        Filter::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Change<Pod>>();
    let informer = {
        let ours = ours.clone();
        Informer::<Pod>::start(client.clone(), filter, move |c| {
            let node = match &c {
                Change::Added(p) | Change::Updated { new: p, .. } | Change::Deleted(p) => p
                    .spec
                    .as_ref()
                    .map(|s| s.node_name.clone())
                    .unwrap_or_default(),
            };
            if ours.contains(&node) {
                let _ = tx.send(c);
            }
        })
    };
    let mut records: HashMap<String, Vec<ContainerRecord>> = process::group_by_pod(rt.list().await);
    tokio::select! {
        _ = informer.wait_synced() => {}
        _ = stop.wait_for(|s| *s) => return Ok(()),
    }
    // Containers of pods that no longer exist: stopped and forgotten.
    let live: HashSet<String> = informer.with_cache(|c| {
        c.values()
            .filter_map(|p| p.metadata.as_ref().map(|m| m.uid.clone()))
            .collect()
    });
    for (uid, recs) in records.iter().filter(|(u, _)| !live.contains(*u)) {
        tracing::info!(
            pod_uid = uid,
            "stopping the containers of a pod that is gone"
        );
        for r in recs {
            rt.stop(&r.id, Duration::from_secs(2)).await;
            rt.remove(&r.id).await;
        }
    }
    records.retain(|u, _| live.contains(u));
    // Volumes of pods that went while the agent was down.
    if let Ok(dirs) = std::fs::read_dir(config.data_dir.join("pods")) {
        for d in dirs.flatten() {
            if !live.contains(d.file_name().to_string_lossy().as_ref()) {
                volumes::remove_pod_dir(&d.path());
            }
        }
    }

    let ip = config.node_ip.clone();
    let pods_dir = config.data_dir.join("pods");
    let mut workers: HashMap<String, mpsc::Sender<Msg>> = HashMap::new();
    loop {
        metrics::STATS
            .pods
            .store(workers.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let change = tokio::select! {
            c = rx.recv() => match c { Some(c) => c, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        match change {
            Change::Added(p) | Change::Updated { new: p, .. } => {
                let uid = p
                    .metadata
                    .as_ref()
                    .map(|m| m.uid.clone())
                    .unwrap_or_default();
                if let Some(w) = workers.get(&uid) {
                    if w.send(Msg::Update(Box::new(p.clone()))).await.is_ok() {
                        continue;
                    }
                    // The worker finished (the pod was deleted): nothing more to do.
                    workers.remove(&uid);
                    continue;
                }
                let node = NodeInfo {
                    name: p
                        .spec
                        .as_ref()
                        .map(|s| s.node_name.clone())
                        .unwrap_or_default(),
                    ip: ip.clone(),
                    pods_dir: pods_dir.clone(),
                };
                let (wtx, wrx) = mpsc::channel(16);
                let worker = Worker::new(
                    rt.clone(),
                    client.clone(),
                    node,
                    p,
                    records.remove(&uid).unwrap_or_default(),
                );
                tokio::spawn(worker.run(wrx));
                workers.insert(uid, wtx);
            }
            Change::Deleted(p) => {
                let uid = p
                    .metadata
                    .as_ref()
                    .map(|m| m.uid.clone())
                    .unwrap_or_default();
                if let Some(w) = workers.remove(&uid) {
                    let _ = w.send(Msg::Gone).await;
                }
            }
        }
    }
    renewer.abort();
    logs_server.abort();
    drop(informer);
    if config.stop_containers_on_exit {
        let running: Vec<ContainerRecord> = rt
            .list()
            .await
            .into_iter()
            .filter(|r| matches!(r.state, runtime::ContainerState::Running { .. }))
            .collect();
        eprintln!("flotilla agent: stopping {} container(s)", running.len());
        let mut stops = tokio::task::JoinSet::new();
        for r in running {
            let rt = rt.clone();
            stops.spawn(async move { rt.stop(&r.id, Duration::from_secs(10)).await });
        }
        while stops.join_next().await.is_some() {}
        rt.stopped_all().await;
    } else {
        eprintln!(
            "flotilla agent: stopped; the containers keep running (a restarted agent adopts them)"
        );
    }
    Ok(())
}
