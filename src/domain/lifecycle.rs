//! The VM lifecycle state machine, sans-IO.
//!
//! A [`Vm`] holds what the caller asked for (desired) apart from what the VMM
//! last reported (observed). Callers drive it with three inputs and drain its
//! outputs after each one:
//!
//! - [`Vm::creating`] starts a VM's life with the create command queued;
//! - [`Vm::handle_command`] admits, ignores (idempotent repeat) or denies a
//!   command; an admitted command queues exactly one [`Effect`];
//! - [`Vm::handle_timeout`] fires the timers that are due (the periodic
//!   sample of the VMM, which keeps observed state and metrics true), and
//!   [`Vm::poll_timeout`] says when the next one is;
//! - [`Vm::handle_observation`] feeds back what the VMM reported (an
//!   operation's outcome with the state read back afterwards, a periodic
//!   report, or the VMM process exiting);
//! - [`Vm::poll_effect`] / [`Vm::poll_event`] drain effects to perform and
//!   events to publish.
//!
//! Observed state only changes through observations, never because a call
//! returned Ok. Every visible change bumps the generation. Time is an
//! argument: wall-clock seconds for the timestamps callers see, a monotonic
//! [`Instant`] for timers. Policy numbers (the default shutdown grace, the
//! sample period) live here and nowhere else.
//!
//! ```text
//!                  create
//!                    |
//!                    v
//!   +--------> [ Created ] --boot--> [ Running ] <--resume-- [ Paused ]
//!   |                                 |  |  ^  \--pause-------->  |
//!   |                                 |  |  |                     |
//!   |                         reboot--+  |  +--boot--+            |
//!   |                      (stays Running)           |            |
//!   |                                shutdown        |       shutdown
//!   |                                    v           |            |
//!   |                              [ Shutdown ] -----+ <----------+
//!   |
//!   |   any state --VMM died / operation broke the VM--> [ Failed(reason) ]
//!   |   any state --delete--> (removed)
//!   +-- Cloud Hypervisor reports Created after a hard vm.shutdown: that
//!       report is recorded as is (it is bootable again, like Shutdown).
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use super::config::{VmConfig, VmSize};
use super::error::VmError;
use super::id::VmId;
use super::restart::{self, Cause, History, RestartPolicy, RestartSettings};

/// A VM's lifecycle state as the VMM reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Configured, not booted (or stopped and bootable again, on Cloud Hypervisor).
    Created,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused.
    Paused,
    /// The guest has stopped; it can be booted again.
    Shutdown,
    /// The VMM died or an operation left the VM unusable; only delete is allowed.
    Failed,
}

impl VmState {
    /// All states, for exhaustive iteration in metrics and tests.
    pub const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Failed,
    ];

    /// The position of this state in [`VmState::ALL`].
    pub fn index(self) -> usize {
        match self {
            VmState::Created => 0,
            VmState::Running => 1,
            VmState::Paused => 2,
            VmState::Shutdown => 3,
            VmState::Failed => 4,
        }
    }

    /// The lower-case name used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
            VmState::Failed => "failed",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
            VmState::Failed => "Failed",
        })
    }
}

/// How long a graceful shutdown may take before the VM is stopped hard, when
/// the caller gives no timeout (also the graceful part of a non-forced delete).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How often an owner samples its VMM (state and metrics) when nothing else
/// told it about a change: the bound on how stale a read can be for changes
/// no event reports (Firecracker has no events), and the age bound of metrics.
pub const DEFAULT_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// What a caller asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Start a VMM and configure the VM in it without booting (only as the
    /// first command of a VM, queued by [`Vm::creating`]).
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
    /// already checked against the VM's ceilings ([`VmConfig::resized`]).
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

/// What the caller wants the VM to be; kept apart from what the VMM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Configured, not started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Stopped.
    Stopped,
    /// Removed.
    Deleted,
}

/// A read-only copy of a VM's state, handed to readers.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSnapshot {
    /// Id.
    pub id: VmId,
    /// Validated config as the caller gave it.
    pub config: VmConfig,
    /// Observed state.
    pub state: VmState,
    /// Why the VM is in this state (may be empty).
    pub reason: String,
    /// Bumped on every visible change.
    pub generation: u64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last visible change, Unix seconds.
    pub modified_at: i64,
    /// What the caller last asked for.
    pub desired: Desired,
    /// Whether a delete has completed (the VM is gone).
    pub deleted: bool,
    /// The host-wide revision of the last recorded change of this VM (0
    /// before its first). The application assigns it when it records a
    /// change; the core carries it and never changes it.
    pub revision: u64,
}

