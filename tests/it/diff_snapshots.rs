//! Diff snapshots through the API over the Firecracker-flavoured test
//! double: a diff is taken against the VM's parent (the last snapshot of,
//! or restored into, its current VMM), stored whole (the parent's memory
//! with the diff's pages over it), restores, lists and deletes like a full
//! one, survives its parent's delete, and is refused with
//! `failed_precondition` saying why whenever its parent cannot be trusted:
//! no tracking, no snapshot yet, a failed attempt since, a replaced VMM, a
//! deleted parent. The parent survives a restart of VMCP whose VMM lives on.
//! The fake Firecracker process and the real one are in `firecracker_diff`
//! and `real_fc`.

use std::path::Path;
use std::sync::Arc;

use connectrpc::ErrorCode;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::security::Security;
use vmcp::ports::HypervisorError;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::double::Double;
use super::harness::{Harness, Wire, create_req, snapshot_settings};

type Client = vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>;

const MIB: i64 = 1 << 20;

async fn serve(double: Arc<Double>, store: Arc<MemoryStore>, dir: &Path) -> Harness {
    let security = Security {
        snapshots: Some(snapshot_settings(dir)),
        ..Security::open()
    };
    Harness::start_with_security(double, store, security).await
}

/// Creates and boots `id` with 128 MiB, tracking dirty pages when `tracking`.
async fn boot(c: &Client, id: &str, tracking: bool) {
    let mut req = create_req(id);
    let m = req
        .config
        .as_option_mut()
        .expect("config")
        .memory
        .as_option_mut()
        .expect("memory");
    m.size_bytes = 128 * MIB;
    m.track_dirty_pages = tracking;
    c.create_vm(req).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot");
}

async fn take(
    c: &Client,
    vm: &str,
    id: &str,
    kind: pb::SnapshotKind,
) -> Result<pb::SnapshotInfo, connectrpc::ConnectError> {
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: vm.into(),
        snapshot_id: id.into(),
        resume: true,
        kind: kind.into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_owned().snapshot.into_option().expect("a snapshot"))
}

async fn full(c: &Client, vm: &str, id: &str) -> pb::SnapshotInfo {
    take(c, vm, id, pb::SnapshotKind::SNAPSHOT_KIND_FULL)
        .await
        .expect("a full snapshot")
}

async fn diff(
    c: &Client,
    vm: &str,
    id: &str,
) -> Result<pb::SnapshotInfo, connectrpc::ConnectError> {
    take(c, vm, id, pb::SnapshotKind::SNAPSHOT_KIND_DIFF).await
}

/// A refused diff: failed_precondition whose message contains `why`.
async fn refused(c: &Client, vm: &str, id: &str, why: &str) {
    let e = diff(c, vm, id).await.expect_err("the diff is refused");
    let m = e.message.clone().unwrap_or_default();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{m}");
    assert!(m.contains(why), "{why:?} in {m:?}");
}

async fn delete_snapshot(c: &Client, id: &str) {
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("delete snapshot");
}

