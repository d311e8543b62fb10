//! `flotilla server`: one control-plane member.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use flotilla_store::node::{ClusterState, StoreConfig, StoreNode, parse_initial_cluster};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InitialState {
    /// Found a new cluster with the members of --initial-cluster.
    New,
    /// Join a running cluster this member was added to (`flotilla cluster add`).
    Existing,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    /// This member's name, unique in the cluster.
    #[arg(long, env = "FLOTILLA_NAME", default_value = "default")]
    pub name: String,
    /// Where the member keeps its state [default: ./NAME.flotilla].
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address clients connect to (etcd v3 API and Flotilla's API).
    #[arg(long, env = "FLOTILLA_CLIENT_ADDR", default_value = "127.0.0.1:7379")]
    pub client_addr: String,
    /// Client address other members and `cluster status` give out for this member
    /// [default: --client-addr]. Set it when clients reach the member at another address
    /// (a published container port, NAT, a listen address of 0.0.0.0).
    #[arg(long, env = "FLOTILLA_ADVERTISE_CLIENT_ADDR")]
    pub advertise_client_addr: Option<String>,
    /// Address other members connect to.
    #[arg(long, env = "FLOTILLA_PEER_ADDR", default_value = "127.0.0.1:7380")]
    pub peer_addr: String,
    /// Address to listen on for other members [default: --peer-addr]. Differs from --peer-addr
    /// when members reach this one through NAT, a port mapping or a proxy.
    #[arg(long, env = "FLOTILLA_LISTEN_PEER_ADDR")]
    pub listen_peer_addr: Option<String>,
    /// Source IP of this member's connections to other members [default: chosen by the OS].
    #[arg(long, env = "FLOTILLA_PEER_SOURCE_IP")]
    pub peer_source_ip: Option<std::net::IpAddr>,
    /// Founding members, NAME=HOST:PEERPORT,... [default: this member alone]. Not needed when
    /// restarting from an existing data dir.
    #[arg(long, env = "FLOTILLA_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    #[arg(long, value_enum, default_value = "new")]
    pub initial_cluster_state: InitialState,
    /// Distinguishes clusters founded with the same --initial-cluster.
    #[arg(long, default_value = "flotilla")]
    pub initial_cluster_token: String,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub heartbeat_interval: u64,
    /// Minimum election timeout in milliseconds (the maximum is 1.8 times this). A follower
    /// elects a new leader after max + random(min, max) without hearing from it: 560-720 ms
    /// with the default.
    #[arg(long, default_value_t = 200)]
    pub election_timeout: u64,
    /// Entries applied between snapshots (the log is purged behind each).
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_count: u64,
    /// Bytes appended to the log between snapshots (a snapshot is taken at whichever of
    /// --snapshot-count and this comes first; 0: by count only). A snapshot flushes the key
    /// space and lets the log be purged; it writes no copy of the state.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub snapshot_bytes: u64,
    /// Entries kept behind each snapshot for slow followers to catch up from (a follower
    /// further behind is sent the snapshot instead; etcd's snapshot-catchup-entries).
    #[arg(long, default_value_t = 100)]
    pub snapshot_catchup_entries: u64,
    /// Revisions of history automatic compaction keeps (0: never compact automatically).
    #[arg(long, default_value_t = 10_000)]
    pub auto_compaction_retention: i64,
    /// Largest client request accepted, in bytes.
    #[arg(long, default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,
    /// Read-only API requests served at once, per member; one more is answered 429 with a
    /// retry hint (kube-apiserver's flag). Watches and log streams, system:masters, and
    /// members that check no identity are not counted. 0: no bound.
    #[arg(long, default_value_t = 400)]
    pub max_requests_inflight: usize,
    /// Mutating API requests served at once, per member, as --max-requests-inflight.
    #[arg(long, default_value_t = 200)]
    pub max_mutating_requests_inflight: usize,
    /// A range's answer is cut after this many bytes of keys and values, with `more` set as a
    /// limit would (etcd has no such bound; clients page with `limit`). Ranges over more than
    /// 1,000 keys are also served two at a time, off the threads Raft runs on.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_range_response_bytes: usize,
    /// The key space's size on disk beyond which writes are refused with etcd's `mvcc:
    /// database space exceeded` (the NOSPACE alarm) until space is freed (delete, compact)
    /// and the alarm disarmed (`etcdctl alarm disarm`); 0: no quota.
    #[arg(long, default_value_t = 2 * 1024 * 1024 * 1024)]
    pub quota_backend_bytes: u64,
    /// How often the leader compares the members' key spaces and raises the CORRUPT alarm
    /// (which stops writes) for one that differs; 0s: never.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub corrupt_check_interval: Duration,
    /// Compare this member's key space with the others' once at start, and stop if it
    /// differs from all of them.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub initial_corrupt_check: bool,
    /// Share of feasible nodes the scheduler looks for before scoring, in percent (0:
    /// adaptive, as kube-scheduler: all nodes up to 100, then 50% falling to 5% at 5,625
    /// nodes; 100: every node).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub percentage_of_nodes_to_score: u32,
    /// Don't run the scheduler on this member when it leads (for an external scheduler, or
    /// to measure the API alone).
    #[arg(long)]
    pub disable_scheduler: bool,
    /// How long Events are kept after their last write (kube-apiserver's flag); 0s: for
    /// ever; at most ten years.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub event_ttl: Duration,
    /// A node whose agent has not renewed its Lease for this long is marked unreachable
    /// (Ready=Unknown, NoExecute taint).
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub node_monitor_grace: Duration,
    /// How long pods that don't tolerate the unreachable taint stay on such a node before
    /// they are evicted (a pod's own tolerationSeconds overrides it).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub default_toleration: Duration,
    /// Calls a second the controllers make at most, once their burst is spent
    /// (kube-controller-manager's flag; its default is 20, which would hold a Deployment of
    /// thousands of replicas for minutes). With --kube-api-burst, this is how fast a runaway
    /// controller can write: a billion replicas add at most this many pods a second.
    #[arg(long, default_value_t = 1000.0)]
    pub kube_api_qps: f64,
    /// Calls the controllers may make at once before --kube-api-qps paces them.
    #[arg(long, default_value_t = 2000)]
    pub kube_api_burst: u32,
    /// Binds the scheduler keeps in flight at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub scheduler_bind_parallelism: u64,
    /// kube-apiserver's EncryptionConfiguration file: which resources are encrypted at rest,
    /// with which keys (providers `aesgcm` and `identity`; docs/security.md). Every member
    /// needs the same file.
    #[arg(long, env = "FLOTILLA_ENCRYPTION_PROVIDER_CONFIG", value_name = "FILE")]
    pub encryption_provider_config: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS, with etcd's flag names (docs/security.md). Without them a member serves plaintext
/// and says so at start.
#[derive(Args, Debug, Default)]
pub struct TlsArgs {
    /// The client port's certificate (PEM): the client port serves TLS only.
    #[arg(long, env = "FLOTILLA_CERT_FILE", requires_all = ["key_file", "trusted_ca_file"])]
    pub cert_file: Option<PathBuf>,
    /// The key of --cert-file (PEM).
    #[arg(long, env = "FLOTILLA_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The CA clients' certificates must come from. The member's own client (the leader's
    /// scheduler and controllers) also trusts it and presents --cert-file, so the client
    /// port's certificate must name 127.0.0.1 (or the --client-addr host).
    #[arg(long, env = "FLOTILLA_TRUSTED_CA_FILE", requires = "cert_file")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate from --trusted-ca-file (without it, a client may
    /// also connect anonymously).
    #[arg(long, env = "FLOTILLA_CLIENT_CERT_AUTH", requires = "trusted_ca_file")]
    pub client_cert_auth: bool,
    /// The peer port's certificate (PEM): mutual TLS between members, both ways. A
    /// connection whose certificate is not a member's from --peer-trusted-ca-file is refused
    /// and logged.
    #[arg(long, env = "FLOTILLA_PEER_CERT_FILE", requires_all = ["peer_key_file", "peer_trusted_ca_file"])]
    pub peer_cert_file: Option<PathBuf>,
    /// The key of --peer-cert-file (PEM).
    #[arg(long, env = "FLOTILLA_PEER_KEY_FILE", requires = "peer_cert_file")]
    pub peer_key_file: Option<PathBuf>,
    /// The CA of the members' peer certificates.
    #[arg(
        long,
        env = "FLOTILLA_PEER_TRUSTED_CA_FILE",
        requires = "peer_cert_file"
    )]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// kube-apiserver's static token file: one `token,user,uid[,"group1,group2"]` line per
    /// bearer token. Clients may then connect without a certificate and present a token.
    /// Needs --cert-file: a token sent in plaintext can be read on the way.
    #[arg(long, env = "FLOTILLA_TOKEN_AUTH_FILE", requires = "cert_file")]
    pub token_auth_file: Option<PathBuf>,
    /// Appends one JSON line per request to FILE: Kubernetes' audit.k8s.io/v1 Event at level
    /// Metadata (who, what, the decision, the status code).
    #[arg(long, env = "FLOTILLA_AUDIT_LOG_PATH", value_name = "FILE")]
    pub audit_log_path: Option<PathBuf>,
}

