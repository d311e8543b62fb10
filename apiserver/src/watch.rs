//! Watch: the changes to one kind, filtered, from the local member's watch hub.
//!
//! A watch without a resourceVersion first sends every matching object as ADDED (a list at
//! revision R), then the changes after R; with one, the changes after it. An object that
//! starts or stops matching the filters is sent as ADDED or DELETED, as Kubernetes does.

use flotilla_proto::api::Resource;
use flotilla_proto::api::WatchRequest;
use flotilla_proto::mvccpb::{Event as StoreEvent, event::EventType};
use flotilla_store::mvcc::KeyRange;
use flotilla_store::watch::{WatchOutput, WatchSpec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::encryption::Encryption;
use crate::errors::ApiResult;
use crate::registry::{Api, Query, prefix_end};
use crate::validate::Kind;

/// Events buffered per watch between the hub and the gRPC stream.
const BUFFER: usize = 256;

pub type EventStream<K> = ReceiverStream<Result<<K as Resource>::Event, Status>>;

impl Api {
    pub async fn watch<K: Kind>(&self, req: WatchRequest) -> ApiResult<EventStream<K>> {
        let query = Query::<K>::parse(&req.namespace, &req.label_selector, &req.field_selector)?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let mut initial = Vec::new();
        let start = match req.resource_version.as_str() {
            "" | "0" => {
                let revision = self.list_revision(&req.resource_version).await?;
                let list = flotilla_proto::api::ListRequest {
                    namespace: req.namespace.clone(),
                    label_selector: req.label_selector.clone(),
                    field_selector: req.field_selector.clone(),
                    resource_version: revision.to_string(),
                    ..Default::default()
                };
                let (items, _) = self.list::<K>(&list).await?;
                initial = items;
                revision + 1
            }
            rv => {
                let rev = self.list_revision(rv).await?;
                rev + 1
            }
        };
        let prefix = query.prefix();
        let spec = WatchSpec {
            id: 0,
            range: KeyRange::new(&prefix, &prefix_end(&prefix)),
            start,
            prev_kv: true,
            no_put: false,
            no_delete: false,
            progress_notify: req.allow_bookmarks,
        };
        let node = self.node().clone();
        let encryption = self.encryption().clone();
        tokio::spawn(async move {
            for object in initial {
                if tx.send(Ok(K::make_event("ADDED", object))).await.is_err() {
                    return;
                }
            }
            let (out_tx, mut out) = mpsc::channel(64);
            let (control_tx, mut control) = mpsc::unbounded_channel();
            let _watcher = node.kv().watch(spec, out_tx, control_tx);
            let mut stopping = node.shutdown_signal();
            loop {
                let output = tokio::select! {
                    o = out.recv() => o,
                    o = control.recv() => o,
                    _ = tx.closed() => return,
                    _ = async { stopping.wait_for(|s| *s).await.map(|_| ()) } => {
                        // Let the client resume on another member now, not when TCP gives up.
                        let _ = tx
                            .send(Err(Status::unavailable("this member is shutting down; watch again on another")))
                            .await;
                        return;
                    }
                };
                let Some(output) = output else { return };
                match output {
                    WatchOutput::Events { events, .. } => {
                        for event in &events {
                            match translate::<K>(&query, &encryption, event) {
                                Ok(Some(e)) => {
                                    if tx.send(Ok(e)).await.is_err() {
                                        return;
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    let _ = tx.send(Err(e.into())).await;
                                    return;
                                }
                            }
                        }
                    }
                    WatchOutput::Progress { revision, .. } => {
                        if req.allow_bookmarks {
                            let mut object = K::default();
                            object.set_type_meta();
                            object.metadata_mut().resource_version = revision.to_string();
                            if tx
                                .send(Ok(K::make_event("BOOKMARK", object)))
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                    WatchOutput::Canceled {
                        compact_revision,
                        reason,
                        ..
                    } => {
                        let status = if compact_revision > 0 {
                            Status::out_of_range(format!(
                                "expired: history before revision {compact_revision} has been \
                                 compacted; list again and watch from the list's resourceVersion"
                            ))
                        } else {
                            Status::unavailable(format!(
                                "watch canceled: {reason}; watch again from the last \
                                 resourceVersion received"
                            ))
                        };
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// One store event as the watch of `query` sees it, if at all.
fn translate<K: Kind>(
    query: &Query<K>,
    encryption: &Encryption,
    event: &StoreEvent,
) -> ApiResult<Option<K::Event>> {
    let decode = |kv: &flotilla_proto::mvccpb::KeyValue, revision: i64| -> ApiResult<K> {
        encryption.decode(kv, revision)
    };
    let Some(kv) = &event.kv else {
        return Ok(None);
    };
    let before = match &event.prev_kv {
        Some(prev) => Some(decode(prev, prev.mod_revision)?),
        None => None,
    };
    let matched_before = before.as_ref().is_some_and(|o| query.matches(o));
    if event.r#type == EventType::Delete as i32 {
        return Ok(match before {
            Some(mut o) if matched_before => {
                o.metadata_mut().resource_version = kv.mod_revision.to_string();
                Some(K::make_event("DELETED", o))
            }
            _ => None,
        });
    }
    let now = decode(kv, kv.mod_revision)?;
    let matches_now = query.matches(&now);
    Ok(match (matched_before, matches_now) {
        (true, true) => Some(K::make_event("MODIFIED", now)),
        (false, true) => Some(K::make_event("ADDED", now)),
        (true, false) => Some(K::make_event("DELETED", now)),
        (false, false) => None,
    })
}
