//! The outbound port to the host's network: the taps VMCP creates for
//! managed interfaces (see `domain::network` for their names). Calls block
//! on the kernel (ioctls, netlink round trips): callers run them off the
//! async workers. Every error names the interface and the cause.

use crate::domain::network::ManagedTap;

/// Why a host network operation failed.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The bridge the tap should join does not exist (or is no bridge).
    #[error("tap {tap}: no such bridge {bridge:?} on this host")]
    NoSuchBridge {
        /// The tap.
        tap: String,
        /// The bridge it should have joined.
        bridge: String,
    },
    /// VMCP may not do this (not root / no CAP_NET_ADMIN, no /dev/net/tun access).
    #[error("tap {tap}: permission denied to {op}: {source}")]
    Permission {
        /// The interface.
        tap: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The name is taken by an interface that is not a tap of this shape
    /// (another kind of device, or a tap with other queue flags).
    #[error("tap {tap}: the name is taken: {reason}")]
    NameTaken {
        /// The interface.
        tap: String,
        /// What holds it.
        reason: String,
    },
    /// Anything else the kernel refused.
    #[error("tap {tap}: cannot {op}: {source}")]
    Io {
        /// The interface.
        tap: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The host's taps, as VMCP manages them. MUST be safe to call from
/// several threads at once for different taps.
pub trait HostNetwork: Send + Sync + std::fmt::Debug + 'static {
    /// Makes `tap` exist, persistent, usable by `owner` (a uid, when the
    /// VMM runs as another user), joined to its bridge and up. Idempotent:
    /// an existing tap of this name is re-attached and set up, not
    /// recreated, so a running VMM keeps its queues. MUST return
    /// `NoSuchBridge` when the bridge is missing (and then leave no tap
    /// behind that this call created), `NameTaken` when the name is held by
    /// something else, `Permission` when the kernel says EPERM/EACCES.
    fn ensure_tap(&self, tap: &ManagedTap, owner: Option<u32>) -> Result<(), NetworkError>;

    /// Removes the tap `name`. Returns false when it did not exist (not an error).
    fn remove_tap(&self, name: &str) -> Result<bool, NetworkError>;

    /// The names of the host's taps (tun/tap devices, nothing else) that start with `prefix`.
    fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetworkError>;

    /// The bridge `name` is attached to, if any (None when it does not exist).
    fn controller_of(&self, name: &str) -> Result<Option<String>, NetworkError>;
}
