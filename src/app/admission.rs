//! Admission of new VMs beyond config validation: the host-path policy and
//! the resource limits (VMs per host, vCPUs and memory per VM and in total).
//! The manager checks the per-VM rules before reserving an id and the
//! host-wide totals while holding its registry lock, so concurrent creates
//! cannot overshoot. Totals count every VM that exists whatever its state
//! (any of them can be booted again without another admission) and use the
//! hot-plug ceilings, not the boot sizes. Errors name the limit's variable.

use crate::domain::{VmConfig, VmError};

use super::path_policy::PathPolicy;

const MIB: i64 = 1 << 20;

/// Host and per-VM resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// Most VMs on this host.
    pub max_vms: u64,
    /// Most vCPUs (hot-plug ceiling included) per VM.
    pub max_vcpus_per_vm: u64,
    /// Most memory (hot-plug ceiling included) per VM, in MiB.
    pub max_memory_per_vm_mib: u64,
    /// Most vCPUs summed over all VMs.
    pub max_total_vcpus: u64,
    /// Most memory summed over all VMs, in MiB.
    pub max_total_memory_mib: u64,
}

impl VmLimits {
    /// The defaults for this host: 256 VMs, 32 vCPUs and 64 GiB per VM, and in
    /// total 16 vCPUs per host CPU and the host's physical memory.
    pub fn host_defaults() -> Self {
        Self {
            max_vms: 256,
            max_vcpus_per_vm: 32,
            max_memory_per_vm_mib: 65536,
            max_total_vcpus: default_total_vcpus(),
            max_total_memory_mib: default_total_memory_mib(),
        }
    }

    /// Limits so high they never apply (tests and embedders that enforce their own).
    pub fn unlimited() -> Self {
        Self {
            max_vms: u64::MAX,
            max_vcpus_per_vm: u64::MAX,
            max_memory_per_vm_mib: u64::MAX,
            max_total_vcpus: u64::MAX,
            max_total_memory_mib: u64::MAX,
        }
    }

    /// Checks one VM's own size against the per-VM limits.
    pub fn check_vm(&self, c: &VmConfig) -> Result<(), VmError> {
        let Footprint {
            vcpus,
            memory_mib: mem,
        } = Footprint::of(c);
        if vcpus > self.max_vcpus_per_vm {
            return Err(VmError::ResourceExhausted(format!(
                "config.cpu: {vcpus} vCPUs exceed the per-VM limit of {} (UNKEY_VMCP_MAX_VCPUS_PER_VM)",
                self.max_vcpus_per_vm
            )));
        }
        if mem > self.max_memory_per_vm_mib {
            return Err(VmError::ResourceExhausted(format!(
                "config.memory: {mem} MiB exceeds the per-VM limit of {} MiB (UNKEY_VMCP_MAX_MEMORY_PER_VM_MIB)",
                self.max_memory_per_vm_mib
            )));
        }
        Ok(())
    }

    /// Checks that adding `new` to the VMs of `existing` footprints stays within the host-wide limits.
    pub fn check_host(
        &self,
        existing: impl IntoIterator<Item = Footprint>,
        new: &VmConfig,
    ) -> Result<(), VmError> {
        let (mut count, mut vcpus, mut mem) = (0u64, 0u64, 0u64);
        for f in existing {
            count += 1;
            vcpus = vcpus.saturating_add(f.vcpus);
            mem = mem.saturating_add(f.memory_mib);
        }
        if count >= self.max_vms {
            return Err(VmError::ResourceExhausted(format!(
                "this host already has {count} VMs, the limit (UNKEY_VMCP_MAX_VMS={})",
                self.max_vms
            )));
        }
        let Footprint {
            vcpus: v,
            memory_mib: m,
        } = Footprint::of(new);
        if vcpus.saturating_add(v) > self.max_total_vcpus {
            return Err(VmError::ResourceExhausted(format!(
                "{v} more vCPUs would exceed the host total of {} (UNKEY_VMCP_MAX_TOTAL_VCPUS; {vcpus} in use)",
                self.max_total_vcpus
            )));
        }
        if mem.saturating_add(m) > self.max_total_memory_mib {
            return Err(VmError::ResourceExhausted(format!(
                "{m} MiB more memory would exceed the host total of {} MiB (UNKEY_VMCP_MAX_TOTAL_MEMORY_MIB; {mem} MiB in use)",
                self.max_total_memory_mib
            )));
        }
        Ok(())
    }
}

/// What a VM may use at most (hot-plug ceilings included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// vCPUs.
    pub vcpus: u64,
    /// Memory in MiB.
    pub memory_mib: u64,
}

impl Footprint {
    /// The footprint of a validated config (negative values, rejected by validation, count as 0).
    pub fn of(c: &VmConfig) -> Self {
        let bytes = c.memory.size_bytes.max(c.memory.max_size_bytes);
        Self {
            vcpus: u64::try_from(c.effective_max_vcpus()).unwrap_or(0),
            memory_mib: u64::try_from(bytes.div_euclid(MIB)).unwrap_or(0),
        }
    }
}