impl TlsArgs {
    /// The client port's TLS, and how the member's own client dials it.
    fn client(
        &self,
    ) -> anyhow::Result<Option<(flotilla_transport::ServerTls, flotilla_transport::Dialer)>> {
        use flotilla_transport::{ClientAuth, Dialer, ServerTls};
        let (Some(cert), Some(key), Some(ca)) =
            (&self.cert_file, &self.key_file, &self.trusted_ca_file)
        else {
            return Ok(None);
        };
        // Token clients come without a certificate; the API then refuses a request that
        // carries neither.
        let auth = if self.client_cert_auth && self.token_auth_file.is_none() {
            ClientAuth::Required
        } else {
            ClientAuth::Optional
        };
        let server = ServerTls::from_files(cert, key, Some(ca), auth)
            .context("--cert-file, --key-file, --trusted-ca-file")?;
        let dialer = Dialer::from_files(ca, Some((cert, key)))
            .context("--cert-file, --key-file, --trusted-ca-file")?;
        Ok(Some((server, dialer)))
    }

    /// Whether identities are checked: with client certificate auth or a token file.
    fn checks_identities(&self) -> bool {
        self.client_cert_auth || self.token_auth_file.is_some()
    }

    /// How the client port authenticates, and where it audits.
    async fn authn(&self) -> anyhow::Result<flotilla_apiserver::auth::layer::Authn> {
        let tokens = match &self.token_auth_file {
            Some(path) => {
                flotilla_apiserver::auth::tokens::Tokens::load(path).map_err(anyhow::Error::msg)?
            }
            None => Default::default(),
        };
        let audit = match &self.audit_log_path {
            Some(path) => Some(
                flotilla_apiserver::auth::audit::AuditLog::open(path)
                    .await
                    .with_context(|| format!("--audit-log-path {}", path.display()))?,
            ),
            None => None,
        };
        Ok(flotilla_apiserver::auth::layer::Authn {
            enabled: self.checks_identities(),
            tokens,
            audit,
            inflight: Default::default(),
        })
    }

