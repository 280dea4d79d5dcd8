//! One owner task per VM. The task owns the VM's lifecycle core and is the
//! only code that calls the hypervisor's mutating operations for that VM;
//! requests reach it over a bounded channel with a oneshot reply, so
//! operations on one VM are serialized while different VMs run in parallel.
//! Every hypervisor call has a timeout; after any operation the task reads
//! the VMM's state back and records that, never what it hoped for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::domain::{
    Admission, Command, Effect, Observation, Operation, Vm, VmError, VmSnapshot, VmState,
};
use crate::ports::{
    Clock, Hypervisor, HypervisorError, ShutdownMode, Telemetry, TelemetryEvent, VmRecord, VmStore,
    VmmProcess,
};

/// Capacity of each VM's request queue; a full queue answers `unavailable`.
pub const QUEUE_DEPTH: usize = 32;

/// Default graceful-shutdown timeout when the caller sends 0.
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often an idle owner re-reads the VMM's state to notice changes made behind its back.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(5);

/// A request to a VM's owner task.
#[derive(Debug)]
pub enum Request {
    /// Run a lifecycle command and reply with the resulting snapshot.
    Command(Command, oneshot::Sender<Result<VmSnapshot, VmError>>),
    /// Record something observed outside the owner (a backend event).
    Observe(Observation),
    /// Record a state read outside the owner while the VM was at `generation` (GetVmInfo).
    /// Ignored if the VM has changed since, so a stale read queued behind a command can
    /// never overwrite what that command's VMM answer established.
    ObserveAt(Observation, u64),
}

/// Everything an owner task needs besides its VM.
pub struct Deps<H, S> {
    /// The backend.
    pub hypervisor: Arc<H>,
    /// Durable records.
    pub store: Arc<S>,
    /// Telemetry sink.
    pub telemetry: Arc<dyn Telemetry>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Timeout of one hypervisor call.
    pub call_timeout: Duration,
}

impl<H, S> Clone for Deps<H, S> {
    fn clone(&self) -> Self {
        Self {
            hypervisor: Arc::clone(&self.hypervisor),
            store: Arc::clone(&self.store),
            telemetry: Arc::clone(&self.telemetry),
            clock: Arc::clone(&self.clock),
            call_timeout: self.call_timeout,
        }
    }
}

/// Runs `fut` with `timeout`, reporting the call's duration and outcome.
pub async fn timed_call<H: Hypervisor, T>(
    deps_h: &H,
    telemetry: &dyn Telemetry,
    operation: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, HypervisorError>>,
) -> Result<T, HypervisorError> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "hypervisor.call",
        backend = deps_h.kind().as_str(),
        operation,
        outcome = tracing::field::Empty
    );
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HypervisorError::Timeout {
            operation: operation.to_owned(),
            after: timeout,
        }),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(HypervisorError::Timeout { .. }) => "timeout",
        Err(HypervisorError::InvalidState(_)) => "invalid_state",
        Err(HypervisorError::InvalidConfig(_)) => "invalid_config",
        Err(HypervisorError::NotFound(_)) => "not_found",
        Err(HypervisorError::Unavailable(_) | HypervisorError::SpawnFailed(_)) => "unavailable",
        Err(HypervisorError::Unsupported(_)) => "unsupported",
        Err(HypervisorError::ResourceExhausted(_)) => "resource_exhausted",
        Err(HypervisorError::Protocol(_)) => "protocol",
    };
    span.record("outcome", outcome);
    if let Err(e) = &result {
        tracing::warn!(parent: &span, error = %e, "hypervisor call failed");
    }
    telemetry.record(TelemetryEvent::HypervisorCall {
        backend: deps_h.kind(),
        operation,
        outcome,
        duration: started.elapsed(),
    });
    result
}

