//! An in-process OTLP/HTTP collector: a hyper server on 127.0.0.1:0, on its
//! own thread and runtime, that decodes the protobuf export requests and keeps
//! them for assertions. Running apart from the test's runtime lets a test
//! block in `force_flush` while the exporter talks to it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::Metric;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// What the collector received.
#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    bad_requests: Vec<String>,
}

/// A running collector; stopped and joined by [`Receiver::stop`] or on drop.
pub struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Starts a collector on an ephemeral loopback port.
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind collector");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Received::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let store = received.clone();
        let thread = std::thread::Builder::new()
            .name("otlp-receiver".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(serve(listener, store, stop_rx));
            })
            .expect("spawn collector");
        Self {
            addr,
            received,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `host:port`, as UNKEY_VMCP_OTEL_ENDPOINT takes it.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Every span received so far, with its resource's service.name.
    pub fn spans(&self) -> Vec<(String, Span)> {
        let r = self.received.lock().expect("received");
        assert!(
            r.bad_requests.is_empty(),
            "bad OTLP requests: {:?}",
            r.bad_requests
        );
        let mut out = Vec::new();
        for req in &r.traces {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|res| str_attr(&res.attributes, "service.name"))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }

    /// The most recent export of each metric, by name.
    pub fn metrics(&self) -> HashMap<String, Metric> {
        let r = self.received.lock().expect("received");
        let mut out = HashMap::new();
        for req in &r.metrics {
            for rm in &req.resource_metrics {
                for sm in &rm.scope_metrics {
                    for m in &sm.metrics {
                        out.insert(m.name.clone(), m.clone());
                    }
                }
            }
        }
        out
    }

    /// Polls `done` until it holds or `within` passes; returns its last value.
    pub fn wait_until(&self, within: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server and joins its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("collector thread");
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(
    listener: std::net::TcpListener,
    store: Arc<Mutex<Received>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let store = store.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let store = store.clone();
                async move { Ok::<_, Infallible>(handle(req, store).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    store: Arc<Mutex<Received>>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return status(StatusCode::BAD_REQUEST, format!("body: {e}")),
    };
    let mut r = store.lock().expect("store");
    if content_type != "application/x-protobuf" {
        r.bad_requests
            .push(format!("{path}: content-type {content_type}"));
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, String::new());
    }
    match path.as_str() {
        "/v1/traces" => match ExportTraceServiceRequest::decode(body) {
            Ok(m) => r.traces.push(m),
            Err(e) => r.bad_requests.push(format!("traces: {e}")),
        },
        "/v1/metrics" => match ExportMetricsServiceRequest::decode(body) {
            Ok(m) => r.metrics.push(m),
            Err(e) => r.bad_requests.push(format!("metrics: {e}")),
        },
        other => {
            r.bad_requests.push(format!("unexpected path {other}"));
            return status(StatusCode::NOT_FOUND, String::new());
        }
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/x-protobuf"),
    );
    resp
}

fn status(code: StatusCode, text: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = code;
    r
}

/// A string attribute by key.
pub fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

/// An integer attribute by key.
pub fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|AnyValue { value }| value.as_ref())
}

/// Lower-case hex, as trace ids appear in traceparent and in logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
