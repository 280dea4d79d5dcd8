//! A stand-in `firecracker` binary for the adapter's process-level tests in
//! CI: it accepts Firecracker's command line (`--api-sock`, `--id`,
//! `--level`, `--show-level`, `--metrics-path`, `--version`), refuses a stale socket like the
//! real one, and serves the fake API of `tests/it/fake_fc.rs`. Extra
//! `--fake-*` flags select failure behaviours; tests pass them through a
//! wrapper script used as the binary. `--fake-chroot DIR` resolves every
//! path under DIR, standing in for a jailed Firecracker. It dies with the
//! process that started it (a failed test leaks nothing) unless given
//! `--fake-outlive-parent`, as a real VMM outlives a crashed VMCP;
//! `--fake-parent PID` names that process, in case it died first.
//! `--fake-fail-snapshot-write N` makes the Nth snapshot create fail half-written.

// The binary serves the fake; the in-process inspection helpers go unused.
#[path = "../tests/it/fake_fc.rs"]
#[allow(dead_code)]
mod fake_fc;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fake_fc::{Behaviour, FakeFc};

fn log(id: &str, level: &str, msg: &str) {
    println!("1970-01-01T00:00:00.000000000 [{id}:main:{level}] {msg}");
}

/// The kernel kills this fake when its parent goes; if the parent (`started_by`)
/// went before that was arranged, it exits now.
fn die_with_parent(started_by: Option<i32>) {
    if let Err(e) =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
    {
        eprintln!("fake firecracker: PR_SET_PDEATHSIG: {e}");
        std::process::exit(1);
    }
    let parent = rustix::process::Pid::as_raw(rustix::process::getppid());
    if started_by.is_some_and(|p| p != parent) {
        std::process::exit(1);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket: Option<PathBuf> = None;
    let mut id = "anonymous-instance".to_owned();
    let mut behaviour = Behaviour {
        id: String::new(),
        ctrl_alt_del_exits: false,
        poweroff_after: None,
        hang_on: Vec::new(),
        slow: Vec::new(),
        exit_on: Vec::new(),
        on_exit: Arc::new(|code| std::process::exit(code)),
        chroot: None,
        fail_snapshot_write: None,
    };
    let mut metrics_path: Option<String> = None;
    let mut fail_start = false;
    let mut never_ready = false;
    let mut outlive_parent = false;
    let mut started_by: Option<i32> = None;
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--version" => {
                println!("Firecracker v1.16.1\n");
                return;
            }
            "--api-sock" => socket = Some(PathBuf::from(value())),
            "--id" => id = value(),
            "--level" => drop(value()),
            "--show-level" => {}
            "--metrics-path" => metrics_path = Some(value()),
            "--fake-ctrl-alt-del-exits" => behaviour.ctrl_alt_del_exits = true,
            "--fake-poweroff-after-ms" => {
                behaviour.poweroff_after =
                    Some(Duration::from_millis(value().parse().unwrap_or(100)));
            }
            "--fake-hang-on" => behaviour.hang_on.push(value()),
            "--fake-slow" => {
                // `METHOD /path=MILLISECONDS`
                let v = value();
                let (call, ms) = v.rsplit_once('=').unwrap_or((&v, "100"));
                let ms = ms.parse().unwrap_or(100);
                behaviour
                    .slow
                    .push((call.to_owned(), Duration::from_millis(ms)));
            }
            "--fake-outlive-parent" => outlive_parent = true,
            "--fake-parent" => started_by = value().parse().ok(),
            "--fake-exit-on" => behaviour.exit_on.push(value()),
            "--fake-fail-start" => fail_start = true,
            "--fake-chroot" => behaviour.chroot = Some(PathBuf::from(value())),
            "--fake-never-ready" => never_ready = true,
            "--fake-fail-snapshot-write" => behaviour.fail_snapshot_write = value().parse().ok(),
            other => {
                log(
                    &id,
                    "ERROR",
                    &format!(
                        "Arguments parsing error: Found argument '{other}' which wasn't expected, or isn't valid in this context."
                    ),
                );
                std::process::exit(153);
            }
        }
    }
    behaviour.id = id.clone();
    if !outlive_parent {
        die_with_parent(started_by);
    }
    if fail_start {
        log(&id, "ERROR", "Failed to start: simulated start-up failure");
        std::process::exit(1);
    }
    if never_ready {
        loop {
            std::thread::park();
        }
    }
    let Some(socket) = socket else {
        log(&id, "ERROR", "Missing argument: api-sock");
        std::process::exit(153);
    };
    let socket = behaviour.host(&socket.to_string_lossy());
    let fake = FakeFc::new(behaviour);
    // Like Firecracker, the metrics file is opened before the API socket.
    if let Some(path) = metrics_path
        && let Err(e) = fake.init_metrics(&path)
    {
        log(&id, "ERROR", &format!("Failed to initialize metrics: {e}"));
        std::process::exit(1);
    }
    if socket.exists() {
        log(
            &id,
            "ERROR",
            &format!(
                "RunWithApiError error: Failed to open the API socket at: {}. Check that it is not already used.",
                socket.display()
            ),
        );
        std::process::exit(1);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log(&id, "ERROR", &format!("cannot build runtime: {e}"));
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                log(&id, "ERROR", &format!("Failed to bind socket: {e}"));
                std::process::exit(1);
            }
        };
        log(&id, "INFO", "Running Firecracker v1.16.1");
        fake.serve(listener).await;
    });
}
