//! Supervision of one VMM process per VM, shared by the VMM backends.
//!
//! Each VM gets a runtime directory (0700) holding its API socket, pid file,
//! VMM log and serial output. The VMM is spawned in its own process group,
//! with stdin from /dev/null and stdout/stderr in its log (truncated at each
//! spawn, so a log tail is about this run) rather than a pipe, so that VMCP's
//! own SIGTERM, crash or restart never takes VMs down with it.
//! Readiness is observed by polling a caller-supplied probe (the VMM's ping)
//! until a deadline; a VMM that dies or never answers is killed, its
//! directory removed, and the error carries the tail of its log.
//!
//! A reaper task waits on the child (or, for a VMM adopted after a VMCP
//! restart, by watching /proc) and publishes its exit at once. An exit nobody
//! asked for is reported through the VM's [`VmmEventSink`] as
//! [`VmmEvent::Exited`] naming the pid that ended, with a state chosen by the
//! backend's classifier (a crash is Failed; a clean exit may be a guest
//! poweroff). Exits the caller expects (delete, a graceful stop, the old
//! process of a respawn) are not reported, nor are exits of a process whose
//! [`Supervised`] was dropped (nobody holds it any more). Process identity
//! is pid plus start time (field 22 of /proc/PID/stat), so a recycled pid
//! is never mistaken for, or killed as, a VMM.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::{VmId, VmState};
use crate::ports::{HypervisorError, VmmEvent, VmmEventSink};

/// Longest Unix socket path (sun_path is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// How many log lines an exit or start-up failure quotes.
pub const LOG_TAIL_LINES: usize = 10;
/// How many bytes at the end of the log are read to find those lines.
const LOG_TAIL_BYTES: u64 = 8192;
/// First and longest pause between readiness probes.
const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(2);
const PROBE_INTERVAL_MAX: Duration = Duration::from_millis(50);
/// How often an adopted (not our child) process is checked for exit.
const ADOPTED_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long a SIGKILLed process may take to be reaped before we give up waiting.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why supervising a VMM process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A file or directory operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The runtime directory is too deep for a Unix socket path.
    #[error(
        "socket path {0} is longer than {MAX_SOCKET_PATH_LEN} bytes; use a shorter runtime directory"
    )]
    SocketPathTooLong(PathBuf),
    /// The VMM binary could not be executed.
    #[error("cannot run {program}: {source}")]
    Exec {
        /// The binary.
        program: PathBuf,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
    /// The VMM started but died or never became ready.
    #[error("{program} {reason}; last log lines:\n{log_tail}")]
    NotReady {
        /// The binary.
        program: PathBuf,
        /// What happened (exit status, or the deadline and last probe error).
        reason: String,
        /// The end of the VMM's log.
        log_tail: String,
    },
    /// No live process with this pid and start time.
    #[error("process {pid} (start time {start_time}) is gone")]
    Gone {
        /// Process id.
        pid: u32,
        /// Expected start time.
        start_time: u64,
    },
    /// The VMM process ended (while a call to it was in flight, or before
    /// an operation that needs it).
    #[error("VMM pid {pid} {}; last log lines:\n{}", .exit.describe_status(), .exit.log_tail)]
    Ended {
        /// Process id.
        pid: u32,
        /// How it ended.
        exit: ExitInfo,
    },
    /// Sending a signal failed.
    #[error("cannot signal process {pid}: {source}")]
    Signal {
        /// Process id.
        pid: u32,
        /// The underlying failure.
        #[source]
        source: io::Error,
    },
}

