//! A supervised VMM process: spawned in its own process group (or adopted
//! after a VMCP restart), polled until ready, watched by a reaper task that
//! publishes its exit, and ended by pid and start time only.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::error::{ProcessError, io_err};
use super::exit::{ExitExpectation, ExitInfo, ExitReporter, Phase, PhaseCell, publish_exit};
use super::procfs::{ProcStats, is_alive, proc_stats, read_start_time};
use super::runtime_dir::{LOG_TAIL_LINES, RuntimeDir, log_tail};

/// Shortest and longest pause between readiness probes (see [`probe_pause`]).
const PROBE_INTERVAL_MIN: Duration = Duration::from_millis(1);
const PROBE_INTERVAL_MAX: Duration = Duration::from_millis(50);
/// How long after the spawn probes keep the shortest pause.
const PROBE_FAST_FOR: Duration = Duration::from_millis(20);

/// How often an adopted (not our child) process is checked for exit.
const ADOPTED_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long a SIGKILLed process may take to be reaped before we give up waiting.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause before the next readiness probe of a VMM spawned `since_spawn`
/// ago, after a pause of `last`.
///
/// A VMM is usually ready within a few milliseconds of its spawn (here a
/// fresh Firecracker answers after ~1.7 ms, a Cloud Hypervisor after ~3.9
/// ms), so for the first [`PROBE_FAST_FOR`] the probes come every
/// millisecond, like a client polling a VMM it started itself: a start is
/// noticed at most a millisecond late. Until the socket exists a probe is a
/// failed `connect`, a few microseconds. A slower start (a loaded host)
/// then backs off, the pause growing by half up to [`PROBE_INTERVAL_MAX`].
fn probe_pause(since_spawn: Duration, last: Duration) -> Duration {
    if since_spawn < PROBE_FAST_FOR {
        PROBE_INTERVAL_MIN
    } else {
        (last + last / 2).clamp(PROBE_INTERVAL_MIN, PROBE_INTERVAL_MAX)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The VMM binary.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// A socket to bind, listen on and hand to the process as its stdin
    /// (see the flavour's `Launch::listen_on_stdin`).
    pub listen_on_stdin: Option<PathBuf>,
    /// How long the VMM may take to answer the readiness probe.
    pub ready_timeout: Duration,
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
    /// Spawns `spec` with its runtime directory `runtime`, which the caller
    /// has prepared ([`RuntimeDir::prepare`], before the flavour put its
    /// files there), then polls `probe` until it succeeds or
    /// `spec.ready_timeout` passes. On any failure the process is killed and
    /// reaped, the directory removed, and the error carries the log tail.
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
        let started = Self::start(spec, &runtime, reporter);
        let sup = match started {
            Ok(sup) => sup,
            Err(e) => {
                // Nothing runs yet; only the directory may be left.
                let _ = runtime.remove();
                return Err(e);
            }
        };
        let spawned = Instant::now();
        let deadline = spawned + spec.ready_timeout;
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
            interval = probe_pause(now - spawned, interval);
            tokio::select! {
                _ = tokio::time::sleep(interval.min(deadline - now)) => {}
                _ = exit.changed() => {}
            }
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
        // VMCP's copy of the listener is closed when `cmd` is dropped below,
        // so once the VMM is gone nothing accepts on its socket any more.
        let stdin = match &spec.listen_on_stdin {
            None => Stdio::null(),
            Some(socket) => UnixListener::bind(socket)
                .map(|l| Stdio::from(OwnedFd::from(l)))
                .map_err(io_err("cannot listen on", socket))?,
        };
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .stdin(stdin)
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

#[cfg(test)]
mod probe_tests {
    use super::*;

    /// Walks the probe schedule of a start that never becomes ready.
    fn schedule(until: Duration) -> Vec<(Duration, Duration)> {
        let (mut at, mut pause) = (Duration::ZERO, PROBE_INTERVAL_MIN);
        let mut probes = Vec::new();
        while at < until {
            pause = probe_pause(at, pause);
            probes.push((at, pause));
            at += pause;
        }
        probes
    }

    #[test]
    fn probes_come_every_millisecond_while_a_start_is_young_then_back_off() {
        let probes = schedule(Duration::from_secs(2));
        for &(at, pause) in &probes {
            if at < PROBE_FAST_FOR {
                assert_eq!(
                    pause, PROBE_INTERVAL_MIN,
                    "at {at:?}: a ready VMM is seen within 1 ms"
                );
            }
            assert!(pause <= PROBE_INTERVAL_MAX, "at {at:?}: {pause:?}");
        }
        let later: Vec<_> = probes
            .iter()
            .filter(|(at, _)| *at >= PROBE_FAST_FOR)
            .collect();
        assert!(
            later.windows(2).all(|w| w[1].1 >= w[0].1),
            "after the fast phase the pause never shrinks"
        );
        assert_eq!(later.last().map(|p| p.1), Some(PROBE_INTERVAL_MAX));
        // A slow start costs few probes: 20 in the fast phase, then a backoff.
        assert!(probes.len() < 80, "{} probes in 2 s", probes.len());
    }
}
