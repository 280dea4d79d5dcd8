//! How VMCP's costs grow with the number of VMs (issue 14):
//!
//! - reads at N VMs (in the bench's process, the test double): a ListVms
//!   page of 100 (the first and one from the middle) and a GetVmInfo, p50;
//! - the `vmcp-api` binary on fake Firecracker processes (the project's
//!   `fake-firecracker` example, which speaks the API and outlives its
//!   parent like the real VMM): idle RSS, then N VMs created and booted,
//!   RSS per VM, a kill -9 of VMCP and its start-to-serving time with N
//!   VMMs to re-adopt;
//! - RSS per tracked VM at 10,000 stored records whose VMMs are gone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcp::adapters::outbound::store::sqlite::SqliteStore;
use vmcp::domain::{Desired, VmConfig, VmId, VmSnapshot, VmState};
use vmcp::ports::{VmRecord, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

use connectrpc::client::{ClientConfig, HttpClient};

use super::client;
use super::vmm::{create_req, runtime_dir};
use super::watch::rss_kib;

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn p50_of<F, Fut>(n: usize, mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        call().await;
        samples.push(t.elapsed());
    }
    p50(samples)
}

/// Creates VMs `vm-<from>`..`vm-<to>` with `kernel` (and boots them when
/// asked), 16 clients at once.
async fn create_range(
    c: &VmServiceClient<HttpClient>,
    (from, to): (usize, usize),
    kernel: &Path,
    boot: bool,
) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(from));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let c = c.clone();
        let next = Arc::clone(&next);
        let kernel = kernel.to_owned();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= to {
                    return;
                }
                let id = format!("vm-{i:05}");
                c.create_vm(create_req(&id, &kernel)).await.expect("create");
                if boot {
                    c.boot_vm(pb::BootVmRequest {
                        vm_id: id,
                        ..Default::default()
                    })
                    .await
                    .expect("boot");
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("creator");
    }
}

/// ListVms and GetVmInfo at 10, 100, 1,000 and 10,000 VMs on the test double.
async fn reads() {
    println!();
    println!(
        "== Reads as the VM count grows (bench's process, a backend that answers at once, Connect binary, sequential) =="
    );
    // No limits: `options()` admits everything.
    let running = vmcp::app::wiring::start(
        Arc::new(super::null::Null::default()),
        Arc::new(vmcp::adapters::outbound::store::memory::MemoryStore::new()),
        super::vmm::options(),
    )
    .await
    .expect("server starts");
    let c = client(running.local_addr, false);
    println!(
        "{:>7}  {:>22}  {:>22}  {:>14}",
        "VMs", "ListVms 1st page of 100", "ListVms mid page of 100", "GetVmInfo"
    );
    let mut have = 0;
    let mut base = None;
    for n in [10, 100, 1_000, 10_000] {
        create_range(&c, (have, n), Path::new("/k"), false).await;
        have = n;
        let first = p50_of(300, || async {
            let page = c
                .list_vms(pb::ListVmsRequest {
                    page_size: 100,
                    ..Default::default()
                })
                .await
                .expect("list")
                .into_owned();
            assert_eq!(page.total_count as usize, n);
        })
        .await;
        let mid_token = vmcp::app::manager::paging::encode_token(
            &VmId::parse(&format!("vm-{:05}", n / 2)).expect("id"),
        );
        let mid = p50_of(300, || async {
            c.list_vms(pb::ListVmsRequest {
                page_size: 100,
                page_token: mid_token.clone(),
                ..Default::default()
            })
            .await
            .expect("list");
        })
        .await;
        let id = format!("vm-{:05}", n / 3);
        let info = p50_of(300, || async {
            c.get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("info");
        })
        .await;
        let base_first = *base.get_or_insert(first);
        println!(
            "{n:>7}  {:>12.3} ms ({:>4.2}×)  {:>19.3} ms  {:>11.3} ms",
            ms(first),
            first.as_secs_f64() / base_first.as_secs_f64(),
            ms(mid),
            ms(info)
        );
    }
    running.shutdown().await;
}

/// The `fake-firecracker` example next to this bench's target dir.
pub fn fake_firecracker() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("examples/fake-firecracker");
    bin.is_file().then_some(bin)
}

