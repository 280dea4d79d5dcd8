//! The VM API end to end over the test double: every RPC over every
//! protocol, each error code, deadlines, limits, JSON handling, health,
//! listing, crash detection, restart recovery and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::CallOptions;
use vmcp::ports::HypervisorError;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::harness::{ALL_WIRES, Harness, Wire, config, create_req, eventually};

fn state(v: buffa::EnumValue<S>) -> S {
    v.as_known().expect("known state")
}

#[tokio::test]
async fn every_rpc_over_every_protocol() {
    let h = Harness::start().await;
    for wire in ALL_WIRES {
        let c = h.client(wire);
        let id = format!("vm-{wire:?}").to_lowercase();
        let created = c
            .create_vm(create_req(&id))
            .await
            .expect("create")
            .into_owned();
        assert_eq!(created.vm_id, id, "{wire:?}");
        assert_eq!(state(created.state), S::VM_STATE_CREATED);

        let info = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("info")
            .into_owned();
        assert_eq!(state(info.state), S::VM_STATE_CREATED);
        let got = info.config.as_option().expect("config returned");
        assert_eq!(got.cpu.as_option().map(|c| c.vcpu_count), Some(1));
        assert_eq!(got.metadata.get("team").map(String::as_str), Some("a"));
        assert_eq!(
            info.backend_info.get("backend").map(String::as_str),
            Some("cloudhypervisor")
        );
        assert!(info.generation >= 1);
        // Metrics come from the owner's sampler, right after the create answered.
        let sampled = eventually(Duration::from_secs(2), || {
            let c = c.clone();
            let id = id.clone();
            async move {
                let info = c
                    .get_vm_info(pb::GetVmInfoRequest {
                        vm_id: id,
                        ..Default::default()
                    })
                    .await
                    .expect("info")
                    .into_owned();
                info.metrics.as_option().is_some() && info.metrics_sampled_timestamp_ms > 0
            }
        })
        .await;
        assert!(
            sampled,
            "metrics sampled from the VMM, with their sample time"
        );

        let boot = c
            .boot_vm(pb::BootVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("boot")
            .into_owned();
        assert!(boot.success);
        assert_eq!(state(boot.state), S::VM_STATE_RUNNING);
        let p = c
            .pause_vm(pb::PauseVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("pause")
            .into_owned();
        assert_eq!(state(p.state), S::VM_STATE_PAUSED);
        let r = c
            .resume_vm(pb::ResumeVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("resume")
            .into_owned();
        assert_eq!(state(r.state), S::VM_STATE_RUNNING);
        let rb = c
            .reboot_vm(pb::RebootVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("reboot")
            .into_owned();
        assert_eq!(state(rb.state), S::VM_STATE_RUNNING);
        let sd = c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id.clone(),
                timeout_seconds: 5,
                ..Default::default()
            })
            .await
            .expect("shutdown")
            .into_owned();
        assert_eq!(state(sd.state), S::VM_STATE_SHUTDOWN);
        let again = c
            .boot_vm(pb::BootVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("boot again")
            .into_owned();
        assert_eq!(state(again.state), S::VM_STATE_RUNNING);
        // A hard stop on Cloud Hypervisor leaves the VM Created (bootable again): reported as is.
        let hard = c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id.clone(),
                force: true,
                ..Default::default()
            })
            .await
            .expect("forced shutdown")
            .into_owned();
        assert_eq!(state(hard.state), S::VM_STATE_CREATED);

        let list = c
            .list_vms(pb::ListVmsRequest::default())
            .await
            .expect("list")
            .into_owned();
        assert!(
            list.vms
                .iter()
                .any(|v| v.vm_id == id && v.vcpu_count == 1 && v.metadata.contains_key("team"))
        );

        let del = c
            .delete_vm(pb::DeleteVmRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_owned();
        assert!(del.success);
        let gone = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("deleted VM is gone");
        assert_eq!(gone.code, ErrorCode::NotFound, "{wire:?}");
    }
    assert_eq!(h.double.vmm_count(), 0, "every VMM was deleted");
    h.stop().await;
}

#[tokio::test]
async fn create_is_idempotent_and_generates_ids() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    let a = c
        .create_vm(create_req("same"))
        .await
        .expect("first")
        .into_owned();
    let b = c
        .create_vm(create_req("same"))
        .await
        .expect("retry with same config")
        .into_owned();
    assert_eq!(a.vm_id, b.vm_id);
    assert_eq!(
        h.double.vmm_count(),
        1,
        "the retry did not start a second VMM"
    );

    let mut different = create_req("same");
    different
        .config
        .get_or_insert_default()
        .cpu
        .get_or_insert_default()
        .vcpu_count = 2;
    let err = c.create_vm(different).await.expect_err("different config");
    assert_eq!(err.code, ErrorCode::AlreadyExists);

    let g1 = c
        .create_vm(create_req(""))
        .await
        .expect("generated")
        .into_owned();
    let g2 = c
        .create_vm(create_req(""))
        .await
        .expect("generated")
        .into_owned();
    assert!(
        !g1.vm_id.is_empty() && g1.vm_id != g2.vm_id,
        "{} vs {}",
        g1.vm_id,
        g2.vm_id
    );
    assert!(vmcp::domain::VmId::parse(&g1.vm_id).is_ok());
    h.stop().await;
}

#[tokio::test]
async fn each_error_code() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);

    let nf = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("missing");
    assert_eq!(nf.code, ErrorCode::NotFound);

    let mut bad = create_req("bad");
    bad.config
        .get_or_insert_default()
        .cpu
        .get_or_insert_default()
        .vcpu_count = 0;
    let ia = c.create_vm(bad).await.expect_err("vcpu 0");
    assert_eq!(ia.code, ErrorCode::InvalidArgument);
    assert!(
        ia.message
            .as_deref()
            .unwrap_or("")
            .contains("config.cpu.vcpu_count"),
        "{ia:?}"
    );

    let ia = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "../etc".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad id");
    assert_eq!(ia.code, ErrorCode::InvalidArgument);
    assert!(ia.message.as_deref().unwrap_or("").contains("vm_id"));

    let mut unsupported = create_req("feat");
    unsupported
        .config
        .get_or_insert_default()
        .cpu
        .get_or_insert_default()
        .features
        .insert("x".into(), "y".into());
    let ia = c
        .create_vm(unsupported)
        .await
        .expect_err("backend cannot honour");
    assert_eq!(ia.code, ErrorCode::InvalidArgument);
    assert!(
        ia.message
            .as_deref()
            .unwrap_or("")
            .contains("config.cpu.features")
    );

    let ia = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "noconf".into(),
            ..Default::default()
        })
        .await
        .expect_err("no config");
    assert_eq!(ia.code, ErrorCode::InvalidArgument);

    c.create_vm(create_req("fp")).await.expect("create");
    let fp = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: "fp".into(),
            ..Default::default()
        })
        .await
        .expect_err("pause Created");
    assert_eq!(fp.code, ErrorCode::FailedPrecondition);
    assert!(
        fp.message.as_deref().unwrap_or("").contains("Created"),
        "{fp:?}"
    );

    let ia = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "fp".into(),
            timeout_seconds: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative timeout");
    assert_eq!(ia.code, ErrorCode::InvalidArgument);
    assert!(
        ia.message
            .as_deref()
            .unwrap_or("")
            .contains("timeout_seconds")
    );

    h.double.fail(
        "create",
        HypervisorError::resource_exhausted("no more VMM processes"),
    );
    let re = c
        .create_vm(create_req("full"))
        .await
        .expect_err("exhausted");
    assert_eq!(re.code, ErrorCode::ResourceExhausted);
    h.double.reset();

    h.double.delay("boot", Duration::from_secs(2));
    let de = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "fp".into(),
            ..Default::default()
        })
        .await
        .expect_err("hung VMM");
    assert_eq!(de.code, ErrorCode::DeadlineExceeded, "{de:?}");
    h.double.reset();
    // Nothing hoped for: the VMM has not booted yet, so VMCP reads Created...
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "fp".into(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    assert_eq!(state(info.state), S::VM_STATE_CREATED);
    // ...and when the late boot does take effect in the VMM, VMCP follows it.
    let late = eventually(Duration::from_secs(4), || {
        let c = c.clone();
        async move {
            let info = c
                .get_vm_info(pb::GetVmInfoRequest {
                    vm_id: "fp".into(),
                    ..Default::default()
                })
                .await
                .expect("info")
                .into_owned();
            state(info.state) == S::VM_STATE_RUNNING
        }
    })
    .await;
    assert!(
        late,
        "the boot that answered too late is seen once the VMM did it"
    );
    let ok = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "fp".into(),
            ..Default::default()
        })
        .await
        .expect("boot after timeout")
        .into_owned();
    assert_eq!(state(ok.state), S::VM_STATE_RUNNING);

    h.double.set_healthy(false);
    // The health answer is cached for a few seconds; wait until the manager sees the change.
    let c2 = h.client(Wire::Grpc);
    let seen = eventually(Duration::from_secs(8), || {
        let c2 = c2.clone();
        async move {
            matches!(c2.list_vms(pb::ListVmsRequest::default()).await, Err(e) if e.code == ErrorCode::Unavailable
                && e.message.as_deref().unwrap_or("").contains("cloudhypervisor")
                && e.message.as_deref().unwrap_or("").contains("binary not found"))
        }
    })
    .await;
    assert!(
        seen,
        "an unusable backend makes VM calls unavailable, naming the backend and what is missing"
    );
    h.stop().await;
}

