//! Real-VMM tests through VMCP's ConnectRPC API: the full lifecycle with
//! the states the real VMM reports, kill -9 → Failed, 8 VMs at once, and 20
//! create/boot/delete cycles that leave nothing behind. They run wherever the
//! VMM binary, /dev/kvm and the test guest exist, and otherwise print one
//! SKIPPED line naming what is missing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::ErrorCode;
use tokio::sync::mpsc;
use vmcp::adapters::inbound::server::RpcLimits;
use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::wiring::{Running, StartOptions, start};
use vmcp::ports::{BackendEvent, Hypervisor, NoopTelemetry, SystemClock};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::harness::{Wire, client_for, eventually};
use super::real_env::{Real, Vmm, require};

const MARKER: &str = "VMCP-GUEST-OK";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Ch,
    Fc,
}

fn env(kind: Kind, test: &str) -> Option<Real> {
    require(
        if kind == Kind::Ch {
            Vmm::CloudHypervisor
        } else {
            Vmm::Firecracker
        },
        test,
    )
}

struct Server {
    running: Option<Running>,
    addr: std::net::SocketAddr,
    runtime: tempfile::TempDir,
}

async fn serve<H: Hypervisor>(
    h: H,
    rx: mpsc::UnboundedReceiver<BackendEvent>,
    runtime: tempfile::TempDir,
) -> Server {
    let running = start(
        Arc::new(h),
        rx,
        Arc::new(MemoryStore::new()),
        StartOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            limits: RpcLimits {
                max_request_bytes: 1 << 20,
                max_deadline: Duration::from_secs(120),
            },
            hypervisor_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            remove_orphans: true,
            telemetry: Arc::new(NoopTelemetry),
            telemetry_status: Arc::new(|| "disabled".to_owned()),
            wrap_rpc: Box::new(|s| s),
            clock: Arc::new(SystemClock),
            on_vm_counts: None,
            security: vmcp::app::security::Security::open(),
        },
    )
    .await
    .expect("server starts");
    Server {
        addr: running.local_addr,
        running: Some(running),
        runtime,
    }
}

async fn server(kind: Kind, env: &Real) -> Server {
    // Short runtime paths keep the API socket under the 108-byte sun_path limit.
    let runtime = tempfile::Builder::new()
        .prefix("vmcp-rt")
        .tempdir_in("/tmp")
        .unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    match kind {
        Kind::Ch => {
            serve(
                CloudHypervisor::new(&env.binary, runtime.path(), Duration::from_secs(5), tx),
                rx,
                runtime,
            )
            .await
        }
        Kind::Fc => {
            let settings = FirecrackerSettings::new(&env.binary, runtime.path());
            serve(Firecracker::new(settings, tx), rx, runtime).await
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test that failed half-way must not leave VMMs running: kill every VMM still found
        // in this test's runtime directory (the tempdir itself is removed by TempDir).
        if let Ok(found) = vmcp::adapters::outbound::vmm::discovery::scan(self.runtime.path()) {
            for p in found.into_iter().filter_map(|f| f.process) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &p.pid.to_string()])
                    .status();
            }
        }
    }
}

