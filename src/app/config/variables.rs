//! The one declaration of every `UNKEY_VMCP_*` variable: its name, its
//! default, the parser that reads it (and so the type of its setting) and one
//! line saying what it does. Everything else comes from this table: the
//! [`Var`] enum, the [`VARIABLES`] list that `vmcp-api --help`, the
//! unknown-variable warning and the README's configuration table are made
//! from (a test holds the README to it), and one [`Setting`] type per
//! variable in [`setting`] that `Config::from_vars` reads through.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::parsers::{
    Parsed, abs_path, address, backend, boolean, bridge, console_cap, dir_list, int, millis,
    non_empty, orphans, path, ratio, restart_policy, seconds, socket_path, unix_endpoint,
};
use crate::domain::config::MAX_VCPUS;
use crate::domain::restart::RestartPolicy;
use crate::ports::BackendKind;

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

/// A declared variable as a type: which variable it is and how its text
/// becomes its setting.
pub trait Setting {
    /// The setting's type.
    type Value;
    /// The variable.
    const VAR: Var;
    /// Reads the variable's text, or says what it accepts.
    fn parse(text: &str) -> Parsed<Self::Value>;
}

/// Declares the variables: the [`Var`] enum and the [`VARIABLES`] table in
/// the same order, so `VARIABLES[var as usize]` is `var`'s own entry, and a
/// [`Setting`] type of the same name per variable in [`setting`].
macro_rules! variables {
    ($($id:ident $name:literal: $ty:ty = $default:expr, $parse:expr, $about:literal;)*) => {
        /// A variable VMCP reads; `VARIABLES[v as usize]` declares it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Var { $($id),* }

        /// Every variable VMCP reads, in the order `vmcp-api --help` lists them.
        pub const VARIABLES: &[Variable] = &[
            $(Variable { var: Var::$id, name: $name, default: $default, about: $about }),*
        ];

        /// One type per declared variable, naming its parser.
        pub mod setting {
            use super::*;

            $(
                #[doc = $about]
                #[derive(Debug, Clone, Copy)]
                pub struct $id;

                impl Setting for $id {
                    type Value = $ty;
                    const VAR: Var = Var::$id;
                    fn parse(text: &str) -> Parsed<$ty> {
                        ($parse)(text)
                    }
                }
            )*
        }
    };
}

use DefaultValue::{Computed, Text, Unset};

