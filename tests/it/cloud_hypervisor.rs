//! The Cloud Hypervisor adapter against the fake CH (tests/it/fake_ch.rs):
//! the REST client over a real Unix socket with every failure class, and the
//! `CloudHypervisor` backend spawning the fake as its VMM process and
//! driving it through the VM's handle: every operation, crash, hang,
//! refusal and clean-up path, a VMM replaced by boot after the guest powered
//! off (new pid, adoptable after a restart, gone after delete), exit events
//! naming their pid, and the event monitor reporting a pause made directly
//! on the VMM's socket.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use vmcp::adapters::outbound::cloud_hypervisor::client::ChApi;
use vmcp::adapters::outbound::cloud_hypervisor::config::{ChVmConfig, ConsoleDefaults, to_ch};
use vmcp::adapters::outbound::cloud_hypervisor::{ChVm, CloudHypervisor};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::{is_alive, read_start_time};
use vmcp::domain::{
    BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, NetworkInterface, StorageDevice, VmConfig,
    VmId, VmSize, VmState,
};
use vmcp::ports::{
    Hypervisor, HypervisorError, Reported, ShutdownMode, VmmEvent, VmmHandle, VmmProcess,
};

use crate::fake_ch::{Acpi, Behaviour, FakeCh, install};
use crate::real_env::{error_chain, kill9};

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
    assert!(matches!(
        api.boot().await,
        Err(HypervisorError::InvalidState(m)) if m == "vm.boot: The VM could not boot: VM config is missing"
    ));
    api.create(&ch_config(tmp.path())).await.unwrap();
    // 500: the state forbids it.
    assert!(matches!(
        api.pause().await,
        Err(HypervisorError::InvalidState(m)) if m == "vm.pause: The VM could not be paused: VM is not running"
    ));
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
        matches!(&err, HypervisorError::Unavailable { message, source: Some(_) } if message.contains("unreachable")),
        "{err:?}"
    );
    // The transport error is the source, with the socket it could not reach.
    assert!(
        error_chain(&err).contains(&sock.display().to_string()),
        "{}",
        error_chain(&err)
    );
    let missing = ChApi::new(&http, &tmp.path().join("gone.sock"))
        .state()
        .await
        .unwrap_err();
    assert!(
        matches!(missing, HypervisorError::Unavailable { .. }),
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
    assert!(
        matches!(&err, HypervisorError::Timeout { operation, after }
            if operation == "GET /api/v1/vm.info" && *after == Duration::from_millis(150)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // CH's API thread serves one request at a time: while one hangs, nothing
    // else is answered, on any connection.
    let err = ChApi::new(&UdsClient::new(Duration::from_millis(150)), &sock)
        .ping(Duration::from_millis(150))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Timeout { operation, .. } if operation == "GET /api/v1/vmm.ping"),
        "{err:?}"
    );
}

#[tokio::test]
async fn client_one_request_at_a_time_and_a_slow_answer_is_still_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("api.sock");
    let fake = FakeCh::start(
        &sock,
        Behaviour {
            slow: [("vm.boot".to_owned(), 700)].into(),
            ..Default::default()
        },
    );
    let http = UdsClient::new(Duration::from_millis(500));
    let api = ChApi::new(&http, &sock);
    api.create(&ch_config(tmp.path())).await.unwrap();
    let sent = Instant::now();
    // The client gives up at 500 ms; the VMM booted and answers later.
    let err = api.boot().await.unwrap_err();
    assert!(matches!(err, HypervisorError::Timeout { .. }), "{err:?}");
    // The next request waits for the slow one's turn to end, then sees it applied.
    let state = api.state().await.unwrap();
    assert!(
        sent.elapsed() >= Duration::from_millis(700),
        "answered before the slow request's turn ended: {:?}",
        sent.elapsed()
    );
    assert_eq!(state, VmState::Running);
    assert_eq!(
        fake.calls(),
        ["PUT vm.create", "PUT vm.boot", "GET vm.info"],
        "one at a time, in order"
    );
}

/// A fake run the way VMCP runs a VMM, by a parent that then dies (a
/// crashed VMCP): it goes with its parent unless told to outlive it, as a
/// real VMM does.
#[tokio::test]
async fn a_fake_vmm_dies_with_its_parent_unless_told_to_outlive_it() {
    for outlive_parent in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let bin = install(
            &tmp.path().join("bin"),
            &Behaviour {
                outlive_parent,
                ..Default::default()
            },
        );
        let sock = tmp.path().join("api.sock");
        let (parent, pid) = crate::real_env::parent_of(&format!(
            "'{}' --api-socket path={}",
            bin.display(),
            sock.display()
        ));
        let http = UdsClient::new(Duration::from_millis(500));
        let api = ChApi::new(&http, &sock);
        // Serving (so its own arrangements are made), then its parent dies.
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.ping(Duration::from_millis(200)).await.is_err() {
            assert!(Instant::now() < deadline, "the fake never answered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        parent.end();
        if outlive_parent {
            // Its parent is gone; it answers all the same.
            assert_eq!(
                api.ping(Duration::from_secs(1)).await.unwrap().pid,
                Some(pid.into())
            );
            kill9(pid);
        } else {
            let gone = crate::harness::eventually(Duration::from_secs(5), || async {
                read_start_time(pid).is_err()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            })
            .await;
            assert!(gone, "the fake {pid} outlived its parent");
        }
    }
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
        matches!(&err, HypervisorError::Unavailable { message, .. }
            if message.contains("closed its API connection during PUT /api/v1/vm.pause")),
        "{err:?}"
    );
    // The client recovers on a fresh connection.
    assert_eq!(api.state().await.unwrap(), VmState::Created);
}

