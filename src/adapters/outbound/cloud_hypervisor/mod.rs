//! The Cloud Hypervisor flavour of the shared supervision layer
//! ([`crate::adapters::outbound::vmm`]): one `cloud-hypervisor` process per
//! VM, driven through its REST API ([`client`]) with the config mapped in
//! one place ([`config`]) and its event monitor watched ([`events`]).
//!
//! Facts about CH v53 this flavour is built on (checked against the real
//! binary):
//!
//! - `vm.shutdown` is a hard stop and leaves the VM `Created` (bootable), the
//!   process running; a graceful stop is `vm.power-button`, which only a
//!   guest with ACPI handles; when the guest powers off, the process exits
//!   with status 0 (leaving its socket file behind). Booting again then
//!   starts a new VMM with the same config.
//! - `vm.reboot` reboots in place (and truncates a file-backed serial output).
//! - State refusals answer 404 (no VM created) or 500 with a JSON array of
//!   strings; those become [`HypervisorError::InvalidState`].
//! - `vm.counters` answers 500 unless the VM runs, so counters are read only then.
//! - SIGTERM also makes CH exit 0, so an external `kill` of the VMM looks
//!   like a guest poweroff; SIGKILL leaves the socket and its `.lock` behind.
//! - `--event-monitor path=<file>` reports every VM state change, also those
//!   made by other clients on the socket ([`events`]).
//! - `--api-socket path=<socket>,fd=<n>` serves the listening socket `n`
//!   (the `fd=` wins; `path=` is then only on the command line): VMCP binds
//!   it and hands it over as stdin, so a request sent right after the spawn
//!   is answered as soon as the API thread runs, with no probing meanwhile.
//!   CH then neither removes the socket file nor takes its `.lock`.

pub mod client;
pub mod config;
pub mod events;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::adapters::outbound::vmm::process::read_start_time;
use crate::adapters::outbound::vmm::{
    Api, Call, Flavour, HardStop, Launch, Poweroff, Reboot, RuntimeDir, Sampled, Supervision,
    VmmBackend, VmmVm, Watch, Watcher,
};
use crate::domain::snapshot::SnapshotKind;
use crate::domain::{VmConfig, VmConfigError, VmId, VmSize, VmState};
use crate::ports::{BackendKind, HypervisorError, NetworkStats, StorageStats, VmmProcess};

use self::client::{ChApi, Counters};
use self::config::{ChVmConfig, ConsoleDefaults};

/// The Cloud Hypervisor backend.
pub type CloudHypervisor = VmmBackend<ChFlavour>;
/// One Cloud Hypervisor VM's handle.
pub type ChVm = VmmVm<ChFlavour>;

/// How long a new VMM may take to answer `vmm.ping`.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long delete waits for the VMM to exit after `vmm.shutdown` (and after
/// SIGTERM) before the next step.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// Bound on one readiness ping.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// ACPI memory hot-plug adds DIMMs whose size is a multiple of this.
const HOTPLUG_DIMM: i64 = 128 << 20;
/// Why WriteConsole is refused on this backend.
const CH_NO_CONSOLE_INPUT: &str = "cloudhypervisor: console input is not available: VMCP connects the serial port to a file, so that the console is kept while VMCP is down, and Cloud Hypervisor takes serial input only on a pty or socket";

/// Why a diff snapshot is refused on this backend.
const CH_NO_DIFF: &str = "cloudhypervisor has no diff snapshots (vm.snapshot always writes the whole memory); take a full one";

/// Where a restore's patched copy of the snapshot is staged, in the runtime directory.
const RESTORE_DIR: &str = "restore";

