//! Tests of the telemetry layer: routing of method paths to labels and span
//! names, and the status each protocol reports.

use base64::Engine as _;
use connectrpc::ErrorCode;
use http::HeaderMap;

use super::status::{Protocol, Watch, WebScanner, code_from_http, percent_decode};
use super::*;

#[test]
fn routes_known_methods_and_folds_the_rest() {
    for (method, name) in METHODS.iter().map(|m| (&m.name, m.span_name)) {
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
    base64::engine::general_purpose::STANDARD.encode(data)
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

#[test]
fn status_labels_follow_the_grpc_code_numbers() {
    assert_eq!(status_label(0), "ok");
    for n in 1..STATUSES {
        let code = ErrorCode::from_grpc_code(n as u32).expect("a code for 1..=16");
        assert_eq!(status_label(n), code.as_str());
        assert_eq!(code.grpc_code() as usize, n);
    }
    let mut labels: Vec<&str> = (0..STATUSES).map(status_label).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), STATUSES, "every status has its own label");
}

#[test]
fn counts_report_only_methods_that_were_called() {
    let counts = RpcCounts::new();
    let get = METHODS.iter().position(|m| m.name == "GetVmInfo").unwrap();
    assert!(!(0..=METHODS.len()).any(|m| counts.called(m)));
    counts.active[get].fetch_add(1, Ordering::Relaxed);
    assert!(counts.called(get), "in progress counts as called");
    counts.active[get].fetch_sub(1, Ordering::Relaxed);
    counts.requests[get][5].fetch_add(1, Ordering::Relaxed);
    assert!(counts.called(get), "finished too");
    assert_eq!(RpcCounts::method_label(get), "GetVmInfo");
    assert_eq!(RpcCounts::method_label(METHODS.len()), OTHER_METHOD);
    assert!(!counts.called(METHODS.len()));
}

/// A service whose answer never comes.
#[derive(Clone)]
struct Never;

impl tower::Service<http::Request<()>> for Never {
    type Response = http::Response<http_body_util::Empty<bytes::Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<()>) -> Self::Future {
        record_vm_id("vm-gone");
        std::future::pending()
    }
}

#[tokio::test]
async fn an_rpc_dropped_before_its_answer_ends_canceled() {
    use opentelemetry::metrics::MeterProvider as _;
    use tower::{Layer as _, Service as _};
    let meter = opentelemetry::metrics::noop::NoopMeterProvider::new().meter("test");
    let layer = RpcTelemetryLayer::new(&meter);
    let counts = Arc::clone(&layer.metrics.counts);
    let mut svc = layer.layer(Never);
    let req = http::Request::builder()
        .uri("/vmm.v1.VmService/BootVm")
        .body(())
        .expect("request");
    let boot = METHODS
        .iter()
        .position(|m| m.name == "BootVm")
        .expect("BootVm");
    let mut fut = Box::pin(svc.call(req));
    let waker = std::task::Waker::noop();
    assert!(
        fut.as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending()
    );
    assert_eq!(counts.active[boot].load(Ordering::Relaxed), 1);
    drop(fut);
    assert_eq!(
        counts.active[boot].load(Ordering::Relaxed),
        0,
        "the RPC is no longer counted as in progress"
    );
    let canceled = ErrorCode::Canceled.grpc_code() as usize;
    assert_eq!(counts.requests[boot][canceled].load(Ordering::Relaxed), 1);
    let total: u64 = counts.requests[boot]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum();
    assert_eq!(total, 1, "it ends once");
}
