//! Managed networking on the real kernel with the real VMMs: vmcp-api runs
//! inside a network namespace the test creates (`ip netns add`, with a
//! bridge in it) and removes, so the host's own interfaces are never
//! touched; the test talks to it over its API socket (a path, reachable
//! from any namespace). A VM that names only the bridge boots with its tap
//! in the bridge (multi-queue on Cloud Hypervisor with 2 vCPUs) and leaves
//! nothing after its delete; an orphan tap is swept at start; kill -9 of
//! VMCP while a create is under way, then a restart, leaves no tap and no
//! VMM; a duplicate tap and bad bridge names are refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use vmcp::adapters::outbound::vmm::UdsClient;
use vmcp::domain::network::tap_name;

use super::harness::{eventually, free_port, vmcp_api_env};
use super::real_env::{Real, Vmm, kill9, require, say};
use super::skips::skip;

const BRIDGE: &str = "br-vmcp";

/// A network namespace of this test's, with a bridge; removed on drop
/// (which removes every interface still in it).
struct Netns {
    name: String,
}

fn ip(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).output()
}

impl Netns {
    fn new(test: &str, tag: &str) -> Option<Self> {
        if rustix::process::geteuid().as_raw() != 0 {
            skip(test, "needs root to create a network namespace");
            return None;
        }
        let name = format!("vmcp-test-{}-{tag}", std::process::id());
        match ip(&["netns", "add", &name]) {
            Ok(o) if o.status.success() => {}
            other => {
                skip(
                    test,
                    &format!("cannot create a network namespace with ip: {other:?}"),
                );
                return None;
            }
        }
        let ns = Self { name };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", BRIDGE, "type", "bridge"],
            &["link", "set", BRIDGE, "up"],
        ] {
            let out = ip(&[&["-n", &ns.name][..], args].concat()).expect("ip");
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        Some(ns)
    }

    /// (name, master) of every interface whose name starts with `vmcp`.
    fn vmcp_links(&self) -> Vec<(String, Option<String>)> {
        let out = ip(&["-n", &self.name, "-o", "link", "show"]).expect("ip link show");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let name = l.split(": ").nth(1)?.split('@').next()?.to_owned();
                let words: Vec<&str> = l.split_whitespace().collect();
                let master = words
                    .iter()
                    .position(|w| *w == "master")
                    .and_then(|i| words.get(i + 1))
                    .map(|s| (*s).to_owned());
                name.starts_with("vmcp").then_some((name, master))
            })
            .collect()
    }

    /// The tun flags the kernel shows for `tap` (from the namespace's own sysfs).
    fn tun_flags(&self, tap: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{tap}/tun_flags"))
            .output()
            .expect("cat tun_flags");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// vmcp-api running in the namespace, reached over its API socket.
struct Vmcp {
    child: Child,
    socket: PathBuf,
}

impl Drop for Vmcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Case {
    dir: tempfile::TempDir,
    vmm: Vmm,
    real: Real,
}

impl Case {
    fn new(vmm: Vmm, test: &str) -> Option<Self> {
        let real = require(vmm, test)?;
        let dir = tempfile::Builder::new()
            .prefix("vn")
            .tempdir_in("/tmp")
            .unwrap();
        Some(Self { dir, vmm, real })
    }

    fn start(&self, ns: &Netns) -> Vmcp {
        let socket = self.dir.path().join("api.sock");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(env!("CARGO_BIN_EXE_vmcp-api"));
        vmcp_api_env(&mut cmd, self.dir.path(), free_port());
        let (backend, var) = match self.vmm {
            Vmm::CloudHypervisor => ("cloudhypervisor", "UNKEY_VMCP_CH_BINARY"),
            Vmm::Firecracker => ("firecracker", "UNKEY_VMCP_FC_BINARY"),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vmcp.log"))
            .unwrap();
        cmd.env("UNKEY_VMCP_BACKEND", backend)
            .env(var, &self.real.binary)
            .env("UNKEY_VMCP_API_SOCKET", &socket)
            .env("UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED", "false")
            .env("UNKEY_VMCP_LOG_LEVEL", "info")
            .stderr(Stdio::from(log));
        let child = cmd.spawn().expect("spawn vmcp-api in the namespace");
        Vmcp { child, socket }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("vmcp.log")).unwrap_or_default()
    }

    fn vm(&self, id: &str, vcpus: u32, nics: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "vmId": id,
            "config": {
                "cpu": {"vcpuCount": vcpus},
                "memory": {"sizeBytes": (64u64 << 20).to_string()},
                "boot": {"kernelPath": self.real.kernel.display().to_string(), "kernelArgs": "console=ttyS0"},
                "network": nics,
            }
        })
    }

    /// Every VMM process still found in the runtime directory, by pid.
    fn vmm_pids(&self) -> Vec<u32> {
        vmcp::adapters::outbound::vmm::discovery::scan(&self.dir.path().join("rt"))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.process.map(|p| p.pid))
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect()
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        // A failed test must not leave VMMs running.
        for pid in self.vmm_pids() {
            kill9(pid);
        }
    }
}

