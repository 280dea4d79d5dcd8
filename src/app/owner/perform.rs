//! The owner performing what its core decided, against the VM's VMM handle:
//! creating the VMM, each admitted operation, the periodic sample, and what
//! the VMM did on its own (an exit, a reported change). Each outcome is fed
//! back to the core as an observation, with the state read back after a
//! failure, so the record stays true.

use std::sync::Arc;
use std::time::Instant;

use super::calls::{hypervisor_to_vm_error, timed_call};
use super::{Deps, Owner, handle_without_vmm};
use crate::domain::restart::Cause;
use crate::domain::snapshot::DiffParent;
use crate::domain::{Command, Observation, Operation, VmError, VmState};
use crate::ports::{
    Hypervisor, HypervisorError, Reported, ShutdownMode, TelemetryEvent, VmStore, VmmEvent,
    VmmHandle, VmmInfo,
};

impl<H: Hypervisor, S: VmStore> Owner<H, S> {
    pub(super) async fn perform(&mut self, cmd: Command) -> Result<(), VmError> {
        let op = cmd.operation();
        if op == Operation::Create {
            return self.create().await;
        }
        if op == Operation::Boot && self.vmm.is_none() {
            // Recovery could not give this VM a handle: get a fresh one to boot it with.
            let snap = self.vm.snapshot();
            match handle_without_vmm(&self.deps, &snap.id, &snap.config, self.events_tx.clone())
                .await
            {
                Ok(vmm) => self.vmm = Some(vmm),
                Err(e) => {
                    tracing::warn!(vm.id = %snap.id, error = %e, "no VMM handle to boot the VM with");
                }
            }
        }
        let kind = self.deps.hypervisor.kind();
        if matches!(op, Operation::Boot | Operation::Reboot)
            && let Some(net) = self.deps.network.get()
        {
            // A VMM that starts again (a boot after a stop, a reboot that respawns it)
            // opens its taps again: make sure they are still there.
            let config = self.vm.snapshot().config.clone();
            crate::app::network::ensure_missing(net, &config, kind).await?;
        }
        // The VMM clears its dirty pages when it writes a snapshot: from here
        // until the new one is committed there is no parent for a diff, and
        // the record says so before the VMM is asked (a crash cannot leave
        // a parent the VMM no longer diffs against).
        let cleared = if op == Operation::Snapshot {
            self.begin_snapshot_attempt().await
        } else {
            Ok(())
        };
        let tel = &*self.deps.telemetry;
        let t = self.deps.call_timeout;
        // A graceful stop may take its grace on top of the call timeout.
        let budget = t + cmd.graceful_timeout().unwrap_or_default();
        let started = Instant::now();
        let outcome: Result<Option<Reported>, HypervisorError> = match self.vmm.as_mut() {
            // A VM recovery could not give a handle: nothing runs, so deleting it is forgetting it.
            None if op == Operation::Delete => Ok(None),
            None => Err(HypervisorError::Gone(
                "the VM has no VMM handle (see its reason); it can only be deleted".to_owned(),
            )),
            Some(vmm) => match cmd {
                // Performed by `Owner::create` above, never through a handle.
                Command::Create => Err(HypervisorError::Protocol(
                    "create performed on an existing VMM handle".to_owned(),
                )),
                Command::Boot => timed_call(kind, tel, "boot", t, vmm.boot()).await.map(Some),
                Command::Shutdown { force, .. } => {
                    let mode = ShutdownMode {
                        force,
                        graceful_timeout: cmd.graceful_timeout().unwrap_or_default(),
                    };
                    timed_call(kind, tel, "shutdown", budget, vmm.shutdown(mode))
                        .await
                        .map(Some)
                }
                Command::Pause => timed_call(kind, tel, "pause", t, vmm.pause())
                    .await
                    .map(Some),
                Command::Resume => timed_call(kind, tel, "resume", t, vmm.resume())
                    .await
                    .map(Some),
                Command::Reboot { force } => timed_call(kind, tel, "reboot", t, vmm.reboot(force))
                    .await
                    .map(Some),
                Command::Delete { force } => {
                    timed_call(kind, tel, "delete", budget, vmm.delete(force))
                        .await
                        .map(|()| None)
                }
                Command::Snapshot { resume } => match (self.snapshot_to.clone(), cleared) {
                    (_, Err(e)) => Err(HypervisorError::unavailable(e.to_string())),
                    (Some((dir, snapshot_kind)), Ok(())) => {
                        let memory =
                            u64::try_from(self.vm.snapshot().config.memory.size_bytes).unwrap_or(0);
                        let budget = t + super::snapshot_time(memory);
                        let written = vmm.snapshot(&dir, snapshot_kind, resume);
                        timed_call(kind, tel, "snapshot", budget, written)
                            .await
                            .map(Some)
                    }
                    (None, Ok(())) => Err(HypervisorError::Protocol(
                        "a snapshot without a directory".to_owned(),
                    )),
                },
                Command::Resize(size) => timed_call(kind, tel, "resize", t, vmm.resize(size))
                    .await
                    .map(|(reported, size)| {
                        // The config shows the size the VMM reports, with the state below.
                        let now = self.deps.clock.now_unix();
                        self.vm.handle_observation(Observation::Sized(size), now);
                        Some(reported)
                    }),
            },
        };
        let now = self.deps.clock.now_unix();
        match outcome {
            Ok(reported) => {
                let reported = reported.map(|r| {
                    self.process = r.process;
                    (r.state, r.reason)
                });
                if op == Operation::Snapshot {
                    self.written_by = self.process.clone().map(|p| (self.snapshot_attempt, p));
                }
                if op == Operation::Boot
                    && reported
                        .as_ref()
                        .is_some_and(|(s, _)| *s == VmState::Running)
                {
                    tel.record(TelemetryEvent::BootCompleted {
                        backend: kind,
                        duration: started.elapsed(),
                    });
                }
                if op == Operation::Delete {
                    // The record goes when the delete is published (see `publish`).
                    self.process = None;
                    self.vmm = None;
                    // No VMM holds the taps any more.
                    if let Some(net) = self.deps.network.get() {
                        crate::app::network::release(net, &self.vm.snapshot().config).await;
                    }
                }
                self.vm.handle_observation(
                    Observation::Completed {
                        op,
                        reported,
                        error: None,
                    },
                    now,
                );
                Ok(())
            }
            Err(e) => {
                // The operation failed: read back what the VMM reports now, and which
                // process serves the VM, so the record is true, and so a refusal names
                // the state the VM is in now rather than the one VMCP acted on.
                let reported = self.read_back().await;
                let err = match &reported {
                    Some((state, _)) => {
                        let mut seen = self.vm.snapshot().clone();
                        seen.state = *state;
                        hypervisor_to_vm_error(e, &seen, op)
                    }
                    None => hypervisor_to_vm_error(e, self.vm.snapshot(), op),
                };
                self.vm.handle_observation(
                    Observation::Completed {
                        op,
                        reported,
                        error: Some(err.clone()),
                    },
                    now,
                );
                if op == Operation::Boot && self.vm.restarting() {
                    // The policy's own boot failed: back off and try again, or give up.
                    self.vm.consider_restart(
                        Cause::FailedStart,
                        err.to_string(),
                        Instant::now(),
                        now,
                    );
                }
                Err(err)
            }
        }
    }

