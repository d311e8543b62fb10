//! The gRPC services: one per kind, each a thin layer over [`Api`].

use flotilla_proto::api::*;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::auth::{self, Attributes, Caller, Decision};
use crate::errors::{ApiError, ApiResult};
use crate::registry::{Api, effective_namespace};
use crate::watch::EventStream;

type Reply<T> = Result<Response<T>, Status>;

/// What the service layer takes from a request before its body is decoded into work.
struct Ctx {
    caller: Caller,
    fence: Option<u64>,
    source: Option<std::net::SocketAddr>,
    received: SystemTime,
}

impl Ctx {
    fn of<T>(r: &Request<T>) -> Result<Ctx, Status> {
        Ok(Ctx {
            caller: Caller::of(r)?,
            fence: crate::fence::from_metadata(r.metadata())?,
            source: flotilla_transport::ConnInfo::of(r).and_then(|c| c.remote),
            received: SystemTime::now(),
        })
    }
}

impl Api {
    /// Authorizes one request, runs `work` under the request's fence and the authorizer's
    /// restriction, and audits the outcome.
    async fn serve<R, F>(&self, ctx: Ctx, attrs: Attributes, work: F) -> Reply<R>
    where
        F: Future<Output = ApiResult<R>>,
    {
        let restriction = match auth::authorize(&ctx.caller, &attrs, self) {
            Decision::Allow(restriction) => restriction,
            Decision::Deny(message) => {
                let e = ApiError::Forbidden(message);
                self.audit(&ctx, &attrs, Some(&e));
                return Err(e.into());
            }
        };
        let escalation = auth::escalation::for_request(self, &ctx.caller, &attrs);
        let work = auth::escalation::scope(escalation, crate::fence::scope(ctx.fence, work));
        let out = auth::scope(restriction, work).await;
        self.audit(&ctx, &attrs, out.as_ref().err());
        Ok(Response::new(out?))
    }

    fn audit(&self, ctx: &Ctx, attrs: &Attributes, error: Option<&ApiError>) {
        let Some(log) = self.audit_log() else {
            return;
        };
        let message = error.map(|e| e.to_string());
        let forbidden = matches!(error, Some(ApiError::Forbidden(_)));
        let code = error.map(|e| e.code()).unwrap_or(tonic::Code::Ok);
        let stream = attrs.verb == "watch" || attrs.subresource == "log";
        log.record(&auth::audit::Event {
            user: ctx.caller.user(),
            source: ctx.source,
            verb: &attrs.verb,
            request_uri: attrs.request_uri(),
            object: Some(attrs),
            allowed: !forbidden,
            reason: None,
            code: auth::audit::http_code(code, attrs.verb == "create"),
            message: message.as_deref(),
            received: ctx.received,
            stage: if stream && error.is_none() {
                "ResponseStarted"
            } else {
                "ResponseComplete"
            },
        });
    }
}

macro_rules! service {
    // The verbs every kind has, plus `$extra` methods (written out here rather than by a
    // nested macro, which `async_trait` would not see).
    ($module:ident :: $trait:ident, $kind:ty, $list:ty, { $($extra:tt)* }) => {
        #[tonic::async_trait]
        impl $module::$trait for Api {
            async fn create(&self, r: Request<$kind>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let o = r.into_inner();
                let ns = effective_namespace::<$kind>(o.namespace());
                let attrs = Attributes::new::<$kind>("create", &ns, o.name());
                self.serve(ctx, attrs, Api::create(self, o)).await
            }
            async fn get(&self, r: Request<GetRequest>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let ns = effective_namespace::<$kind>(&r.namespace);
                let attrs = Attributes::new::<$kind>("get", &ns, &r.name);
                self.serve(ctx, attrs, Api::get::<$kind>(self, &r.namespace, &r.name)).await
            }
            async fn list(&self, r: Request<ListRequest>) -> Reply<$list> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let attrs = Attributes::new::<$kind>("list", &r.namespace, "");
                self.serve(ctx, attrs, async {
                    let (items, meta) = Api::list::<$kind>(self, &r).await?;
                    Ok(<$kind>::make_list(items, meta))
                })
                .await
            }
            async fn update(&self, r: Request<$kind>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let o = r.into_inner();
                let ns = effective_namespace::<$kind>(o.namespace());
                let attrs = Attributes::new::<$kind>("update", &ns, o.name());
                self.serve(ctx, attrs, Api::update(self, o)).await
            }
            async fn delete(&self, r: Request<DeleteRequest>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let ns = effective_namespace::<$kind>(&r.namespace);
                let attrs = Attributes::new::<$kind>("delete", &ns, &r.name);
                self.serve(ctx, attrs, Api::delete::<$kind>(self, r)).await
            }
            async fn patch(&self, r: Request<PatchRequest>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let ns = effective_namespace::<$kind>(&r.namespace);
                let mut attrs = Attributes::new::<$kind>("patch", &ns, &r.name);
                if r.subresource == "status" {
                    attrs = attrs.subresource("status");
                }
                self.serve(ctx, attrs, Api::patch::<$kind>(self, r)).await
            }
            type WatchStream = EventStream<$kind>;
            async fn watch(&self, r: Request<WatchRequest>) -> Reply<Self::WatchStream> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let attrs = Attributes::new::<$kind>("watch", &r.namespace, "");
                self.serve(ctx, attrs, Api::watch::<$kind>(self, r)).await
            }
            $($extra)*
        }
    };
    // A kind with a status, written only through UpdateStatus.
    ($module:ident :: $trait:ident, $kind:ty, $list:ty, status { $($extra:tt)* }) => {
        service!($module::$trait, $kind, $list, {
            async fn update_status(&self, r: Request<$kind>) -> Reply<$kind> {
                let ctx = Ctx::of(&r)?;
                let o = r.into_inner();
                let ns = effective_namespace::<$kind>(o.namespace());
                let attrs = Attributes::new::<$kind>("update", &ns, o.name()).subresource("status");
                self.serve(ctx, attrs, Api::update_status(self, o)).await
            }
            $($extra)*
        });
    };
}

