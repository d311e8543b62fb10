//! Authentication at the client port's door: one tower layer in front of every route.
//!
//! A request is authenticated by the first that works of: the client certificate the TLS
//! handshake verified (CN the user, O the groups; a member's serving certificate counts as
//! `system:masters`, since whoever holds it can already join the Raft group), then a bearer
//! token from the token file (`authorization: Bearer TOKEN`). With identity checks on, a
//! request with neither gets `Unauthenticated`, as does one with an unknown token and no
//! certificate. The etcd face (etcd's KV, Watch, Lease, Cluster and Maintenance services,
//! so raw keys and membership) is for `system:masters` only. The [`Caller`] is put in the
//! request's extensions for the API services to authorize each request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use flotilla_transport::ConnInfo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response, header};
use tonic::{Code, Status};

use super::audit::{AuditLog, Event, http_code};
use super::tokens::Tokens;
use super::{AUTHENTICATED, Caller, MASTERS, UserInfo};

/// The gRPC packages of the etcd face.
const ETCD_PACKAGES: &[&str] = &["/etcdserverpb.", "/v3electionpb.", "/v3lockpb."];

/// How a member authenticates its clients.
#[derive(Clone, Debug, Default)]
pub struct Authn {
    /// Whether identities are checked at all.
    pub enabled: bool,
    pub tokens: Tokens,
    pub audit: Option<AuditLog>,
    /// The bound on API requests in flight (kube-apiserver's max-in-flight filter).
    pub inflight: Inflight,
}

/// kube-apiserver's `--max-requests-inflight` and `--max-mutating-requests-inflight`: API
/// requests being served at once, read-only and mutating apart; one past the bound is
/// answered at once with 429 (`ResourceExhausted`, "Too many requests, please try again
/// later.", and a retry hint of 1 s) instead of queueing and growing memory. As in
/// kube-apiserver, long-running requests (watches, log streams) are not counted and
/// `system:masters` (the members, the scheduler and controllers, administrators) is not
/// held to it; nor is anyone on a member that checks no identities. None: no bound.
#[derive(Clone, Debug, Default)]
pub struct Inflight {
    pub readonly: Option<Arc<Semaphore>>,
    pub mutating: Option<Arc<Semaphore>>,
}

impl Inflight {
    /// Bounds of `readonly` and `mutating` requests; 0 is no bound.
    pub fn new(readonly: usize, mutating: usize) -> Self {
        let bound = |n: usize| (n > 0).then(|| Arc::new(Semaphore::new(n)));
        Inflight {
            readonly: bound(readonly),
            mutating: bound(mutating),
        }
    }

    /// A place for the API request to gRPC `path`, or None when the bound is reached.
    /// Ok(None): the request is not counted.
    fn admit(&self, path: &str) -> Result<Option<OwnedSemaphorePermit>, ()> {
        if !path.starts_with(API_PACKAGE) {
            return Ok(None);
        }
        let semaphore = match method(path) {
            "Watch" | "Logs" => return Ok(None),
            "Get" | "List" | "CreateSelf" => &self.readonly,
            _ => &self.mutating,
        };
        match semaphore {
            None => Ok(None),
            Some(s) => s.clone().try_acquire_owned().map(Some).map_err(|_| ()),
        }
    }
}

/// The gRPC package of the Kubernetes-shaped API.
const API_PACKAGE: &str = "/flotilla.api.v1.";
/// The retry hint of a request over the in-flight bound (Kubernetes' Retry-After: 1).
const INFLIGHT_RETRY_MS: u32 = 1000;

