//! Defaults and validation, per kind. Every message names the field it is about, with the
//! field's JSON path: `spec.template.spec.containers[0].name: required`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use flotilla_proto::api::quantity::Quantity;
use flotilla_proto::api::selector::{
    LabelSelector as Selector, validate_dns1123_label, validate_dns1123_subdomain,
    validate_label_key, validate_label_value,
};
use flotilla_proto::api::*;

/// Every rule a request broke.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldErrors(pub Vec<(String, String)>);

impl FieldErrors {
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn into_result(self) -> Result<(), FieldErrors> {
        if self.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for FieldErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (path, message)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{path}: {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for FieldErrors {}

/// What the apiserver does differently per kind.
pub trait Kind: Resource {
    /// Names must be DNS-1123 labels (Namespace, Service) rather than subdomains.
    const LABEL_NAMES: bool = false;

    /// Fills in what the object leaves unset.
    fn apply_defaults(&mut self) {}
    /// Checks the object's own fields (metadata is checked for every kind elsewhere).
    fn validate(&self, errs: &mut FieldErrors);
    /// Checks a change from `old` to `self` (immutable fields).
    fn validate_update(&self, _old: &Self, _errs: &mut FieldErrors) {}
    /// How long a delete of this object waits before it is final, given what the caller asked.
    fn grace_period(&self, _requested: Option<i64>) -> i64 {
        0
    }
    /// Whether create keeps the status the caller sent (otherwise it starts empty).
    fn keeps_status_on_create() -> bool {
        false
    }
    /// Sets what create fills in on the status.
    fn initial_status(&mut self) {}
}

/// Checks the metadata every object carries.
pub fn validate_metadata<K: Kind>(obj: &K, errs: &mut FieldErrors) {
    let Some(meta) = obj.metadata() else {
        errs.add("metadata", "required");
        return;
    };
    if meta.name.is_empty() {
        errs.add("metadata.name", "required");
    } else {
        let r = if K::LABEL_NAMES {
            validate_dns1123_label(&meta.name)
        } else {
            validate_dns1123_subdomain(&meta.name)
        };
        if let Err(e) = r {
            errs.add(
                "metadata.name",
                format!("invalid value {:?}: {e}", meta.name),
            );
        }
    }
    if K::NAMESPACED
        && let Err(e) = validate_dns1123_label(&meta.namespace)
    {
        errs.add(
            "metadata.namespace",
            format!("invalid value {:?}: {e}", meta.namespace),
        );
    }
    validate_labels(&meta.labels, "metadata.labels", errs);
    validate_annotations(&meta.annotations, "metadata.annotations", errs);
    for (i, owner) in meta.owner_references.iter().enumerate() {
        let at = format!("metadata.ownerReferences[{i}]");
        for (field, value) in [
            ("apiVersion", &owner.api_version),
            ("kind", &owner.kind),
            ("name", &owner.name),
            ("uid", &owner.uid),
        ] {
            if value.is_empty() {
                errs.add(format!("{at}.{field}"), "required");
            }
        }
    }
    if meta
        .owner_references
        .iter()
        .filter(|o| o.controller == Some(true))
        .count()
        > 1
    {
        errs.add(
            "metadata.ownerReferences",
            "only one reference can have controller set",
        );
    }
    for (i, f) in meta.finalizers.iter().enumerate() {
        if f.is_empty() {
            errs.add(format!("metadata.finalizers[{i}]"), "must not be empty");
        }
    }
}

/// Kubernetes' bound on an object's annotations, keys and values together
/// (`TotalAnnotationSizeLimitB`): they are for tools, not bulk data.
pub const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// The most containers and init containers a pod may have together. Kubernetes has no such
/// bound but its 1.5 MB object size; a pod of thousands of containers fits in that, yet
/// costs the agent a supervisor per container and every status write a status per
/// container. Real pods have a handful; see docs/api.md.
pub const MAX_CONTAINERS: usize = 100;

fn validate_annotations(annotations: &BTreeMap<String, String>, at: &str, errs: &mut FieldErrors) {
    for key in annotations.keys() {
        if let Err(e) = validate_label_key(key) {
            errs.add(format!("{at}[{key:?}]"), e);
        }
    }
    let size: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ANNOTATIONS_BYTES {
        errs.add(
            at,
            format!("Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes"),
        );
    }
}

fn validate_labels(labels: &BTreeMap<String, String>, at: &str, errs: &mut FieldErrors) {
    for (k, v) in labels {
        if let Err(e) = validate_label_key(k) {
            errs.add(format!("{at}[{k:?}]"), format!("invalid key: {e}"));
        }
        if let Err(e) = validate_label_value(v) {
            errs.add(format!("{at}[{k:?}]"), format!("invalid value {v:?}: {e}"));
        }
    }
}

fn validate_quantities(map: &BTreeMap<String, String>, at: &str, errs: &mut FieldErrors) {
    for (k, v) in map {
        if let Err(e) = Quantity::parse(v) {
            errs.add(format!("{at}.{k}"), e.to_string());
        }
    }
}

fn one_of(value: &str, allowed: &[&str], at: &str, errs: &mut FieldErrors) {
    if !allowed.contains(&value) {
        errs.add(
            at,
            format!(
                "unsupported value {value:?}: must be one of {}",
                allowed.join(", ")
            ),
        );
    }
}

fn port_number(port: i32, at: &str, errs: &mut FieldErrors) {
    if !(1..=65535).contains(&port) {
        errs.add(at, format!("must be between 1 and 65535, got {port}"));
    }
}

/// An int-or-string port: a number 1–65535 or a named port (an IANA service name).
fn port_ref(port: &str, at: &str, errs: &mut FieldErrors) {
    if port.is_empty() {
        errs.add(at, "required");
    } else if let Ok(n) = port.parse::<i64>() {
        if !(1..=65535).contains(&n) {
            errs.add(at, format!("must be between 1 and 65535, got {n}"));
        }
    } else if port.len() > 15
        || !port
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || !port.chars().any(|c| c.is_ascii_lowercase())
    {
        errs.add(
            at,
            format!("invalid port {port:?}: must be a number or a port name (at most 15 lowercase letters, digits and '-')"),
        );
    }
}

fn non_negative(v: i64, at: &str, errs: &mut FieldErrors) {
    if v < 0 {
        errs.add(at, format!("must be >= 0, got {v}"));
    }
}

/// A status's `conditions` (see [`validate_conditions`]), each read as (type, status).
fn status_conditions<C>(
    conditions: &[C],
    parts: impl for<'c> Fn(&'c C) -> (&'c String, &'c String),
    errs: &mut FieldErrors,
) {
    validate_conditions(
        conditions
            .iter()
            .map(parts)
            .map(|(t, s)| (t.as_str(), s.as_str())),
        "status.conditions",
        errs,
    );
}

/// The values of a condition's `status`, in every kind (Kubernetes' ConditionStatus).
const CONDITION_STATUSES: &[&str] = &["True", "False", "Unknown"];

/// Checks a list of conditions, given as (type, status) pairs: a type, and a status of
/// True, False or Unknown (a reason or message is free text).
fn validate_conditions<'a>(
    conditions: impl Iterator<Item = (&'a str, &'a str)>,
    at: &str,
    errs: &mut FieldErrors,
) {
    for (i, (kind, status)) in conditions.enumerate() {
        if kind.is_empty() {
            errs.add(format!("{at}[{i}].type"), "required");
        }
        one_of(
            status,
            CONDITION_STATUSES,
            &format!("{at}[{i}].status"),
            errs,
        );
    }
}

// ------------------------------------------------------------------- pods

const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

fn default_pod_spec(spec: &mut PodSpec) {
    if spec.restart_policy.is_empty() {
        spec.restart_policy = "Always".into();
    }
    spec.termination_grace_period_seconds.get_or_insert(30);
    if spec.scheduler_name.is_empty() {
        spec.scheduler_name = "default-scheduler".into();
    }
    for c in spec
        .containers
        .iter_mut()
        .chain(spec.init_containers.iter_mut())
    {
        if c.image_pull_policy.is_empty() {
            c.image_pull_policy = "IfNotPresent".into();
        }
        for p in &mut c.ports {
            if p.protocol.is_empty() {
                p.protocol = "TCP".into();
            }
        }
        for probe in [
            &mut c.liveness_probe,
            &mut c.readiness_probe,
            &mut c.startup_probe,
        ]
        .into_iter()
        .flatten()
        {
            if probe.timeout_seconds == 0 {
                probe.timeout_seconds = 1;
            }
            if probe.period_seconds == 0 {
                probe.period_seconds = 10;
            }
            if probe.success_threshold == 0 {
                probe.success_threshold = 1;
            }
            if probe.failure_threshold == 0 {
                probe.failure_threshold = 3;
            }
            if let Some(http) = &mut probe.http_get {
                if http.path.is_empty() {
                    http.path = "/".into();
                }
                if http.scheme.is_empty() {
                    http.scheme = "HTTP".into();
                }
            }
        }
    }
    for t in &mut spec.tolerations {
        if t.operator.is_empty() {
            t.operator = "Equal".into();
        }
    }
}

pub fn validate_pod_spec(spec: Option<&PodSpec>, at: &str, errs: &mut FieldErrors) {
    let Some(spec) = spec else {
        errs.add(at, "required");
        return;
    };
    if spec.containers.is_empty() {
        errs.add(
            format!("{at}.containers"),
            "required: a pod needs at least one container",
        );
    }
    let count = spec.containers.len() + spec.init_containers.len();
    if count > MAX_CONTAINERS {
        // Each container's own errors would only make the message as large as the pod.
        errs.add(
            format!("{at}.containers"),
            format!(
                "Too many: {count}: must have at most {MAX_CONTAINERS} items \
                 (containers and initContainers together)"
            ),
        );
        return;
    }
    let mut names = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (list, field) in [
        (&spec.init_containers, "initContainers"),
        (&spec.containers, "containers"),
    ] {
        for (i, c) in list.iter().enumerate() {
            let cat = format!("{at}.{field}[{i}]");
            validate_container(c, &cat, errs);
            if !c.name.is_empty() && !names.insert(c.name.as_str()) {
                errs.add(
                    format!("{cat}.name"),
                    format!("duplicate container name {:?}", c.name),
                );
            }
            for (j, p) in c.ports.iter().enumerate() {
                if p.host_port != 0 && !host_ports.insert((p.host_port, p.protocol.clone())) {
                    errs.add(
                        format!("{cat}.ports[{j}].hostPort"),
                        format!("duplicate host port {}/{}", p.host_port, p.protocol),
                    );
                }
            }
        }
    }
    validate_volumes(spec, at, errs);
    // Empty only in a Job's template (pods are defaulted), which says so itself.
    if !spec.restart_policy.is_empty() {
        one_of(
            &spec.restart_policy,
            &["Always", "OnFailure", "Never"],
            &format!("{at}.restartPolicy"),
            errs,
        );
    }
    if let Some(g) = spec.termination_grace_period_seconds {
        non_negative(g, &format!("{at}.terminationGracePeriodSeconds"), errs);
    }
    validate_labels(&spec.node_selector, &format!("{at}.nodeSelector"), errs);
    if !spec.node_name.is_empty()
        && let Err(e) = validate_dns1123_subdomain(&spec.node_name)
    {
        errs.add(
            format!("{at}.nodeName"),
            format!("invalid value {:?}: {e}", spec.node_name),
        );
    }
    if let Some(required) = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
    {
        let nat = format!(
            "{at}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms"
        );
        if required.node_selector_terms.is_empty() {
            errs.add(&nat, "required: at least one term");
        }
        for (i, term) in required.node_selector_terms.iter().enumerate() {
            for (j, r) in term.match_expressions.iter().enumerate() {
                let rat = format!("{nat}[{i}].matchExpressions[{j}]");
                if let Err(e) = validate_label_key(&r.key) {
                    errs.add(format!("{rat}.key"), e);
                }
                match r.operator.as_str() {
                    "In" | "NotIn" if r.values.is_empty() => {
                        errs.add(format!("{rat}.values"), "required for In and NotIn")
                    }
                    "Exists" | "DoesNotExist" if !r.values.is_empty() => errs.add(
                        format!("{rat}.values"),
                        "must be empty for Exists and DoesNotExist",
                    ),
                    "Gt" | "Lt" if r.values.len() != 1 || r.values[0].parse::<i64>().is_err() => {
                        errs.add(format!("{rat}.values"), "must be one integer for Gt and Lt")
                    }
                    "In" | "NotIn" | "Exists" | "DoesNotExist" | "Gt" | "Lt" => {}
                    other => one_of(
                        other,
                        &["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"],
                        &format!("{rat}.operator"),
                        errs,
                    ),
                }
            }
        }
    }
    for (i, t) in spec.tolerations.iter().enumerate() {
        let tat = format!("{at}.tolerations[{i}]");
        one_of(
            &t.operator,
            &["Equal", "Exists"],
            &format!("{tat}.operator"),
            errs,
        );
        if t.operator == "Exists" && !t.value.is_empty() {
            errs.add(
                format!("{tat}.value"),
                "must be empty when operator is Exists",
            );
        }
        if t.key.is_empty() && t.operator != "Exists" {
            errs.add(
                format!("{tat}.operator"),
                "must be Exists when key is empty",
            );
        }
        if !t.effect.is_empty() {
            one_of(
                &t.effect,
                &["NoSchedule", "PreferNoSchedule", "NoExecute"],
                &format!("{tat}.effect"),
                errs,
            );
        }
        if t.toleration_seconds.is_some() && t.effect != "NoExecute" {
            errs.add(
                format!("{tat}.tolerationSeconds"),
                "only allowed with effect NoExecute",
            );
        }
    }
}

/// The fields `fieldRef` may name, as Kubernetes allows them in a pod's environment.
pub const ENV_FIELD_PATHS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "status.podIP",
    "status.podIPs",
    "status.hostIP",
    "status.hostIPs",
];