    fn peer(&self) -> anyhow::Result<Option<flotilla_store::node::PeerTls>> {
        let (Some(cert), Some(key), Some(ca)) = (
            &self.peer_cert_file,
            &self.peer_key_file,
            &self.peer_trusted_ca_file,
        ) else {
            return Ok(None);
        };
        flotilla_store::node::PeerTls::from_files(cert, key, ca)
            .map(Some)
            .context("--peer-cert-file, --peer-key-file, --peer-trusted-ca-file")
    }
}

impl ServerArgs {
    pub fn config(&self) -> anyhow::Result<StoreConfig> {
        let data_dir = self
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.flotilla", self.name)));
        let mut c = StoreConfig::new(&self.name, data_dir);
        c.client_addr = self
            .advertise_client_addr
            .clone()
            .unwrap_or_else(|| self.client_addr.clone());
        c.peer_addr = self.peer_addr.clone();
        c.peer_source_ip = self.peer_source_ip;
        c.initial_cluster = match &self.initial_cluster {
            Some(s) => parse_initial_cluster(s).map_err(anyhow::Error::msg)?,
            None => vec![(self.name.clone(), self.peer_addr.clone())],
        };
        c.initial_cluster_state = match self.initial_cluster_state {
            InitialState::New => ClusterState::New,
            InitialState::Existing => ClusterState::Existing,
        };
        c.cluster_token = self.initial_cluster_token.clone();
        c.heartbeat = Duration::from_millis(self.heartbeat_interval);
        c.election_timeout_min = Duration::from_millis(self.election_timeout);
        c.election_timeout_max = Duration::from_millis(self.election_timeout * 9 / 5);
        c.snapshot_entries = self.snapshot_count;
        c.snapshot_bytes = self.snapshot_bytes;
        c.keep_logs = self.snapshot_catchup_entries;
        c.compaction_retention = self.auto_compaction_retention;
        c.max_request_bytes = self.max_request_bytes;
        c.quota_backend_bytes = self.quota_backend_bytes;
        c.max_range_response_bytes = self.max_range_response_bytes;
        c.corrupt_check_interval = self.corrupt_check_interval;
        c.initial_corrupt_check = self.initial_corrupt_check;
        c.peer_tls = self.tls.peer()?;
        c.client_tls = self.tls.cert_file.is_some();
        Ok(c)
    }
}

