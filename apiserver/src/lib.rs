//! Flotilla's API server: Kubernetes-shaped objects on top of the consensus store.
//!
//! - [`registry`]: the rules every kind follows (create, get, list, update, status, delete,
//!   patch, bind), each write one compare-and-set transaction in the store;
//! - [`validate`]: defaults and validation per kind, with errors that name the field;
//! - [`watch`]: filtered watches from the local member's watch hub;
//! - [`service`]: the gRPC services, one per kind;
//! - [`auth`]: who is calling (certificates, tokens) and what they may do; the audit log;
//! - [`errors`]: the error type and its gRPC status codes.
//!
//! Every control-plane node serves the whole API: reads and watches from its own copy
//! (linearizable reads confirm the leader's read index first), writes through the store's
//! proposal path, which carries them to the leader.

pub mod auth;
pub mod encryption;
pub mod errors;
pub mod fence;
pub mod logs;
mod quota;
pub mod registry;
pub mod service;
pub mod validate;
pub mod watch;

use std::time::Duration;

use flotilla_proto::api::{Namespace, ObjectMeta};
use flotilla_store::node::StoreNode;

pub use errors::{ApiError, ApiResult};
pub use registry::Api;
pub use service::add_routes;

/// Starts the API on `node`: the `default` namespace, the nodes' lease namespace and the
/// default roles (`cluster-admin` bound to `system:masters`, `admin`, `edit`, `view`) are
/// created once a leader is there.
pub fn start(node: StoreNode) -> Api {
    start_with(Api::new(node))
}

/// Starts the API server's background work for `api` (built with its dialer).
pub fn start_with(api: Api) -> Api {
    for name in ["default", flotilla_proto::api::NODE_LEASE_NAMESPACE] {
        let ns = Namespace {
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        tokio::spawn(ensure(api.clone(), ns));
    }
    for role in auth::bootstrap::cluster_roles() {
        tokio::spawn(ensure(api.clone(), role));
    }
    for binding in auth::bootstrap::cluster_role_bindings() {
        tokio::spawn(ensure(api.clone(), binding));
    }
    api
}

/// Creates `object` unless it exists, retrying until a leader takes it.
async fn ensure<K: validate::Kind>(api: Api, object: K) {
    let mut stop = api.node().shutdown_signal();
    let mut pause = Duration::from_millis(100);
    let name = object.name().to_string();
    loop {
        if api
            .read::<K>("", &name, false)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return;
        }
        match api.create(object.clone()).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => return,
            Err(e) => tracing::debug!("creating {} {name}: {e}", K::PLURAL),
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
