//! The Firecracker adapter against the real `firecracker` (v1.16) with the
//! tiny test guest: full lifecycle, the replaced-VMM paths (reboot, boot
//! after shutdown) surviving a restart and ended by delete, kill -9, 8
//! concurrent microVMs, 20 create/boot/delete cycles with nothing leaked,
//! the jailer (as root), and a measurement of spawn-to-API-ready time. Each test runs only when the
//! binary (`VMCP_TEST_FC_BINARY` or `firecracker` on PATH), /dev/kvm and the
//! guest (`VMCP_TEST_GUEST_KERNEL` or `.cache/guest/vmcp-test-guest.elf` from
//! `make guest`) exist; otherwise it prints one `SKIPPED:` line and returns.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use vmcp::adapters::outbound::firecracker::jailer::{self, JailerSettings};
use vmcp::adapters::outbound::firecracker::{FcVm, Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::domain::{BootConfig, ConsoleConfig, CpuConfig, MemoryConfig, VmConfig, VmId, VmState};
use vmcp::ports::{Hypervisor, ShutdownMode, VmmEvent, VmmHandle, VmmProcess};

use super::real_env::{Real, Vmm, kill9, on_path, replaced, require, restart_and_adopt, say};

const MARKER: &str = "VMCP-GUEST-OK";

/// Real-VMM tests share two cores; running them one at a time keeps their
/// timings meaningful and the leak check's fd count clean.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn real(test: &str) -> Option<Real> {
    require(Vmm::Firecracker, test)
}

struct Env {
    tmp: tempfile::TempDir,
    fc: Arc<Firecracker>,
    tx: UnboundedSender<VmmEvent>,
    events: UnboundedReceiver<VmmEvent>,
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
            fc: Arc::new(Firecracker::new(settings)),
            tmp,
            tx,
            events,
            kernel: r.kernel.clone(),
        }
    }

    async fn create(&self, vm: &VmId) -> (FcVm, VmmProcess) {
        let (h, rep) = self
            .fc
            .create(vm, &self.config(), self.tx.clone())
            .await
            .expect("create");
        assert_eq!(rep.state, VmState::Created);
        (h, rep.process.expect("a process"))
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

async fn pid(h: &mut FcVm) -> u32 {
    h.sample().await.expect("info").backend_info["vmm_pid"]
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

/// A VMCP restart: a new backend over the same settings adopts `p`.
async fn restart(e: &Env, vm: &VmId, h: FcVm, p: &VmmProcess) -> FcVm {
    let restarted = Firecracker::new(e.fc.settings().clone());
    restart_and_adopt(&restarted, vm, &e.config(), h, p, e.tx.clone()).await
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
    let (mut h, p1) = e.create(&vm).await;
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Created));
    assert!(info.backend_info["vmm_version"].starts_with("Firecracker v1.16"));
    // What Firecracker itself holds, asked on its socket.
    let held = super::real_env::vm_config_of(info.process.as_ref().expect("a process")).await;
    assert_eq!(held["machine-config"]["mem_size_mib"], 64);
    assert_eq!(held["boot-source"]["boot_args"], "console=ttyS0");

    assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
    e.marker(&vm).await;
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Running));
    assert!(info.metrics.memory_usage_bytes > 0);

    assert_eq!(h.pause().await.expect("pause").state, VmState::Paused);
    assert_eq!(h.sample().await.expect("info").state, Some(VmState::Paused));
    assert_eq!(h.resume().await.expect("resume").state, VmState::Running);

    // Reboot is VMCP's cold restart: a new process and a fresh console.
    let rep = h.reboot(false).await.expect("reboot");
    let p2 = replaced(&h, rep, &p1);
    assert_eq!(pid(&mut h).await, p2.pid);
    e.marker(&vm).await;
    assert_eq!(e.console(&vm).matches(MARKER).count(), 1);

    // The tiny guest has no i8042 driver: Ctrl-Alt-Del is ignored, so the
    // graceful shutdown waits the whole timeout and then kills.
    let started = Instant::now();
    let stopped = h
        .shutdown(ShutdownMode {
            force: false,
            graceful_timeout: Duration::from_secs(1),
        })
        .await
        .expect("graceful shutdown");
    let took = started.elapsed();
    assert_eq!(stopped.state, VmState::Shutdown);
    assert_eq!(stopped.process, None);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert_eq!(
        h.sample().await.expect("info").state,
        Some(VmState::Shutdown)
    );

    let rep = h.boot().await.expect("boot again");
    let p3 = replaced(&h, rep, &p2);
    e.marker(&vm).await;
    let stopped = h
        .shutdown(ShutdownMode {
            force: true,
            graceful_timeout: Duration::ZERO,
        })
        .await
        .expect("forced shutdown");
    assert_eq!(stopped.state, VmState::Shutdown);
    assert!(
        !e.root().join("life/api.sock").exists(),
        "stale socket removed"
    );
    let rep = h.boot().await.expect("boot after force");
    let p4 = replaced(&h, rep, &p3);
    e.marker(&vm).await;

    h.delete(false).await.expect("delete");
    for p in [&p1, &p2, &p3, &p4] {
        assert!(!is_alive(p.pid, p.start_time), "VMM {} still runs", p.pid);
    }
    assert!(!e.root().join("life").exists());
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
    eprintln!(
        "REAL: real_fc_full_lifecycle: pids {} -> {} -> {} -> {}, graceful shutdown took {took:?}",
        p1.pid, p2.pid, p3.pid, p4.pid
    );
}

