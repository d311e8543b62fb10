//! etcd's alarms: cluster-wide conditions, raised for one member, that stop some writes until
//! an operator disarms them. They are part of the replicated key space (raised and disarmed
//! through the log, kept in its metadata, carried by snapshots), so every member refuses the
//! same writes at the same point of the log.
//!
//! - `NOSPACE`: a member's key space outgrew `--quota-backend-bytes`. Puts, transactions
//!   that write and lease grants are refused with etcd's `mvcc: database space exceeded`;
//!   reads, deletes, compaction and lease revokes still go, so space can be freed. Then
//!   `etcdctl alarm disarm`.
//! - `CORRUPT`: a member's key space differs from the others' at the same revision
//!   (`crate::node`'s corruption checks). Every write is refused (`corrupt cluster`) until the
//!   member is replaced and the alarm disarmed.

use serde::{Deserialize, Serialize};

use super::Command;
use crate::errors::MvccError;
use crate::types::NodeId;

/// etcd's `AlarmType` values (0 is `NONE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum AlarmKind {
    NoSpace,
    Corrupt,
}

impl AlarmKind {
    /// etcd's code: `NOSPACE` 1, `CORRUPT` 2.
    pub fn code(self) -> i32 {
        match self {
            AlarmKind::NoSpace => 1,
            AlarmKind::Corrupt => 2,
        }
    }

    pub fn from_code(code: i32) -> Option<Self> {
        match code {
            1 => Some(AlarmKind::NoSpace),
            2 => Some(AlarmKind::Corrupt),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AlarmKind::NoSpace => "NOSPACE",
            AlarmKind::Corrupt => "CORRUPT",
        }
    }
}

/// An alarm raised for one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Alarm {
    pub member: NodeId,
    pub kind: AlarmKind,
}

impl std::fmt::Display for Alarm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on member {:x}", self.kind.name(), self.member)
    }
}

/// The metadata key of one alarm: `mvcc/alarm/<member be><code>`, no value.
pub(super) fn meta_key(alarm: &Alarm) -> Vec<u8> {
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(&alarm.member.to_be_bytes());
    key.push(alarm.kind.code() as u8);
    key
}

pub(super) const PREFIX: &[u8] = b"mvcc/alarm/";

/// The alarm a metadata key holds; `None` for a key that is not one.
pub(super) fn from_meta_key(key: &[u8]) -> Option<Alarm> {
    let rest = key.strip_prefix(PREFIX)?;
    let (member, code) = rest.split_first_chunk::<8>()?;
    let [code] = code else { return None };
    Some(Alarm {
        member: NodeId::from_be_bytes(*member),
        kind: AlarmKind::from_code(i32::from(*code))?,
    })
}

/// Why the active alarms refuse `cmd`, if they do (etcd's capped and corrupt appliers).
pub(super) fn refusal<'a>(
    mut alarms: impl Iterator<Item = &'a Alarm>,
    cmd: &Command,
) -> Option<MvccError> {
    let (mut nospace, mut corrupt) = (false, false);
    for a in alarms.by_ref() {
        match a.kind {
            AlarmKind::NoSpace => nospace = true,
            AlarmKind::Corrupt => corrupt = true,
        }
    }
    if corrupt && !matches!(cmd, Command::Alarm { .. }) {
        return Some(MvccError::Corrupt);
    }
    let writes = match cmd {
        Command::Put(_) | Command::LeaseGrant { .. } => true,
        Command::Txn(t) => !txn_is_read_only(t),
        _ => false,
    };
    (nospace && writes).then_some(MvccError::NoSpace)
}

fn txn_is_read_only(t: &flotilla_proto::etcdserverpb::TxnRequest) -> bool {
    use flotilla_proto::etcdserverpb::request_op::Request;
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(_)) | None => true,
            Some(Request::RequestTxn(inner)) => txn_is_read_only(inner),
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_keys_round_trip() {
        for kind in [AlarmKind::NoSpace, AlarmKind::Corrupt] {
            let a = Alarm {
                member: 0xfeed_beef_0000_0001,
                kind,
            };
            assert_eq!(from_meta_key(&meta_key(&a)), Some(a));
        }
        assert_eq!(from_meta_key(b"mvcc/alarm/short"), None);
        assert_eq!(from_meta_key(b"mvcc/lease/12345678"), None);
    }
}
