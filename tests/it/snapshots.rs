//! Snapshots, restore and clones over the test double: a VM snapshotted
//! while running and restored twice under new ids (the clones continue, no
//! second boot, all three run at once), every refusal with its code and
//! field, a VMM failing mid-snapshot or a full disk leaving nothing listed
//! or on disk, a version mismatch, the limits, and what a crash leaves
//! (pending directories removed at the next start, usable ones kept).

use std::path::Path;
use std::sync::Arc;

use connectrpc::ErrorCode;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::security::Security;
use vmcp::domain::snapshot::SnapshotLimits;
use vmcp::ports::HypervisorError;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::console::create_and_boot;
use super::double::{BOOT_MARKER, Double};
use super::harness::{Harness, Wire, snapshot_settings};

type Client = vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>;

async fn snapshot(
    c: &Client,
    vm: &str,
    id: &str,
    resume: bool,
) -> Result<pb::SnapshotInfo, connectrpc::ConnectError> {
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: vm.into(),
        snapshot_id: id.into(),
        resume,
        ..Default::default()
    })
    .await
    .map(|r| r.into_owned().snapshot.into_option().expect("a snapshot"))
}

async fn restore(
    c: &Client,
    vm: &str,
    from: &str,
) -> Result<pb::RestoreVmResponse, connectrpc::ConnectError> {
    c.restore_vm(pb::RestoreVmRequest {
        vm_id: vm.into(),
        snapshot_id: from.into(),
        resume: true,
        ..Default::default()
    })
    .await
    .map(|r| r.into_owned())
}

async fn console(c: &Client, vm: &str) -> Vec<u8> {
    c.get_console_output(pb::GetConsoleOutputRequest {
        vm_id: vm.into(),
        ..Default::default()
    })
    .await
    .expect("console")
    .into_owned()
    .data
}

async fn list(c: &Client) -> Vec<String> {
    c.list_snapshots(pb::ListSnapshotsRequest::default())
        .await
        .expect("list")
        .into_owned()
        .snapshots
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("snapshot dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A server whose snapshots live in `dir` (kept by the test across restarts).
async fn serve(double: Arc<Double>, store: Arc<MemoryStore>, dir: &Path) -> Harness {
    let security = Security {
        snapshots: Some(snapshot_settings(dir)),
        ..Security::open()
    };
    Harness::start_with_security(double, store, security).await
}

/// A server on a fresh double whose snapshots in `dir` are limited to
/// `max_count` snapshots and `max_bytes` bytes.
async fn serve_limited(dir: &Path, max_count: u64, max_bytes: u64) -> Harness {
    let mut settings = snapshot_settings(dir);
    settings.limits = SnapshotLimits {
        max_count,
        max_bytes,
    };
    let security = Security {
        snapshots: Some(settings),
        ..Security::open()
    };
    Harness::start_with_security(
        Arc::new(Double::new()),
        Arc::new(MemoryStore::new()),
        security,
    )
    .await
}

fn code(r: Result<impl std::fmt::Debug, connectrpc::ConnectError>) -> (ErrorCode, String) {
    let e = r.expect_err("refused");
    (e.code, e.message.unwrap_or_default())
}

#[tokio::test]
async fn a_running_vm_is_snapshotted_and_cloned_twice_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::new());
    let h = serve(
        Arc::clone(&double),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "src").await;
    double.guest_prints("src", "warmed up\n");

    let s = snapshot(&c, "src", "warm", true).await.expect("snapshot");
    assert_eq!(s.snapshot_id, "warm");
    assert_eq!(s.source_vm_id, "src");
    assert_eq!(s.backend, "cloudhypervisor");
    assert!(!s.vmm_version.is_empty());
    assert_eq!(
        s.kind.as_known(),
        Some(pb::SnapshotKind::SNAPSHOT_KIND_FULL)
    );
    assert!(s.size_bytes > 0, "{s:?}");
    assert_eq!(s.config, h.info("src").await.config, "the source's config");
    assert_eq!(
        h.info("src").await.state.as_known(),
        Some(S::VM_STATE_RUNNING),
        "resumed"
    );
    assert_eq!(list(&c).await, ["warm"]);
    let got = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "warm".into(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_owned();
    assert_eq!(got.snapshot.into_option(), Some(s.clone()));

    for clone in ["clone-1", "clone-2"] {
        let r = restore(&c, clone, "warm").await.expect("restore");
        assert_eq!(
            (r.vm_id.as_str(), r.state.as_known()),
            (clone, Some(S::VM_STATE_RUNNING))
        );
        // It continued from the snapshot: no second boot on its console.
        let out = console(&c, clone).await;
        assert!(
            !String::from_utf8_lossy(&out).contains(BOOT_MARKER.trim_end()),
            "{out:?}"
        );
    }
    let pids = double.live_pids();
    assert_eq!(
        pids.len(),
        3,
        "source and both clones run at once: {pids:?}"
    );
    double.assert_one_vmm_per_vm();
    let clone = h.info("clone-1").await;
    assert_eq!(
        clone.config.as_option().map(|c| &c.cpu),
        s.config.as_option().map(|c| &c.cpu)
    );

    for vm in ["src", "clone-1", "clone-2"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: "warm".into(),
        ..Default::default()
    })
    .await
    .expect("delete snapshot");
    assert!(list(&c).await.is_empty());
    assert!(
        entries(dir.path()).is_empty(),
        "no file left: {:?}",
        entries(dir.path())
    );
    assert_eq!(double.vmm_count(), 0);
    h.stop().await;
}

