//! etcd's Watch service: one bidirectional stream carries many watches.
//!
//! Each stream has a session task. Watchers write into one bounded channel per stream, the
//! session forwards to the client in order; a client that stops reading fills it, and each of
//! its watchers then cancels itself after the hub's send timeout, naming the revision to resume
//! from. Nothing here can block the apply loop or other streams.

use std::collections::HashMap;
use std::pin::Pin;

use flotilla_proto::etcdserverpb::watch_request::RequestUnion;
use flotilla_proto::etcdserverpb::watch_server::Watch;
use flotilla_proto::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::EtcdFace;
use crate::mvcc::KeyRange;
use crate::node::StoreNode;
use crate::watch::{WatchOutput, WatchSpec, WatcherHandle};

/// Responses buffered per stream towards the client.
const OUT_BUFFER: usize = 128;
/// Watcher outputs buffered per stream before watchers wait.
const DATA_BUFFER: usize = 256;
/// etcd's id for responses not tied to one watch (progress on request).
const NO_WATCH: i64 = -1;

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for EtcdFace {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(OUT_BUFFER);
        tokio::spawn(Session::new(self.node.clone(), out).run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    node: StoreNode,
    out: mpsc::Sender<Result<WatchResponse, Status>>,
    data_tx: mpsc::Sender<WatchOutput>,
    data_rx: mpsc::Receiver<WatchOutput>,
    control_tx: mpsc::UnboundedSender<WatchOutput>,
    control_rx: mpsc::UnboundedReceiver<WatchOutput>,
    watchers: HashMap<i64, WatcherHandle>,
    next_id: i64,
}

/// The client went away; the session ends.
struct Gone;

impl Session {
    fn new(node: StoreNode, out: mpsc::Sender<Result<WatchResponse, Status>>) -> Self {
        let (data_tx, data_rx) = mpsc::channel(DATA_BUFFER);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        Self {
            node,
            out,
            data_tx,
            data_rx,
            control_tx,
            control_rx,
            watchers: HashMap::new(),
            next_id: 0,
        }
    }

    async fn run(mut self, mut inbound: Streaming<WatchRequest>) {
        loop {
            let step = tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req).await,
                    Ok(None) => Err(Gone),
                    Err(status) => {
                        tracing::debug!(%status, "watch stream ended");
                        Err(Gone)
                    }
                },
                Some(o) = self.control_rx.recv() => self.forward(o).await,
                Some(o) = self.data_rx.recv() => self.forward(o).await,
                _ = self.out.closed() => Err(Gone),
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, r: WatchResponse) -> Result<(), Gone> {
        self.out.send(Ok(r)).await.map_err(|_| Gone)
    }

    async fn on_request(&mut self, req: WatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id })) => {
                let existed = self.watchers.remove(&watch_id).is_some();
                let mut r = self.response(watch_id, 0);
                r.canceled = true;
                if !existed {
                    r.cancel_reason = "watch id not found".into();
                }
                self.send(r).await
            }
            Some(RequestUnion::ProgressRequest(_)) => self.progress().await,
            None => Ok(()),
        }
    }

    fn response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: Some(self.node.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn create(&mut self, c: WatchCreateRequest) -> Result<(), Gone> {
        let id = if c.watch_id != 0 {
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id
        };
        let mut created = self.response(id, 0);
        created.created = true;
        let refuse = if c.key.is_empty() {
            Some("key is not provided".to_string())
        } else if self.watchers.contains_key(&id) {
            Some(format!("watch id {id} is already in use"))
        } else if id < 0 {
            Some("watch_id: must not be negative".to_string())
        } else {
            None
        };
        if let Some(reason) = refuse {
            created.canceled = true;
            created.cancel_reason = reason;
            return self.send(created).await;
        }
        let current = self.node.kv().revision();
        let start = if c.start_revision > 0 {
            c.start_revision
        } else {
            current + 1
        };
        let spec = WatchSpec {
            id,
            range: KeyRange::new(&c.key, &c.range_end),
            start,
            prev_kv: c.prev_kv,
            no_put: c
                .filters
                .contains(&(watch_create_request::FilterType::Noput as i32)),
            no_delete: c
                .filters
                .contains(&(watch_create_request::FilterType::Nodelete as i32)),
            progress_notify: c.progress_notify,
        };
        // The creation is acknowledged before the watcher can produce anything.
        created.header = Some(self.node.header(current));
        self.send(created).await?;
        let handle = self
            .node
            .kv()
            .watch(spec, self.data_tx.clone(), self.control_tx.clone());
        self.watchers.insert(id, handle);
        if c.watch_id == 0 {
            self.next_id = id + 1;
        }
        Ok(())
    }

    /// Answers a progress request: every watcher of this stream has delivered everything up
    /// to the revision it carries.
    async fn progress(&mut self) -> Result<(), Gone> {
        let revision = self
            .watchers
            .values()
            .map(WatcherHandle::progress)
            .min()
            .unwrap_or_else(|| self.node.kv().revision());
        // What watchers queued before their progress was read goes out first.
        while let Ok(o) = self.data_rx.try_recv() {
            self.forward(o).await?;
        }
        self.send(self.progress_response(NO_WATCH, revision)).await
    }

    /// A progress answer: its header's revision is exactly what was delivered, even 0 (a
    /// watch from revision 1 that has sent nothing yet). `response` would put the current
    /// revision in place of 0, telling the client it had seen everything so far.
    fn progress_response(&self, watch_id: i64, revision: i64) -> WatchResponse {
        let mut r = self.response(watch_id, revision);
        if let Some(h) = r.header.as_mut() {
            h.revision = revision;
        }
        r
    }

    async fn forward(&mut self, o: WatchOutput) -> Result<(), Gone> {
        let r = match o {
            WatchOutput::Events {
                watch_id,
                revision,
                events,
            } => {
                if !self.watchers.contains_key(&watch_id) {
                    return Ok(());
                }
                let mut r = self.response(watch_id, revision);
                r.events = events;
                r
            }
            WatchOutput::Progress { watch_id, revision } => {
                if !self.watchers.contains_key(&watch_id) {
                    return Ok(());
                }
                self.progress_response(watch_id, revision)
            }
            WatchOutput::Canceled {
                watch_id,
                compact_revision,
                reason,
            } => {
                if self.watchers.remove(&watch_id).is_none() {
                    return Ok(());
                }
                let mut r = self.response(watch_id, 0);
                r.canceled = true;
                r.compact_revision = compact_revision;
                r.cancel_reason = if compact_revision > 0 {
                    "etcdserver: mvcc: required revision has been compacted".into()
                } else {
                    reason
                };
                r
            }
        };
        self.send(r).await
    }
}
