//! The host's snapshots as the manager keeps them: the repository (a port)
//! where their files live, an index of the usable ones read from it at
//! start-up, the ones being taken (which count against the limits and
//! cannot be taken twice) and the ones being restored from (which cannot be
//! deleted meanwhile). Each snapshot is also recorded in the VM store:
//! a pending record before its directory is prepared (intent before
//! action), the whole description once the directory is renamed into place
//! (the commit point: the disk is the truth, the store follows it), and no
//! record once its files are gone. Start-up reconciles the two (see
//! [`crate::domain::snapshot::reconcile`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::domain::snapshot::{
    SnapshotId, SnapshotInfo, SnapshotLimits, SnapshotRecord, reconcile,
};
use crate::domain::{VmError, VmId};
use crate::ports::{DiffMerge, SnapshotRepo, SnapshotRepoError, StoreError, VmStore};

/// Where snapshots go and how many may exist.
#[derive(Clone)]
pub struct SnapshotSettings {
    /// The repository.
    pub repo: Arc<dyn SnapshotRepo>,
    /// Count and byte limits.
    pub limits: SnapshotLimits,
}

impl std::fmt::Debug for SnapshotSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotSettings")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    usable: BTreeMap<SnapshotId, SnapshotInfo>,
    /// Being taken, with the bytes they are expected to take.
    taking: BTreeMap<SnapshotId, u64>,
    /// Restores reading each snapshot now.
    reading: BTreeMap<SnapshotId, usize>,
    /// VMs whose clone directory a restore is filling now.
    cloning: std::collections::BTreeSet<VmId>,
}

/// The manager's snapshots.
#[derive(Debug)]
pub struct Snapshots {
    settings: SnapshotSettings,
    state: Mutex<State>,
}

/// A snapshot being taken: its id is reserved until it is committed or dropped.
#[derive(Debug)]
pub struct Taking<'a, S: VmStore> {
    snapshots: &'a Snapshots,
    store: Arc<S>,
    id: SnapshotId,
    /// The pending directory the VMM writes into.
    pub dir: PathBuf,
    done: bool,
}

/// A restore reading a snapshot: it cannot be deleted until this is dropped.
#[derive(Debug)]
pub struct Reading<'a> {
    snapshots: &'a Snapshots,
    id: SnapshotId,
    /// The snapshot.
    pub info: SnapshotInfo,
    /// Its directory.
    pub dir: PathBuf,
}

fn repo_error(e: SnapshotRepoError) -> VmError {
    VmError::Unavailable(format!("snapshot storage: {e}"))
}

fn store_error(e: StoreError) -> VmError {
    VmError::Unavailable(format!("snapshot record: {e}"))
}

/// What start-up found, for its log and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotsRecovered {
    /// Usable snapshots.
    pub usable: usize,
    /// Usable snapshots (re-)recorded from their description.
    pub recorded: usize,
    /// Pending or unreadable directories removed, and pending records dropped.
    pub removed: usize,
    /// Records of snapshots whose files were gone, dropped.
    pub missing: usize,
}

/// Runs a blocking repository call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotRepoError> + Send + 'static,
) -> Result<T, VmError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| VmError::Internal(format!("snapshot storage task: {e}")))?
        .map_err(repo_error)
}

