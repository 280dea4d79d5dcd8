//! Observability end to end: the RPC layer around a trivial Connect/gRPC
//! service, the OpenTelemetry pipeline exporting to an in-process OTLP/HTTP
//! collector, the keep-errors sampling, the Prometheus text and the JSON logs.

mod prom_text;
mod receiver;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::{Layer, Service, ServiceExt};
use tracing_subscriber::fmt::MakeWriter;

use vmcp::adapters::inbound::rpc_layer::{self, DURATION_BUCKETS, RpcTelemetryLayer};
use vmcp::adapters::outbound::otel::{self, ExportState, OtelHandle, OtelSettings};
use vmcp::domain::{Operation, VmEvent, VmId, VmState};
use vmcp::ports::{BackendKind, Telemetry, TelemetryEvent};

use receiver::{Receiver, hex, int_attr, str_attr};

const SPAN_KIND_SERVER: i32 = 2;
const STATUS_CODE_ERROR: i32 = 2;

/// Captures log lines written by the subscriber.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Capture {
    fn lines(&self) -> Vec<Value> {
        let bytes = self.0.lock().expect("capture").clone();
        String::from_utf8(bytes)
            .expect("utf8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The access-log lines, one per finished RPC.
    fn access(&self) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["target"] == "vmcp::access")
            .collect()
    }
}

/// A response body of prepared frames (data, then optional trailers).
struct Frames(VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// A stand-in for the ConnectRPC router. The `x-outcome` header picks the
/// answer: `ok`, `failed_precondition` or `not_found` (an RPC error),
/// `logged_error` (success, but a child span logs an error) or `logged`
/// (success, and the handler itself logs a warning). Each call records
/// `vm.id` for the RPC and runs one child "hypervisor" span; the answer's
/// `x-in-span` header says whether the handler ran inside a span (the
/// current OpenTelemetry context has one).
async fn fake_vm_service(req: Request<Full<Bytes>>) -> Result<Response<Frames>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let outcome = header("x-outcome");
    let vm_id = header("x-vm-id");
    rpc_layer::record_vm_id(&vm_id);
    if outcome == "logged" {
        tracing::warn!(target: "fake", "answering from inside the RPC");
    }
    // The child span opens in a later poll of the service future: the
    // RPC's context is made current again on every poll.
    tokio::task::yield_now().await;
    let in_span = {
        use opentelemetry::trace::TraceContextExt as _;
        opentelemetry::Context::current()
            .span()
            .span_context()
            .is_valid()
    };
    {
        let call = tracing::info_span!("hypervisor.call", vm.id = %vm_id, operation = "info");
        let _entered = call.enter();
        if outcome == "logged_error" {
            tracing::error!("the VMM refused the call");
        }
    }
    let grpc = header("content-type").starts_with("application/grpc");
    let mut frames = VecDeque::new();
    let response = match (grpc, outcome.as_str()) {
        (false, "failed_precondition" | "not_found") => {
            let status = if outcome == "not_found" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            let body = format!(r#"{{"code":"{outcome}","message":"vm {vm_id} says no"}}"#);
            frames.push_back(Frame::data(Bytes::from(body)));
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Frames(frames))
        }
        (false, _) => {
            frames.push_back(Frame::data(Bytes::from_static(b"{}")));
            Response::builder()
                .header("content-type", "application/json")
                .body(Frames(frames))
        }
        (true, _) => {
            frames.push_back(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])));
            let mut trailers = HeaderMap::new();
            let code = if outcome == "not_found" { "5" } else { "0" };
            trailers.insert("grpc-status", code.parse().expect("header"));
            frames.push_back(Frame::trailers(trailers));
            Response::builder()
                .header("content-type", "application/grpc")
                .body(Frames(frames))
        }
    };
    let mut response = response.expect("response");
    response
        .headers_mut()
        .insert("x-in-span", in_span.to_string().parse().expect("header"));
    Ok(response)
}

/// One RPC through `layer` to the fake service; the body is read to the end.
async fn call(
    layer: &RpcTelemetryLayer,
    method: &str,
    outcome: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Bytes) {
    let (status, _, body) = call_full(layer, method, outcome, headers).await;
    (status, body)
}

