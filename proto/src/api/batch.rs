//! What the API server, the Job and CronJob controllers and the command line share: the
//! labels a Job's pods carry, the ranges of `status.completedIndexes`, and CronJob
//! schedules ([`Schedule`]).

use std::collections::BTreeSet;
use std::time::SystemTime;

use chrono::{DateTime, TimeZone as _, Utc};

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

/// The annotation on a CronJob's Job naming the time it was scheduled for.
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

/// Kubernetes' cron descriptors and what they stand for.
const DESCRIPTORS: &[(&str, &str)] = &[
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

/// A CronJob's schedule, read in its time zone.
#[derive(Clone, Debug)]
pub struct Schedule {
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

impl Schedule {
    /// Parses `schedule` (five fields, Vixie cron's syntax as Kubernetes reads it: names of
    /// months and days, ranges, lists, steps; a restricted day of month and day of week
    /// match either) in `time_zone` (IANA name; none: UTC). The error says what is wrong in
    /// words a user can act on.
    pub fn parse(schedule: &str, time_zone: Option<&str>) -> Result<Self, String> {
        let zone = match time_zone {
            None => chrono_tz::UTC,
            Some(name) => name
                .parse::<chrono_tz::Tz>()
                .map_err(|_| format!("unknown time zone {name:?}"))?,
        };
        let text = schedule.trim();
        if text.is_empty() {
            return Err("Required value".into());
        }
        if text.contains("TZ=") {
            return Err("cannot use TZ or CRON_TZ in schedule, use timeZone field instead".into());
        }
        let expanded = if text.starts_with('@') {
            DESCRIPTORS
                .iter()
                .find(|(d, _)| d.eq_ignore_ascii_case(text))
                .map(|(_, e)| *e)
                .ok_or_else(|| {
                    format!(
                        "unknown descriptor {text:?}: use five fields or one of {}",
                        DESCRIPTORS
                            .iter()
                            .map(|(d, _)| *d)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
        } else {
            text
        };
        let fields = expanded.split_whitespace().count();
        if fields != 5 {
            return Err(format!(
                "expected exactly 5 fields (minute hour day-of-month month day-of-week), found {fields}"
            ));
        }
        // croner also reads Quartz's L, W, # and +, which Kubernetes refuses: so does this.
        let mut bare = expanded.to_ascii_uppercase();
        for name in [
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
            "SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT",
        ] {
            bare = bare.replace(name, "0");
        }
        if let Some(c) = bare.chars().find(|c| matches!(c, 'L' | 'W' | '#' | '+')) {
            return Err(format!(
                "unsupported character {c:?}: Kubernetes' cron syntax has no L, W, # or +"
            ));
        }
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Disallowed)
            .year(croner::parser::Year::Disallowed)
            .build()
            .parse(expanded)
            .map_err(|e| e.to_string())?;
        Ok(Self { cron, zone })
    }

    /// The first time the schedule names strictly after `t`, if any within croner's range.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        let utc: DateTime<Utc> = t.into();
        let local = self.zone.from_utc_datetime(&utc.naive_utc());
        let next = self.cron.find_next_occurrence(&local, false).ok()?;
        Some(SystemTime::from(next.with_timezone(&Utc)))
    }

    /// The latest time the schedule names in `(after, until]`, and how many it names
    /// there, counting at most `cap` (Kubernetes gives up counting missed runs at 100).
    pub fn latest_between(
        &self,
        after: SystemTime,
        until: SystemTime,
        cap: usize,
    ) -> (Option<SystemTime>, usize) {
        let mut latest = None;
        let mut count = 0;
        let mut t = after;
        while let Some(next) = self.next_after(t) {
            if next > until {
                break;
            }
            latest = Some(next);
            count += 1;
            if count >= cap {
                // Too many to walk: the latest is the last one at or before `until`.
                latest = self
                    .previous_at_or_before(until)
                    .filter(|p| *p > after)
                    .or(latest);
                break;
            }
            t = next;
        }
        (latest, count)
    }

    fn previous_at_or_before(&self, t: SystemTime) -> Option<SystemTime> {
        let utc: DateTime<Utc> = t.into();
        let local = self.zone.from_utc_datetime(&utc.naive_utc());
        let prev = self.cron.find_previous_occurrence(&local, true).ok()?;
        Some(SystemTime::from(prev.with_timezone(&Utc)))
    }
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

    fn at(s: &str) -> SystemTime {
        crate::api::time::parse(s).expect("a time")
    }

    #[test]
    fn schedules_name_the_times_kubernetes_would() {
        let every_5 = Schedule::parse("*/5 * * * *", None).unwrap();
        assert_eq!(
            every_5.next_after(at("2026-01-01T10:02:30Z")),
            Some(at("2026-01-01T10:05:00Z"))
        );
        // Strictly after: a time on the schedule gives the next one.
        assert_eq!(
            every_5.next_after(at("2026-01-01T10:05:00Z")),
            Some(at("2026-01-01T10:10:00Z"))
        );
        // Day of month OR day of week when both are restricted (Vixie cron).
        let either = Schedule::parse("0 12 13 * FRI", None).unwrap();
        assert_eq!(
            either.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-02T12:00:00Z")),
            "2026-01-02 is a Friday"
        );
        let hourly = Schedule::parse("@hourly", None).unwrap();
        assert_eq!(
            hourly.next_after(at("2026-01-01T10:59:59Z")),
            Some(at("2026-01-01T11:00:00Z"))
        );
        // In a time zone: 09:00 in Berlin is 08:00 UTC in winter and 07:00 in summer.
        let berlin = Schedule::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            berlin.next_after(at("2026-01-10T00:00:00Z")),
            Some(at("2026-01-10T08:00:00Z"))
        );
        assert_eq!(
            berlin.next_after(at("2026-07-10T00:00:00Z")),
            Some(at("2026-07-10T07:00:00Z"))
        );
    }

    #[test]
    fn missed_runs_are_counted_and_the_latest_found() {
        let minutely = Schedule::parse("* * * * *", None).unwrap();
        let (latest, n) =
            minutely.latest_between(at("2026-01-01T10:00:00Z"), at("2026-01-01T10:03:30Z"), 100);
        assert_eq!((latest, n), (Some(at("2026-01-01T10:03:00Z")), 3));
        let (latest, n) =
            minutely.latest_between(at("2026-01-01T10:00:00Z"), at("2026-01-02T10:00:30Z"), 100);
        assert_eq!((latest, n), (Some(at("2026-01-02T10:00:00Z")), 100));
        let (latest, n) =
            minutely.latest_between(at("2026-01-01T10:00:00Z"), at("2026-01-01T10:00:59Z"), 100);
        assert_eq!((latest, n), (None, 0));
    }

    #[test]
    fn bad_schedules_say_what_is_wrong() {
        for (schedule, zone, want) in [
            ("", None, "Required value"),
            ("* * * *", None, "expected exactly 5 fields"),
            ("0 * * * * *", None, "expected exactly 5 fields"),
            ("CRON_TZ=UTC 0 * * * *", None, "use timeZone field instead"),
            ("0 0 L * *", None, "unsupported character 'L'"),
            ("0 0 * * 5#2", None, "unsupported character '#'"),
            ("@every 5m", None, "unknown descriptor"),
            // croner's own words for a value out of range: only the refusal is checked.
            ("61 * * * *", None, ""),
            (
                "* * * * *",
                Some("Mars/Olympus"),
                "unknown time zone \"Mars/Olympus\"",
            ),
        ] {
            let e = Schedule::parse(schedule, zone).expect_err(schedule);
            assert!(want.is_empty() || e.contains(want), "{schedule}: {e}");
        }
        // Names of months and days are fine, JUL and WED included.
        Schedule::parse("0 0 * JUL WED", None).unwrap();
    }
}
