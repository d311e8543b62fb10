//! Probes: exec (exit code 0), TCP (a connection opens) and HTTP GET (a status from 200
//! to 399), each within the probe's `timeoutSeconds` (default 1 s).

use std::time::Duration;

use flotilla_proto::api::{Container, Probe};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::runtime::{ContainerSpec, Runtime};

/// The port a probe names: a number, or the name of one of the container's ports.
fn port(value: &str, c: &Container) -> Option<u16> {
    if let Ok(n) = value.parse::<u16>() {
        return Some(n);
    }
    c.ports
        .iter()
        .find(|p| p.name == value)
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// Whether the probe passes now.
pub async fn run<R: Runtime>(
    rt: &R,
    id: &str,
    spec: &ContainerSpec,
    c: &Container,
    p: &Probe,
    pod_ip: &str,
) -> bool {
    let timeout = Duration::from_secs(if p.timeout_seconds > 0 {
        p.timeout_seconds as u64
    } else {
        1
    });
    if let Some(exec) = &p.exec {
        return matches!(rt.exec(id, spec, &exec.command, timeout).await, Ok(0));
    }
    if let Some(tcp) = &p.tcp_socket {
        let Some(port) = port(&tcp.port, c) else {
            return false;
        };
        let host = if tcp.host.is_empty() {
            pod_ip
        } else {
            &tcp.host
        };
        return matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await,
            Ok(Ok(_))
        );
    }
    if let Some(http) = &p.http_get {
        let Some(port) = port(&http.port, c) else {
            return false;
        };
        if !http.scheme.is_empty() && !http.scheme.eq_ignore_ascii_case("HTTP") {
            tracing::warn!("{} probe scheme is not supported: only HTTP", http.scheme);
            return false;
        }
        let host = if http.host.is_empty() {
            pod_ip
        } else {
            &http.host
        };
        let path = if http.path.is_empty() {
            "/"
        } else {
            &http.path
        };
        return tokio::time::timeout(timeout, http_get(host, port, path))
            .await
            .ok()
            .flatten()
            .is_some_and(|status| (200..400).contains(&status));
    }
    // A probe with no action: nothing to fail.
    true
}

async fn http_get(host: &str, port: u16, path: &str) -> Option<u16> {
    let stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::USER_AGENT, "flotilla-probe")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    Some(resp.status().as_u16())
}
