//! Service configuration, read from `UNKEY_VMCP_*` environment variables.
//! Every variable is declared once, in [`VARIABLES`] (name, default,
//! description); that one table drives unknown-variable detection, the
//! defaults used when parsing, and `vmcp-api --help`. Every variable is
//! parsed strictly: a bad value stops start-up with one line naming the
//! variable and the accepted values; nothing is silently defaulted. Unknown
//! `UNKEY_VMCP_*` variables are reported so typos surface.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapters::inbound::connections::{ConnectionLimits, H2Limits};
use crate::adapters::inbound::guard::ApiLimits;
use crate::ports::BackendKind;

use super::admission::VmLimits;
use super::feed::WatchSettings;
use crate::domain::restart::{RestartPolicy, RestartSettings};

/// The prefix of every variable.
pub const PREFIX: &str = "UNKEY_VMCP_";

/// What a variable means when it is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This text, parsed and checked exactly like a value from the environment.
    Text(&'static str),
    /// No value: the feature is off (or unrestricted).
    Unset,
    /// Computed at start-up from the host; the text says how.
    Computed(&'static str),
}

impl std::fmt::Display for DefaultValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DefaultValue::Text(t) | DefaultValue::Computed(t) => f.write_str(t),
            DefaultValue::Unset => f.write_str("unset"),
        }
    }
}

/// One declared variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variable {
    /// Which variable, for lookups that a typo cannot break.
    pub var: Var,
    /// The name without [`PREFIX`].
    pub name: &'static str,
    /// What applies when it is not set.
    pub default: DefaultValue,
    /// One line saying what it does.
    pub about: &'static str,
}

impl Variable {
    /// The full name, with [`PREFIX`].
    pub fn full_name(&self) -> String {
        format!("{PREFIX}{}", self.name)
    }
}

/// Declares the variables: the [`Var`] enum and the [`VARIABLES`] table in
/// the same order, so `VARIABLES[var as usize]` is `var`'s own entry.
macro_rules! variables {
    ($($id:ident $name:literal $default:expr, $about:literal;)*) => {
        /// A variable VMCP reads; `VARIABLES[v as usize]` declares it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Var { $($id),* }

        /// Every variable VMCP reads, in the order `vmcp-api --help` lists them.
        pub const VARIABLES: &[Variable] = &[
            $(Variable { var: Var::$id, name: $name, default: $default, about: $about }),*
        ];
    };
}

use DefaultValue::{Computed, Text, Unset};

// Adding a variable: one line here, then read it in `Config::from_vars`.
variables! {
    Port "PORT" Text("8080"), "API port";
    Address "ADDRESS" Text("0.0.0.0"), "API listen address (IPv4 or IPv6)";
    ApiSocket "API_SOCKET" Unset, "Also serve the API on this Unix socket (absolute path, mode 0600) for clients on the host";
    Backend "BACKEND" Text("cloudhypervisor"), "VMM backend: cloudhypervisor or firecracker";
    ChEndpoint "CH_ENDPOINT" Text("unix:///tmp/ch.sock"), "Seed compatibility: where a pre-VMCP shared Cloud Hypervisor may still listen";
    ChBinary "CH_BINARY" Text("cloud-hypervisor"), "Cloud Hypervisor binary (path or name on PATH)";
    FcEndpoint "FC_ENDPOINT" Text("unix:///tmp/firecracker.sock"), "Seed compatibility: where a pre-VMCP shared Firecracker may still listen";
    FcBinary "FC_BINARY" Text("firecracker"), "Firecracker binary (path or name on PATH)";
    FcJailerBinary "FC_JAILER_BINARY" Unset, "Run Firecracker under this jailer (production mode)";
    FcJailerUid "FC_JAILER_UID" Text("0"), "uid the jailed VMM runs as (with FC_JAILER_BINARY)";
    FcJailerGid "FC_JAILER_GID" Text("0"), "gid the jailed VMM runs as (with FC_JAILER_BINARY)";
    FcJailerChrootBase "FC_JAILER_CHROOT_BASE" Text("/srv/jailer"), "Base of the jailer chroots (with FC_JAILER_BINARY)";
    RuntimeDir "RUNTIME_DIR" Text("/run/vmcp"), "Per-VM runtime directories (socket, pid, log, console)";
    DataDir "DATA_DIR" Text("/var/lib/vmcp"), "Durable VM records";
    LogLevel "LOG_LEVEL" Text("info"), "Log filter; RUST_LOG wins when set";
    HypervisorTimeoutSeconds "HYPERVISOR_TIMEOUT_SECONDS" Text("30"), "Timeout of one VMM call";
    MaxRequestBytes "MAX_REQUEST_BYTES" Text("1048576"), "Largest request body";
    MaxDeadlineSeconds "MAX_DEADLINE_SECONDS" Text("600"), "Cap on client deadlines (Connect-Timeout-Ms, grpc-timeout)";
    ShutdownGraceSeconds "SHUTDOWN_GRACE_SECONDS" Text("30"), "How long shutdown drains in-flight requests";
    Orphans "ORPHANS" Text("remove"), "At start-up, remove VMM processes and runtime directories of no VM, or only report them";
    OtelEnabled "OTEL_ENABLED" Text("false"), "Push traces and metrics over OTLP/HTTP";
    OtelServiceName "OTEL_SERVICE_NAME" Text("vmm-controlplane"), "service.name";
    OtelServiceVersion "OTEL_SERVICE_VERSION" Text("0.0.1"), "service.version";
    OtelSamplingRate "OTEL_SAMPLING_RATE" Text("1.0"), "Root trace sampling ratio in [0, 1]; error traces are always kept";
    OtelEndpoint "OTEL_ENDPOINT" Text("localhost:4318"), "OTLP/HTTP collector";
    OtelPrometheusEnabled "OTEL_PROMETHEUS_ENABLED" Text("true"), "Serve /metrics";
    OtelPrometheusPort "OTEL_PROMETHEUS_PORT" Text("9464"), "/metrics port";
    AuthTokenFile "AUTH_TOKEN_FILE" Unset, "File holding the bearer token every VM call must send";
    TlsCertFile "TLS_CERT_FILE" Unset, "Serve the API over TLS with this PEM certificate chain (with TLS_KEY_FILE)";
    TlsKeyFile "TLS_KEY_FILE" Unset, "PEM private key for TLS_CERT_FILE";
    TlsClientCaFile "TLS_CLIENT_CA_FILE" Unset, "Require client certificates from this CA for VM calls (mutual TLS)";
    AssetDirs "ASSET_DIRS" Unset, "Directories (comma- or colon-separated) VM assets must resolve into; unset is unrestricted";
    MaxVms "MAX_VMS" Text("256"), "VMs per host";
    MaxVcpusPerVm "MAX_VCPUS_PER_VM" Text("32"), "vCPUs per VM";
    MaxMemoryPerVmMib "MAX_MEMORY_PER_VM_MIB" Text("65536"), "Memory per VM, MiB";
    MaxTotalVcpus "MAX_TOTAL_VCPUS" Computed("16 x host CPUs"), "vCPUs of all VMs together";
    MaxTotalMemoryMib "MAX_TOTAL_MEMORY_MIB" Computed("host memory"), "Memory of all VMs together, MiB";
    MaxConcurrentRequests "MAX_CONCURRENT_REQUESTS" Text("512"), "In-flight API requests; more are shed as unavailable";
    RateLimitRps "RATE_LIMIT_RPS" Text("1000"), "API requests per second (0 disables)";
    MaxConnections "MAX_CONNECTIONS" Computed("4096, lowered to fit the descriptor limit"), "Open client connections in all";
    MaxConnectionsPerClient "MAX_CONNECTIONS_PER_CLIENT" Text("512"), "Open connections per client IP address";
    ReservedFds "RESERVED_FDS" Computed("1/4 of the descriptor limit, at most 4096"), "Descriptors kept for VM work";
    HeaderReadTimeoutSeconds "HEADER_READ_TIMEOUT_SECONDS" Text("10"), "Time to send a request head or the HTTP/2 preface";
    IdleTimeoutSeconds "IDLE_TIMEOUT_SECONDS" Text("60"), "A connection without a request in flight this long is closed";
    TlsHandshakeTimeoutSeconds "TLS_HANDSHAKE_TIMEOUT_SECONDS" Text("10"), "Time to finish the TLS handshake";
    H2MaxConcurrentStreams "H2_MAX_CONCURRENT_STREAMS" Text("100"), "HTTP/2 streams per connection";
    H2MaxHeaderListBytes "H2_MAX_HEADER_LIST_BYTES" Text("16384"), "HTTP/2 header list size";
    H2MaxPendingResetStreams "H2_MAX_PENDING_RESET_STREAMS" Text("20"), "HTTP/2 streams reset before being accepted";
    H2MaxLocalErrorResets "H2_MAX_LOCAL_ERROR_RESETS" Text("1024"), "HTTP/2 streams reset for client errors before the connection is ended";
    H2KeepaliveIntervalSeconds "H2_KEEPALIVE_INTERVAL_SECONDS" Text("30"), "HTTP/2 ping interval";
    H2KeepaliveTimeoutSeconds "H2_KEEPALIVE_TIMEOUT_SECONDS" Text("10"), "How long a ping answer may take before the connection is closed";
    WatchHistory "WATCH_HISTORY" Text("4096"), "VM changes kept so a WatchVms client can resume from its last revision";
    WatchBuffer "WATCH_BUFFER" Text("1024"), "Changes queued per watcher; a watcher further behind is ended with resource_exhausted";
    MaxWatchers "MAX_WATCHERS" Text("1024"), "WatchVms streams open at once";
    WatchHeartbeatSeconds "WATCH_HEARTBEAT_SECONDS" Text("15"), "Heartbeat interval on a quiet WatchVms stream";
    DefaultRestartPolicy "DEFAULT_RESTART_POLICY" Text("never"), "Restart policy of VMs that name none: never, on-failure or always";
    RestartBackoffInitialMs "RESTART_BACKOFF_INITIAL_MS" Text("1000"), "Delay before a policy's first restart; doubled per restart in the window";
    RestartBackoffMaxMs "RESTART_BACKOFF_MAX_MS" Text("60000"), "Longest delay between a policy's restarts";
    RestartLimit "RESTART_LIMIT" Text("5"), "Restarts within RESTART_WINDOW_SECONDS before a VM is left FAILED (restart limit reached)";
    RestartWindowSeconds "RESTART_WINDOW_SECONDS" Text("600"), "The crash-loop window";
    ConsoleMaxBytes "CONSOLE_MAX_BYTES" Text("16777216"), "Bytes of console output kept per VM; older output is dropped from the front (0 keeps all)";
    MaxSnapshots "MAX_SNAPSHOTS" Text("64"), "Snapshots kept on the host (under DATA_DIR/snapshots)";
    MaxSnapshotBytes "MAX_SNAPSHOT_BYTES" Text("68719476736"), "Bytes all snapshots may take together";
}

