//! Robustness of the wire layer: random bytes and random JSON objects sent
//! to every RPC as Connect JSON, Connect binary and gRPC-Web frames must be
//! answered (never a dropped connection, which is what a handler panic looks
//! like), never with a 5xx other than 503, and never as `internal`; the
//! server still answers `/health` afterwards. Bounded: 64 cases per RPC and
//! encoding, so the whole run takes seconds.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use vmcp::adapters::inbound::guard::ApiLimits;
use vmcp::app::security::Security;

use super::harness::Harness;

const RPCS: [&str; 9] = [
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

const CASES_PER_RPC: u32 = 64;

/// Field names of the vmm.v1 messages in both JSON spellings, so random
/// objects reach past the top level.
const KEYS: &[&str] = &[
    "vmId",
    "vm_id",
    "config",
    "force",
    "timeoutSeconds",
    "timeout_seconds",
    "stateFilter",
    "pageSize",
    "pageToken",
    "cpu",
    "vcpuCount",
    "maxVcpuCount",
    "topology",
    "sockets",
    "coresPerSocket",
    "threadsPerCore",
    "features",
    "memory",
    "sizeBytes",
    "hotplugEnabled",
    "maxSizeBytes",
    "backing",
    "boot",
    "kernelPath",
    "initrdPath",
    "kernelArgs",
    "bootOptions",
    "storage",
    "id",
    "path",
    "readOnly",
    "isRootDevice",
    "interfaceType",
    "options",
    "network",
    "macAddress",
    "tapDevice",
    "console",
    "enabled",
    "output",
    "input",
    "consoleType",
    "metadata",
];

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,24}".prop_map(Value::String),
        prop_oneof![
            Just("vm-1"),
            Just("../etc"),
            Just("/var/lib/vmcp/kernel.elf"),
            Just("VM_STATE_RUNNING"),
            Just("52:54:00:12:34:56"),
            Just("1073741824"),
            Just("-1"),
            Just("v1:zz"),
        ]
        .prop_map(|s| Value::String(s.to_owned())),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => "\\PC{0,12}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::btree_map(key(), json_value(), 0..8).prop_map(|m| {
        Value::Object(m.into_iter().collect())
            .to_string()
            .into_bytes()
    })
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..512)
}

/// A gRPC-Web request body: one frame with a random flag, a length that is
/// usually right, and random or JSON-shaped contents.
fn grpc_web_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![3 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![3 => Just(None), 1 => any::<u32>().prop_map(Some)],
        prop_oneof![bytes(), json_object()],
        proptest::bool::weighted(0.25),
    )
        .prop_map(|(flag, len, payload, trailing)| {
            let declared = len.unwrap_or(u32::try_from(payload.len()).unwrap_or(u32::MAX));
            let mut f = vec![flag];
            f.extend_from_slice(&declared.to_be_bytes());
            f.extend_from_slice(&payload);
            if trailing {
                f.extend_from_slice(&[0, 0, 0]);
            }
            f
        })
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    ConnectJson,
    ConnectProto,
    GrpcWeb,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Self::ConnectJson => "application/json",
            Self::ConnectProto => "application/proto",
            Self::GrpcWeb => "application/grpc-web+proto",
        }
    }

    fn payloads(self) -> BoxedStrategy<Vec<u8>> {
        match self {
            Self::ConnectJson => prop_oneof![3 => json_object(), 1 => bytes()].boxed(),
            Self::ConnectProto => bytes().boxed(),
            Self::GrpcWeb => grpc_web_frame().boxed(),
        }
    }
}

/// The gRPC status of a gRPC-Web response: the header, else the trailers frame.
fn grpc_web_status(headers: &http::HeaderMap, body: &[u8]) -> Option<String> {
    if let Some(v) = headers.get("grpc-status") {
        return v.to_str().ok().map(str::to_owned);
    }
    let mut rest = body;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let frame = rest.get(5..5 + len)?;
        if rest[0] & 0x80 != 0 {
            let text = String::from_utf8_lossy(frame);
            return text
                .lines()
                .find_map(|l| l.strip_prefix("grpc-status:"))
                .map(|v| v.trim().to_owned());
        }
        rest = &rest[5 + len..];
    }
    None
}

fn check(
    rpc: &str,
    enc: Encoding,
    status: http::StatusCode,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<(), TestCaseError> {
    let shown = String::from_utf8_lossy(body);
    prop_assert!(
        !status.is_server_error() || status == http::StatusCode::SERVICE_UNAVAILABLE,
        "{rpc} {enc:?}: HTTP {status}: {shown}"
    );
    match enc {
        Encoding::GrpcWeb => {
            let code = grpc_web_status(headers, body);
            prop_assert!(code.is_some(), "{rpc} {enc:?}: no grpc-status: {shown}");
            prop_assert_ne!(
                code.as_deref(),
                Some("13"),
                "{} {:?}: internal: {}",
                rpc,
                enc,
                shown
            );
        }
        Encoding::ConnectJson | Encoding::ConnectProto => {
            if !status.is_success() {
                let v: Value = serde_json::from_slice(body).map_err(|e| {
                    TestCaseError::fail(format!(
                        "{rpc} {enc:?}: error body is not JSON ({e}): {shown}"
                    ))
                })?;
                prop_assert!(v["code"].is_string(), "{rpc} {enc:?}: no code: {shown}");
                prop_assert_ne!(&v["code"], "internal", "{} {:?}: {}", rpc, enc, shown);
            }
        }
    }
    Ok(())
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    rpc: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<(http::StatusCode, http::HeaderMap, Bytes), String> {
    let req = http::Request::post(format!("http://{addr}/vmm.v1.VmService/{rpc}"))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("no answer (did the handler panic?): {e}"))?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_and_json_on_every_rpc_never_break_the_server() {
    let h = Arc::new(
        Harness::start_secured(Security {
            // The rate limit would answer instead of the code under test.
            api_limits: ApiLimits {
                max_concurrent_requests: 64,
                rate_limit_rps: 0,
            },
            ..Security::open()
        })
        .await,
    );
    let addr = h.addr;
    let rt = tokio::runtime::Handle::current();
    let started = std::time::Instant::now();
    let sent = tokio::task::spawn_blocking(move || {
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let sent = std::sync::atomic::AtomicU32::new(0);
        for rpc in RPCS {
            for enc in [
                Encoding::ConnectJson,
                Encoding::ConnectProto,
                Encoding::GrpcWeb,
            ] {
                let mut runner = TestRunner::new(Config {
                    cases: CASES_PER_RPC,
                    failure_persistence: None,
                    ..Config::default()
                });
                let result = runner.run(&enc.payloads(), |payload| {
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (status, headers, body) = rt
                        .block_on(post(&client, addr, rpc, enc.content_type(), payload))
                        .map_err(|e| TestCaseError::fail(format!("{rpc} {enc:?}: {e}")))?;
                    check(rpc, enc, status, &headers, &body)
                });
                if let Err(e) = result {
                    panic!("{rpc} over {enc:?}: {e}");
                }
            }
        }
        sent.into_inner()
    })
    .await
    .expect("the property run finished");
    assert!(sent >= 9 * 3 * CASES_PER_RPC, "{sent} requests sent");
    eprintln!(
        "robustness: {sent} random requests in {:?}",
        started.elapsed()
    );

    let (status, _, body) = h.raw("GET", "/health", &[], "").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let (status, _) = h.post_json("ListVms", "{}").await;
    assert_eq!(status, http::StatusCode::OK, "the API still works");
    match Arc::try_unwrap(h) {
        Ok(h) => h.stop().await,
        Err(_) => panic!("harness still shared"),
    }
}
