//! The Firecracker backend: one supervised `firecracker` process per microVM.

pub mod config;
pub mod jailer;
pub mod metrics;
