//! Watch delivery latency: W watchers on one prefix, one writer at a fixed rate; every value
//! carries its send time, every watcher checks it sees every revision exactly once, in order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    PutRequest, WatchCreateRequest, WatchRequest, watch_request::RequestUnion,
};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Report, channel};

/// Watches multiplexed on one stream.
const WATCHES_PER_STREAM: usize = 100;
const PREFIX: &str = "watchbench/";

pub async fn latency(
    endpoints: &[String],
    watchers: usize,
    puts: u64,
    rate: u64,
) -> anyhow::Result<Report> {
    let origin = Arc::new(Instant::now());
    let mut kv = KvClient::new(channel(&endpoints[0], Some(Duration::from_secs(10)))?);
    // Start after the current revision so every watcher expects the same events.
    let start_rev = kv
        .put(PutRequest {
            key: format!("{PREFIX}start").into_bytes(),
            value: b"0".to_vec(),
            ..Default::default()
        })
        .await
        .context("the first put")?
        .into_inner()
        .header
        .map_or(0, |h| h.revision)
        + 1;
    let mut streams = Vec::new();
    let mut remaining = watchers;
    let mut s = 0;
    while remaining > 0 {
        let n = remaining.min(WATCHES_PER_STREAM);
        remaining -= n;
        let ep = &endpoints[s % endpoints.len()];
        s += 1;
        streams.push(tokio::spawn(watch_stream(
            channel(ep, None)?,
            n,
            start_rev,
            puts,
            origin.clone(),
        )));
    }
    // Wait until every stream has all its watches created.
    let mut ready = Vec::new();
    for st in streams {
        ready.push(st);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut tick = tokio::time::interval(interval);
    for i in 0..puts {
        tick.tick().await;
        let sent = origin.elapsed().as_nanos() as u64;
        let mut value = sent.to_be_bytes().to_vec();
        value.resize(256, 0);
        kv.put(PutRequest {
            key: format!("{PREFIX}{}", i % 100).into_bytes(),
            value,
            ..Default::default()
        })
        .await
        .with_context(|| format!("put {i}"))?;
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut lost, mut dup) = (0u64, 0u64);
    for st in ready {
        let (h, l, d) = tokio::time::timeout(Duration::from_secs(60), st)
            .await
            .context("watchers did not finish")???;
        all.add(&h)?;
        lost += l;
        dup += d;
    }
    Ok(Report::new()
        .with("bench", "watch")
        .with("watchers", watchers)
        .with("deliveries", all.len())
        .with("p50_ms", all.value_at_quantile(0.5) as f64 / 1000.0)
        .with("p99_ms", all.value_at_quantile(0.99) as f64 / 1000.0)
        .with("max_ms", all.max() as f64 / 1000.0)
        .with("lost", lost)
        .with("duplicates", dup))
}

/// One bidi stream with `n` watches; returns latencies (µs), lost and duplicate counts.
async fn watch_stream(
    ch: tonic::transport::Channel,
    n: usize,
    start_rev: i64,
    puts: u64,
    origin: Arc<Instant>,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    let (tx, rx) = mpsc::channel(n + 1);
    // Queue the creations first: etcd sends response headers only with its first message.
    let mut end = PREFIX.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    for id in 0..n {
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: PREFIX.as_bytes().to_vec(),
                range_end: end.clone(),
                start_revision: start_rev,
                watch_id: id as i64 + 1,
                ..Default::default()
            })),
        })
        .await?;
    }
    let mut stream = WatchClient::new(ch)
        .watch(ReceiverStream::new(rx))
        .await
        .context("opening a watch stream")?
        .into_inner();
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut next = vec![start_rev; n];
    let (mut dup, mut lost) = (0u64, 0u64);
    let last = start_rev + puts as i64 - 1;
    while next.iter().any(|r| *r <= last) {
        let Some(r) = stream.message().await? else {
            bail!("watch stream closed early");
        };
        if std::env::var_os("BENCH_DEBUG").is_some() {
            eprintln!(
                "watch response: id={} created={} canceled={} events={}",
                r.watch_id,
                r.created,
                r.canceled,
                r.events.len()
            );
        }
        if r.canceled {
            bail!("watch {} canceled: {}", r.watch_id, r.cancel_reason);
        }
        let Some(slot) = (r.watch_id as usize).checked_sub(1).filter(|s| *s < n) else {
            continue;
        };
        let now = origin.elapsed().as_nanos() as u64;
        for e in r.events {
            let Some(kv) = e.kv else { continue };
            let rev = kv.mod_revision;
            if rev < next[slot] {
                dup += 1;
                continue;
            }
            lost += (rev - next[slot]) as u64;
            next[slot] = rev + 1;
            if kv.value.len() >= 8 {
                let sent = u64::from_be_bytes(kv.value[..8].try_into().expect("8 bytes"));
                let _ = h.record((now.saturating_sub(sent) / 1000).max(1));
            }
        }
    }
    drop(tx);
    Ok((h, lost, dup))
}
