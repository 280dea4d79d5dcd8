//! WatchVms through real clients on every protocol: list-then-watch and
//! send_initial mirror the host exactly, a resume replays what was missed,
//! a revision older than the history is refused, a slow consumer is
//! dropped with where to resume while VM operations and other watchers go
//! on, server shutdown ends streams with a resume point, and a randomized
//! run of concurrent operations, VMM deaths and a VMCP restart leaves every
//! watcher's mirror equal to the final ListVms.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use connectrpc::{ConnectError, ErrorCode};
use tokio::sync::{mpsc, watch};

use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::feed::WatchSettings;
use vmcp::app::security::Security;
use vmcp::ports::{Telemetry, TelemetryEvent};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;
use vmcp::proto::vmm::v1::WatchEventType as T;

use super::double::Double;
use super::harness::{ALL_WIRES, Harness, Rng, Wire, client_for, create_req};

type Msg = Result<pb::WatchVmsResponse, ConnectError>;

/// Reads a watch into a channel, message by message, until it ends.
pub fn watch(
    addr: SocketAddr,
    wire: Wire,
    req: pb::WatchVmsRequest,
) -> mpsc::UnboundedReceiver<Msg> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        match client_for(addr, wire).watch_vms(req).await {
            Err(e) => {
                let _ = tx.send(Err(e));
            }
            Ok(mut s) => loop {
                // A dropped receiver ends the stream (and frees its watcher slot).
                let m = tokio::select! {
                    m = s.message() => m,
                    () = tx.closed() => return,
                };
                match m {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m.to_owned_message())).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            },
        }
    });
    rx
}

pub async fn next(rx: &mut mpsc::UnboundedReceiver<Msg>) -> Msg {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a watch message within 10 s")
        .expect("the watch is still open")
}

pub async fn next_ok(rx: &mut mpsc::UnboundedReceiver<Msg>) -> pb::WatchVmsResponse {
    next(rx).await.expect("a message, not an error")
}

pub fn kind(m: &pb::WatchVmsResponse) -> T {
    m.r#type.as_known().expect("known type")
}

pub fn vm_of(m: &pb::WatchVmsResponse) -> (&str, S) {
    let vm = m.vm.as_option().expect("a VM");
    (vm.vm_id.as_str(), vm.state.as_known().expect("known state"))
}

pub fn since(revision: u64) -> pb::WatchVmsRequest {
    pb::WatchVmsRequest {
        since_revision: revision,
        ..Default::default()
    }
}

fn initial() -> pb::WatchVmsRequest {
    pb::WatchVmsRequest {
        send_initial: true,
        ..Default::default()
    }
}

async fn list(addr: SocketAddr) -> pb::ListVmsResponse {
    client_for(addr, Wire::ConnectProto)
        .list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned()
}

fn id_req<R: Default>(set: impl FnOnce(&mut R)) -> R {
    let mut r = R::default();
    set(&mut r);
    r
}

#[tokio::test]
async fn every_protocol_streams_initial_vms_then_adds_changes_and_deletes_in_revision_order() {
    for wire in ALL_WIRES {
        let h = Harness::start().await;
        let c = h.client(wire);
        c.create_vm(create_req("a")).await.expect("create a");
        let mut w = watch(h.addr, wire, initial());
        let first = next_ok(&mut w).await;
        assert_eq!(
            (kind(&first), vm_of(&first)),
            (T::WATCH_EVENT_TYPE_ADDED, ("a", S::VM_STATE_CREATED)),
            "{wire:?}"
        );
        let synced = next_ok(&mut w).await;
        assert_eq!(kind(&synced), T::WATCH_EVENT_TYPE_SYNCED, "{wire:?}");
        assert!(synced.vm.as_option().is_none());
        assert_eq!(
            synced.revision, first.revision,
            "{wire:?}: only a's create happened"
        );

        c.create_vm(create_req("b")).await.expect("create b");
        c.boot_vm(id_req(|r: &mut pb::BootVmRequest| r.vm_id = "b".into()))
            .await
            .expect("boot b");
        c.delete_vm(id_req(|r: &mut pb::DeleteVmRequest| r.vm_id = "a".into()))
            .await
            .expect("delete a");
        let mut got = Vec::new();
        let mut last = synced.revision;
        for _ in 0..3 {
            let m = next_ok(&mut w).await;
            assert!(m.revision > last, "{wire:?}: revisions strictly increase");
            last = m.revision;
            got.push((kind(&m), vm_of(&m).0.to_owned(), vm_of(&m).1));
        }
        assert_eq!(
            got,
            [
                (T::WATCH_EVENT_TYPE_ADDED, "b".into(), S::VM_STATE_CREATED),
                (T::WATCH_EVENT_TYPE_CHANGED, "b".into(), S::VM_STATE_RUNNING),
                (T::WATCH_EVENT_TYPE_DELETED, "a".into(), S::VM_STATE_CREATED),
            ],
            "{wire:?}"
        );
        // ListVms says which revision it reflects: the last change.
        let l = list(h.addr).await;
        assert_eq!(l.revision, last, "{wire:?}");
        assert_eq!(l.vms.len(), 1);
        assert_eq!(l.vms[0].revision, last - 1, "b's last change was its boot");
        h.stop().await;
    }
}

