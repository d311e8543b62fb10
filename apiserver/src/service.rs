//! The gRPC services: one per kind, each a thin layer over [`Api`].

use flotilla_proto::api::*;
use flotilla_proto::flotilla_api_v1::{
    deployments_server, endpoints_service_server, events_server, leases_server, namespaces_server,
    nodes_server, pods_server, replica_sets_server, resource_quotas_server, services_server,
};
use tonic::{Request, Response, Status};

use crate::registry::Api;
use crate::watch::EventStream;

type Reply<T> = Result<Response<T>, Status>;

macro_rules! service {
    // The verbs every kind has, plus `$extra` methods (written out here rather than by a
    // nested macro, which `async_trait` would not see).
    ($module:ident :: $trait:ident, $kind:ty, $list:ty, { $($extra:tt)* }) => {
        #[tonic::async_trait]
        impl $module::$trait for Api {
            async fn create(&self, r: Request<$kind>) -> Reply<$kind> {
                let fence = crate::fence::from_metadata(r.metadata())?;
                let out = crate::fence::scope(fence, Api::create(self, r.into_inner())).await?;
                Ok(Response::new(out))
            }
            async fn get(&self, r: Request<GetRequest>) -> Reply<$kind> {
                let r = r.into_inner();
                Ok(Response::new(Api::get::<$kind>(self, &r.namespace, &r.name).await?))
            }
            async fn list(&self, r: Request<ListRequest>) -> Reply<$list> {
                let (items, meta) = Api::list::<$kind>(self, &r.into_inner()).await?;
                Ok(Response::new(<$kind>::make_list(items, meta)))
            }
            async fn update(&self, r: Request<$kind>) -> Reply<$kind> {
                let fence = crate::fence::from_metadata(r.metadata())?;
                let out = crate::fence::scope(fence, Api::update(self, r.into_inner())).await?;
                Ok(Response::new(out))
            }
            async fn delete(&self, r: Request<DeleteRequest>) -> Reply<$kind> {
                let fence = crate::fence::from_metadata(r.metadata())?;
                let out =
                    crate::fence::scope(fence, Api::delete::<$kind>(self, r.into_inner())).await?;
                Ok(Response::new(out))
            }
            async fn patch(&self, r: Request<PatchRequest>) -> Reply<$kind> {
                let fence = crate::fence::from_metadata(r.metadata())?;
                let out =
                    crate::fence::scope(fence, Api::patch::<$kind>(self, r.into_inner())).await?;
                Ok(Response::new(out))
            }
            type WatchStream = EventStream<$kind>;
            async fn watch(&self, r: Request<WatchRequest>) -> Reply<Self::WatchStream> {
                Ok(Response::new(Api::watch::<$kind>(self, r.into_inner()).await?))
            }
            $($extra)*
        }
    };
    // A kind with a status, written only through UpdateStatus.
    ($module:ident :: $trait:ident, $kind:ty, $list:ty, status { $($extra:tt)* }) => {
        service!($module::$trait, $kind, $list, {
            async fn update_status(&self, r: Request<$kind>) -> Reply<$kind> {
                let fence = crate::fence::from_metadata(r.metadata())?;
                let out =
                    crate::fence::scope(fence, Api::update_status(self, r.into_inner())).await?;
                Ok(Response::new(out))
            }
            $($extra)*
        });
    };
}

service!(
    namespaces_server::Namespaces,
    Namespace,
    NamespaceList,
    status {}
);
service!(nodes_server::Nodes, Node, NodeList, status {});
service!(pods_server::Pods, Pod, PodList, status {
    async fn bind(&self, r: Request<Binding>) -> Reply<Pod> {
        let fence = crate::fence::from_metadata(r.metadata())?;
        let out = crate::fence::scope(fence, Api::bind(self, r.into_inner())).await?;
        Ok(Response::new(out))
    }
    type LogsStream = crate::logs::LogStream;
    async fn logs(&self, r: Request<PodLogsRequest>) -> Reply<Self::LogsStream> {
        Ok(Response::new(Api::logs(self, r.into_inner()).await?))
    }
});
service!(
    replica_sets_server::ReplicaSets,
    ReplicaSet,
    ReplicaSetList,
    status {}
);
service!(
    deployments_server::Deployments,
    Deployment,
    DeploymentList,
    status {}
);
service!(services_server::Services, Service, ServiceList, status {});
service!(
    endpoints_service_server::EndpointsService,
    Endpoints,
    EndpointsList,
    {}
);
service!(events_server::Events, Event, EventList, {});
service!(leases_server::Leases, Lease, LeaseList, {});
service!(
    resource_quotas_server::ResourceQuotas,
    ResourceQuota,
    ResourceQuotaList,
    status {}
);

/// Adds every API service to `routes`.
pub fn add_routes(routes: tonic::service::Routes, api: Api) -> tonic::service::Routes {
    let max = api.node().config().max_request_bytes + 64 * 1024;
    macro_rules! add {
        ($routes:ident, $($server:ident :: $ty:ident),*) => {
            $routes$(.add_service($server::$ty::new(api.clone()).max_decoding_message_size(max)))*
        };
    }
    add!(
        routes,
        namespaces_server::NamespacesServer,
        nodes_server::NodesServer,
        pods_server::PodsServer,
        replica_sets_server::ReplicaSetsServer,
        deployments_server::DeploymentsServer,
        services_server::ServicesServer,
        endpoints_service_server::EndpointsServiceServer,
        events_server::EventsServer,
        leases_server::LeasesServer,
        resource_quotas_server::ResourceQuotasServer
    )
}
