//! Telemetry at the edge of the API: a tower layer around the ConnectRPC
//! service that gives every RPC one server span, its request metrics and one
//! JSON access-log line.
//!
//! The span is an OpenTelemetry span made directly with the SDK's tracer
//! (`vmm.v1.VmService/<Method>`, kind server, `rpc.system` `connect_rpc` or
//! `grpc`, `rpc.service`, `rpc.method`, and `vm.id` once a handler has said
//! it with [`record_vm_id`]), parented on the caller's W3C `traceparent` and
//! carrying its `baggage`. Its context is attached while the service future
//! runs and while the access line is written, so tracing spans opened inside
//! handlers become its children (the OpenTelemetry tracing layer parents a
//! new span on the current context) and log lines carry its ids. It is not a
//! tracing span: a tracing span per RPC went through both subscriber layers
//! on every creation, enter, exit, record and close, and was converted into
//! the SDK's span at its end, which made a traced RPC cost about twice what
//! the span itself costs (BENCHMARKS.md). It is made only when traces are
//! exported ([`RpcTelemetryLayer::with_tracer`]). Either way the RPC's log
//! lines take the VM and `"span":"rpc"` from its [`context`].
//!
//! The RPC's status is read from the response, where each protocol puts it
//! (the `status` module: a Connect error body, the `grpc-status` trailer, the
//! gRPC-Web trailer frame). So the response body is wrapped and the RPC is
//! finished (metrics, span status, log line) when the body ends, or when it
//! is dropped early (then the status is `canceled` unless already known); an
//! RPC whose service future is dropped before it answered ends `canceled`. Any
//! status other than `ok` marks the span as an error, which makes the
//! keep-errors sampler export its trace whatever the sampling ratio. The
//! metrics are recorded there and then; the span's end and the access-log
//! line wait for the answer's write when the request came over a connection
//! that offers it ([`AfterWrite`]), so they do not hold the answer back.
//!
//! Metrics: `rpc.server.requests` (Prometheus `rpc_server_requests_total`),
//! `rpc.server.request.duration` in seconds (`rpc_server_request_duration_seconds`)
//! and `rpc.server.active_requests`, labelled by `rpc_method` (the bare method
//! name, `_OTHER` for unknown paths so cardinality stays fixed) and
//! `rpc_status` (the Connect code name). They count every request: the
//! duration as an SDK measurement, the request and active counts in atomics
//! that the SDK reads when it collects (observable instruments).

pub mod context;
mod status;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Buf;
use connectrpc::ErrorCode;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::baggage::BaggageExt;
use opentelemetry::metrics::{Histogram, Meter, ObservableCounter, ObservableUpDownCounter};
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context as OtelContext, ContextGuard, KeyValue};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::SdkTracer;
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use self::context::RpcContext;
pub use self::context::record_vm_id;
use self::status::{Protocol, Watch};
use super::connections::AfterWrite;

/// The service's name, as a literal for `concat!` in [`methods!`].
macro_rules! service {
    () => {
        "vmm.v1.VmService"
    };
}

/// The service this layer names spans and labels for.
pub const SERVICE: &str = service!();

/// A method of [`SERVICE`]: its label and its span name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    /// The bare method name, the `rpc_method` label.
    pub name: &'static str,
    /// `vmm.v1.VmService/<name>`, the span name.
    pub span_name: &'static str,
}

/// Declares [`METHODS`] from the bare names; each span name is built from
/// the service and the name, so the two cannot disagree.
macro_rules! methods {
    ($($name:literal),* $(,)?) => {
        /// The methods of [`SERVICE`]; any other path is labelled `_OTHER`.
        pub const METHODS: &[Method] = &[
            $(Method { name: $name, span_name: concat!(service!(), "/", $name) }),*
        ];
    };
}

methods![
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
    "WatchVms",
    "GetConsoleOutput",
    "StreamConsole",
    "WriteConsole",
    "ResizeVm",
    "SnapshotVm",
    "ListSnapshots",
    "GetSnapshot",
    "DeleteSnapshot",
    "RestoreVm",
];

/// Label value for paths that are not a method of [`SERVICE`].
pub const OTHER_METHOD: &str = "_OTHER";

/// Target of the per-RPC access-log line (kept out of span events).
pub const ACCESS_LOG_TARGET: &str = "vmcp::access";

/// What the RPC's log lines give as their `span` (the server span itself is
/// named after the method).
pub const SPAN_NAME: &str = "rpc";

/// Histogram buckets, in seconds: sub-millisecond reads to tens of seconds
/// (a graceful shutdown waits up to its timeout).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Most baggage entries copied onto the span as `baggage.<key>` attributes.
const MAX_BAGGAGE_ATTRIBUTES: usize = 8;

