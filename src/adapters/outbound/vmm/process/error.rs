//! Why supervising a VMM process failed, and how that failure reads to the
//! VM's owner: classified by what the caller can do about it (a VMM that
//! cannot start, a host short of resources, a VMM that cannot be reached).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::exit::ExitInfo;
use crate::ports::HypervisorError;

/// Longest Unix socket path (sun_path is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Why supervising a VMM process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The runtime directory is too deep for a Unix socket path.
    #[error(
        "socket path {0} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter runtime directory"
    )]
    SocketPathTooLong(PathBuf),
    /// The VMM binary could not be executed.
    #[error("cannot run {program}: {source}")]
    Exec {
        /// The binary.
        program: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The VMM started but died or never became ready.
    #[error("{program} {reason}; last log lines:\n{log_tail}")]
    NotReady {
        /// The binary.
        program: PathBuf,
        /// What happened (exit status, or the deadline and last probe error).
        reason: String,
        /// The end of the VMM's log.
        log_tail: String,
    },
    /// No live process with this pid and start time.
    #[error("process {pid} (start time {start_time}) is gone")]
    Gone {
        /// Process id.
        pid: u32,
        /// Expected start time.
        start_time: u64,
    },
    /// The VMM process ended (while a call to it was in flight, or before
    /// an operation that needs it).
    #[error("VMM pid {pid} {}; last log lines:\n{}", .exit.describe_status(), .exit.log_tail)]
    Ended {
        /// Process id.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
    },
    /// Sending a signal failed.
    #[error("cannot signal process {pid}: {source}")]
    Signal {
        /// Process id.
        pid: u32,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
}

impl From<ProcessError> for HypervisorError {
    /// Classifies by what the caller can do: a VMM that cannot start, a host
    /// short of resources, or a VMM that cannot be reached. The message says
    /// what failed in one line; the [`ProcessError`] stays the source.
    fn from(e: ProcessError) -> Self {
        let exhausted = |io: &io::Error| {
            matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::EDQUOT)
            )
        };
        let spawn = |message: String, e: ProcessError| HypervisorError::SpawnFailed {
            message,
            source: Some(Arc::new(e)),
        };
        match &e {
            ProcessError::Exec { program, .. } => {
                spawn(format!("cannot run {}", program.display()), e)
            }
            ProcessError::NotReady {
                program, reason, ..
            } => spawn(format!("{} {reason}", program.display()), e),
            ProcessError::SocketPathTooLong(_) => spawn(
                "the VMM's API socket path is too long; use a shorter runtime directory".into(),
                e,
            ),
            ProcessError::Io { what, path, source } if exhausted(source) => {
                HypervisorError::ResourceExhausted {
                    message: format!("{what} {}", path.display()),
                    source: Some(Arc::new(e)),
                }
            }
            ProcessError::Io { what, path, .. } => {
                let message = format!("{what} {}", path.display());
                HypervisorError::unavailable_from(message, e)
            }
            ProcessError::Ended { exit, .. } => {
                let message = format!("the VMM {}", exit.describe_status());
                HypervisorError::unavailable_from(message, e)
            }
            ProcessError::Signal { pid, .. } => {
                HypervisorError::unavailable_from(format!("cannot signal VMM pid {pid}"), e)
            }
            ProcessError::Gone { .. } => HypervisorError::Gone(e.to_string()),
        }
    }
}

pub(super) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> ProcessError + use<> {
    let path = path.to_owned();
    move |source| ProcessError::Io { what, path, source }
}
