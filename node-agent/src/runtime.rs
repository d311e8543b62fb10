//! The `Runtime` trait, the CRI of this project, and the fake runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// What a runtime needs to start one container of a pod.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    /// The n-th start of this container in the pod (0 for the first).
    pub restart_count: i32,
    /// cpu limit in millicores (0: none).
    pub cpu_limit_milli: i64,
    /// memory limit in bytes (0: none).
    pub memory_limit: i64,
    /// The node's directories and files mounted into the container (its volumeMounts).
    pub mounts: Vec<crate::volumes::Mount>,
}

/// A container as the runtime knows it.
#[derive(Clone, Debug, PartialEq)]
pub enum ContainerState {
    Running {
        started_at: SystemTime,
    },
    Exited {
        exit_code: i32,
        signal: i32,
        /// `Completed`, `Error`, `OOMKilled`, `Killed`, …
        reason: String,
        started_at: SystemTime,
        finished_at: SystemTime,
    },
    /// The runtime has no such container.
    Missing,
}

/// A container found on the node (to adopt after an agent restart).
#[derive(Clone, Debug)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_uid: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub container: String,
    pub restart_count: i32,
    pub state: ContainerState,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {container}: {message}")]
    Start { container: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// The container runtime interface. Implementations: [`crate::process::ProcessRuntime`]
/// (child processes), [`crate::docker::DockerRuntime`] (containers through the Docker
/// Engine API) and [`FakeRuntime`] (runs nothing).
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Starts a container; returns its id.
    fn start(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    fn state(&self, id: &str) -> impl Future<Output = ContainerState> + Send;

    /// SIGTERM, then SIGKILL after `grace`; returns once the container has stopped.
    fn stop(&self, id: &str, grace: Duration) -> impl Future<Output = ()> + Send;

    /// Forgets a stopped container (its files).
    fn remove(&self, id: &str) -> impl Future<Output = ()> + Send;

    /// Runs `command` in the container's environment; its exit code.
    fn exec(
        &self,
        id: &str,
        spec: &ContainerSpec,
        command: &[String],
        timeout: Duration,
    ) -> impl Future<Output = Result<i32, RuntimeError>> + Send;

    /// Every container the runtime knows of.
    fn list(&self) -> impl Future<Output = Vec<ContainerRecord>> + Send;

    /// Where a container's output is kept (current file first, then older ones).
    fn log_files(&self, id: &str) -> Vec<PathBuf>;

    /// The pod's own address, when the runtime gives pods one (`None`: pods share the
    /// node's network and its address).
    fn pod_ip(&self, _pod_uid: &str) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }

    /// Every container was stopped (the agent exits with `--stop-containers-on-exit`):
    /// whatever the runtime keeps per pod can stop too.
    fn stopped_all(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Runs nothing: containers are running from the moment they start until stopped.
#[derive(Default)]
pub struct FakeRuntime {
    containers: Mutex<HashMap<String, (ContainerRecord, ContainerSpec)>>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let id = format!("{}-{}-{}", spec.pod_uid, spec.name, spec.restart_count);
        let record = ContainerRecord {
            id: id.clone(),
            pod_uid: spec.pod_uid.clone(),
            pod_namespace: spec.pod_namespace.clone(),
            pod_name: spec.pod_name.clone(),
            container: spec.name.clone(),
            restart_count: spec.restart_count,
            state: ContainerState::Running {
                started_at: SystemTime::now(),
            },
        };
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), (record, spec.clone()));
        Ok(id)
    }

    async fn state(&self, id: &str) -> ContainerState {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|(r, _)| r.state.clone())
            .unwrap_or(ContainerState::Missing)
    }

    async fn stop(&self, id: &str, _grace: Duration) {
        let mut c = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, _)) = c.get_mut(id)
            && let ContainerState::Running { started_at } = r.state
        {
            r.state = ContainerState::Exited {
                exit_code: 0,
                signal: libc::SIGTERM,
                reason: "Completed".into(),
                started_at,
                finished_at: SystemTime::now(),
            };
        }
    }

    async fn remove(&self, id: &str) {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    async fn exec(
        &self,
        _id: &str,
        _spec: &ContainerSpec,
        _command: &[String],
        _timeout: Duration,
    ) -> Result<i32, RuntimeError> {
        Ok(0)
    }

    async fn list(&self) -> Vec<ContainerRecord> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(r, _)| r.clone())
            .collect()
    }

    fn log_files(&self, _id: &str) -> Vec<PathBuf> {
        Vec::new()
    }
}
