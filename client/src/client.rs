//! The typed client. One generic method per verb, for every kind, over the API's gRPC
//! services; a call that finds its server unavailable moves on to the next one.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_proto::api::*;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

use crate::breaker::{self, Breaker, Gate, RateLimiter, jittered, pushback};

/// A call failed; `status` is what the server (or the transport) said.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", status.message())]
pub struct ClientError {
    pub status: Status,
}

impl ClientError {
    pub fn code(&self) -> Code {
        self.status.code()
    }
    pub fn is_not_found(&self) -> bool {
        self.code() == Code::NotFound
    }
    pub fn is_conflict(&self) -> bool {
        self.code() == Code::Aborted
    }
    pub fn is_already_exists(&self) -> bool {
        self.code() == Code::AlreadyExists
    }
    /// The revision asked for is compacted: list again.
    pub fn is_expired(&self) -> bool {
        self.code() == Code::OutOfRange
    }
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        Self { status }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A client of the control plane.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addrs: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    timeout: Duration,
    /// Whether the channels are TLS.
    tls: bool,
    /// Sent as `authorization` with every call: the dialer's bearer token.
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    /// Sent as `flotilla-fence-term` with every call: writes apply only under that term's
    /// leader.
    fence_term: Option<u64>,
    /// Shared by every call (see [`crate::breaker`]).
    breaker: Arc<Breaker>,
    /// client-go's QPS and burst, when set ([`Client::with_rate_limit`]).
    limiter: Option<Arc<RateLimiter>>,
}

/// The largest message the client sends or accepts (a list of many objects is one message).
const MAX_MESSAGE: usize = 256 << 20;

