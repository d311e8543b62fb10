//! The workloads: clients and watchers that run against the cluster while the nemesis works,
//! each recording what it asked and what it was told.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::request_op::Request as TxnOp;
use flotilla_proto::etcdserverpb::watch_client::WatchClient;
use flotilla_proto::etcdserverpb::watch_request::RequestUnion;
use flotilla_proto::etcdserverpb::{
    Compare, PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest,
    WatchProgressRequest, WatchRequest,
};
use flotilla_proto::mvccpb;
use futures::StreamExt as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::linearizability::{Op, Operation, Outcome};

/// Every key the workloads touch lives under this prefix.
pub const PREFIX: &str = "chaos/";
pub const REGISTER_PREFIX: &str = "chaos/reg/";
pub const APPEND_PREFIX: &str = "chaos/app/";

/// How long a client waits for an answer before it records the operation as indeterminate.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// Nanoseconds since the run started, shared by every recorder.
#[derive(Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }
    pub fn ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// `[key, key+1)` for a prefix: the etcd range end of every key starting with it.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// What one register operation did, as recorded (and written to the report).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRecord {
    pub id: usize,
    pub client: usize,
    /// The member the client talks to.
    pub node: String,
    pub key: String,
    pub op: String,
    pub value: Option<String>,
    pub expect: Option<String>,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    pub outcome: String,
    pub result: Option<String>,
    pub error: Option<String>,
}

impl RegisterRecord {
    /// The operation as the linearizability checker sees it.
    pub fn to_operation(&self) -> Operation {
        let op = match self.op.as_str() {
            "read" => Op::Read,
            "write" => Op::Write(self.value.clone().unwrap_or_default()),
            _ => Op::Cas {
                expect: self.expect.clone(),
                new: self.value.clone().unwrap_or_default(),
            },
        };
        let outcome = match self.outcome.as_str() {
            "ok" => match &op {
                Op::Read => Outcome::ReadOk(self.result.clone()),
                Op::Write(_) => Outcome::WriteOk,
                Op::Cas { .. } => Outcome::CasOk(self.result.as_deref() == Some("swapped")),
            },
            "failed" => Outcome::Failed,
            _ => Outcome::Indeterminate,
        };
        Operation {
            id: self.id,
            client: self.client,
            key: self.key.clone(),
            op,
            invoke: self.invoke_ns,
            complete: self.complete_ns,
            outcome,
        }
    }
}

/// Whether a failed call certainly never reached a member (nothing can have been applied).
fn never_sent(status: &tonic::Status) -> bool {
    if status.code() != tonic::Code::Unavailable {
        return false;
    }
    let text = format!("{status:?}").to_lowercase();
    text.contains("tcp connect error") || text.contains("connection refused")
}

/// How an error is recorded: a write that may have reached a member is indeterminate.
fn classify(status: &tonic::Status) -> &'static str {
    if never_sent(status) || status.code() == tonic::Code::InvalidArgument {
        "failed"
    } else {
        "indeterminate"
    }
}

/// Shared knobs of the client workloads.
#[derive(Clone)]
pub struct ClientCtx {
    pub clock: Clock,
    pub stop: watch::Receiver<bool>,
    pub ids: Arc<AtomicUsize>,
    /// Pause between one client's operations.
    pub pace: Duration,
}

impl ClientCtx {
    /// Waits before a client's next operation: longer after a failure, so a client of a
    /// member that is down does not spin.
    async fn pause(&self, failed: bool) {
        let pause = if failed {
            Duration::from_millis(100)
        } else {
            self.pace
        };
        tokio::time::sleep(pause).await;
    }
}

