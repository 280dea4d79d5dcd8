//! The Firecracker flavour of the shared supervision layer
//! ([`crate::adapters::outbound::vmm`]): one `firecracker` process per
//! microVM (optionally under [`jailer`]), driven through its REST API
//! ([`client`]) with the pre-boot requests mapped in one place ([`config`])
//! and its metrics file summed ([`metrics`]).
//!
//! Firecracker has no reboot and no shutdown state: a microVM is configured
//! before boot (`Not started`, VMCP's Created), started once by
//! `InstanceStart`, paused and resumed by `PATCH /vm`, and it ends when its
//! process ends. So, in the supervision layer's terms:
//!
//! - a hard stop ends the process ([`HardStop::EndsProcess`]): the VM is
//!   Shutdown, its config kept, and boot starts a new process, configures it
//!   and starts it;
//! - a graceful stop sends `SendCtrlAltDel` (after resuming a paused guest,
//!   which could not react otherwise) and waits for the process to exit; a
//!   guest without an i8042 driver ignores it, so its graceful stop always
//!   ends in the kill;
//! - reboot is a cold restart done by VMCP ([`Reboot::Respawn`]): stop as
//!   above (a short graceful attempt unless forced), new process, configure,
//!   `InstanceStart`. The guest sees a fresh boot; the console starts over.
//!
//! Firecracker exits with status 0 only when the guest itself reset or
//! powered off the machine; a crash is a non-zero status or a signal (it
//! does not catch SIGTERM either). Its own log goes to stdout, which the
//! supervisor keeps as the runtime directory's `vmm.log`; it runs with
//! `--level Warning` because at Info it logs two lines per API call, which
//! periodic sampling would grow without bound.

pub mod client;
pub mod config;
pub mod jailer;
pub mod metrics;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use self::client::{Action, FcClient, VmRunState};
use self::config::{ConsoleTarget, PreBoot, RuntimeFiles};
use self::jailer::{JAIL_CONSOLE, JAIL_METRICS, JAIL_SOCKET, Jail, JailerSettings};
use self::metrics::MetricsReader;
use crate::adapters::outbound::vmm::process::MAX_SOCKET_PATH_LEN;
use crate::adapters::outbound::vmm::supervisor::run_version;
use crate::adapters::outbound::vmm::{
    Api, Call, Flavour, HardStop, Launch, Poweroff, Reboot, RuntimeDir, Sampled, Supervision,
    VmmBackend, VmmVm,
};
use crate::domain::snapshot::SnapshotKind;
use crate::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};
use crate::ports::{BackendKind, HypervisorError};

/// The Firecracker backend.
pub type Firecracker = VmmBackend<FcFlavour>;
/// One microVM's handle.
pub type FcVm = VmmVm<FcFlavour>;

/// Firecracker's state before `InstanceStart`.
pub const STATE_NOT_STARTED: &str = "Not started";
/// The metrics file in a VM's runtime directory (outside the jailer).
const METRICS_FILE: &str = "metrics.json";
/// The microVM state file in a snapshot directory.
const SNAPSHOT_STATE: &str = "vmstate";
/// The guest memory file in a snapshot directory (the repository completes a diff's).
const SNAPSHOT_MEMORY: &str = crate::ports::snapshots::MEMORY_FILE;
/// Why snapshots are refused under the jailer.
const FC_JAILED_SNAPSHOT: &str = "firecracker: snapshots of a VM under the jailer are not supported (its files would have to move in and out of the chroot)";
/// Why a diff snapshot of a VM without dirty-page tracking is refused.
const FC_UNTRACKED_DIFF: &str = "firecracker: a diff snapshot needs dirty-page tracking (config.memory.track_dirty_pages), which this VM was created without";
/// Why ResizeVm is refused on this backend.
const FC_NO_RESIZE: &str = "firecracker cannot resize a VM: it has no vCPU or memory hot-plug, and memory can only be taken back through a balloon device, which VMCP does not give its VMs";
/// Why WriteConsole is refused on this backend.
const FC_NO_CONSOLE_INPUT: &str = "firecracker: console input is not available: Firecracker reads serial input only from its own stdin, which VMCP does not hold (a VMM outlives a restart of VMCP)";

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
    /// Graceful part of a non-forced reboot.
    pub reboot_grace: Duration,
    /// SIGTERM-to-SIGKILL grace of a non-forced delete.
    pub delete_grace: Duration,
    /// The KVM device the backend check opens.
    pub kvm_device: PathBuf,
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
            reboot_grace: Duration::from_secs(3),
            delete_grace: Duration::from_secs(2),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

