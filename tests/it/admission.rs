//! Admission and load limits through the real server: host paths outside
//! the allowed directories are `permission_denied` naming the field, VM
//! limits are `resource_exhausted` naming the variable (also under
//! concurrent creates), and the API's rate and concurrency limits answer in
//! the caller's protocol while health stays reachable.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use connectrpc::ErrorCode;
use vmcp::adapters::inbound::guard::ApiLimits;
use vmcp::app::admission::{CreatePolicy, VmLimits};
use vmcp::app::path_policy::PathPolicy;
use vmcp::app::security::Security;
use vmcp::proto::vmm::v1 as pb;

use super::harness::{Harness, Wire, create_req, eventually};

fn with_kernel(id: &str, kernel: &str) -> pb::CreateVmRequest {
    let mut r = create_req(id);
    r.config
        .get_or_insert_default()
        .boot
        .get_or_insert_default()
        .kernel_path = kernel.into();
    r
}

fn with_vcpus(id: &str, vcpus: i32) -> pb::CreateVmRequest {
    let mut r = create_req(id);
    r.config
        .get_or_insert_default()
        .cpu
        .get_or_insert_default()
        .vcpu_count = vcpus;
    r
}

fn message(e: &connectrpc::ConnectError) -> String {
    e.message.clone().unwrap_or_default()
}

#[tokio::test]
async fn host_paths_outside_the_asset_directories_are_denied() {
    let root = tempfile::tempdir().expect("tempdir");
    let assets = root.path().join("assets");
    std::fs::create_dir(&assets).expect("mkdir");
    std::fs::write(assets.join("vmlinux"), b"kernel").expect("write");
    std::fs::write(root.path().join("secret"), b"secret").expect("write");
    std::os::unix::fs::symlink(root.path().join("secret"), assets.join("link")).expect("symlink");
    let h = Harness::start_secured(Security {
        admission: CreatePolicy {
            paths: PathPolicy::new(std::slice::from_ref(&assets)).expect("policy"),
            limits: VmLimits::unlimited(),
        },
        ..Security::open()
    })
    .await;
    let c = h.client(Wire::ConnectJson);
    let a = assets.to_string_lossy();
    for (i, bad) in [
        "/etc/passwd".to_owned(),
        format!("{a}/../secret"),
        format!("{a}/link"),
        "/dev/null".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        let e = c
            .create_vm(with_kernel(&format!("bad{i}"), bad))
            .await
            .expect_err(bad);
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{bad}: {e:?}");
        assert!(
            message(&e).starts_with("config.boot.kernel_path"),
            "{bad}: {e:?}"
        );
    }
    let mut disk = with_kernel("disk", &format!("{a}/vmlinux"));
    disk.config
        .get_or_insert_default()
        .storage
        .push(pb::StorageDevice {
            id: "root".into(),
            path: format!("{a}/../secret"),
            ..Default::default()
        });
    let e = c.create_vm(disk).await.expect_err("disk escape");
    assert_eq!(e.code, ErrorCode::PermissionDenied);
    assert!(message(&e).starts_with("config.storage[0].path"), "{e:?}");
    assert_eq!(
        h.double.calls.load(Ordering::SeqCst),
        0,
        "refused before any VMM was started"
    );

    let ok = c
        .create_vm(with_kernel("good", &format!("{a}/vmlinux")))
        .await
        .expect("kernel inside the asset directory")
        .into_owned();
    assert_eq!(ok.vm_id, "good");
    h.stop().await;
}

fn limited(limits: VmLimits) -> Security {
    Security {
        admission: CreatePolicy {
            paths: PathPolicy::unrestricted(),
            limits,
        },
        ..Security::open()
    }
}

