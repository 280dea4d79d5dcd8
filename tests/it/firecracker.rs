//! The Firecracker adapter against the fake Firecracker: the client over an
//! in-process fake socket (fault bodies, refused and hung sockets), and the
//! whole `Hypervisor` implementation and its VM handles against the
//! `fake-firecracker` example binary as a real child process (lifecycle,
//! the replaced-VMM paths of reboot and of boot after shutdown with a
//! restart's adoption and delete, kill -9, guest poweroff, VMM exit
//! mid-call, hung calls, start-up failures, the jailer).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use vmcp::adapters::outbound::firecracker::client::{Action, FcClient, VmRunState};
use vmcp::adapters::outbound::firecracker::config::{Drive, MachineConfig, SerialDevice};
use vmcp::adapters::outbound::firecracker::{FcVm, Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::domain::{ConsoleConfig, StorageDevice, VmConfig, VmId, VmSize, VmState};
use vmcp::ports::{
    Hypervisor, HypervisorError, Reported, ShutdownMode, VmmEvent, VmmHandle, VmmInfo, VmmProcess,
};

use crate::fake_fc::{Behaviour, FakeFc, MARKER, READ_BYTES_PER_FLUSH, RX_BYTES_PER_FLUSH};
use crate::real_env::{error_chain, kill9, replaced, restart_and_adopt};

const MIB: i64 = 1 << 20;

// ---------------------------------------------------------------- client

fn behaviour() -> Behaviour {
    Behaviour {
        id: "inproc".into(),
        ctrl_alt_del_exits: false,
        poweroff_after: None,
        hang_on: Vec::new(),
        slow: Vec::new(),
        exit_on: Vec::new(),
        on_exit: Arc::new(|_| {}),
        chroot: None,
        fail_snapshot_write: None,
    }
}

struct InProc {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    fake: FakeFc,
    client: FcClient,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for InProc {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn inproc(b: Behaviour) -> InProc {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let sock = dir.join("api.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let fake = FakeFc::new(b);
    let server = tokio::spawn(fake.clone().serve(listener));
    let client = FcClient::new(UdsClient::new(Duration::from_millis(500)), sock);
    InProc {
        _tmp: tmp,
        dir,
        fake,
        client,
        server,
    }
}

fn kernel_in(dir: &Path) -> PathBuf {
    let k = dir.join("vmlinux");
    std::fs::write(&k, b"not really a kernel").expect("write kernel");
    k
}

/// The fake is a strict judge of diff snapshots: a diff's sparse memory
/// alone, or the parent's memory alone, does not load with the diff's
/// vmstate; the parent's memory with the diff's pages over it (VMCP's
/// disk_copy helpers, as the snapshot repository uses them) does.
#[tokio::test]
async fn the_fake_loads_a_diff_only_when_made_whole_from_its_parent() {
    use vmcp::adapters::outbound::disk_copy::{copy_disk, data_extents, overlay};
    let f = inproc(behaviour());
    let kernel = kernel_in(&f.dir);
    f.client
        .put_machine_config(&MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 16,
            smt: false,
            track_dirty_pages: true,
        })
        .await
        .expect("machine");
    f.client
        .put_boot_source(&vmcp::adapters::outbound::firecracker::config::BootSource {
            kernel_image_path: kernel.to_string_lossy().into_owned(),
            initrd_path: None,
            boot_args: "console=ttyS0".into(),
        })
        .await
        .expect("boot source");
    f.client.action(Action::InstanceStart).await.expect("start");
    let path = |n: &str| f.dir.join(n).to_string_lossy().into_owned();
    f.client.patch_vm(VmRunState::Paused).await.expect("pause");
    f.client
        .create_snapshot(&path("full.state"), &path("full.mem"), false)
        .await
        .expect("full");
    f.client
        .patch_vm(VmRunState::Resumed)
        .await
        .expect("resume");
    f.client.patch_vm(VmRunState::Paused).await.expect("pause");
    f.client
        .create_snapshot(&path("diff.state"), &path("diff.mem"), true)
        .await
        .expect("diff");
    let diff = std::fs::File::open(f.dir.join("diff.mem")).expect("diff");
    let extents = data_extents(&diff).expect("extents");
    let changed: u64 = extents.iter().map(|(_, l)| l).sum();
    assert!(
        changed > 0 && changed < 16 << 20,
        "only the pages written since the full one: {changed}"
    );
    copy_disk(&f.dir.join("full.mem"), &f.dir.join("whole.mem")).expect("copy");
    let whole = std::fs::OpenOptions::new()
        .write(true)
        .open(f.dir.join("whole.mem"))
        .expect("open");
    overlay(&diff, &whole, &extents).expect("overlay");
    drop(whole);
    for (memory, loads) in [
        ("diff.mem", false),
        ("full.mem", false),
        ("whole.mem", true),
    ] {
        let g = inproc(behaviour());
        let r = g
            .client
            .load_snapshot(&path("diff.state"), &path(memory), &[], true, true)
            .await;
        assert_eq!(r.is_ok(), loads, "{memory}: {r:?}");
    }
}

/// Like Firecracker, the fake takes its metrics file on the command line
/// (`--metrics-path`, what the adapter now passes); a `PUT /metrics` after
/// that is a reinitialization and refused, so an adapter that still sent it
/// would fail every create.
#[tokio::test]
async fn metrics_named_at_start_up_are_not_initialized_again() {
    let f = inproc(behaviour());
    let path = f.dir.join("metrics.json");
    f.fake
        .init_metrics(&path.to_string_lossy())
        .expect("metrics at start-up");
    assert!(path.is_file(), "the metrics file is opened at start-up");
    let again = f
        .client
        .put_metrics(&vmcp::adapters::outbound::firecracker::config::Metrics {
            metrics_path: path.to_string_lossy().into_owned(),
        })
        .await
        .expect_err("refused");
    assert!(again.to_string().contains("Reinitialization"), "{again}");
}

#[tokio::test]
async fn client_walks_firecracker_states() {
    let f = inproc(behaviour());
    let info = f.client.describe().await.expect("describe");
    assert_eq!(info.state, "Not started");
    assert_eq!(info.id, "inproc");
    f.client
        .put_machine_config(&MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 64,
            smt: false,
            track_dirty_pages: false,
        })
        .await
        .expect("machine-config");
    let kernel = kernel_in(&f.dir);
    let serial = f.dir.join("serial.log");
    f.client
        .put_serial(&SerialDevice {
            serial_out_path: serial.to_string_lossy().into_owned(),
        })
        .await
        .expect("serial");
    f.client
        .put_boot_source(&vmcp::adapters::outbound::firecracker::config::BootSource {
            kernel_image_path: kernel.to_string_lossy().into_owned(),
            initrd_path: None,
            boot_args: "console=ttyS0".into(),
        })
        .await
        .expect("boot-source");
    f.client.action(Action::InstanceStart).await.expect("start");
    assert_eq!(
        f.client.describe().await.expect("describe").state,
        "Running"
    );
    f.client.patch_vm(VmRunState::Paused).await.expect("pause");
    assert_eq!(f.client.describe().await.expect("describe").state, "Paused");
    f.client
        .patch_vm(VmRunState::Resumed)
        .await
        .expect("resume");
    let cfg = f.client.vm_config().await.expect("vm/config");
    assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
    assert_eq!(cfg["boot-source"]["boot_args"], "console=ttyS0");
    let paths: Vec<String> = f
        .fake
        .received()
        .into_iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(paths.contains(&"PATCH /vm".to_owned()), "{paths:?}");
}

#[tokio::test]
async fn client_maps_fault_bodies() {
    let f = inproc(behaviour());
    // Runtime actions before InstanceStart: a state refusal.
    let e = f
        .client
        .patch_vm(VmRunState::Paused)
        .await
        .expect_err("pre-boot pause");
    assert!(
        matches!(&e, HypervisorError::InvalidState(m) if m.contains("before starting")),
        "{e:?}"
    );
    let e = f
        .client
        .action(Action::SendCtrlAltDel)
        .await
        .expect_err("pre-boot ctrl-alt-del");
    assert!(matches!(e, HypervisorError::InvalidState(_)), "{e:?}");
    // A refused resource names the VMCP field it came from.
    let drive = Drive {
        drive_id: "bad-id".into(),
        path_on_host: "/nonexistent".into(),
        is_root_device: false,
        is_read_only: true,
    };
    let HypervisorError::InvalidConfig(ce) = f
        .client
        .put_drive(&drive, "config.storage[3]")
        .await
        .expect_err("bad id")
    else {
        panic!("expected InvalidConfig");
    };
    assert_eq!(ce.field, "config.storage[3]");
    assert!(ce.reason.contains("alphanumeric"), "{ce}");
    let e = f
        .client
        .put_boot_source(&vmcp::adapters::outbound::firecracker::config::BootSource {
            kernel_image_path: "/nonexistent/vmlinux".into(),
            initrd_path: None,
            boot_args: String::new(),
        })
        .await
        .expect_err("missing kernel");
    let HypervisorError::InvalidConfig(ce) = e else {
        panic!("expected InvalidConfig, got {e:?}");
    };
    assert_eq!(ce.field, "config.boot.kernel_path");
    // InstanceStart without a kernel: refused, and the reason says so.
    let e = f
        .client
        .action(Action::InstanceStart)
        .await
        .expect_err("no kernel");
    assert!(
        matches!(&e, HypervisorError::InvalidConfig(c) if c.reason.contains("without kernel")),
        "{e:?}"
    );
}

#[tokio::test]
async fn client_post_boot_rules() {
    let f = inproc(behaviour());
    let kernel = kernel_in(&f.dir);
    f.client
        .put_serial(&SerialDevice {
            serial_out_path: f.dir.join("serial.log").to_string_lossy().into_owned(),
        })
        .await
        .expect("serial");
    f.client
        .put_boot_source(&vmcp::adapters::outbound::firecracker::config::BootSource {
            kernel_image_path: kernel.to_string_lossy().into_owned(),
            initrd_path: None,
            boot_args: String::new(),
        })
        .await
        .expect("boot-source");
    f.client.action(Action::InstanceStart).await.expect("start");
    let e = f
        .client
        .action(Action::InstanceStart)
        .await
        .expect_err("second start");
    assert!(
        matches!(&e, HypervisorError::InvalidState(m) if m.contains("after starting")),
        "{e:?}"
    );
    let e = f
        .client
        .put_machine_config(&MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 64,
            smt: false,
            track_dirty_pages: false,
        })
        .await
        .expect_err("post-boot machine-config");
    assert!(matches!(e, HypervisorError::InvalidState(_)), "{e:?}");
    f.client
        .action(Action::FlushMetrics)
        .await
        .expect("flush after boot");
}

#[tokio::test]
async fn client_refused_connection_is_unavailable() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sock = tmp.path().join("stale.sock");
    // What a killed Firecracker leaves: a socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let client = FcClient::new(UdsClient::new(Duration::from_secs(1)), sock);
    let e = client.describe().await.expect_err("refused");
    assert!(matches!(e, HypervisorError::Unavailable { .. }), "{e:?}");
    let missing = FcClient::new(
        UdsClient::new(Duration::from_secs(1)),
        tmp.path().join("none.sock"),
    );
    let e = missing.describe().await.expect_err("missing");
    assert!(matches!(e, HypervisorError::Unavailable { .. }), "{e:?}");
    assert!(error_chain(&e).contains("none.sock"), "{}", error_chain(&e));
}

