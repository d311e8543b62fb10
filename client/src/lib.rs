//! Flotilla's typed API client, shared by the command line, the scheduler, the controllers
//! and the node agent.
//!
//! - [`Client`]: every verb for every kind, failing over across the control-plane nodes;
//! - [`watch`]: a watch that resumes from the last revision it saw;
//! - [`informer`]: list + watch → a local cache → add / update / delete handlers;
//! - [`manifest`]: YAML/JSON manifests in Kubernetes' shape, with errors by path;
//! - [`events`]: the spam filter that bounds the Events one object gets;
//! - [`kubeconfig`]: the servers and credentials of a kubeconfig.

mod breaker;
pub mod client;
pub mod events;
pub mod informer;
pub mod kubeconfig;
pub mod manifest;
pub mod watch;

pub use client::{Client, ClientError};
pub use flotilla_proto::api;