/// A vmcp-api process on the fake Firecracker, killed (-9) on drop.
pub struct Api {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    token: Option<String>,
}

impl Api {
    async fn start(dir: &Path, fake: &Path) -> (Self, Duration) {
        Self::start_with(dir, fake, &[], None).await
    }

    /// Starts vmcp-api rooted at `dir` with `extra` variables (set after the
    /// defaults, so they win) and, when the server wants one, `token`; answers
    /// it and how long it took until it served VM calls.
    pub async fn start_with(
        dir: &Path,
        fake: &Path,
        extra: &[(String, String)],
        token: Option<&str>,
    ) -> (Self, Duration) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let t = Instant::now();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmcp-api"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("UNKEY_VMCP_ADDRESS", "127.0.0.1")
            .env("UNKEY_VMCP_PORT", port.to_string())
            .env("UNKEY_VMCP_BACKEND", "firecracker")
            .env("UNKEY_VMCP_FC_BINARY", fake)
            .env("UNKEY_VMCP_RUNTIME_DIR", dir.join("rt"))
            .env("UNKEY_VMCP_DATA_DIR", dir.join("data"))
            .env(
                "UNKEY_VMCP_FC_ENDPOINT",
                format!("unix://{}/seed-fc.sock", dir.display()),
            )
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env("UNKEY_VMCP_RATE_LIMIT_RPS", "0")
            .env("UNKEY_VMCP_MAX_VMS", "20000")
            .env("UNKEY_VMCP_MAX_TOTAL_VCPUS", "100000")
            .env("UNKEY_VMCP_MAX_TOTAL_MEMORY_MIB", "100000000")
            .env("UNKEY_VMCP_LOG_LEVEL", "warn")
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .envs(super::vmm::api_env())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("vmcp-api starts");
        let api = Self {
            child,
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            token: token.map(str::to_owned),
        };
        let c = api.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        // Serving VM calls means recovery is over.
        while c.list_vms(pb::ListVmsRequest::default()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "vmcp-api did not serve within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (api, t.elapsed())
    }

    /// A Connect-binary client, with the bearer token when there is one.
    pub fn client(&self) -> VmServiceClient<HttpClient> {
        let mut config =
            ClientConfig::new(format!("http://{}", self.addr).parse().expect("uri")).proto();
        if let Some(t) = &self.token {
            config = config.with_default_header("authorization", format!("Bearer {t}"));
        }
        VmServiceClient::new(HttpClient::plaintext(), config)
    }

    /// Its TCP port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A `firecracker` in `dir` that runs the fake so that it outlives its
/// parent (VMCP), as the real VMM does.
pub fn fake_wrapper(dir: &Path, fake: &Path) -> PathBuf {
    let wrapper = dir.join("firecracker");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec '{}' --fake-outlive-parent \"$@\"\n",
            fake.display()
        ),
    )
    .expect("wrapper");
    let mut perms = std::fs::metadata(&wrapper).expect("wrapper").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&wrapper, perms).expect("chmod");
    wrapper
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every VM listed, in pages of 1000.
async fn list_all(c: &VmServiceClient<HttpClient>) -> Vec<pb::VmInfo> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_vms(pb::ListVmsRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_owned();
        all.extend(page.vms);
        if page.next_page_token.is_empty() {
            return all;
        }
        token = page.next_page_token;
    }
}

