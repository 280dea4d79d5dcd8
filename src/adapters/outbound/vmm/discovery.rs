//! Finding VMM processes that a previous VMCP left behind. Every VMM runs in
//! `<root>/<vm id>/` with a pid file; after a crash between spawning a VMM and
//! recording it (or between replacing a VMM and recording the new pid), the
//! runtime directory is the only trace. A crash can also land between the
//! spawn and the pid file's write, so the process table is read too: a live
//! process whose command line names a runtime directory under `<root>` is
//! that directory's VMM even without a pid file (or a directory). A pid is
//! trusted only if the backend recognises the live process as that VM's VMM
//! (by default: its command line names the directory's API socket), so a
//! recycled pid is never mistaken for a VMM.

use std::fs;
use std::path::Path;
use std::time::Duration;

use crate::domain::VmId;
use crate::ports::{Discovered, VmmProcess};

use super::process::{RuntimeDir, is_alive, read_start_time};

/// Whether `pid`'s command line mentions `socket` (so it is the VMM of that directory).
pub fn cmdline_names(pid: u32, socket: &Path) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = socket.as_os_str().as_encoded_bytes();
    raw.split(|b| *b == 0)
        .any(|arg| arg.windows(needle.len().max(1)).any(|w| w == needle))
}

/// The live VMM of `id`'s runtime directory under `root`, if its pid file
/// names a live process that `is_vmm` accepts as that VM's VMM.
pub fn live_vmm(
    root: &Path,
    id: &VmId,
    is_vmm: &impl Fn(u32, &VmId, &RuntimeDir) -> bool,
) -> Option<VmmProcess> {
    let dir = RuntimeDir::new(root, id);
    let pid = fs::read_to_string(dir.pid_file())
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    let start_time = read_start_time(pid).ok()?;
    (is_alive(pid, start_time) && is_vmm(pid, id, &dir)).then(|| VmmProcess {
        pid,
        start_time,
        socket_path: dir.api_socket().to_string_lossy().into_owned(),
    })
}

/// Lists every runtime directory under `root` with its live VMM, if any,
/// trusting a pid only when `is_vmm` accepts it for that VM.
pub fn scan_with(
    root: &Path,
    is_vmm: impl Fn(u32, &VmId, &RuntimeDir) -> bool,
) -> std::io::Result<Vec<Discovered>> {
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
        let process = live_vmm(root, &id, &is_vmm);
        found.push(Discovered { id, process });
    }
    // VMMs without a (readable) pid file: the process table names them.
    for (id, process) in by_command_line(root, &is_vmm) {
        match found.iter_mut().find(|d| d.id == id) {
            Some(d) if d.process.is_none() => d.process = Some(process),
            Some(d) => {
                if d.process.as_ref().map(|p| p.pid) != Some(process.pid) {
                    // Two live VMMs for one VM cannot come from VMCP (a respawn ends the old
                    // one first); report it rather than guess which one to end.
                    tracing::error!(vm.id = %id, pid = process.pid, recorded = ?d.process.as_ref().map(|p| p.pid), "a second VMM process names this VM's runtime directory; left alone");
                }
            }
            None => found.push(Discovered {
                id,
                process: Some(process),
            }),
        }
    }
    found.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(found)
}

/// Live processes whose command line names a runtime directory under `root`
/// and that `is_vmm` accepts as that directory's VMM.
fn by_command_line(
    root: &Path,
    is_vmm: &impl Fn(u32, &VmId, &RuntimeDir) -> bool,
) -> Vec<(VmId, VmmProcess)> {
    let mut needle = root.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let Some(at) = raw
            .windows(needle.len())
            .position(|w| w == needle.as_slice())
        else {
            continue;
        };
        let rest = &raw[at + needle.len()..];
        let name_end = rest
            .iter()
            .position(|b| *b == b'/' || *b == 0)
            .unwrap_or(rest.len());
        let Ok(id) = VmId::parse(&String::from_utf8_lossy(&rest[..name_end])) else {
            continue;
        };
        let dir = RuntimeDir::new(root, &id);
        let Ok(start_time) = read_start_time(pid) else {
            continue;
        };
        if is_alive(pid, start_time) && is_vmm(pid, &id, &dir) {
            found.push((
                id,
                VmmProcess {
                    pid,
                    start_time,
                    socket_path: dir.api_socket().to_string_lossy().into_owned(),
                },
            ));
        }
    }
    found
}

/// [`scan_with`] trusting a pid whose command line names its directory's
/// API socket (how VMCP starts every unjailed VMM): for tools and tests that
/// look for leftovers without a backend.
pub fn scan(root: &Path) -> std::io::Result<Vec<Discovered>> {
    scan_with(root, |pid, _, dir| cmdline_names(pid, &dir.api_socket()))
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
        match rustix::process::kill_process(pid, rustix::process::Signal::KILL) {
            // Gone between the check and the signal: nothing left to end.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => return Err(e.into()),
        }
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

        // A VMM whose pid file was never written (a crash right after the spawn) is found
        // through the process table, and so is one whose directory is gone.
        fs::remove_file(dir.pid_file()).expect("remove pid file");
        let found = scan(root.path()).expect("scan");
        assert_eq!(
            found[0].process.as_ref().map(|p| p.pid),
            Some(pid),
            "found without a pid file: {found:?}"
        );

        destroy(root.path(), &live, Some(&p), Duration::from_secs(5))
            .await
            .expect("destroy");
        let status = child.wait().await.expect("wait");
        assert!(!status.success(), "killed");
        assert!(!dir.exists(), "runtime dir removed");
    }
}