impl Var {
    /// This variable's declaration.
    pub fn declaration(self) -> &'static Variable {
        // In range: the macro builds `Var` and `VARIABLES` from one list, in one order.
        &VARIABLES[self as usize]
    }
}

/// A configuration error: one line naming the variable and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is invalid: {expected}")]
pub struct EnvError {
    /// The full variable name.
    pub variable: String,
    /// The value found.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

fn bad(var: Var, value: &str, expected: impl Into<String>) -> EnvError {
    EnvError {
        variable: var.declaration().full_name(),
        value: value.to_owned(),
        expected: expected.into(),
    }
}

/// A parser turns a value's text into a setting, or says what it accepts.
type Parsed<T> = Result<T, String>;

/// The declared variables' values as found in the environment.
struct Env {
    set: Vec<Option<String>>,
}

impl Env {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut set = vec![None; VARIABLES.len()];
        for (key, value) in vars {
            let Some(name) = key.strip_prefix(PREFIX) else {
                continue;
            };
            if let Some(v) = VARIABLES.iter().find(|v| v.name == name) {
                set[v.var as usize] = Some(value);
            }
        }
        Self { set }
    }

    /// The value the environment holds, if any.
    fn set(&self, var: Var) -> Option<&str> {
        self.set[var as usize].as_deref()
    }

    /// The value set, else the declared default text (none for unset or computed defaults).
    fn get(&self, var: Var) -> Option<&str> {
        match (self.set(var), var.declaration().default) {
            (Some(v), _) => Some(v),
            (None, Text(t)) => Some(t),
            (None, Unset | Computed(_)) => None,
        }
    }

    /// Parses the value (set or default) when there is one.
    fn optional<T>(
        &self,
        var: Var,
        parse: impl Fn(&str) -> Parsed<T>,
    ) -> Result<Option<T>, EnvError> {
        self.get(var)
            .map(|v| parse(v).map_err(|expected| bad(var, v, expected)))
            .transpose()
    }

    /// Parses the value of a variable declared with a default text.
    fn value<T>(&self, var: Var, parse: impl Fn(&str) -> Parsed<T>) -> Result<T, EnvError> {
        self.optional(var, parse)?.ok_or_else(|| {
            bad(
                var,
                "",
                "a value (VMCP declares no default for this variable)",
            )
        })
    }
}