/// One register client: reads, writes and compare-and-sets on a few keys, through one member.
pub async fn register_client(
    client: usize,
    node: String,
    channel: Channel,
    keys: usize,
    seed: u64,
    ctx: ClientCtx,
) -> Vec<RegisterRecord> {
    let mut kv = KvClient::new(channel);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut known: HashMap<String, Option<String>> = HashMap::new();
    let mut out = Vec::new();
    let mut seq = 0u64;
    while !*ctx.stop.borrow() {
        let key = format!("{REGISTER_PREFIX}{}", rng.random_range(0..keys.max(1)));
        seq += 1;
        let fresh = format!("{client}-{seq}");
        let roll = rng.random_range(0..100);
        let mut rec = RegisterRecord {
            id: ctx.ids.fetch_add(1, Ordering::Relaxed),
            client,
            node: node.clone(),
            key: key.clone(),
            op: String::new(),
            value: None,
            expect: None,
            invoke_ns: ctx.clock.ns(),
            complete_ns: 0,
            outcome: String::new(),
            result: None,
            error: None,
        };
        let answer: Result<Option<String>, tonic::Status> = if roll < 50 {
            rec.op = "read".into();
            let req = RangeRequest {
                key: key.clone().into_bytes(),
                ..Default::default()
            };
            call(kv.range(req)).await.map(|r| {
                r.into_inner()
                    .kvs
                    .first()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            })
        } else if roll < 75 {
            rec.op = "write".into();
            rec.value = Some(fresh.clone());
            let req = PutRequest {
                key: key.clone().into_bytes(),
                value: fresh.clone().into_bytes(),
                ..Default::default()
            };
            call(kv.put(req)).await.map(|_| None)
        } else {
            rec.op = "cas".into();
            let expect = known.get(&key).cloned().flatten();
            rec.value = Some(fresh.clone());
            rec.expect = expect.clone();
            let compare = match &expect {
                None => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Create as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::CreateRevision(0)),
                    ..Default::default()
                },
                Some(v) => Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.clone().into_bytes(),
                    target_union: Some(TargetUnion::Value(v.clone().into_bytes())),
                    ..Default::default()
                },
            };
            let req = TxnRequest {
                compare: vec![compare],
                success: vec![RequestOp {
                    request: Some(TxnOp::RequestPut(PutRequest {
                        key: key.clone().into_bytes(),
                        value: fresh.clone().into_bytes(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            };
            call(kv.txn(req)).await.map(|r| {
                Some(
                    if r.into_inner().succeeded {
                        "swapped"
                    } else {
                        "unchanged"
                    }
                    .to_string(),
                )
            })
        };
        rec.complete_ns = ctx.clock.ns();
        let failed = answer.is_err();
        match answer {
            Ok(result) => {
                rec.outcome = "ok".into();
                match rec.op.as_str() {
                    "read" => {
                        known.insert(key, result.clone());
                    }
                    "write" => {
                        known.insert(key, Some(fresh));
                    }
                    _ if result.as_deref() == Some("swapped") => {
                        known.insert(key, Some(fresh));
                    }
                    _ => {}
                }
                rec.result = result;
            }
            Err(status) => {
                rec.outcome = classify(&status).into();
                rec.error = Some(format!("{:?}: {}", status.code(), status.message()));
                known.remove(&key);
            }
        }
        out.push(rec);
        ctx.pause(failed).await;
    }
    out
}

/// Sends one call with the client deadline; a timeout becomes `DeadlineExceeded`.
async fn call<T>(
    fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded("client timeout")),
    }
}

/// One append: a put of a key no one else writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendRecord {
    pub client: usize,
    pub node: String,
    pub key: String,
    pub invoke_ns: u64,
    pub complete_ns: u64,
    /// ok, failed or indeterminate.
    pub outcome: String,
    pub error: Option<String>,
}

/// One append client: puts fresh keys through one member.
pub async fn append_client(
    client: usize,
    node: String,
    channel: Channel,
    ctx: ClientCtx,
) -> Vec<AppendRecord> {
    let mut kv = KvClient::new(channel);
    let mut out = Vec::new();
    let mut seq = 0u64;
    while !*ctx.stop.borrow() {
        seq += 1;
        let key = format!("{APPEND_PREFIX}{client}/{seq:08}");
        let invoke_ns = ctx.clock.ns();
        let req = PutRequest {
            key: key.clone().into_bytes(),
            value: seq.to_string().into_bytes(),
            ..Default::default()
        };
        let answer = call(kv.put(req)).await;
        let failed = answer.is_err();
        out.push(AppendRecord {
            client,
            node: node.clone(),
            key,
            invoke_ns,
            complete_ns: ctx.clock.ns(),
            outcome: match &answer {
                Ok(_) => "ok".into(),
                Err(s) => classify(s).into(),
            },
            error: answer
                .err()
                .map(|s| format!("{:?}: {}", s.code(), s.message())),
        });
        ctx.pause(failed).await;
    }
    out
}

