//! The one place where VMCP's [`VmConfig`] becomes Cloud Hypervisor's
//! `VmConfig` JSON (`PUT /api/v1/vm.create`, schema in cloud-hypervisor.yaml
//! v53). Every field is either mapped or rejected with a [`VmConfigError`]
//! naming it and saying it is not supported by cloudhypervisor; nothing is
//! dropped. VmConfig.metadata stays in VMCP and never reaches the VMM.

use serde::{Deserialize, Serialize};

use crate::domain::{VmConfig, VmConfigError};

/// Where a VM's serial console goes when the caller names no file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleDefaults {
    /// The runtime directory's serial output file.
    pub serial_file: String,
}

/// Cloud Hypervisor `VmConfig` (the subset VMCP sets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChVmConfig {
    /// vCPUs.
    pub cpus: ChCpus,
    /// Guest memory.
    pub memory: ChMemory,
    /// Kernel, initramfs, command line.
    pub payload: ChPayload,
    /// Block devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<ChDisk>,
    /// Network devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<ChNet>,
    /// Entropy source.
    pub rng: ChRng,
    /// The 16550 serial port (the guest's console=ttyS0).
    pub serial: ChConsole,
    /// The virtio-console device.
    pub console: ChConsole,
}

/// `CpusConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChCpus {
    /// vCPUs at boot.
    pub boot_vcpus: u32,
    /// vCPUs the VM may grow to.
    pub max_vcpus: u32,
    /// Guest topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<ChTopology>,
}

/// `CpuTopology`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChTopology {
    /// Threads per core.
    pub threads_per_core: u32,
    /// Cores per die.
    pub cores_per_die: u32,
    /// Dies per package (VMCP always uses 1).
    pub dies_per_package: u32,
    /// Packages (sockets).
    pub packages: u32,
}

/// `MemoryConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChMemory {
    /// Boot memory, bytes.
    pub size: i64,
    /// Room for hot-plugged memory, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_size: Option<i64>,
    /// `Acpi` when hotplug is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_method: Option<String>,
}

/// `PayloadConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChPayload {
    /// Kernel image path.
    pub kernel: String,
    /// Initramfs path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// `DiskConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChDisk {
    /// Backing file or device.
    pub path: String,
    /// Read-only for the guest.
    pub readonly: bool,
    /// Device id (the caller's storage id).
    pub id: String,
}

/// `NetConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChNet {
    /// Host tap device.
    pub tap: String,
    /// Guest MAC; CH picks a random one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Device id (the caller's interface id).
    pub id: String,
    /// Queues (two per pair): one pair per boot vCPU on a managed tap of a
    /// VM with more than one vCPU, which VMCP creates multi-queue to match;
    /// absent (CH's default, one pair) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u32>,
}

/// `RngConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChRng {
    /// Entropy source on the host.
    pub src: String,
}

/// `SerialConfig` / `ConsoleConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChConsole {
    /// `Off`, `File`, … (ConsoleMode).
    pub mode: String,
    /// Output file when `mode` is `File`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl ChConsole {
    fn off() -> Self {
        Self {
            mode: "Off".to_owned(),
            file: None,
        }
    }
}

/// The host entropy source every VM's virtio-rng reads.
pub const RNG_SOURCE: &str = "/dev/urandom";

fn unsupported(field: impl Into<String>, what: &str) -> VmConfigError {
    VmConfigError::new(field, format!("{what} not supported by cloudhypervisor"))
}

/// Rejects anything Cloud Hypervisor cannot honour, naming the field.
/// Assumes `config` passed [`VmConfig::validate`].
pub fn check(config: &VmConfig) -> Result<(), VmConfigError> {
    if !config.cpu.features.is_empty() {
        return Err(unsupported(
            "config.cpu.features",
            "CPU feature switches are",
        ));
    }
    if !config.memory.backing.is_empty() {
        return Err(unsupported(
            "config.memory.backing",
            "memory backing options are",
        ));
    }
    if config.memory.track_dirty_pages {
        return Err(VmConfigError::new(
            "config.memory.track_dirty_pages",
            "dirty-page tracking is not supported by cloudhypervisor: it has no diff snapshots; leave it off",
        ));
    }
    if config.memory.hotplug_enabled && config.memory.max_size_bytes <= config.memory.size_bytes {
        return Err(VmConfigError::new(
            "config.memory.max_size_bytes",
            "with hotplug_enabled must be larger than size_bytes: a zero-sized hotplug region is not supported by cloudhypervisor",
        ));
    }
    if !config.boot.boot_options.is_empty() {
        return Err(unsupported("config.boot.boot_options", "boot options are"));
    }
    for (i, d) in config.storage.iter().enumerate() {
        if !d.options.is_empty() {
            return Err(unsupported(
                format!("config.storage[{i}].options"),
                "storage device options are",
            ));
        }
    }
    for (i, n) in config.network.iter().enumerate() {
        if !n.options.is_empty() {
            return Err(unsupported(
                format!("config.network[{i}].options"),
                "network interface options are",
            ));
        }
    }
    Ok(())
}

