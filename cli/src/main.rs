//! `flotilla`: the one binary — control-plane server, cluster tools, and (later) the kubectl-like
//! verbs.

mod cluster;
mod server;

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

#[derive(Subcommand)]
enum Command {
    /// Run a control-plane member.
    Server(server::ServerArgs),
    /// Inspect and change the control plane's membership.
    Cluster(cluster::ClusterArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,openraft=off,flotilla_store=info,flotilla=info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Cluster(args) => cluster::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
