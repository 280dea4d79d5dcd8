//! The application: configuration, the VM manager with one owner task per
//! VM, and the wiring that starts the server and shuts it down gracefully.

pub mod admission;
pub mod config;
pub mod descriptors;
pub mod feed;
pub mod manager;
pub mod network;
pub mod owner;
pub mod path_policy;
pub mod run;
pub mod security;
pub mod wiring;

#[cfg(test)]
mod tests;
