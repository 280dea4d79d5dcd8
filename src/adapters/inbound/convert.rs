//! Conversions between the wire messages (`vmm.v1`, buffa) and the domain.
//! Total in both directions for the config, so nothing a client sends is
//! dropped on the way in: every field reaches validation, which accepts it
//! with meaning or rejects it naming the field.

use std::collections::BTreeMap;

use buffa::{EnumValue, MessageField};

use crate::domain::restart::RestartPolicy;
use crate::domain::snapshot::{NetworkOverride, SnapshotId, SnapshotInfo, SnapshotKind};
use crate::domain::{self, VmConfigError, VmError, VmId, VmSnapshot, VmState};
use crate::ports::{RestoreVm, VmDetails, VmMetrics, WatchEvent, WatchEventKind, WatchQuery};
use crate::proto::vmm::v1 as pb;

/// Parses a required vm_id field.
pub fn vm_id(field: &str, raw: &str) -> Result<VmId, VmError> {
    VmId::parse(raw).map_err(|e| VmError::InvalidArgument(VmConfigError::new(field, e.to_string())))
}

/// Parses an optional vm_id (empty means "generate one").
pub fn optional_vm_id(raw: &str) -> Result<Option<VmId>, VmError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        vm_id("vm_id", raw).map(Some)
    }
}

/// An optional VM id in `field` (empty: none).
pub fn optional_vm_id_named(field: &str, raw: &str) -> Result<Option<VmId>, VmError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        vm_id(field, raw).map(Some)
    }
}

/// Parses a required snapshot id.
pub fn snapshot_id(field: &str, raw: &str) -> Result<SnapshotId, VmError> {
    SnapshotId::parse(field, raw).map_err(VmError::InvalidArgument)
}

/// Parses an optional snapshot_id (empty means "generate one").
pub fn optional_snapshot_id(raw: &str) -> Result<Option<SnapshotId>, VmError> {
    if raw.is_empty() {
        Ok(None)
    } else {
        snapshot_id("snapshot_id", raw).map(Some)
    }
}

/// The snapshot kind asked for (unspecified is full).
pub fn snapshot_kind_in(kind: EnumValue<pb::SnapshotKind>) -> Result<SnapshotKind, VmError> {
    match kind.as_known() {
        Some(
            pb::SnapshotKind::SNAPSHOT_KIND_UNSPECIFIED | pb::SnapshotKind::SNAPSHOT_KIND_FULL,
        ) => Ok(SnapshotKind::Full),
        Some(pb::SnapshotKind::SNAPSHOT_KIND_DIFF) => Ok(SnapshotKind::Diff),
        None => Err(VmError::InvalidArgument(VmConfigError::new(
            "kind",
            format!("unknown snapshot kind {}", kind.to_i32()),
        ))),
    }
}

