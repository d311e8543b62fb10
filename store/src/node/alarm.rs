//! Alarms on a member (see [`crate::mvcc::alarm`]): listing, raising and disarming them
//! through the log, the quota that raises `NOSPACE`, and etcd's corruption checks that raise
//! `CORRUPT`.
//!
//! **Corruption checks.** Members compare CRCs of their key spaces over the same span of
//! revisions ([`crate::kv::KvState::hash_from`]), asked for with a peer call every member
//! serves ([`LeaderRequest::HashKv`]):
//! - at start, a member compares its key space at its own revision with the others'; when the
//!   others that answer all differ from it, its data is damaged and it stops (fail-stop: it
//!   must not serve reads from, or campaign with, a key space the cluster does not hold);
//! - every `corrupt_check_interval`, the leader compares every member at its revision; a
//!   member whose CRC is not the majority's gets the `CORRUPT` alarm, which stops writes
//!   cluster-wide and names it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::StoreNode;
use crate::errors::{MvccError, StoreError};
use crate::mvcc::alarm::{Alarm, AlarmKind};
use crate::mvcc::{Command, CommandResponse};
use crate::raft::peer::{LeaderCallError, LeaderRequest, LeaderResponse};
use crate::types::NodeId;

/// How long a member asked for a CRC at a revision it has not applied yet waits for it.
const HASH_WAIT: Duration = Duration::from_secs(2);
/// How often a member compares its key space size with the quota.
const QUOTA_EVERY: Duration = Duration::from_millis(500);

impl StoreNode {
    /// The active alarms.
    pub fn alarms(&self) -> Vec<Alarm> {
        self.inner.kv.read().alarms()
    }

    /// Raises (`activate`) or disarms an alarm through the log; the alarms that changed.
    pub async fn set_alarm(&self, activate: bool, alarm: Alarm) -> Result<Vec<Alarm>, StoreError> {
        match self.propose(Command::Alarm { activate, alarm }).await? {
            CommandResponse::Alarms(changed) => Ok(changed),
            CommandResponse::Rejected(e) => Err(e.into()),
            other => Err(StoreError::Internal(format!(
                "an alarm was answered with {other:?}"
            ))),
        }
    }

