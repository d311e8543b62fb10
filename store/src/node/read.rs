//! Linearizable reads: a read is served from this member's state once it has applied
//! everything the leader had committed when the read arrived (the read index).
//!
//! Obtaining a read index costs the leader a heartbeat round to a quorum, so concurrent reads
//! share one: reads that arrive while a round is running wait for the next round, which
//! starts after they arrived, so every read gets an index taken after it began.
//!
//! A leader that restarts (a crash, kill -9) resumes its leadership in the same term when
//! its vote was committed and no one else was elected meanwhile. Its commit index is
//! persisted lazily, so it may come back knowing less committed than it had acknowledged;
//! and openraft's read index, `max(commit index, first entry of this leadership)`, then
//! predates writes the leader acknowledged before the crash: a stale read (found by the
//! chaos set; docs/findings/2026-12-07-stale-read-after-leader-restart.md). So a resumed
//! leadership reads at no less than its log's end at restart: every entry it may have
//! acknowledged is in its log, and a leader commits its own term's entries.

use std::sync::Mutex;

use openraft::error::{CheckIsLeaderError, RaftError};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::write::Attempt;
use super::{Inner, StoreNode};
use crate::errors::StoreError;
use crate::raft::log_store::LogIds;
use crate::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};
use crate::types::NodeId;

type Waiter = oneshot::Sender<Result<u64, StoreError>>;

#[derive(Default)]
pub(crate) struct ReadBatcher {
    state: Mutex<BatchState>,
}

#[derive(Default)]
struct BatchState {
    running: bool,
    waiting: Vec<Waiter>,
}

/// The leadership a member held when it stopped, found in its stored vote at start: its
/// term, and the end of its log then. While it leads in that term, its read index is at
/// least that end (see the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ResumedLeadership {
    term: u64,
    last_index: u64,
}

impl ResumedLeadership {
    /// The leadership stored in `log` for member `me`: `Some` when its stored vote is a
    /// committed vote for itself (it led when it stopped).
    pub(crate) fn of(log: &LogIds, me: NodeId) -> Result<Option<Self>, String> {
        let Some(vote) = log.vote()? else {
            return Ok(None);
        };
        if !vote.is_committed() || vote.leader_id().voted_for() != Some(me) {
            return Ok(None);
        }
        let (last, _) = log.bounds()?;
        Ok(Some(ResumedLeadership {
            term: vote.leader_id().term,
            last_index: last.map_or(0, |l| l.index),
        }))
    }

    /// The read index for a leader whose openraft read index is `read`, confirmed in `term`
    /// or later. (Confirmed later, the floor only makes the read wait longer.)
    fn floor(resumed: Option<Self>, term: u64, read: u64) -> u64 {
        match resumed {
            Some(r) if r.term == term => read.max(r.last_index),
            _ => read,
        }
    }
}

/// A range reading more records than this is a large read: it is admitted by
/// [`Inner::large_reads`] and read off the async runtime's threads.
pub(crate) const LARGE_READ: usize = 1_000;

impl StoreNode {
    /// Serves a range from this member's copy, as a client asked for it: the answer is cut at
    /// `--max-range-response-bytes` (with `more` set, as a limit would), and a large read waits
    /// for one of the few large reads allowed at once, then reads on a blocking thread, so
    /// that concurrent full-key-space ranges neither hold the async runtime (where Raft's
    /// heartbeats run) nor pile copies of the key space up in memory. A large read that waits
    /// past the request timeout is refused with "too many requests".
    pub async fn range(
        &self,
        req: &flotilla_proto::etcdserverpb::RangeRequest,
    ) -> Result<crate::mvcc::RangeResult, StoreError> {
        let kv = self.inner.kv.clone();
        let plan = kv.plan(req)?;
        let max = self.inner.config.max_range_response_bytes;
        if plan.len() <= LARGE_READ {
            return kv.execute(plan, max);
        }
        let permit = tokio::time::timeout(
            self.inner.config.request_timeout,
            self.inner.large_reads.clone().acquire_owned(),
        )
        .await
        .map_err(|_| StoreError::TooManyRequests)?
        .map_err(|_| StoreError::Stopped("shutting down".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            kv.execute(plan, max)
        })
        .await
        .map_err(|e| StoreError::Internal(format!("a read failed: {e}")))?
    }

