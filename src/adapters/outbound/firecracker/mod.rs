//! The Firecracker backend: one supervised `firecracker` process per microVM,
//! driven with Firecracker's real semantics.
//!
//! Firecracker has no reboot and no shutdown state: a microVM is configured
//! before boot (`Not started`), started once by `InstanceStart`, paused and
//! resumed by `PATCH /vm`, and it ends when its process ends. So VMCP maps:
//!
//! - **create**: spawn `firecracker --api-sock <runtime>/api.sock --id <id>`
//!   (or the same under `jailer`), poll `GET /` until it answers, send the
//!   pre-boot configuration ([`config`]); Firecracker then reports
//!   `Not started`, which is VMCP's Created.
//! - **boot**: `InstanceStart`, then `GET /` (Running). When the process has
//!   ended (after a shutdown or a guest poweroff), boot respawns it,
//!   reconfigures it from the kept config and starts it.
//! - **shutdown**: graceful sends `SendCtrlAltDel` (after resuming a paused
//!   guest, which could not react otherwise) and waits up to the timeout for
//!   the process to exit, then kills it; force kills at once. Afterwards the VM
//!   is Shutdown: process gone, config kept. A guest without an i8042 driver
//!   ignores Ctrl-Alt-Del, so its graceful shutdown always ends in the kill.
//! - **reboot**: a cold restart done by VMCP, not by the guest: stop as
//!   above (a short graceful attempt unless forced), respawn, reconfigure,
//!   `InstanceStart`. The guest sees a fresh boot; the console file starts over.
//! - **delete**: kill, reap, remove the runtime directory (and the jail).
//!   Idempotent.
//! - **info**: `GET /` for the state, `GET /vm/config` for what Firecracker
//!   holds, `FlushMetrics` plus the metrics file for network and block
//!   counters, /proc for CPU and memory.
//!
//! Exits nobody asked for are reported by the shared supervisor's reaper.
//! Firecracker exits with status 0 only when the guest itself reset or powered
//! off the machine (KVM's reset/shutdown system event, or the i8042 reset
//! line); a crash is a non-zero status or a signal. So status 0 is reported as
//! Shutdown and everything else as Failed. An adopted process (started by an
//! earlier VMCP) is not our child, so its exit status is unknown; its exit is
//! reported as Failed rather than risk hiding a crash.
//!
//! Firecracker's own log goes to its stdout, which the shared supervisor
//! captures as the runtime directory's `vmm.log` and quotes in exit and
//! start-up errors. It runs with `--level Warning`: at Info it logs two lines
//! per API call, which periodic info polling would grow without bound.

pub mod client;
pub mod config;
pub mod jailer;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, OnceCell};

use self::client::{Action, FcClient, VmRunState};
use self::config::{ConsoleTarget, PreBoot, RuntimeFiles};
use self::jailer::{JAIL_CONSOLE, JAIL_METRICS, JAIL_SOCKET, Jail, JailerSettings};
use self::metrics::MetricsReader;
use crate::adapters::outbound::vmm::discovery;
use crate::adapters::outbound::vmm::process::{MAX_SOCKET_PATH_LEN, create_private_dir};
use crate::adapters::outbound::vmm::{
    ExitExpectation, ExitInfo, ExitReporter, RuntimeDir, SpawnSpec, Supervised, UdsClient,
};
use crate::domain::{ConfigError, VmConfig, VmId, VmState};
use crate::ports::{
    BackendCheck, BackendKind, EventSink, Hypervisor, HypervisorError, ShutdownMode, VmMetrics,
    VmmInfo, VmmProcess,
};

