//! `flotilla up`: the embedded default. A three-member control plane and one agent (process
//! runtime) on this machine, in the foreground, with their data in one folder; progress
//! until the cluster is ready; Ctrl-C stops everything, pods included. Run again, it
//! resumes from its data.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use flotilla_client::Client;
use flotilla_proto::api::{Namespace, Node};
use tokio::process::{Child, Command};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Where the members and the agent keep their data (and logs, in `logs/`).
    #[arg(long, env = "FLOTILLA_DATA_DIR", default_value = "./flotilla-data")]
    pub data_dir: PathBuf,
    /// The first member's client port; members use this and the next five ports (client,
    /// peer pairs).
    #[arg(long, default_value_t = 7379)]
    pub base_port: u16,
    /// The agent's node name.
    #[arg(long, default_value = "local")]
    pub node_name: String,
    /// Start no agent (a control plane only).
    #[arg(long)]
    pub no_agent: bool,
    /// The agent's runtime.
    #[arg(long, value_enum, default_value = "process")]
    pub runtime: crate::agent::RuntimeKind,
}

struct Proc {
    name: String,
    log: PathBuf,
    child: Child,
}

fn spawn(exe: &Path, name: &str, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    // Its own process group: Ctrl-C reaches `up`, which stops the others in order.
    cmd.process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        log: log.to_path_buf(),
        child,
    })
}

