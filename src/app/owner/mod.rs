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
//!
//! This module is the task's loop and admission; `perform` carries out the
//! core's effects against the VMM, `record` persists and publishes what
//! changed, and `calls` is the timed, reported edge of every port call.

mod calls;
mod perform;
mod record;
mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use self::calls::{hypervisor_to_vm_error, timed_call};
pub use self::tasks::{OwnerTasks, stopping_error};
use super::feed::ChangeFeed;
use super::manager::registry::ListedCounts;
use crate::domain::restart::{Cause, RestartSettings};
use crate::domain::snapshot::{DiffParent, SnapshotId, SnapshotKind};
use crate::domain::{Admission, Command, Effect, Observation, Vm, VmError, VmSnapshot, VmState};
use crate::ports::{
    Clock, DiffView, Hypervisor, HypervisorError, Telemetry, TelemetryEvent, VmDetails, VmStore,
    VmmEvent, VmmEventSink, VmmHandle, VmmProcess,
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
    /// Snapshot the VM into the (empty) directory and reply with the
    /// resulting snapshot of the VM's state.
    Snapshot {
        /// Where the VMM writes the snapshot's files.
        dir: PathBuf,
        /// Full, or diff against `parent`.
        kind: SnapshotKind,
        /// A diff's parent, as the caller found it: refused if the VM's
        /// is another one by now.
        parent: Option<SnapshotId>,
        /// Run the VM afterwards.
        resume: bool,
        /// The answer.
        reply: oneshot::Sender<Result<Taken, VmError>>,
    },
    /// The snapshot the VMM wrote in attempt `attempt` is committed as
    /// `snapshot`: it is the parent of the VMM's next diff, unless another
    /// attempt began since or the VMM was replaced. Replies whether it is.
    Committed {
        /// The committed snapshot.
        snapshot: SnapshotId,
        /// The attempt that wrote it ([`Taken::attempt`]).
        attempt: u64,
        /// The answer.
        reply: oneshot::Sender<Result<bool, VmError>>,
    },
}

/// A snapshot the VMM wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Taken {
    /// The VM afterwards.
    pub vm: VmSnapshot,
    /// Which of the owner's snapshot attempts it was.
    pub attempt: u64,
}

/// What a VM made by [`Owner::restoring`] restores.
#[derive(Debug, Clone)]
pub struct RestoreFrom {
    /// The snapshot's directory.
    pub dir: PathBuf,
    /// Its id (the restored VMM's diff parent when the VM tracks dirty pages).
    pub snapshot: SnapshotId,
    /// Run the VM afterwards.
    pub resume: bool,
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
    /// The registry's counts of listed VMs per state, kept as views change.
    pub listed: Arc<ListedCounts>,
    /// Managed networking, once set (before recovery); unset: no managed interfaces.
    pub network: Arc<std::sync::OnceLock<crate::app::network::Networking>>,
    /// Every owner task, so a stop can end them and wait (see [`OwnerTasks`]).
    pub tasks: OwnerTasks,
}

impl<H, S> std::fmt::Debug for Deps<H, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("call_timeout", &self.call_timeout)
            .field("restart", &self.restart)
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
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
            listed: Arc::clone(&self.listed),
            network: Arc::clone(&self.network),
            tasks: self.tasks.clone(),
        }
    }
}

/// What the record last persisted holds, to persist only on change.
#[derive(Debug, Clone, PartialEq)]
struct Persisted {
    generation: u64,
    desired: crate::domain::Desired,
    process: Option<VmmProcess>,
    diff_parent: Option<DiffParent>,
}

