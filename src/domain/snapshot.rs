//! Snapshots: their ids, kinds and descriptions, and the rules a restore
//! must meet, sans-IO. Taking and restoring one is the backends' work; the
//! files live in the snapshot repository (a port); the VM's owner performs
//! the snapshot like any other operation.

use std::fmt;

use super::config::{VmConfig, VmConfigError};
use super::error::VmError;
use super::id::VmId;

/// A snapshot's id: the VM id grammar (it names a directory).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnapshotId(String);

impl SnapshotId {
    /// Parses an id; the error names `field`.
    pub fn parse(field: &str, s: &str) -> Result<Self, VmConfigError> {
        VmId::parse(s)
            .map(|id| Self(id.as_str().to_owned()))
            .map_err(|e| VmConfigError::new(field, e.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotKind {
    /// The whole guest memory.
    Full,
    /// Only the memory written since the previous snapshot.
    Diff,
}

impl SnapshotKind {
    /// Name in the snapshot's description file.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        }
    }

    /// The kind named `s` (as written by [`SnapshotKind::as_str`]).
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "full" => Some(SnapshotKind::Full),
            "diff" => Some(SnapshotKind::Diff),
            _ => None,
        }
    }
}

/// One usable snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: SnapshotId,
    /// The VM it was taken of.
    pub source_vm_id: VmId,
    /// The backend that took it (`cloudhypervisor`, `firecracker`).
    pub backend: String,
    /// The VMM version that took it.
    pub vmm_version: String,
    /// The VM's config when it was taken.
    pub config: VmConfig,
    /// When it was taken, Unix seconds.
    pub created_at: i64,
    /// Bytes of its files.
    pub size_bytes: u64,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// A diff's parent: the snapshot its changed pages were taken against
    /// (informative: a stored diff is whole, see [`DiffParent`]).
    pub parent: Option<SnapshotId>,
}

impl SnapshotInfo {
    /// A restore of this snapshot needs the same backend and VMM version;
    /// a mismatch is a failed precondition naming both.
    pub fn check_restorable(&self, backend: &str, vmm_version: &str) -> Result<(), VmError> {
        if self.backend != backend {
            return Err(VmError::Incompatible(format!(
                "snapshot {} was taken by {} and this host runs {backend}",
                self.id, self.backend
            )));
        }
        if self.vmm_version != vmm_version {
            return Err(VmError::Incompatible(format!(
                "snapshot {} was taken by {} {} and this host runs {} {vmm_version}",
                self.id, self.backend, self.vmm_version, backend
            )));
        }
        Ok(())
    }
}

/// The snapshot a VMM's next diff snapshot is taken against: the last one
/// taken of that VMM process, or restored into it. The VMM clears its
/// dirty-page bitmap at each snapshot it writes (Firecracker: in
/// `snapshot_memory_to_file`, full or diff), so only the pages written
/// since are in a diff; VMCP stores the diff whole (the parent's memory
/// with those pages over it). Recorded with the VM, and tied to the
/// process (pid and start time): a replaced VMM has no parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffParent {
    /// The snapshot.
    pub snapshot_id: SnapshotId,
    /// The VMM process's pid.
    pub vmm_pid: u32,
    /// The VMM process's start time (clock ticks since boot).
    pub vmm_start_time: u64,
}

