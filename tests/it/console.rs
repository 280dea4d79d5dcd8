//! The console and resize RPCs over the test double: console output read by
//! offset and followed on every protocol (a new VMM starts it over, a delete
//! ends the stream, a shutdown ends it with where to resume), console input
//! refused with the backend's reason, and ResizeVm within the ceilings with
//! every refusal, the size the VMM reports in the answer, GetVmInfo, the
//! store and WatchVms, and a resize cut off by a crash converging at start.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use connectrpc::ErrorCode;
use tokio::sync::mpsc;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::domain::VmSize;
use vmcp::ports::{HypervisorError, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::double::{BOOT_MARKER, Double};
use super::harness::{ALL_WIRES, Harness, Wire, client_for, create_req, eventually};

const MIB: i64 = 1 << 20;

/// A VM with a console and room to grow: 1 → 4 vCPUs, 128 → 512 MiB.
pub fn create(id: &str) -> pb::CreateVmRequest {
    let mut req = create_req(id);
    let c = req.config.as_option_mut().expect("config");
    c.console = pb::ConsoleConfig {
        enabled: true,
        ..Default::default()
    }
    .into();
    c.cpu.as_option_mut().expect("cpu").max_vcpu_count = 4;
    let m = c.memory.as_option_mut().expect("memory");
    m.size_bytes = 128 * MIB;
    m.hotplug_enabled = true;
    m.max_size_bytes = 512 * MIB;
    req
}

pub async fn create_and_boot(h: &Harness, id: &str) {
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create(id)).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot");
}

async fn output(
    h: &Harness,
    wire: Wire,
    id: &str,
    offset: u64,
    max_bytes: u32,
) -> Result<pb::GetConsoleOutputResponse, connectrpc::ConnectError> {
    h.client(wire)
        .get_console_output(pb::GetConsoleOutputRequest {
            vm_id: id.into(),
            offset,
            max_bytes,
            ..Default::default()
        })
        .await
        .map(|r| r.into_owned())
}

async fn resize(
    h: &Harness,
    id: &str,
    vcpu_count: i32,
    memory_bytes: i64,
) -> Result<pb::ResizeVmResponse, connectrpc::ConnectError> {
    h.client(Wire::ConnectJson)
        .resize_vm(pb::ResizeVmRequest {
            vm_id: id.into(),
            vcpu_count,
            memory_bytes,
            ..Default::default()
        })
        .await
        .map(|r| r.into_owned())
}

type Chunk = Result<pb::StreamConsoleResponse, connectrpc::ConnectError>;

/// StreamConsole in a task; `None` on the channel is the stream's clean end.
fn stream(
    h: &Harness,
    wire: Wire,
    id: &str,
    offset: u64,
) -> mpsc::UnboundedReceiver<Option<Chunk>> {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = client_for(h.addr, wire);
    let req = pb::StreamConsoleRequest {
        vm_id: id.into(),
        offset,
        ..Default::default()
    };
    tokio::spawn(async move {
        match client.stream_console(req).await {
            Err(e) => drop(tx.send(Some(Err(e)))),
            Ok(mut s) => loop {
                match s.message().await {
                    Ok(Some(m)) => {
                        if tx.send(Some(Ok(m.to_owned_message()))).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return drop(tx.send(None)),
                    Err(e) => return drop(tx.send(Some(Err(e)))),
                }
            },
        }
    });
    rx
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Option<Chunk>>) -> Option<Chunk> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message within 5 s")
        .expect("the stream task answers")
}

#[tokio::test]
async fn console_output_is_read_by_offset_on_every_protocol() {
    let h = Harness::start().await;
    create_and_boot(&h, "talk").await;
    h.double.guest_prints("talk", "hello\n");
    let all = format!("{BOOT_MARKER}hello\n");
    for wire in ALL_WIRES {
        let r = output(&h, wire, "talk", 0, 0).await.expect("read");
        assert_eq!(r.data, all.as_bytes(), "{wire:?}");
        assert_eq!((r.offset, r.next_offset), (0, all.len() as u64), "{wire:?}");
        // max_bytes bounds the answer; next_offset says where to go on.
        let r = output(&h, wire, "talk", 3, 4).await.expect("read");
        assert_eq!(r.data, &all.as_bytes()[3..7], "{wire:?}");
        assert_eq!((r.offset, r.next_offset), (3, 7));
    }
    // At the end: nothing, and the same offset to read from next.
    let end = all.len() as u64;
    let r = output(&h, Wire::ConnectJson, "talk", end, 0)
        .await
        .expect("read");
    assert!(r.data.is_empty());
    assert_eq!(r.next_offset, end);
    h.stop().await;
}

