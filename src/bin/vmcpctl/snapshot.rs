//! `snapshot create|list|get|delete` and `restore`: the snapshot RPCs.

use clap::{Args, Subcommand, ValueEnum};
use vmcp::proto::vmm::v1 as pb;

use crate::connect::Client;
use crate::error::CtlError;
use crate::output::{self, Printer};
use crate::parse;

/// `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// The snapshot subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a running or paused VM (SnapshotVm); a running one is paused for it.
    Create(CreateSnapshotArgs),
    /// List snapshots, ordered by id (ListSnapshots).
    List(ListSnapshotsArgs),
    /// Show one snapshot (GetSnapshot).
    Get(SnapshotIdArg),
    /// Delete a snapshot and its files (DeleteSnapshot).
    Delete(SnapshotIdArg),
}

/// `snapshot create`.
#[derive(Debug, Args)]
pub struct CreateSnapshotArgs {
    /// The VM to snapshot.
    pub vm_id: String,
    /// The snapshot's id (generated when omitted).
    #[arg(long = "id", value_name = "SNAPSHOT_ID")]
    pub snapshot_id: Option<String>,
    /// Leave the VM paused afterwards (by default it runs again).
    #[arg(long)]
    pub paused: bool,
    /// full: the whole memory; diff: only the pages written since the VM's previous
    /// snapshot (Firecracker, a VM created with dirty-page tracking).
    #[arg(long, value_enum, default_value = "full")]
    pub kind: Kind,
}

/// `snapshot create --kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The whole guest memory.
    Full,
    /// Only the pages changed since the VM's previous snapshot.
    Diff,
}

/// `snapshot list`.
#[derive(Debug, Args)]
pub struct ListSnapshotsArgs {
    /// Only snapshots of this VM.
    #[arg(long = "vm", value_name = "VM_ID")]
    pub source_vm_id: Option<String>,
}

/// A snapshot id.
#[derive(Debug, Args)]
pub struct SnapshotIdArg {
    /// The snapshot's id.
    pub snapshot_id: String,
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The new VM's id (must not exist).
    pub vm_id: String,
    /// The snapshot to restore.
    #[arg(long = "from", value_name = "SNAPSHOT_ID")]
    pub snapshot_id: String,
    /// Leave the restored VM paused (by default it runs).
    #[arg(long)]
    pub paused: bool,
    /// Put interface IFACE on host tap TAP instead of the snapshot's (repeatable).
    #[arg(long = "tap", value_name = "IFACE=TAP", value_parser = parse::key_value)]
    pub taps: Vec<(String, String)>,
    /// The new VM's metadata, KEY=VALUE (repeatable; the snapshot's when none).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse::key_value)]
    pub metadata: Vec<(String, String)>,
}

/// Sends a snapshot subcommand's call and prints the answer.
pub async fn run(
    client: &Client,
    printer: Printer,
    command: SnapshotCommand,
) -> Result<(), CtlError> {
    match command {
        SnapshotCommand::Create(args) => {
            let req = pb::SnapshotVmRequest {
                vm_id: args.vm_id,
                snapshot_id: args.snapshot_id.unwrap_or_default(),
                resume: !args.paused,
                kind: match args.kind {
                    Kind::Full => pb::SnapshotKind::SNAPSHOT_KIND_FULL,
                    Kind::Diff => pb::SnapshotKind::SNAPSHOT_KIND_DIFF,
                }
                .into(),
                ..Default::default()
            };
            let resp = client.snapshot_vm(req).await?.into_owned();
            let rows: Vec<_> = resp.snapshot.as_option().into_iter().collect();
            printer.document(&resp, || snapshots_text(&rows, output::now()))
        }
        SnapshotCommand::List(args) => {
            let req = pb::ListSnapshotsRequest {
                source_vm_id: args.source_vm_id.unwrap_or_default(),
                ..Default::default()
            };
            let resp = client.list_snapshots(req).await?.into_owned();
            let rows: Vec<_> = resp.snapshots.iter().collect();
            printer.document(&resp, || snapshots_text(&rows, output::now()))
        }
        SnapshotCommand::Get(arg) => {
            let req = pb::GetSnapshotRequest {
                snapshot_id: arg.snapshot_id,
                ..Default::default()
            };
            let resp = client.get_snapshot(req).await?.into_owned();
            let rows: Vec<_> = resp.snapshot.as_option().into_iter().collect();
            printer.document(&resp, || snapshots_text(&rows, output::now()))
        }
        SnapshotCommand::Delete(arg) => {
            let req = pb::DeleteSnapshotRequest {
                snapshot_id: arg.snapshot_id.clone(),
                ..Default::default()
            };
            let resp = client.delete_snapshot(req).await?.into_owned();
            printer.document(&resp, || format!("{}\tDELETED\n", arg.snapshot_id))
        }
    }
}

