//! `flotilla agent`: a worker node.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use flotilla_node_agent::docker::DockerRuntime;
use flotilla_node_agent::process::ProcessRuntime;
use flotilla_node_agent::runtime::FakeRuntime;
use flotilla_node_agent::{Config, machine_capacity};
use flotilla_proto::api::quantity::{parse_bytes, parse_cpu_millis};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RuntimeKind {
    /// Each container is a child process (`command` + `args`).
    Process,
    /// Each container is a Docker container (images must be on the node); a pod's
    /// containers share one network namespace.
    Docker,
    /// Pods go Running at once and stay so until deleted; nothing runs.
    Fake,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Control-plane client addresses (any of them; the agent fails over) [default: the
    /// kubeconfig's servers, else 127.0.0.1:7379,127.0.0.1:7381,127.0.0.1:7383].
    #[arg(long, env = "FLOTILLA_SERVER")]
    pub servers: Option<String>,
    /// The kubeconfig with the servers, the cluster's CA and the node's certificate
    /// (`flotilla certs issue --kind agent`, then `certs kubeconfig`) [default: the first file
    /// of $KUBECONFIG, else ./flotilla-data/admin.kubeconfig when it exists].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name [default: the host name].
    #[arg(long, env = "FLOTILLA_NODE_NAME")]
    pub node_name: Option<String>,
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: RuntimeKind,
    /// Where the agent keeps its containers' state and logs.
    #[arg(
        long,
        env = "FLOTILLA_AGENT_DATA_DIR",
        default_value = "./flotilla-agent"
    )]
    pub data_dir: PathBuf,
    /// How often the node's Lease is renewed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub lease_interval: Duration,
    /// Labels of the node: KEY=VALUE,...
    #[arg(long, default_value = "")]
    pub labels: String,
    /// The node's address, and its pods' with the process runtime (which shares the host's
    /// network; the docker runtime gives each pod its own) [default: the local address this
    /// machine reaches the first of --servers from].
    #[arg(long)]
    pub node_ip: Option<String>,
    /// With --runtime docker: the Docker network pods join [default: the engine's default
    /// bridge].
    #[arg(long)]
    pub docker_network: Option<String>,
    /// cpu the node offers, as a quantity (`4`, `3500m`) [default: the machine's cores].
    #[arg(long)]
    pub cpu: Option<String>,
    /// memory the node offers (`8Gi`) [default: the machine's memory].
    #[arg(long)]
    pub memory: Option<String>,
    #[arg(long, default_value_t = 110)]
    pub max_pods: i64,
    /// Register and keep this many nodes (NAME-0000, …) from this one process; needs
    /// --runtime fake.
    #[arg(long, default_value_t = 0)]
    pub simulate_nodes: usize,
    /// Where to serve container logs to the control plane [default: NODE-IP:0, any free
    /// port; the address is published on the Node].
    #[arg(long)]
    pub logs_addr: Option<String>,
    /// On SIGTERM or Ctrl-C, stop the containers too (by default they keep running and a
    /// restarted agent adopts them).
    #[arg(long)]
    pub stop_containers_on_exit: bool,
}