/// A path inside a volume (`items[].path`, `subPath`): relative, no `..` element.
fn validate_relative_path(path: &str, at: &str, errs: &mut FieldErrors) {
    if path.starts_with('/') {
        errs.add(
            at,
            format!("invalid value {path:?}: must be a relative path"),
        );
    } else if path.split('/').any(|e| e == "..") {
        errs.add(at, format!("invalid value {path:?}: must not contain '..'"));
    }
}

/// File mode bits: 0 to 0777 (JSON gives them in decimal: 0644 is 420).
fn validate_mode(mode: Option<i32>, at: &str, errs: &mut FieldErrors) {
    if let Some(m) = mode
        && !(0..=0o777).contains(&m)
    {
        errs.add(
            at,
            format!("must be a number between 0 and 0777 (octal), both inclusive, got {m}"),
        );
    }
}

/// A file path of a projected volume: relative, without `..`, not starting with `..` (the
/// writer's own names: `..data` and its generations), and neither the same as nor inside
/// another file of the volume (`paths` collects them), as Kubernetes checks.
fn validate_file_path(path: &str, at: &str, paths: &mut Vec<String>, errs: &mut FieldErrors) {
    validate_relative_path(path, at, errs);
    if path.starts_with("..") {
        errs.add(
            at,
            format!("invalid value {path:?}: must not start with '..'"),
        );
    }
    let clash = paths.iter().find(|p| {
        p.as_str() == path
            || path
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('/'))
            || p.strip_prefix(path).is_some_and(|r| r.starts_with('/'))
    });
    if let Some(other) = clash {
        errs.add(
            at,
            format!("invalid value {path:?}: conflicting duplicate paths ({other:?})"),
        );
    }
    paths.push(path.to_string());
}

fn validate_items(items: &[KeyToPath], at: &str, paths: &mut Vec<String>, errs: &mut FieldErrors) {
    for (i, item) in items.iter().enumerate() {
        let iat = format!("{at}.items[{i}]");
        if item.key.is_empty() {
            errs.add(format!("{iat}.key"), "Required value");
        }
        if item.path.is_empty() {
            errs.add(format!("{iat}.path"), "Required value");
        } else {
            validate_file_path(&item.path, &format!("{iat}.path"), paths, errs);
        }
        validate_mode(item.mode, &format!("{iat}.mode"), errs);
    }
}

/// Items of a downwardAPI volume or projection: a relative path, a mode, one field.
fn validate_downward_items(
    items: &[DownwardApiVolumeFile],
    at: &str,
    paths: &mut Vec<String>,
    errs: &mut FieldErrors,
) {
    for (j, f) in items.iter().enumerate() {
        let fat = format!("{at}.items[{j}]");
        if f.path.is_empty() {
            errs.add(format!("{fat}.path"), "Required value");
        } else {
            validate_file_path(&f.path, &format!("{fat}.path"), paths, errs);
        }
        validate_mode(f.mode, &format!("{fat}.mode"), errs);
        match (&f.field_ref, &f.resource_field_ref) {
            (Some(r), None) => {
                let path = r.field_path.as_str();
                let keyed = ["metadata.labels['", "metadata.annotations['"]
                    .iter()
                    .any(|p| path.starts_with(p) && path.ends_with("']"));
                let allowed = [
                    "metadata.name",
                    "metadata.namespace",
                    "metadata.uid",
                    "metadata.labels",
                    "metadata.annotations",
                ];
                if !keyed && !allowed.contains(&path) {
                    errs.add(
                        format!("{fat}.fieldRef.fieldPath"),
                        format!(
                            "Unsupported value: {path:?}: supported values: {}",
                            allowed.map(|a| format!("{a:?}")).join(", ")
                        ),
                    );
                }
            }
            (None, Some(r)) => {
                if !ENV_RESOURCES.contains(&r.resource.as_str()) {
                    errs.add(
                        format!("{fat}.resourceFieldRef.resource"),
                        format!("Unsupported value: {:?}", r.resource),
                    );
                }
            }
            _ => errs.add(&fat, "must specify one of fieldRef or resourceFieldRef"),
        }
    }
}

