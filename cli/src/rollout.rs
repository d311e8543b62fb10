//! `flotilla rollout status|undo|history|pause|resume deployment NAME`, as kubectl's.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use flotilla_client::Client;
use flotilla_proto::api::{Deployment, ListRequest, ReplicaSet, Resource};
use serde_json::json;

use crate::table::render;
use crate::verbs::{NamespaceArgs, ServerArg, kind_arg, qualified, server_error};

const HASH_LABEL: &str = "pod-template-hash";
const REVISION: &str = "deployment.kubernetes.io/revision";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

#[derive(Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Args)]
pub struct Target {
    /// `deployment NAME` or `deployment/NAME`.
    pub target: Vec<String>,
    #[command(flatten)]
    pub ns: NamespaceArgs,
}

#[derive(Subcommand)]
pub enum Action {
    /// Follow a rollout until it completes; exits 1 if it exceeds its progress deadline or
    /// --timeout.
    Status {
        #[command(flatten)]
        target: Target,
        /// Give up after this long (0: never).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Roll back to the previous revision, or to --to-revision.
    Undo {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 0)]
        to_revision: i64,
    },
    /// List the revisions.
    History {
        #[command(flatten)]
        target: Target,
    },
    /// Stop rolling out changes to the template until resumed.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Resume a paused deployment.
    Resume {
        #[command(flatten)]
        target: Target,
    },
}

/// The deployment's name from `deployment NAME` or `deployment/NAME`.
fn deployment_name(target: &[String]) -> anyhow::Result<String> {
    let (kind, name) = match target {
        [one] => one
            .split_once('/')
            .map(|(k, n)| (k.to_string(), n.to_string()))
            .ok_or_else(|| anyhow!("give deployment NAME or deployment/NAME"))?,
        [k, n] => (k.clone(), n.clone()),
        _ => bail!("give deployment NAME or deployment/NAME"),
    };
    let kind = kind_arg(&kind)?;
    if kind.kind != Deployment::KIND {
        bail!("rollout works on deployments, not {}", kind.plural);
    }
    if name.is_empty() {
        bail!("the deployment's name is empty");
    }
    Ok(name)
}

fn shown(name: &str) -> String {
    qualified(kind_arg("deployment").expect("a known kind"), name)
}

pub async fn run(server: &ServerArg, args: RolloutArgs) -> anyhow::Result<()> {
    let client = server.client()?;
    match args.action {
        Action::Status { target, timeout } => {
            let name = deployment_name(&target.target)?;
            status(&client, &target.ns.get(), &name, timeout).await
        }
        Action::Undo {
            target,
            to_revision,
        } => {
            let name = deployment_name(&target.target)?;
            undo(&client, &target.ns.get(), &name, to_revision).await
        }
        Action::History { target } => {
            let name = deployment_name(&target.target)?;
            history(&client, &target.ns.get(), &name).await
        }
        Action::Pause { target } => {
            let name = deployment_name(&target.target)?;
            set_paused(&client, &target.ns.get(), &name, true).await
        }
        Action::Resume { target } => {
            let name = deployment_name(&target.target)?;
            set_paused(&client, &target.ns.get(), &name, false).await
        }
    }
}