// ---------------------------------------------------------------- adapter

/// A backend whose `cloud-hypervisor` is the fake, with its runtime root in
/// a temp dir and the owner's event channel for the VMs it creates.
struct Env {
    tmp: tempfile::TempDir,
    ch: CloudHypervisor,
    tx: UnboundedSender<VmmEvent>,
    events: UnboundedReceiver<VmmEvent>,
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
        install(&tmp.path().join("bin"), &b);
        let (tx, events) = unbounded_channel();
        Env {
            ch: Self::backend(&tmp, timeout),
            tmp,
            tx,
            events,
            pid_files,
        }
    }

    /// Another backend over the same binary and runtime root: a restarted VMCP.
    fn backend(tmp: &tempfile::TempDir, timeout: Duration) -> CloudHypervisor {
        CloudHypervisor::new(
            tmp.path().join("bin/cloud-hypervisor"),
            tmp.path().join("run"),
            timeout,
        )
        .with_ready_timeout(Duration::from_secs(10))
        .with_stop_grace(Duration::from_secs(2))
    }

    fn config(&self) -> VmConfig {
        config(self.tmp.path())
    }

    async fn create(&self, vm: &VmId) -> (ChVm, VmmProcess) {
        let (handle, rep) = self
            .ch
            .create(vm, &self.config(), self.tx.clone())
            .await
            .unwrap();
        assert_eq!(rep.state, VmState::Created);
        let p = rep.process.expect("a created VM has a VMM");
        assert_eq!(handle.process(), Some(p.clone()));
        (handle, p)
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

    /// The next `Exited` event within a second (state changes the event
    /// monitor reports on the way are skipped).
    async fn next_exit(&mut self) -> (u32, VmState, String) {
        next_exit(&mut self.events).await
    }

    /// Asserts that no VMM exit has been reported (state changes are fine:
    /// the event monitor reports VMCP's own operations too).
    fn assert_no_exit(&mut self) {
        while let Ok(ev) = self.events.try_recv() {
            assert!(
                matches!(ev, VmmEvent::StateChanged { .. }),
                "unexpected {ev:?}"
            );
        }
    }
}

