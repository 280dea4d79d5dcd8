//! The inbound port: what the VM API offers, in domain words. The ConnectRPC
//! adapter converts wire messages to these calls and back.

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use crate::domain::snapshot::{
    DiffParent, NetworkOverride, SnapshotId, SnapshotInfo, SnapshotKind,
};
use crate::domain::{VmConfig, VmError, VmId, VmSnapshot, VmState};

use super::hypervisor::VmMetrics;

/// A create request after the wire layer parsed it.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateVm {
    /// The caller's id, or None to have one generated.
    pub vm_id: Option<VmId>,
    /// The config (not yet validated).
    pub config: VmConfig,
}

/// One VM in full, for GetVmInfo: what its owner observed and its latest
/// sample of the VMM. Owners publish it as an `Arc`, so a read is a pointer copy.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDetails {
    /// Config, state, reason, generation, timestamps.
    pub snapshot: VmSnapshot,
    /// Metrics as the VMM reported them, when it answered.
    pub metrics: Option<VmMetrics>,
    /// Backend details (VMM version, pid, socket, backend type).
    pub backend_info: BTreeMap<String, String>,
    /// When `metrics` and `backend_info` were sampled, Unix milliseconds.
    pub sampled_at_ms: Option<i64>,
    /// What a diff snapshot would be taken against (SnapshotVm checks it;
    /// not on the wire).
    pub diff: DiffView,
    /// The inbound adapter's encodings of these details, made on first read.
    pub encoded: EncodingMemo,
}

impl VmDetails {
    /// The details of `snapshot` with no sample yet.
    pub fn of(snapshot: VmSnapshot) -> Self {
        Self {
            snapshot,
            metrics: None,
            backend_info: BTreeMap::new(),
            sampled_at_ms: None,
            diff: DiffView::default(),
            encoded: EncodingMemo::default(),
        }
    }
}

/// Room for one value derived from the [`VmDetails`] that hold it, made on
/// first use: the wire adapter keeps its encodings there, so every read of
/// unchanged details after the first copies bytes instead of converting and
/// encoding again. Sound because published details never change: an owner
/// publishes a change as new details, made by cloning, and a clone starts
/// with an empty memo. Not part of the details' value (always equal).
#[derive(Default)]
pub struct EncodingMemo(OnceLock<Box<dyn Any + Send + Sync>>);

impl EncodingMemo {
    /// The memo, made by `init` if it is empty; `None` when it already holds
    /// a value of another type than `T`.
    pub fn get_or_init<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.0.get_or_init(|| Box::new(init())).downcast_ref()
    }
}

impl Clone for EncodingMemo {
    /// Empty: a clone of details is made to be changed.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for EncodingMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for EncodingMemo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodingMemo")
            .field("filled", &self.0.get().is_some())
            .finish()
    }
}

/// What a diff snapshot of the VM would be taken against, as its owner
/// knows it (see [`crate::domain::snapshot::diff_parent`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffView {
    /// The recorded parent.
    pub parent: Option<DiffParent>,
    /// A snapshot attempt failed (or is being completed) since it was recorded.
    pub last_failed: bool,
    /// The VMM process now (pid, start time).
    pub vmm: Option<(u32, u64)>,
}

/// A RestoreVm request after the wire layer parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreVm {
    /// The new VM's id.
    pub vm_id: VmId,
    /// The snapshot.
    pub snapshot_id: SnapshotId,
    /// Run it after the restore.
    pub resume: bool,
    /// Taps for its interfaces.
    pub network_overrides: Vec<NetworkOverride>,
    /// Its metadata (the snapshot's when None).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// A ListVms query.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    /// Only VMs in one of these states; empty means all.
    pub states: Vec<VmState>,
    /// Page size; 0 means the default.
    pub page_size: u32,
    /// Opaque token from a previous page, or empty.
    pub page_token: String,
}

/// A page of VMs.
#[derive(Debug, Clone, PartialEq)]
pub struct VmPage {
    /// The host revision the page reflects: every change up to it is in it.
    pub revision: u64,
    /// The VMs on this page, ordered by id, as their owners publish them.
    pub vms: Vec<Arc<VmDetails>>,
    /// Token for the next page, empty on the last one.
    pub next_page_token: String,
    /// How many VMs match the filter in all.
    pub total_count: u32,
}

