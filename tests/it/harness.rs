//! Starting and stopping the server for a test, and clients for each protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use connectrpc::Protocol;
use connectrpc::client::{ClientConfig, HttpClient};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use vmcp::adapters::inbound::server::{RpcHttpService, RpcLimits};
use vmcp::adapters::outbound::snapshots::FsSnapshots;
use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::app::manager::snapshots::SnapshotSettings;
use vmcp::app::security::Security;
use vmcp::app::wiring::{Running, StartOptions, start};
use vmcp::domain::snapshot::SnapshotLimits;
use vmcp::ports::{NoopTelemetry, SystemClock, Telemetry, VmStore};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmServiceClient;

use super::double::Double;

/// Largest request body the test server accepts.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The test server's hypervisor call timeout.
pub const HYPERVISOR_TIMEOUT: Duration = Duration::from_millis(500);

/// The wire protocols a client can speak.
#[derive(Debug, Clone, Copy)]
pub enum Wire {
    ConnectJson,
    ConnectProto,
    Grpc,
    GrpcWeb,
}

pub const ALL_WIRES: [Wire; 4] = [
    Wire::ConnectJson,
    Wire::ConnectProto,
    Wire::Grpc,
    Wire::GrpcWeb,
];

/// Wraps the server's RPC route (see [`StartOptions::wrap_rpc`]).
pub type WrapRpc = Box<dyn FnOnce(RpcHttpService) -> RpcHttpService + Send>;

/// A running server over the test double, with its records in `S` (the
/// memory store unless a test asks for another, such as SQLite).
pub struct Harness<S: VmStore = MemoryStore> {
    pub double: Arc<Double>,
    #[allow(dead_code)] // kept so restart tests can reuse the same store
    pub store: Arc<S>,
    pub addr: SocketAddr,
    running: Option<Running>,
    /// The snapshot directory made for this server (when the test named none).
    _snapshot_dir: Option<tempfile::TempDir>,
}

/// Snapshots under `dir`, with room for 16 of them.
pub fn snapshot_settings(dir: &std::path::Path) -> SnapshotSettings {
    SnapshotSettings {
        repo: Arc::new(FsSnapshots::open(dir).expect("snapshot repository")),
        limits: SnapshotLimits {
            max_count: 16,
            max_bytes: 1 << 30,
        },
    }
}

impl Harness {
    /// A fresh server with a fresh double and store.
    pub async fn start() -> Self {
        Self::start_with(Arc::new(Double::new()), Arc::new(MemoryStore::new())).await
    }

    /// A server over an existing double and store (restart tests).
    pub async fn start_with(double: Arc<Double>, store: Arc<MemoryStore>) -> Self {
        Self::start_full(double, store, Security::open(), true).await
    }

    /// A server over an existing double and store, protected by `security` (restart tests).
    pub async fn start_with_security(
        double: Arc<Double>,
        store: Arc<MemoryStore>,
        security: Security,
    ) -> Self {
        Self::start_full(double, store, security, true).await
    }

    /// Like [`Harness::start_with`], but orphaned VMMs are only reported, never removed.
    pub async fn start_reporting_orphans(double: Arc<Double>, store: Arc<MemoryStore>) -> Self {
        Self::start_full(double, store, Security::open(), false).await
    }

    /// A fresh server protected by `security` (auth, TLS, limits, path policy).
    pub async fn start_secured(security: Security) -> Self {
        Self::start_full(
            Arc::new(Double::new()),
            Arc::new(MemoryStore::new()),
            security,
            true,
        )
        .await
    }

    /// A fresh server protected by `security` (connection limits included)
    /// that reports to `telemetry` (connection refusals and timeouts).
    pub async fn start_observed(security: Security, telemetry: Arc<dyn Telemetry>) -> Self {
        Self::start_reporting(
            Arc::new(Double::new()),
            Arc::new(MemoryStore::new()),
            security,
            true,
            telemetry,
        )
        .await
    }

    /// A fresh server whose RPC route is wrapped by `wrap` (a server missing an RPC, say).
    #[allow(dead_code)] // used by some test modules only
    pub async fn start_wrapped(wrap: WrapRpc) -> Self {
        Self::start_at(
            Arc::new(Double::new()),
            Arc::new(MemoryStore::new()),
            Security::open(),
            Arc::new(NoopTelemetry),
            "127.0.0.1:0".parse().unwrap(),
            wrap,
        )
        .await
    }

