//! The kubectl-like verbs: apply, get, describe, delete, scale.
//!
//! Exit codes: 0 when everything asked for was done; 1 when the server refused something or
//! could not be reached (the message says which object and why); 2 for a bad command line.

use std::io::Read;
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use flotilla_client::manifest::{self, Document};
use flotilla_client::watch::{WatchItem, watch};
use flotilla_client::{Client, ClientError, with_kind};
use flotilla_proto::api::json::to_value;
use flotilla_proto::api::*;
use serde_json::{Value, json};

use crate::table::{Columns, render};

/// Where the API is, and who calls it.
#[derive(Args, Debug, Clone)]
pub struct ServerArg {
    /// Control-plane nodes to use, in order (the client fails over to the next)
    /// [default: the kubeconfig's servers, else 127.0.0.1:7379,127.0.0.1:7381,127.0.0.1:7383].
    #[arg(long, env = "FLOTILLA_SERVER", global = true)]
    pub server: Option<String>,
    /// The kubeconfig with the servers, the cluster's CA and your certificate [default:
    /// the first file of $KUBECONFIG, else ./flotilla-data/admin.kubeconfig when it exists].
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
}

impl ServerArg {
    /// The servers to try, in order, and how to connect to them: `--server` when given
    /// (plaintext, unless a kubeconfig gives TLS settings), else the kubeconfig's servers,
    /// else `flotilla up`'s plaintext defaults.
    pub fn target(&self) -> anyhow::Result<(Vec<String>, flotilla_transport::Dialer)> {
        let kubeconfig = self.kubeconfig()?;
        let split = |s: &str| -> Vec<String> {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        Ok(match (&self.server, kubeconfig) {
            (Some(s), k) => (split(s), k.map(|k| k.dialer).unwrap_or_default()),
            (None, Some(k)) => (k.servers, k.dialer),
            (None, None) => (split(crate::DEFAULT_SERVERS), Default::default()),
        })
    }

    /// The kubeconfig in effect, read.
    pub fn kubeconfig(&self) -> anyhow::Result<Option<flotilla_client::kubeconfig::Target>> {
        flotilla_client::kubeconfig::find(self.kubeconfig.as_deref())
            .map(|p| flotilla_client::kubeconfig::load(&p))
            .transpose()
            .map_err(|e| anyhow!(e))
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let (servers, dialer) = self.target()?;
        Client::with_dialer(&servers, &dialer).map_err(|e| anyhow!(e))
    }
}

#[derive(Args, Debug)]
pub struct NamespaceArgs {
    /// The namespace (default: `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

impl NamespaceArgs {
    pub fn get(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| "default".into())
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Wide,
    Yaml,
    Json,
    Name,
}

/// A server error as kubectl words it: `Error from server (NotFound): pods "x" not found`.
pub fn server_error(e: ClientError) -> anyhow::Error {
    use tonic::Code;
    let reason = match e.code() {
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::Aborted => "Conflict",
        Code::InvalidArgument => "Invalid",
        Code::FailedPrecondition | Code::PermissionDenied => "Forbidden",
        Code::OutOfRange => "Expired",
        // An overloaded member (429) says when to come back; otherwise a request over the
        // size limit (kube-apiserver's 413).
        Code::ResourceExhausted if e.status.metadata().get("grpc-retry-pushback-ms").is_some() => {
            "TooManyRequests"
        }
        Code::ResourceExhausted => "RequestEntityTooLarge",
        Code::Unavailable => {
            return anyhow!("the control plane is unavailable: {}", e.status.message());
        }
        Code::DeadlineExceeded => "Timeout",
        Code::Unauthenticated => "Unauthorized",
        _ => "InternalError",
    };
    anyhow!("Error from server ({reason}): {}", e.status.message())
}

pub fn kind_arg(name: &str) -> anyhow::Result<&'static KindInfo> {
    find_kind(name).ok_or_else(|| {
        let known: Vec<&str> = KINDS.iter().map(|k| k.plural).collect();
        anyhow!(
            "the server doesn't have a resource type {name:?} (known: {})",
            known.join(", ")
        )
    })
}

/// `deployment.apps/web`, `pod/web`: how kubectl names an object in messages.
pub fn qualified(kind: &KindInfo, name: &str) -> String {
    match kind.api_version.split_once('/') {
        Some((group, _)) => format!("{}.{group}/{name}", kind.kind.to_lowercase()),
        None => format!("{}/{name}", kind.kind.to_lowercase()),
    }
}

fn read_manifest(file: &str) -> anyhow::Result<Vec<Document>> {
    // At most one byte past the limit is read: parse refuses the rest unread.
    let limit = manifest::MAX_MANIFEST_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    if file == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("reading the manifest from stdin")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("reading {file}"))?;
    }
    if bytes.len() > manifest::MAX_MANIFEST_BYTES {
        return Err(manifest::too_large(bytes.len())).with_context(|| format!("error in {file}"));
    }
    let text = String::from_utf8(bytes).with_context(|| format!("{file} is not UTF-8 text"))?;
    let docs = manifest::parse(&text).with_context(|| format!("error in {file}"))?;
    if docs.is_empty() {
        bail!("{file}: no objects in the manifest");
    }
    Ok(docs)
}

