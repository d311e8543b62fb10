//! Backup and restore: a consistent snapshot of the key space out of a running member, and a
//! data dir that founds a new cluster from one.

use std::path::Path;
use std::time::Duration;

use super::{StartError, StoreNode};
use crate::backend::SledBackend;
use crate::errors::{BackendError, StoreError};
use crate::raft::state_machine::{SnapshotDir, restore_key_space};
use crate::snapshot::{SnapshotHeader, SnapshotReader};

impl StoreNode {
    /// A snapshot holding at least everything committed when this was called (a
    /// linearizable point), consistent at one revision: the member's newest snapshot file,
    /// built now if the last one is older than the read index. Returns its header and an
    /// open handle (a later snapshot replacing the file does not disturb it).
    pub async fn export_snapshot(&self) -> Result<(SnapshotHeader, std::fs::File), StoreError> {
        self.read_barrier().await?;
        let applied = self
            .inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let built = |m: &crate::types::RaftMetrics| m.snapshot.map_or(0, |s| s.index) >= applied;
        if !built(&self.inner.raft.metrics().borrow()) {
            self.inner
                .raft
                .trigger()
                .snapshot()
                .await
                .map_err(|e| StoreError::Stopped(format!("triggering a snapshot: {e}")))?;
            let mut metrics = self.inner.raft.metrics();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !built(&metrics.borrow_and_update()) {
                match tokio::time::timeout_at(deadline, metrics.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Err(StoreError::Stopped("the member stopped".into())),
                    Err(_) => {
                        return Err(StoreError::Timeout(format!(
                            "no snapshot at index {applied} within 60 s"
                        )));
                    }
                }
            }
        }
        // Not `SnapshotDir::new`: that would delete a snapshot being built or received.
        let path = SnapshotDir::current_in(&self.inner.config.data_dir.join("snapshots"));
        let io = |e: std::io::Error| BackendError::Io(format!("{}: {e}", path.display()));
        // Header and data from one handle: a newer snapshot replacing the file meanwhile
        // does not mix two snapshots.
        let file = std::fs::File::open(&path).map_err(io)?;
        let header = SnapshotReader::new(file.try_clone().map_err(io)?)
            .map_err(io)?
            .header()
            .clone();
        let file = reopen_at_start(file).map_err(io)?;
        Ok((header, file))
    }
}

impl StoreNode {
    /// The newest snapshot's size in bytes and the log index it covers, if there is one.
    pub fn snapshot_info(&self) -> Option<(u64, u64)> {
        let index = self
            .inner
            .raft
            .metrics()
            .borrow()
            .snapshot
            .map(|s| s.index)?;
        let path = SnapshotDir::current_in(&self.inner.config.data_dir.join("snapshots"));
        let size = std::fs::metadata(path).ok()?.len();
        Some((size, index))
    }
}

/// The same open file, positioned at its start again.
fn reopen_at_start(mut file: std::fs::File) -> std::io::Result<std::fs::File> {
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(file)
}

/// Checks a saved snapshot end to end (framing, checksum, trailer) and returns its header.
pub fn verify_snapshot(file: &Path) -> Result<SnapshotHeader, String> {
    SnapshotReader::open(file)
        .and_then(|r| r.verify())
        .map_err(|e| format!("{} is not a usable snapshot: {e}", file.display()))
}

/// Prepares `data_dir` to found a new cluster holding exactly the key space saved in `file`:
/// start its member with `--initial-cluster-state new` (every founding member restored from
/// the same file). Refuses a data dir that already holds a member, and a file that does not
/// verify, changing nothing.
pub fn restore_snapshot(file: &Path, data_dir: &Path) -> Result<SnapshotHeader, StartError> {
    let header = verify_snapshot(file).map_err(StartError::Config)?;
    for existing in ["member.json", "db", "log"] {
        if data_dir.join(existing).exists() {
            return Err(StartError::Config(format!(
                "{} already holds a member ({existing}); restore into an empty data dir",
                data_dir.display()
            )));
        }
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StartError::Io(format!("creating {}: {e}", data_dir.display())))?;
    let storage = |e: BackendError| StartError::Storage(e.to_string());
    let db = sled::Config::new()
        .path(data_dir.join("db"))
        .open()
        .map_err(|e| StartError::Storage(format!("opening the database: {e}")))?;
    let backend = SledBackend::open(&db).map_err(storage)?;
    let restored = restore_key_space(&db, &backend, file);
    if let Err(e) = restored {
        drop(backend);
        drop(db);
        let _ = std::fs::remove_dir_all(data_dir.join("db"));
        return Err(storage(e));
    }
    Ok(header)
}
