//! kubectl-style tables: one row per object, columns per kind, `-o wide` adds some.

use std::time::SystemTime;

use flotilla_proto::api::quantity::Quantity;
use flotilla_proto::api::time::{self, age};
use flotilla_proto::api::*;

/// What `get` prints for one kind.
pub trait Columns: Resource {
    fn headers(wide: bool) -> Vec<&'static str>;
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String>;
}

fn created(m: Option<&ObjectMeta>, now: SystemTime) -> String {
    age(m.map(|m| m.creation_timestamp.as_str()).unwrap_or(""), now)
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".into()
    } else {
        s.into()
    }
}

fn labels(map: &std::collections::BTreeMap<String, String>) -> String {
    let s: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    or_none(&s.join(","))
}

/// A pod's STATUS column, as kubectl computes it.
pub fn pod_status(pod: &Pod) -> String {
    if pod
        .metadata
        .as_ref()
        .is_some_and(|m| !m.deletion_timestamp.is_empty())
    {
        return "Terminating".into();
    }
    let status = pod.status.clone().unwrap_or_default();
    let mut shown = if status.reason.is_empty() {
        status.phase.clone()
    } else {
        status.reason.clone()
    };
    for c in status.container_statuses.iter().rev() {
        let state = c.state.clone().unwrap_or_default();
        if let Some(w) = state.waiting.filter(|w| !w.reason.is_empty()) {
            shown = w.reason;
        } else if let Some(t) = state.terminated {
            shown = if !t.reason.is_empty() {
                t.reason
            } else if t.signal != 0 {
                format!("Signal:{}", t.signal)
            } else {
                format!("ExitCode:{}", t.exit_code)
            };
        }
    }
    if shown.is_empty() {
        "Pending".into()
    } else {
        shown
    }
}

impl Columns for Pod {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NAME", "READY", "STATUS", "RESTARTS", "AGE"];
        if wide {
            h.extend(["IP", "NODE"]);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let ready = status.container_statuses.iter().filter(|c| c.ready).count();
        let restarts: i32 = status
            .container_statuses
            .iter()
            .map(|c| c.restart_count)
            .sum();
        let mut r = vec![
            self.name().to_string(),
            format!("{ready}/{}", spec.containers.len()),
            pod_status(self),
            restarts.to_string(),
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.push(or_none(&status.pod_ip));
            r.push(or_none(&spec.node_name));
        }
        r
    }
}

/// The columns `-o wide` adds for a workload (Deployment, ReplicaSet, DaemonSet, Job,
/// CronJob), as kubectl prints them.
const WORKLOAD_WIDE: [&str; 3] = ["CONTAINERS", "IMAGES", "SELECTOR"];

fn workload_wide(t: Option<&PodTemplateSpec>, s: Option<&LabelSelector>) -> [String; 3] {
    let (c, i) = containers_and_images(t);
    [c, i, selector(s)]
}

fn containers_and_images(t: Option<&PodTemplateSpec>) -> (String, String) {
    let containers = t
        .and_then(|t| t.spec.as_ref())
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    let images: Vec<String> = containers
        .iter()
        .map(|c| {
            if c.image.is_empty() {
                c.command.join(" ")
            } else {
                c.image.clone()
            }
        })
        .collect();
    (names.join(","), images.join(","))
}

fn selector(s: Option<&LabelSelector>) -> String {
    let Some(s) = s else { return "<none>".into() };
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in &s.match_expressions {
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {} ({})", e.key, op.to_lowercase(), e.values.join(",")),
        });
    }
    or_none(&parts.join(","))
}

impl Columns for Deployment {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"];
        if wide {
            h.extend(WORKLOAD_WIDE);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let mut r = vec![
            self.name().to_string(),
            format!("{}/{}", status.ready_replicas, spec.replicas.unwrap_or(1)),
            status.updated_replicas.to_string(),
            status.available_replicas.to_string(),
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.extend(workload_wide(
                spec.template.as_ref(),
                spec.selector.as_ref(),
            ));
        }
        r
    }
}

impl Columns for ReplicaSet {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NAME", "DESIRED", "CURRENT", "READY", "AGE"];
        if wide {
            h.extend(WORKLOAD_WIDE);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let mut r = vec![
            self.name().to_string(),
            spec.replicas.unwrap_or(1).to_string(),
            status.replicas.to_string(),
            status.ready_replicas.to_string(),
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.extend(workload_wide(
                spec.template.as_ref(),
                spec.selector.as_ref(),
            ));
        }
        r
    }
}

