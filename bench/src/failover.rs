//! Leadership and availability: `leader` (which endpoint leads), `health` (every member answers
//! and agrees on a leader) and `unavailability` (the longest time writes went unacknowledged,
//! for the leader-kill test in `bench/run.sh`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use flotilla_proto::etcdserverpb::{PutRequest, RangeRequest, StatusRequest, StatusResponse};
use tonic::transport::Channel;

use crate::net::{channel, describe};
use crate::report::{Progress, Report};

/// Timeout of status and health requests.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Every endpoint's status, asked concurrently.
async fn statuses(endpoints: &[String]) -> Vec<(&str, anyhow::Result<StatusResponse>)> {
    let ask = |e: &str| {
        let e = e.to_string();
        async move {
            let mut m = MaintenanceClient::new(channel(&e, Some(STATUS_TIMEOUT))?);
            let r = m.status(StatusRequest {}).await;
            r.map(|r| r.into_inner())
                .map_err(|s| anyhow!(describe(&e, &s)))
        }
    };
    let answers = futures::future::join_all(endpoints.iter().map(|e| ask(e))).await;
    endpoints.iter().map(String::as_str).zip(answers).collect()
}

/// The member id an endpoint answered for.
fn member_id(s: &StatusResponse) -> u64 {
    s.header.as_ref().map_or(0, |h| h.member_id)
}

/// The endpoint whose member reports itself as the leader.
pub async fn leader(endpoints: &[String]) -> anyhow::Result<String> {
    let mut notes = Vec::new();
    for (e, r) in statuses(endpoints).await {
        match r {
            Ok(s) if s.leader != 0 && member_id(&s) == s.leader => return Ok(e.to_string()),
            Ok(s) => notes.push(format!(
                "{e}: member {:x} follows {:x}",
                member_id(&s),
                s.leader
            )),
            Err(err) => notes.push(format!("{err:#}")),
        }
    }
    bail!(
        "no endpoint reports itself as the leader: {}",
        notes.join("; ")
    )
}

/// The leader's endpoint and term if every endpoint answers its status, all agree on one leader
/// among them, and a linearizable read succeeds through each; otherwise why not.
async fn check_health(endpoints: &[String]) -> Result<(String, u64), String> {
    let mut leader = None;
    let mut leaders = Vec::new();
    let mut term = 0;
    for (e, r) in statuses(endpoints).await {
        let s = r.map_err(|err| format!("{err:#}"))?;
        if s.leader == 0 {
            return Err(format!("{e}: no leader"));
        }
        if member_id(&s) == s.leader {
            leader = Some(e.to_string());
        }
        leaders.push(s.leader);
        term = term.max(s.raft_term);
    }
    leaders.sort_unstable();
    leaders.dedup();
    if leaders.len() > 1 {
        return Err(format!("members disagree on the leader: {leaders:x?}"));
    }
    let leader = leader.ok_or("the leader is not among the endpoints")?;
    for e in endpoints {
        let ch = channel(e, Some(STATUS_TIMEOUT)).map_err(|err| format!("{err:#}"))?;
        let read = RangeRequest {
            key: b"health".to_vec(),
            count_only: true,
            ..Default::default()
        };
        KvClient::new(ch)
            .range(read)
            .await
            .map_err(|s| format!("linearizable read: {}", describe(e, &s)))?;
    }
    Ok((leader, term))
}

/// `health`: checks the cluster, retrying for up to `wait`.
pub async fn health(endpoints: &[String], wait: Duration) -> anyhow::Result<Report> {
    let start = Instant::now();
    loop {
        match check_health(endpoints).await {
            Ok((leader, term)) => {
                return Ok(Report::new("health")
                    .with("leader", leader)
                    .with("raft_term", term)
                    .with("waited_ms", start.elapsed().as_millis() as u64));
            }
            Err(_) if start.elapsed() < wait => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(why) => bail!(
                "not healthy after {:.1}s: {why}",
                start.elapsed().as_secs_f64()
            ),
        }
    }
}

/// What to run.
pub struct UnavailabilityOpts {
    pub duration: Duration,
    /// Per-request timeout; on it, or any error, the writer moves to the next endpoint.
    pub timeout: Duration,
    /// Pause after each request.
    pub interval: Duration,
    /// Where to write every request as CSV.
    pub series: Option<PathBuf>,
}

