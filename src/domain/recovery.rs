//! Start-up recovery as a pure decision: from a stored VM record and what
//! the host shows for it (is a VMM live in its runtime directory, and is it
//! the one the record names?) to exactly one [`Decision`]. The app gathers
//! the facts (store, discovery scan) and performs the decision; it decides
//! nothing itself. When adopting the live VMM fails (its socket does not
//! answer, its identity does not match), the app decides again with
//! [`Live::Nothing`], which never adopts.
//!
//! The table, top row first (the first row that matches wins):
//!
//! | desired  | record                                  | live VMM          | decision                                  |
//! |----------|-----------------------------------------|-------------------|-------------------------------------------|
//! | Deleted  | any                                     | any               | finish the delete: end it, drop the record |
//! | Created  | generation ≤ 1, Created, no process yet, host restarted | nothing | Shutdown, bootable ("host restarted"): the created record went with the host |
//! | Created  | generation ≤ 1, Created, no process yet | any               | roll the create back: end it, drop the record |
//! | any      | any                                     | recorded          | adopt it                                  |
//! | any      | any                                     | replacement       | adopt it (the VMM replaced just before a crash) |
//! | Stopped  | any                                     | nothing           | Shutdown ("stopped while VMCP was down" unless it already was) |
//! | Running  | Failed (Shutdown: always), policy restarts | nothing        | restart it (a restart was due when VMCP went down) |
//! | any      | Shutdown or Failed                      | nothing           | keep state and reason                     |
//! | any      | Created or Paused                       | nothing           | Shutdown, bootable ("host restarted" / "VMM exited while VMCP was down", noting a pause) |
//! | Running  | Running, policy restarts                | nothing           | restart it (Shutdown or Failed with the reason, then booted at once) |
//! | any      | Running, host restarted                 | nothing           | Shutdown ("host restarted")                |
//! | any      | Running                                 | nothing           | Failed ("VMM exited while VMCP was down") |
//!
//! "Host restarted" is what the host shows: the VM's VMM *and* its runtime
//! directory are gone, and so is the mark each VMCP start leaves in the
//! runtime root (all on tmpfs, `/run/vmcp`, which a reboot empties); a VMM
//! gone from a directory that is still there, or while the mark is there,
//! died while VMCP was down. A paused VM is never restarted by a policy
//! (its pause was the caller's), nor one the caller stopped.
//!
//! A create's first record (its intent) is flushed to disk while the VMM
//! starts, but the record of the created VM is only committed (see the
//! README's durability table): a crash of VMCP cannot lose it, a power loss
//! can, and then the intent is all that is left of a VM whose create was
//! answered. So an intent-only create after a host restart is kept, as a
//! bootable VM whose VMM went with the host; in the same boot (VMCP alone
//! crashed, its VMM live or not yet started) the caller got no answer and
//! the create is rolled back.
//!
//! A VM without a live VMM is never registered as Created, Running or Paused:
//! there is nothing that could report such a state.

use super::lifecycle::{Desired, VmSnapshot, VmState};
use super::restart::{self, RestartPolicy};

/// The reason recorded for a VM whose VMM vanished while VMCP was down.
pub const VMM_EXITED_WHILE_DOWN: &str = "VMM exited while VMCP was down";
/// The reason recorded for a VM that was being stopped when VMCP went down.
pub const STOPPED_WHILE_DOWN: &str = "stopped while VMCP was down";
/// The reason recorded for a VM whose VMM vanished with its runtime directory.
pub const HOST_RESTARTED: &str = "host restarted";

/// What the host shows for one VM at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Live {
    /// No VMM of this VM runs.
    Nothing,
    /// The VMM the record names runs (pid and start time match).
    Recorded,
    /// A VMM of this VM runs that the record does not name: it replaced the
    /// recorded one (a respawn) just before VMCP went down.
    Replacement,
}

/// What recovery does with one stored VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Re-attach to the live VMM and take the state it reports.
    Adopt(Live),
    /// Register the VM without a VMM in this state, with this reason (it can
    /// be booted again, or deleted).
    Register {
        /// The state to record.
        state: VmState,
        /// Why.
        reason: String,
    },
    /// A delete was interrupted: end the live VMM, if any, and remove the record.
    FinishDelete(Live),
    /// A create was interrupted before its VMM was recorded (the caller never
    /// got an answer): end the live VMM, if any, and remove the record, so a
    /// retried CreateVm starts afresh instead of adopting a half-made VMM.
    RollBackCreate(Live),
    /// Its VMM is gone and its restart policy brings it back: register it in
    /// this state with this reason, then boot it at once.
    Restart {
        /// The state to record until the boot.
        state: VmState,
        /// Why it went down.
        reason: String,
    },
}

