//! The outbound port to a VMM backend. One VMM process per VM.
//!
//! [`Hypervisor::create`] and [`Hypervisor::adopt`] hand back a per-VM
//! handle ([`VmmHandle`]) that the VM's owner task owns; the backend keeps no
//! registry of VMs. Every operation on a handle answers with what the VMM
//! reported afterwards (read back, never assumed) *and* the identity of the
//! VMM process that now serves the VM, so that when an operation replaces
//! the process (a respawn to boot a powered-off Cloud Hypervisor VM, a
//! Firecracker reboot) the owner records the new pid in the same step as
//! the new state. What a VMM does on its own (an exit, a pause made by
//! another client on its socket) reaches the owner through the
//! [`VmmEventSink`] given at create/adopt.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};

/// Which VMM a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Cloud Hypervisor.
    CloudHypervisor,
    /// Firecracker.
    Firecracker,
}

impl BackendKind {
    /// Name as used in configuration and telemetry (`cloudhypervisor`, `firecracker`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::CloudHypervisor => "cloudhypervisor",
            BackendKind::Firecracker => "firecracker",
        }
    }
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownMode {
    /// Skip the graceful attempt.
    pub force: bool,
    /// How long the graceful attempt may take before a hard stop (decided by the core).
    pub graceful_timeout: Duration,
}

/// The result of a backend health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCheck {
    /// The VMM's version string, as its binary reports it.
    pub version: String,
}

/// Counters for the guest's network devices, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NetworkStats {
    /// Bytes received by the guest.
    pub bytes_received: i64,
    /// Bytes sent by the guest.
    pub bytes_transmitted: i64,
    /// Packets received.
    pub packets_received: i64,
    /// Packets sent.
    pub packets_transmitted: i64,
}

/// Counters for the guest's block devices, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StorageStats {
    /// Bytes read.
    pub bytes_read: i64,
    /// Bytes written.
    pub bytes_written: i64,
    /// Read requests.
    pub read_operations: i64,
    /// Write requests.
    pub write_operations: i64,
}

/// Resource usage of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VmMetrics {
    /// CPU used by the VMM process since it started, percent of one core.
    pub cpu_usage_percent: f64,
    /// Resident memory of the VMM process, bytes.
    pub memory_usage_bytes: i64,
    /// Network counters.
    pub network: NetworkStats,
    /// Storage counters.
    pub storage: StorageStats,
    /// Seconds since the VMM process started.
    pub uptime_seconds: i64,
}

/// A full sample of one VM: what [`VmmHandle::sample`] answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VmmInfo {
    /// State as reported.
    pub state: Option<VmState>,
    /// Why (e.g. exit status when the VMM is gone).
    pub reason: String,
    /// Metrics.
    pub metrics: VmMetrics,
    /// Backend details for operators: VMM version, pid, socket path.
    pub backend_info: BTreeMap<String, String>,
    /// The VMM process serving the VM now (None when none runs).
    pub process: Option<VmmProcess>,
    /// The VM's size as the VMM reports it (None when it does not say).
    pub size: Option<VmSize>,
}

/// A piece of a VM's console output, read by [`Hypervisor::read_console`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsoleChunk {
    /// The offset of `data`'s first byte: above the requested offset when
    /// the bytes in between were dropped by the console cap.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// Where the console ends now (`offset + data.len()` unless capped by
    /// the read's size): below the requested offset when the console
    /// started over.
    pub next_offset: u64,
}

/// The identity of a VMM process, so a restarted VMCP can tell it is the same one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmmProcess {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start_time: u64,
    /// API socket path.
    pub socket_path: String,
}

/// What the VMM reported after an operation, and which process serves the VM now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    /// The state the VMM reported after the operation.
    pub state: VmState,
    /// Why (may be empty), e.g. "stopped by VMCP" when no process runs.
    pub reason: String,
    /// The VMM process serving the VM after the operation: a new identity when
    /// the operation replaced the process, None when no process runs.
    pub process: Option<VmmProcess>,
}