/// Firecracker's state before `InstanceStart`.
pub const STATE_NOT_STARTED: &str = "Not started";
/// The metrics file in a VM's runtime directory (outside the jailer).
const METRICS_FILE: &str = "metrics.json";
/// How long `--version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// How the Firecracker backend runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerSettings {
    /// The `firecracker` binary.
    pub binary: PathBuf,
    /// Run Firecracker under the jailer, when set.
    pub jailer: Option<JailerSettings>,
    /// Directory holding one runtime directory per VM.
    pub runtime_root: PathBuf,
    /// Timeout of every API call.
    pub call_timeout: Duration,
    /// How long a new process may take to answer `GET /`.
    pub ready_timeout: Duration,
    /// Graceful shutdown wait when the caller gives none.
    pub default_graceful_timeout: Duration,
    /// Graceful part of a non-forced reboot.
    pub reboot_grace: Duration,
    /// SIGTERM-to-SIGKILL grace of a non-forced delete.
    pub delete_grace: Duration,
}

impl FirecrackerSettings {
    /// Settings with defaults for everything but the binary and runtime root.
    pub fn new(binary: impl Into<PathBuf>, runtime_root: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            jailer: None,
            runtime_root: runtime_root.into(),
            call_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(10),
            default_graceful_timeout: Duration::from_secs(10),
            reboot_grace: Duration::from_secs(3),
            delete_grace: Duration::from_secs(2),
        }
    }
}

/// One microVM's Firecracker process and what is needed to restart it.
struct FcVm {
    id: VmId,
    instance_id: String,
    config: VmConfig,
    runtime: RuntimeDir,
    jail: Option<Jail>,
    client: FcClient,
    process: Option<Supervised>,
    metrics: MetricsReader,
    /// The process ended because VMCP stopped it (shutdown), not on its own.
    stopped_by_vmcp: bool,
}

impl FcVm {
    fn live(&self) -> Option<&Supervised> {
        self.process.as_ref().filter(|p| p.exited().is_none())
    }

    fn metrics_path(&self) -> PathBuf {
        match &self.jail {
            Some(j) => j.host_path(JAIL_METRICS),
            None => self.runtime.path().join(METRICS_FILE),
        }
    }

    /// State and reason when no process runs.
    fn gone_state(&self) -> (VmState, String) {
        if self.stopped_by_vmcp {
            return (VmState::Shutdown, "stopped by VMCP".to_owned());
        }
        match self.process.as_ref().and_then(Supervised::exited) {
            Some(info) if exited_cleanly(&info) => (
                VmState::Shutdown,
                format!(
                    "the guest reset or powered off, which ends Firecracker ({})",
                    info.describe_status()
                ),
            ),
            Some(info) => (VmState::Failed, info.reason()),
            None => (VmState::Shutdown, "no Firecracker process".to_owned()),
        }
    }
}

/// The Firecracker backend.
pub struct Firecracker {
    settings: FirecrackerSettings,
    http: UdsClient,
    events: EventSink,
    vms: Mutex<HashMap<VmId, Arc<AsyncMutex<FcVm>>>>,
    version: OnceCell<String>,
}

impl std::fmt::Debug for Firecracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firecracker")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether a Firecracker exit was the guest's own reset or poweroff (status
/// 0; unknown for an adopted process, which therefore counts as a crash).
fn exited_cleanly(info: &ExitInfo) -> bool {
    info.is_clean()
}

/// Maps Firecracker's `GET /` state to VMCP's.
pub fn map_state(state: &str) -> Result<VmState, HypervisorError> {
    match state {
        STATE_NOT_STARTED => Ok(VmState::Created),
        "Running" => Ok(VmState::Running),
        "Paused" => Ok(VmState::Paused),
        other => Err(HypervisorError::Protocol(format!(
            "unknown Firecracker state {other:?}"
        ))),
    }
}

impl Firecracker {
    /// A backend with `settings`, reporting unexpected exits to `events`.
    pub fn new(settings: FirecrackerSettings, events: EventSink) -> Self {
        let http = UdsClient::new(settings.call_timeout);
        Self {
            settings,
            http,
            events,
            vms: Mutex::new(HashMap::new()),
            version: OnceCell::new(),
        }
    }

    /// The settings in use.
    pub fn settings(&self) -> &FirecrackerSettings {
        &self.settings
    }

