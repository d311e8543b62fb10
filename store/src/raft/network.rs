//! Sending Raft traffic and leader calls to peers over gRPC.
//!
//! One HTTP/2 connection per peer address, created lazily and shared by every call to it.
//! Payloads are bincode; the envelope carries the cluster id, and a peer of another cluster
//! answers with an error instead of acting on anything.
//!
//! The frequent calls, AppendEntries and forwarded writes (leader calls), travel on one
//! long-lived bidirectional stream per peer (`Pipe`), matched with their replies by a call id:
//! a unary call costs an HTTP/2 stream, its headers and trailers, a task on the server and a
//! hop through the channel's buffer, and those were about a fifth of a member's CPU at 64
//! clients (BENCHMARKS.md, "Morning of 2026-12-04"). Votes, snapshots and hellos stay unary.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::raft::PeerMessage;
use flotilla_proto::raft::raft_peer_client::RaftPeerClient;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use super::peer::{
    Hello, HelloReply, LeaderCallError, LeaderRequest, LeaderResponse, PreVoteRequest,
    PreVoteResponse,
};
use super::state_machine::SnapshotFiles;
use crate::codec;
use crate::types::{LogId, Member, NodeId, Snapshot, TypeConfig, Vote};

/// Largest peer message (a batch of entries, a snapshot chunk).
pub const PEER_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// The metadata key of the status a member shutting down ends a pipe with: the last call id
/// it read. Calls after it were never acted upon, so they go elsewhere.
pub const LAST_READ_CALL: &str = "flotilla-last-read-call";

/// How a member answers a peer method it does not know (one of a later release's).
pub const UNKNOWN_METHOD: &str = "unknown peer method";

/// The version of the peer payloads' encoding (bincode of openraft's messages and of
/// [`LeaderRequest`] and its kin) this build speaks; bump it with any change to them.
pub const WIRE_VERSION: u32 = 1;

/// The version a peer message was sent in: 0, from a build before versions were sent,
/// spoke version 1.
pub fn wire_version_of(msg: &PeerMessage) -> u32 {
    msg.wire_version.max(1)
}

/// Decides, in tests, whether traffic from one member to another gets through.
pub trait PeerFilter: Send + Sync + 'static {
    fn allow(&self, from: NodeId, to: NodeId) -> bool;

    /// Whether calls from `from` to `to` vanish, as into a blackhole route: no error, no
    /// answer, until the caller's deadline (`allow` refuses them at once instead).
    fn stall(&self, _from: NodeId, _to: NodeId) -> bool {
        false
    }

    /// How long the answers to calls from `from` to `to` take to come back, as from a member
    /// too starved to answer at once: the call is delivered and served, and its answer
    /// reaches the caller this much later (or not at all, if the caller gave up meanwhile).
    fn answer_delay(&self, _from: NodeId, _to: NodeId) -> Duration {
        Duration::ZERO
    }
}

/// What went wrong with a call to a peer.
#[derive(Debug, thiserror::Error)]
pub enum PeerCallError {
    /// The peer could not be reached; the request was not delivered.
    #[error("peer {addr} is unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// No answer before the deadline; the request may have been acted upon.
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// The peer answered with an error, or with something that cannot be decoded.
    #[error("peer {addr}: {reason}")]
    Remote { addr: String, reason: String },
    /// The stream the request went on broke before the answer came; the request may have
    /// been acted upon.
    #[error("the connection to peer {addr} broke before it answered ({reason})")]
    Broken { addr: String, reason: String },
}

/// How long a snapshot transfer waits for its file to be written before it gives up (openraft
/// asks for the snapshot again, and the transfer waits again if the file is still coming).
const SNAPSHOT_WRITE_WAIT: Duration = Duration::from_secs(60);

/// How long a peer found to offer no pipe is called unary before the pipe is tried again.
const UNPIPED_RECHECK: Duration = Duration::from_secs(60);

type Unpiped = Arc<Mutex<HashMap<String, std::time::Instant>>>;

/// How long a connection to a peer may take to open.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 flow-control windows of peer connections: a long-lived stream shares one window for
/// all its messages, and a batch of entries for a lagging member can be megabytes.
pub const PEER_STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const PEER_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Opens a TCP connection to `uri`'s host and port from the local address `ip`.
async fn connect_from(
    ip: IpAddr,
    uri: tonic::codegen::http::Uri,
) -> std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let host = uri
        .host()
        .ok_or_else(|| invalid("peer address has no host"))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| invalid("peer address has no port"))?;
    let target = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
        .await?
        .find(|a| a.is_ipv4() == ip.is_ipv4())
        .ok_or_else(|| invalid("peer address does not resolve to the source IP's family"))?;
    let socket = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    // Bounded here, whatever the endpoint applies to a custom connector.
    let stream = tokio::time::timeout(PEER_CONNECT_TIMEOUT, socket.connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(hyper_util::rt::TokioIo::new(stream))
}

/// Connections to peers, shared by Raft replication and leader calls.
#[derive(Clone)]
pub struct Peers {
    me: NodeId,
    cluster_id: Arc<std::sync::atomic::AtomicU64>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// The open pipe to each peer address.
    pipes: Arc<Mutex<HashMap<String, Arc<Pipe>>>>,
    /// Peers that offer no pipe (an older release), and when that was found: called with
    /// unary calls only, until [`UNPIPED_RECHECK`] later (the peer may have been upgraded).
    unpiped: Unpiped,
    filter: Option<Arc<dyn PeerFilter>>,
    /// Source address of outgoing connections (`--peer-source-ip`); the OS picks when unset.
    source_ip: Option<IpAddr>,
    /// The snapshot files being written, which a transfer waits for.
    snapshots: Option<Arc<SnapshotFiles>>,
    /// The last log entry each peer was last known to hold (from its answers to votes and
    /// AppendEntries): see [`PeerClient::trim`].
    holds: Arc<Mutex<HashMap<NodeId, LogId>>>,
    /// The runtime the connections and pipes to peers run on (the member's Raft runtime), so
    /// that Raft traffic never waits for client work; the caller's when unset.
    runtime: Option<tokio::runtime::Handle>,
    /// Plain or mutual TLS (the member's `--peer-*` files).
    dialer: flotilla_transport::Dialer,
}

