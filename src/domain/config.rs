//! Validated VM configuration. `VmConfig` mirrors the wire contract's
//! `vmm.v1.VmConfig` field for field (so nothing a client sends is dropped on
//! the way in), and [`VmConfig::validate`] enforces the backend-independent
//! rules with errors that name the offending field by its proto path.
//! Backend-specific limits live with each backend's mapping.

use std::collections::BTreeMap;

/// Most vCPUs a VM may have (Cloud Hypervisor's and Firecracker's ceilings are higher or equal).
pub const MAX_VCPUS: i32 = 254;
/// Longest kernel command line accepted, in bytes.
pub const MAX_KERNEL_ARGS_LEN: usize = 4096;
/// Most storage devices or network interfaces per VM.
pub const MAX_DEVICES: usize = 16;
/// Most entries in the metadata map.
pub const MAX_METADATA_ENTRIES: usize = 64;
/// Longest metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
/// Most entries in any option map (features, backing, boot options, device options).
pub const MAX_OPTION_ENTRIES: usize = 32;
/// Longest host path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 4096;
/// Longest Linux interface name (IFNAMSIZ - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;
/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_LEN: usize = 64;

const MIB: i64 = 1 << 20;

/// A configuration error, naming the field by its path in `vmm.v1.CreateVmRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct VmConfigError {
    /// Proto field path, e.g. `config.cpu.vcpu_count`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl VmConfigError {
    /// Builds an error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// The whole VM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmConfig {
    /// vCPUs.
    pub cpu: CpuConfig,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// Kernel, initrd and command line.
    pub boot: BootConfig,
    /// Block devices, in the caller's order.
    pub storage: Vec<StorageDevice>,
    /// Network interfaces, in the caller's order.
    pub network: Vec<NetworkInterface>,
    /// Serial console.
    pub console: ConsoleConfig,
    /// Caller-owned labels, kept by VMCP and returned as given.
    pub metadata: BTreeMap<String, String>,
    /// What VMCP does when the VM's VMM goes away without being asked to.
    pub restart_policy: super::restart::RestartPolicy,
}

/// vCPU configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuConfig {
    /// vCPUs at boot.
    pub vcpu_count: i32,
    /// vCPUs the VM may grow to; 0 means the same as `vcpu_count`.
    pub max_vcpu_count: i32,
    /// Guest-visible topology, when the caller sets one.
    pub topology: Option<CpuTopology>,
    /// Backend CPU feature switches.
    pub features: BTreeMap<String, String>,
}

/// Guest CPU topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTopology {
    /// Sockets.
    pub sockets: i32,
    /// Cores per socket.
    pub cores_per_socket: i32,
    /// Threads per core.
    pub threads_per_core: i32,
}

/// Memory configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryConfig {
    /// Boot memory in bytes, a whole number of MiB.
    pub size_bytes: i64,
    /// Whether memory may be hot-plugged later.
    pub hotplug_enabled: bool,
    /// Ceiling for hot-plugged memory; 0 unless hotplug is enabled.
    pub max_size_bytes: i64,
    /// Backend memory backing options.
    pub backing: BTreeMap<String, String>,
    /// Have the VMM track the pages the guest writes, for diff snapshots
    /// (Firecracker only; off by default: it costs the guest a little).
    pub track_dirty_pages: bool,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootConfig {
    /// Absolute path of the kernel image on the host.
    pub kernel_path: String,
    /// Absolute path of the initrd on the host, or empty.
    pub initrd_path: String,
    /// Kernel command line.
    pub kernel_args: String,
    /// Backend boot options.
    pub boot_options: BTreeMap<String, String>,
}

