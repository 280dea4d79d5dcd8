//! Robustness of the wire layer: random bytes and random JSON objects sent
//! to every RPC as Connect JSON, Connect binary and gRPC-Web frames must be
//! answered (never a dropped connection, which is what a handler panic looks
//! like), never with a 5xx other than 503, and never as `internal`; the
//! server still answers `/health` afterwards. Bounded: 64 cases per RPC and
//! encoding, so the whole run takes seconds. Then well-formed protobuf with
//! hostile values (huge and negative numbers, long strings, invalid UTF-8,
//! NUL bytes, unknown enum numbers, fields repeated thousands of times, ids
//! that are paths) to each of the nineteen RPCs, each answered with the one
//! code it deserves, naming the field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::Value;
use vmcp::adapters::inbound::guard::ApiLimits;
use vmcp::app::admission::{CreatePolicy, VmLimits};
use vmcp::app::path_policy::PathPolicy;
use vmcp::app::security::Security;
use vmcp::proto::vmm::v1 as pb;

use super::harness::{Harness, Wire, create_req};

const RPCS: [&str; 14] = [
    "CreateVm",
    "DeleteVm",
    "BootVm",
    "ShutdownVm",
    "PauseVm",
    "ResumeVm",
    "RebootVm",
    "GetVmInfo",
    "ListVms",
    "SnapshotVm",
    "ListSnapshots",
    "GetSnapshot",
    "DeleteSnapshot",
    "RestoreVm",
];

const CASES_PER_RPC: u32 = 64;

