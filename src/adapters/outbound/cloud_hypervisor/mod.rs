//! The Cloud Hypervisor backend: one supervised `cloud-hypervisor` process
//! per VM, driven through its REST API on the VM's own socket.
//!
//! Every operation reads the state back from `vm.info` after acting, so the
//! caller records what CH reports, not what we hoped for. Facts about CH v53
//! this backend is built on (checked against the real binary):
//!
//! - `vm.shutdown` is a hard stop and leaves the VM `Created` (bootable);
//!   a graceful stop is `vm.power-button`, which only a guest with ACPI
//!   handles; when the guest powers off, the process exits with status 0
//!   (leaving its socket file behind). Such an unrequested clean exit is
//!   reported as `Shutdown`, and booting again respawns the VMM with the
//!   same config. Any other exit is `Failed` with the status and log tail.
//! - State refusals answer 404 (no VM created) or 500 with a JSON array of
//!   strings; those become [`HypervisorError::InvalidState`].
//! - `vm.counters` answers 500 unless the VM runs, so metrics are read only then.
//! - SIGTERM also makes CH exit 0, so an external `kill` of the VMM looks
//!   like a guest poweroff; SIGKILL leaves the socket and its `.lock` behind.

pub mod client;
pub mod config;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::sync::{Mutex, OnceCell};
use tokio::time::Instant;

use crate::adapters::outbound::vmm::discovery;
use crate::adapters::outbound::vmm::process::{create_private_dir, read_start_time};
use crate::adapters::outbound::vmm::{
    ExitExpectation, ExitInfo, ExitReporter, RuntimeDir, SpawnSpec, Supervised, UdsClient,
};
use crate::domain::{ConfigError, VmConfig, VmId, VmState};
use crate::ports::{
    BackendCheck, BackendKind, EventSink, Hypervisor, HypervisorError, NetworkStats, ShutdownMode,
    StorageStats, VmMetrics, VmmInfo, VmmProcess,
};

use self::client::{ChApi, Counters};
use self::config::{ChVmConfig, ConsoleDefaults};

/// Graceful shutdown timeout when the caller passes zero.
pub const DEFAULT_GRACEFUL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new VMM may take to answer `vmm.ping`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long delete waits for the VMM to exit after `vmm.shutdown` (or
/// SIGTERM) before SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a graceful shutdown re-reads the VM state.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
/// How long to look for a VMM exit that would explain a broken call.
const EXIT_SETTLE: Duration = Duration::from_millis(250);
/// Bound on one readiness ping.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on `cloud-hypervisor --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// One VM known to the backend.
struct Slot {
    config: ChVmConfig,
    runtime: RuntimeDir,
    /// The API socket: in the runtime directory, except for a VMM adopted
    /// from elsewhere (e.g. the seed's single endpoint) until it is respawned.
    socket: PathBuf,
    vmm: Supervised,
}

/// The Cloud Hypervisor backend.
pub struct CloudHypervisor {
    binary: PathBuf,
    runtime_root: PathBuf,
    http: UdsClient,
    events: EventSink,
    ready_timeout: Duration,
    stop_grace: Duration,
    kvm_device: PathBuf,
    vms: StdMutex<HashMap<VmId, Arc<Mutex<Slot>>>>,
    version: OnceCell<String>,
}

impl std::fmt::Debug for CloudHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudHypervisor")
            .field("binary", &self.binary)
            .field("runtime_root", &self.runtime_root)
            .finish_non_exhaustive()
    }
}

impl CloudHypervisor {
    /// A backend running `binary` (a path, or a name looked up on PATH),
    /// keeping per-VM runtime directories under `runtime_root`, bounding
    /// every API call by `call_timeout`, and reporting unexpected VMM exits
    /// to `events`.
    pub fn new(
        binary: impl Into<PathBuf>,
        runtime_root: impl Into<PathBuf>,
        call_timeout: Duration,
        events: EventSink,
    ) -> Self {
        Self {
            binary: binary.into(),
            runtime_root: runtime_root.into(),
            http: UdsClient::new(call_timeout),
            events,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            kvm_device: PathBuf::from("/dev/kvm"),
            vms: StdMutex::new(HashMap::new()),
            version: OnceCell::new(),
        }
    }

