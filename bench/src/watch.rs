//! `watch-latency`: W watchers on one key prefix, one writer putting at a fixed rate. Every value
//! carries its put's number and send time; every watcher records the delivery latency of every
//! event and checks that it sees every put exactly once, in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::{
    PutRequest, WatchCreateRequest, WatchRequest, watch_request::RequestUnion,
};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::net::{channel, describe};
use crate::report::{Progress, Report, histogram, record};

const PREFIX: &[u8] = b"watchbench/";
/// The writer cycles over this many keys under the prefix.
const KEYS: u64 = 100;
/// How long the watches of one stream may take to be created.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// What to run.
pub struct WatchOpts {
    pub watchers: usize,
    pub puts: u64,
    /// Puts per second.
    pub rate: u64,
    pub value_size: usize,
    /// Watches multiplexed on one bidirectional stream (one connection each).
    pub per_stream: usize,
    /// How long watchers may take after the last put before missing events count as lost.
    pub grace: Duration,
}

/// What each put's value starts with; the rest is padding.
struct Payload {
    /// This run's random number: events of other runs are ignored.
    nonce: u64,
    /// The put's number, from 0.
    index: u64,
    /// Nanoseconds from the bench's start to the put's sending.
    sent_ns: u64,
}

impl Payload {
    const LEN: usize = 24;

