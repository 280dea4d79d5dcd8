//! Snapshots (issue 16), on the real VMMs with the tiny guest: snapshot time
//! and size for a 128 MiB and a 1 GiB VM, restore-to-Running through VMCP vs
//! create+boot through VMCP, and VMCP's restore vs the same restore done
//! directly on the VMM's API (a fresh process, `PUT /snapshot/load`).
//! On Firecracker also diff vs full snapshots of a 128 MiB VM tracking dirty
//! pages: SnapshotVm time (a diff includes VMCP making it whole after the
//! resume), and the VM's pause (pause, `PUT /snapshot/create`, resume) timed
//! on the VMM's API. Cloud Hypervisor cannot snapshot on a nested-KVM host;
//! the section then says SKIPPED with the VMM's own reason.

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
        diff_vs_full(&c, &env).await;
    }
    running.shutdown().await;
    super::vmm::kill_vmms_in(runtime.path());
}

/// Diff vs full snapshots of a 128 MiB VM tracking dirty pages: each round
/// takes a full snapshot, lets the guest run 50 ms, then a diff against it.
/// Then the pause each kind costs, timed on the VMM's own API (the calls
/// VMCP makes inside its pause), on the same VM, which is deleted after.
async fn diff_vs_full(
    c: &vmcp::proto::vmm::v1::VmServiceClient<connectrpc::client::HttpClient>,
    env: &Env,
) {
    let id = "tracked";
    let mut req = create_sized(id, env, 128 << 20);
    if let Some(cfg) = req.config.as_option_mut() {
        cfg.memory.get_or_insert_default().track_dirty_pages = true;
    }
    c.create_vm(req).await.unwrap();
    c.boot_vm(pb::BootVmRequest {
        vm_id: id.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let take = |snapshot: String, kind: pb::SnapshotKind| async move {
        let t = Instant::now();
        let info = c
            .snapshot_vm(pb::SnapshotVmRequest {
                vm_id: id.into(),
                snapshot_id: snapshot,
                resume: true,
                kind: kind.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_owned()
            .snapshot
            .into_option()
            .unwrap();
        (t.elapsed(), info.size_bytes)
    };
    let (mut fulls, mut diffs, mut sizes) = (Vec::new(), Vec::new(), (0, 0));
    for i in 0..ROUNDS {
        let (took, size) = take(format!("f-{i}"), pb::SnapshotKind::SNAPSHOT_KIND_FULL).await;
        fulls.push(took);
        sizes.0 = size;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (took, size) = take(format!("d-{i}"), pb::SnapshotKind::SNAPSHOT_KIND_DIFF).await;
        diffs.push(took);
        sizes.1 = size;
        for s in [format!("f-{i}"), format!("d-{i}")] {
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: s,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    let (full, diff) = (median(fulls), median(diffs));
    println!(
        "128 MiB with dirty-page tracking, median of {ROUNDS}: SnapshotVm full {:.1} ms ({:.1} MiB), diff {:.1} ms ({:.1} MiB stored whole: the parent's memory with the changed pages over it) = {:.2}x",
        ms(full),
        sizes.0 as f64 / f64::from(1u32 << 20),
        ms(diff),
        sizes.1 as f64 / f64::from(1u32 << 20),
        diff.as_secs_f64() / full.as_secs_f64()
    );
    // The pause itself, on the VMM's API.
    let info = c
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_owned();
    let socket = std::path::PathBuf::from(&info.backend_info["api_socket"]);
    let http = UdsClient::new(Duration::from_secs(30));
    let scratch = tempfile::tempdir().unwrap();
    let mut pauses = [Vec::new(), Vec::new()];
    for i in 0..ROUNDS {
        for (k, kind) in ["Full", "Diff"].into_iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let (state, memory) = (
                scratch.path().join(format!("vmstate-{kind}-{i}")),
                scratch.path().join(format!("memory-{kind}-{i}")),
            );
            let t = Instant::now();
            patch_vm(&http, &socket, "Paused").await;
            super::vmm::put_json(
                &http,
                &socket,
                "/snapshot/create",
                serde_json::json!({
                    "snapshot_type": kind,
                    "snapshot_path": state.display().to_string(),
                    "mem_file_path": memory.display().to_string(),
                }),
            )
            .await;
            patch_vm(&http, &socket, "Resumed").await;
            pauses[k].push(t.elapsed());
            let written =
                std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&memory).unwrap()) * 512;
            if i == 0 {
                println!(
                    "  {kind} memory file as the VMM writes it: {:.2} MiB allocated",
                    written as f64 / f64::from(1u32 << 20)
                );
            }
            let _ = std::fs::remove_file(&state);
            let _ = std::fs::remove_file(&memory);
        }
    }
    let [full_pause, diff_pause] = pauses.map(median);
    println!(
        "128 MiB, median of {ROUNDS}: the VM's pause (PATCH Paused, PUT /snapshot/create, PATCH Resumed) full {:.1} ms vs diff {:.1} ms",
        ms(full_pause),
        ms(diff_pause)
    );
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: id.into(),
        force: true,
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn patch_vm(http: &UdsClient, socket: &Path, state: &str) {
    let r = http
        .send_json(
            socket,
            hyper::Method::PATCH,
            "/vm",
            &serde_json::json!({ "state": state }),
        )
        .await
        .expect("PATCH /vm");
    assert!(r.is_success(), "PATCH /vm: {}", r.text());
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