    /// Sets how long a new VMM may take to answer its first ping.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Sets how long delete waits for a polite exit before SIGKILL.
    pub fn with_stop_grace(mut self, grace: Duration) -> Self {
        self.stop_grace = grace;
        self
    }

    /// Sets the KVM device [`Hypervisor::check`] opens (default /dev/kvm).
    pub fn with_kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_device = path.into();
        self
    }

    /// The runtime directory root.
    pub fn runtime_root(&self) -> &Path {
        &self.runtime_root
    }

    /// The VM ids with a VMM (running or exited but not deleted).
    pub fn vm_ids(&self) -> Vec<VmId> {
        let mut ids: Vec<VmId> = self.map().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Identifies a Cloud Hypervisor already listening on `socket` (for
    /// example at the seed's single `UNKEY_VMCP_CH_ENDPOINT`) so that it can
    /// be [adopted](Hypervisor::adopt): its pid from `vmm.ping`, its start
    /// time from /proc.
    pub async fn probe_endpoint(&self, socket: &Path) -> Result<VmmProcess, HypervisorError> {
        let ping = ChApi::new(&self.http, socket)
            .ping(self.http.timeout())
            .await?;
        let pid = ping
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| HypervisorError::Protocol("vmm.ping reported no pid".to_owned()))?;
        let start_time = read_start_time(pid).map_err(|e| {
            HypervisorError::NotFound(format!(
                "VMM pid {pid} behind {} is not visible in /proc: {e}",
                socket.display()
            ))
        })?;
        Ok(VmmProcess {
            pid,
            start_time,
            socket_path: socket.to_string_lossy().into_owned(),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Arc<Mutex<Slot>>>> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every critical section is one insert/remove/get), so use it anyway.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: &VmId) -> Result<Arc<Mutex<Slot>>, HypervisorError> {
        self.map()
            .get(id)
            .cloned()
            .ok_or_else(|| HypervisorError::NotFound(id.to_string()))
    }

    fn reporter(&self, id: &VmId) -> ExitReporter {
        ExitReporter {
            vm_id: id.clone(),
            events: self.events.clone(),
            classify: Arc::new(classify_exit),
        }
    }

    /// `cloud-hypervisor --version`, run once and cached.
    async fn version(&self) -> Result<String, HypervisorError> {
        self.version
            .get_or_try_init(|| read_version(&self.binary))
            .await
            .cloned()
    }

    /// Spawns a VMM in `runtime` and creates the VM in it. Leaves nothing
    /// behind on failure.
    async fn start_vmm(
        &self,
        id: &VmId,
        runtime: &RuntimeDir,
        config: &ChVmConfig,
    ) -> Result<Supervised, HypervisorError> {
        let socket = runtime.api_socket();
        let mut socket_arg = OsString::from("path=");
        socket_arg.push(&socket);
        let spec = SpawnSpec {
            program: self.binary.clone(),
            args: vec![OsString::from("--api-socket"), socket_arg],
            ready_timeout: self.ready_timeout,
        };
        let http = &self.http;
        let probe_socket = &socket;
        let vmm = Supervised::spawn(&spec, runtime.clone(), self.reporter(id), || async move {
            ChApi::new(http, probe_socket)
                .ping(PING_TIMEOUT)
                .await
                .map(drop)
        })
        .await?;
        if let Err(e) = ChApi::new(&self.http, &socket).create(config).await {
            let e = explain(&vmm, e).await;
            vmm.terminate(Duration::ZERO).await;
            if let Err(rm) = runtime.remove() {
                tracing::warn!(vm_id = %id, error = %rm, "cannot remove runtime directory");
            }
            return Err(e);
        }
        Ok(vmm)
    }

    /// Respawns the slot's VMM with the same config if it exited cleanly
    /// (the guest powered off); a crashed VMM is `Unavailable` with its reason.
    async fn revive(&self, id: &VmId, slot: &mut Slot) -> Result<(), HypervisorError> {
        if let Some(exit) = slot.vmm.exited() {
            if !exit.is_clean() {
                return Err(HypervisorError::Unavailable(exit.reason()));
            }
            tracing::info!(vm_id = %id, "respawning the VMM of a powered-off VM to boot it again");
            slot.vmm = self.start_vmm(id, &slot.runtime, &slot.config).await?;
            slot.socket = slot.runtime.api_socket();
        }
        Ok(())
    }

    /// Fails with `Unavailable` (and the exit reason) unless the VMM runs.
    fn running(vmm: &Supervised) -> Result<(), HypervisorError> {
        match vmm.exited() {
            Some(exit) if exit.is_clean() => Err(HypervisorError::InvalidState(format!(
                "the VM is shut down (the guest powered off: {})",
                exit.describe_status()
            ))),
            Some(exit) => Err(HypervisorError::Unavailable(exit.reason())),
            None => Ok(()),
        }
    }

    /// Sends one state-changing call to a running VMM and reads the state back.
    async fn act(&self, id: &VmId, action: Action) -> Result<VmState, HypervisorError> {
        let slot = self.slot(id)?;
        let slot = slot.lock().await;
        Self::running(&slot.vmm)?;
        let api = ChApi::new(&self.http, &slot.socket);
        let done = match action {
            Action::Pause => api.pause().await,
            Action::Resume => api.resume().await,
            Action::Reboot => api.reboot().await,
            Action::HardStop => api.shutdown().await,
        };
        if let Err(e) = done {
            return Err(explain(&slot.vmm, e).await);
        }
        match api.state().await {
            Ok(state) => Ok(state),
            Err(e) => Err(explain(&slot.vmm, e).await),
        }
    }
}

/// The one-call operations.
#[derive(Debug, Clone, Copy)]
enum Action {
    Pause,
    Resume,
    Reboot,
    HardStop,
}

/// Unrequested exit: status 0 is CH's answer to a guest poweroff.
fn classify_exit(info: &ExitInfo) -> VmState {
    if info.is_clean() {
        VmState::Shutdown
    } else {
        VmState::Failed
    }
}

/// If a call broke because the VMM died, says so with its exit reason.
async fn explain(vmm: &Supervised, e: HypervisorError) -> HypervisorError {
    if let HypervisorError::Unavailable(_) = e
        && let Some(exit) = vmm.wait_exit(EXIT_SETTLE).await
    {
        return HypervisorError::Unavailable(exit.reason());
    }
    e
}

async fn read_version(binary: &Path) -> Result<String, HypervisorError> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(HypervisorError::Unavailable(format!(
                "cloud-hypervisor binary {} cannot run: {e}",
                binary.display()
            )));
        }
        Err(_) => {
            return Err(HypervisorError::Unavailable(format!(
                "{} --version did not finish within {VERSION_TIMEOUT:?}",
                binary.display()
            )));
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim();
    if !out.status.success() || first.is_empty() {
        return Err(HypervisorError::Unavailable(format!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(first
        .strip_prefix("cloud-hypervisor ")
        .unwrap_or(first)
        .to_owned())
}

fn sum_counters(counters: &Counters) -> (NetworkStats, StorageStats) {
    let mut net = NetworkStats::default();
    let mut disk = StorageStats::default();
    for device in counters.values() {
        let get = |k: &str| device.get(k).copied().unwrap_or(0);
        net.bytes_received += get("rx_bytes");
        net.bytes_transmitted += get("tx_bytes");
        net.packets_received += get("rx_frames");
        net.packets_transmitted += get("tx_frames");
        disk.bytes_read += get("read_bytes");
        disk.bytes_written += get("write_bytes");
        disk.read_operations += get("read_ops");
        disk.write_operations += get("write_ops");
    }
    (net, disk)
}

impl CloudHypervisor {
    /// Graceful stop: power button, then wait for CH to report Shutdown or
    /// for the process to exit cleanly (a guest poweroff). Returns None when
    /// the guest did not stop in time (the caller then stops it hard).
    async fn power_off(
        &self,
        slot: &Slot,
        timeout: Duration,
    ) -> Result<Option<VmState>, HypervisorError> {
        let vmm = &slot.vmm;
        let api = ChApi::new(&self.http, &slot.socket);
        // A paused guest cannot react to the power button.
        if api.state().await? == VmState::Paused {
            return Ok(None);
        }
        vmm.expect_exit(ExitExpectation::CleanOnly);
        if let Err(e) = api.power_button().await {
            vmm.expect_exit(ExitExpectation::Unexpected);
            return Err(explain(vmm, e).await);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            let pause = SHUTDOWN_POLL.min(deadline.saturating_duration_since(now));
            if let Some(exit) = vmm.wait_exit(pause).await {
                return if exit.is_clean() {
                    Ok(Some(VmState::Shutdown))
                } else {
                    // The reaper has reported the crash (CleanOnly still reports it).
                    Err(HypervisorError::Unavailable(exit.reason()))
                };
            }
            match api.state().await {
                Ok(VmState::Shutdown) => {
                    vmm.expect_exit(ExitExpectation::Unexpected);
                    return Ok(Some(VmState::Shutdown));
                }
                Ok(_) => {}
                // The socket goes away while the process exits: look again.
                Err(HypervisorError::Unavailable(_))
                    if vmm.wait_exit(EXIT_SETTLE).await.is_some() =>
                {
                    continue;
                }
                Err(e) => {
                    vmm.expect_exit(ExitExpectation::Unexpected);
                    return Err(e);
                }
            }
            if Instant::now() >= deadline {
                vmm.expect_exit(ExitExpectation::Unexpected);
                return Ok(None);
            }
        }
    }
}

impl Hypervisor for CloudHypervisor {
    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        let version = self.version().await?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.kvm_device)
            .map_err(|e| {
                HypervisorError::Unavailable(format!(
                    "{} cannot be opened read-write: {e}",
                    self.kvm_device.display()
                ))
            })?;
        Ok(BackendCheck { version })
    }

    fn validate(&self, config: &VmConfig) -> Result<(), ConfigError> {
        config::check(config)
    }

    async fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
    ) -> Result<(VmState, VmmProcess), HypervisorError> {
        let runtime = RuntimeDir::new(&self.runtime_root, id);
        let defaults = ConsoleDefaults {
            serial_file: runtime.serial_file().to_string_lossy().into_owned(),
        };
        let ch = config::to_ch(config, &defaults)?;
        let existing = self.map().get(id).cloned();
        if let Some(existing) = existing {
            let existing = existing.lock().await;
            if existing.vmm.exited().is_none() {
                return Err(HypervisorError::InvalidState(format!(
                    "vm {id} already has a running VMM (pid {})",
                    existing.vmm.pid()
                )));
            }
        }
        let vmm = self.start_vmm(id, &runtime, &ch).await?;
        let socket = runtime.api_socket();
        let state = match ChApi::new(&self.http, &socket).state().await {
            Ok(state) => state,
            Err(e) => {
                let e = explain(&vmm, e).await;
                vmm.terminate(Duration::ZERO).await;
                let _ = runtime.remove();
                return Err(e);
            }
        };
        let process = VmmProcess {
            pid: vmm.pid(),
            start_time: vmm.start_time(),
            socket_path: socket.to_string_lossy().into_owned(),
        };
        let slot = Slot {
            config: ch,
            runtime,
            socket,
            vmm,
        };
        self.map().insert(id.clone(), Arc::new(Mutex::new(slot)));
        Ok((state, process))
    }

    async fn boot(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        let slot = self.slot(id)?;
        let mut slot = slot.lock().await;
        self.revive(id, &mut slot).await?;
        let vmm = &slot.vmm;
        let api = ChApi::new(&self.http, &slot.socket);
        if let Err(e) = api.boot().await {
            return Err(explain(vmm, e).await);
        }
        match api.state().await {
            Ok(state) => Ok(state),
            Err(e) => Err(explain(vmm, e).await),
        }
    }

    async fn shutdown(&self, id: &VmId, mode: ShutdownMode) -> Result<VmState, HypervisorError> {
        if !mode.force {
            let timeout = if mode.graceful_timeout.is_zero() {
                DEFAULT_GRACEFUL_TIMEOUT
            } else {
                mode.graceful_timeout
            };
            let slot = self.slot(id)?;
            let slot = slot.lock().await;
            Self::running(&slot.vmm)?;
            if let Some(state) = self.power_off(&slot, timeout).await? {
                return Ok(state);
            }
            tracing::info!(vm_id = %id, ?timeout, "guest did not power off in time; stopping it hard");
        }
        self.act(id, Action::HardStop).await
    }

    async fn pause(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        self.act(id, Action::Pause).await
    }

    async fn resume(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        self.act(id, Action::Resume).await
    }

    /// CH's `vm.reboot` resets the VM without the guest's cooperation, so
    /// `force` makes no difference here.
    async fn reboot(&self, id: &VmId, _force: bool) -> Result<VmState, HypervisorError> {
        self.act(id, Action::Reboot).await
    }

    async fn delete(&self, id: &VmId, force: bool) -> Result<(), HypervisorError> {
        let Ok(slot) = self.slot(id) else {
            // Nothing known: make sure no runtime files are left either.
            RuntimeDir::new(&self.runtime_root, id).remove()?;
            return Ok(());
        };
        let slot_guard = slot.lock().await;
        let vmm = &slot_guard.vmm;
        vmm.expect_exit(ExitExpectation::Any);
        if vmm.exited().is_none() {
            if force {
                vmm.terminate(Duration::ZERO).await;
            } else {
                let api = ChApi::new(&self.http, &slot_guard.socket);
                // Ask politely; a refusal or a dead socket does not matter,
                // the process is ended below either way.
                if let Err(e) = api.delete().await {
                    tracing::debug!(vm_id = %id, error = %e, "vm.delete before vmm.shutdown failed");
                }
                if let Err(e) = api.vmm_shutdown().await {
                    tracing::debug!(vm_id = %id, error = %e, "vmm.shutdown failed");
                }
                if vmm.wait_exit(self.stop_grace).await.is_none() {
                    tracing::warn!(vm_id = %id, pid = vmm.pid(), "VMM ignored vmm.shutdown; terminating it");
                    vmm.terminate(self.stop_grace).await;
                }
            }
            if vmm.exited().is_none() {
                return Err(HypervisorError::Unavailable(format!(
                    "VMM pid {} of vm {id} did not exit after SIGKILL",
                    vmm.pid()
                )));
            }
        }
        slot_guard.runtime.remove()?;
        if !slot_guard.socket.starts_with(slot_guard.runtime.path()) {
            // An adopted VMM's socket elsewhere: CH leaves the socket (on a
            // crash) and its lock file behind.
            let mut lock = slot_guard.socket.clone().into_os_string();
            lock.push(".lock");
            for leftover in [slot_guard.socket.clone(), PathBuf::from(lock)] {
                if let Err(e) = std::fs::remove_file(&leftover)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(vm_id = %id, path = %leftover.display(), error = %e, "cannot remove");
                }
            }
        }
        drop(slot_guard);
        self.map().remove(id);
        Ok(())
    }

    async fn info(&self, id: &VmId) -> Result<VmmInfo, HypervisorError> {
        let slot = self.slot(id)?;
        let slot = slot.lock().await;
        let vmm = &slot.vmm;
        let socket = &slot.socket;
        let mut backend_info = BTreeMap::from([
            (
                "backend".to_owned(),
                BackendKind::CloudHypervisor.as_str().to_owned(),
            ),
            ("vmm_pid".to_owned(), vmm.pid().to_string()),
            (
                "api_socket".to_owned(),
                socket.to_string_lossy().into_owned(),
            ),
            (
                "runtime_dir".to_owned(),
                slot.runtime.path().to_string_lossy().into_owned(),
            ),
            (
                "vmm_log".to_owned(),
                slot.runtime.log_file().to_string_lossy().into_owned(),
            ),
        ]);
        if let Some(serial) = config::serial_output(&slot.config) {
            backend_info.insert("serial_output".to_owned(), serial.to_owned());
        }
        match self.version().await {
            Ok(v) => backend_info.insert("vmm_version".to_owned(), v),
            Err(e) => backend_info.insert("vmm_version".to_owned(), format!("unknown ({e})")),
        };
        if let Some(exit) = vmm.exited() {
            backend_info.insert("vmm_exit".to_owned(), exit.describe_status());
            let state = classify_exit(&exit);
            return Ok(VmmInfo {
                state: Some(state),
                reason: exit.reason(),
                metrics: VmMetrics::default(),
                backend_info,
            });
        }
        let api = ChApi::new(&self.http, socket);
        let info = match api.info().await {
            Ok(info) => info,
            Err(e) => return Err(explain(vmm, e).await),
        };
        let state = client::parse_state(&info.state)?;
        if let Some(size) = info.memory_actual_size {
            backend_info.insert("memory_actual_size".to_owned(), size.to_string());
        }
        let mut metrics = VmMetrics::default();
        if matches!(state, VmState::Running | VmState::Paused) {
            match api.counters().await {
                Ok(counters) => {
                    let (net, disk) = sum_counters(&counters);
                    metrics.network = net;
                    metrics.storage = disk;
                }
                Err(e) => tracing::debug!(vm_id = %id, error = %e, "vm.counters unavailable"),
            }
        }
        match vmm.stats() {
            Ok(stats) => {
                metrics.cpu_usage_percent = stats.cpu_percent;
                metrics.memory_usage_bytes = i64::try_from(stats.rss_bytes).unwrap_or(i64::MAX);
                metrics.uptime_seconds = i64::try_from(stats.uptime.as_secs()).unwrap_or(i64::MAX);
            }
            Err(e) => tracing::debug!(vm_id = %id, error = %e, "process stats unavailable"),
        }
        Ok(VmmInfo {
            state: Some(state),
            reason: String::new(),
            metrics,
            backend_info,
        })
    }

    async fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
    ) -> Result<VmState, HypervisorError> {
        let Some(process) = process else {
            // The VM was stopped and its VMM is gone. A Cloud Hypervisor VM needs a VMM to be
            // booted, so start one and create the VM in it: it is Created, bootable again,
            // exactly as after a hard vm.shutdown.
            return self.create(id, config).await.map(|(state, _)| state);
        };
        let socket = PathBuf::from(&process.socket_path);
        let runtime = RuntimeDir::new(&self.runtime_root, id);
        // Not `prepare()`: that would remove the live socket of our own VMM.
        create_private_dir(runtime.path())?;
        let defaults = ConsoleDefaults {
            serial_file: runtime.serial_file().to_string_lossy().into_owned(),
        };
        let ch = config::to_ch(config, &defaults)?;
        let vmm = Supervised::adopt(
            process.pid,
            process.start_time,
            self.binary.clone(),
            runtime.clone(),
            self.reporter(id),
        )?;
        let api = ChApi::new(&self.http, &socket);
        api.ping(self.http.timeout()).await?;
        let state = match api.info().await {
            Ok(info) => client::parse_state(&info.state)?,
            // VMCP stopped between spawning this VMM and creating its VM.
            Err(HypervisorError::InvalidState(_)) => {
                api.create(&ch).await?;
                api.state().await?
            }
            Err(e) => return Err(e),
        };
        let slot = Slot {
            config: ch,
            runtime,
            socket,
            vmm,
        };
        self.map().insert(id.clone(), Arc::new(Mutex::new(slot)));
        Ok(state)
    }

    async fn discover(&self) -> Result<Vec<(VmId, Option<VmmProcess>)>, HypervisorError> {
        let found = discovery::scan(&self.runtime_root).map_err(|e| {
            HypervisorError::Unavailable(format!(
                "cannot scan {}: {e}",
                self.runtime_root.display()
            ))
        })?;
        Ok(found.into_iter().map(|f| (f.id, f.process)).collect())
    }

    async fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        self.map().remove(id);
        discovery::destroy(&self.runtime_root, id, process.as_ref(), self.stop_grace)
            .await
            .map_err(|e| HypervisorError::Unavailable(format!("cannot remove orphan {id}: {e}")))
    }
}