/// Kubernetes' rollout-status wording for where the rollout stands; `Ok(None)` when done.
fn progress(d: &Deployment) -> anyhow::Result<Option<String>> {
    let name = d.name();
    let meta = d.metadata.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let status = d.status.clone().unwrap_or_default();
    if status.observed_generation < meta.generation {
        return Ok(Some(
            "Waiting for deployment spec update to be observed...".into(),
        ));
    }
    if status
        .conditions
        .iter()
        .any(|c| c.r#type == "Progressing" && c.reason == "ProgressDeadlineExceeded")
    {
        bail!("deployment {name:?} exceeded its progress deadline");
    }
    let want = spec.replicas.unwrap_or(1);
    if spec.paused {
        return Ok(Some(format!(
            "Waiting for deployment {name:?} rollout to finish: it is paused (flotilla rollout resume deployment/{name})"
        )));
    }
    if status.updated_replicas < want {
        return Ok(Some(format!(
            "Waiting for deployment {name:?} rollout to finish: {} out of {want} new replicas have been updated...",
            status.updated_replicas
        )));
    }
    if status.replicas > status.updated_replicas {
        return Ok(Some(format!(
            "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
            status.replicas - status.updated_replicas
        )));
    }
    if status.available_replicas < status.updated_replicas {
        return Ok(Some(format!(
            "Waiting for deployment {name:?} rollout to finish: {} of {} updated replicas are available...",
            status.available_replicas, status.updated_replicas
        )));
    }
    Ok(None)
}

async fn status(client: &Client, ns: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        let d = client
            .get::<Deployment>(ns, name)
            .await
            .map_err(server_error)?;
        match progress(&d)? {
            None => {
                println!("deployment {name:?} successfully rolled out");
                return Ok(());
            }
            Some(line) => {
                if line != last {
                    println!("{line}");
                    last = line;
                }
            }
        }
        if !timeout.is_zero() && start.elapsed() >= timeout {
            bail!(
                "timed out after {} waiting for the rollout to finish",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The deployment's ReplicaSets, by revision.
async fn revisions(
    client: &Client,
    ns: &str,
    d: &Deployment,
) -> anyhow::Result<Vec<(i64, ReplicaSet)>> {
    let uid = d
        .metadata
        .as_ref()
        .map(|m| m.uid.clone())
        .unwrap_or_default();
    let (sets, _) = client
        .list::<ReplicaSet>(&ListRequest {
            namespace: ns.to_string(),
            ..Default::default()
        })
        .await
        .map_err(server_error)?;
    let mut out: Vec<(i64, ReplicaSet)> = sets
        .into_iter()
        .filter(|rs| {
            rs.metadata.as_ref().is_some_and(|m| {
                m.owner_references
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true))
            })
        })
        .map(|rs| {
            let rev = rs
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.get(REVISION))
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            (rev, rs)
        })
        .collect();
    out.sort_by_key(|(r, _)| *r);
    Ok(out)
}

async fn history(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let d = client
        .get::<Deployment>(ns, name)
        .await
        .map_err(server_error)?;
    let revs = revisions(client, ns, &d).await?;
    if revs.is_empty() {
        bail!("no rollout history found for deployment {name:?}");
    }
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|(r, rs)| {
            let cause = rs
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.get(CHANGE_CAUSE))
                .cloned()
                .unwrap_or_else(|| "<none>".into());
            vec![r.to_string(), cause]
        })
        .collect();
    println!("{}", shown(name));
    print!("{}", render(&["REVISION", "CHANGE-CAUSE"], &rows));
    Ok(())
}

async fn undo(client: &Client, ns: &str, name: &str, to: i64) -> anyhow::Result<()> {
    let d = client
        .get::<Deployment>(ns, name)
        .await
        .map_err(server_error)?;
    let revs = revisions(client, ns, &d).await?;
    let target = if to > 0 {
        revs.iter()
            .find(|(r, _)| *r == to)
            .ok_or_else(|| anyhow!("unable to find the specified revision {to}"))?
    } else {
        if revs.len() < 2 {
            bail!("no previous revision of deployment {name:?} to roll back to");
        }
        &revs[revs.len() - 2]
    };
    let mut template = target
        .1
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .ok_or_else(|| anyhow!("revision {} has no pod template", target.0))?;
    if let Some(m) = template.metadata.as_mut() {
        m.labels.remove(HASH_LABEL);
    }
    let current = d.spec.as_ref().and_then(|s| s.template.clone());
    if current.as_ref() == Some(&template) {
        println!(
            "{} skipped rollback (current template already matches revision {})",
            shown(name),
            target.0
        );
        return Ok(());
    }
    let mut updated = d.clone();
    updated.spec.get_or_insert_default().template = Some(template);
    client.update(&updated).await.map_err(server_error)?;
    println!("{} rolled back", shown(name));
    Ok(())
}

pub async fn set_paused(client: &Client, ns: &str, name: &str, paused: bool) -> anyhow::Result<()> {
    client
        .patch::<Deployment>(ns, name, &json!({"spec": {"paused": paused}}))
        .await
        .map_err(server_error)?;
    println!(
        "{} {}",
        shown(name),
        if paused { "paused" } else { "resumed" }
    );
    Ok(())
}
