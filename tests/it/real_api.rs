//! Real-VMM tests through VMCP's ConnectRPC API: the full lifecycle with
//! the states the real VMM reports, kill -9 → Failed, 8 VMs at once, and 20
//! create/boot/delete cycles that leave nothing behind. They run wherever the
//! VMM binary, /dev/kvm and the test guest exist, and otherwise print one
//! SKIPPED line naming what is missing.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use connectrpc::ErrorCode;
use vmcp::adapters::inbound::server::RpcLimits;
use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::wiring::{Running, StartOptions, start};
use vmcp::ports::{Hypervisor, NoopTelemetry, SystemClock};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::harness::{Wire, client_for, eventually};
use super::real_env::{Real, Vmm, require, say};
use super::watch;

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
    runtime: Arc<tempfile::TempDir>,
    store: Arc<MemoryStore>,
    /// Set by a restart: this server's VMMs belong to the next one.
    handed_over: bool,
}

async fn serve<H: Hypervisor>(
    h: H,
    runtime: Arc<tempfile::TempDir>,
    store: Arc<MemoryStore>,
) -> Server {
    let running = start(
        Arc::new(h),
        Arc::clone(&store),
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
            security: vmcp::app::security::Security {
                snapshots: Some(super::harness::snapshot_settings(&snapshot_dir(
                    runtime.path(),
                ))),
                ..vmcp::app::security::Security::open()
            },
        },
    )
    .await
    .expect("server starts");
    Server {
        addr: running.local_addr,
        running: Some(running),
        runtime,
        store,
        handed_over: false,
    }
}

async fn server(kind: Kind, env: &Real) -> Server {
    // Short runtime paths keep the API socket under the 108-byte sun_path limit.
    let runtime = tempfile::Builder::new()
        .prefix("vmcp-rt")
        .tempdir_in("/tmp")
        .unwrap();
    server_on(kind, env, Arc::new(runtime), Arc::new(MemoryStore::new())).await
}

/// A server over an existing runtime directory and store: a VMCP restart.
async fn server_on(
    kind: Kind,
    env: &Real,
    runtime: Arc<tempfile::TempDir>,
    store: Arc<MemoryStore>,
) -> Server {
    match kind {
        Kind::Ch => {
            serve(
                CloudHypervisor::new(&env.binary, runtime.path(), Duration::from_secs(5)),
                runtime,
                store,
            )
            .await
        }
        Kind::Fc => {
            let settings = FirecrackerSettings::new(&env.binary, runtime.path());
            serve(Firecracker::new(settings), runtime, store).await
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        // A test that failed half-way must not leave VMMs running: kill every VMM still found
        // in this test's runtime directory (the tempdir itself is removed by TempDir).
        let _ = kill_vmms_in(self.runtime.path());
        let _ = std::fs::remove_dir_all(snapshot_dir(self.runtime.path()));
    }
}

/// Where the server over `runtime` keeps snapshots: beside it, not in it (every
/// directory in the runtime root is a VM's, and one of no VM is removed).
fn snapshot_dir(runtime: &Path) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{}-snapshots", runtime.display()))
}

/// Kills (-9) every VMM the discovery scan finds under `runtime`.
fn kill_vmms_in(runtime: &Path) -> std::io::Result<()> {
    for p in vmcp::adapters::outbound::vmm::discovery::scan(runtime)?
        .into_iter()
        .filter_map(|f| f.process)
    {
        let _ = std::process::Command::new("kill")
            .args(["-9", &p.pid.to_string()])
            .status();
    }
    Ok(())
}

