//! Orchestration tests of the manager and owner tasks against mockall
//! doubles of the ports: ordering (intent before action), identity recorded
//! with state, timeouts, error mapping, reads from memory and per-VM
//! serialization.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::app::manager::VmManager;
use crate::domain::config::tests::valid;
use crate::domain::{VmError, VmId, VmState};
use crate::ports::hypervisor::{MockHypervisor, MockVmmHandle};
use crate::ports::store::MockVmStore;
use crate::ports::{
    BackendCheck, BackendKind, CreateVm, HypervisorError, NoopTelemetry, Reported, SystemClock,
    VmService, VmmEvent, VmmEventSink, VmmInfo, VmmProcess,
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

fn process_with(pid: u32) -> VmmProcess {
    VmmProcess {
        pid,
        start_time: u64::from(pid) * 10,
        socket_path: "/run/vmcp/a/api.sock".into(),
    }
}

fn process() -> VmmProcess {
    process_with(42)
}

fn reported(state: VmState, pid: u32) -> Reported {
    Reported {
        state,
        reason: String::new(),
        process: Some(process_with(pid)),
    }
}

/// A handle whose process is pid 42 and whose sample reports `state`.
fn handle_reporting(state: VmState) -> MockVmmHandle {
    let mut v = MockVmmHandle::new();
    v.expect_process().return_const(Some(process()));
    v.expect_sample().returning(move || {
        Box::pin(async move {
            Ok(VmmInfo {
                state: Some(state),
                process: Some(process()),
                ..Default::default()
            })
        })
    });
    v
}

/// A handle like [`handle_reporting`] Running whose boot answers Running on pid 42.
fn booting_handle() -> MockVmmHandle {
    let mut v = handle_reporting(VmState::Running);
    v.expect_boot()
        .returning(|| Box::pin(async { Ok(reported(VmState::Running, 42)) }));
    v
}

/// `h.create` answers with the handle `make` builds, reporting Created with pid 42,
/// and hands the VM's event sink to `sinks`.
fn creates_with(
    h: &mut MockHypervisor,
    make: impl Fn() -> MockVmmHandle + Send + Sync + 'static,
    sinks: Option<Arc<std::sync::Mutex<Vec<VmmEventSink>>>>,
) {
    h.expect_create().returning(move |_, _, events| {
        if let Some(sinks) = &sinks {
            sinks.lock().expect("lock").push(events);
        }
        let vm = make();
        Box::pin(async move { Ok((vm, reported(VmState::Created, 42))) })
    });
}

/// A store that accepts every write and flush.
fn accepting_store() -> MockVmStore {
    let mut s = MockVmStore::new();
    s.expect_sync().returning(|| Box::pin(async { Ok(()) }));
    s.expect_put_unsynced()
        .returning(|_| Box::pin(async { Ok(()) }));
    s
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

async fn create(m: &VmManager<MockHypervisor, MockVmStore>, vm: &str) {
    m.create_vm(CreateVm {
        vm_id: Some(id(vm)),
        config: valid(),
    })
    .await
    .expect("created");
}

/// CreateVm commits its intent before the VMM starts, flushes it to disk
/// while the VMM starts (not after), and commits the created record, with
/// its process, before the answer, without a flush of its own.
#[tokio::test]
async fn create_records_intent_before_spawning_flushes_it_meanwhile_and_the_process_after() {
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut h = base_hypervisor();
    let l = Arc::clone(&log);
    h.expect_create().times(1).returning(move |_, _, _| {
        let vm = handle_reporting(VmState::Created);
        let l = Arc::clone(&l);
        Box::pin(async move {
            l.lock().expect("lock").push("create starts".into());
            tokio::time::sleep(Duration::from_millis(50)).await;
            l.lock().expect("lock").push("create ends".into());
            Ok((vm, reported(VmState::Created, 42)))
        })
    });
    let mut s = MockVmStore::new();
    let l = Arc::clone(&log);
    s.expect_put_unsynced().times(2).returning(move |r| {
        l.lock().expect("lock").push(format!(
            "write gen {} process {}",
            r.snapshot.generation,
            r.process.as_ref().map_or(0, |p| p.pid)
        ));
        Box::pin(async { Ok(()) })
    });
    let l = Arc::clone(&log);
    s.expect_sync().times(1).returning(move || {
        let l = Arc::clone(&l);
        Box::pin(async move {
            l.lock().expect("lock").push("sync starts".into());
            tokio::time::sleep(Duration::from_millis(20)).await;
            l.lock().expect("lock").push("sync ends".into());
            Ok(())
        })
    });
    let m = manager(h, s, Duration::from_secs(1));
    let snap = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect("created");
    assert_eq!(snap.state, VmState::Created);
    let log = log.lock().expect("lock").clone();
    let at = |what: &str| {
        log.iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("{what:?} missing from {log:?}"))
    };
    assert_eq!(at("write gen 0 process 0"), 0, "intent first: {log:?}");
    assert!(at("write gen 0 process 0") < at("create starts"), "{log:?}");
    assert!(
        at("sync starts") < at("create ends"),
        "the flush waited for the VMM: {log:?}"
    );
    assert!(at("sync ends") < at("write gen 1 process 42"), "{log:?}");
    assert_eq!(
        log.last().map(String::as_str),
        Some("write gen 1 process 42"),
        "the created record is the last write before the answer: {log:?}"
    );
}

/// A command's intent is committed before the VMM acts, and the store is
/// flushed while the VMM acts (not after it), before the answer.
#[tokio::test]
async fn a_commands_intent_is_committed_first_and_synced_during_the_action() {
    let mut h = base_hypervisor();
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let l = Arc::clone(&log);
    creates_with(
        &mut h,
        move || {
            let mut v = MockVmmHandle::new();
            v.expect_process().return_const(Some(process()));
            let l = Arc::clone(&l);
            v.expect_boot().returning(move || {
                let l = Arc::clone(&l);
                Box::pin(async move {
                    l.lock().expect("lock").push("boot starts".into());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    l.lock().expect("lock").push("boot ends".into());
                    Ok(reported(VmState::Running, 42))
                })
            });
            v.expect_sample().returning(|| {
                Box::pin(async {
                    Ok(VmmInfo {
                        state: Some(VmState::Running),
                        process: Some(process()),
                        ..Default::default()
                    })
                })
            });
            v
        },
        None,
    );
    let mut s = MockVmStore::new();
    let l = Arc::clone(&log);
    s.expect_put_unsynced().returning(move |r| {
        l.lock().expect("lock").push(format!(
            "write {:?} desired {:?}",
            r.snapshot.state, r.snapshot.desired
        ));
        Box::pin(async { Ok(()) })
    });
    let l = Arc::clone(&log);
    s.expect_sync().returning(move || {
        let l = Arc::clone(&l);
        Box::pin(async move {
            l.lock().expect("lock").push("sync starts".into());
            tokio::time::sleep(Duration::from_millis(10)).await;
            l.lock().expect("lock").push("sync ends".into());
            Ok(())
        })
    });
    let m = manager(h, s, Duration::from_secs(1));
    create(&m, "a").await;
    log.lock().expect("lock").clear();
    m.boot_vm(id("a")).await.expect("boot");
    let log = log.lock().expect("lock").clone();
    let at = |what: &str| {
        log.iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("{what:?} missing from {log:?}"))
    };
    let intent = at("write Created desired Running");
    assert!(intent < at("boot starts"), "{log:?}");
    assert!(
        at("sync starts") < at("boot ends"),
        "the flush waited for the VMM: {log:?}"
    );
    assert!(at("sync ends") < log.len(), "{log:?}");
    assert!(
        log.contains(&"write Running desired Running".to_owned()),
        "{log:?}"
    );
}