/// One kind's service: the verbs every kind has, UpdateStatus for a kind with a status,
/// and the subresources of those that have more.
macro_rules! service_of {
    (Pod, $module:ident :: $trait:ident, $list:ident, yes) => {
        service!($module::$trait, Pod, $list, status {
            async fn bind(&self, r: Request<Binding>) -> Reply<Pod> {
                let ctx = Ctx::of(&r)?;
                let b = r.into_inner();
                let meta = b.metadata.clone().unwrap_or_default();
                let ns = effective_namespace::<Pod>(&meta.namespace);
                let attrs = Attributes::new::<Pod>("create", &ns, &meta.name).subresource("binding");
                self.serve(ctx, attrs, Api::bind(self, b)).await
            }
            async fn evict(&self, r: Request<Eviction>) -> Reply<Pod> {
                let ctx = Ctx::of(&r)?;
                let e = r.into_inner();
                let meta = e.metadata.clone().unwrap_or_default();
                let ns = effective_namespace::<Pod>(&meta.namespace);
                let attrs = Attributes::new::<Pod>("create", &ns, &meta.name).subresource("eviction");
                self.serve(ctx, attrs, Api::evict(self, e)).await
            }
            type LogsStream = crate::logs::LogStream;
            async fn logs(&self, r: Request<PodLogsRequest>) -> Reply<Self::LogsStream> {
                let ctx = Ctx::of(&r)?;
                let r = r.into_inner();
                let ns = effective_namespace::<Pod>(&r.namespace);
                let attrs = Attributes::new::<Pod>("get", &ns, &r.name).subresource("log");
                self.serve(ctx, attrs, Api::logs(self, r)).await
            }
        });
    };
    ($ty:ident, $module:ident :: $trait:ident, $list:ident, yes) => {
        service!($module::$trait, $ty, $list, status {});
    };
    ($ty:ident, $module:ident :: $trait:ident, $list:ident, no) => {
        service!($module::$trait, $ty, $list, {});
    };
}

/// Every kind's service, from [`flotilla_proto::for_each_kind!`].
macro_rules! services {
    ([] $(
        $ty:ident {
            list: $list:ident, event: $event:ident, grpc: $module:ident :: $trait:ident / $server:ident,
            api_version: $api_version:literal, plural: $plural:literal, names: [$($alias:literal),* $(,)?],
            namespaced: $ns:literal, status: $status:tt, $($rest:tt)*
        }
    ),* $(,)?) => {
        $( service_of!($ty, $module::$trait, $list, $status); )*
    };
}

for_each_kind!([services]);

#[tonic::async_trait]
impl access_reviews_server::AccessReviews for Api {
    async fn create_self(&self, r: Request<SubjectAccessReview>) -> Reply<SubjectAccessReview> {
        let ctx = Ctx::of(&r)?;
        let mut review = r.into_inner();
        let attrs = auth::review_request("selfsubjectaccessreviews");
        let caller = ctx.caller.clone();
        self.serve(ctx, attrs, async move {
            let spec = review.spec.clone().unwrap_or_default();
            if !spec.user.is_empty() || !spec.groups.is_empty() {
                return Err(ApiError::invalid(
                    "spec.user",
                    "must be empty: a self review asks about the caller (ask with Create, as \
                     system:masters, about someone else)",
                ));
            }
            review.status = Some(auth::review(&caller, &spec, self)?);
            review.kind = "SelfSubjectAccessReview".into();
            review.api_version = "authorization.k8s.io/v1".into();
            Ok(review)
        })
        .await
    }

    async fn create(&self, r: Request<SubjectAccessReview>) -> Reply<SubjectAccessReview> {
        let ctx = Ctx::of(&r)?;
        let mut review = r.into_inner();
        let attrs = auth::review_request("subjectaccessreviews");
        self.serve(ctx, attrs, async move {
            let spec = review.spec.clone().unwrap_or_default();
            if spec.user.is_empty() && spec.groups.is_empty() {
                return Err(ApiError::invalid(
                    "spec.user",
                    "required: the user (or spec.groups) to ask about",
                ));
            }
            let mut groups = spec.groups.clone();
            if !groups.iter().any(|g| g == auth::AUTHENTICATED) {
                groups.push(auth::AUTHENTICATED.to_string());
            }
            let subject = Caller::User(std::sync::Arc::new(auth::UserInfo {
                name: spec.user.clone(),
                uid: spec.uid.clone(),
                groups,
            }));
            review.status = Some(auth::review(&subject, &spec, self)?);
            review.kind = "SubjectAccessReview".into();
            review.api_version = "authorization.k8s.io/v1".into();
            Ok(review)
        })
        .await
    }
}

/// Adds every API service to `routes`.
pub fn add_routes(routes: tonic::service::Routes, api: Api) -> tonic::service::Routes {
    let max = api.node().config().max_request_bytes + 64 * 1024;
    macro_rules! add_kinds {
        ([$routes:ident] $(
            $ty:ident { list: $list:ident, event: $event:ident, grpc: $module:ident :: $trait:ident / $server:ident, $($rest:tt)* }
        ),* $(,)?) => {
            $routes$(.add_service($module::$server::new(api.clone()).max_decoding_message_size(max)))*
        };
    }
    for_each_kind!([add_kinds] routes).add_service(
        access_reviews_server::AccessReviewsServer::new(api.clone()).max_decoding_message_size(max),
    )
}
