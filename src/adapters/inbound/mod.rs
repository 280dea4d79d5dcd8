//! Inbound adapters: the ConnectRPC API server and the health endpoints.

pub mod convert;
pub mod errors;
pub mod health;
pub mod rpc;
pub mod rpc_layer;
pub mod server;
