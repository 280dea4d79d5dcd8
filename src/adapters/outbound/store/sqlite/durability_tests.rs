//! What a write survives: the fsync level each kind of write runs with,
//! and a writer killed with -9 mid-write (in a child process) that loses
//! no acknowledged write, synced or not.

use std::io;
use std::path::Path;
use std::process::Command;

use super::tests::{open, record};
use super::{SqliteStore, Sync};
use crate::domain::VmId;
use crate::ports::VmStore;

/// The fsync level a write ran with, as SQLite reports it (1 NORMAL, 2 FULL),
/// checked against the level the store believes it set (it sets the pragma
/// only when a write needs another level).
fn synchronous(store: &SqliteStore) -> i64 {
    let conn = store.inner.conn.lock().expect("lock");
    let level: i64 = conn
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .expect("pragma");
    let believed = match conn.sync {
        Sync::Normal => 1,
        Sync::Full => 2,
    };
    assert_eq!(level, believed, "the tracked level is the connection's");
    level
}

#[tokio::test]
async fn intents_are_synced_and_observations_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    store
        .put_unsynced(&record("vm-1"))
        .await
        .expect("put_unsynced");
    assert_eq!(
        synchronous(&store),
        1,
        "an observation commits without an fsync"
    );
    store.put(&record("vm-2")).await.expect("put");
    assert_eq!(synchronous(&store), 2, "an intent is synced at commit");
    for _ in 0..2 {
        store
            .put_unsynced(&record("vm-1"))
            .await
            .expect("put_unsynced");
        assert_eq!(synchronous(&store), 1, "back to no fsync, and it stays");
    }
    store
        .remove(&VmId::parse("vm-1").expect("id"), 7)
        .await
        .expect("remove");
    assert_eq!(synchronous(&store), 2, "a remove is synced at commit");
    let ids: Vec<_> = open(dir.path())
        .load_all()
        .await
        .expect("load")
        .into_iter()
        .map(|r| r.snapshot.id.to_string())
        .collect();
    assert_eq!(ids, ["vm-2"]);
}

/// Set in the child process of the kill test: the data dir it writes to.
const KILL_CHILD_DIR: &str = "VMCP_TEST_SQLITE_KILL_CHILD_DIR";
const KILL_TEST: &str = "adapters::outbound::store::sqlite::durability_tests::a_writer_killed_mid_write_loses_no_acknowledged_put";

/// The child side: puts records as fast as it can and prints `ACK <n>`
/// after put `n` returned, until it is killed. The counter is written
/// unsynced (as observations are): a kill of the writer must not lose it
/// either.
async fn write_until_killed(dir: &Path) {
    let store = open(dir);
    let mut counter = record("counter");
    for n in 0u64.. {
        let mut rec = record(&format!("vm-{n:08}"));
        rec.snapshot.generation = n;
        store.put(&rec).await.expect("child put");
        counter.snapshot.generation = n;
        store.put_unsynced(&counter).await.expect("child put");
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
