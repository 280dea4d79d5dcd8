//! One owner per VM, through the API and the test double (which, like the
//! real VMMs, gives a replaced VMM a new pid and start time, and keeps its
//! VMMs running across a VMCP restart): a VM whose VMM VMCP replaced is
//! re-adopted with the new pid after a restart and its delete leaves no
//! process; and a randomized run of operations, VMM deaths, guest
//! poweroffs, direct pauses, faults and restarts that checks, after every
//! restart, that every VM is accounted for and no VMM belongs to no VM.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::adapters::outbound::store::sqlite::SqliteStore;
use vmcp::app::security::Security;
use vmcp::domain::restart::{RestartPolicy, RestartSettings};
use vmcp::ports::{HypervisorError, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::double::Double;
use super::harness::{Harness, Rng, Wire, create_req, eventually};

fn st(v: buffa::EnumValue<S>) -> S {
    v.as_known().expect("known state")
}

async fn info<St: VmStore>(h: &Harness<St>, id: &str) -> pb::GetVmInfoResponse {
    h.info(id).await
}

fn shown_pid(i: &pb::GetVmInfoResponse) -> Option<u32> {
    i.backend_info.get("vmm_pid").and_then(|p| p.parse().ok())
}

#[derive(Debug, Clone, Copy)]
enum Replace {
    PoweroffThenBoot,
    Reboot,
    ShutdownThenBoot,
}

/// A memory store that lives across restarts, as the tests' VMCP's records do.
fn memory() -> impl Fn() -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    move || Arc::clone(&store)
}

/// A SQLite store in `dir`, opened afresh from disk by each VMCP start.
fn sqlite(dir: &tempfile::TempDir) -> impl Fn() -> Arc<SqliteStore> + '_ {
    || Arc::new(SqliteStore::open(dir.path()).expect("open the SQLite store"))
}

async fn replaced_vmm_survives_restart<St: VmStore>(
    double: Double,
    how: Replace,
    open: impl Fn() -> Arc<St>,
) {
    let double = Arc::new(double);
    let store = open();
    let h = Harness::start_on(Arc::clone(&double), Arc::clone(&store), Security::open()).await;
    let c = h.client(Wire::ConnectProto);
    let id = "replaced";
    c.create_vm(create_req(id)).await.expect("create");
    let boot = pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    };
    c.boot_vm(boot.clone()).await.expect("boot");
    let first = double.pid_of(id).expect("a VMM runs");
    assert_eq!(shown_pid(&info(&h, id).await), Some(first));
    match how {
        Replace::PoweroffThenBoot => {
            assert!(double.guest_poweroff(id));
            let off = eventually(Duration::from_secs(2), || async {
                st(info(&h, id).await.state) == S::VM_STATE_SHUTDOWN
            })
            .await;
            assert!(off, "the clean exit reads Shutdown");
            c.boot_vm(boot.clone()).await.expect("boot respawns");
        }
        Replace::Reboot => {
            c.reboot_vm(pb::RebootVmRequest {
                vm_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("reboot");
        }
        Replace::ShutdownThenBoot => {
            let sd = c
                .shutdown_vm(pb::ShutdownVmRequest {
                    vm_id: id.into(),
                    force: true,
                    ..Default::default()
                })
                .await
                .expect("shutdown")
                .into_owned();
            assert_eq!(st(sd.state), S::VM_STATE_SHUTDOWN);
            c.boot_vm(boot.clone()).await.expect("boot respawns");
        }
    }
    let second = double.pid_of(id).expect("a VMM runs again");
    assert_ne!(first, second, "{how:?} replaced the VMM");
    assert!(!double.is_alive(first));
    let shown = info(&h, id).await;
    assert_eq!(
        shown_pid(&shown),
        Some(second),
        "reads show the new pid at once"
    );
    if double.host().kind() == vmcp::ports::BackendKind::CloudHypervisor {
        // A forced stop of the new VMM keeps that process and reads Created, as
        // the real Cloud Hypervisor does (real_api checks the same path).
        let c = h.client(Wire::ConnectProto);
        let sd = c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id.into(),
                force: true,
                ..Default::default()
            })
            .await
            .expect("forced shutdown")
            .into_owned();
        assert_eq!(st(sd.state), S::VM_STATE_CREATED);
        assert_eq!(double.pid_of(id), Some(second));
        assert_eq!(shown_pid(&info(&h, id).await), Some(second));
        c.boot_vm(boot.clone()).await.expect("boot from Created");
        assert_eq!(double.pid_of(id), Some(second), "booted in place");
    }
    let recorded = vmcp::ports::VmStore::load_all(&*store)
        .await
        .expect("records");
    assert_eq!(
        recorded[0].process,
        double.process_of(id),
        "the store names the new VMM by pid and start time: {recorded:?}"
    );
    h.stop().await;
    drop(store);

    let double = Arc::new(double.restarted());
    let h = Harness::start_on(Arc::clone(&double), open(), Security::open()).await;
    let after = info(&h, id).await;
    assert_eq!(
        st(after.state),
        S::VM_STATE_RUNNING,
        "{how:?}: {}",
        after.state_reason
    );
    assert_eq!(shown_pid(&after), Some(second), "the new VMM was adopted");
    h.client(Wire::ConnectProto)
        .delete_vm(pb::DeleteVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert!(!double.is_alive(second), "delete ended the adopted VMM");
    for pid in double.pids_ever(id) {
        assert!(
            !double.is_alive(pid),
            "VMM {pid} of {id} outlived its delete"
        );
    }
    assert_eq!(
        double.vmm_count(),
        0,
        "no VMM left: {:?}",
        double.live_pids()
    );
    h.stop().await;
}