impl From<ProcessError> for HypervisorError {
    /// Classifies by what the caller can do: a VMM that cannot start, a host
    /// short of resources, or a VMM that cannot be reached. The message says
    /// what failed in one line; the [`ProcessError`] stays the source.
    fn from(e: ProcessError) -> Self {
        let exhausted = |io: &io::Error| {
            matches!(
                io.raw_os_error(),
                Some(libc::ENOSPC | libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::EDQUOT)
            )
        };
        let spawn = |message: String, e: ProcessError| HypervisorError::SpawnFailed {
            message,
            source: Some(Arc::new(e)),
        };
        match &e {
            ProcessError::Exec { program, .. } => {
                spawn(format!("cannot run {}", program.display()), e)
            }
            ProcessError::NotReady {
                program, reason, ..
            } => spawn(format!("{} {reason}", program.display()), e),
            ProcessError::SocketPathTooLong(_) => spawn(
                "the VMM's API socket path is too long; use a shorter runtime directory".into(),
                e,
            ),
            ProcessError::Io { what, path, source } if exhausted(source) => {
                HypervisorError::ResourceExhausted {
                    message: format!("{what} {}", path.display()),
                    source: Some(Arc::new(e)),
                }
            }
            ProcessError::Io { what, path, .. } => {
                let message = format!("{what} {}", path.display());
                HypervisorError::unavailable_from(message, e)
            }
            ProcessError::Ended { exit, .. } => {
                let message = format!("the VMM {}", exit.describe_status());
                HypervisorError::unavailable_from(message, e)
            }
            ProcessError::Signal { pid, .. } => {
                HypervisorError::unavailable_from(format!("cannot signal VMM pid {pid}"), e)
            }
            ProcessError::Gone { .. } => HypervisorError::Gone(e.to_string()),
        }
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ProcessError + use<> {
    let path = path.to_owned();
    move |source| ProcessError::Io { what, path, source }
}

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

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit status, when this VMCP is the process's parent.
    pub status: Option<ExitStatus>,
    /// The end of the VMM's log at exit.
    pub log_tail: String,
}

impl ExitInfo {
    /// Whether the process exited with status 0.
    pub fn is_clean(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "exited with status N" / "killed by signal N (SIGX)" / "exited (status unknown)".
    pub fn describe_status(&self) -> String {
        describe_status(self.status)
    }

    /// The status description followed by the log tail, for reasons and errors.
    pub fn reason(&self) -> String {
        format!(
            "VMM {}; last log lines:\n{}",
            self.describe_status(),
            self.log_tail
        )
    }
}

/// Describes an exit status in words.
pub fn describe_status(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "exited (status unknown: not a child of this VMCP)".to_owned();
    };
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(sig) => {
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by signal {sig} ({}{core})", signal_name(sig))
        }
        None => format!("ended ({status})"),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSYS => "SIGSYS",
        _ => "signal",
    }
}

/// Decides the state to report when a VMM exits without being asked to
/// (Failed for a crash; a backend may map a clean exit to Shutdown).
pub type ExitClassifier = Arc<dyn Fn(&ExitInfo) -> VmState + Send + Sync>;

/// Where and how unexpected exits of one VM's VMM are reported.
#[derive(Clone)]
pub struct ExitReporter {
    /// The VM (for logs; the event itself names the pid).
    pub vm_id: VmId,
    /// The VM owner's sink.
    pub events: VmmEventSink,
    /// Maps an unexpected exit to the state to report.
    pub classify: ExitClassifier,
}

impl fmt::Debug for ExitReporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExitReporter")
            .field("vm_id", &self.vm_id)
            .finish_non_exhaustive()
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The VMM binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How long the VMM may take to answer the readiness probe.
    pub ready_timeout: Duration,
}

/// Where a supervised process is in its life, as far as exit reporting is
/// concerned: the reaper reports any exit in `Armed`, an unclean one in
/// `ExpectClean`, none in `Starting` or `Expected`. Stored in an [`AtomicU8`]
/// shared with the reaper task, so transitions are compare-and-swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Spawned, not yet answering its readiness probe.
    Starting = 0,
    /// Running; any exit is news.
    Armed = 1,
    /// Being stopped; no exit is news.
    Expected = 2,
    /// Asked to power off; only a crash is news.
    ExpectClean = 3,
    /// The reaper has seen the exit.
    Exited = 4,
}

