//! What a backend and every handle it hands out share: the flavour, the
//! supervision settings, the pooled API client and the VMM's version (asked
//! once). Also the two steps every flavour goes through the same way:
//! spawning a VMM until its API answers, and the backend checks (the
//! `--version` probe, with one timeout behaviour for every VMM, and the KVM
//! device).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::domain::VmId;
use crate::ports::{HypervisorError, VmmEventSink};

use super::flavour::{Api, Flavour, Supervision};
use super::process::{ExitReporter, RuntimeDir, SpawnSpec, Supervised};
use super::uds_http::UdsClient;

/// Bound on `<binary> --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// The flavour and everything its VMs share. Cloning shares the flavour,
/// the connection pool and the version.
#[derive(Debug)]
pub struct Supervisor<F> {
    /// The VMM's specifics.
    pub flavour: Arc<F>,
    /// How processes are supervised.
    pub settings: Supervision,
    /// The pooled client for every VMM socket, bounded by the call timeout.
    pub http: UdsClient,
    version: OnceCell<String>,
}

impl<F> Clone for Supervisor<F> {
    fn clone(&self) -> Self {
        Self {
            flavour: Arc::clone(&self.flavour),
            settings: self.settings.clone(),
            http: self.http.clone(),
            version: self.version.clone(),
        }
    }
}

impl<F: Flavour> Supervisor<F> {
    /// A supervisor for `flavour` with `settings`.
    pub fn new(flavour: F, settings: Supervision) -> Self {
        Self {
            http: UdsClient::new(settings.call_timeout),
            flavour: Arc::new(flavour),
            settings,
            version: OnceCell::new(),
        }
    }

    /// Changes the settings; the API client follows the call timeout.
    pub fn change_settings(&mut self, change: impl FnOnce(&mut Supervision)) {
        change(&mut self.settings);
        self.http = UdsClient::new(self.settings.call_timeout);
    }

    /// The VMM binary's version as the flavour words it, asked once.
    pub async fn version(&self) -> Result<String, HypervisorError> {
        self.version
            .get_or_try_init(|| async {
                let line = run_version(&self.settings.binary).await?;
                Ok(self.flavour.version(&line))
            })
            .await
            .cloned()
    }

    /// `Unavailable` unless the KVM device opens read-write.
    pub fn check_kvm(&self) -> Result<(), HypervisorError> {
        let device = &self.settings.kvm_device;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map(drop)
            .map_err(|e| {
                let message = format!("{} cannot be opened read-write", device.display());
                HypervisorError::unavailable_from(message, e)
            })
    }

    /// How exits of `id`'s VMM are reported: to `events`, classified by the flavour.
    pub fn reporter(&self, id: &VmId, events: VmmEventSink) -> ExitReporter {
        let flavour = Arc::clone(&self.flavour);
        ExitReporter {
            vm_id: id.clone(),
            events,
            classify: Arc::new(move |exit| flavour.classify_exit(exit)),
        }
    }

    /// Starts a VMM for `vm` in `runtime` and waits until its API answers.
    /// Returns the process and its socket. On failure nothing runs and the
    /// VM's files are gone (the error carries the VMM's log tail).
    pub async fn spawn(
        &self,
        id: &VmId,
        vm: &mut F::Vm,
        runtime: &RuntimeDir,
        events: VmmEventSink,
    ) -> Result<(Supervised, PathBuf), HypervisorError> {
        let launch = runtime
            .prepare()
            .map_err(HypervisorError::from)
            .and_then(|()| self.flavour.launch(&self.settings, vm, runtime));
        let launch = match launch {
            Ok(launch) => launch,
            Err(e) => {
                self.remove_files(id, vm, runtime);
                return Err(e);
            }
        };
        let spec = SpawnSpec {
            program: launch.program,
            args: launch.args,
            listen_on_stdin: launch.listen_on_stdin,
            ready_timeout: self.settings.ready_timeout,
        };
        let socket = self.flavour.socket(vm, runtime);
        let reporter = self.reporter(id, events);
        let probe = || {
            self.flavour.ping(Api {
                http: &self.http,
                socket: &socket,
            })
        };
        match Supervised::spawn(&spec, runtime.clone(), reporter, probe).await {
            Ok(process) => Ok((process, socket)),
            Err(e) => {
                self.remove_files(id, vm, runtime);
                Err(e.into())
            }
        }
    }

    /// Removes the VM's runtime directory and the flavour's files, logging
    /// (not failing on) what cannot be removed: used on paths that already
    /// fail for another reason.
    pub fn remove_files(&self, id: &VmId, vm: &F::Vm, runtime: &RuntimeDir) {
        if let Err(e) = runtime.remove() {
            tracing::warn!(vm_id = %id, error = %e, "cannot remove the runtime directory");
        }
        if let Err(e) = self.flavour.remove_files(vm) {
            tracing::warn!(vm_id = %id, error = %e, "cannot remove the VM's files");
        }
    }
}

/// Runs `binary --version` and returns the first non-empty line of its
/// output. Any failure, a timeout included, is `Unavailable`: the backend
/// cannot be used either way.
pub async fn run_version(binary: &Path) -> Result<String, HypervisorError> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            let message = format!("{} cannot run", binary.display());
            return Err(HypervisorError::unavailable_from(message, e));
        }
        Err(elapsed) => {
            let message = format!(
                "{} --version did not finish within {VERSION_TIMEOUT:?}",
                binary.display()
            );
            return Err(HypervisorError::unavailable_from(message, elapsed));
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    if !out.status.success() || line.is_empty() {
        return Err(HypervisorError::unavailable(format!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_version_is_the_first_non_empty_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bin = tmp.path().join("vmm");
        std::fs::write(&bin, "#!/bin/sh\necho\necho '  vmm v1.2  '\necho more\n").expect("write");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(run_version(&bin).await.expect("version"), "vmm v1.2");
    }

    #[tokio::test]
    async fn a_missing_or_failing_binary_is_unavailable() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let missing = tmp.path().join("absent");
        let err = run_version(&missing).await.expect_err("missing");
        assert!(
            matches!(&err, HypervisorError::Unavailable { message, source: Some(_) } if message.contains("absent")),
            "{err:?}"
        );
        let failing = tmp.path().join("failing");
        std::fs::write(&failing, "#!/bin/sh\necho nope >&2\nexit 3\n").expect("write");
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let err = run_version(&failing).await.expect_err("fails");
        assert!(
            matches!(&err, HypervisorError::Unavailable { message, .. } if message.contains("nope")),
            "{err:?}"
        );
    }
}
