//! A backend whose every call answers at once, in O(1): the scale section
//! measures VMCP's own costs at 10,000 VMs, not a test double's (the
//! project's double keeps every VM's processes in one map and scans it on
//! each sample, which is right for its tests and quadratic here).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use vmcp::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};
use vmcp::ports::{
    BackendCheck, BackendKind, ConsoleChunk, Discovered, Hypervisor, HypervisorError, Reported,
    ShutdownMode, VmmEventSink, VmmHandle, VmmInfo, VmmProcess,
};

/// The backend.
#[derive(Debug, Default)]
pub struct Null {
    pids: AtomicU32,
}

/// One VM of [`Null`].
#[derive(Debug)]
pub struct NullVm {
    state: VmState,
    process: VmmProcess,
}

impl NullVm {
    fn reported(&self) -> Reported {
        Reported {
            state: self.state,
            reason: String::new(),
            process: Some(self.process.clone()),
        }
    }

    fn become_(&mut self, state: VmState) -> Result<Reported, HypervisorError> {
        self.state = state;
        Ok(self.reported())
    }
}

impl VmmHandle for NullVm {
    fn process(&self) -> Option<VmmProcess> {
        Some(self.process.clone())
    }

    async fn boot(&mut self) -> Result<Reported, HypervisorError> {
        self.become_(VmState::Running)
    }

    async fn shutdown(&mut self, _mode: ShutdownMode) -> Result<Reported, HypervisorError> {
        self.become_(VmState::Shutdown)
    }

    async fn pause(&mut self) -> Result<Reported, HypervisorError> {
        self.become_(VmState::Paused)
    }

    async fn resume(&mut self) -> Result<Reported, HypervisorError> {
        self.become_(VmState::Running)
    }

    async fn reboot(&mut self, _force: bool) -> Result<Reported, HypervisorError> {
        self.become_(VmState::Running)
    }

    async fn delete(&mut self, _force: bool) -> Result<(), HypervisorError> {
        Ok(())
    }

    async fn resize(&mut self, size: VmSize) -> Result<(Reported, VmSize), HypervisorError> {
        Ok((self.reported(), size))
    }

    async fn write_console(&mut self, _data: Vec<u8>) -> Result<usize, HypervisorError> {
        Err(HypervisorError::Unsupported("no console".into()))
    }

    async fn snapshot(
        &mut self,
        _dir: &Path,
        _kind: vmcp::domain::snapshot::SnapshotKind,
        _resume: bool,
    ) -> Result<Reported, HypervisorError> {
        Err(HypervisorError::Unsupported("no snapshots".into()))
    }

    async fn sample(&mut self) -> Result<VmmInfo, HypervisorError> {
        Ok(VmmInfo {
            state: Some(self.state),
            process: Some(self.process.clone()),
            ..Default::default()
        })
    }
}

impl Null {
    fn vm(&self, state: VmState) -> NullVm {
        let pid = 1_000_000 + self.pids.fetch_add(1, Ordering::Relaxed);
        NullVm {
            state,
            process: VmmProcess {
                pid,
                start_time: u64::from(pid),
                socket_path: format!("/nonexistent/{pid}.sock"),
            },
        }
    }
}

impl Hypervisor for Null {
    type Vm = NullVm;

    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        Ok(BackendCheck {
            version: "null".into(),
        })
    }

    fn validate(&self, _config: &VmConfig) -> Result<(), VmConfigError> {
        Ok(())
    }

    fn can_resize(&self) -> Result<(), HypervisorError> {
        Ok(())
    }

    async fn create(
        &self,
        _id: &VmId,
        _config: &VmConfig,
        _events: VmmEventSink,
    ) -> Result<(NullVm, Reported), HypervisorError> {
        let vm = self.vm(VmState::Created);
        let r = vm.reported();
        Ok((vm, r))
    }

    async fn restore(
        &self,
        _id: &VmId,
        _config: &VmConfig,
        _dir: &Path,
        _resume: bool,
        _events: VmmEventSink,
    ) -> Result<(NullVm, Reported), HypervisorError> {
        Err(HypervisorError::Unsupported("no snapshots".into()))
    }

    async fn adopt(
        &self,
        _id: &VmId,
        _config: &VmConfig,
        _process: Option<VmmProcess>,
        _events: VmmEventSink,
    ) -> Result<(NullVm, Reported), HypervisorError> {
        Err(HypervisorError::Gone("nothing to adopt".into()))
    }

    async fn discover(&self) -> Result<Vec<Discovered>, HypervisorError> {
        Ok(Vec::new())
    }

    async fn read_console(
        &self,
        _id: &VmId,
        _config: &VmConfig,
        _offset: u64,
        _max_bytes: usize,
    ) -> Result<ConsoleChunk, HypervisorError> {
        Err(HypervisorError::Unsupported("no console".into()))
    }

    async fn destroy_orphan(
        &self,
        _id: &VmId,
        _process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        Ok(())
    }
}
