//! Supervision of one VMM process per VM, shared by the VMM backends.
//!
//! Each VM gets a runtime directory (0700) holding its API socket, pid file,
//! VMM log and serial output. The VMM is spawned in its own process group,
//! with stdin from /dev/null and stdout/stderr in its log (truncated at each
//! spawn, so a log tail is about this run) rather than a pipe, so that VMCP's
//! own SIGTERM, crash or restart never takes VMs down with it.
//! Readiness is observed by polling a caller-supplied probe (the VMM's ping)
//! until a deadline; a VMM that dies or never answers is killed, its
//! directory removed, and the error carries the tail of its log.
//!
//! A reaper task waits on the child (or, for a VMM adopted after a VMCP
//! restart, by watching /proc) and publishes its exit at once. An exit nobody
//! asked for is reported through the VM's
//! [`VmmEventSink`](crate::ports::VmmEventSink) as
//! [`VmmEvent::Exited`](crate::ports::VmmEvent::Exited) naming the pid that ended, with a state chosen by the
//! backend's classifier (a crash is Failed; a clean exit may be a guest
//! poweroff). Exits the caller expects (delete, a graceful stop, the old
//! process of a respawn) are not reported, nor are exits of a process whose
//! [`Supervised`] was dropped (nobody holds it any more). Process identity
//! is pid plus start time (field 22 of /proc/PID/stat), so a recycled pid
//! is never mistaken for, or killed as, a VMM.
//!
//! The parts: `runtime_dir` (the directory and its files), `exit` (how a
//! process ended and whether that is news), `procfs` (identity and stats
//! from /proc), `supervised` (spawning, adopting, readiness, signals) and
//! `error` (failures, classified for the VM's owner).

mod error;
mod exit;
mod procfs;
mod runtime_dir;
mod supervised;
#[cfg(test)]
mod tests;

pub use error::{MAX_SOCKET_PATH_LEN, ProcessError};
pub use exit::{ExitClassifier, ExitExpectation, ExitInfo, ExitReporter, describe_status};
pub use procfs::{ProcStats, is_alive, proc_stats, read_start_time};
pub use runtime_dir::{LOG_TAIL_LINES, RuntimeDir, create_private_dir, log_tail, remove_socket};
pub use supervised::{SpawnSpec, Supervised};