/// The owner task of one VM.
pub struct Owner<H: Hypervisor, S> {
    vm: Vm,
    vmm: Option<H::Vm>,
    process: Option<VmmProcess>,
    deps: Deps<H, S>,
    view: Arc<VmDetails>,
    view_tx: watch::Sender<Arc<VmDetails>>,
    events_tx: VmmEventSink,
    events_rx: mpsc::UnboundedReceiver<VmmEvent>,
    persisted: Option<Persisted>,
    /// The generation and state watchers last heard of (0: none yet).
    announced: (u64, Option<VmState>),
    /// Where the admitted snapshot goes, and its kind.
    snapshot_to: Option<(PathBuf, SnapshotKind)>,
    /// A VM made by [`Owner::restoring`]: its create restores this snapshot
    /// (and resumes the VM when asked) instead of configuring a new VMM.
    restore_from: Option<RestoreFrom>,
    /// The parent of the VMM's next diff snapshot (recorded with the VM).
    diff_parent: Option<DiffParent>,
    /// Snapshot attempts so far (each one clears the VMM's dirty pages).
    snapshot_attempt: u64,
    /// The latest attempt failed, or its snapshot is not committed yet.
    snapshot_failed: bool,
    /// The attempt whose snapshot the VMM wrote last, with the process that wrote it.
    written_by: Option<(u64, VmmProcess)>,
    /// Where this VM is counted in [`Deps::listed`] (None: not listed).
    listed: Option<VmState>,
}

impl<H: Hypervisor, S> Drop for Owner<H, S> {
    /// An owner that ends (its VM deleted, or VMCP stopping) no longer counts its VM.
    fn drop(&mut self) {
        self.deps.listed.moved(self.listed.take(), None);
    }
}

impl<H: Hypervisor, S> std::fmt::Debug for Owner<H, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owner")
            .field("vm", &self.vm)
            .field("process", &self.process)
            .field("announced", &self.announced)
            .finish_non_exhaustive()
    }
}

/// The VM's event channel: the sink goes to `create`/`adopt`, the receiver to the owner.
pub fn event_channel() -> (VmmEventSink, mpsc::UnboundedReceiver<VmmEvent>) {
    mpsc::unbounded_channel()
}

impl<H: Hypervisor, S: VmStore> Owner<H, S> {
    /// An owner for a VM about to be created (`Vm::creating`); its first
    /// effect creates the VMM.
    pub fn creating(vm: Vm, deps: Deps<H, S>) -> (Self, watch::Receiver<Arc<VmDetails>>) {
        let (events_tx, events_rx) = event_channel();
        Self::build(vm, None, None, deps, events_tx, events_rx)
    }

    /// An owner for a VM about to be restored from the snapshot in `dir`
    /// (`Vm::creating` with the snapshot's config): its create starts a
    /// fresh VMM that restores it, with the same durability as a create (a
    /// crash before the VM is recorded rolls it back at the next start).
    pub fn restoring(
        vm: Vm,
        deps: Deps<H, S>,
        from: RestoreFrom,
    ) -> (Self, watch::Receiver<Arc<VmDetails>>) {
        let (mut owner, view) = Self::creating(vm, deps);
        owner.restore_from = Some(from);
        (owner, view)
    }