/// Firecracker's jailer settings (production mode for Firecracker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    /// Path of the `jailer` binary.
    pub binary: PathBuf,
    /// uid the VMM runs as.
    pub uid: u32,
    /// gid the VMM runs as.
    pub gid: u32,
    /// Base directory for the per-VM chroots.
    pub chroot_base: PathBuf,
}

/// OpenTelemetry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    /// Whether traces and metrics are pushed over OTLP/HTTP.
    pub enabled: bool,
    /// `service.name`.
    pub service_name: String,
    /// `service.version`.
    pub service_version: String,
    /// Ratio of root traces sampled, in [0, 1]; error traces are always kept.
    pub sampling_rate: f64,
    /// OTLP/HTTP collector, `host:port` or a URL.
    pub endpoint: String,
    /// Whether `/metrics` is served for Prometheus.
    pub prometheus_enabled: bool,
    /// Port of the `/metrics` listener.
    pub prometheus_port: u16,
}

/// TLS files for the API port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; set = mutual TLS.
    pub client_ca: Option<PathBuf>,
}

/// The whole service configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// API listen port.
    pub port: u16,
    /// At start-up, remove VMM processes and runtime directories that belong to no VM
    /// (`remove`, the default) or only report them (`report`).
    pub remove_orphans: bool,
    /// API listen address.
    pub address: IpAddr,
    /// Which VMM backs the VMs.
    pub backend: BackendKind,
    /// Seed-compatible Cloud Hypervisor endpoint (`unix:///path`): a VMM already
    /// listening there at start-up is adopted as the VM `default`.
    pub ch_endpoint: PathBuf,
    /// `cloud-hypervisor` binary (a path, or a name looked up on PATH).
    pub ch_binary: PathBuf,
    /// Seed-compatible Firecracker endpoint (`unix:///path`): a VMM already
    /// listening there at start-up is adopted as the VM `default`.
    pub fc_endpoint: PathBuf,
    /// `firecracker` binary.
    pub fc_binary: PathBuf,
    /// Jailer mode for Firecracker, when configured.
    pub fc_jailer: Option<JailerConfig>,
    /// Root of the per-VM runtime directories (sockets, logs, consoles).
    pub runtime_dir: PathBuf,
    /// Where durable VM records live.
    pub data_dir: PathBuf,
    /// Log filter (tracing-subscriber EnvFilter syntax); RUST_LOG wins when set.
    pub log_level: String,
    /// Timeout of one hypervisor call.
    pub hypervisor_timeout: Duration,
    /// Bytes of console output kept per VM (0: all).
    pub console_max_bytes: u64,
    /// Snapshot count and byte limits.
    pub snapshot_limits: crate::domain::snapshot::SnapshotLimits,
    /// Largest accepted request body.
    pub max_request_bytes: usize,
    /// Cap on client deadlines (Connect-Timeout-Ms / grpc-timeout).
    pub max_deadline: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Telemetry.
    pub otel: OtelConfig,
    /// File holding the bearer token VM API calls must present; unset = no token.
    pub auth_token_file: Option<PathBuf>,
    /// Also serve the API on this Unix socket (mode 0600), for clients on the host.
    pub api_socket: Option<PathBuf>,
    /// TLS (and mutual TLS) for the API port; unset = plaintext.
    pub tls: Option<TlsFiles>,
    /// Directories VM assets must resolve into; unset = unrestricted.
    pub asset_dirs: Option<Vec<PathBuf>>,
    /// Per-VM and host-wide resource limits.
    pub vm_limits: VmLimits,
    /// API concurrency and rate limits.
    pub api_limits: ApiLimits,
    /// Connection timeouts, caps and HTTP/2 limits.
    pub connections: ConnectionLimits,
    /// Descriptors kept for VM work; `None` for the default (a quarter of the limit, at most 4096).
    pub reserved_fds: Option<u64>,
    /// WatchVms history, queues, watcher cap and heartbeat.
    pub watch: WatchSettings,
    /// Restart policy default, backoff and crash-loop limit.
    pub restart: RestartSettings,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads variables from an iterator (tests pass their own).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, EnvError> {
        use Var::*;
        let env = Env::new(vars);
        let fc_jailer = match env.set(FcJailerBinary) {
            None => {
                for var in [FcJailerUid, FcJailerGid, FcJailerChrootBase] {
                    if let Some(v) = env.set(var) {
                        return Err(bad(
                            var,
                            v,
                            "only meaningful with UNKEY_VMCP_FC_JAILER_BINARY set",
                        ));
                    }
                }
                None
            }
            Some(_) => Some(JailerConfig {
                binary: env.value(FcJailerBinary, path)?,
                uid: env.value(FcJailerUid, number(0, u32::MAX.into()))? as u32,
                gid: env.value(FcJailerGid, number(0, u32::MAX.into()))? as u32,
                chroot_base: env.value(FcJailerChrootBase, abs_path)?,
            }),
        };
        let otel = OtelConfig {
            enabled: env.value(OtelEnabled, boolean)?,
            service_name: env.value(OtelServiceName, non_empty)?,
            service_version: env.value(OtelServiceVersion, non_empty)?,
            sampling_rate: env.value(OtelSamplingRate, ratio)?,
            endpoint: env.value(OtelEndpoint, non_empty)?,
            prometheus_enabled: env.value(OtelPrometheusEnabled, boolean)?,
            prometheus_port: env.value(OtelPrometheusPort, number(1, 65535))? as u16,
        };
        let log_level = env.value(LogLevel, non_empty)?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(
                LogLevel,
                &log_level,
                "a level (error, warn, info, debug, trace) or a RUST_LOG-style filter",
            ));
        }
        let secs = |min, max| move |v: &str| number(min, max)(v).map(Duration::from_secs);
        Ok(Self {
            port: env.value(Port, number(0, 65535))? as u16,
            address: env.value(Address, address)?,
            backend: env.value(Backend, backend)?,
            ch_endpoint: env.value(ChEndpoint, unix_endpoint)?,
            ch_binary: env.value(ChBinary, path)?,
            fc_endpoint: env.value(FcEndpoint, unix_endpoint)?,
            fc_binary: env.value(FcBinary, path)?,
            fc_jailer,
            runtime_dir: env.value(RuntimeDir, abs_path)?,
            data_dir: env.value(DataDir, abs_path)?,
            log_level,
            hypervisor_timeout: env.value(HypervisorTimeoutSeconds, secs(1, 3600))?,
            console_max_bytes: env.value(ConsoleMaxBytes, console_cap)?,
            snapshot_limits: crate::domain::snapshot::SnapshotLimits {
                max_count: env.value(MaxSnapshots, number(1, 1_000_000))?,
                max_bytes: env.value(MaxSnapshotBytes, number(1 << 20, u64::MAX))?,
            },
            max_request_bytes: env.value(MaxRequestBytes, number(1024, 64 << 20))? as usize,
            max_deadline: env.value(MaxDeadlineSeconds, secs(1, 86400))?,
            remove_orphans: env.value(Orphans, orphans)?,
            shutdown_grace: env.value(ShutdownGraceSeconds, secs(0, 3600))?,
            otel,
            api_socket: env.optional(ApiSocket, socket_path)?,
            auth_token_file: env.optional(AuthTokenFile, abs_path)?,
            tls: tls_files(&env)?,
            asset_dirs: env.optional(AssetDirs, dir_list)?,
            vm_limits: vm_limits(&env)?,
            api_limits: ApiLimits {
                max_concurrent_requests: env.value(MaxConcurrentRequests, number(1, 1_000_000))?
                    as usize,
                rate_limit_rps: env.value(RateLimitRps, number(0, 1_000_000))? as u32,
            },
            connections: connection_limits(&env)?,
            reserved_fds: env.optional(ReservedFds, number(64, 1 << 30))?,
            watch: WatchSettings {
                history: env.value(WatchHistory, number(1, 1 << 20))? as usize,
                buffer: env.value(WatchBuffer, number(1, 1 << 20))? as usize,
                max_watchers: env.value(MaxWatchers, number(1, 1_000_000))? as usize,
                heartbeat: env
                    .value(WatchHeartbeatSeconds, number(1, 3600))
                    .map(Duration::from_secs)?,
            },
            restart: restart_settings(&env)?,
        })
    }

    /// Unknown `UNKEY_VMCP_*` variables present in `vars` (probably typos).
    pub fn unknown_variables(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        vars.into_iter()
            .filter_map(|(k, _)| {
                let rest = k.strip_prefix(PREFIX)?;
                (!VARIABLES.iter().any(|v| v.name == rest)).then_some(k)
            })
            .collect()
    }
}