#[tokio::test]
async fn without_resume_the_vm_stays_paused_and_a_restore_can_leave_its_clone_paused() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    create_and_boot(&h, "hold").await;
    snapshot(&c, "hold", "", false).await.expect("generated id");
    assert_eq!(
        h.info("hold").await.state.as_known(),
        Some(S::VM_STATE_PAUSED)
    );
    let id = list(&c).await.pop().expect("one snapshot");
    assert!(id.starts_with("snap-"), "{id}");
    let r = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: "still".into(),
            snapshot_id: id,
            resume: false,
            ..Default::default()
        })
        .await
        .expect("restore")
        .into_owned();
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_PAUSED));
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "still".into(),
        ..Default::default()
    })
    .await
    .expect("resume the clone");
    h.stop().await;
}

#[tokio::test]
async fn refusals_name_the_field_the_state_or_the_snapshot() {
    let h = Harness::start().await;
    let c = h.client(Wire::Grpc);
    c.create_vm(super::console::create("cold"))
        .await
        .expect("create");
    let (code_, m) = code(snapshot(&c, "cold", "s", true).await);
    assert_eq!(
        code_,
        ErrorCode::FailedPrecondition,
        "a Created VM has nothing to snapshot: {m}"
    );
    assert_eq!(
        code(snapshot(&c, "nobody", "s", true).await).0,
        ErrorCode::NotFound
    );
    create_and_boot(&h, "hot").await;
    let (code_, m) = code(snapshot(&c, "hot", "../x", true).await);
    assert_eq!(code_, ErrorCode::InvalidArgument);
    assert!(m.starts_with("snapshot_id"), "{m}");
    let diff = c
        .snapshot_vm(pb::SnapshotVmRequest {
            vm_id: "hot".into(),
            kind: pb::SnapshotKind::SNAPSHOT_KIND_DIFF.into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(diff).0, ErrorCode::Unimplemented);
    snapshot(&c, "hot", "s1", true).await.expect("snapshot");
    assert_eq!(
        code(snapshot(&c, "hot", "s1", true).await).0,
        ErrorCode::AlreadyExists
    );
    let (code_, m) = code(restore(&c, "new", "missing").await);
    assert_eq!(code_, ErrorCode::NotFound);
    assert!(m.contains("snapshot"), "{m}");
    assert_eq!(
        code(restore(&c, "hot", "s1").await).0,
        ErrorCode::AlreadyExists
    );
    let bad = c
        .restore_vm(pb::RestoreVmRequest {
            vm_id: "new".into(),
            snapshot_id: "s1".into(),
            network_overrides: vec![pb::NetworkOverride {
                interface_id: "eth9".into(),
                tap_device: "tap9".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await;
    let (code_, m) = code(bad);
    assert_eq!(code_, ErrorCode::InvalidArgument);
    assert!(m.starts_with("network_overrides[0].interface_id"), "{m}");
    let (code_, _) = code(
        c.get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(code_, ErrorCode::NotFound);
    assert_eq!(h.double.vmm_count(), 2, "no refused restore started a VMM");
    h.stop().await;
}

#[tokio::test]
async fn a_vmm_failing_mid_snapshot_or_a_full_disk_leaves_no_snapshot() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::new());
    let h = serve(
        Arc::clone(&double),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "flaky").await;
    double.fail_next(
        "flaky",
        "snapshot",
        HypervisorError::InvalidState(
            "vm.snapshot: Could not get vCPU state GetNestedState".into(),
        ),
    );
    let (code_, m) = code(snapshot(&c, "flaky", "a", true).await);
    assert_eq!(code_, ErrorCode::FailedPrecondition);
    assert!(m.contains("GetNestedState"), "the VMM's reason: {m}");
    double.fail_next(
        "flaky",
        "snapshot",
        HypervisorError::resource_exhausted("No space left on device (os error 28)"),
    );
    assert_eq!(
        code(snapshot(&c, "flaky", "b", true).await).0,
        ErrorCode::ResourceExhausted
    );
    assert!(list(&c).await.is_empty());
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    assert!(
        vmcp::ports::VmStore::load_snapshots(&*h.store)
            .await
            .expect("records")
            .is_empty(),
        "the failed snapshots' intents are dropped"
    );
    assert_eq!(
        h.info("flaky").await.state.as_known(),
        Some(S::VM_STATE_RUNNING)
    );
    // The id is free again.
    snapshot(&c, "flaky", "a", true).await.expect("a retry");
    h.stop().await;
}

#[tokio::test]
async fn limits_on_count_and_bytes_answer_resource_exhausted() {
    let dir = tempfile::tempdir().expect("dir");
    let h = serve_limited(dir.path(), 1, 1 << 40).await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "lim").await;
    snapshot(&c, "lim", "one", true).await.expect("the first");
    let (code_, m) = code(snapshot(&c, "lim", "two", true).await);
    assert_eq!(code_, ErrorCode::ResourceExhausted);
    assert!(m.contains("UNKEY_VMCP_MAX_SNAPSHOTS"), "{m}");
    h.stop().await;

    let dir = tempfile::tempdir().expect("dir");
    let h = serve_limited(dir.path(), 10, 64 << 20).await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "big").await;
    let (code_, m) = code(snapshot(&c, "big", "x", true).await);
    assert_eq!(
        code_,
        ErrorCode::ResourceExhausted,
        "128 MiB of memory does not fit in 64"
    );
    assert!(m.contains("UNKEY_VMCP_MAX_SNAPSHOT_BYTES"), "{m}");
    h.stop().await;
}

#[tokio::test]
async fn a_restart_removes_half_snapshots_keeps_usable_ones_and_checks_the_version() {
    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::clone(&double), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "src").await;
    snapshot(&c, "src", "kept", true).await.expect("snapshot");
    snapshot(&c, "src", "old", true).await.expect("snapshot");
    h.stop().await;

    // What a crash mid-snapshot leaves, and a snapshot of another VMM version.
    let half = dir.path().join(".pending-half");
    std::fs::create_dir(&half).expect("mkdir");
    std::fs::write(half.join("memory"), b"partial").expect("write");
    let described = dir.path().join("old").join("snapshot.json");
    let text = std::fs::read_to_string(&described).expect("description");
    let version = serde_json::from_str::<serde_json::Value>(&text).expect("json")["vmm_version"]
        .as_str()
        .expect("a version")
        .to_owned();
    std::fs::write(&described, text.replace(&version, "v40.0")).expect("rewrite");

    let h = serve(Arc::new(double.restarted()), store, dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    assert_eq!(list(&c).await, ["kept", "old"], "usable ones are kept");
    assert!(!half.exists(), "the half snapshot is gone");
    let (code_, m) = code(restore(&c, "clone", "old").await);
    assert_eq!(code_, ErrorCode::FailedPrecondition);
    assert!(
        m.contains("v40.0") && m.contains(&version),
        "names both versions: {m}"
    );
    let r = restore(&c, "clone", "kept").await.expect("restore");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    h.stop().await;
}

#[tokio::test]
async fn a_restore_cut_off_by_a_crash_is_rolled_back_at_the_next_start() {
    use vmcp::ports::{VmRecord, VmStore};

    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::clone(&double), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "src").await;
    snapshot(&c, "src", "warm", true).await.expect("snapshot");
    let config = h.store.load_all().await.expect("records")[0]
        .snapshot
        .config
        .clone();
    h.stop().await;

    // What a crash between the restore's intent and its answer leaves: the
    // record of a VM never created (generation 0) and the VMM that was loading.
    let vm = vmcp::domain::Vm::creating(vmcp::domain::VmId::parse("clone").expect("id"), config, 1);
    store
        .put(&VmRecord {
            snapshot: vm.snapshot().clone(),
            process: None,
            diff_parent: None,
        })
        .await
        .expect("intent");
    let loading = double.plant_orphan("clone");

    let h = serve(Arc::new(double.restarted()), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    let e = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: "clone".into(),
            ..Default::default()
        })
        .await
        .expect_err("rolled back");
    assert_eq!(e.code, ErrorCode::NotFound);
    assert!(
        !double.is_alive(loading.pid),
        "the half-restored VMM was ended"
    );
    assert_eq!(list(&c).await, ["warm"], "the snapshot is still usable");
    let r = restore(&c, "clone", "warm")
        .await
        .expect("the restore again");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    double.assert_one_vmm_per_vm();
    h.stop().await;
}

