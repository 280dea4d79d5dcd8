//! The edge where the application calls the hypervisor port: every call
//! under a timeout, in a span, with its duration and outcome reported to
//! telemetry, and a backend failure mapped to the error the caller sees.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::domain::{Operation, VmError, VmSnapshot};
use crate::ports::{BackendKind, HypervisorError, Telemetry, TelemetryEvent};

/// Runs `fut` with `timeout`, reporting the call's duration and outcome.
pub async fn timed_call<T>(
    backend: BackendKind,
    telemetry: &dyn Telemetry,
    operation: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, HypervisorError>>,
) -> Result<T, HypervisorError> {
    let started = Instant::now();
    let span = tracing::info_span!(
        "hypervisor.call",
        backend = backend.as_str(),
        operation,
        outcome = tracing::field::Empty
    );
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(HypervisorError::Timeout {
            operation: operation.to_owned(),
            after: timeout,
        }),
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.kind(),
    };
    span.record("outcome", outcome);
    if let Err(e) = &result {
        tracing::warn!(parent: &span, error = %e, source = ?std::error::Error::source(e), "hypervisor call failed");
    }
    telemetry.record(TelemetryEvent::HypervisorCall {
        backend,
        operation,
        outcome,
        duration: started.elapsed(),
    });
    result
}

/// Maps a backend failure to the error the caller sees, given the VM's state.
pub fn hypervisor_to_vm_error(e: HypervisorError, snap: &VmSnapshot, op: Operation) -> VmError {
    match e {
        HypervisorError::InvalidConfig(c) => VmError::InvalidArgument(c),
        HypervisorError::InvalidState(msg) if op == Operation::Create => VmError::Unavailable(msg),
        HypervisorError::InvalidState(msg) => VmError::FailedPrecondition {
            vm_id: snap.id.to_string(),
            operation: op.as_str(),
            state: snap.state,
            reason: msg,
        },
        HypervisorError::Timeout { .. } => VmError::DeadlineExceeded(format!(
            "vm {}: {e}; the VM's state is re-read from its VMM",
            snap.id
        )),
        HypervisorError::Unavailable { .. }
        | HypervisorError::SpawnFailed { .. }
        | HypervisorError::Gone(_) => VmError::Unavailable(format!("vm {}: {e}", snap.id)),
        HypervisorError::Unsupported(m) => VmError::Unimplemented(m),
        HypervisorError::ResourceExhausted { message, .. } => VmError::ResourceExhausted(message),
        HypervisorError::Protocol(m) => VmError::Internal(format!("vm {}: {m}", snap.id)),
    }
}