    /// A server over an existing double and store on a given address: the same
    /// server restarted where its clients reconnect.
    #[allow(dead_code)] // used by some test modules only
    pub async fn restart_at(
        double: Arc<Double>,
        store: Arc<MemoryStore>,
        addr: SocketAddr,
    ) -> Self {
        Self::start_at(
            double,
            store,
            Security::open(),
            Arc::new(NoopTelemetry),
            addr,
            Box::new(|s| s),
        )
        .await
    }

    async fn start_full(
        double: Arc<Double>,
        store: Arc<MemoryStore>,
        security: Security,
        remove_orphans: bool,
    ) -> Self {
        Self::start_reporting(
            double,
            store,
            security,
            remove_orphans,
            Arc::new(NoopTelemetry),
        )
        .await
    }

    async fn start_reporting(
        double: Arc<Double>,
        store: Arc<MemoryStore>,
        security: Security,
        remove_orphans: bool,
        telemetry: Arc<dyn Telemetry>,
    ) -> Self {
        Self::start_options(
            double,
            store,
            security,
            remove_orphans,
            telemetry,
            "127.0.0.1:0".parse().unwrap(),
            Box::new(|s| s),
        )
        .await
    }

    async fn start_at(
        double: Arc<Double>,
        store: Arc<MemoryStore>,
        security: Security,
        telemetry: Arc<dyn Telemetry>,
        addr: SocketAddr,
        wrap: WrapRpc,
    ) -> Self {
        Self::start_options(double, store, security, true, telemetry, addr, wrap).await
    }
}

impl<S: VmStore> Harness<S> {
    /// A server over an existing double and any store, protected by `security`
    /// (recovery tests on the SQLite store).
    #[allow(dead_code)] // used by some test modules only
    pub async fn start_on(double: Arc<Double>, store: Arc<S>, security: Security) -> Self {
        Self::start_options(
            double,
            store,
            security,
            true,
            Arc::new(NoopTelemetry),
            "127.0.0.1:0".parse().unwrap(),
            Box::new(|s| s),
        )
        .await
    }

    async fn start_options(
        double: Arc<Double>,
        store: Arc<S>,
        security: Security,
        remove_orphans: bool,
        telemetry: Arc<dyn Telemetry>,
        addr: SocketAddr,
        wrap_rpc: WrapRpc,
    ) -> Self {
        // Snapshots go to a directory of this server's own unless the test names one.
        let mut security = security;
        let snapshot_dir = match security.snapshots {
            Some(_) => None,
            None => {
                let dir = tempfile::tempdir().expect("snapshot dir");
                security.snapshots = Some(snapshot_settings(dir.path()));
                Some(dir)
            }
        };
        let running = start(
            Arc::clone(&double),
            Arc::clone(&store),
            StartOptions {
                addr,
                limits: RpcLimits {
                    max_request_bytes: MAX_REQUEST_BYTES,
                    max_deadline: Duration::from_secs(30),
                },
                hypervisor_timeout: HYPERVISOR_TIMEOUT,
                shutdown_grace: Duration::from_secs(5),
                remove_orphans,
                telemetry,
                telemetry_status: Arc::new(|| "disabled".to_owned()),
                wrap_rpc,
                clock: Arc::new(SystemClock),
                on_vm_counts: None,
                security,
            },
        )
        .await
        .expect("server starts");
        Self {
            double,
            store,
            addr: running.local_addr,
            running: Some(running),
            _snapshot_dir: snapshot_dir,
        }
    }

    /// GetVmInfo of `id` over Connect binary; panics if it fails.
    pub async fn info(&self, id: &str) -> pb::GetVmInfoResponse {
        self.client(Wire::ConnectProto)
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: id.into(),
                ..Default::default()
            })
            .await
            .expect("info")
            .into_owned()
    }

    /// A client speaking `wire`.
    pub fn client(&self, wire: Wire) -> VmServiceClient<HttpClient> {
        self.client_inner(wire, None)
    }

    /// A client speaking `wire` that sends `Authorization: Bearer <token>`.
    pub fn client_with_token(&self, wire: Wire, token: &str) -> VmServiceClient<HttpClient> {
        self.client_inner(wire, Some(token))
    }

    fn client_inner(&self, wire: Wire, token: Option<&str>) -> VmServiceClient<HttpClient> {
        let (http, config) = transport(self.addr, wire);
        let config = match token {
            Some(t) => config.with_default_header("authorization", format!("Bearer {t}")),
            None => config,
        };
        VmServiceClient::new(http, config)
    }

    /// Raw HTTP/1.1 request; returns status, headers and body.
    pub async fn raw(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (http::StatusCode, http::HeaderMap, String) {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path_and_query));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = client
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .expect("request sent");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body read").to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    /// An HTTP/2 (prior knowledge) connection to the server: its sender, and
    /// the task driving it, which ends when either side closes it.
    pub async fn h2(
        &self,
    ) -> (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let (sender, conn) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("HTTP/2 handshake");
        (sender, tokio::spawn(conn))
    }

    /// POST a Connect JSON request.
    pub async fn post_json(
        &self,
        method: &str,
        json: &str,
    ) -> (http::StatusCode, serde_json::Value) {
        let (status, _, body) = self
            .raw(
                "POST",
                &format!("/vmm.v1.VmService/{method}"),
                &[("content-type", "application/json")],
                json.to_owned(),
            )
            .await;
        let value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
        (status, value)
    }

    /// Stops the server gracefully.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

