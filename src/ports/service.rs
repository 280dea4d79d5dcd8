//! The inbound port: what the VM API offers, in domain words. The ConnectRPC
//! adapter converts wire messages to these calls and back.

use std::collections::BTreeMap;
use std::future::Future;

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

/// One VM in full, for GetVmInfo.
#[derive(Debug, Clone, PartialEq)]
pub struct VmDetails {
    /// Config, state, reason, generation, timestamps.
    pub snapshot: VmSnapshot,
    /// Metrics as the VMM reported them, when it answered.
    pub metrics: Option<VmMetrics>,
    /// Backend details (VMM version, pid, socket, backend type).
    pub backend_info: BTreeMap<String, String>,
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
    /// The VMs on this page, ordered by id.
    pub vms: Vec<VmSnapshot>,
    /// Token for the next page, empty on the last one.
    pub next_page_token: String,
    /// How many VMs match the filter in all.
    pub total_count: u32,
}

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
    fn get_vm_info(&self, id: VmId) -> impl Future<Output = Result<VmDetails, VmError>> + Send;
    /// Lists VMs.
    fn list_vms(&self, query: ListQuery) -> impl Future<Output = Result<VmPage, VmError>> + Send;
}
