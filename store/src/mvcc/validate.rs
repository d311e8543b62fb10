//! Checks a request passes before it is proposed, so that a malformed one is refused at once
//! with a precise error and never reaches the log. They mirror etcd's, with etcd's limits.

use std::collections::HashSet;

use flotilla_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, compare,
    range_request, request_op,
};

use super::{Command, KeyRange};
use crate::errors::InvalidRequest;

/// Most compares, or operations per branch, in one txn (etcd's `--max-txn-ops` default).
pub const MAX_TXN_OPS: usize = 128;

/// The largest lease TTL etcd accepts, in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Checks a write command before it is proposed.
pub fn validate_command(cmd: &Command) -> Result<(), InvalidRequest> {
    match cmd {
        Command::Batch(cmds) => {
            for c in cmds {
                if matches!(c, Command::Batch(_)) {
                    return Err(InvalidRequest::field("batch", "must not contain a batch"));
                }
                validate_command(c)?;
            }
            Ok(())
        }
        Command::Fenced { cmd, .. } => {
            if matches!(**cmd, Command::Batch(_) | Command::Fenced { .. }) {
                return Err(InvalidRequest::field(
                    "fenced",
                    "must hold a single command",
                ));
            }
            validate_command(cmd)
        }
        Command::Put(p) => validate_put(p),
        Command::DeleteRange(d) => validate_delete(d),
        Command::Txn(t) => validate_txn(t),
        Command::Compact { .. } | Command::LeaseRevoke { .. } | Command::Alarm { .. } => Ok(()),
        Command::LeaseGrant { ttl, .. } => {
            if *ttl > MAX_LEASE_TTL {
                Err(InvalidRequest::LeaseTtlTooLarge)
            } else {
                Ok(())
            }
        }
    }
}

/// Checks a range request (served as a read, or inside a txn).
pub fn validate_range(r: &RangeRequest) -> Result<(), InvalidRequest> {
    if r.key.is_empty() {
        return Err(InvalidRequest::EmptyKey);
    }
    if range_request::SortOrder::try_from(r.sort_order).is_err() {
        return Err(InvalidRequest::field(
            "sort_order",
            format!("unknown value {}", r.sort_order),
        ));
    }
    if range_request::SortTarget::try_from(r.sort_target).is_err() {
        return Err(InvalidRequest::field(
            "sort_target",
            format!("unknown value {}", r.sort_target),
        ));
    }
    if r.limit < 0 {
        return Err(InvalidRequest::field("limit", "must be >= 0"));
    }
    Ok(())
}

fn validate_put(p: &PutRequest) -> Result<(), InvalidRequest> {
    if p.key.is_empty() {
        return Err(InvalidRequest::EmptyKey);
    }
    if p.ignore_value && !p.value.is_empty() {
        return Err(InvalidRequest::ValueProvided);
    }
    if p.ignore_lease && p.lease != 0 {
        return Err(InvalidRequest::LeaseProvided);
    }
    Ok(())
}

fn validate_delete(d: &DeleteRangeRequest) -> Result<(), InvalidRequest> {
    if d.key.is_empty() {
        return Err(InvalidRequest::EmptyKey);
    }
    Ok(())
}

fn validate_txn(t: &TxnRequest) -> Result<(), InvalidRequest> {
    if t.compare.len() > MAX_TXN_OPS
        || t.success.len() > MAX_TXN_OPS
        || t.failure.len() > MAX_TXN_OPS
    {
        return Err(InvalidRequest::TooManyOps);
    }
    for c in &t.compare {
        validate_compare(c)?;
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => validate_range(r)?,
            Some(request_op::Request::RequestPut(p)) => validate_put(p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => validate_delete(d)?,
            Some(request_op::Request::RequestTxn(nested)) => validate_txn(nested)?,
            None => return Err(InvalidRequest::field("txn request op", "empty operation")),
        }
    }
    check_writes(&t.success)?;
    check_writes(&t.failure)?;
    Ok(())
}

fn validate_compare(c: &Compare) -> Result<(), InvalidRequest> {
    if c.key.is_empty() {
        return Err(InvalidRequest::EmptyKey);
    }
    if compare::CompareResult::try_from(c.result).is_err() {
        return Err(InvalidRequest::field(
            "compare.result",
            format!("unknown value {}", c.result),
        ));
    }
    if compare::CompareTarget::try_from(c.target).is_err() {
        return Err(InvalidRequest::field(
            "compare.target",
            format!("unknown value {}", c.target),
        ));
    }
    Ok(())
}

/// A txn may not write one key twice on one path: no two puts of a key, and no put of a key
/// that a delete in the same branch covers. A nested txn contributes the writes of both its
/// branches, since either may run.
fn check_writes(ops: &[RequestOp]) -> Result<(), InvalidRequest> {
    let (puts, dels) = collect_writes(ops)?;
    if puts.iter().any(|k| dels.iter().any(|d| d.contains(k))) {
        return Err(InvalidRequest::DuplicateKey);
    }
    Ok(())
}

fn collect_writes(ops: &[RequestOp]) -> Result<(HashSet<Vec<u8>>, Vec<KeyRange>), InvalidRequest> {
    let mut puts = HashSet::new();
    let mut dels = Vec::new();
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestPut(p)) => {
                if !puts.insert(p.key.clone()) {
                    return Err(InvalidRequest::DuplicateKey);
                }
            }
            Some(request_op::Request::RequestDeleteRange(d)) => {
                dels.push(KeyRange::new(&d.key, &d.range_end));
            }
            Some(request_op::Request::RequestTxn(nested)) => {
                let (sp, sd) = collect_writes(&nested.success)?;
                let (fp, fd) = collect_writes(&nested.failure)?;
                for key in sp.union(&fp) {
                    if !puts.insert(key.clone()) {
                        return Err(InvalidRequest::DuplicateKey);
                    }
                }
                dels.extend(sd);
                dels.extend(fd);
            }
            Some(request_op::Request::RequestRange(_)) | None => {}
        }
    }
    Ok((puts, dels))
}
