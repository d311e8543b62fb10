//! Backup and restore: `flotilla snapshot save` from a running cluster under writes, a new
//! cluster founded from the file holding exactly the saved key space, and damaged files
//! refused without touching the data dir.

mod common;

use std::process::{Command, Output};

use common::{Cluster, Member, etcdctl, http_get, initial_cluster, ok};
use serde_json::Value;

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .unwrap()
}

/// A key, its value (bytes: objects are protobuf), create and mod revision, and version.
type Kv = (String, Vec<u8>, i64, i64, i64);

/// Every key as etcdctl sees it, and the revision it was read at.
fn key_space(endpoint: &str) -> (Vec<Kv>, i64) {
    let out = ok(etcdctl(endpoint, &["get", "", "--prefix", "-w", "json"]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let b64 = |v: &Value| base64_decode::decode(v.as_str().unwrap_or(""));
    let kvs = v["kvs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|kv| {
            (
                String::from_utf8(b64(&kv["key"])).unwrap(),
                b64(&kv["value"]),
                kv["create_revision"].as_i64().unwrap(),
                kv["mod_revision"].as_i64().unwrap(),
                kv["version"].as_i64().unwrap(),
            )
        })
        .collect();
    (kvs, v["header"]["revision"].as_i64().unwrap())
}

/// A minimal base64 decoder for etcdctl's JSON (standard alphabet, padded).
mod base64_decode {
    pub fn decode(s: &str) -> Vec<u8> {
        let val = |c: u8| match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            _ => 63,
        };
        let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
        let mut out = Vec::new();
        for chunk in bytes.chunks(4) {
            let mut n = 0u32;
            for (i, &c) in chunk.iter().enumerate() {
                n |= u32::from(val(c)) << (18 - 6 * i);
            }
            let b = n.to_be_bytes();
            out.extend_from_slice(&b[1..chunk.len()]);
        }
        out
    }
}

#[test]
fn a_saved_snapshot_founds_a_cluster_holding_exactly_that_state() {
    let cluster = Cluster::start();
    let ep = cluster.endpoints();
    for i in 0..50 {
        ok(etcdctl(
            &ep,
            &["put", &format!("k{i:02}"), &format!("v{i}")],
        ));
    }
    ok(etcdctl(&ep, &["put", "k01", "again"]));
    ok(etcdctl(&ep, &["del", "k02"]));
    let (before, revision) = key_space(&cluster.members[0].client);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let f = file.to_str().unwrap();
    let out = flotilla(&["snapshot", "save", f, "--server", &ep]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.starts_with("saved revision "), "{said}");
    // The member that served it built a snapshot for it, and says so in its metrics.
    let (_, metrics) = http_get(&cluster.members[0].client, "/metrics");
    let bytes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("flotilla_snapshot_bytes ")?.parse().ok())
        .unwrap_or_else(|| panic!("no flotilla_snapshot_bytes in\n{metrics}"));
    assert!(bytes > 0);
    // Writes after the save are not in it.
    ok(etcdctl(&ep, &["put", "after", "save"]));
    let out = flotilla(&["snapshot", "status", f]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Damaged copies are refused and leave the data dir as it was.
    let bytes = std::fs::read(&file).unwrap();
    let truncated = dir.path().join("truncated.snap");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x5a;
    let corrupt = dir.path().join("corrupt.snap");
    std::fs::write(&corrupt, &flipped).unwrap();
    for bad in [&truncated, &corrupt] {
        let target = dir.path().join("never");
        let out = flotilla(&[
            "snapshot",
            "restore",
            bad.to_str().unwrap(),
            "--data-dir",
            target.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a usable snapshot"), "{err}");
        assert!(
            !target.exists(),
            "a refused restore created {}",
            target.display()
        );
    }
    // So is a data dir that already holds a member.
    let out = flotilla(&[
        "snapshot",
        "restore",
        f,
        "--data-dir",
        cluster.members[0].dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds a member"));

    // Three members restored from the file found a new cluster with that key space.
    let mut members: Vec<Member> = (1..=3)
        .map(|i| Member::new(&format!("r{i}"), dir.path().join(format!("r{i}"))))
        .collect();
    let initial = initial_cluster(&members);
    for m in &mut members {
        let out = flotilla(&[
            "snapshot",
            "restore",
            f,
            "--data-dir",
            m.dir.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        m.start(&initial);
    }
    for m in &members {
        cluster.wait_healthy(&m.client);
    }
    for m in &members {
        let (after, new_revision) = key_space(&m.client);
        assert_eq!(after, before, "the key space on {}", m.name);
        assert!(new_revision >= revision);
    }
    // The new cluster goes on from the saved revision.
    let new_ep: Vec<String> = members.iter().map(|m| m.client.clone()).collect();
    ok(etcdctl(&new_ep.join(","), &["put", "k00", "new"]));
    let (after, new_revision) = key_space(&members[1].client);
    let k00 = after.iter().find(|kv| kv.0 == "k00").unwrap();
    assert_eq!((k00.1.as_slice(), k00.3), (&b"new"[..], new_revision));
    assert!(new_revision > revision);
}
