//! The process runtime: each container is a child process (`command` + `args`, `env`,
//! `workingDir`), watched over by a small *shim* (`flotilla agent-shim`) that outlives the
//! agent.
//!
//! The shim runs in its own process group, writes the container's output to its log file,
//! waits for it and records its exit status in a file. So the agent can die and come back:
//! it finds every container from its directory (`DATA/containers/ID/`), sees which still
//! run, and learns the exit codes of those that ended meanwhile. Stopping a container
//! signals its process group (the shim ignores SIGTERM; SIGKILL takes both).
//!
//! cpu and memory limits go through cgroup v2 when the agent may create cgroups under
//! `/sys/fs/cgroup`, else through the cgroup v1 `memory` and `cpu` hierarchies (older
//! hosts and hybrid set-ups); without either it says so once at start-up and runs without
//! limits.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::runtime::{ContainerRecord, ContainerSpec, ContainerState, Runtime, RuntimeError};

/// Logs of a container are rotated past this size (one older file is kept).
pub const LOG_LIMIT: u64 = 10 * 1024 * 1024;

/// The file in a container's directory the shim writes (with the container's pid) once the
/// container process runs.
const STARTED: &str = "started";

/// What the agent records about a container it started.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Meta {
    pod_uid: String,
    pod_namespace: String,
    pod_name: String,
    container: String,
    restart_count: i32,
    /// The shim's pid, which is also the container's process group.
    pid: i32,
    /// The shim's start time in clock ticks since boot (tells a reused pid apart).
    pid_start: u64,
    started_at_ms: u64,
}

pub struct ProcessRuntime {
    dir: PathBuf,
    exe: PathBuf,
    cgroup: Option<Cgroups>,
}

/// Where the agent makes its containers' cgroups.
#[derive(Clone, Debug)]
enum Cgroups {
    /// `/sys/fs/cgroup/flotilla-NODE` (unified hierarchy).
    V2(PathBuf),
    /// `/sys/fs/cgroup/memory/flotilla-NODE` and `/sys/fs/cgroup/cpu/flotilla-NODE`.
    V1 { memory: PathBuf, cpu: PathBuf },
}

impl Cgroups {
    fn describe(&self) -> String {
        match self {
            Cgroups::V2(dir) => format!("cgroup v2 at {}", dir.display()),
            Cgroups::V1 { memory, cpu } => {
                format!("cgroup v1 at {} and {}", memory.display(), cpu.display())
            }
        }
    }

    /// The container's cgroup directories.
    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2(dir) => vec![dir.join(id)],
            Cgroups::V1 { memory, cpu } => vec![memory.join(id), cpu.join(id)],
        }
    }

    /// Creates the container's cgroups with its limits.
    fn create(&self, id: &str, spec: &ContainerSpec) -> std::io::Result<Vec<PathBuf>> {
        let dirs = self.dirs(id);
        for d in &dirs {
            fs::create_dir_all(d)?;
        }
        // Quota per 100 ms period.
        let quota = (spec.cpu_limit_milli * 100).max(1000);
        match self {
            Cgroups::V2(_) => {
                if spec.memory_limit > 0 {
                    fs::write(dirs[0].join("memory.max"), spec.memory_limit.to_string())?;
                    // No swap beyond the limit.
                    let _ = fs::write(dirs[0].join("memory.swap.max"), "0");
                }
                if spec.cpu_limit_milli > 0 {
                    fs::write(dirs[0].join("cpu.max"), format!("{quota} 100000"))?;
                }
            }
            Cgroups::V1 { .. } => {
                if spec.memory_limit > 0 {
                    let limit = spec.memory_limit.to_string();
                    fs::write(dirs[0].join("memory.limit_in_bytes"), &limit)?;
                    // Memory plus swap, where the kernel accounts swap.
                    let memsw = dirs[0].join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        fs::write(memsw, &limit)?;
                    }
                }
                if spec.cpu_limit_milli > 0 {
                    fs::write(dirs[1].join("cpu.cfs_period_us"), "100000")?;
                    fs::write(dirs[1].join("cpu.cfs_quota_us"), quota.to_string())?;
                }
            }
        }
        Ok(dirs)
    }

    /// Whether the kernel's OOM killer acted in the container's cgroup.
    fn oom_killed(&self, id: &str) -> bool {
        let file = match self {
            Cgroups::V2(dir) => dir.join(id).join("memory.events"),
            Cgroups::V1 { memory, .. } => memory.join(id).join("memory.oom_control"),
        };
        fs::read_to_string(file)
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ").map(|n| n.trim() != "0"))
            })
            .unwrap_or(false)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A process's start time (field 22 of /proc/PID/stat), if it exists.
fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A zombie (exited, not yet reaped) counts as gone.
fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

impl ProcessRuntime {
    /// `dir` holds the containers' files; `exe` is the `flotilla` binary (for the shim).
    pub fn new(dir: &Path, exe: PathBuf, node: &str) -> std::io::Result<Self> {
        let dir = dir.join("containers");
        fs::create_dir_all(&dir)?;
        let cgroup = match setup_cgroup(node) {
            Ok(cgroups) => {
                tracing::info!(
                    "cpu and memory limits enforced through {}",
                    cgroups.describe()
                );
                Some(cgroups)
            }
            Err(why) => {
                eprintln!("flotilla agent: cpu and memory limits are NOT enforced: {why}");
                None
            }
        };
        Ok(Self { dir, exe, cgroup })
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn meta(&self, id: &str) -> Option<Meta> {
        let text = fs::read_to_string(self.container_dir(id).join("meta.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn state_of(&self, id: &str, meta: &Meta) -> ContainerState {
        let dir = self.container_dir(id);
        let started_at = from_millis(meta.started_at_ms);
        if let Ok(text) = fs::read_to_string(dir.join("exit")) {
            // "CODE SIGNAL FINISHED_MS"
            let mut parts = text
                .split_whitespace()
                .map(|p| p.parse::<i64>().unwrap_or(0));
            let code = parts.next().unwrap_or(0) as i32;
            let signal = parts.next().unwrap_or(0) as i32;
            let finished = parts.next().unwrap_or(0) as u64;
            return ContainerState::Exited {
                exit_code: if signal > 0 { 128 + signal } else { code },
                signal,
                reason: exit_reason(code, signal, self.oom_killed(id)),
                started_at,
                finished_at: from_millis(finished),
            };
        }
        let alive = process_start(meta.pid) == Some(meta.pid_start) && !is_zombie(meta.pid);
        if alive {
            return ContainerState::Running { started_at };
        }
        // The shim died without a word: it was killed (SIGKILL takes the shim too).
        let finished = fs::metadata(dir.join("log"))
            .and_then(|m| m.modified())
            .unwrap_or_else(|_| SystemTime::now());
        ContainerState::Exited {
            exit_code: 137,
            signal: libc::SIGKILL,
            reason: if self.oom_killed(id) {
                "OOMKilled"
            } else {
                "Killed"
            }
            .into(),
            started_at,
            finished_at: finished,
        }
    }

    fn oom_killed(&self, id: &str) -> bool {
        self.cgroup.as_ref().is_some_and(|c| c.oom_killed(id))
    }

    /// The container's cgroups with its limits; empty without cgroups.
    fn container_cgroups(&self, id: &str, spec: &ContainerSpec) -> Vec<PathBuf> {
        let Some(cgroups) = &self.cgroup else {
            return Vec::new();
        };
        match cgroups.create(id, spec) {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!("cgroup for {id}: {e}; running it without limits");
                Vec::new()
            }
        }
    }
}

pub(crate) fn exit_reason(code: i32, signal: i32, oom: bool) -> String {
    if oom {
        "OOMKilled".into()
    } else if signal > 0 {
        "Killed".into()
    } else if code == 0 {
        "Completed".into()
    } else {
        "Error".into()
    }
}

/// The agent's cgroups: v2 if the unified hierarchy has the cpu and memory controllers,
/// else v1's `memory` and `cpu` hierarchies; why neither, otherwise.
fn setup_cgroup(node: &str) -> Result<Cgroups, String> {
    let v2 = match setup_cgroup_v2(node) {
        Ok(dir) => return Ok(Cgroups::V2(dir)),
        Err(why) => why,
    };
    let root = Path::new("/sys/fs/cgroup");
    let (memory, cpu) = (root.join("memory"), root.join("cpu"));
    if !memory.join("memory.limit_in_bytes").exists() || !cpu.join("cgroup.procs").exists() {
        return Err(format!("{v2}, and no cgroup v1 memory and cpu hierarchies"));
    }
    let name = format!("flotilla-{node}");
    let (memory, cpu) = (memory.join(&name), cpu.join(&name));
    for d in [&memory, &cpu] {
        fs::create_dir_all(d)
            .map_err(|e| format!("{v2}, and cannot create {}: {e}", d.display()))?;
    }
    Ok(Cgroups::V1 { memory, cpu })
}

/// Creates `/sys/fs/cgroup/flotilla-NODE` with the cpu and memory controllers enabled for
/// its children.
fn setup_cgroup_v2(node: &str) -> Result<PathBuf, String> {
    let root = Path::new("/sys/fs/cgroup");
    let controllers = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|_| "no cgroup v2 hierarchy at /sys/fs/cgroup".to_string())?;
    for c in ["cpu", "memory"] {
        if !controllers.split_whitespace().any(|x| x == c) {
            return Err(format!("the cgroup v2 {c} controller is not available"));
        }
    }
    let dir = root.join(format!("flotilla-{node}"));
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let enable = |path: &Path| fs::write(path.join("cgroup.subtree_control"), "+cpu +memory");
    enable(root).and_then(|_| enable(&dir)).map_err(|e| {
        format!(
            "cannot enable the cpu and memory controllers under {}: {e}",
            dir.display()
        )
    })?;
    Ok(dir)
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let id = format!("{}-{}-{}", spec.pod_uid, spec.name, spec.restart_count);
        let dir = self.container_dir(&id);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let argv: Vec<String> = spec
            .command
            .iter()
            .chain(spec.args.iter())
            .cloned()
            .collect();
        if argv.is_empty() {
            return Err(RuntimeError::Start {
                container: spec.name.clone(),
                message: "no command: the process runtime needs `command` (and `args`)".into(),
            });
        }
        let workdir = if spec.working_dir.is_empty() {
            dir.clone()
        } else {
            PathBuf::from(&spec.working_dir)
        };
        if !workdir.is_dir() {
            return Err(RuntimeError::Start {
                container: spec.name.clone(),
                message: format!("workingDir {} is not a directory", workdir.display()),
            });
        }
        let mut cmd = std::process::Command::new(&self.exe);
        cmd.arg("agent-shim").arg("--dir").arg(&dir);
        for cg in self.container_cgroups(&id, spec) {
            cmd.arg("--cgroup").arg(cg);
        }
        for m in &spec.mounts {
            cmd.arg(if m.read_only {
                "--mount-ro"
            } else {
                "--mount-rw"
            })
            .arg(&m.host_path)
            .arg(&m.container_path);
        }
        cmd.arg("--")
            .args(&argv)
            .current_dir(&workdir)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = SystemTime::now();
        let mut child = cmd.spawn().map_err(|e| RuntimeError::Start {
            container: spec.name.clone(),
            message: format!("cannot start the shim: {e}"),
        })?;
        let pid = child.id() as i32;
        let meta = Meta {
            pod_uid: spec.pod_uid.clone(),
            pod_namespace: spec.pod_namespace.clone(),
            pod_name: spec.pod_name.clone(),
            container: spec.name.clone(),
            restart_count: spec.restart_count,
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            started_at_ms: millis(started),
        };
        let tmp = dir.join("meta.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec(&meta).map_err(|e| RuntimeError::Other(e.to_string()))?,
        )?;
        fs::rename(tmp, dir.join("meta.json"))?;
        // Reap the shim when it ends (an adopted shim, after a restart, is init's to reap).
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(id)
    }