#[tokio::test]
async fn a_resume_replays_exactly_what_a_disconnected_client_missed() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectJson);
    c.create_vm(create_req("a")).await.expect("create");
    let start = list(h.addr).await.revision;
    let mut w = watch(h.addr, Wire::ConnectJson, since(start));
    assert_eq!(kind(&next_ok(&mut w).await), T::WATCH_EVENT_TYPE_SYNCED);
    c.boot_vm(id_req(|r: &mut pb::BootVmRequest| r.vm_id = "a".into()))
        .await
        .expect("boot");
    let seen = next_ok(&mut w).await;
    assert_eq!(vm_of(&seen), ("a", S::VM_STATE_RUNNING));
    drop(w);
    // Missed while disconnected.
    c.pause_vm(id_req(|r: &mut pb::PauseVmRequest| r.vm_id = "a".into()))
        .await
        .expect("pause");
    c.create_vm(create_req("b")).await.expect("create b");
    let mut w = watch(h.addr, Wire::Grpc, since(seen.revision));
    let m1 = next_ok(&mut w).await;
    let m2 = next_ok(&mut w).await;
    let m3 = next_ok(&mut w).await;
    assert_eq!(
        [(kind(&m1), vm_of(&m1)), (kind(&m2), vm_of(&m2))],
        [
            (T::WATCH_EVENT_TYPE_CHANGED, ("a", S::VM_STATE_PAUSED)),
            (T::WATCH_EVENT_TYPE_ADDED, ("b", S::VM_STATE_CREATED)),
        ]
    );
    assert_eq!(
        (m1.revision, m2.revision),
        (seen.revision + 1, seen.revision + 2)
    );
    assert_eq!(
        (kind(&m3), m3.revision),
        (T::WATCH_EVENT_TYPE_SYNCED, m2.revision)
    );
    h.stop().await;
}

fn small(history: usize, buffer: usize) -> Security {
    Security {
        watch: WatchSettings {
            history,
            buffer,
            max_watchers: 3,
            heartbeat: Duration::from_millis(200),
        },
        ..Security::open()
    }
}

