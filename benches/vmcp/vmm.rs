//! Real VMMs: VMCP's overhead over talking to Cloud Hypervisor or Firecracker
//! directly (GetVmInfo latency, create+boot to Running), and Firecracker's
//! spawn-to-API-ready time. Every process started here is ended by pid and
//! every runtime directory is a tempdir under /tmp, or under /dev/shm where
//! a row measures VMs' runtime files on a tmpfs, as production keeps them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use buffa::Message as _;
use bytes::Bytes;
use http::Method;

use connectrpc::client::HttpClient;
use vmcp::adapters::inbound::server::RpcLimits;
use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::firecracker::{Firecracker, FirecrackerSettings};
use vmcp::adapters::outbound::vmm::uds_http::UdsClient;
use vmcp::app::wiring::{Running, StartOptions, start};
use vmcp::ports::{Hypervisor, NoopTelemetry, SystemClock, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

use super::{Stats, client, unlimited};

/// Which VMM.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Ch,
    Fc,
}

/// Binary and guest for a section.
pub struct Env {
    pub binary: PathBuf,
    pub guest: PathBuf,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// The environment, or None after printing `SKIPPED: <section>: <what is missing>`.
pub fn env(kind: Kind, section: &str, need_guest: bool) -> Option<Env> {
    let (var, name) = match kind {
        Kind::Ch => ("VMCP_TEST_CH_BINARY", "cloud-hypervisor"),
        Kind::Fc => ("VMCP_TEST_FC_BINARY", "firecracker"),
    };
    let mut missing = Vec::new();
    let binary = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| find_on_path(name));
    match &binary {
        Some(b) if b.is_file() => {}
        Some(b) => missing.push(format!("{var}={} is not a file", b.display())),
        None => missing.push(format!("{name} binary (set {var} or put it on PATH)")),
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        missing.push("a usable /dev/kvm".to_owned());
    }
    let guest = std::env::var_os("VMCP_TEST_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/guest/vmcp-test-guest.elf")
        });
    if need_guest && !guest.is_file() {
        missing.push(format!(
            "the test guest {} (run `make guest`)",
            guest.display()
        ));
    }
    if missing.is_empty() {
        Some(Env {
            binary: binary.unwrap_or_default(),
            guest,
        })
    } else {
        println!("SKIPPED: {section}: missing {}", missing.join(", "));
        None
    }
}

/// A short-named runtime root under /tmp (API sockets must fit in 108 bytes).
pub fn runtime_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vb")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A short-named root for VMs' runtime files (API sockets, logs, pid and
/// event files, consoles) on a tmpfs, where production keeps them: vmcp-api's
/// default `UNKEY_VMCP_RUNTIME_DIR` is /run/vmcp, a tmpfs on systemd hosts.
/// /dev/shm when it is a tmpfs, otherwise /tmp (the second value says which).
pub fn tmpfs_runtime_dir() -> (tempfile::TempDir, &'static str) {
    let shm_is_tmpfs = std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|m| {
            let mut f = m.split_whitespace().skip(1);
            f.next() == Some("/dev/shm") && f.next() == Some("tmpfs")
        })
    });
    let base = if shm_is_tmpfs { "/dev/shm" } else { "/tmp" };
    let dir = tempfile::Builder::new()
        .prefix("vb")
        .tempdir_in(base)
        .unwrap();
    (dir, base)
}

/// Options like vmcp-api's defaults, without telemetry.
pub fn options() -> StartOptions {
    StartOptions {
        addr: "127.0.0.1:0".parse().unwrap(),
        limits: RpcLimits {
            max_request_bytes: 1 << 20,
            max_deadline: Duration::from_secs(120),
        },
        hypervisor_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        remove_orphans: true,
        telemetry: Arc::new(NoopTelemetry),
        telemetry_status: Arc::new(|| "disabled".to_owned()),
        wrap_rpc: Box::new(|s| s),
        clock: Arc::new(SystemClock),
        on_vm_counts: None,
        security: unlimited(),
    }
}

