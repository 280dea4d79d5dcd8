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
//!
//! The vocabulary is in `state` (what the core knows of a VM) and `messages`
//! (what goes in and comes out); this module is the machine.

mod messages;
mod state;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use self::messages::{
    Admission, Command, DEFAULT_SHUTDOWN_GRACE, Effect, Observation, Operation, VmEvent,
};
pub use self::state::{Desired, VmSnapshot, VmState};
use super::config::VmConfig;
use super::error::VmError;
use super::id::VmId;
use super::restart::{self, Cause, History, RestartPolicy, RestartSettings};

/// How often an owner samples its VMM (state and metrics) when nothing else
/// told it about a change: the bound on how stale a read can be for changes
/// no event reports (Firecracker has no events), and the age bound of metrics.
pub const DEFAULT_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// How long after an operation's answer its follow-up sample waits (see
/// [`Vm::sample_after_operation`]).
pub const SAMPLE_SETTLE: Duration = Duration::from_millis(250);

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

    /// Makes the next sample due at `now` (a recovered VM: metrics and
    /// backend details right away, not one period later).
    pub fn sample_soon(&mut self, now: Instant) {
        if self.timers.next_sample.is_some_and(|due| due > now) {
            self.timers.next_sample = Some(now);
        }
    }

    /// Makes the next sample due [`SAMPLE_SETTLE`] after an operation
    /// answered at `now` (unless one is due sooner), so metrics and backend
    /// details follow the VMM without waiting a whole period. Not at once:
    /// the owner performs one thing at a time, and a client's next call
    /// (a boot right after its create) would otherwise queue behind the
    /// sample's VMM reads.
    pub fn sample_after_operation(&mut self, now: Instant) {
        self.sample_soon(now + SAMPLE_SETTLE);
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
