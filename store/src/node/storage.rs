//! A member's two sled databases: `db/` holds the key space and how far it has applied the
//! log; `log/` holds the Raft log, the vote and the commit index.
//!
//! They are apart so that a group commit flushes only the log's pages: in one database, every
//! flush also wrote the key space's pages changed since the last one (put at 64 clients went
//! from 0.87x to 0.95x etcd, p99 from 1.2x to 1.05x; BENCHMARKS.md, "Midday of 2026-11-26"; the
//! data dir stayed the same size). The key space reaches disk on sled's own schedule and after
//! each snapshot build: after a crash it may be behind the log, and openraft applies the rest
//! again from the log. The log store flushes the key space before it purges entries
//! ([`crate::raft::log_store::LogStore`]), so the entries a restart needs are always there.
//!
//! Data dirs written before the split keep the log in `db/`: [`open`] copies it into `log/`
//! (replacing whatever a copy cut short left there), flushes it, and only then drops it from
//! `db/`, the meta tree (the vote) last, so after a crash part-way the next start copies again
//! whichever old trees are still in `db/`; a member never starts without its log or vote. No database is closed and reopened on the way:
//! sled releases a closed database's file lock asynchronously.

use std::path::Path;

use crate::raft::log_store::{LOG_TREE, META_TREE};

/// The trees of the Raft log store. The meta tree (the vote) is dropped from `db/` last.
const LOG_TREES: [&str; 2] = [LOG_TREE, META_TREE];
/// The smallest page cache the log gets (it is read mostly at its head).
const MIN_LOG_CACHE: u64 = 8 * 1024 * 1024;

pub(crate) struct Databases {
    /// The key space and the state machine's progress (`db/`).
    pub state: sled::Db,
    /// The Raft log, vote and commit index (`log/`).
    pub log: sled::Db,
}

fn open_db(path: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(path)
        .cache_capacity(cache_bytes)
        .mode(sled::Mode::HighThroughput)
        .open()
}

fn has_tree(db: &sled::Db, name: &str) -> bool {
    db.tree_names()
        .iter()
        .any(|t| t.as_ref() == name.as_bytes())
}

/// Opens (or creates) both databases in `data_dir`, moving a log kept in `db/` by an older
/// version into `log/` first.
pub(crate) fn open(data_dir: &Path, cache_bytes: u64) -> Result<Databases, String> {
    let state = open_db(&data_dir.join("db"), cache_bytes)
        .map_err(|e| format!("opening the key space database: {e}"))?;
    let log = open_db(&data_dir.join("log"), (cache_bytes / 4).max(MIN_LOG_CACHE))
        .map_err(|e| format!("opening the log database: {e}"))?;
    if LOG_TREES.iter().any(|t| has_tree(&state, t)) {
        migrate(&state, &log)
            .map_err(|e| format!("moving the Raft log from db/ into log/: {e}"))?;
    }
    Ok(Databases { state, log })
}

