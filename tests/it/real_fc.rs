//! The Firecracker adapter against the real `firecracker` (v1.16) with the
//! tiny test guest: full lifecycle, kill -9, 8 concurrent microVMs, 20
//! create/boot/delete cycles with nothing leaked, the jailer (as root), and a
//! measurement of spawn-to-API-ready time. Each test runs only when the
//! binary (`VMCP_TEST_FC_BINARY` or `firecracker` on PATH), /dev/kvm and the
//! guest (`VMCP_TEST_GUEST_KERNEL` or `.cache/guest/vmcp-test-guest.elf` from
//! `make guest`) exist; otherwise it prints one `SKIPPED:` line and returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use vmcp::adapters::outbound::firecracker::jailer::{self, JailerSettings};
use vmcp::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::domain::{BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, VmConfig, VmId, VmState};
use vmcp::ports::{BackendEvent, Hypervisor, ShutdownMode, VmmProcess};

use super::real_env::{Real, Vmm, on_path, require, say};

const MARKER: &str = "VMCP-GUEST-OK";

/// Writes a line straight to stderr, past the test harness's capture, so
/// Real-VMM tests share two cores; running them one at a time keeps their
/// timings meaningful and the leak check's fd count clean.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn real(test: &str) -> Option<Real> {
    require(Vmm::Firecracker, test)
}

struct Env {
    tmp: tempfile::TempDir,
    fc: Arc<Firecracker>,
    events: UnboundedReceiver<BackendEvent>,
    kernel: PathBuf,
}

