//! Telemetry at the edge of the API: a tower layer around the ConnectRPC
//! service that gives every RPC one server span, its request metrics and one
//! JSON access-log line.
//!
//! The span is a tracing span (`vmm.v1.VmService/<Method>`, kind server,
//! `rpc.system` `connect_rpc` or `grpc`, `rpc.service`, `rpc.method`, an empty
//! `vm.id` that handlers fill with `Span::current().record("vm.id", ..)`),
//! parented on the caller's W3C `traceparent` and carrying its `baggage`; the
//! OpenTelemetry layer installed by `otel::init_logging` exports it, and
//! hypervisor spans opened inside handlers become its children.
//!
//! The RPC's status is read from the response, where each protocol puts it:
//! Connect unary errors in a JSON body (`{"code": "not_found", ..}`, the HTTP
//! status alone is ambiguous: 400 is invalid_argument, failed_precondition or
//! out_of_range), gRPC in the `grpc-status` trailer (or header, for
//! trailers-only responses), gRPC-Web in the trailer frame at the end of the
//! body. So the response body is wrapped and the RPC is finished (metrics,
//! span status, log line) when the body ends, or when it is dropped early
//! (then the status is `canceled` unless already known). Any status other than
//! `ok` marks the span as an error, which makes the keep-errors sampler export
//! its trace whatever the sampling ratio.
//!
//! Metrics: `rpc.server.requests` (Prometheus `rpc_server_requests_total`),
//! `rpc.server.request.duration` in seconds (`rpc_server_request_duration_seconds`)
//! and `rpc.server.active_requests`, labelled by `rpc_method` (the bare method
//! name, `_OTHER` for unknown paths so cardinality stays fixed) and
//! `rpc_status` (the Connect code name). They are recorded for every request.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Buf;
use connectrpc::ErrorCode;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::baggage::BaggageExt;
use opentelemetry::metrics::{Counter, Histogram, Meter, UpDownCounter};
use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use pin_project_lite::pin_project;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The service this layer names spans and labels for.
pub const SERVICE: &str = "vmm.v1.VmService";

/// The methods of [`SERVICE`]; any other path is labelled `_OTHER`.
pub const METHODS: [&str; 9] = [
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
];

/// Label value for paths that are not a method of [`SERVICE`].
pub const OTHER_METHOD: &str = "_OTHER";

/// Target of the per-RPC access-log line (kept out of span events).
pub const ACCESS_LOG_TARGET: &str = "vmcp::access";

/// Histogram buckets, in seconds: sub-millisecond reads to tens of seconds
/// (a graceful shutdown waits up to its timeout).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Most baggage entries copied onto the span as `baggage.<key>` attributes.
const MAX_BAGGAGE_ATTRIBUTES: usize = 8;
/// Largest Connect error body inspected for its code.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest gRPC-Web trailer frame inspected.
const MAX_WEB_TRAILER: usize = 8 * 1024;

/// The three request instruments.
#[derive(Debug, Clone)]
struct RpcMetrics {
    requests: Counter<u64>,
    duration: Histogram<f64>,
    active: UpDownCounter<i64>,
}

impl RpcMetrics {
    fn new(meter: &Meter) -> Self {
        Self {
            requests: meter
                .u64_counter("rpc.server.requests")
                .with_description("RPCs served, by method and status")
                .with_unit("{request}")
                .build(),
            duration: meter
                .f64_histogram("rpc.server.request.duration")
                .with_description("Time from request to the end of the response body")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            active: meter
                .i64_up_down_counter("rpc.server.active_requests")
                .with_description("RPCs in progress")
                .with_unit("{request}")
                .build(),
        }
    }
}

/// Adds the server span, request metrics and access log to a service.
#[derive(Clone)]
pub struct RpcTelemetryLayer {
    metrics: RpcMetrics,
    propagator: Arc<TextMapCompositePropagator>,
}

impl fmt::Debug for RpcTelemetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcTelemetryLayer").finish_non_exhaustive()
    }
}

impl RpcTelemetryLayer {
    /// A layer recording on `meter` (normally `OtelHandle::meter()`).
    pub fn new(meter: &Meter) -> Self {
        Self {
            metrics: RpcMetrics::new(meter),
            propagator: Arc::new(TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ])),
        }
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
        let inner = call.span.in_scope(|| self.inner.call(req));
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
        inner: F,
        call: Option<RpcCall>,
    }
}

