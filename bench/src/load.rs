//! Closed-loop load: N clients, each doing one request after another (puts, ranges, the fill
//! for disk and memory figures), spread round-robin over the endpoints.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest};
use hdrhistogram::Histogram;
use rand::Rng;
use tonic::transport::Channel;

use crate::net::{channel, describe};
use crate::report::{Progress, Report, histogram, record};

/// Per-request timeout of the load clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client's pause after a failed request.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// How many distinct request errors are printed to stderr.
const ERRORS_SHOWN: usize = 5;

/// When a load run stops.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// After this many requests in all.
    Total(u64),
    /// After this long (requests in flight then still complete and count).
    Duration(Duration),
}

/// How many clients, over how many connections, for how long.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub clients: usize,
    /// gRPC connections in all (rounded up to a multiple of the endpoint count).
    pub conns: usize,
    pub limit: Limit,
}

/// The key of number `i`: `bench/00000042`.
pub fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:08}").into_bytes()
}

/// What one request found.
enum Found {
    /// It did what it meant to (a put applied, a range found its key).
    Hit,
    /// A range found no key: the key space was not filled.
    Miss,
}

/// What a load run measured.
struct Outcome {
    /// Latencies of successful requests, µs.
    hist: Histogram<u64>,
    misses: u64,
    errors: u64,
    secs: f64,
    conns: usize,
}

/// Client number `c`'s connection: clients go round-robin over the endpoints, and within one
/// endpoint round-robin over its connections.
struct Pool {
    /// `per_endpoint[e]` are the connections to `endpoints[e]`.
    per_endpoint: Vec<Vec<Channel>>,
    endpoints: Vec<String>,
}

impl Pool {
    fn new(endpoints: &[String], conns: usize) -> anyhow::Result<Self> {
        let per = conns.div_ceil(endpoints.len()).max(1);
        let per_endpoint = endpoints
            .iter()
            .map(|e| {
                (0..per)
                    .map(|_| channel(e, Some(REQUEST_TIMEOUT)))
                    .collect()
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            per_endpoint,
            endpoints: endpoints.to_vec(),
        })
    }

    fn conns(&self) -> usize {
        self.per_endpoint.iter().map(Vec::len).sum()
    }

    /// The endpoint and a KV client for client `c`.
    fn client(&self, c: usize) -> (String, KvClient<Channel>) {
        let e = c % self.endpoints.len();
        let chans = &self.per_endpoint[e];
        let ch = chans[(c / self.endpoints.len()) % chans.len()].clone();
        (self.endpoints[e].clone(), KvClient::new(ch))
    }

    /// What client `c` sends to: its own endpoint, or, when there are fewer clients than
    /// endpoints, every endpoint in turn from its own on. One client pinned to one member would
    /// measure whichever role (leader or follower) that member happens to have; turning
    /// through them averages over the roles, as etcd's round-robin client balancer does.
    fn targets(&self, c: usize, clients: usize) -> Vec<(String, KvClient<Channel>)> {
        if clients >= self.endpoints.len() {
            return vec![self.client(c)];
        }
        (0..self.endpoints.len())
            .map(|k| self.client(c + k))
            .collect()
    }
}

/// Counters the clients share.
#[derive(Default)]
struct Shared {
    /// Requests claimed (a client claims one before sending it).
    claimed: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
}

/// When the clients stop claiming requests.
#[derive(Clone, Copy)]
enum Stop {
    After(u64),
    At(Instant),
}

impl Shared {
    /// Claims the next request number, if the run is not over.
    fn claim(&self, stop: Stop) -> Option<u64> {
        let i = self.claimed.fetch_add(1, Ordering::Relaxed);
        let more = match stop {
            Stop::After(total) => i < total,
            Stop::At(deadline) => Instant::now() < deadline,
        };
        more.then_some(i)
    }
}