    /// Creates the VMM: the record (generation 0, no process) is committed
    /// first, so a crash during the create is rolled back at the next start,
    /// and flushed to disk while the VMM starts, before the answer.
    pub(super) async fn create(&mut self) -> Result<(), VmError> {
        let intent = self.persist().await;
        let flush = intent.is_ok().then(|| Arc::clone(&self.deps.store));
        let (outcome, ()) = tokio::join!(self.start_vmm(intent), async {
            if let Some(store) = flush {
                Self::sync_store(&store).await;
            }
        });
        outcome
    }

    /// The create after its intent (`intent`: whether it was recorded): the
    /// taps, then the VMM, then the outcome fed to the core.
    async fn start_vmm(&mut self, intent: Result<(), VmError>) -> Result<(), VmError> {
        let id = self.vm.snapshot().id.clone();
        let config = self.vm.snapshot().config.clone();
        let now = self.deps.clock.now_unix();
        let intent_recorded = intent.is_ok();
        let deps = self.deps.clone();
        let h = &*deps.hypervisor;
        let kind = h.kind();
        let tel = &*deps.telemetry;
        let t = deps.call_timeout;
        // The taps VMCP manages exist before the VMM that opens them (after the
        // intent: a crash from here on leaves a record whose rollback, or the
        // start-up sweep, removes them).
        let networking = deps.network.get();
        let taps = match (&intent, networking) {
            (Ok(()), Some(net)) => crate::app::network::ensure(net, &config, kind).await,
            _ => Ok(()),
        };
        // Only taps this create made are removed on its failure (not a foreign holder of the name).
        let taps_made = intent_recorded && taps.is_ok();
        let mut restored = None;
        let outcome = match intent.and(taps) {
            Err(e) => Err(e),
            Ok(()) => match match self.restore_from.take() {
                None => {
                    timed_call(
                        kind,
                        tel,
                        "create",
                        t,
                        h.create(&id, &config, self.events_tx.clone()),
                    )
                    .await
                }
                Some(from) => {
                    let memory = u64::try_from(config.memory.size_bytes).unwrap_or(0);
                    let restore =
                        h.restore(&id, &config, &from.dir, from.resume, self.events_tx.clone());
                    let budget = t + super::snapshot_time(memory);
                    restored = Some(from.snapshot);
                    timed_call(kind, tel, "restore", budget, restore).await
                }
            } {
                Ok((vmm, reported)) => {
                    self.process = reported.process.clone();
                    self.vmm = Some(vmm);
                    // The VMM that loaded a snapshot diffs against it (it tracks from the load).
                    if let (Some(snapshot), Some(p), true) = (
                        restored.take(),
                        &self.process,
                        config.memory.track_dirty_pages,
                    ) {
                        self.diff_parent = Some(DiffParent {
                            snapshot_id: snapshot,
                            vmm_pid: p.pid,
                            vmm_start_time: p.start_time,
                        });
                    }
                    Ok((reported.state, reported.reason))
                }
                Err(e) => {
                    if matches!(e, HypervisorError::Timeout { .. }) {
                        // The abandoned create may still have started a VMM: find and end it.
                        end_vmms_of(&deps, &id).await;
                    }
                    Err(hypervisor_to_vm_error(
                        e,
                        self.vm.snapshot(),
                        Operation::Create,
                    ))
                }
            },
        };
        match outcome {
            Ok(reported) => {
                self.vm.handle_observation(
                    Observation::Completed {
                        op: Operation::Create,
                        reported: Some(reported),
                        error: None,
                    },
                    now,
                );
                Ok(())
            }
            Err(err) => {
                // Create leaves nothing behind on failure, so the record goes too
                // (a failed intent write left none).
                if let Some(net) = networking.filter(|_| taps_made) {
                    crate::app::network::release(net, &config).await;
                }
                // The VM was never announced, so its removal is no change: no new revision.
                if intent_recorded
                    && let Err(e) = self.deps.store.remove(&id, self.deps.feed.revision()).await
                {
                    tracing::error!(vm.id = %id, error = %e, "could not remove the record of a failed create; it is rolled back at the next start");
                }
                self.vm.handle_observation(
                    Observation::Completed {
                        op: Operation::Create,
                        reported: None,
                        error: Some(err.clone()),
                    },
                    now,
                );
                Err(err)
            }
        }
    }