/// A VM with a writable disk file at `disk`, created and booted.
async fn create_disky(c: &Client, id: &str, disk: &Path) {
    let mut req = super::console::create(id);
    req.config.as_option_mut().expect("config").storage = vec![pb::StorageDevice {
        id: "root".into(),
        path: disk.display().to_string(),
        is_root_device: true,
        ..Default::default()
    }];
    c.create_vm(req).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot");
}

async fn disk_of(c: &Client, id: &str) -> String {
    c.get_vm_info(pb::GetVmInfoRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("info")
    .into_owned()
    .config
    .into_option()
    .expect("config")
    .storage[0]
        .path
        .clone()
}

#[tokio::test]
async fn each_clone_gets_its_own_copy_of_the_disk_as_it_was_at_the_snapshot() {
    let dir = tempfile::tempdir().expect("dir");
    let images = tempfile::tempdir().expect("images");
    let disk = images.path().join("root.img");
    std::fs::write(&disk, b"at snapshot time").expect("disk");
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::clone(&double), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    create_disky(&c, "disky", &disk).await;
    snapshot(&c, "disky", "d", true).await.expect("snapshot");
    assert_eq!(
        h.info("disky").await.state.as_known(),
        Some(S::VM_STATE_RUNNING),
        "resumed once its disk was copied"
    );
    assert_eq!(
        std::fs::read(dir.path().join("d").join("disk-0")).expect("the snapshot's copy"),
        b"at snapshot time"
    );
    // The source goes on writing its disk; the clones start from the snapshot's.
    std::fs::write(&disk, b"later").expect("write");
    for twin in ["twin1", "twin2"] {
        let r = restore(&c, twin, "d")
            .await
            .expect("restore while the source runs");
        assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    }
    let (p1, p2) = (disk_of(&c, "twin1").await, disk_of(&c, "twin2").await);
    assert_eq!(
        p1,
        dir.path()
            .join(".clones/twin1/disk-0")
            .display()
            .to_string()
    );
    assert_ne!(p1, p2, "each clone has its own");
    assert_eq!(std::fs::read(&p1).expect("copy"), b"at snapshot time");
    std::fs::write(&p1, b"twin1 wrote").expect("write");
    assert_eq!(std::fs::read(&p2).expect("copy"), b"at snapshot time");
    assert_eq!(std::fs::read(&disk).expect("source"), b"later");
    assert_eq!(disk_of(&c, "disky").await, disk.display().to_string());

    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "twin1".into(),
        ..Default::default()
    })
    .await
    .expect("delete a clone");
    assert!(!Path::new(&p1).exists(), "its copy went with it");
    assert!(Path::new(&p2).exists(), "the other's stays");
    h.stop().await;

    // A crash between a restore's copies and its record leaves copies no VM owns.
    let ghost = dir.path().join(".clones/ghost");
    std::fs::create_dir_all(&ghost).expect("mkdir");
    std::fs::write(ghost.join("disk-0"), b"x").expect("write");
    let h = serve(Arc::new(double.restarted()), store, dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    assert!(!ghost.exists(), "removed at the start");
    assert!(Path::new(&p2).exists(), "a live clone's copy is kept");
    for vm in ["twin2", "disky"] {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    assert_eq!(entries(dir.path()), ["d"], "no clone directory left");
    h.stop().await;
}

#[tokio::test]
async fn a_snapshot_without_a_disk_copy_may_not_be_restored_beside_a_vm_writing_the_disk() {
    let dir = tempfile::tempdir().expect("dir");
    let images = tempfile::tempdir().expect("images");
    let disk = images.path().join("root.img");
    std::fs::write(&disk, b"image").expect("disk");
    let h = serve(
        Arc::new(Double::new()),
        Arc::new(MemoryStore::new()),
        dir.path(),
    )
    .await;
    let c = h.client(Wire::ConnectProto);
    create_disky(&c, "disky", &disk).await;
    snapshot(&c, "disky", "d", false).await.expect("snapshot");
    // As a snapshot taken before VMCP kept disk copies.
    std::fs::remove_file(dir.path().join("d").join("disk-0")).expect("rm");
    let (code_, m) = code(restore(&c, "twin", "d").await);
    assert_eq!(code_, ErrorCode::FailedPrecondition);
    assert!(
        m.starts_with(&format!("config.storage[0]: {}", disk.display())),
        "{m}"
    );
    assert!(m.contains("disky"), "names the VM using it: {m}");
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "disky".into(),
        ..Default::default()
    })
    .await
    .expect("delete the source");
    let r = restore(&c, "twin", "d")
        .await
        .expect("the disk is free now");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    assert_eq!(disk_of(&c, "twin").await, disk.display().to_string());
    h.stop().await;
}

