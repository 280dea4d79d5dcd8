//! One VM's VMM, for any flavour: [`VmmVm`], the [`VmmHandle`] a backend
//! hands to the VM's owner task. It holds everything about the VM's VMM
//! (config as the flavour mapped it, runtime directory, API socket, the
//! supervised process and the watcher task), so the backend keeps no
//! registry and the owner is the only one who can act on the VM.
//!
//! Every operation answers with the state the VMM reports afterwards and the
//! identity of the process serving the VM then. Operations that need a new
//! process (boot when none runs; reboot on a VMM without one) first end the
//! old process by pid and start time, remove the socket and lock file it may
//! have left, spawn a new one, configure it from the stored config and
//! report the new pid. The old process's exit is expected and therefore not
//! reported; an exit nobody asked for is reported by the reaper, naming its
//! pid, so an owner can tell it from news about the current process.
//!
//! A flavour's watcher (Cloud Hypervisor's event monitor) runs as a task per
//! process; it ends when the process exits, when the process is replaced,
//! or when the handle is dropped (the handle holds the only sender of the
//! watcher's stop channel).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::domain::snapshot::SnapshotKind;
use crate::domain::{VmId, VmSize, VmState};
use crate::ports::{
    HypervisorError, Reported, ShutdownMode, VmMetrics, VmmEventSink, VmmHandle, VmmInfo,
    VmmProcess,
};

use super::console;
use super::flavour::{Api, Call, Flavour, HardStop, Poweroff, Reboot, Sampled, Watch};
use super::process::{ExitExpectation, RuntimeDir, Supervised, remove_socket};
use super::supervisor::Supervisor;

/// How often a graceful stop re-reads the VM state.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// How long to look for a VMM exit that would explain a broken call.
const EXIT_SETTLE: Duration = Duration::from_millis(250);

/// How a graceful stop ended.
enum PoweredOff {
    /// The process exited (status 0 for the guest's own poweroff; the
    /// process keeps how, for `gone`).
    Exited,
    /// The VMM reports this state and keeps running.
    Reported(VmState),
}

/// One VM's VMM, generic over the VMM's [`Flavour`].
pub struct VmmVm<F: Flavour> {
    sup: Arc<Supervisor<F>>,
    id: VmId,
    runtime: RuntimeDir,
    vm: F::Vm,
    /// The API socket of the current (or next) process: in the runtime
    /// directory, except for a VMM adopted from elsewhere until it is replaced.
    socket: PathBuf,
    /// The current process; it may have exited (its exit explains the state).
    process: Option<Supervised>,
    /// The process was ended by VMCP (a stop or delete), not by itself.
    stopped_by_vmcp: bool,
    /// The VM was deleted: nothing may start a VMM for it again.
    deleted: bool,
    events: VmmEventSink,
    /// Dropping this ends the watcher task of the current process.
    watching: Option<oneshot::Sender<()>>,
    /// The file the serial console writes to (None: the console is off).
    console: Option<PathBuf>,
}

impl<F: Flavour> std::fmt::Debug for VmmVm<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmVm")
            .field("kind", &F::KIND)
            .field("id", &self.id)
            .field("socket", &self.socket)
            .field("process", &self.identity())
            .finish_non_exhaustive()
    }
}

impl<F: Flavour> VmmVm<F> {
    /// A handle with no process yet; `respawn` or `attach` gives it one.
    pub(super) fn new(
        sup: Arc<Supervisor<F>>,
        id: VmId,
        runtime: RuntimeDir,
        vm: F::Vm,
        events: VmmEventSink,
        console: Option<PathBuf>,
    ) -> Self {
        let socket = sup.flavour.socket(&vm, &runtime);
        Self {
            sup,
            id,
            runtime,
            vm,
            socket,
            process: None,
            stopped_by_vmcp: false,
            deleted: false,
            events,
            watching: None,
            console,
        }
    }