#[tokio::test]
async fn a_failed_create_leaves_no_record_and_no_vmm() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_sync().returning(|| Box::pin(async { Ok(()) }));
    s.expect_put_unsynced()
        .times(1)
        .returning(|_| Box::pin(async { Ok(()) }));
    h.expect_create().returning(|_, _, _| {
        Box::pin(async { Err(HypervisorError::spawn_failed("exit status 1: bad kernel")) })
    });
    // The backend leaves nothing behind on a failed create; nothing is discovered or destroyed.
    h.expect_discover().never();
    h.expect_destroy_orphan().never();
    s.expect_remove()
        .times(1)
        .returning(|_, _| Box::pin(async { Ok(()) }));
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
    s.expect_sync().returning(|| Box::pin(async { Ok(()) }));
    s.expect_put_unsynced().returning(|_| {
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
    // The boot hangs; by the deadline the VMM either never booted (Created:
    // no hoped-for Running) or booted all the same (Running: what it reports
    // wins over the error). Either way the VM then reads what the VMM says.
    for after in [VmState::Created, VmState::Running] {
        let mut h = base_hypervisor();
        let s = accepting_store();
        let infos = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&infos);
        creates_with(
            &mut h,
            move || {
                let vmm = Arc::new(std::sync::Mutex::new(VmState::Created));
                let mut v = MockVmmHandle::new();
                v.expect_process().return_const(Some(process()));
                let booting = Arc::clone(&vmm);
                v.expect_boot().returning(move || {
                    *booting.lock().expect("lock") = after;
                    // Never answered: the deadline is what ends the call.
                    Box::pin(std::future::pending())
                });
                let seen = Arc::clone(&seen);
                v.expect_sample().returning(move || {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let state = *vmm.lock().expect("lock");
                    Box::pin(async move {
                        Ok(VmmInfo {
                            state: Some(state),
                            process: Some(process()),
                            ..Default::default()
                        })
                    })
                });
                v
            },
            None,
        );
        let m = manager(h, s, Duration::from_millis(50));
        create(&m, "a").await;
        let before = infos.load(Ordering::SeqCst);
        let err = m.boot_vm(id("a")).await.expect_err("hangs");
        assert!(matches!(err, VmError::DeadlineExceeded(_)), "{err:?}");
        assert!(
            infos.load(Ordering::SeqCst) > before,
            "the VMM's state was read back after the timeout"
        );
        let page = m.list_vms(Default::default()).await.expect("list");
        assert_eq!(
            page.vms[0].snapshot.state, after,
            "what the VMM reports after the deadline"
        );
    }
}

