//! `vmcpctl`, the real binary, against the real server (in-process, over the
//! test double): every subcommand, its JSON output parsed, the human tables,
//! files in the API's schema, one exit code per error class, `--wait`, and
//! each way in (plain HTTP, the token, the host-local Unix socket, HTTPS
//! with mutual TLS). The binary runs as a child process on tokio's process
//! API, so the in-process server keeps serving while the test waits for it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::Value;
use vmcp::adapters::inbound::auth::{AuthPolicy, BearerToken};
use vmcp::adapters::inbound::tls::server_config;
use vmcp::app::security::Security;
use vmcp::proto::vmm::v1 as pb;

use super::harness::{Harness, Wire, create_req};

/// What one vmcpctl run left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The one JSON document on stdout.
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is one JSON document ({e}): {self:?}"))
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// Runs vmcpctl with only PATH and `env` in its environment.
async fn vmcpctl_env(env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmcpctl"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("vmcpctl {args:?} finished within 60 s"))
        .expect("vmcpctl runs");
    Run {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs vmcpctl against the harness's port (given through VMCP_ADDRESS).
async fn vmcpctl(h: &Harness, args: &[&str]) -> Run {
    let address = format!("http://{}", h.addr);
    vmcpctl_env(&[("VMCP_ADDRESS", &address)], args).await
}

async fn state_of(h: &Harness, vm: &str) -> Option<pb::VmState> {
    let info = h
        .client(Wire::ConnectProto)
        .get_vm_info(pb::GetVmInfoRequest {
            vm_id: vm.into(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_owned();
    info.state.as_known()
}

#[tokio::test]
async fn every_subcommand_drives_a_vm_and_prints_the_api_json() {
    let h = Harness::start().await;
    let created = vmcpctl(
        &h,
        &[
            "create",
            "web-1",
            "-o",
            "json",
            "--vcpus",
            "2",
            "--memory",
            "1GiB",
            "--kernel",
            "/var/lib/vmcp/vmlinux",
            "--initrd",
            "/var/lib/vmcp/initrd",
            "--cmdline",
            "console=ttyS0 root=/dev/vda",
            "--disk",
            "/var/lib/vmcp/root.ext4,root",
            "--disk",
            "/var/lib/vmcp/data.raw,ro,id=data",
            "--net",
            "tap-web-1,52:54:00:00:00:01",
            "--metadata",
            "team=edge",
            "--console",
        ],
    )
    .await
    .ok();
    let doc = created.json();
    assert_eq!(doc["vmId"], "web-1");
    assert_eq!(doc["state"], "VM_STATE_CREATED");

    let info = vmcpctl(&h, &["info", "web-1", "--output", "json"])
        .await
        .ok()
        .json();
    let config = &info["config"];
    assert_eq!(info["state"], "VM_STATE_CREATED");
    assert_eq!(config["cpu"]["vcpuCount"], 2);
    assert_eq!(config["memory"]["sizeBytes"], "1073741824");
    assert_eq!(config["boot"]["kernelPath"], "/var/lib/vmcp/vmlinux");
    assert_eq!(config["boot"]["initrdPath"], "/var/lib/vmcp/initrd");
    assert_eq!(config["boot"]["kernelArgs"], "console=ttyS0 root=/dev/vda");
    assert_eq!(config["storage"][0]["id"], "disk0");
    assert_eq!(config["storage"][0]["isRootDevice"], true);
    assert_eq!(config["storage"][1]["id"], "data");
    assert_eq!(config["storage"][1]["readOnly"], true);
    assert_eq!(config["network"][0]["id"], "eth0");
    assert_eq!(config["network"][0]["tapDevice"], "tap-web-1");
    assert_eq!(config["network"][0]["macAddress"], "52:54:00:00:00:01");
    assert_eq!(config["console"]["enabled"], true);
    assert_eq!(config["metadata"]["team"], "edge");

    for (args, state) in [
        (&["boot", "web-1"][..], "VM_STATE_RUNNING"),
        (&["pause", "web-1"][..], "VM_STATE_PAUSED"),
        (&["resume", "web-1"][..], "VM_STATE_RUNNING"),
        (&["reboot", "web-1", "--force"][..], "VM_STATE_RUNNING"),
        (
            &["shutdown", "web-1", "--grace", "5"][..],
            "VM_STATE_SHUTDOWN",
        ),
    ] {
        let run = vmcpctl(&h, &[args, &["-o", "json"]].concat()).await.ok();
        let doc = run.json();
        assert_eq!(doc["success"], true, "{args:?}: {run:?}");
        assert_eq!(doc["state"], state, "{args:?}: {run:?}");
        assert_eq!(
            state_of(&h, "web-1").await.map(|s| format!("{s:?}")),
            Some(state.to_owned()),
            "{args:?}: the server agrees"
        );
    }

    let list = vmcpctl(&h, &["list", "-o", "json"]).await.ok().json();
    assert_eq!(list["totalCount"], 1);
    assert_eq!(list["vms"][0]["vmId"], "web-1");
    assert_eq!(list["vms"][0]["state"], "VM_STATE_SHUTDOWN");
    assert_eq!(list["vms"][0]["metadata"]["team"], "edge");

    let deleted = vmcpctl(&h, &["delete", "web-1", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(deleted["success"], true);
    assert_eq!(state_of(&h, "web-1").await, None, "the VM is gone");
    h.stop().await;
}

#[tokio::test]
async fn tables_are_aligned_plain_text_by_default() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("alpha")).await.expect("create");
    c.create_vm(create_req("b")).await.expect("create");
    let run = vmcpctl(&h, &["list"]).await.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{run:?}");
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "STATE", "VCPUS", "MEMORY", "AGE", "METADATA", "REASON"
        ]
    );
    // Every column starts where its header starts.
    let state_col = lines[0].find("STATE").expect("STATE");
    let memory_col = lines[0].find("MEMORY").expect("MEMORY");
    for (line, id) in lines[1..].iter().zip(["alpha", "b"]) {
        assert!(line.starts_with(id), "{line}");
        assert_eq!(&line[state_col..state_col + 7], "CREATED", "{line}");
        assert_eq!(&line[memory_col..memory_col + 6], "64 MiB", "{line}");
        assert!(line.ends_with("team=a"), "{line}");
    }

    let info = vmcpctl(&h, &["info", "alpha"]).await.ok();
    let field = |name: &str| {
        info.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{name} in {}", info.stdout))
            .to_owned()
    };
    assert_eq!(field("ID"), "alpha");
    assert_eq!(field("State"), "CREATED");
    assert_eq!(field("Memory"), "64 MiB");
    assert_eq!(field("Kernel"), "/var/lib/vmcp/kernel.elf");
    assert_eq!(field("Metadata"), "team=a");

    let booted = vmcpctl(&h, &["boot", "alpha"]).await.ok();
    assert_eq!(booted.stdout, "alpha\tRUNNING\n");
    let empty = vmcpctl(&h, &["list", "--state", "paused"]).await.ok();
    assert_eq!(empty.stdout, "No VMs.\n");
    h.stop().await;
}

#[tokio::test]
async fn create_reads_yaml_and_json_files_in_the_api_schema_and_refuses_unknown_fields() {
    let h = Harness::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("vm.yaml");
    std::fs::write(
        &yaml,
        "# a VmConfig, as in the API\n\
         cpu: {vcpuCount: 2}\n\
         memory: {sizeBytes: 268435456}\n\
         boot:\n  kernelPath: /var/lib/vmcp/vmlinux\n  kernel_args: console=ttyS0\n\
         storage:\n  - {id: root, path: /var/lib/vmcp/root.ext4, isRootDevice: true}\n\
         metadata: {team: yaml}\n",
    )
    .unwrap();
    let run = vmcpctl(&h, &["create", "from-yaml", "-f", yaml.to_str().unwrap()])
        .await
        .ok();
    assert_eq!(run.stdout, "from-yaml\tCREATED\n");
    let info = vmcpctl(&h, &["info", "from-yaml", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(info["config"]["cpu"]["vcpuCount"], 2);
    assert_eq!(info["config"]["boot"]["kernelArgs"], "console=ttyS0");
    assert_eq!(info["config"]["storage"][0]["isRootDevice"], true);
    assert_eq!(info["config"]["metadata"]["team"], "yaml");

    // A whole CreateVmRequest, as curl would send it; the id comes from the file.
    let json = dir.path().join("request.json");
    std::fs::write(
        &json,
        r#"{"vmId": "from-json", "config": {"cpu": {"vcpuCount": 1},
            "memory": {"sizeBytes": "134217728"},
            "boot": {"kernelPath": "/var/lib/vmcp/vmlinux"}}}"#,
    )
    .unwrap();
    let run = vmcpctl(&h, &["create", "-f", json.to_str().unwrap(), "-o", "json"])
        .await
        .ok();
    assert_eq!(run.json()["vmId"], "from-json");

    // Misspelt fields and unreadable files are refused before anything is sent.
    std::fs::write(
        &yaml,
        "cpu: {vcpuCount: 1}\nmemory: {sizeBytes: 134217728}\n\
         boot: {kernelPath: /k}\nstorage:\n  - {id: d, path: /d, readOnyl: true}\n",
    )
    .unwrap();
    let typo = vmcpctl(&h, &["create", "typo", "-f", yaml.to_str().unwrap()]).await;
    assert_eq!(typo.code, 2, "{typo:?}");
    assert!(typo.stderr.contains("storage[0].readOnyl"), "{typo:?}");
    let missing = vmcpctl(&h, &["create", "x", "-f", "/nonexistent/vm.yaml"]).await;
    assert_eq!(missing.code, 2, "{missing:?}");
    assert!(missing.stderr.contains("cannot read"), "{missing:?}");
    std::fs::write(&json, "{not json").unwrap();
    let broken = vmcpctl(&h, &["create", "x", "-f", json.to_str().unwrap()]).await;
    assert_eq!(broken.code, 2, "{broken:?}");
    assert!(broken.stderr.contains("not valid JSON"), "{broken:?}");
    assert_eq!(state_of(&h, "typo").await, None, "nothing was created");
    assert_eq!(state_of(&h, "x").await, None, "nothing was created");
    h.stop().await;
}

#[tokio::test]
async fn exit_codes_follow_the_error_class() {
    let h = Harness::start().await;
    h.client(Wire::ConnectProto)
        .create_vm(create_req("vm-a"))
        .await
        .expect("create");
    let kernel = ["--kernel", "/var/lib/vmcp/kernel.elf"];

    let not_found = vmcpctl(&h, &["info", "nope"]).await;
    assert_eq!(not_found.code, 3, "{not_found:?}");
    assert!(not_found.stderr.contains("not_found"), "{not_found:?}");
    assert_eq!(vmcpctl(&h, &["boot", "nope"]).await.code, 3);
    assert_eq!(vmcpctl(&h, &["delete", "nope"]).await.code, 3);

    let invalid = vmcpctl(
        &h,
        &[&["create", "vm-b", "--vcpus", "255"][..], &kernel].concat(),
    )
    .await;
    assert_eq!(invalid.code, 4, "{invalid:?}");
    assert!(invalid.stderr.contains("vcpu_count"), "{invalid:?}");
    let precondition = vmcpctl(&h, &["pause", "vm-a"]).await;
    assert_eq!(
        precondition.code, 4,
        "pausing a created VM: {precondition:?}"
    );
    assert!(
        precondition.stderr.contains("failed_precondition"),
        "{precondition:?}"
    );

    let exists = vmcpctl(
        &h,
        &[&["create", "vm-a", "--vcpus", "3"][..], &kernel].concat(),
    )
    .await;
    assert_eq!(
        exists.code, 7,
        "another config under the same id: {exists:?}"
    );
    assert!(exists.stderr.contains("already_exists"), "{exists:?}");

    let closed = format!("http://127.0.0.1:{}", super::harness::free_port());
    let unavailable = vmcpctl_env(&[], &["list", "--address", &closed]).await;
    assert_eq!(unavailable.code, 5, "{unavailable:?}");
    assert!(
        unavailable.stderr.contains("unavailable"),
        "{unavailable:?}"
    );
    assert!(
        unavailable
            .stderr
            .to_lowercase()
            .contains("connection refused"),
        "the cause is named: {unavailable:?}"
    );

    for usage in [
        &["frobnicate"][..],
        &["create", "x"][..],
        &["create", "x", "--kernel", "/k", "--memory", "lots"][..],
        &["create", "x", "--kernel", "/k", "--disk", "/d,readonly"][..],
        &["list", "--page-size", "0"][..],
        &["info", "vm-a", "--timeout", "5s"][..],
        &["list", "--address", "ftp://x"][..],
        &["list", "--address", "http://h:1", "--tls-ca", "/ca.pem"][..],
        &["info", "vm-a", "--wait", "deleted"][..],
    ] {
        let run = vmcpctl(&h, usage).await;
        assert_eq!(run.code, 2, "{usage:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{usage:?} says why");
    }
    let help = vmcpctl(&h, &["--help"]).await.ok();
    for code in 0..=8 {
        assert!(
            help.stdout.contains(&format!("\n  {code}  ")),
            "exit code {code} is documented in --help"
        );
    }
    h.stop().await;
}

/// A server that says each time it has answered a WatchVms (the watch is
/// registered and its stream open), so a test changes a VM after a waiting
/// vmcpctl has read its state and watches, instead of sleeping for it.
async fn start_telling_watches() -> (Harness, tokio::sync::mpsc::UnboundedReceiver<()>) {
    use tower::ServiceExt as _;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let h = Harness::start_wrapped(Box::new(move |inner| {
        tower::util::BoxCloneService::new(tower::service_fn(
            move |req: http::Request<hyper::body::Incoming>| {
                let (inner, tx) = (inner.clone(), tx.clone());
                async move {
                    let watch = req.uri().path().ends_with("/WatchVms");
                    let resp = inner.oneshot(req).await;
                    if watch {
                        let _ = tx.send(());
                    }
                    resp
                }
            },
        ))
    }))
    .await;
    (h, rx)
}

/// Waits for the next WatchVms the server answers, after forgetting earlier ones.
async fn next_watch(watches: &mut tokio::sync::mpsc::UnboundedReceiver<()>) {
    tokio::time::timeout(Duration::from_secs(20), watches.recv())
        .await
        .expect("vmcpctl watches within 20 s")
        .expect("the server runs");
}

#[tokio::test]
async fn wait_blocks_until_the_state_or_times_out_with_8() {
    let (h, mut watches) = start_telling_watches().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("vm-w")).await.expect("create");

    // --wait with no state waits for the state the command leads to.
    let booted = vmcpctl(
        &h,
        &["boot", "vm-w", "--wait", "--timeout", "10s", "-o", "json"],
    )
    .await
    .ok();
    assert_eq!(booted.json()["state"], "VM_STATE_RUNNING");

    // Paused by another client on the VMM's socket: the wait sees it.
    while watches.try_recv().is_ok() {}
    let addr = format!("http://{}", h.addr);
    let waiter = tokio::spawn(async move {
        vmcpctl_env(
            &[("VMCP_ADDRESS", &addr)],
            &[
                "info",
                "vm-w",
                "--wait",
                "paused",
                "--timeout",
                "20s",
                "-o",
                "json",
            ],
        )
        .await
    });
    next_watch(&mut watches).await;
    assert!(!waiter.is_finished(), "still waiting while the VM runs");
    assert!(h.double.pause_directly("vm-w"));
    let run = waiter.await.unwrap().ok();
    assert_eq!(run.json()["state"], "VM_STATE_PAUSED");
    assert_eq!(run.json()["vmId"], "vm-w");

    let started = std::time::Instant::now();
    let timed_out = vmcpctl(
        &h,
        &["info", "vm-w", "--wait", "running", "--timeout", "400ms"],
    )
    .await;
    assert_eq!(timed_out.code, 8, "{timed_out:?}");
    assert!(timed_out.stderr.contains("timed out"), "{timed_out:?}");
    assert!(
        timed_out.stderr.contains("PAUSED"),
        "names the last state: {timed_out:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the timeout is honoured"
    );
    // 0 checks once.
    assert_eq!(
        vmcpctl(&h, &["info", "vm-w", "--wait", "paused", "--timeout", "0"])
            .await
            .code,
        0
    );

    let deleted = vmcpctl(&h, &["delete", "vm-w", "--wait", "-o", "json"])
        .await
        .ok();
    assert_eq!(deleted.json()["success"], true);
    h.stop().await;
}

#[tokio::test]
async fn wait_ends_when_the_vm_fails_or_does_not_exist() {
    let (h, mut watches) = start_telling_watches().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("vm-f")).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "vm-f".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let addr = format!("http://{}", h.addr);
    let waiter = tokio::spawn(async move {
        vmcpctl_env(
            &[("VMCP_ADDRESS", &addr)],
            &["info", "vm-f", "--wait", "paused", "--timeout", "20s"],
        )
        .await
    });
    next_watch(&mut watches).await;
    assert!(!waiter.is_finished(), "still waiting while the VM runs");
    assert!(!h.double.kill("vm-f").is_empty(), "the VMM is killed");
    let failed = waiter.await.unwrap();
    assert_eq!(
        failed.code, 4,
        "a FAILED VM will not become PAUSED: {failed:?}"
    );
    assert!(failed.stderr.contains("FAILED"), "{failed:?}");
    // Waiting for failed is satisfied by it.
    vmcpctl(&h, &["info", "vm-f", "--wait", "failed", "--timeout", "5s"])
        .await
        .ok();
    // A VM that does not exist will not reach a state.
    let missing = vmcpctl(
        &h,
        &["info", "ghost", "--wait", "running", "--timeout", "5s"],
    )
    .await;
    assert_eq!(missing.code, 3, "{missing:?}");
    h.stop().await;
}

#[tokio::test]
async fn list_pages_and_follows_every_page_with_all() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    for i in 0..5 {
        c.create_vm(create_req(&format!("vm-{i}")))
            .await
            .expect("create");
    }
    c.boot_vm(pb::BootVmRequest {
        vm_id: "vm-3".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let ids = |doc: &Value| -> Vec<String> {
        doc["vms"]
            .as_array()
            .expect("vms")
            .iter()
            .map(|v| v["vmId"].as_str().expect("id").to_owned())
            .collect()
    };
    let first = vmcpctl(&h, &["list", "--page-size", "2", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&first), ["vm-0", "vm-1"]);
    assert_eq!(first["totalCount"], 5);
    let token = first["nextPageToken"].as_str().expect("a next page");
    let second = vmcpctl(
        &h,
        &[
            "list",
            "--page-size",
            "2",
            "--page-token",
            token,
            "-o",
            "json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(ids(&second), ["vm-2", "vm-3"]);

    let all = vmcpctl(&h, &["list", "--page-size", "2", "--all", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&all), ["vm-0", "vm-1", "vm-2", "vm-3", "vm-4"]);
    assert!(all.get("nextPageToken").is_none(), "{all}");
    assert_eq!(
        all["revision"], first["revision"],
        "the merged list keeps the first page's revision, to watch from"
    );
    assert_eq!(
        first["revision"], "7",
        "five creates and a boot, on a host that starts at revision 1"
    );

    let running = vmcpctl(&h, &["list", "--state", "running", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&running), ["vm-3"]);
    let table = vmcpctl(&h, &["list", "--page-size", "2"]).await.ok();
    assert!(
        table.stdout.contains("2 of 5 VMs; next page: --page-token"),
        "{table:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn the_token_file_is_sent_as_a_bearer_token() {
    const TOKEN: &str = "correct-horse-battery-staple-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let h = Harness::start_secured(Security {
        auth: AuthPolicy {
            token: Some(BearerToken::from_file(&token_file).expect("token")),
            require_client_cert: false,
        },
        ..Security::open()
    })
    .await;
    let denied = vmcpctl(&h, &["list"]).await;
    assert_eq!(denied.code, 6, "{denied:?}");
    assert!(denied.stderr.contains("unauthenticated"), "{denied:?}");
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let refused = vmcpctl(&h, &["list", "--token-file", wrong.to_str().unwrap()]).await;
    assert_eq!(refused.code, 6, "{refused:?}");
    let address = format!("http://{}", h.addr);
    let token = token_file.to_str().unwrap();
    vmcpctl_env(
        &[("VMCP_ADDRESS", &address), ("VMCP_TOKEN_FILE", token)],
        &["list"],
    )
    .await
    .ok();
    let unreadable = vmcpctl(&h, &["list", "--token-file", "/nonexistent/token"]).await;
    assert_eq!(unreadable.code, 2, "{unreadable:?}");
    h.stop().await;
}

#[tokio::test]
async fn the_host_local_unix_socket_is_an_address() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut security = Security::open();
    security.api_socket = Some(socket.clone());
    let h = Harness::start_secured(security).await;
    let address = format!("unix://{}", socket.display());
    let created = vmcpctl_env(
        &[],
        &[
            "--address",
            &address,
            "create",
            "local",
            "--kernel",
            "/var/lib/vmcp/vmlinux",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert_eq!(created.json()["state"], "VM_STATE_CREATED");
    let list = vmcpctl_env(&[("VMCP_ADDRESS", &address)], &["list", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(list["vms"][0]["vmId"], "local");
    assert_eq!(
        state_of(&h, "local").await,
        Some(pb::VmState::VM_STATE_CREATED)
    );
    let gone = format!("unix://{}", dir.path().join("missing.sock").display());
    let unavailable = vmcpctl_env(&[("VMCP_ADDRESS", &gone)], &["list"]).await;
    assert_eq!(unavailable.code, 5, "{unavailable:?}");
    h.stop().await;
}

/// A CA, a server certificate for localhost and a client certificate, as PEM files.
struct Pem {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn pem_pki() -> Pem {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "vmcpctl test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("operator");
    Pem {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
        _dir: dir,
    }
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn https_with_a_private_ca_and_a_client_certificate() {
    let pki = pem_pki();
    let tls = server_config(&pki.server_cert, &pki.server_key, Some(&pki.ca)).expect("TLS");
    let h = Harness::start_secured(Security {
        auth: AuthPolicy {
            token: None,
            require_client_cert: true,
        },
        tls: Some(tls),
        ..Security::open()
    })
    .await;
    let address = format!("https://localhost:{}", h.addr.port());
    let with_identity = [
        "--address",
        &address,
        "--tls-ca",
        arg(&pki.ca),
        "--tls-cert",
        arg(&pki.client_cert),
        "--tls-key",
        arg(&pki.client_key),
    ];
    let created = vmcpctl_env(
        &[],
        &[
            &with_identity[..],
            &[
                "create",
                "tls-vm",
                "--kernel",
                "/var/lib/vmcp/vmlinux",
                "-o",
                "json",
            ],
        ]
        .concat(),
    )
    .await
    .ok();
    assert_eq!(created.json()["vmId"], "tls-vm");
    let list = vmcpctl_env(&[], &[&with_identity[..], &["list", "-o", "json"]].concat())
        .await
        .ok()
        .json();
    assert_eq!(list["vms"][0]["vmId"], "tls-vm");

    // No client certificate: the handshake works, the call is refused.
    let anonymous = vmcpctl_env(
        &[("VMCP_TLS_CA", arg(&pki.ca))],
        &["--address", &address, "list"],
    )
    .await;
    assert_eq!(anonymous.code, 6, "{anonymous:?}");
    // Without the CA the server is not trusted, and vmcpctl says how to fix it.
    let no_ca = vmcpctl_env(&[], &["--address", &address, "list"]).await;
    assert_eq!(no_ca.code, 2, "{no_ca:?}");
    assert!(no_ca.stderr.contains("--tls-ca"), "{no_ca:?}");
    // A CA that did not sign the server's certificate: the handshake fails.
    let other = pem_pki();
    let untrusted = vmcpctl_env(
        &[],
        &["--address", &address, "--tls-ca", arg(&other.ca), "list"],
    )
    .await;
    assert_eq!(untrusted.code, 5, "{untrusted:?}");
    h.stop().await;
}

#[tokio::test]
async fn completions_and_the_man_page_come_from_the_command_definitions() {
    for (shell, marker) in [
        ("bash", "_vmcpctl()"),
        ("zsh", "#compdef vmcpctl"),
        ("fish", "complete -c vmcpctl"),
    ] {
        let run = vmcpctl_env(&[], &["completions", shell]).await.ok();
        assert!(run.stdout.contains(marker), "{shell}: {}", run.stdout);
        for sub in ["create", "shutdown", "list", "snapshot", "restore"] {
            assert!(run.stdout.contains(sub), "{shell} completes {sub}");
        }
    }
    let man = vmcpctl_env(&[], &["man"]).await.ok();
    assert!(man.stdout.contains(".TH vmcpctl 1"), "{}", man.stdout);
    for text in [
        "vmcpctl\\-create(1)",
        "VMCP_ADDRESS",
        ".SH \"EXIT STATUS\"\n.TP\n\\fB0\\fR\nsuccess",
        "\\fB8\\fR\n\\-\\-wait timed out",
    ] {
        assert!(man.stdout.contains(text), "the man page has {text:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    vmcpctl_env(&[], &["man", "--dir", arg(dir.path())])
        .await
        .ok();
    for page in [
        "vmcpctl.1",
        "vmcpctl-create.1",
        "vmcpctl-list.1",
        "vmcpctl-shutdown.1",
        "vmcpctl-snapshot.1",
        "vmcpctl-snapshot-create.1",
        "vmcpctl-restore.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).expect(page);
        assert!(text.contains(".TH vmcpctl"), "{page}");
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("vmcpctl.1")).unwrap(),
        man.stdout,
        "the page written is the page printed"
    );
    // Neither needs a server, nor a readable token file.
    let offline = vmcpctl_env(&[("VMCP_TOKEN_FILE", "/nonexistent")], &["man"]).await;
    assert_eq!(offline.code, 0, "{offline:?}");
    let version = vmcpctl_env(&[], &["--version"]).await.ok();
    assert!(
        version
            .stdout
            .starts_with(&format!("vmcpctl {} (git ", env!("CARGO_PKG_VERSION"))),
        "{version:?}"
    );
}

#[tokio::test]
async fn the_readme_documents_the_exit_codes_that_help_prints() {
    let help = vmcpctl_env(&[], &["--help"]).await.ok();
    let readme = include_str!("../../README.md").replace('`', "");
    let table: Vec<&str> = help
        .stdout
        .lines()
        .skip_while(|l| *l != "Exit codes:")
        .skip(1)
        .collect();
    assert_eq!(table.len(), 9, "{}", help.stdout);
    for line in table {
        let (code, meaning) = line.trim().split_once("  ").expect("code and meaning");
        let row = format!("| {code} | {meaning} |");
        assert!(readme.contains(&row), "README.md has {row:?}");
    }
}

/// A `vmcpctl watch` running in the background, its stdout read line by line.
struct Watcher {
    child: tokio::process::Child,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Watcher {
    fn spawn(addr: std::net::SocketAddr, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmcpctl"))
            .env_clear()
            .env("VMCP_ADDRESS", format!("http://{addr}"))
            .arg("watch")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("vmcpctl watch starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        Self {
            child,
            stdout: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        }
    }

    /// The next line it prints.
    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(20), self.stdout.next_line())
            .await
            .expect("a line within 20 s")
            .expect("stdout reads")
            .expect("the watch is still printing")
    }

    /// The next JSON line that is not a heartbeat.
    async fn event(&mut self) -> Value {
        loop {
            let line = self.line().await;
            let doc: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("one JSON document per line ({e}): {line}"));
            if doc["type"] != "WATCH_EVENT_TYPE_HEARTBEAT" {
                return doc;
            }
        }
    }

    /// Ctrl-C (SIGINT, by its pid), then how it exited.
    async fn interrupt(self) -> Run {
        let pid = self.child.id().expect("still running (not waited for yet)");
        let sent = tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await
            .expect("kill runs");
        assert!(sent.success(), "SIGINT sent to {pid}");
        self.finish().await
    }

    /// Waits for it to exit by itself.
    async fn finish(self) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(20), self.child.wait_with_output())
            .await
            .expect("vmcpctl watch exits within 20 s")
            .expect("vmcpctl watch is waited for");
        Run {
            code: out.status.code().expect("exited, not killed by a signal"),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A uint64 in proto3 JSON (a string).
fn rev(v: &Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a uint64 as a string: {v}"))
}

/// `(type, id, state)` of a watch event, without the prefixes.
fn event_of(doc: &Value) -> (String, String, String) {
    let text = |v: &Value, prefix: &str| {
        v.as_str()
            .map(|s| s.trim_start_matches(prefix).to_owned())
            .unwrap_or_default()
    };
    (
        text(&doc["type"], "WATCH_EVENT_TYPE_"),
        text(&doc["vm"]["vmId"], ""),
        text(&doc["vm"]["state"], "VM_STATE_"),
    )
}

fn ev(kind: &str, id: &str, state: &str) -> (String, String, String) {
    (kind.to_owned(), id.to_owned(), state.to_owned())
}

#[tokio::test]
async fn watch_prints_changes_made_by_another_client_as_json_lines() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("before")).await.expect("create");
    let mut w = Watcher::spawn(h.addr, &["-o", "json"]);
    // Live only: SYNCED at the host's revision, and nothing about `before`.
    let synced = w.event().await;
    assert_eq!(event_of(&synced), ev("SYNCED", "", ""));
    let mut last = rev(&synced["revision"]);
    assert_eq!(last, 2, "one change after revision 1: {synced}");

    c.create_vm(create_req("a")).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "a".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    c.delete_vm(pb::DeleteVmRequest {
        vm_id: "a".into(),
        ..Default::default()
    })
    .await
    .expect("delete");
    let mut got = Vec::new();
    loop {
        let doc = w.event().await;
        let revision = rev(&doc["revision"]);
        assert!(revision > last, "revisions increase: {doc}");
        assert_eq!(rev(&doc["vm"]["revision"]), revision, "{doc}");
        last = revision;
        got.push(event_of(&doc));
        if got.last().is_some_and(|e| e.0 == "DELETED") {
            break;
        }
    }
    assert_eq!(got.first(), Some(&ev("ADDED", "a", "CREATED")), "{got:?}");
    assert!(
        got.contains(&ev("CHANGED", "a", "RUNNING")),
        "the boot is seen: {got:?}"
    );
    assert_eq!(got.last().map(|e| &e.1), Some(&"a".to_owned()), "{got:?}");
    let run = w.interrupt().await;
    assert_eq!(run.code, 0, "Ctrl-C ends a watch successfully: {run:?}");
    h.stop().await;
}

#[tokio::test]
async fn watch_initial_lists_the_vms_then_synced_in_json_and_in_a_table() {
    let h = Harness::start().await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("x")).await.expect("create");
    c.create_vm(create_req("y")).await.expect("create");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "y".into(),
        ..Default::default()
    })
    .await
    .expect("boot");
    let mut w = Watcher::spawn(h.addr, &["--initial", "-o", "json"]);
    let mut initial = vec![event_of(&w.event().await), event_of(&w.event().await)];
    initial.sort();
    assert_eq!(
        initial,
        [ev("ADDED", "x", "CREATED"), ev("ADDED", "y", "RUNNING")]
    );
    let synced = w.event().await;
    assert_eq!(event_of(&synced), ev("SYNCED", "", ""));
    assert_eq!(rev(&synced["revision"]), 4);
    assert_eq!(w.interrupt().await.code, 0);

    // For people: a header, then one aligned line per event; only x, as asked.
    let mut w = Watcher::spawn(h.addr, &["--initial", "x"]);
    let header = w.line().await;
    let added = w.line().await;
    let synced = w.line().await;
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["TYPE", "ID", "STATE", "REVISION", "REASON"]
    );
    let at = |name: &str| header.find(name).expect(name);
    assert!(added.starts_with("ADDED"), "{added}");
    assert_eq!(&added[at("ID")..at("ID") + 2], "x ", "{added}");
    assert_eq!(&added[at("STATE")..at("STATE") + 7], "CREATED", "{added}");
    assert_eq!(&added[at("REVISION")..at("REVISION") + 1], "2", "{added}");
    assert!(synced.starts_with("SYNCED"), "{synced}");
    assert_eq!(&synced[at("REVISION")..], "4", "{synced}");
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "y".into(),
        ..Default::default()
    })
    .await
    .expect("pause y");
    c.boot_vm(pb::BootVmRequest {
        vm_id: "x".into(),
        ..Default::default()
    })
    .await
    .expect("boot x");
    let changed = w.line().await;
    assert!(
        changed.starts_with("CHANGED"),
        "y is filtered out: {changed}"
    );
    assert_eq!(
        &changed[at("STATE")..at("STATE") + 7],
        "RUNNING",
        "{changed}"
    );
    assert_eq!(w.interrupt().await.code, 0);
    h.stop().await;
}