impl Phase {
    /// The phase stored as `v`. Only this module stores phases, always
    /// through `as u8`, so every other value is unreachable; it reads as
    /// `Exited`, the state from which nothing is reported or signalled.
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Starting,
            1 => Phase::Armed,
            2 => Phase::Expected,
            3 => Phase::ExpectClean,
            _ => Phase::Exited,
        }
    }
}

/// A [`Phase`] shared between a [`Supervised`] and its reaper.
#[derive(Debug)]
struct PhaseCell(AtomicU8);

impl PhaseCell {
    fn new(phase: Phase) -> Self {
        Self(AtomicU8::new(phase as u8))
    }

    fn load(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::Acquire))
    }

    fn swap(&self, to: Phase) -> Phase {
        Phase::from_u8(self.0.swap(to as u8, Ordering::AcqRel))
    }

    /// Moves from `from` to `to`; on failure returns the phase found.
    fn transition(&self, from: Phase, to: Phase) -> Result<(), Phase> {
        self.0
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(drop)
            .map_err(Phase::from_u8)
    }
}

/// Which exits of a running VMM the backend is waiting for; those are not
/// reported as events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitExpectation {
    /// Any exit is news (the normal case).
    Unexpected,
    /// A clean exit (status 0) is expected, e.g. after asking the guest to
    /// power off; a crash is still reported.
    CleanOnly,
    /// Any exit is expected (the VMM is being stopped or killed).
    Any,
}

/// CPU and memory of a VMM process, from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcStats {
    /// CPU time used since the process started, percent of one core.
    pub cpu_percent: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Time since the process started.
    pub uptime: Duration,
}

/// A supervised VMM process.
#[derive(Debug)]
pub struct Supervised {
    pid: u32,
    start_time: u64,
    program: PathBuf,
    runtime: RuntimeDir,
    phase: Arc<PhaseCell>,
    exit: watch::Receiver<Option<ExitInfo>>,
    adopted: bool,
}

