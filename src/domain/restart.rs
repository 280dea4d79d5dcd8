//! Restart policies as pure decisions: when a VM's VMM has gone, whether
//! its owner boots it again, after how long, or gives up. Time is an
//! argument; nothing here sleeps or reads a clock.
//!
//! | policy     | VMM crashed (signal, non-zero exit) | guest powered off or reset | explicit stop, pause, delete |
//! |------------|-------------------------------------|----------------------------|------------------------------|
//! | never      | stay (Failed)                       | stay (Shutdown)            | stay                         |
//! | on-failure | restart                             | stay                       | stay                         |
//! | always     | restart                             | restart                    | stay                         |
//!
//! "Explicit" is the caller's desired state: only a VM the caller wants
//! running (desired Running) is ever restarted, so a ShutdownVm, PauseVm
//! or DeleteVm is never undone. Restarts back off exponentially from
//! [`RestartSettings::backoff_initial`], doubling up to
//! [`RestartSettings::backoff_max`]; after [`RestartSettings::limit`]
//! restarts within [`RestartSettings::window`] the VM is left Failed with
//! "restart limit reached".

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::lifecycle::Desired;

/// What a VM's owner does when its VMM goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RestartPolicy {
    /// The host default (`UNKEY_VMCP_DEFAULT_RESTART_POLICY`).
    #[default]
    Unspecified,
    /// Never boot it again on its own.
    Never,
    /// Boot it again when its VMM crashed (or vanished with the host).
    OnFailure,
    /// Boot it again whenever it stops without being asked to.
    Always,
}

impl RestartPolicy {
    /// The policy in force: `self`, or `default` when unspecified.
    pub fn or(self, default: RestartPolicy) -> RestartPolicy {
        match self {
            RestartPolicy::Unspecified => default,
            p @ (RestartPolicy::Never | RestartPolicy::OnFailure | RestartPolicy::Always) => p,
        }
    }

    /// The name used in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Unspecified => "unspecified",
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

/// How the VMM went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Killed by a signal or exited non-zero.
    Crash,
    /// The guest powered off or reset (the VMM exited cleanly).
    Poweroff,
    /// It vanished with the host (found gone at start-up).
    HostRestart,
    /// A restart's own boot failed.
    FailedStart,
}

impl Cause {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Poweroff => "poweroff",
            Cause::HostRestart => "host_restart",
            Cause::FailedStart => "failed_start",
        }
    }
}

/// Backoff and crash-loop limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartSettings {
    /// The policy of VMs that do not name one.
    pub default_policy: RestartPolicy,
    /// Delay before the first restart.
    pub backoff_initial: Duration,
    /// Longest delay between restarts.
    pub backoff_max: Duration,
    /// Restarts allowed within `window` before the VM is left Failed.
    pub limit: u32,
    /// The crash-loop window.
    pub window: Duration,
}

impl Default for RestartSettings {
    fn default() -> Self {
        Self {
            default_policy: RestartPolicy::Never,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            limit: 5,
            window: Duration::from_secs(600),
        }
    }
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leave the VM as it is.
    Stay,
    /// Boot it again after `after`; this is restart number `attempt` in the window.
    Restart {
        /// 1 for the first restart in the window.
        attempt: u32,
        /// Delay before the boot.
        after: Duration,
    },
    /// The limit is reached: leave it Failed.
    GiveUp,
}

/// The delay before restart number `attempt` (1-based): the initial delay
/// doubled per earlier attempt, capped.
pub fn backoff(attempt: u32, s: &RestartSettings) -> Duration {
    let doublings = attempt.saturating_sub(1).min(32);
    s.backoff_initial
        .saturating_mul(1u32 << doublings.min(31))
        .min(s.backoff_max)
}