#[tokio::test]
async fn watch_since_a_revision_no_longer_kept_exits_4_saying_list_again() {
    let h = Harness::start_secured(Security {
        watch: vmcp::app::feed::WatchSettings {
            history: 2,
            ..Default::default()
        },
        ..Security::open()
    })
    .await;
    let c = h.client(Wire::ConnectProto);
    for id in ["a", "b", "c", "d", "e"] {
        c.create_vm(create_req(id)).await.expect("create");
    }
    let list = vmcpctl(&h, &["list", "-o", "json"]).await.ok().json();
    let now = rev(&list["revision"]);
    assert_eq!(now, 6, "list -o json says the revision to watch from");
    let too_old = vmcpctl(&h, &["watch", "--since", "1"]).await;
    assert_eq!(too_old.code, 4, "{too_old:?}");
    assert!(too_old.stderr.contains("out_of_range"), "{too_old:?}");
    assert!(
        too_old
            .stderr
            .contains("list again: `vmcpctl list -o json`"),
        "vmcpctl says how to list again: {too_old:?}"
    );
    assert!(too_old.stdout.is_empty(), "{too_old:?}");
    // A revision still kept replays what followed it.
    let mut w = Watcher::spawn(h.addr, &["--since", "4", "-o", "json"]);
    assert_eq!(event_of(&w.event().await), ev("ADDED", "d", "CREATED"));
    assert_eq!(event_of(&w.event().await), ev("ADDED", "e", "CREATED"));
    assert_eq!(rev(&w.event().await["revision"]), 6, "then SYNCED");
    assert_eq!(w.interrupt().await.code, 0);
    for usage in [
        &["watch", "--since", "1", "--initial"][..],
        &["watch", "--since", "-1"][..],
        &["watch", "--state", "sleeping"][..],
    ] {
        let run = vmcpctl(&h, usage).await;
        assert_eq!(run.code, 2, "{usage:?}: {run:?}");
    }
    h.stop().await;
}

