//! What the real-VMM tests need and one place that decides whether they can
//! run: the VMM binary (an environment variable or PATH), a read-write
//! /dev/kvm and the tiny test guest (`make guest`). When anything is missing
//! the test prints one `SKIPPED: <test>: missing …` line (and is listed
//! again when the test binary exits, see `skips`) and returns. Also
//! two helpers every VMM adapter test uses: an error with its source chain,
//! and SIGKILL by pid.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::skips::SUMMARY_HEADING;

/// The VMM a test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    CloudHypervisor,
    Firecracker,
}

/// A usable VMM binary and guest kernel.
pub struct Real {
    pub binary: PathBuf,
    pub kernel: PathBuf,
}

/// Writes a line past libtest's capture (which swallows eprintln! of passing tests).
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The binary, KVM and guest for `vmm`, or None after one SKIPPED line naming what is missing.
pub fn require(vmm: Vmm, test: &str) -> Option<Real> {
    let (var, name) = match vmm {
        Vmm::CloudHypervisor => ("VMCP_TEST_CH_BINARY", "cloud-hypervisor"),
        Vmm::Firecracker => ("VMCP_TEST_FC_BINARY", "firecracker"),
    };
    let mut missing = Vec::new();
    let binary = std::env::var_os(var)
        .map(PathBuf::from)
        .or_else(|| on_path(name));
    match &binary {
        Some(b) if b.is_file() => {}
        Some(b) => missing.push(format!("{var}={} is not a file", b.display())),
        None => missing.push(format!("{name} binary (set {var} or put it on PATH)")),
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        missing.push(format!("a read-write /dev/kvm ({e})"));
    }
    let kernel = std::env::var_os("VMCP_TEST_GUEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/guest/vmcp-test-guest.elf")
        });
    if !kernel.is_file() {
        missing.push(format!(
            "the test guest {} (run `make guest` or set VMCP_TEST_GUEST_KERNEL)",
            kernel.display()
        ));
    }
    if !missing.is_empty() {
        super::skips::skip(test, &format!("missing {}", missing.join(", ")));
        return None;
    }
    Some(Real {
        binary: binary?,
        kernel,
    })
}

