//! Managed networking, performed: the host-network calls the owner and
//! recovery make for VMs whose interfaces name a bridge. The calls block on
//! the kernel, so each runs on the blocking pool; every refusal becomes a
//! `VmError` that names the interface's field, the tap and the cause.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::domain::network::{self, ManagedTap, TAP_PREFIX};
use crate::domain::{VmConfig, VmError, VmId};
use crate::ports::{BackendKind, HostNetwork, NetworkError};

/// What the app needs to manage taps.
#[derive(Debug, Clone)]
pub struct Networking {
    /// The host's network.
    pub host: Arc<dyn HostNetwork>,
    /// Bridge for interfaces that name neither a tap nor a bridge; empty for none.
    pub default_bridge: String,
    /// The uid the VMMs run as, when not VMCP's own (Firecracker's jailer).
    pub vmm_uid: Option<u32>,
}

/// Whether `kind` opens one queue pair per vCPU on a managed tap: Cloud
/// Hypervisor does (its mapping sets `num_queues` to match); Firecracker
/// opens one queue pair only.
pub fn multi_queue(kind: BackendKind) -> bool {
    match kind {
        BackendKind::CloudHypervisor => true,
        BackendKind::Firecracker => false,
    }
}

fn field_of(config: &VmConfig, tap: &str) -> String {
    config
        .network
        .iter()
        .position(|n| n.tap_device == tap)
        .map_or_else(
            || "config.network".to_owned(),
            |i| format!("config.network[{i}]"),
        )
}

/// The `VmError` for a refusal of the host network about `config`'s tap.
fn to_vm_error(config: &VmConfig, e: NetworkError) -> VmError {
    match &e {
        NetworkError::NoSuchBridge { tap, .. } => {
            VmError::Incompatible(format!("{}.bridge: {e}", field_of(config, tap)))
        }
        NetworkError::NameTaken { tap, .. } => {
            VmError::Incompatible(format!("{}.tap_device: {e}", field_of(config, tap)))
        }
        NetworkError::Permission { .. } | NetworkError::Io { .. } => {
            VmError::Unavailable(format!("host network: {e}"))
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NetworkError> + Send + 'static,
) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(NetworkError::Io {
            tap: String::new(),
            op: "run a host network call",
            source: std::io::Error::other(e.to_string()),
        })
    })
}

/// Makes every managed tap of `config` exist, joined and up, before its
/// VMM starts. On a refusal the taps this call made are removed again.
pub async fn ensure(net: &Networking, config: &VmConfig, kind: BackendKind) -> Result<(), VmError> {
    ensure_taps(net, config, kind, false).await
}

/// Recreates the managed taps of `config` that are gone (before a boot or
/// reboot starts a VMM again, and at start-up). Taps that exist are left
/// as they are: their queue flags were chosen when they were made, and a
/// VMM that kept its config (Cloud Hypervisor after `vm.shutdown`) opens
/// them as it did then, even if the VM was resized since.
pub async fn ensure_missing(
    net: &Networking,
    config: &VmConfig,
    kind: BackendKind,
) -> Result<(), VmError> {
    ensure_taps(net, config, kind, true).await
}

async fn ensure_taps(
    net: &Networking,
    config: &VmConfig,
    kind: BackendKind,
    only_missing: bool,
) -> Result<(), VmError> {
    let taps = network::managed_taps(config, multi_queue(kind));
    let mut done: Vec<ManagedTap> = Vec::new();
    for tap in taps {
        let host = Arc::clone(&net.host);
        let owner = net.vmm_uid;
        let t = tap.clone();
        let existed = {
            let host = Arc::clone(&net.host);
            let name = tap.name.clone();
            blocking(move || host.list_taps(&name).map(|l| l.contains(&name))).await
        };
        if only_missing && matches!(existed, Ok(true)) {
            continue;
        }
        match blocking(move || host.ensure_tap(&t, owner)).await {
            Ok(()) => {
                if !matches!(existed, Ok(true)) {
                    done.push(tap);
                }
            }
            Err(e) => {
                let err = to_vm_error(config, e);
                for made in done {
                    remove(net, &made.name).await;
                }
                return Err(err);
            }
        }
    }
    Ok(())
}

async fn remove(net: &Networking, name: &str) -> bool {
    let host = Arc::clone(&net.host);
    let n = name.to_owned();
    match blocking(move || host.remove_tap(&n)).await {
        Ok(removed) => removed,
        Err(e) => {
            tracing::error!(tap = name, error = %e, "cannot remove a managed tap; the next start removes it");
            false
        }
    }
}

/// Removes every managed tap of `config` (the VM is deleted, or its create
/// failed). A tap that cannot be removed is logged and left to the sweep.
pub async fn release(net: &Networking, config: &VmConfig) {
    for tap in network::managed_taps(config, false) {
        remove(net, &tap.name).await;
    }
}

/// What the start-up sweep found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Taps with VMCP's prefix that belong to no VM (removed unless only reported).
    pub orphans: usize,
    /// Taps of VMs that had vanished while VMCP was down, recreated.
    pub recreated: usize,
    /// Taps of VMs that had vanished and could not be recreated.
    pub missing: usize,
}

/// At start-up, once the VMs are known: recreates the managed taps of
/// `vms` that vanished while VMCP was down, and removes (or, with
/// `remove_orphans` false, reports) the taps under VMCP's prefix that
/// belong to none of them.
pub async fn sweep(
    net: &Networking,
    vms: &[(VmId, VmConfig)],
    kind: BackendKind,
    remove_orphans: bool,
) -> Result<Swept, VmError> {
    let host = Arc::clone(&net.host);
    let present: BTreeSet<String> = blocking(move || host.list_taps(TAP_PREFIX))
        .await
        .map_err(|e| VmError::Unavailable(format!("cannot list the host's taps: {e}")))?
        .into_iter()
        .collect();
    let mut swept = Swept::default();
    let mut known = BTreeSet::new();
    for (id, config) in vms {
        let taps = network::managed_taps(config, multi_queue(kind));
        let vanished = taps.iter().any(|t| !present.contains(&t.name));
        known.extend(taps.iter().map(|t| t.name.clone()));
        if !vanished {
            continue;
        }
        match ensure_missing(net, config, kind).await {
            Ok(()) => {
                tracing::warn!(vm.id = %id, "the VM's tap vanished while VMCP was down; recreated it");
                swept.recreated += 1;
            }
            Err(e) => {
                tracing::error!(vm.id = %id, error = %e, "the VM's tap vanished while VMCP was down and cannot be recreated; its next boot fails until it can");
                swept.missing += 1;
            }
        }
    }
    for name in present
        .iter()
        .filter(|n| network::is_managed_tap(n) && !known.contains(*n))
    {
        swept.orphans += 1;
        if remove_orphans {
            tracing::warn!(tap = %name, "tap belongs to no VM: removing it");
            remove(net, name).await;
        } else {
            tracing::warn!(tap = %name, "tap belongs to no VM (left in place: UNKEY_VMCP_ORPHANS=report)");
        }
    }
    Ok(swept)
}
