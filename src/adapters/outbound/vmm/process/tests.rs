//! Tests of process supervision: runtime directories, /proc identity, exit
//! reporting and classification, spawning, adoption and termination.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::domain::{VmId, VmState};
use crate::ports::{HypervisorError, VmmEvent};
use tokio::sync::mpsc;

fn reporter(id: &str) -> (ExitReporter, mpsc::UnboundedReceiver<VmmEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reporter = ExitReporter {
        vm_id: VmId::parse(id).expect("valid id"),
        events: tx,
        classify: Arc::new(|info: &ExitInfo| {
            if info.is_clean() {
                VmState::Shutdown
            } else {
                VmState::Failed
            }
        }),
    };
    (reporter, rx)
}

fn sh(script: &str) -> SpawnSpec {
    SpawnSpec {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), script.into()],
        listen_on_stdin: None,
        ready_timeout: Duration::from_secs(5),
    }
}

async fn ready() -> Result<(), String> {
    Ok(())
}

/// `id`'s runtime directory under `root`, prepared as the supervisor
/// prepares it before a spawn.
fn prepared(root: &std::path::Path, id: &VmId) -> RuntimeDir {
    let dir = RuntimeDir::new(root, id);
    dir.prepare().expect("prepare");
    dir
}

#[test]
fn start_time_of_self_is_readable_and_alive() {
    let me = std::process::id();
    let t = read_start_time(me).expect("own stat");
    assert!(is_alive(me, t));
    assert!(!is_alive(me, t + 1));
    let stats = proc_stats(me, t).expect("own stats");
    assert!(stats.rss_bytes > 0);
    assert!(stats.cpu_percent >= 0.0);
}

#[test]
fn runtime_dir_is_private_and_cleans_stale_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("run");
    let dir = RuntimeDir::new(&root, &VmId::parse("vm1").expect("id"));
    dir.prepare().expect("prepare");
    let mode = fs::metadata(dir.path()).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let root_mode = fs::metadata(&root).expect("meta").permissions().mode() & 0o777;
    assert_eq!(root_mode, 0o700);
    fs::write(dir.api_socket(), b"").expect("write");
    fs::write(dir.path().join("api.sock.lock"), b"").expect("write");
    fs::write(dir.log_file(), b"keep").expect("write");
    dir.prepare().expect("prepare again");
    assert!(!dir.api_socket().exists());
    assert!(!dir.path().join("api.sock.lock").exists());
    assert!(dir.log_file().exists());
    dir.remove().expect("remove");
    assert!(!dir.exists());
    dir.remove().expect("remove twice");
}

#[test]
fn long_socket_paths_are_refused() {
    let root = PathBuf::from(format!("/tmp/{}", "d".repeat(60)));
    let dir = RuntimeDir::new(&root, &VmId::parse(&"v".repeat(50)).expect("id"));
    assert!(matches!(
        dir.prepare(),
        Err(ProcessError::SocketPathTooLong(_))
    ));
    assert!(!root.exists());
}

#[test]
fn log_tail_keeps_the_last_lines() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = tmp.path().join("log");
    let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
    fs::write(&p, text).expect("write");
    let tail = log_tail(&p, 3);
    assert_eq!(tail, "line 27\nline 28\nline 29");
    assert!(log_tail(&tmp.path().join("missing"), 3).starts_with("(cannot read"));
}

#[test]
fn statuses_are_described() {
    assert_eq!(
        describe_status(Some(ExitStatus::from_raw(3 << 8))),
        "exited with status 3"
    );
    assert_eq!(
        describe_status(Some(ExitStatus::from_raw(libc::SIGKILL))),
        "killed by signal 9 (SIGKILL)"
    );
    assert!(describe_status(None).contains("unknown"));
}

#[tokio::test]
async fn a_crash_is_reported_with_status_and_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("crashy");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let sup = Supervised::spawn(
        &sh("echo booting; read x; echo dying >&2; exit 7"),
        dir.clone(),
        rep,
        ready,
    )
    .await
    .expect("spawn");
    // stdin is /dev/null, so `read` returns at once and the script exits 7.
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    let VmmEvent::Exited { pid, state, reason } = ev else {
        panic!("expected Exited, got {ev:?}");
    };
    assert_eq!(pid, sup.pid(), "the event names the process that ended");
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("exited with status 7"), "{reason}");
    assert!(reason.contains("dying"), "{reason}");
    assert!(sup.exited().is_some());
    assert_eq!(
        fs::read_to_string(dir.pid_file()).expect("pid file").trim(),
        sup.pid().to_string()
    );
}

