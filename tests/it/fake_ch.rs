//! A fake Cloud Hypervisor: the REST subset VMCP uses, served over a Unix
//! socket with CH v53's state rules and error bodies (recorded from the real
//! binary: 404 `["Error from API","…","VM is not created"]` when no VM,
//! 500 with the reason when the state forbids the call, `vm.shutdown` →
//! Created, `vm.reboot` from Paused → Running, `vm.counters` only while
//! running, `vmm.shutdown` → 200 and exit). Started with `--event-monitor
//! path=FILE` it appends CH v53's events to FILE as CH does: one
//! pretty-printed JSON object per event, back to back (`vmm/starting`,
//! `vm/booting`, `vm/booted`, `vm/pausing`, `vm/paused`, `vm/resuming`,
//! `vm/resumed`, `vm/rebooting`, `vm/rebooted`, `vm/shutdown`, `vm/deleted`,
//! `vmm/shutdown`), also for calls other clients make on its socket.
//!
//! Like CH's API thread it serves one request at a time, across all
//! connections: a request that hangs or is slow ([`Behaviour::slow`])
//! holds up every other client until it is answered.
//!
//! It runs two ways. In-process ([`FakeCh::start`]) for client-level tests
//! with fault injection. As a separate process for the adapter, which spawns
//! `cloud-hypervisor --api-socket path=…`: [`install`] writes a small
//! `cloud-hypervisor` script that re-executes this test binary, filtered to
//! [`fake_vmm_entry`], with the arguments and a [`Behaviour`] in the
//! environment; that test then serves the socket until told to exit. So no
//! extra binary target is needed and a filtered `cargo test --test it` works.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::UnixListener;

/// What the fake guest does with the ACPI power button.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acpi {
    /// Nothing (like the tiny test guest): the VM keeps running.
    #[default]
    Ignore,
    /// Powers off: the VMM process exits 0 (like real CH with a Linux guest).
    PowerOff,
    /// vm.info reports Shutdown and the process stays.
    ReportShutdown,
}

/// Faults and guest behaviour of one fake VMM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Behaviour {
    /// Power-button handling.
    #[serde(default)]
    pub acpi: Acpi,
    /// Endpoints (e.g. `vm.info`) that are accepted but never answered
    /// (nothing else is answered after them either: one request at a time).
    #[serde(default)]
    pub hang_on: Vec<String>,
    /// Endpoints applied as usual but answered only after this many
    /// milliseconds: a slow, successful VMM (other requests wait their turn).
    #[serde(default)]
    pub slow: BTreeMap<String, u64>,
    /// Endpoint on which the process exits with this status mid-call
    /// (in-process: the connection is dropped without an answer).
    #[serde(default)]
    pub exit_on: Option<(String, i32)>,
    /// Endpoint after which the listener is closed (socket stays, refuses).
    #[serde(default)]
    pub stop_listening_after: Option<String>,
    /// Forced answers: endpoint → (status, body).
    #[serde(default)]
    pub answer: BTreeMap<String, (u16, String)>,
    /// Exit with this status at start-up, after printing to stderr.
    #[serde(default)]
    pub fail_at_start: Option<i32>,
    /// Never create the socket.
    #[serde(default)]
    pub never_listen: bool,
    /// Directory where each fake process writes a file `<pid>` holding
    /// `<pid> <start time>`, so tests can check none outlives them.
    #[serde(default)]
    pub pid_dir: Option<String>,
    /// Keep running when the spawning process dies (VMMs must outlive a crashed VMCP);
    /// the test then ends the fake itself, by the pid it recorded in `pid_dir`.
    /// Otherwise the fake dies with its parent (`PR_SET_PDEATHSIG`), so a failed
    /// test leaks no process.
    #[serde(default)]
    pub outlive_parent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Created,
    Running,
    Paused,
    Shutdown,
}

impl St {
    fn name(self) -> &'static str {
        match self {
            St::Created => "Created",
            St::Running => "Running",
            St::Paused => "Paused",
            St::Shutdown => "Shutdown",
        }
    }
}

