//! The Cloud Hypervisor adapter against the real `cloud-hypervisor` (v53)
//! and the tiny test guest (`make guest`). Each test runs when the binary
//! (VMCP_TEST_CH_BINARY or `cloud-hypervisor` on PATH), a read-write
//! /dev/kvm and the guest kernel (VMCP_TEST_GUEST_KERNEL or
//! .cache/guest/vmcp-test-guest.elf) exist, and otherwise prints one
//! `SKIPPED: <test>: <what is missing>` line. The states asserted here are
//! the ones the real VMM reports (e.g. `vm.shutdown` → Created). Also the
//! replaced-VMM path on the real binary (its VMM ends with status 0, boot
//! starts a new one, a restarted backend adopts it, delete ends it) and the
//! event monitor reporting a pause made with a raw PUT on the socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use vmcp::adapters::outbound::cloud_hypervisor::client::ChApi;
use vmcp::adapters::outbound::cloud_hypervisor::{ChVm, CloudHypervisor};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::domain::{BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, VmConfig, VmId, VmState};
use vmcp::ports::{Hypervisor, HypervisorError, ShutdownMode, VmmEvent, VmmHandle, VmmProcess};

use super::real_env::{Real, Vmm, kill9, require};

const MIB: i64 = 1 << 20;
const MARKER: &str = "VMCP-GUEST-OK";

fn real(test: &str) -> Option<Real> {
    require(Vmm::CloudHypervisor, test)
}

struct Env {
    tmp: tempfile::TempDir,
    binary: PathBuf,
    ch: CloudHypervisor,
    tx: UnboundedSender<VmmEvent>,
    events: UnboundedReceiver<VmmEvent>,
    kernel: PathBuf,
}

impl Env {
    fn new(real: Real) -> Env {
        // A short root keeps socket paths well under the 107-byte limit.
        let tmp = tempfile::Builder::new()
            .prefix("vmcp-ch-")
            .tempdir_in("/tmp")
            .unwrap();
        let (tx, rx) = unbounded_channel();
        Env {
            ch: backend(&real.binary, &tmp),
            binary: real.binary,
            tmp,
            tx,
            events: rx,
            kernel: real.kernel,
        }
    }

    async fn create(&self, vm: &VmId) -> (ChVm, VmmProcess) {
        let (h, rep) = self
            .ch
            .create(vm, &self.config(), self.tx.clone())
            .await
            .unwrap();
        assert_eq!(rep.state, VmState::Created);
        (h, rep.process.expect("a VMM"))
    }