/// The reason under any "restarting (attempt N) in D s: " prefixes, so a
/// reason carried across a restart does not nest.
pub fn underlying(reason: &str) -> &str {
    let mut r = reason;
    while let Some(rest) = r.strip_prefix("restarting (attempt ") {
        match rest.split_once(": ") {
            Some((_, inner)) => r = inner,
            None => break,
        }
    }
    r
}

/// When recent restarts happened (those older than the window are forgotten).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    restarts: VecDeque<Instant>,
}

impl History {
    /// Restarts within `window` of `now`.
    pub fn recent(&mut self, now: Instant, window: Duration) -> u32 {
        while self
            .restarts
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.restarts.pop_front();
        }
        u32::try_from(self.restarts.len()).unwrap_or(u32::MAX)
    }

    /// Records a restart at `now`.
    pub fn record(&mut self, now: Instant) {
        self.restarts.push_back(now);
    }

    /// Forgets every restart (the caller took over).
    pub fn clear(&mut self) {
        self.restarts.clear();
    }
}

/// Decides what to do after the VMM went away for `cause`, under `policy`
/// (already resolved), with the caller wanting `desired`.
pub fn decide(
    policy: RestartPolicy,
    desired: Desired,
    cause: Cause,
    history: &mut History,
    now: Instant,
    s: &RestartSettings,
) -> Decision {
    if desired != Desired::Running {
        return Decision::Stay;
    }
    let wanted = match policy.or(s.default_policy) {
        RestartPolicy::Never | RestartPolicy::Unspecified => false,
        RestartPolicy::OnFailure => cause != Cause::Poweroff,
        RestartPolicy::Always => true,
    };
    if !wanted {
        return Decision::Stay;
    }
    let done = history.recent(now, s.window);
    if done >= s.limit {
        return Decision::GiveUp;
    }
    let attempt = done + 1;
    // A VM found gone at start-up comes back at once; crashes back off.
    let after = if cause == Cause::HostRestart && done == 0 {
        Duration::ZERO
    } else {
        backoff(attempt, s)
    };
    Decision::Restart { attempt, after }
}