/// Volumes (a DNS-label name, unique; exactly one source) and every container's mounts
/// (a volume of the pod; an absolute mountPath, unique in the container).
fn validate_volumes(spec: &PodSpec, at: &str, errs: &mut FieldErrors) {
    let mut names = BTreeSet::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        let vat = format!("{at}.volumes[{i}]");
        if v.name.is_empty() {
            errs.add(format!("{vat}.name"), "Required value");
        } else if let Err(e) = validate_dns1123_label(&v.name) {
            errs.add(
                format!("{vat}.name"),
                format!("invalid value {:?}: {e}", v.name),
            );
        } else if !names.insert(v.name.as_str()) {
            errs.add(
                format!("{vat}.name"),
                format!("Duplicate value: {:?}", v.name),
            );
        }
        let sources = [
            v.empty_dir.is_some(),
            v.host_path.is_some(),
            v.config_map.is_some(),
            v.secret.is_some(),
            v.downward_api.is_some(),
            v.projected.is_some(),
        ];
        match sources.iter().filter(|s| **s).count() {
            0 => errs.add(
                &vat,
                "must specify one volume source (emptyDir, hostPath, configMap, secret, downwardAPI, projected)",
            ),
            1 => {}
            _ => errs.add(&vat, "may not specify more than 1 volume type"),
        }
        if let Some(e) = &v.empty_dir {
            if !e.medium.is_empty() {
                one_of(
                    &e.medium,
                    &["Memory"],
                    &format!("{vat}.emptyDir.medium"),
                    errs,
                );
            }
            if !e.size_limit.is_empty() && Quantity::parse(&e.size_limit).is_err() {
                errs.add(
                    format!("{vat}.emptyDir.sizeLimit"),
                    format!("invalid quantity {:?}", e.size_limit),
                );
            }
        }
        if let Some(h) = &v.host_path {
            if !h.path.starts_with('/') {
                errs.add(
                    format!("{vat}.hostPath.path"),
                    format!("invalid value {:?}: must be an absolute path", h.path),
                );
            }
            if !h.r#type.is_empty() {
                one_of(
                    &h.r#type,
                    &["DirectoryOrCreate", "Directory", "FileOrCreate", "File"],
                    &format!("{vat}.hostPath.type"),
                    errs,
                );
            }
        }
        if let Some(c) = &v.config_map {
            object_ref_name(&c.name, &format!("{vat}.configMap.name"), errs);
            validate_items(&c.items, &format!("{vat}.configMap"), &mut Vec::new(), errs);
            validate_mode(
                c.default_mode,
                &format!("{vat}.configMap.defaultMode"),
                errs,
            );
        }
        if let Some(c) = &v.secret {
            object_ref_name(&c.secret_name, &format!("{vat}.secret.secretName"), errs);
            validate_items(&c.items, &format!("{vat}.secret"), &mut Vec::new(), errs);
            validate_mode(c.default_mode, &format!("{vat}.secret.defaultMode"), errs);
        }
        if let Some(d) = &v.downward_api {
            validate_mode(
                d.default_mode,
                &format!("{vat}.downwardAPI.defaultMode"),
                errs,
            );
            validate_downward_items(
                &d.items,
                &format!("{vat}.downwardAPI"),
                &mut Vec::new(),
                errs,
            );
        }
        if let Some(p) = &v.projected {
            let pat = format!("{vat}.projected");
            // The files of every source share the directory.
            let mut paths = Vec::new();
            validate_mode(p.default_mode, &format!("{pat}.defaultMode"), errs);
            for (j, src) in p.sources.iter().enumerate() {
                let sat = format!("{pat}.sources[{j}]");
                let n = [
                    src.config_map.is_some(),
                    src.secret.is_some(),
                    src.downward_api.is_some(),
                ]
                .iter()
                .filter(|x| **x)
                .count();
                if n != 1 {
                    errs.add(
                        &sat,
                        "must specify exactly one source (configMap, secret, downwardAPI)",
                    );
                }
                if let Some(c) = &src.config_map {
                    object_ref_name(&c.name, &format!("{sat}.configMap.name"), errs);
                    validate_items(&c.items, &format!("{sat}.configMap"), &mut paths, errs);
                }
                if let Some(c) = &src.secret {
                    object_ref_name(&c.name, &format!("{sat}.secret.name"), errs);
                    validate_items(&c.items, &format!("{sat}.secret"), &mut paths, errs);
                }
                if let Some(d) = &src.downward_api {
                    validate_downward_items(
                        &d.items,
                        &format!("{sat}.downwardAPI"),
                        &mut paths,
                        errs,
                    );
                }
            }
        }
    }
    for (list, field) in [
        (&spec.init_containers, "initContainers"),
        (&spec.containers, "containers"),
    ] {
        for (i, c) in list.iter().enumerate() {
            let mut paths = BTreeSet::new();
            for (j, m) in c.volume_mounts.iter().enumerate() {
                let mat = format!("{at}.{field}[{i}].volumeMounts[{j}]");
                if m.name.is_empty() {
                    errs.add(format!("{mat}.name"), "Required value");
                } else if !names.contains(m.name.as_str()) {
                    errs.add(format!("{mat}.name"), format!("Not found: {:?}", m.name));
                }
                if !m.mount_path.starts_with('/') {
                    errs.add(
                        format!("{mat}.mountPath"),
                        format!("invalid value {:?}: must be an absolute path", m.mount_path),
                    );
                } else if !paths.insert(m.mount_path.trim_end_matches('/')) {
                    errs.add(
                        format!("{mat}.mountPath"),
                        format!("invalid value {:?}: must be unique", m.mount_path),
                    );
                }
                if !m.sub_path.is_empty() {
                    validate_relative_path(&m.sub_path, &format!("{mat}.subPath"), errs);
                }
            }
        }
    }
}

/// The resources `resourceFieldRef` may name.
pub const ENV_RESOURCES: &[&str] = &[
    "limits.cpu",
    "limits.memory",
    "requests.cpu",
    "requests.memory",
];

/// The name of a ConfigMap or Secret a pod refers to.
fn object_ref_name(name: &str, at: &str, errs: &mut FieldErrors) {
    if name.is_empty() {
        errs.add(at, "Required value");
    } else if let Err(e) = validate_dns1123_subdomain(name) {
        errs.add(at, format!("invalid value {name:?}: {e}"));
    }
}

