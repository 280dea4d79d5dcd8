//! The host network adapter: VMCP's managed taps on Linux. The tap is made
//! through `/dev/net/tun` ([`tun`]), everything else over rtnetlink
//! ([`netlink`]); nothing shells out to `ip`. [`memory`] is the in-memory
//! double the application's tests run against.

pub mod memory;
pub mod netlink;
pub mod tun;

use std::io;

use crate::domain::network::ManagedTap;
use crate::ports::{HostNetwork, NetworkError};

/// The Linux host network, in the network namespace of the calling thread
/// (each call opens its own sockets).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxNetwork;

fn classify(tap: &str, op: &'static str, source: io::Error) -> NetworkError {
    match source.raw_os_error() {
        Some(libc::EPERM | libc::EACCES) => NetworkError::Permission {
            tap: tap.to_owned(),
            op,
            source,
        },
        _ => NetworkError::Io {
            tap: tap.to_owned(),
            op,
            source,
        },
    }
}

impl LinuxNetwork {
    fn bridge_index(tap: &ManagedTap) -> Result<u32, NetworkError> {
        let no_bridge = || NetworkError::NoSuchBridge {
            tap: tap.name.clone(),
            bridge: tap.bridge.clone(),
        };
        let link = netlink::link_by_name(&tap.bridge)
            .map_err(|e| classify(&tap.name, "look up its bridge", e))?
            .ok_or_else(no_bridge)?;
        if link.kind.as_deref() != Some("bridge") {
            return Err(no_bridge());
        }
        Ok(link.index)
    }
}

impl HostNetwork for LinuxNetwork {
    fn ensure_tap(&self, tap: &ManagedTap, owner: Option<u32>) -> Result<(), NetworkError> {
        let name = tap.name.as_str();
        // The bridge first: a missing bridge leaves no tap behind.
        let bridge = Self::bridge_index(tap)?;
        let multi_queue = tap.queue_pairs > 1;
        let link = match netlink::link_by_name(name).map_err(|e| classify(name, "look up", e))? {
            Some(link) => {
                match link.tap_multi_queue {
                    Some((true, mq)) if mq == multi_queue => {}
                    Some((true, mq)) => {
                        return Err(NetworkError::NameTaken {
                            tap: name.to_owned(),
                            reason: format!(
                                "it is a {} tap and the VMM needs a {} one",
                                if mq { "multi-queue" } else { "single-queue" },
                                if multi_queue {
                                    "multi-queue"
                                } else {
                                    "single-queue"
                                },
                            ),
                        });
                    }
                    _ => {
                        return Err(NetworkError::NameTaken {
                            tap: name.to_owned(),
                            reason: format!(
                                "an interface of kind {} has this name",
                                link.kind.as_deref().unwrap_or("unknown")
                            ),
                        });
                    }
                }
                link
            }
            None => {
                tun::create_tap(name, multi_queue, owner).map_err(|e| match e.raw_os_error() {
                    Some(libc::EBUSY | libc::EEXIST) => NetworkError::NameTaken {
                        tap: name.to_owned(),
                        reason: "another device took the name meanwhile".to_owned(),
                    },
                    _ => classify(name, "create it through /dev/net/tun", e),
                })?;
                netlink::link_by_name(name)
                    .map_err(|e| classify(name, "look up", e))?
                    .ok_or_else(|| NetworkError::Io {
                        tap: name.to_owned(),
                        op: "find it after creating it",
                        source: io::Error::from(io::ErrorKind::NotFound),
                    })?
            }
        };
        if link.controller == Some(bridge) && link.up {
            return Ok(());
        }
        netlink::set_up(link.index, Some(bridge))
            .map_err(|e| classify(name, "attach it to its bridge and set it up", e))
    }

    fn remove_tap(&self, name: &str) -> Result<bool, NetworkError> {
        let Some(link) = netlink::link_by_name(name).map_err(|e| classify(name, "look up", e))?
        else {
            return Ok(false);
        };
        match netlink::delete(link.index) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(classify(name, "delete", e)),
        }
    }

    fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetworkError> {
        Ok(netlink::tun_links()
            .map_err(|e| classify(prefix, "list the host's taps", e))?
            .into_iter()
            .filter(|l| l.name.starts_with(prefix))
            .map(|l| l.name)
            .collect())
    }

    fn controller_of(&self, name: &str) -> Result<Option<String>, NetworkError> {
        let Some(link) = netlink::link_by_name(name).map_err(|e| classify(name, "look up", e))?
        else {
            return Ok(None);
        };
        let Some(c) = link.controller else {
            return Ok(None);
        };
        Ok(netlink::link_by_index(c)
            .map_err(|e| classify(name, "look up its bridge", e))?
            .map(|l| l.name))
    }
}

#[cfg(test)]
mod tests;
