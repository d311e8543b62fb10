//! Timestamps as the API writes them: RFC 3339 in UTC, to the second (`2026-11-24T10:00:00Z`).

use std::time::{Duration, SystemTime};

/// Now, formatted for a timestamp field.
pub fn now() -> String {
    format(SystemTime::now())
}

pub fn format(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Parses a timestamp field; `None` when it is empty or malformed.
pub fn parse(s: &str) -> Option<SystemTime> {
    if s.is_empty() {
        return None;
    }
    humantime::parse_rfc3339_weak(s).ok()
}

/// How long ago, as kubectl prints an AGE column: `45s`, `12m`, `3h20m`, `5d`.
pub fn age(since: &str, now: SystemTime) -> String {
    let Some(t) = parse(since) else {
        return "<unknown>".into();
    };
    human_duration(now.duration_since(t).unwrap_or(Duration::ZERO))
}

/// A short duration as kubectl prints it.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60).replace("m0s", "m"),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60).replace("h0m", "h"),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_round_trip() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = format(t);
        assert_eq!(s, "2023-11-14T22:13:20Z");
        assert_eq!(parse(&s), Some(t));
        assert_eq!(parse(""), None);
        assert_eq!(parse("yesterday"), None);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(Duration::from_secs(5)), "5s");
        assert_eq!(human_duration(Duration::from_secs(150)), "2m30s");
        assert_eq!(human_duration(Duration::from_secs(180)), "3m");
        assert_eq!(human_duration(Duration::from_secs(3600)), "60m");
        assert_eq!(human_duration(Duration::from_secs(4 * 3600 + 60)), "4h1m");
        assert_eq!(human_duration(Duration::from_secs(3 * 86_400)), "3d");
    }
}