#[tokio::test]
async fn a_revision_older_than_the_history_or_from_the_future_is_out_of_range_naming_list() {
    let h = Harness::start_secured(small(3, 64)).await;
    let c = h.client(Wire::ConnectProto);
    for id in ["a", "b", "c", "d", "e"] {
        c.create_vm(create_req(id)).await.expect("create");
    }
    let now = list(h.addr).await.revision;
    assert_eq!(now, 6, "a host starts at revision 1");
    for wire in ALL_WIRES {
        for bad in [1, now + 1] {
            let mut w = watch(h.addr, wire, since(bad));
            let e = next(&mut w).await.expect_err("refused");
            assert_eq!(e.code, ErrorCode::OutOfRange, "{wire:?} since {bad}: {e:?}");
            let msg = e.message.clone().unwrap_or_default();
            assert!(
                msg.contains("since_revision") && msg.contains("list"),
                "{msg}"
            );
        }
        // The oldest resumable revision still works.
        let mut w = watch(h.addr, wire, since(now - 3));
        let revs: Vec<u64> = [
            next_ok(&mut w).await,
            next_ok(&mut w).await,
            next_ok(&mut w).await,
        ]
        .iter()
        .map(|m| m.revision)
        .collect();
        assert_eq!(revs, [now - 2, now - 1, now], "{wire:?}");
    }
    // Both a resume and an initial list: invalid, naming the field.
    let mut w = watch(
        h.addr,
        Wire::ConnectJson,
        pb::WatchVmsRequest {
            since_revision: 4,
            send_initial: true,
            ..Default::default()
        },
    );
    let e = next(&mut w).await.expect_err("refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.unwrap_or_default().contains("since_revision"));
    // A malformed id in the filter names its field.
    let mut w = watch(
        h.addr,
        Wire::ConnectJson,
        pb::WatchVmsRequest {
            vm_ids: vec!["ok".into(), "not ok/..".into()],
            ..Default::default()
        },
    );
    let e = next(&mut w).await.expect_err("refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.unwrap_or_default().contains("vm_ids[1]"));
    h.stop().await;
}

#[tokio::test]
async fn filters_idle_heartbeats_and_the_watcher_cap_apply_on_the_wire() {
    let h = Harness::start_secured(small(64, 64)).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("a")).await.expect("create a");
    c.create_vm(create_req("b")).await.expect("create b");
    let mut running_b = watch(
        h.addr,
        Wire::GrpcWeb,
        pb::WatchVmsRequest {
            vm_ids: vec!["b".into()],
            state_filter: vec![S::VM_STATE_RUNNING.into()],
            ..Default::default()
        },
    );
    assert_eq!(
        kind(&next_ok(&mut running_b).await),
        T::WATCH_EVENT_TYPE_SYNCED
    );
    let mut w2 = watch(h.addr, Wire::Grpc, since(0));
    let mut w3 = watch(h.addr, Wire::ConnectJson, since(0));
    assert_eq!(kind(&next_ok(&mut w2).await), T::WATCH_EVENT_TYPE_SYNCED);
    assert_eq!(kind(&next_ok(&mut w3).await), T::WATCH_EVENT_TYPE_SYNCED);
    // The fourth watcher is over the cap of 3.
    let mut over = watch(h.addr, Wire::ConnectProto, since(0));
    let e = next(&mut over).await.expect_err("over the cap");
    assert_eq!(e.code, ErrorCode::ResourceExhausted, "{e:?}");
    for op in ["boot a", "boot b", "pause b"] {
        let (verb, id) = op.split_once(' ').unwrap();
        match verb {
            "boot" => drop(
                c.boot_vm(id_req(|r: &mut pb::BootVmRequest| r.vm_id = id.into()))
                    .await
                    .expect("boot"),
            ),
            _ => drop(
                c.pause_vm(id_req(|r: &mut pb::PauseVmRequest| r.vm_id = id.into()))
                    .await
                    .expect("pause"),
            ),
        }
    }
    // Only b, into Running and out of it.
    let into = next_ok(&mut running_b).await;
    let out = next_ok(&mut running_b).await;
    assert_eq!(
        [vm_of(&into), vm_of(&out)],
        [("b", S::VM_STATE_RUNNING), ("b", S::VM_STATE_PAUSED)]
    );
    // Then quiet: heartbeats with the host's revision.
    let hb = next_ok(&mut running_b).await;
    assert_eq!(kind(&hb), T::WATCH_EVENT_TYPE_HEARTBEAT);
    assert_eq!(hb.revision, out.revision);
    h.stop().await;
}

/// Counts watch telemetry.
#[derive(Default)]
struct WatchRecorder {
    open: Mutex<i64>,
    sent: Mutex<u64>,
    dropped: Mutex<u64>,
}

impl Telemetry for WatchRecorder {
    fn record(&self, event: TelemetryEvent) {
        match event {
            TelemetryEvent::WatchersOpen { delta } => *self.open.lock().unwrap() += delta,
            TelemetryEvent::WatchSent { .. } => *self.sent.lock().unwrap() += 1,
            TelemetryEvent::WatchDropped { .. } => *self.dropped.lock().unwrap() += 1,
            _ => {}
        }
    }
}

fn big_create(id: &str) -> pb::CreateVmRequest {
    let mut req = create_req(id);
    if let Some(config) = req.config.as_option_mut() {
        // About 40 KB per VM, so each change fills socket buffers fast.
        config.metadata = (0..40)
            .map(|i| (format!("k{i}"), "x".repeat(1000)))
            .collect();
    }
    req
}

/// A Connect JSON envelope: flags, big-endian length, payload.
fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The envelopes of a Connect streaming body: (flags, JSON).
fn envelopes(mut body: &[u8]) -> Vec<(u8, serde_json::Value)> {
    let mut out = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        let json = serde_json::from_slice(&body[5..5 + len]).expect("a JSON envelope");
        out.push((body[0], json));
        body = &body[5 + len..];
    }
    assert!(body.is_empty(), "a truncated envelope");
    out
}

