//! The host's snapshots as the manager keeps them: the repository (a port)
//! where their files live, an index of the usable ones read from it at
//! start-up, the ones being taken (which count against the limits and
//! cannot be taken twice) and the ones being restored from (which cannot be
//! deleted meanwhile).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::domain::VmError;
use crate::domain::snapshot::{SnapshotId, SnapshotInfo, SnapshotLimits};
use crate::ports::{SnapshotRepo, SnapshotRepoError};

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
}

/// The manager's snapshots.
#[derive(Debug)]
pub struct Snapshots {
    settings: SnapshotSettings,
    state: Mutex<State>,
}

/// A snapshot being taken: its id is reserved until it is committed or dropped.
#[derive(Debug)]
pub struct Taking<'a> {
    snapshots: &'a Snapshots,
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

    /// Start-up: removes what a crash left half-written and indexes the rest.
    pub async fn scan(&self) -> Result<usize, VmError> {
        let repo = Arc::clone(&self.settings.repo);
        let scan = blocking(move || repo.scan()).await?;
        for name in &scan.removed {
            tracing::warn!(snapshot = %name, "removed an unfinished or unreadable snapshot");
        }
        let mut state = self.state();
        state.usable = scan.usable.into_iter().map(|s| (s.id.clone(), s)).collect();
        Ok(state.usable.len())
    }

    /// Reserves `id` for a snapshot expected to take `expected` bytes and
    /// prepares its directory. `already_exists` for a usable or pending id,
    /// `resource_exhausted` past the limits.
    pub async fn begin(&self, id: SnapshotId, expected: u64) -> Result<Taking<'_>, VmError> {
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
            id: id.clone(),
            dir: PathBuf::new(),
            done: false,
        };
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

    /// Deletes snapshot `id` and its files; refused while a restore reads it.
    pub async fn delete(&self, id: &SnapshotId) -> Result<(), VmError> {
        {
            let mut state = self.state();
            if !state.usable.contains_key(id) {
                return Err(VmError::SnapshotNotFound(id.to_string()));
            }
            if state.reading.get(id).is_some_and(|n| *n > 0) {
                return Err(VmError::Incompatible(format!(
                    "snapshot {id} is being restored from; delete it when the restore has finished"
                )));
            }
            // Unlisted first: a restore cannot start from it while its files go.
            state.usable.remove(id);
        }
        let repo = Arc::clone(&self.settings.repo);
        let owned = id.clone();
        blocking(move || repo.delete(&owned)).await
    }
}

impl Taking<'_> {
    /// Makes the snapshot usable with the description `info` (its size is measured).
    pub async fn commit(mut self, info: SnapshotInfo) -> Result<SnapshotInfo, VmError> {
        let repo = Arc::clone(&self.snapshots.settings.repo);
        let committed = blocking(move || repo.commit(info)).await;
        let mut state = self.snapshots.state();
        state.taking.remove(&self.id);
        self.done = true;
        match committed {
            Ok(info) => {
                state.usable.insert(info.id.clone(), info.clone());
                Ok(info)
            }
            Err(e) => {
                drop(state);
                self.snapshots.settings.repo.abort(&self.id);
                Err(e)
            }
        }
    }
}

impl Drop for Taking<'_> {
    /// A snapshot that was not committed leaves nothing: its directory goes.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.snapshots.state().taking.remove(&self.id);
        if !self.dir.as_os_str().is_empty() {
            self.snapshots.settings.repo.abort(&self.id);
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
