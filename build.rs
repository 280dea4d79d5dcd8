//! Generates the vmm.v1 message types and service stubs from proto/ with
//! protox (pure Rust, so no system protoc is needed) and connectrpc-build.

use std::path::PathBuf;

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
}