/// Runs the load: each client calls `op(kv, i)` for request number `i`, one after another.
///
/// Fails only when not a single request succeeded (with the first error, naming its endpoint);
/// otherwise errors are counted and the first few printed to stderr.
async fn run_clients<F, Fut>(
    what: &'static str,
    endpoints: &[String],
    load: Load,
    op: F,
) -> anyhow::Result<Outcome>
where
    F: Fn(KvClient<Channel>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<Found, tonic::Status>> + Send,
{
    let clients = load.clients.max(1);
    let pool = Pool::new(endpoints, load.conns.clamp(1, clients))?;
    let shared = Arc::new(Shared::default());
    let _progress = {
        let shared = shared.clone();
        let of = match load.limit {
            Limit::Total(t) => format!("/{t} requests"),
            Limit::Duration(d) => format!(" requests (of {}s)", d.as_secs()),
        };
        Progress::start(what, move |elapsed| {
            let n = shared.done.load(Ordering::Relaxed);
            let errors = shared.errors.load(Ordering::Relaxed);
            let rate = n as f64 / elapsed.as_secs_f64();
            format!("{n}{of}, {rate:.0}/s, {errors} errors")
        })
    };
    let start = Instant::now();
    let stop = match load.limit {
        Limit::Total(total) => Stop::After(total),
        Limit::Duration(d) => Stop::At(start + d),
    };
    let mut tasks = Vec::with_capacity(clients);
    for c in 0..clients {
        let targets = pool.targets(c, clients);
        let (shared, op) = (shared.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut misses, mut first_error) = (0u64, None);
            let mut sent = 0usize;
            while let Some(i) = shared.claim(stop) {
                let (endpoint, kv) = &targets[sent % targets.len()];
                sent += 1;
                let t = Instant::now();
                match op(kv.clone(), i).await {
                    Ok(found) => {
                        record(&mut h, t.elapsed());
                        if let Found::Miss = found {
                            misses += 1;
                        }
                    }
                    Err(s) => {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert_with(|| describe(endpoint, &s));
                        // No hot loop against an endpoint that refuses at once.
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
            (h, misses, first_error)
        }));
    }
    let mut hist = histogram();
    let mut misses = 0;
    let mut first_errors: Vec<String> = Vec::new();
    for t in tasks {
        let (h, m, err) = t.await.context("a client task panicked")?;
        hist.add(&h).context("merging histograms")?;
        misses += m;
        if let Some(e) = err.filter(|e| !first_errors.contains(e)) {
            first_errors.push(e);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let errors = shared.errors.load(Ordering::Relaxed);
    if hist.is_empty() {
        match first_errors.first() {
            Some(e) => anyhow::bail!("{what}: all {errors} requests failed; first error: {e}"),
            None => anyhow::bail!("{what}: no request was made"),
        }
    }
    for e in first_errors.iter().take(ERRORS_SHOWN) {
        eprintln!("{what}: error: {e}");
    }
    Ok(Outcome {
        hist,
        misses,
        errors,
        secs,
        // Channels connect lazily: those no client uses never open (a client alone uses one
        // per endpoint, see `Pool::targets`).
        conns: pool.conns().min(clients.max(endpoints.len())),
    })
}

/// Which key each put writes.
#[derive(Clone, Copy)]
enum Keys {
    /// A random key among this many.
    Random(u64),
    /// Request `i` writes key `i % n`: every key is written in turn.
    Cycle(u64),
}

/// Puts of `value_size`-byte values.
async fn puts(
    what: &'static str,
    endpoints: &[String],
    load: Load,
    keys: Keys,
    value_size: usize,
) -> anyhow::Result<Outcome> {
    let value: Arc<[u8]> = vec![b'v'; value_size].into();
    run_clients(what, endpoints, load, move |mut kv, i| {
        let value = value.clone();
        async move {
            let k = match keys {
                Keys::Random(n) => rand::rng().random_range(0..n.max(1)),
                Keys::Cycle(n) => i % n.max(1),
            };
            let req = PutRequest {
                key: key(k),
                value: value.to_vec(),
                ..Default::default()
            };
            kv.put(req).await.map(|_| Found::Hit)
        }
    })
    .await
}

/// `put`: puts to random keys among `key_space`.
pub async fn put(
    endpoints: &[String],
    load: Load,
    key_space: u64,
    value_size: usize,
) -> anyhow::Result<Report> {
    let o = puts("put", endpoints, load, Keys::Random(key_space), value_size).await?;
    Ok(Report::new("put")
        .with("clients", load.clients)
        .with("conns", o.conns)
        .with("key_space", key_space)
        .with("value_size", value_size)
        .throughput(&o.hist, o.secs)
        .with("errors", o.errors))
}

/// `range`: single-key ranges of random keys among `key_space`. `misses` counts ranges that
/// found no key (the key space was not filled: run `put` or `fill` first, or `--prefill`).
pub async fn range(
    endpoints: &[String],
    load: Load,
    key_space: u64,
    serializable: bool,
) -> anyhow::Result<Report> {
    let what = if serializable { "range-s" } else { "range-l" };
    let o = run_clients(what, endpoints, load, move |mut kv, _| async move {
        let req = RangeRequest {
            key: key(rand::rng().random_range(0..key_space.max(1))),
            serializable,
            ..Default::default()
        };
        let empty = kv.range(req).await?.into_inner().kvs.is_empty();
        Ok(if empty { Found::Miss } else { Found::Hit })
    })
    .await?;
    Ok(Report::new(what)
        .with("clients", load.clients)
        .with("conns", o.conns)
        .with("key_space", key_space)
        .throughput(&o.hist, o.secs)
        .with("errors", o.errors)
        .with("misses", o.misses))
}

/// `fill`: writes every one of `keys` keys in turn until the limit (for disk and memory
/// figures; also `range --prefill`).
pub async fn fill(
    endpoints: &[String],
    load: Load,
    keys: u64,
    value_size: usize,
) -> anyhow::Result<Report> {
    let o = puts("fill", endpoints, load, Keys::Cycle(keys), value_size).await?;
    Ok(Report::new("fill")
        .with("clients", load.clients)
        .with("conns", o.conns)
        .with("keys", keys)
        .with("value_size", value_size)
        .throughput(&o.hist, o.secs)
        .with("errors", o.errors))
}