impl<F, ResBody, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<ResBody>, E>>,
    ResBody: Body,
{
    type Output = Result<Response<ObservedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.call.as_ref().map(|c| c.span.enter());
            ready!(this.inner.poll(cx))
        };
        let Some(call) = this.call.take() else {
            // Polled after completion: a contract violation by the caller;
            // pass the result through untouched.
            return Poll::Ready(result.map(|r| r.map(ObservedBody::unobserved)));
        };
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

/// The wire protocol of a request, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Connect,
    Grpc,
    GrpcWeb { text: bool },
}

impl Protocol {
    fn of(headers: &HeaderMap) -> Self {
        let ct = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.starts_with("application/grpc-web-text") {
            Protocol::GrpcWeb { text: true }
        } else if ct.starts_with("application/grpc-web") {
            Protocol::GrpcWeb { text: false }
        } else if ct.starts_with("application/grpc") {
            Protocol::Grpc
        } else {
            Protocol::Connect
        }
    }

    fn system(self) -> &'static str {
        match self {
            Protocol::Connect => "connect_rpc",
            Protocol::Grpc | Protocol::GrpcWeb { .. } => "grpc",
        }
    }
}

/// One RPC in flight: what is needed to finish it.
struct RpcCall {
    span: Span,
    start: Instant,
    method: &'static str,
    full_name: Cow<'static, str>,
    protocol: Protocol,
    metrics: RpcMetrics,
}

/// Span names of [`METHODS`], in the same order.
const SPAN_NAMES: [&str; 9] = [
    "vmm.v1.VmService/CreateVm",
    "vmm.v1.VmService/DeleteVm",
    "vmm.v1.VmService/BootVm",
    "vmm.v1.VmService/ShutdownVm",
    "vmm.v1.VmService/PauseVm",
    "vmm.v1.VmService/ResumeVm",
    "vmm.v1.VmService/RebootVm",
    "vmm.v1.VmService/GetVmInfo",
    "vmm.v1.VmService/ListVms",
];

/// `(method label, span name)` for a request path; no span name when the
/// path is not a method of [`SERVICE`].
fn route(path: &str) -> (&'static str, Option<&'static str>) {
    let known = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(service, _)| *service == SERVICE)
        .and_then(|(_, method)| METHODS.iter().position(|m| *m == method));
    match known {
        Some(i) => (METHODS[i], Some(SPAN_NAMES[i])),
        None => (OTHER_METHOD, None),
    }
}

impl RpcCall {
    fn start<B>(req: &Request<B>, layer: &RpcTelemetryLayer) -> Self {
        let protocol = Protocol::of(req.headers());
        let (method, known) = route(req.uri().path());
        // Unknown paths get the HTTP method as span name (bounded cardinality)
        // and their path, shortened, in the log line.
        let (span_name, log_name): (&str, Cow<'static, str>) = match known {
            Some(name) => (name, Cow::Borrowed(name)),
            None => (
                req.method().as_str(),
                Cow::Owned(truncate(req.uri().path(), 128).to_owned()),
            ),
        };
        let span = tracing::info_span!(
            target: "vmcp::rpc",
            "rpc",
            otel.name = span_name,
            otel.kind = "server",
            rpc.system = protocol.system(),
            rpc.service = known.map(|_| SERVICE),
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            rpc.connect_rpc.error_code = Empty,
            rpc.response.status_code = Empty,
            vm.id = Empty,
            otel.status_description = Empty,
        );
        let headers = req.headers();
        if headers.contains_key("traceparent") || headers.contains_key("baggage") {
            let parent = layer.propagator.extract(&HeaderExtractor(headers));
            let baggage: Vec<KeyValue> = parent
                .baggage()
                .iter()
                .take(MAX_BAGGAGE_ATTRIBUTES)
                .map(|(k, (v, _))| {
                    KeyValue::new(format!("baggage.{}", k.as_str()), v.as_str().to_owned())
                })
                .collect();
            // Fails only when no OpenTelemetry layer is installed (OTLP off):
            // then there is no span to parent and nothing to do.
            let _ = span.set_parent(parent);
            for kv in baggage {
                span.set_attribute(kv.key, kv.value);
            }
        }
        layer
            .metrics
            .active
            .add(1, &[KeyValue::new("rpc.method", method)]);
        Self {
            span,
            start: Instant::now(),
            method,
            full_name: log_name,
            protocol,
            metrics: layer.metrics.clone(),
        }
    }

