//! An in-memory host network for the application's tests: the same answers
//! as [`super::LinuxNetwork`] for the same situations (a missing bridge is
//! `NoSuchBridge` and leaves no tap, a name held by a foreign interface is
//! `NameTaken`, removing a missing tap is `Ok(false)`), with what it holds
//! open to inspection.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::domain::network::ManagedTap;
use crate::ports::{HostNetwork, NetworkError};

/// One tap the double holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryTap {
    /// Its bridge.
    pub bridge: String,
    /// Queue pairs it was created for.
    pub queue_pairs: u32,
    /// Its owner uid.
    pub owner: Option<u32>,
}

#[derive(Debug, Default)]
struct State {
    bridges: BTreeSet<String>,
    foreign: BTreeSet<String>,
    taps: BTreeMap<String, MemoryTap>,
    created: u64,
}

/// The in-memory host network.
#[derive(Debug, Default)]
pub struct MemoryNetwork {
    state: Mutex<State>,
}

impl MemoryNetwork {
    /// A host with these bridges.
    pub fn with_bridges(bridges: &[&str]) -> Self {
        let net = Self::default();
        {
            let mut s = net.lock();
            s.bridges = bridges.iter().map(|b| (*b).to_owned()).collect();
        }
        net
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; keep the state.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an interface VMCP did not create (a foreign device, or a stale tap).
    pub fn add_foreign(&self, name: &str) {
        self.lock().foreign.insert(name.to_owned());
    }

    /// Adds a tap as if an earlier VMCP had created it.
    pub fn add_tap(&self, name: &str, bridge: &str) {
        self.lock().taps.insert(
            name.to_owned(),
            MemoryTap {
                bridge: bridge.to_owned(),
                queue_pairs: 1,
                owner: None,
            },
        );
    }

    /// Removes a tap behind VMCP's back (as an operator might).
    pub fn vanish(&self, name: &str) {
        self.lock().taps.remove(name);
    }

    /// The taps it holds now.
    pub fn taps(&self) -> BTreeMap<String, MemoryTap> {
        self.lock().taps.clone()
    }

    /// How many taps were created (not re-attached) so far.
    pub fn created(&self) -> u64 {
        self.lock().created
    }
}

impl HostNetwork for MemoryNetwork {
    fn ensure_tap(&self, tap: &ManagedTap, owner: Option<u32>) -> Result<(), NetworkError> {
        let mut s = self.lock();
        if !s.bridges.contains(&tap.bridge) {
            return Err(NetworkError::NoSuchBridge {
                tap: tap.name.clone(),
                bridge: tap.bridge.clone(),
            });
        }
        if s.foreign.contains(&tap.name) {
            return Err(NetworkError::NameTaken {
                tap: tap.name.clone(),
                reason: "an interface of kind veth has this name".to_owned(),
            });
        }
        match s.taps.get_mut(&tap.name) {
            Some(t) if (t.queue_pairs > 1) != (tap.queue_pairs > 1) => {
                Err(NetworkError::NameTaken {
                    tap: tap.name.clone(),
                    reason: "its multi-queue flag differs from what the VMM needs".to_owned(),
                })
            }
            Some(t) => {
                t.bridge.clone_from(&tap.bridge);
                Ok(())
            }
            None => {
                s.created += 1;
                s.taps.insert(
                    tap.name.clone(),
                    MemoryTap {
                        bridge: tap.bridge.clone(),
                        queue_pairs: tap.queue_pairs,
                        owner,
                    },
                );
                Ok(())
            }
        }
    }

    fn remove_tap(&self, name: &str) -> Result<bool, NetworkError> {
        Ok(self.lock().taps.remove(name).is_some())
    }

    fn list_taps(&self, prefix: &str) -> Result<Vec<String>, NetworkError> {
        let s = self.lock();
        Ok(s.taps
            .keys()
            .chain(s.foreign.iter())
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn controller_of(&self, name: &str) -> Result<Option<String>, NetworkError> {
        Ok(self.lock().taps.get(name).map(|t| t.bridge.clone()))
    }
}
