//! Each rule of "The API", through the gRPC surface, on a real (one- or three-member)
//! control plane. Every test would fail without the rule it names.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::ControlPlane;
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use serde_json::json;
use tonic::Code;

fn pod(name: &str, labels: serde_json::Value) -> Pod {
    from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"containers": [{"name": "main", "command": ["sleep", "3600"]}]},
    }))
    .unwrap()
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "web", "command": ["web"]}]}},
        },
    }))
    .unwrap()
}

async fn pods(client: &Client, label_selector: &str, field_selector: &str) -> BTreeSet<String> {
    let req = ListRequest {
        namespace: "default".into(),
        label_selector: label_selector.into(),
        field_selector: field_selector.into(),
        ..Default::default()
    };
    let (items, _) = client.list::<Pod>(&req).await.unwrap();
    items.iter().map(|p| p.name().to_string()).collect()
}

#[tokio::test]
async fn create_assigns_identity_and_defaults() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let created = c.create(&pod("a", json!({}))).await.unwrap();
    let meta = created.metadata.clone().unwrap();
    assert_eq!(meta.uid.len(), 36);
    assert_eq!(meta.generation, 1);
    assert!(!meta.creation_timestamp.is_empty());
    assert!(meta.resource_version.parse::<i64>().unwrap() > 0);
    let spec = created.spec.clone().unwrap();
    assert_eq!(spec.restart_policy, "Always");
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    assert_eq!(created.status.clone().unwrap().phase, "Pending");
    assert_eq!(c.get::<Pod>("default", "a").await.unwrap(), created);

    let again = c.create(&pod("a", json!({}))).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists, "{again}");
    assert_eq!(again.status.message(), "pods \"a\" already exists");

    // generateName picks a fresh name.
    let mut generated = pod("", json!({}));
    generated.metadata_mut().generate_name = "web-".into();
    let g = c.create(&generated).await.unwrap();
    assert!(
        g.name().starts_with("web-") && g.name().len() == 9,
        "{}",
        g.name()
    );
}

#[tokio::test]
async fn bad_objects_are_refused_by_field_and_change_nothing() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let mut d = deployment("web", 2);
    d.spec.as_mut().unwrap().replicas = Some(-1);
    d.spec
        .as_mut()
        .unwrap()
        .template
        .as_mut()
        .unwrap()
        .spec
        .as_mut()
        .unwrap()
        .containers[0]
        .name
        .clear();
    let e = c.create(&d).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.status.message().contains("spec.replicas: must be >= 0"),
        "{e}"
    );
    assert!(
        e.status
            .message()
            .contains("spec.template.spec.containers[0].name: required"),
        "{e}"
    );
    let e = c.get::<Deployment>("default", "web").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A namespace that does not exist.
    let mut p = pod("a", json!({}));
    p.metadata_mut().namespace = "nowhere".into();
    let e = c.create(&p).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.status.message(), "namespaces \"nowhere\" not found");

    // A kind sent to the wrong service.
    let mut p = pod("a", json!({}));
    p.kind = "Deployment".into();
    let e = c.create(&p).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.status.message().starts_with("kind: must be Pod"), "{e}");
}

#[tokio::test]
async fn stale_resource_version_conflicts_and_changes_nothing() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let v1 = c.create(&deployment("web", 1)).await.unwrap();
    let mut v2 = v1.clone();
    v2.spec.as_mut().unwrap().replicas = Some(2);
    let v2 = c.update(&v2).await.unwrap();
    assert_ne!(v2.resource_version(), v1.resource_version());

    // Writing from the stale copy fails, and the object stays as v2.
    let mut stale = v1.clone();
    stale.spec.as_mut().unwrap().replicas = Some(5);
    let e = c.update(&stale).await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(
        e.status.message().contains("the object has been modified"),
        "{e}"
    );
    assert_eq!(c.get::<Deployment>("default", "web").await.unwrap(), v2);

    // An update that changes nothing writes nothing.
    let same = c.update(&v2).await.unwrap();
    assert_eq!(same.resource_version(), v2.resource_version());
}

#[tokio::test]
async fn generation_follows_spec_and_status_has_its_own_call() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let d = c.create(&deployment("web", 1)).await.unwrap();
    assert_eq!(d.metadata.as_ref().unwrap().generation, 1);

    // Status through UpdateStatus: generation stays.
    let mut s = d.clone();
    s.status = Some(DeploymentStatus {
        replicas: 1,
        ready_replicas: 1,
        observed_generation: 1,
        ..Default::default()
    });
    let s = c.update_status(&s).await.unwrap();
    assert_eq!(s.metadata.as_ref().unwrap().generation, 1);
    assert_eq!(s.status.as_ref().unwrap().ready_replicas, 1);

    // A label change is not a spec change.
    let mut l = s.clone();
    l.metadata_mut().labels.insert("team".into(), "a".into());
    let l = c.update(&l).await.unwrap();
    assert_eq!(l.metadata.as_ref().unwrap().generation, 1);

    // Update ignores status; a spec change bumps generation.
    let mut u = l.clone();
    u.spec.as_mut().unwrap().replicas = Some(3);
    u.status.as_mut().unwrap().ready_replicas = 99;
    let u = c.update(&u).await.unwrap();
    assert_eq!(u.metadata.as_ref().unwrap().generation, 2);
    assert_eq!(u.status.as_ref().unwrap().ready_replicas, 1);
}

