//! What the real-VMM tests need and one place that decides whether they can
//! run: the VMM binary (an environment variable or PATH), a read-write
//! /dev/kvm and the tiny test guest (`make guest`). When anything is missing
//! the test prints one `SKIPPED: <test>: missing …` line and returns.

use std::io::Write;
use std::path::{Path, PathBuf};

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
        say(&format!("SKIPPED: {test}: missing {}", missing.join(", ")));
        return None;
    }
    Some(Real {
        binary: binary?,
        kernel,
    })
}