    /// Waits until this member can serve a linearizable read.
    pub async fn read_barrier(&self) -> Result<(), StoreError> {
        if crate::fault::enabled("stale-reads")
            && self.inner.raft.metrics().borrow().current_leader != Some(self.inner.id)
        {
            return Ok(());
        }
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let (tx, rx) = oneshot::channel();
        let start_round = {
            let mut s = self
                .inner
                .reads
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            s.waiting.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start_round {
            tokio::spawn(rounds(self.clone()));
        }
        let index = match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => {
                return Err(StoreError::Timeout(
                    "no read index from the leader before the deadline".into(),
                ));
            }
            Ok(Err(_)) => return Err(StoreError::Stopped("the read path stopped".into())),
            Ok(Ok(r)) => r?,
        };
        self.wait_applied(index, deadline).await
    }

    /// Waits until this member has applied `index`.
    pub(crate) async fn wait_applied(
        &self,
        index: u64,
        deadline: Instant,
    ) -> Result<(), StoreError> {
        let applied = |m: &crate::types::RaftMetrics| m.last_applied.map_or(0, |l| l.index);
        if applied(&self.inner.raft.metrics().borrow()) >= index {
            return Ok(());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.inner
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "linearizable read")
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::Timeout(format!("waiting to apply the read index {index}: {e}"))
            })
    }
}

/// Runs read-index rounds while reads are waiting.
async fn rounds(node: StoreNode) {
    loop {
        let batch = {
            let mut s = node
                .inner
                .reads
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if s.waiting.is_empty() {
                s.running = false;
                return;
            }
            std::mem::take(&mut s.waiting)
        };
        let deadline = Instant::now() + node.inner.config.request_timeout;
        let result = node.inner.read_index(deadline).await;
        for w in batch {
            let r = match &result {
                Ok(i) => Ok(*i),
                Err(e) => Err(e.clone()),
            };
            let _ = w.send(r);
        }
    }
}

impl Inner {
    /// The leader's read index, obtained after this call began.
    async fn read_index(&self, deadline: Instant) -> Result<u64, StoreError> {
        loop {
            let leader = self.wait_for_leader(deadline).await?;
            let attempt = if leader == self.id {
                match self.leader_read_index().await {
                    Ok(i) => return Ok(i),
                    // Reads change nothing: whatever went wrong, trying again is safe.
                    Err(e) => Attempt::Retry(e.to_string()),
                }
            } else {
                match self
                    .call_leader(leader, &LeaderRequest::ReadIndex, deadline)
                    .await
                {
                    Ok(LeaderResponse::ReadIndex(i)) => return Ok(i),
                    Ok(other) => Attempt::Done(Err(StoreError::Internal(format!(
                        "the leader answered a read index request with {other:?}"
                    )))),
                    Err(a) => a,
                }
            };
            match attempt {
                Attempt::Done(Err(e)) => return Err(e),
                Attempt::Done(Ok(_)) => {
                    return Err(StoreError::Internal("unexpected read index answer".into()));
                }
                Attempt::Retry(why) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::NoLeader(why));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// On the leader: confirms leadership with a quorum and returns the read index.
    pub(crate) async fn leader_read_index(&self) -> Result<u64, LeaderCallError> {
        // The term before the call: the leadership confirmed below is of this term or a
        // later one. Taken after, a resumed leadership's stale index confirmed just before
        // the term moved on would escape the floor.
        let term = self.raft.metrics().borrow().current_term;
        match self.raft.get_read_log_id().await {
            Ok((read, _applied)) => Ok(ResumedLeadership::floor(
                self.resumed,
                term,
                read.map_or(0, |l| l.index),
            )),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(LeaderCallError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(LeaderCallError::Failed(format!(
                    "the leader could not confirm its leadership: {q}"
                )))
            }
            Err(RaftError::Fatal(f)) => Err(LeaderCallError::Failed(f.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ResumedLeadership;

    #[test]
    fn a_resumed_leadership_reads_at_no_less_than_its_log_end_at_restart() {
        let resumed = Some(ResumedLeadership {
            term: 2,
            last_index: 5385,
        });
        // Openraft's index is the stale commit index it restarted with.
        assert_eq!(ResumedLeadership::floor(resumed, 2, 5383), 5385);
        // Once it knows more committed, that is the index.
        assert_eq!(ResumedLeadership::floor(resumed, 2, 5390), 5390);
        // A later term's leadership starts with an entry of its own after the restart's end.
        assert_eq!(ResumedLeadership::floor(resumed, 3, 5386), 5386);
        assert_eq!(ResumedLeadership::floor(None, 2, 5383), 5383);
    }
}