#[tokio::test]
async fn finalizers_hold_deletion() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let mut d = deployment("web", 1);
    d.metadata_mut().finalizers = vec!["example.com/hold".into()];
    c.create(&d).await.unwrap();

    let deleting: Deployment = c.delete_named("default", "web").await.unwrap();
    assert!(
        !deleting
            .metadata
            .as_ref()
            .unwrap()
            .deletion_timestamp
            .is_empty()
    );
    let still = c.get::<Deployment>("default", "web").await.unwrap();
    assert_eq!(
        still.metadata.as_ref().unwrap().finalizers,
        vec!["example.com/hold"]
    );

    // No new finalizers while deleting.
    let mut more = still.clone();
    more.metadata_mut()
        .finalizers
        .push("example.com/other".into());
    assert_eq!(
        c.update(&more).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Removing the last finalizer completes the deletion.
    let mut done = still.clone();
    done.metadata_mut().finalizers.clear();
    c.update(&done).await.unwrap();
    let e = c.get::<Deployment>("default", "web").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn propagation_policies_mark_the_owner() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    for (name, policy, finalizer) in [
        ("fg", "Foreground", "foregroundDeletion"),
        ("or", "Orphan", "orphan"),
    ] {
        c.create(&deployment(name, 1)).await.unwrap();
        let req = DeleteRequest {
            namespace: "default".into(),
            name: name.into(),
            propagation_policy: policy.into(),
            ..Default::default()
        };
        let d: Deployment = c.delete(&req).await.unwrap();
        let meta = d.metadata.unwrap();
        assert_eq!(meta.finalizers, vec![finalizer.to_string()], "{policy}");
        assert!(!meta.deletion_timestamp.is_empty());
    }
    c.create(&deployment("bg", 1)).await.unwrap();
    let _: Deployment = c.delete_named("default", "bg").await.unwrap();
    assert!(
        c.get::<Deployment>("default", "bg")
            .await
            .unwrap_err()
            .is_not_found()
    );
    let bad = DeleteRequest {
        namespace: "default".into(),
        name: "fg".into(),
        propagation_policy: "Sideways".into(),
        ..Default::default()
    };
    let e = c.delete::<Deployment>(&bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.status.message().starts_with("propagationPolicy:"), "{e}");
}

#[tokio::test]
async fn pods_are_deleted_gracefully_once_bound() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    // Unbound: nothing runs it, so it goes at once.
    c.create(&pod("unbound", json!({}))).await.unwrap();
    let _: Pod = c.delete_named("default", "unbound").await.unwrap();
    assert!(
        c.get::<Pod>("default", "unbound")
            .await
            .unwrap_err()
            .is_not_found()
    );

    c.create(&pod("bound", json!({}))).await.unwrap();
    c.bind("default", "bound", "node-1").await.unwrap();
    let p: Pod = c.delete_named("default", "bound").await.unwrap();
    let meta = p.metadata.unwrap();
    assert_eq!(meta.deletion_grace_period_seconds, Some(30));
    assert!(!meta.deletion_timestamp.is_empty());
    assert!(c.get::<Pod>("default", "bound").await.is_ok());
    // The agent, once the containers stopped, deletes with grace 0.
    let now = DeleteRequest {
        namespace: "default".into(),
        name: "bound".into(),
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _: Pod = c.delete(&now).await.unwrap();
    assert!(
        c.get::<Pod>("default", "bound")
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn a_pod_is_bound_once() {
    let cp = ControlPlane::start(3).await;
    let c = cp.client();
    for i in 0..10 {
        let name = format!("p{i}");
        c.create(&pod(&name, json!({}))).await.unwrap();
        // Three schedulers race to bind the same pod, through different members.
        let binds = (0..3).map(|n| {
            let c = cp.client_of(n);
            let name = name.clone();
            async move { c.bind("default", &name, &format!("node-{n}")).await }
        });
        let results = futures::future::join_all(binds).await;
        let won: Vec<_> = results.iter().filter(|r| r.is_ok()).collect();
        assert_eq!(won.len(), 1, "{results:?}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.code(), Code::Aborted, "{r}");
        }
        let bound = c.get::<Pod>("default", &name).await.unwrap();
        let node = &bound.spec.as_ref().unwrap().node_name;
        assert_eq!(
            node,
            &won[0].as_ref().unwrap().spec.as_ref().unwrap().node_name
        );
        let cond = &bound.status.as_ref().unwrap().conditions;
        assert!(
            cond.iter()
                .any(|c| c.r#type == "PodScheduled" && c.status == "True")
        );
        // An update may not move it either.
        let mut moved = bound.clone();
        moved.spec.as_mut().unwrap().node_name = "elsewhere".into();
        assert_eq!(
            c.update(&moved).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}

#[tokio::test]
async fn selectors_filter_lists() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    c.create(&pod("web-1", json!({"app": "web", "tier": "front"})))
        .await
        .unwrap();
    c.create(&pod("web-2", json!({"app": "web", "tier": "back"})))
        .await
        .unwrap();
    c.create(&pod("db-1", json!({"app": "db"}))).await.unwrap();
    c.bind("default", "web-2", "n2").await.unwrap();

    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(pods(&c, "app=web", "").await, set(&["web-1", "web-2"]));
    assert_eq!(pods(&c, "app!=web", "").await, set(&["db-1"]));
    assert_eq!(
        pods(&c, "tier in (front,middle)", "").await,
        set(&["web-1"])
    );
    assert_eq!(pods(&c, "!tier", "").await, set(&["db-1"]));
    assert_eq!(pods(&c, "", "spec.nodeName=n2").await, set(&["web-2"]));
    assert_eq!(
        pods(&c, "", "spec.nodeName=").await,
        set(&["web-1", "db-1"])
    );
    assert_eq!(
        pods(&c, "app=web", "metadata.name!=web-1").await,
        set(&["web-2"])
    );

    let bad = ListRequest {
        label_selector: "app in (web".into(),
        ..Default::default()
    };
    let e = c.list::<Pod>(&bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.status.message().starts_with("labelSelector:"), "{e}");
    let bad = ListRequest {
        field_selector: "spec.image=x".into(),
        ..Default::default()
    };
    let e = c.list::<Pod>(&bad).await.unwrap_err();
    assert!(e.status.message().starts_with("fieldSelector:"), "{e}");
}

#[tokio::test]
async fn pages_are_consistent_under_concurrent_writes() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let mut expected = BTreeSet::new();
    for i in 0..40 {
        let name = format!("p{i:03}");
        c.create(&pod(&name, json!({"app": "x"}))).await.unwrap();
        expected.insert(name);
    }
    let mut req = ListRequest {
        namespace: "default".into(),
        limit: 7,
        ..Default::default()
    };
    let mut seen = Vec::new();
    let mut revision = String::new();
    let mut pages = 0;
    loop {
        let page: PodList = c.list_page::<Pod>(&req).await.unwrap();
        pages += 1;
        let meta = page.metadata.clone().unwrap();
        if revision.is_empty() {
            revision = meta.resource_version.clone();
        }
        assert_eq!(
            meta.resource_version, revision,
            "every page is at the first page's revision"
        );
        seen.extend(page.items.iter().map(|p| p.name().to_string()));
        // Writes between pages: new pods, a deleted one, a changed one.
        let n = format!("new{pages}");
        c.create(&pod(&n, json!({"app": "x"}))).await.unwrap();
        if pages == 2 {
            let _: Pod = c.delete_named("default", "p039").await.unwrap();
        }
        if meta.r#continue.is_empty() {
            break;
        }
        req.r#continue = meta.r#continue;
    }
    assert_eq!(pages, 6);
    let seen_set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(seen.len(), seen_set.len(), "no duplicates");
    assert_eq!(
        seen_set, expected,
        "exactly the pods at the first page's revision"
    );
}

#[tokio::test]
async fn patch_merges_and_a_no_op_writes_nothing() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let d = c.create(&deployment("web", 1)).await.unwrap();
    let scaled: Deployment = c
        .patch("default", "web", &json!({"spec": {"replicas": 4}}))
        .await
        .unwrap();
    assert_eq!(scaled.spec.as_ref().unwrap().replicas, Some(4));
    assert_eq!(scaled.metadata.as_ref().unwrap().generation, 2);
    assert_eq!(
        scaled.metadata.as_ref().unwrap().uid,
        d.metadata.as_ref().unwrap().uid
    );
    let same: Deployment = c
        .patch("default", "web", &json!({"spec": {"replicas": 4}}))
        .await
        .unwrap();
    assert_eq!(same.resource_version(), scaled.resource_version());

    let e = c
        .patch::<Deployment>("default", "web", &json!({"spec": {"replicaz": 1}}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.status
            .message()
            .starts_with("spec.replicaz: unknown field"),
        "{e}"
    );
    // A stale resourceVersion in the patch is a conflict.
    let e = c
        .patch::<Deployment>(
            "default",
            "web",
            &json!({"metadata": {"resourceVersion": d.resource_version()}, "spec": {"replicas": 1}}),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
}

#[tokio::test]
async fn namespaces_scope_objects_and_terminate() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let ns: Namespace = from_value(json!({"metadata": {"name": "shop"}})).unwrap();
    let ns = c.create(&ns).await.unwrap();
    assert_eq!(ns.status.unwrap().phase, "Active");
    let mut p = pod("a", json!({}));
    p.metadata_mut().namespace = "shop".into();
    c.create(&p).await.unwrap();
    assert!(
        c.get::<Pod>("default", "a")
            .await
            .unwrap_err()
            .is_not_found()
    );

    // Not empty: it becomes Terminating and takes no new objects.
    let terminating: Namespace = c.delete_named("", "shop").await.unwrap();
    assert_eq!(terminating.status.unwrap().phase, "Terminating");
    let mut q = pod("b", json!({}));
    q.metadata_mut().namespace = "shop".into();
    assert_eq!(
        c.create(&q).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    // Once empty, deleting it again removes it.
    let _: Pod = c.delete_named("shop", "a").await.unwrap();
    let _: Namespace = c.delete_named("", "shop").await.unwrap();
    assert!(
        c.get::<Namespace>("", "shop")
            .await
            .unwrap_err()
            .is_not_found()
    );
}

#[tokio::test]
async fn services_get_distinct_cluster_ips() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let mut ips = BTreeSet::new();
    let mut first_ip = String::new();
    for i in 0..5 {
        let s: Service = from_value(json!({
            "metadata": {"name": format!("s{i}")},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
        let s = c.create(&s).await.unwrap();
        let spec = s.spec.unwrap();
        assert!(spec.cluster_ip.starts_with("10."), "{}", spec.cluster_ip);
        assert_eq!(spec.ports[0].target_port, "8080");
        if i == 0 {
            first_ip = spec.cluster_ip.clone();
        }
        ips.insert(spec.cluster_ip);
    }
    assert_eq!(ips.len(), 5);
    // Asking for a taken IP is refused.
    let s: Service = from_value(json!({
        "metadata": {"name": "dup"},
        "spec": {"clusterIP": first_ip, "ports": [{"port": 80}]},
    }))
    .unwrap();
    let e = c.create(&s).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.status.message().starts_with("spec.clusterIP"), "{e}");
    // Deleting a service frees its IP.
    let _: Service = c.delete_named("default", "s0").await.unwrap();
    c.create(&s).await.unwrap();
}

fn pod_with(name: &str, container: serde_json::Value) -> Pod {
    from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [container]},
    }))
    .unwrap()
}

