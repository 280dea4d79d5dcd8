//! Outbound adapters: VMM backends, the VM store and telemetry.
pub mod otel;