/// The timers of one VM, as data: when the next sample is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timers {
    sample_period: Duration,
    next_sample: Option<Instant>,
}

/// The restart policy's state for one VM.
#[derive(Debug, Clone, Default)]
struct Restarts {
    settings: RestartSettings,
    history: History,
    /// When the next restart boots the VM.
    due: Option<Instant>,
    /// Why the VM went down, for the restart's event.
    cause: Option<Cause>,
    /// A boot started by the policy is in flight or just failed.
    restarting: bool,
}

/// One VM's lifecycle core.
#[derive(Debug)]
pub struct Vm {
    snap: VmSnapshot,
    pending: Option<Command>,
    effects: VecDeque<Effect>,
    events: VecDeque<VmEvent>,
    timers: Timers,
    restarts: Restarts,
}

impl Vm {
    /// A VM whose VMM has just reported `state` after creation.
    pub fn new(id: VmId, config: VmConfig, state: VmState, now: i64) -> Self {
        Self::restore(VmSnapshot {
            id,
            config,
            state,
            reason: String::new(),
            generation: 1,
            created_at: now,
            modified_at: now,
            desired: Desired::Created,
            deleted: false,
            revision: 0,
        })
    }

    /// A VM about to be created: generation 0, state Created until the VMM
    /// reports, with [`Command::Create`] admitted and its effect queued. A
    /// failed create marks the VM deleted (create leaves nothing behind).
    pub fn creating(id: VmId, config: VmConfig, now: i64) -> Self {
        let mut vm = Self::new(id, config, VmState::Created, now);
        vm.snap.generation = 0;
        vm.pending = Some(Command::Create);
        vm.effects.push_back(Effect::Perform(Command::Create));
        vm
    }

    /// A VM rebuilt from a stored snapshot (recovery).
    pub fn restore(snap: VmSnapshot) -> Self {
        Self {
            snap,
            pending: None,
            effects: VecDeque::new(),
            events: VecDeque::new(),
            timers: Timers {
                sample_period: DEFAULT_SAMPLE_PERIOD,
                next_sample: None,
            },
            restarts: Restarts::default(),
        }
    }

    /// Sets the host's restart settings (default policy, backoff, crash-loop limit).
    pub fn with_restarts(mut self, settings: RestartSettings) -> Self {
        self.restarts.settings = settings;
        self
    }

    /// The restart policy in force for this VM.
    pub fn restart_policy(&self) -> RestartPolicy {
        self.snap
            .config
            .restart_policy
            .or(self.restarts.settings.default_policy)
    }

    /// Whether a boot started by the restart policy is in flight (or just failed).
    pub fn restarting(&self) -> bool {
        self.restarts.restarting
    }

    /// The VMM went away for `cause` (`reason` says how): the restart policy
    /// decides, at `now`, whether the VM is booted again and when. A restart
    /// shows in the reason ("restarting (attempt N) in D s: …"); giving up
    /// leaves the VM Failed with "restart limit reached: …".
    pub fn consider_restart(&mut self, cause: Cause, reason: String, now: Instant, wall: i64) {
        if self.snap.deleted {
            return;
        }
        let r = &mut self.restarts;
        let decision = restart::decide(
            self.snap.config.restart_policy,
            self.snap.desired,
            cause,
            &mut r.history,
            now,
            &r.settings,
        );
        match decision {
            restart::Decision::Stay => {
                r.restarting = false;
                r.due = None;
            }
            restart::Decision::Restart { attempt, after } => {
                r.due = Some(now + after);
                r.cause = Some(cause);
                let text = format!(
                    "restarting (attempt {attempt}) in {:.1} s: {}",
                    after.as_secs_f64(),
                    restart::underlying(&reason)
                );
                self.set_state(self.snap.state, text, wall);
            }
            restart::Decision::GiveUp => {
                let (limit, window) = (r.settings.limit, r.settings.window.as_secs());
                r.restarting = false;
                r.due = None;
                // No longer wanted running by the policy: a restart of VMCP does not
                // start the loop again; a BootVm does.
                self.snap.desired = Desired::Stopped;
                let reason = restart::underlying(&reason).to_owned();
                self.set_state(
                    VmState::Failed,
                    format!("restart limit reached ({limit} restarts in {window} s): {reason}"),
                    wall,
                );
                self.events.push_back(VmEvent::RestartLimitReached {
                    vm_id: self.snap.id.clone(),
                });
            }
        }
    }

    /// Sets how often the VMM is sampled (default [`DEFAULT_SAMPLE_PERIOD`]).
    pub fn with_sample_period(mut self, period: Duration) -> Self {
        self.timers.sample_period = period;
        self
    }

