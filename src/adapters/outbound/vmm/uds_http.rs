//! A small HTTP/1.1 client over Unix sockets, shared by the VMM backends.
//! Both Cloud Hypervisor and Firecracker serve a REST API on a Unix socket
//! per VMM process; this client pools one keep-alive connection set per
//! socket path (hyperlocal encodes the path in the URI authority), bounds
//! every call by a timeout and classifies failures by what the caller can do
//! about them: a socket that is missing or refuses connections, or closes
//! mid-answer, means the VMM is unavailable; a call that takes too long is a
//! timeout; anything else is a protocol problem. Status codes are returned as
//! they are: deciding what a 4xx/5xx means is the backend's business.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyperlocal::UnixConnector;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ports::HypervisorError;

/// How long an idle pooled connection is kept before it is closed.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call over a VMM socket failed.
#[derive(Debug, thiserror::Error)]
pub enum UdsHttpError {
    /// The socket does not exist or refuses connections: no VMM listens there.
    #[error("VMM socket {socket} is unreachable for {operation}: {source}")]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// What was asked (`GET /api/v1/vm.info`).
        operation: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The connection broke before a complete answer arrived (the VMM went
    /// away mid-call).
    #[error("VMM socket {socket} closed during {operation}: {source}")]
    Closed {
        /// The socket path.
        socket: PathBuf,
        /// What was asked (`GET /api/v1/vm.info`).
        operation: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No complete answer within the timeout.
    #[error("{operation} on {socket} timed out after {after:?}")]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// What was asked.
        operation: String,
        /// How long we waited.
        after: Duration,
    },
    /// The request could not be built or its body not encoded.
    #[error("cannot build {operation}: {source}")]
    Request {
        /// What was asked.
        operation: String,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The answer could not be read or decoded.
    #[error("bad answer to {operation} (status {status}): {source}")]
    Decode {
        /// What was asked.
        operation: String,
        /// The status the VMM sent.
        status: StatusCode,
        /// The underlying failure.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<UdsHttpError> for HypervisorError {
    /// A VMM that does not answer is `Unavailable` (the [`UdsHttpError`]
    /// kept as the source), one that answers too late a `Timeout`; a request
    /// VMCP could not build or an answer it could not read is a `Protocol`
    /// bug on one side.
    fn from(e: UdsHttpError) -> Self {
        match e {
            UdsHttpError::Unreachable { ref operation, .. } => {
                let message = format!("the VMM's API socket is unreachable for {operation}");
                HypervisorError::unavailable_from(message, e)
            }
            UdsHttpError::Closed { ref operation, .. } => {
                let message = format!("the VMM closed its API connection during {operation}");
                HypervisorError::unavailable_from(message, e)
            }
            UdsHttpError::Timeout {
                operation, after, ..
            } => HypervisorError::Timeout { operation, after },
            // `Protocol` carries text only: the port gives it no source.
            UdsHttpError::Request { .. } | UdsHttpError::Decode { .. } => {
                HypervisorError::Protocol(e.to_string())
            }
        }
    }
}

/// A VMM's answer: status and raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes (empty for 204).
    pub body: Bytes,
    /// `METHOD path`, for error messages.
    pub operation: String,
}

impl Response {
    /// An answer to `operation` (`METHOD path`).
    pub fn new(status: StatusCode, body: impl Into<Bytes>, operation: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            operation: operation.into(),
        }
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// The body as text, lossily decoded and trimmed (for error messages).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_owned()
    }

    /// Decodes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, UdsHttpError> {
        serde_json::from_slice(&self.body).map_err(|source| UdsHttpError::Decode {
            operation: self.operation.clone(),
            status: self.status,
            source: Box::new(source),
        })
    }
}

/// A pooled HTTP/1.1 client for VMM API sockets. Cheap to clone; one per backend.
#[derive(Clone)]
pub struct UdsClient {
    client: Client<UnixConnector, Full<Bytes>>,
    timeout: Duration,
}