    async fn state(&self, id: &str) -> ContainerState {
        match self.meta(id) {
            Some(meta) => self.state_of(id, &meta),
            None => ContainerState::Missing,
        }
    }

    async fn stop(&self, id: &str, grace: Duration) {
        let Some(meta) = self.meta(id) else {
            return;
        };
        if !matches!(self.state_of(id, &meta), ContainerState::Running { .. }) {
            return;
        }
        let deadline = Instant::now() + grace;
        // Until the shim has started the container, SIGTERM would reach only the shim, which
        // ignores it, and the container would then run out its whole grace period: wait for
        // the container to be there (or the shim to end) first.
        let started = self.container_dir(id).join(STARTED);
        while !started.exists()
            && Instant::now() < deadline
            && matches!(self.state_of(id, &meta), ContainerState::Running { .. })
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SAFETY: kill(2) with a negative pid signals the process group; no memory is shared.
        unsafe {
            libc::kill(-meta.pid, libc::SIGTERM);
        }
        while Instant::now() < deadline {
            if !matches!(self.state_of(id, &meta), ContainerState::Running { .. }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-meta.pid, libc::SIGKILL);
        }
        for _ in 0..100 {
            if !matches!(self.state_of(id, &meta), ContainerState::Running { .. }) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn remove(&self, id: &str) {
        let _ = fs::remove_dir_all(self.container_dir(id));
        if let Some(cg) = &self.cgroup {
            for d in cg.dirs(id) {
                let _ = fs::remove_dir(d);
            }
        }
    }

    async fn exec(
        &self,
        id: &str,
        spec: &ContainerSpec,
        command: &[String],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        let Some((program, args)) = command.split_first() else {
            return Err(RuntimeError::Other("exec: empty command".into()));
        };
        let workdir = if spec.working_dir.is_empty() {
            self.container_dir(id)
        } else {
            PathBuf::from(&spec.working_dir)
        };
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .current_dir(workdir)
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(status?.code().unwrap_or(128)),
            Err(_) => Err(RuntimeError::Other(format!(
                "exec {program:?} timed out after {timeout:?}"
            ))),
        }
    }

    async fn list(&self) -> Vec<ContainerRecord> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            if let Some(meta) = self.meta(&id) {
                let state = self.state_of(&id, &meta);
                out.push(ContainerRecord {
                    id,
                    pod_uid: meta.pod_uid,
                    pod_namespace: meta.pod_namespace,
                    pod_name: meta.pod_name,
                    container: meta.container,
                    restart_count: meta.restart_count,
                    state,
                });
            }
        }
        out
    }

    fn log_files(&self, id: &str) -> Vec<PathBuf> {
        let dir = self.container_dir(id);
        vec![dir.join("log"), dir.join("log.1")]
    }
}

