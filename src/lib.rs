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
