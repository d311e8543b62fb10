//! `flotilla auth can-i`: kubectl's question, "may I (or USER) do VERB on RESOURCE?",
//! answered by the members' authorizer (the code that decides every request) through an
//! access review.

use anyhow::bail;
use clap::{Args, Subcommand};
use flotilla_proto::api::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};

use crate::verbs::{ServerArg, server_error};

#[derive(Args, Debug)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Check whether an action is allowed: prints `yes`, or `no` and why (exit code 1), as
    /// `kubectl auth can-i`.
    CanI(CanIArgs),
}

#[derive(Args, Debug)]
struct CanIArgs {
    /// The verb: get, list, watch, create, update, patch, delete.
    verb: String,
    /// The resource: `pods`, `po`, `deployments.apps`, or `TYPE/NAME`.
    resource: String,
    /// The object's name.
    name: Option<String>,
    /// The namespace (default: the kubeconfig's, else `default`).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Ask about every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// The subresource: `status`, `log`, `binding`.
    #[arg(long)]
    subresource: Option<String>,
    /// Ask about USER instead of yourself (needs system:masters).
    #[arg(long = "as", value_name = "USER")]
    as_user: Option<String>,
    /// A group of --as's user (repeat for several).
    #[arg(long = "as-group", value_name = "GROUP")]
    as_groups: Vec<String>,
    /// Print nothing: the exit code answers.
    #[arg(short, long)]
    quiet: bool,
}

pub async fn run(server: &ServerArg, args: AuthArgs) -> anyhow::Result<()> {
    match args.command {
        AuthCommand::CanI(a) => can_i(server, a).await,
    }
}

async fn can_i(server: &ServerArg, a: CanIArgs) -> anyhow::Result<()> {
    let (resource, name) = match (a.resource.split_once('/'), &a.name) {
        (Some(_), Some(_)) => bail!("give the name once: TYPE/NAME or TYPE NAME"),
        (Some((t, n)), None) => (t.to_string(), n.to_string()),
        (None, n) => (a.resource.clone(), n.clone().unwrap_or_default()),
    };
    // `deployments.apps`: the resource and its group; else the kind's own.
    let (resource, group, version, namespaced) = match flotilla_proto::api::find_kind(&resource) {
        Some(k) => {
            let (group, version) = k.api_version.split_once('/').unwrap_or(("", k.api_version));
            (
                k.plural.to_string(),
                group.to_string(),
                version.to_string(),
                k.namespaced,
            )
        }
        None => match resource.split_once('.') {
            Some((plural, group)) => match flotilla_proto::api::find_kind(plural) {
                Some(k) if k.api_version.split_once('/').map_or("", |g| g.0) == group => {
                    let version = k.api_version.rsplit('/').next().unwrap_or("v1");
                    (k.plural.into(), group.into(), version.into(), k.namespaced)
                }
                _ => {
                    unknown(&resource, a.quiet);
                    (plural.into(), group.into(), String::new(), true)
                }
            },
            None => {
                unknown(&resource, a.quiet);
                (resource.clone(), String::new(), String::new(), true)
            }
        },
    };
    let namespace = if !namespaced || a.all_namespaces {
        String::new()
    } else {
        match &a.namespace {
            Some(ns) => ns.clone(),
            None => server
                .kubeconfig()?
                .and_then(|k| k.namespace)
                .unwrap_or_else(|| "default".into()),
        }
    };
    let review = SubjectAccessReview {
        spec: Some(SubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace,
                verb: a.verb.clone(),
                group,
                version,
                resource,
                subresource: a.subresource.clone().unwrap_or_default(),
                name,
            }),
            user: a.as_user.clone().unwrap_or_default(),
            groups: a.as_groups.clone(),
            uid: String::new(),
        }),
        ..Default::default()
    };
    if a.as_user.is_none() && !a.as_groups.is_empty() {
        bail!("--as-group needs --as");
    }
    let client = server.client()?;
    let path = if a.as_user.is_some() {
        "/flotilla.api.v1.AccessReviews/Create"
    } else {
        "/flotilla.api.v1.AccessReviews/CreateSelf"
    };
    let answer: SubjectAccessReview = client.unary(path, review).await.map_err(server_error)?;
    let status = answer.status.unwrap_or_default();
    if status.allowed {
        if !a.quiet {
            println!("yes");
        }
        return Ok(());
    }
    if !a.quiet {
        if status.reason.is_empty() {
            println!("no");
        } else {
            println!("no - {}", status.reason);
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(1);
}

fn unknown(resource: &str, quiet: bool) {
    if !quiet {
        eprintln!("Warning: the server doesn't have a resource type '{resource}'");
    }
}
