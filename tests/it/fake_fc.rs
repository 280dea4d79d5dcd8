//! A fake Firecracker API server for tests without KVM: the REST subset VMCP
//! uses, served over a Unix socket with Firecracker v1.16's rules and answers
//! as observed on the real binary (see /work/vmm-facts.md): pre-boot-only
//! resources refused after `InstanceStart`, runtime actions refused before it,
//! ids limited to `[A-Za-z0-9_]`, unknown JSON fields refused, files checked
//! when configured, every error a 400 with `{"fault_message": ...}`. The
//! "guest" writes the tiny test guest's marker to the serial file on start,
//! and each `FlushMetrics` appends a metrics line with fixed deltas, so tests
//! can check summing.
//!
//! Like Firecracker's API thread it serves one request at a time, across
//! all connections: a request that hangs or is slow ([`Behaviour::slow`])
//! holds up every other client until it is answered.
//!
//! Snapshots: the "guest memory" is a map of 4 KiB pages (absent: zero);
//! the guest writes a few pages each time it starts or resumes, and with
//! `track_dirty_pages` (machine config, or the load) those are remembered
//! as dirty. `PUT /snapshot/create` writes a vmstate (JSON, with a digest
//! of the memory) and a memory file of the whole memory size: every
//! written page for `Full`, only the dirty ones for `Diff` (a sparse
//! file); either clears the dirty pages, as Firecracker does. `PUT
//! /snapshot/load` refuses, like a corrupt restore would show, a memory
//! file whose pages do not match the vmstate's digest, so a diff
//! loaded without its parent's pages (or merged wrongly) fails. With
//! [`Behaviour::fail_snapshot_write`] one create writes half of its pages,
//! loses the dirty ones and answers an error, as a full disk would.
//!
//! The same code runs in-process (tests of the client) and as the
//! `fake-firecracker` example binary (tests of the adapter, which spawns
//! processes); behaviours that end the VMM call [`Behaviour::on_exit`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::UnixListener;

/// What the tiny test guest prints on COM1.
pub const MARKER: &str = "VMCP-GUEST-OK\n";
/// Network bytes received per metrics flush.
pub const RX_BYTES_PER_FLUSH: u64 = 1000;
/// Block bytes read per metrics flush.
pub const READ_BYTES_PER_FLUSH: u64 = 4096;

const NOT_BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";
const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";
const BAD_ID: &str = "API Resource IDs can only contain alphanumeric characters and underscores.";

/// How the fake behaves beyond the happy path.
#[derive(Clone)]
pub struct Behaviour {
    /// The `--id` it reports.
    pub id: String,
    /// The guest has an i8042 driver: Ctrl-Alt-Del resets it, ending the VMM with status 0.
    pub ctrl_alt_del_exits: bool,
    /// The guest powers off this long after `InstanceStart` (VMM exits 0).
    pub poweroff_after: Option<Duration>,
    /// `METHOD /path` requests that are accepted but never answered (nothing
    /// else is answered after them either: one request at a time).
    pub hang_on: Vec<String>,
    /// `METHOD /path` requests applied as usual but answered only after the
    /// delay: a slow, successful VMM (other requests wait their turn meanwhile).
    pub slow: Vec<(String, Duration)>,
    /// `METHOD /path` requests during which the VMM dies (status 3) without answering.
    pub exit_on: Vec<String>,
    /// Ends the VMM with this status (the process exits; in-process, the server stops).
    pub on_exit: Arc<dyn Fn(i32) + Send + Sync>,
    /// Resolve every path under this directory, as a jailed Firecracker does.
    pub chroot: Option<PathBuf>,
    /// The `PUT /snapshot/create` with this number (1 for the first) fails
    /// after writing half of the memory file (its dirty pages are lost all the same).
    pub fail_snapshot_write: Option<u64>,
}

impl Behaviour {
    /// The host path of a path Firecracker was given.
    pub fn host(&self, p: &str) -> PathBuf {
        match &self.chroot {
            Some(root) => root.join(p.trim_start_matches('/')),
            None => PathBuf::from(p),
        }
    }
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// `GET`, `PUT`, `PATCH`.
    pub method: String,
    /// The path.
    pub path: String,
    /// The JSON body, or Null.
    pub body: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Running,
    Paused,
}

