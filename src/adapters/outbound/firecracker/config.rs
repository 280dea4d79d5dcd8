//! The one place where a [`VmConfig`] becomes Firecracker's pre-boot
//! requests (`PUT /machine-config`, `/boot-source`, `/drives/{id}`,
//! `/network-interfaces/{id}`, `/metrics`, `/serial`) and where every field
//! Firecracker v1.16 cannot honour is rejected with a [`VmConfigError`] naming
//! the field and the backend. Pure: no I/O, so `Hypervisor::validate` and
//! `create` share it and each field's mapping has its own unit test.
//!
//! Rules decided here (and documented for callers):
//! - **Drive ids.** Firecracker accepts `[a-zA-Z0-9_]+`; VMCP ids may also hold
//!   `.` and `-`. A caller id that is already valid is used unchanged. Any other
//!   id has each `.` and `-` replaced by `_`; if that result is taken (by an
//!   unchanged id, or by an earlier changed one in the caller's order) it gets
//!   the suffix `_N` with the smallest `N >= 2` that is free. The result depends
//!   only on the config, so it is stable across respawns of the same VM.
//! - **Root device.** At most one drive is the root device; Firecracker then
//!   appends `root=/dev/vda` (`ro` or `rw` from its read-only flag) to the
//!   command line. With none, the guest boots from its initrd or kernel alone.
//! - **Boot args** are sent exactly as given, even when empty, so Firecracker's
//!   own default command line never replaces the caller's.
//! - **Console.** Firecracker always emulates the UART. Its output goes to the
//!   file named by `PUT /serial`: the VM's runtime-dir console file by default,
//!   the caller's `console.output` when given (not under the jailer, which can
//!   only reach files inside its chroot), and `/dev/null` when the console is
//!   disabled (under the jailer, which has no `/dev/null`, a file inside the
//!   chroot that is removed with the VM). Firecracker's stdout is not the
//!   console: it carries Firecracker's own log (no `PUT /logger`), which the
//!   shared supervisor captures and quotes when the VMM fails or exits.
//!   Firecracker writes the console file from offset 0 without truncating it,
//!   so VMCP empties it before each process start: it holds the current boot.
//! - **vCPUs** are 1 to 32 with SMT off; Firecracker picks the topology itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::domain::{VmConfig, VmConfigError, VmId};

/// Firecracker's vCPU ceiling (`machine-config.vcpu_count` is 1..=32).
pub const MAX_FC_VCPUS: i32 = 32;

/// Firecracker's instance id limit (`[A-Za-z0-9-]{1,64}`).
const MAX_INSTANCE_ID_LEN: usize = 64;

const BACKEND: &str = "the firecracker backend";
const MIB: i64 = 1 << 20;

/// Body of `PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPUs, 1..=32.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading; always off (VMCP offers no topology on Firecracker).
    pub smt: bool,
    /// KVM dirty-page tracking, for diff snapshots (`config.memory.track_dirty_pages`);
    /// sent only when on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub track_dirty_pages: bool,
}

/// Body of `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSource {
    /// Kernel image path, as Firecracker sees it.
    pub kernel_image_path: String,
    /// Initrd path, as Firecracker sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line, exactly as the caller gave it.
    #[serde(default)]
    pub boot_args: String,
}

/// Body of `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drive {
    /// Firecracker drive id (`[a-zA-Z0-9_]+`), derived from the caller's id.
    pub drive_id: String,
    /// Backing file, as Firecracker sees it.
    pub path_on_host: String,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Whether the guest may only read it.
    pub is_read_only: bool,
}

/// Body of `PUT /network-interfaces/{iface_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    /// Firecracker interface id (`[a-zA-Z0-9_]+`), derived like drive ids.
    pub iface_id: String,
    /// Host tap device.
    pub host_dev_name: String,
    /// Guest MAC; omitted to let the guest pick one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// Body of `PUT /serial`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDevice {
    /// File the guest's UART output goes to, as Firecracker sees it.
    pub serial_out_path: String,
}

/// Body of `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    /// Metrics file, as Firecracker sees it.
    pub metrics_path: String,
}

/// Where the guest's serial output goes, in the caller's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// The console file in the VM's runtime directory.
    RuntimeFile,
    /// A file the caller named (`config.console.output`).
    File(PathBuf),
    /// Nowhere: the console is disabled.
    Discard,
}

