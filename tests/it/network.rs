//! Managed networking over the test double and the in-memory host network:
//! a VM that names only a bridge gets the tap VMCP derives, shown by
//! GetVmInfo, present while the VM exists and gone after its delete or a
//! failed create; the host default bridge; every refusal with its code and
//! field (bad bridge names, a missing bridge, a tap another VM uses, a tap
//! in VMCP's own name space); and start-up (orphan taps swept, a vanished
//! tap recreated). The same paths against the real kernel and real VMMs
//! are in `real_net`.

use std::sync::Arc;

use connectrpc::ErrorCode;
use vmcp::adapters::outbound::network::memory::MemoryNetwork;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::network::Networking;
use vmcp::app::security::Security;
use vmcp::domain::network::{generated_mac, tap_name};
use vmcp::ports::{HostNetwork, HypervisorError};
use vmcp::proto::vmm::v1 as pb;

use super::double::Double;
use super::harness::{Harness, Wire, config};

fn security(net: &Arc<MemoryNetwork>, default_bridge: &str) -> Security {
    Security {
        network: Some(Networking {
            host: Arc::clone(net) as _,
            default_bridge: default_bridge.to_owned(),
            vmm_uid: None,
        }),
        ..Security::open()
    }
}

async fn serve(
    double: &Arc<Double>,
    store: &Arc<MemoryStore>,
    net: &Arc<MemoryNetwork>,
) -> Harness {
    Harness::start_with_security(Arc::clone(double), Arc::clone(store), security(net, "")).await
}

fn nic(id: &str, tap: &str, bridge: &str) -> pb::NetworkInterface {
    pb::NetworkInterface {
        id: id.into(),
        tap_device: tap.into(),
        bridge: bridge.into(),
        ..Default::default()
    }
}

fn create(id: &str, nics: Vec<pb::NetworkInterface>) -> pb::CreateVmRequest {
    let mut cfg = config();
    cfg.network = nics;
    pb::CreateVmRequest {
        vm_id: id.into(),
        config: cfg.into(),
        ..Default::default()
    }
}

async fn nics_of(h: &Harness, id: &str) -> Vec<pb::NetworkInterface> {
    h.client(Wire::ConnectProto)
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("info")
        .into_owned()
        .config
        .into_option()
        .expect("config")
        .network
}

/// DeleteVm with `force`, which must succeed.
async fn force_delete(
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    id: &str,
) {
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
}

fn refusal(r: Result<impl std::fmt::Debug, connectrpc::ConnectError>) -> (ErrorCode, String) {
    let e = r.expect_err("refused");
    (e.code, e.message.unwrap_or_default())
}