#[tokio::test]
async fn ch_boot_after_a_poweroff_survives_a_restart() {
    replaced_vmm_survives_restart(Double::new(), Replace::PoweroffThenBoot, memory()).await;
}

#[tokio::test]
async fn fc_reboot_survives_a_restart() {
    replaced_vmm_survives_restart(Double::firecracker(), Replace::Reboot, memory()).await;
}

#[tokio::test]
async fn fc_boot_from_shutdown_survives_a_restart() {
    replaced_vmm_survives_restart(Double::firecracker(), Replace::ShutdownThenBoot, memory()).await;
}

/// The same with the records in SQLite, reopened from disk by the restarted VMCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_vmms_survive_a_restart_on_the_sqlite_store() {
    for (double, how) in [
        (Double::new as fn() -> Double, Replace::PoweroffThenBoot),
        (Double::firecracker, Replace::Reboot),
        (Double::firecracker, Replace::ShutdownThenBoot),
    ] {
        let dir = tempfile::tempdir().unwrap();
        replaced_vmm_survives_restart(double(), how, sqlite(&dir)).await;
    }
}

/// A VMM that runs when VMCP starts but cannot be adopted (its socket does
/// not answer) must not be left running beside a VM that says it has none:
/// a delete would leave it behind, a boot would start a second one. It is
/// ended as an orphan is, and the VM's reason says so; with orphans only
/// reported, it is left running and the reason says that instead.
#[tokio::test]
async fn a_vmm_that_cannot_be_adopted_is_ended_not_left_beside_its_vm() {
    for remove_orphans in [true, false] {
        let double = Arc::new(Double::new());
        let store = Arc::new(MemoryStore::new());
        let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
        let c = h.client(Wire::ConnectProto);
        c.create_vm(create_req("wedged")).await.expect("create");
        c.boot_vm(pb::BootVmRequest {
            vm_id: "wedged".into(),
            ..Default::default()
        })
        .await
        .expect("boot");
        let stuck = double.pid_of("wedged").expect("a VMM runs");
        h.stop().await;

        let double = Arc::new(double.restarted());
        double.fail_next(
            "wedged",
            "adopt",
            HypervisorError::unavailable("injected: the VMM's socket does not answer"),
        );
        let h = if remove_orphans {
            Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await
        } else {
            Harness::start_reporting_orphans(Arc::clone(&double), Arc::clone(&store)).await
        };
        let i = info(&h, "wedged").await;
        assert_eq!(st(i.state), S::VM_STATE_FAILED, "{}", i.state_reason);
        assert_eq!(shown_pid(&i), None);
        let fate = if remove_orphans {
            "was ended"
        } else {
            "was left running (orphans are only reported)"
        };
        assert!(
            i.state_reason.starts_with(&format!(
                "its VMM (pid {stuck}) could not be adopted when VMCP started and {fate}: "
            )) && i.state_reason.contains("does not answer"),
            "{}",
            i.state_reason
        );
        assert_eq!(double.is_alive(stuck), !remove_orphans);
        if remove_orphans {
            // Booting gives it one VMM, a fresh one; deleting it leaves none.
            h.client(Wire::ConnectProto)
                .boot_vm(pb::BootVmRequest {
                    vm_id: "wedged".into(),
                    ..Default::default()
                })
                .await
                .expect("boot");
            let fresh = double.pid_of("wedged").expect("a new VMM");
            assert_ne!(fresh, stuck);
            double.assert_one_vmm_per_vm();
            h.client(Wire::ConnectProto)
                .delete_vm(pb::DeleteVmRequest {
                    vm_id: "wedged".into(),
                    ..Default::default()
                })
                .await
                .expect("delete");
            assert_eq!(double.vmm_count(), 0, "{:?}", double.live_pids());
        } else {
            double.kill_pid(stuck);
        }
        h.stop().await;
    }
}