impl Server {
    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// The harness's small config, booting the test guest with its console in the runtime dir.
fn create(id: &str, guest: &Path) -> pb::CreateVmRequest {
    let mut req = super::harness::create_req(id);
    let config = req.config.get_or_insert_default();
    config.boot.get_or_insert_default().kernel_path = guest.display().to_string();
    config.console.get_or_insert_default().enabled = true;
    req
}

fn pid_of(info: &pb::GetVmInfoResponse) -> Option<&String> {
    info.backend_info
        .get("pid")
        .or_else(|| info.backend_info.get("vmm_pid"))
}

fn st(v: buffa::EnumValue<S>) -> S {
    v.as_known().expect("known state")
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn lifecycle(kind: Kind) {
    let name = format!("real_{kind:?}_lifecycle").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let id = "life".to_owned();
    let created = c
        .create_vm(create(&id, &env.kernel))
        .await
        .expect("create")
        .into_owned();
    assert_eq!(st(created.state), S::VM_STATE_CREATED);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    assert_eq!(st(info.state), S::VM_STATE_CREATED);
    let pid: u32 = pid_of(&info)
        .and_then(|p| p.parse().ok())
        .expect("pid in backend_info");
    assert!(pid_alive(pid));

    let boot = c
        .boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("boot")
        .into_owned();
    assert_eq!(st(boot.state), S::VM_STATE_RUNNING);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    let console = info
        .backend_info
        .get("console")
        .or_else(|| info.backend_info.get("serial_output"))
        .cloned()
        .expect("console path in backend_info");
    let marker = eventually(Duration::from_secs(5), || {
        let console = console.clone();
        async move {
            std::fs::read_to_string(&console)
                .unwrap_or_default()
                .contains(MARKER)
        }
    })
    .await;
    assert!(marker, "the guest printed its marker to {console}");

    let p = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("pause")
        .into_owned();
    assert_eq!(st(p.state), S::VM_STATE_PAUSED);
    let again = c
        .pause_vm(pb::PauseVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("pause again is a no-op")
        .into_owned();
    assert_eq!(st(again.state), S::VM_STATE_PAUSED);
    let r = c
        .resume_vm(pb::ResumeVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_owned();
    assert_eq!(st(r.state), S::VM_STATE_RUNNING);
    let rb = c
        .reboot_vm(pb::RebootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("reboot")
        .into_owned();
    assert_eq!(st(rb.state), S::VM_STATE_RUNNING);

    // The tiny guest ignores ACPI and has no i8042 driver: the graceful attempt times out and the
    // VM is stopped hard. Cloud Hypervisor then reports Created (bootable again); Firecracker's
    // process is gone, which VMCP reports as Shutdown.
    let sd = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: id.clone(),
            timeout_seconds: 1,
            ..Default::default()
        })
        .await
        .expect("graceful shutdown")
        .into_owned();
    let stopped = if kind == Kind::Ch {
        S::VM_STATE_CREATED
    } else {
        S::VM_STATE_SHUTDOWN
    };
    assert_eq!(st(sd.state), stopped);
    let b2 = c
        .boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("boot again")
        .into_owned();
    assert_eq!(st(b2.state), S::VM_STATE_RUNNING);
    let hard = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("forced shutdown")
        .into_owned();
    assert_eq!(st(hard.state), stopped);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    assert_eq!(
        st(info.state),
        stopped,
        "GetVmInfo agrees with the VMM after the stop"
    );

    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let gone = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("gone");
    assert_eq!(gone.code, ErrorCode::NotFound);
    assert!(!pid_alive(pid), "the VMM process ended");
    assert!(
        entries(s.runtime.path()).is_empty(),
        "runtime dir removed: {:?}",
        entries(s.runtime.path())
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_lifecycle_through_the_api() {
    lifecycle(Kind::Ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_lifecycle_through_the_api() {
    lifecycle(Kind::Fc).await;
}

async fn kill_nine(kind: Kind) {
    let name = format!("real_{kind:?}_kill_nine").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectJson);
    c.create_vm(create("victim", &env.kernel))
        .await
        .expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "victim".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "victim".into(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    let pid: i32 = pid_of(&info).and_then(|p| p.parse().ok()).expect("pid");
    // SAFETY-free: a plain kill(2) of the VMM this test started.
    let rc = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(rc.success());
    let failed = eventually(Duration::from_secs(1), || {
        let c = c.clone();
        async move {
            let list = c
                .list_vms(pb::ListVmsRequest::default())
                .await
                .expect("list")
                .into_owned();
            list.vms
                .iter()
                .any(|v| st(v.state) == S::VM_STATE_FAILED && !v.state_reason.is_empty())
        }
    })
    .await;
    assert!(failed, "Failed with a reason within a second of kill -9");
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    eprintln!("kill -9 reason: {}", list.vms[0].state_reason);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "victim".into(),
        ..Default::default()
    })
    .await
    .expect("delete a dead VM");
    assert!(entries(s.runtime.path()).is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_kill_nine_is_failed() {
    kill_nine(Kind::Ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_kill_nine_is_failed() {
    kill_nine(Kind::Fc).await;
}

async fn many_and_cycles(kind: Kind) {
    let name = format!("real_{kind:?}_concurrency_and_leaks").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    // 8 VMs driven concurrently.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = c.clone();
        let guest = env.kernel.clone();
        tasks.push(tokio::spawn(async move {
            let id = format!("many-{i}");
            c.create_vm(create(&id, &guest)).await.expect("create");
            let b = c
                .boot_vm(pb::BootVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await
                .expect("boot")
                .into_owned();
            assert_eq!(st(b.state), S::VM_STATE_RUNNING);
            let p = c
                .pause_vm(pb::PauseVmRequest {
                    vm_id: id.clone(),
                    ..Default::default()
                })
                .await
                .expect("pause")
                .into_owned();
            assert_eq!(st(p.state), S::VM_STATE_PAUSED);
            id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task"));
    }
    let list = c
        .list_vms(pb::ListVmsRequest {
            state_filter: vec![S::VM_STATE_PAUSED.into()],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    assert_eq!(list.total_count, 8);
    let mut tasks = Vec::new();
    for id in ids {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: id,
                force: true,
                ..Default::default()
            })
            .await
            .expect("delete");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }

    // 20 create/boot/delete cycles leave no process, socket, directory or fd behind.
    let fds_before = open_fds();
    let mut pids = Vec::new();
    for i in 0..20 {
        let id = format!("cycle-{i}");
        c.create_vm(create(&id, &env.kernel)).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("boot");
        let info = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("info")
            .into_owned();
        pids.push(
            pid_of(&info)
                .and_then(|p| p.parse::<u32>().ok())
                .expect("pid"),
        );
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id,
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    let leaked: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    assert!(leaked.is_empty(), "VMM processes left: {leaked:?}");
    assert!(
        entries(s.runtime.path()).is_empty(),
        "runtime entries left: {:?}",
        entries(s.runtime.path())
    );
    let fds_after = open_fds();
    // Pooled HTTP connections may come and go; a leak would grow with the 20 cycles.
    assert!(
        fds_after <= fds_before + 4,
        "fds grew from {fds_before} to {fds_after}"
    );
    eprintln!(
        "{name}: 8 concurrent VMs ok; 20 cycles, fds {fds_before} -> {fds_after}, no process or file left"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_concurrency_and_no_leaks() {
    many_and_cycles(Kind::Ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_concurrency_and_no_leaks() {
    many_and_cycles(Kind::Fc).await;
}