impl Peers {
    pub fn new(me: NodeId, cluster_id: u64, filter: Option<Arc<dyn PeerFilter>>) -> Self {
        Self {
            me,
            cluster_id: Arc::new(cluster_id.into()),
            channels: Arc::new(Mutex::new(HashMap::new())),
            pipes: Arc::default(),
            holds: Arc::default(),
            unpiped: Arc::default(),
            filter,
            source_ip: None,
            snapshots: None,
            runtime: None,
            dialer: flotilla_transport::Dialer::plain(),
        }
    }

    /// Dials peers with `dialer` (TLS with the member's certificate, or plaintext).
    pub fn with_dialer(mut self, dialer: flotilla_transport::Dialer) -> Self {
        self.dialer = dialer;
        self
    }

    /// Runs the connections and pipes to peers on `runtime`.
    pub fn with_runtime(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// Makes snapshot transfers wait until the file they send is completely written.
    pub fn with_snapshot_files(mut self, files: Arc<SnapshotFiles>) -> Self {
        self.snapshots = Some(files);
        self
    }

    /// Connects to peers from `ip` (a multi-homed host, or a test harness telling members
    /// apart by the address their traffic comes from).
    pub fn with_source_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.source_ip = ip;
        self
    }

    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn channel(&self, addr: &str) -> Result<Channel, PeerCallError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = self
            .dialer
            .endpoint(addr)
            .map_err(|e| PeerCallError::Unreachable {
                addr: addr.into(),
                reason: e.to_string(),
            })?
            .connect_timeout(PEER_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(PEER_STREAM_WINDOW)
            .initial_connection_window_size(PEER_CONNECTION_WINDOW)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // The channel's connection tasks are spawned where it is made.
        let _runtime = self.runtime.as_ref().map(|r| r.enter());
        let ch = match self.source_ip {
            None => endpoint.connect_lazy(),
            Some(ip) => endpoint
                .connect_with_connector_lazy(tower::service_fn(move |uri| connect_from(ip, uri))),
        };
        channels.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    fn blocked(&self, target: Option<NodeId>) -> bool {
        match (&self.filter, target) {
            (Some(f), Some(to)) => !f.allow(self.me, to),
            _ => false,
        }
    }

    /// One call: encode, send with a deadline (on the pipe, or unary), decode.
    async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        target: Option<NodeId>,
        addr: &str,
        method: Method,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerCallError> {
        if self.blocked(target) {
            return Err(PeerCallError::Unreachable {
                addr: addr.into(),
                reason: "blocked by the test filter".into(),
            });
        }
        if let (Some(f), Some(to)) = (&self.filter, target)
            && f.stall(self.me, to)
        {
            tokio::time::sleep(timeout).await;
            return Err(PeerCallError::Timeout {
                addr: addr.into(),
                timeout,
            });
        }
        let payload = codec::encode(req).map_err(|e| PeerCallError::Remote {
            addr: addr.into(),
            reason: e,
        })?;
        let msg = PeerMessage {
            cluster_id: self.cluster_id(),
            payload,
            error: String::new(),
            wire_version: WIRE_VERSION,
            call_id: 0,
            method: method.code(),
        };
        let reply = if method.piped() {
            self.pipe_call(addr, method, msg, timeout).await?
        } else {
            self.unary_call(addr, method, msg, timeout).await?
        };
        if let (Some(f), Some(to)) = (&self.filter, target) {
            let delay = f.answer_delay(self.me, to);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        if !reply.error.is_empty() {
            return Err(PeerCallError::Remote {
                addr: addr.into(),
                reason: reply.error,
            });
        }
        if wire_version_of(&reply) != WIRE_VERSION {
            return Err(PeerCallError::Remote {
                addr: addr.into(),
                reason: format!(
                    "the peer answered in peer protocol version {}; this member speaks version {WIRE_VERSION} (are the members running different Flotilla releases?)",
                    wire_version_of(&reply)
                ),
            });
        }
        codec::decode(&reply.payload).map_err(|e| PeerCallError::Remote {
            addr: addr.into(),
            reason: format!("undecodable reply: {e}"),
        })
    }

    async fn unary_call(
        &self,
        addr: &str,
        method: Method,
        msg: PeerMessage,
        timeout: Duration,
    ) -> Result<PeerMessage, PeerCallError> {
        let mut client = RaftPeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(PEER_MAX_MESSAGE)
            .max_encoding_message_size(PEER_MAX_MESSAGE);
        let mut request = tonic::Request::new(msg);
        request.set_timeout(timeout);
        let fut = async {
            match method {
                Method::AppendEntries => client.append_entries(request).await,
                Method::Vote => client.vote(request).await,
                Method::InstallSnapshot => client.install_snapshot(request).await,
                Method::Leader => client.leader(request).await,
                Method::Hello => client.hello(request).await,
                // A member without the pipe is of a release before PreVote.
                Method::PreVote => Err(tonic::Status::unimplemented(UNKNOWN_METHOD)),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(PeerCallError::Timeout {
                addr: addr.into(),
                timeout,
            }),
            Ok(Err(status)) => Err(status_error(addr, status, timeout)),
            Ok(Ok(reply)) => Ok(reply.into_inner()),
        }
    }

    /// Whether `addr` offers no pipe, as found less than [`UNPIPED_RECHECK`] ago.
    fn is_unpiped(&self, addr: &str) -> bool {
        let mut unpiped = self.unpiped.lock().unwrap_or_else(|p| p.into_inner());
        match unpiped.get(addr) {
            Some(since) if since.elapsed() < UNPIPED_RECHECK => true,
            Some(_) => {
                unpiped.remove(addr);
                false
            }
            None => false,
        }
    }

    /// Closes the pipes and drops the connections to every address not in `addrs` (the
    /// members' peer addresses): a removed member's stream ends instead of being kept alive
    /// with pings for as long as this member runs.
    pub fn retain_peers(&self, addrs: &std::collections::HashSet<String>) {
        let gone: Vec<(String, Arc<Pipe>)> = {
            let mut pipes = self.pipes.lock().unwrap_or_else(|p| p.into_inner());
            let gone = pipes
                .iter()
                .filter(|(a, _)| !addrs.contains(*a))
                .map(|(a, p)| (a.clone(), p.clone()))
                .collect();
            pipes.retain(|a, _| addrs.contains(a));
            gone
        };
        for (addr, pipe) in gone {
            tracing::debug!(peer = %addr, "closing the pipe to a former member");
            pipe.close(|_, sent| {
                let reason = "the peer left the cluster".to_string();
                if sent {
                    PeerCallError::Broken {
                        addr: addr.clone(),
                        reason,
                    }
                } else {
                    PeerCallError::Unreachable {
                        addr: addr.clone(),
                        reason,
                    }
                }
            });
        }
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a, _| addrs.contains(a));
        self.unpiped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|a, _| addrs.contains(a));
    }

    /// One call on the pipe to `addr`, opened if there is none (or the last one closed); a
    /// unary call once the peer turned out to offer none.
    async fn pipe_call(
        &self,
        addr: &str,
        method: Method,
        msg: PeerMessage,
        timeout: Duration,
    ) -> Result<PeerMessage, PeerCallError> {
        let (tx, rx) = oneshot::channel();
        let (mut msg, mut waiter) = (msg, tx);
        let mut tries = 0;
        let (pipe, id) = loop {
            if self.is_unpiped(addr) {
                return self.unary_call(addr, method, msg, timeout).await;
            }
            let pipe = self.pipe(addr)?;
            match pipe.send(msg, waiter) {
                Ok(id) => break (pipe, id),
                // It closed between being handed out and now (nothing was sent): open
                // another, a few times.
                Err((m, w)) if tries < 3 => {
                    tries += 1;
                    (msg, waiter) = (m, w);
                }
                Err(_) => {
                    return Err(PeerCallError::Unreachable {
                        addr: addr.into(),
                        reason: "every stream opened to the peer closed at once".into(),
                    });
                }
            }
        };
        match tokio::time::timeout(timeout, rx).await {
            Err(_) if pipe.forget(id) => Err(PeerCallError::Unreachable {
                addr: addr.into(),
                reason: format!(
                    "the connection took no request for {timeout:?}; this one was never sent"
                ),
            }),
            Err(_) => Err(PeerCallError::Timeout {
                addr: addr.into(),
                timeout,
            }),
            Ok(Err(_)) => Err(PeerCallError::Broken {
                addr: addr.into(),
                reason: "the stream was dropped".into(),
            }),
            Ok(Ok(reply)) => reply,
        }
    }

    /// The open pipe to `addr`, or a new one (its stream opens in the background; calls made
    /// meanwhile wait in it).
    fn pipe(&self, addr: &str) -> Result<Arc<Pipe>, PeerCallError> {
        let mut pipes = self.pipes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = pipes.get(addr)
            && !p.is_closed()
        {
            return Ok(p.clone());
        }
        let client = RaftPeerClient::new(self.channel(addr)?)
            .max_decoding_message_size(PEER_MAX_MESSAGE)
            .max_encoding_message_size(PEER_MAX_MESSAGE);
        let pipe = Arc::new(Pipe::default());
        pipes.insert(addr.to_string(), pipe.clone());
        let run = run_pipe(client, pipe.clone(), addr.to_string(), self.unpiped.clone());
        match &self.runtime {
            Some(rt) => rt.spawn(run),
            None => tokio::spawn(run),
        };
        Ok(pipe)
    }

    /// The last entry `peer` is known to hold, if any.
    fn held_by(&self, peer: NodeId) -> Option<LogId> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .copied()
    }