/// Maps a backend failure to the error the caller sees, given the VM's state.
pub fn hypervisor_to_vm_error(e: HypervisorError, snap: &VmSnapshot, op: Operation) -> VmError {
    match e {
        HypervisorError::InvalidConfig(c) => VmError::InvalidArgument(c),
        HypervisorError::InvalidState(msg) => VmError::FailedPrecondition {
            vm_id: snap.id.to_string(),
            operation: op.as_str(),
            state: snap.state,
            reason: msg,
        },
        HypervisorError::Timeout { .. } => VmError::DeadlineExceeded(format!(
            "vm {}: {e}; the VM's state is re-read on the next request",
            snap.id
        )),
        HypervisorError::Unavailable(_)
        | HypervisorError::SpawnFailed(_)
        | HypervisorError::NotFound(_) => VmError::Unavailable(format!("vm {}: {e}", snap.id)),
        HypervisorError::Unsupported(m) => VmError::Unimplemented(m),
        HypervisorError::ResourceExhausted(m) => VmError::ResourceExhausted(m),
        HypervisorError::Protocol(m) => VmError::Internal(format!("vm {}: {m}", snap.id)),
    }
}

/// The owner task of one VM.
pub struct Owner<H, S> {
    vm: Vm,
    process: Option<VmmProcess>,
    deps: Deps<H, S>,
    snapshot_tx: watch::Sender<VmSnapshot>,
}

impl<H: Hypervisor, S: VmStore> Owner<H, S> {
    /// An owner for `vm`, publishing snapshots on `snapshot_tx`.
    pub fn new(
        vm: Vm,
        process: Option<VmmProcess>,
        deps: Deps<H, S>,
        snapshot_tx: watch::Sender<VmSnapshot>,
    ) -> Self {
        Self {
            vm,
            process,
            deps,
            snapshot_tx,
        }
    }