#[tokio::test]
async fn quantities_take_every_kubernetes_suffix() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    for (i, (cpu, memory)) in [
        ("9E", "9Ei"),
        ("500000000n", "1Pi"),
        ("250000u", "1e3"),
        ("2k", "1.5Ti"),
        ("1", "128974848e-3"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = pod_with(
            &format!("q{i}"),
            json!({"name": "main", "command": ["sleep"],
                   "resources": {"requests": {"cpu": cpu, "memory": memory},
                                 "limits": {"memory": memory}}}),
        );
        c.create(&p)
            .await
            .unwrap_or_else(|e| panic!("cpu {cpu}, memory {memory}: {e}"));
    }
    // Too large to hold: refused by name, never a panic; the server is still there.
    let p = pod_with(
        "huge",
        json!({"name": "main", "command": ["sleep"],
               "resources": {"requests": {"memory": "1e40"}}}),
    );
    let e = c.create(&p).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.status.message().starts_with(
            "spec.containers[0].resources.requests.memory: quantity \"1e40\": too large"
        ),
        "{e}"
    );
    c.get::<Pod>("default", "q0").await.unwrap();
}

#[tokio::test]
async fn status_enumerations_are_checked() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let created = c.create(&pod("a", json!({}))).await.unwrap();
    let with_status = |status: serde_json::Value| {
        let mut p = created.clone();
        p.status = Some(from_value(status).unwrap());
        p
    };
    for (status, want) in [
        (
            json!({"phase": "Bogus"}),
            "status.phase: unsupported value \"Bogus\": must be one of Pending, Running, \
             Succeeded, Failed, Unknown",
        ),
        (
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "Maybe"}]}),
            "status.conditions[0].status: unsupported value \"Maybe\": must be one of True, \
             False, Unknown",
        ),
        (
            json!({"phase": "Running", "conditions": [{"status": "True"}]}),
            "status.conditions[0].type: required",
        ),
        (
            json!({"phase": "Running", "containerStatuses": [{"name": "main",
                "state": {"running": {}, "terminated": {"exitCode": 1}}}]}),
            "status.containerStatuses[0].state: may not specify more than 1 state type",
        ),
    ] {
        let e = c
            .update_status(&with_status(status.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{status}: {e}");
        assert!(e.status.message().starts_with(want), "{status}: {e}");
    }
    assert_eq!(c.get::<Pod>("default", "a").await.unwrap(), created);
    // Every real value passes; a container state's reason is free text.
    let ok = c
        .update_status(&with_status(json!({"phase": "Running",
            "conditions": [{"type": "Ready", "status": "Unknown"}],
            "containerStatuses": [{"name": "main",
                "state": {"waiting": {"reason": "AnythingAtAll"}}}]})))
        .await
        .unwrap();
    assert_eq!(ok.status.unwrap().phase, "Running");

    let d = c.create(&deployment("web", 1)).await.unwrap();
    let mut bad = d.clone();
    bad.status =
        Some(from_value(json!({"conditions": [{"type": "Available", "status": "yes"}]})).unwrap());
    let e = c.update_status(&bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(
        e.status
            .message()
            .starts_with("status.conditions[0].status: unsupported value \"yes\""),
        "{e}"
    );
}

#[tokio::test]
async fn a_patch_cannot_rename_or_move_its_object() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let created = c.create(&deployment("web", 1)).await.unwrap();
    for (patch, want) in [
        (
            json!({"metadata": {"name": "other"}, "spec": {"replicas": 3}}),
            "the name of the object (other) does not match the name on the URL (web)",
        ),
        (
            json!({"metadata": {"name": null}}),
            "the name of the object () does not match the name on the URL (web)",
        ),
        (
            json!({"metadata": {"namespace": "kube-system"}}),
            "the namespace of the object (kube-system) does not match the namespace on the URL \
             (default)",
        ),
    ] {
        let e = c
            .patch::<Deployment>("default", "web", &patch)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{patch}: {e}");
        assert_eq!(e.status.message(), want, "{patch}");
    }
    assert_eq!(
        c.get::<Deployment>("default", "web").await.unwrap(),
        created
    );
    let e = c.get::<Deployment>("default", "other").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Naming the object as it is changes nothing and is fine.
    let same: Deployment = c
        .patch(
            "default",
            "web",
            &json!({"metadata": {"name": "web", "namespace": "default"}}),
        )
        .await
        .unwrap();
    assert_eq!(same.resource_version(), created.resource_version());
}

#[tokio::test]
async fn objects_are_held_to_kubernetes_limits() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let containers = |n: usize| -> Vec<serde_json::Value> {
        (0..n)
            .map(|i| json!({"name": format!("c{i}"), "command": ["sleep"]}))
            .collect()
    };
    let many = |name: &str, init: usize, apps: usize| -> Pod {
        from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"initContainers": containers(init)
                         .into_iter()
                         .map(|mut c| {
                             c["name"] = json!(format!("init-{}", c["name"].as_str().unwrap()));
                             c
                         })
                         .collect::<Vec<_>>(),
                     "containers": containers(apps)},
        }))
        .unwrap()
    };
    let e = c
        .create(&many("ten-thousand", 0, 10_000))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.status.message(),
        "spec.containers: Too many: 10000: must have at most 100 items (containers and \
         initContainers together)"
    );
    let e = c
        .create(&many("hundred-and-one", 1, 100))
        .await
        .unwrap_err();
    assert!(e.status.message().contains("Too many: 101"), "{e}");
    c.create(&many("hundred", 10, 90)).await.unwrap();
    // The same bound in a workload's template.
    let mut d = deployment("wide", 1);
    let template = d.spec.as_mut().unwrap().template.as_mut().unwrap();
    template.spec.as_mut().unwrap().containers = many("x", 0, 101).spec.unwrap().containers;
    let e = c.create(&d).await.unwrap_err();
    assert!(
        e.status
            .message()
            .starts_with("spec.template.spec.containers: Too many: 101"),
        "{e}"
    );

    // Annotations: 256 KiB at most, keys and values together, on every kind.
    let annotated = |bytes: usize| {
        let key = "example.com/blob";
        BTreeMap::from([(key.to_string(), "x".repeat(bytes - key.len()))])
    };
    let too_long = "metadata.annotations: Too long: must have at most 262144 bytes";
    let mut p = pod("big", json!({}));
    p.metadata_mut().annotations = annotated(1_200_000);
    let e = c.create(&p).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(e.status.message(), too_long);
    p.metadata_mut().annotations = annotated(262_145);
    assert_eq!(c.create(&p).await.unwrap_err().status.message(), too_long);
    p.metadata_mut().annotations = annotated(262_144);
    let created = c.create(&p).await.unwrap();
    // An update cannot grow past it either.
    let mut grown = created.clone();
    grown.metadata_mut().annotations = annotated(262_145);
    assert_eq!(
        c.update(&grown).await.unwrap_err().status.message(),
        too_long
    );
    let mut ns: Namespace = from_value(json!({"metadata": {"name": "annotated"}})).unwrap();
    ns.metadata_mut().annotations = annotated(300_000);
    assert_eq!(c.create(&ns).await.unwrap_err().status.message(), too_long);
    let mut d = deployment("annotated", 1);
    let template = d.spec.as_mut().unwrap().template.as_mut().unwrap();
    template.metadata.as_mut().unwrap().annotations = annotated(300_000);
    assert_eq!(
        c.create(&d).await.unwrap_err().status.message(),
        "spec.template.metadata.annotations: Too long: must have at most 262144 bytes"
    );

    // Labels as Kubernetes checks them: 63-character names and values, DNS prefixes.
    for (key, value, want) in [
        ("app", "x".repeat(64), "invalid value"),
        (
            &*"k".repeat(64),
            "v".to_string(),
            "invalid key: name part must be no more",
        ),
        (
            "Not_A_Domain/app",
            "v".to_string(),
            "invalid key: prefix part",
        ),
        ("app", "-web".to_string(), "invalid value"),
    ] {
        let p = pod("labelled", json!({key: value}));
        let e = c.create(&p).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key}={value}");
        assert!(
            e.status
                .message()
                .starts_with(&format!("metadata.labels[{key:?}]: {want}")),
            "{key}={value}: {e}"
        );
    }
}