    fn vm(&self, id: &VmId) -> Result<Arc<AsyncMutex<FcVm>>, HypervisorError> {
        self.lock_vms()
            .get(id)
            .cloned()
            .ok_or_else(|| HypervisorError::NotFound(id.to_string()))
    }

    fn lock_vms(&self) -> std::sync::MutexGuard<'_, HashMap<VmId, Arc<AsyncMutex<FcVm>>>> {
        // A poisoned map only means another call panicked mid-insert; the map
        // itself is still consistent (inserts and removes are single calls).
        self.vms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn reporter(&self, id: &VmId) -> ExitReporter {
        ExitReporter {
            vm_id: id.clone(),
            events: self.events.clone(),
            classify: Arc::new(|info: &ExitInfo| {
                if exited_cleanly(info) {
                    VmState::Shutdown
                } else {
                    VmState::Failed
                }
            }),
        }
    }

    /// The firecracker binary's version, asked once.
    async fn version(&self) -> Result<String, HypervisorError> {
        self.version
            .get_or_try_init(|| run_version(&self.settings.binary))
            .await
            .cloned()
    }

    fn all_checks(&self, config: &VmConfig) -> Result<(), ConfigError> {
        config::check(config)?;
        if self.settings.jailer.is_some() {
            config::check_jailed(config)?;
        }
        Ok(())
    }

    /// Spawns Firecracker for `vm` and sends the pre-boot configuration.
    /// On failure nothing runs and the jail is gone; the runtime directory is
    /// left to the caller.
    async fn launch(&self, vm: &mut FcVm) -> Result<(), HypervisorError> {
        vm.stopped_by_vmcp = false;
        vm.metrics = MetricsReader::new();
        let runtime_files = match &self.settings.jailer {
            None => RuntimeFiles {
                metrics_path: path_string(&vm.runtime.path().join(METRICS_FILE)),
                console_path: path_string(&vm.runtime.serial_file()),
                discard_path: "/dev/null".into(),
            },
            Some(_) => Jail::runtime_files(),
        };
        let mut pre = config::map(&vm.config, &runtime_files)?;
        create_private_dir(vm.runtime.path())?;
        let fc_args: Vec<OsString> = vec![
            "--api-sock".into(),
            match &vm.jail {
                Some(_) => OsString::from(JAIL_SOCKET),
                None => vm.runtime.api_socket().into(),
            },
            "--level".into(),
            "Warning".into(),
            "--show-level".into(),
        ];
        let spec = match (&self.settings.jailer, &vm.jail) {
            (Some(js), Some(jail)) => {
                let exec = canonical(&self.settings.binary)?;
                remove_tree(&jail.instance_dir)?;
                let staged = jail.stage(&mut pre);
                jailer::place(&staged).map_err(|e| {
                    let _ = std::fs::remove_dir_all(&jail.instance_dir);
                    HypervisorError::SpawnFailed(format!("cannot prepare the jail: {e}"))
                })?;
                let console_link = vm.runtime.serial_file();
                remove_file(&console_link)?;
                if pre.console == ConsoleTarget::RuntimeFile {
                    std::os::unix::fs::symlink(jail.host_path(JAIL_CONSOLE), &console_link)
                        .map_err(|e| {
                            io_unavailable("cannot link console file", &console_link, e)
                        })?;
                }
                SpawnSpec {
                    program: js.jailer_binary.clone(),
                    args: jailer::jailer_args(js, &exec, &vm.instance_id, &fc_args),
                    ready_timeout: self.settings.ready_timeout,
                }
            }
            _ => {
                remove_file(&vm.metrics_path())?;
                truncate_console(&pre)?;
                let mut args = fc_args;
                args.extend(["--id".into(), vm.instance_id.clone().into()]);
                SpawnSpec {
                    program: self.settings.binary.clone(),
                    args,
                    ready_timeout: self.settings.ready_timeout,
                }
            }
        };
        let client = vm.client.clone();
        let spawned = Supervised::spawn(&spec, vm.runtime.clone(), self.reporter(&vm.id), || {
            let c = client.clone();
            async move { c.describe().await.map(|_| ()) }
        })
        .await;
        let process = match spawned {
            Ok(p) => p,
            Err(e) => {
                if let Some(j) = &vm.jail {
                    let _ = std::fs::remove_dir_all(&j.instance_dir);
                }
                return Err(e.into());
            }
        };
        vm.process = Some(process);
        if let Err(e) = self.configure(vm, &pre).await {
            let e = self.explain(vm, e).await;
            if let Some(p) = &vm.process {
                p.terminate(Duration::ZERO).await;
            }
            vm.process = None;
            if let Some(j) = &vm.jail {
                let _ = std::fs::remove_dir_all(&j.instance_dir);
            }
            return Err(e);
        }
        Ok(())
    }

