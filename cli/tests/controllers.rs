//! The controllers in a real three-member cluster, with pod statuses written by a stand-in
//! for the node agent: ReplicaSets scale and adopt, rollouts keep within maxSurge and
//! maxUnavailable at every observed moment and roll back, deletes cascade in each policy,
//! endpoints follow ready pods, namespaces empty themselves, dead nodes are drained, and a
//! rollout survives the death of the leader.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE};
use flotilla_client::Client;
use flotilla_client::api::json::from_value;
use flotilla_client::api::*;
use flotilla_client::informer::{Change, Filter, Informer};
use flotilla_client::watch::{WatchItem, watch};
use serde_json::{Value, json};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(c: &Cluster) -> Client {
    let addrs: Vec<String> = c.members.iter().map(|m| m.client.clone()).collect();
    Client::new(&addrs).unwrap()
}

async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn obj<K: Resource>(v: Value) -> K {
    from_value(v).unwrap()
}

fn template(version: &str) -> Value {
    json!({
        "metadata": {"labels": {"app": "web"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "web", "image": format!("web:{version}"),
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}],
        },
    })
}

fn deployment(name: &str, replicas: i32, surge: Value, unavailable: Value) -> Deployment {
    obj(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "template": template("v1"),
        },
    }))
}

fn replica_set(name: &str, replicas: i32) -> ReplicaSet {
    obj(json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": template("v1"),
        },
    }))
}

async fn pods(c: &Client) -> Vec<Pod> {
    c.list::<Pod>(&ListRequest {
        namespace: "default".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .0
}

fn is_deleting(p: &Pod) -> bool {
    p.metadata
        .as_ref()
        .is_some_and(|m| !m.deletion_timestamp.is_empty())
}

fn is_ready(p: &Pod) -> bool {
    p.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.r#type == "Ready" && c.status == "True")
    })
}