#[tokio::test]
async fn configmaps_and_secrets_follow_kubernetes_rules() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();

    // Secret data is base64 in JSON, as Kubernetes writes it; stringData is merged into
    // data (winning over it) and never stored; the type defaults to Opaque.
    let s: Secret = from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db"},
        "data": {"user": "YWRtaW4=", "password": "b2xk"},
        "stringData": {"password": "s3cr3t"},
    }))
    .unwrap();
    let created = c.create(&s).await.unwrap();
    assert_eq!(created.r#type, "Opaque");
    assert!(created.string_data.is_empty());
    assert_eq!(created.data["user"], b"admin");
    assert_eq!(created.data["password"], b"s3cr3t");
    let back = serde_json::to_value(c.get::<Secret>("default", "db").await.unwrap()).unwrap();
    assert_eq!(back["data"]["user"], "YWRtaW4=");
    assert_eq!(back["data"]["password"], "czNjcjN0");
    assert!(
        back.get("stringData").is_none_or(|v| v == &json!({})),
        "{back}"
    );

    // Not base64: refused naming the key, by the decoder, before anything is sent.
    let bad = from_value::<Secret>(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"},
        "data": {"k": "not base64!"},
    }))
    .unwrap_err();
    assert_eq!(bad.path, "data.k", "{bad}");

    // Keys are file names; a type's required keys; the type cannot change.
    let e = c
        .create(&Secret {
            metadata: Some(ObjectMeta {
                name: "tls".into(),
                ..Default::default()
            }),
            r#type: "kubernetes.io/tls".into(),
            data: BTreeMap::from([("bad/key".to_string(), b"x".to_vec())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    for want in [
        "data[bad/key]: invalid value \"bad/key\": a valid config key",
        "data[tls.crt]: Required value",
        "data[tls.key]: Required value",
    ] {
        assert!(e.status.message().contains(want), "{want} in {e}");
    }
    let e = c
        .create(&Secret {
            metadata: Some(ObjectMeta {
                name: "pull".into(),
                ..Default::default()
            }),
            r#type: "kubernetes.io/dockerconfigjson".into(),
            data: BTreeMap::from([(".dockerconfigjson".to_string(), b"{not json".to_vec())]),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("data[.dockerconfigjson]: invalid value \"<secret contents redacted>\""),
        "{e}"
    );
    assert!(!e.status.message().contains("not json"), "{e}");
    let e = c
        .patch::<Secret>("default", "db", &json!({"type": "kubernetes.io/tls"}))
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("type: invalid value \"kubernetes.io/tls\": field is immutable"),
        "{e}"
    );

    // A ConfigMap: a key in data or binaryData, not both; 1 MiB in all.
    let cm: ConfigMap = from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "app"},
        "data": {"app.properties": "color=blue\n"},
        "binaryData": {"logo.png": "iVBORw0K"},
    }))
    .unwrap();
    let created = c.create(&cm).await.unwrap();
    assert_eq!(
        created.binary_data["logo.png"],
        [0x89, b'P', b'N', b'G', 0x0d, 0x0a]
    );
    let mut dup = cm.clone();
    dup.metadata_mut().name = "dup".into();
    dup.binary_data
        .insert("app.properties".into(), b"x".to_vec());
    let e = c.create(&dup).await.unwrap_err();
    assert!(
        e.status
            .message()
            .contains("binaryData[app.properties]: invalid value \"app.properties\": duplicate of key present in data"),
        "{e}"
    );
    let mut big = cm.clone();
    big.metadata_mut().name = "big".into();
    big.data.insert("blob".into(), "x".repeat(1024 * 1024));
    let e = c.create(&big).await.unwrap_err();
    assert!(
        e.status
            .message()
            .contains("data: Too long: must have at most 1048576 bytes"),
        "{e}"
    );
    for name in ["dup", "big"] {
        let e = c.get::<ConfigMap>("default", name).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
    }

    // Once immutable, neither the data nor the flag may change; metadata still may.
    let frozen: ConfigMap = c
        .patch("default", "app", &json!({"immutable": true}))
        .await
        .unwrap();
    assert!(frozen.immutable);
    let e = c
        .patch::<ConfigMap>(
            "default",
            "app",
            &json!({"data": {"app.properties": "color=red\n"}}),
        )
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("data: Forbidden: field is immutable when `immutable` is set"),
        "{e}"
    );
    let e = c
        .patch::<ConfigMap>("default", "app", &json!({"immutable": false}))
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("immutable: Forbidden: field is immutable when `immutable` is set"),
        "{e}"
    );
    let labelled: ConfigMap = c
        .patch(
            "default",
            "app",
            &json!({"metadata": {"labels": {"tier": "web"}}}),
        )
        .await
        .unwrap();
    assert_eq!(labelled.data["app.properties"], "color=blue\n");
    assert_eq!(labelled.metadata.unwrap().labels["tier"], "web");
}