/// Something a VMM did on its own, reported by the supervision layer to the
/// VM's owner. Each event names the pid it is about, so an owner can drop
/// news about a process it has already replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// The VMM process ended without VMCP asking it to.
    Exited {
        /// The process that ended.
        pid: u32,
        /// Shutdown for a guest-initiated poweroff, Failed for a crash.
        state: VmState,
        /// Exit status or signal, and the last lines of the VMM's log.
        reason: String,
    },
    /// The VMM announced a state change (Cloud Hypervisor's event monitor),
    /// also for changes another client made directly on its socket.
    StateChanged {
        /// The process that reported it.
        pid: u32,
        /// The state the VM is in after the event.
        state: VmState,
        /// The VMM's own words (e.g. "vm/paused").
        reason: String,
    },
}

/// Where a VM's handle sends [`VmmEvent`]s: its owner task.
pub type VmmEventSink = tokio::sync::mpsc::UnboundedSender<VmmEvent>;

/// The underlying cause of a [`HypervisorError`], kept for logs and `source()` chains.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a hypervisor call failed. Variants say what the caller can do about
/// it; the cause (an I/O error, an HTTP error, a process error) is kept as
/// the `source`, never flattened into the message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HypervisorError {
    /// The backend cannot honour a field of the config.
    #[error(transparent)]
    InvalidConfig(#[from] VmConfigError),
    /// The VMM refused because of the VM's state (CH answers 500 with an error body,
    /// Firecracker 400 with a fault message).
    #[error("the VMM refused: {0}")]
    InvalidState(String),
    /// The VMM (or the backend binary, or KVM) cannot be reached or used.
    #[error("{message}")]
    Unavailable {
        /// What could not be reached, in words.
        message: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<Cause>,
    },
    /// The VMM did not answer in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was asked.
        operation: String,
        /// How long we waited.
        after: Duration,
    },
    /// The VMM process this handle or record names is gone (or was never there).
    #[error("VMM is gone: {0}")]
    Gone(String),
    /// The VMM process could not be started.
    #[error("VMM failed to start: {message}")]
    SpawnFailed {
        /// What happened, with the VMM's log tail.
        message: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<Cause>,
    },
    /// This backend cannot perform the operation at all.
    #[error("{0}")]
    Unsupported(String),
    /// Host resource trouble (disk full, too many processes).
    #[error("{message}")]
    ResourceExhausted {
        /// What ran out.
        message: String,
        /// The underlying failure, if any.
        #[source]
        source: Option<Cause>,
    },
    /// The VMM answered something VMCP does not understand (a bug on one side).
    #[error("unexpected answer from the VMM: {0}")]
    Protocol(String),
}

impl HypervisorError {
    /// `Unavailable` with a message and no further cause.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: None,
        }
    }

    /// `Unavailable` with a message and its cause.
    pub fn unavailable_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// `SpawnFailed` with a message and no further cause.
    pub fn spawn_failed(message: impl Into<String>) -> Self {
        Self::SpawnFailed {
            message: message.into(),
            source: None,
        }
    }

    /// `ResourceExhausted` with a message and no further cause.
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::ResourceExhausted {
            message: message.into(),
            source: None,
        }
    }

    /// A short, stable name of the variant, for metrics labels and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            HypervisorError::InvalidConfig(_) => "invalid_config",
            HypervisorError::InvalidState(_) => "invalid_state",
            HypervisorError::Unavailable { .. } => "unavailable",
            HypervisorError::Timeout { .. } => "timeout",
            HypervisorError::Gone(_) => "gone",
            HypervisorError::SpawnFailed { .. } => "spawn_failed",
            HypervisorError::Unsupported(_) => "unsupported",
            HypervisorError::ResourceExhausted { .. } => "resource_exhausted",
            HypervisorError::Protocol(_) => "protocol",
        }
    }
}