/// One block device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageDevice {
    /// Caller's id, unique within the VM.
    pub id: String,
    /// Absolute host path of the backing file or device.
    pub path: String,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Device model; empty or `virtio-blk`.
    pub interface_type: String,
    /// Backend device options.
    pub options: BTreeMap<String, String>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkInterface {
    /// Caller's id, unique within the VM.
    pub id: String,
    /// Guest MAC address, or empty to let the VMM choose.
    pub mac_address: String,
    /// Host tap device name; for a managed interface, the tap VMCP chose.
    pub tap_device: String,
    /// Device model; empty or `virtio-net`.
    pub interface_type: String,
    /// Backend device options.
    pub options: BTreeMap<String, String>,
    /// Host bridge of a managed interface (VMCP creates its tap); empty for
    /// a caller's own tap.
    pub bridge: String,
    /// Static IPv4 configuration for a Linux guest (kernel `ip=`), if any.
    pub guest_address: Option<GuestAddress>,
}

/// Static IPv4 configuration of a guest interface, as the caller gave it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestAddress {
    /// CIDR, e.g. `10.0.0.2/24`.
    pub address: String,
    /// Default gateway, or empty.
    pub gateway: String,
    /// Up to two DNS servers.
    pub dns: Vec<String>,
}

/// Serial console configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConsoleConfig {
    /// Whether the guest's serial port is connected.
    pub enabled: bool,
    /// Host file for the console output; empty means the VM's runtime directory.
    pub output: String,
    /// Console input; VMCP does not offer an input channel, so it must be empty.
    pub input: String,
    /// `serial` (the default when empty).
    pub console_type: String,
}

/// A VM's size: what ResizeVm changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmSize {
    /// vCPUs online.
    pub vcpu_count: i32,
    /// Guest memory in bytes (boot memory plus hot-plugged memory).
    pub memory_bytes: i64,
}

impl VmConfig {
    /// The VM's current size.
    pub fn size(&self) -> VmSize {
        VmSize {
            vcpu_count: self.cpu.vcpu_count,
            memory_bytes: self.memory.size_bytes,
        }
    }

    /// Records a size the VMM reports; the hot-plug ceilings stay.
    pub fn set_size(&mut self, size: VmSize) {
        self.cpu.vcpu_count = size.vcpu_count;
        self.memory.size_bytes = size.memory_bytes;
    }

    /// The size a ResizeVm asks for (0 leaves that one as it is), checked
    /// against the ceilings the VM was created with; an error names the
    /// request's field.
    pub fn resized(&self, vcpu_count: i32, memory_bytes: i64) -> Result<VmSize, VmConfigError> {
        let mut size = self.size();
        if vcpu_count < 0 {
            return Err(VmConfigError::new(
                "vcpu_count",
                format!("must not be negative, got {vcpu_count}"),
            ));
        }
        if vcpu_count > 0 {
            let max = self.effective_max_vcpus();
            if vcpu_count > max {
                return Err(VmConfigError::new(
                    "vcpu_count",
                    format!(
                        "{vcpu_count} exceeds the VM's hot-plug ceiling of {max} vCPUs (config.cpu.max_vcpu_count, set at create)"
                    ),
                ));
            }
            size.vcpu_count = vcpu_count;
        }
        if memory_bytes < 0 {
            return Err(VmConfigError::new(
                "memory_bytes",
                format!("must not be negative, got {memory_bytes}"),
            ));
        }
        if memory_bytes > 0 && memory_bytes != self.memory.size_bytes {
            if !self.memory.hotplug_enabled {
                return Err(VmConfigError::new(
                    "memory_bytes",
                    "the VM was created without memory hot-plug (config.memory.hotplug_enabled)",
                ));
            }
            if memory_bytes % MIB != 0 {
                return Err(VmConfigError::new(
                    "memory_bytes",
                    format!("must be a whole number of MiB, got {memory_bytes}"),
                ));
            }
            if memory_bytes > self.memory.max_size_bytes {
                return Err(VmConfigError::new(
                    "memory_bytes",
                    format!(
                        "{memory_bytes} exceeds the VM's hot-plug ceiling of {} bytes (config.memory.max_size_bytes, set at create)",
                        self.memory.max_size_bytes
                    ),
                ));
            }
            size.memory_bytes = memory_bytes;
        }
        Ok(size)
    }