impl Snapshots {
    /// Snapshots kept by `settings.repo`; [`Snapshots::scan`] fills the index.
    pub fn new(settings: SnapshotSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a few map operations; a poisoned one left them whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Start-up: removes what a crash left half-written, indexes the rest,
    /// and brings the store's records in line with the disk: every whole
    /// snapshot recorded, every other record dropped.
    pub async fn scan<S: VmStore>(&self, store: &S) -> Result<SnapshotsRecovered, VmError> {
        let repo = Arc::clone(&self.settings.repo);
        let scan = blocking(move || repo.scan()).await?;
        for name in &scan.removed {
            tracing::warn!(snapshot = %name, "removed an unfinished or unreadable snapshot");
        }
        let records = store.load_snapshots().await.map_err(store_error)?;
        let plan = reconcile(&records, scan.usable);
        let mut done = SnapshotsRecovered {
            usable: plan.usable.len(),
            removed: scan.removed.len(),
            ..SnapshotsRecovered::default()
        };
        for info in plan.record {
            tracing::info!(snapshot.id = %info.id, "recorded a whole snapshot from its description");
            store
                .put_snapshot(&SnapshotRecord::Committed(info))
                .await
                .map_err(store_error)?;
            done.recorded += 1;
        }
        for id in plan.drop_pending {
            tracing::info!(snapshot.id = %id, "dropped the record of a snapshot a crash interrupted");
            store.remove_snapshot(&id).await.map_err(store_error)?;
            done.removed += 1;
        }
        for id in plan.drop_missing {
            tracing::warn!(snapshot.id = %id, "a recorded snapshot has no files; its record is dropped");
            store.remove_snapshot(&id).await.map_err(store_error)?;
            done.missing += 1;
        }
        self.state().usable = plan.usable.into_iter().map(|s| (s.id.clone(), s)).collect();
        Ok(done)
    }

    /// Reserves `id` for a snapshot expected to take `expected` bytes and
    /// prepares its directory. `already_exists` for a usable or pending id,
    /// `resource_exhausted` past the limits.
    pub async fn begin<S: VmStore>(
        &self,
        store: &Arc<S>,
        id: SnapshotId,
        source: &VmId,
        now: i64,
        expected: u64,
    ) -> Result<Taking<'_, S>, VmError> {
        {
            let mut state = self.state();
            if state.usable.contains_key(&id) || state.taking.contains_key(&id) {
                return Err(VmError::SnapshotExists(id.to_string()));
            }
            let count = (state.usable.len() + state.taking.len()) as u64;
            let bytes = state.usable.values().map(|s| s.size_bytes).sum::<u64>()
                + state.taking.values().sum::<u64>();
            self.settings.limits.check(count, bytes, expected)?;
            state.taking.insert(id.clone(), expected);
        }
        let mut taking = Taking {
            snapshots: self,
            store: Arc::clone(store),
            id: id.clone(),
            dir: PathBuf::new(),
            done: false,
        };
        // The intent is durable before any file exists.
        let intent = SnapshotRecord::Pending {
            id: id.clone(),
            source_vm_id: source.clone(),
            created_at: now,
        };
        if let Err(e) = store.put_snapshot(&intent).await {
            taking.done = true;
            self.state().taking.remove(&id);
            return Err(store_error(e));
        }
        let repo = Arc::clone(&self.settings.repo);
        taking.dir = blocking(move || repo.prepare(&id)).await?;
        Ok(taking)
    }

    /// The usable snapshots, ordered by id (of `source` only, when given).
    pub fn list(&self, source: Option<&str>) -> Vec<SnapshotInfo> {
        self.state()
            .usable
            .values()
            .filter(|s| source.is_none_or(|v| s.source_vm_id.as_str() == v))
            .cloned()
            .collect()
    }

    /// One usable snapshot.
    pub fn get(&self, id: &SnapshotId) -> Result<SnapshotInfo, VmError> {
        self.state()
            .usable
            .get(id)
            .cloned()
            .ok_or_else(|| VmError::SnapshotNotFound(id.to_string()))
    }

