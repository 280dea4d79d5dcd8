//! A test double for the `Hypervisor` port that follows Cloud Hypervisor's
//! state rules as observed on v53 (vm.shutdown → Created, power-button →
//! Shutdown, pause/resume only from Running/Paused, wrong-state calls refused
//! with the VMM's error). It lives in tests/ only, so production
//! configuration can never reach it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use vmcp::domain::{ConfigError, VmConfig, VmId, VmState};
use vmcp::ports::{
    BackendCheck, BackendEvent, BackendKind, EventSink, Hypervisor, HypervisorError, ShutdownMode,
    VmMetrics, VmmInfo, VmmProcess,
};

#[derive(Debug, Clone)]
struct DoubleVm {
    state: VmState,
    pid: u32,
    boots: u32,
}

/// The double's knobs and its view of the VMMs.
pub struct Double {
    vms: Mutex<BTreeMap<VmId, DoubleVm>>,
    events: EventSink,
    healthy: AtomicBool,
    next_pid: AtomicUsize,
    /// Operations that hang for this long before doing anything.
    delays: Mutex<HashMap<&'static str, Duration>>,
    /// Operations that fail with this error.
    failures: Mutex<HashMap<&'static str, HypervisorError>>,
    in_flight: Mutex<HashMap<VmId, usize>>,
    /// Highest number of concurrent calls seen for any single VM.
    pub max_concurrency_per_vm: AtomicUsize,
    /// Total mutating calls.
    pub calls: AtomicUsize,
    /// VMMs removed as orphans at start-up.
    pub orphans_destroyed: AtomicUsize,
}

impl Double {
    /// A healthy double sending its events to `events`.
    pub fn new(events: EventSink) -> Self {
        Self {
            vms: Mutex::new(BTreeMap::new()),
            events,
            healthy: AtomicBool::new(true),
            next_pid: AtomicUsize::new(1000),
            delays: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            max_concurrency_per_vm: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            orphans_destroyed: AtomicUsize::new(0),
        }
    }

    /// Makes `check()` fail (binary missing) or succeed.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Makes operation `op` hang for `d` first.
    pub fn delay(&self, op: &'static str, d: Duration) {
        self.delays.lock().unwrap().insert(op, d);
    }

    /// Makes operation `op` fail with `e`.
    pub fn fail(&self, op: &'static str, e: HypervisorError) {
        self.failures.lock().unwrap().insert(op, e);
    }

    /// Clears delays and failures.
    pub fn reset(&self) {
        self.delays.lock().unwrap().clear();
        self.failures.lock().unwrap().clear();
    }

    /// Simulates the VMM process dying (kill -9): it is gone and an exit event is sent.
    pub fn kill(&self, id: &str) {
        let id = VmId::parse(id).unwrap();
        self.vms.lock().unwrap().remove(&id);
        let _ = self.events.send(BackendEvent::Exited {
            vm_id: id,
            state: VmState::Failed,
            reason: "VMM killed by signal 9 (SIGKILL)".into(),
        });
    }

    /// Simulates a guest poweroff behind VMCP's back.
    pub fn guest_poweroff(&self, id: &str) {
        let id = VmId::parse(id).unwrap();
        if let Some(vm) = self.vms.lock().unwrap().get_mut(&id) {
            vm.state = VmState::Shutdown;
        }
    }

    /// Starts a VMM that no VMCP record knows about (left by a crash).
    pub fn plant_orphan(&self, id: &str) {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst) as u32;
        self.vms.lock().unwrap().insert(
            VmId::parse(id).unwrap(),
            DoubleVm {
                state: VmState::Running,
                pid,
                boots: 1,
            },
        );
    }

    /// How many VMMs the double holds.
    pub fn vmm_count(&self) -> usize {
        self.vms.lock().unwrap().len()
    }

    async fn enter(&self, op: &'static str, id: &VmId) -> Result<InFlight<'_>, HypervisorError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        {
            let mut f = self.in_flight.lock().unwrap();
            let n = f.entry(id.clone()).or_default();
            *n += 1;
            self.max_concurrency_per_vm.fetch_max(*n, Ordering::SeqCst);
        }
        let guard = InFlight {
            d: self,
            id: id.clone(),
        };
        let delay = self.delays.lock().unwrap().get(op).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if let Some(e) = self.failures.lock().unwrap().get(op).cloned() {
            return Err(e);
        }
        Ok(guard)
    }

    fn transition(
        &self,
        id: &VmId,
        from: &[VmState],
        to: VmState,
        what: &str,
    ) -> Result<VmState, HypervisorError> {
        let mut vms = self.vms.lock().unwrap();
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| HypervisorError::NotFound(id.to_string()))?;
        if !from.contains(&vm.state) {
            return Err(HypervisorError::InvalidState(format!(
                "{what}: invalid state transition from {:?}",
                vm.state
            )));
        }
        vm.state = to;
        if to == VmState::Running && what == "boot" {
            vm.boots += 1;
        }
        Ok(vm.state)
    }
}

struct InFlight<'a> {
    d: &'a Double,
    id: VmId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(n) = self.d.in_flight.lock().unwrap().get_mut(&self.id) {
            *n -= 1;
        }
    }
}