impl Firecracker {
    /// A backend with `settings`.
    pub fn new(settings: FirecrackerSettings) -> Self {
        let mut supervision = Supervision::new(
            &settings.binary,
            &settings.runtime_root,
            settings.call_timeout,
        );
        supervision.ready_timeout = settings.ready_timeout;
        supervision.stop_grace = settings.delete_grace;
        supervision.kvm_device = settings.kvm_device.clone();
        VmmBackend::with_flavour(FcFlavour { settings }, supervision)
    }

    /// The settings in use.
    pub fn settings(&self) -> &FirecrackerSettings {
        &self.flavour().settings
    }
}

/// Firecracker's specifics.
#[derive(Debug, Clone)]
pub struct FcFlavour {
    settings: FirecrackerSettings,
}

/// One microVM as the flavour keeps it: the caller's config, from which
/// every new process is configured again.
#[derive(Debug)]
pub struct MicroVm {
    config: VmConfig,
    instance_id: String,
    jail: Option<Jail>,
    metrics_path: PathBuf,
    /// The requests for the current process (in-jail paths under the jailer).
    pre: PreBoot,
    /// Counters of the current process (they start at zero with each one).
    metrics: MetricsReader,
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

fn client(api: Api<'_>) -> FcClient {
    FcClient::new(api.http.clone(), api.socket.to_owned())
}

impl FcFlavour {
    /// The jail layout of `instance_id`, when running under the jailer.
    fn jail(&self, instance_id: &str) -> Result<Option<Jail>, HypervisorError> {
        let Some(js) = &self.settings.jailer else {
            return Ok(None);
        };
        let base = canonical(&js.chroot_base)?;
        let exec = canonical(&self.settings.binary)?;
        Jail::layout(&base, &exec, instance_id)
            .map(Some)
            .ok_or_else(|| {
                HypervisorError::unavailable(format!(
                    "{} has no file name",
                    self.settings.binary.display()
                ))
            })
    }

    /// Where Firecracker writes its files, as it sees them.
    fn runtime_files(&self, runtime: &RuntimeDir) -> RuntimeFiles {
        match &self.settings.jailer {
            Some(_) => Jail::runtime_files(),
            None => RuntimeFiles {
                metrics_path: path_string(&runtime.path().join(METRICS_FILE)),
                console_path: path_string(&runtime.serial_file()),
                discard_path: "/dev/null".into(),
            },
        }
    }

    /// Places the VM's files in a fresh jail and links its console into the
    /// runtime directory; returns the jailer's command line.
    fn stage_jail(
        &self,
        js: &JailerSettings,
        jail: &Jail,
        vm: &mut MicroVm,
        runtime: &RuntimeDir,
        fc_args: &[OsString],
    ) -> Result<Launch, HypervisorError> {
        let exec = canonical(&self.settings.binary)?;
        remove_tree(&jail.instance_dir)?;
        let staged = jail.stage(&mut vm.pre);
        if let Err(e) = jailer::place(&staged) {
            let _ = std::fs::remove_dir_all(&jail.instance_dir);
            return Err(HypervisorError::SpawnFailed {
                message: "cannot prepare the jail".to_owned(),
                source: Some(std::sync::Arc::new(e)),
            });
        }
        let console_link = runtime.serial_file();
        remove_file(&console_link)?;
        if vm.pre.console == ConsoleTarget::RuntimeFile {
            std::os::unix::fs::symlink(jail.host_path(JAIL_CONSOLE), &console_link)
                .map_err(|e| io_unavailable("cannot link console file", &console_link, e))?;
        }
        Ok(Launch {
            program: js.jailer_binary.clone(),
            args: jailer::jailer_args(js, &exec, &vm.instance_id, fc_args),
            listen_on_stdin: None,
        })
    }
}

impl Flavour for FcFlavour {
    const KIND: BackendKind = BackendKind::Firecracker;
    const HARD_STOP: HardStop = HardStop::EndsProcess;

    type Vm = MicroVm;

    fn reboot(&self) -> Reboot {
        Reboot::Respawn {
            grace: self.settings.reboot_grace,
        }
    }

    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError> {
        config::check(config)?;
        if self.settings.jailer.is_some() {
            config::check_jailed(config)?;
        }
        Ok(())
    }

