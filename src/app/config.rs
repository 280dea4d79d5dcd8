//! Service configuration, read from `UNKEY_VMCP_*` environment variables with
//! envy. Every variable is parsed strictly: a bad value stops start-up with
//! one line naming the variable and the accepted values; nothing is silently
//! defaulted. Unknown `UNKEY_VMCP_*` variables are reported so typos surface.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::adapters::inbound::connections::{ConnectionLimits, H2Limits};
use crate::adapters::inbound::guard::ApiLimits;
use crate::ports::BackendKind;

use super::admission::VmLimits;

/// The prefix of every variable.
pub const PREFIX: &str = "UNKEY_VMCP_";

/// Every variable VMCP reads, without the prefix.
pub const KNOWN_VARIABLES: &[&str] = &[
    "PORT",
    "ADDRESS",
    "BACKEND",
    "CH_ENDPOINT",
    "CH_BINARY",
    "FC_ENDPOINT",
    "FC_BINARY",
    "FC_JAILER_BINARY",
    "FC_JAILER_UID",
    "FC_JAILER_GID",
    "FC_JAILER_CHROOT_BASE",
    "RUNTIME_DIR",
    "DATA_DIR",
    "LOG_LEVEL",
    "HYPERVISOR_TIMEOUT_SECONDS",
    "MAX_REQUEST_BYTES",
    "MAX_DEADLINE_SECONDS",
    "SHUTDOWN_GRACE_SECONDS",
    "OTEL_ENABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_SERVICE_VERSION",
    "OTEL_SAMPLING_RATE",
    "OTEL_ENDPOINT",
    "OTEL_PROMETHEUS_ENABLED",
    "OTEL_PROMETHEUS_PORT",
    "AUTH_TOKEN_FILE",
    "API_SOCKET",
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
    "ORPHANS",
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

fn bad(var: &str, value: &str, expected: impl Into<String>) -> EnvError {
    EnvError {
        variable: format!("{PREFIX}{var}"),
        value: value.to_owned(),
        expected: expected.into(),
    }
}

/// Raw values as envy finds them; parsed and checked by [`Config::from_vars`].
#[derive(Debug, Default, Deserialize)]
struct Raw {
    port: Option<String>,
    address: Option<String>,
    backend: Option<String>,
    ch_endpoint: Option<String>,
    ch_binary: Option<String>,
    fc_endpoint: Option<String>,
    fc_binary: Option<String>,
    fc_jailer_binary: Option<String>,
    fc_jailer_uid: Option<String>,
    fc_jailer_gid: Option<String>,
    fc_jailer_chroot_base: Option<String>,
    runtime_dir: Option<String>,
    data_dir: Option<String>,
    log_level: Option<String>,
    hypervisor_timeout_seconds: Option<String>,
    max_request_bytes: Option<String>,
    max_deadline_seconds: Option<String>,
    shutdown_grace_seconds: Option<String>,
    otel_enabled: Option<String>,
    otel_service_name: Option<String>,
    otel_service_version: Option<String>,
    otel_sampling_rate: Option<String>,
    otel_endpoint: Option<String>,
    otel_prometheus_enabled: Option<String>,
    otel_prometheus_port: Option<String>,
    auth_token_file: Option<String>,
    api_socket: Option<String>,
    tls_cert_file: Option<String>,
    tls_key_file: Option<String>,
    tls_client_ca_file: Option<String>,
    asset_dirs: Option<String>,
    max_vms: Option<String>,
    max_vcpus_per_vm: Option<String>,
    max_memory_per_vm_mib: Option<String>,
    max_total_vcpus: Option<String>,
    max_total_memory_mib: Option<String>,
    max_concurrent_requests: Option<String>,
    rate_limit_rps: Option<String>,
    orphans: Option<String>,
    header_read_timeout_seconds: Option<String>,
    idle_timeout_seconds: Option<String>,
    tls_handshake_timeout_seconds: Option<String>,
    max_connections: Option<String>,
    max_connections_per_client: Option<String>,
    reserved_fds: Option<String>,
    h2_max_concurrent_streams: Option<String>,
    h2_max_header_list_bytes: Option<String>,
    h2_max_pending_reset_streams: Option<String>,
    h2_max_local_error_resets: Option<String>,
    h2_keepalive_interval_seconds: Option<String>,
    h2_keepalive_timeout_seconds: Option<String>,
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
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, EnvError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads variables from an iterator (tests pass their own).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, EnvError> {
        let vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .collect();
        let raw: Raw = envy::prefixed(PREFIX)
            .from_iter(vars)
            .map_err(|e| bad("*", "", format!("cannot read the environment: {e}")))?;

        let backend = match raw.backend.as_deref() {
            None | Some("cloudhypervisor") => BackendKind::CloudHypervisor,
            Some("firecracker") => BackendKind::Firecracker,
            Some(v) => return Err(bad("BACKEND", v, "one of: cloudhypervisor, firecracker")),
        };
        let fc_jailer = match raw.fc_jailer_binary.as_deref() {
            None => {
                for (name, v) in [
                    ("FC_JAILER_UID", &raw.fc_jailer_uid),
                    ("FC_JAILER_GID", &raw.fc_jailer_gid),
                    ("FC_JAILER_CHROOT_BASE", &raw.fc_jailer_chroot_base),
                ] {
                    if let Some(v) = v {
                        return Err(bad(
                            name,
                            v,
                            "only meaningful with UNKEY_VMCP_FC_JAILER_BINARY set",
                        ));
                    }
                }
                None
            }
            Some(bin) => Some(JailerConfig {
                binary: path("FC_JAILER_BINARY", bin)?,
                uid: number(
                    "FC_JAILER_UID",
                    raw.fc_jailer_uid.as_deref(),
                    0,
                    0,
                    u32::MAX as u64,
                )? as u32,
                gid: number(
                    "FC_JAILER_GID",
                    raw.fc_jailer_gid.as_deref(),
                    0,
                    0,
                    u32::MAX as u64,
                )? as u32,
                chroot_base: abs_path(
                    "FC_JAILER_CHROOT_BASE",
                    raw.fc_jailer_chroot_base
                        .as_deref()
                        .unwrap_or("/srv/jailer"),
                )?,
            }),
        };
        let sampling_rate = match raw.otel_sampling_rate.as_deref() {
            None => 1.0,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => r,
                _ => return Err(bad("OTEL_SAMPLING_RATE", v, "a number from 0.0 to 1.0")),
            },
        };
        let otel = OtelConfig {
            enabled: boolean("OTEL_ENABLED", raw.otel_enabled.as_deref(), false)?,
            service_name: non_empty(
                "OTEL_SERVICE_NAME",
                raw.otel_service_name.as_deref(),
                "vmm-controlplane",
            )?,
            service_version: non_empty(
                "OTEL_SERVICE_VERSION",
                raw.otel_service_version.as_deref(),
                "0.0.1",
            )?,
            sampling_rate,
            endpoint: non_empty(
                "OTEL_ENDPOINT",
                raw.otel_endpoint.as_deref(),
                "localhost:4318",
            )?,
            prometheus_enabled: boolean(
                "OTEL_PROMETHEUS_ENABLED",
                raw.otel_prometheus_enabled.as_deref(),
                true,
            )?,
            prometheus_port: number(
                "OTEL_PROMETHEUS_PORT",
                raw.otel_prometheus_port.as_deref(),
                9464,
                1,
                65535,
            )? as u16,
        };
        let log_level = non_empty("LOG_LEVEL", raw.log_level.as_deref(), "info")?;
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(
                "LOG_LEVEL",
                &log_level,
                "a level (error, warn, info, debug, trace) or a RUST_LOG-style filter",
            ));
        }
        Ok(Self {
            port: number("PORT", raw.port.as_deref(), 8080, 0, 65535)? as u16,
            address: match raw.address.as_deref() {
                None => IpAddr::from([0, 0, 0, 0]),
                Some(v) => v.trim().parse().map_err(|_| {
                    bad(
                        "ADDRESS",
                        v,
                        "an IPv4 or IPv6 address such as 0.0.0.0, 127.0.0.1 or ::",
                    )
                })?,
            },
            backend,
            ch_endpoint: unix_endpoint(
                "CH_ENDPOINT",
                raw.ch_endpoint.as_deref(),
                "unix:///tmp/ch.sock",
            )?,
            ch_binary: path(
                "CH_BINARY",
                raw.ch_binary.as_deref().unwrap_or("cloud-hypervisor"),
            )?,
            fc_endpoint: unix_endpoint(
                "FC_ENDPOINT",
                raw.fc_endpoint.as_deref(),
                "unix:///tmp/firecracker.sock",
            )?,
            fc_binary: path(
                "FC_BINARY",
                raw.fc_binary.as_deref().unwrap_or("firecracker"),
            )?,
            fc_jailer,
            runtime_dir: abs_path(
                "RUNTIME_DIR",
                raw.runtime_dir.as_deref().unwrap_or("/run/vmcp"),
            )?,
            data_dir: abs_path(
                "DATA_DIR",
                raw.data_dir.as_deref().unwrap_or("/var/lib/vmcp"),
            )?,
            log_level,
            hypervisor_timeout: Duration::from_secs(number(
                "HYPERVISOR_TIMEOUT_SECONDS",
                raw.hypervisor_timeout_seconds.as_deref(),
                30,
                1,
                3600,
            )?),
            max_request_bytes: number(
                "MAX_REQUEST_BYTES",
                raw.max_request_bytes.as_deref(),
                1 << 20,
                1024,
                64 << 20,
            )? as usize,
            max_deadline: Duration::from_secs(number(
                "MAX_DEADLINE_SECONDS",
                raw.max_deadline_seconds.as_deref(),
                600,
                1,
                86400,
            )?),
            remove_orphans: match raw.orphans.as_deref().map(str::trim) {
                None | Some("remove") => true,
                Some("report") => false,
                Some(v) => return Err(bad("ORPHANS", v, "remove or report")),
            },
            shutdown_grace: Duration::from_secs(number(
                "SHUTDOWN_GRACE_SECONDS",
                raw.shutdown_grace_seconds.as_deref(),
                30,
                0,
                3600,
            )?),
            otel,
            api_socket: raw
                .api_socket
                .as_deref()
                .map(|v| socket_path("API_SOCKET", v))
                .transpose()?,
            auth_token_file: raw
                .auth_token_file
                .as_deref()
                .map(|v| abs_path("AUTH_TOKEN_FILE", v))
                .transpose()?,
            tls: tls_files(&raw)?,
            asset_dirs: raw
                .asset_dirs
                .as_deref()
                .map(|v| dir_list("ASSET_DIRS", v))
                .transpose()?,
            vm_limits: vm_limits(&raw)?,
            api_limits: ApiLimits {
                max_concurrent_requests: number(
                    "MAX_CONCURRENT_REQUESTS",
                    raw.max_concurrent_requests.as_deref(),
                    ApiLimits::default().max_concurrent_requests as u64,
                    1,
                    1_000_000,
                )? as usize,
                rate_limit_rps: number(
                    "RATE_LIMIT_RPS",
                    raw.rate_limit_rps.as_deref(),
                    u64::from(ApiLimits::default().rate_limit_rps),
                    0,
                    1_000_000,
                )? as u32,
            },
            connections: connection_limits(&raw)?,
            reserved_fds: raw
                .reserved_fds
                .as_deref()
                .map(|v| number("RESERVED_FDS", Some(v), 0, 64, 1 << 30))
                .transpose()?,
        })
    }

    /// Unknown `UNKEY_VMCP_*` variables present in `vars` (probably typos).
    pub fn unknown_variables(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        vars.into_iter()
            .filter_map(|(k, _)| {
                let rest = k.strip_prefix(PREFIX)?;
                (!KNOWN_VARIABLES.contains(&rest)).then_some(k)
            })
            .collect()
    }
}

