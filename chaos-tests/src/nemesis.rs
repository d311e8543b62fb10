//! The nemesis: a seeded random plan of faults, and the code that carries it out on a
//! cluster, recording a timeline.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use std::sync::atomic::{AtomicBool, Ordering};

use crate::cluster::Cluster;
use crate::controlplane::Outage;
use crate::workload::Clock;

/// A kind of fault a scenario may draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` a member (the leader half of the time), restart it after the hold.
    Kill,
    /// SIGSTOP a member (the leader half of the time), SIGCONT after the hold.
    Pause,
    /// Split the members into a majority and a minority.
    PartitionMajority,
    /// Cut the leader off from every other member.
    IsolateLeader,
    /// Cut one direction only between the leader and the others.
    Asymmetric,
    /// Two sides that cannot talk, and one member that talks to both.
    Bridge,
    /// Added latency with jitter on every peer link.
    Latency,
    /// Packet loss on every peer link.
    Loss,
    /// Wipe a member's data dir and replace it through membership change.
    Replace,
    /// `kill -9` a worker's agent for long enough that its pods are evicted and replaced.
    KillWorker,
    /// `kill -9` a member, change a value in its key space on disk, restart it: it must stop
    /// (its corruption check fails); then replace it.
    Corrupt,
    /// A busy thread on every core and a storm of writes for the hold; once it stops, a
    /// write must commit within 10 s (liveness), and the elections started are counted.
    Overload,
}

impl FaultKind {
    /// Whether the Docker harness can inject it: it cuts a container off the peer network,
    /// but has no per-link proxy for one-way cuts, bridges, latency or loss.
    pub fn in_docker(self) -> bool {
        use FaultKind::*;
        matches!(
            self,
            Kill | Pause | PartitionMajority | IsolateLeader | Replace | KillWorker | Overload
        )
        // (Corrupt needs the data dir on this machine's disk.)
    }

    pub const ALL: [FaultKind; 12] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::PartitionMajority,
        FaultKind::IsolateLeader,
        FaultKind::Asymmetric,
        FaultKind::Bridge,
        FaultKind::Latency,
        FaultKind::Loss,
        FaultKind::Replace,
        FaultKind::KillWorker,
        FaultKind::Corrupt,
        FaultKind::Overload,
    ];
}

/// One planned fault.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    /// When it starts, from the start of the run.
    pub at: Duration,
    pub kind: FaultKind,
    /// How long it lasts before it is healed.
    pub hold: Duration,
    /// Draws that pick its targets when it runs.
    pub seed: u64,
}

/// Plans faults drawn from `kinds` over `duration`: a quiet start, then one fault at a time,
/// each held for 1-5 s with 1-3 s of calm after it.
pub fn plan(kinds: &[FaultKind], seed: u64, duration: Duration) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut t = Duration::from_secs(2);
    if kinds.is_empty() {
        return steps;
    }
    // Every kind once before any repeats, so a short run still covers its scenario.
    let mut bag: Vec<FaultKind> = Vec::new();
    while t + Duration::from_secs(2) < duration {
        if bag.is_empty() {
            bag = kinds.to_vec();
            bag.shuffle(&mut rng);
        }
        let kind = bag.pop().expect("refilled above");
        let hold = match kind {
            // Past the node monitor's grace and the eviction toleration, with time to spare.
            FaultKind::KillWorker => Duration::from_millis(rng.random_range(10_000..12_000)),
            FaultKind::Overload => Duration::from_millis(rng.random_range(5_000..8_000)),
            _ => Duration::from_millis(rng.random_range(1_000..5_000)),
        };
        steps.push(Step {
            at: t,
            kind,
            hold,
            seed: rng.random(),
        });
        t += hold + Duration::from_millis(rng.random_range(1_000..3_000));
    }
    steps
}

/// One line of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub at_ms: u64,
    pub what: String,
}