async fn next_exit(events: &mut UnboundedReceiver<VmmEvent>) -> (u32, VmState, String) {
    let wait = async {
        loop {
            match events.recv().await.expect("event channel open") {
                VmmEvent::Exited { pid, state, reason } => return (pid, state, reason),
                VmmEvent::StateChanged { .. } => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(1), wait)
        .await
        .expect("an exit within a second")
}

/// Waits up to `within` for a `StateChanged` to `want`; returns its pid and reason.
async fn state_change(
    events: &mut UnboundedReceiver<VmmEvent>,
    want: VmState,
    within: Duration,
) -> (u32, String) {
    let wait = async {
        loop {
            match events.recv().await.expect("event channel open") {
                VmmEvent::StateChanged { pid, state, reason } if state == want => {
                    return (pid, reason);
                }
                VmmEvent::StateChanged { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| panic!("no StateChanged to {want} within {within:?}"))
}

fn assert_gone(p: &VmmProcess) {
    assert!(
        !is_alive(p.pid, p.start_time),
        "VMM {} (start time {}) still runs",
        p.pid,
        p.start_time
    );
}

fn ok(r: Reported) -> VmState {
    r.state
}

#[tokio::test]
async fn check_reports_the_version_and_names_what_is_missing() {
    let env = Env::new(Behaviour::default());
    let fake_kvm = env.tmp.path().join("kvm");
    std::fs::write(&fake_kvm, b"").unwrap();
    let bin = env.tmp.path().join("bin/cloud-hypervisor");
    let run = env.tmp.path().join("run");
    let backend = |bin: &Path| CloudHypervisor::new(bin, &run, Duration::from_secs(1));
    let usable = backend(&bin).with_kvm_device(&fake_kvm);
    assert_eq!(usable.check().await.unwrap().version, "v53.0-fake");

    // No KVM, and a KVM that opens but not read-write (a directory: refused
    // even to root), are each named, whatever this host has.
    for (kvm, why) in [
        (env.tmp.path().join("no-kvm"), "No such file"),
        (env.tmp.path().to_owned(), "directory"),
    ] {
        let err = backend(&bin)
            .with_kvm_device(&kvm)
            .check()
            .await
            .unwrap_err();
        let want = format!("{} cannot be opened read-write", kvm.display());
        assert!(
            matches!(&err, HypervisorError::Unavailable { message, source: Some(s) }
                if *message == want && s.to_string().contains(why)),
            "{err:?}"
        );
    }

    let ro_kvm = env.tmp.path().join("ro-kvm");
    std::fs::write(&ro_kvm, b"").unwrap();
    std::fs::set_permissions(&ro_kvm, std::fs::Permissions::from_mode(0o400)).unwrap();
    let euid_is_root = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro_kvm)
        .is_ok();
    if !euid_is_root {
        let err = backend(&bin)
            .with_kvm_device(&ro_kvm)
            .check()
            .await
            .unwrap_err();
        assert!(
            matches!(&err, HypervisorError::Unavailable { message, .. } if message.contains("read-write")),
            "{err:?}"
        );
    }

    let err = backend(&env.tmp.path().join("no-such-cloud-hypervisor"))
        .check()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::Unavailable { message, .. } if message.contains("no-such-cloud-hypervisor")),
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

    let (mut h, rep) = env.ch.create(&vm, &cfg, env.tx.clone()).await.unwrap();
    assert_eq!(rep.state, VmState::Created);
    let process = rep.process.unwrap();
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

    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Created));
    assert_eq!(info.process, Some(process.clone()));
    assert_eq!(info.backend_info["vmm_version"], "v53.0-fake");
    assert_eq!(info.backend_info["vmm_pid"], process.pid.to_string());
    assert_eq!(info.backend_info["api_socket"], process.socket_path);
    assert_eq!(
        info.backend_info["serial_output"],
        dir.join("serial.log").to_string_lossy()
    );
    assert!(info.metrics.memory_usage_bytes > 0, "RSS from /proc");

    let booted = h.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    assert_eq!(booted.process, Some(process.clone()), "the same VMM");
    assert_eq!(
        std::fs::read_to_string(dir.join("serial.log")).unwrap(),
        "VMCP-GUEST-OK\n"
    );
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Running));
    assert_eq!(info.metrics.storage.bytes_read, 4096);
    assert_eq!(info.metrics.storage.write_operations, 1);
    assert_eq!(info.metrics.network.bytes_transmitted, 2000);
    assert_eq!(info.metrics.network.packets_received, 10);

    assert!(
        matches!(h.boot().await, Err(HypervisorError::InvalidState(m)) if m.contains("already created"))
    );
    assert_eq!(ok(h.pause().await.unwrap()), VmState::Paused);
    assert!(
        matches!(h.pause().await, Err(HypervisorError::InvalidState(m)) if m.contains("InvalidStateTransition(Paused, Paused)"))
    );
    assert_eq!(ok(h.resume().await.unwrap()), VmState::Running);
    assert!(matches!(
        h.resume().await,
        Err(HypervisorError::InvalidState(_))
    ));
    assert_eq!(ok(h.reboot(false).await.unwrap()), VmState::Running);
    let rebooted = h.reboot(true).await.unwrap();
    assert_eq!(rebooted.state, VmState::Running);
    assert_eq!(
        rebooted.process,
        Some(process.clone()),
        "CH reboots in place"
    );
    let stopped = h.shutdown(FORCE).await.unwrap();
    assert_eq!(
        stopped.state,
        VmState::Created,
        "CH v53: vm.shutdown → Created"
    );
    assert_eq!(stopped.process, Some(process.clone()), "the VMM stays");
    assert!(
        matches!(h.pause().await, Err(HypervisorError::InvalidState(m)) if m.contains("not running"))
    );
    assert_eq!(ok(h.boot().await.unwrap()), VmState::Running);

    // The fake guest ignores the power button (like the tiny guest): the
    // graceful attempt times out and the VM is stopped hard.
    let started = Instant::now();
    assert_eq!(
        ok(h.shutdown(graceful(300)).await.unwrap()),
        VmState::Created
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        h.shutdown(graceful(300)).await,
        Err(HypervisorError::InvalidState(_))
    ));

    h.delete(false).await.unwrap();
    assert!(!dir.exists());
    assert_gone(&process);
    assert_eq!(h.process(), None);
    // A deleted VM's handle starts nothing again.
    assert!(matches!(h.sample().await, Err(HypervisorError::Gone(_))));
    assert!(matches!(h.boot().await, Err(HypervisorError::Gone(_))));
    assert!(env.all_pids().len() == 1, "no VMM was started for it");
    h.delete(false).await.unwrap();
    env.assert_no_exit();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_of_an_acpi_guest_is_a_clean_exit_and_it_boots_again() {
    let mut env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("acpi");
    let (mut h, first) = env.create(&vm).await;
    h.boot().await.unwrap();
    let started = Instant::now();
    let stopped = h.shutdown(graceful(5000)).await.unwrap();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(stopped.process, None, "the VMM exited with the guest");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "no waiting for the timeout"
    );
    assert_gone(&first);
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Shutdown));
    assert_eq!(info.backend_info["vmm_exit"], "exited with status 0");
    env.assert_no_exit();

    // Booting a powered-off VM starts a new VMM with the same config.
    let booted = h.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    let second = booted.process.unwrap();
    assert_ne!(second.pid, first.pid);
    assert_eq!(
        h.sample().await.unwrap().backend_info["vmm_pid"],
        second.pid.to_string()
    );
    h.delete(false).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_sees_a_reported_shutdown_state() {
    let env = Env::new(Behaviour {
        acpi: Acpi::ReportShutdown,
        ..Default::default()
    });
    let vm = id("acpi-report");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    let stopped = h.shutdown(graceful(5000)).await.unwrap();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(
        stopped.process,
        Some(p),
        "the VMM reports Shutdown and stays"
    );
    assert_eq!(ok(h.boot().await.unwrap()), VmState::Running);
    h.delete(true).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn graceful_shutdown_of_a_paused_vm_stops_it_hard() {
    let env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("paused-stop");
    let (mut h, _) = env.create(&vm).await;
    h.boot().await.unwrap();
    h.pause().await.unwrap();
    let started = Instant::now();
    assert_eq!(
        ok(h.shutdown(graceful(5000)).await.unwrap()),
        VmState::Created
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    h.delete(false).await.unwrap();
}

/// The replaced-VMM path: the guest powers off on its own (the VMM exits 0),
/// boot starts a new VMM and reports its identity, a restarted backend
/// adopts exactly that process, and delete leaves nothing.
#[tokio::test]
async fn a_powered_off_vm_boots_in_a_new_vmm_that_a_restart_adopts_and_delete_ends() {
    let mut env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("self-off");
    let cfg = env.config();
    let (mut h, first) = env.create(&vm).await;
    h.boot().await.unwrap();
    // The guest powers itself off (here: someone presses the button directly).
    let http = UdsClient::new(Duration::from_secs(1));
    ChApi::new(&http, Path::new(&first.socket_path))
        .power_button()
        .await
        .unwrap();
    let (pid, state, reason) = env.next_exit().await;
    assert_eq!(pid, first.pid, "the event names the process that ended");
    assert_eq!(state, VmState::Shutdown);
    assert!(reason.contains("exited with status 0"), "{reason}");
    assert_eq!(h.process(), None);
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Shutdown));
    assert!(info.reason.contains("guest powered off"), "{}", info.reason);

    let booted = h.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    let second = booted.process.clone().expect("a new VMM");
    assert_ne!(second.pid, first.pid, "a new process");
    assert_gone(&first);
    assert!(is_alive(second.pid, second.start_time));
    assert_eq!(h.process(), Some(second.clone()));
    let dir = env.runtime_dir("self-off");
    assert_eq!(Path::new(&second.socket_path), dir.join("api.sock"));
    assert_eq!(
        std::fs::read_to_string(dir.join("vmm.pid")).unwrap().trim(),
        second.pid.to_string(),
        "the pid file names the new VMM"
    );
    let found = env.ch.discover().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].process, Some(second.clone()));
    env.assert_no_exit();

    // VMCP restarts: the owner let go of the handle, the VMM runs on.
    drop(h);
    let restarted = Env::backend(&env.tmp, Duration::from_secs(2));
    let (tx, mut events) = unbounded_channel();
    let (mut adopted, rep) = restarted
        .adopt(&vm, &cfg, Some(second.clone()), tx)
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Running);
    assert_eq!(rep.process, Some(second.clone()));
    assert_eq!(adopted.process(), Some(second.clone()));
    adopted.delete(false).await.unwrap();
    assert_gone(&second);
    assert!(!dir.exists(), "runtime directory removed");
    assert_eq!(adopted.process(), None);
    assert!(
        matches!(
            events.try_recv(),
            Err(_) | Ok(VmmEvent::StateChanged { .. })
        ),
        "a requested exit is no news"
    );
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn a_killed_vmm_is_reported_failed_within_a_second_with_its_pid() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("victim");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    let killed = Instant::now();
    kill9(p.pid);
    let (pid, state, reason) = env.next_exit().await;
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert_eq!(pid, p.pid);
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("killed by signal 9 (SIGKILL)"), "{reason}");
    assert!(
        reason.contains("fake cloud-hypervisor: pid"),
        "log tail: {reason}"
    );
    let info = h.sample().await.unwrap();
    assert_eq!(info.state, Some(VmState::Failed));
    assert!(info.reason.contains("SIGKILL"));
    let err = h.pause().await.unwrap_err();
    assert!(
        matches!(
            &err,
            HypervisorError::Unavailable {
                source: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(error_chain(&err).contains("SIGKILL"), "{err:?}");
    h.delete(false).await.unwrap();
    assert!(!env.runtime_dir("victim").exists());
    env.assert_no_exit();
}

/// Every exit event names the process that ended; the process a respawn
/// replaces is ended by VMCP, so its exit is no news, and the new process's
/// exit carries the new pid.
#[tokio::test]
async fn exits_name_their_pid_and_a_replaced_vmm_is_no_news() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("renewed");
    let (mut h, first) = env.create(&vm).await;
    h.boot().await.unwrap();
    kill9(first.pid);
    let (pid, state, _) = env.next_exit().await;
    assert_eq!((pid, state), (first.pid, VmState::Failed));
    // Booting a crashed VM starts a new VMM (the core decides whether to ask).
    let booted = h.boot().await.unwrap();
    assert_eq!(booted.state, VmState::Running);
    let second = booted.process.unwrap();
    assert_ne!(second.pid, first.pid);
    env.assert_no_exit();
    kill9(second.pid);
    let (pid, state, _) = env.next_exit().await;
    assert_eq!((pid, state), (second.pid, VmState::Failed));
    h.delete(true).await.unwrap();
    env.assert_no_exit();
    env.assert_no_fake_alive();
}

/// The kernel tells the watcher when the event file changes (inotify), so
/// a change is reported well before the watcher's once-a-second look at the
/// file: a pause and then a resume each within half of it.
#[tokio::test]
async fn a_pause_made_directly_on_the_socket_is_reported_without_waiting_for_a_poll() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("watched");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    // Another client, straight to the VMM's socket.
    let http = UdsClient::new(Duration::from_secs(1));
    let api = ChApi::new(&http, Path::new(&p.socket_path));
    let within = vmcp::adapters::outbound::cloud_hypervisor::events::BACKSTOP / 2;
    let paused_at = Instant::now();
    api.pause().await.unwrap();
    let (pid, reason) = state_change(&mut env.events, VmState::Paused, within).await;
    let pause_seen = paused_at.elapsed();
    assert_eq!(pid, p.pid);
    assert_eq!(reason, "vm/paused");
    let resumed_at = Instant::now();
    api.resume().await.unwrap();
    let (_, reason) = state_change(&mut env.events, VmState::Running, within).await;
    assert_eq!(reason, "vm/resumed");
    eprintln!(
        "a pause on the socket reported after {pause_seen:?}, a resume after {:?}",
        resumed_at.elapsed()
    );
    h.delete(true).await.unwrap();
    env.assert_no_exit();
}