#[tokio::test]
async fn watch_resumes_after_a_server_restart_from_the_revision_it_printed() {
    let h = Harness::start().await;
    let (double, store, addr) = (
        std::sync::Arc::clone(&h.double),
        std::sync::Arc::clone(&h.store),
        h.addr,
    );
    let c = h.client(Wire::ConnectProto);
    let mut w = Watcher::spawn(addr, &["-o", "json"]);
    assert_eq!(event_of(&w.event().await), ev("SYNCED", "", ""));
    c.create_vm(create_req("a")).await.expect("create");
    assert_eq!(event_of(&w.event().await), ev("ADDED", "a", "CREATED"));
    h.stop().await;
    let h = Harness::restart_at(double, store, addr).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("b")).await.expect("create");
    // The restarted server's history is empty: only a watch from the last revision
    // printed resumes (an older one is out_of_range, a live one would have missed b).
    let mut next = w.event().await;
    if event_of(&next).0 == "SYNCED" {
        next = w.event().await;
    }
    assert_eq!(event_of(&next), ev("ADDED", "b", "CREATED"), "{next}");
    assert_eq!(rev(&next["revision"]), 3);
    let run = w.interrupt().await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("watching again from revision 2"),
        "says so on stderr: {run:?}"
    );
    h.stop().await;
}

