//! What installs and starts VMCP: `vmcp-api`'s own command line (help from
//! the configuration's declaration, version, refusal of anything else before
//! a port is bound).

use std::time::Duration;

use vmcp::app::config::VARIABLES;

use super::harness::{free_port, vmcp_api_env};

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