// ------------------------------------------------------------------- apply

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// A manifest (YAML or JSON, `---` between documents); `-` reads stdin.
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<String>,
    #[command(flatten)]
    pub ns: NamespaceArgs,
}

pub async fn apply(server: &ServerArg, args: ApplyArgs) -> anyhow::Result<()> {
    let docs = read_manifests(&args.files)?;
    let client = server.client()?;
    let mut outcomes = Vec::new();
    for doc in &docs {
        let outcome = with_kind!(doc.kind.kind, K => apply_one::<K>(&client, doc, args.ns.namespace.as_deref()).await);
        outcomes.push((doc, outcome));
    }
    report(outcomes, "applied")
}

/// Every document of `files`, in order.
fn read_manifests(files: &[String]) -> anyhow::Result<Vec<Document>> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(read_manifest(f)?);
    }
    Ok(docs)
}

/// Prints what happened to each document (`deployment.apps/web created`, or the error),
/// as kubectl does; fails if any failed.
fn report(outcomes: Vec<(&Document, anyhow::Result<&str>)>, verb: &str) -> anyhow::Result<()> {
    let mut failed = 0;
    for (doc, outcome) in outcomes {
        let name = qualified(doc.kind, doc.name());
        match outcome {
            Ok(what) => println!("{name} {what}"),
            Err(e) => {
                failed += 1;
                eprintln!("error: {name}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} object(s) not {verb}");
    }
    Ok(())
}

// ----------------------------------------------------------------- replace

/// Replaces each object of the manifests with the manifest's version, as kubectl replace
/// does: the object must exist; a `resourceVersion` in the manifest must be current. The
/// server writes the object even when nothing changed if it is stored otherwise than it
/// would be written now, so `get -A -o yaml | replace -f -` completes a rotation of
/// encryption keys (docs/security.md).
pub async fn replace(server: &ServerArg, args: ApplyArgs) -> anyhow::Result<()> {
    let docs = read_manifests(&args.files)?;
    let client = server.client()?;
    let namespace = args.ns.namespace.as_deref();
    let mut outcomes = Vec::new();
    for doc in &docs {
        let outcome = with_kind!(doc.kind.kind, K => {
            async {
                let mut object: K = doc.decode()?;
                if K::NAMESPACED && object.namespace().is_empty() {
                    object.metadata_mut().namespace = namespace.unwrap_or("default").to_string();
                }
                client.update(&object).await.map_err(server_error)?;
                anyhow::Ok("replaced")
            }
            .await
        });
        outcomes.push((doc, outcome));
    }
    report(outcomes, "replaced")
}

/// Creates the object, or patches the existing one with the manifest's fields; says which.
async fn apply_one<K: Resource>(
    client: &Client,
    doc: &Document,
    namespace: Option<&str>,
) -> anyhow::Result<&'static str> {
    let mut object: K = doc.decode()?;
    let ns = match (doc.namespace(), namespace) {
        ("", Some(ns)) => ns.to_string(),
        ("", None) => "default".to_string(),
        (ns, Some(flag)) if ns != flag && K::NAMESPACED => bail!(
            "the namespace in the manifest ({ns}) does not match the one given with -n ({flag})"
        ),
        (ns, _) => ns.to_string(),
    };
    if K::NAMESPACED {
        object.metadata_mut().namespace = ns.clone();
    }
    match client.get::<K>(&ns, doc.name()).await {
        Err(e) if e.is_not_found() => {
            client.create(&object).await.map_err(server_error)?;
            Ok("created")
        }
        Err(e) => Err(server_error(e)),
        Ok(existing) => {
            // The manifest's fields, as a merge patch; what the system owns stays as it is.
            let mut patch = doc.value.clone();
            if let Some(map) = patch.as_object_mut() {
                map.remove("status");
            }
            if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                for owned in [
                    "uid",
                    "resourceVersion",
                    "generation",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ] {
                    meta.remove(owned);
                }
            }
            // Nothing to send when the file's fields already have their values (decided
            // here, so a controller writing the status meanwhile does not make it look
            // changed).
            let current = to_value(&existing);
            let mut patched = current.clone();
            flotilla_proto::api::json::merge_patch(&mut patched, &patch);
            if patched == current {
                return Ok("unchanged");
            }
            let after: K = client
                .patch(&ns, doc.name(), &patch)
                .await
                .map_err(server_error)?;
            // The manifest's fields often leave out what the server defaults inside lists
            // (a port's protocol, say), so the check above cannot see every no-op; the
            // server can. What it returns differs from what we read only in what a
            // controller may have written meanwhile (the status, and so the resource
            // version) when the patch changed nothing.
            let user_fields = |mut v: Value| {
                if let Some(map) = v.as_object_mut() {
                    map.remove("status");
                }
                if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
                v
            };
            Ok(if user_fields(to_value(&after)) == user_fields(current) {
                "unchanged"
            } else {
                "configured"
            })
        }
    }
}

