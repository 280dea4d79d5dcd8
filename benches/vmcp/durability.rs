//! Durability: how long a restarted VMCP takes to re-adopt 50 live Cloud
//! Hypervisor VMs from the SQLite store before it serves, and what one stored
//! VM costs in memory and on disk at 10,000 records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcp::adapters::outbound::cloud_hypervisor::CloudHypervisor;
use vmcp::adapters::outbound::otel::process::read_rss_bytes;
use vmcp::adapters::outbound::store::sqlite::SqliteStore;
use vmcp::app::wiring::start;
use vmcp::ports::VmStore;
use vmcp::proto::vmm::v1 as pb;

use super::client;
use super::vmm::{Kind, create_req, env, options, runtime_dir, serve};

const VMS: usize = 50;
const RECORDS: usize = 10_000;

/// Section 5a: restart with 50 VMs to re-adopt.
pub async fn readopt() {
    println!();
    println!(
        "== Durability: restart with {VMS} live cloud-hypervisor VMs to re-adopt (SQLite store) =="
    );
    let Some(env) = env(Kind::Ch, "durability restart", true) else {
        return;
    };
    let rt = runtime_dir();
    let data = tempfile::Builder::new()
        .prefix("vbd")
        .tempdir_in("/tmp")
        .unwrap();
    let store = Arc::new(SqliteStore::open(data.path()).expect("store"));
    let running = serve(Kind::Ch, &env, rt.path(), store).await;
    let c = client(running.local_addr, false);
    let t = Instant::now();
    for i in 0..VMS {
        c.create_vm(create_req(&format!("r{i:02}"), &env.guest))
            .await
            .expect("create");
    }
    let created = t.elapsed();
    running.shutdown().await;
    let vmm_pids: Vec<u32> = vmcp::adapters::outbound::vmm::discovery::scan(rt.path())
        .map(|f| {
            f.into_iter()
                .filter_map(|f| f.process)
                .map(|p| p.pid)
                .collect()
        })
        .unwrap_or_default();
    println!(
        "created {VMS} VMs (not booted, 64 MiB) in {:.2} s; server stopped, {} VMM processes left running",
        created.as_secs_f64(),
        vmm_pids.len()
    );

    let t = Instant::now();
    let store = Arc::new(SqliteStore::open(data.path()).expect("store reopens"));
    let ch = CloudHypervisor::new(&env.binary, rt.path(), Duration::from_secs(10));
    let running = start(Arc::new(ch), store, options())
        .await
        .expect("restart");
    let restart = t.elapsed();
    let c = client(running.local_addr, false);
    let listed = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    let adopted = listed
        .vms
        .iter()
        .filter(|v| v.state.as_known() == Some(pb::VmState::VM_STATE_CREATED))
        .count();
    println!(
        "restart (store open + adapter + start until it returns, recovery included): {:.1} ms for {VMS} VMs = {:.2} ms/VM; {adopted}/{} listed VMs back in Created",
        restart.as_secs_f64() * 1e3,
        restart.as_secs_f64() * 1e3 / VMS as f64,
        listed.vms.len()
    );
    for i in 0..VMS {
        let _ = c
            .delete_vm(pb::DeleteVmRequest {
                vm_id: format!("r{i:02}"),
                ..Default::default()
            })
            .await;
    }
    running.shutdown().await;
    // Anything the deletes missed is killed by pid.
    for pid in vmm_pids {
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Section 5b: memory and disk per stored VM at 10,000 records.
pub async fn per_record() {
    let data = tempfile::Builder::new()
        .prefix("vbm")
        .tempdir_in("/tmp")
        .unwrap();
    let file = {
        // One real record, written by VMCP through the double, then copied 9,999 times in one
        // SQL transaction (10,000 fsync'd puts would measure the disk, not the store).
        let store = Arc::new(SqliteStore::open(data.path()).expect("store"));
        let d = Arc::new(super::double::Double::new());
        let running = start(d, Arc::clone(&store), options())
            .await
            .expect("start");
        let c = client(running.local_addr, false);
        c.create_vm(create_req(
            "m00000",
            std::path::Path::new("/var/lib/vmcp/images/vmlinux-6.1"),
        ))
        .await
        .expect("create");
        running.shutdown().await;
        store.path().to_owned()
    };
    {
        let mut conn = rusqlite::Connection::open(&file).unwrap();
        // Every column but the id, as the store's schema has them now.
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('vms') WHERE name <> 'id' ORDER BY cid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let columns = columns.join(", ");
        let tx = conn.transaction().unwrap();
        {
            let mut stmt = tx
                .prepare(&format!(
                    "INSERT INTO vms (id, {columns}) SELECT ?1, {columns} \
                     FROM vms WHERE id = 'm00000'"
                ))
                .unwrap();
            for i in 1..RECORDS {
                stmt.execute([format!("m{i:05}")]).unwrap();
            }
        }
        tx.commit().unwrap();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .unwrap();
    }
    let bytes = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let store = SqliteStore::open(data.path()).expect("store opens");
    let before = read_rss_bytes().unwrap_or(0);
    let t = Instant::now();
    let records = store.load_all().await.expect("load_all");
    let took = t.elapsed();
    let after = read_rss_bytes().unwrap_or(0);
    assert_eq!(records.len(), RECORDS);
    let growth = after.saturating_sub(before);
    println!(
        "load_all of {} records: {:.1} ms; RSS {:.1} MiB -> {:.1} MiB, growth {:.1} MiB = {:.0} bytes/VM",
        records.len(),
        took.as_secs_f64() * 1e3,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        growth as f64 / 1048576.0,
        growth as f64 / RECORDS as f64
    );
    println!(
        "store file {:.2} MiB = {:.0} bytes/VM on disk",
        bytes as f64 / 1048576.0,
        bytes as f64 / RECORDS as f64
    );
    drop(records);
}