    /// Records the outcome: metrics, span attributes and status, log line.
    fn finish(self, code: Option<ErrorCode>, message: Option<String>) {
        let elapsed = self.start.elapsed();
        let status = code.map_or("ok", |c| c.as_str());
        let attrs = [
            KeyValue::new("rpc.method", self.method),
            KeyValue::new("rpc.status", status),
        ];
        self.metrics.requests.add(1, &attrs);
        self.metrics.duration.record(elapsed.as_secs_f64(), &attrs);
        self.metrics.active.add(-1, &attrs[..1]);

        match self.protocol {
            Protocol::Grpc | Protocol::GrpcWeb { .. } => {
                let number = code.map_or(0, |c| c.grpc_code());
                self.span.record("rpc.grpc.status_code", i64::from(number));
            }
            Protocol::Connect => {
                if let Some(c) = code {
                    self.span.record("rpc.connect_rpc.error_code", c.as_str());
                }
            }
        }
        self.span.record("rpc.response.status_code", status);
        if code.is_some() {
            let description = message
                .as_deref()
                .map(|m| truncate(m, 256))
                .filter(|m| !m.is_empty())
                .unwrap_or(status);
            self.span.record("otel.status_description", description);
        }
        let _entered = self.span.enter();
        tracing::info!(
            target: ACCESS_LOG_TARGET,
            method = %self.full_name,
            code = status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "rpc finished"
        );
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

/// Where the status of a response will come from.
enum Watch {
    /// Known from the headers already.
    Known(Option<ErrorCode>, Option<String>),
    /// In the `grpc-status` trailer.
    GrpcTrailers,
    /// In the gRPC-Web trailer frame inside the body.
    GrpcWeb(WebScanner),
    /// In a Connect JSON error body; `fallback` from the HTTP status.
    ConnectError { fallback: ErrorCode, body: Vec<u8> },
}

impl Watch {
    fn for_response<B>(protocol: Protocol, response: &Response<B>) -> Self {
        let headers = response.headers();
        let status = response.status();
        match protocol {
            Protocol::Grpc | Protocol::GrpcWeb { .. } => {
                if let Some((code, message)) = grpc_status(headers) {
                    Watch::Known(code, message)
                } else if status != http::StatusCode::OK {
                    Watch::Known(Some(code_from_http(status.as_u16())), None)
                } else if let Protocol::GrpcWeb { text } = protocol {
                    Watch::GrpcWeb(WebScanner::new(text))
                } else {
                    Watch::GrpcTrailers
                }
            }
            Protocol::Connect => {
                if status.is_success() {
                    Watch::Known(None, None)
                } else {
                    Watch::ConnectError {
                        fallback: code_from_http(status.as_u16()),
                        body: Vec::new(),
                    }
                }
            }
        }
    }

    fn on_data(&mut self, data: &[u8]) {
        match self {
            Watch::ConnectError { body, .. } => {
                let room = MAX_ERROR_BODY.saturating_sub(body.len());
                body.extend_from_slice(&data[..data.len().min(room)]);
            }
            Watch::GrpcWeb(scanner) => scanner.feed(data),
            Watch::Known(..) | Watch::GrpcTrailers => {}
        }
    }

    fn on_trailers(&mut self, trailers: &HeaderMap) {
        if let Watch::GrpcTrailers = self
            && let Some((code, message)) = grpc_status(trailers)
        {
            *self = Watch::Known(code, message);
        }
    }

    /// The status to report; `ended` is false when the body was dropped early.
    fn verdict(self, ended: bool) -> (Option<ErrorCode>, Option<String>) {
        match self {
            Watch::Known(code, message) => (code, message),
            Watch::ConnectError { fallback, body } => {
                #[derive(serde::Deserialize)]
                struct ConnectErrorBody {
                    code: Option<String>,
                    message: Option<String>,
                }
                match serde_json::from_slice::<ConnectErrorBody>(&body) {
                    Ok(parsed) => (
                        Some(parsed.code.and_then(|c| c.parse().ok()).unwrap_or(fallback)),
                        parsed.message,
                    ),
                    Err(_) if !ended => (Some(ErrorCode::Canceled), None),
                    Err(_) => (Some(fallback), None),
                }
            }
            Watch::GrpcWeb(scanner) => match scanner.status() {
                Some((code, message)) => (code, message),
                None if !ended => (Some(ErrorCode::Canceled), None),
                None => (
                    Some(ErrorCode::Unknown),
                    Some("response ended without grpc-status".into()),
                ),
            },
            Watch::GrpcTrailers if !ended => (Some(ErrorCode::Canceled), None),
            Watch::GrpcTrailers => (
                Some(ErrorCode::Unknown),
                Some("response ended without grpc-status".into()),
            ),
        }
    }
}

/// `grpc-status` (and `grpc-message`) from headers or trailers.
fn grpc_status(map: &HeaderMap) -> Option<(Option<ErrorCode>, Option<String>)> {
    let raw = map.get("grpc-status")?.to_str().ok()?.trim();
    let message = map
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode);
    Some(parse_grpc_status(raw, message))
}

fn parse_grpc_status(raw: &str, message: Option<String>) -> (Option<ErrorCode>, Option<String>) {
    match raw.parse::<u32>() {
        Ok(0) => (None, None),
        Ok(n) => (
            Some(ErrorCode::from_grpc_code(n).unwrap_or(ErrorCode::Unknown)),
            message,
        ),
        Err(_) => (Some(ErrorCode::Unknown), message),
    }
}

/// The code a client infers from an HTTP status without a usable error body
/// (the mapping the Connect and gRPC specifications give).
fn code_from_http(status: u16) -> ErrorCode {
    match status {
        400 => ErrorCode::Internal,
        401 => ErrorCode::Unauthenticated,
        403 => ErrorCode::PermissionDenied,
        404 => ErrorCode::Unimplemented,
        429 | 502 | 503 | 504 => ErrorCode::Unavailable,
        _ => ErrorCode::Unknown,
    }
}

/// Decodes the percent-encoding of `grpc-message`.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Finds the trailer frame of a gRPC-Web body (flag 0x80) as the body
/// streams by, decoding base64 first for `grpc-web-text`.
struct WebScanner {
    text: Option<Base64Decoder>,
    header: [u8; 5],
    header_len: usize,
    remaining: usize,
    in_trailer: bool,
    trailer: Vec<u8>,
    trailer_done: bool,
}

impl WebScanner {
    fn new(text: bool) -> Self {
        Self {
            text: text.then(Base64Decoder::default),
            header: [0; 5],
            header_len: 0,
            remaining: 0,
            in_trailer: false,
            trailer: Vec::new(),
            trailer_done: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        match self.text.take() {
            Some(mut decoder) => {
                let decoded = decoder.feed(data);
                self.text = Some(decoder);
                self.feed_binary(&decoded);
            }
            None => self.feed_binary(data),
        }
    }

    fn feed_binary(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining == 0 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < 5 {
                    return;
                }
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.in_trailer = self.header[0] & 0x80 != 0;
                if self.in_trailer {
                    self.trailer.clear();
                    self.trailer_done = len == 0;
                }
                self.remaining = len;
            } else {
                let take = self.remaining.min(data.len());
                if self.in_trailer {
                    let room = MAX_WEB_TRAILER.saturating_sub(self.trailer.len());
                    self.trailer.extend_from_slice(&data[..take.min(room)]);
                }
                self.remaining -= take;
                data = &data[take..];
                if self.remaining == 0 && self.in_trailer {
                    self.trailer_done = true;
                }
            }
        }
    }

