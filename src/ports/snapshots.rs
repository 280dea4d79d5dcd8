//! The outbound port to where snapshots are kept: one directory per
//! snapshot, written so that a crash never leaves a half snapshot that
//! lists as usable. A snapshot is first *prepared* (a pending directory the
//! VMM writes its files into), then *committed* (its description written
//! and the directory made usable in one rename) or *aborted* (removed).
//! What recovery finds pending is removed.

use std::path::PathBuf;

use crate::domain::VmId;
use crate::domain::snapshot::{SnapshotId, SnapshotInfo};

/// Why the snapshot repository failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotRepoError {
    /// File-system trouble, with the path.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A description file VMCP cannot read.
    #[error("{0}")]
    Corrupt(String),
}

/// What recovery found on disk.
#[derive(Debug, Default)]
pub struct SnapshotScan {
    /// Usable snapshots.
    pub usable: Vec<SnapshotInfo>,
    /// Pending or unreadable snapshot directories that were removed.
    pub removed: Vec<String>,
}

/// Where snapshots live. Calls block on the file system (fsync): callers
/// run them off the async workers.
pub trait SnapshotRepo: Send + Sync + 'static {
    /// A fresh, empty pending directory for `id` (0700) for the VMM to write into.
    fn prepare(&self, id: &SnapshotId) -> Result<PathBuf, SnapshotRepoError>;

    /// Makes a prepared snapshot usable: measures its files, writes its
    /// description durably and renames the directory into place. Answers
    /// the description with its size.
    fn commit(&self, info: SnapshotInfo) -> Result<SnapshotInfo, SnapshotRepoError>;

    /// Removes a prepared snapshot that will not be committed.
    fn abort(&self, id: &SnapshotId);

    /// The directory of a usable snapshot.
    fn path(&self, id: &SnapshotId) -> PathBuf;

    /// Removes a usable snapshot and its files.
    fn delete(&self, id: &SnapshotId) -> Result<(), SnapshotRepoError>;

    /// At start-up: removes what a crash left pending or unreadable and
    /// lists the usable snapshots.
    fn scan(&self) -> Result<SnapshotScan, SnapshotRepoError>;

    /// Copies the writable disks `disks` (their index in the VM's config,
    /// their path) into the prepared snapshot `id`, while the VM is paused:
    /// a reflink where the file system has them, else a full copy. Answers
    /// how many were full copies.
    fn keep_disks(
        &self,
        id: &SnapshotId,
        disks: &[(usize, PathBuf)],
    ) -> Result<usize, SnapshotRepoError>;

    /// Whether usable snapshot `id` holds a copy of disk `index`.
    fn has_disk(&self, id: &SnapshotId, index: usize) -> bool;

    /// Gives VM `vm` its own copy of each disk `indices` of snapshot `id`
    /// (reflink, else full copy) in the VM's clone directory; answers their
    /// paths in order. On failure no copy is left.
    fn clone_disks(
        &self,
        id: &SnapshotId,
        vm: &VmId,
        indices: &[usize],
    ) -> Result<Vec<PathBuf>, SnapshotRepoError>;

    /// Removes VM `vm`'s clone directory (its disk copies), if any.
    fn remove_clone_disks(&self, vm: &VmId) -> Result<(), SnapshotRepoError>;

    /// The VMs that have a clone directory.
    fn clone_dirs(&self) -> Result<Vec<String>, SnapshotRepoError>;

    /// Where VM `vm`'s disk copies live.
    fn clone_dir(&self, vm: &VmId) -> PathBuf;

    /// Makes the diff snapshot prepared as `id` whole: its [`MEMORY_FILE`]
    /// holds only the pages written since usable snapshot `parent` (a
    /// sparse file, holes elsewhere) and becomes the parent's memory file
    /// (reflink, else full copy) with those pages written over it, synced.
    /// `Corrupt` when the two files differ in size, or when the file system
    /// does not report the diff's holes (its pages cannot be told apart).
    fn complete_diff(
        &self,
        id: &SnapshotId,
        parent: &SnapshotId,
    ) -> Result<DiffMerge, SnapshotRepoError>;
}

/// The guest memory file in the snapshot of a backend with diff snapshots
/// (Firecracker's `mem_file_path`): sparse as the VMM writes a diff, whole
/// once the repository completed it.
pub const MEMORY_FILE: &str = "memory";

/// How a diff snapshot was made whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffMerge {
    /// The parent's memory was reflinked (else copied in full).
    pub reflinked: bool,
    /// Bytes of changed pages written over it.
    pub changed_bytes: u64,
}

/// The name of disk `index`'s copy in a snapshot.
pub fn disk_file(index: usize) -> String {
    format!("disk-{index}")
}