/// Stages `snapshot` for `vm.restore` in `staged`: `config.json` with this
/// VM's serial console and taps, links to every other file.
fn stage_restore(vm: &ChVmConfig, snapshot: &Path, staged: &Path) -> Result<(), HypervisorError> {
    let fail = |what: &str, path: &Path, e: std::io::Error| {
        HypervisorError::unavailable_from(format!("{what} {}", path.display()), e)
    };
    match std::fs::remove_dir_all(staged) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(fail("cannot clear", staged, e));
        }
        _ => {}
    }
    std::fs::create_dir(staged).map_err(|e| fail("cannot create", staged, e))?;
    let entries = std::fs::read_dir(snapshot).map_err(|e| fail("cannot read", snapshot, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| fail("cannot read", snapshot, e))?;
        let name = entry.file_name();
        if name == "config.json" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), staged.join(&name))
            .map_err(|e| fail("cannot link", &entry.path(), e))?;
    }
    let source = snapshot.join("config.json");
    let text = std::fs::read_to_string(&source).map_err(|e| fail("cannot read", &source, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        HypervisorError::Protocol(format!(
            "{}: not Cloud Hypervisor's config: {e}",
            source.display()
        ))
    })?;
    config["serial"] = serde_json::to_value(&vm.serial)
        .map_err(|e| HypervisorError::Protocol(format!("serial config: {e}")))?;
    if let Some(nets) = config
        .get_mut("net")
        .and_then(serde_json::Value::as_array_mut)
    {
        for net in nets {
            let id = net
                .get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            if let Some(ours) = vm.net.iter().find(|n| Some(&n.id) == id.as_ref()) {
                net["tap"] = serde_json::Value::String(ours.tap.clone());
            }
        }
    }
    // A clone's writable disks are its own copies (same ids, other paths).
    if let Some(disks) = config
        .get_mut("disks")
        .and_then(serde_json::Value::as_array_mut)
    {
        for disk in disks {
            let id = disk
                .get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            if let Some(ours) = vm.disks.iter().find(|d| Some(&d.id) == id.as_ref()) {
                disk["path"] = serde_json::Value::String(ours.path.clone());
            }
        }
    }
    let target = staged.join("config.json");
    std::fs::write(&target, config.to_string()).map_err(|e| fail("cannot write", &target, e))
}

/// A positive count as Cloud Hypervisor takes it.
fn count(field: &str, n: i32) -> Result<u32, HypervisorError> {
    u32::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| VmConfigError::new(field, format!("must be positive, got {n}")).into())
}

/// Cloud Hypervisor's specifics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChFlavour;

impl CloudHypervisor {
    /// A backend running `binary` (a path, or a name looked up on PATH),
    /// keeping per-VM runtime directories under `runtime_root` and bounding
    /// every API call by `call_timeout`.
    pub fn new(
        binary: impl Into<PathBuf>,
        runtime_root: impl Into<PathBuf>,
        call_timeout: Duration,
    ) -> Self {
        let mut settings = Supervision::new(binary, runtime_root, call_timeout);
        settings.ready_timeout = DEFAULT_READY_TIMEOUT;
        settings.stop_grace = DEFAULT_STOP_GRACE;
        VmmBackend::with_flavour(ChFlavour, settings)
    }