/// What the fake holds, for assertions.
#[derive(Debug, Default)]
pub struct FakeState {
    vm: Option<(Value, St)>,
    /// Every request as `METHOD endpoint`, in order.
    pub calls: Vec<String>,
    /// Connections accepted.
    pub connections: usize,
    /// Whether the listener still accepts.
    pub listening: bool,
    /// The event monitor's file (`--event-monitor path=…`), if any.
    pub event_file: Option<PathBuf>,
    /// Boot memory at vm.create: the hot-plug area starts above it.
    boot_ram: i64,
}

/// When this fake VMM started: CH's event timestamps count from there.
static STARTED: OnceLock<Instant> = OnceLock::new();

impl FakeState {
    /// Appends `source/event` to the event file as CH v53 writes it.
    fn emit(&self, source: &str, event: &str) {
        let Some(path) = &self.event_file else { return };
        let since = STARTED.get_or_init(Instant::now).elapsed();
        let record = json!({
            "timestamp": {"secs": since.as_secs(), "nanos": since.subsec_nanos()},
            "source": source,
            "event": event,
            "properties": null,
        });
        let text = serde_json::to_string_pretty(&record).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Moves the VM to `to`, announcing the change as CH does.
    fn transition(&mut self, to: St, events: &[&str]) {
        if let Some((_, s)) = self.vm.as_mut() {
            *s = to;
        }
        for e in events {
            self.emit("vm", e);
        }
    }
}

/// What a handler decided.
enum Outcome {
    Answer(StatusCode, String),
    Hang,
    /// Die mid-call without answering.
    ExitAfter(i32),
    /// Answer, then exit with this status once the answer is written (as CH
    /// does on `vmm.shutdown`, and when its guest powers off); in-process,
    /// only the answer.
    AnswerThenExit(StatusCode, String, i32),
}

fn err(status: u16, parts: &[&str]) -> Outcome {
    let mut all = vec!["Error from API"];
    all.extend_from_slice(parts);
    Outcome::Answer(
        StatusCode::from_u16(status).unwrap(),
        serde_json::to_string(&all).unwrap(),
    )
}

fn ok204() -> Outcome {
    Outcome::Answer(StatusCode::NO_CONTENT, String::new())
}

/// CH v53's rules for one request.
fn handle(state: &mut FakeState, b: &Behaviour, method: &str, ep: &str, body: &[u8]) -> Outcome {
    state.calls.push(format!("{method} {ep}"));
    if b.hang_on.iter().any(|h| h == ep) {
        return Outcome::Hang;
    }
    if let Some((on, code)) = &b.exit_on
        && on == ep
    {
        return Outcome::ExitAfter(*code);
    }
    if let Some((status, body)) = b.answer.get(ep) {
        return Outcome::Answer(StatusCode::from_u16(*status).unwrap(), body.clone());
    }
    let st = state.vm.as_ref().map(|(_, s)| *s);
    match (method, ep) {
        ("GET", "vmm.ping") => Outcome::Answer(
            StatusCode::OK,
            json!({"build_version": "v53.0-fake", "version": "53.0.0", "pid": std::process::id(), "features": ["kvm"]})
                .to_string(),
        ),
        ("PUT", "vmm.shutdown") => {
            state.emit("vmm", "shutdown");
            Outcome::AnswerThenExit(StatusCode::OK, String::new(), 0)
        }
        ("PUT", "vm.create") => {
            let Ok(cfg) = serde_json::from_slice::<Value>(body) else {
                return Outcome::Answer(
                    StatusCode::BAD_REQUEST,
                    r#"["Failed to deserialize JSON","expected value at line 1 column 1"]"#.into(),
                );
            };
            if st.is_some() {
                return err(500, &["The VM could not be created", "VM is already created"]);
            }
            if cfg.get("payload").and_then(|p| p.get("kernel")).is_none() {
                return err(500, &["The VM could not be created", "Error parsing payload", "kernel missing"]);
            }
            state.boot_ram = cfg["memory"]["size"].as_i64().unwrap_or(0);
            state.vm = Some((cfg, St::Created));
            ok204()
        }
        ("PUT", "vm.boot") => match st {
            None => err(404, &["The VM could not boot", "VM config is missing"]),
            Some(St::Created | St::Shutdown) => {
                let (cfg, _) = state.vm.as_ref().unwrap();
                let kernel = cfg["payload"]["kernel"].as_str().unwrap_or_default().to_owned();
                if !Path::new(&kernel).exists() {
                    return err(500, &["The VM could not boot", "Cannot open kernel file", "No such file or directory (os error 2)"]);
                }
                if cfg["serial"]["mode"] == "File"
                    && let Some(f) = cfg["serial"]["file"].as_str()
                {
                    // CH truncates the serial file on every boot.
                    let _ = std::fs::write(f, "VMCP-GUEST-OK\n");
                }
                state.transition(St::Running, &["booting", "booted"]);
                ok204()
            }
            Some(_) => err(500, &["The VM could not boot", "VM is already created"]),
        },
        ("PUT", "vm.pause") => match st {
            Some(St::Running) => {
                state.transition(St::Paused, &["pausing", "paused"]);
                ok204()
            }
            Some(St::Paused) => err(500, &["The VM could not be paused", "Cannot pause VM", "Failed to pause migratable component", "Invalid transition: InvalidStateTransition(Paused, Paused)"]),
            _ => err(500, &["The VM could not be paused", "VM is not running"]),
        },
        ("PUT", "vm.resume") => match st {
            Some(St::Paused) => {
                state.transition(St::Running, &["resuming", "resumed"]);
                ok204()
            }
            Some(St::Running) => err(500, &["The VM could not resume", "Cannot resume VM", "Failed to resume migratable component", "Invalid transition: InvalidStateTransition(Running, Running)"]),
            _ => err(500, &["The VM could not resume", "VM is not running"]),
        },
        ("PUT", "vm.reboot") => match st {
            Some(St::Running | St::Paused) => {
                state.transition(St::Running, &["rebooting", "rebooted"]);
                ok204()
            }
            _ => err(404, &["The VM could not reboot", "VM is not created"]),
        },
        ("PUT", "vm.shutdown") => match st {
            Some(St::Running | St::Paused) => {
                state.transition(St::Created, &["shutdown"]);
                ok204()
            }
            _ => err(500, &["The VM could not shutdown", "VM is not running"]),
        },
        ("PUT", "vm.power-button") => match st {
            Some(St::Running) => match b.acpi {
                Acpi::Ignore => ok204(),
                Acpi::PowerOff => {
                    state.emit("vm", "shutdown");
                    // Answered first; the guest then powers off and CH exits 0.
                    Outcome::AnswerThenExit(StatusCode::NO_CONTENT, String::new(), 0)
                }
                Acpi::ReportShutdown => {
                    state.transition(St::Shutdown, &["shutdown"]);
                    ok204()
                }
            },
            _ => err(500, &["Error triggering power button", "VM is not running"]),
        },
        ("PUT", "vm.delete") => {
            state.vm = None;
            state.emit("vm", "deleted");
            ok204()
        }
        ("GET", "vm.info") => match &state.vm {
            None => err(404, &["The VM info is not available", "VM is not created"]),
            Some((cfg, s)) => Outcome::Answer(
                StatusCode::OK,
                json!({"config": cfg, "state": s.name(), "memory_actual_size": cfg["memory"]["size"]}).to_string(),
            ),
        },
        ("PUT", "vm.resize") => {
            let Ok(req) = serde_json::from_slice::<Value>(body) else {
                return Outcome::Answer(StatusCode::BAD_REQUEST, r#"["Failed to deserialize JSON"]"#.into());
            };
            let boot_ram = state.boot_ram;
            let Some((cfg, s)) = state.vm.as_mut() else {
                return err(404, &["The VM could not be resized", "VM is not created"]);
            };
            if let Some(v) = req["desired_vcpus"].as_u64() {
                if *s != St::Created && v > cfg["cpus"]["max_vcpus"].as_u64().unwrap_or(1) {
                    return err(500, &["The VM could not be resized", "Error resizing VM: CpuManager(DesiredVCpuCountExceedsMax)"]);
                }
                cfg["cpus"]["boot_vcpus"] = json!(v);
            }
            if let Some(m) = req["desired_ram"].as_i64() {
                let size = cfg["memory"]["size"].as_i64().unwrap_or(0);
                // The hot-plug area is sized at create: boot memory plus hotplug_size.
                let end = boot_ram + cfg["memory"]["hotplug_size"].as_i64().unwrap_or(0);
                if *s != St::Created && m > size && (m - size) % (128 << 20) != 0 {
                    return err(500, &["The VM could not be resized", "Error resizing VM: MemoryManager(InvalidSize)"]);
                }
                if *s != St::Created && m > end {
                    return err(500, &["The VM could not be resized", "Error resizing VM: MemoryManager(InsufficientHotplugRam)"]);
                }
                // ACPI: CH records the size whatever it did (a shrink removes nothing).
                cfg["memory"]["size"] = json!(m);
            }
            ok204()
        }
        ("PUT", "vm.snapshot") => {
            let Some(dir) = file_url(body, "destination_url") else {
                return Outcome::Answer(StatusCode::BAD_REQUEST, r#"["Failed to deserialize JSON"]"#.into());
            };
            match &state.vm {
                None => err(404, &["The VM could not be snapshotted", "VM is not created"]),
                Some((_, St::Paused)) => {
                    let cfg = state.vm.as_ref().unwrap().0.clone();
                    let size = usize::try_from(cfg["memory"]["size"].as_i64().unwrap_or(0) >> 20).unwrap_or(0);
                    let wrote = std::fs::write(dir.join("config.json"), cfg.to_string())
                        .and_then(|()| std::fs::write(dir.join("state.json"), r#"{"fake":true}"#))
                        .and_then(|()| std::fs::write(dir.join("memory-ranges"), vec![0u8; size * 1024]));
                    match wrote {
                        Ok(()) => {
                            state.emit("vm", "snapshotted");
                            ok204()
                        }
                        Err(e) => err(500, &["The VM could not be snapshotted", &e.to_string()]),
                    }
                }
                Some(_) => err(500, &["The VM could not be snapshotted", "Cannot snapshot VM", "VM is not paused"]),
            }
        }
        ("PUT", "vm.restore") => {
            let Some(dir) = file_url(body, "source_url") else {
                return Outcome::Answer(StatusCode::BAD_REQUEST, r#"["Failed to deserialize JSON"]"#.into());
            };
            if st.is_some() {
                return err(500, &["The VM could not be restored", "VM is already created"]);
            }
            let cfg = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            match cfg {
                Some(cfg) if dir.join("state.json").is_file() && dir.join("memory-ranges").is_file() => {
                    state.boot_ram = cfg["memory"]["size"].as_i64().unwrap_or(0);
                    state.vm = Some((cfg, St::Paused));
                    state.emit("vm", "restored");
                    ok204()
                }
                _ => err(500, &["The VM could not be restored", "Error restoring the VM: missing snapshot files"]),
            }
        }
        ("GET", "vm.counters") => match st {
            Some(St::Running | St::Paused) => {
                let cfg = &state.vm.as_ref().unwrap().0;
                let mut c = serde_json::Map::new();
                for d in cfg["disks"].as_array().into_iter().flatten() {
                    c.insert(d["id"].as_str().unwrap_or("_disk").into(), json!({"read_bytes": 4096, "write_bytes": 512, "read_ops": 8, "write_ops": 1}));
                }
                for n in cfg["net"].as_array().into_iter().flatten() {
                    c.insert(n["id"].as_str().unwrap_or("_net").into(), json!({"rx_bytes": 1000, "tx_bytes": 2000, "rx_frames": 10, "tx_frames": 20}));
                }
                Outcome::Answer(StatusCode::OK, Value::Object(c).to_string())
            }
            _ => err(500, &["The VM info is not available", "VM is not running"]),
        },
        _ => Outcome::Answer(StatusCode::NOT_FOUND, r#"["Not Found"]"#.into()),
    }
}

/// The directory a `file://` URL in `field` of a JSON body names.
fn file_url(body: &[u8], field: &str) -> Option<PathBuf> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v[field]
        .as_str()?
        .strip_prefix("file://")
        .map(PathBuf::from)
}

/// An in-process fake CH serving one socket.
pub struct FakeCh {
    /// The fake's state, for assertions.
    pub state: Arc<Mutex<FakeState>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCh {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCh {
    /// Serves `socket` with `behaviour` in this process. `ExitAfter` drops
    /// the connection instead of exiting.
    pub fn start(socket: &Path, behaviour: Behaviour) -> FakeCh {
        let listener = UnixListener::bind(socket).unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            listening: true,
            ..Default::default()
        }));
        let task = tokio::spawn(serve(listener, state.clone(), Arc::new(behaviour), false));
        FakeCh { state, task }
    }

    /// The requests seen so far.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<FakeState>>,
    b: Arc<Behaviour>,
    process: bool,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    // Set once the listener is closed: the answer that stopped it waits for this,
    // so a client that got it finds the socket refusing.
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(false);
    // CH's API thread: one request at a time, whatever the connection.
    let turn = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => return,
            },
            _ = stop_rx.changed() => {
                // Close the listener but keep the socket file: connects are refused.
                state.lock().unwrap().listening = false;
                drop(listener);
                let _ = closed_tx.send(true);
                std::future::pending::<()>().await;
                return;
            }
        };
        state.lock().unwrap().connections += 1;
        let state = state.clone();
        let b = b.clone();
        let stop_tx = stop_tx.clone();
        let closed_rx = closed_rx.clone();
        let turn = turn.clone();
        // Set when this connection's last answer is to be followed by the process's exit.
        let exit_after: Arc<Mutex<Option<i32>>> = Arc::default();
        let exit_code = exit_after.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let state = state.clone();
                let b = b.clone();
                let stop_tx = stop_tx.clone();
                let mut closed_rx = closed_rx.clone();
                let turn = turn.clone();
                let exit_after = exit_after.clone();
                async move {
                    let method = req.method().to_string();
                    let ep = req.uri().path().trim_start_matches("/api/v1/").to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| Dropped(e.to_string()))?
                        .to_bytes();
                    // Served detached, in its turn: a client that gives up (a timeout
                    // closing its connection) does not take its request back, which
                    // is still applied and keeps the API busy as long as it would
                    // have (forever, if it hangs).
                    let served = {
                        let (b, ep) = (b.clone(), ep.clone());
                        tokio::spawn(async move {
                            let turn = turn.lock_owned().await;
                            let outcome =
                                handle(&mut state.lock().unwrap(), &b, &method, &ep, &body);
                            if matches!(outcome, Outcome::Hang) {
                                let _held = turn;
                                std::future::pending::<()>().await;
                            }
                            if let Some(ms) = b.slow.get(&ep) {
                                // The slow VMM is the behaviour: applied now, answered late.
                                tokio::time::sleep(Duration::from_millis(*ms)).await;
                            }
                            outcome
                        })
                    };
                    let outcome = served.await.map_err(|e| Dropped(e.to_string()))?;
                    if b.stop_listening_after.as_deref() == Some(ep.as_str()) {
                        let _ = stop_tx.send(true);
                        let _ = closed_rx.wait_for(|closed| *closed).await;
                    }
                    match outcome {
                        Outcome::Answer(status, body) => Ok::<_, Dropped>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap(),
                        ),
                        Outcome::Hang => {
                            std::future::pending::<()>().await;
                            unreachable!()
                        }
                        Outcome::AnswerThenExit(status, body, code) => {
                            let mut answer = Response::builder().status(status);
                            if process {
                                // The connection closes once the answer is written;
                                // the process exits then (see below).
                                *exit_after.lock().unwrap() = Some(code);
                                answer = answer.header("connection", "close");
                            }
                            Ok(answer.body(Full::new(Bytes::from(body))).unwrap())
                        }
                        Outcome::ExitAfter(code) => {
                            if process {
                                eprintln!(
                                    "fake cloud-hypervisor: dying on {ep} with status {code}"
                                );
                                std::process::exit(code);
                            }
                            // In-process: hyper closes the connection unanswered.
                            Err(Dropped(format!("dropped on {ep}")))
                        }
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Some(code) = *exit_code.lock().unwrap() {
                std::process::exit(code);
            }
        });
    }
}