#[tokio::test]
async fn connect_timeout_is_honoured_and_state_stays_consistent() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    c.create_vm(create_req("slow")).await.expect("create");
    h.double.delay("boot", Duration::from_millis(300));
    let err = c
        .boot_vm_with_options(
            pb::BootVmRequest {
                vm_id: "slow".into(),
                ..Default::default()
            },
            CallOptions::default().with_timeout(Duration::from_millis(50)),
        )
        .await
        .expect_err("client deadline");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    // The boot itself went on in the VM's owner task; the record follows the VMM.
    let running = eventually(Duration::from_secs(3), || {
        let c = c.clone();
        async move {
            c.get_vm_info(pb::GetVmInfoRequest {
                vm_id: "slow".into(),
                ..Default::default()
            })
            .await
            .map(|r| state(r.into_owned().state) == S::VM_STATE_RUNNING)
            .unwrap_or(false)
        }
    })
    .await;
    assert!(running);
    h.stop().await;
}

#[tokio::test]
async fn operations_on_one_vm_never_interleave() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("serial")).await.expect("create");
    c.create_vm(create_req("other")).await.expect("create");
    h.double.delay("pause", Duration::from_millis(30));
    h.double.delay("resume", Duration::from_millis(30));
    c.boot_vm(pb::BootVmRequest {
        vm_id: "serial".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "other".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let id = if i % 2 == 0 { "serial" } else { "other" };
        tasks.push(tokio::spawn(async move {
            if i % 4 < 2 {
                c.pause_vm(pb::PauseVmRequest {
                    vm_id: id.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            } else {
                c.resume_vm(pb::ResumeVmRequest {
                    vm_id: id.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            }
        }));
    }
    for t in tasks {
        // Each call either succeeds, is an idempotent repeat, or is refused for the state it found.
        if let Err(e) = t.await.expect("task") {
            assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
        }
    }
    assert_eq!(
        h.double.max_concurrency_per_vm.load(Ordering::SeqCst),
        1,
        "one VM's calls were serialized"
    );
    h.stop().await;
}

#[tokio::test]
async fn wire_level_json_handling() {
    let h = Harness::start().await;
    // snake_case and lowerCamelCase are both accepted; unknown fields are ignored.
    let (status, body) = h
        .post_json(
            "CreateVm",
            r#"{"vm_id":"snake","config":{"cpu":{"vcpu_count":1},"memory":{"size_bytes":"67108864"},"boot":{"kernel_path":"/k"}},"surprise":1}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["vmId"], "snake");
    assert_eq!(body["state"], "VM_STATE_CREATED");
    let (status, body) = h
        .post_json(
            "CreateVm",
            r#"{"vmId":"camel","config":{"cpu":{"vcpuCount":1},"memory":{"sizeBytes":"67108864"},"boot":{"kernelPath":"/k"}}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Zero values are omitted on the way out.
    let (status, body) = h.post_json("GetVmInfo", r#"{"vmId":"camel"}"#).await;
    assert_eq!(status, 200);
    assert!(body.get("stateReason").is_none(), "{body}");
    assert_eq!(body["config"]["cpu"]["vcpuCount"], 1);

    let (status, body) = h.post_json("CreateVm", r#"{"vmId": "x", "config": "#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument");

    let (status, body) = h.post_json("BootVm", r#"{"vmId": 5}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument");

    // Oversize bodies are refused before decoding.
    let big = format!(
        r#"{{"vmId":"big","config":{{"metadata":{{"k":"{}"}}}}}}"#,
        "x".repeat(super::harness::MAX_REQUEST_BYTES)
    );
    let (status, body) = h.post_json("CreateVm", &big).await;
    assert_eq!(body["code"], "resource_exhausted", "{status} {body}");

    // Connect GET works for the read-only RPCs.
    let msg = urlencode(r#"{"vmId":"camel"}"#);
    let (status, _, body) = h
        .raw(
            "GET",
            &format!("/vmm.v1.VmService/GetVmInfo?connect=v1&encoding=json&message={msg}"),
            &[],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"camel\""));
    let (status, _, _) = h
        .raw(
            "GET",
            &format!("/vmm.v1.VmService/BootVm?connect=v1&encoding=json&message={msg}"),
            &[],
            "",
        )
        .await;
    assert_ne!(status, 200, "mutating RPCs are not reachable by GET");
    h.stop().await;
}

/// A Connect unary answer, success or error, goes out with its length: not
/// chunked over HTTP/1.1, and over HTTP/2 with `content-length` (hyper sets it
/// only when the body's size is known, which also lets the one DATA frame end
/// the stream).
#[tokio::test]
async fn connect_answers_carry_their_length() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    let h = Harness::start().await;
    h.client(Wire::ConnectJson)
        .create_vm(create_req("sized"))
        .await
        .expect("create");
    let length = |headers: &http::HeaderMap| -> Option<usize> {
        headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
    };
    for (body, want) in [(r#"{"vmId":"sized"}"#, 200), (r#"{"vmId":"absent"}"#, 404)] {
        let (status, headers, text) = h
            .raw(
                "POST",
                "/vmm.v1.VmService/GetVmInfo",
                &[("content-type", "application/json")],
                body,
            )
            .await;
        assert_eq!(status, want, "{text}");
        assert!(
            headers.get(http::header::TRANSFER_ENCODING).is_none(),
            "HTTP/1.1 {want} answer sent chunked: {headers:?}"
        );
        assert_eq!(length(&headers), Some(text.len()), "{headers:?}");

        let (mut sender, conn) = h.h2().await;
        let resp = sender
            .send_request(
                http::Request::post(format!("http://{}/vmm.v1.VmService/GetVmInfo", h.addr))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
        let (parts, incoming) = resp.into_parts();
        let bytes = incoming.collect().await.unwrap().to_bytes();
        assert_eq!(
            length(&parts.headers),
            Some(bytes.len()),
            "{:?}",
            parts.headers
        );
        drop(sender);
        conn.abort();
    }
    h.stop().await;
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn health_endpoints() {
    let h = Harness::start().await;
    let (status, headers, body) = h.raw("GET", "/health", &[], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"status": "ok"})
    );
    assert_eq!(headers["cache-control"], "no-store");

    let (status, headers, body) = h.raw("GET", "/_/health", &[], "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "healthy");
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(v["backend"]["type"], "cloudhypervisor");
    assert_eq!(v["backend"]["status"], "healthy");
    assert!(v["system"]["cpu"]["cores"].as_u64().unwrap() >= 1);
    assert!(v["system"]["memory"]["total_bytes"].as_u64().unwrap() > 0);
    assert!(v["system"]["hostname"].is_string());
    assert!(v["checks"]["backend"]["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(v["vms"]["running"], 0);

    h.double.set_healthy(false);
    let unhealthy = eventually(Duration::from_secs(8), || async {
        let (status, _, body) = h.raw("GET", "/_/health", &[], "").await;
        status == 503 && body.contains("\"unhealthy\"") && body.contains("binary not found")
    })
    .await;
    assert!(unhealthy);
    let (status, _, _) = h.raw("POST", "/health", &[], "").await;
    assert_eq!(status, 405);
    h.stop().await;
}

#[tokio::test]
async fn list_pages_filters_and_rejects_bad_tokens() {
    let h = Harness::start().await;
    let c = h.client(Wire::GrpcWeb);
    for i in 0..5 {
        c.create_vm(create_req(&format!("list-{i}")))
            .await
            .expect("create");
    }
    c.boot_vm(pb::BootVmRequest {
        vm_id: "list-3".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_vms(pb::ListVmsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("page")
            .into_owned();
        assert_eq!(page.total_count, 5);
        assert!(page.vms.len() <= 2);
        seen.extend(page.vms.iter().map(|v| v.vm_id.clone()));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen,
        (0..5).map(|i| format!("list-{i}")).collect::<Vec<_>>(),
        "stable order, no repeats"
    );

    let running = c
        .list_vms(pb::ListVmsRequest {
            state_filter: vec![S::VM_STATE_RUNNING.into()],
            ..Default::default()
        })
        .await
        .expect("filtered")
        .into_owned();
    assert_eq!(running.total_count, 1);
    assert_eq!(running.vms[0].vm_id, "list-3");

    let bad = c
        .list_vms(pb::ListVmsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(bad.code, ErrorCode::InvalidArgument);
    assert!(bad.message.as_deref().unwrap_or("").contains("page_token"));
    let neg = c
        .list_vms(pb::ListVmsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .expect_err("negative");
    assert_eq!(neg.code, ErrorCode::InvalidArgument);
    h.stop().await;
}

#[tokio::test]
async fn a_killed_vmm_shows_failed_with_a_reason() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    c.create_vm(create_req("doomed")).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "doomed".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let killed = h.double.kill("doomed");
    assert_eq!(killed.len(), 1);
    let failed = eventually(Duration::from_secs(1), || {
        let c = c.clone();
        async move {
            let list = c
                .list_vms(pb::ListVmsRequest::default())
                .await
                .expect("list")
                .into_owned();
            list.vms.iter().any(|v| {
                v.vm_id == "doomed"
                    && state(v.state) == S::VM_STATE_FAILED
                    && v.state_reason.contains("SIGKILL")
            })
        }
    })
    .await;
    assert!(failed, "Failed with the reason within a second");
    // No dead end: BootVm starts it again from its stored config in a fresh VMM.
    let booted = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "doomed".into(),
            ..Default::default()
        })
        .await
        .expect("a Failed VM boots again")
        .into_owned();
    assert_eq!(state(booted.state), S::VM_STATE_RUNNING);
    let fresh = h.double.pid_of("doomed").expect("a new VMM runs");
    assert!(!killed.contains(&fresh), "a new pid, not the killed one");
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "doomed".into(),
        ..Default::default()
    })
    .await
    .expect("delete a dead VM");
    h.stop().await;
}

#[tokio::test]
async fn a_guest_poweroff_behind_our_back_is_noticed() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    c.create_vm(create_req("quiet")).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "quiet".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    h.double.guest_poweroff("quiet");
    let recorded = eventually(Duration::from_secs(1), || {
        let c = c.clone();
        async move {
            let info = c
                .get_vm_info(pb::GetVmInfoRequest {
                    vm_id: "quiet".into(),
                    ..Default::default()
                })
                .await
                .expect("info")
                .into_owned();
            let listed = c
                .list_vms(pb::ListVmsRequest::default())
                .await
                .expect("list")
                .into_owned()
                .vms
                .iter()
                .any(|v| v.vm_id == "quiet" && state(v.state) == S::VM_STATE_SHUTDOWN);
            state(info.state) == S::VM_STATE_SHUTDOWN && listed
        }
    })
    .await;
    assert!(recorded, "the record follows the VMM");
    h.stop().await;
}

#[tokio::test]
async fn restart_readopts_vms_and_reports_dead_ones() {
    let double = Arc::new(super::double::Double::new());
    let store = Arc::new(vmcp::adapters::outbound::store::memory::MemoryStore::new());
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    let c = h.client(Wire::ConnectProto);
    for id in ["keep", "lose"] {
        c.create_vm(create_req(id)).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("boot");
    }
    h.stop().await;
    assert_eq!(double.vmm_count(), 2, "VMCP's shutdown never stops VMs");
    double.kill("lose");

    let double = Arc::new(double.restarted());
    let h = Harness::start_with(Arc::clone(&double), store).await;
    let c = h.client(Wire::ConnectProto);
    let keep = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "keep".into(),
            ..Default::default()
        })
        .await
        .expect("adopted")
        .into_owned();
    assert_eq!(state(keep.state), S::VM_STATE_RUNNING);
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    let lose = list
        .vms
        .iter()
        .find(|v| v.vm_id == "lose")
        .expect("dead VM still listed");
    assert_eq!(state(lose.state), S::VM_STATE_FAILED);
    assert!(
        lose.state_reason.contains("while VMCP was down"),
        "{}",
        lose.state_reason
    );
    h.stop().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    c.create_vm(create_req("drain")).await.expect("create");
    h.double.delay("boot", Duration::from_millis(300));
    let c2 = c.clone();
    let inflight = tokio::spawn(async move {
        c2.boot_vm(pb::BootVmRequest {
            vm_id: "drain".into(),
            ..Default::default()
        })
        .await
    });
    // Wait until the boot reached the VMM, then stop the server.
    let started = eventually(Duration::from_secs(2), || async {
        h.double.calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(started);
    let addr = h.addr;
    h.stop().await;
    let resp = inflight
        .await
        .expect("task")
        .expect("the in-flight boot completed")
        .into_owned();
    assert_eq!(state(resp.state), S::VM_STATE_RUNNING);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
    let _ = config();
}

#[tokio::test]
async fn restart_completes_interrupted_work_and_removes_orphans() {
    use vmcp::domain::lifecycle::Desired;
    use vmcp::ports::VmStore;

    let double = Arc::new(super::double::Double::new());
    let store = Arc::new(vmcp::adapters::outbound::store::memory::MemoryStore::new());
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    let c = h.client(Wire::ConnectJson);
    for id in ["deleting", "stopped"] {
        c.create_vm(create_req(id)).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("boot");
    }
    c.shutdown_vm(pb::ShutdownVmRequest {
        vm_id: "stopped".into(),
        ..Default::default()
    })
    .await
    .expect("stop");
    h.stop().await;

    // What a crash leaves behind: a delete whose intent was recorded, a create that never
    // reached its VMM, a VMM that no record names, and a stopped VM whose VMM is gone.
    let mut records = store.load_all().await.expect("records");
    let deleting = records
        .iter_mut()
        .find(|r| r.snapshot.id.as_str() == "deleting")
        .expect("record");
    deleting.snapshot.desired = Desired::Deleted;
    store.put(deleting).await.expect("put");
    let mut half = records[0].clone();
    half.snapshot.id = vmcp::domain::VmId::parse("half-created").unwrap();
    half.snapshot.generation = 1;
    half.snapshot.desired = Desired::Created;
    half.snapshot.state = vmcp::domain::VmState::Created;
    half.process = None;
    store.put(&half).await.expect("put");
    double.plant_orphan("ghost");
    double.kill("stopped");

    let double = Arc::new(double.restarted());
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    let c = h.client(Wire::ConnectJson);
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    let ids: Vec<&str> = list.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["stopped"],
        "the interrupted delete finished, the half create and the orphan are gone"
    );
    assert_eq!(
        state(list.vms[0].state),
        S::VM_STATE_SHUTDOWN,
        "a stopped VM stays stopped"
    );
    assert_eq!(
        double.orphans_destroyed.load(Ordering::SeqCst),
        3,
        "the interrupted delete's VMM, the ghost VMM and the half-created dir were ended"
    );
    assert_eq!(
        double.vmm_count(),
        0,
        "no VMM runs: the stopped VM's guest powered off, the rest were ended"
    );
    let ids: Vec<String> = store
        .load_all()
        .await
        .expect("records")
        .iter()
        .map(|r| r.snapshot.id.to_string())
        .collect();
    assert_eq!(
        ids,
        vec!["stopped".to_owned()],
        "the store equals what the VMMs report"
    );
    let boot = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "stopped".into(),
            ..Default::default()
        })
        .await
        .expect("boot a recovered stopped VM")
        .into_owned();
    assert_eq!(state(boot.state), S::VM_STATE_RUNNING);
    h.stop().await;
}

#[tokio::test]
async fn orphans_can_be_reported_without_removing_them() {
    let double = Arc::new(super::double::Double::new());
    double.plant_orphan("stray");
    let store = Arc::new(vmcp::adapters::outbound::store::memory::MemoryStore::new());
    let h = Harness::start_reporting_orphans(Arc::clone(&double), store).await;
    assert_eq!(
        double.orphans_destroyed.load(Ordering::SeqCst),
        0,
        "UNKEY_VMCP_ORPHANS=report leaves it"
    );
    assert_eq!(double.vmm_count(), 1);
    let list = h
        .client(Wire::ConnectJson)
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    assert_eq!(list.total_count, 0, "an orphan is never adopted as a VM");
    h.stop().await;
}