/// Label values of the `rpc.status` attribute, by gRPC code number (0 is `ok`).
const STATUSES: usize = 17;

fn status_label(code: usize) -> &'static str {
    u32::try_from(code)
        .ok()
        .filter(|c| *c > 0)
        .and_then(ErrorCode::from_grpc_code)
        .map_or("ok", |c| c.as_str())
}

/// Requests served and in progress, by method index (the last is
/// [`OTHER_METHOD`]) and status: atomics a request adds to, read by the
/// observable instruments when metrics are collected. An SDK measurement
/// (attribute set built, hashed and looked up) per request for each of them
/// cost more than the rest of the RPC's metrics.
#[derive(Debug)]
struct RpcCounts {
    requests: Vec<[AtomicU64; STATUSES]>,
    active: Vec<AtomicI64>,
}

impl RpcCounts {
    fn new() -> Self {
        Self {
            requests: (0..=METHODS.len())
                .map(|_| std::array::from_fn(|_| AtomicU64::new(0)))
                .collect(),
            active: (0..=METHODS.len()).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    fn method_label(index: usize) -> &'static str {
        METHODS.get(index).map_or(OTHER_METHOD, |m| m.name)
    }

    /// Whether the method has been called (its series exist from then on).
    fn called(&self, method: usize) -> bool {
        self.active[method].load(Ordering::Relaxed) != 0
            || self.requests[method]
                .iter()
                .any(|c| c.load(Ordering::Relaxed) > 0)
    }
}

/// The request instruments: the duration histogram is recorded per
/// request; the request and active counts are observed from [`RpcCounts`].
#[derive(Debug, Clone)]
struct RpcMetrics {
    duration: Histogram<f64>,
    counts: Arc<RpcCounts>,
    /// Kept so their callbacks live as long as the layer.
    _observed: Arc<(ObservableCounter<u64>, ObservableUpDownCounter<i64>)>,
}

impl RpcMetrics {
    fn new(meter: &Meter) -> Self {
        let counts = Arc::new(RpcCounts::new());
        let for_requests = Arc::clone(&counts);
        let requests = meter
            .u64_observable_counter("rpc.server.requests")
            .with_description("RPCs served, by method and status")
            .with_unit("{request}")
            .with_callback(move |observer| {
                for (m, by_status) in for_requests.requests.iter().enumerate() {
                    for (s, count) in by_status.iter().enumerate() {
                        let n = count.load(Ordering::Relaxed);
                        if n > 0 {
                            observer.observe(
                                n,
                                &[
                                    KeyValue::new("rpc.method", RpcCounts::method_label(m)),
                                    KeyValue::new("rpc.status", status_label(s)),
                                ],
                            );
                        }
                    }
                }
            })
            .build();
        let for_active = Arc::clone(&counts);
        let active = meter
            .i64_observable_up_down_counter("rpc.server.active_requests")
            .with_description("RPCs in progress")
            .with_unit("{request}")
            .with_callback(move |observer| {
                for (m, active) in for_active.active.iter().enumerate() {
                    if for_active.called(m) {
                        observer.observe(
                            active.load(Ordering::Relaxed),
                            &[KeyValue::new("rpc.method", RpcCounts::method_label(m))],
                        );
                    }
                }
            })
            .build();
        Self {
            duration: meter
                .f64_histogram("rpc.server.request.duration")
                .with_description("Time from request to the end of the response body")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            counts,
            _observed: Arc::new((requests, active)),
        }
    }
}

/// Adds the server span, request metrics and access log to a service.
#[derive(Clone)]
pub struct RpcTelemetryLayer {
    metrics: RpcMetrics,
    propagator: Arc<TextMapCompositePropagator>,
    /// Makes each RPC's server span, when traces are exported.
    tracer: Option<SdkTracer>,
}

impl fmt::Debug for RpcTelemetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcTelemetryLayer").finish_non_exhaustive()
    }
}

impl RpcTelemetryLayer {
    /// A layer recording on `meter` (normally `OtelHandle::meter()`),
    /// without spans until [`RpcTelemetryLayer::with_tracer`] gives a tracer.
    pub fn new(meter: &Meter) -> Self {
        Self {
            metrics: RpcMetrics::new(meter),
            propagator: Arc::new(TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ])),
            tracer: None,
        }
    }

    /// Makes a server span per RPC with `tracer` (`OtelHandle::tracer()`,
    /// some when traces are exported); with None there is no span, and the
    /// log lines take what it would say from the RPC's context.
    pub fn with_tracer(mut self, tracer: Option<SdkTracer>) -> Self {
        self.tracer = tracer;
        self
    }
}

