//! Fail-stop: a member whose Raft core, state machine or storage fails ends its process at
//! once, non-zero, with one line saying why, instead of staying up with a broken core; the
//! other members carry on, and the member restarted from its data dir recovers.
//!
//! The failures are the test faults `panic-on-apply` and `fail-on-apply` (store/src/fault.rs:
//! debug builds only), switched on for one member, which then fails applying a put of
//! `flotilla-test/fatal` that the others apply.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE, etcdctl, eventually, ok};

fn fails_stop(fault: &str, code: i32, says: &str) {
    let mut cluster = Cluster::start();
    let ep = cluster.endpoints();
    ok(etcdctl(&ep, &["put", "before", "v"]));
    // Restart one follower with the fault switched on.
    let leader = cluster.leader();
    let victim = (leader + 1) % 3;
    cluster.members[victim].kill9();
    cluster.members[victim].env = vec![("FLOTILLA_TEST_FAULT".into(), fault.into())];
    let initial = cluster.initial.clone();
    cluster.members[victim].start(&initial);
    let victim_ep = cluster.members[victim].client.clone();
    cluster.wait_healthy(&victim_ep);

    // Written through the others: the victim may die before it answers.
    let others: Vec<String> = (0..3)
        .filter(|i| *i != victim)
        .map(|i| cluster.members[i].client.clone())
        .collect();
    let others = others.join(",");
    ok(etcdctl(&others, &["put", "flotilla-test/fatal", "x"]));
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        let child = cluster.members[victim].child.as_mut().unwrap();
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the failed member is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    cluster.members[victim].child = None;
    assert_eq!(status.code(), Some(code), "{status}");
    let log = std::fs::read_to_string(cluster.members[victim].dir.with_extension("log")).unwrap();
    let fatal: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("flotilla: fatal: "))
        .collect();
    assert_eq!(fatal.len(), 1, "one line says why:\n{log}");
    assert!(fatal[0].contains(says), "{}", fatal[0]);

    // The others carry on; the member, restarted without the fault, catches up.
    ok(etcdctl(&others, &["put", "after", "v"]));
    cluster.members[victim].env.clear();
    cluster.members[victim].start(&initial);
    eventually("the restarted member holds every write", || {
        let out = etcdctl(
            &victim_ep,
            &["get", "--consistency=s", "--prefix", "", "--keys-only"],
        );
        let keys = String::from_utf8_lossy(&out.stdout).to_string();
        ["before", "flotilla-test/fatal", "after"]
            .iter()
            .all(|k| keys.lines().any(|l| l == *k))
    });
}

#[test]
fn a_member_that_panics_exits_at_once() {
    fails_stop("panic-on-apply", 70, "panic in thread");
}

#[test]
fn a_member_whose_raft_core_stops_exits_at_once() {
    fails_stop("fail-on-apply", 71, "the Raft core stopped");
}