    /// Holds snapshot `id` for a restore.
    pub fn read(&self, id: &SnapshotId) -> Result<Reading<'_>, VmError> {
        let mut state = self.state();
        let info = state
            .usable
            .get(id)
            .cloned()
            .ok_or_else(|| VmError::SnapshotNotFound(id.to_string()))?;
        *state.reading.entry(id.clone()).or_default() += 1;
        Ok(Reading {
            snapshots: self,
            id: id.clone(),
            dir: self.settings.repo.path(id),
            info,
        })
    }

    /// Deletes snapshot `id` and its files, then its record (a crash in
    /// between leaves a record without files, dropped at the next start);
    /// refused while a restore reads it.
    pub async fn delete<S: VmStore>(&self, store: &S, id: &SnapshotId) -> Result<(), VmError> {
        {
            let mut state = self.state();
            if !state.usable.contains_key(id) {
                return Err(VmError::SnapshotNotFound(id.to_string()));
            }
            if state.reading.get(id).is_some_and(|n| *n > 0) {
                return Err(VmError::Incompatible(format!(
                    "snapshot {id} is being read (a restore from it, or a diff snapshot taken against it); delete it when that has finished"
                )));
            }
            // Unlisted first: a restore cannot start from it while its files go.
            state.usable.remove(id);
        }
        let repo = Arc::clone(&self.settings.repo);
        let owned = id.clone();
        blocking(move || repo.delete(&owned)).await?;
        if let Err(e) = store.remove_snapshot(id).await {
            tracing::warn!(snapshot.id = %id, error = %e, "the snapshot's files are deleted but its record stays; it is dropped at the next start");
        }
        Ok(())
    }
}

/// A restore's claim on a VM id's clone directory: no other restore of
/// that id fills or removes it meanwhile.
#[derive(Debug)]
pub struct Cloning<'a> {
    snapshots: &'a Snapshots,
    vm: VmId,
}

impl Drop for Cloning<'_> {
    fn drop(&mut self) {
        self.snapshots.state().cloning.remove(&self.vm);
    }
}

impl Snapshots {
    /// Claims VM id `vm` for a restore; `unavailable` while another restore has it.
    pub fn claim_clone(&self, vm: &VmId) -> Result<Cloning<'_>, VmError> {
        if !self.state().cloning.insert(vm.clone()) {
            return Err(VmError::Unavailable(format!(
                "vm {vm} is being restored by another request; retry"
            )));
        }
        Ok(Cloning {
            snapshots: self,
            vm: vm.clone(),
        })
    }

    /// Whether snapshot `id` holds a copy of disk `index`.
    pub fn has_disk(&self, id: &SnapshotId, index: usize) -> bool {
        self.settings.repo.has_disk(id, index)
    }

    /// Gives the VM of `claim` its own copy of disks `indices` of snapshot `id`.
    pub async fn clone_disks(
        &self,
        claim: &Cloning<'_>,
        id: &SnapshotId,
        indices: Vec<usize>,
    ) -> Result<Vec<PathBuf>, VmError> {
        let repo = Arc::clone(&self.settings.repo);
        let (id, vm) = (id.clone(), claim.vm.clone());
        blocking(move || repo.clone_disks(&id, &vm, &indices)).await
    }

    /// Removes VM `vm`'s disk copies (after its delete or a failed restore).
    pub async fn remove_clone_disks(&self, vm: &VmId) {
        let repo = Arc::clone(&self.settings.repo);
        let owned = vm.clone();
        if let Err(e) = blocking(move || repo.remove_clone_disks(&owned)).await {
            tracing::warn!(vm.id = %vm, error = %e, "cannot remove the VM's disk copies; they are removed at the next start");
        }
    }

    /// Start-up, after the VMs are recovered: removes the disk copies of
    /// VMs that do not exist (a crash between a restore's copies and its
    /// record, or between a delete and the copies' removal).
    pub async fn remove_unowned_clone_disks(&self, exists: impl Fn(&VmId) -> bool) {
        let repo = Arc::clone(&self.settings.repo);
        let dirs = match blocking(move || repo.clone_dirs()).await {
            Ok(dirs) => dirs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the clones' disk copies");
                return;
            }
        };
        for name in dirs {
            let Ok(vm) = VmId::parse(&name) else {
                tracing::warn!(dir = %name, "a clone directory that names no VM is left alone");
                continue;
            };
            if !exists(&vm) {
                tracing::info!(vm.id = %vm, "removed the disk copies of a VM that does not exist");
                self.remove_clone_disks(&vm).await;
            }
        }
    }
}