impl Server {
    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Stops this VMCP (its VMs keep running) and starts another over the same
    /// runtime directory and store, as a restart of the service does.
    async fn restart(mut self, kind: Kind, env: &Real) -> Server {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let runtime = Arc::clone(&self.runtime);
        let store = Arc::clone(&self.store);
        // Dropping `self` must not kill the VMMs this restart is about.
        self.handed_over = true;
        drop(self);
        server_on(kind, env, runtime, store).await
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

/// The VMM pid GetVmInfo shows, if the VM has a VMM.
fn pid_of(info: &pb::GetVmInfoResponse) -> Option<&String> {
    info.backend_info.get("vmm_pid")
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

/// Every VMM pid a VM has had, in order, as GetVmInfo showed them.
#[derive(Debug, Default)]
struct Pids(Vec<u32>);

impl Pids {
    /// Records the VMM `info` shows (if any, and if new); returns it.
    fn saw(&mut self, info: &pb::GetVmInfoResponse) -> Option<u32> {
        let pid = pid_of(info).map(|p| p.parse().expect("vmm_pid is a pid"))?;
        if self.0.last() != Some(&pid) {
            self.0.push(pid);
        }
        Some(pid)
    }

    /// Asserts that none of them runs (after a delete, which returns once its VMM is gone).
    fn assert_all_gone(&self, what: &str) {
        assert!(!self.0.is_empty(), "{what}: no pid was seen");
        let left: Vec<u32> = self.0.iter().copied().filter(|p| pid_alive(*p)).collect();
        assert!(
            left.is_empty(),
            "{what}: VMMs {left:?} of {:?} still run",
            self.0
        );
    }
}

/// This process's open descriptors that point into `dir` (files VMCP opened for a VM: logs,
/// consoles, the event-monitor file). Other tests run in this process at the same time, so
/// a plain descriptor count would measure them too.
fn fds_under(dir: &Path) -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.starts_with(dir))
                .map(|target| target.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The names in `dir`, without the mark each VMCP start leaves in its runtime root.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != vmcp::adapters::outbound::vmm::backend::STARTED_MARK)
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
    let mut pids = Pids::default();
    let pid = pids.saw(&info).expect("vmm_pid in backend_info");
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
    assert_eq!(pids.saw(&info), Some(pid), "boot keeps the created VMM");
    // Backend details other than the VMM's identity come from the owner's
    // sampler, whose first sample follows the create's answer; on a loaded
    // host this read can come before it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut info = info;
    let console = loop {
        if let Some(console) = info.backend_info.get("serial_output") {
            break console.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "console path in backend_info within 5 s: {:?}",
            info.backend_info
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = info_of(&c, &id).await;
    };
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
    // Cloud Hypervisor reboots in place; Firecracker's reboot is a new VMM.
    let rebooted = pids.saw(&info_of(&c, &id).await).expect("a VMM");
    assert_eq!(rebooted == pid, kind == Kind::Ch, "{pids:?}");

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
    pids.saw(&info_of(&c, &id).await).expect("a VMM");
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
    // Cloud Hypervisor kept one VMM throughout; Firecracker had one per boot.
    assert_eq!(
        pids.0.len(),
        if kind == Kind::Ch { 1 } else { 3 },
        "{pids:?}"
    );
    pids.assert_all_gone(&name);
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
    let pid = vmm_pid(&info);
    // A watcher from the list's revision hears of the death.
    let revision = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned()
        .revision;
    let mut w = watch::watch(s.addr, Wire::Grpc, watch::since(revision));
    let synced = watch::next_ok(&mut w).await;
    assert_eq!(
        (watch::kind(&synced), synced.revision),
        (pb::WatchEventType::WATCH_EVENT_TYPE_SYNCED, revision)
    );
    let killed = std::time::Instant::now();
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
    let change = watch::next_ok(&mut w).await;
    assert_eq!(
        (watch::kind(&change), watch::vm_of(&change)),
        (
            pb::WatchEventType::WATCH_EVENT_TYPE_CHANGED,
            ("victim", S::VM_STATE_FAILED)
        )
    );
    assert_eq!(change.revision, revision + 1);
    let reason = &change.vm.as_option().expect("vm").state_reason;
    assert!(
        reason.contains("SIGKILL"),
        "the watcher gets the reason: {reason}"
    );
    say(&format!(
        "{name}: kill -9 reached a watcher as FAILED in {:?} ({reason})",
        killed.elapsed()
    ));
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
    assert!(!pid_alive(pid), "the killed VMM is gone");
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
            let pid = vmm_pid(&info_of(&c, &id).await);
            (id, pid)
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
    for (id, pid) in ids {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: id.clone(),
                force: true,
                ..Default::default()
            })
            .await
            .expect("delete");
            assert!(
                !pid_alive(pid),
                "{id}: its VMM {pid} is gone after the delete"
            );
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }

    // 20 create/boot/delete cycles leave no process, socket, directory or fd behind.
    let fds_before = fds_under(s.runtime.path()).len();
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
        pids.push(vmm_pid(&info));
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
    let left = fds_under(s.runtime.path());
    let fds_after = left.len();
    assert!(
        left.is_empty(),
        "descriptors still open into the runtime directory after 20 cycles: {left:?}"
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

fn info_req(id: &str) -> pb::GetVmInfoRequest {
    pb::GetVmInfoRequest {
        vm_id: id.to_owned(),
        ..Default::default()
    }
}

async fn info_of(
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    id: &str,
) -> pb::GetVmInfoResponse {
    c.get_vm_info(info_req(id))
        .await
        .expect("info")
        .into_owned()
}

fn vmm_pid(info: &pb::GetVmInfoResponse) -> u32 {
    info.backend_info
        .get("vmm_pid")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("vmm_pid in backend_info: {:?}", info.backend_info))
}

/// How a test makes VMCP replace a running VM's VMM.
#[derive(Clone, Copy, Debug)]
enum Replace {
    /// The VMM ends cleanly (SIGTERM: Cloud Hypervisor exits 0, read as a guest
    /// poweroff → Shutdown), then BootVm starts a new one.
    VmmEndedThenBoot,
    /// RebootVm (Firecracker restarts its VMM).
    Reboot,
    /// A forced ShutdownVm (Firecracker's process ends), then BootVm.
    ShutdownThenBoot,
}

/// A VM whose VMM VMCP replaced survives a VMCP restart as Running with the
/// new pid, and its delete leaves no process.
async fn replaced_vmm_survives_restart(kind: Kind, how: Replace) {
    let name = format!("real_{kind:?}_replaced_vmm_{how:?}").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let id = "replaced";
    c.create_vm(create(id, &env.kernel)).await.expect("create");
    let boot = pb::BootVmRequest {
        vm_id: id.to_owned(),
        ..Default::default()
    };
    assert_eq!(
        st(c.boot_vm(boot.clone())
            .await
            .expect("boot")
            .into_owned()
            .state),
        S::VM_STATE_RUNNING
    );
    let first = vmm_pid(&info_of(&c, id).await);
    assert!(pid_alive(first));
    match how {
        Replace::VmmEndedThenBoot => {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &first.to_string()])
                .status();
            let stopped = eventually(Duration::from_secs(5), || {
                let c = c.clone();
                async move { st(info_of(&c, id).await.state) == S::VM_STATE_SHUTDOWN }
            })
            .await;
            assert!(stopped, "VMCP noticed the VMM's clean exit as Shutdown");
            let b = c
                .boot_vm(boot.clone())
                .await
                .expect("boot after the VMM ended")
                .into_owned();
            assert_eq!(st(b.state), S::VM_STATE_RUNNING);
        }
        Replace::Reboot => {
            let r = c
                .reboot_vm(pb::RebootVmRequest {
                    vm_id: id.to_owned(),
                    ..Default::default()
                })
                .await
                .expect("reboot")
                .into_owned();
            assert_eq!(st(r.state), S::VM_STATE_RUNNING);
        }
        Replace::ShutdownThenBoot => {
            let sd = c
                .shutdown_vm(pb::ShutdownVmRequest {
                    vm_id: id.to_owned(),
                    force: true,
                    ..Default::default()
                })
                .await
                .expect("forced shutdown")
                .into_owned();
            assert_eq!(st(sd.state), S::VM_STATE_SHUTDOWN);
            let b = c
                .boot_vm(boot.clone())
                .await
                .expect("boot from Shutdown")
                .into_owned();
            assert_eq!(st(b.state), S::VM_STATE_RUNNING);
        }
    }
    let second = vmm_pid(&info_of(&c, id).await);
    assert_ne!(second, first, "the VMM was replaced");
    assert!(!pid_alive(first), "the replaced VMM {first} is gone");
    assert!(pid_alive(second));
    if kind == Kind::Ch {
        // A forced stop of the new VMM keeps that process and reads Created, as
        // Cloud Hypervisor's first one did (the test double follows this rule).
        let sd = c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id.to_owned(),
                force: true,
                ..Default::default()
            })
            .await
            .expect("forced shutdown")
            .into_owned();
        assert_eq!(st(sd.state), S::VM_STATE_CREATED);
        assert_eq!(vmm_pid(&info_of(&c, id).await), second);
        assert!(pid_alive(second));
        let b = c
            .boot_vm(boot.clone())
            .await
            .expect("boot from Created")
            .into_owned();
        assert_eq!(st(b.state), S::VM_STATE_RUNNING);
        assert_eq!(vmm_pid(&info_of(&c, id).await), second, "booted in place");
    }

    let s = s.restart(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let after = info_of(&c, id).await;
    assert_eq!(
        st(after.state),
        S::VM_STATE_RUNNING,
        "reason: {}",
        after.state_reason
    );
    assert_eq!(
        vmm_pid(&after),
        second,
        "the restarted VMCP adopted the new VMM"
    );
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.to_owned(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(!pid_alive(second), "delete ended the VMM VMCP had adopted");
    assert!(!pid_alive(first), "and the replaced one is still gone");
    assert!(
        entries(s.runtime.path()).is_empty(),
        "runtime dir removed: {:?}",
        entries(s.runtime.path())
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_boot_after_its_vmm_ended_survives_a_restart() {
    replaced_vmm_survives_restart(Kind::Ch, Replace::VmmEndedThenBoot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_reboot_survives_a_restart() {
    replaced_vmm_survives_restart(Kind::Fc, Replace::Reboot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_boot_from_shutdown_survives_a_restart() {
    replaced_vmm_survives_restart(Kind::Fc, Replace::ShutdownThenBoot).await;
}

/// A pause sent straight to Cloud Hypervisor's socket (not through VMCP)
/// shows in GetVmInfo through the VMM's event monitor, well before the
/// 5 s sample period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_pause_on_the_vmm_socket_shows_without_waiting_for_a_sample() {
    let name = "real_ch_pause_on_the_vmm_socket_shows_without_waiting_for_a_sample";
    let Some(env) = env(Kind::Ch, name) else {
        return;
    };
    let s = server(Kind::Ch, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let id = "direct";
    c.create_vm(create(id, &env.kernel)).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.to_owned(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let info = info_of(&c, id).await;
    let socket = info
        .backend_info
        .get("api_socket")
        .cloned()
        .expect("api_socket");
    // Let the post-boot sample land first, so only the event can explain what follows.
    let sampled = eventually(Duration::from_secs(2), || {
        let c = c.clone();
        async move { info_of(&c, id).await.metrics_sampled_timestamp_ms > 0 }
    })
    .await;
    assert!(sampled);
    let status = put_on_socket(Path::new(&socket), "/api/v1/vm.pause").await;
    assert!(status.starts_with("HTTP/1.1 204"), "CH answered {status:?}");
    let started = std::time::Instant::now();
    let seen = eventually(Duration::from_millis(1500), || {
        let c = c.clone();
        async move { st(info_of(&c, id).await.state) == S::VM_STATE_PAUSED }
    })
    .await;
    assert!(
        seen,
        "GetVmInfo shows the pause made on the VMM socket within 1.5 s (sample period 5 s)"
    );
    say(&format!(
        "{name}: pause seen through the event monitor after {:?}",
        started.elapsed()
    ));
    let pid = vmm_pid(&info_of(&c, id).await);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.to_owned(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(
        !pid_alive(pid),
        "{name}: the VMM {pid} is gone after the delete"
    );
    s.stop().await;
}

/// A raw HTTP/1.1 PUT with an empty body; answers the status line.
async fn put_on_socket(socket: &Path, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let req = format!("PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

fn create_with_policy(id: &str, guest: &Path, policy: pb::RestartPolicy) -> pb::CreateVmRequest {
    let mut req = create(id, guest);
    if let Some(c) = req.config.as_option_mut() {
        c.restart_policy = policy.into();
    }
    req
}

/// A VMM killed with -9 under on-failure comes back Running with a new pid;
/// then a simulated host restart (VMCP stopped, every VMM killed, the
/// runtime directory emptied, VMCP started again): the on-failure and always
/// VMs run again in fresh VMMs, the never VM is SHUTDOWN "host restarted" and
/// boots on request; every pid any VM ever had is gone after the deletes.
async fn host_restart_by_policy(kind: Kind) {
    use pb::RestartPolicy as P;
    let name = format!("real_{kind:?}_host_restart_by_policy").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let mut s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let vms = [
        ("never", P::RESTART_POLICY_NEVER),
        ("onf", P::RESTART_POLICY_ON_FAILURE),
        ("always", P::RESTART_POLICY_ALWAYS),
    ];
    let mut ever: Vec<u32> = Vec::new();
    for (id, p) in vms {
        c.create_vm(create_with_policy(id, &env.kernel, p))
            .await
            .expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("boot");
        ever.push(vmm_pid(&info_of(&c, id).await));
    }
    // kill -9 under on-failure: back, in a new VMM (the default backoff starts at 1 s).
    let old = vmm_pid(&info_of(&c, "onf").await);
    std::process::Command::new("kill")
        .args(["-9", &old.to_string()])
        .status()
        .expect("kill");
    let back = eventually(Duration::from_secs(8), || {
        let c = c.clone();
        async move {
            let i = info_of(&c, "onf").await;
            st(i.state) == S::VM_STATE_RUNNING && pid_of(&i).is_some_and(|p| p != &old.to_string())
        }
    })
    .await;
    let i = info_of(&c, "onf").await;
    assert!(back, "{name}: {:?} {}", st(i.state), i.state_reason);
    ever.push(vmm_pid(&i));
    // The host restarts.
    if let Some(r) = s.running.take() {
        r.shutdown().await;
    }
    kill_vmms_in(s.runtime.path()).expect("scan");
    assert!(
        eventually(Duration::from_secs(5), || {
            let ever = ever.clone();
            async move { ever.iter().all(|p| !pid_alive(*p)) }
        })
        .await
    );
    for e in std::fs::read_dir(s.runtime.path()).expect("runtime dir") {
        let path = e.expect("entry").path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("empty the runtime dir");
        } else {
            std::fs::remove_file(&path).expect("empty the runtime dir");
        }
    }
    let (runtime, store) = (Arc::clone(&s.runtime), Arc::clone(&s.store));
    s.handed_over = true;
    drop(s);
    let s = server_on(kind, &env, runtime, store).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    for id in ["onf", "always"] {
        let up = eventually(Duration::from_secs(8), || {
            let c = c.clone();
            async move { st(info_of(&c, id).await.state) == S::VM_STATE_RUNNING }
        })
        .await;
        let i = info_of(&c, id).await;
        assert!(up, "{name}: {id} {:?} {}", st(i.state), i.state_reason);
        let pid = vmm_pid(&i);
        assert!(!ever.contains(&pid), "{name}: {id} runs in a fresh VMM");
        ever.push(pid);
    }
    let never = info_of(&c, "never").await;
    assert_eq!(
        (st(never.state), never.state_reason.as_str()),
        (S::VM_STATE_SHUTDOWN, "host restarted"),
        "{name}"
    );
    c.boot_vm(pb::BootVmRequest {
        vm_id: "never".into(),
        ..Default::default()
    })
    .await
    .expect("boot after the host restart");
    ever.push(vmm_pid(&info_of(&c, "never").await));
    say(&format!(
        "{name}: kill -9 restarted in a new VMM; after the host restart on-failure and always run again, never is SHUTDOWN \"host restarted\" and booted on request"
    ));
    for (id, _) in vms {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            let ever = ever.clone();
            async move { ever.iter().all(|p| !pid_alive(*p)) }
        })
        .await,
        "{name}: every pid any VM ever had is gone"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_restart_policies_through_a_kill_and_a_host_restart() {
    host_restart_by_policy(Kind::Ch).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_restart_policies_through_a_kill_and_a_host_restart() {
    host_restart_by_policy(Kind::Fc).await;
}

/// The console through the API alone: the guest's marker read by offset and
/// followed; console input refused with the backend's reason; ResizeVm on
/// Cloud Hypervisor (vCPUs and a 128 MiB DIMM, the size read back from
/// `vm.info` in the answer, GetVmInfo and after a VMCP restart) and refused
/// as unimplemented on Firecracker.
async fn console_and_resize(kind: Kind) {
    let name = format!("real_{kind:?}_console_and_resize").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let id = "sized".to_owned();
    let mut req = create(&id, &env.kernel);
    if kind == Kind::Ch {
        let config = req.config.get_or_insert_default();
        config.cpu.get_or_insert_default().max_vcpu_count = 2;
        let m = config.memory.get_or_insert_default();
        m.size_bytes = 128 << 20;
        m.hotplug_enabled = true;
        m.max_size_bytes = 512 << 20;
    }
    c.create_vm(req).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let pid = vmm_pid(&info_of(&c, &id).await);

    let read = |offset: u64| {
        let c = client_for(s.addr, Wire::ConnectJson);
        let id = id.clone();
        async move {
            c.get_console_output(pb::GetConsoleOutputRequest {
                vm_id: id,
                offset,
                ..Default::default()
            })
            .await
            .expect("console")
            .into_owned()
        }
    };
    let seen = eventually(Duration::from_secs(5), || async {
        String::from_utf8_lossy(&read(0).await.data).contains(MARKER)
    })
    .await;
    assert!(seen, "the marker through GetConsoleOutput");
    let all = read(0).await;
    let at = all
        .data
        .windows(MARKER.len())
        .position(|w| w == MARKER.as_bytes())
        .expect("marker") as u64;
    let tail = read(at).await;
    assert!(
        tail.data.starts_with(MARKER.as_bytes()),
        "read from an offset"
    );
    assert_eq!(tail.next_offset, all.next_offset);
    let mut stream = client_for(s.addr, Wire::Grpc)
        .stream_console(pb::StreamConsoleRequest {
            vm_id: id.clone(),
            offset: at,
            ..Default::default()
        })
        .await
        .expect("stream");
    let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("a message")
        .to_owned_message();
    assert!(first.data.starts_with(MARKER.as_bytes()));
    assert_eq!(first.offset, at);

    let e = c
        .write_console(pb::WriteConsoleRequest {
            vm_id: id.clone(),
            data: b"\n".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");

    let resized = c
        .resize_vm(pb::ResizeVmRequest {
            vm_id: id.clone(),
            vcpu_count: 2,
            memory_bytes: 256 << 20,
            ..Default::default()
        })
        .await;
    let s = match kind {
        Kind::Fc => {
            let e = resized.unwrap_err();
            assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
            assert!(e.message.unwrap_or_default().contains("firecracker"));
            s
        }
        Kind::Ch => {
            let r = resized.expect("resize").into_owned();
            assert_eq!(st(r.state), S::VM_STATE_RUNNING);
            let size = |cfg: &pb::VmConfig| {
                (
                    cfg.cpu.as_option().expect("cpu").vcpu_count,
                    cfg.memory.as_option().expect("memory").size_bytes,
                )
            };
            assert_eq!(size(r.config.as_option().expect("config")), (2, 256 << 20));
            let info = info_of(&c, &id).await;
            assert_eq!(
                size(info.config.as_option().expect("config")),
                (2, 256 << 20)
            );
            // A shrink would be recorded by CH without removing memory: refused.
            let e = c
                .resize_vm(pb::ResizeVmRequest {
                    vm_id: id.clone(),
                    memory_bytes: 128 << 20,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{e:?}");
            // A restarted VMCP reads the size from the VMM it adopts.
            let s = s.restart(kind, &env).await;
            let c = client_for(s.addr, Wire::ConnectProto);
            let info = info_of(&c, &id).await;
            assert_eq!(
                size(info.config.as_option().expect("config")),
                (2, 256 << 20)
            );
            assert_eq!(vmm_pid(&info), pid, "the restarted VMCP adopted the VMM");
            s
        }
    };
    let c = client_for(s.addr, Wire::ConnectProto);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(
        !pid_alive(pid),
        "{name}: the VMM {pid} is gone after the delete"
    );
    // The stream ends cleanly with the VM on Firecracker; on Cloud Hypervisor it
    // belonged to the VMCP that restarted, which ended it with `unavailable`.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e.code),
            }
        }
    })
    .await
    .expect("the stream ends");
    let want = match kind {
        Kind::Fc => None,
        Kind::Ch => Some(ErrorCode::Unavailable),
    };
    assert_eq!(end, want);
    s.stop().await;
}

#[tokio::test]
async fn real_ch_console_and_resize_through_the_api() {
    console_and_resize(Kind::Ch).await;
}

#[tokio::test]
async fn real_fc_console_and_resize_through_the_api() {
    console_and_resize(Kind::Fc).await;
}

/// Snapshot a running VM, restore it under a new id while the source runs,
/// check the clone continued (no second boot marker on its console), then
/// delete everything and find nothing left. On this host's nested KVM Cloud
/// Hypervisor cannot read the vCPUs' nested state: VMCP answers with the
/// VMM's reason and the test says SKIPPED naming it.
async fn snapshot_and_clone(kind: Kind) {
    let name = format!("real_{kind:?}_snapshot_and_clone").to_lowercase();
    let Some(env) = env(kind, &name) else { return };
    let s = server(kind, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let src = "origin".to_owned();
    c.create_vm(create(&src, &env.kernel))
        .await
        .expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: src.clone(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let console_of = |id: &str| console_text(s.addr, id.to_owned());
    assert!(
        eventually(Duration::from_secs(5), || async {
            console_of(&src).await.contains(MARKER)
        })
        .await,
        "the source booted"
    );
    let mut pids = vec![vmm_pid(&info_of(&c, &src).await)];
    let snap = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: src.clone(),
            snapshot_id: "warm".into(),
            resume: true,
            ..Default::default()
        })
        .await;
    let snapshots = snapshot_dir(s.runtime.path());
    let snap = match snap {
        Err(e)
            if kind == Kind::Ch
                && e.message
                    .as_deref()
                    .unwrap_or_default()
                    .contains("GetNestedState") =>
        {
            assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
            let listed = c
                .list_snapshots(pb::ListSnapshotsRequest::default())
                .await
                .expect("list")
                .into_owned();
            assert!(
                listed.snapshots.is_empty(),
                "a failed snapshot is not listed"
            );
            assert_eq!(
                entries(&snapshots),
                Vec::<String>::new(),
                "nor left on disk"
            );
            let why = e.message.unwrap_or_default();
            super::skips::skip(
                &name,
                &format!(
                    "this host's KVM cannot snapshot a Cloud Hypervisor VM: {}",
                    why.lines().next().unwrap_or_default()
                ),
            );
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: src,
                ..Default::default()
            })
            .await
            .expect("delete");
            s.stop().await;
            return;
        }
        other => other.expect("snapshot").into_owned(),
    };
    let info = snap.snapshot.as_option().expect("snapshot info");
    assert!(info.size_bytes >= 64 << 20, "the memory is in it: {info:?}");
    assert_eq!(
        st(info_of(&c, &src).await.state),
        S::VM_STATE_RUNNING,
        "resumed"
    );

    let started = std::time::Instant::now();
    let r = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: "copy".into(),
            snapshot_id: "warm".into(),
            resume: true,
            ..Default::default()
        })
        .await
        .expect("restore")
        .into_owned();
    let took = started.elapsed();
    assert_eq!(st(r.state), S::VM_STATE_RUNNING);
    pids.push(vmm_pid(&info_of(&c, "copy").await));
    assert_ne!(pids[0], pids[1], "a fresh VMM");
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "source and clone run at once"
    );
    assert!(
        !console_of("copy").await.contains(MARKER),
        "the clone continued; it did not boot again"
    );
    eprintln!("{name}: restore to Running took {took:?}");

    delete_vms_and_snapshot(&c, &[src.as_str(), "copy"], "warm", &pids).await;
    assert_eq!(entries(&snapshots), Vec::<String>::new());
    let left = entries(s.runtime.path());
    assert!(left.is_empty(), "runtime dirs left: {left:?}");
    s.stop().await;
}

#[tokio::test]
async fn real_ch_snapshot_and_clone_through_the_api() {
    snapshot_and_clone(Kind::Ch).await;
}

#[tokio::test]
async fn real_fc_snapshot_and_clone_through_the_api() {
    snapshot_and_clone(Kind::Fc).await;
}

/// A diff snapshot on the real Firecracker: a VM tracking dirty pages (128
/// MiB) takes a full snapshot, runs on, takes a diff (sparse from the VMM,
/// made whole by VMCP), and the diff is restored under a new id with the
/// full one deleted first: the clone runs and did not boot again, and a
/// diff of the clone is taken against what it loaded. Nothing is left.
#[tokio::test]
async fn real_fc_diff_snapshot_restores_whole() {
    let name = "real_fc_diff_snapshot_restores_whole";
    let Some(env) = env(Kind::Fc, name) else {
        return;
    };
    let s = server(Kind::Fc, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let mut req = create("origin", &env.kernel);
    let m = req
        .config
        .get_or_insert_default()
        .memory
        .get_or_insert_default();
    m.size_bytes = 128 << 20;
    m.track_dirty_pages = true;
    c.create_vm(req).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "origin".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let console_of = |id: &str| console_text(s.addr, id.to_owned());
    assert!(
        eventually(Duration::from_secs(5), || async {
            console_of("origin").await.contains(MARKER)
        })
        .await,
        "the source booted"
    );
    let take = |id: &'static str, kind: pb::SnapshotKind| {
        let c = c.clone();
        async move {
            c.snapshot_vm(pb::SnapshotVmRequest {
                vm_id: "origin".into(),
                snapshot_id: id.into(),
                resume: true,
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_owned().snapshot.into_option().expect("info"))
        }
    };
    let t = std::time::Instant::now();
    take("base", pb::SnapshotKind::SNAPSHOT_KIND_FULL)
        .await
        .expect("full snapshot");
    let full_took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let d = take("d1", pb::SnapshotKind::SNAPSHOT_KIND_DIFF)
        .await
        .expect("diff snapshot");
    let diff_took = t.elapsed();
    eprintln!("{name}: full snapshot {full_took:?}, diff snapshot {diff_took:?}");
    assert_eq!(d.parent_snapshot_id, "base");
    assert_eq!(
        d.kind.as_known(),
        Some(pb::SnapshotKind::SNAPSHOT_KIND_DIFF)
    );
    assert_eq!(st(info_of(&c, "origin").await.state), S::VM_STATE_RUNNING);
    let snapshots = snapshot_dir(s.runtime.path());
    let memory = std::fs::metadata(snapshots.join("d1").join("memory")).expect("memory");
    assert_eq!(memory.len(), 128 << 20, "the whole guest memory");
    // The parent goes before the restore: the diff stands alone.
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: "base".into(),
        ..Default::default()
    })
    .await
    .expect("delete the parent");
    let r = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: "copy".into(),
            snapshot_id: "d1".into(),
            resume: true,
            ..Default::default()
        })
        .await
        .expect("restore the diff")
        .into_owned();
    assert_eq!(st(r.state), S::VM_STATE_RUNNING);
    let pids = vec![
        vmm_pid(&info_of(&c, "origin").await),
        vmm_pid(&info_of(&c, "copy").await),
    ];
    assert!(pids.iter().all(|p| pid_alive(*p)), "both run");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(st(info_of(&c, "copy").await.state), S::VM_STATE_RUNNING);
    assert!(
        !console_of("copy").await.contains(MARKER),
        "the clone continued; it did not boot again"
    );
    let d2 = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "copy".into(),
            snapshot_id: "d2".into(),
            resume: true,
            kind: pb::SnapshotKind::SNAPSHOT_KIND_DIFF.into(),
            ..Default::default()
        })
        .await
        .expect("a diff of the restored VM")
        .into_owned();
    assert_eq!(
        d2.snapshot.as_option().expect("info").parent_snapshot_id,
        "d1"
    );
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: "d2".into(),
        ..Default::default()
    })
    .await
    .expect("delete d2");
    delete_vms_and_snapshot(&c, &["origin", "copy"], "d1", &pids).await;
    assert_eq!(entries(&snapshots), Vec::<String>::new());
    let left = entries(s.runtime.path());
    assert!(left.is_empty(), "runtime dirs left: {left:?}");
    s.stop().await;
}