    /// Records that `peer` holds the entry `id` (and so every entry before it): `latest` says
    /// it is its last entry (a vote's answer), otherwise it is only at least that far.
    fn note_held(&self, peer: NodeId, id: LogId, latest: bool) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        match holds.get(&peer) {
            Some(h) if !latest && h.index >= id.index => {}
            _ => {
                holds.insert(peer, id);
            }
        }
    }

    fn forget_held(&self, peer: NodeId) {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    /// Asks the member at `addr` (the leader, presumably) to serve `req`.
    pub async fn leader_call(
        &self,
        target: NodeId,
        addr: &str,
        req: &LeaderRequest,
        timeout: Duration,
    ) -> Result<Result<LeaderResponse, LeaderCallError>, PeerCallError> {
        self.call(Some(target), addr, Method::Leader, req, timeout)
            .await
    }

    /// Asks member `target` at `addr` for its pre-vote.
    pub async fn pre_vote(
        &self,
        target: NodeId,
        addr: &str,
        req: &PreVoteRequest,
        timeout: Duration,
    ) -> Result<PreVoteResponse, PeerCallError> {
        self.call(Some(target), addr, Method::PreVote, req, timeout)
            .await
    }

    /// Asks the member at `addr` who it is.
    pub async fn hello(
        &self,
        addr: &str,
        hello: &Hello,
        timeout: Duration,
    ) -> Result<HelloReply, PeerCallError> {
        self.call(None, addr, Method::Hello, hello, timeout).await
    }
}

