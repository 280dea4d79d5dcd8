//! Tests of the SQLite store: round trips, durability, open-time checks and a
//! model-based property test that reopens the store.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use proptest::prelude::*;

use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rusqlite::{Connection, params};

use super::migrations::{APPLICATION_ID, migrate_to_v1};
use super::row::ALL_DESIRED;
use super::*;
use crate::domain::lifecycle::Desired;
use crate::domain::snapshot::{DiffParent, SnapshotId};
use crate::domain::{
    BootConfig, ConsoleConfig, CpuConfig, CpuTopology, MemoryConfig, NetworkInterface,
    StorageDevice, VmConfig,
};
use crate::domain::{VmSnapshot, VmState};
use crate::ports::VmmProcess;

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
            track_dirty_pages: true,
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
            bridge: "br0".into(),
            guest_address: Some(vmcp_guest_address()),
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

pub(super) fn record(id: &str) -> VmRecord {
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
        diff_parent: Some(DiffParent {
            snapshot_id: SnapshotId::parse("diff_parent", "warm-1").expect("valid id"),
            vmm_pid: 4_000_000_000,
            vmm_start_time: 123_456_789,
        }),
    }
}

pub(super) fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir).expect("store opens")
}

pub(super) fn ids(records: &[VmRecord]) -> Vec<String> {
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
    assert_eq!(
        records[0].diff_parent, None,
        "no diff parent before version 4"
    );
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
    assert_eq!(SCHEMA_VERSION, 4);
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
                    track_dirty_pages: !flag,
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
                        // Managed or not, by the tap's first letter: both kinds round-trip.
                        bridge: if tap.starts_with('a') {
                            "br0".to_owned()
                        } else {
                            String::new()
                        },
                        tap_device: tap,
                        interface_type: String::new(),
                        options: BTreeMap::new(),
                        guest_address: None,
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
        proptest::option::of((prop::sample::select(&POOL[..]), any::<u32>(), 0..=i64::MAX)),
    )
        .prop_map(
            |(id, config, state, desired, reason, generation, created, modified, process, diff)| {
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
                    diff_parent: diff.map(|(snapshot, pid, start)| DiffParent {
                        snapshot_id: SnapshotId::parse("diff_parent", snapshot)
                            .expect("pool ids are valid"),
                        vmm_pid: pid,
                        vmm_start_time: start.unsigned_abs(),
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

fn vmcp_guest_address() -> crate::domain::GuestAddress {
    crate::domain::GuestAddress {
        address: "10.0.0.2/24".into(),
        gateway: "10.0.0.1".into(),
        dns: vec!["10.0.0.53".into()],
    }
}