    /// Checks every backend-independent rule; the first violation names its field.
    pub fn validate(&self) -> Result<(), VmConfigError> {
        self.cpu.validate()?;
        self.memory.validate()?;
        self.boot.validate()?;
        validate_storage(&self.storage)?;
        validate_network(&self.network)?;
        super::network::check_ip_arg(self)?;
        self.console.validate()?;
        validate_metadata(&self.metadata)
    }

    /// The number of vCPUs the VM may grow to.
    pub fn effective_max_vcpus(&self) -> i32 {
        self.cpu.vcpu_count.max(self.cpu.max_vcpu_count)
    }
}

impl CpuConfig {
    fn validate(&self) -> Result<(), VmConfigError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpu_count) {
            return Err(VmConfigError::new(
                "config.cpu.vcpu_count",
                format!("must be between 1 and {MAX_VCPUS}, got {}", self.vcpu_count),
            ));
        }
        if self.max_vcpu_count != 0 && !(self.vcpu_count..=MAX_VCPUS).contains(&self.max_vcpu_count)
        {
            return Err(VmConfigError::new(
                "config.cpu.max_vcpu_count",
                format!(
                    "must be 0 or between vcpu_count ({}) and {MAX_VCPUS}, got {}",
                    self.vcpu_count, self.max_vcpu_count
                ),
            ));
        }
        if let Some(t) = &self.topology {
            for (name, v) in [
                ("sockets", t.sockets),
                ("cores_per_socket", t.cores_per_socket),
                ("threads_per_core", t.threads_per_core),
            ] {
                if !(1..=MAX_VCPUS).contains(&v) {
                    return Err(VmConfigError::new(
                        format!("config.cpu.topology.{name}"),
                        format!("must be between 1 and {MAX_VCPUS}, got {v}"),
                    ));
                }
            }
            let product = i64::from(t.sockets)
                * i64::from(t.cores_per_socket)
                * i64::from(t.threads_per_core);
            let max = i64::from(self.vcpu_count.max(self.max_vcpu_count));
            if product != max {
                return Err(VmConfigError::new(
                    "config.cpu.topology",
                    format!(
                        "sockets × cores_per_socket × threads_per_core must equal the maximum vCPU count ({max}), got {product}"
                    ),
                ));
            }
        }
        validate_option_map("config.cpu.features", &self.features)
    }
}

impl MemoryConfig {
    fn validate(&self) -> Result<(), VmConfigError> {
        if self.size_bytes <= 0 || self.size_bytes % MIB != 0 {
            return Err(VmConfigError::new(
                "config.memory.size_bytes",
                format!(
                    "must be a positive whole number of MiB (multiple of 1048576), got {}",
                    self.size_bytes
                ),
            ));
        }
        if self.hotplug_enabled {
            if self.max_size_bytes < self.size_bytes || self.max_size_bytes % MIB != 0 {
                return Err(VmConfigError::new(
                    "config.memory.max_size_bytes",
                    format!(
                        "with hotplug_enabled must be a whole number of MiB of at least size_bytes ({}), got {}",
                        self.size_bytes, self.max_size_bytes
                    ),
                ));
            }
        } else if self.max_size_bytes != 0 {
            return Err(VmConfigError::new(
                "config.memory.max_size_bytes",
                "must be 0 unless hotplug_enabled is set",
            ));
        }
        validate_option_map("config.memory.backing", &self.backing)
    }
}

