//! The durable `VmStore`: one SQLite file, `vmcp.db`, in VMCP's data
//! directory, so VM records survive restarts and crashes and the next start
//! can re-adopt or reconcile every VM. Durability wins over speed: WAL mode
//! with `synchronous=FULL` makes every `put` and `remove` a transaction that
//! is on disk when it returns. The file is checked at open (application id,
//! schema version, `PRAGMA integrity_check`) and a damaged, foreign or newer file
//! stops start-up with a message naming it; nothing is ever reset silently.
//! One row per VM, with the searchable parts as columns and the config as
//! strict JSON (see `config_json`). SQLite calls block, so they run on
//! tokio's blocking pool over one connection behind a mutex.

mod config_json;

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};

use crate::domain::lifecycle::Desired;
use crate::domain::{VmId, VmSnapshot, VmState};
use crate::ports::{StoreError, VmRecord, VmStore, VmmProcess};

/// The store's file name inside the data directory.
pub const DB_FILE_NAME: &str = "vmcp.db";

/// The schema version this build writes; files with a newer one are refused.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// `PRAGMA application_id` of a VMCP store ("VMCP" in ASCII), so another
/// program's SQLite file at the same path is refused rather than migrated.
const APPLICATION_ID: i32 = 0x564d_4350;

/// How long a statement waits for a lock held by another connection (an
/// operator's `sqlite3` shell, say) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most problems `integrity_check` lists in an open error.
const MAX_CHECK_LINES: i64 = 10;

/// One forward migration: brings the schema from version `i` to `i + 1`,
/// where `i` is its index. It runs inside the transaction that also bumps
/// `user_version`, so a failed migration leaves the previous version intact.
type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// Every migration in order; the schema version is their count.
const MIGRATIONS: &[Migration] = &[migrate_to_v1, migrate_to_v2];

/// Version 1: one row per VM. Columns for what recovery and listing look at,
/// the config as JSON. `STRICT` makes SQLite enforce the column types; the
/// checks keep the process identity all-or-nothing.
fn migrate_to_v1(conn: &Connection) -> rusqlite::Result<()> {
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

/// Raises the stored high-water revision to `revision` (never lowers it).
fn raise_revision(tx: &Connection, revision: u64) -> rusqlite::Result<()> {
    let revision = i64::try_from(revision).unwrap_or(i64::MAX);
    tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'revision'")?
        .execute([revision])
        .map(drop)
}

/// Why the store could not be opened. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// The data directory could not be created or is not a directory.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The store file could not be created or opened.
    #[error("cannot open the VM store {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// SQLite could not open, read or configure the file.
    #[error("cannot read the VM store {}: {source}", path.display())]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not a database or fails its integrity check.
    #[error(
        "the VM store {} is corrupt ({detail}); VMCP will not start on it: restore it from a backup, or move it aside to start with no VMs",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What SQLite found.
        detail: String,
    },
    /// The file is another program's SQLite database.
    #[error(
        "{} is not a VMCP store (application_id {found:#010x}, user_version {version}); refusing to use it",
        path.display()
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// Its application id.
        found: i32,
        /// Its user version.
        version: i64,
    },
    /// The file was written by a newer VMCP.
    #[error(
        "the VM store {} has schema version {found}, newer than version {supported} that this VMCP understands; run a newer VMCP or restore a backup",
        path.display()
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// SQLite would not switch the file to write-ahead logging.
    #[error(
        "the VM store {} cannot use write-ahead logging (it stayed in {mode} mode); put the data directory on a local filesystem",
        path.display()
    )]
    NoWal {
        /// The file.
        path: PathBuf,
        /// The journal mode SQLite kept.
        mode: String,
    },
    /// A migration failed; the file keeps its previous version.
    #[error("cannot migrate the VM store {} to schema version {version}: {source}", path.display())]
    Migration {
        /// The file.
        path: PathBuf,
        /// The version being migrated to.
        version: i64,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
}

/// VM records in a SQLite file; cheap to clone (clones share the connection).
/// Writes are serialized; a `put` or `remove` whose future is dropped still
/// runs to completion (commit or rollback) on the blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/vmcp.db`, checks it and migrates it
    /// to [`SCHEMA_VERSION`]. Creates `data_dir` with mode 0700 and the file
    /// with mode 0600. Blocks; call it before serving or on a blocking thread.
    pub fn open(data_dir: &Path) -> Result<Self, StoreOpenError> {
        ensure_data_dir(data_dir)?;
        let path = data_dir.join(DB_FILE_NAME);
        ensure_db_file(&path)?;
        let sqlite = |source| StoreOpenError::Sqlite {
            path: path.clone(),
            source,
        };
        // No CREATE flag: the file was made above with its mode, and SQLite
        // gives its -wal and -shm files the same mode.
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
        let version = check_identity(&conn, &path)?;
        check_integrity(&conn, &path)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreOpenError::NoWal { path, mode });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        migrate(&mut conn, &path, version)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the connection on tokio's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Path) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a transaction open
            // (rusqlite rolls back on drop), so a poisoned lock is usable.
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &inner.path)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