fn owner_uid(p: &Pod) -> Option<String> {
    p.metadata
        .as_ref()?
        .owner_references
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

fn image(p: &Pod) -> String {
    p.spec.as_ref().unwrap().containers[0].image.clone()
}

/// Stands in for the node agents: every pod not yet ready is made Running and Ready (with
/// an address) after `delay`; stops when dropped.
struct FakeKubelet {
    _informer: Informer<Pod>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn fake_kubelet(c: Client, delay: Duration) -> FakeKubelet {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let informer = Informer::<Pod>::start(c.clone(), Filter::default(), move |change| {
        if let Change::Added(p) | Change::Updated { new: p, .. } = change
            && !is_ready(&p)
            && !is_deleting(&p)
        {
            let _ = tx.send((p.namespace().to_string(), p.name().to_string()));
        }
    });
    let next_ip = Arc::new(AtomicUsize::new(1));
    let task = tokio::spawn(async move {
        while let Some((ns, name)) = rx.recv().await {
            let (c, next_ip) = (c.clone(), next_ip.clone());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for _ in 0..5 {
                    let Ok(mut p) = c.get::<Pod>(&ns, &name).await else {
                        return;
                    };
                    if is_ready(&p) || is_deleting(&p) {
                        return;
                    }
                    let n = next_ip.fetch_add(1, Ordering::Relaxed);
                    let status = p.status.get_or_insert_default();
                    status.phase = "Running".into();
                    status.pod_ip = format!("10.1.{}.{}", n / 250, n % 250 + 1);
                    status.conditions.retain(|c| c.r#type != "Ready");
                    status.conditions.push(PodCondition {
                        r#type: "Ready".into(),
                        status: "True".into(),
                        last_transition_time: time::now(),
                        ..Default::default()
                    });
                    if c.update_status(&p).await.is_ok() {
                        return;
                    }
                }
            });
        }
    });
    FakeKubelet {
        _informer: informer,
        task,
    }
}

/// Watches every pod of the namespace and checks, at each change, that active pods never
/// exceed `max_active` and (once `armed`) ready active pods never drop below `min_ready`.
struct Invariants {
    violations: Arc<Mutex<Vec<String>>>,
    armed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Invariants {
    fn start(c: Client, max_active: usize, min_ready: usize) -> Self {
        let violations: Arc<Mutex<Vec<String>>> = Arc::default();
        let armed = Arc::new(AtomicBool::new(false));
        let mut events = watch::<Pod>(
            c,
            WatchRequest {
                namespace: "default".into(),
                resource_version: "0".into(),
                ..Default::default()
            },
        );
        let (v, a) = (violations.clone(), armed.clone());
        let task = tokio::spawn(async move {
            let mut pods: HashMap<String, Pod> = HashMap::new();
            while let Some(Ok(item)) = events.recv().await {
                match item {
                    WatchItem::Added(p) | WatchItem::Modified(p) => {
                        pods.insert(p.name().to_string(), p);
                    }
                    WatchItem::Deleted(p) => {
                        pods.remove(p.name());
                    }
                    _ => continue,
                }
                let active = pods.values().filter(|p| !is_deleting(p)).count();
                let ready = pods
                    .values()
                    .filter(|p| !is_deleting(p) && is_ready(p))
                    .count();
                if active > max_active {
                    v.lock()
                        .unwrap()
                        .push(format!("{active} active pods > {max_active}"));
                }
                if a.load(Ordering::Relaxed) && ready < min_ready {
                    v.lock()
                        .unwrap()
                        .push(format!("{ready} ready pods < {min_ready}"));
                }
            }
        });
        Self {
            violations,
            armed,
            task,
        }
    }

    fn check(&self) {
        let v = self.violations.lock().unwrap();
        assert!(v.is_empty(), "invariant broken: {:?}", &v[..v.len().min(5)]);
    }
}

impl Drop for Invariants {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn rollout_complete(c: &Client, name: &str, replicas: i32) -> Deployment {
    until(&format!("deployment {name} complete"), || async {
        let d = c.get::<Deployment>("default", name).await.ok()?;
        let s = d.status.clone()?;
        let meta = d.metadata.as_ref()?;
        (s.observed_generation >= meta.generation
            && s.updated_replicas == replicas
            && s.replicas == replicas
            && s.available_replicas == replicas
            && s.conditions
                .iter()
                .any(|c| c.r#type == "Progressing" && c.reason == "NewReplicaSetAvailable"))
        .then_some(d)
    })
    .await
}

async fn active_pods(c: &Client) -> Vec<Pod> {
    pods(c)
        .await
        .into_iter()
        .filter(|p| !is_deleting(p))
        .collect()
}

#[test]
fn replica_sets_scale_adopt_and_release() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        let rs = c.create(&replica_set("web", 3)).await.unwrap();
        let uid = rs.metadata.unwrap().uid;
        let counted = |n: usize| {
            let (c, uid) = (c.clone(), uid.clone());
            async move {
                let owned: Vec<Pod> = active_pods(&c)
                    .await
                    .into_iter()
                    .filter(|p| owner_uid(p).as_deref() == Some(&uid))
                    .collect();
                (owned.len() == n).then_some(owned)
            }
        };
        until("3 pods", || counted(3)).await;
        let status = until("status counts 3", || async {
            let rs = c.get::<ReplicaSet>("default", "web").await.ok()?;
            rs.status.filter(|s| s.replicas == 3)
        })
        .await;
        assert_eq!(status.fully_labeled_replicas, 3);
        assert_eq!(status.observed_generation, 1);

        c.patch::<ReplicaSet>("default", "web", &json!({"spec": {"replicas": 5}}))
            .await
            .unwrap();
        until("5 pods", || counted(5)).await;
        c.patch::<ReplicaSet>("default", "web", &json!({"spec": {"replicas": 1}}))
            .await
            .unwrap();
        until("1 pod", || counted(1)).await;

        // An orphan that matches is adopted; the set then has one too many and gives one up.
        c.create(&obj::<Pod>(json!({
            "metadata": {"name": "orphan", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "web:v1"}]},
        })))
        .await
        .unwrap();
        until("the orphan adopted and the set back at 1", || async {
            let all = active_pods(&c).await;
            let adopted = c.get::<Pod>("default", "orphan").await.map_or(true, |p| {
                owner_uid(&p).as_deref() == Some(&uid) || is_deleting(&p)
            });
            (adopted && all.len() == 1).then_some(())
        })
        .await;

        // A pod whose labels stop matching is released and replaced.
        let kept = counted(1).await.unwrap().remove(0);
        let mut relabeled = kept.clone();
        relabeled
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .insert("app".into(), "debug".into());
        c.update(&relabeled).await.unwrap();
        until("the released pod kept and a new one made", || async {
            let released = c.get::<Pod>("default", kept.name()).await.ok()?;
            let replaced = counted(1).await?;
            (owner_uid(&released).is_none() && replaced[0].name() != kept.name()).then_some(())
        })
        .await;
    });
}