impl Columns for DaemonSet {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec![
            "NAME",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "NODE SELECTOR",
            "AGE",
        ];
        if wide {
            h.extend(WORKLOAD_WIDE);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let node_selector = spec
            .template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .map(|s| labels(&s.node_selector))
            .unwrap_or_else(|| "<none>".into());
        let mut r = vec![
            self.name().to_string(),
            status.desired_number_scheduled.to_string(),
            status.current_number_scheduled.to_string(),
            status.number_ready.to_string(),
            status.updated_number_scheduled.to_string(),
            status.number_available.to_string(),
            node_selector,
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.extend(workload_wide(
                spec.template.as_ref(),
                spec.selector.as_ref(),
            ));
        }
        r
    }
}

impl Columns for PodDisruptionBudget {
    fn headers(_wide: bool) -> Vec<&'static str> {
        vec![
            "NAME",
            "MIN AVAILABLE",
            "MAX UNAVAILABLE",
            "ALLOWED DISRUPTIONS",
            "AGE",
        ]
    }
    fn row(&self, _wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let or_na = |v: &str| {
            if v.is_empty() {
                "N/A".to_string()
            } else {
                v.to_string()
            }
        };
        vec![
            self.name().to_string(),
            or_na(&spec.min_available),
            or_na(&spec.max_unavailable),
            status.disruptions_allowed.to_string(),
            created(self.metadata.as_ref(), now),
        ]
    }
}

impl Columns for Job {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"];
        if wide {
            h.extend(WORKLOAD_WIDE);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let holds = |t: &str| {
            status
                .conditions
                .iter()
                .any(|c| c.r#type == t && c.status == "True")
        };
        let shown = ["Complete", "Failed", "Suspended"]
            .into_iter()
            .find(|t| holds(t))
            .unwrap_or("Running");
        // kubectl's COMPLETIONS: "2/3"; a work queue (no completions) shows "0/1 of 4".
        let completions = match (spec.completions, spec.parallelism.unwrap_or(1)) {
            (Some(c), _) => format!("{}/{c}", status.succeeded),
            (None, p) if p > 1 => format!("{}/1 of {p}", status.succeeded),
            (None, _) => format!("{}/1", status.succeeded),
        };
        let duration = match time::parse(&status.start_time) {
            None => String::new(),
            Some(start) => {
                let end = time::parse(&status.completion_time).unwrap_or(now);
                time::human_duration(end.duration_since(start).unwrap_or_default())
            }
        };
        let mut r = vec![
            self.name().to_string(),
            shown.to_string(),
            completions,
            duration,
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.extend(workload_wide(
                spec.template.as_ref(),
                spec.selector.as_ref(),
            ));
        }
        r
    }
}

impl Columns for CronJob {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec![
            "NAME",
            "SCHEDULE",
            "TIMEZONE",
            "SUSPEND",
            "ACTIVE",
            "LAST SCHEDULE",
            "AGE",
        ];
        if wide {
            h.extend(WORKLOAD_WIDE);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let status = self.status.clone().unwrap_or_default();
        let last = if status.last_schedule_time.is_empty() {
            "<none>".to_string()
        } else {
            age(&status.last_schedule_time, now)
        };
        let mut r = vec![
            self.name().to_string(),
            spec.schedule.clone(),
            or_none(spec.time_zone.as_deref().unwrap_or("")),
            if spec.suspend == Some(true) {
                "True"
            } else {
                "False"
            }
            .to_string(),
            status.active.len().to_string(),
            last,
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            let job = spec.job_template.and_then(|t| t.spec).unwrap_or_default();
            r.extend(workload_wide(job.template.as_ref(), job.selector.as_ref()));
        }
        r
    }
}

impl Columns for Service {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec![
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE",
        ];
        if wide {
            h.push("SELECTOR");
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let spec = self.spec.clone().unwrap_or_default();
        let ports: Vec<String> = spec
            .ports
            .iter()
            .map(|p| {
                if p.node_port != 0 {
                    format!("{}:{}/{}", p.port, p.node_port, p.protocol)
                } else {
                    format!("{}/{}", p.port, p.protocol)
                }
            })
            .collect();
        let mut r = vec![
            self.name().to_string(),
            spec.r#type.clone(),
            or_none(&spec.cluster_ip),
            "<none>".into(),
            or_none(&ports.join(",")),
            created(self.metadata.as_ref(), now),
        ];
        if wide {
            r.push(labels(&spec.selector));
        }
        r
    }
}

/// A node's STATUS column: its Ready condition, and whether it takes new pods.
pub fn node_status(node: &Node) -> String {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .map(|c| match c.status.as_str() {
            "True" => "Ready",
            "False" => "NotReady",
            _ => "Unknown",
        })
        .unwrap_or("Unknown");
    if node.spec.as_ref().is_some_and(|s| s.unschedulable) {
        format!("{ready},SchedulingDisabled")
    } else {
        ready.into()
    }
}

impl Columns for Node {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NAME", "STATUS", "AGE", "VERSION"];
        if wide {
            h.extend(["INTERNAL-IP", "CPU", "MEMORY", "PODS"]);
        }
        h
    }
    fn row(&self, wide: bool, now: SystemTime) -> Vec<String> {
        let status = self.status.clone().unwrap_or_default();
        let version = status
            .node_info
            .as_ref()
            .map(|i| i.kubelet_version.clone())
            .unwrap_or_default();
        let mut r = vec![
            self.name().to_string(),
            node_status(self),
            created(self.metadata.as_ref(), now),
            or_none(&version),
        ];
        if wide {
            let ip = status
                .addresses
                .iter()
                .find(|a| a.r#type == "InternalIP")
                .map(|a| a.address.clone())
                .unwrap_or_default();
            let alloc = |k: &str| {
                status
                    .allocatable
                    .get(k)
                    .and_then(|q| Quantity::parse(q).ok())
                    .map(|q| q.to_string())
                    .unwrap_or_else(|| "<none>".into())
            };
            r.extend([or_none(&ip), alloc("cpu"), alloc("memory"), alloc("pods")]);
        }
        r
    }
}

impl Columns for Namespace {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "STATUS", "AGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        let phase = self
            .status
            .as_ref()
            .map(|s| s.phase.clone())
            .unwrap_or_default();
        vec![
            self.name().to_string(),
            or_none(&phase),
            created(self.metadata.as_ref(), now),
        ]
    }
}

