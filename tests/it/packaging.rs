//! What installs and starts VMCP: `vmcp-api`'s own command line (help from
//! the configuration's declaration, version, refusal of anything else before
//! a port is bound), the systemd unit (`systemd-analyze verify`, the kill
//! mode that keeps VMs alive, directories matching the defaults) and the
//! environment file (only declared variables, valid values).

use std::path::Path;
use std::time::Duration;

use vmcp::app::config::{Config, DefaultValue, VARIABLES, Var};

use super::harness::{free_port, vmcp_api_env};
use super::real_env::on_path;

const UNIT: &str = include_str!("../../deploy/vmcp.service");
const ENV_FILE: &str = include_str!("../../deploy/vmcp.env");

fn vmcp_api(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_vmcp-api"))
        .args(args)
        .env_clear()
        .output()
        .expect("vmcp-api runs")
}

#[test]
fn vmcp_api_help_lists_every_variable_with_its_declared_default() {
    let out = vmcp_api(&["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).expect("utf-8");
    assert!(help.contains("Usage: vmcp-api"), "{help}");
    assert!(help.contains("vmm.v1.VmService"), "says what it does");
    assert!(help.contains("README.md"), "says where the docs are");
    for v in VARIABLES {
        let line = format!("  {}  [default: {}]", v.full_name(), v.default);
        assert!(help.contains(&line), "{line:?} in --help");
        assert!(help.contains(v.about), "{}'s description in --help", v.name);
    }
    assert!(help.contains("UNKEY_VMCP_PORT  [default: 8080]"));
    assert!(help.contains("UNKEY_VMCP_API_SOCKET  [default: unset]"));
    // -h is the same text.
    assert_eq!(vmcp_api(&["-h"]).stdout, help.as_bytes());
}

#[test]
fn vmcp_api_version_names_the_version_and_the_revision() {
    let out = vmcp_api(&["--version"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let rest = text
        .trim()
        .strip_prefix(&format!("vmcp-api {} (git ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{text:?}"));
    let revision = rest.strip_suffix(')').expect("closing parenthesis");
    assert!(
        revision == "unknown" || revision.chars().all(|c| c.is_ascii_hexdigit()),
        "{revision:?} is a commit or unknown"
    );
    assert!(!revision.is_empty());
}

#[tokio::test]
async fn vmcp_api_refuses_other_arguments_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    for arg in ["--port=9000", "serve", "-x"] {
        let port = free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmcp-api"));
        vmcp_api_env(&mut cmd, dir.path(), port);
        cmd.arg(arg).stderr(std::process::Stdio::piped());
        let child = cmd.spawn().expect("spawn");
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await
        .unwrap_or_else(|_| panic!("vmcp-api {arg} exits instead of serving"))
        .unwrap()
        .expect("output");
        assert_eq!(out.status.code(), Some(2), "{arg}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("Usage: vmcp-api"), "{arg}: {stderr}");
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "{arg}: nothing listens"
        );
        assert!(
            !dir.path().join("data").exists(),
            "{arg}: no store was opened"
        );
    }
}

/// `Key=value` lines of the unit's [Service] section.
fn service_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .skip_while(|l| l.trim() != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect()
}

fn setting<'a>(settings: &[(&str, &'a str)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .collect()
}

fn declared_default(var: Var) -> &'static str {
    match var.declaration().default {
        DefaultValue::Text(t) => t,
        other => panic!("{var:?} has a default text, not {other:?}"),
    }
}