/// `restore`: the new VM and its state.
pub async fn restore(client: &Client, printer: Printer, args: RestoreArgs) -> Result<(), CtlError> {
    let req = pb::RestoreVmRequest {
        vm_id: args.vm_id.clone(),
        snapshot_id: args.snapshot_id,
        resume: !args.paused,
        network_overrides: args
            .taps
            .into_iter()
            .map(|(interface_id, tap_device)| pb::NetworkOverride {
                interface_id,
                tap_device,
                ..Default::default()
            })
            .collect(),
        metadata: args.metadata.into_iter().collect(),
        ..Default::default()
    };
    let resp = client.restore_vm(req).await?.into_owned();
    printer.vm_state(&resp, &resp.vm_id, &resp.state)
}

/// One row per snapshot: ID, VM, BACKEND, VERSION, KIND, PARENT (a diff's
/// parent, `-` for none), SIZE (bytes), AGE.
fn snapshots_text(rows: &[&pb::SnapshotInfo], now: i64) -> String {
    if rows.is_empty() {
        return "No snapshots.\n".to_owned();
    }
    let mut table = vec![
        [
            "ID", "VM", "BACKEND", "VERSION", "KIND", "PARENT", "SIZE", "AGE",
        ]
        .map(String::from),
    ];
    for s in rows {
        let kind = match s.kind.as_known() {
            Some(pb::SnapshotKind::SNAPSHOT_KIND_DIFF) => "diff",
            _ => "full",
        };
        table.push([
            s.snapshot_id.clone(),
            s.source_vm_id.clone(),
            s.backend.clone(),
            s.vmm_version.clone(),
            kind.to_owned(),
            if s.parent_snapshot_id.is_empty() {
                "-".to_owned()
            } else {
                s.parent_snapshot_id.clone()
            },
            s.size_bytes.to_string(),
            output::age(now, s.created_timestamp),
        ]);
    }
    output::table(&table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_snapshot_and_a_line_when_there_are_none() {
        assert_eq!(snapshots_text(&[], 100), "No snapshots.\n");
        let s = pb::SnapshotInfo {
            snapshot_id: "warm".into(),
            source_vm_id: "web-1".into(),
            backend: "firecracker".into(),
            vmm_version: "v1.16.1".into(),
            size_bytes: 4096,
            created_timestamp: 7,
            kind: pb::SnapshotKind::SNAPSHOT_KIND_FULL.into(),
            ..Default::default()
        };
        let diff = pb::SnapshotInfo {
            snapshot_id: "warm-2".into(),
            kind: pb::SnapshotKind::SNAPSHOT_KIND_DIFF.into(),
            parent_snapshot_id: "warm".into(),
            size_bytes: 512,
            created_timestamp: 60,
            ..s.clone()
        };
        let text = snapshots_text(&[&s, &diff], 67);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("ID      VM     BACKEND"), "{text}");
        let cells = |i: usize| lines[i].split_whitespace().collect::<Vec<_>>();
        assert_eq!(
            cells(1),
            [
                "warm",
                "web-1",
                "firecracker",
                "v1.16.1",
                "full",
                "-",
                "4096",
                "1m"
            ]
        );
        assert_eq!(
            cells(2),
            [
                "warm-2",
                "web-1",
                "firecracker",
                "v1.16.1",
                "diff",
                "warm",
                "512",
                "7s"
            ]
        );
    }
}