/// Where the reply to a call on a pipe goes.
type Waiter = oneshot::Sender<Result<PeerMessage, PeerCallError>>;

/// A long-lived stream to one peer and the calls waiting for their replies on it.
#[derive(Default)]
struct Pipe {
    calls: Mutex<PipeCalls>,
    /// Woken when a request is queued or the pipe closes.
    ready: tokio::sync::Notify,
}

#[derive(Default)]
struct PipeCalls {
    last_id: u64,
    waiting: HashMap<u64, Waiter>,
    /// Requests the stream has not taken yet, in call-id order. A call that gives up while
    /// its request is still here takes it back: it is never sent, and a connection that
    /// stalls holds no more than the requests of the calls still waiting on it.
    queued: std::collections::VecDeque<PeerMessage>,
    /// The pipe takes no more calls (its stream ended, or the peer left the cluster).
    closed: bool,
}

impl Pipe {
    fn calls(&self) -> std::sync::MutexGuard<'_, PipeCalls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_closed(&self) -> bool {
        self.calls().closed
    }

    /// Queues a call's request, under the same lock as `close`, so a request is either on its
    /// way with its waiter registered or handed back unsent (the pipe takes no more calls).
    fn send(&self, mut msg: PeerMessage, waiter: Waiter) -> Result<u64, (PeerMessage, Waiter)> {
        let id = {
            let mut calls = self.calls();
            if calls.closed {
                return Err((msg, waiter));
            }
            calls.last_id += 1;
            let id = calls.last_id;
            msg.call_id = id;
            calls.queued.push_back(msg);
            calls.waiting.insert(id, waiter);
            id
        };
        self.ready.notify_one();
        Ok(id)
    }

    /// The next request to send, waiting for one; `None` once the pipe is closed.
    async fn next_request(&self) -> Option<PeerMessage> {
        loop {
            {
                let mut calls = self.calls();
                if calls.closed {
                    return None;
                }
                if let Some(msg) = calls.queued.pop_front() {
                    return Some(msg);
                }
            }
            // A notification sent between the check and here is kept for this wait.
            self.ready.notified().await;
        }
    }

    /// Gives up on call `id`: its reply, if one comes, is dropped. Whether its request was
    /// still queued, and so was never sent.
    fn forget(&self, id: u64) -> bool {
        let mut calls = self.calls();
        calls.waiting.remove(&id);
        match calls.queued.binary_search_by_key(&id, |m| m.call_id) {
            Ok(i) => calls.queued.remove(i).is_some(),
            Err(_) => false,
        }
    }

    /// Hands a reply to its call (a call that gave up waiting is gone; its reply is dropped).
    fn answer(&self, reply: PeerMessage) {
        let waiter = self.calls().waiting.remove(&reply.call_id);
        if let Some(w) = waiter {
            let _ = w.send(Ok(reply));
        }
    }

    /// Ends the pipe: the requests not yet sent are dropped, its stream ends, and every call
    /// still waiting gets the error `why` makes of its id and of whether its request was sent.
    fn close(&self, why: impl Fn(u64, bool) -> PeerCallError) {
        let (waiting, unsent) = {
            let mut calls = self.calls();
            calls.closed = true;
            let unsent: std::collections::HashSet<u64> =
                calls.queued.drain(..).map(|m| m.call_id).collect();
            (std::mem::take(&mut calls.waiting), unsent)
        };
        self.ready.notify_one();
        for (id, w) in waiting {
            let _ = w.send(Err(why(id, !unsent.contains(&id))));
        }
    }
}

/// Opens the pipe's stream, hands every reply to its call, and closes the pipe when the
/// stream ends.
async fn run_pipe(
    mut client: RaftPeerClient<Channel>,
    pipe: Arc<Pipe>,
    addr: String,
    unpiped: Unpiped,
) {
    let requests = futures::stream::unfold(pipe.clone(), |pipe| async move {
        pipe.next_request().await.map(|msg| (msg, pipe))
    });
    let mut replies = match client.pipe(requests).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            // Nothing sent on a stream that did not open was acted upon, unless the failure
            // came after the peer had the stream (then its outcome is unknown).
            if status.code() == tonic::Code::Unimplemented {
                tracing::info!(peer = %addr, "the peer offers no pipe; calling it unary");
                unpiped
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr.clone(), std::time::Instant::now());
                pipe.close(|_, _| PeerCallError::Unreachable {
                    addr: addr.clone(),
                    reason: "the peer offers no pipe (an older release); the next call goes unary"
                        .into(),
                });
                return;
            }
            let unsent = matches!(
                status_error(&addr, status.clone(), Duration::ZERO),
                PeerCallError::Unreachable { .. }
            );
            pipe.close(|_, sent| {
                if unsent || !sent {
                    PeerCallError::Unreachable {
                        addr: addr.clone(),
                        reason: status.message().to_string(),
                    }
                } else {
                    PeerCallError::Broken {
                        addr: addr.clone(),
                        reason: format!("{}: {}", status.code(), status.message()),
                    }
                }
            });
            return;
        }
    };
    let (why, last_read) = loop {
        match replies.message().await {
            Ok(Some(reply)) => pipe.answer(reply),
            Ok(None) => break ("the peer closed the stream".to_string(), None),
            Err(status) => {
                let last_read = status
                    .metadata()
                    .get(LAST_READ_CALL)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                break (
                    format!("{}: {}", status.code(), status.message()),
                    last_read,
                );
            }
        }
    };
    tracing::debug!(peer = %addr, "the pipe closed: {why}");
    pipe.close(|id, sent| match last_read {
        // Never sent, or the peer shut down without reading it: not acted upon.
        _ if !sent => PeerCallError::Unreachable {
            addr: addr.clone(),
            reason: why.clone(),
        },
        Some(last) if id > last => PeerCallError::Unreachable {
            addr: addr.clone(),
            reason: why.clone(),
        },
        _ => PeerCallError::Broken {
            addr: addr.clone(),
            reason: why.clone(),
        },
    });
}

