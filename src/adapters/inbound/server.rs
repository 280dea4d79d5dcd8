//! The HTTP server: one port serving Connect (JSON and binary), gRPC and
//! gRPC-Web over HTTP/1.1 and h2c (or TLS with ALPN h2/http1.1), plus the
//! health endpoints, which are routed before the RPC service and therefore
//! before its authentication. Shutdown stops accepting, lets in-flight
//! requests finish within a bound, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connectrpc::{ConnectRpcService, DeadlinePolicy, Limits, Router};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use crate::ports::{HealthCheck, VmService};
use crate::proto::vmm::v1::VmServiceExt;

use super::auth::{AuthLayer, AuthPolicy, ClientCertVerified};
use super::guard::{ApiLimits, GuardLayer};
use super::health;
use super::intake::IntakeLayer;
use super::rpc::RpcService;
use super::tls;

/// Response body used by every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The RPC route as a type-erased tower service, so telemetry layers can wrap it.
pub type RpcHttpService = BoxCloneService<Request<Incoming>, Response<Body>, Infallible>;

/// Limits applied to the RPC routes.
#[derive(Debug, Clone, Copy)]
pub struct RpcLimits {
    /// Largest request body (and message) accepted.
    pub max_request_bytes: usize,
    /// Cap on client deadlines.
    pub max_deadline: Duration,
}

/// Builds the ConnectRPC service for `svc` with `limits`.
pub fn rpc_service<S: VmService>(svc: Arc<S>, limits: RpcLimits) -> RpcHttpService {
    let router = Arc::new(RpcService::new(svc)).register(Router::new());
    let connect = ConnectRpcService::new(router)
        .with_limits(
            Limits::default()
                .with_max_request_body_size(limits.max_request_bytes)
                .with_max_message_size(limits.max_request_bytes),
        )
        .with_deadline_policy(DeadlinePolicy::new().with_max(limits.max_deadline));
    let connect = ServiceExt::<Request<Full<Bytes>>>::map_response(
        connect,
        |r: Response<connectrpc::ConnectRpcBody>| r.map(|b| b.boxed_unsync()),
    );
    // Bodies are read in full and checked first (see intake.rs), bounded like connectrpc's own reads.
    BoxCloneService::new(
        IntakeLayer::new(limits.max_request_bytes, limits.max_deadline).layer(connect),
    )
}

/// Wraps the RPC service with authentication (outermost, so unauthenticated
/// callers cannot spend the shared rate limit) and the API load limits.
pub fn protect(rpc: RpcHttpService, auth: AuthPolicy, limits: ApiLimits) -> RpcHttpService {
    let guarded = GuardLayer::new(limits).layer(rpc);
    BoxCloneService::new(AuthLayer::new(auth).layer(guarded))
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Routes one request: health paths here, everything else to the RPC service.
pub async fn route(
    req: Request<Incoming>,
    mut rpc: RpcHttpService,
    health_check: Arc<dyn HealthCheck>,
) -> Result<Response<Body>, Infallible> {
    match req.uri().path() {
        "/health" | "/_/health" if req.method() != Method::GET && req.method() != Method::HEAD => {
            let mut r = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": "use GET"}),
            );
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
            Ok(r)
        }
        "/health" => Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({"status": "ok"}),
        )),
        "/_/health" => {
            let (status, body) = health::detailed(&*health_check).await;
            Ok(json_response(status, &body))
        }
        _ => {
            // The boxed service is always ready (ConnectRpcService::poll_ready is Ready).
            let svc = rpc.ready().await?;
            svc.call(req).await
        }
    }
}

/// Serves until `shutdown` resolves, then drains in-flight requests for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    rpc: RpcHttpService,
    health_check: Arc<dyn HealthCheck>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve_with_tls(listener, None, rpc, health_check, shutdown, grace).await;
}

/// Like [`serve`], accepting only TLS connections when `tls` is set. The
/// handshake runs in the connection's own task (bounded by
/// [`tls::HANDSHAKE_TIMEOUT`]), and requests on a connection whose client
/// certificate verified carry [`ClientCertVerified`].
pub async fn serve_with_tls(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    rpc: RpcHttpService,
    health_check: Arc<dyn HealthCheck>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let builder = Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Resource errors (EMFILE) are transient; back off briefly via the accept loop.
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let rpc = rpc.clone();
                let hc = Arc::clone(&health_check);
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(acceptor) = tls else {
                        let svc = hyper::service::service_fn(move |req| {
                            route(req, rpc.clone(), Arc::clone(&hc))
                        });
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                        return;
                    };
                    let stream = match tokio::time::timeout(
                        tls::HANDSHAKE_TIMEOUT,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    // rustls only completes a handshake with a certificate that verified.
                    let verified = stream.get_ref().1.peer_certificates().is_some();
                    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                        if verified {
                            req.extensions_mut().insert(ClientCertVerified);
                        }
                        route(req, rpc.clone(), Arc::clone(&hc))
                    });
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: draining in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
}
