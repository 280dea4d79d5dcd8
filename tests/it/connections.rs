//! Connection hygiene on loopback: slow half-requests and idle connections
//! are closed by their timeouts, connections past the caps are refused at
//! accept without a byte read while other clients are served, VM work keeps
//! its descriptors while clients hold every allowed connection, and an h2
//! client resetting streams in a loop does not grow VMCP's memory. Counts
//! are bounded, timeouts short, and every socket is closed by the test.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use vmcp::adapters::inbound::connections::ConnectionLimits;
use vmcp::adapters::inbound::tls::server_config;
use vmcp::app::security::Security;
use vmcp::ports::{Telemetry, TelemetryEvent};

use super::fake_ch::{Behaviour, install};
use super::harness::{Harness, eventually, free_port, vmcp_api_env};
use super::real_env::say;
use super::tls_client::Pki;

/// Counts the connection events the server reports.
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, &'static str)>>);

impl Telemetry for Recorder {
    fn record(&self, event: TelemetryEvent) {
        let e = match event {
            TelemetryEvent::ConnectionRefused { reason } => ("refused", reason),
            TelemetryEvent::ConnectionTimedOut { reason } => ("timed_out", reason),
            _ => return,
        };
        self.0.lock().unwrap().push(e);
    }
}

impl Recorder {
    fn count(&self, kind: &str, reason: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, r)| *k == kind && *r == reason)
            .count()
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether the server closed `s` (a reset counts); false while it is open.
/// Panics if the server sent a byte.
fn closed_state(s: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match s.try_read(&mut buf) {
        Ok(0) => true,
        Ok(n) => panic!(
            "the server sent {n} bytes: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Whether `GET /health` from `from` is answered (false when the connection is refused).
async fn health_from(from: IpAddr, addr: SocketAddr) -> bool {
    let mut s = connect_from(from, addr).await;
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: vmcp\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    read_until_closed(&mut s, Duration::from_secs(2))
        .await
        .is_some_and(|b| String::from_utf8_lossy(&b).contains("\"ok\""))
}

/// Reads until the server closes `s`, within `within`; returns what it sent.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match tokio::time::timeout(within, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Some(out),
        // A reset is a close too.
        Ok(Err(_)) => Some(out),
        Err(_) => None,
    }
}

/// One HTTP/1.1 connection from a chosen loopback address, kept alive.
struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl H1 {
    async fn open(from: IpAddr, addr: SocketAddr) -> Self {
        let io = TokioIo::new(connect_from(from, addr).await);
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, task }
    }

    async fn call(&mut self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "vmcp")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.sender.ready().await.expect("connection ready");
        let resp = self.sender.send_request(req).await.expect("answered");
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, v)
    }

    async fn health(&mut self) -> serde_json::Value {
        self.call("GET", "/_/health", "").await.1
    }
}