/// Codes that mean "this server cannot answer now; another may".
fn should_fail_over(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

impl Client {
    /// A plaintext client of the servers at `addrs` (`HOST:PORT`); connections are made on
    /// first use.
    pub fn new<S: AsRef<str>>(addrs: &[S]) -> std::result::Result<Self, String> {
        Self::with_dialer(addrs, &flotilla_transport::Dialer::plain())
    }

    /// A client of the servers at `addrs`, connecting as `dialer` says (TLS, the caller's
    /// certificate); connections are made on first use.
    pub fn with_dialer<S: AsRef<str>>(
        addrs: &[S],
        dialer: &flotilla_transport::Dialer,
    ) -> std::result::Result<Self, String> {
        if addrs.is_empty() {
            return Err("no server address given".into());
        }
        let authorization = match dialer.token() {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| "the bearer token has characters a header cannot carry")?,
            ),
            None => None,
        };
        let mut channels = Vec::new();
        let mut names = Vec::new();
        for addr in addrs {
            let addr = addr.as_ref().trim();
            let endpoint = dialer
                .endpoint(addr)
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            channels.push(endpoint.connect_lazy());
            names.push(addr.to_string());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                addrs: names,
                channels,
                current: AtomicUsize::new(0),
                timeout: Duration::from_secs(30),
                tls: dialer.is_tls(),
                authorization,
                fence_term: None,
                breaker: Arc::default(),
                limiter: None,
            }),
        })
    }

    /// The same servers, with every write fenced to the leader of Raft term `term`: the
    /// server applies it only if that leader appends it (for work that must stop the moment
    /// its member stops leading, such as the scheduler and the controllers).
    pub fn fenced(&self, term: u64) -> Self {
        self.derived(Some(term), self.inner.limiter.clone())
    }

    /// The same servers, every call waiting for a token of a bucket of `burst` that refills
    /// `qps` a second (client-go's `--kube-api-qps` and `--kube-api-burst`, which
    /// kube-controller-manager bounds its writes with): what bounds how fast a runaway
    /// controller can write.
    pub fn with_rate_limit(&self, qps: f64, burst: u32) -> Self {
        self.derived(
            self.inner.fence_term,
            Some(Arc::new(RateLimiter::new(qps, burst))),
        )
    }

    /// The same servers and breaker, with this fence and rate limit.
    fn derived(&self, fence_term: Option<u64>, limiter: Option<Arc<RateLimiter>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                addrs: self.inner.addrs.clone(),
                channels: self.inner.channels.clone(),
                current: AtomicUsize::new(self.inner.current.load(Ordering::Relaxed)),
                timeout: self.inner.timeout,
                tls: self.inner.tls,
                authorization: self.inner.authorization.clone(),
                fence_term,
                breaker: self.inner.breaker.clone(),
                limiter,
            }),
        }
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(msg);
        if let Some(v) = &self.inner.authorization {
            request.metadata_mut().insert("authorization", v.clone());
        }
        if let Some(term) = self.inner.fence_term
            && let Ok(v) = term.to_string().parse()
        {
            request.metadata_mut().insert("flotilla-fence-term", v);
        }
        request
    }

    /// The addresses this client uses, in order.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The channel to the server in use now, and its index.
    pub fn channel(&self) -> (usize, Channel) {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        (i, self.inner.channels[i].clone())
    }

    /// Moves on from server `failed` to the next one (unless another call already did).
    pub fn fail_over(&self, failed: usize) {
        let next = (failed + 1) % self.inner.channels.len();
        let _ =
            self.inner
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Tries `once` on each server in turn while they are unavailable, at most three rounds,
    /// behind the client's breaker (see [`crate::breaker`]): waits as an overloaded server
    /// asks, and after a round in which every server failed, as the breaker says.
    async fn with_retries<T, F, Fut>(&self, path: &str, mut once: F) -> Result<T>
    where
        F: FnMut(usize, Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let n = self.inner.channels.len();
        let mut last = Status::unavailable("no server reachable");
        let mut rounds_left = 3;
        while rounds_left > 0 {
            let probe = match self.inner.breaker.enter().await {
                Gate::Down => {
                    rounds_left -= 1;
                    continue;
                }
                Gate::Go => false,
                Gate::Probe => true,
            };
            for _ in 0..n {
                if let Some(limiter) = &self.inner.limiter {
                    limiter.acquire().await;
                }
                let (i, channel) = self.channel();
                match once(i, channel).await {
                    Ok(r) => {
                        self.inner.breaker.reached();
                        return Ok(r);
                    }
                    Err(s) if pushback(&s).is_some() => {
                        // Up, but overloaded: wait as it asks, then try it again.
                        self.inner.breaker.reached();
                        let wait = pushback(&s).unwrap_or(breaker::FIRST);
                        tracing::debug!(server = %self.inner.addrs[i], ?wait, "{path}: overloaded");
                        last = s;
                        tokio::time::sleep(jittered(wait).max(wait)).await;
                    }
                    Err(s) if should_fail_over(s.code()) => {
                        tracing::debug!(server = %self.inner.addrs[i], "{path}: {}", s.message());
                        last = s;
                        self.fail_over(i);
                    }
                    Err(s) => {
                        // The server answered: the control plane is up.
                        self.inner.breaker.reached();
                        return Err(self.with_hint(s).into());
                    }
                }
            }
            self.inner.breaker.round_failed(probe);
            rounds_left -= 1;
        }
        Err(self.with_hint(last).into())
    }

    /// `status` with a hint when it looks like the client and the servers disagree about
    /// TLS (a plaintext client at a TLS port sees its connection dropped mid-handshake).
    fn with_hint(&self, status: Status) -> Status {
        let message = status.message().to_ascii_lowercase();
        let hint = if !self.inner.tls
            && [
                "h2 protocol error",
                "connection reset",
                "connection closed",
                "broken pipe",
            ]
            .iter()
            .any(|m| message.contains(m))
        {
            "; if the servers serve TLS, use a kubeconfig with the cluster's CA and your \
             certificate (--kubeconfig, or KUBECONFIG; see docs/security.md)"
        } else if self.inner.tls
            && ["invalidcontenttype", "corrupt message"]
                .iter()
                .any(|m| message.contains(m))
        {
            "; the servers may serve plaintext: check the kubeconfig's https:// addresses"
        } else {
            return status;
        };
        // Not the server's answer (tonic words a dropped HTTP/2 connection as INTERNAL):
        // this client could not talk to it.
        Status::with_metadata(
            Code::Unavailable,
            format!("{}{hint}", status.message()),
            status.metadata().clone(),
        )
    }

    /// A unary call, tried on each server in turn while they are unavailable (see
    /// [`Client::with_retries`]).
    pub async fn unary<Req, Resp>(&self, path: &'static str, req: Req) -> Result<Resp>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.with_retries(path, |i, channel| {
            let req = req.clone();
            async move {
                let mut grpc = tonic::client::Grpc::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE);
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("{}: {e}", self.inner.addrs[i])))?;
                let mut request = self.request(req);
                request.set_timeout(self.inner.timeout);
                grpc.unary(
                    request,
                    PathAndQuery::from_static(path),
                    ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Opens a server stream on the current server (failing over while it is unavailable).
    pub async fn server_stream<Req, Resp>(
        &self,
        path: &'static str,
        req: Req,
    ) -> Result<tonic::Streaming<Resp>>
    where
        Req: prost::Message + Clone + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.with_retries(path, |i, channel| {
            let req = req.clone();
            async move {
                let mut grpc =
                    tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
                grpc.ready()
                    .await
                    .map_err(|e| Status::unavailable(format!("{}: {e}", self.inner.addrs[i])))?;
                grpc.server_streaming(
                    self.request(req),
                    PathAndQuery::from_static(path),
                    ProstCodec::<Req, Resp>::default(),
                )
                .await
                .map(|r| r.into_inner())
            }
        })
        .await
    }

    // ------------------------------------------------------------------ verbs

    pub async fn create<K: Resource>(&self, object: &K) -> Result<K> {
        self.unary(method::<K>("Create"), object.clone()).await
    }

    pub async fn get<K: Resource>(&self, namespace: &str, name: &str) -> Result<K> {
        let req = GetRequest {
            namespace: namespace.into(),
            name: name.into(),
        };
        self.unary(method::<K>("Get"), req).await
    }

    /// Every object matching `req`, following continue tokens (pages of `req.limit`).
    pub async fn list<K: Resource>(&self, req: &ListRequest) -> Result<(Vec<K>, ListMeta)> {
        let mut req = req.clone();
        let mut all = Vec::new();
        loop {
            let list: K::List = self.unary(method::<K>("List"), req.clone()).await?;
            let (items, meta) = K::list_items(list);
            all.extend(items);
            if meta.r#continue.is_empty() || req.limit == 0 {
                return Ok((all, meta));
            }
            req.r#continue = meta.r#continue.clone();
        }
    }

    /// One page of a list.
    pub async fn list_page<K: Resource>(&self, req: &ListRequest) -> Result<K::List> {
        self.unary(method::<K>("List"), req.clone()).await
    }

    pub async fn update<K: Resource>(&self, object: &K) -> Result<K> {
        self.unary(method::<K>("Update"), object.clone()).await
    }

    pub async fn update_status<K: Resource>(&self, object: &K) -> Result<K> {
        self.unary(method::<K>("UpdateStatus"), object.clone())
            .await
    }

    pub async fn delete<K: Resource>(&self, req: &DeleteRequest) -> Result<K> {
        self.unary(method::<K>("Delete"), req.clone()).await
    }

    /// Deletes by name with the defaults (the kind's grace period, background propagation).
    pub async fn delete_named<K: Resource>(&self, namespace: &str, name: &str) -> Result<K> {
        let req = DeleteRequest {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        };
        self.delete::<K>(&req).await
    }

    /// Applies a JSON merge patch.
    pub async fn patch<K: Resource>(
        &self,
        namespace: &str,
        name: &str,
        patch: &serde_json::Value,
    ) -> Result<K> {
        let req = PatchRequest {
            namespace: namespace.into(),
            name: name.into(),
            patch: patch.to_string(),
            subresource: String::new(),
        };
        self.unary(method::<K>("Patch"), req).await
    }

    pub async fn bind(&self, namespace: &str, pod: &str, node: &str) -> Result<Pod> {
        self.bind_uid(namespace, pod, "", node).await
    }

    /// Binds the pod only if it is still the one with this uid (not a namesake created
    /// since); an empty uid binds whichever pod has the name.
    pub async fn bind_uid(&self, namespace: &str, pod: &str, uid: &str, node: &str) -> Result<Pod> {
        let binding = Binding {
            metadata: Some(ObjectMeta {
                name: pod.into(),
                namespace: namespace.into(),
                uid: uid.into(),
                ..Default::default()
            }),
            target: Some(ObjectReference {
                kind: "Node".into(),
                name: node.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.unary("/flotilla.api.v1.Pods/Bind", binding).await
    }

    /// Evicts a pod: deleted unless a PodDisruptionBudget forbids it now, which is
    /// `RESOURCE_EXHAUSTED` (Kubernetes' 429; try again later). `grace` overrides the pod's
    /// termination grace period.
    pub async fn evict(&self, namespace: &str, pod: &str, grace: Option<i64>) -> Result<Pod> {
        let eviction = Eviction {
            api_version: "policy/v1".into(),
            kind: "Eviction".into(),
            metadata: Some(ObjectMeta {
                name: pod.into(),
                namespace: namespace.into(),
                ..Default::default()
            }),
            delete_options: Some(EvictionOptions {
                grace_period_seconds: grace,
                ..Default::default()
            }),
        };
        self.unary("/flotilla.api.v1.Pods/Evict", eviction).await
    }

    /// One watch stream, as the server sends it (see [`crate::watch`] for one that resumes).
    pub async fn watch_once<K: Resource>(
        &self,
        req: &WatchRequest,
    ) -> Result<tonic::Streaming<K::Event>> {
        self.server_stream(method::<K>("Watch"), req.clone()).await
    }
}

/// `/flotilla.api.v1.Pods/Create`, interned so it can be a `&'static str`.
pub fn method<K: Resource>(verb: &str) -> &'static str {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static PATHS: Mutex<Option<HashMap<(&'static str, String), &'static str>>> = Mutex::new(None);
    let mut paths = PATHS.lock().unwrap_or_else(|p| p.into_inner());
    let paths = paths.get_or_insert_with(HashMap::new);
    paths
        .entry((K::SERVICE, verb.to_string()))
        .or_insert_with(|| Box::leak(format!("/{}/{verb}", K::SERVICE).into_boxed_str()))
}
