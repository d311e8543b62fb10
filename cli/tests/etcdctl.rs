//! The real binary: three `flotilla server` processes on loopback, driven by `etcdctl` (Debian
//! etcd-client 3.4) as a third-party client of the etcd v3 face; kill -9 of the leader and of
//! the whole cluster loses no acknowledged write; conflicting restarts are refused.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

mod common;

use common::*;

#[test]
fn three_members_serve_etcdctl() {
    let c = Cluster::start();
    let e = c.endpoints();
    ok(etcdctl(&e, &["put", "fruit/apple", "red"]));
    ok(etcdctl(&e, &["put", "fruit/banana", "yellow"]));
    ok(etcdctl(&e, &["put", "other", "x"]));
    assert_eq!(
        ok(etcdctl(
            &c.members[2].client,
            &["get", "fruit/", "--prefix"]
        )),
        "fruit/apple\nred\nfruit/banana\nyellow\n"
    );
    // A txn: the compare chooses the branch.
    let txn =
        "value(\"fruit/apple\") = \"red\"\n\nput fruit/apple green\n\nput fruit/apple never\n\n";
    assert!(ok(etcdctl_stdin(&e, &["txn"], Some(txn))).starts_with("SUCCESS"));
    assert_eq!(
        ok(etcdctl(&e, &["get", "fruit/apple", "--print-value-only"])),
        "green\n"
    );
    // watch --rev replays history in order.
    let mut watch = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &e,
            "watch",
            "fruit/",
            "--prefix",
            "--rev",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines: Vec<String> = BufReader::new(watch.stdout.take().unwrap())
        .lines()
        .take(9)
        .map(|l| l.unwrap())
        .collect();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        lines,
        [
            "PUT",
            "fruit/apple",
            "red",
            "PUT",
            "fruit/banana",
            "yellow",
            "PUT",
            "fruit/apple",
            "green"
        ]
    );
    // Leases: grant, attach, keep alive, time to live, revoke deletes the key.
    let grant = ok(etcdctl(&e, &["lease", "grant", "30"]));
    let lease = grant.split_whitespace().nth(1).unwrap().to_string();
    ok(etcdctl(&e, &["put", "--lease", &lease, "session", "alive"]));
    assert!(ok(etcdctl(&e, &["lease", "keep-alive", "--once", &lease])).contains("TTL(30)"));
    assert!(ok(etcdctl(&e, &["lease", "timetolive", &lease, "--keys"])).contains("[session]"));
    ok(etcdctl(&e, &["lease", "revoke", &lease]));
    assert_eq!(ok(etcdctl(&e, &["get", "session"])), "");
    // Members and status.
    // Each member publishes its name and client URL once it runs (as etcd members do).
    let mut list = String::new();
    eventually("every member listed with its name and URLs", || {
        list = ok(etcdctl(&e, &["member", "list"]));
        c.members.iter().all(|m| {
            list.contains(&format!(
                ", started, {}, http://{}, http://{}",
                m.name, m.peer, m.client
            ))
        })
    });
    assert_eq!(list.lines().count(), 3, "{list}");
    let status: serde_json::Value =
        serde_json::from_str(&ok(etcdctl(&e, &["endpoint", "status", "-w", "json"]))).unwrap();
    let statuses = status.as_array().unwrap();
    assert_eq!(statuses.len(), 3);
    let terms: Vec<_> = statuses
        .iter()
        .map(|s| s["Status"]["raft_term"].clone())
        .collect();
    assert!(terms.iter().all(|t| *t == terms[0]), "{terms:?}");
    let leaders = statuses
        .iter()
        .filter(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
        .count();
    assert_eq!(leaders, 1);
    // A request over 1.5 MiB is refused and changes nothing.
    // Over the 1.5 MiB limit, under the 2 MiB etcdctl itself refuses to send.
    let big = "x".repeat(1600 * 1024);
    // (etcdctl reads the value from stdin when none is given.)
    let out = etcdctl_stdin(&e, &["put", "big"], Some(&big));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("request is too large"));
    assert_eq!(ok(etcdctl(&e, &["get", "big"])), "");
    // flotilla cluster status names every member and one leader.
    let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["cluster", "status", "--server", &e])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches(" leader ").count(), 1, "{text}");
    for m in &c.members {
        assert!(text.contains(&m.name));
    }
}

/// Puts keys `prefix-0..n` one at a time through any member; returns those acknowledged.
fn write_keys(endpoints: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|k| etcdctl(endpoints, &["put", k, "v"]).status.success())
        .collect()
}

fn assert_all_readable(c: &Cluster, keys: &[String]) {
    for m in c.members.iter().filter(|m| m.child.is_some()) {
        for k in keys {
            eventually(&format!("{k} readable from {}", m.name), || {
                let out = etcdctl(
                    &m.client,
                    &["get", k, "--consistency=s", "--print-value-only"],
                );
                out.status.success() && out.stdout == b"v\n"
            });
        }
    }
}