/// What a diff snapshot of VM `vm` needs, checked before the VMM is asked:
/// dirty-page tracking, a parent recorded for its current VMM (`current`:
/// pid and start time) that is still `usable`, and no failed snapshot
/// attempt since (`last_failed`: the VMM may have cleared its bitmap
/// without VCMP keeping a file). Answers the parent; a failed precondition
/// saying which rule failed otherwise.
pub fn diff_parent(
    vm: &VmId,
    tracking: bool,
    parent: Option<&DiffParent>,
    last_failed: bool,
    current: Option<(u32, u64)>,
    usable: impl Fn(&SnapshotId) -> bool,
) -> Result<SnapshotId, VmError> {
    let refuse = |why: String| {
        Err(VmError::Incompatible(format!(
            "vm {vm}: no diff snapshot: {why}; take a full snapshot"
        )))
    };
    if !tracking {
        return refuse(
            "the VM does not track dirty pages (create it with config.memory.track_dirty_pages)"
                .to_owned(),
        );
    }
    if last_failed {
        return refuse("its previous snapshot attempt failed (or has not completed yet), so the VMM may have cleared its dirty pages without a snapshot to hold them".to_owned());
    }
    let Some(p) = parent else {
        return refuse("its VMM has no parent snapshot (none was taken of it or restored into it since it started, or the last attempt did not complete)".to_owned());
    };
    if current != Some((p.vmm_pid, p.vmm_start_time)) {
        return refuse(format!(
            "its parent snapshot {} was taken by a VMM that has been replaced since (restart or reboot)",
            p.snapshot_id
        ));
    }
    if !usable(&p.snapshot_id) {
        return refuse(format!("its parent snapshot {} was deleted", p.snapshot_id));
    }
    Ok(p.snapshot_id.clone())
}

/// A snapshot as the VM store records it. The pending record is written
/// before the VMM writes anything (intent before action); the committed one
/// after the snapshot's directory is renamed into place, which is the
/// commit point (see [`reconcile`]).
// A handful live at a time, briefly; boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotRecord {
    /// Being taken: files may be half-written.
    Pending {
        /// Its id.
        id: SnapshotId,
        /// The VM it is taken of.
        source_vm_id: VmId,
        /// When it was begun, Unix seconds.
        created_at: i64,
    },
    /// Usable.
    Committed(SnapshotInfo),
}

impl SnapshotRecord {
    /// The snapshot's id.
    pub fn id(&self) -> &SnapshotId {
        match self {
            SnapshotRecord::Pending { id, .. } => id,
            SnapshotRecord::Committed(info) => &info.id,
        }
    }
}

/// What start-up does to make the store agree with the disk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconciliation {
    /// Usable snapshots: committed on disk (a whole directory with its description).
    pub usable: Vec<SnapshotInfo>,
    /// To (re-)record as committed: on disk whole, but the store has no
    /// record, only the pending one, or a different one (a crash between
    /// the rename and the store write).
    pub record: Vec<SnapshotInfo>,
    /// Pending records whose snapshot never got committed: dropped.
    pub drop_pending: Vec<SnapshotId>,
    /// Committed records whose directory is gone: dropped with a warning.
    pub drop_missing: Vec<SnapshotId>,
}

/// Reconciles the store's snapshot `records` with the snapshots `on_disk`
/// that are whole (pending and unreadable directories were already
/// removed). The directory's rename is the commit point, so the disk wins:
/// a whole directory is usable and recorded from its description whatever
/// the store says; a record without one is dropped.
pub fn reconcile(records: &[SnapshotRecord], on_disk: Vec<SnapshotInfo>) -> Reconciliation {
    let mut out = Reconciliation::default();
    for info in &on_disk {
        let recorded = records.iter().find(|r| r.id() == &info.id);
        if !matches!(recorded, Some(SnapshotRecord::Committed(r)) if r == info) {
            out.record.push(info.clone());
        }
    }
    for r in records {
        if on_disk.iter().any(|i| &i.id == r.id()) {
            continue;
        }
        match r {
            SnapshotRecord::Pending { id, .. } => out.drop_pending.push(id.clone()),
            SnapshotRecord::Committed(info) => out.drop_missing.push(info.id.clone()),
        }
    }
    out.usable = on_disk;
    out
}

/// A network interface of a restored VM on another host tap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOverride {
    /// The interface's id in the snapshot's config.
    pub interface_id: String,
    /// The tap the restored VM uses.
    pub tap_device: String,
}

