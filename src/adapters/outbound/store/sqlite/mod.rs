//! The durable `VmStore`: one SQLite file, `vmcp.db`, in VMCP's data
//! directory, so VM records survive restarts and crashes and the next start
//! can re-adopt or reconcile every VM. Every write is a transaction in WAL
//! mode, committed when it returns; the fsync is chosen per write:
//!
//! - `put` and `remove` run with `synchronous=FULL`: the WAL is synced at
//!   commit, so the write (and every earlier one) survives a power loss.
//!   Intents (create, each command's desired state, delete) are written so,
//!   before VMCP acts.
//! - `put_unsynced` runs with `synchronous=NORMAL`: the commit reaches the
//!   OS (a kill -9 of VMCP cannot lose it) without an fsync; the next synced
//!   write, `sync` or checkpoint makes it durable. When the connection is
//!   free, the caller commits on its own thread: without an fsync a commit
//!   is a WAL append (~50 µs here), cheaper than the two thread hand-offs of
//!   the blocking pool, which a busy host makes far slower. When it is busy,
//!   the record is group-committed instead, so no runtime thread ever waits
//!   for the lock: records queued while a transaction runs are written
//!   together in the next one (each caller is answered when its record is
//!   committed), so many owners recording at once share transactions
//!   instead of queueing for the connection one by one.
//! - Checkpoints run on the blocking pool every [`CHECKPOINT_EVERY`]
//!   commits, before SQLite's own (1,000 WAL pages) would run inside a
//!   commit on a runtime thread; SQLite's stays as the backstop.
//! - `sync` flushes the WAL file (`fdatasync` on its own descriptor, outside
//!   the connection's lock, so writers go on). Syncs are grouped too: one
//!   `fdatasync` answers every caller that asked before it started. A
//!   checkpoint syncs the WAL before copying it and the database after, so
//!   a frame a checkpoint moved is durable too.
//!
//! The owner writes intents unsynced *before* acting (enough for a crash)
//! and syncs *while* the VMM acts, before it answers: an fsync protects
//! what a client was told, and costs no time on the critical path.
//!
//! The file is checked at open (application id, schema version, `PRAGMA
//! integrity_check`) and a damaged, foreign or newer file stops start-up
//! with a message naming it; nothing is ever reset silently. One row per VM, with the searchable parts as columns and the config as
//! strict JSON. SQLite calls block, so apart from the unsynced commits
//! above they run on tokio's blocking pool, over one connection behind a
//! mutex.
//!
//! Opening and its checks are in `open`, the schema's migrations in
//! `migrations`, a record's columns in `row` (with the config's JSON in
//! `config_json`); this module is the store itself.

pub mod config_json;
#[cfg(test)]
mod durability_tests;
mod group;
mod migrations;
mod open;
mod row;
mod snapshots;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod write_path_tests;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};

use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use tokio::sync::oneshot;

use self::group::Group;
pub use self::migrations::SCHEMA_VERSION;
pub use self::open::{DB_FILE_NAME, StoreOpenError};
use self::row::Row;
use crate::domain::VmId;
use crate::domain::snapshot::{SnapshotId, SnapshotRecord};
use crate::ports::{StoreError, VmRecord, VmStore};

/// Raises the stored high-water revision to `revision` (never lowers it).
fn raise_revision(tx: &Connection, revision: u64) -> rusqlite::Result<()> {
    let revision = i64::try_from(revision).unwrap_or(i64::MAX);
    tx.prepare_cached("UPDATE meta SET value = max(value, ?1) WHERE key = 'revision'")?
        .execute([revision])
        .map(drop)
}

/// Commits between two checkpoints. A commit of one record appends two or
/// three pages to the WAL, so this stays below SQLite's automatic
/// checkpoint (1,000 pages), which would run inside a commit.
pub const CHECKPOINT_EVERY: u32 = 256;

/// VM records in a SQLite file; cheap to clone (clones share the connection).
/// Writes are serialized; a `put` or `remove` whose future is dropped still
/// runs to completion (commit or rollback) on the blocking pool.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Db>,
    /// Unsynced writes waiting to be group-committed.
    writes: Group<Queued>,
    /// Callers waiting for the WAL to be flushed.
    syncs: Group<Answer>,
    /// Commits since the last checkpoint.
    commits: AtomicU32,
    /// A checkpoint is queued or runs on the blocking pool.
    checkpointing: AtomicBool,
    /// Checkpoints run so far.
    checkpoints: AtomicU32,
}