fn validate_env_source(from: &EnvVarSource, value: &str, at: &str, errs: &mut FieldErrors) {
    if !value.is_empty() {
        errs.add(at, "may not be specified when `value` is not empty");
    }
    let set = [
        from.field_ref.is_some(),
        from.config_map_key_ref.is_some(),
        from.secret_key_ref.is_some(),
        from.resource_field_ref.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if set == 0 {
        errs.add(
            at,
            "must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
        );
    } else if set > 1 {
        errs.add(at, "may not have more than one field specified at a time");
    }
    if let Some(f) = &from.field_ref {
        let path = f.field_path.as_str();
        let labelled = ["metadata.labels['", "metadata.annotations['"]
            .iter()
            .any(|p| {
                path.strip_prefix(p)
                    .is_some_and(|k| k.len() > 2 && k.ends_with("']"))
            });
        if !labelled && !ENV_FIELD_PATHS.contains(&path) {
            errs.add(
                format!("{at}.fieldRef.fieldPath"),
                format!(
                    "Unsupported value: {path:?}: supported values: {}, metadata.labels['KEY'], \
                     metadata.annotations['KEY']",
                    ENV_FIELD_PATHS.join(", ")
                ),
            );
        }
        if !f.api_version.is_empty() && f.api_version != "v1" {
            errs.add(
                format!("{at}.fieldRef.apiVersion"),
                format!(
                    "Unsupported value: {:?}: supported values: \"v1\"",
                    f.api_version
                ),
            );
        }
    }
    if let Some(r) = &from.config_map_key_ref {
        object_ref_name(&r.name, &format!("{at}.configMapKeyRef.name"), errs);
        validate_config_key(&r.key, &format!("{at}.configMapKeyRef.key"), errs);
    }
    if let Some(r) = &from.secret_key_ref {
        object_ref_name(&r.name, &format!("{at}.secretKeyRef.name"), errs);
        validate_config_key(&r.key, &format!("{at}.secretKeyRef.key"), errs);
    }
    if let Some(r) = &from.resource_field_ref {
        if !ENV_RESOURCES.contains(&r.resource.as_str()) {
            errs.add(
                format!("{at}.resourceFieldRef.resource"),
                format!(
                    "Unsupported value: {:?}: supported values: {}",
                    r.resource,
                    ENV_RESOURCES.join(", ")
                ),
            );
        }
        if !r.divisor.is_empty() {
            match Quantity::parse(&r.divisor) {
                Ok(q) if q.millis() > 0 => {}
                _ => errs.add(
                    format!("{at}.resourceFieldRef.divisor"),
                    format!("invalid value {:?}: must be a positive quantity", r.divisor),
                ),
            }
        }
    }
}

fn validate_container(c: &Container, at: &str, errs: &mut FieldErrors) {
    if c.name.is_empty() {
        errs.add(format!("{at}.name"), "required");
    } else if let Err(e) = validate_dns1123_label(&c.name) {
        errs.add(
            format!("{at}.name"),
            format!("invalid value {:?}: {e}", c.name),
        );
    }
    if c.image.is_empty() && c.command.is_empty() {
        errs.add(at, "image or command required");
    }
    for (i, e) in c.env.iter().enumerate() {
        if e.name.is_empty() || e.name.contains('=') {
            errs.add(
                format!("{at}.env[{i}].name"),
                "required, and must not contain '='",
            );
        }
        if let Some(from) = &e.value_from {
            validate_env_source(from, &e.value, &format!("{at}.env[{i}].valueFrom"), errs);
        }
    }
    for (i, f) in c.env_from.iter().enumerate() {
        let fat = format!("{at}.envFrom[{i}]");
        if f.prefix.contains('=') {
            errs.add(format!("{fat}.prefix"), "must not contain '='");
        }
        match (&f.config_map_ref, &f.secret_ref) {
            (Some(_), Some(_)) => {
                errs.add(fat, "may not have more than one field specified at a time")
            }
            (None, None) => errs.add(fat, "must specify one of: `configMapRef` or `secretRef`"),
            (Some(r), None) => object_ref_name(&r.name, &format!("{fat}.configMapRef.name"), errs),
            (None, Some(r)) => object_ref_name(&r.name, &format!("{fat}.secretRef.name"), errs),
        }
    }
    let mut port_names = BTreeSet::new();
    for (i, p) in c.ports.iter().enumerate() {
        let pat = format!("{at}.ports[{i}]");
        port_number(p.container_port, &format!("{pat}.containerPort"), errs);
        if p.host_port != 0 {
            port_number(p.host_port, &format!("{pat}.hostPort"), errs);
        }
        one_of(&p.protocol, PROTOCOLS, &format!("{pat}.protocol"), errs);
        if !p.name.is_empty() {
            port_ref(&p.name, &format!("{pat}.name"), errs);
            if p.name.parse::<i64>().is_ok() {
                errs.add(format!("{pat}.name"), "must not be a number");
            }
            if !port_names.insert(p.name.as_str()) {
                errs.add(
                    format!("{pat}.name"),
                    format!("duplicate port name {:?}", p.name),
                );
            }
        }
    }
    if let Some(r) = &c.resources {
        let rat = format!("{at}.resources");
        validate_quantities(&r.requests, &format!("{rat}.requests"), errs);
        validate_quantities(&r.limits, &format!("{rat}.limits"), errs);
        for (name, req) in &r.requests {
            if let (Some(limit), Ok(req)) = (r.limits.get(name), Quantity::parse(req))
                && let Ok(limit) = Quantity::parse(limit)
                && req > limit
            {
                errs.add(
                    format!("{rat}.requests.{name}"),
                    format!("must be less than or equal to the limit ({limit})"),
                );
            }
        }
    }
    for (probe, field) in [
        (&c.liveness_probe, "livenessProbe"),
        (&c.readiness_probe, "readinessProbe"),
        (&c.startup_probe, "startupProbe"),
    ] {
        if let Some(p) = probe {
            validate_probe(p, &format!("{at}.{field}"), errs);
        }
    }
}

fn validate_probe(p: &Probe, at: &str, errs: &mut FieldErrors) {
    let handlers = [
        p.exec.is_some(),
        p.http_get.is_some(),
        p.tcp_socket.is_some(),
    ]
    .iter()
    .filter(|h| **h)
    .count();
    if handlers != 1 {
        errs.add(at, "must specify exactly one of exec, httpGet, tcpSocket");
    }
    if let Some(e) = &p.exec
        && e.command.is_empty()
    {
        errs.add(format!("{at}.exec.command"), "required");
    }
    if let Some(h) = &p.http_get {
        port_ref(&h.port, &format!("{at}.httpGet.port"), errs);
        one_of(
            &h.scheme,
            &["HTTP", "HTTPS"],
            &format!("{at}.httpGet.scheme"),
            errs,
        );
    }
    if let Some(t) = &p.tcp_socket {
        port_ref(&t.port, &format!("{at}.tcpSocket.port"), errs);
    }
    for (v, f) in [
        (p.initial_delay_seconds, "initialDelaySeconds"),
        (p.timeout_seconds, "timeoutSeconds"),
        (p.period_seconds, "periodSeconds"),
        (p.success_threshold, "successThreshold"),
        (p.failure_threshold, "failureThreshold"),
    ] {
        non_negative(v.into(), &format!("{at}.{f}"), errs);
    }
}

/// A pod's phases, as Kubernetes' PodPhase.
pub const POD_PHASES: &[&str] = &["Pending", "Running", "Succeeded", "Failed", "Unknown"];

fn validate_pod_status(status: &PodStatus, errs: &mut FieldErrors) {
    // Empty: not reported (yet).
    if !status.phase.is_empty() {
        one_of(&status.phase, POD_PHASES, "status.phase", errs);
    }
    validate_conditions(
        status
            .conditions
            .iter()
            .map(|c| (c.r#type.as_str(), c.status.as_str())),
        "status.conditions",
        errs,
    );
    for (list, field) in [
        (&status.container_statuses, "containerStatuses"),
        (&status.init_container_statuses, "initContainerStatuses"),
    ] {
        for (i, c) in list.iter().enumerate() {
            let at = format!("status.{field}[{i}]");
            for (state, f) in [(&c.state, "state"), (&c.last_state, "lastState")] {
                let set = state.as_ref().map_or(0, |s| {
                    usize::from(s.waiting.is_some())
                        + usize::from(s.running.is_some())
                        + usize::from(s.terminated.is_some())
                });
                if set > 1 {
                    errs.add(
                        format!("{at}.{f}"),
                        "may not specify more than 1 state type (waiting, running, terminated)",
                    );
                }
            }
            non_negative(c.restart_count.into(), &format!("{at}.restartCount"), errs);
        }
    }
}

impl Kind for Pod {
    fn apply_defaults(&mut self) {
        default_pod_spec(self.spec.get_or_insert_default());
    }
    fn validate(&self, errs: &mut FieldErrors) {
        validate_pod_spec(self.spec.as_ref(), "spec", errs);
        if let Some(status) = &self.status {
            validate_pod_status(status, errs);
        }
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        // As in Kubernetes, a pod's spec is fixed once created, except container images;
        // nodeName changes only through Bind.
        let strip = |p: &Pod| {
            let mut s = p.spec.clone().unwrap_or_default();
            for c in s.containers.iter_mut().chain(s.init_containers.iter_mut()) {
                c.image.clear();
            }
            s
        };
        let (new_spec, old_spec) = (strip(self), strip(old));
        if new_spec.node_name != old_spec.node_name {
            errs.add("spec.nodeName", "may not be changed by an update; use Bind");
        } else if new_spec != old_spec {
            errs.add(
                "spec",
                "pod updates may not change fields other than spec.containers[*].image",
            );
        }
    }
    fn grace_period(&self, requested: Option<i64>) -> i64 {
        let spec = self.spec.as_ref();
        let bound = spec.is_some_and(|s| !s.node_name.is_empty());
        let phase = self.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
        if !bound || phase == "Succeeded" || phase == "Failed" {
            // Nothing runs it: nothing to wait for.
            return 0;
        }
        requested
            .or_else(|| spec.and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0)
    }
    fn initial_status(&mut self) {
        let status = self.status.get_or_insert_default();
        status.phase = "Pending".into();
    }
}

// ------------------------------------------------------------ workloads

fn validate_selector_and_template(
    selector: Option<&LabelSelector>,
    template: Option<&PodTemplateSpec>,
    selector_required: bool,
    errs: &mut FieldErrors,
) {
    let parsed = match selector {
        None if selector_required => {
            errs.add("spec.selector", "required");
            None
        }
        None => None,
        Some(s) => {
            let exprs: Vec<(String, String, Vec<String>)> = s
                .match_expressions
                .iter()
                .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone()))
                .collect();
            match Selector::from_parts(&s.match_labels, &exprs) {
                Ok(sel) if sel.is_empty() => {
                    errs.add(
                        "spec.selector",
                        "must not be empty: it would select every pod",
                    );
                    None
                }
                Ok(sel) => Some(sel),
                Err(e) => {
                    errs.add("spec.selector", e.to_string());
                    None
                }
            }
        }
    };
    let Some(template) = template else {
        errs.add("spec.template", "required");
        return;
    };
    let labels = template
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    validate_labels(&labels, "spec.template.metadata.labels", errs);
    if let Some(meta) = &template.metadata {
        validate_annotations(
            &meta.annotations,
            "spec.template.metadata.annotations",
            errs,
        );
    }
    if let Some(sel) = parsed
        && !sel.matches(&labels)
    {
        errs.add(
            "spec.template.metadata.labels",
            format!("{labels:?} does not match the selector {sel:?}"),
        );
    }
    validate_pod_spec(template.spec.as_ref(), "spec.template.spec", errs);
}

fn default_template(template: &mut Option<PodTemplateSpec>) {
    if let Some(t) = template {
        default_pod_spec(t.spec.get_or_insert_default());
    }
}

impl Kind for ReplicaSet {
    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_default();
        spec.replicas.get_or_insert(1);
        default_template(&mut spec.template);
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        if let Some(r) = spec.replicas {
            non_negative(r.into(), "spec.replicas", errs);
        }
        non_negative(spec.min_ready_seconds.into(), "spec.minReadySeconds", errs);
        validate_selector_and_template(spec.selector.as_ref(), spec.template.as_ref(), true, errs);
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let sel = |o: &Self| o.spec.as_ref().and_then(|s| s.selector.clone());
        if sel(self) != sel(old) {
            errs.add("spec.selector", "field is immutable");
        }
    }
}

