//! The Cloud Hypervisor adapter against the fake CH (tests/it/fake_ch.rs):
//! the REST client over a real Unix socket with every failure class, and the
//! `CloudHypervisor` backend spawning the fake as its VMM process through
//! every operation, crash, hang, refusal and clean-up path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::cloud_hypervisor::client::ChApi;
use vmcp::adapters::outbound::cloud_hypervisor::config::{ChVmConfig, ConsoleDefaults, to_ch};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::{is_alive, read_start_time};
use vmcp::domain::{
    BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, NetworkInterface, StorageDevice, VmConfig,
    VmId, VmState,
};
use vmcp::ports::{BackendEvent, Hypervisor, HypervisorError, ShutdownMode, VmmProcess};

use crate::fake_ch::{Acpi, Behaviour, FakeCh, install};

const MIB: i64 = 1 << 20;

fn id(s: &str) -> VmId {
    VmId::parse(s).unwrap()
}

/// A valid config whose kernel exists (the fake checks it on boot).
fn config(dir: &Path) -> VmConfig {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    VmConfig {
        cpu: CpuConfig {
            vcpu_count: 1,
            max_vcpu_count: 2,
            ..Default::default()
        },
        memory: MemoryConfig {
            size_bytes: 128 * MIB,
            ..Default::default()
        },
        boot: BootConfig {
            kernel_path: kernel.to_string_lossy().into_owned(),
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

fn ch_config(dir: &Path) -> ChVmConfig {
    to_ch(
        &config(dir),
        &ConsoleDefaults {
            serial_file: dir.join("serial.log").to_string_lossy().into_owned(),
        },
    )
    .unwrap()
}

fn graceful(ms: u64) -> ShutdownMode {
    ShutdownMode {
        force: false,
        graceful_timeout: Duration::from_millis(ms),
    }
}

const FORCE: ShutdownMode = ShutdownMode {
    force: true,
    graceful_timeout: Duration::ZERO,
};

// ---------------------------------------------------------------- client

#[tokio::test]
async fn client_drives_the_fake_and_reuses_one_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let fake = FakeCh::start(&sock, Behaviour::default());
    let http = UdsClient::new(Duration::from_secs(2));
    let api = ChApi::new(&http, &sock);
    assert_eq!(
        api.ping(Duration::from_secs(1)).await.unwrap().version,
        "53.0.0"
    );
    api.create(&ch_config(tmp.path())).await.unwrap();
    assert_eq!(api.state().await.unwrap(), VmState::Created);
    api.boot().await.unwrap();
    assert_eq!(api.state().await.unwrap(), VmState::Running);
    api.pause().await.unwrap();
    assert_eq!(api.state().await.unwrap(), VmState::Paused);
    api.resume().await.unwrap();
    api.reboot().await.unwrap();
    api.shutdown().await.unwrap();
    assert_eq!(
        api.state().await.unwrap(),
        VmState::Created,
        "CH v53: vm.shutdown → Created"
    );
    api.delete().await.unwrap();
    assert_eq!(fake.state.lock().unwrap().connections, 1);
    assert_eq!(
        fake.calls(),
        [
            "GET vmm.ping",
            "PUT vm.create",
            "GET vm.info",
            "PUT vm.boot",
            "GET vm.info",
            "PUT vm.pause",
            "GET vm.info",
            "PUT vm.resume",
            "PUT vm.reboot",
            "PUT vm.shutdown",
            "GET vm.info",
            "PUT vm.delete",
        ]
    );
}

#[tokio::test]
async fn client_maps_ch_error_bodies_to_invalid_state() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let _fake = FakeCh::start(&sock, Behaviour::default());
    let http = UdsClient::new(Duration::from_secs(2));
    let api = ChApi::new(&http, &sock);
    // 404: no VM created.
    assert_eq!(
        api.boot().await,
        Err(HypervisorError::InvalidState(
            "vm.boot: The VM could not boot: VM config is missing".into()
        ))
    );
    api.create(&ch_config(tmp.path())).await.unwrap();
    // 500: the state forbids it.
    assert_eq!(
        api.pause().await,
        Err(HypervisorError::InvalidState(
            "vm.pause: The VM could not be paused: VM is not running".into()
        ))
    );
    assert!(matches!(
        api.counters().await,
        Err(HypervisorError::InvalidState(_))
    ));
    // A second create is a state refusal, not a config problem.
    assert!(matches!(
        api.create(&ch_config(tmp.path())).await,
        Err(HypervisorError::InvalidState(m)) if m.contains("already created")
    ));
}

#[tokio::test]
async fn client_create_rejection_is_invalid_config() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let mut b = Behaviour::default();
    b.answer.insert(
        "vm.create".into(),
        (
            500,
            r#"["Error from API","The VM could not be created","Invalid memory size"]"#.into(),
        ),
    );
    let _fake = FakeCh::start(&sock, b);
    let http = UdsClient::new(Duration::from_secs(2));
    let err = ChApi::new(&http, &sock)
        .create(&ch_config(tmp.path()))
        .await
        .unwrap_err();
    let HypervisorError::InvalidConfig(e) = err else {
        panic!("expected InvalidConfig, got {err:?}");
    };
    assert_eq!(e.field, "config");
    assert!(
        e.reason.contains("cloudhypervisor") && e.reason.contains("Invalid memory size"),
        "{e}"
    );
}