/// Opens a Connect JSON watch on a socket whose receive buffer is 4 KiB,
/// and reads nothing: the slowest client there is.
async fn slow_raw_watch(addr: SocketAddr) -> http::Response<hyper::body::Incoming> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}/vmm.v1.VmService/WatchVms"))
        .header("host", addr.to_string())
        .header("content-type", "application/connect+json")
        .body(http_body_util::Full::new(bytes::Bytes::from(envelope(
            0,
            br#"{"sinceRevision":"0"}"#,
        ))))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

#[tokio::test]
async fn a_slow_consumer_is_dropped_with_its_resume_point_while_operations_and_others_go_on() {
    use http_body_util::BodyExt;
    let rec = Arc::new(WatchRecorder::default());
    let h = Harness::start_observed(small(4096, 8), rec.clone()).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(big_create("big")).await.expect("create");
    c.boot_vm(id_req(|r: &mut pb::BootVmRequest| r.vm_id = "big".into()))
        .await
        .expect("boot");
    let slow = slow_raw_watch(h.addr).await;
    let mut fast = watch(h.addr, Wire::Grpc, since(0));
    assert_eq!(kind(&next_ok(&mut fast).await), T::WATCH_EVENT_TYPE_SYNCED);
    let started = tokio::time::Instant::now();
    // About 40 KB a change: 12 MB in all, far more than the socket buffers hold
    // (4 KiB at the client, at most 4 MiB at the server on Linux defaults).
    const ROUNDS: usize = 150;
    for _ in 0..ROUNDS {
        c.pause_vm(id_req(|r: &mut pb::PauseVmRequest| r.vm_id = "big".into()))
            .await
            .expect("pause");
        c.resume_vm(id_req(|r: &mut pb::ResumeVmRequest| r.vm_id = "big".into()))
            .await
            .expect("resume");
        // The fast watcher keeps up, change by change.
        assert_eq!(vm_of(&next_ok(&mut fast).await).1, S::VM_STATE_PAUSED);
        assert_eq!(vm_of(&next_ok(&mut fast).await).1, S::VM_STATE_RUNNING);
    }
    let spent = started.elapsed();
    assert!(
        spent < Duration::from_secs(60),
        "operations were held up by a slow watcher: {spent:?}"
    );
    let top = list(h.addr).await.revision;
    assert_eq!(
        top,
        3 + 2 * ROUNDS as u64,
        "from revision 1: a create, a boot, the rounds"
    );
    // The slow one gets what it had, then resource_exhausted naming where to resume.
    let body = tokio::time::timeout(Duration::from_secs(30), slow.into_body().collect())
        .await
        .expect("the slow stream ends")
        .expect("its body")
        .to_bytes();
    let frames = envelopes(&body);
    let (end_flags, end) = frames.last().expect("an end-of-stream message").clone();
    assert_eq!(end_flags, 2, "the last envelope ends the stream: {end}");
    let revisions: Vec<u64> = frames[..frames.len() - 1]
        .iter()
        .map(|(_, m)| m["revision"].as_str().unwrap_or("0").parse().unwrap())
        .collect();
    let last = *revisions.last().expect("some messages before the drop");
    assert!(
        revisions.windows(2).all(|w| w[0] < w[1] || w[0] == 0),
        "{revisions:?}"
    );
    assert!(
        last < top,
        "it was dropped before the end ({last} of {top})"
    );
    assert_eq!(end["error"]["code"], "resource_exhausted", "{end}");
    let msg = end["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&format!("since_revision={last}")),
        "{msg} (last {last})"
    );
    assert!(*rec.dropped.lock().unwrap() >= 1);
    // Resuming from there gets the rest.
    let mut again = watch(h.addr, Wire::ConnectProto, since(last));
    let mut revs = Vec::new();
    loop {
        let m = next_ok(&mut again).await;
        if kind(&m) == T::WATCH_EVENT_TYPE_SYNCED {
            break;
        }
        revs.push(m.revision);
    }
    assert_eq!(revs, (last + 1..=top).collect::<Vec<_>>());
    drop(again);
    drop(fast);
    // Watchers are counted while open; everything sent was counted.
    let closed = super::harness::eventually(Duration::from_secs(5), || async {
        *rec.open.lock().unwrap() == 0
    })
    .await;
    assert!(closed, "open watchers: {}", *rec.open.lock().unwrap());
    assert!(*rec.sent.lock().unwrap() >= 2 * ROUNDS as u64);
    h.stop().await;
}