fn parse_labels(s: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            bail!("--labels: {part:?} is not KEY=VALUE");
        };
        flotilla_proto::api::selector::validate_label_key(k)
            .map_err(|e| anyhow::anyhow!("--labels: key {k:?}: {e}"))?;
        flotilla_proto::api::selector::validate_label_value(v)
            .map_err(|e| anyhow::anyhow!("--labels: value {v:?}: {e}"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    Ok(labels)
}

/// The local address the machine sends from towards the first server (a UDP socket's
/// `connect` picks the route; nothing is sent).
fn local_address_towards(servers: &[String]) -> Option<String> {
    use std::net::ToSocketAddrs;
    let first = servers.first()?;
    let first = first.split_once("://").map_or(first.as_str(), |(_, a)| a);
    let target = first.to_socket_addrs().ok()?.next()?;
    let any: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip().to_string())
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.simulate_nodes > 0 && args.runtime != RuntimeKind::Fake {
        bail!("--simulate-nodes needs --runtime fake");
    }
    let (machine_cpu, machine_memory) = machine_capacity();
    let cpu_milli = match &args.cpu {
        Some(q) => parse_cpu_millis(q).map_err(|e| anyhow::anyhow!("--cpu: {e}"))?,
        None => machine_cpu,
    };
    let memory = match &args.memory {
        Some(q) => parse_bytes(q).map_err(|e| anyhow::anyhow!("--memory: {e}"))?,
        None => machine_memory,
    };
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_lowercase())
            .unwrap_or_else(|_| "node".into()),
    };
    flotilla_proto::api::selector::validate_dns1123_subdomain(&node_name)
        .map_err(|e| anyhow::anyhow!("--node-name {node_name:?}: {e}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating --data-dir {}", args.data_dir.display()))?;
    let server = crate::verbs::ServerArg {
        server: args.servers.clone(),
        kubeconfig: args.kubeconfig.clone(),
    };
    let (servers, dialer) = server.target()?;
    // With a kubeconfig holding the node's certificate, the agent's own port serves TLS
    // with it, to clients with a certificate from the same CA.
    let tls = match server.kubeconfig()? {
        Some(flotilla_client::kubeconfig::Target {
            ca_pem: Some(ca),
            identity: Some((cert, key)),
            ..
        }) => Some({
            // The agent acts as, and serves its port as, its node: nobody else's identity.
            let who = flotilla_transport::Peer::from_pem(&cert)?;
            let node_user = format!("system:node:{node_name}");
            if who.user != node_user || !who.server_auth {
                bail!(
                    "the kubeconfig's certificate is user {:?}, not {node_user}: give the agent \
                     its node's kubeconfig (flotilla certs issue --kind agent --name {node_name}, \
                     then flotilla certs kubeconfig --user {node_name}; docs/security.md)",
                    who.user
                );
            }
            flotilla_transport::ServerTls::new(
                &cert,
                &key,
                Some(&ca),
                flotilla_transport::ClientAuth::Required,
            )
            .context("serving the agent's port with the kubeconfig's certificate")?
        }),
        _ => None,
    };
    let node_ip = match &args.node_ip {
        Some(ip) => ip
            .parse::<std::net::IpAddr>()
            .map_err(|e| anyhow::anyhow!("--node-ip {ip:?}: {e}"))?
            .to_string(),
        None => local_address_towards(&servers).unwrap_or_else(|| "127.0.0.1".into()),
    };
    if args.docker_network.is_some() && args.runtime != RuntimeKind::Docker {
        bail!("--docker-network needs --runtime docker");
    }
    let config = Config {
        servers,
        dialer,
        tls,
        node_name: node_name.clone(),
        node_ip: node_ip.clone(),
        labels: parse_labels(&args.labels)?,
        data_dir: args.data_dir.clone(),
        lease_interval: args.lease_interval,
        cpu_milli,
        memory,
        max_pods: args.max_pods,
        simulate_nodes: args.simulate_nodes,
        logs_addr: args
            .logs_addr
            .clone()
            .unwrap_or_else(|| format!("{node_ip}:0")),
        stop_containers_on_exit: args.stop_containers_on_exit,
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::server::wait_for_signal().await.ok();
        eprintln!(
            "flotilla agent: stopping (the containers keep running; a restarted agent adopts them)"
        );
        let _ = stop_tx.send(true);
    });
    match args.runtime {
        RuntimeKind::Process => {
            let exe =
                std::env::current_exe().context("finding the flotilla binary for the shim")?;
            let rt = ProcessRuntime::new(&args.data_dir, exe, &node_name)
                .with_context(|| format!("preparing {}", args.data_dir.display()))?;
            flotilla_node_agent::run(config, Arc::new(rt), stop).await?;
        }
        RuntimeKind::Docker => {
            let exe = std::env::current_exe()
                .context("finding the flotilla binary for the pod sandbox image")?;
            let rt = DockerRuntime::new(
                &args.data_dir,
                &node_name,
                &exe,
                args.docker_network.clone(),
            )
            .await
            .context("the docker runtime")?;
            flotilla_node_agent::run(config, Arc::new(rt), stop).await?;
        }
        RuntimeKind::Fake => {
            flotilla_node_agent::run(config, Arc::new(FakeRuntime::new()), stop).await?;
        }
    }
    Ok(())
}