async fn call(v: &Vmcp, method: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = UdsClient::new(Duration::from_secs(30))
        .call(
            &v.socket,
            Method::POST,
            &format!("/vmm.v1.VmService/{method}"),
            Some(Bytes::from(body.to_string())),
        )
        .await
        .expect("call over the API socket");
    let json = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    (r.status.as_u16(), json)
}

async fn serving(v: &Vmcp, case: &Case) {
    let up = eventually(Duration::from_secs(20), || async {
        v.socket.exists()
            && UdsClient::new(Duration::from_secs(2))
                .call(
                    &v.socket,
                    Method::POST,
                    "/vmm.v1.VmService/ListVms",
                    Some(Bytes::from_static(b"{}")),
                )
                .await
                .is_ok_and(|r| r.is_success())
    })
    .await;
    assert!(
        up,
        "vmcp-api serves in the namespace; its log:\n{}",
        case.log()
    );
}

async fn managed_lifecycle(vmm: Vmm, test: &str) {
    let Some(case) = Case::new(vmm, test) else {
        return;
    };
    let tag = if vmm == Vmm::CloudHypervisor {
        "ch"
    } else {
        "fc"
    };
    let Some(ns) = Netns::new(test, tag) else {
        return;
    };
    // An orphan from an earlier life: VMCP's shape, no VM. Swept at start.
    let orphan = tap_name("never-existed", 0);
    let out = ip(&["-n", &ns.name, "tuntap", "add", &orphan, "mode", "tap"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = case.start(&ns);
    serving(&v, &case).await;
    assert!(
        ns.vmcp_links().is_empty(),
        "the orphan tap is swept: {:?}",
        ns.vmcp_links()
    );

    // Bad bridge names, and a bridge the namespace lacks.
    for bad in ["br 0", "much-too-long-bridge", "../x"] {
        let (status, body) = call(
            &v,
            "CreateVm",
            case.vm("bad", 1, serde_json::json!([{"id": "eth0", "bridge": bad}])),
        )
        .await;
        assert_eq!(body["code"], "invalid_argument", "{bad:?}: {status} {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("config.network[0].bridge"),
            "{body}"
        );
    }
    let (_, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "bad",
            1,
            serde_json::json!([{"id": "eth0", "bridge": "br-none"}]),
        ),
    )
    .await;
    assert_eq!(body["code"], "failed_precondition", "{body}");
    assert!(
        ns.vmcp_links().is_empty(),
        "a refused create leaves no tap: {:?}",
        ns.vmcp_links()
    );

    // Two vCPUs: Cloud Hypervisor gets a multi-queue tap, Firecracker a single-queue one.
    let (status, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "net1",
            2,
            serde_json::json!([{"id": "eth0", "bridge": BRIDGE}]),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}\n{}", case.log());
    let tap = tap_name("net1", 0);
    let (_, info) = call(&v, "GetVmInfo", serde_json::json!({"vmId": "net1"})).await;
    assert_eq!(
        info["config"]["network"][0]["tapDevice"],
        tap.as_str(),
        "{info}"
    );
    assert_eq!(
        ns.vmcp_links(),
        vec![(tap.clone(), Some(BRIDGE.to_owned()))]
    );
    let flags = ns.tun_flags(&tap);
    let multi = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap() & 0x100 != 0;
    assert_eq!(multi, vmm == Vmm::CloudHypervisor, "tun_flags {flags}");
    let (status, body) = call(&v, "BootVm", serde_json::json!({"vmId": "net1"})).await;
    assert_eq!(status, 200, "{body}\n{}", case.log());
    assert_eq!(body["state"], "VM_STATE_RUNNING", "{body}");
    assert_eq!(
        ns.vmcp_links(),
        vec![(tap.clone(), Some(BRIDGE.to_owned()))]
    );

    // The tap is this VM's: another VM may not name it.
    let (_, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "net2",
            1,
            serde_json::json!([{"id": "eth0", "tapDevice": "tapx"}]),
        ),
    )
    .await;
    assert!(body["code"].is_null(), "a tap of the caller's own: {body}");
    let (_, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "net3",
            1,
            serde_json::json!([{"id": "eth0", "tapDevice": "tapx"}]),
        ),
    )
    .await;
    assert_eq!(body["code"], "failed_precondition", "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("net2"),
        "{body}"
    );
    let (_, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "net3",
            1,
            serde_json::json!([{"id": "eth0", "tapDevice": tap}]),
        ),
    )
    .await;
    assert_eq!(
        body["code"], "invalid_argument",
        "VMCP's own name space: {body}"
    );

    for id in ["net1", "net2"] {
        let (status, body) = call(
            &v,
            "DeleteVm",
            serde_json::json!({"vmId": id, "force": true}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        ns.vmcp_links().is_empty(),
        "nothing after the delete: {:?}",
        ns.vmcp_links()
    );
    assert!(case.vmm_pids().is_empty(), "no VMM after the delete");
    say(&format!(
        "{test}: tap {tap} in {BRIDGE} while the VM existed ({flags}), none after"
    ));
}

#[tokio::test]
async fn real_ch_managed_tap_lives_and_dies_with_its_vm() {
    managed_lifecycle(
        Vmm::CloudHypervisor,
        "real_ch_managed_tap_lives_and_dies_with_its_vm",
    )
    .await;
}

#[tokio::test]
async fn real_fc_managed_tap_lives_and_dies_with_its_vm() {
    managed_lifecycle(
        Vmm::Firecracker,
        "real_fc_managed_tap_lives_and_dies_with_its_vm",
    )
    .await;
}

/// kill -9 of VMCP once the create's tap exists (the record is written, the
/// VMM may or may not be up), then a restart: no tap and no VMM are left,
/// and the id can be created again.
async fn kill_nine_mid_create(vmm: Vmm, test: &str) {
    let Some(case) = Case::new(vmm, test) else {
        return;
    };
    let tag = if vmm == Vmm::CloudHypervisor {
        "chk"
    } else {
        "fck"
    };
    let Some(ns) = Netns::new(test, tag) else {
        return;
    };
    let mut v = case.start(&ns);
    serving(&v, &case).await;
    let tap = tap_name("crashy", 0);
    let req = case.vm(
        "crashy",
        1,
        serde_json::json!([{"id": "eth0", "bridge": BRIDGE}]),
    );
    let socket = v.socket.clone();
    let create = tokio::spawn(async move {
        UdsClient::new(Duration::from_secs(30))
            .call(
                &socket,
                Method::POST,
                "/vmm.v1.VmService/CreateVm",
                Some(Bytes::from(req.to_string())),
            )
            .await
    });
    let appeared = eventually(Duration::from_secs(10), || async {
        ns.vmcp_links().iter().any(|(n, _)| *n == tap)
    })
    .await;
    assert!(appeared, "the tap appears during the create");
    kill9(v.child.id());
    let _ = v.child.wait();
    let _ = create.await;
    drop(v);

    let v = case.start(&ns);
    serving(&v, &case).await;
    let (_, listed) = call(&v, "ListVms", serde_json::json!({})).await;
    let ids: Vec<String> = listed["vms"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["vmId"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    if ids.contains(&"crashy".to_owned()) {
        // The create had finished before the kill: the VM is whole, with its tap.
        assert_eq!(
            ns.vmcp_links(),
            vec![(tap.clone(), Some(BRIDGE.to_owned()))]
        );
        let (status, body) = call(
            &v,
            "DeleteVm",
            serde_json::json!({"vmId": "crashy", "force": true}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(
        ns.vmcp_links().is_empty(),
        "no tap left: {:?}\n{}",
        ns.vmcp_links(),
        case.log()
    );
    assert!(case.vmm_pids().is_empty(), "no VMM left");
    // And the id is free for a create that completes.
    let (status, body) = call(
        &v,
        "CreateVm",
        case.vm(
            "crashy",
            1,
            serde_json::json!([{"id": "eth0", "bridge": BRIDGE}]),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(
        &v,
        "DeleteVm",
        serde_json::json!({"vmId": "crashy", "force": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(ns.vmcp_links().is_empty());
    say(&format!(
        "{test}: restarted after kill -9 with {} VM(s) recovered, no tap left",
        ids.len()
    ));
}

#[tokio::test]
async fn real_ch_kill_nine_mid_create_leaves_no_tap() {
    kill_nine_mid_create(
        Vmm::CloudHypervisor,
        "real_ch_kill_nine_mid_create_leaves_no_tap",
    )
    .await;
}

#[tokio::test]
async fn real_fc_kill_nine_mid_create_leaves_no_tap() {
    kill_nine_mid_create(
        Vmm::Firecracker,
        "real_fc_kill_nine_mid_create_leaves_no_tap",
    )
    .await;
}