/// Field names of the vmm.v1 messages in both JSON spellings, so random
/// objects reach past the top level.
const KEYS: &[&str] = &[
    "vmId",
    "vm_id",
    "snapshotId",
    "snapshot_id",
    "networkOverrides",
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

/// A protobuf field, encoded by hand so that values no generated type
/// would produce (invalid UTF-8 in a string, unknown enum numbers) can be
/// sent in an otherwise well-formed message.
#[derive(Clone)]
enum Field {
    /// A varint (int32/int64/uint*/bool/enum); negative int32s are sign-extended, as protobuf does.
    Int(u32, i64),
    /// A length-delimited field: a string, bytes, or a map entry's raw bytes.
    Raw(u32, Vec<u8>),
    /// A nested message.
    Msg(u32, Vec<Field>),
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        match f {
            Field::Int(n, v) => {
                varint(u64::from(*n) << 3, &mut out);
                varint(*v as u64, &mut out);
            }
            Field::Raw(n, bytes) => {
                varint((u64::from(*n) << 3) | 2, &mut out);
                varint(bytes.len() as u64, &mut out);
                out.extend_from_slice(bytes);
            }
            Field::Msg(n, inner) => {
                let bytes = encode(inner);
                varint((u64::from(*n) << 3) | 2, &mut out);
                varint(bytes.len() as u64, &mut out);
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

fn s(n: u32, text: &str) -> Field {
    Field::Raw(n, text.as_bytes().to_vec())
}

/// A map<string, string> entry.
fn entry(n: u32, k: &[u8], v: &[u8]) -> Field {
    Field::Msg(
        n,
        vec![Field::Raw(1, k.to_vec()), Field::Raw(2, v.to_vec())],
    )
}

/// A valid config (CreateVmRequest.config field 2) with `extra` fields
/// appended: protobuf keeps the last of a scalar and adds to a repeated
/// field, so `extra` overrides or extends it.
fn config(kernel: &str, extra: Vec<Field>) -> Field {
    let mut fields = vec![
        Field::Msg(1, vec![Field::Int(1, 1)]),
        Field::Msg(2, vec![Field::Int(1, 64 << 20)]),
        Field::Msg(3, vec![s(1, kernel)]),
    ];
    fields.extend(extra);
    Field::Msg(2, fields)
}

/// What a hostile request must be answered with.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// invalid_argument whose message starts with this field name.
    Invalid(&'static str),
    /// invalid_argument from the protobuf decoder, which names no field
    /// (connectrpc decodes before VMCP sees the message).
    Undecodable,
    /// not_found naming the VM.
    NotFound,
    /// permission_denied whose message starts with this field name.
    Denied(&'static str),
    /// Another clear code whose message starts with the text given.
    Code(&'static str, &'static str),
    /// Accepted: the value is legal.
    Ok,
}

struct Case {
    rpc: &'static str,
    what: String,
    body: Vec<u8>,
    want: Want,
}

/// The VM the hostile values are aimed at (booted, with a console).
const TARGET: &str = "target";

/// A snapshot of the target, taken before the hostile requests.
const SNAPSHOT: &str = "warm";

/// Hostile values in well-formed messages, for every RPC: huge and
/// negative numbers, long strings, invalid UTF-8, NUL bytes, unknown enum
/// numbers, repeated fields thousands of times over, ids that are paths.
/// `kernel` is a kernel inside the allowed asset directory.
fn cases(kernel: &str) -> Vec<Case> {
    let mut v = Vec::new();
    let mut add = |rpc: &'static str, what: &str, fields: Vec<Field>, want: Want| {
        v.push(Case {
            rpc,
            what: what.to_owned(),
            body: encode(&fields),
            want,
        })
    };
    let long = "a".repeat(40_000);
    let bad_ids: [(&str, Vec<u8>, Want); 7] = [
        (
            "invalid UTF-8",
            vec![b'v', 0xff, 0xfe, b'm'],
            Want::Undecodable,
        ),
        ("a NUL byte", b"vm\0one".to_vec(), Want::Invalid("vm_id")),
        ("a path separator", b"a/b".to_vec(), Want::Invalid("vm_id")),
        (
            "a parent directory",
            b"../etc".to_vec(),
            Want::Invalid("vm_id"),
        ),
        (
            "an absolute path",
            b"/etc/passwd".to_vec(),
            Want::Invalid("vm_id"),
        ),
        ("only a dot", b".".to_vec(), Want::Invalid("vm_id")),
        (
            "40 000 characters",
            long.as_bytes().to_vec(),
            Want::Invalid("vm_id"),
        ),
    ];
    for rpc in [
        "CreateVm",
        "DeleteVm",
        "BootVm",
        "ShutdownVm",
        "PauseVm",
        "ResumeVm",
        "RebootVm",
        "GetVmInfo",
        "GetConsoleOutput",
        "StreamConsole",
        "WriteConsole",
        "ResizeVm",
    ] {
        for (what, id, want) in &bad_ids {
            let mut fields = vec![Field::Raw(1, id.clone())];
            if rpc == "CreateVm" {
                fields.push(config(kernel, vec![]));
            }
            add(rpc, &format!("vm_id with {what}"), fields, *want);
        }
        if rpc != "CreateVm" {
            add(rpc, "an unknown vm_id", vec![s(1, "ghost")], Want::NotFound);
        }
    }
    let t = || s(1, TARGET);
    let i32_min = i64::from(i32::MIN);
    let i32_max = i64::from(i32::MAX);
    add(
        "ShutdownVm",
        "timeout_seconds -1",
        vec![t(), Field::Int(3, -1)],
        Want::Invalid("timeout_seconds"),
    );
    add(
        "ShutdownVm",
        "timeout_seconds i32::MIN",
        vec![t(), Field::Int(3, i32_min)],
        Want::Invalid("timeout_seconds"),
    );
    add(
        "ListVms",
        "page_size -1",
        vec![Field::Int(2, -1)],
        Want::Invalid("page_size"),
    );
    add(
        "ListVms",
        "page_size i32::MAX",
        vec![Field::Int(2, i32_max)],
        Want::Ok,
    );
    add(
        "ListVms",
        "an unknown state_filter",
        vec![Field::Int(1, 99)],
        Want::Invalid("state_filter[0]"),
    );
    add(
        "ListVms",
        "a negative state_filter",
        vec![Field::Int(1, 2), Field::Int(1, -7)],
        Want::Invalid("state_filter[1]"),
    );
    add(
        "ListVms",
        "state_filter 8000 times",
        (0..8000).map(|_| Field::Int(1, 2)).collect(),
        Want::Ok,
    );
    add(
        "ListVms",
        "page_token with invalid UTF-8",
        vec![Field::Raw(3, vec![0xc3, 0x28])],
        Want::Undecodable,
    );
    add(
        "ListVms",
        "page_token with a NUL",
        vec![s(3, "v1:\0")],
        Want::Invalid("page_token"),
    );
    add(
        "ListVms",
        "a 40 000-byte page_token",
        vec![s(3, &long)],
        Want::Invalid("page_token"),
    );
    add(
        "WatchVms",
        "vm_ids with a path",
        vec![s(1, "a"), s(1, "../x")],
        Want::Invalid("vm_ids[1]"),
    );
    add(
        "WatchVms",
        "vm_ids with invalid UTF-8",
        vec![Field::Raw(1, vec![0xff])],
        Want::Undecodable,
    );
    add(
        "WatchVms",
        "vm_ids 5000 times",
        (0..5000).map(|i| s(1, &format!("vm{i}"))).collect(),
        Want::Ok,
    );
    add(
        "WatchVms",
        "an unknown state_filter",
        vec![Field::Int(2, 1_234_567)],
        Want::Invalid("state_filter[0]"),
    );
    add(
        "WatchVms",
        "since_revision u64::MAX",
        vec![Field::Int(3, -1)],
        Want::Code(
            "out_of_range",
            "since_revision 18446744073709551615 is newer",
        ),
    );
    add(
        "GetConsoleOutput",
        "offset u64::MAX",
        vec![t(), Field::Int(2, -1)],
        Want::Ok,
    );
    add(
        "GetConsoleOutput",
        "max_bytes u32::MAX",
        vec![t(), Field::Int(3, i64::from(u32::MAX))],
        Want::Ok,
    );
    add(
        "StreamConsole",
        "offset u64::MAX",
        vec![t(), Field::Int(2, -1)],
        Want::Ok,
    );
    add(
        "WriteConsole",
        "60 000 bytes of data",
        vec![t(), Field::Raw(2, vec![b'x'; 60_000])],
        Want::Invalid("data"),
    );
    add(
        "ResizeVm",
        "vcpu_count -1",
        vec![t(), Field::Int(2, -1), Field::Int(3, 64 << 20)],
        Want::Invalid("vcpu_count"),
    );
    add(
        "ResizeVm",
        "vcpu_count i32::MAX",
        vec![t(), Field::Int(2, i32_max), Field::Int(3, 64 << 20)],
        Want::Invalid("vcpu_count"),
    );
    add(
        "ResizeVm",
        "memory_bytes i64::MIN",
        vec![t(), Field::Int(2, 1), Field::Int(3, i64::MIN)],
        Want::Invalid("memory_bytes"),
    );
    add(
        "ResizeVm",
        "memory_bytes i64::MAX",
        vec![t(), Field::Int(2, 1), Field::Int(3, i64::MAX)],
        Want::Invalid("memory_bytes"),
    );
    // The snapshot RPCs: every id field hostile, unknown enums, overrides by the thousand.
    let bad_snapshot_ids: Vec<(&str, Vec<u8>, Want)> = bad_ids
        .iter()
        .map(|(what, id, want)| {
            let want = match want {
                Want::Invalid(_) => Want::Invalid("snapshot_id"),
                other => *other,
            };
            (*what, id.clone(), want)
        })
        .collect();
    for (what, id, want) in &bad_ids {
        add(
            "SnapshotVm",
            &format!("vm_id with {what}"),
            vec![Field::Raw(1, id.clone())],
            *want,
        );
        add(
            "RestoreVm",
            &format!("vm_id with {what}"),
            vec![Field::Raw(1, id.clone()), s(2, SNAPSHOT)],
            *want,
        );
        let want = match want {
            Want::Invalid(_) => Want::Invalid("source_vm_id"),
            other => *other,
        };
        add(
            "ListSnapshots",
            &format!("source_vm_id with {what}"),
            vec![Field::Raw(1, id.clone())],
            want,
        );
    }
    for (what, id, want) in &bad_snapshot_ids {
        add(
            "SnapshotVm",
            &format!("snapshot_id with {what}"),
            vec![t(), Field::Raw(2, id.clone())],
            *want,
        );
        add(
            "GetSnapshot",
            &format!("snapshot_id with {what}"),
            vec![Field::Raw(1, id.clone())],
            *want,
        );
        add(
            "DeleteSnapshot",
            &format!("snapshot_id with {what}"),
            vec![Field::Raw(1, id.clone())],
            *want,
        );
        add(
            "RestoreVm",
            &format!("snapshot_id with {what}"),
            vec![s(1, "fresh"), Field::Raw(2, id.clone())],
            *want,
        );
    }
    add(
        "SnapshotVm",
        "an unknown vm_id",
        vec![s(1, "ghost")],
        Want::NotFound,
    );
    add(
        "SnapshotVm",
        "an unknown kind",
        vec![t(), s(2, "k"), Field::Int(4, 99)],
        Want::Invalid("kind"),
    );
    add(
        "SnapshotVm",
        "a negative kind",
        vec![t(), s(2, "k"), Field::Int(4, -1)],
        Want::Invalid("kind"),
    );
    add(
        "SnapshotVm",
        "kind diff",
        vec![t(), s(2, "k"), Field::Int(4, 2)],
        Want::Code("unimplemented", ""),
    );
    add(
        "SnapshotVm",
        "an id already taken",
        vec![t(), s(2, SNAPSHOT)],
        Want::Code("already_exists", ""),
    );
    add(
        "ListSnapshots",
        "an unknown source_vm_id",
        vec![s(1, "ghost")],
        Want::Ok,
    );
    add(
        "GetSnapshot",
        "an unknown snapshot_id",
        vec![s(1, "ghost")],
        Want::NotFound,
    );
    add(
        "DeleteSnapshot",
        "an unknown snapshot_id",
        vec![s(1, "ghost")],
        Want::NotFound,
    );
    add(
        "RestoreVm",
        "an unknown snapshot_id",
        vec![s(1, "fresh"), s(2, "ghost")],
        Want::NotFound,
    );
    add(
        "RestoreVm",
        "an existing vm_id",
        vec![t(), s(2, SNAPSHOT)],
        Want::Code("already_exists", ""),
    );
    let nic = |iface: &str, tap: &str| Field::Msg(4, vec![s(1, iface), s(2, tap)]);
    add(
        "RestoreVm",
        "a network override without a tap",
        vec![s(1, "fresh"), s(2, SNAPSHOT), nic("eth0", "")],
        Want::Invalid("network_overrides[0]"),
    );
    add(
        "RestoreVm",
        "a network override of an interface the snapshot lacks",
        vec![s(1, "fresh"), s(2, SNAPSHOT), nic("eth9", "tap9")],
        Want::Invalid("network_overrides[0].interface_id"),
    );
    add(
        "RestoreVm",
        "network overrides 2000 times",
        (0..2000)
            .map(|i| nic(&format!("if{i}"), "tap"))
            .chain([s(1, "fresh"), s(2, SNAPSHOT)])
            .collect(),
        Want::Invalid("network_overrides[0].interface_id"),
    );
    add(
        "RestoreVm",
        "metadata with invalid UTF-8",
        vec![s(1, "fresh"), s(2, SNAPSHOT), entry(5, b"k", &[0xff, 0xfe])],
        Want::Undecodable,
    );
    // CreateVm: one hostile value in a config that is otherwise valid, each under its own id.
    let mut n = 0;
    let mut c = |extra: Vec<Field>| {
        n += 1;
        vec![s(1, &format!("hostile-{n}")), config(kernel, extra)]
    };
    let cpu = |f: Vec<Field>| Field::Msg(1, f);
    let memory = |f: Vec<Field>| Field::Msg(2, f);
    let boot = |f: Vec<Field>| Field::Msg(3, f);
    add(
        "CreateVm",
        "vcpu_count -1",
        c(vec![cpu(vec![Field::Int(1, -1)])]),
        Want::Invalid("config.cpu.vcpu_count"),
    );
    add(
        "CreateVm",
        "vcpu_count i32::MAX",
        c(vec![cpu(vec![Field::Int(1, i32_max)])]),
        Want::Invalid("config.cpu.vcpu_count"),
    );
    add(
        "CreateVm",
        "max_vcpu_count i32::MIN",
        c(vec![cpu(vec![Field::Int(2, i32_min)])]),
        Want::Invalid("config.cpu.max_vcpu_count"),
    );
    add(
        "CreateVm",
        "a topology of i32::MAX",
        c(vec![cpu(vec![Field::Msg(
            3,
            vec![
                Field::Int(1, i32_max),
                Field::Int(2, i32_max),
                Field::Int(3, i32_max),
            ],
        )])]),
        Want::Invalid("config.cpu.topology.sockets"),
    );
    add(
        "CreateVm",
        "cpu features with a NUL",
        c(vec![cpu(vec![entry(4, b"amx\0", b"on")])]),
        Want::Invalid("config.cpu.features"),
    );
    add(
        "CreateVm",
        "size_bytes i64::MIN",
        c(vec![memory(vec![Field::Int(1, i64::MIN)])]),
        Want::Invalid("config.memory.size_bytes"),
    );
    add(
        "CreateVm",
        "size_bytes i64::MAX",
        c(vec![memory(vec![Field::Int(1, i64::MAX)])]),
        Want::Invalid("config.memory.size_bytes"),
    );
    add(
        "CreateVm",
        "max_size_bytes -1 with hot-plug",
        c(vec![memory(vec![Field::Int(2, 1), Field::Int(3, -1)])]),
        Want::Invalid("config.memory.max_size_bytes"),
    );
    add(
        "CreateVm",
        "kernel_path with invalid UTF-8",
        c(vec![boot(vec![Field::Raw(1, vec![b'/', 0xff])])]),
        Want::Undecodable,
    );
    add(
        "CreateVm",
        "kernel_path with a NUL",
        c(vec![boot(vec![s(1, &format!("{kernel}\0"))])]),
        Want::Invalid("config.boot.kernel_path"),
    );
    add(
        "CreateVm",
        "a relative kernel_path",
        c(vec![boot(vec![s(1, "../../etc/shadow")])]),
        Want::Invalid("config.boot.kernel_path"),
    );
    add(
        "CreateVm",
        "a kernel_path out of the assets through ..",
        c(vec![boot(vec![s(
            1,
            &format!("{kernel}/../../../etc/passwd"),
        )])]),
        Want::Denied("config.boot.kernel_path"),
    );
    add(
        "CreateVm",
        "a 40 000-byte kernel_path",
        c(vec![boot(vec![s(1, &format!("/{long}"))])]),
        Want::Invalid("config.boot.kernel_path"),
    );
    add(
        "CreateVm",
        "kernel_args with a NUL",
        c(vec![boot(vec![s(3, "console=ttyS0\0x")])]),
        Want::Invalid("config.boot.kernel_args"),
    );
    add(
        "CreateVm",
        "a storage id with a path",
        c(vec![Field::Msg(4, vec![s(1, "a/b"), s(2, kernel)])]),
        Want::Invalid("config.storage[0].id"),
    );
    add(
        "CreateVm",
        "a storage path with a NUL",
        c(vec![Field::Msg(
            4,
            vec![s(1, "d"), s(2, &format!("{kernel}\0"))],
        )]),
        Want::Invalid("config.storage[0].path"),
    );
    add(
        "CreateVm",
        "3000 storage devices",
        c((0..3000)
            .map(|i| Field::Msg(4, vec![s(1, &format!("d{i}")), s(2, "/d")]))
            .collect()),
        Want::Invalid("config.storage"),
    );
    add(
        "CreateVm",
        "a mac address of NULs",
        c(vec![Field::Msg(
            5,
            vec![s(1, "n"), Field::Raw(2, vec![0; 17])],
        )]),
        Want::Invalid("config.network[0].mac_address"),
    );
    add(
        "CreateVm",
        "a network id with invalid UTF-8",
        c(vec![Field::Msg(5, vec![Field::Raw(1, vec![0xfe])])]),
        Want::Undecodable,
    );
    add(
        "CreateVm",
        "console output out of the assets through ..",
        c(vec![Field::Msg(
            6,
            vec![
                Field::Int(1, 1),
                s(2, &format!("{kernel}/../../../etc/passwd")),
            ],
        )]),
        Want::Denied("config.console.output"),
    );
    add(
        "CreateVm",
        "metadata with invalid UTF-8",
        c(vec![entry(7, &[0xff], b"v")]),
        Want::Undecodable,
    );
    add(
        "CreateVm",
        "2000 metadata entries",
        c((0..2000)
            .map(|i| entry(7, format!("k{i}").as_bytes(), b"v"))
            .collect()),
        Want::Invalid("config.metadata"),
    );
    add(
        "CreateVm",
        "a 40 000-byte metadata value",
        c(vec![entry(7, b"k", long.as_bytes())]),
        Want::Invalid("config.metadata[k]"),
    );
    add(
        "CreateVm",
        "an unknown restart_policy",
        c(vec![Field::Int(8, 99)]),
        Want::Invalid("config.restart_policy"),
    );
    add(
        "CreateVm",
        "a negative restart_policy",
        c(vec![Field::Int(8, -1)]),
        Want::Invalid("config.restart_policy"),
    );
    // Opaque to VMCP: kept byte for byte (the test reads it back).
    add(
        "CreateVm",
        "metadata with NUL bytes",
        vec![s(1, OPAQUE), config(kernel, vec![entry(7, b"k\0", b"\0v")])],
        Want::Ok,
    );
    v
}

/// The VM whose metadata holds NUL bytes.
const OPAQUE: &str = "opaque-metadata";

/// What the server answered: a code ("ok" for a success or an opened
/// stream) and the error's message.
async fn send(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    rpc: &str,
    body: Vec<u8>,
) -> Result<(String, String), String> {
    let streaming = matches!(rpc, "WatchVms" | "StreamConsole");
    let (ct, payload) = if streaming {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&body);
        ("application/connect+proto", framed)
    } else {
        ("application/proto", body)
    };
    let req = http::Request::post(format!("http://{addr}/vmm.v1.VmService/{rpc}"))
        .header("content-type", ct)
        .body(Full::new(Bytes::from(payload)))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("no answer (did the handler panic?): {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !streaming {
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        if status.is_success() {
            return Ok(("ok".into(), String::new()));
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "HTTP {status}, error body is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })?;
        return Ok((
            v["code"].as_str().unwrap_or("?").to_owned(),
            v["message"].as_str().unwrap_or("").to_owned(),
        ));
    }
    // A stream: the first frame is data (it opened) or the end with an error.
    let mut buf = Vec::new();
    loop {
        let frame = match tokio::time::timeout(Duration::from_secs(1), body.frame()).await {
            Err(_) => return Ok(("ok".into(), "open, nothing to send yet".into())),
            Ok(None) => {
                return Err(format!(
                    "HTTP {status}: the stream ended without an end frame: {buf:?}"
                ));
            }
            Ok(Some(f)) => f.map_err(|e| e.to_string())?,
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        if buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() >= 5 + len {
                if buf[0] & 0x02 == 0 {
                    return Ok(("ok".into(), "a message arrived".into()));
                }
                let v: Value =
                    serde_json::from_slice(&buf[5..5 + len]).map_err(|e| e.to_string())?;
                let e = &v["error"];
                return Ok((
                    e["code"].as_str().unwrap_or("?").to_owned(),
                    e["message"].as_str().unwrap_or("").to_owned(),
                ));
            }
        }
    }
}

/// Whether `got` is what `want` asks for.
fn verdict(want: Want, got: Result<(String, String), String>) -> Result<(), String> {
    let (code, message) = got?;
    let field_first = |field: &str| message.starts_with(&format!("{field}: "));
    let ok = code != "internal"
        && match want {
            Want::Invalid(field) => code == "invalid_argument" && field_first(field),
            Want::Undecodable => {
                code == "invalid_argument" && message.contains("invalid UTF-8 in string field")
            }
            Want::NotFound => code == "not_found" && message.contains("\"ghost\""),
            Want::Denied(field) => code == "permission_denied" && field_first(field),
            Want::Code(c, text) => code == c && message.starts_with(text),
            Want::Ok => code == "ok",
        };
    if ok {
        Ok(())
    } else {
        Err(format!("{code}: {message}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_in_well_formed_protobuf_get_a_clear_code_on_every_rpc() {
    let assets = tempfile::tempdir().unwrap();
    let kernel = assets.path().canonicalize().unwrap().join("kernel.elf");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let h = Harness::start_secured(Security {
        api_limits: ApiLimits {
            max_concurrent_requests: 64,
            rate_limit_rps: 0,
        },
        admission: CreatePolicy {
            paths: PathPolicy::new(&[assets.path().to_owned()]).unwrap(),
            limits: VmLimits::unlimited(),
        },
        ..Security::open()
    })
    .await;
    let kernel = kernel.to_str().unwrap().to_owned();
    let c = h.client(Wire::ConnectProto);
    let mut target = create_req(TARGET);
    let config = target.config.get_or_insert_default();
    config.boot.get_or_insert_default().kernel_path = kernel.clone();
    config.console.get_or_insert_default().enabled = true;
    c.create_vm(target).await.expect("create the target");
    c.boot_vm(pb::BootVmRequest {
        vm_id: TARGET.into(),
        ..Default::default()
    })
    .await
    .expect("boot the target");
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: TARGET.into(),
        snapshot_id: SNAPSHOT.into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("snapshot the target");

    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut rpcs = std::collections::BTreeSet::new();
    let mut wrong = Vec::new();
    let cases = cases(&kernel);
    for case in &cases {
        rpcs.insert(case.rpc);
        let got = send(&client, h.addr, case.rpc, case.body.clone()).await;
        if let Err(e) = verdict(case.want, got) {
            wrong.push(format!(
                "{} with {}: wanted {:?}, got {e}",
                case.rpc, case.what, case.want
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} hostile requests:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    assert_eq!(rpcs.len(), 19, "every RPC of vmm.v1.VmService: {rpcs:?}");

    // The NUL bytes VMCP accepted in metadata come back as they were sent.
    let info = h.info(OPAQUE).await;
    assert_eq!(
        info.config.metadata.get("k\0").map(String::as_str),
        Some("\0v")
    );
    // Still serving, and the hostile requests changed nothing they were refused for.
    let (status, _, body) = h.raw("GET", "/health", &[], "").await;
    assert_eq!(status, http::StatusCode::OK, "{body}");
    let listed = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    let ids: Vec<&str> = listed.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(ids, [OPAQUE, TARGET]);
    assert_eq!(
        h.info(TARGET).await.state.as_known(),
        Some(pb::VmState::VM_STATE_RUNNING)
    );
    let snapshots = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list snapshots")
        .into_owned();
    let ids: Vec<&str> = snapshots
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.as_str())
        .collect();
    assert_eq!(ids, [SNAPSHOT], "no hostile request made or removed one");
    h.stop().await;
}
