//! Lease timing. Only the leader tracks deadlines; an expired lease is revoked by proposing a
//! `LeaseRevoke`, so expiry is replicated like any write. A member that becomes leader gives
//! every lease a full TTL from that moment (as etcd does), so failover never expires a lease
//! early; a lease may outlive its TTL by at most one election.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::StoreNode;
use crate::errors::{MvccError, StoreError};
use crate::mvcc::{Command, CommandResponse};
use crate::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};

/// How often the leader looks for expired leases.
const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
pub(crate) struct Lessor {
    state: Mutex<LessorState>,
}

#[derive(Default)]
struct LessorState {
    /// The term in which the deadlines below were set; `None` while not leading.
    term: Option<u64>,
    deadlines: HashMap<i64, Instant>,
    revoking: HashSet<i64>,
}

impl Lessor {
    fn lock(&self) -> std::sync::MutexGuard<'_, LessorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(ttl.max(0) as u64)
}

impl StoreNode {
    /// The shortest TTL granted: long enough to survive a leader election (followers wait
    /// up to twice the maximum election timeout before electing).
    pub fn min_lease_ttl(&self) -> i64 {
        let failover = 2 * self.inner.config.election_timeout_max.as_millis() as i64;
        ((failover * 3 / 2 + 999) / 1000).max(1)
    }

    /// Grants a lease (`id` 0: pick one). Returns the response from the key space.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<(i64, i64), StoreError> {
        let ttl = ttl.max(self.min_lease_ttl());
        let id = if id == 0 {
            loop {
                let candidate = rand::random::<i64>() & i64::MAX;
                if candidate != 0 && self.kv().lease(candidate).is_none() {
                    break candidate;
                }
            }
        } else {
            id
        };
        let r = self.propose(Command::LeaseGrant { id, ttl }).await?;
        if self.is_leader() {
            let mut s = self.inner.lessor.lock();
            if s.term.is_some() {
                s.deadlines.insert(id, Instant::now() + secs(ttl));
            }
        }
        match r {
            CommandResponse::LeaseGrant(g) => Ok((g.id, g.ttl)),
            other => Err(StoreError::Internal(format!(
                "lease grant answered {other:?}"
            ))),
        }
    }

    /// Renews a lease; returns its TTL.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, StoreError> {
        match self
            .lease_call(LeaderRequest::LeaseKeepAlive { id })
            .await?
        {
            (ttl, _) if ttl > 0 => Ok(ttl),
            _ => Err(MvccError::LeaseNotFound(id).into()),
        }
    }

    /// A lease's remaining and granted TTL.
    pub async fn lease_time_to_live(&self, id: i64) -> Result<(i64, i64), StoreError> {
        match self
            .lease_call(LeaderRequest::LeaseTimeToLive { id })
            .await?
        {
            (ttl, _) if ttl < 0 => Err(MvccError::LeaseNotFound(id).into()),
            r => Ok(r),
        }
    }

    async fn lease_call(&self, req: LeaderRequest) -> Result<(i64, i64), StoreError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            let leader = self.inner.wait_for_leader(deadline).await?;
            let attempt = if leader == self.id() {
                match self.serve_lease(&req) {
                    Ok(r) => return Ok(r),
                    Err(e) => super::write::Attempt::Retry(e.to_string()),
                }
            } else {
                match self.inner.call_leader(leader, &req, deadline).await {
                    Ok(LeaderResponse::LeaseTtl { ttl, granted }) => return Ok((ttl, granted)),
                    Ok(other) => {
                        return Err(StoreError::Internal(format!(
                            "the leader answered a lease request with {other:?}"
                        )));
                    }
                    Err(a) => a,
                }
            };
            match attempt {
                super::write::Attempt::Done(r) => {
                    return Err(r.err().unwrap_or_else(|| {
                        StoreError::Internal("unexpected lease answer".into())
                    }));
                }
                super::write::Attempt::Retry(why) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::NoLeader(why));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// On the leader: keep-alive or time-to-live of one lease, as `(ttl, granted)`.
    pub(crate) fn serve_lease(&self, req: &LeaderRequest) -> Result<(i64, i64), LeaderCallError> {
        let mut s = self.inner.lessor.lock();
        if s.term.is_none() || !self.is_leader() {
            return Err(LeaderCallError::NotLeader {
                leader: self.leader(),
            });
        }
        match *req {
            LeaderRequest::LeaseKeepAlive { id } => match self.kv().lease(id) {
                Some(info) => {
                    s.deadlines.insert(id, Instant::now() + secs(info.ttl));
                    Ok((info.ttl, info.ttl))
                }
                None => Ok((0, 0)),
            },
            LeaderRequest::LeaseTimeToLive { id } => match self.kv().lease(id) {
                Some(info) => {
                    let deadline = *s
                        .deadlines
                        .entry(id)
                        .or_insert_with(|| Instant::now() + secs(info.ttl));
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up, as etcd does: a lease with time left never reports 0.
                    let left = left.as_millis().div_ceil(1000) as i64;
                    Ok((left, info.ttl))
                }
                None => Ok((-1, 0)),
            },
            _ => Err(LeaderCallError::Refused("not a lease request".into())),
        }
    }

    /// On the leader: the leases whose deadline has passed and are not being revoked yet.
    fn expired_leases(&self) -> Vec<i64> {
        let m = self.metrics();
        let leading = m.current_leader == Some(self.id());
        let mut s = self.inner.lessor.lock();
        if !leading {
            if s.term.take().is_some() {
                s.deadlines.clear();
                s.revoking.clear();
            }
            return Vec::new();
        }
        let now = Instant::now();
        if s.term != Some(m.current_term) {
            // Newly leading: every lease starts a full TTL now.
            s.term = Some(m.current_term);
            s.deadlines.clear();
            s.revoking.clear();
        }
        let leases = self.kv().lease_ttls();
        let live: HashSet<i64> = leases.iter().map(|(id, _)| *id).collect();
        s.deadlines.retain(|id, _| live.contains(id));
        s.revoking.retain(|id| live.contains(id));
        for (id, ttl) in leases {
            s.deadlines.entry(id).or_insert(now + secs(ttl));
        }
        let expired: Vec<i64> = s
            .deadlines
            .iter()
            .filter(|(id, d)| **d <= now && !s.revoking.contains(id))
            .map(|(id, _)| *id)
            .collect();
        s.revoking.extend(expired.iter().copied());
        expired
    }
}

/// The leader's expiry loop.
pub(crate) async fn run(node: StoreNode) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for id in node.expired_leases() {
            let node = node.clone();
            tokio::spawn(async move {
                match node.propose(Command::LeaseRevoke { id }).await {
                    Ok(_) => tracing::debug!(lease = %format!("{id:x}"), "lease expired"),
                    Err(StoreError::Mvcc(MvccError::LeaseNotFound(_))) => {}
                    Err(e) => {
                        tracing::warn!(lease = %format!("{id:x}"), error = %e, "revoking an expired lease failed; will retry");
                        node.inner.lessor.lock().revoking.remove(&id);
                    }
                }
            });
        }
    }
}