impl Columns for Endpoints {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "ENDPOINTS", "AGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        let mut eps = Vec::new();
        for s in &self.subsets {
            for a in &s.addresses {
                if s.ports.is_empty() {
                    eps.push(a.ip.clone());
                }
                for p in &s.ports {
                    eps.push(format!("{}:{}", a.ip, p.port));
                }
            }
        }
        let shown = if eps.len() > 3 {
            format!("{} + {} more...", eps[..3].join(","), eps.len() - 3)
        } else {
            eps.join(",")
        };
        vec![
            self.name().to_string(),
            or_none(&shown),
            created(self.metadata.as_ref(), now),
        ]
    }
}

impl Columns for Event {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        let obj = self.involved_object.clone().unwrap_or_default();
        let last = if self.last_timestamp.is_empty() {
            self.metadata
                .as_ref()
                .map(|m| m.creation_timestamp.clone())
                .unwrap_or_default()
        } else {
            self.last_timestamp.clone()
        };
        vec![
            age(&last, now),
            self.r#type.clone(),
            self.reason.clone(),
            format!("{}/{}", obj.kind.to_lowercase(), obj.name),
            self.message.clone(),
        ]
    }
}

/// As kubectl: `NAME AGE REQUEST LIMIT`, where REQUEST lists `used/hard` for each resource
/// and LIMIT the `limits.*` ones.
impl Columns for ResourceQuota {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "AGE", "REQUEST", "LIMIT"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        let hard = self
            .spec
            .as_ref()
            .map(|s| s.hard.clone())
            .unwrap_or_default();
        let used = self
            .status
            .as_ref()
            .map(|s| s.used.clone())
            .unwrap_or_default();
        let pair = |name: &String, limit: &String| {
            let u = used.get(name).map_or("0", String::as_str);
            format!("{name}: {u}/{limit}")
        };
        let (limits, requests): (Vec<_>, Vec<_>) =
            hard.iter().partition(|(n, _)| n.starts_with("limits."));
        let join = |v: Vec<(&String, &String)>| {
            v.into_iter()
                .map(|(n, l)| pair(n, l))
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            self.name().to_string(),
            created(self.metadata.as_ref(), now),
            join(requests),
            join(limits),
        ]
    }
}