impl VmStore for SqliteStore {
    /// A snapshot marked deleted is removed rather than stored: its delete has
    /// completed, and storing it would bring it back at the next start.
    async fn put(&self, record: &VmRecord) -> Result<(), StoreError> {
        if record.snapshot.deleted {
            return self
                .remove(&record.snapshot.id, record.snapshot.revision)
                .await;
        }
        let row = Row::encode(record)?;
        let record_revision = record.snapshot.revision;
        self.blocking(move |conn, path| {
            write(conn, |tx| {
                tx.prepare_cached(
                    "INSERT INTO vms (id, config, desired, state, reason, generation,
                                      created_at, modified_at, vmm_pid, vmm_start_time, socket_path,
                                      revision)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (id) DO UPDATE SET
                        config = excluded.config,
                        desired = excluded.desired,
                        state = excluded.state,
                        reason = excluded.reason,
                        generation = excluded.generation,
                        created_at = excluded.created_at,
                        modified_at = excluded.modified_at,
                        vmm_pid = excluded.vmm_pid,
                        vmm_start_time = excluded.vmm_start_time,
                        socket_path = excluded.socket_path,
                        revision = excluded.revision",
                )?
                .execute(params![
                    row.id,
                    row.config,
                    row.desired,
                    row.state,
                    row.reason,
                    row.generation,
                    row.created_at,
                    row.modified_at,
                    row.vmm_pid,
                    row.vmm_start_time,
                    row.socket_path,
                    row.revision,
                ])?;
                raise_revision(tx, record_revision)
            })
            .map_err(|e| write_error(path, "write", &row.id, &e))
        })
        .await
    }

    async fn remove(&self, id: &VmId, revision: u64) -> Result<(), StoreError> {
        let id = id.as_str().to_owned();
        self.blocking(move |conn, path| {
            write(conn, |tx| {
                tx.prepare_cached("DELETE FROM vms WHERE id = ?1")?
                    .execute([&id])?;
                raise_revision(tx, revision)
            })
            .map_err(|e| write_error(path, "remove", &id, &e))
        })
        .await
    }

    async fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.blocking(|conn, path| {
            let read_err = |e: rusqlite::Error| read_error(path, &e);
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, config, desired, state, reason, generation, created_at,
                            modified_at, vmm_pid, vmm_start_time, socket_path, revision
                     FROM vms ORDER BY id",
                )
                .map_err(read_err)?;
            let mut rows = stmt.query([]).map_err(read_err)?;
            let mut records = Vec::new();
            while let Some(r) = rows.next().map_err(read_err)? {
                records.push(Row::read(r, path)?.decode(path)?);
            }
            Ok(records)
        })
        .await
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        self.blocking(|conn, path| {
            let value: i64 = conn
                .prepare_cached(
                    "SELECT max((SELECT value FROM meta WHERE key = 'revision'),
                                (SELECT coalesce(max(revision), 0) FROM vms))",
                )
                .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
                .map_err(|e| read_error(path, &e))?;
            u64::try_from(value).map_err(|_| {
                StoreError::Corrupt(format!("{}: negative revision {value}", path.display()))
            })
        })
        .await
    }
}

/// Runs `f` in an immediate transaction and commits; on any error the
/// transaction is rolled back (by `Transaction`'s drop) and nothing changes.
fn write<F>(conn: &mut Connection, f: F) -> rusqlite::Result<()>
where
    F: FnOnce(&Connection) -> rusqlite::Result<()>,
{
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    f(&tx)?;
    tx.commit()
}

fn write_error(path: &Path, what: &str, id: &str, e: &rusqlite::Error) -> StoreError {
    let why = if e.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        " (disk full)"
    } else {
        ""
    };
    StoreError::Unavailable(format!(
        "cannot {what} VM {id} in {}{why}: {e}",
        path.display()
    ))
}

fn read_error(path: &Path, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
            StoreError::Corrupt(format!("{}: {e}", path.display()))
        }
        _ => StoreError::Unavailable(format!("cannot read {}: {e}", path.display())),
    }
}

/// Creates the data directory (and missing parents) with mode 0700. An
/// existing directory keeps its mode: it may be shared or chosen on purpose.
fn ensure_data_dir(dir: &Path) -> Result<(), StoreOpenError> {
    let err = |source| StoreOpenError::DataDir {
        path: dir.to_owned(),
        source,
    };
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "exists and is not a directory",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
            // The umask may have taken bits away; 0700 is the documented mode.
            fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(err)?;
            sync_parent(dir).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Creates the store file with mode 0600 if it is missing (and makes its
/// directory entry durable); narrows a wider mode on an existing file.
fn ensure_db_file(path: &Path) -> Result<(), StoreOpenError> {
    let err = |source| StoreOpenError::File {
        path: path.to_owned(),
        source,
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(0o600))
                .map_err(err)?;
            file.sync_all().map_err(err)?;
            sync_parent(path).map_err(err)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::metadata(path).map_err(err)?;
            if !meta.is_file() {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "exists and is not a regular file",
                )));
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "VM store was readable by others; narrowing it to 0600");
                fs::set_permissions(path, Permissions::from_mode(mode & 0o700)).map_err(err)?;
            }
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

/// Flushes the directory holding `path`, so a newly created entry survives a crash.
fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => File::open(parent)?.sync_all(),
        _ => Ok(()),
    }
}

/// Maps an error met while reading the file at open: a file SQLite cannot
/// parse is corrupt, anything else is an I/O or SQLite failure.
fn open_read_error(path: &Path, e: rusqlite::Error) -> StoreOpenError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreOpenError::Corrupt {
            path: path.to_owned(),
            detail: e.to_string(),
        },
        _ => StoreOpenError::Sqlite {
            path: path.to_owned(),
            source: e,
        },
    }
}