impl<S> tower::Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service produced by [`RpcTelemetryLayer`].
#[derive(Clone, Debug)]
pub struct RpcTelemetry<S> {
    inner: S,
    layer: RpcTelemetryLayer,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for RpcTelemetry<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    type Response = Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = RpcCall::start(&req, &self.layer);
        let inner = {
            let _attached = call.attach();
            RpcContext::default().scope(self.inner.call(req))
        };
        ResponseFuture {
            inner,
            call: Some(call),
        }
    }
}

pin_project! {
    /// Resolves to the inner response with its body observed.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<RpcContext, F>,
        call: Option<RpcCall>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped before the service answered: the caller went away (or
            // the server is stopping). The RPC still ends once, as canceled.
            if let Some(mut call) = this.call.take() {
                call.context = this.inner.take_value().unwrap_or_default();
                call.finish(
                    Some(ErrorCode::Canceled),
                    Some("the call ended before the service answered".into()),
                );
            }
        }
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<ObservedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let result = {
            let _attached = this.call.as_ref().and_then(RpcCall::attach);
            ready!(this.inner.as_mut().poll(cx))
        };
        let Some(mut call) = this.call.take() else {
            // Polled after completion: a contract violation by the caller;
            // pass the result through untouched.
            return Poll::Ready(result.map(|r| r.map(ObservedBody::unobserved)));
        };
        // What the handler recorded (the VM), for the access line.
        call.context = this.inner.take_value().unwrap_or_default();
        Poll::Ready(match result {
            Ok(response) => {
                let watch = Watch::for_response(call.protocol, &response);
                Ok(response.map(|inner| ObservedBody {
                    inner,
                    state: Some((call, watch)),
                }))
            }
            Err(error) => {
                call.finish(
                    Some(ErrorCode::Unknown),
                    Some("the service failed before answering".into()),
                );
                Err(error)
            }
        })
    }
}

/// One RPC in flight: what is needed to finish it.
struct RpcCall {
    /// The caller's context with the RPC's server span, when traced.
    trace: Option<OtelContext>,
    start: Instant,
    method: &'static str,
    /// The method's index in [`RpcCounts`].
    method_index: usize,
    full_name: Cow<'static, str>,
    protocol: Protocol,
    metrics: RpcMetrics,
    /// The RPC's context once its service future is done.
    context: RpcContext,
    /// Where the span's end and the log line wait for the answer's write.
    after_write: Option<AfterWrite>,
}

/// `(method label, span name)` for a request path; no span name when the
/// path is not a method of [`SERVICE`].
fn route(path: &str) -> (&'static str, Option<&'static str>) {
    let known = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(service, _)| *service == SERVICE)
        .and_then(|(_, method)| METHODS.iter().find(|m| m.name == method));
    match known {
        Some(m) => (m.name, Some(m.span_name)),
        None => (OTHER_METHOD, None),
    }
}