/// One event as a watcher saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: i64,
    pub key: String,
    pub kind: String,
    pub value: String,
    pub create_revision: i64,
    pub version: i64,
}

impl WatchEvent {
    pub fn from_proto(e: &mvccpb::Event) -> Option<Self> {
        let kv = e.kv.as_ref()?;
        Some(Self {
            revision: kv.mod_revision,
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            kind: if e.r#type == mvccpb::event::EventType::Delete as i32 {
                "DELETE".into()
            } else {
                "PUT".into()
            },
            value: String::from_utf8_lossy(&kv.value).into_owned(),
            create_revision: kv.create_revision,
            version: kv.version,
        })
    }
}

/// What a watcher has seen so far.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WatchLog {
    pub node: String,
    pub start_revision: i64,
    pub events: Vec<WatchEvent>,
    /// Streams opened (1 + reconnects).
    pub streams: usize,
    /// Things a correct server never does (a compaction with compaction off, a cancel).
    pub errors: Vec<String>,
}

impl WatchLog {
    pub fn last_revision(&self) -> i64 {
        self.events.last().map_or(0, |e| e.revision)
    }
}

/// A watcher on `PREFIX` through one member from `start_revision`, reconnecting after every
/// failure from the revision after the last event it saw, until `stop`.
pub async fn watcher(
    node: String,
    channel: Channel,
    start_revision: i64,
    log: Arc<Mutex<WatchLog>>,
    mut stop: watch::Receiver<bool>,
) {
    {
        let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
        l.node = node;
        l.start_revision = start_revision;
    }
    while !*stop.borrow() {
        let next = {
            let l = log.lock().unwrap_or_else(|p| p.into_inner());
            if l.events.is_empty() {
                start_revision
            } else {
                l.last_revision() + 1
            }
        };
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: PREFIX.as_bytes().to_vec(),
                range_end: prefix_end(PREFIX),
                start_revision: next,
                ..Default::default()
            })),
        };
        let outbound = futures::stream::iter([create]).chain(futures::stream::pending());
        let mut client = WatchClient::new(channel.clone());
        let opened = tokio::select! {
            r = tokio::time::timeout(OP_TIMEOUT, client.watch(outbound)) => r,
            _ = stop.changed() => return,
        };
        let mut inbound = match opened {
            Ok(Ok(s)) => s.into_inner(),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).streams += 1;
        loop {
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = stop.changed() => return,
            };
            let Ok(Some(resp)) = msg else { break };
            let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
            if resp.compact_revision > 0 {
                l.errors.push(format!(
                    "watch from revision {next} answered compacted at {} with compaction off",
                    resp.compact_revision
                ));
            }
            if resp.canceled && !resp.cancel_reason.is_empty() {
                l.errors
                    .push(format!("watch canceled: {}", resp.cancel_reason));
            }
            l.events
                .extend(resp.events.iter().filter_map(WatchEvent::from_proto));
            if resp.canceled {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the committed history of keys under `prefix` from `start` through revision `until`
/// with one watch, using progress requests to know when it has all of it.
pub async fn read_history(
    channel: Channel,
    prefix: &str,
    start: i64,
    until: i64,
    within: Duration,
) -> anyhow::Result<Vec<mvccpb::Event>> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix),
            start_revision: start,
            ..Default::default()
        })),
    })?;
    let progress = || WatchRequest {
        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
    };
    let deadline = Instant::now() + within;
    let mut client = WatchClient::new(channel);
    let mut inbound = tokio::time::timeout_at(deadline, client.watch(rx))
        .await??
        .into_inner();
    let mut events = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, inbound.message()).await??;
        let Some(resp) = msg else {
            anyhow::bail!("the watch ended before the history was read");
        };
        if resp.canceled || resp.compact_revision > 0 {
            anyhow::bail!("the history watch was canceled: {}", resp.cancel_reason);
        }
        let revision = resp.header.as_ref().map_or(0, |h| h.revision);
        if resp.created {
            tx.unbounded_send(progress())?;
            continue;
        }
        if resp.events.is_empty() {
            // A progress answer: everything through `revision` has been sent.
            if revision >= until {
                return Ok(events);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.unbounded_send(progress())?;
            continue;
        }
        events.extend(resp.events);
    }
}
