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

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

pub use self::calls::{hypervisor_to_vm_error, timed_call};
use super::feed::ChangeFeed;
use super::manager::registry::ListedCounts;
use crate::domain::restart::{Cause, RestartSettings};
use crate::domain::{Admission, Command, Effect, Observation, Vm, VmError, VmSnapshot, VmState};
use crate::ports::{
    Clock, Hypervisor, HypervisorError, Telemetry, TelemetryEvent, VmMetrics, VmStore, VmmEvent,
    VmmEventSink, VmmHandle, VmmProcess,
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
        /// Run the VM afterwards.
        resume: bool,
        /// The answer.
        reply: oneshot::Sender<Result<VmSnapshot, VmError>>,
    },
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
    /// The registry's counts of listed VMs per state, kept as views change.
    pub listed: Arc<ListedCounts>,
    /// Managed networking, once set (before recovery); unset: no managed interfaces.
    pub network: Arc<std::sync::OnceLock<crate::app::network::Networking>>,
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
        }
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
    /// Where the admitted snapshot goes.
    snapshot_to: Option<PathBuf>,
    /// A VM made by [`Owner::restoring`]: its create restores this snapshot
    /// (and resumes the VM when asked) instead of configuring a new VMM.
    restore_from: Option<(PathBuf, bool)>,
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
    pub fn creating(vm: Vm, deps: Deps<H, S>) -> (Self, watch::Receiver<Arc<VmView>>) {
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
        dir: PathBuf,
        resume: bool,
    ) -> (Self, watch::Receiver<Arc<VmView>>) {
        let (mut owner, view) = Self::creating(vm, deps);
        owner.restore_from = Some((dir, resume));
        (owner, view)
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
            snapshot_to: None,
            restore_from: None,
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
            // The create's intent is on disk before the answer (flushed while the
            // VMM starts); the created record is committed, not flushed: a crash of
            // VMCP cannot lose it, and a power loss, which would, also ends the VMM,
            // so recovery then keeps the VM from its intent (see domain::recovery).
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
                        Some(Request::Snapshot { dir, resume, reply }) => {
                            self.snapshot_to = Some(dir);
                            let result = self.handle(Command::Snapshot { resume }).await;
                            self.snapshot_to = None;
                            let _ = reply.send(result);
                            self.vm.sample_soon(Instant::now());
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
                Request::Snapshot { reply, .. } => drop(reply.send(Err(gone()))),
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

/// Sleeps until `deadline`, or forever when there is none.
/// How long writing or reading `memory_bytes` of guest memory may take on
/// top of the call timeout: 30 s per GiB (a slow disk writes ~35 MiB/s).
fn snapshot_time(memory_bytes: u64) -> Duration {
    Duration::from_secs(30 * memory_bytes.div_ceil(1 << 30))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