/// The files open in process `pid`, as their paths.
fn open_files(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Firecracker's load has no drive override: the snapshot names the source's
/// disk. Two clones of a VM with a writable disk run at once, each on its own
/// copy (Firecracker holds the copy open, not the source's disk), neither
/// booted again; deleting everything leaves nothing.
#[tokio::test]
async fn real_fc_two_clones_with_a_disk_run_at_once_each_on_its_own_copy() {
    let name = "real_fc_two_clones_with_a_disk_run_at_once_each_on_its_own_copy";
    let Some(env) = env(Kind::Fc, name) else {
        return;
    };
    let s = server(Kind::Fc, &env).await;
    let c = client_for(s.addr, Wire::ConnectProto);
    let images = tempfile::tempdir().expect("images");
    let disk = images.path().join("data.img");
    std::fs::write(&disk, vec![7u8; 4 << 20]).expect("disk");
    let mut req = create("origin", &env.kernel);
    req.config.get_or_insert_default().storage = vec![pb::StorageDevice {
        id: "data".into(),
        path: disk.display().to_string(),
        ..Default::default()
    }];
    c.create_vm(req).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "origin".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let console_of = |id: &str| console_text(s.addr, id.to_owned());
    assert!(
        eventually(Duration::from_secs(5), || async {
            console_of("origin").await.contains(MARKER)
        })
        .await,
        "the source booted"
    );
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: "origin".into(),
        snapshot_id: "warm".into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("snapshot");
    let snapshots = snapshot_dir(s.runtime.path());
    assert!(
        snapshots.join("warm").join("disk-0").is_file(),
        "the disk is kept"
    );
    let mut pids = vec![vmm_pid(&info_of(&c, "origin").await)];
    for clone in ["c1", "c2"] {
        let r = c
            .restore_vm(pb::RestoreVmRequest {
                vm_id: clone.into(),
                snapshot_id: "warm".into(),
                resume: true,
                ..Default::default()
            })
            .await
            .expect("restore")
            .into_owned();
        assert_eq!(st(r.state), S::VM_STATE_RUNNING);
        let pid = vmm_pid(&info_of(&c, clone).await);
        let copy = snapshots.join(".clones").join(clone).join("disk-0");
        let open = open_files(pid);
        assert!(
            open.contains(&copy.display().to_string()),
            "{clone}'s Firecracker has its copy open: {open:?}"
        );
        assert!(
            !open.contains(&disk.display().to_string()),
            "and not the source's disk: {open:?}"
        );
        pids.push(pid);
    }
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "source and both clones run at once"
    );
    for clone in ["c1", "c2"] {
        assert_eq!(st(info_of(&c, clone).await.state), S::VM_STATE_RUNNING);
        assert!(
            !console_of(clone).await.contains(MARKER),
            "{clone} continued; it did not boot again"
        );
    }
    delete_vms_and_snapshot(&c, &["origin", "c1", "c2"], "warm", &pids).await;
    assert_eq!(entries(&snapshots), Vec::<String>::new(), "no copies left");
    let left = entries(s.runtime.path());
    assert!(left.is_empty(), "runtime dirs left: {left:?}");
    s.stop().await;
}

/// The console output of `id` so far, as text.
async fn console_text(addr: std::net::SocketAddr, id: String) -> String {
    let data = client_for(addr, Wire::ConnectProto)
        .get_console_output(pb::GetConsoleOutputRequest {
            vm_id: id,
            ..Default::default()
        })
        .await
        .expect("console")
        .into_owned()
        .data;
    String::from_utf8_lossy(&data).into_owned()
}

/// Deletes `vms` and the snapshot `snapshot`; every VMM in `pids` is then gone.
async fn delete_vms_and_snapshot(
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    vms: &[&str],
    snapshot: &str,
    pids: &[u32],
) {
    for vm in vms {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: (*vm).into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: snapshot.into(),
        ..Default::default()
    })
    .await
    .expect("delete snapshot");
    for p in pids {
        assert!(
            eventually(Duration::from_secs(5), || async { !pid_alive(*p) }).await,
            "VMM {p} is gone"
        );
    }
}