/// A VMCP server on the real backend `kind`, rooted at `runtime`.
pub async fn serve<S: VmStore>(kind: Kind, env: &Env, runtime: &Path, store: Arc<S>) -> Running {
    match kind {
        Kind::Ch => {
            let ch = CloudHypervisor::new(&env.binary, runtime, Duration::from_secs(10));
            start_with(ch, store).await
        }
        Kind::Fc => {
            let fc = Firecracker::new(FirecrackerSettings::new(&env.binary, runtime));
            start_with(fc, store).await
        }
    }
}

/// A VMCP server on the real backend `kind` with `options`.
pub async fn start_backend<S: VmStore>(
    kind: Kind,
    env: &Env,
    runtime: &Path,
    store: Arc<S>,
    options: StartOptions,
) -> Running {
    let running = match kind {
        Kind::Ch => {
            let ch = CloudHypervisor::new(&env.binary, runtime, Duration::from_secs(10));
            start(Arc::new(ch), store, options).await
        }
        Kind::Fc => {
            let fc = Firecracker::new(FirecrackerSettings::new(&env.binary, runtime));
            start(Arc::new(fc), store, options).await
        }
    };
    running.expect("server starts")
}

/// Kills (-9) every VMM the discovery scan finds under `runtime` (what a
/// section leaves behind when it stops early).
pub fn kill_vmms_in(runtime: &Path) {
    for p in vmcp::adapters::outbound::vmm::discovery::scan(runtime)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.process)
    {
        let _ = std::process::Command::new("kill")
            .args(["-9", &p.pid.to_string()])
            .status();
    }
}

/// `PUT path` with a JSON body on a VMM's socket; panics unless 2xx.
pub async fn put_json(http: &UdsClient, socket: &Path, path: &str, body: serde_json::Value) {
    put(http, socket, path, body).await;
}

async fn start_with<H: Hypervisor, S: VmStore>(h: H, store: Arc<S>) -> Running {
    start(Arc::new(h), store, options())
        .await
        .expect("server starts")
}

/// Times `calls` sequential calls of `read`.
async fn time_reads<F, Fut>(calls: usize, mut read: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(calls);
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        read().await;
        samples.push(t.elapsed());
    }
    Stats::from(samples, started.elapsed())
}

/// Creates and boots the VM "info" through the server at `addr`, times `calls`
/// sequential `read`s of it (given the server's Connect client), and deletes it.
async fn info_latency<F, Fut>(addr: std::net::SocketAddr, env: &Env, calls: usize, read: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let c = client(addr, false);
    start_info(&c, env).await;
    let stats = time_reads(calls, read).await;
    delete_info(&c).await;
    stats
}

/// Creates and boots the VM "info".
async fn start_info(c: &VmServiceClient<HttpClient>, env: &Env) {
    c.create_vm(create_req("info", &env.guest))
        .await
        .expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "info".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
}

/// Deletes the VM "info".
async fn delete_info(c: &VmServiceClient<HttpClient>) {
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "info".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
}

/// One GetVmInfo of the VM "info" with the Connect binary client.
async fn connect_info(c: &VmServiceClient<HttpClient>) {
    c.get_vm_info(pb::GetVmInfoRequest {
        vm_id: "info".into(),
        ..Default::default()
    })
    .await
    .expect("GetVmInfo");
}