#[tokio::test]
async fn a_new_vmm_starts_the_console_over_and_a_reader_sees_it() {
    let h = Harness::start().await;
    create_and_boot(&h, "again").await;
    h.double
        .guest_prints("again", "a long line the first VMM printed\n");
    let end = output(&h, Wire::ConnectProto, "again", 0, 0)
        .await
        .expect("read")
        .next_offset;
    // The guest powers off (the VMM exits 0); the next boot is a new VMM.
    h.double.guest_poweroff("again");
    assert!(
        eventually(Duration::from_secs(5), || async {
            h.info("again").await.state.as_known() == Some(S::VM_STATE_SHUTDOWN)
        })
        .await
    );
    h.client(Wire::ConnectProto)
        .boot_vm(pb::BootVmRequest {
            vm_id: "again".into(),
            ..Default::default()
        })
        .await
        .expect("boot");
    let r = output(&h, Wire::ConnectProto, "again", end, 0)
        .await
        .expect("read");
    assert!(r.data.is_empty());
    assert!(
        r.next_offset < end,
        "below the offset asked for: start over"
    );
    let r = output(&h, Wire::ConnectProto, "again", 0, 0)
        .await
        .expect("read");
    assert_eq!(r.data, BOOT_MARKER.as_bytes());
    h.stop().await;
}

#[tokio::test]
async fn stream_console_follows_starts_over_with_a_new_vmm_and_ends_with_the_vm() {
    for wire in ALL_WIRES {
        let h = Harness::start().await;
        create_and_boot(&h, "tail").await;
        let mut rx = stream(&h, wire, "tail", 0);
        let m = next(&mut rx).await.expect("a message").expect("ok");
        assert_eq!(m.data, BOOT_MARKER.as_bytes(), "{wire:?}");
        assert_eq!((m.offset, m.next_offset), (0, BOOT_MARKER.len() as u64));

        h.double.guest_prints("tail", "line 2\n");
        let m = next(&mut rx).await.expect("a message").expect("ok");
        assert_eq!(m.data, b"line 2\n", "{wire:?}: only what is new");
        assert_eq!(m.offset, BOOT_MARKER.len() as u64);

        // A reboot on the double's Cloud Hypervisor truncates the console, and a
        // Firecracker-like new VMM would too: the stream goes on from 0.
        h.client(Wire::ConnectProto)
            .reboot_vm(pb::RebootVmRequest {
                vm_id: "tail".into(),
                ..Default::default()
            })
            .await
            .expect("reboot");
        let m = next(&mut rx).await.expect("a message").expect("ok");
        assert_eq!(
            (m.offset, m.data.as_slice()),
            (0, BOOT_MARKER.as_bytes()),
            "{wire:?}"
        );

        h.client(Wire::ConnectProto)
            .delete_vm(pb::DeleteVmRequest {
                vm_id: "tail".into(),
                ..Default::default()
            })
            .await
            .expect("delete");
        assert!(next(&mut rx).await.is_none(), "{wire:?}: a clean end");
        h.stop().await;
    }
}

#[tokio::test]
async fn stream_console_is_ended_by_a_shutdown_with_the_offset_to_resume_from() {
    let h = Harness::start().await;
    create_and_boot(&h, "bye").await;
    let mut rx = stream(&h, Wire::Grpc, "bye", 0);
    next(&mut rx).await.expect("a message").expect("the marker");
    h.stop().await;
    let e = next(&mut rx)
        .await
        .expect("an error, not a clean end")
        .expect_err("unavailable");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let resume = format!("offset {}", BOOT_MARKER.len());
    assert!(
        e.message.as_deref().unwrap_or_default().contains(&resume),
        "{e:?}"
    );
}

