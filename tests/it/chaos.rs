//! A randomized crash test on the real VMMs: several clients run random
//! lifecycle operations on a handful of VMs through the real `vmcp-api`
//! process, which is killed with -9 at a random moment and restarted, again
//! and again. After every restart:
//!
//! - every VM VMCP lists has the state its VMM reports (asked directly on the
//!   VMM's socket, with a client independent of VMCP's adapters), and the pid
//!   VMCP shows is that VMM's;
//! - no VMM process of this test belongs to no VM (every process whose
//!   command line names the test's runtime directory is the VMM VMCP shows
//!   for that VM);
//!
//! and at the end, deleting every VM leaves no VMM process. The seed is
//! printed (and can be set with `VMCP_TEST_SEED`) so a failure can be replayed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use connectrpc::client::CallOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vmcp::proto::vmm::v1 as pb;
use vmcp::proto::vmm::v1::VmState as S;

use super::harness::{ApiProcess, Rng, Wire, client_for, free_port, vmcp_api_env, wait_serving};
use super::real_env::{Real, Vmm, require, say};

/// VMs the clients work on.
const VMS: usize = 5;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// Kill-and-restart rounds.
const ROUNDS: usize = 5;

struct Chaos {
    dir: tempfile::TempDir,
    backend: &'static str,
    env: Real,
}

impl Chaos {
    fn runtime(&self) -> PathBuf {
        self.dir.path().join("rt")
    }