#[tokio::test]
async fn client_refused_connection_is_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    // What a SIGKILLed VMM leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let http = UdsClient::new(Duration::from_secs(2));
    let err = ChApi::new(&http, &sock).state().await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Unavailable(m) if m.contains("unreachable")),
        "{err:?}"
    );
    let missing = ChApi::new(&http, &tmp.path().join("gone.sock"))
        .state()
        .await
        .unwrap_err();
    assert!(
        matches!(missing, HypervisorError::Unavailable(_)),
        "{missing:?}"
    );
}

#[tokio::test]
async fn client_hung_socket_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let _fake = FakeCh::start(
        &sock,
        Behaviour {
            hang_on: vec!["vm.info".into()],
            ..Default::default()
        },
    );
    let http = UdsClient::new(Duration::from_millis(150));
    let started = Instant::now();
    let err = ChApi::new(&http, &sock).info().await.unwrap_err();
    assert_eq!(
        err,
        HypervisorError::Timeout {
            operation: "GET /api/v1/vm.info".into(),
            after: Duration::from_millis(150)
        }
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn client_connection_dropped_mid_call_is_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let _fake = FakeCh::start(
        &sock,
        Behaviour {
            exit_on: Some(("vm.pause".into(), 1)),
            ..Default::default()
        },
    );
    let http = UdsClient::new(Duration::from_secs(2));
    let api = ChApi::new(&http, &sock);
    api.create(&ch_config(tmp.path())).await.unwrap();
    let err = api.pause().await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Unavailable(m) if m.contains("closed during PUT /api/v1/vm.pause")),
        "{err:?}"
    );
    // The client recovers on a fresh connection.
    assert_eq!(api.state().await.unwrap(), VmState::Created);
}

// ---------------------------------------------------------------- adapter

/// A backend whose `cloud-hypervisor` is the fake, with its runtime root
/// and event receiver in a temp dir.
struct Env {
    tmp: tempfile::TempDir,
    ch: CloudHypervisor,
    events: UnboundedReceiver<BackendEvent>,
    pid_files: PathBuf,
}

impl Env {
    fn new(b: Behaviour) -> Env {
        Self::with_timeout(b, Duration::from_secs(2))
    }

    fn with_timeout(mut b: Behaviour, timeout: Duration) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let pid_files = tmp.path().join("pids");
        std::fs::create_dir_all(&pid_files).unwrap();
        b.pid_dir = Some(pid_files.to_string_lossy().into_owned());
        let bin = install(&tmp.path().join("bin"), &b);
        let (tx, rx) = unbounded_channel();
        let ch = CloudHypervisor::new(bin, tmp.path().join("run"), timeout, tx)
            .with_ready_timeout(Duration::from_secs(10))
            .with_stop_grace(Duration::from_secs(2));
        Env {
            tmp,
            ch,
            events: rx,
            pid_files,
        }
    }

    fn config(&self) -> VmConfig {
        config(self.tmp.path())
    }

    fn runtime_dir(&self, vm: &str) -> PathBuf {
        self.tmp.path().join("run").join(vm)
    }

    /// Every pid a fake VMM of this env ever had.
    fn all_pids(&self) -> Vec<(u32, u64)> {
        std::fs::read_dir(&self.pid_files)
            .unwrap()
            .map(|e| {
                let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                let (pid, start) = text.trim().split_once(' ').unwrap();
                (pid.parse().unwrap(), start.parse().unwrap())
            })
            .collect()
    }

    fn assert_no_fake_alive(&self) {
        for (pid, start) in self.all_pids() {
            assert!(!is_alive(pid, start), "fake VMM {pid} still runs");
        }
    }

    async fn next_event(&mut self) -> BackendEvent {
        tokio::time::timeout(Duration::from_secs(1), self.events.recv())
            .await
            .expect("an event within a second")
            .expect("event channel open")
    }
}