/// `flotilla agent-shim --dir DIR [--cgroup CG]... -- COMMAND ARGS...`: runs one container and
/// records how it ended. Returns the process exit code.
pub fn shim_main(args: &[String]) -> i32 {
    let mut dir = None;
    let mut cgroups = Vec::new();
    let mut mounts: Vec<(PathBuf, PathBuf, bool)> = Vec::new();
    let mut it = args.iter();
    let mut argv = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--dir" => dir = it.next().map(PathBuf::from),
            "--cgroup" => cgroups.extend(it.next().map(PathBuf::from)),
            "--mount-ro" | "--mount-rw" => {
                let (Some(from), Some(to)) = (it.next(), it.next()) else {
                    eprintln!("agent-shim: {a} needs a source and a target");
                    return 2;
                };
                mounts.push((PathBuf::from(from), PathBuf::from(to), a == "--mount-ro"));
            }
            "--" => {
                argv = it.by_ref().cloned().collect();
                break;
            }
            other => {
                eprintln!("agent-shim: unexpected argument {other:?}");
                return 2;
            }
        }
    }
    let (Some(dir), Some((program, rest))) = (dir, argv.split_first()) else {
        eprintln!("usage: flotilla agent-shim --dir DIR [--cgroup CG]... -- COMMAND ARGS...");
        return 2;
    };
    for cg in cgroups {
        // Joining the cgroups first: the container inherits them.
        if let Err(e) = fs::write(cg.join("cgroup.procs"), std::process::id().to_string()) {
            let _ = append(
                &dir.join("log"),
                format!("flotilla: not limited (cgroup: {e})\n").as_bytes(),
            );
        }
    }
    // The shim outlives SIGTERM to the group: only the container should act on it.
    // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let ran = if mounts.is_empty() {
        Ok(())
    } else {
        private_mounts(&mounts)
    };
    let ran = ran.and_then(|_| run_logged(&dir, program, rest));
    let (code, signal) = match ran {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            (status.code().unwrap_or(0), status.signal().unwrap_or(0))
        }
        Err(e) => {
            let _ = append(
                &dir.join("log"),
                format!("flotilla: cannot run {program:?}: {e}\n").as_bytes(),
            );
            (127, 0)
        }
    };
    let finished = millis(SystemTime::now());
    let tmp = dir.join("exit.tmp");
    if fs::write(&tmp, format!("{code} {signal} {finished}\n")).is_ok() {
        let _ = fs::rename(&tmp, dir.join("exit"));
    }
    0
}

