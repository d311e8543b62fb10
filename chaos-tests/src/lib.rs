//! Flotilla's chaos suite: real clusters, seeded faults, checked histories.
//!
//! A run starts a cluster of real `flotilla server` processes ([`cluster`]) with a
//! fault-injecting [`proxy`] on every peer link, runs the [`workload`]s against it while the
//! [`nemesis`] carries out a seeded plan of faults, heals everything, and runs the checkers
//! ([`check`], [`linearizability`]) over the recorded histories. [`run`] ties it together and
//! writes the report.

pub mod check;
pub mod cluster;
pub mod controlplane;
pub mod docker;
pub mod linearizability;
pub mod nemesis;
pub mod proxy;
pub mod run;
pub mod scenario;
pub mod workload;