impl Hypervisor for Double {
    fn kind(&self) -> BackendKind {
        BackendKind::CloudHypervisor
    }

    async fn check(&self) -> Result<BackendCheck, HypervisorError> {
        if self.healthy.load(Ordering::SeqCst) {
            Ok(BackendCheck {
                version: "double v53.0".into(),
            })
        } else {
            Err(HypervisorError::Unavailable(
                "cloud-hypervisor binary not found on PATH".into(),
            ))
        }
    }

    fn validate(&self, config: &VmConfig) -> Result<(), ConfigError> {
        if !config.cpu.features.is_empty() {
            return Err(ConfigError::new(
                "config.cpu.features",
                "not supported by cloudhypervisor",
            ));
        }
        Ok(())
    }

    async fn create(
        &self,
        id: &VmId,
        _config: &VmConfig,
    ) -> Result<(VmState, VmmProcess), HypervisorError> {
        let _g = self.enter("create", id).await?;
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst) as u32;
        self.vms.lock().unwrap().insert(
            id.clone(),
            DoubleVm {
                state: VmState::Created,
                pid,
                boots: 0,
            },
        );
        Ok((
            VmState::Created,
            VmmProcess {
                pid,
                start_time: 1,
                socket_path: format!("/double/{id}.sock"),
            },
        ))
    }

    async fn boot(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        let _g = self.enter("boot", id).await?;
        self.transition(
            id,
            &[VmState::Created, VmState::Shutdown],
            VmState::Running,
            "boot",
        )
    }

    async fn shutdown(&self, id: &VmId, mode: ShutdownMode) -> Result<VmState, HypervisorError> {
        let _g = self.enter("shutdown", id).await?;
        // CH: power-button leads to Shutdown; a hard vm.shutdown leaves Created.
        let to = if mode.force {
            VmState::Created
        } else {
            VmState::Shutdown
        };
        self.transition(id, &[VmState::Running, VmState::Paused], to, "shutdown")
    }

    async fn pause(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        let _g = self.enter("pause", id).await?;
        self.transition(id, &[VmState::Running], VmState::Paused, "pause")
    }

    async fn resume(&self, id: &VmId) -> Result<VmState, HypervisorError> {
        let _g = self.enter("resume", id).await?;
        self.transition(id, &[VmState::Paused], VmState::Running, "resume")
    }

    async fn reboot(&self, id: &VmId, _force: bool) -> Result<VmState, HypervisorError> {
        let _g = self.enter("reboot", id).await?;
        self.transition(id, &[VmState::Running], VmState::Running, "reboot")
    }

    async fn delete(&self, id: &VmId, _force: bool) -> Result<(), HypervisorError> {
        let _g = self.enter("delete", id).await?;
        self.vms.lock().unwrap().remove(id);
        Ok(())
    }

    async fn info(&self, id: &VmId) -> Result<VmmInfo, HypervisorError> {
        let delay = self.delays.lock().unwrap().get("info").copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let vms = self.vms.lock().unwrap();
        let vm = vms
            .get(id)
            .ok_or_else(|| HypervisorError::NotFound(id.to_string()))?;
        let mut backend_info = BTreeMap::new();
        backend_info.insert("pid".to_owned(), vm.pid.to_string());
        backend_info.insert("boots".to_owned(), vm.boots.to_string());
        Ok(VmmInfo {
            state: Some(vm.state),
            reason: String::new(),
            metrics: VmMetrics {
                memory_usage_bytes: 4096,
                uptime_seconds: 1,
                ..Default::default()
            },
            backend_info,
        })
    }

    async fn adopt(
        &self,
        id: &VmId,
        _config: &VmConfig,
        process: Option<VmmProcess>,
    ) -> Result<VmState, HypervisorError> {
        let mut vms = self.vms.lock().unwrap();
        match (process, vms.get(id)) {
            (Some(p), Some(vm)) if vm.pid == p.pid => Ok(vm.state),
            (Some(p), _) => Err(HypervisorError::NotFound(format!(
                "no VMM with pid {}",
                p.pid
            ))),
            (None, _) => {
                // Like Firecracker: a stopped VM is registered and can be booted again.
                let pid = self.next_pid.fetch_add(1, Ordering::SeqCst) as u32;
                vms.insert(
                    id.clone(),
                    DoubleVm {
                        state: VmState::Shutdown,
                        pid,
                        boots: 0,
                    },
                );
                Ok(VmState::Shutdown)
            }
        }
    }

    async fn discover(&self) -> Result<Vec<(VmId, Option<VmmProcess>)>, HypervisorError> {
        Ok(self
            .vms
            .lock()
            .unwrap()
            .iter()
            .map(|(id, vm)| {
                let p = VmmProcess {
                    pid: vm.pid,
                    start_time: 1,
                    socket_path: format!("/double/{id}.sock"),
                };
                (id.clone(), Some(p))
            })
            .collect())
    }

    async fn destroy_orphan(
        &self,
        id: &VmId,
        _process: Option<VmmProcess>,
    ) -> Result<(), HypervisorError> {
        self.vms.lock().unwrap().remove(id);
        self.orphans_destroyed.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