fn count(field: &str, v: i32) -> Result<u32, VmConfigError> {
    u32::try_from(v).map_err(|_| VmConfigError::new(field, format!("must be positive, got {v}")))
}

/// Maps `config` to Cloud Hypervisor's JSON. The serial port writes to
/// `console.output` or, when that is empty, to `defaults.serial_file`; with
/// the console disabled the serial port is off. The virtio console is
/// always off (VMCP exposes one console, the serial port).
pub fn to_ch(config: &VmConfig, defaults: &ConsoleDefaults) -> Result<ChVmConfig, VmConfigError> {
    check(config)?;
    let boot_vcpus = count("config.cpu.vcpu_count", config.cpu.vcpu_count)?;
    let max_vcpus = count("config.cpu.max_vcpu_count", config.effective_max_vcpus())?;
    let topology = match &config.cpu.topology {
        Some(t) => Some(ChTopology {
            threads_per_core: count("config.cpu.topology.threads_per_core", t.threads_per_core)?,
            cores_per_die: count("config.cpu.topology.cores_per_socket", t.cores_per_socket)?,
            dies_per_package: 1,
            packages: count("config.cpu.topology.sockets", t.sockets)?,
        }),
        None => None,
    };
    let memory = if config.memory.hotplug_enabled {
        ChMemory {
            size: config.memory.size_bytes,
            hotplug_size: Some(config.memory.max_size_bytes - config.memory.size_bytes),
            hotplug_method: Some("Acpi".to_owned()),
        }
    } else {
        ChMemory {
            size: config.memory.size_bytes,
            hotplug_size: None,
            hotplug_method: None,
        }
    };
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    let payload = ChPayload {
        kernel: config.boot.kernel_path.clone(),
        initramfs: non_empty(&config.boot.initrd_path),
        // With the `ip=` of a guest address, if an interface has one.
        cmdline: non_empty(&crate::domain::network::kernel_args(config)),
    };
    // The root device goes first so the guest sees it as /dev/vda; the
    // others keep the caller's order.
    let (roots, others): (Vec<_>, Vec<_>) = config.storage.iter().partition(|d| d.is_root_device);
    let disks = roots
        .into_iter()
        .chain(others)
        .map(|d| ChDisk {
            path: d.path.clone(),
            readonly: d.read_only,
            id: d.id.clone(),
        })
        .collect();
    let net = config
        .network
        .iter()
        .map(|n| ChNet {
            tap: n.tap_device.clone(),
            mac: non_empty(&n.mac_address.to_ascii_lowercase()),
            id: n.id.clone(),
            num_queues: (crate::domain::network::is_managed(n) && config.cpu.vcpu_count > 1)
                .then(|| 2 * u32::try_from(config.cpu.vcpu_count).unwrap_or(1)),
        })
        .collect();
    let serial = if config.console.enabled {
        ChConsole {
            mode: "File".to_owned(),
            file: Some(
                non_empty(&config.console.output).unwrap_or_else(|| defaults.serial_file.clone()),
            ),
        }
    } else {
        ChConsole::off()
    };
    Ok(ChVmConfig {
        cpus: ChCpus {
            boot_vcpus,
            max_vcpus,
            topology,
        },
        memory,
        payload,
        disks,
        net,
        rng: ChRng {
            src: RNG_SOURCE.to_owned(),
        },
        serial,
        console: ChConsole::off(),
    })
}