    /// Asserts that no VMM exit has been reported (the event monitor's
    /// state changes are fine: it reports VMCP's own operations too).
    fn assert_no_exit(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            assert!(
                matches!(ev, VmmEvent::StateChanged { .. }),
                "unexpected {ev:?}"
            );
        }
    }

    fn config(&self) -> VmConfig {
        VmConfig {
            cpu: CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            },
            memory: MemoryConfig {
                size_bytes: 64 * MIB,
                ..Default::default()
            },
            boot: BootConfig {
                kernel_path: self.kernel.to_string_lossy().into_owned(),
                kernel_args: "console=ttyS0".into(),
                ..Default::default()
            },
            console: ConsoleConfig {
                enabled: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn runtime_root(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    fn serial(&self, vm: &VmId) -> PathBuf {
        self.runtime_root().join(vm.as_str()).join("serial.log")
    }
}

/// Polls the serial file until the guest's marker shows up (the guest
/// prints it within milliseconds of boot).
async fn wait_for_marker(serial: &Path) -> Duration {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(serial).is_ok_and(|s| s.contains(MARKER)) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no {MARKER} in {} within 10 s",
            serial.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn id(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

/// A backend over `tmp`'s runtime root (a second one plays a restarted VMCP).
fn backend(binary: &Path, tmp: &tempfile::TempDir) -> CloudHypervisor {
    CloudHypervisor::new(binary, tmp.path().join("run"), Duration::from_secs(10))
}

/// The next exit reported on `events` within a second, skipping state changes.
async fn next_exit(events: &mut UnboundedReceiver<VmmEvent>) -> (u32, VmState, String) {
    let wait = async {
        loop {
            if let VmmEvent::Exited { pid, state, reason } = events.recv().await.unwrap() {
                return (pid, state, reason);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .expect("Exited within a second")
}

const FORCE: ShutdownMode = ShutdownMode {
    force: true,
    graceful_timeout: Duration::ZERO,
};

#[tokio::test]
async fn real_ch_full_lifecycle_reports_what_the_vmm_reports() {
    let Some(real) = real("real_ch_full_lifecycle_reports_what_the_vmm_reports") else {
        return;
    };
    let mut env = Env::new(real);
    let version = env.ch.check().await.unwrap().version;
    assert!(version.starts_with("v53."), "{version}");
    let vm = id("life");

    let t = Instant::now();
    let (mut h, rep) = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap();
    let create_time = t.elapsed();
    assert_eq!(rep.state, VmState::Created);
    let p = rep.process.unwrap();
    assert!(is_alive(p.pid, p.start_time));
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Created));
    assert_eq!(info.backend_info["vmm_version"], version);
    assert_eq!(info.backend_info["vmm_pid"], p.pid.to_string());
    assert_eq!(
        info.backend_info["memory_actual_size"],
        (64 * MIB).to_string()
    );

    let t = Instant::now();
    assert_eq!(h.boot().await.unwrap().state, VmState::Running);
    let boot_call = t.elapsed();
    let marker = wait_for_marker(&env.serial(&vm)).await + boot_call;
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Running));
    assert!(info.metrics.memory_usage_bytes > 0);

    let t = Instant::now();
    for _ in 0..100 {
        h.sample().await.unwrap();
    }
    let info_avg = t.elapsed() / 100;
    let http = UdsClient::new(Duration::from_secs(5));
    let api = ChApi::new(&http, Path::new(&p.socket_path));
    let t = Instant::now();
    for _ in 0..100 {
        api.info().await.unwrap();
    }
    let raw_info_avg = t.elapsed() / 100;

    assert_eq!(h.pause().await.unwrap().state, VmState::Paused);
    // CH answers 500 with an error body: a state refusal.
    let again = h.pause().await.unwrap_err();
    assert!(
        matches!(&again, HypervisorError::InvalidState(m) if m.contains("InvalidStateTransition(Paused, Paused)")),
        "{again:?}"
    );
    assert_eq!(h.resume().await.unwrap().state, VmState::Running);
    assert!(matches!(
        h.resume().await,
        Err(HypervisorError::InvalidState(_))
    ));

    let rebooted = h.reboot(false).await.unwrap();
    assert_eq!(rebooted.state, VmState::Running);
    assert_eq!(rebooted.process, Some(p.clone()), "CH reboots in place");
    // CH truncates the serial file on reboot; the guest prints again.
    wait_for_marker(&env.serial(&vm)).await;

    // The tiny guest has no ACPI: the power button does nothing, the
    // graceful attempt times out and the VM is stopped hard → Created.
    let t = Instant::now();
    let graceful = ShutdownMode {
        force: false,
        graceful_timeout: Duration::from_millis(800),
    };
    assert_eq!(h.shutdown(graceful).await.unwrap().state, VmState::Created);
    let graceful_time = t.elapsed();
    assert!(graceful_time >= Duration::from_millis(800));
    let not_running = h.pause().await.unwrap_err();
    assert!(
        matches!(&not_running, HypervisorError::InvalidState(m) if m.contains("VM is not running")),
        "{not_running:?}"
    );

    // Bootable again after the hard stop.
    assert_eq!(h.boot().await.unwrap().state, VmState::Running);
    wait_for_marker(&env.serial(&vm)).await;
    assert_eq!(h.pause().await.unwrap().state, VmState::Paused);
    assert_eq!(
        h.shutdown(FORCE).await.unwrap().state,
        VmState::Created,
        "vm.shutdown from Paused"
    );
    assert_eq!(h.boot().await.unwrap().state, VmState::Running);
    assert_eq!(h.shutdown(FORCE).await.unwrap().state, VmState::Created);
    assert!(matches!(
        h.shutdown(FORCE).await,
        Err(HypervisorError::InvalidState(_))
    ));

    let t = Instant::now();
    h.delete(false).await.unwrap();
    let delete_time = t.elapsed();
    assert!(!is_alive(p.pid, p.start_time));
    assert!(!env.runtime_root().join("life").exists());
    env.assert_no_exit();
    eprintln!(
        "real_ch lifecycle: version {version}; create {create_time:?}; boot call {boot_call:?}; \
         boot→marker {marker:?}; adapter sample avg {info_avg:?} (vm.info+vm.counters+/proc), raw vm.info avg {raw_info_avg:?}; graceful(800ms)→hard {graceful_time:?}; delete {delete_time:?}"
    );
}

#[tokio::test]
async fn real_ch_kill_9_is_failed_with_a_reason_within_a_second() {
    let Some(real) = real("real_ch_kill_9_is_failed_with_a_reason_within_a_second") else {
        return;
    };
    let mut env = Env::new(real);
    let vm = id("kill9");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    wait_for_marker(&env.serial(&vm)).await;
    let killed = Instant::now();
    kill9(p.pid);
    let (pid, state, reason) = next_exit(&mut env.events).await;
    let noticed = killed.elapsed();
    assert_eq!(pid, p.pid, "the event names the process that died");
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Failed));
    // SIGKILL leaves CH's socket behind; delete removes it with the directory.
    h.delete(false).await.unwrap();
    assert!(!is_alive(p.pid, p.start_time));
    assert!(!env.runtime_root().join("kill9").exists());
    eprintln!("real_ch kill -9 noticed after {noticed:?}");
}

/// The replaced-VMM path on the real binary: its VMM ends with status 0
/// (SIGTERM, which CH answers like a guest poweroff), boot starts a new VMM
/// and reports it, a restarted backend adopts exactly that process as
/// Running, and delete leaves no process and no runtime directory.
#[tokio::test]
async fn real_ch_a_vm_whose_vmm_ended_boots_in_a_new_vmm_that_survives_a_restart() {
    let Some(real) =
        real("real_ch_a_vm_whose_vmm_ended_boots_in_a_new_vmm_that_survives_a_restart")
    else {
        return;
    };
    let mut env = Env::new(real);
    let vm = id("renew");
    let (mut h, first) = env.create(&vm).await;
    h.boot().await.unwrap();
    wait_for_marker(&env.serial(&vm)).await;
    let pid = rustix::process::Pid::from_raw(first.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let (pid, state, reason) = next_exit(&mut env.events).await;
    assert_eq!(pid, first.pid);
    assert_eq!(state, VmState::Shutdown, "{reason}");
    assert!(reason.contains("exited with status 0"), "{reason}");
    assert_eq!(h.process(), None);

    let booted = h.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    let second = booted.process.clone().expect("a new VMM");
    assert_ne!(second.pid, first.pid);
    assert!(!is_alive(first.pid, first.start_time));
    assert!(is_alive(second.pid, second.start_time));
    assert_eq!(h.process(), Some(second.clone()));
    wait_for_marker(&env.serial(&vm)).await;
    let found = env.ch.discover().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].process,
        Some(second.clone()),
        "discovery sees the new VMM"
    );

    // VMCP restarts: the handle is let go, the VMM runs on.
    drop(h);
    let restarted = backend(&env.binary, &env.tmp);
    let (tx, mut events) = unbounded_channel();
    let (mut adopted, rep) = restarted
        .adopt(&vm, &env.config(), Some(second.clone()), tx)
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Running);
    assert_eq!(rep.process, Some(second.clone()));
    assert_eq!(adopted.process(), Some(second.clone()));
    adopted.delete(false).await.unwrap();
    for p in [&first, &second] {
        assert!(!is_alive(p.pid, p.start_time), "VMM {} still runs", p.pid);
    }
    assert!(!env.runtime_root().join("renew").exists());
    while let Ok(ev) = events.try_recv() {
        assert!(matches!(ev, VmmEvent::StateChanged { .. }), "{ev:?}");
    }
    env.assert_no_exit();
}