#[derive(Debug)]
struct State {
    /// Set by a request after whose answer the VMM ends (with this status).
    exit_after_answer: Option<i32>,
    phase: Phase,
    machine: Value,
    boot_source: Option<Value>,
    drives: BTreeMap<String, Value>,
    nics: BTreeMap<String, Value>,
    metrics_path: Option<PathBuf>,
    serial_path: Option<PathBuf>,
    received: Vec<Received>,
    /// Guest memory: page index → the byte filling it (absent: zeros).
    memory: BTreeMap<u64, u8>,
    /// Pages written since the last snapshot, when tracking.
    dirty: std::collections::BTreeSet<u64>,
    /// Dirty-page tracking (machine config or load).
    tracking: bool,
    /// Guest writes so far (each picks its page and byte from it).
    writes: u64,
    /// Loaded from a snapshot: no boot-time configuration any more.
    loaded: bool,
    /// Snapshot creates so far.
    creates: u64,
}

/// The fake's page size.
pub const PAGE: u64 = 4096;
/// Pages the guest writes each time it starts or resumes.
const WRITES_PER_RUN: u64 = 3;

impl State {
    fn memory_bytes(&self) -> u64 {
        self.machine["mem_size_mib"].as_u64().unwrap_or(0) << 20
    }

    /// The guest runs for a while: it writes a few pages.
    fn guest_runs(&mut self) {
        let pages = (self.memory_bytes() / PAGE).max(1);
        for _ in 0..WRITES_PER_RUN {
            self.writes += 1;
            let page = self.writes.wrapping_mul(2_654_435_761) % pages;
            let byte = (self.writes % 251 + 1) as u8;
            self.memory.insert(page, byte);
            if self.tracking {
                self.dirty.insert(page);
            }
        }
    }
}

/// A digest of guest memory as (page, byte) pairs (FNV-1a; fixed across processes).
fn digest(memory: &BTreeMap<u64, u8>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (page, byte) in memory {
        for b in page.to_le_bytes().into_iter().chain([*byte]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Reads the pages of a memory file (only where it has data), each a whole
/// page of one byte value, or an error naming what is off.
fn read_memory(path: &Path, expected_len: u64) -> Result<BTreeMap<u64, u8>, String> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != expected_len {
        return Err(format!(
            "memory file {} is {len} bytes, the snapshot's memory is {expected_len}",
            path.display()
        ));
    }
    let mut memory = BTreeMap::new();
    let mut at = 0;
    let mut buf = vec![0u8; PAGE as usize];
    while at < len {
        let start = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(at)) {
            Ok(s) => s,
            Err(_) => break,
        };
        let end = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(start))
            .map_err(|e| e.to_string())?
            .min(len);
        let mut page = start / PAGE;
        while page * PAGE < end {
            f.read_exact_at(&mut buf, page * PAGE)
                .map_err(|e| format!("cannot read page {page}: {e}"))?;
            let byte = buf[0];
            if buf.iter().any(|b| *b != byte) {
                return Err(format!("page {page} is torn"));
            }
            if byte != 0 {
                memory.insert(page, byte);
            }
            page += 1;
        }
        at = end.max(start + 1);
    }
    Ok(memory)
}

/// The fake's shared state; clone freely.
#[derive(Clone)]
pub struct FakeFc {
    state: Arc<Mutex<State>>,
    behaviour: Behaviour,
}

type Answer = (u16, Option<Value>);

fn fault(msg: impl Into<String>) -> Answer {
    (400, Some(json!({ "fault_message": msg.into() })))
}

const NO_CONTENT: Answer = (204, None);

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Refuses fields outside `allowed` and missing `required` ones, like serde's
/// `deny_unknown_fields` in Firecracker.
fn shape(body: &Value, allowed: &[&str], required: &[&str]) -> Result<(), Answer> {
    let Some(obj) = body.as_object() else {
        return Err(fault(
            "An error occurred when deserializing the json body of a request: expected a JSON object.",
        ));
    };
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(fault(format!(
            "An error occurred when deserializing the json body of a request: unknown field `{k}`."
        )));
    }
    if let Some(k) = required.iter().find(|k| !obj.contains_key(**k)) {
        return Err(fault(format!(
            "An error occurred when deserializing the json body of a request: missing field `{k}`."
        )));
    }
    Ok(())
}