/// Returned by a handler so hyper closes the connection without answering.
#[derive(Debug)]
struct Dropped(String);

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Dropped {}

/// Carries the socket path to the fake in process mode.
const ENV_SOCKET: &str = "VMCP_FAKE_CH_SOCKET";
/// Set when the listener on the socket is the fake's stdin (`--api-socket path=…,fd=0`).
const ENV_STDIN_LISTENS: &str = "VMCP_FAKE_CH_STDIN_LISTENS";
/// Carries the [`Behaviour`] (JSON) to the fake in process mode.
const ENV_BEHAVIOUR: &str = "VMCP_FAKE_CH_BEHAVIOUR";
/// Carries the event monitor's file (empty: none) to the fake in process mode.
const ENV_EVENTS: &str = "VMCP_FAKE_CH_EVENTS";
/// Carries the pid of the process that started the fake, to notice it died first.
const ENV_PARENT: &str = "VMCP_FAKE_CH_PARENT";

/// Writes an executable `cloud-hypervisor` in `dir` that runs this test
/// binary as a fake VMM with `behaviour`, and returns its path.
pub fn install(dir: &Path, behaviour: &Behaviour) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let json = serde_json::to_string(behaviour).unwrap();
    assert!(
        !json.contains('\''),
        "behaviour must not contain single quotes"
    );
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = "--version" ]; then echo "cloud-hypervisor v53.0-fake"; echo "Migration Protocol Versions: 0"; exit 0; fi
socket=""
events=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --api-socket) socket="$2" ;;
    --event-monitor) events="$2" ;;
    *) echo "fake cloud-hypervisor: unexpected arguments: $*" >&2; exit 2 ;;
  esac
  shift 2 || {{ echo "fake cloud-hypervisor: $1 needs a value" >&2; exit 2; }}