impl Supervised {
    /// Spawns `spec` with its runtime directory `runtime` (prepared here),
    /// then polls `probe` until it succeeds or `spec.ready_timeout` passes.
    /// On any failure the process is killed and reaped, the directory
    /// removed, and the error carries the log tail.
    pub async fn spawn<P, F, E>(
        spec: &SpawnSpec,
        runtime: RuntimeDir,
        reporter: ExitReporter,
        mut probe: P,
    ) -> Result<Self, ProcessError>
    where
        P: FnMut() -> F,
        F: Future<Output = Result<(), E>>,
        E: fmt::Display,
    {
        runtime.prepare()?;
        let started = Self::start(spec, &runtime, reporter);
        let sup = match started {
            Ok(sup) => sup,
            Err(e) => {
                // Nothing runs yet; only the directory may be left.
                let _ = runtime.remove();
                return Err(e);
            }
        };
        let deadline = Instant::now() + spec.ready_timeout;
        let mut interval = PROBE_INTERVAL_MIN;
        let mut exit = sup.exit.clone();
        let failure = loop {
            if let Some(info) = exit.borrow().clone() {
                break format!("exited during start-up: {}", info.describe_status());
            }
            let budget = deadline.saturating_duration_since(Instant::now());
            let outcome = match tokio::time::timeout(budget, probe()).await {
                Ok(outcome) => outcome.map_err(|e| e.to_string()),
                Err(_) => Err("the probe itself did not finish".to_owned()),
            };
            let last = match outcome {
                Ok(()) => {
                    if sup.phase.transition(Phase::Starting, Phase::Armed).is_ok() {
                        return Ok(sup);
                    }
                    break "exited right after becoming ready".to_owned();
                }
                Err(e) => e,
            };
            let now = Instant::now();
            if now >= deadline {
                break format!(
                    "did not become ready within {:?} (last probe error: {last})",
                    spec.ready_timeout
                );
            }
            let pause = interval.min(deadline - now);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = exit.changed() => {}
            }
            interval = (interval * 2).min(PROBE_INTERVAL_MAX);
        };
        // Silence the reaper: this exit is ours (a no-op if it already exited).
        let _ = sup.phase.transition(Phase::Starting, Phase::Expected);
        let info = sup.kill_and_reap().await;
        let log_tail = info
            .map(|i| i.log_tail)
            .unwrap_or_else(|| log_tail(&runtime.log_file(), LOG_TAIL_LINES));
        let _ = runtime.remove();
        Err(ProcessError::NotReady {
            program: spec.program.clone(),
            reason: failure,
            log_tail,
        })
    }

    fn start(
        spec: &SpawnSpec,
        runtime: &RuntimeDir,
        reporter: ExitReporter,
    ) -> Result<Self, ProcessError> {
        let log_path = runtime.log_file();
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&log_path)
            .map_err(io_err("cannot open log", &log_path))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("cannot duplicate log handle", &log_path))?;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            // Own process group: a signal to VMCP's group (Ctrl-C, a
            // service manager's group kill of the foreground job) does not
            // reach the VMM.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Exec {
            program: spec.program.clone(),
            source,
        })?;
        let Some(pid) = child.id() else {
            // `id()` is None only once the child has been reaped, which
            // cannot have happened before the first wait.
            return Err(ProcessError::NotReady {
                program: spec.program.clone(),
                reason: "vanished before it could be observed".to_owned(),
                log_tail: log_tail(&log_path, LOG_TAIL_LINES),
            });
        };
        // The child is at worst a zombie until waited on, so /proc/PID exists;
        // if it cannot be read or the pid file written, stop the child here.
        let pid_file = runtime.pid_file();
        let stat_path = PathBuf::from(format!("/proc/{pid}/stat"));
        let identity = read_start_time(pid)
            .map_err(io_err("cannot read start time from", &stat_path))
            .and_then(|t| {
                fs::write(&pid_file, format!("{pid}\n"))
                    .map(|()| t)
                    .map_err(io_err("cannot write pid file", &pid_file))
            });
        let start_time = match identity {
            Ok(t) => t,
            Err(e) => {
                let _ = child.start_kill();
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(None);
        let phase = Arc::new(PhaseCell::new(Phase::Starting));
        let reaper_phase = phase.clone();
        let reaper_log = log_path.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let info = ExitInfo {
                status,
                log_tail: log_tail(&reaper_log, LOG_TAIL_LINES),
            };
            publish_exit(&tx, &reaper_phase, pid, &reporter, info);
        });
        let sup = Self {
            pid,
            start_time,
            program: spec.program.clone(),
            runtime: runtime.clone(),
            phase,
            exit: rx,
            adopted: false,
        };
        Ok(sup)
    }

    /// Re-attaches to a VMM that survived a VMCP restart. Verifies the pid's
    /// start time and watches /proc for its exit (the exit status is then
    /// unknown: the process is not our child).
    pub fn adopt(
        pid: u32,
        start_time: u64,
        program: PathBuf,
        runtime: RuntimeDir,
        reporter: ExitReporter,
    ) -> Result<Self, ProcessError> {
        let gone = || ProcessError::Gone { pid, start_time };
        if !is_alive(pid, start_time) {
            return Err(gone());
        }
        let (tx, rx) = watch::channel(None);
        let phase = Arc::new(PhaseCell::new(Phase::Armed));
        let reaper_phase = phase.clone();
        let reaper_log = runtime.log_file();
        tokio::spawn(async move {
            // Not our child, so no SIGCHLD or wait(): watch /proc instead,
            // often enough to report an exit within a second. Once the
            // `Supervised` is dropped (its owner let go of the VM) nobody
            // listens any more, so stop watching.
            let mut tick = tokio::time::interval(ADOPTED_POLL_INTERVAL);
            while is_alive(pid, start_time) {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = tx.closed() => return,
                }
            }
            let info = ExitInfo {
                status: None,
                log_tail: log_tail(&reaper_log, LOG_TAIL_LINES),
            };
            publish_exit(&tx, &reaper_phase, pid, &reporter, info);
        });
        Ok(Self {
            pid,
            start_time,
            program,
            runtime,
            phase,
            exit: rx,
            adopted: true,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Start time in clock ticks since boot.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// The binary that runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The runtime directory.
    pub fn runtime(&self) -> &RuntimeDir {
        &self.runtime
    }

    /// Whether this process was adopted rather than spawned by this VMCP.
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// How the process ended, if it has.
    pub fn exited(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    /// The exit as an error ([`ProcessError::Ended`]), if the process has ended.
    pub fn ended(&self) -> Option<ProcessError> {
        self.exited().map(|exit| ProcessError::Ended {
            pid: self.pid,
            exit,
        })
    }

    /// A receiver that sees the exit, for tasks that must stop with the process.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// Sets which exits are expected (not reported). Returns false when the
    /// process has already exited.
    pub fn expect_exit(&self, expectation: ExitExpectation) -> bool {
        let to = match expectation {
            ExitExpectation::Unexpected => Phase::Armed,
            ExitExpectation::CleanOnly => Phase::ExpectClean,
            ExitExpectation::Any => Phase::Expected,
        };
        let mut current = self.phase.load();
        loop {
            match current {
                Phase::Exited => return false,
                // Still starting: `spawn` decides, and it only hands out
                // processes that became ready.
                Phase::Starting => return true,
                Phase::Armed | Phase::Expected | Phase::ExpectClean => {}
            }
            match self.phase.transition(current, to) {
                Ok(()) => return true,
                Err(now) => current = now,
            }
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        let mut rx = self.exit.clone();
        match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
            Ok(Ok(info)) => info.clone(),
            // The reaper is gone (runtime shutting down): report what is known.
            Ok(Err(_)) | Err(_) => self.exited(),
        }
    }

    /// Sends `signal` unless the process has exited or its pid now names a
    /// different process.
    pub fn signal(&self, signal: rustix::process::Signal) -> Result<(), ProcessError> {
        if self.exited().is_some() || !is_alive(self.pid, self.start_time) {
            return Ok(());
        }
        let gone = || ProcessError::Gone {
            pid: self.pid,
            start_time: self.start_time,
        };
        let raw = i32::try_from(self.pid).map_err(|_| gone())?;
        let pid = rustix::process::Pid::from_raw(raw).ok_or_else(gone)?;
        match rustix::process::kill_process(pid, signal) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(ProcessError::Signal {
                pid: self.pid,
                source: e.into(),
            }),
        }
    }

    /// Ends the process as an expected exit: SIGTERM, then SIGKILL if it is
    /// still running after `grace` (at once when `grace` is zero). Returns
    /// how it ended, or None if it could not be reaped in time.
    pub async fn terminate(&self, grace: Duration) -> Option<ExitInfo> {
        self.expect_exit(ExitExpectation::Any);
        if let Some(info) = self.exited() {
            return Some(info);
        }
        if !grace.is_zero() {
            if let Err(e) = self.signal(rustix::process::Signal::TERM) {
                tracing::warn!(pid = self.pid, error = %e, "SIGTERM failed");
            }
            if let Some(info) = self.wait_exit(grace).await {
                return Some(info);
            }
        }
        self.kill_and_reap().await
    }

    async fn kill_and_reap(&self) -> Option<ExitInfo> {
        if let Err(e) = self.signal(rustix::process::Signal::KILL) {
            tracing::warn!(pid = self.pid, error = %e, "SIGKILL failed");
        }
        if self.adopted {
            // Not our child: init reaps it; wait until /proc says it is gone.
            let deadline = Instant::now() + KILL_REAP_TIMEOUT;
            while is_alive(self.pid, self.start_time) && Instant::now() < deadline {
                if let Some(info) = self.wait_exit(PROBE_INTERVAL_MAX).await {
                    return Some(info);
                }
            }
        }
        self.wait_exit(KILL_REAP_TIMEOUT).await
    }

    /// CPU and memory use of the process.
    pub fn stats(&self) -> io::Result<ProcStats> {
        proc_stats(self.pid, self.start_time)
    }
}

fn publish_exit(
    tx: &watch::Sender<Option<ExitInfo>>,
    phase: &PhaseCell,
    pid: u32,
    reporter: &ExitReporter,
    info: ExitInfo,
) {
    let before = phase.swap(Phase::Exited);
    // Once the `Supervised` is dropped (its owner let go of the VM, e.g. a
    // VMCP shutting down or handing the VMM to another owner), nobody holds
    // this process any more: its exit is not that owner's news.
    let held = !tx.is_closed();
    tx.send_replace(Some(info.clone()));
    let news = held
        && match before {
            Phase::Armed => true,
            Phase::ExpectClean => !info.is_clean(),
            Phase::Starting | Phase::Expected | Phase::Exited => false,
        };
    if news {
        let state = (reporter.classify)(&info);
        tracing::warn!(vm_id = %reporter.vm_id, pid, %state, reason = %info.describe_status(), "VMM exited");
        // A closed sink means the VM's owner is gone; nobody is left to tell.
        let _ = reporter.events.send(VmmEvent::Exited {
            pid,
            state,
            reason: info.reason(),
        });
    }
}

/// The fields of /proc/PID/stat after the command name, so that index 0 is
/// field 3 (`state`).
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may itself contain
    // spaces or parentheses; everything after the last ')' is space-separated.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

fn stat_field(fields: &[String], field: usize) -> io::Result<u64> {
    fields
        .get(field - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad stat field {field}"),
            )
        })
}