#[tokio::test]
async fn environment_sources_are_checked_by_field() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let bad = pod_with(
        "env",
        json!({
            "name": "main", "command": ["true"],
            "env": [
                {"name": "A", "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "B", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}},
                {"name": "C", "valueFrom": {}},
                {"name": "D", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}},
                {"name": "E", "valueFrom": {"resourceFieldRef": {"resource": "limits.gpu"}}},
            ],
            "envFrom": [{"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}, {}],
        }),
    );
    let e = c.create(&bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let at = "spec.containers[0]";
    for want in [
        format!("{at}.env[0].valueFrom: may not be specified when `value` is not empty"),
        format!("{at}.env[1].valueFrom.fieldRef.fieldPath: Unsupported value: \"spec.nope\""),
        format!("{at}.env[2].valueFrom: must specify one of: `fieldRef`"),
        format!("{at}.env[3].valueFrom.secretKeyRef.key[a/b]: invalid value \"a/b\""),
        format!(
            "{at}.env[4].valueFrom.resourceFieldRef.resource: Unsupported value: \"limits.gpu\""
        ),
        format!("{at}.envFrom[0]: may not have more than one field specified at a time"),
        format!("{at}.envFrom[1]: must specify one of: `configMapRef` or `secretRef`"),
    ] {
        assert!(e.status.message().contains(&want), "{want} in {e}");
    }
    let e = c.get::<Pod>("default", "env").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

fn job(name: &str, spec: serde_json::Value) -> Job {
    let mut spec = spec;
    if spec.get("template").is_none() {
        spec["template"] = json!({
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
        });
    }
    from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

#[tokio::test]
async fn jobs_are_defaulted_and_checked_as_kubernetes_does() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();

    // Defaults, and a selector generated from the uid that the template's labels follow.
    let created = c.create(&job("pi", json!({}))).await.unwrap();
    let uid = created.metadata.as_ref().unwrap().uid.clone();
    let spec = created.spec.clone().unwrap();
    assert_eq!(
        (
            spec.completions,
            spec.parallelism,
            spec.backoff_limit,
            spec.suspend
        ),
        (Some(1), Some(1), Some(6), Some(false))
    );
    assert_eq!(spec.completion_mode, "NonIndexed");
    assert_eq!(
        spec.selector.unwrap().match_labels,
        BTreeMap::from([(batch::CONTROLLER_UID_LABEL.to_string(), uid.clone())])
    );
    let labels = spec.template.unwrap().metadata.unwrap().labels;
    for (k, v) in [
        (batch::CONTROLLER_UID_LABEL, uid.as_str()),
        (batch::LEGACY_CONTROLLER_UID_LABEL, uid.as_str()),
        (batch::JOB_NAME_LABEL, "pi"),
        (batch::LEGACY_JOB_NAME_LABEL, "pi"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
    }
    // A work queue: parallelism alone leaves completions unset.
    let queue = c
        .create(&job("queue", json!({"parallelism": 3})))
        .await
        .unwrap();
    assert_eq!(queue.spec.unwrap().completions, None);

    // Refused, naming the field, and nothing is stored.
    for (name, spec, want) in [
        (
            "always",
            json!({"template": {"spec": {"restartPolicy": "Always", "containers": [{"name": "c", "image": "i"}]}}}),
            "spec.template.spec.restartPolicy: unsupported value \"Always\"",
        ),
        (
            "unset",
            json!({"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}),
            "spec.template.spec.restartPolicy: Required value",
        ),
        (
            "indexed",
            json!({"completionMode": "Indexed", "parallelism": 2}),
            "spec.completions: Required value: when completion mode is Indexed",
        ),
        (
            "negative",
            json!({"parallelism": -1, "backoffLimit": -2}),
            "spec.parallelism: must be >= 0",
        ),
        (
            "deadline",
            json!({"activeDeadlineSeconds": -1}),
            "spec.activeDeadlineSeconds: must be >= 0",
        ),
        (
            "mode",
            json!({"completionMode": "Sometimes"}),
            "spec.completionMode: unsupported value \"Sometimes\"",
        ),
        (
            "chosen",
            json!({"selector": {"matchLabels": {"app": "x"}},
                   "template": {"metadata": {"labels": {"app": "x"}},
                                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}),
            "spec.selector: `selector` will be auto-generated",
        ),
    ] {
        let e = c.create(&job(name, spec)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e}");
        assert!(e.status.message().contains(want), "{name}: {want} in {e}");
        let gone = c.get::<Job>("default", name).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    }

    // A selector of one's own needs manualSelector.
    let manual = c
        .create(&job(
            "manual",
            json!({"manualSelector": true, "selector": {"matchLabels": {"app": "x"}},
                   "template": {"metadata": {"labels": {"app": "x"}},
                                "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "i"}]}}}),
        ))
        .await
        .unwrap();
    assert_eq!(
        manual.spec.unwrap().selector.unwrap().match_labels["app"],
        "x"
    );

    // The template, completions and mode are immutable; parallelism is not.
    let e = c
        .patch::<Job>("default", "pi", &json!({"spec": {"completions": 4}}))
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("spec.completions: field is immutable"),
        "{e}"
    );
    let e = c
        .patch::<Job>(
            "default",
            "pi",
            &json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "other"}]}}}}),
        )
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("spec.template: field is immutable"),
        "{e}"
    );
    let scaled = c
        .patch::<Job>("default", "pi", &json!({"spec": {"parallelism": 5}}))
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().parallelism, Some(5));
}

