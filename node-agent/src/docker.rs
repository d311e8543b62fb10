//! The docker runtime: each container is a Docker container, created through the Docker
//! Engine API (bollard), and the containers of a pod share one network namespace.
//!
//! A pod gets a *sandbox* first: a tiny container (`flotilla agent-pause`, from the local
//! image [`PAUSE_IMAGE`]) that holds the pod's network namespace and address, as the
//! Kubernetes pause container does. Every container of the pod joins it
//! (`NetworkMode: container:SANDBOX`), so they reach each other on `localhost` and the
//! pod's IP is the sandbox's. The pause image is built once per Docker engine from the
//! agent's own binary and the shared libraries it runs with; nothing is pulled.
//!
//! Containers carry labels (`io.flotilla.*`) naming the node, pod and container, so a
//! restarted agent finds and adopts its own containers and leaves other agents' alone.
//! cpu and memory limits become the container's `NanoCpus` and `Memory` (swap included).
//! The engine's init (`docker-init`) is each container's pid 1, so the command receives
//! SIGTERM on deletion as a process would outside a container.
//! Images must already be on the node: no registry is contacted.
//!
//! Output is copied from the engine's log stream into `DATA/docker-logs/ID.log` (rotated
//! past [`LOG_LIMIT`]), which the agent's log service reads as for the process runtime.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::process::{LOG_LIMIT, exit_reason};
use crate::runtime::{ContainerRecord, ContainerSpec, ContainerState, Runtime, RuntimeError};

/// The sandbox image, built locally from the agent's binary (see the module docs).
pub const PAUSE_IMAGE: &str = "flotilla-pause:1";

/// How long a fresh SIGKILL exit under a memory limit waits for the engine's OOM flag.
const OOM_FLAG_WAIT: Duration = Duration::from_secs(1);

const LABEL_NODE: &str = "io.flotilla.node";
const LABEL_UID: &str = "io.flotilla.pod-uid";
const LABEL_NAMESPACE: &str = "io.flotilla.pod-namespace";
const LABEL_POD: &str = "io.flotilla.pod-name";
const LABEL_CONTAINER: &str = "io.flotilla.container";
const LABEL_RESTARTS: &str = "io.flotilla.restart-count";
const LABEL_SANDBOX: &str = "io.flotilla.sandbox";

pub struct DockerRuntime {
    docker: Docker,
    node: String,
    logs: PathBuf,
    /// Containers whose output is being copied to their log file.
    followed: Mutex<HashSet<String>>,
    /// One sandbox creation at a time (two containers of a new pod start together).
    sandbox_lock: tokio::sync::Mutex<()>,
    /// The network sandboxes join (`None`: the engine's default bridge).
    network: Option<String>,
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn other(what: &str, e: DockerError) -> RuntimeError {
    RuntimeError::Other(format!("docker: {what}: {e}"))
}

/// Docker's timestamps (`2026-11-25T11:30:00.123456789Z`; `0001-…` for never).
fn docker_time(s: Option<&String>) -> Option<SystemTime> {
    let s = s?;
    if s.starts_with("0001-") {
        return None;
    }
    humantime::parse_rfc3339_weak(s).ok()
}

/// A name Docker accepts (`[a-zA-Z0-9][a-zA-Z0-9_.-]*`) for a pod's container.
fn container_name(spec: &ContainerSpec, what: &str) -> String {
    format!(
        "flotilla_{}_{}_{}_{}",
        spec.pod_namespace, spec.pod_name, what, spec.pod_uid
    )
}

impl DockerRuntime {
    /// Whether the engine marks `id` OOM-killed within [`OOM_FLAG_WAIT`]. The engine learns
    /// of the OOM kill from an event of its own, which can arrive after the exit it caused:
    /// a container just killed by SIGKILL under a memory limit may yet turn out OOM-killed.
    async fn oom_flag_arrives(&self, id: &str) -> bool {
        let deadline = tokio::time::Instant::now() + OOM_FLAG_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(c) = self.docker.inspect_container(id, None).await
                && c.state.and_then(|s| s.oom_killed) == Some(true)
            {
                return true;
            }
        }
        false
    }

