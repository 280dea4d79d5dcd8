//! The bodies of the fuzz targets, one module per target. They are plain
//! functions over bytes so that two things run them: the cargo-fuzz
//! targets in `fuzz_targets/` (nightly, libFuzzer), and the stable test
//! `fuzz_seeds` of the main crate's integration binary, which includes
//! these files and replays every seed in `fuzz/seeds/<target>/` through
//! them, so a target that no longer compiles or whose seeds no longer reach
//! the parsers fails `cargo test`.

pub mod create_request;
pub mod vmm_responses;
