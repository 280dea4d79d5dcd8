//! The telemetry port: the application reports what happened, an adapter
//! turns it into spans and metrics. Implementations MUST NOT block or fail.

use std::time::Duration;

use crate::domain::{Operation, VmEvent};

use super::hypervisor::BackendKind;

/// Something worth counting or tracing.
#[derive(Debug, Clone, PartialEq)]
pub enum TelemetryEvent {
    /// A lifecycle event from the domain core.
    Vm(VmEvent),
    /// A hypervisor call finished.
    HypervisorCall {
        /// Backend.
        backend: BackendKind,
        /// Operation (`create`, `boot`, … `info`).
        operation: &'static str,
        /// `ok` or an error class.
        outcome: &'static str,
        /// How long it took.
        duration: Duration,
    },
    /// A VM reached Running after a boot.
    BootCompleted {
        /// Backend.
        backend: BackendKind,
        /// Time from the boot request to Running.
        duration: Duration,
    },
    /// A VMM process ended without VMCP asking it to.
    VmmExited {
        /// Backend.
        backend: BackendKind,
        /// A reason class for the metric label (`poweroff`, `crash`, `signal`…),
        /// never free text: the full reason goes to logs and the VM's record.
        reason: &'static str,
    },
    /// A client connection was refused at accept because a connection cap was reached.
    ConnectionRefused {
        /// The cap: `max_connections` or `max_connections_per_client`.
        reason: &'static str,
    },
    /// VMCP closed a client connection that ran out of time.
    ConnectionTimedOut {
        /// `header` (request head or HTTP/2 preface), `idle` or `tls_handshake`.
        reason: &'static str,
    },
    /// A watcher opened (+1) or closed (-1).
    WatchersOpen {
        /// +1 or -1.
        delta: i64,
    },
    /// A watch message was sent to a client.
    WatchSent {
        /// `added`, `changed`, `deleted`, `synced` or `heartbeat`.
        kind: &'static str,
    },
    /// A change could not be queued for a watcher, which was dropped.
    WatchDropped {
        /// `overflow`.
        reason: &'static str,
    },
    /// An admitted operation was denied or ignored (for counters).
    Admission {
        /// The operation.
        op: Operation,
        /// `accepted`, `ignored` or `denied`.
        outcome: &'static str,
    },
}

/// Receives telemetry events.
pub trait Telemetry: Send + Sync + 'static {
    /// Records `event`. MUST return promptly and never fail the caller.
    fn record(&self, event: TelemetryEvent);
}

/// Telemetry that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopTelemetry;

impl Telemetry for NoopTelemetry {
    fn record(&self, _event: TelemetryEvent) {}
}