/// One request of the writer.
struct Sample {
    /// Since the run's start.
    at: Duration,
    latency: Duration,
    endpoint: usize,
    ok: bool,
}

/// `unavailability`: one writer putting one value after another; reports the longest time
/// between two acknowledged puts (`max_gap_ms`), counting a final stretch without any.
pub async fn unavailability(
    endpoints: &[String],
    opts: UnavailabilityOpts,
) -> anyhow::Result<Report> {
    let mut clients: Vec<KvClient<Channel>> = endpoints
        .iter()
        .map(|e| channel(e, Some(opts.timeout)).map(KvClient::new))
        .collect::<anyhow::Result<_>>()?;
    let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let _progress = {
        let (acked, failed) = (acked.clone(), failed.clone());
        Progress::start("unavailability", move |_| {
            let (a, f) = (
                acked.load(Ordering::Relaxed),
                failed.load(Ordering::Relaxed),
            );
            format!("{a} puts acknowledged, {f} failed")
        })
    };
    let start = Instant::now();
    let end = start + opts.duration;
    let mut samples = Vec::new();
    let mut last_ack: Option<Instant> = None;
    let (mut max_gap, mut gap_from) = (Duration::ZERO, Duration::ZERO);
    let mut last_error = None;
    let mut current = 0;
    while Instant::now() < end {
        let req = PutRequest {
            key: format!("unavailability/{}", samples.len() % 1000).into_bytes(),
            value: vec![b'u'; 256],
            ..Default::default()
        };
        let t = Instant::now();
        let r = tokio::time::timeout(opts.timeout, clients[current].put(req)).await;
        let done = Instant::now();
        let ok = matches!(r, Ok(Ok(_)));
        samples.push(Sample {
            at: t - start,
            latency: done - t,
            endpoint: current,
            ok,
        });
        match r {
            Ok(Ok(_)) => {
                // The first gap starts at the first acknowledgement, not at the connection.
                if let Some(prev) = last_ack.filter(|p| done - *p > max_gap) {
                    max_gap = done - prev;
                    gap_from = prev - start;
                }
                last_ack = Some(done);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(s)) => last_error = Some(describe(&endpoints[current], &s)),
            Err(_) => {
                let ms = opts.timeout.as_millis();
                last_error = Some(format!("{}: no answer within {ms} ms", endpoints[current]));
            }
        }
        if !ok {
            failed.fetch_add(1, Ordering::Relaxed);
            current = (current + 1) % clients.len();
        }
        tokio::time::sleep(opts.interval).await;
    }
    let Some(last) = last_ack else {
        bail!(
            "no put was acknowledged in {}s; last error: {}",
            opts.duration.as_secs(),
            last_error.as_deref().unwrap_or("none")
        );
    };
    // Writes that never resumed: the gap runs to the end.
    let trailing = Instant::now() - last;
    let resumed = trailing <= max_gap;
    if !resumed {
        max_gap = trailing;
        gap_from = last - start;
    }
    if let Some(path) = &opts.series {
        write_series(path, &samples, endpoints)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(e) = &last_error {
        eprintln!("unavailability: last error: {e}");
    }
    Ok(Report::new("unavailability")
        .with("max_gap_ms", max_gap.as_millis() as u64)
        .with(
            "gap_from_s",
            (gap_from.as_secs_f64() * 1000.0).round() / 1000.0,
        )
        .with("resumed", resumed)
        .with("samples", samples.len())
        .with("acked", acked.load(Ordering::Relaxed))
        .with("failed", failed.load(Ordering::Relaxed)))
}

/// `at_ms,latency_ms,endpoint,ok` for every request.
fn write_series(path: &PathBuf, samples: &[Sample], endpoints: &[String]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(f, "at_ms,latency_ms,endpoint,ok")?;
    for s in samples {
        writeln!(
            f,
            "{:.3},{:.3},{},{}",
            s.at.as_secs_f64() * 1000.0,
            s.latency.as_secs_f64() * 1000.0,
            endpoints[s.endpoint],
            s.ok
        )?;
    }
    f.flush()?;
    Ok(())
}
