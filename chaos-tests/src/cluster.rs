//! The process harness: a cluster of real `flotilla server` processes on loopback, each with
//! its own ports and data dir, every peer link behind a fault-injecting [`proxy`].

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_proto::etcdserverpb::cluster_client::ClusterClient;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{
    MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest, StatusRequest,
};
use flotilla_transport::Dialer;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::docker::{self, DockerEnv};
use crate::proxy::{self, NetState};

/// How a cluster is started.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    pub nodes: usize,
    /// The `flotilla` binary.
    pub binary: PathBuf,
    /// Holds data dirs and logs.
    pub dir: PathBuf,
    /// `FLOTILLA_TEST_FAULT` for every member (a deliberately broken build).
    pub test_fault: Option<String>,
    pub seed: u64,
    /// Worker nodes: `flotilla agent` processes with the fake runtime.
    pub workers: usize,
    /// Containers on private Docker networks instead of processes on loopback.
    pub docker: bool,
    /// TLS on every port with client certificates required, as `flotilla up` runs (the
    /// process harness only): the PKI made by `flotilla certs`, the harness's clients
    /// `system:masters`, each agent its node's identity.
    pub tls: bool,
}

/// cpu each worker offers, in millicores.
pub const WORKER_CPU_MILLIS: i64 = 1000;
/// Pods each worker takes at most.
pub const WORKER_MAX_PODS: i64 = 8;
/// How long the control plane waits for a silent worker before it marks it unreachable, and
/// then before it evicts its pods (shortened from the defaults so runs see it happen).
pub const NODE_MONITOR_GRACE: Duration = Duration::from_secs(3);
pub const EVICTION_TOLERATION: Duration = Duration::from_secs(2);

/// One worker: a node agent process.
pub struct Worker {
    pub name: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    running: bool,
    /// Its container exists (Docker harness).
    created: bool,
}

impl Worker {
    pub fn is_running(&self) -> bool {
        self.running
    }
}

/// One member process.
pub struct Member {
    pub name: String,
    pub client_addr: SocketAddr,
    /// The address other members reach it at: its proxy (process harness) or its alias on
    /// the peer network (Docker harness).
    pub peer_addr: String,
    /// Where the process itself listens for peers.
    pub listen_peer_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    running: bool,
    /// Its container exists (Docker harness).
    created: bool,
    /// Cut off the peer network (Docker harness).
    disconnected: bool,
    paused: bool,
    /// Started after a replacement: joins the existing cluster.
    joining: bool,
    channel: Channel,
}

impl Member {
    pub fn is_running(&self) -> bool {
        self.running
    }
    pub fn is_paused(&self) -> bool {
        self.paused
    }
    /// A gRPC channel to the member's client port (connects lazily, reconnects by itself).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }
}

pub struct Cluster {
    pub spec: ClusterSpec,
    pub members: Vec<Member>,
    pub workers: Vec<Worker>,
    docker: Option<DockerEnv>,
    net: watch::Sender<NetState>,
    proxies: Vec<tokio::task::JoinHandle<()>>,
    /// The PKI's folder, with TLS on.
    pki: Option<PathBuf>,
    /// How the harness's clients dial the members (as `system:masters` with TLS on).
    dialer: Dialer,
}

/// A free port on loopback for a member or agent to bind later, across its restarts.
///
/// Drawn below the kernel's ephemeral range: a port the OS hands out for an outgoing
/// connection could otherwise take it while its member is down. Never the same one twice
/// in this process.
fn free_port() -> anyhow::Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(12_000);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let port = rand::random_range(10_000..high);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    bail!("no free port below the ephemeral range (from {ephemeral_low})")
}

pub fn channel_to(addr: SocketAddr, dialer: &Dialer) -> Channel {
    dialer
        .endpoint(&addr.to_string())
        .expect("a socket address is a valid address")
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy()
}