/// Cloud Hypervisor's event monitor reports a pause another client made with
/// a raw PUT on the VMM's socket, with the state the VMM then reports.
#[tokio::test]
async fn real_ch_a_raw_pause_on_the_socket_is_reported_as_a_state_change() {
    let Some(real) = real("real_ch_a_raw_pause_on_the_socket_is_reported_as_a_state_change") else {
        return;
    };
    let mut env = Env::new(real);
    let vm = id("watched");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    wait_for_marker(&env.serial(&vm)).await;
    // The monitor reports the boot too; let those through first.
    while let Ok(ev) = env.events.try_recv() {
        assert!(matches!(ev, VmmEvent::StateChanged { .. }), "{ev:?}");
    }
    let http = UdsClient::new(Duration::from_secs(5));
    let t = Instant::now();
    let r = http
        .call(
            Path::new(&p.socket_path),
            http::Method::PUT,
            "/api/v1/vm.pause",
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, http::StatusCode::NO_CONTENT, "{}", r.text());
    let seen = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match env.events.recv().await.unwrap() {
                VmmEvent::StateChanged {
                    pid,
                    state: VmState::Paused,
                    reason,
                } => {
                    return (pid, reason);
                }
                VmmEvent::StateChanged { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("StateChanged to Paused within a second");
    let latency = t.elapsed();
    assert_eq!(seen.0, p.pid);
    assert!(seen.1.starts_with("vm/paus"), "{}", seen.1);
    assert_eq!(h.sample().await.unwrap().state, Some(VmState::Paused));
    h.delete(true).await.unwrap();
    assert!(!is_alive(p.pid, p.start_time));
    eprintln!("real_ch raw vm.pause reported by the event monitor after {latency:?}");
}

#[tokio::test]
async fn real_ch_eight_vms_concurrently() {
    let Some(real) = real("real_ch_eight_vms_concurrently") else {
        return;
    };
    let env = Env::new(real);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let env = std::sync::Arc::new(env);
    for i in 0..8 {
        let env = env.clone();
        set.spawn(async move {
            let vm = id(&format!("par{i}"));
            let (mut h, p) = env.create(&vm).await;
            assert_eq!(h.boot().await.unwrap().state, VmState::Running);
            wait_for_marker(&env.serial(&vm)).await;
            assert_eq!(h.pause().await.unwrap().state, VmState::Paused);
            assert_eq!(h.resume().await.unwrap().state, VmState::Running);
            assert_eq!(h.sample().await.unwrap().state, Some(VmState::Running));
            assert_eq!(h.shutdown(FORCE).await.unwrap().state, VmState::Created);
            h.delete(false).await.unwrap();
            assert!(!is_alive(p.pid, p.start_time));
        });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    assert_eq!(std::fs::read_dir(env.runtime_root()).unwrap().count(), 0);
    eprintln!(
        "real_ch 8 VMs create→boot→marker→pause→resume→stop→delete concurrently: {:?}",
        started.elapsed()
    );
}

/// Set in the child process that runs the cycles alone, so its fd count is
/// not disturbed by other tests running in parallel threads.
const CYCLES_CHILD: &str = "VMCP_REAL_CH_CYCLES_CHILD";

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn real_ch_twenty_cycles_leave_no_process_socket_dir_or_fd() {
    let Some(real) = real("real_ch_twenty_cycles_leave_no_process_socket_dir_or_fd") else {
        return;
    };
    if std::env::var_os(CYCLES_CHILD).is_none() {
        // Re-run just this test in a fresh process and require it to pass.
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "real_ch::real_ch_twenty_cycles_leave_no_process_socket_dir_or_fd",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CYCLES_CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprint!("{stderr}");
        assert!(
            out.status.success(),
            "cycles child failed:\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.contains("real_ch 20 cycles"),
            "the child ran the cycles"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let env = Env::new(real);
        env.ch.check().await.unwrap();
        // The process's one inotify instance (made at the first VM whose
        // event file is watched, kept for the process's life) is not a
        // descriptor per VM: it exists before counting.
        assert!(vmcp::adapters::outbound::vmm::file_changes::FileChanges::shared().is_some());
        let before = open_fds();
        let started = Instant::now();
        let mut pids = Vec::new();
        for i in 0..20 {
            let vm = id(&format!("cycle{i}"));
            let (mut h, p) = env.create(&vm).await;
            assert_eq!(h.boot().await.unwrap().state, VmState::Running);
            wait_for_marker(&env.serial(&vm)).await;
            h.delete(false).await.unwrap();
            drop(h);
            pids.push((p.pid, p.start_time));
        }
        let elapsed = started.elapsed();
        for (pid, start) in &pids {
            assert!(!is_alive(*pid, *start), "VMM {pid} still runs");
        }
        assert_eq!(std::fs::read_dir(env.runtime_root()).unwrap().count(), 0, "runtime dirs left");
        // Pooled connections to exited VMMs close once their peer is gone;
        // give the connection tasks a moment to notice.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut after = open_fds();
        while after > before && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = open_fds();
        }
        assert!(after <= before, "fds leaked: {before} before, {after} after");
        eprintln!("real_ch 20 cycles create→boot→marker→delete: {elapsed:?} ({:?} each); fds {before} → {after}", elapsed / 20);
    });
}
