//! What makes one VMM different from another, and nothing else: the
//! [`Flavour`] trait. The supervision layer ([`super::handle`],
//! [`super::backend`]) owns everything about a VMM *process* (runtime
//! directory, spawn and readiness, reaping, identity, stop with grace,
//! respawn, orphans, version probe, KVM check, /proc statistics) and asks the
//! flavour only for its command line, its API calls, its config and state
//! mapping and a few capability facts. A new VMM is one new folder with one
//! `impl Flavour`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use crate::domain::snapshot::SnapshotKind;
use crate::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};
use crate::ports::{BackendKind, HypervisorError, NetworkStats, StorageStats, VmmEventSink};

use super::discovery;
use super::process::{ExitInfo, RuntimeDir};
use super::uds_http::UdsClient;

/// The console cap when none is configured: 16 MiB per VM.
pub const DEFAULT_CONSOLE_MAX_BYTES: u64 = 16 << 20;

/// What a hard stop does to the VMM process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardStop {
    /// The VMM stops the VM with a call and keeps running (Cloud Hypervisor's
    /// `vm.shutdown`, after which the VM is `Created` and bootable).
    KeepsProcess,
    /// The VMM has no stop: the process is killed and the VM is `Shutdown`
    /// until a boot starts a new process (Firecracker).
    EndsProcess,
}

/// How the VMM reboots a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reboot {
    /// With an API call ([`Call::Reboot`]); the process stays.
    InPlace,
    /// It cannot: VMCP stops the process (gracefully for at most `grace`
    /// unless forced), starts a new one with the same config and boots it.
    Respawn {
        /// The graceful part of a non-forced reboot.
        grace: Duration,
    },
}

/// The one-call operations on a running VMM; the state is read back after each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Start the configured VM.
    Boot,
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Reboot in place (only asked when [`Flavour::reboot`] is [`Reboot::InPlace`]).
    Reboot,
    /// Stop hard, keeping the process (only asked when [`Flavour::HARD_STOP`]
    /// is [`HardStop::KeepsProcess`]).
    HardStop,
}

/// The answer to a graceful-stop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poweroff {
    /// The guest was asked to power off; the caller waits for it.
    Requested,
    /// The guest cannot react now (paused, not booted, no such call): stop hard.
    Impossible,
}

/// One VMM's API socket and the pooled client to reach it.
#[derive(Debug, Clone, Copy)]
pub struct Api<'a> {
    /// The shared HTTP-over-Unix-socket client.
    pub http: &'a UdsClient,
    /// This VMM's API socket.
    pub socket: &'a Path,
}

/// What to execute for a new VMM process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The binary (the VMM, or a wrapper such as Firecracker's jailer).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// A socket VMCP binds and listens on before the spawn and hands to the
    /// VMM as its stdin (Cloud Hypervisor's `--api-socket fd=0`), if any.
    /// The VMM's API then answers a request sent right after the spawn as
    /// soon as it starts serving (the request waits in the backlog), where
    /// a VMM that binds its own socket is probed until it has.
    pub listen_on_stdin: Option<PathBuf>,
}

/// What a flavour reads from a running VMM for a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The state the VMM reports.
    pub state: VmState,
    /// Guest network counters.
    pub network: NetworkStats,
    /// Guest block counters.
    pub storage: StorageStats,
    /// Flavour-specific details for operators.
    pub backend_info: BTreeMap<String, String>,
    /// The VM's size as the VMM reports it, when it says.
    pub size: Option<VmSize>,
}

/// Settings every VMM process is supervised with, whatever the flavour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervision {
    /// The VMM binary (`--version` is asked of it).
    pub binary: PathBuf,
    /// Directory holding one runtime directory per VM.
    pub runtime_root: PathBuf,
    /// Bound on every API call.
    pub call_timeout: Duration,
    /// How long a new VMM may take to answer its readiness probe.
    pub ready_timeout: Duration,
    /// How long delete waits for a polite exit before SIGTERM, and for
    /// SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// The KVM device `check` opens read-write.
    pub kvm_device: PathBuf,
    /// Most bytes a VM's console file may hold before old output is
    /// dropped from its front (0: no cap).
    pub console_max_bytes: u64,
}

