//! Put and range load, the fill for disk figures, and the unavailability writer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
use hdrhistogram::Histogram;
use rand::Rng;
use tonic::transport::Channel;

use crate::{Report, channel};

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// `conns` channels spread round-robin over the endpoints.
fn channels(endpoints: &[String], conns: usize) -> anyhow::Result<Vec<Channel>> {
    (0..conns.max(1))
        .map(|i| {
            channel(
                &endpoints[i % endpoints.len()],
                Some(Duration::from_secs(10)),
            )
        })
        .collect()
}

pub fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

/// Prints a progress line to stderr every second while `done` grows towards `total`.
fn progress(what: &'static str, done: Arc<AtomicU64>, total: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let n = done.load(Ordering::Relaxed);
            if n >= total {
                return;
            }
            eprintln!(
                "{what}: {n}/{total} ({:.0}/s)",
                n as f64 / start.elapsed().as_secs_f64()
            );
        }
    })
}

/// Runs `total` operations from `clients` concurrent clients; `op(client, i)` does one.
async fn run_clients<F, Fut>(
    what: &'static str,
    endpoints: &[String],
    clients: usize,
    conns: usize,
    total: u64,
    op: F,
) -> anyhow::Result<(Histogram<u64>, u64, f64)>
where
    F: Fn(KvClient<Channel>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let chans = channels(endpoints, conns.min(clients.max(1)))?;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let reporter = progress(what, done.clone(), total);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients.max(1) {
        let kv = KvClient::new(chans[c % chans.len()].clone())
            .max_decoding_message_size(64 * 1024 * 1024);
        let (next, done, errors, op) = (next.clone(), done.clone(), errors.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                match op(kv.clone(), i).await {
                    Ok(()) => {
                        let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                    }
                    Err(s) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(s);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            (h, first_error)
        }));
    }
    let mut all = histogram();
    for t in tasks {
        let (h, err) = t.await.context("a client task panicked")?;
        all.add(&h).context("merging histograms")?;
        if let Some(e) = err {
            eprintln!("{what}: error: {} ({:?})", e.message(), e.code());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    reporter.abort();
    Ok((all, errors.load(Ordering::Relaxed), secs))
}

/// Which key each put writes.
#[derive(Clone, Copy)]
enum Keys {
    /// A random key among this many.
    Random(u64),
    /// Operation `i` writes key `i % n`: every key is rewritten in turn.
    Cycle(u64),
}

/// `total` puts of `value_size`-byte values from `clients` concurrent clients.
async fn puts(
    what: &'static str,
    endpoints: &[String],
    clients: usize,
    conns: usize,
    total: u64,
    keys: Keys,
    value_size: usize,
) -> anyhow::Result<(Histogram<u64>, u64, f64)> {
    let value = Arc::new(vec![b'v'; value_size]);
    run_clients(what, endpoints, clients, conns, total, move |mut kv, i| {
        let value = value.clone();
        async move {
            let k = match keys {
                Keys::Random(n) => rand::rng().random_range(0..n.max(1)),
                Keys::Cycle(n) => i % n.max(1),
            };
            kv.put(PutRequest {
                key: key(k),
                value: value.to_vec(),
                ..Default::default()
            })
            .await
            .map(|_| ())
        }
    })
    .await
}

pub async fn put(
    endpoints: &[String],
    clients: usize,
    conns: usize,
    total: u64,
    key_space: u64,
    value_size: usize,
) -> anyhow::Result<Report> {
    let keys = Keys::Random(key_space);
    let (h, errors, secs) = puts("put", endpoints, clients, conns, total, keys, value_size).await?;
    Ok(Report::new()
        .with("bench", "put")
        .with("clients", clients)
        .with("value_size", value_size)
        .latencies(&h, secs)
        .with("errors", errors))
}

pub async fn range(
    endpoints: &[String],
    clients: usize,
    conns: usize,
    total: u64,
    key_space: u64,
    serializable: bool,
) -> anyhow::Result<Report> {
    let (h, errors, secs) = run_clients(
        "range",
        endpoints,
        clients,
        conns,
        total,
        move |mut kv, _| async move {
            let k = rand::rng().random_range(0..key_space.max(1));
            kv.range(RangeRequest {
                key: key(k),
                serializable,
                ..Default::default()
            })
            .await
            .map(|_| ())
        },
    )
    .await?;
    Ok(Report::new()
        .with("bench", if serializable { "range-s" } else { "range-l" })
        .with("clients", clients)
        .latencies(&h, secs)
        .with("errors", errors))
}

pub async fn fill(
    endpoints: &[String],
    keys: u64,
    total: u64,
    value_size: usize,
    clients: usize,
) -> anyhow::Result<Report> {
    let cycle = Keys::Cycle(keys);
    let (h, errors, secs) = puts("fill", endpoints, clients, 16, total, cycle, value_size).await?;
    Ok(Report::new()
        .with("bench", "fill")
        .with("keys", keys)
        .with("value_size", value_size)
        .latencies(&h, secs)
        .with("errors", errors))
}

/// One writer, sequential puts, moving to the next endpoint on any error; reports the longest
/// time between two acknowledged puts.
pub async fn unavailability(
    endpoints: &[String],
    duration: u64,
    timeout_ms: u64,
) -> anyhow::Result<Report> {
    let timeout = Duration::from_millis(timeout_ms);
    let mut clients: Vec<KvClient<Channel>> = endpoints
        .iter()
        .map(|e| channel(e, Some(timeout)).map(KvClient::new))
        .collect::<anyhow::Result<_>>()?;
    let start = Instant::now();
    let end = start + Duration::from_secs(duration);
    let mut last_ack = Instant::now();
    let mut max_gap = Duration::ZERO;
    let mut gap_at = 0.0;
    let (mut acked, mut failed, mut current) = (0u64, 0u64, 0usize);
    while Instant::now() < end {
        let req = PutRequest {
            key: key(acked % 1000),
            value: vec![b'u'; 256],
            ..Default::default()
        };
        let t = Instant::now();
        let r = tokio::time::timeout(timeout, clients[current].put(req)).await;
        match r {
            Ok(Ok(_)) => {
                let now = Instant::now();
                let gap = now - last_ack;
                if gap > max_gap {
                    max_gap = gap;
                    gap_at = (t - start).as_secs_f64();
                }
                last_ack = now;
                acked += 1;
            }
            _ => {
                failed += 1;
                current = (current + 1) % clients.len();
            }
        }
        let _ = &mut clients;
    }
    Ok(Report::new()
        .with("bench", "unavailability")
        .with("max_gap_ms", max_gap.as_millis() as u64)
        .with("gap_at_s", (gap_at * 10.0).round() / 10.0)
        .with("acked", acked)
        .with("failed", failed))
}