#[test]
fn a_rolling_update_stays_within_its_bounds_and_rolls_back() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        let _kubelet = fake_kubelet(c.clone(), Duration::from_millis(150));
        // 6 replicas, maxSurge 2, maxUnavailable 1: 8 pods at most, 5 ready at least.
        let inv = Invariants::start(c.clone(), 8, 5);
        c.create(&deployment("web", 6, json!(2), json!(1)))
            .await
            .unwrap();
        rollout_complete(&c, "web", 6).await;
        inv.armed.store(true, Ordering::Relaxed);

        c.patch::<Deployment>(
            "default",
            "web",
            &json!({"spec": {"template": template("v2")}}),
        )
        .await
        .unwrap();
        let d = rollout_complete(&c, "web", 6).await;
        let active = active_pods(&c).await;
        assert_eq!(active.len(), 6);
        assert!(active.iter().all(|p| image(p) == "web:v2"));
        inv.check();
        let sets = c
            .list::<ReplicaSet>(&ListRequest {
                namespace: "default".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .0;
        assert_eq!(sets.len(), 2);
        let revisions: BTreeMap<String, String> = sets
            .iter()
            .map(|rs| {
                let m = rs.metadata.as_ref().unwrap();
                (
                    rs.spec
                        .as_ref()
                        .unwrap()
                        .template
                        .as_ref()
                        .unwrap()
                        .spec
                        .as_ref()
                        .unwrap()
                        .containers[0]
                        .image
                        .clone(),
                    m.annotations["deployment.kubernetes.io/revision"].clone(),
                )
            })
            .collect();
        assert_eq!(revisions["web:v1"], "1");
        assert_eq!(revisions["web:v2"], "2");
        let available = d.status.unwrap().conditions;
        assert!(
            available
                .iter()
                .any(|c| c.r#type == "Available" && c.status == "True")
        );

        // Roll back with the CLI: the v1 template returns as revision 3.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "rollout",
                "undo",
                "deployment/web",
                "--server",
                &cluster.endpoints(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rollout_complete(&c, "web", 6).await;
        until("every pod back on v1", || async {
            let active = active_pods(&c).await;
            (active.len() == 6 && active.iter().all(|p| image(p) == "web:v1")).then_some(())
        })
        .await;
        let history = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "rollout",
                "history",
                "deployment/web",
                "--server",
                &cluster.endpoints(),
            ])
            .output()
            .unwrap();
        let history = String::from_utf8_lossy(&history.stdout).to_string();
        assert!(history.contains("REVISION"), "{history}");
        assert!(history.lines().any(|l| l.starts_with("2 ")), "{history}");
        assert!(history.lines().any(|l| l.starts_with("3 ")), "{history}");
        inv.check();
    });
}