fn tls_files(env: &Env) -> Result<Option<TlsFiles>, EnvError> {
    let cert = env.optional(Var::TlsCertFile, abs_path)?;
    let key = env.optional(Var::TlsKeyFile, abs_path)?;
    let client_ca = env.optional(Var::TlsClientCaFile, abs_path)?;
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (None, None) => match env.set(Var::TlsClientCaFile) {
            Some(v) => Err(bad(
                Var::TlsClientCaFile,
                v,
                "only meaningful with UNKEY_VMCP_TLS_CERT_FILE and UNKEY_VMCP_TLS_KEY_FILE set",
            )),
            None => Ok(None),
        },
        (Some(_), None) => Err(bad(
            Var::TlsKeyFile,
            "",
            "required when UNKEY_VMCP_TLS_CERT_FILE is set",
        )),
        (None, Some(_)) => Err(bad(
            Var::TlsCertFile,
            "",
            "required when UNKEY_VMCP_TLS_KEY_FILE is set",
        )),
    }
}

fn vm_limits(env: &Env) -> Result<VmLimits, EnvError> {
    use Var::*;
    Ok(VmLimits {
        max_vms: env.value(MaxVms, number(1, 1_000_000))?,
        max_vcpus_per_vm: env.value(
            MaxVcpusPerVm,
            number(1, crate::domain::config::MAX_VCPUS as u64),
        )?,
        max_memory_per_vm_mib: env.value(MaxMemoryPerVmMib, number(1, 1 << 32))?,
        max_total_vcpus: env
            .optional(MaxTotalVcpus, number(1, u64::from(u32::MAX)))?
            .unwrap_or_else(super::admission::default_total_vcpus),
        max_total_memory_mib: env
            .optional(MaxTotalMemoryMib, number(1, 1 << 40))?
            .unwrap_or_else(super::admission::default_total_memory_mib),
    })
}

fn restart_settings(env: &Env) -> Result<RestartSettings, EnvError> {
    use Var::*;
    let ms = |v: &str| number(1, 3_600_000)(v).map(Duration::from_millis);
    let initial = env.value(RestartBackoffInitialMs, ms)?;
    let max = env.value(RestartBackoffMaxMs, ms)?;
    if max < initial {
        return Err(bad(
            RestartBackoffMaxMs,
            env.get(RestartBackoffMaxMs).unwrap_or_default(),
            format!(
                "at least UNKEY_VMCP_RESTART_BACKOFF_INITIAL_MS ({})",
                initial.as_millis()
            ),
        ));
    }
    Ok(RestartSettings {
        default_policy: env.value(DefaultRestartPolicy, |v: &str| match v.trim() {
            "never" => Ok(RestartPolicy::Never),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            _ => Err("one of: never, on-failure, always".to_owned()),
        })?,
        backoff_initial: initial,
        backoff_max: max,
        limit: env.value(RestartLimit, number(1, 1000))? as u32,
        window: env
            .value(RestartWindowSeconds, number(1, 86400))
            .map(Duration::from_secs)?,
    })
}

fn connection_limits(env: &Env) -> Result<ConnectionLimits, EnvError> {
    use Var::*;
    let secs = |max| move |v: &str| number(1, max)(v).map(Duration::from_secs);
    let max_connections = env
        .optional(MaxConnections, number(1, 10_000_000))?
        .map(|n| n as usize);
    let per_client = env.value(MaxConnectionsPerClient, number(1, 10_000_000))? as usize;
    if let (Some(total), Some(v)) = (max_connections, env.set(MaxConnectionsPerClient))
        && per_client > total
    {
        return Err(bad(
            MaxConnectionsPerClient,
            v,
            format!("at most UNKEY_VMCP_MAX_CONNECTIONS ({total})"),
        ));
    }
    Ok(ConnectionLimits {
        header_read_timeout: env.value(HeaderReadTimeoutSeconds, secs(3600))?,
        tls_handshake_timeout: env.value(TlsHandshakeTimeoutSeconds, secs(3600))?,
        idle_timeout: env.value(IdleTimeoutSeconds, secs(86400))?,
        max_connections,
        max_connections_per_client: per_client,
        h2: H2Limits {
            max_concurrent_streams: env.value(H2MaxConcurrentStreams, number(1, 10_000))? as u32,
            max_header_list_bytes: env.value(H2MaxHeaderListBytes, number(1024, 1 << 20))? as u32,
            max_pending_reset_streams: env.value(H2MaxPendingResetStreams, number(1, 10_000))?
                as usize,
            max_local_error_resets: env.value(H2MaxLocalErrorResets, number(1, 100_000))? as usize,
            keepalive_interval: env.value(H2KeepaliveIntervalSeconds, secs(3600))?,
            keepalive_timeout: env.value(H2KeepaliveTimeoutSeconds, secs(3600))?,
        },
    })
}

