//! Tests of the lifecycle core: admission, observations, timers, restarts,
//! and the property tests over random command sequences.

// The core never reads the clock; its tests need some `Instant` to start from.
#![expect(
    clippy::disallowed_methods,
    reason = "a test's starting Instant; the core only receives it as an argument"
)]

use super::*;
use crate::domain::config::VmSize;
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
        other @ (Admission::Accepted | Admission::Ignored) => {
            panic!("expected denial, got {other:?}")
        }
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
fn the_sample_after_an_operation_waits_for_the_settle_time_and_never_postpones_one() {
    let t0 = Instant::now();
    let period = Duration::from_secs(5);
    let mut v = vm().with_sample_period(period);
    v.start_timers(t0);
    let answered = t0 + Duration::from_secs(1);
    v.sample_after_operation(answered);
    assert_eq!(v.poll_timeout(), Some(answered + SAMPLE_SETTLE));
    // A call right after the answer (a boot after its create) comes first.
    v.handle_timeout(answered + SAMPLE_SETTLE / 2);
    assert_eq!(v.poll_effect(), None, "not yet: the next call goes first");
    v.handle_timeout(answered + SAMPLE_SETTLE);
    assert_eq!(v.poll_effect(), Some(Effect::Sample));
    assert_eq!(v.poll_timeout(), Some(answered + SAMPLE_SETTLE + period));
    // A sample due sooner (a recovered VM's) is not pushed back.
    let now = answered + SAMPLE_SETTLE;
    v.sample_soon(now);
    v.sample_after_operation(now);
    assert_eq!(v.poll_timeout(), Some(now));
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
