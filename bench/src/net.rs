//! Endpoints, gRPC channels and readable descriptions of failed requests.

use std::error::Error as _;
use std::time::Duration;

use anyhow::Context;
use flotilla_transport::Dialer;
use tonic::transport::Channel;

/// Splits `HOST:PORT,HOST:PORT,...` into endpoints; fails when none is given.
pub fn endpoint_list(s: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!list.is_empty(), "--endpoints is empty");
    Ok(list)
}

static DIALER: std::sync::OnceLock<Dialer> = std::sync::OnceLock::new();

/// Makes every connection of this run TLS (`--cacert`, `--cert`, `--key`, as etcdctl's).
pub fn use_tls(dialer: Dialer) {
    let _ = DIALER.set(dialer);
}

/// How this run connects: TLS after [`use_tls`], else plaintext.
pub fn dialer() -> Dialer {
    DIALER.get().cloned().unwrap_or_default()
}

/// A lazily connected channel to one endpoint (`HOST:PORT` or a full URL), TLS or not as
/// [`dialer`] says.
///
/// Connection failures surface on the first request, as a `tonic::Status`; with `timeout`, every
/// request on the channel fails after that long.
pub fn channel(endpoint: &str, timeout: Option<Duration>) -> anyhow::Result<Channel> {
    let mut e = dialer()
        .endpoint(endpoint)
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1));
    if let Some(t) = timeout {
        e = e.timeout(t);
    }
    Ok(e.connect_lazy())
}

/// `endpoint: Code: message (cause: cause ...)`: a failed request with the endpoint it went to
/// and the transport error behind it, which tonic's message alone often hides.
pub fn describe(endpoint: &str, status: &tonic::Status) -> String {
    let mut s = format!("{endpoint}: {:?}: {}", status.code(), status.message());
    let mut cause = status.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s.push_str(&format!(": {c_text}"));
        }
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_split_on_commas() {
        let l = endpoint_list(" a:1, b:2 ,,c:3").expect("three endpoints");
        assert_eq!(l, ["a:1", "b:2", "c:3"]);
        assert!(endpoint_list(" , ").is_err());
    }
}