/// [`call`], with the answer's headers.
async fn call_full(
    layer: &RpcTelemetryLayer,
    method: &str,
    outcome: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Bytes) {
    let svc = layer.layer(tower::service_fn(fake_vm_service));
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("/vmm.v1.VmService/{method}"))
        .header("content-type", "application/json")
        .header("x-outcome", outcome)
        .header("x-vm-id", "vm-1");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let resp = svc.oneshot(req).await.expect("service");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

fn settings(endpoint: String, rate: f64) -> OtelSettings {
    OtelSettings {
        enabled: true,
        endpoint,
        sampling_rate: rate,
        service_name: "vmcp-test".into(),
        service_version: "9.9.9".into(),
        prometheus_enabled: true,
        ..OtelSettings::default()
    }
}

/// A handle, its log capture and the subscriber installed for this thread.
fn setup(
    s: &OtelSettings,
    filter: &str,
) -> (OtelHandle, Capture, tracing::subscriber::DefaultGuard) {
    let handle = otel::init(s).expect("init telemetry");
    let capture = Capture::default();
    let sub = otel::subscriber(filter, &handle, capture.clone()).expect("subscriber");
    let guard = tracing::subscriber::set_default(sub);
    (handle, capture, guard)
}

fn span_named<'a>(
    spans: &'a [(String, receiver_span::Span)],
    name: &str,
) -> Vec<&'a receiver_span::Span> {
    spans
        .iter()
        .filter(|(_, s)| s.name == name)
        .map(|(_, s)| s)
        .collect()
}

mod receiver_span {
    pub use opentelemetry_proto::tonic::trace::v1::Span;
}

#[tokio::test]
async fn spans_metrics_and_logs_reach_the_collector() {
    let collector = Receiver::start();
    let (handle, logs, _guard) = setup(&settings(collector.endpoint(), 1.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    let (status, headers, _) = call_full(&layer, "GetVmInfo", "ok", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        headers["x-in-span"], "true",
        "traces on: the handler runs in the RPC's span"
    );
    let vm = VmId::parse("vm-1").expect("id");
    handle.record(TelemetryEvent::Vm(VmEvent::StateChanged {
        vm_id: vm,
        from: VmState::Created,
        to: VmState::Running,
        reason: String::new(),
        generation: 2,
    }));
    handle.record(TelemetryEvent::HypervisorCall {
        backend: BackendKind::CloudHypervisor,
        operation: "boot",
        outcome: "ok",
        duration: Duration::from_millis(3),
    });
    handle.set_vm_counts(BackendKind::Firecracker, &[(VmState::Running, 2)]);
    handle.force_flush().expect("flush");

    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 2));
    let spans = collector.spans();
    let server = span_named(&spans, "vmm.v1.VmService/GetVmInfo");
    assert_eq!(server.len(), 1, "{spans:?}");
    let server = server[0];
    assert_eq!(server.kind, SPAN_KIND_SERVER);
    let attrs = &server.attributes;
    assert_eq!(
        str_attr(attrs, "rpc.system").as_deref(),
        Some("connect_rpc")
    );
    assert_eq!(
        str_attr(attrs, "rpc.service").as_deref(),
        Some("vmm.v1.VmService")
    );
    assert_eq!(str_attr(attrs, "rpc.method").as_deref(), Some("GetVmInfo"));
    assert_eq!(
        str_attr(attrs, "rpc.response.status_code").as_deref(),
        Some("ok")
    );
    assert_eq!(str_attr(attrs, "vm.id").as_deref(), Some("vm-1"));
    assert_ne!(
        server.status.as_ref().map(|s| s.code),
        Some(STATUS_CODE_ERROR)
    );
    assert!(spans.iter().all(|(svc, _)| svc == "vmcp-test"));

    let child = span_named(&spans, "hypervisor.call");
    assert_eq!(child.len(), 1);
    assert_eq!(child[0].trace_id, server.trace_id);
    assert_eq!(child[0].parent_span_id, server.span_id);
    assert_eq!(
        str_attr(&child[0].attributes, "vm.id").as_deref(),
        Some("vm-1")
    );

    assert!(collector.wait_until(Duration::from_secs(10), |c| {
        c.metrics().contains_key("rpc.server.requests")
    }));
    let metrics = collector.metrics();
    for name in [
        "rpc.server.requests",
        "rpc.server.request.duration",
        "rpc.server.active_requests",
        "vmcp.vm.transitions",
        "vmcp.hypervisor.call.duration",
        "vmcp.vms",
        "process.cpu",
        "process.resident_memory",
        "process.open_fds",
    ] {
        assert!(
            metrics.contains_key(name),
            "missing {name}: {:?}",
            metrics.keys()
        );
    }
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    match &metrics["rpc.server.request.duration"].data {
        Some(Data::Histogram(h)) => {
            let p = &h.data_points[0];
            assert_eq!(p.explicit_bounds, DURATION_BUCKETS.to_vec());
            assert_eq!(p.count, 1);
            assert_eq!(
                str_attr(&p.attributes, "rpc.method").as_deref(),
                Some("GetVmInfo")
            );
            assert_eq!(str_attr(&p.attributes, "rpc.status").as_deref(), Some("ok"));
        }
        other => panic!("duration is not a histogram: {other:?}"),
    }
    assert_eq!(metrics["rpc.server.request.duration"].unit, "s");
    match &metrics["vmcp.vms"].data {
        Some(Data::Gauge(g)) => {
            let running = g.data_points.iter().find(|p| {
                str_attr(&p.attributes, "state").as_deref() == Some("running")
                    && str_attr(&p.attributes, "backend").as_deref() == Some("firecracker")
            });
            use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as V;
            assert_eq!(running.and_then(|p| p.value), Some(V::AsInt(2)));
        }
        other => panic!("vmcp.vms is not a gauge: {other:?}"),
    }

    let access = logs.access();
    assert_eq!(access.len(), 1, "{:?}", logs.lines());
    let line = &access[0];
    assert_eq!(line["method"], "vmm.v1.VmService/GetVmInfo");
    assert_eq!(line["code"], "ok");
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0));
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["trace_id"], hex(&server.trace_id));
    assert_eq!(line["span_id"], hex(&server.span_id));
    assert_eq!(line["span"], "rpc");
    assert_eq!(line["vm_id"], "vm-1");

    let health = handle.health();
    assert_eq!(health.traces.state, ExportState::Ok);
    assert_eq!(health.metrics.state, ExportState::Ok);
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
    collector.stop();
}