impl Authn {
    /// The caller of a request on `conn` with `headers`, or why it has none.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        conn: Option<&ConnInfo>,
    ) -> Result<Caller, &'static str> {
        if !self.enabled {
            return Ok(Caller::Unchecked);
        }
        if let Some(peer) = conn.and_then(|c| c.peer.as_deref()) {
            let mut groups = peer.groups.clone();
            if peer.is_member() && !groups.iter().any(|g| g == MASTERS) {
                groups.push(MASTERS.to_string());
            }
            groups.push(AUTHENTICATED.to_string());
            return Ok(Caller::User(Arc::new(UserInfo {
                name: peer.user.clone(),
                uid: String::new(),
                groups,
            })));
        }
        match bearer(headers) {
            Some(token) => match self.tokens.get(token) {
                Some(user) => Ok(Caller::User(user.clone())),
                None => Err("Unauthorized: the bearer token is not known to this cluster"),
            },
            None => Err(
                "Unauthorized: present a client certificate signed by the cluster's CA or a \
                 bearer token",
            ),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The layer that authenticates every request but `plain_http`'s paths (`/metrics`,
/// `/healthz`, `/readyz`).
pub fn layer(authn: Arc<Authn>, plain_http: &'static [&'static str]) -> AuthnLayer {
    AuthnLayer { authn, plain_http }
}

#[derive(Clone, Debug)]
pub struct AuthnLayer {
    authn: Arc<Authn>,
    plain_http: &'static [&'static str],
}

impl<S> tower::Layer<S> for AuthnLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            authn: self.authn.clone(),
            plain_http: self.plain_http,
        }
    }
}

/// See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Authenticate<S> {
    inner: S,
    authn: Arc<Authn>,
    plain_http: &'static [&'static str],
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Authenticate<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        if self.plain_http.contains(&path.as_str()) {
            return Box::pin(self.inner.call(req));
        }
        let received = SystemTime::now();
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let source = conn.as_ref().and_then(|c| c.remote);
        let audit = self.authn.audit.clone();
        let refuse = move |user: Option<&UserInfo>, status: Status| {
            if let Some(log) = &audit {
                log.record(&Event {
                    user,
                    source,
                    verb: method(&path),
                    request_uri: path.clone(),
                    object: None,
                    allowed: false,
                    reason: None,
                    code: http_code(status.code(), false),
                    message: Some(status.message()),
                    received,
                    stage: "ResponseComplete",
                });
            }
            let response: Response<Body> = status.into_http();
            Box::pin(std::future::ready(Ok(response))) as Self::Future
        };
        let caller = match self.authn.authenticate(req.headers(), conn.as_ref()) {
            Ok(caller) => caller,
            Err(why) => return refuse(None, Status::unauthenticated(why)),
        };
        let etcd = ETCD_PACKAGES
            .iter()
            .any(|p| req.uri().path().starts_with(p));
        if etcd && let Caller::User(user) = &caller {
            if !user.in_group(MASTERS) {
                let status = Status::new(
                    Code::PermissionDenied,
                    format!(
                        "etcdserver: permission denied: user \"{}\" may not use the etcd API \
                         (raw keys and membership are for group {MASTERS})",
                        user.name
                    ),
                );
                return refuse(Some(user), status);
            }
            if let Some(log) = &self.authn.audit {
                // The etcd face's requests are audited when they are let in; their outcome
                // is the etcd client's to see.
                let path = req.uri().path();
                log.record(&Event {
                    user: Some(user),
                    source,
                    verb: method(path),
                    request_uri: path.to_string(),
                    object: None,
                    allowed: true,
                    reason: None,
                    code: 200,
                    message: None,
                    received,
                    stage: "ResponseStarted",
                });
            }
        }
        let bounded = matches!(&caller, Caller::User(u) if !u.in_group(MASTERS));
        let permit = match bounded {
            false => None,
            true => match self.authn.inflight.admit(req.uri().path()) {
                Ok(permit) => permit,
                Err(()) => {
                    let mut metadata = tonic::metadata::MetadataMap::new();
                    metadata.insert(crate::errors::RETRY_PUSHBACK, INFLIGHT_RETRY_MS.into());
                    let status = Status::with_metadata(
                        Code::ResourceExhausted,
                        "Too many requests, please try again later.",
                        metadata,
                    );
                    let user = match &caller {
                        Caller::User(u) => Some(u.clone()),
                        Caller::Unchecked => None,
                    };
                    return refuse(user.as_deref(), status);
                }
            },
        };
        req.extensions_mut().insert(caller);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await;
            drop(permit);
            response
        })
    }
}

/// The method of a gRPC path, as the audit log's verb: `/etcdserverpb.KV/Put` → `Put`.
fn method(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}
