//! The HTTP server: one port serving Connect (JSON and binary), gRPC and
//! gRPC-Web over HTTP/1.1 and h2c (or TLS with ALPN h2/http1.1), plus the
//! health endpoints, which are routed before the RPC service and therefore
//! before its authentication. Connections are capped and timed out at accept
//! and while idle (see [`super::connections`]). Shutdown stops accepting, lets
//! in-flight requests finish within a bound, and returns.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connectrpc::{ConnectRpcService, DeadlinePolicy, Limits, Router};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt};

use crate::adapters::quiet_unix::QuietUnixStream;
use crate::ports::{HealthCheck, Telemetry, TelemetryEvent, VmService};
use crate::proto::vmm::v1::VmServiceExt;

use super::auth::{AuthLayer, AuthPolicy, ClientCertVerified};
use super::connections::{
    self, Activity, ConnectionGate, ConnectionLimits, Ended, GuardedBody, Observed,
    REFUSAL_LOG_INTERVAL, RefusalLog,
};
use super::guard::{ApiLimits, GuardLayer};
use super::health;
use super::intake::IntakeLayer;
use super::rpc::RpcService;

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
        |r: Response<connectrpc::ConnectRpcBody>| r.map(response_body),
    );
    // Bodies are read in full and checked first (see intake.rs), bounded like connectrpc's own reads.
    BoxCloneService::new(
        IntakeLayer::new(limits.max_request_bytes, limits.max_deadline).layer(connect),
    )
}