#[tokio::test]
async fn console_refusals_say_why() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    // No console: nothing to read or follow.
    c.create_vm(create_req("mute")).await.expect("create");
    let e = output(&h, Wire::ConnectJson, "mute", 0, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("console.enabled"),
        "{e:?}"
    );
    let mut rx = stream(&h, Wire::ConnectJson, "mute", 0);
    let e = next(&mut rx).await.expect("an answer").unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    // Unknown and malformed ids.
    let e = output(&h, Wire::ConnectJson, "nobody", 0, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = output(&h, Wire::ConnectJson, "../etc", 0, 0)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.as_deref().unwrap_or_default().contains("vm_id"),
        "{e:?}"
    );
    // Console input: refused with the backend's reason; too much is refused first.
    create_and_boot(&h, "deaf").await;
    let write = |data: Vec<u8>| {
        let c = h.client(Wire::ConnectJson);
        async move {
            c.write_console(pb::WriteConsoleRequest {
                vm_id: "deaf".into(),
                data,
                ..Default::default()
            })
            .await
            .map(|r| r.into_owned())
        }
    };
    let e = write(b"ls\n".to_vec()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("cloudhypervisor"),
        "{e:?}"
    );
    let e = write(vec![b'x'; 16 * 1024 + 1]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(
        e.message.as_deref().unwrap_or_default().starts_with("data"),
        "{e:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn resize_answers_the_size_the_vmm_reports_everywhere() {
    let h = Harness::start().await;
    create_and_boot(&h, "grow").await;
    let mut watch = h
        .client(Wire::ConnectProto)
        .watch_vms(pb::WatchVmsRequest {
            vm_ids: vec!["grow".into()],
            send_initial: true,
            ..Default::default()
        })
        .await
        .expect("watch");
    let r = resize(&h, "grow", 3, 384 * MIB).await.expect("resize");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    let cfg = r.config.as_option().expect("config");
    assert_eq!(cfg.cpu.as_option().expect("cpu").vcpu_count, 3);
    assert_eq!(
        cfg.cpu.as_option().expect("cpu").max_vcpu_count,
        4,
        "ceilings stay"
    );
    assert_eq!(
        cfg.memory.as_option().expect("memory").size_bytes,
        384 * MIB
    );
    assert_eq!(
        cfg.memory.as_option().expect("memory").max_size_bytes,
        512 * MIB
    );
    assert_eq!(
        h.double.size_of("grow"),
        Some(VmSize {
            vcpu_count: 3,
            memory_bytes: 384 * MIB
        })
    );
    let info = h.info("grow").await;
    assert_eq!(
        info.config
            .as_option()
            .expect("config")
            .cpu
            .as_option()
            .expect("cpu")
            .vcpu_count,
        3
    );
    let record = &h.store.load_all().await.expect("records")[0];
    assert_eq!(
        record.snapshot.config.size().memory_bytes,
        384 * MIB,
        "stored"
    );
    // Zero leaves a size as it is.
    let r = resize(&h, "grow", 0, 512 * MIB).await.expect("memory only");
    let cfg = r.config.as_option().expect("config");
    assert_eq!(cfg.cpu.as_option().expect("cpu").vcpu_count, 3);
    assert_eq!(
        cfg.memory.as_option().expect("memory").size_bytes,
        512 * MIB
    );
    // WatchVms reports the resizes as changes carrying the new size.
    let mut sizes = Vec::new();
    while sizes.len() < 2 {
        let m = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("not the end")
            .to_owned_message();
        if m.r#type.as_known() == Some(pb::WatchEventType::WATCH_EVENT_TYPE_CHANGED) {
            let vm = m.vm.as_option().expect("vm");
            sizes.push((vm.vcpu_count, vm.memory_size_bytes));
        }
    }
    assert_eq!(sizes, [(3, 384 * MIB), (3, 512 * MIB)]);
    h.stop().await;
}