impl Drop for H1 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn limits(header: Duration, idle: Duration) -> ConnectionLimits {
    ConnectionLimits {
        header_read_timeout: header,
        idle_timeout: idle,
        ..ConnectionLimits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_half_requests_are_closed_after_the_header_timeout() {
    const N: usize = 100;
    let header = Duration::from_millis(300);
    let rec = Arc::new(Recorder::default());
    let h = Harness::start_observed(
        Security {
            connections: limits(header, Duration::from_secs(30)),
            ..Security::open()
        },
        rec.clone(),
    )
    .await;
    let mut stalled = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(h.addr).await.unwrap();
        // Half a request line (shorter than the HTTP/2 preface), or most of a head.
        let part: &[u8] = if i % 2 == 0 {
            b"GET /heal"
        } else {
            b"POST /vmm.v1.VmService/ListVms HTTP/1.1\r\nHost: vmcp\r\nContent-"
        };
        s.write_all(part).await.unwrap();
        stalled.push((Instant::now(), s));
    }
    // A real client is served meanwhile.
    let (status, _, body) = h.raw("GET", "/health", &[], "").await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut fastest = Duration::MAX;
    for (sent, s) in &mut stalled {
        let got = read_until_closed(s, Duration::from_secs(5))
            .await
            .expect("closed by the header timeout");
        assert!(got.is_empty(), "a timed-out head is answered with nothing");
        let after = sent.elapsed();
        slowest = slowest.max(after);
        fastest = fastest.min(after);
    }
    assert!(
        fastest >= header - Duration::from_millis(20),
        "closed by the timeout, not at once: {fastest:?}"
    );
    assert!(
        slowest < Duration::from_secs(3),
        "closed soon after the timeout: {slowest:?}"
    );
    let r = &*rec;
    assert!(
        eventually(Duration::from_secs(2), || async move {
            r.count("timed_out", "header") == N
        })
        .await,
        "every close is counted: {}",
        rec.count("timed_out", "header")
    );
    say(&format!(
        "slow_half_requests: {N} stalled connections closed {fastest:?}..{slowest:?} after their last byte \
         (header timeout {header:?}); all closed {:?} after the first was checked",
        started.elapsed()
    ));
    drop(stalled);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_but_not_mid_request() {
    let idle = Duration::from_millis(300);
    let rec = Arc::new(Recorder::default());
    let h = Harness::start_observed(
        Security {
            connections: limits(Duration::from_secs(5), idle),
            ..Security::open()
        },
        rec.clone(),
    )
    .await;

    // HTTP/1.1: one request, then silence.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: vmcp\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("{\"status\":\"ok\"}") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "answered before the close");
        got.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let rest = read_until_closed(&mut s, Duration::from_secs(4))
        .await
        .expect("an idle HTTP/1.1 connection is closed");
    assert!(rest.is_empty());
    let h1_idle = answered.elapsed();
    assert!(h1_idle >= idle - Duration::from_millis(20), "{h1_idle:?}");
    assert!(
        h1_idle < Duration::from_secs(3),
        "closed by the idle timeout, well before the 5 s header timeout: {h1_idle:?}"
    );
    drop(s);

    // HTTP/2 (prior knowledge): one request, then silence: GOAWAY and close.
    let (mut sender, conn) = h.h2().await;
    let resp = sender
        .send_request(
            http::Request::get(format!("http://{}/health", h.addr))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    let answered = Instant::now();
    tokio::time::timeout(Duration::from_secs(4), conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .expect("closed gracefully (GOAWAY)");
    let h2_idle = answered.elapsed();
    assert!(h2_idle >= idle - Duration::from_millis(20), "{h2_idle:?}");
    assert!(h2_idle < Duration::from_secs(3), "{h2_idle:?}");
    drop(sender);

    // A request in flight longer than the idle timeout keeps its connection:
    // its body arrives only after twice the idle timeout.
    let mut s = TcpStream::connect(h.addr).await.unwrap();
    s.write_all(
        b"POST /vmm.v1.VmService/ListVms HTTP/1.1\r\nHost: vmcp\r\n\
          Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // The slow client is the behaviour under test, not a wait for readiness.
    tokio::time::sleep(idle * 2).await;
    s.write_all(b"{}").await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(4))
        .await
        .expect("answered and closed");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n{\"revision\":\"1\"}"),
        "the empty page of a host at revision 1: {answer}"
    );
    drop(s);
    let r = &*rec;
    assert!(
        eventually(Duration::from_secs(2), || async move {
            r.count("timed_out", "idle") >= 2
        })
        .await
    );
    say(&format!(
        "idle_connections: HTTP/1.1 closed {h1_idle:?} and HTTP/2 {h2_idle:?} after their last answer \
         (idle timeout {idle:?}); a request whose body came after 2x the idle timeout was answered"
    ));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_caps_are_refused_while_other_clients_are_served() {
    const TOTAL: usize = 12;
    const PER_CLIENT: usize = 4;
    let rec = Arc::new(Recorder::default());
    let h = Harness::start_observed(
        Security {
            connections: ConnectionLimits {
                max_connections: Some(TOTAL),
                max_connections_per_client: PER_CLIENT,
                ..limits(Duration::from_secs(30), Duration::from_secs(30))
            },
            ..Security::open()
        },
        rec.clone(),
    )
    .await;

    // One address opens 10: 4 are held, 6 are refused without a byte.
    let mut abusers = Vec::new();
    for _ in 0..10 {
        abusers.push(connect_from(ip("127.0.0.1"), h.addr).await);
    }
    let (r, held) = (&*rec, &abusers);
    assert!(
        eventually(Duration::from_secs(3), || async move {
            r.count("refused", "max_connections_per_client") == 6
                && held.iter().filter(|s| closed_state(s)).count() == 6
        })
        .await,
        "6 refused: {}",
        rec.count("refused", "max_connections_per_client")
    );

    // Another address is served, and sees the counts.
    let mut real = H1::open(ip("127.0.0.2"), h.addr).await;
    let (status, page) = real.call("POST", "/vmm.v1.VmService/ListVms", "{}").await;
    assert_eq!(status, 200, "{page}");
    let health = real.health().await;
    assert_eq!(health["connections"]["open"], 5, "{health}");
    assert_eq!(health["connections"]["max"], TOTAL, "{health}");
    assert_eq!(
        health["connections"]["max_per_client"], PER_CLIENT,
        "{health}"
    );

    // More addresses fill the total cap: 4 + 3 more are held, then everyone is refused.
    for from in ["127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..PER_CLIENT {
            abusers.push(connect_from(ip(from), h.addr).await);
        }
    }
    let r = &*rec;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            r.count("refused", "max_connections") == 5
        })
        .await,
        "5 refused at the total cap: {}",
        rec.count("refused", "max_connections")
    );
    let held = &abusers;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            held.iter().filter(|s| !closed_state(s)).count() == TOTAL - 1
        })
        .await,
        "the abusers hold every other place"
    );

    // With every allowed connection held, the real client still creates a VM.
    let (status, created) = real
        .call(
            "POST",
            "/vmm.v1.VmService/CreateVm",
            &serde_json::json!({
                "vmId": "while-full",
                "config": {
                    "cpu": {"vcpuCount": 1},
                    "memory": {"sizeBytes": "67108864"},
                    "boot": {"kernelPath": "/var/lib/vmcp/kernel.elf"}
                }
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["state"], "VM_STATE_CREATED", "{created}");
    let health = real.health().await;
    assert_eq!(health["connections"]["open"], TOTAL, "{health}");
    assert_eq!(health["descriptors"]["status"], "ok", "{health}");

    // Places held by closed connections are free again.
    drop(abusers);
    let addr = h.addr;
    assert!(
        eventually(Duration::from_secs(3), || async move {
            health_from(ip("127.0.0.5"), addr).await
        })
        .await,
        "a refused address is served once places are free"
    );
    say(&format!(
        "connection caps: {} refused per client, {} refused in total, while a client on another \
         address listed and created VMs",
        rec.count("refused", "max_connections_per_client"),
        rec.count("refused", "max_connections")
    ));
    drop(real);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_after_its_timeout() {
    let pki = Pki::new();
    let tls = server_config(&pki.server_cert, &pki.server_key, None).expect("TLS config");
    let handshake = Duration::from_millis(300);
    let rec = Arc::new(Recorder::default());
    let h = Harness::start_observed(
        Security {
            tls: Some(tls),
            connections: ConnectionLimits {
                tls_handshake_timeout: handshake,
                ..limits(Duration::from_secs(5), Duration::from_secs(5))
            },
            ..Security::open()
        },
        rec.clone(),
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push((Instant::now(), TcpStream::connect(h.addr).await.unwrap()));
    }
    for (at, s) in &mut silent {
        let got = read_until_closed(s, Duration::from_secs(4))
            .await
            .expect("closed by the handshake timeout");
        assert!(got.is_empty());
        let after = at.elapsed();
        assert!(after >= handshake - Duration::from_millis(20), "{after:?}");
        assert!(after < Duration::from_secs(3), "{after:?}");
    }
    let r = &*rec;
    assert!(
        eventually(Duration::from_secs(2), || async move {
            r.count("timed_out", "tls_handshake") == 20
        })
        .await
    );
    drop(silent);
    h.stop().await;
}

/// vmcp-api in its own process, killed on drop.
struct Vmcp {
    child: std::process::Child,
    addr: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Vmcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts vmcp-api with `env`, its descriptor limit at `soft`:`hard`, and waits until it answers.
async fn spawn_vmcp(dir: &Path, env: &[(&str, String)], soft: u64, hard: u64) -> Vmcp {
    let port = free_port();
    let metrics_port = free_port();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -S -n {soft} && ulimit -H -n {hard} && exec \"$0\""
        ))
        .arg(env!("CARGO_BIN_EXE_vmcp-api"));
    vmcp_api_env(&mut cmd, dir, port);
    cmd.env("UNKEY_VMCP_OTEL_PROMETHEUS_PORT", metrics_port.to_string());
    for (k, v) in env {
        cmd.env(format!("UNKEY_VMCP_{k}"), v);
    }
    let child = cmd.spawn().expect("vmcp-api starts");
    let v = Vmcp {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
    };
    let addr = v.addr;
    assert!(
        eventually(Duration::from_secs(20), || async move {
            fetch_closing(addr, "/health")
                .await
                .is_some_and(|b| b.contains("\"ok\""))
        })
        .await,
        "vmcp-api answers"
    );
    v
}

/// GET `path` on a connection that closes after the answer; the whole response.
async fn fetch_closing(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: vmcp\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// The value of the Prometheus counter `name` with `label` among its labels.
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether `test` cannot run here for want of a usable /dev/kvm (the
/// backend check needs it); then its SKIPPED line has been said.
fn without_kvm(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        super::skips::skip(
            test,
            "missing a read-write /dev/kvm (the backend check needs it)",
        );
    }
    !usable
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_clients_holding_every_connection_vmcp_still_creates_vms() {
    if without_kvm("with_clients_holding_every_connection_vmcp_still_creates_vms") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("vk")
        .tempdir_in("/tmp")
        .unwrap();
    let fake = install(&dir.path().join("bin"), &Behaviour::default());
    let kernel = dir.path().join("kernel.elf");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    // Soft 100, hard 300: VMCP raises the soft limit to 300 and keeps 120 for VM work.
    let v = spawn_vmcp(
        dir.path(),
        &[
            ("CH_BINARY", fake.display().to_string()),
            ("RESERVED_FDS", "120".into()),
            ("MAX_CONNECTIONS_PER_CLIENT", "40".into()),
            ("HEADER_READ_TIMEOUT_SECONDS", "60".into()),
            ("IDLE_TIMEOUT_SECONDS", "60".into()),
        ],
        100,
        300,
    )
    .await;
    let mut real = H1::open(ip("127.0.0.2"), v.addr).await;
    let health = health_until(&mut real, |h| h["connections"]["open"] == 1).await;
    assert_eq!(
        health["descriptors"]["limit"], 300,
        "soft raised to hard: {health}"
    );
    assert_eq!(health["descriptors"]["reserved_for_vms"], 120, "{health}");
    let max = health["connections"]["max"].as_u64().expect("max") as usize;
    let in_use = health["descriptors"]["in_use"].as_u64().expect("in use");
    assert!(max > 10 && max as u64 + 120 + in_use <= 300 + 1, "{health}");

    // Clients on eight addresses try to take every descriptor: 30 more than the cap.
    let extra = 30;
    let mut abusers = Vec::new();
    for i in 0..(max - 1 + extra) {
        let from = ip(&format!("127.0.0.{}", 10 + i % 8));
        abusers.push(connect_from(from, v.addr).await);
    }
    let health = health_until(&mut real, |h| h["connections"]["open"] == max).await;
    let held = &abusers;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            held.iter().filter(|s| closed_state(s)).count() == extra
        })
        .await,
        "{extra} refused at accept"
    );
    let free_when_full = health["descriptors"]["free"].as_u64().expect("free");
    assert!(free_when_full >= 100, "the reserve stays free: {health}");

    // VM work still has its descriptors: a VMM process is spawned, its socket, log and files opened.
    let (status, created) = real
        .call(
            "POST",
            "/vmm.v1.VmService/CreateVm",
            &serde_json::json!({
                "vmId": "while-full",
                "config": {
                    "cpu": {"vcpuCount": 1},
                    "memory": {"sizeBytes": "67108864"},
                    "boot": {"kernelPath": kernel.display().to_string()}
                }
            })
            .to_string(),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["state"], "VM_STATE_CREATED", "{created}");
    let (status, booted) = real
        .call(
            "POST",
            "/vmm.v1.VmService/BootVm",
            r#"{"vmId":"while-full"}"#,
        )
        .await;
    assert_eq!(status, 200, "{booted}");
    assert_eq!(booted["state"], "VM_STATE_RUNNING", "{booted}");

    // Still full: one more client is refused; the refusals are in the metrics.
    let mut late = connect_from(ip("127.0.0.99"), v.addr).await;
    assert!(
        read_until_closed(&mut late, Duration::from_secs(3))
            .await
            .is_some_and(|b| b.is_empty()),
        "refused without an answer"
    );
    let metrics = fetch_closing(v.metrics, "/metrics").await.expect("metrics");
    let refused = counter(
        &metrics,
        "vmcp_connections_refused_total",
        "reason=\"max_connections\"",
    );
    assert_eq!(refused, (extra + 1) as f64, "{metrics}");

    let (status, deleted) = real
        .call(
            "POST",
            "/vmm.v1.VmService/DeleteVm",
            r#"{"vmId":"while-full","force":true}"#,
        )
        .await;
    assert_eq!(status, 200, "{deleted}");
    say(&format!(
        "descriptor budget: limit 300 (soft raised from 100), {max} connections allowed, {extra} + 1 \
         refused, {free_when_full} descriptors free with every connection held; CreateVm and BootVm \
         of a fake CH succeeded"
    ));
    drop(abusers);
    drop(late);
    drop(real);
    drop(v);
}