/// The runtime files Firecracker writes, as paths Firecracker sees (inside
/// the chroot under the jailer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeFiles {
    /// Firecracker's metrics file.
    pub metrics_path: String,
    /// The console file in the VM's runtime directory.
    pub console_path: String,
    /// Where a disabled console's output goes.
    pub discard_path: String,
}

/// Everything sent to Firecracker before `InstanceStart`, in sending order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreBoot {
    /// `PUT /metrics`.
    pub metrics: Metrics,
    /// `PUT /machine-config`.
    pub machine: MachineConfig,
    /// `PUT /boot-source`.
    pub boot_source: BootSource,
    /// `PUT /drives/{id}`, one per storage device, in the caller's order.
    pub drives: Vec<Drive>,
    /// `PUT /network-interfaces/{id}`, in the caller's order.
    pub network_interfaces: Vec<NetworkInterface>,
    /// `PUT /serial`.
    pub serial: SerialDevice,
    /// What the caller asked for the console (decides which file VMCP prepares).
    pub console: ConsoleTarget,
}

/// Rejects every field Firecracker cannot honour. No I/O.
pub fn check(config: &VmConfig) -> Result<(), VmConfigError> {
    let cpu = &config.cpu;
    if cpu.vcpu_count > MAX_FC_VCPUS {
        return Err(unsupported(
            "config.cpu.vcpu_count",
            format!(
                "{BACKEND} supports at most {MAX_FC_VCPUS} vCPUs, got {}",
                cpu.vcpu_count
            ),
        ));
    }
    if cpu.max_vcpu_count > cpu.vcpu_count {
        return Err(unsupported(
            "config.cpu.max_vcpu_count",
            format!(
                "{BACKEND} cannot hot-plug vCPUs: max_vcpu_count ({}) must be 0 or equal to vcpu_count ({})",
                cpu.max_vcpu_count, cpu.vcpu_count
            ),
        ));
    }
    if cpu.topology.is_some() {
        return Err(unsupported(
            "config.cpu.topology",
            format!("{BACKEND} cannot set a CPU topology (Firecracker chooses it); leave it unset"),
        ));
    }
    no_options("config.cpu.features", &cpu.features)?;
    let mem = &config.memory;
    if mem.hotplug_enabled || mem.max_size_bytes != 0 {
        let field = if mem.hotplug_enabled {
            "config.memory.hotplug_enabled"
        } else {
            "config.memory.max_size_bytes"
        };
        return Err(unsupported(
            field,
            format!("{BACKEND} does not offer memory hotplug through VMCP; leave it off"),
        ));
    }
    no_options("config.memory.backing", &mem.backing)?;
    no_options("config.boot.boot_options", &config.boot.boot_options)?;
    let mut roots = 0;
    for (i, d) in config.storage.iter().enumerate() {
        no_options(&format!("config.storage[{i}].options"), &d.options)?;
        if d.is_root_device {
            roots += 1;
            if roots > 1 {
                return Err(unsupported(
                    format!("config.storage[{i}].is_root_device"),
                    format!("{BACKEND} accepts exactly one root device at most"),
                ));
            }
        }
    }
    for (i, n) in config.network.iter().enumerate() {
        no_options(&format!("config.network[{i}].options"), &n.options)?;
    }
    Ok(())
}

/// The extra rule under the jailer: Firecracker can only open files inside
/// its chroot, so a console file elsewhere cannot be honoured.
pub fn check_jailed(config: &VmConfig) -> Result<(), VmConfigError> {
    if !config.console.output.is_empty() {
        return Err(unsupported(
            "config.console.output",
            format!(
                "{BACKEND} in jailer mode writes the console inside the chroot (linked as the runtime directory's console file); leave it empty"
            ),
        ));
    }
    Ok(())
}