/// Counts the watchers the server opened.
#[derive(Default)]
struct WatchersOpened(std::sync::atomic::AtomicU64);

impl vmcp::ports::Telemetry for WatchersOpened {
    fn record(&self, event: vmcp::ports::TelemetryEvent) {
        if let vmcp::ports::TelemetryEvent::WatchersOpen { delta } = event
            && delta > 0
        {
            self.0
                .fetch_add(delta.unsigned_abs(), std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[tokio::test]
async fn wait_resolves_through_a_watch_of_the_vm() {
    let opened = std::sync::Arc::new(WatchersOpened::default());
    let h = Harness::start_observed(Security::open(), opened.clone()).await;
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("vm-r")).await.expect("create");
    let booted = vmcpctl(
        &h,
        &[
            "boot",
            "vm-r",
            "--wait",
            "running",
            "--timeout",
            "10s",
            "-o",
            "json",
        ],
    )
    .await
    .ok();
    assert_eq!(booted.json()["state"], "VM_STATE_RUNNING");
    let watchers = opened.0.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        watchers >= 1,
        "the wait watched the VM ({watchers} watchers)"
    );
    // A state reached while waiting, by another client: the watch sees the change.
    let addr = format!("http://{}", h.addr);
    let waiter = tokio::spawn(async move {
        vmcpctl_env(
            &[("VMCP_ADDRESS", &addr)],
            &["info", "vm-r", "--wait", "paused", "--timeout", "20s"],
        )
        .await
    });
    assert!(
        super::harness::eventually(Duration::from_secs(10), || async {
            opened.0.load(std::sync::atomic::Ordering::SeqCst) > watchers
        })
        .await,
        "the second wait is watching"
    );
    c.pause_vm(pb::PauseVmRequest {
        vm_id: "vm-r".into(),
        ..Default::default()
    })
    .await
    .expect("pause");
    let run = waiter.await.unwrap().ok();
    assert!(
        run.stdout.contains("State:") && run.stdout.contains("PAUSED"),
        "{run:?}"
    );
    // delete --wait: the watch's initial list no longer has the VM.
    vmcpctl(&h, &["delete", "vm-r", "--wait", "--timeout", "10s"])
        .await
        .ok();
    h.stop().await;
}

#[tokio::test]
async fn wait_polls_a_server_without_watch_vms() {
    use tower::ServiceExt as _;
    // The server answers WatchVms as a server that does not have it (HTTP 404: unimplemented).
    let h = Harness::start_wrapped(Box::new(|inner| {
        tower::util::BoxCloneService::new(tower::service_fn(
            move |req: http::Request<hyper::body::Incoming>| {
                let inner = inner.clone();
                async move {
                    if req.uri().path().ends_with("/WatchVms") {
                        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::Full::<
                            bytes::Bytes,
                        >::default(
                        ));
                        let mut resp = http::Response::new(body);
                        *resp.status_mut() = http::StatusCode::NOT_FOUND;
                        return Ok(resp);
                    }
                    inner.oneshot(req).await
                }
            },
        ))
    }))
    .await;
    let watch = vmcpctl(&h, &["watch"]).await;
    assert_eq!(watch.code, 1, "watch itself needs WatchVms: {watch:?}");
    assert!(watch.stderr.contains("unimplemented"), "{watch:?}");
    let c = h.client(Wire::ConnectProto);
    c.create_vm(create_req("vm-p")).await.expect("create");
    let booted = vmcpctl(&h, &["boot", "vm-p", "--wait", "--timeout", "10s"])
        .await
        .ok();
    assert_eq!(booted.stdout, "vm-p\tRUNNING\n");
    let timed_out = vmcpctl(
        &h,
        &["info", "vm-p", "--wait", "paused", "--timeout", "300ms"],
    )
    .await;
    assert_eq!(timed_out.code, 8, "{timed_out:?}");
    assert!(timed_out.stderr.contains("RUNNING"), "{timed_out:?}");
    let missing = vmcpctl(&h, &["info", "ghost", "--wait", "--timeout", "5s"]).await;
    assert_eq!(missing.code, 3, "{missing:?}");
    h.stop().await;
}

#[tokio::test]
async fn create_sets_the_restart_policy_and_info_shows_it() {
    let h = Harness::start().await;
    let kernel = ["--kernel", "/var/lib/vmcp/kernel.elf"];
    vmcpctl(
        &h,
        &[
            &["create", "vm-o", "--restart-policy", "on-failure"][..],
            &kernel,
        ]
        .concat(),
    )
    .await
    .ok();
    let info = vmcpctl(&h, &["info", "vm-o", "-o", "json"])
        .await
        .ok()
        .json();
    assert_eq!(
        info["config"]["restartPolicy"], "RESTART_POLICY_ON_FAILURE",
        "{info}"
    );
    let text = vmcpctl(&h, &["info", "vm-o"]).await.ok();
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("Restart policy:") && l.ends_with(" on-failure")),
        "{text:?}"
    );
    vmcpctl(&h, &[&["create", "vm-d"][..], &kernel].concat())
        .await
        .ok();
    let default = vmcpctl(&h, &["info", "vm-d"]).await.ok();
    assert!(
        default
            .stdout
            .lines()
            .any(|l| l.starts_with("Restart policy:") && l.ends_with(" host default")),
        "{default:?}"
    );
    let bad = vmcpctl(
        &h,
        &[
            &["create", "vm-x", "--restart-policy", "sometimes"][..],
            &kernel,
        ]
        .concat(),
    )
    .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(
        bad.stderr.contains("on-failure"),
        "names the choices: {bad:?}"
    );
    h.stop().await;
}

