//! `flotilla-bench`: drives any etcd v3 endpoint set (Flotilla or etcd itself) through a client
//! generated from the repository's own etcd `.proto` files, and prints one result per run.
//!
//! Every subcommand prints a human-readable line, or with `--json` one JSON object, so that
//! `bench/run.sh` can run Flotilla and etcd side by side and compare.

mod load;
mod watch;

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_proto::etcdserverpb::StatusRequest;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(name = "flotilla-bench", about = "etcd v3 load generator")]
struct Cli {
    /// Endpoints, HOST:PORT,... (clients are spread over them round-robin).
    #[arg(long, global = true, default_value = "127.0.0.1:7379")]
    endpoints: String,
    /// Print each result as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
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
    /// Sequential puts from N concurrent clients to random keys.
    Put {
        #[arg(long, default_value_t = 1)]
        clients: usize,
        /// gRPC connections shared by the clients.
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 100_000)]
        key_space: u64,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
    },
    /// Single-key ranges from N concurrent clients (fills the key space first with --prefill).
    Range {
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 1_000)]
        key_space: u64,
        #[arg(long, value_enum, default_value = "l")]
        consistency: Consistency,
        #[arg(long)]
        prefill: bool,
    },
    /// Delivery latency of put events to W watchers; checks every watcher sees every event.
    WatchLatency {
        #[arg(long, default_value_t = 1)]
        watchers: usize,
        #[arg(long, default_value_t = 1_000)]
        puts: u64,
        /// Puts per second.
        #[arg(long, default_value_t = 200)]
        rate: u64,
    },
    /// Prints the endpoint of the current leader.
    Leader,
    /// One writer for D seconds; reports the longest gap between acknowledged puts.
    Unavailability {
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Per-request timeout before trying the next endpoint.
        #[arg(long, default_value_t = 200)]
        timeout_ms: u64,
    },
    /// Writes TOTAL puts over KEYS keys (for disk and memory figures).
    Fill {
        #[arg(long, default_value_t = 10_000)]
        keys: u64,
        #[arg(long, default_value_t = 1_000_000)]
        total: u64,
        #[arg(long, default_value_t = 256)]
        value_size: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
    },
}

pub fn endpoint_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

/// A lazily connected channel to one endpoint.
pub fn channel(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let url = if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    let mut e = Endpoint::from_shared(url)
        .with_context(|| format!("bad endpoint {endpoint}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1));
    if let Some(t) = timeout {
        e = e.timeout(t);
    }
    Ok(e.connect_lazy())
}

/// The endpoint whose member leads, by asking each for its status.
async fn leader(endpoints: &[String]) -> anyhow::Result<String> {
    for e in endpoints {
        let mut m = MaintenanceClient::new(channel(e, Some(Duration::from_secs(2)))?);
        if let Ok(s) = m.status(StatusRequest {}).await {
            let s = s.into_inner();
            if s.header.is_some_and(|h| h.member_id == s.leader) {
                return Ok(e.clone());
            }
        }
    }
    anyhow::bail!("no endpoint reports itself as the leader")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let endpoints = endpoint_list(&cli.endpoints);
    anyhow::ensure!(!endpoints.is_empty(), "--endpoints is empty");
    let report = match cli.command {
        Command::Put {
            clients,
            conns,
            total,
            key_space,
            value_size,
        } => load::put(&endpoints, clients, conns, total, key_space, value_size).await?,
        Command::Range {
            clients,
            conns,
            total,
            key_space,
            consistency,
            prefill,
        } => {
            if prefill {
                load::put(&endpoints, 16, 8, key_space, key_space, 256).await?;
            }
            let serializable = consistency == Consistency::S;
            load::range(&endpoints, clients, conns, total, key_space, serializable).await?
        }
        Command::WatchLatency {
            watchers,
            puts,
            rate,
        } => watch::latency(&endpoints, watchers, puts, rate).await?,
        Command::Leader => {
            println!("{}", leader(&endpoints).await?);
            return Ok(());
        }
        Command::Unavailability {
            duration,
            timeout_ms,
        } => load::unavailability(&endpoints, duration, timeout_ms).await?,
        Command::Fill {
            keys,
            total,
            value_size,
            clients,
        } => load::fill(&endpoints, keys, total, value_size, clients).await?,
    };
    if cli.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.human());
    }
    Ok(())
}

/// One result: named figures in a fixed order.
pub struct Report {
    pub fields: Vec<(&'static str, serde_json::Value)>,
}

impl Report {
    pub fn new() -> Self {
        Self { fields: Vec::new() }
    }

    pub fn with(mut self, name: &'static str, v: impl Into<serde_json::Value>) -> Self {
        self.fields.push((name, v.into()));
        self
    }

    /// Adds throughput and latency percentiles (milliseconds) from a histogram of microseconds.
    pub fn latencies(self, h: &hdrhistogram::Histogram<u64>, secs: f64) -> Self {
        let ms = |q: f64| (h.value_at_quantile(q) as f64 / 1000.0 * 1000.0).round() / 1000.0;
        let n = h.len();
        self.with("ops", n)
            .with("secs", (secs * 1000.0).round() / 1000.0)
            .with("throughput", (n as f64 / secs).round())
            .with("p50_ms", ms(0.5))
            .with("p90_ms", ms(0.9))
            .with("p99_ms", ms(0.99))
            .with("max_ms", h.max() as f64 / 1000.0)
    }

    fn json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    fn human(&self) -> String {
        self.fields
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Default for Report {
    fn default() -> Self {
        Self::new()
    }
}
