//! The snapshot calls of the manager: SnapshotVm through the VM's owner into
//! the repository, and RestoreVm as a create whose VMM loads a snapshot.

use super::VmManager;
use crate::app::owner::Request;
use crate::domain::snapshot::{
    SnapshotId, SnapshotInfo, SnapshotKind, check_disks_free, restored_config,
};
use crate::domain::{VmError, VmId, VmSnapshot};
use crate::ports::{Hypervisor, RestoreVm, VmStore};

impl<H: Hypervisor, S: VmStore> VmManager<H, S> {
    /// SnapshotVm: reserves the id within the limits, has the VM's owner
    /// snapshot into a pending directory, then makes it usable.
    pub(super) async fn take_snapshot(
        &self,
        id: VmId,
        snapshot_id: Option<SnapshotId>,
        resume: bool,
        kind: SnapshotKind,
    ) -> Result<SnapshotInfo, VmError> {
        self.require_backend().await?;
        let backend = self.deps.hypervisor.kind().as_str();
        if kind == SnapshotKind::Diff {
            return Err(VmError::Unimplemented(format!(
                "{backend}: diff snapshots are not offered: Firecracker takes them only with dirty-page tracking on from boot, which VMCP does not turn on, and Cloud Hypervisor has none"
            )));
        }
        let snapshots = self.snapshots()?;
        let (entry, view) = self.created_view(&id)?;
        let snapshot_id = match snapshot_id {
            Some(s) => s,
            None => SnapshotId::parse(
                "snapshot_id",
                &format!("snap-{}", uuid::Uuid::new_v4().simple()),
            )?,
        };
        // The memory file is about the guest's memory size.
        let expected = u64::try_from(view.snapshot.config.memory.size_bytes).unwrap_or(0);
        let now = self.deps.clock.now_unix();
        let taking = snapshots
            .begin(&self.deps.store, snapshot_id.clone(), &id, now, expected)
            .await?;
        let dir = taking.dir.clone();
        let snap = match super::ask(&entry, &id, |reply| Request::Snapshot {
            dir,
            resume,
            reply,
        })
        .await
        {
            Ok(snap) => snap,
            Err(e) => {
                taking.abort().await;
                return Err(e);
            }
        };
        let vmm_version = self.backend_health().await.version;
        taking
            .commit(SnapshotInfo {
                id: snapshot_id,
                source_vm_id: id,
                backend: backend.to_owned(),
                vmm_version,
                config: snap.config,
                created_at: now,
                size_bytes: 0,
                kind,
            })
            .await
    }

    /// A restore is a create whose VMM loads the snapshot: the same
    /// admission (config rules, host paths, limits) and durability.
    pub(super) async fn restore(&self, req: RestoreVm) -> Result<VmSnapshot, VmError> {
        self.require_backend().await?;
        let reading = self.snapshots()?.read(&req.snapshot_id)?;
        let health = self.backend_health().await;
        reading
            .info
            .check_restorable(self.deps.hypervisor.kind().as_str(), &health.version)?;
        let config = restored_config(&reading.info, &req.network_overrides, req.metadata)?;
        if self.registry.contains(&req.vm_id) {
            return Err(VmError::AlreadyExists(req.vm_id.to_string()));
        }
        let views = self.registry.views(&[]);
        check_disks_free(
            &config,
            views.iter().map(|v| (&v.snapshot.id, &v.snapshot.config)),
        )?;
        self.start_vm(
            Some(req.vm_id),
            config,
            Some((reading.dir.clone(), req.resume)),
        )
        .await
    }
}