#[test]
fn the_unit_keeps_vms_alive_and_uses_the_default_directories() {
    let s = service_settings(UNIT);
    // Only vmcp-api is signalled on stop and restart; its VMMs keep running.
    assert_eq!(setting(&s, "KillMode"), ["process"]);
    assert_eq!(setting(&s, "RuntimeDirectoryPreserve"), ["yes"]);
    assert_eq!(setting(&s, "TasksMax"), ["infinity"]);
    // systemd's directories are the configuration's defaults.
    assert_eq!(
        Path::new("/run").join(setting(&s, "RuntimeDirectory")[0]),
        Path::new(declared_default(Var::RuntimeDir))
    );
    assert_eq!(
        Path::new("/var/lib").join(setting(&s, "StateDirectory")[0]),
        Path::new(declared_default(Var::DataDir))
    );
    assert_eq!(setting(&s, "RuntimeDirectoryMode"), ["0700"]);
    assert_eq!(setting(&s, "StateDirectoryMode"), ["0700"]);
    // The VMM's devices get through the device policy.
    assert_eq!(setting(&s, "DevicePolicy"), ["closed"]);
    let devices = setting(&s, "DeviceAllow");
    assert!(devices.contains(&"/dev/kvm rw"), "{devices:?}");
    assert!(devices.contains(&"/dev/net/tun rw"), "{devices:?}");
    assert_eq!(setting(&s, "ExecStart"), ["/usr/bin/vmcp-api"]);
    assert_eq!(setting(&s, "EnvironmentFile"), ["-/etc/vmcp/vmcp.env"]);
}

#[test]
fn the_unit_verifies_with_systemd_analyze() {
    let Some(analyze) = on_path("systemd-analyze") else {
        super::skips::skip(
            "the_unit_verifies_with_systemd_analyze",
            "cannot verify deploy/vmcp.service (systemd-analyze not found)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart names an executable: point it at the one just built.
    let unit = UNIT.replace("/usr/bin/vmcp-api", env!("CARGO_BIN_EXE_vmcp-api"));
    assert_ne!(unit, UNIT, "ExecStart was replaced");
    let path = dir.path().join("vmcp.service");
    std::fs::write(&path, &unit).unwrap();
    let verify = |path: &Path| {
        std::process::Command::new(&analyze)
            .arg("verify")
            .arg(path)
            .output()
            .expect("systemd-analyze runs")
    };
    let out = verify(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify only warns about unknown keys and bad values: a line naming the unit is a finding.
    let findings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("vmcp.service"))
        .collect();
    assert!(out.status.success(), "{stderr}");
    assert!(findings.is_empty(), "{findings:#?}");

    // The check can fail: a misspelt key is reported against the unit.
    let bad = dir.path().join("bad.service");
    std::fs::write(&bad, unit.replace("KillMode=process", "KillMod=process")).unwrap();
    let out = verify(&bad);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.service"),
        "{out:?}"
    );
}

/// The environment file's assignments, commented-out examples included.
fn env_assignments(uncomment: bool) -> Vec<(String, String)> {
    ENV_FILE
        .lines()
        .map(str::trim)
        .filter_map(|l| match l.strip_prefix('#') {
            Some(rest) if uncomment => Some(rest),
            Some(_) => None,
            None => Some(l),
        })
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("UNKEY_VMCP_"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_environment_file_names_declared_variables_with_valid_values() {
    let active = env_assignments(false);
    let all = env_assignments(true);
    assert!(active.len() >= 2 && all.len() > active.len(), "{all:?}");
    assert_eq!(Config::unknown_variables(all.clone()), Vec::<String>::new());
    let config = Config::from_vars(active.clone()).expect("the active settings are valid");
    assert_eq!(config.address.to_string(), "127.0.0.1", "loopback only");
    let socket = config.api_socket.expect("a host-local socket");
    assert!(socket.starts_with(&config.runtime_dir), "{socket:?}");
    Config::from_vars(all.clone()).expect("every commented example is valid too");
    // A commented-out variable with a default shows that default.
    for (name, value) in &all {
        let declared = VARIABLES
            .iter()
            .find(|v| v.full_name() == *name)
            .expect("declared");
        if let DefaultValue::Text(default) = declared.default
            && !active.iter().any(|(k, _)| k == name)
        {
            assert_eq!(value, default, "{name} shows its default");
        }
    }
}