/// The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn read_start_time(pid: u32) -> io::Result<u64> {
    stat_field(&stat_fields(pid)?, 22)
}

/// Whether `pid` is a live (not zombie) process that started at `start_time`.
pub fn is_alive(pid: u32, start_time: u64) -> bool {
    match stat_fields(pid) {
        Ok(fields) => {
            fields.first().is_some_and(|s| s != "Z" && s != "X")
                && stat_field(&fields, 22).is_ok_and(|t| t == start_time)
        }
        Err(_) => false,
    }
}

/// CPU (since start, percent of one core), RSS and uptime of `pid`, which
/// must still have start time `start_time`.
pub fn proc_stats(pid: u32, start_time: u64) -> io::Result<ProcStats> {
    let fields = stat_fields(pid)?;
    if stat_field(&fields, 22)? != start_time {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("pid {pid} is a different process now"),
        ));
    }
    let ticks = stat_field(&fields, 14)? + stat_field(&fields, 15)?;
    let rss_pages = stat_field(&fields, 24)?;
    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
    let uptime_text = fs::read_to_string("/proc/uptime")?;
    let system_uptime: f64 = uptime_text
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/uptime"))?;
    let alive_secs = (system_uptime - start_time as f64 / hz).max(0.0);
    let cpu_secs = ticks as f64 / hz;
    let cpu_percent = if alive_secs > 0.0 {
        cpu_secs / alive_secs * 100.0
    } else {
        0.0
    };
    Ok(ProcStats {
        cpu_percent,
        rss_bytes: rss_pages * rustix::param::page_size() as u64,
        uptime: Duration::from_secs_f64(alive_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
            ready_timeout: Duration::from_secs(5),
        }
    }

    async fn ready() -> Result<(), String> {
        Ok(())
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
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

    #[tokio::test]
    async fn a_missing_binary_is_a_spawn_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (rep, _events) = reporter("nobin");
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
        let spec = SpawnSpec {
            program: tmp.path().join("no-such-vmm"),
            args: vec![],
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
        let dir = RuntimeDir::new(tmp.path(), &rep.vm_id);
        dir.prepare().expect("prepare");
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
}