#[tokio::test]
async fn resize_refusals_name_the_field_the_state_or_the_backend() {
    let h = Harness::start().await;
    create_and_boot(&h, "fixed").await;
    let field = |e: &connectrpc::ConnectError| e.message.clone().unwrap_or_default();
    for (vcpus, memory, name) in [
        (5, 0, "vcpu_count"),
        (-1, 0, "vcpu_count"),
        (0, 1024 * MIB, "memory_bytes"),
        (0, -MIB, "memory_bytes"),
        (0, 200 * MIB + 1, "memory_bytes"),
    ] {
        let e = resize(&h, "fixed", vcpus, memory).await.unwrap_err();
        assert_eq!(
            e.code,
            ErrorCode::InvalidArgument,
            "{vcpus} {memory}: {e:?}"
        );
        assert!(field(&e).starts_with(name), "{e:?}");
    }
    // A VM created without memory hot-plug cannot change its memory.
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("small")).await.expect("create");
    let e = resize(&h, "small", 0, 128 * MIB).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(field(&e).contains("hotplug_enabled"), "{e:?}");
    // Only a running VM is resized; the size it has is nothing to do.
    let e = resize(&h, "small", 1, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert!(field(&e).contains("Created"), "{e:?}");
    let calls = h.double.calls.load(Ordering::SeqCst);
    let r = resize(&h, "fixed", 1, 128 * MIB)
        .await
        .expect("the same size");
    assert_eq!(r.state.as_known(), Some(S::VM_STATE_RUNNING));
    assert_eq!(
        h.double.calls.load(Ordering::SeqCst),
        calls,
        "no VMM call for the same size"
    );
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "fixed".into(),
        ..Default::default()
    })
    .await
    .expect("pause");
    let e = resize(&h, "fixed", 2, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition, "{e:?}");
    assert_eq!(h.double.size_of("fixed").map(|s| s.vcpu_count), Some(1));
    let e = resize(&h, "nobody", 2, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    // The VMM's own refusal carries its words.
    c.resume_vm(pb::ResumeVmRequest {
        vm_id: "fixed".into(),
        ..Default::default()
    })
    .await
    .expect("resume");
    h.double.fail_next(
        "fixed",
        "resize",
        HypervisorError::InvalidState("vm.resize: CpuManager(VcpuPendingRemovedVcpu)".into()),
    );
    let e = resize(&h, "fixed", 2, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FailedPrecondition);
    assert!(field(&e).contains("VcpuPendingRemovedVcpu"), "{e:?}");
    h.stop().await;
}

#[tokio::test]
async fn firecracker_cannot_resize_or_take_console_input_and_says_so() {
    let double = Arc::new(Double::firecracker());
    let h = Harness::start_with(Arc::clone(&double), Arc::new(MemoryStore::new())).await;
    create_and_boot(&h, "fc").await;
    let e = resize(&h, "fc", 2, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unimplemented, "{e:?}");
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("firecracker"),
        "{e:?}"
    );
    let e = h
        .client(Wire::Grpc)
        .write_console(pb::WriteConsoleRequest {
            vm_id: "fc".into(),
            data: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unimplemented);
    assert!(
        e.message
            .as_deref()
            .unwrap_or_default()
            .contains("firecracker"),
        "{e:?}"
    );
    // The console is there all the same.
    let r = output(&h, Wire::Grpc, "fc", 0, 0).await.expect("read");
    assert_eq!(r.data, BOOT_MARKER.as_bytes());
    assert_eq!(
        h.info("fc").await.state.as_known(),
        Some(S::VM_STATE_RUNNING)
    );
    h.stop().await;
}

#[tokio::test]
async fn a_resize_whose_answer_was_lost_or_cut_off_by_a_crash_converges() {
    let store = Arc::new(MemoryStore::new());
    let double = Arc::new(Double::new());
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    create_and_boot(&h, "lost").await;
    // The VMM resized, but its answer never came: the owner reads the size back.
    double.fail_next_after_apply(
        "lost",
        "resize",
        HypervisorError::unavailable("connection reset"),
    );
    let e = resize(&h, "lost", 2, 0).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
    let cpus = |i: &pb::GetVmInfoResponse| {
        i.config
            .as_option()
            .expect("config")
            .cpu
            .as_option()
            .expect("cpu")
            .vcpu_count
    };
    assert_eq!(
        cpus(&h.info("lost").await),
        2,
        "read back after the failure"
    );
    h.stop().await;

    // VMCP is down when the VMM applies a resize it asked for (a crash between
    // the VMM's answer and the record): the record says 2 vCPUs, the VMM 3.
    let applied = VmSize {
        vcpu_count: 3,
        memory_bytes: 256 * MIB,
    };
    double.resize_directly("lost", applied);
    let h = Harness::start_with(Arc::new(double.restarted()), Arc::clone(&store)).await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            cpus(&h.info("lost").await) == 3
        })
        .await,
        "the adopted VM shows the VMM's size"
    );
    let info = h.info("lost").await;
    assert_eq!(
        info.config
            .as_option()
            .expect("config")
            .memory
            .as_option()
            .expect("memory")
            .size_bytes,
        256 * MIB
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            store.load_all().await.expect("records")[0]
                .snapshot
                .config
                .size()
                == applied
        })
        .await,
        "the record converged too"
    );
    h.stop().await;
}
