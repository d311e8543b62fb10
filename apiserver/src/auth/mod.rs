//! Who is calling, and what they may do: Kubernetes' authentication and authorization on
//! the client port.
//!
//! - [`layer`]: the tower layer in front of every route. It authenticates each request
//!   (the verified client certificate: CN the user, O the groups; or a bearer token from
//!   the token file), refuses one with no identity (`Unauthenticated`), keeps the etcd
//!   face for `system:masters`, and puts the [`Caller`] into the request's extensions.
//! - [`authorize`]: the decision for one request's [`Attributes`] (verb, resource,
//!   namespace, name): `system:masters` may do everything, a node's identity what the
//!   [`node`] authorizer allows, anyone else nothing yet (RBAC comes next). A denial is
//!   `PermissionDenied` in Kubernetes' words.
//! - [`audit`]: one `audit.k8s.io/v1` Event per request, at level Metadata.
//!
//! With neither `--client-cert-auth` nor `--token-auth-file` a member does not check
//! identities at all (as etcd without client certificate auth): every caller is
//! [`Caller::Unchecked`], and the member says so at start.

pub mod audit;
pub mod bootstrap;
pub mod escalation;
pub mod layer;
pub mod node;
pub mod rbac;
pub mod tokens;

use std::sync::Arc;

use flotilla_proto::api::{Resource, SubjectAccessReviewSpec, SubjectAccessReviewStatus};

use crate::errors::ApiError;

/// The group whose members may do everything (Kubernetes' `system:masters`).
pub const MASTERS: &str = "system:masters";
/// The group every authenticated caller is in.
pub const AUTHENTICATED: &str = "system:authenticated";
/// The group of the agents' identities.
pub const NODES: &str = "system:nodes";
/// The user-name prefix of an agent's identity: `system:node:NAME`.
pub const NODE_PREFIX: &str = "system:node:";

/// An authenticated identity (Kubernetes' `user.Info`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The node this identity speaks for: `system:node:N` in group `system:nodes`.
    pub fn node_name(&self) -> Option<&str> {
        let node = self.name.strip_prefix(NODE_PREFIX)?;
        (self.in_group(NODES) && !node.is_empty()).then_some(node)
    }
}

/// Who made a request, as the [`layer`] found it.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Identities are not checked on this member (no client certificate auth, no tokens).
    Unchecked,
    User(Arc<UserInfo>),
}

impl Caller {
    /// The caller of a gRPC request. A request that did not pass the layer (a service
    /// mounted without it) has no caller and is refused: the check fails closed.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, ApiError> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::Internal("the request passed no authentication".into()))
    }

    pub fn user(&self) -> Option<&UserInfo> {
        match self {
            Caller::Unchecked => None,
            Caller::User(u) => Some(u),
        }
    }
}

/// What a request asks to do (Kubernetes' authorizer attributes for a resource request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// `""` for the core group, `apps`, `coordination.k8s.io`.
    pub api_group: String,
    pub api_version: String,
    /// The plural: `pods`.
    pub resource: String,
    /// `status`, `binding`, `log`, or empty.
    pub subresource: String,
    /// Empty for a cluster-scoped kind, and for a list or watch across namespaces.
    pub namespace: String,
    /// Empty for a list, a watch, or a create with `generateName`.
    pub name: String,
}