#[tokio::test]
async fn an_illegal_state_answer_from_the_vmm_is_failed_precondition() {
    let mut h = base_hypervisor();
    let s = accepting_store();
    creates_with(
        &mut h,
        || {
            // Running as far as VMCP knows, until someone stops it on the VMM's own
            // socket (CH then says Created) just before VMCP's pause arrives.
            let vmm = Arc::new(std::sync::Mutex::new(VmState::Running));
            let mut v = MockVmmHandle::new();
            v.expect_process().return_const(Some(process()));
            let reads = Arc::clone(&vmm);
            v.expect_sample().returning(move || {
                let state = *reads.lock().expect("lock");
                Box::pin(async move {
                    Ok(VmmInfo {
                        state: Some(state),
                        process: Some(process()),
                        ..Default::default()
                    })
                })
            });
            v.expect_boot()
                .returning(|| Box::pin(async { Ok(reported(VmState::Running, 42)) }));
            v.expect_pause().returning(move || {
                *vmm.lock().expect("lock") = VmState::Created;
                Box::pin(async { Err(HypervisorError::InvalidState("VM is not running".into())) })
            });
            v
        },
        None,
    );
    let m = manager(h, s, Duration::from_secs(1));
    create(&m, "a").await;
    m.boot_vm(id("a")).await.expect("booted");
    let err = m.pause_vm(id("a")).await.expect_err("VMM refuses");
    // The refusal names the state the VMM reports now, which the VM then reads.
    assert!(
        matches!(
            &err,
            VmError::FailedPrecondition {
                state: VmState::Created,
                reason,
                ..
            } if reason == "VM is not running"
        ),
        "{err:?}"
    );
    let d = m.get_vm_info(id("a")).await.expect("info");
    assert_eq!(d.snapshot.state, VmState::Created);
}

