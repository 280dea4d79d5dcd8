//! WatchVms: how long a VMM change takes to reach a watching client (a kill
//! -9 of the VMM, a pause made on the VMM's own socket), how much memory an
//! idle watcher costs the server, and how many watchers it holds at once,
//! against the `vmcp-api` binary in its own process on real Cloud Hypervisor.

use std::path::Path;
use std::time::{Duration, Instant};

use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, HttpClient};
use tokio::sync::mpsc;
use vmcp::adapters::outbound::vmm::uds_http::UdsClient;
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

use super::Stats;
use super::vmm::{Env, Kind, Server, create_req, env, runtime_dir};

type Event = (Instant, pb::WatchVmsResponse);

fn grpc(addr: std::net::SocketAddr) -> VmServiceClient<HttpClient> {
    VmServiceClient::new(
        HttpClient::plaintext_http2_only(),
        ClientConfig::new(format!("http://{addr}").parse().unwrap()).with_protocol(Protocol::Grpc),
    )
}

/// Opens a watch and forwards each message, stamped on arrival.
async fn watch(
    c: &VmServiceClient<HttpClient>,
    req: pb::WatchVmsRequest,
) -> mpsc::UnboundedReceiver<Event> {
    let mut s = c.watch_vms(req).await.expect("watch opens");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(m)) = s.message().await {
            if tx.send((Instant::now(), m.to_owned_message())).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first change of `id` into `state`, with when it arrived.
async fn until(rx: &mut mpsc::UnboundedReceiver<Event>, id: &str, state: pb::VmState) -> Instant {
    loop {
        let (at, m) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("watch open");
        if let Some(vm) = m.vm.as_option()
            && vm.vm_id == id
            && vm.state.as_known() == Some(state)
        {
            return at;
        }
    }
}

/// Resident memory of `pid`, KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pid_of(info: &pb::GetVmInfoResponse) -> u32 {
    info.backend_info
        .get("vmm_pid")
        .and_then(|p| p.parse().ok())
        .expect("a VMM pid")
}

async fn boot(c: &VmServiceClient<HttpClient>, id: &str, guest: &Path) -> pb::GetVmInfoResponse {
    c.create_vm(create_req(id, guest)).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    c.get_vm_info(pb::GetVmInfoRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("info")
    .into_owned()
}

async fn delete(c: &VmServiceClient<HttpClient>, id: &str) {
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.into(),
        force: true,
        ..Default::default()
    })
    .await
    .expect("delete");
}

pub async fn section() {
    println!();
    println!(
        "== WatchVms: change-to-client latency, idle watcher memory, watchers held (vmcp-api process, Cloud Hypervisor) =="
    );
    let Some(env) = env(Kind::Ch, "WatchVms", true) else {
        return;
    };
    let root = runtime_dir();
    let server = Server::spawn_with(
        Kind::Ch,
        &env,
        root.path(),
        &[("UNKEY_VMCP_MAX_WATCHERS", "20000")],
    )
    .await;
    latency(&server, &env).await;
    held(&server, &env.guest, 10_000).await;
    server.stop();
}