#[tokio::test]
async fn cronjobs_are_defaulted_and_their_schedules_checked() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let cron = |name: &str, spec: serde_json::Value| -> CronJob {
        let mut spec = spec;
        if spec.get("jobTemplate").is_none() {
            spec["jobTemplate"] = json!({"spec": {"template": {"spec": {
                "restartPolicy": "OnFailure", "containers": [{"name": "c", "image": "i"}]
            }}}});
        }
        from_value(json!({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    };

    let made = c
        .create(&cron(
            "nightly",
            json!({"schedule": "0 3 * * *", "timeZone": "Europe/Berlin"}),
        ))
        .await
        .unwrap();
    let spec = made.spec.unwrap();
    assert_eq!(spec.concurrency_policy, "Allow");
    assert_eq!(
        (
            spec.suspend,
            spec.successful_jobs_history_limit,
            spec.failed_jobs_history_limit
        ),
        (Some(false), Some(3), Some(1))
    );
    // The Job template gets the Job's defaults, but no selector until a Job is made.
    let job = spec.job_template.unwrap().spec.unwrap();
    assert_eq!((job.backoff_limit, job.completions), (Some(6), Some(1)));
    assert!(job.selector.is_none());
    c.create(&cron("weekly", json!({"schedule": "@weekly"})))
        .await
        .unwrap();

    for (name, spec, want) in [
        (
            "four",
            json!({"schedule": "* * * *"}),
            "spec.schedule: expected exactly 5 fields",
        ),
        (
            "secs",
            json!({"schedule": "*/5 * * * * *"}),
            "spec.schedule: expected exactly 5 fields",
        ),
        (
            "range",
            json!({"schedule": "61 * * * *"}),
            "spec.schedule: ",
        ),
        (
            "tz",
            json!({"schedule": "TZ=UTC 0 * * * *"}),
            "use timeZone field instead",
        ),
        (
            "zone",
            json!({"schedule": "0 * * * *", "timeZone": "Moon/Base"}),
            "spec.timeZone: unknown time zone \"Moon/Base\"",
        ),
        (
            "policy",
            json!({"schedule": "0 * * * *", "concurrencyPolicy": "Sometimes"}),
            "spec.concurrencyPolicy: unsupported value \"Sometimes\"",
        ),
        (
            "limits",
            json!({"schedule": "0 * * * *", "failedJobsHistoryLimit": -1}),
            "spec.failedJobsHistoryLimit: must be >= 0",
        ),
        (
            "always",
            json!({"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": {"spec": {
            "restartPolicy": "Always", "containers": [{"name": "c", "image": "i"}]}}}}}),
            "spec.jobTemplate.spec.template.spec.restartPolicy: unsupported value \"Always\"",
        ),
        (
            "a-name-much-too-long-for-a-cronjob-whose-jobs-add-eleven",
            json!({"schedule": "0 * * * *"}),
            "metadata.name: must be no more than 52 characters",
        ),
    ] {
        let e = c.create(&cron(name, spec)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e}");
        assert!(e.status.message().contains(want), "{name}: {want} in {e}");
        assert_eq!(
            c.get::<CronJob>("default", name).await.unwrap_err().code(),
            Code::NotFound
        );
    }
}

