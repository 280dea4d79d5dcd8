//! Authentication end to end: with a token and/or mutual TLS configured,
//! every RPC over Connect JSON, Connect binary, gRPC and gRPC-Web is refused
//! as `unauthenticated` without the right credential and reaches nothing
//! behind the API; with it, calls work; the health endpoints stay open.

use std::sync::atomic::Ordering;

use connectrpc::client::{ClientBody, ClientTransport};
use connectrpc::{ConnectError, ErrorCode};
use http_body_util::{BodyExt, Empty};
use vmcp::adapters::inbound::auth::{AuthPolicy, BearerToken};
use vmcp::adapters::inbound::tls::server_config;
use vmcp::app::security::Security;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

use super::harness::{ALL_WIRES, Harness, Wire, create_req};
use super::tls_client::{self, Pki};

const TOKEN: &str = "correct-horse-battery-staple-0123456789";

/// Calls every RPC once; the results by RPC name.
async fn every_rpc<T>(
    c: &VmServiceClient<T>,
    id: &str,
) -> Vec<(&'static str, Result<(), ConnectError>)>
where
    T: ClientTransport,
    <T::ResponseBody as hyper::body::Body>::Error: std::fmt::Display,
{
    let vm_id = || id.to_owned();
    vec![
        ("CreateVm", c.create_vm(create_req(id)).await.map(|_| ())),
        (
            "GetVmInfo",
            c.get_vm_info(pb::GetVmInfoRequest {
                vm_id: vm_id(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "BootVm",
            c.boot_vm(pb::BootVmRequest {
                vm_id: vm_id(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "PauseVm",
            c.pause_vm(pb::PauseVmRequest {
                vm_id: vm_id(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "ResumeVm",
            c.resume_vm(pb::ResumeVmRequest {
                vm_id: vm_id(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "RebootVm",
            c.reboot_vm(pb::RebootVmRequest {
                vm_id: vm_id(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "ShutdownVm",
            c.shutdown_vm(pb::ShutdownVmRequest {
                vm_id: vm_id(),
                force: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        (
            "ListVms",
            c.list_vms(pb::ListVmsRequest::default()).await.map(|_| ()),
        ),
        (
            "DeleteVm",
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: vm_id(),
                force: true,
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
    ]
}

fn assert_all_unauthenticated(
    results: &[(&'static str, Result<(), ConnectError>)],
    context: &str,
    secrets: &[&str],
) {
    assert_eq!(results.len(), 9);
    for (rpc, r) in results {
        let e = r
            .as_ref()
            .expect_err(&format!("{context}: {rpc} must be refused"));
        assert_eq!(
            e.code,
            ErrorCode::Unauthenticated,
            "{context}: {rpc}: {e:?}"
        );
        let shown = format!("{e:?} {e}");
        for s in secrets {
            assert!(
                !shown.contains(s),
                "{context}: {rpc} leaks a token: {shown}"
            );
        }
    }
}

fn assert_all_authenticated(results: &[(&'static str, Result<(), ConnectError>)], context: &str) {
    for (rpc, r) in results {
        if let Err(e) = r {
            assert_ne!(
                e.code,
                ErrorCode::Unauthenticated,
                "{context}: {rpc}: {e:?}"
            );
        }
    }
    // A full lifecycle on a fresh id: each of these succeeds when the caller got through.
    for rpc in [
        "CreateVm",
        "GetVmInfo",
        "BootVm",
        "PauseVm",
        "ResumeVm",
        "ListVms",
        "DeleteVm",
    ] {
        let r = &results.iter().find(|(n, _)| *n == rpc).expect("called").1;
        assert!(r.is_ok(), "{context}: {rpc}: {r:?}");
    }
}

fn token_security() -> Security {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write");
    Security {
        auth: AuthPolicy {
            token: Some(BearerToken::from_file(&path).expect("token")),
            require_client_cert: false,
        },
        ..Security::open()
    }
}

#[tokio::test]
async fn a_bearer_token_is_required_on_every_rpc_over_every_protocol() {
    let h = Harness::start_secured(token_security()).await;
    let wrong = "correct-horse-battery-staple-0123456788";
    for wire in ALL_WIRES {
        let ctx = format!("{wire:?}");
        let none = every_rpc(&h.client(wire), "vm-a").await;
        assert_all_unauthenticated(&none, &format!("{ctx} without token"), &[TOKEN]);
        let bad = every_rpc(&h.client_with_token(wire, wrong), "vm-a").await;
        assert_all_unauthenticated(&bad, &format!("{ctx} wrong token"), &[TOKEN, wrong]);
        let truncated = every_rpc(&h.client_with_token(wire, &TOKEN[..10]), "vm-a").await;
        assert_all_unauthenticated(&truncated, &format!("{ctx} token prefix"), &[TOKEN]);
    }
    assert_eq!(
        h.double.calls.load(Ordering::SeqCst),
        0,
        "nothing reached the backend"
    );
    assert_eq!(h.double.vmm_count(), 0);

    for wire in ALL_WIRES {
        let id = format!("vm-{wire:?}").to_lowercase();
        let ok = every_rpc(&h.client_with_token(wire, TOKEN), &id).await;
        assert_all_authenticated(&ok, &format!("{wire:?} right token"));
    }
    h.stop().await;
}

#[tokio::test]
async fn rejections_use_each_protocols_own_error_format() {
    let h = Harness::start_secured(token_security()).await;
    let path = "/vmm.v1.VmService/ListVms";
    let (status, headers, body) = h
        .raw("POST", path, &[("content-type", "application/json")], "{}")
        .await;
    assert_eq!(status, http::StatusCode::UNAUTHORIZED);
    assert_eq!(headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Connect error JSON");
    assert_eq!(v["code"], "unauthenticated");

    // Connect GET (idempotent methods) carries no content type: still the Connect form.
    let (status, _, body) = h
        .raw(
            "GET",
            &format!("{path}?encoding=json&message=%7B%7D"),
            &[],
            "",
        )
        .await;
    assert_eq!(status, http::StatusCode::UNAUTHORIZED, "{body}");

    let (status, headers, body) = h
        .raw(
            "POST",
            path,
            &[
                ("content-type", "application/grpc-web+proto"),
                ("authorization", "Bearer nope"),
            ],
            vec![0u8, 0, 0, 0, 0],
        )
        .await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["grpc-status"], "16");
    assert!(body.contains("grpc-status: 16"), "{body:?}");
    assert!(!body.contains("nope"), "{body:?}");
    h.stop().await;
}

#[tokio::test]
async fn health_stays_open_without_credentials() {
    let h = Harness::start_secured(token_security()).await;
    for path in ["/health", "/_/health"] {
        let (status, _, body) = h.raw("GET", path, &[], "").await;
        assert_eq!(status, http::StatusCode::OK, "{path}: {body}");
    }
    h.stop().await;
}

fn mtls_security(pki: &Pki, token: bool) -> Security {
    let tls = server_config(&pki.server_cert, &pki.server_key, Some(&pki.client_ca))
        .expect("server TLS config");
    let base = if token {
        token_security()
    } else {
        Security::open()
    };
    Security {
        auth: AuthPolicy {
            require_client_cert: true,
            ..base.auth
        },
        tls: Some(tls),
        ..base
    }
}

async fn tls_get(
    h: &Harness,
    pki: &Pki,
    path: &str,
) -> Result<http::StatusCode, tls_client::TransportError> {
    let transport = tls_client::transport(h.addr, pki, None, false);
    let body: ClientBody = Empty::new().map_err(|never| match never {}).boxed();
    let req = http::Request::get(format!("https://localhost:{}{path}", h.addr.port()))
        .body(body)
        .expect("request");
    transport.send(req).await.map(|r| r.status())
}

#[tokio::test]
async fn mutual_tls_refuses_missing_and_foreign_client_certificates() {
    let pki = Pki::new();
    let h = Harness::start_secured(mtls_security(&pki, false)).await;
    for wire in ALL_WIRES {
        let ctx = format!("{wire:?}");
        let anonymous = tls_client::client(h.addr, &pki, None, None, wire);
        let results = every_rpc(&anonymous, "vm-a").await;
        assert_all_unauthenticated(&results, &format!("{ctx} without client cert"), &[]);

        // A certificate from another CA never completes the handshake.
        let impostor = tls_client::client(h.addr, &pki, Some(&pki.impostor), None, wire);
        for (rpc, r) in every_rpc(&impostor, "vm-a").await {
            let e = r.expect_err(&format!("{ctx}: {rpc} with a foreign cert must fail"));
            assert_eq!(e.code, ErrorCode::Unavailable, "{ctx}: {rpc}: {e:?}");
        }
    }
    // Plaintext against the TLS port gets nowhere either.
    let plain = h
        .client(Wire::ConnectJson)
        .list_vms(pb::ListVmsRequest::default())
        .await;
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(h.double.calls.load(Ordering::SeqCst), 0);

    // Health over TLS needs no client certificate.
    assert_eq!(
        tls_get(&h, &pki, "/health").await.expect("health"),
        http::StatusCode::OK
    );

    for wire in ALL_WIRES {
        let id = format!("vm-{wire:?}").to_lowercase();
        let good = tls_client::client(h.addr, &pki, Some(&pki.client), None, wire);
        assert_all_authenticated(&every_rpc(&good, &id).await, &format!("{wire:?} good cert"));
    }
    h.stop().await;
}

#[tokio::test]
async fn token_and_client_certificate_together_need_both() {
    let pki = Pki::new();
    let h = Harness::start_secured(mtls_security(&pki, true)).await;
    for wire in ALL_WIRES {
        let ctx = format!("{wire:?}");
        let cert_only = tls_client::client(h.addr, &pki, Some(&pki.client), None, wire);
        assert_all_unauthenticated(
            &every_rpc(&cert_only, "vm-a").await,
            &format!("{ctx} cert without token"),
            &[TOKEN],
        );
        let token_only = tls_client::client(h.addr, &pki, None, Some(TOKEN), wire);
        assert_all_unauthenticated(
            &every_rpc(&token_only, "vm-a").await,
            &format!("{ctx} token without cert"),
            &[TOKEN],
        );
        let both = tls_client::client(h.addr, &pki, Some(&pki.client), Some(TOKEN), wire);
        let id = format!("vm-{wire:?}").to_lowercase();
        assert_all_authenticated(&every_rpc(&both, &id).await, &format!("{ctx} both"));
    }
    h.stop().await;
}
