//! The Docker harness: the same topology as the process harness, as containers built from a
//! local image (`FROM scratch`: the `flotilla` binary and the shared libraries it links),
//! on two private networks. Clients and agents reach members over the control network
//! (and the host through published ports); members reach each other over the peer network
//! by alias, so a partition is a `docker network disconnect` from the peer network, a kill
//! is `docker kill -s KILL`, a pause is `docker pause` (the cgroup freezer).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tokio::process::Command;

/// Port members listen on inside their containers.
pub const CLIENT_PORT: u16 = 7379;
pub const PEER_PORT: u16 = 7380;

/// Marks the images the harness builds, so the ones it replaces can be pruned.
const IMAGE_LABEL: &str = "org.flotilla.chaos";

/// Whether a Docker engine answers.
pub async fn available() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

async fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .await
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds the image `tag` from `binary` and the shared libraries `ldd` says it needs.
pub async fn build_image(binary: &Path, dir: &Path, tag: &str) -> anyhow::Result<()> {
    let ctx = dir.join("image");
    if ctx.exists() {
        std::fs::remove_dir_all(&ctx)?;
    }
    std::fs::create_dir_all(&ctx)?;
    std::fs::copy(binary, ctx.join("flotilla")).context("copying the binary")?;
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .await
        .context("running ldd")?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim().split(' ').next().unwrap_or(""),
            None => line.trim().split(' ').next().unwrap_or(""),
        };
        if !path.starts_with('/') {
            continue;
        }
        let target = ctx.join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Copies what a symlink points at, under the name the binary asks for.
        std::fs::copy(path, &target).with_context(|| format!("copying {path}"))?;
    }
    std::fs::create_dir_all(ctx.join("tmp"))?;
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM scratch\nLABEL {IMAGE_LABEL}=1\nCOPY . /\nENTRYPOINT [\"/flotilla\"]\n"),
    )?;
    let ctx_str = ctx.to_string_lossy().to_string();
    let built = docker(&["build", "-q", "-t", tag, &ctx_str]).await;
    let _ = std::fs::remove_dir_all(&ctx);
    built?;
    // The image this tag named before, if any, is left dangling: remove it.
    let filter = format!("label={IMAGE_LABEL}");
    let _ = docker(&["image", "prune", "-f", "--filter", &filter]).await;
    Ok(())
}

/// A run's networks and containers.
pub struct DockerEnv {
    pub prefix: String,
    pub image: String,
    pub control_net: String,
    pub peer_net: String,
    containers: Vec<String>,
}

impl DockerEnv {
    /// Builds the image and creates the two networks.
    pub async fn create(binary: &Path, dir: &Path, prefix: &str) -> anyhow::Result<Self> {
        let image = "flotilla-chaos:local".to_string();
        build_image(binary, dir, &image).await?;
        let control_net = format!("{prefix}-control");
        let peer_net = format!("{prefix}-peer");
        docker(&["network", "create", &control_net]).await?;
        docker(&["network", "create", &peer_net]).await?;
        Ok(Self {
            prefix: prefix.to_string(),
            image,
            control_net,
            peer_net,
            containers: Vec::new(),
        })
    }

    pub fn container(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// Creates and starts a container for `name` running `flotilla ARGS`; `published` maps a
    /// host loopback port to the client port; `alias` puts it on the peer network under that
    /// name.
    pub async fn run(
        &mut self,
        name: &str,
        args: &[String],
        published: Option<u16>,
        alias: Option<&str>,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let container = self.container(name);
        let mut create: Vec<String> = vec![
            "create".into(),
            "--name".into(),
            container.clone(),
            "--network".into(),
            self.control_net.clone(),
            "--hostname".into(),
            container.clone(),
        ];
        if let Some(port) = published {
            create.push("-p".into());
            create.push(format!("127.0.0.1:{port}:{CLIENT_PORT}"));
        }
        for (k, v) in env {
            create.push("-e".into());
            create.push(format!("{k}={v}"));
        }
        create.push(self.image.clone());
        create.extend(args.iter().cloned());
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        docker(&create).await?;
        self.containers.push(container.clone());
        if let Some(alias) = alias {
            self.connect(name, alias).await?;
        }
        docker(&["start", &container]).await?;
        Ok(())
    }

    pub async fn start(&self, name: &str) -> anyhow::Result<()> {
        docker(&["start", &self.container(name)]).await.map(|_| ())
    }

    pub async fn kill(&self, name: &str) -> anyhow::Result<()> {
        docker(&["kill", "-s", "KILL", &self.container(name)])
            .await
            .map(|_| ())
    }

    pub async fn pause(&self, name: &str) -> anyhow::Result<()> {
        docker(&["pause", &self.container(name)]).await.map(|_| ())
    }

    pub async fn unpause(&self, name: &str) -> anyhow::Result<()> {
        docker(&["unpause", &self.container(name)])
            .await
            .map(|_| ())
    }

    /// Cuts the container off the peer network.
    pub async fn disconnect(&self, name: &str) -> anyhow::Result<()> {
        docker(&[
            "network",
            "disconnect",
            "-f",
            &self.peer_net,
            &self.container(name),
        ])
        .await
        .map(|_| ())
    }

    /// Puts the container (back) on the peer network as `alias`.
    pub async fn connect(&self, name: &str, alias: &str) -> anyhow::Result<()> {
        docker(&[
            "network",
            "connect",
            "--alias",
            alias,
            &self.peer_net,
            &self.container(name),
        ])
        .await
        .map(|_| ())
    }

    /// Whether the container's process runs (None if it cannot be told).
    pub async fn running(&self, name: &str) -> Option<bool> {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.container(name)])
            .await
            .ok()
            .map(|s| s == "true")
    }

    /// Appends the container's output (across its restarts) to `path`.
    pub async fn save_logs(&self, name: &str, path: &Path) {
        if let Ok(out) = Command::new("docker")
            .args(["logs", "--timestamps", &self.container(name)])
            .output()
            .await
        {
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            use std::io::Write as _;
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = f.write_all(&text);
            }
        }
    }

    pub async fn remove(&mut self, name: &str) -> anyhow::Result<()> {
        let container = self.container(name);
        docker(&["rm", "-f", &container]).await?;
        self.containers.retain(|c| *c != container);
        Ok(())
    }

    /// Removes every container and both networks.
    pub async fn destroy(&mut self) {
        for c in std::mem::take(&mut self.containers) {
            let _ = docker(&["rm", "-f", &c]).await;
        }
        let _ = docker(&["network", "rm", &self.control_net]).await;
        let _ = docker(&["network", "rm", &self.peer_net]).await;
    }
}

/// Where a member's data lives inside its container.
pub fn data_dir() -> PathBuf {
    PathBuf::from("/data")
}
