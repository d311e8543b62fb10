//! The door of every Flotilla port that serves gRPC next to plain HTTP (`/metrics`,
//! `/healthz`, `/readyz` over HTTP/1.1): one tower layer in front of all the routes.
//!
//! - **gRPC paths answer only gRPC.** Every path but the plain HTTP ones is a gRPC path; a
//!   request there whose `Content-Type` is not `application/grpc` or `application/grpc+<codec>`
//!   gets HTTP 415 and never reaches a service. A web page can send a cross-site POST
//!   without a CORS preflight only with a "simple" content type (`text/plain`, the form
//!   encodings), so no page can call a method, however the body is crafted.
//! - **No web pages at all.** A gRPC request carrying an `Origin` header (which browsers add
//!   to cross-site and to scripted requests, and native gRPC clients never send) gets HTTP
//!   403. No CORS header is ever sent, so a preflight fails too.
//! - **Errors tonic makes before a handler runs are worded as the client's fault.** A
//!   request body that does not decode is INVALID_ARGUMENT (tonic answers INTERNAL, which
//!   says "the server is broken, retry"); a request over the size limit is
//!   RESOURCE_EXHAUSTED, as gRPC's other implementations and etcd answer it (tonic answers
//!   OUT_OF_RANGE, which Flotilla's API uses for "expired: list again").
#![warn(clippy::all, missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use tonic::{Code, Status};

/// The layer that puts a [`Guard`] in front of a server's routes; `plain_http` lists the
/// exact paths served as plain HTTP (everything else is gRPC).
pub fn layer(plain_http: &'static [&'static str]) -> GuardLayer {
    GuardLayer { plain_http }
}

/// Builds [`Guard`]s; see [`layer`].
#[derive(Clone, Copy, Debug)]
pub struct GuardLayer {
    plain_http: &'static [&'static str],
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            plain_http: self.plain_http,
        }
    }
}

/// A service that lets through only what the [module docs](self) allow.
#[derive(Clone, Debug)]
pub struct Guard<S> {
    inner: S,
    plain_http: &'static [&'static str],
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<Request<B>> for Guard<S>
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if self.plain_http.contains(&req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        if let Some(refusal) = refuse(req.headers()) {
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        let uri = req.uri().clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            reword(uri.path(), &mut response);
            Ok(response)
        })
    }
}

/// Whether a `Content-Type` is gRPC's: `application/grpc` or `application/grpc+<codec>`,
/// with or without parameters, in any case (gRPC-Web's `application/grpc-web` is not).
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let media = value.split(';').next().unwrap_or("").trim();
    let media = media.as_bytes();
    const GRPC: &[u8] = b"application/grpc";
    media.len() >= GRPC.len()
        && media[..GRPC.len()].eq_ignore_ascii_case(GRPC)
        && (media.len() == GRPC.len()
            || (media[GRPC.len()] == b'+' && media.len() > GRPC.len() + 1))
}

/// The HTTP answer to a request on a gRPC path that must not reach the service, if any.
fn refuse(headers: &HeaderMap) -> Option<Response<Body>> {
    if headers.contains_key(header::ORIGIN) {
        return Some(plain(
            StatusCode::FORBIDDEN,
            "forbidden: gRPC requests with an Origin header (from a web page) are refused; \
             use a gRPC client\n"
                .to_string(),
        ));
    }
    match headers.get(header::CONTENT_TYPE) {
        Some(ct) if is_grpc_content_type(ct.as_bytes()) => None,
        other => {
            let got = match other {
                Some(ct) => format!("{:?}", String::from_utf8_lossy(ct.as_bytes())),
                None => "none".to_string(),
            };
            Some(plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported media type {got}: gRPC methods take Content-Type \
                     application/grpc; plain HTTP serves GET /metrics, /healthz and /readyz\n"
                ),
            ))
        }
    }
}

fn plain(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(Body::new(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Rewrites a trailers-only error answer (the status in the headers, as tonic answers a
/// request it could not even read) when the fault is the client's.
fn reword(path: &str, response: &mut Response<Body>) {
    let headers = response.headers_mut();
    let Some(code) = headers.get("grpc-status") else {
        return;
    };
    // Only INTERNAL and OUT_OF_RANGE are rewritten; the details header is never set on
    // them by tonic (and `from_header_map` would panic on a malformed one).
    if !matches!(code.as_bytes(), b"13" | b"11") || headers.contains_key("grpc-status-details-bin")
    {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let Some(better) = client_fault(path, &status) else {
        return;
    };
    headers.remove("grpc-message");
    if better.add_header(headers).is_ok() {
        response.extensions_mut().insert(better);
    }
}

/// The status a client should get for tonic's own refusal `status` of a request to `path`.
fn client_fault(path: &str, status: &Status) -> Option<Status> {
    let m = status.message();
    match status.code() {
        Code::Internal if m.starts_with("failed to decode Protobuf message") => Some(
            Status::invalid_argument(format!("invalid request body for {path}: {m}")),
        ),
        Code::Internal if m == "Missing request message." => Some(Status::invalid_argument(
            format!("invalid request body for {path}: no message in it"),
        )),
        Code::Internal if m == "Unexpected EOF decoding stream." => Some(Status::invalid_argument(
            format!("invalid request body for {path}: it ends inside a message"),
        )),
        Code::OutOfRange if m.starts_with("Error, decoded message length too large") => {
            // "... found {size} bytes, the limit is: {limit} bytes"
            let numbers: Vec<u64> = m
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|n| n.parse().ok())
                .collect();
            Some(Status::resource_exhausted(match numbers[..] {
                [size, limit] => format!(
                    "Request entity too large: the request to {path} is {size} bytes, the \
                     limit is {limit} bytes"
                ),
                _ => format!("Request entity too large: {m}"),
            }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        for ok in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc+json",
            "Application/GRPC",
            "application/grpc; charset=utf-8",
        ] {
            assert!(is_grpc_content_type(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc+",
            "application/grpcx",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "application/json",
        ] {
            assert!(!is_grpc_content_type(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn tonic_refusals_become_client_faults() {
        let p = "/etcdserverpb.KV/Put";
        let decode = client_fault(
            p,
            &Status::internal("failed to decode Protobuf message: invalid wire type value: 7"),
        )
        .unwrap();
        assert_eq!(decode.code(), Code::InvalidArgument);
        assert_eq!(
            decode.message(),
            "invalid request body for /etcdserverpb.KV/Put: failed to decode Protobuf message: \
             invalid wire type value: 7"
        );
        let big = client_fault(
            p,
            &Status::out_of_range(
                "Error, decoded message length too large: found 2097152 bytes, the limit is: \
                 1638400 bytes",
            ),
        )
        .unwrap();
        assert_eq!(big.code(), Code::ResourceExhausted);
        assert_eq!(
            big.message(),
            "Request entity too large: the request to /etcdserverpb.KV/Put is 2097152 bytes, \
             the limit is 1638400 bytes"
        );
        // The server's own failures stay what they are.
        assert!(client_fault(p, &Status::internal("stored object x does not decode")).is_none());
        assert!(client_fault(p, &Status::out_of_range("expired: list again")).is_none());
    }
}