    async fn configure(&self, vm: &FcVm, pre: &PreBoot) -> Result<(), HypervisorError> {
        let c = &vm.client;
        c.put_metrics(&pre.metrics).await?;
        c.put_serial(&pre.serial).await?;
        c.put_machine_config(&pre.machine).await?;
        c.put_boot_source(&pre.boot_source).await?;
        for (i, d) in pre.drives.iter().enumerate() {
            c.put_drive(d, &format!("config.storage[{i}]")).await?;
        }
        for (i, n) in pre.network_interfaces.iter().enumerate() {
            c.put_network_interface(n, &format!("config.network[{i}]"))
                .await?;
        }
        Ok(())
    }

    /// Adds the exit reason to a failed call when the process ended meanwhile.
    async fn explain(&self, vm: &FcVm, e: HypervisorError) -> HypervisorError {
        let transport = matches!(
            e,
            HypervisorError::Unavailable(_) | HypervisorError::Timeout { .. }
        );
        let Some(p) = vm.process.as_ref().filter(|_| transport) else {
            return e;
        };
        // A VMM that dropped the connection is usually already being reaped.
        match p.wait_exit(Duration::from_millis(200)).await {
            Some(info) => HypervisorError::Unavailable(format!(
                "{e}; the Firecracker process ended: {}",
                info.reason()
            )),
            None => e,
        }
    }

    /// `InstanceStart` on a configured process, then the state read back.
    async fn start(&self, vm: &FcVm) -> Result<VmState, HypervisorError> {
        let result = async {
            vm.client.action(Action::InstanceStart).await?;
            map_state(&vm.client.describe().await?.state)
        }
        .await;
        match result {
            Ok(s) => Ok(s),
            Err(e) => Err(self.explain(vm, e).await),
        }
    }

    /// Stops the process: Ctrl-Alt-Del and a wait of `grace` unless `force`
    /// or `grace` is zero, then SIGKILL. Returns Failed if it crashed meanwhile.
    async fn stop(&self, vm: &mut FcVm, force: bool, grace: Duration) -> VmState {
        let Some(p) = vm.live() else {
            return vm.gone_state().0;
        };
        if !force && !grace.is_zero() {
            let started = match vm.client.describe().await {
                Ok(i) => i.state != STATE_NOT_STARTED,
                Err(_) => false,
            };
            if started {
                p.expect_exit(ExitExpectation::CleanOnly);
                // A paused guest cannot react to the key press.
                let _ = vm.client.patch_vm(VmRunState::Resumed).await;
                match vm.client.action(Action::SendCtrlAltDel).await {
                    Ok(()) => {
                        if let Some(info) = p.wait_exit(grace).await
                            && !exited_cleanly(&info)
                        {
                            return VmState::Failed;
                        }
                    }
                    Err(e) => {
                        tracing::info!(vm_id = %vm.id, error = %e, "SendCtrlAltDel failed; killing");
                    }
                }
            }
        }
        p.terminate(Duration::ZERO).await;
        vm.stopped_by_vmcp = true;
        if vm.jail.is_none() {
            // Firecracker leaves its socket behind when killed.
            let _ = vm.runtime.remove_stale_socket();
        }
        VmState::Shutdown
    }