    fn status(&self) -> Option<(Option<ErrorCode>, Option<String>)> {
        if !self.trailer_done {
            return None;
        }
        let text = String::from_utf8_lossy(&self.trailer);
        let mut status = None;
        let mut message = None;
        for line in text.split("\r\n").flat_map(|l| l.split('\n')) {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if key.eq_ignore_ascii_case("grpc-status") {
                status = Some(value.trim().to_owned());
            } else if key.eq_ignore_ascii_case("grpc-message") {
                message = Some(percent_decode(value.trim()));
            }
        }
        status.map(|s| parse_grpc_status(&s, message))
    }
}

/// Incremental standard base64 decoding; each 4-character group stands alone,
/// so padding in the middle of the stream (one group per frame) is fine.
#[derive(Default)]
struct Base64Decoder {
    quad: [u8; 4],
    len: usize,
}

impl Base64Decoder {
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() / 4 * 3 + 3);
        for &c in data {
            if c.is_ascii_whitespace() {
                continue;
            }
            self.quad[self.len] = c;
            self.len += 1;
            if self.len == 4 {
                self.len = 0;
                let vals: Vec<Option<u8>> = self.quad.iter().map(|&c| sextet(c)).collect();
                let pads = self.quad.iter().filter(|&&c| c == b'=').count();
                let v: Vec<u8> = vals.iter().map(|v| v.unwrap_or(0)).collect();
                let n = (u32::from(v[0]) << 18)
                    | (u32::from(v[1]) << 12)
                    | (u32::from(v[2]) << 6)
                    | u32::from(v[3]);
                let bytes = n.to_be_bytes();
                out.extend_from_slice(&bytes[1..4 - pads.min(2)]);
            }
        }
        out
    }
}