/// The manifests in `examples/` are what a new user applies first: each is accepted as
/// written.
#[tokio::test]
async fn every_example_manifest_is_accepted() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "{files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = flotilla_client::manifest::parse(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for doc in docs {
            let made = flotilla_client::with_kind!(doc.kind.kind, K => {
                let mut o: K = doc
                    .decode()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if K::NAMESPACED && o.namespace().is_empty() {
                    o.metadata_mut().namespace = "default".into();
                }
                c.create(&o).await.map(|_| ())
            });
            made.unwrap_or_else(|e| panic!("{}: {} refused: {e}", path.display(), doc.name()));
        }
    }
}

#[tokio::test]
async fn daemonsets_are_defaulted_and_checked_as_kubernetes_does() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let ds = |name: &str, spec: serde_json::Value| -> DaemonSet {
        let mut full = json!({
            "selector": {"matchLabels": {"app": "d"}},
            "template": {"metadata": {"labels": {"app": "d"}},
                         "spec": {"containers": [{"name": "c", "image": "i"}]}}
        });
        if let (Some(f), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
            f.extend(extra.clone());
        }
        from_value(json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name}, "spec": full,
        }))
        .unwrap()
    };
    let made = c.create(&ds("logs", json!({}))).await.unwrap();
    let strategy = made.spec.unwrap().update_strategy.unwrap();
    assert_eq!(strategy.r#type, "RollingUpdate");
    let ru = strategy.rolling_update.unwrap();
    assert_eq!(
        (ru.max_unavailable.as_str(), ru.max_surge.as_str()),
        ("1", "0")
    );

    for (name, spec, want) in [
        (
            "never",
            json!({"template": {"metadata": {"labels": {"app": "d"}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "i"}]}}}),
            "spec.template.spec.restartPolicy: unsupported value \"Never\"",
        ),
        (
            "surge",
            json!({"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}),
            "spec.updateStrategy.rollingUpdate.maxSurge: unsupported value \"1\"",
        ),
        (
            "zero",
            json!({"updateStrategy": {"rollingUpdate": {"maxUnavailable": "0%"}}}),
            "spec.updateStrategy.rollingUpdate.maxUnavailable: may not be 0",
        ),
        (
            "double-zero",
            json!({"updateStrategy": {"rollingUpdate": {"maxUnavailable": "00"}}}),
            "spec.updateStrategy.rollingUpdate.maxUnavailable: may not be 0",
        ),
        (
            "over",
            json!({"updateStrategy": {"rollingUpdate": {"maxUnavailable": "150%"}}}),
            "spec.updateStrategy.rollingUpdate.maxUnavailable: must not be greater than 100%",
        ),
        (
            "strategy",
            json!({"updateStrategy": {"type": "Sometimes"}}),
            "spec.updateStrategy.type: unsupported value \"Sometimes\"",
        ),
        (
            "unselected",
            json!({"selector": {"matchLabels": {"app": "other"}}}),
            "does not match the selector",
        ),
    ] {
        let e = c.create(&ds(name, spec)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e}");
        assert!(e.status.message().contains(want), "{name}: {want} in {e}");
    }
    let e = c
        .patch::<DaemonSet>(
            "default",
            "logs",
            &json!({"spec": {"selector": {"matchLabels": {"app": "x"}},
                "template": {"metadata": {"labels": {"app": "x"}}}}}),
        )
        .await
        .unwrap_err();
    assert!(
        e.status
            .message()
            .contains("spec.selector: field is immutable"),
        "{e}"
    );
    // Switching to OnDelete keeps the defaulted rollingUpdate, as Kubernetes does.
    let switched = c
        .patch::<DaemonSet>(
            "default",
            "logs",
            &json!({"spec": {"updateStrategy": {"type": "OnDelete"}}}),
        )
        .await
        .unwrap();
    assert_eq!(
        switched.spec.unwrap().update_strategy.unwrap().r#type,
        "OnDelete"
    );
}

/// A running, ready pod labelled app=web (bound, so its deletion is graceful).
async fn running_pod(c: &Client, name: &str) -> Pod {
    c.create(&pod(name, json!({"app": "web"}))).await.unwrap();
    let mut p = c.bind("default", name, "n1").await.unwrap();
    let status = p.status.get_or_insert_default();
    status.phase = "Running".into();
    status.conditions.push(PodCondition {
        r#type: "Ready".into(),
        status: "True".into(),
        ..Default::default()
    });
    c.update_status(&p).await.unwrap()
}

#[tokio::test]
async fn evictions_obey_the_pods_disruption_budget() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let budget: PodDisruptionBudget = from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .unwrap();
    let mut budget = c.create(&budget).await.unwrap();
    running_pod(&c, "a").await;
    // The disruption controller (not running here) would say: no disruption allowed.
    let set_allowed = |mut b: PodDisruptionBudget, n: i32| {
        let s = b.status.get_or_insert_default();
        s.observed_generation = 1;
        s.disruptions_allowed = n;
        s.desired_healthy = 1;
        s.current_healthy = 1;
        b
    };
    budget = c.update_status(&set_allowed(budget, 0)).await.unwrap();
    let e = c.evict("default", "a", None).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.status.message().starts_with(
            "Cannot evict pod as it would violate the pod's disruption budget. The disruption \
             budget web needs 1 healthy pods and has 1 currently"
        ),
        "{e}"
    );
    let still = c.get::<Pod>("default", "a").await.unwrap();
    assert!(still.metadata.unwrap().deletion_timestamp.is_empty());

    // Allowed once: the eviction takes the disruption, then deletes the pod.
    c.update_status(&set_allowed(budget, 1)).await.unwrap();
    let evicted = c.evict("default", "a", None).await.unwrap();
    assert!(!evicted.metadata.unwrap().deletion_timestamp.is_empty());
    let after = c
        .get::<PodDisruptionBudget>("default", "web")
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(after.disruptions_allowed, 0);
    assert!(after.disrupted_pods.contains_key("a"), "{after:?}");
    running_pod(&c, "b").await;
    assert_eq!(
        c.evict("default", "b", None).await.unwrap_err().code(),
        Code::ResourceExhausted
    );

    // A pod that is not running yet needs no budget.
    c.create(&pod("pending", json!({"app": "web"})))
        .await
        .unwrap();
    c.evict("default", "pending", None).await.unwrap();
    assert_eq!(
        c.get::<Pod>("default", "pending").await.unwrap_err().code(),
        Code::NotFound
    );
    // A pod no budget selects goes at once; a missing one is NOT_FOUND.
    running_pod(&c, "free").await;
    c.patch::<Pod>(
        "default",
        "free",
        &json!({"metadata": {"labels": {"app": "other"}}}),
    )
    .await
    .unwrap();
    c.evict("default", "free", None).await.unwrap();
    assert_eq!(
        c.evict("default", "ghost", None).await.unwrap_err().code(),
        Code::NotFound
    );

    // Budgets are checked as Kubernetes checks them.
    for (name, spec, want) in [
        (
            "both",
            json!({"minAvailable": 1, "maxUnavailable": 1}),
            "spec: minAvailable and maxUnavailable cannot be both set",
        ),
        (
            "pct",
            json!({"maxUnavailable": "150%"}),
            "spec.maxUnavailable: must not be greater than 100%",
        ),
        (
            "policy",
            json!({"minAvailable": 1, "unhealthyPodEvictionPolicy": "Never"}),
            "spec.unhealthyPodEvictionPolicy: unsupported value \"Never\"",
        ),
    ] {
        let b: PodDisruptionBudget = from_value(json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap();
        let e = c.create(&b).await.unwrap_err();
        assert!(e.status.message().contains(want), "{name}: {want} in {e}");
    }
}

