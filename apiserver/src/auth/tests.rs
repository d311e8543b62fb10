use std::sync::Arc;

use flotilla_proto::api::{
    ClusterRoleBinding, Deployment, Event, Lease, Namespace, Node, Pod, PodSpec, PolicyRule,
    Resource, Role, RoleBinding, RoleRef, Service, Subject,
};

use super::*;

fn user(name: &str, groups: &[&str]) -> Caller {
    Caller::User(Arc::new(UserInfo {
        name: name.into(),
        uid: String::new(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }))
}

fn node(n: &str) -> Caller {
    user(&format!("system:node:{n}"), &[NODES, AUTHENTICATED])
}

fn allowed(caller: &Caller, attrs: &Attributes) -> bool {
    matches!(authorize(caller, attrs, &rbac::NoRules), Decision::Allow(_))
}

#[test]
fn masters_may_do_everything_and_others_nothing_yet() {
    let admin = user("admin", &[MASTERS, AUTHENTICATED]);
    let alice = user("alice", &["dev", AUTHENTICATED]);
    for attrs in [
        Attributes::new::<Pod>("delete", "shop", "web"),
        Attributes::new::<Deployment>("create", "shop", "web"),
        Attributes::new::<Node>("list", "", ""),
    ] {
        assert!(allowed(&admin, &attrs));
        assert!(allowed(&Caller::Unchecked, &attrs));
        assert!(!allowed(&alice, &attrs), "{attrs:?}");
    }
}

#[test]
fn a_denial_reads_as_kubernetes_words_it() {
    let alice = UserInfo {
        name: "alice".into(),
        ..Default::default()
    };
    assert_eq!(
        forbidden(&alice, &Attributes::new::<Pod>("delete", "shop", "x")),
        "pods \"x\" is forbidden: User \"alice\" cannot delete resource \"pods\" in API group \
         \"\" in the namespace \"shop\""
    );
    assert_eq!(
        forbidden(&alice, &Attributes::new::<Deployment>("list", "", "")),
        "deployments is forbidden: User \"alice\" cannot list resource \"deployments\" in API \
         group \"apps\" at the cluster scope"
    );
    assert_eq!(
        forbidden(
            &alice,
            &Attributes::new::<Node>("update", "ignored", "n2").subresource("status")
        ),
        "nodes/status \"n2\" is forbidden: User \"alice\" cannot update resource \
         \"nodes/status\" in API group \"\" at the cluster scope"
    );
}

#[test]
fn request_uris_are_kubernetes_paths() {
    assert_eq!(
        Attributes::new::<Pod>("update", "shop", "web")
            .subresource("status")
            .request_uri(),
        "/api/v1/namespaces/shop/pods/web/status"
    );
    assert_eq!(
        Attributes::new::<Deployment>("watch", "", "").request_uri(),
        "/apis/apps/v1/deployments?watch=true"
    );
    assert_eq!(
        Attributes::new::<Namespace>("get", "x", "shop").request_uri(),
        "/api/v1/namespaces/shop"
    );
}

#[test]
fn a_node_writes_only_its_own_node_lease_and_pods() {
    let n1 = node("n1");
    let lease_ns = node::LEASE_NAMESPACE;
    // Its own node, lease, events; reads of what its pods need.
    for attrs in [
        Attributes::new::<Node>("create", "", "n1"),
        Attributes::new::<Node>("update", "", "n1"),
        Attributes::new::<Node>("update", "", "n1").subresource("status"),
        Attributes::new::<Node>("get", "", "n2"),
        Attributes::new::<Node>("list", "", ""),
        Attributes::new::<Pod>("watch", "", ""),
        Attributes::new::<Service>("list", "", ""),
        Attributes::new::<Namespace>("get", "", lease_ns),
        Attributes::new::<Lease>("patch", lease_ns, "n1"),
        Attributes::new::<Lease>("create", lease_ns, "n1"),
        Attributes::new::<Event>("create", "shop", ""),
    ] {
        assert_eq!(
            authorize(&n1, &attrs, &rbac::NoRules),
            Decision::Allow(None),
            "{attrs:?} should be allowed"
        );
    }
    // Pods' status and deletion: only the pods bound to it, checked at the write.
    for attrs in [
        Attributes::new::<Pod>("update", "shop", "web").subresource("status"),
        Attributes::new::<Pod>("patch", "shop", "web").subresource("status"),
        Attributes::new::<Pod>("delete", "shop", "web"),
    ] {
        assert_eq!(
            authorize(&n1, &attrs, &rbac::NoRules),
            Decision::Allow(Some(Restriction::PodsOfNode("n1".into()))),
            "{attrs:?}"
        );
    }
    // Nothing else.
    for attrs in [
        Attributes::new::<Node>("update", "", "n2"),
        Attributes::new::<Node>("update", "", "n2").subresource("status"),
        Attributes::new::<Node>("delete", "", "n2"),
        Attributes::new::<Node>("create", "", ""),
        Attributes::new::<Lease>("patch", lease_ns, "n2"),
        Attributes::new::<Lease>("patch", "default", "n1"),
        Attributes::new::<Pod>("create", "shop", "mirror"),
        Attributes::new::<Pod>("update", "shop", "web"),
        Attributes::new::<Pod>("create", "shop", "web").subresource("binding"),
        Attributes::new::<Pod>("get", "shop", "web").subresource("log"),
        Attributes::new::<Deployment>("create", "shop", "web"),
        Attributes::new::<Deployment>("list", "", ""),
        Attributes::new::<Namespace>("create", "", "shop"),
        Attributes::new::<Event>("delete", "shop", "e"),
        Attributes::new::<Service>("delete", "shop", "web"),
    ] {
        assert!(!allowed(&n1, &attrs), "{attrs:?} should be refused");
    }
    // A node's name without the group is not a node.
    let pretender = user("system:node:n1", &[AUTHENTICATED]);
    assert!(!allowed(
        &pretender,
        &Attributes::new::<Node>("update", "", "n1")
    ));
}

fn pod_on(node: &str) -> Pod {
    Pod {
        metadata: Some(flotilla_proto::api::ObjectMeta {
            name: "web".into(),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            node_name: node.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_restricted_write_needs_the_pod_bound_to_the_node() {
    let r = Some(Restriction::PodsOfNode("n1".into()));
    scope(r.clone(), async {
        assert!(check_write(&pod_on("n1")).is_ok());
        let e = check_write(&pod_on("n2")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "pods \"web\" is forbidden: node \"n1\" can only update or delete pods with \
             spec.nodeName set to itself"
        );
        assert!(check_write(&pod_on("")).is_err());
        // Other kinds are the authorizer's business.
        assert!(check_write(&Node::default()).is_ok());
    })
    .await;
    assert!(check_write(&pod_on("n2")).is_ok());
    scope(None, async { assert!(check_write(&pod_on("n2")).is_ok()) }).await;
}

/// Bindings and roles held in memory, as the store would hold them.
struct Fixed {
    cluster_bindings: Vec<ClusterRoleBinding>,
    bindings: Vec<RoleBinding>,
    roles: Vec<Role>,
}

impl rbac::Rules for Fixed {
    fn rules_for(&self, user: &UserInfo, namespace: &str) -> Vec<PolicyRule> {
        let cluster_roles = bootstrap::cluster_roles();
        rbac::bound_rules(
            user,
            namespace,
            &self.cluster_bindings,
            &self.bindings,
            &|name| cluster_roles.iter().find(|r| r.name() == name).cloned(),
            &|ns, name| {
                self.roles
                    .iter()
                    .find(|r| r.name() == name && r.namespace() == ns)
                    .cloned()
            },
        )
    }
}

fn subject(kind: &str, name: &str) -> Subject {
    Subject {
        kind: kind.into(),
        api_group: if kind == "ServiceAccount" {
            String::new()
        } else {
            crate::validate::RBAC_GROUP.into()
        },
        name: name.into(),
        namespace: String::new(),
    }
}

fn binding(ns: &str, role_kind: &str, role: &str, subjects: Vec<Subject>) -> RoleBinding {
    RoleBinding {
        metadata: Some(flotilla_proto::api::ObjectMeta {
            name: format!("{role}-binding"),
            namespace: ns.into(),
            ..Default::default()
        }),
        subjects,
        role_ref: Some(RoleRef {
            api_group: crate::validate::RBAC_GROUP.into(),
            kind: role_kind.into(),
            name: role.into(),
        }),
        ..Default::default()
    }
}

#[test]
fn each_built_in_role_allows_its_verbs_and_no_more() {
    let rules = Fixed {
        cluster_bindings: bootstrap::cluster_role_bindings(),
        bindings: vec![
            binding(
                "shop",
                "ClusterRole",
                "view",
                vec![subject("User", "viewer")],
            ),
            binding(
                "shop",
                "ClusterRole",
                "edit",
                vec![subject("Group", "devs")],
            ),
            binding(
                "shop",
                "ClusterRole",
                "admin",
                vec![subject("User", "owner")],
            ),
            binding(
                "shop",
                "Role",
                "log-reader",
                vec![subject("ServiceAccount", "robot")],
            ),
        ],
        roles: vec![Role {
            metadata: Some(flotilla_proto::api::ObjectMeta {
                name: "log-reader".into(),
                namespace: "shop".into(),
                ..Default::default()
            }),
            rules: vec![PolicyRule {
                verbs: vec!["get".into()],
                api_groups: vec!["".into()],
                resources: vec!["pods/log".into()],
                resource_names: vec!["web".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let may = |caller: &Caller, attrs: Attributes| {
        matches!(authorize(caller, &attrs, &rules), Decision::Allow(_))
    };
    let viewer = user("viewer", &[AUTHENTICATED]);
    let dev = user("dan", &["devs", AUTHENTICATED]);
    let owner = user("olga", &[AUTHENTICATED]);
    let owner_named = user("owner", &[AUTHENTICATED]);
    let robot = user("system:serviceaccount:shop:robot", &[AUTHENTICATED]);
    // view: reads in its namespace only; no writes; not roles.
    assert!(may(&viewer, Attributes::new::<Pod>("list", "shop", "")));
    assert!(may(
        &viewer,
        Attributes::new::<Pod>("get", "shop", "web").subresource("log")
    ));
    assert!(may(
        &viewer,
        Attributes::new::<Deployment>("watch", "shop", "")
    ));
    assert!(!may(
        &viewer,
        Attributes::new::<Pod>("delete", "shop", "web")
    ));
    assert!(!may(&viewer, Attributes::new::<Pod>("list", "other", "")));
    assert!(!may(&viewer, Attributes::new::<Pod>("list", "", "")));
    assert!(!may(&viewer, Attributes::new::<Role>("list", "shop", "")));
    assert!(!may(&viewer, Attributes::new::<Node>("list", "", "")));
    // edit, through a group: the workloads.
    assert!(may(
        &dev,
        Attributes::new::<Deployment>("create", "shop", "web")
    ));
    assert!(may(&dev, Attributes::new::<Pod>("delete", "shop", "web")));
    assert!(!may(
        &dev,
        Attributes::new::<Pod>("update", "shop", "web").subresource("status")
    ));
    assert!(!may(&dev, Attributes::new::<Role>("create", "shop", "r")));
    assert!(!may(
        &dev,
        Attributes::new::<Deployment>("create", "other", "web")
    ));
    // admin writes the namespace's roles and bindings (held to the escalation checks at
    // the write), not the cluster's.
    assert!(
        !may(&owner, Attributes::new::<Pod>("list", "shop", "")),
        "by name only"
    );
    assert!(may(
        &owner_named,
        Attributes::new::<RoleBinding>("list", "shop", "")
    ));
    assert!(may(
        &owner_named,
        Attributes::new::<RoleBinding>("create", "shop", "b")
    ));
    assert!(!may(
        &owner_named,
        Attributes::new::<ClusterRoleBinding>("create", "", "b")
    ));
    // A Role with resourceNames: that object's subresource only.
    assert!(may(
        &robot,
        Attributes::new::<Pod>("get", "shop", "web").subresource("log")
    ));
    assert!(!may(
        &robot,
        Attributes::new::<Pod>("get", "shop", "db").subresource("log")
    ));
    assert!(!may(&robot, Attributes::new::<Pod>("get", "shop", "web")));
    // cluster-admin, bound to system:masters by a ClusterRoleBinding.
    let masters_by_binding = UserInfo {
        name: "root".into(),
        uid: String::new(),
        groups: vec![MASTERS.into()],
    };
    let rules_of_root = rbac::Rules::rules_for(&rules, &masters_by_binding, "");
    assert!(rules_of_root.iter().any(|r| r.verbs == ["*"]));
}

#[test]
fn a_rule_matches_kubernetes_wildcards() {
    let r = |resources: &[&str]| PolicyRule {
        verbs: vec!["get".into()],
        api_groups: vec!["".into()],
        resources: resources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let status = Attributes::new::<Pod>("get", "shop", "web").subresource("status");
    assert!(rbac::rule_allows(&r(&["pods/status"]), &status));
    assert!(rbac::rule_allows(&r(&["pods/*"]), &status));
    assert!(rbac::rule_allows(&r(&["*/status"]), &status));
    assert!(rbac::rule_allows(&r(&["*"]), &status));
    assert!(!rbac::rule_allows(&r(&["pods"]), &status));
    let apps = Attributes::new::<Deployment>("get", "shop", "web");
    assert!(
        !rbac::rule_allows(&r(&["deployments"]), &apps),
        "wrong group"
    );
}

#[test]
fn one_grants_only_what_one_holds() {
    let rule = |verbs: &[&str], groups: &[&str], resources: &[&str], names: &[&str]| {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        PolicyRule {
            verbs: v(verbs),
            api_groups: v(groups),
            resources: v(resources),
            resource_names: v(names),
            ..Default::default()
        }
    };
    let held = vec![
        rule(&["get", "list"], &[""], &["pods", "pods/*"], &[]),
        rule(&["*"], &["apps"], &["deployments"], &[]),
        rule(&["update"], &[""], &["services"], &["web"]),
    ];
    // Held: subsets, subresources through pods/*, a verb wildcard, a named object.
    for grant in [
        rule(&["get"], &[""], &["pods"], &[]),
        rule(&["list"], &[""], &["pods/log", "pods/status"], &[]),
        rule(&["create", "delete"], &["apps"], &["deployments"], &[]),
        rule(&["update"], &[""], &["services"], &["web"]),
    ] {
        assert!(
            rbac::uncovered(&held, std::slice::from_ref(&grant)).is_empty(),
            "{grant:?}"
        );
    }
    // Not held: another verb, group, resource or name; a wildcard the holder lacks.
    for grant in [
        rule(&["delete"], &[""], &["pods"], &[]),
        rule(&["get"], &["apps"], &["pods"], &[]),
        rule(&["get"], &[""], &["nodes"], &[]),
        rule(&["update"], &[""], &["services"], &["db"]),
        rule(&["update"], &[""], &["services"], &[]),
        rule(&["*"], &[""], &["pods"], &[]),
        rule(&["get"], &["*"], &["pods"], &[]),
    ] {
        assert_eq!(
            rbac::uncovered(&held, std::slice::from_ref(&grant)).len(),
            1,
            "{grant:?}"
        );
    }
    // Each uncovered permission is named on its own.
    let missing = rbac::uncovered(
        &held,
        &[rule(&["get", "delete"], &[""], &["pods", "nodes"], &[])],
    );
    assert_eq!(missing.len(), 3);
    // cluster-admin's rules hold everything.
    let all = bootstrap::cluster_roles()[0].rules.clone();
    for role in bootstrap::cluster_roles() {
        assert!(
            rbac::uncovered(&all, &role.rules).is_empty(),
            "{}",
            role.name()
        );
    }
}
