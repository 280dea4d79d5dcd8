//! The pure core of VMCP: validated VM configuration, the VM lifecycle state
//! machine and the error vocabulary. Nothing here performs I/O, reads a
//! clock or spawns tasks; callers feed inputs in and drain outputs as values.

// Matches over states and commands name every case, so a new variant is a
// compile error wherever it needs a decision (no `_ =>` over an enum).
#![deny(clippy::wildcard_enum_match_arm)]
// No clock and no environment: time and settings come in as arguments
// (clippy.toml lists the methods; the lint is allowed outside the domain).
#![deny(clippy::disallowed_methods)]

pub mod config;
pub mod error;
pub mod id;
pub mod lifecycle;
pub mod network;
pub mod recovery;
pub mod restart;
pub mod snapshot;

pub use config::{
    BootConfig, ConsoleConfig, CpuConfig, CpuTopology, GuestAddress, MemoryConfig,
    NetworkInterface, StorageDevice, VmConfig, VmConfigError, VmSize,
};
pub use error::VmError;
pub use id::{VmId, VmIdError};
pub use lifecycle::{
    Admission, Command, DEFAULT_SAMPLE_PERIOD, DEFAULT_SHUTDOWN_GRACE, Desired, Effect,
    Observation, Operation, Vm, VmEvent, VmSnapshot, VmState,
};