/// Checks a maxSurge / maxUnavailable value: a non-negative count or a percentage.
pub fn validate_int_or_percent(v: &str, at: &str, errs: &mut FieldErrors) {
    let ok = match v.strip_suffix('%') {
        Some(p) => p.parse::<u32>().is_ok(),
        None => v.parse::<u32>().is_ok(),
    };
    if !ok {
        errs.add(at, format!("invalid value {v:?}: must be a non-negative integer or a percentage such as \"25%\""));
    }
}

impl Kind for Deployment {
    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_default();
        spec.replicas.get_or_insert(1);
        spec.revision_history_limit.get_or_insert(10);
        spec.progress_deadline_seconds.get_or_insert(600);
        let strategy = spec.strategy.get_or_insert_default();
        if strategy.r#type.is_empty() {
            strategy.r#type = "RollingUpdate".into();
        }
        if strategy.r#type == "RollingUpdate" {
            let ru = strategy.rolling_update.get_or_insert_default();
            if ru.max_surge.is_empty() {
                ru.max_surge = "25%".into();
            }
            if ru.max_unavailable.is_empty() {
                ru.max_unavailable = "25%".into();
            }
        }
        default_template(&mut spec.template);
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        if let Some(r) = spec.replicas {
            non_negative(r.into(), "spec.replicas", errs);
        }
        non_negative(spec.min_ready_seconds.into(), "spec.minReadySeconds", errs);
        if let Some(r) = spec.revision_history_limit {
            non_negative(r.into(), "spec.revisionHistoryLimit", errs);
        }
        if let Some(p) = spec.progress_deadline_seconds
            && p <= spec.min_ready_seconds
        {
            errs.add(
                "spec.progressDeadlineSeconds",
                "must be greater than minReadySeconds",
            );
        }
        if let Some(strategy) = &spec.strategy {
            one_of(
                &strategy.r#type,
                &["RollingUpdate", "Recreate"],
                "spec.strategy.type",
                errs,
            );
            match (&strategy.r#type[..], &strategy.rolling_update) {
                ("Recreate", Some(_)) => errs.add(
                    "spec.strategy.rollingUpdate",
                    "may not be specified when strategy type is Recreate",
                ),
                ("RollingUpdate", Some(ru)) => {
                    let at = "spec.strategy.rollingUpdate";
                    validate_int_or_percent(&ru.max_surge, &format!("{at}.maxSurge"), errs);
                    validate_int_or_percent(
                        &ru.max_unavailable,
                        &format!("{at}.maxUnavailable"),
                        errs,
                    );
                    let zero = |v: &str| v == "0" || v == "0%";
                    if zero(&ru.max_surge) && zero(&ru.max_unavailable) {
                        errs.add(
                            format!("{at}.maxUnavailable"),
                            "may not be 0 when maxSurge is 0",
                        );
                    }
                    if let Some(p) = ru.max_unavailable.strip_suffix('%')
                        && p.parse::<u32>().is_ok_and(|p| p > 100)
                    {
                        errs.add(
                            format!("{at}.maxUnavailable"),
                            "must not be greater than 100%",
                        );
                    }
                }
                _ => {}
            }
        }
        validate_selector_and_template(spec.selector.as_ref(), spec.template.as_ref(), true, errs);
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let sel = |o: &Self| o.spec.as_ref().and_then(|s| s.selector.clone());
        if sel(self) != sel(old) {
            errs.add("spec.selector", "field is immutable");
        }
    }
}

impl Kind for DaemonSet {
    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_default();
        spec.revision_history_limit.get_or_insert(10);
        let strategy = spec.update_strategy.get_or_insert_default();
        if strategy.r#type.is_empty() {
            strategy.r#type = "RollingUpdate".into();
        }
        if strategy.r#type == "RollingUpdate" {
            let ru = strategy.rolling_update.get_or_insert_default();
            if ru.max_unavailable.is_empty() {
                ru.max_unavailable = "1".into();
            }
            if ru.max_surge.is_empty() {
                ru.max_surge = "0".into();
            }
        }
        default_template(&mut spec.template);
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        non_negative(spec.min_ready_seconds.into(), "spec.minReadySeconds", errs);
        if let Some(r) = spec.revision_history_limit {
            non_negative(r.into(), "spec.revisionHistoryLimit", errs);
        }
        if let Some(strategy) = &spec.update_strategy {
            one_of(
                &strategy.r#type,
                &["RollingUpdate", "OnDelete"],
                "spec.updateStrategy.type",
                errs,
            );
            // Kubernetes keeps (and ignores) rollingUpdate under OnDelete.
            if let Some(ru) = &strategy.rolling_update {
                let at = "spec.updateStrategy.rollingUpdate";
                let value = |v: &str| v.strip_suffix('%').unwrap_or(v).parse::<u32>().ok();
                validate_int_or_percent(&ru.max_unavailable, &format!("{at}.maxUnavailable"), errs);
                if value(&ru.max_unavailable) == Some(0) {
                    errs.add(
                        format!("{at}.maxUnavailable"),
                        "may not be 0 when maxSurge is 0",
                    );
                }
                if ru.max_unavailable.ends_with('%')
                    && value(&ru.max_unavailable).is_some_and(|p| p > 100)
                {
                    errs.add(
                        format!("{at}.maxUnavailable"),
                        "must not be greater than 100%",
                    );
                }
                if !ru.max_surge.is_empty() && value(&ru.max_surge) != Some(0) {
                    errs.add(
                        format!("{at}.maxSurge"),
                        format!("unsupported value {:?}: only 0 is served (a node's old pod goes before its new one starts)", ru.max_surge),
                    );
                }
            }
        }
        if let Some(pod) = spec.template.as_ref().and_then(|t| t.spec.as_ref()) {
            one_of(
                &pod.restart_policy,
                &["Always"],
                "spec.template.spec.restartPolicy",
                errs,
            );
        }
        validate_selector_and_template(spec.selector.as_ref(), spec.template.as_ref(), true, errs);
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let sel = |o: &Self| o.spec.as_ref().and_then(|s| s.selector.clone());
        if sel(self) != sel(old) {
            errs.add("spec.selector", "field is immutable");
        }
    }
}

impl Kind for PodDisruptionBudget {
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
        let Some(spec) = &self.spec else {
            return;
        };
        if !spec.min_available.is_empty() && !spec.max_unavailable.is_empty() {
            errs.add("spec", "minAvailable and maxUnavailable cannot be both set");
        }
        for (v, at) in [
            (&spec.min_available, "spec.minAvailable"),
            (&spec.max_unavailable, "spec.maxUnavailable"),
        ] {
            if v.is_empty() {
                continue;
            }
            validate_int_or_percent(v, at, errs);
            if let Some(p) = v.strip_suffix('%')
                && p.parse::<u32>().is_ok_and(|p| p > 100)
            {
                errs.add(at, "must not be greater than 100%");
            }
        }
        if let Some(s) = &spec.selector {
            let exprs: Vec<(String, String, Vec<String>)> = s
                .match_expressions
                .iter()
                .map(|e| (e.key.clone(), e.operator.clone(), e.values.clone()))
                .collect();
            if let Err(e) = Selector::from_parts(&s.match_labels, &exprs) {
                errs.add("spec.selector", e.to_string());
            }
        }
        if !spec.unhealthy_pod_eviction_policy.is_empty() {
            one_of(
                &spec.unhealthy_pod_eviction_policy,
                &["IfHealthyBudget", "AlwaysAllow"],
                "spec.unhealthyPodEvictionPolicy",
                errs,
            );
        }
    }
}

// ------------------------------------------------------------------- jobs

