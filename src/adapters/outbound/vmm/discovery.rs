//! Finding VMM processes that a previous VMCP left behind. Every VMM runs in
//! `<root>/<vm id>/` with a pid file; after a crash between spawning a VMM and
//! recording it, the runtime directory is the only trace. A pid is trusted
//! only if the live process's command line names that directory's API socket,
//! so a recycled pid is never mistaken for a VMM.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::domain::VmId;
use crate::ports::VmmProcess;

use super::process::{RuntimeDir, is_alive, read_start_time};

/// A VMM found in a runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The VM the directory belongs to.
    pub id: VmId,
    /// The live process, when one still runs there.
    pub process: Option<VmmProcess>,
}

/// Whether `pid`'s command line mentions `socket` (so it is the VMM of that directory).
fn cmdline_names(pid: u32, socket: &Path) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = socket.as_os_str().as_encoded_bytes();
    raw.split(|b| *b == 0)
        .any(|arg| arg.windows(needle.len().max(1)).any(|w| w == needle))
}

/// Lists every runtime directory under `root` with its live VMM, if any.
pub fn scan(root: &Path) -> std::io::Result<Vec<Found>> {
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let Ok(id) = VmId::parse(&entry.file_name().to_string_lossy()) else {
            continue;
        };
        let dir = RuntimeDir::new(root, &id);
        let socket = dir.api_socket();
        let process = fs::read_to_string(dir.pid_file())
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .and_then(|pid| {
                let start_time = read_start_time(pid).ok()?;
                (is_alive(pid, start_time) && cmdline_names(pid, &socket)).then(|| VmmProcess {
                    pid,
                    start_time,
                    socket_path: socket.to_string_lossy().into_owned(),
                })
            });
        found.push(Found { id, process });
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// Ends a VMM that belongs to no VM (SIGKILL, then waits up to `wait` for it to go)
/// and removes its runtime directory.
pub async fn destroy(
    root: &Path,
    id: &VmId,
    process: Option<&VmmProcess>,
    wait: Duration,
) -> std::io::Result<()> {
    if let Some(p) = process
        && is_alive(p.pid, p.start_time)
    {
        let pid = rustix::process::Pid::from_raw(i32::try_from(p.pid).unwrap_or(i32::MAX))
            .ok_or_else(|| std::io::Error::other("pid 0"))?;
        rustix::process::kill_process(pid, rustix::process::Signal::KILL)
            .map_err(std::io::Error::from)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while is_alive(p.pid, p.start_time) && tokio::time::Instant::now() < deadline {
            tick.tick().await;
        }
    }
    RuntimeDir::new(root, id)
        .remove()
        .map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finds_live_vmms_by_pid_file_and_cmdline_and_ignores_recycled_pids() {
        let root = tempfile::tempdir().expect("tempdir");
        let live = VmId::parse("live").expect("id");
        let stale = VmId::parse("stale").expect("id");
        let dir = RuntimeDir::new(root.path(), &live);
        dir.prepare().expect("prepare");
        // A stand-in VMM whose command line names the directory's socket.
        let socket = dir.api_socket();
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("sleep 30; :")
            .arg(socket.as_os_str())
            .spawn()
            .expect("spawn");
        let pid = child.id().expect("pid");
        // Between fork and exec the child still shows the test's command line; wait for the exec.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !cmdline_names(pid, &socket) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fs::write(dir.pid_file(), format!("{pid}\n")).expect("pid file");
        // A directory whose pid file names a live process that is not its VMM (this test).
        let other = RuntimeDir::new(root.path(), &stale);
        other.prepare().expect("prepare");
        fs::write(other.pid_file(), format!("{}\n", std::process::id())).expect("pid file");
        fs::create_dir(root.path().join("not a vm id")).expect("dir");

        let found = scan(root.path()).expect("scan");
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].id, live);
        let p = found[0].process.clone().expect("live VMM found");
        assert_eq!(p.pid, pid);
        assert_eq!(found[1].id, stale);
        assert_eq!(
            found[1].process, None,
            "a pid that is not this directory's VMM is not trusted"
        );

        destroy(root.path(), &live, Some(&p), Duration::from_secs(5))
            .await
            .expect("destroy");
        let status = child.wait().await.expect("wait");
        assert!(!status.success(), "killed");
        assert!(!dir.exists(), "runtime dir removed");
    }
}