/// A WatchVms request after the wire layer parsed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchQuery {
    /// Only these VMs; empty means all.
    pub vm_ids: Vec<VmId>,
    /// Only changes into or out of one of these states; empty means all.
    pub states: Vec<VmState>,
    /// Replay the changes after this revision first (None: live changes only).
    pub since_revision: Option<u64>,
    /// Send every matching VM first, then [`WatchEventKind::Synced`].
    pub send_initial: bool,
}

/// What a watch message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WatchEventKind {
    /// The VM was created (or, in an initial list, exists).
    Added,
    /// The VM changed.
    Changed,
    /// The VM was deleted.
    Deleted,
    /// Everything up to the revision has been sent.
    Synced,
    /// Nothing to send; the stream is alive.
    Heartbeat,
}

impl WatchEventKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Changed => "changed",
            Self::Deleted => "deleted",
            Self::Synced => "synced",
            Self::Heartbeat => "heartbeat",
        }
    }
}

/// One watch message.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchEventKind,
    /// The VM after the change (before it, for a delete); None for synced and heartbeat.
    pub vm: Option<Arc<VmSnapshot>>,
    /// The host revision of the change, or the revision synced or current.
    pub revision: u64,
}

/// A stream of watch messages; it ends with an error that says why and
/// where to resume (overflow, shutdown).
pub type WatchStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<WatchEvent, VmError>> + Send>>;

/// A stream of console output; it ends when the VM is deleted, or with an
/// error that says why (shutdown).
pub type ConsoleStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<super::ConsoleChunk, VmError>> + Send>,
>;

/// The VM API.
pub trait VmService: Send + Sync + 'static {
    /// Creates a VM (idempotent for the same id and config).
    fn create_vm(&self, req: CreateVm) -> impl Future<Output = Result<VmSnapshot, VmError>> + Send;
    /// Deletes a VM.
    fn delete_vm(&self, id: VmId, force: bool) -> impl Future<Output = Result<(), VmError>> + Send;
    /// Boots a VM; returns the state the VMM reported afterwards.
    fn boot_vm(&self, id: VmId) -> impl Future<Output = Result<VmState, VmError>> + Send;
    /// Stops a VM.
    fn shutdown_vm(
        &self,
        id: VmId,
        force: bool,
        timeout_secs: u32,
    ) -> impl Future<Output = Result<VmState, VmError>> + Send;
    /// Pauses a VM.
    fn pause_vm(&self, id: VmId) -> impl Future<Output = Result<VmState, VmError>> + Send;
    /// Resumes a VM.
    fn resume_vm(&self, id: VmId) -> impl Future<Output = Result<VmState, VmError>> + Send;
    /// Reboots a VM.
    fn reboot_vm(
        &self,
        id: VmId,
        force: bool,
    ) -> impl Future<Output = Result<VmState, VmError>> + Send;
    /// Reads one VM.
    fn get_vm_info(&self, id: VmId)
    -> impl Future<Output = Result<Arc<VmDetails>, VmError>> + Send;
    /// Lists VMs.
    fn list_vms(&self, query: ListQuery) -> impl Future<Output = Result<VmPage, VmError>> + Send;
    /// Streams changes of the host's VMs.
    fn watch_vms(
        &self,
        query: WatchQuery,
    ) -> impl Future<Output = Result<WatchStream, VmError>> + Send;
    /// Reads a VM's console output from `offset`, at most `max_bytes` (0:
    /// the service's default; more than its maximum is read as the maximum).
    fn get_console_output(
        &self,
        id: VmId,
        offset: u64,
        max_bytes: u32,
    ) -> impl Future<Output = Result<super::ConsoleChunk, VmError>> + Send;
    /// Follows a VM's console output from `offset` until the VM is deleted.
    fn stream_console(
        &self,
        id: VmId,
        offset: u64,
    ) -> impl Future<Output = Result<ConsoleStream, VmError>> + Send;
    /// Sends bytes to a VM's console input; answers how many it took.
    fn write_console(
        &self,
        id: VmId,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<usize, VmError>> + Send;
    /// Snapshots a VM; answers the usable snapshot.
    fn snapshot_vm(
        &self,
        id: VmId,
        snapshot_id: Option<SnapshotId>,
        resume: bool,
        kind: SnapshotKind,
    ) -> impl Future<Output = Result<SnapshotInfo, VmError>> + Send;
    /// The usable snapshots (of one VM when given), ordered by id.
    fn list_snapshots(
        &self,
        source_vm_id: Option<VmId>,
    ) -> impl Future<Output = Result<Vec<SnapshotInfo>, VmError>> + Send;
    /// One snapshot.
    fn get_snapshot(
        &self,
        id: SnapshotId,
    ) -> impl Future<Output = Result<SnapshotInfo, VmError>> + Send;
    /// Deletes a snapshot and its files.
    fn delete_snapshot(&self, id: SnapshotId) -> impl Future<Output = Result<(), VmError>> + Send;
    /// Starts a new VM from a snapshot; answers it.
    fn restore_vm(
        &self,
        req: RestoreVm,
    ) -> impl Future<Output = Result<VmSnapshot, VmError>> + Send;
    /// Resizes a running VM (0 leaves that size unchanged); answers the VM after it.
    fn resize_vm(
        &self,
        id: VmId,
        vcpu_count: i32,
        memory_bytes: i64,
    ) -> impl Future<Output = Result<VmSnapshot, VmError>> + Send;
}