/// The config of a VM restored from `snapshot`: its config with the taps
/// and metadata the restore asks for. An override naming no interface of
/// the snapshot is an error naming it.
pub fn restored_config(
    snapshot: &SnapshotInfo,
    overrides: &[NetworkOverride],
    metadata: Option<std::collections::BTreeMap<String, String>>,
) -> Result<VmConfig, VmConfigError> {
    let mut config = snapshot.config.clone();
    for (i, o) in overrides.iter().enumerate() {
        let Some(nic) = config.network.iter_mut().find(|n| n.id == o.interface_id) else {
            return Err(VmConfigError::new(
                format!("network_overrides[{i}].interface_id"),
                format!(
                    "snapshot {} has no network interface {:?}",
                    snapshot.id, o.interface_id
                ),
            ));
        };
        nic.tap_device.clone_from(&o.tap_device);
    }
    if let Some(metadata) = metadata {
        config.metadata = metadata;
    }
    Ok(config)
}

/// A restored VM may not write a disk another VM uses when the snapshot
/// holds no copy of it (`copied` lists the disks it has its own copy of):
/// two VMs would write one image. `others` are the configs of the VMs that
/// exist, by id. The error names the device.
pub fn check_disks_free<'a>(
    config: &VmConfig,
    copied: &[usize],
    others: impl IntoIterator<Item = (&'a VmId, &'a VmConfig)>,
) -> Result<(), VmError> {
    let others: Vec<_> = others.into_iter().collect();
    for (i, disk) in config.storage.iter().enumerate() {
        if copied.contains(&i) {
            continue;
        }
        let shares = |other: &VmConfig| {
            other
                .storage
                .iter()
                .any(|d| d.path == disk.path && !(d.read_only && disk.read_only))
        };
        if let Some((id, _)) = others.iter().find(|(_, other)| shares(other)) {
            return Err(VmError::Incompatible(format!(
                "config.storage[{i}]: {} is writable and vm {id} uses it too; the snapshot holds no copy of it (taken before VMCP kept disk copies), so restore it only while no other VM uses the disk",
                disk.path
            )));
        }
    }
    Ok(())
}

/// Snapshot count and byte limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Most snapshots on the host.
    pub max_count: u64,
    /// Most bytes all snapshots may take.
    pub max_bytes: u64,
}