#[tokio::test]
async fn client_hung_socket_times_out() {
    let mut b = behaviour();
    b.hang_on.push("PUT /actions".into());
    let f = inproc(b);
    let started = Instant::now();
    let e = f
        .client
        .action(Action::InstanceStart)
        .await
        .expect_err("hung");
    assert!(
        matches!(&e, HypervisorError::Timeout { operation, after }
            if operation == "PUT /actions" && *after == Duration::from_millis(500)),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Firecracker's API thread serves one request at a time: while one hangs,
    // nothing else is answered, on any connection.
    let e = f.client.describe().await.expect_err("the API is stuck");
    assert!(
        matches!(&e, HypervisorError::Timeout { operation, .. } if operation == "GET /"),
        "{e:?}"
    );
}

#[tokio::test]
async fn client_one_request_at_a_time_and_a_slow_answer_is_still_applied() {
    let mut b = behaviour();
    b.slow
        .push(("PUT /machine-config".into(), Duration::from_millis(700)));
    let f = inproc(b);
    let machine = MachineConfig {
        vcpu_count: 2,
        mem_size_mib: 256,
        smt: false,
        track_dirty_pages: false,
    };
    let sent = Instant::now();
    // The client gives up at 500 ms; the VMM applied the request and answers later.
    let e = f
        .client
        .put_machine_config(&machine)
        .await
        .expect_err("answered after the client's timeout");
    assert!(matches!(e, HypervisorError::Timeout { .. }), "{e:?}");
    // The next request waits for the slow one's turn to end, then sees it applied.
    let held = f.client.vm_config().await.expect("vm config");
    assert!(
        sent.elapsed() >= Duration::from_millis(700),
        "answered before the slow request's turn ended: {:?}",
        sent.elapsed()
    );
    assert_eq!(held["machine-config"]["vcpu_count"], 2);
    assert_eq!(held["machine-config"]["mem_size_mib"], 256);
}

// ---------------------------------------------------------------- adapter

/// The `fake-firecracker` example binary, built by `cargo test` (or
/// `cargo build --example fake-firecracker`) next to this test binary.
fn fake_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = target.join("examples").join("fake-firecracker");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test` (which builds examples) or `cargo build --example fake-firecracker`",
        bin.display()
    );
    bin
}

struct Env {
    tmp: tempfile::TempDir,
    fc: Firecracker,
    tx: UnboundedSender<VmmEvent>,
    events: UnboundedReceiver<VmmEvent>,
    kernel: PathBuf,
}

impl Env {
    fn root(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    fn config(&self) -> VmConfig {
        VmConfig {
            cpu: vmcp::domain::CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            },
            memory: vmcp::domain::MemoryConfig {
                size_bytes: 64 * MIB,
                ..Default::default()
            },
            boot: vmcp::domain::BootConfig {
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

    /// Creates `vm` with the default config; returns its handle and VMM.
    async fn create(&self, vm: &VmId) -> (FcVm, VmmProcess) {
        let (h, rep) = self
            .fc
            .create(vm, &self.config(), self.tx.clone())
            .await
            .expect("create");
        assert_eq!(rep.state, VmState::Created);
        let p = rep.process.expect("a created microVM has a process");
        assert_eq!(h.process(), Some(p.clone()));
        (h, p)
    }

    /// Another backend over the same settings: a restarted VMCP.
    fn restarted(&self) -> Firecracker {
        Firecracker::new(self.fc.settings().clone())
    }

    /// The next `Exited` event within `within`.
    async fn next_exit(&mut self, within: Duration) -> (u32, VmState, String) {
        let ev = tokio::time::timeout(within, self.events.recv())
            .await
            .expect("an event in time")
            .expect("event channel open");
        match ev {
            VmmEvent::Exited { pid, state, reason } => (pid, state, reason),
            other => panic!("Firecracker has no event stream: {other:?}"),
        }
    }

    fn no_event(&mut self) {
        let ev = self.events.try_recv();
        assert!(ev.is_err(), "no event expected: {ev:?}");
    }
}

/// A backend whose binary is the fake with `flags` (through a wrapper script).
fn env(flags: &[&str]) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let script = tmp.path().join("firecracker");
    let quoted: Vec<String> = flags.iter().map(|f| format!("'{f}'")).collect();
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec '{}' --fake-parent \"$PPID\" {} \"$@\"\n",
            fake_binary().display(),
            quoted.join(" ")
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let kernel = kernel_in(tmp.path());
    let mut settings = FirecrackerSettings::new(&script, tmp.path().join("run"));
    settings.call_timeout = Duration::from_millis(800);
    settings.ready_timeout = Duration::from_secs(3);
    settings.reboot_grace = Duration::from_millis(200);
    settings.delete_grace = Duration::from_millis(200);
    let (tx, events) = unbounded_channel();
    Env {
        fc: Firecracker::new(settings),
        tmp,
        tx,
        events,
        kernel,
    }
}

fn id(s: &str) -> VmId {
    VmId::parse(s).expect("valid id")
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

fn pid_of(info: &VmmInfo) -> u32 {
    info.backend_info["vmm_pid"].parse().expect("pid")
}

fn console(e: &Env, vm: &VmId) -> String {
    std::fs::read_to_string(e.root().join(vm.as_str()).join("serial.log")).unwrap_or_default()
}

async fn wait_gone(p: &VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while is_alive(p.pid, p.start_time) {
        assert!(Instant::now() < deadline, "process {} still alive", p.pid);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks a report of an operation that replaced the VMM (see
/// [`replaced`]) and that the pid file names the new process.
fn replaced_here(e: &Env, vm: &VmId, h: &FcVm, rep: Reported, old: &VmmProcess) -> VmmProcess {
    let new = replaced(h, rep, old);
    let pid_file = e.root().join(vm.as_str()).join("vmm.pid");
    assert_eq!(
        std::fs::read_to_string(pid_file).expect("pid file").trim(),
        new.pid.to_string()
    );
    new
}

/// A VMCP restart: a new backend over the same settings adopts `p`.
async fn restart(e: &Env, vm: &VmId, h: FcVm, p: &VmmProcess) -> FcVm {
    restart_and_adopt(&e.restarted(), vm, &e.config(), h, p, e.tx.clone()).await
}

#[tokio::test]
async fn create_boot_pause_resume_info() {
    let mut e = env(&[]);
    let vm = id("vm-life");
    let mut cfg = e.config();
    let disk = e.tmp.path().join("data.img");
    std::fs::write(&disk, b"").expect("disk");
    cfg.storage = vec![StorageDevice {
        id: "data-1".into(),
        path: disk.to_string_lossy().into_owned(),
        read_only: true,
        ..Default::default()
    }];
    let (mut h, rep) = e.fc.create(&vm, &cfg, e.tx.clone()).await.expect("create");
    assert_eq!(rep.state, VmState::Created);
    let proc_ = rep.process.expect("process");
    assert!(is_alive(proc_.pid, proc_.start_time));
    let dir = e.root().join("vm-life");
    let mode = std::fs::metadata(&dir)
        .expect("runtime dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert_eq!(proc_.socket_path, dir.join("api.sock").to_string_lossy());

    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Created));
    assert_eq!(pid_of(&info), proc_.pid);
    assert_eq!(info.process, Some(proc_.clone()));
    assert_eq!(info.backend_info["vmm_version"], "Firecracker v1.16.1");
    assert_eq!(info.backend_info["backend"], "firecracker");
    // What Firecracker itself holds, asked on its socket.
    let held = super::real_env::vm_config_of(info.process.as_ref().expect("a process")).await;
    assert_eq!(held["drives"][0]["drive_id"], "data_1");
    assert_eq!(held["drives"][0]["is_read_only"], true);
    assert_eq!(held["machine-config"]["mem_size_mib"], 64);
    assert_eq!(held["boot-source"]["boot_args"], "console=ttyS0");

    let e2 = h.pause().await.expect_err("pause before boot");
    assert!(matches!(e2, HypervisorError::InvalidState(_)), "{e2:?}");

    let booted = h.boot().await.expect("boot");
    assert_eq!(booted.state, VmState::Running);
    assert_eq!(booted.process, Some(proc_.clone()), "the same process");
    assert_eq!(console(&e, &vm), MARKER);
    let again = h.boot().await.expect_err("boot twice");
    assert!(
        matches!(again, HypervisorError::InvalidState(_)),
        "{again:?}"
    );
    assert_eq!(h.pause().await.expect("pause").state, VmState::Paused);
    assert_eq!(h.sample().await.expect("info").state, Some(VmState::Paused));
    assert_eq!(h.resume().await.expect("resume").state, VmState::Running);

    // Each sample while running flushes once; the counters are summed deltas.
    let m = h.sample().await.expect("info").metrics;
    let flushes = m.network.bytes_received / RX_BYTES_PER_FLUSH as i64;
    assert_eq!(
        flushes, 2,
        "the paused and the running sample each flushed once: {m:?}"
    );
    assert_eq!(m.storage.bytes_read, flushes * READ_BYTES_PER_FLUSH as i64);
    let m2 = h.sample().await.expect("info").metrics;
    assert_eq!(
        m2.network.bytes_received,
        (flushes + 1) * RX_BYTES_PER_FLUSH as i64
    );
    assert!(m2.memory_usage_bytes > 0, "{m2:?}");

    h.delete(true).await.expect("delete");
    wait_gone(&proc_).await;
    e.no_event();
}

#[tokio::test]
async fn graceful_shutdown_with_i8042_guest_exits_cleanly_then_boots_again() {
    let mut e = env(&["--fake-ctrl-alt-del-exits"]);
    let vm = id("vm-grace");
    let (mut h, p1) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let started = Instant::now();
    let stopped = h.shutdown(graceful(5000)).await.expect("shutdown");
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(stopped.process, None);
    assert!(started.elapsed() < Duration::from_secs(2), "guest reacted");
    wait_gone(&p1).await;
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Shutdown));
    assert!(!info.backend_info.contains_key("vmm_pid"));
    // Shutdown is not terminal on Firecracker through VMCP: boot respawns.
    let rep = h.boot().await.expect("boot again");
    replaced_here(&e, &vm, &h, rep, &p1);
    assert_eq!(console(&e, &vm), MARKER, "console starts over each boot");
    h.delete(true).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn graceful_shutdown_without_i8042_times_out_then_kills() {
    let mut e = env(&[]);
    let vm = id("vm-deaf");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    h.pause().await.expect("pause");
    let started = Instant::now();
    let stopped = h.shutdown(graceful(300)).await.expect("shutdown");
    let took = started.elapsed();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert!(
        took >= Duration::from_millis(300),
        "waited the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    wait_gone(&p).await;
    assert!(
        !e.root().join("vm-deaf/api.sock").exists(),
        "stale socket removed"
    );
    assert_eq!(
        h.sample().await.expect("info").state,
        Some(VmState::Shutdown)
    );
    let again = h.shutdown(FORCE).await.expect("idempotent");
    assert_eq!(again.state, VmState::Shutdown);
    let paused = h.pause().await.expect_err("nothing to pause");
    assert!(matches!(paused, HypervisorError::InvalidState(_)));
    h.delete(false).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn forced_shutdown_kills_at_once() {
    let mut e = env(&[]);
    let vm = id("vm-force");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let started = Instant::now();
    assert_eq!(
        h.shutdown(FORCE).await.expect("shutdown").state,
        VmState::Shutdown
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    wait_gone(&p).await;
    assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
    h.delete(true).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn reboot_is_a_cold_restart() {
    let mut e = env(&[]);
    let vm = id("vm-reboot");
    let (mut h, before) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let rep = h.reboot(false).await.expect("reboot");
    let mid = replaced_here(&e, &vm, &h, rep, &before);
    assert_eq!(pid_of(&h.sample().await.expect("info")), mid.pid);
    assert_eq!(console(&e, &vm), MARKER);
    let rep = h.reboot(true).await.expect("reboot");
    replaced_here(&e, &vm, &h, rep, &mid);
    h.shutdown(FORCE).await.expect("shutdown");
    let refused = h.reboot(true).await.expect_err("not running");
    assert!(matches!(refused, HypervisorError::InvalidState(_)));
    h.delete(true).await.expect("delete");
    e.no_event();
}

/// The replaced-VMM paths: reboot, and boot after shutdown, each start a new
/// process; after each, a restarted backend adopts exactly that process as
/// Running, and delete leaves no process and no runtime directory.
#[tokio::test]
async fn replaced_vmms_survive_a_restart_and_delete_ends_them() {
    let mut e = env(&[]);
    let vm = id("vm-renew");
    let (mut h, first) = e.create(&vm).await;
    h.boot().await.expect("boot");

    let rep = h.reboot(false).await.expect("reboot");
    let second = replaced_here(&e, &vm, &h, rep, &first);
    let mut h = restart(&e, &vm, h, &second).await;

    assert_eq!(h.shutdown(FORCE).await.expect("stop").process, None);
    let rep = h.boot().await.expect("boot after shutdown");
    let third = replaced_here(&e, &vm, &h, rep, &second);
    let found = e.fc.discover().await.expect("discover");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].process, Some(third.clone()));
    let mut h = restart(&e, &vm, h, &third).await;

    h.delete(false).await.expect("delete");
    assert!(!is_alive(third.pid, third.start_time));
    assert!(!e.root().join("vm-renew").exists());
    for p in [&first, &second, &third] {
        assert!(!is_alive(p.pid, p.start_time), "{} still runs", p.pid);
    }
    e.no_event();
}

/// Every exit event names the process that ended; the processes a respawn
/// replaces are ended by VMCP, so their exits are no news.
#[tokio::test]
async fn exits_name_their_pid_and_a_replaced_vmm_is_no_news() {
    let mut e = env(&[]);
    let vm = id("vm-pids");
    let (mut h, first) = e.create(&vm).await;
    h.boot().await.expect("boot");
    kill9(first.pid);
    let (pid, state, _) = e.next_exit(Duration::from_secs(1)).await;
    assert_eq!((pid, state), (first.pid, VmState::Failed));
    let rep = h.boot().await.expect("boot a crashed microVM");
    let second = replaced_here(&e, &vm, &h, rep, &first);
    let rep = h.reboot(true).await.expect("reboot");
    let third = replaced_here(&e, &vm, &h, rep, &second);
    e.no_event();
    kill9(third.pid);
    let (pid, state, _) = e.next_exit(Duration::from_secs(1)).await;
    assert_eq!((pid, state), (third.pid, VmState::Failed));
    h.delete(true).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn delete_kills_reaps_removes_and_is_idempotent() {
    let mut e = env(&[]);
    let vm = id("vm-del");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    h.delete(false).await.expect("delete");
    wait_gone(&p).await;
    assert!(!e.root().join("vm-del").exists());
    h.delete(false).await.expect("delete again");
    assert!(matches!(h.sample().await, Err(HypervisorError::Gone(_))));
    assert!(matches!(h.boot().await, Err(HypervisorError::Gone(_))));
    assert!(!e.root().join("vm-del").exists(), "boot started nothing");
    e.no_event();
}

#[tokio::test]
async fn kill_9_is_failed_within_a_second() {
    let mut e = env(&[]);
    let vm = id("vm-kill");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let killed = Instant::now();
    kill9(p.pid);
    let (pid, state, reason) = e.next_exit(Duration::from_secs(1)).await;
    assert!(killed.elapsed() < Duration::from_secs(1));
    assert_eq!(pid, p.pid);
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("SIGKILL"), "{reason}");
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Failed));
    assert!(info.reason.contains("SIGKILL"), "{}", info.reason);
    h.delete(true).await.expect("delete");
    assert!(!e.root().join("vm-kill").exists());
}

#[tokio::test]
async fn guest_poweroff_is_shutdown_not_failed() {
    let mut e = env(&["--fake-poweroff-after-ms", "100"]);
    let vm = id("vm-off");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let (pid, state, reason) = e.next_exit(Duration::from_secs(2)).await;
    assert_eq!(pid, p.pid);
    assert_eq!(state, VmState::Shutdown, "{reason}");
    assert!(reason.contains("status 0"), "{reason}");
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Shutdown));
    assert!(info.reason.contains("guest"), "{}", info.reason);
    assert_eq!(h.boot().await.expect("boot again").state, VmState::Running);
    h.delete(true).await.expect("delete");
}

#[tokio::test]
async fn vmm_exit_mid_call_is_unavailable_and_failed() {
    let mut e = env(&["--fake-exit-on", "PUT /actions"]);
    let vm = id("vm-midcall");
    let (mut h, p) = e.create(&vm).await;
    let err = h.boot().await.expect_err("VMM died");
    assert!(
        matches!(&err, HypervisorError::Unavailable { message, .. } if message.contains("status 3")),
        "{err:?}"
    );
    let (pid, state, _) = e.next_exit(Duration::from_secs(1)).await;
    assert_eq!((pid, state), (p.pid, VmState::Failed));
    assert_eq!(h.sample().await.expect("info").state, Some(VmState::Failed));
    h.delete(true).await.expect("delete");
}

#[tokio::test]
async fn hung_socket_times_out() {
    let mut e = env(&["--fake-hang-on", "PATCH /vm"]);
    let vm = id("vm-hung");
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let started = Instant::now();
    let err = h.pause().await.expect_err("hung");
    assert!(
        matches!(&err, HypervisorError::Timeout { operation, after }
            if operation == "PATCH /vm" && *after == Duration::from_millis(800)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    h.delete(true).await.expect("delete");
    wait_gone(&p).await;
    e.no_event();
}

#[tokio::test]
async fn start_failure_reports_the_log_and_leaves_nothing() {
    let mut e = env(&["--fake-fail-start"]);
    let vm = id("vm-nostart");
    let err =
        e.fc.create(&vm, &e.config(), e.tx.clone())
            .await
            .expect_err("fails");
    assert!(
        matches!(&err, HypervisorError::SpawnFailed { .. }),
        "{err:?}"
    );
    assert!(
        error_chain(&err).contains("simulated start-up failure"),
        "{err:?}"
    );
    assert!(!e.root().join("vm-nostart").exists());
    e.no_event();
}

#[tokio::test]
async fn never_ready_is_spawn_failed_within_the_deadline() {
    let mut e = env(&["--fake-never-ready"]);
    let vm = id("vm-mute");
    let started = Instant::now();
    let err =
        e.fc.create(&vm, &e.config(), e.tx.clone())
            .await
            .expect_err("fails");
    assert!(
        matches!(&err, HypervisorError::SpawnFailed { message, .. } if message.contains("did not become ready")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!e.root().join("vm-mute").exists());
    e.no_event();
}

#[tokio::test]
async fn config_the_vmm_refuses_is_invalid_config_and_leaves_nothing() {
    let mut e = env(&[]);
    let vm = id("vm-badcfg");
    let mut cfg = e.config();
    cfg.storage = vec![StorageDevice {
        id: "root".into(),
        path: "/nonexistent/root.img".into(),
        is_root_device: true,
        ..Default::default()
    }];
    let err =
        e.fc.create(&vm, &cfg, e.tx.clone())
            .await
            .expect_err("refused");
    let HypervisorError::InvalidConfig(ce) = err else {
        panic!("expected InvalidConfig, got {err:?}");
    };
    assert_eq!(ce.field, "config.storage[0]");
    assert!(ce.reason.contains("No such file"), "{ce}");
    assert!(!e.root().join("vm-badcfg").exists());
    let mut cfg = e.config();
    cfg.boot.kernel_path = "/nonexistent/vmlinux".into();
    let err =
        e.fc.create(&vm, &cfg, e.tx.clone())
            .await
            .expect_err("refused");
    assert!(
        matches!(&err, HypervisorError::InvalidConfig(c) if c.field == "config.boot.kernel_path"),
        "{err:?}"
    );
    e.no_event();
}

#[tokio::test]
async fn validate_rejects_what_firecracker_cannot_honour() {
    let e = env(&[]);
    let mut cfg = e.config();
    cfg.cpu.max_vcpu_count = 4;
    let err = e.fc.validate(&cfg).expect_err("rejected");
    assert_eq!(err.field, "config.cpu.max_vcpu_count");
    assert!(err.reason.contains("firecracker"), "{err}");
    let created =
        e.fc.create(&id("vm-x"), &cfg, e.tx.clone())
            .await
            .expect_err("rejected");
    assert!(matches!(created, HypervisorError::InvalidConfig(_)));
    assert!(!e.root().join("vm-x").exists());
    assert_eq!(e.fc.validate(&e.config()), Ok(()));
}

#[tokio::test]
async fn stale_socket_is_removed_before_spawn() {
    let mut e = env(&[]);
    let vm = id("vm-stale");
    let dir = e.root().join("vm-stale");
    std::fs::create_dir_all(&dir).expect("dir");
    drop(std::os::unix::net::UnixListener::bind(dir.join("api.sock")).expect("bind"));
    let (mut h, _) = e.create(&vm).await;
    h.delete(true).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn vm_ids_firecracker_rejects_still_work() {
    let mut e = env(&[]);
    let vm = id("vm_with.dots");
    let (mut h, _) = e.create(&vm).await;
    let info = h.sample().await.expect("info");
    let iid = &info.backend_info["instance_id"];
    assert!(iid.starts_with("vm-with-dots-"), "{iid}");
    h.delete(true).await.expect("delete");
    e.no_event();
}

#[tokio::test]
async fn adopt_reattaches_to_a_surviving_vmm() {
    let mut first = env(&[]);
    let vm = id("vm-adopt");
    let (mut h1, p) = first.create(&vm).await;
    h1.boot().await.expect("boot");
    // A second backend (a restarted VMCP) over the same runtime root.
    let (tx, mut events) = unbounded_channel();
    let mut settings = first.fc.settings().clone();
    settings.call_timeout = Duration::from_secs(1);
    let second = Firecracker::new(settings);
    let (mut h2, rep) = second
        .adopt(&vm, &first.config(), Some(p.clone()), tx.clone())
        .await
        .expect("adopt");
    assert_eq!(rep.state, VmState::Running);
    assert_eq!(pid_of(&h2.sample().await.expect("info")), p.pid);
    let wrong = VmmProcess {
        start_time: p.start_time + 1,
        ..p.clone()
    };
    assert!(matches!(
        second
            .adopt(&id("vm-other"), &first.config(), Some(wrong), tx)
            .await,
        Err(HypervisorError::Gone(_))
    ));
    kill9(p.pid);
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("adopted exit seen within a second")
        .expect("event");
    assert!(
        matches!(ev, VmmEvent::Exited { pid, state: VmState::Failed, .. } if pid == p.pid),
        "{ev:?}"
    );
    h2.delete(true).await.expect("delete");
    assert!(!first.root().join("vm-adopt").exists());
    // The first backend's reaper saw the kill too.
    let (pid, state, _) = first.next_exit(Duration::from_secs(1)).await;
    assert_eq!((pid, state), (p.pid, VmState::Failed));
    drop(h1);
}

/// The fake run the way VMCP runs a VMM, by a parent that then dies (a
/// crashed VMCP): it goes with its parent unless told to outlive it, as a
/// real VMM does.
#[tokio::test]
async fn the_fake_dies_with_its_parent_unless_told_to_outlive_it() {
    for outlive in [false, true] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let sock = tmp.path().join("api.sock");
        let flag = if outlive { "--fake-outlive-parent" } else { "" };
        let (parent, pid) = crate::real_env::parent_of(&format!(
            "'{}' --fake-parent $$ {flag} --api-sock '{}'",
            fake_binary().display(),
            sock.display()
        ));
        let client = FcClient::new(UdsClient::new(Duration::from_millis(500)), sock);
        // Serving (so its own arrangements are made), then its parent dies.
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.describe().await.is_err() {
            assert!(Instant::now() < deadline, "the fake never answered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        parent.end();
        if outlive {
            // Its parent is gone; it answers all the same.
            assert_eq!(
                client.describe().await.expect("describe").state,
                "Not started"
            );
            kill9(pid);
        } else {
            let gone = crate::harness::eventually(Duration::from_secs(5), || async {
                vmcp::adapters::outbound::vmm::process::read_start_time(pid).is_err()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .is_ok_and(|s| s.contains(") Z "))
            })
            .await;
            assert!(gone, "the fake {pid} outlived its parent");
        }
    }
}

#[tokio::test]
async fn check_reports_the_version_or_what_is_missing() {
    let e = env(&[]);
    let mut settings = e.fc.settings().clone();
    let fake_kvm = e.tmp.path().join("kvm");
    std::fs::write(&fake_kvm, b"").expect("fake kvm");
    settings.kvm_device = fake_kvm;
    let usable = Firecracker::new(settings.clone());
    assert_eq!(
        usable.check().await.expect("check").version,
        "Firecracker v1.16.1"
    );
    // No KVM, and a KVM that opens but not read-write (a directory: refused
    // even to root), are each named, whatever this host has.
    for (kvm, why) in [
        (e.tmp.path().join("no-kvm"), "No such file"),
        (e.tmp.path().to_owned(), "directory"),
    ] {
        settings.kvm_device = kvm.clone();
        let err = Firecracker::new(settings.clone())
            .check()
            .await
            .expect_err("no usable KVM");
        let want = format!("{} cannot be opened read-write", kvm.display());
        assert!(
            matches!(&err, HypervisorError::Unavailable { message, source: Some(s) }
                if *message == want && s.to_string().contains(why)),
            "{err:?}"
        );
    }
    let missing = Firecracker::new(FirecrackerSettings::new(
        "/nonexistent/firecracker",
        e.root(),
    ));
    let err = missing.check().await.expect_err("no binary");
    assert!(
        matches!(&err, HypervisorError::Unavailable { message, .. } if message.contains("/nonexistent/firecracker")),
        "{err:?}"
    );
}

/// A stand-in `jailer`: checks its flags, builds the chroot directory the
/// real one would, records its arguments and execs the fake Firecracker with
/// every path resolved inside that chroot.
const FAKE_JAILER: &str = r#"#!/bin/sh
set -e
base_args="$*"
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --version) echo "Jailer v1.16.1"; exit 0 ;;
    --id) id="$2" ;;
    --exec-file) exe="$2" ;;
    --chroot-base-dir) base="$2" ;;
    --uid|--gid) ;;
    *) echo "unexpected jailer argument $1" >&2; exit 1 ;;
  esac
  shift 2
done
shift
root="$base/$(basename "$exe")/$id/root"
mkdir -p "$root"
echo "$base_args" > "$base/jailer-args"
exec "$exe" --fake-chroot "$root" --id "$id" "$@"
"#;

#[tokio::test]
async fn jailer_mode_stages_files_in_the_chroot_and_cleans_up() {
    use std::os::unix::fs::MetadataExt;
    use vmcp::adapters::outbound::firecracker::jailer::JailerSettings;

    let tmp = tempfile::tempdir().expect("tempdir");
    let jailer = tmp.path().join("jailer");
    std::fs::write(&jailer, FAKE_JAILER).expect("write jailer");
    std::fs::set_permissions(&jailer, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let base = tmp.path().join("jail");
    std::fs::create_dir(&base).expect("chroot base");
    let kernel = kernel_in(tmp.path());
    let disk = tmp.path().join("data.img");
    std::fs::write(&disk, b"data").expect("disk");
    let mut settings = FirecrackerSettings::new(fake_binary(), tmp.path().join("run"));
    settings.jailer = Some(JailerSettings {
        jailer_binary: jailer,
        uid: 1234,
        gid: 5678,
        chroot_base: base.clone(),
    });
    settings.call_timeout = Duration::from_secs(1);
    // A stand-in KVM device, so the check below gets past KVM on any host and
    // must fail on what the jailer needs.
    let kvm = tmp.path().join("kvm");
    std::fs::write(&kvm, b"").expect("stand-in kvm");
    settings.kvm_device = kvm;
    let (tx, mut events) = unbounded_channel();
    let fc = Firecracker::new(settings);
    let mut cfg = VmConfig {
        cpu: vmcp::domain::CpuConfig {
            vcpu_count: 1,
            ..Default::default()
        },
        memory: vmcp::domain::MemoryConfig {
            size_bytes: 64 * MIB,
            ..Default::default()
        },
        boot: vmcp::domain::BootConfig {
            kernel_path: kernel.to_string_lossy().into_owned(),
            ..Default::default()
        },
        storage: vec![StorageDevice {
            id: "data".into(),
            path: disk.to_string_lossy().into_owned(),
            ..Default::default()
        }],
        console: ConsoleConfig {
            enabled: true,
            output: tmp
                .path()
                .join("elsewhere.log")
                .to_string_lossy()
                .into_owned(),
            ..Default::default()
        },
        ..Default::default()
    };
    let refused = fc.validate(&cfg).expect_err("console outside the jail");
    assert_eq!(refused.field, "config.console.output");
    cfg.console.output.clear();

    let vm = id("jailed");
    let (mut h, rep) = fc.create(&vm, &cfg, tx).await.expect("create");
    assert_eq!(rep.state, VmState::Created);
    let p = rep.process.expect("process");
    let root = std::fs::canonicalize(&base)
        .expect("canonical")
        .join("fake-firecracker/jailed/root");
    assert_eq!(p.socket_path, root.join("api.sock").to_string_lossy());
    let args = std::fs::read_to_string(base.join("jailer-args")).expect("jailer args");
    assert!(args.contains("--uid 1234 --gid 5678"), "{args}");
    assert!(args.contains("--id jailed"), "{args}");
    assert!(
        args.ends_with(
            "-- --api-sock /api.sock --level Warning --show-level --metrics-path /metrics.json\n"
        ),
        "{args}"
    );
    // Hard links: the guest's writes reach the caller's files.
    let ino = |p: &Path| std::fs::metadata(p).expect("meta").ino();
    assert_eq!(ino(&root.join("kernel")), ino(&kernel));
    assert_eq!(ino(&root.join("drive_data")), ino(&disk));

    assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
    let console = tmp.path().join("run/jailed/serial.log");
    assert_eq!(
        std::fs::read_to_string(&console).expect("console via link"),
        MARKER
    );
    let info = h.sample().await.expect("info");
    assert_eq!(info.backend_info["jail_root"], root.to_string_lossy());
    assert_eq!(
        info.metrics.network.bytes_received,
        RX_BYTES_PER_FLUSH as i64
    );
    let rebooted = h.reboot(true).await.expect("reboot");
    assert_eq!(rebooted.state, VmState::Running);
    let p2 = rebooted.process.expect("new process");
    assert_ne!(p2.pid, p.pid);
    assert_eq!(p2.socket_path, p.socket_path, "the jail's socket again");
    match fc.check().await {
        Err(HypervisorError::Unavailable { message, .. }) => assert!(
            message.contains("is dynamically linked; the jailer copies only the binary"),
            "{message}"
        ),
        other => panic!("the fake is dynamically linked: {other:?}"),
    }

    h.delete(true).await.expect("delete");
    wait_gone(&p).await;
    wait_gone(&p2).await;
    assert!(
        !root.parent().expect("instance dir").exists(),
        "jail removed"
    );
    assert!(!tmp.path().join("run/jailed").exists());
    assert_eq!(std::fs::read(&disk).expect("caller's disk kept"), b"data");
    assert!(events.try_recv().is_err(), "no unexpected exits");
}

#[tokio::test]
async fn the_console_is_read_through_the_backend_and_resize_and_input_are_refused() {
    let e = env(&[]);
    let vm = id("vm-tty");
    let cfg = e.config();
    let (mut h, _) = e.create(&vm).await;
    h.boot().await.expect("boot");
    let read = || e.fc.read_console(&vm, &cfg, 0, 1024);
    // The fake guest writes its marker right after the start.
    let written = crate::harness::eventually(Duration::from_secs(5), || async {
        !read().await.expect("read").data.is_empty()
    })
    .await;
    assert!(written);
    assert_eq!(read().await.expect("read").data, MARKER.as_bytes());
    assert!(matches!(
        e.fc.can_resize(),
        Err(HypervisorError::Unsupported(m)) if m.contains("firecracker")
    ));
    let size = VmSize {
        vcpu_count: 2,
        memory_bytes: 128 * MIB,
    };
    assert!(matches!(
        h.resize(size).await,
        Err(HypervisorError::Unsupported(_))
    ));
    match h.write_console(b"x".to_vec()).await {
        Err(HypervisorError::Unsupported(m)) => assert!(m.contains("stdin"), "{m}"),
        other => panic!("write_console: {other:?}"),
    }
    h.delete(true).await.expect("delete");
}
