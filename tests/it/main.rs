//! The integration-test binary: starts the real server on an ephemeral port
//! and talks to it with connectrpc's own client over every protocol, plus raw
//! HTTP for the wire-level cases. Backends are the in-tree test double, fake
//! VMMs over Unix sockets, and the real VMMs where they are installed.

// Tests may unwrap: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod admission;
mod api;
mod api_socket;
mod auth;
mod chaos;
mod cloud_hypervisor;
mod connections;
mod console;
mod crash;
mod diff_snapshots;
mod double;
mod fake_ch;
mod fake_fc;
mod firecracker;
mod firecracker_diff;
mod fuzz_seeds;
mod harness;
mod network;
mod otel;
mod ownership;
mod packaging;
mod real_api;
mod real_ch;
mod real_env;
mod real_fc;
mod real_net;
mod reflink;
mod restart;
mod robustness;
mod skips;
mod snapshots;
mod tls_client;
mod vmcpctl;
mod watch;
