//! How unsynced writes reach the connection: in place when it is free,
//! group-committed when it is busy (a refused record failing alone),
//! syncs sharing flushes, and checkpoints on the blocking pool.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::Connection;

use super::group::Group;
use super::tests::{ids, open, record};
use super::{CHECKPOINT_EVERY, Queued, SqliteStore};
use crate::ports::VmStore;

/// Holds the store's connection on another thread until the returned
/// sender sends (or is dropped); returns once it is held.
fn hold_connection(
    store: &SqliteStore,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let inner = Arc::clone(&store.inner);
    let holder = std::thread::spawn(move || {
        let _busy = inner.conn.lock().expect("connection");
        held_tx.send(()).expect("held");
        let _ = release_rx.recv();
    });
    held.recv().expect("the connection is held");
    (release, holder)
}

/// Unsynced writes queued while the connection is busy are committed
/// together; when such a batch fails, each record is retried alone, so one
/// refused record fails only its own writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_commit_together_and_a_refused_one_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    Connection::open(store.path())
        .expect("second connection")
        .execute_batch(
            "CREATE TRIGGER refuse_bad BEFORE INSERT ON vms WHEN NEW.id = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .expect("trigger");
    // The connection is busy (held by another thread) until `release`.
    let (release, holder) = hold_connection(&store);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let wait_for = |what: &str, done: &dyn Fn(&Group<Queued>) -> bool| {
        assert!(std::time::Instant::now() < deadline, "{what}");
        done(&store.inner.writes)
    };
    let mut writers = Vec::new();
    for i in 0..12u64 {
        let id = if i == 7 {
            "bad".to_owned()
        } else {
            format!("vm-{i:02}")
        };
        let mut rec = record(&id);
        rec.snapshot.revision = 100 + i;
        let store = store.clone();
        writers.push((
            id,
            tokio::spawn(async move { store.put_unsynced(&rec).await }),
        ));
        if i == 0 {
            // The writer has taken the first record and waits for the connection.
            while !wait_for("the first batch was never taken", &|q| {
                q.running() && q.queued() == 0
            }) {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
    }
    // The other eleven queue behind it, to be committed together.
    while !wait_for("the writes never queued", &|q| q.queued() == 11) {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    release.send(()).expect("release");
    holder.join().expect("holder");
    for (id, writer) in writers {
        let outcome = writer.await.expect("writer task");
        if id == "bad" {
            let err = outcome.expect_err("the refused record fails");
            assert!(err.to_string().contains("bad"), "{err}");
        } else {
            outcome.unwrap_or_else(|e| panic!("{id}: {e}"));
        }
    }
    let stored = store.load_all().await.expect("load");
    let want: Vec<String> = (0..12)
        .filter(|i| *i != 7)
        .map(|i| format!("vm-{i:02}"))
        .collect();
    assert_eq!(ids(&stored), want);
    assert_eq!(store.revision().await.expect("revision"), 111);
    assert_eq!(
        store.inner.writes.batches(),
        2,
        "the first record, then the other eleven"
    );
    assert!(
        stops(|| store.inner.writes.running()).await,
        "the writer stopped"
    );
}

/// Whether a group's worker stops within 5 s. It answers its last caller
/// before it finds the queue empty and stops, so a caller that has its
/// answer may still see it running for a moment.
async fn stops(running: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while running() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    true
}

/// Syncs asked for at once share flushes, and each caller is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_syncs_are_answered_and_share_flushes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let callers: Vec<_> = (0..16)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.put_unsynced(&record(&format!("vm-{i:02}"))).await?;
                store.sync().await
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller").expect("written and synced");
    }
    let flushes = store.inner.syncs.batches();
    assert!(
        (1..=16).contains(&flushes),
        "{flushes} flushes for 16 syncs"
    );
    assert!(
        stops(|| store.inner.syncs.running()).await,
        "the flusher stopped"
    );
    assert_eq!(store.load_all().await.expect("load").len(), 16);
}

/// On a free connection an unsynced write commits on the caller's thread:
/// no batch, no worker, and the record is committed when the call returns.
#[tokio::test(flavor = "current_thread")]
async fn an_unsynced_write_on_a_free_connection_commits_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    for i in 0..5 {
        store
            .put_unsynced(&record(&format!("vm-{i}")))
            .await
            .expect("written");
    }
    assert_eq!(
        store.inner.writes.batches(),
        0,
        "no group commit was needed"
    );
    assert!(!store.inner.writes.running(), "no writer was started");
    let other = Connection::open(store.path()).expect("second connection");
    let committed: i64 = other
        .query_row("SELECT count(*) FROM vms", [], |r| r.get(0))
        .expect("count");
    assert_eq!(committed, 5, "committed, visible to another connection");
}

/// While the connection is held elsewhere, an unsynced write queues for
/// the group writer instead of waiting for the lock: the runtime's only
/// thread keeps running other tasks, and the write lands once released.
#[tokio::test(flavor = "current_thread")]
async fn an_unsynced_write_never_waits_for_the_lock_on_a_runtime_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let (release, holder) = hold_connection(&store);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move { store.put_unsynced(&record("vm-queued")).await })
    };
    // This thread is the runtime: had the write blocked on the lock, the
    // timer below could never fire.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!writer.is_finished(), "the write waits for the connection");
    assert!(store.inner.writes.running(), "it went to the group writer");
    release.send(()).expect("release");
    holder.join().expect("holder");
    writer.await.expect("writer task").expect("written");
    assert_eq!(store.inner.writes.batches(), 1);
    assert_eq!(ids(&store.load_all().await.expect("load")), ["vm-queued"]);
}

/// Every CHECKPOINT_EVERY commits a checkpoint runs on the blocking pool,
/// so the WAL is copied back long before SQLite's own checkpoint (1,000
/// pages) would run inside a commit. Commits made while a checkpoint waits
/// for the connection are in the WAL it copies, so the count starts again
/// when it runs: the second one comes within about two periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_run_on_the_pool_every_so_many_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let checkpoints = || store.inner.checkpoints.load(Ordering::Relaxed);
    let mut commits = 0u32;
    let mut first = None;
    while checkpoints() < 2 {
        assert!(
            commits < CHECKPOINT_EVERY * 4,
            "{} checkpoints after {commits} commits",
            checkpoints()
        );
        commits += 1;
        let mut rec = record(&format!("vm-{}", commits % 50));
        rec.snapshot.revision = u64::from(commits);
        store.put_unsynced(&rec).await.expect("written");
        if first.is_none() && checkpoints() == 1 {
            first = Some(commits);
        }
        // A checkpoint runs on another thread: give it a moment now and then.
        if commits.is_multiple_of(32) {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }
    let first = first.unwrap_or(commits);
    assert!(
        first >= CHECKPOINT_EVERY,
        "the first checkpoint came after {first} commits"
    );
    // One more commit after the last checkpoint restarts the WAL from its start.
    let mut rec = record("vm-last");
    rec.snapshot.revision = u64::from(commits) + 1;
    store.put_unsynced(&rec).await.expect("written");
    let other = Connection::open(store.path()).expect("second connection");
    let (log, moved): (i64, i64) = other
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .expect("checkpoint");
    assert!(
        log < i64::from(CHECKPOINT_EVERY),
        "{log} WAL frames since the last restart ({moved} copied now)"
    );
    assert_eq!(
        store.revision().await.expect("revision"),
        u64::from(commits) + 1
    );
    assert_eq!(store.load_all().await.expect("load").len(), 51);
}