    fn encode(&self, size: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(size.max(Self::LEN));
        v.extend_from_slice(&self.nonce.to_be_bytes());
        v.extend_from_slice(&self.index.to_be_bytes());
        v.extend_from_slice(&self.sent_ns.to_be_bytes());
        v.resize(size.max(Self::LEN), b'w');
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            Some(u64::from_be_bytes(
                v.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        Some(Self {
            nonce: word(0)?,
            index: word(1)?,
            sent_ns: word(2)?,
        })
    }
}

/// What the watchers of one stream saw.
struct Seen {
    /// Delivery latencies, µs.
    hist: Histogram<u64>,
    /// Puts a watcher never saw (a put seen late counts here and in `duplicates`).
    lost: u64,
    /// Events for a put the watcher had already seen or passed.
    duplicates: u64,
    /// In-sequence events whose revision was not above the previous one's.
    out_of_order: u64,
}

/// One watcher's place in the sequence of puts.
#[derive(Clone, Default)]
struct Watcher {
    /// The put expected next.
    next: u64,
    last_revision: i64,
}

impl Watcher {
    fn see(&mut self, index: u64, revision: i64, seen: &mut Seen) {
        if index < self.next {
            seen.duplicates += 1;
            return;
        }
        seen.lost += index - self.next;
        if revision <= self.last_revision {
            seen.out_of_order += 1;
        }
        self.next = index + 1;
        self.last_revision = revision;
    }
}

/// What a stream task needs.
struct StreamCtx {
    endpoint: String,
    watches: usize,
    start_revision: i64,
    puts: u64,
    nonce: u64,
    origin: Instant,
    /// Events delivered so far, over all streams (for the progress line).
    delivered: Arc<AtomicU64>,
    /// Set when the grace period after the last put is over.
    stop: watch::Receiver<bool>,
    /// Fired once every watch of the stream is created.
    ready: oneshot::Sender<()>,
}

/// Runs the watch-latency benchmark.
pub async fn latency(endpoints: &[String], opts: WatchOpts) -> anyhow::Result<Report> {
    let origin = Instant::now();
    let nonce: u64 = rand::random();
    let writer_ep = &endpoints[0];
    let mut kv = KvClient::new(channel(writer_ep, Some(Duration::from_secs(10)))?);
    // Watch from just after the current revision, so that every watcher expects the same events
    // however long its creation takes.
    let start_revision = kv
        .put(PutRequest {
            key: [PREFIX, b"start"].concat(),
            value: b"0".to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow!(describe(writer_ep, &s)))
        .context("the writer's first put")?
        .into_inner()
        .header
        .map_or(0, |h| h.revision)
        + 1;

    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut streams = Vec::new();
    let per_stream = opts.per_stream.max(1);
    let mut remaining = opts.watchers;
    while remaining > 0 {
        let watches = remaining.min(per_stream);
        remaining -= watches;
        let endpoint = endpoints[streams.len() % endpoints.len()].clone();
        let (ready, ready_rx) = oneshot::channel();
        let ctx = StreamCtx {
            endpoint: endpoint.clone(),
            watches,
            start_revision,
            puts: opts.puts,
            nonce,
            origin,
            delivered: delivered.clone(),
            stop: stop_rx.clone(),
            ready,
        };
        streams.push((endpoint, ready_rx, tokio::spawn(watch_stream(ctx))));
    }
    let mut handles = Vec::with_capacity(streams.len());
    for (endpoint, ready, handle) in streams {
        handles.push(wait_created(&endpoint, ready, handle).await?);
    }

    let sent = Arc::new(AtomicU64::new(0));
    let _progress = {
        let (sent, delivered) = (sent.clone(), delivered.clone());
        let (puts, expected) = (opts.puts, opts.puts * opts.watchers as u64);
        Progress::start("watch-latency", move |_| {
            let s = sent.load(Ordering::Relaxed);
            let d = delivered.load(Ordering::Relaxed);
            format!("{s}/{puts} puts, {d}/{expected} deliveries")
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for index in 0..opts.puts {
        tick.tick().await;
        let payload = Payload {
            nonce,
            index,
            sent_ns: origin.elapsed().as_nanos() as u64,
        };
        let req = PutRequest {
            key: [PREFIX, (index % KEYS).to_string().as_bytes()].concat(),
            value: payload.encode(opts.value_size),
            ..Default::default()
        };
        kv.put(req)
            .await
            .map_err(|s| anyhow!(describe(writer_ep, &s)))
            .with_context(|| format!("the writer's put number {index}"))?;
        sent.fetch_add(1, Ordering::Relaxed);
    }

    // Give the watchers the grace period, then stop those still waiting.
    let timer = tokio::spawn(async move {
        tokio::time::sleep(opts.grace).await;
        let _ = stop_tx.send(true);
    });
    let mut all = histogram();
    let (mut lost, mut duplicates, mut out_of_order) = (0, 0, 0);
    for h in handles {
        let seen = h.await.context("a watch stream task panicked")??;
        all.add(&seen.hist).context("merging histograms")?;
        lost += seen.lost;
        duplicates += seen.duplicates;
        out_of_order += seen.out_of_order;
    }
    timer.abort();
    Ok(Report::new("watch")
        .with("watchers", opts.watchers)
        .with("streams", opts.watchers.div_ceil(per_stream))
        .with("puts", opts.puts)
        .with("rate", opts.rate)
        .with("deliveries", all.len())
        .with("expected", opts.puts * opts.watchers as u64)
        .latencies(&all)
        .with("lost", lost)
        .with("duplicates", duplicates)
        .with("out_of_order", out_of_order))
}

/// Waits until a stream's watches are all created; on failure, the stream's own error.
async fn wait_created(
    endpoint: &str,
    ready: oneshot::Receiver<()>,
    handle: JoinHandle<anyhow::Result<Seen>>,
) -> anyhow::Result<JoinHandle<anyhow::Result<Seen>>> {
    match tokio::time::timeout(CREATE_TIMEOUT, ready).await {
        Ok(Ok(())) => Ok(handle),
        // The task ended before its watches were all created: it says why.
        Ok(Err(_)) => match handle.await.context("a watch stream task panicked")? {
            Err(e) => Err(e),
            Ok(_) => bail!("{endpoint}: the watch stream ended before its watches were created"),
        },
        Err(_) => {
            handle.abort();
            bail!(
                "{endpoint}: watches not created within {}s",
                CREATE_TIMEOUT.as_secs()
            )
        }
    }
}

/// One bidirectional stream carrying `ctx.watches` watches on the prefix.
async fn watch_stream(ctx: StreamCtx) -> anyhow::Result<Seen> {
    let ep = ctx.endpoint.as_str();
    let n = ctx.watches;
    // Queue the creations before opening: the stream's response headers may only come with its
    // first message.
    let (tx, rx) = mpsc::channel(n + 1);
    let mut range_end = PREFIX.to_vec();
    *range_end.last_mut().expect("non-empty prefix") += 1;
    for id in 1..=n {
        let create = WatchCreateRequest {
            key: PREFIX.to_vec(),
            range_end: range_end.clone(),
            start_revision: ctx.start_revision,
            watch_id: id as i64,
            ..Default::default()
        };
        tx.send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(create)),
        })
        .await
        .context("queueing watch creations")?;
    }
    let mut stream = WatchClient::new(channel(ep, None)?)
        .watch(ReceiverStream::new(rx))
        .await
        .map_err(|s| anyhow!(describe(ep, &s)))
        .context("opening a watch stream")?
        .into_inner();

    let mut seen = Seen {
        hist: histogram(),
        lost: 0,
        duplicates: 0,
        out_of_order: 0,
    };
    let mut watchers = vec![Watcher::default(); n];
    let (mut created, mut complete) = (0, 0);
    let mut ready = Some(ctx.ready);
    let mut stop = ctx.stop;
    while complete < n {
        let msg = tokio::select! {
            m = stream.message() => m.map_err(|s| anyhow!(describe(ep, &s)))?,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let now = ctx.origin.elapsed().as_nanos() as u64;
        let Some(r) = msg else {
            bail!("{ep}: the watch stream closed early");
        };
        if r.canceled {
            bail!(
                "{ep}: watch {} canceled: {:?} (compact revision {})",
                r.watch_id,
                r.cancel_reason,
                r.compact_revision
            );
        }
        if r.created {
            created += 1;
            if created == n {
                ready.take().map(|t| t.send(()));
            }
        }
        let Some(w) = (r.watch_id as usize)
            .checked_sub(1)
            .and_then(|i| watchers.get_mut(i))
        else {
            continue;
        };
        for kv in r.events.iter().filter_map(|e| e.kv.as_ref()) {
            let Some(p) = Payload::decode(&kv.value).filter(|p| p.nonce == ctx.nonce) else {
                continue;
            };
            record(
                &mut seen.hist,
                Duration::from_nanos(now.saturating_sub(p.sent_ns)),
            );
            ctx.delivered.fetch_add(1, Ordering::Relaxed);
            let was_complete = w.next >= ctx.puts;
            w.see(p.index, kv.mod_revision, &mut seen);
            if !was_complete && w.next >= ctx.puts {
                complete += 1;
            }
        }
    }
    seen.lost += watchers
        .iter()
        .map(|w| ctx.puts.saturating_sub(w.next))
        .sum::<u64>();
    drop(tx);
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Seen {
        Seen {
            hist: histogram(),
            lost: 0,
            duplicates: 0,
            out_of_order: 0,
        }
    }

    #[test]
    fn payload_round_trips_and_pads() {
        let p = Payload {
            nonce: 7,
            index: 42,
            sent_ns: 123_456_789,
        };
        let v = p.encode(256);
        assert_eq!(v.len(), 256);
        let q = Payload::decode(&v).expect("decodes");
        assert_eq!((q.nonce, q.index, q.sent_ns), (7, 42, 123_456_789));
        assert_eq!(p.encode(3).len(), Payload::LEN);
        assert!(Payload::decode(b"short").is_none());
    }

    #[test]
    fn a_watcher_counts_gaps_duplicates_and_reordering() {
        let (mut w, mut s) = (Watcher::default(), seen());
        for (index, rev) in [(0, 10), (1, 11), (2, 12)] {
            w.see(index, rev, &mut s);
        }
        assert_eq!((s.lost, s.duplicates, s.out_of_order), (0, 0, 0));
        w.see(2, 12, &mut s); // the same event again
        assert_eq!(s.duplicates, 1);
        w.see(5, 15, &mut s); // 3 and 4 skipped
        assert_eq!(s.lost, 2);
        w.see(6, 14, &mut s); // a later put with an earlier revision
        assert_eq!(s.out_of_order, 1);
        assert_eq!(w.next, 7);
    }
}
