//! A cluster with TLS on both ports, its certificates made by `flotilla certs`, probed as an
//! outsider would (issue 35): etcdctl with etcd's own flags, with and without a
//! certificate; the CLI through a kubeconfig; strangers at the peer port.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Member, eventually, initial_cluster, ok};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("FLOTILLA_SERVER")
        .output()
        .unwrap()
}

fn certs(dir: &Path, args: &[&str]) {
    let dir = dir.to_string_lossy();
    ok(flotilla(&[&["certs"], args, &["--dir", &dir]].concat()));
}

/// An administrator's certificate in `pki`: user `admin` in `system:masters`.
fn issue_admin(pki: &Path) {
    let args = [
        "issue",
        "--name",
        "admin",
        "--kind",
        "user",
        "--group",
        "system:masters",
    ];
    certs(pki, &args);
}

/// `flotilla server`'s TLS flags for member `name`, its certificate from `pki`, trusting
/// `ca` on both ports.
fn tls_flags(pki: &Path, name: &str, ca: &Path) -> Vec<String> {
    let f = |s: &str| pki.join(s).to_string_lossy().into_owned();
    let ca = ca.to_string_lossy().into_owned();
    let (cert, key) = (f(&format!("{name}.crt")), f(&format!("{name}.key")));
    [
        "--cert-file",
        &cert,
        "--key-file",
        &key,
        "--trusted-ca-file",
        &ca,
        "--client-cert-auth",
        "--peer-cert-file",
        &cert,
        "--peer-key-file",
        &key,
        "--peer-trusted-ca-file",
        &ca,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

struct TlsCluster {
    dir: tempfile::TempDir,
    pki: PathBuf,
    members: Vec<Member>,
}

impl TlsCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        certs(&pki, &["init"]);
        for n in ["n1", "n2", "n3"] {
            certs(&pki, &["issue", "--name", n, "--kind", "member"]);
        }
        issue_admin(&pki);
        certs(&pki, &["issue", "--name", "w1", "--kind", "agent"]);
        let mut members: Vec<Member> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| {
                let mut m = Member::new(n, dir.path().join(n));
                m.extra = tls_flags(&pki, n, &pki.join("ca.crt"));
                m
            })
            .collect();
        let initial = initial_cluster(&members);
        for m in &mut members {
            m.start(&initial);
        }
        let c = TlsCluster { dir, pki, members };
        for m in &c.members {
            eventually(&format!("{} serves linearizable reads", m.client), || {
                c.etcdctl(m, &c.admin(), &["get", "probe"]).status.success()
            });
        }
        c
    }

    fn file(&self, name: &str) -> String {
        self.pki.join(name).to_string_lossy().into_owned()
    }

    /// etcd's client flags for user `name` of this cluster's PKI.
    fn user(&self, name: &str) -> Vec<String> {
        vec![
            "--cacert".into(),
            self.file("ca.crt"),
            "--cert".into(),
            self.file(&format!("{name}.crt")),
            "--key".into(),
            self.file(&format!("{name}.key")),
        ]
    }

    fn admin(&self) -> Vec<String> {
        self.user("admin")
    }

    fn etcdctl(&self, m: &Member, creds: &[String], args: &[&str]) -> Output {
        let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
        common::etcdctl(
            &format!("https://{}", m.client),
            &[&creds[..], args].concat(),
        )
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].dir.with_extension("log")).unwrap_or_default()
    }

    /// The Raft term member `i` reports.
    fn term(&self, i: usize) -> u64 {
        let out = ok(self.etcdctl(
            &self.members[i],
            &self.admin(),
            &["endpoint", "status", "-w", "json"],
        ));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0]["Status"]["header"]["raft_term"].as_u64().unwrap()
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in &self.members {
                common::print_log_tail(&m.dir.with_extension("log"));
            }
        }
    }
}

