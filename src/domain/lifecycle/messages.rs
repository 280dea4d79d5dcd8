//! What goes into the lifecycle core and what comes out of it, as values:
//! commands a caller asks for ([`Command`]), the VMM's reports fed back
//! ([`Observation`]), and the outputs the caller drains ([`Admission`],
//! [`Effect`], [`VmEvent`]).

use std::time::Duration;

use super::state::VmState;
use crate::domain::config::VmSize;
use crate::domain::error::VmError;
use crate::domain::id::VmId;
use crate::domain::restart::Cause;

/// How long a graceful shutdown may take before the VM is stopped hard, when
/// the caller gives no timeout (also the graceful part of a non-forced delete).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// What a caller asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start a VMM and configure the VM in it without booting (only as the
    /// first command of a VM, queued by [`Vm::creating`](super::Vm::creating)).
    Create,
    /// Start a Created or Shutdown VM.
    Boot,
    /// Stop a Running or Paused VM; graceful first unless `force`.
    Shutdown {
        /// Skip the graceful attempt.
        force: bool,
        /// How long the graceful attempt may take, in seconds (0: backend default).
        timeout_secs: u32,
    },
    /// Pause a Running VM.
    Pause,
    /// Resume a Paused VM.
    Resume,
    /// Restart a Running VM.
    Reboot {
        /// Hard reset rather than a guest-visible reboot, where the backend distinguishes.
        force: bool,
    },
    /// Stop the VM if needed and remove it.
    Delete {
        /// Kill the VMM at once instead of asking it to stop.
        force: bool,
    },
    /// Change a Running VM's vCPUs and memory (hot-plug) to this size,
    /// already checked against the VM's ceilings ([`VmConfig::resized`](crate::domain::VmConfig::resized)).
    Resize(VmSize),
    /// Write a Running or Paused VM's state and memory to disk (pausing it
    /// for that), resuming it afterwards when `resume`.
    Snapshot {
        /// Run the VM afterwards (else it stays Paused).
        resume: bool,
    },
}

/// The operation a command or effect stands for, for errors, metrics and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Create.
    Create,
    /// Boot.
    Boot,
    /// Shutdown.
    Shutdown,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Reboot.
    Reboot,
    /// Delete.
    Delete,
    /// Resize.
    Resize,
    /// Snapshot.
    Snapshot,
}

impl Operation {
    /// Lower-case verb.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Boot => "boot",
            Operation::Shutdown => "shutdown",
            Operation::Pause => "pause",
            Operation::Resume => "resume",
            Operation::Reboot => "reboot",
            Operation::Delete => "delete",
            Operation::Resize => "resize",
            Operation::Snapshot => "snapshot",
        }
    }
}

impl Command {
    /// The operation this command asks for.
    pub fn operation(self) -> Operation {
        match self {
            Command::Create => Operation::Create,
            Command::Boot => Operation::Boot,
            Command::Shutdown { .. } => Operation::Shutdown,
            Command::Pause => Operation::Pause,
            Command::Resume => Operation::Resume,
            Command::Reboot { .. } => Operation::Reboot,
            Command::Delete { .. } => Operation::Delete,
            Command::Resize(_) => Operation::Resize,
            Command::Snapshot { .. } => Operation::Snapshot,
        }
    }
}

impl Command {
    /// The graceful part of a shutdown or delete, with the default applied
    /// (None for commands that stop nothing, or a forced stop).
    pub fn graceful_timeout(self) -> Option<Duration> {
        match self {
            Command::Shutdown {
                force: false,
                timeout_secs,
            } => Some(if timeout_secs == 0 {
                DEFAULT_SHUTDOWN_GRACE
            } else {
                Duration::from_secs(u64::from(timeout_secs))
            }),
            Command::Delete { force: false } => Some(DEFAULT_SHUTDOWN_GRACE),
            Command::Shutdown { force: true, .. }
            | Command::Delete { force: true }
            | Command::Create
            | Command::Boot
            | Command::Pause
            | Command::Resume
            | Command::Reboot { .. }
            | Command::Resize(_)
            | Command::Snapshot { .. } => None,
        }
    }
}

/// Work for the caller to perform against the hypervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Perform the admitted command, then report with [`Observation::Completed`].
    Perform(Command),
    /// Read the VMM's state and metrics, then report with [`Observation::Reported`]
    /// (or nothing, if the VMM could not be read).
    Sample,
}

/// What the outside world reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// An admitted command finished. `reported` is the state the VMM reported
    /// afterwards (None when it could not be read); `error` is set if the
    /// operation itself failed.
    Completed {
        /// The operation that finished.
        op: Operation,
        /// The VMM's state read after the operation.
        reported: Option<(VmState, String)>,
        /// Why the operation failed, if it did.
        error: Option<VmError>,
    },
    /// The VMM reported this state outside of any operation (periodic check, info read).
    Reported {
        /// The state.
        state: VmState,
        /// Why (may be empty).
        reason: String,
    },
    /// The VMM reports the VM at this size (after a resize, or in a
    /// sample: a resize that a crash interrupted, or one made on the VMM's
    /// own socket). The config follows what the VMM reports.
    Sized(VmSize),
    /// The VM's VMM process ended without VMCP asking it to.
    Exited {
        /// The state this leaves the VM in: Shutdown for a guest-initiated
        /// poweroff, Failed for a crash.
        state: VmState,
        /// Exit status, signal, last log lines.
        reason: String,
    },
}

/// Whether a command was taken up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The command was admitted; one effect is queued.
    Accepted,
    /// The VM already is where the command would take it; nothing to do.
    Ignored,
    /// The command is not allowed now; state is unchanged.
    Denied(VmError),
}

/// Something that happened, for telemetry and persistence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The observed state changed.
    StateChanged {
        /// The VM.
        vm_id: VmId,
        /// Previous state.
        from: VmState,
        /// New state.
        to: VmState,
        /// Why.
        reason: String,
        /// Generation after the change.
        generation: u64,
    },
    /// An admitted operation finished.
    OperationFinished {
        /// The VM.
        vm_id: VmId,
        /// Which operation.
        op: Operation,
        /// Whether it succeeded.
        ok: bool,
    },
    /// The restart policy booted the VM again.
    Restarted {
        /// The VM.
        vm_id: VmId,
        /// 1 for the first restart in the crash-loop window.
        attempt: u32,
        /// Why it had gone.
        cause: Cause,
    },
    /// The restart policy gave up: too many restarts in the window.
    RestartLimitReached {
        /// The VM.
        vm_id: VmId,
    },
}
