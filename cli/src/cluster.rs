//! `flotilla cluster`: the control plane's members and their Raft state.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use flotilla_proto::etcdserverpb::cluster_client::ClusterClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    StatusRequest, StatusResponse,
};
use flotilla_transport::Dialer;
use tonic::transport::Channel;

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub server: crate::verbs::ServerArg,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Each member, who leads, the term, commit and applied index.
    Status,
    /// Add a member that will listen for peers at PEER_ADDR (`add [NAME] PEER_ADDR`); then
    /// start it, as the command printed says, with `--initial-cluster-state existing`.
    Add {
        /// The new member's --name (used in the start command printed), then its
        /// --peer-addr (HOST:PORT); the name may be left out.
        #[arg(num_args = 1..=2, required = true, value_names = ["NAME", "PEER_ADDR"])]
        args: Vec<String>,
        /// Add it as a non-voting learner (promote it once caught up).
        #[arg(long)]
        learner: bool,
    },
    /// Promote a learner to a voting member.
    Promote {
        /// Member id (hex, as `cluster status` prints it) or name.
        member: String,
    },
    /// Remove a member.
    Remove {
        /// Member id (hex, as `cluster status` prints it) or name.
        member: String,
    },
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let (servers, dialer) = args.server.target()?;
    let (channel, addr) = connect_any(&servers, &dialer).await?;
    let mut cluster = ClusterClient::new(channel.clone());
    let members = cluster
        .member_list(MemberListRequest {
            linearizable: false,
        })
        .await
        .with_context(|| format!("listing members via {addr}"))?
        .into_inner()
        .members;
    match args.command {
        ClusterCommand::Status => status(&members, &dialer).await,
        ClusterCommand::Add { args, learner } => {
            let (name, peer_addr) = match args.as_slice() {
                [peer] => ("NAME".to_string(), peer.clone()),
                [name, peer] => (name.clone(), peer.clone()),
                _ => bail!("cluster add takes [NAME] PEER_ADDR"),
            };
            let r = cluster
                .member_add(MemberAddRequest {
                    peer_ur_ls: vec![format!("http://{peer_addr}")],
                    is_learner: learner,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let id = r.member.map_or(0, |m| m.id);
            println!(
                "added member {id:x} (peer {peer_addr}{})",
                if learner { ", learner" } else { "" }
            );
            println!(
                "start it with: flotilla server --name {name} --peer-addr {peer_addr} --client-addr HOST:PORT \
                 --initial-cluster-state existing --initial-cluster {}",
                members
                    .iter()
                    .filter(|m| !m.name.is_empty() && m.name != name)
                    .filter_map(|m| Some(format!(
                        "{}={}",
                        m.name,
                        m.peer_ur_ls
                            .first()?
                            .trim_start_matches("http://")
                            .trim_start_matches("https://")
                    )))
                    .chain([format!("{name}={peer_addr}")])
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if members
                .iter()
                .any(|m| m.peer_ur_ls.iter().any(|u| u.starts_with("https://")))
            {
                println!(
                    "and the TLS flags the other members have: --cert-file --key-file \
                     --trusted-ca-file --client-cert-auth --peer-cert-file --peer-key-file \
                     --peer-trusted-ca-file, with a member certificate for {name} \
                     (flotilla certs issue --kind member; docs/security.md)"
                );
            }
            Ok(())
        }
        ClusterCommand::Promote { member } => {
            let id = resolve(&members, &member)?;
            cluster
                .member_promote(MemberPromoteRequest { id })
                .await
                .map_err(status_error)?;
            println!("promoted member {id:x}");
            Ok(())
        }
        ClusterCommand::Remove { member } => {
            let id = resolve(&members, &member)?;
            cluster
                .member_remove(MemberRemoveRequest { id })
                .await
                .map_err(status_error)?;
            println!("removed member {id:x}");
            Ok(())
        }
    }
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

fn resolve(members: &[Member], which: &str) -> anyhow::Result<u64> {
    if let Some(m) = members.iter().find(|m| m.name == which) {
        return Ok(m.id);
    }
    let id = u64::from_str_radix(which.trim_start_matches("0x"), 16)
        .map_err(|_| anyhow!("no member is named `{which}`, and it is not a hex member id"))?;
    if members.iter().any(|m| m.id == id) {
        Ok(id)
    } else {
        Err(anyhow!("no member has id {id:x}"))
    }
}

async fn connect(addr: &str, dialer: &Dialer) -> anyhow::Result<Channel> {
    Ok(dialer
        .endpoint(addr)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Connects to the first server that answers.
pub async fn connect_any(servers: &[String], dialer: &Dialer) -> anyhow::Result<(Channel, String)> {
    let mut errors = Vec::new();
    for s in servers {
        match connect(s, dialer).await {
            Ok(ch) => return Ok((ch, s.to_string())),
            Err(e) => errors.push(format!("{s}: {e:#}")),
        }
    }
    Err(anyhow!(
        "no control-plane member answered ({}); set --server or FLOTILLA_SERVER",
        errors.join("; ")
    ))
}

async fn member_status(m: &Member, dialer: &Dialer) -> Result<StatusResponse, String> {
    let Some(url) = m.client_ur_ls.first() else {
        return Err("not started yet".into());
    };
    let ch = connect(url, dialer)
        .await
        .map_err(|e| format!("unreachable: {e:#}"))?;
    MaintenanceClient::new(ch)
        .status(StatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("unreachable: {}", s.message()))
}

async fn status(members: &[Member], dialer: &Dialer) -> anyhow::Result<()> {
    let statuses =
        futures::future::join_all(members.iter().map(|m| member_status(m, dialer))).await;
    let leader = statuses
        .iter()
        .filter_map(|s| s.as_ref().ok())
        .map(|s| (s.leader, s.raft_term))
        .max_by_key(|(_, t)| *t);
    let mut rows = vec![
        [
            "NAME", "ID", "ROLE", "PEER", "CLIENT", "TERM", "COMMIT", "APPLIED", "REVISION",
            "DB SIZE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (m, s) in members.iter().zip(&statuses) {
        let mut row = vec![
            if m.name.is_empty() {
                "(unstarted)".into()
            } else {
                m.name.clone()
            },
            format!("{:x}", m.id),
        ];
        match s {
            Ok(s) => {
                let role = if m.is_learner {
                    "learner"
                } else if s.leader == m.id {
                    "leader"
                } else {
                    "follower"
                };
                row.push(role.into());
                row.push(m.peer_ur_ls.first().cloned().unwrap_or_default());
                row.push(m.client_ur_ls.first().cloned().unwrap_or_default());
                row.push(s.raft_term.to_string());
                row.push(s.raft_index.to_string());
                row.push(s.raft_applied_index.to_string());
                row.push(s.header.map_or(0, |h| h.revision).to_string());
                row.push(human_bytes(s.db_size));
            }
            Err(e) => {
                row.push(e.clone());
                row.push(m.peer_ur_ls.first().cloned().unwrap_or_default());
                row.push(m.client_ur_ls.first().cloned().unwrap_or_default());
                row.extend(["-", "-", "-", "-", "-"].map(String::from));
            }
        }
        rows.push(row);
    }
    print_table(&rows);
    match leader {
        Some((id, term)) if id != 0 => {
            let name = members
                .iter()
                .find(|m| m.id == id)
                .map_or("?", |m| m.name.as_str());
            println!("\nleader: {name} ({id:x}), term {term}");
        }
        _ => println!("\nleader: none known"),
    }
    Ok(())
}

fn human_bytes(b: i64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("   ").trim_end());
    }
}
