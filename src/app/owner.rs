//! One owner task per VM. The task owns the VM's lifecycle core and its VMM
//! handle, and is the only code that touches that VMM: requests reach it
//! over a bounded channel with a oneshot reply, so operations on one VM are
//! serialized while different VMs run in parallel. It performs what the core
//! decides (effects, timers) and feeds back what the VMM reported; it
//! decides nothing itself.
//!
//! The owner keeps the VM's view true by watching, so that reads never call
//! the VMM: the handle's exit reports and VMM events arrive on the VM's own
//! event channel, and the core's sample timer re-reads state and metrics
//! every period. Each change is published on a watch channel that readers
//! (GetVmInfo, ListVms) borrow from memory.
//!
//! Identity and state are recorded together: after every operation the
//! record holds the state the VMM reported *and* the process that serves
//! the VM now, so a VMM that an operation replaced is the one a restarted
//! VMCP re-adopts and a delete ends. Intent is durable before any action.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::feed::ChangeFeed;

use crate::domain::restart::{Cause, RestartSettings};
use crate::domain::{
    Admission, Command, Effect, Observation, Operation, Vm, VmError, VmSnapshot, VmState,
};
use crate::ports::{
    BackendKind, Clock, Hypervisor, HypervisorError, Reported, ShutdownMode, Telemetry,
    TelemetryEvent, VmMetrics, VmRecord, VmStore, VmmEvent, VmmEventSink, VmmHandle, VmmInfo,
    VmmProcess, WatchEventKind,
};

/// Capacity of each VM's request queue; a full queue answers `unavailable`.
pub const QUEUE_DEPTH: usize = 32;

/// A request to a VM's owner task.
#[derive(Debug)]
pub enum Request {
    /// Run a lifecycle command and reply with the resulting snapshot.
    Command(Command, oneshot::Sender<Result<VmSnapshot, VmError>>),
    /// Send bytes to the VM's console input; reply with how many it took.
    WriteConsole(Vec<u8>, oneshot::Sender<Result<usize, VmError>>),
}

/// What readers see of one VM: the owner's observed state and its latest
/// sample of the VMM. Published as an `Arc` so a read is a pointer copy.
#[derive(Debug, Clone, PartialEq)]
pub struct VmView {
    /// Config, state, reason, generation, timestamps.
    pub snapshot: VmSnapshot,
    /// Metrics of the latest sample (None until the first one).
    pub metrics: Option<VmMetrics>,
    /// Backend details of the latest sample.
    pub backend_info: BTreeMap<String, String>,
    /// When the latest sample was taken, Unix milliseconds (None: never).
    pub sampled_at_ms: Option<i64>,
}

impl VmView {
    /// A view of `snapshot` with no sample yet.
    pub fn of(snapshot: VmSnapshot) -> Self {
        Self {
            snapshot,
            metrics: None,
            backend_info: BTreeMap::new(),
            sampled_at_ms: None,
        }
    }
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
    /// Restart policy default, backoff and crash-loop limit.
    pub restart: RestartSettings,
    /// Where recorded changes get their revision and reach watchers.
    pub feed: Arc<ChangeFeed>,
}

impl<H, S> Clone for Deps<H, S> {
    fn clone(&self) -> Self {
        Self {
            hypervisor: Arc::clone(&self.hypervisor),
            store: Arc::clone(&self.store),
            telemetry: Arc::clone(&self.telemetry),
            clock: Arc::clone(&self.clock),
            call_timeout: self.call_timeout,
            restart: self.restart,
            feed: Arc::clone(&self.feed),
        }
    }
}

