//! The outbound port to a VMM backend. One VMM process per VM; the backend
//! keeps each VM's process handle and socket, keyed by [`VmId`].
//!
//! Every operation returns the state the VMM *reported after* performing it
//! (read back, never assumed), so callers can record the truth.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::domain::{ConfigError, VmConfig, VmId, VmState};

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
    /// How long the graceful attempt may take before a hard stop.
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

/// What the VMM reports about one VM.
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

/// Something the backend noticed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEvent {
    /// A VMM process ended without VMCP asking it to.
    Exited {
        /// The VM.
        vm_id: VmId,
        /// Shutdown for a guest-initiated poweroff, Failed for a crash.
        state: VmState,
        /// Exit status or signal, and the last lines of the VMM's log.
        reason: String,
    },
}

/// Where a backend sends [`BackendEvent`]s.
pub type EventSink = tokio::sync::mpsc::UnboundedSender<BackendEvent>;

/// Why a hypervisor call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    /// The backend cannot honour a field of the config.
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The VMM refused because of the VM's state (CH answers 500 with an error body,
    /// Firecracker 400 with a fault message).
    #[error("the VMM refused: {0}")]
    InvalidState(String),
    /// The VMM (or the backend binary, or KVM) cannot be reached or used.
    #[error("{0}")]
    Unavailable(String),
    /// The VMM did not answer in time.
    #[error("{operation} timed out after {after:?}")]
    Timeout {
        /// What was asked.
        operation: String,
        /// How long we waited.
        after: Duration,
    },
    /// The backend has no VMM for this VM.
    #[error("no VMM for vm {0}")]
    NotFound(String),
    /// The VMM process could not be started.
    #[error("VMM failed to start: {0}")]
    SpawnFailed(String),
    /// This backend cannot perform the operation at all.
    #[error("{0}")]
    Unsupported(String),
    /// Host resource trouble (disk full, too many processes).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The VMM answered something VMCP does not understand (a bug on one side).
    #[error("unexpected answer from the VMM: {0}")]
    Protocol(String),
}

/// One VMM process per VM. Implementations MUST be safe to call concurrently
/// for different VMs; calls for one VM are serialized by the caller.
#[cfg_attr(test, mockall::automock)]
pub trait Hypervisor: Send + Sync + 'static {
    /// Which VMM this is.
    fn kind(&self) -> BackendKind;

    /// Checks that the backend can be used (binary runs, /dev/kvm opens).
    /// MUST return `Unavailable` naming what is missing otherwise.
    fn check(&self) -> impl Future<Output = Result<BackendCheck, HypervisorError>> + Send;

    /// Rejects any config field this backend cannot honour. MUST return a
    /// `ConfigError` naming the field and the backend; MUST NOT do I/O.
    fn validate(&self, config: &VmConfig) -> Result<(), ConfigError>;

    /// Starts a VMM for `id` and configures the VM without booting it.
    /// MUST leave no process or file behind when it fails; MUST return
    /// `SpawnFailed` (with the VMM's log tail) if the process does not come up,
    /// `InvalidConfig` if the VMM rejects the config.
    fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
    ) -> impl Future<Output = Result<(VmState, VmmProcess), HypervisorError>> + Send;

    /// Boots the VM. Returns the state reported afterwards.
    /// MUST return `InvalidState` if the VMM refuses, `NotFound` if no VMM is known.
    fn boot(&self, id: &VmId) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Stops the VM, gracefully first unless forced, hard after the timeout.
    /// Returns the state reported afterwards.
    fn shutdown(
        &self,
        id: &VmId,
        mode: ShutdownMode,
    ) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Pauses the VM. Returns the state reported afterwards.
    fn pause(&self, id: &VmId) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Resumes the VM. Returns the state reported afterwards.
    fn resume(&self, id: &VmId) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Reboots the VM. Returns the state reported afterwards.
    fn reboot(
        &self,
        id: &VmId,
        force: bool,
    ) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Removes the VM: stops it, ends its VMM (killed after a grace period,
    /// or at once when `force`), reaps it and removes its runtime files.
    /// MUST succeed when the VMM is already gone (idempotent).
    fn delete(
        &self,
        id: &VmId,
        force: bool,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Reads state, metrics and backend details. MUST return `NotFound` if
    /// no VMM is known for `id`, `Unavailable` if its socket does not answer.
    fn info(&self, id: &VmId) -> impl Future<Output = Result<VmmInfo, HypervisorError>> + Send;

    /// Re-attaches to a VM after a VMCP restart. With `process`, MUST verify
    /// the process is the same one (pid and start time) and that its socket
    /// answers, and return the state it reports; `NotFound` if it is gone.
    /// Without `process` (the VM was stopped and its VMM is gone), MUST
    /// register the VM so that a later boot can start it again, and return
    /// the state the VM is in (Shutdown), or `Unsupported` if the backend
    /// cannot boot a VM without its original VMM.
    fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
    ) -> impl Future<Output = Result<VmState, HypervisorError>> + Send;

    /// Lists the VMs whose runtime directories this backend finds on the
    /// host, each with its live VMM process if one still runs (verified by
    /// pid, start time and command line). Used at start-up to find VMMs that
    /// no record names.
    fn discover(
        &self,
    ) -> impl Future<Output = Result<Vec<(VmId, Option<VmmProcess>)>, HypervisorError>> + Send;

    /// Ends a VMM that belongs to no VM (if it still runs) and removes its
    /// runtime files. MUST NOT touch any process other than `process`.
    fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> impl Future<Output = Result<(), HypervisorError>> + Send;
}