    /// Starts the timers: the first sample is due one period after `now`.
    pub fn start_timers(&mut self, now: Instant) {
        self.timers.next_sample = Some(now + self.timers.sample_period);
    }

    /// When [`Vm::handle_timeout`] should next be called (None: no timer runs).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.snap.deleted {
            return None;
        }
        match (self.timers.next_sample, self.restarts.due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Makes the next sample due at `now` (after an operation, so metrics and
    /// backend details follow the VMM without waiting a whole period).
    pub fn sample_soon(&mut self, now: Instant) {
        if self.timers.next_sample.is_some_and(|due| due > now) {
            self.timers.next_sample = Some(now);
        }
    }

    /// Fires the timers due at `now`: queues a [`Effect::Sample`] unless an
    /// operation is in flight (its completion reports the state anyway), and
    /// re-arms the sample timer one period later.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.snap.deleted {
            return;
        }
        if let Some(due) = self.restarts.due
            && now >= due
            && self.pending.is_none()
        {
            self.restarts.due = None;
            if self.snap.desired == Desired::Running {
                // The policy's boot: recorded in the crash-loop history when it starts.
                let attempt = self
                    .restarts
                    .history
                    .recent(now, self.restarts.settings.window)
                    + 1;
                self.restarts.history.record(now);
                self.restarts.restarting = true;
                self.pending = Some(Command::Boot);
                self.effects.push_back(Effect::Perform(Command::Boot));
                self.events.push_back(VmEvent::Restarted {
                    vm_id: self.snap.id.clone(),
                    attempt,
                    cause: self.restarts.cause.unwrap_or(Cause::Crash),
                });
            }
        }
        let Some(due) = self.timers.next_sample else {
            return;
        };
        if now < due {
            return;
        }
        if self.pending.is_none() && !self.effects.contains(&Effect::Sample) {
            self.effects.push_back(Effect::Sample);
        }
        self.timers.next_sample = Some(now + self.timers.sample_period);
    }

    /// Stamps the host-wide revision under which the current snapshot is recorded.
    pub fn set_revision(&mut self, revision: u64) {
        self.snap.revision = revision;
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> &VmSnapshot {
        &self.snap
    }

    /// The command being performed, if any.
    pub fn pending(&self) -> Option<Command> {
        self.pending
    }

    /// Admission control: accept, ignore or deny `cmd` given the observed state.
    pub fn handle_command(&mut self, cmd: Command, now: i64) -> Admission {
        let _ = now;
        let state = self.snap.state;
        if self.snap.deleted {
            return Admission::Denied(VmError::NotFound(self.snap.id.to_string()));
        }
        if let Some(p) = self.pending {
            return Admission::Denied(
                self.denied(cmd, format!("{} is in progress", p.operation().as_str())),
            );
        }
        use VmState as S;
        let verdict = match (cmd, state) {
            // Stopping a VM the policy is about to restart cancels the restart.
            (Command::Shutdown { .. }, S::Shutdown | S::Failed) if self.restarts.due.is_some() => {
                Verdict::Accept
            }
            // Create is queued by `Vm::creating` only; a VM that exists is created already.
            (Command::Create, S::Created | S::Running | S::Paused | S::Shutdown | S::Failed) => {
                Verdict::Ignore
            }
            (
                Command::Delete { .. },
                S::Created | S::Running | S::Paused | S::Shutdown | S::Failed,
            ) => Verdict::Accept,
            // A Failed VM boots again from its stored config with a fresh VMM.
            (Command::Boot, S::Created | S::Shutdown | S::Failed) => Verdict::Accept,
            (Command::Boot, S::Running) => Verdict::Ignore,
            (Command::Boot, S::Paused) => Verdict::Deny,
            (Command::Shutdown { .. }, S::Running | S::Paused) => Verdict::Accept,
            (Command::Shutdown { .. }, S::Shutdown) => Verdict::Ignore,
            (Command::Shutdown { .. }, S::Created | S::Failed) => Verdict::Deny,
            (Command::Pause, S::Running) => Verdict::Accept,
            (Command::Pause, S::Paused) => Verdict::Ignore,
            (Command::Pause, S::Created | S::Shutdown | S::Failed) => Verdict::Deny,
            (Command::Resume, S::Paused) => Verdict::Accept,
            (Command::Resume, S::Running) => Verdict::Ignore,
            (Command::Resume, S::Created | S::Shutdown | S::Failed) => Verdict::Deny,
            (Command::Reboot { .. }, S::Running) => Verdict::Accept,
            (Command::Reboot { .. }, S::Created | S::Paused | S::Shutdown | S::Failed) => {
                Verdict::Deny
            }
            (Command::Resize(to), S::Running) if to == self.snap.config.size() => Verdict::Ignore,
            (Command::Resize(_), S::Running) => Verdict::Accept,
            (Command::Resize(_), S::Created | S::Paused | S::Shutdown | S::Failed) => Verdict::Deny,
            (Command::Snapshot { .. }, S::Running | S::Paused) => Verdict::Accept,
            (Command::Snapshot { .. }, S::Created | S::Shutdown | S::Failed) => Verdict::Deny,
        };
        match verdict {
            Verdict::Accept => {
                // The caller takes over: a scheduled restart is dropped.
                self.restarts.due = None;
                self.restarts.restarting = false;
                self.pending = Some(cmd);
                self.snap.desired = match cmd {
                    Command::Create => Desired::Created,
                    Command::Boot | Command::Resume | Command::Reboot { .. } => Desired::Running,
                    // Only a Running VM is resized, and it stays wanted as it was.
                    Command::Resize(_) => self.snap.desired,
                    Command::Snapshot { resume: true } => Desired::Running,
                    Command::Snapshot { resume: false } => Desired::Paused,
                    Command::Pause => Desired::Paused,
                    Command::Shutdown { .. } => Desired::Stopped,
                    Command::Delete { .. } => Desired::Deleted,
                };
                self.effects.push_back(Effect::Perform(cmd));
                Admission::Accepted
            }
            Verdict::Ignore => Admission::Ignored,
            Verdict::Deny => Admission::Denied(self.denied(cmd, self.snap.reason.clone())),
        }
    }

    fn denied(&self, cmd: Command, reason: String) -> VmError {
        VmError::FailedPrecondition {
            vm_id: self.snap.id.to_string(),
            operation: cmd.operation().as_str(),
            state: self.snap.state,
            reason,
        }
    }

    /// Feeds back what the VMM reported.
    pub fn handle_observation(&mut self, obs: Observation, now: i64) {
        match obs {
            Observation::Completed {
                op,
                reported,
                error,
            } => {
                let matches_pending = self.pending.map(Command::operation) == Some(op);
                if !matches_pending {
                    // A completion for something not in flight is a caller bug; ignoring it
                    // keeps the state truthful rather than guessing.
                    return;
                }
                self.pending = None;
                let ok = error.is_none();
                if op == Operation::Create {
                    if ok {
                        // Generation 1 is the first state a VMM reported.
                        self.touch(now);
                    } else {
                        self.snap.deleted = true;
                    }
                }
                if op == Operation::Delete && ok {
                    self.snap.deleted = true;
                    self.touch(now);
                } else if let Some((state, reason)) = reported
                    && !self.snap.deleted
                {
                    self.set_state(state, reason, now);
                }
                self.events.push_back(VmEvent::OperationFinished {
                    vm_id: self.snap.id.clone(),
                    op,
                    ok,
                });
            }
            Observation::Reported { state, reason } => {
                if self.snap.deleted {
                    return;
                }
                self.set_state(state, reason, now);
            }
            Observation::Sized(size) => {
                if self.snap.deleted || self.snap.config.size() == size {
                    return;
                }
                self.snap.config.set_size(size);
                self.touch(now);
            }
            Observation::Exited { state, reason } => {
                if self.snap.deleted {
                    return;
                }
                self.set_state(state, reason, now);
            }
        }
    }

    fn set_state(&mut self, state: VmState, reason: String, now: i64) {
        if self.snap.state == state && self.snap.reason == reason {
            return;
        }
        let from = self.snap.state;
        self.snap.state = state;
        self.snap.reason = reason;
        self.touch(now);
        if from != state {
            self.events.push_back(VmEvent::StateChanged {
                vm_id: self.snap.id.clone(),
                from,
                to: state,
                reason: self.snap.reason.clone(),
                generation: self.snap.generation,
            });
        }
    }

    fn touch(&mut self, now: i64) {
        self.snap.generation += 1;
        self.snap.modified_at = self.snap.modified_at.max(now);
    }

    /// Next effect to perform, if any.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Next event to publish, if any.
    pub fn poll_event(&mut self) -> Option<VmEvent> {
        self.events.pop_front()
    }
}