/// The body of an RPC's response, boxed. A Connect unary answer (or error)
/// is unwrapped to its `Full` bytes first: `ConnectRpcBody` does not pass on
/// its inner body's exact size or end, so hyper would send every such answer
/// chunked over HTTP/1.1, and over HTTP/2 as a DATA frame followed by an
/// empty one to end the stream. Unwrapped, the answer goes out with its
/// `content-length` and as one DATA frame that ends the stream.
fn response_body(body: connectrpc::ConnectRpcBody) -> Body {
    match body {
        connectrpc::ConnectRpcBody::Full(full) => full.boxed_unsync(),
        other => other.boxed_unsync(),
    }
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

/// Where the API is served: the TCP port (with TLS when set) and, optionally,
/// the host-local API socket (never TLS: the socket's mode guards it).
pub struct Listeners {
    /// The API port.
    pub tcp: TcpListener,
    /// The host-local API socket, when configured.
    pub unix: Option<ApiSocket>,
    /// TLS for the port.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("tcp", &self.tcp)
            .field("unix", &self.unix)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// What the accept loop needs to bound client connections.
#[derive(Clone)]
pub struct ConnectionPolicy {
    /// Timeouts and HTTP/2 limits.
    pub limits: ConnectionLimits,
    /// The caps, shared with whoever reports open connections.
    pub gate: Arc<ConnectionGate>,
    /// Receives refusals and timeouts for the metrics.
    pub telemetry: Arc<dyn Telemetry>,
}

impl std::fmt::Debug for ConnectionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPolicy")
            .field("limits", &self.limits)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

/// Serves until `shutdown` resolves, accepting only TLS connections when
/// `tls` is set, then drains in-flight requests for at most `grace`.
/// Connections over the caps of `policy.gate` are closed at accept before a
/// byte is read; admitted ones are driven by [`connections::drive`]
/// (header-read and idle timeouts). The TLS handshake runs in the
/// connection's own task, bounded by the handshake timeout, and requests on a
/// connection whose client certificate verified carry [`ClientCertVerified`].
pub async fn serve_with_tls(
    listeners: Listeners,
    rpc: RpcHttpService,
    health_check: Arc<dyn HealthCheck>,
    policy: ConnectionPolicy,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let Listeners {
        tcp: listener,
        unix,
        tls,
    } = listeners;
    let builder = policy.limits.configure();
    let (stop_tx, stop_rx) = watch::channel(false);
    let unix = unix.map(|socket| {
        socket.serve(UnixServing {
            conn: Conn {
                rpc: rpc.clone(),
                hc: Arc::clone(&health_check),
                builder: builder.clone(),
                limits: policy.limits,
                stop: stop_rx.clone(),
                telemetry: Arc::clone(&policy.telemetry),
            },
            gate: Arc::clone(&policy.gate),
        })
    });
    let mut refusals = RefusalLog::new(REFUSAL_LOG_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of descriptors (EMFILE/ENFILE) or memory: retrying at once would
                        // spin; pause briefly so closing connections can free some.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let permit = match policy.gate.admit(peer.ip()) {
                    Ok(p) => p,
                    Err(refusal) => {
                        // Closed before a byte is read: a refused client costs no parsing.
                        drop(stream);
                        policy.telemetry.record(TelemetryEvent::ConnectionRefused {
                            reason: refusal.as_str(),
                        });
                        if let Some(n) = refusals.note(tokio::time::Instant::now()) {
                            tracing::warn!(
                                %peer,
                                cap = refusal.as_str(),
                                refused = n,
                                open = policy.gate.open(),
                                max_connections = policy.gate.max_total(),
                                max_connections_per_client = policy.gate.max_per_client(),
                                "connections refused at the connection cap (logged at most every {}s)",
                                REFUSAL_LOG_INTERVAL.as_secs()
                            );
                        }
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let rpc = rpc.clone();
                let hc = Arc::clone(&health_check);
                let builder = builder.clone();
                let stop = stop_rx.clone();
                let tls = tls.clone();
                let limits = policy.limits;
                let telemetry = Arc::clone(&policy.telemetry);
                tokio::spawn(async move {
                    let _permit = permit;
                    let Some(acceptor) = tls else {
                        let conn = Conn { rpc, hc, builder, limits, stop, telemetry };
                        return conn.serve_plain(stream, peer).await;
                    };
                    let stream = match tokio::time::timeout(
                        limits.tls_handshake_timeout,
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
                            telemetry.record(TelemetryEvent::ConnectionTimedOut {
                                reason: "tls_handshake",
                            });
                            return;
                        }
                    };
                    // rustls only completes a handshake with a certificate that verified.
                    let verified = stream.get_ref().1.peer_certificates().is_some();
                    let activity = Activity::new();
                    let svc = tracked(Arc::clone(&activity), move |mut req: Request<Incoming>| {
                        if verified {
                            req.extensions_mut().insert(ClientCertVerified);
                        }
                        route(req, rpc.clone(), Arc::clone(&hc))
                    });
                    let io = TokioIo::new(Observed::new(stream, Arc::clone(&activity)));
                    let conn = builder.serve_connection_with_upgrades(io, svc);
                    let ended = connections::drive(conn, activity, limits, stop).await;
                    report(ended, peer, &*telemetry);
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    drop(stop_rx);
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    // Every connection task holds a receiver: `closed` resolves when the last one ends.
    if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
        tracing::warn!(
            ?grace,
            "in-flight requests did not finish within the grace period"
        );
    }
    // Ends the API socket's thread; connections still open there end with it.
    drop(unix);
}

/// What serving one admitted connection needs.
#[derive(Clone)]
struct Conn {
    rpc: RpcHttpService,
    hc: Arc<dyn HealthCheck>,
    builder: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    limits: ConnectionLimits,
    stop: watch::Receiver<bool>,
    telemetry: Arc<dyn Telemetry>,
}

impl Conn {
    /// Serves a connection without TLS (TCP, or the host-local API socket)
    /// under the header-read and idle timeouts until it ends.
    async fn serve_plain<T>(self, stream: T, peer: std::net::SocketAddr)
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            rpc,
            hc,
            builder,
            limits,
            stop,
            telemetry,
        } = self;
        let activity = Activity::new();
        let svc = tracked(Arc::clone(&activity), move |req| {
            route(req, rpc.clone(), Arc::clone(&hc))
        });
        let io = TokioIo::new(Observed::new(stream, Arc::clone(&activity)));
        let conn = builder.serve_connection_with_upgrades(io, svc);
        let ended = connections::drive(conn, activity, limits, stop).await;
        report(ended, peer, &*telemetry);
    }
}

/// The address the connection caps count clients of the API socket under:
/// no TCP peer can have it.
const UNIX_CLIENT: std::net::IpAddr = std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED);
/// How clients of the API socket appear in logs.
const UNIX_PEER: std::net::SocketAddr = std::net::SocketAddr::new(UNIX_CLIENT, 0);

/// The host-local API socket, bound, with the thread that will serve it.
///
/// The socket is served on a thread of its own by a single-threaded tokio
/// runtime, not by the multi-threaded one that serves the port and runs the
/// VM owners. On the multi-threaded runtime a connection's task that wakes
/// itself (hyper does, to read a request body) also wakes an idle worker on
/// the other core: per sequential request two futex calls and a context
/// switch more, about a tenth of the request's CPU (BENCHMARKS.md). On its
/// own thread a request is read, answered and written without leaving the
/// thread, and the host-local client (`vmcpctl`, an agent on the host) is
/// not queued behind the port's connections. What a request asks of a VM
/// still runs in the VM's owner, on the main runtime.
pub struct ApiSocket {
    listener: std::os::unix::net::UnixListener,
    /// The runtime on the socket's thread.
    runtime: tokio::runtime::Handle,
    /// Dropping it ends the thread, and any connection still open on it.
    thread: ApiSocketThread,
}

impl std::fmt::Debug for ApiSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSocket")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// What serving the API socket needs.
struct UnixServing {
    conn: Conn,
    gate: Arc<ConnectionGate>,
}

/// The thread serving the API socket: dropping this ends it (and any
/// connection still open on it). The runtime lives and ends on that thread,
/// so it is never dropped in async code (where tokio panics).
struct ApiSocketThread {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl ApiSocketThread {
    /// Starts the thread with a single-threaded runtime waiting for work.
    fn start() -> std::io::Result<(Self, tokio::runtime::Handle)> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("vmcp-api-socket".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => {
                        let _ = ready_tx.send(Ok(rt.handle().clone()));
                        // Until the sender is dropped; the runtime and any task
                        // still on it end with this thread.
                        let _ = rt.block_on(stopped);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        // The thread answers as soon as its runtime is built (or failed to be).
        let handle = ready.recv().map_err(|_| {
            std::io::Error::other("the API socket's thread ended before its runtime started")
        })??;
        Ok((Self { _stop: stop }, handle))
    }
}

impl ApiSocket {
    /// Serves the socket on its thread: accepts and serves each connection
    /// until `serving.conn.stop` turns true. The connections hold that
    /// receiver like those on the port, so the drain waits for them; the
    /// thread ends when the returned value is dropped.
    fn serve(self, serving: UnixServing) -> ApiSocketThread {
        let ApiSocket {
            listener,
            runtime,
            thread,
        } = self;
        runtime.spawn(accept_unix(listener, serving));
        thread
    }
}

/// Accepts on the API socket until the stop, serving each connection in a
/// task of the runtime this runs on.
async fn accept_unix(listener: std::os::unix::net::UnixListener, serving: UnixServing) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the API socket");
            return;
        }
    };
    let UnixServing { conn, gate } = serving;
    let mut stop = conn.stop.clone();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the API socket failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = async { drop(stop.wait_for(|stop| *stop).await) } => return,
        };
        // Every client of the host-local socket counts as one client address.
        let Ok(permit) = gate.admit(UNIX_CLIENT) else {
            drop(stream);
            conn.telemetry.record(TelemetryEvent::ConnectionRefused {
                reason: "max_connections_unix",
            });
            continue;
        };
        // Watched for reads only: the client reading an answer wakes nobody here.
        let stream = match QuietUnixStream::from_tokio(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register an API socket connection");
                continue;
            }
        };
        let conn = conn.clone();
        tokio::spawn(async move {
            let _permit = permit;
            conn.serve_plain(stream, UNIX_PEER).await;
        });
    }
}

