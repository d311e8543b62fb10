//! The agent's log service: the API server asks it for a container's output (`flotilla
//! logs`), by pod uid and container name.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::api::{LogChunk, PodLogsRequest};
use flotilla_proto::flotilla_agent_v1::agent_server::Agent;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::runtime::{ContainerState, Runtime};

pub struct LogService<R> {
    pub rt: Arc<R>,
    /// Whether the port serves TLS: then every caller must be identified.
    pub tls: bool,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

/// The last `n` lines of `data`.
fn tail(data: &[u8], n: usize) -> &[u8] {
    let mut seen = 0;
    // A final newline ends the last line rather than starting an empty one.
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

#[tonic::async_trait]
impl<R: Runtime> Agent for LogService<R> {
    type LogsStream = ChunkStream;

    async fn logs(&self, r: Request<PodLogsRequest>) -> Result<Response<ChunkStream>, Status> {
        // Over TLS, logs are for the members (the API server's proxy) and administrators;
        // other certificates from the CA (another node's, a user's) are refused.
        let peer = flotilla_transport::ConnInfo::of(&r).and_then(|c| c.peer.as_deref());
        match peer {
            None if self.tls => {
                return Err(Status::unauthenticated("no client certificate"));
            }
            Some(p) if !(p.is_member() || p.groups.iter().any(|g| g == "system:masters")) => {
                return Err(Status::permission_denied(format!(
                    "User {:?} cannot get resource \"pods/log\" from this node's agent: only \
                     the control plane's members and system:masters may",
                    p.user
                )));
            }
            _ => {}
        }
        let req = r.into_inner();
        let mut runs: Vec<_> = self
            .rt
            .list()
            .await
            .into_iter()
            .filter(|c| c.pod_uid == req.uid && c.container == req.container)
            .collect();
        runs.sort_by_key(|c| c.restart_count);
        let run = if req.previous {
            if runs.len() < 2 {
                return Err(Status::not_found(format!(
                    "previous terminated container {:?} in pod {:?} not found",
                    req.container, req.name
                )));
            }
            runs[runs.len() - 2].clone()
        } else {
            runs.pop().ok_or_else(|| {
                Status::not_found(format!(
                    "container {:?} in pod {:?} has not run on this node (yet)",
                    req.container, req.name
                ))
            })?
        };
        let files: Vec<PathBuf> = self.rt.log_files(&run.id);
        if files.is_empty() {
            return Err(Status::not_found(format!(
                "the {} runtime keeps no logs",
                self.rt.name()
            )));
        }
        // What is there now: the rotated file, then the current one.
        let current = files[0].clone();
        let mut data = Vec::new();
        for f in files.iter().skip(1).rev() {
            if let Ok(bytes) = tokio::fs::read(f).await {
                data.extend(bytes);
            }
        }
        let now = tokio::fs::read(&current).await.unwrap_or_default();
        let mut offset = now.len() as u64;
        data.extend(now);
        let first = if req.tail_lines > 0 {
            tail(&data, req.tail_lines as usize).to_vec()
        } else {
            data
        };
        let (tx, rx) = mpsc::channel::<Result<LogChunk, Status>>(16);
        let rt = self.rt.clone();
        let follow = req.follow && !req.previous;
        tokio::spawn(async move {
            for chunk in first.chunks(64 * 1024) {
                if tx
                    .send(Ok(LogChunk {
                        data: chunk.to_vec(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let running = matches!(rt.state(&run.id).await, ContainerState::Running { .. });
                let len = tokio::fs::metadata(&current)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len < offset {
                    offset = 0; // rotated
                }
                if len > offset
                    && let Ok(mut f) = tokio::fs::File::open(&current).await
                    && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
                {
                    let mut buf = Vec::new();
                    if f.read_to_end(&mut buf).await.is_ok() {
                        offset += buf.len() as u64;
                        if tx.send(Ok(LogChunk { data: buf })).await.is_err() {
                            return;
                        }
                    }
                }
                if !running {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tails_count_lines_from_the_end() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(tail(b"", 1), b"");
    }
}