enum Verdict {
    Accept,
    Ignore,
    Deny,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::config::tests::valid;
    use proptest::prelude::*;

    fn vm() -> Vm {
        Vm::new(
            VmId::parse("vm1").expect("valid id"),
            valid(),
            VmState::Created,
            100,
        )
    }

    fn complete(v: &mut Vm, op: Operation, state: VmState) {
        v.handle_observation(
            Observation::Completed {
                op,
                reported: Some((state, String::new())),
                error: None,
            },
            200,
        );
    }

    #[test]
    fn boot_is_admitted_and_state_changes_only_on_report() {
        let mut v = vm();
        assert_eq!(v.handle_command(Command::Boot, 150), Admission::Accepted);
        assert_eq!(v.poll_effect(), Some(Effect::Perform(Command::Boot)));
        assert_eq!(v.poll_effect(), None);
        assert_eq!(
            v.snapshot().state,
            VmState::Created,
            "no state change before the VMM reports"
        );
        complete(&mut v, Operation::Boot, VmState::Running);
        assert_eq!(v.snapshot().state, VmState::Running);
        assert_eq!(v.snapshot().generation, 2);
        assert_eq!(v.snapshot().modified_at, 200);
        assert!(matches!(
            v.poll_event(),
            Some(VmEvent::StateChanged {
                from: VmState::Created,
                to: VmState::Running,
                ..
            })
        ));
        assert!(matches!(
            v.poll_event(),
            Some(VmEvent::OperationFinished {
                op: Operation::Boot,
                ok: true,
                ..
            })
        ));
    }

