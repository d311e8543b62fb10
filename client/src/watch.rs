//! A watch that survives its server: it resumes from the last revision it saw, on the next
//! server, until the revision is compacted (then it says so, and the caller relists).

use std::time::Duration;

use flotilla_proto::api::{Resource, WatchRequest};
use tokio::sync::mpsc;

use crate::client::{Client, ClientError};

/// What a resuming watch yields.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchItem<K> {
    Added(K),
    Modified(K),
    Deleted(K),
    /// Everything up to this revision has been delivered.
    Bookmark(i64),
    /// The revision to resume from has been compacted: list again, then watch from the list's
    /// revision. The watch has ended.
    Expired,
}

/// Starts a watch that resumes through disconnects and server failures. It ends (the
/// receiver yields `None`) after [`WatchItem::Expired`], after an error that retrying cannot
/// fix (sent first), or when the receiver is dropped.
pub fn watch<K: Resource>(
    client: Client,
    req: WatchRequest,
) -> mpsc::Receiver<Result<WatchItem<K>, ClientError>> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut req = req;
        let mut pause = Duration::from_millis(100);
        loop {
            let mut stream = match client.watch_once::<K>(&req).await {
                Ok(s) => s,
                Err(e) if e.is_expired() => {
                    let _ = tx.send(Ok(WatchItem::Expired)).await;
                    return;
                }
                Err(e) if retryable(&e) => {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = tx.closed() => return,
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = tx.closed() => return,
                };
                match message {
                    Ok(Some(event)) => {
                        pause = Duration::from_millis(100);
                        let (kind, object) = K::event_parts(event);
                        let rv = object.resource_version().to_string();
                        let item = match kind.as_str() {
                            "ADDED" => WatchItem::Added(object),
                            "MODIFIED" => WatchItem::Modified(object),
                            "DELETED" => WatchItem::Deleted(object),
                            "BOOKMARK" => WatchItem::Bookmark(rv.parse().unwrap_or_default()),
                            other => {
                                tracing::warn!("unknown watch event type {other:?}");
                                continue;
                            }
                        };
                        if !rv.is_empty() {
                            req.resource_version = rv;
                        }
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        let e = ClientError::from(status);
                        if e.is_expired() {
                            let _ = tx.send(Ok(WatchItem::Expired)).await;
                            return;
                        }
                        if !retryable(&e) {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                        tracing::debug!("watch of {} interrupted: {e}; resuming", K::PLURAL);
                        let (i, _) = client.channel();
                        client.fail_over(i);
                        break;
                    }
                }
            }
        }
    });
    rx
}

fn retryable(e: &ClientError) -> bool {
    use tonic::Code;
    matches!(
        e.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Internal
    )
}