impl BootConfig {
    fn validate(&self) -> Result<(), VmConfigError> {
        if self.kernel_path.is_empty() {
            return Err(VmConfigError::new("config.boot.kernel_path", "is required"));
        }
        validate_abs_path("config.boot.kernel_path", &self.kernel_path)?;
        if !self.initrd_path.is_empty() {
            validate_abs_path("config.boot.initrd_path", &self.initrd_path)?;
        }
        if self.kernel_args.len() > MAX_KERNEL_ARGS_LEN {
            return Err(VmConfigError::new(
                "config.boot.kernel_args",
                format!(
                    "must be at most {MAX_KERNEL_ARGS_LEN} bytes, got {}",
                    self.kernel_args.len()
                ),
            ));
        }
        if self.kernel_args.contains('\0') {
            return Err(VmConfigError::new(
                "config.boot.kernel_args",
                "must not contain NUL bytes",
            ));
        }
        validate_option_map("config.boot.boot_options", &self.boot_options)
    }
}

impl ConsoleConfig {
    fn validate(&self) -> Result<(), VmConfigError> {
        if !self.output.is_empty() {
            validate_abs_path("config.console.output", &self.output)?;
        }
        if !self.input.is_empty() {
            return Err(VmConfigError::new(
                "config.console.input",
                "console input is not supported; leave it empty",
            ));
        }
        if !matches!(self.console_type.as_str(), "" | "serial") {
            return Err(VmConfigError::new(
                "config.console.console_type",
                format!("must be empty or \"serial\", got {:?}", self.console_type),
            ));
        }
        if !self.enabled && !self.output.is_empty() {
            return Err(VmConfigError::new(
                "config.console.output",
                "is set but the console is not enabled",
            ));
        }
        Ok(())
    }
}

fn validate_storage(devices: &[StorageDevice]) -> Result<(), VmConfigError> {
    if devices.len() > MAX_DEVICES {
        return Err(VmConfigError::new(
            "config.storage",
            format!("at most {MAX_DEVICES} devices, got {}", devices.len()),
        ));
    }
    let mut roots = 0;
    for (i, d) in devices.iter().enumerate() {
        let at = format!("config.storage[{i}]");
        validate_device_id(&format!("{at}.id"), &d.id)?;
        if devices[..i].iter().any(|o| o.id == d.id) {
            return Err(VmConfigError::new(
                format!("{at}.id"),
                format!("duplicate storage id {:?}", d.id),
            ));
        }
        if d.path.is_empty() {
            return Err(VmConfigError::new(format!("{at}.path"), "is required"));
        }
        validate_abs_path(&format!("{at}.path"), &d.path)?;
        if !matches!(d.interface_type.as_str(), "" | "virtio-blk") {
            return Err(VmConfigError::new(
                format!("{at}.interface_type"),
                format!(
                    "must be empty or \"virtio-blk\", got {:?}",
                    d.interface_type
                ),
            ));
        }
        validate_option_map(&format!("{at}.options"), &d.options)?;
        if d.is_root_device {
            roots += 1;
            if roots > 1 {
                return Err(VmConfigError::new(
                    format!("{at}.is_root_device"),
                    "at most one storage device may be the root device",
                ));
            }
        }
    }
    Ok(())
}