impl FakeFc {
    /// A fresh fake in the `Not started` state.
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                exit_after_answer: None,
                phase: Phase::NotStarted,
                machine: json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false,
                    "track_dirty_pages": false, "huge_pages": "None"}),
                boot_source: None,
                drives: BTreeMap::new(),
                nics: BTreeMap::new(),
                metrics_path: None,
                serial_path: None,
                received: Vec::new(),
                memory: BTreeMap::new(),
                dirty: std::collections::BTreeSet::new(),
                tracking: false,
                writes: 0,
                loaded: false,
                creates: 0,
            })),
            behaviour,
        }
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves the API on `listener` until the task is dropped.
    pub async fn serve(self, listener: UnixListener) {
        // Firecracker's API thread: one request at a time, whatever the connection.
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        while let Ok((stream, _)) = listener.accept().await {
            let fake = self.clone();
            let on_exit = self.behaviour.on_exit.clone();
            let turn = turn.clone();
            // Set when this connection's last answer is to be followed by the VMM's end.
            let exit_after: Arc<Mutex<Option<i32>>> = Arc::default();
            let exit_code = exit_after.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let fake = fake.clone();
                    let turn = turn.clone();
                    let exit_after = exit_after.clone();
                    async move { fake.handle(req, turn, &exit_after).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                let code = *exit_code
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(code) = code {
                    on_exit(code);
                }
            });
        }
    }

    /// Reads a request and has it served in its turn. The serving runs
    /// detached: a client that gives up (a timeout closing its connection)
    /// does not take its request back, which is still applied in its turn and
    /// keeps the API busy as long as it would have (forever, if it hangs).
    async fn handle(
        &self,
        req: hyper::Request<Incoming>,
        turn: Arc<tokio::sync::Mutex<()>>,
        exit_after: &Mutex<Option<i32>>,
    ) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let fake = self.clone();
        let served = tokio::spawn(async move {
            let turn = turn.lock_owned().await;
            let answer = fake.serve_one(&method, &path, &bytes).await;
            if answer.is_none() {
                // Hung (or dying): the API answers nothing else either.
                let _held = turn;
                std::future::pending::<()>().await;
            }
            answer
        });
        let Ok(Some(((status, body), exit))) = served.await else {
            // Never reached for a hung request; a panicked one drops the connection.
            std::future::pending::<()>().await;
            unreachable!()
        };
        let mut resp = hyper::Response::builder().status(status);
        if let Some(code) = exit {
            // The connection closes once this answer is written; the VMM ends then.
            *exit_after
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(code);
            resp = resp.header("connection", "close");
        }
        let payload = match body {
            Some(v) => {
                resp = resp.header("content-type", "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        Ok(resp
            .body(Full::new(payload))
            .unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()))))
    }

    /// Serves one request in its turn: its answer and whether the VMM ends
    /// after it (with that status), or None when it is never answered.
    async fn serve_one(
        &self,
        method: &str,
        path: &str,
        bytes: &[u8],
    ) -> Option<(Answer, Option<i32>)> {
        let call = format!("{method} {path}");
        if self.behaviour.exit_on.contains(&call) {
            (self.behaviour.on_exit)(3);
            return None;
        }
        if self.behaviour.hang_on.contains(&call) {
            return None;
        }
        let (status, body) = match serde_json::from_slice::<Value>(bytes) {
            Err(e) if !bytes.is_empty() => fault(format!(
                "An error occurred when deserializing the json body of a request: {e}."
            )),
            parsed => {
                let body = parsed.unwrap_or(Value::Null);
                self.lock().received.push(Received {
                    method: method.to_owned(),
                    path: path.to_owned(),
                    body: body.clone(),
                });
                self.route(method, path, &body)
            }
        };
        if let Some((_, delay)) = self.behaviour.slow.iter().find(|(c, _)| *c == call) {
            // The slow VMM is the behaviour: applied now, answered late.
            tokio::time::sleep(*delay).await;
        }
        let exit = self.lock().exit_after_answer.take();
        Some(((status, body), exit))
    }

    fn route(&self, method: &str, path: &str, body: &Value) -> Answer {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("GET", [""]) => self.describe(),
            ("GET", ["vm", "config"]) => self.vm_config(),
            ("PUT", ["machine-config"]) => self.put_machine(body),
            ("PUT", ["boot-source"]) => self.put_boot_source(body),
            ("PUT", ["drives", id]) => self.put_drive(id, body),
            ("PUT", ["network-interfaces", id]) => self.put_nic(id, body),
            ("PUT", ["metrics"]) => self.put_metrics(body),
            ("PUT", ["serial"]) => self.put_serial(body),
            ("PUT", ["actions"]) => self.action(body),
            ("PATCH", ["vm"]) => self.patch_vm(body),
            ("PUT", ["snapshot", "create"]) => self.create_snapshot(body),
            ("PUT", ["snapshot", "load"]) => self.load_snapshot(body),
            _ => fault(format!(
                "Invalid request method and/or path: {method} {}.",
                path.trim_start_matches('/')
            )),
        }
    }

    fn describe(&self) -> Answer {
        let state = match self.lock().phase {
            Phase::NotStarted => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        };
        (
            200,
            Some(json!({"id": self.behaviour.id, "state": state,
                "vmm_version": "1.16.1", "app_name": "Firecracker"})),
        )
    }

    fn vm_config(&self) -> Answer {
        let s = self.lock();
        (
            200,
            Some(json!({
                "balloon": null,
                "drives": s.drives.values().collect::<Vec<_>>(),
                "boot-source": s.boot_source.clone().unwrap_or(json!({"kernel_image_path": "", "initrd_path": null, "boot_args": null})),
                "machine-config": s.machine,
                "logger": null,
                "metrics": null,
                "network-interfaces": s.nics.values().collect::<Vec<_>>(),
            })),
        )
    }

    fn pre_boot(&self) -> Result<std::sync::MutexGuard<'_, State>, Answer> {
        let s = self.lock();
        if s.phase == Phase::NotStarted {
            Ok(s)
        } else {
            Err(fault(NOT_AFTER_START))
        }
    }

    fn put_machine(&self, body: &Value) -> Answer {
        let mut s = match self.pre_boot() {
            Ok(s) => s,
            Err(a) => return a,
        };
        let allowed = [
            "vcpu_count",
            "mem_size_mib",
            "smt",
            "track_dirty_pages",
            "huge_pages",
            "cpu_template",
        ];
        if let Err(a) = shape(body, &allowed, &["vcpu_count", "mem_size_mib"]) {
            return a;
        }
        let vcpus = body["vcpu_count"].as_u64().unwrap_or(0);
        if !(1..=32).contains(&vcpus) {
            return fault(
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
            );
        }
        let tracking = body
            .get("track_dirty_pages")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        s.machine = json!({"vcpu_count": vcpus, "mem_size_mib": body["mem_size_mib"],
            "smt": body.get("smt").cloned().unwrap_or(json!(false)),
            "track_dirty_pages": tracking, "huge_pages": "None"});
        s.tracking = tracking;
        NO_CONTENT
    }

    fn put_boot_source(&self, body: &Value) -> Answer {
        let mut s = match self.pre_boot() {
            Ok(s) => s,
            Err(a) => return a,
        };
        if let Err(a) = shape(
            body,
            &["kernel_image_path", "initrd_path", "boot_args"],
            &["kernel_image_path"],
        ) {
            return a;
        }
        let kernel = body["kernel_image_path"].as_str().unwrap_or("");
        if !self.behaviour.host(kernel).exists() {
            return fault(
                "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)",
            );
        }
        if let Some(initrd) = body.get("initrd_path").and_then(Value::as_str)
            && !self.behaviour.host(initrd).exists()
        {
            return fault(
                "Boot source error: The initrd file cannot be opened due to invalid path or invalid permissions. No such file or directory (os error 2)",
            );
        }
        s.boot_source = Some(json!({"kernel_image_path": kernel,
            "initrd_path": body.get("initrd_path").cloned().unwrap_or(Value::Null),
            "boot_args": body.get("boot_args").cloned().unwrap_or(Value::Null)}));
        NO_CONTENT
    }

    fn put_drive(&self, id: &str, body: &Value) -> Answer {
        if !valid_id(id) {
            return fault(BAD_ID);
        }
        let mut s = self.lock();
        if s.phase != Phase::NotStarted {
            return fault("PCI is not enabled");
        }
        let allowed = [
            "drive_id",
            "partuuid",
            "is_root_device",
            "cache_type",
            "is_read_only",
            "path_on_host",
            "rate_limiter",
            "io_engine",
            "socket",
        ];
        if let Err(a) = shape(body, &allowed, &["drive_id", "is_root_device"]) {
            return a;
        }
        if body["drive_id"].as_str() != Some(id) {
            return fault(format!(
                "The id from the path [{id}] does not match the id from the body [{}]!",
                body["drive_id"]
            ));
        }
        let path = body["path_on_host"].as_str().unwrap_or("");
        if !self.behaviour.host(path).exists() {
            return fault(format!(
                "Drive config error: Unable to create the virtio block device: Virtio backend error: Error manipulating the backing file: No such file or directory (os error 2) {path}"
            ));
        }
        let root = body["is_root_device"].as_bool() == Some(true);
        if root
            && s.drives
                .iter()
                .any(|(k, d)| k != id && d["is_root_device"] == json!(true))
        {
            return fault("Drive config error: A root block device already exists!");
        }
        s.drives.insert(id.to_owned(), body.clone());
        NO_CONTENT
    }

    fn put_nic(&self, id: &str, body: &Value) -> Answer {
        if !valid_id(id) {
            return fault(BAD_ID);
        }
        let mut s = match self.pre_boot() {
            Ok(s) => s,
            Err(a) => return a,
        };
        let allowed = [
            "iface_id",
            "host_dev_name",
            "guest_mac",
            "mtu",
            "rx_rate_limiter",
            "tx_rate_limiter",
        ];
        if let Err(a) = shape(body, &allowed, &["iface_id", "host_dev_name"]) {
            return a;
        }
        if body["iface_id"].as_str() != Some(id) {
            return fault(format!(
                "The id from the path [{id}] does not match the id from the body [{}]!",
                body["iface_id"]
            ));
        }
        s.nics.insert(id.to_owned(), body.clone());
        NO_CONTENT
    }

    /// `--metrics-path` on the command line: the metrics file opened at
    /// start-up (a later `PUT /metrics` is a reinitialization, refused).
    pub fn init_metrics(&self, path: &str) -> Result<(), String> {
        match self.put_metrics(&json!({ "metrics_path": path })) {
            (204, _) => Ok(()),
            (_, body) => Err(body.map(|b| b.to_string()).unwrap_or_default()),
        }
    }

    fn put_metrics(&self, body: &Value) -> Answer {
        let mut s = match self.pre_boot() {
            Ok(s) => s,
            Err(a) => return a,
        };
        if let Err(a) = shape(body, &["metrics_path"], &["metrics_path"]) {
            return a;
        }
        if s.metrics_path.is_some() {
            return fault("Metrics initialization error: Reinitialization of metrics not allowed.");
        }
        let path = self
            .behaviour
            .host(body["metrics_path"].as_str().unwrap_or(""));
        if let Err(e) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            return fault(format!(
                "Metrics initialization error: Failed to open target file: {e}"
            ));
        }
        s.metrics_path = Some(path);
        NO_CONTENT
    }

    fn put_serial(&self, body: &Value) -> Answer {
        let mut s = match self.pre_boot() {
            Ok(s) => s,
            Err(a) => return a,
        };
        if let Err(a) = shape(body, &["serial_out_path", "rate_limiter"], &[]) {
            return a;
        }
        s.serial_path = body["serial_out_path"]
            .as_str()
            .map(|p| self.behaviour.host(p));
        NO_CONTENT
    }

    fn action(&self, body: &Value) -> Answer {
        if let Err(a) = shape(body, &["action_type"], &["action_type"]) {
            return a;
        }
        let mut s = self.lock();
        match body["action_type"].as_str() {
            Some("InstanceStart") => {
                if s.phase != Phase::NotStarted {
                    return fault(NOT_AFTER_START);
                }
                if s.boot_source.is_none() {
                    return fault(
                        "Start microvm error: Cannot start microvm without kernel configuration.",
                    );
                }
                s.phase = Phase::Running;
                s.guest_runs();
                write_serial(s.serial_path.as_deref());
                write_metrics(s.metrics_path.as_deref(), 0);
                if let Some(after) = self.behaviour.poweroff_after {
                    let exit = self.behaviour.on_exit.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        exit(0);
                    });
                }
                NO_CONTENT
            }
            Some("SendCtrlAltDel") => {
                if s.phase == Phase::NotStarted {
                    return fault(NOT_BEFORE_START);
                }
                if self.behaviour.ctrl_alt_del_exits {
                    // Answered first; the guest then resets and the VMM exits 0.
                    s.exit_after_answer = Some(0);
                }
                NO_CONTENT
            }
            Some("FlushMetrics") => {
                if s.phase == Phase::NotStarted {
                    return fault(NOT_BEFORE_START);
                }
                write_metrics(s.metrics_path.as_deref(), 1);
                NO_CONTENT
            }
            other => fault(format!(
                "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected one of `FlushMetrics`, `InstanceStart`, `SendCtrlAltDel`.",
                other.unwrap_or("")
            )),
        }
    }

    fn patch_vm(&self, body: &Value) -> Answer {
        if let Err(a) = shape(body, &["state"], &["state"]) {
            return a;
        }
        let mut s = self.lock();
        if s.phase == Phase::NotStarted {
            return fault(NOT_BEFORE_START);
        }
        match body["state"].as_str() {
            Some("Paused") => s.phase = Phase::Paused,
            Some("Resumed") => {
                if s.phase == Phase::Paused {
                    s.guest_runs();
                }
                s.phase = Phase::Running;
            }
            other => {
                return fault(format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{}`, expected `Paused` or `Resumed`.",
                    other.unwrap_or("")
                ));
            }
        }
        NO_CONTENT
    }
}

impl FakeFc {
    fn create_snapshot(&self, body: &Value) -> Answer {
        if let Err(a) = shape(
            body,
            &["snapshot_type", "snapshot_path", "mem_file_path"],
            &["snapshot_path", "mem_file_path"],
        ) {
            return a;
        }
        let mut s = self.lock();
        if s.phase != Phase::Paused {
            return fault(
                "Create snapshot error: Cannot save the microVM state: the microVM is not paused.",
            );
        }
        let diff = match body.get("snapshot_type").and_then(Value::as_str) {
            None | Some("Full") => false,
            Some("Diff") => true,
            Some(other) => {
                return fault(format!(
                    "An error occurred when deserializing the json body of a request: unknown variant `{other}`, expected `Full` or `Diff`."
                ));
            }
        };
        if diff && !s.tracking {
            return fault(
                "Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.",
            );
        }
        let state_path = self
            .behaviour
            .host(body["snapshot_path"].as_str().unwrap_or(""));
        let mem_path = self
            .behaviour
            .host(body["mem_file_path"].as_str().unwrap_or(""));
        let vmstate = json!({
            "fake_vmstate": 1,
            "machine": s.machine,
            "drives": s.drives,
            "nics": s.nics,
            "memory_digest": digest(&s.memory),
            "writes": s.writes,
        });
        if let Err(e) = std::fs::write(&state_path, vmstate.to_string()) {
            return fault(format!(
                "Create snapshot error: Cannot save the microVM state: {e}"
            ));
        }
        let pages: Vec<(u64, u8)> = if diff {
            s.dirty
                .iter()
                .map(|p| (*p, s.memory.get(p).copied().unwrap_or(0)))
                .collect()
        } else {
            s.memory.iter().map(|(p, b)| (*p, *b)).collect()
        };
        // Cleared whatever happens next, as KVM's dirty log is read and reset.
        s.dirty.clear();
        let len = s.memory_bytes();
        s.creates += 1;
        let fail = self.behaviour.fail_snapshot_write == Some(s.creates);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&mem_path)
            .and_then(|f| {
                use std::os::unix::fs::FileExt;
                f.set_len(len)?;
                let keep = if fail { pages.len() / 2 } else { pages.len() };
                for (page, byte) in &pages[..keep] {
                    f.write_all_at(&vec![*byte; PAGE as usize], page * PAGE)?;
                }
                if fail {
                    return Err(std::io::Error::other("No space left on device (simulated)"));
                }
                f.sync_all()
            });
        match written {
            Ok(()) => NO_CONTENT,
            Err(e) => fault(format!(
                "Create snapshot error: Cannot save the memory: Error writing guest memory: {e}"
            )),
        }
    }

    fn load_snapshot(&self, body: &Value) -> Answer {
        if let Err(a) = shape(
            body,
            &[
                "snapshot_path",
                "mem_backend",
                "mem_file_path",
                "resume_vm",
                "track_dirty_pages",
                "network_overrides",
                "clock_realtime",
                "vsock_override",
                "enable_diff_snapshots",
            ],
            &["snapshot_path"],
        ) {
            return a;
        }
        let mut s = self.lock();
        if s.phase != Phase::NotStarted || s.loaded {
            return fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        if s.boot_source.is_some() || !s.drives.is_empty() || !s.nics.is_empty() {
            return fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        let state_path = self
            .behaviour
            .host(body["snapshot_path"].as_str().unwrap_or(""));
        let mem_path = self.behaviour.host(
            body["mem_backend"]["backend_path"]
                .as_str()
                .or_else(|| body["mem_file_path"].as_str())
                .unwrap_or(""),
        );
        let vmstate: Value = match std::fs::read(&state_path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(v) => v,
            Err(e) => {
                // A failed load leaves Firecracker unusable: it exits.
                s.exit_after_answer = Some(1);
                return fault(format!(
                    "Load snapshot error: Failed to restore from snapshot: Cannot read the microVM state: {e}"
                ));
            }
        };
        let len = vmstate["machine"]["mem_size_mib"].as_u64().unwrap_or(0) << 20;
        let memory = match read_memory(&mem_path, len) {
            Ok(m) if digest(&m) == vmstate["memory_digest"].as_str().unwrap_or("") => m,
            Ok(_) => {
                s.exit_after_answer = Some(1);
                return fault(
                    "Load snapshot error: Failed to restore from snapshot: the memory file does not hold the memory the microVM state was saved with (fake check)",
                );
            }
            Err(e) => {
                s.exit_after_answer = Some(1);
                return fault(format!(
                    "Load snapshot error: Failed to restore from snapshot: {e}"
                ));
            }
        };
        s.machine = vmstate["machine"].clone();
        let tracking = body["track_dirty_pages"].as_bool().unwrap_or(false);
        s.machine["track_dirty_pages"] = json!(tracking);
        s.tracking = tracking;
        s.memory = memory;
        s.dirty.clear();
        s.writes = vmstate["writes"].as_u64().unwrap_or(0);
        s.drives = serde_json::from_value(vmstate["drives"].clone()).unwrap_or_default();
        s.nics = serde_json::from_value(vmstate["nics"].clone()).unwrap_or_default();
        if let Some(overrides) = body["network_overrides"].as_array() {
            for o in overrides {
                let iface = o["iface_id"].as_str().unwrap_or("");
                let Some(nic) = s.nics.get_mut(iface) else {
                    s.exit_after_answer = Some(1);
                    return fault(format!(
                        "Load snapshot error: Failed to restore from snapshot: Invalid network override: no interface {iface}"
                    ));
                };
                nic["host_dev_name"] = o["host_dev_name"].clone();
            }
        }
        s.boot_source =
            Some(json!({"kernel_image_path": "", "initrd_path": null, "boot_args": null}));
        s.loaded = true;
        s.phase = Phase::Paused;
        if body["resume_vm"].as_bool().unwrap_or(false) {
            s.guest_runs();
            s.phase = Phase::Running;
        }
        NO_CONTENT
    }
}

/// The guest's COM1 output: to the serial file, or to stdout without one.
fn write_serial(path: Option<&Path>) {
    match path {
        Some(p) => {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
            {
                let _ = f.write_all(MARKER.as_bytes());
            }
        }
        None => {
            let _ = std::io::stdout().write_all(MARKER.as_bytes());
        }
    }
}

/// Appends one metrics line; `flushes` (0 or 1) scales the counter deltas.
fn write_metrics(path: Option<&Path>, flushes: u64) {
    let Some(p) = path else { return };
    let line = json!({
        "utc_timestamp_ms": 0,
        "net": {"rx_bytes_count": RX_BYTES_PER_FLUSH * flushes, "tx_bytes_count": 10 * flushes,
            "rx_packets_count": flushes, "tx_packets_count": flushes},
        "block": {"read_bytes": READ_BYTES_PER_FLUSH * flushes, "write_bytes": 512 * flushes,
            "read_count": flushes, "write_count": flushes},
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
    {
        let _ = writeln!(f, "{line}");
    }
}
