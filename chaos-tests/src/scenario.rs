//! The named scenarios and the fixed set CI runs.

use crate::nemesis::FaultKind;

/// A scenario: which faults the nemesis draws from, while every workload runs.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub faults: &'static [FaultKind],
    /// A deliberately broken build (`FLOTILLA_TEST_FAULT`): the run passes only if the
    /// checkers catch it.
    pub test_fault: Option<&'static str>,
}

use FaultKind::*;

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "none",
        about: "no faults: the workloads and checkers alone",
        faults: &[],
        test_fault: None,
    },
    Scenario {
        name: "kill",
        about: "kill -9 and restart of members, the leader half of the time",
        faults: &[Kill],
        test_fault: None,
    },
    Scenario {
        name: "pause",
        about: "SIGSTOP and SIGCONT of members, the leader half of the time",
        faults: &[Pause],
        test_fault: None,
    },
    Scenario {
        name: "partition",
        about: "majority/minority, leader isolated, asymmetric and bridge partitions",
        faults: &[PartitionMajority, IsolateLeader, Asymmetric, Bridge],
        test_fault: None,
    },
    Scenario {
        name: "net",
        about: "latency with jitter, and loss, on every peer link",
        faults: &[Latency, Loss],
        test_fault: None,
    },
    Scenario {
        name: "replace",
        about: "a member wiped and replaced through membership change, and kills",
        faults: &[Replace, Kill],
        test_fault: None,
    },
    Scenario {
        name: "corrupt",
        about: "a member's key space changed on disk between a kill and a restart (it must \
                stop), then replaced; and kills",
        faults: &[Corrupt, Kill],
        test_fault: None,
    },
    Scenario {
        name: "overload",
        about: "every core busy and a storm of writes, then liveness: a write commits within \
                10 s of the overload stopping; and kills",
        faults: &[Overload, Kill],
        test_fault: None,
    },
    Scenario {
        name: "workers",
        about: "worker agents killed long enough for their pods to be evicted, and members killed",
        faults: &[KillWorker, Kill],
        test_fault: None,
    },
    Scenario {
        name: "mixed",
        about: "every fault",
        faults: &FaultKind::ALL,
        test_fault: None,
    },
    Scenario {
        name: "stale-reads",
        about: "a broken build whose followers serve reads without a read index, under \
                partitions: passes only if the checker finds the stale reads",
        faults: &[PartitionMajority, IsolateLeader],
        test_fault: Some("stale-reads"),
    },
];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// One run of the CI set.
#[derive(Clone, Copy, Debug)]
pub struct CiRun {
    pub scenario: &'static str,
    pub seed: u64,
    pub secs: u64,
    /// In containers (skipped where no Docker engine answers).
    pub docker: bool,
}

const fn ci(scenario: &'static str, seed: u64, secs: u64, docker: bool) -> CiRun {
    CiRun {
        scenario,
        seed,
        secs,
        docker,
    }
}

/// What `--ci` runs. Together they cover every fault and workload, in both harnesses, in
/// about six minutes on a two-core machine.
pub const CI: &[CiRun] = &[
    ci("kill", 1, 20, false),
    ci("pause", 2, 20, false),
    ci("partition", 3, 30, false),
    ci("net", 4, 20, false),
    ci("replace", 5, 25, false),
    ci("corrupt", 10, 25, false),
    ci("overload", 11, 30, false),
    ci("workers", 6, 30, false),
    ci("mixed", 8, 45, false),
    ci("stale-reads", 7, 20, false),
    ci("mixed", 9, 30, true),
];