#[tokio::test]
async fn vm_limits_are_resource_exhausted_naming_the_limit() {
    let h = Harness::start_secured(limited(VmLimits {
        max_vms: 3,
        max_vcpus_per_vm: 2,
        max_memory_per_vm_mib: 1024,
        max_total_vcpus: 3,
        max_total_memory_mib: 1 << 20,
    }))
    .await;
    let c = h.client(Wire::ConnectProto);
    let e = c
        .create_vm(with_vcpus("big", 4))
        .await
        .expect_err("per-VM vCPUs");
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    assert!(message(&e).contains("UNKEY_VMCP_MAX_VCPUS_PER_VM"), "{e:?}");

    c.create_vm(with_vcpus("a", 1)).await.expect("a");
    c.create_vm(with_vcpus("b", 2)).await.expect("b");
    let e = c
        .create_vm(with_vcpus("c", 1))
        .await
        .expect_err("total vCPUs");
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    assert!(message(&e).contains("UNKEY_VMCP_MAX_TOTAL_VCPUS"), "{e:?}");
    // An idempotent retry of an existing VM is not a new admission.
    let again = c
        .create_vm(with_vcpus("b", 2))
        .await
        .expect("retry")
        .into_owned();
    assert_eq!(again.vm_id, "b");
    // Deleting frees the capacity.
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "a".into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    c.create_vm(with_vcpus("c", 1))
        .await
        .expect("c fits after delete");
    h.stop().await;

    let h = Harness::start_secured(limited(VmLimits {
        max_vms: 2,
        ..VmLimits::unlimited()
    }))
    .await;
    let c = h.client(Wire::Grpc);
    c.create_vm(create_req("x")).await.expect("x");
    c.create_vm(create_req("y")).await.expect("y");
    let e = c.create_vm(create_req("z")).await.expect_err("max VMs");
    assert_eq!(e.code, ErrorCode::ResourceExhausted);
    assert!(message(&e).contains("UNKEY_VMCP_MAX_VMS=2"), "{e:?}");
    h.stop().await;
}

#[tokio::test]
async fn concurrent_creates_never_overshoot_the_totals() {
    let h = Harness::start_secured(limited(VmLimits {
        max_total_vcpus: 3,
        ..VmLimits::unlimited()
    }))
    .await;
    // Slow VMM starts keep every create in flight at once.
    h.double.delay("create", Duration::from_millis(200));
    let c = Arc::new(h.client(Wire::ConnectJson));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.create_vm(with_vcpus(&format!("p{i}"), 1))
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("joined") {
            Ok(()) => ok += 1,
            Err(e) => assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}"),
        }
    }
    assert_eq!(ok, 3, "exactly the vCPU budget was admitted");
    assert_eq!(h.double.vmm_count(), 3);
    h.stop().await;
}

#[tokio::test]
async fn the_rate_limit_answers_resource_exhausted_and_spares_health() {
    let h = Harness::start_secured(Security {
        api_limits: ApiLimits {
            max_concurrent_requests: 64,
            rate_limit_rps: 5,
        },
        ..Security::open()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let (status, _) = h.post_json("ListVms", "{}").await;
        statuses.push(status);
    }
    let ok = statuses.iter().filter(|s| s.is_success()).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == http::StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(ok + limited, 20, "{statuses:?}");
    // A burst of 5, then 5 per second: a slow machine may refill a few, never most.
    assert!(ok >= 5 && limited >= 5, "{statuses:?}");
    assert!(statuses[..5].iter().all(|s| s.is_success()), "{statuses:?}");
    let (status, headers, body) = h
        .raw(
            "POST",
            "/vmm.v1.VmService/ListVms",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    assert_eq!(status, http::StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers["retry-after"], "1");
    let v: serde_json::Value = serde_json::from_str(&body).expect("Connect error JSON");
    assert_eq!(v["code"], "resource_exhausted");
    let (status, _, _) = h.raw("GET", "/health", &[], "").await;
    assert_eq!(status, http::StatusCode::OK, "health is not rate limited");
    h.stop().await;
}

#[tokio::test]
async fn excess_concurrency_is_shed_as_unavailable() {
    let h = Harness::start_secured(Security {
        api_limits: ApiLimits {
            max_concurrent_requests: 2,
            rate_limit_rps: 0,
        },
        ..Security::open()
    })
    .await;
    let c = Arc::new(h.client(Wire::GrpcWeb));
    for id in ["s1", "s2"] {
        c.create_vm(create_req(id)).await.expect("create");
    }
    let before = h.double.calls.load(Ordering::SeqCst);
    h.double.delay("boot", Duration::from_millis(400));
    let slow: Vec<_> = ["s1", "s2"]
        .into_iter()
        .map(|id| {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.boot_vm(pb::BootVmRequest {
                    vm_id: id.into(),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            h.double.calls.load(Ordering::SeqCst) >= before + 2
        })
        .await,
        "both boots reached the backend"
    );
    let e = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect_err("third request in flight");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    assert!(message(&e).contains("in flight"), "{e:?}");
    for t in slow {
        t.await.expect("joined").expect("boot");
    }
    c.list_vms(pb::ListVmsRequest::default())
        .await
        .expect("capacity is back");
    h.stop().await;
}