fn migrate(state: &sled::Db, log: &sled::Db) -> sled::Result<()> {
    let mut entries = 0u64;
    // Only the trees still in `db/` are copied (again): one a crash left there after the other
    // was dropped has its copy in `log/` already, flushed before any drop.
    for name in LOG_TREES.into_iter().filter(|t| has_tree(state, t)) {
        let to = log.open_tree(name)?;
        to.clear()?;
        for item in state.open_tree(name)?.iter() {
            let (k, v) = item?;
            to.insert(k, v)?;
            entries += 1;
        }
    }
    log.flush()?;
    for name in LOG_TREES {
        if has_tree(state, name) {
            state.drop_tree(name)?;
        }
    }
    state.flush()?;
    tracing::info!(
        entries,
        "moved the Raft log from db/ into its own database, log/"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `open` until the previous holder's databases are released (sled releases a closed
    /// database's file lock asynchronously).
    fn retrying<T>(open: impl Fn() -> Result<T, String>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Ok(v) => return v,
                Err(e) if std::time::Instant::now() < deadline && e.contains("lock") => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn reopen(dir: &Path) -> Databases {
        retrying(|| open(dir, MIN_LOG_CACHE))
    }

    fn old_layout(dir: &Path) {
        // The layout before the split: log trees beside the key space in db/.
        let old = open_db(&dir.join("db"), MIN_LOG_CACHE).expect("open");
        let log = old.open_tree("raft/log").expect("tree");
        let meta = old.open_tree("raft/meta").expect("tree");
        let kv = old.open_tree("kv").expect("tree");
        for i in 1u64..=500 {
            log.insert(i.to_be_bytes(), vec![7u8; 100]).expect("insert");
        }
        meta.insert(b"vote", b"the vote".to_vec()).expect("insert");
        kv.insert(b"r1", b"a record".to_vec()).expect("insert");
        old.flush().expect("flush");
    }

    fn assert_moved(dbs: &Databases) {
        let log = dbs.log.open_tree("raft/log").expect("tree");
        assert_eq!(log.len(), 500);
        assert_eq!(
            log.get(42u64.to_be_bytes()).expect("get").as_deref(),
            Some(&[7u8; 100][..])
        );
        let meta = dbs.log.open_tree("raft/meta").expect("tree");
        assert_eq!(meta.len(), 1);
        assert_eq!(
            meta.get(b"vote").expect("get").as_deref(),
            Some(&b"the vote"[..])
        );
        assert!(!has_tree(&dbs.state, "raft/log"));
        assert!(!has_tree(&dbs.state, "raft/meta"));
        let kv = dbs.state.open_tree("kv").expect("tree");
        assert_eq!(
            kv.get(b"r1").expect("get").as_deref(),
            Some(&b"a record"[..])
        );
    }

    fn file_size(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("db")).map_or(0, |m| m.len())
    }

    fn value_of(i: u32) -> Vec<u8> {
        let mut v = vec![(i % 251) as u8; 3 * 1024];
        v[..4].copy_from_slice(&i.to_be_bytes());
        v
    }

    /// What a member at rest relies on (the vendored sled's change 5, vendor/sled/FLOTILLA.md):
    /// once writes stop, the database's file shrinks towards its live pages, and every live
    /// value is still there, before and after a restart. Without change 5 the file keeps its
    /// size (~20 MB here) for good.
    #[test]
    fn a_database_at_rest_shrinks_its_file_and_keeps_its_values() {
        const N: u32 = 3_000;
        const KEPT_FROM: u32 = N * 3 / 4;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("db");
        {
            let db = open_db(&path, MIN_LOG_CACHE).expect("open");
            let tree = db.open_tree("kv").expect("tree");
            for i in 0..N {
                tree.insert(i.to_be_bytes(), value_of(i)).expect("insert");
            }
            db.flush().expect("flush");
            // The older three quarters go: the live pages are at the file's end.
            for i in 0..KEPT_FROM {
                tree.remove(i.to_be_bytes()).expect("remove");
            }
            db.flush().expect("flush");
            let live = u64::from(N - KEPT_FROM) * 3 * 1024;
            let written = file_size(&path);
            assert!(
                written > 3 * live,
                "the file is {written} bytes after the writes, expected over 3x the {live} live"
            );
            // Without writes, the file sheds at least half of what it had (it went from ~20 MB
            // to under 7 MB here; sled keeps segments up to half dead, so not to `live`).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let mut size = written;
            while size > written / 2 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(100));
                size = file_size(&path);
            }
            assert!(
                size <= written / 2,
                "the file at rest stayed at {size} bytes (from {written}) for {live} live bytes"
            );
            for i in 0..N {
                let got = tree.get(i.to_be_bytes()).expect("get");
                assert_eq!(
                    got.as_deref(),
                    (i >= KEPT_FROM).then(|| value_of(i)).as_deref()
                );
            }
        }
        let db = retrying(|| open_db(&path, MIN_LOG_CACHE).map_err(|e| e.to_string()));
        let tree = db.open_tree("kv").expect("tree");
        assert_eq!(tree.len(), (N - KEPT_FROM) as usize);
        for i in KEPT_FROM..N {
            assert_eq!(
                tree.get(i.to_be_bytes()).expect("get").as_deref(),
                Some(&value_of(i)[..])
            );
        }
    }

    #[test]
    fn an_old_data_dir_has_its_log_moved_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        old_layout(dir.path());
        assert_moved(&reopen(dir.path()));
        // The next start finds the new layout and leaves it as it is.
        assert_moved(&reopen(dir.path()));
    }

    #[test]
    fn a_migration_cut_short_is_redone_from_the_old_trees() {
        let dir = tempfile::tempdir().expect("temp dir");
        old_layout(dir.path());
        {
            // A copy that a crash interrupted: part of the log, and a stale key.
            let partial = open_db(&dir.path().join("log"), MIN_LOG_CACHE).expect("open");
            let log = partial.open_tree("raft/log").expect("tree");
            log.insert(1u64.to_be_bytes(), vec![7u8; 100])
                .expect("insert");
            let meta = partial.open_tree("raft/meta").expect("tree");
            meta.insert(b"stale", b"x".to_vec()).expect("insert");
            partial.flush().expect("flush");
        }
        assert_moved(&reopen(dir.path()));
    }

    #[test]
    fn a_migration_cut_short_between_its_drops_keeps_the_copied_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        old_layout(dir.path());
        {
            // The copy is complete and flushed; a crash came after the log tree was dropped
            // from db/ and before the meta tree was.
            let state = retrying(|| {
                open_db(&dir.path().join("db"), MIN_LOG_CACHE).map_err(|e| e.to_string())
            });
            let log = open_db(&dir.path().join("log"), MIN_LOG_CACHE).expect("open");
            for name in LOG_TREES {
                let to = log.open_tree(name).expect("tree");
                for item in state.open_tree(name).expect("tree").iter() {
                    let (k, v) = item.expect("item");
                    to.insert(k, v).expect("insert");
                }
            }
            log.flush().expect("flush");
            state.drop_tree(LOG_TREE).expect("drop");
            state.flush().expect("flush");
        }
        assert_moved(&reopen(dir.path()));
    }
}