/// Memory and recovery of the vmcp-api process with N VMMs.
async fn process(fake: &Path) {
    println!();
    println!(
        "== vmcp-api on fake Firecracker processes: RSS and restart (kill -9) with N VMMs to re-adopt =="
    );
    let root = runtime_dir();
    let wrapper = fake_wrapper(root.path(), fake);
    std::fs::write(root.path().join("k"), b"kernel").expect("kernel");

    let (api, _) = Api::start(root.path(), &wrapper).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(api.pid());
    println!("idle RSS: {:.1} MiB (no VMs)", idle as f64 / 1024.0);
    println!(
        "{:>6}  {:>13}  {:>16}  {:>18}  {:>18}",
        "VMMs", "RSS", "RSS per VM", "start-to-serving", "per VM"
    );
    let mut api = Some(api);
    let mut have = 0;
    let mut pids = Vec::new();
    for n in [10, 100, 1_000] {
        let running = api.take().expect("api");
        let c = running.client();
        create_range(&c, (have, n), &root.path().join("k"), true).await;
        have = n;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = rss_kib(running.pid());
        pids = vmcp::adapters::outbound::vmm::discovery::scan(&root.path().join("rt"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.process.map(|p| p.pid))
            .collect();
        assert_eq!(pids.len(), n, "every VM has a VMM");
        drop(running); // kill -9
        let (restarted, took) = Api::start(root.path(), &wrapper).await;
        let c = restarted.client();
        let vms = list_all(&c).await;
        let running_vms = vms
            .iter()
            .filter(|v| v.state.as_known() == Some(pb::VmState::VM_STATE_RUNNING))
            .count();
        println!(
            "{n:>6}  {:>9.1} MiB  {:>12.1} KiB  {:>15.1} ms  {:>15.3} ms   ({running_vms} of {n} Running after)",
            rss as f64 / 1024.0,
            (rss.saturating_sub(idle)) as f64 / n as f64,
            ms(took),
            ms(took) / n as f64,
        );
        api = Some(restarted);
    }
    // Delete every VM (their VMMs end), then end anything left by pid.
    if let Some(running) = api.take() {
        let c = running.client();
        let mut failed = 0;
        for v in list_all(&c).await {
            if let Err(e) = c
                .delete_vm(pb::DeleteVmRequest {
                    vm_id: v.vm_id.clone(),
                    force: true,
                    ..Default::default()
                })
                .await
            {
                failed += 1;
                if failed <= 3 {
                    println!("delete {} failed: {e}", v.vm_id);
                }
            }
        }
        if failed > 0 {
            println!("{failed} deletes failed");
        }
    }
    // Gone, or a zombie whose new parent (after VMCP's kill -9) has not reaped it yet.
    let alive = |p: &u32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    };
    let left: Vec<u32> = pids.into_iter().filter(alive).collect();
    for p in &left {
        let _ = std::process::Command::new("kill")
            .args(["-9", &p.to_string()])
            .status();
    }
    if !left.is_empty() {
        println!(
            "({} fake VMMs outlived their delete and were killed)",
            left.len()
        );
    }
}

/// RSS of vmcp-api tracking 10,000 VMs read from the store (their VMMs are gone).
async fn tracked(fake: &Path) {
    const N: usize = 10_000;
    let root = runtime_dir();
    let store = SqliteStore::open(&root.path().join("data")).expect("store");
    let config = {
        let mut c = VmConfig::default();
        c.cpu.vcpu_count = 1;
        c.memory.size_bytes = 64 << 20;
        c.boot.kernel_path = "/k".into();
        c
    };
    for i in 0..N {
        let snapshot = VmSnapshot {
            id: VmId::parse(&format!("vm-{i:05}")).expect("id"),
            config: config.clone(),
            desired: Desired::Running,
            state: VmState::Shutdown,
            reason: String::new(),
            generation: 1,
            created_at: 1,
            modified_at: 1,
            revision: i as u64 + 1,
            deleted: false,
        };
        store
            .put_unsynced(&VmRecord {
                snapshot,
                process: None,
                diff_parent: None,
            })
            .await
            .expect("put");
    }
    drop(store);
    let (api, took) = Api::start(root.path(), fake).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = rss_kib(api.pid());
    println!(
        "{N} tracked VMs (stored, no VMM): RSS {:.1} MiB, start-to-serving {:.0} ms",
        rss as f64 / 1024.0,
        ms(took)
    );
    assert_eq!(list_all(&api.client()).await.len(), N);
}

/// Only [`tracked`], for A/B runs of the per-VM memory.
pub async fn tracked_section() {
    match fake_firecracker() {
        Some(fake) => tracked(&fake).await,
        None => println!(
            "SKIPPED: tracked: missing the fake-firecracker example (run `cargo build --release --examples`)"
        ),
    }
}

pub async fn section() {
    reads().await;
    match fake_firecracker() {
        Some(fake) => {
            process(&fake).await;
            tracked(&fake).await;
        }
        None => println!(
            "SKIPPED: scale (vmcp-api process): missing the fake-firecracker example (run `cargo build --release --examples`)"
        ),
    }
}
