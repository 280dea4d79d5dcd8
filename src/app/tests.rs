//! Orchestration tests of the manager and owner tasks against mockall
//! doubles of the ports: ordering (intent before action), timeouts, error
//! mapping and per-VM serialization.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mockall::Sequence;
use mockall::predicate::always;

use crate::app::manager::VmManager;
use crate::domain::config::tests::valid;
use crate::domain::{VmError, VmId, VmState};
use crate::ports::hypervisor::MockHypervisor;
use crate::ports::store::MockVmStore;
use crate::ports::{
    BackendCheck, BackendKind, CreateVm, HypervisorError, NoopTelemetry, SystemClock, VmService,
    VmmProcess,
};

fn id(s: &str) -> VmId {
    VmId::parse(s).expect("valid id")
}

fn base_hypervisor() -> MockHypervisor {
    let mut h = MockHypervisor::new();
    h.expect_kind().return_const(BackendKind::CloudHypervisor);
    h.expect_check().returning(|| {
        Box::pin(async {
            Ok(BackendCheck {
                version: "test".into(),
            })
        })
    });
    h.expect_validate().returning(|_| Ok(()));
    h
}

fn process() -> VmmProcess {
    VmmProcess {
        pid: 42,
        start_time: 7,
        socket_path: "/run/vmcp/a/api.sock".into(),
    }
}

fn manager(
    h: MockHypervisor,
    s: MockVmStore,
    timeout: Duration,
) -> Arc<VmManager<MockHypervisor, MockVmStore>> {
    VmManager::new(
        Arc::new(h),
        Arc::new(s),
        Arc::new(NoopTelemetry),
        Arc::new(SystemClock),
        timeout,
    )
}

#[tokio::test]
async fn create_records_intent_before_spawning_and_the_process_after() {
    let mut seq = Sequence::new();
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|r| r.process.is_none() && r.snapshot.id.as_str() == "a")
        .returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Box::pin(async { Ok((VmState::Created, process())) }));
    s.expect_put()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|r| r.process == Some(process()))
        .returning(|_| Box::pin(async { Ok(()) }));
    let m = manager(h, s, Duration::from_secs(1));
    let snap = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect("created");
    assert_eq!(snap.state, VmState::Created);
}

#[tokio::test]
async fn a_failed_create_leaves_no_record_and_no_vmm() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put()
        .times(1)
        .returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create().returning(|_, _| {
        Box::pin(async {
            Err(HypervisorError::SpawnFailed(
                "exit status 1: bad kernel".into(),
            ))
        })
    });
    h.expect_delete()
        .times(1)
        .with(always(), mockall::predicate::eq(true))
        .returning(|_, _| Box::pin(async { Ok(()) }));
    s.expect_remove()
        .times(1)
        .returning(|_| Box::pin(async { Ok(()) }));
    let m = manager(h, s, Duration::from_secs(1));
    let err = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect_err("spawn fails");
    assert!(
        matches!(err, VmError::Unavailable(ref msg) if msg.contains("bad kernel")),
        "{err:?}"
    );
    let again = m.boot_vm(id("a")).await.expect_err("nothing registered");
    assert!(matches!(again, VmError::NotFound(_)));
}

#[tokio::test]
async fn a_store_failure_fails_the_create_before_any_vmm_starts() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put().returning(|_| {
        Box::pin(async { Err(crate::ports::StoreError::Unavailable("disk full".into())) })
    });
    h.expect_create().never();
    let m = manager(h, s, Duration::from_secs(1));
    let err = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect_err("no space");
    assert!(
        matches!(err, VmError::Unavailable(ref msg) if msg.contains("disk full")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_hung_hypervisor_is_a_deadline_and_the_state_is_re_read() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put().returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create()
        .returning(|_, _| Box::pin(async { Ok((VmState::Created, process())) }));
    h.expect_boot().returning(|_| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(VmState::Running)
        })
    });
    let infos = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&infos);
    h.expect_info().returning(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
        Box::pin(async {
            Ok(crate::ports::VmmInfo {
                state: Some(VmState::Created),
                ..Default::default()
            })
        })
    });
    let m = manager(h, s, Duration::from_millis(50));
    m.create_vm(CreateVm {
        vm_id: Some(id("a")),
        config: valid(),
    })
    .await
    .expect("created");
    let err = m.boot_vm(id("a")).await.expect_err("hangs");
    assert!(matches!(err, VmError::DeadlineExceeded(_)), "{err:?}");
    assert!(
        infos.load(Ordering::SeqCst) >= 1,
        "the VMM's state was read back after the timeout"
    );
    let page = m.list_vms(Default::default()).await.expect("list");
    assert_eq!(page.vms[0].state, VmState::Created, "no hoped-for Running");
}