impl SnapshotLimits {
    /// Whether one more snapshot of `expected` bytes fits next to `existing`
    /// (count and bytes of the snapshots already there, pending ones included).
    pub fn check(&self, count: u64, bytes: u64, expected: u64) -> Result<(), VmError> {
        if count >= self.max_count {
            return Err(VmError::ResourceExhausted(format!(
                "{count} snapshots exist, the limit is {} (UNKEY_VMCP_MAX_SNAPSHOTS); delete one first",
                self.max_count
            )));
        }
        if bytes.saturating_add(expected) > self.max_bytes {
            return Err(VmError::ResourceExhausted(format!(
                "snapshots take {bytes} bytes and this one needs about {expected} more, the limit is {} (UNKEY_VMCP_MAX_SNAPSHOT_BYTES)",
                self.max_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::NetworkInterface;
    use super::*;

    fn info() -> SnapshotInfo {
        let mut config = VmConfig::default();
        config.network.push(NetworkInterface {
            id: "eth0".into(),
            tap_device: "tap-a".into(),
            ..Default::default()
        });
        SnapshotInfo {
            id: SnapshotId::parse("snapshot_id", "s1").expect("valid"),
            source_vm_id: VmId::parse("vm1").expect("valid"),
            backend: "firecracker".into(),
            vmm_version: "v1.16.1".into(),
            config,
            created_at: 1,
            size_bytes: 10,
            kind: SnapshotKind::Full,
            parent: None,
        }
    }

    #[test]
    fn a_diff_needs_tracking_a_parent_of_this_vmm_that_exists_and_no_failure_since() {
        let vm = VmId::parse("vm1").expect("id");
        let s1 = SnapshotId::parse("snapshot_id", "s1").expect("id");
        let parent = DiffParent {
            snapshot_id: s1.clone(),
            vmm_pid: 42,
            vmm_start_time: 7,
        };
        let exists = |_: &SnapshotId| true;
        let refused = |r: Result<SnapshotId, VmError>| match r {
            Err(VmError::Incompatible(m)) => m,
            other => panic!("expected a failed precondition, got {other:?}"),
        };
        assert_eq!(
            diff_parent(&vm, true, Some(&parent), false, Some((42, 7)), exists).expect("ok"),
            s1
        );
        let m = refused(diff_parent(
            &vm,
            false,
            Some(&parent),
            false,
            Some((42, 7)),
            exists,
        ));
        assert!(m.contains("config.memory.track_dirty_pages"), "{m}");
        let m = refused(diff_parent(&vm, true, None, false, Some((42, 7)), exists));
        assert!(m.contains("no parent snapshot"), "{m}");
        let m = refused(diff_parent(
            &vm,
            true,
            Some(&parent),
            true,
            Some((42, 7)),
            exists,
        ));
        assert!(m.contains("previous snapshot attempt failed"), "{m}");
        // Same pid, another process (pid reuse), a new pid, or none.
        for current in [Some((42, 8)), Some((43, 7)), None] {
            let m = refused(diff_parent(
                &vm,
                true,
                Some(&parent),
                false,
                current,
                exists,
            ));
            assert!(m.contains("replaced"), "{m}");
        }
        let m = refused(diff_parent(
            &vm,
            true,
            Some(&parent),
            false,
            Some((42, 7)),
            |_| false,
        ));
        assert!(m.contains("s1 was deleted"), "{m}");
        assert!(m.starts_with("vm vm1: no diff snapshot"), "{m}");
    }

    #[test]
    fn ids_follow_the_vm_id_grammar_and_errors_name_the_field() {
        assert_eq!(
            SnapshotId::parse("x", "warm-1").expect("valid").as_str(),
            "warm-1"
        );
        let e = SnapshotId::parse("snapshot_id", "../up").expect_err("a path");
        assert_eq!(e.field, "snapshot_id");
        assert!(SnapshotId::parse("snapshot_id", "").is_err());
    }

    #[test]
    fn a_restore_needs_the_same_backend_and_version() {
        let s = info();
        assert!(s.check_restorable("firecracker", "v1.16.1").is_ok());
        let e = s
            .check_restorable("firecracker", "v1.17.0")
            .expect_err("version");
        assert!(
            e.to_string().contains("v1.16.1") && e.to_string().contains("v1.17.0"),
            "{e}"
        );
        let e = s
            .check_restorable("cloudhypervisor", "v1.16.1")
            .expect_err("backend");
        assert!(e.to_string().contains("cloudhypervisor"), "{e}");
    }

    #[test]
    fn overrides_replace_taps_by_interface_and_name_unknown_ones() {
        let s = info();
        let o = |id: &str, tap: &str| NetworkOverride {
            interface_id: id.into(),
            tap_device: tap.into(),
        };
        let c = restored_config(&s, &[o("eth0", "tap-b")], None).expect("known");
        assert_eq!(c.network[0].tap_device, "tap-b");
        assert_eq!(
            s.config.network[0].tap_device, "tap-a",
            "the snapshot is unchanged"
        );
        let e = restored_config(&s, &[o("eth0", "t"), o("eth9", "t")], None).expect_err("unknown");
        assert_eq!(e.field, "network_overrides[1].interface_id");
        let meta = [("k".to_owned(), "v".to_owned())].into_iter().collect();
        let c = restored_config(&s, &[], Some(meta)).expect("metadata");
        assert_eq!(c.metadata["k"], "v");
    }

    #[test]
    fn a_writable_disk_in_use_is_refused_and_read_only_ones_are_shared() {
        use super::super::config::StorageDevice;
        let disk = |path: &str, read_only| StorageDevice {
            id: "d".into(),
            path: path.into(),
            read_only,
            ..Default::default()
        };
        let clone = VmConfig {
            storage: vec![disk("/img/ro", true), disk("/img/rw", false)],
            ..Default::default()
        };
        let src = VmId::parse("src").expect("id");
        let mut other = VmConfig {
            storage: vec![disk("/img/ro", true)],
            ..Default::default()
        };
        assert!(
            check_disks_free(&clone, &[], [(&src, &other)]).is_ok(),
            "read-only is shared"
        );
        other.storage.push(disk("/img/rw", true));
        assert!(
            check_disks_free(&clone, &[1], [(&src, &other)]).is_ok(),
            "the clone has its own copy"
        );
        let e = check_disks_free(&clone, &[], [(&src, &other)]).expect_err("written while read");
        assert!(
            e.to_string().starts_with("config.storage[1]: /img/rw"),
            "{e}"
        );
        assert!(
            check_disks_free(&clone, &[], []).is_ok(),
            "nobody else uses it"
        );
    }

    #[test]
    fn limits_count_and_bytes() {
        let l = SnapshotLimits {
            max_count: 2,
            max_bytes: 100,
        };
        assert!(l.check(1, 50, 50).is_ok());
        assert!(
            matches!(l.check(2, 0, 1), Err(VmError::ResourceExhausted(m)) if m.contains("MAX_SNAPSHOTS"))
        );
        assert!(
            matches!(l.check(1, 60, 41), Err(VmError::ResourceExhausted(m)) if m.contains("MAX_SNAPSHOT_BYTES"))
        );
    }

    proptest::proptest! {
        /// Whatever mix of records and whole directories a crash leaves,
        /// reconciling accounts for every snapshot exactly once: each whole
        /// directory is usable and ends up recorded as it is on disk, each
        /// record without one is dropped (pending or missing), and applying
        /// the plan then reconciling again finds nothing to do.
        #[test]
        fn reconciling_accounts_for_every_snapshot_and_converges(
            cases in proptest::collection::vec((0u8..4, 0u8..2), 0..12),
        ) {
            let mut records = Vec::new();
            let mut disk = Vec::new();
            for (i, (record, on_disk)) in cases.iter().enumerate() {
                let mut s = info();
                s.id = SnapshotId::parse("snapshot_id", &format!("s{i}")).expect("id");
                s.size_bytes = i as u64;
                match record {
                    0 => {}
                    1 => records.push(SnapshotRecord::Pending {
                        id: s.id.clone(),
                        source_vm_id: s.source_vm_id.clone(),
                        created_at: 1,
                    }),
                    2 => records.push(SnapshotRecord::Committed(s.clone())),
                    _ => {
                        let mut stale = s.clone();
                        stale.size_bytes += 1;
                        records.push(SnapshotRecord::Committed(stale));
                    }
                }
                if *on_disk == 1 {
                    disk.push(s);
                }
            }
            let plan = reconcile(&records, disk.clone());
            proptest::prop_assert_eq!(&plan.usable, &disk);
            let touched = plan.record.len() + plan.drop_pending.len() + plan.drop_missing.len();
            let in_sync = disk
                .iter()
                .filter(|d| records.contains(&SnapshotRecord::Committed((*d).clone())))
                .count();
            let ids: std::collections::BTreeSet<_> = records
                .iter()
                .map(|r| r.id().clone())
                .chain(disk.iter().map(|d| d.id.clone()))
                .collect();
            proptest::prop_assert_eq!(touched + in_sync, ids.len(), "each snapshot once");
            // Apply the plan to the records; a second pass has nothing to do.
            let mut after: Vec<SnapshotRecord> = records
                .into_iter()
                .filter(|r| {
                    !plan.drop_pending.contains(r.id())
                        && !plan.drop_missing.contains(r.id())
                        && !plan.record.iter().any(|i| &i.id == r.id())
                })
                .collect();
            after.extend(plan.record.iter().cloned().map(SnapshotRecord::Committed));
            let again = reconcile(&after, disk.clone());
            proptest::prop_assert!(again.record.is_empty() && again.drop_pending.is_empty() && again.drop_missing.is_empty());
            proptest::prop_assert_eq!(after.len(), disk.len(), "recorded exactly what is on disk");
        }
    }
}
