//! Fenced writes: a request carrying the metadata `flotilla-fence-term: T` has every write
//! it makes applied only if the Raft leader of term T appends it (see the store's
//! `Command::Fenced`). The scheduler and controllers send it with the term in which their
//! member became leader, so that once a new leader is elected nothing the old one still had
//! in flight can land.

use tonic::metadata::MetadataMap;

/// The request metadata that carries the term.
pub const HEADER: &str = "flotilla-fence-term";

tokio::task_local! {
    static TERM: Option<u64>;
}

/// The fence term of the request being served, if it has one.
pub fn current() -> Option<u64> {
    TERM.try_with(|t| *t).ok().flatten()
}

/// The term a request asks its writes to be fenced with; a malformed value is an error.
pub fn from_metadata(m: &MetadataMap) -> Result<Option<u64>, tonic::Status> {
    match m.get(HEADER) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                tonic::Status::invalid_argument(format!("{HEADER}: must be a Raft term (a number)"))
            }),
    }
}

/// Runs `f` with the request's fence term in effect.
pub async fn scope<F: Future>(term: Option<u64>, f: F) -> F::Output {
    TERM.scope(term, f).await
}