/// Carries out `steps` on `cluster`, returning what it did when, the workers' outages, and
/// what went wrong in a fault that checks the cluster's response itself (a damaged member
/// that kept serving). `workers_down` is set while a worker is down.
pub async fn run(
    cluster: &mut Cluster,
    steps: &[Step],
    clock: Clock,
    workers_down: &AtomicBool,
) -> (Vec<Event>, Vec<Outage>, Vec<String>) {
    let mut timeline = Vec::new();
    let mut outages = Vec::new();
    let mut failures = Vec::new();
    let mut note = |what: String| {
        tracing::info!("{what}");
        timeline.push(Event {
            at_ms: clock.ns() / 1_000_000,
            what,
        });
    };
    let start = tokio::time::Instant::now();
    for step in steps {
        tokio::time::sleep_until(start + step.at).await;
        let mut rng = StdRng::seed_from_u64(step.seed);
        let n = cluster.members.len();
        let leader = cluster.leader().await;
        let names: Vec<String> = cluster.members.iter().map(|m| m.name.clone()).collect();
        let name = |i: usize| names[i].clone();
        let target = |rng: &mut StdRng| match leader {
            Some(l) if rng.random_bool(0.5) => l,
            _ => rng.random_range(0..n),
        };
        let leader_note = |i: usize| if Some(i) == leader { " (leader)" } else { "" };
        match step.kind {
            FaultKind::Kill => {
                let i = target(&mut rng);
                note(format!("kill -9 {}{}", name(i), leader_note(i)));
                cluster.kill(i).await;
                tokio::time::sleep(step.hold).await;
                match cluster.start_member(i).await {
                    Ok(()) => note(format!("restart {}", name(i))),
                    Err(e) => note(format!("restart {} failed: {e:#}", name(i))),
                }
            }
            FaultKind::Pause => {
                let i = target(&mut rng);
                note(format!("SIGSTOP {}{}", name(i), leader_note(i)));
                cluster.pause(i).await;
                tokio::time::sleep(step.hold).await;
                cluster.resume(i).await;
                note(format!("SIGCONT {}", name(i)));
            }
            FaultKind::PartitionMajority => {
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut rng);
                let minority = all.split_off(n / 2 + 1);
                note(format!(
                    "partition majority [{}] | minority [{}]",
                    list(&names, &all),
                    list(&names, &minority)
                ));
                cluster.set_net(|s| s.cut_between(&all, &minority)).await;
                tokio::time::sleep(step.hold).await;
                cluster.heal_net().await;
                note("heal partition".into());
            }
            FaultKind::IsolateLeader | FaultKind::Asymmetric => {
                let l = leader.unwrap_or_else(|| rng.random_range(0..n));
                let others: Vec<usize> = (0..n).filter(|&i| i != l).collect();
                if step.kind == FaultKind::IsolateLeader {
                    note(format!("isolate {}{}", name(l), leader_note(l)));
                    cluster.set_net(|s| s.cut_between(&[l], &others)).await;
                } else if rng.random_bool(0.5) {
                    note(format!(
                        "asymmetric: {}{} cannot send to the others",
                        name(l),
                        leader_note(l)
                    ));
                    cluster
                        .set_net(|s| s.cut.extend(others.iter().map(|&o| (l, o))))
                        .await;
                } else {
                    note(format!(
                        "asymmetric: the others cannot send to {}{}",
                        name(l),
                        leader_note(l)
                    ));
                    cluster
                        .set_net(|s| s.cut.extend(others.iter().map(|&o| (o, l))))
                        .await;
                }
                tokio::time::sleep(step.hold).await;
                cluster.heal_net().await;
                note("heal partition".into());
            }
            FaultKind::Bridge => {
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut rng);
                let bridge = all.pop().expect("a cluster has members");
                let other = all.split_off(all.len() / 2);
                note(format!(
                    "bridge: [{}] | [{}], {} sees both",
                    list(&names, &all),
                    list(&names, &other),
                    name(bridge)
                ));
                cluster.set_net(|s| s.cut_between(&all, &other)).await;
                tokio::time::sleep(step.hold).await;
                cluster.heal_net().await;
                note("heal partition".into());
            }
            FaultKind::Latency => {
                let latency = Duration::from_millis(rng.random_range(20..150));
                let jitter = latency / 2;
                note(format!(
                    "latency {latency:?} + up to {jitter:?} on every peer link"
                ));
                cluster
                    .set_net(|s| {
                        s.latency = latency;
                        s.jitter = jitter;
                    })
                    .await;
                tokio::time::sleep(step.hold).await;
                cluster.heal_net().await;
                note("latency removed".into());
            }
            FaultKind::Loss => {
                let loss = rng.random_range(0.05..0.3);
                note(format!("loss {:.0}% on every peer link", loss * 100.0));
                cluster.set_net(|s| s.loss = loss).await;
                tokio::time::sleep(step.hold).await;
                cluster.heal_net().await;
                note("loss removed".into());
            }
            FaultKind::KillWorker => {
                if cluster.workers.is_empty() {
                    note("no workers to kill".into());
                    continue;
                }
                let w = rng.random_range(0..cluster.workers.len());
                let worker = cluster.workers[w].name.clone();
                workers_down.store(true, Ordering::Relaxed);
                let killed_at_revision = cluster.revision().await.unwrap_or(0);
                let killed = std::time::Instant::now();
                note(format!(
                    "kill -9 agent {worker} (revision {killed_at_revision})"
                ));
                cluster.kill_worker(w).await;
                tokio::time::sleep(step.hold).await;
                let restarted_at_revision = cluster.revision().await.unwrap_or(0);
                let restart = cluster.start_worker(w).await;
                workers_down.store(false, Ordering::Relaxed);
                match restart {
                    Ok(()) => note(format!(
                        "restart agent {worker} (revision {restarted_at_revision})"
                    )),
                    Err(e) => note(format!("restart agent {worker} failed: {e:#}")),
                }
                outages.push(Outage {
                    worker,
                    killed_at_revision,
                    restarted_at_revision,
                    duration_ms: killed.elapsed().as_millis() as u64,
                });
            }
            FaultKind::Replace => {
                let i = rng.random_range(0..n);
                note(format!(
                    "replace {}{}: kill, wipe, remove, add as learner, start empty, promote",
                    name(i),
                    leader_note(i)
                ));
                match cluster.replace(i, Duration::from_secs(30)).await {
                    Ok(()) => note(format!("{} replaced and promoted", name(i))),
                    Err(e) => note(format!("replacing {} failed: {e:#}", name(i))),
                }
            }
            FaultKind::Overload => {
                note(format!(
                    "overload: a busy thread per core and 64 writers for {:?}",
                    step.hold
                ));
                match cluster.overload(step.hold, Duration::from_secs(10)).await {
                    Ok(what) => note(what),
                    Err(e) => {
                        note(format!("liveness: {e:#}"));
                        failures.push(format!("liveness after overload: {e:#}"));
                    }
                }
            }
            FaultKind::Corrupt => {
                let i = target(&mut rng);
                note(format!(
                    "corrupt {}{}: kill -9, change a stored value on its disk, restart",
                    name(i),
                    leader_note(i)
                ));
                match cluster.corrupt(i, step.seed, Duration::from_secs(30)).await {
                    Ok(what) => note(what),
                    Err(e) => {
                        note(format!("corrupting {} went wrong: {e:#}", name(i)));
                        failures.push(format!(
                            "fail-stop: {} with a damaged data dir: {e:#}",
                            name(i)
                        ));
                    }
                }
                if !cluster.members[i].is_running() {
                    match cluster.replace(i, Duration::from_secs(30)).await {
                        Ok(()) => note(format!("{} replaced and promoted", name(i))),
                        Err(e) => note(format!("replacing {} failed: {e:#}", name(i))),
                    }
                }
            }
        }
    }
    (timeline, outages, failures)
}

fn list(names: &[String], members: &[usize]) -> String {
    members
        .iter()
        .map(|&i| names[i].as_str())
        .collect::<Vec<_>>()
        .join(",")
}