    /// An owner for a VM recovered at start-up, as it was recorded (with
    /// `stored`, the process in its record), with the handle `adopt` gave,
    /// whose events flow into `events`. Without a handle the VM can only be
    /// read and deleted. [`Owner::settle`] then records what recovery found.
    /// The record's diff parent stays: it holds while the adopted VMM is
    /// the one that wrote (or loaded) it.
    pub fn recovered(
        vm: Vm,
        stored: Option<VmmProcess>,
        diff_parent: Option<DiffParent>,
        vmm: Option<H::Vm>,
        deps: Deps<H, S>,
        events: (VmmEventSink, mpsc::UnboundedReceiver<VmmEvent>),
    ) -> (Self, watch::Receiver<Arc<VmDetails>>) {
        let process = vmm.as_ref().and_then(VmmHandle::process);
        let (mut owner, view) = Self::build(vm, vmm, process, deps, events.0, events.1);
        if let Some(p) = owner.persisted.as_mut() {
            p.process = stored;
            p.diff_parent.clone_from(&diff_parent);
        }
        owner.diff_parent = diff_parent;
        owner.refresh_view();
        owner.send_view();
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
    ) -> (Self, watch::Receiver<Arc<VmDetails>>) {
        let vm = vm.with_restarts(deps.restart);
        let mut view = VmDetails::of(vm.snapshot().clone());
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
            diff_parent: None,
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
            snapshot_to: None,
            restore_from: None,
            diff_parent: None,
            snapshot_attempt: 0,
            snapshot_failed: false,
            written_by: None,
            listed: None,
        };
        owner.refresh_view();
        owner.send_view();
        (owner, view_rx)
    }

    /// Publishes the view to readers and keeps the listed counts in step.
    fn send_view(&mut self) {
        self.view_tx.send_replace(Arc::clone(&self.view));
        let snap = &self.view.snapshot;
        let listed = (snap.generation > 0 && !snap.deleted).then_some(snap.state);
        self.deps.listed.moved(self.listed, listed);
        self.listed = listed;
    }

    /// Serves requests until the VM is deleted, every sender is gone or
    /// VMCP stops ([`OwnerTasks::stop`]: the VMM keeps running). `created`
    /// receives the outcome of the create, for an owner made by
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
            // The create's intent is on disk before the answer (flushed while the
            // VMM starts); the created record is committed, not flushed: a crash of
            // VMCP cannot lose it, and a power loss, which would, also ends the VMM,
            // so recovery then keeps the VM from its intent (see domain::recovery).
            let result = Box::pin(self.drain()).await;
            Box::pin(self.publish()).await;
            let _ = reply.send(result.map(|()| self.vm.snapshot().clone()));
            // Metrics and details soon after the answer (a failed create ends the loop below).
            self.vm.sample_after_operation(Instant::now());
        }
        // Every turn's work is boxed while it runs: inline, the deepest operation
        // (create, snapshot) would size this loop's future, which lives as long as
        // the VM (about 30 KiB per VM before, most of a tracked VM's memory).
        let tasks = self.deps.tasks.clone();
        let stopping = tasks.stopping();
        tokio::pin!(stopping);
        while !self.vm.snapshot().deleted {
            let deadline = self.vm.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                // Between turns: whatever this owner was doing is recorded.
                () = &mut stopping => {
                    refuse_queued(rx, stopping_error).await;
                    return;
                }
                req = rx.recv() => {
                    let (cmd, reply) = match req {
                        None => return,
                        Some(Request::WriteConsole(data, reply)) => {
                            let _ = reply.send(Box::pin(self.write_console(data)).await);
                            continue;
                        }
                        Some(Request::Snapshot { dir, kind, parent, resume, reply }) => {
                            let _ = reply.send(Box::pin(self.snapshot(dir, kind, parent, resume)).await);
                            self.vm.sample_after_operation(Instant::now());
                            continue;
                        }
                        Some(Request::Committed { snapshot, attempt, reply }) => {
                            let _ = reply.send(Box::pin(self.committed(snapshot, attempt)).await);
                            continue;
                        }
                        Some(Request::Command(cmd, reply)) => (cmd, reply),
                    };
                    let result = Box::pin(self.handle(cmd)).await;
                    let ok = result.is_ok();
                    // The caller may have given up (deadline); the state is recorded either way.
                    let _ = reply.send(result);
                    if ok {
                        // Refresh metrics and backend details after the answer, off the caller's
                        // path and off the path of the caller's next call.
                        self.vm.sample_after_operation(Instant::now());
                    }
                }
                Some(event) = self.events_rx.recv() => Box::pin(self.on_event(event)).await,
                () = sleep_until(deadline) => {
                    self.vm.handle_timeout(Instant::now());
                    if let Err(e) = Box::pin(self.drain()).await {
                        tracing::debug!(vm.id = %self.vm.snapshot().id, error = %e, "timer effect failed");
                    }
                    Box::pin(self.publish()).await;
                }
            }
        }
        let id = self.vm.snapshot().id.to_string();
        refuse_queued(rx, || VmError::NotFound(id.clone())).await;
    }

    /// A snapshot into `dir`; a diff only against `parent`, the VM's
    /// parent as the caller checked it, if it still is.
    async fn snapshot(
        &mut self,
        dir: PathBuf,
        kind: SnapshotKind,
        parent: Option<SnapshotId>,
        resume: bool,
    ) -> Result<Taken, VmError> {
        if kind == SnapshotKind::Diff {
            let snap = self.vm.snapshot();
            let diff = self.diff_view();
            let Some(parent) = parent else {
                return Err(VmError::Internal(
                    "a diff snapshot without a parent".to_owned(),
                ));
            };
            // The caller's check, again: another snapshot may have run meanwhile.
            crate::domain::snapshot::diff_parent(
                &snap.id,
                snap.config.memory.track_dirty_pages,
                diff.parent.as_ref(),
                diff.last_failed,
                diff.vmm,
                |s| *s == parent,
            )?;
        }
        self.snapshot_to = Some((dir, kind));
        let result = self.handle(Command::Snapshot { resume }).await;
        self.snapshot_to = None;
        result.map(|vm| Taken {
            vm,
            attempt: self.snapshot_attempt,
        })
    }

    /// The snapshot of attempt `attempt` is committed as `snapshot`: the
    /// parent of the next diff when the VM tracks dirty pages, no attempt
    /// began since and the VMM that wrote it still serves the VM.
    async fn committed(&mut self, snapshot: SnapshotId, attempt: u64) -> Result<bool, VmError> {
        let Some((written, process)) = &self.written_by else {
            return Ok(false);
        };
        let same_vmm = self
            .process
            .as_ref()
            .is_some_and(|p| (p.pid, p.start_time) == (process.pid, process.start_time));
        if *written != attempt || attempt != self.snapshot_attempt || !same_vmm {
            return Ok(false);
        }
        self.snapshot_failed = false;
        if !self.vm.snapshot().config.memory.track_dirty_pages {
            return Ok(false);
        }
        self.diff_parent = Some(DiffParent {
            snapshot_id: snapshot,
            vmm_pid: process.pid,
            vmm_start_time: process.start_time,
        });
        self.persist().await?;
        self.refresh_view();
        self.send_view();
        Ok(true)
    }

    /// What a diff snapshot would be taken against now.
    fn diff_view(&self) -> DiffView {
        DiffView {
            parent: self.diff_parent.clone(),
            last_failed: self.snapshot_failed,
            vmm: self.process.as_ref().map(|p| (p.pid, p.start_time)),
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
        // Intent before action: the desired state is committed before the VMM
        // is touched (a crash cannot lose it), and flushed to disk while the
        // VMM acts, before the answer (a power loss cannot lose what a client was told).
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
        let store = Arc::clone(&self.deps.store);
        let (result, ()) = tokio::join!(self.drain(), Self::sync_store(&store));
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

/// How long writing or reading `memory_bytes` of guest memory may take on
/// top of the call timeout: 30 s per GiB (a slow disk writes ~35 MiB/s).
fn snapshot_time(memory_bytes: u64) -> Duration {
    Duration::from_secs(30 * memory_bytes.div_ceil(1 << 30))
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Closes the queue and answers every request still in it with `err`.
async fn refuse_queued(mut rx: mpsc::Receiver<Request>, err: impl Fn() -> VmError) {
    rx.close();
    while let Some(req) = rx.recv().await {
        match req {
            Request::Command(_, reply) => drop(reply.send(Err(err()))),
            Request::WriteConsole(_, reply) => drop(reply.send(Err(err()))),
            Request::Snapshot { reply, .. } => drop(reply.send(Err(err()))),
            Request::Committed { reply, .. } => drop(reply.send(Err(err()))),
        }
    }
}
