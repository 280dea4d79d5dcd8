//! Request intake in front of connectrpc: every VMCP RPC is unary, so the
//! body is read here in full (bounded in size and time, as connectrpc would
//! read it anyway) and checked for the one malformation connectrpc answers as
//! `internal`: a gRPC or gRPC-Web frame whose compressed flag is set while
//! the request names no encoding. gRPC calls that `internal`, but it is the
//! caller's error and VMCP keeps `internal` for its own bugs, so it is
//! `invalid_argument` here. An unreadable body is `invalid_argument` too.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use connectrpc::ErrorCode;
use connectrpc::protocol::Protocol;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower::{Layer, Service, ServiceExt};

use super::reject::error_response;
use super::server::Body;

/// Tower layer buffering and checking RPC request bodies.
#[derive(Debug, Clone, Copy)]
pub struct IntakeLayer {
    max_bytes: usize,
    read_timeout: Duration,
}

impl IntakeLayer {
    /// Bodies larger than `max_bytes` are `resource_exhausted`; slower than
    /// `read_timeout` are `deadline_exceeded`.
    pub fn new(max_bytes: usize, read_timeout: Duration) -> Self {
        Self {
            max_bytes,
            read_timeout,
        }
    }
}

impl<S> Layer<S> for IntakeLayer {
    type Service = Intake<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Intake {
            inner,
            config: *self,
        }
    }
}

/// The service produced by [`IntakeLayer`].
#[derive(Debug, Clone)]
pub struct Intake<S> {
    inner: S,
    config: IntakeLayer,
}

/// Why a gRPC or gRPC-Web body cannot be a well-formed request, if it cannot.
pub fn envelope_problem(headers: &HeaderMap, body: &[u8]) -> Option<&'static str> {
    let detected = Protocol::detect(headers)?;
    if !matches!(detected.protocol, Protocol::Grpc | Protocol::GrpcWeb) || detected.is_text_mode {
        return None;
    }
    let encoded = headers
        .get("grpc-encoding")
        .is_some_and(|v| v.as_bytes() != b"identity");
    if encoded {
        return None;
    }
    let mut rest = body;
    while let [flag, a, b, c, d, tail @ ..] = rest {
        if flag & 1 == 1 {
            return Some(
                "a frame is marked compressed but the request has no grpc-encoding header",
            );
        }
        let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
        match tail.get(len..) {
            Some(next) => rest = next,
            // A truncated frame is connectrpc's to report (as invalid_argument).
            None => return None,
        }
    }
    None
}

impl<S, B> Service<Request<B>> for Intake<S>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness of the inner service is awaited per call on a clone (see `call`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        let IntakeLayer {
            max_bytes,
            read_timeout,
        } = self.config;
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let read = tokio::time::timeout(read_timeout, Limited::new(body, max_bytes).collect());
            let bytes = match read.await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(e)) if e.is::<LengthLimitError>() => {
                    return Ok(error_response(
                        &parts.headers,
                        ErrorCode::ResourceExhausted,
                        &format!("request body size exceeds limit {max_bytes}"),
                    ));
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "request body could not be read");
                    return Ok(error_response(
                        &parts.headers,
                        ErrorCode::InvalidArgument,
                        "the request body could not be read",
                    ));
                }
                Err(_) => {
                    return Ok(error_response(
                        &parts.headers,
                        ErrorCode::DeadlineExceeded,
                        "the request body did not arrive in time",
                    ));
                }
            };
            if let Some(reason) = envelope_problem(&parts.headers, &bytes) {
                return Ok(error_response(
                    &parts.headers,
                    ErrorCode::InvalidArgument,
                    reason,
                ));
            }
            inner
                .oneshot(Request::from_parts(parts, Full::new(bytes)))
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: &str, encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", ct.parse().expect("valid"));
        if let Some(e) = encoding {
            h.insert("grpc-encoding", e.parse().expect("valid"));
        }
        h
    }

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![flag];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn compressed_frames_need_an_encoding() {
        let grpc = headers("application/grpc", None);
        assert_eq!(envelope_problem(&grpc, &frame(0, b"abc")), None);
        assert!(envelope_problem(&grpc, &frame(1, b"abc")).is_some());
        let two = [frame(0, b"x"), frame(1, b"y")].concat();
        assert!(envelope_problem(&grpc, &two).is_some(), "second frame");
        let web = headers("application/grpc-web+proto", Some("identity"));
        assert!(envelope_problem(&web, &frame(3, b"")).is_some());
        // With a real encoding the flag is legitimate; connectrpc decompresses.
        let gz = headers("application/grpc", Some("gzip"));
        assert_eq!(envelope_problem(&gz, &frame(1, b"abc")), None);
        // Connect bodies are not envelopes; text mode is refused by connectrpc.
        let connect = headers("application/proto", None);
        assert_eq!(envelope_problem(&connect, &frame(1, b"abc")), None);
        let text = headers("application/grpc-web-text", None);
        assert_eq!(envelope_problem(&text, b"AQAAAAA="), None);
        // Truncated frames are left to connectrpc.
        assert_eq!(envelope_problem(&grpc, &[0, 0, 0, 0, 9, 1]), None);
    }

    #[tokio::test]
    async fn bodies_are_bounded_and_checked_before_the_inner_service() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&calls);
        let inner = tower::service_fn(move |r: Request<Full<Bytes>>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                let body = r.into_body().collect().await.expect("full").to_bytes();
                Ok::<_, Infallible>(Response::new(Full::new(body).boxed_unsync()))
            }
        });
        let svc = IntakeLayer::new(8, Duration::from_secs(5)).layer(inner);
        let req = |ct: &str, body: Vec<u8>| {
            Request::builder()
                .header("content-type", ct)
                .body(Full::new(Bytes::from(body)))
                .expect("valid")
        };
        let ok = svc
            .clone()
            .oneshot(req("application/json", b"{}".to_vec()))
            .await
            .expect("infallible");
        assert_eq!(ok.status(), http::StatusCode::OK);
        let body = ok.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"{}", "the body is passed on intact");

        let big = svc
            .clone()
            .oneshot(req("application/json", vec![b' '; 9]))
            .await
            .expect("infallible");
        assert_eq!(big.status(), http::StatusCode::TOO_MANY_REQUESTS);

        let bad = svc
            .clone()
            .oneshot(req("application/grpc-web+proto", frame(1, b"")))
            .await
            .expect("infallible");
        assert_eq!(bad.headers()["grpc-status"], "3");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "only the good request got in"
        );
    }
}