done
if [ -z "$socket" ]; then echo "fake cloud-hypervisor: --api-socket is required" >&2; exit 2; fi
# VMCP passes `path=SOCKET,fd=0`: it listens on SOCKET and hands the listener over as stdin.
socket_path="${{socket#path=}}"
export {ENV_SOCKET}="${{socket_path%%,*}}"
case "$socket" in *,fd=0) export {ENV_STDIN_LISTENS}=1 ;; esac
export {ENV_EVENTS}="${{events#path=}}"
export {ENV_BEHAVIOUR}='{json}'
export {ENV_PARENT}="$PPID"
# The socket path rides along as a second (never matching) test filter so that the process's
# command line names its socket, as a real cloud-hypervisor's does.
exec '{exe}' fake_ch::fake_vmm_entry "$socket" --exact --nocapture --test-threads=1 -q
"#,
        exe = exe.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("cloud-hypervisor");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// In process mode, serves the fake VMM until `vmm.shutdown` (or a fault)
/// ends the process. Otherwise checks that process mode works: spawned
/// through the script, it answers ping and vm.info like CH and exits 0 on
/// vmm.shutdown.
#[test]
fn fake_vmm_entry() {
    let Some(socket) = std::env::var_os(ENV_SOCKET) else {
        return self_test();
    };
    let b: Behaviour = std::env::var(ENV_BEHAVIOUR)
        .ok()
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or_default();
    eprintln!(
        "fake cloud-hypervisor: pid {} serving {}",
        std::process::id(),
        Path::new(&socket).display()
    );
    if let Some(dir) = &b.pid_dir {
        let me = std::process::id();
        let start = vmcp::adapters::outbound::vmm::process::read_start_time(me).unwrap();
        std::fs::write(Path::new(dir).join(me.to_string()), format!("{me} {start}")).unwrap();
    }
    if let Some(code) = b.fail_at_start {
        eprintln!("fake cloud-hypervisor: Error: refusing to start (injected fault)");
        std::process::exit(code);
    }
    if !b.outlive_parent {
        die_with_parent();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let event_file = std::env::var_os(ENV_EVENTS)
        .filter(|e| !e.is_empty())
        .map(PathBuf::from);
    rt.block_on(async move {
        if b.never_listen {
            std::future::pending::<()>().await;
        }
        let listener = if std::env::var_os(ENV_STDIN_LISTENS).is_some() {
            // Like CH's `--api-socket fd=0`: serve the listener on stdin, owning
            // it, so that dropping it (`stop_listening_after`) closes the socket.
            let listener = std::os::unix::net::UnixListener::from(take_stdin());
            listener.set_nonblocking(true).unwrap();
            UnixListener::from_std(listener).unwrap()
        } else {
            UnixListener::bind(&socket).unwrap()
        };
        let state = FakeState {
            listening: true,
            event_file,
            ..Default::default()
        };
        state.emit("vmm", "starting");
        serve(listener, Arc::new(Mutex::new(state)), Arc::new(b), true).await;
    });
    std::process::exit(0);
}

/// Descriptor 0, owned: the listening socket VMCP handed over as stdin.
#[allow(unsafe_code)]
fn take_stdin() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: descriptor 0 is open (the listener the fake was started with),
    // and nothing else in this process uses stdin, so this is its only owner.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(0) }
}