    async fn start(&self) -> ApiProcess {
        let port = free_port();
        let binary_var = if self.backend == "firecracker" {
            "UNKEY_VMCP_FC_BINARY"
        } else {
            "UNKEY_VMCP_CH_BINARY"
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmcp-api"));
        vmcp_api_env(&mut cmd, self.dir.path(), port);
        let child = cmd
            .env("UNKEY_VMCP_BACKEND", self.backend)
            .env(binary_var, &self.env.binary)
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env("UNKEY_VMCP_HYPERVISOR_TIMEOUT_SECONDS", "10")
            .spawn()
            .expect("vmcp-api starts");
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_serving(addr, Duration::from_secs(30)).await;
        ApiProcess { child, addr }
    }

    fn create(&self, id: &str) -> pb::CreateVmRequest {
        let mut req = super::harness::create_req(id);
        let config = req.config.get_or_insert_default();
        config.boot.get_or_insert_default().kernel_path = self.env.kernel.display().to_string();
        config.console.get_or_insert_default().enabled = true;
        req
    }

    /// Every live process whose command line names this test's runtime
    /// directory, by the VM id its socket path names.
    fn vmm_processes(&self) -> BTreeMap<u32, String> {
        let rt = self.runtime();
        let needle = format!("{}/", rt.display());
        let mut found = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return found;
        };
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            if is_zombie(pid) {
                continue;
            }
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if let Some(at) = cmdline.find(&needle) {
                let rest = &cmdline[at + needle.len()..];
                let id = rest.split('/').next().unwrap_or("").to_owned();
                found.insert(pid, id);
            }
        }
        found
    }

    fn kill_all_vmms(&self) {
        for pid in self.vmm_processes().keys() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

impl Drop for Chaos {
    fn drop(&mut self) {
        // A failed run must not leave VMMs behind: end only this test's VMMs, by pid.
        self.kill_all_vmms();
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rfind(')')?;
            s[after + 1..].split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

/// Asks a VMM directly for its state, over its socket, with a raw HTTP/1.1 GET.
async fn vmm_state(backend: &str, socket: &Path) -> Result<S, String> {
    let path = if backend == "firecracker" {
        "/"
    } else {
        "/api/v1/vm.info"
    };
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            // micro-http may keep the connection open: stop once the JSON body is complete.
            if let Some(body_at) = find(&buf, b"\r\n\r\n")
                && serde_json::from_slice::<serde_json::Value>(&buf[body_at + 4..]).is_ok()
            {
                break;
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("the VMM did not answer within 5 s".into()),
    }
    let body_at = find(&buf, b"\r\n\r\n").ok_or("no HTTP body")?;
    let v: serde_json::Value =
        serde_json::from_slice(&buf[body_at + 4..]).map_err(|e| e.to_string())?;
    let state = v.get("state").and_then(|s| s.as_str()).unwrap_or("");
    match (backend, state) {
        (_, "Running") => Ok(S::VM_STATE_RUNNING),
        (_, "Paused") => Ok(S::VM_STATE_PAUSED),
        ("firecracker", "Not started") => Ok(S::VM_STATE_CREATED),
        (_, "Created") => Ok(S::VM_STATE_CREATED),
        (_, "Shutdown") => Ok(S::VM_STATE_SHUTDOWN),
        (_, other) => Err(format!("unknown VMM state {other:?}")),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn st(v: buffa::EnumValue<S>) -> S {
    v.as_known().expect("known state")
}

/// One client's random work until `stop`.
async fn client_loop(
    addr: std::net::SocketAddr,
    chaos: Arc<Chaos>,
    seed: u64,
    stop: Arc<AtomicBool>,
) {
    let c = client_for(addr, Wire::ConnectProto);
    let mut rng = Rng(seed | 1);
    let opts = || CallOptions::default().with_timeout(Duration::from_secs(5));
    while !stop.load(Ordering::Relaxed) {
        let id = format!("chaos-{}", rng.below(VMS as u64));
        // Every outcome is allowed here (a VM in the wrong state, a VMCP that was just killed):
        // the invariants are checked after the restart, not per call.
        let _ = match rng.below(9) {
            0 => c
                .boot_vm_with_options(
                    pb::BootVmRequest {
                        vm_id: id,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            1 => c
                .shutdown_vm_with_options(
                    pb::ShutdownVmRequest {
                        vm_id: id,
                        force: rng.below(2) == 0,
                        timeout_seconds: 1,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            2 => c
                .pause_vm_with_options(
                    pb::PauseVmRequest {
                        vm_id: id,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            3 => c
                .resume_vm_with_options(
                    pb::ResumeVmRequest {
                        vm_id: id,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            4 => c
                .reboot_vm_with_options(
                    pb::RebootVmRequest {
                        vm_id: id,
                        force: true,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            5 => c
                .delete_vm_with_options(
                    pb::DeleteVmRequest {
                        vm_id: id,
                        force: rng.below(2) == 0,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
            6 | 7 => c
                .create_vm_with_options(chaos.create(&id), opts())
                .await
                .map(drop),
            _ => c
                .get_vm_info_with_options(
                    pb::GetVmInfoRequest {
                        vm_id: id,
                        ..Default::default()
                    },
                    opts(),
                )
                .await
                .map(drop),
        };
    }
}

/// Checks the invariants against a freshly restarted VMCP.
async fn check_invariants(chaos: &Chaos, addr: std::net::SocketAddr, round: usize) {
    let c = client_for(addr, Wire::ConnectProto);
    let listed = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list after restart")
        .into_owned();
    let mut shown_pids: BTreeMap<u32, String> = BTreeMap::new();
    for vm in &listed.vms {
        let info = c
            .get_vm_info(pb::GetVmInfoRequest {
                vm_id: vm.vm_id.clone(),
                ..Default::default()
            })
            .await
            .expect("info of a listed VM")
            .into_owned();
        let state = st(info.state);
        let pid = info
            .backend_info
            .get("vmm_pid")
            .and_then(|p| p.parse::<u32>().ok());
        match pid {
            Some(pid) => {
                let socket = info
                    .backend_info
                    .get("api_socket")
                    .map(PathBuf::from)
                    .expect("a VM with a VMM shows its socket");
                let reported = vmm_state(chaos.backend, &socket).await;
                assert_eq!(
                    reported,
                    Ok(state),
                    "round {round}: vm {} reads {state:?} in VMCP but its VMM (pid {pid}) reports {reported:?} (reason {:?})",
                    vm.vm_id,
                    info.state_reason
                );
                shown_pids.insert(pid, vm.vm_id.clone());
            }
            None => assert!(
                matches!(state, S::VM_STATE_SHUTDOWN | S::VM_STATE_FAILED),
                "round {round}: vm {} reads {state:?} without a VMM",
                vm.vm_id
            ),
        }
    }
    let running = chaos.vmm_processes();
    for (pid, id) in &running {
        assert_eq!(
            shown_pids.get(pid),
            Some(id),
            "round {round}: VMM pid {pid} of {id:?} belongs to no VM VMCP lists (VMCP shows {shown_pids:?})"
        );
    }
    for (pid, id) in &shown_pids {
        assert!(
            running.contains_key(pid),
            "round {round}: VMCP shows pid {pid} for {id} but no such VMM runs"
        );
    }
}

async fn chaos(backend: &'static str, vmm: Vmm, test: &str) {
    let Some(env) = require(vmm, test) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("vx")
        .tempdir_in("/tmp")
        .unwrap();
    let chaos = Arc::new(Chaos { dir, backend, env });
    let mut rng = Rng::from_env(test);
    let mut vmcp = chaos.start().await;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|_| {
                tokio::spawn(client_loop(
                    vmcp.addr,
                    Arc::clone(&chaos),
                    rng.next(),
                    Arc::clone(&stop),
                ))
            })
            .collect();
        // Kill at a random moment while the clients are busy.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        let _ = Command::new("kill")
            .args(["-9", &vmcp.child.id().to_string()])
            .status();
        let _ = vmcp.child.wait();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        vmcp = chaos.start().await;
        check_invariants(&chaos, vmcp.addr, round).await;
    }
    // Deleting every VM leaves no process.
    let c = client_for(vmcp.addr, Wire::ConnectProto);
    let listed = c
        .list_vms(pb::ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_owned();
    let count = listed.vms.len();
    for vm in listed.vms {
        c.delete_vm(pb::DeleteVmRequest {
            vm_id: vm.vm_id.clone(),
            force: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("delete {}: {e:?}", vm.vm_id));
    }
    let left = chaos.vmm_processes();
    assert!(
        left.is_empty(),
        "VMMs left after deleting every VM: {left:?}"
    );
    say(&format!(
        "{test}: {ROUNDS} kill -9 rounds, {count} VMs at the end, no VMM left"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_ch_random_operations_and_kill_9_converge() {
    chaos(
        "cloudhypervisor",
        Vmm::CloudHypervisor,
        "real_ch_random_operations_and_kill_9_converge",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_fc_random_operations_and_kill_9_converge() {
    chaos(
        "firecracker",
        Vmm::Firecracker,
        "real_fc_random_operations_and_kill_9_converge",
    )
    .await;
}