fn validate_network(nets: &[NetworkInterface]) -> Result<(), VmConfigError> {
    if nets.len() > MAX_DEVICES {
        return Err(VmConfigError::new(
            "config.network",
            format!("at most {MAX_DEVICES} interfaces, got {}", nets.len()),
        ));
    }
    for (i, n) in nets.iter().enumerate() {
        let at = format!("config.network[{i}]");
        validate_device_id(&format!("{at}.id"), &n.id)?;
        if nets[..i].iter().any(|o| o.id == n.id) {
            return Err(VmConfigError::new(
                format!("{at}.id"),
                format!("duplicate network id {:?}", n.id),
            ));
        }
        if !n.mac_address.is_empty() {
            validate_mac(&format!("{at}.mac_address"), &n.mac_address)?;
            if nets[..i]
                .iter()
                .any(|o| o.mac_address.eq_ignore_ascii_case(&n.mac_address))
            {
                return Err(VmConfigError::new(
                    format!("{at}.mac_address"),
                    format!("duplicate MAC address {}", n.mac_address),
                ));
            }
        }
        if n.bridge.is_empty() {
            if n.tap_device.is_empty() {
                return Err(VmConfigError::new(
                    format!("{at}.tap_device"),
                    "set tap_device (a tap of your own) or bridge (VMCP creates the tap); this host has no default bridge (UNKEY_VMCP_BRIDGE)",
                ));
            }
        } else {
            validate_tap(&format!("{at}.bridge"), &n.bridge)?;
        }
        // A managed interface's tap is chosen later, from the VM id.
        if !n.tap_device.is_empty() || n.bridge.is_empty() {
            validate_tap(&format!("{at}.tap_device"), &n.tap_device)?;
        }
        if !n.tap_device.is_empty() && nets[..i].iter().any(|o| o.tap_device == n.tap_device) {
            return Err(VmConfigError::new(
                format!("{at}.tap_device"),
                format!("tap device {:?} is used twice", n.tap_device),
            ));
        }
        if !matches!(n.interface_type.as_str(), "" | "virtio-net") {
            return Err(VmConfigError::new(
                format!("{at}.interface_type"),
                format!(
                    "must be empty or \"virtio-net\", got {:?}",
                    n.interface_type
                ),
            ));
        }
        validate_option_map(&format!("{at}.options"), &n.options)?;
        if let Some(g) = &n.guest_address {
            super::network::validate_guest_address(&format!("{at}.guest_address"), g)?;
            if nets[..i].iter().any(|o| o.guest_address.is_some()) {
                return Err(VmConfigError::new(
                    format!("{at}.guest_address"),
                    "at most one interface per VM: the kernel's ip= configures one",
                ));
            }
        }
    }
    Ok(())
}

fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), VmConfigError> {
    if m.len() > MAX_METADATA_ENTRIES {
        return Err(VmConfigError::new(
            "config.metadata",
            format!("at most {MAX_METADATA_ENTRIES} entries, got {}", m.len()),
        ));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            return Err(VmConfigError::new(
                "config.metadata",
                format!(
                    "keys must be 1 to {MAX_METADATA_KEY_LEN} bytes, got {} bytes",
                    k.len()
                ),
            ));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(VmConfigError::new(
                format!("config.metadata[{k}]"),
                format!(
                    "values must be at most {MAX_METADATA_VALUE_LEN} bytes, got {}",
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

fn validate_option_map(field: &str, m: &BTreeMap<String, String>) -> Result<(), VmConfigError> {
    if m.len() > MAX_OPTION_ENTRIES {
        return Err(VmConfigError::new(
            field,
            format!("at most {MAX_OPTION_ENTRIES} entries, got {}", m.len()),
        ));
    }
    for (k, v) in m {
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN || v.len() > MAX_METADATA_VALUE_LEN {
            return Err(VmConfigError::new(
                field,
                format!(
                    "keys must be 1 to {MAX_METADATA_KEY_LEN} bytes and values at most {MAX_METADATA_VALUE_LEN} bytes"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_abs_path(field: &str, p: &str) -> Result<(), VmConfigError> {
    if !p.starts_with('/') {
        return Err(VmConfigError::new(
            field,
            format!("must be an absolute path, got {p:?}"),
        ));
    }
    if p.len() > MAX_PATH_LEN {
        return Err(VmConfigError::new(
            field,
            format!("must be at most {MAX_PATH_LEN} bytes"),
        ));
    }
    if p.contains('\0') || p.contains(',') {
        return Err(VmConfigError::new(
            field,
            "must not contain NUL bytes or commas",
        ));
    }
    Ok(())
}

fn validate_device_id(field: &str, id: &str) -> Result<(), VmConfigError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > MAX_DEVICE_ID_LEN || !id.chars().all(ok_char) {
        return Err(VmConfigError::new(
            field,
            format!("must be 1 to {MAX_DEVICE_ID_LEN} characters of [A-Za-z0-9._-], got {id:?}"),
        ));
    }
    Ok(())
}

fn validate_mac(field: &str, mac: &str) -> Result<(), VmConfigError> {
    let parts: Vec<&str> = mac.split(':').collect();
    let well_formed = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed {
        return Err(VmConfigError::new(
            field,
            format!("must be six colon-separated hex pairs like 52:54:00:12:34:56, got {mac:?}"),
        ));
    }
    // Well-formedness was checked just above, so the first pair parses.
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(0);
    if first & 1 == 1 {
        return Err(VmConfigError::new(
            field,
            format!("must be a unicast address (the multicast bit is set in {mac})"),
        ));
    }
    Ok(())
}

fn validate_tap(field: &str, tap: &str) -> Result<(), VmConfigError> {
    if tap.is_empty() {
        return Err(VmConfigError::new(field, "is required"));
    }
    if tap.len() > MAX_TAP_NAME_LEN {
        return Err(VmConfigError::new(
            field,
            format!(
                "must be at most {MAX_TAP_NAME_LEN} bytes, got {}",
                tap.len()
            ),
        ));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if tap == "." || tap == ".." || !tap.chars().all(ok_char) {
        return Err(VmConfigError::new(
            field,
            format!("must be a Linux interface name of [A-Za-z0-9._-], got {tap:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid config used across the crate's unit tests.
    pub(crate) fn valid() -> VmConfig {
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
                kernel_path: "/var/lib/vmcp/vmlinux".into(),
                kernel_args: "console=ttyS0".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn field_of(c: &VmConfig) -> String {
        c.validate().expect_err("config should be rejected").field
    }

    #[test]
    fn the_valid_fixture_is_valid() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn cpu_rules_name_their_fields() {
        let mut c = valid();
        c.cpu.vcpu_count = 0;
        assert_eq!(field_of(&c), "config.cpu.vcpu_count");
        let mut c = valid();
        c.cpu.max_vcpu_count = 1;
        assert_eq!(field_of(&c), "config.cpu.max_vcpu_count");
        let mut c = valid();
        c.cpu.max_vcpu_count = 4;
        assert_eq!(c.validate(), Ok(()));
        c.cpu.topology = Some(CpuTopology {
            sockets: 1,
            cores_per_socket: 2,
            threads_per_core: 1,
        });
        assert_eq!(field_of(&c), "config.cpu.topology");
        c.cpu.topology = Some(CpuTopology {
            sockets: 2,
            cores_per_socket: 2,
            threads_per_core: 1,
        });
        assert_eq!(c.validate(), Ok(()));
        c.cpu.topology = Some(CpuTopology {
            sockets: 0,
            cores_per_socket: 2,
            threads_per_core: 1,
        });
        assert_eq!(field_of(&c), "config.cpu.topology.sockets");
    }

    #[test]
    fn memory_must_be_whole_mib() {
        let mut c = valid();
        c.memory.size_bytes = MIB + 1;
        assert_eq!(field_of(&c), "config.memory.size_bytes");
        c.memory.size_bytes = 0;
        assert_eq!(field_of(&c), "config.memory.size_bytes");
        let mut c = valid();
        c.memory.max_size_bytes = 512 * MIB;
        assert_eq!(field_of(&c), "config.memory.max_size_bytes");
        c.memory.hotplug_enabled = true;
        assert_eq!(c.validate(), Ok(()));
        c.memory.max_size_bytes = MIB;
        assert_eq!(field_of(&c), "config.memory.max_size_bytes");
    }

    #[test]
    fn boot_paths_must_be_absolute() {
        let mut c = valid();
        c.boot.kernel_path.clear();
        assert_eq!(field_of(&c), "config.boot.kernel_path");
        c.boot.kernel_path = "vmlinux".into();
        assert_eq!(field_of(&c), "config.boot.kernel_path");
        let mut c = valid();
        c.boot.initrd_path = "initrd".into();
        assert_eq!(field_of(&c), "config.boot.initrd_path");
        let mut c = valid();
        c.boot.kernel_args = "x".repeat(MAX_KERNEL_ARGS_LEN + 1);
        assert_eq!(field_of(&c), "config.boot.kernel_args");
    }

    fn disk(id: &str, root: bool) -> StorageDevice {
        StorageDevice {
            id: id.into(),
            path: format!("/images/{id}.img"),
            is_root_device: root,
            ..Default::default()
        }
    }

    #[test]
    fn storage_ids_unique_and_one_root() {
        let mut c = valid();
        c.storage = vec![disk("a", true), disk("b", false)];
        assert_eq!(c.validate(), Ok(()));
        c.storage = vec![disk("a", true), disk("a", false)];
        assert_eq!(field_of(&c), "config.storage[1].id");
        c.storage = vec![disk("a", true), disk("b", true)];
        assert_eq!(field_of(&c), "config.storage[1].is_root_device");
        c.storage = vec![disk("a/b", false)];
        assert_eq!(field_of(&c), "config.storage[0].id");
        c.storage = vec![StorageDevice {
            path: "rel.img".into(),
            ..disk("a", false)
        }];
        assert_eq!(field_of(&c), "config.storage[0].path");
        c.storage = (0..17).map(|i| disk(&format!("d{i}"), false)).collect();
        assert_eq!(field_of(&c), "config.storage");
    }

    fn nic(id: &str, mac: &str, tap: &str) -> NetworkInterface {
        NetworkInterface {
            id: id.into(),
            mac_address: mac.into(),
            tap_device: tap.into(),
            ..Default::default()
        }
    }

    #[test]
    fn network_macs_and_taps_are_checked() {
        let mut c = valid();
        c.network = vec![nic("eth0", "52:54:00:12:34:56", "tap0")];
        assert_eq!(c.validate(), Ok(()));
        for bad in [
            "52:54:00:12:34",
            "52-54-00-12-34-56",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            c.network = vec![nic("eth0", bad, "tap0")];
            assert_eq!(field_of(&c), "config.network[0].mac_address", "{bad}");
        }
        c.network = vec![nic("eth0", "", "tap-name-too-long")];
        assert_eq!(field_of(&c), "config.network[0].tap_device");
        c.network = vec![nic("eth0", "", "../x")];
        assert_eq!(field_of(&c), "config.network[0].tap_device");
        c.network = vec![nic("eth0", "", "")];
        assert_eq!(field_of(&c), "config.network[0].tap_device");
        c.network = vec![nic("eth0", "", "tap0"), nic("eth1", "", "tap0")];
        assert_eq!(field_of(&c), "config.network[1].tap_device");
    }

    #[test]
    fn bridges_are_checked_and_stand_in_for_a_tap() {
        let mut c = valid();
        c.network = vec![nic("eth0", "", "")];
        c.network[0].bridge = "br0".into();
        assert_eq!(c.validate(), Ok(()), "a bridge alone is enough");
        for bad in ["", "bridge-name-too-long", "br 0", "../br", "br/0", "."] {
            c.network[0].bridge = bad.into();
            let want = if bad.is_empty() {
                "config.network[0].tap_device"
            } else {
                "config.network[0].bridge"
            };
            assert_eq!(field_of(&c), want, "{bad:?}");
        }
    }

    #[test]
    fn console_and_metadata_are_bounded() {
        let mut c = valid();
        c.console.input = "/dev/stdin".into();
        assert_eq!(field_of(&c), "config.console.input");
        let mut c = valid();
        c.console.console_type = "virtio".into();
        assert_eq!(field_of(&c), "config.console.console_type");
        let mut c = valid();
        c.console.output = "/tmp/out".into();
        assert_eq!(field_of(&c), "config.console.output");
        let mut c = valid();
        c.metadata = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(field_of(&c), "config.metadata");
        let mut c = valid();
        c.metadata
            .insert("k".into(), "v".repeat(MAX_METADATA_VALUE_LEN + 1));
        assert_eq!(field_of(&c), "config.metadata[k]");
    }
}
