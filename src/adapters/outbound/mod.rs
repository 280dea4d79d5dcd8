//! Outbound adapters: VMM backends, the host network, the VM store and telemetry.

pub mod cloud_hypervisor;
pub mod disk_copy;
pub mod firecracker;
pub mod network;
pub mod otel;
pub mod snapshots;
pub mod store;
pub mod vmm;