impl Env {
    fn new(r: &Real, jailer: Option<JailerSettings>) -> Self {
        // Short paths: the API socket must fit in 108 bytes.
        let tmp = tempfile::Builder::new()
            .prefix("vfc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut settings = FirecrackerSettings::new(&r.binary, tmp.path().join("run"));
        settings.jailer = jailer;
        settings.reboot_grace = Duration::from_millis(500);
        let (tx, events) = unbounded_channel();
        Self {
            fc: Arc::new(Firecracker::new(settings, tx)),
            tmp,
            events,
            kernel: r.kernel.clone(),
        }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("run")
    }

    fn config(&self) -> VmConfig {
        VmConfig {
            cpu: CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            },
            memory: MemoryConfig {
                size_bytes: 64 << 20,
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

    fn console(&self, vm: &VmId) -> String {
        std::fs::read_to_string(self.root().join(vm.as_str()).join("serial.log"))
            .unwrap_or_default()
    }

    /// Waits (polling, up to 5 s) until the console holds the guest's marker.
    async fn marker(&self, vm: &VmId) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.console(vm).contains(MARKER) {
            assert!(
                Instant::now() < deadline,
                "no marker from {vm}: {:?}",
                self.console(vm)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn id(s: &str) -> VmId {
    VmId::parse(s).expect("valid id")
}

async fn pid(fc: &Firecracker, vm: &VmId) -> u32 {
    fc.info(vm).await.expect("info").backend_info["pid"]
        .parse()
        .expect("pid")
}

async fn wait_gone(p: &VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(p.pid, p.start_time) {
        assert!(Instant::now() < deadline, "process {} still alive", p.pid);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

#[tokio::test]
async fn real_fc_full_lifecycle() {
    let Some(r) = real("real_fc_full_lifecycle") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut e = Env::new(&r, None);
    let vm = id("life");
    let (state, p1) = e.fc.create(&vm, &e.config()).await.expect("create");
    assert_eq!(state, VmState::Created);
    let info = e.fc.info(&vm).await.expect("info");
    assert_eq!(info.state, Some(VmState::Created));
    assert!(info.backend_info["vmm_version"].starts_with("Firecracker v1.16"));
    let held: serde_json::Value =
        serde_json::from_str(&info.backend_info["vm_config"]).expect("vm_config");
    assert_eq!(held["machine-config"]["mem_size_mib"], 64);
    assert_eq!(held["boot-source"]["boot_args"], "console=ttyS0");

    assert_eq!(e.fc.boot(&vm).await.expect("boot"), VmState::Running);
    e.marker(&vm).await;
    let info = e.fc.info(&vm).await.expect("info");
    assert_eq!(info.state, Some(VmState::Running));
    assert!(info.metrics.memory_usage_bytes > 0);

    assert_eq!(e.fc.pause(&vm).await.expect("pause"), VmState::Paused);
    assert_eq!(
        e.fc.info(&vm).await.expect("info").state,
        Some(VmState::Paused)
    );
    assert_eq!(e.fc.resume(&vm).await.expect("resume"), VmState::Running);

    // Reboot is VMCP's cold restart: a new process and a fresh console.
    assert_eq!(
        e.fc.reboot(&vm, false).await.expect("reboot"),
        VmState::Running
    );
    let p2 = pid(&e.fc, &vm).await;
    assert_ne!(p2, p1.pid);
    e.marker(&vm).await;
    assert_eq!(e.console(&vm).matches(MARKER).count(), 1);

    // The tiny guest has no i8042 driver: Ctrl-Alt-Del is ignored, so the
    // graceful shutdown waits the whole timeout and then kills.
    let started = Instant::now();
    let state =
        e.fc.shutdown(
            &vm,
            ShutdownMode {
                force: false,
                graceful_timeout: Duration::from_secs(1),
            },
        )
        .await
        .expect("graceful shutdown");
    let took = started.elapsed();
    assert_eq!(state, VmState::Shutdown);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert_eq!(
        e.fc.info(&vm).await.expect("info").state,
        Some(VmState::Shutdown)
    );

    assert_eq!(e.fc.boot(&vm).await.expect("boot again"), VmState::Running);
    e.marker(&vm).await;
    let p3 = pid(&e.fc, &vm).await;
    let state =
        e.fc.shutdown(
            &vm,
            ShutdownMode {
                force: true,
                graceful_timeout: Duration::ZERO,
            },
        )
        .await
        .expect("forced shutdown");
    assert_eq!(state, VmState::Shutdown);
    assert!(
        !e.root().join("life/api.sock").exists(),
        "stale socket removed"
    );
    assert_eq!(
        e.fc.boot(&vm).await.expect("boot after force"),
        VmState::Running
    );
    let p4 = pid(&e.fc, &vm).await;
    assert_ne!(p3, p4);
    e.marker(&vm).await;

    e.fc.delete(&vm, false).await.expect("delete");
    assert!(!e.root().join("life").exists());
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
    eprintln!(
        "REAL: real_fc_full_lifecycle: pids {} -> {p2} -> {p3} -> {p4}, graceful shutdown took {took:?}",
        p1.pid
    );
}

#[tokio::test]
async fn real_fc_kill_9_is_failed() {
    let Some(r) = real("real_fc_kill_9_is_failed") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut e = Env::new(&r, None);
    let vm = id("killed");
    let (_, p) = e.fc.create(&vm, &e.config()).await.expect("create");
    e.fc.boot(&vm).await.expect("boot");
    e.marker(&vm).await;
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-9", &p.pid.to_string()])
        .status()
        .expect("kill");
    let ev = tokio::time::timeout(Duration::from_secs(1), e.events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    let seen = killed.elapsed();
    let BackendEvent::Exited { state, reason, .. } = ev;
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("SIGKILL"), "{reason}");
    let info = e.fc.info(&vm).await.expect("info");
    assert_eq!(info.state, Some(VmState::Failed));
    e.fc.delete(&vm, true).await.expect("delete");
    assert!(!e.root().join("killed").exists());
    eprintln!("REAL: real_fc_kill_9_is_failed: Failed reported after {seen:?}");
}

#[tokio::test]
async fn real_fc_eight_concurrent_microvms() {
    let Some(r) = real("real_fc_eight_concurrent_microvms") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut e = Env::new(&r, None);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let fc = e.fc.clone();
        let cfg = e.config();
        tasks.spawn(async move {
            let vm = id(&format!("c{i}"));
            let (s, p) = fc.create(&vm, &cfg).await.expect("create");
            assert_eq!(s, VmState::Created);
            assert_eq!(fc.boot(&vm).await.expect("boot"), VmState::Running);
            assert_eq!(fc.pause(&vm).await.expect("pause"), VmState::Paused);
            assert_eq!(fc.resume(&vm).await.expect("resume"), VmState::Running);
            (vm, p)
        });
    }
    let mut vms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        vms.push(done.expect("task"));
    }
    let up = started.elapsed();
    assert_eq!(vms.len(), 8);
    for (vm, _) in &vms {
        e.marker(vm).await;
        assert_eq!(
            e.fc.info(vm).await.expect("info").state,
            Some(VmState::Running)
        );
    }
    let mut deletes = tokio::task::JoinSet::new();
    for (vm, p) in vms.clone() {
        let fc = e.fc.clone();
        deletes.spawn(async move {
            fc.delete(&vm, true).await.expect("delete");
            p
        });
    }
    while let Some(done) = deletes.join_next().await {
        wait_gone(&done.expect("task")).await;
    }
    assert_eq!(
        std::fs::read_dir(e.root()).expect("root").count(),
        0,
        "no runtime dirs left"
    );
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
    eprintln!("REAL: real_fc_eight_concurrent_microvms: 8 created+booted+paused+resumed in {up:?}");
}

#[tokio::test]
async fn real_fc_twenty_cycles_leak_nothing() {
    let Some(r) = real("real_fc_twenty_cycles_leak_nothing") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut e = Env::new(&r, None);
    // One warm-up cycle so lazily opened handles (the version probe, the
    // connection pool's machinery) are not counted as leaks.
    let warm = id("warm");
    e.fc.create(&warm, &e.config()).await.expect("create");
    e.fc.boot(&warm).await.expect("boot");
    e.fc.info(&warm).await.expect("info");
    e.fc.delete(&warm, true).await.expect("delete");
    let fds_before = open_fds();
    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..20 {
        let vm = id(&format!("cycle{i}"));
        let (_, p) = e.fc.create(&vm, &e.config()).await.expect("create");
        assert_eq!(e.fc.boot(&vm).await.expect("boot"), VmState::Running);
        e.fc.info(&vm).await.expect("info");
        e.fc.delete(&vm, true).await.expect("delete");
        procs.push(p);
    }
    let took = started.elapsed();
    for p in &procs {
        wait_gone(p).await;
    }
    assert_eq!(
        std::fs::read_dir(e.root()).expect("root").count(),
        0,
        "no runtime directory, socket or log left"
    );
    // Pooled connections to dead VMMs close as their peers go away.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut fds_after = open_fds();
    while fds_after >= fds_before + 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        fds_after = open_fds();
    }
    assert!(
        fds_after < fds_before + 20,
        "a descriptor per cycle leaked: {fds_before} -> {fds_after}"
    );
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
    eprintln!(
        "REAL: real_fc_twenty_cycles_leak_nothing: 20 cycles in {took:?}, fds {fds_before} -> {fds_after}"
    );
}

#[tokio::test]
async fn real_fc_jailer_lifecycle() {
    let Some(r) = real("real_fc_jailer_lifecycle") else {
        return;
    };
    let jailer = std::env::var_os("VMCP_TEST_FC_JAILER_BINARY")
        .map(PathBuf::from)
        .or_else(|| r.binary.parent().map(|d| d.join("jailer")))
        .filter(|p| p.is_file())
        .or_else(|| on_path("jailer"));
    let root = rustix::process::geteuid().is_root();
    let Some(jailer) = jailer.filter(|_| root) else {
        say(
            "SKIPPED: real_fc_jailer_lifecycle: needs root and a jailer binary (VMCP_TEST_FC_JAILER_BINARY, beside firecracker, or on PATH)",
        );
        return;
    };
    if jailer::needs_loader(&r.binary).unwrap_or(true) {
        say(&format!(
            "SKIPPED: real_fc_jailer_lifecycle: {} is dynamically linked; the jailer needs a static (musl) firecracker build",
            r.binary.display()
        ));
        return;
    }
    let _serial = SERIAL.lock().await;
    let chroot = tempfile::Builder::new()
        .prefix("vjl")
        .tempdir_in("/tmp")
        .expect("chroot base");
    // The guest kernel is hard-linked into the jail, so it must be on the
    // chroot base's filesystem; copy it there.
    let kernel = chroot.path().join("guest.elf");
    std::fs::copy(&r.kernel, &kernel).expect("copy kernel");
    let r = Real {
        binary: r.binary,
        kernel,
    };
    let mut e = Env::new(
        &r,
        Some(JailerSettings {
            jailer_binary: jailer,
            uid: 65534,
            gid: 65534,
            chroot_base: chroot.path().to_owned(),
        }),
    );
    let vm = id("jailed");
    let (state, p) = e.fc.create(&vm, &e.config()).await.expect("create");
    assert_eq!(state, VmState::Created);
    assert!(
        p.socket_path.starts_with(&*chroot.path().to_string_lossy()),
        "{}",
        p.socket_path
    );
    assert_eq!(e.fc.boot(&vm).await.expect("boot"), VmState::Running);
    e.marker(&vm).await;
    let info = e.fc.info(&vm).await.expect("info");
    assert!(info.backend_info.contains_key("jail_root"));
    assert_eq!(
        e.fc.reboot(&vm, true).await.expect("reboot"),
        VmState::Running
    );
    e.marker(&vm).await;
    e.fc.delete(&vm, true).await.expect("delete");
    wait_gone(&p).await;
    let jail_dir = std::fs::canonicalize(chroot.path())
        .expect("canonical")
        .join("firecracker")
        .join("jailed");
    assert!(!jail_dir.exists(), "jail removed");
    assert!(!e.root().join("jailed").exists());
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
}

#[tokio::test]
async fn real_fc_spawn_to_api_ready() {
    let Some(r) = real("real_fc_spawn_to_api_ready") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::Builder::new()
        .prefix("vfr")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let http = UdsClient::new(Duration::from_secs(1));
    let mut samples = Vec::new();
    for i in 0..10 {
        let sock = tmp.path().join(format!("s{i}.sock"));
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&r.binary)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--level", "Warning"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let deadline = started + Duration::from_secs(5);
        loop {
            let answered = http
                .call(&sock, http::Method::GET, "/", None)
                .await
                .is_ok_and(|resp| resp.is_success());
            if answered {
                break;
            }
            assert!(Instant::now() < deadline, "firecracker never answered");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        samples.push(started.elapsed());
        child.start_kill().expect("kill");
        child.wait().await.expect("reap");
    }
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    say(&format!(
        "MEASURED: firecracker spawn-to-API-ready over {} spawns: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        samples.len(),
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    ));
    assert!(samples[samples.len() / 2] < Duration::from_secs(2));
}
