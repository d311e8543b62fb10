//! `flotilla up`: three members and an agent come up in the foreground, run a pod, stop
//! everything on Ctrl-C (SIGINT), and resume from their data when started again.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{etcdctl, eventually, ok, processes_with};

/// A base port whose next five ports are free too.
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = common::free_port();
        if base > 65000 {
            continue;
        }
        if (0..6).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no six consecutive free ports");
}

struct Up {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Up {
    fn start(data: &Path, base: u16) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "up",
                "--base-port",
                &base.to_string(),
                "--node-name",
                "local",
            ])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Up { child, lines }
    }

    /// Output lines up to and including the first that contains `text`.
    fn until(&self, text: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let done = l.contains(text);
                    seen.push(l);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no {text:?} from flotilla up; it said: {seen:#?}"),
            }
        }
    }

    fn interrupt_and_wait(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child; no memory is shared.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "flotilla up did not stop");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CLI with `up`'s administrator kubeconfig (servers, CA, certificate).
fn flotilla(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
fn up_runs_pods_stops_cleanly_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let base = free_base();
    let servers = (0..3)
        .map(|i| format!("127.0.0.1:{}", base + 2 * i))
        .collect::<Vec<_>>()
        .join(",");
    let marker = format!("up-test-{}", std::process::id());
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: hello\nspec:\n  containers:\n  - name: main\n    image: sh\n    command: [sh, -c, \"echo hi; sleep 1000; true # {marker}\"]\n"
    );

    let up = Up::start(&data, base);
    let said = up.until("Flotilla is up");
    assert!(said[0].starts_with("Starting"), "{said:#?}");
    assert!(said.last().unwrap().contains("TLS only"), "{said:#?}");
    let said = up.until("Your credentials");
    let kubeconfig = data.join("admin.kubeconfig");
    assert!(
        said[0].contains(&*kubeconfig.to_string_lossy()),
        "{said:#?}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&kubeconfig).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the kubeconfig holds a private key");

    // TLS only, with client certificates: plaintext and anonymous clients are refused,
    // etcdctl with etcd's own flags and up's certificates is let in.
    let plain = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["get", "nodes", "--server", &servers])
        .env_remove("KUBECONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client was served");
    let pki = data.join("pki");
    let pki = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let first = format!("https://127.0.0.1:{base}");
    let anonymous = etcdctl(&first, &["--cacert", &pki("ca.crt"), "get", "k"]);
    assert!(
        !anonymous.status.success(),
        "a client without a certificate was served"
    );
    let admin = [
        "--cacert",
        &pki("ca.crt"),
        "--cert",
        &pki("admin.crt"),
        "--key",
        &pki("admin.key"),
    ];
    ok(etcdctl(&first, &[&admin[..], &["put", "k", "v"]].concat()));
    let got = ok(etcdctl(
        &first,
        &[&admin[..], &["get", "k", "--print-value-only"]].concat(),
    ));
    assert_eq!(got.trim(), "v");
    let members = ok(etcdctl(&first, &[&admin[..], &["member", "list"]].concat()));
    assert!(
        members.contains(&format!("https://127.0.0.1:{}", base + 1)),
        "{members}"
    );

    let nodes = flotilla(&kubeconfig, &["get", "nodes"], None);
    let table = String::from_utf8_lossy(&nodes.stdout).to_string();
    assert!(
        table.contains("local") && table.contains("Ready"),
        "{table}"
    );
    let out = flotilla(&kubeconfig, &["apply", "-f", "-"], Some(&manifest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the pod running", || {
        let out = flotilla(&kubeconfig, &["get", "pod", "hello"], None);
        String::from_utf8_lossy(&out.stdout).contains("Running")
            && processes_with(&marker).len() == 1
    });

    // Ctrl-C: everything stops, the pod's process too.
    let status = up.interrupt_and_wait();
    assert!(status.success(), "{status}");
    assert_eq!(
        processes_with(&marker).len(),
        0,
        "the pod outlived flotilla up"
    );
    for port in 0..6 {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", base + port)).is_ok(),
            "port {} still taken",
            base + port
        );
    }

    // Again: the same cluster and the same PKI, the pod runs again.
    let ca = std::fs::read(data.join("pki/ca.crt")).unwrap();
    let admin_crt = std::fs::read(data.join("pki/admin.crt")).unwrap();
    let up = Up::start(&data, base);
    let said = up.until("Flotilla is up");
    assert!(said[0].starts_with("Resuming"), "{said:#?}");
    assert_eq!(std::fs::read(data.join("pki/ca.crt")).unwrap(), ca);
    assert_eq!(
        std::fs::read(data.join("pki/admin.crt")).unwrap(),
        admin_crt
    );
    eventually("the pod running again", || {
        let out = flotilla(&kubeconfig, &["get", "pod", "hello"], None);
        String::from_utf8_lossy(&out.stdout).contains("Running")
            && processes_with(&marker).len() == 1
    });
    let out = flotilla(&kubeconfig, &["logs", "hello"], None);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi"));
    assert!(up.interrupt_and_wait().success());
    assert_eq!(processes_with(&marker).len(), 0);
}