/// What `VMCP_BENCH_API_ENV` (`K=V,K2=V2`) adds to every vmcp-api's environment.
pub fn api_env() -> Vec<(String, String)> {
    std::env::var("VMCP_BENCH_API_ENV")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The `vmcp-api` binary serving `kind` from its own process, with production defaults
/// except the request rate limit (off: the bench measures the stack, not the limiter) and
/// Prometheus (off: no fixed port). Its JSON logs go to /dev/null.
pub struct Server {
    /// The vmcp-api process.
    pub child: std::process::Child,
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Its host-local API socket.
    pub socket: PathBuf,
}

impl Server {
    /// Starts the server and waits until it answers ListVms.
    pub async fn spawn(kind: Kind, env: &Env, root: &Path) -> Self {
        Self::spawn_with(kind, env, root, &[]).await
    }

    /// Like [`Server::spawn`], with more `UNKEY_VMCP_*` variables.
    pub async fn spawn_with(kind: Kind, env: &Env, root: &Path, extra: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let (backend, binary_var) = match kind {
            Kind::Ch => ("cloudhypervisor", "UNKEY_VMCP_CH_BINARY"),
            Kind::Fc => ("firecracker", "UNKEY_VMCP_FC_BINARY"),
        };
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmcp-api"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNKEY_VMCP_ADDRESS", "127.0.0.1")
            .env("UNKEY_VMCP_PORT", port.to_string())
            .env("UNKEY_VMCP_BACKEND", backend)
            .env(binary_var, &env.binary)
            .env(
                "UNKEY_VMCP_CH_ENDPOINT",
                format!("unix://{}/seed-ch.sock", root.display()),
            )
            .env(
                "UNKEY_VMCP_FC_ENDPOINT",
                format!("unix://{}/seed-fc.sock", root.display()),
            )
            .env("UNKEY_VMCP_RUNTIME_DIR", root.join("vmcp-rt"))
            .env("UNKEY_VMCP_DATA_DIR", root.join("vmcp-data"))
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env("UNKEY_VMCP_RATE_LIMIT_RPS", "0")
            .env("UNKEY_VMCP_API_SOCKET", root.join("vmcp-api.sock"))
            .envs(extra.iter().copied())
            .envs(api_env())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("vmcp-api starts");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let c = client(addr, false);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Serving VM calls means recovery is over.
        while c.list_vms(pb::ListVmsRequest::default()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "vmcp-api did not serve within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            addr,
            socket: root.join("vmcp-api.sock"),
        }
    }

    /// Ends the server (SIGTERM: it drains and exits; VMs were deleted by the caller).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Server {
    /// Stops vmcp-api (SIGTERM, then its exit is awaited), also when the
    /// bench panics, so that no vmcp-api outlives the bench.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
    }
}

/// CreateVm request: 1 vCPU, 64 MiB, the test guest, console to the runtime file.
pub fn create_req(id: &str, guest: &Path) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        vm_id: id.into(),
        config: pb::VmConfig {
            cpu: pb::CpuConfig {
                vcpu_count: 1,
                ..Default::default()
            }
            .into(),
            memory: pb::MemoryConfig {
                size_bytes: 64 << 20,
                ..Default::default()
            }
            .into(),
            boot: pb::BootConfig {
                kernel_path: guest.display().to_string(),
                kernel_args: "console=ttyS0".into(),
                ..Default::default()
            }
            .into(),
            console: pb::ConsoleConfig {
                enabled: true,
                ..Default::default()
            }
            .into(),
            ..Default::default()
        }
        .into(),
        ..Default::default()
    }
}

