//! Raft plumbing: the sled-backed log, the state machine over the key space, snapshots, and
//! the gRPC transport between members.

// openraft's `StorageError` is the error type its storage traits require; boxing it here would
// only be unboxed again at the trait boundary.
pub mod guard;
#[allow(clippy::result_large_err)]
pub mod log_store;
pub mod network;
pub mod peer;
#[allow(clippy::result_large_err)]
pub mod state_machine;
