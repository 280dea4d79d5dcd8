//! Adapters: the ConnectRPC server and health endpoints (inbound), the VMM
//! backends, the store and telemetry (outbound).

pub mod inbound;
pub mod outbound;