#[tokio::test]
async fn a_disk_that_cannot_be_copied_fails_the_snapshot_and_leaves_the_vm_running() {
    let dir = tempfile::tempdir().expect("dir");
    let images = tempfile::tempdir().expect("images");
    let disk = images.path().join("root.img");
    std::fs::write(&disk, b"image").expect("disk");
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::new(Double::new()), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    create_disky(&c, "disky", &disk).await;
    std::fs::remove_file(&disk).expect("the disk goes away");
    let (code_, m) = code(snapshot(&c, "disky", "d", true).await);
    assert_eq!(code_, ErrorCode::Unavailable, "{m}");
    assert!(m.contains("root.img"), "names the disk: {m}");
    assert!(list(&c).await.is_empty());
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    assert!(
        vmcp::ports::VmStore::load_snapshots(&*store)
            .await
            .expect("records")
            .is_empty()
    );
    assert_eq!(
        h.info("disky").await.state.as_known(),
        Some(S::VM_STATE_RUNNING),
        "resumed as asked"
    );
    h.stop().await;
}

fn sid(id: &str) -> vmcp::domain::snapshot::SnapshotId {
    vmcp::domain::snapshot::SnapshotId::parse("snapshot_id", id).expect("id")
}

#[tokio::test]
async fn the_store_records_each_snapshot_and_a_restart_reconciles_it_with_the_disk() {
    use vmcp::domain::snapshot::SnapshotRecord;
    use vmcp::ports::VmStore;

    let dir = tempfile::tempdir().expect("dir");
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let h = serve(Arc::clone(&double), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    create_and_boot(&h, "src").await;
    for id in ["a", "b", "c"] {
        snapshot(&c, "src", id, true).await.expect("snapshot");
    }
    let records = store.load_snapshots().await.expect("records");
    let committed: Vec<_> = records
        .iter()
        .filter_map(|r| match r {
            SnapshotRecord::Committed(i) => Some(i.id.to_string()),
            SnapshotRecord::Pending { .. } => None,
        })
        .collect();
    assert_eq!(
        committed,
        ["a", "b", "c"],
        "each recorded whole: {records:?}"
    );
    let SnapshotRecord::Committed(a) = records[0].clone() else {
        unreachable!("checked above")
    };
    let got = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: "a".into(),
            ..Default::default()
        })
        .await
        .expect("get")
        .into_owned()
        .snapshot
        .into_option()
        .expect("info");
    assert_eq!(
        got.size_bytes, a.size_bytes as i64,
        "the record is what the API answers"
    );
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        snapshot_id: "c".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    assert_eq!(store.load_snapshots().await.expect("records").len(), 2);
    h.stop().await;

    // What crashes at each step leave:
    // a: renamed into place, the store still holds the intent;
    store
        .put_snapshot(&SnapshotRecord::Pending {
            id: sid("a"),
            source_vm_id: a.source_vm_id.clone(),
            created_at: 1,
        })
        .await
        .expect("intent");
    // b: recorded, its files deleted, the record not yet removed;
    std::fs::remove_dir_all(dir.path().join("b")).expect("rm b");
    // p: the intent and the half-written pending directory;
    store
        .put_snapshot(&SnapshotRecord::Pending {
            id: sid("p"),
            source_vm_id: a.source_vm_id.clone(),
            created_at: 1,
        })
        .await
        .expect("intent");
    std::fs::create_dir(dir.path().join(".pending-p")).expect("mkdir");
    std::fs::write(dir.path().join(".pending-p").join("memory"), b"half").expect("write");
    // d: a whole directory the store never heard of (an older VMCP, a lost store).
    std::fs::create_dir(dir.path().join("d")).expect("mkdir");
    for e in std::fs::read_dir(dir.path().join("a")).expect("a") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join("d").join(e.file_name())).expect("copy");
    }
    let described = dir.path().join("d").join("snapshot.json");
    let text = std::fs::read_to_string(&described).expect("description");
    std::fs::write(
        &described,
        text.replace("\"snapshot_id\": \"a\"", "\"snapshot_id\": \"d\""),
    )
    .expect("rewrite");

    let h = serve(Arc::new(double.restarted()), Arc::clone(&store), dir.path()).await;
    let c = h.client(Wire::ConnectProto);
    assert_eq!(list(&c).await, ["a", "d"], "whole on disk: usable");
    assert_eq!(entries(dir.path()), ["a", "d"], "the half one is gone");
    let records = store.load_snapshots().await.expect("records");
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(
        records[0],
        SnapshotRecord::Committed(a.clone()),
        "a re-recorded"
    );
    assert!(
        matches!(&records[1], SnapshotRecord::Committed(d) if d.id.as_str() == "d" && d.size_bytes == a.size_bytes),
        "d recorded from its description: {records:?}"
    );
    let r = restore(&c, "clone", "d").await.expect("restore");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    h.stop().await;
}