async fn restore(c: &Client, vm: &str, from: &str) -> pb::RestoreVmResponse {
    c.restore_vm(pb::RestoreVmRequest {
        vm_id: vm.into(),
        snapshot_id: from.into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("restore")
    .into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn a_diff_is_stored_whole_restores_and_outlives_its_parent() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::firecracker());
    let h = serve(
        Arc::clone(&double),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    boot(&c, "src", true).await;
    let base = full(&c, "src", "base").await;
    assert_eq!(base.parent_snapshot_id, "");
    let d1 = diff(&c, "src", "d1")
        .await
        .expect("a diff after a full one");
    assert_eq!(
        d1.kind.as_known(),
        Some(pb::SnapshotKind::SNAPSHOT_KIND_DIFF)
    );
    assert_eq!(d1.parent_snapshot_id, "base");
    assert_eq!(
        h.info("src").await.state.as_known(),
        Some(S::VM_STATE_RUNNING),
        "resumed"
    );
    // Whole: the parent's memory (7s) with the diff's page (its first 4 KiB, 8s) over it.
    let memory = std::fs::read(dir.path().join("d1").join("memory")).expect("memory");
    let parent = std::fs::read(dir.path().join("base").join("memory")).expect("memory");
    assert_eq!(memory.len(), parent.len());
    assert!(memory[..4096].iter().all(|b| *b == 8), "the changed page");
    assert!(memory[4096..].iter().all(|b| *b == 7), "the parent's pages");
    assert!(d1.size_bytes >= memory.len() as i64, "allocated: {d1:?}");
    // Each diff is against the previous snapshot.
    let d2 = diff(&c, "src", "d2").await.expect("a diff after a diff");
    assert_eq!(d2.parent_snapshot_id, "d1");

    // The parent goes; its children stay whole and restorable.
    delete_snapshot(&c, "base").await;
    delete_snapshot(&c, "d1").await;
    let r = restore(&c, "clone", "d2").await;
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    // The restored VMM diffs against what it loaded.
    let d3 = diff(&c, "clone", "d3").await.expect("a diff of the clone");
    assert_eq!(d3.parent_snapshot_id, "d2");
    assert_eq!(d3.source_vm_id, "clone");
    // The source's parent (d2) is still there; deleted, it can no longer be diffed against.
    delete_snapshot(&c, "d2").await;
    refused(&c, "src", "d4", "parent snapshot d2 was deleted").await;
    full(&c, "src", "again").await;
    diff(&c, "src", "d4")
        .await
        .expect("a diff after a new full one");

    for vm in ["clone", "src"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .expect("delete vm");
    }
    for s in ["d3", "again", "d4"] {
        delete_snapshot(&c, s).await;
    }
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    h.stop().await;
}

#[tokio::test]
async fn a_diff_is_refused_saying_why_when_its_parent_cannot_be_trusted() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::firecracker());
    let h = serve(
        Arc::clone(&double),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    boot(&c, "plain", false).await;
    full(&c, "plain", "p1").await;
    refused(&c, "plain", "x", "config.memory.track_dirty_pages").await;

    boot(&c, "t", true).await;
    refused(&c, "t", "x", "no parent snapshot").await;
    full(&c, "t", "t1").await;
    // The VMM wrote the snapshot, then the call failed: its dirty pages may be gone.
    double.fail_next_after_apply(
        "t",
        "snapshot",
        HypervisorError::resource_exhausted("No space left on device (os error 28)"),
    );
    let e = full_or_err(&c, "t", "t2").await;
    assert_eq!(e, ErrorCode::ResourceExhausted);
    refused(&c, "t", "x", "previous snapshot attempt failed").await;
    full(&c, "t", "t3").await;
    diff(&c, "t", "t4")
        .await
        .expect("a full snapshot restores the chain");
    // A failed diff counts like any other attempt.
    double.fail_next(
        "t",
        "snapshot",
        HypervisorError::InvalidState("Create snapshot error".into()),
    );
    assert_eq!(
        diff(&c, "t", "t5").await.expect_err("failed").code,
        ErrorCode::FailedPrecondition
    );
    refused(&c, "t", "x", "previous snapshot attempt failed").await;
    full(&c, "t", "t6").await;
    // A reboot replaces a Firecracker VMM: the new one has no parent.
    c.reboot_vm(pb::RebootVmRequest {
        vm_id: "t".into(),
        ..Default::default()
    })
    .await
    .expect("reboot");
    refused(&c, "t", "x", "replaced").await;
    let listed: Vec<String> = c
        .list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_owned()
        .snapshots
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    assert_eq!(
        listed,
        ["p1", "t1", "t3", "t4", "t6"],
        "no refused diff left anything"
    );
    h.stop().await;
}

async fn full_or_err(c: &Client, vm: &str, id: &str) -> ErrorCode {
    take(c, vm, id, pb::SnapshotKind::SNAPSHOT_KIND_FULL)
        .await
        .expect_err("failed")
        .code
}

#[tokio::test]
async fn the_parent_survives_a_restart_of_vmcp_while_the_vmm_runs_on() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::firecracker());
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::clone(&double), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    boot(&c, "src", true).await;
    full(&c, "src", "base").await;
    boot(&c, "other", true).await;
    full(&c, "other", "o1").await;
    h.stop().await;
    // VMCP restarts; the VMMs run on (and one of them is replaced meanwhile).
    let restarted = Arc::new(double.restarted());
    restarted.kill("other");
    let h = serve(Arc::clone(&restarted), store, dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    let d = diff(&c, "src", "d1")
        .await
        .expect("the recorded parent holds");
    assert_eq!(d.parent_snapshot_id, "base");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "other".into(),
        ..Default::default()
    })
    .await
    .expect("boot the VM whose VMM died");
    refused(&c, "other", "x", "replaced").await;
    h.stop().await;
}

#[tokio::test]
async fn cloud_hypervisor_has_no_diff_snapshots() {
    let dir = tempfile::tempdir().expect("dir");
    let h = serve(
        Arc::new(Double::new()),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    boot(&c, "ch", false).await;
    full(&c, "ch", "s").await;
    let e = diff(&c, "ch", "d").await.expect_err("refused");
    assert_eq!(e.code, ErrorCode::Unimplemented);
    assert!(
        e.message.unwrap_or_default().contains("cloudhypervisor"),
        "names the backend"
    );
    h.stop().await;
}