#[tokio::test]
async fn a_vmm_dying_mid_call_is_unavailable_with_its_exit_and_reported() {
    let mut env = Env::new(Behaviour {
        exit_on: Some(("vm.pause".into(), 3)),
        ..Default::default()
    });
    let vm = id("midcall");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    let err = h.pause().await.unwrap_err();
    let HypervisorError::Unavailable { message, .. } = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(message.contains("exited with status 3"), "{message}");
    assert!(
        error_chain(&err).contains("dying on vm.pause"),
        "the log tail is in the source: {err:?}"
    );
    let (pid, state, _) = env.next_exit().await;
    assert_eq!((pid, state), (p.pid, VmState::Failed));
    h.delete(false).await.unwrap();
    env.assert_no_fake_alive();
}

#[tokio::test]
async fn a_hung_vmm_times_out_and_force_delete_still_cleans_up() {
    let env = Env::with_timeout(
        Behaviour {
            hang_on: vec![
                "vm.create".into(),
                "vm.delete".into(),
                "vmm.shutdown".into(),
            ],
            ..Default::default()
        },
        Duration::from_millis(300),
    );
    let vm = id("hung");
    // create's vm.create hangs: a timeout, and nothing is left.
    let started = Instant::now();
    let err = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        matches!(&err, HypervisorError::Timeout { operation, after }
            if operation == "PUT /api/v1/vm.create" && *after == Duration::from_millis(300)),
        "{err:?}"
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
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    assert!(matches!(
        h.pause().await,
        Err(HypervisorError::Timeout { .. })
    ));
    let started = Instant::now();
    h.delete(false).await.unwrap();
    // Two timed-out calls, the 2 s grace, then SIGTERM takes it down.
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_gone(&p);
    assert!(!env.runtime_dir("stuck").exists());
}

