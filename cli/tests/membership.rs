//! The README's procedure for replacing a dead member, through the CLI: remove it, add a
//! fresh one as a learner, start it empty, promote it; it then holds the data and votes.

mod common;

use std::process::{Command, Output};

use common::{Cluster, etcdctl, eventually, free_port, ok};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .unwrap()
}

fn success(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_dead_member_is_replaced_by_a_fresh_one() {
    let mut cluster = Cluster::start();
    let ep = cluster.endpoints();
    for i in 0..20 {
        ok(etcdctl(&ep, &["put", &format!("k{i}"), "v"]));
    }
    // n3 dies for good, its data with it.
    cluster.members[2].kill9();
    std::fs::remove_dir_all(&cluster.members[2].dir).unwrap();
    let live = format!(
        "{},{}",
        cluster.members[0].client, cluster.members[1].client
    );
    success(flotilla(&["cluster", "remove", "n3", "--server", &live]));

    // A fresh n3 at a new peer address.
    let peer = format!("127.0.0.1:{}", free_port());
    let said = success(flotilla(&[
        "cluster",
        "add",
        "n3",
        &peer,
        "--learner",
        "--server",
        &live,
    ]));
    assert!(said.contains("--name n3"), "{said}");
    let initial = format!(
        "n1={},n2={},n3={peer}",
        cluster.members[0].peer, cluster.members[1].peer
    );
    // The start command lists every member, the new one included (in any order).
    let printed: std::collections::BTreeSet<&str> = said
        .split("--initial-cluster ")
        .nth(1)
        .unwrap_or("")
        .trim()
        .split(',')
        .collect();
    assert_eq!(printed, initial.split(',').collect(), "{said}");
    let m = &mut cluster.members[2];
    m.peer = peer;
    m.extra = vec!["--initial-cluster-state".into(), "existing".into()];
    m.start(&initial);
    eventually("the new member promoted once caught up", || {
        flotilla(&["cluster", "promote", "n3", "--server", &live])
            .status
            .success()
    });
    let n3 = cluster.members[2].client.clone();
    cluster.wait_healthy(&n3);
    assert_eq!(
        ok(etcdctl(&n3, &["get", "k19", "--print-value-only"])),
        "v\n"
    );

    // It votes: with n1 gone, n2 and n3 still make a quorum.
    cluster.members[0].kill9();
    let rest = format!("{},{n3}", cluster.members[1].client);
    eventually("a write with n1 down", || {
        etcdctl(&rest, &["put", "after", "n1"]).status.success()
    });
    assert_eq!(
        ok(etcdctl(&n3, &["get", "after", "--print-value-only"])),
        "n1\n"
    );
}
