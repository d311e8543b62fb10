//! Compiles the `.proto` files with protox (pure Rust), so the build needs no system `protoc`.
//!
//! The API messages (`flotilla.api.v1`) also get serde impls whose field names are the
//! `.proto` files' JSON names (Kubernetes' spelling), so manifests and `-o json|yaml` use the
//! same names as Kubernetes and as protobuf's own JSON mapping.

use std::path::PathBuf;

use prost_types::field_descriptor_proto::{Label, Type};

const PROTOS: &[&str] = &[
    "etcd/kv.proto",
    "etcd/rpc.proto",
    "flotilla/raft.proto",
    "flotilla/api/v1/meta.proto",
    "flotilla/api/v1/core.proto",
    "flotilla/api/v1/apps.proto",
    "flotilla/api/v1/rbac.proto",
    "flotilla/api/v1/batch.proto",
    "flotilla/api/v1/policy.proto",
    "flotilla/api/v1/services.proto",
    "flotilla/agent/v1/agent.proto",
];

const API_PACKAGE: &str = "flotilla.api.v1";

/// Fields that Kubernetes spells as either a number or a string (`port: 8080`,
/// `port: http`, `maxSurge: 25%`).
const INT_OR_STRING: &[&str] = &[
    "HTTPGetAction.port",
    "TCPSocketAction.port",
    "ServicePort.target_port",
    "RollingUpdateDeployment.max_surge",
    "RollingUpdateDeployment.max_unavailable",
    "RollingUpdateDaemonSet.max_surge",
    "RollingUpdateDaemonSet.max_unavailable",
    "PodDisruptionBudgetSpec.min_available",
    "PodDisruptionBudgetSpec.max_unavailable",
];

/// Maps of quantities, where Kubernetes accepts `cpu: 1` as well as `cpu: "1"`.
const QUANTITY_MAPS: &[&str] = &[
    "ResourceRequirements.requests",
    "ResourceRequirements.limits",
    "NodeStatus.capacity",
    "NodeStatus.allocatable",
    "ResourceQuotaSpec.hard",
    "ResourceQuotaStatus.hard",
    "ResourceQuotaStatus.used",
];

/// Maps of bytes, base64 in JSON and YAML as Kubernetes writes them.
const BASE64_MAPS: &[&str] = &["ConfigMap.binary_data", "Secret.data"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("flotilla_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();

    let api = format!(".{API_PACKAGE}");
    let mut builder = tonic_prost_build::configure()
        .btree_map(api.as_str())
        .type_attribute(
            api.as_str(),
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default, deny_unknown_fields)]",
        );
    for file in fds.file.iter().filter(|f| f.package() == API_PACKAGE) {
        for message in &file.message_type {
            for field in &message.field {
                let short = format!("{}.{}", message.name(), field.name());
                let path = format!("{api}.{short}");
                let mut attrs = vec![format!("rename = \"{}\"", field.json_name())];
                if INT_OR_STRING.contains(&short.as_str()) {
                    attrs.push("with = \"crate::api::json::int_or_string\"".into());
                } else if BASE64_MAPS.contains(&short.as_str()) {
                    attrs.push("with = \"crate::api::json::base64_map\"".into());
                } else if QUANTITY_MAPS.contains(&short.as_str()) {
                    attrs.push("deserialize_with = \"crate::api::json::quantity_map\"".into());
                } else if field.r#type() == Type::Int64 && field.label() != Label::Repeated {
                    // Accept `"30"` as well as `30`, as protobuf's JSON mapping writes int64.
                    attrs.push(if field.proto3_optional() {
                        "deserialize_with = \"crate::api::json::opt_int64\"".into()
                    } else {
                        "deserialize_with = \"crate::api::json::int64\"".into()
                    });
                }
                builder = builder.field_attribute(&path, format!("#[serde({})]", attrs.join(", ")));
            }
        }
    }
    builder.compile_fds(fds)?;
    Ok(())
}