#[tokio::test]
async fn check_reports_the_version_and_names_what_is_missing() {
    let env = Env::new(Behaviour::default());
    let fake_kvm = env.tmp.path().join("kvm");
    std::fs::write(&fake_kvm, b"").unwrap();
    let (tx, _rx) = unbounded_channel();
    let bin = env.tmp.path().join("bin/cloud-hypervisor");
    let ok = CloudHypervisor::new(
        &bin,
        env.tmp.path().join("run"),
        Duration::from_secs(1),
        tx.clone(),
    )
    .with_kvm_device(&fake_kvm);
    assert_eq!(ok.check().await.unwrap().version, "v53.0-fake");

    let no_kvm = CloudHypervisor::new(
        &bin,
        env.tmp.path().join("run"),
        Duration::from_secs(1),
        tx.clone(),
    )
    .with_kvm_device(env.tmp.path().join("no-kvm"));
    let err = no_kvm.check().await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Unavailable(m) if m.contains("no-kvm")),
        "{err:?}"
    );

    let ro_kvm = env.tmp.path().join("ro-kvm");
    std::fs::write(&ro_kvm, b"").unwrap();
    std::fs::set_permissions(&ro_kvm, std::fs::Permissions::from_mode(0o400)).unwrap();
    let euid_is_root = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro_kvm)
        .is_ok();
    if !euid_is_root {
        let err = CloudHypervisor::new(
            &bin,
            env.tmp.path().join("run"),
            Duration::from_secs(1),
            tx.clone(),
        )
        .with_kvm_device(&ro_kvm)
        .check()
        .await
        .unwrap_err();
        assert!(
            matches!(&err, HypervisorError::Unavailable(m) if m.contains("read-write")),
            "{err:?}"
        );
    }

    let missing = env.tmp.path().join("no-such-cloud-hypervisor");
    let err = CloudHypervisor::new(
        &missing,
        env.tmp.path().join("run"),
        Duration::from_secs(1),
        tx,
    )
    .check()
    .await
    .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Unavailable(m) if m.contains("no-such-cloud-hypervisor")),
        "{err:?}"
    );
}