impl Decision {
    /// Whether this decision leaves the live VMM, if any, either adopted or
    /// ended: no VMM process is left that belongs to no VM.
    pub fn disposes_of(&self, live: Live) -> bool {
        match self {
            Decision::Adopt(which) => *which == live && live != Live::Nothing,
            Decision::Register { .. } | Decision::Restart { .. } => live == Live::Nothing,
            Decision::FinishDelete(which) | Decision::RollBackCreate(which) => *which == live,
        }
    }
}

/// What the host shows for one VM at start-up, besides its VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// What runs.
    pub live: Live,
    /// The host restarted since the record was written: the VM's runtime
    /// directory is gone, and so is the runtime root's mark of the last
    /// VMCP start (when the backend keeps one).
    pub restarted: bool,
}

/// Decides what to do with the VM `record` (whose stored process identity
/// exists when `has_process`) given what the host shows and the restart
/// policy in force.
pub fn decide(
    record: &VmSnapshot,
    has_process: bool,
    host: Host,
    policy: RestartPolicy,
) -> Decision {
    let live = host.live;
    if record.desired == Desired::Deleted {
        return Decision::FinishDelete(live);
    }
    let create_interrupted = record.desired == Desired::Created
        && record.generation <= 1
        && record.state == VmState::Created
        && !has_process;
    if create_interrupted {
        if host.restarted && live == Live::Nothing {
            return Decision::Register {
                state: VmState::Shutdown,
                reason: HOST_RESTARTED.to_owned(),
            };
        }
        return Decision::RollBackCreate(live);
    }
    match live {
        Live::Recorded | Live::Replacement => return Decision::Adopt(live),
        Live::Nothing => {}
    }
    if record.desired == Desired::Stopped && record.state != VmState::Failed {
        let reason = if record.state == VmState::Shutdown {
            record.reason.clone()
        } else {
            STOPPED_WHILE_DOWN.to_owned()
        };
        return Decision::Register {
            state: VmState::Shutdown,
            reason,
        };
    }
    let gone = if host.restarted {
        HOST_RESTARTED
    } else {
        VMM_EXITED_WHILE_DOWN
    };
    let restarts = |cause_is_poweroff: bool| {
        record.desired == Desired::Running
            && match policy {
                RestartPolicy::OnFailure => !cause_is_poweroff,
                RestartPolicy::Always => true,
                RestartPolicy::Never | RestartPolicy::Unspecified => false,
            }
    };
    match record.state {
        // Down before VMCP went down, with a restart due (VMCP stopped during its
        // backoff): the restart still happens. A VM the policy gave up on is no
        // longer desired running, so it stays.
        VmState::Shutdown | VmState::Failed if restarts(record.state == VmState::Shutdown) => {
            Decision::Restart {
                state: record.state,
                reason: restart::underlying(&record.reason).to_owned(),
            }
        }
        VmState::Shutdown | VmState::Failed => Decision::Register {
            state: record.state,
            reason: record.reason.clone(),
        },
        VmState::Created => Decision::Register {
            state: VmState::Shutdown,
            reason: gone.to_owned(),
        },
        VmState::Paused => Decision::Register {
            state: VmState::Shutdown,
            reason: format!("{gone} (the VM was paused)"),
        },
        VmState::Running => {
            let state = if host.restarted {
                VmState::Shutdown
            } else {
                VmState::Failed
            };
            let reason = gone.to_owned();
            if restarts(false) {
                Decision::Restart { state, reason }
            } else {
                Decision::Register { state, reason }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmId;
    use crate::domain::config::tests::valid;
    use crate::domain::restart::tests::{arb_desired, arb_policy};
    use proptest::prelude::*;

    fn record(desired: Desired, state: VmState, generation: u64) -> VmSnapshot {
        VmSnapshot {
            id: VmId::parse("vm1").expect("valid id"),
            config: valid(),
            state,
            reason: "earlier reason".into(),
            generation,
            created_at: 1,
            modified_at: 2,
            desired,
            deleted: false,
            revision: 7,
        }
    }

    fn arb_state() -> impl Strategy<Value = VmState> {
        prop::sample::select(VmState::ALL.to_vec())
    }

    fn arb_live() -> impl Strategy<Value = Live> {
        prop_oneof![
            Just(Live::Nothing),
            Just(Live::Recorded),
            Just(Live::Replacement)
        ]
    }

    #[test]
    fn the_table_row_by_row() {
        use Desired as D;
        use VmState as S;
        let cases: &[(D, S, u64, bool, Live, Decision)] = &[
            (
                D::Deleted,
                S::Running,
                5,
                true,
                Live::Recorded,
                Decision::FinishDelete(Live::Recorded),
            ),
            (
                D::Deleted,
                S::Running,
                5,
                true,
                Live::Nothing,
                Decision::FinishDelete(Live::Nothing),
            ),
            (
                D::Created,
                S::Created,
                0,
                false,
                Live::Replacement,
                Decision::RollBackCreate(Live::Replacement),
            ),
            (
                D::Created,
                S::Created,
                1,
                false,
                Live::Nothing,
                Decision::RollBackCreate(Live::Nothing),
            ),
            (
                D::Created,
                S::Created,
                1,
                true,
                Live::Recorded,
                Decision::Adopt(Live::Recorded),
            ),
            (
                D::Running,
                S::Running,
                4,
                true,
                Live::Replacement,
                Decision::Adopt(Live::Replacement),
            ),
            (
                D::Running,
                S::Shutdown,
                4,
                false,
                Live::Replacement,
                Decision::Adopt(Live::Replacement),
            ),
            (
                D::Stopped,
                S::Running,
                4,
                true,
                Live::Nothing,
                Decision::Register {
                    state: S::Shutdown,
                    reason: STOPPED_WHILE_DOWN.into(),
                },
            ),
            (
                D::Running,
                S::Shutdown,
                4,
                false,
                Live::Nothing,
                Decision::Register {
                    state: S::Shutdown,
                    reason: "earlier reason".into(),
                },
            ),
            (
                D::Running,
                S::Failed,
                4,
                true,
                Live::Nothing,
                Decision::Register {
                    state: S::Failed,
                    reason: "earlier reason".into(),
                },
            ),
            (
                D::Running,
                S::Running,
                4,
                true,
                Live::Nothing,
                Decision::Register {
                    state: S::Failed,
                    reason: VMM_EXITED_WHILE_DOWN.into(),
                },
            ),
            (
                D::Paused,
                S::Paused,
                4,
                true,
                Live::Nothing,
                Decision::Register {
                    state: S::Shutdown,
                    reason: format!("{VMM_EXITED_WHILE_DOWN} (the VM was paused)"),
                },
            ),
            (
                D::Created,
                S::Created,
                2,
                true,
                Live::Nothing,
                Decision::Register {
                    state: S::Shutdown,
                    reason: VMM_EXITED_WHILE_DOWN.into(),
                },
            ),
        ];
        for (desired, state, generation, has_process, live, expected) in cases {
            let host = Host {
                live: *live,
                restarted: false,
            };
            let got = decide(
                &record(*desired, *state, *generation),
                *has_process,
                host,
                RestartPolicy::Never,
            );
            assert_eq!(
                &got, expected,
                "{desired:?} {state:?} gen {generation} process {has_process} live {live:?}"
            );
        }
    }

    #[test]
    fn after_a_host_restart_a_running_vm_follows_its_policy_and_nothing_is_failed() {
        use Desired as D;
        use VmState as S;
        let host = Host {
            live: Live::Nothing,
            restarted: true,
        };
        let run = record(D::Running, S::Running, 4);
        assert_eq!(
            decide(&run, true, host, RestartPolicy::Never),
            Decision::Register {
                state: S::Shutdown,
                reason: HOST_RESTARTED.into()
            }
        );
        for p in [RestartPolicy::OnFailure, RestartPolicy::Always] {
            assert_eq!(
                decide(&run, true, host, p),
                Decision::Restart {
                    state: S::Shutdown,
                    reason: HOST_RESTARTED.into()
                }
            );
        }
        // A VMM that died while VMCP was down (its directory is still there) is a crash.
        let crashed = Host {
            restarted: false,
            ..host
        };
        assert_eq!(
            decide(&run, true, crashed, RestartPolicy::OnFailure),
            Decision::Restart {
                state: S::Failed,
                reason: VMM_EXITED_WHILE_DOWN.into()
            }
        );
        // VMCP went down while a restart was due: it still happens, with the underlying reason.
        let mut due = record(D::Running, S::Failed, 6);
        due.reason = "restarting (attempt 2) in 2.0 s: killed by signal 9".into();
        assert_eq!(
            decide(&due, false, crashed, RestartPolicy::OnFailure),
            Decision::Restart {
                state: S::Failed,
                reason: "killed by signal 9".into()
            }
        );
        let mut off = record(D::Running, S::Shutdown, 6);
        off.reason = "guest powered off".into();
        assert!(matches!(
            decide(&off, false, crashed, RestartPolicy::OnFailure),
            Decision::Register { .. }
        ));
        assert!(matches!(
            decide(&off, false, crashed, RestartPolicy::Always),
            Decision::Restart { .. }
        ));
        // Given up on (no longer desired running): stays Failed.
        let given_up = record(D::Stopped, S::Failed, 7);
        assert!(matches!(
            decide(&given_up, false, crashed, RestartPolicy::Always),
            Decision::Register {
                state: S::Failed,
                ..
            }
        ));
        // Never-booted and paused VMs become bootable, whatever the policy.
        let created = record(D::Created, S::Created, 2);
        let paused = record(D::Paused, S::Paused, 5);
        for p in [RestartPolicy::Never, RestartPolicy::Always] {
            assert_eq!(
                decide(&created, true, host, p),
                Decision::Register {
                    state: S::Shutdown,
                    reason: HOST_RESTARTED.into()
                }
            );
            assert_eq!(
                decide(&paused, true, host, p),
                Decision::Register {
                    state: S::Shutdown,
                    reason: "host restarted (the VM was paused)".into()
                }
            );
        }
    }

    /// The created record is written unsynced, so a power loss can leave only
    /// the create's intent: after a host restart that VM is kept (its create may
    /// have been answered), bootable; in the same boot the create is rolled back.
    #[test]
    fn an_intent_only_create_is_kept_after_a_host_restart_and_rolled_back_otherwise() {
        use Desired as D;
        use VmState as S;
        for generation in [0, 1] {
            let intent = record(D::Created, S::Created, generation);
            let rebooted = Host {
                live: Live::Nothing,
                restarted: true,
            };
            for policy in [RestartPolicy::Never, RestartPolicy::Always] {
                assert_eq!(
                    decide(&intent, false, rebooted, policy),
                    Decision::Register {
                        state: S::Shutdown,
                        reason: HOST_RESTARTED.into()
                    },
                    "gen {generation} {policy:?}"
                );
            }
            for live in [Live::Nothing, Live::Recorded, Live::Replacement] {
                let same_boot = Host {
                    live,
                    restarted: false,
                };
                assert_eq!(
                    decide(&intent, false, same_boot, RestartPolicy::Always),
                    Decision::RollBackCreate(live),
                    "gen {generation} {live:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        #[test]
        fn every_decision_accounts_for_the_vm_and_its_vmm(
            desired in arb_desired(),
            state in arb_state(),
            generation in 0u64..6,
            has_process in any::<bool>(),
            live in arb_live(),
            restarted in any::<bool>(),
            policy in arb_policy(),
        ) {
            let rec = record(desired, state, generation);
            let host = Host { live, restarted };
            let d = decide(&rec, has_process, host, policy);
            // No VMM process is left that belongs to no VM.
            prop_assert!(d.disposes_of(live), "{d:?} leaves {live:?} unaccounted");
            match &d {
                Decision::Adopt(_) => {
                    prop_assert!(live != Live::Nothing);
                    prop_assert!(desired != Desired::Deleted);
                }
                Decision::Register { state: registered, reason } => {
                    // Nothing runs, so nothing can report Created, Running or Paused.
                    prop_assert!(matches!(registered, VmState::Shutdown | VmState::Failed));
                    prop_assert!(!reason.is_empty() || rec.reason.is_empty());
                    prop_assert!(live == Live::Nothing);
                }
                Decision::Restart { state: registered, reason } => {
                    // Only a VM the caller wants running, under a policy that restarts.
                    prop_assert_eq!(desired, Desired::Running);
                    prop_assert!(matches!(policy, RestartPolicy::OnFailure | RestartPolicy::Always));
                    prop_assert!(matches!(registered, VmState::Shutdown | VmState::Failed));
                    prop_assert!(!reason.is_empty());
                    prop_assert!(live == Live::Nothing);
                }
                Decision::FinishDelete(_) => prop_assert_eq!(desired, Desired::Deleted),
                Decision::RollBackCreate(_) => {
                    prop_assert!(!has_process);
                    prop_assert!(generation <= 1);
                    // Never the create of a VM whose record a host restart may have taken.
                    prop_assert!(!(restarted && live == Live::Nothing));
                }
            }
            // A create cut short in the same boot is rolled back whatever runs; after a
            // host restart its intent is kept as a bootable VM.
            let intent_only = desired == Desired::Created
                && generation <= 1
                && state == VmState::Created
                && !has_process;
            if intent_only {
                if restarted && live == Live::Nothing {
                    prop_assert_eq!(
                        &d,
                        &Decision::Register { state: VmState::Shutdown, reason: HOST_RESTARTED.to_owned() }
                    );
                } else {
                    prop_assert_eq!(&d, &Decision::RollBackCreate(live));
                }
            }
            // A failed adoption decides again with nothing live: never another adoption,
            // and the VM stays accounted for (registered or removed on purpose).
            if matches!(d, Decision::Adopt(_)) {
                let again = decide(&rec, has_process, Host { live: Live::Nothing, restarted }, policy);
                let is_register = matches!(again, Decision::Register { .. } | Decision::Restart { .. });
                prop_assert!(is_register, "{again:?}");
            }
            // After a host restart nothing newly turns Failed: a VM is Failed only if it was.
            if restarted && live == Live::Nothing
                && let Decision::Register { state: VmState::Failed, .. } | Decision::Restart { state: VmState::Failed, .. } = d
            {
                prop_assert_eq!(state, VmState::Failed);
            }
        }
    }
}