impl std::fmt::Debug for UdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdsClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl UdsClient {
    /// A client whose calls each time out after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(UnixConnector);
        Self { client, timeout }
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `method path` with an optional JSON body, bounded by the default timeout.
    pub async fn call(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Response, UdsHttpError> {
        self.call_with_timeout(socket, method, path, body, self.timeout)
            .await
    }

    /// Sends `method path` with an optional JSON body, bounded by `timeout`
    /// (connect, send and reading the whole answer).
    pub async fn call_with_timeout(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Response, UdsHttpError> {
        let body = body.map(|b| (b, "application/json"));
        self.send(socket, method, path, body, timeout).await
    }

    /// Sends `method path` with `body` of type `content_type`, bounded by the default timeout.
    pub async fn call_typed(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: Bytes,
        content_type: &'static str,
    ) -> Result<Response, UdsHttpError> {
        self.send(
            socket,
            method,
            path,
            Some((body, content_type)),
            self.timeout,
        )
        .await
    }

    async fn send(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        timeout: Duration,
    ) -> Result<Response, UdsHttpError> {
        let operation = format!("{method} {path}");
        let uri: http::Uri = hyperlocal::Uri::new(socket, path).into();
        let mut builder = Request::builder().method(method).uri(uri);
        let body = match body {
            Some((body, content_type)) => {
                builder = builder.header(header::CONTENT_TYPE, content_type);
                body
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|e| UdsHttpError::Request {
                operation: operation.clone(),
                source: Box::new(e),
            })?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    UdsHttpError::Unreachable {
                        socket: socket.to_owned(),
                        operation: operation.clone(),
                        source: Box::new(e),
                    }
                } else {
                    UdsHttpError::Closed {
                        socket: socket.to_owned(),
                        operation: operation.clone(),
                        source: Box::new(e),
                    }
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| UdsHttpError::Closed {
                    socket: socket.to_owned(),
                    operation: operation.clone(),
                    source: Box::new(e),
                })?
                .to_bytes();
            Ok(Response {
                status,
                body,
                operation: operation.clone(),
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(UdsHttpError::Timeout {
                socket: socket.to_owned(),
                operation,
                after: timeout,
            }),
        }
    }

    /// `GET path`, decoding a 2xx JSON answer; a non-2xx answer is returned as `Err(Ok(response))`
    /// so the caller can map the VMM's error body.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        socket: &Path,
        path: &str,
    ) -> Result<Result<T, Response>, UdsHttpError> {
        let response = self.call(socket, Method::GET, path, None).await?;
        if response.is_success() {
            response.json().map(Ok)
        } else {
            Ok(Err(response))
        }
    }

    /// Sends `method path` with `body` encoded as JSON.
    pub async fn send_json<B: Serialize + ?Sized>(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<Response, UdsHttpError> {
        let encoded = serde_json::to_vec(body).map_err(|e| UdsHttpError::Request {
            operation: format!("{method} {path}"),
            source: Box::new(e),
        })?;
        self.call(socket, method, path, Some(Bytes::from(encoded)))
            .await
    }
}

impl UdsHttpError {
    /// Whether no VMM listens on the socket at all (missing or refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, UdsHttpError::Unreachable { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::UnixListener;

    /// Serves `GET /echo` → 200 with the connection number, `PUT /fail` → 500
    /// with a text body, `POST /type` → 200 with the request's content type,
    /// on `socket`; returns the accepted-connection counter.
    fn serve(socket: &Path) -> Arc<AtomicUsize> {
        let listener = UnixListener::bind(socket).expect("bind");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn_no = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                        let (status, body) = match (req.method().as_str(), req.uri().path()) {
                            ("GET", "/echo") => (StatusCode::OK, format!("{{\"conn\":{conn_no}}}")),
                            ("POST", "/type") => (
                                StatusCode::OK,
                                req.headers()
                                    .get(header::CONTENT_TYPE)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("none")
                                    .to_owned(),
                            ),
                            ("PUT", "/fail") => (
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "Error from API: InvalidState\n".to_owned(),
                            ),
                            _ => (StatusCode::NOT_FOUND, String::new()),
                        };
                        http::Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        accepted
    }

    #[derive(serde::Deserialize)]
    struct Echo {
        conn: usize,
    }

    #[tokio::test]
    async fn bodies_are_json_unless_typed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("api.sock");
        serve(&sock);
        let client = UdsClient::new(Duration::from_secs(2));
        let body = || Bytes::from_static(b"\x0a\x01x");
        let json = client
            .call(&sock, Method::POST, "/type", Some(body()))
            .await
            .expect("call");
        assert_eq!(&json.body[..], b"application/json");
        let typed = client
            .call_typed(&sock, Method::POST, "/type", body(), "application/proto")
            .await
            .expect("call");
        assert_eq!(&typed.body[..], b"application/proto");
    }

    #[tokio::test]
    async fn reuses_one_connection_for_sequential_calls() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("api.sock");
        let accepted = serve(&sock);
        let client = UdsClient::new(Duration::from_secs(2));
        for _ in 0..5 {
            let echo: Echo = client
                .get_json(&sock, "/echo")
                .await
                .expect("call")
                .expect("2xx");
            assert_eq!(echo.conn, 1);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn error_statuses_come_back_with_their_body() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("api.sock");
        serve(&sock);
        let client = UdsClient::new(Duration::from_secs(2));
        let r = client
            .send_json(&sock, Method::PUT, "/fail", &serde_json::json!({}))
            .await
            .expect("call");
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(r.text(), "Error from API: InvalidState");
        assert_eq!(r.operation, "PUT /fail");
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let client = UdsClient::new(Duration::from_secs(2));
        let err = client
            .call(&tmp.path().join("nope.sock"), Method::GET, "/x", None)
            .await
            .expect_err("missing");
        assert!(err.is_unreachable(), "{err}");
        let mapped = HypervisorError::from(err);
        let HypervisorError::Unavailable { source, .. } = &mapped else {
            panic!("expected Unavailable, got {mapped:?}");
        };
        let cause = source.as_ref().expect("the transport error is kept");
        assert!(
            matches!(
                cause.downcast_ref::<UdsHttpError>(),
                Some(UdsHttpError::Unreachable { .. })
            ),
            "{cause:?}"
        );
    }

    #[tokio::test]
    async fn a_stale_socket_refuses_and_is_unreachable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        assert!(sock.exists());
        let client = UdsClient::new(Duration::from_secs(2));
        let err = client
            .call(&sock, Method::GET, "/x", None)
            .await
            .expect_err("refused");
        assert!(err.is_unreachable(), "{err}");
    }

    #[tokio::test]
    async fn a_hung_peer_times_out() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("hung.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let holder = tokio::spawn(async move {
            // Accept and hold connections without ever answering.
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let client = UdsClient::new(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = client
            .call(&sock, Method::GET, "/api/v1/vm.info", None)
            .await
            .expect_err("hung");
        assert!(started.elapsed() < Duration::from_secs(1));
        let mapped = HypervisorError::from(err);
        assert!(
            matches!(
                &mapped,
                HypervisorError::Timeout { operation, after }
                    if operation == "GET /api/v1/vm.info" && *after == Duration::from_millis(100)
            ),
            "{mapped:?}"
        );
        holder.abort();
    }

    #[tokio::test]
    async fn a_peer_closing_mid_call_is_unavailable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("closing.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                drop(s);
            }
        });
        let client = UdsClient::new(Duration::from_secs(2));
        let err = client
            .call(&sock, Method::GET, "/x", None)
            .await
            .expect_err("closed");
        assert!(matches!(err, UdsHttpError::Closed { .. }), "{err}");
        assert!(matches!(
            HypervisorError::from(err),
            HypervisorError::Unavailable { .. }
        ));
    }
}