#[tokio::test]
async fn a_refusing_socket_of_a_live_vmm_is_unavailable() {
    let env = Env::new(Behaviour {
        stop_listening_after: Some("vm.boot".into()),
        ..Default::default()
    });
    let vm = id("deaf");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    // A fresh client has no pooled connection to the old listener.
    let http = UdsClient::new(Duration::from_secs(1));
    let refused = ChApi::new(&http, Path::new(&p.socket_path))
        .state()
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, HypervisorError::Unavailable { message, .. } if message.contains("unreachable")),
        "{refused:?}"
    );
    h.delete(false).await.unwrap();
    assert_gone(&p);
}

#[tokio::test]
async fn a_vmm_that_fails_to_start_leaves_nothing_and_quotes_its_log() {
    let env = Env::new(Behaviour {
        fail_at_start: Some(1),
        ..Default::default()
    });
    let vm = id("nostart");
    let err = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap_err();
    let HypervisorError::SpawnFailed { message, .. } = &err else {
        panic!("expected SpawnFailed, got {err:?}");
    };
    assert!(
        message.contains("exited during start-up: exited with status 1"),
        "{message}"
    );
    assert!(
        error_chain(&err).contains("refusing to start (injected fault)"),
        "{err:?}"
    );
    assert!(!env.runtime_dir("nostart").exists());
}