fn tls_files(raw: &Raw) -> Result<Option<TlsFiles>, EnvError> {
    let file = |var, v: &Option<String>| v.as_deref().map(|v| abs_path(var, v)).transpose();
    let cert = file("TLS_CERT_FILE", &raw.tls_cert_file)?;
    let key = file("TLS_KEY_FILE", &raw.tls_key_file)?;
    let client_ca = file("TLS_CLIENT_CA_FILE", &raw.tls_client_ca_file)?;
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (None, None) => match &raw.tls_client_ca_file {
            Some(v) => Err(bad(
                "TLS_CLIENT_CA_FILE",
                v,
                "only meaningful with UNKEY_VMCP_TLS_CERT_FILE and UNKEY_VMCP_TLS_KEY_FILE set",
            )),
            None => Ok(None),
        },
        (Some(_), None) => Err(bad(
            "TLS_KEY_FILE",
            "",
            "required when UNKEY_VMCP_TLS_CERT_FILE is set",
        )),
        (None, Some(_)) => Err(bad(
            "TLS_CERT_FILE",
            "",
            "required when UNKEY_VMCP_TLS_KEY_FILE is set",
        )),
    }
}

fn vm_limits(raw: &Raw) -> Result<VmLimits, EnvError> {
    let d = VmLimits::host_defaults();
    Ok(VmLimits {
        max_vms: number("MAX_VMS", raw.max_vms.as_deref(), d.max_vms, 1, 1_000_000)?,
        max_vcpus_per_vm: number(
            "MAX_VCPUS_PER_VM",
            raw.max_vcpus_per_vm.as_deref(),
            d.max_vcpus_per_vm,
            1,
            crate::domain::config::MAX_VCPUS as u64,
        )?,
        max_memory_per_vm_mib: number(
            "MAX_MEMORY_PER_VM_MIB",
            raw.max_memory_per_vm_mib.as_deref(),
            d.max_memory_per_vm_mib,
            1,
            1 << 32,
        )?,
        max_total_vcpus: number(
            "MAX_TOTAL_VCPUS",
            raw.max_total_vcpus.as_deref(),
            d.max_total_vcpus,
            1,
            u64::from(u32::MAX),
        )?,
        max_total_memory_mib: number(
            "MAX_TOTAL_MEMORY_MIB",
            raw.max_total_memory_mib.as_deref(),
            d.max_total_memory_mib,
            1,
            1 << 40,
        )?,
    })
}