#[tokio::test]
async fn every_operation_reports_the_state_the_vmm_reports() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("life");
    let mut cfg = env.config();
    cfg.storage = vec![StorageDevice {
        id: "root".into(),
        path: "/dev/null".into(),
        is_root_device: true,
        ..Default::default()
    }];
    cfg.network = vec![NetworkInterface {
        id: "eth0".into(),
        tap_device: "tap-life".into(),
        ..Default::default()
    }];
    cfg.metadata.insert("owner".into(), "tests".into());

    let (state, process) = env.ch.create(&vm, &cfg).await.unwrap();
    assert_eq!(state, VmState::Created);
    assert!(is_alive(process.pid, process.start_time));
    assert_eq!(read_start_time(process.pid).unwrap(), process.start_time);
    let dir = env.runtime_dir("life");
    assert_eq!(Path::new(&process.socket_path), dir.join("api.sock"));
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("vmm.pid")).unwrap().trim(),
        process.pid.to_string()
    );

    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Created));
    assert_eq!(info.backend_info["vmm_version"], "v53.0-fake");
    assert_eq!(info.backend_info["vmm_pid"], process.pid.to_string());
    assert_eq!(info.backend_info["api_socket"], process.socket_path);
    assert_eq!(
        info.backend_info["serial_output"],
        dir.join("serial.log").to_string_lossy()
    );
    assert!(info.metrics.memory_usage_bytes > 0, "RSS from /proc");

    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    assert_eq!(
        std::fs::read_to_string(dir.join("serial.log")).unwrap(),
        "VMCP-GUEST-OK\n"
    );
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Running));
    assert_eq!(info.metrics.storage.bytes_read, 4096);
    assert_eq!(info.metrics.storage.write_operations, 1);
    assert_eq!(info.metrics.network.bytes_transmitted, 2000);
    assert_eq!(info.metrics.network.packets_received, 10);

    assert!(
        matches!(env.ch.boot(&vm).await, Err(HypervisorError::InvalidState(m)) if m.contains("already created"))
    );
    assert_eq!(env.ch.pause(&vm).await.unwrap(), VmState::Paused);
    assert!(
        matches!(env.ch.pause(&vm).await, Err(HypervisorError::InvalidState(m)) if m.contains("InvalidStateTransition(Paused, Paused)"))
    );
    assert_eq!(env.ch.resume(&vm).await.unwrap(), VmState::Running);
    assert!(matches!(
        env.ch.resume(&vm).await,
        Err(HypervisorError::InvalidState(_))
    ));
    assert_eq!(env.ch.reboot(&vm, false).await.unwrap(), VmState::Running);
    assert_eq!(env.ch.reboot(&vm, true).await.unwrap(), VmState::Running);
    assert_eq!(env.ch.shutdown(&vm, FORCE).await.unwrap(), VmState::Created);
    assert!(
        matches!(env.ch.pause(&vm).await, Err(HypervisorError::InvalidState(m)) if m.contains("not running"))
    );
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);

    // The fake guest ignores the power button (like the tiny guest): the
    // graceful attempt times out and the VM is stopped hard.
    let started = Instant::now();
    assert_eq!(
        env.ch.shutdown(&vm, graceful(300)).await.unwrap(),
        VmState::Created
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        env.ch.shutdown(&vm, graceful(300)).await,
        Err(HypervisorError::InvalidState(_))
    ));

    env.ch.delete(&vm, false).await.unwrap();
    assert!(!dir.exists());
    assert!(!is_alive(process.pid, process.start_time));
    assert!(matches!(
        env.ch.info(&vm).await,
        Err(HypervisorError::NotFound(_))
    ));
    env.ch.delete(&vm, false).await.unwrap();
    assert!(env.events.try_recv().is_err(), "nothing happened unasked");
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_of_an_acpi_guest_is_a_clean_exit_and_it_boots_again() {
    let mut env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("acpi");
    let (_, first) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    let started = Instant::now();
    assert_eq!(
        env.ch.shutdown(&vm, graceful(5000)).await.unwrap(),
        VmState::Shutdown
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for the timeout"
    );
    assert!(!is_alive(first.pid, first.start_time));
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Shutdown));
    assert_eq!(info.backend_info["vmm_exit"], "exited with status 0");
    assert!(
        env.events.try_recv().is_err(),
        "a requested poweroff is no event"
    );

    // Booting a powered-off VM respawns its VMM with the same config.
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    let info = env.ch.info(&vm).await.unwrap();
    assert_ne!(info.backend_info["vmm_pid"], first.pid.to_string());
    env.ch.delete(&vm, false).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_sees_a_reported_shutdown_state() {
    let env = Env::new(Behaviour {
        acpi: Acpi::ReportShutdown,
        ..Default::default()
    });
    let vm = id("acpi-report");
    env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    assert_eq!(
        env.ch.shutdown(&vm, graceful(5000)).await.unwrap(),
        VmState::Shutdown
    );
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    env.ch.delete(&vm, true).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_of_a_paused_vm_stops_it_hard() {
    let env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("paused-stop");
    env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    env.ch.pause(&vm).await.unwrap();
    let started = Instant::now();
    assert_eq!(
        env.ch.shutdown(&vm, graceful(5000)).await.unwrap(),
        VmState::Created
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    env.ch.delete(&vm, false).await.unwrap();
}

#[tokio::test]
async fn a_guest_poweroff_nobody_asked_for_is_reported_as_shutdown() {
    let mut env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("self-off");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    // The guest powers itself off (here: someone presses the button directly).
    let http = UdsClient::new(Duration::from_secs(1));
    ChApi::new(&http, Path::new(&p.socket_path))
        .power_button()
        .await
        .unwrap();
    let BackendEvent::Exited {
        vm_id,
        state,
        reason,
    } = env.next_event().await;
    assert_eq!(vm_id, vm);
    assert_eq!(state, VmState::Shutdown);
    assert!(reason.contains("exited with status 0"), "{reason}");
    assert_eq!(
        env.ch.info(&vm).await.unwrap().state,
        Some(VmState::Shutdown)
    );
    env.ch.delete(&vm, false).await.unwrap();
    assert!(!env.runtime_dir("self-off").exists());
}

#[tokio::test]
async fn a_killed_vmm_is_reported_failed_within_a_second() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("victim");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
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
    } = env.next_event().await;
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert_eq!(vm_id, vm);
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    assert!(
        reason.contains("fake cloud-hypervisor: pid"),
        "log tail: {reason}"
    );
    let info = env.ch.info(&vm).await.unwrap();
    assert_eq!(info.state, Some(VmState::Failed));
    assert!(info.reason.contains("SIGKILL"));
    assert!(
        matches!(env.ch.boot(&vm).await, Err(HypervisorError::Unavailable(m)) if m.contains("SIGKILL"))
    );
    assert!(matches!(
        env.ch.pause(&vm).await,
        Err(HypervisorError::Unavailable(_))
    ));
    env.ch.delete(&vm, false).await.unwrap();
    assert!(!env.runtime_dir("victim").exists());
    assert!(env.events.try_recv().is_err());
}