impl Inner {
    /// Counts `n` commits; once [`CHECKPOINT_EVERY`] have gone by, one
    /// caller starts a checkpoint on the blocking pool.
    fn committed(self: &Arc<Self>, n: u32) {
        let since = self.commits.fetch_add(n, Ordering::Relaxed) + n;
        if since >= CHECKPOINT_EVERY && !self.checkpointing.swap(true, Ordering::AcqRel) {
            let inner = Arc::clone(self);
            tokio::task::spawn_blocking(move || inner.checkpoint());
        }
    }

    /// Copies the WAL into the database (PASSIVE: it never waits for a
    /// writer); a failure is logged, and SQLite's own checkpoint stays the
    /// backstop.
    fn checkpoint(&self) {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        self.commits.store(0, Ordering::Relaxed);
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        drop(conn);
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.checkpointing.store(false, Ordering::Release);
        if let Err(e) = done {
            tracing::warn!(path = %self.path.display(), error = %e, "store checkpoint failed; SQLite's own checkpoint takes over");
        }
    }
}

/// Where a caller waits for its write's or sync's outcome.
type Answer = oneshot::Sender<Result<(), StoreError>>;

/// A record waiting to be group-committed (with its revision), and who waits for it.
type Queued = (Row, u64, Answer);

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
        let (path, conn) = open::connect(data_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(Db {
                    conn,
                    sync: Sync::Full,
                }),
                writes: Group::new(),
                syncs: Group::new(),
                commits: AtomicU32::new(0),
                checkpointing: AtomicBool::new(false),
                checkpoints: AtomicU32::new(0),
            }),
        })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A snapshot marked deleted is removed rather than stored: its delete has
    /// completed, and storing it would bring it back at the next start.
    async fn upsert(&self, record: &VmRecord, sync: Sync) -> Result<(), StoreError> {
        if record.snapshot.deleted {
            return self
                .remove(&record.snapshot.id, record.snapshot.revision)
                .await;
        }
        let row = Row::encode(record)?;
        let revision = record.snapshot.revision;
        if sync == Sync::Normal {
            if let Some(written) = self.write_here(&row, revision) {
                return written;
            }
            return self
                .grouped(|i| &i.writes, |answer| (row, revision, answer), write_batch)
                .await
                .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))?;
        }
        self.blocking(move |conn, path| write_one(conn, sync, path, &row, revision))
            .await
    }

    /// Commits `row` unsynced on the caller's thread if nobody holds the
    /// connection; None when somebody does (a batch, a synced write, a
    /// checkpoint): the caller queues instead of waiting for the lock.
    fn write_here(&self, row: &Row, revision: u64) -> Option<Result<(), StoreError>> {
        let mut conn = match self.inner.conn.try_lock() {
            Ok(conn) => conn,
            // As in `blocking`: a panic cannot have left a transaction open.
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        let written = write_one(&mut conn, Sync::Normal, &self.inner.path, row, revision);
        drop(conn);
        self.inner.committed(1);
        Some(written)
    }

    /// Queues an item made with its answer's sender on the group `of` the
    /// store, starting a worker on the blocking pool (which hands each batch
    /// to `handle`) when none runs, and waits for the answer; `Err` when the
    /// worker stopped without answering.
    async fn grouped<T: Send + 'static>(
        &self,
        of: fn(&Inner) -> &Group<T>,
        item: impl FnOnce(Answer) -> T,
        handle: fn(&Arc<Inner>, Vec<T>),
    ) -> Result<Result<(), StoreError>, oneshot::error::RecvError> {
        let (tx, rx) = oneshot::channel();
        if of(&self.inner).push(item(tx)) {
            let inner = Arc::clone(&self.inner);
            tokio::task::spawn_blocking(move || {
                of(&inner).work(|batch| handle(&inner, batch));
            });
        }
        rx.await
    }

    /// Runs `f` on the connection on tokio's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db, &Path) -> Result<T, StoreError> + Send + 'static,
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
    async fn put(&self, record: &VmRecord) -> Result<(), StoreError> {
        self.upsert(record, Sync::Full).await
    }

    async fn put_unsynced(&self, record: &VmRecord) -> Result<(), StoreError> {
        self.upsert(record, Sync::Normal).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.grouped(|i| &i.syncs, |answer| answer, sync_batch)
            .await
            .map_err(|_| StoreError::Unavailable("the store's sync stopped".into()))?
    }

    async fn remove(&self, id: &VmId, revision: u64) -> Result<(), StoreError> {
        let id = id.as_str().to_owned();
        self.blocking(move |conn, path| {
            write(conn, Sync::Full, |tx| {
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
                            modified_at, vmm_pid, vmm_start_time, socket_path, revision,
                            diff_parent, diff_vmm_pid, diff_vmm_start_time
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

    async fn put_snapshot(&self, record: &SnapshotRecord) -> Result<(), StoreError> {
        self.put_snapshot_row(record).await
    }

    async fn remove_snapshot(&self, id: &SnapshotId) -> Result<(), StoreError> {
        self.remove_snapshot_row(id).await
    }

    async fn load_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.load_snapshot_rows().await
    }
}

/// SQLite's write-ahead log of the database at `db`.
fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// The store's connection, and the `synchronous` level it was last given
/// (open leaves it at FULL): a write sets the level only when it needs
/// another. Setting it is a statement of its own, parsed each time; it
/// cannot be a cached statement, because SQLite applies the pragma when it
/// is prepared, not when it runs.
struct Db {
    conn: Connection,
    sync: Sync,
}

impl Deref for Db {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Db {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// How far a write's commit goes (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// The WAL is synced at commit: survives a power loss.
    Full,
    /// The commit reaches the OS, not the disk: survives a crash of VMCP.
    Normal,
}

/// Inserts or replaces the VM row `row`.
fn upsert_row(tx: &Connection, row: &Row) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO vms (id, config, desired, state, reason, generation,
                          created_at, modified_at, vmm_pid, vmm_start_time, socket_path,
                          revision, diff_parent, diff_vmm_pid, diff_vmm_start_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
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
            revision = excluded.revision,
            diff_parent = excluded.diff_parent,
            diff_vmm_pid = excluded.diff_vmm_pid,
            diff_vmm_start_time = excluded.diff_vmm_start_time",
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
        row.diff_parent,
        row.diff_vmm_pid,
        row.diff_vmm_start_time,
    ])
    .map(drop)
}

/// Commits a batch of queued records in one transaction and answers each
/// waiter. When the batch fails, its records are retried one per
/// transaction, so each waiter gets its own record's outcome.
fn write_batch(inner: &Arc<Inner>, batch: Vec<Queued>) {
    let mut conn = inner.conn.lock().unwrap_or_else(PoisonError::into_inner);
    let top = batch
        .iter()
        .map(|(_, revision, _)| *revision)
        .max()
        .unwrap_or(0);
    let together = write(&mut conn, Sync::Normal, |tx| {
        for (row, _, _) in &batch {
            upsert_row(tx, row)?;
        }
        raise_revision(tx, top)
    });
    inner.committed(if together.is_ok() {
        1
    } else {
        // A failed batch is retried one record per transaction.
        u32::try_from(batch.len()).unwrap_or(u32::MAX)
    });
    match together {
        Ok(()) => {
            for (_, _, done) in batch {
                let _ = done.send(Ok(()));
            }
        }
        Err(e) if batch.len() == 1 => {
            let (row, _, done) = batch.into_iter().next().expect("one");
            let _ = done.send(Err(write_error(&inner.path, "write", &row.id, &e)));
        }
        Err(_) => {
            for (row, revision, done) in batch {
                let _ = done.send(write_one(
                    &mut conn,
                    Sync::Normal,
                    &inner.path,
                    &row,
                    revision,
                ));
            }
        }
    }
}

/// Writes `row` (with `revision`) in a transaction of its own.
fn write_one(
    conn: &mut Db,
    sync: Sync,
    path: &Path,
    row: &Row,
    revision: u64,
) -> Result<(), StoreError> {
    write(conn, sync, |tx| {
        upsert_row(tx, row)?;
        raise_revision(tx, revision)
    })
    .map_err(|e| write_error(path, "write", &row.id, &e))
}

/// Flushes the WAL once for every waiter of the batch (each one's commit
/// came before this flush starts) and answers them all.
fn sync_batch(inner: &Arc<Inner>, waiters: Vec<Answer>) {
    let outcome = sync_wal(&inner.path);
    for waiter in waiters {
        let _ = waiter.send(outcome.clone());
    }
}

/// Flushes the WAL of the database at `db` to disk.
fn sync_wal(db: &Path) -> Result<(), StoreError> {
    match std::fs::File::open(wal_path(db)) {
        Ok(f) => f.sync_data(),
        // No WAL: every commit is in the database file, synced by the
        // checkpoint that emptied the WAL.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| StoreError::Unavailable(format!("cannot sync {}: {e}", db.display())))
}

/// Runs `f` in an immediate transaction and commits with `sync`; on any
/// error the transaction is rolled back (by `Transaction`'s drop) and
/// nothing changes.
fn write<F>(db: &mut Db, sync: Sync, f: F) -> rusqlite::Result<()>
where
    F: FnOnce(&Connection) -> rusqlite::Result<()>,
{
    // Not inside a transaction: SQLite ignores the pragma there.
    if db.sync != sync {
        let level = match sync {
            Sync::Full => "FULL",
            Sync::Normal => "NORMAL",
        };
        db.conn.pragma_update(None, "synchronous", level)?;
        db.sync = sync;
    }
    let tx = db
        .conn
        .transaction_with_behavior(TransactionBehavior::Immediate)?;
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