/// A member fails stop: any panic ends the process at once, non-zero, with one line saying
/// where, instead of leaving it up with a broken Raft core, state machine or storage, still
/// answering clients and forwarding writes. A supervisor (systemd, docker's restart policy,
/// Kubernetes) restarts it; sled and the Raft log recover from the crash as from a power cut.
fn fail_stop_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        let thread = std::thread::current();
        eprintln!(
            "flotilla: fatal: panic in thread {}{at}: {what}; this member stops (exit code {PANIC_EXIT})",
            thread.name().unwrap_or("unnamed")
        );
        std::process::exit(PANIC_EXIT);
    }));
}

/// The exit code of a member that panicked (EX_SOFTWARE).
pub const PANIC_EXIT: i32 = 70;
/// The exit code of a member whose Raft core stopped on a fatal error.
pub const FATAL_EXIT: i32 = 71;

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    fail_stop_on_panic();
    let mut config = args.config()?;
    if args.initial_cluster.is_none() && config.data_dir.join("member.json").exists() {
        // Restarting from the data dir alone: it knows the cluster.
        config.initial_cluster.clear();
    }
    let client = tokio::net::TcpListener::bind(&args.client_addr)
        .await
        .with_context(|| format!("cannot listen for clients on {}", args.client_addr))?;
    let listen_peer = args.listen_peer_addr.as_ref().unwrap_or(&config.peer_addr);
    let peer = tokio::net::TcpListener::bind(listen_peer)
        .await
        .with_context(|| format!("cannot listen for peers on {listen_peer}"))?;
    let client_tls = args.tls.client()?;
    if client_tls.is_some() && !args.tls.checks_identities() {
        eprintln!(
            "flotilla: warning: the client port {} serves TLS but checks no identity (neither \
             --client-cert-auth nor --token-auth-file): an anonymous client owns the cluster",
            args.client_addr
        );
    }
    let mut authn = args.tls.authn().await?;
    authn.inflight = flotilla_apiserver::auth::layer::Inflight::new(
        args.max_requests_inflight,
        args.max_mutating_requests_inflight,
    );
    let authn = std::sync::Arc::new(authn);
    let encryption = match &args.encryption_provider_config {
        Some(path) => flotilla_apiserver::encryption::Encryption::load(path)
            .map_err(|e| anyhow::anyhow!("--encryption-provider-config: {e}"))?,
        None => Default::default(),
    };
    if client_tls.is_none() {
        eprintln!(
            "flotilla: warning: the client port {} serves plaintext without authentication: \
             anyone who reaches it owns the cluster (see --cert-file in docs/security.md)",
            args.client_addr
        );
    }
    if config.peer_tls.is_none() {
        eprintln!(
            "flotilla: warning: the peer port {listen_peer} serves plaintext: anyone who \
             reaches it can send Raft messages (see --peer-cert-file in docs/security.md)"
        );
    }
    let (client_server_tls, own_dialer) = client_tls.unzip();
    let node = StoreNode::start(config, peer).await?;
    let leader_stats = std::sync::Arc::new(crate::leader::LeaderStats::default());
    let api = flotilla_apiserver::Api::new(node.clone())
        .with_agent_dialer(own_dialer.clone().unwrap_or_default())
        .with_encryption(encryption)
        .with_event_ttl(args.event_ttl);
    let serving = tokio::spawn(serve_clients(
        node.clone(),
        client,
        client_server_tls,
        authn,
        api,
        leader_stats.clone(),
    ));
    let leader_config = crate::leader::LeaderConfig {
        run_scheduler: !args.disable_scheduler,
        controllers_qps: args.kube_api_qps,
        controllers_burst: args.kube_api_burst,
        scheduler: flotilla_scheduler::Config {
            percentage_of_nodes_to_score: args.percentage_of_nodes_to_score,
            bind_parallelism: args.scheduler_bind_parallelism as usize,
            ..Default::default()
        },
        controllers: flotilla_controllers::Config {
            node_monitor_grace: args.node_monitor_grace,
            default_toleration: args.default_toleration,
            ..Default::default()
        },
        dialer: own_dialer.unwrap_or_default(),
    };
    tokio::spawn(crate::leader::run(
        node.clone(),
        args.client_addr.clone(),
        leader_config,
        leader_stats,
    ));
    eprintln!(
        "flotilla member {} ({:x}) of cluster {:x}: clients on {}, peers on {}",
        node.name(),
        node.id(),
        node.cluster_id(),
        args.client_addr,
        args.peer_addr
    );
    let mut fatal = node.fatal_signal();
    tokio::select! {
        r = wait_for_signal() => r?,
        reason = fatal.wait_for(|f| f.is_some()) => {
            let reason = reason.map(|r| r.clone().unwrap_or_default()).unwrap_or_default();
            eprintln!("flotilla: fatal: {reason}; this member stops (exit code {FATAL_EXIT})");
            std::process::exit(FATAL_EXIT);
        }
    }
    eprintln!("shutting down");
    node.shutdown().await;
    match tokio::time::timeout(Duration::from_secs(5), serving).await {
        Ok(Ok(Ok(()))) | Err(_) => Ok(()),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(e)) => bail!("client server task failed: {e}"),
    }
}

