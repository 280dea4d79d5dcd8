//! One `vms` row: a [`VmRecord`] encoded into columns (the config as strict
//! JSON, see `config_json`) and decoded back. Decoding is strict: a row that
//! does not decode to a valid record is reported as corrupt, naming it.

use std::path::Path;

use super::config_json;
use crate::domain::lifecycle::Desired;
use crate::domain::snapshot::{DiffParent, SnapshotId};
use crate::domain::{VmId, VmSnapshot, VmState};
use crate::ports::{StoreError, VmRecord, VmmProcess};

/// One `vms` row, as bound and read.
pub(super) struct Row {
    pub(super) id: String,
    pub(super) config: String,
    pub(super) desired: String,
    pub(super) state: String,
    pub(super) reason: String,
    pub(super) generation: i64,
    pub(super) created_at: i64,
    pub(super) modified_at: i64,
    pub(super) vmm_pid: Option<i64>,
    pub(super) vmm_start_time: Option<i64>,
    pub(super) socket_path: Option<String>,
    pub(super) revision: i64,
    pub(super) diff_parent: Option<String>,
    pub(super) diff_vmm_pid: Option<i64>,
    pub(super) diff_vmm_start_time: Option<i64>,
}

impl Row {
    pub(super) fn encode(record: &VmRecord) -> Result<Self, StoreError> {
        let VmSnapshot {
            id,
            config,
            state,
            reason,
            generation,
            created_at,
            modified_at,
            desired,
            // Deleted snapshots never reach here (see `put`).
            deleted: _,
            revision,
        } = &record.snapshot;
        let unstorable = |what: &str| {
            StoreError::Unavailable(format!("cannot store VM {id}: {what} does not fit"))
        };
        let config = config_json::encode(config)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode VM {id}'s config: {e}")))?;
        let (vmm_pid, vmm_start_time, socket_path) = match &record.process {
            Some(VmmProcess {
                pid,
                start_time,
                socket_path,
            }) => (
                Some(i64::from(*pid)),
                Some(i64::try_from(*start_time).map_err(|_| unstorable("process start time"))?),
                Some(socket_path.clone()),
            ),
            None => (None, None, None),
        };
        let (diff_parent, diff_vmm_pid, diff_vmm_start_time) = match &record.diff_parent {
            Some(DiffParent {
                snapshot_id,
                vmm_pid,
                vmm_start_time,
            }) => (
                Some(snapshot_id.to_string()),
                Some(i64::from(*vmm_pid)),
                Some(
                    i64::try_from(*vmm_start_time)
                        .map_err(|_| unstorable("diff parent's VMM start time"))?,
                ),
            ),
            None => (None, None, None),
        };
        Ok(Self {
            id: id.as_str().to_owned(),
            config,
            desired: desired_name(*desired).to_owned(),
            state: state_name(*state).to_owned(),
            reason: reason.clone(),
            generation: i64::try_from(*generation).map_err(|_| unstorable("generation"))?,
            created_at: *created_at,
            modified_at: *modified_at,
            vmm_pid,
            vmm_start_time,
            socket_path,
            revision: i64::try_from(*revision).map_err(|_| unstorable("revision"))?,
            diff_parent,
            diff_vmm_pid,
            diff_vmm_start_time,
        })
    }

    pub(super) fn read(r: &rusqlite::Row<'_>, path: &Path) -> Result<Self, StoreError> {
        let id: String = r.get(0).map_err(|e| {
            StoreError::Corrupt(format!(
                "{}: a record's id is unreadable: {e}",
                path.display()
            ))
        })?;
        let bad = |e: rusqlite::Error| {
            StoreError::Corrupt(format!("{}: record {id:?}: {e}", path.display()))
        };
        Ok(Self {
            config: r.get(1).map_err(bad)?,
            desired: r.get(2).map_err(bad)?,
            state: r.get(3).map_err(bad)?,
            reason: r.get(4).map_err(bad)?,
            generation: r.get(5).map_err(bad)?,
            created_at: r.get(6).map_err(bad)?,
            modified_at: r.get(7).map_err(bad)?,
            vmm_pid: r.get(8).map_err(bad)?,
            vmm_start_time: r.get(9).map_err(bad)?,
            socket_path: r.get(10).map_err(bad)?,
            revision: r.get(11).map_err(bad)?,
            diff_parent: r.get(12).map_err(bad)?,
            diff_vmm_pid: r.get(13).map_err(bad)?,
            diff_vmm_start_time: r.get(14).map_err(bad)?,
            id,
        })
    }