/// Polls `/_/health` on `real` until `pred` holds (bounded); the last document.
async fn health_until(
    real: &mut H1,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let h = real.health().await;
        if pred(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "health never matched: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the command.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// One HTTP/2 frame header (RFC 9113 §4.1).
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS for `POST /vmm.v1.VmService/ListVms` without END_STREAM (its body
/// never comes), then RST_STREAM(CANCEL): the rapid-reset pattern.
fn open_and_cancel(stream: u32) -> Vec<u8> {
    const PATH: &[u8] = b"/vmm.v1.VmService/ListVms";
    const CT: &[u8] = b"application/json";
    // HPACK: :method POST (static 3), :scheme http (static 6), :path and
    // content-type as literals with indexed names (static 4 and 31).
    let mut block = vec![0x83, 0x86, 0x04, PATH.len() as u8];
    block.extend_from_slice(PATH);
    block.extend_from_slice(&[0x0f, 0x10, CT.len() as u8]);
    block.extend_from_slice(CT);
    block.extend_from_slice(&[0x01, 0x04]);
    block.extend_from_slice(b"vmcp");
    let mut out = frame(0x1, 0x4, stream, &block);
    out.extend(frame(0x3, 0x0, stream, &8u32.to_be_bytes()));
    out
}

/// What a rapid-reset run did.
#[derive(Debug, Default)]
struct Resets {
    /// Streams opened and reset that the server is known to have read (a PING
    /// sent after them was answered).
    streams: u32,
    connections: u32,
    /// GOAWAYs by error code (0xb is ENHANCE_YOUR_CALM).
    goaways: std::collections::BTreeMap<u32, u32>,
}

/// Opens and resets at least `n` streams on raw h2 connections to `addr`, in
/// batches of 10 each followed by a PING whose answer proves the server read
/// them; reconnects whenever the server ends a connection.
async fn rapid_reset(addr: SocketAddr, n: u32) -> Resets {
    let mut r = Resets::default();
    while r.streams < n {
        let s = TcpStream::connect(addr).await.unwrap();
        r.connections += 1;
        let (mut rd, mut wr) = s.into_split();
        let (ack_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Drains what the server sends until it closes, passing on PING
        // answers; returns its GOAWAY's error code.
        let reader = tokio::spawn(async move {
            let mut goaway = None;
            let mut head = [0u8; 9];
            while rd.read_exact(&mut head).await.is_ok() {
                let len = (usize::from(head[0]) << 16)
                    | (usize::from(head[1]) << 8)
                    | usize::from(head[2]);
                let mut payload = vec![0u8; len];
                if rd.read_exact(&mut payload).await.is_err() {
                    break;
                }
                match head[3] {
                    0x6 if head[4] & 0x1 == 1 => {
                        let _ = ack_tx.send(());
                    }
                    0x7 if payload.len() >= 8 => {
                        goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                    }
                    _ => {}
                }
            }
            goaway
        });
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(frame(0x4, 0x0, 0, &[]));
        let mut stream = 1u32;
        let mut ok = wr.write_all(&hello).await.is_ok();
        while ok && r.streams < n {
            let mut batch = Vec::new();
            for _ in 0..10 {
                batch.extend(open_and_cancel(stream));
                stream += 2;
            }
            batch.extend(frame(0x6, 0x0, 0, &[0; 8]));
            ok = wr.write_all(&batch).await.is_ok()
                && tokio::time::timeout(Duration::from_secs(5), acks.recv())
                    .await
                    .expect("the server answers PING or closes")
                    .is_some();
            if ok {
                r.streams += 10;
            }
        }
        drop(wr);
        let goaway = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the server closes the connection")
            .unwrap();
        if let Some(code) = goaway {
            *r.goaways.entry(code).or_default() += 1;
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_does_not_grow_memory() {
    let dir = tempfile::Builder::new()
        .prefix("vr")
        .tempdir_in("/tmp")
        .unwrap();
    let v = spawn_vmcp(
        dir.path(),
        &[
            ("CH_BINARY", "/nonexistent/cloud-hypervisor".into()),
            ("H2_MAX_LOCAL_ERROR_RESETS", "200".into()),
        ],
        20000,
        20000,
    )
    .await;
    let pid = v.child.id();
    tokio::time::timeout(Duration::from_secs(60), rapid_reset(v.addr, 2_000))
        .await
        .expect("the warm-up ends");
    let rss_before = rss_kib(pid);
    let cpu_before = cpu_ticks(pid);
    let began = Instant::now();
    const N: u32 = 20_000;
    let resets = tokio::time::timeout(Duration::from_secs(60), rapid_reset(v.addr, N))
        .await
        .expect("the reset loop ends");
    let took = began.elapsed();
    let cpu = cpu_ticks(pid) - cpu_before;
    // The configured limit ends every connection after at most 200 reset
    // streams (plus the batch in flight), with ENHANCE_YOUR_CALM.
    let calm = resets.goaways.get(&0xb).copied().unwrap_or(0);
    assert!(calm + 1 >= resets.connections, "{resets:?}");
    assert!(
        resets.streams / resets.connections <= 210,
        "no connection carries more than the limit: {resets:?}"
    );
    let grown = assert_settles(pid, rss_before).await;
    assert!(
        fetch_closing(v.addr, "/health")
            .await
            .is_some_and(|b| b.contains("\"ok\"")),
        "still serving"
    );
    say(&format!(
        "h2_rapid_reset: {} streams opened and reset in {took:?} over {} connections, GOAWAYs by \
         code {:?}; vmcp-api RSS {rss_before} KiB -> +{grown} KiB, {cpu} CPU ticks",
        resets.streams, resets.connections, resets.goaways
    ));
    drop(v);
}

/// RSS growth of `pid` over `before`, waiting (bounded) for freed memory to settle.
async fn assert_settles(pid: u32, before: u64) -> u64 {
    const LIMIT_KIB: u64 = 8 * 1024;
    let mut grown = 0;
    let ok = eventually(Duration::from_secs(3), || {
        let now = rss_kib(pid);
        grown = now.saturating_sub(before);
        async move { now.saturating_sub(before) < LIMIT_KIB }
    })
    .await;
    assert!(ok, "vmcp-api grew {grown} KiB after the reset loop");
    grown
}

/// Every answer gets exactly one access-log line, with its method and the
/// code the client saw, over every kind of connection: the API socket
/// (HTTP/1.1 on a Unix stream), TCP with HTTP/1.1, and h2c. The line is
/// written once the answer is sent (after the connection's write), and none
/// still waiting is lost when vmcp-api stops. The backend is the fake
/// Cloud Hypervisor; no VM is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_logged_once_over_every_kind_of_connection() {
    if without_kvm("every_answer_is_logged_once_over_every_kind_of_connection") {
        return;
    }
    use super::harness::{Wire, client_for};
    use std::collections::BTreeMap;
    use vmcp::adapters::outbound::vmm::UdsClient;
    use vmcp::proto::vmm::v1 as pb;

    /// Answers by (full method name, code).
    type Tally = BTreeMap<(String, String), usize>;
    fn note(t: &mut Tally, method: &str, code: &str) {
        *t.entry((method.to_owned(), code.to_owned())).or_default() += 1;
    }
    fn code_of<T>(r: &Result<T, connectrpc::ConnectError>) -> String {
        match r {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.code.as_str().to_owned(),
        }
    }

    let dir = tempfile::Builder::new()
        .prefix("vl")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let fake = install(&dir.path().join("bin"), &Behaviour::default());
    let port = free_port();
    let socket = dir.path().join("api.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmcp-api"));
    vmcp_api_env(&mut cmd, dir.path(), port);
    cmd.env("UNKEY_VMCP_LOG_LEVEL", "info")
        .env("UNKEY_VMCP_CH_BINARY", &fake)
        .env("UNKEY_VMCP_API_SOCKET", &socket)
        .stdout(std::process::Stdio::piped());
    let child = cmd.spawn().expect("vmcp-api starts");
    let pid = child.id();
    // Killed by pid if the test fails before it stopped (and was reaped).
    struct Stop(Option<u32>);
    impl Drop for Stop {
        fn drop(&mut self) {
            if let Some(pid) = self.0 {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
    let mut stop = Stop(Some(pid));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut sent = Tally::new();
    let missing = || pb::GetVmInfoRequest {
        vm_id: "missing".into(),
        ..Default::default()
    };

    // TCP, HTTP/1.1 (Connect binary): GetVmInfo until recovery is over
    // (`unavailable` before, `not_found` after), then 2 ListVms.
    let h1 = client_for(addr, Wire::ConnectProto);
    let started = Instant::now();
    loop {
        if fetch_closing(addr, "/health").await.is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "vmcp-api never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let code = code_of(&h1.get_vm_info(missing()).await);
        note(&mut sent, "vmm.v1.VmService/GetVmInfo", &code);
        if code == "not_found" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still {code}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        let code = code_of(&h1.list_vms(pb::ListVmsRequest::default()).await);
        note(&mut sent, "vmm.v1.VmService/ListVms", &code);
    }
    // The API socket, one pooled connection: 3 GetVmInfo, 2 ListVms.
    let uds = UdsClient::new(Duration::from_secs(5));
    for (method, n, body) in [
        ("GetVmInfo", 3, &br#"{"vmId":"missing"}"#[..]),
        ("ListVms", 2, &b"{}"[..]),
    ] {
        for _ in 0..n {
            let r = uds
                .call(
                    &socket,
                    http::Method::POST,
                    &format!("/vmm.v1.VmService/{method}"),
                    Some(Bytes::from_static(body)),
                )
                .await
                .expect("an answer over the socket");
            let code = if r.is_success() {
                "ok".to_owned()
            } else {
                let v: serde_json::Value = serde_json::from_slice(&r.body).expect("error JSON");
                v["code"].as_str().expect("code").to_owned()
            };
            note(&mut sent, &format!("vmm.v1.VmService/{method}"), &code);
        }
    }
    // h2c (gRPC): 4 GetVmInfo.
    let h2 = client_for(addr, Wire::Grpc);
    for _ in 0..4 {
        let code = code_of(&h2.get_vm_info(missing()).await);
        note(&mut sent, "vmm.v1.VmService/GetVmInfo", &code);
    }
    assert_eq!(
        sent.get(&(
            "vmm.v1.VmService/GetVmInfo".to_owned(),
            "not_found".to_owned()
        )),
        Some(&8),
        "{sent:?}"
    );

    // A graceful stop writes every line still waiting.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("vmcp-api stops on SIGTERM")
    .expect("join")
    .expect("output");
    stop.0 = None;
    let mut logged = Tally::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "vmcp::access" {
            note(
                &mut logged,
                v["method"].as_str().unwrap_or_default(),
                v["code"].as_str().unwrap_or_default(),
            );
        }
    }
    assert_eq!(
        logged, sent,
        "access lines by (method, code) vs the answers"
    );
}