    /// A snapshot attempt begins: no diff parent until it is committed, and
    /// the record says so before the VMM writes anything.
    async fn begin_snapshot_attempt(&mut self) -> Result<(), VmError> {
        self.snapshot_attempt += 1;
        self.snapshot_failed = true;
        self.written_by = None;
        if self.diff_parent.take().is_some() {
            let persisted = self.persist().await;
            self.refresh_view();
            self.send_view();
            persisted?;
        }
        Ok(())
    }

    /// Asks the handle for a sample, under the call timeout (None without a handle).
    pub(super) async fn read_vmm(&mut self) -> Option<Result<VmmInfo, HypervisorError>> {
        let vmm = self.vmm.as_mut()?;
        let kind = self.deps.hypervisor.kind();
        let tel = &*self.deps.telemetry;
        Some(timed_call(kind, tel, "sample", self.deps.call_timeout, vmm.sample()).await)
    }

    /// After a failed operation: the state the VMM reports now (None if it
    /// cannot be read), with the handle's current process recorded.
    pub(super) async fn read_back(&mut self) -> Option<(VmState, String)> {
        self.process = self.vmm.as_ref()?.process();
        match self.read_vmm().await? {
            Ok(info) => {
                let state = info.state.map(|s| (s, info.reason.clone()));
                self.take_sample(info);
                state
            }
            Err(_) => None,
        }
    }

    /// The sample timer fired: read state and metrics, record what changed.
    pub(super) async fn sample(&mut self) {
        let Some(read) = self.read_vmm().await else {
            return;
        };
        match read {
            Ok(info) => {
                if let (Some(before), None) = (&self.process, &info.process) {
                    // The process ended and the sample saw it before the reaper's
                    // event arrived: the same exit, with the state the handle classified.
                    let pid = before.pid;
                    let state = info.state.unwrap_or(VmState::Failed);
                    let reason = info.reason.clone();
                    self.take_sample(info);
                    self.exited(pid, state, reason);
                    return;
                }
                // With no process before or after, the VMM has nothing to report: the state
                // the core recorded when the process went away (Shutdown, Failed) stands.
                let news = self.process.is_some() || info.process.is_some();
                let state = info.state.filter(|_| news);
                let reason = info.reason.clone();
                self.take_sample(info);
                if let Some(state) = state {
                    let snap = self.vm.snapshot();
                    // Keep the known reason when the VMM reports the same state without one.
                    let reason = if reason.is_empty() && snap.state == state {
                        snap.reason.clone()
                    } else {
                        reason
                    };
                    let now = self.deps.clock.now_unix();
                    self.vm
                        .handle_observation(Observation::Reported { state, reason }, now);
                }
            }
            Err(e) => {
                let mut view = (*self.view).clone();
                view.backend_info
                    .insert("sample_error".to_owned(), e.to_string());
                self.view = Arc::new(view);
            }
        }
    }