#[tokio::test]
async fn a_vmm_that_never_listens_is_killed_at_the_deadline() {
    let mut env = Env::new(Behaviour {
        never_listen: true,
        ..Default::default()
    });
    env.ch = Env::backend(&env.tmp, Duration::from_secs(1))
        .with_ready_timeout(Duration::from_millis(1500));
    let vm = id("mute");
    let started = Instant::now();
    let err = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(
        matches!(&err, HypervisorError::SpawnFailed { message, .. } if message.contains("did not become ready")),
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
    let err = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap_err();
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
    let err = env
        .ch
        .create(&id("feat"), &cfg, env.tx.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::InvalidConfig(c) if *c == e),
        "{err:?}"
    );
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
    let (mut h, _) = env.create(&vm).await;
    assert!(!dir.join("api.sock.lock").exists());
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_second_create_never_touches_a_running_vmm() {
    let env = Env::new(Behaviour::default());
    let vm = id("twice");
    let (mut h, p) = env.create(&vm).await;
    let err = env
        .ch
        .create(&vm, &env.config(), env.tx.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, HypervisorError::InvalidState(m) if m.contains(&p.pid.to_string())),
        "{err:?}"
    );
    assert!(is_alive(p.pid, p.start_time));
    assert!(
        Path::new(&p.socket_path).exists(),
        "its socket is left alone"
    );
    assert_eq!(ok(h.boot().await.unwrap()), VmState::Running);
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_vm_without_a_vmm_is_deleted_or_destroyed_with_its_leftovers() {
    let env = Env::new(Behaviour::default());
    let cfg = env.config();
    for (i, vm) in ["ghost", "orphan"].into_iter().enumerate() {
        let dir = env.runtime_dir(vm);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmm.log"), b"old").unwrap();
        if i == 0 {
            let (mut h, rep) = env
                .ch
                .adopt(&id(vm), &cfg, None, env.tx.clone())
                .await
                .unwrap();
            assert_eq!(rep.state, VmState::Shutdown);
            assert_eq!(rep.process, None);
            assert!(dir.exists(), "adopting without a process starts nothing");
            h.delete(false).await.unwrap();
            h.delete(true).await.unwrap();
        } else {
            env.ch.destroy_orphan(&id(vm), None).await.unwrap();
        }
        assert!(!dir.exists(), "{vm}");
    }
    assert!(env.all_pids().is_empty());
}

#[tokio::test]
async fn force_delete_kills_at_once_without_an_event() {
    let mut env = Env::new(Behaviour::default());
    let vm = id("forced");
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    h.delete(true).await.unwrap();
    assert_gone(&p);
    assert!(!env.runtime_dir("forced").exists());
    // An exit would be reported within milliseconds; give it the chance.
    let quiet = tokio::time::timeout(Duration::from_millis(100), env.next_exit()).await;
    assert!(quiet.is_err(), "an exit we caused is no event");
}

#[tokio::test]
async fn a_restarted_backend_adopts_a_surviving_vmm() {
    let env = Env::new(Behaviour::default());
    let vm = id("survivor");
    let cfg = env.config();
    let (mut h, p) = env.create(&vm).await;
    h.boot().await.unwrap();
    drop(h);

    // A second backend over the same runtime root plays the restarted VMCP.
    let restarted = Env::backend(&env.tmp, Duration::from_secs(2));
    let (tx, mut events) = unbounded_channel();
    let wrong = VmmProcess {
        start_time: p.start_time + 1,
        ..p.clone()
    };
    assert!(matches!(
        restarted.adopt(&vm, &cfg, Some(wrong), tx.clone()).await,
        Err(HypervisorError::Gone(_))
    ));
    let (mut h, rep) = restarted
        .adopt(&vm, &cfg, Some(p.clone()), tx.clone())
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Running);
    // The event file's past (create, boot) is not news after a restart.
    let replay = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(replay.is_err(), "old events replayed: {replay:?}");
    assert_eq!(ok(h.pause().await.unwrap()), VmState::Paused);
    let (pid, reason) = state_change(&mut events, VmState::Paused, Duration::from_secs(1)).await;
    assert_eq!((pid, reason.as_str()), (p.pid, "vm/paused"));
    assert_eq!(h.sample().await.unwrap().state, Some(VmState::Paused));

    // Its exit is noticed although it is not the new backend's child.
    kill9(p.pid);
    let (pid, state, reason) = next_exit(&mut events).await;
    assert_eq!((pid, state), (p.pid, VmState::Failed));
    assert!(reason.contains("status unknown"), "{reason}");
    h.delete(false).await.unwrap();
    assert!(!env.runtime_dir("survivor").exists());
    assert!(matches!(
        restarted.adopt(&vm, &cfg, Some(p.clone()), tx).await,
        Err(HypervisorError::Gone(_))
    ));
}

