//! RBAC, as Kubernetes' RBAC authorizer decides: a request is allowed when a rule of a role
//! bound to the caller allows it. ClusterRoleBindings grant their ClusterRole everywhere; a
//! RoleBinding grants its Role (or a ClusterRole) in its own namespace only.
//!
//! The bindings and roles are read from the member's own copy of the key space (not a
//! linearizable read: as kube-apiserver reads them from its informers' caches, a change is
//! in force within moments on every member).
//!
//! Writing roles and bindings is held to Kubernetes' escalation checks
//! ([`super::escalation`]): one grants only what one holds.

use flotilla_proto::api::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};

use super::{Attributes, UserInfo};

/// Where the rules bound to a user come from.
pub trait Rules {
    /// The rules of every role bound to `user`, cluster-wide and in `namespace`.
    fn rules_for(&self, user: &UserInfo, namespace: &str) -> Vec<PolicyRule>;
    /// Whether a pod bound to `node` in `namespace` refers to `resource` `name` (the Node
    /// authorizer's graph: what an agent may read for its pods).
    fn node_refers(&self, _node: &str, _namespace: &str, _resource: &str, _name: &str) -> bool {
        false
    }
}

/// No bindings at all.
pub struct NoRules;

impl Rules for NoRules {
    fn rules_for(&self, _: &UserInfo, _: &str) -> Vec<PolicyRule> {
        Vec::new()
    }
}

/// Whether RBAC allows `user` what `attrs` describe.
pub fn allows(rules: &dyn Rules, user: &UserInfo, attrs: &Attributes) -> bool {
    rules
        .rules_for(user, &attrs.namespace)
        .iter()
        .any(|r| rule_allows(r, attrs))
}

/// Whether one rule allows `attrs`.
pub fn rule_allows(rule: &PolicyRule, attrs: &Attributes) -> bool {
    let has = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
    if !has(&rule.verbs, &attrs.verb) || !has(&rule.api_groups, &attrs.api_group) {
        return false;
    }
    let resource_ok = rule.resources.iter().any(|r| {
        if attrs.subresource.is_empty() {
            r == "*" || *r == attrs.resource
        } else {
            r == "*"
                || *r == format!("{}/{}", attrs.resource, attrs.subresource)
                || *r == format!("{}/*", attrs.resource)
                || *r == format!("*/{}", attrs.subresource)
        }
    });
    if !resource_ok {
        return false;
    }
    // resourceNames narrow a rule to those objects; a request without a name (a list, a
    // create with generateName) does not match such a rule.
    rule.resource_names.is_empty()
        || (!attrs.name.is_empty() && rule.resource_names.contains(&attrs.name))
}

/// Whether `subject` of a binding in `binding_namespace` is `user`.
pub fn subject_matches(subject: &Subject, user: &UserInfo, binding_namespace: &str) -> bool {
    match subject.kind.as_str() {
        "User" => subject.name == user.name,
        "Group" => user.in_group(&subject.name),
        "ServiceAccount" => {
            let ns = if subject.namespace.is_empty() {
                binding_namespace
            } else {
                &subject.namespace
            };
            user.name == format!("system:serviceaccount:{ns}:{}", subject.name)
        }
        _ => false,
    }
}

/// The rules bound to `user`, given the cluster's bindings and roles.
pub fn bound_rules(
    user: &UserInfo,
    namespace: &str,
    cluster_bindings: &[ClusterRoleBinding],
    bindings: &[RoleBinding],
    cluster_role: &dyn Fn(&str) -> Option<ClusterRole>,
    role: &dyn Fn(&str, &str) -> Option<Role>,
) -> Vec<PolicyRule> {
    let mut rules = Vec::new();
    for b in cluster_bindings {
        if b.subjects.iter().any(|s| subject_matches(s, user, ""))
            && let Some(r) = &b.role_ref
            && let Some(cr) = cluster_role(&r.name)
        {
            rules.extend(cr.rules);
        }
    }
    for b in bindings {
        let ns = b.metadata.as_ref().map_or("", |m| m.namespace.as_str());
        if ns != namespace || !b.subjects.iter().any(|s| subject_matches(s, user, ns)) {
            continue;
        }
        match &b.role_ref {
            Some(r) if r.kind == "ClusterRole" => {
                rules.extend(cluster_role(&r.name).map(|c| c.rules).unwrap_or_default())
            }
            Some(r) if r.kind == "Role" => {
                rules.extend(role(ns, &r.name).map(|c| c.rules).unwrap_or_default())
            }
            _ => {}
        }
    }
    rules
}

