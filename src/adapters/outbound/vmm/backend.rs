//! A [`Hypervisor`] for any [`Flavour`]: [`VmmBackend`]. It checks the
//! backend (version probe, KVM device, the flavour's extras), validates
//! configs through the flavour, starts or re-attaches one VM's VMM and hands
//! the resulting [`VmmVm`] to the caller, and finds and removes orphans. It
//! keeps no registry of VMs: what it knows about a VM after `create` or
//! `adopt` returns lives in the handle and on disk (the runtime directory,
//! whose pid file names the current process).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::domain::{VmConfig, VmConfigError, VmId, VmState};
use crate::ports::{
    BackendCheck, BackendKind, ConsoleChunk, Discovered, Hypervisor, HypervisorError, Reported,
    VmmEventSink, VmmHandle, VmmProcess,
};

use super::console;
use super::discovery;
use super::flavour::{Api, Flavour, Supervision};
use super::handle::VmmVm;
use super::process::{RuntimeDir, Supervised, create_private_dir};
use super::supervisor::Supervisor;
use super::uds_http::UdsClient;

/// The mark each VMCP start leaves in the runtime root (see
/// [`Hypervisor::started_since_boot`]): the kernel's boot id, one line. Not a
/// directory, so the discovery scan never takes it for a VM.
pub const STARTED_MARK: &str = ".vmcp-started";

/// The kernel's id of the current boot, when it can be read.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// A VMM backend of flavour `F`.
#[derive(Debug)]
pub struct VmmBackend<F> {
    sup: Arc<Supervisor<F>>,
}

impl<F: Flavour> VmmBackend<F> {
    /// A backend of `flavour` supervising its VMMs with `settings`.
    pub fn with_flavour(flavour: F, settings: Supervision) -> Self {
        Self {
            sup: Arc::new(Supervisor::new(flavour, settings)),
        }
    }

    /// Changes the settings for VMs created or adopted from now on (handles
    /// already handed out keep theirs).
    fn with_settings(mut self, change: impl FnOnce(&mut Supervision)) -> Self {
        Arc::make_mut(&mut self.sup).change_settings(change);
        self
    }

    /// Sets how long a new VMM may take to answer its readiness probe.
    pub fn with_ready_timeout(self, timeout: Duration) -> Self {
        self.with_settings(|s| s.ready_timeout = timeout)
    }

    /// Sets how long delete waits for a polite exit, and for SIGTERM, before
    /// the next step.
    pub fn with_stop_grace(self, grace: Duration) -> Self {
        self.with_settings(|s| s.stop_grace = grace)
    }

    /// Sets how many bytes a VM's console file may hold before old output
    /// is dropped (0: no cap).
    pub fn with_console_max_bytes(self, max: u64) -> Self {
        self.with_settings(|s| s.console_max_bytes = max)
    }

    /// Sets the KVM device [`Hypervisor::check`] opens (default /dev/kvm).
    pub fn with_kvm_device(self, path: impl Into<std::path::PathBuf>) -> Self {
        let path = path.into();
        self.with_settings(|s| s.kvm_device = path)
    }

    /// The supervision settings.
    pub fn supervision(&self) -> &Supervision {
        &self.sup.settings
    }

    /// The runtime directory root.
    pub fn runtime_root(&self) -> &Path {
        &self.sup.settings.runtime_root
    }

    /// The flavour.
    pub fn flavour(&self) -> &F {
        &self.sup.flavour
    }

    /// The pooled API client, bounded by the call timeout.
    pub fn http(&self) -> &UdsClient {
        &self.sup.http
    }

    fn runtime(&self, id: &VmId) -> RuntimeDir {
        RuntimeDir::new(&self.sup.settings.runtime_root, id)
    }

    fn is_vmm(&self) -> impl Fn(u32, &VmId, &RuntimeDir) -> bool + '_ {
        |pid, id, dir| self.sup.flavour.is_vmm_of(pid, id, dir)
    }

    /// Preparing the runtime directory removes its socket: never do that
    /// under a VMM that still runs there (it would be orphaned).
    fn refuse_if_running(&self, id: &VmId) -> Result<(), HypervisorError> {
        match discovery::live_vmm(self.runtime_root(), id, &self.is_vmm()) {
            Some(running) => Err(HypervisorError::InvalidState(format!(
                "vm {id} already has a running VMM (pid {})",
                running.pid
            ))),
            None => Ok(()),
        }
    }

    fn handle(
        &self,
        id: &VmId,
        config: &VmConfig,
        events: VmmEventSink,
    ) -> Result<VmmVm<F>, HypervisorError> {
        self.sup.flavour.validate(config)?;
        let runtime = self.runtime(id);
        let vm = self
            .sup
            .flavour
            .prepare(&self.sup.settings, id, config, &runtime)?;
        let console = self.sup.flavour.console_file(config, &runtime);
        Ok(VmmVm::new(
            Arc::clone(&self.sup),
            id.clone(),
            runtime,
            vm,
            events,
            console,
        ))
    }
}

impl<F: Flavour> Hypervisor for VmmBackend<F> {
    type Vm = VmmVm<F>;

