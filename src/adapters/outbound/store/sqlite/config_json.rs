//! The JSON form of [`VmConfig`] kept in the store's `config` column. The
//! domain stays free of serde, so these mirror structs carry the derives and
//! convert field by field. Every conversion destructures its source
//! completely, so a field added to the domain config fails to compile here
//! instead of being dropped on the way to disk. Decoding is strict (unknown or
//! missing keys are errors): a record that does not match is reported as
//! corrupt, never half-read. A later schema version that adds a field gives
//! it `#[serde(default)]` or rewrites the stored rows in its migration.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::restart::RestartPolicy;

use crate::domain::{
    BootConfig, ConsoleConfig, CpuConfig, CpuTopology, GuestAddress, MemoryConfig,
    NetworkInterface, StorageDevice, VmConfig,
};

/// Serializes a config to the stored JSON text.
pub fn encode(config: &VmConfig) -> Result<String, serde_json::Error> {
    serde_json::to_string(&ConfigJson::from(config))
}

/// Parses stored JSON text back into a config.
pub fn decode(text: &str) -> Result<VmConfig, serde_json::Error> {
    serde_json::from_str::<ConfigJson>(text).map(VmConfig::from)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigJson {
    cpu: CpuJson,
    memory: MemoryJson,
    boot: BootJson,
    storage: Vec<StorageJson>,
    network: Vec<NetworkJson>,
    console: ConsoleJson,
    metadata: BTreeMap<String, String>,
    /// Absent in records written before restart policies (and for the host default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restart_policy: Option<PolicyJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PolicyJson {
    Never,
    OnFailure,
    Always,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuJson {
    vcpu_count: i32,
    max_vcpu_count: i32,
    topology: Option<TopologyJson>,
    features: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyJson {
    sockets: i32,
    cores_per_socket: i32,
    threads_per_core: i32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryJson {
    size_bytes: i64,
    hotplug_enabled: bool,
    max_size_bytes: i64,
    backing: BTreeMap<String, String>,
    /// Absent in records written before it existed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    track_dirty_pages: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootJson {
    kernel_path: String,
    initrd_path: String,
    kernel_args: String,
    boot_options: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageJson {
    id: String,
    path: String,
    read_only: bool,
    is_root_device: bool,
    interface_type: String,
    options: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkJson {
    id: String,
    mac_address: String,
    tap_device: String,
    interface_type: String,
    options: BTreeMap<String, String>,
    /// Added with managed networking: rows written before have none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    bridge: String,
    /// Added with managed networking: rows written before have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    guest_address: Option<GuestAddressJson>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestAddressJson {
    address: String,
    gateway: String,
    dns: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleJson {
    enabled: bool,
    output: String,
    input: String,
    console_type: String,
}

impl From<&VmConfig> for ConfigJson {
    fn from(c: &VmConfig) -> Self {
        let VmConfig {
            cpu,
            memory,
            boot,
            storage,
            network,
            console,
            metadata,
            restart_policy,
        } = c;
        Self {
            cpu: cpu.into(),
            memory: memory.into(),
            boot: boot.into(),
            storage: storage.iter().map(StorageJson::from).collect(),
            network: network.iter().map(NetworkJson::from).collect(),
            console: console.into(),
            metadata: metadata.clone(),
            restart_policy: match restart_policy {
                RestartPolicy::Unspecified => None,
                RestartPolicy::Never => Some(PolicyJson::Never),
                RestartPolicy::OnFailure => Some(PolicyJson::OnFailure),
                RestartPolicy::Always => Some(PolicyJson::Always),
            },
        }
    }
}

impl From<ConfigJson> for VmConfig {
    fn from(c: ConfigJson) -> Self {
        let ConfigJson {
            cpu,
            memory,
            boot,
            storage,
            network,
            console,
            metadata,
            restart_policy,
        } = c;
        Self {
            cpu: cpu.into(),
            memory: memory.into(),
            boot: boot.into(),
            storage: storage.into_iter().map(StorageDevice::from).collect(),
            network: network.into_iter().map(NetworkInterface::from).collect(),
            console: console.into(),
            metadata,
            restart_policy: match restart_policy {
                None => RestartPolicy::Unspecified,
                Some(PolicyJson::Never) => RestartPolicy::Never,
                Some(PolicyJson::OnFailure) => RestartPolicy::OnFailure,
                Some(PolicyJson::Always) => RestartPolicy::Always,
            },
        }
    }
}

impl From<&CpuConfig> for CpuJson {
    fn from(c: &CpuConfig) -> Self {
        let CpuConfig {
            vcpu_count,
            max_vcpu_count,
            topology,
            features,
        } = c;
        Self {
            vcpu_count: *vcpu_count,
            max_vcpu_count: *max_vcpu_count,
            topology: topology.as_ref().map(TopologyJson::from),
            features: features.clone(),
        }
    }
}

impl From<CpuJson> for CpuConfig {
    fn from(c: CpuJson) -> Self {
        let CpuJson {
            vcpu_count,
            max_vcpu_count,
            topology,
            features,
        } = c;
        Self {
            vcpu_count,
            max_vcpu_count,
            topology: topology.map(CpuTopology::from),
            features,
        }
    }
}

impl From<&CpuTopology> for TopologyJson {
    fn from(t: &CpuTopology) -> Self {
        let CpuTopology {
            sockets,
            cores_per_socket,
            threads_per_core,
        } = *t;
        Self {
            sockets,
            cores_per_socket,
            threads_per_core,
        }
    }
}

impl From<TopologyJson> for CpuTopology {
    fn from(t: TopologyJson) -> Self {
        let TopologyJson {
            sockets,
            cores_per_socket,
            threads_per_core,
        } = t;
        Self {
            sockets,
            cores_per_socket,
            threads_per_core,
        }
    }
}

impl From<&MemoryConfig> for MemoryJson {
    fn from(m: &MemoryConfig) -> Self {
        let MemoryConfig {
            size_bytes,
            hotplug_enabled,
            max_size_bytes,
            backing,
            track_dirty_pages,
        } = m;
        Self {
            size_bytes: *size_bytes,
            hotplug_enabled: *hotplug_enabled,
            max_size_bytes: *max_size_bytes,
            backing: backing.clone(),
            track_dirty_pages: *track_dirty_pages,
        }
    }
}

impl From<MemoryJson> for MemoryConfig {
    fn from(m: MemoryJson) -> Self {
        let MemoryJson {
            size_bytes,
            hotplug_enabled,
            max_size_bytes,
            backing,
            track_dirty_pages,
        } = m;
        Self {
            size_bytes,
            hotplug_enabled,
            max_size_bytes,
            backing,
            track_dirty_pages,
        }
    }
}

impl From<&BootConfig> for BootJson {
    fn from(b: &BootConfig) -> Self {
        let BootConfig {
            kernel_path,
            initrd_path,
            kernel_args,
            boot_options,
        } = b;
        Self {
            kernel_path: kernel_path.clone(),
            initrd_path: initrd_path.clone(),
            kernel_args: kernel_args.clone(),
            boot_options: boot_options.clone(),
        }
    }
}

impl From<BootJson> for BootConfig {
    fn from(b: BootJson) -> Self {
        let BootJson {
            kernel_path,
            initrd_path,
            kernel_args,
            boot_options,
        } = b;
        Self {
            kernel_path,
            initrd_path,
            kernel_args,
            boot_options,
        }
    }
}

impl From<&StorageDevice> for StorageJson {
    fn from(d: &StorageDevice) -> Self {
        let StorageDevice {
            id,
            path,
            read_only,
            is_root_device,
            interface_type,
            options,
        } = d;
        Self {
            id: id.clone(),
            path: path.clone(),
            read_only: *read_only,
            is_root_device: *is_root_device,
            interface_type: interface_type.clone(),
            options: options.clone(),
        }
    }
}

impl From<StorageJson> for StorageDevice {
    fn from(d: StorageJson) -> Self {
        let StorageJson {
            id,
            path,
            read_only,
            is_root_device,
            interface_type,
            options,
        } = d;
        Self {
            id,
            path,
            read_only,
            is_root_device,
            interface_type,
            options,
        }
    }
}

impl From<&NetworkInterface> for NetworkJson {
    fn from(n: &NetworkInterface) -> Self {
        let NetworkInterface {
            id,
            mac_address,
            tap_device,
            interface_type,
            options,
            bridge,
            guest_address,
        } = n;
        Self {
            id: id.clone(),
            mac_address: mac_address.clone(),
            tap_device: tap_device.clone(),
            interface_type: interface_type.clone(),
            options: options.clone(),
            bridge: bridge.clone(),
            guest_address: guest_address.as_ref().map(|g| {
                let GuestAddress {
                    address,
                    gateway,
                    dns,
                } = g;
                GuestAddressJson {
                    address: address.clone(),
                    gateway: gateway.clone(),
                    dns: dns.clone(),
                }
            }),
        }
    }
}

impl From<NetworkJson> for NetworkInterface {
    fn from(n: NetworkJson) -> Self {
        let NetworkJson {
            id,
            mac_address,
            tap_device,
            interface_type,
            options,
            bridge,
            guest_address,
        } = n;
        Self {
            id,
            mac_address,
            tap_device,
            interface_type,
            options,
            bridge,
            guest_address: guest_address.map(|g| GuestAddress {
                address: g.address,
                gateway: g.gateway,
                dns: g.dns,
            }),
        }
    }
}

impl From<&ConsoleConfig> for ConsoleJson {
    fn from(c: &ConsoleConfig) -> Self {
        let ConsoleConfig {
            enabled,
            output,
            input,
            console_type,
        } = c;
        Self {
            enabled: *enabled,
            output: output.clone(),
            input: input.clone(),
            console_type: console_type.clone(),
        }
    }
}

impl From<ConsoleJson> for ConsoleConfig {
    fn from(c: ConsoleJson) -> Self {
        let ConsoleJson {
            enabled,
            output,
            input,
            console_type,
        } = c;
        Self {
            enabled,
            output,
            input,
            console_type,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_keys_are_rejected() {
        let good = encode(&VmConfig::default()).expect("encode");
        assert_eq!(decode(&good).expect("decode"), VmConfig::default());

        let mut extra: serde_json::Value = serde_json::from_str(&good).expect("json");
        extra["cpu"]["turbo"] = serde_json::json!(true);
        let err = decode(&extra.to_string()).expect_err("unknown key accepted");
        assert!(err.to_string().contains("turbo"), "{err}");

        let mut missing: serde_json::Value = serde_json::from_str(&good).expect("json");
        missing["boot"]
            .as_object_mut()
            .expect("boot is an object")
            .remove("kernel_args");
        let err = decode(&missing.to_string()).expect_err("missing key accepted");
        assert!(err.to_string().contains("kernel_args"), "{err}");
    }
}