/// What `/_/health` reports about the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    /// `cloudhypervisor` or `firecracker`.
    pub kind: &'static str,
    /// Whether the backend can be used.
    pub healthy: bool,
    /// VMM version when healthy.
    pub version: String,
    /// What is missing when unhealthy.
    pub error: String,
    /// How long the check took (zero when a recent answer was reused).
    pub duration: std::time::Duration,
}

/// How many VMs are in each observed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmCounts {
    counts: [u64; VmState::ALL.len()],
}

impl VmCounts {
    /// Counts one more VM in `state`.
    pub fn add(&mut self, state: VmState) {
        self.counts[state.index()] += 1;
    }

    /// How many VMs are in `state`.
    pub fn get(&self, state: VmState) -> u64 {
        self.counts[state.index()]
    }

    /// Every state with its count, in [`VmState::ALL`] order (zeros included).
    pub fn iter(&self) -> impl Iterator<Item = (VmState, u64)> + '_ {
        VmState::ALL.iter().map(|s| (*s, self.get(*s)))
    }

    /// How many VMs in all.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl FromIterator<VmState> for VmCounts {
    fn from_iter<I: IntoIterator<Item = VmState>>(iter: I) -> Self {
        let mut counts = Self::default();
        for s in iter {
            counts.add(s);
        }
        counts
    }
}

/// File descriptors and client connections, as the health endpoint reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DescriptorHealth {
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// Descriptors open now.
    pub in_use: u64,
    /// `limit - in_use`.
    pub free: u64,
    /// Kept for VM work; client connections are capped below the limit minus this.
    pub reserved_for_vms: u64,
    /// Free descriptors one VM operation needs; fewer and VM operations are refused.
    pub vm_operation_needs: u64,
    /// Client connections open now.
    pub connections_open: u64,
    /// The connection cap.
    pub max_connections: u64,
    /// The per-client-address connection cap.
    pub max_connections_per_client: u64,
}

impl DescriptorHealth {
    /// Too few free descriptors for one more VM operation.
    pub fn tight(&self) -> bool {
        self.free < self.vm_operation_needs
    }
}

/// The state of the service as the health endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceHealth {
    /// Start-up recovery is still running; VM calls are not served yet.
    pub recovering: bool,
    /// VMs per observed state.
    pub vm_counts: VmCounts,
    /// Telemetry pipeline state: `disabled`, `ok` or the last export error.
    pub telemetry: String,
    /// Descriptor budget and connections, when the service tracks them.
    pub descriptors: Option<DescriptorHealth>,
}

/// Read-only health questions the health endpoint asks the application.
pub trait HealthCheck: Send + Sync + 'static {
    /// Checks the backend (cached for a few seconds).
    fn backend(&self) -> std::pin::Pin<Box<dyn Future<Output = BackendHealth> + Send + '_>>;
    /// Reports recovery, VM counts and telemetry state.
    fn service(&self) -> ServiceHealth;
}