impl Kind for Job {
    fn apply_defaults(&mut self) {
        use flotilla_proto::api::batch::*;
        let meta = self.metadata.clone().unwrap_or_default();
        let spec = self.spec.get_or_insert_default();
        if spec.completions.is_none() && spec.parallelism.is_none() {
            spec.completions = Some(1);
        }
        spec.parallelism.get_or_insert(1);
        spec.backoff_limit.get_or_insert(6);
        spec.suspend.get_or_insert(false);
        if spec.completion_mode.is_empty() {
            spec.completion_mode = "NonIndexed".into();
        }
        let manual = spec.manual_selector == Some(true);
        // A Job's pods must say Never or OnFailure themselves: the pod default (Always)
        // would make a finished container run again.
        let template = spec.template.get_or_insert_default();
        let pod = template.spec.get_or_insert_default();
        let policy = std::mem::take(&mut pod.restart_policy);
        default_pod_spec(pod);
        pod.restart_policy = policy;
        // The selector is generated from the uid (set before defaults on create), and the
        // template's labels follow it, unless the user chose their own.
        if !manual && spec.selector.is_none() && !meta.uid.is_empty() {
            let labels = &mut template.metadata.get_or_insert_default().labels;
            for (k, v) in [
                (CONTROLLER_UID_LABEL, &meta.uid),
                (LEGACY_CONTROLLER_UID_LABEL, &meta.uid),
                (JOB_NAME_LABEL, &meta.name),
                (LEGACY_JOB_NAME_LABEL, &meta.name),
            ] {
                labels.entry(k.into()).or_insert_with(|| v.clone());
            }
            spec.selector = Some(LabelSelector {
                match_labels: [(CONTROLLER_UID_LABEL.to_string(), meta.uid.clone())].into(),
                ..Default::default()
            });
        }
    }
    fn validate(&self, errs: &mut FieldErrors) {
        use flotilla_proto::api::batch::MAX_INDEXED_COMPLETIONS;
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
            for (v, at) in [
                (status.active, "status.active"),
                (status.succeeded, "status.succeeded"),
                (status.failed, "status.failed"),
            ] {
                non_negative(v.into(), at, errs);
            }
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        for (v, at) in [
            (spec.parallelism, "spec.parallelism"),
            (spec.completions, "spec.completions"),
            (spec.backoff_limit, "spec.backoffLimit"),
            (
                spec.ttl_seconds_after_finished,
                "spec.ttlSecondsAfterFinished",
            ),
        ] {
            if let Some(v) = v {
                non_negative(v.into(), at, errs);
            }
        }
        if let Some(d) = spec.active_deadline_seconds {
            non_negative(d, "spec.activeDeadlineSeconds", errs);
        }
        one_of(
            &spec.completion_mode,
            &["NonIndexed", "Indexed"],
            "spec.completionMode",
            errs,
        );
        if spec.completion_mode == "Indexed" {
            match spec.completions {
                None => errs.add(
                    "spec.completions",
                    "Required value: when completion mode is Indexed",
                ),
                Some(c) if c > MAX_INDEXED_COMPLETIONS => errs.add(
                    "spec.completions",
                    format!("must be less than or equal to {MAX_INDEXED_COMPLETIONS} when completion mode is Indexed"),
                ),
                _ => {}
            }
            if spec
                .parallelism
                .is_some_and(|p| p > MAX_INDEXED_COMPLETIONS)
            {
                errs.add(
                    "spec.parallelism",
                    format!("must be less than or equal to {MAX_INDEXED_COMPLETIONS} when completion mode is Indexed"),
                );
            }
        }
        if spec.manual_selector != Some(true)
            && let (Some(sel), Some(uid)) = (
                &spec.selector,
                self.metadata.as_ref().map(|m| m.uid.as_str()),
            )
            && !uid.is_empty()
            && sel
                .match_labels
                .get(flotilla_proto::api::batch::CONTROLLER_UID_LABEL)
                != Some(&uid.to_string())
        {
            errs.add(
                "spec.selector",
                "`selector` will be auto-generated: leave it out, or set manualSelector: true",
            );
        }
        match spec.template.as_ref().and_then(|t| t.spec.as_ref()) {
            Some(pod) if pod.restart_policy.is_empty() => errs.add(
                "spec.template.spec.restartPolicy",
                "Required value: supported values: \"OnFailure\", \"Never\"",
            ),
            Some(pod) => one_of(
                &pod.restart_policy,
                &["OnFailure", "Never"],
                "spec.template.spec.restartPolicy",
                errs,
            ),
            None => {}
        }
        // A CronJob's template has no selector yet: its Jobs get theirs when made.
        let selector_required = spec.manual_selector == Some(true)
            || self.metadata.as_ref().is_some_and(|m| !m.uid.is_empty());
        validate_selector_and_template(
            spec.selector.as_ref(),
            spec.template.as_ref(),
            selector_required,
            errs,
        );
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let spec = |o: &Self| o.spec.clone().unwrap_or_default();
        let (new, old) = (spec(self), spec(old));
        if new.selector != old.selector {
            errs.add("spec.selector", "field is immutable");
        }
        if new.template != old.template {
            errs.add("spec.template", "field is immutable");
        }
        if new.completions != old.completions {
            errs.add("spec.completions", "field is immutable");
        }
        if new.completion_mode != old.completion_mode {
            errs.add("spec.completionMode", "field is immutable");
        }
    }
}

/// A CronJob's Job template as a Job (no uid: no selector is generated), to default and
/// check it by the Job's own rules.
fn template_job(t: &JobTemplateSpec) -> Job {
    Job {
        metadata: t.metadata.clone(),
        spec: t.spec.clone(),
        ..Default::default()
    }
}

/// Longest CronJob name: its Jobs are named NAME-<11 digits>, within 63 characters.
const MAX_CRONJOB_NAME: usize = 52;

impl Kind for CronJob {
    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_default();
        if spec.concurrency_policy.is_empty() {
            spec.concurrency_policy = "Allow".into();
        }
        spec.suspend.get_or_insert(false);
        spec.successful_jobs_history_limit.get_or_insert(3);
        spec.failed_jobs_history_limit.get_or_insert(1);
        let template = spec.job_template.get_or_insert_default();
        let mut job = template_job(template);
        job.apply_defaults();
        template.spec = job.spec;
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(m) = &self.metadata
            && m.name.len() > MAX_CRONJOB_NAME
        {
            errs.add(
                "metadata.name",
                format!("must be no more than {MAX_CRONJOB_NAME} characters"),
            );
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        let zone_ok = match &spec.time_zone {
            Some(z) => match flotilla_proto::api::batch::Schedule::parse("* * * * *", Some(z)) {
                Ok(_) => true,
                Err(e) => {
                    errs.add("spec.timeZone", e);
                    false
                }
            },
            None => true,
        };
        if let Err(e) = flotilla_proto::api::batch::Schedule::parse(
            &spec.schedule,
            spec.time_zone.as_deref().filter(|_| zone_ok),
        ) {
            errs.add("spec.schedule", e);
        }
        one_of(
            &spec.concurrency_policy,
            &["Allow", "Forbid", "Replace"],
            "spec.concurrencyPolicy",
            errs,
        );
        if let Some(d) = spec.starting_deadline_seconds {
            non_negative(d, "spec.startingDeadlineSeconds", errs);
        }
        for (v, at) in [
            (
                spec.successful_jobs_history_limit,
                "spec.successfulJobsHistoryLimit",
            ),
            (
                spec.failed_jobs_history_limit,
                "spec.failedJobsHistoryLimit",
            ),
        ] {
            if let Some(v) = v {
                non_negative(v.into(), at, errs);
            }
        }
        match &spec.job_template {
            None => errs.add("spec.jobTemplate", "required"),
            Some(t) => {
                let mut inner = FieldErrors::default();
                template_job(t).validate(&mut inner);
                for (path, message) in inner.0 {
                    let path = match path.strip_prefix("spec") {
                        Some(rest) => format!("spec.jobTemplate.spec{rest}"),
                        None => format!("spec.jobTemplate.{path}"),
                    };
                    errs.add(path, message);
                }
            }
        }
    }
}

// ------------------------------------------------------------- services

impl Kind for Service {
    const LABEL_NAMES: bool = true;

    fn apply_defaults(&mut self) {
        let spec = self.spec.get_or_insert_default();
        if spec.r#type.is_empty() {
            spec.r#type = "ClusterIP".into();
        }
        for p in &mut spec.ports {
            if p.protocol.is_empty() {
                p.protocol = "TCP".into();
            }
            if p.target_port.is_empty() || p.target_port == "0" {
                p.target_port = p.port.to_string();
            }
        }
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(status) = &self.status {
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
        let Some(spec) = &self.spec else {
            errs.add("spec", "required");
            return;
        };
        one_of(
            &spec.r#type,
            &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"],
            "spec.type",
            errs,
        );
        if spec.ports.is_empty() && spec.cluster_ip != "None" && spec.r#type != "ExternalName" {
            errs.add("spec.ports", "required");
        }
        let mut names = BTreeSet::new();
        for (i, p) in spec.ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            port_number(p.port, &format!("{at}.port"), errs);
            one_of(&p.protocol, PROTOCOLS, &format!("{at}.protocol"), errs);
            port_ref(&p.target_port, &format!("{at}.targetPort"), errs);
            if spec.ports.len() > 1 && p.name.is_empty() {
                errs.add(
                    format!("{at}.name"),
                    "required when a service has more than one port",
                );
            }
            if !p.name.is_empty() {
                if let Err(e) = validate_dns1123_label(&p.name) {
                    errs.add(format!("{at}.name"), e);
                }
                if !names.insert(p.name.as_str()) {
                    errs.add(
                        format!("{at}.name"),
                        format!("duplicate port name {:?}", p.name),
                    );
                }
            }
            if p.node_port != 0 {
                port_number(p.node_port, &format!("{at}.nodePort"), errs);
            }
        }
        validate_labels(&spec.selector, "spec.selector", errs);
        if !spec.cluster_ip.is_empty()
            && spec.cluster_ip != "None"
            && spec.cluster_ip.parse::<std::net::Ipv4Addr>().is_err()
        {
            errs.add(
                "spec.clusterIP",
                format!(
                    "invalid value {:?}: must be an IPv4 address or \"None\"",
                    spec.cluster_ip
                ),
            );
        }
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let ip = |s: &Self| {
            s.spec
                .as_ref()
                .map(|s| s.cluster_ip.clone())
                .unwrap_or_default()
        };
        if !ip(self).is_empty() && ip(self) != ip(old) {
            errs.add("spec.clusterIP", "field is immutable");
        }
    }
}

