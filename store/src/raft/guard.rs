//! Checks on Raft requests from the network, made before openraft sees them.
//!
//! openraft trusts its peers: a request it is handed is assumed to come from a correct member,
//! and one that breaks Raft's invariants can make it panic (a term of `u64::MAX` overflows at
//! the next election) or act on it (a forged leader's entries replace entries the cluster has
//! committed). So every AppendEntries, Vote and InstallSnapshot is checked here against what
//! this member knows, and refused, with the reason logged beside the sender, when a correct
//! member could not have sent it:
//!
//! - **the sender**: the leader or candidate it claims to be must be a voter of the
//!   membership this member knows (a member that has no membership yet, joining, takes any
//!   sender of its cluster; [`super::super::node`] asks the known voters about a sender it does
//!   not know before turning it away for good, so a member that missed another's addition
//!   still follows it), and never this member itself;
//! - **the term**: at most [`MAX_TERM_JUMP`] above this member's and below [`MAX_TERM`]: terms
//!   grow by one per election, so a larger jump is a bug or a forgery, and refusing it keeps
//!   the term from being run up to where it overflows. (A member whose own term ran ahead
//!   while it was cut off is still heard: the leader learns its term from its *replies*.)
//! - **the shape**: an AppendEntries comes from an elected leader (its vote committed), its
//!   entries follow `prev_log_id` one index at a time with terms that never fall and never
//!   pass the leader's term;
//! - **the committed log**: `prev_log_id`, every entry and a snapshot's last log id at or
//!   below this member's commit index must be the entry this member has there. A correct
//!   leader holds every committed entry (Raft's leader completeness), so a request that
//!   contradicts one would truncate or replace what the cluster acknowledged.
//!
//! What this cannot catch: a forger that knows the cluster id and claims to be a real member
//! at a plausible term. Only the peer certificates of the security issue tell members apart
//! from strangers; these checks keep a buggy or stale member, and anything else that breaks
//! the rules, from damaging the log.

use std::fmt;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use crate::types::{LogId, NodeId, TypeConfig, Vote};

/// The largest term increase a request may carry over this member's term. Each election adds
/// one; a member cut off from the others for an hour campaigns at most a few thousand times.
pub const MAX_TERM_JUMP: u64 = 1_000_000;

/// No term at or above this is taken: at ten elections a second, a cluster would need 10^10
/// years to get there, and the terms above it cannot overflow openraft's arithmetic.
pub const MAX_TERM: u64 = 1 << 62;

/// What this member knows when it judges a request.
pub struct LocalView<'a> {
    pub me: NodeId,
    /// This member's current term.
    pub term: u64,
    /// The voters of the membership this member knows (all configurations of a joint one);
    /// empty for a member that has not received a membership yet.
    pub voters: &'a [NodeId],
    /// Senders this member does not know but the voters it knows vouched for.
    pub vouched: &'a dyn Fn(NodeId) -> bool,
    /// The highest index known committed here; the entries up to it never change.
    pub committed: u64,
    /// The log id of this member's entry at an index, if it still has it.
    pub log_id_at: &'a dyn Fn(u64) -> Result<Option<LogId>, String>,
}

/// Why a request was refused; the message names the sender and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The sender is not a voter of the membership this member knows.
    Stranger {
        from: NodeId,
    },
    /// The sender claims to be this member.
    Impostor {
        from: NodeId,
    },
    TermOutOfRange {
        from: NodeId,
        term: u64,
        mine: u64,
    },
    /// An AppendEntries or snapshot from a vote no quorum granted.
    NotElected {
        from: NodeId,
        term: u64,
    },
    /// Entries that do not follow each other, or terms out of order.
    Malformed {
        from: NodeId,
        what: String,
    },
    /// A log id at or below the commit index that is not this member's entry there.
    ContradictsCommitted {
        from: NodeId,
        index: u64,
        theirs: LogId,
        ours: Option<LogId>,
    },
    /// This member's own log could not be read to check the request.
    Unreadable {
        from: NodeId,
        error: String,
    },
}

