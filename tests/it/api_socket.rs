//! The host-local API socket (`UNKEY_VMCP_API_SOCKET`): the same API as the
//! TCP port, for clients on the host, behind the same authentication, with
//! mode 0600, replacing only a stale socket and removed at shutdown.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use vmcp::adapters::inbound::auth::{AuthPolicy, BearerToken};
use vmcp::adapters::inbound::server::bind_api_socket;
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::app::security::Security;

use super::harness::Harness;

fn json(v: serde_json::Value) -> Option<Bytes> {
    Some(Bytes::from(v.to_string()))
}

/// Creates the VM "local" over the socket at `path`.
async fn create_local(http: &UdsClient, path: &std::path::Path) {
    let created = http
        .call(
            path,
            Method::POST,
            "/vmm.v1.VmService/CreateVm",
            json(serde_json::json!({
                "vmId": "local",
                "config": {
                    "cpu": {"vcpuCount": 1},
                    "memory": {"sizeBytes": "268435456"},
                    "boot": {"kernelPath": "/var/lib/vmcp/vmlinux"}
                }
            })),
        )
        .await
        .expect("CreateVm over the socket");
    assert!(created.is_success(), "{created:?}");
}

#[tokio::test]
async fn the_api_is_served_on_a_private_unix_socket_and_the_socket_goes_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    // A stale socket from an earlier VMCP is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let mut security = Security::open();
    security.api_socket = Some(path.clone());
    let h = Harness::start_secured(security).await;
    let meta = std::fs::metadata(&path).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "only VMCP's user");

    let http = UdsClient::new(Duration::from_secs(5));
    create_local(&http, &path).await;
    let info = http
        .call(
            &path,
            Method::POST,
            "/vmm.v1.VmService/GetVmInfo",
            json(serde_json::json!({"vmId": "local"})),
        )
        .await
        .expect("GetVmInfo over the socket");
    assert!(info.is_success(), "{info:?}");
    let body: serde_json::Value = serde_json::from_slice(&info.body).expect("json");
    assert_eq!(body["vmId"], "local");
    assert_eq!(body["state"], "VM_STATE_CREATED");
    // The TCP port sees the same VM: one service, two ways in.
    let listed = h
        .client(super::harness::Wire::ConnectJson)
        .list_vms(vmcp::proto::vmm::v1::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    assert_eq!(listed.vms.len(), 1);
    h.stop().await;
    assert!(!path.exists(), "the socket is removed at shutdown");
}

#[tokio::test]
async fn the_api_socket_requires_the_token_like_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let mut security = Security::open();
    security.auth = AuthPolicy {
        token: Some(BearerToken::from_file(&token_file).expect("token")),
        require_client_cert: false,
    };
    security.api_socket = Some(path.clone());
    let h = Harness::start_secured(security).await;
    let http = UdsClient::new(Duration::from_secs(5));
    let denied = http
        .call(
            &path,
            Method::POST,
            "/vmm.v1.VmService/ListVms",
            json(serde_json::json!({})),
        )
        .await
        .expect("an answer");
    assert_eq!(denied.status.as_u16(), 401, "{denied:?}");
    let body: serde_json::Value = serde_json::from_slice(&denied.body).expect("json");
    assert_eq!(body["code"], "unauthenticated");
    // Health stays open, as on the port.
    let health = http
        .call(&path, Method::GET, "/health", None)
        .await
        .expect("health");
    assert!(health.is_success());
    h.stop().await;
}

#[tokio::test]
async fn something_else_at_the_socket_path_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = bind_api_socket(&path).expect_err("a regular file is not replaced");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

/// A start that fails after binding the socket drops it in async code:
/// its runtime goes without a panic (dropping a plain tokio runtime there
/// panics).
#[tokio::test]
async fn a_bound_socket_dropped_in_async_code_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = bind_api_socket(&dir.path().join("api.sock")).expect("bind");
    drop(socket);
    // The runtime stays usable after the drop.
    tokio::task::yield_now().await;
}

/// The socket is served on a thread of its own: a host-local client is
/// answered while the runtime serving the port and the VM owners is busy
/// (here: blocked outright).
#[tokio::test]
async fn the_api_socket_answers_while_the_main_runtime_is_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let mut security = Security::open();
    security.api_socket = Some(path.clone());
    let h = Harness::start_secured(security).await;
    let http = UdsClient::new(Duration::from_secs(5));
    create_local(&http, &path).await;

    let (answered_tx, answered) = std::sync::mpsc::channel();
    let socket = path.clone();
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answer = rt.block_on(async {
            UdsClient::new(Duration::from_secs(5))
                .call(
                    &socket,
                    Method::POST,
                    "/vmm.v1.VmService/GetVmInfo",
                    json(serde_json::json!({"vmId": "local"})),
                )
                .await
        });
        let _ = answered_tx.send(answer.map(|r| (r.status.as_u16(), r.body)));
    });
    // This test's runtime serves the port and runs the owners; it does nothing
    // until the answer arrives (or the wait gives up).
    let answer = answered.recv_timeout(Duration::from_secs(5));
    client.join().unwrap();
    let (status, body) = answer
        .expect("answered while the main runtime was blocked")
        .expect("GetVmInfo over the socket");
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["vmId"], "local");
    h.stop().await;
}
