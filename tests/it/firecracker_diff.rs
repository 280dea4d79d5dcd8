//! Diff snapshots through the real `vmcp-api` binary and its Firecracker
//! adapter, on the `fake-firecracker` example as the VMM (a real process
//! per VM, no KVM needed by the VMM). The fake keeps a page map of guest
//! memory, writes only the pages dirtied since its previous snapshot for a
//! `Diff`, and refuses a load whose memory file does not hold the memory
//! its vmstate was saved with: a diff restores only if VMCP made it whole
//! correctly. Also: a create that fails half-written, and kill -9 of VMCP
//! with the VMMs living on — after a committed snapshot (the parent holds)
//! and in the middle of a diff (nothing half-listed, and no diff until a
//! full snapshot, since the VMM's dirty pages went with the lost attempt).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use connectrpc::ErrorCode;
use connectrpc::client::CallOptions;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::harness::{ApiProcess, Wire, client_for, free_port, vmcp_api_env, wait_serving};
use super::skips::skip;

type Client = vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>;

struct Case {
    dir: tempfile::TempDir,
}

impl Drop for Case {
    /// The fake VMMs that outlive VMCP are this test's: they go with it.
    fn drop(&mut self) {
        for pid in self.vmms() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Self { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Starts vmcp-api on the fake Firecracker with `flags`.
    async fn start(&self, flags: &[&str]) -> ApiProcess {
        let exe = std::env::current_exe().expect("exe");
        let fake = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("examples")
            .join("fake-firecracker");
        assert!(
            fake.exists(),
            "{} is missing: cargo build --examples",
            fake.display()
        );
        let script = self.path("firecracker");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec '{}' --fake-outlive-parent {} \"$@\"\n",
                fake.display(),
                flags.join(" ")
            ),
        )
        .expect("wrapper");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmcp-api"));
        vmcp_api_env(&mut cmd, self.dir.path(), port);
        let child = cmd
            .env("UNKEY_VMCP_BACKEND", "firecracker")
            .env("UNKEY_VMCP_FC_BINARY", &script)
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env("UNKEY_VMCP_HYPERVISOR_TIMEOUT_SECONDS", "10")
            .spawn()
            .expect("vmcp-api starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_serving(addr, Duration::from_secs(20)).await;
        ApiProcess { child, addr }
    }

    /// The live fake VMMs of this case (their command line names its runtime directory).
    fn vmms(&self) -> Vec<u32> {
        let needle = format!("{}/", self.path("rt").display());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
            })
            .collect()
    }

    /// Creates and boots `id` (128 MiB, tracking dirty pages).
    async fn boot(&self, c: &Client, id: &str) {
        let kernel = self.path("vmlinux");
        std::fs::write(&kernel, b"not really a kernel").expect("kernel");
        let mut req = super::harness::create_req(id);
        let config = req.config.get_or_insert_default();
        config.boot.get_or_insert_default().kernel_path = kernel.display().to_string();
        config.console.get_or_insert_default().enabled = true;
        let m = config.memory.get_or_insert_default();
        m.size_bytes = 128 << 20;
        m.track_dirty_pages = true;
        c.create_vm(req).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("boot");
    }

    fn snapshots(&self) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(self.path("data").join("snapshots"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

async fn take(
    c: &Client,
    vm: &str,
    id: &str,
    kind: pb::SnapshotKind,
    options: CallOptions,
) -> Result<pb::SnapshotInfo, connectrpc::ConnectError> {
    c.snapshot_vm_with_options(
        pb::SnapshotVmRequest {
            vm_id: vm.into(),
            snapshot_id: id.into(),
            resume: true,
            kind: kind.into(),
            ..Default::default()
        },
        options,
    )
    .await
    .map(|r| r.into_owned().snapshot.into_option().expect("a snapshot"))
}

async fn full(c: &Client, vm: &str, id: &str) -> pb::SnapshotInfo {
    take(
        c,
        vm,
        id,
        pb::SnapshotKind::SNAPSHOT_KIND_FULL,
        CallOptions::default(),
    )
    .await
    .expect("a full snapshot")
}

async fn diff(
    c: &Client,
    vm: &str,
    id: &str,
) -> Result<pb::SnapshotInfo, connectrpc::ConnectError> {
    take(
        c,
        vm,
        id,
        pb::SnapshotKind::SNAPSHOT_KIND_DIFF,
        CallOptions::default(),
    )
    .await
}

/// Restores `from` as `vm`, running; its console shows no boot.
async fn restore(c: &Client, vm: &str, from: &str) {
    let r = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: vm.into(),
            snapshot_id: from.into(),
            resume: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("restore {from} as {vm}: {e:?}"))
        .into_owned();
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    let console = c
        .get_console_output(pb::GetConsoleOutputRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .expect("console")
        .into_owned()
        .data;
    assert!(
        !String::from_utf8_lossy(&console).contains(super::fake_fc::MARKER.trim()),
        "the restored VM continued, it did not boot"
    );
}

fn refused_because(r: Result<pb::SnapshotInfo, connectrpc::ConnectError>, why: &str) {
    let e = r.expect_err("refused");
    let m = e.message.clone().unwrap_or_default();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{m}");
    assert!(m.contains(why), "{why:?} in {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_firecracker_diffs_restore_only_when_made_whole_and_a_failed_write_breaks_the_chain() {
    const NAME: &str =
        "fake_firecracker_diffs_restore_only_when_made_whole_and_a_failed_write_breaks_the_chain";
    if !kvm_usable() {
        skip(
            NAME,
            "/dev/kvm is not usable (vmcp-api checks it before serving)",
        );
        return;
    }
    let case = Case::new();
    // The third snapshot create fails half-written.
    let v = case.start(&["--fake-fail-snapshot-write", "3"]).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    case.boot(&c, "src").await;
    full(&c, "src", "base").await;
    let d1 = diff(&c, "src", "d1").await.expect("a diff");
    assert_eq!(d1.parent_snapshot_id, "base");
    // The fake's load checks the whole memory against the vmstate's digest.
    restore(&c, "c1", "d1").await;
    let e = diff(&c, "src", "d2")
        .await
        .expect_err("the VMM failed half-way");
    let m = e.message.unwrap_or_default();
    assert!(m.contains("No space left"), "the VMM's words: {m}");
    assert_eq!(
        case.snapshots(),
        ["base", "d1"],
        "nothing half-written is left"
    );
    refused_because(
        diff(&c, "src", "d2").await,
        "previous snapshot attempt failed",
    );
    full(&c, "src", "again").await;
    let d2 = diff(&c, "src", "d2")
        .await
        .expect("a diff after a full one");
    assert_eq!(d2.parent_snapshot_id, "again");
    // A chain of diffs of a restored VM: its parent is the snapshot it loaded.
    let d3 = diff(&c, "c1", "d3").await.expect("a diff of the clone");
    assert_eq!(d3.parent_snapshot_id, "d1");
    for s in ["base", "d1", "again"] {
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    restore(&c, "c2", "d2").await;
    restore(&c, "c3", "d3").await;
    for vm in ["src", "c1", "c2", "c3"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .expect("delete vm");
    }
    for s in ["d2", "d3"] {
        c.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: s.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    assert!(case.snapshots().is_empty(), "{:?}", case.snapshots());
    assert!(case.vmms().is_empty(), "no VMM left: {:?}", case.vmms());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_a_committed_parent_and_drops_one_a_diff_was_cut_off_from() {
    const NAME: &str = "kill_9_keeps_a_committed_parent_and_drops_one_a_diff_was_cut_off_from";
    if !kvm_usable() {
        skip(
            NAME,
            "/dev/kvm is not usable (vmcp-api checks it before serving)",
        );
        return;
    }
    let case = Case::new();
    // Each create is written at once and answered 1.5 s later.
    let flags = ["--fake-slow", "'PUT /snapshot/create=1500'"];
    let mut v = case.start(&flags).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    case.boot(&c, "src").await;
    full(&c, "src", "base").await;
    let _ = Command::new("kill")
        .args(["-9", &v.child.id().to_string()])
        .status();
    let _ = v.child.wait();

    let mut v = case.start(&flags).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    let d1 = diff(&c, "src", "d1")
        .await
        .expect("the parent was recorded with the VM and its VMM lives on");
    assert_eq!(d1.parent_snapshot_id, "base");
    // Cut off while the VMM writes a diff (and clears its dirty pages).
    let call = tokio::spawn({
        let c = c.clone();
        async move { diff(&c, "src", "half").await }
    });
    let written = case
        .path("data")
        .join("snapshots")
        .join(".pending-half")
        .join("memory");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !written.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the VMM never wrote the diff"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = Command::new("kill")
        .args(["-9", &v.child.id().to_string()])
        .status();
    let _ = v.child.wait();
    assert!(
        call.await.expect("task").is_err(),
        "VMCP died before answering"
    );

    let v = case.start(&flags).await;
    let c = client_for(v.addr, Wire::ConnectProto);
    assert_eq!(case.snapshots(), ["base", "d1"], "the half diff is gone");
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "src".into(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned();
    assert_eq!(
        info.state.as_known(),
        Some(S::VM_STATE_PAUSED),
        "adopted, paused as the cut-off snapshot left it"
    );
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "src".into(),
        ..Default::default()
    })
    .await
    .expect("resume");
    refused_because(diff(&c, "src", "d2").await, "no parent snapshot");
    full(&c, "src", "again").await;
    diff(&c, "src", "d2")
        .await
        .expect("a diff after a full one");
    restore(&c, "clone", "d2").await;
    drop(v);
}