#[tokio::test]
async fn volumes_and_mounts_are_checked_by_field() {
    let cp = ControlPlane::start(1).await;
    let c = cp.client();
    let with = |name: &str, volumes: serde_json::Value, mounts: serde_json::Value| -> Pod {
        from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "volumes": volumes,
                "containers": [{"name": "main", "command": ["sleep", "1"], "volumeMounts": mounts}],
            },
        }))
        .unwrap()
    };
    let ok = with(
        "fine",
        json!([
            {"name": "cfg", "configMap": {"name": "app", "items": [{"key": "k", "path": "dir/k", "mode": 384}]}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            {"name": "host", "hostPath": {"path": "/var/log", "type": "Directory"}},
            {"name": "info", "downwardAPI": {"items": [{"path": "l", "fieldRef": {"fieldPath": "metadata.labels['app']"}}]}},
        ]),
        json!([
            {"name": "cfg", "mountPath": "/etc/app"},
            {"name": "tmp", "mountPath": "/tmp/x", "subPath": "a/b"},
        ]),
    );
    c.create(&ok).await.unwrap();
    for (name, volumes, mounts, want) in [
        (
            "dup",
            json!([{"name": "a", "emptyDir": {}}, {"name": "a", "emptyDir": {}}]),
            json!([]),
            "spec.volumes[1].name: Duplicate value: \"a\"",
        ),
        (
            "none",
            json!([{"name": "a"}]),
            json!([]),
            "spec.volumes[0]: must specify one volume source",
        ),
        (
            "two",
            json!([{"name": "a", "emptyDir": {}, "hostPath": {"path": "/x"}}]),
            json!([]),
            "spec.volumes[0]: may not specify more than 1 volume type",
        ),
        (
            "unknown",
            json!([]),
            json!([{"name": "nope", "mountPath": "/x"}]),
            "spec.containers[0].volumeMounts[0].name: Not found: \"nope\"",
        ),
        (
            "relative",
            json!([{"name": "a", "emptyDir": {}}]),
            json!([{"name": "a", "mountPath": "x"}]),
            "spec.containers[0].volumeMounts[0].mountPath: invalid value \"x\": must be an absolute path",
        ),
        (
            "twice",
            json!([{"name": "a", "emptyDir": {}}]),
            json!([{"name": "a", "mountPath": "/x"}, {"name": "a", "mountPath": "/x/"}]),
            "spec.containers[0].volumeMounts[1].mountPath: invalid value \"/x/\": must be unique",
        ),
        (
            "escape",
            json!([{"name": "a", "emptyDir": {}}]),
            json!([{"name": "a", "mountPath": "/x", "subPath": "../etc"}]),
            "spec.containers[0].volumeMounts[0].subPath: invalid value \"../etc\": must not contain '..'",
        ),
        (
            "mode",
            json!([{"name": "a", "secret": {"secretName": "s", "defaultMode": 4096}}]),
            json!([]),
            "spec.volumes[0].secret.defaultMode: must be a number between 0 and 0777",
        ),
        (
            "hostrel",
            json!([{"name": "a", "hostPath": {"path": "var/log"}}]),
            json!([]),
            "spec.volumes[0].hostPath.path: invalid value \"var/log\": must be an absolute path",
        ),
        (
            "medium",
            json!([{"name": "a", "emptyDir": {"medium": "Disk"}}]),
            json!([]),
            "spec.volumes[0].emptyDir.medium: unsupported value \"Disk\"",
        ),
        (
            "field",
            json!([{"name": "a", "downwardAPI": {"items": [{"path": "p", "fieldRef": {"fieldPath": "spec.nodeName"}}]}}]),
            json!([]),
            "spec.volumes[0].downwardAPI.items[0].fieldRef.fieldPath: Unsupported value: \"spec.nodeName\"",
        ),
        (
            "proj",
            json!([{"name": "a", "projected": {"sources": [{"configMap": {"name": "c"}, "secret": {"name": "s"}}]}}]),
            json!([]),
            "spec.volumes[0].projected.sources[0]: must specify exactly one source",
        ),
        (
            "reserved",
            json!([{"name": "a", "configMap": {"name": "c", "items": [{"key": "k", "path": "..data"}]}}]),
            json!([]),
            "spec.volumes[0].configMap.items[0].path: invalid value \"..data\": must not start with '..'",
        ),
        (
            "clash",
            json!([{"name": "a", "projected": {"sources": [
                {"configMap": {"name": "c", "items": [{"key": "k", "path": "conf"}]}},
                {"secret": {"name": "s", "items": [{"key": "k", "path": "conf/key"}]}}]}}]),
            json!([]),
            "spec.volumes[0].projected.sources[1].secret.items[0].path: invalid value \"conf/key\": conflicting duplicate paths",
        ),
        (
            "projpath",
            json!([{"name": "a", "projected": {"sources": [{"secret": {"name": "s", "items": [{"key": "k", "path": "/abs"}]}}]}}]),
            json!([]),
            "spec.volumes[0].projected.sources[0].secret.items[0].path: invalid value \"/abs\": must be a relative path",
        ),
    ] {
        let e = c.create(&with(name, volumes, mounts)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e}");
        assert!(e.status.message().contains(want), "{name}: {want} in {e}");
    }
}