#[test]
fn kill9_of_the_leader_and_of_the_whole_cluster_loses_no_acknowledged_write() {
    let mut c = Cluster::start();
    let e = c.endpoints();
    let mut acked = write_keys(&e, "before", 10);
    assert_eq!(acked.len(), 10);
    let l = c.leader();
    c.members[l].kill9();
    let started = Instant::now();
    let after = write_keys(&e, "after", 10);
    eprintln!(
        "10 writes after the leader's kill -9 took {:?}",
        started.elapsed()
    );
    assert!(!after.is_empty(), "writes continue without the old leader");
    acked.extend(after);
    let initial = c.initial.clone();
    c.members[l].start(&initial);
    assert_all_readable(&c, &acked);
    // The whole cluster killed with -9 and restarted from its data dirs.
    for m in &mut c.members {
        m.kill9();
    }
    for m in &mut c.members {
        m.start(&initial);
    }
    for m in &c.members {
        c.wait_healthy(&m.client);
    }
    assert_all_readable(&c, &acked);
}

fn run_server(dir: &Path, name: &str, peer: &str, client: &str, initial: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["server", "--name", name, "--data-dir"])
        .arg(dir)
        .args([
            "--client-addr",
            client,
            "--peer-addr",
            peer,
            "--initial-cluster",
            initial,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_conflicting_restart_is_refused_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("solo");
    let (peer, client) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let initial = format!("solo={peer}");
    let child = run_server(&data, "solo", &peer, &client, &initial);
    let guard = Member {
        name: "solo".into(),
        client: client.clone(),
        peer: peer.clone(),
        dir: data.clone(),
        child: Some(child),
        extra: Vec::new(),
        env: Vec::new(),
    };
    eventually("the single member serves", || {
        etcdctl(&client, &["put", "k", "v"]).status.success()
    });
    let mut guard = guard;
    let child = guard.child.take().unwrap();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "SIGTERM exits cleanly: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let other = format!("{initial},intruder=127.0.0.1:{}", free_port());
    let out = run_server(&data, "solo", &peer, &client, &other)
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("--initial-cluster"),
        "{err}"
    );

    let out = run_server(
        &data,
        "impostor",
        &peer,
        &client,
        &format!("impostor={peer}"),
    )
    .wait_with_output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to member `solo`"));
}