#[tokio::test]
async fn console_prints_the_output_and_follows_it_until_the_vm_is_deleted() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::console::create_and_boot;
    use super::double::BOOT_MARKER;

    let h = Harness::start().await;
    create_and_boot(&h, "tty").await;
    h.double.guest_prints("tty", "login: \n");
    let run = vmcpctl(&h, &["console", "tty"]).await.ok();
    assert_eq!(run.stdout, format!("{BOOT_MARKER}login: \n"));
    let run = vmcpctl(
        &h,
        &["console", "tty", "--offset", &BOOT_MARKER.len().to_string()],
    )
    .await
    .ok();
    assert_eq!(run.stdout, "login: \n");

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vmcpctl"))
        .env_clear()
        .env("VMCP_ADDRESS", format!("http://{}", h.addr))
        .args(["console", "tty", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("vmcpctl runs");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    async fn line(
        lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    ) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a line within 10 s")
            .expect("readable")
    }
    assert_eq!(
        line(&mut lines).await.as_deref(),
        Some(BOOT_MARKER.trim_end())
    );
    assert_eq!(line(&mut lines).await.as_deref(), Some("login: "));
    h.double.guest_prints("tty", "typed later\n");
    assert_eq!(
        line(&mut lines).await.as_deref(),
        Some("typed later"),
        "followed"
    );
    h.client(Wire::ConnectProto)
        .delete_vm(pb::DeleteVmRequest {
            vm_id: "tty".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!(line(&mut lines).await, None, "the stream ended with the VM");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("vmcpctl exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
    h.stop().await;
}

#[tokio::test]
async fn resize_changes_the_size_and_prints_what_the_vmm_reports() {
    use super::console::create_and_boot;

    let h = Harness::start().await;
    create_and_boot(&h, "big").await;
    let run = vmcpctl(
        &h,
        &[
            "-o", "json", "resize", "big", "--vcpus", "2", "--memory", "256MiB",
        ],
    )
    .await
    .ok();
    let doc = run.json();
    assert_eq!(doc["state"], "VM_STATE_RUNNING", "{doc}");
    assert_eq!(doc["config"]["cpu"]["vcpuCount"], 2, "{doc}");
    assert_eq!(doc["config"]["memory"]["sizeBytes"], "268435456", "{doc}");
    let run = vmcpctl(&h, &["resize", "big", "--vcpus", "3"]).await.ok();
    assert_eq!(
        run.stdout.split_whitespace().collect::<Vec<_>>(),
        ["big", "RUNNING"]
    );
    // Nothing to change is a usage error; past the ceiling is the server's invalid_argument.
    let run = vmcpctl(&h, &["resize", "big"]).await;
    assert_eq!(run.code, 2, "{run:?}");
    let run = vmcpctl(&h, &["resize", "big", "--vcpus", "9"]).await;
    assert_eq!(run.code, 4, "refused by the server: {run:?}");
    assert!(run.stderr.contains("vcpu_count"), "{run:?}");
    h.stop().await;
}

#[tokio::test]
async fn snapshot_commands_and_restore_drive_the_snapshot_rpcs() {
    use super::console::create_and_boot;

    let h = Harness::start().await;
    create_and_boot(&h, "src").await;
    let doc = vmcpctl(
        &h,
        &["-o", "json", "snapshot", "create", "src", "--id", "warm"],
    )
    .await
    .ok()
    .json();
    assert_eq!(doc["snapshot"]["snapshotId"], "warm", "{doc}");
    assert_eq!(doc["snapshot"]["sourceVmId"], "src", "{doc}");
    assert_eq!(
        state_of(&h, "src").await,
        Some(pb::VmState::VM_STATE_RUNNING)
    );
    let run = vmcpctl(&h, &["snapshot", "create", "src", "--paused"])
        .await
        .ok();
    let generated = run
        .stdout
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .next()
        .expect("id")
        .to_owned();
    assert!(generated.starts_with("snap-"), "{run:?}");
    // The kind is sent: this backend (Cloud Hypervisor) has no diffs.
    let run = vmcpctl(&h, &["snapshot", "create", "src", "--kind", "diff"]).await;
    assert_eq!(
        run.code, 1,
        "refused by the server (unimplemented): {run:?}"
    );
    assert!(
        run.stderr.contains("unimplemented: cloudhypervisor"),
        "{run:?}"
    );
    assert_eq!(
        state_of(&h, "src").await,
        Some(pb::VmState::VM_STATE_PAUSED)
    );

    let run = vmcpctl(&h, &["snapshot", "list"]).await.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two rows: {run:?}");
    assert!(lines[0].starts_with("ID"), "{run:?}");
    let doc = vmcpctl(&h, &["-o", "json", "snapshot", "list", "--vm", "other"])
        .await
        .ok()
        .json();
    assert_eq!(doc, serde_json::json!({}), "none of another VM: {doc}");
    let doc = vmcpctl(&h, &["-o", "json", "snapshot", "get", "warm"])
        .await
        .ok()
        .json();
    assert_eq!(doc["snapshot"]["snapshotId"], "warm", "{doc}");

    let run = vmcpctl(
        &h,
        &[
            "restore",
            "clone",
            "--from",
            "warm",
            "--metadata",
            "role=copy",
        ],
    )
    .await
    .ok();
    assert_eq!(
        run.stdout.split_whitespace().collect::<Vec<_>>(),
        ["clone", "RUNNING"]
    );
    let doc = vmcpctl(
        &h,
        &[
            "-o", "json", "restore", "still", "--from", "warm", "--paused",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(doc["state"], "VM_STATE_PAUSED", "{doc}");

    let run = vmcpctl(&h, &["snapshot", "delete", "warm"]).await.ok();
    assert_eq!(
        run.stdout.split_whitespace().collect::<Vec<_>>(),
        ["warm", "DELETED"]
    );
    let run = vmcpctl(&h, &["snapshot", "get", "warm"]).await;
    assert_eq!(run.code, 3, "not found: {run:?}");
    let run = vmcpctl(&h, &["restore", "again", "--from", "warm"]).await;
    assert_eq!(run.code, 3, "not found: {run:?}");
    let run = vmcpctl(&h, &["restore", "again"]).await;
    assert_eq!(run.code, 2, "--from is required: {run:?}");
    let run = vmcpctl(&h, &["snapshot", "create", "src", "--id", "../x"]).await;
    assert_eq!(run.code, 4, "refused by the server: {run:?}");
    assert!(run.stderr.contains("snapshot_id"), "{run:?}");
    h.stop().await;
}
