//! The snapshot calls of the manager: SnapshotVm through the VM's owner into
//! the repository, and RestoreVm as a create whose VMM loads a snapshot.

use super::VmManager;
use crate::app::owner::{Request, RestoreFrom};
use crate::domain::snapshot::{
    SnapshotId, SnapshotInfo, SnapshotKind, check_disks_free, diff_parent, restored_config,
};
use crate::domain::{Command, VmError, VmId, VmSnapshot};
use crate::ports::{BackendKind, Hypervisor, RestoreVm, VmStore};

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
        let backend = self.deps.hypervisor.kind();
        if kind == SnapshotKind::Diff && backend == BackendKind::CloudHypervisor {
            return Err(VmError::Unimplemented(format!(
                "{}: diff snapshots are not offered: Cloud Hypervisor has none (take a full snapshot)",
                backend.as_str()
            )));
        }
        let backend = backend.as_str();
        let snapshots = self.snapshots()?;
        let (entry, view) = self.created_view(&id)?;
        // A diff is taken against the VM's parent, which is held (it cannot be
        // deleted) until the diff is whole.
        let parent = match kind {
            SnapshotKind::Full => None,
            SnapshotKind::Diff => {
                let parent = diff_parent(
                    &id,
                    view.snapshot.config.memory.track_dirty_pages,
                    view.diff.parent.as_ref(),
                    view.diff.last_failed,
                    view.diff.vmm,
                    |s| snapshots.get(s).is_ok(),
                )?;
                Some(snapshots.read(&parent).map_err(|_| {
                    VmError::Incompatible(format!(
                        "vm {id}: no diff snapshot: its parent snapshot {parent} was deleted; take a full snapshot"
                    ))
                })?)
            }
        };
        let snapshot_id = match snapshot_id {
            Some(s) => s,
            None => SnapshotId::parse(
                "snapshot_id",
                &format!("snap-{}", uuid::Uuid::new_v4().simple()),
            )?,
        };
        // Writable disks are copied into the snapshot while the VM is paused,
        // so that its clones start from the disk that matches its memory.
        let disks: Vec<(usize, std::path::PathBuf)> = view
            .snapshot
            .config
            .storage
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only)
            .map(|(i, d)| (i, std::path::PathBuf::from(&d.path)))
            .collect();
        // The memory file is about the guest's memory size; full disk copies their size.
        let expected = u64::try_from(view.snapshot.config.memory.size_bytes).unwrap_or(0)
            + disks
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum::<u64>();
        let now = self.deps.clock.now_unix();
        let taking = snapshots
            .begin(&self.deps.store, snapshot_id.clone(), &id, now, expected)
            .await?;
        let dir = taking.dir.clone();
        // With disks to copy, the VM stays paused until they are.
        let vmm_resumes = resume && disks.is_empty();
        let taken = match super::ask(&entry, &id, |reply| Request::Snapshot {
            dir,
            kind,
            parent: parent.as_ref().map(|p| p.info.id.clone()),
            resume: vmm_resumes,
            reply,
        })
        .await
        {
            Ok(taken) => taken,
            Err(e) => {
                taking.abort().await;
                return Err(e);
            }
        };
        if !disks.is_empty() {
            let kept = taking.keep_disks(disks).await;
            let resumed = if resume {
                self.command(id.clone(), Command::Resume).await.map(drop)
            } else {
                Ok(())
            };
            match kept {
                Ok(full) if full > 0 => {
                    tracing::info!(vm.id = %id, snapshot.id = %snapshot_id, full, "disks copied in full (no reflinks on this file system)");
                }
                Ok(_) => {}
                Err(e) => {
                    taking.abort().await;
                    return Err(e);
                }
            }
            if let Err(e) = resumed {
                taking.abort().await;
                return Err(VmError::Unavailable(format!(
                    "the snapshot was taken but vm {id} could not be resumed, so it was dropped: {e}"
                )));
            }
        }
        // The VM runs again (if asked): the diff is made whole off its pause.
        if let Some(parent) = &parent {
            match taking.complete_diff(&parent.info.id).await {
                Ok(merge) => {
                    tracing::info!(vm.id = %id, snapshot.id = %snapshot_id, parent = %parent.info.id, changed_bytes = merge.changed_bytes, reflinked = merge.reflinked, "diff snapshot made whole");
                }
                Err(e) => {
                    taking.abort().await;
                    return Err(e);
                }
            }
        }
        let vmm_version = self.backend_health().await.version;
        let info = taking
            .commit(SnapshotInfo {
                id: snapshot_id.clone(),
                source_vm_id: id.clone(),
                backend: backend.to_owned(),
                vmm_version,
                config: taken.vm.config,
                created_at: now,
                size_bytes: 0,
                kind,
                parent: parent.as_ref().map(|p| p.info.id.clone()),
            })
            .await?;
        drop(parent);
        // The parent of the VMM's next diff (unless another snapshot began meanwhile).
        let attempt = taken.attempt;
        let recorded = super::ask(&entry, &id, |reply| Request::Committed {
            snapshot: snapshot_id,
            attempt,
            reply,
        })
        .await;
        if let Err(e) = recorded {
            tracing::warn!(vm.id = %id, snapshot.id = %info.id, error = %e, "the snapshot is committed but is not the VM's diff parent; its next diff is refused until a full snapshot");
        }
        Ok(info)
    }

    /// A restore is a create whose VMM loads the snapshot: the same
    /// admission (config rules, host paths, limits) and durability. Each
    /// writable disk the snapshot holds a copy of is copied again for the
    /// new VM (its own disk, removed with it); a writable disk it holds no
    /// copy of may not be in use by another VM.
    pub(super) async fn restore(&self, req: RestoreVm) -> Result<VmSnapshot, VmError> {
        self.require_backend().await?;
        let snapshots = self.snapshots()?;
        let reading = snapshots.read(&req.snapshot_id)?;
        let health = self.backend_health().await;
        reading
            .info
            .check_restorable(self.deps.hypervisor.kind().as_str(), &health.version)?;
        let mut admitted = restored_config(&reading.info, &req.network_overrides, req.metadata)?;
        // A managed interface gets the restored VM's own tap (or the override's, unmanaged).
        let overridden: Vec<&str> = req
            .network_overrides
            .iter()
            .map(|o| o.interface_id.as_str())
            .collect();
        crate::domain::network::for_restore(&mut admitted, &overridden);
        let claim = snapshots.claim_clone(&req.vm_id)?;
        if self.registry.contains(&req.vm_id) {
            return Err(VmError::AlreadyExists(req.vm_id.to_string()));
        }
        let copied: Vec<usize> = admitted
            .storage
            .iter()
            .enumerate()
            .filter(|(i, d)| !d.read_only && snapshots.has_disk(&req.snapshot_id, *i))
            .map(|(i, _)| i)
            .collect();
        let views = self.registry.views(&[]);
        check_disks_free(
            &admitted,
            &copied,
            views.iter().map(|v| (&v.snapshot.id, &v.snapshot.config)),
        )?;
        let mut config = admitted.clone();
        if !copied.is_empty() {
            let paths = snapshots
                .clone_disks(&claim, &req.snapshot_id, copied.clone())
                .await?;
            for (i, path) in copied.iter().zip(paths) {
                config.storage[*i].path = path.display().to_string();
            }
        }
        let result = self
            .start_vm(
                Some(req.vm_id.clone()),
                config,
                Some(RestoreFrom {
                    dir: reading.dir.clone(),
                    snapshot: req.snapshot_id.clone(),
                    resume: req.resume,
                }),
                Some(&admitted),
            )
            .await;
        if result.is_err() && !copied.is_empty() {
            snapshots.remove_clone_disks(&req.vm_id).await;
        }
        drop(claim);
        result
    }
}