#[cfg(test)]
#[expect(
    clippy::disallowed_methods,
    reason = "a test's starting Instant; the decision only receives it as an argument"
)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings() -> RestartSettings {
        RestartSettings {
            default_policy: RestartPolicy::Never,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            limit: 4,
            window: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_table() {
        let s = settings();
        let now = Instant::now();
        use Cause::*;
        use RestartPolicy::*;
        for (policy, cause, restarts) in [
            (Never, Crash, false),
            (Never, Poweroff, false),
            (Never, HostRestart, false),
            (OnFailure, Crash, true),
            (OnFailure, FailedStart, true),
            (OnFailure, HostRestart, true),
            (OnFailure, Poweroff, false),
            (Always, Crash, true),
            (Always, Poweroff, true),
            (Always, HostRestart, true),
            (Unspecified, Crash, false),
        ] {
            let d = decide(
                policy,
                Desired::Running,
                cause,
                &mut History::default(),
                now,
                &s,
            );
            assert_eq!(
                matches!(d, Decision::Restart { attempt: 1, .. }),
                restarts,
                "{policy:?} {cause:?}: {d:?}"
            );
        }
        // The host default applies to an unspecified policy.
        let always = RestartSettings {
            default_policy: Always,
            ..s
        };
        assert!(matches!(
            decide(
                Unspecified,
                Desired::Running,
                Poweroff,
                &mut History::default(),
                now,
                &always
            ),
            Decision::Restart { .. }
        ));
        // A VM found gone at start-up comes back at once.
        assert_eq!(
            decide(
                Always,
                Desired::Running,
                HostRestart,
                &mut History::default(),
                now,
                &s
            ),
            Decision::Restart {
                attempt: 1,
                after: Duration::ZERO
            }
        );
    }

    #[test]
    fn the_underlying_reason_loses_every_restart_prefix() {
        assert_eq!(
            underlying(
                "restarting (attempt 2) in 0.4 s: restarting (attempt 1) in 0.0 s: host restarted"
            ),
            "host restarted"
        );
        assert_eq!(underlying("killed by signal 9"), "killed by signal 9");
    }

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        let s = settings();
        let delays: Vec<u64> = (1..=7).map(|a| backoff(a, &s).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(backoff(u32::MAX, &s), s.backoff_max);
    }

    pub(crate) fn arb_policy() -> impl Strategy<Value = RestartPolicy> {
        prop_oneof![
            Just(RestartPolicy::Unspecified),
            Just(RestartPolicy::Never),
            Just(RestartPolicy::OnFailure),
            Just(RestartPolicy::Always),
        ]
    }

    pub(crate) fn arb_desired() -> impl Strategy<Value = Desired> {
        prop_oneof![
            Just(Desired::Created),
            Just(Desired::Running),
            Just(Desired::Paused),
            Just(Desired::Stopped),
            Just(Desired::Deleted),
        ]
    }

    fn arb_cause() -> impl Strategy<Value = Cause> {
        prop_oneof![
            Just(Cause::Crash),
            Just(Cause::Poweroff),
            Just(Cause::HostRestart),
            Just(Cause::FailedStart),
        ]
    }

    proptest! {
        /// A VMM that dies at once on every start, at any pace: restarts
        /// follow the policy, never come faster than the backoff says, never
        /// exceed the limit within a window, and only a VM the caller wants
        /// running is ever restarted.
        #[test]
        fn a_crash_loop_backs_off_and_is_bounded(
            policy in arb_policy(),
            default in arb_policy(),
            desired in arb_desired(),
            causes in prop::collection::vec(arb_cause(), 1..40),
            gaps_ms in prop::collection::vec(0u64..5_000, 40),
            limit in 1u32..8,
            initial_ms in 1u64..1_000,
            max_ms in 1u64..10_000,
            window_s in 1u64..120,
        ) {
            let s = RestartSettings {
                default_policy: default,
                backoff_initial: Duration::from_millis(initial_ms),
                backoff_max: Duration::from_millis(max_ms.max(initial_ms)),
                limit,
                window: Duration::from_secs(window_s),
            };
            let start = Instant::now();
            let mut now = start;
            let mut history = History::default();
            let mut done: Vec<Instant> = Vec::new();
            for (cause, gap) in causes.iter().zip(&gaps_ms) {
                now += Duration::from_millis(*gap);
                let d = decide(policy, desired, *cause, &mut history, now, &s);
                let in_window = done.iter().filter(|t| now.duration_since(**t) < s.window).count() as u32;
                match d {
                    Decision::Stay => {
                        let wanted = desired == Desired::Running && match policy.or(default) {
                            RestartPolicy::Always => true,
                            RestartPolicy::OnFailure => *cause != Cause::Poweroff,
                            RestartPolicy::Never | RestartPolicy::Unspecified => false,
                        };
                        prop_assert!(!wanted, "{:?}/{:?} {:?} stayed", policy, default, cause);
                    }
                    Decision::GiveUp => {
                        prop_assert_eq!(desired, Desired::Running);
                        prop_assert!(in_window >= limit);
                    }
                    Decision::Restart { attempt, after } => {
                        prop_assert_eq!(desired, Desired::Running);
                        prop_assert!(policy.or(default) != RestartPolicy::Never);
                        prop_assert_eq!(attempt, in_window + 1);
                        prop_assert!(attempt <= limit);
                        prop_assert!(after <= s.backoff_max);
                        if !(*cause == Cause::HostRestart && attempt == 1) {
                            prop_assert!(after >= s.backoff_initial.min(s.backoff_max));
                            prop_assert_eq!(after, backoff(attempt, &s));
                        }
                        // The restart happens after its delay.
                        now += after;
                        history.record(now);
                        done.push(now);
                    }
                }
            }
        }
    }
}