    /// Connects to the Docker engine (`DOCKER_HOST` or the local socket), makes sure the
    /// sandbox image exists, and removes sandboxes this node left without containers.
    pub async fn new(
        data_dir: &Path,
        node: &str,
        exe: &Path,
        network: Option<String>,
    ) -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| other("connecting to the engine", e))?
            .negotiate_version()
            .await
            .map_err(|e| {
                RuntimeError::Other(format!(
                    "cannot reach the Docker engine (DOCKER_HOST or /var/run/docker.sock): {e}"
                ))
            })?;
        let logs = data_dir.join("docker-logs");
        std::fs::create_dir_all(&logs)?;
        let rt = Self {
            docker,
            node: node.to_string(),
            logs,
            followed: Mutex::new(HashSet::new()),
            sandbox_lock: tokio::sync::Mutex::new(()),
            network,
        };
        rt.ensure_pause_image(data_dir, exe).await?;
        rt.remove_empty_sandboxes().await;
        Ok(rt)
    }

    /// This node's containers (sandboxes included), with their labels.
    async fn ours(&self, extra: Option<String>) -> Vec<(String, HashMap<String, String>, String)> {
        let mut label = vec![format!("{LABEL_NODE}={}", self.node)];
        label.extend(extra);
        let filters = HashMap::from([("label".to_string(), label)]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await;
        match list {
            Ok(list) => list
                .into_iter()
                .filter_map(|c| {
                    let state = c.state.map(|s| s.to_string()).unwrap_or_default();
                    Some((c.id?, c.labels.unwrap_or_default(), state))
                })
                .collect(),
            Err(e) => {
                tracing::warn!("docker: listing containers: {e}");
                Vec::new()
            }
        }
    }

    async fn remove_empty_sandboxes(&self) {
        let all = self.ours(None).await;
        let used: HashSet<&String> = all
            .iter()
            .filter(|(_, l, _)| !l.contains_key(LABEL_SANDBOX))
            .filter_map(|(_, l, _)| l.get(LABEL_UID))
            .collect();
        for (id, labels, _) in &all {
            if labels.contains_key(LABEL_SANDBOX)
                && labels.get(LABEL_UID).is_none_or(|u| !used.contains(u))
            {
                self.force_remove(id).await;
            }
        }
    }

    async fn force_remove(&self, id: &str) {
        let opts = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(e) = self.docker.remove_container(id, Some(opts)).await
            && !is_not_found(&e)
        {
            tracing::warn!("docker: removing {id}: {e}");
        }
    }

    /// Builds [`PAUSE_IMAGE`] from this binary when the engine does not have it.
    async fn ensure_pause_image(&self, data_dir: &Path, exe: &Path) -> Result<(), RuntimeError> {
        if self.docker.inspect_image(PAUSE_IMAGE).await.is_ok() {
            return Ok(());
        }
        eprintln!("flotilla agent: building the pod sandbox image {PAUSE_IMAGE} (once per engine)");
        let tar = data_dir.join("pause-rootfs.tar");
        let (tar2, exe) = (tar.clone(), exe.to_path_buf());
        let lib_path = tokio::task::spawn_blocking(move || pause_rootfs(&exe, &tar2))
            .await
            .map_err(|e| RuntimeError::Other(format!("building the sandbox image: {e}")))??;
        let file = tokio::fs::File::open(&tar).await?;
        let body = futures_util::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        });
        let (repo, tag) = PAUSE_IMAGE
            .split_once(':')
            .unwrap_or((PAUSE_IMAGE, "latest"));
        let opts = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.into()),
            tag: Some(tag.into()),
            changes: vec![
                r#"ENTRYPOINT ["/flotilla", "agent-pause"]"#.into(),
                format!("ENV LD_LIBRARY_PATH={lib_path}"),
            ],
            ..Default::default()
        };
        let mut progress =
            self.docker
                .create_image(Some(opts), Some(bollard::body_try_stream(body)), None);
        let mut result = Ok(());
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) if info.error_detail.is_some() => {
                    result = Err(RuntimeError::Other(format!(
                        "docker: importing {PAUSE_IMAGE}: {:?}",
                        info.error_detail
                    )));
                }
                Ok(_) => {}
                Err(e) => result = Err(other(&format!("importing {PAUSE_IMAGE}"), e)),
            }
        }
        let _ = tokio::fs::remove_file(&tar).await;
        result
    }

    /// The pod's sandbox, created and started when it is missing: its id and IP.
    async fn sandbox(&self, spec: &ContainerSpec) -> Result<(String, String), RuntimeError> {
        let _one = self.sandbox_lock.lock().await;
        let name = container_name(spec, "sandbox");
        if let Ok(c) = self.docker.inspect_container(&name, None).await {
            let running = c.state.as_ref().and_then(|s| s.running) == Some(true);
            let id = c.id.clone().unwrap_or_else(|| name.clone());
            if running && let Some(ip) = ip_of(&c) {
                return Ok((id, ip));
            }
            // Stopped (the engine restarted, or someone stopped it): start afresh.
            self.force_remove(&id).await;
        }
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_UID.to_string(), spec.pod_uid.clone()),
            (LABEL_NAMESPACE.to_string(), spec.pod_namespace.clone()),
            (LABEL_POD.to_string(), spec.pod_name.clone()),
            (LABEL_SANDBOX.to_string(), "true".to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(PAUSE_IMAGE.into()),
            hostname: Some(spec.pod_name.chars().take(63).collect()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: self.network.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.clone()),
                    ..Default::default()
                }),
                body,
            )
            .await
            .map_err(|e| start_error(&spec.name, "creating the pod sandbox", e))?;
        self.docker
            .start_container(&created.id, None)
            .await
            .map_err(|e| start_error(&spec.name, "starting the pod sandbox", e))?;
        let c = self
            .docker
            .inspect_container(&created.id, None)
            .await
            .map_err(|e| start_error(&spec.name, "inspecting the pod sandbox", e))?;
        let ip = ip_of(&c).ok_or_else(|| RuntimeError::Start {
            container: spec.name.clone(),
            message: "the pod sandbox got no IP address".into(),
        })?;
        Ok((created.id, ip))
    }

    /// Copies the container's output to its log file until the container ends.
    fn follow(&self, id: &str) {
        if !self
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string())
        {
            return;
        }
        let docker = self.docker.clone();
        let id = id.to_string();
        let path = self.logs.join(format!("{id}.log"));
        tokio::spawn(async move {
            let opts = LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                tail: "all".into(),
                ..Default::default()
            };
            let mut stream = docker.logs(&id, Some(opts));
            // From the start of the container's output: a fresh copy after a restart.
            let Ok(mut file) = tokio::fs::File::create(&path).await else {
                return;
            };
            let mut written = 0u64;
            while let Some(Ok(out)) = stream.next().await {
                let bytes = out.into_bytes();
                if written + bytes.len() as u64 > LOG_LIMIT && written > 0 {
                    let _ = file.flush().await;
                    let _ = tokio::fs::rename(&path, path.with_extension("log.1")).await;
                    let Ok(f) = tokio::fs::File::create(&path).await else {
                        return;
                    };
                    file = f;
                    written = 0;
                }
                if file.write_all(&bytes).await.is_err() {
                    return;
                }
                written += bytes.len() as u64;
            }
            let _ = file.flush().await;
        });
    }
}

