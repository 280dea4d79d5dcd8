//! Restart policies and no dead end in FAILED, on the test double (which,
//! like a host, can reboot: every VMM ends and every runtime directory is
//! gone): a simulated host restart under each policy leaves every VM running
//! again or bootable with a reason, never FAILED; a killed VMM under
//! on-failure comes back with a new pid; explicit stops are never undone; a
//! VMM that dies on every start ends FAILED after the limit, backing off.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::adapters::outbound::store::sqlite::SqliteStore;
use vmcp::app::security::Security;
use vmcp::domain::VmEvent;
use vmcp::domain::restart::{RestartPolicy, RestartSettings};
use vmcp::ports::{Telemetry, TelemetryEvent, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::double::Double;
use super::harness::{Harness, Wire, create_req, eventually};

const BACKOFF: Duration = Duration::from_millis(40);

fn security(default_policy: RestartPolicy) -> Security {
    Security {
        restart: RestartSettings {
            default_policy,
            backoff_initial: BACKOFF,
            backoff_max: Duration::from_millis(400),
            limit: 3,
            window: Duration::from_secs(60),
        },
        ..Security::open()
    }
}

fn create_with(id: &str, policy: pb::RestartPolicy) -> pb::CreateVmRequest {
    let mut req = create_req(id);
    if let Some(c) = req.config.as_option_mut() {
        c.restart_policy = policy.into();
    }
    req
}

async fn info<St: VmStore>(h: &Harness<St>, id: &str) -> pb::GetVmInfoResponse {
    h.info(id).await
}

fn st(i: &pb::GetVmInfoResponse) -> S {
    i.state.as_known().expect("known state")
}

async fn boot<St: VmStore>(
    h: &Harness<St>,
    id: &str,
) -> Result<pb::BootVmResponse, connectrpc::ConnectError> {
    h.client(Wire::ConnectProto)
        .boot_vm(pb::BootVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_owned())
}

async fn until_state<St: VmStore>(h: &Harness<St>, id: &str, want: S) -> pb::GetVmInfoResponse {
    let ok = eventually(Duration::from_secs(5), || async {
        st(&info(h, id).await) == want
    })
    .await;
    let i = info(h, id).await;
    assert!(
        ok,
        "{id}: {:?} ({}), wanted {want:?}",
        st(&i),
        i.state_reason
    );
    i
}

#[tokio::test]
async fn after_a_host_restart_every_vm_runs_again_by_its_policy_or_is_bootable_never_failed() {
    let store = Arc::new(MemoryStore::new());
    host_restart(|| Arc::clone(&store)).await;
}

/// The same with the records in SQLite, reopened from disk after the host restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_host_restart_on_the_sqlite_store_every_vm_runs_again_or_is_bootable() {
    let dir = tempfile::tempdir().unwrap();
    host_restart(|| Arc::new(SqliteStore::open(dir.path()).expect("open the SQLite store"))).await;
}

/// Stopping VMCP ends every VM's owner before the stop returns: nothing
/// hears a VMM any more, so an exit after the stop (here a kill; in the
/// host-restart tests above, the reboot itself) changes no record, and the
/// next start is the one that finds the VMM gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vmcp_hears_and_records_nothing_until_the_next_start() {
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let sec = || security(RestartPolicy::Never);
    let h = Harness::start_on(Arc::clone(&double), Arc::clone(&store), sec()).await;
    // Each answer is followed by a sample of the VMM: slow ones are still
    // reading when the stop begins, and are let finish before it returns.
    double.delay("sample", Duration::from_millis(300));
    for id in ["a", "b"] {
        h.client(Wire::ConnectProto)
            .create_vm(create_req(id))
            .await
            .expect("create");
        boot(&h, id).await.expect("boot");
    }
    h.stop().await;
    for id in ["a", "b"] {
        assert!(!double.is_watched(id), "{id}: its owner outlived the stop");
    }
    let before = store.load_all().await.expect("records");
    assert_eq!(double.kill("a").len(), 1);
    assert_eq!(
        store.load_all().await.expect("records"),
        before,
        "a record changed after the stop"
    );
    let h = Harness::start_on(Arc::clone(&double), Arc::clone(&store), sec()).await;
    let a = until_state(&h, "a", S::VM_STATE_FAILED).await;
    assert_eq!(a.state_reason, "VMM exited while VMCP was down");
    until_state(&h, "b", S::VM_STATE_RUNNING).await;
    assert!(double.is_watched("b"), "the new start owns b");
    h.stop().await;
}

