//! VMCP, the VMM Control Plane.

/// Generated vmm.v1 protobuf messages and ConnectRPC service stubs.
#[allow(
    clippy::all,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub
)]
pub mod proto {
    connectrpc::include_generated!();
}

pub mod adapters;
pub mod app;
pub mod domain;
pub mod ports;

/// Skips of the unit tests, listed again when the test binary exits (the
/// integration tests' mechanism, one file for both).
#[cfg(test)]
#[path = "../tests/it/skips.rs"]
pub(crate) mod test_skips;
