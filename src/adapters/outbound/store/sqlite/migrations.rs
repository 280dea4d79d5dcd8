//! The store's schema, as forward migrations: version `i` is reached by the
//! `i`th migration, and the file's `user_version` says which it has. Opening
//! applies the missing ones (see `open`); nothing here touches a file itself.

use rusqlite::Connection;

/// The schema version this build writes; files with a newer one are refused.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA application_id` of a VMCP store ("VMCP" in ASCII), so another
/// program's SQLite file at the same path is refused rather than migrated.
pub(super) const APPLICATION_ID: i32 = 0x564d_4350;

/// One forward migration: brings the schema from version `i` to `i + 1`,
/// where `i` is its index. It runs inside the transaction that also bumps
/// `user_version`, so a failed migration leaves the previous version intact.
pub(super) type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// Every migration in order; the schema version is their count.
pub(super) const MIGRATIONS: &[Migration] = &[
    migrate_to_v1,
    migrate_to_v2,
    super::snapshots::migrate_to_v3,
    super::snapshots::migrate_to_v4,
];

/// Version 1: one row per VM. Columns for what recovery and listing look at,
/// the config as JSON. `STRICT` makes SQLite enforce the column types; the
/// checks keep the process identity all-or-nothing.
pub(super) fn migrate_to_v1(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "CREATE TABLE vms (
            id             TEXT    NOT NULL PRIMARY KEY,
            config         TEXT    NOT NULL CHECK (json_valid(config)),
            desired        TEXT    NOT NULL,
            state          TEXT    NOT NULL,
            reason         TEXT    NOT NULL,
            generation     INTEGER NOT NULL CHECK (generation >= 0),
            created_at     INTEGER NOT NULL,
            modified_at    INTEGER NOT NULL,
            vmm_pid        INTEGER CHECK (vmm_pid BETWEEN 0 AND 4294967295),
            vmm_start_time INTEGER CHECK (vmm_start_time >= 0),
            socket_path    TEXT,
            CHECK ((vmm_pid IS NULL) = (vmm_start_time IS NULL)
               AND (vmm_pid IS NULL) = (socket_path IS NULL))
        ) STRICT;",
    )?;
    conn.pragma_update(None, "application_id", APPLICATION_ID)
}

/// Version 2: host-wide revisions (WatchVms). Each record keeps the revision
/// of its VM's last recorded change; `meta` keeps the highest revision ever
/// recorded, deletes included, so revisions never go backwards after a
/// restart even when the newest VM is gone. Records written by version 1
/// read as revision 0.
fn migrate_to_v2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "ALTER TABLE vms ADD COLUMN revision INTEGER NOT NULL DEFAULT 0 CHECK (revision >= 0);
         CREATE TABLE meta (
            key   TEXT    NOT NULL PRIMARY KEY,
            value INTEGER NOT NULL
         ) STRICT;
         INSERT INTO meta (key, value) VALUES ('revision', 0);",
    )
}
