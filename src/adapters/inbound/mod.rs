//! Inbound adapters: the ConnectRPC API server and the health endpoints.
pub mod rpc_layer;