async fn latency(server: &Server, env: &Env) {
    let c = grpc(server.addr);
    let mut w = watch(&c, pb::WatchVmsRequest::default()).await;
    // kill -9 of the VMM → FAILED at the client.
    const KILLS: usize = 20;
    let mut kills = Vec::new();
    for i in 0..KILLS {
        let id = format!("kill-{i}");
        let info = boot(&c, &id, &env.guest).await;
        until(&mut w, &id, pb::VmState::VM_STATE_RUNNING).await;
        let pid = pid_of(&info);
        let at = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        kills.push(until(&mut w, &id, pb::VmState::VM_STATE_FAILED).await - at);
        delete(&c, &id).await;
    }
    let n = kills.len();
    let kills = Stats::from(kills, Duration::from_secs(1));
    println!(
        "kill -9 of the VMM → FAILED at a gRPC watcher       p50 {:>8.3} ms  p99 {:>8.3} ms  (n={n})",
        kills.p50.as_secs_f64() * 1e3,
        kills.p99.as_secs_f64() * 1e3
    );
    // A pause made on the VMM's own socket (behind VMCP's back) → PAUSED at the client.
    let info = boot(&c, "paused", &env.guest).await;
    let socket = info
        .backend_info
        .get("api_socket")
        .cloned()
        .expect("api socket");
    let http = UdsClient::new(Duration::from_secs(5));
    const PAUSES: usize = 50;
    let mut pauses = Vec::new();
    for _ in 0..PAUSES {
        for (path, state) in [
            ("/api/v1/vm.pause", pb::VmState::VM_STATE_PAUSED),
            ("/api/v1/vm.resume", pb::VmState::VM_STATE_RUNNING),
        ] {
            let at = Instant::now();
            let r = http
                .call(Path::new(&socket), http::Method::PUT, path, None)
                .await
                .expect("VMM call");
            assert!(r.is_success(), "{path}: {}", r.text());
            let took = until(&mut w, "paused", state).await - at;
            if state == pb::VmState::VM_STATE_PAUSED {
                pauses.push(took);
            }
        }
    }
    let pauses = Stats::from(pauses, Duration::from_secs(1));
    println!(
        "pause on the VMM socket → PAUSED at a gRPC watcher   p50 {:>8.3} ms  p99 {:>8.3} ms  (n={PAUSES}; Cloud Hypervisor's event file, its changes told by inotify)",
        pauses.p50.as_secs_f64() * 1e3,
        pauses.p99.as_secs_f64() * 1e3
    );
    // A PauseVm answered by VMCP → the change at another client (the feed's own cost).
    let api = pause_resume_latency(&c, &mut w, "paused", PAUSES).await;
    println!(
        "PauseVm/ResumeVm answer → the event at a watcher     p50 {:>8.3} ms  p99 {:>8.3} ms  (n={}; an event that came before the answer counts 0)",
        api.p50.as_secs_f64() * 1e3,
        api.p99.as_secs_f64() * 1e3,
        api.count
    );
    delete(&c, "paused").await;
}

/// Opens `n` idle watchers (100 per HTTP/2 connection), measures the
/// server's resident memory before and after, and the latency of one change
/// to a watcher while all of them are open.
async fn held(server: &Server, guest: &Path, n: usize) {
    let pid = server.child.id();
    let before = rss_kib(pid);
    let opened = Instant::now();
    let mut streams = Vec::with_capacity(n);
    let mut tasks = Vec::new();
    for chunk in 0..n.div_ceil(100) {
        let c = grpc(server.addr);
        let per = 100.min(n - chunk * 100);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                match c.watch_vms(pb::WatchVmsRequest::default()).await {
                    Ok(s) => out.push(s),
                    Err(e) => {
                        println!("watcher refused: {e:?}");
                        break;
                    }
                }
            }
            (c, out)
        }));
    }
    let mut clients = Vec::new();
    for t in tasks {
        let (c, out) = t.await.expect("opener");
        clients.push(c);
        streams.extend(out);
    }
    let open_took = opened.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let held = streams.len();
    println!(
        "watchers held at once                               {held} of {n} asked (opened in {:.2} s)",
        open_took.as_secs_f64()
    );
    println!(
        "server RSS: {before} KiB idle, {after} KiB with {held} idle watchers → {:.1} KiB per watcher",
        (after.saturating_sub(before)) as f64 / held.max(1) as f64
    );
    // One change fanned out to every watcher: PauseVm/ResumeVm answer → event at one observer.
    let c = grpc(server.addr);
    let mut w = watch(&c, pb::WatchVmsRequest::default()).await;
    boot(&c, "fan", guest).await;
    until(&mut w, "fan", pb::VmState::VM_STATE_RUNNING).await;
    let fan = pause_resume_latency(&c, &mut w, "fan", 20).await;
    println!(
        "PauseVm/ResumeVm answer → event, {held} watchers open   p50 {:>8.3} ms  p99 {:>8.3} ms  (n={})",
        fan.p50.as_secs_f64() * 1e3,
        fan.p99.as_secs_f64() * 1e3,
        fan.count
    );
    delete(&c, "fan").await;
    drop(streams);
    drop(clients);
}

/// `rounds` PauseVm + ResumeVm on `id`: time from each answer to its event at `w`.
async fn pause_resume_latency(
    c: &VmServiceClient<HttpClient>,
    w: &mut mpsc::UnboundedReceiver<Event>,
    id: &str,
    rounds: usize,
) -> Stats {
    let mut lat = Vec::new();
    for _ in 0..rounds {
        c.pause_vm(pb::PauseVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("pause");
        let answered = Instant::now();
        lat.push(
            until(w, id, pb::VmState::VM_STATE_PAUSED)
                .await
                .saturating_duration_since(answered),
        );
        c.resume_vm(pb::ResumeVmRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("resume");
        let answered = Instant::now();
        lat.push(
            until(w, id, pb::VmState::VM_STATE_RUNNING)
                .await
                .saturating_duration_since(answered),
        );
    }
    Stats::from(lat, Duration::from_secs(1))
}