impl Refusal {
    pub fn sender(&self) -> NodeId {
        match self {
            Refusal::Stranger { from }
            | Refusal::Impostor { from }
            | Refusal::TermOutOfRange { from, .. }
            | Refusal::NotElected { from, .. }
            | Refusal::Malformed { from, .. }
            | Refusal::ContradictsCommitted { from, .. }
            | Refusal::Unreadable { from, .. } => *from,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Stranger { from } => write!(
                f,
                "member {from:x} is not a voter of this member's cluster membership"
            ),
            Refusal::Impostor { from } => {
                write!(f, "the request claims to come from this member ({from:x})")
            }
            Refusal::TermOutOfRange { from, term, mine } => write!(
                f,
                "member {from:x} sent term {term}, out of range for this member's term {mine} (at most {MAX_TERM_JUMP} above it and below {MAX_TERM})"
            ),
            Refusal::NotElected { from, term } => write!(
                f,
                "member {from:x} sent entries for term {term} without having been elected"
            ),
            Refusal::Malformed { from, what } => {
                write!(f, "member {from:x} sent a malformed request: {what}")
            }
            Refusal::ContradictsCommitted {
                from,
                index,
                theirs,
                ours,
            } => match ours {
                Some(ours) => write!(
                    f,
                    "member {from:x} sent log id {theirs} at committed index {index}, where this member has {ours}"
                ),
                None => write!(
                    f,
                    "member {from:x} sent log id {theirs} at committed index {index}, which this member's log does not hold"
                ),
            },
            Refusal::Unreadable { from, error } => write!(
                f,
                "the request of member {from:x} could not be checked against this member's log: {error}"
            ),
        }
    }
}

/// Checks the sender and term of a request claiming `vote`.
fn check_sender(view: &LocalView<'_>, vote: &Vote) -> Result<NodeId, Refusal> {
    let from = vote.leader_id().voted_for().unwrap_or_default();
    let term = vote.leader_id().term;
    if from == view.me {
        return Err(Refusal::Impostor { from });
    }
    if !view.voters.is_empty() && !view.voters.contains(&from) && !(view.vouched)(from) {
        return Err(Refusal::Stranger { from });
    }
    if term >= MAX_TERM || term > view.term.saturating_add(MAX_TERM_JUMP) {
        return Err(Refusal::TermOutOfRange {
            from,
            term,
            mine: view.term,
        });
    }
    Ok(from)
}

/// A log id the sender claims at `id.index` must be this member's there, if that index is
/// committed here and this member still holds its entry. (Entries purged behind a snapshot
/// are committed and applied; openraft skips them whatever is sent.)
fn check_committed(view: &LocalView<'_>, from: NodeId, id: &LogId) -> Result<(), Refusal> {
    if id.index > view.committed {
        return Ok(());
    }
    let ours = (view.log_id_at)(id.index).map_err(|error| Refusal::Unreadable { from, error })?;
    match ours {
        Some(ours) if ours != *id => Err(Refusal::ContradictsCommitted {
            from,
            index: id.index,
            theirs: *id,
            ours: Some(ours),
        }),
        _ => Ok(()),
    }
}

pub fn check_append_entries(
    view: &LocalView<'_>,
    req: &AppendEntriesRequest<TypeConfig>,
) -> Result<(), Refusal> {
    let from = check_sender(view, &req.vote)?;
    let term = req.vote.leader_id().term;
    if !req.vote.is_committed() {
        return Err(Refusal::NotElected { from, term });
    }
    let malformed = |what: String| Refusal::Malformed { from, what };
    let mut prev = req.prev_log_id;
    if let Some(p) = prev
        && p.leader_id.term > term
    {
        return Err(malformed(format!(
            "prev_log_id {p} is of a term after the sender's {term}"
        )));
    }
    for entry in &req.entries {
        let id = entry.log_id;
        let expected = prev.map_or(0, |p| p.index + 1);
        if id.index != expected {
            return Err(malformed(format!(
                "entry {id} where index {expected} comes next"
            )));
        }
        if prev.is_some_and(|p| id.leader_id.term < p.leader_id.term) || id.leader_id.term > term {
            return Err(malformed(format!(
                "entry {id} is out of term order (after {}, sender's term {term})",
                prev.map_or_else(|| "the start".to_string(), |p| p.to_string())
            )));
        }
        prev = Some(id);
    }
    if let Some(c) = req.leader_commit
        && c.leader_id.term > term
    {
        return Err(malformed(format!(
            "commit index {c} is of a term after the sender's {term}"
        )));
    }
    if let Some(p) = &req.prev_log_id {
        check_committed(view, from, p)?;
    }
    for entry in req
        .entries
        .iter()
        .take_while(|e| e.log_id.index <= view.committed)
    {
        check_committed(view, from, &entry.log_id)?;
    }
    Ok(())
}