impl<S: VmStore> Taking<'_, S> {
    /// Keeps a copy of the writable `disks` (index, path) in the snapshot;
    /// the VM must be paused. Answers how many were full copies.
    pub async fn keep_disks(&self, disks: Vec<(usize, PathBuf)>) -> Result<usize, VmError> {
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let id = self.id.clone();
        blocking(move || repo.keep_disks(&id, &disks)).await
    }
}

impl<S: VmStore> Taking<'_, S> {
    /// Makes this diff snapshot whole from its parent (see
    /// [`SnapshotRepo::complete_diff`]); the parent must be held.
    pub async fn complete_diff(&self, parent: &SnapshotId) -> Result<DiffMerge, VmError> {
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let (id, parent) = (self.id.clone(), parent.clone());
        blocking(move || repo.complete_diff(&id, &parent)).await
    }

    /// Makes the snapshot usable with the description `info` (its size is
    /// measured): the directory is renamed into place, then recorded. When
    /// the record cannot be written the snapshot is deleted again, so what
    /// lists is always recorded.
    pub async fn commit(mut self, info: SnapshotInfo) -> Result<SnapshotInfo, VmError> {
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let committed = blocking(move || repo.commit(info)).await;
        let info = match committed {
            Ok(info) => info,
            Err(e) => {
                self.abort().await;
                return Err(e);
            }
        };
        self.done = true;
        let recorded = self
            .store
            .put_snapshot(&SnapshotRecord::Committed(info.clone()))
            .await;
        {
            let mut state = self.snapshots.state();
            state.taking.remove(&self.id);
            if recorded.is_ok() {
                state.usable.insert(info.id.clone(), info.clone());
            }
        }
        let Err(e) = recorded else {
            return Ok(info);
        };
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let id = self.id.clone();
        if let Err(e) = blocking(move || repo.delete(&id)).await {
            tracing::warn!(snapshot.id = %self.id, error = %e, "cannot remove an unrecorded snapshot; it is recorded or removed at the next start");
        }
        if let Err(e) = self.store.remove_snapshot(&self.id).await {
            tracing::warn!(snapshot.id = %self.id, error = %e, "cannot drop a snapshot's pending record; it is dropped at the next start");
        }
        Err(store_error(e))
    }
}

impl<S: VmStore> Taking<'_, S> {
    /// Gives the snapshot up: its directory and pending record go now.
    pub async fn abort(mut self) {
        self.done = true;
        self.snapshots.state().taking.remove(&self.id);
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let id = self.id.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || repo.abort(&id)).await {
            tracing::warn!(snapshot.id = %self.id, error = %e, "snapshot abort task failed");
        }
        if let Err(e) = self.store.remove_snapshot(&self.id).await {
            tracing::warn!(snapshot.id = %self.id, error = %e, "cannot drop a failed snapshot's record; it is dropped at the next start");
        }
    }
}

impl<S: VmStore> Drop for Taking<'_, S> {
    /// A snapshot that was not committed leaves nothing: its directory goes,
    /// and its pending record (in a task; the next start drops it otherwise).
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.snapshots.state().taking.remove(&self.id);
        if !self.dir.as_os_str().is_empty() {
            self.snapshots.settings.repo.abort(&self.id);
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.store);
            let id = self.id.clone();
            rt.spawn(async move {
                if let Err(e) = store.remove_snapshot(&id).await {
                    tracing::warn!(snapshot.id = %id, error = %e, "cannot drop a failed snapshot's record; it is dropped at the next start");
                }
            });
        }
    }
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut state = self.snapshots.state();
        if let Some(n) = state.reading.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                state.reading.remove(&self.id);
            }
        }
    }
}