/// Runs `fut` with `timeout`, reporting the call's duration and outcome.
pub async fn timed_call<T>(
    backend: BackendKind,
    telemetry: &dyn Telemetry,
    operation: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, HypervisorError>>,
) -> Result<T, HypervisorError> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "hypervisor.call",
        backend = backend.as_str(),
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
        Err(e) => e.kind(),
    };
    span.record("outcome", outcome);
    if let Err(e) = &result {
        tracing::warn!(parent: &span, error = %e, source = ?std::error::Error::source(e), "hypervisor call failed");
    }
    telemetry.record(TelemetryEvent::HypervisorCall {
        backend,
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
        HypervisorError::InvalidState(msg) if op == Operation::Create => VmError::Unavailable(msg),
        HypervisorError::InvalidState(msg) => VmError::FailedPrecondition {
            vm_id: snap.id.to_string(),
            operation: op.as_str(),
            state: snap.state,
            reason: msg,
        },
        HypervisorError::Timeout { .. } => VmError::DeadlineExceeded(format!(
            "vm {}: {e}; the VM's state is re-read from its VMM",
            snap.id
        )),
        HypervisorError::Unavailable { .. }
        | HypervisorError::SpawnFailed { .. }
        | HypervisorError::Gone(_) => VmError::Unavailable(format!("vm {}: {e}", snap.id)),
        HypervisorError::Unsupported(m) => VmError::Unimplemented(m),
        HypervisorError::ResourceExhausted { message, .. } => VmError::ResourceExhausted(message),
        HypervisorError::Protocol(m) => VmError::Internal(format!("vm {}: {m}", snap.id)),
    }
}

/// What the record last persisted holds, to persist only on change.
#[derive(Debug, Clone, PartialEq)]
struct Persisted {
    generation: u64,
    desired: crate::domain::Desired,
    process: Option<VmmProcess>,
}

/// The owner task of one VM.
pub struct Owner<H: Hypervisor, S> {
    vm: Vm,
    vmm: Option<H::Vm>,
    process: Option<VmmProcess>,
    deps: Deps<H, S>,
    view: Arc<VmView>,
    view_tx: watch::Sender<Arc<VmView>>,
    events_tx: VmmEventSink,
    events_rx: mpsc::UnboundedReceiver<VmmEvent>,
    persisted: Option<Persisted>,
    /// The generation and state watchers last heard of (0: none yet).
    announced: (u64, Option<VmState>),
}

/// The VM's event channel: the sink goes to `create`/`adopt`, the receiver to the owner.
pub fn event_channel() -> (VmmEventSink, mpsc::UnboundedReceiver<VmmEvent>) {
    mpsc::unbounded_channel()
}

impl<H: Hypervisor, S: VmStore> Owner<H, S> {
    /// An owner for a VM about to be created (`Vm::creating`); its first
    /// effect creates the VMM.
    pub fn creating(vm: Vm, deps: Deps<H, S>) -> (Self, watch::Receiver<Arc<VmView>>) {
        let (events_tx, events_rx) = event_channel();
        Self::build(vm, None, None, deps, events_tx, events_rx)
    }

    /// An owner for a VM recovered at start-up, as it was recorded (with
    /// `stored`, the process in its record), with the handle `adopt` gave,
    /// whose events flow into `events`. Without a handle the VM can only be
    /// read and deleted. [`Owner::settle`] then records what recovery found.
    pub fn recovered(
        vm: Vm,
        stored: Option<VmmProcess>,
        vmm: Option<H::Vm>,
        deps: Deps<H, S>,
        events: (VmmEventSink, mpsc::UnboundedReceiver<VmmEvent>),
    ) -> (Self, watch::Receiver<Arc<VmView>>) {
        let process = vmm.as_ref().and_then(VmmHandle::process);
        let (mut owner, view) = Self::build(vm, vmm, process, deps, events.0, events.1);
        if let Some(p) = owner.persisted.as_mut() {
            p.process = stored;
        }
        (owner, view)
    }

    /// Recovery found the VM's VMM gone for `cause`: its restart policy
    /// boots it again (at once for a host restart).
    pub async fn restart(&mut self, cause: Cause) {
        let reason = self.vm.snapshot().reason.clone();
        let wall = self.deps.clock.now_unix();
        self.vm
            .consider_restart(cause, reason, Instant::now(), wall);
        self.publish().await;
    }

    /// Recovery found the VM in `state`: records it, with the process that
    /// serves the VM now; a visible change reaches watchers. Transitions
    /// found at recovery are not counted as lifecycle events.
    pub async fn settle(&mut self, state: VmState, reason: String) {
        let now = self.deps.clock.now_unix();
        self.vm
            .handle_observation(Observation::Reported { state, reason }, now);
        while self.vm.poll_event().is_some() {}
        self.publish().await;
    }

