//! `make bench`: VMCP's speed and memory numbers, each printed as the raw
//! measurement and, where the issue asks for one, as a ratio measured in the
//! same run. Sections that need a real VMM say SKIPPED when it is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/it/double.rs"]
#[allow(dead_code)]
mod double;
#[path = "vmcp/durability.rs"]
mod durability;
#[path = "vmcp/null.rs"]
mod null;
#[path = "vmcp/otel.rs"]
mod otel;
#[path = "vmcp/scale.rs"]
mod scale;
#[path = "vmcp/snapshot.rs"]
mod snapshot;
#[path = "vmcp/throughput.rs"]
mod throughput;
#[path = "vmcp/vmm.rs"]
mod vmm;
#[path = "vmcp/watch.rs"]
mod watch;

use std::sync::Arc;
use std::time::{Duration, Instant};

use connectrpc::client::{ClientConfig, HttpClient};

use vmcp::adapters::inbound::server::RpcLimits;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::wiring::{Running, StartOptions, start};
use vmcp::ports::{NoopTelemetry, SystemClock, Telemetry};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

/// Latency summary of a run.
#[derive(Debug)]
pub struct Stats {
    pub count: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl Stats {
    pub fn from(mut samples: Vec<Duration>, elapsed: Duration) -> Self {
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
        Self {
            count: samples.len(),
            elapsed,
            p50: at(0.50),
            p99: at(0.99),
        }
    }

    pub fn rps(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }

    pub fn line(&self, what: &str) -> String {
        format!(
            "{what:<46} {:>9.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  (n={})",
            self.rps(),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.count
        )
    }
}

pub async fn start_double_server(
    telemetry: Arc<dyn Telemetry>,
    wrap: Box<
        dyn FnOnce(
                vmcp::adapters::inbound::server::RpcHttpService,
            ) -> vmcp::adapters::inbound::server::RpcHttpService
            + Send,
    >,
) -> (Running, Arc<double::Double>) {
    let d = Arc::new(double::Double::new());
    let running = start(
        Arc::clone(&d),
        Arc::new(MemoryStore::new()),
        StartOptions {
            addr: "127.0.0.1:0".parse().unwrap(),
            limits: RpcLimits {
                max_request_bytes: 1 << 20,
                max_deadline: Duration::from_secs(60),
            },
            hypervisor_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(1),
            remove_orphans: true,
            telemetry,
            telemetry_status: Arc::new(|| "disabled".to_owned()),
            wrap_rpc: wrap,
            clock: Arc::new(SystemClock),
            on_vm_counts: None,
            security: unlimited(),
        },
    )
    .await
    .expect("server starts");
    (running, d)
}

pub fn client(addr: std::net::SocketAddr, json: bool) -> VmServiceClient<HttpClient> {
    let base = ClientConfig::new(format!("http://{addr}").parse().unwrap());
    VmServiceClient::new(
        HttpClient::plaintext(),
        if json { base.json() } else { base.proto() },
    )
}

/// GetVmInfo from `concurrency` tasks for `dur`.
pub async fn read_load(
    addr: std::net::SocketAddr,
    json: bool,
    concurrency: usize,
    dur: Duration,
) -> Stats {
    let c = client(addr, json);
    let _ = c
        .create_vm(pb::CreateVmRequest {
            vm_id: "bench".into(),
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
                    kernel_path: "/k".into(),
                    ..Default::default()
                }
                .into(),
                ..Default::default()
            }
            .into(),
            ..Default::default()
        })
        .await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while started.elapsed() < dur {
                let t = Instant::now();
                c.get_vm_info(pb::GetVmInfoRequest {
                    vm_id: "bench".into(),
                    ..Default::default()
                })
                .await
                .expect("GetVmInfo");
                samples.push(t.elapsed());
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    Stats::from(all, started.elapsed())
}

fn main() {
    // `cargo test` runs bench targets with --test-ish args only under --all-targets; do nothing then.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // Child mode of the OTel section (see benches/vmcp/otel.rs).
    if let Ok(mode) = std::env::var("VMCP_BENCH_OTEL") {
        rt.block_on(otel::child(mode == "on", 32, Duration::from_secs(4)));
        return;
    }
    // Child mode of the throughput section: the bare hyper server.
    if let Ok(bodies) = std::env::var("VMCP_BENCH_BARE") {
        let (info, list) = bodies.split_once(',').expect("two bodies");
        rt.block_on(throughput::bare_child(
            hex::decode(info).expect("hex").into(),
            hex::decode(list).expect("hex").into(),
        ));
        return;
    }
    // Child mode of the store-memory section, so RSS starts from a fresh process.
    if std::env::var_os("VMCP_BENCH_STORE").is_some() {
        rt.block_on(durability::per_record());
        return;
    }
    // `VMCP_BENCH_SECTIONS=ch,fc` runs only those sections (read, otel, ch, fc, durability, watch, snapshot, scale or tracked, throughput, store).
    let only = std::env::var("VMCP_BENCH_SECTIONS").ok();
    let run = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s == name))
    };
    println!("VMCP benchmarks — {}", machine());
    // The OTel section compares with the read section's rate, so both run
    // when `otel` does.
    if run("read") || run("otel") {
        let bare = rt.block_on(read_section());
        if run("otel") {
            otel::section(bare);
        }
    }
    rt.block_on(async {
        if run("ch") {
            vmm::section(vmm::Kind::Ch).await;
        }
        if run("fc") {
            vmm::section(vmm::Kind::Fc).await;
        }
        if run("durability") {
            durability::readopt().await;
        }
        if run("watch") {
            watch::section().await;
        }
        if run("snapshot") {
            snapshot::section(vmm::Kind::Ch).await;
            snapshot::section(vmm::Kind::Fc).await;
        }
        if run("scale") {
            scale::section().await;
        } else if run("tracked") {
            // Only the memory of 10,000 tracked VMs (part of `scale`).
            scale::tracked_section().await;
        }
        if run("throughput") {
            throughput::section().await;
        }
    });
    if !run("store") {
        return;
    }
    println!();
    println!("== Durability: memory and disk per stored VM at 10000 records (own process) ==");
    match std::env::current_exe().and_then(|exe| {
        std::process::Command::new(exe)
            .env("VMCP_BENCH_STORE", "1")
            .output()
    }) {
        Ok(out) => {
            print!("{}", String::from_utf8_lossy(&out.stdout));
            if !out.status.success() {
                println!(
                    "store-memory child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Err(e) => println!("store-memory child could not start: {e}"),
    }
}

/// The read section: GetVmInfo from the test double in this process,
/// 32 clients; returns the Connect binary rate (the OTel section's "bare").
async fn read_section() -> f64 {
    println!();
    println!("== Read throughput against the test double (32 concurrent clients, 5 s each) ==");
    let (running, _d) = start_double_server(Arc::new(NoopTelemetry), Box::new(|s| s)).await;
    let addr = running.local_addr;
    let bin = read_load(addr, false, 32, Duration::from_secs(5)).await;
    println!("{}", bin.line("GetVmInfo, Connect binary"));
    let json = read_load(addr, true, 32, Duration::from_secs(5)).await;
    println!("{}", json.line("GetVmInfo, Connect JSON"));
    running.shutdown().await;
    bin.rps()
}

fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {model}, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        std::process::Command::new("date")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    )
}

/// The open server with the request rate limit off: the benches measure the
/// stack, not the limiter (which would answer `resource_exhausted` past 1000 req/s).
pub fn unlimited() -> vmcp::app::security::Security {
    let mut security = vmcp::app::security::Security::open();
    security.api_limits.rate_limit_rps = 0;
    security
}