    async fn do_info(&self, vm: &mut FcVm) -> Result<VmmInfo, HypervisorError> {
        let mut backend_info = BTreeMap::from([
            (
                "backend".to_owned(),
                BackendKind::Firecracker.as_str().to_owned(),
            ),
            ("socket".to_owned(), path_string(vm.client.socket())),
            ("runtime_dir".to_owned(), path_string(vm.runtime.path())),
            ("log".to_owned(), path_string(&vm.runtime.log_file())),
            ("instance_id".to_owned(), vm.instance_id.clone()),
        ]);
        match self.version().await {
            Ok(v) => backend_info.insert("vmm_version".into(), v),
            Err(e) => backend_info.insert("vmm_version_error".into(), e.to_string()),
        };
        if let Some(j) = &vm.jail {
            backend_info.insert("jail_root".into(), path_string(&j.root));
        }
        match config::console_path(&vm.config, &vm.runtime.serial_file()) {
            Some(p) => backend_info.insert("console".into(), path_string(&p)),
            None => None,
        };
        let mut out = VmmInfo::default();
        if let Some(p) = vm.live() {
            backend_info.insert("pid".into(), p.pid().to_string());
            let described = vm.client.describe().await;
            match described {
                Ok(i) => {
                    let state = map_state(&i.state)?;
                    out.state = Some(state);
                    if matches!(state, VmState::Running | VmState::Paused)
                        && let Err(e) = vm.client.action(Action::FlushMetrics).await
                    {
                        tracing::warn!(vm_id = %vm.id, error = %e, "FlushMetrics failed");
                    }
                    match vm.client.vm_config().await {
                        Ok(v) => backend_info.insert("vm_config".into(), v.to_string()),
                        Err(e) => backend_info.insert("vm_config_error".into(), e.to_string()),
                    };
                    if let Ok(stats) = p.stats() {
                        out.metrics.cpu_usage_percent = stats.cpu_percent;
                        out.metrics.memory_usage_bytes =
                            i64::try_from(stats.rss_bytes).unwrap_or(i64::MAX);
                        out.metrics.uptime_seconds =
                            i64::try_from(stats.uptime.as_secs()).unwrap_or(i64::MAX);
                    }
                }
                Err(e) => {
                    let e = self.explain(vm, e).await;
                    if vm.live().is_some() {
                        return Err(e);
                    }
                }
            }
        }
        if vm.live().is_none() {
            let (state, reason) = vm.gone_state();
            out.state = Some(state);
            out.reason = reason;
        }
        if let Err(e) = vm.metrics.read_new(&vm.metrics_path()) {
            tracing::warn!(vm_id = %vm.id, error = %e, "cannot read the metrics file");
        }
        out.metrics = VmMetrics {
            network: vm.metrics.network(),
            storage: vm.metrics.storage(),
            ..out.metrics
        };
        out.backend_info = backend_info;
        Ok(out)
    }