    /// Identifies a Cloud Hypervisor already listening on `socket` (for
    /// example at the seed's single `UNKEY_VMCP_CH_ENDPOINT`) so that it can
    /// be [adopted](crate::ports::Hypervisor::adopt): its pid from
    /// `vmm.ping`, its start time from /proc.
    pub async fn probe_endpoint(&self, socket: &Path) -> Result<VmmProcess, HypervisorError> {
        let http = self.http();
        let ping = ChApi::new(http, socket).ping(http.timeout()).await?;
        let pid = ping
            .pid
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| HypervisorError::Protocol("vmm.ping reported no pid".to_owned()))?;
        let start_time = read_start_time(pid).map_err(|e| {
            HypervisorError::Gone(format!(
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
}

/// Sums CH's per-device counters into VMCP's network and storage totals.
/// The numbers are the VMM's to choose: a sum saturates rather than
/// overflow (a panic in the owner task, or a wrap to a negative total).
pub fn sum_counters(counters: &Counters) -> (NetworkStats, StorageStats) {
    let mut net = NetworkStats::default();
    let mut disk = StorageStats::default();
    for device in counters.values() {
        let get = |k: &str| device.get(k).copied().unwrap_or(0);
        let add = |total: &mut i64, k: &str| *total = total.saturating_add(get(k));
        add(&mut net.bytes_received, "rx_bytes");
        add(&mut net.bytes_transmitted, "tx_bytes");
        add(&mut net.packets_received, "rx_frames");
        add(&mut net.packets_transmitted, "tx_frames");
        add(&mut disk.bytes_read, "read_bytes");
        add(&mut disk.bytes_written, "write_bytes");
        add(&mut disk.read_operations, "read_ops");
        add(&mut disk.write_operations, "write_ops");
    }
    (net, disk)
}

fn api<'a>(api: Api<'a>) -> ChApi<'a> {
    ChApi::new(api.http, api.socket)
}

impl Flavour for ChFlavour {
    const KIND: BackendKind = BackendKind::CloudHypervisor;
    const HARD_STOP: HardStop = HardStop::KeepsProcess;

    /// The VM as CH takes it in `vm.create`; kept to create it again in a new VMM.
    type Vm = ChVmConfig;

    fn reboot(&self) -> Reboot {
        Reboot::InPlace
    }

    fn validate(&self, config: &VmConfig) -> Result<(), VmConfigError> {
        config::check(config)
    }

    async fn check(&self, _: &Supervision) -> Result<(), HypervisorError> {
        Ok(())
    }

    /// `cloud-hypervisor v53.0` → `v53.0`.
    fn version(&self, first_line: &str) -> String {
        first_line
            .strip_prefix("cloud-hypervisor ")
            .unwrap_or(first_line)
            .to_owned()
    }

    fn prepare(
        &self,
        _: &Supervision,
        _: &VmId,
        config: &VmConfig,
        runtime: &RuntimeDir,
    ) -> Result<ChVmConfig, HypervisorError> {
        let defaults = ConsoleDefaults {
            serial_file: runtime.serial_file().to_string_lossy().into_owned(),
        };
        Ok(config::to_ch(config, &defaults)?)
    }

    fn socket(&self, _: &ChVmConfig, runtime: &RuntimeDir) -> PathBuf {
        runtime.api_socket()
    }

    fn launch(
        &self,
        s: &Supervision,
        _: &mut ChVmConfig,
        runtime: &RuntimeDir,
    ) -> Result<Launch, HypervisorError> {
        // The new process's events start a new file, read from its start.
        let events = runtime.path().join(events::EVENTS_FILE);
        match std::fs::remove_file(&events) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                let message = format!("cannot remove {}", events.display());
                return Err(HypervisorError::unavailable_from(message, e));
            }
        }
        let path_arg = |p: &Path| {
            let mut arg = OsString::from("path=");
            arg.push(p);
            arg
        };
        // VMCP binds the API socket and hands it over as stdin (`fd=0`, which
        // CH prefers over `path=`): CH answers the first request as soon as
        // its API thread runs, with no probing until it has bound a socket.
        // `path=` stays on the command line, which is how discovery and
        // adoption recognise the VM's VMM.
        let mut api_socket = path_arg(&runtime.api_socket());
        api_socket.push(",fd=0");
        Ok(Launch {
            program: s.binary.clone(),
            args: vec![
                "--api-socket".into(),
                api_socket,
                "--event-monitor".into(),
                path_arg(&events),
            ],
            listen_on_stdin: Some(runtime.api_socket()),
        })
    }

    async fn ping(&self, a: Api<'_>) -> Result<(), HypervisorError> {
        api(a).ping(PING_TIMEOUT).await.map(drop)
    }

    async fn configure(&self, a: Api<'_>, vm: &ChVmConfig) -> Result<(), HypervisorError> {
        api(a).create(vm).await
    }

    async fn adopted_state(&self, a: Api<'_>, vm: &ChVmConfig) -> Result<VmState, HypervisorError> {
        let ch = api(a);
        match ch.info().await {
            Ok(info) => client::parse_state(&info.state),
            // VMCP stopped between spawning this VMM and creating its VM.
            Err(HypervisorError::InvalidState(_)) => {
                ch.create(vm).await?;
                ch.state().await
            }
            Err(e) => Err(e),
        }
    }

    async fn state(&self, a: Api<'_>) -> Result<VmState, HypervisorError> {
        api(a).state().await
    }

    async fn call(&self, a: Api<'_>, call: Call) -> Result<(), HypervisorError> {
        let ch = api(a);
        match call {
            Call::Boot => ch.boot().await,
            Call::Pause => ch.pause().await,
            Call::Resume => ch.resume().await,
            // `vm.reboot` resets the VM without the guest's cooperation, so a
            // forced and a polite reboot are the same call.
            Call::Reboot => ch.reboot().await,
            Call::HardStop => ch.shutdown().await,
        }
    }

