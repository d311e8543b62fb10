//! `flotilla-bench`: drives any etcd v3 endpoint set (Flotilla or etcd itself) through a client
//! generated from the repository's own etcd `.proto` files, and prints one result per run.
//!
//! Every measuring subcommand prints one human-readable line, or with `--json` one JSON object,
//! so that `bench/run.sh` can run Flotilla and etcd side by side and compare. Progress goes to
//! stderr once a second on runs longer than two seconds.
//!
//! ```text
//! flotilla-bench --endpoints 127.0.0.1:2379 put --clients 64 --total 100000
//! flotilla-bench --endpoints 127.0.0.1:2379 range --clients 64 --consistency s --prefill
//! flotilla-bench --endpoints 127.0.0.1:2379 watch-latency --watchers 1000 --puts 1000
//! flotilla-bench --endpoints a:2379,b:2379,c:2379 leader
//! ```

mod agent;
mod api;
mod ctrl;
mod failover;
mod load;
mod net;
mod report;
mod sched;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::load::{Limit, Load};

#[derive(Parser)]
#[command(
    name = "flotilla-bench",
    about = "Load generator for etcd v3 endpoints"
)]
struct Cli {
    /// Endpoints, HOST:PORT,... (https with --cacert, else plain http; clients are spread over them round-robin, and
    /// when there are fewer clients than endpoints each client sends its successive requests
    /// to successive endpoints). The default is a Flotilla server's default client address.
    #[arg(long, global = true, default_value = "127.0.0.1:7379")]
    endpoints: String,
    /// Print each result as one JSON object instead of a human-readable line.
    #[arg(long, global = true)]
    json: bool,
    /// TLS: the CA to trust (etcdctl's flag); endpoints are then dialled with https.
    #[arg(long, global = true)]
    cacert: Option<std::path::PathBuf>,
    /// TLS: the client certificate to present (with --key).
    #[arg(long, global = true, requires_all = ["key", "cacert"])]
    cert: Option<std::path::PathBuf>,
    /// TLS: the key of --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The clients of a load run and when it stops.
#[derive(Args)]
struct LoadArgs {
    /// Concurrent clients, each doing one request after another.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// gRPC connections the clients share (at most one per client; rounded up to a multiple
    /// of the endpoint count).
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Requests in all [default: 10000 unless --duration].
    #[arg(long, conflicts_with = "duration")]
    total: Option<u64>,
    /// Run for this many seconds instead of a total.
    #[arg(long)]
    duration: Option<u64>,
}

impl LoadArgs {
    fn load(&self) -> Load {
        let limit = match (self.total, self.duration) {
            (_, Some(secs)) => Limit::Duration(Duration::from_secs(secs)),
            (total, None) => Limit::Total(total.unwrap_or(10_000)),
        };
        Load {
            clients: self.clients.max(1),
            conns: self.conns,
            limit,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Consistency {
    /// Linearizable.
    L,
    /// Serializable.
    S,
}

#[derive(Subcommand)]
enum Command {
    /// Puts to random keys among --key-space.
    Put {
        #[command(flatten)]
        load: LoadArgs,
        /// Keys bench/00000000 up to this many.
        #[arg(long, default_value_t = 100_000)]
        key_space: u64,
        /// Value size in bytes.
        #[arg(long, default_value_t = 256)]
        value_size: usize,
    },
    /// Single-key ranges of random keys among --key-space. Writes nothing itself: run `fill`
    /// (or `put`) over the same key space first, or pass --prefill; `misses` counts ranges
    /// that found no key.
    Range {
        #[command(flatten)]
        load: LoadArgs,
        /// Keys bench/00000000 up to this many.
        #[arg(long, default_value_t = 1_000)]
        key_space: u64,
        /// l: linearizable, s: serializable.
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        /// First write every key of the key space once (256-byte values, 16 clients).
        #[arg(long)]
        prefill: bool,
    },
    /// Delivery latency of put events to W watchers of one prefix; checks that every watcher
    /// sees every put exactly once, in order (`lost`, `duplicates`, `out_of_order` must be 0).
    WatchLatency {
        #[arg(long, default_value_t = 1)]
        watchers: usize,
        /// Puts the writer makes.
        #[arg(long, default_value_t = 1_000)]
        puts: u64,
        /// Puts per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Value size in bytes (at least 24).
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        /// Watches multiplexed on one stream (each stream has its own connection).
        #[arg(long, default_value_t = 100)]
        watches_per_stream: usize,
        /// Seconds watchers may take after the last put before missing events count as lost.
        #[arg(long, default_value_t = 10)]
        grace: u64,
    },
    /// Prints the endpoint whose member is the leader (by Maintenance.Status on each).
    Leader,
    /// Checks that every endpoint answers, all agree on one leader, and a linearizable read
    /// succeeds through each; exits non-zero otherwise.
    Health {
        /// Keep trying for this many seconds.
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// One writer putting for --duration seconds, moving to the next endpoint on any error or
    /// timeout; reports the longest time between two acknowledged puts (max_gap_ms).
    Unavailability {
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Per-request timeout in milliseconds.
        #[arg(long, default_value_t = 200)]
        timeout_ms: u64,
        /// Pause after each request, in milliseconds.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
        /// Write every request (time, latency, endpoint, success) to this CSV file.
        #[arg(long)]
        series: Option<PathBuf>,
    },
    /// Flotilla API: creates of small pods by concurrent clients.
    ApiCreate {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
    },
    /// Flotilla API: latency of listing every pod of a namespace holding --pods pods (made
    /// first if missing).
    ApiList {
        #[arg(long, default_value_t = 10_000)]
        pods: u64,
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Flotilla API: delivery latency of changes to one pod to --watchers watches of it.
    ApiWatch {
        #[arg(long, default_value_t = 1_000)]
        watchers: usize,
        #[arg(long, default_value_t = 100)]
        changes: u64,
        /// Changes per second.
        #[arg(long, default_value_t = 20)]
        rate: u64,
    },
    /// Scheduler: registers --nodes Nodes (Ready, Leases renewed every --lease-interval
    /// seconds), creates --pods pods with --clients creators, and measures first create to
    /// last pod bound and each pod's create-to-bound latency.
    Sched {
        #[arg(long, default_value_t = 100)]
        nodes: usize,
        #[arg(long, default_value_t = 10_000)]
        pods: u64,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Seconds between renewals of each Lease (under the 8 s node-monitor-grace).
        #[arg(long, default_value_t = 4)]
        lease_interval: u64,
        /// Control-plane PIDs (comma-separated) whose CPU time to report.
        #[arg(long, value_delimiter = ',')]
        member_pids: Vec<u32>,
    },
    /// Controllers: a Deployment scaled 0 → --replicas on --nodes simulated nodes until all
    /// are available, then rolled to a new template (maxSurge 25%) until complete.
    CtrlScale {
        #[arg(long, default_value_t = 500)]
        nodes: usize,
        #[arg(long, default_value_t = 5_000)]
        replicas: i32,
        /// Seconds between renewals of each Lease.
        #[arg(long, default_value_t = 4)]
        lease_interval: u64,
    },
    /// Controllers: kill -9 the leader, delete a replica; time until it is replaced.
    CtrlFailover {
        /// The members' PIDs, in the order of --endpoints.
        #[arg(long, value_delimiter = ',', required = true)]
        member_pids: Vec<u32>,
    },
    /// Controllers: one simulated node's agent dies; time until its pods run elsewhere.
    CtrlNodeLoss {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        #[arg(long, default_value_t = 50)]
        replicas: i32,
    },
    /// Agent: pods created for --node (a running agent), each timed from create to Running
    /// seen in a watch; deleted at the end.
    PodStartup {
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 100)]
        pods: usize,
        #[arg(long, default_value_t = 8)]
        clients: usize,
    },
    /// Agent: CPU and RSS of an agent keeping --nodes simulated nodes (names starting with
    /// --prefix), measured over --duration seconds once all are Ready.
    AgentSim {
        #[arg(long)]
        agent_pid: u32,
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value = "sim-")]
        prefix: String,
        #[arg(long, default_value_t = 30)]
        duration: u64,
    },
    /// Writes --total puts cycling over --keys keys (for disk and memory figures).
    Fill {
        /// Keys bench/00000000 up to this many, written in turn.
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        #[arg(long, default_value_t = 1_000_000)]
        total: u64,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 8)]
        conns: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Errors print as one line with their causes, never with a backtrace.
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(ca) = &cli.cacert {
        let identity = cli.cert.as_deref().zip(cli.key.as_deref());
        net::use_tls(flotilla_transport::Dialer::from_files(ca, identity)?);
    }
    let endpoints = net::endpoint_list(&cli.endpoints)?;
    let report = match cli.command {
        Command::Put {
            load,
            key_space,
            value_size,
        } => load::put(&endpoints, load.load(), key_space, value_size).await?,
        Command::Range {
            load,
            key_space,
            consistency,
            prefill,
        } => {
            if prefill {
                let fill = Load {
                    clients: 16,
                    conns: 8,
                    limit: Limit::Total(key_space),
                };
                let r = load::fill(&endpoints, fill, key_space, 256).await?;
                eprintln!("prefill: {}", r.human());
            }
            let serializable = consistency == Consistency::S;
            load::range(&endpoints, load.load(), key_space, serializable).await?
        }
        Command::WatchLatency {
            watchers,
            puts,
            rate,
            value_size,
            watches_per_stream,
            grace,
        } => {
            let opts = watch::WatchOpts {
                watchers,
                puts,
                rate,
                value_size,
                per_stream: watches_per_stream,
                grace: Duration::from_secs(grace),
            };
            watch::latency(&endpoints, opts).await?
        }
        Command::Leader => {
            println!("{}", failover::leader(&endpoints).await?);
            return Ok(());
        }
        Command::Health { wait } => failover::health(&endpoints, Duration::from_secs(wait)).await?,
        Command::Unavailability {
            duration,
            timeout_ms,
            interval_ms,
            series,
        } => {
            let opts = failover::UnavailabilityOpts {
                duration: Duration::from_secs(duration),
                timeout: Duration::from_millis(timeout_ms),
                interval: Duration::from_millis(interval_ms),
                series,
            };
            failover::unavailability(&endpoints, opts).await?
        }
        Command::ApiCreate {
            clients,
            conns,
            total,
        } => api::create(&endpoints, clients, conns, total).await?,
        Command::ApiList { pods, runs } => api::list(&endpoints, pods, runs).await?,
        Command::ApiWatch {
            watchers,
            changes,
            rate,
        } => api::watch(&endpoints, watchers, changes, rate).await?,
        Command::CtrlScale {
            nodes,
            replicas,
            lease_interval,
        } => {
            ctrl::scale(
                &endpoints,
                nodes,
                replicas,
                Duration::from_secs(lease_interval),
            )
            .await?
        }
        Command::CtrlFailover { member_pids } => ctrl::failover(&endpoints, &member_pids).await?,
        Command::CtrlNodeLoss { nodes, replicas } => {
            ctrl::node_loss(&endpoints, nodes, replicas).await?
        }
        Command::PodStartup {
            node,
            pods,
            clients,
        } => agent::pod_startup(&endpoints, &node, pods, clients).await?,
        Command::AgentSim {
            agent_pid,
            nodes,
            prefix,
            duration,
        } => {
            agent::agent_sim(
                &endpoints,
                agent_pid,
                nodes,
                &prefix,
                Duration::from_secs(duration),
            )
            .await?
        }
        Command::Sched {
            nodes,
            pods,
            clients,
            lease_interval,
            member_pids,
        } => {
            let opts = sched::SchedOpts {
                nodes,
                pods,
                clients,
                lease_interval,
                member_pids,
            };
            sched::run(&endpoints, opts).await?
        }
        Command::Fill {
            keys,
            total,
            value_size,
            clients,
            conns,
        } => {
            let load = Load {
                clients,
                conns,
                limit: Limit::Total(total),
            };
            load::fill(&endpoints, load, keys, value_size).await?
        }
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.human());
    }
    Ok(())
}
