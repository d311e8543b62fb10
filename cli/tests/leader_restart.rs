//! A leader killed with -9 and restarted before a follower stands for election resumes its
//! leadership in the same term. Its commit index is persisted lazily, so it may come back
//! knowing less committed than it had acknowledged: a linearizable read through it (or
//! through a follower, which asks it for the read index) must still see every write it
//! acknowledged before the kill. The chaos set found this read stale once
//! (docs/findings/2026-12-07-stale-read-after-leader-restart.md).
//!
//! The restarted leader runs with the test fault `slow-append` (store/src/fault.rs: debug
//! builds only), so that it commits its entries well after it first confirms its
//! leadership: the window in which a read index from its commit index alone is stale.

mod common;

use std::time::Instant;

use common::{Cluster, DEADLINE, etcdctl, ok};

/// `(term, leader id)` as member `endpoint` reports them.
fn status(endpoint: &str) -> Option<(u64, u64)> {
    let out = etcdctl(endpoint, &["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let s = &v[0]["Status"];
    Some((s["raftTerm"].as_u64()?, s["leader"].as_u64()?))
}

/// The value of `key` read linearizably through `endpoint`, once the member answers.
fn read(endpoint: &str, key: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let out = etcdctl(endpoint, &["get", key, "--print-value-only"]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} serves no read: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_leader_restarted_in_its_term_reads_every_write_it_acknowledged() {
    // Followers stand for election only after 5.4 s + 3-5.4 s without a leader: the killed
    // leader is back well before, and resumes its leadership in the same term.
    let mut cluster =
        Cluster::start_with(&["--heartbeat-interval", "100", "--election-timeout", "3000"]);
    let initial = cluster.initial.clone();
    for round in 0..3 {
        let leader = cluster.leader();
        let ep = cluster.members[leader].client.clone();
        let before = status(&ep).expect("the leader reports its status");
        let value = format!("v{round}");
        // Acknowledged, then the leader dies at once: its latest commit index is most
        // likely not on disk yet.
        ok(etcdctl(&ep, &["put", "acked", &value]));
        cluster.members[leader].kill9();
        // Restarted, it sends its entries 1 s late (heartbeats at once): it confirms its
        // leadership long before it learns that the write is committed.
        cluster.members[leader].env = vec![("FLOTILLA_TEST_FAULT".into(), "slow-append".into())];
        cluster.members[leader].start(&initial);

        let follower = cluster.members[(leader + 1) % 3].client.clone();
        assert_eq!(
            read(&ep, "acked"),
            value,
            "round {round}: a read through the restarted leader misses its acknowledged write"
        );
        assert_eq!(
            read(&follower, "acked"),
            value,
            "round {round}: a read through a follower misses the leader's acknowledged write"
        );
        assert_eq!(
            status(&ep),
            Some(before),
            "round {round}: the restarted leader did not resume its term (the case under test)"
        );
    }
}
