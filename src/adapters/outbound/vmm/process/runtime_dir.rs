//! One VM's runtime directory and the files in it: the private (0700)
//! directory, the API socket and the lock file a killed VMM leaves behind,
//! and the tail of the VMM's log that exits and start-up failures quote.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::{MAX_SOCKET_PATH_LEN, ProcessError, io_err};
use crate::domain::VmId;

/// How many log lines an exit or start-up failure quotes.
pub const LOG_TAIL_LINES: usize = 10;
/// How many bytes at the end of the log are read to find those lines.
const LOG_TAIL_BYTES: u64 = 8192;

/// Creates `path` (and its parents) with mode 0700 and tightens the mode if
/// it already existed.
pub fn create_private_dir(path: &Path) -> Result<(), ProcessError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("cannot create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .map_err(io_err("cannot set mode 0700 on", path))
}

/// One VM's runtime directory: `<root>/<vm id>/` with the API socket, pid
/// file, VMM log and serial console output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Names the runtime directory of `id` under `root` without touching the disk.
    pub fn new(root: &Path, id: &VmId) -> Self {
        Self {
            path: root.join(id.as_str()),
        }
    }

    /// Creates the directory (0700, root too) and removes a stale socket or
    /// lock file left by a VMM that died without cleaning up.
    pub fn prepare(&self) -> Result<(), ProcessError> {
        let socket = self.api_socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH_LEN {
            return Err(ProcessError::SocketPathTooLong(socket));
        }
        if let Some(root) = self.path.parent() {
            create_private_dir(root)?;
        }
        create_private_dir(&self.path)?;
        self.remove_stale_socket()
    }

    /// Removes the API socket and any `*.lock` file in the directory.
    pub fn remove_stale_socket(&self) -> Result<(), ProcessError> {
        remove_if_exists(&self.api_socket())?;
        let entries = match fs::read_dir(&self.path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("cannot list", &self.path)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("cannot list", &self.path))?;
            if entry.file_name().to_string_lossy().ends_with(".lock") {
                remove_if_exists(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Removes the directory and everything in it; a missing directory is fine.
    pub fn remove(&self) -> Result<(), ProcessError> {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove", &self.path)(e)),
        }
    }

    /// Whether the directory exists.
    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The VMM's API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.path.join("api.sock")
    }

    /// The pid file (the VMM's pid, one line).
    pub fn pid_file(&self) -> PathBuf {
        self.path.join("vmm.pid")
    }

    /// The VMM's stdout and stderr.
    pub fn log_file(&self) -> PathBuf {
        self.path.join("vmm.log")
    }

    /// The default serial console output.
    pub fn serial_file(&self) -> PathBuf {
        self.path.join("serial.log")
    }
}

/// Removes a VMM's API socket and the `.lock` file Cloud Hypervisor keeps
/// beside it, wherever they are: a killed VMM leaves both behind, and
/// Firecracker will not start on a path whose stale socket still exists.
pub fn remove_socket(socket: &Path) -> Result<(), ProcessError> {
    remove_if_exists(socket)?;
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    remove_if_exists(Path::new(&lock))
}

fn remove_if_exists(path: &Path) -> Result<(), ProcessError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", path)(e)),
    }
}

/// The last `lines` lines of the file at `path` (at most the last 8 KiB),
/// or a note saying why it could not be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = all[all.len().saturating_sub(lines)..].join("\n");
            if tail.is_empty() {
                "(log is empty)".to_owned()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