impl<S: VmStore> Drop for Harness<S> {
    fn drop(&mut self) {
        // A test that panicked leaves the server task to the runtime's teardown.
        self.running.take();
    }
}

/// A small valid config.
pub fn config() -> pb::VmConfig {
    pb::VmConfig {
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
            kernel_path: "/var/lib/vmcp/kernel.elf".into(),
            kernel_args: "console=ttyS0".into(),
            ..Default::default()
        }
        .into(),
        metadata: [("team".to_owned(), "a".to_owned())].into_iter().collect(),
        ..Default::default()
    }
}

/// A create request for `id` with [`config`].
pub fn create_req(id: &str) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        vm_id: id.into(),
        config: config().into(),
        ..Default::default()
    }
}

/// Polls `f` until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client for the server at `addr` speaking `wire`.
pub fn client_for(addr: SocketAddr, wire: Wire) -> VmServiceClient<HttpClient> {
    let (http, config) = transport(addr, wire);
    VmServiceClient::new(http, config)
}

/// The HTTP client and config for `wire` against `addr`.
fn transport(addr: SocketAddr, wire: Wire) -> (HttpClient, ClientConfig) {
    let base = format!("http://{addr}").parse().unwrap();
    match wire {
        Wire::ConnectJson => (HttpClient::plaintext(), ClientConfig::new(base).json()),
        Wire::ConnectProto => (HttpClient::plaintext(), ClientConfig::new(base).proto()),
        Wire::Grpc => (
            HttpClient::plaintext_http2_only(),
            ClientConfig::new(base).with_protocol(Protocol::Grpc),
        ),
        Wire::GrpcWeb => (
            HttpClient::plaintext(),
            ClientConfig::new(base).with_protocol(Protocol::GrpcWeb),
        ),
    }
}

/// A small deterministic generator (xorshift64*) for randomized tests, so a
/// printed seed replays a run.
pub struct Rng(pub u64);

impl Rng {
    /// A generator from `VMCP_TEST_SEED` when set, else from the clock; says which.
    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("VMCP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(7)
                    | 1
            });
        super::real_env::say(&format!(
            "{test}: seed {seed} (replay with VMCP_TEST_SEED={seed})"
        ));
        Self(seed)
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A new generator for another task, seeded from this one.
    pub fn fork(&mut self) -> Self {
        Self(self.next() | 1)
    }
}

/// A `vmcp-api` process a test started, ended (and reaped) when dropped.
pub struct ApiProcess {
    /// The process.
    pub child: std::process::Child,
    /// Where its API listens.
    pub addr: SocketAddr,
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What every test that runs the real `vmcp-api` binary gives it: none of the
/// test's own environment but PATH, the API on loopback `port`, runtime and data
/// directories under `dir`, seed endpoints that do not exist, warnings only, and
/// its output discarded. The caller adds the backend and anything else.
pub fn vmcp_api_env(cmd: &mut std::process::Command, dir: &std::path::Path, port: u16) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("UNKEY_VMCP_ADDRESS", "127.0.0.1")
        .env("UNKEY_VMCP_PORT", port.to_string())
        .env(
            "UNKEY_VMCP_CH_ENDPOINT",
            format!("unix://{}", dir.join("seed-ch.sock").display()),
        )
        .env(
            "UNKEY_VMCP_FC_ENDPOINT",
            format!("unix://{}", dir.join("seed-fc.sock").display()),
        )
        .env("UNKEY_VMCP_RUNTIME_DIR", dir.join("rt"))
        .env("UNKEY_VMCP_DATA_DIR", dir.join("data"))
        .env("UNKEY_VMCP_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
}

/// Waits until the server at `addr` serves VM calls (recovery is over).
pub async fn wait_serving(addr: SocketAddr, within: Duration) {
    let up = eventually(within, || async move {
        let c = client_for(addr, Wire::ConnectProto);
        c.list_vms(pb::ListVmsRequest::default()).await.is_ok()
    })
    .await;
    assert!(up, "vmcp-api serves VM calls after recovery");
}