#[test]
fn etcdctl_needs_a_certificate_from_the_clusters_ca() {
    let c = TlsCluster::start();
    let m = &c.members[0];
    ok(c.etcdctl(m, &c.admin(), &["put", "k", "v"]));
    let got = ok(c.etcdctl(m, &c.admin(), &["get", "k", "--print-value-only"]));
    assert_eq!(got.trim(), "v");
    let list = ok(c.etcdctl(m, &c.admin(), &["member", "list"]));
    for m in &c.members {
        assert!(list.contains(&format!("https://{}", m.client)), "{list}");
        assert!(list.contains(&format!("https://{}", m.peer)), "{list}");
    }

    // No certificate, another CA's certificate, plaintext: all refused.
    let anonymous = c.etcdctl(m, &["--cacert".into(), c.file("ca.crt")], &["get", "k"]);
    assert!(
        !anonymous.status.success(),
        "served a client without a certificate"
    );
    let other = c.dir.path().join("other-pki");
    certs(&other, &["init"]);
    issue_admin(&other);
    let f = |s: &str| other.join(s).to_string_lossy().into_owned();
    let stranger = vec![
        "--cacert".into(),
        c.file("ca.crt"),
        "--cert".into(),
        f("admin.crt"),
        "--key".into(),
        f("admin.key"),
    ];
    let out = c.etcdctl(m, &stranger, &["get", "k"]);
    assert!(!out.status.success(), "served another CA's certificate");
    let plain = common::etcdctl(&m.client, &["get", "k"]);
    assert!(!plain.status.success(), "served plaintext");
    // The client checks the server too: trusting another CA, it refuses this cluster.
    let naive = vec![
        "--cacert".into(),
        f("ca.crt"),
        "--cert".into(),
        f("admin.crt"),
        "--key".into(),
        f("admin.key"),
    ];
    assert!(!c.etcdctl(m, &naive, &["get", "k"]).status.success());
    eventually("the refusals in the member's log", || {
        c.log(0).contains("refused a connection on the client port")
    });
}

#[test]
fn the_cli_reads_its_servers_and_certificate_from_a_kubeconfig() {
    let mut c = TlsCluster::start();
    let servers: Vec<String> = c.members.iter().map(|m| m.client.clone()).collect();
    let out = ok(flotilla(&[
        "certs",
        "kubeconfig",
        "--dir",
        &c.pki.to_string_lossy(),
        "--user",
        "admin",
        "--server",
        &servers.join(","),
    ]));
    let kubeconfig = c.dir.path().join("admin.kubeconfig");
    std::fs::write(&kubeconfig, out).unwrap();
    let kc = kubeconfig.to_string_lossy().into_owned();

    let namespaces = ok(flotilla(&["get", "namespaces", "--kubeconfig", &kc]));
    assert!(namespaces.contains("default"), "{namespaces}");
    // KUBECONFIG works as --kubeconfig does.
    let status = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["cluster", "status"])
        .env("KUBECONFIG", &kubeconfig)
        .output()
        .unwrap();
    let status = ok(status);
    assert!(status.contains("leader:"), "{status}");
    for m in &c.members {
        assert!(
            status.contains(&format!("https://{}", m.client)),
            "{status}"
        );
    }
    // The first server down: the CLI fails over along the kubeconfig's list.
    c.members[0].kill9();
    let namespaces = ok(flotilla(&["get", "namespaces", "--kubeconfig", &kc]));
    assert!(namespaces.contains("default"), "{namespaces}");
    // Without the kubeconfig, the same servers refuse the CLI.
    let plain = flotilla(&["get", "namespaces", "--server", &servers[1..].join(",")]);
    assert!(!plain.status.success());
}