#[tokio::test]
async fn a_vmm_dying_mid_call_is_unavailable_with_its_exit_and_reported() {
    let mut env = Env::new(Behaviour {
        exit_on: Some(("vm.pause".into(), 3)),
        ..Default::default()
    });
    let vm = id("midcall");
    env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    let err = env.ch.pause(&vm).await.unwrap_err();
    let HypervisorError::Unavailable(msg) = err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(msg.contains("exited with status 3"), "{msg}");
    assert!(msg.contains("dying on vm.pause"), "{msg}");
    let BackendEvent::Exited { state, .. } = env.next_event().await;
    assert_eq!(state, VmState::Failed);
    env.ch.delete(&vm, false).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn a_hung_vmm_times_out_and_force_delete_still_cleans_up() {
    let env = Env::with_timeout(
        Behaviour {
            hang_on: vec!["vm.info".into(), "vm.delete".into(), "vmm.shutdown".into()],
            ..Default::default()
        },
        Duration::from_millis(300),
    );
    let vm = id("hung");
    // create reads vm.info back, which hangs: a timeout, and nothing is left.
    let started = Instant::now();
    let err = env.ch.create(&vm, &env.config()).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        err,
        HypervisorError::Timeout {
            operation: "GET /api/v1/vm.info".into(),
            after: Duration::from_millis(300)
        }
    );
    assert!(!env.runtime_dir("hung").exists());
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn a_hung_vmm_is_killed_by_delete_after_the_grace_period() {
    let env = Env::with_timeout(
        Behaviour {
            hang_on: vec!["vm.pause".into(), "vm.delete".into(), "vmm.shutdown".into()],
            ..Default::default()
        },
        Duration::from_millis(200),
    );
    let vm = id("stuck");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    assert!(matches!(
        env.ch.pause(&vm).await,
        Err(HypervisorError::Timeout { .. })
    ));
    let started = Instant::now();
    env.ch.delete(&vm, false).await.unwrap();
    // Two timed-out calls, the 2 s grace, then SIGTERM takes it down.
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(!is_alive(p.pid, p.start_time));
    assert!(!env.runtime_dir("stuck").exists());
}

#[tokio::test]
async fn a_refusing_socket_of_a_live_vmm_is_unavailable() {
    let env = Env::new(Behaviour {
        stop_listening_after: Some("vm.boot".into()),
        ..Default::default()
    });
    let vm = id("deaf");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    // A fresh client has no pooled connection to the old listener.
    let http = UdsClient::new(Duration::from_secs(1));
    let refused = ChApi::new(&http, Path::new(&p.socket_path))
        .state()
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, HypervisorError::Unavailable(m) if m.contains("unreachable")),
        "{refused:?}"
    );
    env.ch.delete(&vm, false).await.unwrap();
    assert!(!is_alive(p.pid, p.start_time));
}