    fn new_vm(
        &self,
        id: &VmId,
        config: &VmConfig,
        socket: Option<PathBuf>,
    ) -> Result<FcVm, HypervisorError> {
        let instance_id = config::instance_id(id);
        let runtime = RuntimeDir::new(&self.settings.runtime_root, id);
        let jail = match &self.settings.jailer {
            None => None,
            Some(js) => {
                let base = canonical(&js.chroot_base)?;
                let exec = canonical(&self.settings.binary)?;
                Some(Jail::layout(&base, &exec, &instance_id).ok_or_else(|| {
                    HypervisorError::Unavailable(format!(
                        "{} has no file name",
                        self.settings.binary.display()
                    ))
                })?)
            }
        };
        let socket = match (socket, &jail) {
            (Some(s), _) => s,
            (None, Some(j)) => j.host_path(JAIL_SOCKET),
            (None, None) => runtime.api_socket(),
        };
        if socket.as_os_str().len() > MAX_SOCKET_PATH_LEN {
            return Err(HypervisorError::SpawnFailed(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter runtime or chroot base directory",
                socket.display()
            )));
        }
        Ok(FcVm {
            id: id.clone(),
            instance_id,
            config: config.clone(),
            runtime,
            jail,
            client: FcClient::new(self.http.clone(), socket),
            process: None,
            metrics: MetricsReader::new(),
            stopped_by_vmcp: false,
        })
    }

    /// Removes the runtime directory and jail of a VM this backend does not know.
    fn remove_leftovers(&self, id: &VmId) -> Result<(), HypervisorError> {
        if let Some(js) = &self.settings.jailer {
            let base =
                std::fs::canonicalize(&js.chroot_base).unwrap_or_else(|_| js.chroot_base.clone());
            let exec = std::fs::canonicalize(&self.settings.binary)
                .unwrap_or_else(|_| self.settings.binary.clone());
            if let Some(j) = Jail::layout(&base, &exec, &config::instance_id(id)) {
                remove_tree(&j.instance_dir)?;
            }
        }
        RuntimeDir::new(&self.settings.runtime_root, id)
            .remove()
            .map_err(HypervisorError::from)
    }

    /// Removes what a VM leaves on disk.
    fn remove_files(&self, vm: &FcVm) -> Result<(), HypervisorError> {
        if let Some(j) = &vm.jail {
            remove_tree(&j.instance_dir)?;
        }
        vm.runtime.remove().map_err(HypervisorError::from)
    }
}