#[test]
fn strangers_at_the_peer_port_neither_join_nor_disturb() {
    let c = TlsCluster::start();
    let term = c.term(0);
    let other = c.dir.path().join("other-pki");
    certs(&other, &["init"]);
    certs(&other, &["issue", "--name", "rogue", "--kind", "member"]);

    // A would-be member that knows the cluster's CA but holds another CA's certificate, and
    // one with a node's certificate from the cluster's own CA. Each is added to the cluster
    // first (as an administrator would), so that only the certificate check keeps it out:
    // it tries to join through n1 and is refused at the handshake.
    let rogues = [("rogue", other.clone()), ("w1", c.pki.clone())];
    for (name, pki) in &rogues {
        let mut m = Member::new(name, c.dir.path().join(format!("{name}-data")));
        let peer_url = format!("--peer-urls=https://{}", m.peer);
        let added = ok(c.etcdctl(
            &c.members[0],
            &c.admin(),
            &["member", "add", name, &peer_url],
        ));
        let id = added
            .split_whitespace()
            .nth(1)
            .unwrap_or_else(|| panic!("no member id in {added:?}"))
            .to_string();
        m.extra = tls_flags(pki, name, &c.pki.join("ca.crt"));
        m.extra
            .extend(["--initial-cluster-state".into(), "existing".into()]);
        let initial = format!("{name}={},n1={}", m.peer, c.members[0].peer);
        m.start(&initial);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = m.child.as_mut().unwrap().try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{name} is still trying to join");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(!status.success(), "{name} joined");
        ok(c.etcdctl(&c.members[0], &c.admin(), &["member", "remove", &id]));
    }
    let log = c.log(0);
    assert!(
        log.contains("refused a connection on the peer port"),
        "n1 logged no refusal:\n{log}"
    );
    assert!(
        log.contains("\"system:node:w1\") is not a member's"),
        "n1 did not say why it refused the node's certificate:\n{log}"
    );
    // Nothing moved: the same term, three members, writes still go through.
    assert_eq!(c.term(0), term);
    let list = ok(c.etcdctl(&c.members[0], &c.admin(), &["member", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    ok(c.etcdctl(&c.members[1], &c.admin(), &["put", "after", "strangers"]));
}

/// An agent started with a node's kubeconfig: it registers through TLS as
/// `system:node:w1`, serves its own port with that certificate, and gives logs only to
/// members and administrators.
#[test]
fn an_agent_serves_its_port_with_its_nodes_certificate() {
    use flotilla_proto::api::{Node, PodLogsRequest};
    use flotilla_proto::flotilla_agent_v1::agent_client::AgentClient;

    let c = TlsCluster::start();
    let servers: Vec<String> = c.members.iter().map(|m| m.client.clone()).collect();
    let pki = c.pki.to_string_lossy().into_owned();
    let kubeconfig = |user: &str| {
        let text = ok(flotilla(&[
            "certs",
            "kubeconfig",
            "--dir",
            &pki,
            "--user",
            user,
            "--server",
            &servers.join(","),
        ]));
        let path = c.dir.path().join(format!("{user}.kubeconfig"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let (w1, admin) = (kubeconfig("w1"), kubeconfig("admin"));
    certs(&c.pki, &["issue", "--name", "alice", "--kind", "user"]);
    let log = std::fs::File::create(c.dir.path().join("w1.log")).unwrap();
    let logs_addr = format!("127.0.0.1:{}", common::free_port());
    let agent = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "agent",
            "--runtime",
            "fake",
            "--node-name",
            "w1",
            "--kubeconfig",
        ])
        .arg(&w1)
        .args(["--logs-addr", &logs_addr])
        .arg("--data-dir")
        .arg(c.dir.path().join("w1"))
        .env_remove("KUBECONFIG")
        .stderr(log)
        .spawn()
        .unwrap();
    let _agent = KillOnDrop(agent);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let admin = flotilla_client::kubeconfig::load(&admin).unwrap();
    let client = flotilla_client::Client::with_dialer(&admin.servers, &admin.dialer).unwrap();
    let mut endpoint = String::new();
    eventually("node w1 registered with its agent's endpoint", || {
        let node: Option<Node> = rt.block_on(client.get::<Node>("", "w1")).ok();
        endpoint = node
            .and_then(|n| n.metadata)
            .and_then(|m| {
                m.annotations
                    .get(flotilla_node_agent::AGENT_ENDPOINT)
                    .cloned()
            })
            .unwrap_or_default();
        !endpoint.is_empty()
    });
    assert_eq!(endpoint, format!("https://{logs_addr}"));
    let ask = |user: &str| -> Result<(), tonic::Status> {
        let f = |s: &str| c.pki.join(s);
        let dialer = flotilla_transport::Dialer::from_files(
            &f("ca.crt"),
            Some((&f(&format!("{user}.crt")), &f(&format!("{user}.key")))),
        )
        .unwrap();
        rt.block_on(async {
            let channel = dialer.endpoint(&endpoint).unwrap().connect().await;
            let channel = channel.unwrap_or_else(|e| panic!("the agent's port: {e:?}"));
            AgentClient::new(channel)
                .logs(PodLogsRequest {
                    uid: "no-such-pod".into(),
                    container: "main".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
        })
    };
    let denied = ask("alice").unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("\"alice\""), "{denied:?}");
    let denied = ask("w1").unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    // A member and an administrator get past the check (to "no such container").
    for user in ["n1", "admin"] {
        if let Err(s) = ask(user) {
            assert_ne!(s.code(), tonic::Code::PermissionDenied, "{user}: {s:?}");
        }
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
