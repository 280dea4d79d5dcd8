//! What the lifecycle core knows of a VM: the state the VMM reported
//! ([`VmState`]), what the caller asked for ([`Desired`]), kept apart, and the
//! read-only [`VmSnapshot`] handed to readers and stored.

use std::fmt;

use crate::domain::config::VmConfig;
use crate::domain::id::VmId;

/// A VM's lifecycle state as the VMM reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Configured, not booted (or stopped and bootable again, on Cloud Hypervisor).
    Created,
    /// The guest runs.
    Running,
    /// The guest's vCPUs are paused.
    Paused,
    /// The guest has stopped; it can be booted again.
    Shutdown,
    /// The VMM died or an operation left the VM unusable; only delete is allowed.
    Failed,
}

impl VmState {
    /// All states, for exhaustive iteration in metrics and tests.
    pub const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Failed,
    ];

    /// The position of this state in [`VmState::ALL`].
    pub fn index(self) -> usize {
        match self {
            VmState::Created => 0,
            VmState::Running => 1,
            VmState::Paused => 2,
            VmState::Shutdown => 3,
            VmState::Failed => 4,
        }
    }

    /// The lower-case name used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
            VmState::Failed => "failed",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Created => "Created",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Shutdown => "Shutdown",
            VmState::Failed => "Failed",
        })
    }
}

/// What the caller wants the VM to be; kept apart from what the VMM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// Configured, not started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Stopped.
    Stopped,
    /// Removed.
    Deleted,
}

/// A read-only copy of a VM's state, handed to readers.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSnapshot {
    /// Id.
    pub id: VmId,
    /// Validated config as the caller gave it.
    pub config: VmConfig,
    /// Observed state.
    pub state: VmState,
    /// Why the VM is in this state (may be empty).
    pub reason: String,
    /// Bumped on every visible change.
    pub generation: u64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last visible change, Unix seconds.
    pub modified_at: i64,
    /// What the caller last asked for.
    pub desired: Desired,
    /// Whether a delete has completed (the VM is gone).
    pub deleted: bool,
    /// The host-wide revision of the last recorded change of this VM (0
    /// before its first). The application assigns it when it records a
    /// change; the core carries it and never changes it.
    pub revision: u64,
}
