//! The Cloud Hypervisor adapter against the real `cloud-hypervisor` (v53)
//! and the tiny test guest (`make guest`). Each test runs when the binary
//! (VMCP_TEST_CH_BINARY or `cloud-hypervisor` on PATH), a read-write
//! /dev/kvm and the guest kernel (VMCP_TEST_GUEST_KERNEL or
//! .cache/guest/vmcp-test-guest.elf) exist, and otherwise prints one
//! `SKIPPED: <test>: <what is missing>` line. The states asserted here are
//! the ones the real VMM reports (e.g. `vm.shutdown` → Created).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::cloud_hypervisor::client::ChApi;
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::domain::{BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, VmConfig, VmId, VmState};
use vmcp::ports::{BackendEvent, Hypervisor, HypervisorError, ShutdownMode};

use super::real_env::{Real, Vmm, require};

const MIB: i64 = 1 << 20;
const MARKER: &str = "VMCP-GUEST-OK";

fn real(test: &str) -> Option<Real> {
    require(Vmm::CloudHypervisor, test)
}

struct Env {
    tmp: tempfile::TempDir,
    ch: CloudHypervisor,
    events: UnboundedReceiver<BackendEvent>,
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
        let ch = CloudHypervisor::new(
            &real.binary,
            tmp.path().join("run"),
            Duration::from_secs(10),
            tx,
        );
        Env {
            tmp,
            ch,
            events: rx,
            kernel: real.kernel,
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
    let (state, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    let create_time = t.elapsed();
    assert_eq!(state, VmState::Created);
    assert!(is_alive(p.pid, p.start_time));
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Created));
    assert_eq!(info.backend_info["vmm_version"], version);
    assert_eq!(info.backend_info["vmm_pid"], p.pid.to_string());
    assert_eq!(
        info.backend_info["memory_actual_size"],
        (64 * MIB).to_string()
    );

    let t = Instant::now();
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    let boot_call = t.elapsed();
    let marker = wait_for_marker(&env.serial(&vm)).await + boot_call;
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Running));
    assert!(info.metrics.memory_usage_bytes > 0);

    let t = Instant::now();
    for _ in 0..100 {
        env.ch.info(&vm).await.unwrap();
    }
    let info_avg = t.elapsed() / 100;
    let http = UdsClient::new(Duration::from_secs(5));
    let api = ChApi::new(&http, Path::new(&p.socket_path));
    let t = Instant::now();
    for _ in 0..100 {
        api.info().await.unwrap();
    }
    let raw_info_avg = t.elapsed() / 100;

    assert_eq!(env.ch.pause(&vm).await.unwrap(), VmState::Paused);
    // CH answers 500 with an error body: a state refusal.
    let again = env.ch.pause(&vm).await.unwrap_err();
    assert!(
        matches!(&again, HypervisorError::InvalidState(m) if m.contains("InvalidStateTransition(Paused, Paused)")),
        "{again:?}"
    );
    assert_eq!(env.ch.resume(&vm).await.unwrap(), VmState::Running);
    assert!(matches!(
        env.ch.resume(&vm).await,
        Err(HypervisorError::InvalidState(_))
    ));

    assert_eq!(env.ch.reboot(&vm, false).await.unwrap(), VmState::Running);
    // CH truncates the serial file on reboot; the guest prints again.
    wait_for_marker(&env.serial(&vm)).await;

    // The tiny guest has no ACPI: the power button does nothing, the
    // graceful attempt times out and the VM is stopped hard → Created.
    let t = Instant::now();
    let graceful = ShutdownMode {
        force: false,
        graceful_timeout: Duration::from_millis(800),
    };
    assert_eq!(
        env.ch.shutdown(&vm, graceful).await.unwrap(),
        VmState::Created
    );
    let graceful_time = t.elapsed();
    assert!(graceful_time >= Duration::from_millis(800));
    let not_running = env.ch.pause(&vm).await.unwrap_err();
    assert!(
        matches!(&not_running, HypervisorError::InvalidState(m) if m.contains("VM is not running")),
        "{not_running:?}"
    );

    // Bootable again after the hard stop.
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    wait_for_marker(&env.serial(&vm)).await;
    assert_eq!(env.ch.pause(&vm).await.unwrap(), VmState::Paused);
    assert_eq!(
        env.ch.shutdown(&vm, FORCE).await.unwrap(),
        VmState::Created,
        "vm.shutdown from Paused"
    );
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    assert_eq!(env.ch.shutdown(&vm, FORCE).await.unwrap(), VmState::Created);
    assert!(matches!(
        env.ch.shutdown(&vm, FORCE).await,
        Err(HypervisorError::InvalidState(_))
    ));

    let t = Instant::now();
    env.ch.delete(&vm, false).await.unwrap();
    let delete_time = t.elapsed();
    assert!(!is_alive(p.pid, p.start_time));
    assert!(!env.runtime_root().join("life").exists());
    assert!(env.events.try_recv().is_err(), "nothing happened unasked");
    eprintln!(
        "real_ch lifecycle: version {version}; create {create_time:?}; boot call {boot_call:?}; \
         boot→marker {marker:?}; adapter info avg {info_avg:?} (vm.info+vm.counters+/proc), raw vm.info avg {raw_info_avg:?}; graceful(800ms)→hard {graceful_time:?}; delete {delete_time:?}"
    );
}

#[tokio::test]
async fn real_ch_kill_9_is_failed_with_a_reason_within_a_second() {
    let Some(real) = real("real_ch_kill_9_is_failed_with_a_reason_within_a_second") else {
        return;
    };
    let mut env = Env::new(real);
    let vm = id("kill9");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    wait_for_marker(&env.serial(&vm)).await;
    let killed = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(p.pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let BackendEvent::Exited {
        vm_id,
        state,
        reason,
    } = tokio::time::timeout(Duration::from_secs(1), env.events.recv())
        .await
        .expect("Exited within a second")
        .unwrap();
    let noticed = killed.elapsed();
    assert_eq!(vm_id, vm);
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Failed));
    // SIGKILL leaves CH's socket behind; delete removes it with the directory.
    env.ch.delete(&vm, false).await.unwrap();
    assert!(!env.runtime_root().join("kill9").exists());
    eprintln!("real_ch kill -9 noticed after {noticed:?}");
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
            let (s, p) = env.ch.create(&vm, &env.config()).await.unwrap();
            assert_eq!(s, VmState::Created);
            assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
            wait_for_marker(&env.serial(&vm)).await;
            assert_eq!(env.ch.pause(&vm).await.unwrap(), VmState::Paused);
            assert_eq!(env.ch.resume(&vm).await.unwrap(), VmState::Running);
            assert_eq!(
                env.ch.info(&vm).await.unwrap().state,
                Some(VmState::Running)
            );
            assert_eq!(env.ch.shutdown(&vm, FORCE).await.unwrap(), VmState::Created);
            env.ch.delete(&vm, false).await.unwrap();
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
        let before = open_fds();
        let started = Instant::now();
        let mut pids = Vec::new();
        for i in 0..20 {
            let vm = id(&format!("cycle{i}"));
            let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
            assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
            wait_for_marker(&env.serial(&vm)).await;
            env.ch.delete(&vm, false).await.unwrap();
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