fn connection_limits(raw: &Raw) -> Result<ConnectionLimits, EnvError> {
    let d = ConnectionLimits::default();
    let secs = |var: &str, v: &Option<String>, default: Duration, max: u64| {
        number(var, v.as_deref(), default.as_secs(), 1, max).map(Duration::from_secs)
    };
    let max_connections = raw
        .max_connections
        .as_deref()
        .map(|v| number("MAX_CONNECTIONS", Some(v), 0, 1, 10_000_000).map(|n| n as usize))
        .transpose()?;
    let per_client = number(
        "MAX_CONNECTIONS_PER_CLIENT",
        raw.max_connections_per_client.as_deref(),
        d.max_connections_per_client as u64,
        1,
        10_000_000,
    )? as usize;
    if let (Some(total), Some(v)) = (max_connections, raw.max_connections_per_client.as_deref())
        && per_client > total
    {
        return Err(bad(
            "MAX_CONNECTIONS_PER_CLIENT",
            v,
            format!("at most UNKEY_VMCP_MAX_CONNECTIONS ({total})"),
        ));
    }
    Ok(ConnectionLimits {
        header_read_timeout: secs(
            "HEADER_READ_TIMEOUT_SECONDS",
            &raw.header_read_timeout_seconds,
            d.header_read_timeout,
            3600,
        )?,
        tls_handshake_timeout: secs(
            "TLS_HANDSHAKE_TIMEOUT_SECONDS",
            &raw.tls_handshake_timeout_seconds,
            d.tls_handshake_timeout,
            3600,
        )?,
        idle_timeout: secs(
            "IDLE_TIMEOUT_SECONDS",
            &raw.idle_timeout_seconds,
            d.idle_timeout,
            86400,
        )?,
        max_connections,
        max_connections_per_client: per_client,
        h2: H2Limits {
            max_concurrent_streams: number(
                "H2_MAX_CONCURRENT_STREAMS",
                raw.h2_max_concurrent_streams.as_deref(),
                u64::from(d.h2.max_concurrent_streams),
                1,
                10_000,
            )? as u32,
            max_header_list_bytes: number(
                "H2_MAX_HEADER_LIST_BYTES",
                raw.h2_max_header_list_bytes.as_deref(),
                u64::from(d.h2.max_header_list_bytes),
                1024,
                1 << 20,
            )? as u32,
            max_pending_reset_streams: number(
                "H2_MAX_PENDING_RESET_STREAMS",
                raw.h2_max_pending_reset_streams.as_deref(),
                d.h2.max_pending_reset_streams as u64,
                1,
                10_000,
            )? as usize,
            max_local_error_resets: number(
                "H2_MAX_LOCAL_ERROR_RESETS",
                raw.h2_max_local_error_resets.as_deref(),
                d.h2.max_local_error_resets as u64,
                1,
                100_000,
            )? as usize,
            keepalive_interval: secs(
                "H2_KEEPALIVE_INTERVAL_SECONDS",
                &raw.h2_keepalive_interval_seconds,
                d.h2.keepalive_interval,
                3600,
            )?,
            keepalive_timeout: secs(
                "H2_KEEPALIVE_TIMEOUT_SECONDS",
                &raw.h2_keepalive_timeout_seconds,
                d.h2.keepalive_timeout,
                3600,
            )?,
        },
    })
}