/// A VMM started directly (no VMCP), killed by pid on drop.
pub struct Direct {
    pub child: tokio::process::Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Direct {
    /// Spawns the VMM with its API socket in `dir`.
    pub fn spawn(kind: Kind, binary: &Path, dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("api.sock");
        let mut cmd = tokio::process::Command::new(binary);
        match kind {
            Kind::Ch => cmd.arg("--api-socket").arg(&socket),
            Kind::Fc => cmd.arg("--api-sock").arg(&socket),
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = cmd.spawn().expect("spawn VMM");
        Self {
            child,
            socket,
            dir: dir.to_owned(),
        }
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Kills the VMM by pid and reaps it.
    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// CPU time the threads of process `pid` have run, vCPU threads excluded (their guest
/// is not serving the API), from each thread's schedstat (nanoseconds on a CPU).
fn serving_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.contains("vcpu") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Duration::from_nanos(ns)
}

/// Polls `path` with GET until 2xx, bounded by a 10 s deadline.
pub async fn wait_ready(http: &UdsClient, socket: &Path, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = http
            .call_with_timeout(socket, Method::GET, path, None, Duration::from_millis(500))
            .await
            && r.is_success()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "VMM API at {} not ready",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn put(http: &UdsClient, socket: &Path, path: &str, body: serde_json::Value) {
    // Cloud Hypervisor's action endpoints (vm.boot) take no body at all.
    let body = (!body.is_null()).then(|| Bytes::from(serde_json::to_vec(&body).unwrap()));
    let r = http
        .call(socket, Method::PUT, path, body)
        .await
        .expect("VMM call");
    assert!(r.is_success(), "{path}: {}", r.text());
}

/// Direct create + boot: spawn, wait for the API, configure, boot.
async fn direct_boot(kind: Kind, env: &Env, http: &UdsClient, dir: &Path) -> Direct {
    let d = Direct::spawn(kind, &env.binary, dir);
    let kernel = env.guest.display().to_string();
    match kind {
        Kind::Ch => {
            wait_ready(http, &d.socket, "/api/v1/vmm.ping").await;
            let serial = dir.join("serial").display().to_string();
            put(
                http,
                &d.socket,
                "/api/v1/vm.create",
                serde_json::json!({
                    "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                    "memory": {"size": 64u64 << 20},
                    "payload": {"kernel": kernel, "cmdline": "console=ttyS0"},
                    "serial": {"mode": "File", "file": serial},
                    "console": {"mode": "Off"},
                }),
            )
            .await;
            put(http, &d.socket, "/api/v1/vm.boot", serde_json::Value::Null).await;
        }
        Kind::Fc => {
            wait_ready(http, &d.socket, "/").await;
            let serial = dir.join("console");
            std::fs::write(&serial, b"").unwrap();
            put(
                http,
                &d.socket,
                "/machine-config",
                serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "smt": false}),
            )
            .await;
            put(
                http,
                &d.socket,
                "/boot-source",
                serde_json::json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0"}),
            )
            .await;
            put(
                http,
                &d.socket,
                "/serial",
                serde_json::json!({"serial_out_path": serial.display().to_string()}),
            )
            .await;
            put(
                http,
                &d.socket,
                "/actions",
                serde_json::json!({"action_type": "InstanceStart"}),
            )
            .await;
        }
    }
    d
}

fn info_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Ch => "/api/v1/vm.info",
        Kind::Fc => "/",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Sections 3 and 4 for one VMM.
pub async fn section(kind: Kind) {
    let name = match kind {
        Kind::Ch => "cloud-hypervisor",
        Kind::Fc => "firecracker",
    };
    println!();
    println!("== {name}: VMCP vs the VMM's API directly ==");
    let Some(env) = env(kind, &format!("{name} overhead"), true) else {
        return;
    };
    let rt = runtime_dir();
    let http = UdsClient::new(Duration::from_secs(10));
    const CALLS: usize = 2000;

    // (a) GetVmInfo latency, sequential, one Running VM each way. First VMCP in this
    // process (as in earlier runs), on its own.
    let in_process = serve(
        kind,
        &env,
        &rt.path().join("in"),
        Arc::new(vmcp::adapters::outbound::store::memory::MemoryStore::new()),
    )
    .await;
    let c = client(in_process.local_addr, false);
    let via_in = info_latency(in_process.local_addr, &env, CALLS, || connect_info(&c)).await;
    in_process.shutdown().await;
    // Then VMCP as it runs in production, the `vmcp-api` binary in its own process
    // (SQLite store, auth and limit layers, JSON logs), and the VMM asked directly, side
    // by side: both VMs run at once and the calls interleave, the order rotating each
    // round, so a change in this shared nested-KVM host's speed falls on every way
    // alike. Ways: Connect binary over TCP; the same client on both sides (vmcp's own
    // pooled Unix-socket client: Connect JSON or Connect binary, vmcpctl's encoding,
    // on vmcp-api's API socket, a plain GET on the VMM's).
    // From here on VMs' runtime files, both ways, are on a tmpfs as in
    // production; vmcp-api's store stays on disk under `rt`.
    let (files, files_base) = tmpfs_runtime_dir();
    println!(
        "(runtime files of VMs, via VMCP and direct, under {files_base}; vmcp-api's store under /tmp)"
    );
    let on_tmpfs = files.path().join("vmcp-rt");
    let server = Server::spawn_with(
        kind,
        &env,
        rt.path(),
        &[(
            "UNKEY_VMCP_RUNTIME_DIR",
            on_tmpfs.to_str().expect("a UTF-8 path"),
        )],
    )
    .await;
    let c = client(server.addr, false);
    start_info(&c, &env).await;
    let d = direct_boot(kind, &env, &http, &files.path().join("d")).await;
    let request = Bytes::from_static(br#"{"vmId":"info"}"#);
    let binary = pb::GetVmInfoRequest {
        vm_id: "info".into(),
        ..Default::default()
    }
    .encode_to_bytes();
    let mut samples: [Vec<Duration>; 4] = Default::default();
    let (api_pid, vmm_pid) = (server.child.id(), d.child.id().expect("the VMM runs"));
    let cpu_before = (serving_cpu(api_pid), serving_cpu(vmm_pid));
    for round in 0..CALLS {
        for k in 0..4 {
            let way = (round + k) % 4;
            let t = Instant::now();
            match way {
                0 => connect_info(&c).await,
                1 => {
                    let r = http
                        .call(
                            &server.socket,
                            Method::POST,
                            "/vmm.v1.VmService/GetVmInfo",
                            Some(request.clone()),
                        )
                        .await
                        .expect("GetVmInfo over the API socket");
                    assert!(r.is_success());
                }
                2 => {
                    let r = http
                        .call_typed(
                            &server.socket,
                            Method::POST,
                            "/vmm.v1.VmService/GetVmInfo",
                            binary.clone(),
                            "application/proto",
                        )
                        .await
                        .expect("GetVmInfo over the API socket, Connect binary");
                    assert!(r.is_success());
                }
                _ => {
                    let r = http
                        .call(&d.socket, Method::GET, info_path(kind), None)
                        .await
                        .expect("direct info");
                    assert!(r.is_success());
                }
            }
            samples[way].push(t.elapsed());
        }
    }
    let cpu = (
        serving_cpu(api_pid).saturating_sub(cpu_before.0),
        serving_cpu(vmm_pid).saturating_sub(cpu_before.1),
    );
    let [via, via_socket, via_socket_binary, direct] = samples.map(|s| {
        let busy = s.iter().sum();
        Stats::from(s, busy)
    });
    delete_info(&c).await;
    d.kill().await;
    println!(
        "{}",
        via_in.line("GetVmInfo via VMCP in-process (Connect binary, sequential)")
    );
    println!(
        "{}",
        via.line("GetVmInfo via vmcp-api process (Connect binary, sequential)")
    );
    println!(
        "{}",
        direct.line(&format!(
            "GET {} direct (one pooled connection)",
            info_path(kind)
        ))
    );
    println!(
        "{}",
        via_socket.line("GetVmInfo via vmcp-api API socket (UdsClient, Connect JSON)")
    );
    println!(
        "{}",
        via_socket_binary.line("GetVmInfo via vmcp-api API socket (UdsClient, Connect binary)")
    );
    // CPU time is what scheduling noise on this host does not move: vmcp-api served three
    // of every four calls, the VMM one.
    let per_call = |t: Duration, n: usize| t.as_secs_f64() * 1e6 / n as f64;
    println!(
        "CPU per GetVmInfo: vmcp-api {:.1} us, {name} itself (GET {}, vCPU threads excluded) {:.1} us",
        per_call(cpu.0, 3 * CALLS),
        info_path(kind),
        per_call(cpu.1, CALLS)
    );
    println!(
        "RATIO {name} GetVmInfo vmcp-api API socket/direct (same client): p50 {:.2}x, p99 {:.2}x",
        via_socket.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        via_socket.p99.as_secs_f64() / direct.p99.as_secs_f64()
    );
    println!(
        "RATIO {name} GetVmInfo vmcp-api API socket, Connect binary/direct (same client): p50 {:.2}x, p99 {:.2}x",
        via_socket_binary.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        via_socket_binary.p99.as_secs_f64() / direct.p99.as_secs_f64()
    );
    println!(
        "RATIO {name} GetVmInfo VMCP in-process/direct: p50 {:.2}x, p99 {:.2}x",
        via_in.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        via_in.p99.as_secs_f64() / direct.p99.as_secs_f64()
    );
    println!(
        "RATIO {name} GetVmInfo vmcp-api process/direct: p50 {:.2}x, p99 {:.2}x",
        via.p50.as_secs_f64() / direct.p50.as_secs_f64(),
        via.p99.as_secs_f64() / direct.p99.as_secs_f64()
    );

    // (b) create + boot to Running, 30 each, via VMCP and directly, with the
    // runtime files on the tmpfs and, as context, on /tmp's file system (a
    // second vmcp-api rooted there): the four ways in turn, the order rotating
    // each round, so that all see the host at the same moments.
    let disk = rt.path().join("disk");
    std::fs::create_dir_all(&disk).expect("a directory under /tmp");
    let disk_server = Server::spawn(kind, &env, &disk).await;
    let disk_c = client(disk_server.addr, false);
    const ITER: usize = 30;
    let mut times: [Vec<Duration>; 4] = Default::default();
    for i in 0..ITER {
        for k in 0..4 {
            let way = (i + k) % 4;
            let (c, dir) = match way {
                0 | 1 => (&c, files.path()),
                _ => (&disk_c, disk.as_path()),
            };
            let t = Instant::now();
            if way % 2 == 0 {
                let id = format!("cb{i}");
                let state = create_and_boot(c, &id, &env.guest).await;
                times[way].push(t.elapsed());
                assert_eq!(state, Some(pb::VmState::VM_STATE_RUNNING));
                c.delete_vm(pb::DeleteVmRequest {
                    vm_id: id,
                    ..Default::default()
                })
                .await
                .expect("delete");
            } else {
                let d = direct_boot(kind, &env, &http, &dir.join(format!("d{i}"))).await;
                times[way].push(t.elapsed());
                d.kill().await;
            }
        }
    }
    let burst = at_once(kind, &env, &http, &c, files.path()).await;
    server.stop();
    // The same burst with every runtime file on /tmp's file system.
    let on_disk = at_once(kind, &env, &http, &disk_c, &disk).await;
    disk_server.stop();
    let [via, direct, disk_via, disk_direct] = times.clone().map(median);
    println!(
        "create+boot via VMCP   median {:>8.2} ms  max {:>8.2} ms  (n={ITER}, in turn with direct)",
        ms(via),
        ms(*times[0].iter().max().unwrap())
    );
    println!(
        "create+boot direct     median {:>8.2} ms  max {:>8.2} ms  (n={ITER})",
        ms(direct),
        ms(*times[1].iter().max().unwrap())
    );
    println!(
        "RATIO {name} create+boot VMCP/direct (medians): {:.2}x",
        via.as_secs_f64() / direct.as_secs_f64()
    );
    println!(
        "create+boot, runtime files on /tmp's file system: via VMCP median {:.2} ms, direct {:.2} ms ({:.2}x; same rounds)",
        ms(disk_via),
        ms(disk_direct),
        disk_via.as_secs_f64() / disk_direct.as_secs_f64()
    );

    println!(
        "{AT_ONCE} created and booted at once: via VMCP {:.1} ms, direct {:.1} ms (wall until all Running, means of {AT_ONCE_ROUNDS} rounds each, in pairs)",
        ms(burst.wall.0),
        ms(burst.wall.1)
    );
    println!(
        "RATIO {name} {AT_ONCE} at once VMCP/direct (wall; median of {AT_ONCE_ROUNDS} pairs' ratios): {:.2}x",
        burst.pair_ratio
    );
    println!(
        "{AT_ONCE} created and booted at once, runtime files on /tmp's file system: via VMCP {:.1} ms, direct {:.1} ms, median of pairs' ratios {:.2}x",
        ms(on_disk.wall.0),
        ms(on_disk.wall.1),
        on_disk.pair_ratio
    );
    println!(
        "{AT_ONCE} running VMs paused then resumed at once: via VMCP {:.1} ms, direct {:.1} ms (wall, medians of {TOGGLES}, mean of {AT_ONCE_ROUNDS} rounds)",
        ms(burst.toggle.0),
        ms(burst.toggle.1)
    );
    println!(
        "RATIO {name} {AT_ONCE} pause+resume at once VMCP/direct (wall): {:.2}x",
        burst.toggle.0.as_secs_f64() / burst.toggle.1.as_secs_f64()
    );

    if kind == Kind::Fc {
        spawn_ready(&env, rt.path()).await;
    }
}

/// CreateVm then BootVm of `id` through VMCP: the state BootVm answers.
async fn create_and_boot(
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    id: &str,
    guest: &Path,
) -> Option<pb::VmState> {
    c.create_vm(create_req(id, guest)).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .expect("boot")
    .into_owned()
    .state
    .as_known()
}

/// How many VMs the at-once row starts together.
const AT_ONCE: usize = 32;

/// How many rounds of [`AT_ONCE`] each way: the host's swings between rounds
/// are as large as the difference measured.
const AT_ONCE_ROUNDS: u32 = 6;

/// How many times the at-once VMs are paused and resumed together.
const TOGGLES: usize = 5;

/// What [`at_once`] measured, each way.
struct AtOnce {
    /// Mean wall time until all VMs run: through VMCP, directly.
    wall: (Duration, Duration),
    /// Median of the per-pair ratios via/direct of that wall time.
    pair_ratio: f64,
    /// Mean of each round's median pause+resume wall time: through VMCP, directly.
    toggle: (Duration, Duration),
}

/// Wall time until [`AT_ONCE`] VMs, created and booted together, all run,
/// and the median wall time to pause all of them at once and then resume
/// all of them at once: through VMCP (client `c`) and directly, in
/// [`AT_ONCE_ROUNDS`] pairs of rounds, via first in one pair and direct
/// first in the next, so that both see the host at the same moments. Each
/// pair gives a ratio: its two rounds ran seconds apart, so a slow spell of
/// this shared host weighs on both.
async fn at_once(
    kind: Kind,
    env: &Env,
    http: &UdsClient,
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    root: &Path,
) -> AtOnce {
    let mut sums = AtOnce {
        wall: Default::default(),
        pair_ratio: 0.0,
        toggle: Default::default(),
    };
    let mut ratios = Vec::new();
    for pair in 0..AT_ONCE_ROUNDS {
        let (mut via, mut direct) = (Duration::ZERO, Duration::ZERO);
        for through_vmcp in [pair % 2 == 0, pair % 2 == 1] {
            if through_vmcp {
                let toggle;
                (via, toggle) = at_once_via(env, c).await;
                sums.wall.0 += via / AT_ONCE_ROUNDS;
                sums.toggle.0 += toggle / AT_ONCE_ROUNDS;
            } else {
                let dir = root.join(format!("r{pair}"));
                let toggle;
                (direct, toggle) = at_once_direct(kind, env, http, &dir).await;
                sums.wall.1 += direct / AT_ONCE_ROUNDS;
                sums.toggle.1 += toggle / AT_ONCE_ROUNDS;
            }
        }
        ratios.push(via.as_secs_f64() / direct.as_secs_f64());
    }
    ratios.sort_by(f64::total_cmp);
    sums.pair_ratio = ratios[ratios.len() / 2];
    sums
}

/// [`at_once`] through VMCP: (wall until all Running, median pause+resume).
async fn at_once_via(
    env: &Env,
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
) -> (Duration, Duration) {
    let t = Instant::now();
    let tasks: Vec<_> = (0..AT_ONCE)
        .map(|i| {
            let (c, guest) = (c.clone(), env.guest.clone());
            tokio::spawn(async move {
                let state = create_and_boot(&c, &format!("many{i}"), &guest).await;
                assert_eq!(state, Some(pb::VmState::VM_STATE_RUNNING));
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("create+boot");
    }
    let via = t.elapsed();
    let mut toggles = Vec::new();
    for _ in 0..TOGGLES {
        let t = Instant::now();
        for pause in [true, false] {
            let calls = (0..AT_ONCE).map(|i| {
                let c = c.clone();
                let vm_id = format!("many{i}");
                async move {
                    let state = if pause {
                        c.pause_vm(pb::PauseVmRequest {
                            vm_id,
                            ..Default::default()
                        })
                        .await
                        .expect("pause")
                        .into_owned()
                        .state
                    } else {
                        c.resume_vm(pb::ResumeVmRequest {
                            vm_id,
                            ..Default::default()
                        })
                        .await
                        .expect("resume")
                        .into_owned()
                        .state
                    };
                    let want = if pause {
                        pb::VmState::VM_STATE_PAUSED
                    } else {
                        pb::VmState::VM_STATE_RUNNING
                    };
                    assert_eq!(state.as_known(), Some(want));
                }
            });
            futures_util::future::join_all(calls).await;
        }
        toggles.push(t.elapsed());
    }
    for i in 0..AT_ONCE {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: format!("many{i}"),
            force: true,
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    (via, median(toggles))
}

/// [`at_once`] directly on the VMMs, in `root`.
async fn at_once_direct(
    kind: Kind,
    env: &Env,
    http: &UdsClient,
    root: &Path,
) -> (Duration, Duration) {
    let t = Instant::now();
    let boots = (0..AT_ONCE).map(|i| {
        let dir = root.join(format!("m{i}"));
        async move { direct_boot(kind, env, http, &dir).await }
    });
    let vmms = futures_util::future::join_all(boots).await;
    let direct = t.elapsed();
    let mut direct_toggles = Vec::new();
    for _ in 0..TOGGLES {
        let t = Instant::now();
        for pause in [true, false] {
            let calls = vmms.iter().map(|d| async move {
                let r = match (kind, pause) {
                    (Kind::Ch, true) => http.call(&d.socket, Method::PUT, "/api/v1/vm.pause", None),
                    (Kind::Ch, false) => {
                        http.call(&d.socket, Method::PUT, "/api/v1/vm.resume", None)
                    }
                    (Kind::Fc, pause) => {
                        let state = if pause { "Paused" } else { "Resumed" };
                        let body = serde_json::json!({ "state": state }).to_string();
                        http.call(&d.socket, Method::PATCH, "/vm", Some(Bytes::from(body)))
                    }
                }
                .await
                .expect("VMM call");
                assert!(r.is_success(), "pause/resume: {}", r.text());
            });
            futures_util::future::join_all(calls).await;
        }
        direct_toggles.push(t.elapsed());
    }
    for d in vmms {
        d.kill().await;
    }
    (direct, median(direct_toggles))
}

/// CPU time so far of every thread of `pid`, from /proc/<pid>/task/*/schedstat (ns).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Firecracker spawn until its API socket accepts and until `GET /` answers.
async fn spawn_ready(env: &Env, root: &Path) {
    println!();
    println!("== firecracker: spawn to API ready (20 spawns) ==");
    let http = UdsClient::new(Duration::from_secs(5));
    let mut accept = Vec::new();
    let mut answer = Vec::new();
    let mut cpu = Vec::new();
    for i in 0..20 {
        let dir = root.join(format!("s{i}"));
        let t = Instant::now();
        let d = Direct::spawn(Kind::Fc, &env.binary, &dir);
        let socket = d.socket.clone();
        let deadline = t + Duration::from_secs(10);
        // Tight poll: a connect that succeeds means the API thread listens.
        let accepted = tokio::task::spawn_blocking(move || {
            loop {
                if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                    return Some(Instant::now());
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        })
        .await
        .unwrap()
        .expect("firecracker API socket within 10 s");
        let used = cpu_ns(d.pid());
        wait_ready(&http, &d.socket, "/").await;
        answer.push(t.elapsed());
        accept.push(accepted - t);
        cpu.push(Duration::from_nanos(used));
        d.kill().await;
    }
    let p = |v: &Vec<Duration>| {
        let s = Stats::from(v.clone(), Duration::from_secs(1));
        (ms(s.p50), ms(s.p99))
    };
    let (a50, a99) = p(&accept);
    let (g50, g99) = p(&answer);
    let (c50, c99) = p(&cpu);
    println!("spawn -> socket accepts      median {a50:>7.2} ms  p99 {a99:>7.2} ms (wall)");
    println!("spawn -> GET / answered      median {g50:>7.2} ms  p99 {g99:>7.2} ms (wall)");
    println!(
        "VMM CPU time when accepting  median {c50:>7.2} ms  p99 {c99:>7.2} ms (all threads, schedstat; spec: 8 CPU-ms)"
    );
}