impl Supervision {
    /// Defaults for everything but the binary, the runtime root and the call timeout.
    pub fn new(
        binary: impl Into<PathBuf>,
        runtime_root: impl Into<PathBuf>,
        call_timeout: Duration,
    ) -> Self {
        Self {
            binary: binary.into(),
            runtime_root: runtime_root.into(),
            call_timeout,
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(5),
            kvm_device: PathBuf::from("/dev/kvm"),
            console_max_bytes: DEFAULT_CONSOLE_MAX_BYTES,
        }
    }
}

/// Everything a flavour's watcher needs about one VMM process.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The VM (for logs).
    pub vm_id: VmId,
    /// The process the watcher reports for (every event names it).
    pub pid: u32,
    /// Its API socket.
    pub socket: PathBuf,
    /// The VM's runtime directory.
    pub runtime: RuntimeDir,
    /// The shared API client.
    pub http: UdsClient,
    /// The VM owner's sink.
    pub events: VmmEventSink,
    /// Whether the process was just spawned by this VMCP (read its event
    /// stream from the start) or adopted (only what comes from now on).
    pub fresh: bool,
}

/// A watcher task's body; the supervision layer spawns it and ends it with
/// the process or the handle.
pub type Watcher = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A VMM backend's specifics. Methods that talk to a VMM get its [`Api`];
/// the state they read back is the VMM's own word.
pub trait Flavour: Send + Sync + 'static {
    /// Which VMM this is.
    const KIND: BackendKind;
    /// Whether a hard stop is a call that keeps the process or a kill.
    const HARD_STOP: HardStop;

    /// The flavour's per-VM state (its mapped config, paths, counters).
    type Vm: Send + Sync + 'static;

    /// How this VMM reboots.
    fn reboot(&self) -> Reboot;

    /// Rejects what this VMM cannot honour. No I/O.
    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError>;

    /// Checks beyond the version probe and the KVM device (e.g. a jailer).
    fn check(&self, s: &Supervision) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// The version as reported to callers, from the first line of `--version`.
    fn version(&self, first_line: &str) -> String;

    /// The per-VM state for `config` (already validated), without touching
    /// any process. `InvalidConfig` for what the VMM cannot take.
    fn prepare(
        &self,
        s: &Supervision,
        id: &VmId,
        config: &VmConfig,
        runtime: &RuntimeDir,
    ) -> Result<Self::Vm, HypervisorError>;

    /// Where a new process of this VM serves its API.
    fn socket(&self, vm: &Self::Vm, runtime: &RuntimeDir) -> PathBuf;

    /// The command line of a new process, with the files it needs in place
    /// (called before every spawn; `runtime` exists and holds no socket).
    fn launch(
        &self,
        s: &Supervision,
        vm: &mut Self::Vm,
        runtime: &RuntimeDir,
    ) -> Result<Launch, HypervisorError>;

    /// Whether live process `pid` is this VM's VMM (discovery trusts a pid
    /// file only then). By default: its command line names the runtime
    /// directory's API socket.
    fn is_vmm_of(&self, pid: u32, _id: &VmId, runtime: &RuntimeDir) -> bool {
        discovery::cmdline_names(pid, &runtime.api_socket())
    }

    /// The readiness probe: Ok once the API answers.
    fn ping(&self, api: Api<'_>) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Configures the VM in a fresh process, without booting it.
    fn configure(
        &self,
        api: Api<'_>,
        vm: &Self::Vm,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// The state of an adopted process, finishing a configuration that an
    /// interrupted create left undone when the VMM can tell.
    fn adopted_state(
        &self,
        api: Api<'_>,
        vm: &Self::Vm,
    ) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// The state the VMM reports.
    fn state(&self, api: Api<'_>) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// The state a successful `call` leaves the VM in, when the VMM's
    /// success answer says so by itself; the state is then not read back
    /// (a failed call is always read back). None: read it back.
    ///
    /// Both VMMs answer a boot or resume once the vCPUs run and a pause once
    /// they are paused (Cloud Hypervisor's `vm.boot`/`vm.resume`/`vm.pause`,
    /// Firecracker's `InstanceStart` and `PATCH /vm`); a reboot or hard stop
    /// is read back. A flavour whose VMM answers before the change overrides this.
    fn state_after(&self, call: Call) -> Option<VmState> {
        match call {
            Call::Boot | Call::Resume => Some(VmState::Running),
            Call::Pause => Some(VmState::Paused),
            Call::Reboot | Call::HardStop => None,
        }
    }

    /// The state a fresh process is in once `configure` (or, with
    /// `Some(resume)`, `restore`) succeeded, when that success says so;
    /// None: read it back. Both VMMs leave a configured VM created
    /// (`vm.create`; Firecracker's `Not started`) and a restored one paused,
    /// or running when resumed in (or after) the restore.
    fn state_after_start(&self, restored: Option<bool>) -> Option<VmState> {
        Some(match restored {
            None => VmState::Created,
            Some(true) => VmState::Running,
            Some(false) => VmState::Paused,
        })
    }

    /// Performs one call.
    fn call(
        &self,
        api: Api<'_>,
        call: Call,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Asks the guest to power off.
    fn request_poweroff(
        &self,
        api: Api<'_>,
    ) -> impl Future<Output = Result<Poweroff, HypervisorError>> + Send;

    /// Asks the VMM to exit by itself before delete signals it; true if it
    /// was asked (then delete waits the stop grace first).
    fn ask_to_exit(&self, api: Api<'_>) -> impl Future<Output = bool> + Send;

    /// State, counters and details of a running VMM.
    fn sample(
        &self,
        api: Api<'_>,
        vm: &mut Self::Vm,
    ) -> impl Future<Output = Result<Sampled, HypervisorError>> + Send;

    /// The file the VM's serial console writes to, from its config (None:
    /// the console is off). No I/O.
    fn console_file(&self, config: &VmConfig, runtime: &RuntimeDir) -> Option<PathBuf>;

    /// Whether this VMM can resize a running VM (`Unsupported` with the reason).
    fn can_resize(&self) -> Result<(), HypervisorError>;

    /// Resizes the running VM to `size` and answers the size the VMM reports
    /// afterwards; `vm` follows, so a process started later has that size.
    fn resize(
        &self,
        api: Api<'_>,
        vm: &mut Self::Vm,
        size: VmSize,
    ) -> impl Future<Output = Result<VmSize, HypervisorError>> + Send;

    /// Sends `data` to the console input of the VM's running VMM.
    fn write_console(
        &self,
        vm: &Self::Vm,
        runtime: &RuntimeDir,
        data: &[u8],
    ) -> impl Future<Output = Result<usize, HypervisorError>> + Send;

    /// Writes the paused VM's state and memory (all of it, or for a diff only
    /// the pages written since the previous snapshot) into the empty directory `dir`.
    fn snapshot(
        &self,
        api: Api<'_>,
        vm: &Self::Vm,
        dir: &Path,
        kind: SnapshotKind,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Restores the snapshot in `dir` into a fresh process, instead of
    /// configuring it, with `vm`'s console and taps; the VM runs afterwards
    /// when `resume` (in the same call where the VMM can), else is Paused.
    fn restore(
        &self,
        api: Api<'_>,
        vm: &Self::Vm,
        runtime: &RuntimeDir,
        dir: &Path,
        resume: bool,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Details about the VM that need no VMM call (console path, ids, jail).
    fn describe(&self, vm: &Self::Vm, runtime: &RuntimeDir, info: &mut BTreeMap<String, String>);

    /// A task that reports what the VMM announces on its own (None: the VMM
    /// announces nothing; exits are reported by the reaper regardless).
    fn watch(&self, _watch: Watch) -> Option<Watcher> {
        None
    }

    /// Removes this VM's files outside its runtime directory (e.g. a jail).
    fn remove_files(&self, _vm: &Self::Vm) -> Result<(), HypervisorError> {
        Ok(())
    }

    /// The same for a VM known only by its id (an orphan).
    fn remove_leftovers(&self, _s: &Supervision, _id: &VmId) -> Result<(), HypervisorError> {
        Ok(())
    }

    /// The state an unrequested exit leaves the VM in. Both VMMs here exit
    /// with status 0 only for the guest's own poweroff or reset; anything
    /// else (a signal, a non-zero status, or an unknown status of an adopted
    /// process) counts as a crash rather than risk hiding one.
    fn classify_exit(&self, exit: &ExitInfo) -> VmState {
        if exit.is_clean() {
            VmState::Shutdown
        } else {
            VmState::Failed
        }
    }
}