// Adding a variable: one line here, then read it in `Config::from_vars`.
variables! {
    Port "PORT": u16 = Text("8080"), int::<u16, 0, 65535>, "API port";
    Address "ADDRESS": IpAddr = Text("0.0.0.0"), address, "API listen address (IPv4 or IPv6)";
    ApiSocket "API_SOCKET": PathBuf = Unset, socket_path, "Also serve the API on this Unix socket (absolute path, mode 0600) for clients on the host";
    Backend "BACKEND": BackendKind = Text("cloudhypervisor"), backend, "VMM backend: cloudhypervisor or firecracker";
    ChEndpoint "CH_ENDPOINT": PathBuf = Text("unix:///tmp/ch.sock"), unix_endpoint, "Seed compatibility: where a pre-VMCP shared Cloud Hypervisor may still listen";
    ChBinary "CH_BINARY": PathBuf = Text("cloud-hypervisor"), path, "Cloud Hypervisor binary (path or name on PATH)";
    FcEndpoint "FC_ENDPOINT": PathBuf = Text("unix:///tmp/firecracker.sock"), unix_endpoint, "Seed compatibility: where a pre-VMCP shared Firecracker may still listen";
    FcBinary "FC_BINARY": PathBuf = Text("firecracker"), path, "Firecracker binary (path or name on PATH)";
    FcJailerBinary "FC_JAILER_BINARY": PathBuf = Unset, path, "Run Firecracker under this jailer (production mode)";
    FcJailerUid "FC_JAILER_UID": u32 = Text("0"), int::<u32, 0, { u32::MAX as u64 }>, "uid the jailed VMM runs as (with FC_JAILER_BINARY)";
    FcJailerGid "FC_JAILER_GID": u32 = Text("0"), int::<u32, 0, { u32::MAX as u64 }>, "gid the jailed VMM runs as (with FC_JAILER_BINARY)";
    FcJailerChrootBase "FC_JAILER_CHROOT_BASE": PathBuf = Text("/srv/jailer"), abs_path, "Base of the jailer chroots (with FC_JAILER_BINARY)";
    RuntimeDir "RUNTIME_DIR": PathBuf = Text("/run/vmcp"), abs_path, "Per-VM runtime directories (socket, pid, log, console), mode 0700";
    DataDir "DATA_DIR": PathBuf = Text("/var/lib/vmcp"), abs_path, "Durable VM records (the SQLite store), mode 0700";
    LogLevel "LOG_LEVEL": String = Text("info"), non_empty, "Log filter; RUST_LOG wins when set";
    HypervisorTimeoutSeconds "HYPERVISOR_TIMEOUT_SECONDS": Duration = Text("30"), seconds::<1, 3600>, "Timeout of one VMM call";
    MaxRequestBytes "MAX_REQUEST_BYTES": usize = Text("1048576"), int::<usize, 1024, { 64 << 20 }>, "Largest request body";
    MaxDeadlineSeconds "MAX_DEADLINE_SECONDS": Duration = Text("600"), seconds::<1, 86400>, "Cap on client deadlines (Connect-Timeout-Ms, grpc-timeout)";
    ShutdownGraceSeconds "SHUTDOWN_GRACE_SECONDS": Duration = Text("30"), seconds::<0, 3600>, "How long shutdown drains requests; VM owners then finish their current VMM call";
    Orphans "ORPHANS": bool = Text("remove"), orphans, "At start-up, remove VMM processes and runtime directories of no VM, or only report them";
    Bridge "BRIDGE": String = Unset, bridge, "Default bridge for interfaces naming neither tap_device nor bridge (VMCP makes their taps)";
    OtelEnabled "OTEL_ENABLED": bool = Text("false"), boolean, "Push traces and metrics over OTLP/HTTP";
    OtelServiceName "OTEL_SERVICE_NAME": String = Text("vmm-controlplane"), non_empty, "service.name";
    OtelServiceVersion "OTEL_SERVICE_VERSION": String = Text("0.0.1"), non_empty, "service.version";
    OtelSamplingRate "OTEL_SAMPLING_RATE": f64 = Text("1.0"), ratio, "Root trace sampling ratio in [0, 1]; error traces are always kept";
    OtelEndpoint "OTEL_ENDPOINT": String = Text("localhost:4318"), non_empty, "OTLP/HTTP collector";
    OtelPrometheusEnabled "OTEL_PROMETHEUS_ENABLED": bool = Text("true"), boolean, "Serve /metrics";
    OtelPrometheusPort "OTEL_PROMETHEUS_PORT": u16 = Text("9464"), int::<u16, 1, 65535>, "/metrics port";
    AuthTokenFile "AUTH_TOKEN_FILE": PathBuf = Unset, abs_path, "File holding the bearer token every VM call must send";
    TlsCertFile "TLS_CERT_FILE": PathBuf = Unset, abs_path, "Serve the API over TLS with this PEM certificate chain (with TLS_KEY_FILE)";
    TlsKeyFile "TLS_KEY_FILE": PathBuf = Unset, abs_path, "PEM private key for TLS_CERT_FILE";
    TlsClientCaFile "TLS_CLIENT_CA_FILE": PathBuf = Unset, abs_path, "Require client certificates from this CA for VM calls (mutual TLS)";
    AssetDirs "ASSET_DIRS": Vec<PathBuf> = Unset, dir_list, "Directories (comma- or colon-separated) VM assets must resolve into; unset is unrestricted";
    MaxVms "MAX_VMS": u64 = Text("256"), int::<u64, 1, 1_000_000>, "VMs per host";
    MaxVcpusPerVm "MAX_VCPUS_PER_VM": u64 = Text("32"), int::<u64, 1, { MAX_VCPUS as u64 }>, "vCPUs per VM";
    MaxMemoryPerVmMib "MAX_MEMORY_PER_VM_MIB": u64 = Text("65536"), int::<u64, 1, { 1 << 32 }>, "Memory per VM, MiB";
    MaxTotalVcpus "MAX_TOTAL_VCPUS": u64 = Computed("16 x host CPUs"), int::<u64, 1, { u32::MAX as u64 }>, "vCPUs of all VMs together";
    MaxTotalMemoryMib "MAX_TOTAL_MEMORY_MIB": u64 = Computed("host memory"), int::<u64, 1, { 1 << 40 }>, "Memory of all VMs together, MiB";
    MaxConcurrentRequests "MAX_CONCURRENT_REQUESTS": usize = Text("512"), int::<usize, 1, 1_000_000>, "In-flight API requests; more are shed as unavailable";
    RateLimitRps "RATE_LIMIT_RPS": u32 = Text("1000"), int::<u32, 0, 1_000_000>, "API requests per second (0 disables); more get resource_exhausted";
    MaxConnections "MAX_CONNECTIONS": usize = Computed("4096, lowered to fit the descriptor limit"), int::<usize, 1, 10_000_000>, "Open client connections in all; more are closed at accept";
    MaxConnectionsPerClient "MAX_CONNECTIONS_PER_CLIENT": usize = Text("512"), int::<usize, 1, 10_000_000>, "Open connections per client IP address";
    ReservedFds "RESERVED_FDS": u64 = Computed("1/4 of the descriptor limit, at most 4096"), int::<u64, 64, { 1 << 30 }>, "Descriptors kept for VM work that clients cannot use";
    HeaderReadTimeoutSeconds "HEADER_READ_TIMEOUT_SECONDS": Duration = Text("10"), seconds::<1, 3600>, "Time to send a request head or the HTTP/2 preface";
    IdleTimeoutSeconds "IDLE_TIMEOUT_SECONDS": Duration = Text("60"), seconds::<1, 86400>, "A connection without a request in flight this long is closed";
    TlsHandshakeTimeoutSeconds "TLS_HANDSHAKE_TIMEOUT_SECONDS": Duration = Text("10"), seconds::<1, 3600>, "Time to finish the TLS handshake";
    H2MaxConcurrentStreams "H2_MAX_CONCURRENT_STREAMS": u32 = Text("100"), int::<u32, 1, 10_000>, "HTTP/2 streams per connection";
    H2MaxHeaderListBytes "H2_MAX_HEADER_LIST_BYTES": u32 = Text("16384"), int::<u32, 1024, { 1 << 20 }>, "HTTP/2 header list size";
    H2MaxPendingResetStreams "H2_MAX_PENDING_RESET_STREAMS": usize = Text("20"), int::<usize, 1, 10_000>, "HTTP/2 streams reset before being accepted";
    H2MaxLocalErrorResets "H2_MAX_LOCAL_ERROR_RESETS": usize = Text("1024"), int::<usize, 1, 100_000>, "HTTP/2 streams reset for client errors before the connection is ended";
    H2KeepaliveIntervalSeconds "H2_KEEPALIVE_INTERVAL_SECONDS": Duration = Text("30"), seconds::<1, 3600>, "HTTP/2 ping interval";
    H2KeepaliveTimeoutSeconds "H2_KEEPALIVE_TIMEOUT_SECONDS": Duration = Text("10"), seconds::<1, 3600>, "How long a ping answer may take before the connection is closed";
    WatchHistory "WATCH_HISTORY": usize = Text("4096"), int::<usize, 1, { 1 << 20 }>, "VM changes kept so a WatchVms client can resume from its last revision";
    WatchBuffer "WATCH_BUFFER": usize = Text("1024"), int::<usize, 1, { 1 << 20 }>, "Changes queued per watcher; a watcher further behind is ended with resource_exhausted";
    MaxWatchers "MAX_WATCHERS": usize = Text("1024"), int::<usize, 1, 1_000_000>, "WatchVms streams open at once; more get resource_exhausted";
    WatchHeartbeatSeconds "WATCH_HEARTBEAT_SECONDS": Duration = Text("15"), seconds::<1, 3600>, "Heartbeat interval on a quiet WatchVms stream (keeps it alive through proxies)";
    DefaultRestartPolicy "DEFAULT_RESTART_POLICY": RestartPolicy = Text("never"), restart_policy, "Restart policy of VMs that name none: never, on-failure or always";
    RestartBackoffInitialMs "RESTART_BACKOFF_INITIAL_MS": Duration = Text("1000"), millis::<1, 3_600_000>, "Delay before a policy's first restart; doubled per restart in the window";
    RestartBackoffMaxMs "RESTART_BACKOFF_MAX_MS": Duration = Text("60000"), millis::<1, 3_600_000>, "Longest delay between a policy's restarts";
    RestartLimit "RESTART_LIMIT": u32 = Text("5"), int::<u32, 1, 1000>, "Restarts within RESTART_WINDOW_SECONDS before a VM is left FAILED (restart limit reached)";
    RestartWindowSeconds "RESTART_WINDOW_SECONDS": Duration = Text("600"), seconds::<1, 86400>, "The crash-loop window";
    ConsoleMaxBytes "CONSOLE_MAX_BYTES": u64 = Text("16777216"), console_cap, "Console output kept per VM; older output is dropped from the front (0 keeps all)";
    MaxSnapshots "MAX_SNAPSHOTS": u64 = Text("64"), int::<u64, 1, 1_000_000>, "Snapshots kept on the host, under DATA_DIR/snapshots";
    MaxSnapshotBytes "MAX_SNAPSHOT_BYTES": u64 = Text("68719476736"), int::<u64, { 1 << 20 }, { u64::MAX }>, "Bytes all snapshots may take together";
}

impl Var {
    /// This variable's declaration.
    pub fn declaration(self) -> &'static Variable {
        // In range: the macro builds `Var` and `VARIABLES` from one list, in one order.
        &VARIABLES[self as usize]
    }
}
