//! Flotilla's consensus store: a Raft group (openraft) over sled whose state machine is an
//! etcd-style MVCC key space, with a watch hub on every member.
//!
//! - [`mvcc`]: the key space's rules (revisions, ranges, txns, compaction, leases);
//! - [`kv`]: one member's key space — the index, its sled records, the watch hub;
//! - [`raft`]: the Raft log, state machine, snapshots and peer transport;
//! - [`node`]: a running member: the write and read paths, leases, membership;
//! - [`etcd`]: the etcd v3 gRPC face served on the client port.

pub mod backend;
pub mod codec;
pub mod errors;
pub mod etcd;
pub mod fault;
pub mod kv;
pub mod mvcc;
pub mod node;
pub mod raft;
pub mod snapshot;
pub mod types;
pub mod watch;