/// A list of absolute directories separated by commas or colons.
fn dir_list(v: &str) -> Parsed<Vec<PathBuf>> {
    let dirs: Vec<&str> = v.split([',', ':']).map(str::trim).collect();
    if dirs.iter().any(|d| !d.starts_with('/') || d.contains('\0')) {
        return Err("absolute directories separated by commas or colons, e.g. /var/lib/vmcp/images,/srv/kernels".to_owned());
    }
    Ok(dirs.into_iter().map(PathBuf::from).collect())
}

/// 0 (no cap), or at least 64 KiB: the cap keeps half of it, in whole 4 KiB blocks.
fn console_cap(v: &str) -> Parsed<u64> {
    match v.trim().parse::<u64>() {
        Ok(n) if n == 0 || (64 << 10..=1 << 40).contains(&n) => Ok(n),
        _ => Err("0 (keep all) or a number of bytes from 65536 to 1099511627776".to_owned()),
    }
}

fn number(min: u64, max: u64) -> impl Fn(&str) -> Parsed<u64> {
    move |v| match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("a whole number from {min} to {max}")),
    }
}

fn ratio(v: &str) -> Parsed<f64> {
    match v.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err("a number from 0.0 to 1.0".to_owned()),
    }
}

fn boolean(v: &str) -> Parsed<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err("true or false (also 1/0, yes/no, on/off)".to_owned()),
    }
}

fn non_empty(v: &str) -> Parsed<String> {
    match v.trim() {
        "" => Err("a non-empty string".to_owned()),
        s => Ok(s.to_owned()),
    }
}

fn address(v: &str) -> Parsed<IpAddr> {
    v.trim()
        .parse()
        .map_err(|_| "an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::".to_owned())
}

fn backend(v: &str) -> Parsed<BackendKind> {
    match v {
        "cloudhypervisor" => Ok(BackendKind::CloudHypervisor),
        "firecracker" => Ok(BackendKind::Firecracker),
        _ => Err("one of: cloudhypervisor, firecracker".to_owned()),
    }
}

/// `remove` (true) or `report` (false).
fn orphans(v: &str) -> Parsed<bool> {
    match v.trim() {
        "remove" => Ok(true),
        "report" => Ok(false),
        _ => Err("remove or report".to_owned()),
    }
}

fn path(v: &str) -> Parsed<PathBuf> {
    if v.trim().is_empty() || v.contains('\0') {
        return Err("a non-empty path or command name".to_owned());
    }
    Ok(PathBuf::from(v))
}

fn abs_path(v: &str) -> Parsed<PathBuf> {
    if !v.starts_with('/') || v.contains('\0') {
        return Err("an absolute path".to_owned());
    }
    Ok(PathBuf::from(v))
}

/// An absolute path short enough for a Unix socket (sun_path holds 107 bytes and a NUL).
fn socket_path(v: &str) -> Parsed<PathBuf> {
    if v.len() > 107 {
        return Err("an absolute path of at most 107 bytes".to_owned());
    }
    abs_path(v)
}

