//! Service configuration, read from `UNKEY_VMCP_*` environment variables.
//! Every variable is declared once, in `variables` (name, default, parser,
//! description); that one table drives unknown-variable detection, the
//! defaults and parsers used here, `vmcp-api --help` and the README's table.
//! Every variable is parsed strictly: a bad value stops start-up with one
//! line naming the variable and the accepted values; nothing is silently
//! defaulted. Unknown `UNKEY_VMCP_*` variables are reported so typos surface.
//!
//! This module is the typed [`Config`] and the rules that span variables
//! (settings that only make sense together); `env` reads the environment
//! through the declarations and `parsers` holds the value parsers.

mod env;
mod parsers;
#[cfg(test)]
mod tests;
mod variables;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::adapters::inbound::connections::{ConnectionLimits, H2Limits};
use crate::adapters::inbound::guard::ApiLimits;
use crate::ports::BackendKind;

use super::admission::VmLimits;
use super::feed::WatchSettings;
use crate::domain::restart::RestartSettings;

pub use self::env::EnvError;
use self::env::{Env, bad};
use self::variables::setting::*;
pub use self::variables::{DefaultValue, PREFIX, VARIABLES, Var, Variable};

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
    /// Default bridge for network interfaces that name neither a tap nor a bridge.
    pub bridge: Option<String>,
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
        let env = Env::new(vars);
        let fc_jailer = match env.set(Var::FcJailerBinary) {
            None => {
                for var in [Var::FcJailerUid, Var::FcJailerGid, Var::FcJailerChrootBase] {
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
                binary: env.value(FcJailerBinary)?,
                uid: env.value(FcJailerUid)?,
                gid: env.value(FcJailerGid)?,
                chroot_base: env.value(FcJailerChrootBase)?,
            }),
        };
        let otel = OtelConfig {
            enabled: env.value(OtelEnabled)?,
            service_name: env.value(OtelServiceName)?,
            service_version: env.value(OtelServiceVersion)?,
            sampling_rate: env.value(OtelSamplingRate)?,
            endpoint: env.value(OtelEndpoint)?,
            prometheus_enabled: env.value(OtelPrometheusEnabled)?,
            prometheus_port: env.value(OtelPrometheusPort)?,
        };
        let log_level = env.value(LogLevel)?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(
                Var::LogLevel,
                &log_level,
                "a level (error, warn, info, debug, trace) or a RUST_LOG-style filter",
            ));
        }
        Ok(Self {
            port: env.value(Port)?,
            address: env.value(Address)?,
            backend: env.value(Backend)?,
            ch_endpoint: env.value(ChEndpoint)?,
            ch_binary: env.value(ChBinary)?,
            fc_endpoint: env.value(FcEndpoint)?,
            fc_binary: env.value(FcBinary)?,
            fc_jailer,
            runtime_dir: env.value(RuntimeDir)?,
            data_dir: env.value(DataDir)?,
            log_level,
            hypervisor_timeout: env.value(HypervisorTimeoutSeconds)?,
            console_max_bytes: env.value(ConsoleMaxBytes)?,
            snapshot_limits: crate::domain::snapshot::SnapshotLimits {
                max_count: env.value(MaxSnapshots)?,
                max_bytes: env.value(MaxSnapshotBytes)?,
            },
            max_request_bytes: env.value(MaxRequestBytes)?,
            max_deadline: env.value(MaxDeadlineSeconds)?,
            remove_orphans: env.value(Orphans)?,
            bridge: env.optional(Bridge)?,
            shutdown_grace: env.value(ShutdownGraceSeconds)?,
            otel,
            api_socket: env.optional(ApiSocket)?,
            auth_token_file: env.optional(AuthTokenFile)?,
            tls: tls_files(&env)?,
            asset_dirs: env.optional(AssetDirs)?,
            vm_limits: vm_limits(&env)?,
            api_limits: ApiLimits {
                max_concurrent_requests: env.value(MaxConcurrentRequests)?,
                rate_limit_rps: env.value(RateLimitRps)?,
            },
            connections: connection_limits(&env)?,
            reserved_fds: env.optional(ReservedFds)?,
            watch: WatchSettings {
                history: env.value(WatchHistory)?,
                buffer: env.value(WatchBuffer)?,
                max_watchers: env.value(MaxWatchers)?,
                heartbeat: env.value(WatchHeartbeatSeconds)?,
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
    let cert = env.optional(TlsCertFile)?;
    let key = env.optional(TlsKeyFile)?;
    let client_ca = env.optional(TlsClientCaFile)?;
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
    Ok(VmLimits {
        max_vms: env.value(MaxVms)?,
        max_vcpus_per_vm: env.value(MaxVcpusPerVm)?,
        max_memory_per_vm_mib: env.value(MaxMemoryPerVmMib)?,
        max_total_vcpus: env
            .optional(MaxTotalVcpus)?
            .unwrap_or_else(super::admission::default_total_vcpus),
        max_total_memory_mib: env
            .optional(MaxTotalMemoryMib)?
            .unwrap_or_else(super::admission::default_total_memory_mib),
    })
}

fn restart_settings(env: &Env) -> Result<RestartSettings, EnvError> {
    let initial = env.value(RestartBackoffInitialMs)?;
    let max = env.value(RestartBackoffMaxMs)?;
    if max < initial {
        return Err(bad(
            Var::RestartBackoffMaxMs,
            env.get(Var::RestartBackoffMaxMs).unwrap_or_default(),
            format!(
                "at least UNKEY_VMCP_RESTART_BACKOFF_INITIAL_MS ({})",
                initial.as_millis()
            ),
        ));
    }
    Ok(RestartSettings {
        default_policy: env.value(DefaultRestartPolicy)?,
        backoff_initial: initial,
        backoff_max: max,
        limit: env.value(RestartLimit)?,
        window: env.value(RestartWindowSeconds)?,
    })
}

fn connection_limits(env: &Env) -> Result<ConnectionLimits, EnvError> {
    let max_connections = env.optional(MaxConnections)?;
    let per_client = env.value(MaxConnectionsPerClient)?;
    if let (Some(total), Some(v)) = (max_connections, env.set(Var::MaxConnectionsPerClient))
        && per_client > total
    {
        return Err(bad(
            Var::MaxConnectionsPerClient,
            v,
            format!("at most UNKEY_VMCP_MAX_CONNECTIONS ({total})"),
        ));
    }
    Ok(ConnectionLimits {
        header_read_timeout: env.value(HeaderReadTimeoutSeconds)?,
        tls_handshake_timeout: env.value(TlsHandshakeTimeoutSeconds)?,
        idle_timeout: env.value(IdleTimeoutSeconds)?,
        max_connections,
        max_connections_per_client: per_client,
        h2: H2Limits {
            max_concurrent_streams: env.value(H2MaxConcurrentStreams)?,
            max_header_list_bytes: env.value(H2MaxHeaderListBytes)?,
            max_pending_reset_streams: env.value(H2MaxPendingResetStreams)?,
            max_local_error_resets: env.value(H2MaxLocalErrorResets)?,
            keepalive_interval: env.value(H2KeepaliveIntervalSeconds)?,
            keepalive_timeout: env.value(H2KeepaliveTimeoutSeconds)?,
        },
    })
}
