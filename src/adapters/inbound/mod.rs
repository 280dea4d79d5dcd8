//! Inbound adapters: the ConnectRPC API server, the health endpoints, and the
//! API's protection (authentication, TLS, load limits).

pub mod auth;
pub mod connections;
pub mod convert;
pub mod encoded;
pub mod errors;
pub mod guard;
pub mod health;
pub mod intake;
pub mod reject;
pub mod rpc;
pub mod rpc_layer;
pub mod server;
pub mod tls;