/// Every policy through a host restart, with the records in the store `open` gives.
async fn host_restart<St: VmStore>(open: impl Fn() -> Arc<St>) {
    use pb::RestartPolicy as P;
    for (name, policy) in [
        ("never", P::RESTART_POLICY_NEVER),
        ("on-failure", P::RESTART_POLICY_ON_FAILURE),
        ("always", P::RESTART_POLICY_ALWAYS),
        ("host default (on-failure)", P::RESTART_POLICY_UNSPECIFIED),
    ] {
        let double = Arc::new(Double::new());
        let sec = || security(RestartPolicy::OnFailure);
        let h = Harness::start_on(Arc::clone(&double), open(), sec()).await;
        let c = h.client(Wire::ConnectProto);
        for id in ["run", "created", "paused", "stopped"] {
            c.create_vm(create_with(id, policy)).await.expect("create");
        }
        for id in ["run", "paused", "stopped"] {
            boot(&h, id).await.expect("boot");
        }
        c.pause_vm(pb::PauseVmRequest {
            vm_id: "paused".into(),
            ..Default::default()
        })
        .await
        .expect("pause");
        c.shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "stopped".into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("shutdown");
        let old = double.pid_of("run").expect("run has a VMM");
        h.stop().await;
        double.host_reboot();
        assert_eq!(double.vmm_count(), 0);
        let h = Harness::start_on(Arc::clone(&double), open(), sec()).await;
        let c = h.client(Wire::ConnectProto);
        let restarts = policy != P::RESTART_POLICY_NEVER;
        if restarts {
            let i = until_state(&h, "run", S::VM_STATE_RUNNING).await;
            let new = double.pid_of("run").expect("a new VMM");
            assert_ne!(new, old, "{name}: a fresh VMM");
            assert_eq!(i.backend_info.get("vmm_pid"), Some(&new.to_string()));
        } else {
            let i = info(&h, "run").await;
            assert_eq!(
                (st(&i), i.state_reason.as_str()),
                (S::VM_STATE_SHUTDOWN, "host restarted"),
                "{name}"
            );
        }
        let created = info(&h, "created").await;
        assert_eq!(
            (st(&created), created.state_reason.as_str()),
            (S::VM_STATE_SHUTDOWN, "host restarted"),
            "{name}"
        );
        let paused = info(&h, "paused").await;
        assert_eq!(
            (st(&paused), paused.state_reason.as_str()),
            (S::VM_STATE_SHUTDOWN, "host restarted (the VM was paused)"),
            "{name}: an explicit pause is not undone by a policy"
        );
        assert_eq!(
            st(&info(&h, "stopped").await),
            S::VM_STATE_SHUTDOWN,
            "{name}"
        );
        // Nothing is stuck: every VM that is not running boots.
        for id in ["run", "created", "paused", "stopped"] {
            let r = boot(&h, id)
                .await
                .unwrap_or_else(|e| panic!("{name}: boot {id}: {e:?}"));
            assert_eq!(
                r.state.as_known(),
                Some(S::VM_STATE_RUNNING),
                "{name}: {id}"
            );
        }
        for id in ["run", "created", "paused", "stopped"] {
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: id.into(),
                force: true,
                ..Default::default()
            })
            .await
            .expect("delete");
        }
        assert_eq!(double.vmm_count(), 0, "{name}: no VMM without a VM");
        assert_eq!(h.store.load_all().await.expect("records"), vec![], "{name}");
        h.stop().await;
    }
}