// --------------------------------------------------------------------- get

#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to get: pods, deployments, nodes, … (or a singular or short name: po, deploy).
    pub kind: String,
    /// Names of objects; all when none is given.
    pub names: Vec<String>,
    #[command(flatten)]
    pub ns: NamespaceArgs,
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format: wide, yaml, json, name (default: a table).
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
    /// Label selector: `app=web,tier in (a,b),!canary`.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// Field selector: `spec.nodeName=n1,status.phase=Running`.
    #[arg(long)]
    pub field_selector: Option<String>,
    /// After listing, watch for changes.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Without headers.
    #[arg(long)]
    pub no_headers: bool,
}

pub async fn get(server: &ServerArg, args: GetArgs) -> anyhow::Result<()> {
    let kind = kind_arg(&args.kind)?;
    let client = server.client()?;
    with_kind!(kind.kind, K => get_kind::<K>(&client, &args).await)
}

async fn get_kind<K: Columns>(client: &Client, args: &GetArgs) -> anyhow::Result<()> {
    let all = args.all_namespaces && K::NAMESPACED;
    let ns = if all || !K::NAMESPACED {
        String::new()
    } else {
        args.ns.get()
    };
    let now = SystemTime::now();
    let (items, rv) = if args.names.is_empty() {
        let req = ListRequest {
            namespace: ns.clone(),
            label_selector: args.selector.clone().unwrap_or_default(),
            field_selector: args.field_selector.clone().unwrap_or_default(),
            limit: 500,
            ..Default::default()
        };
        let (items, meta) = client.list::<K>(&req).await.map_err(server_error)?;
        (items, meta.resource_version)
    } else {
        let mut items = Vec::new();
        let mut missing = Vec::new();
        for name in &args.names {
            match client.get::<K>(&ns, name).await {
                Ok(o) => items.push(o),
                Err(e) if e.is_not_found() => missing.push(server_error(e)),
                Err(e) => return Err(server_error(e)),
            }
        }
        print_objects(&items, args, all, now, !args.no_headers)?;
        if let Some(first) = missing.into_iter().next() {
            return Err(first);
        }
        if args.watch {
            let rv = items
                .iter()
                .map(|o| o.resource_version().to_string())
                .max()
                .unwrap_or_default();
            return watch_kind::<K>(client, args, &ns, all, rv).await;
        }
        return Ok(());
    };
    if items.is_empty() && args.output.is_none_or(|o| o == Output::Wide) && !args.watch {
        if all || !K::NAMESPACED {
            eprintln!("No resources found");
        } else {
            eprintln!("No resources found in {ns} namespace.");
        }
        return Ok(());
    }
    print_objects(&items, args, all, now, !args.no_headers)?;
    if args.watch {
        return watch_kind::<K>(client, args, &ns, all, rv).await;
    }
    Ok(())
}

