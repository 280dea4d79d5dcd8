//! The registry of VMs: for each id, the sender to its owner task and the
//! watch on its view. It holds no VM state of its own; reads borrow the
//! owners' published views.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tokio::sync::{mpsc, watch};

use crate::domain::{VmId, VmState};
use crate::ports::VmCounts;

use crate::app::owner::Request;
use crate::ports::VmDetails;

/// One VM's way in: its owner's queue and its published view.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The owner task's request queue.
    pub tx: mpsc::Sender<Request>,
    /// The owner's latest view of the VM.
    pub view: watch::Receiver<Arc<VmDetails>>,
}

impl Entry {
    /// The VM's current view (a pointer copy).
    pub fn current(&self) -> Arc<VmDetails> {
        Arc::clone(&self.view.borrow())
    }

    /// Whether the VM's create has not finished yet (generation 0).
    pub fn creating(&self) -> bool {
        self.view.borrow().snapshot.generation == 0
    }
}

/// How many *listed* VMs (created: generation > 0, not deleted) are in each
/// state, kept by the owners as they publish, so that ListVms answers its
/// `total_count` without visiting every VM.
#[derive(Debug, Default)]
pub struct ListedCounts {
    counts: [AtomicU64; VmState::ALL.len()],
}

impl ListedCounts {
    /// A VM moved from `from` to `to` (None: not listed).
    pub fn moved(&self, from: Option<VmState>, to: Option<VmState>) {
        if from == to {
            return;
        }
        if let Some(s) = from {
            self.counts[s.index()].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(s) = to {
            self.counts[s.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Listed VMs in one of `states` (all when empty).
    pub fn total(&self, states: &[VmState]) -> u64 {
        VmState::ALL
            .iter()
            .filter(|s| states.is_empty() || states.contains(s))
            .map(|s| self.counts[s.index()].load(Ordering::Relaxed))
            .sum()
    }
}

/// Every VM this VMCP owns, by id.
#[derive(Debug, Default)]
pub struct Registry {
    vms: RwLock<BTreeMap<VmId, Entry>>,
    listed: Arc<ListedCounts>,
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
    pub fn views(&self, states: &[VmState]) -> Vec<Arc<VmDetails>> {
        self.read()
            .values()
            .map(Entry::current)
            .filter(|v| states.is_empty() || states.contains(&v.snapshot.state))
            .collect()
    }

    /// The counts the owners keep of listed VMs (shared with them).
    pub fn listed(&self) -> &Arc<ListedCounts> {
        &self.listed
    }

    /// Up to `size` listed VMs in one of `states` (all when empty), in id
    /// order after `after`, and whether more follow. Visits only the VMs it
    /// returns (plus those a state filter skips), not every VM.
    pub fn page(
        &self,
        states: &[VmState],
        after: Option<&VmId>,
        size: usize,
    ) -> (Vec<Arc<VmDetails>>, bool) {
        let vms = self.read();
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut matching = vms
            .range((start, Bound::Unbounded))
            .map(|(_, e)| e.current())
            .filter(|v| {
                v.snapshot.generation > 0
                    && (states.is_empty() || states.contains(&v.snapshot.state))
            });
        let page: Vec<_> = matching.by_ref().take(size).collect();
        let more = matching.next().is_some();
        (page, more)
    }

    /// VMs per observed state.
    pub fn counts(&self) -> VmCounts {
        self.read()
            .values()
            .map(|e| e.view.borrow().snapshot.state)
            .collect()
    }
}
