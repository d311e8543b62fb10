//! `flotilla snapshot save|restore|status`: backups of the key space.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use flotilla_proto::etcdserverpb::SnapshotRequest;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_store::node::{restore_snapshot, verify_snapshot};
use flotilla_transport::Dialer;

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub server: crate::verbs::ServerArg,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the running cluster's key space to FILE (checksummed;
    /// it holds everything committed before the command started).
    Save { file: PathBuf },
    /// Check FILE and print what it holds.
    Status { file: PathBuf },
    /// Make DATA_DIR (empty) a member's data dir holding exactly FILE's key space; start
    /// every founding member of the new cluster from the same file with
    /// `--initial-cluster-state new`.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    match args.command {
        SnapshotCommand::Save { file } => save(&args.server, &file).await,
        SnapshotCommand::Status { file } => {
            let h = verify_snapshot(&file).map_err(|e| anyhow!(e))?;
            println!(
                "{}: revision {}, compacted at {}, {}",
                file.display(),
                h.revision,
                h.compact_revision,
                size_of(&file)
            );
            Ok(())
        }
        SnapshotCommand::Restore { file, data_dir } => {
            let h = restore_snapshot(&file, &data_dir)?;
            println!(
                "restored revision {} into {}; start its member with --data-dir {} \
                 --initial-cluster-state new (every founding member restored from {})",
                h.revision,
                data_dir.display(),
                data_dir.display(),
                file.display()
            );
            Ok(())
        }
    }
}

fn size_of(file: &Path) -> String {
    std::fs::metadata(file).map_or_else(|_| "?".into(), |m| format!("{} bytes", m.len()))
}

/// Streams the snapshot from the first member that serves it into FILE.part, checks it, and
/// renames it into place: FILE is never left half written.
async fn save(server: &crate::verbs::ServerArg, file: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let part = file.with_extension("part");
    let mut errors = Vec::new();
    let (servers, dialer) = server.target()?;
    for server in &servers {
        match save_from(server, &dialer, &part).await {
            Ok(()) => {
                let h = match verify_snapshot(&part) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = std::fs::remove_file(&part);
                        bail!("the snapshot received from {server} does not verify: {e}");
                    }
                };
                std::fs::rename(&part, file)
                    .with_context(|| format!("renaming into {}", file.display()))?;
                println!(
                    "saved revision {} from {server} to {} ({}) in {:.1} s",
                    h.revision,
                    file.display(),
                    size_of(file),
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                errors.push(format!("{server}: {e:#}"));
            }
        }
    }
    bail!(
        "no control-plane member served a snapshot ({}); set --server or FLOTILLA_SERVER",
        errors.join("; ")
    )
}

async fn save_from(server: &str, dialer: &Dialer, part: &Path) -> anyhow::Result<()> {
    let channel = dialer
        .endpoint(server)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut stream = MaintenanceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|s| anyhow!("{} ({:?})", s.message(), s.code()))?
        .into_inner();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(part).with_context(|| format!("creating {}", part.display()))?,
    );
    let mut received = 0u64;
    let mut last_progress = Instant::now();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| anyhow!("{} ({:?})", s.message(), s.code()))?
    {
        out.write_all(&chunk.blob)?;
        received += chunk.blob.len() as u64;
        if last_progress.elapsed() >= Duration::from_secs(2) {
            eprintln!("received {received} bytes, {} to go", chunk.remaining_bytes);
            last_progress = Instant::now();
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}