    async fn check(&self, _: &Supervision) -> Result<(), HypervisorError> {
        let Some(js) = &self.settings.jailer else {
            return Ok(());
        };
        run_version(&js.jailer_binary).await?;
        let binary = &self.settings.binary;
        match jailer::needs_loader(binary) {
            Ok(false) => {}
            Ok(true) => {
                return Err(HypervisorError::unavailable(format!(
                    "{} is dynamically linked; the jailer copies only the binary into its chroot, so jailer mode needs a statically linked (musl) firecracker",
                    binary.display()
                )));
            }
            Err(e) => return Err(io_unavailable("cannot inspect", binary, e)),
        }
        if !js.chroot_base.is_dir() {
            return Err(HypervisorError::unavailable(format!(
                "jailer chroot base {} is not a directory",
                js.chroot_base.display()
            )));
        }
        Ok(())
    }

    /// Firecracker prints `Firecracker v1.16.1`; kept as it is.
    fn version(&self, first_line: &str) -> String {
        first_line.to_owned()
    }

    fn prepare(
        &self,
        _: &Supervision,
        id: &VmId,
        config: &VmConfig,
        runtime: &RuntimeDir,
    ) -> Result<MicroVm, HypervisorError> {
        let instance_id = config::instance_id(id);
        let jail = self.jail(&instance_id)?;
        let socket = match &jail {
            Some(j) => j.host_path(JAIL_SOCKET),
            None => runtime.api_socket(),
        };
        if socket.as_os_str().len() > MAX_SOCKET_PATH_LEN {
            return Err(HypervisorError::spawn_failed(format!(
                "socket path {} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter runtime or chroot base directory",
                socket.display()
            )));
        }
        let metrics_path = match &jail {
            Some(j) => j.host_path(JAIL_METRICS),
            None => runtime.path().join(METRICS_FILE),
        };
        // Mapped here too, so a config Firecracker cannot take fails before any spawn.
        let pre = config::map(config, &self.runtime_files(runtime))?;
        Ok(MicroVm {
            config: config.clone(),
            instance_id,
            jail,
            metrics_path,
            pre,
            metrics: MetricsReader::new(),
        })
    }

    fn socket(&self, vm: &MicroVm, runtime: &RuntimeDir) -> PathBuf {
        match &vm.jail {
            Some(j) => j.host_path(JAIL_SOCKET),
            None => runtime.api_socket(),
        }
    }

    fn launch(
        &self,
        s: &Supervision,
        vm: &mut MicroVm,
        runtime: &RuntimeDir,
    ) -> Result<Launch, HypervisorError> {
        vm.metrics = MetricsReader::new();
        vm.pre = config::map(&vm.config, &self.runtime_files(runtime))?;
        let socket_arg = match &vm.jail {
            Some(_) => OsString::from(JAIL_SOCKET),
            None => runtime.api_socket().into(),
        };
        // The metrics file on the command line rather than `PUT /metrics`: one
        // API call less on every create, boot after a stop and restore.
        let fc_args: Vec<OsString> = vec![
            "--api-sock".into(),
            socket_arg,
            "--level".into(),
            "Warning".into(),
            "--show-level".into(),
            "--metrics-path".into(),
            vm.pre.metrics.metrics_path.clone().into(),
        ];
        if let (Some(js), Some(jail)) = (&self.settings.jailer, vm.jail.clone()) {
            return self.stage_jail(js, &jail, vm, runtime, &fc_args);
        }
        remove_file(&vm.metrics_path)?;
        truncate_console(&vm.pre)?;
        let mut args = fc_args;
        args.extend(["--id".into(), vm.instance_id.clone().into()]);
        // Firecracker binds `--api-sock` itself (it takes no descriptor), so it is probed.
        Ok(Launch {
            program: s.binary.clone(),
            args,
            listen_on_stdin: None,
        })
    }

    /// Under the jailer Firecracker's command line names only in-jail paths,
    /// so a jailed process is recognised by its root directory: the jail's.
    fn is_vmm_of(&self, pid: u32, id: &VmId, runtime: &RuntimeDir) -> bool {
        if self.settings.jailer.is_none() {
            let socket = runtime.api_socket();
            return crate::adapters::outbound::vmm::discovery::cmdline_names(pid, &socket);
        }
        match self.jail(&config::instance_id(id)) {
            Ok(Some(jail)) => {
                std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|root| root == jail.root)
            }
            Ok(None) | Err(_) => false,
        }
    }

    async fn ping(&self, a: Api<'_>) -> Result<(), HypervisorError> {
        client(a).describe().await.map(drop)
    }

