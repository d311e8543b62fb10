//! Real `flotilla server` processes on loopback, and the tools the binary tests drive them
//! with (etcdctl, the flotilla CLI itself).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DEADLINE: Duration = Duration::from_secs(30);

/// A free port below the kernel's ephemeral range: a port from that range, once released,
/// can be taken as the source port of any outgoing connection (an etcdctl call, a peer
/// dial) before the member that is to listen on it has started. Never the same one twice in
/// this process; spread by pid and time across the processes of a parallel run.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u64, ephemeral_low.max(12_000));
    // One seed per process: taken afresh on each call (as it once was), two walks could
    // meet, and two members of one test were handed the same port (seen in a full run).
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        u64::from(std::process::id()).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
    });
    for _ in 0..10_000 {
        // A step coprime with the span walks every port before repeating one.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + seed.wrapping_add(n.wrapping_mul(7_919)) % (high - low);
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port below the ephemeral range (from {ephemeral_low})");
}

/// A member process; killed with -9 when dropped (also when a test panics).
pub struct Member {
    pub name: String,
    pub client: String,
    pub peer: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Extra `flotilla server` flags.
    pub extra: Vec<String>,
    /// Extra environment variables of the process.
    pub env: Vec<(String, String)>,
}

impl Member {
    /// A member named `name` with fresh ports and its data in `dir`, not started.
    pub fn new(name: &str, dir: PathBuf) -> Self {
        Member {
            name: name.to_string(),
            client: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            dir,
            child: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    pub fn start(&mut self, initial: &str) {
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["server", "--name", &self.name, "--data-dir"])
            .arg(&self.dir)
            .args(["--client-addr", &self.client, "--peer-addr", &self.peer])
            .args(["--initial-cluster", initial])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("flotilla starts");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    pub initial: String,
}

impl Cluster {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A cluster whose members get `extra` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut members: Vec<Member> = (1..=3)
            .map(|i| {
                let mut m = Member::new(&format!("n{i}"), dir.path().join(format!("n{i}")));
                m.extra = extra.iter().map(|s| s.to_string()).collect();
                m
            })
            .collect();
        let initial = initial_cluster(&members);
        for m in &mut members {
            m.start(&initial);
        }
        let c = Cluster {
            dir,
            members,
            initial,
        };
        for m in &c.members {
            c.wait_healthy(&m.client);
        }
        c
    }

    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn wait_healthy(&self, endpoint: &str) {
        eventually(&format!("{endpoint} serves linearizable reads"), || {
            etcdctl(endpoint, &["get", "health-probe"]).status.success()
        });
    }

    /// The index of the member whose endpoint reports itself leader.
    pub fn leader(&self) -> usize {
        let mut found = None;
        eventually("a leader", || {
            found = self.members.iter().position(|m| {
                if m.child.is_none() {
                    return false;
                }
                let out = etcdctl(&m.client, &["endpoint", "status", "-w", "json"]);
                let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
                    Ok(v) => v,
                    Err(_) => return false,
                };
                let s = &v[0]["Status"];
                s["header"]["member_id"].as_u64().is_some()
                    && s["header"]["member_id"] == s["leader"]
            });
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Cluster {
    /// A failing test shows the end of every member's log: the temp dir goes with the test.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for m in &self.members {
            print_log_tail(&m.dir.with_extension("log"));
        }
    }
}

/// Prints the last 40 lines of the log at `path` to stderr, for a failing test's output.
pub fn print_log_tail(path: &std::path::Path) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    eprintln!("--- last {} lines of {} ---", tail.len(), path.display());
    for line in tail {
        eprintln!("{line}");
    }
}

/// `--initial-cluster` for `members`: NAME=PEER,...
pub fn initial_cluster(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",")
}

pub fn etcdctl(endpoints: &str, args: &[&str]) -> Output {
    etcdctl_stdin(endpoints, args, None)
}

pub fn etcdctl_stdin(endpoints: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            endpoints,
            "--command-timeout=3s",
            "--dial-timeout=1s",
        ])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .expect("etcdctl is installed (scripts/test.sh installs Debian's etcd-client)");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pids of processes whose command line contains `marker`, leaving out the supervisors
/// that carry a container's command line too (the process runtime's shim, the docker
/// runtime's init).
pub fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rfind(')').is_some_and(|i| s[i + 2..].starts_with('Z')))
            .unwrap_or(true);
        if cmd.contains(marker)
            && !zombie
            && !cmd.contains("agent-shim")
            && !cmd.contains("docker-init")
        {
            out.push(pid);
        }
    }
    out
}

/// (status code, body) of a plain HTTP/1.1 GET.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A raw HTTP/1.1 request: (status code, lower-cased head, body).
pub fn http_request(addr: &str, head: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    use std::io::{Read, Write};
    write!(
        s,
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP response");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, raw[split + 4..].to_vec())
}
