//! The Firecracker backend: one supervised `firecracker` process per microVM.

pub mod config;
