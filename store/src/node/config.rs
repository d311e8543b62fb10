//! What a member is started with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::raft::network::PeerFilter;
use crate::watch::WatchConfig;

/// How a member joins: founding a new cluster, or joining one that already runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClusterState {
    #[default]
    New,
    Existing,
}

/// A member's configuration. [`StoreConfig::new`] gives the defaults.
#[derive(Clone)]
pub struct StoreConfig {
    /// This member's name (`--name`), unique in the cluster.
    pub name: String,
    /// Where its state lives (`--data-dir`).
    pub data_dir: PathBuf,
    /// The client address other members advertise for it (`--client-addr`).
    pub client_addr: String,
    /// The peer address other members reach it at (`--peer-addr`).
    pub peer_addr: String,
    /// `name=host:port` of every founding member (`--initial-cluster`). May be empty when the
    /// data dir already holds the member's identity.
    pub initial_cluster: Vec<(String, String)>,
    pub initial_cluster_state: ClusterState,
    /// Distinguishes clusters started from the same `--initial-cluster`.
    pub cluster_token: String,
    pub heartbeat: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// A snapshot is taken after this many entries applied since the last one.
    pub snapshot_entries: u64,
    /// A snapshot is also taken once this many bytes were appended to the log since the last
    /// one (entries carry batches of writes, so their count alone does not bound the log).
    pub snapshot_bytes: u64,
    /// Entries kept behind a snapshot for slow followers.
    pub keep_logs: u64,
    /// Automatic compaction keeps this many revisions of history (0 disables it).
    pub compaction_retention: i64,
    pub compaction_interval: Duration,
    /// How long a client request may wait for its answer.
    pub request_timeout: Duration,
    /// Largest client request accepted (etcd's `--max-request-bytes`).
    pub max_request_bytes: usize,
    /// A range's answer is cut after this many bytes of keys and values, with `more` set
    /// (`--max-range-response-bytes`; etcd has no such bound: a client that wants more pages
    /// with `limit` and the last key).
    pub max_range_response_bytes: usize,
    /// The key space's size on disk beyond which the `NOSPACE` alarm is raised (etcd's
    /// `--quota-backend-bytes`; 0: no quota).
    pub quota_backend_bytes: u64,
    /// How often the leader compares the members' key spaces (zero: never).
    pub corrupt_check_interval: Duration,
    /// Whether a member compares its key space with the others' once at start.
    pub initial_corrupt_check: bool,
    /// Proposals waiting for commit beyond which new ones are refused with "too many requests".
    pub max_pending_proposals: usize,
    pub watch: WatchConfig,
    /// sled's page cache size.
    pub cache_bytes: u64,
    /// Source address of this member's connections to other members (`--peer-source-ip`).
    pub peer_source_ip: Option<std::net::IpAddr>,
    /// Test hook: drops peer traffic the filter refuses.
    pub peer_filter: Option<Arc<dyn PeerFilter>>,
    /// Mutual TLS on the peer port (`--peer-cert-file`, `--peer-key-file`,
    /// `--peer-trusted-ca-file`); plaintext when unset.
    pub peer_tls: Option<PeerTls>,
    /// Whether the client port serves TLS: the member list then shows `https://` URLs.
    pub client_tls: bool,
}

/// A member's TLS towards its peers: how it serves them (only members' certificates from
/// the CA are let in) and how it dials them (its own certificate, the same CA).
#[derive(Clone)]
pub struct PeerTls {
    pub server: flotilla_transport::ServerTls,
    pub dialer: flotilla_transport::Dialer,
}

impl PeerTls {
    /// From etcd's three peer flags.
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        trusted_ca: &std::path::Path,
    ) -> Result<Self, flotilla_transport::Error> {
        Ok(Self {
            server: flotilla_transport::ServerTls::from_files(
                cert,
                key,
                Some(trusted_ca),
                flotilla_transport::ClientAuth::Members,
            )?,
            dialer: flotilla_transport::Dialer::from_files(trusted_ca, Some((cert, key)))?,
        })
    }
}

/// Default client port.
pub const DEFAULT_CLIENT_PORT: u16 = 7379;
/// Default peer port.
pub const DEFAULT_PEER_PORT: u16 = 7380;

impl StoreConfig {
    pub fn new(name: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            data_dir: data_dir.into(),
            client_addr: format!("127.0.0.1:{DEFAULT_CLIENT_PORT}"),
            peer_addr: format!("127.0.0.1:{DEFAULT_PEER_PORT}"),
            initial_cluster: Vec::new(),
            peer_source_ip: None,
            initial_cluster_state: ClusterState::New,
            cluster_token: "flotilla".into(),
            heartbeat: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(360),
            snapshot_entries: 10_000,
            snapshot_bytes: 1024 * 1024,
            keep_logs: 100,
            compaction_retention: 10_000,
            compaction_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_request_bytes: 1536 * 1024,
            max_pending_proposals: 20_000,
            quota_backend_bytes: 2 * 1024 * 1024 * 1024,
            max_range_response_bytes: 16 * 1024 * 1024,
            corrupt_check_interval: Duration::from_secs(300),
            initial_corrupt_check: true,
            watch: WatchConfig::default(),
            cache_bytes: 64 * 1024 * 1024,
            peer_filter: None,
            peer_tls: None,
            client_tls: false,
        }
    }

    /// Election timeout bounds must leave room for several heartbeats.
    ///
    /// A follower that hears nothing from its leader starts an election after
    /// `election_timeout_max` (openraft's leader lease) plus a random timeout between the two
    /// bounds: 560–720 ms of silence with the defaults.
    /// How this member dials its peers.
    pub(crate) fn peer_dialer(&self) -> flotilla_transport::Dialer {
        self.peer_tls
            .as_ref()
            .map(|t| t.dialer.clone())
            .unwrap_or_default()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("--name must not be empty".into());
        }
        if self.heartbeat.is_zero() || self.election_timeout_min < self.heartbeat * 2 {
            return Err(format!(
                "the election timeout ({:?}) must be at least 2 heartbeats ({:?})",
                self.election_timeout_min, self.heartbeat
            ));
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return Err("the maximum election timeout must exceed the minimum".into());
        }
        if self.snapshot_entries == 0 {
            return Err("--snapshot-count must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses `n1=host:port,n2=host:port`; names and addresses must be unique.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, addr)) = part.split_once('=') else {
            return Err(format!("--initial-cluster: `{part}` is not NAME=HOST:PORT"));
        };
        // etcd's form carries a scheme; TLS is the flags' business, not the address's.
        let addr = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://");
        if name.is_empty() || !addr.contains(':') {
            return Err(format!("--initial-cluster: `{part}` is not NAME=HOST:PORT"));
        }
        if out.iter().any(|(n, a)| n == name || a == addr) {
            return Err(format!(
                "--initial-cluster: `{part}` repeats a name or an address"
            ));
        }
        out.push((name.to_string(), addr.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_refuses_duplicates() {
        let c = parse_initial_cluster("a=127.0.0.1:1,b=http://127.0.0.1:2,c=https://127.0.0.1:3")
            .unwrap();
        assert_eq!(c[1], ("b".to_string(), "127.0.0.1:2".to_string()));
        assert_eq!(c[2], ("c".to_string(), "127.0.0.1:3".to_string()));
        assert!(parse_initial_cluster("a=127.0.0.1:1,a=127.0.0.1:2").is_err());
        assert!(parse_initial_cluster("a127.0.0.1:1").is_err());
        assert!(parse_initial_cluster("a=nohost").is_err());
    }
}