/// 16 vCPUs per logical host CPU: idle vCPU threads cost little, but the bound stops runaway creation.
pub fn default_total_vcpus() -> u64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    16 * u64::try_from(cpus).unwrap_or(1)
}

/// The host's physical memory (MemTotal) in MiB, or 1 TiB when /proc/meminfo is unreadable.
pub fn default_total_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| mem_total_mib(&s))
        .unwrap_or(1 << 20)
}

fn mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// Everything a create must pass besides config validation.
#[derive(Debug, Clone)]
pub struct CreatePolicy {
    /// Where host files may come from.
    pub paths: PathPolicy,
    /// Resource limits.
    pub limits: VmLimits,
}

impl CreatePolicy {
    /// No path restriction and no limits.
    pub fn unrestricted() -> Self {
        Self {
            paths: PathPolicy::unrestricted(),
            limits: VmLimits::unlimited(),
        }
    }

    /// The per-VM checks: size limits, then host paths.
    pub fn check_vm(&self, c: &VmConfig) -> Result<(), VmError> {
        self.limits.check_vm(c)?;
        self.paths.check(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::config::tests::valid;

    fn vm(vcpus: i32, mib: i64) -> VmConfig {
        let mut c = valid();
        c.cpu.vcpu_count = vcpus;
        c.memory.size_bytes = mib * MIB;
        c
    }

    fn limits() -> VmLimits {
        VmLimits {
            max_vms: 3,
            max_vcpus_per_vm: 4,
            max_memory_per_vm_mib: 1024,
            max_total_vcpus: 8,
            max_total_memory_mib: 2048,
        }
    }

    fn exhausted(r: Result<(), VmError>) -> String {
        match r {
            Err(VmError::ResourceExhausted(m)) => m,
            other => panic!("expected resource_exhausted, got {other:?}"),
        }
    }

    #[test]
    fn per_vm_limits_count_hotplug_ceilings() {
        let l = limits();
        assert_eq!(l.check_vm(&vm(4, 1024)), Ok(()));
        assert!(exhausted(l.check_vm(&vm(5, 256))).contains("UNKEY_VMCP_MAX_VCPUS_PER_VM"));
        assert!(exhausted(l.check_vm(&vm(1, 1025))).contains("UNKEY_VMCP_MAX_MEMORY_PER_VM_MIB"));
        let mut c = vm(2, 256);
        c.cpu.max_vcpu_count = 8;
        assert!(exhausted(l.check_vm(&c)).contains("8 vCPUs"));
        let mut c = vm(2, 256);
        c.memory.hotplug_enabled = true;
        c.memory.max_size_bytes = 2048 * MIB;
        assert!(exhausted(l.check_vm(&c)).contains("2048 MiB"));
    }

    #[test]
    fn host_totals_count_existing_vms() {
        let l = limits();
        let two = || [Footprint::of(&vm(4, 1024)), Footprint::of(&vm(3, 512))];
        assert_eq!(l.check_host(two(), &vm(1, 512)), Ok(()));
        assert!(exhausted(l.check_host(two(), &vm(2, 256))).contains("UNKEY_VMCP_MAX_TOTAL_VCPUS"));
        assert!(
            exhausted(l.check_host(two(), &vm(1, 513))).contains("UNKEY_VMCP_MAX_TOTAL_MEMORY_MIB")
        );
        let three = two().into_iter().chain([Footprint::of(&vm(1, 1))]);
        assert!(exhausted(l.check_host(three, &vm(1, 1))).contains("UNKEY_VMCP_MAX_VMS=3"));
        assert_eq!(l.check_host([], &vm(4, 1024)), Ok(()));
    }

    #[test]
    fn unlimited_never_refuses() {
        let l = VmLimits::unlimited();
        let big = vm(254, 1 << 30);
        let many = (0..100).map(|_| Footprint::of(&big));
        assert_eq!(l.check_vm(&big), Ok(()));
        assert_eq!(l.check_host(many, &big), Ok(()));
    }

    #[test]
    fn host_defaults_are_positive_and_documented() {
        let d = VmLimits::host_defaults();
        assert_eq!(
            (d.max_vms, d.max_vcpus_per_vm, d.max_memory_per_vm_mib),
            (256, 32, 65536)
        );
        assert!(d.max_total_vcpus >= 16 && d.max_total_vcpus.is_multiple_of(16));
        assert!(d.max_total_memory_mib > 0);
        assert_eq!(
            mem_total_mib("MemFree: 1 kB\nMemTotal:       16318820 kB\n"),
            Some(15936)
        );
        assert_eq!(mem_total_mib("nothing"), None);
    }
}