    async fn request_poweroff(&self, a: Api<'_>) -> Result<Poweroff, HypervisorError> {
        let ch = api(a);
        // A paused guest cannot react to the power button.
        if ch.state().await? == VmState::Paused {
            return Ok(Poweroff::Impossible);
        }
        ch.power_button().await?;
        Ok(Poweroff::Requested)
    }

    async fn ask_to_exit(&self, a: Api<'_>) -> bool {
        let ch = api(a);
        // A refusal or a dead socket does not matter: the process is
        // signalled after the grace period either way.
        if let Err(e) = ch.delete().await {
            tracing::debug!(error = %e, "vm.delete before vmm.shutdown failed");
        }
        if let Err(e) = ch.vmm_shutdown().await {
            tracing::debug!(error = %e, "vmm.shutdown failed");
        }
        true
    }

    async fn sample(&self, a: Api<'_>, _: &mut ChVmConfig) -> Result<Sampled, HypervisorError> {
        let ch = api(a);
        let info = ch.info().await?;
        let state = client::parse_state(&info.state)?;
        let mut sampled = Sampled {
            state,
            network: NetworkStats::default(),
            storage: StorageStats::default(),
            backend_info: BTreeMap::new(),
            size: info.size(),
        };
        if let Some(size) = info.memory_actual_size {
            let size = size.to_string();
            sampled
                .backend_info
                .insert("memory_actual_size".into(), size);
        }
        if matches!(state, VmState::Running | VmState::Paused) {
            match ch.counters().await {
                Ok(counters) => (sampled.network, sampled.storage) = sum_counters(&counters),
                Err(e) => tracing::debug!(error = %e, "vm.counters unavailable"),
            }
        }
        Ok(sampled)
    }

    fn console_file(&self, config: &VmConfig, runtime: &RuntimeDir) -> Option<PathBuf> {
        config.console.enabled.then(|| {
            if config.console.output.is_empty() {
                runtime.serial_file()
            } else {
                PathBuf::from(&config.console.output)
            }
        })
    }

    fn can_resize(&self) -> Result<(), HypervisorError> {
        Ok(())
    }

    async fn snapshot(
        &self,
        a: Api<'_>,
        _: &ChVmConfig,
        dir: &Path,
        kind: SnapshotKind,
    ) -> Result<(), HypervisorError> {
        match kind {
            SnapshotKind::Full => api(a).snapshot(dir).await,
            SnapshotKind::Diff => Err(HypervisorError::Unsupported(CH_NO_DIFF.to_owned())),
        }
    }

    /// `vm.restore` reads the VM's config from the snapshot's `config.json`,
    /// which names the source VM's console file, taps and disks; this VM's own are
    /// patched into a copy next to links to the snapshot's other files (the
    /// snapshot itself stays as it was, for other restores).
    async fn restore(
        &self,
        a: Api<'_>,
        vm: &ChVmConfig,
        runtime: &RuntimeDir,
        dir: &Path,
        resume: bool,
    ) -> Result<(), HypervisorError> {
        let staged = runtime.path().join(RESTORE_DIR);
        stage_restore(vm, dir, &staged)?;
        let result = api(a).restore(&staged).await;
        let result = match result {
            Ok(()) if resume => api(a).resume().await,
            other => other,
        };
        // Cloud Hypervisor has read what it needs (memory is copied in).
        if let Err(e) = std::fs::remove_dir_all(&staged) {
            tracing::debug!(error = %e, dir = %staged.display(), "cannot remove the staged restore");
        }
        result
    }