fn sextet(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_known_methods_and_folds_the_rest() {
        for (method, name) in METHODS.iter().zip(SPAN_NAMES) {
            assert_eq!(name, format!("{SERVICE}/{method}"));
            assert_eq!(route(&format!("/{name}")), (*method, Some(name)));
        }
        assert_eq!(route("/vmm.v1.VmService/Bogus"), (OTHER_METHOD, None));
        assert_eq!(route("/other.Service/CreateVm"), (OTHER_METHOD, None));
        assert_eq!(route("/_/health"), (OTHER_METHOD, None));
        assert_eq!(route(""), (OTHER_METHOD, None));
    }

    #[test]
    fn protocol_follows_content_type() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().expect("header"));
            Protocol::of(&h)
        };
        assert_eq!(with("application/json"), Protocol::Connect);
        assert_eq!(with("application/proto"), Protocol::Connect);
        assert_eq!(with("application/grpc"), Protocol::Grpc);
        assert_eq!(with("application/grpc+proto"), Protocol::Grpc);
        assert_eq!(
            with("application/grpc-web+proto"),
            Protocol::GrpcWeb { text: false }
        );
        assert_eq!(
            with("application/grpc-web-text"),
            Protocol::GrpcWeb { text: true }
        );
        assert_eq!(Protocol::of(&HeaderMap::new()), Protocol::Connect);
    }

    #[test]
    fn connect_error_body_decides_over_the_ambiguous_http_status() {
        let mut w = Watch::ConnectError {
            fallback: code_from_http(400),
            body: Vec::new(),
        };
        let body = br#"{"code":"failed_precondition","message":"vm is Running"}"#;
        w.on_data(&body[..10]);
        w.on_data(&body[10..]);
        assert_eq!(
            w.verdict(true),
            (
                Some(ErrorCode::FailedPrecondition),
                Some("vm is Running".into())
            )
        );
        let w = Watch::ConnectError {
            fallback: code_from_http(503),
            body: b"<html>proxy</html>".to_vec(),
        };
        assert_eq!(w.verdict(true), (Some(ErrorCode::Unavailable), None));
    }

    #[test]
    fn grpc_status_comes_from_trailers() {
        let mut w = Watch::GrpcTrailers;
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "5".parse().expect("header"));
        t.insert("grpc-message", "vm%20not%20found".parse().expect("header"));
        w.on_trailers(&t);
        assert_eq!(
            w.verdict(true),
            (Some(ErrorCode::NotFound), Some("vm not found".into()))
        );
        assert_eq!(
            Watch::GrpcTrailers.verdict(false).0,
            Some(ErrorCode::Canceled)
        );
        assert_eq!(
            Watch::GrpcTrailers.verdict(true).0,
            Some(ErrorCode::Unknown)
        );
    }

    fn web_body(status: &str) -> Vec<u8> {
        let mut body = vec![0u8, 0, 0, 0, 3, 1, 2, 3];
        let trailer = format!("grpc-status:{status}\r\ngrpc-message:bad%21\r\n");
        body.push(0x80);
        body.extend_from_slice(&(trailer.len() as u32).to_be_bytes());
        body.extend_from_slice(trailer.as_bytes());
        body
    }

    #[test]
    fn grpc_web_trailer_frame_is_found_across_chunks() {
        let body = web_body("9");
        for split in 0..body.len() {
            let mut s = WebScanner::new(false);
            s.feed(&body[..split]);
            s.feed(&body[split..]);
            assert_eq!(
                s.status(),
                Some((Some(ErrorCode::FailedPrecondition), Some("bad!".into()))),
                "split at {split}"
            );
        }
        let mut ok = WebScanner::new(false);
        ok.feed(&web_body("0"));
        assert_eq!(ok.status(), Some((None, None)));
    }

    #[test]
    fn grpc_web_text_is_decoded_first() {
        let body = web_body("14");
        let encoded = base64_encode(&body);
        let mut s = WebScanner::new(true);
        for chunk in encoded.as_bytes().chunks(7) {
            s.feed(chunk);
        }
        assert_eq!(s.status().map(|s| s.0), Some(Some(ErrorCode::Unavailable)));
    }

    fn base64_encode(data: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn percent_decoding_tolerates_bad_escapes() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%E2%9C%93"), "\u{2713}");
    }

    #[test]
    fn http_fallback_mapping_matches_the_spec() {
        assert_eq!(code_from_http(400), ErrorCode::Internal);
        assert_eq!(code_from_http(404), ErrorCode::Unimplemented);
        assert_eq!(code_from_http(503), ErrorCode::Unavailable);
        assert_eq!(code_from_http(500), ErrorCode::Unknown);
    }
}