impl Cluster {
    /// Starts every member and waits until the cluster has a leader.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Self> {
        let (net, net_rx) = watch::channel(NetState::default());
        let mut members = Vec::new();
        let mut proxies = Vec::new();
        std::fs::create_dir_all(spec.dir.join("logs"))?;
        let docker = if spec.docker {
            let prefix = format!("fchaos-{}-{}", std::process::id(), spec.seed);
            Some(DockerEnv::create(&spec.binary, &spec.dir, &prefix).await?)
        } else {
            None
        };
        if spec.tls && spec.docker {
            bail!("TLS runs use the process harness");
        }
        let pki = spec.tls.then(|| spec.dir.join("pki"));
        let dialer = match &pki {
            Some(dir) => make_pki(&spec, dir).await?,
            None => Dialer::plain(),
        };
        for i in 0..spec.nodes {
            let name = format!("n{}", i + 1);
            let client_addr = free_port()?;
            let (peer_addr, listen_peer_addr) = if docker.is_some() {
                (
                    format!("{name}:{}", docker::PEER_PORT),
                    SocketAddr::from(([0, 0, 0, 0], docker::PEER_PORT)),
                )
            } else {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let peer_addr = listener.local_addr()?;
                let listen_peer_addr = free_port()?;
                proxies.push(proxy::spawn(
                    i,
                    listener,
                    listen_peer_addr,
                    net_rx.clone(),
                    spec.seed.wrapping_add(i as u64),
                ));
                (peer_addr.to_string(), listen_peer_addr)
            };
            members.push(Member {
                data_dir: spec.dir.join(format!("{name}.data")),
                log: spec.dir.join("logs").join(format!("{name}.log")),
                name,
                client_addr,
                peer_addr,
                listen_peer_addr,
                child: None,
                running: false,
                created: false,
                disconnected: false,
                paused: false,
                joining: false,
                channel: channel_to(client_addr, &dialer),
            });
        }
        let workers = (0..spec.workers)
            .map(|i| {
                let name = format!("w{}", i + 1);
                Worker {
                    data_dir: spec.dir.join(format!("{name}.data")),
                    log: spec.dir.join("logs").join(format!("{name}.log")),
                    name,
                    child: None,
                    running: false,
                    created: false,
                }
            })
            .collect();
        let mut cluster = Cluster {
            spec,
            members,
            workers,
            docker,
            net,
            proxies,
            pki,
            dialer,
        };
        for i in 0..cluster.members.len() {
            cluster.start_member(i).await?;
        }
        cluster
            .wait_for_leader(Duration::from_secs(30))
            .await
            .context("the cluster did not elect a leader")?;
        for i in 0..cluster.workers.len() {
            cluster.start_worker(i).await?;
        }
        Ok(cluster)
    }

    /// How the harness's clients dial the members.
    pub fn dialer(&self) -> &Dialer {
        &self.dialer
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server flags every member gets, whichever the harness.
    fn server_args(&self, i: usize) -> Vec<String> {
        let m = &self.members[i];
        let mut args: Vec<String> = vec![
            "server".into(),
            "--name".into(),
            m.name.clone(),
            "--peer-addr".into(),
            m.peer_addr.clone(),
            "--listen-peer-addr".into(),
            m.listen_peer_addr.to_string(),
            "--initial-cluster".into(),
            self.initial_cluster(),
            "--initial-cluster-state".into(),
            if m.joining { "existing" } else { "new" }.into(),
            // Every revision stays, so watches can be checked against the whole history.
            "--auto-compaction-retention".into(),
            "0".into(),
            // Snapshots and log purges happen during the run, and slow followers get them.
            "--snapshot-count".into(),
            "2000".into(),
            "--node-monitor-grace".into(),
            format!("{}s", NODE_MONITOR_GRACE.as_secs()),
            "--default-toleration".into(),
            format!("{}s", EVICTION_TOLERATION.as_secs()),
        ];
        if let Some(pki) = &self.pki {
            let f = |s: String| pki.join(s).to_string_lossy().into_owned();
            let (cert, key, ca) = (
                f(format!("{}.crt", m.name)),
                f(format!("{}.key", m.name)),
                f("ca.crt".into()),
            );
            args.extend([
                "--cert-file".into(),
                cert.clone(),
                "--key-file".into(),
                key.clone(),
                "--trusted-ca-file".into(),
                ca.clone(),
                "--client-cert-auth".into(),
                "--peer-cert-file".into(),
                cert,
                "--peer-key-file".into(),
                key,
                "--peer-trusted-ca-file".into(),
                ca,
            ]);
        }
        if self.docker.is_some() {
            args.extend([
                "--data-dir".into(),
                docker::data_dir().to_string_lossy().into_owned(),
                "--client-addr".into(),
                format!("0.0.0.0:{}", docker::CLIENT_PORT),
            ]);
        } else {
            args.extend([
                "--data-dir".into(),
                m.data_dir.to_string_lossy().into_owned(),
                "--client-addr".into(),
                m.client_addr.to_string(),
                "--peer-source-ip".into(),
                proxy::source_ip(i).to_string(),
            ]);
        }
        args
    }

    fn node_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "RUST_LOG".to_string(),
                std::env::var("CHAOS_NODE_LOG").unwrap_or("info".into()),
            ),
            ("NO_COLOR".to_string(), "1".to_string()),
        ];
        if let Some(fault) = &self.spec.test_fault {
            env.push(("FLOTILLA_TEST_FAULT".into(), fault.clone()));
        }
        env
    }

    /// Starts (or restarts) member `i`.
    pub async fn start_member(&mut self, i: usize) -> anyhow::Result<()> {
        if self.members[i].running {
            bail!("{} is already running", self.members[i].name);
        }
        let args = self.server_args(i);
        let env = self.node_env();
        if let Some(d) = &mut self.docker {
            let m = &mut self.members[i];
            if m.created {
                d.start(&m.name).await?;
            } else {
                let alias = m.name.clone();
                d.run(
                    &m.name,
                    &args,
                    Some(m.client_addr.port()),
                    Some(&alias),
                    &env,
                )
                .await?;
                m.created = true;
            }
            m.running = true;
            m.paused = false;
            return Ok(());
        }
        let m = &mut self.members[i];
        m.child = Some(spawn_logged(&self.spec.binary, &args, env, &m.log)?);
        m.running = true;
        m.paused = false;
        Ok(())
    }

    /// Every member's client address, as the agents and API clients take them.
    pub fn client_addrs(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.client_addr.to_string())
            .collect()
    }

    /// Starts (or restarts) worker `i`'s agent.
    pub async fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        if self.workers[i].running {
            bail!("{} is already running", self.workers[i].name);
        }
        let servers = match &self.docker {
            Some(d) => self
                .members
                .iter()
                .map(|m| format!("{}:{}", d.container(&m.name), docker::CLIENT_PORT))
                .collect::<Vec<_>>()
                .join(","),
            None => self.client_addrs().join(","),
        };
        let w = &self.workers[i];
        let data_dir = match &self.docker {
            Some(_) => PathBuf::from("/agent"),
            None => w.data_dir.clone(),
        };
        let mut args: Vec<String> = vec![
            "agent".into(),
            "--servers".into(),
            servers,
            "--node-name".into(),
            w.name.clone(),
            "--runtime".into(),
            "fake".into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
            "--lease-interval".into(),
            "1s".into(),
            "--cpu".into(),
            format!("{WORKER_CPU_MILLIS}m"),
            "--memory".into(),
            "4Gi".into(),
            "--max-pods".into(),
            WORKER_MAX_PODS.to_string(),
        ];
        if let Some(pki) = &self.pki {
            // The node's own identity: the Node authorizer holds it to its node.
            let kubeconfig = pki.join(format!("{}.kubeconfig", w.name));
            args.extend([
                "--kubeconfig".into(),
                kubeconfig.to_string_lossy().into_owned(),
            ]);
        }
        let env = self.node_env();
        if let Some(d) = &mut self.docker {
            let w = &mut self.workers[i];
            if w.created {
                d.start(&w.name).await?;
            } else {
                d.run(&w.name, &args, None, None, &env).await?;
                w.created = true;
            }
            w.running = true;
            return Ok(());
        }
        let w = &mut self.workers[i];
        w.child = Some(spawn_logged(&self.spec.binary, &args, env, &w.log)?);
        w.running = true;
        Ok(())
    }

    /// `kill -9` of worker `i`'s agent.
    pub async fn kill_worker(&mut self, i: usize) {
        let w = &mut self.workers[i];
        if let Some(d) = &self.docker {
            if w.running {
                let _ = d.kill(&w.name).await;
            }
        } else if let Some(mut child) = w.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        w.running = false;
    }

    /// `kill -9`.
    pub async fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(d) = &self.docker {
            if m.running {
                if m.paused {
                    let _ = d.unpause(&m.name).await;
                }
                let _ = d.kill(&m.name).await;
            }
        } else if let Some(mut child) = m.child.take() {
            if m.paused {
                signal(&child, libc::SIGCONT);
            }
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        m.running = false;
        m.paused = false;
    }

    /// SIGSTOP (`docker pause` in containers): the process stays, frozen, with its
    /// connections open.
    pub async fn pause(&mut self, i: usize) {
        let m = &mut self.members[i];
        if !m.running || m.paused {
            return;
        }
        match (&self.docker, &m.child) {
            (Some(d), _) => {
                if let Err(e) = d.pause(&m.name).await {
                    tracing::warn!("{e:#}");
                    return;
                }
            }
            (None, Some(child)) => signal(child, libc::SIGSTOP),
            (None, None) => return,
        }
        m.paused = true;
    }

    pub async fn resume(&mut self, i: usize) {
        let m = &mut self.members[i];
        if !m.paused {
            return;
        }
        match (&self.docker, &m.child) {
            (Some(d), _) => {
                if let Err(e) = d.unpause(&m.name).await {
                    tracing::warn!("{e:#}");
                }
            }
            (None, Some(child)) => signal(child, libc::SIGCONT),
            (None, None) => {}
        }
        m.paused = false;
    }

    /// Changes the network between members. The proxies apply any change; in containers a
    /// member cut off (both ways) from more than half of the others leaves the peer network,
    /// and nothing finer is possible (see [`FaultKind::in_docker`]).
    ///
    /// [`FaultKind::in_docker`]: crate::nemesis::FaultKind::in_docker
    pub async fn set_net(&mut self, f: impl FnOnce(&mut NetState)) {
        self.net.send_modify(f);
        self.apply_docker_net().await;
    }

    pub async fn heal_net(&mut self) {
        self.net.send_replace(NetState::default());
        self.apply_docker_net().await;
    }

    async fn apply_docker_net(&mut self) {
        let Some(d) = &self.docker else { return };
        let state = self.net.borrow().clone();
        let n = self.members.len();
        for i in 0..n {
            let cut_from = (0..n)
                .filter(|&j| j != i && !state.allows(i, j) && !state.allows(j, i))
                .count();
            let isolate = n > 1 && cut_from * 2 > n - 1;
            let m = &mut self.members[i];
            if isolate && !m.disconnected {
                match d.disconnect(&m.name).await {
                    Ok(()) => m.disconnected = true,
                    Err(e) => tracing::warn!("{e:#}"),
                }
            } else if !isolate && m.disconnected {
                match d.connect(&m.name, &m.name).await {
                    Ok(()) => m.disconnected = false,
                    Err(e) => tracing::warn!("{e:#}"),
                }
            }
        }
    }

    pub fn net(&self) -> NetState {
        self.net.borrow().clone()
    }

    /// Members and agents whose process died on its own (a crash, not a kill by the
    /// nemesis).
    pub async fn crashed(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let docker = self.docker.as_ref();
        for m in &mut self.members {
            if exited(docker, &m.name, &mut m.running, &mut m.child).await {
                out.push(format!("{} exited by itself", m.name));
            }
        }
        for w in &mut self.workers {
            if exited(docker, &w.name, &mut w.running, &mut w.child).await {
                out.push(format!("agent {} exited by itself", w.name));
            }
        }
        out
    }

    /// Asks every running member for its status; returns (member index, member id, leader
    /// id, term) for those that answered within `within`.
    async fn statuses(&self, within: Duration) -> Vec<(usize, u64, u64, u64)> {
        let asks = self
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_running() && !m.paused)
            .map(|(i, m)| {
                let mut client = MaintenanceClient::new(m.channel());
                async move {
                    let r = tokio::time::timeout(within, client.status(StatusRequest {})).await;
                    match r {
                        Ok(Ok(s)) => {
                            let s = s.into_inner();
                            let id = s.header.map_or(0, |h| h.member_id);
                            Some((i, id, s.leader, s.raft_term))
                        }
                        _ => None,
                    }
                }
            });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The member the cluster currently follows: the leader named in the highest term by a
    /// member that answers, if that leader is one of ours and answers too.
    pub async fn leader(&self) -> Option<usize> {
        let statuses = self.statuses(Duration::from_millis(500)).await;
        let (_, _, leader, _) = statuses.iter().filter(|s| s.2 != 0).max_by_key(|s| s.3)?;
        statuses.iter().find(|s| s.1 == *leader).map(|s| s.0)
    }

    pub async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!("no leader within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The cluster's revision now, by a linearizable read on any member that answers.
    pub async fn revision(&self) -> Option<i64> {
        for m in self.members.iter().filter(|m| m.is_running() && !m.paused) {
            let mut kv = KvClient::new(m.channel());
            let req = flotilla_proto::etcdserverpb::RangeRequest {
                key: b"chaos/".to_vec(),
                count_only: true,
                ..Default::default()
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), kv.range(req)).await {
                return r.into_inner().header.map(|h| h.revision);
            }
        }
        None
    }

    /// [`Cluster::revision`], retried until some member answers or `within` passes.
    pub async fn revision_within(&self, within: Duration) -> anyhow::Result<i64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(r) = self.revision().await {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                bail!("no member answered a read within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every running member answers a linearizable read.
    pub async fn wait_all_serving(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        for m in self.members.iter().filter(|m| m.is_running()) {
            loop {
                let mut kv = KvClient::new(m.channel());
                let req = flotilla_proto::etcdserverpb::RangeRequest {
                    key: b"chaos/".to_vec(),
                    count_only: true,
                    ..Default::default()
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), kv.range(req)).await
                {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("{} does not serve reads after {within:?}", m.name);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Overloads the machine for `hold`: a busy thread on every core, and a storm of writes
    /// from 64 clients spread over the members. Counts the elections started meanwhile (the
    /// rise of the highest term), then checks liveness: once the overload stops, a write must
    /// commit within `bound`. Returns what happened; an error is a finding.
    pub async fn overload(&self, hold: Duration, bound: Duration) -> anyhow::Result<String> {
        let term = |s: &[(usize, u64, u64, u64)]| s.iter().map(|s| s.3).max().unwrap_or(0);
        let before = term(&self.statuses(Duration::from_secs(1)).await);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hogs: Vec<_> = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        let running: Vec<Channel> = self
            .members
            .iter()
            .filter(|m| m.is_running() && !m.paused)
            .map(|m| m.channel())
            .collect();
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let storm: Vec<_> = (0..64)
            .map(|w| {
                let (stop, writes) = (stop.clone(), writes.clone());
                let mut kv = KvClient::new(running[w % running.len().max(1)].clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let put = flotilla_proto::etcdserverpb::PutRequest {
                            key: format!("chaos/overload/{w}/{}", n % 100).into_bytes(),
                            value: vec![b'x'; 256],
                            ..Default::default()
                        };
                        n += 1;
                        if let Ok(Ok(_)) =
                            tokio::time::timeout(Duration::from_secs(2), kv.put(put)).await
                        {
                            writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(hold).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for h in hogs {
            let _ = h.join();
        }
        for t in storm {
            let _ = t.await;
        }
        let stopped = Instant::now();
        let during = term(&self.statuses(Duration::from_secs(2)).await);
        // Liveness: a write commits within the bound.
        let back = loop {
            let mut done = false;
            for ch in &running {
                let mut kv = KvClient::new(ch.clone());
                let put = flotilla_proto::etcdserverpb::PutRequest {
                    key: b"chaos/overload/after".to_vec(),
                    value: b"x".to_vec(),
                    ..Default::default()
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), kv.put(put)).await {
                    done = true;
                    break;
                }
            }
            if done {
                break stopped.elapsed();
            }
            if stopped.elapsed() >= bound {
                bail!(
                    "no write committed within {bound:?} after the overload stopped (term {before} -> {during})"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(format!(
            "overload over: {} storm writes in {hold:?}; {} election(s) started (term {before} -> {during}); writes committed again {} ms after it stopped",
            writes.load(std::sync::atomic::Ordering::Relaxed),
            during.saturating_sub(before),
            back.as_millis()
        ))
    }

    /// Damages member `i`'s key space on disk between a kill and a restart, as a disk that
    /// changed a stored value would, and checks that the member refuses to serve: it must
    /// exit once it started (its corruption check finds its key space differs from the
    /// others'). Returns what happened; an error is a finding. A marker value written through
    /// the cluster is what is changed; when it had not reached the member's disk by the kill,
    /// nothing is damaged and the member just restarts.
    pub async fn corrupt(
        &mut self,
        i: usize,
        seed: u64,
        within: Duration,
    ) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        let key = format!("chaos/corrupt/{seed:016x}");
        let value = format!("intact-{seed:016x}");
        let damaged = format!("broken-{seed:016x}");
        // Written through any member that takes it, retried across leader changes.
        'write: loop {
            for m in self.members.iter().filter(|m| m.is_running() && !m.paused) {
                let mut kv = KvClient::new(m.channel());
                let put = flotilla_proto::etcdserverpb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: value.clone().into_bytes(),
                    ..Default::default()
                };
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(3), kv.put(put)).await {
                    break 'write;
                }
            }
            if Instant::now() >= deadline {
                bail!("no member took the marker write");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Until the member has applied it, and its key space has been flushed (sled writes
        // every 500 ms).
        let mut kv = KvClient::new(self.members[i].channel());
        loop {
            let req = flotilla_proto::etcdserverpb::RangeRequest {
                key: key.clone().into_bytes(),
                serializable: true,
                ..Default::default()
            };
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), kv.range(req)).await
                && !r.into_inner().kvs.is_empty()
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{} never applied the marker", self.members[i].name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        self.kill(i).await;
        let changed = tamper(
            &self.members[i].data_dir,
            value.as_bytes(),
            damaged.as_bytes(),
        )?;
        self.start_member(i).await?;
        if changed == 0 {
            return Ok(format!(
                "{}: the marker had not reached its disk; nothing damaged, restarted",
                self.members[i].name
            ));
        }
        let m = &mut self.members[i];
        loop {
            if exited(self.docker.as_ref(), &m.name, &mut m.running, &mut m.child).await {
                let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                if !log.contains("initial corruption check failed") {
                    bail!(
                        "{} exited after its key space was damaged, but not because its corruption check failed",
                        m.name
                    );
                }
                return Ok(format!(
                    "{}: damaged ({changed} stored value(s) changed), refused to serve: its corruption check failed and it stopped",
                    m.name
                ));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still runs {within:?} after it restarted with a damaged key space",
                    m.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Replaces member `i`: kills it, wipes its data dir, removes it from the cluster, adds a
    /// new member at the same peer address as a learner, starts it empty, and promotes it once
    /// it has caught up.
    pub async fn replace(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        self.kill(i).await;
        let m = &mut self.members[i];
        if let Some(d) = &mut self.docker {
            // A new container: its data dir starts empty.
            d.save_logs(&m.name, &m.log).await;
            d.remove(&m.name).await?;
            m.created = false;
            m.disconnected = false;
        } else if m.data_dir.exists() {
            std::fs::remove_dir_all(&m.data_dir)
                .with_context(|| format!("wiping {}", m.data_dir.display()))?;
        }
        let scheme = if self.pki.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", m.peer_addr);
        // Remove through any member that can: retried across leader changes.
        let old_id = self
            .retry(deadline, "listing members", |mut c| {
                let url = url.clone();
                async move { member_at(&mut c, &url).await }
            })
            .await?;
        if let Some(id) = old_id {
            self.retry(deadline, "removing the member", |mut c| async move {
                match c.member_remove(MemberRemoveRequest { id }).await {
                    Ok(_) => Ok(()),
                    // Removed by an earlier attempt whose answer was lost.
                    Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                    Err(s) => Err(s),
                }
            })
            .await?;
        }
        let new_id = self
            .retry(deadline, "adding the member", |mut c| {
                let url = url.clone();
                async move {
                    let r = c
                        .member_add(MemberAddRequest {
                            peer_ur_ls: vec![url.clone()],
                            is_learner: true,
                        })
                        .await;
                    match r {
                        Ok(r) => Ok(r.into_inner().member.map_or(0, |m| m.id)),
                        Err(s)
                            if s.code() == tonic::Code::AlreadyExists
                                || s.code() == tonic::Code::FailedPrecondition =>
                        {
                            // Added by an earlier attempt whose answer was lost.
                            Ok(member_at(&mut c, &url).await?.unwrap_or(0))
                        }
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
        self.members[i].joining = true;
        self.start_member(i).await?;
        self.retry(deadline, "promoting the new member", |mut c| async move {
            c.member_promote(MemberPromoteRequest { id: new_id })
                .await
                .map(|_| ())
        })
        .await?;
        Ok(())
    }

    /// Runs `op` against the members in turn until one succeeds or the deadline passes.
    async fn retry<T, F, Fut>(&self, deadline: Instant, what: &str, mut op: F) -> anyhow::Result<T>
    where
        F: FnMut(ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut last = String::new();
        loop {
            for m in self.members.iter().filter(|m| m.is_running() && !m.paused) {
                let client = ClusterClient::new(m.channel());
                match tokio::time::timeout(Duration::from_secs(3), op(client)).await {
                    Ok(Ok(v)) => return Ok(v),
                    Ok(Err(s)) => last = format!("{}: {}", m.name, s.message()),
                    Err(_) => last = format!("{}: timed out", m.name),
                }
            }
            if Instant::now() >= deadline {
                bail!("{what}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Heals everything: network, paused and stopped members and agents.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        self.heal_net().await;
        for i in 0..self.members.len() {
            self.resume(i).await;
            if !self.members[i].is_running() {
                self.start_member(i).await?;
            }
        }
        for i in 0..self.workers.len() {
            if !self.workers[i].is_running() {
                self.start_worker(i).await?;
            }
        }
        Ok(())
    }

    /// Stops everything; in containers, saves their output to the logs first.
    pub async fn stop(mut self) {
        self.heal_net().await;
        if let Some(mut d) = self.docker.take() {
            for m in &self.members {
                d.save_logs(&m.name, &m.log).await;
            }
            for w in &self.workers {
                d.save_logs(&w.name, &w.log).await;
            }
            d.destroy().await;
            return;
        }
        for i in 0..self.workers.len() {
            self.kill_worker(i).await;
        }
        for i in 0..self.members.len() {
            self.kill(i).await;
        }
        for p in self.proxies.drain(..) {
            p.abort();
        }
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }
}

/// The id of the member whose peer URL is `url`, if the cluster lists one.
async fn member_at(
    c: &mut ClusterClient<Channel>,
    url: &str,
) -> Result<Option<u64>, tonic::Status> {
    let list = c
        .member_list(MemberListRequest { linearizable: true })
        .await?;
    Ok(list
        .into_inner()
        .members
        .into_iter()
        .find(|m| m.peer_ur_ls.iter().any(|u| u == url))
        .map(|m| m.id))
}

/// Replaces `from` by `to` (of the same length) in every value of a stopped member's key
/// space tree; how many were changed.
fn tamper(data_dir: &std::path::Path, from: &[u8], to: &[u8]) -> anyhow::Result<usize> {
    let db = sled::open(data_dir.join("db"))
        .with_context(|| format!("opening {}", data_dir.display()))?;
    let tree = db.open_tree("kv")?;
    let mut changed = 0;
    for item in tree.iter() {
        let (k, v) = item?;
        if let Some(at) = v.windows(from.len()).position(|w| w == from) {
            let mut v = v.to_vec();
            v[at..at + from.len()].copy_from_slice(to);
            tree.insert(k, v)?;
            changed += 1;
        }
    }
    db.flush()?;
    Ok(changed)
}

/// Whether a process the harness believes running has exited; if so, it no longer is.
async fn exited(
    docker: Option<&DockerEnv>,
    name: &str,
    running: &mut bool,
    child: &mut Option<Child>,
) -> bool {
    let gone = match (docker, child.as_mut()) {
        (Some(d), _) => *running && d.running(name).await == Some(false),
        (None, Some(c)) => matches!(c.try_wait(), Ok(Some(_))),
        (None, None) => false,
    };
    if gone {
        *child = None;
        *running = false;
    }
    gone
}

/// Starts `binary ARGS` with its output appended to `log`; killed if the handle is dropped.
/// Makes the cluster's PKI in `dir` with the binary's own `flotilla certs`: the CA, one
/// member certificate per member, `admin` in `system:masters`, one node certificate and
/// kubeconfig per worker. Returns the administrator's dialer.
async fn make_pki(spec: &ClusterSpec, dir: &Path) -> anyhow::Result<Dialer> {
    let d = dir.to_string_lossy().into_owned();
    let certs = |args: Vec<String>| {
        let d = d.clone();
        async move {
            let out = Command::new(&spec.binary)
                .arg("certs")
                .args(&args)
                .args(["--dir", &d])
                .output()
                .await
                .context("running flotilla certs")?;
            if !out.status.success() {
                bail!(
                    "flotilla certs {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            anyhow::Ok(out.stdout)
        }
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    certs(strings(&["init"])).await?;
    for i in 0..spec.nodes {
        let name = format!("n{}", i + 1);
        certs(strings(&["issue", "--name", &name, "--kind", "member"])).await?;
    }
    certs(strings(&[
        "issue",
        "--name",
        "admin",
        "--kind",
        "user",
        "--group",
        "system:masters",
    ]))
    .await?;
    for i in 0..spec.workers {
        let name = format!("w{}", i + 1);
        certs(strings(&["issue", "--name", &name, "--kind", "agent"])).await?;
        // The agent's --servers gives the addresses; the kubeconfig its credentials.
        let kubeconfig = certs(strings(&[
            "kubeconfig",
            "--user",
            &name,
            "--server",
            "127.0.0.1:1",
        ]))
        .await?;
        std::fs::write(dir.join(format!("{name}.kubeconfig")), kubeconfig)?;
    }
    Dialer::from_files(
        &dir.join("ca.crt"),
        Some((&dir.join("admin.crt"), &dir.join("admin.key"))),
    )
    .context("the harness's TLS client")
}

fn spawn_logged(
    binary: &Path,
    args: &[String],
    env: Vec<(String, String)>,
    log: &Path,
) -> anyhow::Result<Child> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(binary)
        .args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {}", binary.display(), args.join(" ")))
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child we own; an exited child's pid is not reused before we
        // reap it, since tokio reaps only through `wait`.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}