/// An error with its whole `source()` chain, for assertions on causes kept
/// as sources (the VMM's log tail, the transport failure).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Sends SIGKILL to `pid` (a VMM this test started, by its recorded pid).
pub fn kill9(pid: u32) {
    let pid = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

/// Checks the report of an operation that replaced a VM's VMM (a respawn):
/// Running, a new process that runs while the old one (by pid and start
/// time) does not, and the handle names the new one. Returns it.
pub fn replaced(
    h: &impl vmcp::ports::VmmHandle,
    rep: vmcp::ports::Reported,
    old: &vmcp::ports::VmmProcess,
) -> vmcp::ports::VmmProcess {
    use vmcp::adapters::outbound::vmm::process::is_alive;
    assert_eq!(rep.state, vmcp::domain::VmState::Running);
    let new = rep.process.expect("the new process is reported");
    assert_ne!(new.pid, old.pid, "a new VMM process");
    assert!(!is_alive(old.pid, old.start_time), "the old one was ended");
    assert!(is_alive(new.pid, new.start_time));
    assert_eq!(h.process(), Some(new.clone()));
    new
}

/// Plays a VMCP restart: lets go of `h` and adopts `p` in `restarted` (a new
/// backend over the same runtime root), which must report it Running with
/// that very process; returns the new handle.
pub async fn restart_and_adopt<H: vmcp::ports::Hypervisor>(
    restarted: &H,
    vm: &vmcp::domain::VmId,
    config: &vmcp::domain::VmConfig,
    h: H::Vm,
    p: &vmcp::ports::VmmProcess,
    events: vmcp::ports::VmmEventSink,
) -> H::Vm {
    use vmcp::ports::VmmHandle;
    drop(h);
    let (adopted, rep) = restarted
        .adopt(vm, config, Some(p.clone()), events)
        .await
        .expect("adopt");
    assert_eq!(rep.state, vmcp::domain::VmState::Running);
    assert_eq!(rep.process.as_ref(), Some(p));
    assert_eq!(adopted.process().as_ref(), Some(p));
    adopted
}

/// `GET /vm/config` on a Firecracker's own socket: what it holds, not what VMCP says.
pub async fn vm_config_of(p: &vmcp::ports::VmmProcess) -> serde_json::Value {
    vmcp::adapters::outbound::firecracker::client::FcClient::new(
        vmcp::adapters::outbound::vmm::UdsClient::new(std::time::Duration::from_secs(5)),
        std::path::PathBuf::from(&p.socket_path),
    )
    .vm_config()
    .await
    .expect("GET /vm/config")
}

/// A shell that started a process in the background and stays until ended.
pub struct Parent(std::process::Child);

impl Parent {
    /// Ends the shell (closing its stdin) and waits for it: its child is orphaned.
    pub fn end(mut self) {
        drop(self.0.stdin.take());
        let status = self.0.wait().expect("wait for the shell");
        assert!(status.success(), "{status}");
    }
}

/// Starts `command` in the background of a shell that then waits for its
/// stdin to close ([`Parent::end`]); returns the shell and the command's pid.
/// Stands in for a VMCP that starts a VMM and later dies.
pub fn parent_of(command: &str) -> (Parent, u32) {
    use std::io::BufRead;
    let mut sh = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{command} >/dev/null 2>&1 & echo $!; read _ || true"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    let mut line = String::new();
    std::io::BufReader::new(sh.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the pid");
    let pid = line.trim().parse().expect("a pid");
    (Parent(sh), pid)
}

/// Runs this test binary again on `test` alone (exact name) with `env`, the
/// way `cargo test` runs it, and returns what it wrote to stdout and stderr,
/// interleaved as a terminal would show it (both go into one pipe).
fn run_self(test: &str, env: &[(&str, &str)]) -> String {
    use std::io::Read;
    let exe = std::env::current_exe().expect("the test binary");
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let mut cmd = std::process::Command::new(exe);
    cmd.args([test, "--exact", "--test-threads=1"])
        .stdout(writer.try_clone().expect("pipe"))
        .stderr(writer);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run the test binary");
    // The command holds the write ends; drop it so the read below ends with the child.
    drop(cmd);
    let mut out = String::new();
    reader.read_to_string(&mut out).expect("read its output");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{test} failed ({status}):\n{out}");
    out
}

#[test]
fn a_skipped_test_is_listed_again_after_the_run_and_a_run_without_skips_lists_nothing() {
    let test = "real_ch_kill_9_is_failed_with_a_reason_within_a_second";
    let out = run_self(
        &format!("real_ch::{test}"),
        &[("VMCP_TEST_CH_BINARY", "/nonexistent/cloud-hypervisor")],
    );
    let result = out
        .find("test result: ok. 1 passed")
        .unwrap_or_else(|| panic!("the test ran and passed:\n{out}"));
    let summary = out
        .find(&format!("1 {SUMMARY_HEADING}"))
        .unwrap_or_else(|| panic!("no skip summary counting one skip:\n{out}"));
    assert!(summary > result, "the summary comes last:\n{out}");
    let listed = format!(
        "\n  SKIPPED: {test}: missing VMCP_TEST_CH_BINARY=/nonexistent/cloud-hypervisor is not a file"
    );
    assert!(
        out[summary..].contains(&listed),
        "the summary names the test and what is missing:\n{out}"
    );

    // A run in which nothing skipped prints no summary.
    let out = run_self(
        "packaging::vmcp_api_version_names_the_version_and_the_revision",
        &[],
    );
    assert!(out.contains("test result: ok. 1 passed"), "{out}");
    assert!(!out.contains(SUMMARY_HEADING), "{out}");
}
