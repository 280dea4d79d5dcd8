//! The owner recording what changed: the record in the store (intent before
//! action, identity with state), the view readers borrow, and the change
//! feed that gives each visible change its revision and reaches watchers.

use std::sync::Arc;

use super::{Owner, Persisted};
use crate::domain::VmError;
use crate::ports::{Hypervisor, TelemetryEvent, VmRecord, VmStore, WatchEventKind};

impl<H: Hypervisor, S: VmStore> Owner<H, S> {
    /// Records the VM if it changed, publishes the view to readers and,
    /// for a visible change, to watchers; drains lifecycle events.
    ///
    /// A visible change (a new generation, or the delete of an announced
    /// VM) is recorded with a ticket from the feed: the change takes the
    /// next revision, the record is written with it, the view is published,
    /// then the change is committed; the feed publishes commits in revision
    /// order, so every reader and watcher sees revisions in one order while
    /// owners write their records at the same time (see feed/mod.rs).
    pub(super) async fn publish(&mut self) {
        let snap = self.vm.snapshot();
        let (announced, before) = self.announced;
        let kind = if snap.deleted {
            (announced > 0).then_some(WatchEventKind::Deleted)
        } else if snap.generation > 0 && snap.generation != announced {
            Some(if announced == 0 {
                WatchEventKind::Added
            } else {
                WatchEventKind::Changed
            })
        } else {
            None
        };
        let feed = Arc::clone(&self.deps.feed);
        let recording = kind.map(|_| feed.record());
        if let Some(rec) = &recording {
            self.vm.set_revision(rec.revision());
        }
        let snap = self.vm.snapshot();
        if snap.deleted {
            if let Some(rec) = &recording
                && let Err(e) = self.deps.store.remove(&snap.id, rec.revision()).await
            {
                tracing::error!(vm.id = %snap.id, error = %e, "VM deleted but its record could not be removed; it is reconciled at the next start");
            }
        } else {
            let now = Persisted {
                generation: snap.generation,
                desired: snap.desired,
                process: self.process.clone(),
                diff_parent: self.diff_parent.clone(),
            };
            if (recording.is_some() || self.persisted.as_ref() != Some(&now))
                && let Err(e) = self.persist().await
            {
                tracing::error!(vm.id = %self.vm.snapshot().id, error = %e, "could not persist VM state; it is reconciled from the VMM at the next start");
            }
        }
        self.refresh_view();
        if !Arc::ptr_eq(&self.view, &self.view_tx.borrow()) {
            self.send_view();
        }
        if let (Some(rec), Some(kind)) = (recording, kind) {
            let snap = self.vm.snapshot();
            self.announced = if snap.deleted {
                (0, None)
            } else {
                (snap.generation, Some(snap.state))
            };
            rec.commit(kind, Arc::new(snap.clone()), before);
        }
        while let Some(ev) = self.vm.poll_event() {
            self.deps.telemetry.record(TelemetryEvent::Vm(ev));
        }
    }

    /// Brings the view up to date with the core's snapshot and the VMM's
    /// identity as the owner knows it (the same keys on every backend, fresh
    /// after every operation, not only after the next sample).
    pub(super) fn refresh_view(&mut self) {
        let identity = self
            .process
            .as_ref()
            .map(|p| (p.pid.to_string(), p.socket_path.clone()));
        let shown = (
            self.view.backend_info.get("vmm_pid").cloned(),
            self.view.backend_info.get("api_socket").cloned(),
        );
        let identity_changed = match &identity {
            Some((pid, socket)) => {
                shown.0.as_ref() != Some(pid) || shown.1.as_ref() != Some(socket)
            }
            None => shown.0.is_some(),
        };
        let diff = self.diff_view();
        if self.view.snapshot != *self.vm.snapshot() || identity_changed || self.view.diff != diff {
            let mut view = (*self.view).clone();
            view.snapshot = self.vm.snapshot().clone();
            view.diff = diff;
            match identity {
                Some((pid, socket)) => {
                    view.backend_info.insert("vmm_pid".to_owned(), pid);
                    view.backend_info.insert("api_socket".to_owned(), socket);
                }
                None => {
                    view.backend_info.remove("vmm_pid");
                }
            }
            self.view = Arc::new(view);
        }
    }

    /// Writes the VM's record: committed when this returns, so a crash of
    /// VMCP cannot lose it; [`Owner::sync_store`] makes it survive a power
    /// loss, before a client is told.
    pub(super) async fn persist(&mut self) -> Result<(), VmError> {
        let snap = self.vm.snapshot();
        let record = VmRecord {
            snapshot: snap.clone(),
            process: self.process.clone(),
            diff_parent: self.diff_parent.clone(),
        };
        self.deps
            .store
            .put_unsynced(&record)
            .await
            .map_err(|e| VmError::Unavailable(format!("cannot record the VM's state: {e}")))?;
        self.persisted = Some(Persisted {
            generation: snap.generation,
            desired: snap.desired,
            process: self.process.clone(),
            diff_parent: self.diff_parent.clone(),
        });
        Ok(())
    }

    /// Makes the VM's records so far survive a power loss; a failure is
    /// logged (the records are committed, and a crash cannot lose them).
    pub(super) async fn sync_store(store: &S) {
        if let Err(e) = store.sync().await {
            tracing::error!(error = %e, "could not flush the store to disk; a power loss may lose the latest changes");
        }
    }
}
