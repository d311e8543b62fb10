//! Results (one line each, human or JSON), latency histograms and progress lines.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A latency histogram in microseconds: 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` in a histogram of microseconds (clamped into its range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Milliseconds, rounded to the microsecond.
fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// One result: named figures in a fixed order, first among them `bench`.
pub struct Report {
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl Report {
    pub fn new(bench: &str) -> Self {
        Self {
            fields: vec![("bench", bench.into())],
        }
    }

    pub fn with(mut self, name: &'static str, v: impl Into<serde_json::Value>) -> Self {
        self.fields.push((name, v.into()));
        self
    }

    /// Adds the operation count, duration and throughput over `secs`, and p50/p90/p99/max
    /// latencies in milliseconds from a histogram of microseconds.
    pub fn throughput(self, h: &Histogram<u64>, secs: f64) -> Self {
        let ops = h.len();
        self.with("ops", ops)
            .with("secs", (secs * 1000.0).round() / 1000.0)
            .with("throughput", (ops as f64 / secs.max(1e-9)).round() as u64)
            .latencies(h)
    }

    /// Adds p50/p90/p99/max latencies in milliseconds from a histogram of microseconds.
    pub fn latencies(self, h: &Histogram<u64>) -> Self {
        self.with("p50_ms", ms(h.value_at_quantile(0.5)))
            .with("p90_ms", ms(h.value_at_quantile(0.9)))
            .with("p99_ms", ms(h.value_at_quantile(0.99)))
            .with("max_ms", ms(h.max()))
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        serde_json::Value::Object(map).to_string()
    }

    /// `bench: name=value name=value ...`
    pub fn human(&self) -> String {
        let mut fields = self.fields.iter();
        let mut s = match fields.next() {
            Some((_, serde_json::Value::String(b))) => format!("{b}:"),
            _ => String::from("result:"),
        };
        for (k, v) in fields {
            match v {
                serde_json::Value::String(t) => s.push_str(&format!(" {k}={t}")),
                _ => s.push_str(&format!(" {k}={v}")),
            }
        }
        s
    }
}

/// Prints `line()` to stderr once a second, starting after two seconds (short runs stay
/// quiet), until dropped.
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(what: &'static str, line: impl Fn(Duration) -> String + Send + 'static) -> Self {
        let start = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            tick.tick().await;
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                eprintln!("{what} [{:.0}s] {}", elapsed.as_secs_f64(), line(elapsed));
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_prints_as_one_line_or_one_json_object() {
        let mut h = histogram();
        for us in [1_000, 2_000, 3_000, 4_000] {
            h.record(us).expect("in range");
        }
        let r = Report::new("put")
            .with("clients", 4)
            .throughput(&h, 2.0)
            .with("note", "x");
        assert!(
            r.human()
                .starts_with("put: clients=4 ops=4 secs=2.0 throughput=2 p50_ms=2.0"),
            "{}",
            r.human()
        );
        assert!(r.human().ends_with("note=x"));
        let v: serde_json::Value = serde_json::from_str(&r.json()).expect("valid JSON");
        assert_eq!(v["bench"], "put");
        assert_eq!(v["throughput"], 2);
        let max = v["max_ms"].as_f64().expect("a number");
        assert!((max - 4.0).abs() < 0.01, "{max}");
    }
}