    pub(super) fn decode(self, path: &Path) -> Result<VmRecord, StoreError> {
        let Self {
            id,
            config,
            desired,
            state,
            reason,
            generation,
            created_at,
            modified_at,
            vmm_pid,
            vmm_start_time,
            socket_path,
            revision,
            diff_parent,
            diff_vmm_pid,
            diff_vmm_start_time,
        } = self;
        let bad = |what: String| {
            StoreError::Corrupt(format!("{}: record {id:?}: {what}", path.display()))
        };
        let vm_id = VmId::parse(&id).map_err(|e| bad(format!("invalid id: {e}")))?;
        let config =
            config_json::decode(&config).map_err(|e| bad(format!("undecodable config: {e}")))?;
        let desired = parse_desired(&desired)
            .ok_or_else(|| bad(format!("unknown desired state {desired:?}")))?;
        let state = parse_state(&state).ok_or_else(|| bad(format!("unknown state {state:?}")))?;
        let generation = u64::try_from(generation)
            .map_err(|_| bad(format!("negative generation {generation}")))?;
        let revision =
            u64::try_from(revision).map_err(|_| bad(format!("negative revision {revision}")))?;
        let process = match (vmm_pid, vmm_start_time, socket_path) {
            (None, None, None) => None,
            (Some(pid), Some(start_time), Some(socket_path)) => Some(VmmProcess {
                pid: u32::try_from(pid).map_err(|_| bad(format!("invalid VMM pid {pid}")))?,
                start_time: u64::try_from(start_time)
                    .map_err(|_| bad(format!("invalid VMM start time {start_time}")))?,
                socket_path,
            }),
            _ => return Err(bad("partial VMM process identity".to_owned())),
        };
        let diff_parent = match (diff_parent, diff_vmm_pid, diff_vmm_start_time) {
            (None, None, None) => None,
            (Some(snapshot), Some(pid), Some(start_time)) => Some(DiffParent {
                snapshot_id: SnapshotId::parse("diff_parent", &snapshot)
                    .map_err(|e| bad(format!("invalid diff parent: {e}")))?,
                vmm_pid: u32::try_from(pid)
                    .map_err(|_| bad(format!("invalid diff parent VMM pid {pid}")))?,
                vmm_start_time: u64::try_from(start_time)
                    .map_err(|_| bad(format!("invalid diff parent VMM start time {start_time}")))?,
            }),
            _ => return Err(bad("partial diff parent".to_owned())),
        };
        Ok(VmRecord {
            snapshot: VmSnapshot {
                id: vm_id,
                config,
                state,
                reason,
                generation,
                created_at,
                modified_at,
                desired,
                deleted: false,
                revision,
            },
            process,
            diff_parent,
        })
    }
}

// Stored names are the adapter's own, not `VmState::as_str` (metrics labels),
// so renaming a label can never make old records unreadable.
fn state_name(s: VmState) -> &'static str {
    match s {
        VmState::Created => "created",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Shutdown => "shutdown",
        VmState::Failed => "failed",
    }
}

fn parse_state(s: &str) -> Option<VmState> {
    VmState::ALL.into_iter().find(|&v| state_name(v) == s)
}

pub(super) const ALL_DESIRED: [Desired; 5] = [
    Desired::Created,
    Desired::Running,
    Desired::Paused,
    Desired::Stopped,
    Desired::Deleted,
];

fn desired_name(d: Desired) -> &'static str {
    match d {
        Desired::Created => "created",
        Desired::Running => "running",
        Desired::Paused => "paused",
        Desired::Stopped => "stopped",
        Desired::Deleted => "deleted",
    }
}

fn parse_desired(s: &str) -> Option<Desired> {
    ALL_DESIRED.into_iter().find(|&d| desired_name(d) == s)
}