/// The replaced-VMM paths on the real binary: reboot and boot after
/// shutdown each start a new process; after each a restarted backend adopts
/// exactly that process as Running; delete then leaves no process and no
/// runtime directory.
#[tokio::test]
async fn real_fc_replaced_vmms_survive_a_restart_and_delete_ends_them() {
    let Some(r) = real("real_fc_replaced_vmms_survive_a_restart_and_delete_ends_them") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut e = Env::new(&r, None);
    let vm = id("renew");
    let (mut h, p1) = e.create(&vm).await;
    h.boot().await.expect("boot");
    e.marker(&vm).await;

    let rep = h.reboot(true).await.expect("reboot");
    let p2 = replaced(&h, rep, &p1);
    e.marker(&vm).await;
    let mut h = restart(&e, &vm, h, &p2).await;

    h.shutdown(ShutdownMode {
        force: true,
        graceful_timeout: Duration::ZERO,
    })
    .await
    .expect("shutdown");
    let rep = h.boot().await.expect("boot after shutdown");
    let p3 = replaced(&h, rep, &p2);
    e.marker(&vm).await;
    let found = e.fc.discover().await.expect("discover");
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].process,
        Some(p3.clone()),
        "discovery sees the new process"
    );
    let mut h = restart(&e, &vm, h, &p3).await;

    h.delete(false).await.expect("delete");
    for p in [&p1, &p2, &p3] {
        assert!(!is_alive(p.pid, p.start_time), "{} still runs", p.pid);
    }
    assert!(!e.root().join("renew").exists());
    assert!(e.events.try_recv().is_err(), "no unexpected exits");
    eprintln!(
        "REAL: real_fc_replaced_vmms: pids {} -> {} (reboot) -> {} (boot after shutdown), each adopted after a restart",
        p1.pid, p2.pid, p3.pid
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
    let (mut h, p) = e.create(&vm).await;
    h.boot().await.expect("boot");
    e.marker(&vm).await;
    let killed = Instant::now();
    kill9(p.pid);
    let ev = tokio::time::timeout(Duration::from_secs(1), e.events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    let seen = killed.elapsed();
    let VmmEvent::Exited { pid, state, reason } = ev else {
        panic!("Firecracker has no event stream: {ev:?}");
    };
    assert_eq!(pid, p.pid, "the event names the process that died");
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("SIGKILL"), "{reason}");
    let info = h.sample().await.expect("info");
    assert_eq!(info.state, Some(VmState::Failed));
    h.delete(true).await.expect("delete");
    assert!(!is_alive(p.pid, p.start_time));
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
        let tx = e.tx.clone();
        tasks.spawn(async move {
            let vm = id(&format!("c{i}"));
            let (mut h, rep) = fc.create(&vm, &cfg, tx).await.expect("create");
            assert_eq!(rep.state, VmState::Created);
            assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
            assert_eq!(h.pause().await.expect("pause").state, VmState::Paused);
            assert_eq!(h.resume().await.expect("resume").state, VmState::Running);
            (vm, h, rep.process.expect("process"))
        });
    }
    let mut vms = Vec::new();
    while let Some(done) = tasks.join_next().await {
        vms.push(done.expect("task"));
    }
    let up = started.elapsed();
    assert_eq!(vms.len(), 8);
    for (vm, h, _) in &mut vms {
        e.marker(vm).await;
        assert_eq!(
            h.sample().await.expect("info").state,
            Some(VmState::Running)
        );
    }
    let mut deletes = tokio::task::JoinSet::new();
    for (_, mut h, p) in vms {
        deletes.spawn(async move {
            h.delete(true).await.expect("delete");
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
    let (mut h, _) = e.create(&warm).await;
    h.boot().await.expect("boot");
    h.sample().await.expect("info");
    h.delete(true).await.expect("delete");
    drop(h);
    let fds_before = open_fds();
    let started = Instant::now();
    let mut procs = Vec::new();
    for i in 0..20 {
        let vm = id(&format!("cycle{i}"));
        let (mut h, p) = e.create(&vm).await;
        assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
        h.sample().await.expect("info");
        h.delete(true).await.expect("delete");
        drop(h);
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
        super::skips::skip(
            "real_fc_jailer_lifecycle",
            "needs root and a jailer binary (VMCP_TEST_FC_JAILER_BINARY, beside firecracker, or on PATH)",
        );
        return;
    };
    if jailer::needs_loader(&r.binary).unwrap_or(true) {
        super::skips::skip(
            "real_fc_jailer_lifecycle",
            &format!(
                "{} is dynamically linked; the jailer needs a static (musl) firecracker build",
                r.binary.display()
            ),
        );
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
    let (mut h, p) = e.create(&vm).await;
    assert!(
        p.socket_path.starts_with(&*chroot.path().to_string_lossy()),
        "{}",
        p.socket_path
    );
    assert_eq!(h.boot().await.expect("boot").state, VmState::Running);
    e.marker(&vm).await;
    let info = h.sample().await.expect("info");
    let jail_root = std::fs::canonicalize(chroot.path())
        .expect("canonical")
        .join("firecracker/jailed/root");
    assert_eq!(
        info.backend_info["jail_root"],
        jail_root.to_string_lossy(),
        "the jail is where the jailer was told to build it"
    );
    let rep = h.reboot(true).await.expect("reboot");
    let p2 = replaced(&h, rep, &p);
    e.marker(&vm).await;
    // A restarted VMCP recognises the jailed process by its root, the jail's.
    let found = e.fc.discover().await.expect("discover");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].process, Some(p2.clone()));
    h.delete(true).await.expect("delete");
    wait_gone(&p).await;
    wait_gone(&p2).await;
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
