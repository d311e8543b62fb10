//! The checkers that run over a finished run's histories.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::Serialize;

use crate::linearizability::{self, Verdict};
use crate::workload::{AppendRecord, RegisterRecord, WatchEvent, WatchLog};

/// Something a checker found wrong.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub check: String,
    /// One line.
    pub summary: String,
    /// The evidence: the smallest set of operations or events that shows it.
    pub detail: String,
}

/// A key as the final linearizable read saw it.
#[derive(Clone, Debug, Serialize)]
pub struct FinalKv {
    pub value: String,
    pub version: i64,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// Checks the register history for linearizability, key by key.
pub fn register(records: &[RegisterRecord], per_key: Duration) -> Vec<Finding> {
    let ops: Vec<_> = records.iter().map(RegisterRecord::to_operation).collect();
    match linearizability::check_with_budget(&ops, per_key) {
        Verdict::Linearizable => Vec::new(),
        Verdict::NotLinearizable(anomaly) => {
            let nodes: BTreeMap<usize, &str> = records
                .iter()
                .map(|r| (r.client, r.node.as_str()))
                .collect();
            let clients = anomaly
                .ops
                .iter()
                .map(|o| {
                    format!(
                        "client {} via {}",
                        o.client,
                        nodes.get(&o.client).copied().unwrap_or("?")
                    )
                })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
                .join(", ");
            vec![Finding {
                check: "register linearizability".into(),
                summary: format!(
                    "key {} is not linearizable ({} operations in the smallest failing sub-history; {clients})",
                    anomaly.key,
                    anomaly.ops.len()
                ),
                detail: anomaly.to_string(),
            }]
        }
        Verdict::Unknown { key, reason } => vec![Finding {
            check: "register linearizability".into(),
            summary: format!("key {key}: the checker gave up ({reason})"),
            detail: "rerun with fewer clients or a shorter --duration".into(),
        }],
    }
}

/// Checks that every acknowledged append is present exactly once, and nothing else is.
pub fn append(
    records: &[AppendRecord],
    final_kvs: &BTreeMap<String, FinalKv>,
    reference: &[WatchEvent],
    prefix: &str,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let by_key: HashMap<&str, &AppendRecord> =
        records.iter().map(|r| (r.key.as_str(), r)).collect();
    let mut puts: HashMap<&str, usize> = HashMap::new();
    for e in reference.iter().filter(|e| e.key.starts_with(prefix)) {
        *puts.entry(e.key.as_str()).or_default() += 1;
    }
    let mut lost = Vec::new();
    for r in records.iter().filter(|r| r.outcome == "ok") {
        if !final_kvs.contains_key(&r.key) {
            lost.push(r);
        }
    }
    if !lost.is_empty() {
        findings.push(Finding {
            check: "append".into(),
            summary: format!(
                "{} acknowledged appends are missing at the end, e.g. {}",
                lost.len(),
                lost[0].key
            ),
            detail: lost
                .iter()
                .take(20)
                .map(|r| format!("{r:?}"))
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    for (key, kv) in final_kvs.iter().filter(|(k, _)| k.starts_with(prefix)) {
        match by_key.get(key.as_str()) {
            None => findings.push(Finding {
                check: "append".into(),
                summary: format!("{key} is present but no client ever wrote it"),
                detail: format!("{kv:?}"),
            }),
            Some(r) if r.outcome == "failed" => findings.push(Finding {
                check: "append".into(),
                summary: format!("{key} is present although its put never reached a member"),
                detail: format!("{r:?}\n{kv:?}"),
            }),
            Some(_) => {}
        }
        let applied = puts.get(key.as_str()).copied().unwrap_or(0);
        if kv.version != 1 || applied != 1 {
            findings.push(Finding {
                check: "append".into(),
                summary: format!(
                    "{key} was applied {} times (version {}, {applied} events in the history): a put applied more than once",
                    applied.max(kv.version as usize),
                    kv.version
                ),
                detail: reference
                    .iter()
                    .filter(|e| e.key == *key)
                    .map(|e| format!("{e:?}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
    }
    findings
}

/// Checks the reference history itself: revisions only grow, and replaying it gives the final
/// state (no write missing from the history, none applied out of it).
pub fn reference(
    reference: &[WatchEvent],
    final_kvs: &BTreeMap<String, FinalKv>,
    start: i64,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for w in reference.windows(2) {
        if (w[1].revision, &w[1].key) <= (w[0].revision, &w[0].key) {
            findings.push(Finding {
                check: "history".into(),
                summary: format!(
                    "the history goes back from revision {} to {}",
                    w[0].revision, w[1].revision
                ),
                detail: format!("{:?}\n{:?}", w[0], w[1]),
            });
            break;
        }
    }
    let mut last: BTreeMap<&str, &WatchEvent> = BTreeMap::new();
    for e in reference {
        last.insert(e.key.as_str(), e);
    }
    for (key, kv) in final_kvs.iter().filter(|(_, kv)| kv.mod_revision >= start) {
        match last.get(key.as_str()) {
            Some(e)
                if e.value == kv.value
                    && e.revision == kv.mod_revision
                    && e.version == kv.version => {}
            other => findings.push(Finding {
                check: "history".into(),
                summary: format!(
                    "{key} at the end does not match the last event for it in the history"
                ),
                detail: format!("final: {kv:?}\nlast event: {other:?}"),
            }),
        }
    }
    findings
}

/// Checks one watcher's events against the committed history from its start revision: no
/// gap, duplicate or reorder, and nothing missing at the end.
pub fn watch(log: &WatchLog, reference: &[WatchEvent]) -> Vec<Finding> {
    let mut findings: Vec<Finding> = log
        .errors
        .iter()
        .map(|e| Finding {
            check: format!("watch via {}", log.node),
            summary: e.clone(),
            detail: String::new(),
        })
        .collect();
    let expected: Vec<&WatchEvent> = reference
        .iter()
        .filter(|e| e.revision >= log.start_revision)
        .collect();
    let check = format!("watch via {}", log.node);
    for (i, got) in log.events.iter().enumerate() {
        let Some(want) = expected.get(i) else {
            findings.push(Finding {
                check,
                summary: format!(
                    "event {i} at revision {} is beyond the committed history ({} events from revision {})",
                    got.revision,
                    expected.len(),
                    log.start_revision
                ),
                detail: format!("{got:?}"),
            });
            return findings;
        };
        if got != *want {
            let kind = if log.events[..i].contains(got) {
                "a duplicate"
            } else if got.revision > want.revision {
                "a gap"
            } else if expected.contains(&got) {
                "a reorder"
            } else {
                "an event that was never committed"
            };
            let context = |v: &[&WatchEvent]| {
                v.iter()
                    .map(|e| format!("  {e:?}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let from = i.saturating_sub(2);
            let got_window: Vec<&WatchEvent> = log.events[from..(i + 3).min(log.events.len())]
                .iter()
                .collect();
            findings.push(Finding {
                check,
                summary: format!(
                    "{kind} at event {i}: expected revision {} ({}), got revision {} ({})",
                    want.revision, want.key, got.revision, got.key
                ),
                detail: format!(
                    "committed:\n{}\nwatched:\n{}",
                    context(&expected[from..(i + 3).min(expected.len())]),
                    context(&got_window)
                ),
            });
            return findings;
        }
    }
    if log.events.len() < expected.len() {
        let missing = expected[log.events.len()];
        findings.push(Finding {
            check,
            summary: format!(
                "the watch stopped short: {} of {} events, the first missing at revision {} ({})",
                log.events.len(),
                expected.len(),
                missing.revision,
                missing.key
            ),
            detail: format!("{missing:?}"),
        });
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(revision: i64, key: &str) -> WatchEvent {
        WatchEvent {
            revision,
            key: key.into(),
            kind: "PUT".into(),
            value: format!("v{revision}"),
            create_revision: revision,
            version: 1,
        }
    }

    fn log(start: i64, events: Vec<WatchEvent>) -> WatchLog {
        WatchLog {
            node: "n1".into(),
            start_revision: start,
            events,
            streams: 1,
            errors: Vec::new(),
        }
    }

    #[test]
    fn watch_checker_accepts_the_history_and_names_each_defect() {
        let reference = vec![ev(3, "a"), ev(4, "b"), ev(6, "c"), ev(7, "d")];
        assert!(watch(&log(4, reference[1..].to_vec()), &reference).is_empty());
        assert!(watch(&log(1, reference.clone()), &reference).is_empty());

        let gap = log(3, vec![ev(3, "a"), ev(6, "c"), ev(7, "d")]);
        assert!(
            watch(&gap, &reference)[0]
                .summary
                .starts_with("a gap at event 1")
        );
        let dup = log(3, vec![ev(3, "a"), ev(4, "b"), ev(4, "b"), ev(6, "c")]);
        assert!(
            watch(&dup, &reference)[0]
                .summary
                .starts_with("a duplicate at event 2")
        );
        let reorder = log(3, vec![ev(3, "a"), ev(6, "c"), ev(4, "b"), ev(7, "d")]);
        // Seen at index 1, revision 6 instead of 4: reported where the order first breaks.
        assert!(!watch(&reorder, &reference).is_empty());
        let short = log(3, vec![ev(3, "a"), ev(4, "b")]);
        assert!(
            watch(&short, &reference)[0]
                .summary
                .contains("stopped short")
        );
        let mut wrong = ev(4, "b");
        wrong.value = "other".into();
        let bogus = log(3, vec![ev(3, "a"), wrong]);
        assert!(
            watch(&bogus, &reference)[0]
                .summary
                .contains("never committed")
        );
    }

    #[test]
    fn append_checker_finds_lost_phantom_and_doubled_writes() {
        let rec = |key: &str, outcome: &str| AppendRecord {
            client: 0,
            node: "n1".into(),
            key: key.into(),
            invoke_ns: 0,
            complete_ns: 1,
            outcome: outcome.into(),
            error: None,
        };
        let kv = |rev: i64, version: i64| FinalKv {
            value: "1".into(),
            version,
            create_revision: rev,
            mod_revision: rev,
        };
        let records = vec![
            rec("p/a", "ok"),
            rec("p/b", "indeterminate"),
            rec("p/c", "failed"),
        ];
        let reference = vec![ev(2, "p/a")];
        let mut final_kvs = BTreeMap::from([("p/a".to_string(), kv(2, 1))]);
        assert!(append(&records, &final_kvs, &reference, "p/").is_empty());

        // Lost: acknowledged but gone.
        assert!(
            append(&records, &BTreeMap::new(), &[], "p/")[0]
                .summary
                .contains("missing")
        );
        // Phantom: never written.
        final_kvs.insert("p/z".into(), kv(3, 1));
        let reference2 = vec![ev(2, "p/a"), ev(3, "p/z")];
        assert!(
            append(&records, &final_kvs, &reference2, "p/")[0]
                .summary
                .contains("no client")
        );
        final_kvs.remove("p/z");
        // Applied twice.
        final_kvs.insert("p/a".into(), kv(2, 2));
        assert!(
            append(&records, &final_kvs, &reference, "p/")[0]
                .summary
                .contains("more than once")
        );
    }
}