impl Hypervisor for Firecracker {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        let version = self.version().await?;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| HypervisorError::Unavailable(format!("cannot open /dev/kvm: {e}")))?;
        if let Some(js) = &self.settings.jailer {
            run_version(&js.jailer_binary).await?;
            match jailer::needs_loader(&self.settings.binary) {
                Ok(false) => {}
                Ok(true) => {
                    return Err(HypervisorError::Unavailable(format!(
                        "{} is dynamically linked; the jailer copies only the binary into its chroot, so jailer mode needs a statically linked (musl) firecracker",
                        self.settings.binary.display()
                    )));
                }
                Err(e) => {
                    return Err(io_unavailable("cannot inspect", &self.settings.binary, e));
                }
            }
            if !js.chroot_base.is_dir() {
                return Err(HypervisorError::Unavailable(format!(
                    "jailer chroot base {} is not a directory",
                    js.chroot_base.display()
                )));
            }
        }
        Ok(BackendCheck { version })
    }

    fn validate(&self, config: &VmConfig) -> Result<(), ConfigError> {
        self.all_checks(config)
    }

    async fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
    ) -> Result<(VmState, VmmProcess), HypervisorError> {
        self.all_checks(config)?;
        if self.lock_vms().contains_key(id) {
            return Err(HypervisorError::InvalidState(format!(
                "vm {id} already has a Firecracker process"
            )));
        }
        let mut vm = self.new_vm(id, config, None)?;
        if vm.jail.is_some() {
            let taken = self
                .lock_vms()
                .keys()
                .any(|other| other != id && config::instance_id(other) == vm.instance_id);
            if taken {
                return Err(HypervisorError::SpawnFailed(format!(
                    "jail id {} is already used by another VM",
                    vm.instance_id
                )));
            }
        }
        let created = async {
            self.launch(&mut vm).await?;
            map_state(&vm.client.describe().await?.state)
        }
        .await;
        let state = match created {
            Ok(s) => s,
            Err(e) => {
                let e = self.explain(&vm, e).await;
                if let Some(p) = &vm.process {
                    p.terminate(Duration::ZERO).await;
                }
                let _ = self.remove_files(&vm);
                return Err(e);
            }
        };
        let process = vm.process.as_ref().map(|p| VmmProcess {
            pid: p.pid(),
            start_time: p.start_time(),
            socket_path: path_string(vm.client.socket()),
        });
        let process = process.ok_or_else(|| {
            HypervisorError::Protocol("launch succeeded without a process".into())
        })?;
        self.lock_vms()
            .insert(id.clone(), Arc::new(AsyncMutex::new(vm)));
        Ok((state, process))
    }

    async fn boot(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        let vm = self.vm(id)?;
        let mut vm = vm.lock().await;
        if vm.live().is_none() {
            self.launch(&mut vm).await?;
        }
        self.start(&vm).await
    }

    async fn shutdown(&self, id: &VmId, mode: ShutdownMode) -> Result<VmState, HypervisorError> {
        let vm = self.vm(id)?;
        let mut vm = vm.lock().await;
        let grace = if mode.graceful_timeout.is_zero() {
            self.settings.default_graceful_timeout
        } else {
            mode.graceful_timeout
        };
        Ok(self.stop(&mut vm, mode.force, grace).await)
    }

    async fn pause(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        self.patch(id, VmRunState::Paused).await
    }

    async fn resume(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        self.patch(id, VmRunState::Resumed).await
    }

    async fn reboot(&self, id: &VmId, force: bool) -> Result<VmState, HypervisorError> {
        let vm = self.vm(id)?;
        let mut vm = vm.lock().await;
        if vm.live().is_none() {
            return Err(HypervisorError::InvalidState(format!(
                "cannot reboot: the Firecracker process has ended ({})",
                vm.gone_state().1
            )));
        }
        let stopped = self.stop(&mut vm, force, self.settings.reboot_grace).await;
        if stopped == VmState::Failed {
            return Ok(VmState::Failed);
        }
        self.launch(&mut vm).await?;
        self.start(&vm).await
    }

    async fn delete(&self, id: &VmId, force: bool) -> Result<(), HypervisorError> {
        let entry = self.lock_vms().remove(id);
        let Some(entry) = entry else {
            // Unknown here (or already deleted): still remove leftovers on disk.
            return self.remove_leftovers(id);
        };
        let vm = entry.lock().await;
        if let Some(p) = &vm.process {
            let grace = if force {
                Duration::ZERO
            } else {
                self.settings.delete_grace
            };
            p.terminate(grace).await;
        }
        self.remove_files(&vm)
    }

    async fn info(&self, id: &VmId) -> Result<VmmInfo, HypervisorError> {
        let vm = self.vm(id)?;
        let mut vm = vm.lock().await;
        self.do_info(&mut vm).await
    }

    async fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
    ) -> Result<VmState, HypervisorError> {
        self.all_checks(config)?;
        let Some(process) = process else {
            // A stopped microVM has no process: register its config so boot respawns it.
            let vm = self.new_vm(id, config, None)?;
            self.lock_vms()
                .insert(id.clone(), Arc::new(AsyncMutex::new(vm)));
            return Ok(VmState::Shutdown);
        };
        let mut vm = self.new_vm(id, config, Some(PathBuf::from(&process.socket_path)))?;
        let adopted = Supervised::adopt(
            process.pid,
            process.start_time,
            self.settings.binary.clone(),
            vm.runtime.clone(),
            self.reporter(id),
        )?;
        vm.process = Some(adopted);
        let described = vm.client.describe().await;
        let entry = Arc::new(AsyncMutex::new(vm));
        // Kept even when the socket does not answer, so delete can kill it.
        self.lock_vms().insert(id.clone(), entry.clone());
        let vm = entry.lock().await;
        match described {
            Ok(i) => map_state(&i.state),
            Err(e) => Err(self.explain(&vm, e).await),
        }
    }

    async fn discover(&self) -> Result<Vec<(VmId, Option<VmmProcess>)>, HypervisorError> {
        let root = &self.settings.runtime_root;
        let found = discovery::scan(root).map_err(|e| {
            HypervisorError::Unavailable(format!("cannot scan {}: {e}", root.display()))
        })?;
        Ok(found.into_iter().map(|f| (f.id, f.process)).collect())
    }

    async fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        self.lock_vms().remove(id);
        discovery::destroy(
            &self.settings.runtime_root,
            id,
            process.as_ref(),
            self.settings.delete_grace,
        )
        .await
        .map_err(|e| HypervisorError::Unavailable(format!("cannot remove orphan {id}: {e}")))
    }
}