#[tokio::test]
async fn a_clean_exit_is_classified_by_the_backend() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("clean");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let _sup = Supervised::spawn(&sh("read x; exit 0"), dir, rep, ready)
        .await
        .expect("spawn");
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    assert!(
        matches!(
            ev,
            VmmEvent::Exited {
                state: VmState::Shutdown,
                ..
            }
        ),
        "{ev:?}"
    );
}

#[tokio::test]
async fn terminate_is_expected_and_silent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("quiet");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let sup = Supervised::spawn(&sh("exec sleep 600"), dir, rep, ready)
        .await
        .expect("spawn");
    assert!(is_alive(sup.pid(), sup.start_time()));
    let info = sup.terminate(Duration::from_secs(2)).await.expect("reaped");
    assert_eq!(info.describe_status(), "killed by signal 15 (SIGTERM)");
    assert!(!is_alive(sup.pid(), sup.start_time()));
    assert!(events.try_recv().is_err(), "no event for an expected exit");
}

#[tokio::test]
async fn a_process_nobody_holds_any_more_exits_quietly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("letgo");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let sup = Supervised::spawn(&sh("exec sleep 600"), dir, rep, ready)
        .await
        .expect("spawn");
    let (pid, start) = (sup.pid(), sup.start_time());
    drop(sup);
    assert!(is_alive(pid, start), "letting go does not end the VMM");
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    rustix::process::kill_process(raw, rustix::process::Signal::KILL).expect("kill");
    // The reaper still reaps it, and tells nobody.
    let quiet = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(!matches!(quiet, Ok(Some(_))), "{quiet:?}");
    assert!(!is_alive(pid, start));
}

#[tokio::test]
async fn clean_only_expectation_still_reports_a_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("half");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let sup = Supervised::spawn(&sh("exec sleep 600"), dir, rep, ready)
        .await
        .expect("spawn");
    assert!(sup.expect_exit(ExitExpectation::CleanOnly));
    sup.signal(rustix::process::Signal::KILL).expect("kill");
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    let VmmEvent::Exited { state, reason, .. } = ev else {
        panic!("expected Exited, got {ev:?}");
    };
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("SIGKILL"), "{reason}");
    assert!(
        !sup.expect_exit(ExitExpectation::Unexpected),
        "already exited"
    );
}

#[tokio::test]
async fn clean_only_expectation_swallows_a_clean_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("poweroff");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let marker = tmp.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; exit 0",
        marker.display()
    );
    let sup = Supervised::spawn(&sh(&script), dir, rep, ready)
        .await
        .expect("spawn");
    assert!(sup.expect_exit(ExitExpectation::CleanOnly));
    fs::write(&marker, b"").expect("touch");
    let info = sup.wait_exit(Duration::from_secs(2)).await.expect("exits");
    assert!(info.is_clean());
    assert!(events.try_recv().is_err(), "a clean exit was expected");
}

#[tokio::test]
async fn sigterm_ignored_means_sigkill_after_grace() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, _events) = reporter("stubborn");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let marker = tmp.path().join("trapped");
    let script = format!("trap '' TERM; touch {}; exec sleep 600", marker.display());
    // Ready only once the trap is installed (the ignored disposition
    // survives exec), so SIGTERM cannot win a race against it.
    let sup = Supervised::spawn(&sh(&script), dir, rep, || {
        let exists = marker.exists();
        async move {
            if exists {
                Ok(())
            } else {
                Err("not trapped yet")
            }
        }
    })
    .await
    .expect("spawn");
    let info = sup
        .terminate(Duration::from_millis(200))
        .await
        .expect("reaped");
    assert_eq!(info.describe_status(), "killed by signal 9 (SIGKILL)");
}

#[tokio::test]
async fn never_ready_is_killed_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, mut events) = reporter("slow");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let mut spec = sh("echo warming up; exec sleep 600");
    spec.ready_timeout = Duration::from_millis(150);
    let err = Supervised::spawn(&spec, dir.clone(), rep, || async {
        Err::<(), _>("connection refused")
    })
    .await
    .expect_err("never ready");
    let text = err.to_string();
    assert!(text.contains("did not become ready"), "{text}");
    assert!(text.contains("connection refused"), "{text}");
    assert!(text.contains("warming up"), "{text}");
    assert!(!dir.exists());
    assert!(events.try_recv().is_err());
}