/// `etcdctl member add --learner`, start the new member with `--initial-cluster-state
/// existing`, `member promote` once it has caught up, `member remove` of another member, and
/// the cluster keeps serving writes throughout.
#[test]
fn membership_changes_through_etcdctl() {
    let mut c = Cluster::start();
    let e = c.endpoints();
    ok(etcdctl(&e, &["put", "before", "v"]));
    let peer = format!("127.0.0.1:{}", free_port());
    let out = ok(etcdctl(
        &e,
        &[
            "member",
            "add",
            "n4",
            &format!("--peer-urls=http://{peer}"),
            "--learner",
        ],
    ));
    // "Member <id> added to cluster <cluster id>"
    let id = out
        .split_whitespace()
        .nth(1)
        .expect("the new member's id")
        .to_string();
    let mut n4 = Member {
        name: "n4".into(),
        client: format!("127.0.0.1:{}", free_port()),
        peer: peer.clone(),
        dir: c.dir.path().join("n4"),
        child: None,
        extra: Vec::new(),
        env: Vec::new(),
    };
    let joined = format!("{},n4={peer}", c.initial);
    let log = std::fs::File::create(n4.dir.with_extension("log")).unwrap();
    n4.child = Some(
        Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["server", "--name", "n4", "--data-dir"])
            .arg(&n4.dir)
            .args(["--client-addr", &n4.client, "--peer-addr", &peer])
            .args([
                "--initial-cluster",
                &joined,
                "--initial-cluster-state",
                "existing",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    eventually("n4 is listed as a started learner", || {
        let list = ok(etcdctl(&e, &["member", "list"]));
        list.lines()
            .any(|l| l.starts_with(&id) && l.contains(", started, n4,") && l.ends_with(", true"))
    });
    eventually("the learner is promoted once caught up", || {
        etcdctl(&e, &["member", "promote", &id]).status.success()
    });
    let list = ok(etcdctl(&e, &["member", "list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.ends_with(", false")),
        "{list}"
    );
    // Remove a follower that is not n4, and stop it.
    let l = c.leader();
    let victim = (0..3).find(|i| *i != l).unwrap();
    let status: serde_json::Value = serde_json::from_str(&ok(etcdctl(
        &c.members[victim].client,
        &["endpoint", "status", "-w", "json"],
    )))
    .unwrap();
    let victim_id = format!(
        "{:x}",
        status[0]["Status"]["header"]["member_id"].as_u64().unwrap()
    );
    ok(etcdctl(&e, &["member", "remove", &victim_id]));
    c.members[victim].kill9();
    let remaining: Vec<String> = c
        .members
        .iter()
        .filter(|m| m.child.is_some())
        .map(|m| m.client.clone())
        .chain([n4.client.clone()])
        .collect();
    let remaining = remaining.join(",");
    ok(etcdctl(&remaining, &["put", "after", "v"]));
    let list = ok(etcdctl(&remaining, &["member", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(!list.contains(&victim_id), "{list}");
    eventually("n4 has every write", || {
        let out = etcdctl(
            &n4.client,
            &["get", "after", "--consistency=s", "--print-value-only"],
        );
        out.status.success() && out.stdout == b"v\n"
    });
}

/// `--quota-backend-bytes`: once the key space outgrows it, etcdctl's puts are refused with
/// etcd's words, `etcdctl alarm list` shows NOSPACE, gets and deletes still work, and
/// `etcdctl alarm disarm` lifts it.
#[test]
fn a_key_space_over_its_quota_refuses_puts_as_etcd_does() {
    let c = Cluster::start_with(&["--quota-backend-bytes", "4194304"]);
    let ep = c.endpoints();
    let value = "v".repeat(100 * 1024);
    let mut refused = None;
    let deadline = std::time::Instant::now() + common::DEADLINE;
    for i in 0.. {
        let out = etcdctl(&ep, &["put", &format!("big/{i}"), &value]);
        if !out.status.success() {
            refused = Some(String::from_utf8_lossy(&out.stderr).to_string());
            break;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
    }
    let refused = refused.expect("puts are refused once over the quota");
    assert!(
        refused.contains("etcdserver: mvcc: database space exceeded"),
        "{refused}"
    );
    let alarms = ok(etcdctl(&ep, &["alarm", "list"]));
    assert!(alarms.contains("alarm:NOSPACE"), "{alarms}");
    assert_eq!(
        ok(etcdctl(&ep, &["get", "big/0", "--print-value-only"])).trim(),
        value
    );
    ok(etcdctl(&ep, &["del", "--prefix", "big/"]));
    let disarmed = ok(etcdctl(&ep, &["alarm", "disarm"]));
    assert!(disarmed.contains("alarm:NOSPACE"), "{disarmed}");
}

/// The robustness probe's read storm (issue 42): concurrent full-key-space ranges over
/// 50,000 keys of 1 KB, sent to the leader, change neither the leader nor the term; answers
/// are cut at `--max-range-response-bytes` with `more` set.
#[test]
fn a_read_storm_moves_no_leader() {
    use flotilla_proto::etcdserverpb::kv_client::KvClient;
    use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
    const KEYS: usize = 50_000;
    let c = Cluster::start();
    let leader = c.leader();
    let status = |m: &Member| -> (u64, u64) {
        let out = etcdctl(&m.client, &["endpoint", "status", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let s = &v[0]["Status"];
        (
            s["leader"].as_u64().unwrap_or(0),
            s["header"]["raft_term"].as_u64().unwrap_or(0),
        )
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = format!("http://{}", c.members[leader].client);
    let reads = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(addr)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let value = vec![b'v'; 1000];
        let writers = (0..32).map(|w| {
            let (mut kv, value) = (KvClient::new(channel.clone()), value.clone());
            tokio::spawn(async move {
                for i in (w..KEYS).step_by(32) {
                    kv.put(PutRequest {
                        key: format!("storm/{i:05}").into_bytes(),
                        value: value.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
            })
        });
        for w in futures::future::join_all(writers).await {
            w.unwrap();
        }
        let before = status(&c.members[leader]);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(6);
        let readers = (0..4).map(|_| {
            let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(256 << 20);
            tokio::spawn(async move {
                let mut reads = 0;
                while std::time::Instant::now() < until {
                    let r = kv
                        .range(RangeRequest {
                            key: b"storm/".to_vec(),
                            range_end: b"storm0".to_vec(),
                            ..Default::default()
                        })
                        .await;
                    if let Ok(r) = r {
                        let r = r.into_inner();
                        assert!(r.more && r.count == KEYS as i64);
                        reads += 1;
                    }
                }
                reads
            })
        });
        let reads: usize = futures::future::join_all(readers)
            .await
            .into_iter()
            .map(|r| r.unwrap())
            .sum();
        (before, reads)
    });
    let (before, reads) = reads;
    assert!(reads > 0);
    for m in &c.members {
        assert_eq!(
            status(m),
            before,
            "{}: the read storm moved the leader",
            m.name
        );
    }
}