impl Kind for Endpoints {
    fn validate(&self, errs: &mut FieldErrors) {
        for (i, s) in self.subsets.iter().enumerate() {
            for (list, field) in [
                (&s.addresses, "addresses"),
                (&s.not_ready_addresses, "notReadyAddresses"),
            ] {
                for (j, a) in list.iter().enumerate() {
                    if a.ip.parse::<std::net::IpAddr>().is_err() {
                        errs.add(
                            format!("subsets[{i}].{field}[{j}].ip"),
                            format!("invalid value {:?}: must be an IP address", a.ip),
                        );
                    }
                }
            }
            for (j, p) in s.ports.iter().enumerate() {
                port_number(p.port, &format!("subsets[{i}].ports[{j}].port"), errs);
            }
        }
    }
}

// ---------------------------------------------------------------- nodes

impl Kind for Node {
    /// A NoExecute taint gets `timeAdded` when it comes without one, as in Kubernetes: the
    /// taint manager counts `tolerationSeconds` from it.
    fn apply_defaults(&mut self) {
        if let Some(spec) = self.spec.as_mut() {
            for t in spec.taints.iter_mut() {
                if t.effect == "NoExecute" && t.time_added.is_empty() {
                    t.time_added = flotilla_proto::api::time::now();
                }
            }
        }
    }
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(spec) = &self.spec {
            for (i, t) in spec.taints.iter().enumerate() {
                let at = format!("spec.taints[{i}]");
                if let Err(e) = validate_label_key(&t.key) {
                    errs.add(format!("{at}.key"), e);
                }
                one_of(
                    &t.effect,
                    &["NoSchedule", "PreferNoSchedule", "NoExecute"],
                    &format!("{at}.effect"),
                    errs,
                );
                if !t.time_added.is_empty()
                    && flotilla_proto::api::time::parse(&t.time_added).is_none()
                {
                    errs.add(
                        format!("{at}.timeAdded"),
                        format!("invalid value {:?}: must be an RFC 3339 time", t.time_added),
                    );
                }
            }
        }
        if let Some(status) = &self.status {
            validate_quantities(&status.capacity, "status.capacity", errs);
            validate_quantities(&status.allocatable, "status.allocatable", errs);
            status_conditions(&status.conditions, |c| (&c.r#type, &c.status), errs);
        }
    }
    fn keeps_status_on_create() -> bool {
        true
    }
}

impl Kind for Namespace {
    const LABEL_NAMES: bool = true;

    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(phase) = self.status.as_ref().map(|s| s.phase.as_str())
            && !phase.is_empty()
        {
            one_of(phase, &["Active", "Terminating"], "status.phase", errs);
        }
    }
    fn initial_status(&mut self) {
        self.status.get_or_insert_default().phase = "Active".into();
    }
}

// ------------------------------------------------------------ the rest

impl Kind for Event {
    fn validate(&self, errs: &mut FieldErrors) {
        match &self.involved_object {
            None => errs.add("involvedObject", "required"),
            Some(r) if r.kind.is_empty() || r.name.is_empty() => {
                errs.add("involvedObject", "kind and name are required")
            }
            Some(_) => {}
        }
        if !self.r#type.is_empty() {
            one_of(&self.r#type, &["Normal", "Warning"], "type", errs);
        }
    }
}

impl Kind for ResourceQuota {
    fn validate(&self, errs: &mut FieldErrors) {
        let hard = self.spec.as_ref().map(|s| &s.hard);
        for (name, value) in hard.into_iter().flatten() {
            let field = format!("spec.hard[{name}]");
            if !flotilla_proto::api::quota::is_known(name) {
                errs.add(
                    field,
                    "unsupported resource: one of pods, services, resourcequotas, count/<resource>[.<group>], requests.cpu, requests.memory, limits.cpu, limits.memory, cpu, memory",
                );
            } else if let Err(e) = flotilla_proto::api::quantity::Quantity::parse(value) {
                errs.add(field, e.to_string());
            }
        }
    }
}

impl Kind for Lease {
    fn validate(&self, errs: &mut FieldErrors) {
        if let Some(d) = self.spec.as_ref().and_then(|s| s.lease_duration_seconds)
            && d <= 0
        {
            errs.add("spec.leaseDurationSeconds", format!("must be > 0, got {d}"));
        }
    }
}

// --------------------------------------------------------------- ConfigMap and Secret

/// The most a ConfigMap's or Secret's data may hold, its values together (Kubernetes'
/// `MaxSecretSize`, also its ConfigMap limit).
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

/// The type of a Secret that says nothing about its keys.
pub const SECRET_OPAQUE: &str = "Opaque";
pub const SECRET_DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
pub const SECRET_DOCKER_CFG: &str = "kubernetes.io/dockercfg";
pub const SECRET_TLS: &str = "kubernetes.io/tls";
pub const SECRET_BASIC_AUTH: &str = "kubernetes.io/basic-auth";
pub const SECRET_SSH_AUTH: &str = "kubernetes.io/ssh-auth";

/// A ConfigMap or Secret key: a file name in a mounted volume, as Kubernetes checks it.
fn validate_config_key(key: &str, field: &str, errs: &mut FieldErrors) {
    let at = format!("{field}[{key}]");
    if key.is_empty() {
        errs.add(at, "required: a key must not be empty");
        return;
    }
    if key.len() > 253 {
        errs.add(at, "Too long: must have at most 253 bytes");
        return;
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        errs.add(
            at,
            format!(
                "invalid value {key:?}: a valid config key must consist of alphanumeric \
                 characters, '-', '_' or '.' (e.g. 'key.name', or 'KEY_NAME', or 'key-name', \
                 regex used for validation is '[-._a-zA-Z0-9]+')"
            ),
        );
    } else if key == "." || key == ".." {
        errs.add(
            at,
            format!("invalid value {key:?}: must not be '.' or '..'"),
        );
    } else if key.starts_with("..") {
        errs.add(
            at,
            format!("invalid value {key:?}: must not start with '..'"),
        );
    }
}

/// `immutable` set on `old`: neither the data nor the flag may change.
fn check_immutable_data(
    old_immutable: bool,
    same_data: bool,
    immutable: bool,
    errs: &mut FieldErrors,
) {
    if !old_immutable {
        return;
    }
    if !same_data {
        errs.add(
            "data",
            "Forbidden: field is immutable when `immutable` is set",
        );
    }
    if !immutable {
        errs.add(
            "immutable",
            "Forbidden: field is immutable when `immutable` is set",
        );
    }
}

impl Kind for ConfigMap {
    fn validate(&self, errs: &mut FieldErrors) {
        let mut size = 0;
        for (k, v) in &self.data {
            validate_config_key(k, "data", errs);
            size += v.len();
        }
        for (k, v) in &self.binary_data {
            validate_config_key(k, "binaryData", errs);
            if self.data.contains_key(k) {
                errs.add(
                    format!("binaryData[{k}]"),
                    format!("invalid value {k:?}: duplicate of key present in data"),
                );
            }
            size += v.len();
        }
        if size > MAX_DATA_BYTES {
            errs.add(
                "data",
                format!("Too long: must have at most {MAX_DATA_BYTES} bytes"),
            );
        }
    }

    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        let same = self.data == old.data && self.binary_data == old.binary_data;
        check_immutable_data(old.immutable, same, self.immutable, errs);
    }
}

impl Kind for Secret {
    /// `stringData` is merged into `data` (winning over it) and never stored; the type
    /// defaults to `Opaque`.
    fn apply_defaults(&mut self) {
        for (k, v) in std::mem::take(&mut self.string_data) {
            self.data.insert(k, v.into_bytes());
        }
        if self.r#type.is_empty() {
            self.r#type = SECRET_OPAQUE.to_string();
        }
    }

    fn validate(&self, errs: &mut FieldErrors) {
        let mut size = 0;
        for (k, v) in &self.data {
            validate_config_key(k, "data", errs);
            size += v.len();
        }
        if size > MAX_DATA_BYTES {
            errs.add(
                "data",
                format!("Too long: must have at most {MAX_DATA_BYTES} bytes"),
            );
        }
        let required = |key: &str, errs: &mut FieldErrors| {
            if !self.data.contains_key(key) {
                errs.add(format!("data[{key}]"), "Required value");
            }
        };
        match self.r#type.as_str() {
            SECRET_DOCKER_CONFIG_JSON | SECRET_DOCKER_CFG => {
                let key = if self.r#type == SECRET_DOCKER_CFG {
                    ".dockercfg"
                } else {
                    ".dockerconfigjson"
                };
                match self.data.get(key) {
                    None => required(key, errs),
                    Some(v) => {
                        if let Err(e) = serde_json::from_slice::<serde_json::Value>(v) {
                            errs.add(
                                format!("data[{key}]"),
                                format!("invalid value \"<secret contents redacted>\": {e}"),
                            );
                        }
                    }
                }
            }
            SECRET_TLS => {
                required("tls.crt", errs);
                required("tls.key", errs);
            }
            SECRET_BASIC_AUTH
                if !self.data.contains_key("username") && !self.data.contains_key("password") =>
            {
                errs.add(
                    "data[username]",
                    "Required value: one of username or password must be set",
                );
            }
            SECRET_SSH_AUTH => required("ssh-privatekey", errs),
            _ => {}
        }
    }

    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        if self.r#type != old.r#type {
            errs.add(
                "type",
                format!("invalid value {:?}: field is immutable", self.r#type),
            );
        }
        check_immutable_data(old.immutable, self.data == old.data, self.immutable, errs);
    }
}