    /// Serves requests until the VM is deleted or every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                req = rx.recv() => {
                    let Some(req) = req else { return };
                    match req {
                        Request::Command(cmd, reply) => {
                            let result = self.handle(cmd).await;
                            // The caller may have given up (deadline); the state is recorded either way.
                            let _ = reply.send(result);
                        }
                        Request::Observe(obs) => self.observe(obs).await,
                        Request::ObserveAt(obs, generation) => {
                            if generation == self.vm.snapshot().generation {
                                self.observe(obs).await;
                            }
                        }
                    }
                    if self.vm.snapshot().deleted {
                        rx.close();
                        while let Some(req) = rx.recv().await {
                            if let Request::Command(_, reply) = req {
                                let _ = reply.send(Err(VmError::NotFound(self.vm.snapshot().id.to_string())));
                            }
                        }
                        return;
                    }
                }
                _ = tick.tick() => self.reconcile().await,
            }
        }
    }

    async fn handle(&mut self, cmd: Command) -> Result<VmSnapshot, VmError> {
        let now = self.deps.clock.now_unix();
        let admission = self.vm.handle_command(cmd, now);
        let outcome = match &admission {
            Admission::Accepted => "accepted",
            Admission::Ignored => "ignored",
            Admission::Denied(_) => "denied",
        };
        self.deps.telemetry.record(TelemetryEvent::Admission {
            op: cmd.operation(),
            outcome,
        });
        match admission {
            Admission::Ignored => return Ok(self.vm.snapshot().clone()),
            Admission::Denied(e) => return Err(e),
            Admission::Accepted => {}
        }
        // Intent before action: the desired state is durable before the VMM is touched.
        if let Err(e) = self.persist().await {
            while self.vm.poll_effect().is_some() {}
            self.vm.handle_observation(
                Observation::Completed {
                    op: cmd.operation(),
                    reported: None,
                    error: Some(e.clone()),
                },
                now,
            );
            return Err(e);
        }
        let mut result = Ok(());
        while let Some(Effect::Perform(cmd)) = self.vm.poll_effect() {
            result = self.perform(cmd).await;
        }
        self.publish().await;
        result.map(|()| self.vm.snapshot().clone())
    }

    async fn perform(&mut self, cmd: Command) -> Result<(), VmError> {
        let op = cmd.operation();
        let h = &*self.deps.hypervisor;
        let id = self.vm.snapshot().id.clone();
        let t = self.deps.call_timeout;
        let tel = &*self.deps.telemetry;
        let started = Instant::now();
        let outcome: Result<Option<VmState>, HypervisorError> = match cmd {
            Command::Boot => timed_call(h, tel, "boot", t, h.boot(&id)).await.map(Some),
            Command::Shutdown {
                force,
                timeout_secs,
            } => {
                let graceful_timeout = if timeout_secs == 0 {
                    DEFAULT_GRACEFUL_TIMEOUT
                } else {
                    Duration::from_secs(u64::from(timeout_secs))
                };
                let mode = ShutdownMode {
                    force,
                    graceful_timeout,
                };
                let budget = if force { t } else { t + graceful_timeout };
                timed_call(h, tel, "shutdown", budget, h.shutdown(&id, mode))
                    .await
                    .map(Some)
            }
            Command::Pause => timed_call(h, tel, "pause", t, h.pause(&id)).await.map(Some),
            Command::Resume => timed_call(h, tel, "resume", t, h.resume(&id))
                .await
                .map(Some),
            Command::Reboot { force } => timed_call(h, tel, "reboot", t, h.reboot(&id, force))
                .await
                .map(Some),
            Command::Delete { force } => {
                // Deleting may stop a guest gracefully first; give it the same budget as a shutdown.
                let budget = if force {
                    t
                } else {
                    t + DEFAULT_GRACEFUL_TIMEOUT
                };
                timed_call(h, tel, "delete", budget, h.delete(&id, force))
                    .await
                    .map(|()| None)
            }
        };
        let now = self.deps.clock.now_unix();
        let result = match outcome {
            Ok(reported) => {
                if op == Operation::Boot && reported == Some(VmState::Running) {
                    self.deps.telemetry.record(TelemetryEvent::BootCompleted {
                        backend: h.kind(),
                        duration: started.elapsed(),
                    });
                }
                let reported = reported.map(|s| (s, String::new()));
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
                let err = hypervisor_to_vm_error(e.clone(), self.vm.snapshot(), op);
                // The operation failed: read back what the VMM reports now, so the record is true.
                let reported = self.read_state().await;
                self.vm.handle_observation(
                    Observation::Completed {
                        op,
                        reported,
                        error: Some(err.clone()),
                    },
                    now,
                );
                Err(err)
            }
        };
        if op == Operation::Delete && result.is_ok() {
            if let Err(e) = self.deps.store.remove(&id).await {
                tracing::error!(vm.id = %id, error = %e, "VM deleted but its record could not be removed; it is reconciled at the next start");
            }
            self.process = None;
        }
        result
    }

    /// Reads the VMM's state; a VMM that is gone reads as Failed with the reason.
    async fn read_state(&self) -> Option<(VmState, String)> {
        let h = &*self.deps.hypervisor;
        let id = &self.vm.snapshot().id;
        match timed_call(
            h,
            &*self.deps.telemetry,
            "info",
            self.deps.call_timeout,
            h.info(id),
        )
        .await
        {
            Ok(info) => info.state.map(|s| (s, info.reason)),
            Err(HypervisorError::NotFound(reason)) => {
                Some((VmState::Failed, format!("VMM is gone: {reason}")))
            }
            Err(_) => None,
        }
    }

    async fn observe(&mut self, obs: Observation) {
        let now = self.deps.clock.now_unix();
        self.vm.handle_observation(obs, now);
        self.publish().await;
    }

    async fn reconcile(&mut self) {
        if let Some((state, reason)) = self.read_state().await {
            let snap = self.vm.snapshot();
            // Keep the known reason when the VMM reports the same state without one.
            let reason = if reason.is_empty() && snap.state == state {
                snap.reason.clone()
            } else {
                reason
            };
            self.observe(Observation::Reported { state, reason }).await;
        }
    }

    /// Publishes the snapshot to readers, persists it if it changed, and drains events.
    async fn publish(&mut self) {
        let snap = self.vm.snapshot().clone();
        let changed = self.snapshot_tx.borrow().generation != snap.generation
            || self.snapshot_tx.borrow().desired != snap.desired;
        if changed
            && !snap.deleted
            && let Err(e) = self.persist().await
        {
            tracing::error!(vm.id = %snap.id, error = %e, "could not persist VM state; it is reconciled from the VMM at the next start");
        }
        self.snapshot_tx.send_replace(snap);
        while let Some(ev) = self.vm.poll_event() {
            self.deps.telemetry.record(TelemetryEvent::Vm(ev));
        }
    }

    async fn persist(&self) -> Result<(), VmError> {
        let record = VmRecord {
            snapshot: self.vm.snapshot().clone(),
            process: self.process.clone(),
        };
        self.deps
            .store
            .put(&record)
            .await
            .map_err(|e| VmError::Unavailable(format!("cannot record the VM's state: {e}")))
    }
}
