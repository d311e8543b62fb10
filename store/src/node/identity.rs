//! Who a member is: its id and its cluster's id, fixed when the member first starts and kept
//! in `<data-dir>/member.json`, so that a restart needs the data dir alone and a data dir can
//! never be used by another cluster.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StartError;
use crate::types::NodeId;

const FILE: &str = "member.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: NodeId,
    pub name: String,
    /// The founding members, as given when the cluster was created (empty for a member that
    /// joined a running cluster).
    pub initial_cluster: Vec<(String, String)>,
}

/// FNV-1a, 64 bits: stable across builds and platforms, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // Zero means "unknown" in etcd's headers and in our peer envelope.
    h.max(1)
}

/// The id of a founding member: the same on every member that computes it.
pub fn founding_member_id(token: &str, name: &str, peer_addr: &str) -> NodeId {
    fnv1a(&[
        b"member",
        token.as_bytes(),
        name.as_bytes(),
        peer_addr.as_bytes(),
    ])
}

/// The cluster id of a new cluster, from its token and founding members.
pub fn new_cluster_id(token: &str, initial: &[(String, String)]) -> u64 {
    let mut sorted: Vec<_> = initial.iter().collect();
    sorted.sort();
    let mut parts: Vec<&[u8]> = vec![b"cluster", token.as_bytes()];
    for (name, addr) in &sorted {
        parts.push(name.as_bytes());
        parts.push(addr.as_bytes());
    }
    fnv1a(&parts)
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

pub fn load(dir: &Path) -> Result<Option<Identity>, StartError> {
    let p = path(dir);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            StartError::Identity(format!(
                "{} is unreadable ({e}); is this a Flotilla data dir?",
                p.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StartError::Io(format!("reading {}: {e}", p.display()))),
    }
}

/// Writes the identity durably (temp file, fsync, rename, fsync of the directory).
pub fn store(dir: &Path, id: &Identity) -> Result<(), StartError> {
    let io = |e: std::io::Error| StartError::Io(format!("writing {}: {e}", path(dir).display()));
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let json = serde_json::to_vec_pretty(id).map_err(|e| StartError::Io(e.to_string()))?;
    f.write_all(&json).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path(dir)).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// Checks that a member restarted on an existing data dir is started as the same member of
/// the same cluster.
pub fn check_restart(
    stored: &Identity,
    name: &str,
    token: &str,
    initial: &[(String, String)],
) -> Result<(), StartError> {
    if stored.name != name {
        return Err(StartError::Identity(format!(
            "the data dir belongs to member `{}`, not `{name}`; use that --name or another --data-dir",
            stored.name
        )));
    }
    if !initial.is_empty() && !stored.initial_cluster.is_empty() {
        let given = new_cluster_id(token, initial);
        if given != stored.cluster_id {
            return Err(StartError::Identity(format!(
                "the data dir belongs to cluster {:x}, but --initial-cluster (with --initial-cluster-token `{token}`) describes cluster {given:x}; \
                 start with the original --initial-cluster, or without it (the data dir is enough), or use an empty --data-dir",
                stored.cluster_id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Vec<(String, String)> {
        vec![("a".into(), "h:1".into()), ("b".into(), "h:2".into())]
    }

    #[test]
    fn ids_are_stable_and_order_independent() {
        let mut rev = cluster();
        rev.reverse();
        assert_eq!(new_cluster_id("t", &cluster()), new_cluster_id("t", &rev));
        assert_ne!(
            new_cluster_id("t", &cluster()),
            new_cluster_id("u", &cluster())
        );
        assert_ne!(
            founding_member_id("t", "a", "h:1"),
            founding_member_id("t", "b", "h:1")
        );
    }

    #[test]
    fn a_conflicting_restart_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity {
            cluster_id: new_cluster_id("t", &cluster()),
            member_id: 7,
            name: "a".into(),
            initial_cluster: cluster(),
        };
        store(dir.path(), &id).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, id);
        check_restart(&loaded, "a", "t", &cluster()).unwrap();
        check_restart(&loaded, "a", "t", &[]).unwrap();
        assert!(check_restart(&loaded, "b", "t", &cluster()).is_err());
        let other = vec![("a".into(), "h:1".into()), ("c".into(), "h:3".into())];
        let err = check_restart(&loaded, "a", "t", &other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("belongs to cluster"), "{err}");
    }
}