    fn build(
        vm: Vm,
        vmm: Option<H::Vm>,
        process: Option<VmmProcess>,
        deps: Deps<H, S>,
        events_tx: VmmEventSink,
        events_rx: mpsc::UnboundedReceiver<VmmEvent>,
    ) -> (Self, watch::Receiver<Arc<VmView>>) {
        let vm = vm.with_restarts(deps.restart);
        let mut view = VmView::of(vm.snapshot().clone());
        // Known before any sample; every sample keeps it.
        view.backend_info.insert(
            "backend".to_owned(),
            deps.hypervisor.kind().as_str().to_owned(),
        );
        let view = Arc::new(view);
        let (view_tx, view_rx) = watch::channel(Arc::clone(&view));
        let snap = vm.snapshot();
        let persisted = (snap.generation > 0).then(|| Persisted {
            generation: snap.generation,
            desired: snap.desired,
            process: process.clone(),
        });
        let announced = (snap.generation, (snap.generation > 0).then_some(snap.state));
        let mut owner = Self {
            vm,
            vmm,
            process,
            deps,
            view,
            view_tx,
            events_tx,
            events_rx,
            persisted,
            announced,
        };
        owner.refresh_view();
        owner.view_tx.send_replace(Arc::clone(&owner.view));
        (owner, view_rx)
    }