#[tokio::test]
async fn a_vmm_that_fails_to_start_leaves_nothing_and_quotes_its_log() {
    let env = Env::new(Behaviour {
        fail_at_start: Some(1),
        ..Default::default()
    });
    let vm = id("nostart");
    let err = env.ch.create(&vm, &env.config()).await.unwrap_err();
    let HypervisorError::SpawnFailed(msg) = err else {
        panic!("expected SpawnFailed, got {err:?}");
    };
    assert!(
        msg.contains("exited during start-up: exited with status 1"),
        "{msg}"
    );
    assert!(msg.contains("refusing to start (injected fault)"), "{msg}");
    assert!(!env.runtime_dir("nostart").exists());
    assert!(matches!(
        env.ch.info(&vm).await,
        Err(HypervisorError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_vmm_that_never_listens_is_killed_at_the_deadline() {
    let mut env = Env::new(Behaviour {
        never_listen: true,
        ..Default::default()
    });
    env.ch = CloudHypervisor::new(
        env.tmp.path().join("bin/cloud-hypervisor"),
        env.tmp.path().join("run"),
        Duration::from_secs(1),
        unbounded_channel().0,
    )
    .with_ready_timeout(Duration::from_millis(1500));
    let vm = id("mute");
    let started = Instant::now();
    let err = env.ch.create(&vm, &env.config()).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        matches!(&err, HypervisorError::SpawnFailed(m) if m.contains("did not become ready")),
        "{err:?}"
    );
    assert!(!env.runtime_dir("mute").exists());
    assert_eq!(env.all_pids().len(), 1);
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn a_config_the_vmm_rejects_is_invalid_config_and_leaves_nothing() {
    let mut b = Behaviour::default();
    b.answer.insert(
        "vm.create".into(),
        (
            500,
            r#"["Error from API","The VM could not be created","Invalid topology"]"#.into(),
        ),
    );
    let env = Env::new(b);
    let vm = id("badcfg");
    let err = env.ch.create(&vm, &env.config()).await.unwrap_err();
    assert!(
        matches!(&err, HypervisorError::InvalidConfig(e) if e.reason.contains("Invalid topology")),
        "{err:?}"
    );
    assert!(!env.runtime_dir("badcfg").exists());
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn fields_cloud_hypervisor_cannot_honour_are_rejected_before_spawning() {
    let env = Env::new(Behaviour::default());
    let mut cfg = env.config();
    cfg.cpu.features.insert("amx".into(), "on".into());
    let e = env.ch.validate(&cfg).unwrap_err();
    assert_eq!(e.field, "config.cpu.features");
    assert!(e.reason.contains("not supported by cloudhypervisor"));
    let err = env.ch.create(&id("feat"), &cfg).await.unwrap_err();
    assert_eq!(err, HypervisorError::InvalidConfig(e));
    assert!(env.all_pids().is_empty(), "no VMM was started");
    assert!(!env.runtime_dir("feat").exists());
    assert_eq!(env.ch.validate(&env.config()), Ok(()));
}

#[tokio::test]
async fn stale_socket_and_lock_are_cleaned_before_spawning() {
    let env = Env::new(Behaviour::default());
    let dir = env.runtime_dir("stale");
    std::fs::create_dir_all(&dir).unwrap();
    drop(std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap());
    std::fs::write(dir.join("api.sock.lock"), b"").unwrap();
    let vm = id("stale");
    assert_eq!(
        env.ch.create(&vm, &env.config()).await.unwrap().0,
        VmState::Created
    );
    assert!(!dir.join("api.sock.lock").exists());
    env.ch.delete(&vm, true).await.unwrap();
}

#[tokio::test]
async fn delete_of_an_unknown_vm_succeeds_and_removes_leftovers() {
    let env = Env::new(Behaviour::default());
    let dir = env.runtime_dir("ghost");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("vmm.log"), b"old").unwrap();
    env.ch.delete(&id("ghost"), false).await.unwrap();
    assert!(!dir.exists());
    env.ch.delete(&id("ghost"), true).await.unwrap();
}

#[tokio::test]
async fn force_delete_kills_at_once_without_an_event() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("forced");
    let (_, p) = env.ch.create(&vm, &env.config()).await.unwrap();
    env.ch.boot(&vm).await.unwrap();
    env.ch.delete(&vm, true).await.unwrap();
    assert!(!is_alive(p.pid, p.start_time));
    assert!(!env.runtime_dir("forced").exists());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        env.events.try_recv().is_err(),
        "an exit we caused is no event"
    );
    assert!(env.ch.vm_ids().is_empty());
}

#[tokio::test]
async fn a_restarted_backend_adopts_a_surviving_vmm() {
    let env = Env::new(Behaviour::default());
    let vm = id("survivor");
    let cfg = env.config();
    let (_, p) = env.ch.create(&vm, &cfg).await.unwrap();
    env.ch.boot(&vm).await.unwrap();

    // A second backend over the same runtime root plays the restarted VMCP.
    let (tx, mut events) = unbounded_channel();
    let restarted = CloudHypervisor::new(
        env.tmp.path().join("bin/cloud-hypervisor"),
        env.tmp.path().join("run"),
        Duration::from_secs(2),
        tx,
    );
    let wrong = VmmProcess {
        start_time: p.start_time + 1,
        ..p.clone()
    };
    assert!(matches!(
        restarted.adopt(&vm, &cfg, Some(wrong.clone())).await,
        Err(HypervisorError::NotFound(_))
    ));
    assert_eq!(
        restarted.adopt(&vm, &cfg, Some(p.clone())).await.unwrap(),
        VmState::Running
    );
    assert_eq!(restarted.pause(&vm).await.unwrap(), VmState::Paused);
    assert_eq!(
        restarted.info(&vm).await.unwrap().state,
        Some(VmState::Paused)
    );

    // Its exit is noticed although it is not the new backend's child.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(p.pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let BackendEvent::Exited { state, reason, .. } =
        tokio::time::timeout(Duration::from_secs(1), events.recv())
            .await
            .expect("event within a second")
            .unwrap();
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("status unknown"), "{reason}");
    restarted.delete(&vm, false).await.unwrap();
    assert!(!env.runtime_dir("survivor").exists());
    assert!(matches!(
        restarted.adopt(&vm, &cfg, Some(p.clone())).await,
        Err(HypervisorError::NotFound(_))
    ));
}

#[tokio::test]
async fn eight_vms_are_driven_concurrently() {
    let env = Env::new(Behaviour::default());
    let cfg = env.config();
    let ch = &env.ch;
    let runs = (0..8).map(|i| {
        let cfg = cfg.clone();
        async move {
            let vm = id(&format!("par{i}"));
            let (s, _) = ch.create(&vm, &cfg).await?;
            assert_eq!(s, VmState::Created);
            assert_eq!(ch.boot(&vm).await?, VmState::Running);
            assert_eq!(ch.pause(&vm).await?, VmState::Paused);
            assert_eq!(ch.resume(&vm).await?, VmState::Running);
            assert_eq!(ch.shutdown(&vm, FORCE).await?, VmState::Created);
            ch.delete(&vm, false).await?;
            Ok::<_, HypervisorError>(())
        }
    });
    for r in futures_join_all(runs).await {
        r.unwrap();
    }
    assert_eq!(env.all_pids().len(), 8);
    env.assert_no_fake_alive();
    assert_eq!(
        std::fs::read_dir(env.tmp.path().join("run"))
            .unwrap()
            .count(),
        0
    );
}

/// Runs futures concurrently on this task (no extra crate needed).
async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn a_vmm_listening_elsewhere_is_discovered_adopted_and_cleaned_up() {
    let env = Env::new(Behaviour::default());
    // A VMM VMCP did not start, e.g. at the seed's single endpoint.
    let ext = env.tmp.path().join("ext");
    std::fs::create_dir_all(&ext).unwrap();
    let socket = ext.join("ch.sock");
    let mut child = std::process::Command::new(env.tmp.path().join("bin/cloud-hypervisor"))
        .arg("--api-socket")
        .arg(format!("path={}", socket.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = UdsClient::new(Duration::from_secs(1));
    let api = ChApi::new(&http, &socket);
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.ping(Duration::from_millis(200)).await.is_err() {
        assert!(Instant::now() < deadline, "external fake never answered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cfg = env.config();
    api.create(&ch_config(env.tmp.path())).await.unwrap();

    let process = env.ch.probe_endpoint(&socket).await.unwrap();
    assert_eq!(process.pid, child.id());
    assert_eq!(process.socket_path, socket.to_string_lossy());
    let vm = id("seed");
    assert_eq!(
        env.ch
            .adopt(&vm, &cfg, Some(process.clone()))
            .await
            .unwrap(),
        VmState::Created
    );
    assert_eq!(env.ch.boot(&vm).await.unwrap(), VmState::Running);
    assert_eq!(
        env.ch.info(&vm).await.unwrap().backend_info["api_socket"],
        socket.to_string_lossy()
    );
    env.ch.delete(&vm, false).await.unwrap();
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "vmm.shutdown ended it"
    );
    assert!(!socket.exists());
    assert!(!env.runtime_dir("seed").exists());
    assert!(matches!(
        env.ch.probe_endpoint(&socket).await,
        Err(HypervisorError::Unavailable(_))
    ));
}
