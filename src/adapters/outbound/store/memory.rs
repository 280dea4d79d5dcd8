//! An in-memory `VmStore`: records live as long as the process. Used by tests
//! and wherever durability is not wanted.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::domain::VmId;
use crate::domain::snapshot::{SnapshotId, SnapshotRecord};
use crate::ports::{StoreError, VmRecord, VmStore};

/// Records in a map.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<VmId, VmRecord>>,
    revision: std::sync::atomic::AtomicU64,
    snapshots: Mutex<BTreeMap<SnapshotId, SnapshotRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MemoryStore {
    fn raise(&self, revision: u64) {
        self.revision
            .fetch_max(revision, std::sync::atomic::Ordering::AcqRel);
    }
}

impl VmStore for MemoryStore {
    async fn put(&self, record: &VmRecord) -> Result<(), StoreError> {
        self.raise(record.snapshot.revision);
        if record.snapshot.deleted {
            return self
                .remove(&record.snapshot.id, record.snapshot.revision)
                .await;
        }
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.snapshot.id.clone(), record.clone());
        Ok(())
    }

    async fn remove(&self, id: &VmId, revision: u64) -> Result<(), StoreError> {
        self.raise(revision);
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        Ok(self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect())
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.revision.load(std::sync::atomic::Ordering::Acquire))
    }

    async fn put_snapshot(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(record.id().clone(), record.clone());
        Ok(())
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    async fn load_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        Ok(self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect())
    }
}
