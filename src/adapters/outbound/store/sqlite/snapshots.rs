//! Snapshot records in the SQLite store: one `snapshots` row per snapshot,
//! `pending` while it is taken and `committed` with its whole description
//! once its directory is in place (schema version 3).

use std::path::Path;

use rusqlite::{Connection, params};

use super::{SqliteStore, Sync, config_json, read_error, write, write_error};
use crate::domain::VmId;
use crate::domain::snapshot::{SnapshotId, SnapshotInfo, SnapshotKind, SnapshotRecord};
use crate::ports::StoreError;

/// Version 3: snapshot records. A pending row has only its id, source VM
/// and start time; a committed row has the whole description (the config
/// as the same strict JSON as a VM's).
pub(super) fn migrate_to_v3(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE snapshots (
            id           TEXT    NOT NULL PRIMARY KEY,
            source_vm_id TEXT    NOT NULL,
            state        TEXT    NOT NULL CHECK (state IN ('pending', 'committed')),
            created_at   INTEGER NOT NULL,
            backend      TEXT,
            vmm_version  TEXT,
            config       TEXT    CHECK (config IS NULL OR json_valid(config)),
            size_bytes   INTEGER CHECK (size_bytes >= 0),
            kind         TEXT    CHECK (kind IS NULL OR kind IN ('full', 'diff')),
            CHECK ((state = 'pending') = (config IS NULL)
               AND (config IS NULL) = (backend IS NULL)
               AND (config IS NULL) = (vmm_version IS NULL)
               AND (config IS NULL) = (size_bytes IS NULL)
               AND (config IS NULL) = (kind IS NULL))
        ) STRICT;",
    )
}

/// Version 4: diff snapshots. A snapshot's parent (NULL for a full one, and
/// in rows written before), and each VM's diff parent: the snapshot its
/// VMM's next diff is taken against, with that VMM's identity (all three
/// set, or none: checked when read).
pub(super) fn migrate_to_v4(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "ALTER TABLE snapshots ADD COLUMN parent_id TEXT;
         ALTER TABLE vms ADD COLUMN diff_parent TEXT;
         ALTER TABLE vms ADD COLUMN diff_vmm_pid INTEGER CHECK (diff_vmm_pid >= 0);
         ALTER TABLE vms ADD COLUMN diff_vmm_start_time INTEGER CHECK (diff_vmm_start_time >= 0);",
    )
}

type Columns = (
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<String>,
);

fn encode(record: &SnapshotRecord) -> Result<Columns, StoreError> {
    Ok(match record {
        SnapshotRecord::Pending {
            id,
            source_vm_id,
            created_at,
        } => (
            id.to_string(),
            source_vm_id.to_string(),
            "pending".into(),
            *created_at,
            None,
            None,
            None,
            None,
            None,
            None,
        ),
        SnapshotRecord::Committed(info) => (
            info.id.to_string(),
            info.source_vm_id.to_string(),
            "committed".into(),
            info.created_at,
            Some(info.backend.clone()),
            Some(info.vmm_version.clone()),
            Some(config_json::encode(&info.config).map_err(|e| {
                StoreError::Unavailable(format!("cannot encode snapshot {}'s config: {e}", info.id))
            })?),
            Some(i64::try_from(info.size_bytes).map_err(|_| {
                StoreError::Unavailable(format!("snapshot {}: size does not fit", info.id))
            })?),
            Some(info.kind.as_str().to_owned()),
            info.parent.as_ref().map(ToString::to_string),
        ),
    })
}

fn decode(c: Columns, path: &Path) -> Result<SnapshotRecord, StoreError> {
    let (id, source, state, created_at, backend, vmm_version, config, size, kind, parent) = c;
    let corrupt =
        |what: String| StoreError::Corrupt(format!("{}: snapshot {id:?}: {what}", path.display()));
    let sid = SnapshotId::parse("snapshot_id", &id).map_err(|e| corrupt(e.to_string()))?;
    let source_vm_id = VmId::parse(&source).map_err(|e| corrupt(e.to_string()))?;
    let parent = parent
        .map(|p| SnapshotId::parse("parent_id", &p))
        .transpose()
        .map_err(|e| corrupt(e.to_string()))?;
    match (state.as_str(), backend, vmm_version, config, size, kind) {
        ("pending", None, None, None, None, None) if parent.is_none() => {
            Ok(SnapshotRecord::Pending {
                id: sid,
                source_vm_id,
                created_at,
            })
        }
        ("committed", Some(backend), Some(vmm_version), Some(config), Some(size), Some(kind)) => {
            Ok(SnapshotRecord::Committed(SnapshotInfo {
                id: sid,
                source_vm_id,
                backend,
                vmm_version,
                config: config_json::decode(&config)
                    .map_err(|e| corrupt(format!("config: {e}")))?,
                created_at,
                size_bytes: u64::try_from(size).map_err(|_| corrupt(format!("size {size}")))?,
                kind: SnapshotKind::from_name(&kind)
                    .ok_or_else(|| corrupt(format!("unknown kind {kind:?}")))?,
                parent,
            }))
        }
        (state, ..) => Err(corrupt(format!("a {state:?} row with the wrong columns"))),
    }
}