/// A list of absolute directories separated by commas or colons.
fn dir_list(var: &str, v: &str) -> Result<Vec<PathBuf>, EnvError> {
    let dirs: Vec<&str> = v.split([',', ':']).map(str::trim).collect();
    if dirs.iter().any(|d| !d.starts_with('/') || d.contains('\0')) {
        return Err(bad(
            var,
            v,
            "absolute directories separated by commas or colons, e.g. /var/lib/vmcp/images,/srv/kernels",
        ));
    }
    Ok(dirs.into_iter().map(PathBuf::from).collect())
}

fn number(var: &str, v: Option<&str>, default: u64, min: u64, max: u64) -> Result<u64, EnvError> {
    let Some(v) = v else { return Ok(default) };
    match v.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(bad(var, v, format!("a whole number from {min} to {max}"))),
    }
}

fn boolean(var: &str, v: Option<&str>, default: bool) -> Result<bool, EnvError> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some("false" | "0" | "no" | "off") => Ok(false),
        Some(_) => Err(bad(
            var,
            v.unwrap_or_default(),
            "true or false (also 1/0, yes/no, on/off)",
        )),
    }
}

fn non_empty(var: &str, v: Option<&str>, default: &str) -> Result<String, EnvError> {
    match v {
        None => Ok(default.to_owned()),
        Some(s) if !s.trim().is_empty() => Ok(s.trim().to_owned()),
        Some(s) => Err(bad(var, s, "a non-empty string")),
    }
}

fn path(var: &str, v: &str) -> Result<PathBuf, EnvError> {
    if v.trim().is_empty() || v.contains('\0') {
        return Err(bad(var, v, "a non-empty path or command name"));
    }
    Ok(PathBuf::from(v))
}

fn abs_path(var: &str, v: &str) -> Result<PathBuf, EnvError> {
    if !v.starts_with('/') || v.contains('\0') {
        return Err(bad(var, v, "an absolute path"));
    }
    Ok(PathBuf::from(v))
}

/// An absolute path short enough for a Unix socket (sun_path holds 107 bytes and a NUL).
fn socket_path(var: &str, v: &str) -> Result<PathBuf, EnvError> {
    if v.len() > 107 {
        return Err(bad(var, v, "an absolute path of at most 107 bytes"));
    }
    abs_path(var, v)
}

fn unix_endpoint(var: &str, v: Option<&str>, default: &str) -> Result<PathBuf, EnvError> {
    let v = v.unwrap_or(default);
    match v.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') && !p.contains('\0') => Ok(PathBuf::from(p)),
        _ => Err(bad(var, v, "unix:///absolute/path/to/api.sock")),
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