#[test]
fn deletes_cascade_in_each_policy() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        let gone = |kind_is_rs: bool, name: &'static str| {
            let c = c.clone();
            async move {
                let r = if kind_is_rs {
                    c.get::<ReplicaSet>("default", name).await.map(|_| ())
                } else {
                    c.get::<Deployment>("default", name).await.map(|_| ())
                };
                matches!(r, Err(e) if e.is_not_found()).then_some(())
            }
        };

        // Background: the deployment goes at once, then its set, then the pods.
        c.create(&deployment("bg", 2, json!(1), json!(0)))
            .await
            .unwrap();
        until("2 pods", || async {
            (active_pods(&c).await.len() == 2).then_some(())
        })
        .await;
        c.delete::<Deployment>(&DeleteRequest {
            namespace: "default".into(),
            name: "bg".into(),
            propagation_policy: "Background".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        until("everything of bg gone", || async {
            let sets = c.list::<ReplicaSet>(&ListRequest::default()).await.ok()?.0;
            (sets.is_empty() && pods(&c).await.is_empty()).then_some(())
        })
        .await;

        // Foreground: the set stays, being deleted, until its pods are gone.
        c.create(&replica_set("fg", 3)).await.unwrap();
        until("3 pods", || async {
            (active_pods(&c).await.len() == 3).then_some(())
        })
        .await;
        let rev = c
            .delete::<ReplicaSet>(&DeleteRequest {
                namespace: "default".into(),
                name: "fg".into(),
                propagation_policy: "Foreground".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let meta = rev.metadata.unwrap();
        assert!(!meta.deletion_timestamp.is_empty());
        assert!(meta.finalizers.contains(&"foregroundDeletion".to_string()));
        let mut events = watch::<ReplicaSet>(
            c.clone(),
            WatchRequest {
                namespace: "default".into(),
                resource_version: meta.resource_version.clone(),
                ..Default::default()
            },
        );
        until("fg gone", || gone(true, "fg")).await;
        // It went only after its pods.
        assert!(pods(&c).await.is_empty());
        loop {
            if let Some(Ok(WatchItem::Deleted(_))) = events.recv().await {
                break;
            }
        }

        // Orphan: the set goes, its pods stay, without an owner.
        c.create(&replica_set("or", 2)).await.unwrap();
        until("2 pods", || async {
            (active_pods(&c).await.len() == 2).then_some(())
        })
        .await;
        c.delete::<ReplicaSet>(&DeleteRequest {
            namespace: "default".into(),
            name: "or".into(),
            propagation_policy: "Orphan".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        until("or gone", || gone(true, "or")).await;
        let left = active_pods(&c).await;
        assert_eq!(left.len(), 2);
        assert!(left.iter().all(|p| owner_uid(p).is_none()));
    });
}

#[test]
fn endpoints_follow_ready_pods_and_namespaces_empty_themselves() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        c.create(&obj::<Namespace>(json!({"metadata": {"name": "shop"}})))
            .await
            .unwrap();
        c.create(&obj::<Service>(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        })))
        .await
        .unwrap();
        let mut d = deployment("web", 3, json!(1), json!(0));
        d.metadata.as_mut().unwrap().namespace = "shop".into();
        c.create(&d).await.unwrap();
        // Pods without an address yet: the Endpoints exist, empty.
        until("empty endpoints", || async {
            let e = c.get::<Endpoints>("shop", "web").await.ok()?;
            e.subsets.is_empty().then_some(())
        })
        .await;
        let kubelet = fake_kubelet(c.clone(), Duration::ZERO);
        let e = until("3 ready addresses", || async {
            let e = c.get::<Endpoints>("shop", "web").await.ok()?;
            let s = e.subsets.first()?;
            (s.addresses.len() == 3 && s.not_ready_addresses.is_empty()).then_some(e)
        })
        .await;
        assert_eq!(e.subsets[0].ports[0].port, 8080);
        // One pod stops being ready: its address moves to notReadyAddresses.
        drop(kubelet);
        let pod = until("a ready pod", || async {
            let (pods, _) = c
                .list::<Pod>(&ListRequest {
                    namespace: "shop".into(),
                    ..Default::default()
                })
                .await
                .ok()?;
            pods.into_iter().find(is_ready)
        })
        .await;
        let mut unready = pod.clone();
        for cond in &mut unready.status.as_mut().unwrap().conditions {
            if cond.r#type == "Ready" {
                cond.status = "False".into();
            }
        }
        c.update_status(&unready).await.unwrap();
        let ip = pod.status.unwrap().pod_ip;
        until("the address not ready", || async {
            let e = c.get::<Endpoints>("shop", "web").await.ok()?;
            let s = e.subsets.first()?;
            (s.addresses.len() == 2
                && s.not_ready_addresses.len() == 1
                && s.not_ready_addresses[0].ip == ip)
                .then_some(())
        })
        .await;

        c.delete_named::<Namespace>("", "shop").await.unwrap();
        until("the namespace gone", || async {
            matches!(c.get::<Namespace>("", "shop").await, Err(e) if e.is_not_found()).then_some(())
        })
        .await;
        let left = c
            .list::<Pod>(&ListRequest {
                namespace: "shop".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .0;
        assert!(left.is_empty());
    });
}