#[tokio::test]
async fn a_vm_naming_only_a_bridge_gets_its_tap_for_as_long_as_it_exists() {
    let (double, store) = (Arc::new(Double::new()), Arc::new(MemoryStore::new()));
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = serve(&double, &store, &net).await;
    let c = h.client(Wire::ConnectProto);
    let req = create(
        "web",
        vec![nic("eth0", "", "br0"), nic("eth1", "mytap", "")],
    );
    c.create_vm(req.clone()).await.expect("create");

    let tap = tap_name("web", 0);
    let nics = nics_of(&h, "web").await;
    assert_eq!(
        nics[0].tap_device, tap,
        "GetVmInfo shows the tap VMCP chose"
    );
    assert_eq!(nics[0].bridge, "br0");
    assert_eq!(nics[0].mac_address, generated_mac("web", "eth0"));
    assert_eq!(
        (nics[1].tap_device.as_str(), nics[1].bridge.as_str()),
        ("mytap", "")
    );
    assert_eq!(
        net.taps().keys().cloned().collect::<Vec<_>>(),
        vec![tap.clone()]
    );
    assert_eq!(net.taps()[&tap].bridge, "br0");
    assert_eq!(net.taps()[&tap].queue_pairs, 1);

    // A retry is the same VM; so is the config GetVmInfo showed, sent back.
    c.create_vm(req).await.expect("retry is idempotent");
    let mut shown = config();
    shown.network = nics;
    c.create_vm(pb::CreateVmRequest {
        vm_id: "web".into(),
        config: shown.into(),
        ..Default::default()
    })
    .await
    .expect("the config read back is the same config");
    assert_eq!(net.created(), 1, "one tap, made once");

    // Boot and shutdown keep it; delete removes it (the caller's tap is not VMCP's to touch).
    c.boot_vm(pb::BootVmRequest {
        vm_id: "web".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    assert!(net.taps().contains_key(&tap));
    force_delete(&c, "web").await;
    assert!(net.taps().is_empty(), "{:?}", net.taps());
    h.stop().await;
}

#[tokio::test]
async fn the_host_default_bridge_stands_in_for_a_missing_tap_and_bridge() {
    let net = Arc::new(MemoryNetwork::with_bridges(&["br-default"]));
    let h = Harness::start_secured(security(&net, "br-default")).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create("a", vec![nic("eth0", "", "")]))
        .await
        .expect("create");
    let nics = nics_of(&h, "a").await;
    assert_eq!(nics[0].bridge, "br-default");
    assert_eq!(net.taps()[&tap_name("a", 0)].bridge, "br-default");
    h.stop().await;

    // Without a default, an interface must name one or the other.
    let h = Harness::start_secured(security(&net, "")).await;
    let (code, msg) = refusal(
        h.client(Wire::ConnectProto)
            .create_vm(create("b", vec![nic("eth0", "", "")]))
            .await,
    );
    assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
    assert!(
        msg.contains("config.network[0].tap_device") && msg.contains("bridge"),
        "{msg}"
    );
    h.stop().await;
}

#[tokio::test]
async fn bad_bridges_and_taps_are_refused_naming_the_field_and_leave_nothing() {
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = Harness::start_secured(security(&net, "")).await;
    let c = h.client(Wire::ConnectProto);
    for bad in [
        "br 0",
        "bridge-name-too-long",
        "../br",
        "br/0",
        ".",
        "br\u{e9}",
    ] {
        let (code, msg) = refusal(c.create_vm(create("x", vec![nic("eth0", "", bad)])).await);
        assert_eq!(code, ErrorCode::InvalidArgument, "{bad:?}: {msg}");
        assert!(msg.contains("config.network[0].bridge"), "{bad:?}: {msg}");
    }
    // A tap and a bridge that disagree, and a caller's tap in VMCP's name space.
    for (tap, bridge) in [("tap0", "br0"), ("vmcpmine", "")] {
        let (code, msg) = refusal(
            c.create_vm(create("x", vec![nic("eth0", tap, bridge)]))
                .await,
        );
        assert_eq!(code, ErrorCode::InvalidArgument, "{msg}");
        assert!(msg.contains("config.network[0].tap_device"), "{msg}");
    }
    // A bridge the host lacks: the host's state, not the request's form.
    let (code, msg) = refusal(
        c.create_vm(create("x", vec![nic("eth0", "", "br-none")]))
            .await,
    );
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("config.network[0].bridge") && msg.contains("br-none"),
        "{msg}"
    );
    assert!(net.taps().is_empty(), "{:?}", net.taps());
    let listed = c
        .list_vms(pb::ListVmsRequest::default())
        .await
        .expect("list");
    assert!(listed.into_owned().vms.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_tap_another_vm_uses_is_refused_naming_it_and_the_vm() {
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = Harness::start_secured(security(&net, "")).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create("first", vec![nic("eth0", "tap0", "")]))
        .await
        .expect("create");
    let (code, msg) = refusal(
        c.create_vm(create(
            "second",
            vec![nic("eth0", "tap9", ""), nic("eth1", "tap0", "")],
        ))
        .await,
    );
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    assert!(msg.contains("config.network[1].tap_device"), "{msg}");
    assert!(msg.contains("tap0") && msg.contains("first"), "{msg}");
    // Once the first VM is gone, the tap is free again.
    force_delete(&c, "first").await;
    c.create_vm(create("second", vec![nic("eth0", "tap0", "")]))
        .await
        .expect("create");
    h.stop().await;
}

#[tokio::test]
async fn a_failed_create_removes_the_tap_it_made() {
    let double = Arc::new(Double::new());
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = serve(&double, &Arc::new(MemoryStore::new()), &net).await;
    double.fail(
        "create",
        HypervisorError::Protocol("the VMM would not start".into()),
    );
    let r = h
        .client(Wire::ConnectProto)
        .create_vm(create("x", vec![nic("eth0", "", "br0")]))
        .await;
    assert!(r.is_err());
    assert_eq!(net.created(), 1, "the tap was made before the VMM");
    assert!(
        net.taps().is_empty(),
        "and removed with the failed create: {:?}",
        net.taps()
    );
    h.stop().await;
}

#[tokio::test]
async fn without_managed_networking_a_bridge_is_refused() {
    let h = Harness::start().await;
    let (code, msg) = refusal(
        h.client(Wire::ConnectProto)
            .create_vm(create("x", vec![nic("eth0", "", "br0")]))
            .await,
    );
    assert_eq!(code, ErrorCode::FailedPrecondition, "{msg}");
    assert!(msg.contains("config.network[0].bridge"), "{msg}");
    h.stop().await;
}

#[tokio::test]
async fn start_up_sweeps_orphan_taps_and_recreates_a_vanished_one() {
    let (double, store) = (Arc::new(Double::new()), Arc::new(MemoryStore::new()));
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = serve(&double, &store, &net).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create("kept", vec![nic("eth0", "", "br0")]))
        .await
        .expect("create");
    h.stop().await;

    let kept = tap_name("kept", 0);
    let orphan = tap_name("gone-while-down", 0);
    net.add_tap(&orphan, "br0");
    net.add_foreign("vmcp0"); // VMCP's prefix, not VMCP's shape: not ours to remove
    net.add_tap("tap-user", "br0"); // not VMCP's prefix at all
    net.vanish(&kept);

    let h = serve(&double, &store, &net).await;
    let taps = net.taps();
    assert!(
        !taps.contains_key(&orphan),
        "the orphan is removed: {taps:?}"
    );
    assert!(
        taps.contains_key(&kept),
        "the vanished tap is back: {taps:?}"
    );
    assert!(taps.contains_key("tap-user"));
    assert!(net.list_taps("vmcp").unwrap().contains(&"vmcp0".to_owned()));
    h.stop().await;
}