#[tokio::test]
async fn calls_for_one_vm_are_serialized_and_other_vms_run_in_parallel() {
    let mut h = base_hypervisor();
    let s = accepting_store();
    let active = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        usize,
    >::new()));
    let max_same = Arc::new(AtomicUsize::new(0));
    let total_active = Arc::new(AtomicUsize::new(0));
    let max_total = Arc::new(AtomicUsize::new(0));
    // Each reboot waits, inside the VMM call, for one on the other VM: they
    // meet only if the two VMs' calls run at the same time (no sleeping for
    // an overlap that a slow machine might miss).
    let meet = Arc::new(tokio::sync::Barrier::new(2));
    let (a, m1, t, m2) = (
        Arc::clone(&active),
        Arc::clone(&max_same),
        Arc::clone(&total_active),
        Arc::clone(&max_total),
    );
    let names = Arc::new(AtomicUsize::new(0));
    creates_with(
        &mut h,
        move || {
            let key = format!("vm{}", names.fetch_add(1, Ordering::SeqCst));
            let mut v = booting_handle();
            let (a, m1, t, m2) = (
                Arc::clone(&a),
                Arc::clone(&m1),
                Arc::clone(&t),
                Arc::clone(&m2),
            );
            let meet = Arc::clone(&meet);
            v.expect_reboot().returning(move |_| {
                let (a, m1, t, m2) = (
                    Arc::clone(&a),
                    Arc::clone(&m1),
                    Arc::clone(&t),
                    Arc::clone(&m2),
                );
                let meet = Arc::clone(&meet);
                let key = key.clone();
                Box::pin(async move {
                    {
                        let mut map = a.lock().expect("lock");
                        let n = map.entry(key.clone()).or_default();
                        *n += 1;
                        m1.fetch_max(*n, Ordering::SeqCst);
                    }
                    let now = t.fetch_add(1, Ordering::SeqCst) + 1;
                    m2.fetch_max(now, Ordering::SeqCst);
                    let met = tokio::time::timeout(Duration::from_secs(2), meet.wait()).await;
                    t.fetch_sub(1, Ordering::SeqCst);
                    *a.lock().expect("lock").get_mut(&key).expect("entry") -= 1;
                    match met {
                        Ok(_) => Ok(reported(VmState::Running, 42)),
                        Err(_) => Err(HypervisorError::unavailable(
                            "no reboot of the other VM ran alongside this one",
                        )),
                    }
                })
            });
            v
        },
        None,
    );
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