    /// `vm.resize` within the ceilings the VM was created with. ACPI memory
    /// hot-plug only adds memory, in DIMMs of a multiple of 128 MiB; Cloud
    /// Hypervisor would record a smaller size without removing anything, so
    /// a shrink is refused here rather than let its config lie.
    async fn resize(
        &self,
        a: Api<'_>,
        vm: &mut ChVmConfig,
        size: VmSize,
    ) -> Result<VmSize, HypervisorError> {
        let ch = api(a);
        let current = ch.info().await?.size().ok_or_else(|| {
            HypervisorError::Protocol("vm.info reported no cpus or memory size".to_owned())
        })?;
        let vcpus = (size.vcpu_count != current.vcpu_count)
            .then(|| count("vcpu_count", size.vcpu_count))
            .transpose()?;
        let ram = if size.memory_bytes == current.memory_bytes {
            None
        } else if size.memory_bytes < current.memory_bytes {
            return Err(VmConfigError::new(
                "memory_bytes",
                format!(
                    "cloudhypervisor cannot remove memory (ACPI hot-plug only adds it); the VM has {} bytes",
                    current.memory_bytes
                ),
            )
            .into());
        } else if (size.memory_bytes - current.memory_bytes) % HOTPLUG_DIMM != 0 {
            return Err(VmConfigError::new(
                "memory_bytes",
                format!(
                    "cloudhypervisor adds memory in multiples of 128 MiB; {} bytes more than the VM's {} is not one",
                    size.memory_bytes - current.memory_bytes,
                    current.memory_bytes
                ),
            )
            .into());
        } else {
            Some(size.memory_bytes)
        };
        ch.resize(vcpus, ram).await?;
        let now = ch.info().await?.size().ok_or_else(|| {
            HypervisorError::Protocol("vm.info reported no cpus or memory size".to_owned())
        })?;
        // A VMM started later (a boot after a stop) gets the new size, with
        // the same ceilings.
        let ceiling = vm.memory.size + vm.memory.hotplug_size.unwrap_or(0);
        vm.cpus.boot_vcpus = u32::try_from(now.vcpu_count).unwrap_or(vm.cpus.boot_vcpus);
        vm.memory.size = now.memory_bytes;
        if vm.memory.hotplug_size.is_some() {
            vm.memory.hotplug_size = Some(ceiling - now.memory_bytes);
        }
        Ok(now)
    }

    async fn write_console(
        &self,
        _: &ChVmConfig,
        _: &RuntimeDir,
        _: &[u8],
    ) -> Result<usize, HypervisorError> {
        Err(HypervisorError::Unsupported(CH_NO_CONSOLE_INPUT.to_owned()))
    }

    fn describe(&self, vm: &ChVmConfig, _: &RuntimeDir, info: &mut BTreeMap<String, String>) {
        if let Some(serial) = config::serial_output(vm) {
            info.insert("serial_output".to_owned(), serial.to_owned());
        }
    }

    fn watch(&self, watch: Watch) -> Option<Watcher> {
        Some(Box::pin(events::watch(watch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(json: &str) -> Counters {
        serde_json::from_str(json).expect("counters")
    }

    #[test]
    fn counters_are_summed_over_devices() {
        let (net, disk) = sum_counters(&counters(
            r#"{"_net0": {"rx_bytes": 1000, "tx_bytes": 2000, "rx_frames": 10, "tx_frames": 20},
                "_net1": {"rx_bytes": 1, "tx_bytes": 2, "rx_frames": 3, "tx_frames": 4},
                "_disk0": {"read_bytes": 4096, "write_bytes": 512, "read_ops": 8, "write_ops": 1}}"#,
        ));
        assert_eq!(
            net,
            NetworkStats {
                bytes_received: 1001,
                bytes_transmitted: 2002,
                packets_received: 13,
                packets_transmitted: 24
            }
        );
        assert_eq!(
            disk,
            StorageStats {
                bytes_read: 4096,
                bytes_written: 512,
                read_operations: 8,
                write_operations: 1
            }
        );
    }

    /// Seen while pointing the VMM-response fuzz target at this function:
    /// two devices near i64::MAX overflowed the sum (a panic in the owner
    /// task in a debug build, a negative total in a release one).
    #[test]
    fn huge_counters_saturate_instead_of_overflowing() {
        let max = i64::MAX;
        let (net, disk) = sum_counters(&counters(&format!(
            r#"{{"a": {{"rx_bytes": {max}, "read_bytes": {max}}},
                "b": {{"rx_bytes": {max}, "read_bytes": 1}}}}"#
        )));
        assert_eq!(net.bytes_received, max);
        assert_eq!(disk.bytes_read, max);
    }
}