#[tokio::test]
async fn at_ratio_zero_error_traces_arrive_whole_and_clean_ones_do_not() {
    let collector = Receiver::start();
    let (handle, logs, _guard) = setup(&settings(collector.endpoint(), 0.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    let (ok, _) = call(&layer, "GetVmInfo", "ok", &[]).await;
    let (denied, body) = call(&layer, "BootVm", "failed_precondition", &[]).await;
    let (logged, _) = call(&layer, "PauseVm", "logged_error", &[]).await;
    assert_eq!(ok, StatusCode::OK);
    assert_eq!(denied, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("failed_precondition"));
    assert_eq!(logged, StatusCode::OK);
    handle.force_flush().expect("flush");

    let trace_of = |method: &str| -> String {
        logs.access()
            .iter()
            .find(|l| l["method"] == format!("vmm.v1.VmService/{method}"))
            .and_then(|l| l["trace_id"].as_str().map(str::to_owned))
            .unwrap_or_else(|| panic!("no access line for {method}"))
    };
    let (clean, failed, child_error) = (
        trace_of("GetVmInfo"),
        trace_of("BootVm"),
        trace_of("PauseVm"),
    );

    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 4));
    let spans = collector.spans();
    let in_trace = |t: &str| -> Vec<String> {
        let mut names: Vec<String> = spans
            .iter()
            .filter(|(_, s)| hex(&s.trace_id) == t)
            .map(|(_, s)| s.name.clone())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        in_trace(&failed),
        vec![
            "hypervisor.call".to_owned(),
            "vmm.v1.VmService/BootVm".to_owned()
        ],
        "the failing RPC's trace arrives whole"
    );
    assert_eq!(
        in_trace(&child_error),
        vec![
            "hypervisor.call".to_owned(),
            "vmm.v1.VmService/PauseVm".to_owned()
        ],
        "an error inside a successful RPC keeps its trace"
    );
    assert!(
        in_trace(&clean).is_empty(),
        "the clean trace is dropped at ratio 0"
    );
    assert_eq!(spans.len(), 4, "{spans:?}");

    let boot = span_named(&spans, "vmm.v1.VmService/BootVm")[0];
    let status = boot.status.as_ref().expect("status");
    assert_eq!(status.code, STATUS_CODE_ERROR);
    assert_eq!(status.message, "vm vm-1 says no");
    assert_eq!(
        str_attr(&boot.attributes, "rpc.connect_rpc.error_code").as_deref(),
        Some("failed_precondition")
    );

    let health = handle.health();
    assert_eq!(health.traces_dropped, 1);
    assert_eq!(health.error_traces_kept, 2);
    assert_eq!(health.held_spans, 0);
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
}