fn node(name: &str) -> Node {
    obj(json!({
        "metadata": {"name": name},
        "status": {
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }))
}

#[test]
fn a_node_that_stops_renewing_its_lease_is_drained() {
    let cluster =
        Cluster::start_with(&["--node-monitor-grace", "2s", "--default-toleration", "1s"]);
    runtime().block_on(async {
        let c = client(&cluster);
        // The control plane makes the nodes' lease namespace (Kubernetes' kube-node-lease).
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.get::<Namespace>("", "flotilla-node-lease").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "no flotilla-node-lease namespace"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for n in ["n1", "n2"] {
            c.create(&node(n)).await.unwrap();
            c.create(&obj::<Lease>(json!({
                "metadata": {"name": n, "namespace": "flotilla-node-lease"},
                "spec": {"holderIdentity": n, "renewTime": time::now()},
            })))
            .await
            .unwrap();
        }
        // Both agents renew every 300 ms, until n1's "dies".
        let n1_alive = Arc::new(AtomicBool::new(true));
        let renewer = {
            let (c, alive) = (c.clone(), n1_alive.clone());
            tokio::spawn(async move {
                loop {
                    for n in ["n1", "n2"] {
                        if n == "n1" && !alive.load(Ordering::Relaxed) {
                            continue;
                        }
                        let _ = c
                            .patch::<Lease>(
                                "flotilla-node-lease",
                                n,
                                &json!({"spec": {"renewTime": time::now()}}),
                            )
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            })
        };
        let _kubelet = fake_kubelet(c.clone(), Duration::ZERO);
        c.create(&deployment("web", 6, json!(1), json!(0)))
            .await
            .unwrap();
        rollout_complete(&c, "web", 6).await;
        let on = |pods: &[Pod], n: &str| {
            pods.iter()
                .filter(|p| p.spec.as_ref().unwrap().node_name == n)
                .count()
        };
        let before = active_pods(&c).await;
        assert!(on(&before, "n1") > 0 && on(&before, "n2") > 0);

        n1_alive.store(false, Ordering::Relaxed);
        let died = Instant::now();
        until("n1 unreachable", || async {
            let n = c.get::<Node>("", "n1").await.ok()?;
            let tainted = n
                .spec?
                .taints
                .iter()
                .any(|t| t.key == "node.flotilla.io/unreachable" && t.effect == "NoExecute");
            let unknown = n
                .status?
                .conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.status == "Unknown");
            (tainted && unknown).then_some(())
        })
        .await;
        until("every pod on n2, 6 ready", || async {
            let pods = active_pods(&c).await;
            (pods.len() == 6 && on(&pods, "n1") == 0 && pods.iter().all(is_ready)).then_some(())
        })
        .await;
        eprintln!(
            "pods of the dead node running elsewhere after {:?}",
            died.elapsed()
        );

        // The agent comes back: the taint goes.
        n1_alive.store(true, Ordering::Relaxed);
        until("n1 reachable again", || async {
            let n = c.get::<Node>("", "n1").await.ok()?;
            let clean = n.spec?.taints.is_empty();
            let ready = n
                .status?
                .conditions
                .iter()
                .any(|c| c.r#type == "Ready" && c.status == "True");
            (clean && ready).then_some(())
        })
        .await;
        renewer.abort();
    });
}

#[test]
fn a_rollout_finishes_under_a_new_leader_without_extra_pods() {
    let mut cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        let _kubelet = fake_kubelet(c.clone(), Duration::from_millis(200));
        let inv = Invariants::start(c.clone(), 8, 5);
        c.create(&deployment("web", 6, json!(2), json!(1)))
            .await
            .unwrap();
        rollout_complete(&c, "web", 6).await;
        inv.armed.store(true, Ordering::Relaxed);
        c.patch::<Deployment>(
            "default",
            "web",
            &json!({"spec": {"template": template("v2")}}),
        )
        .await
        .unwrap();
        // Mid-rollout: some v2 pods exist, not all.
        until("the rollout under way", || async {
            let n = active_pods(&c)
                .await
                .iter()
                .filter(|p| image(p) == "web:v2")
                .count();
            (n > 0 && n < 6).then_some(())
        })
        .await;
        let leader = cluster.leader();
        cluster.members[leader].kill9();
        rollout_complete(&c, "web", 6).await;
        let active = active_pods(&c).await;
        assert_eq!(active.len(), 6, "extra pods after the failover");
        assert!(active.iter().all(|p| image(p) == "web:v2"));
        inv.check();
    });
}

#[test]
fn recreate_replaces_all_at_once_and_pause_holds_a_rollout() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        let _kubelet = fake_kubelet(c.clone(), Duration::from_millis(50));
        let mut d = deployment("web", 3, json!(1), json!(0));
        let spec = d.spec.as_mut().unwrap();
        spec.strategy.as_mut().unwrap().r#type = "Recreate".into();
        spec.strategy.as_mut().unwrap().rolling_update = None;
        c.create(&d).await.unwrap();
        rollout_complete(&c, "web", 3).await;

        // Recreate: from the first v2 pod on, no v1 pod exists any more.
        let mixed = Arc::new(AtomicBool::new(false));
        let mut events = watch::<Pod>(
            c.clone(),
            WatchRequest {
                namespace: "default".into(),
                resource_version: "0".into(),
                ..Default::default()
            },
        );
        let checker = {
            let mixed = mixed.clone();
            tokio::spawn(async move {
                let mut pods: HashMap<String, Pod> = HashMap::new();
                while let Some(Ok(item)) = events.recv().await {
                    match item {
                        WatchItem::Added(p) | WatchItem::Modified(p) => {
                            pods.insert(p.name().to_string(), p);
                        }
                        WatchItem::Deleted(p) => {
                            pods.remove(p.name());
                        }
                        _ => continue,
                    }
                    let v1 = pods.values().any(|p| image(p) == "web:v1");
                    let v2 = pods.values().any(|p| image(p) == "web:v2");
                    if v1 && v2 {
                        mixed.store(true, Ordering::Relaxed);
                    }
                }
            })
        };
        c.patch::<Deployment>(
            "default",
            "web",
            &json!({"spec": {"template": template("v2")}}),
        )
        .await
        .unwrap();
        // `rollout status` follows it to the end.
        let out = tokio::task::spawn_blocking({
            let endpoints = cluster.endpoints();
            move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
                    .args(["rollout", "status", "deployment/web", "--timeout", "30s"])
                    .args(["--server", &endpoints])
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.ends_with("deployment \"web\" successfully rolled out\n"),
            "{stdout}"
        );
        let active = active_pods(&c).await;
        assert_eq!(active.len(), 3);
        assert!(active.iter().all(|p| image(p) == "web:v2"));
        checker.abort();
        assert!(
            !mixed.load(Ordering::Relaxed),
            "v1 and v2 pods existed together"
        );

        // Paused: a new template waits until resumed.
        let flotilla = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
                .args(args)
                .args(["--server", &cluster.endpoints()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert_eq!(
            flotilla(&["rollout", "pause", "deployment/web"]),
            "deployment.apps/web paused\n"
        );
        c.patch::<Deployment>(
            "default",
            "web",
            &json!({"spec": {"template": template("v3")}}),
        )
        .await
        .unwrap();
        until("the paused deployment to observe the change", || async {
            let d = c.get::<Deployment>("default", "web").await.ok()?;
            let s = d.status?;
            (s.observed_generation == d.metadata?.generation).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(active_pods(&c).await.iter().all(|p| image(p) == "web:v2"));
        flotilla(&["rollout", "resume", "deployment/web"]);
        rollout_complete(&c, "web", 3).await;
        until("every pod on v3", || async {
            let active = active_pods(&c).await;
            (active.len() == 3 && active.iter().all(|p| image(p) == "web:v3")).then_some(())
        })
        .await;
    });
}

/// A runaway Deployment (a billion replicas) in a namespace with a ResourceQuota holds at the
/// quota: its ReplicaSet's creates past it are refused with Kubernetes' words, the count stays
/// at the cap, `flotilla get quota` shows it full; deleting the Deployment gives the share
/// back, and a quota on compute refuses a pod that leaves it unset.
#[test]
fn a_runaway_deployment_is_held_to_its_namespace_quota() {
    let cluster = Cluster::start();
    let server = cluster.endpoints();
    let flotilla = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(args)
            .args(["--server", &server])
            .output()
            .unwrap()
    };
    runtime().block_on(async {
        let c = client(&cluster);
        c.create(&obj::<Namespace>(json!({"metadata": {"name": "shop"}})))
            .await
            .unwrap();
        c.create(&obj::<ResourceQuota>(json!({
            "metadata": {"name": "small", "namespace": "shop"},
            "spec": {"hard": {"pods": "10", "requests.cpu": "1", "count/deployments.apps": 1}},
        })))
        .await
        .unwrap();
        until("the quota counted", || async {
            let q = c.get::<ResourceQuota>("shop", "small").await.ok()?;
            (q.status?.used.get("pods")? == "0").then_some(())
        })
        .await;
        let mut d = deployment("runaway", 1_000_000_000, json!(1), json!(0));
        d.metadata.as_mut().unwrap().namespace = "shop".into();
        c.create(&d).await.unwrap();
        let shop = ListRequest {
            namespace: "shop".into(),
            ..Default::default()
        };
        until("ten pods", || async {
            let (pods, _) = c.list::<Pod>(&shop).await.ok()?;
            (pods.len() == 10).then_some(())
        })
        .await;
        // It stays there.
        for _ in 0..20 {
            let (pods, _) = c.list::<Pod>(&shop).await.unwrap();
            assert_eq!(pods.len(), 10);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let q = c.get::<ResourceQuota>("shop", "small").await.unwrap();
        let used = q.status.unwrap().used;
        assert_eq!(used["pods"], "10");
        assert_eq!(used["requests.cpu"], "100m");
        // A second Deployment is past count/deployments.apps.
        let mut second = deployment("second", 1, json!(1), json!(0));
        second.metadata.as_mut().unwrap().namespace = "shop".into();
        let e = c.create(&second).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            e.status.message(),
            "deployments \"second\" is forbidden: exceeded quota: small, requested: count/deployments.apps=1, used: count/deployments.apps=1, limited: count/deployments.apps=1"
        );
        // The ReplicaSet says why it stopped.
        let events = until("a FailedCreate event", || async {
            let (events, _) = c.list::<Event>(&shop).await.ok()?;
            let failed: Vec<Event> = events
                .into_iter()
                .filter(|e| e.reason == "FailedCreate")
                .collect();
            (!failed.is_empty()).then_some(failed)
        })
        .await;
        assert!(
            events[0].message.contains("exceeded quota: small"),
            "{}",
            events[0].message
        );
        // The CLI shows the quota full, and words a refusal as kubectl does.
        let out = flotilla(&["get", "quota", "-n", "shop"]);
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("pods: 10/10"), "{table}");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: extra, namespace: shop}\nspec:\n  containers:\n  - {name: app, image: x}\n";
        let mut apply = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["apply", "-f", "-", "--server", &server])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        apply.stdin.take().unwrap().write_all(pod.as_bytes()).unwrap();
        let out = apply.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Error from server (Forbidden): pods \"extra\" is forbidden: failed quota: small: must specify requests.cpu for: app"),
            "{err}"
        );
        // Deleting the Deployment gives the share back.
        c.delete::<Deployment>(&DeleteRequest {
            namespace: "shop".into(),
            name: "runaway".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        until("the quota's usage back to zero", || async {
            let q = c.get::<ResourceQuota>("shop", "small").await.ok()?;
            let used = q.status?.used;
            (used.get("pods")? == "0" && used.get("count/deployments.apps")? == "0")
                .then_some(())
        })
        .await;
    });
}