fn start_error(container: &str, what: &str, e: DockerError) -> RuntimeError {
    let message = match &e {
        DockerError::DockerResponseServerError { message, .. } => format!("{what}: {message}"),
        e => format!("{what}: {e}"),
    };
    RuntimeError::Start {
        container: container.to_string(),
        message,
    }
}

/// The container's address on its first network.
fn ip_of(c: &bollard::models::ContainerInspectResponse) -> Option<String> {
    let nets = c.network_settings.as_ref()?.networks.as_ref()?;
    let mut names: Vec<&String> = nets.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|n| nets[n].ip_address.clone())
        .find(|ip| !ip.is_empty())
}

/// Writes the sandbox image's root file system to `tar`: this binary as `/flotilla`, its
/// ELF interpreter and the shared libraries it has loaded, each at its path. Returns the
/// library directories (for `LD_LIBRARY_PATH`).
fn pause_rootfs(exe: &Path, tar: &Path) -> Result<String, RuntimeError> {
    let fail = |what: &str, e: std::io::Error| {
        RuntimeError::Other(format!("building the sandbox image: {what}: {e}"))
    };
    let mut b = tar::Builder::new(std::fs::File::create(tar).map_err(|e| fail("tar", e))?);
    // Docker's importer knows no GNU sparse entries.
    b.sparse(false);
    b.append_path_with_name(exe, "flotilla")
        .map_err(|e| fail(&exe.display().to_string(), e))?;
    let image = std::fs::read(exe).map_err(|e| fail("reading the binary", e))?;
    let mut files: Vec<String> = Vec::new();
    if let Some(interp) = elf_interpreter(&image) {
        files.push(interp);
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut dirs: Vec<String> = Vec::new();
    for path in maps.lines().filter_map(|l| l.split_whitespace().nth(5)) {
        if path.starts_with('/') && path.contains(".so") && !files.iter().any(|f| f == path) {
            if let Some((dir, _)) = path.rsplit_once('/')
                && !dirs.iter().any(|d| d == dir)
            {
                dirs.push(dir.to_string());
            }
            files.push(path.to_string());
        }
    }
    for f in &files {
        b.append_path_with_name(f, f.trim_start_matches('/'))
            .map_err(|e| fail(f, e))?;
    }
    b.into_inner()
        .and_then(|mut f| std::io::Write::flush(&mut f))
        .map_err(|e| fail("tar", e))?;
    Ok(dirs.join(":"))
}

/// The `PT_INTERP` path of a 64-bit little-endian ELF file.
fn elf_interpreter(elf: &[u8]) -> Option<String> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let at = |o: usize, n: usize| elf.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(at(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(at(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(at(o, 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let off = u64_at(ph.checked_add(8)?)? as usize;
            let len = u64_at(ph.checked_add(0x20)?)? as usize;
            let raw = at(off, len)?;
            let s = raw.split(|b| *b == 0).next()?;
            return String::from_utf8(s.to_vec()).ok();
        }
    }
    None
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if let Err(e) = self.docker.inspect_image(&spec.image).await {
            let message = if is_not_found(&e) {
                format!(
                    "image {:?} is not on this node (the docker runtime never pulls: build or \
                     load it first)",
                    spec.image
                )
            } else {
                format!("image {:?}: {e}", spec.image)
            };
            return Err(RuntimeError::Start {
                container: spec.name.clone(),
                message,
            });
        }
        let (sandbox, ip) = self.sandbox(spec).await?;
        let name = container_name(spec, &format!("{}_{}", spec.name, spec.restart_count));
        let labels = HashMap::from([
            (LABEL_NODE.to_string(), self.node.clone()),
            (LABEL_UID.to_string(), spec.pod_uid.clone()),
            (LABEL_NAMESPACE.to_string(), spec.pod_namespace.clone()),
            (LABEL_POD.to_string(), spec.pod_name.clone()),
            (LABEL_CONTAINER.to_string(), spec.name.clone()),
            (LABEL_RESTARTS.to_string(), spec.restart_count.to_string()),
        ]);
        let env = spec
            .env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "POD_IP" => format!("POD_IP={ip}"),
                _ => format!("{k}={v}"),
            })
            .collect();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            // Kubernetes' rules: `command` replaces the image's entrypoint (and drops its
            // cmd), `args` replaces its cmd.
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            env: Some(env),
            working_dir: (!spec.working_dir.is_empty()).then(|| spec.working_dir.clone()),
            labels: Some(labels),
            host_config: Some(HostConfig {
                network_mode: Some(format!("container:{sandbox}")),
                // The engine's init as pid 1: the container's command gets signals as it
                // would outside a container (SIGTERM ends a shell that does not trap it),
                // as with the process runtime, and orphans are reaped.
                init: Some(true),
                memory: (spec.memory_limit > 0).then_some(spec.memory_limit),
                memory_swap: (spec.memory_limit > 0).then_some(spec.memory_limit),
                nano_cpus: (spec.cpu_limit_milli > 0).then_some(spec.cpu_limit_milli * 1_000_000),
                // volumeMounts: the node's volume directories, bound where the pod says.
                binds: (!spec.mounts.is_empty()).then(|| {
                    spec.mounts
                        .iter()
                        .map(|m| {
                            let mode = if m.read_only { "ro" } else { "rw" };
                            format!("{}:{}:{mode}", m.host_path.display(), m.container_path)
                        })
                        .collect()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = || CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = match self
            .docker
            .create_container(Some(opts()), body.clone())
            .await
        {
            Ok(c) => c,
            // Left over from an agent that died between creating and starting it.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.force_remove(&name).await;
                self.docker
                    .create_container(Some(opts()), body)
                    .await
                    .map_err(|e| start_error(&spec.name, "creating the container", e))?
            }
            Err(e) => return Err(start_error(&spec.name, "creating the container", e)),
        };
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.force_remove(&created.id).await;
            return Err(start_error(&spec.name, "starting the container", e));
        }
        self.follow(&created.id);
        Ok(created.id)
    }

    async fn state(&self, id: &str) -> ContainerState {
        let c = match self.docker.inspect_container(id, None).await {
            Ok(c) => c,
            Err(e) if is_not_found(&e) => return ContainerState::Missing,
            Err(e) => {
                // The engine is unreachable: say nothing has changed rather than guess.
                tracing::warn!("docker: inspecting {id}: {e}");
                return ContainerState::Running {
                    started_at: SystemTime::now(),
                };
            }
        };
        let Some(s) = c.state else {
            return ContainerState::Missing;
        };
        let started_at = docker_time(s.started_at.as_ref()).unwrap_or_else(SystemTime::now);
        if s.running == Some(true) {
            return ContainerState::Running { started_at };
        }
        let code = s.exit_code.unwrap_or(0) as i32;
        let signal = if (129..160).contains(&code) {
            code - 128
        } else {
            0
        };
        let finished_at = docker_time(s.finished_at.as_ref()).unwrap_or(started_at);
        let mut oom = s.oom_killed == Some(true);
        let limited = c
            .host_config
            .as_ref()
            .and_then(|h| h.memory)
            .is_some_and(|m| m > 0);
        let fresh = finished_at.elapsed().is_ok_and(|e| e < OOM_FLAG_WAIT * 2);
        if !oom && signal == 9 && limited && fresh {
            oom = self.oom_flag_arrives(id).await;
        }
        ContainerState::Exited {
            exit_code: code,
            signal,
            reason: exit_reason(code, signal, oom),
            started_at,
            finished_at,
        }
    }

    async fn stop(&self, id: &str, grace: Duration) {
        let t = grace.as_secs_f64().ceil() as i32;
        let opts = StopContainerOptions {
            t: Some(t),
            ..Default::default()
        };
        match self.docker.stop_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            // 304: already stopped.
            Err(DockerError::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            Err(e) => tracing::warn!("docker: stopping {id}: {e}"),
        }
    }

    async fn remove(&self, id: &str) {
        let uid = self
            .docker
            .inspect_container(id, None)
            .await
            .ok()
            .and_then(|c| c.config?.labels?.get(LABEL_UID).cloned());
        self.force_remove(id).await;
        self.followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        for f in self.log_files(id) {
            let _ = tokio::fs::remove_file(f).await;
        }
        // The pod's last container gone: its sandbox goes too.
        if let Some(uid) = uid {
            let left = self.ours(Some(format!("{LABEL_UID}={uid}"))).await;
            if left.iter().all(|(_, l, _)| l.contains_key(LABEL_SANDBOX)) {
                for (sandbox, _, _) in left {
                    self.force_remove(&sandbox).await;
                }
            }
        }
    }

    async fn exec(
        &self,
        id: &str,
        _spec: &ContainerSpec,
        command: &[String],
        timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        let run = async {
            let exec = self
                .docker
                .create_exec(
                    id,
                    CreateExecOptions {
                        cmd: Some(command.to_vec()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| other("exec", e))?;
            if let StartExecResults::Attached { mut output, .. } = self
                .docker
                .start_exec(&exec.id, None)
                .await
                .map_err(|e| other("exec", e))?
            {
                while output.next().await.is_some() {}
            }
            let inspect = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| other("exec", e))?;
            Ok(inspect.exit_code.unwrap_or(-1) as i32)
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| RuntimeError::Other(format!("exec timed out after {timeout:?}")))?
    }

    async fn list(&self) -> Vec<ContainerRecord> {
        let mut out = Vec::new();
        for (id, labels, _) in self.ours(None).await {
            if labels.contains_key(LABEL_SANDBOX) {
                continue;
            }
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let state = self.state(&id).await;
            if state == ContainerState::Missing {
                continue;
            }
            self.follow(&id);
            out.push(ContainerRecord {
                pod_uid: label(LABEL_UID),
                pod_namespace: label(LABEL_NAMESPACE),
                pod_name: label(LABEL_POD),
                container: label(LABEL_CONTAINER),
                restart_count: label(LABEL_RESTARTS).parse().unwrap_or(0),
                state,
                id,
            });
        }
        out
    }

    fn log_files(&self, id: &str) -> Vec<PathBuf> {
        let current = self.logs.join(format!("{id}.log"));
        vec![current.clone(), current.with_extension("log.1")]
    }

    async fn stopped_all(&self) {
        for (id, labels, state) in self.ours(None).await {
            if labels.contains_key(LABEL_SANDBOX) && state == "running" {
                self.stop(&id, Duration::from_secs(1)).await;
            }
        }
    }

    async fn pod_ip(&self, pod_uid: &str) -> Option<String> {
        let sandbox = self
            .ours(Some(format!("{LABEL_UID}={pod_uid}")))
            .await
            .into_iter()
            .find(|(_, l, _)| l.contains_key(LABEL_SANDBOX))?;
        ip_of(&self.docker.inspect_container(&sandbox.0, None).await.ok()?)
    }
}

/// `flotilla agent-pause`: the sandbox's only process. Holds the pod's namespaces, reaps
/// orphans (it is pid 1), and exits on SIGTERM or SIGINT.
pub fn pause_main() -> i32 {
    extern "C" fn noop(_: libc::c_int) {}
    // SAFETY: plain signal-mask and handler calls on this single-threaded process; the
    // handler does nothing, so no state is shared with it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            // pid 1 gets only the signals it handles: install a handler, then wait.
            libc::signal(sig, noop as *const () as libc::sighandler_t);
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            } else {
                return 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_interpreter_of_this_test_binary() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let interp = elf_interpreter(&exe).expect("a dynamically linked test binary");
        assert!(
            interp.starts_with('/') && interp.contains("ld-"),
            "{interp}"
        );
        assert_eq!(elf_interpreter(b"not an elf"), None);
        // Truncated or hostile headers give None, not a panic.
        assert_eq!(elf_interpreter(&exe[..0x40]), None);
        let mut bad = exe[..0x40].to_vec();
        bad[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(elf_interpreter(&bad), None);
    }

    #[test]
    fn docker_times_parse_and_never_is_none() {
        assert!(docker_time(Some(&"2026-11-25T11:30:00.123456789Z".to_string())).is_some());
        assert_eq!(docker_time(Some(&"0001-01-01T00:00:00Z".to_string())), None);
        assert_eq!(docker_time(None), None);
    }
}