const REMOTE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REMOTE_PARENT: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn a_sampled_remote_parent_is_honoured_with_its_baggage() {
    let collector = Receiver::start();
    let (handle, _logs, _guard) = setup(&settings(collector.endpoint(), 0.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    let traceparent = format!("00-{REMOTE_TRACE}-{REMOTE_PARENT}-01");
    let (status, _) = call(
        &layer,
        "ListVms",
        "ok",
        &[("traceparent", &traceparent), ("baggage", "tenant=acme")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    handle.force_flush().expect("flush");

    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 2));
    let spans = collector.spans();
    let server = span_named(&spans, "vmm.v1.VmService/ListVms");
    assert_eq!(server.len(), 1);
    assert_eq!(hex(&server[0].trace_id), REMOTE_TRACE);
    assert_eq!(hex(&server[0].parent_span_id), REMOTE_PARENT);
    assert_eq!(
        str_attr(&server[0].attributes, "baggage.tenant").as_deref(),
        Some("acme")
    );
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
}

#[tokio::test]
async fn an_unsampled_remote_parent_exports_only_error_traces() {
    let collector = Receiver::start();
    let (handle, _logs, _guard) = setup(&settings(collector.endpoint(), 1.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    let clean_trace = "11111111111111111111111111111111";
    let error_trace = "22222222222222222222222222222222";
    let clean = format!("00-{clean_trace}-{REMOTE_PARENT}-00");
    let failing = format!("00-{error_trace}-{REMOTE_PARENT}-00");
    call(&layer, "GetVmInfo", "ok", &[("traceparent", &clean)]).await;
    call(
        &layer,
        "DeleteVm",
        "not_found",
        &[("traceparent", &failing)],
    )
    .await;
    handle.force_flush().expect("flush");

    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 2));
    let spans = collector.spans();
    let traces: Vec<String> = spans.iter().map(|(_, s)| hex(&s.trace_id)).collect();
    assert!(traces.iter().all(|t| t == error_trace), "{traces:?}");
    assert_eq!(traces.len(), 2);
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
}

#[tokio::test]
async fn traces_are_exported_even_when_logs_are_quieter() {
    let collector = Receiver::start();
    let (handle, logs, _guard) = setup(&settings(collector.endpoint(), 1.0), "warn");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    call(&layer, "CreateVm", "logged_error", &[]).await;
    handle.force_flush().expect("flush");
    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 2));
    let spans = collector.spans();
    let server = span_named(&spans, "vmm.v1.VmService/CreateVm");
    assert_eq!(server.len(), 1);

    let lines = logs.lines();
    assert!(
        logs.access().is_empty(),
        "INFO access lines are filtered out at warn"
    );
    let error = lines
        .iter()
        .find(|l| l["level"] == "ERROR")
        .expect("the error line is printed");
    assert_eq!(
        error["trace_id"],
        hex(&server[0].trace_id),
        "ids survive a quieter log filter"
    );
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
}

