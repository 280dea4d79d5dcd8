//! Opening the store file: the data directory (0700) and the file (0600)
//! made durable, then the file checked before anything is written to it
//! (application id, schema version, `PRAGMA integrity_check`), switched to
//! WAL with `synchronous=FULL`, and migrated. A damaged, foreign or newer
//! file is refused with a [`StoreOpenError`] naming it; nothing is reset.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};

use super::migrations::{APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION};

/// The store's file name inside the data directory.
pub const DB_FILE_NAME: &str = "vmcp.db";

/// How long a statement waits for a lock held by another connection (an
/// operator's `sqlite3` shell, say) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Most problems `integrity_check` lists in an open error.
const MAX_CHECK_LINES: i64 = 10;

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

/// Opens (creating if needed) `data_dir/vmcp.db`, checks it and migrates it
/// to [`SCHEMA_VERSION`]; returns the file's path and the connection.
pub(super) fn connect(data_dir: &Path) -> Result<(PathBuf, Connection), StoreOpenError> {
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
    // Each write chooses FULL or NORMAL (see `SqliteStore::put_unsynced`);
    // FULL until one does.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite)?;
    migrate(&mut conn, &path, version)?;
    Ok((path, conn))
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