fn status_error(addr: &str, status: tonic::Status, timeout: Duration) -> PeerCallError {
    match status.code() {
        tonic::Code::Unavailable => PeerCallError::Unreachable {
            addr: addr.into(),
            reason: status.message().into(),
        },
        // hyper cancels a request it never sent when the connection closes under it (a peer
        // that just shut down): not delivered, so as good as unreachable.
        tonic::Code::Cancelled if never_sent(&status) => PeerCallError::Unreachable {
            addr: addr.into(),
            reason: format!(
                "the connection closed before the request went out: {}",
                status.message()
            ),
        },
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => PeerCallError::Timeout {
            addr: addr.into(),
            timeout,
        },
        _ => PeerCallError::Remote {
            addr: addr.into(),
            reason: format!("{}: {}", status.code(), status.message()),
        },
    }
}

/// Whether `status` comes from hyper dropping the request before it was ever processed.
fn never_sent(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return h.is_canceled();
        }
        source = e.source();
    }
    false
}

/// The peer calls; `code` is the number a pipe request names its method with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Leader,
    Hello,
    PreVote,
}

impl Method {
    pub(crate) fn code(self) -> u32 {
        match self {
            Method::AppendEntries => 1,
            Method::Vote => 2,
            Method::InstallSnapshot => 3,
            Method::Leader => 4,
            Method::Hello => 5,
            Method::PreVote => 6,
        }
    }

    pub(crate) fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Method::AppendEntries,
            2 => Method::Vote,
            3 => Method::InstallSnapshot,
            4 => Method::Leader,
            5 => Method::Hello,
            6 => Method::PreVote,
            _ => return None,
        })
    }

    /// The frequent calls go on the pipe; votes, snapshot chunks and hellos are unary.
    /// PreVote, newer than the unary service, is asked on the pipe only.
    fn piped(self) -> bool {
        matches!(
            self,
            Method::AppendEntries | Method::Leader | Method::PreVote
        )
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerClient {
        PeerClient {
            peers: self.clone(),
            target,
            addr: node.peer_addr.clone(),
            append: None,
        }
    }
}

/// How long an AppendEntries call that carries entries may take before it is given up and
/// sent again. openraft's own deadline for the call is the heartbeat interval (100 ms); the
/// call goes on past it and the retries that follow join it (see [`InflightAppend`]).
pub const APPEND_DEADLINE: Duration = Duration::from_secs(5);

type AppendResult =
    Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>>;

/// The AppendEntries call with entries that a replication stream sent last, still running
/// on a task of its own until answered or [`APPEND_DEADLINE`].
///
/// openraft 0.9 gives every AppendEntries the heartbeat interval (100 ms) as its deadline,
/// and after a timeout sends the same entries again, with nothing learned. The first call of
/// a new leader to a follower carries every entry since the last purge (hundreds of entries,
/// megabytes), because the leader does not know yet where their logs match; on a starved
/// machine no such call is answered within 100 ms, so none ever was, the leader never learnt
/// that a quorum holds its entries, and nothing was committed again (issue 43). Worse, each
/// copy was delivered and served: the follower worked through a growing queue of them, so the
/// newest was answered later still. Now a retry of the call in flight (same vote, same
/// previous entry, its entries a prefix of the retry's) sends nothing and waits for the call
/// in flight: the answer is handed to whichever attempt is waiting when it comes.
struct InflightAppend {
    vote: Vote,
    prev: Option<LogId>,
    /// The id of the last entry the call carries.
    last: LogId,
    call: tokio::task::JoinHandle<AppendResult>,
}

impl InflightAppend {
    /// Whether `rpc` sends again what this call sends (and maybe entries appended since).
    fn joins(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        if rpc.vote != self.vote || rpc.prev_log_id != self.prev {
            return false;
        }
        let Some(first) = rpc.entries.first() else {
            return false;
        };
        // Entries are consecutive: the one at `last`'s index must be `last` itself.
        self.last
            .index
            .checked_sub(first.log_id.index)
            .and_then(|i| rpc.entries.get(i as usize))
            .is_some_and(|e| e.log_id == self.last)
    }

    /// The call's answer, as an answer to a request that carried entries up to `last` (the
    /// same as the call's or later ones): the follower accepted up to the call's last entry.
    fn answer_for(
        &self,
        answer: AppendEntriesResponse<NodeId>,
        last: LogId,
    ) -> AppendEntriesResponse<NodeId> {
        match answer {
            AppendEntriesResponse::Success if self.last != last => {
                AppendEntriesResponse::PartialSuccess(Some(self.last))
            }
            other => other,
        }
    }
}

/// Raft traffic to one peer.
pub struct PeerClient {
    peers: Peers,
    target: NodeId,
    addr: String,
    /// The AppendEntries with entries in flight on this replication stream, if any.
    append: Option<InflightAppend>,
}