/// A fake must not outlive the test process that spawned it (a failed test
/// would otherwise leak it): the kernel kills it when its parent goes, and
/// if the parent went before that was arranged, it exits now.
fn die_with_parent() {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .expect("PR_SET_PDEATHSIG");
    // The script read its parent when it started; init (1) there means the
    // parent was already gone by then.
    let started_by = std::env::var(ENV_PARENT)
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    let parent = rustix::process::Pid::as_raw(rustix::process::getppid());
    if started_by.is_some_and(|p| p != parent || p == 1) {
        std::process::exit(1);
    }
}

fn self_test() {
    use vmcp::adapters::outbound::vmm::UdsClient;
    let tmp = tempfile::tempdir().unwrap();
    let bin = install(&tmp.path().join("bin"), &Behaviour::default());
    let socket = tmp.path().join("api.sock");
    let events = tmp.path().join("events.json");
    let mut child = std::process::Command::new(&bin)
        .arg("--api-socket")
        .arg(format!("path={}", socket.display()))
        .arg("--event-monitor")
        .arg(format!("path={}", events.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = UdsClient::new(Duration::from_secs(2));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let ping = loop {
            match http
                .call(&socket, http::Method::GET, "/api/v1/vmm.ping", None)
                .await
            {
                Ok(r) => break r,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("fake never answered: {e}"),
            }
        };
        assert_eq!(ping.status, StatusCode::OK);
        let info = http
            .call(&socket, http::Method::GET, "/api/v1/vm.info", None)
            .await
            .unwrap();
        assert_eq!(info.status, StatusCode::NOT_FOUND);
        assert_eq!(
            info.text(),
            r#"["Error from API","The VM info is not available","VM is not created"]"#
        );
        let bye = http
            .call(&socket, http::Method::PUT, "/api/v1/vmm.shutdown", None)
            .await
            .unwrap();
        assert_eq!(bye.status, StatusCode::OK);
    });
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    // The events as CH writes them, readable by VMCP's own parser.
    let mut written = std::fs::read(&events).unwrap();
    let seen: Vec<String> =
        vmcp::adapters::outbound::cloud_hypervisor::events::drain_events(&mut written)
            .into_iter()
            .map(|e| format!("{}/{}", e.source, e.event))
            .collect();
    assert_eq!(seen, ["vmm/starting", "vmm/shutdown"]);
    assert!(written.is_empty(), "nothing left over");
}
