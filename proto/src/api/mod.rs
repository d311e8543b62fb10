//! The API objects (`flotilla.api.v1`) and what every component knows about them.
//!
//! - [`Resource`]: the facts about one kind that the apiserver, the client and the command
//!   line share (its name, plural, scope, where its status lives, its selectable fields);
//! - [`json`]: JSON/YAML conversion with errors that name the field's path, merge patch;
//! - [`selector`]: label and field selectors, name validation;
//! - [`quantity`]: resource quantities (`250m`, `128Mi`);
//! - [`quota`]: what an object counts against a ResourceQuota;
//! - [`time`]: timestamps and ages;
//! - [`batch`]: the labels of a Job's pods, completed-index ranges.

pub mod batch;
pub mod json;
pub mod quantity;
pub mod quota;
pub mod selector;
pub mod time;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::flotilla_api_v1::*;
pub use crate::for_each_kind;

/// The namespace of the nodes' heartbeat Leases (Kubernetes' `kube-node-lease`), made by
/// the control plane at start.
pub const NODE_LEASE_NAMESPACE: &str = "flotilla-node-lease";

/// One kind of API object.
pub trait Resource:
    prost::Message + Default + Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// `Pod`.
    const KIND: &'static str;
    /// `v1`, `apps/v1`, `coordination.k8s.io/v1`.
    const API_VERSION: &'static str;
    /// `pods`: the key prefix in the store and the name on the command line.
    const PLURAL: &'static str;
    /// The gRPC service's full name: `flotilla.api.v1.Pods`.
    const SERVICE: &'static str;
    const NAMESPACED: bool;
    /// Whether the kind has a status that only UpdateStatus writes.
    const HAS_STATUS: bool;
    /// Fields a field selector may name, besides `metadata.name` and `metadata.namespace`.
    const FIELDS: &'static [&'static str];

    type List: prost::Message + Default + Serialize + Clone;
    type Event: prost::Message + Default + Clone;

    fn metadata(&self) -> Option<&ObjectMeta>;
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
    fn set_type_meta(&mut self);
    /// The object without metadata and status: what a change of bumps `generation`.
    fn spec_part(&self) -> Self;
    /// Replaces this object's status with `other`'s.
    fn set_status_from(&mut self, other: &Self);
    /// The value of a selectable field (see [`Resource::FIELDS`]).
    fn field(&self, path: &str) -> Option<String>;

    fn make_list(items: Vec<Self>, metadata: ListMeta) -> Self::List;
    fn list_items(list: Self::List) -> (Vec<Self>, ListMeta);
    fn make_event(kind: &str, object: Self) -> Self::Event;
    fn event_parts(event: Self::Event) -> (String, Self);

    fn name(&self) -> &str {
        self.metadata().map(|m| m.name.as_str()).unwrap_or("")
    }
    fn namespace(&self) -> &str {
        self.metadata().map(|m| m.namespace.as_str()).unwrap_or("")
    }
    fn resource_version(&self) -> &str {
        self.metadata()
            .map(|m| m.resource_version.as_str())
            .unwrap_or("")
    }
    /// Every field a field selector may name.
    fn selectable_fields() -> Vec<&'static str> {
        let mut all = vec!["metadata.name", "metadata.namespace"];
        all.extend_from_slice(Self::FIELDS);
        all
    }
    /// [`Resource::field`] with the metadata fields.
    fn field_value(&self, path: &str) -> Option<String> {
        match path {
            "metadata.name" => Some(self.name().to_string()),
            "metadata.namespace" => Some(self.namespace().to_string()),
            _ => self.field(path),
        }
    }
}