/// Stopping the owners lets the operation in progress finish and answers
/// what is queued behind it `unavailable` (VMCP is stopping), not
/// `not_found`: the VM still exists, for the next start.
#[tokio::test]
async fn a_stop_finishes_the_operation_in_progress_and_refuses_the_queued_ones() {
    let mut h = base_hypervisor();
    let started = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let (st, rel) = (Arc::clone(&started), Arc::clone(&release));
    creates_with(
        &mut h,
        move || {
            let mut v = booting_handle();
            let (st, rel) = (Arc::clone(&st), Arc::clone(&rel));
            v.expect_reboot().returning(move |_| {
                let (st, rel) = (Arc::clone(&st), Arc::clone(&rel));
                Box::pin(async move {
                    st.notify_one();
                    rel.notified().await;
                    Ok(reported(VmState::Running, 43))
                })
            });
            v
        },
        None,
    );
    let m = manager(h, accepting_store(), Duration::from_secs(5));
    create(&m, "a").await;
    m.boot_vm(id("a")).await.expect("booted");
    let reboot = tokio::spawn({
        let m = Arc::clone(&m);
        async move { m.reboot_vm(id("a"), false).await }
    });
    started.notified().await;
    let pause = tokio::spawn({
        let m = Arc::clone(&m);
        async move { m.pause_vm(id("a")).await }
    });
    // Let the pause reach the owner's queue, behind the reboot.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pause.is_finished(), "the pause waits behind the reboot");
    let owners = m.owners().clone();
    let stop = tokio::spawn(async move { owners.stop().await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!stop.is_finished(), "the stop waits for the reboot");
    release.notify_one();
    assert_eq!(reboot.await.expect("task"), Ok(VmState::Running));
    let refused = pause.await.expect("task").expect_err("refused");
    assert!(
        matches!(&refused, VmError::Unavailable(m) if m.contains("stopping")),
        "{refused:?}"
    );
    stop.await.expect("stop");
    assert_eq!(m.owners().live(), 0);
    let late = m.boot_vm(id("a")).await.expect_err("after the stop");
    assert!(
        matches!(&late, VmError::Unavailable(m) if m.contains("stopping")),
        "{late:?}"
    );
}

#[tokio::test]
async fn an_unusable_backend_refuses_every_vm_call_naming_what_is_missing() {
    let mut h = MockHypervisor::new();
    h.expect_kind().return_const(BackendKind::Firecracker);
    h.expect_validate().returning(|_| Ok(()));
    h.expect_check().returning(|| {
        Box::pin(async {
            Err(HypervisorError::unavailable(
                "/dev/kvm cannot be opened: No such file or directory",
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

#[tokio::test]
async fn a_replaced_vmm_is_recorded_with_its_new_state_in_one_write() {
    let mut h = base_hypervisor();
    let mut s = MockVmStore::new();
    s.expect_sync().returning(|| Box::pin(async { Ok(()) }));
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let w = Arc::clone(&writes);
    s.expect_put_unsynced().returning(move |r| {
        w.lock().expect("lock").push(r.clone());
        Box::pin(async { Ok(()) })
    });

    creates_with(
        &mut h,
        || {
            let mut v = MockVmmHandle::new();
            // After the boot the handle serves pid 43: the respawned VMM.
            let pid = Arc::new(AtomicUsize::new(42));
            let p = Arc::clone(&pid);
            v.expect_process()
                .returning(move || Some(process_with(p.load(Ordering::SeqCst) as u32)));
            let p = Arc::clone(&pid);
            v.expect_boot().returning(move || {
                p.store(43, Ordering::SeqCst);
                Box::pin(async { Ok(reported(VmState::Running, 43)) })
            });
            let p = Arc::clone(&pid);
            v.expect_sample().returning(move || {
                let pid = p.load(Ordering::SeqCst) as u32;
                Box::pin(async move {
                    Ok(VmmInfo {
                        state: Some(VmState::Running),
                        process: Some(process_with(pid)),
                        ..Default::default()
                    })
                })
            });
            v
        },
        None,
    );
    let m = manager(h, s, Duration::from_secs(1));
    create(&m, "a").await;
    assert_eq!(m.boot_vm(id("a")).await, Ok(VmState::Running));
    let writes = writes.lock().expect("lock").clone();
    let running = writes
        .iter()
        .find(|r| r.snapshot.state == VmState::Running)
        .expect("the Running state was recorded");
    assert_eq!(
        running.process,
        Some(process_with(43)),
        "the new pid is recorded in the same write as the new state"
    );
    assert!(
        writes
            .iter()
            .all(|r| r.snapshot.state != VmState::Running || r.process == Some(process_with(43))),
        "no record pairs Running with the replaced pid: {writes:?}"
    );
}

#[tokio::test]
async fn exits_of_replaced_vmms_are_ignored_and_exits_of_the_current_one_are_recorded() {
    let mut h = base_hypervisor();
    let s = accepting_store();
    let sinks = Arc::new(std::sync::Mutex::new(Vec::new()));
    // What the VMM reports when asked; the test changes it behind VMCP's back.
    // Failed: its process is gone, which a real handle reports with no process
    // (a sample may see that before the reaper's event arrives).
    let vmm_state = Arc::new(std::sync::Mutex::new(VmState::Created));
    let shared = Arc::clone(&vmm_state);
    creates_with(
        &mut h,
        move || {
            let mut v = MockVmmHandle::new();
            v.expect_process().return_const(Some(process()));
            let shared = Arc::clone(&shared);
            v.expect_sample().returning(move || {
                let state = *shared.lock().expect("lock");
                let gone = state == VmState::Failed;
                Box::pin(async move {
                    Ok(VmmInfo {
                        state: Some(state),
                        reason: if gone {
                            "killed by signal 9".into()
                        } else {
                            String::new()
                        },
                        process: (!gone).then(process),
                        ..Default::default()
                    })
                })
            });
            v
        },
        Some(Arc::clone(&sinks)),
    );
    let m = manager(h, s, Duration::from_secs(1));
    create(&m, "a").await;
    let sink = sinks.lock().expect("lock").pop().expect("a sink");
    sink.send(VmmEvent::Exited {
        pid: 41,
        state: VmState::Failed,
        reason: "old VMM killed".into(),
    })
    .expect("owner listens");
    *vmm_state.lock().expect("lock") = VmState::Paused;
    sink.send(VmmEvent::StateChanged {
        pid: 42,
        state: VmState::Paused,
        reason: "vm/paused".into(),
    })
    .expect("owner listens");
    let paused = wait_for(&m, "a", |d| d.snapshot.state == VmState::Paused).await;
    assert_eq!(paused.snapshot.generation, 2, "one visible change");
    // A stale event (the VMM reports something else by the time the owner asks) changes nothing.
    sink.send(VmmEvent::StateChanged {
        pid: 42,
        state: VmState::Running,
        reason: "vm/resumed".into(),
    })
    .expect("owner listens");
    *vmm_state.lock().expect("lock") = VmState::Failed;
    sink.send(VmmEvent::Exited {
        pid: 42,
        state: VmState::Failed,
        reason: "killed by signal 9".into(),
    })
    .expect("owner listens");
    let failed = wait_for(&m, "a", |d| d.snapshot.state == VmState::Failed).await;
    assert_eq!(failed.snapshot.reason, "killed by signal 9");
    assert_eq!(
        failed.snapshot.generation, 3,
        "Created → Paused → Failed: the stale Running event and the old pid's exit changed nothing"
    );
}

#[tokio::test]
async fn reads_answer_from_memory_without_calling_the_vmm() {
    let mut h = base_hypervisor();
    let s = accepting_store();
    let samples = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&samples);
    creates_with(
        &mut h,
        move || {
            let mut v = MockVmmHandle::new();
            v.expect_process().return_const(Some(process()));
            let seen = Arc::clone(&seen);
            v.expect_sample().returning(move || {
                seen.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Ok(VmmInfo {
                        state: Some(VmState::Created),
                        metrics: crate::ports::VmMetrics {
                            memory_usage_bytes: 1234,
                            ..Default::default()
                        },
                        process: Some(process()),
                        ..Default::default()
                    })
                })
            });
            v
        },
        None,
    );
    let m = manager(h, s, Duration::from_secs(1));
    create(&m, "a").await;
    // The owner samples once right after the create, off the caller's path.
    let sampled = wait_for(&m, "a", |d| d.sampled_at_ms.is_some()).await;
    assert_eq!(sampled.metrics.map(|x| x.memory_usage_bytes), Some(1234));
    let after_first = samples.load(Ordering::SeqCst);
    for _ in 0..200 {
        let d = m.get_vm_info(id("a")).await.expect("info");
        assert_eq!(d.snapshot.state, VmState::Created);
        assert_eq!(
            d.backend_info.get("backend").map(String::as_str),
            Some("cloudhypervisor")
        );
        m.list_vms(Default::default()).await.expect("list");
    }
    assert_eq!(
        samples.load(Ordering::SeqCst),
        after_first,
        "200 reads made no VMM call"
    );
}

/// Polls GetVmInfo until `ok` holds (at most 2 s).
async fn wait_for(
    m: &VmManager<MockHypervisor, MockVmStore>,
    vm: &str,
    ok: impl Fn(&crate::ports::VmDetails) -> bool,
) -> Arc<crate::ports::VmDetails> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let d = m.get_vm_info(id(vm)).await.expect("info");
        if ok(&d) {
            return d;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn vm_work_is_refused_naming_descriptors_when_the_budget_is_tight() {
    use crate::app::descriptors::{DescriptorBudget, VM_OPERATION_DESCRIPTORS};
    // No create or put is expected: a refusal must happen before anything is spawned or stored.
    let m = manager(
        base_hypervisor(),
        MockVmStore::new(),
        Duration::from_secs(1),
    );
    let open = Arc::new(AtomicUsize::new(
        1000 - VM_OPERATION_DESCRIPTORS as usize + 1,
    ));
    let counted = Arc::clone(&open);
    m.set_descriptor_budget(DescriptorBudget::new(
        1000,
        200,
        Arc::new(move || Some(counted.load(Ordering::SeqCst) as u64)),
    ));
    let err = m
        .create_vm(CreateVm {
            vm_id: Some(id("a")),
            config: valid(),
        })
        .await
        .expect_err("refused");
    match &err {
        VmError::ResourceExhausted(msg) => {
            assert!(msg.contains("file descriptors"), "{msg}");
        }
        other => panic!("expected resource_exhausted, got {other:?}"),
    }
    assert_eq!(m.counts_by_state().total(), 0, "nothing half-created");
    // Commands that open descriptors are refused the same way, before the VM is looked up.
    assert!(matches!(
        m.boot_vm(id("a")).await,
        Err(VmError::ResourceExhausted(_))
    ));
    // Deleting frees descriptors, so it is not refused for lack of them.
    assert!(matches!(
        m.delete_vm(id("a"), true).await,
        Err(VmError::NotFound(_))
    ));
}

/// Firecracker clears its dirty pages whenever it writes a snapshot, so a
/// snapshot attempt clears the VM's recorded diff parent before the VMM is
/// asked (a crash mid-attempt cannot leave a parent the VMM no longer diffs
/// against), and only the committed snapshot becomes the new parent.
#[tokio::test]
async fn a_snapshot_clears_the_recorded_diff_parent_before_the_vmm_writes() {
    use crate::domain::snapshot::{SnapshotId, SnapshotKind, SnapshotLimits};
    let log: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut h = MockHypervisor::new();
    h.expect_kind().return_const(BackendKind::Firecracker);
    h.expect_check().returning(|| {
        Box::pin(async {
            Ok(BackendCheck {
                version: "test".into(),
            })
        })
    });
    h.expect_validate().returning(|_| Ok(()));
    let vmm_log = Arc::clone(&log);
    creates_with(
        &mut h,
        move || {
            let mut v = booting_handle();
            let log = Arc::clone(&vmm_log);
            v.expect_snapshot().returning(move |_, kind, _| {
                log.lock().expect("log").push(format!("vmm {kind:?}"));
                Box::pin(async { Ok(reported(VmState::Running, 42)) })
            });
            v
        },
        None,
    );
    let mut s = MockVmStore::new();
    s.expect_sync().returning(|| Box::pin(async { Ok(()) }));
    let store_log = Arc::clone(&log);
    s.expect_put_unsynced().returning(move |r| {
        let parent = r
            .diff_parent
            .as_ref()
            .map_or("-".to_owned(), |p| p.snapshot_id.to_string());
        store_log
            .lock()
            .expect("log")
            .push(format!("record parent={parent}"));
        Box::pin(async { Ok(()) })
    });
    s.expect_put_snapshot()
        .returning(|_| Box::pin(async { Ok(()) }));
    s.expect_remove_snapshot()
        .returning(|_| Box::pin(async { Ok(()) }));
    let m = manager(h, s, Duration::from_secs(1));
    let dir = tempfile::tempdir().expect("dir");
    m.set_snapshots(crate::app::manager::snapshots::SnapshotSettings {
        repo: Arc::new(
            crate::adapters::outbound::snapshots::FsSnapshots::open(dir.path()).expect("repo"),
        ),
        limits: SnapshotLimits {
            max_count: 10,
            max_bytes: 1 << 40,
        },
    });
    let mut config = valid();
    config.memory.track_dirty_pages = true;
    m.create_vm(CreateVm {
        vm_id: Some(id("a")),
        config,
    })
    .await
    .expect("created");
    m.boot_vm(id("a")).await.expect("booted");
    let sid = |s: &str| Some(SnapshotId::parse("snapshot_id", s).expect("id"));
    let taken = |s: &str, kind| m.snapshot_vm(id("a"), sid(s), true, kind);
    let e = taken("d0", SnapshotKind::Diff)
        .await
        .expect_err("no parent");
    assert!(matches!(e, VmError::Incompatible(_)), "{e:?}");
    taken("s1", SnapshotKind::Full).await.expect("s1");
    log.lock().expect("log").clear();
    let d = taken("d1", SnapshotKind::Diff).await;
    // The double's memory file does not exist: the diff cannot be made whole and is dropped.
    assert!(d.is_err(), "{d:?}");
    let log = log.lock().expect("log").clone();
    let vmm = log
        .iter()
        .position(|l| l == "vmm Diff")
        .expect("the VMM was asked for the diff");
    assert_eq!(
        log[..vmm].last().map(String::as_str),
        Some("record parent=-"),
        "the parent is cleared on record before the VMM writes: {log:?}"
    );
    // The failed diff broke the chain: the next is refused, and a full one restores it.
    let e = taken("d2", SnapshotKind::Diff).await.expect_err("refused");
    assert!(
        matches!(&e, VmError::Incompatible(m) if m.contains("previous snapshot attempt failed")),
        "{e:?}"
    );
    taken("s2", SnapshotKind::Full).await.expect("s2");
    let view = m.get_vm_info(id("a")).await.expect("info");
    assert_eq!(view.snapshot.state, VmState::Running);
}