impl RpcCall {
    fn start<B>(req: &Request<B>, layer: &RpcTelemetryLayer) -> Self {
        let protocol = Protocol::of(req.headers());
        let (method, known) = route(req.uri().path());
        // Unknown paths get the HTTP method as span name (bounded cardinality)
        // and their path, shortened, in the log line.
        let log_name: Cow<'static, str> = match known {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(truncate(req.uri().path(), 128).to_owned()),
        };
        let trace = layer.tracer.as_ref().map(|tracer| {
            let span_name: Cow<'static, str> = match known {
                Some(name) => Cow::Borrowed(name),
                None => Cow::Owned(req.method().as_str().to_owned()),
            };
            let headers = req.headers();
            let remote = headers.contains_key("traceparent") || headers.contains_key("baggage");
            let parent = if remote {
                layer.propagator.extract(&HeaderExtractor(headers))
            } else {
                OtelContext::current()
            };
            let mut attributes = Vec::with_capacity(3);
            attributes.push(KeyValue::new("rpc.system", protocol.system()));
            if known.is_some() {
                attributes.push(KeyValue::new("rpc.service", SERVICE));
            }
            attributes.push(KeyValue::new("rpc.method", method));
            if remote {
                attributes.extend(parent.baggage().iter().take(MAX_BAGGAGE_ATTRIBUTES).map(
                    |(k, (v, _))| {
                        KeyValue::new(format!("baggage.{}", k.as_str()), v.as_str().to_owned())
                    },
                ));
            }
            let builder = tracer
                .span_builder(span_name)
                .with_kind(SpanKind::Server)
                .with_attributes(attributes);
            let span = tracer.build_with_context(builder, &parent);
            parent.with_span(span)
        });
        let method_index = METHODS
            .iter()
            .position(|m| m.name == method)
            .unwrap_or(METHODS.len());
        layer.metrics.counts.active[method_index].fetch_add(1, Ordering::Relaxed);
        Self {
            trace,
            start: Instant::now(),
            method,
            method_index,
            full_name: log_name,
            protocol,
            metrics: layer.metrics.clone(),
            context: RpcContext::default(),
            after_write: req.extensions().get::<AfterWrite>().cloned(),
        }
    }

    /// Records the outcome: the metrics now; the span's attributes, status
    /// and end and the log line after the answer's write when the
    /// connection offers it, else now.
    fn finish(mut self, code: Option<ErrorCode>, message: Option<String>) {
        let elapsed = self.start.elapsed();
        let status = code.map_or("ok", |c| c.as_str());
        let attrs = [
            KeyValue::new("rpc.method", self.method),
            KeyValue::new("rpc.status", status),
        ];
        let counts = &self.metrics.counts;
        let status_index = code.map_or(0, |c| c.grpc_code() as usize);
        counts.requests[self.method_index][status_index.min(STATUSES - 1)]
            .fetch_add(1, Ordering::Relaxed);
        counts.active[self.method_index].fetch_sub(1, Ordering::Relaxed);
        self.metrics.duration.record(elapsed.as_secs_f64(), &attrs);
        match self.after_write.take() {
            Some(after) => after.defer(Box::new(move || self.report(elapsed, code, message))),
            None => self.report(elapsed, code, message),
        }
    }

    /// The span's attributes, status and end, and the access-log line.
    fn report(
        self,
        elapsed: std::time::Duration,
        code: Option<ErrorCode>,
        message: Option<String>,
    ) {
        let status = code.map_or("ok", |c| c.as_str());
        let _attached = self.attach();
        if let Some(trace) = &self.trace {
            let span = trace.span();
            match self.protocol {
                Protocol::Grpc | Protocol::GrpcWeb { .. } => {
                    let number = code.map_or(0, |c| c.grpc_code());
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(number)));
                }
                Protocol::Connect => {
                    if let Some(c) = code {
                        span.set_attribute(KeyValue::new("rpc.connect_rpc.error_code", c.as_str()));
                    }
                }
            }
            span.set_attribute(KeyValue::new("rpc.response.status_code", status));
            if let Some(vm_id) = self.context.vm_id() {
                span.set_attribute(KeyValue::new("vm.id", String::from(vm_id)));
            }
            if code.is_some() {
                let description = message
                    .as_deref()
                    .map(|m| truncate(m, 256))
                    .filter(|m| !m.is_empty())
                    .unwrap_or(status);
                span.set_status(Status::error(description.to_owned()));
            }
        }
        // In the span's context (its trace ids) and in the RPC's context (its VM).
        self.context.sync_scope(|| {
            tracing::info!(
                target: ACCESS_LOG_TARGET,
                method = %self.full_name,
                code = status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                "rpc finished"
            );
        });
        if let Some(trace) = &self.trace {
            trace.span().end();
        }
    }

    /// Makes the RPC's span current on this thread until the guard drops
    /// (spans opened meanwhile become its children).
    fn attach(&self) -> Option<ContextGuard> {
        self.trace.as_ref().map(|cx| cx.clone().attach())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

pin_project! {
    /// A response body that finishes its RPC's telemetry when it ends.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        state: Option<(RpcCall, Watch)>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((call, watch)) = this.state.take() {
                let (code, message) = watch.verdict(false);
                call.finish(code, message);
            }
        }
    }
}

impl<B> ObservedBody<B> {
    fn unobserved(inner: B) -> Self {
        Self { inner, state: None }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll_frame(cx));
        let ended = match &result {
            Some(Ok(frame)) => {
                if let Some((_, watch)) = this.state.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        watch.on_data(data.chunk());
                    } else if let Some(trailers) = frame.trailers_ref() {
                        watch.on_trailers(trailers);
                    }
                }
                this.inner.is_end_stream()
            }
            Some(Err(_)) => {
                if let Some((call, _)) = this.state.take() {
                    call.finish(
                        Some(ErrorCode::Internal),
                        Some("the response body failed".into()),
                    );
                }
                false
            }
            None => true,
        };
        if ended && let Some((call, watch)) = this.state.take() {
            let (code, message) = watch.verdict(true);
            call.finish(code, message);
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObservedBody")
            .field("finished", &self.state.is_none())
            .finish_non_exhaustive()
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