/// A VM found on the host by [`Hypervisor::discover`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// The VM the runtime directory is named after.
    pub id: VmId,
    /// Its live VMM process, if one still runs (verified by pid, start time and command line).
    pub process: Option<VmmProcess>,
}

/// One VM's VMM, owned by the VM's owner task. Calls on one handle are
/// serialized by `&mut self`; handles of different VMs are independent.
///
/// Every operation MUST answer with the state the VMM reports afterwards and
/// the process that serves the VM then ([`Reported::process`]). When an
/// operation starts a new process (respawn), the handle MUST end the old one
/// first and report the new identity. On failure the handle MUST still know
/// its current process ([`VmmHandle::process`]).
#[cfg_attr(test, mockall::automock)]
pub trait VmmHandle: Send + 'static {
    /// The VMM process serving the VM now, if one runs.
    fn process(&self) -> Option<VmmProcess>;

    /// Boots the VM, starting a fresh VMM with the stored config first when
    /// none runs (a powered-off or stopped VM). MUST return `InvalidState` if
    /// the VMM refuses, `SpawnFailed` if a new VMM does not come up.
    fn boot(&mut self) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Stops the VM, gracefully first unless forced, hard after the timeout.
    fn shutdown(
        &mut self,
        mode: ShutdownMode,
    ) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Pauses the VM.
    fn pause(&mut self) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Resumes the VM.
    fn resume(&mut self) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Reboots the VM (a backend without a reboot restarts its VMM: a new process).
    fn reboot(
        &mut self,
        force: bool,
    ) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Ends the VMM (killed after a grace period, or at once when `force`),
    /// reaps it and removes the VM's runtime files. MUST succeed when the VMM
    /// is already gone (idempotent) and MUST NOT touch any other process.
    fn delete(&mut self, force: bool) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Resizes the running VM to `size` (vCPU and memory hot-plug) and
    /// answers with the state and the size the VMM reports afterwards; the
    /// handle's config follows, so a VMM it starts later has that size.
    /// `Unsupported` naming the backend when it cannot resize at all,
    /// `InvalidConfig` naming the field for a size it cannot take.
    fn resize(
        &mut self,
        size: VmSize,
    ) -> impl Future<Output = Result<(Reported, VmSize), HypervisorError>> + Send;

    /// Sends `data` to the VM's console input; answers how many bytes it
    /// took. `Unsupported` naming the backend and the reason when the VM's
    /// console takes no input.
    fn write_console(
        &mut self,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<usize, HypervisorError>> + Send;

    /// Writes the VM's state and memory into `dir` (an empty directory):
    /// all of its memory for a full snapshot, only the pages written since
    /// the VMM's previous snapshot (or its start) for a diff one, as a
    /// sparse file. A Running VM is paused for it; afterwards the VM runs
    /// again when `resume`, else it stays Paused. Answers the state the VMM
    /// reports then. `Unsupported` naming the backend and the reason when it
    /// cannot (a diff on a backend without them); `InvalidState` with the
    /// VMM's words when the VMM refuses.
    fn snapshot(
        &mut self,
        dir: &std::path::Path,
        kind: crate::domain::snapshot::SnapshotKind,
        resume: bool,
    ) -> impl Future<Output = Result<Reported, HypervisorError>> + Send;

    /// Reads state, metrics and backend details from the VMM and /proc.
    /// A VMM that is gone reads as its exit state (Shutdown or Failed with
    /// the reason), not as an error; `Unavailable` if its socket does not answer.
    fn sample(&mut self) -> impl Future<Output = Result<VmmInfo, HypervisorError>> + Send;
}

