//! Elections with Raft's PreVote (Ongaro's thesis, 9.6), which openraft 0.9 lacks.
//!
//! Without it, a member that cannot win an election (cut off, behind, or starved of CPU so
//! that it misses the leader's heartbeats) campaigns again and again, each time one term
//! higher; when it is heard again, its term deposes a leader that was doing fine, and under
//! overload the cluster kept changing leaders (issue 43: 58 in 50 s). So openraft's own
//! election timer is off (`enable_elect: false`) and this loop decides when to campaign:
//!
//! - a voter that has heard from no leader for its election timeout (the maximum election
//!   timeout, openraft's leader lease, plus a random time between the minimum and the
//!   maximum, drawn anew each time: 560-720 ms with the defaults, as before) first asks the
//!   other voters for a pre-vote: "would you vote for me in the next term?";
//! - a voter grants it only if it has heard from no leader for the leader lease itself, is not
//!   the leader, the candidate's term would be above its own and its log is at least as new;
//! - only with a majority (itself included) does the member campaign (`trigger().elect()`),
//!   raising its term. Otherwise its term stays where it was, and the leader's next
//!   heartbeat finds it following.
//!
//! "Heard from a leader" is an AppendEntries or InstallSnapshot of the current term or a newer
//! one that passed the guard, or a vote granted; a leader hears from itself. A member of a
//! release before PreVote is counted as granting (it would vote as it always did).

use std::sync::Mutex;
use std::time::Duration;

use openraft::ServerState;
use rand::Rng;
use tokio::time::Instant;

use super::StoreNode;
use crate::raft::network::{PeerCallError, UNKNOWN_METHOD};
use crate::raft::peer::{PreVoteRequest, PreVoteResponse};
use crate::types::NodeId;

/// When this member last heard from a leader.
#[derive(Debug)]
pub(crate) struct LeaderContact(Mutex<Instant>);

impl Default for LeaderContact {
    fn default() -> Self {
        Self(Mutex::new(Instant::now()))
    }
}

impl LeaderContact {
    pub(crate) fn heard(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub(crate) fn since(&self) -> Duration {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

/// How often the loop looks.
const TICK: Duration = Duration::from_millis(20);

impl StoreNode {
    /// Serves a pre-vote request (see the module's doc).
    pub(crate) fn serve_pre_vote(&self, req: &PreVoteRequest) -> PreVoteResponse {
        let (term, leads) = {
            let m = self.inner.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.state == ServerState::Leader)
        };
        let lease = self.inner.config.election_timeout_max;
        let ours = self.inner.log_ids.bounds().map(|(last, _)| last);
        let granted = !leads
            && self.inner.leader_contact.since() >= lease
            && req.term > term
            && ours.is_ok_and(|ours| req.last_log_id >= ours);
        tracing::debug!(
            candidate = %format!("{:x}", req.candidate),
            term = req.term,
            granted,
            "pre-vote"
        );
        PreVoteResponse { granted, term }
    }

    /// One pre-vote round: whether a majority of the voters would vote for this member in
    /// the next term.
    async fn pre_vote(&self, voters: &[(NodeId, String)]) -> bool {
        let (term, last_log_id) = {
            let m = self.inner.raft.metrics();
            let term = m.borrow().current_term;
            (term, self.inner.log_ids.bounds().ok().and_then(|(l, _)| l))
        };
        let req = PreVoteRequest {
            candidate: self.id(),
            term: term + 1,
            last_log_id,
        };
        // Answers may come slowly from a busy member: wait up to twice the maximum election
        // timeout, but campaign as soon as a majority granted.
        let wait = self.inner.config.election_timeout_max * 2;
        let mut asks: futures::stream::FuturesUnordered<_> = voters
            .iter()
            .filter(|(id, _)| *id != self.id())
            .map(|(id, addr)| {
                let req = &req;
                async move {
                    match self.inner.peers.pre_vote(*id, addr, req, wait).await {
                        Ok(r) => r.granted,
                        // A member of a release before PreVote votes as it always did.
                        Err(PeerCallError::Remote { reason, .. }) => {
                            reason.contains(UNKNOWN_METHOD)
                        }
                        Err(_) => false,
                    }
                }
            })
            .collect();
        let mut granted = 1;
        while granted * 2 <= voters.len() {
            match futures::StreamExt::next(&mut asks).await {
                Some(true) => granted += 1,
                Some(false) => {}
                None => break,
            }
        }
        let won = granted * 2 > voters.len();
        tracing::debug!(
            term = term + 1,
            granted,
            voters = voters.len(),
            won,
            "pre-vote round"
        );
        won
    }
}

/// Campaigns when the leader has been silent for an election timeout and a majority grants a
/// pre-vote (see the module's doc).
pub(super) async fn run(node: StoreNode) {
    let (min, max) = (
        node.inner.config.election_timeout_min,
        node.inner.config.election_timeout_max,
    );
    let draw = || max + rand::rng().random_range(min..=max);
    let mut timeout = draw();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (leads, voters) = {
            let m = node.inner.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let voters: Vec<(NodeId, String)> = membership
                .voter_ids()
                .map(|id| {
                    let addr = membership
                        .get_node(&id)
                        .map(|n| n.peer_addr.clone())
                        .unwrap_or_default();
                    (id, addr)
                })
                .collect();
            (m.state == ServerState::Leader, voters)
        };
        if leads {
            node.inner.leader_contact.heard();
            continue;
        }
        if !voters.iter().any(|(id, _)| *id == node.id())
            || node.inner.leader_contact.since() < timeout
        {
            continue;
        }
        if node.pre_vote(&voters).await {
            tracing::info!("pre-vote won: campaigning");
            if let Err(e) = node.inner.raft.trigger().elect().await {
                tracing::warn!(error = %e, "campaigning failed");
                return;
            }
        }
        // The next attempt waits a whole timeout again (a new draw).
        node.inner.leader_contact.heard();
        timeout = draw();
    }
}