impl PeerClient {
    async fn raft_call<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        raft_call(
            &self.peers,
            self.target,
            &self.addr,
            method,
            req,
            option.hard_ttl(),
        )
        .await
    }

    /// Leaves out of `rpc` the entries the follower is known to hold already (their last one
    /// is the same entry, same term and leader, as the leader's at that index, so by Raft's
    /// log matching the follower's log is the leader's up to there); whether it did.
    ///
    /// A new leader does not know where a follower's log matches its own: openraft 0.9
    /// probes with every entry since the last purge (hundreds of entries, megabytes, in the
    /// density run of issue 43), which a starved follower took seconds to take in, while the
    /// leader gave up on it after 100 ms and sent it again. The follower told its last entry
    /// when it answered this member's vote request (and every AppendEntries it accepted), so
    /// the probe usually shrinks to the new leader's first entry. The answer holds for the
    /// whole request; a conflict (the follower lost or replaced that entry since) is
    /// reported as a network error, and the next attempt sends everything.
    fn trim(
        &self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
    ) -> (AppendEntriesRequest<TypeConfig>, bool) {
        let Some(held) = self.peers.held_by(self.target) else {
            return (rpc, false);
        };
        let Some(first) = rpc.entries.first().map(|e| e.log_id) else {
            return (rpc, false);
        };
        let Some(i) = held
            .index
            .checked_sub(first.index)
            .map(|i| i as usize)
            .filter(|i| rpc.entries.get(*i).is_some_and(|e| e.log_id == held))
        else {
            return (rpc, false);
        };
        // Keep at least the last entry, so the request still carries something to append.
        let keep_from = (i + 1).min(rpc.entries.len() - 1);
        if keep_from == 0 {
            return (rpc, false);
        }
        rpc.prev_log_id = Some(rpc.entries[keep_from - 1].log_id);
        rpc.entries.drain(..keep_from);
        (rpc, true)
    }

    /// Sends `rpc`, which carries entries, unless it repeats the call in flight; waits for
    /// the answer of the call that carries it.
    async fn append_with_entries(&mut self, rpc: AppendEntriesRequest<TypeConfig>) -> AppendResult {
        let last = rpc.entries.last().map(|e| e.log_id).expect("entries");
        let joined = self.append.as_ref().is_some_and(|a| a.joins(&rpc));
        if joined {
            tracing::debug!(target = self.target, last = %last, "AppendEntries joins the call in flight");
        } else {
            // A call in flight that this one does not repeat is not waited for any more; it
            // runs out on its own (its request may already be on its way).
            let (peers, target, addr) = (self.peers.clone(), self.target, self.addr.clone());
            let (vote, prev) = (rpc.vote, rpc.prev_log_id);
            let call = tokio::spawn(async move {
                if crate::fault::enabled("slow-append") {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                raft_call(
                    &peers,
                    target,
                    &addr,
                    Method::AppendEntries,
                    &rpc,
                    APPEND_DEADLINE,
                )
                .await
            });
            self.append = Some(InflightAppend {
                vote,
                prev,
                last,
                call,
            });
        }
        // Cancelled here (openraft's deadline), the call goes on, and the next attempt joins it.
        let inflight = self.append.as_mut().expect("a call in flight");
        let result = (&mut inflight.call).await;
        let inflight = self.append.take().expect("a call in flight");
        match result {
            Ok(Ok(answer)) => Ok(inflight.answer_for(answer, last)),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

/// One Raft call to `target`, its errors as openraft's.
async fn raft_call<Req, Resp, E>(
    peers: &Peers,
    target: NodeId,
    addr: &str,
    method: Method,
    req: &Req,
    timeout: Duration,
) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
where
    Req: Serialize,
    Resp: DeserializeOwned,
    E: std::error::Error + DeserializeOwned,
{
    let reply: Result<Resp, RaftError<NodeId, E>> = peers
        .call(Some(target), addr, method, req, timeout)
        .await
        .map_err(|e| match e {
            PeerCallError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
            PeerCallError::Timeout { .. } => RPCError::Timeout(Timeout {
                action: match method {
                    Method::Vote => openraft::network::RPCTypes::Vote,
                    Method::InstallSnapshot => openraft::network::RPCTypes::InstallSnapshot,
                    _ => openraft::network::RPCTypes::AppendEntries,
                },
                id: peers.me,
                target,
                timeout,
            }),
            PeerCallError::Remote { .. } | PeerCallError::Broken { .. } => {
                RPCError::Network(NetworkError::new(&e))
            }
        })?;
    reply.map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        // Ask openraft to split a batch that would exceed what a peer accepts.
        let approx: usize = rpc.entries.iter().map(entry_size).sum();
        if approx > PEER_MAX_MESSAGE / 2 && rpc.entries.len() > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(rpc.entries.len() as u64 / 2),
            ));
        }
        // Heartbeats (no entries) stay calls of their own with openraft's deadline: one sent
        // earlier must not stand in for one sent now (a read index relies on a heartbeat
        // round that starts after the read), and they cost little to send again.
        if rpc.entries.is_empty() {
            let prev = rpc.prev_log_id;
            let r = self.raft_call(Method::AppendEntries, &rpc, &option).await;
            if let (Ok(AppendEntriesResponse::Success), Some(prev)) = (&r, prev) {
                self.peers.note_held(self.target, prev, false);
            }
            return r;
        }
        let last = rpc.entries.last().map(|e| e.log_id).expect("entries");
        let (rpc, trimmed) = self.trim(rpc);
        if trimmed {
            tracing::debug!(
                target = self.target,
                prev = ?rpc.prev_log_id,
                entries = rpc.entries.len(),
                "AppendEntries starts from the entry the follower is known to hold"
            );
        }
        let r = self.append_with_entries(rpc).await;
        match &r {
            Ok(AppendEntriesResponse::Success) => self.peers.note_held(self.target, last, false),
            Ok(AppendEntriesResponse::PartialSuccess(Some(m))) => {
                self.peers.note_held(self.target, *m, false)
            }
            Ok(AppendEntriesResponse::Conflict) => {
                self.peers.forget_held(self.target);
                if trimmed {
                    return Err(RPCError::Network(NetworkError::new(
                        &std::io::Error::other(
                            "the follower no longer holds the entry it was known to hold; the next attempt sends every entry",
                        ),
                    )));
                }
            }
            _ => {}
        }
        r
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.raft_call(Method::InstallSnapshot, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        // The file is written in the background (`StateMachine::snapshot_file`); send it once
        // it is complete, and only if this handle holds all of it.
        if let Some(files) = &self.peers.snapshots {
            let unsent = |why: String| {
                StreamingError::Network(NetworkError::new(&std::io::Error::other(format!(
                    "snapshot {} was not sent: {why}",
                    snapshot.meta.snapshot_id
                ))))
            };
            let written = tokio::time::timeout(
                SNAPSHOT_WRITE_WAIT,
                files.written(&snapshot.meta.snapshot_id),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "its file is still being written after {SNAPSHOT_WRITE_WAIT:?}"
                ))
            });
            match written {
                Err(e) => return Err(unsent(e)),
                Ok(None) => {}
                Ok(Some(size)) => {
                    let len = snapshot
                        .snapshot
                        .metadata()
                        .await
                        .map_err(|e| unsent(e.to_string()))?
                        .len();
                    if len != size {
                        return Err(unsent(format!("the file holds {len} of its {size} bytes")));
                    }
                }
            }
        }
        Chunked::send_snapshot(self, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        let r = self.raft_call(Method::Vote, &rpc, &option).await;
        // Where the voter's log ends: a leader's first AppendEntries to it starts there.
        if let Ok(VoteResponse {
            last_log_id: Some(last),
            ..
        }) = &r
        {
            self.peers.note_held(self.target, *last, true);
        }
        r
    }
}