/// Binds the host-local API socket at `path` with mode 0600 (only VMCP's
/// user may connect), replacing a stale socket file a previous VMCP left,
/// and starts the thread that will serve it (see [`ApiSocket`]). Anything
/// else at `path` is an error: it is never removed.
pub fn bind_api_socket(path: &std::path::Path) -> std::io::Result<ApiSocket> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let (thread, runtime) = ApiSocketThread::start()?;
    Ok(ApiSocket {
        listener,
        runtime,
        thread,
    })
}

/// How long the accept loop pauses after an accept error.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Wraps `f` so each request counts as in flight until its response body is
/// done, and carries its connection's [`AfterWrite`](connections::AfterWrite).
fn tracked<F, Fut>(
    activity: Arc<Activity>,
    f: F,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<GuardedBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<GuardedBody>, Infallible>> + Send + 'static,
> + Clone
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let guard = activity.begin();
        req.extensions_mut().insert(activity.after_write());
        let fut = f(req);
        async move {
            let resp = fut.await?;
            Ok(resp.map(|b| GuardedBody::new(b, guard)))
        }
    })
}

fn report<E: std::fmt::Display>(
    ended: Ended<E>,
    peer: std::net::SocketAddr,
    telemetry: &dyn Telemetry,
) {
    match ended {
        Ended::Done(Ok(())) => {}
        Ended::Done(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
        Ended::Closed(why) => {
            tracing::debug!(%peer, reason = why.as_str(), "connection closed by VMCP");
            telemetry.record(TelemetryEvent::ConnectionTimedOut {
                reason: why.as_str(),
            });
        }
        Ended::Abandoned => {
            tracing::debug!(%peer, "connection dropped: graceful close did not finish");
        }
    }
}
