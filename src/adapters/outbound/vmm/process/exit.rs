//! How a VMM process ended and whether anyone should hear of it. The exit is
//! described in words ([`ExitInfo`]); the process's [`Phase`] (shared with
//! its reaper) says which exits are news; an unexpected exit is classified
//! by the backend ([`ExitClassifier`]) and reported through the VM's
//! [`VmmEventSink`] as [`VmmEvent::Exited`], naming the pid that ended.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::watch;

use crate::domain::{VmId, VmState};
use crate::ports::{VmmEvent, VmmEventSink};

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit status, when this VMCP is the process's parent.
    pub status: Option<ExitStatus>,
    /// The end of the VMM's log at exit.
    pub log_tail: String,
}

impl ExitInfo {
    /// Whether the process exited with status 0.
    pub fn is_clean(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exited with status N" / "killed by signal N (SIGX)" / "exited (status unknown)".
    pub fn describe_status(&self) -> String {
        describe_status(self.status)
    }

    /// The status description followed by the log tail, for reasons and errors.
    pub fn reason(&self) -> String {
        format!(
            "VMM {}; last log lines:\n{}",
            self.describe_status(),
            self.log_tail
        )
    }
}

/// Describes an exit status in words.
pub fn describe_status(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "exited (status unknown: not a child of this VMCP)".to_owned();
    };
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by signal {sig} ({}{core})", signal_name(sig))
        }
        None => format!("ended ({status})"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => "signal",
    }
}

/// Decides the state to report when a VMM exits without being asked to
/// (Failed for a crash; a backend may map a clean exit to Shutdown).
pub type ExitClassifier = Arc<dyn Fn(&ExitInfo) -> VmState + Send + Sync>;

/// Where and how unexpected exits of one VM's VMM are reported.
#[derive(Clone)]
pub struct ExitReporter {
    /// The VM (for logs; the event itself names the pid).
    pub vm_id: VmId,
    /// The VM owner's sink.
    pub events: VmmEventSink,
    /// Maps an unexpected exit to the state to report.
    pub classify: ExitClassifier,
}

impl fmt::Debug for ExitReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitReporter")
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

/// Where a supervised process is in its life, as far as exit reporting is
/// concerned: the reaper reports any exit in `Armed`, an unclean one in
/// `ExpectClean`, none in `Starting` or `Expected`. Stored in an [`AtomicU8`]
/// shared with the reaper task, so transitions are compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    /// Spawned, not yet answering its readiness probe.
    Starting = 0,
    /// Running; any exit is news.
    Armed = 1,
    /// Being stopped; no exit is news.
    Expected = 2,
    /// Asked to power off; only a crash is news.
    ExpectClean = 3,
    /// The reaper has seen the exit.
    Exited = 4,
}

impl Phase {
    /// The phase stored as `v`. Only this module stores phases, always
    /// through `as u8`, so every other value is unreachable; it reads as
    /// `Exited`, the state from which nothing is reported or signalled.
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Armed,
            2 => Phase::Expected,
            3 => Phase::ExpectClean,
            _ => Phase::Exited,
        }
    }
}

/// A [`Phase`] shared between a [`Supervised`](super::Supervised) and its reaper.
#[derive(Debug)]
pub(super) struct PhaseCell(AtomicU8);

impl PhaseCell {
    pub(super) fn new(phase: Phase) -> Self {
        Self(AtomicU8::new(phase as u8))
    }

    pub(super) fn load(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Acquire))
    }

    pub(super) fn swap(&self, to: Phase) -> Phase {
        Phase::from_u8(self.0.swap(to as u8, Ordering::AcqRel))
    }

    /// Moves from `from` to `to`; on failure returns the phase found.
    pub(super) fn transition(&self, from: Phase, to: Phase) -> Result<(), Phase> {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(Phase::from_u8)
    }
}

/// Which exits of a running VMM the backend is waiting for; those are not
/// reported as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitExpectation {
    /// Any exit is news (the normal case).
    Unexpected,
    /// A clean exit (status 0) is expected, e.g. after asking the guest to
    /// power off; a crash is still reported.
    CleanOnly,
    /// Any exit is expected (the VMM is being stopped or killed).
    Any,
}

pub(super) fn publish_exit(
    tx: &watch::Sender<Option<ExitInfo>>,
    phase: &PhaseCell,
    pid: u32,
    reporter: &ExitReporter,
    info: ExitInfo,
) {
    let before = phase.swap(Phase::Exited);
    // Once the `Supervised` is dropped (its owner let go of the VM, e.g. a
    // VMCP shutting down or handing the VMM to another owner), nobody holds
    // this process any more: its exit is not that owner's news.
    let held = !tx.is_closed();
    tx.send_replace(Some(info.clone()));
    let news = held
        && match before {
            Phase::Armed => true,
            Phase::ExpectClean => !info.is_clean(),
            Phase::Starting | Phase::Expected | Phase::Exited => false,
        };
    if news {
        let state = (reporter.classify)(&info);
        tracing::warn!(vm_id = %reporter.vm_id, pid, %state, reason = %info.describe_status(), "VMM exited");
        // A closed sink means the VM's owner is gone; nobody is left to tell.
        let _ = reporter.events.send(VmmEvent::Exited {
            pid,
            state,
            reason: info.reason(),
        });
    }
}