    /// Sends console input through the handle (serialized with operations).
    pub(super) async fn write_console(&mut self, data: Vec<u8>) -> Result<usize, VmError> {
        let snap = self.vm.snapshot().clone();
        let Some(vmm) = self.vmm.as_mut() else {
            return Err(VmError::FailedPrecondition {
                vm_id: snap.id.to_string(),
                operation: "write console",
                state: snap.state,
                reason: "no VMM runs for this VM".to_owned(),
            });
        };
        let kind = self.deps.hypervisor.kind();
        let tel = &*self.deps.telemetry;
        timed_call(
            kind,
            tel,
            "write_console",
            self.deps.call_timeout,
            vmm.write_console(data),
        )
        .await
        .map_err(|e| match e {
            HypervisorError::Unsupported(m) => VmError::Unimplemented(m),
            HypervisorError::InvalidState(reason) => VmError::FailedPrecondition {
                vm_id: snap.id.to_string(),
                operation: "write console",
                state: snap.state,
                reason,
            },
            HypervisorError::Timeout { .. } => {
                VmError::DeadlineExceeded(format!("vm {}: {e}", snap.id))
            }
            e => VmError::Unavailable(format!("vm {}: {e}", snap.id)),
        })
    }

    pub(super) fn take_sample(&mut self, info: VmmInfo) {
        self.process = info.process.clone();
        if let Some(size) = info.size {
            // A resize a crash interrupted, or one made on the VMM's own socket.
            let now = self.deps.clock.now_unix();
            self.vm.handle_observation(Observation::Sized(size), now);
        }
        let mut backend_info = info.backend_info;
        backend_info.insert(
            "backend".to_owned(),
            self.deps.hypervisor.kind().as_str().to_owned(),
        );
        let mut view = (*self.view).clone();
        view.metrics = Some(info.metrics);
        view.backend_info = backend_info;
        view.sampled_at_ms = Some(self.deps.clock.now_unix_ms());
        self.view = Arc::new(view);
    }

    /// The VMM process `pid`, the current one, ended in `state`: recorded,
    /// and the restart policy consulted. Reached from the reaper's event or
    /// from a sample that found the process gone first, whichever comes
    /// first (the other then finds no current process and does nothing).
    fn exited(&mut self, pid: u32, state: VmState, reason: String) {
        let now = self.deps.clock.now_unix();
        self.deps.telemetry.record(TelemetryEvent::VmmExited {
            backend: self.deps.hypervisor.kind(),
            reason: if state == VmState::Shutdown {
                "poweroff"
            } else {
                "crash"
            },
        });
        tracing::warn!(vm.id = %self.vm.snapshot().id, pid, %state, %reason, "VMM process exited");
        self.process = None;
        self.vm.handle_observation(
            Observation::Exited {
                state,
                reason: reason.clone(),
            },
            now,
        );
        let cause = if state == VmState::Shutdown {
            Cause::Poweroff
        } else {
            Cause::Crash
        };
        self.vm.consider_restart(cause, reason, Instant::now(), now);
    }

    /// Something the VMM did on its own. News about a process the owner has
    /// already replaced is dropped.
    pub(super) async fn on_event(&mut self, event: VmmEvent) {
        let current = self.process.as_ref().map(|p| p.pid);
        match event {
            VmmEvent::Exited { pid, state, reason } => {
                if current != Some(pid) {
                    tracing::debug!(vm.id = %self.vm.snapshot().id, pid, "exit of a replaced VMM ignored");
                    return;
                }
                self.exited(pid, state, reason);
            }
            VmmEvent::StateChanged { pid, state, reason } => {
                if current != Some(pid) || state == self.vm.snapshot().state {
                    return;
                }
                // The event may be older than the last operation's answer (it was read
                // before the operation ran): ask the VMM now rather than trust it.
                tracing::debug!(vm.id = %self.vm.snapshot().id, pid, %state, %reason, "VMM reported a change");
                self.sample().await;
            }
        }
        self.publish().await;
    }
}

/// Ends any VMM the host shows for `id` (after an abandoned create).
async fn end_vmms_of<H: Hypervisor, S>(deps: &Deps<H, S>, id: &crate::domain::VmId) {
    let h = &*deps.hypervisor;
    let tel = &*deps.telemetry;
    let t = deps.call_timeout;
    let Ok(found) = timed_call(h.kind(), tel, "discover", t, h.discover()).await else {
        return;
    };
    for d in found.into_iter().filter(|d| &d.id == id) {
        let _ = timed_call(
            h.kind(),
            tel,
            "destroy_orphan",
            t,
            h.destroy_orphan(id, d.process),
        )
        .await;
    }
}
