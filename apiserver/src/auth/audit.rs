//! The audit log (`--audit-log-path`): one JSON line per request, Kubernetes'
//! `audit.k8s.io/v1` Event at level Metadata, so the tools that read kube-apiserver's audit
//! log read this one.
//!
//! Lines are handed to one writer task and appended in order; the file is flushed whenever
//! the writer has caught up, so a line is on disk within moments of its request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Attributes, UserInfo};

/// Where audit events go; cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<String>,
}

impl AuditLog {
    /// Opens `path` for appending (creating it, mode 0600) and starts the writer task.
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(file, path.to_path_buf(), rx));
        Ok(AuditLog { tx })
    }

    /// Records one request.
    pub fn record(&self, event: &Event<'_>) {
        let _ = self.tx.send(event.to_json().to_string());
    }
}

async fn write(file: tokio::fs::File, path: PathBuf, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut out = tokio::io::BufWriter::new(file);
    let mut failed = false;
    while let Some(line) = rx.recv().await {
        let mut r = write_line(&mut out, &line).await;
        while let Ok(line) = rx.try_recv() {
            if r.is_ok() {
                r = write_line(&mut out, &line).await;
            }
        }
        if r.is_ok() {
            r = out.flush().await;
        }
        match r {
            Err(e) if !failed => {
                tracing::error!("writing the audit log {}: {e}", path.display());
                failed = true;
            }
            Ok(()) => failed = false,
            Err(_) => {}
        }
    }
}

async fn write_line(
    out: &mut tokio::io::BufWriter<tokio::fs::File>,
    line: &str,
) -> std::io::Result<()> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await
}

/// One request, as the audit log tells it.
#[derive(Clone, Debug)]
pub struct Event<'a> {
    /// None: the request carried no identity that was accepted.
    pub user: Option<&'a UserInfo>,
    pub source: Option<SocketAddr>,
    /// Kubernetes' verb (`get`, `create`, …), or the etcd method for the etcd face.
    pub verb: &'a str,
    pub request_uri: String,
    /// The object, for a resource request.
    pub object: Option<&'a Attributes>,
    /// Whether the authorizer allowed it, and why not.
    pub allowed: bool,
    pub reason: Option<&'a str>,
    /// The HTTP status code that stands for the outcome.
    pub code: u16,
    /// The error's message, for a request that failed.
    pub message: Option<&'a str>,
    pub received: SystemTime,
    /// `ResponseComplete`, or `ResponseStarted` for a stream.
    pub stage: &'static str,
}

impl Event<'_> {
    pub fn to_json(&self) -> Value {
        let now = SystemTime::now();
        let latency = now.duration_since(self.received).unwrap_or_default();
        let mut event = json!({
            "kind": "Event",
            "apiVersion": "audit.k8s.io/v1",
            "level": "Metadata",
            "auditID": crate::registry::new_uid(),
            "stage": self.stage,
            "requestURI": self.request_uri,
            "verb": self.verb,
            "user": match self.user {
                Some(u) => json!({"username": u.name, "uid": u.uid, "groups": u.groups}),
                None => json!({}),
            },
            "sourceIPs": self.source.map(|s| vec![s.ip().to_string()]).unwrap_or_default(),
            "responseStatus": {"metadata": {}, "code": self.code},
            "requestReceivedTimestamp": micros(self.received),
            "stageTimestamp": micros(now),
            "annotations": {
                "authorization.k8s.io/decision": if self.allowed { "allow" } else { "forbid" },
                "flotilla.io/latency": format!("{}us", latency.as_micros()),
            },
        });
        if let Some(reason) = self.reason {
            event["annotations"]["authorization.k8s.io/reason"] = reason.into();
        }
        if let Some(message) = self.message {
            event["responseStatus"]["status"] = "Failure".into();
            event["responseStatus"]["message"] = message.into();
        }
        if let Some(a) = self.object {
            let mut r = json!({"resource": a.resource, "apiVersion": a.api_version});
            if !a.api_group.is_empty() {
                r["apiGroup"] = a.api_group.clone().into();
            }
            if !a.namespace.is_empty() {
                r["namespace"] = a.namespace.clone().into();
            }
            if !a.name.is_empty() {
                r["name"] = a.name.clone().into();
            }
            if !a.subresource.is_empty() {
                r["subresource"] = a.subresource.clone().into();
            }
            event["objectRef"] = r;
        }
        event
    }
}

fn micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The HTTP status code Kubernetes answers for a gRPC outcome.
pub fn http_code(code: tonic::Code, created: bool) -> u16 {
    use tonic::Code::*;
    match code {
        Ok if created => 201,
        Ok => 200,
        InvalidArgument => 422,
        FailedPrecondition | AlreadyExists | Aborted => 409,
        NotFound => 404,
        PermissionDenied => 403,
        Unauthenticated => 401,
        ResourceExhausted => 429,
        OutOfRange => 410,
        Unavailable => 503,
        DeadlineExceeded => 504,
        Cancelled => 499,
        Unimplemented => 405,
        _ => 500,
    }
}