/// Serves the client port: the Flotilla API, etcd's API, gRPC health and reflection.
pub async fn serve_clients(
    node: StoreNode,
    listener: tokio::net::TcpListener,
    tls: Option<flotilla_transport::ServerTls>,
    authn: std::sync::Arc<flotilla_apiserver::auth::layer::Authn>,
    api: flotilla_apiserver::Api,
    leader_stats: std::sync::Arc<crate::leader::LeaderStats>,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let routes = tonic::service::Routes::new(health).add_service(reflection);
    let routes = flotilla_store::etcd::add_routes(routes, &node);
    let mut api = api;
    if let Some(log) = &authn.audit {
        api = api.with_audit(log.clone());
    }
    let routes = flotilla_apiserver::add_routes(routes, flotilla_apiserver::start_with(api));
    let requests = std::sync::Arc::new(crate::metrics::RequestStats::default());
    let sources = std::sync::Arc::new(crate::metrics::Sources {
        node: node.clone(),
        leader: leader_stats,
        requests: requests.clone(),
        leader_changes: crate::metrics::count_leader_changes(&node),
    });
    let routes = crate::metrics::add_routes(routes, sources);
    let mut stop = node.shutdown_signal();
    tonic::transport::Server::builder()
        // HTTP/1.1 too, for /metrics, /healthz and /readyz; the guard keeps gRPC methods out
        // of reach of web pages (gRPC content types only, no Origin).
        .accept_http1(true)
        .layer(flotilla_proto::guard::layer(crate::metrics::PLAIN_HTTP))
        .layer(flotilla_apiserver::auth::layer::layer(
            authn,
            crate::metrics::PLAIN_HTTP,
        ))
        .layer(crate::metrics::layer(requests))
        .serve_with_incoming_shutdown(
            routes,
            flotilla_transport::incoming(listener, tls, "client"),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await
        .context("the client server failed")
}

pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