#[tokio::test]
async fn server_shutdown_ends_streams_with_unavailable_and_their_resume_point() {
    for wire in ALL_WIRES {
        let h = Harness::start().await;
        h.client(Wire::ConnectProto)
            .create_vm(create_req("a"))
            .await
            .expect("create");
        let mut w = watch(h.addr, wire, since(0));
        let synced = next_ok(&mut w).await;
        assert_eq!(
            (kind(&synced), synced.revision),
            (T::WATCH_EVENT_TYPE_SYNCED, 2)
        );
        let stop = tokio::time::Instant::now();
        h.stop().await;
        assert!(
            stop.elapsed() < Duration::from_secs(4),
            "{wire:?}: the stream held up the drain"
        );
        let e = next(&mut w).await.expect_err("ended by shutdown");
        assert_eq!(e.code, ErrorCode::Unavailable, "{wire:?}: {e:?}");
        assert!(
            e.message.unwrap_or_default().contains("since_revision=2"),
            "{wire:?}"
        );
    }
}

/// A client's copy of the host, from a list and the watch after it.
#[derive(Default)]
struct Mirror {
    vms: BTreeMap<String, pb::VmInfo>,
    /// Everything up to here is applied.
    revision: u64,
    /// Revision of the last change of the current stream (they strictly increase).
    stream_last: u64,
    violations: Vec<String>,
}

impl Mirror {
    fn relist(&mut self, l: &pb::ListVmsResponse) {
        self.vms = l.vms.iter().map(|v| (v.vm_id.clone(), v.clone())).collect();
        self.revision = l.revision;
    }

    fn start_stream(&mut self, from: u64) {
        self.stream_last = from;
    }

    /// Applies one message as an upsert by revision: a change the list
    /// already reflects (the VM's revision is not older) changes nothing.
    fn apply(&mut self, m: &pb::WatchVmsResponse) {
        let t = kind(m);
        if matches!(
            t,
            T::WATCH_EVENT_TYPE_SYNCED | T::WATCH_EVENT_TYPE_HEARTBEAT
        ) {
            self.revision = self.revision.max(m.revision);
            return;
        }
        let vm = m.vm.as_option().expect("a change names its VM").clone();
        if m.revision <= self.stream_last {
            self.violations.push(format!(
                "revision {} after {}",
                m.revision, self.stream_last
            ));
        }
        self.stream_last = m.revision;
        self.revision = self.revision.max(m.revision);
        if vm.revision != m.revision {
            self.violations.push(format!(
                "{}: message revision {} but the VM says {}",
                vm.vm_id, m.revision, vm.revision
            ));
        }
        let known = self.vms.get(&vm.vm_id);
        if known.is_some_and(|k| k.revision >= m.revision) {
            return;
        }
        match t {
            T::WATCH_EVENT_TYPE_DELETED => {
                self.vms.remove(&vm.vm_id);
            }
            _ => {
                if let Some(k) = known
                    && t == T::WATCH_EVENT_TYPE_CHANGED
                    && vm.generation <= k.generation
                {
                    self.violations.push(format!(
                        "{}: generation {} after {}",
                        vm.vm_id, vm.generation, k.generation
                    ));
                }
                self.vms.insert(vm.vm_id.clone(), vm);
            }
        }
    }
}

