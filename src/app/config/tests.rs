//! Tests of the configuration: defaults, every variable read and checked,
//! the rules that span variables, and the README table against the declaration.

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
    let jailer = cfg(&[("FC_JAILER_BINARY", "/j"), ("FC_JAILER_UID", "x")]).expect_err("bad uid");
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

/// The README's configuration table as the declaration makes it: one row
/// per variable, in declaration order.
fn readme_table() -> String {
    let mut table = String::from("| Variable | Default | Meaning |\n|---|---|---|\n");
    for v in VARIABLES {
        let default = match v.default {
            DefaultValue::Text(t) => format!("`{t}`"),
            DefaultValue::Unset | DefaultValue::Computed(_) => v.default.to_string(),
        };
        table.push_str(&format!(
            "| `{}` | {default} | {} |\n",
            v.full_name(),
            v.about
        ));
    }
    table
}

#[test]
fn the_readme_table_is_the_declaration() {
    let readme = include_str!("../../../README.md");
    let documented: String = readme
        .lines()
        .skip_while(|l| *l != "| Variable | Default | Meaning |")
        .take_while(|l| l.starts_with('|'))
        .map(|l| format!("{l}\n"))
        .collect();
    let declared = readme_table();
    assert!(
        documented == declared,
        "README.md's configuration table differs from src/app/config/variables.rs; \
             replace it with:\n\n{declared}"
    );
}