impl Firecracker {
    async fn patch(&self, id: &VmId, to: VmRunState) -> Result<VmState, HypervisorError> {
        let vm = self.vm(id)?;
        let vm = vm.lock().await;
        if vm.live().is_none() {
            return Err(HypervisorError::InvalidState(format!(
                "the Firecracker process has ended ({})",
                vm.gone_state().1
            )));
        }
        let result = async {
            vm.client.patch_vm(to).await?;
            map_state(&vm.client.describe().await?.state)
        }
        .await;
        match result {
            Ok(s) => Ok(s),
            Err(e) => Err(self.explain(&vm, e).await),
        }
    }
}

/// Runs `binary --version` and returns its first line (`Firecracker v1.16.1`).
async fn run_version(binary: &Path) -> Result<String, HypervisorError> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, run)
        .await
        .map_err(|_| HypervisorError::Timeout {
            operation: format!("{} --version", binary.display()),
            after: VERSION_TIMEOUT,
        })?
        .map_err(|e| {
            HypervisorError::Unavailable(format!("cannot run {}: {e}", binary.display()))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if !out.status.success() || line.is_empty() {
        return Err(HypervisorError::Unavailable(format!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(line.to_owned())
}

fn truncate_console(pre: &PreBoot) -> Result<(), HypervisorError> {
    // Firecracker opens the console without O_APPEND or O_TRUNC, so output of
    // an earlier boot would be overwritten in place; start each boot empty.
    if pre.console == ConsoleTarget::Discard {
        return Ok(());
    }
    let path = Path::new(&pre.serial.serial_out_path);
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map(drop)
        .map_err(|e| io_unavailable("cannot prepare console file", path, e))
}

fn canonical(p: &Path) -> Result<PathBuf, HypervisorError> {
    std::fs::canonicalize(p).map_err(|e| io_unavailable("cannot resolve", p, e))
}

fn remove_file(p: &Path) -> Result<(), HypervisorError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_unavailable("cannot remove", p, e)),
    }
}

fn remove_tree(p: &Path) -> Result<(), HypervisorError> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_unavailable("cannot remove", p, e)),
    }
}

fn io_unavailable(what: &str, p: &Path, e: std::io::Error) -> HypervisorError {
    HypervisorError::Unavailable(format!("{what} {}: {e}", p.display()))
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_states_map_to_vmcp_states() {
        assert_eq!(map_state("Not started"), Ok(VmState::Created));
        assert_eq!(map_state("Running"), Ok(VmState::Running));
        assert_eq!(map_state("Paused"), Ok(VmState::Paused));
        // The seed's mistake: Firecracker never says "NotStarted".
        assert!(matches!(
            map_state("NotStarted"),
            Err(HypervisorError::Protocol(_))
        ));
    }

    #[test]
    fn only_a_clean_exit_is_the_guests_own_shutdown() {
        use std::os::unix::process::ExitStatusExt;
        let exit = |raw: i32| ExitInfo {
            status: Some(std::process::ExitStatus::from_raw(raw)),
            log_tail: String::new(),
        };
        assert!(exited_cleanly(&exit(0)));
        assert!(!exited_cleanly(&exit(1 << 8)), "exit status 1");
        assert!(!exited_cleanly(&exit(9)), "SIGKILL");
        assert!(
            !exited_cleanly(&exit(15)),
            "SIGTERM (Firecracker does not catch it)"
        );
        let adopted = ExitInfo {
            status: None,
            log_tail: "anything".into(),
        };
        assert!(
            !exited_cleanly(&adopted),
            "unknown status counts as a crash"
        );
    }
}