impl Rules for crate::Api {
    fn rules_for(&self, user: &UserInfo, namespace: &str) -> Vec<PolicyRule> {
        let bindings = if namespace.is_empty() {
            Vec::new()
        } else {
            self.local_list::<RoleBinding>(Some(namespace))
        };
        bound_rules(
            user,
            namespace,
            &self.local_list::<ClusterRoleBinding>(None),
            &bindings,
            &|name| self.local_get::<ClusterRole>("", name),
            &|ns, name| self.local_get::<Role>(ns, name),
        )
    }

    fn node_refers(&self, node: &str, namespace: &str, resource: &str, name: &str) -> bool {
        self.local_list::<flotilla_proto::api::Pod>(Some(namespace))
            .iter()
            .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name == node))
            .any(|p| super::node::pod_refers(p, resource, name))
    }
}

/// Whether `list` (a rule's resources) covers resource `r` (`pods`, `pods/status`, `*`).
fn resource_covered(list: &[String], r: &str) -> bool {
    list.iter().any(|o| {
        o == "*"
            || o == r
            || r.split_once('/')
                .is_some_and(|(res, sub)| *o == format!("{res}/*") || *o == format!("*/{sub}"))
    })
}

/// Whether `url` is matched by a rule's nonResourceURLs (`*`, exact, or `/prefix/*`).
fn url_covered(list: &[String], url: &str) -> bool {
    list.iter()
        .any(|o| o == "*" || o == url || o.strip_suffix('*').is_some_and(|p| url.starts_with(p)))
}

/// The permissions of `rules` that no rule of `owner` covers, each as one rule of one
/// verb, group, resource and name (Kubernetes' escalation check: a wildcard is covered
/// only by a wildcard). Empty: `owner` holds everything `rules` grants.
pub fn uncovered(owner: &[PolicyRule], rules: &[PolicyRule]) -> Vec<PolicyRule> {
    let has = |list: &[String], v: &str| list.iter().any(|o| o == "*" || o == v);
    let mut missing = Vec::new();
    for rule in rules {
        for verb in &rule.verbs {
            for url in &rule.non_resource_urls {
                let held = owner
                    .iter()
                    .any(|o| has(&o.verbs, verb) && url_covered(&o.non_resource_urls, url));
                if !held {
                    missing.push(PolicyRule {
                        verbs: vec![verb.clone()],
                        non_resource_urls: vec![url.clone()],
                        ..Default::default()
                    });
                }
            }
            for group in &rule.api_groups {
                for resource in &rule.resources {
                    let names: Vec<Option<&String>> = if rule.resource_names.is_empty() {
                        vec![None]
                    } else {
                        rule.resource_names.iter().map(Some).collect()
                    };
                    for name in names {
                        let held = owner.iter().any(|o| {
                            has(&o.verbs, verb)
                                && has(&o.api_groups, group)
                                && resource_covered(&o.resources, resource)
                                && (o.resource_names.is_empty()
                                    || name.is_some_and(|n| o.resource_names.contains(n)))
                        });
                        if !held {
                            missing.push(PolicyRule {
                                verbs: vec![verb.clone()],
                                api_groups: vec![group.clone()],
                                resources: vec![resource.clone()],
                                resource_names: name.cloned().into_iter().collect(),
                                ..Default::default()
                            });
                        }
                    }
                }
            }
        }
    }
    missing
}