/// A watcher that lists, watches, and on any end resumes from its revision
/// (or lists again when told to) at whatever address the server has now.
fn mirror_task(
    wire: Wire,
    addr: watch::Receiver<Option<SocketAddr>>,
    mirror: Arc<Mutex<Mirror>>,
    use_initial: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut addr = addr;
        let mut need_list = true;
        loop {
            let Some(a) = *addr.borrow_and_update() else {
                if addr.changed().await.is_err() {
                    return;
                }
                continue;
            };
            let req = if need_list && use_initial {
                mirror.lock().unwrap().vms.clear();
                initial()
            } else {
                if need_list {
                    let l = match client_for(a, Wire::ConnectProto)
                        .list_vms(pb::ListVmsRequest {
                            page_size: 1000,
                            ..Default::default()
                        })
                        .await
                    {
                        Ok(l) => l.into_owned(),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    mirror.lock().unwrap().relist(&l);
                }
                let from = mirror.lock().unwrap().revision;
                mirror.lock().unwrap().start_stream(from);
                since(from.max(1))
            };
            need_list = false;
            let mut rx = watch(a, wire, req);
            let mut initial_seen = false;
            while let Some(m) = rx.recv().await {
                match m {
                    Ok(m) => {
                        let mut mi = mirror.lock().unwrap();
                        if use_initial && !initial_seen && kind(&m) == T::WATCH_EVENT_TYPE_ADDED {
                            let vm = m.vm.as_option().unwrap().clone();
                            mi.vms.insert(vm.vm_id.clone(), vm);
                            continue;
                        }
                        if use_initial && kind(&m) == T::WATCH_EVENT_TYPE_SYNCED && !initial_seen {
                            initial_seen = true;
                            mi.revision = m.revision;
                            mi.start_stream(m.revision);
                            continue;
                        }
                        mi.apply(&m);
                    }
                    Err(e) => {
                        if e.code == ErrorCode::OutOfRange {
                            need_list = true;
                        }
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn random_ops(addr: SocketAddr, seed: u64, n: usize, ids: &[&str]) {
    let mut rng = Rng(seed | 1);
    let c = client_for(addr, Wire::ConnectProto);
    for _ in 0..n {
        let id = ids[rng.below(ids.len() as u64) as usize].to_owned();
        let _ = match rng.below(7) {
            0 | 1 => c.create_vm(create_req(&id)).await.map(drop),
            2 => c
                .boot_vm(id_req(|r: &mut pb::BootVmRequest| r.vm_id = id))
                .await
                .map(drop),
            3 => c
                .shutdown_vm(id_req(|r: &mut pb::ShutdownVmRequest| {
                    r.vm_id = id;
                    r.force = true;
                }))
                .await
                .map(drop),
            4 => c
                .pause_vm(id_req(|r: &mut pb::PauseVmRequest| r.vm_id = id))
                .await
                .map(drop),
            5 => c
                .resume_vm(id_req(|r: &mut pb::ResumeVmRequest| r.vm_id = id))
                .await
                .map(drop),
            _ => c
                .delete_vm(id_req(|r: &mut pb::DeleteVmRequest| {
                    r.vm_id = id;
                    r.force = true;
                }))
                .await
                .map(drop),
        };
    }
}

async fn converged(addr: SocketAddr, mirrors: &[Arc<Mutex<Mirror>>]) -> Result<(), String> {
    let mut why = String::new();
    for _ in 0..100 {
        let l = list(addr).await;
        let want: BTreeMap<String, pb::VmInfo> =
            l.vms.iter().map(|v| (v.vm_id.clone(), v.clone())).collect();
        let mut all = true;
        for (i, m) in mirrors.iter().enumerate() {
            let m = m.lock().unwrap();
            if m.revision != l.revision || m.vms != want {
                all = false;
                why = format!(
                    "mirror {i} at revision {} with {:?}; host at {} with {:?}",
                    m.revision,
                    m.vms
                        .iter()
                        .map(|(k, v)| (k, v.state, v.revision))
                        .collect::<Vec<_>>(),
                    l.revision,
                    want.iter()
                        .map(|(k, v)| (k, v.state, v.revision))
                        .collect::<Vec<_>>()
                );
            }
        }
        if all {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(why)
}

#[tokio::test]
async fn watchers_on_every_protocol_mirror_the_host_through_random_operations_crashes_and_a_restart()
 {
    let mut rng = Rng::from_env("watch mirror");
    let double = Arc::new(Double::new());
    let store = Arc::new(MemoryStore::new());
    let ids = ["v0", "v1", "v2", "v3", "v4", "v5"];
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    let (addr_tx, addr_rx) = watch::channel(Some(h.addr));
    let mirrors: Vec<Arc<Mutex<Mirror>>> = (0..5).map(|_| Arc::default()).collect();
    let wires = [
        Wire::ConnectJson,
        Wire::ConnectProto,
        Wire::Grpc,
        Wire::GrpcWeb,
        Wire::Grpc,
    ];
    let tasks: Vec<_> = wires
        .iter()
        .zip(&mirrors)
        .enumerate()
        .map(|(i, (w, m))| mirror_task(*w, addr_rx.clone(), Arc::clone(m), i % 2 == 1))
        .collect();
    let round = |addr: SocketAddr, rng: &mut Rng| {
        let seeds: Vec<u64> = (0..4).map(|_| rng.next()).collect();
        let kills: Vec<(u64, usize, bool)> = (0..6)
            .map(|_| {
                (
                    rng.below(30),
                    rng.below(ids.len() as u64) as usize,
                    rng.below(2) == 0,
                )
            })
            .collect();
        let double = Arc::clone(&double);
        async move {
            let clients: Vec<_> = seeds
                .into_iter()
                .map(|seed| tokio::spawn(async move { random_ops(addr, seed, 40, &ids).await }))
                .collect();
            // VMMs die and guests power off under the operations.
            for (delay, id, kill) in kills {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                if kill {
                    double.kill(ids[id]);
                } else {
                    double.guest_poweroff(ids[id]);
                }
            }
            for c in clients {
                c.await.expect("client task");
            }
        }
    };
    round(h.addr, &mut rng).await;
    converged(h.addr, &mirrors)
        .await
        .unwrap_or_else(|e| panic!("before the restart: {e}"));
    // VMCP stops; VMMs die while it is down; it starts again and recovers them.
    addr_tx.send_replace(None);
    h.stop().await;
    double.kill("v1");
    double.kill("v4");
    let h = Harness::start_with(Arc::clone(&double), Arc::clone(&store)).await;
    addr_tx.send_replace(Some(h.addr));
    converged(h.addr, &mirrors)
        .await
        .unwrap_or_else(|e| panic!("after the restart: {e}"));
    round(h.addr, &mut rng).await;
    converged(h.addr, &mirrors)
        .await
        .unwrap_or_else(|e| panic!("at the end: {e}"));
    for (i, m) in mirrors.iter().enumerate() {
        let v = &m.lock().unwrap().violations;
        assert!(v.is_empty(), "mirror {i}: {v:?}");
    }
    for t in tasks {
        t.abort();
    }
    h.stop().await;
}

#[tokio::test]
async fn a_watch_needs_the_token_like_every_vm_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("token");
    let token = "watch-token-0123456789abcdef0123456789";
    std::fs::write(&path, format!("{token}\n")).expect("write");
    let security = Security {
        auth: vmcp::adapters::inbound::auth::AuthPolicy {
            token: Some(
                vmcp::adapters::inbound::auth::BearerToken::from_file(&path).expect("token"),
            ),
            require_client_cert: false,
        },
        ..Security::open()
    };
    let h = Harness::start_secured(security).await;
    for wire in ALL_WIRES {
        let e = match h.client(wire).watch_vms(since(0)).await {
            Err(e) => e,
            Ok(mut s) => s.message().await.expect_err("refused without a token"),
        };
        assert_eq!(e.code, ErrorCode::Unauthenticated, "{wire:?}: {e:?}");
        let mut s = h
            .client_with_token(wire, token)
            .watch_vms(since(0))
            .await
            .expect("with the token");
        let m = s.message().await.expect("a message").expect("not the end");
        assert_eq!(
            m.to_owned_message().r#type.as_known(),
            Some(T::WATCH_EVENT_TYPE_SYNCED),
            "{wire:?}"
        );
    }
    h.stop().await;
}