/// Counts policy restarts by cause.
#[derive(Default)]
struct Restarts(Mutex<Vec<&'static str>>);

impl Telemetry for Restarts {
    fn record(&self, event: TelemetryEvent) {
        match event {
            TelemetryEvent::Vm(VmEvent::Restarted { cause, .. }) => {
                self.0.lock().unwrap().push(cause.as_str())
            }
            TelemetryEvent::Vm(VmEvent::RestartLimitReached { .. }) => {
                self.0.lock().unwrap().push("limit_reached")
            }
            _ => {}
        }
    }
}

impl Restarts {
    fn count(&self, cause: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|c| **c == cause)
            .count()
    }
}

#[tokio::test]
async fn a_killed_vmm_under_on_failure_comes_back_running_and_explicit_stops_are_never_undone() {
    use pb::RestartPolicy as P;
    let rec = Arc::new(Restarts::default());
    let h = Harness::start_observed(security(RestartPolicy::Never), rec.clone()).await;
    let c = h.client(Wire::ConnectProto);
    for (id, p) in [
        ("onf", P::RESTART_POLICY_ON_FAILURE),
        ("always", P::RESTART_POLICY_ALWAYS),
        ("never", P::RESTART_POLICY_UNSPECIFIED),
        ("paused", P::RESTART_POLICY_ALWAYS),
    ] {
        c.create_vm(create_with(id, p)).await.expect("create");
        boot(&h, id).await.expect("boot");
    }
    // kill -9 under on-failure: back with a new pid.
    let killed = h.double.kill("onf");
    let i = until_state(&h, "onf", S::VM_STATE_RUNNING).await;
    let new: u32 = i.backend_info["vmm_pid"].parse().unwrap();
    assert!(!killed.contains(&new), "a new pid");
    assert_eq!(rec.count("crash"), 1);
    // A guest poweroff: on-failure leaves it Shutdown, always boots it again.
    assert!(h.double.guest_poweroff("onf"));
    until_state(&h, "onf", S::VM_STATE_SHUTDOWN).await;
    assert!(h.double.guest_poweroff("always"));
    until_state(&h, "always", S::VM_STATE_RUNNING).await;
    assert_eq!(rec.count("poweroff"), 1);
    // The host default (never): a crash stays Failed, with its reason, and boots on request.
    h.double.kill("never");
    let i = until_state(&h, "never", S::VM_STATE_FAILED).await;
    assert!(i.state_reason.contains("SIGKILL"), "{}", i.state_reason);
    assert_eq!(st(&info(&h, "never").await), S::VM_STATE_FAILED);
    assert_eq!(
        boot(&h, "never")
            .await
            .expect("boot from FAILED")
            .state
            .as_known(),
        Some(S::VM_STATE_RUNNING)
    );
    // Paused by the caller, then its VMM dies: not resumed into running by `always`.
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "paused".into(),
        ..Default::default()
    })
    .await
    .expect("pause");
    h.double.kill("paused");
    // The policy decides when the death is handled, and a restart shows in the reason
    // from that moment ("restarting (attempt N) in …"), so the first FAILED seen
    // carries the decision: no waiting for a restart that must not come.
    let i = until_state(&h, "paused", S::VM_STATE_FAILED).await;
    assert!(
        i.state_reason.contains("SIGKILL") && !i.state_reason.contains("restarting"),
        "a pause is never undone: {}",
        i.state_reason
    );
    // Shut down by the caller (the double, like Cloud Hypervisor, keeps the VMM and
    // reads Created), then that VMM dies: the policy does not boot it either.
    let r = c
        .shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "always".into(),
            force: true,
            ..Default::default()
        })
        .await
        .expect("shutdown")
        .into_owned();
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_CREATED));
    assert!(!h.double.kill("always").is_empty(), "its VMM ran on");
    let i = until_state(&h, "always", S::VM_STATE_FAILED).await;
    assert!(
        i.state_reason.contains("SIGKILL") && !i.state_reason.contains("restarting"),
        "a shutdown is never undone: {}",
        i.state_reason
    );
    assert_eq!(
        rec.count("crash"),
        1,
        "only the on-failure VM's crash was restarted"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_vmm_that_dies_on_every_start_ends_failed_after_the_limit_backing_off() {
    let rec = Arc::new(Restarts::default());
    let h = Harness::start_observed(security(RestartPolicy::OnFailure), rec.clone()).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("loop")).await.expect("create");
    boot(&h, "loop").await.expect("boot");
    for _ in 0..10 {
        h.double.fail_respawn("loop");
    }
    let mut w = super::watch::watch(h.addr, Wire::Grpc, super::watch::since(0));
    super::watch::next_ok(&mut w).await;
    let started = Instant::now();
    h.double.kill("loop");
    // Visible while it happens.
    let restarting = eventually(Duration::from_secs(2), || async {
        info(&h, "loop")
            .await
            .state_reason
            .starts_with("restarting (attempt ")
    })
    .await;
    assert!(restarting, "the restart shows in the reason");
    // And reaches watchers as a change, attempt by attempt.
    let mut attempts = Vec::new();
    while attempts.len() < 3 {
        let m = super::watch::next_ok(&mut w).await;
        if let Some(vm) = m.vm.as_option()
            && let Some(rest) = vm.state_reason.strip_prefix("restarting (attempt ")
        {
            attempts.push(rest.chars().next().unwrap());
        }
    }
    assert_eq!(attempts, ['1', '2', '3']);
    let gave_up = eventually(Duration::from_secs(5), || async {
        info(&h, "loop")
            .await
            .state_reason
            .starts_with("restart limit reached")
    })
    .await;
    let i = info(&h, "loop").await;
    assert!(gave_up, "{:?}: {}", st(&i), i.state_reason);
    assert_eq!(st(&i), S::VM_STATE_FAILED);
    // 3 restarts, 40 + 80 + 160 ms apart at least: never a tight loop.
    assert!(started.elapsed() >= BACKOFF * 7, "{:?}", started.elapsed());
    assert_eq!(
        rec.count("crash") + rec.count("failed_start"),
        3,
        "{:?}",
        rec.0.lock().unwrap()
    );
    assert_eq!(rec.count("limit_reached"), 1);
    // An absence over the policy's own timing (the next backoff would be 320 ms):
    // the time passing is what is under test, not a wait for something to happen.
    tokio::time::sleep(BACKOFF * 8).await;
    assert_eq!(
        rec.count("crash") + rec.count("failed_start"),
        3,
        "no restart after giving up"
    );
    // BootVm still works once the VMM can start again.
    h.double.reset();
    assert_eq!(
        boot(&h, "loop").await.expect("boot").state.as_known(),
        Some(S::VM_STATE_RUNNING)
    );
    h.stop().await;
}

#[tokio::test]
async fn a_restart_due_when_vmcp_stops_still_happens_after_it_starts_again() {
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    // A long backoff: the restart cannot happen before VMCP stops.
    let mut slow = security(RestartPolicy::OnFailure);
    slow.restart.backoff_initial = Duration::from_secs(30);
    slow.restart.backoff_max = Duration::from_secs(30);
    let h = Harness::start_with_security(Arc::clone(&double), Arc::clone(&store), slow).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("due")).await.expect("create");
    boot(&h, "due").await.expect("boot");
    let killed = double.kill("due");
    let ok = eventually(Duration::from_secs(2), || async {
        info(&h, "due")
            .await
            .state_reason
            .starts_with("restarting (attempt 1) in 30.0 s: ")
    })
    .await;
    assert!(ok, "{}", info(&h, "due").await.state_reason);
    h.stop().await;
    let h = Harness::start_with_security(
        Arc::clone(&double),
        Arc::clone(&store),
        security(RestartPolicy::OnFailure),
    )
    .await;
    let i = until_state(&h, "due", S::VM_STATE_RUNNING).await;
    let pid: u32 = i.backend_info["vmm_pid"].parse().unwrap();
    assert!(!killed.contains(&pid));
    h.stop().await;
}