    /// Keeps the console file under the cap (see [`console::cap`]).
    fn cap_console(&self) {
        let max = self.sup.settings.console_max_bytes;
        let Some(path) = self.console.as_deref().filter(|_| max > 0) else {
            return;
        };
        match console::cap(path, max) {
            Ok(0) => {}
            Ok(dropped) => {
                tracing::debug!(vm_id = %self.id, dropped, "dropped old console output over the cap")
            }
            Err(e) => {
                tracing::debug!(vm_id = %self.id, error = %e, path = %path.display(), "cannot cap the console")
            }
        }
    }

    /// Takes over `process`, which serves its API on `socket` (adoption).
    pub(super) fn attach(&mut self, process: Supervised, socket: PathBuf) {
        self.process = Some(process);
        self.socket = socket;
        self.watch(false);
    }

    /// The VM.
    pub fn id(&self) -> &VmId {
        &self.id
    }

    /// The VM's runtime directory.
    pub fn runtime(&self) -> &RuntimeDir {
        &self.runtime
    }

    /// The flavour's per-VM state.
    pub(super) fn flavour_vm(&self) -> &F::Vm {
        &self.vm
    }

    fn api(&self) -> Api<'_> {
        Api {
            http: &self.sup.http,
            socket: &self.socket,
        }
    }

    fn live(&self) -> Option<&Supervised> {
        self.process.as_ref().filter(|p| p.exited().is_none())
    }

    fn identity(&self) -> Option<VmmProcess> {
        self.live().map(|p| VmmProcess {
            pid: p.pid(),
            start_time: p.start_time(),
            socket_path: self.socket.to_string_lossy().into_owned(),
        })
    }

    fn reported(&self, state: VmState, reason: impl Into<String>) -> Reported {
        Reported {
            state,
            reason: reason.into(),
            process: self.identity(),
        }
    }

    /// The state and reason of a VM whose process is not running.
    fn gone(&self) -> (VmState, String) {
        if self.stopped_by_vmcp {
            return (VmState::Shutdown, "stopped by VMCP".to_owned());
        }
        match self.process.as_ref().and_then(Supervised::exited) {
            Some(exit) => {
                let state = self.sup.flavour.classify_exit(&exit);
                let reason = if state == VmState::Shutdown {
                    format!(
                        "the guest powered off or reset, which ends the VMM ({})",
                        exit.describe_status()
                    )
                } else {
                    exit.reason()
                };
                (state, reason)
            }
            None => (
                VmState::Shutdown,
                "no VMM process runs; boot starts one".to_owned(),
            ),
        }
    }

    fn gone_report(&self) -> Reported {
        let (state, reason) = self.gone();
        self.reported(state, reason)
    }

    /// `Gone` once the VM was deleted: a deleted VM's handle starts nothing.
    fn require_not_deleted(&self) -> Result<(), HypervisorError> {
        if self.deleted {
            return Err(HypervisorError::Gone(format!("vm {} was deleted", self.id)));
        }
        Ok(())
    }

    /// Ok when a process runs. Otherwise `Gone` for a deleted VM,
    /// `Unavailable` with the exit of a crashed VMM as the source, or
    /// `InvalidState` for a stopped one.
    fn require_live(&self) -> Result<(), HypervisorError> {
        self.require_not_deleted()?;
        if self.live().is_some() {
            return Ok(());
        }
        let (state, reason) = self.gone();
        match self.process.as_ref().and_then(Supervised::ended) {
            Some(ended) if state == VmState::Failed => Err(ended.into()),
            _ => Err(HypervisorError::InvalidState(format!(
                "no VMM runs for vm {} ({reason})",
                self.id
            ))),
        }
    }

    /// If a call broke because the VMM died, says so with its exit as the source.
    async fn explain(&self, e: HypervisorError) -> HypervisorError {
        if !matches!(e, HypervisorError::Unavailable { .. }) {
            return e;
        }
        let Some(p) = &self.process else {
            return e;
        };
        // A VMM that dropped the connection is usually already being reaped.
        if p.wait_exit(EXIT_SETTLE).await.is_none() {
            return e;
        }
        p.ended().map_or(e, HypervisorError::from)
    }

    /// Starts the flavour's watcher for the current process, ending any previous one.
    fn watch(&mut self, fresh: bool) {
        self.watching = None;
        let Some(p) = self.live() else {
            return;
        };
        let watch = Watch {
            vm_id: self.id.clone(),
            pid: p.pid(),
            socket: self.socket.clone(),
            runtime: self.runtime.clone(),
            http: self.sup.http.clone(),
            events: self.events.clone(),
            fresh,
        };
        let Some(watcher) = self.sup.flavour.watch(watch) else {
            return;
        };
        let mut exit = p.exit_watch();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            tokio::select! {
                () = watcher => {}
                // The sender is never used: it is dropped with the handle or
                // when the process is replaced.
                _ = stopped => {}
                _ = exit.wait_for(Option::is_some) => {}
            }
        });
        self.watching = Some(stop);
    }

    /// Ends the current process if it still runs, as an expected exit (by
    /// pid and start time, so a recycled pid is never signalled): SIGTERM,
    /// then SIGKILL after `grace` (at once when zero). Then removes the
    /// socket and lock file a killed VMM leaves behind.
    async fn end_process(&mut self, grace: Duration) -> Result<(), HypervisorError> {
        self.watching = None;
        if let Some(p) = &self.process
            && p.terminate(grace).await.is_none()
        {
            return Err(HypervisorError::unavailable(format!(
                "VMM pid {} of vm {} did not exit after SIGKILL",
                p.pid(),
                self.id
            )));
        }
        remove_socket(&self.socket).map_err(HypervisorError::from)
    }

    /// Replaces the process with a fresh one configured from the stored
    /// config. On failure nothing runs and the VM's files are gone.
    pub(super) async fn respawn(&mut self) -> Result<(), HypervisorError> {
        self.respawn_with(None).await
    }

    /// Like [`VmmVm::respawn`], but the fresh process restores the snapshot
    /// in `dir` instead of being configured (the VM then runs when `resume`,
    /// else is Paused).
    pub(super) async fn respawn_restoring(
        &mut self,
        dir: &Path,
        resume: bool,
    ) -> Result<(), HypervisorError> {
        self.respawn_with(Some((dir, resume))).await
    }

    async fn respawn_with(
        &mut self,
        snapshot: Option<(&Path, bool)>,
    ) -> Result<(), HypervisorError> {
        self.end_process(Duration::ZERO).await?;
        if let Some(old) = &self.process {
            tracing::info!(vm_id = %self.id, old_pid = old.pid(), "starting a new VMM for the VM");
        }
        let (process, socket) = self
            .sup
            .spawn(&self.id, &mut self.vm, &self.runtime, self.events.clone())
            .await?;
        self.process = Some(process);
        self.socket = socket;
        self.stopped_by_vmcp = false;
        let flavour = &self.sup.flavour;
        let set_up = match snapshot {
            None => flavour.configure(self.api(), &self.vm).await,
            Some((dir, resume)) => {
                let runtime = &self.runtime;
                flavour
                    .restore(self.api(), &self.vm, runtime, dir, resume)
                    .await
            }
        };
        if let Err(e) = set_up {
            let e = self.explain(e).await;
            self.discard().await;
            return Err(e);
        }
        self.watch(true);
        Ok(())
    }

    /// The state the running VMM reports now.
    async fn read_back_state(&self) -> Result<Reported, HypervisorError> {
        match self.sup.flavour.state(self.api()).await {
            Ok(state) => Ok(self.reported(state, "")),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// The state of a fresh process after creation (or, with
    /// `Some(resume)`, a restore): what the flavour says its success means,
    /// else read back, discarding the VMM if it cannot be.
    pub(super) async fn read_back(
        &mut self,
        restored: Option<bool>,
    ) -> Result<Reported, HypervisorError> {
        if let Some(state) = self.sup.flavour.state_after_start(restored) {
            return Ok(self.reported(state, ""));
        }
        match self.sup.flavour.state(self.api()).await {
            Ok(state) => Ok(self.reported(state, "")),
            Err(e) => {
                let e = self.explain(e).await;
                self.discard().await;
                Err(e)
            }
        }
    }

    /// Ends the process at once and removes the VM's files: what a failed
    /// create or respawn must not leave behind.
    async fn discard(&mut self) {
        if let Err(e) = self.end_process(Duration::ZERO).await {
            tracing::warn!(vm_id = %self.id, error = %e, "cannot end the VMM of a failed start");
        }
        self.stopped_by_vmcp = true;
        self.sup.remove_files(&self.id, &self.vm, &self.runtime);
    }

    /// One call on the running VMM, then the state read back.
    async fn act(&self, call: Call) -> Result<Reported, HypervisorError> {
        self.require_live()?;
        let flavour = &self.sup.flavour;
        let api = self.api();
        let result = async {
            flavour.call(api, call).await?;
            match flavour.state_after(call) {
                Some(state) => Ok(state),
                None => flavour.state(api).await,
            }
        }
        .await;
        match result {
            Ok(state) => Ok(self.reported(state, "")),
            Err(e) => Err(self.explain(e).await),
        }
    }

    /// Asks the guest to power off and waits up to `timeout` for the process
    /// to exit or the VMM to report Shutdown. None when the guest cannot or
    /// did not stop in time.
    async fn await_poweroff(
        &self,
        timeout: Duration,
    ) -> Result<Option<PoweredOff>, HypervisorError> {
        let Some(p) = self.live() else {
            return Ok(None);
        };
        let flavour = &self.sup.flavour;
        let api = self.api();
        // A clean exit is now the answer we wait for; a crash is still news.
        p.expect_exit(ExitExpectation::CleanOnly);
        match flavour.request_poweroff(api).await {
            Ok(Poweroff::Requested) => {}
            Ok(Poweroff::Impossible) => {
                p.expect_exit(ExitExpectation::Unexpected);
                return Ok(None);
            }
            Err(e) => {
                p.expect_exit(ExitExpectation::Unexpected);
                return Err(self.explain(e).await);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let pause = SHUTDOWN_POLL.min(deadline.saturating_duration_since(Instant::now()));
            if p.wait_exit(pause).await.is_some() {
                return Ok(Some(PoweredOff::Exited));
            }
            match flavour.state(api).await {
                Ok(VmState::Shutdown) => {
                    p.expect_exit(ExitExpectation::Unexpected);
                    return Ok(Some(PoweredOff::Reported(VmState::Shutdown)));
                }
                Ok(_) => {}
                // The socket goes away while the process exits: look again.
                Err(HypervisorError::Unavailable { .. })
                    if p.wait_exit(EXIT_SETTLE).await.is_some() =>
                {
                    continue;
                }
                Err(e) => {
                    p.expect_exit(ExitExpectation::Unexpected);
                    return Err(e);
                }
            }
            if Instant::now() >= deadline {
                p.expect_exit(ExitExpectation::Unexpected);
                return Ok(None);
            }
        }
    }

    /// Stops the VM: a graceful attempt of at most `grace` unless `force`
    /// (or a zero grace), then hard, as the flavour stops hard.
    async fn stop(&mut self, force: bool, grace: Duration) -> Result<Reported, HypervisorError> {
        if !force && !grace.is_zero() {
            match self.await_poweroff(grace).await? {
                Some(PoweredOff::Exited) => {
                    self.watching = None;
                    return Ok(self.gone_report());
                }
                Some(PoweredOff::Reported(state)) => return Ok(self.reported(state, "")),
                None => {
                    tracing::info!(vm_id = %self.id, ?grace, "the guest did not power off; stopping it hard");
                }
            }
        }
        match F::HARD_STOP {
            HardStop::KeepsProcess => self.act(Call::HardStop).await,
            HardStop::EndsProcess => {
                self.require_live()?;
                self.end_process(Duration::ZERO).await?;
                self.stopped_by_vmcp = true;
                Ok(self.gone_report())
            }
        }
    }

    /// Details every backend reports, plus the flavour's.
    async fn base_info(&self) -> BTreeMap<String, String> {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let mut info = BTreeMap::from([
            ("backend".to_owned(), F::KIND.as_str().to_owned()),
            ("api_socket".to_owned(), path(&self.socket)),
            ("runtime_dir".to_owned(), path(self.runtime.path())),
            ("vmm_log".to_owned(), path(&self.runtime.log_file())),
        ]);
        let version = match self.sup.version().await {
            Ok(v) => v,
            Err(e) => format!("unknown ({e})"),
        };
        info.insert("vmm_version".to_owned(), version);
        self.sup
            .flavour
            .describe(&self.vm, &self.runtime, &mut info);
        info
    }

    fn running_info(
        &self,
        sampled: Sampled,
        mut backend_info: BTreeMap<String, String>,
    ) -> VmmInfo {
        let mut metrics = VmMetrics {
            network: sampled.network,
            storage: sampled.storage,
            ..VmMetrics::default()
        };
        backend_info.extend(sampled.backend_info);
        if let Some(p) = self.live() {
            backend_info.insert("vmm_pid".to_owned(), p.pid().to_string());
            match p.stats() {
                Ok(stats) => {
                    metrics.cpu_usage_percent = stats.cpu_percent;
                    metrics.memory_usage_bytes = i64::try_from(stats.rss_bytes).unwrap_or(i64::MAX);
                    metrics.uptime_seconds =
                        i64::try_from(stats.uptime.as_secs()).unwrap_or(i64::MAX);
                }
                Err(e) => {
                    tracing::debug!(vm_id = %self.id, error = %e, "process stats unavailable")
                }
            }
        }
        VmmInfo {
            state: Some(sampled.state),
            reason: String::new(),
            metrics,
            backend_info,
            process: self.identity(),
            size: sampled.size,
        }
    }
}

impl<F: Flavour> VmmHandle for VmmVm<F> {
    fn process(&self) -> Option<VmmProcess> {
        self.identity()
    }

    async fn boot(&mut self) -> Result<Reported, HypervisorError> {
        self.require_not_deleted()?;
        if self.live().is_none() {
            self.respawn().await?;
        }
        self.act(Call::Boot).await
    }

    async fn shutdown(&mut self, mode: ShutdownMode) -> Result<Reported, HypervisorError> {
        self.require_not_deleted()?;
        if self.live().is_none() {
            // Already down: say how, as a sample would.
            return Ok(self.gone_report());
        }
        self.stop(mode.force, mode.graceful_timeout).await
    }

    async fn pause(&mut self) -> Result<Reported, HypervisorError> {
        self.act(Call::Pause).await
    }

    async fn resume(&mut self) -> Result<Reported, HypervisorError> {
        self.act(Call::Resume).await
    }

    async fn reboot(&mut self, force: bool) -> Result<Reported, HypervisorError> {
        self.require_live()?;
        match self.sup.flavour.reboot() {
            Reboot::InPlace => self.act(Call::Reboot).await,
            Reboot::Respawn { grace } => {
                let stopped = self.stop(force, grace).await?;
                if stopped.state == VmState::Failed {
                    // It crashed while stopping: that is the news, not a reboot.
                    return Ok(stopped);
                }
                self.respawn().await?;
                self.act(Call::Boot).await
            }
        }
    }

    async fn delete(&mut self, force: bool) -> Result<(), HypervisorError> {
        self.watching = None;
        if let Some(p) = self.live() {
            p.expect_exit(ExitExpectation::Any);
            let grace = if force {
                Duration::ZERO
            } else {
                self.sup.settings.stop_grace
            };
            let asked = !force && self.sup.flavour.ask_to_exit(self.api()).await;
            if !(asked && p.wait_exit(grace).await.is_some()) {
                if asked {
                    tracing::warn!(vm_id = %self.id, pid = p.pid(), "the VMM did not exit when asked; terminating it");
                }
                p.terminate(grace).await;
            }
            if p.exited().is_none() {
                return Err(HypervisorError::unavailable(format!(
                    "VMM pid {} of vm {} did not exit after SIGKILL",
                    p.pid(),
                    self.id
                )));
            }
        }
        self.stopped_by_vmcp = true;
        self.deleted = true;
        // A VMM adopted from elsewhere has its socket outside the runtime directory.
        remove_socket(&self.socket)?;
        self.runtime.remove()?;
        self.sup.flavour.remove_files(&self.vm)
    }

    async fn resize(&mut self, size: VmSize) -> Result<(Reported, VmSize), HypervisorError> {
        self.require_live()?;
        let api = Api {
            http: &self.sup.http,
            socket: &self.socket,
        };
        let flavour = &self.sup.flavour;
        let result = async {
            let size = flavour.resize(api, &mut self.vm, size).await?;
            Ok::<_, HypervisorError>((flavour.state(api).await?, size))
        }
        .await;
        match result {
            Ok((state, size)) => Ok((self.reported(state, ""), size)),
            Err(e) => Err(self.explain(e).await),
        }
    }

    async fn snapshot(
        &mut self,
        dir: &Path,
        kind: SnapshotKind,
        resume: bool,
    ) -> Result<Reported, HypervisorError> {
        self.require_live()?;
        let flavour = &self.sup.flavour;
        if flavour.state(self.api()).await? == VmState::Running {
            self.act(Call::Pause).await?;
        }
        let written = flavour.snapshot(self.api(), &self.vm, dir, kind).await;
        if let Err(e) = written {
            // The VM is left as the caller wanted it, whatever the snapshot did.
            if resume && let Err(r) = self.act(Call::Resume).await {
                tracing::warn!(vm_id = %self.id, error = %r, "cannot resume after a failed snapshot");
            }
            return Err(self.explain(e).await);
        }
        if resume {
            self.act(Call::Resume).await
        } else {
            self.read_back_state().await
        }
    }

    async fn write_console(&mut self, data: Vec<u8>) -> Result<usize, HypervisorError> {
        self.require_not_deleted()?;
        self.sup
            .flavour
            .write_console(&self.vm, &self.runtime, &data)
            .await
    }

    async fn sample(&mut self) -> Result<VmmInfo, HypervisorError> {
        self.require_not_deleted()?;
        self.cap_console();
        let mut backend_info = self.base_info().await;
        if self.live().is_some() {
            let api = Api {
                http: &self.sup.http,
                socket: &self.socket,
            };
            match self.sup.flavour.sample(api, &mut self.vm).await {
                Ok(sampled) => return Ok(self.running_info(sampled, backend_info)),
                Err(e) => {
                    let e = self.explain(e).await;
                    if self.live().is_some() {
                        return Err(e);
                    }
                    // It ended meanwhile: report how, below.
                }
            }
        }
        let (state, reason) = self.gone();
        if let Some(exit) = self.process.as_ref().and_then(Supervised::exited) {
            backend_info.insert("vmm_exit".to_owned(), exit.describe_status());
        }
        Ok(VmmInfo {
            state: Some(state),
            reason,
            metrics: VmMetrics::default(),
            backend_info,
            process: None,
            size: None,
        })
    }
}