#[tokio::test]
async fn an_illegal_state_answer_from_the_vmm_is_failed_precondition() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put().returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create()
        .returning(|_, _| Box::pin(async { Ok((VmState::Created, process())) }));
    h.expect_boot()
        .returning(|_| Box::pin(async { Ok(VmState::Running) }));
    h.expect_pause().returning(|_| {
        Box::pin(async { Err(HypervisorError::InvalidState("VM is not running".into())) })
    });
    h.expect_info().returning(|_| {
        Box::pin(async {
            Ok(crate::ports::VmmInfo {
                state: Some(VmState::Running),
                ..Default::default()
            })
        })
    });
    let m = manager(h, s, Duration::from_secs(1));
    m.create_vm(CreateVm {
        vm_id: Some(id("a")),
        config: valid(),
    })
    .await
    .expect("created");
    m.boot_vm(id("a")).await.expect("booted");
    let err = m.pause_vm(id("a")).await.expect_err("VMM refuses");
    assert!(
        matches!(
            err,
            VmError::FailedPrecondition {
                state: VmState::Running,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn calls_for_one_vm_are_serialized_and_other_vms_run_in_parallel() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_put().returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create()
        .returning(|_, _| Box::pin(async { Ok((VmState::Created, process())) }));
    let active = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    let max_same = Arc::new(AtomicUsize::new(0));
    let total_active = Arc::new(AtomicUsize::new(0));
    let max_total = Arc::new(AtomicUsize::new(0));
    let (a, m1, t, m2) = (
        Arc::clone(&active),
        Arc::clone(&max_same),
        Arc::clone(&total_active),
        Arc::clone(&max_total),
    );
    h.expect_reboot().returning(move |id, _| {
        let (a, m1, t, m2) = (
            Arc::clone(&a),
            Arc::clone(&m1),
            Arc::clone(&t),
            Arc::clone(&m2),
        );
        let key = id.to_string();
        Box::pin(async move {
            {
                let mut map = a.lock().expect("lock");
                let n = map.entry(key.clone()).or_default();
                *n += 1;
                m1.fetch_max(*n, Ordering::SeqCst);
            }
            let now = t.fetch_add(1, Ordering::SeqCst) + 1;
            m2.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            t.fetch_sub(1, Ordering::SeqCst);
            *a.lock().expect("lock").get_mut(&key).expect("entry") -= 1;
            Ok(VmState::Running)
        })
    });
    h.expect_boot()
        .returning(|_| Box::pin(async { Ok(VmState::Running) }));
    let m = manager(h, s, Duration::from_secs(5));
    for vm in ["a", "b"] {
        m.create_vm(CreateVm {
            vm_id: Some(id(vm)),
            config: valid(),
        })
        .await
        .expect("created");
        m.boot_vm(id(vm)).await.expect("booted");
    }
    let mut tasks = Vec::new();
    for i in 0..10 {
        let m = Arc::clone(&m);
        let vm = if i % 2 == 0 { "a" } else { "b" };
        tasks.push(tokio::spawn(
            async move { m.reboot_vm(id(vm), false).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), Ok(VmState::Running));
    }
    assert_eq!(
        max_same.load(Ordering::SeqCst),
        1,
        "never two calls on one VM at once"
    );
    assert_eq!(
        max_total.load(Ordering::SeqCst),
        2,
        "the two VMs proceeded in parallel"
    );
}

#[tokio::test]
async fn an_unusable_backend_refuses_every_vm_call_naming_what_is_missing() {
    let mut h = MockHypervisor::new();
    h.expect_kind().return_const(BackendKind::Firecracker);
    h.expect_validate().returning(|_| Ok(()));
    h.expect_check().returning(|| {
        Box::pin(async {
            Err(HypervisorError::Unavailable(
                "/dev/kvm cannot be opened: No such file or directory".into(),
            ))
        })
    });
    h.expect_create().never();
    let m = manager(h, MockVmStore::new(), Duration::from_secs(1));
    let err = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect_err("unavailable");
    let VmError::Unavailable(msg) = err else {
        panic!("expected unavailable, got {err:?}")
    };
    assert!(
        msg.contains("firecracker") && msg.contains("/dev/kvm"),
        "{msg}"
    );
    assert!(matches!(
        m.list_vms(Default::default()).await,
        Err(VmError::Unavailable(_))
    ));
}