    /// The size the quota is compared with: the key space's database on disk.
    pub fn backend_bytes(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Serves [`LeaderRequest::HashKv`].
    pub(crate) async fn serve_hash(
        &self,
        from: i64,
        revision: i64,
    ) -> Result<LeaderResponse, LeaderCallError> {
        let deadline = tokio::time::Instant::now() + HASH_WAIT;
        while self.inner.kv.revision() < revision && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match self.inner.kv.hash_from(from, revision) {
            Ok((hash, from, _)) => Ok(LeaderResponse::Hash { hash, from }),
            Err(e) => Err(LeaderCallError::Refused(e.to_string())),
        }
    }

    /// Asks member `id` for its CRC over `[from, revision]`.
    async fn peer_hash(
        &self,
        id: NodeId,
        addr: &str,
        from: i64,
        revision: i64,
    ) -> Option<(u32, i64)> {
        let req = LeaderRequest::HashKv { from, revision };
        match self
            .inner
            .peers
            .leader_call(id, addr, &req, HASH_WAIT + Duration::from_secs(1))
            .await
        {
            Ok(Ok(LeaderResponse::Hash { hash, from })) => Some((hash, from)),
            Ok(other) => {
                tracing::debug!(member = %format!("{id:x}"), answer = ?other, "no hash to compare");
                None
            }
            Err(e) => {
                tracing::debug!(member = %format!("{id:x}"), error = %e, "no hash to compare");
                None
            }
        }
    }

    /// Compares every other member's CRC with this member's at `revision`: per member that
    /// answered, whether it agrees, and the span compared.
    async fn compare_hashes(&self, revision: i64) -> Result<BTreeMap<NodeId, bool>, StoreError> {
        let compacted = self.inner.kv.compact_revision();
        let others: Vec<(NodeId, String)> = self
            .members()
            .into_iter()
            .filter(|m| m.id != self.id() && !m.member.peer_addr.is_empty())
            .map(|m| (m.id, m.member.peer_addr))
            .collect();
        let answers = futures::future::join_all(others.iter().map(|(id, addr)| async move {
            (*id, self.peer_hash(*id, addr, compacted, revision).await)
        }))
        .await;
        let mut verdicts = BTreeMap::new();
        for (id, answer) in answers {
            let Some((theirs, from)) = answer else {
                continue;
            };
            // The span starts at the later of the two compact revisions.
            let (mine, _, _) = match self.inner.kv.hash_from(from, revision) {
                Ok(h) => h,
                Err(StoreError::Mvcc(MvccError::Compacted { .. })) => continue,
                Err(e) => return Err(e),
            };
            if mine != theirs {
                tracing::warn!(
                    member = %format!("{id:x}"),
                    from, revision, mine, theirs,
                    "a member's key space differs from this member's"
                );
            }
            verdicts.insert(id, mine == theirs);
        }
        Ok(verdicts)
    }
}

/// Raises `NOSPACE` for this member while its key space is over the quota (`0`: no quota).
pub(super) async fn watch_quota(node: StoreNode) {
    let quota = node.inner.config.quota_backend_bytes;
    if quota == 0 {
        return;
    }
    let me = Alarm {
        member: node.id(),
        kind: AlarmKind::NoSpace,
    };
    let mut tick = tokio::time::interval(QUOTA_EVERY);
    loop {
        tick.tick().await;
        let size = node.backend_bytes();
        if size <= quota || node.alarms().contains(&me) || node.leader().is_none() {
            continue;
        }
        tracing::warn!(
            size,
            quota,
            "the key space is over --quota-backend-bytes: raising NOSPACE (writes are refused until space is freed and the alarm disarmed)"
        );
        if let Err(e) = node.set_alarm(true, me).await {
            tracing::warn!(error = %e, "raising NOSPACE failed; trying again");
        }
    }
}

/// etcd's initial corruption check: once some other member answers, compares this member's
/// key space with theirs; if every member that answered differs, this member fails (it stops).
pub(super) async fn initial_check(node: StoreNode) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let revision = node.inner.kv.revision();
        if revision > 0 && node.leader().is_some() {
            match node.compare_hashes(revision).await {
                Ok(v) if !v.is_empty() => {
                    let differ: Vec<String> = v
                        .iter()
                        .filter(|(_, agrees)| !**agrees)
                        .map(|(id, _)| format!("{id:x}"))
                        .collect();
                    if differ.len() == v.len() {
                        let reason = format!(
                            "initial corruption check failed: this member's key space at revision {revision} differs from that of member(s) {}; its data is damaged: remove it, wipe its data dir and add it back as a new member",
                            differ.join(", ")
                        );
                        node.fail(reason);
                    } else if !differ.is_empty() {
                        tracing::warn!(
                            members = %differ.join(", "),
                            "initial corruption check: these members differ from this one and the rest; the leader's periodic check raises CORRUPT for them"
                        );
                    } else {
                        tracing::info!(revision, "initial corruption check passed");
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "initial corruption check"),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!("initial corruption check skipped: no other member could compare");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// etcd's periodic corruption check, on the leader: every member is compared at the leader's
/// revision; each one that is not with the majority gets `CORRUPT`.
pub(super) async fn periodic_check(node: StoreNode) {
    let every = node.inner.config.corrupt_check_interval;
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !node.is_leader() {
            continue;
        }
        let revision = node.inner.kv.revision();
        let verdicts = match node.compare_hashes(revision).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "periodic corruption check failed to run");
                continue;
            }
        };
        // The leader and those that agree with it, against those that do not.
        let agree = 1 + verdicts.values().filter(|a| **a).count();
        let differ: Vec<NodeId> = verdicts
            .iter()
            .filter(|(_, a)| !**a)
            .map(|(id, _)| *id)
            .collect();
        let corrupt = if differ.is_empty() {
            continue;
        } else if agree > differ.len() {
            differ
        } else {
            // The leader is the odd one out (or no majority agrees on anything).
            vec![node.id()]
        };
        for member in corrupt {
            let alarm = Alarm {
                member,
                kind: AlarmKind::Corrupt,
            };
            tracing::error!(member = %format!("{member:x}"), revision, "corruption check: raising CORRUPT");
            if let Err(e) = node.set_alarm(true, alarm).await {
                tracing::warn!(error = %e, "raising CORRUPT failed");
            }
        }
    }
}
