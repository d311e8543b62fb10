//! What a member's client port answers besides well-formed gRPC: requests a web page can
//! send (refused before any service sees them), plain HTTP for health and metrics, request
//! bodies that do not decode, requests over the size limit.

mod common;

use std::process::{Command, Output};
use std::time::Instant;

use common::{DEADLINE, Member, http_get, http_request as http};
use flotilla_proto::etcdserverpb::kv_client::KvClient;
use flotilla_proto::etcdserverpb::{LeaseGrantRequest, PutRequest, PutResponse, RangeRequest};
use prost::Message;
use tonic::Code;

/// One member alone, ready (it knows itself as leader), with `extra` server flags.
fn member(dir: &tempfile::TempDir, extra: &[&str]) -> Member {
    let mut m = Member::new("n1", dir.path().join("n1"));
    m.extra = extra.iter().map(|s| s.to_string()).collect();
    let initial = format!("n1={}", m.peer);
    m.start(&initial);
    let deadline = Instant::now() + DEADLINE;
    while !(std::net::TcpStream::connect(&m.client).is_ok()
        && http_get(&m.client, "/readyz").0 == 200)
    {
        assert!(Instant::now() < deadline, "the member did not become ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    m
}

/// A gRPC frame holding `msg`, as a browser page could put it in a `text/plain` body.
fn grpc_frame(msg: &impl Message) -> Vec<u8> {
    let bytes = msg.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    frame.extend_from_slice(&bytes);
    frame
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn count(addr: &str, key: &str) -> i64 {
    let mut kv = KvClient::connect(format!("http://{addr}")).await.unwrap();
    kv.range(RangeRequest {
        key: key.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .count
}

#[test]
fn web_pages_cannot_call_grpc_methods() {
    let dir = tempfile::tempdir().unwrap();
    let m = member(&dir, &[]);
    let put = grpc_frame(&PutRequest {
        key: b"csrf".to_vec(),
        value: b"written by a web page".to_vec(),
        ..Default::default()
    });
    let path = "POST /etcdserverpb.KV/Put HTTP/1.1";
    // What a page's form or fetch() can send without a CORS preflight.
    for (headers, want) in [
        (
            "Content-Type: text/plain\r\nOrigin: http://evil.example",
            403,
        ),
        ("Content-Type: text/plain", 415),
        ("Content-Type: application/x-www-form-urlencoded", 415),
        ("Content-Type: multipart/form-data; boundary=x", 415),
        ("Content-Type: application/grpc-web", 415),
        ("X-No-Content-Type: 1", 415),
        // A gRPC content type set by a page's script still carries its Origin.
        (
            "Content-Type: application/grpc\r\nOrigin: http://evil.example",
            403,
        ),
    ] {
        let (code, head, body) = http(&m.client, &format!("{path}\r\n{headers}"), &put);
        assert_eq!(
            code,
            want,
            "{headers}: {head}\n{}",
            String::from_utf8_lossy(&body)
        );
        assert!(!head.contains("access-control-"), "{head}");
        assert!(
            !head.contains("grpc-status"),
            "{headers} reached the service: {head}"
        );
    }
    // A preflight is refused and allows nothing.
    let (code, head, _) = http(
        &m.client,
        "OPTIONS /etcdserverpb.KV/Put HTTP/1.1\r\nOrigin: http://evil.example\r\n\
         Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type",
        b"",
    );
    assert_eq!(code, 403, "{head}");
    assert!(!head.contains("access-control-"), "{head}");
    // The Flotilla API's methods are behind the same door.
    let (code, _, _) = http(
        &m.client,
        "POST /flotilla.api.v1.Namespaces/Create HTTP/1.1\r\nContent-Type: text/plain",
        b"",
    );
    assert_eq!(code, 415);

    runtime().block_on(async {
        assert_eq!(count(&m.client, "csrf").await, 0, "a refused request wrote");
        // A real gRPC client (HTTP/2) still works.
        let mut kv = KvClient::connect(format!("http://{}", m.client))
            .await
            .unwrap();
        kv.put(PutRequest {
            key: b"csrf".to_vec(),
            value: b"from a client".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(count(&m.client, "csrf").await, 1);
    });
    // gRPC over HTTP/1.1 with gRPC's content type is still gRPC.
    let (code, head, _) = http(
        &m.client,
        &format!("{path}\r\nContent-Type: application/grpc+proto\r\nTE: trailers"),
        &put,
    );
    assert_eq!(code, 200, "{head}");

    // Plain HTTP GETs keep working over HTTP/1.1, even from a page (it cannot read them).
    assert_eq!(http_get(&m.client, "/healthz"), (200, "ok\n".to_string()));
    let (code, head, body) = http(
        &m.client,
        "GET /healthz HTTP/1.1\r\nOrigin: http://evil.example",
        b"",
    );
    assert_eq!((code, body.as_slice()), (200, &b"ok\n"[..]), "{head}");
    assert!(!head.contains("access-control-"), "{head}");
    assert_eq!(http_get(&m.client, "/readyz").0, 200);
    let (code, metrics) = http_get(&m.client, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("flotilla_raft_is_leader 1"), "{metrics}");
}

#[test]
fn an_undecodable_request_body_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let m = member(&dir, &[]);
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", m.client))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        // A LeaseGrantRequest's field 1 is a varint; a PutRequest's field 1 (key) is bytes.
        let codec = tonic_prost::ProstCodec::<LeaseGrantRequest, PutResponse>::default();
        let e = grpc
            .unary(
                tonic::Request::new(LeaseGrantRequest { ttl: 5, id: 0 }),
                tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Put"),
                codec,
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message()
                .starts_with("invalid request body for /etcdserverpb.KV/Put: failed to decode"),
            "{}",
            e.message()
        );
    });
    // Cut short, over HTTP/1.1: a frame header announcing more than the body holds.
    let (code, head, _) = http(
        &m.client,
        "POST /flotilla.api.v1.Namespaces/Get HTTP/1.1\r\nContent-Type: application/grpc",
        &[0, 0, 0, 0, 9, 0x0a],
    );
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("grpc-status: 3\r\n"), "{head}");
    assert!(
        head.contains("grpc-message: invalid%20request%20body"),
        "{head}"
    );
}

fn flotilla(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .env("FLOTILLA_SERVER", server)
        .output()
        .expect("flotilla runs")
}

#[test]
fn a_manifest_over_the_request_limit_is_request_entity_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let m = member(&dir, &["--max-request-bytes", "65536"]);
    let manifest = |arg_bytes: usize| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: big}}\nspec:\n  containers:\n  - name: \
             main\n    command: [echo, {}]\n",
            "x".repeat(arg_bytes)
        )
    };
    let path = dir.path().join("big.yaml");
    // Over the gRPC decoder's limit (the request limit plus 64 KiB for framing).
    std::fs::write(&path, manifest(300 * 1024)).unwrap();
    let out = flotilla(&m.client, &["apply", "-f", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Error from server (RequestEntityTooLarge): Request entity too large:"),
        "{stderr}"
    );
    assert!(!stderr.contains("Expired"), "{stderr}");
    let out = flotilla(&m.client, &["get", "pods"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("big"),
        "a refused apply created the pod"
    );
}
