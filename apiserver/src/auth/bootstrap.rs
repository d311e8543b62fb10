//! The roles every cluster starts with (Kubernetes' user-facing default ClusterRoles, for the
//! kinds Flotilla serves), and the binding of `cluster-admin` to `system:masters`. Made by
//! the control plane at start when missing; an edited one is left as it is.

use std::collections::HashMap;

use flotilla_proto::api::{
    ClusterRole, ClusterRoleBinding, ObjectMeta, PolicyRule, RoleRef, Subject,
};

use crate::validate::RBAC_GROUP;

const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    PolicyRule {
        verbs: strings(verbs),
        api_groups: strings(groups),
        resources: strings(resources),
        ..Default::default()
    }
}

fn meta(name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        labels: HashMap::from([("kubernetes.io/bootstrapping".into(), "rbac-defaults".into())])
            .into_iter()
            .collect(),
        ..Default::default()
    })
}

fn role(name: &str, rules: Vec<PolicyRule>) -> ClusterRole {
    ClusterRole {
        metadata: meta(name),
        rules,
        ..Default::default()
    }
}

/// `view`: read what a namespace holds (not its roles: they tell who may do what; not its
/// Secrets: reading one can give more than view, as Kubernetes reasons).
fn view() -> Vec<PolicyRule> {
    vec![
        rule(
            &[""],
            &[
                "pods",
                "pods/log",
                "pods/status",
                "services",
                "services/status",
                "endpoints",
                "events",
                "namespaces",
                "namespaces/status",
                "resourcequotas",
                "resourcequotas/status",
                "configmaps",
            ],
            READ,
        ),
        rule(
            &["apps"],
            &[
                "deployments",
                "deployments/status",
                "deployments/scale",
                "replicasets",
                "replicasets/status",
                "replicasets/scale",
                "daemonsets",
                "daemonsets/status",
            ],
            READ,
        ),
        rule(
            &["batch"],
            &["jobs", "jobs/status", "cronjobs", "cronjobs/status"],
            READ,
        ),
        rule(
            &["policy"],
            &["poddisruptionbudgets", "poddisruptionbudgets/status"],
            READ,
        ),
    ]
}

/// `edit`: `view`, read Secrets, and write the workloads, services and configuration.
fn edit() -> Vec<PolicyRule> {
    let mut rules = view();
    rules.push(rule(&[""], &["secrets"], READ));
    rules.push(rule(
        &[""],
        &["pods", "services", "endpoints", "configmaps", "secrets"],
        WRITE,
    ));
    rules.push(rule(
        &["apps"],
        &[
            "deployments",
            "deployments/scale",
            "replicasets",
            "replicasets/scale",
            "daemonsets",
        ],
        WRITE,
    ));
    rules.push(rule(&["batch"], &["jobs", "cronjobs"], WRITE));
    rules.push(rule(&["policy"], &["poddisruptionbudgets"], WRITE));
    rules.push(rule(&[""], &["pods/eviction"], &["create"]));
    rules
}

/// `admin`: `edit`, and the namespace's roles and bindings.
fn admin() -> Vec<PolicyRule> {
    let mut rules = edit();
    let all: Vec<&str> = READ.iter().chain(WRITE).copied().collect();
    rules.push(rule(&[RBAC_GROUP], &["roles", "rolebindings"], &all));
    rules
}

/// The default ClusterRoles: `cluster-admin`, `admin`, `edit`, `view`.
pub fn cluster_roles() -> Vec<ClusterRole> {
    vec![
        role(
            "cluster-admin",
            vec![
                rule(&["*"], &["*"], &["*"]),
                PolicyRule {
                    verbs: vec!["*".into()],
                    non_resource_urls: vec!["*".into()],
                    ..Default::default()
                },
            ],
        ),
        role("admin", admin()),
        role("edit", edit()),
        role("view", view()),
    ]
}

/// `cluster-admin` for group `system:masters`, as Kubernetes binds it.
pub fn cluster_role_bindings() -> Vec<ClusterRoleBinding> {
    vec![ClusterRoleBinding {
        metadata: meta("cluster-admin"),
        subjects: vec![Subject {
            kind: "Group".into(),
            api_group: RBAC_GROUP.into(),
            name: super::MASTERS.into(),
            ..Default::default()
        }],
        role_ref: Some(RoleRef {
            api_group: RBAC_GROUP.into(),
            kind: "ClusterRole".into(),
            name: "cluster-admin".into(),
        }),
        ..Default::default()
    }]
}