fn unix_endpoint(v: &str) -> Parsed<PathBuf> {
    match v.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') && !p.contains('\0') => Ok(PathBuf::from(p)),
        _ => Err("unix:///absolute/path/to/api.sock".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, EnvError> {
        Config::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned())),
        )
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.port, 8080);
        assert_eq!(c.address.to_string(), "0.0.0.0");
        assert_eq!(c.backend, BackendKind::CloudHypervisor);
        assert_eq!(c.ch_endpoint, PathBuf::from("/tmp/ch.sock"));
        assert_eq!(c.fc_endpoint, PathBuf::from("/tmp/firecracker.sock"));
        assert_eq!(c.ch_binary, PathBuf::from("cloud-hypervisor"));
        assert_eq!(c.fc_binary, PathBuf::from("firecracker"));
        assert_eq!(c.fc_jailer, None);
        assert_eq!(c.runtime_dir, PathBuf::from("/run/vmcp"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/vmcp"));
        assert_eq!(c.log_level, "info");
        assert_eq!(c.hypervisor_timeout, Duration::from_secs(30));
        assert_eq!(c.max_request_bytes, 1 << 20);
        assert_eq!(c.max_deadline, Duration::from_secs(600));
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(c.remove_orphans);
        assert_eq!(
            c.otel,
            OtelConfig {
                enabled: false,
                service_name: "vmm-controlplane".into(),
                service_version: "0.0.1".into(),
                sampling_rate: 1.0,
                endpoint: "localhost:4318".into(),
                prometheus_enabled: true,
                prometheus_port: 9464,
            }
        );
    }

    #[test]
    fn every_variable_is_read() {
        let c = cfg(&[
            ("PORT", "9000"),
            ("ADDRESS", "127.0.0.1"),
            ("BACKEND", "firecracker"),
            ("CH_ENDPOINT", "unix:///run/ch.sock"),
            ("CH_BINARY", "/opt/ch"),
            ("FC_ENDPOINT", "unix:///run/fc.sock"),
            ("FC_BINARY", "/opt/fc"),
            ("FC_JAILER_BINARY", "/opt/jailer"),
            ("FC_JAILER_UID", "123"),
            ("FC_JAILER_GID", "456"),
            ("FC_JAILER_CHROOT_BASE", "/srv/j"),
            ("RUNTIME_DIR", "/tmp/rt"),
            ("DATA_DIR", "/tmp/data"),
            ("LOG_LEVEL", "debug"),
            ("HYPERVISOR_TIMEOUT_SECONDS", "5"),
            ("MAX_REQUEST_BYTES", "4096"),
            ("MAX_DEADLINE_SECONDS", "60"),
            ("SHUTDOWN_GRACE_SECONDS", "3"),
            ("OTEL_ENABLED", "true"),
            ("OTEL_SERVICE_NAME", "svc"),
            ("OTEL_SERVICE_VERSION", "9.9"),
            ("OTEL_SAMPLING_RATE", "0.25"),
            ("OTEL_ENDPOINT", "collector:4318"),
            ("OTEL_PROMETHEUS_ENABLED", "false"),
            ("OTEL_PROMETHEUS_PORT", "9999"),
        ])
        .expect("valid");
        assert_eq!(c.port, 9000);
        assert_eq!(c.address.to_string(), "127.0.0.1");
        assert_eq!(c.backend, BackendKind::Firecracker);
        assert_eq!(c.ch_endpoint, PathBuf::from("/run/ch.sock"));
        assert_eq!(c.ch_binary, PathBuf::from("/opt/ch"));
        assert_eq!(c.fc_endpoint, PathBuf::from("/run/fc.sock"));
        assert_eq!(c.fc_binary, PathBuf::from("/opt/fc"));
        assert_eq!(
            c.fc_jailer,
            Some(JailerConfig {
                binary: "/opt/jailer".into(),
                uid: 123,
                gid: 456,
                chroot_base: "/srv/j".into()
            })
        );
        assert_eq!(c.runtime_dir, PathBuf::from("/tmp/rt"));
        assert_eq!(c.data_dir, PathBuf::from("/tmp/data"));
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.hypervisor_timeout, Duration::from_secs(5));
        assert_eq!(c.max_request_bytes, 4096);
        assert_eq!(c.max_deadline, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(3));
        assert!(c.otel.enabled);
        assert_eq!(c.otel.service_name, "svc");
        assert_eq!(c.otel.service_version, "9.9");
        assert_eq!(c.otel.sampling_rate, 0.25);
        assert_eq!(c.otel.endpoint, "collector:4318");
        assert!(!c.otel.prometheus_enabled);
        assert_eq!(c.otel.prometheus_port, 9999);
    }

    #[test]
    fn bad_values_name_the_variable_and_what_is_accepted() {
        let cases: &[(&str, &str, &str)] = &[
            ("PORT", "80a", "whole number"),
            ("PORT", "70000", "0 to 65535"),
            ("ADDRESS", "localhost:1", "IPv4 or IPv6"),
            ("BACKEND", "qemu", "cloudhypervisor, firecracker"),
            ("CH_ENDPOINT", "/tmp/ch.sock", "unix:///"),
            ("FC_ENDPOINT", "unix://relative", "unix:///"),
            ("CH_BINARY", "", "non-empty"),
            ("FC_BINARY", " ", "non-empty"),
            ("FC_JAILER_UID", "1", "FC_JAILER_BINARY"),
            ("RUNTIME_DIR", "run/vmcp", "absolute"),
            ("DATA_DIR", "", "absolute"),
            ("LOG_LEVEL", "", "non-empty"),
            ("HYPERVISOR_TIMEOUT_SECONDS", "0", "1 to 3600"),
            ("MAX_REQUEST_BYTES", "10", "1024"),
            ("MAX_DEADLINE_SECONDS", "-1", "whole number"),
            ("SHUTDOWN_GRACE_SECONDS", "x", "whole number"),
            ("OTEL_ENABLED", "maybe", "true or false"),
            ("OTEL_SERVICE_NAME", "", "non-empty"),
            ("OTEL_SERVICE_VERSION", "", "non-empty"),
            ("OTEL_SAMPLING_RATE", "1.5", "0.0 to 1.0"),
            ("OTEL_SAMPLING_RATE", "-0.1", "0.0 to 1.0"),
            ("OTEL_SAMPLING_RATE", "NaN", "0.0 to 1.0"),
            ("OTEL_ENDPOINT", "", "non-empty"),
            ("OTEL_PROMETHEUS_ENABLED", "2", "true or false"),
            ("OTEL_PROMETHEUS_PORT", "0", "1 to 65535"),
            ("ORPHANS", "kill", "remove or report"),
        ];
        for (var, value, expected) in cases {
            let err = cfg(&[(var, value)]).expect_err(&format!("{var}={value} must be rejected"));
            assert_eq!(err.variable, format!("{PREFIX}{var}"));
            let line = err.to_string();
            assert!(
                line.contains(expected),
                "{line:?} should mention {expected:?}"
            );
            assert!(!line.contains('\n'), "one line: {line:?}");
        }
        let jailer =
            cfg(&[("FC_JAILER_BINARY", "/j"), ("FC_JAILER_UID", "x")]).expect_err("bad uid");
        assert_eq!(jailer.variable, "UNKEY_VMCP_FC_JAILER_UID");
    }

    #[test]
    fn orphans_can_be_reported_only() {
        assert_eq!(
            cfg(&[("ORPHANS", "report")]).map(|c| c.remove_orphans),
            Ok(false)
        );
        assert_eq!(
            cfg(&[("ORPHANS", "remove")]).map(|c| c.remove_orphans),
            Ok(true)
        );
    }

    #[test]
    fn boolean_spellings() {
        for (v, want) in [
            ("TRUE", true),
            ("1", true),
            ("on", true),
            ("no", false),
            ("0", false),
        ] {
            assert_eq!(
                cfg(&[("OTEL_ENABLED", v)]).map(|c| c.otel.enabled),
                Ok(want),
                "{v}"
            );
        }
    }

    #[test]
    fn the_table_declares_each_variable_once_in_enum_order() {
        for (i, v) in VARIABLES.iter().enumerate() {
            assert_eq!(v.var as usize, i, "{} is out of order", v.name);
            assert_eq!(v.var.declaration(), v);
            assert!(!v.about.is_empty(), "{} has no description", v.name);
            assert_eq!(
                VARIABLES.iter().filter(|w| w.name == v.name).count(),
                1,
                "{} is declared twice",
                v.name
            );
        }
    }

    #[test]
    fn every_declared_variable_is_read_and_checked() {
        // An empty value is invalid for every variable, so a declared variable that
        // `from_vars` never reads would be accepted here.
        for v in VARIABLES {
            let err = cfg(&[(v.name, "")]).expect_err(&format!("{} is not read", v.name));
            assert_eq!(err.variable, v.full_name());
        }
    }

    #[test]
    fn declared_defaults_are_what_help_prints() {
        assert_eq!(Var::Port.declaration().default.to_string(), "8080");
        assert_eq!(Var::ApiSocket.declaration().default.to_string(), "unset");
        assert_eq!(
            Var::MaxTotalMemoryMib.declaration().default.to_string(),
            "host memory"
        );
    }

    #[test]
    fn unknown_variables_are_reported() {
        let unknown = Config::unknown_variables(vec![
            ("UNKEY_VMCP_PORT".to_owned(), "1".to_owned()),
            ("UNKEY_VMCP_PROT".to_owned(), "1".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ]);
        assert_eq!(unknown, vec!["UNKEY_VMCP_PROT".to_owned()]);
    }
    #[test]
    fn hardening_defaults_are_open_but_bounded() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.auth_token_file, None);
        assert_eq!(c.api_socket, None, "the API socket is off unless asked for");
        assert_eq!(c.tls, None);
        assert_eq!(c.asset_dirs, None);
        assert_eq!(c.vm_limits, VmLimits::host_defaults());
        assert_eq!(c.vm_limits.max_vms, 256);
        assert_eq!(c.vm_limits.max_vcpus_per_vm, 32);
        assert_eq!(c.vm_limits.max_memory_per_vm_mib, 65536);
        assert_eq!(
            c.vm_limits.max_total_vcpus,
            super::super::admission::default_total_vcpus()
        );
        assert_eq!(
            c.vm_limits.max_total_memory_mib,
            super::super::admission::default_total_memory_mib()
        );
        assert_eq!(
            c.api_limits,
            ApiLimits {
                max_concurrent_requests: 512,
                rate_limit_rps: 1000
            }
        );
    }

    #[test]
    fn hardening_variables_are_read() {
        let c = cfg(&[
            ("AUTH_TOKEN_FILE", "/etc/vmcp/token"),
            ("API_SOCKET", "/run/vmcp/api.sock"),
            ("TLS_CERT_FILE", "/etc/vmcp/cert.pem"),
            ("TLS_KEY_FILE", "/etc/vmcp/key.pem"),
            ("TLS_CLIENT_CA_FILE", "/etc/vmcp/ca.pem"),
            (
                "ASSET_DIRS",
                "/srv/kernels, /srv/disks:/var/lib/vmcp/images",
            ),
            ("MAX_VMS", "10"),
            ("MAX_VCPUS_PER_VM", "4"),
            ("MAX_MEMORY_PER_VM_MIB", "2048"),
            ("MAX_TOTAL_VCPUS", "16"),
            ("MAX_TOTAL_MEMORY_MIB", "8192"),
            ("MAX_CONCURRENT_REQUESTS", "8"),
            ("RATE_LIMIT_RPS", "0"),
        ])
        .expect("valid");
        assert_eq!(c.auth_token_file, Some(PathBuf::from("/etc/vmcp/token")));
        assert_eq!(c.api_socket, Some(PathBuf::from("/run/vmcp/api.sock")));
        assert_eq!(
            c.tls,
            Some(TlsFiles {
                cert: "/etc/vmcp/cert.pem".into(),
                key: "/etc/vmcp/key.pem".into(),
                client_ca: Some("/etc/vmcp/ca.pem".into()),
            })
        );
        assert_eq!(
            c.asset_dirs,
            Some(vec![
                PathBuf::from("/srv/kernels"),
                PathBuf::from("/srv/disks"),
                PathBuf::from("/var/lib/vmcp/images"),
            ])
        );
        assert_eq!(
            c.vm_limits,
            VmLimits {
                max_vms: 10,
                max_vcpus_per_vm: 4,
                max_memory_per_vm_mib: 2048,
                max_total_vcpus: 16,
                max_total_memory_mib: 8192,
            }
        );
        assert_eq!(
            c.api_limits,
            ApiLimits {
                max_concurrent_requests: 8,
                rate_limit_rps: 0
            }
        );
        let server_only = cfg(&[("TLS_CERT_FILE", "/c"), ("TLS_KEY_FILE", "/k")]).expect("valid");
        assert_eq!(server_only.tls.and_then(|t| t.client_ca), None);
    }

    #[test]
    fn hardening_bad_values_name_the_variable() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let long = format!("/{}", "s".repeat(120));
        let cases: &[Case] = &[
            (&[("API_SOCKET", "api.sock")], "API_SOCKET", "absolute"),
            (&[("API_SOCKET", &long)], "API_SOCKET", "107 bytes"),
            (
                &[("AUTH_TOKEN_FILE", "token")],
                "AUTH_TOKEN_FILE",
                "absolute",
            ),
            (
                &[("TLS_CERT_FILE", "/c")],
                "TLS_KEY_FILE",
                "TLS_CERT_FILE is set",
            ),
            (
                &[("TLS_KEY_FILE", "/k")],
                "TLS_CERT_FILE",
                "TLS_KEY_FILE is set",
            ),
            (
                &[("TLS_CLIENT_CA_FILE", "/ca")],
                "TLS_CLIENT_CA_FILE",
                "TLS_CERT_FILE",
            ),
            (
                &[("TLS_CERT_FILE", "c.pem"), ("TLS_KEY_FILE", "/k")],
                "TLS_CERT_FILE",
                "absolute",
            ),
            (&[("ASSET_DIRS", "")], "ASSET_DIRS", "absolute directories"),
            (
                &[("ASSET_DIRS", "/a,,/b")],
                "ASSET_DIRS",
                "absolute directories",
            ),
            (
                &[("ASSET_DIRS", "/a,images")],
                "ASSET_DIRS",
                "absolute directories",
            ),
            (&[("MAX_VMS", "0")], "MAX_VMS", "1 to"),
            (
                &[("MAX_VCPUS_PER_VM", "255")],
                "MAX_VCPUS_PER_VM",
                "1 to 254",
            ),
            (
                &[("MAX_MEMORY_PER_VM_MIB", "x")],
                "MAX_MEMORY_PER_VM_MIB",
                "whole number",
            ),
            (
                &[("MAX_TOTAL_VCPUS", "-1")],
                "MAX_TOTAL_VCPUS",
                "whole number",
            ),
            (
                &[("MAX_TOTAL_MEMORY_MIB", "0")],
                "MAX_TOTAL_MEMORY_MIB",
                "1 to",
            ),
            (
                &[("MAX_CONCURRENT_REQUESTS", "0")],
                "MAX_CONCURRENT_REQUESTS",
                "1 to",
            ),
            (&[("RATE_LIMIT_RPS", "fast")], "RATE_LIMIT_RPS", "0 to"),
        ];
        for (vars, var, expected) in cases {
            let err = cfg(vars).expect_err(&format!("{vars:?} must be rejected"));
            assert_eq!(err.variable, format!("{PREFIX}{var}"), "{vars:?}");
            let line = err.to_string();
            assert!(
                line.contains(expected),
                "{line:?} should mention {expected:?}"
            );
            assert!(!line.contains('\n'), "one line: {line:?}");
        }
    }

    #[test]
    fn connection_defaults_are_safe() {
        let c = cfg(&[]).expect("defaults are valid");
        assert_eq!(c.connections, ConnectionLimits::default());
        assert_eq!(c.connections.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.connections.tls_handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.connections.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.connections.max_connections, None);
        assert_eq!(c.connections.max_connections_per_client, 512);
        assert_eq!(
            c.connections.h2,
            H2Limits {
                max_concurrent_streams: 100,
                max_header_list_bytes: 16384,
                max_pending_reset_streams: 20,
                max_local_error_resets: 1024,
                keepalive_interval: Duration::from_secs(30),
                keepalive_timeout: Duration::from_secs(10),
            }
        );
        assert_eq!(c.reserved_fds, None);
    }

    #[test]
    fn watch_defaults_are_the_feeds_and_the_variables_are_read_and_checked() {
        assert_eq!(cfg(&[]).expect("defaults").watch, WatchSettings::default());
        let c = cfg(&[
            ("WATCH_HISTORY", "10"),
            ("WATCH_BUFFER", "3"),
            ("MAX_WATCHERS", "7"),
            ("WATCH_HEARTBEAT_SECONDS", "2"),
        ])
        .expect("valid");
        assert_eq!(
            c.watch,
            WatchSettings {
                history: 10,
                buffer: 3,
                max_watchers: 7,
                heartbeat: Duration::from_secs(2),
            }
        );
        for var in [
            "WATCH_HISTORY",
            "WATCH_BUFFER",
            "MAX_WATCHERS",
            "WATCH_HEARTBEAT_SECONDS",
        ] {
            let e = cfg(&[(var, "0")]).expect_err("zero is refused");
            assert!(e.to_string().contains(&format!("UNKEY_VMCP_{var}")), "{e}");
        }
    }

    #[test]
    fn connection_variables_are_read() {
        let c = cfg(&[
            ("HEADER_READ_TIMEOUT_SECONDS", "3"),
            ("IDLE_TIMEOUT_SECONDS", "120"),
            ("TLS_HANDSHAKE_TIMEOUT_SECONDS", "4"),
            ("MAX_CONNECTIONS", "2000"),
            ("MAX_CONNECTIONS_PER_CLIENT", "100"),
            ("RESERVED_FDS", "8192"),
            ("H2_MAX_CONCURRENT_STREAMS", "50"),
            ("H2_MAX_HEADER_LIST_BYTES", "8192"),
            ("H2_MAX_PENDING_RESET_STREAMS", "10"),
            ("H2_MAX_LOCAL_ERROR_RESETS", "100"),
            ("H2_KEEPALIVE_INTERVAL_SECONDS", "15"),
            ("H2_KEEPALIVE_TIMEOUT_SECONDS", "5"),
        ])
        .expect("valid");
        assert_eq!(
            c.connections,
            ConnectionLimits {
                header_read_timeout: Duration::from_secs(3),
                tls_handshake_timeout: Duration::from_secs(4),
                idle_timeout: Duration::from_secs(120),
                max_connections: Some(2000),
                max_connections_per_client: 100,
                h2: H2Limits {
                    max_concurrent_streams: 50,
                    max_header_list_bytes: 8192,
                    max_pending_reset_streams: 10,
                    max_local_error_resets: 100,
                    keepalive_interval: Duration::from_secs(15),
                    keepalive_timeout: Duration::from_secs(5),
                },
            }
        );
        assert_eq!(c.reserved_fds, Some(8192));
    }

    #[test]
    fn connection_bad_values_name_the_variable() {
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (
                &[("HEADER_READ_TIMEOUT_SECONDS", "0")],
                "HEADER_READ_TIMEOUT_SECONDS",
                "1 to 3600",
            ),
            (
                &[("IDLE_TIMEOUT_SECONDS", "1m")],
                "IDLE_TIMEOUT_SECONDS",
                "whole number",
            ),
            (
                &[("TLS_HANDSHAKE_TIMEOUT_SECONDS", "0")],
                "TLS_HANDSHAKE_TIMEOUT_SECONDS",
                "1 to",
            ),
            (&[("MAX_CONNECTIONS", "0")], "MAX_CONNECTIONS", "1 to"),
            (
                &[("MAX_CONNECTIONS_PER_CLIENT", "-5")],
                "MAX_CONNECTIONS_PER_CLIENT",
                "whole number",
            ),
            (
                &[
                    ("MAX_CONNECTIONS", "10"),
                    ("MAX_CONNECTIONS_PER_CLIENT", "11"),
                ],
                "MAX_CONNECTIONS_PER_CLIENT",
                "at most UNKEY_VMCP_MAX_CONNECTIONS (10)",
            ),
            (&[("RESERVED_FDS", "10")], "RESERVED_FDS", "64 to"),
            (
                &[("H2_MAX_CONCURRENT_STREAMS", "0")],
                "H2_MAX_CONCURRENT_STREAMS",
                "1 to 10000",
            ),
            (
                &[("H2_MAX_HEADER_LIST_BYTES", "100")],
                "H2_MAX_HEADER_LIST_BYTES",
                "1024 to",
            ),
            (
                &[("H2_MAX_PENDING_RESET_STREAMS", "x")],
                "H2_MAX_PENDING_RESET_STREAMS",
                "whole number",
            ),
            (
                &[("H2_MAX_LOCAL_ERROR_RESETS", "0")],
                "H2_MAX_LOCAL_ERROR_RESETS",
                "1 to",
            ),
            (
                &[("H2_KEEPALIVE_INTERVAL_SECONDS", "0")],
                "H2_KEEPALIVE_INTERVAL_SECONDS",
                "1 to",
            ),
            (
                &[("H2_KEEPALIVE_TIMEOUT_SECONDS", "")],
                "H2_KEEPALIVE_TIMEOUT_SECONDS",
                "whole number",
            ),
        ];
        for (vars, var, expected) in cases {
            let err = cfg(vars).expect_err(&format!("{vars:?} must be rejected"));
            assert_eq!(err.variable, format!("{PREFIX}{var}"), "{vars:?}");
            let line = err.to_string();
            assert!(
                line.contains(expected),
                "{line:?} should mention {expected:?}"
            );
            assert!(!line.contains('\n'), "one line: {line:?}");
        }
        // The per-client cap alone may exceed the default total; start-up lowers it to fit.
        assert!(cfg(&[("MAX_CONNECTIONS_PER_CLIENT", "100000")]).is_ok());
    }

    #[test]
    fn connection_variables_are_known() {
        let vars = [
            "HEADER_READ_TIMEOUT_SECONDS",
            "IDLE_TIMEOUT_SECONDS",
            "TLS_HANDSHAKE_TIMEOUT_SECONDS",
            "MAX_CONNECTIONS",
            "MAX_CONNECTIONS_PER_CLIENT",
            "RESERVED_FDS",
            "H2_MAX_CONCURRENT_STREAMS",
            "H2_MAX_HEADER_LIST_BYTES",
            "H2_MAX_PENDING_RESET_STREAMS",
            "H2_MAX_LOCAL_ERROR_RESETS",
            "H2_KEEPALIVE_INTERVAL_SECONDS",
            "H2_KEEPALIVE_TIMEOUT_SECONDS",
        ];
        let unknown =
            Config::unknown_variables(vars.iter().map(|v| (format!("{PREFIX}{v}"), String::new())));
        assert!(unknown.is_empty(), "{unknown:?}");
    }

    #[test]
    fn hardening_variables_are_known() {
        let vars = [
            "AUTH_TOKEN_FILE",
            "TLS_CERT_FILE",
            "TLS_KEY_FILE",
            "TLS_CLIENT_CA_FILE",
            "ASSET_DIRS",
            "MAX_VMS",
            "MAX_VCPUS_PER_VM",
            "MAX_MEMORY_PER_VM_MIB",
            "MAX_TOTAL_VCPUS",
            "MAX_TOTAL_MEMORY_MIB",
            "MAX_CONCURRENT_REQUESTS",
            "RATE_LIMIT_RPS",
        ];
        let unknown =
            Config::unknown_variables(vars.iter().map(|v| (format!("{PREFIX}{v}"), String::new())));
        assert!(unknown.is_empty(), "{unknown:?}");
    }
}
