//! Backup and restore: a consistent snapshot of the key space out of a running member, and a
//! data dir that founds a new cluster from one.

use std::path::Path;

use super::{StartError, StoreNode};
use crate::backend::SledBackend;
use crate::errors::{BackendError, StoreError};
use crate::raft::state_machine::{Capture, restore_key_space};
use crate::snapshot::{SnapshotHeader, SnapshotReader};

impl StoreNode {
    /// A snapshot holding at least everything committed when this was called (a
    /// linearizable point), consistent at one revision, written now from this member's key
    /// space. Returns its header and an open handle to the file, which has no name left: it
    /// goes away once the handle is dropped.
    pub async fn export_snapshot(&self) -> Result<(SnapshotHeader, std::fs::File), StoreError> {
        self.read_barrier().await?;
        let capture = Capture::take(&self.inner.kv, self.inner.cluster_id).await?;
        let header = capture.header().clone();
        let dir = self.inner.snapshots.clone();
        let (file, size) = tokio::task::spawn_blocking(move || {
            let (path, size) = capture.write(&dir, "export")?;
            let file = std::fs::File::open(&path);
            let _ = std::fs::remove_file(&path);
            Ok::<_, std::io::Error>((file?, size))
        })
        .await
        .map_err(|e| StoreError::Internal(format!("writing a snapshot: {e}")))?
        .map_err(|e| BackendError::Io(format!("writing a snapshot: {e}")))?;
        self.inner.snapshot_files.wrote(size);
        Ok((header, file))
    }

    /// The size of the newest snapshot file this member wrote or received (0 before the
    /// first), and the log index of its newest snapshot, once it has one.
    pub fn snapshot_info(&self) -> (u64, Option<u64>) {
        let index = self.inner.raft.metrics().borrow().snapshot.map(|s| s.index);
        (self.inner.snapshot_files.last_bytes(), index)
    }
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