macro_rules! resource {
    (
        $ty:ident, $list:ident, $event:ident, $service:expr, $api_version:literal, $plural:literal,
        namespaced: $ns:literal, status: $status:tt,
        fields: { $($field:literal => |$o:ident| $value:expr),* $(,)? }
    ) => {
        impl Resource for $ty {
            const KIND: &'static str = stringify!($ty);
            const API_VERSION: &'static str = $api_version;
            const PLURAL: &'static str = $plural;
            const SERVICE: &'static str = concat!("flotilla.api.v1.", $service);
            const NAMESPACED: bool = $ns;
            const HAS_STATUS: bool = resource!(@has $status);
            const FIELDS: &'static [&'static str] = &[$($field),*];
            type List = $list;
            type Event = $event;

            fn metadata(&self) -> Option<&ObjectMeta> {
                self.metadata.as_ref()
            }
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                self.metadata.get_or_insert_default()
            }
            fn set_type_meta(&mut self) {
                self.api_version = $api_version.to_string();
                self.kind = stringify!($ty).to_string();
            }
            fn spec_part(&self) -> Self {
                let mut spec = self.clone();
                spec.metadata = None;
                resource!(@clear_status $status, spec);
                spec
            }
            #[allow(unused_variables)]
            fn set_status_from(&mut self, other: &Self) {
                resource!(@copy_status $status, self, other);
            }
            #[allow(unused_variables, clippy::redundant_closure_call)]
            fn field(&self, path: &str) -> Option<String> {
                match path {
                    $($field => (|$o: &Self| -> Option<String> { $value })(self),)*
                    _ => None,
                }
            }
            fn make_list(items: Vec<Self>, metadata: ListMeta) -> $list {
                $list {
                    api_version: $api_version.to_string(),
                    kind: concat!(stringify!($ty), "List").to_string(),
                    metadata: Some(metadata),
                    items,
                }
            }
            fn list_items(list: $list) -> (Vec<Self>, ListMeta) {
                (list.items, list.metadata.unwrap_or_default())
            }
            fn make_event(kind: &str, object: Self) -> $event {
                $event { r#type: kind.to_string(), object: Some(object) }
            }
            fn event_parts(event: $event) -> (String, Self) {
                (event.r#type, event.object.unwrap_or_default())
            }
        }
    };
    (@has yes) => { true };
    (@has no) => { false };
    (@clear_status yes, $o:ident) => { $o.status = None; };
    (@clear_status no, $o:ident) => {};
    (@copy_status yes, $s:ident, $other:ident) => { $s.status = $other.status.clone(); };
    (@copy_status no, $s:ident, $other:ident) => {};
}

