//! The one place that maps domain errors to Connect codes. Internal details
//! are logged here and never sent to callers.

use connectrpc::{ConnectError, ErrorCode};

use crate::domain::VmError;

/// Maps a domain error to the Connect error a caller sees.
pub fn to_connect(e: &VmError) -> ConnectError {
    let code = match e {
        VmError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        VmError::NotFound(_) => ErrorCode::NotFound,
        VmError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        VmError::FailedPrecondition { .. } => ErrorCode::FailedPrecondition,
        VmError::Unavailable(_) => ErrorCode::Unavailable,
        VmError::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
        VmError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
        VmError::PermissionDenied(_) => ErrorCode::PermissionDenied,
        VmError::OutOfRange(_) => ErrorCode::OutOfRange,
        VmError::Unimplemented(_) => ErrorCode::Unimplemented,
        VmError::SnapshotNotFound(_) => ErrorCode::NotFound,
        VmError::SnapshotExists(_) => ErrorCode::AlreadyExists,
        VmError::Incompatible(_) => ErrorCode::FailedPrecondition,
        VmError::Internal(detail) => {
            tracing::error!(error = %detail, "internal error");
            return ConnectError::new(ErrorCode::Internal, "internal error; see the VMCP logs");
        }
    };
    ConnectError::new(code, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{VmConfigError, VmState};

    fn code(e: VmError) -> (ErrorCode, String) {
        let c = to_connect(&e);
        (c.code, c.message.clone().unwrap_or_default())
    }

    #[test]
    fn not_found() {
        let (c, m) = code(VmError::NotFound("vm1".into()));
        assert_eq!(c, ErrorCode::NotFound);
        assert!(m.contains("vm1"));
    }

    #[test]
    fn already_exists() {
        assert_eq!(
            code(VmError::AlreadyExists("a".into())).0,
            ErrorCode::AlreadyExists
        );
    }

    #[test]
    fn failed_precondition_names_the_state() {
        let (c, m) = code(VmError::FailedPrecondition {
            vm_id: "a".into(),
            operation: "pause",
            state: VmState::Created,
            reason: String::new(),
        });
        assert_eq!(c, ErrorCode::FailedPrecondition);
        assert!(m.contains("Created"), "{m}");
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let (c, m) = code(VmError::InvalidArgument(VmConfigError::new(
            "config.cpu.vcpu_count",
            "bad",
        )));
        assert_eq!(c, ErrorCode::InvalidArgument);
        assert!(m.starts_with("config.cpu.vcpu_count"), "{m}");
    }

    #[test]
    fn unavailable() {
        assert_eq!(
            code(VmError::Unavailable("x".into())).0,
            ErrorCode::Unavailable
        );
    }

    #[test]
    fn deadline_exceeded() {
        assert_eq!(
            code(VmError::DeadlineExceeded("x".into())).0,
            ErrorCode::DeadlineExceeded
        );
    }

    #[test]
    fn resource_exhausted() {
        assert_eq!(
            code(VmError::ResourceExhausted("x".into())).0,
            ErrorCode::ResourceExhausted
        );
    }

    #[test]
    fn permission_denied_and_unimplemented() {
        assert_eq!(
            code(VmError::PermissionDenied("x".into())).0,
            ErrorCode::PermissionDenied
        );
        assert_eq!(
            code(VmError::Unimplemented("x".into())).0,
            ErrorCode::Unimplemented
        );
    }

    #[test]
    fn internal_hides_the_detail() {
        let (c, m) = code(VmError::Internal("secret path /x".into()));
        assert_eq!(c, ErrorCode::Internal);
        assert!(!m.contains("secret"), "{m}");
    }
}
