//! The error vocabulary every layer speaks to callers. The inbound adapter
//! maps each variant to exactly one Connect code in one tested function.

use super::config::VmConfigError;
use super::lifecycle::VmState;

/// An error answered to a caller of the VM service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    /// A request field is malformed or out of range.
    #[error("{0}")]
    InvalidArgument(#[from] VmConfigError),
    /// No VM has this id.
    #[error("vm {0:?} not found")]
    NotFound(String),
    /// A VM with this id exists with a different configuration.
    #[error("vm {0:?} already exists with a different config")]
    AlreadyExists(String),
    /// The VM's current state does not allow the operation.
    #[error("cannot {operation} vm {vm_id:?}: it is {state}{}", reason_suffix(.reason))]
    FailedPrecondition {
        /// The VM.
        vm_id: String,
        /// What was asked.
        operation: &'static str,
        /// The VM's state when it was asked.
        state: VmState,
        /// Extra detail (e.g. the failure reason of a Failed VM).
        reason: String,
    },
    /// The backend or a VMM cannot be reached or used right now.
    #[error("{0}")]
    Unavailable(String),
    /// The VMM did not answer in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A host or API limit was reached.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller may not use a host resource (e.g. a path outside the allowed directories).
    #[error("{0}")]
    PermissionDenied(String),
    /// A position (such as a watch revision) outside what the service can serve.
    #[error("{0}")]
    OutOfRange(String),
    /// The backend cannot do this at all.
    #[error("{0}")]
    Unimplemented(String),
    /// No snapshot has this id.
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// A snapshot with this id exists (or is being taken).
    #[error("snapshot {0:?} already exists")]
    SnapshotExists(String),
    /// Something the request needs does not hold, outside any VM's state
    /// (a snapshot of another backend or VMM version).
    #[error("{0}")]
    Incompatible(String),
    /// A bug in VMCP; the message is for logs, callers see a generic text.
    #[error("internal error: {0}")]
    Internal(String),
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    }
}