/// Reads the application id and schema version; refuses foreign and newer
/// files. Returns the file's schema version (0 for a new, empty file).
fn check_identity(conn: &Connection, path: &Path) -> Result<i64, StoreOpenError> {
    let read = |name: &str| -> Result<i64, StoreOpenError> {
        conn.pragma_query_value(None, name, |r| r.get(0))
            .map_err(|e| open_read_error(path, e))
    };
    let app_id = read("application_id")?;
    let version = read("user_version")?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(|e| open_read_error(path, e))?;
    let fresh = app_id == 0 && version == 0 && tables == 0;
    if !fresh && app_id != i64::from(APPLICATION_ID) {
        return Err(StoreOpenError::Foreign {
            path: path.to_owned(),
            found: i32::try_from(app_id).unwrap_or(i32::MIN),
            version,
        });
    }
    if version > SCHEMA_VERSION {
        return Err(StoreOpenError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < 0 {
        return Err(StoreOpenError::Corrupt {
            path: path.to_owned(),
            detail: format!("schema version {version} is negative"),
        });
    }
    Ok(version)
}

/// Runs `PRAGMA integrity_check`: every page and record is read and the id
/// index is cross-checked against the table. About 50 ms for 10,000 VMs here,
/// no slower than `quick_check` with this schema's single index.
fn check_integrity(conn: &Connection, path: &Path) -> Result<(), StoreOpenError> {
    let mut problems = Vec::new();
    conn.pragma(None, "integrity_check", MAX_CHECK_LINES, |r| {
        problems.push(r.get::<_, String>(0)?);
        Ok(())
    })
    .map_err(|e| open_read_error(path, e))?;
    if problems.len() == 1 && problems[0] == "ok" {
        return Ok(());
    }
    Err(StoreOpenError::Corrupt {
        path: path.to_owned(),
        detail: format!("integrity_check: {}", problems.join("; ")),
    })
}

/// Applies every migration past `from`, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path, from: i64) -> Result<(), StoreOpenError> {
    let mut version = from;
    for step in MIGRATIONS
        .iter()
        .skip(usize::try_from(from).unwrap_or(usize::MAX))
    {
        version += 1;
        let fail = |source| StoreOpenError::Migration {
            path: path.to_owned(),
            version,
            source,
        };
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(fail)?;
        step(&tx).map_err(fail)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(fail)?;
        tx.commit().map_err(fail)?;
        tracing::info!(path = %path.display(), version, "migrated the VM store");
    }
    Ok(())
}

/// One `vms` row, as bound and read.
struct Row {
    id: String,
    config: String,
    desired: String,
    state: String,
    reason: String,
    generation: i64,
    created_at: i64,
    modified_at: i64,
    vmm_pid: Option<i64>,
    vmm_start_time: Option<i64>,
    socket_path: Option<String>,
    revision: i64,
}

impl Row {
    fn encode(record: &VmRecord) -> Result<Self, StoreError> {
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
        })
    }

    fn read(r: &rusqlite::Row<'_>, path: &Path) -> Result<Self, StoreError> {
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
            id,
        })
    }

    fn decode(self, path: &Path) -> Result<VmRecord, StoreError> {
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

const ALL_DESIRED: [Desired; 5] = [
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::{
        BootConfig, ConsoleConfig, CpuConfig, CpuTopology, MemoryConfig, NetworkInterface,
        StorageDevice, VmConfig,
    };

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A config with every field set to a non-default value. Written without
    /// `..Default::default()` so a new config field must be added here.
    fn full_config() -> VmConfig {
        VmConfig {
            cpu: CpuConfig {
                vcpu_count: 2,
                max_vcpu_count: 4,
                topology: Some(CpuTopology {
                    sockets: 1,
                    cores_per_socket: 2,
                    threads_per_core: 2,
                }),
                features: map(&[("amx", "on"), ("kvm_hyperv", "true")]),
            },
            memory: MemoryConfig {
                size_bytes: 256 << 20,
                hotplug_enabled: true,
                max_size_bytes: 1 << 30,
                backing: map(&[("hugepages", "true")]),
            },
            boot: BootConfig {
                kernel_path: "/var/lib/vmcp/vmlinux".into(),
                initrd_path: "/var/lib/vmcp/initrd.img".into(),
                kernel_args: "console=ttyS0 reboot=k panic=1 quote=\"x\" ünïcödé".into(),
                boot_options: map(&[("firmware", "/usr/share/hypervisor-fw")]),
            },
            storage: vec![
                StorageDevice {
                    id: "root".into(),
                    path: "/images/root.img".into(),
                    read_only: false,
                    is_root_device: true,
                    interface_type: "virtio-blk".into(),
                    options: map(&[("direct", "on")]),
                },
                StorageDevice {
                    id: "data".into(),
                    path: "/images/data.img".into(),
                    read_only: true,
                    is_root_device: false,
                    interface_type: String::new(),
                    options: BTreeMap::new(),
                },
            ],
            network: vec![NetworkInterface {
                id: "eth0".into(),
                mac_address: "52:54:00:12:34:56".into(),
                tap_device: "tap-vm1".into(),
                interface_type: "virtio-net".into(),
                options: map(&[("num_queues", "2")]),
            }],
            console: ConsoleConfig {
                enabled: true,
                output: "/run/vmcp/vm-1/console.log".into(),
                input: "unused".into(),
                console_type: "serial".into(),
            },
            metadata: map(&[("owner", "deploy"), ("tier", "gold")]),
            restart_policy: crate::domain::restart::RestartPolicy::OnFailure,
        }
    }

    fn record(id: &str) -> VmRecord {
        VmRecord {
            snapshot: VmSnapshot {
                id: VmId::parse(id).expect("valid id"),
                config: full_config(),
                state: VmState::Paused,
                reason: "paused by the caller; ünïcödé".into(),
                generation: 7,
                created_at: 1_700_000_000,
                modified_at: 1_700_000_123,
                desired: Desired::Paused,
                deleted: false,
                revision: 41,
            },
            process: Some(VmmProcess {
                pid: 4_000_000_000,
                start_time: 123_456_789,
                socket_path: format!("/run/vmcp/{id}/api.sock"),
            }),
        }
    }

    fn open(dir: &Path) -> SqliteStore {
        SqliteStore::open(dir).expect("store opens")
    }

    fn ids(records: &[VmRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| r.snapshot.id.as_str().to_owned())
            .collect()
    }

    fn open_err(dir: &Path) -> StoreOpenError {
        SqliteStore::open(dir).expect_err("open must fail")
    }

    #[tokio::test]
    async fn a_full_record_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let rec = record("vm-1");
        store.put(&rec).await.expect("put");
        assert_eq!(store.load_all().await.expect("load"), vec![rec]);
    }

    #[tokio::test]
    async fn every_state_desired_state_and_a_missing_process_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut expected = Vec::new();
        for (i, state) in VmState::ALL.into_iter().enumerate() {
            for (j, desired) in ALL_DESIRED.into_iter().enumerate() {
                let mut rec = record(&format!("vm-{i}-{j}"));
                rec.snapshot.state = state;
                rec.snapshot.desired = desired;
                rec.snapshot.generation = u64::try_from(i64::MAX).expect("fits");
                rec.snapshot.created_at = i64::MIN;
                rec.snapshot.modified_at = -1;
                rec.snapshot.config = VmConfig::default();
                if (i + j) % 2 == 0 {
                    rec.process = None;
                }
                store.put(&rec).await.expect("put");
                expected.push(rec);
            }
        }
        assert_eq!(store.load_all().await.expect("load"), expected);
    }

    #[tokio::test]
    async fn a_value_sqlite_cannot_hold_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut rec = record("vm-1");
        rec.snapshot.generation = u64::MAX;
        let err = store.put(&rec).await.expect_err("u64::MAX stored");
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("generation")),
            "{err}"
        );
        assert_eq!(store.load_all().await.expect("load"), vec![]);
    }

    #[tokio::test]
    async fn put_replaces_the_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let first = record("vm-1");
        store.put(&first).await.expect("put");
        let mut second = first.clone();
        second.snapshot.state = VmState::Failed;
        second.snapshot.reason = "VMM exited".into();
        second.snapshot.generation = 8;
        second.snapshot.config.metadata.clear();
        second.process = None;
        store.put(&second).await.expect("put again");
        assert_eq!(store.load_all().await.expect("load"), vec![second]);
    }

    #[tokio::test]
    async fn remove_is_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.put(&record("vm-1")).await.expect("put");
        store.put(&record("vm-2")).await.expect("put");
        let id = VmId::parse("vm-1").expect("id");
        store.remove(&id, 0).await.expect("remove");
        store.remove(&id, 0).await.expect("remove again");
        store
            .remove(&VmId::parse("never-stored").expect("id"), 0)
            .await
            .expect("remove unknown");
        assert_eq!(ids(&store.load_all().await.expect("load")), ["vm-2"]);
    }

    #[tokio::test]
    async fn a_deleted_snapshot_is_removed_not_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut rec = record("vm-1");
        store.put(&rec).await.expect("put");
        rec.snapshot.deleted = true;
        store.put(&rec).await.expect("put deleted");
        assert_eq!(store.load_all().await.expect("load"), vec![]);
    }

    #[tokio::test]
    async fn the_revision_is_the_highest_ever_recorded_and_survives_removal_and_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        assert_eq!(store.revision().await.expect("revision"), 0);
        let mut a = record("vm-a");
        a.snapshot.revision = 3;
        let mut b = record("vm-b");
        b.snapshot.revision = 9;
        store.put(&a).await.expect("put a");
        store.put(&b).await.expect("put b");
        assert_eq!(store.revision().await.expect("revision"), 9);
        let loaded = store.load_all().await.expect("load");
        assert_eq!(
            loaded
                .iter()
                .map(|r| r.snapshot.revision)
                .collect::<Vec<_>>(),
            [3, 9]
        );
        // The newest VM goes: its delete's revision is the high-water mark.
        store.remove(&b.snapshot.id, 12).await.expect("remove b");
        // A lower revision never lowers it.
        store.remove(&a.snapshot.id, 4).await.expect("remove a");
        drop(store);
        let store = open(dir.path());
        assert!(store.load_all().await.expect("load").is_empty());
        assert_eq!(store.revision().await.expect("revision"), 12);
    }

    #[test]
    fn a_version_1_store_migrates_and_its_records_read_as_revision_0() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmcp.db");
        {
            let conn = Connection::open(&path).expect("open");
            migrate_to_v1(&conn).expect("v1 schema");
            conn.pragma_update(None, "user_version", 1)
                .expect("version");
            conn.execute(
                "INSERT INTO vms (id, config, desired, state, reason, generation, created_at, modified_at)
                 VALUES ('old', ?1, 'running', 'running', '', 4, 1, 2)",
                [config_json::encode(&full_config()).expect("config")],
            )
            .expect("insert a v1 row");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let store = open(dir.path());
        let records = rt.block_on(store.load_all()).expect("load");
        assert_eq!(ids(&records), ["old"]);
        assert_eq!(records[0].snapshot.revision, 0);
        assert_eq!(records[0].snapshot.generation, 4);
        assert_eq!(rt.block_on(store.revision()).expect("revision"), 0);
        let mut rec = records[0].clone();
        rec.snapshot.revision = 5;
        rt.block_on(store.put(&rec)).expect("put");
        assert_eq!(rt.block_on(store.revision()).expect("revision"), 5);
    }

    #[tokio::test]
    async fn load_all_is_ordered_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let mut put = vec!["vm-2", "B", "vm-10", "a", "vm-1", "A.x", "0"];
        for id in &put {
            store.put(&record(id)).await.expect("put");
        }
        put.sort_unstable();
        let loaded = store.load_all().await.expect("load");
        assert_eq!(ids(&loaded), put);
        let mut by_vm_id: Vec<VmId> = loaded.iter().map(|r| r.snapshot.id.clone()).collect();
        by_vm_id.sort();
        assert_eq!(
            by_vm_id,
            loaded
                .iter()
                .map(|r| r.snapshot.id.clone())
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn reopening_keeps_the_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let recs = vec![record("vm-1"), record("vm-2")];
        for r in &recs {
            store.put(r).await.expect("put");
        }
        store.remove(&recs[0].snapshot.id, 0).await.expect("remove");
        drop(store);
        let store = open(dir.path());
        assert_eq!(store.load_all().await.expect("load"), recs[1..]);
    }

    #[tokio::test]
    async fn data_dir_is_0700_and_files_are_0600() {
        let base = tempfile::tempdir().expect("tempdir");
        let data = base.path().join("nested").join("data");
        let store = open(&data);
        store.put(&record("vm-1")).await.expect("put");
        let mode = |p: &Path| fs::metadata(p).expect("stat").mode() & 0o777;
        assert_eq!(mode(&data), 0o700);
        assert_eq!(mode(&base.path().join("nested")), 0o700);
        assert_eq!(store.path(), data.join(DB_FILE_NAME));
        assert_eq!(mode(store.path()), 0o600);
        for suffix in ["-wal", "-shm"] {
            let side = data.join(format!("{DB_FILE_NAME}{suffix}"));
            assert_eq!(mode(&side), 0o600, "{}", side.display());
        }
    }

    #[tokio::test]
    async fn an_existing_world_readable_file_is_narrowed_to_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path()));
        let path = dir.path().join(DB_FILE_NAME);
        fs::set_permissions(&path, Permissions::from_mode(0o644)).expect("chmod");
        drop(open(dir.path()));
        assert_eq!(fs::metadata(&path).expect("stat").mode() & 0o777, 0o600);
    }

    #[test]
    fn a_fresh_file_gets_the_current_schema_and_the_vmcp_application_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path()));
        let conn = Connection::open(dir.path().join(DB_FILE_NAME)).expect("raw open");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        let app: i32 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .expect("app id");
        let journal: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .expect("journal");
        assert_eq!(
            (version, app, journal.as_str()),
            (SCHEMA_VERSION, APPLICATION_ID, "wal")
        );
        assert_eq!(SCHEMA_VERSION, 2);
    }

    #[test]
    fn garbage_over_the_header_stops_open_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path()));
        let path = dir.path().join(DB_FILE_NAME);
        let mut bytes = fs::read(&path).expect("read");
        assert!(bytes.len() >= 100, "a migrated store has a header");
        bytes[..100].fill(0x5a);
        fs::write(&path, &bytes).expect("write garbage");
        let err = open_err(dir.path());
        assert!(matches!(err, StoreOpenError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(
            fs::read(&path).expect("read"),
            bytes,
            "the file was left alone"
        );
    }

    /// Fills a store with `vm-0`..`vm-19`, closes it (which checkpoints the
    /// WAL into the file) and returns the file's bytes and the byte range of
    /// the root page of the b-tree `name`.
    async fn closed_store_with_page(dir: &Path, name: &str) -> (Vec<u8>, std::ops::Range<usize>) {
        let store = open(dir);
        for i in 0..20 {
            store.put(&record(&format!("vm-{i}"))).await.expect("put");
        }
        let (root, page_size): (i64, i64) = {
            let conn = store.inner.conn.lock().expect("lock");
            let root = conn
                .query_row(
                    "SELECT rootpage FROM sqlite_schema WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .expect("root page");
            let size = conn
                .pragma_query_value(None, "page_size", |r| r.get(0))
                .expect("page size");
            (root, size)
        };
        drop(store);
        let bytes = fs::read(dir.join(DB_FILE_NAME)).expect("read");
        let start = usize::try_from((root - 1) * page_size).expect("offset");
        let end = start + usize::try_from(page_size).expect("size");
        assert!(end <= bytes.len(), "the root page of {name} is in the file");
        (bytes, start..end)
    }

    #[tokio::test]
    async fn a_damaged_table_page_stops_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut bytes, page) = closed_store_with_page(dir.path(), "vms").await;
        bytes[page].fill(0xa5);
        let path = dir.path().join(DB_FILE_NAME);
        fs::write(&path, &bytes).expect("write garbage");
        let err = open_err(dir.path());
        assert!(matches!(err, StoreOpenError::Corrupt { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_id_index_that_disagrees_with_the_table_stops_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut bytes, page) = closed_store_with_page(dir.path(), "sqlite_autoindex_vms_1").await;
        // Rename the largest key in the index only, keeping the page's order
        // and format valid: only a table-versus-index cross-check sees it.
        let index_page = &mut bytes[page];
        let at = index_page
            .windows(4)
            .position(|w| w == b"vm-9")
            .expect("the index holds vm-9");
        index_page[at + 3] = b':';
        fs::write(dir.path().join(DB_FILE_NAME), &bytes).expect("write");
        match open_err(dir.path()) {
            StoreOpenError::Corrupt { detail, .. } => {
                assert!(detail.starts_with("integrity_check: "), "{detail}");
                assert!(detail.contains("sqlite_autoindex_vms_1"), "{detail}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_in_place_of_the_file_stops_open_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        fs::create_dir(&path).expect("mkdir");
        let err = open_err(dir.path());
        assert!(matches!(err, StoreOpenError::File { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn a_file_in_place_of_the_data_dir_stops_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        fs::write(&data, b"not a dir").expect("write");
        let err = open_err(&data);
        assert!(matches!(err, StoreOpenError::DataDir { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&data.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn another_programs_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(DB_FILE_NAME);
        Connection::open(&path)
            .expect("raw open")
            .execute_batch("CREATE TABLE notes (body TEXT);")
            .expect("create");
        let err = open_err(dir.path());
        assert!(
            matches!(
                err,
                StoreOpenError::Foreign {
                    found: 0,
                    version: 0,
                    ..
                }
            ),
            "{err:?}"
        );
        let tables: i64 = Connection::open(&path)
            .expect("raw open")
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .expect("count");
        assert_eq!(tables, 1, "nothing was added to the foreign file");
    }

    #[tokio::test]
    async fn a_newer_schema_version_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        store.put(&record("vm-1")).await.expect("put");
        drop(store);
        let path = dir.path().join(DB_FILE_NAME);
        Connection::open(&path)
            .expect("raw open")
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .expect("bump version");
        let err = open_err(dir.path());
        match &err {
            StoreOpenError::NewerSchema {
                path: p,
                found,
                supported,
            } => {
                assert_eq!(
                    (p, *found, *supported),
                    (&path, SCHEMA_VERSION + 1, SCHEMA_VERSION)
                );
            }
            other => panic!("expected NewerSchema, got {other:?}"),
        }
        assert!(err.to_string().contains("newer"), "{err}");
        let version: i64 = Connection::open(&path)
            .expect("raw open")
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION + 1);
    }

    /// Writes a row behind the store's back, as a bug or bit rot might.
    fn insert_raw(store: &SqliteStore, id: &str, config: &str, state: &str) {
        store
            .inner
            .conn
            .lock()
            .expect("lock")
            .execute(
                "INSERT INTO vms (id, config, desired, state, reason, generation, created_at, modified_at)
                 VALUES (?1, ?2, 'running', ?3, '', 1, 0, 0)",
                params![id, config, state],
            )
            .expect("raw insert");
    }

    #[tokio::test]
    async fn an_undecodable_record_makes_load_all_corrupt_naming_it() {
        let good = config_json::encode(&full_config()).expect("encode");
        let cases = [
            (
                "bad-config",
                r#"{"cpu":{}}"#,
                "running",
                "undecodable config",
            ),
            ("bad-state", good.as_str(), "exploded", "unknown state"),
            ("../escape", good.as_str(), "running", "invalid id"),
        ];
        for (id, config, state, why) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = open(dir.path());
            store.put(&record("a-good-one")).await.expect("put");
            insert_raw(&store, id, config, state);
            let err = store.load_all().await.expect_err("corrupt record skipped");
            match &err {
                StoreError::Corrupt(msg) => {
                    assert!(msg.contains(&format!("{id:?}")), "{msg}");
                    assert!(msg.contains(why), "{msg}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_full_page_budget_makes_put_unavailable_and_keeps_the_old_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let old = record("vm-1");
        store.put(&old).await.expect("put");
        {
            let conn = store.inner.conn.lock().expect("lock");
            let pages: i64 = conn
                .pragma_query_value(None, "page_count", |r| r.get(0))
                .expect("page count");
            conn.pragma_update(None, "max_page_count", pages)
                .expect("cap the file");
        }
        let mut big = old.clone();
        big.snapshot.generation += 1;
        big.snapshot.config.metadata = (0..64)
            .map(|i| (format!("k{i}"), "x".repeat(1024)))
            .collect();
        let err = store.put(&big).await.expect_err("put past the cap");
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("disk full") && m.contains("vm-1")),
            "{err}"
        );
        assert_eq!(store.load_all().await.expect("load"), vec![old.clone()]);
        // The connection is not left inside a transaction: lifting the cap
        // lets the same write through.
        store
            .inner
            .conn
            .lock()
            .expect("lock")
            .pragma_update(None, "max_page_count", 1_000_000)
            .expect("lift the cap");
        store.put(&big).await.expect("put after lifting the cap");
        drop(store);
        assert_eq!(open(dir.path()).load_all().await.expect("load"), vec![big]);
    }

    /// A tmpfs of a few hundred KiB mounted for one test; unmounted on drop
    /// so a failing assertion does not leave it behind.
    struct TinyTmpfs {
        dir: tempfile::TempDir,
    }

    impl TinyTmpfs {
        fn mount(test: &str, bytes: u64) -> Option<Self> {
            let root = fs::metadata("/proc/self")
                .map(|m| m.uid() == 0)
                .unwrap_or(false);
            if !root {
                crate::test_skips::skip(test, "not running as root, cannot mount a tmpfs");
                return None;
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let status = Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={bytes},mode=0700"),
                    "vmcp-test",
                ])
                .arg(dir.path())
                .status();
            match status {
                Ok(s) if s.success() => Some(Self { dir }),
                other => {
                    crate::test_skips::skip(test, &format!("mount -t tmpfs failed ({other:?})"));
                    None
                }
            }
        }
    }

    impl Drop for TinyTmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }

    #[tokio::test]
    async fn a_full_filesystem_makes_put_unavailable_and_keeps_the_old_records() {
        let test = "a_full_filesystem_makes_put_unavailable_and_keeps_the_old_records";
        let Some(fs_) = TinyTmpfs::mount(test, 256 * 1024) else {
            return;
        };
        let data = fs_.dir.path().join("data");
        let store = open(&data);
        let first = record("vm-0000");
        store.put(&first).await.expect("put");
        let mut stored = vec![first.clone()];
        let mut filler = record("vm-0001");
        filler.snapshot.config.metadata = (0..8)
            .map(|i| (format!("k{i}"), "y".repeat(1000)))
            .collect();
        let mut full = None;
        for i in 1..1000 {
            let mut rec = filler.clone();
            rec.snapshot.id = VmId::parse(&format!("vm-{i:04}")).expect("id");
            match store.put(&rec).await {
                Ok(()) => stored.push(rec),
                Err(e) => {
                    full = Some(e);
                    break;
                }
            }
        }
        let err = full.expect("a 256 KiB filesystem fills up");
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("disk full")),
            "{err}"
        );
        assert!(stored.len() > 2, "some puts fitted before the disk filled");
        let mut bigger = first.clone();
        bigger.snapshot.generation += 1;
        bigger.snapshot.config.metadata = (0..64)
            .map(|i| (format!("k{i}"), "z".repeat(1024)))
            .collect();
        let err = store
            .put(&bigger)
            .await
            .expect_err("replace on a full disk");
        assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
        assert_eq!(store.load_all().await.expect("load"), stored);
        drop(store);
        assert_eq!(
            open(&data).load_all().await.expect("load after reopen"),
            stored
        );
    }

    /// Set in the child process of the kill test: the data dir it writes to.
    const KILL_CHILD_DIR: &str = "VMCP_TEST_SQLITE_KILL_CHILD_DIR";
    const KILL_TEST: &str = "adapters::outbound::store::sqlite::tests::a_writer_killed_mid_write_loses_no_acknowledged_put";

    /// The child side: puts records as fast as it can and prints `ACK <n>`
    /// after put `n` returned, until it is killed.
    async fn write_until_killed(dir: &Path) {
        let store = open(dir);
        let mut counter = record("counter");
        for n in 0u64.. {
            let mut rec = record(&format!("vm-{n:08}"));
            rec.snapshot.generation = n;
            store.put(&rec).await.expect("child put");
            counter.snapshot.generation = n;
            store.put(&counter).await.expect("child put");
            println!("ACK {n}");
        }
    }

    /// Kills the child on every path out of the test.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[tokio::test]
    async fn a_writer_killed_mid_write_loses_no_acknowledged_put() {
        use std::io::BufRead;

        if let Some(dir) = std::env::var_os(KILL_CHILD_DIR) {
            write_until_killed(Path::new(&dir)).await;
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let mut child = KillOnDrop(
            Command::new(exe)
                .args([KILL_TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(KILL_CHILD_DIR, dir.path())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn the writer"),
        );
        let stdout = child.0.stdout.take().expect("piped stdout");
        let mut last_ack = None;
        for line in io::BufReader::new(stdout).lines() {
            let line = line.expect("read the writer's output");
            if let Some(n) = line.strip_prefix("ACK ") {
                let n: u64 = n.parse().expect("ACK number");
                last_ack = Some(n);
                if n >= 150 {
                    break;
                }
            }
        }
        let last_ack = last_ack.expect("the writer acknowledged puts");
        // SIGKILL while the writer is inside its next puts.
        child.0.kill().expect("kill the writer");
        let status = child.0.wait().expect("reap the writer");
        assert!(!status.success(), "the writer was killed, not finished");

        let records = open(dir.path()).load_all().await.expect("load");
        let (counter, vms): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| r.snapshot.id.as_str() == "counter");
        let counter_gen = counter.first().expect("counter record").snapshot.generation;
        assert!(
            counter_gen >= last_ack,
            "counter {counter_gen} < acknowledged {last_ack}"
        );
        let gens: Vec<u64> = vms.iter().map(|r| r.snapshot.generation).collect();
        // Every acknowledged put is there, in order, with nothing invented:
        // at most the put in flight at the kill got committed on top.
        assert!(
            gens.len() as u64 > last_ack,
            "{} records, acknowledged {last_ack}",
            gens.len()
        );
        assert_eq!(gens, (0..gens.len() as u64).collect::<Vec<_>>());
        for r in &vms {
            let n = r.snapshot.generation;
            assert_eq!(r.snapshot.id.as_str(), format!("vm-{n:08}"));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put(Box<VmRecord>),
        Remove(VmId),
    }

    const POOL: [&str; 6] = ["a", "b", "vm-1", "vm-10", "vm-2", "Z"];

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,12}"
    }

    fn arb_config() -> impl Strategy<Value = VmConfig> {
        (
            any::<i32>(),
            proptest::option::of((any::<i32>(), any::<i32>(), any::<i32>())),
            any::<i64>(),
            any::<bool>(),
            text(),
            prop::collection::btree_map(text(), text(), 0..4),
            prop::collection::vec((text(), text(), any::<bool>()), 0..3),
            prop::collection::vec((text(), text()), 0..3),
        )
            .prop_map(
                |(vcpus, topo, mem, flag, args, metadata, disks, nics)| VmConfig {
                    cpu: CpuConfig {
                        vcpu_count: vcpus,
                        max_vcpu_count: vcpus.wrapping_add(1),
                        topology: topo.map(|(s, c, t)| CpuTopology {
                            sockets: s,
                            cores_per_socket: c,
                            threads_per_core: t,
                        }),
                        features: metadata.clone(),
                    },
                    memory: MemoryConfig {
                        size_bytes: mem,
                        hotplug_enabled: flag,
                        max_size_bytes: mem.wrapping_mul(2),
                        backing: BTreeMap::new(),
                    },
                    boot: BootConfig {
                        kernel_path: args.clone(),
                        initrd_path: String::new(),
                        kernel_args: args,
                        boot_options: BTreeMap::new(),
                    },
                    storage: disks
                        .into_iter()
                        .map(|(id, path, ro)| StorageDevice {
                            id,
                            path,
                            read_only: ro,
                            is_root_device: !ro,
                            interface_type: String::new(),
                            options: BTreeMap::new(),
                        })
                        .collect(),
                    network: nics
                        .into_iter()
                        .map(|(id, tap)| NetworkInterface {
                            id,
                            mac_address: String::new(),
                            tap_device: tap,
                            interface_type: String::new(),
                            options: BTreeMap::new(),
                        })
                        .collect(),
                    console: ConsoleConfig {
                        enabled: flag,
                        output: String::new(),
                        input: String::new(),
                        console_type: String::new(),
                    },
                    metadata,
                    restart_policy: if flag {
                        crate::domain::restart::RestartPolicy::Always
                    } else {
                        crate::domain::restart::RestartPolicy::Unspecified
                    },
                },
            )
    }

    fn arb_record() -> impl Strategy<Value = VmRecord> {
        (
            prop::sample::select(&POOL[..]),
            arb_config(),
            prop::sample::select(&VmState::ALL[..]),
            prop::sample::select(&ALL_DESIRED[..]),
            text(),
            0..=i64::MAX,
            any::<i64>(),
            any::<i64>(),
            proptest::option::of((any::<u32>(), 0..=i64::MAX, text())),
        )
            .prop_map(
                |(id, config, state, desired, reason, generation, created, modified, process)| {
                    VmRecord {
                        snapshot: VmSnapshot {
                            id: VmId::parse(id).expect("pool ids are valid"),
                            config,
                            state,
                            reason,
                            generation: generation.unsigned_abs(),
                            created_at: created,
                            modified_at: modified,
                            desired,
                            deleted: false,
                            // Revisions are stored like generations (non-negative i64).
                            revision: generation.unsigned_abs() / 2,
                        },
                        process: process.map(|(pid, start, socket)| VmmProcess {
                            pid,
                            start_time: start.unsigned_abs(),
                            socket_path: socket,
                        }),
                    }
                },
            )
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => arb_record().prop_map(|r| Op::Put(Box::new(r))),
            1 => prop::sample::select(&POOL[..])
                .prop_map(|id| Op::Remove(VmId::parse(id).expect("pool ids are valid"))),
        ]
    }

    proptest! {
        // Every put and remove is an fsync'd transaction; keep the case count modest.
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_puts_and_removes_match_a_map_and_survive_reopening(
            ops in prop::collection::vec(arb_op(), 0..24)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let dir = tempfile::tempdir().expect("tempdir");
            let mut model: BTreeMap<VmId, VmRecord> = BTreeMap::new();
            let (live, reopened) = rt.block_on(async {
                let store = open(dir.path());
                for op in ops {
                    match op {
                        Op::Put(rec) => {
                            store.put(&rec).await.expect("put");
                            model.insert(rec.snapshot.id.clone(), *rec);
                        }
                        Op::Remove(id) => {
                            store.remove(&id, 0).await.expect("remove");
                            model.remove(&id);
                        }
                    }
                }
                let live = store.load_all().await.expect("load");
                drop(store);
                let reopened = open(dir.path()).load_all().await.expect("load after reopen");
                (live, reopened)
            });
            let expected: Vec<VmRecord> = model.into_values().collect();
            prop_assert_eq!(&live, &expected);
            prop_assert_eq!(&reopened, &expected);
        }
    }
}