fn print_objects<K: Columns>(
    items: &[K],
    args: &GetArgs,
    all: bool,
    now: SystemTime,
    headers: bool,
) -> anyhow::Result<()> {
    match args.output {
        Some(Output::Json) | Some(Output::Yaml) => {
            let value = if items.len() == 1 && !args.names.is_empty() {
                to_value(&items[0])
            } else {
                json!({
                    "apiVersion": "v1",
                    "kind": "List",
                    "items": items.iter().map(to_value).collect::<Vec<_>>(),
                    "metadata": {"resourceVersion": ""},
                })
            };
            print_value(&value, args.output == Some(Output::Yaml))
        }
        Some(Output::Name) => {
            let kind = find_kind(K::KIND).expect("every kind is in KINDS");
            for o in items {
                println!("{}", qualified(kind, o.name()));
            }
            Ok(())
        }
        _ => {
            let wide = args.output == Some(Output::Wide);
            let mut header = K::headers(wide);
            if all {
                header.insert(0, "NAMESPACE");
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|o| {
                    let mut r = o.row(wide, now);
                    if all {
                        r.insert(0, o.namespace().to_string());
                    }
                    r
                })
                .collect();
            let table = render(&header, &rows);
            let shown = if headers {
                table.as_str()
            } else {
                table.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
            };
            print!("{shown}");
            Ok(())
        }
    }
}

