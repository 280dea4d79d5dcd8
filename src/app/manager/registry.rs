//! The registry of VMs: for each id, the sender to its owner task and the
//! watch on its view. It holds no VM state of its own; reads borrow the
//! owners' published views.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, watch};

use crate::domain::{VmId, VmState};
use crate::ports::VmCounts;

use crate::app::owner::{Request, VmView};

/// One VM's way in: its owner's queue and its published view.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The owner task's request queue.
    pub tx: mpsc::Sender<Request>,
    /// The owner's latest view of the VM.
    pub view: watch::Receiver<Arc<VmView>>,
}

impl Entry {
    /// The VM's current view (a pointer copy).
    pub fn current(&self) -> Arc<VmView> {
        Arc::clone(&self.view.borrow())
    }

    /// Whether the VM's create has not finished yet (generation 0).
    pub fn creating(&self) -> bool {
        self.view.borrow().snapshot.generation == 0
    }
}

/// Every VM this VMCP owns, by id.
#[derive(Debug, Default)]
pub struct Registry {
    vms: RwLock<BTreeMap<VmId, Entry>>,
}

impl Registry {
    /// A poisoned lock cannot leave the map half-updated (every critical
    /// section is one insert, remove or read), so it is used anyway.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<VmId, Entry>> {
        self.vms.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Write access, for check-then-insert under one lock (create).
    pub fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<VmId, Entry>> {
        self.vms.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `id`.
    pub fn get(&self, id: &VmId) -> Option<Entry> {
        self.read().get(id).cloned()
    }

    /// Adds or replaces the entry of `id`.
    pub fn insert(&self, id: VmId, entry: Entry) {
        self.write().insert(id, entry);
    }

    /// Removes the entry of `id` if it still belongs to the owner behind `tx`
    /// (a newer VM of the same id is left alone).
    pub fn remove_if_owned_by(&self, id: &VmId, tx: &mpsc::Sender<Request>) {
        let mut vms = self.write();
        if vms.get(id).is_some_and(|e| e.tx.same_channel(tx)) {
            vms.remove(id);
        }
    }

    /// Whether `id` is taken.
    pub fn contains(&self, id: &VmId) -> bool {
        self.read().contains_key(id)
    }

    /// The views of every VM in one of `states` (all when empty), ordered by id.
    pub fn views(&self, states: &[VmState]) -> Vec<Arc<VmView>> {
        self.read()
            .values()
            .map(Entry::current)
            .filter(|v| states.is_empty() || states.contains(&v.snapshot.state))
            .collect()
    }

    /// VMs per observed state.
    pub fn counts(&self) -> VmCounts {
        self.read()
            .values()
            .map(|e| e.view.borrow().snapshot.state)
            .collect()
    }
}
