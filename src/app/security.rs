//! The API's protection, assembled once at start-up from the configuration:
//! who may call (bearer token, client certificates), over what (TLS), how
//! much (API load limits, connection caps and timeouts), and what a create may ask for (host paths,
//! resource limits). Loading fails loudly on anything unusable (an empty
//! token file, a key that does not match its certificate, a missing asset
//! directory); what is merely unsafe (an open API on a public address,
//! unrestricted paths) becomes a start-up warning instead, so the seed's
//! quick start keeps working.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::adapters::inbound::auth::{AuthPolicy, BearerToken, TokenError};
use crate::adapters::inbound::connections::ConnectionLimits;
use crate::adapters::inbound::guard::ApiLimits;
use crate::adapters::inbound::tls::{self, TlsError};
use crate::ports::BackendKind;

use super::admission::{CreatePolicy, VmLimits};
use super::config::Config;
use super::path_policy::{PathPolicy, PathPolicyError};

/// Tokens shorter than this draw a start-up warning.
pub const MIN_TOKEN_LEN: usize = 32;

/// Everything that protects the API, ready to hand to `wiring::start`.
#[derive(Clone)]
pub struct Security {
    /// Credentials VM API calls must carry.
    pub auth: AuthPolicy,
    /// TLS for the API port; `None` serves plaintext (HTTP/1.1 and h2c).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// API concurrency and rate limits.
    pub api_limits: ApiLimits,
    /// Host-path policy and resource limits for creates.
    pub admission: CreatePolicy,
    /// Connection timeouts, caps and HTTP/2 limits.
    pub connections: ConnectionLimits,
    /// Descriptors kept for VM work; `None` for the default (a quarter of the limit, at most 4096).
    pub reserved_descriptors: Option<u64>,
    /// Also serve the API on this Unix socket (mode 0600), for clients on the host.
    pub api_socket: Option<std::path::PathBuf>,
    /// WatchVms history, queues, watcher cap and heartbeat.
    pub watch: super::feed::WatchSettings,
    /// Restart policy default, backoff and crash-loop limit.
    pub restart: crate::domain::restart::RestartSettings,
    /// Where snapshots are kept and how many; `None` keeps none (the
    /// snapshot calls answer `unavailable`).
    pub snapshots: Option<super::manager::snapshots::SnapshotSettings>,
    /// Managed networking (taps VMCP creates on a bridge); `None` refuses
    /// interfaces that name a bridge.
    pub network: Option<super::network::Networking>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("auth", &self.auth)
            .field("tls", &self.tls.is_some())
            .field("api_limits", &self.api_limits)
            .field("admission", &self.admission)
            .field("connections", &self.connections)
            .field("reserved_descriptors", &self.reserved_descriptors)
            .field("api_socket", &self.api_socket)
            .field("watch", &self.watch)
            .field("restart", &self.restart)
            .field("snapshots", &self.snapshots)
            .field("network", &self.network)
            .finish()
    }
}