fn signal(p: &Proc, sig: i32) {
    if let Some(pid) = p.child.id() {
        // SAFETY: kill(2) on a child this process started; no memory is shared.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

/// The cluster's PKI in `DATA/pki`, made on the first `up` and reused after: the CA, a
/// member certificate for each member (n1, n2, n3: serving the client port, and both ends
/// of the peer port's mutual TLS), the agent's node certificate, and `admin` in
/// `system:masters`. Kubeconfigs for the administrator and the agent are written next to
/// it each time (the servers may have moved with --base-port).
struct Pki {
    dir: PathBuf,
    admin_kubeconfig: PathBuf,
    agent_kubeconfig: PathBuf,
    admin: flotilla_transport::Dialer,
}

impl Pki {
    fn ensure(data: &Path, node_name: &str, servers: &[String]) -> anyhow::Result<Pki> {
        use crate::certs::{self, Kind, LeafSpec};
        let dir = data.join("pki");
        let ca = if dir.join("ca.crt").exists() {
            certs::Ca::load(&dir)?
        } else {
            certs::create_ca(&dir, certs::CA_DAYS, false)?
        };
        let leaf = |name: &str, kind: Kind, groups: &[&str]| -> anyhow::Result<certs::Issued> {
            let (cert, key) = certs::pair_paths(&dir, name);
            if cert.exists() && key.exists() {
                let read = |p: &Path| {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                };
                return Ok(certs::Issued {
                    cert_pem: read(&cert)?,
                    key_pem: read(&key)?,
                });
            }
            let spec = LeafSpec {
                name: name.to_string(),
                kind,
                ips: vec![],
                dns: vec![],
                groups: groups.iter().map(|g| g.to_string()).collect(),
                days: certs::LEAF_DAYS,
            };
            let issued = certs::issue(&ca, &spec)?;
            certs::write_pair(&dir, name, &issued, true)?;
            Ok(issued)
        };
        for i in 1..=3 {
            leaf(&format!("n{i}"), Kind::Member, &[])?;
        }
        let agent = leaf(node_name, Kind::Agent, &[])?;
        let admin = leaf("admin", Kind::User, &["system:masters"])?;
        let write = |name: &str, user: &str, issued: &certs::Issued| -> anyhow::Result<PathBuf> {
            let path = data.join(name);
            let text = certs::kubeconfig(ca.cert_pem(), user, issued, servers)?;
            certs::write_atomic(&path, text.as_bytes(), 0o600, true)?;
            Ok(path)
        };
        let admin_kubeconfig = write("admin.kubeconfig", "admin", &admin)?;
        let agent_kubeconfig = write(
            "agent.kubeconfig",
            &format!("{}{node_name}", certs::NODE_USER_PREFIX),
            &agent,
        )?;
        let admin = flotilla_transport::Dialer::tls(
            ca.cert_pem().as_bytes(),
            Some((admin.cert_pem.as_bytes(), admin.key_pem.as_bytes())),
        )?;
        Ok(Pki {
            dir,
            admin_kubeconfig,
            agent_kubeconfig,
            admin,
        })
    }

    /// A member's TLS flags: its certificate on both ports, clients' certificates required.
    fn member_flags(&self, name: &str) -> Vec<String> {
        let (cert, key) = crate::certs::pair_paths(&self.dir, name);
        let ca = self.dir.join("ca.crt");
        let [cert, key, ca] = [cert, key, ca].map(|p| p.to_string_lossy().into_owned());
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
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the flotilla binary")?;
    let data = &args.data_dir;
    let logs = data.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let resuming = data.join("n1").join("member.json").exists();
    let port = |i: u16| args.base_port + i;
    let initial = (0..3)
        .map(|i| format!("n{}=127.0.0.1:{}", i + 1, port(2 * i + 1)))
        .collect::<Vec<_>>()
        .join(",");
    let endpoints: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", port(2 * i)))
        .collect();
    for e in &endpoints {
        if std::net::TcpListener::bind(e).is_err() {
            bail!(
                "{e} is in use: another flotilla (or something else) listens there; stop it or pass --base-port"
            );
        }
    }
    println!(
        "{} a three-member control plane and an agent; data in {}",
        if resuming { "Resuming" } else { "Starting" },
        data.display()
    );
    if ["n1", "n2", "n3", "admin", "ca"].contains(&args.node_name.as_str()) {
        bail!(
            "--node-name {}: that name is taken by a member's or admin's certificate in {}",
            args.node_name,
            data.join("pki").display()
        );
    }
    let pki = Pki::ensure(data, &args.node_name, &endpoints)?;
    let mut procs = Vec::new();
    for i in 0..3u16 {
        let name = format!("n{}", i + 1);
        let mut a: Vec<String> = [
            "server",
            "--name",
            &name,
            "--data-dir",
            &data.join(&name).to_string_lossy(),
            "--client-addr",
            &endpoints[i as usize],
            "--peer-addr",
            &format!("127.0.0.1:{}", port(2 * i + 1)),
            "--initial-cluster",
            &initial,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(pki.member_flags(&name));
        procs.push(spawn(
            &exe,
            &format!("member {name}"),
            &a,
            &logs.join(format!("{name}.log")),
        )?);
    }
    let client = Client::with_dialer(&endpoints, &pki.admin).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let result = async {
        wait_for(&mut procs, "a leader and the API", started, || async {
            client.get::<Namespace>("", "default").await.is_ok()
        })
        .await?;
        if !args.no_agent {
            let a: Vec<String> = [
                "agent",
                "--kubeconfig",
                &pki.agent_kubeconfig.to_string_lossy(),
                "--node-name",
                &args.node_name,
                "--data-dir",
                &data.join("agent").to_string_lossy(),
                "--stop-containers-on-exit",
                "--runtime",
                match args.runtime {
                    crate::agent::RuntimeKind::Process => "process",
                    crate::agent::RuntimeKind::Docker => "docker",
                    crate::agent::RuntimeKind::Fake => "fake",
                },
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs.push(spawn(&exe, "agent", &a, &logs.join("agent.log"))?);
            let name = args.node_name.clone();
            wait_for(
                &mut procs,
                &format!("node {name} Ready"),
                started,
                || async {
                    client.get::<Node>("", &name).await.is_ok_and(|n| {
                        n.status.is_some_and(|s| {
                            s.conditions
                                .iter()
                                .any(|c| c.r#type == "Ready" && c.status == "True")
                        })
                    })
                },
            )
            .await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if let Err(e) = result {
        stop(&mut procs).await;
        return Err(e);
    }
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let kubeconfig = absolute(&pki.admin_kubeconfig);
    let found = if kubeconfig == absolute(Path::new(flotilla_client::kubeconfig::UP_KUBECONFIG)) {
        format!(
            "The CLI reads them from ./{} in this directory; elsewhere, export KUBECONFIG={}",
            flotilla_client::kubeconfig::UP_KUBECONFIG,
            kubeconfig.display()
        )
    } else {
        format!("For the CLI: export KUBECONFIG={}", kubeconfig.display())
    };
    println!(
        "\nFlotilla is up ({:.1} s). Servers (TLS only): {}\n\
         Your credentials (user admin, group system:masters): {}\n\
         {found}\n\n\
         Try:\n  flotilla cluster status\n  flotilla get nodes\n  flotilla apply -f examples/ticker.yaml\n  \
         flotilla get pods -w\n  flotilla logs POD\n  \
         etcdctl --endpoints https://{} --cacert {ca} --cert {cert} --key {key} member list\n\n\
         Logs in {}. Ctrl-C stops everything.",
        started.elapsed().as_secs_f64(),
        endpoints.join(","),
        pki.admin_kubeconfig.display(),
        endpoints[0],
        logs.display(),
        ca = pki.dir.join("ca.crt").display(),
        cert = pki.dir.join("admin.crt").display(),
        key = pki.dir.join("admin.key").display(),
    );
    // Until Ctrl-C, or a process dies.
    let outcome = tokio::select! {
        r = crate::server::wait_for_signal() => r.map(|_| None),
        dead = watch_children(&mut procs) => Ok(Some(dead)),
    };
    if let Ok(Some((name, log))) = &outcome {
        eprintln!("{name} exited; see {}. Stopping the rest.", log.display());
    }
    println!("Stopping ...");
    stop(&mut procs).await;
    println!(
        "Stopped. `flotilla up` again resumes from {}.",
        data.display()
    );
    outcome.map(|_| ())
}

/// Waits for `ready`, with a progress line every second; fails if a process dies first or
/// after two minutes.
async fn wait_for<F, Fut>(
    procs: &mut [Proc],
    what: &str,
    started: Instant,
    mut ready: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let mut last_note = Instant::now();
    print!("  waiting for {what} ...");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    loop {
        if ready().await {
            println!(" ok ({:.1} s)", started.elapsed().as_secs_f64());
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                println!();
                bail!(
                    "{} exited ({status}) while starting; see {}",
                    p.name,
                    p.log.display()
                );
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            println!();
            bail!(
                "no {what} after two minutes; see the logs in {}",
                procs[0].log.parent().unwrap_or(Path::new(".")).display()
            );
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            print!(".");
            let _ = std::io::stdout().flush();
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn watch_children(procs: &mut [Proc]) -> (String, PathBuf) {
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(_)) = p.child.try_wait() {
                return (p.name.clone(), p.log.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The agent first (it stops its pods' containers), then the members; SIGKILL for what
/// lingers.
async fn stop(procs: &mut [Proc]) {
    for p in procs.iter_mut().filter(|p| p.name == "agent") {
        signal(p, libc::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(40), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
    for p in procs.iter().filter(|p| p.name != "agent") {
        signal(p, libc::SIGTERM);
    }
    for p in procs.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(10), p.child.wait())
            .await
            .is_err()
        {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
        }
    }
}