#[tokio::test]
async fn dying_during_startup_is_a_spawn_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, _events) = reporter("dies");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let started = Instant::now();
    let err = Supervised::spawn(
        &sh("echo 'bad flag' >&2; exit 2"),
        dir.clone(),
        rep,
        || async { Err::<(), _>("no socket yet") },
    )
    .await
    .expect_err("dies");
    assert!(started.elapsed() < Duration::from_secs(2));
    let err = HypervisorError::from(err);
    let HypervisorError::SpawnFailed { message, source } = &err else {
        panic!("expected SpawnFailed, got {err:?}");
    };
    assert!(
        message.contains("exited during start-up: exited with status 2"),
        "{message}"
    );
    // The log tail rides in the source, the ProcessError itself.
    let cause = source.as_ref().expect("the ProcessError is kept");
    assert!(cause.downcast_ref::<ProcessError>().is_some(), "{cause:?}");
    assert!(cause.to_string().contains("bad flag"), "{cause}");
    assert!(!dir.exists());
}

/// A socket VMCP listens on is the child's stdin: a client connects before
/// the child does anything (its request waits in the backlog), the child
/// holds the only listener, and once the child is gone nothing accepts.
#[tokio::test]
async fn a_socket_handed_over_as_stdin_is_the_childs_alone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, _events) = reporter("handed");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let socket = dir.api_socket();
    let spec = SpawnSpec {
        listen_on_stdin: Some(socket.clone()),
        // Binds nothing itself, and never accepts.
        ..sh("exec sleep 600")
    };
    let probed = socket.clone();
    let sup = Supervised::spawn(&spec, dir, rep, move || {
        let socket = probed.clone();
        async move { std::os::unix::net::UnixStream::connect(&socket).map(drop) }
    })
    .await
    .expect("a connect succeeds at once: the socket listens before the spawn");
    let fd0 = fs::read_link(format!("/proc/{}/fd/0", sup.pid())).expect("the child's stdin");
    assert!(
        fd0.to_string_lossy().starts_with("socket:"),
        "stdin is {}",
        fd0.display()
    );
    let own_listeners = fs::read_dir("/proc/self/fd")
        .expect("own descriptors")
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .filter(|target| *target == fd0)
        .count();
    assert_eq!(own_listeners, 0, "VMCP keeps no copy of the listener");
    sup.terminate(Duration::from_secs(2)).await.expect("reaped");
    let refused = std::os::unix::net::UnixStream::connect(&socket).expect_err("nobody listens");
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refused}"
    );
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (rep, _events) = reporter("nobin");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let spec = SpawnSpec {
        program: tmp.path().join("no-such-vmm"),
        args: vec![],
        listen_on_stdin: None,
        ready_timeout: Duration::from_secs(1),
    };
    let err = Supervised::spawn(&spec, dir.clone(), rep, ready)
        .await
        .expect_err("missing");
    assert!(matches!(err, ProcessError::Exec { .. }));
    assert!(!dir.exists());
}

#[tokio::test]
async fn adoption_verifies_identity_and_watches_exit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // A process that is not our tokio child: spawned by std, reaped by a thread.
    let mut child = std::process::Command::new("/bin/sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    let pid = child.id();
    let start = read_start_time(pid).expect("start");
    let (rep, mut events) = reporter("adopted");
    let dir = prepared(tmp.path(), &rep.vm_id);
    let wrong = Supervised::adopt(
        pid,
        start + 1,
        "/bin/sleep".into(),
        dir.clone(),
        rep.clone(),
    );
    assert!(matches!(wrong, Err(ProcessError::Gone { .. })));
    let sup = Supervised::adopt(pid, start, "/bin/sleep".into(), dir, rep).expect("adopt");
    assert!(sup.is_adopted());
    let reaper = std::thread::spawn(move || child.wait());
    sup.signal(rustix::process::Signal::KILL).expect("kill");
    let ev = tokio::time::timeout(Duration::from_secs(1), events.recv())
        .await
        .expect("event within a second")
        .expect("event");
    let VmmEvent::Exited {
        pid: ended,
        state,
        reason,
    } = ev
    else {
        panic!("expected Exited, got {ev:?}");
    };
    assert_eq!(ended, pid);
    assert_eq!(state, VmState::Failed);
    assert!(reason.contains("status unknown"), "{reason}");
    reaper.join().expect("join").expect("wait");
}
