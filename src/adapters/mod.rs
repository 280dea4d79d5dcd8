//! Adapters: the ConnectRPC server and health endpoints (inbound), the VMM
//! backends, the store and telemetry (outbound), and the Unix stream the
//! API socket's connections use ([`quiet_unix`]).

pub mod inbound;
pub mod outbound;
pub mod quiet_unix;