    /// Serves requests until the VM is deleted or every sender is gone.
    /// `created` receives the outcome of the create, for an owner made by
    /// [`Owner::creating`].
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Request>,
        created: Option<oneshot::Sender<Result<VmSnapshot, VmError>>>,
    ) {
        self.vm.start_timers(Instant::now());
        if self.vmm.is_some() {
            // A recovered VM: metrics and details right away, not one period later.
            self.vm.sample_soon(Instant::now());
        }
        if let Some(reply) = created {
            let result = self.drain().await;
            self.publish().await;
            let _ = reply.send(result.map(|()| self.vm.snapshot().clone()));
            // Metrics and details right after the answer (a failed create ends the loop below).
            self.vm.sample_soon(Instant::now());
        }
        while !self.vm.snapshot().deleted {
            let deadline = self.vm.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                req = rx.recv() => {
                    let (cmd, reply) = match req {
                        None => return,
                        Some(Request::WriteConsole(data, reply)) => {
                            let _ = reply.send(self.write_console(data).await);
                            continue;
                        }
                        Some(Request::Command(cmd, reply)) => (cmd, reply),
                    };
                    let result = self.handle(cmd).await;
                    let ok = result.is_ok();
                    // The caller may have given up (deadline); the state is recorded either way.
                    let _ = reply.send(result);
                    if ok {
                        // Refresh metrics and backend details after the answer, off the caller's path.
                        self.vm.sample_soon(Instant::now());
                    }
                }
                Some(event) = self.events_rx.recv() => self.on_event(event).await,
                () = sleep_until(deadline) => {
                    self.vm.handle_timeout(Instant::now());
                    if let Err(e) = self.drain().await {
                        tracing::debug!(vm.id = %self.vm.snapshot().id, error = %e, "timer effect failed");
                    }
                    self.publish().await;
                }
            }
        }
        rx.close();
        let gone = || VmError::NotFound(self.vm.snapshot().id.to_string());
        while let Some(req) = rx.recv().await {
            match req {
                Request::Command(_, reply) => drop(reply.send(Err(gone()))),
                Request::WriteConsole(_, reply) => drop(reply.send(Err(gone()))),
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
        let result = self.drain().await;
        self.publish().await;
        result.map(|()| self.vm.snapshot().clone())
    }

    /// Performs every queued effect; answers with the last command's outcome.
    async fn drain(&mut self) -> Result<(), VmError> {
        let mut result = Ok(());
        while let Some(effect) = self.vm.poll_effect() {
            match effect {
                Effect::Perform(cmd) => result = self.perform(cmd).await,
                Effect::Sample => self.sample().await,
            }
        }
        result
    }

    async fn perform(&mut self, cmd: Command) -> Result<(), VmError> {
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

    /// Creates the VMM: the record (generation 0, no process) is durable
    /// first, so a crash during the create is rolled back at the next start.
    async fn create(&mut self) -> Result<(), VmError> {
        let id = self.vm.snapshot().id.clone();
        let config = self.vm.snapshot().config.clone();
        let now = self.deps.clock.now_unix();
        let intent = self.persist().await;
        let intent_recorded = intent.is_ok();
        let deps = self.deps.clone();
        let h = &*deps.hypervisor;
        let kind = h.kind();
        let tel = &*deps.telemetry;
        let t = deps.call_timeout;
        let outcome = match intent {
            Err(e) => Err(e),
            Ok(()) => match timed_call(
                kind,
                tel,
                "create",
                t,
                h.create(&id, &config, self.events_tx.clone()),
            )
            .await
            {
                Ok((vmm, reported)) => {
                    self.process = reported.process.clone();
                    self.vmm = Some(vmm);
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

    /// Asks the handle for a sample, under the call timeout (None without a handle).
    async fn read_vmm(&mut self) -> Option<Result<VmmInfo, HypervisorError>> {
        let vmm = self.vmm.as_mut()?;
        let kind = self.deps.hypervisor.kind();
        let tel = &*self.deps.telemetry;
        Some(timed_call(kind, tel, "sample", self.deps.call_timeout, vmm.sample()).await)
    }

    /// After a failed operation: the state the VMM reports now (None if it
    /// cannot be read), with the handle's current process recorded.
    async fn read_back(&mut self) -> Option<(VmState, String)> {
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
    async fn sample(&mut self) {
        let Some(read) = self.read_vmm().await else {
            return;
        };
        match read {
            Ok(info) => {
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
    async fn write_console(&mut self, data: Vec<u8>) -> Result<usize, VmError> {
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

    fn take_sample(&mut self, info: VmmInfo) {
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

    /// Something the VMM did on its own. News about a process the owner has
    /// already replaced is dropped.
    async fn on_event(&mut self, event: VmmEvent) {
        let current = self.process.as_ref().map(|p| p.pid);
        let now = self.deps.clock.now_unix();
        match event {
            VmmEvent::Exited { pid, state, reason } => {
                if current != Some(pid) {
                    tracing::debug!(vm.id = %self.vm.snapshot().id, pid, "exit of a replaced VMM ignored");
                    return;
                }
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

    /// Records the VM if it changed, publishes the view to readers and,
    /// for a visible change, to watchers; drains lifecycle events.
    ///
    /// A visible change (a new generation, or the delete of an announced
    /// VM) is recorded while the owner holds the feed: the change takes the
    /// next revision, the record is written with it, the view is published,
    /// then the change is committed, so every reader and watcher sees
    /// revisions in one order (see feed.rs).
    async fn publish(&mut self) {
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
        let recording = match kind {
            Some(_) => Some(feed.record().await),
            None => None,
        };
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
            };
            if (recording.is_some() || self.persisted.as_ref() != Some(&now))
                && let Err(e) = self.persist().await
            {
                tracing::error!(vm.id = %self.vm.snapshot().id, error = %e, "could not persist VM state; it is reconciled from the VMM at the next start");
            }
        }
        self.refresh_view();
        if !Arc::ptr_eq(&self.view, &self.view_tx.borrow()) {
            self.view_tx.send_replace(Arc::clone(&self.view));
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
    fn refresh_view(&mut self) {
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
        if self.view.snapshot != *self.vm.snapshot() || identity_changed {
            let mut view = (*self.view).clone();
            view.snapshot = self.vm.snapshot().clone();
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

    async fn persist(&mut self) -> Result<(), VmError> {
        let snap = self.vm.snapshot();
        let record = VmRecord {
            snapshot: snap.clone(),
            process: self.process.clone(),
        };
        self.deps
            .store
            .put(&record)
            .await
            .map_err(|e| VmError::Unavailable(format!("cannot record the VM's state: {e}")))?;
        self.persisted = Some(Persisted {
            generation: snap.generation,
            desired: snap.desired,
            process: self.process.clone(),
        });
        Ok(())
    }
}

/// A handle for the VM `id` with no VMM running yet (its next boot starts
/// one), whose events flow into `events`.
pub async fn handle_without_vmm<H: Hypervisor, S>(
    deps: &Deps<H, S>,
    id: &crate::domain::VmId,
    config: &crate::domain::VmConfig,
    events: VmmEventSink,
) -> Result<H::Vm, HypervisorError> {
    let h = &*deps.hypervisor;
    timed_call(
        h.kind(),
        &*deps.telemetry,
        "adopt",
        deps.call_timeout,
        h.adopt(id, config, None, events),
    )
    .await
    .map(|(vmm, _)| vmm)
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

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