    async fn configure(&self, a: Api<'_>, vm: &MicroVm) -> Result<(), HypervisorError> {
        let c = client(a);
        let pre = &vm.pre;
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

    /// `GET /` cannot tell a configured microVM from a bare process, so an
    /// adopted one reports what it says.
    async fn adopted_state(&self, a: Api<'_>, _: &MicroVm) -> Result<VmState, HypervisorError> {
        self.state(a).await
    }

    async fn state(&self, a: Api<'_>) -> Result<VmState, HypervisorError> {
        map_state(&client(a).describe().await?.state)
    }

    async fn call(&self, a: Api<'_>, call: Call) -> Result<(), HypervisorError> {
        let c = client(a);
        match call {
            Call::Boot => c.action(Action::InstanceStart).await,
            Call::Pause => c.patch_vm(VmRunState::Paused).await,
            Call::Resume => c.patch_vm(VmRunState::Resumed).await,
            // The supervision layer respawns instead (see `reboot` and `HARD_STOP`).
            Call::Reboot | Call::HardStop => Err(HypervisorError::Unsupported(format!(
                "firecracker has no {call:?} call"
            ))),
        }
    }

    async fn request_poweroff(&self, a: Api<'_>) -> Result<Poweroff, HypervisorError> {
        let c = client(a);
        if c.describe().await?.state == STATE_NOT_STARTED {
            return Ok(Poweroff::Impossible);
        }
        // A paused guest cannot react to the key press; an error here shows
        // in the next call.
        let _ = c.patch_vm(VmRunState::Resumed).await;
        match c.action(Action::SendCtrlAltDel).await {
            Ok(()) => Ok(Poweroff::Requested),
            Err(e) => {
                tracing::info!(error = %e, "SendCtrlAltDel failed; stopping hard");
                Ok(Poweroff::Impossible)
            }
        }
    }

    /// Firecracker has no exit call: delete goes straight to SIGTERM.
    async fn ask_to_exit(&self, _: Api<'_>) -> bool {
        false
    }

    async fn sample(&self, a: Api<'_>, vm: &mut MicroVm) -> Result<Sampled, HypervisorError> {
        let c = client(a);
        let state = map_state(&c.describe().await?.state)?;
        // The counters are in the metrics file only after a flush, which
        // Firecracker refuses before boot.
        if matches!(state, VmState::Running | VmState::Paused)
            && let Err(e) = c.action(Action::FlushMetrics).await
        {
            tracing::warn!(error = %e, "FlushMetrics failed");
        }
        // No `GET /vm/config` here: the VM's config is GetVmInfo's `config` already, and
        // backend_info carries the same keys on every backend.
        let backend_info = BTreeMap::new();
        if let Err(e) = vm.metrics.read_new(&vm.metrics_path) {
            tracing::warn!(error = %e, "cannot read the metrics file");
        }
        Ok(Sampled {
            state,
            network: vm.metrics.network(),
            storage: vm.metrics.storage(),
            backend_info,
            // Firecracker cannot change a VM's size: it is the config's.
            size: None,
        })
    }

    fn console_file(&self, config: &VmConfig, runtime: &RuntimeDir) -> Option<PathBuf> {
        config::console_path(config, &runtime.serial_file())
    }

    fn can_resize(&self) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported(FC_NO_RESIZE.to_owned()))
    }

    /// A diff needs the VMM to track dirty pages (`track_dirty_pages` at
    /// configuration or load); the caller checks that the VM has it and a parent.
    async fn snapshot(
        &self,
        a: Api<'_>,
        vm: &MicroVm,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<(), HypervisorError> {
        if vm.jail.is_some() {
            return Err(HypervisorError::Unsupported(FC_JAILED_SNAPSHOT.to_owned()));
        }
        let diff = kind == SnapshotKind::Diff;
        if diff && !vm.config.memory.track_dirty_pages {
            return Err(HypervisorError::Unsupported(FC_UNTRACKED_DIFF.to_owned()));
        }
        let (state, memory) = (dir.join(SNAPSHOT_STATE), dir.join(SNAPSHOT_MEMORY));
        client(a)
            .create_snapshot(&path_string(&state), &path_string(&memory), diff)
            .await
    }

    /// A fresh process (its metrics file named on its command line) takes
    /// its console settings, then loads the snapshot before anything else
    /// (Firecracker refuses a load after any device or machine
    /// configuration), on this VM's taps.
    async fn restore(
        &self,
        a: Api<'_>,
        vm: &MicroVm,
        _: &RuntimeDir,
        dir: &Path,
        resume: bool,
    ) -> Result<(), HypervisorError> {
        if vm.jail.is_some() {
            return Err(HypervisorError::Unsupported(FC_JAILED_SNAPSHOT.to_owned()));
        }
        let c = client(a);
        c.put_serial(&vm.pre.serial).await?;
        let taps: Vec<(String, String)> = vm
            .pre
            .network_interfaces
            .iter()
            .map(|n| (n.iface_id.clone(), n.host_dev_name.clone()))
            .collect();
        let (state, memory) = (dir.join(SNAPSHOT_STATE), dir.join(SNAPSHOT_MEMORY));
        // The snapshot names the source VM's disks and Firecracker's load has
        // no drive override: the load opens them, and each writable drive is
        // pointed at this VM's own copy before the guest runs again.
        let writable: Vec<&config::Drive> =
            vm.pre.drives.iter().filter(|d| !d.is_read_only).collect();
        let resume_in_load = resume && writable.is_empty();
        c.load_snapshot(
            &path_string(&state),
            &path_string(&memory),
            &taps,
            resume_in_load,
            vm.config.memory.track_dirty_pages,
        )
        .await?;
        for d in &writable {
            c.patch_drive_path(&d.drive_id, &d.path_on_host).await?;
        }
        if resume && !resume_in_load {
            c.patch_vm(VmRunState::Resumed).await?;
        }
        Ok(())
    }

    async fn resize(
        &self,
        _: Api<'_>,
        _: &mut MicroVm,
        _: VmSize,
    ) -> Result<VmSize, HypervisorError> {
        Err(HypervisorError::Unsupported(FC_NO_RESIZE.to_owned()))
    }

    async fn write_console(
        &self,
        _: &MicroVm,
        _: &RuntimeDir,
        _: &[u8],
    ) -> Result<usize, HypervisorError> {
        Err(HypervisorError::Unsupported(FC_NO_CONSOLE_INPUT.to_owned()))
    }

    fn describe(&self, vm: &MicroVm, runtime: &RuntimeDir, info: &mut BTreeMap<String, String>) {
        info.insert("instance_id".to_owned(), vm.instance_id.clone());
        if let Some(j) = &vm.jail {
            info.insert("jail_root".to_owned(), path_string(&j.root));
        }
        if let Some(p) = config::console_path(&vm.config, &runtime.serial_file()) {
            info.insert("serial_output".to_owned(), path_string(&p));
        }
    }

    fn remove_files(&self, vm: &MicroVm) -> Result<(), HypervisorError> {
        match &vm.jail {
            Some(j) => remove_tree(&j.instance_dir),
            None => Ok(()),
        }
    }

    /// The jail of a VM known only by its id; a chroot base or binary that
    /// no longer resolves is taken as given, as the jailer would have seen it.
    fn remove_leftovers(&self, _: &Supervision, id: &VmId) -> Result<(), HypervisorError> {
        let Some(js) = &self.settings.jailer else {
            return Ok(());
        };
        let base =
            std::fs::canonicalize(&js.chroot_base).unwrap_or_else(|_| js.chroot_base.clone());
        let exec = std::fs::canonicalize(&self.settings.binary)
            .unwrap_or_else(|_| self.settings.binary.clone());
        match Jail::layout(&base, &exec, &config::instance_id(id)) {
            Some(j) => remove_tree(&j.instance_dir),
            None => Ok(()),
        }
    }
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
    HypervisorError::unavailable_from(format!("{what} {}", p.display()), e)
}

fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_states_map_to_vmcp_states() {
        assert_eq!(map_state("Not started").expect("known"), VmState::Created);
        assert_eq!(map_state("Running").expect("known"), VmState::Running);
        assert_eq!(map_state("Paused").expect("known"), VmState::Paused);
        // The seed's mistake: Firecracker never says "NotStarted".
        assert!(matches!(
            map_state("NotStarted"),
            Err(HypervisorError::Protocol(_))
        ));
    }

    #[test]
    fn only_a_clean_exit_is_the_guests_own_shutdown() {
        use crate::adapters::outbound::vmm::ExitInfo;
        use std::os::unix::process::ExitStatusExt;
        let flavour = FcFlavour {
            settings: FirecrackerSettings::new("/bin/false", "/nonexistent"),
        };
        let exit = |raw: i32| ExitInfo {
            status: Some(std::process::ExitStatus::from_raw(raw)),
            log_tail: String::new(),
        };
        assert_eq!(flavour.classify_exit(&exit(0)), VmState::Shutdown);
        assert_eq!(
            flavour.classify_exit(&exit(1 << 8)),
            VmState::Failed,
            "exit status 1"
        );
        assert_eq!(flavour.classify_exit(&exit(9)), VmState::Failed, "SIGKILL");
        assert_eq!(
            flavour.classify_exit(&exit(15)),
            VmState::Failed,
            "SIGTERM (Firecracker does not catch it)"
        );
        let adopted = ExitInfo {
            status: None,
            log_tail: "anything".into(),
        };
        assert_eq!(
            flavour.classify_exit(&adopted),
            VmState::Failed,
            "unknown status counts as a crash"
        );
    }
}