/// Every kind the API serves, declared once: the single list the rest is derived from.
///
/// `for_each_kind!([path::to::callback] ARGS...)` calls `callback! { [ARGS...] ENTRIES }`,
/// where each entry reads
///
/// ```text
/// Kind { list: KindList, event: KindEvent, grpc: module::Trait / Server,
///        api_version: "...", plural: "...", names: ["singular", "short", ...],
///        namespaced: bool, status: yes|no, fields: { "path" => |o| value, ... } }
/// ```
///
/// From it come this crate's [`Resource`] impls and [`KINDS`], the API server's gRPC
/// services and routes, the client's `with_kind!` dispatch (manifests, the command line,
/// the quota controller) and, through [`KINDS`], the namespace deleter and the command
/// line's kind names. A callback that needs only the first fields matches the rest as
/// `$($rest:tt)*`. Adding a kind is one entry here, its messages and service in
/// `flotilla/api/v1/*.proto`, its rules (`apiserver/src/validate.rs`: `Kind`) and its
/// table (`cli/src/table.rs`: `Columns`); the compiler asks for each.
#[macro_export]
macro_rules! for_each_kind {
    ([$($callback:tt)+] $($args:tt)*) => {
        $($callback)+! { [$($args)*]
            Namespace { list: NamespaceList, event: NamespaceEvent,
                grpc: namespaces_server::Namespaces / NamespacesServer,
                api_version: "v1", plural: "namespaces", names: ["namespace", "ns"],
                namespaced: false, status: yes,
                fields: { "status.phase" => |o| Some(o.status.as_ref().map(|s| s.phase.clone()).unwrap_or_default()) } },
            Node { list: NodeList, event: NodeEvent,
                grpc: nodes_server::Nodes / NodesServer,
                api_version: "v1", plural: "nodes", names: ["node", "no"],
                namespaced: false, status: yes,
                fields: { "spec.unschedulable" => |o| Some(o.spec.as_ref().is_some_and(|s| s.unschedulable).to_string()) } },
            Pod { list: PodList, event: PodEvent,
                grpc: pods_server::Pods / PodsServer,
                api_version: "v1", plural: "pods", names: ["pod", "po"],
                namespaced: true, status: yes,
                fields: {
                    "spec.nodeName" => |o| Some(o.spec.as_ref().map(|s| s.node_name.clone()).unwrap_or_default()),
                    "status.phase" => |o| Some(o.status.as_ref().map(|s| s.phase.clone()).unwrap_or_default()),
                } },
            ReplicaSet { list: ReplicaSetList, event: ReplicaSetEvent,
                grpc: replica_sets_server::ReplicaSets / ReplicaSetsServer,
                api_version: "apps/v1", plural: "replicasets", names: ["replicaset", "rs"],
                namespaced: true, status: yes, fields: {} },
            Deployment { list: DeploymentList, event: DeploymentEvent,
                grpc: deployments_server::Deployments / DeploymentsServer,
                api_version: "apps/v1", plural: "deployments", names: ["deployment", "deploy"],
                namespaced: true, status: yes, fields: {} },
            DaemonSet { list: DaemonSetList, event: DaemonSetEvent,
                grpc: daemon_sets_server::DaemonSets / DaemonSetsServer,
                api_version: "apps/v1", plural: "daemonsets", names: ["daemonset", "ds"],
                namespaced: true, status: yes, fields: {} },
            Job { list: JobList, event: JobEvent,
                grpc: jobs_server::Jobs / JobsServer,
                api_version: "batch/v1", plural: "jobs", names: ["job"],
                namespaced: true, status: yes, fields: {} },
            CronJob { list: CronJobList, event: CronJobEvent,
                grpc: cron_jobs_server::CronJobs / CronJobsServer,
                api_version: "batch/v1", plural: "cronjobs", names: ["cronjob", "cj"],
                namespaced: true, status: yes, fields: {} },
            PodDisruptionBudget { list: PodDisruptionBudgetList, event: PodDisruptionBudgetEvent,
                grpc: pod_disruption_budgets_server::PodDisruptionBudgets / PodDisruptionBudgetsServer,
                api_version: "policy/v1", plural: "poddisruptionbudgets", names: ["poddisruptionbudget", "pdb"],
                namespaced: true, status: yes, fields: {} },
            Service { list: ServiceList, event: ServiceEvent,
                grpc: services_server::Services / ServicesServer,
                api_version: "v1", plural: "services", names: ["service", "svc"],
                namespaced: true, status: yes, fields: {} },
            Endpoints { list: EndpointsList, event: EndpointsEvent,
                grpc: endpoints_service_server::EndpointsService / EndpointsServiceServer,
                api_version: "v1", plural: "endpoints", names: ["endpoint", "ep"],
                namespaced: true, status: no, fields: {} },
            Event { list: EventList, event: EventEvent,
                grpc: events_server::Events / EventsServer,
                api_version: "v1", plural: "events", names: ["event", "ev"],
                namespaced: true, status: no,
                fields: {
                    "involvedObject.kind" => |o| Some(o.involved_object.as_ref().map(|r| r.kind.clone()).unwrap_or_default()),
                    "involvedObject.name" => |o| Some(o.involved_object.as_ref().map(|r| r.name.clone()).unwrap_or_default()),
                    "involvedObject.namespace" => |o| Some(o.involved_object.as_ref().map(|r| r.namespace.clone()).unwrap_or_default()),
                    "involvedObject.uid" => |o| Some(o.involved_object.as_ref().map(|r| r.uid.clone()).unwrap_or_default()),
                    "reason" => |o| Some(o.reason.clone()),
                    "type" => |o| Some(o.r#type.clone()),
                } },
            Lease { list: LeaseList, event: LeaseEvent,
                grpc: leases_server::Leases / LeasesServer,
                api_version: "coordination.k8s.io/v1", plural: "leases", names: ["lease"],
                namespaced: true, status: no, fields: {} },
            ResourceQuota { list: ResourceQuotaList, event: ResourceQuotaEvent,
                grpc: resource_quotas_server::ResourceQuotas / ResourceQuotasServer,
                api_version: "v1", plural: "resourcequotas", names: ["resourcequota", "quota"],
                namespaced: true, status: yes, fields: {} },
            ConfigMap { list: ConfigMapList, event: ConfigMapEvent,
                grpc: config_maps_server::ConfigMaps / ConfigMapsServer,
                api_version: "v1", plural: "configmaps", names: ["configmap", "cm"],
                namespaced: true, status: no, fields: {} },
            Secret { list: SecretList, event: SecretEvent,
                grpc: secrets_server::Secrets / SecretsServer,
                api_version: "v1", plural: "secrets", names: ["secret"],
                namespaced: true, status: no,
                fields: { "type" => |o| Some(o.r#type.clone()) } },
            Role { list: RoleList, event: RoleEvent,
                grpc: roles_server::Roles / RolesServer,
                api_version: "rbac.authorization.k8s.io/v1", plural: "roles", names: ["role"],
                namespaced: true, status: no, fields: {} },
            ClusterRole { list: ClusterRoleList, event: ClusterRoleEvent,
                grpc: cluster_roles_server::ClusterRoles / ClusterRolesServer,
                api_version: "rbac.authorization.k8s.io/v1", plural: "clusterroles", names: ["clusterrole"],
                namespaced: false, status: no, fields: {} },
            RoleBinding { list: RoleBindingList, event: RoleBindingEvent,
                grpc: role_bindings_server::RoleBindings / RoleBindingsServer,
                api_version: "rbac.authorization.k8s.io/v1", plural: "rolebindings", names: ["rolebinding"],
                namespaced: true, status: no, fields: {} },
            ClusterRoleBinding { list: ClusterRoleBindingList, event: ClusterRoleBindingEvent,
                grpc: cluster_role_bindings_server::ClusterRoleBindings / ClusterRoleBindingsServer,
                api_version: "rbac.authorization.k8s.io/v1", plural: "clusterrolebindings", names: ["clusterrolebinding"],
                namespaced: false, status: no, fields: {} },
        }
    };
}

/// What the command line and manifests know about each kind, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    pub api_version: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Other names `get` accepts: singular, short names.
    pub aliases: &'static [&'static str],
}

/// The [`Resource`] impls and [`KINDS`], from [`for_each_kind!`].
macro_rules! declare_kinds {
    ([] $(
        $ty:ident {
            list: $list:ident, event: $event:ident, grpc: $module:ident :: $service:ident / $server:ident,
            api_version: $api_version:literal, plural: $plural:literal, names: [$($alias:literal),* $(,)?],
            namespaced: $ns:literal, status: $status:tt, fields: { $($fields:tt)* } $(,)?
        }
    ),* $(,)?) => {
        $(
            resource!($ty, $list, $event, stringify!($service), $api_version, $plural,
                namespaced: $ns, status: $status, fields: { $($fields)* });
        )*

        /// Every kind the API serves.
        pub const KINDS: &[KindInfo] = &[
            $(KindInfo {
                kind: stringify!($ty),
                api_version: $api_version,
                plural: $plural,
                namespaced: $ns,
                aliases: &[$($alias),*],
            }),*
        ];
    };
}

for_each_kind!([declare_kinds]);

/// Finds a kind by its kind name (`Deployment`), plural (`deployments`) or alias (`deploy`),
/// ignoring case.
pub fn find_kind(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_ascii_lowercase();
    KINDS.iter().find(|k| {
        k.kind.eq_ignore_ascii_case(&lower)
            || k.plural == lower
            || k.aliases.contains(&lower.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_kind_answers_to_its_names_and_no_name_is_taken_twice() {
        let mut seen = std::collections::BTreeSet::new();
        for k in KINDS {
            for name in [k.kind.to_ascii_lowercase().as_str(), k.plural]
                .into_iter()
                .chain(k.aliases.iter().copied())
                .collect::<std::collections::BTreeSet<_>>()
            {
                assert!(seen.insert(name.to_string()), "{name} names two kinds");
                assert_eq!(find_kind(name), Some(k), "{name}");
            }
            assert_eq!(find_kind(k.kind), Some(k));
        }
    }

    #[test]
    fn kubernetes_field_names_round_trip() {
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "nodeName": "n1", "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 5,
                "containers": [{
                    "name": "c", "command": ["sleep"], "args": ["10"],
                    "ports": [{"containerPort": 80}],
                    "resources": {"requests": {"cpu": "250m", "memory": "128Mi"}, "limits": {"cpu": 1}},
                    "livenessProbe": {"httpGet": {"path": "/", "port": 80}},
                    "readinessProbe": {"tcpSocket": {"port": "http"}},
                }],
            },
            "status": {"podIP": "10.0.0.1", "hostIP": "192.168.0.1", "phase": "Running"},
        });
        let pod: Pod = json::from_value(manifest.clone()).unwrap();
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(5));
        let c = &spec.containers[0];
        assert_eq!(c.resources.as_ref().unwrap().limits["cpu"], "1");
        assert_eq!(
            c.liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .port,
            "80"
        );
        assert_eq!(pod.status.as_ref().unwrap().pod_ip, "10.0.0.1");
        let mut back = json::to_value(&pod);
        // Quantities come back as strings, as Kubernetes prints them.
        back["spec"]["containers"][0]["resources"]["limits"]["cpu"] = json!(1);
        assert_eq!(back, manifest);
    }

    #[test]
    fn unknown_fields_are_reported_by_path() {
        let err = json::from_value::<Deployment>(json!({
            "spec": {"template": {"spec": {"containers": [{"name": "a", "imagee": "x"}]}}}
        }))
        .unwrap_err();
        assert_eq!(err.path, "spec.template.spec.containers[0].imagee");
        assert!(err.message.contains("unknown field `imagee`"), "{err}");
        let err =
            json::from_value::<Deployment>(json!({"spec": {"replicas": "three"}})).unwrap_err();
        assert_eq!(err.path, "spec.replicas");
    }

    #[test]
    fn int_or_string_keeps_numbers_numbers() {
        let d: Deployment = json::from_value(json!({
            "spec": {"strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": "25%"}}}
        }))
        .unwrap();
        let ru = d
            .spec
            .as_ref()
            .unwrap()
            .strategy
            .as_ref()
            .unwrap()
            .rolling_update
            .clone()
            .unwrap();
        assert_eq!(
            (ru.max_surge.as_str(), ru.max_unavailable.as_str()),
            ("1", "25%")
        );
        let v = json::to_value(&d);
        assert_eq!(
            v["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": 1, "maxUnavailable": "25%"})
        );
    }

    #[test]
    fn kinds_are_found_by_any_name() {
        assert_eq!(find_kind("deploy").unwrap().kind, "Deployment");
        assert_eq!(find_kind("Pods").unwrap().kind, "Pod");
        assert_eq!(find_kind("svc").unwrap().plural, "services");
        assert!(find_kind("widgets").is_none());
    }

    #[test]
    fn selectable_fields() {
        let mut pod = Pod::default();
        pod.metadata_mut().name = "a".into();
        pod.spec.get_or_insert_default().node_name = "n1".into();
        assert_eq!(pod.field_value("spec.nodeName").as_deref(), Some("n1"));
        assert_eq!(pod.field_value("metadata.name").as_deref(), Some("a"));
        assert_eq!(pod.field_value("status.phase").as_deref(), Some(""));
        assert!(Pod::selectable_fields().contains(&"status.phase"));
    }
}
