//! Generates the vmm.v1 message types and service stubs from proto/ with
//! protox (pure Rust, so no system protoc is needed) and connectrpc-build,
//! and records the git revision the binaries are built from
//! (`VMCP_GIT_REVISION`, printed by `--version`).

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let files = ["proto/vmm/v1/vm.proto"];
    let fds = protox::Compiler::new(["proto"])
        .expect("proto include dir exists")
        .include_source_info(true)
        .include_imports(true)
        .open_files(files)
        .unwrap_or_else(|e| panic!("proto/vmm/v1/vm.proto does not compile: {e}"))
        .file_descriptor_set();
    let fds_path = out_dir.join("vmm_v1.fds");
    std::fs::write(&fds_path, fds.encode_to_vec()).expect("write descriptor set");
    connectrpc_build::Config::new()
        .files(&["vmm/v1/vm.proto"])
        .includes(&["proto"])
        .descriptor_set(&fds_path)
        .include_file("_connectrpc.rs")
        .compile()
        .expect("connectrpc code generation");
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rustc-env=VMCP_GIT_REVISION={}", git_revision());
    pack_relative_relocations();
}

/// Links the binaries with packed relative relocations (DT_RELR, read by
/// glibc 2.36 and later; GNU ld 2.38+ and lld write them). A position-
/// independent Rust binary needs one relocation per pointer in its static
/// data (vtables, string slices): vmcp-api's `.rela.dyn` is 532 KiB of 24-byte
/// entries that the dynamic linker reads at every start, so they stayed
/// resident, 4 % of an idle vmcp-api's RSS. Packed, they take a few KiB.
/// The binary stays position-independent (ASLR and full RELRO as before).
fn pack_relative_relocations() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The commit being built: `VMCP_GIT_REVISION` when the packager sets it,
/// else `git rev-parse`, else "unknown" (a source tarball has no .git).
fn git_revision() -> String {
    println!("cargo:rerun-if-env-changed=VMCP_GIT_REVISION");
    if let Ok(rev) = std::env::var("VMCP_GIT_REVISION")
        && !rev.trim().is_empty()
    {
        return rev.trim().to_owned();
    }
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Run again when HEAD moves: HEAD itself (checkout), the branch it names
    // (commit), packed refs. Only files that exist: a missing one would make
    // cargo run this script on every build.
    let mut watched: Vec<PathBuf> = Vec::new();
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        watched.push(Path::new(&dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        watched.push(Path::new(&common).join("packed-refs"));
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(Path::new(&common).join(branch));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    rev
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}