/// The serial output file a mapped config writes to, if any.
pub fn serial_output(ch: &ChVmConfig) -> Option<&str> {
    (ch.serial.mode == "File")
        .then_some(ch.serial.file.as_deref())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        BootConfig, ConsoleConfig, CpuConfig, CpuTopology, MemoryConfig, NetworkInterface,
        StorageDevice,
    };
    use serde_json::{Value, json};

    const MIB: i64 = 1 << 20;

    fn base() -> VmConfig {
        VmConfig {
            cpu: CpuConfig {
                vcpu_count: 2,
                ..Default::default()
            },
            memory: MemoryConfig {
                size_bytes: 256 * MIB,
                ..Default::default()
            },
            boot: BootConfig {
                kernel_path: "/k/vmlinux".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn defaults() -> ConsoleDefaults {
        ConsoleDefaults {
            serial_file: "/run/vmcp/vm1/serial.log".into(),
        }
    }

    fn json_of(c: &VmConfig) -> Value {
        c.validate().expect("fixture is valid");
        serde_json::to_value(to_ch(c, &defaults()).expect("maps")).expect("serializes")
    }

    fn field_of(c: &VmConfig) -> VmConfigError {
        to_ch(c, &defaults()).expect_err("rejected")
    }

    #[test]
    fn minimal_config_maps_to_the_documented_json() {
        assert_eq!(
            json_of(&base()),
            json!({
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 256 * MIB},
                "payload": {"kernel": "/k/vmlinux"},
                "rng": {"src": "/dev/urandom"},
                "serial": {"mode": "Off"},
                "console": {"mode": "Off"},
            })
        );
    }

    #[test]
    fn cpu_boot_count() {
        let mut c = base();
        c.cpu.vcpu_count = 3;
        assert_eq!(json_of(&c)["cpus"]["boot_vcpus"], 3);
        assert_eq!(json_of(&c)["cpus"]["max_vcpus"], 3);
    }

    #[test]
    fn cpu_max_count() {
        let mut c = base();
        c.cpu.max_vcpu_count = 8;
        assert_eq!(json_of(&c)["cpus"]["boot_vcpus"], 2);
        assert_eq!(json_of(&c)["cpus"]["max_vcpus"], 8);
    }

    #[test]
    fn cpu_topology_maps_sockets_to_packages() {
        let mut c = base();
        c.cpu.max_vcpu_count = 12;
        c.cpu.topology = Some(CpuTopology {
            sockets: 2,
            cores_per_socket: 3,
            threads_per_core: 2,
        });
        assert_eq!(
            json_of(&c)["cpus"]["topology"],
            json!({"threads_per_core": 2, "cores_per_die": 3, "dies_per_package": 1, "packages": 2})
        );
    }

    #[test]
    fn cpu_features_are_rejected() {
        let mut c = base();
        c.cpu.features.insert("amx".into(), "on".into());
        let e = field_of(&c);
        assert_eq!(e.field, "config.cpu.features");
        assert!(e.reason.contains("not supported by cloudhypervisor"), "{e}");
    }

    #[test]
    fn memory_size() {
        let mut c = base();
        c.memory.size_bytes = 1024 * MIB;
        assert_eq!(json_of(&c)["memory"], json!({"size": 1024 * MIB}));
    }

    #[test]
    fn memory_hotplug_uses_acpi_and_the_headroom() {
        let mut c = base();
        c.memory.hotplug_enabled = true;
        c.memory.max_size_bytes = 1024 * MIB;
        assert_eq!(
            json_of(&c)["memory"],
            json!({"size": 256 * MIB, "hotplug_size": 768 * MIB, "hotplug_method": "Acpi"})
        );
    }

    #[test]
    fn dirty_page_tracking_is_rejected_naming_the_field_and_the_backend() {
        let mut c = base();
        c.memory.track_dirty_pages = true;
        let e = field_of(&c);
        assert_eq!(e.field, "config.memory.track_dirty_pages");
        assert!(e.reason.contains("cloudhypervisor"), "{e}");
    }

    #[test]
    fn memory_hotplug_without_headroom_is_rejected() {
        let mut c = base();
        c.memory.hotplug_enabled = true;
        c.memory.max_size_bytes = c.memory.size_bytes;
        assert_eq!(field_of(&c).field, "config.memory.max_size_bytes");
    }

    #[test]
    fn memory_backing_is_rejected() {
        let mut c = base();
        c.memory.backing.insert("hugepages".into(), "true".into());
        let e = field_of(&c);
        assert_eq!(e.field, "config.memory.backing");
        assert!(e.reason.contains("not supported by cloudhypervisor"));
    }

    #[test]
    fn payload_kernel_initramfs_cmdline() {
        let mut c = base();
        c.boot.initrd_path = "/k/initrd".into();
        c.boot.kernel_args = "console=ttyS0 panic=1".into();
        assert_eq!(
            json_of(&c)["payload"],
            json!({"kernel": "/k/vmlinux", "initramfs": "/k/initrd", "cmdline": "console=ttyS0 panic=1"})
        );
    }

    #[test]
    fn boot_options_are_rejected() {
        let mut c = base();
        c.boot.boot_options.insert("firmware".into(), "/x".into());
        assert_eq!(field_of(&c).field, "config.boot.boot_options");
    }

    fn disk(id: &str, ro: bool, root: bool) -> StorageDevice {
        StorageDevice {
            id: id.into(),
            path: format!("/img/{id}.raw"),
            read_only: ro,
            is_root_device: root,
            ..Default::default()
        }
    }

    #[test]
    fn disks_path_readonly_id_with_root_first() {
        let mut c = base();
        c.storage = vec![disk("data", false, false), disk("root", true, true)];
        assert_eq!(
            json_of(&c)["disks"],
            json!([
                {"path": "/img/root.raw", "readonly": true, "id": "root"},
                {"path": "/img/data.raw", "readonly": false, "id": "data"},
            ])
        );
    }

    #[test]
    fn disk_options_are_rejected() {
        let mut c = base();
        let mut d = disk("a", false, false);
        d.options.insert("direct".into(), "on".into());
        c.storage = vec![disk("z", false, false), d];
        assert_eq!(field_of(&c).field, "config.storage[1].options");
    }

    #[test]
    fn net_tap_mac_id() {
        let mut c = base();
        c.network = vec![
            NetworkInterface {
                id: "eth0".into(),
                mac_address: "52:54:00:AB:cd:01".into(),
                tap_device: "tap0".into(),
                ..Default::default()
            },
            NetworkInterface {
                id: "eth1".into(),
                tap_device: "tap1".into(),
                ..Default::default()
            },
        ];
        assert_eq!(
            json_of(&c)["net"],
            json!([
                {"tap": "tap0", "mac": "52:54:00:ab:cd:01", "id": "eth0"},
                {"tap": "tap1", "id": "eth1"},
            ])
        );
    }

    #[test]
    fn a_managed_tap_gets_a_queue_pair_per_vcpu_and_a_callers_tap_none() {
        let mut c = base();
        c.network = vec![
            NetworkInterface {
                id: "eth0".into(),
                tap_device: "vmcpabcdefghijk".into(),
                bridge: "br0".into(),
                ..Default::default()
            },
            NetworkInterface {
                id: "eth1".into(),
                tap_device: "tap1".into(),
                ..Default::default()
            },
        ];
        c.cpu.vcpu_count = 1;
        assert_eq!(json_of(&c)["net"][0].get("num_queues"), None);
        c.cpu.vcpu_count = 3;
        assert_eq!(json_of(&c)["net"][0]["num_queues"], json!(6));
        assert_eq!(json_of(&c)["net"][1].get("num_queues"), None);
    }

    #[test]
    fn a_guest_address_reaches_the_cmdline() {
        let mut c = base();
        c.boot.kernel_args = "console=ttyS0".into();
        c.network = vec![NetworkInterface {
            id: "eth0".into(),
            tap_device: "tap0".into(),
            guest_address: Some(crate::domain::GuestAddress {
                address: "10.0.0.2/24".into(),
                gateway: String::new(),
                dns: vec![],
            }),
            ..Default::default()
        }];
        assert_eq!(
            json_of(&c)["payload"]["cmdline"],
            json!("console=ttyS0 ip=10.0.0.2:::255.255.255.0::eth0:off")
        );
    }

    #[test]
    fn net_options_are_rejected() {
        let mut c = base();
        let mut n = NetworkInterface {
            id: "eth0".into(),
            tap_device: "tap0".into(),
            ..Default::default()
        };
        n.options.insert("mtu".into(), "9000".into());
        c.network = vec![n];
        assert_eq!(field_of(&c).field, "config.network[0].options");
    }

    #[test]
    fn rng_reads_urandom() {
        assert_eq!(json_of(&base())["rng"], json!({"src": "/dev/urandom"}));
    }

    #[test]
    fn serial_goes_to_the_runtime_dir_by_default() {
        let mut c = base();
        c.console = ConsoleConfig {
            enabled: true,
            ..Default::default()
        };
        let ch = to_ch(&c, &defaults()).expect("maps");
        assert_eq!(
            serde_json::to_value(&ch.serial).expect("json"),
            json!({"mode": "File", "file": "/run/vmcp/vm1/serial.log"})
        );
        assert_eq!(serial_output(&ch), Some("/run/vmcp/vm1/serial.log"));
        assert_eq!(json_of(&c)["console"], json!({"mode": "Off"}));
    }

    #[test]
    fn serial_goes_to_the_callers_file() {
        let mut c = base();
        c.console = ConsoleConfig {
            enabled: true,
            output: "/var/log/vm1.serial".into(),
            ..Default::default()
        };
        assert_eq!(
            json_of(&c)["serial"],
            json!({"mode": "File", "file": "/var/log/vm1.serial"})
        );
    }

    #[test]
    fn disabled_console_turns_serial_off() {
        let ch = to_ch(&base(), &defaults()).expect("maps");
        assert_eq!(ch.serial.mode, "Off");
        assert_eq!(serial_output(&ch), None);
    }

    #[test]
    fn metadata_never_reaches_the_vmm() {
        let mut c = base();
        c.metadata.insert("team".into(), "infra".into());
        let text = serde_json::to_string(&to_ch(&c, &defaults()).expect("maps")).expect("json");
        assert!(!text.contains("team") && !text.contains("infra"), "{text}");
    }
}