/// Gives the shim (and so the container) a mount namespace of its own, with each volume
/// bound at its path: `mountPath` means what it says, and nobody else sees the mounts. A
/// missing mount point is made on the node (an empty directory or file is left there).
/// Needs root (CAP_SYS_ADMIN).
fn private_mounts(mounts: &[(PathBuf, PathBuf, bool)]) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::io::{Error, ErrorKind};
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|e| Error::new(ErrorKind::InvalidInput, e))
    };
    let fail = |what: String| {
        let e = Error::last_os_error();
        Error::new(e.kind(), format!("{what}: {e}"))
    };
    // SAFETY: unshare and mount take valid NUL-terminated strings (or null where allowed)
    // that outlive the calls; they touch no memory of this process.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(fail(
                "volumes need a mount namespace of their own (run the agent as root)".into(),
            ));
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            // Slave, not private: the node's unmounts (a tmpfs volume of a pod that went)
            // reach this namespace too, and nothing mounted here goes back.
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) != 0
        {
            return Err(fail(
                "making the mount namespace a slave of the node's".into(),
            ));
        }
    }
    for (from, to, read_only) in mounts {
        if from.is_dir() {
            fs::create_dir_all(to)?;
        } else if !to.exists() {
            if let Some(parent) = to.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(to, b"")?;
        }
        let (src, dst) = (c(from)?, c(to)?);
        // SAFETY: as above.
        unsafe {
            if libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(fail(format!(
                    "mounting {} at {}",
                    from.display(),
                    to.display()
                )));
            }
            if *read_only
                && libc::mount(
                    std::ptr::null(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC,
                    std::ptr::null(),
                ) != 0
            {
                return Err(fail(format!("making {} read-only", to.display())));
            }
        }
    }
    Ok(())
}

fn append(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(bytes)
}

/// Runs the container with its output copied into `DIR/log`, rotated at [`LOG_LIMIT`].
fn run_logged(
    dir: &Path,
    program: &str,
    args: &[String],
) -> std::io::Result<std::process::ExitStatus> {
    use std::io::Read;
    // One pipe for stdout and stderr: the log keeps the order in which they were written.
    let (mut reader, writer) = std::io::pipe()?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    // The shim ignores SIGTERM, SIGINT and SIGHUP; ignored signals survive exec, so the
    // container gets the default dispositions back before it starts.
    // SAFETY: between fork and exec the closure only calls signal(2), which touches no
    // memory of the parent and takes no locks.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGTERM, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // spawn returns once the command has been exec'd with the default dispositions back: from
    // now on SIGTERM to the group reaches it. `stop` waits for this mark before signalling.
    let _ = fs::write(dir.join(STARTED), child.id().to_string());
    // The command holds the pipe's write end until dropped: drop it, so that the read ends
    // when the container (and whatever it left running with the pipe) is done.
    drop(cmd);
    let log = dir.join("log");
    let copier = std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            let _ = rotate_if_full(&log);
            let _ = append(&log, &buf[..n]);
        }
    });
    let status = child.wait()?;
    // Output written just before the exit is copied before the exit is recorded; a
    // background process still holding the pipe must not hold the shim up.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while !copier.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(status)
}

fn rotate_if_full(log: &Path) -> std::io::Result<()> {
    if fs::metadata(log).map(|m| m.len()).unwrap_or(0) >= LOG_LIMIT {
        fs::rename(log, log.with_extension("1"))?;
    }
    Ok(())
}

/// Container directories whose pods the agent no longer runs, by pod uid.
pub fn group_by_pod(records: Vec<ContainerRecord>) -> HashMap<String, Vec<ContainerRecord>> {
    let mut by: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
    for r in records {
        by.entry(r.pod_uid.clone()).or_default().push(r);
    }
    by
}
