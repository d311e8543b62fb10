//! The scheduler in a real three-member cluster: it runs on the leader, never overcommits a
//! node (even with concurrent creators and binds that fail), spreads the pods of one owner,
//! places a waiting pod as soon as a node with room joins, explains the pods it cannot
//! place, and carries on under a new leader.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Cluster, DEADLINE};
use flotilla_client::Client;
use flotilla_client::watch::{WatchItem, watch};
use flotilla_proto::api::quantity::{parse_bytes, parse_cpu_millis};
use flotilla_proto::api::*;

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

fn node(name: &str, cpu: &str, memory: &str, ready: bool) -> Node {
    Node {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            allocatable: [
                ("cpu".to_string(), cpu.to_string()),
                ("memory".to_string(), memory.to_string()),
                ("pods".to_string(), "110".to_string()),
            ]
            .into(),
            conditions: vec![NodeCondition {
                r#type: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn pod(name: &str, cpu: &str, memory: &str, owner: Option<&str>) -> Pod {
    Pod {
        metadata: Some(ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            owner_references: owner
                .map(|uid| {
                    // A kind the garbage collector does not follow: the owner does not
                    // exist, and a ReplicaSet owner would have the collector delete the
                    // pods while the test counts them. The scheduler spreads by the
                    // controller's uid, whatever its kind.
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "StatefulSet".into(),
                        name: "web".into(),
                        uid: uid.into(),
                        controller: Some(true),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".into(),
                image: "busybox".into(),
                resources: Some(ResourceRequirements {
                    requests: [
                        ("cpu".to_string(), cpu.to_string()),
                        ("memory".to_string(), memory.to_string()),
                    ]
                    .into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node_name(p: &Pod) -> &str {
    p.spec.as_ref().map(|s| s.node_name.as_str()).unwrap_or("")
}

fn requests(p: &Pod) -> (i64, i64) {
    let r = &p.spec.as_ref().unwrap().containers[0]
        .resources
        .as_ref()
        .unwrap()
        .requests;
    (
        parse_cpu_millis(&r["cpu"]).unwrap(),
        parse_bytes(&r["memory"]).unwrap(),
    )
}

fn scheduled_condition(p: &Pod) -> Option<PodCondition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "PodScheduled")
        .cloned()
}

async fn until<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn all_pods(c: &Client) -> Vec<Pod> {
    c.list::<Pod>(&ListRequest {
        namespace: "default".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .0
}

/// Per node, the requested cpu and memory of the pods bound to it.
fn usage(pods: &HashMap<String, Pod>) -> BTreeMap<String, (i64, i64)> {
    let mut used: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for p in pods.values() {
        if !node_name(p).is_empty() {
            let (cpu, mem) = requests(p);
            let u = used.entry(node_name(p).to_string()).or_default();
            u.0 += cpu;
            u.1 += mem;
        }
    }
    used
}

#[test]
fn no_node_is_overcommitted_with_concurrent_creators_and_failed_binds() {
    let cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        const NODES: usize = 8;
        for i in 0..NODES {
            c.create(&node(&format!("n{i}"), "1", "4Gi", true))
                .await
                .unwrap();
        }
        // Not ready, so the scheduler never picks it; the saboteur binds pods to it behind
        // the scheduler's back, so some of the scheduler's binds fail.
        c.create(&node("elsewhere", "1000", "1000Gi", false))
            .await
            .unwrap();
        let capacity: BTreeMap<String, (i64, i64)> = (0..NODES)
            .map(|i| (format!("n{i}"), (1000, 4 << 30)))
            .chain([("elsewhere".to_string(), (1_000_000, 1000 << 30))])
            .collect();

        // Every change to every pod, checked as it is seen.
        let mut events = watch::<Pod>(
            c.clone(),
            WatchRequest {
                namespace: "default".into(),
                resource_version: "0".into(),
                ..Default::default()
            },
        );
        let checked = Arc::new(AtomicUsize::new(0));
        let counter = checked.clone();
        let checker = tokio::spawn(async move {
            let mut pods: HashMap<String, Pod> = HashMap::new();
            while let Some(item) = events.recv().await {
                match item.unwrap() {
                    WatchItem::Added(p) | WatchItem::Modified(p) => {
                        pods.insert(p.name().to_string(), p);
                    }
                    WatchItem::Deleted(p) => {
                        pods.remove(p.name());
                    }
                    _ => continue,
                }
                for (n, (cpu, mem)) in usage(&pods) {
                    let (cap_cpu, cap_mem) = capacity[&n];
                    assert!(
                        cpu <= cap_cpu && mem <= cap_mem,
                        "node {n} overcommitted: {cpu}m of {cap_cpu}m cpu, {mem} of {cap_mem} bytes"
                    );
                }
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });

        // 64 creators, 4 pods each: about three times what the nodes hold. Right after
        // some creates, a saboteur binds the pod elsewhere or deletes it, racing the
        // scheduler's bind, so that its binds meet conflicts and NotFound.
        let creators: Vec<_> = (0..64)
            .map(|w| {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut raced = (0, 0, 0);
                    for j in 0..4 {
                        let cpu = ["50m", "100m", "150m"][(w + j) % 3];
                        let mem = ["64Mi", "128Mi", "192Mi"][(w * 7 + j) % 3];
                        let name = format!("p-{w}-{j}");
                        c.create(&pod(&name, cpu, mem, None)).await.unwrap();
                        if (w * 4 + j) % 5 == 0 {
                            match c.bind("default", &name, "elsewhere").await {
                                Ok(_) => raced.0 += 1,
                                Err(e) if e.is_conflict() => raced.1 += 1,
                                Err(e) => panic!("bind: {e}"),
                            }
                        } else if (w * 4 + j) % 7 == 0 {
                            c.delete_named::<Pod>("default", &name).await.unwrap();
                            raced.2 += 1;
                        }
                    }
                    raced
                })
            })
            .collect();
        let mut raced = (0, 0, 0);
        for w in creators {
            let r = w.await.unwrap();
            raced = (raced.0 + r.0, raced.1 + r.1, raced.2 + r.2);
        }
        eprintln!(
            "saboteur: {} pods bound elsewhere, {} binds lost to the scheduler, {} pods deleted",
            raced.0, raced.1, raced.2
        );
        assert!(raced.0 > 0 && raced.2 > 0, "the saboteur did nothing");

        // Quiet: every pod is bound or explained, and each node is nearly full: the
        // smallest pod (50m) no longer fits. A pod explained as unschedulable may still be
        // waiting out a back-off after room was freed (a pod deleted, a bind lost to the
        // saboteur), so the scheduler gets until the deadline to use that room; room that
        // stays free with pods waiting is the failure.
        let end = Instant::now() + DEADLINE;
        let pods = loop {
            let pods = all_pods(&c).await;
            let explained = pods.iter().all(|p| {
                !node_name(p).is_empty()
                    || scheduled_condition(p)
                        .is_some_and(|s| s.status == "False" && s.reason == "Unschedulable")
            });
            let map: HashMap<String, Pod> = pods
                .iter()
                .map(|p| (p.name().to_string(), p.clone()))
                .collect();
            let used = usage(&map);
            let room: Vec<(String, i64)> = (0..NODES)
                .map(|i| format!("n{i}"))
                .map(|n| {
                    let cpu = used.get(&n).map(|u| u.0).unwrap_or_default();
                    (n, cpu)
                })
                .filter(|(_, cpu)| *cpu <= 950)
                .collect();
            if explained && room.is_empty() {
                break pods;
            }
            assert!(
                Instant::now() < end,
                "not quiet after {DEADLINE:?}: every pod bound or explained: {explained}; \
                 nodes with room for a 50m pod (name, cpu used): {room:?}; all: {used:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let waiting: Vec<&Pod> = pods.iter().filter(|p| node_name(p).is_empty()).collect();
        assert!(!waiting.is_empty(), "demand was three times the room");
        let why = scheduled_condition(waiting[0]).unwrap().message;
        assert!(
            why.starts_with("0/9 nodes available: ")
                && why.contains("Insufficient cpu")
                && why.contains("1 node(s) were not ready"),
            "{why}"
        );
        // The explanation is an Event too.
        let name = waiting[0].name().to_string();
        until("a FailedScheduling event", DEADLINE, || {
            let (c, name) = (c.clone(), name.clone());
            async move {
                let (events, _) = c
                    .list::<Event>(&ListRequest {
                        namespace: "default".into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                events
                    .iter()
                    .any(|e| {
                        e.reason == "FailedScheduling"
                            && e.involved_object.as_ref().is_some_and(|o| o.name == name)
                            && e.message.starts_with("0/9 nodes available")
                    })
                    .then_some(())
            }
        })
        .await;
        // The checker saw the whole history (each create and each bind) and found no
        // overcommitted node at any point.
        let want = 2 * pods.len();
        until("the checker to see every pod", DEADLINE, || {
            let n = checked.load(Ordering::Relaxed);
            async move { (n >= want).then_some(()) }
        })
        .await;
        checker.abort();
        if let Err(e) = checker.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    });
}

#[test]
fn owners_spread_and_a_waiting_pod_is_placed_when_a_node_joins_and_under_a_new_leader() {
    let mut cluster = Cluster::start();
    runtime().block_on(async {
        let c = client(&cluster);
        for i in 0..4 {
            c.create(&node(&format!("n{i}"), "4", "8Gi", true))
                .await
                .unwrap();
        }
        for i in 0..8 {
            c.create(&pod(&format!("web-{i}"), "100m", "64Mi", Some("rs-uid")))
                .await
                .unwrap();
        }
        let pods = until("8 pods bound", DEADLINE, || {
            let c = c.clone();
            async move {
                let pods = all_pods(&c).await;
                pods.iter()
                    .all(|p| !node_name(p).is_empty())
                    .then_some(pods)
            }
        })
        .await;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for p in &pods {
            *per_node.entry(node_name(p).to_string()).or_default() += 1;
        }
        assert_eq!(per_node.values().copied().collect::<Vec<_>>(), [2, 2, 2, 2]);

        // Too big for any node: it waits, explained.
        c.create(&pod("big", "16", "1Gi", None)).await.unwrap();
        let why = until("the big pod explained", DEADLINE, || {
            let c = c.clone();
            async move {
                let p = c.get::<Pod>("default", "big").await.unwrap();
                scheduled_condition(&p)
                    .filter(|s| s.status == "False")
                    .map(|s| s.message)
            }
        })
        .await;
        assert_eq!(why, "0/4 nodes available: 4 Insufficient cpu");
        // A node with room joins: the pod goes there within a second.
        let joined = Instant::now();
        c.create(&node("huge", "32", "64Gi", true)).await.unwrap();
        until("the big pod placed", Duration::from_secs(1), || {
            let c = c.clone();
            async move {
                let p = c.get::<Pod>("default", "big").await.unwrap();
                (node_name(&p) == "huge").then_some(())
            }
        })
        .await;
        eprintln!("placed {:?} after the node joined", joined.elapsed());

        // The leader dies: the new leader's scheduler takes over.
        let leader = cluster.leader();
        cluster.members[leader].kill9();
        let c = client(&cluster);
        until(
            "a pod created under the new leader to be bound",
            DEADLINE,
            || {
                let c = c.clone();
                async move {
                    match c.get::<Pod>("default", "after").await {
                        Ok(p) => (!node_name(&p).is_empty()).then_some(()),
                        Err(e) if e.is_not_found() => {
                            let _ = c.create(&pod("after", "100m", "64Mi", None)).await;
                            None
                        }
                        Err(_) => None,
                    }
                }
            },
        )
        .await;
        // Nothing was bound twice or moved: the earlier pods are where they were.
        for p in &pods {
            let now = c.get::<Pod>("default", p.name()).await.unwrap();
            assert_eq!(node_name(&now), node_name(p));
        }
    });
}
