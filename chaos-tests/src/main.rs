//! `flotilla-chaos`: runs chaos scenarios against real Flotilla clusters.
//!
//! ```text
//! cargo run -p flotilla-chaos -- --scenario partition --seed 3 --duration 60s
//! cargo run -p flotilla-chaos -- --ci        # the fixed set CI runs
//! cargo run -p flotilla-chaos -- --list
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use flotilla_chaos::run::{RunOptions, Summary, run};
use flotilla_chaos::scenario::{self, SCENARIOS};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Harness {
    Process,
    Docker,
}

#[derive(Parser, Debug)]
#[command(
    name = "flotilla-chaos",
    about = "Chaos tests: real clusters, seeded faults, checked histories"
)]
struct Args {
    /// The scenario to run (see --list).
    #[arg(long, default_value = "mixed")]
    scenario: String,
    /// Seed of the fault plan and the clients' choices [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// How long faults run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Control-plane members.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    nodes: u64,
    /// Worker nodes (agents with the fake runtime) for the control-plane workload.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Where the cluster runs: processes on loopback, or containers on private Docker
    /// networks built from a local image.
    #[arg(long, value_enum, default_value = "process")]
    harness: Harness,
    /// Register clients per member.
    #[arg(long, default_value_t = 2)]
    clients_per_node: usize,
    /// Register keys.
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// Pause between one client's operations.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pace: Duration,
    /// TLS on every port with client certificates required, as `flotilla up` runs it (the
    /// process harness only). The CI set runs its process runs this way.
    #[arg(long)]
    tls: bool,
    /// Runs the fixed set of scenarios and seeds CI runs, instead of one scenario.
    #[arg(long)]
    ci: bool,
    /// Lists the scenarios.
    #[arg(long)]
    list: bool,
    /// Where reports go (one folder per run).
    #[arg(long, default_value = "target/chaos-reports")]
    report_dir: PathBuf,
    /// The `flotilla` binary [default: built from this workspace].
    #[arg(long, env = "FLOTILLA_BIN")]
    flotilla_bin: Option<PathBuf>,
    /// Keep the members' data dirs in the report.
    #[arg(long)]
    keep_data: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.list {
        for s in SCENARIOS {
            println!("{:<12} {}", s.name, s.about);
        }
        return Ok(());
    }
    let binary = match &args.flotilla_bin {
        Some(b) => b.clone(),
        None => build_flotilla()?,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let runs: Vec<(String, u64, Duration, bool)> = if args.ci {
        let docker = runtime.block_on(flotilla_chaos::docker::available());
        if !docker {
            eprintln!("chaos: no Docker engine answers: the Docker runs of the set are skipped");
        }
        scenario::CI
            .iter()
            .filter(|run| docker || !run.docker)
            .map(|run| {
                (
                    run.scenario.to_string(),
                    run.seed,
                    Duration::from_secs(run.secs),
                    run.docker,
                )
            })
            .collect()
    } else {
        let seed = args.seed.unwrap_or_else(rand::random);
        vec![(
            args.scenario.clone(),
            seed,
            args.duration,
            args.harness == Harness::Docker,
        )]
    };
    let mut failed = Vec::new();
    for (name, seed, duration, docker) in runs {
        let Some(scenario) = scenario::find(&name) else {
            bail!("no scenario `{name}`; --list shows them");
        };
        eprintln!(
            "chaos: {name} (seed {seed}, {}) on {} members {}: {} ...",
            humantime::format_duration(duration),
            args.nodes,
            match (docker, args.ci || args.tls) {
                (true, _) => "in containers",
                (false, true) => "as processes, TLS on",
                (false, false) => "as processes",
            },
            scenario.about
        );
        let opts = RunOptions {
            scenario,
            seed,
            duration,
            nodes: args.nodes as usize,
            binary: binary.clone(),
            report_root: args.report_dir.clone(),
            clients_per_node: args.clients_per_node,
            keys: args.keys,
            pace: args.pace,
            keep_data: args.keep_data,
            workers: args.workers,
            docker,
            // The CI set: every process run with TLS on, the container run plaintext (as
            // the compose deployment serves).
            tls: if args.ci { !docker } else { args.tls },
        };
        let summary = runtime.block_on(run(opts))?;
        print_summary(&summary);
        if !summary.passed {
            failed.push(summary.replay.clone());
        }
    }
    if !failed.is_empty() {
        eprintln!("\n{} run(s) failed; replay with:", failed.len());
        for f in &failed {
            eprintln!("  {f}");
        }
        std::process::exit(1);
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    let watched: usize = s.watchers.iter().map(|w| w.1).sum();
    let streams: usize = s.watchers.iter().map(|w| w.2).sum();
    println!(
        "{} ({}) seed {}: {} faults; register {} ops ({} ok, {} indeterminate, {} failed); \
         appends {} ({} ok, {} indeterminate); {} history events, {} watched by {} watchers over \
         {} streams; {} deployment changes ({} acknowledged), {} pod events, {} worker outages; \
         recovered in {} ms; checked in {} ms",
        s.scenario,
        s.harness,
        s.seed,
        s.faults_injected,
        s.register.total,
        s.register.ok,
        s.register.indeterminate,
        s.register.failed,
        s.appends.total,
        s.appends.ok,
        s.appends.indeterminate,
        s.history_events,
        watched,
        s.watchers.len(),
        streams,
        s.deploy_actions.0,
        s.deploy_actions.1,
        s.pod_events,
        s.worker_outages.len(),
        s.recovery_ms,
        s.checker_ms
    );
    for f in &s.findings {
        println!("  [{}] {}", f.check, f.summary);
    }
    if let Some(f) = s.findings.first()
        && !f.detail.is_empty()
    {
        println!("  smallest anomaly:\n{}", indent(&f.detail));
    }
    let verdict = match (&s.test_fault, s.passed) {
        (None, true) => "PASS".to_string(),
        (None, false) => "FAIL".to_string(),
        (Some(f), true) => format!("PASS (the broken build `{f}` was caught)"),
        (Some(f), false) => format!("FAIL (the broken build `{f}` was not caught)"),
    };
    println!("  {verdict}; report: {}", s.report_dir.display());
    if !s.passed {
        println!("  replay: {}", s.replay);
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// Builds the `flotilla` binary of this workspace, in the profile this runner was built in,
/// and returns its path.
fn build_flotilla() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this runner")?;
    let dir = exe
        .parent()
        .context("the runner's directory")?
        .to_path_buf();
    let release = dir.ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace")?
        .to_path_buf();
    eprintln!("chaos: building flotilla ...");
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(&workspace)
        .args(["build", "-q", "-p", "flotilla-cli"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building flotilla failed");
    }
    let binary = dir.join("flotilla");
    if !binary.exists() {
        bail!("{} is missing after the build", binary.display());
    }
    Ok(binary)
}