impl SqliteStore {
    pub(super) async fn put_snapshot_row(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        let c = encode(record)?;
        self.blocking(move |conn, path| {
            let id = c.0.clone();
            write(conn, Sync::Full, |tx| {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO snapshots (id, source_vm_id, state, created_at,
                        backend, vmm_version, config, size_bytes, kind, parent_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )?
                .execute(params![c.0, c.1, c.2, c.3, c.4, c.5, c.6, c.7, c.8, c.9])
                .map(drop)
            })
            .map_err(|e| write_error(path, "record snapshot", &id, &e))
        })
        .await
    }

    pub(super) async fn remove_snapshot_row(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let id = id.to_string();
        self.blocking(move |conn, path| {
            write(conn, Sync::Full, |tx| {
                tx.prepare_cached("DELETE FROM snapshots WHERE id = ?1")?
                    .execute([&id])
                    .map(drop)
            })
            .map_err(|e| write_error(path, "remove snapshot", &id, &e))
        })
        .await
    }

    pub(super) async fn load_snapshot_rows(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.blocking(|conn, path| {
            let read_err = |e: rusqlite::Error| read_error(path, &e);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, source_vm_id, state, created_at, backend, vmm_version,
                            config, size_bytes, kind, parent_id
                     FROM snapshots ORDER BY id",
                )
                .map_err(read_err)?;
            let mut rows = stmt.query([]).map_err(read_err)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(read_err)? {
                let c: Columns = (|| {
                    Ok::<_, rusqlite::Error>((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                    ))
                })()
                .map_err(|e| {
                    StoreError::Corrupt(format!("{}: a snapshot row: {e}", path.display()))
                })?;
                out.push(decode(c, path)?);
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::VmConfig;
    use crate::ports::VmStore;

    fn info(id: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId::parse("snapshot_id", id).expect("id"),
            source_vm_id: VmId::parse("vm1").expect("id"),
            backend: "firecracker".into(),
            vmm_version: "v1.16.1".into(),
            config: VmConfig::default(),
            created_at: 9,
            size_bytes: 4096,
            kind: SnapshotKind::Full,
            parent: None,
        }
    }

    #[tokio::test]
    async fn snapshot_records_survive_a_reopen_and_a_commit_replaces_the_intent() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        let pending = SnapshotRecord::Pending {
            id: SnapshotId::parse("snapshot_id", "b").expect("id"),
            source_vm_id: VmId::parse("vm1").expect("id"),
            created_at: 3,
        };
        store.put_snapshot(&pending).await.expect("intent");
        store
            .put_snapshot(&SnapshotRecord::Pending {
                id: SnapshotId::parse("snapshot_id", "a").expect("id"),
                source_vm_id: VmId::parse("vm1").expect("id"),
                created_at: 3,
            })
            .await
            .expect("intent");
        let committed = SnapshotRecord::Committed(info("a"));
        store.put_snapshot(&committed).await.expect("commit");
        drop(store);
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.load_snapshots().await.expect("load"),
            [committed, pending.clone()],
            "ordered by id, the commit replaced a's intent"
        );
        store
            .remove_snapshot(&SnapshotId::parse("snapshot_id", "a").expect("id"))
            .await
            .expect("remove");
        store
            .remove_snapshot(&SnapshotId::parse("snapshot_id", "gone").expect("id"))
            .await
            .expect("removing a missing record succeeds");
        assert_eq!(store.load_snapshots().await.expect("load"), [pending]);
    }

    #[tokio::test]
    async fn a_snapshot_row_that_does_not_decode_is_corrupt_naming_it() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteStore::open(dir.path()).expect("open");
        store
            .put_snapshot(&SnapshotRecord::Committed(info("a")))
            .await
            .expect("commit");
        store
            .blocking(|conn, _| {
                conn.execute("UPDATE snapshots SET source_vm_id = '../x'", [])
                    .map(drop)
                    .map_err(|e| StoreError::Unavailable(e.to_string()))
            })
            .await
            .expect("damage");
        let e = store.load_snapshots().await.expect_err("corrupt");
        assert!(
            matches!(&e, StoreError::Corrupt(m) if m.contains("snapshot \"a\"")),
            "{e}"
        );
    }
}