const VMS: u64 = 6;

/// One random API call; every outcome is allowed, the invariants are checked after.
async fn random_call<St: VmStore>(h: &Harness<St>, rng: &mut Rng) {
    let c = h.client(Wire::ConnectProto);
    let id = format!("vm{}", rng.below(VMS));
    let _ = match rng.below(8) {
        0 | 1 => c.create_vm(create_req(&id)).await.map(drop),
        2 => c
            .boot_vm(pb::BootVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        3 => c
            .shutdown_vm(pb::ShutdownVmRequest {
                vm_id: id,
                force: rng.below(2) == 0,
                timeout_seconds: 1,
                ..Default::default()
            })
            .await
            .map(drop),
        4 => c
            .pause_vm(pb::PauseVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        5 => c
            .resume_vm(pb::ResumeVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        6 => c
            .reboot_vm(pb::RebootVmRequest {
                vm_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        _ => c
            .delete_vm(pb::DeleteVmRequest {
                vm_id: id,
                force: rng.below(2) == 0,
                ..Default::default()
            })
            .await
            .map(drop),
    };
}

/// Something the host does on its own, or a fault for the next call.
fn random_host_event(d: &Double, rng: &mut Rng) {
    let id = format!("vm{}", rng.below(VMS));
    match rng.below(6) {
        0 => {
            d.kill(&id);
        }
        1 => {
            d.guest_poweroff(&id);
        }
        2 => {
            d.pause_directly(&id);
        }
        3 => d.fail_respawn(&id),
        4 => d.fail_next(
            &id,
            ["boot", "shutdown", "pause", "resume", "reboot", "delete"][rng.below(6) as usize],
            HypervisorError::unavailable("injected: the VMM socket refused"),
        ),
        _ => d.fail_next(
            &id,
            "sample",
            HypervisorError::unavailable("injected: the VMM socket refused"),
        ),
    }
}

/// Every VM VMCP lists shows the state and pid its VMM has; every live VMM
/// belongs to a listed VM; no VM has two VMMs.
async fn check<St: VmStore>(h: &Harness<St>, d: &Double, when: &str) {
    d.assert_one_vmm_per_vm();
    let c = h.client(Wire::ConnectProto);
    let listed: BTreeSet<String> = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned()
        .vms
        .into_iter()
        .map(|v| v.vm_id)
        .collect();
    for (vm, pids) in d.live_pids() {
        assert!(
            listed.contains(vm.as_str()),
            "{when}: VMM {pids:?} of {vm} belongs to no VM VMCP lists ({listed:?})"
        );
    }
    for id in &listed {
        // Events reach the owner asynchronously, and a change nothing reports (a pause made
        // on a Firecracker socket) is seen by the next sample: allow one sample period.
        let agreed = eventually(Duration::from_secs(7), || async {
            let i = info(h, id).await;
            let state = st(i.state);
            match (d.state_of(id), d.pid_of(id)) {
                (Some(vmm_state), Some(pid)) => {
                    let want = match vmm_state {
                        vmcp::domain::VmState::Created => S::VM_STATE_CREATED,
                        vmcp::domain::VmState::Running => S::VM_STATE_RUNNING,
                        vmcp::domain::VmState::Paused => S::VM_STATE_PAUSED,
                        vmcp::domain::VmState::Shutdown => S::VM_STATE_SHUTDOWN,
                        vmcp::domain::VmState::Failed => S::VM_STATE_FAILED,
                    };
                    state == want && shown_pid(&i) == Some(pid)
                }
                _ => {
                    matches!(state, S::VM_STATE_SHUTDOWN | S::VM_STATE_FAILED)
                        && shown_pid(&i).is_none()
                }
            }
        })
        .await;
        if !agreed {
            let i = info(h, id).await;
            panic!(
                "{when}: {id} reads {:?} pid {:?} ({}), the VMM {:?} pid {:?}",
                st(i.state),
                shown_pid(&i),
                i.state_reason,
                d.state_of(id),
                d.pid_of(id)
            );
        }
    }
}

/// The server's policies for a run: the seed's (restart policy never), or
/// every VM restarted by `always` with a short backoff.
fn policies(always: bool) -> Security {
    let mut s = Security::open();
    if always {
        s.restart = RestartSettings {
            default_policy: RestartPolicy::Always,
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(50),
            limit: 4,
            window: Duration::from_secs(2),
        };
    }
    s
}

async fn random_run<St: VmStore>(
    make: fn() -> Double,
    name: &str,
    always: bool,
    open: impl Fn() -> Arc<St>,
) {
    let mut rng = Rng::from_env(name);
    let mut double = Arc::new(make());
    let start = |d: &Arc<Double>| Harness::start_on(Arc::clone(d), open(), policies(always));
    let mut h = start(&double).await;
    for round in 0..6 {
        for _ in 0..25 {
            if rng.below(4) == 0 {
                random_host_event(&double, &mut rng);
            }
            // Two calls at once: on one VM they serialize, on two they overlap.
            let (mut a, mut b) = (rng.fork(), rng.fork());
            tokio::join!(random_call(&h, &mut a), random_call(&h, &mut b));
        }
        double.reset();
        check(&h, &double, &format!("round {round}, before the restart")).await;
        h.stop().await;
        if always && rng.below(3) == 0 {
            // The host reboots while VMCP is down: every VMM and runtime directory goes.
            double.host_reboot();
        }
        double = Arc::new(double.restarted());
        h = start(&double).await;
        check(&h, &double, &format!("round {round}, after the restart")).await;
    }
    let c = h.client(Wire::ConnectProto);
    for i in 0..VMS {
        let _ = c
            .delete_vm(pb::DeleteVmRequest {
                vm_id: format!("vm{i}"),
                ..Default::default()
            })
            .await;
    }
    assert_eq!(
        double.vmm_count(),
        0,
        "deleting every VM leaves no VMM: {:?}",
        double.live_pids()
    );
    let records = h.store.load_all().await.expect("records");
    assert!(records.is_empty(), "no record left: {records:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_faults_and_restarts_keep_every_vm_accounted_for_ch() {
    random_run(
        Double::new,
        "random_operations_faults_and_restarts_keep_every_vm_accounted_for_ch",
        false,
        memory(),
    )
    .await;
}

/// The same under restart policy `always` (crashes, poweroffs and host
/// reboots bring VMs back on their own, racing the callers' operations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_with_policy_always_and_host_reboots_keep_every_vm_accounted_for() {
    random_run(
        Double::new,
        "random_operations_with_policy_always_and_host_reboots_keep_every_vm_accounted_for",
        true,
        memory(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_faults_and_restarts_keep_every_vm_accounted_for_fc() {
    random_run(
        Double::firecracker,
        "random_operations_faults_and_restarts_keep_every_vm_accounted_for_fc",
        false,
        memory(),
    )
    .await;
}

/// Recovery from what production keeps: the records in SQLite, reopened from
/// disk at every restart, under both policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_faults_and_restarts_keep_every_vm_accounted_for_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    random_run(
        Double::new,
        "random_operations_faults_and_restarts_keep_every_vm_accounted_for_on_sqlite",
        false,
        sqlite(&dir),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_with_policy_always_and_host_reboots_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    random_run(
        Double::firecracker,
        "random_operations_with_policy_always_and_host_reboots_on_sqlite",
        true,
        sqlite(&dir),
    )
    .await;
}