/// The taint manager acts on every NoExecute taint, not only its own: a pod that does not
/// tolerate it goes at once, one that tolerates it for two seconds goes after them, one that
/// tolerates it without a limit stays.
#[test]
fn every_no_execute_taint_evicts_the_pods_that_do_not_tolerate_it() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        c.create(&node("n1")).await.unwrap();
        let _kubelet = fake_kubelet(c.clone(), Duration::ZERO);
        let toleration = |seconds: Option<i64>| {
            let mut t = json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"});
            if let Some(s) = seconds {
                t["tolerationSeconds"] = json!(s);
            }
            t
        };
        for (name, tolerations) in [
            ("plain", json!([])),
            ("brief", json!([toleration(Some(2))])),
            ("forever", json!([toleration(None)])),
        ] {
            c.create(&obj::<Pod>(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": "n1", "tolerations": tolerations,
                         "containers": [{"name": "main", "image": "x"}]},
            })))
            .await
            .unwrap();
        }
        until("the pods ready", || async {
            let ready = pods(&c).await.iter().filter(|p| is_ready(p)).count();
            (ready == 3).then_some(())
        })
        .await;
        let tainted = Instant::now();
        let n = c
            .patch::<Node>(
                "",
                "n1",
                &json!({"spec": {"taints": [{"key": "dedicated", "value": "x", "effect": "NoExecute"}]}}),
            )
            .await
            .unwrap();
        // The API server stamps the taint; tolerationSeconds count from it.
        assert!(!n.spec.unwrap().taints[0].time_added.is_empty());
        let going = |name: &'static str| {
            let c = c.clone();
            async move {
                match c.get::<Pod>("default", name).await {
                    Ok(p) => is_deleting(&p),
                    Err(e) => e.is_not_found(),
                }
            }
        };
        until("the pod without a toleration evicted", || async {
            going("plain").await.then_some(())
        })
        .await;
        assert!(!going("brief").await || tainted.elapsed() >= Duration::from_secs(1));
        until("the briefly tolerating pod evicted", || async {
            going("brief").await.then_some(())
        })
        .await;
        // timeAdded has whole seconds: at most a second early.
        assert!(tainted.elapsed() >= Duration::from_secs(1), "{:?}", tainted.elapsed());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!going("forever").await, "a pod tolerating the taint for ever stays");
    });
}