#[tokio::test]
async fn eight_vms_are_driven_concurrently() {
    let env = Env::new(Behaviour::default());
    let runs = (0..8).map(|i| {
        let env = &env;
        async move {
            let vm = id(&format!("par{i}"));
            let (mut h, rep) = env.ch.create(&vm, &env.config(), env.tx.clone()).await?;
            assert_eq!(rep.state, VmState::Created);
            assert_eq!(h.boot().await?.state, VmState::Running);
            assert_eq!(h.pause().await?.state, VmState::Paused);
            assert_eq!(h.resume().await?.state, VmState::Running);
            assert_eq!(h.shutdown(FORCE).await?.state, VmState::Created);
            h.delete(false).await?;
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
    let (mut h, rep) = env
        .ch
        .adopt(&vm, &cfg, Some(process.clone()), env.tx.clone())
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Created);
    assert_eq!(ok(h.boot().await.unwrap()), VmState::Running);
    assert_eq!(
        h.sample().await.unwrap().backend_info["api_socket"],
        socket.to_string_lossy()
    );
    h.delete(false).await.unwrap();
    assert_eq!(
        child.wait().unwrap().code(),
        Some(0),
        "vmm.shutdown ended it"
    );
    assert!(!socket.exists());
    assert!(!env.runtime_dir("seed").exists());
    assert!(matches!(
        env.ch.probe_endpoint(&socket).await,
        Err(HypervisorError::Unavailable { .. })
    ));
}

// ---------------------------------------------------------------- resize and console

/// A config with room to grow: 1 → 2 vCPUs, 128 MiB → 512 MiB.
fn hotplug_config(env: &Env) -> VmConfig {
    let mut cfg = env.config();
    cfg.memory.hotplug_enabled = true;
    cfg.memory.max_size_bytes = 512 * MIB;
    cfg
}

#[tokio::test]
async fn resize_reports_the_size_the_vmm_reports_and_a_new_vmm_keeps_it() {
    let env = Env::new(Behaviour {
        acpi: Acpi::PowerOff,
        ..Default::default()
    });
    let vm = id("grow");
    let (mut h, _) = env
        .ch
        .create(&vm, &hotplug_config(&env), env.tx.clone())
        .await
        .unwrap();
    ok(h.boot().await.unwrap());
    let (rep, size) = h
        .resize(VmSize {
            vcpu_count: 2,
            memory_bytes: 384 * MIB,
        })
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Running);
    assert_eq!(
        size,
        VmSize {
            vcpu_count: 2,
            memory_bytes: 384 * MIB
        }
    );
    assert_eq!(h.sample().await.unwrap().size, Some(size), "vm.info agrees");

    // The guest powers off; the next boot starts a new VMM at the new size,
    // with the same ceiling (room for 128 MiB more).
    h.shutdown(graceful(2_000)).await.unwrap();
    ok(h.boot().await.unwrap());
    assert_eq!(h.sample().await.unwrap().size, Some(size));
    let socket = PathBuf::from(h.process().unwrap().socket_path);
    let api = ChApi::new(env.ch.http(), &socket);
    let info = api.info().await.unwrap();
    assert_eq!(info.config["memory"]["hotplug_size"], 128 * MIB);
    assert_eq!(info.config["cpus"]["max_vcpus"], 2);
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn resize_refusals_name_the_field_or_carry_the_vmm_reason() {
    let env = Env::new(Behaviour::default());
    let vm = id("nogrow");
    let (mut h, _) = env
        .ch
        .create(&vm, &hotplug_config(&env), env.tx.clone())
        .await
        .unwrap();
    ok(h.boot().await.unwrap());
    let at = |vcpu_count, memory_bytes| VmSize {
        vcpu_count,
        memory_bytes,
    };
    // CH cannot remove ACPI memory: refused before the VMM records a lie.
    match h.resize(at(1, 64 * MIB)).await {
        Err(HypervisorError::InvalidConfig(e)) => {
            assert_eq!(e.field, "memory_bytes");
            assert!(e.reason.contains("cannot remove memory"), "{e}");
        }
        other => panic!("a shrink: {other:?}"),
    }
    // Not a whole number of 128 MiB DIMMs.
    match h.resize(at(1, 200 * MIB)).await {
        Err(HypervisorError::InvalidConfig(e)) => {
            assert_eq!(e.field, "memory_bytes");
            assert!(e.reason.contains("128 MiB"), "{e}");
        }
        other => panic!("an odd step: {other:?}"),
    }
    // What the VMM itself refuses comes back with its words.
    match h.resize(at(3, 128 * MIB)).await {
        Err(HypervisorError::InvalidState(m)) => {
            assert!(m.contains("DesiredVCpuCountExceedsMax"), "{m}")
        }
        other => panic!("past max_vcpus: {other:?}"),
    }
    assert_eq!(
        h.sample().await.unwrap().size,
        Some(at(1, 128 * MIB)),
        "nothing changed"
    );
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_vmm_dying_mid_resize_is_unavailable_and_reported() {
    let mut env = Env::new(Behaviour {
        exit_on: Some(("vm.resize".into(), 1)),
        ..Default::default()
    });
    let vm = id("dies");
    let (mut h, p) = env
        .ch
        .create(&vm, &hotplug_config(&env), env.tx.clone())
        .await
        .unwrap();
    ok(h.boot().await.unwrap());
    let pid = p.process.unwrap().pid;
    let e = h
        .resize(VmSize {
            vcpu_count: 2,
            memory_bytes: 128 * MIB,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            HypervisorError::Unavailable { .. } | HypervisorError::Gone(_)
        ),
        "{e:?}"
    );
    let (exited, state, _) = env.next_exit().await;
    assert_eq!((exited, state), (pid, VmState::Failed));
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn the_console_is_read_by_offset_through_the_backend() {
    let env = Env::new(Behaviour::default());
    let vm = id("talk");
    let cfg = env.config();
    let (mut h, _) = env.ch.create(&vm, &cfg, env.tx.clone()).await.unwrap();
    let empty = env.ch.read_console(&vm, &cfg, 0, 1024).await.unwrap();
    assert!(empty.data.is_empty(), "nothing before boot");
    ok(h.boot().await.unwrap());
    let c = env.ch.read_console(&vm, &cfg, 0, 1024).await.unwrap();
    assert_eq!(c.data, b"VMCP-GUEST-OK\n", "the fake's boot marker");
    assert_eq!((c.offset, c.next_offset), (0, 14));
    let c = env.ch.read_console(&vm, &cfg, 5, 4).await.unwrap();
    assert_eq!((c.data.as_slice(), c.next_offset), (&b"GUES"[..], 9));
    // Console input is refused with the reason.
    match h.write_console(b"ls\n".to_vec()).await {
        Err(HypervisorError::Unsupported(m)) => assert!(m.contains("cloudhypervisor"), "{m}"),
        other => panic!("write_console: {other:?}"),
    }
    // A VM without a console has nothing to read.
    let mut off = cfg.clone();
    off.console.enabled = false;
    assert!(matches!(
        env.ch.read_console(&vm, &off, 0, 10).await,
        Err(HypervisorError::Unsupported(_))
    ));
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_chatty_console_is_capped_at_each_sample_and_offsets_stay_put() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    let env = Env::new(Behaviour::default());
    let ch = Env::backend(&env.tmp, Duration::from_secs(2)).with_console_max_bytes(64 * 1024);
    let vm = id("chatty");
    let cfg = env.config();
    let (mut h, _) = ch.create(&vm, &cfg, env.tx.clone()).await.unwrap();
    ok(h.boot().await.unwrap());
    // The guest writes 1 MiB more, as the VMM does: at its own offset, no O_APPEND.
    let serial = env.runtime_dir("chatty").join("serial.log");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&serial)
        .unwrap();
    f.seek(SeekFrom::End(0)).unwrap();
    let chunk: Vec<u8> = (0..1024u32)
        .flat_map(|i| format!("{i:07}\n").into_bytes())
        .collect();
    for _ in 0..128 {
        f.write_all(&chunk).unwrap();
    }
    let end = f.stream_position().unwrap();
    h.sample().await.unwrap();
    let stored = std::fs::metadata(&serial).unwrap().blocks() * 512;
    assert!(stored <= 64 * 1024, "{stored} bytes kept after a sample");
    let c = ch.read_console(&vm, &cfg, 0, 1 << 20).await.unwrap();
    assert!(c.offset > 0, "the oldest output was dropped");
    assert_eq!(c.next_offset, end, "the end did not move");
    assert!(c.data.ends_with(&chunk), "the newest output is kept");
    // The VMM goes on writing where it was.
    f.write_all(b"more\n").unwrap();
    let c = ch.read_console(&vm, &cfg, end, 100).await.unwrap();
    assert_eq!((c.offset, c.data.as_slice()), (end, &b"more\n"[..]));
    h.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_snapshot_restores_into_a_fresh_vmm_with_its_own_console_and_taps() {
    let env = Env::new(Behaviour::default());
    let mut cfg = env.config();
    cfg.network = vec![NetworkInterface {
        id: "eth0".into(),
        tap_device: "tap-src".into(),
        ..Default::default()
    }];
    let (mut src, _) = env
        .ch
        .create(&id("src"), &cfg, env.tx.clone())
        .await
        .unwrap();
    ok(src.boot().await.unwrap());
    let snap = env.tmp.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let rep = src
        .snapshot(&snap, vmcp::domain::snapshot::SnapshotKind::Full, true)
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Running, "paused for it, then resumed");
    for file in ["config.json", "state.json", "memory-ranges"] {
        assert!(snap.join(file).is_file(), "{file} written");
    }

    let mut clone_cfg = cfg.clone();
    clone_cfg.network[0].tap_device = "tap-clone".into();
    let (mut clone, rep) = env
        .ch
        .restore(&id("clone"), &clone_cfg, &snap, false, env.tx.clone())
        .await
        .unwrap();
    assert_eq!(rep.state, VmState::Paused, "restored, not resumed");
    let p = rep.process.unwrap();
    assert_ne!(Some(p.clone()), src.process(), "a fresh VMM");
    // The clone writes its own console and uses its own tap; the snapshot is untouched.
    let socket = PathBuf::from(&p.socket_path);
    let info = ChApi::new(env.ch.http(), &socket).info().await.unwrap();
    let serial = env.runtime_dir("clone").join("serial.log");
    assert_eq!(
        info.config["serial"]["file"],
        serial.to_string_lossy().as_ref()
    );
    assert_eq!(info.config["net"][0]["tap"], "tap-clone");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(snap.join("config.json")).unwrap()).unwrap();
    assert_eq!(original["net"][0]["tap"], "tap-src");
    assert!(
        !env.runtime_dir("clone").join("restore").exists(),
        "staging removed"
    );
    assert_eq!(ok(clone.resume().await.unwrap()), VmState::Running);

    // A torn snapshot (no state file) is refused by the VMM, with its words.
    let refused = env.tmp.path().join("torn");
    std::fs::create_dir(&refused).unwrap();
    std::fs::copy(snap.join("config.json"), refused.join("config.json")).unwrap();
    match env
        .ch
        .restore(&id("broken"), &cfg, &refused, true, env.tx.clone())
        .await
    {
        Err(HypervisorError::InvalidState(m)) => {
            assert!(m.contains("missing snapshot files"), "{m}")
        }
        other => panic!("a restore of nothing: {other:?}"),
    }
    assert!(
        !env.runtime_dir("broken").exists(),
        "a failed restore leaves nothing"
    );
    clone.delete(true).await.unwrap();
    src.delete(true).await.unwrap();
    env.assert_no_fake_alive();
}