impl Attributes {
    pub fn new<K: Resource>(verb: &'static str, namespace: &str, name: &str) -> Self {
        let (api_group, api_version) = match K::API_VERSION.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", K::API_VERSION),
        };
        Attributes {
            verb: verb.to_string(),
            api_group: api_group.to_string(),
            api_version: api_version.to_string(),
            resource: K::PLURAL.to_string(),
            subresource: String::new(),
            namespace: if K::NAMESPACED {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    pub fn subresource(mut self, subresource: &str) -> Self {
        self.subresource = subresource.to_string();
        self
    }

    /// `pods` or `pods/status`.
    pub fn full_resource(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// Kubernetes' request URI for these attributes:
    /// `/api/v1/namespaces/shop/pods/web/status`, `/apis/apps/v1/deployments`.
    pub fn request_uri(&self) -> String {
        let mut uri = if self.api_group.is_empty() {
            format!("/api/{}", self.api_version)
        } else {
            format!("/apis/{}/{}", self.api_group, self.api_version)
        };
        if !self.namespace.is_empty() {
            uri.push_str("/namespaces/");
            uri.push_str(&self.namespace);
        }
        uri.push('/');
        uri.push_str(&self.resource);
        if !self.name.is_empty() {
            uri.push('/');
            uri.push_str(&self.name);
        }
        if !self.subresource.is_empty() {
            uri.push('/');
            uri.push_str(&self.subresource);
        }
        if self.verb == "watch" {
            uri.push_str("?watch=true");
        }
        uri
    }
}

/// What an allowed request may still not do, checked against the stored object as it is
/// written (Kubernetes' NodeRestriction admission): a node writes only pods bound to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restriction {
    /// The pods written must have `spec.nodeName` equal to this node.
    PodsOfNode(String),
}

/// The decision on one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow(Option<Restriction>),
    /// Refused, with Kubernetes' message.
    Deny(String),
}

/// Decides whether `caller` may do what `attrs` describe, with the RBAC bindings of
/// `rules`: `system:masters` everything, a node what the Node authorizer gives it, then
/// whatever RBAC grants (a node too, as Kubernetes' `Node,RBAC` chain).
pub fn authorize(caller: &Caller, attrs: &Attributes, rules: &dyn rbac::Rules) -> Decision {
    let user = match caller {
        Caller::Unchecked => return Decision::Allow(None),
        Caller::User(user) => user,
    };
    if user.in_group(MASTERS) || asks_about_itself(attrs) {
        return Decision::Allow(None);
    }
    if let Some(node) = user.node_name() {
        match node::authorize(node, attrs) {
            node::Verdict::Allow => return Decision::Allow(None),
            node::Verdict::AllowOwnPods => {
                return Decision::Allow(Some(Restriction::PodsOfNode(node.to_string())));
            }
            node::Verdict::AllowReferenced
                if rules.node_refers(node, &attrs.namespace, &attrs.resource, &attrs.name) =>
            {
                return Decision::Allow(None);
            }
            node::Verdict::AllowReferenced => {}
            node::Verdict::Deny => {}
        }
    }
    if rbac::allows(rules, user, attrs) {
        return Decision::Allow(None);
    }
    Decision::Deny(forbidden(user, attrs))
}

/// Asking what one may do oneself is open to every authenticated caller (Kubernetes'
/// `system:basic-user` role, bound to `system:authenticated`).
fn asks_about_itself(attrs: &Attributes) -> bool {
    attrs.verb == "create"
        && attrs.api_group == REVIEW_GROUP
        && attrs.resource == "selfsubjectaccessreviews"
        && attrs.subresource.is_empty()
}

/// The API group of the access reviews.
pub const REVIEW_GROUP: &str = "authorization.k8s.io";

/// The attributes of an access review's request itself (`create
/// selfsubjectaccessreviews` or `subjectaccessreviews`).
pub fn review_request(resource: &str) -> Attributes {
    Attributes {
        verb: "create".into(),
        api_group: REVIEW_GROUP.into(),
        api_version: "v1".into(),
        resource: resource.into(),
        ..Default::default()
    }
}

/// Answers an access review: may `caller` do what `spec.resourceAttributes` says?
pub fn review(
    caller: &Caller,
    spec: &SubjectAccessReviewSpec,
    rules: &dyn rbac::Rules,
) -> Result<SubjectAccessReviewStatus, ApiError> {
    let Some(ra) = &spec.resource_attributes else {
        return Err(ApiError::invalid(
            "spec.resourceAttributes",
            "required: the verb and resource to ask about",
        ));
    };
    if ra.verb.is_empty() {
        return Err(ApiError::invalid(
            "spec.resourceAttributes.verb",
            "required",
        ));
    }
    if ra.resource.is_empty() {
        return Err(ApiError::invalid(
            "spec.resourceAttributes.resource",
            "required",
        ));
    }
    let attrs = Attributes {
        verb: ra.verb.clone(),
        api_group: ra.group.clone(),
        api_version: ra.version.clone(),
        resource: ra.resource.clone(),
        subresource: ra.subresource.clone(),
        namespace: ra.namespace.clone(),
        name: ra.name.clone(),
    };
    Ok(match authorize(caller, &attrs, rules) {
        Decision::Allow(_) => SubjectAccessReviewStatus {
            allowed: true,
            reason: match caller {
                Caller::Unchecked => "identities are not checked on this member".into(),
                Caller::User(_) => String::new(),
            },
        },
        Decision::Deny(reason) => SubjectAccessReviewStatus {
            allowed: false,
            reason,
        },
    })
}

/// Kubernetes' words for a denial: `pods "x" is forbidden: User "alice" cannot delete
/// resource "pods" in API group "" in the namespace "shop"`.
pub fn forbidden(user: &UserInfo, attrs: &Attributes) -> String {
    let what = if attrs.name.is_empty() {
        attrs.full_resource()
    } else {
        format!("{} \"{}\"", attrs.full_resource(), attrs.name)
    };
    let scope = if attrs.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", attrs.namespace)
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
        user.name,
        attrs.verb,
        attrs.full_resource(),
        attrs.api_group
    )
}

tokio::task_local! {
    static RESTRICTION: Option<Restriction>;
}

/// Runs `f` (one request's work) with `restriction` in effect for its writes.
pub async fn scope<F: Future>(restriction: Option<Restriction>, f: F) -> F::Output {
    RESTRICTION.scope(restriction, f).await
}

/// Checks that the request being served may write `object` as it is stored now (called
/// by the registry inside its compare-and-set, so no other write can slip between the
/// check and the write).
pub fn check_write<K: Resource>(object: &K) -> Result<(), ApiError> {
    let restriction = RESTRICTION.try_with(|r| r.clone()).ok().flatten();
    match restriction {
        None => Ok(()),
        Some(Restriction::PodsOfNode(node)) => {
            if K::KIND != flotilla_proto::api::Pod::KIND {
                return Ok(());
            }
            let bound = object.field_value("spec.nodeName").unwrap_or_default();
            if bound == node {
                Ok(())
            } else {
                Err(ApiError::Forbidden(format!(
                    "pods \"{}\" is forbidden: node \"{node}\" can only update or delete pods \
                     with spec.nodeName set to itself",
                    object.name()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests;