/// A snapshot → SnapshotInfo.
pub fn snapshot_out(s: &SnapshotInfo) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        snapshot_id: s.id.to_string(),
        source_vm_id: s.source_vm_id.to_string(),
        backend: s.backend.clone(),
        vmm_version: s.vmm_version.clone(),
        config: config_out(&s.config).into(),
        created_timestamp: s.created_at,
        size_bytes: i64::try_from(s.size_bytes).unwrap_or(i64::MAX),
        kind: match s.kind {
            SnapshotKind::Full => pb::SnapshotKind::SNAPSHOT_KIND_FULL,
            SnapshotKind::Diff => pb::SnapshotKind::SNAPSHOT_KIND_DIFF,
        }
        .into(),
        parent_snapshot_id: s
            .parent
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// Parses a RestoreVm request; bad ids and overrides name their field.
pub fn restore_in(req: &pb::RestoreVmRequest) -> Result<RestoreVm, VmError> {
    let network_overrides = req
        .network_overrides
        .iter()
        .enumerate()
        .map(|(i, o)| {
            if o.interface_id.is_empty() || o.tap_device.is_empty() {
                return Err(VmError::InvalidArgument(VmConfigError::new(
                    format!("network_overrides[{i}]"),
                    "needs both interface_id and tap_device",
                )));
            }
            Ok(NetworkOverride {
                interface_id: o.interface_id.clone(),
                tap_device: o.tap_device.clone(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(RestoreVm {
        vm_id: vm_id("vm_id", &req.vm_id)?,
        snapshot_id: snapshot_id("snapshot_id", &req.snapshot_id)?,
        resume: req.resume,
        network_overrides,
        metadata: (!req.metadata.is_empty()).then(|| map_in(&req.metadata)),
    })
}

/// A non-negative int32 from the wire as u32, or an error naming the field.
pub fn non_negative(field: &str, v: i32) -> Result<u32, VmError> {
    u32::try_from(v).map_err(|_| {
        VmError::InvalidArgument(VmConfigError::new(
            field,
            format!("must not be negative, got {v}"),
        ))
    })
}

fn map_in<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> BTreeMap<String, String> {
    m.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn map_out<T: FromIterator<(String, String)>>(m: &BTreeMap<String, String>) -> T {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Wire config → domain config (unvalidated; a missing section becomes zero values
/// that validation then rejects by field name).
pub fn config_in(c: &pb::VmConfig) -> domain::VmConfig {
    let cpu = c.cpu.as_option();
    let mem = c.memory.as_option();
    let boot = c.boot.as_option();
    let console = c.console.as_option();
    domain::VmConfig {
        cpu: domain::CpuConfig {
            vcpu_count: cpu.map_or(0, |c| c.vcpu_count),
            max_vcpu_count: cpu.map_or(0, |c| c.max_vcpu_count),
            topology: cpu
                .and_then(|c| c.topology.as_option())
                .map(|t| domain::CpuTopology {
                    sockets: t.sockets,
                    cores_per_socket: t.cores_per_socket,
                    threads_per_core: t.threads_per_core,
                }),
            features: cpu.map(|c| map_in(&c.features)).unwrap_or_default(),
        },
        memory: domain::MemoryConfig {
            size_bytes: mem.map_or(0, |m| m.size_bytes),
            hotplug_enabled: mem.is_some_and(|m| m.hotplug_enabled),
            max_size_bytes: mem.map_or(0, |m| m.max_size_bytes),
            backing: mem.map(|m| map_in(&m.backing)).unwrap_or_default(),
            track_dirty_pages: mem.is_some_and(|m| m.track_dirty_pages),
        },
        boot: domain::BootConfig {
            kernel_path: boot.map(|b| b.kernel_path.clone()).unwrap_or_default(),
            initrd_path: boot.map(|b| b.initrd_path.clone()).unwrap_or_default(),
            kernel_args: boot.map(|b| b.kernel_args.clone()).unwrap_or_default(),
            boot_options: boot.map(|b| map_in(&b.boot_options)).unwrap_or_default(),
        },
        storage: c
            .storage
            .iter()
            .map(|s| domain::StorageDevice {
                id: s.id.clone(),
                path: s.path.clone(),
                read_only: s.read_only,
                is_root_device: s.is_root_device,
                interface_type: s.interface_type.clone(),
                options: map_in(&s.options),
            })
            .collect(),
        network: c
            .network
            .iter()
            .map(|n| domain::NetworkInterface {
                id: n.id.clone(),
                mac_address: n.mac_address.clone(),
                tap_device: n.tap_device.clone(),
                interface_type: n.interface_type.clone(),
                options: map_in(&n.options),
                bridge: n.bridge.clone(),
                guest_address: n.guest_address.as_option().map(|g| domain::GuestAddress {
                    address: g.address.clone(),
                    gateway: g.gateway.clone(),
                    dns: g.dns.clone(),
                }),
            })
            .collect(),
        console: domain::ConsoleConfig {
            enabled: console.is_some_and(|c| c.enabled),
            output: console.map(|c| c.output.clone()).unwrap_or_default(),
            input: console.map(|c| c.input.clone()).unwrap_or_default(),
            console_type: console.map(|c| c.console_type.clone()).unwrap_or_default(),
        },
        metadata: map_in(&c.metadata),
        restart_policy: match c.restart_policy.as_known() {
            Some(pb::RestartPolicy::RESTART_POLICY_NEVER) => RestartPolicy::Never,
            Some(pb::RestartPolicy::RESTART_POLICY_ON_FAILURE) => RestartPolicy::OnFailure,
            Some(pb::RestartPolicy::RESTART_POLICY_ALWAYS) => RestartPolicy::Always,
            // Unknown numbers are refused by `VmConfig::validate` through `restart_policy_in`.
            Some(pb::RestartPolicy::RESTART_POLICY_UNSPECIFIED) | None => {
                RestartPolicy::Unspecified
            }
        },
    }
}

/// Checks the wire restart policy: an unknown number is `invalid_argument` naming the field.
pub fn restart_policy_in(c: &pb::VmConfig) -> Result<(), VmError> {
    match c.restart_policy.as_known() {
        Some(_) => Ok(()),
        None => Err(VmError::InvalidArgument(VmConfigError::new(
            "config.restart_policy",
            format!(
                "unknown value {}; use RESTART_POLICY_NEVER, _ON_FAILURE or _ALWAYS",
                c.restart_policy.to_i32()
            ),
        ))),
    }
}

/// Domain config → wire config.
pub fn config_out(c: &domain::VmConfig) -> pb::VmConfig {
    pb::VmConfig {
        cpu: MessageField::some(pb::CpuConfig {
            vcpu_count: c.cpu.vcpu_count,
            max_vcpu_count: c.cpu.max_vcpu_count,
            topology: c
                .cpu
                .topology
                .map(|t| pb::CpuTopology {
                    sockets: t.sockets,
                    cores_per_socket: t.cores_per_socket,
                    threads_per_core: t.threads_per_core,
                    ..Default::default()
                })
                .into(),
            features: map_out(&c.cpu.features),
            ..Default::default()
        }),
        memory: MessageField::some(pb::MemoryConfig {
            size_bytes: c.memory.size_bytes,
            hotplug_enabled: c.memory.hotplug_enabled,
            max_size_bytes: c.memory.max_size_bytes,
            backing: map_out(&c.memory.backing),
            track_dirty_pages: c.memory.track_dirty_pages,
            ..Default::default()
        }),
        boot: MessageField::some(pb::BootConfig {
            kernel_path: c.boot.kernel_path.clone(),
            initrd_path: c.boot.initrd_path.clone(),
            kernel_args: c.boot.kernel_args.clone(),
            boot_options: map_out(&c.boot.boot_options),
            ..Default::default()
        }),
        storage: c
            .storage
            .iter()
            .map(|s| pb::StorageDevice {
                id: s.id.clone(),
                path: s.path.clone(),
                read_only: s.read_only,
                is_root_device: s.is_root_device,
                interface_type: s.interface_type.clone(),
                options: map_out(&s.options),
                ..Default::default()
            })
            .collect(),
        network: c
            .network
            .iter()
            .map(|n| pb::NetworkInterface {
                id: n.id.clone(),
                mac_address: n.mac_address.clone(),
                tap_device: n.tap_device.clone(),
                interface_type: n.interface_type.clone(),
                options: map_out(&n.options),
                bridge: n.bridge.clone(),
                guest_address: n
                    .guest_address
                    .as_ref()
                    .map(|g| pb::GuestAddress {
                        address: g.address.clone(),
                        gateway: g.gateway.clone(),
                        dns: g.dns.clone(),
                        ..Default::default()
                    })
                    .into(),
                ..Default::default()
            })
            .collect(),
        console: MessageField::some(pb::ConsoleConfig {
            enabled: c.console.enabled,
            output: c.console.output.clone(),
            input: c.console.input.clone(),
            console_type: c.console.console_type.clone(),
            ..Default::default()
        }),
        metadata: map_out(&c.metadata),
        restart_policy: match c.restart_policy {
            RestartPolicy::Unspecified => pb::RestartPolicy::RESTART_POLICY_UNSPECIFIED,
            RestartPolicy::Never => pb::RestartPolicy::RESTART_POLICY_NEVER,
            RestartPolicy::OnFailure => pb::RestartPolicy::RESTART_POLICY_ON_FAILURE,
            RestartPolicy::Always => pb::RestartPolicy::RESTART_POLICY_ALWAYS,
        }
        .into(),
        ..Default::default()
    }
}

/// Domain state → wire enum.
pub fn state_out(s: VmState) -> EnumValue<pb::VmState> {
    EnumValue::Known(match s {
        VmState::Created => pb::VmState::VM_STATE_CREATED,
        VmState::Running => pb::VmState::VM_STATE_RUNNING,
        VmState::Paused => pb::VmState::VM_STATE_PAUSED,
        VmState::Shutdown => pb::VmState::VM_STATE_SHUTDOWN,
        VmState::Failed => pb::VmState::VM_STATE_FAILED,
    })
}

/// Wire state filter → domain states; UNSPECIFIED and unknown numbers are rejected.
pub fn state_filter_in(filter: &[EnumValue<pb::VmState>]) -> Result<Vec<VmState>, VmError> {
    filter
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_known() {
            Some(pb::VmState::VM_STATE_CREATED) => Ok(VmState::Created),
            Some(pb::VmState::VM_STATE_RUNNING) => Ok(VmState::Running),
            Some(pb::VmState::VM_STATE_PAUSED) => Ok(VmState::Paused),
            Some(pb::VmState::VM_STATE_SHUTDOWN) => Ok(VmState::Shutdown),
            Some(pb::VmState::VM_STATE_FAILED) => Ok(VmState::Failed),
            Some(pb::VmState::VM_STATE_UNSPECIFIED) | None => {
                Err(VmError::InvalidArgument(VmConfigError::new(
                    format!("state_filter[{i}]"),
                    format!("must be a concrete VmState, got {}", v.to_i32()),
                )))
            }
        })
        .collect()
}

fn metrics_out(m: &VmMetrics) -> pb::VmMetrics {
    pb::VmMetrics {
        cpu_usage_percent: m.cpu_usage_percent,
        memory_usage_bytes: m.memory_usage_bytes,
        network_stats: MessageField::some(pb::NetworkStats {
            bytes_received: m.network.bytes_received,
            bytes_transmitted: m.network.bytes_transmitted,
            packets_received: m.network.packets_received,
            packets_transmitted: m.network.packets_transmitted,
            ..Default::default()
        }),
        storage_stats: MessageField::some(pb::StorageStats {
            bytes_read: m.storage.bytes_read,
            bytes_written: m.storage.bytes_written,
            read_operations: m.storage.read_operations,
            write_operations: m.storage.write_operations,
            ..Default::default()
        }),
        uptime_seconds: m.uptime_seconds,
        ..Default::default()
    }
}

fn generation(g: u64) -> i64 {
    i64::try_from(g).unwrap_or(i64::MAX)
}

/// Full details → GetVmInfoResponse.
pub fn details_out(d: &VmDetails) -> pb::GetVmInfoResponse {
    let s = &d.snapshot;
    pb::GetVmInfoResponse {
        vm_id: s.id.to_string(),
        config: MessageField::some(config_out(&s.config)),
        state: state_out(s.state),
        metrics: d.metrics.as_ref().map(metrics_out).into(),
        backend_info: map_out(&d.backend_info),
        state_reason: s.reason.clone(),
        generation: generation(s.generation),
        created_timestamp: s.created_at,
        modified_timestamp: s.modified_at,
        metrics_sampled_timestamp_ms: d.sampled_at_ms.unwrap_or(0),
        ..Default::default()
    }
}

/// Snapshot → ListVms entry.
pub fn vm_info_out(s: &VmSnapshot) -> pb::VmInfo {
    pb::VmInfo {
        vm_id: s.id.to_string(),
        state: state_out(s.state),
        vcpu_count: s.config.cpu.vcpu_count,
        memory_size_bytes: s.config.memory.size_bytes,
        created_timestamp: s.created_at,
        modified_timestamp: s.modified_at,
        metadata: map_out(&s.config.metadata),
        state_reason: s.reason.clone(),
        generation: generation(s.generation),
        revision: s.revision,
        ..Default::default()
    }
}

/// Parses a WatchVms request; bad ids and states name their field.
pub fn watch_query_in(req: &pb::WatchVmsRequest) -> Result<WatchQuery, VmError> {
    let vm_ids = req
        .vm_ids
        .iter()
        .enumerate()
        .map(|(i, id)| vm_id(&format!("vm_ids[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WatchQuery {
        vm_ids,
        states: state_filter_in(&req.state_filter)?,
        since_revision: (req.since_revision > 0).then_some(req.since_revision),
        send_initial: req.send_initial,
    })
}

/// The wire form of one watch message.
pub fn watch_event_out(e: &WatchEvent) -> pb::WatchVmsResponse {
    let kind = match e.kind {
        WatchEventKind::Added => pb::WatchEventType::WATCH_EVENT_TYPE_ADDED,
        WatchEventKind::Changed => pb::WatchEventType::WATCH_EVENT_TYPE_CHANGED,
        WatchEventKind::Deleted => pb::WatchEventType::WATCH_EVENT_TYPE_DELETED,
        WatchEventKind::Synced => pb::WatchEventType::WATCH_EVENT_TYPE_SYNCED,
        WatchEventKind::Heartbeat => pb::WatchEventType::WATCH_EVENT_TYPE_HEARTBEAT,
    };
    pb::WatchVmsResponse {
        r#type: kind.into(),
        vm: match &e.vm {
            Some(vm) => MessageField::some(vm_info_out(vm)),
            None => MessageField::none(),
        },
        revision: e.revision,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_wire_config() -> pb::VmConfig {
        let kv = |k: &str, v: &str| [(k.to_owned(), v.to_owned())].into_iter().collect();
        pb::VmConfig {
            cpu: MessageField::some(pb::CpuConfig {
                vcpu_count: 2,
                max_vcpu_count: 4,
                topology: MessageField::some(pb::CpuTopology {
                    sockets: 1,
                    cores_per_socket: 2,
                    threads_per_core: 2,
                    ..Default::default()
                }),
                features: kv("f", "1"),
                ..Default::default()
            }),
            memory: MessageField::some(pb::MemoryConfig {
                size_bytes: 1 << 28,
                hotplug_enabled: true,
                max_size_bytes: 1 << 30,
                backing: kv("b", "2"),
                track_dirty_pages: true,
                ..Default::default()
            }),
            boot: MessageField::some(pb::BootConfig {
                kernel_path: "/k".into(),
                initrd_path: "/i".into(),
                kernel_args: "console=ttyS0".into(),
                boot_options: kv("o", "3"),
                ..Default::default()
            }),
            storage: vec![pb::StorageDevice {
                id: "root".into(),
                path: "/d.img".into(),
                read_only: true,
                is_root_device: true,
                interface_type: "virtio-blk".into(),
                options: kv("s", "4"),
                ..Default::default()
            }],
            network: vec![pb::NetworkInterface {
                id: "eth0".into(),
                mac_address: "52:54:00:00:00:01".into(),
                tap_device: "tap0".into(),
                interface_type: "virtio-net".into(),
                options: kv("n", "5"),
                ..Default::default()
            }],
            console: MessageField::some(pb::ConsoleConfig {
                enabled: true,
                output: "/c.log".into(),
                input: "x".into(),
                console_type: "serial".into(),
                ..Default::default()
            }),
            metadata: kv("team", "a"),
            ..Default::default()
        }
    }

    #[test]
    fn every_config_field_survives_a_round_trip() {
        let wire = full_wire_config();
        let domain = config_in(&wire);
        assert_eq!(domain.cpu.max_vcpu_count, 4);
        assert_eq!(domain.cpu.features.get("f").map(String::as_str), Some("1"));
        assert_eq!(
            domain.memory.backing.get("b").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            domain.boot.boot_options.get("o").map(String::as_str),
            Some("3")
        );
        assert_eq!(
            domain.storage[0].options.get("s").map(String::as_str),
            Some("4")
        );
        assert_eq!(
            domain.network[0].options.get("n").map(String::as_str),
            Some("5")
        );
        assert_eq!(domain.console.input, "x");
        assert_eq!(config_out(&domain), wire);
        assert_eq!(config_in(&config_out(&domain)), domain);
    }

    #[test]
    fn missing_sections_become_zero_values_that_validation_names() {
        let d = config_in(&pb::VmConfig::default());
        assert_eq!(
            d.validate().map_err(|e| e.field),
            Err("config.cpu.vcpu_count".to_owned())
        );
    }

    #[test]
    fn state_filter_rejects_unspecified_and_unknown() {
        let ok = state_filter_in(&[
            pb::VmState::VM_STATE_RUNNING.into(),
            pb::VmState::VM_STATE_FAILED.into(),
        ]);
        assert_eq!(ok, Ok(vec![VmState::Running, VmState::Failed]));
        for bad in [
            EnumValue::from(pb::VmState::VM_STATE_UNSPECIFIED),
            EnumValue::Unknown(42),
        ] {
            let err = state_filter_in(&[pb::VmState::VM_STATE_RUNNING.into(), bad])
                .expect_err("rejected");
            assert!(
                matches!(err, VmError::InvalidArgument(ref e) if e.field == "state_filter[1]"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn ids_and_counts_are_checked() {
        assert_eq!(optional_vm_id(""), Ok(None));
        assert!(
            matches!(optional_vm_id("../x"), Err(VmError::InvalidArgument(ref e)) if e.field == "vm_id")
        );
        assert!(
            matches!(non_negative("timeout_seconds", -1), Err(VmError::InvalidArgument(ref e)) if e.field == "timeout_seconds")
        );
        assert_eq!(non_negative("page_size", 7), Ok(7));
    }
}
