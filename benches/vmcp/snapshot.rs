//! Snapshots (issue 16), on the real VMMs with the tiny guest: snapshot time
//! and size for a 128 MiB and a 1 GiB VM, restore-to-Running through VMCP vs
//! create+boot through VMCP, and VMCP's restore vs the same restore done
//! directly on the VMM's API (a fresh process, `PUT /snapshot/load`).
//! Cloud Hypervisor cannot snapshot on a nested-KVM host; the section then
//! says SKIPPED with the VMM's own reason.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcp::adapters::outbound::store::memory::MemoryStore;
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::app::manager::snapshots::SnapshotSettings;
use vmcp::domain::snapshot::SnapshotLimits;
use vmcp::proto::vmm::v1 as pb;

use super::vmm::{Direct, Env, Kind, create_req, env, runtime_dir, wait_ready};

const ROUNDS: usize = 10;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn create_sized(id: &str, env: &Env, memory: i64) -> pb::CreateVmRequest {
    let mut req = create_req(id, &env.guest);
    if let Some(c) = req.config.as_option_mut() {
        c.memory.get_or_insert_default().size_bytes = memory;
    }
    req
}

/// Section "snapshot" for one VMM.
pub async fn section(kind: Kind) {
    let name = match kind {
        Kind::Ch => "cloud-hypervisor",
        Kind::Fc => "firecracker",
    };
    println!();
    println!("== Snapshots: {name} (tiny guest) ==");
    let Some(env) = env(kind, &format!("snapshot-{name}"), true) else {
        return;
    };
    let runtime = runtime_dir();
    let snapshot_root = tempfile::tempdir().unwrap();
    let mut options = super::vmm::options();
    options.security.snapshots = Some(SnapshotSettings {
        repo: Arc::new(
            vmcp::adapters::outbound::snapshots::FsSnapshots::open(snapshot_root.path()).unwrap(),
        ),
        limits: SnapshotLimits {
            max_count: 100,
            max_bytes: 1 << 40,
        },
    });
    let running = super::vmm::start_backend(
        kind,
        &env,
        runtime.path(),
        Arc::new(MemoryStore::new()),
        options,
    )
    .await;
    let c = super::client(running.local_addr, false);

    for (label, memory) in [("128 MiB", 128i64 << 20), ("1 GiB", 1i64 << 30)] {
        let id = format!("src-{}", memory >> 20);
        c.create_vm(create_sized(&id, &env, memory)).await.unwrap();
        c.boot_vm(pb::BootVmRequest {
            vm_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let started = Instant::now();
        let snap = c
            .snapshot_vm(pb::SnapshotVmRequest {
                vm_id: id.clone(),
                snapshot_id: format!("s-{}", memory >> 20),
                resume: true,
                ..Default::default()
            })
            .await;
        let took = started.elapsed();
        match snap {
            Ok(s) => {
                let size = s.into_owned().snapshot.into_option().unwrap().size_bytes;
                println!(
                    "SnapshotVm of a running {label} VM (paused, written, resumed): {:.1} ms, {:.1} MiB on disk",
                    ms(took),
                    size as f64 / f64::from(1u32 << 20)
                );
            }
            Err(e) => {
                let why = e.message.unwrap_or_default();
                println!(
                    "SKIPPED: snapshot-{name}: the VMM cannot snapshot here: {}",
                    why.lines().next().unwrap_or_default()
                );
                running.shutdown().await;
                // The VMs outlive VMCP by design: end them by pid.
                super::vmm::kill_vmms_in(runtime.path());
                return;
            }
        }
    }

    // Restore-to-Running vs create+boot, both through VMCP (128 MiB).
    let mut restores = Vec::new();
    let mut boots = Vec::new();
    for i in 0..ROUNDS {
        let clone = format!("clone-{i}");
        let t = Instant::now();
        c.restore_vm(pb::RestoreVmRequest {
            vm_id: clone.clone(),
            snapshot_id: "s-128".into(),
            resume: true,
            ..Default::default()
        })
        .await
        .unwrap();
        restores.push(t.elapsed());
        let fresh = format!("fresh-{i}");
        let t = Instant::now();
        c.create_vm(create_sized(&fresh, &env, 128 << 20))
            .await
            .unwrap();
        c.boot_vm(pb::BootVmRequest {
            vm_id: fresh.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        boots.push(t.elapsed());
        for vm in [clone, fresh] {
            c.delete_vm(pb::DeleteVmRequest {
                vm_id: vm,
                force: true,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    let (restore, boot) = (median(restores), median(boots));
    println!(
        "128 MiB, median of {ROUNDS}: RestoreVm to Running {:.2} ms vs CreateVm+BootVm to Running {:.2} ms = {:.2}x",
        ms(restore),
        ms(boot),
        restore.as_secs_f64() / boot.as_secs_f64()
    );

    if kind == Kind::Fc {
        let dir = snapshot_root.path().join("s-128");
        let direct = median(direct_fc_restores(&env, &dir).await);
        println!(
            "128 MiB, median of {ROUNDS}: VMCP restore {:.2} ms vs direct (spawn, PUT /serial, PUT /snapshot/load resume) {:.2} ms = {:.2}x (goal <= 1.1x)",
            ms(restore),
            ms(direct),
            restore.as_secs_f64() / direct.as_secs_f64()
        );
    }
    running.shutdown().await;
    super::vmm::kill_vmms_in(runtime.path());
}

/// The same restore done directly: a fresh Firecracker, its console, then
/// the load with resume; timed from spawn to the load's answer.
async fn direct_fc_restores(env: &Env, snapshot: &Path) -> Vec<Duration> {
    let http = UdsClient::new(Duration::from_secs(10));
    let root = runtime_dir();
    let mut out = Vec::new();
    for i in 0..ROUNDS {
        let dir = root.path().join(format!("d{i}"));
        let t = Instant::now();
        let d = Direct::spawn(Kind::Fc, &env.binary, &dir);
        wait_ready(&http, &d.socket, "/").await;
        let console = dir.join("console");
        std::fs::write(&console, b"").unwrap();
        super::vmm::put_json(
            &http,
            &d.socket,
            "/serial",
            serde_json::json!({"serial_out_path": console.display().to_string()}),
        )
        .await;
        super::vmm::put_json(
            &http,
            &d.socket,
            "/snapshot/load",
            serde_json::json!({
                "snapshot_path": snapshot.join("vmstate").display().to_string(),
                "mem_backend": {"backend_type": "File", "backend_path": snapshot.join("memory").display().to_string()},
                "resume_vm": true,
            }),
        )
        .await;
        out.push(t.elapsed());
        d.kill().await;
    }
    out
}
