//! What can go wrong in one vmcpctl call, and the exit code of each class,
//! so scripts can tell "no such VM" from "server down" without parsing text.

use std::time::Duration;

use connectrpc::{ConnectError, ErrorCode};

/// Every exit code with its meaning, for `--help`, the man page and the README.
pub const EXIT_CODES: &[(u8, &str)] = &[
    (OK, "success"),
    (
        OTHER,
        "any other error (internal, unknown, unimplemented, cancelled)",
    ),
    (
        USAGE,
        "usage: a bad command line, or a file it names cannot be used (nothing was sent)",
    ),
    (NOT_FOUND, "not found: no such VM"),
    (
        INVALID,
        "invalid argument, failed precondition (not in this state, VM failed in --wait), out of range",
    ),
    (
        UNAVAILABLE,
        "unavailable: cannot connect, server or VMM unavailable, deadline exceeded, resource exhausted",
    ),
    (
        DENIED,
        "unauthenticated or permission denied (token or client certificate)",
    ),
    (
        CONFLICT,
        "already exists (another config under that id), or aborted",
    ),
    (
        WAIT_TIMEOUT,
        "--wait timed out before the VM reached the state",
    ),
];

/// The exit code table as `--help` prints it.
pub fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:");
    for (code, meaning) in EXIT_CODES {
        text.push_str(&format!("\n  {code}  {meaning}"));
    }
    text
}

/// The exit code table as a man page section (roff).
pub fn exit_codes_roff() -> String {
    let mut roff = String::from(".SH \"EXIT STATUS\"\n");
    for (code, meaning) in EXIT_CODES {
        let meaning = meaning.replace('\\', "\\e").replace('-', "\\-");
        roff.push_str(&format!(".TP\n\\fB{code}\\fR\n{meaning}\n"));
    }
    roff
}

/// Exit code: success.
pub const OK: u8 = 0;
const OTHER: u8 = 1;
/// Exit code: the command line cannot be used (clap's own code for usage errors).
pub const USAGE: u8 = 2;
const NOT_FOUND: u8 = 3;
const INVALID: u8 = 4;
const UNAVAILABLE: u8 = 5;
const DENIED: u8 = 6;
const CONFLICT: u8 = 7;
const WAIT_TIMEOUT: u8 = 8;

/// One failed vmcpctl call.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line, or a file it names, cannot be used; nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// The server (or the transport to it) answered with an error.
    #[error("{}", describe(.0))]
    Rpc(#[source] ConnectError),
    /// `--wait` ran out of time.
    #[error("timed out after {after:?} waiting for vm {vm_id:?} to be {target}; last seen: {last}")]
    WaitTimeout {
        vm_id: String,
        target: String,
        last: String,
        after: Duration,
    },
    /// The VM failed while `--wait` waited for another state.
    #[error("vm {vm_id:?} is FAILED and will not become {target}: {reason}")]
    WaitFailed {
        vm_id: String,
        target: String,
        reason: String,
    },
    /// `watch` asked for changes the server no longer keeps (out_of_range).
    #[error(
        "{}; list again: `vmcpctl list -o json` prints a revision to watch --since, \
         or use watch --initial",
        describe(.0)
    )]
    ListAgain(#[source] ConnectError),
    /// Writing the output failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
    /// The async runtime could not be started.
    #[error("cannot start: {0}")]
    Runtime(#[source] std::io::Error),
}

impl From<ConnectError> for CtlError {
    fn from(e: ConnectError) -> Self {
        CtlError::Rpc(e)
    }
}

impl CtlError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_) => USAGE,
            CtlError::Rpc(e) => rpc_exit_code(e.code),
            CtlError::WaitTimeout { .. } => WAIT_TIMEOUT,
            CtlError::WaitFailed { .. } | CtlError::ListAgain(_) => INVALID,
            // A reader that went away (`vmcpctl list | head`) is not a failure.
            CtlError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => OK,
            CtlError::Output(_) | CtlError::Runtime(_) => OTHER,
        }
    }
}

/// The exit code of each Connect error code.
fn rpc_exit_code(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::NotFound => NOT_FOUND,
        ErrorCode::InvalidArgument | ErrorCode::FailedPrecondition | ErrorCode::OutOfRange => {
            INVALID
        }
        ErrorCode::Unavailable | ErrorCode::DeadlineExceeded | ErrorCode::ResourceExhausted => {
            UNAVAILABLE
        }
        ErrorCode::Unauthenticated | ErrorCode::PermissionDenied => DENIED,
        ErrorCode::AlreadyExists | ErrorCode::Aborted => CONFLICT,
        // Canceled, Unknown, Unimplemented, Internal, DataLoss, and codes newer than this
        // list (ErrorCode is non-exhaustive).
        _ => OTHER,
    }
}

/// `code: message`, followed by the causes of a transport failure
/// (connection refused, TLS, ...), which the message alone does not name.
fn describe(e: &ConnectError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connect_code_has_its_documented_exit_code() {
        let cases = [
            (ErrorCode::NotFound, 3),
            (ErrorCode::InvalidArgument, 4),
            (ErrorCode::FailedPrecondition, 4),
            (ErrorCode::OutOfRange, 4),
            (ErrorCode::Unavailable, 5),
            (ErrorCode::DeadlineExceeded, 5),
            (ErrorCode::ResourceExhausted, 5),
            (ErrorCode::Unauthenticated, 6),
            (ErrorCode::PermissionDenied, 6),
            (ErrorCode::AlreadyExists, 7),
            (ErrorCode::Aborted, 7),
            (ErrorCode::Internal, 1),
            (ErrorCode::Unknown, 1),
            (ErrorCode::Unimplemented, 1),
            (ErrorCode::Canceled, 1),
            (ErrorCode::DataLoss, 1),
        ];
        for (code, exit) in cases {
            assert_eq!(rpc_exit_code(code), exit, "{code:?}");
            assert!(
                EXIT_CODES.iter().any(|(c, _)| *c == exit),
                "exit code {exit} is documented"
            );
        }
    }

    #[test]
    fn the_table_reads_as_help_and_as_roff() {
        let help = exit_codes_help();
        assert!(help.starts_with("Exit codes:\n  0  success\n"), "{help}");
        assert!(help.contains("\n  8  --wait timed out"), "{help}");
        let roff = exit_codes_roff();
        assert!(
            roff.starts_with(".SH \"EXIT STATUS\"\n.TP\n\\fB0\\fR\nsuccess\n"),
            "{roff}"
        );
        assert!(roff.contains("\\fB8\\fR\n\\-\\-wait timed out"), "{roff}");
    }

    #[test]
    fn wait_and_output_errors() {
        let timeout = CtlError::WaitTimeout {
            vm_id: "a".into(),
            target: "RUNNING".into(),
            last: "CREATED".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!(timeout.exit_code(), 8);
        let failed = CtlError::WaitFailed {
            vm_id: "a".into(),
            target: "RUNNING".into(),
            reason: "killed by SIGKILL".into(),
        };
        assert_eq!(failed.exit_code(), 4);
        assert!(failed.to_string().contains("SIGKILL"));
        let pipe = CtlError::Output(std::io::ErrorKind::BrokenPipe.into());
        assert_eq!(pipe.exit_code(), 0);
        assert_eq!(CtlError::Usage("x".into()).exit_code(), 2);
    }
}