    #[test]
    fn repeats_are_ignored_and_illegal_commands_name_the_state() {
        let mut v = vm();
        assert_eq!(v.handle_command(Command::Boot, 1), Admission::Accepted);
        assert_eq!(v.poll_effect(), Some(Effect::Perform(Command::Boot)));
        complete(&mut v, Operation::Boot, VmState::Running);
        assert_eq!(v.handle_command(Command::Boot, 2), Admission::Ignored);
        assert_eq!(v.handle_command(Command::Resume, 2), Admission::Ignored);
        assert_eq!(v.poll_effect(), None);
        let mut v = vm();
        match v.handle_command(Command::Pause, 1) {
            Admission::Denied(e) => assert!(e.to_string().contains("it is Created"), "{e}"),
            other => panic!("expected denial, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_operation_records_what_the_vmm_reports() {
        let mut v = vm();
        v.handle_command(Command::Boot, 1);
        v.handle_observation(
            Observation::Completed {
                op: Operation::Boot,
                reported: Some((VmState::Failed, "VMM exited with status 1".into())),
                error: Some(VmError::Unavailable("boom".into())),
            },
            2,
        );
        assert_eq!(v.snapshot().state, VmState::Failed);
        assert_eq!(v.snapshot().reason, "VMM exited with status 1");
        // No dead end: a Failed VM boots again (with a fresh VMM), keeping its
        // reason until the boot succeeds.
        assert_eq!(v.handle_command(Command::Boot, 3), Admission::Accepted);
        assert_eq!(v.snapshot().reason, "VMM exited with status 1");
        v.handle_observation(
            Observation::Completed {
                op: Operation::Boot,
                reported: Some((VmState::Running, String::new())),
                error: None,
            },
            4,
        );
        assert_eq!(
            (v.snapshot().state, v.snapshot().reason.as_str()),
            (VmState::Running, "")
        );
        assert_eq!(
            v.handle_command(Command::Delete { force: false }, 5),
            Admission::Accepted
        );
    }

    fn running_with(policy: RestartPolicy) -> Vm {
        let mut config = valid();
        config.restart_policy = policy;
        let mut v = Vm::new(VmId::parse("vm1").expect("id"), config, VmState::Running, 1)
            .with_restarts(RestartSettings {
                default_policy: RestartPolicy::Never,
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(4),
                limit: 3,
                window: Duration::from_secs(100),
            });
        v.snap.desired = Desired::Running;
        v
    }

    fn crash(v: &mut Vm, now: Instant) {
        v.handle_observation(
            Observation::Exited {
                state: VmState::Failed,
                reason: "killed by signal 9".into(),
            },
            5,
        );
        v.consider_restart(Cause::Crash, "killed by signal 9".into(), now, 5);
    }

    #[test]
    fn a_crash_under_on_failure_boots_again_after_the_backoff_then_gives_up_at_the_limit() {
        let mut v = running_with(RestartPolicy::OnFailure);
        let t0 = Instant::now();
        let mut now = t0;
        for attempt in 1..=3u32 {
            crash(&mut v, now);
            assert_eq!(v.snapshot().state, VmState::Failed);
            assert!(
                v.snapshot()
                    .reason
                    .starts_with(&format!("restarting (attempt {attempt}) in ")),
                "{}",
                v.snapshot().reason
            );
            let due = v.poll_timeout().expect("a restart is scheduled");
            assert_eq!(due, now + Duration::from_secs(1 << (attempt - 1)));
            // Not before its time.
            v.handle_timeout(due - Duration::from_millis(1));
            assert_ne!(v.poll_effect(), Some(Effect::Perform(Command::Boot)));
            v.handle_timeout(due);
            assert_eq!(v.poll_effect(), Some(Effect::Perform(Command::Boot)));
            assert!(v.restarting());
            v.handle_observation(
                Observation::Completed {
                    op: Operation::Boot,
                    reported: Some((VmState::Running, String::new())),
                    error: None,
                },
                6,
            );
            assert_eq!(v.snapshot().state, VmState::Running);
            now = due + Duration::from_secs(1);
        }
        // The fourth crash in the window: the limit.
        crash(&mut v, now);
        assert_eq!(v.snapshot().state, VmState::Failed);
        assert!(
            v.snapshot()
                .reason
                .starts_with("restart limit reached (3 restarts in 100 s): killed by signal 9"),
            "{}",
            v.snapshot().reason
        );
        assert_eq!(v.poll_timeout(), None);
        let events: Vec<_> = std::iter::from_fn(|| v.poll_event()).collect();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, VmEvent::Restarted { .. }))
                .count(),
            3
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, VmEvent::RestartLimitReached { .. }))
        );
    }

    #[test]
    fn no_policy_restarts_what_the_caller_stopped_and_never_restarts_nothing() {
        // Never: a crash stays Failed.
        let mut v = running_with(RestartPolicy::Never);
        crash(&mut v, Instant::now());
        assert_eq!(v.poll_timeout(), None);
        assert_eq!(v.snapshot().reason, "killed by signal 9");
        // Always, but the caller shut it down while a restart was scheduled: cancelled.
        let mut v = running_with(RestartPolicy::Always);
        let now = Instant::now();
        crash(&mut v, now);
        assert!(v.poll_timeout().is_some());
        assert_eq!(
            v.handle_command(
                Command::Shutdown {
                    force: true,
                    timeout_secs: 0
                },
                6
            ),
            Admission::Accepted
        );
        assert_eq!(v.snapshot().desired, Desired::Stopped);
        v.handle_timeout(now + Duration::from_secs(60));
        assert_eq!(
            v.poll_effect(),
            Some(Effect::Perform(Command::Shutdown {
                force: true,
                timeout_secs: 0
            }))
        );
        assert_eq!(v.poll_effect(), None, "no boot after an explicit shutdown");
        // A paused VM whose VMM died is not resumed into running by a policy.
        let mut v = running_with(RestartPolicy::Always);
        v.snap.desired = Desired::Paused;
        crash(&mut v, Instant::now());
        assert_eq!(v.poll_timeout(), None);
    }

    #[test]
    fn commands_are_denied_while_one_is_in_flight() {
        let mut v = vm();
        assert_eq!(v.handle_command(Command::Boot, 1), Admission::Accepted);
        assert!(matches!(
            v.handle_command(Command::Delete { force: true }, 1),
            Admission::Denied(_)
        ));
    }

    #[test]
    fn delete_completes_only_on_success() {
        let mut v = vm();
        v.handle_command(Command::Delete { force: false }, 1);
        v.handle_observation(
            Observation::Completed {
                op: Operation::Delete,
                reported: Some((VmState::Created, String::new())),
                error: Some(VmError::Unavailable("x".into())),
            },
            2,
        );
        assert!(!v.snapshot().deleted);
        v.handle_command(Command::Delete { force: false }, 3);
        v.handle_observation(
            Observation::Completed {
                op: Operation::Delete,
                reported: None,
                error: None,
            },
            4,
        );
        assert!(v.snapshot().deleted);
        assert!(matches!(
            v.handle_command(Command::Boot, 5),
            Admission::Denied(VmError::NotFound(_))
        ));
    }

    // ---- Property tests against a reference model of legal transitions ----

    fn arb_state() -> impl Strategy<Value = VmState> {
        prop::sample::select(VmState::ALL.to_vec())
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::Create),
            Just(Command::Boot),
            (any::<bool>(), 0u32..120).prop_map(|(force, timeout_secs)| Command::Shutdown {
                force,
                timeout_secs
            }),
            Just(Command::Pause),
            Just(Command::Resume),
            any::<bool>().prop_map(|force| Command::Reboot { force }),
            any::<bool>().prop_map(|force| Command::Delete { force }),
            arb_size().prop_map(Command::Resize),
            any::<bool>().prop_map(|resume| Command::Snapshot { resume }),
        ]
    }

    /// Sizes around the test VM's own (1 vCPU, 128 MiB), so equal sizes come up.
    fn arb_size() -> impl Strategy<Value = VmSize> {
        (1i32..3, prop::sample::select(vec![128i64 << 20, 256 << 20])).prop_map(
            |(vcpu_count, memory_bytes)| VmSize {
                vcpu_count,
                memory_bytes,
            },
        )
    }

    #[derive(Debug, Clone)]
    enum Input {
        Cmd(Command),
        /// Complete the pending op, with the reported state (None: the VMM could
        /// not be read) and success flag.
        Complete(Option<VmState>, bool),
        Report(VmState),
        Exit(bool),
        Sized(VmSize),
    }

    fn arb_input() -> impl Strategy<Value = Input> {
        prop_oneof![
            3 => arb_command().prop_map(Input::Cmd),
            3 => (proptest::option::of(arb_state()), any::<bool>())
                .prop_map(|(s, ok)| Input::Complete(s, ok)),
            1 => arb_state().prop_map(Input::Report),
            1 => any::<bool>().prop_map(Input::Exit),
            1 => arb_size().prop_map(Input::Sized),
        ]
    }

    /// The reference model: from which observed states each operation may start.
    fn model_allows(op: Operation, s: VmState) -> bool {
        use VmState::*;
        match op {
            // Only `Vm::creating` queues a create; an existing VM never admits one.
            Operation::Create => false,
            Operation::Boot => matches!(s, Created | Shutdown | Failed),
            Operation::Shutdown => matches!(s, Running | Paused),
            Operation::Pause => s == Running,
            Operation::Resume => s == Paused,
            Operation::Reboot => s == Running,
            Operation::Delete => true,
            Operation::Resize => s == Running,
            Operation::Snapshot => matches!(s, Running | Paused),
        }
    }

    fn model_is_repeat(cmd: Command, s: VmState, size: VmSize) -> bool {
        use VmState::*;
        let op = cmd.operation();
        if let Command::Resize(to) = cmd {
            return s == Running && to == size;
        }
        matches!(
            (op, s),
            (Operation::Create, _)
                | (Operation::Boot, Running)
                | (Operation::Shutdown, Shutdown)
                | (Operation::Pause, Paused)
                | (Operation::Resume, Running)
        )
    }

    #[test]
    fn create_is_a_command_whose_success_is_generation_one_and_whose_failure_deletes() {
        let id = VmId::parse("vm1").expect("valid id");
        let mut v = Vm::creating(id.clone(), valid(), 10);
        assert_eq!(v.snapshot().generation, 0);
        assert_eq!(v.poll_effect(), Some(Effect::Perform(Command::Create)));
        assert!(matches!(
            v.handle_command(Command::Boot, 11),
            Admission::Denied(ref e) if e.to_string().contains("create is in progress")
        ));
        v.handle_observation(
            Observation::Completed {
                op: Operation::Create,
                reported: Some((VmState::Created, String::new())),
                error: None,
            },
            12,
        );
        assert_eq!(v.snapshot().generation, 1);
        assert_eq!(v.snapshot().state, VmState::Created);
        assert!(!v.snapshot().deleted);
        assert_eq!(v.handle_command(Command::Create, 13), Admission::Ignored);

        let mut failed = Vm::creating(id, valid(), 10);
        failed.poll_effect();
        failed.handle_observation(
            Observation::Completed {
                op: Operation::Create,
                reported: Some((VmState::Failed, "spawn failed".into())),
                error: Some(VmError::Unavailable("spawn failed".into())),
            },
            12,
        );
        assert!(failed.snapshot().deleted, "a failed create leaves no VM");
        assert_eq!(failed.poll_timeout(), None);
    }

    #[test]
    fn the_sample_timer_is_data_and_skips_while_an_operation_is_in_flight() {
        let t0 = Instant::now();
        let period = Duration::from_secs(5);
        let mut v = vm().with_sample_period(period);
        assert_eq!(v.poll_timeout(), None, "no timer before start");
        v.start_timers(t0);
        assert_eq!(v.poll_timeout(), Some(t0 + period));
        v.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(v.poll_effect(), None, "not due yet");
        v.handle_timeout(t0 + period);
        assert_eq!(v.poll_effect(), Some(Effect::Sample));
        assert_eq!(v.poll_timeout(), Some(t0 + period + period));
        v.handle_command(Command::Boot, 1);
        assert_eq!(v.poll_effect(), Some(Effect::Perform(Command::Boot)));
        v.handle_timeout(t0 + period * 2);
        assert_eq!(
            v.poll_effect(),
            None,
            "the boot's completion reports the state"
        );
        assert_eq!(v.poll_timeout(), Some(t0 + period * 3));
    }

    #[test]
    fn the_default_shutdown_grace_is_defined_once_here() {
        let graceful = |timeout_secs| Command::Shutdown {
            force: false,
            timeout_secs,
        };
        assert_eq!(graceful(0).graceful_timeout(), Some(DEFAULT_SHUTDOWN_GRACE));
        assert_eq!(graceful(7).graceful_timeout(), Some(Duration::from_secs(7)));
        let forced = Command::Shutdown {
            force: true,
            timeout_secs: 7,
        };
        assert_eq!(forced.graceful_timeout(), None);
        assert_eq!(
            Command::Delete { force: false }.graceful_timeout(),
            Some(DEFAULT_SHUTDOWN_GRACE)
        );
        assert_eq!(Command::Delete { force: true }.graceful_timeout(), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn random_sequences_respect_the_model(inputs in prop::collection::vec(arb_input(), 1..60)) {
            let mut v = vm();
            let mut now = 100;
            for input in inputs {
                now += 1;
                let before = v.snapshot().clone();
                let pending_before = v.pending();
                match input {
                    Input::Cmd(cmd) => {
                        let adm = v.handle_command(cmd, now);
                        let op = cmd.operation();
                        match adm {
                            Admission::Accepted => {
                                prop_assert!(!before.deleted);
                                prop_assert!(pending_before.is_none());
                                prop_assert!(model_allows(op, before.state), "{op:?} admitted in {:?}", before.state);
                                if let Command::Resize(to) = cmd {
                                    prop_assert_ne!(to, before.config.size(), "a resize to the current size is a repeat");
                                }
                                prop_assert_eq!(v.poll_effect(), Some(Effect::Perform(cmd)));
                                prop_assert_eq!(v.poll_effect(), None);
                                // Admission changes intent, never the observed state.
                                prop_assert_eq!(v.snapshot().state, before.state);
                                prop_assert_eq!(v.snapshot().generation, before.generation);
                            }
                            Admission::Ignored => {
                                prop_assert!(model_is_repeat(cmd, before.state, before.config.size()));
                                prop_assert_eq!(v.snapshot(), &before);
                                prop_assert_eq!(v.poll_effect(), None);
                            }
                            Admission::Denied(e) => {
                                prop_assert!(before.deleted || pending_before.is_some() || !model_allows(op, before.state));
                                prop_assert_eq!(v.snapshot(), &before, "a denied command leaves state unchanged");
                                prop_assert_eq!(v.poll_effect(), None);
                                if !before.deleted {
                                    let is_precondition = matches!(e, VmError::FailedPrecondition { .. });
                                    prop_assert!(is_precondition);
                                }
                            }
                        }
                    }
                    Input::Complete(state, ok) => {
                        if let Some(p) = pending_before {
                            v.handle_observation(Observation::Completed {
                                op: p.operation(),
                                reported: state.map(|s| (s, String::new())),
                                error: if ok { None } else { Some(VmError::Unavailable("x".into())) },
                            }, now);
                            prop_assert!(v.pending().is_none());
                            if p.operation() == Operation::Delete && ok {
                                prop_assert!(v.snapshot().deleted);
                            } else if let Some(state) = state {
                                prop_assert_eq!(v.snapshot().state, state, "observed state is what the VMM reported");
                            } else {
                                // Nothing was read: the state stays what was last observed.
                                prop_assert_eq!(v.snapshot().state, before.state);
                            }
                        }
                    }
                    Input::Report(state) => {
                        v.handle_observation(Observation::Reported { state, reason: String::new() }, now);
                        if !before.deleted {
                            prop_assert_eq!(v.snapshot().state, state);
                        } else {
                            prop_assert_eq!(v.snapshot(), &before);
                        }
                    }
                    Input::Sized(size) => {
                        v.handle_observation(Observation::Sized(size), now);
                        if before.deleted {
                            prop_assert_eq!(v.snapshot(), &before);
                        } else {
                            prop_assert_eq!(v.snapshot().config.size(), size, "the config follows the VMM's size");
                            prop_assert_eq!(v.snapshot().state, before.state, "a size is no state change");
                        }
                    }
                    Input::Exit(crash) => {
                        let state = if crash { VmState::Failed } else { VmState::Shutdown };
                        v.handle_observation(Observation::Exited { state, reason: "exit".into() }, now);
                        if !before.deleted {
                            prop_assert_eq!(v.snapshot().state, state);
                        }
                    }
                }
                let after = v.snapshot();
                prop_assert!(after.generation >= before.generation, "generations only grow");
                if after.state != before.state
                    || after.reason != before.reason
                    || after.deleted != before.deleted
                    || after.config != before.config
                {
                    prop_assert!(after.generation > before.generation, "a visible change bumps the generation");
                }
                prop_assert!(after.modified_at >= before.modified_at);
                while v.poll_event().is_some() {}
            }
        }
    }
}