// --------------------------------------------------------------------------------- RBAC

/// The API group of roles and bindings, and of User and Group subjects.
pub const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

fn validate_rules(rules: &[PolicyRule], cluster: bool, errs: &mut FieldErrors) {
    for (i, rule) in rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        if rule.verbs.is_empty() {
            errs.add(
                at("verbs"),
                "required: verbs must contain at least one value",
            );
        }
        if !rule.non_resource_urls.is_empty() {
            if !cluster {
                errs.add(
                    at("nonResourceURLs"),
                    "namespaced rules cannot apply to non-resource URLs",
                );
            }
            if !rule.api_groups.is_empty() || !rule.resources.is_empty() {
                errs.add(
                    at("nonResourceURLs"),
                    "rules cannot apply to both regular resources and non-resource URLs",
                );
            }
            continue;
        }
        if rule.api_groups.is_empty() {
            errs.add(
                at("apiGroups"),
                "required: resource rules must supply at least one api group",
            );
        }
        if rule.resources.is_empty() {
            errs.add(
                at("resources"),
                "required: resource rules must supply at least one resource",
            );
        }
    }
}

impl Kind for Role {
    fn validate(&self, errs: &mut FieldErrors) {
        validate_rules(&self.rules, false, errs);
    }
}

impl Kind for ClusterRole {
    fn validate(&self, errs: &mut FieldErrors) {
        validate_rules(&self.rules, true, errs);
    }
}

/// User and Group subjects are in the RBAC group, service accounts in the core group.
fn default_subjects(subjects: &mut [Subject]) {
    for s in subjects {
        if s.api_group.is_empty() && (s.kind == "User" || s.kind == "Group") {
            s.api_group = RBAC_GROUP.into();
        }
    }
}

fn validate_binding(
    subjects: &[Subject],
    role_ref: Option<&RoleRef>,
    cluster: bool,
    errs: &mut FieldErrors,
) {
    match role_ref {
        None => errs.add("roleRef", "required"),
        Some(r) => {
            if r.api_group != RBAC_GROUP {
                errs.add(
                    "roleRef.apiGroup",
                    format!(
                        "unsupported value {:?}: must be {RBAC_GROUP:?}",
                        r.api_group
                    ),
                );
            }
            let kinds: &[&str] = if cluster {
                &["ClusterRole"]
            } else {
                &["Role", "ClusterRole"]
            };
            one_of(&r.kind, kinds, "roleRef.kind", errs);
            if r.name.is_empty() {
                errs.add("roleRef.name", "required");
            }
        }
    }
    for (i, s) in subjects.iter().enumerate() {
        let at = |f: &str| format!("subjects[{i}].{f}");
        if s.name.is_empty() {
            errs.add(at("name"), "required");
        }
        match s.kind.as_str() {
            "User" | "Group" => {
                if s.api_group != RBAC_GROUP {
                    errs.add(
                        at("apiGroup"),
                        format!(
                            "unsupported value {:?}: must be {RBAC_GROUP:?}",
                            s.api_group
                        ),
                    );
                }
            }
            "ServiceAccount" => {
                if !s.api_group.is_empty() {
                    errs.add(at("apiGroup"), "must be empty for a ServiceAccount");
                }
                if cluster && s.namespace.is_empty() {
                    errs.add(at("namespace"), "required for a ServiceAccount");
                }
            }
            other => errs.add(
                at("kind"),
                format!("unsupported value {other:?}: must be User, Group or ServiceAccount"),
            ),
        }
    }
}

fn validate_role_ref_unchanged(
    new: Option<&RoleRef>,
    old: Option<&RoleRef>,
    errs: &mut FieldErrors,
) {
    if new != old {
        errs.add(
            "roleRef",
            "cannot change roleRef: delete the binding and create it again",
        );
    }
}

impl Kind for RoleBinding {
    fn apply_defaults(&mut self) {
        default_subjects(&mut self.subjects);
    }
    fn validate(&self, errs: &mut FieldErrors) {
        validate_binding(&self.subjects, self.role_ref.as_ref(), false, errs);
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        validate_role_ref_unchanged(self.role_ref.as_ref(), old.role_ref.as_ref(), errs);
    }
}

impl Kind for ClusterRoleBinding {
    fn apply_defaults(&mut self) {
        default_subjects(&mut self.subjects);
    }
    fn validate(&self, errs: &mut FieldErrors) {
        validate_binding(&self.subjects, self.role_ref.as_ref(), true, errs);
    }
    fn validate_update(&self, old: &Self, errs: &mut FieldErrors) {
        validate_role_ref_unchanged(self.role_ref.as_ref(), old.role_ref.as_ref(), errs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::api::json::from_value;
    use serde_json::json;

    fn errors<K: Kind>(v: serde_json::Value) -> String {
        let mut obj: K = from_value(v).unwrap();
        obj.apply_defaults();
        let mut errs = FieldErrors::default();
        validate_metadata(&obj, &mut errs);
        obj.validate(&mut errs);
        errs.to_string()
    }

    fn deployment(spec: serde_json::Value) -> serde_json::Value {
        json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec})
    }

    #[test]
    fn a_good_deployment_passes() {
        let e = errors::<Deployment>(deployment(json!({
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "command": ["web"]}]}},
        })));
        assert_eq!(e, "");
    }

    #[test]
    fn errors_name_the_field() {
        let e = errors::<Deployment>(deployment(json!({
            "replicas": -1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                         "spec": {"containers": [{"image": "x"}]}},
        })));
        assert!(e.contains("spec.replicas: must be >= 0"), "{e}");
        assert!(
            e.contains("spec.template.spec.containers[0].name: required"),
            "{e}"
        );
        assert!(e.contains("spec.template.metadata.labels:"), "{e}");
    }

    #[test]
    fn pod_rules() {
        let e = errors::<Pod>(
            json!({"metadata": {"name": "Bad_Name", "namespace": "default"},
            "spec": {"restartPolicy": "Sometimes", "containers": [
                {"name": "a", "image": "x", "ports": [{"containerPort": 70000}],
                 "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1", "memory": "lots"}},
                 "livenessProbe": {"periodSeconds": 5}},
                {"name": "a", "image": "y"}]}}),
        );
        for want in [
            "metadata.name: invalid value \"Bad_Name\"",
            "spec.restartPolicy: unsupported value \"Sometimes\"",
            "spec.containers[0].ports[0].containerPort: must be between 1 and 65535",
            "spec.containers[0].resources.limits.memory:",
            "spec.containers[0].resources.requests.cpu: must be less than or equal to the limit",
            "spec.containers[0].livenessProbe: must specify exactly one of",
            "spec.containers[1].name: duplicate container name",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
    }

    #[test]
    fn deployment_strategy_rules() {
        let base = |strategy: serde_json::Value| {
            errors::<Deployment>(deployment(json!({
                "selector": {"matchLabels": {"app": "web"}},
                "strategy": strategy,
                "template": {"metadata": {"labels": {"app": "web"}},
                             "spec": {"containers": [{"name": "web", "command": ["web"]}]}},
            })))
        };
        assert!(
            base(json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}}))
                .contains("maxUnavailable: may not be 0 when maxSurge is 0")
        );
        assert!(
            base(json!({"rollingUpdate": {"maxSurge": "x%"}})).contains("maxSurge: invalid value")
        );
        assert!(
            base(json!({"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}))
                .contains("spec.strategy.rollingUpdate: may not be specified")
        );
        assert_eq!(base(json!({"type": "Recreate"})), "");
    }

    #[test]
    fn pod_spec_is_fixed_after_create() {
        let pod: Pod =
            from_value(json!({"spec": {"containers": [{"name": "a", "image": "x"}]}})).unwrap();
        let mut new = pod.clone();
        new.spec.as_mut().unwrap().containers[0].image = "y".into();
        let mut errs = FieldErrors::default();
        new.validate_update(&pod, &mut errs);
        assert!(errs.is_empty());
        new.spec.as_mut().unwrap().restart_policy = "Never".into();
        new.validate_update(&pod, &mut errs);
        assert!(
            errs.to_string()
                .starts_with("spec: pod updates may not change")
        );
    }
}