#[tokio::test]
async fn a_restored_clone_gets_its_own_tap_unless_an_override_names_one() {
    let dir = tempfile::tempdir().expect("dir");
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let mut sec = security(&net, "");
    sec.snapshots = Some(super::harness::snapshot_settings(dir.path()));
    let h = Harness::start_secured(sec).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create("src", vec![nic("eth0", "", "br0")]))
        .await
        .expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "src".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    c.snapshot_vm(pb::SnapshotVmRequest {
        vm_id: "src".into(),
        snapshot_id: "s1".into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("snapshot");
    c.restore_vm(pb::RestoreVmRequest {
        vm_id: "clone".into(),
        snapshot_id: "s1".into(),
        resume: true,
        ..Default::default()
    })
    .await
    .expect("restore");
    let nics = nics_of(&h, "clone").await;
    assert_eq!(nics[0].tap_device, tap_name("clone", 0), "its own tap");
    assert_eq!(nics[0].bridge, "br0");
    assert_eq!(net.taps()[&tap_name("clone", 0)].bridge, "br0");
    assert!(
        net.taps().contains_key(&tap_name("src", 0)),
        "the source keeps its own"
    );

    c.restore_vm(pb::RestoreVmRequest {
        vm_id: "clone2".into(),
        snapshot_id: "s1".into(),
        resume: true,
        network_overrides: vec![pb::NetworkOverride {
            interface_id: "eth0".into(),
            tap_device: "mytap".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .await
    .expect("restore with an override");
    let nics = nics_of(&h, "clone2").await;
    assert_eq!(
        (nics[0].tap_device.as_str(), nics[0].bridge.as_str()),
        ("mytap", "")
    );
    assert_eq!(
        net.taps().len(),
        2,
        "no tap made for the override: {:?}",
        net.taps()
    );
    for id in ["src", "clone", "clone2"] {
        force_delete(&c, id).await;
    }
    assert!(net.taps().is_empty(), "{:?}", net.taps());
    h.stop().await;
}

#[tokio::test]
async fn a_guest_address_is_kept_and_a_bad_one_refused_naming_its_field() {
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = Harness::start_secured(security(&net, "")).await;
    let c = h.client(Wire::ConnectProto);
    let addressed = |address: &str| {
        let mut n = nic("eth0", "", "br0");
        n.guest_address = pb::GuestAddress {
            address: address.into(),
            gateway: "10.0.0.1".into(),
            dns: vec!["10.0.0.53".into()],
            ..Default::default()
        }
        .into();
        n
    };
    c.create_vm(create("ip", vec![addressed("10.0.0.2/24")]))
        .await
        .expect("create");
    let nics = nics_of(&h, "ip").await;
    let g = nics[0].guest_address.as_option().expect("kept");
    assert_eq!(
        (g.address.as_str(), g.gateway.as_str()),
        ("10.0.0.2/24", "10.0.0.1")
    );
    assert_eq!(g.dns, vec!["10.0.0.53".to_owned()]);
    for (bad, field) in [
        ("fd00::2/64", "address"),
        ("10.0.0.2", "address"),
        ("10.9.0.2/24", "gateway"),
    ] {
        let (code, msg) = refusal(c.create_vm(create("bad", vec![addressed(bad)])).await);
        assert_eq!(code, ErrorCode::InvalidArgument, "{bad}: {msg}");
        assert!(
            msg.contains(&format!("config.network[0].guest_address.{field}")),
            "{bad}: {msg}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn boot_recreates_a_vanished_tap_and_keeps_one_made_before_a_resize() {
    let net = Arc::new(MemoryNetwork::with_bridges(&["br0"]));
    let h = Harness::start_secured(security(&net, "")).await;
    let c = h.client(Wire::ConnectProto);
    let mut req = create("grow", vec![nic("eth0", "", "br0")]);
    req.config
        .get_or_insert_default()
        .cpu
        .get_or_insert_default()
        .max_vcpu_count = 2;
    c.create_vm(req).await.expect("create");
    let tap = tap_name("grow", 0);
    assert_eq!(net.taps()[&tap].queue_pairs, 1, "one vCPU: single-queue");
    let boot = || {
        c.boot_vm(pb::BootVmRequest {
            vm_id: "grow".into(),
            ..Default::default()
        })
    };
    let shutdown = || {
        c.shutdown_vm(pb::ShutdownVmRequest {
            vm_id: "grow".into(),
            force: true,
            ..Default::default()
        })
    };
    boot().await.expect("boot");
    c.resize_vm(pb::ResizeVmRequest {
        vm_id: "grow".into(),
        vcpu_count: 2,
        ..Default::default()
    })
    .await
    .expect("resize");
    shutdown().await.expect("shutdown");
    // The tap made for one vCPU stays: the boot neither refuses it nor replaces it.
    boot().await.expect("boot after a resize");
    assert_eq!(net.taps()[&tap].queue_pairs, 1);
    assert_eq!(net.created(), 1);
    // A tap removed behind VMCP's back is made again before the VMM starts.
    shutdown().await.expect("shutdown");
    net.vanish(&tap);
    boot().await.expect("boot recreates the tap");
    assert_eq!(net.taps()[&tap].bridge, "br0");
    assert_eq!(net.created(), 2);
    h.stop().await;
}
