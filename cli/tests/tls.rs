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
        Self::start_with(|_, _| vec![])
    }

    /// A cluster whose member `name` also gets `extra(pki, name)`'s flags.
    fn start_with(extra: impl Fn(&Path, &str) -> Vec<String>) -> Self {
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
                m.extra.extend(extra(&pki, n));
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

    /// A Flotilla client of the first member as `user` of the PKI (it fails over only
    /// when that member is down, so every request lands where its audit line is).
    fn client(&self, user: &str) -> flotilla_client::Client {
        let f = |s: String| self.pki.join(s);
        let dialer = flotilla_transport::Dialer::from_files(
            &f("ca.crt".into()),
            Some((&f(format!("{user}.crt")), &f(format!("{user}.key")))),
        )
        .unwrap();
        flotilla_client::Client::with_dialer(&[&self.members[0].client], &dialer).unwrap()
    }

    /// Writes a kubeconfig for `user` of the PKI naming `servers` (comma-separated) and
    /// returns its path.
    fn kubeconfig(&self, user: &str, servers: &str) -> String {
        let text = ok(flotilla(&[
            "certs",
            "kubeconfig",
            "--dir",
            &self.pki.to_string_lossy(),
            "--user",
            user,
            "--server",
            servers,
        ]));
        let path = self.dir.path().join(format!("{user}.kubeconfig"));
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// A client of the first member with bearer token `token` and no certificate.
    fn token_client(&self, token: &str) -> flotilla_client::Client {
        let dialer = flotilla_transport::Dialer::from_files(&self.pki.join("ca.crt"), None)
            .unwrap()
            .with_token(token);
        flotilla_client::Client::with_dialer(&[&self.members[0].client], &dialer).unwrap()
    }

    /// Starts the agent of node `node` with `runtime`, dialing with `kubeconfig`, serving
    /// its port on `logs_addr`; its log is `DIR/NODE.log`. Killed when dropped.
    fn agent(&self, node: &str, runtime: &str, kubeconfig: &str, logs_addr: &str) -> KillOnDrop {
        let log = std::fs::File::create(self.dir.path().join(format!("{node}.log"))).unwrap();
        let agent = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["agent", "--runtime", runtime, "--node-name", node])
            .args(["--kubeconfig", kubeconfig, "--logs-addr", logs_addr])
            .arg("--data-dir")
            .arg(self.dir.path().join(node))
            .env_remove("KUBECONFIG")
            .stderr(log)
            .spawn()
            .unwrap();
        KillOnDrop(agent)
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
    let kc = c.kubeconfig("admin", &servers.join(","));
    let kubeconfig = std::path::PathBuf::from(&kc);

    let namespaces = ok(flotilla(&["get", "namespaces", "--kubeconfig", &kc]));
    assert!(namespaces.contains("default"), "{namespaces}");
    // KUBECONFIG works as --kubeconfig does.
    // Each member publishes its client URL once it has joined (as etcd's members publish
    // their attributes), moments after it serves: poll until all three show.
    let mut status = String::new();
    eventually(
        "cluster status shows every member's https client URL",
        || {
            let out = Command::new(env!("CARGO_BIN_EXE_flotilla"))
                .args(["cluster", "status"])
                .env("KUBECONFIG", &kubeconfig)
                .output()
                .unwrap();
            status = ok(out);
            c.members
                .iter()
                .all(|m| status.contains(&format!("https://{}", m.client)))
        },
    );
    assert!(status.contains("leader:"), "{status}");
    // The first server down: the CLI fails over along the kubeconfig's list.
    c.members[0].kill9();
    let namespaces = ok(flotilla(&["get", "namespaces", "--kubeconfig", &kc]));
    assert!(namespaces.contains("default"), "{namespaces}");
    // Without the kubeconfig, the same servers refuse the CLI.
    let plain = flotilla(&["get", "namespaces", "--server", &servers[1..].join(",")]);
    assert!(!plain.status.success());
    // ... and say what to do about it.
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        err.contains("use a kubeconfig with the cluster's CA"),
        "{err}"
    );
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
    let kubeconfig = |user: &str| std::path::PathBuf::from(c.kubeconfig(user, &servers.join(",")));
    let (w1, admin) = (kubeconfig("w1"), kubeconfig("admin"));
    certs(&c.pki, &["issue", "--name", "alice", "--kind", "user"]);
    let logs_addr = format!("127.0.0.1:{}", common::free_port());
    let _agent = c.agent("w1", "fake", &w1.to_string_lossy(), &logs_addr);
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

#[test]
fn each_identity_may_do_only_what_kubernetes_lets_it() {
    use flotilla_client::Client;
    use flotilla_proto::api::{Deployment, Node, ObjectMeta, Pod, PodSpec, PodStatus, Resource};
    use flotilla_transport::Dialer;
    use tonic::Code;

    let c = TlsCluster::start_with(|pki, member| {
        let tokens = pki.join("tokens.csv");
        std::fs::write(
            &tokens,
            "# token,user,uid,groups\n\
             bob-token,bob,1002,\"ops,system:masters\"\n\
             carol-token,carol,1003,dev\n",
        )
        .unwrap();
        let audit = pki.join(format!("{member}-audit.log"));
        vec![
            "--token-auth-file".into(),
            tokens.to_string_lossy().into_owned(),
            "--audit-log-path".into(),
            audit.to_string_lossy().into_owned(),
        ]
    });
    certs(&c.pki, &["issue", "--name", "alice", "--kind", "user"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let first = [c.members[0].client.clone()];
    let ca = c.pki.join("ca.crt");
    let with_token = |token: &str| c.token_client(token);
    let (admin, w1, alice) = (c.client("admin"), c.client("w1"), c.client("alice"));
    let denied = |r: Result<(), flotilla_client::ClientError>| -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        e.status.message().to_string()
    };
    let node = |name: &str| Node {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod_on = |name: &str, node: &str| Pod {
        metadata: Some(ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            node_name: node.into(),
            containers: vec![flotilla_proto::api::Container {
                name: "main".into(),
                image: "busybox".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };

    // The administrator sets the scene; node w1 registers itself.
    rt.block_on(async {
        admin.create(&node("w2")).await.unwrap();
        admin.create(&pod_on("mine", "w1")).await.unwrap();
        admin.create(&pod_on("theirs", "w2")).await.unwrap();
        w1.create(&node("w1")).await.unwrap();
    });

    // Node w1: its own pods' status, yes; another node, another node's pods, a
    // Deployment, no, in Kubernetes' words.
    let running = |mut pod: Pod| {
        pod.status = Some(PodStatus {
            phase: "Running".into(),
            ..Default::default()
        });
        pod
    };
    rt.block_on(async {
        let mine: Pod = w1.get("default", "mine").await.unwrap();
        w1.update_status(&running(mine)).await.unwrap();
        let theirs: Pod = w1.get("default", "theirs").await.unwrap();
        let msg = denied(w1.update_status(&running(theirs)).await.map(|_| ()));
        assert_eq!(
            msg,
            "pods \"theirs\" is forbidden: node \"w1\" can only update or delete pods with \
             spec.nodeName set to itself"
        );
        let msg = denied(
            w1.delete_named::<Pod>("default", "theirs")
                .await
                .map(|_| ()),
        );
        assert!(msg.contains("node \"w1\" can only"), "{msg}");
        let w2: Node = w1.get("", "w2").await.unwrap();
        let msg = denied(w1.update_status(&w2).await.map(|_| ()));
        assert_eq!(
            msg,
            "nodes/status \"w2\" is forbidden: User \"system:node:w1\" cannot update \
             resource \"nodes/status\" in API group \"\" at the cluster scope"
        );
        let deployment = deployment("default");
        let msg = denied(w1.create(&deployment).await.map(|_| ()));
        assert_eq!(
            msg,
            "deployments \"web\" is forbidden: User \"system:node:w1\" cannot create resource \
             \"deployments\" in API group \"apps\" in the namespace \"default\""
        );
        // The stored objects are as the administrator left them.
        let theirs: Pod = admin.get("default", "theirs").await.unwrap();
        assert!(theirs.status.is_none_or(|s| s.phase != "Running"));
        let mine: Pod = admin.get("default", "mine").await.unwrap();
        assert_eq!(mine.status.unwrap().phase, "Running");
        assert!(admin.get::<Deployment>("default", "web").await.is_err());
    });

    // A user with no binding may do nothing, whether by certificate or by token.
    rt.block_on(async {
        let msg = denied(
            alice
                .delete_named::<Pod>("default", "mine")
                .await
                .map(|_| ()),
        );
        assert_eq!(
            msg,
            "pods \"mine\" is forbidden: User \"alice\" cannot delete resource \"pods\" in API \
             group \"\" in the namespace \"default\""
        );
        let carol = with_token("carol-token");
        let msg = denied(carol.get::<Pod>("default", "mine").await.map(|_| ()));
        assert!(
            msg.starts_with("pods \"mine\" is forbidden: User \"carol\""),
            "{msg}"
        );
        // A token in system:masters may; an unknown token and no identity at all may not.
        let bob = with_token("bob-token");
        let pod: Pod = bob.get("default", "mine").await.unwrap();
        assert_eq!(pod.name(), "mine");
        for (who, client) in [
            ("an unknown token", with_token("guess")),
            (
                "no identity",
                Client::with_dialer(&first, &Dialer::from_files(&ca, None).unwrap()).unwrap(),
            ),
        ] {
            let e = client.get::<Pod>("default", "mine").await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{who}: {e}");
        }
    });

    // The etcd face is for system:masters only.
    let out = c.etcdctl(
        &c.members[0],
        &c.user("w1"),
        &["get", "/registry", "--prefix"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    ok(c.etcdctl(
        &c.members[0],
        &c.admin(),
        &["get", "/registry", "--prefix", "--keys-only"],
    ));

    // The audit log has a line for each decision, in Kubernetes' Event shape.
    let audit = c.pki.join("n1-audit.log");
    let mut events: Vec<serde_json::Value> = vec![];
    let find = |events: &[serde_json::Value], user: &str, verb: &str, code: u64| {
        events
            .iter()
            .find(|e| {
                e["user"]["username"] == user
                    && e["verb"] == verb
                    && e["responseStatus"]["code"] == code
            })
            .cloned()
    };
    eventually("the audit log has every decision", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        events = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect();
        find(&events, "system:node:w1", "create", 403).is_some()
            && find(&events, "alice", "delete", 403).is_some()
            && find(&events, "system:node:w1", "update", 200).is_some()
            && find(&events, "admin", "create", 201).is_some()
            && find(&events, "bob", "get", 200).is_some()
            && events.iter().any(|e| e["responseStatus"]["code"] == 401)
    });
    let e = find(&events, "system:node:w1", "create", 403).unwrap();
    assert_eq!(e["apiVersion"], "audit.k8s.io/v1");
    assert_eq!(e["kind"], "Event");
    assert_eq!(e["level"], "Metadata");
    assert_eq!(e["annotations"]["authorization.k8s.io/decision"], "forbid");
    assert_eq!(e["objectRef"]["resource"], "deployments");
    assert_eq!(e["objectRef"]["apiGroup"], "apps");
    assert_eq!(e["objectRef"]["namespace"], "default");
    assert_eq!(e["objectRef"]["name"], "web");
    assert_eq!(
        e["requestURI"],
        "/apis/apps/v1/namespaces/default/deployments/web"
    );
    assert_eq!(e["sourceIPs"][0], "127.0.0.1");
    assert!(
        e["user"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "system:nodes")
    );
    let e = find(&events, "bob", "get", 200).unwrap();
    assert_eq!(e["user"]["uid"], "1002");
    assert_eq!(e["annotations"]["authorization.k8s.io/decision"], "allow");
    let ok_etcd = events
        .iter()
        .any(|e| e["verb"] == "Range" && e["user"]["username"] == "admin");
    assert!(ok_etcd, "the etcd face's requests are audited too");

    // `flotilla auth can-i` answers from the same code, as kubectl words it.
    let kubeconfig = |user: &str| c.kubeconfig(user, &first[0]);
    let can_i = |kc: &str, args: &[&str]| -> (bool, String) {
        let out = flotilla(&[&["auth", "can-i", "--kubeconfig", kc], args].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (
            out.status.success(),
            stdout + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (admin_kc, w1_kc, alice_kc) = (kubeconfig("admin"), kubeconfig("w1"), kubeconfig("alice"));
    assert_eq!(
        can_i(&admin_kc, &["create", "deployments"]),
        (true, "yes".into())
    );
    assert_eq!(can_i(&w1_kc, &["get", "pods", "-A"]), (true, "yes".into()));
    assert_eq!(
        can_i(&w1_kc, &["update", "nodes/w2", "--subresource", "status"]),
        (
            false,
            "no - nodes/status \"w2\" is forbidden: User \"system:node:w1\" cannot update \
             resource \"nodes/status\" in API group \"\" at the cluster scope"
                .into()
        )
    );
    let (yes, out) = can_i(&w1_kc, &["create", "deployments.apps", "-n", "shop"]);
    assert!(
        !yes && out.starts_with("no - deployments is forbidden"),
        "{out}"
    );
    // About someone else: for system:masters.
    let (yes, out) = can_i(&admin_kc, &["delete", "pods", "--as", "alice"]);
    assert!(
        !yes && out.contains("User \"alice\" cannot delete"),
        "{out}"
    );
    let as_node = ["--as", "system:node:w1", "--as-group", "system:nodes"];
    let (yes, out) = can_i(
        &admin_kc,
        &[
            &["patch", "leases/w1", "-n", "flotilla-node-lease"],
            &as_node[..],
        ]
        .concat(),
    );
    assert!(yes, "{out}");
    let (yes, out) = can_i(&alice_kc, &["get", "pods", "--as", "bob"]);
    assert!(!yes, "{out}");
    assert!(
        out.contains(
            "Error from server (Forbidden): subjectaccessreviews is forbidden: User \"alice\""
        ),
        "{out}"
    );
}

#[test]
fn role_bindings_grant_what_their_roles_say_and_no_more() {
    use flotilla_client::Client;
    use flotilla_proto::api::json::from_value;
    use flotilla_proto::api::{Namespace, Pod, RoleBinding};
    use serde_json::json;
    use tonic::Code;

    let c = TlsCluster::start_with(|pki, _| {
        let tokens = pki.join("tokens.csv");
        std::fs::write(&tokens, "carol-token,carol,1003,dev\n").unwrap();
        vec![
            "--token-auth-file".into(),
            tokens.to_string_lossy().into_owned(),
        ]
    });
    certs(&c.pki, &["issue", "--name", "alice", "--kind", "user"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let first = [c.members[0].client.clone()];
    let (admin, alice) = (c.client("admin"), c.client("alice"));
    let carol = c.token_client("carol-token");
    let code = |r: Result<(), flotilla_client::ClientError>| r.err().map(|e| e.code());
    let binding = |name: &str, kind: &str, who: &str, role: &str| -> RoleBinding {
        from_value(json!({
            "metadata": {"name": name, "namespace": "shop"},
            "subjects": [{"kind": kind, "name": who}],
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        }))
        .unwrap()
    };
    let deployment = deployment("shop");
    let list_pods = |client: &Client, ns: &str| {
        let req = flotilla_proto::api::ListRequest {
            namespace: ns.into(),
            ..Default::default()
        };
        rt.block_on(client.list::<Pod>(&req)).map(|_| ())
    };
    // The control plane made the default roles.
    let roles = ok(flotilla(&[
        "get",
        "clusterroles",
        "--server",
        &first[0],
        "--kubeconfig",
        &c.kubeconfig("admin", &first[0]),
    ]));
    for role in ["cluster-admin", "admin", "edit", "view"] {
        assert!(
            roles.lines().any(|l| l.starts_with(&format!("{role} "))),
            "{roles}"
        );
    }
    rt.block_on(
        admin.create(&from_value::<Namespace>(json!({"metadata": {"name": "shop"}})).unwrap()),
    )
    .unwrap();
    // No binding: nothing.
    assert_eq!(
        code(list_pods(&alice, "shop")),
        Some(Code::PermissionDenied)
    );
    // view for alice in shop: reads there, and nothing else.
    rt.block_on(admin.create(&binding("alice-view", "User", "alice", "view")))
        .unwrap();
    eventually("alice's binding is in force", || {
        list_pods(&alice, "shop").is_ok()
    });
    assert_eq!(
        code(list_pods(&alice, "default")),
        Some(Code::PermissionDenied)
    );
    let r = rt.block_on(alice.create(&deployment)).map(|_| ());
    assert_eq!(code(r), Some(Code::PermissionDenied));
    // She cannot grant herself more: writing bindings is for system:masters.
    let r = rt
        .block_on(alice.create(&binding("alice-edit", "User", "alice", "edit")))
        .map(|_| ());
    assert_eq!(code(r), Some(Code::PermissionDenied));
    // edit for group dev: carol (a token in group dev) creates a Deployment in shop.
    assert_eq!(
        code(rt.block_on(carol.create(&deployment)).map(|_| ())),
        Some(Code::PermissionDenied)
    );
    rt.block_on(admin.create(&binding("dev-edit", "Group", "dev", "edit")))
        .unwrap();
    eventually("the group's binding is in force", || {
        rt.block_on(carol.create(&deployment)).is_ok()
    });
    // An admin of shop grants inside what she holds, and no more.
    certs(&c.pki, &["issue", "--name", "olga", "--kind", "user"]);
    let olga = c.client("olga");
    rt.block_on(admin.create(&binding("olga-admin", "User", "olga", "admin")))
        .unwrap();
    eventually("olga's binding is in force", || {
        rt.block_on(olga.create(&binding("viewer", "User", "victor", "view")))
            .is_ok()
    });
    let e = rt
        .block_on(olga.create(&binding("root", "User", "olga", "cluster-admin")))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(
        e.status.message().starts_with(
            "rolebindings.rbac.authorization.k8s.io \"root\" is forbidden: user \"olga\""
        ) && e
            .status
            .message()
            .contains("attempting to grant RBAC permissions not currently held"),
        "{e}"
    );
    let nodes_role: flotilla_proto::api::Role = from_value(json!({
        "metadata": {"name": "node-reader", "namespace": "shop"},
        "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}],
    }))
    .unwrap();
    let e = rt.block_on(olga.create(&nodes_role)).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.status.message().contains("Resources:[\"nodes\"]"), "{e}");
    // Deleting the binding takes the rights away.
    rt.block_on(admin.delete_named::<RoleBinding>("shop", "alice-view"))
        .unwrap();
    eventually("alice's rights are gone", || {
        code(list_pods(&alice, "shop")) == Some(Code::PermissionDenied)
    });
}

#[test]
fn past_the_inflight_bound_a_client_is_told_to_come_back() {
    use flotilla_proto::api::{Event, ObjectMeta, ObjectReference};
    use flotilla_proto::flotilla_api_v1::events_client::EventsClient;

    let c =
        TlsCluster::start_with(|_, _| vec!["--max-mutating-requests-inflight".into(), "1".into()]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let event = |i: usize| Event {
        metadata: Some(ObjectMeta {
            name: format!("e{i}"),
            namespace: "default".into(),
            ..Default::default()
        }),
        involved_object: Some(ObjectReference {
            kind: "Node".into(),
            name: "w1".into(),
            ..Default::default()
        }),
        reason: "Probe".into(),
        ..Default::default()
    };
    // 64 creates at once on one connection, as `user`: how many were refused, and how.
    let burst = |user: &str, from: usize| -> Vec<tonic::Status> {
        let f = |s: String| c.pki.join(s);
        let dialer = flotilla_transport::Dialer::from_files(
            &f("ca.crt".into()),
            Some((&f(format!("{user}.crt")), &f(format!("{user}.key")))),
        )
        .unwrap();
        let endpoint = dialer.endpoint(&c.members[0].client).unwrap();
        rt.block_on(async {
            let client = EventsClient::new(endpoint.connect().await.unwrap());
            let calls = (from..from + 64).map(|i| {
                let mut client = client.clone();
                let e = event(i);
                async move { client.create(e).await }
            });
            futures::future::join_all(calls)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect()
        })
    };
    let refused = burst("w1", 0);
    assert!(!refused.is_empty(), "64 creates at once under a bound of 1");
    assert!(refused.len() < 64, "some were served");
    for s in &refused {
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
        assert_eq!(s.message(), "Too many requests, please try again later.");
        let hint = s.metadata().get("grpc-retry-pushback-ms").unwrap();
        assert_eq!(hint.to_str().unwrap(), "1000");
    }
    // system:masters is not held to it.
    let refused = burst("admin", 100);
    assert!(refused.is_empty(), "{refused:?}");
}

/// Deployment `web` in `namespace`.
fn deployment(namespace: &str) -> flotilla_proto::api::Deployment {
    flotilla_proto::api::json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "main", "image": "busybox"}]}}}
    }))
    .unwrap()
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pods_take_their_environment_from_configmaps_and_secrets_their_node_may_read() {
    use flotilla_client::api::json::from_value;
    use flotilla_proto::api::{ConfigMap, Pod, Secret};
    use serde_json::json;
    use tonic::Code;

    let c = TlsCluster::start();
    let servers: Vec<String> = c.members.iter().map(|m| m.client.clone()).collect();
    let w1_config = c.kubeconfig("w1", &servers.join(","));
    let admin_config = c.kubeconfig("admin", &servers.join(","));
    let logs_addr = format!("127.0.0.1:{}", common::free_port());
    let _agent = c.agent("w1", "process", &w1_config, &logs_addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_runtime = rt.enter();
    let (admin, w1) = (c.client("admin"), c.client("w1"));
    let cm: ConfigMap = from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app", "namespace": "default"},
        "data": {"greeting": "hello", "color": "blue"},
    }))
    .unwrap();
    rt.block_on(admin.create(&cm)).unwrap();
    for (name, password) in [("db", "hunter2"), ("other", "not-yours")] {
        let s: Secret = from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "stringData": {"password": password},
        }))
        .unwrap();
        rt.block_on(admin.create(&s)).unwrap();
    }
    let pod = |name: &str, secret: &str| -> Pod {
        from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"tier": "web"}},
            "spec": {"nodeName": "w1", "containers": [{
                "name": "main",
                "command": ["sh", "-c", "echo \"$GREETING|$DB_PASSWORD|$APP_color|$ME|$TIER|$MSG\"; sleep 3600"],
                "envFrom": [{"prefix": "APP_", "configMapRef": {"name": "app"}}],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting"}}},
                    {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
                    {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "TIER", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}}},
                    {"name": "MSG", "value": "$(GREETING) from $(ME)"},
                ],
            }]},
        }))
        .unwrap()
    };
    rt.block_on(admin.create(&pod("web", "db"))).unwrap();
    let mut logs = String::new();
    eventually("the pod runs with its environment", || {
        let out = flotilla(&["logs", "web", "--kubeconfig", &admin_config]);
        logs = String::from_utf8_lossy(&out.stdout).into_owned();
        !logs.is_empty()
    });
    assert_eq!(logs, "hello|hunter2|blue|web|web|hello from web\n");

    // The node reads what its pods name, by name only; nothing else.
    let s: Secret = rt.block_on(w1.get("default", "db")).unwrap();
    assert_eq!(s.data["password"], b"hunter2");
    let e = rt
        .block_on(w1.get::<Secret>("default", "other"))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = rt
        .block_on(w1.list::<Secret>(&flotilla_proto::api::ListRequest {
            namespace: "default".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // A Secret a pod mounts as a volume is referenced too.
    let e = rt
        .block_on(w1.get::<Secret>("default", "other"))
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let mounter: Pod = from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "mounter", "namespace": "default"},
        "spec": {"nodeName": "w1",
            "volumes": [{"name": "s", "secret": {"secretName": "other"}}],
            "containers": [{"name": "main", "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "s", "mountPath": "/run/flotilla-test-s"}]}]},
    }))
    .unwrap();
    rt.block_on(admin.create(&mounter)).unwrap();
    eventually("the node may read the mounted Secret", || {
        rt.block_on(w1.get::<Secret>("default", "other")).is_ok()
    });

    // A Secret that does not exist keeps the container from starting, saying which; once
    // it exists, the container starts.
    rt.block_on(admin.create(&pod("late", "late-secret")))
        .unwrap();
    let waiting = || -> Option<(String, String)> {
        let p: Pod = rt.block_on(admin.get("default", "late")).ok()?;
        let w = p
            .status?
            .container_statuses
            .first()?
            .state
            .clone()?
            .waiting?;
        Some((w.reason, w.message))
    };
    eventually("the pod waits for its Secret", || {
        waiting().is_some_and(|(r, _)| r == "CreateContainerConfigError")
    });
    assert_eq!(waiting().unwrap().1, "secret \"late-secret\" not found");
    let s: Secret = from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-secret", "namespace": "default"},
        "stringData": {"password": "at-last"},
    }))
    .unwrap();
    rt.block_on(admin.create(&s)).unwrap();
    eventually("the pod starts once its Secret exists", || {
        let out = flotilla(&["logs", "late", "--kubeconfig", &admin_config]);
        String::from_utf8_lossy(&out.stdout) == "hello|at-last|blue|late|web|hello from late\n"
    });
}
