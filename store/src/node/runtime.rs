//! The runtime Raft runs on, apart from client work (issue 43: "Raft before everything
//! else").
//!
//! A member's Raft core, its replication streams, the state machine's apply loop, the peer
//! server and its outgoing peer connections, and the election loop run on threads of their
//! own. Client work (gRPC faces, big ranges, watches, the write batcher) runs on the runtime
//! that started the member. Before, both shared one runtime's workers: four concurrent
//! 16 MiB ranges kept both workers of a 2-core machine busy encoding, the leader's
//! heartbeats waited behind them, and the followers elected another leader (the read-storm
//! test, `a_read_storm_moves_no_leader`, moved the leader under CI load). Now the kernel
//! shares the cores between the two runtimes' threads, and a woken Raft thread is scheduled
//! within its time slice instead of behind every ready client task.

use std::io;

use tokio::runtime::{Handle, Runtime};

/// Worker threads of the Raft runtime: two, so that a long apply of a large batch does not
/// hold up heartbeats on the other.
const RAFT_THREADS: usize = 2;

/// The Raft runtime; shut down (without waiting for its tasks) when dropped.
pub(crate) struct RaftRuntime {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl RaftRuntime {
    pub(crate) fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_THREADS)
            .thread_name("raft")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            runtime: Some(runtime),
            handle,
        })
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks end, which panics on a runtime thread
        // (where the last handle on a member may well go); this does not wait.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