#[tokio::test]
async fn grpc_status_comes_from_the_trailer() {
    let collector = Receiver::start();
    let (handle, _logs, _guard) = setup(&settings(collector.endpoint(), 1.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    for outcome in ["ok", "not_found"] {
        let mut svc = layer.layer(tower::service_fn(fake_vm_service));
        let req = Request::builder()
            .method("POST")
            .uri("/vmm.v1.VmService/DeleteVm")
            .header("content-type", "application/grpc")
            .header("x-outcome", outcome)
            .header("x-vm-id", "vm-2")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = svc
            .ready()
            .await
            .expect("ready")
            .call(req)
            .await
            .expect("call");
        let collected = resp.into_body().collect().await.expect("body");
        assert!(
            collected.trailers().is_some(),
            "trailers pass through the layer"
        );
    }
    handle.force_flush().expect("flush");

    let text = handle
        .render_prometheus()
        .expect("prometheus on")
        .expect("render");
    let e = prom_text::parse(&text);
    for status in ["ok", "not_found"] {
        assert_eq!(
            e.value(
                "rpc_server_requests_total",
                &[("rpc_method", "DeleteVm"), ("rpc_status", status)]
            ),
            Some(1.0),
            "{status}"
        );
    }
    assert!(collector.wait_until(Duration::from_secs(10), |c| c.spans().len() >= 4));
    let spans = collector.spans();
    let mut codes: Vec<(i64, bool)> = span_named(&spans, "vmm.v1.VmService/DeleteVm")
        .iter()
        .map(|s| {
            (
                int_attr(&s.attributes, "rpc.grpc.status_code").expect("grpc code"),
                s.status.as_ref().map(|st| st.code) == Some(STATUS_CODE_ERROR),
            )
        })
        .collect();
    codes.sort();
    assert_eq!(codes, vec![(0, false), (5, true)]);
    assert!(
        span_named(&spans, "vmm.v1.VmService/DeleteVm")
            .iter()
            .all(|s| str_attr(&s.attributes, "rpc.system").as_deref() == Some("grpc"))
    );
    handle.shutdown(Duration::from_secs(5)).expect("shutdown");
}

#[tokio::test]
async fn with_the_collector_down_rpcs_are_unaffected() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (handle, logs, _guard) = setup(&settings(format!("127.0.0.1:{port}"), 1.0), "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());

    let started = Instant::now();
    for i in 0..50 {
        let outcome = if i % 5 == 0 { "not_found" } else { "ok" };
        let (status, _) = call(&layer, "GetVmInfo", outcome, &[]).await;
        let want = if outcome == "ok" {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        assert_eq!(status, want);
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(5), "50 RPCs took {elapsed:?}");
    assert_eq!(logs.access().len(), 50);

    // Flushing surfaces the failure in health; it never reached an RPC.
    let _ = handle.force_flush();
    let health = handle.health();
    assert_eq!(health.traces.state, ExportState::Failing, "{health:?}");
    assert!(health.traces.last_error.is_some());
    assert!(health.degraded());
    let _ = handle.shutdown(Duration::from_secs(5));
}

#[tokio::test]
async fn with_otel_disabled_nothing_is_exported() {
    let collector = Receiver::start();
    let s = OtelSettings {
        enabled: false,
        prometheus_enabled: false,
        endpoint: collector.endpoint(),
        ..OtelSettings::default()
    };
    let (handle, logs, _guard) = setup(&s, "info");
    assert!(handle.tracer().is_none());
    assert!(handle.render_prometheus().is_none());
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());
    let (status, headers, _) = call_full(&layer, "GetVmInfo", "failed_precondition", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        headers["x-in-span"], "false",
        "traces off: no span is made for an RPC"
    );
    let (status, _) = call(&layer, "PauseVm", "logged", &[]).await;
    assert_eq!(status, StatusCode::OK);
    handle.force_flush().expect("flush is a no-op");
    handle.shutdown(Duration::from_secs(1)).expect("shutdown");

    assert!(collector.spans().is_empty());
    assert!(collector.metrics().is_empty());
    let access = logs.access();
    assert_eq!(access.len(), 2, "the access log still works");
    assert_eq!(access[0]["code"], "failed_precondition");
    assert!(access[0].get("trace_id").is_none());
    for line in &access {
        assert_eq!(line["span"], "rpc", "{line}");
        assert_eq!(line["vm_id"], "vm-1", "{line}");
    }
    // A line the handler writes still names the RPC and its VM.
    let inner = logs
        .lines()
        .into_iter()
        .find(|l| l["target"] == "fake")
        .expect("the handler's warning");
    assert_eq!(inner["span"], "rpc", "{inner}");
    assert_eq!(inner["vm_id"], "vm-1", "{inner}");
    assert!(inner.get("trace_id").is_none());
    let health = handle.health();
    assert_eq!(health.traces.state, ExportState::Disabled);
    assert!(!health.degraded());
}

/// Drives some traffic and events on a Prometheus-only handle.
async fn prometheus_text() -> String {
    let s = OtelSettings {
        enabled: false,
        prometheus_enabled: true,
        ..OtelSettings::default()
    };
    let (handle, _logs, _guard) = setup(&s, "info");
    let layer = RpcTelemetryLayer::new(&handle.meter()).with_tracer(handle.tracer());
    call(&layer, "GetVmInfo", "ok", &[]).await;
    call(&layer, "GetVmInfo", "ok", &[]).await;
    call(&layer, "BootVm", "failed_precondition", &[]).await;
    handle.set_vm_counts(
        BackendKind::CloudHypervisor,
        &[(VmState::Running, 3), (VmState::Paused, 1)],
    );
    handle.record(TelemetryEvent::HypervisorCall {
        backend: BackendKind::Firecracker,
        operation: "info",
        outcome: "ok",
        duration: Duration::from_micros(300),
    });
    handle.record(TelemetryEvent::BootCompleted {
        backend: BackendKind::Firecracker,
        duration: Duration::from_millis(120),
    });
    handle.record(TelemetryEvent::VmmExited {
        backend: BackendKind::CloudHypervisor,
        reason: "crash",
    });
    handle.record(TelemetryEvent::Vm(VmEvent::StateChanged {
        vm_id: VmId::parse("vm-9").expect("id"),
        from: VmState::Running,
        to: VmState::Paused,
        reason: String::new(),
        generation: 3,
    }));
    handle.record(TelemetryEvent::Admission {
        op: Operation::Pause,
        outcome: "denied",
    });
    handle
        .render_prometheus()
        .expect("prometheus on")
        .expect("render")
}

#[tokio::test]
async fn prometheus_text_has_exact_names_labels_and_second_buckets() {
    let text = prometheus_text().await;
    let e = prom_text::parse(&text);

    assert_eq!(e.types["rpc_server_requests_total"], "counter");
    assert_eq!(e.types["rpc_server_request_duration_seconds"], "histogram");
    assert_eq!(e.types["rpc_server_active_requests"], "gauge");
    assert_eq!(
        e.value(
            "rpc_server_requests_total",
            &[("rpc_method", "GetVmInfo"), ("rpc_status", "ok")]
        ),
        Some(2.0)
    );
    assert_eq!(
        e.value(
            "rpc_server_requests_total",
            &[
                ("rpc_method", "BootVm"),
                ("rpc_status", "failed_precondition")
            ]
        ),
        Some(1.0)
    );
    for s in e.find("rpc_server_requests_total", &[]) {
        let keys: Vec<&str> = s.labels.keys().map(String::as_str).collect();
        assert_eq!(keys, vec!["rpc_method", "rpc_status"], "{s:?}");
    }
    let buckets: Vec<String> = e
        .find(
            "rpc_server_request_duration_seconds_bucket",
            &[("rpc_method", "GetVmInfo"), ("rpc_status", "ok")],
        )
        .iter()
        .map(|s| s.labels["le"].clone())
        .collect();
    let mut want: Vec<String> = DURATION_BUCKETS.iter().map(|b| b.to_string()).collect();
    want.push("+Inf".into());
    assert_eq!(buckets, want, "second-based buckets from 0.5 ms to 60 s");
    assert_eq!(
        e.value(
            "rpc_server_request_duration_seconds_count",
            &[("rpc_method", "GetVmInfo"), ("rpc_status", "ok")]
        ),
        Some(2.0)
    );
    let sum = e
        .value(
            "rpc_server_request_duration_seconds_sum",
            &[("rpc_method", "GetVmInfo"), ("rpc_status", "ok")],
        )
        .expect("sum");
    assert!(
        sum > 0.0 && sum < 1.0,
        "in seconds, not milliseconds: {sum}"
    );
    assert_eq!(
        e.value("rpc_server_active_requests", &[("rpc_method", "GetVmInfo")]),
        Some(0.0)
    );

    assert_eq!(
        e.value(
            "vmcp_vms",
            &[("backend", "cloudhypervisor"), ("state", "running")]
        ),
        Some(3.0)
    );
    assert_eq!(
        e.value(
            "vmcp_vms",
            &[("backend", "cloudhypervisor"), ("state", "failed")]
        ),
        Some(0.0)
    );
    assert_eq!(
        e.value(
            "vmcp_hypervisor_call_duration_seconds_bucket",
            &[
                ("backend", "firecracker"),
                ("operation", "info"),
                ("le", "0.0005")
            ]
        ),
        Some(1.0),
        "0.3 ms lands in the first bucket"
    );
    assert_eq!(
        e.value(
            "vmcp_vm_boot_duration_seconds_count",
            &[("backend", "firecracker")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.value(
            "vmcp_vmm_exits_total",
            &[("backend", "cloudhypervisor"), ("reason", "crash")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.value(
            "vmcp_vm_transitions_total",
            &[("from", "running"), ("to", "paused")]
        ),
        Some(1.0)
    );
    assert_eq!(
        e.value(
            "vmcp_vm_admissions_total",
            &[("operation", "pause"), ("outcome", "denied")]
        ),
        Some(1.0)
    );
    assert_eq!(e.types["process_cpu_seconds_total"], "counter");
    for name in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "process_uptime_seconds",
    ] {
        let v = e
            .value(name, &[])
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(v > 0.0, "{name} = {v}");
    }

    assert!(!text.contains("_total_total"));
    assert!(!text.contains("_seconds_seconds"));
    assert!(
        !text.contains("otel_scope"),
        "no scope labels on every series"
    );
    assert!(!text.contains("vm_id"), "no per-VM labels");
}

#[tokio::test]
async fn promtool_accepts_the_metrics() {
    let Some(promtool) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    }) else {
        crate::skips::skip("promtool_accepts_the_metrics", "promtool not on PATH");
        return;
    };
    let text = prometheus_text().await;
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn serve_metrics_answers_on_its_own_port() {
    let s = OtelSettings {
        enabled: false,
        ..OtelSettings::default()
    };
    let handle = otel::init(&s).expect("init");
    handle.set_vm_counts(BackendKind::Firecracker, &[(VmState::Created, 1)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(otel::serve_metrics(listener, handle.clone(), async move {
        let _ = stop_rx.await;
    }));

    let (status, content_type, body) = http_get(addr, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type.as_deref(), Some(otel::scrape::TEXT_FORMAT));
    let e = prom_text::parse(&body);
    assert_eq!(
        e.value(
            "vmcp_vms",
            &[("backend", "firecracker"), ("state", "created")]
        ),
        Some(1.0)
    );
    assert_eq!(http_get(addr, "GET", "/other").await.0, 404);
    assert_eq!(http_get(addr, "POST", "/metrics").await.0, 405);

    stop_tx.send(()).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops")
        .expect("server task");
}

async fn http_get(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> (u16, Option<String>, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("send");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    drop(sender);
    let _ = conn.await;
    (status, ct, String::from_utf8_lossy(&body).into_owned())
}

/// The PromQL expressions of the provisioned Grafana dashboard, with the
/// Grafana variables replaced by concrete values.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/vmcp-overview.json"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read dashboard"))
            .expect("dashboard JSON");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["datasource"]["type"] != "prometheus" {
            continue;
        }
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            out.push(expr.replace("$__rate_interval", "1m").replace("$job", ".*"));
        }
    }
    out
}

#[tokio::test]
async fn dashboard_queries_use_only_metrics_vmcp_exports() {
    let e = prom_text::parse(&prometheus_text().await);
    let exported: std::collections::HashSet<&str> =
        e.samples.iter().map(|s| s.name.as_str()).collect();
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    let mut referenced = 0;
    for q in &queries {
        for word in q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            let ours = ["rpc_server_", "vmcp_", "process_"]
                .iter()
                .any(|p| word.starts_with(p));
            if ours {
                referenced += 1;
                assert!(
                    exported.contains(word),
                    "dashboard uses {word}, which VMCP does not export: {q}"
                );
            }
        }
    }
    assert!(
        referenced >= queries.len(),
        "every query reads a VMCP metric"
    );
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let Some(promtool) = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    }) else {
        crate::skips::skip("dashboard_queries_are_valid_promql", "promtool not on PATH");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules.yaml");
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in dashboard_queries().iter().enumerate() {
        yaml.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(q).expect("quote")
        ));
    }
    std::fs::write(&rules, yaml).expect("write rules");
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