fn print_value(value: &Value, yaml: bool) -> anyhow::Result<()> {
    if yaml {
        print!("{}", serde_norway::to_string(value)?);
    } else {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

async fn watch_kind<K: Columns>(
    client: &Client,
    args: &GetArgs,
    ns: &str,
    all: bool,
    rv: String,
) -> anyhow::Result<()> {
    let req = WatchRequest {
        namespace: ns.to_string(),
        label_selector: args.selector.clone().unwrap_or_default(),
        field_selector: args.field_selector.clone().unwrap_or_default(),
        resource_version: rv,
        allow_bookmarks: false,
    };
    let mut events = watch::<K>(client.clone(), req);
    while let Some(item) = events.recv().await {
        let object = match item.map_err(server_error)? {
            WatchItem::Added(o) | WatchItem::Modified(o) | WatchItem::Deleted(o) => o,
            WatchItem::Bookmark(_) => continue,
            WatchItem::Expired => {
                bail!("the watch expired (history was compacted); run the command again")
            }
        };
        if !args.names.is_empty() && !args.names.iter().any(|n| n == object.name()) {
            continue;
        }
        print_objects(&[object], args, all, SystemTime::now(), false)?;
    }
    Ok(())
}

// ---------------------------------------------------------------- describe

#[derive(Args, Debug)]
pub struct DescribeArgs {
    pub kind: String,
    pub name: String,
    #[command(flatten)]
    pub ns: NamespaceArgs,
}

/// How many bytes the base64 text `b64` stands for.
fn base64_len(b64: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_or(0, |b| b.len())
}

pub async fn describe(server: &ServerArg, args: DescribeArgs) -> anyhow::Result<()> {
    let kind = kind_arg(&args.kind)?;
    let client = server.client()?;
    let ns = if kind.namespaced {
        args.ns.get()
    } else {
        String::new()
    };
    let value = with_kind!(kind.kind, K => {
        let o: K = client.get::<K>(&ns, &args.name).await.map_err(server_error)?;
        to_value(&o)
    });
    let meta = value.get("metadata").cloned().unwrap_or_default();
    let field = |k: &str| {
        meta.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let map = |k: &str| {
        meta.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join("\n                   ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "<none>".into())
    };
    println!("{:<18} {}", "Name:", field("name"));
    if kind.namespaced {
        println!("{:<18} {}", "Namespace:", field("namespace"));
    }
    println!("{:<18} {}", "Kind:", kind.kind);
    println!("{:<18} {}", "Labels:", map("labels"));
    println!("{:<18} {}", "Annotations:", map("annotations"));
    println!("{:<18} {}", "UID:", field("uid"));
    println!("{:<18} {}", "Created:", field("creationTimestamp"));
    if !field("deletionTimestamp").is_empty() {
        println!("{:<18} {}", "Deleting since:", field("deletionTimestamp"));
    }
    if let Some(owners) = meta.get("ownerReferences").and_then(Value::as_array) {
        for o in owners {
            println!(
                "{:<18} {}/{}",
                "Controlled By:",
                o.get("kind").and_then(Value::as_str).unwrap_or(""),
                o.get("name").and_then(Value::as_str).unwrap_or("")
            );
        }
    }
    // A ConfigMap's data is shown; a Secret's only as sizes, as kubectl describes them.
    if let Some(t) = value.get("type").and_then(Value::as_str) {
        println!("{:<18} {t}", "Type:");
    }
    if kind.kind == "ConfigMap" {
        println!("Data\n====");
        for field in ["data", "binaryData"] {
            for (k, v) in value
                .get(field)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let text = v.as_str().unwrap_or("");
                if field == "data" {
                    println!("{k}:\n----\n{text}\n");
                } else {
                    println!("{k}: {} bytes (binary)\n", base64_len(text));
                }
            }
        }
    } else if kind.kind == "Secret" {
        println!("Data\n====");
        for (k, v) in value
            .get("data")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            println!("{k}:  {} bytes", base64_len(v.as_str().unwrap_or("")));
        }
    }
    for section in ["spec", "status", "subsets"] {
        if let Some(v) = value.get(section) {
            let title = section[..1].to_uppercase() + &section[1..];
            println!("{title}:");
            for line in serde_norway::to_string(v)?.lines() {
                println!("  {line}");
            }
        }
    }
    // Recent events about this object.
    let uid = field("uid");
    let events = ListRequest {
        namespace: if kind.namespaced {
            ns.clone()
        } else {
            "default".into()
        },
        field_selector: format!("involvedObject.uid={uid}"),
        ..Default::default()
    };
    let (mut events, _) = client.list::<Event>(&events).await.map_err(server_error)?;
    events.sort_by(|a, b| a.last_timestamp.cmp(&b.last_timestamp));
    if events.is_empty() {
        println!("Events:            <none>");
    } else {
        println!("Events:");
        let now = SystemTime::now();
        let rows: Vec<Vec<String>> = events
            .iter()
            .rev()
            .take(20)
            .rev()
            .map(|e| {
                let from = e
                    .source
                    .as_ref()
                    .map(|s| s.component.clone())
                    .unwrap_or_default();
                vec![
                    e.r#type.clone(),
                    e.reason.clone(),
                    time::age(&e.last_timestamp, now),
                    from,
                    e.message.clone(),
                ]
            })
            .collect();
        for line in render(&["Type", "Reason", "Age", "From", "Message"], &rows).lines() {
            println!("  {line}");
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ delete

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Cascade {
    Background,
    Foreground,
    Orphan,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// What to delete (with names), unless -f is given.
    pub kind: Option<String>,
    pub names: Vec<String>,
    /// Delete the objects a manifest names; `-` reads stdin.
    #[arg(short = 'f', long = "filename")]
    pub files: Vec<String>,
    #[command(flatten)]
    pub ns: NamespaceArgs,
    /// Seconds a pod has to stop (default: the pod's own terminationGracePeriodSeconds;
    /// 0 deletes at once).
    #[arg(long)]
    pub grace_period: Option<i64>,
    /// What happens to the objects this one owns.
    #[arg(long, value_enum, default_value = "background")]
    pub cascade: Cascade,
    /// Succeed when an object is already gone.
    #[arg(long)]
    pub ignore_not_found: bool,
}

pub async fn delete(server: &ServerArg, args: DeleteArgs) -> anyhow::Result<()> {
    let mut targets: Vec<(&'static KindInfo, String, String)> = Vec::new();
    for f in &args.files {
        for doc in read_manifest(f)? {
            let ns = match doc.namespace() {
                "" => args.ns.get(),
                ns => ns.to_string(),
            };
            targets.push((doc.kind, ns, doc.name().to_string()));
        }
    }
    // The reverse of the files' order: what lives in a namespace goes before the namespace
    // (whose own deletion would take it away mid-way).
    targets.reverse();
    if let Some(kind) = &args.kind {
        let kind = kind_arg(kind)?;
        if args.names.is_empty() {
            bail!(
                "name the {} to delete (deleting all of them is not supported)",
                kind.plural
            );
        }
        for name in &args.names {
            targets.push((kind, args.ns.get(), name.clone()));
        }
    }
    if targets.is_empty() {
        bail!("nothing to delete: give KIND NAME... or -f FILE");
    }
    let client = server.client()?;
    let policy = match args.cascade {
        Cascade::Background => "Background",
        Cascade::Foreground => "Foreground",
        Cascade::Orphan => "Orphan",
    };
    let mut failed = 0;
    for (kind, ns, name) in targets {
        let req = DeleteRequest {
            namespace: if kind.namespaced { ns } else { String::new() },
            name: name.clone(),
            grace_period_seconds: args.grace_period,
            propagation_policy: policy.into(),
            preconditions: None,
        };
        let result = with_kind!(kind.kind, K => client.delete::<K>(&req).await.map(|_| ()));
        match result {
            Ok(()) => println!(
                "{} \"{name}\" deleted",
                qualified(kind, "").trim_end_matches('/')
            ),
            Err(e) if e.is_not_found() && args.ignore_not_found => {}
            Err(e) => {
                failed += 1;
                eprintln!("{:#}", server_error(e));
            }
        }
    }
    if failed > 0 {
        bail!("{failed} object(s) not deleted");
    }
    Ok(())
}

// ------------------------------------------------------------------- scale

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// `deployment NAME`, `deployment/NAME`, `rs NAME`.
    pub target: Vec<String>,
    #[arg(long)]
    pub replicas: i32,
    #[command(flatten)]
    pub ns: NamespaceArgs,
}

pub async fn scale(server: &ServerArg, args: ScaleArgs) -> anyhow::Result<()> {
    let (kind, name) = match args.target.as_slice() {
        [one] => one
            .split_once('/')
            .map(|(k, n)| (k.to_string(), n.to_string()))
            .ok_or_else(|| anyhow!("give KIND NAME or KIND/NAME"))?,
        [k, n] => (k.clone(), n.clone()),
        _ => bail!("give KIND NAME or KIND/NAME"),
    };
    let kind = kind_arg(&kind)?;
    if args.replicas < 0 {
        bail!("--replicas must be >= 0, got {}", args.replicas);
    }
    let client = server.client()?;
    let patch = json!({"spec": {"replicas": args.replicas}});
    let ns = args.ns.get();
    match kind.kind {
        "Deployment" => {
            client
                .patch::<Deployment>(&ns, &name, &patch)
                .await
                .map_err(server_error)?;
        }
        "ReplicaSet" => {
            client
                .patch::<ReplicaSet>(&ns, &name, &patch)
                .await
                .map_err(server_error)?;
        }
        other => bail!("{other} cannot be scaled (deployments and replicasets can)"),
    }
    println!("{} scaled", qualified(kind, &name));
    Ok(())
}

#[derive(Args)]
pub struct LogsArgs {
    /// The pod.
    pub pod: String,
    /// The container (needed when the pod has several).
    #[arg(short = 'c', long)]
    pub container: Option<String>,
    /// Keep printing output as it comes, until the container ends (Ctrl-C to stop).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The output of the container's previous run.
    #[arg(short = 'p', long)]
    pub previous: bool,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<i64>,
    #[command(flatten)]
    pub ns: NamespaceArgs,
}

pub async fn logs(server: &ServerArg, args: LogsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(n) = args.tail
        && n < 0
    {
        bail!("--tail must be >= 0, got {n}");
    }
    let pod = args
        .pod
        .strip_prefix("pod/")
        .or_else(|| args.pod.strip_prefix("pods/"))
        .unwrap_or(&args.pod);
    let client = server.client()?;
    let req = PodLogsRequest {
        namespace: args.ns.get(),
        name: pod.to_string(),
        container: args.container.clone().unwrap_or_default(),
        follow: args.follow,
        previous: args.previous,
        tail_lines: args.tail.unwrap_or(0),
        uid: String::new(),
    };
    let mut stream = client
        .server_stream::<PodLogsRequest, LogChunk>("/flotilla.api.v1.Pods/Logs", req)
        .await
        .map_err(server_error)?;
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await.map_err(|s| server_error(s.into()))? {
        out.write_all(&chunk.data)?;
        out.flush()?;
    }
    Ok(())
}
