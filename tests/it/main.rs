//! The integration-test binary: starts the real server on an ephemeral port
//! and talks to it with connectrpc's own client over every protocol, plus raw
//! HTTP for the wire-level cases. Backends are the in-tree test double, fake
//! VMMs over Unix sockets, and the real VMMs where they are installed.

mod admission;
mod api;
mod auth;
mod double;
mod harness;
mod robustness;
mod tls_client;