/// Maps a (domain-validated) config to Firecracker's pre-boot requests, with
/// host paths. Under the jailer, [`super::jailer`] rewrites the paths.
pub fn map(config: &VmConfig, files: &RuntimeFiles) -> Result<PreBoot, VmConfigError> {
    check(config)?;
    let vcpu_count = u32::try_from(config.cpu.vcpu_count).map_err(|_| {
        VmConfigError::new(
            "config.cpu.vcpu_count",
            format!("must be positive, got {}", config.cpu.vcpu_count),
        )
    })?;
    let mem_size_mib = u64::try_from(config.memory.size_bytes / MIB).map_err(|_| {
        VmConfigError::new(
            "config.memory.size_bytes",
            format!("must be positive, got {}", config.memory.size_bytes),
        )
    })?;
    let drive_ids = device_ids(config.storage.iter().map(|d| d.id.as_str()));
    let iface_ids = device_ids(config.network.iter().map(|n| n.id.as_str()));
    let boot = &config.boot;
    let console = console_target(config);
    let serial_out_path = match &console {
        ConsoleTarget::RuntimeFile => files.console_path.clone(),
        ConsoleTarget::File(p) => p.to_string_lossy().into_owned(),
        ConsoleTarget::Discard => files.discard_path.clone(),
    };
    Ok(PreBoot {
        metrics: Metrics {
            metrics_path: files.metrics_path.clone(),
        },
        machine: MachineConfig {
            vcpu_count,
            mem_size_mib,
            smt: false,
            track_dirty_pages: config.memory.track_dirty_pages,
        },
        boot_source: BootSource {
            kernel_image_path: boot.kernel_path.clone(),
            initrd_path: (!boot.initrd_path.is_empty()).then(|| boot.initrd_path.clone()),
            // With the `ip=` of a guest address, if an interface has one.
            boot_args: crate::domain::network::kernel_args(config),
        },
        drives: config
            .storage
            .iter()
            .zip(drive_ids)
            .map(|(d, drive_id)| Drive {
                drive_id,
                path_on_host: d.path.clone(),
                is_root_device: d.is_root_device,
                is_read_only: d.read_only,
            })
            .collect(),
        network_interfaces: config
            .network
            .iter()
            .zip(iface_ids)
            .map(|(n, iface_id)| NetworkInterface {
                iface_id,
                host_dev_name: n.tap_device.clone(),
                guest_mac: (!n.mac_address.is_empty()).then(|| n.mac_address.to_ascii_lowercase()),
            })
            .collect(),
        serial: SerialDevice { serial_out_path },
        console,
    })
}

/// The id passed to `firecracker --id` (and the jailer's `--id`, which names
/// the chroot): Firecracker accepts `[A-Za-z0-9-]{1,64}`. A VM id that already
/// fits is used as is; otherwise `.` and `_` become `-` and, so that distinct
/// VM ids never share a chroot, `-` plus 8 hex digits of a hash of the
/// original id are appended (the base is shortened to keep 64 characters).
pub fn instance_id(id: &VmId) -> String {
    let s = id.as_str();
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return s.to_owned();
    }
    let base: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(MAX_INSTANCE_ID_LEN - 9)
        .collect();
    format!("{base}-{:08x}", fnv1a32(s.as_bytes()))
}

/// Where an operator finds the console output: `runtime_console` (the VM's
/// runtime-dir console file), the caller's file, or nowhere when disabled.
pub fn console_path(config: &VmConfig, runtime_console: &Path) -> Option<PathBuf> {
    match console_target(config) {
        ConsoleTarget::RuntimeFile => Some(runtime_console.to_owned()),
        ConsoleTarget::File(p) => Some(p),
        ConsoleTarget::Discard => None,
    }
}

fn console_target(config: &VmConfig) -> ConsoleTarget {
    let c = &config.console;
    if !c.enabled {
        ConsoleTarget::Discard
    } else if c.output.is_empty() {
        ConsoleTarget::RuntimeFile
    } else {
        ConsoleTarget::File(PathBuf::from(&c.output))
    }
}

/// Firecracker device ids for caller ids, in order; see the module header.
fn device_ids<'a>(ids: impl Iterator<Item = &'a str> + Clone) -> Vec<String> {
    let valid = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    let mut taken: Vec<String> = ids
        .clone()
        .filter(|s| valid(s))
        .map(str::to_owned)
        .collect();
    ids.map(|s| {
        if valid(s) {
            return s.to_owned();
        }
        let base = s.replace(['.', '-'], "_");
        let mut candidate = base.clone();
        let mut n = 2u32;
        while taken.contains(&candidate) {
            candidate = format!("{base}_{n}");
            n += 1;
        }
        taken.push(candidate.clone());
        candidate
    })
    .collect()
}