/// Events expire after `--event-ttl` through store leases, and a repeated Event is counted
/// on the first instead of written again.
#[test]
fn events_are_counted_when_repeated_and_expire_after_their_ttl() {
    let cluster = Cluster::start_with(&["--event-ttl", "4s"]);
    runtime().block_on(async {
        let c = client(&cluster);
        let event = |message: &str| -> Event {
            obj(json!({
                "metadata": {"generateName": "web.", "namespace": "default"},
                "involvedObject": {"kind": "Pod", "namespace": "default", "name": "web", "uid": "u1"},
                "reason": "BackOff", "message": message, "type": "Warning",
                "source": {"component": "test"},
                "firstTimestamp": time::now(), "lastTimestamp": time::now(), "count": 1,
            }))
        };
        let events = || async {
            c.list::<Event>(&ListRequest {
                namespace: "default".into(),
                field_selector: "involvedObject.name=web".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .0
        };
        for _ in 0..3 {
            flotilla_client::events::write(&c, event("Back-off restarting failed container"))
                .await
                .unwrap();
        }
        flotilla_client::events::write(&c, event("another message"))
            .await
            .unwrap();
        let written = Instant::now();
        let mut now = events().await;
        now.sort_by_key(|e| e.message.clone());
        let counts: Vec<(String, i32)> = now.iter().map(|e| (e.message.clone(), e.count)).collect();
        assert_eq!(
            counts,
            [
                ("Back-off restarting failed container".to_string(), 3),
                ("another message".to_string(), 1)
            ]
        );
        until("the events expired", || async {
            events().await.is_empty().then_some(())
        })
        .await;
        assert!(
            written.elapsed() >= Duration::from_secs(3),
            "gone after {:?}, before the TTL",
            written.elapsed()
        );
    });
}
