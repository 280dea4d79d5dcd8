//! The port through which VM records survive VMCP restarts.

use std::future::Future;

use crate::domain::snapshot::{DiffParent, SnapshotId, SnapshotRecord};
use crate::domain::{VmId, VmSnapshot};

use super::hypervisor::VmmProcess;

/// Everything needed to re-adopt or reconcile a VM after a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    /// Config, desired and observed state, reason, generation, timestamps,
    /// and the revision of the VM's last recorded change.
    pub snapshot: VmSnapshot,
    /// The VMM process, once one was started.
    pub process: Option<VmmProcess>,
    /// The snapshot the VMM's next diff snapshot is taken against, if any.
    pub diff_parent: Option<DiffParent>,
}

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be written now (disk full, I/O error); nothing was changed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The stored data cannot be read back (corruption, unknown schema).
    #[error("store corrupt: {0}")]
    Corrupt(String),
}

/// Durable VM records.
#[cfg_attr(test, mockall::automock)]
pub trait VmStore: Send + Sync + 'static {
    /// Inserts or replaces the record for `record.snapshot.id`, atomically,
    /// and is on stable storage when it returns (it survives a power loss,
    /// and so does every write before it). For intents: what VMCP is about
    /// to do. MUST return `Unavailable` and leave the previous record intact
    /// on failure.
    fn put(&self, record: &VmRecord) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Like [`VmStore::put`], but only as durable as a crash of VMCP needs:
    /// the record survives VMCP being killed at any point after this returns,
    /// but a power loss or a kernel crash may take it, with every later
    /// unsynced write and none before the last `put` or [`VmStore::sync`]
    /// (writes are ordered).
    fn put_unsynced(
        &self,
        record: &VmRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.put(record)
    }

    /// Makes every write that returned before this call survive a power
    /// loss. Writers may run meanwhile; concurrent syncs may share one flush.
    fn sync(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }

    /// Removes the record for `id`; removing a missing record succeeds.
    /// `revision` is the host revision of the delete: the store keeps the
    /// highest revision it was ever given (see [`VmStore::revision`]).
    fn remove(
        &self,
        id: &VmId,
        revision: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads every record, ordered by id. MUST return `Corrupt` rather than
    /// skip a record it cannot decode.
    fn load_all(&self) -> impl Future<Output = Result<Vec<VmRecord>, StoreError>> + Send;

    /// The highest revision ever recorded: of any record put (its
    /// `snapshot.revision`) or removed. Revisions continue from it after a
    /// restart, so they never go backwards.
    fn revision(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts or replaces the record of snapshot `record.id()`, atomically
    /// and durably. MUST return `Unavailable` and leave the previous record
    /// intact on failure.
    fn put_snapshot(
        &self,
        record: &SnapshotRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes the record of snapshot `id`; removing a missing one succeeds.
    fn remove_snapshot(
        &self,
        id: &SnapshotId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads every snapshot record, ordered by id. MUST return `Corrupt`
    /// rather than skip a record it cannot decode.
    fn load_snapshots(
        &self,
    ) -> impl Future<Output = Result<Vec<SnapshotRecord>, StoreError>> + Send;
}