fn no_options(field: &str, m: &BTreeMap<String, String>) -> Result<(), VmConfigError> {
    match m.keys().next() {
        None => Ok(()),
        Some(k) => Err(unsupported(
            field,
            format!("{BACKEND} honours no options here; got {k:?}"),
        )),
    }
}

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> VmConfigError {
    VmConfigError::new(field, reason)
}

/// 32-bit FNV-1a: tiny, dependency-free and stable across Rust versions (unlike `DefaultHasher`).
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CpuTopology, NetworkInterface as Nic, StorageDevice};

    fn base() -> VmConfig {
        let mut c = crate::domain::config::tests::valid();
        c.console.enabled = true;
        c
    }

    fn files() -> RuntimeFiles {
        RuntimeFiles {
            metrics_path: "/run/vmcp/vm1/metrics.json".into(),
            console_path: "/run/vmcp/vm1/serial.log".into(),
            discard_path: "/dev/null".into(),
        }
    }

    fn mapped(c: &VmConfig) -> PreBoot {
        assert_eq!(c.validate(), Ok(()), "fixture must pass domain validation");
        map(c, &files()).expect("config should map")
    }

    fn rejected(c: &VmConfig) -> VmConfigError {
        let e = map(c, &files()).expect_err("config should be rejected");
        assert!(
            e.reason.contains("firecracker"),
            "reason names the backend: {e}"
        );
        assert_eq!(check(c), Err(e.clone()), "check and map agree");
        e
    }

    fn disk(id: &str) -> StorageDevice {
        StorageDevice {
            id: id.into(),
            path: format!("/images/{id}.img"),
            ..Default::default()
        }
    }

    fn nic(id: &str, mac: &str, tap: &str) -> Nic {
        Nic {
            id: id.into(),
            mac_address: mac.into(),
            tap_device: tap.into(),
            ..Default::default()
        }
    }

    #[test]
    fn vcpu_count_maps_and_is_capped_at_32() {
        let mut c = base();
        c.cpu.vcpu_count = 3;
        assert_eq!(mapped(&c).machine.vcpu_count, 3);
        c.cpu.vcpu_count = 32;
        assert_eq!(mapped(&c).machine.vcpu_count, 32);
        c.cpu.vcpu_count = 33;
        assert_eq!(rejected(&c).field, "config.cpu.vcpu_count");
    }

    #[test]
    fn mem_size_is_whole_mib() {
        let mut c = base();
        c.memory.size_bytes = 300 * MIB;
        assert_eq!(mapped(&c).machine.mem_size_mib, 300);
    }

    #[test]
    fn smt_is_always_off() {
        let mut c = base();
        c.cpu.vcpu_count = 4;
        assert!(!mapped(&c).machine.smt);
        let json = serde_json::to_value(&mapped(&c).machine).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"vcpu_count": 4, "mem_size_mib": 256, "smt": false})
        );
    }

    #[test]
    fn dirty_page_tracking_is_sent_only_when_asked_for() {
        let mut c = base();
        c.memory.track_dirty_pages = true;
        let json = serde_json::to_value(&mapped(&c).machine).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": true})
        );
        c.memory.track_dirty_pages = false;
        let json = serde_json::to_value(&mapped(&c).machine).expect("serializes");
        assert!(json.get("track_dirty_pages").is_none(), "{json}");
    }

    #[test]
    fn max_vcpu_count_above_vcpu_count_is_rejected() {
        let mut c = base();
        c.cpu.max_vcpu_count = c.cpu.vcpu_count;
        assert_eq!(mapped(&c).machine.vcpu_count, 2);
        c.cpu.max_vcpu_count = 4;
        assert_eq!(rejected(&c).field, "config.cpu.max_vcpu_count");
    }

    #[test]
    fn topology_is_rejected() {
        let mut c = base();
        c.cpu.topology = Some(CpuTopology {
            sockets: 1,
            cores_per_socket: 2,
            threads_per_core: 1,
        });
        assert_eq!(rejected(&c).field, "config.cpu.topology");
    }

    #[test]
    fn option_maps_are_rejected_by_field() {
        let opt = || BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let mut c = base();
        c.cpu.features = opt();
        assert_eq!(rejected(&c).field, "config.cpu.features");
        let mut c = base();
        c.memory.backing = opt();
        assert_eq!(rejected(&c).field, "config.memory.backing");
        let mut c = base();
        c.boot.boot_options = opt();
        assert_eq!(rejected(&c).field, "config.boot.boot_options");
        let mut c = base();
        c.storage = vec![
            disk("a"),
            StorageDevice {
                options: opt(),
                ..disk("b")
            },
        ];
        assert_eq!(rejected(&c).field, "config.storage[1].options");
        let mut c = base();
        c.network = vec![Nic {
            options: opt(),
            ..nic("eth0", "", "tap0")
        }];
        assert_eq!(rejected(&c).field, "config.network[0].options");
    }

    #[test]
    fn memory_hotplug_is_rejected() {
        let mut c = base();
        c.memory.hotplug_enabled = true;
        c.memory.max_size_bytes = 512 * MIB;
        assert_eq!(rejected(&c).field, "config.memory.hotplug_enabled");
    }

    #[test]
    fn kernel_image_path_is_the_kernel() {
        let c = base();
        assert_eq!(
            mapped(&c).boot_source.kernel_image_path,
            "/var/lib/vmcp/vmlinux"
        );
    }

    #[test]
    fn initrd_path_is_sent_only_when_set() {
        let mut c = base();
        assert_eq!(mapped(&c).boot_source.initrd_path, None);
        let json = serde_json::to_value(&mapped(&c).boot_source).expect("serializes");
        assert!(json.get("initrd_path").is_none(), "{json}");
        c.boot.initrd_path = "/images/initrd.img".into();
        assert_eq!(
            mapped(&c).boot_source.initrd_path.as_deref(),
            Some("/images/initrd.img")
        );
    }

    #[test]
    fn boot_args_are_sent_verbatim_even_when_empty() {
        let mut c = base();
        c.boot.kernel_args = "console=ttyS0 reboot=k panic=1".into();
        assert_eq!(
            mapped(&c).boot_source.boot_args,
            "console=ttyS0 reboot=k panic=1"
        );
        c.boot.kernel_args.clear();
        let json = serde_json::to_value(&mapped(&c).boot_source).expect("serializes");
        assert_eq!(
            json["boot_args"], "",
            "empty args replace Firecracker's default"
        );
    }

    #[test]
    fn a_guest_address_reaches_the_boot_args() {
        let mut c = base();
        c.boot.kernel_args = "console=ttyS0".into();
        c.network = vec![crate::domain::NetworkInterface {
            id: "eth0".into(),
            tap_device: "tap0".into(),
            guest_address: Some(crate::domain::GuestAddress {
                address: "10.0.0.2/30".into(),
                gateway: "10.0.0.1".into(),
                dns: vec!["10.0.0.1".into()],
            }),
            ..Default::default()
        }];
        assert_eq!(
            mapped(&c).boot_source.boot_args,
            "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.252::eth0:off:10.0.0.1"
        );
    }

    #[test]
    fn drive_path_on_host_and_read_only() {
        let mut c = base();
        c.storage = vec![
            StorageDevice {
                read_only: true,
                ..disk("ro")
            },
            disk("rw"),
        ];
        let d = mapped(&c).drives;
        assert_eq!(d[0].path_on_host, "/images/ro.img");
        assert!(d[0].is_read_only);
        assert_eq!(d[1].path_on_host, "/images/rw.img");
        assert!(!d[1].is_read_only);
    }

    #[test]
    fn exactly_one_root_device() {
        let mut c = base();
        c.storage = vec![
            disk("data"),
            StorageDevice {
                is_root_device: true,
                ..disk("root")
            },
        ];
        let d = mapped(&c).drives;
        assert_eq!(
            d.iter().map(|d| d.is_root_device).collect::<Vec<_>>(),
            [false, true]
        );
        c.storage = vec![disk("a"), disk("b")];
        assert!(mapped(&c).drives.iter().all(|d| !d.is_root_device));
        // The domain rejects two roots too; the backend re-checks on its own.
        c.storage = vec![
            StorageDevice {
                is_root_device: true,
                ..disk("a")
            },
            StorageDevice {
                is_root_device: true,
                ..disk("b")
            },
        ];
        assert_eq!(rejected(&c).field, "config.storage[1].is_root_device");
    }

    #[test]
    fn drive_ids_keep_valid_ids_and_fix_the_rest() {
        let mut c = base();
        c.storage = vec![
            disk("rootfs"),
            disk("data-1"),
            disk("cache.v2"),
            disk("a_b"),
        ];
        let ids: Vec<_> = mapped(&c).drives.into_iter().map(|d| d.drive_id).collect();
        assert_eq!(ids, ["rootfs", "data_1", "cache_v2", "a_b"]);
        for id in &ids {
            assert!(
                id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{id}"
            );
        }
    }

    #[test]
    fn drive_id_collisions_resolve_deterministically() {
        let mut c = base();
        // "a-b" and "a.b" both become "a_b", which the caller also uses verbatim.
        c.storage = vec![disk("a-b"), disk("a_b"), disk("a.b"), disk("a_b_2")];
        let ids: Vec<_> = mapped(&c).drives.into_iter().map(|d| d.drive_id).collect();
        assert_eq!(ids, ["a_b_3", "a_b", "a_b_4", "a_b_2"]);
        let unique: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // Stable: the same config maps to the same ids every time.
        let again: Vec<_> = mapped(&c).drives.into_iter().map(|d| d.drive_id).collect();
        assert_eq!(ids, again);
    }

    #[test]
    fn iface_id_is_derived_like_drive_ids() {
        let mut c = base();
        c.network = vec![nic("eth0", "", "tap0"), nic("eth-1", "", "tap1")];
        let n = mapped(&c).network_interfaces;
        assert_eq!(n[0].iface_id, "eth0");
        assert_eq!(n[1].iface_id, "eth_1");
    }

    #[test]
    fn host_dev_name_is_the_tap() {
        let mut c = base();
        c.network = vec![nic("eth0", "", "vmtap7")];
        assert_eq!(mapped(&c).network_interfaces[0].host_dev_name, "vmtap7");
    }

    #[test]
    fn guest_mac_is_lowercased_or_omitted() {
        let mut c = base();
        c.network = vec![
            nic("eth0", "52:54:00:AB:CD:EF", "tap0"),
            nic("eth1", "", "tap1"),
        ];
        let n = mapped(&c).network_interfaces;
        assert_eq!(n[0].guest_mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(n[1].guest_mac, None);
        let json = serde_json::to_value(&n[1]).expect("serializes");
        assert!(json.get("guest_mac").is_none(), "{json}");
    }

    #[test]
    fn metrics_point_into_the_runtime_dir() {
        let p = mapped(&base());
        assert_eq!(p.metrics.metrics_path, "/run/vmcp/vm1/metrics.json");
    }

    #[test]
    fn console_goes_to_runtime_file_caller_file_or_nowhere() {
        let mut c = base();
        let p = mapped(&c);
        assert_eq!(p.console, ConsoleTarget::RuntimeFile);
        assert_eq!(p.serial.serial_out_path, "/run/vmcp/vm1/serial.log");
        c.console.output = "/var/log/vm1.console".into();
        let p = mapped(&c);
        assert_eq!(
            p.console,
            ConsoleTarget::File(PathBuf::from("/var/log/vm1.console"))
        );
        assert_eq!(p.serial.serial_out_path, "/var/log/vm1.console");
        assert_eq!(
            check_jailed(&c).map_err(|e| e.field),
            Err("config.console.output".into())
        );
        let mut c = base();
        c.console.enabled = false;
        let p = mapped(&c);
        assert_eq!(p.console, ConsoleTarget::Discard);
        assert_eq!(p.serial.serial_out_path, "/dev/null");
        assert_eq!(check_jailed(&c), Ok(()));
    }

    #[test]
    fn instance_id_fits_firecracker_and_stays_distinct() {
        let ok = VmId::parse("vm-1").expect("valid");
        assert_eq!(instance_id(&ok), "vm-1");
        let a = instance_id(&VmId::parse("a.b").expect("valid"));
        let b = instance_id(&VmId::parse("a_b").expect("valid"));
        assert_ne!(a, b);
        for s in [&a, &b] {
            assert!(s.starts_with("a-b-"), "{s}");
            assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'));
        }
        let long = instance_id(&VmId::parse(&format!("x{}", "_".repeat(63))).expect("valid"));
        assert_eq!(long.len(), MAX_INSTANCE_ID_LEN);
        assert_eq!(
            long,
            instance_id(&VmId::parse(&format!("x{}", "_".repeat(63))).expect("valid"))
        );
    }
}