pub fn check_vote(view: &LocalView<'_>, req: &VoteRequest<NodeId>) -> Result<(), Refusal> {
    let from = check_sender(view, &req.vote)?;
    if let Some(last) = req.last_log_id
        && last.leader_id.term > req.vote.leader_id().term
    {
        return Err(Refusal::Malformed {
            from,
            what: format!(
                "last log id {last} is of a term after the candidate's {}",
                req.vote.leader_id().term
            ),
        });
    }
    Ok(())
}

/// A pre-vote asks for a vote in a term the candidate does not hold yet: the same checks of
/// sender and term as a vote request.
pub fn check_pre_vote(view: &LocalView<'_>, vote: &Vote) -> Result<(), Refusal> {
    check_sender(view, vote).map(|_| ())
}

pub fn check_install_snapshot(
    view: &LocalView<'_>,
    req: &InstallSnapshotRequest<TypeConfig>,
) -> Result<(), Refusal> {
    let from = check_sender(view, &req.vote)?;
    let term = req.vote.leader_id().term;
    if !req.vote.is_committed() {
        return Err(Refusal::NotElected { from, term });
    }
    if let Some(last) = &req.meta.last_log_id {
        if last.leader_id.term > term {
            return Err(Refusal::Malformed {
                from,
                what: format!("snapshot up to {last} is of a term after the sender's {term}"),
            });
        }
        check_committed(view, from, last)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Entry, EntryPayload};
    use openraft::{CommittedLeaderId, Vote};

    const ME: NodeId = 1;
    const LEADER: NodeId = 2;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, LEADER), index)
    }

    fn blank(term: u64, index: u64) -> Entry {
        Entry {
            log_id: id(term, index),
            payload: EntryPayload::Blank,
        }
    }

    /// This member's log: entries 1..=10 of term 3, committed up to 8.
    fn ours(index: u64) -> Result<Option<LogId>, String> {
        Ok((1..=10).contains(&index).then(|| id(3, index)))
    }

    fn never(_: NodeId) -> bool {
        false
    }

    fn view() -> LocalView<'static> {
        LocalView {
            me: ME,
            term: 3,
            voters: &[1, 2, 3],
            vouched: &never,
            committed: 8,
            log_id_at: &ours,
        }
    }

    fn append(
        term: u64,
        from: NodeId,
        prev: Option<LogId>,
        entries: Vec<Entry>,
    ) -> AppendEntriesRequest<TypeConfig> {
        let mut vote = Vote::new(term, from);
        vote.commit();
        AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            entries,
            leader_commit: prev,
        }
    }

    #[test]
    fn a_correct_leaders_requests_pass() {
        // A heartbeat, new entries after the log, entries resent below the commit index that
        // match, and a new term's entries replacing the uncommitted tail.
        for req in [
            append(3, LEADER, Some(id(3, 10)), vec![]),
            append(3, LEADER, Some(id(3, 10)), vec![blank(3, 11), blank(3, 12)]),
            append(
                3,
                LEADER,
                Some(id(3, 6)),
                vec![blank(3, 7), blank(3, 8), blank(3, 9)],
            ),
            append(4, 3, Some(id(3, 8)), vec![blank(4, 9)]),
            append(4, 3, None, vec![blank(3, 0)]),
        ] {
            assert_eq!(check_append_entries(&view(), &req), Ok(()), "{req:?}");
        }
        let vote = VoteRequest::new(Vote::new(4, 3), Some(id(3, 10)));
        assert_eq!(check_vote(&view(), &vote), Ok(()));
    }

    #[test]
    fn terms_that_would_overflow_or_jump_absurdly_are_refused() {
        for term in [u64::MAX, MAX_TERM, 1_000_000_000_000, 3 + MAX_TERM_JUMP + 1] {
            let req = append(term, LEADER, Some(id(3, 10)), vec![]);
            assert!(
                matches!(
                    check_append_entries(&view(), &req),
                    Err(Refusal::TermOutOfRange { from: LEADER, .. })
                ),
                "term {term}"
            );
            let vote = VoteRequest::new(Vote::new(term, 3), Some(id(3, 10)));
            assert!(matches!(
                check_vote(&view(), &vote),
                Err(Refusal::TermOutOfRange { .. })
            ));
        }
        let req = append(3 + MAX_TERM_JUMP, LEADER, Some(id(3, 10)), vec![]);
        assert_eq!(check_append_entries(&view(), &req), Ok(()));
    }

    #[test]
    fn strangers_and_impostors_are_refused_unless_vouched_for() {
        let req = append(4, 9, Some(id(3, 10)), vec![]);
        assert_eq!(
            check_append_entries(&view(), &req),
            Err(Refusal::Stranger { from: 9 })
        );
        let vote = VoteRequest::new(Vote::new(4, 9), Some(id(3, 10)));
        assert_eq!(
            check_vote(&view(), &vote),
            Err(Refusal::Stranger { from: 9 })
        );
        let req = append(4, ME, Some(id(3, 10)), vec![]);
        assert_eq!(
            check_append_entries(&view(), &req),
            Err(Refusal::Impostor { from: ME })
        );
        let vouched = |n: NodeId| n == 9;
        let v = LocalView {
            vouched: &vouched,
            ..view()
        };
        assert_eq!(
            check_append_entries(&v, &append(4, 9, Some(id(3, 10)), vec![])),
            Ok(())
        );
        // A member with no membership yet (joining) follows whoever its cluster sends.
        let v = LocalView {
            voters: &[],
            committed: 0,
            log_id_at: &|_| Ok(None),
            ..view()
        };
        assert_eq!(
            check_append_entries(&v, &append(4, 9, None, vec![blank(4, 0)])),
            Ok(())
        );
    }

    #[test]
    fn requests_that_contradict_committed_entries_are_refused() {
        // The probe's message: a huge term, prev below the commit index, blank entries over
        // the committed ones (here with a plausible term).
        let req = append(5, LEADER, Some(id(2, 6)), vec![blank(5, 7), blank(5, 8)]);
        assert!(matches!(
            check_append_entries(&view(), &req),
            Err(Refusal::ContradictsCommitted { index: 6, .. })
        ));
        let req = append(
            5,
            LEADER,
            Some(id(3, 6)),
            vec![blank(3, 7), blank(5, 8), blank(5, 9)],
        );
        assert!(matches!(
            check_append_entries(&view(), &req),
            Err(Refusal::ContradictsCommitted { index: 8, .. })
        ));
        // Past the commit index, a new term may replace the tail (Raft's log repair).
        let req = append(5, LEADER, Some(id(3, 8)), vec![blank(5, 9)]);
        assert_eq!(check_append_entries(&view(), &req), Ok(()));
        let mut vote = Vote::new(5, LEADER);
        vote.commit();
        let snapshot = |last: LogId| InstallSnapshotRequest::<TypeConfig> {
            vote,
            meta: crate::types::SnapshotMeta {
                last_log_id: Some(last),
                last_membership: Default::default(),
                snapshot_id: "s".into(),
            },
            offset: 0,
            data: vec![],
            done: true,
        };
        assert!(matches!(
            check_install_snapshot(&view(), &snapshot(id(4, 7))),
            Err(Refusal::ContradictsCommitted { index: 7, .. })
        ));
        assert_eq!(check_install_snapshot(&view(), &snapshot(id(3, 7))), Ok(()));
        assert_eq!(
            check_install_snapshot(&view(), &snapshot(id(5, 20))),
            Ok(())
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        let not_elected = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new(3, LEADER),
            prev_log_id: Some(id(3, 10)),
            entries: vec![],
            leader_commit: None,
        };
        for (req, what) in [
            (not_elected, "not elected"),
            (
                append(3, LEADER, Some(id(3, 10)), vec![blank(3, 12)]),
                "a gap",
            ),
            (
                append(3, LEADER, Some(id(3, 10)), vec![blank(3, 11), blank(3, 11)]),
                "a repeat",
            ),
            (
                append(4, LEADER, Some(id(3, 10)), vec![blank(4, 11), blank(3, 12)]),
                "a falling term",
            ),
            (
                append(3, LEADER, Some(id(3, 10)), vec![blank(4, 11)]),
                "a term past the sender's",
            ),
            (
                append(3, LEADER, Some(id(4, 10)), vec![]),
                "prev past the sender's term",
            ),
        ] {
            assert!(check_append_entries(&view(), &req).is_err(), "{what}");
        }
    }
}
