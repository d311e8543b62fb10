//! `flotilla`: the one binary — control-plane server, cluster tools, and the kubectl-like
//! verbs.

mod agent;
mod auth;
mod certs;
mod cluster;
mod drain;
mod leader;
mod metrics;
mod rollout;
mod server;
mod snapshot;
mod table;
mod up;
mod verbs;

use clap::{Parser, Subcommand};

// The store allocates a great deal per request (sled nodes, protobuf and bincode buffers);
// mimalloc measured markedly cheaper than the system allocator for it (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The CLI's default servers: the three members `flotilla up` starts.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:7379,127.0.0.1:7381,127.0.0.1:7383";

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "A container orchestrator with its own consensus store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct Verb<A: clap::Args> {
    #[command(flatten)]
    server: verbs::ServerArg,
    #[command(flatten)]
    args: A,
}

#[derive(Subcommand)]
enum Command {
    /// Start a three-member control plane and an agent on this machine, in the foreground.
    Up(up::UpArgs),
    /// Run a control-plane member.
    Server(Box<server::ServerArgs>),
    /// Run a worker node: register it and run the pods bound to it.
    Agent(agent::AgentArgs),
    /// Inspect and change the control plane's membership.
    Cluster(cluster::ClusterArgs),
    /// Make the cluster's certificates: a CA, certificates for members, agents and users, and
    /// kubeconfigs.
    Certs(certs::CertsArgs),
    /// Save a backup of the key space, check one, or restore one into a new data dir.
    Snapshot(snapshot::SnapshotArgs),
    /// Create or update the objects of a manifest (YAML or JSON; `-f -` reads stdin).
    Apply(Verb<verbs::ApplyArgs>),
    /// Replace existing objects with a manifest's version (`-f -` reads stdin).
    Replace(Verb<verbs::ApplyArgs>),
    /// List objects, or show some by name, as a table, YAML or JSON; `-w` watches.
    Get(Verb<verbs::GetArgs>),
    /// Show one object in detail, with its recent events.
    Describe(Verb<verbs::DescribeArgs>),
    /// Delete objects by name or by manifest.
    Delete(Verb<verbs::DeleteArgs>),
    /// Set the replicas of a deployment or replicaset.
    Scale(Verb<verbs::ScaleArgs>),
    /// Mark a node unschedulable: no new pod is placed on it.
    Cordon(Verb<drain::NodeArgs>),
    /// Mark a node schedulable again.
    Uncordon(Verb<drain::NodeArgs>),
    /// Cordon a node and evict its pods, honouring PodDisruptionBudgets.
    Drain(Verb<drain::DrainArgs>),
    /// Print a container's output (`-f` to follow it).
    Logs(Verb<verbs::LogsArgs>),
    /// Follow, undo, list, pause and resume deployment rollouts.
    Rollout(Verb<rollout::RolloutArgs>),
    /// Inspect authorization: `auth can-i VERB RESOURCE` asks whether an action is allowed.
    Auth(Verb<auth::AuthArgs>),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,openraft=off,flotilla_store=info,flotilla=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours for a terminal only, not for log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    // The process runtime's shim: a small supervisor per container, not a user command.
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("agent-shim") {
        let code = flotilla_node_agent::process::shim_main(&argv[2..]);
        return std::process::ExitCode::from(code.clamp(0, 255) as u8);
    }
    // The docker runtime's pod sandbox process.
    if argv.get(1).map(String::as_str) == Some("agent-pause") {
        return std::process::ExitCode::from(flotilla_node_agent::docker::pause_main() as u8);
    }
    let cli = Cli::parse();
    init_logging();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // A task woken by another does not jump the queue: the responses that one finished batch
    // of writes wakes are all written before hyper flushes their connection, in one write
    // instead of one each (.cargo/config.toml; `FLOTILLA_TOKIO_LIFO_SLOT=1` keeps tokio's
    // default, for comparison).
    #[cfg(tokio_unstable)]
    if std::env::var_os("FLOTILLA_TOKIO_LIFO_SLOT").is_none_or(|v| v != "1") {
        builder.disable_lifo_slot();
    }
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Server(args) => server::run(*args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Cluster(args) => cluster::run(args).await,
            Command::Certs(args) => certs::run(args).await,
            Command::Snapshot(args) => snapshot::run(args).await,
            Command::Apply(v) => verbs::apply(&v.server, v.args).await,
            Command::Replace(v) => verbs::replace(&v.server, v.args).await,
            Command::Get(v) => verbs::get(&v.server, v.args).await,
            Command::Describe(v) => verbs::describe(&v.server, v.args).await,
            Command::Delete(v) => verbs::delete(&v.server, v.args).await,
            Command::Scale(v) => verbs::scale(&v.server, v.args).await,
            Command::Cordon(v) => drain::cordon(&v.server, v.args).await,
            Command::Uncordon(v) => drain::uncordon(&v.server, v.args).await,
            Command::Drain(v) => drain::drain(&v.server, v.args).await,
            Command::Rollout(v) => rollout::run(&v.server, v.args).await,
            Command::Logs(v) => verbs::logs(&v.server, v.args).await,
            Command::Auth(v) => auth::run(&v.server, v.args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            if text.starts_with("Error from server") {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