/// Why the configured protection cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// UNKEY_VMCP_AUTH_TOKEN_FILE is unusable.
    #[error("UNKEY_VMCP_AUTH_TOKEN_FILE: {0}")]
    Token(#[source] TokenError),
    /// The TLS files are unusable.
    #[error("UNKEY_VMCP_TLS_*: {0}")]
    Tls(#[source] TlsError),
    /// UNKEY_VMCP_ASSET_DIRS is unusable.
    #[error("UNKEY_VMCP_ASSET_DIRS: {0}")]
    AssetDirs(#[source] PathPolicyError),
    /// The snapshot directory under UNKEY_VMCP_DATA_DIR is unusable.
    #[error("UNKEY_VMCP_DATA_DIR: {0}")]
    Snapshots(#[source] crate::ports::SnapshotRepoError),
}

impl Security {
    /// No credentials, no TLS, unrestricted paths, no resource limits, default
    /// API and connection limits.
    pub fn open() -> Self {
        Self {
            auth: AuthPolicy::open(),
            tls: None,
            api_limits: ApiLimits::default(),
            admission: CreatePolicy::unrestricted(),
            connections: ConnectionLimits::default(),
            reserved_descriptors: None,
            api_socket: None,
            watch: super::feed::WatchSettings::default(),
            restart: crate::domain::restart::RestartSettings::default(),
            snapshots: None,
            network: None,
        }
    }

    /// Loads the token, TLS material and asset directories named by `config`.
    pub fn from_config(config: &Config) -> Result<Self, SecurityError> {
        let token = config
            .auth_token_file
            .as_deref()
            .map(BearerToken::from_file)
            .transpose()
            .map_err(SecurityError::Token)?;
        let tls = config
            .tls
            .as_ref()
            .map(|t| tls::server_config(&t.cert, &t.key, t.client_ca.as_deref()))
            .transpose()
            .map_err(SecurityError::Tls)?;
        let paths = match &config.asset_dirs {
            Some(dirs) => PathPolicy::new(dirs).map_err(SecurityError::AssetDirs)?,
            None => PathPolicy::unrestricted(),
        };
        Ok(Self {
            auth: AuthPolicy {
                token,
                require_client_cert: config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            },
            tls,
            api_limits: config.api_limits,
            admission: CreatePolicy {
                paths,
                limits: config.vm_limits,
            },
            connections: config.connections,
            reserved_descriptors: config.reserved_fds,
            api_socket: config.api_socket.clone(),
            watch: config.watch,
            restart: config.restart,
            snapshots: Some(super::manager::snapshots::SnapshotSettings {
                repo: std::sync::Arc::new(
                    crate::adapters::outbound::snapshots::FsSnapshots::open(
                        config.data_dir.join("snapshots"),
                    )
                    .map_err(SecurityError::Snapshots)?,
                ),
                limits: config.snapshot_limits,
            }),
            network: Some(super::network::Networking {
                host: std::sync::Arc::new(crate::adapters::outbound::network::LinuxNetwork),
                default_bridge: config.bridge.clone().unwrap_or_default(),
                // A jailed Firecracker opens its taps as the jailer's uid.
                vmm_uid: config
                    .fc_jailer
                    .as_ref()
                    .filter(|_| config.backend == BackendKind::Firecracker)
                    .map(|j| j.uid)
                    .filter(|uid| *uid != 0),
            }),
        })
    }

    /// The acceptor for `serve_with_tls`, when TLS is configured.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.tls.clone().map(tokio_rustls::TlsAcceptor::from)
    }

    /// The resource limits applied to creates.
    pub fn vm_limits(&self) -> VmLimits {
        self.admission.limits
    }
}

fn is_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_loopback(),
        IpAddr::V6(a) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn group_or_world_readable(path: &PathBuf) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

/// Unsafe-but-allowed settings, one line each, for main to log at WARN at start-up.
pub fn startup_warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    let mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    let public = !is_local(config.address);
    let listen = format!("{}:{}", config.address, config.port);
    if config.auth_token_file.is_none() && !mtls {
        if public {
            w.push(format!(
                "THE VM API IS OPEN: VMCP listens on {listen} (not loopback) with no \
                 UNKEY_VMCP_AUTH_TOKEN_FILE and no UNKEY_VMCP_TLS_CLIENT_CA_FILE, so anyone who \
                 can reach this port can start VMMs and make VMCP open host files; set a token \
                 (and TLS) or listen on 127.0.0.1"
            ));
        }
    } else if public && config.tls.is_none() && config.auth_token_file.is_some() {
        w.push(format!(
            "the bearer token travels in cleartext: VMCP listens on {listen} without TLS; set \
             UNKEY_VMCP_TLS_CERT_FILE and UNKEY_VMCP_TLS_KEY_FILE"
        ));
    }
    if let Some(token) = &config.auth_token_file {
        if group_or_world_readable(token) {
            w.push(format!(
                "the token file {} is readable by its group or others; chmod 0600 it",
                token.display()
            ));
        }
        if let Ok(t) = BearerToken::from_file(token)
            && t.len() < MIN_TOKEN_LEN
        {
            w.push(format!(
                "the bearer token is only {} characters; use at least {MIN_TOKEN_LEN} random ones",
                t.len()
            ));
        }
    }
    if let Some(key) = config.tls.as_ref().map(|t| &t.key)
        && group_or_world_readable(key)
    {
        w.push(format!(
            "the TLS key {} is readable by its group or others; chmod 0600 it",
            key.display()
        ));
    }
    if config.asset_dirs.is_none() {
        w.push(
            "UNKEY_VMCP_ASSET_DIRS is not set: callers may name any host file VMCP can read as a \
             kernel, initrd or disk, and any writable path as console output; set it to the \
             directories holding VM images"
                .to_owned(),
        );
    }
    if config.backend == BackendKind::Firecracker && config.fc_jailer.is_none() {
        w.push(
            "Firecracker runs without the jailer (no chroot, uid/gid drop or cgroups); set \
             UNKEY_VMCP_FC_JAILER_BINARY in production"
                .to_owned(),
        );
    }
    if config.api_limits.rate_limit_rps == 0 {
        w.push("UNKEY_VMCP_RATE_LIMIT_RPS=0: the VM API is not rate limited".to_owned());
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::config::PREFIX;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        Config::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (format!("{PREFIX}{k}"), (*v).to_owned())),
        )
        .expect("valid config")
    }

    fn has(w: &[String], needle: &str) -> bool {
        w.iter().any(|l| l.contains(needle))
    }

    fn write_private(dir: &std::path::Path, name: &str, data: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        p.to_string_lossy().into_owned()
    }

    #[test]
    fn the_seed_defaults_warn_about_an_open_api_and_unrestricted_paths() {
        let w = startup_warnings(&cfg(&[]));
        assert!(has(&w, "THE VM API IS OPEN"), "{w:?}");
        assert!(has(&w, "0.0.0.0:8080"), "{w:?}");
        assert!(has(&w, "UNKEY_VMCP_ASSET_DIRS is not set"), "{w:?}");
        assert!(w.iter().all(|l| !l.contains('\n')), "{w:?}");
    }

    #[test]
    fn loopback_without_credentials_is_not_an_open_api_warning() {
        for addr in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            let w = startup_warnings(&cfg(&[("ADDRESS", addr)]));
            assert!(!has(&w, "THE VM API IS OPEN"), "{addr}: {w:?}");
        }
        let w = startup_warnings(&cfg(&[("ADDRESS", "::")]));
        assert!(has(&w, "THE VM API IS OPEN"), "{w:?}");
    }

    #[test]
    fn production_settings_draw_no_warnings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = write_private(dir.path(), "token", &"t".repeat(40));
        let key = write_private(dir.path(), "key.pem", "k");
        let w = startup_warnings(&cfg(&[
            ("AUTH_TOKEN_FILE", &token),
            ("TLS_CERT_FILE", "/etc/vmcp/cert.pem"),
            ("TLS_KEY_FILE", &key),
            ("TLS_CLIENT_CA_FILE", "/etc/vmcp/ca.pem"),
            ("ASSET_DIRS", "/srv/vm"),
        ]));
        assert_eq!(w, Vec::<String>::new());
    }

    #[test]
    fn weak_or_exposed_credentials_are_flagged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = write_private(dir.path(), "token", "short\n");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let w = startup_warnings(&cfg(&[("AUTH_TOKEN_FILE", &token), ("ASSET_DIRS", "/srv")]));
        assert!(has(&w, "cleartext"), "{w:?}");
        assert!(has(&w, "readable by its group or others"), "{w:?}");
        assert!(has(&w, "only 5 characters"), "{w:?}");
        assert!(!has(&w, "short"), "the token itself is never shown: {w:?}");
        assert!(!has(&w, "THE VM API IS OPEN"), "{w:?}");
    }

    #[test]
    fn firecracker_without_jailer_and_no_rate_limit_are_flagged() {
        let w = startup_warnings(&cfg(&[
            ("BACKEND", "firecracker"),
            ("RATE_LIMIT_RPS", "0"),
            ("ADDRESS", "127.0.0.1"),
        ]));
        assert!(has(&w, "without the jailer"), "{w:?}");
        assert!(has(&w, "not rate limited"), "{w:?}");
    }

    #[test]
    fn from_config_loads_everything_or_names_what_failed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = Security::from_config(&cfg(&[])).expect("defaults load");
        assert!(!open.auth.is_enforced());
        assert!(open.tls.is_none());
        assert!(!open.admission.paths.is_restricted());
        assert_eq!(open.vm_limits(), VmLimits::host_defaults());

        let token = write_private(dir.path(), "token", "abc\n");
        let s = Security::from_config(&cfg(&[
            ("AUTH_TOKEN_FILE", &token),
            ("ASSET_DIRS", &dir.path().to_string_lossy()),
        ]))
        .expect("loads");
        assert!(s.auth.token.is_some());
        assert!(!s.auth.require_client_cert);
        assert!(s.admission.paths.is_restricted());
        assert!(!format!("{s:?}").contains("abc"));

        let empty = write_private(dir.path(), "empty", "  \n");
        let e = Security::from_config(&cfg(&[("AUTH_TOKEN_FILE", &empty)])).expect_err("empty");
        assert!(
            matches!(e, SecurityError::Token(TokenError::Empty { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("UNKEY_VMCP_AUTH_TOKEN_FILE"), "{e}");

        let e = Security::from_config(&cfg(&[("ASSET_DIRS", "/nonexistent-vmcp-dir")]))
            .expect_err("missing dir");
        assert!(e.to_string().contains("UNKEY_VMCP_ASSET_DIRS"), "{e}");

        let e = Security::from_config(&cfg(&[
            ("TLS_CERT_FILE", "/nonexistent/cert.pem"),
            ("TLS_KEY_FILE", "/nonexistent/key.pem"),
        ]))
        .expect_err("missing cert");
        assert!(matches!(e, SecurityError::Tls(_)), "{e}");
    }
}
