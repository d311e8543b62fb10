//! Kubernetes' RBAC escalation checks: whoever writes a role may put in it only what they
//! hold themselves (or needs the `escalate` verb on that kind), and whoever writes a
//! binding may grant only a role whose every rule they hold (or needs the `bind` verb on
//! that role). Without them, anyone allowed to write a binding could bind `cluster-admin`
//! to themselves.
//!
//! The check needs the object as it will be written (a patch's result too), so the service
//! layer sets it up per request ([`scope`]) and the registry runs it on the new object
//! inside its write ([`check`]).

use std::sync::Arc;

use flotilla_proto::api::{ClusterRole, PolicyRule, Resource, Role, RoleBinding};
use prost::Message;

use super::rbac::{self, Rules};
use super::{Attributes, Caller, MASTERS, UserInfo};
use crate::errors::ApiError;
use crate::registry::Api;
use crate::validate::RBAC_GROUP;

/// What a request that writes roles or bindings is held to.
pub struct Escalation {
    api: Api,
    user: Arc<UserInfo>,
    /// The namespace of the object written (empty for a cluster-scoped one).
    namespace: String,
    /// The rules the caller holds there.
    held: Vec<PolicyRule>,
}

tokio::task_local! {
    static ESCALATION: Option<Arc<Escalation>>;
}

/// The check a request must pass, when it writes roles or bindings and is not
/// `system:masters` (who hold everything).
pub fn for_request(api: &Api, caller: &Caller, attrs: &Attributes) -> Option<Arc<Escalation>> {
    let Caller::User(user) = caller else {
        return None;
    };
    let writes = matches!(attrs.verb.as_str(), "create" | "update" | "patch");
    let rbac_kind = attrs.api_group == RBAC_GROUP
        && matches!(
            attrs.resource.as_str(),
            "roles" | "clusterroles" | "rolebindings" | "clusterrolebindings"
        );
    if !writes || !rbac_kind || user.in_group(MASTERS) {
        return None;
    }
    Some(Arc::new(Escalation {
        api: api.clone(),
        user: user.clone(),
        namespace: attrs.namespace.clone(),
        held: api.rules_for(user, &attrs.namespace),
    }))
}

/// Runs `f` (one request's work) with `escalation` in effect for its writes.
pub async fn scope<F: Future>(escalation: Option<Arc<Escalation>>, f: F) -> F::Output {
    ESCALATION.scope(escalation, f).await
}

/// Checks that the request being served may write `object` (a role or a binding).
pub fn check<K: Resource>(object: &K) -> Result<(), ApiError> {
    let Some(e) = ESCALATION.try_with(|e| e.clone()).ok().flatten() else {
        return Ok(());
    };
    let bytes = object.encode_to_vec();
    let decode = |what: &str| ApiError::Internal(format!("{what} does not decode as itself"));
    match K::KIND {
        "Role" | "ClusterRole" => {
            let rules = Role::decode(bytes.as_slice())
                .map_err(|_| decode(K::KIND))?
                .rules;
            let plural = if K::KIND == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            if e.may(plural, "escalate", "") {
                return Ok(());
            }
            e.grants(&rules, plural, object.name())
        }
        "RoleBinding" | "ClusterRoleBinding" => {
            // A ClusterRoleBinding has a RoleBinding's fields and numbers.
            let binding = RoleBinding::decode(bytes.as_slice()).map_err(|_| decode(K::KIND))?;
            let role_ref = binding.role_ref.unwrap_or_default();
            let (plural, rules) = match role_ref.kind.as_str() {
                "ClusterRole" => (
                    "clusterroles",
                    e.api
                        .local_get::<ClusterRole>("", &role_ref.name)
                        .map(|r| r.rules),
                ),
                _ => (
                    "roles",
                    e.api
                        .local_get::<Role>(&e.namespace, &role_ref.name)
                        .map(|r| r.rules),
                ),
            };
            if e.may(plural, "bind", &role_ref.name) {
                return Ok(());
            }
            let plural_of_binding = if K::KIND == "RoleBinding" {
                "rolebindings"
            } else {
                "clusterrolebindings"
            };
            match rules {
                Some(rules) => e.grants(&rules, plural_of_binding, object.name()),
                None => Err(ApiError::Forbidden(format!(
                    "{plural_of_binding}.{RBAC_GROUP} \"{}\" is forbidden: user \"{}\" cannot \
                     bind {} \"{}\": it does not exist, and only a holder of the bind verb may \
                     bind a role before it exists",
                    object.name(),
                    e.user.name,
                    role_ref.kind,
                    role_ref.name
                ))),
            }
        }
        _ => Ok(()),
    }
}

impl Escalation {
    /// Whether RBAC gives the caller `verb` on `plural` (named `name`) here.
    fn may(&self, plural: &str, verb: &str, name: &str) -> bool {
        let attrs = Attributes {
            verb: verb.into(),
            api_group: RBAC_GROUP.into(),
            api_version: "v1".into(),
            resource: plural.into(),
            subresource: String::new(),
            namespace: self.namespace.clone(),
            name: name.into(),
        };
        rbac::allows(&self.api, &self.user, &attrs)
    }

    /// Refuses unless the caller holds every permission of `rules`.
    fn grants(&self, rules: &[PolicyRule], plural: &str, name: &str) -> Result<(), ApiError> {
        let missing = rbac::uncovered(&self.held, rules);
        if missing.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = missing.iter().take(10).map(describe).collect();
        let more = if missing.len() > shown.len() {
            format!(" and {} more", missing.len() - shown.len())
        } else {
            String::new()
        };
        Err(ApiError::Forbidden(format!(
            "{plural}.{RBAC_GROUP} \"{name}\" is forbidden: user \"{}\" (groups={:?}) is \
             attempting to grant RBAC permissions not currently held: {}{more}",
            self.user.name,
            self.user.groups,
            shown.join(", ")
        )))
    }
}

/// One rule as Kubernetes prints it in an escalation error.
fn describe(r: &PolicyRule) -> String {
    if !r.non_resource_urls.is_empty() {
        return format!(
            "{{NonResourceURLs:{:?}, Verbs:{:?}}}",
            r.non_resource_urls, r.verbs
        );
    }
    let mut s = format!(
        "{{APIGroups:{:?}, Resources:{:?}",
        r.api_groups, r.resources
    );
    if !r.resource_names.is_empty() {
        s.push_str(&format!(", ResourceNames:{:?}", r.resource_names));
    }
    s.push_str(&format!(", Verbs:{:?}}}", r.verbs));
    s
}
