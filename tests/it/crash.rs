//! kill -9 of the vmcp-api process in the middle of CreateVm, BootVm,
//! DeleteVm, SnapshotVm and RestoreVm, then a restart: the next start must converge, with every VM
//! accounted for, the store equal to what the VMMs report, and no stray VMM
//! process or runtime directory. The VMMs are fake Cloud Hypervisors running
//! as real processes that outlive VMCP, like real VMMs do, serving one request
//! at a time; each case makes the fake hang on (or be slow to answer) the
//! endpoint of the step being interrupted, so the crash lands while that call
//! is in flight. A VMM that finished the step after VMCP died is adopted; one
//! whose API stays wedged is ended, not left running beside its VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::CallOptions;
use vmcp::adapters::outbound::vmm::backend::STARTED_MARK;
use vmcp::adapters::outbound::vmm::process::is_alive;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::fake_ch::{Behaviour, install};
use super::harness::{ApiProcess, Wire, client_for, free_port, vmcp_api_env, wait_serving};
use super::skips::skip;

struct Case {
    dir: tempfile::TempDir,
    pids: PathBuf,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vc")
            .tempdir_in("/tmp")
            .unwrap();
        let pids = dir.path().join("pids");
        std::fs::create_dir(&pids).unwrap();
        Self { dir, pids }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts vmcp-api with a fake CH that hangs on `hang_on`.
    async fn start(&self, hang_on: &[&str]) -> ApiProcess {
        let behaviour = Behaviour {
            hang_on: hang_on.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        self.start_with(&format!("bin-{}", hang_on.join("-")), behaviour, 30)
            .await
    }

    /// Starts vmcp-api with a fake CH behaving as `behaviour` (installed as
    /// `name`), whose processes outlive VMCP and record their pids, and a
    /// hypervisor call timeout of `timeout_s` seconds.
    async fn start_with(&self, name: &str, behaviour: Behaviour, timeout_s: u32) -> ApiProcess {
        let behaviour = Behaviour {
            pid_dir: Some(self.pids.display().to_string()),
            outlive_parent: true,
            ..behaviour
        };
        let bin = install(&self.path(name), &behaviour);
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmcp-api"));
        vmcp_api_env(&mut cmd, self.dir.path(), port);
        let child = cmd
            .env("UNKEY_VMCP_CH_BINARY", &bin)
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env(
                "UNKEY_VMCP_HYPERVISOR_TIMEOUT_SECONDS",
                timeout_s.to_string(),
            )
            .spawn()
            .expect("vmcp-api starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_serving(addr, Duration::from_secs(20)).await;
        ApiProcess { child, addr }
    }

    /// The fake VMM processes still alive.
    fn live_vmms(&self) -> Vec<u32> {
        std::fs::read_dir(&self.pids)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .filter_map(|s| {
                let mut it = s.split_whitespace();
                Some((
                    it.next()?.parse::<u32>().ok()?,
                    it.next()?.parse::<u64>().ok()?,
                ))
            })
            .filter(|(pid, start)| is_alive(*pid, *start))
            .map(|(pid, _)| pid)
            .collect()
    }

    /// What the runtime root holds besides the mark of VMCP's start.
    fn runtime_entries(&self) -> Vec<String> {
        entries(&self.path("rt"))
    }

    /// What a host restart does to the runtime root (tmpfs) and the VMMs.
    fn host_restart(&self) {
        for pid in self.live_vmms() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        let rt = self.path("rt");
        std::fs::remove_dir_all(&rt).expect("empty the runtime root");
        std::fs::create_dir(&rt).expect("runtime root");
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        for pid in self.live_vmms() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The names in `dir`, without the mark each VMCP start leaves in its runtime root.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != STARTED_MARK)
                .collect()
        })
        .unwrap_or_default()
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn kill9(v: &mut ApiProcess) {
    let _ = Command::new("kill")
        .args(["-9", &v.child.id().to_string()])
        .status();
    let _ = v.child.wait();
}

/// A create request whose kernel exists (the fake VMM checks it at boot, like CH).
fn create(case: &Case, id: &str) -> pb::CreateVmRequest {
    let kernel = case.path("kernel.elf");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let mut req = super::harness::create_req(id);
    req.config
        .get_or_insert_default()
        .boot
        .get_or_insert_default()
        .kernel_path = kernel.display().to_string();
    req
}

fn short() -> CallOptions {
    CallOptions::default().with_timeout(Duration::from_millis(400))
}

fn st(v: buffa::EnumValue<S>) -> S {
    v.as_known().expect("known state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_create_converges() {
    if !kvm_usable() {
        return skip(
            "kill_9_mid_create_converges",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    let mut v = case.start(&["vm.create"]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let err = c
        .create_vm_with_options(create(&case, "a"), short())
        .await
        .expect_err("vm.create hangs");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    assert_eq!(
        case.live_vmms().len(),
        1,
        "the VMM was spawned before the crash"
    );
    kill9(&mut v);

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    assert_eq!(
        list.total_count, 0,
        "a create that never completed leaves no VM"
    );
    assert!(
        case.live_vmms().is_empty(),
        "its half-created VMM was removed: {:?}",
        case.live_vmms()
    );
    assert!(
        case.runtime_entries().is_empty(),
        "no runtime dir left: {:?}",
        case.runtime_entries()
    );
    // The retried create succeeds.
    let again = c
        .create_vm(create(&case, "a"))
        .await
        .expect("retry")
        .into_owned();
    assert_eq!(st(again.state), S::VM_STATE_CREATED);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "a".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
}

/// The created record is committed, not flushed, before CreateVm answers; a
/// power loss can take it, leaving the create's intent. So after a host
/// restart an intent-only create is kept as a bootable VM (its create may have
/// been answered), while in the same boot (above) it is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_short_by_a_host_restart_is_kept_bootable() {
    if !kvm_usable() {
        return skip(
            "a_create_cut_short_by_a_host_restart_is_kept_bootable",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    let mut v = case.start(&["vm.create"]).await;
    assert!(
        case.path("rt").join(STARTED_MARK).is_file(),
        "the start left its mark: {:?}",
        entries(&case.path("rt"))
    );
    let c = client_for(v.addr, Wire::ConnectProto);
    let err = c
        .create_vm_with_options(create(&case, "h"), short())
        .await
        .expect_err("vm.create hangs");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    assert_eq!(case.live_vmms().len(), 1, "the VMM was spawned");
    kill9(&mut v);
    case.host_restart();

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "h".into(),
            ..Default::default()
        })
        .await
        .expect("kept")
        .into_owned();
    assert_eq!(
        (st(info.state), info.state_reason.as_str()),
        (S::VM_STATE_SHUTDOWN, "host restarted")
    );
    let booted = c
        .boot_vm(pb::BootVmRequest {
            vm_id: "h".into(),
            ..Default::default()
        })
        .await
        .expect("bootable")
        .into_owned();
    assert_eq!(st(booted.state), S::VM_STATE_RUNNING);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "h".into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(case.live_vmms().is_empty(), "{:?}", case.live_vmms());
    assert!(
        case.runtime_entries().is_empty(),
        "{:?}",
        case.runtime_entries()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_boot_converges() {
    if !kvm_usable() {
        return skip(
            "kill_9_mid_boot_converges",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    // The VMM boots at once but answers 3 s later, and serves nothing else
    // meanwhile: VMCP dies waiting, and the next one finds the VMM busy.
    let slow = Behaviour {
        slow: [("vm.boot".to_owned(), 3000)].into(),
        ..Default::default()
    };
    let mut v = case.start_with("bin-slow-boot", slow, 30).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    c.create_vm(create(&case, "b")).await.expect("create");
    let pid_before = case.live_vmms();
    let err = c
        .boot_vm_with_options(
            pb::BootVmRequest {
                vm_id: "b".into(),
                ..Default::default()
            },
            short(),
        )
        .await
        .expect_err("vm.boot is answered late");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    kill9(&mut v);
    assert_eq!(case.live_vmms(), pid_before, "the VMM outlived VMCP");

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "b".into(),
            ..Default::default()
        })
        .await
        .expect("re-adopted")
        .into_owned();
    assert_eq!(
        st(info.state),
        S::VM_STATE_RUNNING,
        "the boot the VMM finished after VMCP died: {}",
        info.state_reason
    );
    let pid: u32 = info
        .backend_info
        .get("vmm_pid")
        .and_then(|p| p.parse().ok())
        .expect("pid");
    assert_eq!(
        vec![pid],
        pid_before,
        "the same VMM was adopted, not a new one"
    );
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    assert_eq!(list.total_count, 1);
    assert_eq!(
        st(list.vms[0].state),
        st(info.state),
        "the record equals what the VMM reports"
    );
    assert_eq!(case.runtime_entries(), vec!["b".to_owned()]);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "b".into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(case.live_vmms().is_empty());
}

/// The VMM's API hangs for good mid-boot (nothing is answered any more):
/// the next VMCP cannot adopt it, ends it instead of leaving it beside a VM
/// that has no VMM, says so, and the VM boots in a fresh VMM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_a_wedged_vmm_converges() {
    if !kvm_usable() {
        return skip(
            "kill_9_with_a_wedged_vmm_converges",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    let wedged = Behaviour {
        hang_on: vec!["vm.boot".into()],
        ..Default::default()
    };
    let mut v = case.start_with("bin-wedged", wedged, 2).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    c.create_vm(create(&case, "w")).await.expect("create");
    let stuck = case.live_vmms();
    assert_eq!(stuck.len(), 1);
    let err = c
        .boot_vm_with_options(
            pb::BootVmRequest {
                vm_id: "w".into(),
                ..Default::default()
            },
            short(),
        )
        .await
        .expect_err("vm.boot hangs");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    kill9(&mut v);
    assert_eq!(case.live_vmms(), stuck, "the VMM outlived VMCP");

    let v = case
        .start_with("bin-healthy", Behaviour::default(), 2)
        .await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "w".into(),
            ..Default::default()
        })
        .await
        .expect("still listed")
        .into_owned();
    assert_eq!(
        st(info.state),
        S::VM_STATE_SHUTDOWN,
        "{}",
        info.state_reason
    );
    assert!(
        info.state_reason.starts_with(&format!(
            "its VMM (pid {}) could not be adopted when VMCP started and was ended: ",
            stuck[0]
        )),
        "{}",
        info.state_reason
    );
    assert!(case.live_vmms().is_empty(), "the wedged VMM was ended");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "w".into(),
        ..Default::default()
    })
    .await
    .expect("boots in a fresh VMM");
    let fresh = case.live_vmms();
    assert_eq!(fresh.len(), 1);
    assert_ne!(fresh, stuck);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "w".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(case.live_vmms().is_empty());
    assert!(case.runtime_entries().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delete_converges() {
    if !kvm_usable() {
        return skip(
            "kill_9_mid_delete_converges",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    let mut v = case.start(&["vm.delete"]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    for id in ["gone", "kept"] {
        c.create_vm(create(&case, id)).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("boot");
    }
    assert_eq!(case.live_vmms().len(), 2);
    let err = c
        .delete_vm_with_options(
            pb::DeleteVmRequest {
                vm_id: "gone".into(),
                ..Default::default()
            },
            short(),
        )
        .await
        .expect_err("vm.delete hangs");
    assert_eq!(err.code, ErrorCode::DeadlineExceeded);
    kill9(&mut v);

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let list = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list")
        .into_owned();
    let ids: Vec<&str> = list.vms.iter().map(|v| v.vm_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["kept"],
        "the interrupted delete completed; the other VM is untouched"
    );
    assert_eq!(st(list.vms[0].state), S::VM_STATE_RUNNING);
    assert_eq!(case.live_vmms().len(), 1, "the deleted VM's VMM is gone");
    assert_eq!(case.runtime_entries(), vec!["kept".to_owned()]);
    let gone = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "gone".into(),
            ..Default::default()
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code, ErrorCode::NotFound);
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "kept".into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(case.live_vmms().is_empty());
}

/// Rows of the store's `snapshots` table, as (id, state), read beside the
/// running VMCP (the file is in WAL mode, so a reader does not disturb it).
fn snapshot_rows(case: &Case) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open_with_flags(
        case.path("data").join("vmcp.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store");
    let mut stmt = conn
        .prepare("SELECT id, state FROM snapshots ORDER BY id")
        .expect("prepare");
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

async fn list_snapshots(c: &Client) -> Vec<String> {
    c.list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list snapshots")
        .into_owned()
        .snapshots
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect()
}

type Client = pb::VmServiceClient<connectrpc::client::HttpClient>;

async fn boot(c: &Client, case: &Case, id: &str) {
    c.create_vm(create(case, id)).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot");
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_snapshot_leaves_no_half_snapshot() {
    if !kvm_usable() {
        return skip(
            "kill_9_mid_snapshot_leaves_no_half_snapshot",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    // The VMM writes the snapshot at once and answers 3 s later.
    let slow = Behaviour {
        slow: [("vm.snapshot".to_owned(), 3000)].into(),
        ..Default::default()
    };
    let mut v = case.start_with("bin-slow-snapshot", slow, 30).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    boot(&c, &case, "s").await;
    let call = tokio::spawn({
        let c = c.clone();
        async move {
            c.snapshot_vm(pb::SnapshotVmRequest {
                vm_id: "s".into(),
                snapshot_id: "half".into(),
                resume: true,
                ..Default::default()
            })
            .await
        }
    });
    let pending = case.path("data").join("snapshots").join(".pending-half");
    until("the VMM wrote into the pending directory", || {
        pending.join("memory-ranges").exists()
    })
    .await;
    assert_eq!(
        snapshot_rows(&case),
        [("half".to_owned(), "pending".to_owned())],
        "the intent was recorded before the VMM wrote"
    );
    kill9(&mut v);
    let _ = call.await;

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    assert!(list_snapshots(&c).await.is_empty(), "nothing half-listed");
    assert!(
        entries(&case.path("data").join("snapshots")).is_empty(),
        "the half snapshot's files are gone: {:?}",
        entries(&case.path("data").join("snapshots"))
    );
    assert!(snapshot_rows(&case).is_empty(), "its intent is dropped");
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "s".into(),
            ..Default::default()
        })
        .await
        .expect("the source VM was adopted")
        .into_owned();
    assert_eq!(case.live_vmms().len(), 1, "{}", info.state_reason);
    // Resume it if the crash left it paused; then the id is free for a retry.
    if st(info.state) == S::VM_STATE_PAUSED {
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: "s".into(),
            ..Default::default()
        })
        .await
        .expect("resume");
    }
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: "s".into(),
        snapshot_id: "half".into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("the retried snapshot");
    assert_eq!(list_snapshots(&c).await, ["half"]);
    assert_eq!(
        snapshot_rows(&case),
        [("half".to_owned(), "committed".to_owned())]
    );
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: "half".into(),
        ..Default::default()
    })
    .await
    .expect("delete the snapshot");
    assert!(snapshot_rows(&case).is_empty());
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "s".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert!(case.live_vmms().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_restore_rolls_the_clone_back() {
    if !kvm_usable() {
        return skip(
            "kill_9_mid_restore_rolls_the_clone_back",
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    let case = Case::new();
    let slow = Behaviour {
        slow: [("vm.restore".to_owned(), 3000)].into(),
        ..Default::default()
    };
    let mut v = case.start_with("bin-slow-restore", slow, 30).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    boot(&c, &case, "s").await;
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: "s".into(),
        snapshot_id: "warm".into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("snapshot");
    let source = case.live_vmms();
    let call = tokio::spawn({
        let c = c.clone();
        async move {
            c.restore_vm(pb::RestoreVmRequest {
                vm_id: "clone".into(),
                snapshot_id: "warm".into(),
                resume: true,
                ..Default::default()
            })
            .await
        }
    });
    until("the clone's VMM runs", || case.live_vmms().len() == 2).await;
    // Let VMCP send vm.restore (the VMM applies it and answers 3 s later).
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill9(&mut v);
    let _ = call.await;

    let v = case.start(&[]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let e = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "clone".into(),
            ..Default::default()
        })
        .await
        .expect_err("a restore that never answered is rolled back");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(case.live_vmms(), source, "the clone's VMM was ended");
    assert_eq!(
        case.runtime_entries(),
        ["s"],
        "{:?}",
        case.runtime_entries()
    );
    assert_eq!(list_snapshots(&c).await, ["warm"], "the snapshot is intact");
    let r = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: "clone".into(),
            snapshot_id: "warm".into(),
            resume: true,
            ..Default::default()
        })
        .await
        .expect("the restore again")
        .into_owned();
    assert_eq!(st(r.state), S::VM_STATE_RUNNING);
    for id in ["clone", "s"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    assert!(case.live_vmms().is_empty());
}