impl Columns for Lease {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "HOLDER", "AGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        let holder = self
            .spec
            .as_ref()
            .map(|s| s.holder_identity.clone())
            .unwrap_or_default();
        vec![
            self.name().to_string(),
            or_none(&holder),
            created(self.metadata.as_ref(), now),
        ]
    }
}

impl Columns for ConfigMap {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "DATA", "AGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        vec![
            self.name().to_string(),
            (self.data.len() + self.binary_data.len()).to_string(),
            created(self.metadata.as_ref(), now),
        ]
    }
}

impl Columns for Secret {
    fn headers(_: bool) -> Vec<&'static str> {
        vec!["NAME", "TYPE", "DATA", "AGE"]
    }
    fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
        vec![
            self.name().to_string(),
            self.r#type.clone(),
            self.data.len().to_string(),
            created(self.metadata.as_ref(), now),
        ]
    }
}

/// As kubectl: `NAME CREATED AT`.
macro_rules! role_columns {
    ($($ty:ty),*) => {$(
        impl Columns for $ty {
            fn headers(_: bool) -> Vec<&'static str> {
                vec!["NAME", "CREATED AT"]
            }
            fn row(&self, _: bool, _: SystemTime) -> Vec<String> {
                let at = self.metadata.as_ref().map(|m| m.creation_timestamp.clone());
                vec![self.name().to_string(), or_none(&at.unwrap_or_default())]
            }
        }
    )*};
}
role_columns!(Role, ClusterRole);

/// As kubectl: `NAME ROLE AGE`, ROLE as `ClusterRole/view`.
macro_rules! binding_columns {
    ($($ty:ty),*) => {$(
        impl Columns for $ty {
            fn headers(_: bool) -> Vec<&'static str> {
                vec!["NAME", "ROLE", "AGE"]
            }
            fn row(&self, _: bool, now: SystemTime) -> Vec<String> {
                let role = self
                    .role_ref
                    .as_ref()
                    .map(|r| format!("{}/{}", r.kind, r.name))
                    .unwrap_or_default();
                vec![
                    self.name().to_string(),
                    or_none(&role),
                    created(self.metadata.as_ref(), now),
                ]
            }
        }
    )*};
}
binding_columns!(RoleBinding, ClusterRoleBinding);

/// Lays rows out in columns separated by three spaces, as kubectl does.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 3;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let out = render(
            &["NAME", "READY"],
            &[
                vec!["a".into(), "1/1".into()],
                vec!["longer-name".into(), "0/2".into()],
            ],
        );
        assert_eq!(
            out,
            "NAME          READY\na             1/1\nlonger-name   0/2\n"
        );
    }

    #[test]
    fn job_rows_read_as_kubectl_prints_them() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let at =
            |secs: u64| time::format(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs));
        let mut job = Job {
            metadata: Some(ObjectMeta {
                name: "pi".into(),
                creation_timestamp: at(999_000),
                ..Default::default()
            }),
            spec: Some(JobSpec {
                completions: Some(3),
                parallelism: Some(2),
                ..Default::default()
            }),
            status: Some(JobStatus {
                succeeded: 2,
                start_time: at(999_100),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(job.row(false, now)[..4], ["pi", "Running", "2/3", "15m"]);
        let status = job.status.as_mut().unwrap();
        status.succeeded = 3;
        status.completion_time = at(999_130);
        status.conditions.push(JobCondition {
            r#type: "Complete".into(),
            status: "True".into(),
            ..Default::default()
        });
        assert_eq!(job.row(false, now)[..4], ["pi", "Complete", "3/3", "30s"]);
        // A work queue of four.
        let spec = job.spec.as_mut().unwrap();
        spec.completions = None;
        spec.parallelism = Some(4);
        assert_eq!(job.row(false, now)[2], "3/1 of 4");
    }

    #[test]
    fn pod_status_prefers_container_reasons() {
        let mut pod = Pod::default();
        pod.status.get_or_insert_default().phase = "Running".into();
        assert_eq!(pod_status(&pod), "Running");
        pod.status
            .as_mut()
            .unwrap()
            .container_statuses
            .push(ContainerStatus {
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: "CrashLoopBackOff".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        assert_eq!(pod_status(&pod), "CrashLoopBackOff");
        pod.metadata_mut().deletion_timestamp = "2026-01-01T00:00:00Z".into();
        assert_eq!(pod_status(&pod), "Terminating");
    }
}