    fn kind(&self) -> BackendKind {
        F::KIND
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        let version = self.sup.version().await?;
        self.sup.check_kvm()?;
        self.sup.flavour.check(&self.sup.settings).await?;
        Ok(BackendCheck { version })
    }

    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError> {
        self.sup.flavour.validate(config)
    }

    fn can_resize(&self) -> Result<(), HypervisorError> {
        self.sup.flavour.can_resize()
    }

    async fn create(
        &self,
        id: &VmId,
        config: &VmConfig,
        events: VmmEventSink,
    ) -> Result<(Self::Vm, Reported), HypervisorError> {
        let mut vm = self.handle(id, config, events)?;
        self.refuse_if_running(id)?;
        vm.respawn().await?;
        let reported = vm.read_back(None).await?;
        Ok((vm, reported))
    }

    async fn restore(
        &self,
        id: &VmId,
        config: &VmConfig,
        dir: &Path,
        resume: bool,
        events: VmmEventSink,
    ) -> Result<(Self::Vm, Reported), HypervisorError> {
        let mut vm = self.handle(id, config, events)?;
        self.refuse_if_running(id)?;
        vm.respawn_restoring(dir, resume).await?;
        // A VMM whose state cannot be read is discarded by `read_back`.
        let reported = vm.read_back(Some(resume)).await?;
        Ok((vm, reported))
    }

    async fn adopt(
        &self,
        id: &VmId,
        config: &VmConfig,
        process: Option<VmmProcess>,
        events: VmmEventSink,
    ) -> Result<(Self::Vm, Reported), HypervisorError> {
        let reporter = self.sup.reporter(id, events.clone());
        let mut vm = self.handle(id, config, events)?;
        let Some(process) = process else {
            let reported = Reported {
                state: VmState::Shutdown,
                reason: "no VMM process runs; boot starts one".to_owned(),
                process: None,
            };
            return Ok((vm, reported));
        };
        // Not `prepare()`: that would remove the live socket of this VMM.
        create_private_dir(vm.runtime().path())?;
        let adopted = Supervised::adopt(
            process.pid,
            process.start_time,
            self.sup.settings.binary.clone(),
            vm.runtime().clone(),
            reporter,
        )?;
        // A record without a socket (written before VMCP kept one) means
        // the VM's own.
        let socket = if process.socket_path.is_empty() {
            self.sup.flavour.socket(vm.flavour_vm(), vm.runtime())
        } else {
            std::path::PathBuf::from(&process.socket_path)
        };
        let api = Api {
            http: &self.sup.http,
            socket: &socket,
        };
        // Not the readiness probe, whose short timeout is for a VMM starting
        // up: an adopted VMM may be busy with a slow request (it serves one
        // at a time), so reading its state gets the whole call timeout.
        let state = self.sup.flavour.adopted_state(api, vm.flavour_vm()).await?;
        vm.attach(adopted, socket);
        let reported = Reported {
            state,
            reason: String::new(),
            process: vm.process(),
        };
        Ok((vm, reported))
    }

    async fn started_since_boot(&self) -> Option<bool> {
        let mark = self.runtime_root().join(STARTED_MARK);
        Some(match std::fs::read_to_string(&mark) {
            // Written in another boot: the runtime root is not on tmpfs, but the host restarted.
            Ok(written) => boot_id().is_none_or(|now| written.trim() == now),
            Err(_) => false,
        })
    }

    async fn mark_started(&self) -> Result<(), HypervisorError> {
        let root = self.runtime_root();
        create_private_dir(root)?;
        let mark = root.join(STARTED_MARK);
        std::fs::write(&mark, boot_id().unwrap_or_default() + "\n").map_err(|e| {
            HypervisorError::unavailable_from(format!("cannot write {}", mark.display()), e)
        })
    }

    async fn read_console(
        &self,
        id: &VmId,
        config: &VmConfig,
        offset: u64,
        max_bytes: usize,
    ) -> Result<ConsoleChunk, HypervisorError> {
        let Some(path) = self.sup.flavour.console_file(config, &self.runtime(id)) else {
            return Err(HypervisorError::Unsupported(format!(
                "vm {id} has no console output (config.console.enabled is false)"
            )));
        };
        tokio::task::spawn_blocking(move || {
            console::read(&path, offset, max_bytes).map_err(|e| (path, e))
        })
        .await
        .map_err(|e| HypervisorError::unavailable(format!("console read ended: {e}")))?
        .map_err(|(path, e)| {
            HypervisorError::unavailable_from(format!("cannot read console {}", path.display()), e)
        })
    }

    async fn discover(&self) -> Result<Vec<Discovered>, HypervisorError> {
        let root = self.runtime_root();
        discovery::scan_with(root, self.is_vmm()).map_err(|e| {
            HypervisorError::unavailable_from(format!("cannot scan {}", root.display()), e)
        })
    }

    async fn destroy_orphan(
        &self,
        id: &VmId,
        process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        let grace = self.sup.settings.stop_grace;
        discovery::destroy(self.runtime_root(), id, process.as_ref(), grace)
            .await
            .map_err(|e| {
                HypervisorError::unavailable_from(format!("cannot remove orphan {id}"), e)
            })?;
        self.sup.flavour.remove_leftovers(&self.sup.settings, id)
    }
}
