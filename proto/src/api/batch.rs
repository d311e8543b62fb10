//! What the API server, the Job controller and the command line share about Jobs: the
//! labels a Job's pods carry and the ranges of `status.completedIndexes`.

use std::collections::BTreeSet;

/// The label (and, on an auto-generated selector, the selector) naming the Job's uid.
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";
/// Kubernetes' older spelling of [`CONTROLLER_UID_LABEL`], still set for tools that read it.
pub const LEGACY_CONTROLLER_UID_LABEL: &str = "controller-uid";
pub const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";
pub const LEGACY_JOB_NAME_LABEL: &str = "job-name";
/// An Indexed Job's pod's index: an annotation and a label.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// The environment variable holding an Indexed Job's pod's index.
pub const COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

/// Most completions (and pods at once) an Indexed Job may ask for, as Kubernetes.
pub const MAX_INDEXED_COMPLETIONS: i32 = 100_000;

/// `{0, 1, 2, 5}` → `"0-2,5"`.
pub fn format_indexes(indexes: &BTreeSet<i32>) -> String {
    let mut out = String::new();
    let mut it = indexes.iter().copied().peekable();
    while let Some(first) = it.next() {
        let mut last = first;
        while it.peek() == Some(&(last + 1)) {
            last += 1;
            it.next();
        }
        if !out.is_empty() {
            out.push(',');
        }
        if last == first {
            out.push_str(&first.to_string());
        } else {
            out.push_str(&format!("{first}-{last}"));
        }
    }
    out
}

/// `"0-2,5"` → `{0, 1, 2, 5}`; what does not parse is skipped, and ranges past `limit` are
/// cut there.
pub fn parse_indexes(s: &str, limit: i32) -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<i32>(), b.trim().parse::<i32>()) {
            out.extend((a.max(0)..=b.min(limit - 1)).take(limit.max(0) as usize));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_written_as_kubernetes_ranges_and_read_back() {
        let set: BTreeSet<i32> = [0, 1, 2, 5, 7, 8].into();
        assert_eq!(format_indexes(&set), "0-2,5,7-8");
        assert_eq!(parse_indexes("0-2,5,7-8", 100), set);
        assert_eq!(format_indexes(&BTreeSet::new()), "");
        assert_eq!(parse_indexes("", 10), BTreeSet::new());
        assert_eq!(parse_indexes("3-9", 5), [3, 4].into());
        assert_eq!(parse_indexes("x,1", 5), [1].into());
    }
}