fn entry_size(entry: &crate::types::Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(cmd) => cmd.approx_size(),
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::raft::raft_peer_server::{RaftPeer, RaftPeerServer};
    use tonic::{Request, Response, Status};

    /// A peer from a later release: it answers every call in another encoding version.
    struct NewerPeer;

    fn newer() -> Result<Response<PeerMessage>, Status> {
        Ok(Response::new(PeerMessage {
            cluster_id: 7,
            payload: vec![0xff; 8],
            error: String::new(),
            wire_version: WIRE_VERSION + 1,
            call_id: 0,
            method: 0,
        }))
    }

    #[tonic::async_trait]
    impl RaftPeer for NewerPeer {
        async fn append_entries(
            &self,
            _: Request<PeerMessage>,
        ) -> Result<Response<PeerMessage>, Status> {
            newer()
        }
        async fn vote(&self, _: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
            newer()
        }
        async fn install_snapshot(
            &self,
            _: Request<PeerMessage>,
        ) -> Result<Response<PeerMessage>, Status> {
            newer()
        }
        async fn leader(&self, _: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
            newer()
        }
        async fn hello(&self, _: Request<PeerMessage>) -> Result<Response<PeerMessage>, Status> {
            newer()
        }
        type PipeStream = tokio_stream::Empty<Result<PeerMessage, Status>>;
        async fn pipe(
            &self,
            _: Request<tonic::Streaming<PeerMessage>>,
        ) -> Result<Response<Self::PipeStream>, Status> {
            Err(Status::unimplemented("an older release"))
        }
    }

    /// Serves [`NewerPeer`] on an ephemeral port; its address.
    async fn serve_newer_peer() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftPeerServer::new(NewerPeer))
                .serve_with_incoming(incoming),
        );
        addr
    }

    /// A peer without the pipe (an older release) is called unary from then on: the call that
    /// found out is refused as undelivered (so it is retried), the next goes through.
    #[tokio::test]
    async fn a_peer_without_the_pipe_is_called_unary() {
        let addr = serve_newer_peer().await;
        let peers = Peers::new(1, 7, None);
        let call =
            || peers.leader_call(2, &addr, &LeaderRequest::ReadIndex, Duration::from_secs(5));
        let first = call().await.unwrap_err();
        assert!(
            matches!(&first, PeerCallError::Unreachable { reason, .. } if reason.contains("no pipe")),
            "{first}"
        );
        // The unary call reaches it: it answers in its own version, which is refused.
        let second = call().await.unwrap_err();
        assert!(
            matches!(&second, PeerCallError::Remote { reason, .. } if reason.contains("protocol version")),
            "{second}"
        );
    }

    /// A call whose request was never taken by the connection (here: one that does not open)
    /// gives up as undelivered, so that a forwarded write is retried instead of reported as
    /// maybe applied, and its request is dropped instead of waiting in memory to go out
    /// whenever the connection opens.
    #[tokio::test]
    async fn a_request_the_connection_never_took_is_not_sent() {
        // A listener whose accept queue is full: the kernel drops further connection attempts,
        // which hang (until the 1 s connect timeout) instead of being refused.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut fillers = Vec::new();
        for _ in 0..3 {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            if let Ok(Ok(c)) = tokio::time::timeout(
                Duration::from_millis(200),
                s.connect(listener.local_addr().unwrap()),
            )
            .await
            {
                fillers.push(c);
            }
        }
        let peers = Peers::new(1, 7, None);
        let e = peers
            .leader_call(
                2,
                &addr,
                &LeaderRequest::ReadIndex,
                Duration::from_millis(300),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&e, PeerCallError::Unreachable { reason, .. } if reason.contains("never sent")),
            "{e}"
        );
        let pipe = peers.pipe(&addr).unwrap();
        let calls = pipe.calls();
        assert!(calls.queued.is_empty() && calls.waiting.is_empty());
    }

    fn append_request(
        vote: Vote,
        prev: Option<LogId>,
        entries: std::ops::RangeInclusive<u64>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            leader_commit: None,
            entries: entries
                .map(|i| crate::types::Entry {
                    log_id: log_id(7, i),
                    payload: crate::types::EntryPayload::Blank,
                })
                .collect(),
        }
    }

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(openraft::CommittedLeaderId::new(term, 1), index)
    }

    /// A retry of the AppendEntries in flight (same vote and previous entry, carrying the same
    /// entries and perhaps later ones) joins it; anything else is a call of its own. The
    /// answer to the call in flight tells the retry how far the follower holds its entries.
    #[tokio::test]
    async fn a_retry_of_the_append_entries_in_flight_joins_it() {
        let vote = Vote::new_committed(7, 1);
        let prev = Some(log_id(6, 100));
        let inflight = InflightAppend {
            vote,
            prev,
            last: log_id(7, 130),
            call: tokio::spawn(async { Ok(AppendEntriesResponse::Success) }),
        };
        assert!(inflight.joins(&append_request(vote, prev, 101..=130)));
        assert!(inflight.joins(&append_request(vote, prev, 101..=135)));
        assert!(
            !inflight.joins(&append_request(vote, prev, 101..=120)),
            "a shorter request"
        );
        assert!(
            !inflight.joins(&append_request(vote, Some(log_id(6, 90)), 91..=130)),
            "another previous entry"
        );
        assert!(
            !inflight.joins(&append_request(Vote::new_committed(8, 1), prev, 101..=130)),
            "another term"
        );
        let mut heartbeat = append_request(vote, prev, 101..=101);
        heartbeat.entries.clear();
        assert!(!inflight.joins(&heartbeat), "a heartbeat");
        assert_eq!(
            inflight.answer_for(AppendEntriesResponse::Success, log_id(7, 135)),
            AppendEntriesResponse::PartialSuccess(Some(log_id(7, 130)))
        );
        assert_eq!(
            inflight.answer_for(AppendEntriesResponse::Success, log_id(7, 130)),
            AppendEntriesResponse::Success
        );
        assert_eq!(
            inflight.answer_for(AppendEntriesResponse::Conflict, log_id(7, 135)),
            AppendEntriesResponse::Conflict
        );
    }

    /// A new leader's AppendEntries leaves out what the follower is known to hold (its
    /// answer to the vote said where its log ends), keeping at least one entry; with nothing
    /// known, or an entry at that index that is not the same, it is sent whole.
    #[test]
    fn an_append_entries_starts_where_the_follower_is_known_to_hold_the_log() {
        let peers = Peers::new(1, 7, None);
        let client = PeerClient {
            peers: peers.clone(),
            target: 2,
            addr: "127.0.0.1:1".into(),
            append: None,
        };
        let vote = Vote::new_committed(7, 1);
        let probe = || append_request(vote, Some(log_id(6, 100)), 101..=130);
        let (same, trimmed) = client.trim(probe());
        assert!(
            !trimmed && same.entries.len() == 30,
            "nothing known: sent whole"
        );
        peers.note_held(2, log_id(7, 120), true);
        let (rpc, trimmed) = client.trim(probe());
        assert!(trimmed);
        assert_eq!(rpc.prev_log_id, Some(log_id(7, 120)));
        assert_eq!(rpc.entries.first().unwrap().log_id, log_id(7, 121));
        assert_eq!(rpc.entries.len(), 10);
        // It holds everything: the last entry still goes.
        peers.note_held(2, log_id(7, 130), false);
        let (rpc, _) = client.trim(probe());
        assert_eq!(rpc.prev_log_id, Some(log_id(7, 129)));
        assert_eq!(rpc.entries.len(), 1);
        // An answer about an earlier entry does not move it back; a vote's answer does.
        peers.note_held(2, log_id(7, 110), false);
        assert_eq!(peers.held_by(2), Some(log_id(7, 130)));
        // Another leader's entry at that index: no match, sent whole.
        peers.note_held(2, log_id(5, 120), true);
        let (rpc, trimmed) = client.trim(probe());
        assert!(!trimmed && rpc.entries.len() == 30 && rpc.prev_log_id == Some(log_id(6, 100)));
    }

    /// A former member's pipe is closed and its connection dropped; calls to a member that
    /// stays keep their pipe.
    #[tokio::test]
    async fn retain_peers_closes_the_pipes_of_former_members() {
        let (gone, kept) = (serve_newer_peer().await, serve_newer_peer().await);
        let peers = Peers::new(1, 7, None);
        let (p_gone, p_kept) = (peers.pipe(&gone).unwrap(), peers.pipe(&kept).unwrap());
        peers.retain_peers(&[kept.clone()].into_iter().collect());
        assert!(p_gone.is_closed());
        assert!(!peers.pipes.lock().unwrap().contains_key(&gone));
        assert!(!peers.channels.lock().unwrap().contains_key(&gone));
        assert!(Arc::ptr_eq(&peers.pipe(&kept).unwrap(), &p_kept));
    }

    #[tokio::test]
    async fn an_answer_in_another_encoding_version_is_refused_not_decoded() {
        let addr = serve_newer_peer().await;
        let peers = Peers::new(1, 7, None);
        let hello = Hello {
            peer_addr: "127.0.0.1:1".into(),
        };
        let e = peers
            .hello(&addr, &hello, Duration::from_secs(5))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, PeerCallError::Remote { .. }), "{msg}");
        assert!(
            msg.contains(&format!("version {}", WIRE_VERSION + 1))
                && msg.contains(&format!("speaks version {WIRE_VERSION}")),
            "{msg}"
        );
    }
}
