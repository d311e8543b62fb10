//! Flotilla's published gRPC surface: the `.proto` files under `proto/` and the Rust generated
//! from them.
//!
//! Layout:
//! - [`etcdserverpb`], [`mvccpb`]: etcd's v3 API, served on the client port so that `etcdctl`
//!   and etcd client libraries work against a Flotilla cluster;
//! - [`raft`]: the peer service between control-plane nodes;
//! - [`api`]: the API objects and services (`flotilla.api.v1`) with what every component
//!   knows about each kind;
//! - [`guard`]: the tower layer in front of every Flotilla server's routes: gRPC only with
//!   gRPC's content types and never from a web page, tonic's own refusals worded as the
//!   client's fault;
//! - [`FILE_DESCRIPTOR_SET`]: every file compiled in, for gRPC server reflection.

#![allow(clippy::all, missing_docs)]

/// etcd's key-value record and event (`mvccpb`).
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's v3 services and messages (`etcdserverpb`).
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

/// The Raft peer service (`flotilla.raft.v1`).
pub mod raft {
    tonic::include_proto!("flotilla.raft.v1");
}

/// The generated packages, nested as prost expects (the agent package refers to the API's
/// messages by relative path).
pub mod flotilla {
    pub mod api {
        /// The API objects and services (`flotilla.api.v1`), as generated.
        pub mod v1 {
            tonic::include_proto!("flotilla.api.v1");
        }
    }
    pub mod agent {
        /// The node agent's service (`flotilla.agent.v1`), as generated.
        pub mod v1 {
            tonic::include_proto!("flotilla.agent.v1");
        }
    }
}

pub use flotilla::agent::v1 as flotilla_agent_v1;
pub use flotilla::api::v1 as flotilla_api_v1;

pub mod api;
pub mod guard;

/// Encoded `FileDescriptorSet` of every `.proto` file here, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flotilla_descriptor");