/// A VMM backend: starts and re-attaches VMMs and hands out their handles.
/// MUST be safe to call concurrently for different VMs.
#[cfg_attr(test, mockall::automock(type Vm = MockVmmHandle;))]
pub trait Hypervisor: Send + Sync + 'static {
    /// The per-VM handle.
    type Vm: VmmHandle;

    /// Which VMM this is.
    fn kind(&self) -> BackendKind;

    /// Checks that the backend can be used (binary runs, /dev/kvm opens).
    /// MUST return `Unavailable` naming what is missing otherwise.
    fn check(&self) -> impl Future<Output = Result<BackendCheck, HypervisorError>> + Send;

    /// Rejects any config field this backend cannot honour. MUST return a
    /// `VmConfigError` naming the field and the backend; MUST NOT do I/O.
    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError>;

    /// Whether this backend can resize a running VM at all; `Unsupported`
    /// naming the backend and the reason when it cannot. No I/O.
    fn can_resize(&self) -> Result<(), HypervisorError>;

    /// Starts a VMM for `id` and configures the VM without booting it.
    /// MUST leave no process or file behind when it fails; MUST return
    /// `SpawnFailed` (with the VMM's log tail) if the process does not come up,
    /// `InvalidConfig` if the VMM rejects the config.
    fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
        events: VmmEventSink,
    ) -> impl Future<Output = Result<(Self::Vm, Reported), HypervisorError>> + Send;

    /// Starts a fresh VMM for `id` and restores into it the snapshot in
    /// `dir`, taken of a VM whose config (with the restore's overrides) is
    /// `config`; the VM runs when `resume`, else it is Paused. The console
    /// goes to the new VM's own file. MUST leave no process or file behind
    /// when it fails, like `create`.
    fn restore(
        &self,
        id: &VmId,
        config: &VmConfig,
        dir: &std::path::Path,
        resume: bool,
        events: VmmEventSink,
    ) -> impl Future<Output = Result<(Self::Vm, Reported), HypervisorError>> + Send;

    /// Re-attaches to a VM after a VMCP restart. With `process`, MUST verify
    /// the process is the same one (pid and start time) and that its socket
    /// answers, and report the state it reports; `Gone` if it is not there.
    /// Without `process`, MUST hand back a handle with no process (reported
    /// as Shutdown) whose `boot` starts a fresh VMM from `config`; it MUST
    /// NOT start a process itself.
    fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
        events: VmmEventSink,
    ) -> impl Future<Output = Result<(Self::Vm, Reported), HypervisorError>> + Send;

    /// Lists the VMs whose runtime directories this backend finds on the
    /// host, each with its live VMM process if one still runs. Used at
    /// start-up to find VMMs that no record names, or that replaced the
    /// recorded one just before a crash.
    fn discover(&self) -> impl Future<Output = Result<Vec<Discovered>, HypervisorError>> + Send;

    /// Whether VMCP has started on this host since the host last booted: the
    /// mark [`Hypervisor::mark_started`] leaves beside the runtime directories
    /// (on tmpfs, which a reboot empties) is still there. None when the
    /// backend cannot tell; recovery then takes a VM whose runtime directory
    /// is gone as one the host restarted under.
    fn started_since_boot(&self) -> impl Future<Output = Option<bool>> + Send {
        async { None }
    }

    /// Leaves the mark [`Hypervisor::started_since_boot`] looks for; called
    /// once recovery has decided every VM, before any create is admitted.
    fn mark_started(&self) -> impl Future<Output = Result<(), HypervisorError>> + Send {
        async { Ok(()) }
    }

    /// Reads at most `max_bytes` of VM `id`'s console output from `offset`
    /// (the oldest byte kept when it was dropped). `Unsupported` when the
    /// VM's console is off; an empty chunk before the VMM wrote anything.
    fn read_console(
        &self,
        id: &VmId,
        config: &VmConfig,
        offset: u64,
        max_bytes: usize,
    ) -> impl Future<Output = Result<ConsoleChunk, HypervisorError>> + Send;

    /// Ends a VMM that belongs to no VM (if it still runs) and removes its
    /// runtime files. MUST NOT touch any process other than `process`.
    fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;
}
