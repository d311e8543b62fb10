use std::sync::Arc;

use flotilla_proto::api::{Deployment, Event, Lease, Namespace, Node, Pod, PodSpec, Service};

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
    matches!(authorize(caller, attrs), Decision::Allow(_))
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
            authorize(&n1, &attrs),
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
            authorize(&n1, &attrs),
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
